"""Loading a big study's stored results: parsing every trial's parts against the cache that the end
of each ``ablate run`` writes (``parts_cache/``, see ``ablate.results``).

    python benchmarks/results_loading.py [--trials 1000] [--quick]

Writes a study of N trials (rows of 80 columns as a real trial's, 10 epochs of history and 40
telemetry rows each; ``ablate.results.write_trial``) to a temporary folder, then times
``load_results`` parsing the parts, ``consolidate`` (which writes the combined tables and the
cache), ``load_results`` from the cache, and the same after 1% of the trials were added. Prints a
table and, as its last line, one JSON object (the ratios are against the parsing load, in the
same process).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

from ablate.results import consolidate, load_results, write_manifest, write_trial


def _trial(out: Path, k: int) -> str:
    trial_id = f"{k:012x}"
    row = {"trial_id": trial_id, "study": "bench", "arm": f"arm{k % 20}", "status": "ok", "task": "etth1",
           "seed": k % 10, "best_metric": 0.5 + k * 1e-4, "finished_at": f"2026-12-01T{k // 3600 % 24:02d}:{k // 60 % 60:02d}"
           f":{k % 60:02d}", "priorities": [1.0, 2.0, 3.0], "meta_every": None if k % 20 == 0 else 10,
           **{f"setting_{j}": float(j * k % 7) for j in range(70)}}
    history = [{"epoch": e, "step": 100 * e, "train_loss": 1.0 / e, "val_mse": 1.0 / e + k * 1e-5,
                "wall_s": 2.0 * e} for e in range(1, 11)]
    telemetry = [{"meta_update": m, "step": 10 * m, "group": f"g{g}", "alpha": 1.0, "beta": 1.0, "skipped": False}
                 for m in range(10) for g in range(4)]
    write_trial(out, row, history, telemetry)
    return trial_id


def _timed(fn):
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = fn()
    return time.perf_counter() - start, value


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="100 trials")
    args = ap.parse_args(argv)
    n = 100 if args.quick else args.trials
    folder = Path(tempfile.mkdtemp(prefix="results_loading_"))
    try:
        out = folder / "bench"
        print(f"writing {n} trials ({3 * n} part files) to {out} ...", flush=True)
        written, ids = _timed(lambda: [_trial(out, k) for k in range(n)])
        write_manifest(out, "bench", {t: {"study": "bench", "arm": f"arm{k % 20}"} for k, t in enumerate(ids)})
        parse_s, parsed = _timed(lambda: load_results(out))
        consolidate_s, _ = _timed(lambda: consolidate(out))
        cached_s, cached = _timed(lambda: load_results(out))
        for table in ("trials", "history", "telemetry"):
            pd.testing.assert_frame_equal(getattr(parsed, table), getattr(cached, table))
        extra = [_trial(out, k) for k in range(n, n + max(1, n // 100))]
        write_manifest(out, "bench", {t: {"study": "bench", "arm": f"arm{k % 20}"} for k, t in enumerate(ids + extra)})
        partly_s, _ = _timed(lambda: load_results(out))
        result = {"trials": n, "write_s_per_trial": round(written / n, 4), "load_parsing_s": round(parse_s, 2),
                  "consolidate_s": round(consolidate_s, 2), "load_cached_s": round(cached_s, 3),
                  "load_cached_plus_1pct_new_s": round(partly_s, 3),
                  "speedup_cached": round(parse_s / cached_s, 1), "speedup_plus_1pct_new": round(parse_s / partly_s, 1)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{'load_results, every part parsed':45s} {result['load_parsing_s']:8.2f} s")
    print(f"{'consolidate (combined tables and cache)':45s} {result['consolidate_s']:8.2f} s")
    print(f"{'load_results from the cache':45s} {result['load_cached_s']:8.3f} s   {result['speedup_cached']}x faster")
    print(f"{'... after 1% more trials (parsed)':45s} {result['load_cached_plus_1pct_new_s']:8.3f} s   "
          f"{result['speedup_plus_1pct_new']}x faster")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
