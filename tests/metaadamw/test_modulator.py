"""The modulator's encoder layer: the same function as torch's post-norm encoder layer, and its
cached parameter tuple always the layer's current parameters."""

import contextlib
import copy

import pytest
import torch
from torch import nn

from metaadamw.modulator import EncoderLayer


def _twin(layer: EncoderLayer, dropout: float) -> nn.TransformerEncoderLayer:
    """``nn.TransformerEncoderLayer`` (post-norm, ReLU) holding ``layer``'s weights."""
    width = layer.in_proj.in_features
    ref = nn.TransformerEncoderLayer(width, layer.heads, layer.linear1.out_features, dropout=dropout,
                                     batch_first=True)
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(layer.in_proj.weight)
        ref.self_attn.in_proj_bias.copy_(layer.in_proj.bias)
        ref.self_attn.out_proj.weight.copy_(layer.out_proj.weight)
        ref.self_attn.out_proj.bias.copy_(layer.out_proj.bias)
        for name in ("linear1", "linear2", "norm1", "norm2"):
            getattr(ref, name).load_state_dict(getattr(layer, name).state_dict())
    return ref


def _randomised(layer: EncoderLayer) -> EncoderLayer:
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


@pytest.mark.parametrize("width,heads,tokens", [(6, 6, 5), (8, 2, 1), (12, 3, 7)])
def test_encoder_layer_is_torchs_post_norm_layer(width, heads, tokens):
    torch.manual_seed(0)
    layer = _randomised(EncoderLayer(width, heads, 16))
    ref = _twin(layer, 0.0).train()  # train mode: no fast path, the composite ops
    x = torch.randn(tokens, width, requires_grad=True)
    out = layer(x)
    expected = ref(x.unsqueeze(0)).squeeze(0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the same gradients, for the input and for every weight
    w = torch.randn(tokens, width)
    ours = torch.autograd.grad((out * w).sum(), [x, layer.in_proj.weight, layer.out_proj.bias, layer.linear1.weight,
                                                  layer.norm1.weight, layer.norm2.bias])
    theirs = torch.autograd.grad((expected * w).sum(), [x, ref.self_attn.in_proj_weight, ref.self_attn.out_proj.bias,
                                                         ref.linear1.weight, ref.norm1.weight, ref.norm2.bias])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the eager and the fused inference paths too
        torch.testing.assert_close(layer.infer_eager(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.infer(x), expected, rtol=1e-5, atol=1e-5)


def test_encoder_layer_dropout_applies_in_training_only():
    torch.manual_seed(0)
    layer = _randomised(EncoderLayer(8, 2, 16, dropout=0.5))
    x = torch.randn(6, 8, requires_grad=True)
    layer.eval()
    clean = layer(x)
    torch.testing.assert_close(clean, _twin(layer, 0.5).eval()(x.unsqueeze(0)).squeeze(0), rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    b = layer(x)
    assert torch.equal(a, b), "the masks come from torch's random stream"
    assert (a - clean).abs().max() > 1e-2, "dropout 0.5 must change the output in training mode"
    grad, = torch.autograd.grad(a.sum(), [layer.linear2.weight])
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_cached_weights_follow_replaced_parameters():
    torch.manual_seed(0)
    layer = _randomised(EncoderLayer(6, 3, 16))
    other = _randomised(EncoderLayer(6, 3, 16))
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = _twin(other, 0.0).eval()(x.unsqueeze(0)).squeeze(0)
    # load_state_dict(assign=True) puts the state dict's tensors in as new parameter objects
    layer.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
    with torch.no_grad():
        torch.testing.assert_close(layer.infer(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.infer_eager(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # a dtype change makes new parameter objects (without the swap/overwrite futures, .data is set)
    double = layer.double()
    assert all(w.dtype == torch.float64 for w in double._weights)
    assert {id(w) for w in double._weights} == {id(p) for p in double.parameters()}
    torch.testing.assert_close(double(x.double()), expected.double(), rtol=1e-5, atol=1e-5)


def test_the_layer_uses_the_tensors_put_in_its_parameters_places():
    # torch.func.functional_call and a parameter replaced by assignment put other tensors in the
    # submodules' places: the cached tuple must not keep computing with the old ones (it did: the
    # encoder's output, and its gradient, ignored them without a word)
    torch.manual_seed(0)
    layer = _randomised(EncoderLayer(6, 3, 16))
    other = _randomised(EncoderLayer(6, 3, 16))
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = _twin(other, 0.0).eval()(x.unsqueeze(0)).squeeze(0)
    replaced = {k: v.detach().clone().requires_grad_() for k, v in other.named_parameters()}
    out = torch.func.functional_call(layer, replaced, (x,))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), list(replaced.values()), allow_unused=True)
    assert all(g is not None for g in grads), [k for k, g in zip(replaced, grads) if g is None]
    # a parameter replaced by assignment: the autograd pass and the inference paths alike
    for name in ("in_proj", "out_proj", "norm1", "linear1", "linear2", "norm2"):
        for kind in ("weight", "bias"):
            setattr(getattr(layer, name), kind, nn.Parameter(getattr(getattr(other, name), kind).detach().clone()))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer.infer(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.infer_eager(x), expected, rtol=1e-5, atol=1e-5)


def test_cached_weights_survive_deepcopy_and_pickling(tmp_path):
    layer = EncoderLayer(6, 3, 16)
    path = tmp_path / "layer.pt"
    torch.save(layer, path)
    for copied in (copy.deepcopy(layer), torch.load(path, weights_only=False)):
        ids = [id(w) for w in copied._weights]
        assert ids == [id(w) for w in copied._collect_weights()], "the copy's tuple must hold the copy's parameters"
        assert not set(ids) & {id(w) for w in layer._weights}


def test_encoder_layers_are_initialised_as_torchs_transformer_encoder_layer():
    torch.manual_seed(0)
    layer, reference = EncoderLayer(6, 2, 16), nn.TransformerEncoderLayer(6, 2, 16)
    assert layer.in_proj.bias.abs().max() == 0 and layer.out_proj.bias.abs().max() == 0
    xavier, kaiming = (6 / (6 + 18)) ** 0.5, 6 ** -0.5  # the Xavier bound of a 6 -> 18 projection, nn.Linear's
    assert kaiming < layer.in_proj.weight.abs().max() <= xavier
    assert reference.self_attn.in_proj_bias.abs().max() == 0  # (what it mirrors)


def test_group_standard_deviations_keep_small_spreads_and_norm_features_ignore_rounding_noise():
    from metaadamw import MetaAdamW
    from metaadamw.features import FEATURES
    from tests.metaadamw.helpers import mlp, mse, regression_batches, small_kwargs

    # values near 1 with a spread of ~1e-4 (about 1,000 float32 ulps): E[x^2] - E[x]^2 lost it all (0 or noise)
    model = mlp()
    opt = MetaAdamW(model.named_parameters(), features="basic_plus", grouping="original", **small_kwargs())
    extractor = opt.modulator.extractor
    x = 1.0 + 1e-4 * torch.linspace(-1.0, 1.0, len(opt.tensor_info))
    assert extractor.layout.num_groups == 1
    exact = float(x.double().std(unbiased=False))  # (of the float32 values; one group of every tensor)
    assert exact > 5e-5 and float(extractor.group_std(x)[0]) == pytest.approx(exact, rel=1e-3)
    # norm_basic_plus at the first step: cos(g, m) = 1 for every tensor up to rounding, so the cos_std column
    # is noise - standardised to ~0, not to +-1 as the noise alone would be
    model = mlp()
    opt = MetaAdamW(model.named_parameters(), features="norm_basic_plus", **small_kwargs())
    assert FEATURES.get("norm_basic_plus") is type(opt.modulator.extractor)
    opt.zero_grad()
    mse(model, regression_batches(n=1)[0]).backward()
    opt.step()
    names = opt.modulator.extractor.feature_names
    feats = opt.modulator.extractor(opt._stats, torch.tensor(0.0))
    assert feats[:, names.index("cos_std")].abs().max() < 0.01


def test_frozen_tensors_are_left_out_of_the_features():
    # a frozen tensor has no statistics (zeros stood in): counted in its group's means, it pulled
    # them toward 0 (a group of a trained and a frozen weight showed half the parameter norm), and
    # a group of frozen tensors alone was an outlier of norm_*'s cross-group standardisation
    from metaadamw import MetaAdamW
    from tests.metaadamw.helpers import mlp, mse, regression_batches, small_kwargs

    batches = regression_batches()
    features = {}
    for frozen in (False, True):
        model = mlp()
        model[0].weight.requires_grad_(not frozen)  # frozen: the first layer's weight joins its bias' group
        params = [("first", [model[0].bias] + ([model[0].weight] if frozen else [])), ("rest", list(model[2:].parameters()))]
        opt = MetaAdamW([{"params": p} for _, p in params], features="basic", grouping="original", **small_kwargs())
        for batch in batches:
            opt.zero_grad()
            mse(model, batch).backward()
            opt.step()
        features[frozen] = opt.modulator.extractor(opt._stats, torch.tensor(0.5))
    torch.testing.assert_close(features[True], features[False])  # as if the frozen weight were not there

    # the same when the frozen weight has moments (from an AdamW checkpoint) but no statistics
    model = mlp()
    groups = [[model[0].bias, model[0].weight], list(model[2:].parameters())]
    adamw = torch.optim.AdamW([{"params": g} for g in groups])
    mse(model, batches[0]).backward()
    adamw.step()
    model[0].weight.requires_grad_(False)
    model[0].weight.grad = None
    opt = MetaAdamW([{"params": g} for g in groups], features="basic", grouping="original", **small_kwargs())
    opt.load_state_dict(adamw.state_dict())
    mse(model, batches[1]).backward()
    bias = model[0].bias.detach().clone()  # (the statistics are those at which the gradient was taken)
    opt.step()
    feats = opt.modulator.extractor(opt._stats, torch.tensor(0.5))
    assert float(feats[0, opt.modulator.extractor.feature_names.index("param_norm")]) == pytest.approx(
        float(bias.norm()), rel=1e-5)  # the bias alone: the frozen weight's zeros are left out
    # and so after a MetaAdamW checkpoint of it is loaded (which tensors have statistics is saved)
    again = MetaAdamW([{"params": g} for g in groups], features="basic", grouping="original", **small_kwargs())
    again.load_state_dict(opt.state_dict())
    for o in (opt, again):
        o.zero_grad()
        mse(model, batches[2]).backward()
        o.step()
    assert again._live == opt._live == (True, False, True, True, True, True)

    # norm_basic: a group of frozen tensors alone reads 0 and leaves the others' standardisation as it was
    model = mlp()
    frozen = [model[0].weight, model[0].bias]
    for p in frozen:
        p.requires_grad_(False)
    groups = [{"params": frozen}, {"params": list(model[2].parameters())}, {"params": list(model[4].parameters())}]
    opt = MetaAdamW(groups, features="norm_basic", grouping="original", **small_kwargs())
    mse(model, batches[0]).backward()
    opt.step()
    names = opt.modulator.extractor.feature_names
    feats = opt.modulator.extractor(opt._stats, torch.tensor(0.5))
    stat = [j for j, n in enumerate(names) if n != "time"]
    assert torch.equal(feats[0, stat], torch.zeros(len(stat)))
    live = feats[1:, stat]
    assert live.abs().max() > 0.5 and torch.allclose(live.mean(0), torch.zeros(len(stat)), atol=1e-5)

    # a meta-update averages over the tensors with a gradient there, also one unfrozen since the last
    # step (it has no moments yet); step() then averages over the tensors with moments again
    model = mlp()
    model[0].weight.requires_grad_(False)
    opt = MetaAdamW(model.named_parameters(), features="basic", grouping="original", **small_kwargs())
    mse(model, batches[0]).backward()
    opt.step()
    model[0].weight.requires_grad_(True)
    seen = []
    opt.modulator.extractor.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    opt.meta_step(model, mse, batches[0], batches[1], batches[2])
    param_norm = torch.stack([p.detach().norm() for p in model.parameters()]).mean()
    assert float(seen[0][0, opt.modulator.extractor.feature_names.index("param_norm")]) == pytest.approx(
        float(param_norm), rel=1e-5)
    assert opt._live == (False,) + (True,) * (len(opt.tensor_info) - 1)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_group_spreads_count_a_non_finite_statistic_as_its_group_mean_does(bad):
    # a non-finite statistic counts as +-FEATURE_LIMIT (NaN as 0) in its group's mean: its standard
    # deviation (basic_plus) and variance (enhanced) took the raw inf / NaN deviations instead, whose
    # squares were cut to FEATURE_LIMIT or 0 - a spread of 3.5e5 for [1e6, 1] (5e5) and 0.35 for [0, 1] (0.5)
    from metaadamw.features import BasicPlus, Enhanced, GroupLayout, finite

    layout = GroupLayout(names=["a", "b"], tensor_group=torch.tensor([0, 0, 1]), numel=torch.tensor([4.0, 4.0, 4.0]),
                         is_bias=torch.zeros(3), depth=torch.zeros(3))
    grad_norm = torch.tensor([bad, 1.0, 2.0])
    ones = torch.ones(3)
    stats = {"grad_norm": grad_norm, "exp_avg_norm": ones, "param_norm": ones, "cos": ones, "v_norm": ones,
             "grad_sparsity": torch.zeros(3), "exp_avg_sparsity": torch.zeros(3)}
    expected = finite(grad_norm[:2]).double().std(unbiased=False)
    plus = BasicPlus(layout)
    feats = plus(stats, torch.tensor(0.0))
    std = feats[:, plus.feature_names.index("grad_norm_std")]
    assert float(std[0]) == pytest.approx(float(expected), rel=1e-5)
    assert float(std[1]) == 0.0  # (the other group is untouched)
    enhanced = Enhanced(layout)
    feats = enhanced(stats, torch.tensor(0.0))
    var = feats[:, enhanced.feature_names.index("grad_norm_var")]
    assert float(var[0]) == pytest.approx(float(expected) ** 2, rel=1e-5)


@pytest.mark.parametrize("features", ["basic", "basic_plus", "enhanced", "norm_basic", "norm_basic_plus"])
@pytest.mark.parametrize("dtype,spike", [(torch.float32, 1e10), (torch.float64, 1e19)])
def test_a_finite_gradient_spike_in_one_tensor_leaves_the_other_groups_multipliers_finite(features, dtype, spike):
    # a finite statistic far beyond FEATURE_LIMIT (one layer's gradient 1e10 times the others': its
    # squared norm in enhanced's variances; float64 norms up to float32's range) made the encoder's
    # attention scores overflow and every parameter NaN in one step, where AdamW trains through it
    from metaadamw import MetaAdamW
    from metaadamw.features import FEATURE_LIMIT

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 10)).to(dtype)
    b = copy.deepcopy(a)
    adamw = torch.optim.AdamW(a.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="zero-padded") if features in ("basic_plus", "norm_basic_plus", "enhanced") \
            else contextlib.nullcontext():
        meta = MetaAdamW(b.named_parameters(), lr=1e-3, weight_decay=0.01, features=features, grouping="original",
                         alpha_range=0.0, beta_range=0.0, modulator_layers=2)
    for _ in range(2):
        grads = [torch.randn(p.shape, dtype=dtype) for p in a.parameters()]
        grads[0] = grads[0] * spike
        for model, opt in ((a, adamw), (b, meta)):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
        # (the step's inference: the features the encoder reads, bounded)
        features_read = meta.modulator.features(meta._stats, torch.tensor(0.0))
        assert features_read.isfinite().all() and features_read.abs().max() <= FEATURE_LIMIT
    assert meta.multipliers.alpha.isfinite().all() and meta.multipliers.lambda1.isfinite().all()
    for p, q in zip(a.parameters(), b.parameters()):
        assert q.isfinite().all()
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
