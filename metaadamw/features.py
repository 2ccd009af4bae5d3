"""Feature extractors: per-tensor statistics -> one feature vector per parameter group.

The optimizer computes, for every parameter tensor, the statistics an extractor asks for
(:data:`TENSOR_STATS`) as length-N vectors on the parameters' device, without reading anything
back to the host. An extractor turns them into a ``(groups, width)`` matrix - the modulator's
tokens. Registered in :data:`metaadamw.FEATURES`:

=================  ==========================================================================
``basic``          group means of grad norm, first-moment norm, parameter norm, cos(grad, m)
``basic_plus``     means and standard deviations over the group's tensors of the same
``enhanced``       mean and variance of grad and momentum norms, grad and momentum sparsity,
                   log10(1 + parameter count), bias ratio, normalised layer depth, plus a learnable
                   per-group embedding
``norm_basic``     ``basic`` with every statistics column standardised across groups
``norm_basic_plus`` ``basic_plus`` likewise
=================  ==========================================================================

Every extractor takes ``time_step`` (append the normalised step t / total_steps, or t/(t+1000)
when the total is unknown) and ``second_moment`` (append the second-moment norm
``||sqrt(v)||_2 = sqrt(sum v)``, the RMS-gradient estimate's norm).

Writing your own::

    from metaadamw import FEATURES
    from metaadamw.features import FeatureExtractor

    @FEATURES.register("grad_only")
    class GradOnly(FeatureExtractor):
        stats = ("grad_norm", "cos")            # what the optimizer must compute per tensor

        def columns(self):                      # names of the statistics columns
            return ["grad_norm", "cos"]

        def statistics(self, stats):            # -> (groups, len(columns())) tensor
            return self.group_mean(torch.stack([stats["grad_norm"], stats["cos"]], 1))

The time step and second-moment columns are appended by the base class; the modulator's input
width follows from ``width`` - nobody sets it by hand.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from metaadamw import FEATURES
from metaadamw.functional import to_device

#: Per-tensor statistics the optimizer knows how to compute (each a length-N vector).
TENSOR_STATS = (
    "grad_norm",  # ||g||_2
    "exp_avg_norm",  # ||m||_2 after this step's update
    "param_norm",  # ||p||_2 at which g was computed
    "cos",  # cos(g, m)
    "v_norm",  # ||sqrt(v)||_2 = sqrt(sum v)
    "grad_sparsity",  # fraction of exact zeros in g
    "exp_avg_sparsity",  # fraction of exact zeros in m
)

#: what an infinite statistic or feature counts as (with its sign; NaN counts as 0): large against
#: any statistic of a model still training, small enough that the encoder's first layer (its sums
#: of squares in LayerNorm and the attention scores) stays finite in float32
FEATURE_LIMIT = 1e6


def finite(x: Tensor) -> Tensor:
    """``x`` with each inf as +-:data:`FEATURE_LIMIT` and each NaN as 0: an inf or NaN gradient in one
    tensor makes its norms and cosine (and, from then on, its moments') non-finite, and a group
    mean over all tensors in one matrix product (0 * inf = NaN) would spread that to every group."""
    return torch.nan_to_num(x, nan=0.0, posinf=FEATURE_LIMIT, neginf=-FEATURE_LIMIT)


def bounded(x: Tensor) -> Tensor:
    """``x`` within +-:data:`FEATURE_LIMIT`, each NaN as 0: the features the encoder reads. A finite
    statistic can be far larger than the limit - a gradient spike of 1e10 in one tensor (its squared
    norm in ``enhanced``'s variances), norms of float64 tensors up to float32's 3e38 - and made the
    encoder's attention scores overflow to inf, and with them every group's multipliers NaN (all the
    model's parameters, in one step, where AdamW trains through the spike). Past the limit the
    encoder's first LayerNorm saw one feature dominating the token either way."""
    return torch.nan_to_num(x.clamp(-FEATURE_LIMIT, FEATURE_LIMIT), nan=0.0)


@dataclasses.dataclass
class GroupLayout:
    """How the optimizer's N parameter tensors map onto G groups (the modulator's tokens)."""

    names: list[str]  # G group names
    tensor_group: Tensor  # (N,) long: group index of every tensor
    numel: Tensor  # (N,) float: elements per tensor
    is_bias: Tensor  # (N,) float 0/1
    depth: Tensor  # (N,) float normalised layer depth in [0, 1]

    def __post_init__(self) -> None:
        n_groups, n = len(self.names), self.tensor_group.numel()
        onehot = torch.zeros(n_groups, n, dtype=self.numel.dtype, device=self.numel.device)
        onehot[self.tensor_group, torch.arange(n, device=self.numel.device)] = 1.0
        self.counts = onehot.sum(1)
        self.mean_matrix = onehot / self.counts.clamp_min(1).unsqueeze(1)  # (G, N) group averaging
        self.onehot = onehot
        self._all_live()

    def _all_live(self) -> None:
        self.live_mean = self.mean_matrix  # the statistics' group averaging: see set_live
        self.all_groups_live, self.group_live = True, torch.ones_like(self.counts)

    def __setstate__(self, state: dict) -> None:  # (a layout pickled before set_live existed: every tensor live)
        self.__dict__.update(state)
        if "live_mean" not in state:
            self._all_live()

    def set_live(self, live: Sequence[bool], group_of: Sequence[int]) -> None:
        """Average the statistics over the tensors ``live`` marks (N host flags): those that have
        had a gradient. A frozen tensor has no statistics (zeros stand in), so that counting it would
        pull its group's means toward 0; a group with no live tensor averages to 0 and is marked in
        ``group_live`` (the cross-group standardisation of ``norm_*`` leaves it out). The static
        columns (sizes, bias share, depth) keep ``mean_matrix``, over all of a group's tensors.
        ``group_of``: every tensor's group index, on the host. Copies to the device without blocking."""
        device, dtype = self.onehot.device, self.onehot.dtype
        weights = self.onehot * to_device([float(x) for x in live], device, dtype)
        self.live_mean = weights / weights.sum(1, keepdim=True).clamp_min(1)
        groups = {g for g, x in zip(group_of, live) if x}
        self.all_groups_live = len(groups) == len(self.names)
        self.group_live = to_device([float(g in groups) for g in range(len(self.names))], device, dtype)

    @property
    def num_groups(self) -> int:
        return len(self.names)

    def to(self, device: torch.device | str) -> "GroupLayout":
        return GroupLayout(
            self.names, *(t.to(device) for t in (self.tensor_group, self.numel, self.is_bias, self.depth))
        )


def normalised_time(step: Tensor | int, total_steps: int | None) -> Tensor | float:
    """t / total_steps clipped to 1 when the total is known, else t / (t + 1000) (in [0, 1)); of a
    tensor (on the device, no host copy) or of a host step count (a float)."""
    if total_steps:
        t = step / float(total_steps)
        return t.clamp(max=1.0) if isinstance(t, Tensor) else min(t, 1.0)
    return step / (step + 1000.0)


class FeatureExtractor(nn.Module):
    """Base class. Subclasses set ``stats`` and implement ``columns()`` and ``statistics()``.

    Args:
        layout: the group layout (names, per-tensor group index, sizes, depths).
        time_step: append the normalised time step column.
        second_moment: append the group mean of the second-moment norm.
    """

    #: per-tensor statistics this extractor reads (see TENSOR_STATS)
    stats: tuple[str, ...] = ()
    #: with ``second_moment``, ``statistics()`` ends with the group mean of v_norm itself (one matrix
    #: product instead of two); otherwise the base class appends that column
    includes_v_norm: bool = False

    def __init__(self, layout: GroupLayout, *, time_step: bool = True, second_moment: bool = True):
        super().__init__()
        self.layout = layout
        self.time_step = time_step
        self.second_moment = second_moment
        if isinstance(self.stats, str):  # (("grad_norm") is a str: its letters were named as unknown statistics)
            raise ValueError(f"{type(self).__name__}.stats must be a tuple of statistic names, got the str "
                             f"{self.stats!r}; a tuple of one name needs its comma: ({self.stats!r},)")
        unknown = set(self.stats) - set(TENSOR_STATS)
        if unknown:
            raise ValueError(f"{type(self).__name__}.stats names unknown statistics {sorted(unknown)}; known: {TENSOR_STATS}")

    # -- to implement -----------------------------------------------------------------------
    def columns(self) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} must implement columns(), the names of its statistics "
                                  f"columns (a FeatureExtractor subclass sets stats and implements columns() and "
                                  f"statistics())")

    def statistics(self, stats: dict[str, Tensor]) -> Tensor:
        """(groups, len(columns())) matrix of statistics columns."""
        raise NotImplementedError(f"{type(self).__name__} must implement statistics(stats), which returns the "
                                  f"(groups, len(columns())) matrix of its statistics columns (a FeatureExtractor "
                                  f"subclass sets stats and implements columns() and statistics())")

    # -- provided ---------------------------------------------------------------------------
    def set_layout(self, layout: GroupLayout) -> None:
        """Take a new layout: the optimizer's param groups grew after construction
        (``add_param_group``). An extractor that derives state from the layout in ``__init__`` (a
        buffer per group, a parameter per group) overrides this to rebuild it, or raises
        ``ValueError`` saying why it cannot follow; nothing has changed in the optimizer then."""
        self.layout = layout

    def _num_columns(self) -> int:
        n = self.__dict__.get("_n_columns")
        if n is None:
            n = self.__dict__["_n_columns"] = len(self.columns())
        return n

    @property
    def required_stats(self) -> frozenset[str]:
        return frozenset(self.stats) | ({"v_norm"} if self.second_moment else set())

    @property
    def feature_names(self) -> list[str]:
        names = list(self.columns())
        if self.second_moment:
            names.append("v_norm")
        if self.time_step:
            names.append("time")
        return names + [f"embedding_{i}" for i in range(self.embedding_width)]

    @property
    def embedding_width(self) -> int:
        return 0

    @property
    def width(self) -> int:
        return len(self.feature_names)

    def group_mean(self, x: Tensor) -> Tensor:
        """Mean over each group's tensors of per-tensor values ``x`` (N,) or (N, k): over those that
        have had a gradient (:meth:`GroupLayout.set_live`). Non-finite values count as :func:`finite`
        makes them, so that they stay in their own group."""
        return self.layout.live_mean @ finite(x)

    def group_std(self, x: Tensor, mean: Tensor | None = None) -> Tensor:
        """Population standard deviation over each group's tensors, in two passes (the deviations
        from the group mean, then their mean square): ``E[x^2] - E[x]^2`` loses every digit of a
        spread below ~sqrt(float32 eps) |mean| - a 0 for a real spread, or rounding noise that
        ``norm_basic_plus`` would standardise into unit-scale features. Non-finite values count as
        :func:`finite` makes them, as in :meth:`group_mean` (an inf deviation, squared, was cut to
        :data:`FEATURE_LIMIT` and a NaN one to 0, which is not the spread of those values)."""
        x = finite(x)
        mean = self.group_mean(x) if mean is None else mean
        d = x - mean.index_select(0, self.layout.tensor_group)
        return self.group_mean(d * d).sqrt()

    def forward(self, stats: dict[str, Tensor], time: Tensor) -> Tensor:
        try:
            cols = [self.statistics(stats)]
        except KeyError as err:
            name = err.args[0] if err.args else None
            if name in TENSOR_STATS and name not in self.required_stats:
                raise ValueError(
                    f"{type(self).__name__}.statistics() read stats[{name!r}], which its stats = {tuple(self.stats)} "
                    f"does not declare: the optimizer computes only the declared statistics. Add {name!r} to "
                    f"{type(self).__name__}.stats") from err
            raise
        groups, n = self.layout.num_groups, self._num_columns()
        own_v_norm = self.second_moment and self.includes_v_norm
        expected = n + 1 if own_v_norm else n
        shape = tuple(cols[0].shape) if isinstance(cols[0], Tensor) else None
        if shape != (groups, expected):
            got = f"a tensor of shape {shape}" if shape else type(cols[0]).__name__
            hint = (". If its last column is the group mean of v_norm, set includes_v_norm = True on the class"
                    if self.second_moment and not own_v_norm and shape == (groups, n + 1) else "")
            raise ValueError(
                f"{type(self).__name__}.statistics() returned {got}; expected ({groups}, {expected}): one row per group "
                f"and one column per name in columns() {self.columns()}"
                f"{', then the v_norm column (includes_v_norm)' if own_v_norm else ''}{hint}")
        if self.second_moment and not own_v_norm:
            cols.append(self.group_mean(stats["v_norm"]).unsqueeze(1))
        if self.time_step:
            cols.append(time.to(cols[0].dtype).expand(groups, 1))
        return torch.cat(cols, 1)

    def extra_repr(self) -> str:
        return f"width={self.width}, columns={self.feature_names}"


def _stack(stats: dict[str, Tensor], names: Sequence[str]) -> Tensor:
    return torch.stack([stats[n] for n in names], 1)


BASIC = ("grad_norm", "exp_avg_norm", "param_norm", "cos")


@FEATURES.register("basic")
class Basic(FeatureExtractor):
    """Group means of gradient norm, first-moment norm, parameter norm and cos(grad, m)."""

    stats = BASIC
    includes_v_norm = True

    def columns(self) -> list[str]:
        return list(BASIC)

    def statistics(self, stats: dict[str, Tensor]) -> Tensor:
        # with the v_norm column in the same product (the base class then does not append it)
        return self.group_mean(_stack(stats, BASIC + (("v_norm",) if self.second_moment else ())))


@FEATURES.register("basic_plus")
class BasicPlus(FeatureExtractor):
    """Means and standard deviations over the group's tensors of the basic statistics (and of
    the second-moment norm when it is on)."""

    stats = BASIC

    def _names(self) -> list[str]:
        return list(BASIC) + (["v_norm"] if self.second_moment else [])

    def columns(self) -> list[str]:
        names = self._names()
        # the v_norm mean is appended by the base class; its std sits with the other stds
        return [f"{n}_mean" for n in BASIC] + [f"{n}_std" for n in names]

    def statistics(self, stats: dict[str, Tensor]) -> Tensor:
        x = _stack(stats, self._names())
        mean = self.group_mean(x)
        std = self.group_std(x, mean)
        return torch.cat([mean[:, : len(BASIC)], std], 1)


class _Normalised(FeatureExtractor):
    """Standardises every statistics column across groups (zero mean, unit variance): across the
    groups that have statistics (a group of frozen tensors alone reads 0).

    A column whose spread across groups is below 0.1% of its magnitude is treated as constant
    (the denominator is ``std + 1e-3 * mean|x| + 1e-12``), so rounding noise in a column that is the
    same for every group (cos = 1 at the first step, say) is not blown up to unit scale. For a
    standard-deviation column (``X_std``) the magnitude is that of its statistic (``X_mean`` or
    ``X``), whichever is larger: a spread of 1e-5 in cos(g, m), whose values are near 1, is
    rounding noise even though it is the whole of the ``cos_std`` column."""

    def forward(self, stats: dict[str, Tensor], time: Tensor) -> Tensor:
        feats = super().forward(stats, time)
        n_stat = feats.shape[1] - (1 if self.time_step else 0)
        x = feats[:, :n_stat]
        if self.layout.all_groups_live:
            magnitude = x.abs().mean(0, keepdim=True)
            mean, std = x.mean(0, keepdim=True), x.std(0, unbiased=False, keepdim=True)
        else:  # over the groups that have statistics (not those of frozen tensors alone, which read 0 after)
            w = self.layout.group_live.unsqueeze(1)
            n = w.sum().clamp_min(1)
            magnitude = (w * x.abs()).sum(0, keepdim=True) / n
            mean = (w * x).sum(0, keepdim=True) / n
            std = ((w * (x - mean) ** 2).sum(0, keepdim=True) / n).sqrt()
            x = x * w + mean * (1 - w)
        magnitude = torch.maximum(magnitude, magnitude[:, self._magnitude_columns(n_stat)])
        scale = std + 1e-3 * magnitude + 1e-12
        x = (x - mean) / scale
        return torch.cat([x, feats[:, n_stat:]], 1)

    def _magnitude_columns(self, n_stat: int) -> list[int]:
        """Per statistics column, the column whose magnitude bounds what counts as its noise: the
        statistic's mean column for a ``X_std`` column, else itself."""
        cached = getattr(self, "_magnitude_index", None)
        if cached is None or len(cached) != n_stat:
            names = self.feature_names[:n_stat]
            cached = [next((names.index(c) for c in (f"{n[:-4]}_mean", n[:-4]) if n.endswith("_std") and c in names), j)
                      for j, n in enumerate(names)]
            self._magnitude_index = cached
        return cached


@FEATURES.register("norm_basic")
class NormBasic(_Normalised, Basic):
    """``basic`` with cross-group standardisation of the statistics columns."""


@FEATURES.register("norm_basic_plus")
class NormBasicPlus(_Normalised, BasicPlus):
    """``basic_plus`` with cross-group standardisation of the statistics columns."""


@FEATURES.register("enhanced")
class Enhanced(FeatureExtractor):
    """Mean and variance of grad and momentum norms, grad and momentum sparsity,
    log10(1 + parameter count), bias ratio, normalised layer depth, and a learnable per-group embedding."""

    stats = ("grad_norm", "exp_avg_norm", "grad_sparsity", "exp_avg_sparsity")

    def __init__(self, layout: GroupLayout, *, time_step: bool = True, second_moment: bool = True, embedding_dim: int = 4):
        super().__init__(layout, time_step=time_step, second_moment=second_moment)
        self.embedding_dim = embedding_dim
        self.embedding = nn.Parameter(torch.randn(layout.num_groups, embedding_dim, dtype=torch.float32, device=layout.numel.device) * 0.1)
        self.register_buffer("static", self._static(layout), persistent=False)

    @staticmethod
    def _static(layout: GroupLayout) -> Tensor:
        """The columns that depend on the layout alone."""
        counts = layout.onehot @ layout.numel
        return torch.stack([
            torch.log1p(counts) / math.log(10.0),  # log10(1 + parameter count)
            layout.mean_matrix @ layout.is_bias,  # share of bias tensors
            layout.mean_matrix @ layout.depth,  # mean normalised depth
        ], 1)

    def set_layout(self, layout: GroupLayout) -> None:
        """New tensors that join the existing groups: the static columns are recomputed. A change
        of the groups themselves is refused: the embedding is learned per group."""
        if layout.names != self.layout.names:
            raise ValueError(
                f"features='enhanced' learns an embedding per modulator group, and the added tensors change the groups "
                f"from {self.layout.names} to {layout.names}: create the optimizer with every param group (frozen "
                f"parameters have no gradient and are not updated), or use another feature extractor")
        super().set_layout(layout)
        self.static = self._static(layout).to(self.static.device)

    @property
    def embedding_width(self) -> int:
        return self.embedding_dim

    def columns(self) -> list[str]:
        return ["grad_norm_mean", "grad_norm_var", "exp_avg_norm_mean", "exp_avg_norm_var", "grad_sparsity",
                "exp_avg_sparsity", "log10_numel", "bias_ratio", "depth"]

    def statistics(self, stats: dict[str, Tensor]) -> Tensor:
        norms = _stack(stats, ("grad_norm", "exp_avg_norm"))
        mean = self.group_mean(norms)
        var = self.group_std(norms, mean).square()
        sparsity = self.group_mean(_stack(stats, ("grad_sparsity", "exp_avg_sparsity")))
        return torch.cat([
            torch.stack([mean[:, 0], var[:, 0], mean[:, 1], var[:, 1]], 1), sparsity, self.static.to(mean.dtype)
        ], 1)

    def forward(self, stats: dict[str, Tensor], time: Tensor) -> Tensor:
        feats = super().forward(stats, time)
        return torch.cat([feats, self.embedding.to(feats.dtype)], 1)


class FeatureGate(nn.Module):
    """Learnable sigmoid gates on the feature columns, with an L1 sparsity penalty.

    Gates start near 1 (logit 3 -> 0.95). ``penalty()`` = ``l1 * sum(sigmoid(logits))`` is added to
    the meta-loss, so the gates are trained with the modulator by the meta-optimizer."""

    def __init__(self, width: int, l1: float = 1e-3, init_logit: float = 3.0):
        super().__init__()
        self.l1 = l1
        self.logits = nn.Parameter(torch.full((width,), float(init_logit), dtype=torch.float32))

    def gates(self) -> Tensor:
        return torch.sigmoid(self.logits)

    def forward(self, features: Tensor) -> Tensor:
        return features * self.gates()

    def penalty(self) -> Tensor:
        return self.l1 * self.gates().sum()
