"""Sweep throughput and the framework's own cost per trial, on real Ray Tune.

Runs the same fixed set of trials (1 CPU each) twice in one process: one trial at a time, then two
at a time, each into a fresh results directory, and prints

* the speed-up of two concurrent 1-CPU trials over one at a time (target: >= 1.7x on 2 cores);
* the framework's own cost per trial: the sweep's wall time minus the trials' own training,
  meta-update and evaluation time (summed over the trials of the serial run), divided by the
  number of trials - Ray scheduling, worker start-up, task building, checkpoints and result
  writing (target: < 2 s).

The fixed set of trials (``--workload``):

* ``main`` (default): the README's main job in miniature - the baseline (MetaAdamW) and AdamW
  trials of ``search_spaces/quick.yaml`` on all five embedded tasks, with that file's budget,
  for ``--seeds`` seeds (2: 20 trials of 1-8 s, about 2.5 minutes in all);
* ``short``: embedded CIFAR-10 only, ``--epochs`` epochs (3: ~1.7 s a trial), ``--trials`` trials -
  a stress case where the ~3.5 s start of each run's Ray Tune actors (paid once by both runs)
  weighs against a few seconds of training.

Ray is started once (2 CPUs) and shared by both runs, as in a real session, and warmed up by a
small unmeasured sweep. The last line is one JSON object with the figures.

    python benchmarks/sweep_overhead.py                            # the main job's trials
    python benchmarks/sweep_overhead.py --workload short           # 8 trials of 3 epochs
    python benchmarks/sweep_overhead.py --workload short --epochs 9
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import textwrap
import time
from pathlib import Path

TARGET_SPEEDUP = 1.7
TARGET_OVERHEAD_S = 2.0
QUICK = Path(__file__).resolve().parent.parent / "search_spaces" / "quick.yaml"


def _study_file(directory: Path, name: str, trials: int, batches: int | None, task: str, epochs: int = 3) -> Path:
    seeds = max(1, trials // 2)  # arms: adamw and baseline
    path = directory / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        tasks: [{task}]
        seeds: {seeds}
        budget: {{epochs: {epochs}, max_train_batches: {batches if batches else "null"}, patience: 0}}
        resources: {{cpus: 1, gpus: 0}}
        baseline: {{meta_per_epoch: 2}}
        """))
    return path


def _main_job_file(directory: Path, name: str, seeds: int) -> Path:
    """The baseline and AdamW trials of ``search_spaces/quick.yaml`` (its tasks, data, budget and
    baseline), for ``seeds`` seeds."""
    import yaml

    quick = yaml.safe_load(QUICK.read_text())
    spec = {"name": name, "data": quick.get("data", "embedded"), "tasks": quick["tasks"], "seeds": seeds,
            "budget": quick["budget"], "resources": {"cpus": 1, "gpus": 0}, "adamw": True,
            "baseline": quick.get("baseline", {})}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _run(spec: Path, out: Path, concurrent: int) -> tuple[float, float, int]:
    from ablate.study import load_study
    from ablate.sweep import run_study

    study = load_study(spec)
    t0 = time.perf_counter()
    outcome = run_study(study, out, max_concurrent=concurrent)
    wall = time.perf_counter() - t0
    trials = outcome.results.trials
    assert (trials["status"] == "ok").all(), trials[["trial_id", "status", "error"]]
    return wall, float(trials["time_total_s"].sum()), len(trials)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=("main", "short"), default="main",
                    help="main (default): quick.yaml's baseline and AdamW trials on all five tasks; short: --trials "
                         "trials of one task")
    ap.add_argument("--seeds", type=int, default=2, help="main workload: seeds (2 trials per task and seed; default 2)")
    ap.add_argument("--trials", type=int, default=8, help="short workload: trials per run (even; default 8)")
    ap.add_argument("--batches", type=int, default=None, help="short workload: cap on training batches per epoch "
                                                              "(default: whole epochs)")
    ap.add_argument("--epochs", type=int, default=3, help="short workload: epochs per trial (default 3)")
    ap.add_argument("--task", default="cifar10", help="short workload: the embedded task (default cifar10: ~1.7 s a trial)")
    args = ap.parse_args()

    import ray

    from ablate.study import load_study
    from ablate.cluster import init_ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.workload == "main":
            serial, parallel = (_main_job_file(tmp, name, args.seeds) for name in ("serial", "parallel"))
        else:
            serial, parallel = (_study_file(tmp, name, args.trials, args.batches, args.task, args.epochs)
                                for name in ("serial", "parallel"))
        warmup = _study_file(tmp, "warmup", 2, 2, "cifar10")
        init_ray(load_study(serial), num_cpus=2)
        try:
            _run(warmup, tmp / "out", concurrent=2)  # start the workers and import torch in them: not measured
            wall_1, train_1, n_1 = _run(serial, tmp / "out", concurrent=1)
            wall_2, train_2, n_2 = _run(parallel, tmp / "out", concurrent=2)
        finally:
            ray.shutdown()

    speedup = wall_1 / wall_2
    overhead = (wall_1 - train_1) / n_1
    print()
    print(f"{'run':<28}{'trials':>7}{'wall s':>9}{'trial time s':>14}{'framework s/trial':>19}")
    print(f"{'one at a time':<28}{n_1:>7}{wall_1:>9.1f}{train_1:>14.1f}{overhead:>19.2f}")
    print(f"{'two at a time (1 CPU each)':<28}{n_2:>7}{wall_2:>9.1f}{train_2:>14.1f}{(2 * wall_2 - train_2) / n_2:>19.2f}")
    print(f"speed-up of two concurrent trials: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x: "
          f"{'PASS' if speedup >= TARGET_SPEEDUP else 'MISS'})")
    print(f"framework cost per trial: {overhead:.2f} s (target < {TARGET_OVERHEAD_S} s: "
          f"{'PASS' if overhead < TARGET_OVERHEAD_S else 'MISS'})")
    print(json.dumps({"workload": args.workload, "trials": n_1, "serial_wall_s": round(wall_1, 2), "parallel_wall_s": round(wall_2, 2),
                      "speedup": round(speedup, 3), "framework_s_per_trial": round(overhead, 3)}))


if __name__ == "__main__":
    main()
