"""The routes ``step()`` takes on CUDA and other accelerators, run on the CPU.

On the CPU, ``step()`` takes routes of its own: square roots as ``1 / rsqrt``, the fused encoder
layer, the time feature made from the host's step count, cache blocking. On any other device it
takes routes that never read a value back to the host (``sqrt``, the encoder in eager ops, the
time feature from a step counter on the device). CI has no GPU, so here
:func:`metaadamw.functional.takes_cpu_routes` is patched to say no and the CPU runs those routes:
this checks their arithmetic and bookkeeping (AdamW equivalence, agreement with the CPU routes,
checkpoints and copies); that they never synchronise with the host is ``test_cuda.py``'s, on a GPU.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from metaadamw import MetaAdamW
from metaadamw import functional as F
from metaadamw import modulator
from tests.metaadamw.helpers import (TinyTransformer, lm_batches, lm_loss, mlp, mse, randomise_head,
                                     regression_batches, save_and_load, small_kwargs)


@pytest.fixture
def accelerator_routes(monkeypatch):
    """The accelerator routes on the CPU (with cache blocking allowed for any size, so that a CPU
    route left behind would show)."""
    monkeypatch.setattr(F, "takes_cpu_routes", lambda device: False)
    monkeypatch.setattr(F, "CPU_BLOCKING_MIN_NUMEL", 0)
    monkeypatch.setattr(F, "CPU_CHUNK_NUMEL", 40)


def _train(model, opt, batches, steps, start=0, loss_fn=lm_loss, meta_every=3):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_fn(model, batches[t % len(batches)]).backward()
        opt.step()
        if meta_every and (t + 1) % meta_every == 0:
            rec = opt.meta_step(model, loss_fn, batches[t % 3], batches[(t + 1) % 3], batches[(t + 2) % 3])
            assert not rec.skipped


def test_the_fixture_takes_every_accelerator_route(accelerator_routes, monkeypatch):
    calls = []
    monkeypatch.setattr(modulator, "FUSED_LAYER", lambda *a: calls.append("fused"))  # must not be called
    real_rsqrt = torch._foreach_rsqrt
    monkeypatch.setattr(torch, "_foreach_rsqrt", lambda *a: calls.append("rsqrt") or real_rsqrt(*a))
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), total_steps=10, **small_kwargs())
    seen = []
    extractor = opt.modulator.extractor
    forward = extractor.forward
    monkeypatch.setattr(extractor, "forward", lambda stats, time: seen.append(time) or forward(stats, time))
    _train(model, opt, regression_batches(), 3, loss_fn=mse, meta_every=0)
    assert calls == []
    assert opt._plan.blocking.limit is None  # no cache blocking, even for a model above the (patched) size
    # the time feature from the step counter on the device, in step(): 1/10, 2/10, 3/10
    assert [float(t) for t in seen] == pytest.approx([0.1, 0.2, 0.3])
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in seen)
    opt._time.fill_(6.0)  # (the CPU route reads the host's count, which says 3)
    _train(model, opt, regression_batches(), 1, loss_fn=mse, meta_every=0)
    assert float(seen[-1]) == pytest.approx(0.7) and opt.global_step == 4
    # a long run: the count goes on past 2^24 steps (where a float32 count stopped: 2^24 + 1 == 2^24)
    opt.total_steps = 2**26
    opt._time.fill_(2**24)
    _train(model, opt, regression_batches(), 3, loss_fn=mse, meta_every=0)
    assert int(opt._time) == 2**24 + 3 and float(seen[-1]) > 0.25


@pytest.mark.parametrize("layout", ["named", "decay_groups"])
def test_zero_ranges_match_torch_adamw(accelerator_routes, layout):
    batches = regression_batches()
    ref_model, model = mlp(0), mlp(0)

    def groups(m):
        if layout == "named":
            return m.named_parameters()
        named = list(m.named_parameters())
        return [{"params": [p for _, p in named if p.ndim <= 1], "weight_decay": 0.0, "lr": 3e-3},
                {"params": [p for _, p in named if p.ndim > 1], "weight_decay": 0.1, "betas": (0.8, 0.99)}]

    ref = torch.optim.AdamW(groups(ref_model), lr=1e-2, weight_decay=0.05, foreach=True)
    opt = MetaAdamW(groups(model), lr=1e-2, weight_decay=0.05, alpha_range=0.0, beta_range=0.0, model=model,
                    **small_kwargs())
    for t in range(30):
        _train(ref_model, ref, batches[t % 4:], 1, loss_fn=mse, meta_every=0)
        _train(model, opt, batches[t % 4:], 1, loss_fn=mse, meta_every=0)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


def _pair(kwargs):
    """A model and a MetaAdamW with a random head (non-trivial multipliers), the same each call."""
    torch.manual_seed(3)
    model = TinyTransformer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = MetaAdamW(model.named_parameters(), lr=3e-3, modulator_heads=1, **small_kwargs(**kwargs))
    randomise_head(opt)
    return model, opt


@pytest.mark.parametrize("kwargs", [
    dict(total_steps=40),
    dict(features="enhanced", gating=True, refresh_every=2),
    dict(features="basic_plus", second_moment=True, modulator_layers=2, meta_gradient="exact"),
])
def test_the_accelerator_routes_train_as_the_cpu_routes_do(kwargs, monkeypatch):
    # the same training (steps, a scheduler cycling the betas, meta-updates) on both routes, side
    # by side: the same models, multipliers and modulators up to the last bits that sqrt against
    # 1 / rsqrt and the fused against the eager encoder layer leave. Both models get the very same
    # gradients, so those bits cannot feed back through the model (Adam turns a numerically-zero
    # gradient's rounding noise into a full step)
    cpu_routes = F.takes_cpu_routes
    route = {"accelerator": False}
    monkeypatch.setattr(F, "takes_cpu_routes", lambda device: cpu_routes(device) and not route["accelerator"])
    batches = lm_batches()
    pairs = [_pair(kwargs), _pair(kwargs)]  # (CPU routes, accelerator routes)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=40) for _, opt in pairs]
    (model_a, opt_a), (model_b, opt_b) = pairs
    for t in range(9):
        model_a.zero_grad()
        lm_loss(model_a, batches[t % 3]).backward()
        for a, b in zip(model_a.parameters(), model_b.parameters()):
            b.grad = a.grad.clone()
        for accelerator, (model, opt), sched in zip((False, True), pairs, scheds):
            route["accelerator"] = accelerator
            opt.step()
            sched.step()
            if (t + 1) % 3 == 0:
                assert not opt.meta_step(model, lm_loss, *batches).skipped
        torch.testing.assert_close(opt_b.multipliers.alpha, opt_a.multipliers.alpha, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(opt_b.multipliers.beta, opt_a.multipliers.beta, rtol=1e-4, atol=1e-6)
        for a, b in zip(model_a.parameters(), model_b.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(opt_a.multipliers.alpha, torch.ones(1)), "the multipliers should not be trivial"
    assert not all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters())), \
        "the two routes should differ in the last bits (are both taking the same route?)"
    assert opt_a.meta_updates == opt_b.meta_updates == 3
    for a, b in zip(opt_a.meta_parameters(), opt_b.meta_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("how", ["state_dict", "deepcopy"])
def test_resumed_training_on_the_accelerator_routes_is_bit_identical(accelerator_routes, how):
    # the time feature comes from the optimizer's step counter on the device there: a checkpoint
    # or a copy must bring it back with the step count
    batches = lm_batches()
    model_a, opt_a = _pair(dict(total_steps=30, features="enhanced"))
    init, init_opt = copy.deepcopy(model_a.state_dict()), copy.deepcopy(opt_a.state_dict())
    _train(model_a, opt_a, batches, 7)
    if how == "state_dict":
        ckpt = save_and_load({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
    else:
        copied = copy.deepcopy((model_a, opt_a))
    _train(model_a, opt_a, batches, 8, start=7)

    if how == "state_dict":
        model_b, opt_b = _pair(dict(total_steps=30, features="enhanced"))
        model_b.load_state_dict(init)
        opt_b.load_state_dict(init_opt)
        _train(model_b, opt_b, batches, 2)  # (stepped: its step counter is past 0 before the load)
        model_b.load_state_dict(ckpt["model"])
        opt_b.load_state_dict(ckpt["opt"])
    else:
        model_b, opt_b = copied
    _train(model_b, opt_b, batches, 8, start=7)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt_a.meta_parameters(), opt_b.meta_parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt_a.multipliers.alpha, opt_b.multipliers.alpha)
    assert opt_a.global_step == opt_b.global_step == 15
