"""Fixtures of the tests in tests/ablate.

``private_cache_dir`` (autouse, per session) points ``$ABLATE_CACHE_DIR`` at a temporary directory.
``one_thread`` (autouse) runs every test with one intra-op torch thread: the task tests' small
models train fastest so, even on a busy machine (and the embedded budget is one core).

The rest are constructed results directories for the statistics, report and notebook tests.

``report_study`` is a small paired study written with :func:`ablate.results.write_trial`:
two tasks (etth1: mse, lower is better; imdb: accuracy, higher is better), six seeds, arms
adamw / baseline / grouping=original / gating=true, hand-chosen best metrics (``REPORT_METRICS``),
one failed and one diverged trial, per-epoch history and baseline telemetry. The baseline trials
also serve the arm "grouping=fine_grained" (through the ``arms`` list).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ablate.results import write_trial

# The task tests' shared assertions (assert_second_order_gradients) report like their own.
pytest.register_assert_rewrite("tests.ablate.task_helpers")


@pytest.fixture(autouse=True, scope="session")
def private_cache_dir(tmp_path_factory):
    """The tests' own ABLATE_CACHE_DIR (the embedded digits cache), inherited by Ray workers: the
    tests leave nothing in the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ABLATE_CACHE_DIR", str(tmp_path_factory.mktemp("ablate-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for the test; the previous thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SEEDS = list(range(6))
TASKS = {"etth1": ("mse", "min"), "imdb": ("accuracy", "max")}

#: task -> arm -> best validation metric per seed (0..5); NaN = the trial is not ok
REPORT_METRICS = {
    "etth1": {
        "adamw": [0.0100, 0.0110, 0.0105, 0.0098, 0.0102, 0.0108],
        # consistently better than AdamW on every seed -> sign-flip p = 2/64
        "baseline": [0.0096, 0.0107, 0.0100, 0.0096, 0.0096, 0.0107],
        # mixed around the baseline -> not significant
        "grouping=original": [0.0099, 0.0105, 0.0101, 0.0092, 0.0098, 0.0106],
        "gating=true": [0.0097, 0.0109, 0.0101, 0.0098, 0.0097, np.nan],  # seed 5 failed
    },
    "imdb": {
        "adamw": [0.80, 0.82, 0.81, 0.79, 0.83, 0.80],
        "baseline": [0.81, 0.81, 0.83, 0.80, 0.82, 0.82],
        # consistently better than the baseline on every seed -> significant in Table 3
        "grouping=original": [0.82, 0.83, 0.84, 0.81, 0.84, 0.83],
        "gating=true": [0.82, 0.80, np.nan, 0.81, 0.83, 0.81],  # seed 2 diverged
    },
}
#: seconds per epoch (train + meta + eval) and meta-update seconds per epoch
EPOCH_SECONDS = {"adamw": 10.0, "baseline": 12.0, "grouping=original": 11.0, "gating=true": 12.5}
META_SECONDS = {"adamw": 0.0, "baseline": 2.0, "grouping=original": 1.5, "gating=true": 2.5}
EPOCHS = 3
STEPS_PER_EPOCH = 100
PERSISTENCE_MSE = 0.0120
FAILED_ID = "etth1-gating_true-s5"
DIVERGED_ID = "imdb-gating_true-s2"
TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nRuntimeError: CUDA out of memory'


def trial_id(task: str, arm: str, seed: int) -> str:
    return f"{task}-{arm.replace('=', '_')}-s{seed}"


def curve(best: float, mode: str) -> list[float]:
    """Validation values of the three epochs, ending at ``best``."""
    factors = (1.3, 1.1, 1.0) if mode == "min" else (0.8, 0.9, 1.0)
    return [best * f for f in factors]


def history_rows(task: str, arm: str, best: float) -> list[dict]:
    metric, mode = TASKS[task]
    wall, meta = EPOCH_SECONDS[arm], META_SECONDS[arm]
    return [
        {
            "epoch": e,
            "step": e * STEPS_PER_EPOCH,
            "train_loss": 1.0 / e,
            f"val_{metric}": v,
            "time_train_s": wall - meta - 1.0,
            "time_meta_s": meta,
            "time_eval_s": 1.0,
            "wall_s": e * wall,
            "meta_updates": 2 * (e - 1) if meta else 0,
        }
        for e, v in enumerate(curve(best, mode), start=1)
    ]


def telemetry_rows() -> list[dict]:
    """Two groups, four meta-updates, with uncertainty-weighting sigmas."""
    rows = []
    for k in range(4):
        for g, name in enumerate(("attn", "ffn")):
            rows.append({
                "meta_update": k, "step": 100 + 50 * k, "epoch": 2 + k // 2, "group": name,
                "group_index": g, "alpha": 1.0 + 0.05 * k * (g + 1), "beta": 1.0 - 0.03 * k,
                "lambda1": 0.5, "lambda2": 0.5, "meta_loss": 0.1 / (k + 1), "skipped": False,
                "term_gradient": 0.2, "term_loss_decrease": -0.01, "term_gen_gap": 0.05,
                "sigma_gradient": 1.0 + 0.1 * k, "sigma_loss_decrease": 1.0 - 0.05 * k, "sigma_gen_gap": 1.0,
            })
    return rows


def write_study(out_dir, metrics=REPORT_METRICS, *, telemetry: bool = True) -> None:
    """Write every trial of ``metrics`` into ``out_dir`` (see the module docstring)."""
    for task, arms in metrics.items():
        for arm, values in arms.items():
            for seed, best in zip(SEEDS, values):
                write_trial(out_dir, trial_row(task, arm, seed, best),
                            history_rows(task, arm, best if np.isfinite(best) else 0.5),
                            telemetry_rows() if telemetry and arm == "baseline" else ())


def trial_row(task: str, arm: str, seed: int, best: float) -> dict:
    metric, mode = TASKS[task]
    tid = trial_id(task, arm, seed)
    status, error, stop = "ok", "", "max_epochs"
    if tid == FAILED_ID:
        status, error, stop = "failed", TRACEBACK, "failed"
    elif tid == DIVERGED_ID:
        status, error, stop, best = "diverged", "loss is NaN at epoch 2\nmore detail", "diverged", 0.5
    arms = [arm, "grouping=fine_grained"] if arm == "baseline" else [arm]
    row = {
        "trial_id": tid, "study": "report-test", "arm": arm,
        "axis": arm.split("=")[0] if "=" in arm else "", "arms": json.dumps(arms),
        "status": status, "error": error, "task": task, "data": "embedded",
        "data_source": f"embedded:synthetic-{task}", "optimizer": "adamw" if arm == "adamw" else "metaadamw",
        "seed": seed, "metric": metric, "mode": mode, "best_metric": best, "best_epoch": EPOCHS,
        "epochs_run": EPOCHS, "steps": EPOCHS * STEPS_PER_EPOCH, "stop_reason": stop,
        "time_total_s": EPOCHS * EPOCH_SECONDS[arm], "time_meta_s": EPOCHS * META_SECONDS[arm],
        "time_train_s": EPOCHS * (EPOCH_SECONDS[arm] - META_SECONDS[arm] - 1.0), "time_eval_s": EPOCHS * 1.0,
        "meta_updates": 4, "meta_skipped": 0, f"best_{metric}": best,
        "finished_at": f"2026-01-01T00:00:{seed:02d}",
    }
    if task == "etth1":
        row["ref_persistence_mse"] = PERSISTENCE_MSE
    return row


def write_tune(results_dir):
    """A tuning study's stored outputs (``ablate tune``) under ``results_dir/tune``."""
    tune = results_dir / "tune"
    tune.mkdir()
    pd.DataFrame({"number": [0, 1, 2, 3], "value": [0.9, 0.7, 0.8, 0.6],
                  "params_p_gradient": [1.0, 2.0, 3.0, 4.0], "params_p_loss_decrease": [5.0, 4.0, 3.0, 2.0]}
                 ).to_parquet(tune / "history.parquet")
    pd.DataFrame({"param": ["p_gradient", "p_loss_decrease"], "importance": [0.7, 0.3]}).to_parquet(tune / "importances.parquet")


@pytest.fixture
def report_kit():
    """This module: its constants and helpers (trial_row, history_rows, write_study, ...)."""
    return sys.modules[__name__]


@pytest.fixture(scope="session")
def report_study_template(tmp_path_factory):
    """The constructed study of this module, written once per session; do not modify it."""
    out = tmp_path_factory.mktemp("report_template") / "study"
    write_study(out)
    return out


@pytest.fixture
def report_study(tmp_path, report_study_template):
    """A private copy of the constructed study (with telemetry, without a tune dir)."""
    return Path(shutil.copytree(report_study_template, tmp_path / "study"))


#: factorial study: grouping x gating, 3 seeds, one task (min metric); cell -> per-seed metric
FACTORIAL_METRICS = {
    ("fine_grained", "false"): [1.00, 1.02, 0.98],
    ("fine_grained", "true"): [0.90, 0.93, 0.88],
    ("original", "false"): [1.10, 1.12, 1.09],
    ("original", "true"): [1.05, 1.01, 1.04],
}


@pytest.fixture
def report_factorial_study(tmp_path):
    """A 2x2 factorial study (grouping x gating) on etth1 with 3 seeds."""
    out = tmp_path / "factorial"
    for (grouping, gating), values in FACTORIAL_METRICS.items():
        arm = f"factorial:grouping={grouping},gating={gating}"
        for seed, best in enumerate(values):
            row = trial_row("etth1", "baseline", seed, best)
            row.update(trial_id=f"f-{grouping}-{gating}-{seed}", arm=arm, axis="factorial", arms=json.dumps([arm]))
            write_trial(out, row, history_rows("etth1", "baseline", best))
    return out


@pytest.fixture
def one_ray():
    """One in-process Ray for the test's runs (``run_study`` uses a running Ray and leaves it
    running), which then pay Ray's start and shutdown (~5 s on two cores) once. One CPU, as the
    runs' num_cpus=1 would have started it."""
    import ray

    if ray.is_initialized():  # (left by a test that failed before its own shutdown)
        ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=True,
             logging_level="warning", object_store_memory=256 * 1024**2)
    yield
    ray.shutdown()
