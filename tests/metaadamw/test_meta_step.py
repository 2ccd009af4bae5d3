"""The meta-update: correctness properties the paper's public code gets wrong, each tested."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from metaadamw import OBJECTIVES, MetaAdamW
from metaadamw.objectives import MetaObjective
from metaadamw.weighting import LOG_VAR_BOUND, PriorityUncertainty
from tests.metaadamw.helpers import (TinyConvNet, TinyTransformer, conv_batches, conv_loss, lm_batches, lm_loss, mlp,
                                     mse, regression_batches, small_kwargs)


def _step(model, opt, batch, loss_fn=mse):
    opt.zero_grad()
    loss_fn(model, batch).backward()
    opt.step()


def _snapshot(model):
    return ([p.detach().clone() for p in model.parameters()], [b.clone() for b in model.buffers()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


def _assert_same(model, snap):
    params, buffers, grads = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q)
    for b, c in zip(model.buffers(), buffers):
        assert torch.equal(b, c)
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


def _meta_state(opt):
    return [p.detach().clone() for p in opt.meta_parameters()]


def _changed(before, opt):
    return [not torch.equal(a, b.detach()) for a, b in zip(before, opt.meta_parameters())]


def test_model_parameters_buffers_and_grads_are_exactly_as_before():
    model = TinyConvNet().train()
    opt = MetaAdamW(model.named_parameters(), model=model, **small_kwargs())
    batches = conv_batches()
    _step(model, opt, batches[0], conv_loss)
    conv_loss(model, batches[1]).backward()  # leave some .grad behind, as a user might
    snap = _snapshot(model)
    record = opt.meta_step(model, conv_loss, *batches)
    _assert_same(model, snap)
    assert not record.skipped and set(record.terms) == {"gradient", "loss_decrease", "gen_gap"}


@pytest.mark.parametrize("meta_gradient", ["exact", "finite_difference"])
def test_meta_step_counts_forward_passes_and_uses_one_validation_batch(meta_gradient):
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), meta_gradient=meta_gradient, **small_kwargs())
    b1, b2, val = regression_batches(3)
    seen = []

    def counting_loss(m, batch):
        seen.append(id(batch))
        return mse(m, batch)

    _step(model, opt, b1)
    opt.meta_step(model, counting_loss, b1, b2, val)
    # batch1 at theta, batch2 at theta' (and at theta' + eps v for the finite difference),
    # val at theta' and at theta
    assert len(seen) == (4 if meta_gradient == "exact" else 5)
    assert seen.count(id(val)) == 2 and seen.count(id(b1)) == 1
    assert seen.count(id(b2)) == (1 if meta_gradient == "exact" else 2)


def test_beta_receives_meta_gradient():
    # the paper's code turns beta into a Python float: its head row would never move
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), weight_decay=0.5, objective="loss_decrease", weighting="sum",
                    meta_lr=1.0, **small_kwargs())
    _step(model, opt, regression_batches()[0])
    w_before = opt.modulator.head.weight.detach().clone()
    opt.meta_step(model, mse, *regression_batches(3))
    moved = (opt.modulator.head.weight.detach() - w_before).abs().sum(1)
    assert moved[0] > 0 and moved[1] > 0, f"alpha and beta rows must both move, moved {moved.tolist()}"


def test_generalization_gap_trains_the_modulator_and_leaves_grad_alone():
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), objective="gen_gap", weighting="sum", meta_lr=1.0, **small_kwargs())
    _step(model, opt, regression_batches()[0])
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = _meta_state(opt)
    record = opt.meta_step(model, mse, *regression_batches(3))
    assert record.terms["gen_gap"] > 0
    assert any(_changed(before, opt)), "gen_gap must give the modulator a gradient"
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


def _recording_loss(store, marker):
    def loss_fn(m, batch):
        if batch is marker:
            store.append([p.detach().clone() for p in m.parameters()])
        return mse(m, batch)
    return loss_fn


@pytest.mark.parametrize("stepped", [False, True])
def test_hypothetical_step_is_one_real_step_on_the_batch1_gradient(stepped):
    # theta' must use the batch-1 gradient for the new moments (paper Algorithm 2), and must work
    # before the first step() (empty state)
    b0, b1, b2, val = regression_batches(4)
    models = [mlp(0), mlp(0)]
    opts = [MetaAdamW(m.named_parameters(), weight_decay=0.1, **small_kwargs()) for m in models]
    opts[1].modulator.load_state_dict(opts[0].modulator.state_dict())
    with torch.no_grad():
        for o in opts:
            o.modulator.head.bias.copy_(torch.tensor([1.5, -2.0, 0.0, 0.0]))  # alpha, beta far from 1
    if stepped:
        for m, o in zip(models, opts):
            _step(m, o, b0)
    seen = []
    opts[0].meta_step(models[0], _recording_loss(seen, b2), b1, b2, val)
    _step(models[1], opts[1], b1)  # the real step the hypothetical one must equal
    for hyp, real in zip(seen[0], models[1].parameters()):
        torch.testing.assert_close(hyp, real.detach(), rtol=1e-5, atol=1e-6)


def test_hypothetical_step_of_a_float64_model_keeps_a_small_weight_decay():
    # step() computes its scalars in float64 for float64 parameters; theta' did so in float32, where
    # 1 - lr wd alpha beta rounds to 1 below ~3e-8: the update lost its weight decay (2-4% off here)
    b0, b1, b2, val = [tuple(t.double() for t in b) for b in regression_batches(4)]
    models = [mlp(0).double(), mlp(0).double()]
    opts = [MetaAdamW(m.named_parameters(), lr=1e-7, weight_decay=0.1, **small_kwargs()) for m in models]
    opts[1].modulator.load_state_dict(opts[0].modulator.state_dict())
    for m, o in zip(models, opts):
        _step(m, o, b0)
    before = [p.detach().clone() for p in models[1].parameters()]
    seen = []
    opts[0].meta_step(models[0], _recording_loss(seen, b2), b1, b2, val)
    _step(models[1], opts[1], b1)
    for hyp, real, start in zip(seen[0], models[1].parameters(), before):
        update = real.detach() - start
        assert (hyp - start - update).abs().max() <= 1e-6 * update.abs().max()


def test_hypothetical_step_of_a_float16_model_with_large_gradients_is_the_steps():
    # step() takes AdamW's order for float16 (sqrt(v) / sqrt(bc2)); theta' divided v by bc2 first,
    # which overflows float16 once |g| > 256: the Adam direction of those elements was 0, not +-1
    torch.manual_seed(0)
    x, y = torch.randn(8, 4).half(), (torch.randn(8, 1) * 2000).half()
    b1 = (x, y)

    def loss_fn(m, batch):
        return ((m(batch[0]).float() - batch[1].float()) ** 2).mean()

    models = [nn.Linear(4, 1).half() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [MetaAdamW(m.named_parameters(), lr=1e-2, grouping="original", **small_kwargs()) for m in models]
    opts[1].modulator.load_state_dict(opts[0].modulator.state_dict())
    seen = []

    def recording(m, batch):
        if batch is b2:
            seen.append([p.detach().clone() for p in m.parameters()])
        return loss_fn(m, batch)

    b2 = (x.clone(), y.clone())
    opts[0].meta_step(models[0], recording, b1, b2, b1)
    _step(models[1], opts[1], b1, loss_fn)
    assert max(p.grad.abs().max().item() for p in models[1].parameters()) > 256
    for hyp, real in zip(seen[0], models[1].parameters()):
        torch.testing.assert_close(hyp.float(), real.detach().float(), rtol=0, atol=2e-3)


@pytest.mark.parametrize("foreach", [True, False])
def test_hypothetical_step_of_a_float16_model_takes_its_direction_in_float32_as_the_step(foreach):
    # step() takes m / denom times the step in float32 and rounds once (AdamW's addcdiv); theta' rounded the
    # direction to float16 first, and 70 of this layer's 1,024 weights were a float16 ulp from the step's
    torch.manual_seed(0)
    x, y = torch.randn(32, 64).half(), torch.randn(32, 16).half()
    b0, b1 = (torch.randn(32, 64).half(), torch.randn(32, 16).half()), (x, y)

    def loss_fn(m, batch):
        return ((m(batch[0]).float() - batch[1].float()) ** 2).mean()

    models = [nn.Linear(64, 16).half() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [MetaAdamW(m.named_parameters(), lr=1e-2, eps=1e-4, grouping="original", foreach=foreach,
                      **small_kwargs()) for m in models]
    opts[1].modulator.load_state_dict(opts[0].modulator.state_dict())
    for m, o in zip(models, opts):
        for _ in range(3):
            _step(m, o, b0, loss_fn)
    seen = []
    b2 = (x.clone(), y.clone())

    def recording(m, batch):
        if batch is b2:
            seen.append([p.detach().clone() for p in m.parameters()])
        return loss_fn(m, batch)

    opts[0].meta_step(models[0], recording, b1, b2, b1)
    _step(models[1], opts[1], b1, loss_fn)
    for hyp, real in zip(seen[0], models[1].parameters()):
        torch.testing.assert_close(hyp, real.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("meta_gradient", ["exact", "finite_difference"])
def test_the_gradient_alignment_of_a_float16_model_sums_its_squares_in_float32(meta_gradient):
    # ||g'||^2 and <g, g'> came from torch.dot in float16, inf once a gradient's norm passes 256:
    # the meta-loss was inf and every meta-update skipped, where the same model in float32 trains
    torch.manual_seed(0)
    batches = [(torch.randn(32, 8), torch.randn(32, 1) * 1000) for _ in range(3)]

    def loss_fn(m, batch):
        return ((m(batch[0]).float() - batch[1]) ** 2).mean()

    records = []
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
        opt = MetaAdamW(model.named_parameters(), eps=1e-4, objective="gradient", meta_gradient=meta_gradient,
                        **small_kwargs())
        bs = [(x.to(dtype), y) for x, y in batches]
        loss_fn(model, bs[0]).backward()
        assert max(p.grad.float().norm() for p in model.parameters()) > 256
        records.append(opt.meta_step(model, loss_fn, None, bs[1], bs[2]))
    want, got = records
    assert not got.skipped, got.reason
    assert got.meta_loss == pytest.approx(want.meta_loss, rel=1e-2)


@pytest.mark.parametrize("meta_gradient", ["exact", "finite_difference"])
def test_the_weighting_of_a_float16_models_loss_terms_runs_in_float32(meta_gradient):
    # the generalisation gap of a float16 model's loss came in float16, and the weighting's maths with it:
    # 0.5 exp(-s) L overflowed float16 for a gap of ~124 at s = -8 (a term that was small for a while), the
    # meta-loss was inf, the meta-update skipped - and s, not stepped, kept it so as long as the gap stayed
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 1) * 6
    train, val = (x[:8], y[:8]), (x[8:], y[8:] + 14)
    records, log_vars = [], []
    for dtype in (torch.float32, torch.float16):
        def loss_fn(m, batch):
            return ((m(batch[0].to(dtype)) - batch[1].to(dtype)) ** 2).mean()  # a float16 loss for float16

        torch.manual_seed(0)
        model = nn.Linear(4, 1).to(dtype)
        opt = MetaAdamW(model.named_parameters(), objective="gen_gap", weighting="huw", grouping="original",
                        meta_gradient=meta_gradient, **small_kwargs())
        with torch.no_grad():
            opt.weighting.log_vars.fill_(-8.0)
        records.append(opt.meta_step(model, loss_fn, train, train, val))
        log_vars.append(opt.weighting.log_vars.item())
    want, got = records
    assert 0.5 * math.exp(8.0) * got.terms["gen_gap"] > torch.finfo(torch.float16).max  # (beyond float16's range)
    assert not got.skipped, got.reason
    assert got.meta_loss == pytest.approx(want.meta_loss, rel=1e-2)
    assert log_vars[1] == pytest.approx(log_vars[0], abs=1e-3) and log_vars[1] != -8.0


def test_the_validation_loss_at_theta_prime_takes_the_masks_of_that_at_theta():
    # loss_decrease = L(theta'; val) - L(theta; val): with other dropout masks in the second pass it
    # measured the masks' difference (7e-3 with lr 1e-9, where theta' is theta to 1e-9)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 1))
    batch = regression_batches(1, size=64)[0]
    for meta_gradient, batch1 in (("finite_difference", batch), ("exact", None)):
        opt = MetaAdamW(model.named_parameters(), lr=1e-9, meta_gradient=meta_gradient, **small_kwargs())
        model.zero_grad()
        mse(model, batch).backward()
        record = opt.meta_step(model, mse, batch1, batch, batch)
        assert abs(record.terms["loss_decrease"]) < 1e-6, (meta_gradient, record.terms)
        assert record.terms["gradient"] != 0


def test_feature_gates_are_trained():
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), gating=True, gate_l1=0.1, meta_lr=0.5, **small_kwargs())
    _step(model, opt, regression_batches()[0])
    before = opt.modulator.gate.logits.detach().clone()
    opt.meta_step(model, mse, *regression_batches(3))
    assert not torch.equal(before, opt.modulator.gate.logits.detach())
    assert opt.modulator.gate.logits in set(opt.meta_optimizer.param_groups[0]["params"])


def test_enhanced_group_embeddings_are_trained():
    model = mlp(0)
    with pytest.warns(UserWarning):
        opt = MetaAdamW(model.named_parameters(), features="enhanced", meta_lr=0.5, modulator_init="zero",
                        **small_kwargs())
    _step(model, opt, regression_batches()[0])
    before = opt.modulator.extractor.embedding.detach().clone()
    opt.meta_step(model, mse, *regression_batches(3))
    # a zero output head (alpha = beta = 1) passes no gradient down: the first update moves only the head
    assert torch.equal(before, opt.modulator.extractor.embedding.detach())
    opt.meta_step(model, mse, *regression_batches(3))
    assert not torch.equal(before, opt.modulator.extractor.embedding.detach())


def test_param_groups_out_of_model_order_and_before_first_step():
    model = mlp(0)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n.endswith("bias")], "param_names": [n for n, _ in named if n.endswith("bias")],
         "weight_decay": 0.0},
        {"params": [p for n, p in named if n.endswith("weight")],
         "param_names": [n for n, _ in named if n.endswith("weight")]},
    ]
    opt = MetaAdamW(groups, **small_kwargs())
    record = opt.meta_step(model, mse, *regression_batches(3))  # before any step()
    assert not record.skipped and len(record.alpha) == len(opt.group_names)
    _step(model, opt, regression_batches()[0])
    assert not opt.meta_step(model, mse, *regression_batches(3)).skipped


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_meta_step_through_nn_transformer_encoder_layers(mode):
    # the fused CPU attention kernels cannot be double-differentiated; meta_step must still work
    model = TinyTransformer(dropout=0.1)
    getattr(model, mode)()
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    batches = lm_batches()
    _step(model, opt, batches[0], lm_loss)
    before = _meta_state(opt)
    record = opt.meta_step(model, lm_loss, *batches)
    assert not record.skipped and all(math.isfinite(v) for v in record.terms.values())
    assert any(_changed(before, opt))
    assert model.training == (mode == "train")


def test_meta_step_on_an_lstm_uses_the_hypothetical_weights():
    # nn.LSTM caches flat weights; the swapped-in theta' must really be used
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)
            self.fc = nn.Linear(4, 1)

        def forward(self, x):
            return self.fc(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    model = Net()
    opt = MetaAdamW(model.named_parameters(), objective="loss_decrease", weighting="sum", meta_lr=1.0,
                    **small_kwargs())
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 6, 3, generator=g), torch.randn(5, 1, generator=g)) for _ in range(3)]
    record = opt.meta_step(model, mse, *batches)
    assert record.terms["loss_decrease"] != 0.0, "theta' must change the LSTM's output"


@pytest.fixture
def negative_objective():
    @OBJECTIVES.register("test_always_negative")
    class AlwaysNegative(MetaObjective):
        terms = ("loss_decrease",)
        signed_terms = frozenset({"loss_decrease"})
        needs_val = True

        def __call__(self, q):
            return {"loss_decrease": q.loss_val_prime - q.loss_val - 1.0}

    yield "test_always_negative"
    OBJECTIVES.remove("test_always_negative")


@pytest.mark.parametrize("form", ["regression", "classification"])
def test_2000_meta_updates_with_a_persistently_negative_term_stay_finite_and_bounded(negative_objective, form):
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = MetaAdamW(model.named_parameters(), grouping="original", objective=negative_objective,
                    weighting="huw_priority", weighting_form=form, meta_lr=0.05, modulator_layers=1, modulator_ff=4,
                    modulator_heads=1)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 2, generator=g), torch.randn(4, 1, generator=g)) for _ in range(3)]
    for _ in range(2000):
        record = opt.meta_step(model, mse, *batches)
        assert record.terms["loss_decrease"] < 0
    s = opt.weighting.log_vars.detach()
    assert torch.isfinite(s).all() and s.abs().max() <= LOG_VAR_BOUND  # (projected after every meta-update)
    assert all(torch.isfinite(p).all() for p in opt.meta_parameters())
    assert opt.meta_skipped == 0 and math.isfinite(record.meta_loss) and 0 < record.sigmas["loss_decrease"] < 1e3


def test_a_log_variance_at_its_bound_comes_back_when_its_term_grows():
    # a clamp in the forward pass alone gave an s beyond the bound zero gradient for good: after a
    # tiny term had pushed it past -10, the term kept the weight e^10 / 2 whatever it became
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = MetaAdamW(model.named_parameters(), grouping="original", weighting="huw_priority", meta_lr=0.05,
                    **small_kwargs(modulator_heads=1))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 2, generator=g), torch.randn(4, 1, generator=g)) for _ in range(3)]
    opt.zero_grad()
    mse(model, batches[0]).backward()
    opt.step()
    with torch.no_grad():
        opt.weighting.log_vars.copy_(torch.tensor([-10.3, 10.2, -12.0]))  # as a checkpoint of an older version
    opt.meta_step(model, mse, *batches)
    s = opt.weighting.log_vars.detach()
    assert s.abs().max() <= LOG_VAR_BOUND and (s.abs() < LOG_VAR_BOUND).any()  # projected, and moved off the bound
    assert s[2] > -LOG_VAR_BOUND  # the gen-gap term is not ~0, so its s rises from the bound


@pytest.mark.parametrize("form", ["regression", "classification"])
def test_uncertainty_weighting_of_a_negative_term_has_a_finite_optimum(form):
    w = PriorityUncertainty(("loss_decrease",), {"loss_decrease"}, priorities=[1, 2, 1], form=form)
    sgd = torch.optim.SGD(w.parameters(), lr=0.5)
    term = torch.tensor(-3.0)
    for _ in range(2000):
        sgd.zero_grad()
        w({"loss_decrease": term})[0].backward()
        sgd.step()
    # optimum of exp(-s) softplus(L) + p s: s* = log(softplus(L) / p)
    expected = math.log(math.log1p(math.exp(-3.0)) / 2.0)
    assert w.log_vars.item() == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("form, scale", [("regression", 0.5), ("classification", 1.0)])
def test_priority_weighting_formula(form, scale):
    w = PriorityUncertainty(("gradient", "loss_decrease", "gen_gap"), (), priorities=[2, 5, 1], form=form)
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.1, -0.2, 0.3]))
    terms = {"gradient": torch.tensor(0.4), "loss_decrease": torch.tensor(0.7), "gen_gap": torch.tensor(0.2)}
    loss, sigmas = w(terms)
    s, p, L = [0.1, -0.2, 0.3], [2, 5, 1], [0.4, 0.7, 0.2]
    expected = sum(scale * (math.exp(-si) * li + pi * si) for si, pi, li in zip(s, p, L))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert sigmas["gen_gap"].item() == pytest.approx(math.exp(0.15), rel=1e-6)


def test_non_finite_meta_objective_is_skipped_and_counted():
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), objective="loss_decrease", weighting="sum", **small_kwargs())
    before = _meta_state(opt)
    x, y = regression_batches(1)[0]
    bad_val = (x, torch.full_like(y, float("nan")))
    record = opt.meta_step(model, mse, (x, y), (x, y), bad_val)
    assert record.skipped and opt.meta_skipped == 1 and opt.meta_updates == 1
    assert not any(_changed(before, opt)) and all(torch.isfinite(p).all() for p in opt.meta_parameters())


def test_missing_validation_batch_is_a_clear_error():
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), objective="combined", **small_kwargs())
    with pytest.raises(ValueError, match="needs a validation batch"):
        opt.meta_step(model, mse, *regression_batches(2))
    opt = MetaAdamW(model.named_parameters(), objective="gradient", **small_kwargs())
    assert not opt.meta_step(model, mse, *regression_batches(2)).skipped


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_meta_optimizer_is_selectable(name):
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), meta_optimizer=name, **small_kwargs())
    assert type(opt.meta_optimizer).__name__.lower() == name
    opt.meta_step(model, mse, *regression_batches(3))


def test_meta_training_lowers_the_meta_objective_on_a_fixed_problem():
    # the modulator actually learns: on fixed batches the loss-decrease term falls over meta-updates
    torch.manual_seed(0)
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, objective="loss_decrease", weighting="sum",
                    meta_optimizer="adam", meta_lr=1e-2, **small_kwargs())
    batches = regression_batches(3)
    record = opt.meta_step(model, mse, *batches)
    first, first_alpha = record.terms["loss_decrease"], sum(record.alpha) / len(record.alpha)
    for _ in range(60):
        last = opt.meta_step(model, mse, *batches)
    assert last.terms["loss_decrease"] < first - 1e-4
    # the hypothetical step raises the validation loss here (the term is > 0): a smaller step helps,
    # and the modulator learns to take one
    assert first > 0 and sum(last.alpha) / len(last.alpha) < first_alpha - 0.1


def _meta_gradient(make_model, loss_fn, batches, meta_gradient):
    """The meta-gradient of one meta-update (as the change of the meta-parameters under SGD, lr 1)."""
    torch.manual_seed(123)
    model = make_model()
    opt = MetaAdamW(model.named_parameters(), model=model, meta_gradient=meta_gradient, meta_lr=1.0,
                    **small_kwargs(modulator_dropout=0.1))
    torch.manual_seed(0)
    _step(model, opt, batches[0], loss_fn)
    before = _meta_state(opt)
    torch.manual_seed(5)
    assert not opt.meta_step(model, loss_fn, *batches).skipped
    return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, opt.meta_parameters())])


@pytest.mark.parametrize("case", ["mlp", "batchnorm_train", "transformer_dropout_train", "transformer_eval"])
def test_finite_difference_meta_gradient_matches_the_exact_double_backward(case):
    # the default meta_gradient replaces the double backward by a difference of two gradients; with
    # dropout it must replay the same masks (without the replay this case is ~10% off)
    make_model, loss_fn, batches = {
        "mlp": (lambda: mlp(0), mse, regression_batches(3)),
        "batchnorm_train": (lambda: TinyConvNet().train(), conv_loss, conv_batches()),
        "transformer_dropout_train": (lambda: TinyTransformer(dropout=0.1).train(), lm_loss, lm_batches()),
        "transformer_eval": (lambda: TinyTransformer(dropout=0.1).eval(), lm_loss, lm_batches()),
    }[case]
    exact = _meta_gradient(make_model, loss_fn, batches, "exact")
    approx = _meta_gradient(make_model, loss_fn, batches, "finite_difference")
    assert exact.norm() > 1e-3
    assert (exact - approx).norm() / exact.norm() < 5e-3


def test_the_finite_difference_step_of_a_mixed_precision_model_is_sized_for_its_narrowest_dtype():
    # the step was sized by the dtype of the first tensor: a float32 scalar registered before bfloat16 layers
    # gave float32's step, which moves few bfloat16 weights by their rounding step - the meta-gradient was
    # ~16x further from the exact one (1e-2) than that of the same model all in bfloat16 (6e-4)
    class Mixed(nn.Module):
        def __init__(self, first):
            super().__init__()
            self.temperature = nn.Parameter(torch.ones((), dtype=first))
            self.body = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                                      nn.Linear(32, 1)).to(torch.bfloat16)

        def forward(self, x):
            return self.body(x.to(torch.bfloat16)).float() * self.temperature.float()

    def meta_gradient(first, mode):
        torch.manual_seed(0)
        model = Mixed(first)
        torch.manual_seed(123)
        opt = MetaAdamW(model.named_parameters(), model=model, meta_gradient=mode, meta_lr=1.0, objective="gradient",
                        weighting="sum", **small_kwargs())
        batches = regression_batches(4)
        _step(model, opt, batches[0])
        before = _meta_state(opt)
        assert not opt.meta_step(model, mse, *batches[1:]).skipped
        return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, opt.meta_parameters())])

    errors = {}
    for first in (torch.float32, torch.bfloat16):
        exact = meta_gradient(first, "exact")
        errors[first] = float((meta_gradient(first, "finite_difference") - exact).norm() / exact.norm())
    assert errors[torch.bfloat16] < 1e-3
    assert errors[torch.float32] < 1.5 * errors[torch.bfloat16]


def test_finite_difference_replays_buffers_that_a_forward_pass_updates_and_reads():
    # spectral_norm in train mode advances its power iteration at every forward pass: the extra pass of
    # the finite difference ran one iteration further than the pass that gave g', and the division by
    # the tiny step made that change a meta-gradient 37-375x too large (float64)
    def make_model():
        sn = nn.utils.parametrizations.spectral_norm
        return nn.Sequential(sn(nn.Linear(6, 16)), nn.Tanh(), sn(nn.Linear(16, 1))).double().train()

    batches = [(x.double(), y.double()) for x, y in regression_batches(3)]
    exact = _meta_gradient(make_model, mse, batches, "exact")
    approx = _meta_gradient(make_model, mse, batches, "finite_difference")
    # (what is left: the power iteration's own dependence on the weights, which the exact path treats as constant)
    assert exact.norm() > 1e-3 and (exact - approx).norm() / exact.norm() < 1e-3


class _PowerIteration(nn.Module):
    """Spectral normalisation by a power iteration on its buffer ``u`` in train mode, with no copy
    of it (as ``nn.utils.spectral_norm`` does: its graph holds the buffer itself); ``replace``:
    the iteration replaces the buffer (``self.u = ...``) instead of writing it in place."""

    def __init__(self, i, o, replace=False):
        super().__init__()
        self.lin = nn.Linear(i, o)
        self.replace = replace
        self.register_buffer("u", nn.functional.normalize(torch.randn(o), dim=0))

    def forward(self, x):
        w = self.lin.weight
        if self.training:
            with torch.no_grad():
                u = nn.functional.normalize(w @ nn.functional.normalize(w.t() @ self.u, dim=0), dim=0)
                if self.replace:
                    self.u = u
                else:
                    self.u.copy_(u)
        v = nn.functional.normalize(w.t() @ self.u, dim=0)
        return nn.functional.linear(x, w / (self.u @ w @ v), self.lin.bias)


def test_buffers_a_forward_pass_replaces_are_replayed_and_restored():
    # copy_ into the tensor a module had replaced left the finite difference 49x off, and the model's
    # buffer changed by the meta-update
    def make_model():
        return nn.Sequential(_PowerIteration(6, 16, replace=True), nn.Tanh(),
                             _PowerIteration(16, 1, replace=True)).double().train()

    batches = [(x.double(), y.double()) for x, y in regression_batches(3)]
    exact = _meta_gradient(make_model, mse, batches, "exact")
    approx = _meta_gradient(make_model, mse, batches, "finite_difference")
    assert exact.norm() > 1e-3 and (exact - approx).norm() / exact.norm() < 1e-3

    model = make_model()
    opt = MetaAdamW(model.named_parameters(), model=model, **small_kwargs())
    _step(model, opt, batches[0])
    held = [(m._buffers["u"], m._buffers["u"].clone()) for m in (model[0], model[2])]
    opt.meta_step(model, mse, *batches)
    for m, (u, value) in zip((model[0], model[2]), held):
        assert m._buffers["u"] is u and torch.equal(u, value)  # the module's own tensor, with its value


class _LazyBuffers(nn.Module):
    """A forward pass that fills a None buffer, registers a new one, and reads a mask it shares with
    another module."""

    def __init__(self, i, o, mask):
        super().__init__()
        self.lin = nn.Linear(i, o)
        self.register_buffer("last_out", None)
        self.register_buffer("mask", mask)

    def forward(self, x):
        out = torch.tanh(self.lin(x)) * self.mask
        self.last_out = out.detach()
        if "calls" not in self._buffers:
            self.register_buffer("calls", torch.zeros(()), persistent=False)
        self.calls += 1
        return out


def test_meta_step_leaves_buffers_a_forward_pass_fills_or_registers_as_they_were():
    # only the buffers that were tensors on entry were restored: a None buffer kept the value of a hypothetical
    # pass, and one registered by the forward pass stayed; a buffer shared by several modules was saved once each
    mask = torch.ones(16)
    model = nn.Sequential(_LazyBuffers(6, 16, mask), _LazyBuffers(16, 16, mask), nn.Linear(16, 1))
    opt = MetaAdamW(model.named_parameters(), model=model, **small_kwargs())
    batches = regression_batches(3)
    keys = [dict(m._buffers) for m in model]
    from metaadamw.meta import ModelState
    assert len(ModelState(model)._buffers) == 1  # (the shared mask: one copy)
    opt.meta_step(model, mse, *batches)
    assert [dict(m._buffers) for m in model] == keys and all(m._buffers.get("last_out", 0) is None for m in model[:2])
    assert "calls" not in model[0]._non_persistent_buffers_set and model[0].mask is mask and model[1].mask is mask


class _KeepsItsLastOutput(nn.Linear):
    """Keeps tensors of its last forward pass in plain attributes (for inspection, as some models do)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.last_output = None

    def forward(self, x):
        out = super().forward(x)
        self.last_output = out  # (with its graph)
        self.last_input = x.detach()
        return out


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_meta_step_undoes_tensors_a_forward_pass_keeps_in_plain_attributes(meta_gradient):
    # they held the last hypothetical pass's output and its graph (theta', the modulator's multipliers)
    model = nn.Sequential(_KeepsItsLastOutput(6, 16), nn.Tanh(), _KeepsItsLastOutput(16, 1))
    opt = MetaAdamW(model.named_parameters(), meta_gradient=meta_gradient, **small_kwargs())
    batches = regression_batches(3)
    assert not opt.meta_step(model, mse, *batches).skipped
    assert all(m.last_output is None and not hasattr(m, "last_input") for m in (model[0], model[2]))
    out = model(batches[0][0])  # a forward pass of the caller's keeps them as before
    assert model[2].last_output is out
    before = model[0].last_input
    opt.meta_step(model, mse, *batches)
    assert model[2].last_output is out and model[0].last_input is before  # (those on entry are put back)


class _Rotary(nn.Module):
    """A cache keyed by the sequence length, filled by the forward pass (as rotary embeddings do)."""

    def __init__(self):
        super().__init__()
        self.seq_len_cached = None
        self.cos_cached = None

    def forward(self, x):
        if x.shape[1] != self.seq_len_cached:
            self.seq_len_cached = x.shape[1]
            self.cos_cached = torch.cos(torch.arange(x.shape[1], dtype=x.dtype))
        return x * self.cos_cached


def test_meta_step_undoes_a_forward_pass_cache_with_its_key():
    # undoing the cached tensor alone left its key: the next forward pass skipped the rebuild and
    # multiplied by None (a meta_step before the first training step filled the cache)
    model = nn.Sequential(nn.Linear(6, 6), _Rotary(), nn.Linear(6, 1))
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    batches = regression_batches(3)
    opt.meta_step(model, mse, *batches)
    assert model[1].seq_len_cached is None and model[1].cos_cached is None
    _step(model, opt, batches[0])  # (it raised a TypeError)
    cached = model[1].cos_cached
    opt.meta_step(model, mse, *batches)
    assert model[1].cos_cached is cached and model[1].seq_len_cached == 6


class _GrowingRotary(nn.Module):
    """A cache that grows to the longest sequence seen and is sliced for shorter ones (as rotary
    embeddings' caches are): ``self.cos_cached`` with its key ``self.seq_len_cached``."""

    def __init__(self):
        super().__init__()
        self.seq_len_cached = 0
        self.cos_cached = torch.ones(0, 1)

    def forward(self, x):  # (N, T, C)
        if x.shape[1] > self.seq_len_cached:
            self.seq_len_cached = x.shape[1]
            self.cos_cached = torch.cos(torch.arange(x.shape[1], dtype=x.dtype)).unsqueeze(1)
        return x * self.cos_cached[:x.shape[1]]


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_meta_step_passes_start_from_a_cache_held_on_entry_with_its_key(meta_gradient):
    # a cache built on entry for 4 positions, rebuilt for 8 by the pass on batch 2: between the passes
    # the tensor came back without its key (8), and the validation pass sliced 8 rows from a 4-row cache
    model = nn.Sequential(nn.Linear(3, 3), _GrowingRotary(), nn.Linear(3, 1))
    g = torch.Generator().manual_seed(0)

    def batch(length):
        return torch.randn(5, length, 3, generator=g), torch.randn(5, 1, generator=g)

    def loss_fn(model, batch):
        x, y = batch
        return ((model(x).mean(1) - y) ** 2).mean()

    opt = MetaAdamW(model.named_parameters(), meta_gradient=meta_gradient, **small_kwargs())
    _step(model, opt, batch(4), loss_fn)
    cached = model[1].cos_cached
    record = opt.meta_step(model, loss_fn, batch(8), batch(8), batch(8))  # (it raised a RuntimeError)
    assert not record.skipped and all(math.isfinite(v) for v in record.terms.values())
    assert model[1].cos_cached is cached and model[1].seq_len_cached == 4


def test_both_meta_gradient_modes_see_the_same_losses_on_a_model_whose_buffers_a_pass_advances():
    # every pass starts from the buffers on entry: the exact path's validation pass at theta' followed the
    # power iteration of its pass on batch 2 (loss_decrease -0.085 against -0.003), as both modes once did
    batches = [(x.double(), y.double()) for x, y in regression_batches(3)]
    terms = {}
    for mode in ("exact", "finite_difference"):
        torch.manual_seed(0)
        model = nn.Sequential(_PowerIteration(6, 16), nn.Tanh(), _PowerIteration(16, 1)).double().train()
        opt = MetaAdamW(model.named_parameters(), model=model, meta_gradient=mode, **small_kwargs())
        _step(model, opt, batches[0])
        terms[mode] = opt.meta_step(model, mse, *batches).terms
    for name, value in terms["exact"].items():
        assert value == pytest.approx(terms["finite_difference"][name], rel=1e-9, abs=1e-12), name


def test_theta_of_a_max_norm_embedding_is_the_weight_its_passes_renormalised_throughout():
    # the restores between passes wrote the entry weight back into theta (which aliases it) after theta'
    # was built from the renormalised one: the chain rule to alpha and beta used another theta (d_beta 3.7x)
    from metaadamw import meta

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 1))
    with torch.no_grad():
        model[0].weight.mul_(5.0)
    batches = [(torch.randint(0, 30, (8, 3)), torch.randn(8, 1)) for _ in range(3)]
    opt = MetaAdamW(model.named_parameters(), weight_decay=0.1, **small_kwargs())
    seen = {}
    hypothetical, chain = meta._hypothetical_moments, meta._chain_to_multipliers

    def recording_moments(opt_, params, *args):
        seen["theta'"] = [p.detach().clone() for p in params]
        return hypothetical(opt_, params, *args)

    def recording_chain(d_theta, theta, *args):
        seen["chain"] = [t.clone() for t in theta]
        return chain(d_theta, theta, *args)

    try:
        meta._hypothetical_moments, meta._chain_to_multipliers = recording_moments, recording_chain
        opt.meta_step(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), *batches)
    finally:
        meta._hypothetical_moments, meta._chain_to_multipliers = hypothetical, chain
    assert all(torch.equal(a, b) for a, b in zip(seen["theta'"], seen["chain"]))


def test_meta_step_adds_no_entries_to_the_optimizers_state():
    # before the first step(), or for a tensor without moments yet, it inserted empty entries (opt.state
    # is a defaultdict): state_dict() changed, and the next step rebuilt its plan
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    batches = regression_batches(3)
    opt.meta_step(model, mse, *batches)
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    opt.zero_grad()
    mse(model, batches[0]).backward()
    model[-1].weight.grad = None
    opt.step()
    held = set(opt.state)
    opt.meta_step(model, mse, *batches)
    assert set(opt.state) == held and model[-1].weight not in held


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_group_whose_gradient_is_rounding_noise_has_no_direction(dtype):
    # a convolution's bias before BatchNorm has a true gradient of 0, computed as rounding noise: its
    # cosine's derivative (~1 / ||g'||) made v ~5e5 (float32) or ~1e14 (float64), so the finite-difference
    # Hessian-vector product was noise (157x the meta-gradient in float64) and the exact one garbage
    batches = [(x.to(dtype), y) for x, y in conv_batches()]
    make = lambda: TinyConvNet().to(dtype).train()  # noqa: E731
    exact = _meta_gradient(make, conv_loss, batches, "exact")
    approx = _meta_gradient(make, conv_loss, batches, "finite_difference")
    assert exact.norm() > 1e-3 and (exact - approx).norm() / exact.norm() < 1e-5
    from metaadamw.objectives import _cosine
    sq = torch.tensor([1.0, 1e-30, 0.0], dtype=dtype)  # (a relative norm of 1e-15: below 100 eps in both dtypes)
    assert _cosine(torch.tensor([0.5, 1e-30, 0.0], dtype=dtype), sq, sq).tolist() == [0.5, 0.0, 0.0]


def _two_head_meta_gradient(meta_gradient):
    torch.manual_seed(0)
    model = nn.ModuleDict({"trunk": nn.Linear(6, 8), "a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})

    def loss_fn(m, batch):
        x, y, head = batch
        return ((m[head](torch.tanh(m["trunk"](x))) - y) ** 2).mean()

    (x1, y1), (x2, y2), (x3, y3) = regression_batches(3)
    b1, b2, val = (x1, y1, "a"), (x2, y2, "b"), (x3, y3, "b")
    groups = [{"params": list(model[k].parameters())} for k in ("trunk", "a", "b")]
    opt = MetaAdamW(groups, grouping="original", meta_gradient=meta_gradient, meta_lr=1.0, **small_kwargs())
    _step(model, opt, b1, loss_fn)
    before = _meta_state(opt)
    rec = opt.meta_step(model, loss_fn, b1, b2, val)
    return rec, torch.cat([(b - p.detach()).flatten() for b, p in zip(before, opt.meta_parameters())])


def test_a_group_with_a_zero_gradient_on_batch2_keeps_the_meta_update_finite_in_both_modes():
    # head "a" has a gradient on batch 1 and exactly none on batch 2 (a multi-task model): its
    # cos(g, g') is 0 with no gradient. sqrt at 0 in the backward gave NaN, and the default
    # finite-difference mode skipped every such meta-update while the exact mode did not.
    rec_fd, fd = _two_head_meta_gradient("finite_difference")
    rec_exact, exact = _two_head_meta_gradient("exact")
    assert not rec_fd.skipped and not rec_exact.skipped
    assert math.isfinite(rec_fd.terms["gradient"]) and fd.isfinite().all()
    assert rec_fd.terms["gradient"] == pytest.approx(rec_exact.terms["gradient"], rel=1e-5)
    assert exact.norm() > 1e-3 and (exact - fd).norm() / exact.norm() < 5e-3


def test_cosine_of_a_zero_vector_is_zero_with_a_finite_gradient():
    from metaadamw.objectives import _cosine

    dot = torch.tensor([0.5, 0.0, 0.0], requires_grad=True)
    sq_a = torch.tensor([1.0, 0.0, 2.0], requires_grad=True)
    sq_b = torch.tensor([4.0, 3.0, 0.0], requires_grad=True)
    cos = _cosine(dot, sq_a, sq_b)
    assert cos.tolist() == [0.25, 0.0, 0.0]
    cos.sum().backward()
    for x in (dot, sq_a, sq_b):
        assert x.grad.isfinite().all() and x.grad[1:].eq(0).all()
    assert dot.grad[0] == pytest.approx(0.5) and sq_a.grad[0] == pytest.approx(-0.125)


def test_finite_difference_leaves_the_random_stream_where_the_exact_path_leaves_it():
    # the replayed forward pass must not shift the random numbers the training loop draws next
    draws = []
    for meta_gradient in ("exact", "finite_difference"):
        model = TinyTransformer(dropout=0.1).train()
        opt = MetaAdamW(model.named_parameters(), meta_gradient=meta_gradient, **small_kwargs())
        torch.manual_seed(7)
        opt.meta_step(model, lm_loss, *lm_batches())
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])


def _kernel_flags():
    return (torch.backends.cudnn.enabled, torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_only_the_twice_differentiated_pass_gives_up_the_fused_kernels(device):
    # exact mode: math attention (and no cuDNN on CUDA: its RNNs have no double backward) inside
    # the context, the caller's kernel settings everywhere else (training steps keep flash / cuDNN)
    from metaadamw.meta import twice_differentiable_kernels

    outside = _kernel_flags()
    assert outside[0] and outside[1], "torch's defaults: cuDNN and flash attention on"
    with twice_differentiable_kernels(torch.device(device)):
        cudnn, flash, efficient, math_ = _kernel_flags()
        assert (flash, efficient, math_) == (False, False, True)
        assert cudnn == (device == "cpu")
    assert _kernel_flags() == outside


def test_exact_meta_update_of_a_model_without_special_code_is_twice_differentiable():
    # nn.TransformerEncoderLayer picks the fused attention kernel in training mode; the exact
    # meta-update must still work with a model that does nothing about it (and leave it fast)
    model = TinyTransformer(dropout=0.0).train()
    opt = MetaAdamW(model.named_parameters(), meta_gradient="exact", **small_kwargs())
    before = _meta_state(opt)
    assert not opt.meta_step(model, lm_loss, *lm_batches()).skipped
    assert any(_changed(before, opt))
    assert _kernel_flags()[1], "flash attention is switched back on after the meta-update"


def test_unknown_meta_gradient_is_a_clear_error():
    with pytest.raises(ValueError, match="meta_gradient must be one of"):
        MetaAdamW(mlp(0).named_parameters(), meta_gradient="hessian", **small_kwargs())


def test_batch1_none_reuses_the_gradient_in_grad_and_leaves_it_alone():
    # meta_step(model, loss_fn, None, b2, val) after loss(b1).backward() is the same meta-update as
    # meta_step(model, loss_fn, b1, b2, val), one forward and backward pass cheaper
    b0, b1, b2, val = regression_batches(4)
    changes, seen = [], []
    for reuse in (False, True):
        model = mlp(0)
        torch.manual_seed(3)
        opt = MetaAdamW(model.named_parameters(), meta_lr=1.0, **small_kwargs())
        _step(model, opt, b0)
        opt.zero_grad()
        mse(model, b1).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        before = _meta_state(opt)
        counted = []

        def loss_fn(m, batch):
            counted.append(id(batch))
            return mse(m, batch)

        opt.meta_step(model, loss_fn, None if reuse else b1, b2, val)
        changes.append(torch.cat([(a - p.detach()).flatten() for a, p in zip(before, opt.meta_parameters())]))
        seen.append(counted.count(id(b1)))
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert changes[0].abs().sum() > 0
    torch.testing.assert_close(changes[1], changes[0], rtol=0, atol=0)
    assert seen == [1, 0]


def test_batch1_none_without_gradients_is_a_clear_error():
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    with pytest.raises(ValueError, match=r"after loss.backward\(\) and before step\(\)"):
        opt.meta_step(model, mse, None, *regression_batches(2))


def test_chain_through_theta_prime_matches_autograd_through_every_element():
    # theta' = theta * decay - scale * direction is linear in the per-tensor scalars: the meta-update
    # takes d alpha, d beta from two dot products per tensor; autograd through theta' must agree
    from metaadamw.meta import _chain_to_multipliers

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 3)]
    theta = [torch.randn(s, generator=g) for s in shapes]
    direction = [torch.randn(s, generator=g) for s in shapes]
    d_theta = [torch.randn(s, generator=g) for s in shapes]
    alpha = torch.tensor([1.3, 0.7], requires_grad=True)
    beta = torch.tensor([0.9, 1.4], requires_grad=True)
    index = torch.tensor([0, 1, 1])
    a, w = alpha.index_select(0, index), beta.index_select(0, index)
    decay = 1 - torch.tensor([1e-2, 2e-2, 3e-2]) * a * w
    scale = torch.tensor([0.5, 0.25, 0.125]) * a
    theta_prime = [p * decay[k] - scale[k] * d for k, (p, d) in enumerate(zip(theta, direction))]
    want = torch.autograd.grad(theta_prime, [alpha, beta], grad_outputs=d_theta, retain_graph=True)
    got = _chain_to_multipliers(d_theta, theta, direction, decay, scale, [alpha, beta])
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert want[1].abs().min() > 0, "beta gets a gradient through the weight decay"


@pytest.mark.parametrize("case", ["float32", "small_gradient", "bfloat16", "single_tensor", "features=enhanced"])
def test_the_meta_update_trains_the_modulator_on_the_features_the_step_gives_it(case):
    # with the step's gradient (batch1=None) the meta-update's multipliers at theta are those of the
    # step that follows. Its features came from exact dot products and bfloat16 sums of v, the
    # step's from its norm identities: a gradient ~1e-4 of the first moment made the step's cos 0 and
    # its alphas up to 13% apart from those the modulator was trained at
    torch.manual_seed(0)
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    over = {"features": "enhanced"} if case == "features=enhanced" else {}
    opt = MetaAdamW(model.named_parameters(), meta_lr=1e-30, foreach=case != "single_tensor",
                    **small_kwargs(modulator_heads=1, **over))
    x, y = torch.randn(32, 16, dtype=dtype), torch.randn(32, 1, dtype=dtype)
    scale = 1e-4 if case == "small_gradient" else 1.0

    def loss_fn(m, batch, s=1.0):
        return s * ((m(batch[0]) - batch[1]).float() ** 2).mean()

    for _ in range(20):
        opt.zero_grad()
        loss_fn(model, (x, y)).backward()
        opt.step()
    opt.zero_grad()
    loss_fn(model, (x, y), scale).backward()
    record = opt.meta_step(model, lambda m, b: loss_fn(m, b, scale), None, (x, y), (x, y))
    assert not record.skipped
    opt.step()  # the same gradient, moments and time, and the modulator moved by 1e-30 * its gradient
    if case == "small_gradient":
        assert (opt._stats["cos"] == 0).any(), "(the case: the step's identity cannot resolve cos)"
    torch.testing.assert_close(torch.tensor(record.alpha), opt.multipliers.alpha.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(record.beta), opt.multipliers.beta.float(), rtol=1e-6, atol=1e-7)


def test_squares_and_dots_match_autograd_through_per_tensor_dot_products():
    # the gradient-alignment objective's per-tensor ||g'||^2 and <g, g'> have a hand-written foreach backward
    from metaadamw import functional as F

    g = torch.Generator().manual_seed(2)
    shapes = [(3, 4), (5,), (2, 2, 3)]
    xs = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    cs = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    sq, dot = F.squares_and_dots(xs, cs)
    assert sq.dtype == dot.dtype == torch.float64
    torch.testing.assert_close(sq, torch.stack([(x * x).sum() for x in xs]))
    torch.testing.assert_close(dot, torch.stack([(c * x).sum() for c, x in zip(cs, xs)]))
    w_sq, w_dot = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((w_sq * sq).sum() + (w_dot * dot).sum(), xs + cs)
    want = [2 * w_sq[k] * x + w_dot[k] * c for k, (x, c) in enumerate(zip(xs, cs))]
    want += [w_dot[k] * x for k, x in enumerate(xs)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # and as autograd checks it numerically; constants (no grad) get none
    assert torch.autograd.gradcheck(lambda *t: F.squares_and_dots(list(t[:3]), list(t[3:])), tuple(xs + cs))
    consts = [c.detach() for c in cs]
    only_x = torch.autograd.grad(F.squares_and_dots(xs, consts)[1].sum(), xs)
    for x, c, d in zip(xs, consts, only_x):
        torch.testing.assert_close(d, c)


def test_loss_fn_results_are_checked_and_a_one_element_loss_is_accepted():
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    batches = regression_batches(3)
    _step(model, opt, batches[0])
    rec = opt.meta_step(model, lambda m, b: mse(m, b).reshape(1), *batches)
    assert not rec.skipped and math.isfinite(rec.meta_loss)
    for bad, what in ((lambda m, b: (m(b[0]) - b[1]) ** 2, "float32 tensor of shape (16, 1)"),
                      (lambda m, b: 1.0, "got a float")):
        with pytest.raises(ValueError, match=rf"must return the scalar loss.*{re.escape(what)}"):
            opt.meta_step(model, bad, *batches)


def test_an_error_inside_loss_fn_leaves_the_modulator_mode_and_the_random_stream_alone():
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    batches = regression_batches(3)
    _step(model, opt, batches[0])
    calls = {"n": 0}

    def failing(m, b):  # fails in the finite-difference pass (the 5th loss evaluation), after the replay
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return mse(m, b) + 0.0 * torch.rand(())

    torch.manual_seed(7)
    with pytest.raises(RuntimeError, match="boom"):
        opt.meta_step(model, failing, *batches)
    after_error = torch.rand(3)
    assert calls["n"] == 5
    assert not opt.modulator.training and not opt.modulator.layers[0].training
    torch.manual_seed(7)  # the stream as meta_step found it: its draws (and the replay) were in a fork
    assert torch.equal(torch.rand(3), after_error)


def test_meta_step_and_the_constructor_leave_the_global_random_stream_alone():
    """As torch.optim's optimizers: a training loop draws the same dropout masks with and without
    MetaAdamW's construction and meta-updates (which draw theirs from a fork)."""
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    batches = regression_batches(3)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    opt = MetaAdamW(model.named_parameters(), features="enhanced", **small_kwargs())  # (a random embedding)
    assert torch.equal(torch.rand(4), expected)
    _step(model, opt, batches[0])
    torch.manual_seed(3)
    record = opt.meta_step(model, mse, *batches)
    assert not record.skipped
    assert torch.equal(torch.rand(4), expected)
    # the meta-update's own passes did draw masks: two meta-updates from different streams differ
    torch.manual_seed(4)
    other = opt.meta_step(model, mse, *batches)
    torch.manual_seed(3)
    again = opt.meta_step(model, mse, *batches)
    assert other.terms != again.terms


class _LayerDrop(nn.Module):
    """Residual layers each skipped at random in training, decided by Python's or NumPy's global
    random stream (as older Hugging Face models' layer drop, ``random.uniform(0, 1)``)."""

    def __init__(self, draw):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.out = nn.Linear(8, 1)
        self.draw = draw

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for layer in self.layers:
            if not (self.training and self.draw() < 0.5):
                h = h + torch.tanh(layer(h))
        return self.out(h)


def _host_streams():
    import random

    import numpy as np
    key, pos = np.random.get_state()[1:3]
    return random.getstate(), key.copy(), pos


@pytest.mark.parametrize("stream", ["random", "numpy"])
def test_meta_step_replays_and_restores_pythons_and_numpys_random_streams(stream):
    """A layer drop decided by Python's or NumPy's global stream: the passes that must see the same
    draws (L(theta; val) and L(theta'; val); g' and the finite-difference pass) replay them, and the
    call leaves those streams as it found them. Before, the loss decrease at theta' = theta was not 0,
    the finite-difference meta-gradient 1e5x off the exact one, and the training after it drew other
    layer drops than without it."""
    import random

    import numpy as np
    draw = random.random if stream == "random" else np.random.rand
    batches = [(x.double(), y.double()) for x, y in regression_batches(3)]

    def meta_gradient(mode, lr=1e-2):
        random.seed(1)
        np.random.seed(1)
        torch.manual_seed(0)
        model = _LayerDrop(draw).double()
        opt = MetaAdamW(model.named_parameters(), lr=lr, meta_gradient=mode, **small_kwargs())
        _step(model, opt, batches[0])
        opt.zero_grad()
        seen, step = [], opt.meta_optimizer.step

        def capturing_step(*args, **kwargs):
            seen.extend(p.grad.flatten().clone() for p in opt.meta_parameters() if p.grad is not None)
            return step(*args, **kwargs)

        opt.meta_optimizer.step = capturing_step
        before = _host_streams()
        record = opt.meta_step(model, mse, *batches)
        after = _host_streams()
        assert after[0] == before[0] and np.array_equal(after[1], before[1]) and after[2] == before[2]
        assert not record.skipped and all(math.isfinite(v) for v in record.terms.values())
        return torch.cat(seen), record

    fd, _ = meta_gradient("finite_difference")
    exact, _ = meta_gradient("exact")
    assert float((fd - exact).norm() / exact.norm()) < 1e-6
    for mode in ("finite_difference", "exact"):  # theta' = theta: the two validation losses are one
        assert meta_gradient(mode, lr=0.0)[1].terms["loss_decrease"] == 0.0


def test_sparse_gradients_in_meta_step_are_a_clear_error():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 1))
    opt = MetaAdamW(model.named_parameters(), grouping="original", **small_kwargs())
    batch = (torch.randint(0, 10, (5, 2)), torch.randn(5, 1))
    with pytest.raises(ValueError, match="does not support sparse gradients"):
        opt.meta_step(model, mse, batch, batch, batch)


def _checkpointed_loss(reentrant):
    from torch.utils.checkpoint import checkpoint

    def loss(model, batch):
        x, y = batch
        if reentrant:
            x = x.requires_grad_()  # (the reentrant variant needs an input that requires grad)
        h = checkpoint(model[:4], x, use_reentrant=reentrant)
        return ((model[4](h) - y) ** 2).mean()
    return loss


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_activation_checkpointing_gives_the_same_meta_update(meta_gradient):
    # torch.utils.checkpoint(use_reentrant=False) recomputes the forward pass during the backward
    # passes, some of which run outside the forward's context: the meta-update must not change
    runs = []
    for loss_fn in (mse, _checkpointed_loss(False)):
        model = mlp(0, widths=(6, 16, 16, 16, 1))[:5]
        opt = MetaAdamW(model.named_parameters(), meta_gradient=meta_gradient, meta_lr=1e-2, **small_kwargs())
        batches = regression_batches(4)
        _step(model, opt, batches[0])
        records = [opt.meta_step(model, loss_fn, *batches[1:]) for _ in range(2)]
        runs.append((records[0].meta_loss, records[1].alpha, [p.detach().clone() for p in opt.meta_parameters()]))
    (loss_a, alpha_a, meta_a), (loss_b, alpha_b, meta_b) = runs
    assert loss_a == loss_b
    assert alpha_a == pytest.approx(alpha_b, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(meta_a, meta_b))
    assert not all(torch.equal(a, b) for a, b in zip(meta_a, _meta_state(
        MetaAdamW(mlp(0, widths=(6, 16, 16, 16, 1))[:5].named_parameters(), **small_kwargs()))))


class _CheckpointedMiddle(nn.Module):
    def __init__(self, checkpointed):
        super().__init__()
        self.a, self.b, self.c, self.checkpointed = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 1), checkpointed

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = torch.tanh(self.a(x))
        h = checkpoint(self.b, h, use_reentrant=False) if self.checkpointed else self.b(h)
        return self.c(torch.tanh(h))


@pytest.mark.parametrize("objective", ["loss_decrease", "gen_gap", "gradient"])
def test_the_exact_meta_gradient_is_the_same_with_activation_checkpointing(objective):
    # the last backward pass of the exact path recomputes the checkpointed part: it ran after theta' was
    # swapped out, at theta (meta-gradients 1e-2 to 0.5 off, relative, at lr 0.1)
    batches = [(x.double(), y.double()) for x, y in regression_batches(3)]
    deltas = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = _CheckpointedMiddle(checkpointed).double()
        opt = MetaAdamW(model.parameters(), model=model, lr=0.1, objective=objective, weighting="sum",
                        meta_gradient="exact", meta_lr=1.0, **small_kwargs())
        before = [p.detach().clone() for p in opt.meta_parameters()]
        opt.meta_step(model, mse, *batches)
        deltas.append(torch.cat([(p.detach() - b).flatten() for b, p in zip(before, opt.meta_parameters())]))
    assert deltas[0].norm() > 0
    assert (deltas[1] - deltas[0]).norm() <= 1e-9 * deltas[0].norm()


class _CheckpointedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.out = nn.Linear(4, 8), nn.Linear(8, 1)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.out(checkpoint(self.layer, self.embed(x), use_reentrant=False)).mean(1)


@pytest.mark.parametrize("objective", ["gradient", "combined"])
def test_the_exact_path_recomputes_checkpointed_attention_on_the_kernels_it_ran_on(objective):
    # the double-differentiated pass runs on the math attention kernel; its backward passes recomputed the
    # checkpointed layer on the fused one, which saves other tensors: torch's CheckpointError
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 5, 4, generator=g), torch.randn(3, 1, generator=g)) for _ in range(3)]
    terms = {}
    for mode in ("finite_difference", "exact"):
        torch.manual_seed(0)
        model = _CheckpointedAttention().train()
        opt = MetaAdamW(model.parameters(), model=model, objective=objective, meta_gradient=mode, **small_kwargs())
        record = opt.meta_step(model, mse, *batches)
        assert not record.skipped
        terms[mode] = record.terms
    assert terms["exact"] == pytest.approx(terms["finite_difference"], rel=1e-5)


@pytest.mark.parametrize("batch1_none", [False, True])
def test_reentrant_checkpointing_is_a_clear_error_not_a_silent_zero_meta_gradient(batch1_none):
    # the reentrant variant hides the parameters from torch.autograd.grad: every gradient would be
    # None (with batch1=None only those at theta', which used to become silent zeros)
    model = mlp(0, widths=(6, 16, 16, 16, 1))[:5]
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    batches = regression_batches(4)
    loss_fn = _checkpointed_loss(True)
    opt.zero_grad()
    loss_fn(model, batches[0]).backward()  # .backward() itself works with it
    snap, before = _snapshot(model), _meta_state(opt)
    with pytest.raises(ValueError, match="use_reentrant=False") as err:
        opt.meta_step(model, loss_fn, None if batch1_none else batches[1], *batches[2:])
    assert ("hypothetical parameters" in str(err.value)) == batch1_none
    _assert_same(model, snap)
    assert not any(_changed(before, opt))


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_a_model_that_caches_its_parameters_is_a_clear_error(meta_gradient):
    # the meta-update swaps theta' into the modules' attributes; a model reading a cached copy of
    # its weights would be evaluated at theta, and the meta-gradient through theta' would be zero
    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 1)
            self.cache = (self.lin.weight, self.lin.bias)

        def forward(self, x):
            return nn.functional.linear(x, *self.cache)

    model = Cached()
    opt = MetaAdamW(model.named_parameters(), grouping="original", meta_gradient=meta_gradient, **small_kwargs())
    batches = regression_batches(4)
    _step(model, opt, batches[0])
    with pytest.raises(ValueError, match="cached list or tuple"):
        opt.meta_step(model, mse, *batches[1:])


def test_misused_meta_step_arguments_and_contexts_are_clear_errors():
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    batches = regression_batches(4)
    _step(model, opt, batches[0])
    snap, before = _snapshot(model), _meta_state(opt)
    with pytest.raises(TypeError, match="takes the torch.nn.Module being trained .* got model=function"):
        opt.meta_step(mse, model, *batches[1:])
    with pytest.raises(ValueError, match="does not require grad .* torch.no_grad"):
        opt.meta_step(model, lambda m, b: mse(m, b).detach(), *batches[1:])

    def under_no_grad(m, b):
        with torch.no_grad():
            return mse(m, b)
    with pytest.raises(ValueError, match="does not require grad"):
        opt.meta_step(model, under_no_grad, *batches[1:])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="cannot run under torch.inference_mode"):
        opt.meta_step(model, mse, *batches[1:])
    _assert_same(model, snap)
    assert not any(_changed(before, opt)) and opt.meta_updates == 0
    with torch.no_grad():  # it enables gradients itself
        assert not opt.meta_step(model, mse, *batches[1:]).skipped
    assert all(_changed(before, opt)[:1])


@pytest.mark.parametrize("objective, expected", [
    ("combined", ["b1", "val", "b2", "val", "b2"]),  # (L(theta; val) first, with grad: the code path of L(theta'; val))
    ("gen_gap", ["b1", "b2", "val"]),
    ("loss_decrease", ["b1", "val", "val"]),
    ("gradient", ["b1", "b2", "b2"]),
])
def test_each_objective_runs_only_the_loss_evaluations_it_uses(objective, expected):
    # L(theta; val) is a forward pass of its own: gen_gap never reads it, so it must not run
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), objective=objective, **small_kwargs())
    batches = regression_batches(3)
    _step(model, opt, batches[0])
    names = {id(b): name for b, name in zip(batches, ("b1", "b2", "val"))}
    seen = []

    def loss(m, b):
        seen.append(names[id(b)] + ("" if torch.is_grad_enabled() else " (no grad)"))
        return mse(m, b)

    record = opt.meta_step(model, loss, *batches)
    assert seen == expected
    assert not record.skipped and set(record.terms) == set(opt.objective.terms)


def test_objectives_written_before_needs_val_at_theta_still_get_the_validation_loss_at_theta(negative_objective):
    from metaadamw.objectives import needs_val_at_theta

    obj = OBJECTIVES.get(negative_objective)()
    assert obj.needs_val_at_theta is None and needs_val_at_theta(obj)
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), objective=negative_objective, weighting="sum", **small_kwargs())
    batches = regression_batches(3)
    _step(model, opt, batches[0])
    record = opt.meta_step(model, mse, *batches)  # q.loss_val would be None without the pass: a TypeError
    with torch.no_grad():
        val_at_theta = mse(model, batches[2]).item()
    # L_val(theta') - L_val(theta) - 1, with theta' one small step from theta
    assert abs(record.terms["loss_decrease"] + 1.0) < 0.01 * val_at_theta


def test_low_precision_groups_keep_their_cosine():
    # with bfloat16's epsilon the no-direction threshold was 61% of the total: every cosine read 0
    from metaadamw.objectives import _cosine

    sq = torch.tensor([0.3, 0.5, 0.2], dtype=torch.bfloat16)
    dot = torch.tensor([0.29, 0.4, 0.1], dtype=torch.bfloat16)
    assert (_cosine(dot, sq, sq).float() > 0.4).all()


def test_gradient_alignment_is_the_mean_over_the_groups_that_have_a_gradient():
    # a group whose tensors are all frozen added 0 to the mean and shrank the term against the others
    from metaadamw.objectives import MetaQuantities, gradient_alignment

    g = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]
    gp = [torch.tensor([2.0, 0.0]), torch.tensor([0.0, -1.0])]
    lam1, lam2 = torch.tensor([0.5, 0.25, 0.9]), torch.tensor([1.0, 0.5, 0.7])
    # by hand: group 0: 0.5 * 4 - 1 * cos = 2 - 1 = 1; group 2: 0.9 * 1 - 0.7 * (-1) = 1.6; group 1 frozen
    q = MetaQuantities(tensor_group=torch.tensor([0, 2]), num_groups=3, grads=g, lambda1=lam1, lambda2=lam2,
                       grads_prime=gp)
    assert float(gradient_alignment(q)) == pytest.approx((1.0 + 1.6) / 2)


def test_a_trained_tensor_outside_the_model_is_a_clear_error_not_a_silently_frozen_one():
    # a CLIP-style temperature kept beside the model and used by loss_fn: the meta-update could only
    # evaluate the losses with it at its current value (loss_decrease was exactly that, silently)
    model = mlp(0)
    scale = nn.Parameter(torch.tensor(0.5))

    def loss_fn(m, batch):
        return mse(m, batch) * scale.exp()

    opt = MetaAdamW(list(model.named_parameters()) + [("logit_scale", scale)], **small_kwargs())
    batches = regression_batches(4)
    _step(model, opt, batches[0], loss_fn)
    before = _meta_state(opt)
    with pytest.raises(ValueError, match="not parameters of the model given to meta_step: 'logit_scale'.*register_parameter"):
        opt.meta_step(model, loss_fn, *batches[1:])
    assert not any(_changed(before, opt))
    assert all(m._parameters[k] is p for m in model.modules() for k, p in m._parameters.items()
               if p is not None and p in set(model.parameters()))  # (swapped back)

    class Holder(nn.Module):  # the fix the message names: one module holding both
        def __init__(self):
            super().__init__()
            self.net, self.logit_scale = model, scale

        def forward(self, x):
            return self.net(x)

    holder = Holder()
    record = opt.meta_step(holder, lambda m, b: mse(m, b) * m.logit_scale.exp(), *batches[1:])
    assert not record.skipped and any(_changed(before, opt))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_the_validation_loss_at_theta_takes_the_code_path_of_the_loss_at_theta_prime():
    # nn.TransformerEncoder in eval mode with a padding mask computes otherwise without grad (its
    # fast path zeroes padded positions): L_val(theta) under no_grad and L_val(theta') with grad
    # differed by that alone, so loss_decrease read 0.117 with lr = 0, where theta' = theta
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(12, 8, padding_idx=0)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2,
                                             enable_nested_tensor=True)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.enc(self.emb(x), src_key_padding_mask=x == 0).mean(1))  # (pads included)

    def batch(n):
        x = torch.randint(1, 12, (n, 6))
        x[:, -2:] = 0
        return x, torch.randint(0, 3, (n,))

    def ce(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    model = Encoder().eval()
    b1, b2, val = batch(4), batch(4), batch(3)
    opt = MetaAdamW(model.named_parameters(), lr=0.0, alpha_range=0.0, beta_range=0.0, objective="loss_decrease",
                    **small_kwargs())
    opt.zero_grad()
    ce(model, b1).backward()
    with torch.no_grad():
        fast = ce(model, val).item()
    assert abs(fast - ce(model, val).item()) > 1e-3  # (the two code paths do differ on this model)
    assert opt.meta_step(model, ce, None, b2, val).terms["loss_decrease"] == pytest.approx(0.0, abs=1e-6)


def test_rows_an_embedding_with_max_norm_renormalises_are_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 1))
    with torch.no_grad():
        model[0].weight.mul_(5.0)  # rows well above max_norm: every lookup renormalises them in place

    def loss_fn(m, b):
        return nn.functional.mse_loss(m(b[0]), b[1])

    batches = [(torch.randint(0, 30, (8, 3)), torch.randn(8, 1)) for _ in range(3)]
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    opt.zero_grad()
    loss_fn(model, batches[0]).backward()
    snap = _snapshot(model)
    for batch1 in (None, batches[0]):
        assert not opt.meta_step(model, loss_fn, batch1, batches[1], batches[2]).skipped
        _assert_same(model, snap)


class _TiedMaxNormLM(nn.Module):
    def __init__(self, vocab=11):
        super().__init__()
        self.emb, self.mid, self.out = nn.Embedding(vocab, 8, max_norm=1.0), nn.Linear(8, 8), nn.Linear(8, vocab)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.mid(self.emb(x))))


@pytest.mark.parametrize("frozen", [False, True])
def test_a_max_norm_embedding_tied_to_a_linear_layer_in_the_exact_path(frozen):
    # the graph of the pass on batch 2, held by the exact path, saved theta' for the tied Linear; the
    # validation pass renormalised theta' in place: torch's "modified by an inplace operation" error (a frozen
    # weight, which theta' leaves as it is, the same)
    terms = {}
    for mode in ("finite_difference", "exact"):
        torch.manual_seed(0)
        model = _TiedMaxNormLM()
        with torch.no_grad():
            model.emb.weight.mul_(5.0)  # (rows above max_norm: every lookup renormalises them)
        model.emb.weight.requires_grad_(not frozen)
        opt = MetaAdamW(model.named_parameters(), meta_gradient=mode, objective="combined", **small_kwargs())
        snap = _snapshot(model)
        record = opt.meta_step(model, lm_loss, *lm_batches(3))
        assert not record.skipped
        _assert_same(model, snap)
        terms[mode] = record.terms
    assert terms["exact"] == pytest.approx(terms["finite_difference"], rel=1e-5)


class _BufferCache(nn.Module):
    """A cache held as a non-persistent buffer beside a plain key (Hugging Face's rotary embeddings)."""

    def __init__(self):
        super().__init__()
        self.lin, self.fc = nn.Linear(4, 4), nn.Linear(4, 1)
        self.seq_len_cached = 0
        self.register_buffer("cos_cached", torch.ones(0, 1), persistent=False)

    def forward(self, x):
        if x.shape[1] > self.seq_len_cached:
            self.seq_len_cached = x.shape[1]
            self.cos_cached = torch.cos(torch.arange(x.shape[1], dtype=x.dtype))[:, None]
        return self.fc(torch.tanh(self.lin(x) * self.cos_cached[:x.shape[1]])).mean(1)


class _StatefulLSTM(nn.Module):
    """Keeps its last state as a tuple of tensors, which the next forward pass starts from."""

    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 1)
        self.state = None

    def forward(self, x):
        out, state = self.rnn(x, self.state)
        self.state = tuple(s.detach() for s in state)
        return self.fc(out[:, -1])


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_passes_start_from_a_buffer_cache_as_on_entry_with_its_key(meta_gradient):
    # a buffer put back between the passes kept the key of the rebuilt cache: the next pass sliced rows the
    # restored cache lacks
    g = torch.Generator().manual_seed(0)

    def batches(length):
        return [(torch.randn(3, length, 4, generator=g), torch.randn(3, 1, generator=g)) for _ in range(3)]

    model = _BufferCache()
    opt = MetaAdamW(model.named_parameters(), meta_gradient=meta_gradient, **small_kwargs())
    _step(model, opt, batches(4)[0])
    cache, snap = model.cos_cached, _snapshot(model)
    assert not opt.meta_step(model, mse, *batches(8)).skipped  # (it raised a size mismatch)
    assert model.cos_cached is cache and model.seq_len_cached == 4
    _assert_same(model, snap)


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_passes_start_from_a_tuple_state_as_on_entry(meta_gradient):
    # a tuple of tensors was put back only at the end: each pass started from the last one's state
    # (loss_decrease 0.03 at lr 0, where theta' is theta)
    g = torch.Generator().manual_seed(0)
    b = [(torch.randn(3, 5, 4, generator=g), torch.randn(3, 1, generator=g)) for _ in range(2)]
    model = _StatefulLSTM()
    opt = MetaAdamW(model.named_parameters(), lr=0.0, meta_gradient=meta_gradient, objective="loss_decrease",
                    **small_kwargs())
    model(b[0][0])
    state = model.state
    record = opt.meta_step(model, mse, b[0], b[1], b[1])
    assert record.terms["loss_decrease"] == 0.0
    assert model.state is state


class _CacheBuiltUnderInferenceMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.fc = nn.Linear(4, 4), nn.Linear(4, 1)
        self.register_buffer("cache", None, persistent=False)

    def forward(self, x):
        if self.cache is None or self.cache.shape[0] < x.shape[1]:
            self.cache = torch.sin(torch.arange(x.shape[1], dtype=x.dtype))[:, None]
        return self.fc(torch.tanh(self.lin(x) + self.cache[:x.shape[1]])).mean(1)


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_a_buffer_made_under_inference_mode(meta_gradient):
    # (a cache whose first forward pass was a validation run under torch.inference_mode, as Lightning's
    # sanity check makes it): restoring it wrote an inference tensor outside inference mode
    model = _CacheBuiltUnderInferenceMode()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 5, 4, generator=g), torch.randn(3, 1, generator=g)) for _ in range(4)]
    with torch.inference_mode():
        model(batches[0][0])
    opt = MetaAdamW(model.named_parameters(), meta_gradient=meta_gradient, **small_kwargs())
    _step(model, opt, batches[0])
    cache, snap = model.cache, _snapshot(model)
    record = opt.meta_step(model, mse, *batches[1:])
    assert not record.skipped and all(math.isfinite(v) for v in record.terms.values())
    assert model.cache is cache
    _assert_same(model, snap)


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_an_rnn_holds_its_own_weights_after_meta_step(meta_gradient):
    # its forward pass at theta' rebuilt the list of flat weights: it held theta' (a copy of the weights,
    # with its graph) until the next forward pass
    class LastState(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 1)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    model = LastState()
    opt = MetaAdamW(model.named_parameters(), meta_gradient=meta_gradient, **small_kwargs())
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 5, 4, generator=g), torch.randn(3, 1, generator=g)) for _ in range(3)]
    flat = model.rnn._flat_weights
    assert not opt.meta_step(model, mse, *batches).skipped
    assert model.rnn._flat_weights is flat
    assert all(a is b for a, b in zip(model.rnn._flat_weights, model.rnn.parameters()))


def test_a_second_batch_that_uses_only_tensors_without_a_gradient_on_batch1_is_explained():
    # a two-head model whose batch 1 and batch 2 come from different tasks: theta' moves only the
    # tensors batch 1 trains, and the error named causes that were not it
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 1)

        def forward(self, batch):
            return (self.a if batch[2] == "a" else self.b)(batch[0])

    def loss_fn(m, batch):
        return nn.functional.mse_loss(m(batch), batch[1])

    model = TwoHeads()
    opt = MetaAdamW(model.named_parameters(), grouping="original", **small_kwargs())
    make = lambda task: (torch.randn(8, 4), torch.randn(8, 1), task)  # noqa: E731
    opt.zero_grad()
    loss_fn(model, make("a")).backward()
    with pytest.raises(ValueError, match="moves only the 2 of 4 trainable tensors that have a gradient on batch 1"):
        opt.meta_step(model, loss_fn, None, make("b"), make("b"))


def test_a_criterion_given_as_loss_fn_is_refused_with_the_call_meta_step_makes():
    # nn.MSELoss() failed deep inside the first pass with torch's "argument 'input' must be Tensor, not Sequential"
    model, batches = mlp(0), regression_batches()
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    with pytest.raises(TypeError, match=r"loss_fn is called as loss_fn\(model, batch\) -> scalar loss; got the criterion "
                                        r"MSELoss\(\), which takes \(output, target\): wrap it"):
        opt.meta_step(model, nn.MSELoss(), batches[0], batches[1], batches[2])


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_the_weight_a_hook_based_norm_computes_is_put_back(norm):
    # torch.nn.utils.weight_norm / spectral_norm (the hook-based ones) set module.weight before each forward
    # pass: after meta_step it held the last hypothetical pass's weight (and its graph) until the next forward
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (deprecated in favour of the parametrizations)
        getattr(nn.utils, norm)(model[0])
    opt = MetaAdamW(model.named_parameters(), model=model, **small_kwargs())
    batches = regression_batches(3)
    _step(model, opt, batches[0])
    weight = model[0].weight
    saved = weight.detach().clone()
    opt.meta_step(model, mse, *batches)
    assert model[0].weight is weight and torch.equal(model[0].weight, saved)


def test_meta_step_inside_parametrize_cached_evaluates_every_pass_at_its_own_weights():
    # with the parametrization cache on, every pass at theta' reused the weight cached at theta: other
    # terms, no gradient for that layer's hypothetical weights, and no word
    import contextlib

    import torch.nn.utils.parametrize as P

    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    batches = regression_batches(4)
    records = []
    for cached in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        P.register_parametrization(model[2], "weight", Double())
        opt = MetaAdamW(model.named_parameters(), model=model, objective="gen_gap", weighting="sum", **small_kwargs())
        _step(model, opt, batches[0])
        with P.cached() if cached else contextlib.nullcontext():
            before = model[2].weight
            records.append(opt.meta_step(model, mse, *batches[1:]).terms)
            assert (model[2].weight is before) == cached, "the caller's cached weight is left as it was"
        assert P._cache_enabled == 0
    assert records[1] == records[0]


def test_the_finite_difference_step_reads_float16_norms_in_float32():
    # ||theta'|| of float16 parameters came back in float16, inf above 65,504: the difference step
    # eps = sqrt(machine eps) (1 + ||theta'||) / ||v|| became inf and the Hessian-vector product NaN
    from metaadamw.meta import _global_norm

    big = torch.full((300, 300), 300.0, dtype=torch.float16)  # norm 90,000
    assert _global_norm([big, torch.ones(4, dtype=torch.bfloat16)]) == pytest.approx(90_000.0, rel=1e-3)


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_a_parametrized_max_norm_embedding(meta_gradient):
    # its weight is computed at each access and held by no module: the exact path's copy of it for the
    # validation pass was refused as "not parameters of the model"
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = _TiedMaxNormLM()
    model.out = nn.Linear(8, 11)  # (untied)
    parametrize.register_parametrization(model.emb, "weight", _Doubled())
    opt = MetaAdamW(model.named_parameters(), meta_gradient=meta_gradient, objective="combined", **small_kwargs())
    snap = _snapshot(model)
    assert not opt.meta_step(model, lm_loss, *lm_batches(3)).skipped
    _assert_same(model, snap)


def test_a_checkpointed_max_norm_embedding_tied_to_a_linear_in_the_exact_path_is_explained():
    # the last backward pass recomputes the checkpointed lookup, which renormalises theta' in place while the
    # graph holds it for the tied Linear: torch's "modified by an inplace operation", which named no cause
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(_TiedMaxNormLM):
        def forward(self, x):
            return self.out(checkpoint(lambda t: torch.tanh(self.mid(self.emb(t))), x, use_reentrant=False))

    torch.manual_seed(0)
    model = Checkpointed()
    with torch.no_grad():
        model.emb.weight.mul_(5.0)
    opt = MetaAdamW(model.named_parameters(), meta_gradient="exact", objective="combined", **small_kwargs())
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match=r"an embedding with max_norm .* Use meta_gradient='finite_difference'"):
        opt.meta_step(model, lm_loss, *lm_batches(3))
    _assert_same(model, snap)
    opt.meta_gradient = "finite_difference"
    assert not opt.meta_step(model, lm_loss, *lm_batches(3)).skipped


def test_lazy_modules_not_yet_initialised_are_explained():
    # ModelState read the uninitialised buffers of a LazyBatchNorm1d (the optimizer had nothing of it to
    # refuse: it has no parameters): torch's "Attempted to use an uninitialized parameter"
    model = nn.Sequential(nn.Linear(6, 8), nn.LazyBatchNorm1d(affine=False), nn.Tanh(), nn.Linear(8, 1))
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    with pytest.raises(ValueError, match=r"lazy modules that are not initialised yet \(LazyBatchNorm1d\): run a "
                                         r"forward pass"):
        opt.meta_step(model, mse, *regression_batches(3))
    _step(model, opt, regression_batches(3)[0])
    assert not opt.meta_step(model, mse, *regression_batches(3)).skipped


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_a_torchscript_model_gets_the_meta_update_of_the_eager_one_and_is_left_as_it_was(meta_gradient):
    # a script module's _buffers is an OrderedDictWrapper (keys() a list, no __iter__ or update):
    # restoring the model's state between the passes crashed with "TypeError: contains(): incompatible
    # function arguments", although the parameters swap into a script module as into an eager one
    def make(script):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1)).train()
        return torch.jit.script(model) if script else model

    grads = []
    for script in (False, True):
        model = make(script)
        opt = MetaAdamW(model.named_parameters(), meta_gradient=meta_gradient, meta_lr=1.0, **small_kwargs())
        batches = regression_batches(3)
        _step(model, opt, batches[0])
        snap = _snapshot(model)
        before = _meta_state(opt)
        assert not opt.meta_step(model, mse, *batches).skipped
        _assert_same(model, snap)
        grads.append(torch.cat([(b - p.detach()).flatten() for b, p in zip(before, opt.meta_parameters())]))
    assert grads[0].norm() > 1e-3
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 1e-2  # (TorchScript's BatchNorm kernels: ~1e-3)


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_a_loss_that_reads_parameters_through_references_of_its_own_is_a_clear_error(meta_gradient):
    # an L2 penalty over a list made once saw theta, not theta', in the passes at theta': the
    # penalty's part of the meta-gradient was silently lost (79% of it here), since the model's
    # own forward pass still reached theta'
    model = mlp(0)
    params = list(model.parameters())

    def loss_fn(m, batch):
        return mse(m, batch) + 0.5 * sum((p ** 2).sum() for p in params)

    opt = MetaAdamW(model.named_parameters(), meta_gradient=meta_gradient, **small_kwargs())
    batches = regression_batches(3)
    _step(model, opt, batches[0], loss_fn)
    with pytest.raises(ValueError, match=r"reads 6 parameter\(s\) of the model other than through its modules: "
                                         r"'0.weight'.*params = list\(model.parameters\(\)\)"):
        opt.meta_step(model, loss_fn, *batches)

    def model_read(m, batch):  # the same loss, reading the parameters from the model: works
        return mse(m, batch) + 0.5 * sum((p ** 2).sum() for p in m.parameters())

    assert not opt.meta_step(model, model_read, *batches).skipped


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
@pytest.mark.parametrize("own_batch1", [False, True])
def test_theta_prime_moves_a_frozen_tensor_with_a_leftover_grad_as_step_does(meta_gradient, own_batch1):
    # a frozen tensor that keeps a (zero) .grad after zero_grad(set_to_none=False) is moved by step(), as
    # torch.optim.AdamW moves it (momentum, weight decay): theta' left it where it was, so the meta-gradient
    # modelled another step than the one taken (and the features at theta left its statistics out)
    model, batches = mlp(), regression_batches()
    opt = MetaAdamW(model.named_parameters(), lr=1e-2, meta_lr=1e-30, objective="gradient", weighting="sum",
                    meta_gradient=meta_gradient, **small_kwargs())
    _step(model, opt, batches[0])
    frozen = model[0].weight
    frozen.requires_grad_(False)
    opt.zero_grad(set_to_none=False)
    mse(model, batches[0]).backward()
    seen = []

    def recording(m, b):
        if b is batches[1]:
            seen.append([p.detach().clone() for p in m.parameters()])
        return mse(m, b)

    before = [p.detach().clone() for p in model.parameters()]
    opt.meta_step(model, recording, batches[0] if own_batch1 else None, batches[1], batches[2])
    theta_prime = seen[0]  # (the first pass on batch 2: at theta')
    opt.step()
    assert not torch.equal(frozen.detach(), before[0])  # step() moved it
    for p, q in zip(model.parameters(), theta_prime):
        torch.testing.assert_close(q, p.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_the_gradient_alignment_term_leaves_out_a_frozen_tensors_gradient_at_theta_prime(meta_gradient):
    # a frozen tensor with a leftover (zero) .grad is in theta' (step() moves it), but no backward pass writes
    # its .grad: g' held its autograd gradient at theta' all the same, a gradient no step sees, and the term
    # lambda1 ||g'||^2 - lambda2 cos(g, g') was that of another model (0.456 for -0.137 here)
    model, batches = mlp(), regression_batches()
    opt = MetaAdamW(model.parameters(), lr=1e-7, weight_decay=0.0, objective="gradient", weighting="sum",
                    grouping="original", meta_gradient=meta_gradient, **small_kwargs())
    for p in model[0].parameters():
        p.requires_grad_(False)
        p.grad = torch.zeros_like(p)
    record = opt.meta_step(model, mse, *batches[:3])
    l1, l2 = record.lambda1[0], record.lambda2[0]
    frozen = list(model[0].parameters())
    trainable = [p for p in model.parameters() if all(p is not f for f in frozen)]
    # by hand, at theta (lr 1e-7: theta' is theta to ~1e-7): over the trainable tensors alone
    gp = torch.cat([x.reshape(-1) for x in torch.autograd.grad(mse(model, batches[1]), trainable)])
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(mse(model, batches[0]), trainable)])
    expected = l1 * gp.square().sum() - l2 * torch.cosine_similarity(g, gp, dim=0)
    assert record.terms["gradient"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_a_group_of_frozen_tensors_with_a_leftover_grad_takes_no_part_in_the_gradient_alignment_term(meta_gradient):
    # "a group whose tensors are all frozen takes no part" (metaadamw.objectives): with a leftover .grad its
    # tensors joined theta' and the group took part in the mean, with the frozen tensors' gradient at theta'
    model, batches = mlp(), regression_batches()
    frozen = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not f for f in frozen)]
    opt = MetaAdamW([{"params": frozen}, {"params": rest}], lr=1e-7, weight_decay=0.0, objective="gradient",
                    weighting="sum", grouping="original", meta_gradient=meta_gradient, **small_kwargs())
    for p in frozen:
        p.requires_grad_(False)
        p.grad = torch.zeros_like(p)
    record = opt.meta_step(model, mse, *batches[:3])
    l1, l2 = record.lambda1[1], record.lambda2[1]
    gp = torch.cat([x.reshape(-1) for x in torch.autograd.grad(mse(model, batches[1]), rest)])
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(mse(model, batches[0]), rest)])
    expected = l1 * gp.square().sum() - l2 * torch.cosine_similarity(g, gp, dim=0)  # (the trainable group alone)
    assert record.terms["gradient"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)


def _strict_snapshot(model):
    """Every parameter and buffer by name: the tensor itself, its values, dtype, storage and strides, and .grad."""
    return ({n: (p, p.detach().clone(), p.data_ptr(), p.stride(), p.requires_grad,
                 None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
            {n: (b, b.clone(), b.data_ptr(), b.stride()) for n, b in model.named_buffers()})


def _assert_strictly_same(model, snap):
    params, buffers = snap
    now_p, now_b = dict(model.named_parameters()), dict(model.named_buffers())
    assert list(now_p) == list(params) and list(now_b) == list(buffers)
    for n, (p, value, ptr, stride, requires_grad, grad) in params.items():
        q = now_p[n]
        assert q is p and torch.equal(q.detach(), value) and q.dtype == value.dtype, n
        assert q.data_ptr() == ptr and q.stride() == stride and q.requires_grad == requires_grad, n
        assert (q.grad is None) == (grad is None) and (grad is None or torch.equal(q.grad, grad)), n
    for n, (b, value, ptr, stride) in buffers.items():
        c = now_b[n]
        assert c is b and torch.equal(c, value) and c.dtype == value.dtype, n
        assert c.data_ptr() == ptr and c.stride() == stride, n


class _EmaInForward(nn.Module):
    """A model that updates a running mean of its inputs in each forward pass, held as a frozen
    parameter (``as_parameter``) or as a buffer."""

    def __init__(self, as_parameter: bool):
        super().__init__()
        self.lin = nn.Linear(6, 1)
        mean = torch.zeros(1, 6)
        if as_parameter:
            self.mean = nn.Parameter(mean, requires_grad=False)
        else:
            self.register_buffer("mean", mean)

    def forward(self, x):
        with torch.no_grad():
            self.mean.mul_(0.9).add_(x.mean(0, keepdim=True), alpha=0.1)
        return self.lin(x - self.mean)


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_a_parameter_a_forward_pass_writes_in_place_is_warned_of_not_left_changed_silently(meta_gradient):
    # ModelState restored buffers but not parameters: a frozen parameter (one the optimizer does not hold) that the
    # forward pass updates in place came back from meta_step holding what its passes wrote, without a word. A
    # warning, not an error: an in-place constraint (clamp_) writes without changing, and trained as before
    batches = regression_batches(3)
    for as_parameter in (True, False):
        model = _EmaInForward(as_parameter)
        opt = MetaAdamW(model.lin.named_parameters(prefix="lin"), meta_gradient=meta_gradient, **small_kwargs())
        _step(model, opt, batches[0])
        snap = _strict_snapshot(model)
        if as_parameter:
            with pytest.warns(RuntimeWarning, match=r"meta_step: the model's forward pass wrote 1 parameter\(s\) in "
                                                    r"place: 'mean'\. .* Keep state that a forward pass updates .* in a "
                                                    r"buffer \(module\.register_buffer\(name, tensor\)\)"):
                assert not opt.meta_step(model, mse, *batches).skipped
            assert not torch.equal(model.mean, snap[0]["mean"][1])  # (what the passes wrote: warned of, not undone)
            assert torch.equal(model.lin.weight, snap[0]["lin.weight"][1]) and torch.equal(model.lin.bias, snap[0]["lin.bias"][1])
        else:  # (the same state as a buffer: restored exactly)
            assert not opt.meta_step(model, mse, *batches).skipped
            _assert_strictly_same(model, snap)


def test_an_in_place_weight_constraint_in_forward_is_warned_of_and_the_meta_update_runs():
    # a forward pass that clamps its own weight in place (a positivity constraint) writes the parameter without
    # changing it: the version counters cannot tell it from an EMA's update, so it is warned of, never refused
    class Positive(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 1)

        def forward(self, x):
            with torch.no_grad():
                self.lin.weight.clamp_(min=0.0)
            return self.lin(x)

    model = Positive()
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    batches = regression_batches(3)
    _step(model, opt, batches[0])
    with torch.no_grad():
        model.lin.weight.clamp_(min=0.0)  # (as the next forward pass would: the constraint holds)
    snap = _strict_snapshot(model)
    with pytest.warns(RuntimeWarning, match=r"wrote 1 parameter\(s\) in place: 'lin\.weight'.* an in-place constraint "
                                            r"that leaves the values as they were .* is harmless"):
        assert not opt.meta_step(model, mse, *batches).skipped
    _assert_strictly_same(model, snap)  # (the clamp left every value as it was)


def test_a_parameter_a_forward_pass_registers_is_removed_again():
    # a module that registers a parameter in its forward pass (lazily, once) kept the one a meta-update pass made -
    # holding that pass's values, trained by no optimizer - and the model came back with a parameter more
    class LazyBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 1)

        def forward(self, x):
            if "shift" not in self._parameters:
                self.shift = nn.Parameter(x.mean().detach().reshape(1))
            return self.lin(x) + self.shift

    model = LazyBias()
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    batches = regression_batches(3)
    opt.zero_grad()
    mse(model.lin, batches[0]).backward()  # (a step of the layer alone: the model has no shift yet)
    opt.step()
    snap = _strict_snapshot(model)
    assert not opt.meta_step(model, mse, *batches).skipped
    _assert_strictly_same(model, snap)
    assert "shift" not in model._parameters and not hasattr(model, "shift")


def _orthogonal_mlp():
    from torch.nn.utils import parametrizations
    model = mlp(0)
    parametrizations.orthogonal(model[0])
    return model


def _weight_norm_mlp():
    from torch.nn.utils import parametrizations
    model = mlp(0)
    parametrizations.weight_norm(model[2])
    return model


def _hooked_mlp():
    model = mlp(0)
    for p in model.parameters():
        p.register_hook(lambda g: g * 0.5)
    model[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    return model


def _frozen_layer_mlp():
    model = mlp(0)
    model[0].requires_grad_(False)
    return model


class _ChannelsLastConv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("seen", torch.zeros(1, 3, 6, 6).to(memory_format=torch.channels_last))
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        with torch.no_grad():
            self.seen.mul_(0.9).add_(x.mean(0, keepdim=True), alpha=0.1)
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _channels_last_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 6, 6, generator=g).to(memory_format=torch.channels_last), torch.randn(4, 1, generator=g))
            for _ in range(3)]


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
@pytest.mark.parametrize("make", [_orthogonal_mlp, _weight_norm_mlp, _hooked_mlp, _frozen_layer_mlp,
                                  lambda: _ChannelsLastConv().to(memory_format=torch.channels_last)],
                         ids=["orthogonal", "weight_norm", "grad_hooks", "frozen_layer", "channels_last"])
def test_models_of_every_kind_are_left_exactly_as_they_were(make, meta_gradient):
    # the tensors themselves (not copies), their values, storage, strides (channels_last), requires_grad and .grad
    model = make()
    batches = _channels_last_batches() if isinstance(model, _ChannelsLastConv) else regression_batches(3)
    opt = MetaAdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], meta_gradient=meta_gradient,
                    **small_kwargs())
    _step(model, opt, batches[0])
    mse(model, batches[1]).backward()  # (a .grad left behind)
    snap = _strict_snapshot(model)
    assert not opt.meta_step(model, mse, *batches).skipped
    _assert_strictly_same(model, snap)
    assert opt.meta_step(model, mse, None, *batches[1:]).step == 1  # (g from .grad: left as it was too)
    _assert_strictly_same(model, snap)


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_a_loss_fn_that_sets_the_training_mode_leaves_the_callers_mode_as_it_was(meta_gradient):
    # a loss_fn that calls model.train() (as a training loop's does) left a model its caller had put in eval
    # mode in training mode: the evaluation after meta_step ran with dropout and moved BatchNorm's statistics
    def loss_in_train_mode(model, batch):
        model.train()
        return mse(model, batch)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 1))
    opt = MetaAdamW(model.named_parameters(), meta_gradient=meta_gradient, **small_kwargs())
    batches = regression_batches(4)
    _step(model, opt, batches[0], loss_in_train_mode)
    model.eval()
    snap = _strict_snapshot(model)
    assert not opt.meta_step(model, loss_in_train_mode, *batches[1:]).skipped
    _assert_strictly_same(model, snap)
    assert not any(m.training for m in model.modules())
