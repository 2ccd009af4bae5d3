"""The modulator: features -> Transformer encoder over the groups -> per-group multipliers.

Groups are the tokens. The encoder is the post-norm layer of ``nn.TransformerEncoderLayer``
(self-attention, ReLU feed-forward, LayerNorm after each residual), written with batched tensor
ops: an eager ``nn.TransformerEncoder`` spends most of its time in Python and per-op overhead
at these sizes (width 6, a dozen tokens), and this one is evaluated at every optimizer step.

As in the paper, the model width defaults to the feature width zero-padded up to a multiple of
the head count (``padding`` says how many zero columns were added, and a warning says so when
it is not zero); ``width=`` projects the features to a wider model first.

Output head: ``[alpha_raw, beta_raw, lambda1_raw, lambda2_raw]`` per group, mapped to
``alpha = 1 + alpha_range * (sigmoid(alpha_raw) - 0.5)`` (likewise beta) and
``lambda = sigmoid(lambda_raw)``. By default (``head_init="default"``) the head keeps PyTorch's
``nn.Linear`` initialisation, as the paper's code does: every group then starts with a random
multiplier of roughly 1 +- 0.2, which the meta-updates adjust. ``head_init="zero"`` starts the head
at zero, so a fresh modulator gives alpha = beta = 1 exactly and MetaAdamW starts as AdamW; the
first meta-update then trains the head alone (the layers below get gradient once it is non-zero).
Comparing the two separates what the learned modulation does from what random per-group
multipliers do.

Non-finite statistics (an inf or NaN gradient in one tensor makes its norms and cosine inf or
NaN, and its moments' from then on) count as +-:data:`~metaadamw.features.FEATURE_LIMIT` and 0 in
the group means (:meth:`FeatureExtractor.group_mean`) and in the features the encoder reads
(:meth:`Modulator.features`, for extractors of other reductions): the encoder attends across
groups, so one NaN token made every group's multipliers NaN, and with them every parameter of the
model in one step, where AdamW spoils only the non-finite elements; and a group mean over every
tensor in one matrix product (0 * inf = NaN) made the statistic NaN in every group. Finite
features beyond that limit are cut to it too: a gradient spike of 1e10 in one tensor made the
encoder's attention scores overflow, with the same result.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaadamw import functional
from metaadamw.features import FeatureExtractor, FeatureGate, bounded
from metaadamw.functional import to_device


HEAD_INITS = ("zero", "default")

#: the fused post-norm encoder layer of ``nn.TransformerEncoderLayer``'s fast path (a private op
#: that has kept its signature since torch 1.12); None falls back to the eager ops
FUSED_LAYER = getattr(torch, "_transformer_encoder_layer_fwd", None)


def uses_fused_layer(x: Tensor) -> bool:
    """Whether inference runs the fused layer for ``x``: measured (and sync-free) on the CPU only."""
    return FUSED_LAYER is not None and functional.takes_cpu_routes(x.device)


#: (submodule, parameter) of each entry of :meth:`EncoderLayer._collect_weights`
_WEIGHT_SLOTS = (("in_proj", "weight"), ("in_proj", "bias"), ("out_proj", "weight"), ("out_proj", "bias"),
                 ("norm1", "weight"), ("norm1", "bias"), ("linear1", "weight"), ("linear1", "bias"),
                 ("linear2", "weight"), ("linear2", "bias"), ("norm2", "weight"), ("norm2", "bias"))


def _recollect_weights(layer: "EncoderLayer", incompatible_keys) -> None:
    layer._weights = layer._collect_weights()


class EncoderLayer(nn.Module):
    """Post-norm Transformer encoder layer over one sequence of tokens (no batch dimension)."""

    def __init__(self, width: int, heads: int, ff: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"model width {width} is not a multiple of heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width)
        self.linear1 = nn.Linear(width, ff)
        self.linear2 = nn.Linear(ff, width)
        self.norm2 = nn.LayerNorm(width)
        # initialised as nn.TransformerEncoderLayer's attention (nn.MultiheadAttention): Xavier-uniform
        # input projection, zero projection biases; the feed-forward and norm layers have their defaults
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)
        self._weights = self._collect_weights()
        self.register_load_state_dict_post_hook(_recollect_weights)  # runs after the children have loaded

    def _collect_weights(self) -> tuple[Tensor, ...]:
        """The parameters in the order the layer uses them, kept in one tuple: at these sizes the
        ~24 module attribute look-ups per layer would cost more than the layer's arithmetic. It is
        rebuilt whenever the parameter objects may have been replaced (``load_state_dict``, also
        with ``assign=True``; ``.to()`` and friends): optimizers and in-place loads keep the objects.
        Every pass checks the cached tuple against the submodules' parameter dicts
        (:meth:`_cached_weights`, plain dict look-ups), so that tensors put in their place
        (``torch.func.functional_call``, a parameter replaced by assignment, a parametrization) are
        the ones used."""
        return tuple(getattr(getattr(self, module), name) for module, name in _WEIGHT_SLOTS)

    def _cached_weights(self) -> tuple[Tensor, ...]:
        """``_weights``, rebuilt where a submodule now holds another tensor in one of their places."""
        held, modules = self._weights, self._modules
        for (module, name), w in zip(_WEIGHT_SLOTS, held):
            if modules[module]._parameters.get(name) is not w:
                held = self._weights = self._collect_weights()
                break
        return held

    def _apply(self, fn, recurse=True):  # .to(), .double(), .cuda(), ...: may make new parameter objects
        out = super()._apply(fn, recurse)
        self._weights = self._collect_weights()
        return out

    def forward(self, x: Tensor) -> Tensor:
        """The layer with autograd (the meta-update's pass), in functional ops: the same arithmetic
        as ``nn.TransformerEncoderLayer``'s post-norm layer (dropout on the attention weights, the
        attention output and both feed-forward activations), about 1.5x faster forward and backward
        than through the submodules and ``scaled_dot_product_attention``'s composite path at these sizes."""
        return self._layer(x, self.dropout if self.training else 0.0)

    def _layer(self, x: Tensor, drop: float) -> Tensor:
        w_in, b_in, w_out, b_out, n1_w, n1_b, w1, b1, w2, b2, n2_w, n2_b = self._cached_weights()
        tokens, width = x.shape
        dh = width // self.heads
        q, k, v = F.linear(x, w_in, b_in).view(tokens, 3, self.heads, dh).permute(1, 2, 0, 3).unbind(0)
        weights = torch.bmm(q, k.transpose(1, 2)).mul_(dh**-0.5).softmax(-1)  # (heads, tokens, tokens)
        if drop:
            weights = F.dropout(weights, drop)
        att = torch.bmm(weights, v).transpose(0, 1).reshape(tokens, width)
        att = F.linear(att, w_out, b_out)
        if drop:
            att = F.dropout(att, drop)
        x = F.layer_norm(att.add_(x), (width,), n1_w, n1_b, self.norm1.eps)
        ff = F.linear(x, w1, b1).relu_()
        if drop:
            ff = F.dropout(ff, drop)
        ff = F.linear(ff, w2, b2)
        if drop:
            ff = F.dropout(ff, drop)
        return F.layer_norm(ff.add_(x), (width,), n2_w, n2_b, self.norm2.eps)

    def infer(self, x: Tensor) -> Tensor:
        """The same layer without autograd or dropout, as cheaply as possible: it runs at every
        optimizer step, where per-op and per-module-call overhead dominate at these sizes. Uses
        the fused kernel behind ``nn.TransformerEncoderLayer``'s inference fast path on the CPU (one
        op per layer, ~30% faster) when this torch has it, else :meth:`infer_eager`."""
        if not uses_fused_layer(x):
            return self.infer_eager(x)
        return self.infer_fused(x.unsqueeze(0)).squeeze(0)

    def infer_fused(self, x: Tensor) -> Tensor:
        """:meth:`infer` of a ``(1, tokens, width)`` input with the fused kernel."""
        w_in, b_in, w_out, b_out, n1_w, n1_b, w1, b1, w2, b2, n2_w, n2_b = self._cached_weights()
        return FUSED_LAYER(x, x.shape[2], self.heads, w_in, b_in, w_out, b_out, False, False, self.norm1.eps,
                           n1_w, n1_b, n2_w, n2_b, w1, b1, w2, b2, None, None)

    def infer_eager(self, x: Tensor) -> Tensor:
        """:meth:`infer` in a dozen eager tensor ops (no dropout; call it without autograd)."""
        return self._layer(x, 0.0)


@dataclasses.dataclass
class Multipliers:
    """Per-group outputs of the modulator (each a (groups,) tensor)."""

    alpha: Tensor  # learning-rate multiplier
    beta: Tensor  # weight-decay multiplier
    lambda1: Tensor  # weight of ||g'||^2 in the gradient-alignment objective
    lambda2: Tensor  # weight of cos(g, g') in the gradient-alignment objective


class Modulator(nn.Module):
    """Feature extractor (+ optional gate) -> encoder -> head -> :class:`Multipliers`.

    Every learnable meta-parameter except the weighting's log-variances lives here: encoder and
    head weights, the feature gates and the extractor's own parameters (group embeddings).
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        *,
        layers: int = 8,
        heads: int = 6,
        ff: int = 16,
        width: int | None = None,
        dropout: float = 0.0,
        gating: bool = False,
        gate_l1: float = 1e-3,
        alpha_range: float = 1.0,
        beta_range: float = 1.0,
        head_init: str = "default",
    ):
        super().__init__()
        if head_init not in HEAD_INITS:
            raise ValueError(f"modulator head_init must be one of {HEAD_INITS}, got {head_init!r}")
        self.extractor = extractor
        self.in_width = extractor.width
        self.alpha_range = float(alpha_range)
        self.beta_range = float(beta_range)
        self.gate = FeatureGate(self.in_width, gate_l1) if gating else None
        if width is None:
            self.width = math.ceil(self.in_width / heads) * heads
            self.padding = self.width - self.in_width
            self.input_proj = None
            if self.padding:
                warnings.warn(
                    f"MetaAdamW modulator: the {self.in_width} features {extractor.feature_names} are zero-padded with "
                    f"{self.padding} column(s) to width {self.width}, a multiple of modulator_heads={heads}. Choose "
                    f"heads dividing {self.in_width}, or set modulator_width to project the features instead.",
                    stacklevel=3,
                )
        else:
            if width % heads:
                raise ValueError(f"modulator_width={width} must be a multiple of modulator_heads={heads}")
            self.width, self.padding = width, 0
            self.input_proj = nn.Linear(self.in_width, width)
        self.layers = nn.ModuleList(EncoderLayer(self.width, heads, ff, dropout) for _ in range(layers))
        self.head = nn.Linear(self.width, 4)
        if head_init == "zero":
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def set_training(self, mode: bool) -> None:
        """``train(mode)`` without the recursive walk and ``nn.Module.__setattr__`` of every submodule
        (the meta-update switches modes twice per call; ``train()`` costs ~0.4 ms on an 8-layer
        encoder). ``training`` is a plain attribute, so ``object.__setattr__`` sets it the same way."""
        modules = self.__dict__.get("_flat_modules")  # the modulator's modules are fixed at construction
        if modules is None:
            modules = self.__dict__["_flat_modules"] = list(self.modules())
        for m in modules:
            object.__setattr__(m, "training", mode)

    def encode(self, features: Tensor) -> Tensor:
        """(groups, in_width) features -> (groups, 4) raw outputs."""
        x = self.gate(features) if self.gate is not None else features
        if self.input_proj is not None:
            x = self.input_proj(x)
        elif self.padding:
            x = F.pad(x, (0, self.padding))
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def features(self, stats: dict[str, Tensor], time: Tensor) -> Tensor:
        """The extractor's (groups, in_width) features within +-:data:`~metaadamw.features.FEATURE_LIMIT`
        (an inf as the limit) and each NaN as 0 (:func:`~metaadamw.features.bounded`; see the module's docstring)."""
        return bounded(self.extractor(stats, time))

    def forward(self, stats: dict[str, Tensor], time: Tensor) -> Multipliers:
        return self._multipliers(self.encode(self.features(stats, time)))

    @torch.no_grad()
    def infer(self, stats: dict[str, Tensor], time: Tensor) -> Multipliers:
        """``forward`` for the optimizer step: no autograd, no dropout, the lean layer path."""
        x = self.features(stats, time)
        if self.gate is not None:
            x = self.gate(x)
        if self.input_proj is not None:
            x = self.input_proj(x)
        elif self.padding:
            x = F.pad(x, (0, self.padding))
        if uses_fused_layer(x):  # the fused layers take (1, tokens, width): one unsqueeze for all of them
            x = x.unsqueeze(0)
            for layer in self.layers:
                x = layer.infer_fused(x)
            x = x.squeeze(0)
        else:
            for layer in self.layers:
                x = layer.infer(x)
        return self._multipliers(F.linear(x, self.head.weight, self.head.bias))

    def _affine(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(scale, shift) of :meth:`_multipliers`, made once per device and dtype."""
        cached = self.__dict__.get("_affine_cache")
        if cached is None or cached[0].device != like.device or cached[0].dtype != like.dtype:
            # made once, on the CPU and copied without blocking (the first step() runs this)
            scale = to_device([self.alpha_range, self.beta_range, 1.0, 1.0], like.device, like.dtype)
            shift = to_device([1.0 - self.alpha_range / 2, 1.0 - self.beta_range / 2, 0.0, 0.0], like.device, like.dtype)
            cached = self.__dict__["_affine_cache"] = (scale, shift)
        return cached

    def _multipliers(self, raw: Tensor) -> Multipliers:
        """``alpha = 1 + alpha_range (sigmoid - 1/2)``, likewise beta, ``lambda = sigmoid``: in one
        op, ``sigmoid(raw) * [alpha_range, beta_range, 1, 1] + [1 - alpha_range / 2, 1 - beta_range / 2, 0, 0]``."""
        scale, shift = self._affine(raw)
        alpha, beta, lambda1, lambda2 = torch.addcmul(shift, torch.sigmoid(raw), scale).unbind(1)
        return Multipliers(alpha=alpha, beta=beta, lambda1=lambda1, lambda2=lambda2)

    def penalty(self) -> Tensor | None:
        """Regularisers to add to the meta-loss (the gates' L1 penalty), or None."""
        return self.gate.penalty() if self.gate is not None else None

    def extra_repr(self) -> str:
        how = f"projected {self.in_width}->{self.width}" if self.input_proj is not None else (
            f"padded {self.in_width}+{self.padding}={self.width}")
        return f"features={self.in_width} ({how}), layers={len(self.layers)}"
