"""The trial runner: reproducibility, pairing, checkpoint-resume, budgets, early stopping."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch

from ablate.config import ConfigError
from ablate.tasks import list_tasks
from ablate.trial import Trial, run_trial

FAST = {"task": "etth1", "epochs": 3, "max_train_batches": 8, "meta_every": 3, "warmup_epochs": 1, "seed": 0,
        "num_threads": 1}
TIMING = {"time_train_s", "time_meta_s", "time_eval_s", "wall_s", "time_total_s", "finished_at"}


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_same_seed_gives_identical_history_and_telemetry():
    a, b = run_trial(FAST), run_trial(FAST)
    assert _strip(a.history) == _strip(b.history) and a.telemetry == b.telemetry
    assert a.row["best_metric"] == b.row["best_metric"]
    c = run_trial({**FAST, "seed": 1})
    assert _strip(c.history) != _strip(a.history)


def test_adamw_and_metaadamw_trials_with_one_seed_are_paired():
    # same initial weights, batches and dropout masks: identical during the warm-up epoch
    meta = run_trial({**FAST, "epochs": 2, "modulator_init": "zero"})  # exactly AdamW until the first meta-update
    adamw = run_trial({**FAST, "epochs": 2, "optimizer": "adamw"})
    assert meta.history[0]["train_loss"] == pytest.approx(adamw.history[0]["train_loss"], rel=1e-5)
    assert meta.history[0]["val_mse"] == pytest.approx(adamw.history[0]["val_mse"], rel=1e-5)
    assert meta.row["meta_updates"] > 0 and adamw.row["meta_updates"] == 0


def test_checkpoint_resume_gives_the_same_result(tmp_path):
    config = {**FAST, "epochs": 4, "patience": 0}
    straight = run_trial(config)
    saved = []

    def save_after_two(row, trial):
        if row["epoch"] == 2:
            saved.append(trial.save(tmp_path / "ckpt.pt"))

    run_trial(config, callback=save_after_two)
    resumed = run_trial(config, resume=saved[0])
    assert _strip(resumed.history) == _strip(straight.history)
    assert resumed.telemetry == straight.telemetry
    assert resumed.row["best_metric"] == straight.row["best_metric"]
    assert resumed.row["steps"] == straight.row["steps"]


def test_trials_stepped_in_turn_draw_what_each_draws_alone():
    # ablate tune trains a suggestion's seeds in lockstep in one process: each member must draw its
    # own dropout masks (the etth1 model has dropout), not what the other members left in torch's
    # global generator, or a seed's tuning score is not what `ablate run` gives for it
    config = {**FAST, "optimizer": "adamw", "patience": 0}
    alone = run_trial({**config, "seed": 1})
    members = [Trial({**config, "seed": s}) for s in (0, 1, 2)]
    torch.manual_seed(123)  # (and whatever the caller draws in between is its own business)
    outside = torch.get_rng_state()
    for _ in range(config["epochs"]):
        for t in members:
            t.run_epoch()
    assert torch.equal(torch.get_rng_state(), outside)
    assert _strip(members[1].history) == _strip(alone.history)
    assert members[1].finish().row["best_metric"] == alone.row["best_metric"]


def test_building_and_running_a_trial_leaves_the_callers_random_state_as_it_was():
    # run in a notebook or a script: the trial seeds its own streams, the caller's go on undisturbed
    import random

    import numpy as np
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    result = run_trial({**FAST, "epochs": 2})
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    # ... and the trial's own result does not depend on what the caller drew before
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    assert _strip(run_trial({**FAST, "epochs": 2}).history) == _strip(result.history)


def test_a_trials_num_threads_hold_while_it_works_and_the_callers_come_back_after(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # (the real setting is left alone)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), monkeypatch.setattr(
        torch, "get_num_threads", lambda: n)))
    trial = Trial({**FAST, "epochs": 1, "num_threads": threads + 1})
    assert torch.get_num_threads() == threads and calls == [threads + 1, threads]
    trial.run_epoch()
    assert torch.get_num_threads() == threads and calls[2:] == [threads + 1, threads]


def _scripted(task, values, tmp_path=None, resume_after=None, **over):
    """A trial whose validation metric is ``values[epoch - 1]`` (the other metric 0): early stopping by hand."""
    cfg = {"task": task, "optimizer": "adamw", "epochs": len(values), "max_train_batches": 2, "num_threads": 1,
           "min_delta": 0.0, "patience": 2, **over}

    def scripted(trial):
        other = "mae" if task == "etth1" else "loss"
        trial.task.evaluate = lambda model, loader: {trial.metric.name: values[trial.epoch - 1], other: 0.0}
        return trial

    trial = scripted(Trial(cfg))
    if resume_after is None:
        return trial.run().row
    for _ in range(resume_after):
        trial.run_epoch()
    again = scripted(Trial(cfg))
    again.load(trial.save(tmp_path / "ckpt.pt"))
    return again.run().row


SCRIPT = [1.0, 0.9, 0.95, 0.8, 0.85, 0.86, 0.7]  # best 0.8 at 4; epoch 3 bad (reset by 4), 5 and 6 bad: stop at 6


@pytest.mark.parametrize("task, values, best", [("etth1", SCRIPT, 0.8), ("cifar10", [1 - v for v in SCRIPT], 0.2)])
def test_patience_counts_epochs_since_the_last_improvement_in_both_modes(task, values, best):
    row = _scripted(task, values)
    assert (row["epochs_run"], row["stop_reason"]) == (6, "early_stopping")
    assert (row["best_metric"], row["best_epoch"]) == (pytest.approx(best), 4)


def test_min_delta_decides_the_patience_and_the_best_epoch_is_the_best_value():
    # 0.96 improves on 1.0 by less than min_delta: the patience runs on, but it is the best value seen
    row = _scripted("etth1", [1.0, 0.96, 0.97, 0.5], min_delta=0.05)
    assert (row["epochs_run"], row["best_epoch"], row["best_metric"]) == (3, 2, 0.96)
    # small gains add up: 0.94 is more than min_delta below 1.0, the last epoch that reset the patience
    row = _scripted("etth1", [1.0, 0.97, 0.94, 0.91, 0.90, 0.89], min_delta=0.05)
    assert (row["epochs_run"], row["stop_reason"], row["best_epoch"], row["best_metric"]) == (
        5, "early_stopping", 5, 0.90)


def test_patience_running_out_at_the_last_epoch_of_the_budget_is_the_budget_ending_the_trial():
    # epochs 2 and 3 are bad (patience 2) and 3 is the budget's last: it ran every epoch it had
    row = _scripted("etth1", [1.0, 1.1, 1.2])
    assert (row["epochs_run"], row["stop_reason"], row["best_epoch"]) == (3, "max_epochs", 1)
    row = _scripted("etth1", [1.0, 1.1, 1.2, 0.5])  # one epoch more in the budget: early stopping saved it
    assert (row["epochs_run"], row["stop_reason"]) == (3, "early_stopping")


def test_a_checkpoint_from_before_the_patience_had_its_own_value_resumes_as_it_would_have(tmp_path):
    # older checkpoints hold no patience_value: the best value was the patience's reference then
    cfg = {"task": "etth1", "optimizer": "adamw", "epochs": len(SCRIPT), "max_train_batches": 2, "num_threads": 1,
           "min_delta": 0.0, "patience": 2}
    straight = _scripted("etth1", SCRIPT)
    trial = Trial(cfg)
    trial.task.evaluate = lambda model, loader: {"mse": SCRIPT[trial.epoch - 1], "mae": 0.0}
    for _ in range(5):
        trial.run_epoch()
    state = trial.state_dict()
    del state["patience_value"]
    again = Trial(cfg)
    again.task.evaluate = lambda model, loader: {"mse": SCRIPT[again.epoch - 1], "mae": 0.0}
    again.load_state_dict(state)
    row = again.run().row
    assert (row["epochs_run"], row["best_epoch"], row["stop_reason"]) == (
        straight["epochs_run"], straight["best_epoch"], straight["stop_reason"]) == (6, 4, "early_stopping")


@pytest.mark.parametrize("after", [1, 2, 3, 4, 5])
def test_resume_keeps_the_patience_count(tmp_path, after):
    assert _scripted("etth1", SCRIPT, tmp_path, resume_after=after)["epochs_run"] == 6
    # after epoch 4 the patience counts from 0.94 (epoch 3), not from the best, 0.91: 0.885 resets it
    values = [1.0, 0.97, 0.94, 0.91, 0.885, 0.88, 0.87, 0.86, 0.85]
    row = _scripted("etth1", values, tmp_path, resume_after=after, min_delta=0.05)
    assert (row["epochs_run"], row["best_epoch"]) == (7, 7)


@pytest.mark.parametrize("over", [{}, {"meta_every": 5, "max_steps": 14}, {"meta_every": None, "meta_per_epoch": 3},
                                  {"meta_every": None, "meta_per_epoch": 0.5},
                                  {"meta_every": 50}])
def test_the_planned_meta_updates_are_those_a_full_run_makes(over):
    # (ablate train warns before training when the budget holds none)
    trial = Trial({**FAST, "patience": 0, **over})
    planned = trial.planned_meta_updates()
    assert trial.run().row["meta_updates"] == planned
    assert (planned == 0) is (over == {"meta_every": 50})  # (8 steps an epoch, 2 after the warm-up epoch)
    assert Trial({**FAST, "optimizer": "adamw"}).planned_meta_updates() == 0


def test_ablate_train_says_before_training_that_the_budget_holds_no_meta_update(capsys):
    from ablate.cli import main
    assert main(["train", "--task", "etth1", "--no-progress", "--set", "epochs=2", "--set", "max_train_batches=3",
                 "--set", "meta_every=50", "--set", "num_threads=1"]) == 0
    assert "note: the budget ends before the first meta-update (warm-up epochs 1, then one every 50 steps of the run; " \
           "3 steps per epoch)" in capsys.readouterr().out


@pytest.mark.parametrize("terminal", [False, True])
def test_ablate_train_draws_its_progress_bar_only_on_a_terminal(capsys, monkeypatch, terminal):
    # (a file, a pipe, a batch job's log: one carriage-return redraw per step, in every epoch, was written there)
    import sys

    from ablate.cli import main

    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert main(["train", "--task", "etth1", "--optimizer", "adamw", "--set", "epochs=1", "--set", "max_train_batches=3",
                 "--set", "num_threads=1"]) == 0
    captured = capsys.readouterr()
    assert "epoch   1  step      3" in captured.out  # (the per-epoch line, either way)
    assert ("\r" in captured.err and "epoch 1:" in captured.err) is terminal
    assert "\r" not in captured.out


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    trial = Trial(FAST)
    path = trial.save(tmp_path / "a.pt")
    with pytest.raises(ValueError, match="configs differ: seed: 0 there, 5 here"):  # (the keys named)
        Trial({**FAST, "seed": 5}).load(path)


def test_a_refused_checkpoint_names_the_task_first_and_not_the_keys_that_may_differ(tmp_path):
    # a checkpoint of another task listed five task-model keys alphabetically and hid "task" behind
    # "...", and a refused one named num_threads and cpu_malloc, which a resume may change, as differences
    path = Trial({**FAST, "optimizer": "adamw", "epochs": 1}).save(tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"configs differ: task: 'etth1' there, 'cifar10' here, "):
        Trial({"task": "cifar10", "optimizer": "adamw", "epochs": 1, "max_train_batches": 2}).load(path)
    with pytest.raises(ValueError, match=r"configs differ: lr: 0.0005 there, 0.001 here\)$"):
        Trial({**FAST, "optimizer": "adamw", "epochs": 1, "lr": 1e-3, "num_threads": 2, "cpu_malloc": "keep"}).load(path)
    with pytest.raises(ValueError, match=r"configs differ: optimizer: 'adamw' there, 'metaadamw' here\)$"):
        Trial({**FAST, "epochs": 1}).load(path)


def test_record_per_epoch_and_summary():
    r = run_trial(FAST)
    h = r.history
    assert [row["epoch"] for row in h] == [1, 2, 3] and [row["step"] for row in h] == [8, 16, 24]
    assert {"train_loss", "val_mse", "val_mae", "time_train_s", "time_meta_s", "time_eval_s", "wall_s"} <= set(h[0])
    # meta-updates after the warm-up epoch, every 3rd step: steps 9, 12, ..., 24
    assert h[0]["meta_updates"] == 0 and h[-1]["meta_updates"] == r.row["meta_updates"] == 6
    assert h[-1]["wall_s"] == pytest.approx(r.row["time_total_s"])
    assert r.row["data_source"].startswith("embedded:")
    assert r.row["ref_persistence_mse"] > 0 and r.row["metric"] == "mse" and r.row["mode"] == "min"
    best = min(h, key=lambda row: row["val_mse"])
    assert r.row["best_metric"] == best["val_mse"] and r.row["best_epoch"] == best["epoch"]
    groups = {t["group"] for t in r.telemetry}
    assert len(r.telemetry) == r.row["meta_updates"] * len(groups)
    t = r.telemetry[0]
    assert {"alpha", "beta", "term_gradient", "sigma_loss_decrease", "meta_loss", "skipped"} <= set(t)
    # what ran it (ablate.provenance): this process's code, torch and host
    from ablate.provenance import code_fingerprint

    assert r.row["code_fingerprint"] == code_fingerprint() and len(r.row["code_fingerprint"]) == 12
    assert r.row["torch_version"] == torch.__version__ and r.row["hostname"] == socket.gethostname()


def test_a_trial_records_what_made_it_as_it_was_built(monkeypatch):
    import ablate.trial as T

    made = {"code_fingerprint": "0123456789ab", "torch_version": "x", "python_version": "y", "hostname": "z"}
    monkeypatch.setattr(T, "provenance", lambda task, config=None: dict(made))
    trial = Trial({**FAST, "epochs": 1})
    # (code checked out while it trains is not what trained it)
    monkeypatch.setattr(T, "provenance", lambda task, config=None: pytest.fail("provenance asked after the trial was built"))
    row = trial.run().row
    assert {k: row[k] for k in made} == made


def test_meta_per_epoch_sets_k():
    without_k = {k: v for k, v in FAST.items() if k != "meta_every"}
    assert Trial({**without_k, "meta_per_epoch": 2.0}).meta_every == 4  # 8 batches per epoch
    with pytest.raises(ConfigError, match="both set"):
        Trial({**FAST, "meta_per_epoch": 2.0})


@pytest.mark.parametrize("steps, per_epoch, expected", [
    (8, 2.0, [0, 2, 2, 2]), (5, 2.0, [0, 2, 2, 2]), (5, 3.0, [0, 3, 3, 3]), (5, 10.0, [0, 5, 5, 5]),
    (8, 0.5, [0, 1, 0, 1]),  # (below 1: every 16 steps of the run, at steps 16 and 32)
])
def test_meta_per_epoch_gives_that_many_meta_updates_in_every_epoch(steps, per_epoch, expected):
    # K = round(steps / per_epoch) on the global step count drifted: 5 steps and 2 per epoch gave
    # 0, 3, 2, 3, 2; 5 steps and 3 per epoch gave 2.5 on average
    without_k = {k: v for k, v in FAST.items() if k != "meta_every"}
    config = {**without_k, "epochs": 4, "max_train_batches": steps, "meta_per_epoch": per_epoch, "patience": 0,
              "modulator_layers": 1}
    if per_epoch > steps:
        with pytest.warns(UserWarning, match=f"meta_per_epoch=10 is more than the {steps} steps of an epoch"):
            result = run_trial(config)
    else:
        result = run_trial(config)
    assert [h["meta_updates_epoch"] for h in result.history] == expected
    assert result.row["meta_updates"] == sum(expected) == len({r["meta_update"] for r in result.telemetry})
    if per_epoch == 2.0 and steps == 5:  # evenly spread: at the 3rd and 5th step of each epoch
        assert sorted({r["step"] for r in result.telemetry}) == [8, 10, 13, 15, 18, 20]
    if per_epoch > steps:  # (an AdamW trial ignores meta_per_epoch: no warning about it)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            Trial({**config, "optimizer": "adamw"})


def test_warm_up_epochs_count_for_the_patience_of_both_arms_and_an_idle_trial_says_so():
    # one early-stopping rule for AdamW and MetaAdamW (AdamW's trials do not even get warmup_epochs);
    # a MetaAdamW trial stopped in its warm-up made no meta-update, which its row shows
    config = {**FAST, "epochs": 6, "warmup_epochs": 3, "patience": 2, "min_delta": 10.0, "meta_every": 1}
    meta, adamw = run_trial(config), run_trial({**config, "optimizer": "adamw", "warmup_epochs": 1})
    assert meta.row["epochs_run"] == adamw.row["epochs_run"] == 3 and meta.row["meta_updates"] == 0


def test_the_step_budget_keeps_its_stop_reason_when_patience_runs_out_at_the_same_epoch():
    r = run_trial({**FAST, "epochs": 5, "max_steps": 16, "patience": 1, "min_delta": 10.0, "warmup_epochs": 0})
    assert (r.row["steps"], r.row["stop_reason"]) == (16, "max_steps")


def test_max_train_batches_loads_no_extra_batch():
    trial = Trial({**FAST, "epochs": 1, "max_train_batches": 3})
    loaded = []
    dataset = trial.train_loader.dataset
    original = type(dataset).__getitem__
    type(dataset).__getitem__ = lambda self, i: (loaded.append(i), original(self, i))[1]
    try:
        trial.run()
    finally:
        type(dataset).__getitem__ = original
    # three training batches (the class is shared with the validation set, evaluated once)
    assert len(loaded) == 3 * trial.train_loader.batch_size + len(trial.val_loader.dataset)


def test_max_steps_budget_and_early_stopping():
    r = run_trial({**FAST, "max_steps": 10})
    assert r.row["steps"] == 10 and r.row["stop_reason"] == "max_steps" and r.row["epochs_run"] == 2
    r = run_trial({**FAST, "epochs": 30, "lr": 0.3, "patience": 1, "min_delta": 10.0})
    assert r.row["stop_reason"] == "early_stopping" and r.row["epochs_run"] == 2


def test_best_weights_are_restored():
    trial = Trial({**FAST, "epochs": 5, "lr": 0.05, "patience": 0})
    result = trial.run()
    again = trial.task.evaluate(trial.model, trial.val_loader)
    assert again["mse"] == pytest.approx(result.row["best_metric"], rel=1e-6)


def test_diverging_loss_ends_the_trial_with_status_diverged():
    r = run_trial({**FAST, "lr": 1e30, "optimizer": "adamw", "epochs": 5, "patience": 0})
    assert r.row["status"] == "diverged" and r.row["stop_reason"] == "diverged"
    assert "non-finite" in r.row["error"] or "became" in r.row["error"]
    assert len(r.history) < 5


@pytest.mark.parametrize("task", list_tasks())
@pytest.mark.parametrize("optimizer", ["adamw", "metaadamw"])
def test_every_embedded_task_learns_with_each_optimizer(task, optimizer):
    torch.set_num_threads(1)
    config = {"task": task, "optimizer": optimizer, "epochs": 3, "max_train_batches": 6, "meta_every": 2,
              "warmup_epochs": 0, "patience": 0, "lr": 3e-3, "modulator_layers": 1, "num_threads": 1}
    r = run_trial(config)
    losses = [h["train_loss"] for h in r.history]
    assert r.row["status"] == "ok" and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], f"{task}/{optimizer}: training loss did not go down: {losses}"
    from ablate.tasks import get_task  # (the version in the trial's id is the one of the data it read)
    assert r.row["data_source"] == f"embedded:{get_task(task).embedded_version}"
    if optimizer == "metaadamw":
        assert r.row["meta_updates"] == 9 and r.row["meta_skipped"] == 0


def test_a_real_data_trial_records_the_fingerprint_of_its_files(tmp_path):
    import numpy as np

    from ablate.tasks import data_fingerprint, get_task
    from tests.ablate.test_task_etth import write_ett_csv

    write_ett_csv(tmp_path / "ETTh1.csv", np.sin(np.arange(200.0) / 5))
    config = {"task": "etth1", "data": "real", "data_dir": str(tmp_path), "optimizer": "adamw", "seq_len": 4,
              "d_model": 8, "n_heads": 2, "n_layers": 1, "epochs": 1, "max_train_batches": 2}
    trial = Trial(config)
    row = trial.run().row
    assert row["data_fingerprint"] == data_fingerprint(get_task("etth1"), trial.config) and len(row["data_fingerprint"]) == 16
    with open(tmp_path / "ETTh1.csv", "a") as f:  # another file (one more row): another fingerprint
        f.write("2016-07-09 08:00:00,1,1,1,1,1,1,0.5\n")
    assert data_fingerprint(get_task("etth1"), trial.config) != row["data_fingerprint"]
    # a checkpoint made on the old file cannot resume the trial on the new one (it would mix the two)
    from ablate.trial import StaleCheckpoint

    state = trial.state_dict()
    again = Trial(config)
    assert not again.can_resume_from(state)
    with pytest.raises(StaleCheckpoint, match="made on other data files"):
        again.load_state_dict(state)
    assert again.can_resume_from({**state, "data_fingerprint": again.data_fingerprint})
    embedded = Trial({"task": "etth1", "optimizer": "adamw", "epochs": 1, "max_train_batches": 1}).run().row
    assert embedded["data_fingerprint"] == ""


def test_a_loss_that_becomes_inf_stops_the_trial_at_that_step():
    # it was caught at the end of the epoch: 32 more steps (and meta-updates) on NaN weights, the
    # error said "nan" at the epoch's last step, and the diverged epoch's time was dropped
    trial = Trial({"task": "etth1", "optimizer": "metaadamw", "epochs": 4, "meta_every": 5})
    loss_fn, calls = trial.task.loss_fn, []

    def blows_up_at_step_40(model, batch):
        loss = loss_fn(model, batch)
        if model.training and torch.is_grad_enabled() and trial.step + 1 >= 40 and not calls:
            calls.append(trial.step + 1)
            return loss * float("inf")
        return loss

    trial.task.loss_fn = blows_up_at_step_40
    row = trial.run().row
    assert trial.steps_per_epoch < 40 < 2 * trial.steps_per_epoch  # (step 40 is inside epoch 2)
    assert row["status"] == "diverged" and row["steps"] == 40 and row["epochs_run"] == 1
    assert row["error"] == "training loss became inf at step 40 (epoch 2); stopped at step 40"
    assert row["time_train_s"] > trial.history[0]["time_train_s"]  # epoch 1 and the part of epoch 2


def test_meta_every_null_without_meta_per_epoch_is_a_config_error():
    with pytest.raises(ConfigError, match="meta_every is null but meta_per_epoch is not set"):
        Trial({"task": "etth1", "meta_every": None})
    assert Trial({"task": "etth1", "meta_every": None, "meta_per_epoch": 2.0}).meta_every >= 1
    assert Trial({"task": "etth1", "optimizer": "adamw", "meta_every": None}).config["meta_every"] is None


def test_an_epoch_whose_validation_diverged_still_counts_its_time():
    trial = Trial({**FAST, "epochs": 4, "patience": 0})
    evaluate, calls = trial.task.evaluate, []

    def nan_in_epoch_2(model, loader):
        calls.append(1)
        return evaluate(model, loader) if len(calls) < 2 else {"mse": math.nan, "mae": math.nan}

    trial.task.evaluate = nan_in_epoch_2
    result = trial.run()
    assert result.row["status"] == "diverged" and len(result.history) == 1
    for part in ("train", "eval"):  # (epoch 2's training and evaluation time were dropped)
        assert result.row[f"time_{part}_s"] > result.history[0][f"time_{part}_s"]


@pytest.mark.parametrize("content", [b"", b"\x80\x02 cut short", None])
def test_a_damaged_stable_checkpoint_is_moved_aside_and_the_trial_starts_afresh(tmp_path, capsys, content):
    # torch.load's error failed the trial on every --resume, without naming the file
    from ablate.sweep import _stable_checkpoint

    trial = Trial(FAST)
    stable = tmp_path / f"{trial.trial_id}.pt"
    good = trial.save(stable).read_bytes()
    if content is None:
        torch.save({"not": "a trial checkpoint"}, stable)
    else:
        stable.write_bytes(content)
    assert _stable_checkpoint(trial, stable) is None
    assert not stable.exists() and len(list(tmp_path.glob(f"{trial.trial_id}.pt.unreadable-*"))) == 1
    assert f"its checkpoint {stable} is unreadable" in capsys.readouterr().out
    stable.write_bytes(good)
    assert _stable_checkpoint(trial, stable)["epoch"] == trial.epoch


def test_a_stable_checkpoint_that_cannot_be_read_for_now_is_not_set_aside(tmp_path, monkeypatch):
    # a permission or I/O error says nothing about the file: the trial fails, a retry reads it again
    import errno

    from ablate.sweep import _stable_checkpoint

    trial = Trial(FAST)
    stable = trial.save(tmp_path / f"{trial.trial_id}.pt")
    for error in (PermissionError(errno.EACCES, "Permission denied"), OSError(errno.EIO, "Input/output error")):
        def fail(*args, **kwargs):
            raise error

        monkeypatch.setattr(torch, "load", fail)
        with pytest.raises(OSError):
            _stable_checkpoint(trial, stable)
        assert stable.exists()


def test_the_trial_evaluates_in_eval_mode_whatever_the_tasks_evaluate_does():
    # a task whose evaluate() does not call model.eval() (as the README's example task): dropout must be off and
    # BatchNorm must use, not update, its running statistics on the validation and test data
    from torch import nn

    from ablate.tasks import TASKS, TaskInstance, register_task

    seen = []

    def build(config):
        g = torch.Generator().manual_seed(0)
        x = torch.rand(256, 1, generator=g) * 6 - 3
        data = torch.utils.data.TensorDataset(x, torch.sin(x))
        model = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1))

        def loss_fn(model, batch):
            return nn.functional.mse_loss(model(batch[0]), batch[1])

        def evaluate(model, loader):
            seen.append(model.training)
            sums = [(nn.functional.mse_loss(model(x), y, reduction="sum").item(), y.numel()) for x, y in loader]
            return {"mse": sum(s for s, _ in sums) / sum(n for _, n in sums)}

        return TaskInstance(name="evalmode_task", model=model, train=data, val=data, test=data, loss_fn=loss_fn,
                            evaluate=evaluate, data_source="synthetic:evalmode")

    register_task("evalmode_task", metrics=[("mse", "min")], defaults={"epochs": 2, "batch_size": 32})(build)
    try:
        trial = Trial({"task": "evalmode_task", "optimizer": "adamw", "num_threads": 1, "patience": 0})
        result = trial.run()
    finally:
        TASKS.remove("evalmode_task")
    assert seen == [False, False, False]  # two epochs' validation, then the test split
    assert trial.model.training  # put back after it
    best = trial.history[result.row["best_epoch"] - 1]["val_mse"]
    assert result.row["test_mse"] == pytest.approx(best, rel=1e-6)  # the same data, the same (best) weights


def test_train_loss_is_the_mean_over_examples_not_over_batches():
    # etth1's embedded training split (566 windows in batches of 16) ends with a batch of 6: it must weigh 6/566
    seen, result = _run_with_losses_seen(Trial({"task": "etth1", "optimizer": "adamw", "num_threads": 1, "epochs": 1}))
    assert {n for _, n in seen} == {16, 6}
    expected = sum(loss * n for loss, n in seen) / sum(n for _, n in seen)
    assert result.history[0]["train_loss"] == pytest.approx(expected, rel=1e-6)


def _run_with_losses_seen(trial):
    """Run ``trial`` with its loss spied on: ([(each batch's loss, its examples: len(batch[1]))], the result)."""
    seen = []
    loss_fn = trial.task.loss_fn

    def spy(model, batch):
        loss = loss_fn(model, batch)
        seen.append((loss.item(), len(batch[1])))
        return loss

    trial.task.loss_fn = spy
    return seen, trial.run()


def _fake_cuda(monkeypatch, n=2):
    """CUDA's RNG functions over CPU generators (a CPU-only torch), and the calls made to them."""
    gens, calls = [torch.Generator() for _ in range(n)], []

    def rec(name, f):
        return lambda *a: (calls.append(name), f(*a))[1]

    def idx(d):
        return 0 if d in ("cuda", None) else (d if isinstance(d, int) else (d.index or 0))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_rng_state", rec("get_rng_state", lambda d="cuda": gens[idx(d)].get_state()))
    monkeypatch.setattr(torch.cuda, "set_rng_state", rec("set_rng_state", lambda s, d="cuda": gens[idx(d)].set_state(s)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", rec("get_rng_state_all", lambda: [g.get_state() for g in gens]))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        rec("set_rng_state_all", lambda ss: [g.set_state(s) for g, s in zip(gens, ss)]))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", rec("manual_seed_all", lambda s: [g.manual_seed(s) for g in gens]))
    return gens, calls


def test_a_cpu_trial_leaves_cuda_alone_where_cuda_is_available(monkeypatch):
    # reading CUDA's generator states starts CUDA on every visible GPU (memory on each, per process), and
    # torch.manual_seed reseeds them (or queues that seed for the caller's CUDA): a device: cpu trial does neither
    gens, calls = _fake_cuda(monkeypatch)
    before = [g.get_state() for g in gens]
    run_trial({**FAST, "epochs": 2, "device": "cpu"})
    assert calls == []
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, before))


def test_a_cuda_trials_cuda_stream_is_its_seeds_and_the_optimizer_build_does_not_shift_it(monkeypatch):
    # torch.manual_seed(seed + 7919) for the modulator's init reseeded every CUDA generator and fork_rng(devices=[])
    # did not restore them; an optimizer drawing on the GPU (the 'enhanced' features' group embedding is
    # torch.randn on the parameters' device) then shifted the CUDA training stream (GPU dropout masks): AdamW and
    # MetaAdamW trials of one seed were no longer matched pairs. (The CUDA path taken on the CPU here.)
    import ablate.trial as trial_module

    gens, _ = _fake_cuda(monkeypatch)
    monkeypatch.setattr(trial_module, "_uses_cuda", lambda device: True, raising=False)
    real_build = trial_module.build_optimizer

    def build(cfg, model, total_steps=None):
        opt = real_build(cfg, model, total_steps=total_steps)
        if cfg["optimizer"] == "metaadamw":
            torch.randn(3, 4, generator=gens[0])  # (what MetaAdamW(features="enhanced") draws on a GPU)
        return opt

    monkeypatch.setattr(trial_module, "build_optimizer", build)
    gens[0].manual_seed(11)
    outside = [g.get_state() for g in gens]
    states = {opt: Trial({**FAST, "seed": 3, "optimizer": opt})._rng["cuda"] for opt in ("adamw", "metaadamw")}
    seeded = torch.Generator().manual_seed(3).get_state()
    assert all(torch.equal(s, seeded) for opt in states for s in states[opt])
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, outside))  # (the caller's CUDA streams kept)


def test_a_cuda_checkpoint_resumed_on_the_cpu_leaves_cuda_alone(monkeypatch):
    gens, calls = _fake_cuda(monkeypatch)
    trial = Trial({**FAST, "epochs": 2})
    trial.run_epoch()
    state = trial.state_dict()
    state["rng"]["cuda"] = [g.get_state() for g in gens]  # (as a trial on a GPU saved it)
    calls.clear()
    resumed = Trial({**FAST, "epochs": 2})
    resumed.load_state_dict(state)
    resumed.run()
    assert calls == []


def test_a_trial_without_num_threads_records_the_threads_it_trained_with(monkeypatch):
    # ablate train runs a trial with torch's own thread count: the row said num_threads None, while the
    # results' last digits depend on the count
    threads = torch.get_num_threads()
    result = run_trial({**FAST, "epochs": 1, "num_threads": None, "optimizer": "adamw"})
    assert result.row["num_threads"] == threads


def test_train_loss_weighs_each_batch_by_its_examples_whatever_the_batchs_layout():
    # a sequence-first (T, B) batch (nn.LSTM's and nn.Transformer's default layout): the first tensor's leading
    # dimension is its length T, not its examples; 50 examples in batches of 16 end with a batch of 2
    from torch import nn

    from ablate.tasks import TASKS, TaskInstance, register_task

    def build(config):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(50, 5, generator=g), torch.randn(50, generator=g))

        def collate(items):
            return torch.stack([x for x, _ in items], 1), torch.stack([y for _, y in items])

        def loss_fn(model, batch):
            return ((model(batch[0].mean(0, keepdim=True).T).squeeze(1) - batch[1]) ** 2).mean()

        def evaluate(model, loader):
            sums = [(((model(x.mean(0, keepdim=True).T).squeeze(1) - y) ** 2).sum().item(), len(y)) for x, y in loader]
            return {"mse": sum(s for s, _ in sums) / sum(n for _, n in sums)}

        return TaskInstance(name="seqfirst_task", model=nn.Linear(1, 1), train=data, val=data, loss_fn=loss_fn,
                            evaluate=evaluate, data_source="synthetic:seqfirst", collate_fn=collate)

    register_task("seqfirst_task", metrics=[("mse", "min")], defaults={"epochs": 1, "batch_size": 16})(build)
    try:
        seen, result = _run_with_losses_seen(
            Trial({"task": "seqfirst_task", "optimizer": "adamw", "num_threads": 1, "patience": 0}))
    finally:
        TASKS.remove("seqfirst_task")
    assert [n for _, n in seen] == [16, 16, 16, 2]
    expected = sum(loss * n for loss, n in seen) / sum(n for _, n in seen)
    assert result.history[0]["train_loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["another trial's", "an older version's"])
def test_a_stable_checkpoint_of_another_trial_or_version_is_set_aside_and_the_trial_starts_afresh(tmp_path, kind):
    # a valid file that this trial cannot continue from failed the trial at every `ablate run --resume` (the
    # end of the run even advised --resume "runs them again from there"); an older one's was a bare KeyError
    from ablate.sweep import _stable_checkpoint

    trial = Trial(FAST)
    stable = tmp_path / f"{trial.trial_id}.pt"
    if kind == "another trial's":
        other = Trial({**FAST, "seed": 5})
        other.run_epoch()
        other.save(stable)
    else:
        trial.run_epoch()
        state = trial.state_dict()
        del state["generators"]
        torch.save(state, stable)
        trial = Trial(FAST)
    notes: list[str] = []
    assert _stable_checkpoint(trial, stable, notes) is None
    assert not stable.exists() and len(list(tmp_path.glob(f"{trial.trial_id}.pt.unreadable-*"))) == 1
    assert len(notes) == 1 and f"its checkpoint {stable} cannot be used" in notes[0] and "starting afresh" in notes[0]
    assert ("cannot resume trial" if kind == "another trial's" else "lacks generators") in notes[0]


def test_a_checkpoint_that_does_not_fit_the_model_leaves_the_trial_as_it_was(tmp_path):
    # (a model of other code under the same config): torch loaded the matching tensors before it raised, and
    # its RuntimeError failed the trial at every `ablate run --resume` (a traceback for `ablate train --resume`)
    trial = Trial(FAST)
    trial.run_epoch()
    state = trial.state_dict()
    fresh = Trial(FAST)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    state["model"] = {k + ("" if i else ".renamed"): v for i, (k, v) in enumerate(state["model"].items())}
    with pytest.raises(ConfigError, match="does not fit its model or optimizer"):
        fresh.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())
    assert fresh.epoch == 0 and fresh.run().row["status"] == "ok"


def test_ablate_train_resume_of_a_checkpoint_without_some_keys_is_one_line_and_exit_code_2(tmp_path, capsys):
    from ablate.cli import main

    trial = Trial(FAST)
    state = trial.state_dict()
    del state["generators"], state["history"]
    torch.save(state, tmp_path / "old.pt")
    args = ["train", "--task", "etth1", "--seed", "0", *[f"--set={k}={v}" for k, v in FAST.items()
                                                         if k not in ("task", "seed")]]
    assert main([*args, "--resume", str(tmp_path / "old.pt")]) == 2
    assert "the checkpoint lacks generators, history" in capsys.readouterr().err


def test_the_run_is_told_when_a_trial_s_checkpoint_is_set_aside(tmp_path, monkeypatch):
    # the note was printed in the Ray worker only, whose output does not reach the driver (log_to_driver is off):
    # `ablate run --resume` set a damaged checkpoint aside and started its trial afresh without a word
    from ray import tune

    from ablate import sweep

    config = {**FAST, "epochs": 1}
    trial_id = Trial(config).trial_id
    (tmp_path / f"{trial_id}.pt").write_bytes(b"\x80\x02 cut short")
    reports = []
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    sweep.trainable({"trial": {"config": config, "trial_id": trial_id}, "plugins": [], "checkpoint_dir": str(tmp_path),
                     "resume": True, "cpus": 1})
    payload = json.loads(reports[-1][sweep.RESULT_KEY])
    assert any(f"its checkpoint {tmp_path / trial_id}.pt is unreadable" in w for w in payload["warnings"])


def _trainable_reports(monkeypatch, tmp_path, config, trial_id, ray_checkpoint=None):
    """The reports of :func:`ablate.sweep.trainable` run here (no Ray), under ``ablate run --resume`` with the stable
    checkpoints in ``tmp_path`` and ``ray_checkpoint`` (a folder holding trial.pt) as Ray's."""
    import contextlib

    from ray import tune

    from ablate import sweep

    class Restored:
        @contextlib.contextmanager
        def as_directory(self):
            yield ray_checkpoint

    reports = []
    monkeypatch.setattr(tune, "get_checkpoint", lambda: Restored() if ray_checkpoint else None)
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    sweep.trainable({"trial": {"config": config, "trial_id": trial_id}, "plugins": [], "checkpoint_dir": str(tmp_path),
                     "resume": True, "cpus": 1})
    return reports


def test_a_trial_that_fails_after_its_checkpoint_was_set_aside_says_so(tmp_path, monkeypatch):
    # the note reached the driver with an ok trial's result only: a trial that then failed was recorded and printed
    # without a word of the checkpoint moved aside (nor of the code that ran it)
    from ablate import sweep
    from ablate.trial import Trial as TrialClass

    config = {**FAST, "epochs": 1}
    trial_id = Trial(config).trial_id
    (tmp_path / f"{trial_id}.pt").write_bytes(b"\x80\x02 cut short")

    def broken(self, *args, **kwargs):
        raise ConfigError("the task's loss_fn returned a tensor of shape (3,)")

    monkeypatch.setattr(TrialClass, "run", broken)
    failed = _trainable_reports(monkeypatch, tmp_path, config, trial_id)[-1]
    said = f"its checkpoint {tmp_path / trial_id}.pt is unreadable"
    assert said in failed[sweep.FAILED_KEY]
    assert sweep._last_line(failed[sweep.FAILED_KEY]).endswith("returned a tensor of shape (3,)")  # (still what failed)
    assert any(said in w for w in json.loads(failed[sweep.WARNINGS_KEY]))
    made = json.loads(failed[sweep.PROVENANCE_KEY])
    assert made["torch_version"] == torch.__version__ and made["hostname"] == socket.gethostname()


def test_a_trial_that_raises_after_its_checkpoint_was_set_aside_reported_the_note_before(tmp_path, monkeypatch):
    # the note reached the stored error when the worker caught the failure (ConfigError); a trial that raised anything
    # else, or died, was recorded from Ray's error, which cannot carry it: the note was lost
    from ray import tune

    from ablate import sweep
    from ablate.trial import Trial as TrialClass

    config = {**FAST, "epochs": 1}
    trial_id = Trial(config).trial_id
    (tmp_path / f"{trial_id}.pt").write_bytes(b"\x80\x02 cut short")
    reports = []

    def broken(self, *args, **kwargs):
        assert reports, "the notes are reported before the trial trains"
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(TrialClass, "run", broken)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append((metrics, checkpoint)))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        sweep.trainable({"trial": {"config": config, "trial_id": trial_id}, "plugins": [],
                         "checkpoint_dir": str(tmp_path), "resume": True, "cpus": 1})
    [(metrics, checkpoint)] = reports
    notes = json.loads(metrics[sweep.NOTES_KEY])
    assert checkpoint is None and set(metrics) == {sweep.NOTES_KEY} and len(notes) == 1
    assert f"trial {trial_id}: its checkpoint {tmp_path / trial_id}.pt is unreadable" in notes[0]
    assert not (tmp_path / f"{trial_id}.pt").exists()  # (moved aside, as the note says)


def _after_ray_s_checkpoint(tmp_path, monkeypatch, spoil):
    """The result payload of a 2-epoch trial under ``ablate run --resume`` with Ray's checkpoint of
    epoch 1 and a stable checkpoint of epoch 2 that ``spoil(state)`` made unusable."""
    from ablate import sweep

    config = {**FAST, "epochs": 2, "meta_every": 100}
    ray_dir = tmp_path / "ray"
    ray_dir.mkdir()
    trial = Trial(config)
    trial.run_epoch()
    trial.save(ray_dir / sweep.CHECKPOINT_FILE)
    trial.run_epoch()
    state = trial.state_dict()
    spoil(state)
    torch.save(state, tmp_path / f"{trial.trial_id}.pt")
    return json.loads(_trainable_reports(monkeypatch, tmp_path, config, trial.trial_id, ray_dir)[-1][sweep.RESULT_KEY])


def test_a_stable_checkpoint_set_aside_after_ray_s_was_loaded_does_not_say_starting_afresh(tmp_path, monkeypatch):
    def renamed(state):  # (a model of other code)
        state["model"] = {k + ".renamed": v for k, v in state["model"].items()}

    payload = _after_ray_s_checkpoint(tmp_path, monkeypatch, renamed)
    assert payload["row"]["resumed_from_epoch"] == 1
    [note] = payload["warnings"]
    assert "cannot be used" in note and note.endswith("continuing from Ray's checkpoint of epoch 1"), note


@pytest.mark.parametrize("entry", ["generators", "rng"])
@pytest.mark.parametrize("bad", ["empty", "wrong state"])
def test_a_checkpoint_with_unusable_random_states_is_refused_before_anything_is_loaded(entry, bad):
    # a bare KeyError after the model and optimizer were loaded (rng: at the next epoch, after the load "worked")
    trial = Trial(FAST)
    trial.run_epoch()
    state = trial.state_dict()
    if bad == "empty":
        state[entry] = {}
    else:
        state[entry] = {**state[entry], ("train" if entry == "generators" else "torch"): torch.zeros(3, dtype=torch.uint8)}
    fresh = Trial(FAST)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(ConfigError, match="holds random states this trial cannot take"):
        fresh.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())
    assert fresh.epoch == 0 and not fresh.optimizer.state_dict()["state"]


def test_a_trial_s_row_records_the_device_it_trained_on():
    row = run_trial({**FAST, "epochs": 1, "device": "auto"}).row
    assert row["device"] == "auto"  # (the config as asked: it rebuilds the trial)
    assert row["device_used"] == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_a_checkpoint_made_on_other_embedded_data_says_so_not_that_the_configs_differ(monkeypatch):
    from ablate.tasks import get_task
    from ablate.trial import UnusableCheckpoint

    config = {"task": "etth1", "optimizer": "adamw", "epochs": 1, "max_train_batches": 1}
    state = Trial(config).state_dict()
    monkeypatch.setattr(get_task("etth1"), "embedded_version", "statsmodels-elnino-v2")  # new embedded data
    again = Trial(config)
    assert again.trial_id != state["trial_id"]
    with pytest.raises(UnusableCheckpoint, match=r"their configs are the same, but its id was made by another version "
                                                 r"of ablate, on other embedded data than embedded:statsmodels-elnino-v2"):
        again.load_state_dict(state)


def test_a_note_that_goes_on_from_ray_s_checkpoint_does_not_also_say_start_afresh(tmp_path, monkeypatch):
    # the set-aside note quoted the error's advice for `ablate train --resume` ("start the trial afresh instead")
    # next to what the worker did ("continuing from Ray's checkpoint of epoch 1"): two contradicting instructions
    def unusable_random_states(state):
        del state["generators"]["train"]

    payload = _after_ray_s_checkpoint(tmp_path, monkeypatch, unusable_random_states)
    [note] = payload["warnings"]
    assert "generators lacks train" in note and note.endswith("continuing from Ray's checkpoint of epoch 1"), note
    assert "afresh" not in note, note


def test_a_reference_of_numpy_or_torch_numbers_reaches_the_driver_as_numbers(tmp_path, monkeypatch):
    # a task's reference computed with NumPy (np.mean of a float32 array is a numpy.float32) or left a tensor went to
    # the driver as text: `ablate run` stored ref_mean_mse "0.080046" and ref_half "tensor(0.5000)" - NaN to the
    # report's means - where `ablate train` stored the numbers
    import numpy as np
    from ray import tune
    from torch import nn

    from ablate import sweep
    from ablate.tasks import TASKS, TaskInstance, register_task

    def build(config):
        x = torch.linspace(0, 1, 64).unsqueeze(1)
        data = torch.utils.data.TensorDataset(x, torch.sin(x))

        def loss_fn(model, batch):
            return nn.functional.mse_loss(model(batch[0]), batch[1])

        def evaluate(model, loader):
            return {"mse": sum(nn.functional.mse_loss(model(a), b).item() for a, b in loader)}

        y = x.numpy()
        return TaskInstance(name="npref_task", model=nn.Linear(1, 1), train=data, val=data, loss_fn=loss_fn,
                            evaluate=evaluate, data_source="synthetic:npref",
                            reference={"mean_mse": np.mean((y - y.mean()) ** 2), "half": torch.tensor(0.5),
                                       "flag": np.bool_(True)})

    register_task("npref_task", metrics=[("mse", "min")], defaults={"epochs": 1, "batch_size": 16})(build)
    reports = []
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    config = {"task": "npref_task", "optimizer": "adamw", "num_threads": 1, "patience": 0}
    try:
        sweep.trainable({"trial": {"config": config, "trial_id": Trial(config).trial_id}, "plugins": [],
                         "checkpoint_dir": str(tmp_path), "cpus": 1})
    finally:
        TASKS.remove("npref_task")
    row = json.loads(reports[-1][sweep.RESULT_KEY])["row"]
    want = float(np.mean((np.linspace(0, 1, 64, dtype=np.float32) - 0.5) ** 2))
    assert isinstance(row["ref_mean_mse"], float) and row["ref_mean_mse"] == pytest.approx(want, rel=1e-5)
    assert row["ref_half"] == 0.5 and isinstance(row["ref_half"], float)
    assert row["ref_flag"] is True
