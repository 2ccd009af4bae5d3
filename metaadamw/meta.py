"""The meta-update: train the modulator through one hypothetical MetaAdamW step.

    1. g      = grad L(theta; batch1)                               (first order, a constant)
    2. m', v' = AdamW moments updated with g; features at theta      (paper Algorithm 2)
    3. alpha, beta, lambda1, lambda2 = modulator(features)           (with a graph)
    4. theta' = theta - lr alpha (m'_hat / (sqrt(v'_hat) + eps) + beta wd theta)
    5. L_train' = L(theta'; batch2), g' = grad of it (create_graph, only for the gradient term),
       L_val' = L(theta'; val), L_val = L(theta; val)  (one validation batch for both terms)
    6. terms -> weighting -> meta-loss (+ gate penalty); one step of the meta-optimizer.

Four forward passes (three with the gradient-alignment term's double backward). The model's
parameters are never written: theta' lives in separate tensors swapped into the modules for
the forward passes. Buffers (BatchNorm running statistics) are restored afterwards and ``.grad``
is never touched, so the model is exactly as before the call. Attention is forced onto the math
kernel of ``scaled_dot_product_attention`` during the meta-update, since the fused CPU kernels
cannot be differentiated twice.

A meta-update whose meta-loss or meta-gradient is not finite is skipped (``record.skipped``,
counted in ``optimizer.meta_skipped``): the modulator stays as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from metaadamw import functional as F
from metaadamw.features import normalised_time
from metaadamw.objectives import MetaQuantities

if TYPE_CHECKING:
    from metaadamw.optimizer import MetaAdamW


@dataclasses.dataclass
class MetaRecord:
    """What one meta-update did, as plain Python values (for logs and telemetry tables)."""

    step: int  # optimizer.global_step when it ran
    meta_loss: float
    terms: dict[str, float]  # objective term -> value
    sigmas: dict[str, float]  # weighting sigma per term (empty for sum / fixed)
    groups: list[str]
    alpha: list[float]  # per group, at theta (the multipliers the hypothetical step used)
    beta: list[float]
    lambda1: list[float]
    lambda2: list[float]
    skipped: bool = False
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def swapped_parameters(model: nn.Module, replacements: dict[int, Tensor]) -> Iterator[None]:
    """Temporarily replace parameters (by identity) with other tensors in every module using them
    (tied weights included). RNN modules refresh their flat weights on the next forward."""
    saved = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in replacements:
                saved.append((module, name, p))
                module._parameters[name] = replacements[id(p)]
    try:
        yield
    finally:
        for module, name, p in saved:
            module._parameters[name] = p


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm running statistics, counters) to its value on entry."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def meta_update(opt: "MetaAdamW", model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch1: Any,
                batch2: Any, val_batch: Any) -> "MetaRecord":
    objective = opt.objective
    params = opt._params
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    with preserved_buffers(model), sdpa_kernel([SDPBackend.MATH]), torch.enable_grad():
        # 1. g at theta on batch 1
        loss1 = loss_fn(model, batch1)
        grads = torch.autograd.grad(loss1, [params[i] for i in trainable], allow_unused=True)
        active = [i for i, g in zip(trainable, grads) if g is not None]
        if not active:
            raise ValueError("meta_step: the loss on batch1 does not depend on any parameter of this optimizer "
                             "(is the model the one the optimizer was built for?)")
        g = [gr.detach() for gr in grads if gr is not None]

        # 2. hypothetical moments and features at theta
        theta = [params[i].detach() for i in active]
        groups = [opt.param_groups[opt.tensor_info[i].param_group] for i in active]
        m_new, v_new, bc1, bc2 = [], [], [], []
        for i, gi, grp in zip(active, g, groups):
            st = opt.state[params[i]]
            b1, b2 = grp["betas"]
            m_old = st.get("exp_avg", torch.zeros_like(gi))
            v_old = st.get("exp_avg_sq", torch.zeros_like(gi))
            m_new.append(m_old.lerp(gi, 1 - b1))
            v_new.append(v_old * b2 + (1 - b2) * gi * gi)
            t = opt._steps[i] + 1
            bc1.append(1 - b1**t)
            bc2.append(1 - b2**t)
        beta1 = torch.tensor([grp["betas"][0] for grp in groups], device=opt.device)
        beta2 = torch.tensor([grp["betas"][1] for grp in groups], device=opt.device)
        zeros = torch.zeros(len(active), device=opt.device)
        stats, _, _ = F.single_tensor_stats(opt.modulator.extractor.required_stats, g, zeros, zeros, m_new, v_new,
                                            theta, beta1, beta2)
        stats = opt.full_stats(stats, None if len(active) == len(params) else torch.tensor(active, device=opt.device))
        time = normalised_time(opt._time + 1, opt.total_steps)
        was_training = opt.modulator.training
        opt.modulator.train()
        mult = opt.modulator(stats, time)

        # 3. theta', differentiable in alpha and beta
        group_idx = [opt._group_of[i] for i in active]
        index = torch.tensor(group_idx, device=opt.device)
        a, w = mult.alpha.index_select(0, index), mult.beta.index_select(0, index)
        theta_prime = {}
        for k, (i, p, grp) in enumerate(zip(active, theta, groups)):
            direction = m_new[k] / ((v_new[k] / bc2[k]).sqrt_() + grp["eps"])  # the Adam direction, a constant
            m_new[k] = v_new[k] = None  # free the moments as we go: only theta' and its graph stay alive
            decay = 1 - grp["lr"] * grp["weight_decay"] * a[k] * w[k]
            theta_prime[id(params[i])] = p * decay.to(p.dtype) - (grp["lr"] / bc1[k]) * a[k].to(p.dtype) * direction
        del m_new, v_new

        # 4. losses at theta' (and at theta for the validation reference)
        tp = [theta_prime[id(params[i])] for i in active]
        q = MetaQuantities(tensor_group=index, num_groups=len(opt.group_names), grads=g, lambda1=mult.lambda1,
                           lambda2=mult.lambda2)
        with swapped_parameters(model, theta_prime):
            if objective.second_order or "gen_gap" in objective.terms:
                q.loss_train_prime = loss_fn(model, batch2)
            if objective.second_order:
                gp = torch.autograd.grad(q.loss_train_prime, tp, create_graph=True, allow_unused=True)
                q.grads_prime = [x if x is not None else torch.zeros_like(p) for x, p in zip(gp, tp)]
            if objective.needs_val:
                q.loss_val_prime = loss_fn(model, val_batch)
        if objective.needs_val:
            with torch.no_grad():
                q.loss_val = loss_fn(model, val_batch)

        # 5. meta-loss and meta-gradients
        terms = objective(q)
        loss, sigmas = opt.weighting(terms)
        penalty = opt.modulator.penalty()
        if penalty is not None:
            loss = loss + penalty
        meta_params = opt.meta_parameters()
        meta_grads = torch.autograd.grad(loss, meta_params, allow_unused=True)
        opt.modulator.train(was_training)

    values = {k: float(v.detach()) for k, v in terms.items()}
    record = MetaRecord(
        step=opt.global_step, meta_loss=float(loss.detach()), terms=values,
        sigmas={k: float(v.detach()) for k, v in sigmas.items()},
        groups=list(opt.group_names), alpha=mult.alpha.detach().tolist(), beta=mult.beta.detach().tolist(),
        lambda1=mult.lambda1.detach().tolist(), lambda2=mult.lambda2.detach().tolist(),
    )
    finite = math.isfinite(record.meta_loss) and all(
        bool(torch.isfinite(gr).all()) for gr in meta_grads if gr is not None)
    if not finite:
        record.skipped, record.reason = True, "non-finite meta-loss or meta-gradient"
        return record
    for p, gr in zip(meta_params, meta_grads):
        p.grad = gr
    opt.meta_optimizer.step()
    for p in meta_params:
        p.grad = None
    return record
