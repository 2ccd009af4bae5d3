"""Fault tolerance of `ablate run` on real Ray machinery.

1. Node loss: a three-node Ray cluster on one machine (``ray.cluster_utils.Cluster``: a head with
   no CPUs, two one-CPU workers); a worker node is removed while trials run on it. Ray Tune
   (``FailureConfig(max_failures=retries)``) retries the interrupted trial from its last
   ``tune.report`` checkpoint on the other node; the study completes with every trial once.
2. Divergence: NaN targets in some validation batches make meta-updates non-finite; those are
   skipped (telemetry ``skipped``, row ``meta_skipped``) and the modulator stays finite and keeps
   learning from the finite ones. A huge learning rate makes the model's loss overflow: that
   trial ends ``diverged`` with the history it had, and the other trials of the study finish ok.
3. Bad input: malformed YAML, unknown task / component, wrong types, contradictory settings, a
   missing real-data directory and a plugin that fails to import are refused before Ray starts
   (exit code 2, one line naming the problem, no results directory).
4. Disk: a part write that fails half-way (disk full) or is killed half-way (the driver dies in
   ``to_parquet``) leaves no truncated part; ``load_results`` and ``ablate report`` work on the
   directory, and ``--resume`` completes the study with every trial exactly once.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ablate.results import PARTS_DIR, finished_trial_ids, load_results, write_trial
from ablate.study import load_study
from ablate.sweep import run_study
from tests.ablate.fault_scenarios import (
    OBJECT_STORE, checkpoint_epoch, disk_full_script, divergence_study, done_ids, kill_during_write_study,
    killer_script, nanval_plugin, node_loss_study, write,
)

pytestmark = pytest.mark.slow



def _unfinished_with_checkpoint(out: Path) -> set[str]:
    """Trials that have a per-epoch checkpoint but no result yet (they are mid-way)."""
    ckpts = out / "checkpoints"
    return ({p.stem for p in ckpts.glob("*.pt")} if ckpts.exists() else set()) - done_ids(out)


def _assert_complete(out: Path, n_trials: int, epochs: int | None = None) -> pd.DataFrame:
    """Every trial once, its history without gaps or duplicates, its telemetry contiguous; one
    readable part per table per trial and no temporary file in parts/."""
    res = load_results(out)
    t = res.trials
    assert len(t) == n_trials and t["trial_id"].is_unique, t[["trial_id", "status"]]
    for name in ("trials", "history", "telemetry"):
        files = sorted((out / PARTS_DIR).glob(f"*.{name}.parquet"))
        assert len(files) == n_trials, (name, files)
        for f in files:
            pd.read_parquet(f)  # not truncated
    assert not list((out / PARTS_DIR).glob("*.tmp")), "a temporary part was left behind"
    epochs_of = res.history.groupby("trial_id")["epoch"].apply(list).to_dict() if len(res.history) else {}
    for _, row in t.iterrows():
        expected = list(range(1, (epochs or int(row["epochs_run"])) + 1))
        assert epochs_of.get(row["trial_id"], []) == expected, (row["trial_id"], epochs_of.get(row["trial_id"]))
        assert row["epochs_run"] == len(expected)
        if row["meta_updates"]:
            tel = res.telemetry[res.telemetry["trial_id"] == row["trial_id"]]
            for _, g in tel.groupby("group"):
                assert list(g["meta_update"]) == list(range(int(row["meta_updates"]))), "telemetry gap or duplicate"
    return t


@pytest.fixture(autouse=True)
def _no_ray_left():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# 1. node loss


def test_a_lost_node_s_trial_resumes_from_its_checkpoint_on_another_node(tmp_path):
    from ray.cluster_utils import Cluster

    epochs = 6
    spec = node_loss_study(tmp_path / "nodeloss.yaml", epochs)
    study = load_study(spec)
    out = tmp_path / "results"
    out_dir = out / "nodeloss"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE})
    try:
        workers = [cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE) for _ in range(2)]
        cluster.wait_for_nodes()
        box: dict = {}

        def drive() -> None:
            try:
                box["outcome"] = run_study(study, out, address=cluster.address, keep_checkpoints=True)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
                box["error"] = exc

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        deadline = time.monotonic() + 300
        # both one-CPU workers run a trial that has checkpointed at least one epoch
        while len(_unfinished_with_checkpoint(out_dir)) < 2 and driver.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        interrupted = _unfinished_with_checkpoint(out_dir)
        assert driver.is_alive() and len(interrupted) >= 2, f"no two trials mid-way to interrupt: {box}"
        # at once: the trial that just checkpointed its first epoch may not have that checkpoint
        # registered with Ray yet (Ray does so in a save() call after the report)
        cluster.remove_node(workers[0])  # kills that node's raylet and the trial running on it
        # the killed trial's newest checkpoint (its retry waits for the other node's CPU)
        latest = {tid: checkpoint_epoch(out_dir, tid) for tid in interrupted}
        driver.join(600)
        assert not driver.is_alive(), "the study did not finish after the node loss"
    finally:
        cluster.shutdown()
    if "error" in box:
        raise box["error"]
    outcome = box["outcome"]
    assert (outcome.ran, outcome.failed, outcome.reused) == (4, 0, 0)
    trials = _assert_complete(out_dir, 4, epochs)
    assert set(trials["status"]) == {"ok"}, trials[["trial_id", "status", "error"]]
    resumed = trials[trials["resumed_from_epoch"] > 0]
    assert len(resumed) >= 1, "the trial on the lost node was retried from scratch, not from its checkpoint"
    assert set(resumed["trial_id"]) <= interrupted
    for _, row in resumed.iterrows():  # from the newest checkpoint it had when its node died
        assert latest[row["trial_id"]] <= row["resumed_from_epoch"] < epochs, (latest, row["resumed_from_epoch"])


# ---------------------------------------------------------------------------------------------
# 2. non-finite meta-updates and a diverging model



def test_non_finite_meta_updates_are_skipped_and_a_diverging_trial_does_not_stop_the_study(tmp_path, capsys):
    study_dir = tmp_path / "study"
    write(study_dir / "ft_nanval.py", nanval_plugin("ft_nanval"))
    spec = divergence_study(study_dir / "diverge.yaml", "ft_nanval")
    study = load_study(spec)
    out = tmp_path / "results"
    outcome = run_study(study, out, num_cpus=2, keep_checkpoints=True)
    assert (outcome.ran, outcome.failed) == (4, 0), "a diverged trial is a result, not a failure"
    trials = _assert_complete(outcome.out_dir, 4).set_index("arm")
    assert trials["status"].to_dict() == {"adamw": "diverged", "baseline": "ok", "objective=loss_decrease": "ok",
                                          "lr=1000.0": "diverged"}
    history = load_results(outcome.out_dir).history
    for arm in ("adamw", "lr=1000.0"):
        row = trials.loc[arm]
        assert row["stop_reason"] == "diverged" and "became" in row["error"], row["error"]
        assert (history["trial_id"] == row["trial_id"]).sum() == row["epochs_run"]
    assert trials.loc["adamw", "epochs_run"] >= 1, "the history before the divergence is kept"
    assert trials.loc["lr=1000.0", "epochs_run"] == 0

    telemetry = load_results(outcome.out_dir).telemetry
    for arm in ("baseline", "objective=loss_decrease"):
        row = trials.loc[arm]
        tel = telemetry[telemetry["trial_id"] == row["trial_id"]]
        per_update = tel.groupby("meta_update").agg(skipped=("skipped", "first"), kinds=("skipped", "nunique"),
                                                    loss=("meta_loss", "first"))
        assert (per_update["kinds"] == 1).all(), "one meta-update is skipped for every group or for none"
        skipped = per_update["skipped"].astype(bool)
        assert len(per_update) == row["meta_updates"]
        assert skipped.sum() == row["meta_skipped"], (skipped.sum(), row["meta_skipped"])
        assert 0 < row["meta_skipped"] < row["meta_updates"], "some meta-updates skipped, some applied"
        assert not np.isfinite(per_update.loc[skipped, "loss"]).all(), "the skipped ones had a non-finite meta-loss"
        assert np.isfinite(per_update.loc[~skipped, "loss"]).all()
        assert np.isfinite(tel[["alpha", "beta", "lambda1", "lambda2"]].to_numpy(float)).all()
        assert math.isfinite(row["best_metric"])
        # the modulator after the last epoch: finite, and trained by the finite meta-updates
        state = torch.load(outcome.out_dir / "checkpoints" / f"{row['trial_id']}.pt", weights_only=False)
        meta = state["optimizer"]["metaadamw"]
        assert meta["meta_skipped"] == row["meta_skipped"]
        tensors = {**meta["modulator"], **{f"w.{k}": v for k, v in meta["weighting"].items()}}
        assert tensors and all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
        from ablate.trial import Trial

        fresh = Trial(state["config"]).optimizer.state_dict()["metaadamw"]["modulator"]
        assert any(not torch.equal(fresh[k], v) for k, v in meta["modulator"].items()), "the modulator never learned"

    # diverged trials are finished results: running the study again runs nothing, and its summary counts them
    from ablate.cli import main

    capsys.readouterr()
    assert main(["run", str(spec), "--out", str(out)]) == 0
    assert "\n0 trials run, 4 reused, 0 failed, 2 diverged (no result; in the table's 'not ok'); results in" in \
        capsys.readouterr().out
    assert finished_trial_ids(outcome.out_dir) == set(trials["trial_id"])


# ---------------------------------------------------------------------------------------------
# 3. bad input, refused before Ray starts

BASE = "name: bad\ntasks: [etth1]\nseeds: 1\n"
BAD_INPUTS = {
    "malformed_yaml": ("name: bad\ntasks: [etth1\nseeds: 1\n", ["invalid YAML"]),
    "unknown_task": ("name: bad\ntasks: [etth9]\nseeds: 1\n", ["tasks[0]", "etth9"]),
    "unknown_component": (BASE + "ablations:\n  features: [no_such_features]\n", ["no_such_features"]),
    "wrong_type_seeds": ("name: bad\ntasks: [etth1]\nseeds: two\n", ["seeds", "'two'"]),
    "wrong_type_budget": (BASE + "budget: {epochs: three}\n", ["budget.epochs", "three"]),
    "contradiction_frequency": (BASE + "baseline: {meta_every: 4, meta_per_epoch: 2}\n", ["meta_every", "meta_per_epoch"]),
    "contradiction_data_dir": (BASE + "data_dir: /data\n", ["data_dir", "embedded"]),
    "missing_data_dir": (BASE + "data: real\ndata_dir: {missing}\n", ["does not exist", "{missing}", "etth1"]),
    "broken_plugin": (BASE + "plugins: [ft_broken_plugin]\n", ["ft_broken_plugin", "ft_no_such_dependency"]),
}


def _bad_study(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    text, expected = BAD_INPUTS[case]
    missing = str(tmp_path / "no-such-data")
    spec = write(tmp_path / "study" / f"{case}.yaml", text.replace("{missing}", missing))
    write(tmp_path / "study" / "ft_broken_plugin.py", "import ft_no_such_dependency\n")
    return spec, [e.replace("{missing}", missing) for e in expected]


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_before_ray_starts(tmp_path, case, monkeypatch, capsys):
    import ray

    from ablate.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init was called for an invalid study")

    monkeypatch.setattr(ray, "init", no_ray)
    spec, expected = _bad_study(tmp_path, case)
    out = tmp_path / "results"
    rc = main(["run", str(spec), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("ablate: error: ") and "Traceback" not in err and err.count("\n") == 1, err
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists(), "nothing may be written for a study that cannot run"
    assert not ray.is_initialized()


@pytest.mark.parametrize("command", [["run", "{spec}"], ["tune", "{spec}"]])  # (refused before Ray starts)
def test_an_output_folder_that_is_a_file_is_one_line_and_exit_code_2(tmp_path, command, monkeypatch, capsys):
    # NotADirectoryError came out as a traceback and exit code 1; then as "Not a directory: OUT/<study>" (the
    # study's folder, not the file that is in the way)
    import ray

    from ablate.cli import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ray.init called")))
    spec = write(tmp_path / "tq.yaml", BASE + "tune: {trials: 1}\n")
    in_the_way = write(tmp_path / "afile", "not a folder\n")
    argv = [word.replace("{spec}", str(spec)) for word in command] + ["--out", str(in_the_way)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ablate: error: {in_the_way} is a file: a run needs a folder there (the results go in "
                          f"{in_the_way / 'bad'}") and err.count("\n") == 1, err
    assert err.rstrip().endswith("below it); give another --out") and in_the_way.read_text() == "not a folder\n"


@pytest.mark.parametrize("command", [["run", "{spec}"], ["tune", "{spec}"]])  # (refused before Ray starts)
def test_an_output_folder_that_cannot_be_made_names_it_and_the_fix(tmp_path, command, monkeypatch, capsys):
    # --out /proc/x: "ablate: error: No such file or directory: /proc/x", no word of --out or what to do
    import ray

    from ablate.cli import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ray.init called")))
    real_mkdir = Path.mkdir
    here = tmp_path / "here"

    def mkdir(self, *args, **kwargs):  # (as /proc refuses a new folder, for a user of any rights)
        if self == here / "x":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    spec = write(tmp_path / "tq.yaml", BASE + "tune: {trials: 1}\n")
    here.mkdir()
    argv = [word.replace("{spec}", str(spec)) for word in command] + ["--out", str(here / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ablate: error: cannot make the results folder {here / 'x' / 'bad'}") and err.count("\n") == 1
    assert f"No such file or directory ({here / 'x'}); give an --out where you can write" in err, err


@pytest.mark.parametrize("case", ["malformed_yaml", "missing_data_dir", "broken_plugin"])
def test_ablate_run_exits_2_on_bad_input(tmp_path, case):
    spec, expected = _bad_study(tmp_path, case)
    out = tmp_path / "results"
    result = subprocess.run([sys.executable, "-m", "ablate.cli", "run", str(spec), "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and all(text in result.stderr for text in expected), result.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 4. disk: writes that fail or are killed half-way


def _half_written(original):
    """A DataFrame.to_parquet that writes the first half of the file, then fails like a full disk."""

    def to_parquet(self, path, *args, **kwargs):
        import io

        buf = io.BytesIO()
        original(self, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))

    return to_parquet


def test_a_part_write_that_fails_half_way_leaves_the_results_intact(tmp_path, report_kit, monkeypatch):
    out = tmp_path / "study"
    report_kit.write_study(out)
    before = load_results(out)
    existing = before.trials.iloc[0].to_dict()
    monkeypatch.setattr(pd.DataFrame, "to_parquet", _half_written(pd.DataFrame.to_parquet))
    new_row = report_kit.trial_row("etth1", "baseline", 99, 0.01)
    with pytest.raises(OSError, match="No space left"):
        write_trial(out, new_row, report_kit.history_rows("etth1", "baseline", 0.01))
    with pytest.raises(OSError, match="No space left"):  # rewriting a stored trial (a retried trial)
        write_trial(out, {**existing, "best_metric": -1.0})
    monkeypatch.undo()
    assert not [p for p in (out / PARTS_DIR).iterdir() if not p.name.endswith(".parquet")], "temporary file left"
    after = load_results(out)
    assert len(after.trials) == len(before.trials) and new_row["trial_id"] not in set(after.trials["trial_id"])
    pd.testing.assert_frame_equal(after.trials, before.trials)
    pd.testing.assert_frame_equal(after.history, before.history)




def test_a_driver_killed_while_writing_a_result_loses_nothing_finished(tmp_path):
    from ablate.report import report_command

    spec = kill_during_write_study(tmp_path / "killwrite.yaml")
    killer = write(tmp_path / "killer.py", killer_script("FT_KILL_AT"))
    out = tmp_path / "results"
    out_dir = out / "killwrite"
    args = ["run", str(spec), "--out", str(out), "--max-concurrent", "1"]
    env = {**os.environ, "FT_KILL_AT": "2", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(killer), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log = proc.communicate(timeout=400)[0].decode()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray processes the dead driver started
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 137, log[-3000:]
    parts = out_dir / PARTS_DIR
    leftovers = list(parts.glob(".*.trials.parquet.*.tmp"))
    assert len(leftovers) == 1, sorted(p.name for p in parts.iterdir())  # the kill hit a write
    with pytest.raises(Exception):
        pd.read_parquet(leftovers[0])  # truncated, as a real kill leaves it
    killed_id = leftovers[0].name.split(".")[1]
    assert killed_id not in done_ids(out_dir)

    # the directory is usable as it is: one finished trial, the killed one absent
    res = load_results(out_dir)
    assert len(res.trials) == 1 and set(res.trials["status"]) == {"ok"}
    assert set(res.history["trial_id"]) == set(res.trials["trial_id"]), "no history of an unfinished trial"
    report = report_command(str(out_dir), str(tmp_path / "report"))
    assert report.exists() and "killwrite" in report.read_text()

    resumed = subprocess.run([sys.executable, "-m", "ablate.cli", *args, "--resume"], capture_output=True,
                             text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "1 already done (reused), 2 to run" in resumed.stdout
    trials = load_results(out_dir).trials
    assert len(trials) == 3 and trials["trial_id"].is_unique and set(trials["status"]) == {"ok"}
    assert killed_id in set(trials["trial_id"])
    assert not list(parts.glob(".*.tmp")), "the next run removes the truncated temporary file"
    history = load_results(out_dir).history
    assert all(list(e) == [1, 2] for _, e in history.groupby("trial_id")["epoch"])
    report_command(str(out_dir), str(tmp_path / "report2"))


def test_a_full_disk_while_storing_a_trial_stops_the_run_in_one_line_and_resume_completes_it(tmp_path):
    # the write error surfaced as Ray's TuneError traceback of some 80 lines, without the way on
    spec = kill_during_write_study(tmp_path / "killwrite.yaml")
    wrapper = write(tmp_path / "diskfull.py", disk_full_script("FT_DISKFULL_AT"))
    out = tmp_path / "results"
    args = ["run", str(spec), "--out", str(out), "--max-concurrent", "1"]
    result = subprocess.run([sys.executable, str(wrapper), *args], env={**os.environ, "FT_DISKFULL_AT": "2"},
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("ablate: error:")]
    assert len(error) == 1 and "could not store the results of trial" in error[0] and "No space left" in error[0]
    assert error[0].endswith("then run the same command with --resume")
    assert len(done_ids(out / "killwrite")) == 1
    resumed = subprocess.run([sys.executable, "-m", "ablate.cli", *args, "--resume"], capture_output=True,
                             text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "1 already done (reused), 2 to run" in resumed.stdout
    assert len(load_results(out / "killwrite").trials) == 3


def test_other_user_errors_are_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    # an empty results directory, a checkpoint of another trial or not a checkpoint at all, an
    # unknown dataset download, no network, and a malformed --set: one line, no traceback, exit 2
    import urllib.request

    from ablate.cli import main

    (tmp_path / "empty" / "parts").mkdir(parents=True)
    (tmp_path / "garbage.pt").write_text("garbage\n")
    train = ["train", "--task", "etth1", "--set", "epochs=1", "--set", "max_train_batches=2"]
    assert main([*train, "--checkpoint", str(tmp_path / "ck.pt")]) == 0
    assert "note: epochs=1 <= warmup_epochs=1: this run makes no meta-update" in capsys.readouterr().out

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cases = [
        (["report", str(tmp_path / "empty")], "holds no trials yet"),
        (["train", "--task", "etth1", "--set", "epochs=2", "--resume", str(tmp_path / "ck.pt")], "cannot resume trial"),
        ([*train, "--resume", str(tmp_path / "garbage.pt")], "is not a readable ablate trial checkpoint"),
        (["data", "download", "nope"], "no download is registered for task 'nope'"),
        (["data", "download", "etth1", "--data-dir", str(tmp_path / "data")], "this needs the network"),
        ([*train, "--set", "seed=5"], "--set seed=... would silently replace --seed: give --seed instead"),
        ([*train, "--set", "task=cifar10"], "give --task instead"),
        ([*train, "--checkpoint", str(tmp_path)], "is a directory; give a file path"),  # (before training)
        ([*train, "--checkpoint", "/proc/ablate-test.pt"], "--checkpoint /proc/ablate-test.pt: cannot write in its folder"),
        ([*train, "--resume", str(tmp_path / "missing.pt")], "--resume " + str(tmp_path / "missing.pt") + ": no such file"),
        (["train", "--task", "ETTh1"], "(did you mean 'etth1'?); choose one of"),  # (case only: no plugin hint)
        (["report", str(tmp_path / "garbage.pt")], "is a file, not a study's results directory"),
        *[(["run", "tune.yaml", "--out", str(tmp_path / "garbage.pt"), *dry],  # the file named, the run's or dry run's
           f"{tmp_path / 'garbage.pt'} is a file: a run needs a folder there (the results go in "
           f"{tmp_path / 'garbage.pt' / 't'}, below it); give another --out") for dry in ([], ["--dry-run"])],
        (["report", str(tmp_path)], "holds no study results (no parts/ and no trials.parquet); it holds the results of "
                                    "empty: give that folder"),
        ([*train, "--data-dir", str(tmp_path)], "set data: real (ablate train: --data real)"),
        ([*train, "--set", "meta_every=null"], "meta_every is null but meta_per_epoch is not set"),
        (["tune", "tune.yaml", "--study-storage", "foo://bar"], "the Optuna study storage 'foo://bar'"),
        (["run", "tune.yaml", "--address", "127.0.0.1:1", "--out", str(tmp_path / "addr")],
         "--address 127.0.0.1:1: nothing answers there"),  # (ray.init would retry for minutes)
    ]
    if not torch.cuda.is_available():
        cases.append(([*train, "--set", "device=cuda"], "device='cuda' but CUDA is not available here"))
    (tmp_path / "tune.yaml").write_text("name: t\ntasks: [etth1]\nseeds: 1\nbudget: {epochs: 3}\ntune: {trials: 1}\n")
    monkeypatch.chdir(tmp_path)
    for argv, expected in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("ablate: error: ") and "Traceback" not in err, (argv, rc, err)
        assert expected in err, (argv, err)
    assert not (tmp_path / "data").exists()  # the failed download leaves no empty folders behind
    assert not (tmp_path / "addr").exists()  # refused before anything is written
    with pytest.raises(SystemExit) as info:
        main(["train", "--task", "etth1", "--set", "bad"])
    assert info.value.code == 2 and "--set expects key=value" in capsys.readouterr().err


def test_train_json_is_strict_json_with_null_for_a_diverged_trials_metrics(capsys):
    import json

    from ablate.cli import main

    rc = main(["train", "--task", "etth1", "--no-progress", "--json", "--set", "epochs=1", "--set", "max_train_batches=3",
               "--set", "lr=1e6", "--set", "num_threads=1"])
    captured = capsys.readouterr()
    row = json.loads(captured.out)  # stdout is the JSON alone (| jq), the human-readable lines go to stderr
    assert "\nerror: training loss became" in captured.err  # the human-readable summary says why, too
    assert rc == 1 and row["status"] == "diverged"
    assert row["best_metric"] is None and row["best_mse"] is None
    assert "NaN" not in json.dumps(row)
    assert row["priorities"] == [1.0, 1.0, 1.0] and "fixed_weights" in row  # list keys are kept (were dropped)


def test_a_full_disk_outside_a_trial_is_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    # (the results combined at the end of `ablate run`, a report's figures): no traceback
    from ablate import report
    from ablate.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "report.md"))

    monkeypatch.setattr(report, "write_report", full)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ablate: error: No space left on device: {tmp_path / 'report.md'}")
    assert "what was stored before is kept" in err


def test_a_full_disk_while_recording_a_rerun_trial_is_a_storage_error_not_ray_s_traceback(tmp_path, monkeypatch):
    # the trial's parts were stored, then rerun.json could not be written: the Recorder left
    # write_error unset, so the run re-raised Ray's TuneError (a traceback of some 80 lines, exit 1)
    # instead of the one line that says to free space and --resume
    import json
    import types

    from ablate import results as store
    from ablate import sweep
    from ablate.study import TrialSpec

    out = tmp_path / "s"
    out.mkdir()
    spec = TrialSpec("aaaaaaaaaaaa", "etth1", 0, "baseline", ["baseline"], "", {"task": "etth1", "seed": 0})
    recorder = sweep._make_callbacks(types.SimpleNamespace(name="s", retries=0), {spec.trial_id: spec}, out, 1, 0,
                                     reruns=sweep._Reruns({spec.trial_id}, set()))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / store.RERUN_FILE))

    monkeypatch.setattr(store, "write_reruns", full)
    trial = types.SimpleNamespace(config={"trial": {"trial_id": spec.trial_id}}, status="RUNNING")
    payload = {"row": {"status": "ok", "metric": "mse", "best_metric": 0.1}, "history": [], "telemetry": []}
    with pytest.raises(OSError, match="No space left"):
        recorder.on_trial_result(0, [trial], trial, {sweep.RESULT_KEY: json.dumps(payload)})
    assert recorder.write_error is not None and recorder.write_error[0] is spec
    assert finished_trial_ids(out) == {spec.trial_id}  # (stored: the message says the stored results are kept)
