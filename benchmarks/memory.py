"""Peak live tensor memory of a callable, on any device, without a GPU allocator.

:func:`measure_peak` runs ``fn()`` under a ``TorchDispatchMode`` that sees the output of every
ATen op (forward, backward - the autograd engine keeps the mode - and optimizer foreach
kernels). Each output's untyped storage is counted once, by identity, with its size; a
``weakref.finalize`` on the storage object (PyTorch keeps one Python object per live storage)
subtracts it when the storage is freed. Storages that exist at entry are split in two:

* ``baseline`` - the storages of the tensors reachable from the given roots (a model, an
  optimizer: parameters, ``.grad``, buffers, optimizer state, the modulator...). They count from
  the start and are subtracted if freed during the call (``zero_grad`` frees gradients);
* every other tensor alive at entry (found through ``gc``: input batches, unrelated models) -
  known, never counted, so a view of an input batch is not mistaken for an allocation.

``peak = max over the call of (live baseline bytes + live new bytes)``. Not seen: scratch
buffers that kernels allocate and free internally (e.g. convolution workspaces), which never
become tensors; storages resized in place are re-read whenever they appear as an op output.

:func:`profiler_transient_peak` is an independent check: it integrates the allocation and free
events that ``torch.profiler.profile(profile_memory=True)`` records (every CPU allocation and
free, in time order, scratch buffers included) and returns the largest rise over the memory at
entry.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MB = 1024 * 1024


@dataclasses.dataclass
class PeakMemory:
    baseline_bytes: int  # storages reachable from the roots at entry
    peak_bytes: int  # max over the call of live (baseline + new) bytes
    end_bytes: int  # live (baseline + new) bytes when the call returned
    new_storages: int  # storages created during the call
    new_peak_bytes: int  # max over the call of live bytes of the storages created during it
    result: Any = None

    @property
    def transient_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes


def collect_tensors(*roots: Any, max_depth: int = 12) -> list[torch.Tensor]:
    """Every tensor reachable from ``roots`` through modules, containers, dataclasses and object
    ``__dict__`` s (parameters and their ``.grad``, buffers, optimizer state, ...)."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [(r, 0) for r in roots]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen or depth > max_depth or obj is None:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            out.append(obj)
            if obj.grad is not None:
                stack.append((obj.grad, depth + 1))
            continue
        if isinstance(obj, (str, bytes, int, float, bool, complex, type)) or callable(obj) and not hasattr(obj, "__dict__"):
            continue
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
            stack.extend((k, depth + 1) for k in obj.keys() if isinstance(k, torch.Tensor))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in obj)
        elif isinstance(obj, torch.nn.Module):
            stack.extend((v, depth + 1) for v in obj.__dict__.values())
        elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
            if type(obj).__module__.startswith(("torch.", "builtins", "typing")) and not isinstance(obj, torch.optim.Optimizer):
                continue
            stack.extend((v, depth + 1) for v in vars(obj).values())
    return out


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        return None  # tensor subclasses / wrappers: no storage of their own
    if t.is_sparse or t.device.type == "meta":
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class _Tracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}  # id(storage) -> counted bytes
        self.counted: set[int] = set()  # the storages whose bytes count (the others: known, not counted)
        self.refs: dict[int, weakref.ref] = {}
        self.live = 0
        self.peak = 0
        self.new = 0
        self.new_keys: set[int] = set()
        self.live_new = 0
        self.peak_new = 0

    def _free(self, key: int) -> None:
        size = self.sizes.pop(key, 0)
        self.counted.discard(key)
        self.live -= size
        if key in self.new_keys:
            self.new_keys.discard(key)
            self.live_new -= size
        self.refs.pop(key, None)

    def add(self, storage: torch.UntypedStorage, count: bool) -> bool:
        key = id(storage)
        ref = self.refs.get(key)
        if ref is not None and ref() is storage:
            if key in self.counted:  # a counted storage may have been resized in place (also one first seen empty)
                size = storage.nbytes()
                self.live += size - self.sizes[key]
                if key in self.new_keys:
                    self.live_new += size - self.sizes[key]
                    self.peak_new = max(self.peak_new, self.live_new)
                self.sizes[key] = size
                self.peak = max(self.peak, self.live)
            return False
        size = storage.nbytes() if count else 0
        self.sizes[key] = size
        if count:
            self.counted.add(key)
        self.refs[key] = weakref.ref(storage)
        weakref.finalize(storage, self._free, key)
        self.live += size
        self.peak = max(self.peak, self.live)
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = _storage(t)
                if s is not None and self.add(s, count=True):
                    self.new += 1
                    self.new_keys.add(id(s))
                    self.live_new += self.sizes[id(s)]
                    self.peak_new = max(self.peak_new, self.live_new)
        return out


def measure_peak(fn: Callable[[], Any], baseline: Iterable[Any] = ()) -> PeakMemory:
    """Run ``fn()`` and return its peak of live tensor bytes, counting the storages of the
    tensors reachable from ``baseline`` (e.g. ``[model, optimizer]``) from the start."""
    tracker = _Tracker()
    for t in collect_tensors(*baseline):
        s = _storage(t)
        if s is not None:
            tracker.add(s, count=True)
    base = tracker.live
    gc.collect()
    for obj in gc.get_objects():  # everything else alive now: known, not counted
        if issubclass(type(obj), torch.Tensor):
            s = _storage(obj)
            if s is not None:
                tracker.add(s, count=False)
    tracker.peak = tracker.live
    with tracker:
        result = fn()
    return PeakMemory(baseline_bytes=base, peak_bytes=tracker.peak, end_bytes=tracker.live,
                      new_storages=tracker.new, new_peak_bytes=tracker.peak_new, result=result)


def profiler_transient_peak(fn: Callable[[], Any]) -> int:
    """Largest rise of allocated CPU memory over its value at entry while ``fn()`` runs, from
    the allocation events of the PyTorch profiler (independent check of :func:`measure_peak`).
    The profiler cannot see frees of blocks allocated before it started (gradients freed by
    ``zero_grad``), so this compares with ``PeakMemory.new_peak_bytes``, not ``transient_bytes``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda x: x[0])
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def self_test(size_mb: float = 4.0) -> dict[str, float]:
    """A known allocation: ``size_mb`` MB allocated and freed inside, next to a pre-existing
    tensor of the same size in the baseline. Returns the measured rise (MB) of both tools."""
    n = int(size_mb * MB) // 4
    keep = torch.zeros(n)

    def fn():
        x = torch.ones(n)  # +size
        y = x * 2  # +size (peak: 2 * size)
        del x, y
        z = torch.empty(n // 2)  # +size/2 after the frees
        return float(z.numel())

    m = measure_peak(fn, baseline=[keep])
    p = profiler_transient_peak(fn)
    return {
        "expected_baseline_mb": size_mb, "baseline_mb": m.baseline_bytes / MB,
        "expected_rise_mb": 2 * size_mb, "rise_mb": m.transient_bytes / MB,
        "profiler_rise_mb": p / MB, "end_rise_mb": (m.end_bytes - m.baseline_bytes) / MB,
    }


if __name__ == "__main__":
    print(self_test())
