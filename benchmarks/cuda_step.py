"""MetaAdamW on a CUDA device: host synchronisations, step() time, kernel launches, the modulator's
encoder paths and the meta-update, against torch.optim.AdamW - the GPU checks, as one script.

    python benchmarks/cuda_step.py                 # on a GPU machine (about two minutes)
    python benchmarks/cuda_step.py --device cpu    # the same measurements on the CPU (a dry run)

The CPU benchmark (``optimizer_overhead.py``) holds the targets; this script says what a GPU does
with the same code, on the same three models (10-tensor MLP, MiniGPT, ResNet-18 for 32x32 images):

1. Host synchronisations: ``step()`` from the very first call (layout building included) and the
   steps after a meta-update, under ``torch.cuda.set_sync_debug_mode("error")``: "none", or the
   error raised.
2. ``step()`` time against ``AdamW(foreach=True)`` (and ``AdamW(fused=True)`` on CUDA): blocks of
   back-to-back steps between two ``torch.cuda.synchronize()``, interleaved rounds, medians.
3. Operations per ``step()`` (each is a kernel launch on a GPU, more or less: counted with a
   ``TorchDispatchMode``) and, on CUDA, the kernel launches the profiler sees.
4. The modulator's encoder on this device: the eager layer (what ``step()`` runs off the CPU) and
   the fused ``torch._transformer_encoder_layer_fwd`` (what it runs on the CPU): time for the
   default 8 layers, and whether the fused one synchronises. This is the measurement that decides
   whether the fused layer should also be used on CUDA.
5. One meta-update (``batch1=None`` and explicit batches) against one training step.

Prints a table to stderr as it goes and, as its last line, one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _models  # noqa: E402

MODELS = ("mlp10", "minigpt", "resnet18")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return type(batch)(to(b, device) for b in batch)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, k: int) -> float:
    """Seconds per call over a block of ``k`` back-to-back calls (the device drained before and after)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / k


class Workload:
    """A model on the device with fixed gradients from one real backward pass, and its batches."""

    def __init__(self, name: str, device: torch.device):
        model, self.loss_fn, make_batch, _ = _models.make_workload(name, seed=0)
        self.model = model.to(device)
        g = torch.Generator().manual_seed(1)
        self.batches = [to(make_batch(g), device) for _ in range(4)]
        self.loss_fn(self.model, self.batches[0]).backward()

    def twin(self) -> torch.nn.Module:
        twin = copy.deepcopy(self.model)
        for p, q in zip(self.model.parameters(), twin.parameters()):
            q.grad = p.grad.detach().clone()
        return twin


# ------------------------------------------------------------------------------------------------
# 1. host synchronisations


def check_syncs(name: str, device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    w = Workload(name, device)
    opt = _models.make_meta_adamw(w.model)
    sync(device)
    for _ in range(2):
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                opt.step()
        except RuntimeError as err:
            return f"SYNC: {str(err).splitlines()[0][:200]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        # (may synchronise; not checked: an error here is the meta-update's own, not a synchronisation in step())
        opt.meta_step(w.model, w.loss_fn, None, w.batches[1], w.batches[2])
    return "none"


# ------------------------------------------------------------------------------------------------
# 2. step time, 3. operations and kernel launches per step


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(step: Callable[[], Any]) -> int:
    with _CountOps() as counter:
        step()
    return counter.count


def launches_per_step(step: Callable[[], Any], device: torch.device, steps: int = 5) -> float | None:
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    n = sum(e.count for e in prof.key_averages() if "LaunchKernel" in e.key)
    return n / steps


def bench_step(name: str, device: torch.device, rounds: int, block_s: float) -> dict[str, Any]:
    w = Workload(name, device)
    opts: dict[str, torch.optim.Optimizer] = {"MetaAdamW": _models.make_meta_adamw(w.model)}
    hyper = dict(lr=_models.LR, weight_decay=_models.WD)
    opts["AdamW foreach"] = torch.optim.AdamW(w.twin().parameters(), foreach=True, **hyper)
    if device.type == "cuda":
        opts["AdamW fused"] = torch.optim.AdamW(w.twin().parameters(), fused=True, **hyper)
    for opt in opts.values():
        for _ in range(3):
            opt.step()
    inner = {k: max(1, min(500, round(block_s / max(timed(o.step, device, 3), 1e-7)))) for k, o in opts.items()}
    times: dict[str, list[float]] = {k: [] for k in opts}
    for r in range(rounds):
        for k in (list(opts) if r % 2 == 0 else list(opts)[::-1]):
            times[k].append(timed(opts[k].step, device, inner[k]))
    out: dict[str, Any] = {f"{k}_us": statistics.median(v) * 1e6 for k, v in times.items()}
    out["ratio_vs_foreach"] = out["MetaAdamW_us"] / out["AdamW foreach_us"]
    if "AdamW fused_us" in out:
        out["ratio_vs_fused"] = out["MetaAdamW_us"] / out["AdamW fused_us"]
    out["ops_MetaAdamW"] = ops_per_step(opts["MetaAdamW"].step)
    out["ops_AdamW_foreach"] = ops_per_step(opts["AdamW foreach"].step)
    out["launches_MetaAdamW"] = launches_per_step(opts["MetaAdamW"].step, device)
    out["launches_AdamW_foreach"] = launches_per_step(opts["AdamW foreach"].step, device)
    out["groups"] = len(opts["MetaAdamW"].group_names)
    return out


# ------------------------------------------------------------------------------------------------
# 4. the encoder


def bench_encoder(device: torch.device, reps: int) -> dict[str, Any]:
    w = Workload("minigpt", device)
    opt = _models.make_meta_adamw(w.model)
    opt.step()
    mod = opt.modulator
    x = torch.randn(len(opt.group_names), mod.width, device=device)
    out: dict[str, Any] = {"tokens": x.shape[0], "width": mod.width, "layers": len(mod.layers)}

    def eager() -> torch.Tensor:
        y = x
        for layer in mod.layers:
            y = layer.infer_eager(y)
        return y

    def fused() -> torch.Tensor:
        y = x.unsqueeze(0)
        for layer in mod.layers:
            y = layer.infer_fused(y)
        return y.squeeze(0)

    with torch.no_grad():
        try:
            same = torch.allclose(eager(), fused(), atol=1e-5)
        except RuntimeError as err:  # no fused kernel for this device or dtype
            out.update(fused_error=str(err).splitlines()[0][:200], fused_equals_eager=None, fused_syncs="n/a")
            timed(eager, device, 10)
            out["eager_us"] = statistics.median(timed(eager, device, 50) for _ in range(reps)) * 1e6
            out["eager_ops"] = ops_per_step(eager)
            return out
        for label, fn in (("eager", eager), ("fused", fused)):
            timed(fn, device, 10)
            out[f"{label}_us"] = statistics.median(timed(fn, device, 50) for _ in range(reps)) * 1e6
            out[f"{label}_ops"] = ops_per_step(fn)
        out["fused_equals_eager"] = same
        out["fused_syncs"] = "n/a (CPU)"
        if device.type == "cuda":
            sync(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                fused()
                out["fused_syncs"] = "none"
            except RuntimeError as err:
                out["fused_syncs"] = f"SYNC: {str(err).splitlines()[0][:200]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return out


# ------------------------------------------------------------------------------------------------
# 5. the meta-update


def bench_meta(name: str, device: torch.device, reps: int) -> dict[str, Any]:
    w = Workload(name, device)
    model, loss_fn, (b1, b2, val, batch) = w.model, w.loss_fn, w.batches
    opt = _models.make_meta_adamw(model)
    opt.step()
    twin = w.twin()
    adamw = torch.optim.AdamW(twin.parameters(), lr=_models.LR, weight_decay=_models.WD, foreach=True)

    def train_step() -> None:
        adamw.zero_grad()
        loss_fn(twin, batch).backward()
        adamw.step()

    def meta(explicit: bool) -> Callable[[], Any]:
        return lambda: opt.meta_step(model, loss_fn, b1 if explicit else None, b2, val)

    fns = {"train": train_step, "meta_explicit": meta(True), "meta_batch1_none": meta(False)}
    for fn in fns.values():
        timed(fn, device, 2)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[k].append(timed(fns[k], device, 5 if k == "train" else 1))
    train = statistics.median(times["train"])
    return {"train_step_ms": train * 1e3,
            "meta_explicit_ms": statistics.median(times["meta_explicit"]) * 1e3,
            "meta_batch1_none_ms": statistics.median(times["meta_batch1_none"]) * 1e3,
            "meta_explicit_ratio": statistics.median(times["meta_explicit"]) / train,
            "meta_batch1_none_ratio": statistics.median(times["meta_batch1_none"]) / train}


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run of the script)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cuda_step.py: no CUDA device here (torch.cuda.is_available() is False); "
                         "use --device cpu for a dry run")
    if device.type == "cpu":
        torch.set_num_threads(1)
    rounds, reps = (3, 3) if args.quick else (9, 7)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"device: {name}, torch {torch.__version__}")
    if device.type == "cpu":
        log("(a dry run: wall-clock, without optimizer_overhead.py's allocator settings; the CPU figures of record "
            "come from that script)")
    result: dict[str, Any] = {"device": name, "torch": torch.__version__}

    def guarded(label: str, fn: Callable[[], Any], show: Callable[[Any], str]) -> Any:
        """One measurement; an error is recorded and reported, and the script goes on (a GPU
        session has minutes: one failing part must not lose the others)."""
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - reported, not hidden
            value = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
            log(f"   {label:9s} FAILED {value['error']}")
            return value
        log(f"   {label:9s} {show(value)}")
        return value

    def show_step(r: dict[str, Any]) -> str:
        fused = f", AdamW fused {r['AdamW fused_us']:.0f} us ({r['ratio_vs_fused']:.2f}x)" if "AdamW fused_us" in r else ""
        launches = (f", launches {r['launches_MetaAdamW']:.0f} vs {r['launches_AdamW_foreach']:.0f}"
                    if r["launches_MetaAdamW"] is not None else "")
        return (f"MetaAdamW {r['MetaAdamW_us']:.0f} us, AdamW foreach {r['AdamW foreach_us']:.0f} us "
                f"({r['ratio_vs_foreach']:.2f}x){fused}; ops {r['ops_MetaAdamW']} vs {r['ops_AdamW_foreach']}{launches}")

    def show_encoder(e: dict[str, Any]) -> str:
        if "fused_error" in e:
            return f"eager {e['eager_us']:.0f} us ({e['eager_ops']} ops); the fused layer failed here: {e['fused_error']}"
        return (f"eager {e['eager_us']:.0f} us ({e['eager_ops']} ops), fused {e['fused_us']:.0f} us ({e['fused_ops']} "
                f"ops), equal: {e['fused_equals_eager']}, fused syncs: {e['fused_syncs']}")

    def show_meta(r: dict[str, Any]) -> str:
        return (f"train step {r['train_step_ms']:.2f} ms; meta-update {r['meta_explicit_ratio']:.2f}x "
                f"(batch1=None {r['meta_batch1_none_ratio']:.2f}x)")

    log("1. host synchronisations in step() (first step included)")
    result["syncs"] = {m: guarded(m, lambda m=m: check_syncs(m, device), str) for m in MODELS}
    log("2-3. step(): time, operations, kernel launches")
    result["step"] = {m: guarded(m, lambda m=m: bench_step(m, device, rounds, block_s=0.05), show_step) for m in MODELS}
    log("4. the modulator's encoder (default 8 layers)")
    result["encoder"] = guarded("encoder", lambda: bench_encoder(device, reps), show_encoder)
    log("5. meta-update against a training step")
    result["meta"] = {m: guarded(m, lambda m=m: bench_meta(m, device, reps), show_meta) for m in MODELS}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
