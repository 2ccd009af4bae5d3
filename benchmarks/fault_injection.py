"""Fault injection for `ablate run`, end to end on real Ray machinery.

    python benchmarks/fault_injection.py                 # every scenario (a few minutes on 2 CPUs)
    python benchmarks/fault_injection.py --only node_loss,bad_inputs
    python benchmarks/fault_injection.py --keep /tmp/fi  # keep the studies' directories

Scenarios (each injects faults into a small embedded-data study and then checks the results):

* ``node_loss``: a three-node cluster on this machine (``ray.cluster_utils.Cluster``: a head
  without CPUs, two one-CPU workers); one worker node is removed while two trials are mid-way.
  Ray Tune retries the interrupted trial from its last checkpoint on the other node.
* ``driver_sigkill``: ``ablate run`` is SIGKILLed (with the Ray processes it started) while a
  trial is mid-way; ``ablate run --resume`` reuses the finished trials and continues the
  interrupted one from its per-epoch checkpoint.
* ``divergence``: a plugin task whose validation split has NaN targets (non-finite meta-updates,
  which must be skipped) and arms with a huge learning rate (the model's loss overflows: status
  ``diverged``, with its history), in one study whose other trials must finish ok.
* ``bad_inputs``: malformed YAML, unknown task and component, wrong types, contradictory settings,
  a missing real-data directory and a plugin that fails to import: each must exit 2 with one
  line naming the problem, before Ray starts and before anything is written.
* ``kill_during_write``: the driver dies (``os._exit``) half-way through writing a trial's result
  part; the directory must stay readable (``load_results``, ``ablate report``) and ``--resume``
  must complete the study.

A result is *lost* when a trial that should be in the results (ok, or diverged) is missing,
appears twice, has a history with gaps or duplicates, or a trial finished before a fault was
recomputed. Printed last: one JSON line with each scenario's details, then
``faults_injected=N trials_affected=M results_lost=K``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.ablate
from tests.ablate.fault_scenarios import (  # noqa: E402
    OBJECT_STORE, checkpoint_epoch, divergence_study, done_ids, kill_during_write_study, killer_script, nanval_plugin,
    node_loss_study, write,
)

SCENARIOS = ("node_loss", "driver_sigkill", "divergence", "bad_inputs", "kill_during_write")


def _mid_way(out: Path) -> set[str]:
    ckpts = out / "checkpoints"
    return ({p.stem for p in ckpts.glob("*.pt")} if ckpts.exists() else set()) - done_ids(out)


def _lost(out: Path, expected: int, statuses: set[str] = frozenset({"ok"}), epochs: int | None = None) -> dict:
    """How many of the ``expected`` trials are missing, duplicated or have a broken history."""
    from ablate.results import load_results

    res = load_results(out)
    t = res.trials
    part_files = len(list((out / "parts").glob("*.trials.parquet")))
    history = res.history.groupby("trial_id")["epoch"].apply(list).to_dict() if len(res.history) else {}
    good = 0
    for _, row in t.iterrows():
        n = epochs if epochs is not None and row["status"] == "ok" else int(row["epochs_run"])
        if row["status"] in statuses and history.get(row["trial_id"], []) == list(range(1, n + 1)):
            good += 1
    duplicates = len(t) - t["trial_id"].nunique() if len(t) else 0
    return {"expected": expected, "recorded": int(t["trial_id"].nunique()) if len(t) else 0,
            "complete": good, "duplicates": int(duplicates), "part_files": part_files,
            "lost": max(expected - good, 0) + int(duplicates)}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ablate.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


# ---------------------------------------------------------------------------------------------


def node_loss(root: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from ablate.results import load_results
    from ablate.study import load_study
    from ablate.sweep import run_study

    epochs = 6
    spec = node_loss_study(root / "nodeloss.yaml", epochs)
    study = load_study(spec)
    out = root / "results"
    out_dir = out / "nodeloss"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE})
    box: dict = {}
    try:
        workers = [cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE) for _ in range(2)]
        cluster.wait_for_nodes()

        def drive() -> None:
            try:
                box["outcome"] = run_study(study, out, address=cluster.address, keep_checkpoints=True)
            except BaseException as exc:  # noqa: BLE001
                box["error"] = exc

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        deadline = time.monotonic() + 300
        while len(_mid_way(out_dir)) < 2 and driver.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        interrupted = _mid_way(out_dir)
        faults = 0
        if driver.is_alive() and len(interrupted) >= 2:
            cluster.remove_node(workers[0])  # at once, while the newest checkpoint may be unregistered in Ray
            faults = 1
        latest = {tid: checkpoint_epoch(out_dir, tid) for tid in interrupted}
        driver.join(600)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    if "error" in box:
        raise box["error"]
    trials = load_results(out_dir).trials
    resumed = trials[trials["resumed_from_epoch"] > 0]
    behind = [tid for tid, e in zip(resumed["trial_id"], resumed["resumed_from_epoch"]) if e < latest.get(tid, 0)]
    lost = _lost(out_dir, len(study.trials), epochs=epochs)
    errored = len(list((out_dir / "ray").glob("*/*/error.txt")))  # Ray's record of each trial whose actor died
    return {"faults_injected": faults, "trials_affected": errored, "mid_way_at_fault": len(interrupted),
            "checkpoint_epoch_at_fault": sorted(latest.values()),
            "resumed_from_epoch": resumed["resumed_from_epoch"].astype(int).tolist(),
            "resumed_behind_newest_checkpoint": len(behind), "failed": box["outcome"].failed, **lost,
            "restarted_from_scratch": int(bool(faults) and resumed.empty)}


def driver_sigkill(root: Path) -> dict:
    from ablate.results import load_results

    epochs = 3
    spec = write(root / "killed.yaml", f"""\
        name: killed
        tasks: [etth1]
        seeds: 2
        budget: {{epochs: {epochs}, max_train_batches: 20, patience: 0}}
        baseline: {{meta_every: 4, modulator_layers: 1}}
        ablations:
          objective: [loss_decrease]
        """)
    out = root / "results"
    out_dir = out / "killed"
    args = ["run", str(spec), "--out", str(out), "--max-concurrent", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "ablate.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while len(done_ids(out_dir)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        while time.monotonic() < deadline and proc.poll() is None and not _mid_way(out_dir):
            time.sleep(0.05)
        faults = int(proc.poll() is None)
    finally:
        _kill_group(proc)
    interrupted = _mid_way(out_dir)
    before = load_results(out_dir).trials.set_index("trial_id")["finished_at"]
    resumed = _cli(*args, "--resume")
    if resumed.returncode != 0:
        raise RuntimeError(f"--resume failed: {resumed.stdout[-2000:]}{resumed.stderr[-2000:]}")
    trials = load_results(out_dir).trials.set_index("trial_id")
    recomputed = int((trials.loc[before.index, "finished_at"] != before).sum())
    lost = _lost(out_dir, 6, epochs=epochs)
    continued = trials.loc[sorted(interrupted & set(trials.index)), "resumed_from_epoch"]
    return {"faults_injected": faults, "trials_affected": len(interrupted), "finished_before_kill": len(before),
            "resumed_from_epoch": continued.astype(int).tolist(), "finished_trials_recomputed": recomputed,
            **lost, "lost": lost["lost"] + recomputed}




def divergence(root: Path) -> dict:
    import numpy as np
    import torch

    from ablate.results import load_results
    from ablate.study import load_study
    from ablate.sweep import run_study

    study_dir = root / "study"
    write(study_dir / "fi_nanval.py", nanval_plugin("fi_nanval"))
    spec = divergence_study(study_dir / "diverge.yaml", "fi_nanval")
    study = load_study(spec)
    outcome = run_study(study, root / "results", num_cpus=2, keep_checkpoints=True)
    res = load_results(outcome.out_dir)
    t = res.trials.set_index("trial_id")
    diverged = t[t["status"] == "diverged"]
    skipping = t[t["meta_skipped"] > 0]
    modulator_finite = True
    for tid in skipping.index:
        state = torch.load(outcome.out_dir / "checkpoints" / f"{tid}.pt", weights_only=False)
        meta = state["optimizer"]["metaadamw"]
        modulator_finite &= all(bool(torch.isfinite(v).all()) for v in meta["modulator"].values()
                                if v.is_floating_point())
    tel = res.telemetry
    multipliers_finite = bool(np.isfinite(tel[["alpha", "beta", "lambda1", "lambda2"]].to_numpy(float)).all())
    expected_status = {"adamw": "diverged", "lr=1000.0": "diverged", "baseline": "ok", "objective=loss_decrease": "ok"}
    wrong_status = sum(t.reset_index().set_index("arm")["status"].to_dict().get(a) != s for a, s in expected_status.items())
    lost = _lost(outcome.out_dir, len(study.trials), statuses={"ok", "diverged"})
    return {"faults_injected": 3,  # NaN validation targets, and two arms with a huge learning rate
            "trials_affected": len(set(diverged.index) | set(skipping.index)),
            "diverged": {r["arm"]: {"epochs_kept": int(r["epochs_run"]), "error": r["error"][:80]}
                         for _, r in diverged.iterrows()},
            "meta_skipped": {r["arm"]: f"{int(r['meta_skipped'])}/{int(r['meta_updates'])}" for _, r in skipping.iterrows()},
            "modulator_finite": bool(modulator_finite), "multipliers_finite": multipliers_finite,
            "best_metric_ok_trials": {r["arm"]: r["best_metric"] for _, r in t[t["status"] == "ok"].iterrows()},
            "failed": outcome.failed, "wrong_status": int(wrong_status), **lost,
            "lost": lost["lost"] + int(wrong_status) + int(not modulator_finite)}


def bad_inputs(root: Path) -> dict:
    base = "name: bad\ntasks: [etth1]\nseeds: 1\n"
    missing = root / "no-such-data"
    cases = {
        "malformed_yaml": "name: bad\ntasks: [etth1\nseeds: 1\n",
        "unknown_task": "name: bad\ntasks: [etth9]\nseeds: 1\n",
        "unknown_component": base + "ablations:\n  features: [no_such_features]\n",
        "wrong_type": base + "budget: {epochs: three}\n",
        "contradiction": base + "baseline: {meta_every: 4, meta_per_epoch: 2}\n",
        "missing_data_dir": base + f"data: real\ndata_dir: {missing}\n",
        "broken_plugin": base + "plugins: [fi_broken_plugin]\n",
    }
    write(root / "fi_broken_plugin.py", "import fi_no_such_dependency\n")
    # ray.init replaced by an exit with code 99: a study that got as far as starting Ray shows it
    wrapper = "import sys, ray; ray.init = lambda *a, **k: sys.exit(99); from ablate.cli import main; sys.exit(main(sys.argv[1:]))"
    details = {}
    for name, text in cases.items():
        spec = write(root / f"{name}.yaml", text)
        out = root / f"results-{name}"
        r = subprocess.run([sys.executable, "-c", wrapper, "run", str(spec), "--out", str(out)], capture_output=True,
                           text=True, timeout=300)
        message = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        details[name] = {"exit": r.returncode, "ray_started": r.returncode == 99, "output_created": out.exists(),
                         "traceback": "Traceback" in r.stderr, "message": message[:160]}
    refused = sum(d["exit"] == 2 and not d["traceback"] and not d["output_created"] for d in details.values())
    return {"faults_injected": len(cases), "trials_affected": 0, "refused_cleanly": refused, "cases": details,
            "lost": len(cases) - refused}




def kill_during_write(root: Path) -> dict:
    from ablate.report import report_command
    from ablate.results import load_results

    spec = kill_during_write_study(root / "killwrite.yaml")
    killer = write(root / "killer.py", killer_script("FI_KILL_AT"))
    out = root / "results"
    out_dir = out / "killwrite"
    args = ["run", str(spec), "--out", str(out), "--max-concurrent", "1"]
    proc = subprocess.Popen([sys.executable, str(killer), *args], env={**os.environ, "FI_KILL_AT": "2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=400)
    finally:
        _kill_group(proc)
    leftovers = sorted(p.name for p in (out_dir / "parts").glob(".*.tmp"))
    visible = load_results(out_dir)
    with open(os.devnull, "w") as sink:
        stdout, sys.stdout = sys.stdout, sink
        try:
            report = report_command(str(out_dir), str(root / "report"))
        finally:
            sys.stdout = stdout
    resumed = _cli(*args, "--resume")
    if resumed.returncode != 0:
        raise RuntimeError(f"--resume failed: {resumed.stdout[-2000:]}{resumed.stderr[-2000:]}")
    lost = _lost(out_dir, 3, epochs=2)
    return {"faults_injected": int(proc.returncode == 137), "trials_affected": len(leftovers),
            "driver_exit": proc.returncode, "truncated_temp_files_ignored": leftovers,
            "trials_readable_after_kill": len(visible.trials), "report_after_kill": report.exists(), **lost}


# ---------------------------------------------------------------------------------------------


def _plain(value):
    """JSON-safe: non-finite floats as null, NumPy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help=f"comma-separated scenarios (default: all of {', '.join(SCENARIOS)})")
    p.add_argument("--keep", help="run in this directory and keep it (default: a temporary directory)")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fault_injection-"))
    base.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    try:
        for name in names:
            t0 = time.monotonic()
            print(f"scenario {name} ...", flush=True)
            try:
                report[name] = globals()[name](base / name)
            except Exception as exc:  # a scenario that breaks counts its study as lost
                report[name] = {"faults_injected": 1, "trials_affected": 0, "lost": 1,
                                "error": f"{type(exc).__name__}: {exc}"[:2000]}
            report[name]["seconds"] = round(time.monotonic() - t0, 1)
            print(f"scenario {name}: faults={report[name]['faults_injected']} affected="
                  f"{report[name]['trials_affected']} lost={report[name]['lost']} "
                  f"({report[name]['seconds']} s)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    totals = {k: sum(int(r[src]) for r in report.values())
              for k, src in (("faults_injected", "faults_injected"), ("trials_affected", "trials_affected"),
                             ("results_lost", "lost"))}
    print(json.dumps(_plain(report)))
    print(" ".join(f"{k}={v}" for k, v in totals.items()))
    return 0 if totals["results_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
