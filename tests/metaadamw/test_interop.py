"""MetaAdamW inside the PyTorch machinery training code wraps it in: torch.compile, torch.autocast,
checkpoints loaded with weights_only=True."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

from metaadamw import MetaAdamW
from tests.metaadamw.helpers import mlp, mse, regression_batches, small_kwargs


def _train(opt, model, batches, step):
    for batch in batches:
        opt.zero_grad()
        mse(model, batch).backward()
        step()


def test_a_compiled_step_keeps_the_optimizer_state_it_updates():
    # Dynamo drops assignments to an optimizer's attributes: a compiled step lost global_step, the
    # multipliers and the statistics without an error (refresh_every was ignored, the time feature
    # stayed at step 0, a checkpoint recorded step 0). step() now runs eagerly inside compiled code.
    torch._dynamo.reset()
    batches = regression_batches(n=5)
    runs = {}
    for compiled in (False, True):
        model = mlp()
        opt = MetaAdamW(model.named_parameters(), lr=1e-2, refresh_every=3, **small_kwargs())
        _train(opt, model, batches, torch.compile(opt.step, backend="eager") if compiled else opt.step)
        runs[compiled] = (model, opt)
    (eager_model, eager), (compiled_model, compiled) = runs[False], runs[True]
    assert compiled.global_step == eager.global_step == 5 and compiled.state_dict()["metaadamw"]["global_step"] == 5
    assert compiled.multipliers is not None and torch.equal(compiled.multipliers.alpha, eager.multipliers.alpha)
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)


def test_step_inside_autocast_keeps_full_precision():
    # the modulator and the group means are matrix products, which autocast ran in bfloat16: the
    # multipliers came out in bfloat16 and 1 - lr * weight_decay rounded to 1 (no weight decay)
    batches = regression_batches(n=4)
    models = {name: mlp() for name in ("adamw", "meta")}
    adamw = torch.optim.AdamW(models["adamw"].parameters(), lr=1e-3, weight_decay=0.1)
    meta = MetaAdamW(models["meta"].named_parameters(), lr=1e-3, weight_decay=0.1, alpha_range=0.0, beta_range=0.0,
                     **small_kwargs())
    for name, opt in (("adamw", adamw), ("meta", meta)):
        for batch in batches:
            opt.zero_grad()
            mse(models[name], batch).backward()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                opt.step()
    assert meta.multipliers.alpha.dtype == torch.float32
    for a, b in zip(models["meta"].parameters(), models["adamw"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # a first step with zero gradients is the weight decay alone: 1 - 1e-3 * 0.1, which bfloat16 rounds to 1
    model = mlp()
    meta = MetaAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.1, alpha_range=0.0, beta_range=0.0,
                     **small_kwargs())
    before = model[0].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        meta.step()
    ratio = model[0].weight.detach() / before
    assert float((ratio - (1 - 1e-4)).abs().max()) < 1e-6


def test_meta_step_inside_autocast_runs_the_loss_in_it_and_its_own_maths_in_full_precision():
    seen = []

    def loss_fn(model, batch):  # the caller's loss: in the caller's autocast (here computed in float32 anyway)
        seen.append(torch.is_autocast_enabled("cpu"))
        with torch.autocast("cpu", enabled=False):
            return mse(model, batch)

    b1, b2, val = regression_batches(n=3, seed=5)
    records, alphas = [], []
    for autocast in (False, True):
        torch.manual_seed(0)
        model = mlp()
        opt = MetaAdamW(model.named_parameters(), lr=1e-2, **small_kwargs())
        opt.zero_grad()
        mse(model, b1).backward()
        opt.step()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            records.append(opt.meta_step(model, loss_fn, b1, b2, val))
        opt.step()
        alphas.append(opt.multipliers.alpha)
    assert seen[-1] and not seen[0]
    assert records[1].meta_loss == records[0].meta_loss and records[1].alpha == records[0].alpha
    assert torch.equal(alphas[0], alphas[1])  # the modulator after the meta-update: the same



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_finite_difference_meta_gradient_inside_autocast_sees_the_shifted_parameters(dtype):
    # autocast caches the low-precision cast of each leaf that requires grad until the caller's
    # outermost autocast region ends, and moving theta' to theta' + eps v in place does not
    # invalidate it: the shifted pass recomputed g' exactly, H v was 0 and alpha and beta got no
    # meta-gradient from the gradient-alignment term (exactly 0 here, against 6e-4 exact)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 6, generator=g), torch.randn(64, 1, generator=g)) for _ in range(3)]

    def loss_fn(model, batch):
        x, y = batch
        return ((model(x).float() - y) ** 2).mean()

    def alpha_meta_gradient(meta_gradient):
        model = mlp(0, widths=(6, 64, 64, 1))
        opt = MetaAdamW(model.named_parameters(), meta_gradient=meta_gradient, meta_lr=1.0, objective="gradient",
                        **small_kwargs())
        opt.zero_grad()
        loss_fn(model, batches[0]).backward()
        opt.step()
        before = opt.modulator.head.bias.detach().clone()
        with torch.autocast("cpu", dtype=dtype):
            assert not opt.meta_step(model, loss_fn, *batches).skipped
        return float(before[0] - opt.modulator.head.bias[0])  # (alpha_raw's bias: through alpha alone)

    exact, approx = alpha_meta_gradient("exact"), alpha_meta_gradient("finite_difference")
    assert abs(exact) > 1e-4
    assert abs(approx - exact) < 0.15 * abs(exact)


@pytest.mark.parametrize("priorities, fixed", [(np.array([1.0, 2.0, 0.5]), None),
                                               ([np.float64(1.0), np.float64(2.0), np.float64(0.5)], None),
                                               ((1.0, 1.0, 1.0), np.array([1.0, 0.5, 0.25]))])
def test_numpy_priorities_and_weights_make_a_checkpoint_torch_load_reads_by_default(priorities, fixed):
    # torch.load(weights_only=True), the default since torch 2.6, refused numpy scalars in the config
    model = mlp()
    weighting = "fixed" if fixed is not None else "huw_priority"
    opt = MetaAdamW(model.named_parameters(), weighting=weighting, priorities=priorities, fixed_weights=fixed,
                    **small_kwargs())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    config = state["metaadamw"]["config"]
    assert all(type(x) is float for x in config["priorities"] + (config["fixed_weights"] or []))
    assert config["priorities"] == [float(x) for x in priorities]
    MetaAdamW(mlp().named_parameters(), weighting=weighting, priorities=priorities, fixed_weights=fixed,
              **small_kwargs()).load_state_dict(state)


def test_exact_meta_gradient_on_a_compiled_model_says_to_use_finite_differences():
    # exact after a finite-difference meta-update of another compiled instance: the error then comes
    # from g' (torch.compile's donated buffers), where it surfaced as PyTorch's own advice
    b1, b2, val = regression_batches(n=3)
    torch._dynamo.reset()
    for mode in ("finite_difference", "exact"):
        model = mlp()
        compiled = torch.compile(model, backend="aot_eager")
        opt = MetaAdamW(model.named_parameters(), lr=1e-2, meta_gradient=mode, **small_kwargs())
        opt.zero_grad()
        mse(compiled, b1).backward()
        opt.step()
        if mode == "finite_difference":
            assert not opt.meta_step(compiled, mse, b1, b2, val).skipped
        else:
            with pytest.raises(RuntimeError, match="meta_gradient='finite_difference' \\(the default\\)"):
                opt.meta_step(compiled, mse, b1, b2, val)


def test_exact_meta_gradient_with_ctc_loss_says_to_use_finite_differences():
    # F.ctc_loss's backward has no derivative: torch says "derivative for aten::_ctc_loss_backward is
    # not implemented", which names neither the meta-update nor what works (the default does)
    from torch import nn

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 12, 4, generator=g), torch.randint(1, 6, (3, 4), generator=g)) for _ in range(3)]

    class Speech(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 6)

        def forward(self, x):
            return self.out(self.rnn(x)[0]).log_softmax(-1)

    def ctc(model, batch):
        return nn.functional.ctc_loss(model(batch[0]).transpose(0, 1), batch[1], torch.full((3,), 12),
                                      torch.full((3,), 4))

    torch.manual_seed(0)
    for mode in ("exact", "finite_difference"):
        model = Speech()
        opt = MetaAdamW(model.named_parameters(), meta_gradient=mode, **small_kwargs())
        if mode == "exact":
            with pytest.raises(RuntimeError, match="meta_gradient='finite_difference' \\(the default\\)") as err:
                opt.meta_step(model, ctc, *batches)
            assert "_ctc_loss_backward" in str(err.value)
        else:
            assert not opt.meta_step(model, ctc, *batches).skipped


@pytest.mark.parametrize("blocking", [False, True])
def test_a_channels_last_model_trains_as_with_adamw_and_keeps_its_memory_format(blocking, monkeypatch):
    # model.to(memory_format=torch.channels_last): 4-d weights strided NHWC, not contiguous. Their
    # moments take the same format, cache blocking leaves them whole (flat views would mix up the
    # elements of parameter and moments otherwise), and a meta-update changes nothing
    from torch import nn

    from metaadamw import functional as F

    if blocking:
        monkeypatch.setattr(F, "CPU_CHUNK_NUMEL", 40)
        monkeypatch.setattr(F, "CPU_BLOCKING_MIN_NUMEL", 0)

    def convnet():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).to(memory_format=torch.channels_last)

    def loss(model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    ref_model, model = convnet(), convnet()
    assert not model[0].weight.is_contiguous() and model[0].weight.is_contiguous(memory_format=torch.channels_last)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.05)
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.05, alpha_range=0.0, beta_range=0.0,
                    model=model, **small_kwargs())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 6, 6, generator=g).to(memory_format=torch.channels_last),
                torch.randint(0, 4, (4,), generator=g)) for _ in range(3)]
    for t in range(12):
        ref.zero_grad()
        loss(ref_model, batches[t % 3]).backward()
        for a, b in zip(ref_model.parameters(), model.parameters()):  # the same gradients: no chaotic feedback
            b.grad = a.grad.clone(memory_format=torch.preserve_format)
        ref.step()
        opt.step()
        if t % 4 == 3:
            assert not opt.meta_step(model, loss, *batches).skipped
        for a, b in zip(ref_model.parameters(), model.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    weight = model[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert all(opt.state[weight][k].is_contiguous(memory_format=torch.channels_last) for k in ("exp_avg", "exp_avg_sq"))
    torch.testing.assert_close(opt.state[weight]["exp_avg_sq"], ref.state[ref_model[0].weight]["exp_avg_sq"])


def _adamw_twins(**kw):
    """A torch.optim.AdamW and a MetaAdamW without modulation (AdamW up to float rounding) on twin models."""
    ref_model, model = mlp(), mlp()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.05)
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.05, alpha_range=0.0, beta_range=0.0,
                    **small_kwargs(**kw))
    return ref_model, ref, model, opt


def test_the_live_state_holds_adamws_step_counts_as_code_written_for_adamw_reads_them():
    # opt.state[p]["step"] raised KeyError: MetaAdamW kept the counts to itself, so EMA warm-ups, LR
    # finders and logging that read AdamW's count failed. Now AdamW's own: a 0-dim float32 CPU tensor,
    # counted only for tensors with a gradient, restarted with the state, kept by copies and loads
    batches = regression_batches(n=6)
    ref_model, ref, model, opt = _adamw_twins()
    for t in range(6):
        for m, o in ((ref_model, ref), (model, opt)):
            o.zero_grad()
            mse(m, batches[t]).backward()
            if t in (2, 3):  # the last layer's bias gets no gradient twice
                m[-1].bias.grad = None
            if t == 4:  # a reset of the first layer's state, as a pruning step does
                o.state.pop(m[0].weight)
            o.step()
    for a, b in zip(ref_model.parameters(), model.parameters()):
        st = opt.state[b]["step"]
        assert st.dtype == torch.float32 and st.device.type == "cpu" and st.dim() == 0
        assert torch.equal(st, ref.state[a]["step"])
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    counts = [float(opt.state[p]["step"]) for p in model.parameters()]
    assert counts == [2.0, 6.0, 6.0, 6.0, 6.0, 4.0]
    assert [opt.state_dict()["state"][i]["step"] for i in range(6)] == counts
    # a copy and a reloaded checkpoint count on from theirs, independently of the original
    copied = copy.deepcopy(opt)
    loaded = MetaAdamW(mlp().named_parameters(), lr=1e-2, weight_decay=0.05, alpha_range=0.0, beta_range=0.0,
                       **small_kwargs())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    for o in (copied, loaded):
        assert [float(o.state[p]["step"]) for p in o._params] == counts
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert [float(opt.state[p]["step"]) for p in model.parameters()] == [c + 1 for c in counts]
    assert [float(copied.state[p]["step"]) for p in copied._params] == counts
    # a step count replaced by the caller is put back: the count is the optimizer's (as state_dict() saves it)
    opt.state[model[0].weight]["step"] = torch.tensor(100.0)
    opt.step()
    assert float(opt.state[model[0].weight]["step"]) == counts[0] + 2 == opt.state_dict()["state"][0]["step"]


def test_a_step_count_changed_in_place_is_put_back_as_a_replaced_one_is():
    # state[p]["step"].zero_() (as code written for AdamW resets a count) went unnoticed: the view counted on from
    # the edited value (1.0 after the next step) while the step's bias correction and the checkpoint used 4
    batches = regression_batches(n=5)
    model = mlp()
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, **small_kwargs())
    for t in range(3):
        opt.zero_grad()
        mse(model, batches[t]).backward()
        opt.step()
    weight, bias = model[0].weight, model[-1].bias
    opt.state[weight]["step"].zero_()
    opt.state[bias]["step"] += 5
    for t in (3, 4):
        opt.zero_grad()
        mse(model, batches[t]).backward()
        opt.step()
        assert [float(opt.state[p]["step"]) for p in model.parameters()] == [t + 1.0] * 6
    assert opt._steps == [5] * 6 and [opt.state_dict()["state"][i]["step"] for i in range(6)] == [5] * 6


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.8 ** e),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=2e-2, total_steps=30, cycle_momentum=True),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1, factor=0.5),
    lambda o: torch.optim.lr_scheduler.SequentialLR(o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3),
                                                        torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], milestones=[3]),
    lambda o: torch.optim.lr_scheduler.ChainedScheduler([torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3),
                                                         torch.optim.lr_scheduler.ExponentialLR(o, 0.9)]),
], ids=["LambdaLR", "OneCycleLR", "CosineAnnealingWarmRestarts", "ReduceLROnPlateau", "SequentialLR",
        "ChainedScheduler"])
def test_lr_schedulers_step_metaadamw_as_adamw_also_across_a_resume(make):
    # the scheduler of the resumed run is made before the loads, as torch's recipe has it
    batches = regression_batches(n=5)
    ref_model, ref, model, opt = _adamw_twins()
    plateau = "ReduceLROnPlateau" in repr(make(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)))

    def train(m, o, sched, steps):
        for t in steps:
            o.zero_grad()
            mse(m, batches[t % 5]).backward()
            o.step()
            sched.step(float(t < 2)) if plateau else sched.step()

    runs = [(ref_model, ref, make(ref)), (model, opt, make(opt))]
    for m, o, sched in runs:
        train(m, o, sched, range(5))
    resumed = copy.deepcopy(model)
    again = MetaAdamW(resumed.named_parameters(), lr=1.0, weight_decay=0.05, alpha_range=0.0, beta_range=0.0,
                      **small_kwargs())
    again_sched = make(again)
    again.load_state_dict(opt.state_dict())
    again_sched.load_state_dict(runs[1][2].state_dict())
    for m, o, sched in [*runs, (resumed, again, again_sched)]:
        train(m, o, sched, range(5, 12))
    for a, b, c in zip(ref_model.parameters(), model.parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert torch.equal(c, b)
    for o in (opt, again):
        assert o.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        assert tuple(o.param_groups[0]["betas"]) == tuple(ref.param_groups[0]["betas"])


@pytest.mark.parametrize("unscale", [False, True])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_grad_scaler_skips_the_steps_with_non_finite_gradients_as_for_adamw(bad, unscale):
    # scaler.step(opt) skips the step when unscaling found an inf or NaN: the parameters, moments and
    # step counts stay, the scale backs off, and training goes on exactly as AdamW's
    batches = regression_batches(n=5)
    ref_model, ref, model, opt = _adamw_twins()
    scales = []
    for m, o in ((ref_model, ref), (model, opt)):
        scaler = torch.amp.GradScaler(device="cpu", init_scale=2.0 ** 10)
        for t in range(5):
            o.zero_grad()
            scaler.scale(mse(m, batches[t])).backward()
            if t in (1, 2):
                m[0].weight.grad[0, 0] = bad
            if unscale:
                scaler.unscale_(o)
            scaler.step(o)
            scaler.update()
        scales.append(scaler.get_scale())
    assert scales[0] == scales[1] == 2.0 ** 8
    assert opt.global_step == 3 and float(opt.state[model[0].weight]["step"]) == 3.0
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[b]["exp_avg_sq"], ref.state[a]["exp_avg_sq"], rtol=1e-5, atol=1e-12)


def test_step_hooks_and_a_closure_under_no_grad_behave_as_for_adamw():
    # the step hooks see the optimizer and step()'s arguments, and a closure runs with gradients enabled even when step() is called under no_grad
    batches = regression_batches(n=3)
    ref_model, ref, model, opt = _adamw_twins()
    logs = []
    for m, o in ((ref_model, ref), (model, opt)):
        log = []
        o.register_step_pre_hook(lambda o_, args, kwargs: (log.append(("pre", o_ is o, len(args))), None)[1])
        o.register_step_post_hook(lambda o_, args, kwargs: log.append(("post", o_ is o, len(args))))
        losses = []
        for t in range(3):
            def closure(m=m, o=o, t=t):
                o.zero_grad()
                loss = mse(m, batches[t])
                loss.backward()
                return loss
            with torch.no_grad():
                losses.append(float(o.step(closure)))
        logs.append((log, losses))
    assert logs[0][0] == logs[1][0] == [("pre", True, 2), ("post", True, 2)] * 3  # (args: the optimizer, the closure)
    np.testing.assert_allclose(logs[1][1], logs[0][1], rtol=1e-5)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
