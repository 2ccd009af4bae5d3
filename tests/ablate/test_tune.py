"""`ablate tune`: an Optuna search of the priorities through Ray Tune (OptunaSearch + ASHA) on a
persistent study - a real small study, extending it, reading it from another process, a synthetic
objective with a known optimum, two processes extending one study at once, and the validation of
the tune: section."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ablate.study import StudyError, load_study, parse_study
from ablate.tune import (
    BEST_FILE,
    PRIORITY_PARAMS,
    adamw_references,
    build_targets,
    grace_default,
    load_tune_spec,
    open_storage,
    parse_tune_spec,
    run_tune,
    score,
    storage_location,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

#: A task whose validation score is a known function of the priorities (no learning involved):
#: the squared log-distance to OPTIMUM, plus 0.001 * seed so that the seeds differ.
SYNTH_PLUGIN = '''
import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ablate.tasks.base import TaskInstance, register_task

OPTIMUM = (2.0, 0.5, 4.0)


def objective(priorities, seed=0):
    return sum((math.log(p) - math.log(o)) ** 2 for p, o in zip(priorities, OPTIMUM)) + 0.001 * seed


@register_task("tune_synth", metrics=[("score", "min")],
               defaults={"epochs": 1, "batch_size": 4, "patience": 0, "meta_every": 1000, "modulator_layers": 1,
                         "warmup_epochs": 0, "grouping": "original"},
               description="synthetic: the squared log-distance of the priorities to a known optimum")
def build(config):
    ds = TensorDataset(torch.zeros(4, 1), torch.zeros(4, 1))
    value = objective(config["priorities"], config["seed"])

    def loss_fn(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    def evaluate(model, loader):
        return {"score": value}

    return TaskInstance(name="tune_synth", model=nn.Linear(1, 1), train=ds, val=ds, loss_fn=loss_fn, evaluate=evaluate,
                        data_source="synthetic")
'''
OPTIMUM = (2.0, 0.5, 4.0)


def _write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def _synth_spec(directory: Path, name: str, tune: str, epochs: int = 1) -> Path:
    """A tune spec of the synthetic task (its plugin module next to it) with the given tune: body."""
    (directory / "tune_synth.py").write_text(SYNTH_PLUGIN)
    head = (f"name: {name}\ntasks: [tune_synth]\nseeds: 2\nplugins: [tune_synth]\nadamw: false\n"
            f"budget: {{epochs: {epochs}}}\ntune:\n")
    path = directory / f"{name}.yaml"
    path.write_text(head + textwrap.indent(textwrap.dedent(tune), "  "))
    return path


def _load(location: str, study_name: str):
    import optuna

    return optuna.load_study(study_name=study_name, storage=open_storage(location))


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the whole module (tune reuses a running Ray; the subprocesses join it)."""
    import ray

    started = not ray.is_initialized()
    if started:
        # address="local": a new instance even when a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True,
                 logging_level="warning", object_store_memory=256 * 1024**2)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


# -- (1)-(3) a real small study: run, extend, read from another process ---------------------


@pytest.fixture(scope="module")
def small_study(tmp_path_factory, ray_address):
    """etth1, 2 seeds, 2 epochs of 3 batches, 4 suggestions (TPE + ASHA, one at a time: the
    worker's imports are paid once)."""
    root = tmp_path_factory.mktemp("tune_small")
    spec_path = _write(root, "tiny_tune.yaml", """\
        name: tiny_tune
        tasks: [etth1]
        seeds: 2
        budget: {epochs: 2, max_train_batches: 3, patience: 0}
        # meta-updates from the first step, with a fast modulator optimizer, so the priorities matter
        baseline: {meta_every: 1, warmup_epochs: 0, modulator_layers: 1, meta_lr: 0.01, meta_optimizer: adam}
        adamw: false
        tune:
          trials: 4
          sampler: tpe
          sampler_seed: 0
          aggregate: mean
          priorities: {low: 0.1, high: 10.0, log: true}
          scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
          max_concurrent: 1
        """)
    out = root / "results"
    outcome = run_tune(load_tune_spec(spec_path), out)
    return spec_path, out, outcome


def test_a_small_study_runs_through_ray_tune_and_writes_its_outputs(small_study):
    spec_path, out, outcome = small_study
    tune_dir = out / "tiny_tune" / "tune"
    location = str((tune_dir / "optuna.journal").resolve())
    assert outcome.storage == location and Path(location).is_file()

    study = _load(location, "tiny_tune/etth1")
    assert study.direction.name == "MINIMIZE"  # etth1's mse
    trials = study.trials
    assert len(trials) == 4 and sorted(t.number for t in trials) == [0, 1, 2, 3]
    states = {t.state.name for t in trials}
    assert states <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    assert trials[0].params == {p: 1.0 for p in PRIORITY_PARAMS}, "the baseline's own priorities come first"
    assert trials[0].user_attrs["baseline"] is True
    for t in trials:
        assert set(t.params) == set(PRIORITY_PARAMS) and all(0.1 <= v <= 10.0 for v in t.params.values())
        assert t.value is not None and t.value > 0 and math.isfinite(t.value)
        assert 1 in t.intermediate_values, "every epoch's aggregate is reported to the study"
        if t.state.name == "COMPLETE":
            assert sorted(t.intermediate_values) == [1, 2] and t.user_attrs["epochs"] == 2
            seeds = t.user_attrs["member_values"]
            assert len(seeds) == 2 and t.value == pytest.approx(sum(seeds) / 2)
            assert t.value == pytest.approx(t.intermediate_values[2])
        else:
            assert t.user_attrs["ended"].startswith("stopped by the scheduler")

    best = yaml.safe_load((tune_dir / BEST_FILE).read_text())
    assert list(best) == ["etth1"] and best["etth1"]["priorities"] == [study.best_params[p] for p in PRIORITY_PARAMS], \
        "the values that scored best, at full precision (rounded to 6 digits, a study ran another config)"
    assert best["etth1"]["tuned_on_seeds"] == [0, 1] and best["etth1"]["tuned_for"] == "baseline"  # (where, for whom)
    with_ = best["etth1"]["tuned_with"]  # (and with what)
    assert (with_["meta_every"], with_["meta_optimizer"], with_["meta_lr"], with_["modulator_layers"]) == (1, "adam", 0.01, 1)
    assert (with_["epochs"], with_["max_train_batches"]) == (2, 3)

    history = pd.read_parquet(tune_dir / "history.parquet")
    assert {"number", "value", "direction", "state", "task"} <= set(history.columns)
    assert {f"params_{p}" for p in PRIORITY_PARAMS} <= set(history.columns)
    assert len(history) == 4 and set(history["direction"]) == {"minimize"} and set(history["task"]) == {"etth1"}
    importances = pd.read_parquet(tune_dir / "importances.parquet")
    assert {"param", "importance"} <= set(importances.columns)
    if len(importances):  # fANOVA needs two complete trials
        assert set(importances["param"]) == set(PRIORITY_PARAMS)

    # a study file takes the best priorities as its baseline, relative to the study file
    # - on the seeds they were tuned on, with a warning: there the validation metric favours them
    use_best = """\
        name: use_best
        tasks: [etth1]
        seeds: {seeds}
        budget: {{epochs: 2, max_train_batches: 3}}   # (the budget they were tuned on, which tuned_with records)
        baseline: {{priorities_from: tune/best_priorities.yaml, meta_every: 1, warmup_epochs: 0, modulator_layers: 1,
                    meta_lr: 0.01, meta_optimizer: adam}}
        """
    study_file = _write(out / "tiny_tune", "use_best.yaml", use_best.format(seeds="[1, 2]"))
    with pytest.warns(UserWarning, match=r"tuned on the validation metric of seeds this study runs too \(etth1: "
                                         r"seed\(s\) 1\).*fresh seeds \(seeds: \[3, 4\]\)"):
        baseline = [t for t in load_study(study_file).trials if t.arm == "baseline"][0]
    assert baseline.config["priorities"] == best["etth1"]["priorities"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fresh seeds: nothing to warn about
        load_study(_write(out / "tiny_tune", "use_best.yaml", use_best.format(seeds="[2, 3]")))


def test_extending_a_finished_study_adds_trials_to_the_same_stored_study(small_study, capsys):
    spec_path, out, _ = small_study
    location = str((out / "tiny_tune" / "tune" / "optuna.journal").resolve())
    before = {t.number: (t.state, t.value, t.params) for t in _load(location, "tiny_tune/etth1").trials}
    outcome = run_tune(load_tune_spec(spec_path, trials=2), out)
    after = _load(location, "tiny_tune/etth1").trials
    assert len(after) == len(before) + 2 and sorted(t.number for t in after) == list(range(len(after)))
    for t in after[: len(before)]:
        assert (t.state, t.value, t.params) == before[t.number], "earlier trials are kept as they were"
    new_params = [tuple(t.params.values()) for t in after[len(before):]]
    assert not set(new_params) & {tuple(v[2].values()) for v in before.values()}, "no start-up point is replayed"
    assert outcome.targets[0].ran == 2 and sum(outcome.targets[0].counts.values()) == 6
    printed = capsys.readouterr().out
    assert "4 stored trial(s); 2 more suggestion(s)" in printed and "[etth1] 2/2 done" in printed
    # --trials 0: no Ray, nothing asked; the outputs are rewritten from the stored study
    (out / "tiny_tune" / "tune" / "history.parquet").unlink()
    outcome = run_tune(load_tune_spec(spec_path, trials=0), out)
    assert outcome.targets[0].ran == 0 and len(_load(location, "tiny_tune/etth1").trials) == 6
    assert len(pd.read_parquet(out / "tiny_tune" / "tune" / "history.parquet")) == 6


def test_a_spec_that_scores_differently_cannot_extend_the_stored_study(small_study):
    spec_path, out, _ = small_study
    changed = spec_path.with_name("changed.yaml")
    changed.write_text(spec_path.read_text().replace("max_train_batches: 3", "max_train_batches: 4"))
    with pytest.raises(StudyError, match=r"scored suggestions differently.*max_train_batches \(stored 3, now 4\)"):
        run_tune(load_tune_spec(changed), out)
    # the search space itself may change (narrower ranges, say): same objective, same study
    narrower = spec_path.with_name("narrower.yaml")
    narrower.write_text(spec_path.read_text().replace("high: 10.0", "high: 5.0"))
    outcome = run_tune(load_tune_spec(narrower, trials=0), out)
    assert sum(outcome.targets[0].counts.values()) >= 4


def test_another_process_opens_the_stored_study(small_study):
    _, out, _ = small_study
    location = str((out / "tiny_tune" / "tune" / "optuna.journal").resolve())
    code = textwrap.dedent(f"""\
        import json, optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        study = optuna.load_study(study_name="tiny_tune/etth1", storage=JournalStorage(JournalFileBackend({location!r})))
        best = study.best_trial
        print(json.dumps({{"n": len(study.trials), "best": best.number, "value": best.value, "params": best.params}}))
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    study = _load(location, "tiny_tune/etth1")
    assert seen["n"] == len(study.trials) >= 4
    assert (seen["best"], seen["value"], seen["params"]) == (study.best_trial.number, study.best_value, study.best_params)


# -- (4) a known optimum ---------------------------------------------------------------------


def test_the_search_finds_a_known_optimum(tmp_path, ray_address):
    """The synthetic task's score is a known function of the priorities; the same machinery
    (sampler + Ray Tune + ASHA + journal storage) must land near its optimum."""
    spec = _synth_spec(tmp_path, "synth", """\
        trials: 16
        sampler: gp
        sampler_seed: 0
        scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
        max_concurrent: 1
        """)
    outcome = run_tune(load_tune_spec(spec), tmp_path / "results")
    study = _load(outcome.storage, "synth/tune_synth")
    assert len(study.trials) == 16 and study.trials[0].user_attrs["baseline"]  # the baseline [1, 1, 1] comes first
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    best = [study.best_params[p] for p in PRIORITY_PARAMS]
    for found, true in zip(best, OPTIMUM):
        assert abs(math.log(found / true)) < math.log(1.3), f"best {best} is not near {OPTIMUM}"
    assert study.best_value < 0.1 < study.trials[0].value  # far better than the baseline's [1, 1, 1]
    written = yaml.safe_load((tmp_path / "results" / "synth" / "tune" / BEST_FILE).read_text())
    assert written["tune_synth"]["priorities"] == pytest.approx(best, rel=1e-5)


def test_asha_stops_poor_suggestions_and_the_study_records_them_as_pruned(tmp_path, ray_address):
    """Two epochs: after epoch 1 ASHA (grace 1, rf 2) stops a suggestion worse than the ones
    before it; the study records it PRUNED with its epoch-1 value, not as a finished trial."""
    spec = _synth_spec(tmp_path, "asha", """\
        trials: 4
        sampler: random
        sampler_seed: 0
        scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
        max_concurrent: 1
        """, epochs=2)
    outcome = run_tune(load_tune_spec(spec), tmp_path / "results")
    trials = _load(outcome.storage, "asha/tune_synth").trials
    values = [t.intermediate_values[1] for t in trials]
    states = [t.state.name for t in trials]
    assert "PRUNED" in states and states[0] == "COMPLETE"
    for t, value, state in zip(trials, values, states):
        if state == "PRUNED":
            assert value > min(values[: t.number]), "only a suggestion worse than an earlier one is stopped"
            assert t.value == value and sorted(t.intermediate_values) == [1]
            assert t.user_attrs["ended"] == "stopped by the scheduler after epoch 1"
        else:
            assert sorted(t.intermediate_values) == [1, 2] and t.value == value
    history = pd.read_parquet(tmp_path / "results" / "asha" / "tune" / "history.parquet")
    assert list(history["state"]) == states


def test_cross_task_scores_relative_improvement_over_a_cached_adamw_reference(tmp_path, ray_address, capsys):
    spec = _synth_spec(tmp_path, "xt", """\
        trials: 3
        sampler: random
        sampler_seed: 1
        cross_task: true
        max_concurrent: 1
        """)
    text = spec.read_text().replace("adamw: false", "adamw: true")
    spec.write_text(text)
    out = tmp_path / "results"
    outcome = run_tune(load_tune_spec(spec), out)
    study = _load(outcome.storage, "xt/cross_task")
    assert study.direction.name == "MAXIMIZE" and len(study.trials) == 3
    # AdamW's priorities are the defaults [1, 1, 1], which is also the baseline trial: no improvement
    assert study.trials[0].user_attrs["baseline"] and study.trials[0].value == pytest.approx(0.0, abs=1e-12)
    synth = sys.modules["tune_synth"]
    for t in study.trials[1:]:
        p = [t.params[name] for name in PRIORITY_PARAMS]
        refs = [synth.objective([1, 1, 1], seed) for seed in (0, 1)]
        expected = sum((r - synth.objective(p, seed)) / r for seed, r in enumerate(refs)) / 2
        assert t.value == pytest.approx(expected, rel=1e-6)
    assert (out / "xt" / "tune" / "adamw_reference" / "trials.parquet").exists()
    assert "tune_synth" in yaml.safe_load((out / "xt" / "tune" / BEST_FILE).read_text())
    capsys.readouterr()
    refs = adamw_references(load_tune_spec(spec), out / "xt" / "tune", address=None, ray_storage=None)
    assert "2 already done (reused), 0 to run" in capsys.readouterr().out, "the AdamW reference is computed once"
    assert refs == pytest.approx({"tune_synth/0": synth.objective([1, 1, 1], 0), "tune_synth/1": synth.objective([1, 1, 1], 1)})


# -- (5) two processes extend one stored study at once -----------------------------------------


def test_two_processes_extending_one_study_at_once_leave_it_complete(tmp_path, ray_address):
    spec = _synth_spec(tmp_path, "shared", """\
        trials: 3
        sampler: tpe
        sampler_seed: 0
        max_concurrent: 1
        """)
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ablate.cli", "tune", str(spec), "--out", str(out), "--address", ray_address]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    location = str((out / "shared" / "tune" / "optuna.journal").resolve())
    study = _load(location, "shared/tune_synth")
    trials = study.trials
    # 3 suggestions per process; the first is the baseline's [1, 1, 1], enqueued by the process that found
    # the study empty (both may have, when they start at the same moment)
    assert len(trials) == 6 and sum(bool(t.user_attrs.get("baseline")) for t in trials) in (1, 2)
    proposed = [tuple(t.params.values()) for t in trials if not t.user_attrs.get("baseline")]
    assert len(set(proposed)) == len(proposed), "the two processes never propose the same point"
    drivers = {}
    for t in trials:
        drivers.setdefault(t.user_attrs["driver"], []).append(t)
    assert sorted(len(v) for v in drivers.values()) == [3, 3]
    a, b = drivers.values()
    assert min(t.datetime_start for t in a) < max(t.datetime_complete for t in b) and \
        min(t.datetime_start for t in b) < max(t.datetime_complete for t in a), "the two runs overlapped in time"
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert all(t.value is not None and math.isfinite(t.value) for t in trials)
    assert len({t.user_attrs["ray_trial_id"] for t in trials}) == len(trials)
    # the outputs are complete files whichever process wrote them last
    assert len(pd.read_parquet(out / "shared" / "tune" / "history.parquet")) >= 6
    assert "tune_synth" in yaml.safe_load((out / "shared" / "tune" / BEST_FILE).read_text())


# -- pieces without Ray --------------------------------------------------------------------------


def test_score_aggregates_seeds_and_cross_task_relative_improvements():
    members = [{"task": "a", "seed": 0}, {"task": "a", "seed": 1}, {"task": "b", "seed": 0}, {"task": "b", "seed": 1}]
    assert score([1.0, 3.0], members[:2], "mean") == 2.0
    assert score([1.0, 3.0, 10.0], members[:3], "median") == 3.0
    assert math.isnan(score([1.0, math.nan], members[:2], "mean"))
    refs = {"a/0": 2.0, "a/1": 2.0, "b/0": 0.5, "b/1": 0.5}
    # a (min): 10% and 30% better -> 20%; b (max): 20% better and 0% -> 10%; mean over tasks 15%
    value = score([1.8, 1.4, 0.6, 0.5], members, "mean", refs, {"a": "min", "b": "max"})
    assert value == pytest.approx(0.15)


def test_a_member_that_diverged_has_no_value_so_its_suggestion_fails():
    # its best value from before the divergence is not a result (`ablate run` excludes such a
    # trial as diverged): a finite score would let the suggestion become the best priorities
    from types import SimpleNamespace

    from ablate.tune import _best_so_far

    ok = SimpleNamespace(stop_reason="", best_state={"w": 1}, best_value=0.05)
    diverged = SimpleNamespace(stop_reason="diverged", best_state={"w": 1}, best_value=0.05)
    assert _best_so_far(ok) == 0.05 and math.isnan(_best_so_far(diverged))
    members = [{"task": "a", "seed": 0}, {"task": "a", "seed": 1}]
    assert math.isnan(score([_best_so_far(ok), _best_so_far(diverged)], members, "mean"))


def test_the_history_figure_best_so_far_counts_finished_suggestions_only():
    from ablate.report import tune_best_so_far

    # a pruned suggestion's value is its last intermediate (partial-budget) value, not a result
    h = pd.DataFrame({"number": [0, 1, 2, 3], "value": [0.5, 0.3, 0.45, math.nan],
                      "state": ["COMPLETE", "PRUNED", "COMPLETE", "FAIL"], "direction": "minimize"})
    assert tune_best_so_far(h).tolist() == [0.5, 0.5, 0.45, 0.45]
    assert tune_best_so_far(h.assign(direction="maximize")).tolist() == [0.5, 0.5, 0.5, 0.5]


def test_the_searcher_tells_pruned_failed_and_complete_trials_apart():
    import optuna

    from ablate.tune import OBJECTIVE, _searcher_class

    storage = optuna.storages.InMemoryStorage()
    space = {p: optuna.distributions.FloatDistribution(0.1, 10.0, log=True) for p in PRIORITY_PARAMS}
    searcher = _searcher_class()(space, metric=OBJECTIVE, mode="min", study_name="s", storage=storage)
    for trial_id in ("done", "stopped", "crashed", "diverged", "interrupted", "stopped after diverging"):
        assert set(searcher.suggest(trial_id)) == set(PRIORITY_PARAMS)
    for trial_id in ("done", "stopped", "diverged", "stopped after diverging"):
        searcher.on_trial_result(trial_id, {OBJECTIVE: 2.0, "training_iteration": 1, "final": False})
    searcher.on_trial_complete("done", {OBJECTIVE: 1.5, "training_iteration": 2, "final": True, "epoch": 2,
                                        "member_values": "[1.0, 2.0]"})
    searcher.on_trial_complete("stopped", {OBJECTIVE: 2.0, "training_iteration": 1, "final": False, "epoch": 1})
    searcher.on_trial_complete("crashed", error=True)
    searcher.on_trial_complete("diverged", {OBJECTIVE: math.inf, "objective_is_finite": False, "final": True})
    # ASHA stops a suggestion whose member diverged (its objective reads inf): FAIL, not PRUNED with the
    # intermediate value from before the divergence
    searcher.on_trial_complete("stopped after diverging", {
        OBJECTIVE: math.inf, "objective_is_finite": False, "final": False, "training_iteration": 2, "epoch": 2,
        "member_stops": '["", "diverged"]'})
    assert searcher.fail_unfinished() == 1
    study = optuna.load_study(study_name="s", storage=storage)
    states = {t.user_attrs["ray_trial_id"] if "ray_trial_id" in t.user_attrs else "interrupted": (t.state.name, t.value)
              for t in study.trials}
    assert states == {"done": ("COMPLETE", 1.5), "stopped": ("PRUNED", 2.0), "crashed": ("FAIL", None),
                      "diverged": ("FAIL", None), "interrupted": ("FAIL", None), "stopped after diverging": ("FAIL", None)}
    ended = {t.user_attrs.get("ray_trial_id"): t.user_attrs["ended"] for t in study.trials}
    assert ended["stopped after diverging"] == "no finite value: 1 of 2 member(s) diverged (epoch 2)"


# -- (6) validation ------------------------------------------------------------------------------

BASE = {"name": "t", "tasks": ["etth1"], "seeds": 2, "budget": {"epochs": 2}, "adamw": False}


@pytest.mark.parametrize("tune, expected", [
    ({"sampler": "annealing"}, ["s.yaml: tune.sampler", "'annealing' is not allowed", "tpe, random, cmaes, qmc, gp"]),
    ({"trails": 3}, ["s.yaml: tune.trails", "did you mean 'trials'", "allowed keys: trials, sampler"]),
    ({"trials": -1}, ["tune.trials", "integer >= 0"]),
    ({"trials": 2.5}, ["tune.trials", "integer >= 0"]),
    ({"aggregate": "max"}, ["tune.aggregate", "mean, median"]),
    ({"priorities": {"low": 5, "high": 1}}, ["tune.priorities", "low (5) must be less than high (1)"]),
    ({"priorities": {"low": 0, "high": 1, "log": True}}, ["tune.priorities.low", "> 0 on a log scale"]),
    ({"priorities": {"low": -1, "high": 1}}, ["tune.priorities.low", ">= 0.0"]),
    ({"priorities": {"low": 1, "high": 2, "step": 1}}, ["tune.priorities.step", "allowed keys: low, high, log"]),
    ({"priorities": {"low": 0, "high": 2}}, ["tune.priorities.low", "> 0 on a log scale (log: true, the default)",
                                            "or set log: false"]),
    ({"priorities": [0.1, 10]}, ["tune.priorities", "must be a mapping {low: ..., high: ..., log: true|false}"]),
    ({"params": {"meta_lrr": {"low": 1e-5, "high": 1e-2}}}, ["tune.params.meta_lrr", "did you mean 'meta_lr'",
                                                            "choose from:", "alpha_range"]),
    ({"params": {"grouping": {"low": 1, "high": 2}}}, ["tune.params.grouping", "not a numeric config key"]),
    ({"params": {"meta_lr": {"low": 1e-2, "high": 1e-5}}}, ["tune.params.meta_lr", "must be less than high"]),
    ({"params": {"beta1": {"low": 0.5, "high": 1.5}}}, ["tune.params.beta1.high: 1.5 must be in [0, 1)"]),
    ({"params": {"modulator_layers": {"low": 1.5, "high": 4}}}, ["tune.params.modulator_layers.low", "integer key"]),
    ({"scheduler": {"type": "hyperband"}}, ["tune.scheduler.type", "asha, none"]),
    ({"scheduler": {"grace_period": 0}}, ["tune.scheduler.grace_period", "integer >= 1"]),
    ({"scheduler": {"grace_period": 3}}, ["tune.scheduler.grace_period", "more than the 2 epoch(s) of task 'etth1'"]),
    ({"scheduler": {"reduction_factor": 1}}, ["tune.scheduler.reduction_factor", "number > 1"]),
    ({"scheduler": {"grace_period": 1}}, ["tune.scheduler.grace_period", "within the warm-up of task 'etth1'",
                                          "Use at least 2"]),
    ({"cross_task": "yes"}, ["tune.cross_task", "true or false"]),
    ({"cross_task": True}, ["tune.cross_task", "adamw: false"]),
    ({"max_concurrent": 0}, ["tune.max_concurrent", "integer >= 1"]),
    ({"storage": 3}, ["tune.storage", "journal file path or a database URL"]),
    ({"priorities": False}, ["tune.priorities", "nothing to search"]),
    ("fast", ["s.yaml: tune:", "must be a mapping"]),
    # arm: adamw searches AdamW's own settings
    ({"arm": "sgd"}, ["tune.arm", "'sgd' is not allowed", "baseline, adamw"]),
    ({"arm": "adamw", "params": {"lr": {"low": 1e-4, "high": 1e-2}}}, ["tune.arm: is adamw, but the study has adamw: false"]),
    ({"arm": "adamw"}, ["tune.params: is empty, so arm: adamw has nothing to search", "params: {lr: {low:"]),
    ({"arm": "adamw", "priorities": {"low": 1, "high": 2}, "params": {"lr": {"low": 1e-4, "high": 1e-2}}},
     ["tune.priorities: are MetaAdamW's, and arm: adamw searches AdamW's settings"]),
    ({"arm": "adamw", "params": {"meta_lr": {"low": 1e-5, "high": 1e-2}}},
     ["tune.params.meta_lr: is a MetaAdamW setting, which the AdamW arm does not use"]),
    ({"arm": "adamw", "cross_task": True, "params": {"lr": {"low": 1e-4, "high": 1e-2}}},
     ["tune.cross_task: scores improvements over the AdamW arm, which arm: adamw is searching"]),
    # alternatives: a suggestion would set both, one silently unused, and `ablate run` refuses the best values
    ({"params": {"meta_every": {"low": 2, "high": 8}, "meta_per_epoch": {"low": 1.0, "high": 4.0}}},
     ["tune.params.meta_per_epoch", "and params.meta_every both set the meta-update frequency; search one"]),
])
def test_tune_section_errors_name_the_file_field_and_allowed_values(tune, expected):
    with pytest.raises(StudyError) as err:
        parse_tune_spec({**BASE, "tune": tune}, "s.yaml")
    for fragment in expected:
        assert fragment in str(err.value), f"{fragment!r} not in: {err.value}"


def test_a_tune_spec_refuses_settings_it_cannot_use():
    with pytest.raises(StudyError, match=r"s.yaml: ablations: is not used by `ablate tune`"):
        parse_tune_spec({**BASE, "ablations": {"gating": [True]}}, "s.yaml")
    with pytest.raises(StudyError, match=r"weighting='sum', which ignores the priorities"):
        parse_tune_spec({**BASE, "baseline": {"weighting": "sum"}}, "s.yaml")
    with pytest.raises(StudyError, match=r"s.yaml: budget.epochs"):  # the study part is validated as a study
        parse_tune_spec({**BASE, "budget": {"epochs": 0}}, "s.yaml")
    with pytest.raises(StudyError, match=r"s.yaml: budget.epochs: task 'etth1' trains 1 epoch\(s\), all of them warm-up"):
        parse_tune_spec({**BASE, "budget": {"epochs": 1}}, "s.yaml")
    # searching an AdamW knob: the warm-up epochs differ between suggestions, so ASHA may start at 1
    spec = parse_tune_spec({**BASE, "budget": {"epochs": 1}, "tune": {"priorities": False, "scheduler": {"grace_period": 1},
                                                                       "params": {"lr": {"low": 1e-4, "high": 1e-2}}}}, "s.yaml")
    assert grace_default(build_targets(spec)[0], spec.settings) == 1
    # with priorities: false, other knobs alone may be searched
    spec = parse_tune_spec({**BASE, "tune": {"priorities": False, "params": {"meta_lr": {"low": 1e-5, "high": 1e-3,
                                                                                       "log": True}}}}, "s.yaml")
    assert list(spec.settings.space()) == ["meta_lr"]


def test_a_priority_search_is_refused_only_where_the_priorities_cannot_matter():
    # a weighting of one's own is given the priorities (it was refused as one that "ignores" them);
    # huw_priority on an objective with none of the three terms weighs every term 1.0: all alike
    from metaadamw import OBJECTIVES, WEIGHTINGS
    from metaadamw.objectives import MetaObjective
    from metaadamw.weighting import Sum

    @WEIGHTINGS.register("test_tune_own_weighting")
    class Own(Sum):  # (the sum's arithmetic, under a name of one's own)
        pass

    @OBJECTIVES.register("test_tune_val_only")
    class ValOnly(MetaObjective):
        terms = ("val_loss",)
        needs_val = True

        def __call__(self, q):
            return {"val_loss": q.loss_val_prime}

    try:
        spec = parse_tune_spec({**BASE, "baseline": {"weighting": "test_tune_own_weighting"}}, "s.yaml")
        assert spec.settings.priorities is not None  # (the search goes on)
        with pytest.raises(StudyError, match=r"s.yaml: tune.priorities: the baseline of task 'etth1' uses "
                                             r"objective='test_tune_val_only', whose terms \['val_loss'\] are none of"):
            parse_tune_spec({**BASE, "baseline": {"objective": "test_tune_val_only", "weighting": "huw_priority"}},
                            "s.yaml")
        parse_tune_spec({**BASE, "baseline": {"objective": "test_tune_val_only", "weighting": "test_tune_own_weighting"}},
                        "s.yaml")
    finally:
        WEIGHTINGS.remove("test_tune_own_weighting")
        OBJECTIVES.remove("test_tune_val_only")


def test_defaults_targets_and_storage_location(tmp_path):
    spec = parse_tune_spec({**BASE, "tasks": ["etth1", "imdb"], "adamw": True}, "s.yaml")
    s = spec.settings
    assert (s.trials, s.sampler, s.aggregate, s.max_concurrent, s.cross_task) == (20, "tpe", "mean", 2, False)
    assert s.scheduler == {"type": "asha", "grace_period": None, "reduction_factor": 2}
    targets = build_targets(spec)
    assert [grace_default(t, s) for t in targets] == [2, 2], "the first epoch after the warm-up epoch"
    assert [(t.study_name, t.direction) for t in targets] == [("t/etth1", "minimize"), ("t/imdb", "maximize")]
    assert [m["seed"] for m in targets[1].members] == [0, 1] and targets[1].members[0]["config"]["priorities"] == [1, 3, 5]
    assert storage_location(spec, tmp_path) == str((tmp_path / "t" / "tune" / "optuna.journal").resolve())
    assert storage_location(spec, tmp_path, "sqlite:///x.db") == "sqlite:///x.db"
    cross = parse_tune_spec({**BASE, "tasks": ["etth1", "imdb"], "adamw": True, "tune": {"cross_task": True}}, "s.yaml")
    (target,) = build_targets(cross, {"etth1/0": 1.0})
    assert (target.study_name, target.direction, len(target.members)) == ("t/cross_task", "maximize", 4)


def test_the_shipped_spec_is_valid():
    spec = load_tune_spec(REPO / "search_spaces" / "tune_priorities.yaml")
    assert spec.settings.trials == 20 and len(spec.study.tasks) >= 2 and len(spec.study.seeds) >= 2
    adamw = load_tune_spec(REPO / "search_spaces" / "tune_adamw.yaml")  # the same budget for AdamW's lr
    assert (adamw.settings.arm, list(adamw.settings.space())) == ("adamw", ["lr"])
    for key in ("tasks", "seeds"):
        assert getattr(adamw.study, key) == getattr(spec.study, key)
    assert adamw.settings.trials == spec.settings.trials and adamw.settings.sampler == spec.settings.sampler
    def budgets(s):  # (the searched arm's trials)
        return [(t.task, t.seed, t.config["epochs"], t.config["max_train_batches"], t.config["optimizer"])
                for task in s.study.tasks for t in s.arm_trials(task)]

    assert [b[:-1] for b in budgets(spec)] == [b[:-1] for b in budgets(adamw)]
    assert {b[-1] for b in budgets(spec)} == {"metaadamw"} and {b[-1] for b in budgets(adamw)} == {"adamw"}


def test_arm_adamw_searches_the_adamw_trials_and_writes_their_best_values_for_adamw_tuned_from(tmp_path, ray_address):
    spec_path = _write(tmp_path, "tune_lr.yaml", """\
        name: tune_lr
        tasks: [etth1]
        seeds: 2
        budget: {epochs: 2, max_train_batches: 3, patience: 0}
        adamw: {lr: 1.0e-3}
        tune:
          arm: adamw
          trials: 3
          params: {lr: {low: 1.0e-4, high: 1.0e-2, log: true}}
          scheduler: none
          max_concurrent: 1
        """)
    spec = load_tune_spec(spec_path)
    (target,) = build_targets(spec)
    assert [m["config"]["optimizer"] for m in target.members] == ["adamw", "adamw"]
    assert grace_default(target, spec.settings) == 1  # (an AdamW knob: no warm-up epochs train every suggestion alike)
    outcome = run_tune(spec, tmp_path / "results")
    (o,) = outcome.targets
    assert o.counts == {"COMPLETE": 3}
    # the first suggestion is AdamW's own lr, and its score is what `ablate run` gives its trials: the mean
    # over the seeds of their best validation MSE
    from ablate.trial import run_trial

    own = [run_trial(t.config).best_metric for t in spec.arm_trials("etth1")]
    assert o.baseline_value == pytest.approx(sum(own) / 2, rel=1e-9)
    tune_dir = tmp_path / "results" / "tune_lr" / "tune"
    assert not (tune_dir / BEST_FILE).exists()
    best = yaml.safe_load((tune_dir / "best_adamw.yaml").read_text())
    assert best == {"etth1": {"lr": pytest.approx(o.best_params["lr"], rel=1e-5), "tuned_on_seeds": [0, 1],
                              "tuned_for": "adamw", "tuned_with": {"weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999,
                                                                   "eps": 1e-8, "grad_clip": None,
                                                                   # (and the budget: the best lr depends on it)
                                                                   "epochs": 2, "max_steps": None,
                                                                   "max_train_batches": 3,
                                                                   "batch_size": target.members[0]["config"]["batch_size"],
                                                                   # (early stopping, the data and the task's model)
                                                                   **{k: target.members[0]["config"][k] for k in
                                                                      ("patience", "min_delta", "seq_len", "d_model",
                                                                       "n_layers", "n_heads", "dropout", "pooling",
                                                                       "multivariate", "split", "scaling")},
                                                                   "data": "embedded:statsmodels-elnino"}}}
    assert "adamw: {tuned_from: " in (tune_dir / "best_adamw.yaml").read_text()
    # a study reads them for its AdamW arm (and warns about the seeds they were picked on)
    study = _write(tmp_path, "compare.yaml", """\
        name: compare
        tasks: [etth1]
        seeds: [1, 2]
        adamw: {tuned_from: results/tune_lr/tune/best_adamw.yaml}
        """)
    with pytest.warns(UserWarning, match=r"adamw.tuned_from: AdamW's settings were tuned on .*\(etth1: seed\(s\) 1\); "
                                         r"on those seeds the validation comparison favours AdamW"):
        trials = {(t.arm, t.seed): t.config for t in load_study(study).trials}
    assert trials["adamw", 2]["lr"] == best["etth1"]["lr"] and trials["baseline", 2]["lr"] == 5e-4
    # the AdamW file given to the MetaAdamW baseline (it would have set MetaAdamW's lr without a word)
    wrong = _write(tmp_path, "wrong.yaml", """\
        name: wrong
        tasks: [etth1]
        seeds: [5]
        baseline: {priorities_from: results/tune_lr/tune/best_adamw.yaml}
        """)
    with pytest.raises(StudyError, match=r"holds values `ablate tune` tuned for the 'adamw' arm \(tuned_for: adamw\), "
                                         r"not for the 'baseline' arm that baseline.priorities_from sets; use the file "
                                         r"as adamw: \{tuned_from: FILE\}"):
        load_study(wrong)
    # the same name with the other arm: refused, and the message says why
    other_arm = _write(tmp_path, "tune_lr_baseline.yaml", """\
        name: tune_lr
        tasks: [etth1]
        seeds: 2
        budget: {epochs: 2, max_train_batches: 3, patience: 0}
        adamw: {lr: 1.0e-3}
        tune: {trials: 1, priorities: false, params: {lr: {low: 1.0e-4, high: 1.0e-2, log: true}}}
        """)
    with pytest.raises(StudyError, match=r"scored suggestions differently.*\(tune.arm: stored adamw, now baseline\)"):
        run_tune(load_tune_spec(other_arm), tmp_path / "results")


@pytest.mark.parametrize("adamw, file_text, expected", [
    ({"tuned_from": "best.yaml", "lr": 0.1}, "etth1: {lr: 0.001}\n", ["(best.yaml).etth1", "sets 'lr', which adamw: sets too"]),
    ({"tuned_from": "best.yaml"}, "etth1: {meta_lr: 0.001}\n", ["(best.yaml).etth1.meta_lr", "MetaAdamW setting"]),
    ({"tuned_from": "best.yaml"}, "etth1: [1, 2, 3]\n", ["adamw.tuned_from (best.yaml).etth1", "a mapping of settings such as {lr"]),
    ({"tuned_from": "best.yaml"}, "wikitext2: {lr: 0.001}\n", ["no entry for task 'etth1'", "tune that task too"]),
    ({"tuned_from": "gone.yaml"}, None, ["adamw.tuned_from", "does not exist", "with tune: {arm: adamw}", "best_adamw.yaml"]),
])
def test_adamw_tuned_from_errors(tmp_path, adamw, file_text, expected):
    if file_text is not None:
        (tmp_path / "best.yaml").write_text(file_text)
    with pytest.raises(StudyError) as err:
        parse_study({"name": "s", "tasks": ["etth1"], "seeds": 1, "adamw": adamw}, "s.yaml", base_dir=tmp_path)
    for fragment in expected:
        assert fragment in str(err.value), f"{fragment!r} not in: {err.value}"


# -- baseline: {priorities_from: ...} ---------------------------------------------------------


def test_priorities_tuned_on_the_studys_seeds_warn_unless_overrides_replace_them(tmp_path):
    _write(tmp_path, BEST_FILE, """\
        etth1: {priorities: [2.0, 0.5, 4.0], tuned_on_seeds: [0, 1, 2]}
        imdb: {priorities: [1.0, 2.0, 3.0], tuned_on_seeds: [0, 1, 2]}
        """)
    study = """\
        name: s
        tasks: [etth1, imdb]
        seeds: [2, 7]
        baseline: {{priorities_from: best_priorities.yaml}}
        overrides: {overrides}
        """
    with pytest.warns(UserWarning, match=r"seeds this study runs too \(etth1: seed\(s\) 2\); .*seeds: \[8, 9\]"):
        load_study(_write(tmp_path, "s.yaml", study.format(overrides="{imdb: {priorities: [1, 1, 1]}}")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every task's tuned values replaced: nothing favours the baseline
        load_study(_write(tmp_path, "s.yaml", study.format(
            overrides="{imdb: {priorities: [1, 1, 1]}, etth1: {priorities: [1, 1, 1]}}")))


def test_both_arms_tuned_on_the_studys_seeds_warn_with_seeds_fresh_for_both(tmp_path):
    _write(tmp_path, BEST_FILE, "etth1: {priorities: [2.0, 0.5, 4.0], tuned_on_seeds: [0, 1], tuned_for: baseline}\n")
    _write(tmp_path, "best_adamw.yaml", "etth1: {lr: 0.001, tuned_on_seeds: [0, 1, 2, 3], tuned_for: adamw}\n")
    study = _write(tmp_path, "s.yaml", """\
        name: s
        tasks: [etth1]
        seeds: [0, 1]
        baseline: {priorities_from: best_priorities.yaml}
        adamw: {tuned_from: best_adamw.yaml}
        """)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_study(study)
    said = [str(w.message) for w in caught]
    assert len(said) == 2 and "favours the tuned baseline" in said[0] and "favours AdamW" in said[1]
    assert all("seeds: [4, 5]" in m for m in said), said  # (not [2, 3], where AdamW was tuned)


def test_priorities_from_sets_each_tasks_tuned_values(tmp_path):
    _write(tmp_path / "tuned", BEST_FILE, """\
        etth1: [2.0, 0.5, 4.0]
        imdb: {priorities: [1.0, 2.0, 3.0], meta_lr: 0.001}
        wikitext2: [9, 9, 9]
        """)
    path = _write(tmp_path, "s.yaml", """\
        name: s
        tasks: [etth1, imdb]
        seeds: 1
        baseline: {priorities_from: tuned/best_priorities.yaml, meta_per_epoch: 2}
        overrides: {imdb: {meta_lr: 0.002}}
        ablations: {priorities: [[1, 1, 1]]}
        """)
    trials = {(t.task, t.arm): t.config for t in load_study(path).trials}
    assert trials["etth1", "baseline"]["priorities"] == [2.0, 0.5, 4.0]
    assert trials["imdb", "baseline"]["priorities"] == [1.0, 2.0, 3.0]
    assert trials["imdb", "baseline"]["meta_lr"] == 0.002, "overrides[task] still wins over the file"
    assert trials["etth1", "priorities=[1, 1, 1]"]["priorities"] == [1.0, 1.0, 1.0], "an ablation level wins too"
    assert trials["etth1", "adamw"]["priorities"] == [1.0, 1.0, 1.0], "the AdamW arm does not take the file's values"


@pytest.mark.parametrize("file_text, baseline, expected", [
    (None, "missing.yaml", ["s.yaml: baseline.priorities_from", "missing.yaml' does not exist", "ablate tune"]),
    ("etth1: [1, 2, 3]\n", "best.yaml", ["s.yaml: baseline.priorities_from", "no entry for task 'imdb'",
                                         "it has: etth1"]),
    ("etth1: [1, 2]\nimdb: [1, 2, 3]\n", "best.yaml", ["baseline.priorities_from (best.yaml).etth1.priorities",
                                                       "three non-negative numbers"]),
    ("etth1: 3\nimdb: [1, 2, 3]\n", "best.yaml", ["(best.yaml).etth1", "list of three priorities or a mapping"]),
    ("etth1: {fancy: 1}\nimdb: [1, 2, 3]\n", "best.yaml", ["(best.yaml).etth1.fancy", "unknown config key"]),
    ("[1, 2, 3]\n", "best.yaml", ["must map task names to priorities"]),
    ("etth1: {priorities: [1, 2, 3], tuned_on_seeds: 0-2}\nimdb: [1, 2, 3]\n", "best.yaml",
     ["(best.yaml).etth1.tuned_on_seeds", "must be the list of seeds"]),
    ("etth1: [1, 2, 3\n", "best.yaml", ["best.yaml", "invalid YAML"]),
    ("etth1: [1, 2, 3]\nimdb: [1, 2, 3]\n", 5, ["baseline.priorities_from", "must be the path of a YAML file"]),
])
def test_priorities_from_errors(tmp_path, file_text, baseline, expected):
    if file_text is not None:
        (tmp_path / "best.yaml").write_text(file_text)
    mapping = {"name": "s", "tasks": ["etth1", "imdb"], "seeds": 1, "baseline": {"priorities_from": baseline}}
    with pytest.raises(StudyError) as err:
        parse_study(mapping, "s.yaml", base_dir=tmp_path)
    for fragment in expected:
        assert fragment in str(err.value), f"{fragment!r} not in: {err.value}"


def test_a_task_the_priorities_file_lacks_takes_its_priorities_from_overrides_as_the_error_advises(tmp_path):
    (tmp_path / "best.yaml").write_text("etth1: [1, 2, 3]\n")
    mapping = {"name": "s", "tasks": ["etth1", "imdb"], "seeds": 1, "baseline": {"priorities_from": "best.yaml"},
               "overrides": {"imdb": {"priorities": [4, 5, 6]}}}
    trials = {(t.task, t.arm): t.config for t in parse_study(mapping, "s.yaml", base_dir=tmp_path).trials}
    assert trials["etth1", "baseline"]["priorities"] == [1.0, 2.0, 3.0]
    assert trials["imdb", "baseline"]["priorities"] == [4.0, 5.0, 6.0]
    mapping["overrides"] = {"imdb": {"meta_lr": 0.001}}  # no priorities: still the error
    with pytest.raises(StudyError, match="no entry for task 'imdb'.*or set its priorities under overrides.imdb"):
        parse_study(mapping, "s.yaml", base_dir=tmp_path)


def test_priorities_from_and_priorities_in_baseline_conflict(tmp_path):
    (tmp_path / "best.yaml").write_text("etth1: [1, 2, 3]\n")
    mapping = {"name": "s", "tasks": ["etth1"], "seeds": 1,
               "baseline": {"priorities_from": "best.yaml", "priorities": [1, 1, 1]}}
    with pytest.raises(StudyError, match=r"sets 'priorities', which baseline: sets too"):
        parse_study(mapping, "s.yaml", base_dir=tmp_path)


@pytest.mark.parametrize("low, enqueued", [(0.5, [1.0, 3.0, 5.0]), (2.0, None)])
def test_the_baseline_is_the_first_suggestion_only_when_all_its_values_are_searchable(tmp_path, low, enqueued, capsys):
    # imdb's baseline priorities are [1, 3, 5]: with the range [2, 10] only 3 and 5 are inside, and a
    # trial with those two and a sampled third was reported as "the baseline's own values"
    import optuna

    from ablate.tune import _enqueue_baseline

    path = _write(tmp_path, "imdb_tune.yaml", f"""\
        name: imdb_tune
        tasks: [imdb]
        seeds: 1
        budget: {{epochs: 2}}
        adamw: false
        tune:
          trials: 1
          priorities: {{low: {low}, high: 10.0}}
        """)
    spec = load_tune_spec(path)
    study = optuna.create_study()
    _enqueue_baseline(study, build_targets(spec)[0], spec)
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    if enqueued is None:
        assert waiting == [] and "not all in the search space" in capsys.readouterr().out
    else:
        fixed = waiting[0].system_attrs["fixed_params"] if waiting else {}
        assert len(waiting) == 1 and [fixed[k] for k in PRIORITY_PARAMS] == enqueued
        assert waiting[0].user_attrs["baseline"] is True


def test_a_searched_key_the_baseline_leaves_null_is_not_said_to_be_outside_its_range(tmp_path, capsys):
    # searching meta_every on a baseline that sets meta_per_epoch (tune_priorities.yaml's): its meta_every is null,
    # and the line said "meta_every outside its range" - the task's meta_every (18) is inside [5, 30]
    import optuna

    from ablate.tune import _enqueue_baseline

    path = _write(tmp_path, "freq.yaml", """\
        name: freq
        tasks: [etth1]
        seeds: 1
        budget: {epochs: 2}
        baseline: {meta_per_epoch: 5}
        adamw: false
        tune:
          trials: 1
          params: {meta_every: {low: 5, high: 30}, grad_clip: {low: 0.5, high: 2.0}}
          priorities: {low: 2.0, high: 10.0}
        """)
    spec = load_tune_spec(path)
    study = optuna.create_study()
    _enqueue_baseline(study, build_targets(spec)[0], spec)
    assert study.get_trials() == []
    assert capsys.readouterr().out.strip() == (
        "[etth1] the baseline's values are not all in the search space (p_gen_gap, p_gradient, p_loss_decrease "
        "outside its range; grad_clip is null; meta_every is null: the arm sets meta_per_epoch instead): not "
        "evaluated as a first suggestion")


def _trials_0_spec(tmp_path: Path, tasks: list[str]):
    """A tune spec 't0' over ``tasks``, loaded with ``--trials 0`` (rewrite the outputs of stored studies)."""
    path = _write(tmp_path, "t0.yaml", f"""\
        name: t0
        tasks: [{', '.join(tasks)}]
        seeds: 1
        budget: {{epochs: 2}}
        adamw: false
        tune:
          trials: 1
          priorities: {{low: 0.5, high: 10.0}}
        """)
    return load_tune_spec(path, trials=0)


def test_trials_0_without_a_stored_study_creates_nothing(tmp_path):
    # --trials 0 rewrites the outputs of stored studies; it used to create the study and pin its
    # objective record, so the real spec was refused afterwards as "scored differently"
    import optuna

    spec = _trials_0_spec(tmp_path, ["etth1"])
    with pytest.raises(StudyError, match="--trials 0 only rewrites the outputs of stored studies"):
        run_tune(spec, tmp_path / "out")
    # nor an empty journal file in a new results folder (opening the journal created both)
    assert not (tmp_path / "out").exists()
    location = storage_location(spec, tmp_path / "out", None)
    assert optuna.get_all_study_names(open_storage(location)) == []


def test_trials_0_of_the_study_file_without_a_stored_study_is_named_as_the_files(tmp_path):
    # `trials: 0` in the study file (no --trials) was refused as "--trials 0 only rewrites ...", naming an
    # option the command line did not have
    import optuna

    path = _write(tmp_path, "t0.yaml", """\
        name: t0
        tasks: [etth1]
        seeds: 1
        budget: {epochs: 2}
        adamw: false
        tune:
          trials: 0
          priorities: {low: 0.5, high: 10.0}
        """)
    spec = load_tune_spec(path)
    location = storage_location(spec, tmp_path / "out", None)
    with pytest.raises(StudyError) as raised:
        run_tune(spec, tmp_path / "out")
    assert str(raised.value) == (f"{path}: tune.trials: 0 only rewrites the outputs of stored studies, and 't0/etth1' "
                                 f"has none in {location}; set tune.trials to N, or run with --trials N to start it")
    with pytest.raises(StudyError) as raised:  # (given on the command line: named as such)
        run_tune(load_tune_spec(path, trials=0), tmp_path / "out")
    assert str(raised.value).startswith(f"{path}: --trials 0 only rewrites the outputs of stored studies") and \
        str(raised.value).endswith("; run with --trials N to start it")
    assert optuna.get_all_study_names(open_storage(location)) == []


def test_a_run_without_a_finished_suggestion_sets_an_earlier_runs_best_values_aside(tmp_path):
    # the best-values file was only ever (re)written, never removed: after a search in another study storage
    # (or of other tasks) in which every suggestion failed, the earlier run's file stayed beside the new history,
    # and `ablate run` read its values as this search's best
    import optuna

    from ablate.tune import TuneOutcome, format_summary, open_target_study

    spec = _trials_0_spec(tmp_path, ["etth1"])
    target = build_targets(spec)[0]
    dist = {p: optuna.distributions.FloatDistribution(0.5, 10.0, log=True) for p in PRIORITY_PARAMS}
    out = tmp_path / "out"
    first = open_target_study(target, spec, open_storage(storage_location(spec, out)))
    first.add_trial(optuna.trial.create_trial(params={p: 2.0 for p in PRIORITY_PARAMS}, distributions=dist, value=0.5))
    run_tune(spec, out)
    best_file = out / "t0" / "tune" / BEST_FILE
    assert yaml.safe_load(best_file.read_text())["etth1"]["priorities"] == [2.0, 2.0, 2.0]

    other = str(tmp_path / "other.journal")  # (--study-storage: a new study, each of whose suggestions failed)
    failed = open_target_study(target, spec, open_storage(other))
    failed.add_trial(optuna.trial.create_trial(params={p: 3.0 for p in PRIORITY_PARAMS}, distributions=dist,
                                               state=optuna.trial.TrialState.FAIL, user_attrs={"ended": "error"}))
    outcome = run_tune(spec, out, study_storage=other)
    assert not best_file.exists(), "no best values in this run's stored study: none left from the earlier one"
    stale = best_file.with_name(BEST_FILE + ".stale")  # (set aside, not lost)
    assert outcome.files["best_set_aside"] == stale and "best" not in outcome.files
    assert yaml.safe_load(stale.read_text())["etth1"]["priorities"] == [2.0, 2.0, 2.0]
    assert list(pd.read_parquet(out / "t0" / "tune" / "history.parquet")["state"]) == ["FAIL"]
    summary = format_summary(outcome)
    assert (f"no best values: no target of this run has a finished suggestion in {other}; the earlier run's "
            f"{BEST_FILE} (of other tasks or another study storage), which `ablate run` would have read as this "
            f"search's, is set aside as {stale}") in summary
    assert "best values: " not in summary.replace("no best values: ", "")
    assert isinstance(outcome, TuneOutcome) and outcome.targets[0].best_number is None

    again = run_tune(spec, out, study_storage=other)  # (and again: nothing left to remove, nothing said)
    assert "best_set_aside" not in again.files and "no best values" not in format_summary(again)
    assert yaml.safe_load(stale.read_text())["etth1"]["priorities"] == [2.0, 2.0, 2.0]

    # a second file set aside keeps the first: .stale.1 (Path.replace onto .stale overwrote it)
    run_tune(spec, out)
    assert yaml.safe_load(best_file.read_text())["etth1"]["priorities"] == [2.0, 2.0, 2.0]
    best_file.write_text(best_file.read_text().replace("2.0", "4.0"))  # (another earlier run's values)
    third = run_tune(spec, out, study_storage=other)
    assert third.files["best_set_aside"] == stale.with_name(BEST_FILE + ".stale.1") and not best_file.exists()
    assert yaml.safe_load(stale.read_text())["etth1"]["priorities"] == [2.0, 2.0, 2.0]
    assert yaml.safe_load(third.files["best_set_aside"].read_text())["etth1"]["priorities"] == [4.0, 4.0, 4.0]
    assert f"the earlier run's {BEST_FILE} (of" in format_summary(third)


# -- (7) interrupted, killed and failed runs leave a study that the next run continues correctly -----


def _tiny_spec(tmp_path: Path, name: str = "t1", epochs: int = 3, tasks: str = "[etth1]", extra: str = "") -> Path:
    return _write(tmp_path, f"{name}.yaml", f"""\
        name: {name}
        tasks: {tasks}
        seeds: 1
        budget: {{epochs: {epochs}}}
        adamw: {'true' if 'cross_task' in extra else 'false'}
        tune:
          trials: 1
          priorities: {{low: 0.5, high: 10.0, log: true}}
        """ + textwrap.indent(extra, "  "))


def test_a_start_that_fails_before_any_suggestion_pins_nothing(tmp_path, monkeypatch):
    # every stored study used to be created and pinned to the spec before the resource check, so a
    # start refused for its resources locked the (empty) study to that spec
    import optuna

    import ablate.cluster

    monkeypatch.setattr(ablate.cluster, "_running_ray", lambda: False)  # (this machine's CPUs, not a Ray left running)

    from ablate.tune import open_target_study

    path = _tiny_spec(tmp_path)
    path.write_text(path.read_text().replace("adamw: false", "adamw: false\nresources: {cpus: 4096}"))
    from ablate.config import ConfigError

    with pytest.raises(ConfigError, match="resources.cpus=4096"):
        run_tune(load_tune_spec(path), tmp_path / "out")
    storage = open_storage(storage_location(load_tune_spec(path), tmp_path / "out", None))
    assert optuna.get_all_study_names(storage) == []
    # a study pinned by an older version, still without trials, takes the new spec; one with trials does not
    spec3, spec4 = (load_tune_spec(_tiny_spec(tmp_path / f"e{e}", epochs=e)) for e in (3, 4))
    target3, target4 = build_targets(spec3)[0], build_targets(spec4)[0]
    open_target_study(target3, spec3, storage)
    study = open_target_study(target4, spec4, storage)
    assert study.user_attrs["ablate_objective"]["members"][0]["config"]["epochs"] == 4
    study.add_trial(optuna.trial.create_trial(
        params={p: 1.0 for p in PRIORITY_PARAMS}, value=0.5,
        distributions={p: spec4.settings.priorities.distribution() for p in PRIORITY_PARAMS}))
    with pytest.raises(StudyError, match=r"scored suggestions differently.*epochs \(stored 4, now 3\)"):
        open_target_study(target3, spec3, storage)


def test_an_empty_study_pinned_by_a_live_process_is_not_repinned(tmp_path):
    # another `ablate tune` may have pinned it and be starting Ray: re-pinning would mix two objectives
    import optuna

    from ablate.tune import DRIVER_ID, _process_start, open_target_study

    spec3, spec4 = (load_tune_spec(_tiny_spec(tmp_path / f"e{e}", epochs=e)) for e in (3, 4))
    storage = optuna.storages.InMemoryStorage()
    study = open_target_study(build_targets(spec3)[0], spec3, storage)
    parent = os.getppid()
    study.set_user_attr("pinned_by", {**DRIVER_ID, "pid": parent, "start": _process_start(parent)})
    with pytest.raises(StudyError, match=r"scored suggestions differently.*epochs \(stored 3, now 4\)"):
        open_target_study(build_targets(spec4)[0], spec4, storage)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study.set_user_attr("pinned_by", {**DRIVER_ID, "pid": dead.pid, "start": None})
    repinned = open_target_study(build_targets(spec4)[0], spec4, storage)
    assert repinned.user_attrs["ablate_objective"]["members"][0]["config"]["epochs"] == 4
    assert repinned.user_attrs["pinned_by"] == DRIVER_ID


def test_a_range_whose_log_scale_changed_is_refused_before_anything_runs(tmp_path):
    # Optuna refuses to mix log and linear scales of one parameter: it crashed mid-run, after Ray
    # had started, and left a trial RUNNING in the study for good
    import optuna

    from ablate.tune import check_target_study, open_target_study

    spec = load_tune_spec(_tiny_spec(tmp_path))
    storage = open_storage(storage_location(spec, tmp_path / "out", None))
    study = open_target_study(build_targets(spec)[0], spec, storage)
    study.add_trial(optuna.trial.create_trial(
        params={p: 2.0 for p in PRIORITY_PARAMS}, value=0.5,
        distributions={p: spec.settings.priorities.distribution() for p in PRIORITY_PARAMS}))
    linear_path = _tiny_spec(tmp_path / "lin")
    linear_path.write_text(linear_path.read_text().replace("log: true", "log: false"))
    linear = load_tune_spec(linear_path)
    with pytest.raises(StudyError, match=r"p_\w+ is searched on a linear scale.*searched it on a log scale.*trial #0"):
        check_target_study(build_targets(linear)[0], linear, storage)
    narrower_path = _tiny_spec(tmp_path / "narrow")
    narrower_path.write_text(narrower_path.read_text().replace("high: 10.0", "high: 4.0"))
    narrower = load_tune_spec(narrower_path)  # a new range on the same scale is fine
    check_target_study(build_targets(narrower)[0], narrower, storage)


def test_a_scale_change_names_where_to_write_log_and_its_default_there(tmp_path):
    # the error said "restore the log scale" without saying how: log left out is true for tune.priorities but
    # false for tune.params, so a params range written like a priorities range changed the scale unseen
    import optuna

    from ablate.tune import check_target_study, open_target_study

    spec = load_tune_spec(_tiny_spec(tmp_path, extra="params: {meta_lr: {low: 1.0e-4, high: 1.0e-2, log: true}}\n"))
    storage = open_storage(storage_location(spec, tmp_path / "out", None))
    study = open_target_study(build_targets(spec)[0], spec, storage)
    space = spec.settings.space()
    study.add_trial(optuna.trial.create_trial(params={**{p: 2.0 for p in PRIORITY_PARAMS}, "meta_lr": 1e-3}, value=0.5,
                                              distributions={n: r.distribution() for n, r in space.items()}))
    for i, (old, new, said) in enumerate((
            ("log: true}}", "}}", "restore the log scale (its range may change: write log: true in tune.params.meta_lr, "
                                  "where log left out is false)"),
            ("high: 10.0, log: true}", "high: 10.0, log: false}", "restore the log scale (its range may change: write "
                                                                  "log: true in tune.priorities, where log left out is "
                                                                  "true)"))):
        path = _tiny_spec(tmp_path / f"changed{i}", extra="params: {meta_lr: {low: 1.0e-4, high: 1.0e-2, log: true}}\n")
        path.write_text(path.read_text().replace(old, new))
        changed = load_tune_spec(path)
        with pytest.raises(StudyError) as info:
            check_target_study(build_targets(changed)[0], changed, storage)
        assert said in str(info.value)


def test_a_wide_params_range_without_log_is_warned_that_it_is_searched_linearly():
    # tune.priorities default to a log scale, tune.params to a linear one: {meta_lr: {low: 1.0e-6, high: 1.0e-1}}
    # was searched linearly without a word (nearly every suggestion above 1e-2)
    def said(tune: dict) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            parse_tune_spec({**BASE, "tune": tune}, "s.yaml")
        return [str(w.message) for w in caught if "tune." in str(w.message)]

    (message,) = said({"params": {"meta_lr": {"low": 1e-6, "high": 1e-1}}})
    assert message == ("s.yaml: tune.params.meta_lr: {low: 1e-06, high: 0.1} spans 5.0 orders of magnitude on a linear "
                       "scale (log left out is false for tune.params, unlike tune.priorities), so 90% of the "
                       "suggestions fall above 0.01; set log: true to search it on a log scale, or log: false to keep "
                       "the linear one")
    assert said({"params": {"meta_lr": {"low": 1e-6, "high": 1e-1, "log": True}}}) == []
    assert said({"params": {"meta_lr": {"low": 1e-6, "high": 1e-1, "log": False}}}) == []  # (linear, on purpose)
    assert said({"params": {"alpha_range": {"low": 0.5, "high": 2.0}}}) == []  # (a narrow range: linear is fine)
    assert said({"priorities": {"low": 0.01, "high": 10.0}}) == []  # (the priorities' own default: log)
    # a priorities range that log (its default) refuses says where the log came from
    with pytest.raises(StudyError, match=re.escape("tune.priorities.low: must be > 0 on a log scale (log: true, the "
                                                   "default), got 0 (tune.priorities takes the keys left out from "
                                                   "{low: 0.1, high: 10.0, log: true}); or set log: false")):
        said({"priorities": {"low": 0, "high": 2}})


def test_suggestions_left_running_by_a_killed_process_of_this_machine_are_failed(tmp_path):
    # a journal storage has no heartbeat: after kill -9 the trials stayed RUNNING forever
    import optuna

    from ablate.tune import DRIVER_ID, _process_start, fail_orphans

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent = os.getppid()
    here = {"host": DRIVER_ID["host"], "pidns": DRIVER_ID["pidns"]}
    drivers = {
        "dead": {**here, "pid": dead.pid, "start": None},
        "alive": {**here, "pid": parent, "start": _process_start(parent)},
        # the pid now belongs to a process that started later than the trial's driver: that one is gone
        "reused pid": {**here, "pid": parent, "start": "1"},
        # a container with the same host name: its pids are not this machine's to look up
        "other pid namespace": {**here, "pid": dead.pid, "pidns": "pid:[1]", "start": None},
        "elsewhere": {**here, "host": "another-host", "pid": dead.pid, "start": None},
        "this process": dict(DRIVER_ID), "unknown": None,
    }
    study = optuna.create_study(storage=open_storage(str(tmp_path / "j.journal")), study_name="s")
    for label, driver in drivers.items():
        trial = study.ask()
        trial.set_user_attr("label", label)
        if driver:
            trial.set_user_attr("driver", f"{driver['host']}:{driver['pid']}")
            trial.set_user_attr("driver_id", driver)
    assert fail_orphans(study) == (2, 5)
    states = {t.user_attrs["label"]: (t.state.name, t.user_attrs.get("ended", "")) for t in study.get_trials()}
    assert states["dead"] == ("FAIL", f"interrupted: its process {DRIVER_ID['host']}:{dead.pid} ended without "
                                      f"recording it")
    assert states["reused pid"][0] == "FAIL"
    assert all(states[k] == ("RUNNING", "") for k in ("alive", "other pid namespace", "elsewhere", "this process",
                                                       "unknown"))


def test_the_searcher_records_which_process_asked_for_each_suggestion():
    import optuna

    from ablate.tune import DRIVER, OBJECTIVE, _searcher_class

    storage = optuna.storages.InMemoryStorage()
    space = {p: optuna.distributions.FloatDistribution(0.1, 10.0, log=True) for p in PRIORITY_PARAMS}
    searcher = _searcher_class()(space, metric=OBJECTIVE, mode="min", study_name="s", storage=storage)
    searcher.suggest("a")
    running = optuna.load_study(study_name="s", storage=storage).trials[0]
    assert running.state.name == "RUNNING" and running.user_attrs["driver"] == DRIVER == f"{os.uname().nodename}:{os.getpid()}"
    assert running.user_attrs["driver_id"]["pid"] == os.getpid() and running.user_attrs["driver_id"]["start"]


@pytest.mark.parametrize("state, ended, evaluated", [
    ("COMPLETE", "complete", True), ("PRUNED", "stopped by the scheduler after epoch 2", True),
    ("WAITING", None, True), ("RUNNING", None, True), ("FAIL", "no finite value: 1 of 2 member(s) diverged (epoch 2)", True),
    ("FAIL", "error", False), ("FAIL", "interrupted", False),
])
def test_a_baseline_that_was_interrupted_or_crashed_is_evaluated_again(state, ended, evaluated):
    # it was enqueued only into an empty study: a Ctrl-C during the baseline (stored as FAIL) meant the
    # baseline was never evaluated, against the promise that the best found is never worse than it
    import optuna

    from ablate.tune import _baselines_evaluated

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(params={"p_gradient": 3.0}, value=1.0, distributions={
        "p_gradient": optuna.distributions.FloatDistribution(0.1, 10.0)}))  # an ordinary suggestion
    study.enqueue_trial({"p_gradient": 2.0}, user_attrs={"baseline": True, "baseline_of": ["etth1"]})
    if state != "WAITING":
        trial = study.ask()  # the enqueued baseline
        if ended:
            trial.set_user_attr("ended", ended)
        if state != "RUNNING":
            study.tell(trial, 1.0 if state == "COMPLETE" else None, state=getattr(optuna.trial.TrialState, state))
    assert _baselines_evaluated(study) == ({("etth1",)} if evaluated else set())


def test_each_cross_task_starting_point_is_evaluated_again_only_when_it_was_lost(tmp_path, capsys):
    # one starting point completing used to hide another that was cut off
    import optuna

    from ablate.tune import _baselines_evaluated, _enqueue_baseline

    spec = load_tune_spec(_tiny_spec(tmp_path, tasks="[etth1, imdb]", extra="cross_task: true\n"))
    target = build_targets(spec, {"etth1/0": 1.0, "imdb/0": 1.0})[0]
    study = optuna.create_study(direction="maximize")
    _enqueue_baseline(study, target, spec)
    first, second = study.ask(), study.ask()
    study.tell(first, 0.01)
    second.set_user_attr("ended", "interrupted")
    study.tell(second, None, state=optuna.trial.TrialState.FAIL)
    assert _baselines_evaluated(study) == {("etth1",)}
    _enqueue_baseline(study, target, spec, _baselines_evaluated(study))
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [(w.user_attrs["baseline_of"], [w.system_attrs["fixed_params"][p] for p in PRIORITY_PARAMS])
            for w in waiting] == [(["imdb"], [1.0, 3.0, 5.0])]
    legacy = optuna.create_study()  # a baseline stored by an older version (no baseline_of): done for every task
    legacy.enqueue_trial({"p_gradient": 1.0}, user_attrs={"baseline": True})
    assert _baselines_evaluated(legacy) == {("*",)}
    _enqueue_baseline(legacy, target, spec, {("*",)})
    assert len(legacy.trials) == 1


def test_the_baseline_is_evaluated_by_the_run_after_one_that_lost_it(tmp_path, ray_address, capsys):
    import optuna

    from ablate.tune import open_target_study

    spec_path = _synth_spec(tmp_path, "lost", """\
        trials: 1
        sampler: random
        priorities: {low: 0.5, high: 10.0, log: true}
        scheduler: none
        max_concurrent: 1
        """)
    spec = load_tune_spec(spec_path)
    out = tmp_path / "results"
    storage = open_storage(storage_location(spec, out, None))
    study = open_target_study(build_targets(spec)[0], spec, storage)
    study.enqueue_trial({p: 1.0 for p in PRIORITY_PARAMS}, user_attrs={"baseline": True, "baseline_of": ["tune_synth"]})
    lost = study.ask({p: spec.settings.priorities.distribution() for p in PRIORITY_PARAMS})
    lost.set_user_attr("ended", "error")  # Ctrl-C killed its worker
    study.tell(lost, None, state=optuna.trial.TrialState.FAIL)
    foreign = out / "lost" / "tune" / "ray" / "tune_synth-20260101-000000-1"  # another process's run
    foreign.mkdir(parents=True)
    outcome = run_tune(spec, out)
    trials = _load(outcome.storage, "lost/tune_synth").trials
    assert len(trials) == 2 and trials[1].state.name == "COMPLETE"
    assert [trials[1].params[p] for p in PRIORITY_PARAMS] == [1.0, 1.0, 1.0] and trials[1].user_attrs["baseline"]
    synth = sys.modules["tune_synth"]
    assert outcome.targets[0].baseline_value == pytest.approx((synth.objective([1, 1, 1], 0) + synth.objective([1, 1, 1], 1)) / 2)
    assert list((out / "lost" / "tune" / "ray").glob("tune_synth-*")) == [foreign], \
        "this run's Ray directory is deleted once it is recorded; another process's is left alone"


def test_a_baseline_whose_values_the_spec_changed_is_evaluated_again_and_its_old_score_is_not_its_own(tmp_path, capsys):
    # the searched keys are no part of what a stored study's values mean, so a spec may change the baseline's
    # priorities and extend the study; the baseline suggestion of the first run (other values) still counted as
    # evaluated, so the new values were never tried, and its score was reported - and preferred on a tie - as
    # "the baseline's own values"
    import optuna

    from ablate.tune import (_baselines_evaluated, _baseline_vectors, _best, _enqueue_baseline,
                             format_summary, open_target_study, own_values)

    first = load_tune_spec(_tiny_spec(tmp_path, "own"), trials=0)
    out = tmp_path / "out"
    storage = open_storage(storage_location(first, out))
    study = open_target_study(build_targets(first)[0], first, storage)
    space = {p: first.settings.priorities.distribution() for p in PRIORITY_PARAMS}  # (as Ray's OptunaSearch asks)
    _enqueue_baseline(study, build_targets(first)[0], first)
    study.tell(study.ask(space), 0.5)  # [1, 1, 1], the first spec's baseline
    study.tell(study.ask(space), 0.5 - 1e-9)  # better by float rounding: a tie

    path = _tiny_spec(tmp_path, "own")
    path.write_text(path.read_text().replace("adamw: false", "adamw: false\nbaseline: {priorities: [2.0, 3.0, 4.0]}"))
    spec = load_tune_spec(path, trials=0)
    target = build_targets(spec)[0]
    own = own_values(target, spec)
    assert own == {"p_gradient": 2.0, "p_loss_decrease": 3.0, "p_gen_gap": 4.0}
    current = {tuple(tasks): params for params, tasks in _baseline_vectors(target, spec.settings.space())}
    assert _baselines_evaluated(study) == {("etth1",)} and _baselines_evaluated(study, current) == set()
    assert _best(study, own).number == 1, "a tie with other values than the arm's own is no reason to keep them"
    assert _best(study, own_values(build_targets(first)[0], first)).number == 0  # (the first spec's: kept)

    outcome = run_tune(spec, out)  # (--trials 0: the summary and the outputs of the stored study)
    text = format_summary(outcome)
    assert outcome.targets[0].baseline_value is None and "baseline's own values" not in text
    assert outcome.targets[0].best_number == 1
    history = pd.read_parquet(out / "own" / "tune" / "history.parquet")
    assert list(history["baseline"]) == [False, False] and list(history["chosen"]) == [False, True]

    _enqueue_baseline(study, target, spec, _baselines_evaluated(study, current))  # (as a run with trials does)
    assert study.get_trials(states=(optuna.trial.TrialState.WAITING,))[0].system_attrs["fixed_params"] == own
    trial = study.ask(space)
    assert trial.user_attrs["baseline"] and trial.params == own
    study.tell(trial, 0.4)
    assert _baselines_evaluated(study, current) == {("etth1",)}
    outcome = run_tune(spec, out)
    assert outcome.targets[0].baseline_value == 0.4 and "the baseline's own values scored 0.4" in format_summary(outcome)
    assert list(pd.read_parquet(out / "own" / "tune" / "history.parquet")["baseline"]) == [False, False, True]


def test_an_older_versions_baseline_of_other_values_does_not_stand_for_the_new_values(tmp_path):
    # a baseline recorded without its tasks (an older version: ("*",), every task's) counted as evaluated
    # whatever its values, so after the spec changed the baseline's values they were never enqueued, while
    # the old suggestion was no longer reported as the arm's own either
    import optuna

    from ablate.tune import _baselines_evaluated, _baseline_vectors, _enqueue_baseline, open_target_study, own_values

    path = _tiny_spec(tmp_path, "legacy")
    path.write_text(path.read_text().replace("adamw: false", "adamw: false\nbaseline: {priorities: [2.0, 3.0, 4.0]}"))
    spec = load_tune_spec(path, trials=0)
    target = build_targets(spec)[0]
    study = open_target_study(target, spec, open_storage(storage_location(spec, tmp_path / "out")))
    dist = {p: spec.settings.priorities.distribution() for p in PRIORITY_PARAMS}
    study.add_trial(optuna.trial.create_trial(params={p: 1.0 for p in PRIORITY_PARAMS}, distributions=dist, value=0.5,
                                              user_attrs={"baseline": True}))  # (no baseline_of)
    current = {tuple(tasks): params for params, tasks in _baseline_vectors(target, spec.settings.space())}
    assert _baselines_evaluated(study) == {("*",)} and _baselines_evaluated(study, current) == set()
    _enqueue_baseline(study, target, spec, _baselines_evaluated(study, current))
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].system_attrs["fixed_params"] == own_values(target, spec) == \
        {"p_gradient": 2.0, "p_loss_decrease": 3.0, "p_gen_gap": 4.0}
    assert _baselines_evaluated(study, current) == {("etth1",)}  # (queued: not enqueued twice)
    # the older baseline of the values the spec still gives: evaluated, as before
    same = {tuple(tasks): {p: 1 for p in PRIORITY_PARAMS} for tasks in current}
    assert _baselines_evaluated(study, same) == {("*",)}


def test_a_finished_tune_leaves_no_empty_ray_folder(tmp_path, ray_address):
    # this run's Ray directory was deleted once recorded, and the then empty OUT/<name>/tune/ray stayed behind
    spec = load_tune_spec(_synth_spec(tmp_path, "tidy", """\
        trials: 1
        sampler: random
        scheduler: none
        max_concurrent: 1
        """))
    out = tmp_path / "results"
    outcome = run_tune(spec, out)
    assert len(_load(outcome.storage, "tidy/tune_synth").trials) == 1
    tune_dir = out / "tidy" / "tune"
    assert tune_dir.is_dir() and not (tune_dir / "ray").exists(), sorted(p.name for p in tune_dir.iterdir())


def test_cross_task_baselines_that_differ_are_starting_points_not_the_baseline(tmp_path, capsys):
    import optuna

    from ablate.tune import _enqueue_baseline, _target_outcome, format_summary, TuneOutcome

    spec = load_tune_spec(_tiny_spec(tmp_path, tasks="[etth1, imdb]", extra="cross_task: true\n"))
    target = build_targets(spec, {"etth1/0": 1.0, "imdb/0": 1.0})[0]
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name=target.study_name, storage=storage, direction="maximize")
    _enqueue_baseline(study, target, spec)
    assert "the tasks' baselines differ (etth1: priorities=[1, 1, 1]; imdb: priorities=[1, 3, 5])" in capsys.readouterr().out
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [(w.user_attrs["baseline"], w.user_attrs["baseline_of"], [w.system_attrs["fixed_params"][p] for p in PRIORITY_PARAMS])
            for w in waiting] == [(False, ["etth1"], [1.0, 1.0, 1.0]), (False, ["imdb"], [1.0, 3.0, 5.0])]
    for value in (0.02, -0.01):
        study.tell(study.ask(), value)
    outcome = _target_outcome(target, storage, 2)
    assert outcome.baseline_value is None
    text = format_summary(TuneOutcome(tmp_path, "mem", [outcome], {"history": "h", "importances": "i"}))
    assert "baseline's own values" not in text
    assert "starting point: the baseline values of etth1, applied to every task, scored 0.02" in text
    assert "starting point: the baseline values of imdb, applied to every task, scored -0.01" in text


def test_searching_warmup_epochs_up_to_the_epochs_is_refused():
    with pytest.raises(StudyError, match=r"tune.params.warmup_epochs: reaches 3, but task 'etth1' trains 3 epoch"):
        parse_tune_spec({**BASE, "budget": {"epochs": 3}, "tune": {"params": {"warmup_epochs": {"low": 0, "high": 3}}}},
                        "s.yaml")
    spec = parse_tune_spec({**BASE, "budget": {"epochs": 3}, "tune": {"params": {"warmup_epochs": {"low": 0, "high": 2}}}},
                           "s.yaml")
    assert spec.settings.params["warmup_epochs"].high == 2


def test_ctrl_c_during_the_cross_task_adamw_reference_exits_130_with_the_continue_command(tmp_path, monkeypatch, capsys):
    import argparse

    import ablate.sweep
    import ablate.tune as tune_mod
    from ablate.sweep import SweepOutcome

    spec_path = _tiny_spec(tmp_path, tasks="[etth1]", extra="cross_task: true\n")
    monkeypatch.setattr(ablate.sweep, "run_study", lambda study, out, **kw: SweepOutcome(out, 0, 0, 0, None, unfinished=1))
    with pytest.raises(tune_mod.ReferenceInterrupted, match="1 of the AdamW reference's trials did not finish"):
        adamw_references(load_tune_spec(spec_path), tmp_path / "out", address=None, ray_storage=None)

    def interrupted(*args, **kwargs):
        raise tune_mod.ReferenceInterrupted("1 of the AdamW reference's trials did not finish")

    monkeypatch.setattr(tune_mod, "run_tune", interrupted)
    args = argparse.Namespace(command="tune", spec=str(spec_path), out=str(tmp_path / "out"), trials=None, address=None,
                              storage=None, study_storage=None)
    assert tune_mod.tune_command(args) == 130
    printed = capsys.readouterr().out
    assert "interrupted during the cross-task AdamW reference" in printed and f"ablate tune {spec_path}" in printed


# -- (8) a run interrupted before some targets started, refused runs, failed searches, reports ---------


def _no_ray(monkeypatch):
    import ablate.cluster

    monkeypatch.setattr(ablate.cluster, "check_resources", lambda *a, **k: None)
    monkeypatch.setattr(ablate.cluster, "init_ray", lambda *a, **k: False)


def _cut_short(finished: int, unfinished: int):
    """A stand-in for ``ablate.tune._run_target``: the target's stored study is made, then the search
    is interrupted with ``finished`` suggestions finished and ``unfinished`` cut off."""
    import ablate.tune as tune_mod

    def run_target(target, spec, storage, trials, out_dir, ray_storage, stopped=None):
        tune_mod.open_target_study(target, spec, storage)
        return finished, unfinished

    return run_target


def _tune_args(spec_path: Path, out: Path):
    import argparse

    return argparse.Namespace(command="tune", spec=str(spec_path), out=str(out), trials=None, address=None,
                              storage=None, study_storage=None)


def test_ctrl_c_in_the_first_target_of_a_first_run_names_the_targets_that_did_not_start(tmp_path, monkeypatch, capsys):
    # the second target's stored study did not exist yet: summarising it raised KeyError (exit 1, a traceback)
    import ablate.tune as tune_mod

    _no_ray(monkeypatch)

    monkeypatch.setattr(tune_mod, "_run_target", _cut_short(0, 1))  # no suggestion finished, one cut off
    spec_path = _tiny_spec(tmp_path, tasks="[etth1, imdb]")
    assert tune_mod.tune_command(_tune_args(spec_path, tmp_path / "out")) == 130
    printed = capsys.readouterr().out
    assert "imdb: minimize" not in printed and "its search has not started" in printed
    assert "interrupted during etth1 after 0 of 1 suggestion(s)" in printed and "the searches of imdb did not start" in printed
    assert (tmp_path / "out" / "t1" / "tune" / "history.parquet").exists()
    # the report names both targets (a target without stored suggestions had no row at all)
    from ablate.report import write_report

    report = write_report(tmp_path / "out" / "t1", formats=("md",)).read_text()
    for task in ("etth1", "imdb"):
        assert f"| {task} | 0 | 0 | 0 | 0 | 0 | no suggestion stored |" in report, report


def test_ctrl_c_that_ray_tune_catches_between_two_suggestions_exits_130_and_starts_no_other_search(
        tmp_path, monkeypatch, capsys):
    # Ray Tune's fit() catches Ctrl-C and returns; when no suggestion was running at that moment nothing was
    # marked FAIL, and the run went on as if complete: the next target's search started, and the exit was 0
    import ray.tune

    import ablate.tune as tune_mod

    _no_ray(monkeypatch)
    fits = []

    class CutShort:  # what fit() does when the Ctrl-C comes before (or between) the suggestions: returns
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            fits.append(1)

    monkeypatch.setattr(ray.tune, "Tuner", CutShort)
    spec_path = _tiny_spec(tmp_path, tasks="[etth1, imdb]")
    assert tune_mod.tune_command(_tune_args(spec_path, tmp_path / "out")) == 130
    printed = capsys.readouterr().out
    assert len(fits) == 1, "the second target's search did not start"
    assert "[etth1] stopped after 0 of 1 suggestion(s)" in printed
    assert "interrupted during etth1 after 0 of 1 suggestion(s)" in printed and "the searches of imdb did not start" in printed


def test_a_search_with_no_finished_suggestion_exits_1(tmp_path, monkeypatch, capsys):
    # `ablate tune ... && ablate run ...` must stop when there are no best values to run with
    import ablate.tune as tune_mod

    _no_ray(monkeypatch)

    def all_failed(target, spec, storage, trials, out_dir, ray_storage, stopped=None):
        import optuna

        study = tune_mod.open_target_study(target, spec, storage)
        trial = study.ask()
        trial.set_user_attr("ended", "no finite value: 1 of 1 member(s) diverged (epoch 1)")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return 1, 0

    monkeypatch.setattr(tune_mod, "_run_target", all_failed)
    assert tune_mod.tune_command(_tune_args(_tiny_spec(tmp_path), tmp_path / "out")) == 1
    captured = capsys.readouterr()
    assert "1 trials (1 fail)" in captured.out
    assert "ablate: error: no suggestion of etth1 has finished" in captured.err
    assert not (tmp_path / "out" / "t1" / "tune" / BEST_FILE).exists()
    # the report lists the failed suggestion and why, instead of an empty plot
    from ablate.report import write_report

    report = write_report(tmp_path / "out" / "t1", formats=("md",)).read_text()
    assert "none finished" in report and "no finite value: 1 of 1 member(s) diverged (epoch 1)" in report


def test_the_adamw_reference_error_goes_to_stderr(tmp_path, monkeypatch, capsys):
    import ablate.tune as tune_mod

    def failing(*args, **kwargs):
        raise tune_mod.AdamWReferenceError("the AdamW reference of etth1 failed")

    monkeypatch.setattr(tune_mod, "run_tune", failing)
    assert tune_mod.tune_command(_tune_args(_tiny_spec(tmp_path), tmp_path / "out")) == 1
    captured = capsys.readouterr()
    assert "ablate: error: the AdamW reference of etth1 failed" in captured.err and "ablate: error" not in captured.out


def test_missing_real_data_and_a_refused_spec_stop_before_ray_and_keep_the_stored_spec(tmp_path, monkeypatch):
    import ablate.cluster
    from ablate.config import ConfigError
    from ablate.tasks import DatasetNotFoundError

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(ablate.cluster, "init_ray", no_ray)
    real = _tiny_spec(tmp_path / "real", extra="")
    real.write_text(real.read_text().replace("adamw: false", f"adamw: false\ndata: real\ndata_dir: {tmp_path / 'none'}"))
    with pytest.raises(DatasetNotFoundError, match="data directory .*none .*does not exist"):
        run_tune(load_tune_spec(real), tmp_path / "out")
    stored = tmp_path / "out" / "t1" / "tune" / "spec.yaml"
    assert not stored.exists()  # (written once the spec is accepted)
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_text("the spec as run before")
    refused = _tiny_spec(tmp_path / "big")
    refused.write_text(refused.read_text().replace("adamw: false", "adamw: false\nresources: {cpus: 4096}"))
    monkeypatch.setattr(ablate.cluster, "_running_ray", lambda: False)  # (this machine's CPUs, not a Ray left running)
    with pytest.raises(ConfigError, match="resources.cpus=4096"):
        run_tune(load_tune_spec(refused), tmp_path / "out")
    assert stored.read_text() == "the spec as run before"


def test_storage_on_a_file_is_a_clear_error(tmp_path):
    from ablate.cluster import ray_storage_path
    from ablate.config import ConfigError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file; --storage takes a folder"):
        ray_storage_path(str(tmp_path / "afile"))
    with pytest.raises(ConfigError, match="afile is a file; --storage takes a folder"):
        ray_storage_path(str(tmp_path / "afile" / "sub"))  # (a file in the way higher up)
    assert ray_storage_path(str(tmp_path / "new")) == str((tmp_path / "new").resolve())
    assert ray_storage_path("s3://bucket/x") == "s3://bucket/x"


def test_a_crashed_suggestion_records_its_error_and_the_report_tables_count_states(tmp_path):
    import optuna

    from ablate.report import tune_states
    from ablate.tune import OBJECTIVE, _searcher_class

    storage = optuna.storages.InMemoryStorage()
    space = {p: optuna.distributions.FloatDistribution(0.1, 10.0, log=True) for p in PRIORITY_PARAMS}
    searcher = _searcher_class()(space, metric=OBJECTIVE, mode="min", study_name="s", storage=storage)
    for trial_id in ("done", "crashed", "stopped"):
        searcher.suggest(trial_id)
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback (most recent call last):\n  ...\nValueError: a member's config is broken\n")
    from ablate.tune import _progress_callback

    # the progress callback hands Ray's Trial to the searcher when it starts (Ray records a crash's
    # error in it before it tells the searcher)
    ray_trial = type("RayTrial", (), {"error_file": str(error_file), "trial_id": "crashed"})()
    progress = _progress_callback(build_targets(parse_tune_spec(BASE, "s.yaml"))[0], searcher, None, 3)
    progress.on_trial_start(iteration=1, trials=[ray_trial], trial=ray_trial)
    assert searcher.ray_trials == {"crashed": ray_trial}
    searcher.on_trial_complete("crashed", error=True)
    searcher.on_trial_complete("done", {OBJECTIVE: 1.5, "training_iteration": 2, "final": True, "epoch": 2})
    searcher.on_trial_complete("stopped", {OBJECTIVE: 2.0, "training_iteration": 1, "final": False, "epoch": 1})
    study = optuna.load_study(study_name="s", storage=storage)
    ended = {t.user_attrs["ray_trial_id"]: t.user_attrs["ended"] for t in study.trials}
    assert ended["crashed"] == "error: ValueError: a member's config is broken"
    rows = [{"task": "etth1", "number": t.number, "value": t.value if t.value is not None else math.nan,
             "state": t.state.name, "direction": "minimize", "ended": t.user_attrs["ended"],
             "epochs": t.user_attrs.get("epochs", math.nan)} for t in study.trials]  # (as tune_history writes them)
    counts, unfinished = tune_states(pd.DataFrame(rows))
    assert counts.to_dict("records") == [{"task": "etth1", "suggestions": 3, "complete": 1, "stopped early": 1,
                                          "fail": 1, "running": 0, "best": "1.5 (#0)"}]
    assert unfinished["state"].tolist() == ["FAIL", "PRUNED"]
    assert unfinished["ended"].tolist() == ["error: ValueError: a member's config is broken",
                                            "stopped by the scheduler after epoch 1"]
    assert unfinished["epochs"].tolist() == ["none", 1]  # (the crash reported no epoch: it read "nan")


@pytest.mark.parametrize("other, best_is_baseline, note", [
    (0.265980132869, True, "the best are the baseline's own values: no suggestion beat them"),  # (a 1e-8 "win")
    (0.26597, False, "the best beats them by 1.01e-05, less than etth1's min_delta (0.0001)"),
    (0.2, False, None),
])
def test_a_suggestion_that_wins_by_float_rounding_is_not_the_best_and_small_wins_are_called_so(
        tmp_path, other, best_is_baseline, note):
    # with meta-settings under which the priorities change nothing, every suggestion scored the
    # baseline's value up to float rounding, and best_priorities.yaml held a noise winner
    import optuna

    from ablate.tune import (TuneOutcome, _enqueue_baseline, _target_outcome, format_summary, study_history,
                             study_importances)

    spec = load_tune_spec(_tiny_spec(tmp_path))
    (target,) = build_targets(spec)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name=target.study_name, storage=storage, direction="minimize")
    _enqueue_baseline(study, target, spec)
    for value in (0.265980135387, other, 0.265980137906):  # the baseline's own priorities first
        trial = study.ask()
        for p in PRIORITY_PARAMS:
            trial.suggest_float(p, 0.5, 10.0, log=True)
        study.tell(trial, value)
    outcome = _target_outcome(target, storage, 3)
    assert outcome.baseline_value == 0.265980135387
    assert (outcome.best_number == 0) is best_is_baseline and outcome.best_value == (0.265980135387 if best_is_baseline
                                                                                     else other)
    # history.parquet's rows: each value as told, and the chosen one - which Optuna's best_trial is not after a tie
    history = study_history(study, target)
    assert history["value"].tolist() == [0.265980135387, other, 0.265980137906]
    assert history["chosen"].tolist() == [best_is_baseline, not best_is_baseline, False]
    assert study.best_trial.number == 1
    # the report names the trial the file holds: the chosen column's, as ablate tune marked it ...
    from ablate.report import tune_states
    chosen = 0 if best_is_baseline else 1
    assert tune_states(history)[0]["best"].tolist() == [f"{history['value'][chosen]:.6g} (#{chosen})"]
    marked = history.assign(chosen=[False, False, True])  # (whatever it marks)
    assert tune_states(marked)[0]["best"].tolist() == ["0.26598 (#2)"]
    # ... and in a history written before that column, the same rule applied by the report itself
    assert tune_states(history.drop(columns="chosen"))[0]["best"].tolist() == tune_states(history)[0]["best"].tolist()
    imp, why = study_importances(study, target)
    text = format_summary(TuneOutcome(tmp_path, "mem", [outcome], {"history": "h", "importances": "i"},
                                      importance_notes={"etth1": f"none - {why}"} if why else {}))
    if note is None:
        assert "no measurable difference" not in text and "no suggestion beat them" not in text
    else:
        assert note in text
    if best_is_baseline:  # three scores equal to 8 digits: fANOVA has no variance to attribute, and says so
        assert imp.empty and "fANOVA could not attribute the scores" in why
        assert "  importances of etth1: none - fANOVA could not attribute the scores" in text


def test_a_cross_task_score_near_zero_ties_on_an_absolute_tolerance():
    # a cross-task score is a relative improvement over AdamW, near 0 when the arms are close: a
    # relative tolerance would make a 1e-8 float-rounding change a "win"
    import optuna

    from ablate.tune import _best

    for name, ties in (("t/cross_task", True), ("t/etth1", False)):
        study = optuna.create_study(study_name=name, direction="maximize")
        study.enqueue_trial({}, user_attrs={"baseline": True})
        study.tell(study.ask(), 0.0)
        study.tell(study.ask(), 1e-8)
        assert (_best(study).number == 0) is ties, name


# -- (9) what the audit of a real tuning session found ------------------------------------------


def _completed(study, params: dict, distributions: dict, value: float, **attrs):
    import optuna

    study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value, user_attrs=attrs))


def test_after_a_range_change_the_summary_says_the_best_is_outside_and_importances_use_the_current_range(tmp_path):
    # the ranges of a stored study may change between runs: the best (over every stored trial) could lie
    # outside the current ones without a word, and Optuna's importances, which take only parameters of one
    # distribution in every trial, vanished with "no searched parameter varies"
    import optuna

    from ablate.tune import Range, TuneOutcome, _target_outcome, format_summary, study_importances

    spec = load_tune_spec(_tiny_spec(tmp_path))
    target = build_targets(spec)[0]
    old, new = Range(0.1, 10.0, True), Range(2.0, 10.0, True)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name=target.study_name, storage=storage, direction="minimize")
    rng = np.random.default_rng(0)
    for r, n in ((old, 4), (new, 6)):
        for _ in range(n):
            p = {name: float(np.exp(rng.uniform(np.log(r.low), np.log(r.high)))) for name in PRIORITY_PARAMS}
            _completed(study, p, {name: r.distribution() for name in PRIORITY_PARAMS}, p["p_gradient"] + 0.01 * p["p_gen_gap"])
    _completed(study, {name: 1.0 for name in PRIORITY_PARAMS}, {name: old.distribution() for name in PRIORITY_PARAMS}, 0.001)
    imp, note = study_importances(study, target, {name: new for name in PRIORITY_PARAMS})
    assert note == "the 6 of the 11 finished suggestions drawn from the current search space, which changed between runs"
    assert set(imp["param"]) == set(PRIORITY_PARAMS) and imp.set_index("param")["importance"].idxmax() == "p_gradient"
    assert study_importances(study, target)[0].empty  # (Optuna's own, over every trial: none)
    few, why = study_importances(study, target, {name: Range(3.0, 10.0, True) for name in PRIORITY_PARAMS})
    assert few.empty and why == ("the 0 of the 11 finished suggestions drawn from the current search space, which "
                                 "changed between runs, too few to tell")
    # equal scores drawn from the current space: fANOVA has nothing to attribute, and the note keeps the context
    flat = optuna.create_study(direction="minimize")
    for k in range(3):
        _completed(flat, {name: 2.0 + k for name in PRIORITY_PARAMS}, {name: new.distribution() for name in PRIORITY_PARAMS},
                   1.0)
    _completed(flat, {name: 1.0 for name in PRIORITY_PARAMS}, {name: old.distribution() for name in PRIORITY_PARAMS}, 1.0)
    none, why = study_importances(flat, target, {name: new for name in PRIORITY_PARAMS})
    assert none.empty and why.startswith("fANOVA could not attribute the scores (") and why.endswith(
        "; they are the 3 of the 4 finished suggestions drawn from the current search space, which changed between runs")

    outcome = _target_outcome(target, storage, 0)
    assert outcome.best_number == 10
    text = format_summary(TuneOutcome(tmp_path, "mem", [outcome], {"history": "h", "importances": "i"},
                                      importance_notes={"etth1": note}, space={name: new for name in PRIORITY_PARAMS}))
    assert ("  outside the current search range (p_gradient = 1 not in [2, 10]; p_loss_decrease = 1 not in [2, 10]; "
            "p_gen_gap = 1 not in [2, 10]): the best is over every trial of the stored study, also those of earlier "
            "runs with other ranges") in text
    assert f"  importances of etth1: {note}" in text
    inside = format_summary(TuneOutcome(tmp_path, "mem", [outcome], {"history": "h", "importances": "i"},
                                        space={name: old for name in PRIORITY_PARAMS}))
    assert "outside the current search range" not in inside and "importances of" not in inside


def test_a_cross_task_starting_point_that_ties_with_the_best_is_said_to_lose_its_values(tmp_path):
    # two tasks' own priorities scored the same: the best values (one vector) replace the other task's own
    # values on a tie, which the tie rule exists to prevent for a single baseline
    import optuna

    from ablate.tune import TuneOutcome, _enqueue_baseline, _target_outcome, format_summary

    spec = load_tune_spec(_tiny_spec(tmp_path, tasks="[etth1, imdb]", extra="cross_task: true\n"))
    target = build_targets(spec, {"etth1/0": 1.0, "imdb/0": 1.0})[0]
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name=target.study_name, storage=storage, direction="maximize")
    _enqueue_baseline(study, target, spec)
    for value in (-0.0253314, -0.0253314, -0.5):
        study.tell(study.ask({p: optuna.distributions.FloatDistribution(0.5, 10.0, log=True) for p in PRIORITY_PARAMS}),
                   value)
    outcome = _target_outcome(target, storage, 3)
    assert outcome.best_number == 0
    text = format_summary(TuneOutcome(tmp_path, "mem", [outcome], {"history": "h", "importances": "i"}))
    assert "starting point: the baseline values of etth1, applied to every task, scored -0.0253314\n" in text
    assert ("starting point: the baseline values of imdb, applied to every task, scored -0.0253314 - a tie with the "
            "best: the best values, one vector for every task, change imdb's own for no measured gain") in text


def test_a_refused_extension_names_a_setting_that_became_searched():
    from ablate.tune import _describe_difference

    stored = {"members": [{"task": "etth1", "seed": 0, "config": {"meta_lr": 0.01, "epochs": 2}}]}
    now = {"members": [{"task": "etth1", "seed": 0, "config": {"epochs": 2}}]}
    assert _describe_difference(stored, now, {"meta_lr"}) == (
        "settings meta_lr (now searched; the stored study's trials held it at 0.01)")
    assert _describe_difference(now, stored, set()) == "settings meta_lr (no longer searched, now 0.01)"
    assert _describe_difference(stored, {"members": [{"task": "etth1", "seed": 0, "config": {"meta_lr": 0.1, "epochs": 2}}]}) \
        == "settings meta_lr (stored 0.01, now 0.1)"


def test_a_refused_cross_task_extension_names_the_adamw_reference_setting_that_changed():
    # a cross-task study scores against the AdamW arm, whose settings its record holds apart from the members': a
    # spec whose adamw: changed was refused as scoring differently "(unknown)"
    from ablate.tune import _describe_difference, _objective_record

    def record(adamw):
        spec = parse_tune_spec({"name": "x", "tasks": ["etth1"], "seeds": 1, "budget": {"epochs": 2}, "adamw": adamw,
                                "tune": {"cross_task": True}}, "x.yaml")
        return _objective_record(build_targets(spec)[0], spec)

    stored, now = json.loads(json.dumps(record(True))), record({"lr": 1.0e-3})
    assert stored != json.loads(json.dumps(now))
    assert _describe_difference(stored, now) == "the AdamW reference's settings lr (stored 0.0005, now 0.001)"


def test_one_seed_is_described_as_one(tmp_path):
    target = build_targets(load_tune_spec(_tiny_spec(tmp_path)))[0]
    assert target.description == "mean over seed 0 of the best validation mse"


def test_a_failed_suggestions_progress_line_says_why(tmp_path, capsys):
    import optuna

    from ablate.tune import _progress_callback

    spec = load_tune_spec(_tiny_spec(tmp_path))
    target = build_targets(spec)[0]
    study = optuna.create_study(direction="minimize")
    searcher = types.SimpleNamespace(told={"r1": (0, "FAIL", None, "no finite value: 1 of 1 member(s) diverged (epoch 2)")},
                                     ray_trials={})
    progress = _progress_callback(target, searcher, study, 2)
    trial = types.SimpleNamespace(trial_id="r1", status="TERMINATED")
    progress.on_trial_complete(1, [trial], trial)
    line = capsys.readouterr().out
    assert "| #0 fail - (no finite value: 1 of 1 member(s) diverged (epoch 2)) | no complete trial yet" in line, line


SIGTERM_AFTER_THE_SEARCH = """\
import ctypes, os, signal, sys, time
import ray
import ablate.cluster, ablate.tune as T
ablate.cluster.check_resources = lambda *a, **k: None

def init_ray(*args, **kwargs):  # as ray.init does: its own SIGTERM handler, which ends the driver without a word
    signal.signal(signal.SIGTERM, lambda *a: os._exit(1))
    return True

ablate.cluster.init_ray = init_ray
ray.shutdown = lambda: ctypes.CDLL(None).signal(signal.SIGTERM, 0)  # (ray.shutdown resets it in the kernel)

def run_target(target, spec, storage, trials, out_dir, ray_storage, stopped=None):
    T.open_target_study(target, spec, storage)
    if target.key == "imdb":  # SIGTERM before a second target's search (its study stored by an earlier run)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    return 1, 0

def write_outputs(*args, **kwargs):  # SIGTERM as the outputs are written (a scheduler's time limit)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

T._run_target, T.write_outputs = run_target, write_outputs
T.run_tune(T.load_tune_spec(sys.argv[1]), sys.argv[2], again="AGAIN", outputs_only="REWRITE")
"""


@pytest.mark.parametrize("tasks", ["[etth1]", "[etth1, imdb]"])
def test_sigterm_after_the_search_says_what_is_stored_and_how_to_go_on(tmp_path, tasks):
    # the handler of `ablate tune` was installed around each search only: after it, Ray's (restored) ended the
    # run with exit 143 and no word, its outputs (best values, history) left as the run before wrote them.
    # Where a target's search has not run, --trials 0 (which only rewrites the outputs) is not the way on
    spec_path = _tiny_spec(tmp_path, tasks=tasks)
    done = subprocess.run([sys.executable, "-c", SIGTERM_AFTER_THE_SEARCH, str(spec_path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    tune_dir = tmp_path / "out" / "t1" / "tune"
    assert done.returncode == 143, done.stdout + done.stderr
    stored = f"terminated (SIGTERM): the suggestions that finished are stored in {(tune_dir / 'optuna.journal').resolve()}; "
    if tasks == "[etth1]":
        assert (stored + f"the outputs in {tune_dir} (best values, history, importances) may not show them: "
                         f"`REWRITE` rewrites them") in done.stdout
    else:
        assert stored + "the search of imdb was cut off: `AGAIN` goes on\n" in done.stdout


@pytest.mark.parametrize("tasks", ["[tune_synth]", "[etth1, imdb]"])
def test_sigterm_during_a_search_names_the_command_and_marks_its_unfinished_suggestions_failed(tmp_path, ray_address,
                                                                                              tasks):
    # a scheduler's SIGTERM during a search said "run the same command again", not the command (a run given
    # --out, --address, --study-storage... must be continued with them), nor the targets still to search; and a
    # suggestion Optuna had stored as the signal came, before the searcher knew it, stayed RUNNING for good
    import signal
    import threading

    from ablate.tune import fail_orphans

    if tasks == "[tune_synth]":
        spec = _synth_spec(tmp_path, "stopped", "trials: 40\nsampler: random\nsampler_seed: 0\nmax_concurrent: 1\n")
    else:  # two targets: the second's search has not started
        spec = _tiny_spec(tmp_path, "stopped", epochs=2, tasks=tasks, extra="max_concurrent: 1\n")
        spec.write_text(spec.read_text().replace("trials: 1\n", "trials: 40\n"))
    first = tasks.strip("[]").split(",")[0]
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ablate.cli", "tune", str(spec), "--out", str(out), "--address",
                             ray_address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    watchdog = threading.Timer(180, proc.kill)  # (the loop below ends, and the test fails, if it never gets there)
    watchdog.start()
    lines = []
    for line in proc.stdout:  # the first suggestion finished: the search runs (and asks for the next one now)
        lines.append(line)
        if line.startswith(f"[{first}] 1/40 done"):
            proc.send_signal(signal.SIGTERM)
            break
    text = "".join(lines) + proc.communicate(timeout=120)[0]
    watchdog.cancel()
    assert proc.returncode == 143, text[-3000:]
    location = (out / "stopped" / "tune" / "optuna.journal").resolve()
    command = f"ablate tune {spec} --out {out} --address {ray_address}"
    after = ", the search of imdb did not run" if "imdb" in tasks else ""
    said = re.search(rf"terminated \(SIGTERM\): {first}: (\d+) of 40 suggestion\(s\) stored, the unfinished ones "
                     rf"marked FAIL; the suggestions that finished are stored in {re.escape(str(location))}; the search "
                     rf"of {first} was cut off{after}: `([^`]*)` goes on", text)
    assert said and said.group(2) == command, text[-3000:]
    study = _load(str(location), f"stopped/{first}")
    running = [t for t in study.trials if t.state.name == "RUNNING"]
    if running:  # the signal came as the storage's lock was held, or as Optuna had just stored the trial
        note = "(its bookkeeping did not finish - it took more than 5 s - a later run of the command does it)"
        assert all(note in text or "driver_id" not in t.user_attrs for t in running), (text[-1500:], running)
        with pytest.MonkeyPatch.context() as m:  # a later run: its process is gone (or it is unlabelled, 10 min on)
            m.setattr("ablate.tune.UNLABELLED_ORPHAN_S", 0.0)
            assert fail_orphans(study) == (len(running), 0)
    states = [(t.state.name, t.user_attrs.get("ended")) for t in study.trials]
    assert all(state == "COMPLETE" or ended.startswith("interrupted") for state, ended in states), states
    assert sum(state == "COMPLETE" for state, _ in states) == int(said.group(1)) >= 1, (states, said.group(0))


def test_a_suggestion_stored_by_optuna_as_sigterm_came_is_marked_failed_and_labelled_before_it_is_sampled(
        tmp_path, monkeypatch):
    # the signal's handler runs while the main thread is inside the searcher's suggest(): Optuna's ask() had
    # stored the trial RUNNING, the searcher did not know it yet, and no process was recorded for it - so
    # neither the handler nor a later run's clean-up of dead processes' trials failed it
    import datetime

    import optuna

    from ablate.tune import DRIVER_ID, OBJECTIVE, _searcher_class, fail_orphans, make_sampler

    storage = open_storage(str(tmp_path / "j.journal"))
    space = {p: optuna.distributions.FloatDistribution(0.1, 10.0, log=True) for p in PRIORITY_PARAMS}
    searchers = {kind: _searcher_class()(space, metric=OBJECTIVE, mode="min", study_name=kind, storage=storage,
                                         sampler=make_sampler(kind, 0)) for kind in ("tpe", "qmc")}
    labels = []
    real_sample = optuna.samplers.RandomSampler.sample_independent

    def sample(self, study, trial, name, distribution):  # (TPE's and QMC's start-up draws are random ones)
        labels.append(study._storage.get_trial(trial._trial_id).user_attrs.get("driver_id"))
        return real_sample(self, study, trial, name, distribution)

    monkeypatch.setattr(optuna.samplers.RandomSampler, "sample_independent", sample)
    for kind, searcher in searchers.items():
        searcher.suggest("first")
        real_ask, handled = searcher._ot_study.ask, []

        def ask_then_signal(*args, **kwargs):  # SIGTERM right after Optuna stored (and sampled) the new trial
            trial = real_ask(*args, **kwargs)
            handled.append(searcher.fail_unfinished())
            return trial

        searcher._ot_study.ask = ask_then_signal
        searcher.suggest("second")
        assert handled == [2], (kind, "the first suggestion and the one being asked for")
        study = optuna.load_study(study_name=kind, storage=storage)
        assert [(t.state.name, t.user_attrs.get("ended")) for t in study.trials] == [("FAIL", "interrupted")] * 2
    assert labels and all(label == DRIVER_ID for label in labels), "the process is recorded before the sampling"
    # killed in the instant before the label (SIGKILL: no handler): failed by a later run, ten minutes after it started
    study = optuna.load_study(study_name="tpe", storage=storage)
    for started in (datetime.datetime.now() - datetime.timedelta(minutes=20), datetime.datetime.now()):
        trial = optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, params={}, distributions={})
        trial.datetime_start = started
        study.add_trial(trial)
    assert fail_orphans(study) == (1, 1)
    assert [(t.state.name, t.user_attrs.get("ended")) for t in study.trials[2:]] == [
        ("FAIL", "interrupted: its process was cut off as it asked for it"), ("RUNNING", None)]


def test_the_cross_task_reference_and_an_interrupted_single_target_name_commands_that_continue(tmp_path, monkeypatch,
                                                                                                capsys):
    # SIGTERM during the AdamW reference said "continue with: the same command with --resume", which ablate
    # tune refuses; a single target's interruption gives the command that adds only what did not run
    import ablate.sweep
    import ablate.tune as tune_mod
    from ablate.sweep import SweepOutcome

    seen = {}

    def run_study(study, out, **kwargs):
        seen.update(kwargs)
        return SweepOutcome(out, 0, 0, 0, None, unfinished=1)

    monkeypatch.setattr(ablate.sweep, "run_study", run_study)
    spec_path = _tiny_spec(tmp_path, tasks="[etth1]", extra="cross_task: true\n")
    with pytest.raises(tune_mod.ReferenceInterrupted):
        adamw_references(load_tune_spec(spec_path), tmp_path / "out", address=None, ray_storage=None, again="AGAIN")
    assert seen["resume_hint"] == "AGAIN"

    _no_ray(monkeypatch)
    spec_path = _tiny_spec(tmp_path, name="t5")
    spec_path.write_text(spec_path.read_text().replace("trials: 1", "trials: 5"))

    monkeypatch.setattr(tune_mod, "_run_target", _cut_short(2, 1))
    assert tune_mod.tune_command(_tune_args(spec_path, tmp_path / "out")) == 130
    printed = capsys.readouterr().out
    assert (f"or, to add only the 3 suggestion(s) this run did not get to:\n  ablate tune {spec_path} --out "
            f"{tmp_path / 'out'} --trials 3") in printed

    monkeypatch.setattr(tune_mod, "_run_target", _cut_short(0, 1))
    assert tune_mod.tune_command(_tune_args(spec_path, tmp_path / "out")) == 130
    printed = capsys.readouterr().out
    assert "after 0 of 5 suggestion(s)" in printed, printed
    assert "to add only the" not in printed, "no suggestion finished: the same command, not said twice"


def test_a_cross_task_search_writes_each_task_its_own_values_not_yaml_aliases(tmp_path):
    # the tasks shared one priorities list, which yaml wrote once as an anchor (&id001) and then as aliases
    # (*id001): editing the first task's values in the file changed every task's
    import optuna

    from ablate.tune import write_outputs

    spec = load_tune_spec(_tiny_spec(tmp_path, tasks="[etth1, imdb]", extra="cross_task: true\n"))
    target = build_targets(spec, {"etth1/0": 1.0, "imdb/0": 1.0})[0]
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name=target.study_name, storage=storage, direction="maximize")
    study.enqueue_trial({p: v for p, v in zip(PRIORITY_PARAMS, (2.0, 3.0, 4.0))})
    study.optimize(lambda trial: sum(trial.suggest_float(p, 0.5, 10.0, log=True) for p in PRIORITY_PARAMS), n_trials=1)
    files, _ = write_outputs(spec, storage, [target], tmp_path, "memory")
    text = files["best"].read_text()
    assert "&id" not in text and "*id" not in text
    best = yaml.safe_load(text)
    assert best["etth1"]["priorities"] == best["imdb"]["priorities"] == [2.0, 3.0, 4.0]
    assert best["etth1"]["priorities"] is not best["imdb"]["priorities"]


DIVERGING_PLUGIN = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ablate.tasks.base import TaskInstance, register_task


@register_task("tune_diverging", metrics=[("score", "min")],
               defaults={"epochs": 5, "batch_size": 4, "patience": 0, "meta_every": 1000, "modulator_layers": 1,
                         "warmup_epochs": 0, "grouping": "original"},
               description="synthetic: seed 0's loss is NaN from its first step")
def build(config):
    ds = TensorDataset(torch.zeros(4, 1), torch.zeros(4, 1))
    seed = config["seed"]

    def loss_fn(model, batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        return loss * float("nan") if seed == 0 else loss

    def evaluate(model, loader):
        return {"score": 1.0 + seed}

    return TaskInstance(name="tune_diverging", model=nn.Linear(1, 1), train=ds, val=ds, loss_fn=loss_fn,
                        evaluate=evaluate, data_source="synthetic")
'''


def _diverging_reports(tmp_path, monkeypatch) -> list[dict]:
    """What the trainable reports for a suggestion of 3 seeds whose seed 0 diverges in epoch 1."""
    import ray.tune

    from ablate.tune import tune_trainable

    (tmp_path / "tune_diverging.py").write_text(DIVERGING_PLUGIN)
    spec_path = _write(tmp_path, "div.yaml", """\
        name: div
        tasks: [tune_diverging]
        seeds: 3
        plugins: [tune_diverging]
        adamw: false
        budget: {epochs: 5}
        tune: {trials: 1, scheduler: none}
        """)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    target = build_targets(load_tune_spec(spec_path))[0]
    reports = []
    monkeypatch.setattr(ray.tune, "report", lambda metrics, **kw: reports.append(metrics))
    tune_trainable({"members": target.members, "modes": target.modes, "aggregate": "mean",
                    "direction": target.direction, "references": None, "param_names": list(PRIORITY_PARAMS),
                    "plugins": ["tune_diverging"], "plugin_dir": str(tmp_path), "cwd": str(tmp_path), "cpus": 1,
                    **{p: 1.0 for p in PRIORITY_PARAMS}})
    return reports


def test_a_suggestion_stops_training_once_a_member_diverged(tmp_path, monkeypatch):
    # its score is NaN for good (the suggestion is told FAIL): the other seeds must not go on training
    # to the last epoch on the search's budget
    reports = _diverging_reports(tmp_path, monkeypatch)
    assert len(reports) == 1, [r["member_epochs"] for r in reports]
    last = reports[-1]
    assert last["final"] and not last["objective_is_finite"]
    assert json.loads(last["member_stops"]) == ["diverged", "", ""]


def test_a_second_ctrl_c_during_a_search_exits_130_with_the_continue_command_and_the_outputs(tmp_path, monkeypatch,
                                                                                              capsys):
    # Ray Tune's first Ctrl-C stops the run gracefully; a second one (its message invites it) raises
    # KeyboardInterrupt out of fit(): the run ended with a bare "interrupted", no command that continues,
    # and the outputs not rewritten
    import ray.tune

    import ablate.tune as tune_mod

    _no_ray(monkeypatch)

    class SecondCtrlC:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(ray.tune, "Tuner", SecondCtrlC)
    spec_path = _tiny_spec(tmp_path, tasks="[etth1, imdb]")
    try:
        code = tune_mod.tune_command(_tune_args(spec_path, tmp_path / "out"))
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C escaped `ablate tune` (a bare 'interrupted': no command that continues)")
    assert code == 130
    printed = capsys.readouterr().out
    assert "interrupted during etth1 after 0 of 1 suggestion(s)" in printed and "the searches of imdb did not start" in printed
    assert f"ablate tune {spec_path}" in printed
    assert (tmp_path / "out" / "t1" / "tune" / "history.parquet").exists()


def test_ctrl_c_while_ray_starts_shuts_ray_down_and_names_the_command_that_continues(tmp_path, monkeypatch, capsys):
    # as `ablate run` does: Ray's agents, half started, must not outlive the run
    import ray

    import ablate.cluster
    import ablate.tune as tune_mod

    def init(*args, **kwargs):
        raise KeyboardInterrupt  # (the Ctrl-C arrives inside ray.init)

    shutdowns = []
    monkeypatch.setattr(ablate.cluster, "check_resources", lambda *a, **k: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: shutdowns.append(1))
    spec_path = _tiny_spec(tmp_path)
    try:
        code = tune_mod.tune_command(_tune_args(spec_path, tmp_path / "out"))
    except KeyboardInterrupt:
        code = None
    assert shutdowns, "Ray was not shut down"
    assert code == 130 and f"ablate tune {spec_path}" in capsys.readouterr().out


def test_ctrl_c_as_the_outputs_are_written_names_the_command_that_rewrites_them(tmp_path, monkeypatch, capsys):
    # after every search finished, a Ctrl-C as the outputs were written said to run the same command, which adds
    # --trials more suggestions to every target: `--trials 0` (outputs only) is what goes on
    import ablate.tune as tune_mod

    _no_ray(monkeypatch)
    monkeypatch.setattr(tune_mod, "_run_target", _cut_short(1, 0))

    def write_outputs(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_mod, "write_outputs", write_outputs)
    spec_path = _tiny_spec(tmp_path)
    assert tune_mod.tune_command(_tune_args(spec_path, tmp_path / "out")) == 130
    printed = capsys.readouterr().out
    assert f"`ablate tune {spec_path} --out {tmp_path / 'out'} --trials 0` rewrites them" in printed, printed

    # a Ctrl-C before the second target's search names the command that goes on and what did not run
    def run_target(target, *args, **kwargs):
        if target.key == "imdb":
            raise KeyboardInterrupt  # (before its search: Ray Tune's fit() catches a Ctrl-C in one)
        return 1, 0

    monkeypatch.setattr(tune_mod, "_run_target", run_target)
    spec_path = _tiny_spec(tmp_path, name="t2", tasks="[etth1, imdb]")
    assert tune_mod.tune_command(_tune_args(spec_path, tmp_path / "out")) == 130
    printed = capsys.readouterr().out
    assert f"the search of imdb was cut off: `ablate tune {spec_path} --out {tmp_path / 'out'}` goes on" in printed, printed


def test_asha_ranks_a_suggestion_without_a_value_last_without_nan_arithmetic(tmp_path, monkeypatch):
    # an infinite objective made ASHA's percentile cutoff compute inf - inf: numpy's RuntimeWarning reached
    # the user as a bare "ablate: warning: invalid value encountered in scalar subtract"
    from types import SimpleNamespace

    from ray.tune.schedulers.async_hyperband import _Bracket

    from ablate.tune import OBJECTIVE

    diverged = _diverging_reports(tmp_path, monkeypatch)[0]
    assert not diverged["objective_is_finite"] and math.isfinite(diverged[OBJECTIVE])
    bracket = _Bracket(min_t=1, max_t=5, reduction_factor=2, s=0)  # (ASHA's; minimising: metric_op -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bracket.on_result(SimpleNamespace(trial_id="diverged"), 1, -diverged[OBJECTIVE])
        bracket.on_result(SimpleNamespace(trial_id="a"), 1, -50.0)
        assert bracket.on_result(SimpleNamespace(trial_id="b"), 1, -1.0) == "CONTINUE"
        assert bracket.on_result(SimpleNamespace(trial_id="c"), 1, -diverged[OBJECTIVE]) == "STOP"  # ranked last


def test_best_values_record_the_settings_they_were_tuned_with_and_a_study_running_others_is_warned(tmp_path):
    # best_priorities.yaml held the priorities alone: tuned with meta_optimizer adam, meta_lr 1e-2 and 5
    # meta-updates per epoch, they were read without a word by a study whose baseline ran sgd, 1e-4 and the
    # task's K_meta - priorities tuned for another optimizer
    import optuna

    from ablate.tune import _enqueue_baseline, write_outputs

    spec_path = _write(tmp_path, "t.yaml", """\
        name: t
        tasks: [etth1]
        seeds: 1
        budget: {epochs: 3}
        adamw: false
        baseline: {meta_per_epoch: 5, meta_optimizer: adam, meta_lr: 1.0e-2}
        tune: {trials: 1, params: {meta_lr: {low: 1.0e-5, high: 1.0e-1, log: true}}}
        """)
    spec = load_tune_spec(spec_path)
    (target,) = build_targets(spec)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name=target.study_name, storage=storage, direction="minimize")
    _enqueue_baseline(study, target, spec)
    study.tell(study.ask(), 0.5)
    trial = study.ask()
    for p in PRIORITY_PARAMS:
        trial.suggest_float(p, 0.1, 10.0, log=True)
    trial.suggest_float("meta_lr", 1e-5, 1e-1, log=True)
    study.tell(trial, 0.25)
    out = tmp_path / "out"
    out.mkdir()
    files, _ = write_outputs(spec, storage, [target], out, "mem")
    entry = yaml.safe_load(files["best"].read_text())["etth1"]
    with_ = entry["tuned_with"]
    assert with_["meta_optimizer"] == "adam" and with_["meta_per_epoch"] == 5 and with_["meta_every"] is None
    assert with_["weighting"] == "huw_priority" and with_["lr"] == 5e-4
    assert "priorities" not in with_ and "meta_lr" not in with_, "the searched keys are the entry's own"
    best = out / "best_priorities.yaml"
    same = _write(tmp_path, "same.yaml", f"""\
        name: same
        tasks: [etth1]
        seeds: [7]
        budget: {{epochs: 3}}
        baseline: {{priorities_from: {best}, meta_per_epoch: 5, meta_optimizer: adam}}
        """)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the settings they were tuned with: nothing to say
        load_study(same)
    other = _write(tmp_path, "other.yaml", f"""\
        name: other
        tasks: [etth1]
        seeds: [7]
        budget: {{epochs: 3}}
        baseline: {{priorities_from: {best}}}
        ablations: {{meta_optimizer: [adam]}}
        """)
    with pytest.warns(UserWarning, match=r"baseline.priorities_from: the priorities were tuned with other settings "
                                         r"than the baseline of this study runs them with \(etth1: meta_every \(tuned "
                                         r"with null, here \d+\), meta_per_epoch \(tuned with 5(\.0)?, here null\), "
                                         r"meta_optimizer \(tuned with \"adam\", here \"sgd\"\)\)"):
        load_study(other)
    # overrides that replace every tuned key: the file's values are not used, nothing to warn about
    replaced = _write(tmp_path, "replaced.yaml", f"""\
        name: replaced
        tasks: [etth1]
        seeds: [7]
        baseline: {{priorities_from: {best}}}
        overrides: {{etth1: {{priorities: [1, 1, 1], meta_lr: 1.0e-4}}}}
        """)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_study(replaced)
    # a file written before tuned_with (or by hand) is read as before
    old = {"etth1": {k: v for k, v in entry.items() if k != "tuned_with"}}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_study({"name": "o", "tasks": ["etth1"], "seeds": [7], "baseline": {"priorities_from": "old.yaml"}},
                    "o.yaml", base_dir=tmp_path)
    (tmp_path / "bad.yaml").write_text("etth1: {priorities: [1, 1, 1], tuned_with: [adam]}\n")
    with pytest.raises(StudyError, match=r"\(bad.yaml\).etth1.tuned_with: must be the mapping of the settings"):
        parse_study({"name": "o", "tasks": ["etth1"], "seeds": [7], "baseline": {"priorities_from": "bad.yaml"}},
                    "o.yaml", base_dir=tmp_path)


@pytest.mark.parametrize("file_key, baseline_key", [("meta_every", "meta_per_epoch"), ("meta_per_epoch", "meta_every")])
def test_the_meta_update_frequency_in_the_priorities_file_and_in_baseline_under_its_other_name_conflicts(
        tmp_path, file_key, baseline_key):
    # the same key in both was an error, but the frequency under its other name was dropped without a word
    # (the file's layer comes after baseline:, and one frequency key drops the other): the study ran the file's
    (tmp_path / "best.yaml").write_text(f"etth1: {{priorities: [1, 2, 3], {file_key}: 7}}\n")
    mapping = {"name": "s", "tasks": ["etth1"], "seeds": [9],
               "baseline": {"priorities_from": "best.yaml", baseline_key: 2}}
    with pytest.raises(StudyError, match=rf"\(best.yaml\).etth1: sets '{file_key}', and baseline: sets '{baseline_key}': "
                                         r"the same meta-update frequency; keep one of them"):
        parse_study(mapping, "s.yaml", base_dir=tmp_path)


def test_a_members_warning_in_a_worker_is_shown_by_the_search(tmp_path, ray_address, capsys):
    # meta_per_epoch above an epoch's steps: `ablate train` and `ablate run` warn that each member makes one
    # meta-update per step instead; in `ablate tune` the warning stayed in the Ray worker, whose output the
    # driver does not show
    spec = _write(tmp_path, "tw.yaml", """\
        name: tw
        tasks: [etth1]
        seeds: 1
        budget: {epochs: 1, max_train_batches: 4, patience: 0}
        baseline: {meta_per_epoch: 8, warmup_epochs: 0, modulator_layers: 1}
        adamw: false
        tune:
          trials: 2
          max_concurrent: 1
          priorities: {low: 0.5, high: 10.0, log: true}
        """)
    run_tune(load_tune_spec(spec), tmp_path / "results")
    out = capsys.readouterr().out
    said = re.findall(r"warning: meta_per_epoch=8 is more than the 4 steps", out)
    assert len(said) == 1, out  # (once for the search, not once per suggestion)


def test_a_tasks_data_warning_is_not_prefixed_with_its_name_twice(tmp_path, capsys):
    # a task's data warning starts with the task's name ("etth1: FILE is not the published file ..."), so the
    # search of that task printed "[etth1] warning: etth1: ..."; the cross-task search names the task, as it must
    import dataclasses

    from ablate.tune import WARNINGS_KEY, _progress_callback

    spec = load_tune_spec(_tiny_spec(tmp_path))
    target = build_targets(spec)[0]
    messages = ["etth1: /d/ETTh1.csv is not the published file - metrics not comparable", "meta_per_epoch=8 is more"]
    for key in ("etth1", "cross_task"):
        progress = _progress_callback(dataclasses.replace(target, key=key), None, None, 1)
        progress.on_trial_result(1, [], None, {WARNINGS_KEY: json.dumps(messages)})
    assert capsys.readouterr().out.splitlines() == [
        "[etth1] warning: /d/ETTh1.csv is not the published file - metrics not comparable",
        "[etth1] warning: meta_per_epoch=8 is more",
        "[cross_task] warning: etth1: /d/ETTh1.csv is not the published file - metrics not comparable",
        "[cross_task] warning: meta_per_epoch=8 is more"]


# -- tuned_with: only what changes the tuned arm's run, the budget, keys searched again, null ------------


def _tuned_with_warnings(tmp_path: Path, best: str, mapping: dict) -> list[str]:
    (tmp_path / "best.yaml").write_text(textwrap.dedent(best))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parse_study(mapping, "s.yaml", base_dir=tmp_path)
    return [str(w.message) for w in caught if "tuned with other settings" in str(w.message)]


@pytest.mark.parametrize("best, baseline", [
    # gate_l1 without gating, fixed_weights under huw_priority, priorities under huw (a meta_lr search with
    # priorities: false records them) were named as differences, though none of them changes the run
    ("etth1: {priorities: [1, 2, 3], tuned_with: {gating: false, gate_l1: 0.5}}\n", {"gating": False}),
    ("etth1: {priorities: [1, 2, 3], tuned_with: {weighting: huw_priority, fixed_weights: [3, 3, 3]}}\n", {}),
    ("etth1: {meta_lr: 0.01, tuned_with: {weighting: huw, priorities: [2.0, 2.0, 2.0]}}\n", {"weighting": "huw"}),
    ("etth1: {meta_lr: 0.01, tuned_with: {weighting: sum, weighting_form: classification}}\n", {"weighting": "sum"}),
])
def test_tuned_with_keys_that_do_not_change_the_run_are_not_differences(tmp_path, best, baseline):
    mapping = {"name": "s", "tasks": ["etth1"], "seeds": [9], "baseline": {"priorities_from": "best.yaml", **baseline}}
    assert _tuned_with_warnings(tmp_path, best, mapping) == []


def test_tuned_with_keys_that_change_the_run_on_either_side_are_still_compared(tmp_path):
    mapping = {"name": "s", "tasks": ["etth1"], "seeds": [9],
               "baseline": {"priorities_from": "best.yaml", "gating": True}}
    (said,) = _tuned_with_warnings(tmp_path, "etth1: {priorities: [1, 2, 3], tuned_with: {gating: true, gate_l1: 0.5}}\n",
                                   mapping)
    assert "gate_l1 (tuned with 0.5, here 0.001)" in said
    # gating off where they were tuned, on here: gating is the difference (gate_l1 was not in use there)
    (said,) = _tuned_with_warnings(tmp_path, "etth1: {priorities: [1, 2, 3], tuned_with: {gating: false, gate_l1: 0.5}}\n",
                                   mapping)
    assert "gating (tuned with false, here true)" in said and "gate_l1" not in said


def test_tuned_with_records_the_budget_and_a_study_with_another_is_warned(tmp_path):
    # the best lr (or priorities) for 4 epochs of 20 batches are not those of a full run: the budget was not
    # recorded, so a study running tuned values on another budget was not warned
    from ablate.study import tuning_context

    spec = parse_tune_spec({"name": "t", "tasks": ["etth1"], "seeds": 1, "adamw": True,
                            "budget": {"epochs": 4, "max_train_batches": 20},
                            "tune": {"arm": "adamw", "params": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}},
                           "t.yaml")
    config = spec.arm_trials("etth1")[0].config
    with_ = tuning_context(config, "adamw", {"lr"})
    assert with_["epochs"] == 4 and with_["max_train_batches"] == 20 and with_["max_steps"] is None
    assert with_["batch_size"] == config["batch_size"]
    assert tuning_context(config, "baseline")["epochs"] == 4
    (tmp_path / "best_adamw.yaml").write_text(yaml.safe_dump({"etth1": {"lr": 1e-3, "tuned_for": "adamw",
                                                                        "tuned_with": with_}}))
    mapping = {"name": "s", "tasks": ["etth1"], "seeds": [9], "adamw": {"tuned_from": "best_adamw.yaml"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parse_study({**mapping, "budget": {"epochs": 4, "max_train_batches": 20}}, "s.yaml", base_dir=tmp_path)
    assert not [w for w in caught if "tuned with other settings" in str(w.message)]
    with pytest.warns(UserWarning, match=r"adamw.tuned_from: AdamW's settings were tuned with other settings than the "
                                         r"AdamW arm of this study runs them with \(etth1: epochs \(tuned with 4, here "
                                         r"15\), max_train_batches \(tuned with 20, here null\)\)"):
        parse_study({**mapping, "budget": {"epochs": 15}}, "s.yaml", base_dir=tmp_path)


def test_a_tune_searching_a_key_again_on_top_of_a_tuned_file_is_not_warned_about_that_key(tmp_path):
    # meta_lr searched on top of priorities tuned with meta_lr 1e-2: the spec was told the priorities were tuned
    # with another meta_lr, though the search sets it
    (tmp_path / "best.yaml").write_text(
        "etth1: {priorities: [1, 2, 3], tuned_with: {meta_optimizer: adam, meta_lr: 0.01, meta_per_epoch: 5}}\n")
    mapping = {"name": "t", "tasks": ["etth1"], "seeds": 1, "adamw": False, "budget": {"epochs": 3},
               "baseline": {"priorities_from": "best.yaml", "meta_optimizer": "adam", "meta_per_epoch": 5},
               "tune": {"priorities": False, "params": {"meta_lr": {"low": 1e-5, "high": 1e-1, "log": True}}}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parse_tune_spec(mapping, "t.yaml", base_dir=tmp_path)
    assert not [str(w.message) for w in caught if "tuned with other settings" in str(w.message)]
    # (a key that is not searched still is compared; and so is meta_lr by a study that runs the values)
    with pytest.warns(UserWarning, match=r"etth1: meta_optimizer \(tuned with \"adam\", here \"sgd\"\)\)"):
        parse_tune_spec({**mapping, "baseline": {"priorities_from": "best.yaml", "meta_per_epoch": 5}}, "t.yaml",
                        base_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"etth1: meta_lr \(tuned with 0.01, here 0.0001\)\)"):
        parse_study({k: v for k, v in mapping.items() if k != "tune"}, "s.yaml", base_dir=tmp_path)


def test_tuned_with_null_is_unknown_and_a_malformed_one_an_error(tmp_path):
    # `tuned_with: null` (a hand-edited file) was refused as not a mapping
    mapping = {"name": "s", "tasks": ["etth1"], "seeds": [9], "baseline": {"priorities_from": "best.yaml"}}
    assert _tuned_with_warnings(tmp_path, "etth1: {priorities: [1, 2, 3], tuned_with: null}\n", mapping) == []
    assert _tuned_with_warnings(tmp_path, "etth1: {priorities: [1, 2, 3], tuned_with:}\n", mapping) == []
    with pytest.raises(StudyError, match=r"\(best.yaml\).etth1.tuned_with: must be the mapping of the settings"):
        _tuned_with_warnings(tmp_path, "etth1: {priorities: [1, 2, 3], tuned_with: adam}\n", mapping)


def test_tuned_with_records_early_stopping_the_data_and_the_tasks_own_keys(tmp_path):
    # patience/min_delta (where a run stops), the data (embedded or real) and the task's own keys (the model:
    # pooling, n_layers) were not recorded, so a study using the values on real data, another model or without
    # early stopping was not warned
    from ablate.study import tuning_context

    spec = parse_tune_spec({"name": "t", "tasks": ["etth1"], "seeds": 1, "adamw": False,
                            "budget": {"epochs": 3, "patience": 1, "min_delta": 0.05},
                            "overrides": {"etth1": {"pooling": "mean", "n_layers": 1}}, "tune": {}}, "t.yaml")
    with_ = tuning_context(spec.arm_trials("etth1")[0].config, "baseline", {"priorities"})
    assert with_["patience"] == 1 and with_["min_delta"] == 0.05
    assert with_["data"] == "embedded:statsmodels-elnino"  # (the embedded data's version: other data, other run)
    assert with_["pooling"] == "mean" and with_["n_layers"] == 1 and with_["seq_len"] == 24
    assert "priorities" not in with_ and "data_dir" not in with_
    best = yaml.safe_dump({"etth1": {"priorities": [1, 2, 3], "tuned_with": with_}})
    mapping = {"name": "s", "tasks": ["etth1"], "seeds": [9], "baseline": {"priorities_from": "best.yaml"},
               "budget": {"epochs": 3, "patience": 1, "min_delta": 0.05},
               "overrides": {"etth1": {"pooling": "mean", "n_layers": 1}}}
    assert _tuned_with_warnings(tmp_path, best, mapping) == []
    (said,) = _tuned_with_warnings(tmp_path, best, {**mapping, "budget": {"epochs": 3}, "overrides": {}})
    # (the default patience 2 over 3 epochs cannot stop the study's run - its first epoch always improves -, so
    # its min_delta changes nothing there: patience is the difference, not min_delta)
    assert said.split("(etth1: ")[1].split("), so")[0] == (
        'n_layers (tuned with 1, here 2), patience (tuned with 1, here 2), pooling (tuned with "mean", here "last")')
    (said,) = _tuned_with_warnings(tmp_path, best, {**mapping, "budget": {"epochs": 4}, "overrides": {}})
    assert said.split("(etth1: ")[1].split("), so")[0] == (
        'epochs (tuned with 3, here 4), min_delta (tuned with 0.05, here 0.0001), n_layers (tuned with 1, here 2), '
        'patience (tuned with 1, here 2), pooling (tuned with "mean", here "last")')
    (said,) = _tuned_with_warnings(tmp_path, best, {**mapping, "data": "real"})
    assert 'data (tuned with "embedded:statsmodels-elnino", here "real")' in said
    # without early stopping on either side, min_delta changes nothing: patience is the difference
    (said,) = _tuned_with_warnings(tmp_path, best, {**mapping, "budget": {"epochs": 3, "patience": 0}})
    assert "patience (tuned with 1, here 0)" in said and "min_delta" not in said
    # a file written before these keys were recorded: they are unknown, not differences
    old = {k: v for k, v in with_.items() if k in ("epochs", "max_steps", "max_train_batches")}
    assert _tuned_with_warnings(tmp_path, yaml.safe_dump({"etth1": {"priorities": [1, 2, 3], "tuned_with": old}}),
                                {**mapping, "data": "real", "budget": {"epochs": 3}, "overrides": {}}) == []
    # a hand-written `data: embedded` (no version) is compared as set
    assert _tuned_with_warnings(tmp_path, "etth1: {priorities: [1, 2, 3], tuned_with: {data: embedded}}\n",
                                mapping) == []


def test_a_cross_task_search_records_the_adamw_reference_and_a_study_with_another_adamw_is_warned(tmp_path):
    # the cross-task vector is picked for its relative improvement over the AdamW arm, whose settings were not
    # recorded: a study comparing against another AdamW (another lr) was not warned
    import optuna

    from ablate.tune import CROSS_TASK, _enqueue_baseline, write_outputs

    spec = parse_tune_spec({"name": "t", "tasks": ["etth1"], "seeds": 1, "budget": {"epochs": 3},
                            "adamw": {"lr": 2.0e-3}, "tune": {"trials": 1, "cross_task": True}}, "t.yaml")
    (target,) = build_targets(spec, {"etth1/0": 1.0})
    assert target.key == CROSS_TASK
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name=target.study_name, storage=storage, direction="maximize")
    _enqueue_baseline(study, target, spec)
    study.tell(study.ask(), 0.1)
    out = tmp_path / "out"
    out.mkdir()
    files, _ = write_outputs(spec, storage, [target], out, "mem")
    reference = yaml.safe_load(files["best"].read_text())["etth1"]["tuned_with"]["adamw_reference"]
    assert reference["lr"] == 2.0e-3 and reference["epochs"] == 3 and reference["data"] == "embedded:statsmodels-elnino"
    assert "meta_lr" not in reference and "priorities" not in reference  # (AdamW's settings only)
    mapping = {"name": "s", "tasks": ["etth1"], "seeds": [9], "budget": {"epochs": 3},
               "baseline": {"priorities_from": "best.yaml"}}
    assert _tuned_with_warnings(tmp_path, files["best"].read_text(), {**mapping, "adamw": {"lr": 2.0e-3}}) == []
    (said,) = _tuned_with_warnings(tmp_path, files["best"].read_text(), mapping)
    assert "(etth1: adamw_reference.lr (tuned with 0.002, here 0.0005))" in said
    # no AdamW arm: nothing to compare against
    assert _tuned_with_warnings(tmp_path, files["best"].read_text(), {**mapping, "adamw": False}) == []
    # a per-task search records none
    per_task = parse_tune_spec({"name": "t", "tasks": ["etth1"], "seeds": 1, "budget": {"epochs": 3},
                                "adamw": {"lr": 2.0e-3}, "tune": {"trials": 1}}, "t.yaml")
    (target,) = build_targets(per_task)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name=target.study_name, storage=storage, direction="minimize")
    _enqueue_baseline(study, target, per_task)
    study.tell(study.ask(), 0.1)
    files, _ = write_outputs(per_task, storage, [target], out, "mem")
    assert "adamw_reference" not in yaml.safe_load(files["best"].read_text())["etth1"]["tuned_with"]
    with pytest.raises(StudyError, match=r"\(best.yaml\).etth1.tuned_with.adamw_reference: must be the mapping of the "
                                         r"settings of the AdamW reference"):
        _tuned_with_warnings(tmp_path, "etth1: {priorities: [1, 2, 3], tuned_with: {adamw_reference: 0.001}}\n",
                             mapping)


@pytest.mark.parametrize("tuned, here, expected", [
    # max_steps ends both runs first (an epoch has at least one step): the same 20 steps, whatever the epochs
    ({"epochs": 50, "max_steps": 20}, {"epochs": 30, "max_steps": 20}, []),
    ({"epochs": 20, "max_steps": 20}, {"epochs": 100, "max_steps": 20}, []),
    # ... and other steps: max_steps is the difference, not the epochs that neither run reaches
    ({"epochs": 50, "max_steps": 20}, {"epochs": 30, "max_steps": 25}, ["max_steps (tuned with 20, here 25)"]),
    # here 10 epochs may end before 20 steps (the steps per epoch are the data's): epochs is compared
    ({"epochs": 50, "max_steps": 20}, {"epochs": 10, "max_steps": 20}, ["epochs (tuned with 50, here 10)"]),
    ({"epochs": 5, "max_steps": 20}, {"epochs": 6, "max_steps": 20}, ["epochs (tuned with 5, here 6)"]),
])
def test_epochs_cut_by_max_steps_on_both_sides_are_no_difference(tmp_path, tuned, here, expected):
    # a max_steps that cut a larger epochs to the same steps was named as a difference of epochs
    best = f"etth1: {{priorities: [1, 2, 3], tuned_with: {json.dumps(tuned)}}}\n"
    mapping = {"name": "s", "tasks": ["etth1"], "seeds": [9], "budget": here,
               "baseline": {"priorities_from": "best.yaml"}}
    said = _tuned_with_warnings(tmp_path, best, mapping)
    assert [s.split("(etth1: ")[1].split("), so")[0] for s in said] == [", ".join(expected)] if expected else said == []


@pytest.mark.parametrize("tuned, here, expected", [
    # early stopping can end neither run (patience 0; patience >= epochs - 1: the first epoch always improves,
    # and a run stops only before its last epoch): the search's patience: 0 (ASHA stops suggestions) and a
    # study's default 2 over 2 epochs train alike
    ({"epochs": 2, "patience": 0, "min_delta": 0.5}, {"epochs": 2}, []),
    ({"epochs": 4, "patience": 4}, {"epochs": 4, "patience": 0}, []),
    # patience 3 over 4 epochs stops no run either (it was named as a difference, and min_delta with it)
    ({"epochs": 4, "patience": 0, "min_delta": 0.5}, {"epochs": 4, "patience": 3}, []),
    ({"epochs": 4, "patience": 3, "min_delta": 0.5}, {"epochs": 4, "patience": 3}, []),
    # it can end one of them: patience is a difference (min_delta, unused on the other side, is not)
    ({"epochs": 4, "patience": 0, "min_delta": 0.5}, {"epochs": 4, "patience": 2}, ["patience (tuned with 0, here 2)"]),
    ({"epochs": 4, "patience": 2, "min_delta": 0.5}, {"epochs": 4, "patience": 2},
     ["min_delta (tuned with 0.5, here 0.0001)"]),
])
def test_patience_that_cannot_stop_either_run_is_no_difference(tmp_path, tuned, here, expected):
    best = f"etth1: {{priorities: [1, 2, 3], tuned_with: {json.dumps(tuned)}}}\n"
    mapping = {"name": "s", "tasks": ["etth1"], "seeds": [9], "budget": here,
               "baseline": {"priorities_from": "best.yaml"}}
    said = _tuned_with_warnings(tmp_path, best, mapping)
    assert [s.split("(etth1: ")[1].split("), so")[0] for s in said] == [", ".join(expected)] if expected else said == []


def test_a_path_key_is_compared_as_the_file_it_names(tmp_path):
    # imdb's csv_file was compared as text: ./x.csv, x.csv and the absolute path of the file the study reads
    # were named as differences
    (tmp_path / "data" / "imdb").mkdir(parents=True)
    csv = tmp_path / "data" / "imdb" / "x.csv"
    csv.write_text("label,text\n1,good\n")
    (tmp_path / "data" / "x.csv").write_text("label,text\n0,bad\n")  # (not the file the task reads: imdb/ is first)
    (tmp_path / "link.csv").symlink_to(csv)
    mapping = {"name": "s", "tasks": ["imdb"], "seeds": [9], "data": "real", "data_dir": "data",
               "baseline": {"priorities_from": "best.yaml"}}

    def said(recorded: str, here: str) -> list[str]:
        best = yaml.safe_dump({"imdb": {"priorities": [1, 2, 3], "tuned_with": {"csv_file": recorded}}})
        warned = _tuned_with_warnings(tmp_path, best, {**mapping, "overrides": {"imdb": {"csv_file": here}}})
        return [w.split("(imdb: ")[1].split("), so")[0] for w in warned]

    for recorded, here in [("./x.csv", "x.csv"), ("sub/../x.csv", "x.csv"), (str(csv), "x.csv"),
                           (str(csv), str(tmp_path / "data" / "imdb" / "." / "x.csv")), (str(tmp_path / "link.csv"), str(csv))]:
        assert said(recorded, here) == [], (recorded, here)
    # other files: named; and a recorded relative path, whose data directory is not recorded, against an absolute one
    assert said("y.csv", "x.csv") == ['csv_file (tuned with "y.csv", here "x.csv")']
    assert said(str(tmp_path / "data" / "x.csv"), "x.csv") == [
        f'csv_file (tuned with {json.dumps(str(tmp_path / "data" / "x.csv"))}, here "x.csv")']
    assert said("x.csv", str(csv)) == [f'csv_file (tuned with "x.csv", here {json.dumps(str(csv))})']


def test_tuned_with_records_the_real_datas_fingerprint_and_a_study_on_other_real_data_is_warned(tmp_path):
    # real data were recorded as `data: real` alone: values tuned on one CSV (or one data directory's files) were
    # read silently by a study on another
    import optuna

    from ablate.tasks import data_fingerprint, get_task
    from ablate.tune import _enqueue_baseline, write_outputs

    (tmp_path / "data").mkdir()
    reviews = "label,text\n" + "".join(f"{i % 2},review {i} {'good' if i % 2 else 'bad'}\n" for i in range(40))
    (tmp_path / "data" / "x.csv").write_text(reviews)
    mapping = {"name": "t", "tasks": ["imdb"], "seeds": 1, "adamw": False, "data": "real", "data_dir": "data",
               "budget": {"epochs": 2}, "overrides": {"imdb": {"csv_file": "x.csv"}}}
    spec = parse_tune_spec({**mapping, "tune": {"trials": 1}}, "t.yaml", base_dir=tmp_path)
    (target,) = build_targets(spec)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name=target.study_name, storage=storage, direction="maximize")
    _enqueue_baseline(study, target, spec)
    study.tell(study.ask(), 0.6)
    out = tmp_path / "out"
    out.mkdir()
    files, _ = write_outputs(spec, storage, [target], out, "mem")
    best = files["best"].read_text()
    recorded = yaml.safe_load(best)["imdb"]["tuned_with"]
    assert recorded["data"] == "real" and recorded["csv_file"] == "x.csv"
    assert recorded["data_fingerprint"] == data_fingerprint(get_task("imdb"), spec.arm_trials("imdb")[0].config)
    study_mapping = {**{k: v for k, v in mapping.items() if k != "adamw"}, "baseline": {"priorities_from": "best.yaml"}}
    assert _tuned_with_warnings(tmp_path, best, study_mapping) == []  # (the same files)
    (tmp_path / "data" / "x.csv").write_text(reviews + "1,one review more\n")  # (a newer version of the CSV)
    (said,) = _tuned_with_warnings(tmp_path, best, study_mapping)
    now = data_fingerprint(get_task("imdb"), spec.arm_trials("imdb")[0].config)
    assert said.split("(imdb: ")[1].split("), so")[0] == (
        f'data_fingerprint (tuned with "{recorded["data_fingerprint"]}", here "{now}": other real data)')
    # no data where the study looks (planned elsewhere): unknown, not other data; embedded data record none
    assert _tuned_with_warnings(tmp_path, best, {**study_mapping, "data_dir": "nowhere"}) == []
    assert "data_fingerprint" not in _tuned_with_of_an_embedded_search(tmp_path)


def test_a_path_key_naming_the_recorded_file_through_a_link_is_no_other_real_data(tmp_path):
    # csv_file through a link and the file itself were the same file (csv_file not named), but the data's
    # fingerprint, which hashes the file's name as given, warned of "other real data"
    from ablate.study import run_data_fingerprint

    (tmp_path / "data").mkdir()
    csv = tmp_path / "data" / "x.csv"
    csv.write_text("label,text\n" + "".join(f"{i % 2},review {i}\n" for i in range(40)))
    link = tmp_path / "data" / "link.csv"
    link.symlink_to(csv)
    mapping = {"name": "s", "tasks": ["imdb"], "seeds": [9], "data": "real", "data_dir": "data",
               "baseline": {"priorities_from": "best.yaml"}}

    def said(recorded: Path, here: Path) -> list[str]:
        fingerprint = run_data_fingerprint({"task": "imdb", "data": "real", "data_dir": str(tmp_path / "data"),
                                            "csv_file": str(recorded)})
        best = yaml.safe_dump({"imdb": {"priorities": [1, 2, 3], "tuned_with": {
            "data": "real", "csv_file": str(recorded), "data_fingerprint": fingerprint}}})
        warned = _tuned_with_warnings(tmp_path, best, {**mapping, "overrides": {"imdb": {"csv_file": str(here)}}})
        return [w.split("(imdb: ")[1].split("), so")[0] for w in warned]

    assert said(link, csv) == [] and said(csv, link) == []
    other = tmp_path / "data" / "y.csv"  # (other data: still named, as the other file; its fingerprint, which
    other.write_text(csv.read_text() + "1,one review more\n")  # says the same, was named too: no more)
    assert said(link, other) == [f"csv_file (tuned with {json.dumps(str(link))}, here {json.dumps(str(other))})"]


def test_the_advice_of_a_tuned_with_warning_fits_what_differs(tmp_path):
    # other real data were advised "Use the settings they were tuned with (the file's tuned_with)", which no setting
    # of the study file can follow: the same data files are needed (or a new search on these)
    from ablate.study import run_data_fingerprint

    (tmp_path / "data").mkdir()
    reviews = "label,text\n" + "".join(f"{i % 2},review {i}\n" for i in range(40))
    (tmp_path / "data" / "x.csv").write_text(reviews)
    config = {"task": "imdb", "data": "real", "data_dir": str(tmp_path / "data"), "csv_file": "x.csv"}
    tuned_on = run_data_fingerprint(config)
    (tmp_path / "data" / "x.csv").write_text(reviews + "1,one review more\n")  # (a newer version of the CSV)
    assert run_data_fingerprint(config) not in (None, tuned_on)
    mapping = {"name": "s", "tasks": ["imdb"], "seeds": [9], "data": "real", "data_dir": "data",
               "overrides": {"imdb": {"csv_file": "x.csv"}}, "baseline": {"priorities_from": "best.yaml"}}

    def advice(tuned_with: dict) -> str:
        best = yaml.safe_dump({"imdb": {"priorities": [1, 2, 3], "tuned_with": {"data": "real", "csv_file": "x.csv",
                                                                                 **tuned_with}}})
        (said,) = _tuned_with_warnings(tmp_path, best, mapping)
        return said.split("so they are not tuned for it. ")[1]

    assert advice({"data_fingerprint": tuned_on}) == (
        "Run this study on the data files they were tuned on, or tune again on this study's data")
    assert advice({"meta_lr": 0.5}) == (
        "Use the settings they were tuned with (the file's tuned_with), or tune again with this study's settings")
    assert advice({"meta_lr": 0.5, "data_fingerprint": tuned_on}) == (
        "Use the settings they were tuned with (the file's tuned_with) on the data files they were tuned on, or tune "
        "again with this study's settings and data")


def _tiny_acl_imdb_tree(data_dir: Path) -> None:
    """An aclImdb tree of 3 reviews per class folder under ``data_dir/imdb``, for the walks counted below."""
    for split in ("train", "test"):
        for label in ("pos", "neg"):
            folder = data_dir / "imdb" / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                (folder / f"{i}_{7 if label == 'pos' else 2}.txt").write_text(f"review {i} of {label}")


def test_one_parse_walks_the_real_data_once_for_both_tuned_files(tmp_path, monkeypatch):
    # each tuned arm's data_fingerprint walked the data again: two walks of IMDB's 50,000 reviews (about a second each)
    # per parse of a study reading best_priorities.yaml and best_adamw.yaml
    from ablate.tasks.base import FolderFiles

    _tiny_acl_imdb_tree(tmp_path / "data")
    tuned_with = {"data": "real", "data_fingerprint": "0123456789abcdef"}  # (other data than these: warned)
    (tmp_path / "best.yaml").write_text(yaml.safe_dump({"imdb": {"priorities": [1, 2, 3], "tuned_with": tuned_with}}))
    (tmp_path / "adamw.yaml").write_text(yaml.safe_dump({"imdb": {"lr": 1.0e-3, "tuned_with": tuned_with}}))
    mapping = {"name": "s", "tasks": ["imdb"], "seeds": [9], "data": "real", "data_dir": "data",
               "baseline": {"priorities_from": "best.yaml"}, "adamw": {"tuned_from": "adamw.yaml"}}
    walked, sizes = [], FolderFiles.sizes
    monkeypatch.setattr(FolderFiles, "sizes", lambda self: walked.append(self.folder) or sizes(self))
    for parses in (1, 2):  # (not remembered from one parse to the next: the files may change between runs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            parse_study(mapping, "s.yaml", base_dir=tmp_path)
        assert sum("data_fingerprint (tuned with" in str(w.message) for w in caught) == 2  # (both arms warned)
        assert len(walked) == 4 * parses and len(set(walked)) == 4  # (each class folder once per parse)


def test_writing_the_tuned_files_walks_the_real_data_once_for_every_task_reading_it(tmp_path, monkeypatch):
    # write_outputs took each task's data_fingerprint with a walk of its own: two tasks reading IMDB's tree (imdb and a
    # plugin task on the same files) walked its 50,000 reviews twice, per-task targets and a cross-task one alike
    import optuna

    from ablate.study import run_data_fingerprint
    from ablate.tasks import TASKS, imdb, register_task
    from ablate.tasks.base import FolderFiles
    from ablate.tune import _enqueue_baseline, write_outputs

    _tiny_acl_imdb_tree(tmp_path / "data")
    register_task("imdb_plug", metrics=[("accuracy", "max")], defaults=dict(TASKS.get("imdb").defaults),
                  locate=imdb.locate)(lambda config: None)
    try:
        expected = run_data_fingerprint({"task": "imdb", "data": "real", "data_dir": str(tmp_path / "data"),
                                         **TASKS.get("imdb").defaults})
        assert expected is not None
        walked, sizes = [], FolderFiles.sizes
        monkeypatch.setattr(FolderFiles, "sizes", lambda self: walked.append(self.folder) or sizes(self))
        for cross_task in (False, True):
            spec = parse_tune_spec({"name": "t", "tasks": ["imdb", "imdb_plug"], "seeds": 1, "data": "real",
                                    "data_dir": str(tmp_path / "data"), "budget": {"epochs": 2},
                                    "tune": {"trials": 1, "cross_task": cross_task}}, "t.yaml")
            targets = build_targets(spec, {"imdb/0": 1.0, "imdb_plug/0": 1.0} if cross_task else None)
            assert len(targets) == (1 if cross_task else 2)
            storage = optuna.storages.InMemoryStorage()
            for target in targets:
                study = optuna.create_study(study_name=target.study_name, storage=storage, direction=target.direction)
                _enqueue_baseline(study, target, spec)
                study.tell(study.ask(), 0.1)
            out = tmp_path / f"out_{cross_task}"
            out.mkdir()
            walked.clear()
            files, _ = write_outputs(spec, storage, targets, out, "mem")
            assert len(walked) == 4 and len(set(walked)) == 4  # (each class folder once, not once per task)
            best = yaml.safe_load(files["best"].read_text())
            assert [best[t]["tuned_with"]["data_fingerprint"] for t in ("imdb", "imdb_plug")] == [expected] * 2
    finally:
        TASKS.remove("imdb_plug")


def _tuned_with_of_an_embedded_search(tmp_path: Path) -> dict:
    """The ``tuned_with`` that ``ablate tune`` writes for a search on embedded data."""
    import optuna

    from ablate.tune import _enqueue_baseline, write_outputs

    spec = parse_tune_spec({"name": "e", "tasks": ["etth1"], "seeds": 1, "adamw": False, "budget": {"epochs": 2},
                            "tune": {"trials": 1}}, "e.yaml")
    (target,) = build_targets(spec)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name=target.study_name, storage=storage, direction="minimize")
    _enqueue_baseline(study, target, spec)
    study.tell(study.ask(), 0.6)
    (tmp_path / "e").mkdir()
    files, _ = write_outputs(spec, storage, [target], tmp_path / "e", "mem")
    return yaml.safe_load(files["best"].read_text())["etth1"]["tuned_with"]


def test_tuned_with_leaves_out_the_evaluation_batch_size_which_changes_no_validation_metric():
    # eval_batch_size is not recorded (ablate.study.BUDGET_KEYS): the validation metric a search scores is
    # averaged over examples, so evaluating in other batches changes it only by float rounding
    from ablate.study import tuning_context
    from ablate.trial import Trial

    config = {"task": "etth1", "optimizer": "adamw", "epochs": 1, "max_train_batches": 2, "num_threads": 1}
    rows = [Trial({**config, "eval_batch_size": size}).run().row for size in (None, 3, 50)]
    assert all(r["best_mse"] == pytest.approx(rows[0]["best_mse"], rel=1e-6) for r in rows)
    assert all(r["best_mae"] == pytest.approx(rows[0]["best_mae"], rel=1e-6) for r in rows)
    assert "eval_batch_size" not in tuning_context(Trial({**config, "eval_batch_size": 3}).config, "adamw")


def test_stops_early_is_whether_the_trials_own_early_stopping_can_end_a_run():
    # patience = epochs - 1 counted as able to stop a run, so a study and a tuned file that both run without
    # early stopping were told their patience (and min_delta) differ. Checked against Trial's own rule, on the
    # run most likely to stop: no epoch after the first improves (by min_delta or at all)
    from ablate.study import stops_early
    from ablate.trial import Trial

    for epochs in range(1, 5):
        for patience in range(epochs + 2):
            config = {"task": "etth1", "optimizer": "adamw", "epochs": epochs, "patience": patience,
                      "min_delta": 0.5, "max_train_batches": 1, "num_threads": 1}
            trial = Trial(config)
            trial.task.evaluate = lambda model, loader, t=trial: {"mse": 1.0 + t.epoch, "mae": 0.0}
            row = trial.run().row
            assert stops_early(trial.config) == (row["stop_reason"] == "early_stopping"), (epochs, patience, row)
            assert stops_early(trial.config) == (0 < patience < epochs - 1)


@pytest.mark.parametrize("priorities, expected", [
    # a key left out of tune.priorities takes the default range's: {low, high} was searched on a linear scale
    # (the default is log), and {log: false} or {high: 100} were refused for the missing low
    ({"low": 0.5, "high": 5.0}, (0.5, 5.0, True)),
    ({"log": False}, (0.1, 10.0, False)),
    ({"high": 100.0}, (0.1, 100.0, True)),
    ({"low": 0.0, "high": 2.0, "log": False}, (0.0, 2.0, False)),
    ({}, (0.1, 10.0, True)),
])
def test_a_partial_priorities_range_takes_the_default_range_for_the_rest(priorities, expected):
    r = parse_tune_spec({**BASE, "tune": {"priorities": priorities}}, "s.yaml").settings.priorities
    assert (r.low, r.high, r.log) == expected


def test_the_start_line_says_how_many_suggestions_run_at_a_time():
    # it said max_concurrent even where Ray's CPUs (or the suggestions asked for) allowed fewer
    from ablate.tune import TuneSettings, at_a_time

    s = TuneSettings(max_concurrent=4)
    two_cpus = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 8.0}}]
    assert at_a_time(s, 20, 1, 0, two_cpus) == ("2 at a time (max_concurrent 4; Ray's nodes fit 2 suggestion(s) of 1 "
                                                "CPU(s) each)")
    assert at_a_time(s, 1, 1, 0, two_cpus) == "1 at a time (max_concurrent 4; 1 suggestion(s) asked for)"
    assert at_a_time(s, 20, 0.5, 0, two_cpus) == "4 at a time"
    assert at_a_time(s, 20, 1, 1, [{"Resources": {"CPU": 8.0, "GPU": 1.0}}]).startswith("1 at a time")
    assert at_a_time(TuneSettings(max_concurrent=2), 20, 1, 0, [{"Resources": {"CPU": 1.0}}] * 3) == "2 at a time"


@pytest.mark.parametrize("key", ["tuned_on_seeds", "tuned_for"])
def test_a_null_tuned_on_seeds_or_tuned_for_is_unknown(tmp_path, key):
    # `tuned_for: null` was refused as "tuned for the None arm", `tuned_on_seeds: null` as not a list
    mapping = {"name": "s", "tasks": ["etth1"], "seeds": [9], "baseline": {"priorities_from": "best.yaml"}}
    assert _tuned_with_warnings(tmp_path, f"etth1: {{priorities: [1, 2, 3], {key}: null}}\n", mapping) == []
    assert parse_study(mapping, "s.yaml", base_dir=tmp_path).trials[-1].config["priorities"] == [1.0, 2.0, 3.0]
    with pytest.raises(StudyError, match=rf"etth1(.{key})?: (must be|holds values)"):
        _tuned_with_warnings(tmp_path, f"etth1: {{priorities: [1, 2, 3], {key}: 7}}\n", mapping)


@pytest.mark.parametrize("objective", ["gradient", "loss_decrease", "gen_gap"])
def test_a_priority_search_is_refused_for_an_objective_without_some_of_the_terms(objective):
    # two of the three searched priorities weigh no term: dimensions without effect, written to
    # best_priorities.yaml as if tuned
    with pytest.raises(StudyError, match=rf"s.yaml: tune.priorities: the baseline of task 'etth1' uses "
                                         rf"objective='{objective}', whose terms \['{objective}'\] lack"):
        parse_tune_spec({**BASE, "baseline": {"objective": objective, "weighting": "huw_priority"}}, "s.yaml")
    parse_tune_spec({**BASE, "baseline": {"objective": "combined", "weighting": "huw_priority"}}, "s.yaml")


def test_trials_0_names_several_missing_studies_in_plural(tmp_path):
    # "'x/etth1', 'x/wikitext2' has none ... to start it"
    spec = _trials_0_spec(tmp_path, ["etth1", "wikitext2"])
    with pytest.raises(StudyError, match=r"'t0/etth1', 't0/wikitext2' have none in .*; run with --trials N to start them"):
        run_tune(spec, tmp_path / "out")


def test_a_stored_study_scored_on_other_embedded_data_is_refused_without_advice_no_setting_can_follow():
    # a study stored before the embedded data's version entered identity_config (data: 'embedded') was refused
    # with "settings data (stored 'embedded', now 'embedded:...'). Restore those settings": no setting does that
    import copy

    import optuna

    from ablate.tune import _check_stored, _objective_record, build_targets

    spec = parse_tune_spec({"name": "t", "tasks": ["wikitext2"], "seeds": 1, "adamw": False, "budget": {"epochs": 2},
                            "tune": {"trials": 1}}, "t.yaml")
    target = build_targets(spec)[0]
    dist = {n: r.distribution() for n, r in spec.settings.space().items()}

    def stored(change):
        record = copy.deepcopy(_objective_record(target, spec))
        for m in record["members"]:
            change(m["config"])
        study = optuna.create_study(direction=target.direction)
        study.set_user_attr("ablate_objective", record)
        study.add_trial(optuna.trial.create_trial(params={n: 1.0 for n in dist}, distributions=dist, value=1.0))
        return study

    for data, said in (("embedded", "a version not recorded"), ("embedded:generated-grammar-v1", "embedded:generated-grammar-v1")):
        with pytest.raises(StudyError) as info:
            _check_stored(stored(lambda c: c.update(data=data)), target, spec)
        message = str(info.value)
        assert "on other embedded data" in message and said in message and "embedded:generated-grammar-v2" in message
        assert "Restore those settings" not in message and "start a new study" in message
    # another difference too: the settings are named, as before
    with pytest.raises(StudyError, match=r"settings data .*lr \(stored 1.0, now .*Restore those settings"):
        _check_stored(stored(lambda c: c.update(data="embedded", lr=1.0)), target, spec)
    assert _check_stored(stored(lambda c: None), target, spec) is False  # (the same record: extended)


def test_the_start_line_of_a_run_of_no_suggestions_says_none_run():
    # --trials 0 (the outputs only) said "1 at a time (max_concurrent 4; 0 suggestion(s) asked for)"
    from ablate.tune import TuneSettings, at_a_time

    s = TuneSettings(max_concurrent=4)
    assert at_a_time(s, 0, 1, 0, [{"Resources": {"CPU": 8.0}}]) == "none to run"
    assert at_a_time(s, 0, 1, 0, None) == "none to run"
    assert at_a_time(s, 3, 1, 0, [{"Resources": {"CPU": 8.0}}]) == ("3 at a time (max_concurrent 4; 3 suggestion(s) "
                                                                    "asked for)")


@pytest.mark.parametrize("priorities, said", [
    # a bound left out takes the default range's, and the error named it as if the file had given it
    ({"high": 0.05}, "low (0.1, the default) must be less than high (0.05); give low too"),
    ({"low": 20}, "low (20) must be less than high (10.0, the default); give high too"),
    ({"low": 2, "high": 1}, "low (2) must be less than high (1)"),
])
def test_a_partial_priorities_range_names_the_default_bound_it_took(priorities, said):
    with pytest.raises(StudyError) as info:
        parse_tune_spec({**BASE, "tune": {"priorities": priorities}}, "s.yaml")
    assert str(info.value) == f"s.yaml: tune.priorities: {said}"


def test_a_hand_edited_tuned_with_whose_weighting_is_no_name_is_a_difference_not_a_crash(tmp_path):
    # tuned_with: {weighting: [huw]} raised TypeError (unhashable type: 'list') from the check of unused keys
    mapping = {"name": "s", "tasks": ["etth1"], "seeds": [9], "baseline": {"priorities_from": "best.yaml"}}
    (said,) = _tuned_with_warnings(tmp_path, "etth1: {priorities: [1, 2, 3], tuned_with: {weighting: [huw]}}\n", mapping)
    assert 'weighting (tuned with ["huw"], here "huw_priority")' in said


def test_the_tune_sections_problems_and_the_studys_own_are_named_together(tmp_path):
    # a problem of tune: hid every problem of the study part (and an ablations: that ablate tune refuses hid both)
    with pytest.raises(StudyError) as info:
        parse_tune_spec({**BASE, "retries": -1, "resources": {"cpus": 0}, "tune": {"sampler": "annealing"}}, "s.yaml")
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith("s.yaml: tune.sampler: 'annealing' is not allowed")
    assert {p.split(": ")[1] for p in problems[1:]} == {"retries", "resources.cpus"}
    with pytest.raises(StudyError) as info:
        parse_tune_spec({**BASE, "seeds": 0, "ablations": {"lr": [1.0e-3]}, "tune": {"trials": -1}}, "s.yaml")
    assert [p.split(": ")[1] for p in info.value.problems] == ["ablations", "tune.trials", "seeds"]
    # a study problem alone, and a tune: problem alone, are still said alone
    with pytest.raises(StudyError) as info:
        parse_tune_spec({**BASE, "seeds": 0}, "s.yaml")
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith("s.yaml: seeds: ")
    with pytest.raises(StudyError) as info:
        parse_tune_spec({**BASE, "tune": {"trials": -1}}, "s.yaml")
    assert info.value.problems == ["s.yaml: tune.trials: must be an integer >= 0, got -1"]


def test_the_start_line_says_none_run_yet_where_no_node_fits_one_suggestion():
    # it said "2 at a time" (max_concurrent) where no node of Ray fits one suggestion: none starts until one joins
    from ablate.tune import TuneSettings, at_a_time

    s = TuneSettings(max_concurrent=2)
    said = at_a_time(s, 5, 4, 0, [{"Alive": True, "Resources": {"CPU": 2.0}}])
    assert said == ("none at a time yet: no node of the running Ray fits one suggestion of 4 CPU(s), so they wait for "
                    "one that does (lower resources: in the study file if none will join)")
    assert at_a_time(s, 1, 1, 1, [{"Resources": {"CPU": 8.0}}]).startswith(
        "none at a time yet: no node of the running Ray fits one suggestion of 1 CPU(s) and 1 GPU(s)")
    assert at_a_time(s, 5, 1, 0, [{"Alive": False, "Resources": {"CPU": 8.0}}]).startswith("none at a time yet")
    assert at_a_time(s, 5, 1, 0, None) == "2 at a time"  # (Ray not running here: max_concurrent, as before)


def test_the_independent_problems_of_the_tune_section_are_named_together():
    # the tune: section was checked a key at a time: the first bad key hid every other
    tune = {"trals": 3, "sampler": "annealing", "aggregate": "max", "max_concurrent": 0, "enqueue_baseline": 1,
            "params": {"nolr": {"low": 1, "high": 2}, "meta_lr": {"low": -1, "high": 1}}}
    with pytest.raises(StudyError) as info:
        parse_tune_spec({**BASE, "tune": tune}, "s.yaml")
    assert [p.split(": ")[1] for p in info.value.problems] == [
        "tune.trals", "tune.sampler", "tune.aggregate", "tune.params.nolr", "tune.params.meta_lr.low",
        "tune.max_concurrent", "tune.enqueue_baseline"]
    # a check that needs a refused key's value is left out (arm: x is no adamw arm to refuse priorities for)
    with pytest.raises(StudyError) as info:
        parse_tune_spec({**BASE, "tune": {"arm": "x", "priorities": False, "params": {}}}, "s.yaml")
    assert info.value.problems == ["s.yaml: tune.arm: 'x' is not allowed; choose one of: baseline, adamw"]
    # and the checks between keys are said beside the rest
    with pytest.raises(StudyError) as info:
        parse_tune_spec({**BASE, "adamw": True, "tune": {"arm": "adamw", "priorities": {"low": 1}, "cross_task": True,
                                                         "params": {}}}, "s.yaml")
    assert [p.split(": ")[1] for p in info.value.problems] == ["tune.priorities", "tune.params", "tune.cross_task"]


@pytest.mark.parametrize("objective", ["gradient", "loss_decrease", "gen_gap"])
def test_a_priority_search_over_a_single_term_says_why_and_what_to_search_instead(objective):
    # the refusal said "use ... a weighting of your own, or tune.priorities: false", and tune.priorities: false
    # alone was then refused in turn ("params: is empty, so there is nothing to search"); with one term no priority
    # means anything (they weigh terms against each other), and the advice it gives must be a spec that parses
    with pytest.raises(StudyError) as err:
        parse_tune_spec({**BASE, "baseline": {"objective": objective, "weighting": "huw_priority"}}, "s.yaml")
    said = str(err.value)
    others = [t for t in ("gradient", "loss_decrease", "gen_gap") if t != objective]
    assert said.startswith(f"s.yaml: tune.priorities: the baseline of task 'etth1' uses objective='{objective}', "
                           f"whose terms ['{objective}'] lack {others}: with a single term the priorities mean nothing")
    assert f"the priority of '{objective}' itself is largely absorbed by its learned log-variance" in said
    assert "(objective: combined)" in said
    assert said.endswith("set tune.priorities: false and name what to search in tune.params, e.g. params: "
                         "{meta_lr: {low: 1.0e-5, high: 1.0e-3, log: true}}")
    advised = {"priorities": False, "params": {"meta_lr": {"low": 1.0e-5, "high": 1.0e-3, "log": True}}}
    spec = parse_tune_spec({**BASE, "baseline": {"objective": objective, "weighting": "huw_priority"},
                            "tune": advised}, "s.yaml")
    assert list(spec.settings.space()) == ["meta_lr"] and spec.settings.space()["meta_lr"].log
