"""Values checked against independent references: the features against their formulas, the feature
gates against a gate-less modulator fed gated features, the meta-gradient against a plain-autograd
implementation of the meta-update (theta' through torch.func.functional_call, a double backward),
the weightings' meta-loss against the weighted sum by hand, and the meta-update's options (ranges,
fixed weights, priorities in both forms, gates and their penalty, a term alone) against a float64
reference of the whole meta-update that takes only the encoder from the library."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metaadamw import MetaAdamW
from tests.metaadamw.helpers import mlp, mse, randomise_head, regression_batches, small_kwargs


def _step(model, opt, batch, loss_fn=mse):
    opt.zero_grad()
    loss_fn(model, batch).backward()
    opt.step()


# -- features against their formulas ----------------------------------------------------------------

class _Stack(nn.Module):
    """layers.0-2 (depths 0, 0.5, 1) and a head (no index, after the indexed layers: depth 1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)])
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def _per_tensor_stats(g, m, v, theta):
    """The basic per-tensor statistics by their definitions: norms of g, m and theta, cos(g, m) and
    sqrt(sum(v))."""
    return {
        "grad_norm": torch.stack([gk.norm() for gk in g]),
        "exp_avg_norm": torch.stack([mk.norm() for mk in m]),
        "param_norm": torch.stack([p.norm() for p in theta]),
        "cos": torch.stack([(gk * mk).sum() / (gk.norm() * mk.norm()) for gk, mk in zip(g, m)]),
        "v_norm": torch.stack([vk.sum().sqrt() for vk in v]),
    }


def _feature_batches(n=3):
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        x[:, 0] = 0.0  # input 0 is never seen: column 0 of layers.0.weight has zero gradient and moment
        batches.append((x, torch.randn(16, 1, generator=g)))
    return batches


BASIC_NAMES = ["grad_norm", "exp_avg_norm", "param_norm", "cos"]
EXPECTED_NAMES = {
    ("basic", True, True): BASIC_NAMES + ["v_norm", "time"],
    ("basic", False, False): BASIC_NAMES,
    ("basic_plus", True, True): [f"{n}_mean" for n in BASIC_NAMES] + [f"{n}_std" for n in BASIC_NAMES]
    + ["v_norm_std", "v_norm", "time"],
    ("enhanced", True, True): ["grad_norm_mean", "grad_norm_var", "exp_avg_norm_mean", "exp_avg_norm_var",
                               "grad_sparsity", "exp_avg_sparsity", "log10_numel", "bias_ratio", "depth", "v_norm",
                               "time"] + [f"embedding_{i}" for i in range(4)],
}


@pytest.mark.parametrize("features,time_step,second_moment,foreach", [
    ("basic", True, True, True),
    ("basic", True, True, False),
    ("basic", False, False, True),
    ("basic_plus", True, True, True),
    ("basic_plus", True, True, False),
    ("enhanced", True, True, True),
])
def test_features_equal_their_formulas(features, time_step, second_moment, foreach):
    torch.manual_seed(0)
    model = _Stack()
    L = model.layers
    # two param groups, each with tensors of several layers (the features are per-group means)
    group_a = [("layers.0.weight", L[0].weight), ("layers.0.bias", L[0].bias), ("layers.1.weight", L[1].weight)]
    group_b = [("layers.1.bias", L[1].bias), ("layers.2.weight", L[2].weight), ("layers.2.bias", L[2].bias),
               ("head.weight", model.head.weight), ("head.bias", model.head.bias)]
    tensors = [p for _, p in group_a + group_b]
    groups = [list(range(len(group_a))), list(range(len(group_a), len(tensors)))]
    total_steps, b1, b2 = 10, 0.9, 0.999
    opt = MetaAdamW([{"params": [p for _, p in group_a]}, {"params": [p for _, p in group_b]}], model=model,
                    grouping="original", features=features, time_step=time_step, second_moment=second_moment,
                    foreach=foreach, total_steps=total_steps, weight_decay=0.1, lr=1e-2, betas=(b1, b2),
                    modulator_heads=1, **small_kwargs())
    extractor = opt.modulator.extractor
    names = extractor.feature_names
    assert names == EXPECTED_NAMES[(features, time_step, second_moment)]
    seen = []
    extractor.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))

    # the static columns, by hand from the parameter names and sizes
    depth = {"layers.0": 0.0, "layers.1": 0.5, "layers.2": 1.0, "head": 1.0}
    static = {
        "log10_numel": torch.tensor([math.log10(1 + 20 + 5 + 25), math.log10(1 + 5 + 15 + 3 + 3 + 1)],
                                    dtype=torch.float64),
        "bias_ratio": torch.tensor([1 / 3, 3 / 5], dtype=torch.float64),
        "depth": torch.tensor([sum(depth[n.rsplit(".", 1)[0]] for n, _ in grp) / len(grp)
                               for grp in (group_a, group_b)], dtype=torch.float64),
    }
    assert torch.allclose(static["depth"], torch.tensor([1 / 6, 0.9], dtype=torch.float64))

    m = [torch.zeros_like(p, dtype=torch.float64) for p in tensors]
    v = [torch.zeros_like(p, dtype=torch.float64) for p in tensors]
    for t, batch in enumerate(_feature_batches(), start=1):
        opt.zero_grad()
        mse(model, batch).backward()
        g = [p.grad.detach().double() for p in tensors]
        theta = [p.detach().double() for p in tensors]
        m = [b1 * mk + (1 - b1) * gk for mk, gk in zip(m, g)]
        v = [b2 * vk + (1 - b2) * gk * gk for vk, gk in zip(v, g)]
        opt.step()
        per_tensor = {
            **_per_tensor_stats(g, m, v, theta),
            "grad_sparsity": torch.stack([(gk == 0).double().mean() for gk in g]),
            "exp_avg_sparsity": torch.stack([(mk == 0).double().mean() for mk in m]),
        }
        if t == 1:
            assert per_tensor["grad_sparsity"][0] == 0.25  # (the zero column is there to be counted)

        def mean(stat):
            return torch.stack([per_tensor[stat][idx].mean() for idx in groups])

        def std(stat):
            return torch.stack([per_tensor[stat][idx].std(unbiased=False) for idx in groups])

        expected = []
        for name in names:
            if name in per_tensor:
                col = mean(name)
            elif name.endswith("_mean"):
                col = mean(name[:-5])
            elif name.endswith("_std"):
                col = std(name[:-4])
            elif name.endswith("_var"):
                col = std(name[:-4]) ** 2
            elif name in static:
                col = static[name]
            elif name == "time":
                col = torch.full((2,), t / total_steps, dtype=torch.float64)
            else:
                col = extractor.embedding[:, int(name.split("_")[1])].detach().double()
            expected.append(col)
        expected = torch.stack(expected, 1)
        got = seen[-1]
        assert got.shape == (2, len(names))
        for j, name in enumerate(names):
            torch.testing.assert_close(got[:, j].double(), expected[:, j], rtol=1e-4, atol=1e-6,
                                       msg=lambda msg, name=name, t=t: f"feature {name!r} at step {t}: {msg}")
    assert len(seen) == 3


# -- feature gates ------------------------------------------------------------------------------------

def test_feature_gates_scale_the_features_the_encoder_sees():
    torch.manual_seed(0)
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), gating=True, **small_kwargs())
    modulator = opt.modulator
    width = modulator.in_width
    with torch.no_grad():
        modulator.gate.logits.copy_(torch.linspace(-3.0, 3.0, width))
    gates = torch.sigmoid(modulator.gate.logits.detach())
    ungated = copy.deepcopy(modulator)
    ungated.gate = None  # the same encoder and head, fed features that are gated by hand
    seen = []
    modulator.extractor.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    batches = regression_batches(3)
    _step(model, opt, batches[0])
    features = seen[-1]
    assert features.shape == (len(opt.group_names), width) and features.abs().min() > 0

    def alpha_beta(raw):  # alpha = 1 + alpha_range (sigmoid - 1/2), likewise beta (ranges 1)
        return 0.5 + torch.sigmoid(raw[:, 0]), 0.5 + torch.sigmoid(raw[:, 1])

    with torch.no_grad():
        # the meta-update's path (encode, with autograd) and the step's path (infer)
        reference = ungated.encode(features * gates)
        torch.testing.assert_close(modulator.encode(features), reference, rtol=1e-5, atol=1e-6)
        assert (ungated.encode(features) - reference).abs().max() > 1e-3, "the gates must change the outputs"
        alpha, beta = alpha_beta(reference)
        torch.testing.assert_close(opt.multipliers.alpha, alpha, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.multipliers.beta, beta, rtol=1e-5, atol=1e-6)

        # closed gates: the encoder sees zeros, whatever the statistics
        modulator.gate.logits.fill_(-60.0)
    _step(model, opt, batches[1])
    with torch.no_grad():
        alpha, beta = alpha_beta(ungated.encode(torch.zeros_like(features)))
        open_alpha, _ = alpha_beta(ungated.encode(seen[-1]))
    torch.testing.assert_close(opt.multipliers.alpha, alpha, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.multipliers.beta, beta, rtol=1e-5, atol=1e-6)
    assert (open_alpha - alpha).abs().max() > 1e-3


# -- the meta-gradient against a plain-autograd meta-update --------------------------------------------

class _RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps the gradients it applied."""

    def __init__(self, params, lr, weight_decay):
        super().__init__(params, lr=lr, weight_decay=weight_decay)
        self.applied = []

    @torch.no_grad()
    def step(self, closure=None):
        self.applied.append([None if p.grad is None else p.grad.detach().clone()
                             for group in self.param_groups for p in group["params"]])
        return super().step(closure)


# three param groups with their own learning rates and weight decays (grouping "original")
GROUP_HYPER = [dict(lr=1e-2, weight_decay=0.2), dict(lr=2e-2, weight_decay=0.05), dict(lr=5e-3, weight_decay=0.5)]
TOTAL_STEPS = 10


def _at_theta(model, opt, params, batch1, val_batch):
    """g on batch 1, L(theta; val), theta and the AdamW moments after one more step with g (AdamW's betas
    as the optimizer's defaults)."""
    b1, b2 = opt.defaults["betas"]
    g = [x.detach() for x in torch.autograd.grad(mse(model, batch1), params)]
    with torch.no_grad():
        loss_val = mse(model, val_batch)
    m = [b1 * opt.state[p]["exp_avg"] + (1 - b1) * gk for p, gk in zip(params, g)]
    v = [b2 * opt.state[p]["exp_avg_sq"] + (1 - b2) * gk * gk for p, gk in zip(params, g)]
    return g, loss_val, [p.detach() for p in params], m, v


def _losses_at(model, names, theta_prime, batch2, val_batch):
    """L(theta'; batch 2), its gradient at theta' (with a graph, for the second order) and L(theta'; val),
    the model called with theta' by ``functional_call``."""
    hypothetical = dict(zip(names, theta_prime))

    def loss_at(batch):
        x, y = batch
        return ((functional_call(model, hypothetical, (x,)) - y) ** 2).mean()

    loss_train_prime = loss_at(batch2)
    return loss_train_prime, torch.autograd.grad(loss_train_prime, theta_prime, create_graph=True), loss_at(val_batch)


def _reference_meta_update(model, opt, modulator, weighting, objective, batch1, batch2, val_batch, steps_done):
    """The meta-loss, its terms and its gradient for (modulator, weighting) parameters, written
    directly: g, the hypothetical AdamW moments and step, the basic features by hand, then one
    autograd graph through theta' (functional_call) with g' from create_graph=True."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    group_of = [i // 2 for i in range(len(params))]  # (weight, bias) of each Linear: one param group each
    n_groups = len(GROUP_HYPER)
    b1, b2 = opt.defaults["betas"]
    eps = opt.defaults["eps"]
    t = steps_done + 1

    g, loss_val, theta, m, v = _at_theta(model, opt, params, batch1, val_batch)
    mult = modulator(_per_tensor_stats(g, m, v, theta), torch.tensor(t / TOTAL_STEPS))

    theta_prime = []
    for i, p in enumerate(theta):
        hyper, k = GROUP_HYPER[group_of[i]], group_of[i]
        alpha, beta = mult.alpha[k], mult.beta[k]
        direction = (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
        theta_prime.append(p * (1 - hyper["lr"] * hyper["weight_decay"] * alpha * beta)
                           - hyper["lr"] * alpha * direction)
    loss_train_prime, g_prime, loss_val_prime = _losses_at(model, names, theta_prime, batch2, val_batch)
    per_group = []
    for k in range(n_groups):
        idx = [i for i in range(len(params)) if group_of[i] == k]
        sq_prime = sum((g_prime[i] ** 2).sum() for i in idx)
        sq = sum((g[i] ** 2).sum() for i in idx)
        dot = sum((g_prime[i] * g[i]).sum() for i in idx)
        per_group.append(mult.lambda1[k] * sq_prime - mult.lambda2[k] * dot / (sq.sqrt() * sq_prime.sqrt()))
    all_terms = {"gradient": torch.stack(per_group).mean(), "loss_decrease": loss_val_prime - loss_val,
                 "gen_gap": (loss_train_prime - loss_val_prime).abs()}
    order = ["gradient"] if objective == "gradient" else ["gradient", "loss_decrease", "gen_gap"]
    terms = [all_terms[name] for name in order]
    if isinstance(weighting, torch.Tensor):  # huw, regression form: log-variances s
        signed = {"gradient", "loss_decrease"}
        values = [F.softplus(x) if name in signed else x for name, x in zip(order, terms)]
        loss = sum(0.5 * (torch.exp(-s) * x + s) for s, x in zip(weighting, values))
        wrt = list(modulator.parameters()) + [weighting]
    else:
        loss = sum(terms)
        wrt = list(modulator.parameters())
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(p) if d is None else d for d, p in zip(grads, wrt)]
    return float(loss.detach()), {name: float(x.detach()) for name, x in zip(order, terms)}, grads


def _meta_setup(meta_gradient, weighting, objective, meta_lr=0.1):
    b0, b1, b2, val = regression_batches(4)
    model = mlp(0)
    linears = [model[0], model[2], model[4]]
    torch.manual_seed(1)
    opt = MetaAdamW([{"params": [lin.weight, lin.bias], **hyper} for lin, hyper in zip(linears, GROUP_HYPER)],
                    model=model, grouping="original", features="basic", total_steps=TOTAL_STEPS,
                    meta_gradient=meta_gradient, weighting=weighting, objective=objective, meta_lr=meta_lr,
                    meta_optimizer=_RecordingSGD, modulator_layers=2, modulator_heads=2, modulator_ff=8)
    _step(model, opt, b0)
    return model, opt, (b1, b2, val)


@pytest.mark.parametrize("meta_gradient,rtol", [("exact", 2e-5), ("finite_difference", 2e-3)])
@pytest.mark.parametrize("weighting,objective", [("sum", "combined"), ("huw", "combined"), ("sum", "gradient")])
def test_meta_gradient_equals_plain_autograd_reference(meta_gradient, rtol, weighting, objective):
    meta_lr = 0.1
    model, opt, batches = _meta_setup(meta_gradient, weighting, objective, meta_lr)
    modulator = copy.deepcopy(opt.modulator)
    log_vars = None
    if weighting == "huw":  # away from 0, so that exp(-s) and the regulariser both matter
        with torch.no_grad():
            opt.weighting.log_vars.copy_(torch.tensor([0.4, -0.3, 0.7]))
        log_vars = opt.weighting.log_vars.detach().clone().requires_grad_()
    ref_loss, ref_terms, ref_grads = _reference_meta_update(model, opt, modulator, log_vars, objective, *batches,
                                                            steps_done=1)
    before = [p.detach().clone() for p in opt.meta_parameters()]

    record = opt.meta_step(model, mse, *batches)

    assert not record.skipped
    assert record.terms == pytest.approx(ref_terms, rel=1e-5, abs=1e-7)
    assert record.meta_loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    (applied,) = opt.meta_optimizer.applied
    assert len(applied) == len(ref_grads) == len(before)
    applied = [torch.zeros_like(p) if d is None else d for d, p in zip(applied, before)]
    flat_applied = torch.cat([d.flatten() for d in applied]).double()
    flat_ref = torch.cat([d.flatten() for d in ref_grads]).double()
    rel = float((flat_applied - flat_ref).norm() / flat_ref.norm())
    assert rel < rtol, f"meta-gradient relative error {rel:.2e} (reference norm {float(flat_ref.norm()):.3e})"
    # and SGD applied exactly that: delta = -meta_lr * gradient
    for p, b, d in zip(opt.meta_parameters(), before, applied):
        torch.testing.assert_close(b - p.detach(), meta_lr * d, rtol=1e-3, atol=1e-7)


# -- lambda1 / lambda2 get their meta-gradient from the gradient-alignment objective ----------------

@pytest.mark.parametrize("meta_gradient", ["exact", "finite_difference"])
def test_lambda_head_rows_are_trained_by_the_gradient_objective_alone(meta_gradient):
    rows_moved = {}
    for objective in ("gradient", "loss_decrease"):
        model, opt, batches = _meta_setup(meta_gradient, "sum", objective, meta_lr=1.0)
        head = opt.modulator.head
        w, b = head.weight.detach().clone(), head.bias.detach().clone()
        with torch.no_grad():
            mult = opt.multipliers
            assert ((mult.lambda1 > 0.05) & (mult.lambda1 < 0.95)).all()  # sigmoid not saturated
        record = opt.meta_step(model, mse, *batches)
        assert not record.skipped
        moved = (head.weight.detach() - w).abs().sum(1) + (head.bias.detach() - b).abs()
        rows_moved[objective] = moved
        if objective == "gradient":
            # d meta-loss / d lambda1_g = ||g'_g||^2 / groups > 0: SGD lowers the lambda1 bias
            assert head.bias.detach()[2] < b[2]
            position = next(i for i, p in enumerate(opt.meta_parameters()) if p is head.bias)
            d_bias = opt.meta_optimizer.applied[0][position]
            assert d_bias[2] > 0 and d_bias[3] != 0
    # [alpha, beta, lambda1, lambda2]: the gradient objective moves the lambda rows, loss_decrease
    # (which does not read lambda) leaves them exactly alone and moves alpha and beta only
    assert (rows_moved["gradient"][2:] > 1e-6).all(), rows_moved["gradient"].tolist()
    assert (rows_moved["loss_decrease"][2:] == 0).all(), rows_moved["loss_decrease"].tolist()
    assert (rows_moved["loss_decrease"][:2] > 0).all(), rows_moved["loss_decrease"].tolist()


# -- the weightings' meta-loss by hand ------------------------------------------------------------

def _softplus(x):
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("form", ["regression", "classification"])
@pytest.mark.parametrize("weighting", ["sum", "fixed", "huw", "huw_priority"])
def test_meta_loss_is_the_weighted_sum_of_the_terms(weighting, form):
    fixed, priorities, log_vars = [0.5, 2.0, 3.0], [2.0, 5.0, 1.0], [0.4, -0.3, 0.7]
    model = mlp(0)
    torch.manual_seed(0)
    opt = MetaAdamW(model.named_parameters(), weighting=weighting, weighting_form=form,
                    fixed_weights=fixed if weighting == "fixed" else None,
                    priorities=priorities if weighting == "huw_priority" else (1.0, 1.0, 1.0), **small_kwargs())
    if weighting.startswith("huw"):
        with torch.no_grad():
            opt.weighting.log_vars.copy_(torch.tensor(log_vars))
    b0, b1, b2, val = regression_batches(4)
    _step(model, opt, b0)
    record = opt.meta_step(model, mse, b1, b2, val)
    assert not record.skipped
    terms = [record.terms[t] for t in ("gradient", "loss_decrease", "gen_gap")]
    assert all(x != 0 for x in terms)
    if weighting == "sum":
        expected = sum(terms)
    elif weighting == "fixed":
        expected = sum(w * x for w, x in zip(fixed, terms))
    else:
        p = priorities if weighting == "huw_priority" else [1.0, 1.0, 1.0]
        scale = 0.5 if form == "regression" else 1.0
        values = [_softplus(terms[0]), _softplus(terms[1]), terms[2]]  # the signed terms through softplus
        expected = sum(scale * (math.exp(-s) * x + pi * s) for s, x, pi in zip(log_vars, values, p))
        assert record.sigmas == pytest.approx(
            dict(zip(("gradient", "loss_decrease", "gen_gap"), [math.exp(s / 2) for s in log_vars])), rel=1e-6)
    assert record.meta_loss == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_fixed_weights_follow_the_terms_of_the_objective():
    # weights are given in the order (gradient, loss_decrease, gen_gap): loss_decrease alone takes the second
    model = mlp(0)
    torch.manual_seed(0)
    opt = MetaAdamW(model.named_parameters(), objective="loss_decrease", weighting="fixed",
                    fixed_weights=[0.5, 2.0, 3.0], **small_kwargs())
    b0, b1, b2, val = regression_batches(4)
    _step(model, opt, b0)
    record = opt.meta_step(model, mse, b1, b2, val)
    assert set(record.terms) == {"loss_decrease"} and record.terms["loss_decrease"] != 0
    assert record.meta_loss == pytest.approx(2.0 * record.terms["loss_decrease"], rel=1e-6, abs=1e-9)


# -- the options the tests above leave at their defaults, against a float64 reference ------------------

RANGES = (0.6, 1.7)  # alpha_range, beta_range: not 1, so that a range read as 1 (or swapped) shows
BASIC_COLUMNS = ["grad_norm", "exp_avg_norm", "param_norm", "cos", "v_norm"]  # then the time step
META_OPTIONS = {
    "fixed": dict(objective="combined", weighting="fixed", fixed_weights=[0.5, 2.0, 3.0]),
    "huw_priority-regression": dict(objective="combined", weighting="huw_priority", priorities=[2.0, 5.0, 1.0]),
    "huw_priority-classification": dict(objective="combined", weighting="huw_priority",
                                        weighting_form="classification", priorities=[5.0, 2.0, 1.0]),
    "gating": dict(objective="combined", weighting="sum", gating=True, gate_l1=0.05),
    # a term alone takes its own weight / priority (the second, the third), not the first
    "loss_decrease": dict(objective="loss_decrease", weighting="huw_priority", priorities=[2.0, 5.0, 1.0]),
    "gen_gap": dict(objective="gen_gap", weighting="fixed", fixed_weights=[0.5, 2.0, 3.0]),
}


def _reference_meta_update64(model, opt, options, batch1, batch2, val_batch, steps_done):
    """The meta-loss, its terms, the multipliers and the meta-gradient in float64, from the design's
    formulas: the basic features (group means of the per-tensor statistics, then t / total_steps) by
    hand, the feature gates and their L1 penalty ``gate_l1 * sum(sigmoid(logits))`` by hand, only the
    encoder and head (``encode`` of a gate-less float64 copy) from the library; alpha and beta with
    the ranges, theta' = one AdamW step with them, the terms of the objective and their weighting
    (fixed weights and priorities by term name; HUW's signed terms through softplus, as above)."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    group_of = [i // 2 for i in range(len(params))]
    groups = [[i for i in range(len(params)) if group_of[i] == k] for k in range(len(GROUP_HYPER))]
    b1, b2 = opt.defaults["betas"]
    eps = opt.defaults["eps"]
    t = steps_done + 1
    modulator = copy.deepcopy(opt.modulator).double()
    wrt = list(modulator.parameters())  # in the order of opt.meta_parameters(): gate logits first
    logits = None
    if modulator.gate is not None:
        logits, modulator.gate = modulator.gate.logits, None
    weighting = options["weighting"]
    log_vars = None
    if weighting.startswith("huw"):
        log_vars = opt.weighting.log_vars.detach().double().clone().requires_grad_()
        wrt.append(log_vars)

    g, loss_val, theta, m, v = _at_theta(model, opt, params, batch1, val_batch)
    stats = _per_tensor_stats(g, m, v, theta)
    features = torch.stack([torch.stack([stats[name][idx].mean() for name in BASIC_COLUMNS]
                                        + [torch.tensor(t / TOTAL_STEPS, dtype=torch.float64)]) for idx in groups])
    if logits is not None:
        features = features * torch.sigmoid(logits)
    raw = modulator.encode(features)
    alpha = 1 + RANGES[0] * (torch.sigmoid(raw[:, 0]) - 0.5)
    beta = 1 + RANGES[1] * (torch.sigmoid(raw[:, 1]) - 0.5)
    lambda1, lambda2 = torch.sigmoid(raw[:, 2]), torch.sigmoid(raw[:, 3])

    theta_prime = []
    for i, p in enumerate(theta):
        hyper, k = GROUP_HYPER[group_of[i]], group_of[i]
        direction = (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
        theta_prime.append(p - hyper["lr"] * alpha[k] * (direction + beta[k] * hyper["weight_decay"] * p))
    loss_train_prime, g_prime, loss_val_prime = _losses_at(model, names, theta_prime, batch2, val_batch)
    per_group = []
    for k, idx in enumerate(groups):
        sq_prime = sum((g_prime[i] ** 2).sum() for i in idx)
        sq = sum((g[i] ** 2).sum() for i in idx)
        dot = sum((g_prime[i] * g[i]).sum() for i in idx)
        per_group.append(lambda1[k] * sq_prime - lambda2[k] * dot / (sq.sqrt() * sq_prime.sqrt()))
    all_terms = {"gradient": torch.stack(per_group).mean(), "loss_decrease": loss_val_prime - loss_val,
                 "gen_gap": (loss_train_prime - loss_val_prime).abs()}
    every = ["gradient", "loss_decrease", "gen_gap"]
    order = every if options["objective"] == "combined" else [options["objective"]]
    terms = [all_terms[name] for name in order]
    if weighting == "sum":
        loss = sum(terms)
    elif weighting == "fixed":
        loss = sum(options["fixed_weights"][every.index(name)] * x for name, x in zip(order, terms))
    else:
        p = options.get("priorities", [1.0, 1.0, 1.0]) if weighting == "huw_priority" else [1.0, 1.0, 1.0]
        scale = 0.5 if options.get("weighting_form", "regression") == "regression" else 1.0
        values = [F.softplus(x) if name in ("gradient", "loss_decrease") else x for name, x in zip(order, terms)]
        loss = sum(scale * (torch.exp(-s) * x + p[every.index(name)] * s)
                   for s, name, x in zip(log_vars, order, values))
    if logits is not None:
        loss = loss + options["gate_l1"] * torch.sigmoid(logits).sum()
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(p) if d is None else d for d, p in zip(grads, wrt)]
    multipliers = {"alpha": alpha, "beta": beta, "lambda1": lambda1, "lambda2": lambda2}
    return (float(loss.detach()), {name: float(x.detach()) for name, x in zip(order, terms)},
            {name: x.detach().tolist() for name, x in multipliers.items()}, grads)


@pytest.mark.parametrize("meta_gradient", ["exact", "finite_difference"])
@pytest.mark.parametrize("case", list(META_OPTIONS))
def test_meta_update_options_equal_float64_reference(case, meta_gradient):
    # A float64 model: theta', g', the losses and the finite-difference Hessian-vector product (step
    # ~1e-8) are float64 on both sides; only the library's features, modulator and log-variances are
    # float32 (rounding ~6e-8): the values agree to ~1e-7, the gradient to <= 2e-6 (sum weighting, whose
    # terms' gradients partly cancel): 1e-6 on values, 1e-5 on the gradient.
    options = META_OPTIONS[case]
    b0, b1, b2, val = [(x.double(), y.double()) for x, y in regression_batches(4)]
    model = mlp(0).double()
    linears = [model[0], model[2], model[4]]
    torch.manual_seed(1)
    opt = MetaAdamW([{"params": [lin.weight, lin.bias], **hyper} for lin, hyper in zip(linears, GROUP_HYPER)],
                    model=model, grouping="original", features="basic", total_steps=TOTAL_STEPS,
                    alpha_range=RANGES[0], beta_range=RANGES[1], meta_gradient=meta_gradient, meta_lr=0.1,
                    meta_optimizer=_RecordingSGD, **small_kwargs(modulator_heads=2), **options)
    randomise_head(opt)  # multipliers and lambdas that differ between groups
    with torch.no_grad():
        if options["weighting"].startswith("huw"):
            opt.weighting.log_vars.copy_(torch.tensor([0.4, -0.3, 0.7])[:len(opt.weighting.log_vars)])
        if opt.modulator.gate is not None:  # gates neither closed nor open, each its own
            opt.modulator.gate.logits.copy_(torch.linspace(-1.0, 2.0, opt.modulator.in_width))
    _step(model, opt, b0)
    ref_loss, ref_terms, ref_multipliers, ref_grads = _reference_meta_update64(model, opt, options, b1, b2, val,
                                                                               steps_done=1)
    # multipliers well away from 1, so that a range read wrongly (as 1, or alpha's for beta's) shows
    assert min(abs(a - 1) for a in ref_multipliers["alpha"]) > 0.1
    assert max(abs(b - 1) for b in ref_multipliers["beta"]) > 0.3

    record = opt.meta_step(model, mse, b1, b2, val)

    assert not record.skipped
    assert record.terms == pytest.approx(ref_terms, rel=1e-6, abs=1e-9)
    assert record.meta_loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-9)
    for name, values in ref_multipliers.items():
        assert getattr(record, name) == pytest.approx(values, rel=1e-6), name
    (applied,) = opt.meta_optimizer.applied
    metas = list(opt.meta_parameters())
    assert len(applied) == len(ref_grads) == len(metas)
    applied = [torch.zeros_like(p) if d is None else d for d, p in zip(applied, metas)]
    flat_applied = torch.cat([d.flatten() for d in applied]).double()
    flat_ref = torch.cat([d.flatten() for d in ref_grads])
    rel = float((flat_applied - flat_ref).norm() / flat_ref.norm())
    assert rel < 1e-5, f"meta-gradient relative error {rel:.2e} (reference norm {float(flat_ref.norm()):.3e})"
    if opt.modulator.gate is not None:  # the gates' own gradient, penalty included
        torch.testing.assert_close(applied[0].double(), ref_grads[0], rtol=1e-5, atol=1e-9)
