"""fine_grained grouping: where its warnings point, and how a model's module types and names decide a
tensor's layer type."""

import warnings

import pytest
from torch import nn

from metaadamw import MetaAdamW


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)


def test_the_repeated_names_warning_points_at_the_callers_line():
    # a fixed stacklevel pointed into metaadamw/optimizer.py (its constructor, or _adopt_added_tensors
    # from add_param_group), not at the line that gave the names
    a, b, c = _Block(), _Block(), _Block()
    with pytest.warns(UserWarning, match="parameter names repeat") as record:
        MetaAdamW([{"params": list(a.named_parameters())}, {"params": list(b.named_parameters())}],
                  modulator_layers=1)
    assert [w.filename for w in record if "names repeat" in str(w.message)] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = MetaAdamW(list(a.named_parameters()), modulator_layers=1)
    with pytest.warns(UserWarning, match="parameter names repeat") as record:
        opt.add_param_group({"params": list(c.named_parameters())})
    assert [w.filename for w in record if "names repeat" in str(w.message)] == [__file__]


def test_with_a_model_a_linear_layer_takes_the_layer_type_its_name_gives():
    # the module docstring said that with model= the module type decides, nn.Linear -> feed_forward: the
    # name comes first for every module but embeddings, attention and normalisation layers (a LLaMA-style
    # q_proj, an nn.Linear, is attention), and a Linear the name places nowhere is feed_forward
    import metaadamw.grouping as grouping

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.o_proj = nn.Linear(2, 2), nn.Linear(2, 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleDict({"self_attn": Attn(), "norm": nn.LayerNorm(2)}) for _ in range(3))
            self.classifier = nn.Linear(2, 2)

    model = Net()
    opt = MetaAdamW(model.parameters(), model=model, modulator_layers=1)
    groups = {t.name: opt.group_names[g].split("/")[0] for t, g in zip(opt.tensor_info, opt._group_of)}
    assert groups["layers.0.self_attn.q_proj.weight"] == "attention"
    assert groups["layers.2.self_attn.o_proj.bias"] == "attention"
    assert groups["layers.1.norm.weight"] == "norm"
    assert groups["classifier.weight"] == "feed_forward"
    opt = MetaAdamW(model.named_parameters(), modulator_layers=1)
    assert opt.group_names[opt._group_of[-1]].startswith("other/")  # (without a model: the name alone)
    doc = " ".join(grouping.__doc__.split())
    assert "``nn.Linear`` -> feed_forward" not in doc and "an ``nn.Linear`` whose name names no layer type" in doc


class _TiedLM(nn.Module):
    """An embedding tied to the output Linear; ``head_first``: the head is registered before the embedding."""

    def __init__(self, head_first: bool):
        super().__init__()
        if head_first:
            self.head = nn.Linear(8, 20, bias=False)
        self.emb = nn.Embedding(20, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        if not head_first:
            self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize("head_first", [False, True])
def test_a_weight_tied_to_an_output_linear_is_the_embeddings_whichever_is_registered_first(head_first):
    # the tied tensor took the name and type of the first module holding it: with the head registered first it was
    # head.weight, feed_forward/deep/weight, and the layers' depths moved with it; now the embedding's either way
    # (under the name named_parameters gives it)
    model = _TiedLM(head_first)
    opt = MetaAdamW(model.parameters(), model=model, grouping="fine_grained", modulator_layers=1)
    got = [(info.name, opt.group_names[g], info.depth) for info, g in zip(opt.tensor_info, opt._group_of)]
    assert got == [("head.weight" if head_first else "emb.weight", "embedding/shallow/weight", 0.0),
                   ("layers.0.weight", "feed_forward/shallow/weight", 0.0),
                   ("layers.0.bias", "feed_forward/shallow/bias", 0.0),
                   ("layers.1.weight", "feed_forward/middle/weight", 0.5),
                   ("layers.1.bias", "feed_forward/middle/bias", 0.5),
                   ("layers.2.weight", "feed_forward/deep/weight", 1.0),
                   ("layers.2.bias", "feed_forward/deep/bias", 1.0)]
