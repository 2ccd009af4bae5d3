"""MetaAdamW's step(): AdamW equivalence, fast vs reference path, validation, no host syncs."""

from __future__ import annotations

import copy
import math
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from metaadamw import MetaAdamW
from metaadamw import functional as F
from tests.metaadamw.helpers import (TinyTransformer, lm_batches, lm_loss, mlp, mse, randomise_head,
                                     regression_batches, small_kwargs)


def _layouts(model):
    """Several param-group layouts of the same model (as named params, plain, decay/no-decay)."""
    named = list(model.named_parameters())
    decay = [(n, p) for n, p in named if p.ndim > 1]
    no_decay = [(n, p) for n, p in named if p.ndim <= 1]
    return {
        "named": lambda: model.named_parameters(),
        "plain": lambda: model.parameters(),
        "decay_groups": lambda: [
            {"params": [p for _, p in no_decay], "weight_decay": 0.0, "lr": 3e-3},  # not in model order
            {"params": [p for _, p in decay], "weight_decay": 0.1, "betas": (0.8, 0.99)},
        ],
    }


def _train(model, opt, batches, steps, loss_fn=mse):
    for t in range(steps):
        opt.zero_grad()
        loss_fn(model, batches[t % len(batches)]).backward()
        opt.step()


@pytest.mark.parametrize("layout", ["named", "plain", "decay_groups"])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("chunk", [None, 40])
def test_zero_ranges_match_torch_adamw_over_50_steps(layout, foreach, chunk, monkeypatch):
    # chunk: cache blocking cut into runs of <= 40 elements (every tensor of this MLP is >= 16)
    if chunk:
        monkeypatch.setattr(F, "CPU_CHUNK_NUMEL", chunk)
        monkeypatch.setattr(F, "CPU_BLOCKING_MIN_NUMEL", 0)
    batches = regression_batches()
    ref_model, model = mlp(0), mlp(0)
    ref = torch.optim.AdamW(_layouts(ref_model)[layout](), lr=1e-2, weight_decay=0.05, foreach=True)
    kw = small_kwargs(grouping="original") if layout == "plain" else small_kwargs()
    opt = MetaAdamW(_layouts(model)[layout](), lr=1e-2, weight_decay=0.05, alpha_range=0.0, beta_range=0.0,
                    foreach=foreach, model=model, **kw)
    for t in range(50):
        _train(ref_model, ref, batches[t % 4:], 1)
        _train(model, opt, batches[t % 4:], 1)
        for a, b in zip(ref_model.parameters(), model.parameters()):
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


def test_fresh_modulator_is_exactly_adamw_weight_decay_not_bias_corrected():
    # with a zero head alpha = beta = 1 even with the default ranges; the decoupled
    # weight decay must not be scaled by 1 / (1 - beta1^t) (a bug of the paper's code)
    batches = regression_batches()
    ref_model, model = mlp(0), mlp(0)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.5)
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.5, modulator_init="zero", **small_kwargs())
    _train(ref_model, ref, batches, 3)
    _train(model, opt, batches, 3)
    assert torch.equal(opt.multipliers.alpha, torch.ones_like(opt.multipliers.alpha))
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def _same_gradients(models, batch, loss_fn):
    models[0].zero_grad()
    loss_fn(models[0], batch).backward()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        b.grad = a.grad.clone()


@pytest.mark.parametrize("features, chunk", [("basic", None), ("basic_plus", None), ("enhanced", None),
                                            ("norm_basic", None), ("basic", 100), ("enhanced", 1)])
def test_fast_path_agrees_with_single_tensor_reference_step_by_step(features, chunk, monkeypatch):
    # chunk: the fast path's cache blocking cut into small runs (several per bucket, or one tensor each)
    monkeypatch.setattr(F, "CPU_CHUNK_NUMEL", chunk)
    monkeypatch.setattr(F, "CPU_BLOCKING_MIN_NUMEL", 0)
    batches = lm_batches()
    models = [TinyTransformer(), TinyTransformer()]
    models[1].load_state_dict(models[0].state_dict())
    opts = []
    for model, foreach in zip(models, (True, False)):
        torch.manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = MetaAdamW(model.named_parameters(), lr=3e-3, foreach=foreach, features=features,
                            modulator_heads=1, **small_kwargs())
        randomise_head(opt)
        opts.append(opt)
    opts[1].modulator.load_state_dict(opts[0].modulator.state_dict())
    for t in range(8):
        # both paths get the very same gradients, so rounding differences cannot feed back through
        # the model (Adam turns a numerically-zero gradient's rounding noise into a full step)
        _same_gradients(models, batches[t % 3], lm_loss)
        for opt in opts:
            opt.step()
        for k in opts[0]._stats:
            torch.testing.assert_close(opts[0]._stats[k], opts[1]._stats[k], rtol=5e-5, atol=1e-6, msg=k)
        # the encoder amplifies the statistics' last-digit differences (group stds of near-equal values)
        torch.testing.assert_close(opts[0].multipliers.alpha, opts[1].multipliers.alpha, rtol=2e-4, atol=1e-5)
        assert not torch.allclose(opts[0].multipliers.alpha, torch.ones(1)), "multipliers should not be trivial"
        for a, b in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_multipliers_scale_the_update_per_group():
    # alpha = 1 + range * (sigmoid(raw) - 0.5): check the update against the formula by hand
    model = mlp(0, widths=(3, 2))
    opt = MetaAdamW(model.named_parameters(), lr=0.1, weight_decay=0.3, alpha_range=1.0, beta_range=1.0,
                    modulator_init="zero", **small_kwargs())
    with torch.no_grad():
        opt.modulator.head.bias.copy_(torch.tensor([2.0, -1.0, 0.0, 0.0]))
    before = [p.detach().clone() for p in model.parameters()]
    mse(model, regression_batches(1, dim=3)[0]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    alpha = 1 + (torch.sigmoid(torch.tensor(2.0)) - 0.5)
    beta = 1 + (torch.sigmoid(torch.tensor(-1.0)) - 0.5)
    for p0, g, p in zip(before, grads, model.parameters()):
        m_hat, v_hat = g, g * g  # bias-corrected first step
        expected = p0 - 0.1 * alpha * (m_hat / (v_hat.sqrt() + 1e-8) + beta * 0.3 * p0)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


class _NoHostReads(TorchDispatchMode):
    """Fails on any op that reads a tensor value back to the host."""

    FORBIDDEN = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "unique"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.FORBIDDEN:
            raise AssertionError(f"step() read a value back to the host through aten.{name}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_host_reads(monkeypatch):
    def forbid(name):
        def fail(self, *a, **k):
            raise AssertionError(f"step() called Tensor.{name}()")
        return fail

    # (.cpu(): a copy to the host, which blocks on a GPU and is a no-op on the CPU, so no op shows it
    # here; .to("cpu") is left to the CUDA test, as .to(device) is legitimate)
    for name in ("tolist", "item", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    with _NoHostReads():
        yield


def test_the_sync_detector_catches_reads(no_host_reads):
    t = torch.ones(2)
    for read in (lambda: t.sum().item(), lambda: t.tolist(), lambda: float(t[0]), lambda: bool(t[0] > 0),
                 lambda: t.nonzero(), lambda: t.cpu()):
        with pytest.raises(AssertionError):
            read()


@pytest.mark.parametrize("features", ["basic", "basic_plus", "enhanced", "norm_basic_plus"])
@pytest.mark.parametrize("refresh_every", [1, 3])
def test_step_never_reads_values_back_to_the_host(features, refresh_every, request):
    model = TinyTransformer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = MetaAdamW(model.named_parameters(), features=features, refresh_every=refresh_every, gating=True,
                        modulator_heads=1, **small_kwargs())
    batches = lm_batches()
    grads = []
    for b in batches:
        model.zero_grad()
        lm_loss(model, b).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    request.getfixturevalue("no_host_reads")
    for t in range(6):  # includes the first step (plan and state creation) and refresh / reuse steps
        for p, g in zip(model.parameters(), grads[t % 3]):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("features", ["basic", "basic_plus", "enhanced", "norm_basic_plus"])
def test_step_makes_no_tensor_from_host_values_on_the_parameters_device(features, monkeypatch):
    # on CUDA, torch.tensor(values, device=cuda) is a blocking copy (a host synchronisation): step(),
    # its first call included (which builds the layout and its constants), only makes host values
    # into tensors on the CPU (device="cpu") and moves them with non-blocking copies
    model = TinyTransformer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = MetaAdamW(model.named_parameters(), features=features, gating=True, modulator_heads=1,
                        **small_kwargs())
    lm_loss(model, lm_batches()[0]).backward()
    made = []
    real = torch.tensor

    def tensor(*args, **kwargs):
        made.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    for _ in range(4):
        opt.step()
    assert made and all(d == "cpu" for d in made), f"step() made tensors from host values on {made}"


def test_refresh_every_reuses_multipliers_between_refreshes():
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), refresh_every=3, **small_kwargs())
    randomise_head(opt)
    seen = []
    for t in range(6):
        _train(model, opt, regression_batches()[t % 4:], 1)
        seen.append(opt.multipliers.alpha.clone())
    assert seen[0] is not seen[1] and torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    assert not torch.equal(seen[2], seen[3]) and torch.equal(seen[3], seen[5])


def test_reused_carry_matches_direct_statistics_after_skipped_refreshes():
    # with refresh_every > 1 the carried ||m||^2 is recomputed directly: stats must match the reference
    batches = lm_batches()
    models = [TinyTransformer(), TinyTransformer()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [MetaAdamW(m.named_parameters(), refresh_every=2, foreach=f, **small_kwargs())
            for m, f in zip(models, (True, False))]
    opts[1].modulator.load_state_dict(opts[0].modulator.state_dict())
    for t in range(7):
        _same_gradients(models, batches[t % 3], lm_loss)
        for opt in opts:
            opt.step()
        if t % 2 == 0:
            for k in opts[0]._stats:
                torch.testing.assert_close(opts[0]._stats[k], opts[1]._stats[k], rtol=2e-4, atol=1e-5)


def test_parameters_without_gradients_are_left_alone():
    model = mlp(0)
    frozen_before = model[0].weight.detach().clone()
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    for b in regression_batches():
        opt.zero_grad()
        mse(model, b).backward()
        model[0].weight.grad = None
        opt.step()
    assert torch.equal(model[0].weight.detach(), frozen_before)
    assert "exp_avg" not in opt.state[model[0].weight] or opt._steps[0] == 0


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(betas=(0.9, 1.0)), "index 1: 1.0"),
        (dict(eps=-1e-8), "eps=-1e-08"),
        (dict(weight_decay=-0.1), "-0.1"),
        (dict(alpha_range=3.0), "alpha_range must be a number in [0, 2] so that alpha stays positive, got 3.0"),
        (dict(beta_range=-1.0), "beta_range"),
        (dict(modulator_layers=0), "modulator_layers must be an integer >= 1, got 0"),
        (dict(modulator_heads=2.5), "modulator_heads must be an integer >= 1, got 2.5"),
        (dict(modulator_width=7, modulator_heads=2), "modulator_width=7 must be a multiple of modulator_heads=2"),
        (dict(refresh_every=0), "refresh_every"),
        (dict(meta_lr=0.0), "meta_lr must be a number in (0, inf), got 0.0"),
        (dict(priorities=[1, 2]), "priorities must be three"),
        (dict(priorities=[1, -2, 3]), "[1, -2, 3]"),
        (dict(weighting_form="ranking"), "'ranking'"),
        (dict(meta_optimizer="lbfgs"), "'lbfgs'"),
        (dict(features="basicc"), "unknown feature extractor 'basicc'. Registered: basic, basic_plus"),
        (dict(grouping="coarse"), "Registered: fine_grained, original"),
        (dict(objective="accuracy"), "unknown meta objective 'accuracy'"),
        (dict(weighting="gradnorm"), "unknown loss weighting 'gradnorm'"),
        (dict(meta_lr="1e-3"), "meta_lr must be a number in (0, inf), got '1e-3'"),
        (dict(meta_lr=math.inf), "meta_lr must be a number in (0, inf), got inf"),
        (dict(alpha_range=math.nan), "alpha_range must be a number in [0, 2] so that alpha stays positive, got nan"),
        (dict(modulator_dropout=None), "modulator_dropout must be a number in [0, 1), got None"),
        (dict(modulator_dropout=1.0), "modulator_dropout must be a number in [0, 1), got 1.0"),
        (dict(gate_l1=math.nan), "gate_l1 must be a number in [0, inf), got nan"),
        (dict(meta_weight_decay=-1), "meta_weight_decay must be a number in [0, inf), got -1"),
        (dict(priorities="111"), "priorities must be three finite non-negative numbers"),
        (dict(weighting="fixed", fixed_weights=[1, math.inf, 1]), "fixed_weights must be three finite"),
        (dict(gating="false"), "gating must be True or False, got 'false'"),
        (dict(time_step=None), "time_step must be True or False, got None"),
        (dict(second_moment=1), "second_moment must be True or False, got 1"),
        (dict(sync_meta="no"), "sync_meta must be True or False, got 'no'"),
        (dict(foreach="false"), "foreach must be None, True or False, got 'false'"),
        (dict(model="net"), "model must be the torch.nn.Module whose parameters these are"),
        (dict(meta_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr)), "could not be called as f(params, lr"),
        (dict(meta_optimizer=lambda params, lr, weight_decay: None), "returned a NoneType, not a torch.optim.Optimizer"),
    ],
)
def test_every_argument_is_validated_with_a_message_naming_the_bad_value(kwargs, fragment):
    model = mlp(0)
    with pytest.raises((ValueError, KeyError)) as err:
        MetaAdamW(model.named_parameters(), **kwargs)
    assert fragment in str(err.value)


def test_numpy_scalars_are_accepted_as_adamw_accepts_them_and_stored_as_floats():
    np = pytest.importorskip("numpy")
    model = mlp(0)
    params = list(model.named_parameters())
    opt = MetaAdamW([{"params": params[:2], "lr": np.float32(2e-3), "betas": (np.float64(0.8), np.float32(0.99))},
                     {"params": params[2:]}], lr=np.float32(1e-3), eps=np.float64(1e-8), weight_decay=np.int64(0),
                    **small_kwargs())
    first, second = opt.param_groups
    assert first["lr"] == float(np.float32(2e-3)) and type(first["lr"]) is float
    assert first["betas"] == (0.8, float(np.float32(0.99))) and all(type(b) is float for b in first["betas"])
    assert second["lr"] == float(np.float32(1e-3)) and second["betas"] == (0.9, 0.999)
    assert type(second["weight_decay"]) is float and type(second["eps"]) is float


def test_zero_dim_numpy_arrays_are_accepted_as_adamw_accepts_them_and_stored_as_floats():
    # torch.optim.AdamW takes lr=np.array(1e-3); it was refused with "Invalid learning rate: lr=array(0.001)
    # (must be a finite number >= 0)", which it is
    np = pytest.importorskip("numpy")
    torch.optim.AdamW(mlp(0).parameters(), lr=np.array(1e-3), weight_decay=np.array(0.1))
    opt = MetaAdamW(mlp(0).named_parameters(), lr=np.array(1e-3), eps=np.array(1e-8), weight_decay=np.array(0.1),
                    betas=(np.array(0.8), 0.99), alpha_range=np.array(0.5), meta_lr=np.array(1e-3), **small_kwargs())
    group = opt.param_groups[0]
    assert (group["lr"], group["eps"], group["weight_decay"], group["betas"]) == (1e-3, 1e-8, 0.1, (0.8, 0.99))
    assert all(type(v) is float for v in (group["lr"], group["eps"], group["weight_decay"], *group["betas"]))
    assert opt.config["alpha_range"] == 0.5 and type(opt.config["alpha_range"]) is float
    for bad in (np.array(-1e-3), np.array([1e-3]), np.array(True)):
        with pytest.raises(ValueError, match="Invalid learning rate"):
            MetaAdamW(mlp(0).named_parameters(), lr=bad)


def test_numpy_integers_are_accepted_for_integer_options_and_stored_as_ints():
    # they were refused with "must be an integer >= 1, got np.int64(100)", which contradicts itself
    np = pytest.importorskip("numpy")
    opt = MetaAdamW(mlp(0).named_parameters(), modulator_layers=np.int64(1), modulator_heads=np.int32(2),
                    modulator_ff=np.int64(8), modulator_width=np.int64(6), refresh_every=np.int64(2),
                    total_steps=np.int64(100))
    for key, want in [("modulator_layers", 1), ("modulator_heads", 2), ("modulator_ff", 8), ("modulator_width", 6),
                      ("refresh_every", 2), ("total_steps", 100)]:
        assert opt.config[key] == want and type(opt.config[key]) is int, key
    opt.total_steps, opt.refresh_every = np.int64(50), np.uint8(3)
    assert (opt.total_steps, opt.refresh_every) == (50, 3) and type(opt.total_steps) is type(opt.refresh_every) is int
    with pytest.raises(ValueError, match=r"refresh_every must be an integer >= 1, got np.int64\(0\)"):
        opt.refresh_every = np.int64(0)
    with pytest.raises(ValueError, match="must be an integer >= 1, got np.True_"):
        MetaAdamW(mlp(0).named_parameters(), refresh_every=np.bool_(True))


@pytest.mark.parametrize("group, fragment", [
    ({"lr": -1.0}, "param group 1: Invalid learning rate: lr=-1.0"),
    ({"lr": "0.1"}, "param group 1: Invalid learning rate: lr='0.1'"),
    ({"betas": (0.9,)}, "param group 1: betas must be a pair"),
    ({"eps": -1.0}, "param group 1: Invalid epsilon value"),
    ({"weight_decay": None}, "param group 1: Invalid weight_decay value: None"),
    ({"lr": torch.tensor(0.01)}, "param group 1: lr as a Tensor is not supported"),
    ({"lr": math.inf}, "param group 1: Invalid learning rate: lr=inf (must be a finite number >= 0)"),
    ({"eps": math.inf}, "param group 1: Invalid epsilon value: eps=inf (must be finite and >= 0)"),
    ({"weight_decay": math.inf}, "param group 1: Invalid weight_decay value: inf (must be finite and >= 0)"),
])
def test_param_group_hyperparameters_are_validated_naming_the_group(group, fragment):
    model = mlp(0)
    params = list(model.named_parameters())
    mine = {"params": params[2:], **group}
    before = dict(mine)
    with pytest.raises(ValueError) as err:
        MetaAdamW([{"params": params[:2]}, mine], **small_kwargs())
    assert fragment in str(err.value)
    assert mine.keys() == before.keys()  # the caller's dict is not filled in


def test_tensor_betas_are_refused_with_the_floats_to_use_and_a_numpy_pair_is_accepted():
    np = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match=r"betas as Tensors are not supported .* betas=\(0\.9, 0\.999\)"):
        MetaAdamW(mlp(0).named_parameters(), betas=(torch.tensor(0.9), torch.tensor(0.999)))
    opt = MetaAdamW(mlp(0).named_parameters(), betas=np.array([0.8, 0.99]), **small_kwargs())
    assert opt.param_groups[0]["betas"] == (0.8, 0.99) and all(type(b) is float for b in opt.param_groups[0]["betas"])


def test_no_parameters_and_a_model_holding_none_of_them_are_named_as_such():
    with pytest.raises(ValueError, match="got no parameters"):
        MetaAdamW([{"params": []}], grouping="original")
    model = mlp(0)
    with pytest.raises(ValueError, match="holds none of the optimizer's parameters"):
        MetaAdamW(model.parameters(), model=copy.deepcopy(model))


@pytest.mark.parametrize("lr, said", [(torch.tensor(0.01, dtype=torch.float64), "0.01"),
                                       (torch.tensor(1e-3), "0.001"),  # (not float32's 0.0010000000474974513)
                                       (torch.tensor(1234567.0), "1234567.0"),
                                       (torch.tensor(0.00123456789, dtype=torch.float64), "0.00123456789"),
                                       (torch.tensor(3e-4, dtype=torch.bfloat16), "0.0003"),
                                       (torch.tensor(1e-3, dtype=torch.float16), "0.001"),
                                       (torch.tensor(12345678.0), "12345678.0")])
def test_a_tensor_learning_rate_is_refused_with_the_float_to_use(lr, said):
    with pytest.raises(ValueError, match=r"lr as a Tensor is not supported .*: pass a float, e\.g\. lr=(.*)") as error:
        MetaAdamW(mlp(0).named_parameters(), lr=lr)
    assert str(error.value).endswith(f"e.g. lr={said}")


def test_a_tensor_eps_or_weight_decay_is_taken_as_adamw_takes_it():
    # torch.optim.AdamW takes one-element tensors for eps and weight_decay on every path; MetaAdamW
    # refused them as "Invalid ... (must be finite and >= 0)", values that are both
    batches = regression_batches()
    model, twin = mlp(0), mlp(0)
    hyper = dict(lr=1e-2, eps=torch.tensor(1e-6), weight_decay=torch.tensor(0.1))
    adamw = torch.optim.AdamW(model.parameters(), **hyper)
    meta = MetaAdamW(twin.named_parameters(), alpha_range=0.0, beta_range=0.0, **hyper, **small_kwargs())
    assert meta.param_groups[0]["eps"] == pytest.approx(1e-6) and isinstance(meta.param_groups[0]["weight_decay"], float)
    for t in range(5):
        for net, opt in ((model, adamw), (twin, meta)):
            opt.zero_grad()
            mse(net, batches[t % len(batches)]).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    extra = nn.Linear(2, 2)
    meta.add_param_group({"params": list(extra.named_parameters()), "eps": torch.tensor(1e-5),
                          "weight_decay": torch.tensor([0.2])})
    assert meta.param_groups[1]["eps"] == pytest.approx(1e-5) and meta.param_groups[1]["weight_decay"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="Invalid weight_decay value: -0.5"):
        MetaAdamW(mlp(0).named_parameters(), weight_decay=torch.tensor(-0.5))


def test_fine_grained_grouping_without_names_says_how_to_fix():
    model = mlp(0)
    with pytest.raises(ValueError, match="named_parameters"):
        MetaAdamW(model.parameters())
    opt = MetaAdamW(model.parameters(), model=model, **small_kwargs())  # names from model=
    assert opt.group_names[0].startswith("feed_forward/")


def test_fine_grained_names_relative_to_submodules_take_the_models_full_names_or_warn():
    # model[0].named_parameters() names its tensors 'weight' and 'bias': no layer index, no depth
    model = mlp(0, widths=(6, 16, 16, 16, 1))
    groups = [{"params": list(model[i].named_parameters())} for i in (0, 2, 4, 6)]
    with pytest.warns(UserWarning, match=r"parameter names repeat \('weight' x4, 'bias' x4\).* model=your_model"):
        relative = MetaAdamW(groups, **small_kwargs())
    assert relative.group_names == ["other/shallow/weight", "other/shallow/bias"]  # every layer in one bucket
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = MetaAdamW(groups, model=model, **small_kwargs())
    assert [t.name for t in full.tensor_info] == [n for n, _ in model.named_parameters()]
    assert full.group_names == ["feed_forward/shallow/weight", "feed_forward/shallow/bias",
                                "feed_forward/middle/weight", "feed_forward/middle/bias",
                                "feed_forward/deep/weight", "feed_forward/deep/bias"]


def test_fine_grained_depths_with_a_model_do_not_depend_on_the_param_groups():
    model = TinyTransformer(layers=3)
    named = list(model.named_parameters())
    whole = MetaAdamW(model.named_parameters(), model=model, **small_kwargs())
    expected = {n: whole.group_names[g] for (n, _), g in zip(named, whole._group_of)}
    assert expected["embedding.weight"] == "embedding/shallow/weight" and expected["norm.weight"] == "norm/deep/weight"
    no_decay = [p for _, p in named if p.ndim < 2]  # the final norm before the first layer
    decay = [p for _, p in named if p.ndim >= 2][::-1]  # the embedding last
    split = MetaAdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay}], model=model, **small_kwargs())
    got = {info.name: split.group_names[g] for info, g in zip(split.tensor_info, split._group_of)}
    assert got == expected
    top = MetaAdamW([p for n, p in named if n.startswith(("encoder.layers.2", "norm", "head"))], model=model,
                    **small_kwargs())  # the top of the model alone: deep, as in the whole model
    assert {info.name: top.group_names[g] for info, g in zip(top.tensor_info, top._group_of)} == {
        n: v for n, v in expected.items() if n.startswith(("encoder.layers.2", "norm", "head"))}
    # without the model, depths are relative to the optimizer's tensors, in its order
    relative = MetaAdamW([{"params": [(n, p) for n, p in named if p.ndim < 2]},
                          {"params": [(n, p) for n, p in named if p.ndim >= 2][::-1]}], **small_kwargs())
    assert "embedding/deep/weight" in relative.group_names


def test_fine_grained_groups_of_a_transformer():
    model = TinyTransformer()
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    names = set(opt.group_names)
    assert {"embedding/shallow/weight", "attention/shallow/weight", "attention/deep/bias",
            "feed_forward/deep/weight", "norm/deep/weight", "other/deep/weight"} <= names
    assert all(n.split("/")[0] in {"embedding", "attention", "feed_forward", "norm", "other"} for n in names)


@pytest.mark.parametrize("name, module_type, kind", [
    ("encoder.block.0.layer.0.SelfAttention.q.weight", nn.Linear, "attention"),  # T5
    ("decoder.block.1.layer.1.EncDecAttention.o.weight", nn.Linear, "attention"),
    ("encoder.block.0.layer.1.DenseReluDense.wi.weight", nn.Linear, "feed_forward"),
    ("model.layers.0.post_attention_layernorm.weight", None, "norm"),  # Llama: the norm rule comes first
    ("layers.0.attention_norm.weight", None, "norm"),
    ("transformer.h.0.attn.c_attn.weight", None, "attention"),  # GPT-2
    ("model.embed_tokens.weight", nn.Embedding, "embedding"),
    ("lm_head.weight", nn.Linear, "feed_forward"),
    ("classifier.weight", None, "other"),
    # common words decide only where they name the layer: a position-wise FFN, a MetaFormer token
    # mixer, DeBERTa's relative-position projection and an actor-critic value head were embeddings
    # and attention
    ("layer_stack.0.pos_ffn.w_1.weight", None, "feed_forward"),
    ("stages.0.blocks.0.token_mixer.qkv.weight", None, "attention"),
    ("encoder.layer.0.attention.self.pos_proj.weight", None, "attention"),
    ("value_head.weight", nn.Linear, "feed_forward"),
    ("encoder.layer.0.attention.self.query.weight", None, "attention"),  # BERT: a whole segment
    ("cls_token", None, "embedding"),  # raw parameters (timm)
    ("pos_embed", None, "embedding"),
    ("layers.0.pre.weight", getattr(nn, "RMSNorm", nn.LayerNorm), "norm"),
    ("bag.weight", nn.EmbeddingBag, "embedding"),  # (not a subclass of nn.Embedding: it was "other")
    ("mixer.q_proj_weight", None, "attention"),  # nn.MultiheadAttention with kdim / vdim: they were "other"
    ("mixer.v_proj_weight", None, "attention"),
])
def test_layer_types_of_common_model_families(name, module_type, kind):
    from metaadamw.grouping import TensorInfo, layer_type
    assert layer_type(TensorInfo(index=0, param_group=0, name=name, shape=(4, 4), module_type=module_type)) == kind


def test_recurrent_biases_are_biases_in_fine_grained_groups():
    model = nn.ModuleDict({"lstm": nn.LSTM(4, 8, num_layers=2, bidirectional=True), "fc": nn.Linear(16, 2)})
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    kinds = {info.name: opt.group_names[g].rsplit("/", 1)[1] for info, g in zip(opt.tensor_info, opt._group_of)}
    assert {n for n, kind in kinds.items() if kind == "bias"} == {n for n in kinds if ".bias" in n}
    assert kinds["lstm.bias_hh_l1_reverse"] == "bias" and kinds["lstm.weight_ih_l0"] == "weight"
    assert opt.layout.is_bias.tolist() == [float(".bias" in n) for n in kinds]


def _buckets(opt):
    return {info.name: opt.group_names[g].split("/")[1] for info, g in zip(opt.tensor_info, opt._group_of)}


def test_fine_grained_depth_is_the_layer_index_in_the_name_also_across_parallel_lists():
    # one layer's parts kept in parallel lists (a bidirectional stack of LSTMs, attn/ffn/norm lists):
    # the i-th entries of every list are one layer, at one depth (counting the lists one after the
    # other put the first backward LSTM deep, and a numbered stem before the trunk pushed the trunk deep)
    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
            self.forward_lstms = nn.ModuleList(nn.LSTM(4, 4) for _ in range(3))
            self.backward_lstms = nn.ModuleList(nn.LSTM(4, 4) for _ in range(3))
            self.attn_layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.norm_layers = nn.ModuleList(nn.LayerNorm(4) for _ in range(3))
            self.head = nn.Linear(4, 2)

    model = Stacked()
    for kwargs in ({"params": model.named_parameters()}, {"params": model.parameters(), "model": model}):
        depth = _buckets(MetaAdamW(kwargs.pop("params"), **kwargs, **small_kwargs()))
        for i, bucket in enumerate(("shallow", "middle", "deep")):
            assert {depth[f"{lst}.{i}.{leaf}"] for lst, leaf in (
                ("forward_lstms", "weight_ih_l0"), ("backward_lstms", "bias_hh_l0"), ("attn_layers", "weight"),
                ("norm_layers", "weight"))} == {bucket}, i
        assert depth["stem.0.weight"] == "shallow" and depth["stem.2.weight"] == "deep"  # (the index as it stands)
        assert depth["head.weight"] == "deep"


@pytest.mark.parametrize("name, index", [
    ("encoder.layers.encoder_layer_7.mlp.3.weight", 7),  # torchvision's ViT: not the MLP's own index
    ("features.denseblock3.denselayer12.conv1.weight", 3),  # torchvision's DenseNet
    ("blocks_4.attn.weight", 4), ("stage_2.conv.weight", 2),
    ("features.transition1.conv.weight", 1),  # (between denseblock1 and denseblock2)
    ("ln_1.weight", None), ("fc2.weight", None), ("layer_norm1.weight", None), ("block1_conv1.weight", None),
])
def test_layer_indices_in_prefixed_and_underscored_names(name, index):
    from metaadamw.grouping import layer_index
    assert layer_index(name) == index


def test_a_model_wrapped_in_a_container_keeps_its_depths():
    # nn.Sequential(model): every name begins with "0.", which was read as every tensor's layer index
    model = TinyTransformer(layers=3)
    bare = _buckets(MetaAdamW(model.named_parameters(), **small_kwargs()))
    wrapped = nn.Sequential(model)
    for kwargs in ({"params": wrapped.named_parameters()}, {"params": wrapped.parameters(), "model": wrapped}):
        depth = _buckets(MetaAdamW(kwargs.pop("params"), **kwargs, **small_kwargs()))
        assert {n.removeprefix("0."): d for n, d in depth.items()} == bare
    assert set(bare.values()) == {"shallow", "middle", "deep"}
    # one layer's tensors alone keep their one index (middle), not an index of their own parts
    layer = {n: p for n, p in model.named_parameters() if n.startswith("encoder.layers.1.")}
    assert set(_buckets(MetaAdamW(layer.items(), **small_kwargs())).values()) == {"middle"}


def test_attention_projections_and_parametrized_tensors_belong_to_their_layer():
    # nn.MultiheadAttention's out_proj is a Linear: under an attribute name without "attn" it was
    # feed_forward; a parametrized tensor (weight_norm, register_parametrization) lives in a
    # ParametrizationList as "<layer>.parametrizations.<name>.original0": it lost its layer's type
    # and, for a bias, its bias flag
    class Clamp(nn.Module):
        def forward(self, x):
            return x.clamp(-1, 1)

    def build():
        torch.manual_seed(0)
        return nn.ModuleDict({"emb": nn.Embedding(10, 4), "layers": nn.ModuleList(nn.ModuleDict({
            "cross": nn.MultiheadAttention(4, 2), "ffn": nn.Linear(4, 4), "norm": nn.LayerNorm(4)}) for _ in range(3)),
            "head": nn.Linear(4, 2)})

    plain, parametrized = build(), build()
    for block in parametrized["layers"]:
        torch.nn.utils.parametrizations.weight_norm(block["ffn"])
        torch.nn.utils.parametrize.register_parametrization(block["ffn"], "bias", Clamp())
    torch.nn.utils.parametrizations.weight_norm(parametrized["head"])
    groups = {}
    for key, model in (("plain", plain), ("parametrized", parametrized)):
        for how in ("model", "names"):
            opt = MetaAdamW(model.parameters(), model=model, **small_kwargs()) if how == "model" else MetaAdamW(
                model.named_parameters(), **small_kwargs())
            groups[key, how] = {info.name: opt.group_names[g] for info, g in zip(opt.tensor_info, opt._group_of)}
    assert groups["plain", "model"]["layers.0.cross.out_proj.weight"] == "attention/shallow/weight"
    assert groups["plain", "model"]["layers.2.cross.out_proj.bias"] == "attention/deep/bias"
    for how in ("model", "names"):
        par = groups["parametrized", how]
        assert par["layers.1.ffn.bias"] == groups["plain", how]["layers.1.ffn.bias"]
        assert par["layers.1.ffn.bias"].endswith("/middle/bias")
        assert par["layers.1.ffn.weight_original0"] == par["layers.1.ffn.weight_original1"] == (
            groups["plain", how]["layers.1.ffn.weight"])
        assert par["head.weight_original1"] == groups["plain", how]["head.weight"]
    assert groups["parametrized", "model"]["head.weight_original1"] == "feed_forward/deep/weight"


def test_fine_grained_depth_of_recurrent_layers_comes_from_their_names():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "lstm": nn.LSTM(4, 4, num_layers=3, bidirectional=True),
                           "fc": nn.Linear(8, 2)})
    depth = _buckets(MetaAdamW(model.named_parameters(), **small_kwargs()))
    assert depth["emb.weight"] == depth["lstm.weight_ih_l0"] == depth["lstm.bias_hh_l0_reverse"] == "shallow"
    assert depth["lstm.weight_hh_l1"] == depth["lstm.weight_ih_l1_reverse"] == "middle"
    assert depth["lstm.weight_ih_l2"] == depth["fc.weight"] == "deep"


def test_tensors_that_model_does_not_hold_keep_the_models_depths():
    # fine-tuning the top two of three layers, plus a learnable temperature and a separate head
    # whose names carry layer indices of their own (0-4), none of them in model=
    model = TinyTransformer(layers=3)
    whole = _buckets(MetaAdamW(model.named_parameters(), model=model, **small_kwargs()))
    temperature = nn.Parameter(torch.ones(()))
    head = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("encoder.layers.0")]
    opt = MetaAdamW([{"params": named}, {"params": [("temperature", temperature), *head.named_parameters()]}],
                    model=model, **small_kwargs())
    depth = _buckets(opt)
    assert {n: d for n, d in depth.items() if n in dict(named)} == {n: whole[n] for n, _ in named}
    assert depth["encoder.layers.1.linear1.weight"] == "middle"
    assert (depth["temperature"], depth["0.weight"], depth["2.bias"], depth["4.weight"]) == (
        "shallow", "shallow", "middle", "deep")  # (among themselves: the temperature comes before any index)
    # without a name, it cannot be grouped: the error says how to name it
    with pytest.raises(ValueError, match=r"model= does not hold.*\(name, tensor\) pairs"):
        MetaAdamW([{"params": [p for _, p in named]}, {"params": [temperature]}], model=model, **small_kwargs())


def test_fine_grained_name_rules_with_underscores_match_whole_segments():
    # names were split at "_" as well as ".", so feed_forward, q_proj, self_attn... never matched
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.feed_forward = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))

    model = nn.ModuleDict({"blocks": nn.ModuleList([Block(), Block()])})
    for kwargs in ({}, {"model": model}):
        params = model.named_parameters() if not kwargs else model.parameters()
        opt = MetaAdamW(params, **kwargs, **small_kwargs())
        kinds = {info.name: opt.group_names[g].split("/")[0] for info, g in zip(opt.tensor_info, opt._group_of)}
        assert {kinds[f"blocks.{i}.{p}_proj.weight"] for i in (0, 1) for p in "qkv"} == {"attention"}, kwargs
        assert kinds["blocks.1.feed_forward.2.bias"] == kinds["blocks.0.feed_forward.0.weight"] == "feed_forward"


def test_original_grouping_follows_param_groups():
    model = mlp(0)
    params = list(model.parameters())
    opt = MetaAdamW([{"params": params[:2]}, {"params": params[2:]}], grouping="original", **small_kwargs())
    assert opt.group_names == ["param_group_0", "param_group_1"]


def test_feature_padding_is_visible():
    model = mlp(0)
    with pytest.warns(UserWarning, match="zero-padded with 2 column"):
        opt = MetaAdamW(model.named_parameters(), modulator_heads=4, **small_kwargs())
    assert opt.modulator.padding == 2 and opt.modulator.width == 8
    assert "padding 2" in repr(opt)
    opt = MetaAdamW(model.named_parameters(), modulator_heads=4, modulator_width=16, **small_kwargs())
    assert opt.modulator.padding == 0 and opt.modulator.width == 16


@pytest.mark.parametrize("features, second_moment, time_step, width", [
    ("basic", True, True, 6), ("basic", False, False, 4), ("basic_plus", True, True, 11),
    ("basic_plus", False, True, 9), ("enhanced", True, True, 15), ("norm_basic", True, True, 6),
])
def test_input_width_follows_from_the_extractor(features, second_moment, time_step, width):
    model = mlp(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = MetaAdamW(model.named_parameters(), features=features, second_moment=second_moment,
                        time_step=time_step, modulator_heads=1, **small_kwargs())
    assert opt.modulator.in_width == width == len(opt.modulator.extractor.feature_names)


def _unfreeze_later(model, grouping, named):
    """Param groups as gradual unfreezing makes them: the last layer first, the rest added later."""
    first = list(model.named_parameters())[-2:] if named else list(model.parameters())[-2:]
    rest = list(model.named_parameters())[:-2] if named else list(model.parameters())[:-2]
    return first, {"params": rest, "lr": 3e-3, "weight_decay": 0.2}


@pytest.mark.parametrize("grouping, named", [("original", False), ("fine_grained", True)])
@pytest.mark.parametrize("foreach", [True, False])
def test_param_groups_added_after_construction_match_adamw_doing_the_same(grouping, named, foreach):
    batches = regression_batches()
    ref_model, model = mlp(0), mlp(0)
    first, rest = _unfreeze_later(ref_model, grouping, named)
    ref = torch.optim.AdamW(first, lr=1e-2, weight_decay=0.05, foreach=True)
    first, added = _unfreeze_later(model, grouping, named)
    opt = MetaAdamW(first, lr=1e-2, weight_decay=0.05, alpha_range=0.0, beta_range=0.0, foreach=foreach,
                    **small_kwargs(grouping=grouping))
    _train(ref_model, ref, batches, 3)
    _train(model, opt, batches, 3)
    ref.add_param_group(rest)
    opt.add_param_group(added)
    # the groups are those of an optimizer made with both param groups at once
    assert opt.group_names == MetaAdamW([{"params": first}, added], **small_kwargs(grouping=grouping)).group_names
    assert len(opt.group_names) == (2 if grouping == "original" else 6)
    _train(ref_model, ref, batches, 6)
    _train(model, opt, batches, 6)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
    assert opt._steps == [9, 9] + [6] * 4  # (optimizer order) the added tensors count their own steps, as in AdamW


def test_added_param_groups_join_the_modulator_the_meta_update_and_checkpoints():
    batches = regression_batches()

    def build(model):
        first, added = _unfreeze_later(model, "fine_grained", named=False)
        opt = MetaAdamW(first, model=model, **small_kwargs())  # names from model=, also for the added group
        return opt, added

    model = mlp(0)
    opt, added = build(model)
    _train(model, opt, batches, 2)
    # with model=, fine_grained's depths come from the whole model: the last layer is "deep" from the
    # start, and stays in its groups when the layers before it join
    assert opt.group_names == ["feed_forward/deep/weight", "feed_forward/deep/bias"]
    opt.add_param_group(added)
    assert opt.group_names == ["feed_forward/deep/weight", "feed_forward/deep/bias", "feed_forward/shallow/weight",
                               "feed_forward/shallow/bias", "feed_forward/middle/weight", "feed_forward/middle/bias"]
    _train(model, opt, batches, 2)
    assert opt.multipliers.alpha.shape == (6,)
    record = opt.meta_step(model, mse, batches[0], batches[1], batches[2])
    assert not record.skipped and len(record.alpha) == 6 and record.groups == opt.group_names
    opt.zero_grad()
    mse(model, batches[3]).backward()
    record = opt.meta_step(model, mse, None, batches[1], batches[2])  # g from .grad, all six groups
    assert not record.skipped and len(record.alpha) == 6
    opt.step()
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    twin = mlp(1)
    twin.load_state_dict(saved_model)
    twin_opt, twin_added = build(twin)
    with pytest.raises(ValueError, match="also those added with add_param_group"):  # resuming needs the same groups
        twin_opt.load_state_dict(saved)
    twin_opt.add_param_group(twin_added)
    twin_opt.load_state_dict(saved)
    _train(model, opt, batches, 3)
    _train(twin, twin_opt, batches, 3)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("features", ["basic", "enhanced"])
def test_added_tensors_that_join_existing_groups_keep_the_groups_and_refresh_the_multipliers(features):
    model = mlp(0, widths=(6, 16, 16, 16, 1))  # layers 0, 2, 4 (shallow, middle, deep), then 6 (deep too)
    named = list(model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (enhanced's padding)
        opt = MetaAdamW(named[:6], model=model, refresh_every=100, features=features, **small_kwargs(modulator_heads=1))
    _train(model, opt, regression_batches(), 2)
    before = list(opt.group_names)
    stale = opt.multipliers.alpha.clone()
    opt.add_param_group({"params": named[6:]})
    assert opt.group_names == before and opt._group_of == [0, 1, 2, 3, 4, 5, 4, 5]
    assert opt.multipliers is None  # the next step recomputes them with the new tensors, whatever refresh_every
    if features == "enhanced":  # its static columns follow: log10 of the element count of "deep/weight"
        assert opt.modulator.extractor.static[4, 0].item() == pytest.approx(math.log10(1 + 16 * 16 + 16))
    opt.zero_grad()
    mse(model, regression_batches()[0]).backward()
    for _, p in named[6:]:
        p.grad = None  # a step in which the added tensors have no gradient yet: the others' statistics
    opt.step()
    assert opt._steps == [3] * 6 + [0] * 2 and "exp_avg" not in opt.state[named[6][1]]
    assert opt.multipliers.alpha.shape == (6,) and not torch.equal(opt.multipliers.alpha, stale)
    _train(model, opt, regression_batches(), 1)
    assert opt._steps == [4] * 6 + [1] * 2


def test_a_param_group_that_cannot_be_added_leaves_the_optimizer_as_it_was():
    batches = regression_batches()
    model = mlp(0)
    named = list(model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = MetaAdamW(named[:2], features="enhanced", model=model, **small_kwargs(modulator_heads=1))
    _train(model, opt, batches, 2)
    snapshot = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="learns an embedding per modulator group"):
        opt.add_param_group({"params": named[2:4]})  # a new group: the embedding has no row for it
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [("extra", nn.Parameter(torch.zeros(3, device="meta")))]})
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [("extra", nn.Parameter(torch.zeros(3, dtype=torch.complex64)))]})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": named[2:4], "lr": -1.0})
    assert len(opt.param_groups) == 1 and len(opt._params) == 2 and len(opt.group_names) == 2
    after = opt.state_dict()
    assert after["param_groups"] == snapshot["param_groups"] and after["metaadamw"]["steps"] == [2, 2]
    assert after["metaadamw"]["group_names"] == snapshot["metaadamw"]["group_names"]
    torch.testing.assert_close(after["state"], snapshot["state"])
    torch.testing.assert_close(after["metaadamw"]["modulator"], snapshot["metaadamw"]["modulator"])
    _train(model, opt, batches, 1)  # and it still steps
    plain = MetaAdamW(list(model.parameters())[:2], grouping="fine_grained", model=model, **small_kwargs())
    del model  # the weak reference to the model is gone: the added tensors have no names
    with pytest.raises(ValueError, match="needs parameter names"):
        plain.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    assert len(plain.param_groups) == 1


def test_a_feature_extractor_whose_width_follows_the_groups_is_refused_when_a_group_is_added():
    from metaadamw import FEATURES
    from metaadamw.features import FeatureExtractor

    class PerGroup(FeatureExtractor):  # a one-hot column per group: wider with every group added
        stats = ("grad_norm",)

        def columns(self):
            return ["grad_norm"] + [f"is_{name}" for name in self.layout.names]

        def statistics(self, stats):
            return torch.cat([self.group_mean(stats["grad_norm"].unsqueeze(1)), torch.eye(self.layout.num_groups)], 1)

    FEATURES.add("test_per_group", PerGroup)
    try:
        model = mlp(0)
        params = list(model.parameters())
        opt = MetaAdamW([{"params": params[:2]}], features="test_per_group", grouping="original",
                        **small_kwargs(modulator_heads=1))
        _train(model, opt, regression_batches(), 1)
        # the next step failed with "returned (2, 3); expected (2, 2): ... columns() [3 names]"
        with pytest.raises(ValueError, match=r"features='test_per_group' \(PerGroup\) is 4 features wide .* and 5 "
                                             r"with .* keep its columns\(\) independent of the groups"):
            opt.add_param_group({"params": params[2:]})
        assert len(opt.param_groups) == 1 and opt.modulator.extractor.width == 4
        assert opt.modulator.extractor.layout is opt.layout
        _train(model, opt, regression_batches(), 1)  # and it still steps
    finally:
        FEATURES.remove("test_per_group")


def test_a_copy_of_the_optimizer_holds_no_model_and_takes_named_groups():
    model = mlp(0)
    opt = MetaAdamW(list(model.parameters())[:2], model=model, **small_kwargs())
    copied = copy.deepcopy(opt)
    with pytest.raises(ValueError, match="needs parameter names"):
        copied.add_param_group({"params": list(model.parameters())[2:4]})
    named = MetaAdamW(list(model.named_parameters())[:2], **small_kwargs())
    named = copy.deepcopy(named)
    named.add_param_group({"params": list(model.named_parameters())[2:4]})
    assert named.group_names == ["other/shallow/weight", "other/shallow/bias", "other/deep/weight", "other/deep/bias"]


def test_works_as_drop_in_with_closure_and_lr_scheduler():
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), lr=0.05, **small_kwargs())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    batch = regression_batches(1)[0]
    losses = []
    for _ in range(5):
        def closure():
            opt.zero_grad()
            loss = mse(model, batch)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 / 32)
    assert losses[-1] < losses[0]


def test_deepcopy_and_repr():
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    assert "groups=6" in repr(opt) and "features=basic (6 wide" in repr(opt)
    copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_or_pickled_optimizer_continues_exactly_like_the_original(how, tmp_path):
    # torch.optim.Optimizer pickles only defaults, state and param_groups: MetaAdamW's modulator,
    # weighting, meta-optimizer, layout and counters must travel too. Copied together with the model,
    # the copy's parameters are the copied model's, and both continue bit-identically.
    import pickle

    batches = regression_batches()
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), meta_lr=1e-2, **small_kwargs())
    _train(model, opt, batches, 3)
    opt.meta_step(model, mse, batches[0], batches[1], batches[2])
    opt.register_step_post_hook(lambda *args: None)  # hooks are not state (as in torch.optim): not copied
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        torch.save((model, opt), tmp_path / "both.pt")
        model2, opt2 = torch.load(tmp_path / "both.pt", weights_only=False)
    assert not opt2._optimizer_step_post_hooks and opt._optimizer_step_post_hooks
    assert repr(opt2) == repr(opt)
    assert opt2._params[0] is next(model2.parameters()) and opt2._params[0] is not opt._params[0]
    meta_params2 = [p for g in opt2.meta_optimizer.param_groups for p in g["params"]]
    assert meta_params2[0] is next(opt2.modulator.parameters())  # the copy's meta-optimizer trains the copy
    for m, o in ((model, opt), (model2, opt2)):
        torch.manual_seed(5)
        rec = o.meta_step(m, mse, batches[1], batches[2], batches[3])
        _train(m, o, batches, 4)
        o.meta_step(m, mse, batches[0], batches[1], batches[2])
        _train(m, o, batches, 2)
        assert not rec.skipped
    for a, b in zip(list(model.parameters()) + list(opt.modulator.parameters()),
                    list(model2.parameters()) + list(opt2.modulator.parameters())):
        assert torch.equal(a, b)
    assert opt2.global_step == opt.global_step == 9 and opt2.meta_updates == opt.meta_updates == 3


def test_an_optimizer_pickled_with_torch_optims_flags_in_its_groups_loses_them():
    # an earlier version kept an AdamW checkpoint's flags (amsgrad, foreach, ...) in param_groups,
    # and pickled them with the optimizer: unpickling drops them, as loading a checkpoint does
    import pickle

    opt = MetaAdamW(mlp(0).named_parameters(), **small_kwargs())
    opt.param_groups[0].update(amsgrad=False, foreach=None, decoupled_weight_decay=True, fused=None)
    again = pickle.loads(pickle.dumps(opt))
    assert set(again.param_groups[0]) == {"params", "param_names", "lr", "betas", "eps", "weight_decay"}


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_made_after_an_lr_scheduler_steps_itself(how, tmp_path):
    # a scheduler wraps the optimizer's step() in an instance attribute; copied along, the copy's
    # step() stepped the original's parameters (and pickling failed), where torch.optim drops it
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, **small_kwargs())
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    assert "step" in vars(opt)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        torch.save((model, opt), tmp_path / "both.pt")
        model2, opt2 = torch.load(tmp_path / "both.pt", weights_only=False)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model2, opt2, regression_batches(), 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the original is untouched
    assert not all(torch.equal(a, b) for a, b in zip(before, model2.parameters()))  # the copy trained


def _clear(model, opt):
    opt.state.clear()


def _new_state(model, opt):
    opt.state = type(opt.state)(dict)


def _delete_one(model, opt):
    del opt.state[model[0].weight]


def _replace_moments(model, opt):
    for p in model.parameters():
        opt.state[p]["exp_avg"] = torch.zeros_like(p)
        opt.state[p]["exp_avg_sq"] = torch.full_like(p, 1e-4)


@pytest.mark.parametrize("reset", [_clear, _new_state, _delete_one, _replace_moments])
@pytest.mark.parametrize("foreach", [True, False])
def test_a_state_reset_by_the_caller_takes_effect_as_in_adamw(reset, foreach):
    # torch.optim.AdamW reads its state at every step; MetaAdamW's cached step plan kept stepping
    # the old moments, and the checkpoints saved from self.state held none or stale ones
    batches = regression_batches()
    models = {k: mlp(0) for k in ("adamw", "meta")}
    opts = {"adamw": torch.optim.AdamW(models["adamw"].parameters(), lr=1e-2, foreach=foreach),
            "meta": MetaAdamW(models["meta"].named_parameters(), lr=1e-2, alpha_range=0.0, beta_range=0.0,
                              foreach=foreach, **small_kwargs())}
    for k in opts:
        _train(models[k], opts[k], batches, 3)
        reset(models[k], opts[k])
        _train(models[k], opts[k], batches, 3)
    for a, b in zip(models["meta"].parameters(), models["adamw"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    saved, reference = opts["meta"].state_dict()["state"], opts["adamw"].state_dict()["state"]
    assert sorted(saved) == sorted(reference)
    for i in reference:
        assert saved[i]["step"] == int(reference[i]["step"])
        torch.testing.assert_close(saved[i]["exp_avg"], reference[i]["exp_avg"], rtol=1e-5, atol=1e-7)
    # the moments stepped are the ones in the state: a checkpoint resumes the run exactly
    model2 = mlp(1)
    model2.load_state_dict(models["meta"].state_dict())
    opt2 = MetaAdamW(model2.named_parameters(), lr=1e-2, alpha_range=0.0, beta_range=0.0, foreach=foreach,
                     **small_kwargs())
    opt2.load_state_dict(copy.deepcopy(opts["meta"].state_dict()))
    _train(models["meta"], opts["meta"], batches, 2)
    _train(model2, opt2, batches, 2)
    for a, b in zip(models["meta"].parameters(), model2.parameters()):
        assert torch.equal(a, b)


def _zero_in_place(model, opt):
    for st in opt.state.values():
        st["exp_avg"].zero_()
        st["exp_avg_sq"].zero_()


def _masked_in_place(model, opt):  # a pruning step's reset of the pruned weights' moments (ReLoRA-style)
    for p in model.parameters():
        mask = torch.rand_like(p) < 0.5
        opt.state[p]["exp_avg"][mask] = 0.0
        opt.state[p]["exp_avg_sq"][mask] = 0.0


def _copied_in_place(model, opt):
    for st in opt.state.values():
        st["exp_avg_sq"].copy_(torch.full_like(st["exp_avg_sq"], 1e-3))


def _first_moment_scaled_in_place(model, opt):  # (only the carried ||m||^2, which the cos identity uses)
    for st in opt.state.values():
        st["exp_avg"].mul_(-3.0)


def _assert_statistics_of_the_state(opt, grads):
    """v_norm and cos as the optimizer's own moments and this step's gradients give them."""
    true = torch.stack([opt.state[p]["exp_avg_sq"].sum().sqrt() for p in opt._params])
    torch.testing.assert_close(opt._stats["v_norm"], true, rtol=1e-4, atol=1e-9)
    true = torch.stack([torch.nn.functional.cosine_similarity(g.flatten(), opt.state[p]["exp_avg"].flatten(), dim=0)
                        for p, g in zip(opt._params, grads)])
    torch.testing.assert_close(opt._stats["cos"], true, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("change", [_zero_in_place, _masked_in_place, _copied_in_place, _first_moment_scaled_in_place])
def test_moments_changed_in_place_by_the_caller_reach_the_statistics(change):
    # the carried sum(v) and ||m||^2 went on describing the moments before the change: the v_norm
    # feature stayed wrong for ~1 / (1 - beta2) steps (64% off 300 steps after a reset), the cos
    # feature for one step (-1 for 0.71)
    torch.manual_seed(0)
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, **small_kwargs())
    batches = regression_batches()
    _train(model, opt, batches, 6)
    change(model, opt)
    for t in range(3):
        _train(model, opt, batches[t % len(batches):][:1], 1)
        _assert_statistics_of_the_state(opt, [p.grad for p in opt._params])


@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "pickle"])
def test_a_checkpoint_or_copy_taken_after_an_in_place_change_resumes_as_the_run_continues(how):
    # the checkpoint said the carried norms were valid, and the resumed run used those of the moments
    # before the change (v_norm 156% off) where the uninterrupted run noticed it
    torch.manual_seed(0)
    batches = regression_batches()
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, **small_kwargs())
    _train(model, opt, batches, 6)
    _zero_in_place(model, opt)
    if how == "state_dict":
        model2 = mlp(1)
        model2.load_state_dict(model.state_dict())
        opt2 = MetaAdamW(model2.named_parameters(), lr=1e-2, **small_kwargs())
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    else:
        import pickle

        model2, opt2 = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    _train(model, opt, batches, 3)
    _train(model2, opt2, batches, 3)
    _assert_statistics_of_the_state(opt2, [p.grad for p in model2.parameters()])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_moments_the_optimizer_changes_itself_keep_their_carried_norms(monkeypatch):
    # the check for changes made in place does not mistake the step's own (nor a meta-update's) for them
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, **small_kwargs())
    batches = regression_batches(3)
    _train(model, opt, batches, 2)
    recomputed = []
    monkeypatch.setattr(opt, "_recompute_carry", lambda: recomputed.append(opt.global_step))
    for _ in range(3):
        opt.meta_step(model, mse, *batches)
        _train(model, opt, batches, 2)
    assert recomputed == []


def test_low_precision_second_moments_give_the_v_norm_they_hold():
    # in bfloat16 an update of (1 - beta2) g^2 is largely rounded away: the carried exact sum(v) drifted
    # from the stored v (12% after 400 steps), and the v_norm feature with it
    torch.manual_seed(0)
    model = mlp(0).to(torch.bfloat16)
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, eps=1e-6, **small_kwargs())
    batches = [(x.bfloat16(), y.bfloat16()) for x, y in regression_batches()]
    _train(model, opt, batches, 300)
    true = torch.stack([opt.state[p]["exp_avg_sq"].float().sum().sqrt() for p in opt._params])
    torch.testing.assert_close(opt._stats["v_norm"], true, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_fast_path_counts_zeros_of_low_precision_tensors_in_float32(dtype):
    # torch._foreach_norm returned the non-zero count in the tensor's dtype: inf in float16 above 65,504 (a
    # sparsity of -inf, fed to the modulator as -1e6), rounded in bfloat16 (a negative sparsity)
    stats = {}
    for foreach in (True, False):
        torch.manual_seed(0)
        layer = nn.Linear(300, 300).to(dtype)
        opt = MetaAdamW(layer.named_parameters(), model=layer, features="enhanced", foreach=foreach, **small_kwargs())
        layer.weight.grad = torch.randn(300, 300).to(dtype)
        layer.weight.grad[0, :3] = 0
        layer.bias.grad = torch.ones(300, dtype=dtype)
        opt.step()
        stats[foreach] = opt._stats["grad_sparsity"]
    assert stats[True][0].item() == pytest.approx(3 / 90_000, rel=1e-6)
    torch.testing.assert_close(stats[True], stats[False])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dot_products_of_low_precision_tensors_are_summed_in_float32(dtype):
    # torch.dot of float16 tensors sums in float16: inf past 65,504 (a gradient of norm 256)
    x = torch.full((100,), 30.0, dtype=dtype, requires_grad=True)
    c = torch.full((100,), 0.5, dtype=dtype)
    assert F.flat_dot(x.detach(), x.detach()).item() == 90000.0
    sq, dot = F.squares_and_dots([x], [c])
    assert sq.dtype == dot.dtype == torch.float32
    assert (sq.item(), dot.item()) == (90000.0, 1500.0)
    (sq.sum() + dot.sum()).backward()
    assert x.grad.dtype == dtype and torch.equal(x.grad, torch.full_like(x, 60.5))


def test_the_fast_path_takes_bfloat16_norms_in_float32():
    # the norms came back rounded to bfloat16 (3 significant digits), which the cos identity magnified: cos(g, m)
    # 0.025 off the exact value (the single-tensor path: 3e-6)
    torch.manual_seed(0)
    layer = nn.Linear(128, 128).to(torch.bfloat16)
    opt = MetaAdamW(layer.named_parameters(), model=layer, **small_kwargs())
    g = torch.Generator().manual_seed(1)
    base, worst, norm_error = torch.randn(128, 128, generator=g), 0.0, 0.0
    for t in range(30):
        layer.weight.grad = ((0.3 * base + torch.randn(128, 128, generator=g)) * (0.5 if t > 15 else 1.0)).bfloat16()
        layer.bias.grad = torch.randn(128, generator=g).bfloat16()
        opt.step()
        m, grad = opt.state[layer.weight]["exp_avg"].float(), layer.weight.grad.float()
        worst = max(worst, abs(opt._stats["cos"][0].item() - ((grad * m).sum() / (grad.norm() * m.norm())).item()))
        norm_error = max(norm_error, abs(opt._stats["grad_norm"][0].item() / grad.norm().item() - 1))
    assert worst < 1e-3 and norm_error < 1e-6


@pytest.mark.parametrize("also", ["other_tensors_with_gradients", "meta_step_first", "replaced_without_gradient",
                                  "replaced_without_gradient_after_a_load"])
def test_the_statistics_follow_a_state_reset_also_when_the_plan_changes_for_another_reason(also):
    # a reset on a step whose set of tensors with gradients changed too kept the carried norms of
    # the old moments: the v_norm feature stayed wrong for ~1 / (1 - beta2) steps
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, **small_kwargs())
    batches = regression_batches()
    _train(model, opt, batches, 5)
    if also.endswith("after_a_load"):  # (the loaded moments are new tensors: their replacement is noticed too)
        state = copy.deepcopy(opt.state_dict())
        opt = MetaAdamW(model.named_parameters(), lr=1e-2, **small_kwargs())
        opt.load_state_dict(state)
    if also.startswith("replaced_without_gradient"):  # moments replaced while the tensor is out of the step plan
        opt.zero_grad()
        mse(model, batches[0]).backward()
        model[-1].weight.grad = None
        opt.step()
        st = opt.state[model[-1].weight]
        st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"]), torch.full_like(st["exp_avg_sq"], 1e-6)
    else:
        opt.state.clear()
    if also == "meta_step_first":
        opt.meta_step(model, mse, batches[0], batches[1], batches[2])
    for t in range(3):
        opt.zero_grad()
        mse(model, batches[t % len(batches)]).backward()
        if t == 0 and also == "other_tensors_with_gradients":
            model[-1].weight.grad = None
        opt.step()
        has = [p in opt.state for p in opt._params]  # (a tensor without moments is left out of the features)
        assert list(opt._live) == has and (t > 0 or also != "other_tensors_with_gradients" or not all(has))
        true = torch.stack([opt.state[p]["exp_avg_sq"].sum().sqrt() for p, h in zip(opt._params, has) if h])
        torch.testing.assert_close(opt._stats["v_norm"][torch.tensor(has)], true, rtol=1e-4, atol=1e-9)


def test_a_tensor_given_twice_is_refused_and_group_dicts_stay_the_callers():
    model = mlp(0)
    weight = model[0].weight
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="more than once"):
        MetaAdamW([("a", weight), ("b", weight)], grouping="original", **small_kwargs())
    # as in torch.optim, param_groups holds the caller's dicts: a script that edits them reaches the optimizer
    groups = [{"params": [weight], "lr": 0.01}, {"params": [model[0].bias]}]
    opt = MetaAdamW(groups, lr=0.1, grouping="original", **small_kwargs())
    assert opt.param_groups[0] is groups[0] and opt.param_groups[1] is groups[1]
    groups[0]["lr"] = 0.04
    assert opt.param_groups[0]["lr"] == 0.04


def test_tensors_put_into_a_param_group_by_hand_are_refused_not_left_untrained():
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    _train(model, opt, regression_batches(), 1)
    extra = nn.Parameter(torch.ones(3))
    opt.param_groups[0]["params"].append(extra)
    extra.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"no longer those MetaAdamW was given: .*add_param_group"):
        opt.step()
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.meta_step(model, mse, *regression_batches()[:3])
    opt.param_groups[0]["params"].pop()
    _train(model, opt, regression_batches(), 1)  # as given: it steps again
    assert opt.global_step == 2
    # a tensor replaced by another (same count): the new one would never be stepped
    first = opt.param_groups[0]["params"][0]
    saved = opt.state_dict()
    opt.param_groups[0]["params"][0] = nn.Parameter(first.detach().clone())
    for call in (opt.step, opt.state_dict, lambda: opt.load_state_dict(saved)):
        # (state_dict failed with a bare KeyError; load_state_dict gave the moments to the stranger)
        with pytest.raises(RuntimeError, match="replaced in param_groups"):
            call()
    opt.param_groups[0]["params"][0] = first
    opt.state_dict()
    assert "exp_avg" in opt.state[first]


def test_a_sparse_gradient_after_dense_steps_is_a_clear_error_that_counts_no_step():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 1))
    opt = MetaAdamW(model.named_parameters(), grouping="original", **small_kwargs())
    batch = (torch.randint(0, 10, (5, 2)), torch.randn(5, 1))
    mse(model, batch).backward()
    opt.step()
    model[0].sparse = True  # (the same tensors, now with a sparse gradient: the step plan is not new)
    opt.zero_grad()
    mse(model, batch).backward()
    with pytest.raises(ValueError, match="does not support sparse gradients"):
        opt.step()
    assert opt.global_step == 1 and opt._steps == [1, 1, 1]


@pytest.mark.parametrize("layer", [nn.Embedding(10, 4, sparse=True), nn.EmbeddingBag(10, 4, sparse=True)])
def test_a_model_layer_with_sparse_gradients_is_named_when_step_refuses_its_gradient(layer):
    # MetaAdamW, like AdamW, cannot step sparse gradients: with model= the layer that makes them is named in the error
    # of the step that finds one, before anything changes. It was refused when the optimizer was made (this test
    # asserted that), which also refused a sparse embedding that forward uses densely as well (h @ emb.weight.T): its
    # gradient is dense, and nothing in the model's structure tells the two apart (see the tests below)
    model = nn.ModuleDict({"emb": layer, "head": nn.Linear(4, 1)})
    x = torch.randint(0, 10, (5, 3))
    message = (rf"sparse gradients \(nor does AdamW\): parameter 'emb\.weight', the weight of the model's layer 'emb' "
               rf"\(nn\.{type(layer).__name__}\(sparse=True\)\), has a torch\.sparse_coo gradient\. A layer such as "
               rf"nn\.Embedding\(sparse=True\) or nn\.EmbeddingBag\(sparse=True\) makes them: build it with sparse=False")
    start = [p.detach().clone() for p in model.parameters()]
    opt = MetaAdamW(model.parameters(), model=model, **small_kwargs())
    model["head"](layer(x)).mean().backward()
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert opt.global_step == 0 and not opt.state
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))
    # added later, in a group of its own: named as well
    opt = MetaAdamW(model["head"].parameters(), model=model, **small_kwargs())
    opt.add_param_group({"params": [layer.weight]})
    assert len(opt.param_groups) == 2 and len(opt._params) == 3
    with pytest.raises(ValueError, match=message):
        opt.step()
    layer.sparse = False
    opt.zero_grad()
    model["head"](layer(x)).mean().backward()
    opt.step()
    assert opt.global_step == 1 and not torch.equal(layer.weight, start[0])


class _AliasedSparseEmbedding(nn.Module):
    """A sparse embedding whose weight is registered again on the parent (``self.w = self.emb.weight``, first in
    registration order, so named 'w') and, as a shared parameter, on a plain container: no dense use anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(10, 4, sparse=True)
        self.w = self.emb.weight
        self.shared = nn.Module()
        self.shared.table = self.emb.weight
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


def test_a_sparse_embedding_weight_also_registered_on_a_parent_is_refused_and_named_at_the_first_step():
    # the check that refused a sparse layer's weight when the optimizer was made took any other module that registered
    # the same tensor (the parent's alias, a container sharing it) for a dense layer tied to it, and let it through:
    # step() then refused it with an error that named neither the parameter nor the layer
    torch.manual_seed(0)
    model = _AliasedSparseEmbedding()
    assert [n for n, _ in model.named_parameters()] == ["w", "head.weight", "head.bias"]
    start = model.emb.weight.detach().clone()
    opt = MetaAdamW(model.named_parameters(), model=model, **small_kwargs())
    batch = (torch.randint(0, 10, (5, 3)), torch.randn(5, 1))
    mse(model, batch).backward()
    assert model.emb.weight.grad.layout == torch.sparse_coo
    message = (r"parameter 'w', the weight of the model's layer 'emb' \(nn\.EmbeddingBag\(sparse=True\)\), has a "
               r"torch\.sparse_coo gradient\. A layer such as nn\.Embedding\(sparse=True\)")
    with pytest.raises(ValueError, match=message):
        opt.step()
    with pytest.raises(ValueError, match=message):
        opt.meta_step(model, mse, None, batch, batch)
    assert opt.global_step == 0 and not opt.state and torch.equal(model.emb.weight, start)


class _DirectlyTiedSparseEmbedding(nn.Module):
    """A sparse embedding that forward also uses as the output projection by a direct call (no tied layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.head = nn.Linear(10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x) @ self.emb.weight.T).mean(1)


def test_a_sparse_embedding_tied_by_a_direct_call_in_forward_trains_with_model_as_without():
    # autograd sums the embedding's sparse gradient and the direct product's dense one into a dense gradient, which
    # AdamW and MetaAdamW step: MetaAdamW(model=) refused the layer when made, as if its gradient were sparse
    torch.manual_seed(0)
    batch = (torch.randint(0, 10, (8, 5)), torch.randn(8, 1))
    results = []
    for with_model in (False, True):
        torch.manual_seed(1)
        model = _DirectlyTiedSparseEmbedding()
        start = model.emb.weight.detach().clone()
        opt = MetaAdamW(model.named_parameters(), model=model if with_model else None, **small_kwargs())
        for i in range(3):
            opt.zero_grad()
            mse(model, batch).backward()
            assert model.emb.weight.grad.layout == torch.strided
            if i == 1:
                assert not opt.meta_step(model, mse, None, batch, batch).skipped
            opt.step()
        assert opt.global_step == 3 and not torch.equal(model.emb.weight, start)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


class _CompressedSparseParameter(nn.Module):
    def __init__(self, to_layout) -> None:
        super().__init__()
        self.q = nn.Parameter(to_layout(torch.randn(4, 4)))
        self.lin = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x @ self.q.to_dense())


@pytest.mark.filterwarnings("ignore:Sparse (CSR|CSC|BSR|BSC) tensor support is in beta state")
@pytest.mark.parametrize("layout, to_layout", [
    (torch.sparse_csr, lambda t: t.to_sparse_csr()), (torch.sparse_csc, lambda t: t.to_sparse_csc()),
    (torch.sparse_bsr, lambda t: t.to_sparse_bsr((2, 2))), (torch.sparse_bsc, lambda t: t.to_sparse_bsc((2, 2)))])
def test_a_compressed_sparse_gradient_is_refused_by_step_and_meta_step_naming_the_parameter(layout, to_layout):
    # is_sparse is False for the compressed layouts (a parameter of that layout gets gradients of it): the check let
    # them through, and step() failed deep inside ("unsupported tensor layout: SparseCsr") after counting the step
    # and creating the moments; meta_step() failed the same way
    torch.manual_seed(0)
    model = _CompressedSparseParameter(to_layout)
    opt = MetaAdamW(model.named_parameters(), model=model, **small_kwargs())
    model.q.grad = to_layout(torch.randn(4, 4))
    model.lin.weight.grad, model.lin.bias.grad = torch.randn(1, 4), torch.randn(1)
    start = [p.detach().clone().to_dense() for p in model.parameters()]
    message = (rf"does not support sparse gradients \(nor does AdamW\): parameter 'q' has a {layout} gradient\. "
               rf"A parameter of a sparse layout gets gradients of that layout: keep the parameter dense")
    batch = torch.randn(3, 4)
    loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    with pytest.raises(ValueError, match=message):
        opt.meta_step(model, loss_fn, None, batch, batch)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert opt.global_step == 0 and opt._steps == [0, 0, 0] and not opt.state
    assert all(torch.equal(a, b.detach().to_dense()) for a, b in zip(start, model.parameters()))


class _NonStridedParameter(nn.Module):
    """A parameter of a layout that is neither strided nor sparse (mkldnn, jagged nested): its gradient has it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "mkldnn":
            self.q = nn.Parameter(torch.randn(4, 4).to_mkldnn())
        else:
            self.q = nn.Parameter(torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)],
                                                             layout=torch.jagged))
        self.kind = kind
        self.lin = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mkldnn":
            return self.lin(x @ self.q.to_dense())
        return self.lin(x) + self.q.values().sum()


@pytest.mark.parametrize("kind, layout", [
    pytest.param("mkldnn", "torch._mkldnn", marks=pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                                                     reason="needs a build with mkldnn")),
    ("jagged", "torch.jagged")])
def test_a_non_sparse_non_strided_gradient_is_refused_worded_by_its_layout(kind, layout):
    # a gradient of layout torch._mkldnn or torch.jagged (that of a parameter of that layout) was called a sparse
    # gradient, with the advice for sparse layouts
    torch.manual_seed(0)
    model = _NonStridedParameter(kind)
    opt = MetaAdamW(model.named_parameters(), model=model, **small_kwargs())
    batch = (torch.randn(3, 4), torch.randn(3, 1))
    mse(model, batch).backward()
    assert str(model.q.grad.layout) == layout
    start = [p.detach().clone() for p in model.lin.parameters()]
    message = (rf"^MetaAdamW supports only dense \(strided\) gradients \(as does AdamW\): parameter 'q' has a gradient "
               rf"of layout {layout}\. A parameter of that layout gets gradients of it: keep the parameter a strided "
               rf"tensor and convert it to that layout in forward$")
    with pytest.raises(ValueError, match=message):
        opt.step()
    with pytest.raises(ValueError, match=message):
        opt.meta_step(model, mse, None, batch, batch)
    assert opt.global_step == 0 and opt.meta_updates == 0 and opt._steps == [0, 0, 0] and not opt.state
    assert all(torch.equal(a, b) for a, b in zip(start, model.lin.parameters()))


def test_an_unnamed_parameter_is_named_by_its_group_position_and_shape_in_the_gradient_error():
    # an unnamed parameter (a plain list, dict groups without names) was named by its flat index alone
    # ("parameter 3 (of the optimizer's flat order)"), which points at no tensor of a list of groups
    torch.manual_seed(0)
    first = [nn.Parameter(torch.randn(2)) for _ in range(3)]
    w, b = nn.Parameter(torch.randn(10, 4)), nn.Parameter(torch.randn(4))
    opt = MetaAdamW([{"params": first}, {"params": [b, w]}], grouping="original", **small_kwargs())
    for p in (*first, b):
        p.grad = torch.randn_like(p)
    w.grad = torch.randn(10, 4).to_sparse()
    with pytest.raises(ValueError, match=r"sparse gradients \(nor does AdamW\): parameter 4 \(param group 1, "
                                         r"position 1, shape \(10, 4\)\) has a torch\.sparse_coo gradient\. "):
        opt.step()
    late = nn.Parameter(torch.randn(5))
    opt.add_param_group({"params": [late]})
    w.grad = torch.randn(10, 4)
    late.grad = torch.randn(5).to_sparse()
    with pytest.raises(ValueError, match=r": parameter 5 \(param group 2, position 0, shape \(5,\)\) has a "
                                         r"torch\.sparse_coo gradient"):
        opt.step()
    assert opt.global_step == 0 and not opt.state


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
def test_check_dense_refuses_every_layout_but_strided_and_passes_none():
    grads = [None, torch.zeros(2, 2), torch.zeros(2, 2).to_sparse_csr()]
    with pytest.raises(ValueError, match=r"tensor 2 has a torch\.sparse_csr gradient"):
        F.check_dense(grads)
    with pytest.raises(ValueError, match=r"the third has a torch\.sparse_coo gradient"):
        F.check_dense(grads[:2] + [torch.zeros(2, 2).to_sparse()], lambda i: ["", "", "the third"][i])
    F.check_dense(grads[:2])
    # a layout test on the host: no op reaches a tensor (no read back, no sync on an accelerator)
    with _RecordedOps() as mode:
        F.check_dense(grads[:2] * 100)
    assert mode.ops == []
    with _RecordedOps() as mode:  # (the mode does see ops)
        grads[1].add_(1)
    assert [op.__name__ for op in mode.ops] == ["add_.Tensor"]


class _RecordedOps(TorchDispatchMode):
    """Records every op dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


class _SparseEmbeddingLM(nn.Module):
    """A sparse embedding, frozen (a pretrained one) or tied to the output projection: it gets no gradient, or a dense
    one (autograd sums the embedding's sparse gradient and the projection's dense one)."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.proj = nn.Linear(4, 10, bias=False)
        if tied:
            self.proj.weight = self.emb.weight
        else:
            self.emb.weight.requires_grad_(False)
        self.head = nn.Linear(10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.emb(x))).mean(1)


@pytest.mark.parametrize("tied", [True, False])
def test_a_frozen_or_tied_sparse_embedding_with_model_trains_as_without_model(tied):
    # such a weight never has a sparse gradient: MetaAdamW(model=) refused it when made, although the same optimizer
    # built without model= trained it (and the meta-update ran) as AdamW does
    torch.manual_seed(0)
    x, y = torch.randint(0, 10, (8, 5)), torch.randn(8, 1)
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    results = []
    for with_model in (False, True):
        torch.manual_seed(1)
        model = _SparseEmbeddingLM(tied)
        opt = MetaAdamW(model.named_parameters(), model=model if with_model else None, **small_kwargs())
        for i in range(3):
            opt.zero_grad()
            loss_fn(model, (x, y)).backward()
            if i == 1:
                assert not opt.meta_step(model, loss_fn, None, (x, y), (x, y)).skipped
            opt.step()
        assert opt.global_step == 3
        assert (model.emb.weight.grad is None) == (not tied)
        results.append([p.detach().clone() for p in model.parameters()])
    # the embedding moves where it is trained (tied), and stays where it is frozen
    torch.manual_seed(1)
    start = _SparseEmbeddingLM(tied).emb.weight.detach()
    assert torch.equal(results[1][0], start) == (not tied)


@pytest.mark.parametrize("features", ["basic", "basic_plus", "enhanced", "norm_basic"])
@pytest.mark.parametrize("foreach", [True, False])
def test_an_empty_parameter_leaves_every_statistic_and_update_finite(features, foreach):
    """An empty tensor (a zero-length prompt, a pruned layer) has no zeros: its sparsity is 0, not
    0/0, which the encoder would have spread to every group's multipliers."""
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    model.register_parameter("prefix", nn.Parameter(torch.zeros(0, 6)))
    opt = MetaAdamW(model.named_parameters(), features=features, foreach=foreach, **small_kwargs(modulator_heads=1))
    batches = regression_batches(3)

    def loss_fn(m, batch):
        return mse(m, (torch.cat([m.prefix, batch[0]]), batch[1]))

    for b in batches:
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(opt.multipliers.alpha).all() and torch.isfinite(opt.multipliers.beta).all()
    empty = [info.index for info in opt.tensor_info if info.name == "prefix"]
    for key in ("grad_sparsity", "exp_avg_sparsity"):
        if key in opt._stats:
            assert opt._stats[key][empty].tolist() == [0.0]
            assert ((opt._stats[key] >= 0) & (opt._stats[key] <= 1)).all()
    record = opt.meta_step(model, loss_fn, *batches)
    assert not record.skipped and all(math.isfinite(a) for a in record.alpha)


def test_step_on_a_model_with_mixed_dtypes_of_gradients():
    model = nn.Linear(4, 2).double()
    opt = MetaAdamW(model.named_parameters(), grouping="original", **small_kwargs())
    model(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    assert opt.multipliers.alpha.dtype == torch.float32 and model.weight.dtype == torch.float64


def test_default_head_init_starts_with_random_multipliers_like_the_paper():
    model = mlp(0)
    torch.manual_seed(0)
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())  # modulator_init="default"
    _train(model, opt, regression_batches(), 1)
    alpha = opt.multipliers.alpha
    assert (alpha - 1).abs().max() > 1e-3 and ((alpha > 0.5) & (alpha < 1.5)).all()
    with pytest.raises(ValueError, match="modulator_init must be one of"):
        MetaAdamW(model.named_parameters(), modulator_init="xavier")


@pytest.mark.parametrize("kwargs", [
    dict(modulator_layers=3, modulator_heads=2),
    dict(modulator_layers=2, modulator_heads=3, gating=True, features="basic_plus", modulator_width=12),
    dict(modulator_layers=2, modulator_heads=4, modulator_dropout=0.5),
])
@pytest.mark.parametrize("fused", [True, False])
def test_lean_inference_path_equals_the_modulator_forward(kwargs, fused, monkeypatch):
    from metaadamw import modulator

    if fused:
        assert modulator.FUSED_LAYER is not None, "this torch has no fused encoder layer"
    else:
        monkeypatch.setattr(modulator, "FUSED_LAYER", None)
    model = TinyTransformer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = MetaAdamW(model.named_parameters(), **kwargs)
    randomise_head(opt)
    lm_loss(model, lm_batches()[0]).backward()
    opt.step()
    time = torch.tensor(0.3)
    opt.modulator.eval()
    with torch.no_grad():
        ref = opt.modulator(opt._stats, time)
    fast = opt.modulator.infer(opt._stats, time)
    torch.testing.assert_close(fast.alpha, ref.alpha)
    torch.testing.assert_close(fast.lambda2, ref.lambda2)
    assert not opt.modulator.training, "dropout must not apply in step()"
    again = opt.modulator.infer(opt._stats, time)
    assert torch.equal(again.alpha, fast.alpha)


def test_chunk_slices_cut_runs_by_elements_and_keep_big_tensors_whole():
    numels = [10, 30, 5, 100, 1, 1]
    assert F.chunk_slices(numels, 0, 6, 40) == [slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 6)]
    assert F.chunk_slices(numels, 1, 4, None) == [slice(1, 4)]
    assert F.chunk_slices(numels, 2, 2, 40) == []
    runs = F.chunk_slices(numels, 0, 6, 1)
    assert runs == [slice(i, i + 1) for i in range(6)]


def test_cache_blocking_follows_parameters_whose_storage_was_replaced(monkeypatch):
    # the step cuts large tensors into cached flat views; `p.data = ...` must not leave them stale
    monkeypatch.setattr(F, "CPU_CHUNK_NUMEL", 40)
    monkeypatch.setattr(F, "CPU_BLOCKING_MIN_NUMEL", 0)
    batches = regression_batches()
    ref_model, model = mlp(0), mlp(0)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.05)
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.05, alpha_range=0.0, beta_range=0.0,
                    **small_kwargs())
    for t in range(10):
        if t == 5:
            for p in model.parameters():
                p.data = p.data.clone()
        _train(ref_model, ref, batches[t % 4:], 1)
        _train(model, opt, batches[t % 4:], 1)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


def test_cache_blocking_only_for_large_models_on_the_cpu(monkeypatch):
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    _train(model, opt, regression_batches(), 1)
    bl = opt._plan.blocking  # 401 elements: no blocking by default - the tensors whole, one run
    assert bl.limit is None and bl.split == [] and bl.runs == [(0, slice(0, 6))]
    assert all(a is b for a, b in zip(bl.params, opt._plan.params))
    monkeypatch.setattr(F, "CPU_CHUNK_NUMEL", 40)
    monkeypatch.setattr(F, "CPU_BLOCKING_MIN_NUMEL", 0)
    opt._plan = None
    _train(model, opt, regression_batches(), 1)
    bl = opt._plan.blocking
    assert bl.limit == 40 and bl.split == [0, 2]  # the two weights of more than 40 elements (96 and 256)
    assert len(bl.params) == 3 + 7 + 4  # 96 -> 3 views, 256 -> 7, four tensors whole


@pytest.mark.skipif(not F.FOREACH_RSQRT, reason="torch < 2.8 has no _foreach_rsqrt (sqrt is taken)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_square_roots_are_sqrt_to_two_units_in_the_last_place(dtype):
    # on the CPU the square roots of v are taken as 1 / rsqrt(v) (torch's sqrt is slow on zeros
    # and subnormals): exact at 0 and inf, within two units in the last place elsewhere
    g = torch.Generator().manual_seed(0)
    tiny = torch.finfo(dtype).tiny
    v = torch.rand(8192, generator=g, dtype=dtype) * 10.0 ** torch.randint(-40, 30, (8192,), generator=g).to(dtype)
    v[::5] = 0.0
    v[1::97] = tiny / 8  # subnormal
    v[2::101] = math.inf
    assert F.reciprocal_roots([v])
    expected = torch.sqrt(v)
    for inplace in (False, True):
        x = v.clone()
        out = F.foreach_sqrt([x], inplace=inplace)[0]
        assert (out is x) == inplace
        assert torch.equal(out[v == 0], expected[v == 0]) and torch.equal(out[v.isinf()], expected[v.isinf()])
        finite = v.isfinite() & (v > 0)
        ulp = torch.nextafter(expected, torch.tensor(math.inf, dtype=dtype)) - expected
        assert ((out - expected).abs()[finite] <= 2 * ulp[finite]).all()
        assert (out == expected)[finite].float().mean() > 0.5
    # elsewhere, and when told so: torch.sqrt itself
    assert not F.reciprocal_roots([v.half()]) and not F.reciprocal_roots([])
    assert torch.equal(F.foreach_sqrt([v], reciprocal=False)[0], expected)
    x = v.clone()
    assert F.foreach_sqrt([x], reciprocal=False, inplace=True)[0] is x and torch.equal(x, expected)


@pytest.mark.skipif(not F.FOREACH_RSQRT, reason="torch < 2.8 has no _foreach_rsqrt (sqrt is taken)")
def test_the_update_with_reciprocal_roots_matches_the_plain_update():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(4096, generator=g) * 10.0 ** torch.randint(-30, 2, (4096,), generator=g).float()
    v[::3] = 0.0  # unused rows: v = 0 and m = 0
    m = torch.randn(4096, generator=g) * v.sqrt()
    p = torch.randn(4096, generator=g)
    results = []
    for reciprocal in (True, False):
        bucket = F.Bucket(group=0, indices=[0], params=[p.clone()], exp_avgs=[m.clone()], exp_avg_sqs=[v.clone()],
                          lr=1e-3, weight_decay=0.1, eps=1e-8, beta1=0.9, beta2=0.999, step=7)
        bucket.split(None)
        assert bucket.runs[0][3]  # CPU float32
        bucket.runs = [run[:3] + (reciprocal,) + run[4:] for run in bucket.runs]
        F.foreach_update([bucket], torch.tensor([1.3]), torch.tensor([0.8]))
        results.append(bucket.params[0])
    assert torch.equal(results[0][::3], results[1][::3])
    torch.testing.assert_close(results[0], results[1], rtol=2e-7, atol=0)


def test_cosine_statistic_is_finite_and_exact_with_beta1_zero():
    # beta1 = 0 makes m = g: cos(g, m) = 1 (the carried-norm identity must not divide by beta1)
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), betas=(0.0, 0.999), **small_kwargs())
    _train(model, opt, regression_batches(), 3)
    torch.testing.assert_close(opt._stats["cos"], torch.ones_like(opt._stats["cos"]), rtol=0, atol=1e-5)
    assert torch.isfinite(opt.multipliers.alpha).all()


def test_cache_blocking_with_frozen_tensors_param_groups_and_skipped_refreshes(monkeypatch):
    # blocked runs over a subset of tensors (one frozen), two param groups with their own betas,
    # multipliers reused between refreshes: still exactly AdamW with zero ranges
    monkeypatch.setattr(F, "CPU_CHUNK_NUMEL", 40)
    monkeypatch.setattr(F, "CPU_BLOCKING_MIN_NUMEL", 0)
    batches = regression_batches()
    ref_model, model = mlp(0), mlp(0)

    def groups(m):
        named = list(m.named_parameters())
        m[0].bias.requires_grad_(False)
        return [{"params": [p for n, p in named if n.endswith("weight")], "param_names": [n for n, _ in named if n.endswith("weight")]},
                {"params": [p for n, p in named if n.endswith("bias")], "param_names": [n for n, _ in named if n.endswith("bias")],
                 "betas": (0.8, 0.99), "weight_decay": 0.0}]

    ref = torch.optim.AdamW(groups(ref_model), lr=1e-2, weight_decay=0.05)
    opt = MetaAdamW(groups(model), lr=1e-2, weight_decay=0.05, alpha_range=0.0, beta_range=0.0, refresh_every=3,
                    **small_kwargs())
    for t in range(12):
        _train(ref_model, ref, batches[t % 4:], 1)
        _train(model, opt, batches[t % 4:], 1)
    assert opt._plan.blocking.limit == 40 and opt._plan.index_tensor is not None
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


def test_betas_changed_during_training_reach_the_statistics():
    # a scheduler may change betas, also at every step (OneCycleLR's momentum cycling): the
    # carried-norm identities must use the new ones
    batches = lm_batches()
    models = [TinyTransformer(), TinyTransformer()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [MetaAdamW(m.named_parameters(), foreach=f, modulator_heads=1, **small_kwargs())
            for m, f in zip(models, (True, False))]
    opts[1].modulator.load_state_dict(opts[0].modulator.state_dict())
    for t in range(9):
        if t >= 3:  # once, then at every step
            for opt in opts:
                opt.param_groups[0]["betas"] = (0.5 + 0.05 * (t - 3), 0.9)
        _same_gradients(models, batches[t % 3], lm_loss)
        for opt in opts:
            opt.step()
        torch.testing.assert_close(opts[0]._stats["cos"], opts[1]._stats["cos"], rtol=5e-5, atol=1e-5)
        torch.testing.assert_close(opts[0]._stats["v_norm"], opts[1]._stats["v_norm"], rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [0.0, 1e-7, 1e-4, 1e-2, 1.0])
def test_fast_cos_feature_with_small_or_zero_gradients_is_never_worse_than_zero(scale):
    # the foreach path gets <g, m> from norms (an identity whose terms cancel when ||g|| << ||m||);
    # it must give 0 for a zero gradient (zero_grad(set_to_none=False), unused branches) like the
    # direct reference, and never a value further from the reference than 0 is
    g = torch.Generator().manual_seed(3)
    models = [mlp(0), mlp(0)]
    opts = [MetaAdamW(m.named_parameters(), foreach=fe, **small_kwargs()) for m, fe in zip(models, (True, False))]
    for t in range(6):
        grads = [torch.randn(p.shape, generator=g) * (scale if t == 5 else 1.0) for p in models[0].parameters()]
        for m, o in zip(models, opts):
            for p, gr in zip(m.parameters(), grads):
                p.grad = gr.clone()
            o.step()
    fast, ref = opts[0]._stats["cos"], opts[1]._stats["cos"]
    if scale == 0.0:
        assert fast.eq(0).all() and ref.eq(0).all()
    assert ((fast - ref).abs() <= ref.abs() + 1e-3).all(), (fast, ref)
    if scale == 1.0:  # ||g|| ~ ||m||: the two paths agree
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("refresh_every", [1, 3])
def test_frozen_parameters_get_no_moments_whatever_refresh_every(refresh_every):
    # AdamW allocates no state for parameters that never get a gradient (a frozen backbone passed in
    # model.parameters()); neither may MetaAdamW, also on the steps that recompute the carried norms
    model = mlp(0)
    frozen = model[0].weight
    frozen.requires_grad_(False)
    opt = MetaAdamW(model.named_parameters(), refresh_every=refresh_every, **small_kwargs())
    twin = mlp(0)
    twin[0].weight.requires_grad_(False)
    ref = MetaAdamW(twin.named_parameters(), refresh_every=refresh_every, foreach=False, **small_kwargs())
    ref.modulator.load_state_dict(opt.modulator.state_dict())
    _train(model, opt, regression_batches(), 7)
    _train(twin, ref, regression_batches(), 7)
    with_moments = [p for p in model.parameters() if "exp_avg" in opt.state.get(p, {})]
    assert all(p is not frozen for p in with_moments) and len(with_moments) == len(list(model.parameters())) - 1
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", [True, False])
def test_zero_ranges_match_torch_adamw_in_float64(foreach):
    # AdamW's scalars are Python floats: in float64 MetaAdamW's per-bucket scalars must not be
    # rounded to float32 (that drifted by ~5e-6 relative over 300 steps)
    batches = [tuple(t.double() for t in b) for b in regression_batches()]
    ref_model, model = mlp(0).double(), mlp(0).double()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.05, foreach=True)
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.05, alpha_range=0.0, beta_range=0.0,
                    foreach=foreach, **small_kwargs())
    _train(ref_model, ref, batches, 300)
    _train(model, opt, batches, 300)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("foreach", [True, False])
def test_the_weight_decay_of_a_float64_model_takes_alpha_times_beta_in_float64(foreach):
    # the fast update multiplied alpha * beta in float32 before its float64 scalars (2.3e-9 off here)
    torch.manual_seed(0)
    p = nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = MetaAdamW([p], lr=0.1, weight_decay=1.0, grouping="original", foreach=foreach, modulator_layers=1,
                    modulator_heads=1)
    randomise_head(opt)
    p.grad = torch.zeros_like(p)  # m = v = 0: the step is the decoupled decay alone
    opt.step()
    alpha, beta = opt.multipliers.alpha[0].double(), opt.multipliers.beta[0].double()
    assert abs(float(p[0]) - float(1 - 0.1 * alpha * beta)) <= 2e-16


@pytest.mark.parametrize("lr, eps, grad", [(1e-5, 1e-4, [1.0, 0.01]), (1e-3, 1e-7, [1.0, 0.0])])
@pytest.mark.parametrize("chunk", [None, 1])
def test_zero_ranges_match_torch_adamw_in_float16(lr, eps, grad, chunk, monkeypatch):
    # the fast update folded the whole step into its denominator, sqrt(v) / (lr alpha): in float16
    # (at most 65504) it overflowed to inf once |g| > 65504 lr, and the element stopped moving after
    # 7 steps; its eps * sqrt(1 - beta2^t) rounded to 0, so an element with g = 0 gave 0 / 0 = NaN
    # (and a run of tensors cut for cache blocking, mixed with float32 tensors, must do the same)
    if chunk:
        monkeypatch.setattr(F, "CPU_BLOCKING_MIN_NUMEL", 1)
        monkeypatch.setattr(F, "CPU_CHUNK_NUMEL", chunk)
    results = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=lr, eps=eps, weight_decay=0.1),
                 lambda ps: MetaAdamW(ps, lr=lr, eps=eps, weight_decay=0.1, alpha_range=0.0, beta_range=0.0,
                                      grouping="original")):
        half = nn.Parameter(torch.full((len(grad),), 0.01, dtype=torch.float16))
        single = nn.Parameter(torch.full((3,), 0.5))
        opt = make([half, single])
        for _ in range(50):
            half.grad = torch.tensor(grad, dtype=torch.float16)
            single.grad = torch.tensor([1.0, -2.0, 0.0])
            opt.step()
        results.append((half.detach().clone(), single.detach().clone()))
    (ref_half, ref_single), (half, single) = results
    assert torch.isfinite(half).all() and abs(float(half[0]) - 0.01) > 1e-4, "the float16 tensor moved"
    torch.testing.assert_close(half, ref_half, rtol=0, atol=0)
    torch.testing.assert_close(single, ref_single, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach, dtype", [(True, torch.float16), (False, torch.float16), (False, torch.bfloat16)])
def test_zero_ranges_match_torch_adamw_in_low_precision_with_large_gradients(foreach, dtype):
    # the single-tensor update divided v by 1 - beta2^t before the square root: in float16 that is
    # about g^2, inf once |g| > 256, and the element stopped moving (AdamW takes sqrt(v) / sqrt(bc2)).
    # Both updates rounded m / denom and its product with the step size to the tensor's dtype, where
    # AdamW's addcdiv takes them in float32 and rounds once: float16 or bfloat16 ulps apart in 50 steps
    results = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-3, eps=1e-7, weight_decay=0.1, foreach=foreach),
                 lambda ps: MetaAdamW(ps, lr=1e-3, eps=1e-7, weight_decay=0.1, alpha_range=0.0, beta_range=0.0,
                                      grouping="original", foreach=foreach, **small_kwargs())):
        low = nn.Parameter(torch.full((3,), 0.01, dtype=dtype))
        wide = nn.Parameter(torch.full((2,), 0.5, dtype=torch.float64))
        single = nn.Parameter(torch.full((2,), 0.5))
        opt = make([low, wide, single])
        for t in range(50):
            low.grad = torch.tensor([1000.0, -300.0 + t, 0.5], dtype=dtype)
            wide.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
            single.grad = torch.tensor([1.0, -2.0])
            opt.step()
        results.append((low.detach().clone(), wide.detach().clone(), single.detach().clone()))
    (ref_low, ref_wide, ref_single), (low, wide, single) = results
    assert abs(float(low[0]) - 0.01) > 0.04, "the element with the large gradient moved as in AdamW"
    torch.testing.assert_close(low, ref_low, rtol=0, atol=0)
    torch.testing.assert_close(wide, ref_wide, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(single, ref_single, rtol=1e-6, atol=1e-7)


def test_the_float16_update_widens_a_bounded_number_of_elements_at_once(monkeypatch):
    # the float16 update took m and its denominator in float32 for the whole run at once: a bucket's (on an
    # accelerator runs are not cut) float32 copies of every tensor together, 14 bytes per element at the peak
    def run(chunk):
        monkeypatch.setattr(F, "NARROW_CHUNK_NUMEL", chunk, raising=False)
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(n, dtype=torch.float16)) for n in (1000, 1000, 3000, 1000, 10)]
        opt = MetaAdamW(params, lr=1e-2, weight_decay=0.1, grouping="original", **small_kwargs())
        live, peak, widened = [], [0], F.widened

        def tracked(t):
            out = widened(t)
            if out is not t:
                live.append(weakref.ref(out))
                peak[0] = max(peak[0], sum(r().numel() for r in live if r() is not None))
            return out

        monkeypatch.setattr(F, "widened", tracked)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=g) * 300).half()
            opt.step()
        monkeypatch.setattr(F, "widened", widened)
        return [p.detach().clone() for p in params], peak[0]

    whole, whole_peak = run(10**9)
    chunked, chunked_peak = run(1500)
    assert whole_peak == 2 * 6010  # m and the denominator of every tensor: one run
    assert chunked_peak <= 2 * 1500  # (the 3000-element tensor in flat views of 1500)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same update, taken in pieces


@pytest.mark.parametrize("features", ["basic", "basic_plus", "enhanced", "norm_basic", "norm_basic_plus"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_gradient_spoils_only_its_own_elements_as_in_adamw(features, bad):
    # the encoder attends across groups: one group's inf or NaN statistics made every group's
    # multipliers NaN, and every parameter of the model NaN in one step (AdamW: only the element)
    runs = {}
    for name, make in (("adamw", lambda groups: torch.optim.AdamW(groups, lr=1e-2)),
                       ("zero", lambda groups: MetaAdamW(groups, lr=1e-2, alpha_range=0.0, beta_range=0.0,
                                                         grouping="original", features=features, modulator_heads=1)),
                       ("meta", lambda groups: MetaAdamW(groups, lr=1e-2, grouping="original", features=features,
                                                         modulator_heads=1))):
        torch.manual_seed(0)
        a, b, c = (nn.Parameter(torch.ones(3)) for _ in range(3))
        opt = make([{"params": [a]}, {"params": [b]}, {"params": [c]}])
        for step in range(3):
            a.grad = torch.tensor([1.0, bad if step == 1 else 1.0, 1.0])
            b.grad, c.grad = torch.full((3,), 0.5), torch.full((3,), -2.0)
            opt.step()
        runs[name] = (a.detach().clone(), b.detach().clone(), c.detach().clone(), opt)
    assert runs["adamw"][0][1].isnan() and torch.isfinite(runs["adamw"][0][[0, 2]]).all()
    for x, y in zip(runs["zero"][:3], runs["adamw"][:3]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, equal_nan=True)
    a, b, c, opt = runs["meta"]
    assert a[1].isnan() and torch.isfinite(a[[0, 2]]).all() and torch.isfinite(b).all() and torch.isfinite(c).all()
    assert torch.isfinite(opt.multipliers.alpha).all() and torch.isfinite(opt.multipliers.beta).all()
    assert not torch.equal(b, runs["adamw"][1]), "the modulator still modulates the other groups"


@pytest.mark.parametrize("features", ["basic", "basic_plus", "enhanced", "norm_basic", "norm_basic_plus"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_gradient_leaves_the_other_groups_features_as_they_were(features, bad):
    # the group means are one matrix product over every tensor: 0 * inf = NaN made the statistic NaN
    # in every group, and the features read 0 there for the rest of training (the inf stays in m and v)
    feats = {}
    for spoiled in (False, True):
        torch.manual_seed(0)
        a, b, c = (nn.Parameter(torch.ones(3)) for _ in range(3))
        opt = MetaAdamW([{"params": [a]}, {"params": [b]}, {"params": [c]}], lr=1e-2, alpha_range=0.0,
                        beta_range=0.0, grouping="original", features=features, modulator_heads=1)
        for step in range(4):
            a.grad = torch.tensor([1.0, bad if spoiled and step == 1 else 1.0, 1.0])
            b.grad, c.grad = torch.full((3,), 0.5), torch.tensor([-2.0, 0.0, 1.0])
            opt.step()
        feats[spoiled] = opt.modulator.features(opt._stats, torch.tensor(0.5))
    assert torch.isfinite(feats[True]).all()
    if features.startswith("norm_"):  # standardised across groups: the spoiled group's outlier moves the others
        assert (feats[True][1:] == 0).sum() <= (feats[False][1:] == 0).sum(), \
            "the other groups' statistics are not erased (read as 0)"
    else:  # per group: the other groups' features are untouched
        torch.testing.assert_close(feats[True][1:], feats[False][1:], rtol=0, atol=0)
    assert not torch.equal(feats[True][0], feats[False][0])


def test_a_float64_default_dtype_changes_nothing():
    # the optimizer's own tensors (layout, statistics, modulator, weighting) are float32 whatever
    # torch's default dtype; with a float64 default, step() and meta_step() crashed on a dtype mismatch
    batches = regression_batches()
    ref_model, model = mlp(0), mlp(0)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.05)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        opt = MetaAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.05, alpha_range=0.0, beta_range=0.0,
                        features="enhanced", gating=True, **small_kwargs())
        _train(model, opt, batches, 2)
        rec = opt.meta_step(model, mse, *batches[:3])
        _train(model, opt, batches, 2)
    finally:
        torch.set_default_dtype(previous)
    _train(ref_model, ref, batches, 2)
    _train(ref_model, ref, batches, 2)
    assert opt.modulator.head.weight.dtype == torch.float32 and opt.weighting.log_vars.dtype == torch.float32
    assert not rec.skipped and math.isfinite(rec.meta_loss)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_options_the_chosen_weighting_ignores_are_named_in_a_warning():
    model = mlp(0)
    with pytest.warns(UserWarning, match=r"priorities=\[1, 3, 5\] are ignored: only weighting='huw_priority'"):
        MetaAdamW(model.named_parameters(), weighting="huw", priorities=[1, 3, 5], **small_kwargs())
    with pytest.warns(UserWarning, match=r"fixed_weights=\[1, 2, 3\] is ignored"):
        MetaAdamW(model.named_parameters(), fixed_weights=[1, 2, 3], **small_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetaAdamW(model.named_parameters(), weighting="fixed", fixed_weights=[1, 2, 3], **small_kwargs())
        MetaAdamW(model.named_parameters(), priorities=[1, 3, 5], **small_kwargs())


@pytest.mark.parametrize("weighting", ["sum", "fixed"])
def test_a_weighting_form_the_weighting_ignores_is_named_in_a_warning(weighting):
    # weighting="sum"/"fixed" with weighting_form="classification" was silently ignored, while ignored
    # priorities and fixed weights are warned about
    model = mlp(0)
    with pytest.warns(UserWarning, match=rf"weighting_form='classification' is ignored: .*\(weighting='{weighting}'\)"):
        MetaAdamW(model.named_parameters(), weighting=weighting, weighting_form="classification", **small_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetaAdamW(model.named_parameters(), weighting=weighting, **small_kwargs())
        MetaAdamW(model.named_parameters(), weighting="huw", weighting_form="classification", **small_kwargs())


def test_ablate_passes_the_weighting_form_only_where_the_weighting_has_one():
    # a trial config always carries weighting_form: the AdamW-arm-like sum/fixed ablations must not warn
    from ablate.config import resolve_config
    from ablate.optim import build_optimizer

    model = mlp(0)
    for weighting in ("sum", "fixed", "huw"):
        config = resolve_config({"task": "etth1", "optimizer": "metaadamw", "weighting": weighting,
                                 "weighting_form": "classification"})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = build_optimizer(config, model)
        assert opt.config["weighting_form"] == ("classification" if weighting == "huw" else "regression")


def test_a_default_device_set_by_the_caller_does_not_move_the_optimizers_tensors():
    # step() and meta_step() make their small tensors on the parameters' device, not on the default
    # device (``torch.set_default_device`` / ``with torch.device(...)``): the same result either way
    def run(default_device):
        torch.manual_seed(0)
        model = TinyTransformer()
        opt = MetaAdamW(model.named_parameters(), model=model, **small_kwargs())
        batches = lm_batches(3)
        with torch.device(default_device):
            for t in range(3):
                opt.zero_grad()
                lm_loss(model, batches[t]).backward()
                if t == 1:
                    opt.meta_step(model, lm_loss, batches[0], batches[1], batches[2])
                opt.step()
        return [p.detach().clone() for p in model.parameters()] + [p.detach().clone() for p in opt.meta_parameters()]
    for a, b in zip(run("cpu"), run("meta")):
        assert a.device.type == "cpu" and torch.equal(a, b)


def test_accepts_every_argument_of_torch_adamw_by_the_same_name_and_kind():
    # a drop-in replacement: AdamW call sites (positional amsgrad included) work unchanged
    import inspect
    ours = inspect.signature(MetaAdamW.__init__).parameters
    for name, param in inspect.signature(torch.optim.AdamW.__init__).parameters.items():
        assert name in ours, f"AdamW's {name} is not accepted"
        assert ours[name].kind == param.kind, f"{name}: {ours[name].kind} here, {param.kind} in AdamW"
    model = mlp(0)
    args = dict(maximize=False, foreach=None, capturable=False, differentiable=False, fused=None)
    opt = MetaAdamW(model.parameters(), 1e-2, (0.9, 0.999), 1e-8, 0.05, False, **args, grouping="original",
                    alpha_range=0.0, beta_range=0.0)
    ref_model = mlp(0)
    ref = torch.optim.AdamW(ref_model.parameters(), 1e-2, (0.9, 0.999), 1e-8, 0.05, False, **args)
    batches = regression_batches()
    _train(model, opt, batches, 2)
    _train(ref_model, ref, batches, 2)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@pytest.fixture
def custom_term_objective():
    from metaadamw import OBJECTIVES
    from metaadamw.objectives import MetaObjective

    @OBJECTIVES.register("test_grad_and_val")
    class GradAndVal(MetaObjective):
        terms = ("gradient", "val_loss")
        needs_val = True

        def __call__(self, q):
            return {"gradient": q.loss_val_prime * 0.0, "val_loss": q.loss_val_prime}

    yield "test_grad_and_val"
    OBJECTIVES.remove("test_grad_and_val")


def test_priorities_or_weights_that_cannot_reach_a_custom_objectives_term_are_named(custom_term_objective):
    # they are given for (gradient, loss_decrease, gen_gap): a term of another name was weighted 1.0 silently
    for kwargs in ({"weighting": "fixed", "fixed_weights": [1.0, 0.0, 0.0]},
                   {"weighting": "huw_priority", "priorities": [1.0, 5.0, 5.0]}):
        with pytest.warns(UserWarning, match=r"are given for the terms \('gradient', 'loss_decrease', 'gen_gap'\); "
                                             r"the objective's term\(s\) \['val_loss'\] are not among them"):
            MetaAdamW(mlp(0).named_parameters(), objective=custom_term_objective, **kwargs, **small_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults: nothing to say
        MetaAdamW(mlp(0).named_parameters(), objective=custom_term_objective, weighting="huw_priority", **small_kwargs())


@pytest.mark.parametrize("flag", ["amsgrad", "maximize", "capturable", "differentiable", "fused"])
def test_adamw_flags_other_than_their_defaults_are_refused_by_name(flag):
    with pytest.raises(ValueError, match=f"^{flag}=True is not supported: .*; leave {flag}="):
        MetaAdamW(mlp(0).parameters(), grouping="original", **{flag: True})
    # in a param group too (AdamW honours them per group): never silently ignored
    model = mlp(0)
    weights, biases = [p for p in model.parameters() if p.dim() > 1], [p for p in model.parameters() if p.dim() == 1]
    with pytest.raises(ValueError, match=f"^param group 1: {flag}=True is not supported"):
        MetaAdamW([{"params": weights}, {"params": biases, flag: True}], grouping="original")
    opt = MetaAdamW([{"params": weights}, {"params": biases, flag: False}], grouping="original")  # the default is fine
    # and not kept (torch.compile on CUDA sets a group's capturable key to True, which step() refuses)
    assert not any(key in group for group in opt.param_groups for key in ("amsgrad", "maximize", "capturable",
                                                                          "differentiable", "fused"))


@pytest.mark.parametrize("flag", ["amsgrad", "maximize", "capturable", "differentiable", "fused"])
def test_an_adamw_flag_set_on_a_group_after_construction_is_refused_at_the_next_step(flag):
    # torch.optim.AdamW reads them from the group at every step; MetaAdamW checked them only when the group was
    # given, and went on (minimising, without AMSGrad, without autograd through the step) without a word
    model, batches = mlp(0), regression_batches()
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    _train(model, opt, batches, 2)
    before = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p][k].clone() for p in model.parameters() for k in ("exp_avg", "exp_avg_sq")]
    opt.param_groups[0][flag] = True
    default = None if flag == "fused" else False
    with pytest.raises(ValueError, match=rf"^param group 0: {flag}=True is not supported: .*; leave {flag}={default}"):
        _train(model, opt, batches, 1)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "nothing was updated"
    assert all(torch.equal(a, opt.state[p][k]) for a, (p, k) in
               zip(moments, [(p, k) for p in model.parameters() for k in ("exp_avg", "exp_avg_sq")]))
    opt.param_groups[0][flag] = default  # (AdamW's default, as an AdamW checkpoint's groups have it): trains on
    _train(model, opt, batches, 1)
    assert opt.state_dict()["state"][0]["step"] == 3, "the refused step counted no step"


@pytest.mark.parametrize("key, value, said", [
    ("lr", torch.tensor(1e-2), r"lr as a Tensor is not supported .*: pass a float, e\.g\. lr=0\.01"),
    ("betas", (torch.tensor(0.8), torch.tensor(0.99)), r"betas as Tensors are not supported .*: pass floats"),
])
def test_an_lr_or_betas_set_as_tensors_on_a_group_after_construction_are_refused_at_the_next_step(key, value, said):
    # refused in a group given to the constructor; set later, tensor betas failed with "Expected packed scalar
    # Tensor to be of dimension 1. Got 0 instead." and a tensor lr was taken (read back to the host every step)
    model, batches = mlp(0), regression_batches()
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    _train(model, opt, batches, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match="^param group 0: " + said):
        _train(model, opt, batches, 1)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "nothing was updated"
    opt.param_groups[0][key] = 1e-2 if key == "lr" else (0.8, 0.99)
    _train(model, opt, batches, 1)
    assert opt.state_dict()["state"][0]["step"] == 3, "the refused step counted no step"


def test_a_model_moved_to_another_device_after_the_optimizer_was_built_is_refused_naming_both(monkeypatch):
    # model.to(device) moves the tensors in place; the modulator and statistics stayed where the optimizer was
    # built (on a GPU: torch's mixed-device error from inside step()). Without a GPU the optimizer is told it was
    # built elsewhere (tests/metaadamw/test_cuda.py moves a real model)
    model, batches = mlp(0), regression_batches()
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    _train(model, opt, batches, 1)
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(opt, "device", torch.device("meta"))
    message = r"^the parameters are on cpu, but MetaAdamW was built when they were on meta.*after model.to\(device\)"
    with pytest.raises(RuntimeError, match=message):
        _train(model, opt, batches, 1)
    with pytest.raises(RuntimeError, match=message):
        opt.meta_step(model, mse, None, batches[1], batches[2])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_betas_edited_in_place_are_taken_like_new_ones_and_still_match_adamw():
    # the plan kept the group's betas list itself, so a pair edited in place compared equal to its new value:
    # the moments took the new beta1, the bias corrections kept the old one (4.7e-2 off AdamW after 5 steps)
    batches = regression_batches()
    ref_model, model = mlp(0), mlp(0)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, alpha_range=0.0, beta_range=0.0, **small_kwargs())
    for o in (ref, opt):
        for g in o.param_groups:
            g["betas"] = [0.9, 0.999]  # a list, as AdamW accepts
    _train(ref_model, ref, batches, 3)
    _train(model, opt, batches, 3)
    for o in (ref, opt):
        for g in o.param_groups:
            g["betas"][0] = 0.5
    _train(ref_model, ref, batches[3:] + batches[:3], 5)
    _train(model, opt, batches[3:] + batches[:3], 5)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


def test_repr_shows_the_param_groups_current_values():
    # it showed the constructor's defaults: a scheduler's lr, or per-group values, were not in it
    model = mlp(0)
    named = list(model.named_parameters())
    opt = MetaAdamW([{"params": named[:2]}, {"params": named[2:]}], lr=1e-2, **small_kwargs())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, regression_batches(), 1)
    scheduler.step()
    assert repr(opt).startswith("MetaAdamW(lr=0.005, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.01, groups=6 [")
    opt.param_groups[1]["lr"] = 0.001
    assert "MetaAdamW(lr=[0.005, 0.001] (per param group), betas=(0.9, 0.999)" in repr(opt)


def test_float64_and_low_precision_second_moments_together_give_the_v_norm_they_hold():
    # sum(v) of the bfloat16 moments was read in float32 for every tensor, and float64 ones cannot be narrowed:
    # the first step() raised
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(8, 4, dtype=dtype)) for dtype in (torch.float64, torch.bfloat16, torch.float32)]
    opt = MetaAdamW([{"params": params}], grouping="original", eps=1e-6, **small_kwargs())
    for _ in range(20):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    true = torch.stack([opt.state[p]["exp_avg_sq"].double().sum().sqrt() for p in params]).float()
    torch.testing.assert_close(opt._stats["v_norm"], true, rtol=1e-5, atol=1e-9)


def test_a_param_group_asking_for_adams_coupled_weight_decay_is_refused():
    # torch.optim.AdamW honours decoupled_weight_decay=False per group (Adam's L2 penalty); MetaAdamW applied
    # decoupled decay to it without a word
    model = mlp(0)
    weights, biases = [p for p in model.parameters() if p.dim() > 1], [p for p in model.parameters() if p.dim() == 1]
    with pytest.raises(ValueError, match=r"^param group 1: decoupled_weight_decay=False is not supported: .*Adam's L2"):
        MetaAdamW([{"params": weights}, {"params": biases, "decoupled_weight_decay": False}], grouping="original")
    opt = MetaAdamW([{"params": weights, "decoupled_weight_decay": True}], grouping="original")
    with pytest.raises(ValueError, match=r"^param group 1: decoupled_weight_decay=False"):  # (added later too)
        opt.add_param_group({"params": biases, "decoupled_weight_decay": False, "weight_decay": 0.1})
    assert len(opt.param_groups) == 1
    # without weight decay the two rules are one: accepted
    opt.add_param_group({"params": biases, "decoupled_weight_decay": False, "weight_decay": 0.0})
    # set on a group later, as a script may (AdamW switches to the L2 penalty at its next step): refused there
    opt.param_groups[0]["decoupled_weight_decay"] = False
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^param group 0: decoupled_weight_decay=False is not supported"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    opt.param_groups[0]["weight_decay"] = 0.0
    opt.step()


def test_tensors_moved_between_param_groups_by_hand_are_refused_not_stepped_with_their_old_group():
    # AdamW follows the new groups; MetaAdamW stepped each tensor with its old group's lr (or failed with a
    # bare IndexError when groups were merged)
    model = mlp(0)
    params = list(model.parameters())
    opt = MetaAdamW([{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 0.0}], grouping="original",
                    **small_kwargs())
    _train(model, opt, regression_batches(), 1)
    for regroup in ([{**opt.param_groups[0], "params": params[:1]}, {**opt.param_groups[1], "params": params[1:]}],
                    [{**opt.param_groups[0], "params": params}]):
        groups = opt.param_groups
        opt.param_groups = regroup
        with pytest.raises(RuntimeError, match=r"moved between the optimizer's param_groups by hand \(their sizes "
                                               r"were \[2, 4\], now \[(1, 5|6)\]\): .*Build a new optimizer"):
            opt.step()
        opt.param_groups = groups
    _train(model, opt, regression_batches(), 1)  # as given: it steps again
    assert opt.global_step == 2


def test_sharded_parameters_of_fsdp_are_refused_when_the_optimizer_is_made():
    # FSDP2's DTensors failed later, inside meta_step and step(), with DTensor sharding errors. (A stand-in
    # class of the same name: test_distributed.py makes real ones, with a process group and a device mesh.)
    class DTensor(nn.Parameter):
        pass

    with pytest.raises(ValueError, match=r"sharded or distributed tensors \(DTensor: FSDP's, ZeRO's or tensor parallelism's\), "
                                         r"which it does not support.*Use DistributedDataParallel"):
        MetaAdamW([DTensor(torch.zeros(3))], grouping="original")


def test_parameters_on_the_meta_device_are_refused_until_materialised():
    with torch.device("meta"):
        model = mlp(0)
    with pytest.raises(ValueError, match=r"on the 'meta' device.*model.to_empty\(device=...\)"):
        MetaAdamW(model.named_parameters())


def test_betas_changed_by_a_scheduler_every_step_keep_the_layout_and_match_adamw(monkeypatch):
    # OneCycleLR cycles beta1 at every step: the step takes the new betas (bias corrections, the
    # statistics' constants) without rebuilding its layout, and with zero ranges is still AdamW
    batches = regression_batches()
    ref_model, model = mlp(0), mlp(0)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.05)
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.05, alpha_range=0.0, beta_range=0.0,
                    **small_kwargs())
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=40, cycle_momentum=True)
                  for o in (ref, opt)]
    builds, made = [], []
    real_make, real_tensor = opt._make_plan, torch.tensor
    monkeypatch.setattr(opt, "_make_plan", lambda active: builds.append(1) or real_make(active))
    for t in range(30):
        if t == 1:  # after the first step, only host staging tensors (no blocking copies on CUDA)
            monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(k.get("device")) or real_tensor(*a, **k))
        _train(ref_model, ref, batches[t % 4:], 1)
        _train(model, opt, batches[t % 4:], 1)
        for s in schedulers:
            s.step()
    monkeypatch.undo()
    assert opt.param_groups[0]["betas"][0] != 0.95  # the scheduler did move beta1
    assert len(builds) == 1, "the layout must not be rebuilt when only the betas change"
    assert made and set(made) == {"cpu"}
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
