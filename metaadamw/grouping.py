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
  when they are all there is). When a model is given, the module type decides the layer type of
  embeddings, attention and normalisation layers (``nn.Embedding``, ``nn.EmbeddingBag`` -> embedding,
  also a weight tied to an output Linear, whichever of the two the model registers first: the
  embedding's type and place, under the first name; ``nn.MultiheadAttention`` and its
  ``out_proj`` -> attention, normalisation layers -> norm; a parametrized tensor, such as
  weight_norm's ``fc.parametrizations.weight.original0``, counts as its layer's, named
  ``fc.weight_original0``); for every other tensor, and without a model, the name
  does (common words such as ``pos``, ``token`` or ``value`` only where they name the layer:
  ``cls_token``, ``attention.self.query``, not ``pos_ffn``), and with a model an ``nn.Linear`` whose
  name names no layer type is feed_forward (a Linear ``self_attn.q_proj`` is attention, a Linear
  ``classifier`` feed_forward; without a model, ``other``). The depth is the layer index in the
  name (``layers.3``, ``h.11``, ``layer2``, ``encoder_layer_3``, ``denseblock2``, an RNN's
  ``weight_ih_l1``; a prefix that every name shares, such as the ``0.`` of ``nn.Sequential(model)``,
  is skipped), scaled to [0, 1] over the indices present (``(index - smallest) / (largest -
  smallest)``, 0.5 when they are all equal; with indices from 0, the index over the largest, as
  the paper defines it; blocks numbered 1..3 are shallow, middle, deep), and a tensor without an
  index is shallow before the first indexed one (embeddings) and deep after it (final norms,
  heads): over the whole model's
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
from metaadamw.registry import _caller_stacklevel  # (the user's line that built the optimizer or added a group)


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
                   "in_proj", "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                   "query", "key", "value", "qkv", "c_attn")),
    ("feed_forward", ("mlp", "ffn", "ff", "fc", "fc1", "fc2", "linear1", "linear2", "feed_forward",
                      "c_fc", "c_proj", "dense", "w1", "w2", "w3")),
    )
)
EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
_WEAK_WORDS = frozenset(("pos", "tok", "token", "position", "query", "key", "value"))
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase,
               *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def layer_type(info: TensorInfo) -> str:
    """embedding / attention / feed_forward / norm / other, from the module type or the name."""
    t = info.module_type
    if t is not None:
        if issubclass(t, EMBEDDING_TYPES):
            return "embedding"
        if issubclass(t, nn.MultiheadAttention):
            return "attention"
        if issubclass(t, _NORM_TYPES):
            return "norm"
    name = (info.name or "").lower()
    segments = name.split(".")
    # whole dotted segments (q_proj, feed_forward, self_attn) and their underscore-separated words
    tokens = set(segments) | set(re.split(r"[._]", name))
    tokens |= {tok.rstrip("0123456789") for tok in tokens}
    # words too common to decide alone: the embedding words only in the parameter's own name
    # (a raw cls_token, pos_embed) or as a whole segment, and so query / key / value (BERT's
    # attention.self.query): pos_ffn, token_mixer, value_head are not embeddings or attention
    leaf_words = set(segments[-1].split("_"))
    tokens -= {w for w in tokens & _WEAK_WORDS if w not in segments and w not in leaf_words}
    for kind, words in _NAME_RULES:
        if tokens & words:
            return kind
    if any("attn" in tok or "attention" in tok for tok in tokens):  # T5's SelfAttention, EncDecAttention
        return "attention"
    if t is not None and issubclass(t, nn.Linear):
        return "feed_forward"
    return "other"


_INDEX_SEGMENT = re.compile(r"^(?:layers?|blocks?|stages?|h|levels?|res)?(\d+)$"
                            # torchvision's encoder_layer_3, DenseNet's denseblock2 / transition2, layer_3
                            r"|^[a-z]*_?(?:layers?|blocks?|stages?|transition)_?(\d+)$")
_RNN_LAYER = re.compile(r"^(?:weight|bias)_(?:ih|hh|hr)_l(\d+)(?:_reverse)?$")  # nn.LSTM / GRU / RNN


def layer_index(name: str | None) -> int | None:
    """The first layer index in a dotted name: ``layers.3.linear1.weight`` -> 3, ``layer2.0.conv1``
    -> 2, ``h.11.attn`` -> 11, ``encoder.layers.encoder_layer_3.mlp.0`` -> 3, an RNN's
    ``lstm.weight_ih_l1`` -> 1; None when the name has no index (``conv1.weight`` has none: the
    digit names a sibling, not a depth)."""
    segments = (name or "").lower().split(".")
    for segment in segments:
        m = _INDEX_SEGMENT.match(segment)
        if m:
            return int(m.group(1) or m.group(2))
    m = _RNN_LAYER.match(segments[-1])
    return int(m.group(1)) if m else None


def assign_depths(tensors: list[TensorInfo]) -> list[TensorInfo]:
    """Fill ``depth`` in [0, 1]: ``(index - smallest) / (largest - smallest)`` of the layer indices
    (0.5 when they are all equal); tensors without an
    index are shallow when they come before every indexed tensor (embeddings), deep otherwise
    (final norms, output heads). The order and the index range are those of ``tensors``. When
    every tensor has a depth already (the optimizer fills them from the whole model when it is
    given one: see :func:`model_depths`), they are kept."""
    if tensors and all(t.depth is not None for t in tensors):
        return list(tensors)
    indices = [layer_index(name) for name in _without_common_prefix([t.name for t in tensors])]
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


def _without_common_prefix(names: list[str | None]) -> list[str | None]:
    """The names without the dotted segments that all of them begin with, where layer indices
    remain after it: a model wrapped in a container (``nn.Sequential(model)``: every name begins
    with ``0.``) keeps its own layers' depths. A prefix that holds the only index (one layer's
    tensors, ``layers.0.*``) is kept."""
    if len(names) < 2 or any(n is None for n in names):
        return names
    split = [n.split(".") for n in names]
    common = 0
    for parts in zip(*(s[:-1] for s in split)):
        if len(set(parts)) > 1:
            break
        common += 1
    if common == 0:
        return names
    stripped = [".".join(s[common:]) for s in split]
    return stripped if any(layer_index(n) is not None for n in stripped) else names


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
            stacklevel=_caller_stacklevel())
    tensors = assign_depths(tensors)
    return [
        f"{layer_type(t)}/{depth_bucket(t.depth)}/{'bias' if is_bias(t) else 'weight'}" for t in tensors
    ]
