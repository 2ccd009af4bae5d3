"""MetaAdamW under ``torch.distributed`` (DistributedDataParallel and the like).

Every rank holds a copy of the modulator. ``step()`` needs no communication: DDP has already
averaged the gradients, so identical modulators give identical multipliers and the replicas stay
identical. Two things keep the modulators identical (with ``sync_meta=True``, the default, when
a process group of more than one rank is initialised):

* when the optimizer is made, every rank takes rank 0's modulator and weighting (as DDP takes
  rank 0's model when it wraps it), whatever seed each rank used - or, for an optimizer made
  before ``init_process_group``, at its first ``step()`` or ``meta_step`` (one that stepped
  before is refused on every rank: its replicas may differ already). The ranks must optimise
  the same tensors (names, shapes, dtypes, param groups) in the same groups: a difference is
  refused on every rank;
* every meta-update averages the meta-gradients over the ranks (one all-reduce of one flat
  buffer) before the meta-optimizer's step; a rank whose meta-loss is not finite contributes
  NaN, so that every rank skips that meta-update together, and a rank whose meta-update raises
  (its ``loss_fn`` on its batch, say) says so in the same buffer before it raises, so that every
  rank raises instead of waiting in that collective until the process group's timeout. So does a
  rank that fails ``meta_step``'s checks of its batches and state before the meta-update (a
  missing ``val_batch``, a model moved to another device, ``param_groups`` edited by hand); only
  the checks of the call itself (the types of ``model`` and ``loss_fn``, ``torch.inference_mode``),
  the same on every rank by construction, raise on that rank alone;
* the meta-optimizer's step after the averaging computes alike on every rank (the same mean
  meta-gradient, the same modulator and meta-optimizer state), but it can still fail on one rank
  alone (an out-of-memory error in that rank's memory, a meta-optimizer of the caller's that reads
  something of its rank's): the ranks count such failures in one more all-reduce (one element),
  and where any rank failed every rank raises - the others saying that the modulators now differ
  (the failed rank's has not stepped, or stepped in part). That error is fatal to the run: restart
  every rank from a checkpoint. A lasting device error (a CUDA fault) fails that rank's count too,
  and the others then wait in it until the process group's timeout (not tested: no GPU here).

A model whose forward runs collectives of its own (``SyncBatchNorm``, a layer that all-reduces
statistics) runs them in the meta-update's passes too. A rank whose meta-update fails while the
others are still in their passes announces it in an all-reduce that meets one of the model's:
gloo then aborts the other ranks' processes ("Received data size doesn't match expected size
... collective mismatch"); NCCL may wait until the timeout or, where the sizes happen to match,
mix the two collectives' values. The failing rank cannot run the model's remaining collectives
in the others' stead, so there is no fix here: with such a model, treat any ``meta_step`` error
as fatal to the run. Every rank runs the same passes otherwise: the finite-difference pass of
the Hessian-vector product runs on a rank whose ``v`` is 0 or not finite too (its result
dropped), as the other ranks' may need it. A ``KeyboardInterrupt`` in one rank's meta-update is
announced as an error is (see ``metaadamw.meta._raised_on_every_rank``).

``meta_step`` unwraps a ``DistributedDataParallel`` or ``DataParallel`` model and runs its
``module``: the meta-update's hypothetical passes stay outside DDP's forward, which would
broadcast the buffers and prepare its gradient reducer at each of them.
"""

from __future__ import annotations

import sys
import zlib

import torch
import torch.distributed as dist
from torch import Tensor, nn


def made_by_zero_redundancy_optimizer() -> bool:
    """Whether torch's ``ZeroRedundancyOptimizer`` is making this optimizer (its ``optimizer_class``,
    made in its ``_init_local_optimizer``): each rank would then hold only its shard of the
    parameters. Looked up on the call stack, and only when that module has been imported."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    zero = getattr(module, "ZeroRedundancyOptimizer", None)
    frame = sys._getframe(1) if zero is not None else None
    while frame is not None:
        if frame.f_code.co_name == "_init_local_optimizer" and isinstance(frame.f_locals.get("self"), zero):
            return True
        frame = frame.f_back
    return False


def world_size(enabled: bool) -> int:
    """The number of ranks the meta state is kept in step over: 1 unless ``enabled`` and a
    default process group of several ranks is initialised."""
    if not enabled or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def broadcast_(tensors: list[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values (one collective per dtype)."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=src)
            for t, part in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(part.view_as(t))


def layout_fingerprint(items: list) -> int:
    """A 32-bit checksum of a layout's ``repr`` (exact in the float64 vector the ranks compare)."""
    return zlib.crc32(repr(items).encode())


def check_same_layout(tensors: list[Tensor], what: str, optimized: list[int] = (), stepped: bool = False) -> None:
    """Raise on every rank unless all ranks hold the same number of tensors with the same total
    size (the collectives below assume it; a mismatch would otherwise hang or mix values), and the
    same ``optimized`` layout ([tensors, elements, groups, fingerprint of shapes and groups] of the
    optimizer: a rank optimising other parameters would average meta-gradients of other groups
    into one modulator). ``stepped``: this rank's optimizer stepped before the process group
    existed, which is refused on every rank (an error raised on one rank alone would leave the
    others waiting in their next collective)."""
    mine = torch.tensor([len(tensors), sum(t.numel() for t in tensors), *optimized, float(stepped)],
                        dtype=torch.float64, device=tensors[0].device if tensors else None)
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if high[-1] > 0:
        raise RuntimeError(
            f"MetaAdamW(sync_meta=True): {'this optimizer' if stepped else 'the optimizer of another rank'} stepped "
            f"before torch.distributed's process group of {dist.get_world_size()} ranks existed, each rank with its own "
            f"modulator, so the ranks' multipliers - and their replicas - may already differ. Make the optimizer after "
            f"init_process_group (or pass sync_meta=False to keep one modulator per rank)")
    if not torch.equal(low, high):
        names = ["modulator tensors", "modulator elements", "optimized tensors", "optimized elements", "groups",
                 "fingerprint of the optimized tensors' names, shapes and groups and of the options"]
        differ = [f"{name} {int(mine[k])} on rank {dist.get_rank()}, {int(low[k])}..{int(high[k])} over the ranks"
                  for k, name in enumerate(names[:len(mine) - 1]) if low[k] != high[k]]
        raise ValueError(f"MetaAdamW(sync_meta=True): the ranks built different {what} ({'; '.join(differ)}): give "
                         f"every rank the same model, param groups and options (each rank optimises every "
                         f"parameter: sharding optimizers are not supported)")


def _nibbles(value: int) -> list[int]:
    """A 32-bit value's eight 4-bit digits, and their squares: summed over the ranks, exact in
    float32 (up to 74,000 ranks), they show whether every rank gave the same value."""
    digits = [(value >> (4 * k)) & 0xF for k in range(8)]
    return digits + [d * d for d in digits]


def average_(grads: list[Tensor | None], like: list[Tensor], world: int, poison: bool = False,
             layout: int | None = None, failed: bool = False) -> list[Tensor | None]:
    """The mean over the ranks of each gradient (None: zeros of ``like``'s shape), by one
    all-reduce of one flat buffer that also counts the ranks that had each gradient: one that
    no rank had stays None. ``poison``: this rank contributes NaN (its values are not usable),
    which makes every rank's mean NaN. ``layout``: this rank's 32-bit layout fingerprint, checked
    in the same buffer to be every rank's (refused on every rank alike: the sums of its digits and
    of their squares match ``world`` times this rank's only when all ranks agree). ``failed``: this
    rank raised before it had meta-gradients (counted in the same buffer: the other ranks raise
    too, instead of waiting in this collective until the process group's timeout); it returns
    nothing usable, and the caller raises its own error."""
    device = like[0].device
    extra = ([float(g is not None) for g in grads] + ([] if layout is None else [float(x) for x in _nibbles(layout)])
             + [float(failed)])
    flat = torch.cat([(torch.zeros_like(p) if g is None else g.detach()).reshape(-1) for g, p in zip(grads, like)]
                     + [torch.tensor(extra, dtype=like[0].dtype, device=device)])
    body = flat.numel() - len(extra)
    if poison:
        flat[:body].fill_(float("nan"))
    dist.all_reduce(flat)
    failures = int(flat[-1].item())
    if failed:
        return [None] * len(grads)
    if failures:
        raise RuntimeError(
            f"MetaAdamW.meta_step: {failures} other rank(s) of {world} raised an error in this meta-update (see "
            f"their output), so this one stops too rather than wait for them; nothing was updated on any rank")
    if layout is not None:
        sums = flat[body + len(grads):].tolist()
        if any(s != world * x for s, x in zip(sums, _nibbles(layout))):
            raise ValueError(
                "MetaAdamW(sync_meta=True): the ranks' optimizers no longer hold the same tensors in the same groups "
                "with the same options (their layout fingerprints differ at this meta-update): add_param_group was "
                "called on some ranks only, or with other tensors or names, or an option (refresh_every, "
                "total_steps, a param group's lr, the meta-optimizer's settings, ...) was set on some ranks only. Every rank must make the same add_param_group calls "
                "and settings; nothing was updated")
    values, present = flat[:body].div_(world), flat[body:body + len(grads)]
    out: list[Tensor | None] = []
    for p, part, had in zip(like, values.split([p.numel() for p in like]), present.tolist()):
        out.append(part.view_as(p) if had > 0 else None)
    return out


def count_(flag: bool, device: torch.device) -> int:
    """The number of ranks whose ``flag`` is set (one all-reduce of one element, on every rank)."""
    count = torch.tensor([float(flag)], device=device)
    dist.all_reduce(count)
    return int(count.item())


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` or ``DataParallel`` wrapper (also one that
    ``torch.compile`` wrapped in turn), else ``model``."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), (DistributedDataParallel, DataParallel)):
            model = model._orig_mod  # torch.compile(DDP(model))
        else:
            return model
