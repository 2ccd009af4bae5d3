"""MetaAdamW's cost against torch.optim.AdamW(foreach=True), on the CPU, one thread.

    python benchmarks/optimizer_overhead.py            # thorough (a few minutes)
    python benchmarks/optimizer_overhead.py --quick    # about a minute
    python benchmarks/optimizer_overhead.py --profile  # + torch.profiler op tables

1. step() time on a 10-tensor MLP (5 x Linear, width 256), a MiniGPT (vocab 10k, d 128, 2
   layers, 4 heads, block 128, untied head) and a ResNet-18 (32x32 images). The gradients come
   from one real backward pass and stay fixed; only step() is timed. Default MetaAdamW
   (``MetaAdamW(model.named_parameters(), model=model)``: 8-layer modulator, FF 16, 6 heads,
   'basic' features) against ``AdamW(params, lr=5e-4, weight_decay=1e-2, foreach=True)``.
2. Per-tensor cost: residual MLPs of width-16 layers with 10 ... 1,600 tensors; a least-squares
   line of step time against the number of tensors for each optimizer; the slope difference is
   MetaAdamW's extra time per tensor.
3. One meta-update ``meta_step(model, loss_fn, b1, b2, val)`` against one training step
   ``zero_grad(); loss_fn(model, b).backward(); AdamW.step()`` (MLP: batch 64; MiniGPT: 16 x 128
   tokens; ResNet-18: 32 x 3x32x32), with the default finite-difference meta-gradient; the same
   meta-update with ``meta_gradient="exact"`` (double backward) is printed beside it. The
   training step is timed in blocks of back-to-back steps (~20 ms, its steady state in a training
   loop), every meta-update as one call (as a loop makes them).
4. Peak live tensor memory of the meta-update against the training step (``memory.py``), both
   counting the parameters, gradients, buffers and optimizer state alive during the call.
5. Where the time goes: a timer breakdown of MetaAdamW.step() (moments / norms and statistics /
   feature extractor / modulator encoder / update / Python rest) and of meta_step() (each
   forward pass and each autograd.grad call; the passes through the model summed and divided by
   the training step: what the ratio would be with nothing else in the meta-update).

The two sides of every comparison run interleaved in one process, round by round (order
alternating), so machine noise hits both; every figure is a median over the rounds. Times are
the process's CPU time by default (one thread: the work done, not the time other processes
take on a shared machine - on a loaded 2-core box wall-clock ratios swung 2.8x-6.5x where
CPU-time ratios stayed within 2.7x-2.8x); ``--clock wall`` for wall-clock. On Linux the
script restarts itself with ``GLIBC_TUNABLES`` set so that glibc keeps freed memory: otherwise
both optimizers' step-sized temporaries are page-faulted in again on some steps and not others,
depending on the call order, and the ratios swing by about 30 % (``--system-malloc`` keeps the
system allocator; the minor page faults per step are printed either way). The last line printed
is one JSON object with the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

try:
    import resource
except ImportError:  # not on Unix
    resource = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _models  # noqa: E402
import memory  # noqa: E402

from metaadamw import MetaAdamW  # noqa: E402
from metaadamw import functional as MF  # noqa: E402

# glibc malloc keeps freed memory (no trimming back to the OS, no mmap below 32 MB): without it,
# the step-sized temporaries of both optimizers (AdamW's _foreach_sqrt over all tensors at once,
# MetaAdamW's per bucket) are page-faulted in again on some steps and not on others, depending
# on the order of the calls, and the ratios swing by +-30 % (measured: MiniGPT 0.8x - 1.25x, by block size).
MALLOC_TUNABLES = "glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=33554432"
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]  # set by main()
STEP_MODELS = ("mlp10", "minigpt", "resnet18")
#: row of table 5b: the meta-update's forward and backward passes through the model, summed
MODEL_PASSES = "the model's passes (5 forward, 4 backward), summed"
TENSOR_COUNTS = (10, 50, 200, 800, 1600)
TARGETS = {
    "step_ratio_mlp10": 2.0, "step_ratio_minigpt": 1.25, "step_ratio_resnet18": 1.25,
    "extra_us_per_tensor": 5.0,
    "meta_vs_train_step_mlp10": 4.0, "meta_vs_train_step_minigpt": 4.0, "meta_vs_train_step_resnet18": 4.0,
    "meta_peak_memory_ratio_mlp10": 3.0, "meta_peak_memory_ratio_minigpt": 3.0,
    "meta_peak_memory_ratio_resnet18": 3.0,
}

# ------------------------------------------------------------------------------------------------
# helpers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def no_gc():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


FAULTS: dict[str, list[float]] = {}  # name -> minor page faults per call, per block (last interleaved())


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, inner: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every function: ``rounds`` rounds, each timing a block of ``inner[name]``
    calls of every function in turn (order reversed every other round). Minor page faults per
    call go to ``FAULTS``."""
    names = list(fns)
    inner = inner or {n: 1 for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    FAULTS.clear()
    FAULTS.update({n: [] for n in names})
    with no_gc():
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                fn, k = fns[n], inner[n]
                f0 = minor_faults()
                t0 = clock()
                for _ in range(k):
                    fn()
                times[n].append((clock() - t0) / k)
                FAULTS[n].append((minor_faults() - f0) / k)
    return times


def calibrate(fn: Callable[[], Any], target_s: float, max_inner: int = 1000) -> int:
    """Calls per timed block so that a block lasts about ``target_s``."""
    t0 = clock()
    fn()
    dt = max(clock() - t0, 1e-7)
    return int(max(1, min(max_inner, round(target_s / dt))))


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def line_fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    return slope, my - slope * mx


def make_adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=_models.LR, weight_decay=_models.WD, foreach=True)


def step_pair(name: str, **meta_kwargs: Any) -> tuple[MetaAdamW, torch.optim.AdamW, torch.nn.Module, str]:
    """Two identical models with the same fixed gradients (one real backward pass), one
    optimizer each, warmed up by a few steps."""
    model, loss_fn, make_batch, source = _models.make_workload(name, seed=0)
    batch = make_batch(torch.Generator().manual_seed(1))
    loss_fn(model, batch).backward()
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.detach().clone()
    meta, ref = _models.make_meta_adamw(model, **meta_kwargs), make_adamw(twin)
    for _ in range(3):
        meta.step()
        ref.step()
    return meta, ref, model, source


# ------------------------------------------------------------------------------------------------
# 1. step time


def bench_steps(rounds: int, block_s: float) -> dict[str, dict[str, float]]:
    """The default MetaAdamW on every model, and - for information, not a target - the option that
    refreshes the multipliers every 10 steps instead of every step."""
    out = {}
    runs = [(name, name, {}) for name in STEP_MODELS] + [
        (f"{name}/refresh10", name, {"refresh_every": 10}) for name in ("mlp10", "minigpt")]
    for label, name, kwargs in runs:
        meta, ref, model, source = step_pair(name, **kwargs)
        fns = {"MetaAdamW": meta.step, "AdamW": ref.step}
        inner = {k: calibrate(f, block_s) for k, f in fns.items()}
        t = interleaved(fns, rounds, inner)
        paired = [a / b for a, b in zip(t["MetaAdamW"], t["AdamW"])]
        out[label] = {
            "meta_us": med(t["MetaAdamW"]) * 1e6, "adamw_us": med(t["AdamW"]) * 1e6,
            "ratio": med(t["MetaAdamW"]) / med(t["AdamW"]), "paired_ratio": med(paired),
            "meta_faults": med(FAULTS["MetaAdamW"]), "adamw_faults": med(FAULTS["AdamW"]),
            "tensors": len(list(model.parameters())), "params": sum(p.numel() for p in model.parameters()),
            "groups": len(meta.group_names), "source": source, "rounds": rounds,
        }
        log(f"  step {label}: MetaAdamW {out[label]['meta_us']:.0f} us, AdamW {out[label]['adamw_us']:.0f} us")
        del meta, ref, model
    return out


# ------------------------------------------------------------------------------------------------
# 2. per-tensor cost


def bench_per_tensor(rounds: int, block_s: float) -> dict[str, Any]:
    fns, inner = {}, {}
    keep = []
    for n in TENSOR_COUNTS:
        meta, ref, model, _ = step_pair(f"tiny{n}")
        keep.append((meta, ref, model))
        for label, opt in (("MetaAdamW", meta), ("AdamW", ref)):
            fns[f"{label}/{n}"] = opt.step
            inner[f"{label}/{n}"] = calibrate(opt.step, block_s)
    t = interleaved(fns, rounds, inner)
    res: dict[str, Any] = {"points": {}}
    for label in ("MetaAdamW", "AdamW"):
        ys = [med(t[f"{label}/{n}"]) * 1e6 for n in TENSOR_COUNTS]
        slope, icpt = line_fit(list(map(float, TENSOR_COUNTS)), ys)
        res[label] = {"slope_us": slope, "intercept_us": icpt}
        res["points"][label] = ys
    res["extra_us_per_tensor"] = res["MetaAdamW"]["slope_us"] - res["AdamW"]["slope_us"]
    xs = list(map(float, TENSOR_COUNTS))  # the same, paired: one slope difference per round
    res["paired_extra_us_per_tensor"] = med([
        (line_fit(xs, [t[f"MetaAdamW/{n}"][r] for n in TENSOR_COUNTS])[0]
         - line_fit(xs, [t[f"AdamW/{n}"][r] for n in TENSOR_COUNTS])[0]) * 1e6 for r in range(rounds)])
    res["extra_us_fixed"] = res["MetaAdamW"]["intercept_us"] - res["AdamW"]["intercept_us"]
    log(f"  per tensor: MetaAdamW {res['MetaAdamW']['slope_us']:.2f} us, AdamW {res['AdamW']['slope_us']:.2f} us")
    return res


# ------------------------------------------------------------------------------------------------
# 3. + 4. meta-update against a training step: time and peak memory


class MetaSetup:
    """A MetaAdamW model (after one training step: moments and .grad exist) and an AdamW twin."""

    def __init__(self, name: str):
        model, loss_fn, make_batch, self.source = _models.make_workload(name, seed=0)
        g = torch.Generator().manual_seed(2)
        self.b1, self.b2, self.val, self.batch = (make_batch(g) for _ in range(4))
        self.loss_fn = loss_fn
        self.model, self.twin = model, copy.deepcopy(model)
        self.meta_opt, self.adamw = _models.make_meta_adamw(self.model), make_adamw(self.twin)
        loss_fn(self.model, self.batch).backward()
        self.meta_opt.step()
        self.train_step()
        self.skipped = 0

    def meta_step(self, loss_fn=None) -> None:
        rec = self.meta_opt.meta_step(self.model, loss_fn or self.loss_fn, self.b1, self.b2, self.val)
        self.skipped += int(rec.skipped)

    def reuse_meta_step(self) -> None:
        """``meta_step(model, loss_fn, None, b2, val)``: g from the .grad of the training step's backward
        pass (as ablate's trials call it), one forward and backward pass fewer."""
        rec = self.meta_opt.meta_step(self.model, self.loss_fn, None, self.b2, self.val)
        self.skipped += int(rec.skipped)

    def exact_meta_step(self) -> None:
        """The same meta-update with ``meta_gradient='exact'`` (double backward), for comparison."""
        default, self.meta_opt.meta_gradient = self.meta_opt.meta_gradient, "exact"
        try:
            self.meta_step()
        finally:
            self.meta_opt.meta_gradient = default

    def train_step(self) -> None:
        self.adamw.zero_grad()
        self.loss_fn(self.twin, self.batch).backward()
        self.adamw.step()

    def meta_train_step(self) -> None:
        """The same training step with MetaAdamW (memory only)."""
        self.meta_opt.zero_grad()
        self.loss_fn(self.model, self.batch).backward()
        self.meta_opt.step()


def bench_meta(rounds: dict[str, int], warmup: bool) -> dict[str, dict[str, float]]:
    out = {}
    for name in STEP_MODELS:
        s = MetaSetup(name)
        if warmup:
            s.meta_step()
            s.exact_meta_step()
        # the training step in blocks of back-to-back steps (~20 ms), as it runs in a training loop;
        # the meta-updates one call at a time, as a loop makes them. Timed alone after a meta-update,
        # the MLP's 1.7 ms training step took 2.1 ms (its data evicted from cache), which made
        # the meta-update look cheaper by that much (4.9x against 6.3x measured in a loop)
        inner = {"train_step": calibrate(s.train_step, 0.02), "meta_step": 1, "exact": 1, "reuse": 1}
        t = interleaved({"meta_step": s.meta_step, "train_step": s.train_step, "exact": s.exact_meta_step,
                         "reuse": s.reuse_meta_step}, rounds[name], inner)
        out[name] = {"meta_ms": med(t["meta_step"]) * 1e3, "train_ms": med(t["train_step"]) * 1e3,
                     "exact_ratio": med(t["exact"]) / med(t["train_step"]),
                     "reuse_ratio": med(t["reuse"]) / med(t["train_step"]),
                     "meta_faults": med(FAULTS["meta_step"]), "train_faults": med(FAULTS["train_step"]),
                     "ratio": med(t["meta_step"]) / med(t["train_step"]), "rounds": rounds[name],
                     "skipped": s.skipped}
        log(f"  meta {name}: meta_step {out[name]['meta_ms']:.0f} ms, train step {out[name]['train_ms']:.0f} ms")
    return out


def bench_memory(cross_check: bool) -> dict[str, dict[str, float]]:
    out = {}
    for name in STEP_MODELS:
        s = MetaSetup(name)
        train = memory.measure_peak(s.train_step, baseline=[s.twin, s.adamw])
        meta = memory.measure_peak(s.meta_step, baseline=[s.model, s.meta_opt])
        mtrain = memory.measure_peak(s.meta_train_step, baseline=[s.model, s.meta_opt])
        r = {
            "train_base_mb": train.baseline_bytes / memory.MB, "train_peak_mb": train.peak_bytes / memory.MB,
            "meta_base_mb": meta.baseline_bytes / memory.MB, "meta_peak_mb": meta.peak_bytes / memory.MB,
            "mtrain_peak_mb": mtrain.peak_bytes / memory.MB,
            "ratio": meta.peak_bytes / train.peak_bytes,
            "params_mb": sum(p.numel() * p.element_size() for p in s.model.parameters()) / memory.MB,
        }
        if cross_check:
            r["check"] = (train.new_peak_bytes / memory.MB, memory.profiler_transient_peak(s.train_step) / memory.MB,
                          meta.new_peak_bytes / memory.MB, memory.profiler_transient_peak(s.meta_step) / memory.MB)
        out[name] = r
        log(f"  memory {name}: meta {r['meta_peak_mb']:.1f} MB, train {r['train_peak_mb']:.1f} MB")
    return out


# ------------------------------------------------------------------------------------------------
# 5. breakdowns


class Timers:
    def __init__(self) -> None:
        self.acc: dict[str, float] = {}
        self.order: list[tuple[str, float]] = []

    def wrap(self, label: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = clock() - t0
                self.acc[label] = self.acc.get(label, 0.0) + dt
                self.order.append((label, dt))
        return wrapped

    def reset(self) -> None:
        self.acc, self.order = {}, []


def step_breakdown(name: str, steps: int) -> dict[str, float]:
    """Median us per step of each part of MetaAdamW.step() (timers around the functions that
    step() calls), with the AdamW step interleaved for reference."""
    meta, ref, _, _ = step_pair(name)
    tm = Timers()
    saved = {k: getattr(MF, k) for k in ("foreach_moments_and_norms", "foreach_stats", "foreach_update")}
    mod = meta.modulator
    labels = {"foreach_moments_and_norms": "moments + norms (lerp, mul, addcmul, norm)",
              "foreach_stats": "statistics from the norms",
              "foreach_update": "update (sqrt, scale, addcdiv)"}
    per_step: dict[str, list[float]] = {}
    try:
        for k, fn in saved.items():
            setattr(MF, k, tm.wrap(labels[k], fn))
        mod.infer = tm.wrap("modulator (features + encoder)", mod.infer)
        mod.extractor.forward = tm.wrap("feature extractor", mod.extractor.forward)
        with no_gc():
            for i in range(steps):
                tm.reset()
                t0 = clock()
                meta.step()
                total = clock() - t0
                t1 = clock()
                ref.step()
                adamw = clock() - t1
                parts = dict(tm.acc)
                parts["encoder + head"] = parts["modulator (features + encoder)"] - parts["feature extractor"]
                parts["Python rest (plan, buckets, bookkeeping)"] = total - sum(
                    v for k, v in parts.items() if k in labels.values() or k == "modulator (features + encoder)")
                parts["MetaAdamW step total"] = total
                parts["AdamW step total"] = adamw
                for k, v in parts.items():
                    per_step.setdefault(k, []).append(v)
    finally:
        for k, fn in saved.items():
            setattr(MF, k, fn)
        del mod.infer, mod.extractor.forward
    return {k: med(v) * 1e6 for k, v in per_step.items()}


def meta_breakdown(name: str, reps: int) -> dict[str, float]:
    """Median ms of each phase of meta_step() (default finite-difference meta-gradient): the five
    loss evaluations, the torch.autograd.grad calls, the modulator and the rest."""
    s = MetaSetup(name)
    tm = Timers()
    # in meta_step's order: L(theta; val) comes right after g (with grad enabled, its graph dropped at once)
    loss_labels = ["fwd L(theta; b1)", "fwd L(theta; val) (graph dropped)", "fwd L(theta'; b2)", "fwd L(theta'; val)",
                   "fwd L(theta' + eps v; b2) (finite difference)"]
    grad_labels = ["grad g = dL/dtheta", "grad g' = dL(theta'; b2)", "grad dL(theta'; val)",
                   "grad of the meta-loss (objective, weighting, modulator)", "grad at theta' + eps v",
                   "grad through theta' to alpha and beta", "grad through the modulator's encoder"]
    model_grads = [grad_labels[i] for i in (0, 1, 2, 4)]  # the backward passes through the model
    real_grad = torch.autograd.grad
    counters = {"loss": 0, "grad": 0}

    def loss_fn(model, batch):
        label = loss_labels[min(counters["loss"], len(loss_labels) - 1)]
        counters["loss"] += 1
        return tm.wrap(label, s.loss_fn)(model, batch)

    def grad(*args, **kwargs):
        label = grad_labels[min(counters["grad"], len(grad_labels) - 1)]
        counters["grad"] += 1
        return tm.wrap(label, real_grad)(*args, **kwargs)

    s.meta_step()  # warm-up
    mod = s.meta_opt.modulator
    per: dict[str, list[float]] = {}
    try:
        torch.autograd.grad = grad
        mod.forward = tm.wrap("modulator forward", mod.forward)
        s.meta_opt.meta_optimizer.step = tm.wrap("meta-optimizer step", s.meta_opt.meta_optimizer.step)
        with no_gc():
            for _ in range(reps):
                tm.reset()
                counters["loss"] = counters["grad"] = 0
                t0 = clock()
                s.meta_step(loss_fn)
                total = clock() - t0
                k = 1 if name != "mlp10" else 10  # steady state of the small step, as in bench_meta
                t1 = clock()
                for _ in range(k):
                    s.train_step()
                train = (clock() - t1) / k
                parts = dict(tm.acc)
                parts["rest (moments, stats, theta', objective, buffers)"] = total - sum(parts.values())
                parts[MODEL_PASSES] = sum(parts.get(k, 0.0) for k in loss_labels + model_grads)
                parts["meta_step total"] = total
                parts["training step (AdamW)"] = train
                for k, v in parts.items():
                    per.setdefault(k, []).append(v)
    finally:
        torch.autograd.grad = real_grad
        del mod.forward
        del s.meta_opt.meta_optimizer.step
    return {k: med(v) * 1e3 for k, v in per.items()}


def torch_profiles(row_limit: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name in ("minigpt", "mlp10"):
        meta, ref, _, _ = step_pair(name)
        for label, opt in (("MetaAdamW", meta), ("AdamW", ref)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    opt.step()
            print(f"\n== torch.profiler: {label}.step() x10 on {name} ==")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))
    for name in ("minigpt", "resnet18"):
        s = MetaSetup(name)
        s.meta_step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            s.meta_step()
        print(f"\n== torch.profiler: meta_step on {name} ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))


# ------------------------------------------------------------------------------------------------
# report


def verdict(key: str, value: float) -> str:
    if key not in TARGETS:
        return "(no target)"
    return f"<= {TARGETS[key]:g}  {'PASS' if value <= TARGETS[key] else 'MISS'}"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler op tables")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the timer breakdowns")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                    help="cpu (default): CPU time of this process - with one thread, the work done, without the "
                         "time other processes take on a shared machine; wall: wall-clock time")
    ap.add_argument("--system-malloc", action="store_true",
                    help="do not restart with GLIBC_TUNABLES keeping freed memory (see MALLOC_TUNABLES)")
    return ap


def restarts_with_tunables(argv: list[str]) -> bool:
    """Whether the script restarts itself with ``GLIBC_TUNABLES=MALLOC_TUNABLES``: on Linux, unless
    they are set already or ``--system-malloc`` (or an abbreviation argparse accepts) is given."""
    return (sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ
            and not parser().parse_args(argv).system_malloc)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parser().parse_args(argv)

    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    quick = args.quick
    t_start = time.perf_counter()
    cfg = dict(
        step_rounds=15 if quick else 51, step_block_s=0.005 if quick else 0.02,
        tensor_rounds=5 if quick else 21, tensor_block_s=0.003 if quick else 0.01,
        meta_rounds={"mlp10": 5, "minigpt": 1, "resnet18": 1} if quick else {"mlp10": 21, "minigpt": 5, "resnet18": 3},
        meta_warmup=not quick,
        breakdown_steps=20 if quick else 100,
        breakdown_meta={"mlp10": 5, "minigpt": 1} if quick else {"mlp10": 21, "minigpt": 3, "resnet18": 2},
    )
    log(f"torch {torch.__version__}, {torch.get_num_threads()} thread, {'quick' if quick else 'thorough'} mode")

    self_test = memory.self_test(4.0)
    steps = bench_steps(cfg["step_rounds"], cfg["step_block_s"])
    per_tensor = bench_per_tensor(cfg["tensor_rounds"], cfg["tensor_block_s"])
    metas = bench_meta(cfg["meta_rounds"], cfg["meta_warmup"])
    mem = bench_memory(cross_check=not quick)
    breakdowns, meta_bds = {}, {}
    if not args.no_breakdown:
        for name in ("minigpt", "mlp10"):
            breakdowns[name] = step_breakdown(name, cfg["breakdown_steps"])
        for name, reps in cfg["breakdown_meta"].items():
            meta_bds[name] = meta_breakdown(name, reps)

    res = {
        "step_ratio_mlp10": steps["mlp10"]["ratio"],
        "step_ratio_minigpt": steps["minigpt"]["ratio"],
        "step_ratio_resnet18": steps["resnet18"]["ratio"],
        "extra_us_per_tensor": per_tensor["extra_us_per_tensor"],
        "meta_vs_train_step_mlp10": metas["mlp10"]["ratio"],
        "meta_vs_train_step_minigpt": metas["minigpt"]["ratio"],
        "meta_vs_train_step_resnet18": metas["resnet18"]["ratio"],
        **{f"meta_vs_train_step_reuse_{n}": metas[n]["reuse_ratio"] for n in STEP_MODELS},
        **{f"meta_vs_train_step_exact_{n}": metas[n]["exact_ratio"] for n in STEP_MODELS},
        "meta_peak_memory_ratio_minigpt": mem["minigpt"]["ratio"],
        "meta_peak_memory_ratio_resnet18": mem["resnet18"]["ratio"],
        "meta_peak_memory_ratio_mlp10": mem["mlp10"]["ratio"],
    }

    W = 100
    print("=" * W)
    print(f"MetaAdamW overhead vs torch.optim.AdamW(foreach=True) - torch {torch.__version__}, CPU, 1 thread, "
          f"{'quick' if quick else 'thorough'} mode")
    print(f"clock: {args.clock} ({'process CPU time' if args.clock == 'cpu' else 'wall-clock'});  "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset: system malloc)')}")
    print("=" * W)
    print("\n1. step() time (fixed gradients; median of interleaved rounds)")
    print(f"{'model':<17}{'tensors':>8}{'params':>11}{'groups':>7}{'MetaAdamW us':>14}{'AdamW us':>11}"
          f"{'ratio':>8}{'paired':>8}{'faults/step':>13}   target")
    for name in steps:
        r = steps[name]
        print(f"{name:<17}{r['tensors']:>8}{r['params']:>11,}{r['groups']:>7}{r['meta_us']:>14.0f}{r['adamw_us']:>11.0f}"
              f"{r['ratio']:>8.2f}{r['paired_ratio']:>8.2f}{r['meta_faults']:>7.0f}/{r['adamw_faults']:<5.0f}   "
              f"{verdict('step_ratio_' + name, r['ratio']) if name in STEP_MODELS else '(option, no target)'}")
    print(f"   ({steps['mlp10']['rounds']} rounds; 'paired' = median of per-round ratios; faults = minor page faults "
          f"per step, MetaAdamW/AdamW;\n    ResNet-18 from {steps['resnet18']['source']}, MiniGPT from "
          f"{steps['minigpt']['source']})")

    print("\n2. per-tensor cost (residual MLPs of 16x16 Linear layers; step time in us)")
    print(f"{'tensors':>8}" + "".join(f"{n:>10}" for n in TENSOR_COUNTS) + f"{'slope us/tensor':>18}{'intercept us':>14}")
    for label in ("MetaAdamW", "AdamW"):
        pts = per_tensor["points"][label]
        print(f"{label:>8}" if len(label) <= 8 else label, end="")
        print("".join(f"{v:>10.0f}" for v in pts) + f"{per_tensor[label]['slope_us']:>18.2f}"
              f"{per_tensor[label]['intercept_us']:>14.0f}")
    print(f"   extra per tensor (slope difference): {res['extra_us_per_tensor']:.2f} us   "
          f"{verdict('extra_us_per_tensor', res['extra_us_per_tensor'])}\n   paired (median over rounds of the "
          f"per-round slope difference): {per_tensor['paired_extra_us_per_tensor']:.2f} us;  fixed extra "
          f"(intercept difference): {per_tensor['extra_us_fixed']:.0f} us")

    print("\n3. meta-update vs one training step (forward + backward + AdamW step)")
    print(f"{'model':<10}{'meta_step ms':>14}{'train step ms':>15}{'ratio':>8}{'rounds':>8}{'faults':>14}   target"
          f"{'exact ratio':>20}{'reuse ratio':>13}")
    for name in STEP_MODELS:
        r = metas[name]
        print(f"{name:<10}{r['meta_ms']:>14.1f}{r['train_ms']:>15.1f}{r['ratio']:>8.2f}{r['rounds']:>8}"
              f"{r['meta_faults']:>8.0f}/{r['train_faults']:<5.0f}   "
              f"{verdict('meta_vs_train_step_' + name, r['ratio'])}{r['exact_ratio']:>12.2f}{r['reuse_ratio']:>13.2f}"
              + (f"  ({r['skipped']} skipped)" if r["skipped"] else ""))
    print("   (meta_gradient='finite_difference', the default; 'exact ratio': the same meta-update with "
          "meta_gradient='exact', double backward;\n    'reuse ratio': meta_step(model, loss_fn, None, b2, val) taking "
          "g from the training step's .grad, as ablate's trials run it; both for information)")

    print("\n4. peak live tensor memory (MB; baseline = params + grads + buffers + optimizer state at entry)")
    st = self_test
    print(f"   tool check: 4 MB baseline tensor, 2 x 4 MB allocated and freed inside -> baseline "
          f"{st['baseline_mb']:.2f} MB, rise {st['rise_mb']:.2f} MB (expected {st['expected_rise_mb']:.0f}), "
          f"profiler rise {st['profiler_rise_mb']:.2f} MB, left after {st['end_rise_mb']:.2f} MB")
    print(f"{'model':<10}{'params':>8}{'train base':>11}{'train peak':>11}{'meta base':>10}{'meta peak':>10}"
          f"{'ratio':>7}{'MetaAdamW train peak':>22}   target")
    for name in STEP_MODELS:
        r = mem[name]
        print(f"{name:<10}{r['params_mb']:>8.1f}{r['train_base_mb']:>11.1f}{r['train_peak_mb']:>11.1f}"
              f"{r['meta_base_mb']:>10.1f}{r['meta_peak_mb']:>10.1f}{r['ratio']:>7.2f}{r['mtrain_peak_mb']:>22.1f}   "
              f"{verdict('meta_peak_memory_ratio_' + name, r['ratio'])}")
    checks = [f"{n}: train {mem[n]['check'][0]:.2f} vs {mem[n]['check'][1]:.2f}, meta {mem[n]['check'][2]:.2f} vs "
              f"{mem[n]['check'][3]:.2f}" for n in STEP_MODELS if "check" in mem[n]]
    if checks:
        print("   cross-check, peak of the memory allocated during the call, dispatch tracker vs torch.profiler "
              "events (MB):\n     " + "; ".join(checks))

    if breakdowns:
        print("\n5a. where MetaAdamW.step() time goes (median us per step; timers around the functions step() calls)")
        keys = ["moments + norms (lerp, mul, addcmul, norm)", "statistics from the norms", "feature extractor",
                "encoder + head",
                "update (sqrt, scale, addcdiv)", "Python rest (plan, buckets, bookkeeping)", "MetaAdamW step total",
                "AdamW step total"]
        print(f"{'part':<44}" + "".join(f"{n:>12}" for n in breakdowns))
        for k in keys:
            print(f"{k:<44}" + "".join(f"{breakdowns[n][k]:>12.0f}" for n in breakdowns))
        print("   (parts are medians of their own, so they need not add up exactly to the total)")
        print("\n5b. where meta_step() time goes (median ms)")
        keys = list(next(iter(meta_bds.values())).keys())
        print(f"{'phase':<52}" + "".join(f"{n:>12}" for n in meta_bds))
        keys.remove(MODEL_PASSES)
        keys.sort(key=lambda k: k.startswith(("meta_step total", "training step")))
        for k in keys + [MODEL_PASSES]:
            print(f"{k:<52}" + "".join(f"{meta_bds[n].get(k, float('nan')):>12.1f}" for n in meta_bds))
        print(f"{'   the same / training step (the ratio without overhead)':<52}"
              + "".join(f"{meta_bds[n][MODEL_PASSES] / meta_bds[n]['training step (AdamW)']:>11.2f}x" for n in meta_bds))

    if args.profile:
        torch_profiles()

    print("\nsummary")
    for k, v in res.items():
        print(f"   {k:<36}{v:>8.2f}   {verdict(k, v)}")
    print(f"   (total {time.perf_counter() - t_start:.0f} s wall)")
    print(json.dumps({k: round(v, 4) for k, v in res.items()}))
    return res


if __name__ == "__main__":
    if restarts_with_tunables(sys.argv[1:]):  # (-h and bad arguments end here, before a restart)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                  dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES))
    main()
