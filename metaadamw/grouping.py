"""Grouping strategies: which parameter tensors share one pair of multipliers (alpha_g, beta_g).

Each group is one token of the modulator. A strategy is a callable registered in
:data:`metaadamw.GROUPINGS`::

    strategy(tensors: list[TensorInfo]) -> list[str]     # one group name per tensor

Tensors with the same name form a group; groups are ordered by first appearance. Built in:

* ``original`` - the optimizer's own ``param_groups`` (``"param_group_0"``, ...).
* ``fine_grained`` - layer type (embedding / attention / feed_forward / norm / other) x depth
  bucket (shallow / middle / deep, from the layer index in the parameter name) x bias or not,
  e.g. ``"attention/middle/weight"``. Needs parameter names: pass ``model.named_parameters()``
  or ``model=`` to the optimizer (then the model's full names are used, also where param groups
  hold names relative to a submodule, which repeat and carry no layer index: a warning says so
  when they are all there is). When a model is given, the module type decides the layer type
  (``nn.Embedding`` -> embedding, ``nn.MultiheadAttention`` -> attention, normalisation layers ->
  norm, ``nn.Linear`` -> feed_forward); otherwise the name does. The depth is the layer index
  in the name (``layers.3``, ``h.11``, ``layer2``, an RNN's ``weight_ih_l1``) over the largest
  index, as the paper defines it, and a tensor without an index is shallow before the first
  indexed one (embeddings) and deep after it (final norms, heads): over the whole model's
  parameters in registration order when a model is given, so that neither the param groups'
  order (decay / no-decay groups) nor the subset the optimizer holds (layers unfrozen later)
  moves a tensor to another bucket (tensors the optimizer holds and the model does not take
  depths among themselves); else over the optimizer's tensors in its order. The index is read
  as it stands: parallel lists of one layer's parts (``attn_layers.3``, ``ffn_layers.3``) share
  a depth, and so do containers that number their layers from 0 again (a VGG's ``classifier.0``
  after its ``features.28``, a decoder's blocks after an encoder's). For such models, register a
  strategy of your own (a function of the :class:`TensorInfo` list; see ``fine_grained``).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import warnings

from torch import nn

from metaadamw import GROUPINGS


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What a grouping strategy may know about one parameter tensor."""

    index: int  # position in the optimizer's flat parameter order
    param_group: int  # index of the optimizer param_group holding it
    name: str | None  # dotted parameter name, when known
    shape: tuple[int, ...]
    module_type: type | None = None  # the nn.Module class owning it, when a model was given
    depth: float | None = None  # normalised layer depth in [0, 1] (from the whole model when the
    #                              optimizer is given one, else filled by assign_depths)


LAYER_TYPES = ("embedding", "attention", "feed_forward", "norm", "other")
DEPTH_BUCKETS = ("shallow", "middle", "deep")

_NAME_RULES: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (kind, frozenset(words))
    for kind, words in (
    ("norm", ("norm", "ln", "layernorm", "batchnorm", "bn", "rmsnorm", "groupnorm", "ln1", "ln2", "ln_f")),
    ("embedding", ("emb", "embed", "embedding", "embeddings", "wte", "wpe", "tok", "token", "pos", "position")),
    ("attention", ("attn", "attention", "self_attn", "multihead_attn", "mha", "q_proj", "k_proj", "v_proj",
                   "in_proj", "in_proj_weight", "in_proj_bias", "query", "key", "value", "qkv", "c_attn")),
    ("feed_forward", ("mlp", "ffn", "ff", "fc", "fc1", "fc2", "linear1", "linear2", "feed_forward",
                      "c_fc", "c_proj", "dense", "w1", "w2", "w3")),
    )
)
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


def layer_type(info: TensorInfo) -> str:
    """embedding / attention / feed_forward / norm / other, from the module type or the name."""
    t = info.module_type
    if t is not None:
        if issubclass(t, nn.Embedding):
            return "embedding"
        if issubclass(t, nn.MultiheadAttention):
            return "attention"
        if issubclass(t, _NORM_TYPES):
            return "norm"
    name = (info.name or "").lower()
    # whole dotted segments (q_proj, feed_forward, self_attn) and their underscore-separated words
    tokens = set(name.split(".")) | set(re.split(r"[._]", name))
    tokens |= {tok.rstrip("0123456789") for tok in tokens}
    for kind, words in _NAME_RULES:
        if tokens & words:
            return kind
    if any("attn" in tok or "attention" in tok for tok in tokens):  # T5's SelfAttention, EncDecAttention
        return "attention"
    if t is not None and issubclass(t, nn.Linear):
        return "feed_forward"
    return "other"


_INDEX_SEGMENT = re.compile(r"^(?:layers?|blocks?|stages?|h|levels?|res)?(\d+)$")
_RNN_LAYER = re.compile(r"^(?:weight|bias)_(?:ih|hh|hr)_l(\d+)(?:_reverse)?$")  # nn.LSTM / GRU / RNN


def layer_index(name: str | None) -> int | None:
    """The first layer index in a dotted name: ``layers.3.linear1.weight`` -> 3, ``layer2.0.conv1``
    -> 2, ``h.11.attn`` -> 11, an RNN's ``lstm.weight_ih_l1`` -> 1; None when the name has no
    index (``conv1.weight`` has none: the digit names a sibling, not a depth)."""
    segments = (name or "").lower().split(".")
    for segment in segments:
        m = _INDEX_SEGMENT.match(segment)
        if m:
            return int(m.group(1))
    m = _RNN_LAYER.match(segments[-1])
    return int(m.group(1)) if m else None


def assign_depths(tensors: list[TensorInfo]) -> list[TensorInfo]:
    """Fill ``depth`` in [0, 1]: the layer index over the largest index; tensors without an
    index are shallow when they come before every indexed tensor (embeddings), deep otherwise
    (final norms, output heads). The order and the index range are those of ``tensors``. When
    every tensor has a depth already (the optimizer fills them from the whole model when it is
    given one: see :func:`model_depths`), they are kept."""
    if tensors and all(t.depth is not None for t in tensors):
        return list(tensors)
    indices = [layer_index(t.name) for t in tensors]
    known = [i for i in indices if i is not None]
    first_indexed = next((k for k, i in enumerate(indices) if i is not None), len(indices))
    lo, hi = (min(known), max(known)) if known else (0, 0)
    out = []
    for k, (t, i) in enumerate(zip(tensors, indices)):
        if i is None:
            depth = 0.0 if k < first_indexed else 1.0
        else:
            depth = (i - lo) / (hi - lo) if hi > lo else 0.5
        out.append(dataclasses.replace(t, depth=depth))
    return out


def model_depths(names: dict[int, str | None]) -> dict[int, float]:
    """``id(parameter) -> depth`` of a model's parameters, given as ``id(parameter) -> full name`` in
    registration order, by the rule of :func:`assign_depths`: a tensor's depth then does not depend
    on which of the model's parameters an optimizer holds, nor on the order of its param groups
    (decay / no-decay groups put the final norm before the first layer; an optimizer of the head
    alone, whose layers are added later, has no layer indices at first)."""
    infos = [TensorInfo(index=k, param_group=0, name=name, shape=()) for k, name in enumerate(names.values())]
    return dict(zip(names, (t.depth for t in assign_depths(infos))))


def depth_bucket(depth: float) -> str:
    return DEPTH_BUCKETS[min(int(depth * 3), 2)]


def is_bias(info: TensorInfo) -> bool:
    """A bias by its name (``fc.bias``, ``in_proj_bias``, the RNNs' ``bias_ih_l0``, ``bias_hh_l1_reverse``)
    or, without a name, by its shape (at most one dimension)."""
    leaf = (info.name or "").lower().rsplit(".", 1)[-1]
    return leaf.endswith("bias") or leaf.startswith("bias") or (not info.name and len(info.shape) <= 1)


@GROUPINGS.register("original")
def original(tensors: list[TensorInfo]) -> list[str]:
    """One group per optimizer param_group."""
    return [f"param_group_{t.param_group}" for t in tensors]


@GROUPINGS.register("fine_grained")
def fine_grained(tensors: list[TensorInfo]) -> list[str]:
    """Layer type x depth bucket x bias (the paper's fine-grained grouping)."""
    missing = [t.index for t in tensors if not t.name]
    if missing:
        raise ValueError(
            f"grouping='fine_grained' needs parameter names, but {len(missing)} parameter tensor(s) "
            f"(positions {missing[:5]}{'...' if len(missing) > 5 else ''}) have none. Pass "
            f"model.named_parameters() instead of model.parameters(), or pass model=your_model (a tensor that "
            f"model= does not hold, such as a learnable temperature, needs a name of its own: give every param "
            f"group (name, tensor) pairs, as model.named_parameters() does), or use grouping='original'"
        )
    repeated = [f"{name!r} x{n}" for name, n in collections.Counter(t.name for t in tensors).items() if n > 1]
    if repeated:
        warnings.warn(
            f"grouping='fine_grained': parameter names repeat ({', '.join(repeated[:3])}"
            f"{', ...' if len(repeated) > 3 else ''}), as named_parameters() of submodules gives them: the depth "
            f"buckets come from the layer index in the full name. Pass model=your_model for full names.",
            stacklevel=3)
    tensors = assign_depths(tensors)
    return [
        f"{layer_type(t)}/{depth_bucket(t.depth)}/{'bias' if is_bias(t) else 'weight'}" for t in tensors
    ]
