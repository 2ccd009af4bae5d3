"""The modulator's encoder layer: the same function as torch's post-norm encoder layer, and its
cached parameter tuple always the layer's current parameters."""

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


def test_cached_weights_survive_deepcopy_and_pickling(tmp_path):
    layer = EncoderLayer(6, 3, 16)
    path = tmp_path / "layer.pt"
    torch.save(layer, path)
    for copied in (copy.deepcopy(layer), torch.load(path, weights_only=False)):
        ids = [id(w) for w in copied._weights]
        assert ids == [id(w) for w in copied._collect_weights()], "the copy's tuple must hold the copy's parameters"
        assert not set(ids) & {id(w) for w in layer._weights}
