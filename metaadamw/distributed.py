"""MetaAdamW under ``torch.distributed`` (DistributedDataParallel and the like).

Every rank holds a copy of the modulator. ``step()`` needs no communication: DDP has already
averaged the gradients, so identical modulators give identical multipliers and the replicas stay
identical. Two things keep the modulators identical (with ``sync_meta=True``, the default, when
a process group of more than one rank is initialised):

* when the optimizer is made, every rank takes rank 0's modulator and weighting (as DDP takes
  rank 0's model when it wraps it), whatever seed each rank used;
* every meta-update averages the meta-gradients over the ranks (one all-reduce of one flat
  buffer) before the meta-optimizer's step; a rank whose meta-loss is not finite contributes
  NaN, so that every rank skips that meta-update together.

``meta_step`` unwraps a ``DistributedDataParallel`` or ``DataParallel`` model and runs its
``module``: the meta-update's hypothetical passes stay outside DDP's forward, which would
broadcast the buffers and prepare its gradient reducer at each of them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


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


def average_(tensors: list[Tensor], world: int, poison: bool = False) -> list[Tensor]:
    """The mean over the ranks of each tensor (same shapes on every rank), by one all-reduce of
    one flat buffer. ``poison``: this rank contributes NaN (its values are not usable), which
    makes every rank's mean NaN."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    if poison:
        flat.fill_(float("nan"))
    dist.all_reduce(flat)
    flat.div_(world)
    return [part.view_as(t) for t, part in zip(tensors, flat.split([t.numel() for t in tensors]))]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` or ``DataParallel`` wrapper (else ``model``)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model
