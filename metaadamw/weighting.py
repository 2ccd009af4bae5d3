"""Loss weightings: how the objective terms are combined into one meta-loss.

Registered in :data:`metaadamw.WEIGHTINGS`; each is an ``nn.Module`` built as
``Weighting(terms, signed_terms, priorities=..., weights=..., form=...)`` whose forward maps the
terms to ``(loss, sigmas)`` - a scalar tensor, and a dict of a scalar tensor per term (empty if it
has none):

* ``sum`` - sum of the terms.
* ``fixed`` - ``sum_i w_i L_i`` with user weights (in the order gradient, loss_decrease, gen_gap).
* ``huw`` - homoscedastic uncertainty weighting (Kendall et al. 2018) with learnable
  ``s_i = log sigma_i^2``: regression form ``sum_i 0.5 exp(-s_i) L_i + 0.5 s_i``, classification
  form ``sum_i exp(-s_i) L_i + s_i``.
* ``huw_priority`` - the same with priorities ``p_i`` scaling the regulariser:
  ``sum_i 0.5 exp(-s_i) L_i + 0.5 p_i s_i`` (classification: ``exp(-s_i) L_i + p_i s_i``).

Well-posedness. HUW's optimum for a term is ``s* = log(L / p)`` - it exists only for L > 0. A
term that can be negative (gradient alignment, loss decrease) would drive ``exp(-s) L`` to minus
infinity and its log-variance with it. So the uncertainty weightings apply HUW to
``softplus(L)`` for the terms an objective declares signed - a positive, monotone transform with
the same minimisers - and keep ``s`` in ``[-LOG_VAR_BOUND, LOG_VAR_BOUND]`` (a term that reaches
exactly zero would otherwise still push ``s`` to minus infinity) by projection: the meta-update
clamps the stored ``s`` after each meta-optimizer step (:meth:`Weighting.project_`), so a bound
``s`` still gets the gradient that brings it back when its term grows again (a clamp in the
forward pass alone would give it zero gradient for good). The sigmas reported are
``exp(s / 2)``.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaadamw import WEIGHTINGS
from metaadamw.objectives import TERM_ORDER

LOG_VAR_BOUND = 10.0
FORMS = ("regression", "classification")
#: the built-in weightings that do not use ``priorities`` / ``fixed_weights`` (a weighting a user
#: registers is given both and may use either)
IGNORE_PRIORITIES = frozenset({"sum", "fixed", "huw"})
IGNORE_FIXED_WEIGHTS = frozenset({"sum", "huw", "huw_priority"})
#: the built-in weightings that do not use ``weighting_form`` (no log-variances: the form is moot)
IGNORE_FORM = frozenset({"sum", "fixed"})


def _by_term(values: Sequence[float] | None, terms: Sequence[str], what: str) -> list[float]:
    """Pick the entries of a (gradient, loss_decrease, gen_gap)-ordered list for ``terms``."""
    values = [1.0, 1.0, 1.0] if values is None else [float(v) for v in values]
    if len(values) != len(TERM_ORDER):
        raise ValueError(f"{what} must have {len(TERM_ORDER)} entries in the order {TERM_ORDER}, got {values}")
    extra = [t for t in terms if t not in TERM_ORDER]
    if extra and values != [1.0, 1.0, 1.0]:
        warnings.warn(f"MetaAdamW: {what}={values} are given for the terms {TERM_ORDER}; the objective's term(s) "
                      f"{extra} are not among them and are weighted 1.0 (to weight them, register a weighting that "
                      f"does)", stacklevel=4)
    return [values[TERM_ORDER.index(t)] if t in TERM_ORDER else 1.0 for t in terms]


class Weighting(nn.Module):
    def __init__(self, terms: Sequence[str], signed_terms: Sequence[str] = (), *, priorities=None, weights=None,
                 form: str = "regression"):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"weighting_form must be one of {FORMS}, got {form!r}")
        self.terms = tuple(terms)
        self.signed_terms = frozenset(signed_terms)
        self.form = form

    def forward(self, terms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(self, terms), which maps the "
                                  f"objective's terms (a dict of scalar tensors) to (meta-loss, dict of sigma per term "
                                  f"- empty if it has none)")

    @torch.no_grad()
    def project_(self) -> None:
        """Put the weighting's own parameters back into their feasible set (after a meta-optimizer
        step); nothing to do by default."""


@WEIGHTINGS.register("sum")
class Sum(Weighting):
    """Plain sum of the terms."""

    def forward(self, terms):
        return torch.stack([terms[t] for t in self.terms]).sum(), {}


@WEIGHTINGS.register("fixed")
class Fixed(Weighting):
    """Fixed user weights (``fixed_weights``)."""

    def __init__(self, terms, signed_terms=(), *, priorities=None, weights=None, form="regression"):
        super().__init__(terms, signed_terms, form=form)
        self.register_buffer("weights", torch.tensor(_by_term(weights, self.terms, "fixed_weights"), dtype=torch.float32))

    def forward(self, terms):
        values = torch.stack([terms[t] for t in self.terms])
        return (self.weights.to(values) * values).sum(), {}


@WEIGHTINGS.register("huw_priority")
class PriorityUncertainty(Weighting):
    """Homoscedastic uncertainty weighting with priorities on the regulariser."""

    def __init__(self, terms, signed_terms=(), *, priorities=None, weights=None, form="regression"):
        super().__init__(terms, signed_terms, form=form)
        self.register_buffer("priorities", torch.tensor(_by_term(priorities, self.terms, "priorities"), dtype=torch.float32))
        self.log_vars = nn.Parameter(torch.zeros(len(self.terms), dtype=torch.float32))

    def forward(self, terms):
        values = torch.stack([F.softplus(terms[t]) if t in self.signed_terms else terms[t] for t in self.terms])
        s = self.log_vars.clamp(-LOG_VAR_BOUND, LOG_VAR_BOUND).to(values)
        p = self.priorities.to(values)
        scale = 0.5 if self.form == "regression" else 1.0
        loss = (scale * (torch.exp(-s) * values + p * s)).sum()
        return loss, {t: torch.exp(0.5 * s[i]) for i, t in enumerate(self.terms)}

    @torch.no_grad()
    def project_(self) -> None:
        self.log_vars.clamp_(-LOG_VAR_BOUND, LOG_VAR_BOUND)


@WEIGHTINGS.register("huw")
class Uncertainty(PriorityUncertainty):
    """Homoscedastic uncertainty weighting (Kendall et al. 2018), all priorities 1."""

    def __init__(self, terms, signed_terms=(), *, priorities=None, weights=None, form="regression"):
        super().__init__(terms, signed_terms, priorities=None, form=form)
