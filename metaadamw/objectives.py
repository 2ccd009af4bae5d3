"""Meta objectives: what the meta-update trains the modulator to minimise.

An objective is a :class:`MetaObjective` (the class, or an instance of it, registered in
:data:`metaadamw.OBJECTIVES`) whose call maps the quantities of one meta-update
(:class:`MetaQuantities`) to named scalar *terms*. It declares the terms it
produces, which of them can be negative (the weightings need to know), and whether it needs g'
(whose meta-gradient takes a Hessian-vector product: see :mod:`metaadamw.meta`), the training
loss at theta' or the validation batch, so the meta-update computes nothing it does not use.

With the default ``meta_gradient="finite_difference"`` an objective receives L_train', L_val' and
g' as leaf tensors (values, no graph back to the model): it may combine them in any
differentiable way, and the meta-update carries their gradients back to theta' itself.

Built in (theta' = one MetaAdamW step from theta with the current modulator, differentiable in
alpha and beta):

* ``gradient`` - gradient alignment: mean over groups of
  ``lambda1_g * ||g'_g||^2 - lambda2_g * cos(g_g, g'_g)`` with g the batch-1 gradient at theta and
  g' the batch-2 gradient at theta' (over the groups that have a gradient: a group whose tensors
  are all frozen takes no part).
* ``loss_decrease`` - ``L_val(theta') - L_val(theta)`` on one validation batch.
* ``gen_gap`` - ``|L_train(theta') - L_val(theta')|`` with L_train on batch 2. It is evaluated at
  the hypothetical parameters, where the modulator has influence; at theta (as in the paper's
  code) it would be a constant with no gradient for the modulator.
* ``combined`` - all three.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from metaadamw import OBJECTIVES
from metaadamw.functional import flat_dot, squares_and_dots, stack_scalars

#: canonical order of the paper's three terms (priorities and fixed weights follow it)
TERM_ORDER = ("gradient", "loss_decrease", "gen_gap")


@dataclasses.dataclass
class MetaQuantities:
    """What one meta-update computed. Tensors that carry a graph back to the modulator are
    marked; everything else is a constant."""

    tensor_group: Tensor  # (N,) group index of every tensor
    num_groups: int
    grads: list[Tensor]  # g at theta on batch 1 (constants)
    lambda1: Tensor  # (groups,) from the modulator (graph)
    lambda2: Tensor  # (groups,) (graph)
    grads_prime: list[Tensor] | None = None  # g' at theta' on batch 2 (graph; second order)
    loss_train_prime: Tensor | None = None  # L(theta'; batch 2) (graph)
    loss_val_prime: Tensor | None = None  # L(theta'; val batch) (graph)
    loss_val: Tensor | None = None  # L(theta; val batch) (constant)


class MetaObjective:
    terms: tuple[str, ...] = ()
    signed_terms: frozenset[str] = frozenset()  # terms that can be negative
    second_order: bool = False  # needs g' (whose meta-gradient takes a Hessian-vector product)
    needs_train_loss: bool = False  # needs L_train(theta'; batch 2)
    needs_val: bool = False  # needs the validation batch
    #: needs L(theta; val batch), a forward pass of its own; None: the same as ``needs_val`` (as
    #: objectives written before this flag expect)
    needs_val_at_theta: bool | None = None

    def __call__(self, q: MetaQuantities) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(self, q), which maps the "
                                  f"MetaQuantities q of a meta-update to its terms {tuple(self.terms)} (a dict of "
                                  f"scalar tensors)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(terms={self.terms})"


def needs_val_at_theta(objective: MetaObjective) -> bool:
    """Whether the meta-update evaluates L(theta; val batch) for ``objective``."""
    flag = getattr(objective, "needs_val_at_theta", None)
    return objective.needs_val if flag is None else bool(flag)


def _group_sums(values: Tensor, tensor_group: Tensor, num_groups: int) -> Tensor:
    """Per-tensor values (a vector) summed per group."""
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.index_add(0, tensor_group, values)


def gradient_alignment(q: MetaQuantities) -> Tensor:
    g, gp = q.grads, q.grads_prime
    sq_prime, dot = squares_and_dots(gp, g)
    sq_prime = _group_sums(sq_prime, q.tensor_group, q.num_groups)
    dot = _group_sums(dot, q.tensor_group, q.num_groups)
    sq = _group_sums(stack_scalars([flat_dot(x, x) for x in g]), q.tensor_group, q.num_groups)
    per_group = q.lambda1 * sq_prime - q.lambda2 * _cosine(dot, sq, sq_prime)
    # the mean over the groups that take part (a group whose tensors are all frozen, or have no
    # gradient this time, adds 0 and would shrink the term against the others)
    taking_part = torch.zeros(q.num_groups, dtype=per_group.dtype, device=per_group.device).index_fill_(
        0, q.tensor_group, 1.0)
    return (per_group * taking_part).sum() / taking_part.sum().clamp(min=1.0)


#: a group whose gradient norm is below this many machine epsilons of the whole gradient's norm
#: has no direction for the cosine (see :func:`_cosine`)
NO_DIRECTION_EPS = 100.0


def _cosine(dot: Tensor, sq_a: Tensor, sq_b: Tensor) -> Tensor:
    """``dot / (sqrt(sq_a) sqrt(sq_b))`` per group, and 0 (with zero gradient) where either group's
    gradient has no direction: it is exactly zero on the batch (a multi-task head, an unused
    branch), or it is rounding noise - below ``NO_DIRECTION_EPS`` machine epsilons (of float32, or
    of float64 for float64 gradients) of the whole gradient's norm (a convolution's bias before BatchNorm, whose true gradient is 0). The cosine of
    noise means nothing, and its derivative, of order 1 / ||g'_group||, would dominate the
    meta-gradient (1e9 in float32): the finite-difference Hessian-vector product would be noise,
    and the exact one garbage. The masked entries never meet ``sqrt`` at 0, whose backward would be
    ``0 * inf = NaN``."""
    # (float32's epsilon at most: bfloat16's would make the threshold 61% of the total, and no group passes)
    tiny = (NO_DIRECTION_EPS * torch.finfo(torch.promote_types(sq_a.dtype, torch.float32)).eps) ** 2
    ok = (sq_a > tiny * sq_a.sum().detach()) & (sq_b > tiny * sq_b.sum().detach())  # (both > 0: exact zeros too)
    denom = torch.where(ok, sq_a, 1.0).sqrt() * torch.where(ok, sq_b, 1.0).sqrt()
    return torch.where(ok, dot / denom, 0.0)


@OBJECTIVES.register("gradient")
class GradientAlignment(MetaObjective):
    """mean_g lambda1_g ||g'_g||^2 - lambda2_g cos(g_g, g'_g)."""

    terms = ("gradient",)
    signed_terms = frozenset({"gradient"})
    second_order = True

    def __call__(self, q: MetaQuantities) -> dict[str, Tensor]:
        return {"gradient": gradient_alignment(q)}


@OBJECTIVES.register("loss_decrease")
class LossDecrease(MetaObjective):
    """L_val(theta') - L_val(theta) on the same validation batch."""

    terms = ("loss_decrease",)
    signed_terms = frozenset({"loss_decrease"})
    needs_val = True

    def __call__(self, q: MetaQuantities) -> dict[str, Tensor]:
        return {"loss_decrease": q.loss_val_prime - q.loss_val}


@OBJECTIVES.register("gen_gap")
class GeneralizationGap(MetaObjective):
    """|L_train(theta'; batch 2) - L_val(theta'; val batch)|."""

    terms = ("gen_gap",)
    needs_train_loss = True
    needs_val = True
    needs_val_at_theta = False

    def __call__(self, q: MetaQuantities) -> dict[str, Tensor]:
        return {"gen_gap": (q.loss_train_prime - q.loss_val_prime).abs()}


@OBJECTIVES.register("combined")
class Combined(MetaObjective):
    """All three terms of the paper, combined by the weighting."""

    parts = (GradientAlignment(), LossDecrease(), GeneralizationGap())
    terms = TERM_ORDER
    signed_terms = frozenset({"gradient", "loss_decrease"})
    second_order = True
    needs_train_loss = True
    needs_val = True

    def __call__(self, q: MetaQuantities) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for part in self.parts:
            out.update(part(q))
        return out
