"""Independent checks of ablate tune's scores: the cross-task relative improvement over AdamW (a
negative reference metric; per-task aggregation before the mean over tasks) against values worked
out by hand, and the lockstep trainable of one suggestion whose seeds early-stop at different
epochs against what each seed gives trained alone to its own end. No Ray: :func:`score` is pure,
and the trainable runs in this process with Ray Tune's ``report`` replaced by a list."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

from ablate.tune import FINAL, OBJECTIVE, PRIORITY_PARAMS, build_targets, load_tune_spec, score, tune_trainable

# -- the cross-task score -------------------------------------------------------------------------


def _members(tasks: dict[str, int]) -> list[dict]:
    return [{"task": task, "seed": seed} for task, seeds in tasks.items() for seed in range(seeds)]


@pytest.mark.parametrize("mode, value, expected", [
    # a max metric below zero (a log-likelihood, say): -1.0 against AdamW's -2.0 is 50% better
    ("max", -1.0, 0.5),
    ("max", -3.0, -0.5),  # and -3.0 is 50% worse
    # a min metric below zero (a negative ELBO-style loss): -3.0 against AdamW's -2.0 is 50% better
    ("min", -3.0, 0.5),
    ("min", -1.0, -0.5),
])
def test_a_negative_reference_metric_still_gives_a_positive_improvement_when_the_suggestion_is_better(
        mode, value, expected):
    # relative to |reference|: dividing by the (negative) reference itself would flip the sign and
    # make the search maximise the harm done
    members = _members({"a": 2})
    refs = {"a/0": -2.0, "a/1": -2.0}
    for aggregate in ("mean", "median"):
        assert score([value, value], members, aggregate, refs, {"a": mode}) == pytest.approx(expected)


def test_a_cross_task_score_with_one_negative_and_one_positive_reference_averages_signed_improvements():
    # task neg (max, AdamW at -4.0 on seed 0 and -2.0 on seed 1), task pos (min, AdamW at 0.5 and 1.0)
    members = _members({"neg": 2, "pos": 2})
    refs = {"neg/0": -4.0, "neg/1": -2.0, "pos/0": 0.5, "pos/1": 1.0}
    # neg: (-3 - -4) / 4 = 0.25, (-1.5 - -2) / 2 = 0.25 -> mean 0.25
    # pos: (0.5 - 0.4) / 0.5 = 0.2, (1.0 - 0.7) / 1.0 = 0.3 -> mean 0.25; over tasks: 0.25
    value = score([-3.0, -1.5, 0.4, 0.7], members, "mean", refs, {"neg": "max", "pos": "min"})
    assert value == pytest.approx(0.25)  # (dividing by the reference itself: (-0.25 + 0.25) / 2 = 0)


def test_the_cross_task_median_is_taken_per_task_and_then_the_tasks_are_averaged():
    # three seeds of two tasks; per task the median over its seeds, then the plain mean of the
    # tasks - each task weighs the same, whatever the spread of the other's seeds
    members = _members({"a": 3, "b": 3})
    refs = {f"{t}/{s}": 1.0 for t in "ab" for s in range(3)}
    modes = {"a": "max", "b": "max"}
    values = [1.1, 1.2, 1.9,   # a: improvements 0.1, 0.2, 0.9 -> median 0.2
              1.0, 1.05, 1.06]  # b: improvements 0.0, 0.05, 0.06 -> median 0.05
    assert score(values, members, "median", refs, modes) == pytest.approx((0.2 + 0.05) / 2)  # 0.125
    # (the median of all six improvements pooled would be (0.06 + 0.1) / 2 = 0.08)
    assert score(values, members, "mean", refs, modes) == pytest.approx(((0.1 + 0.2 + 0.9) / 3 + 0.11 / 3) / 2)


def test_the_cross_task_median_of_a_min_and_a_max_task_with_different_references_per_seed():
    members = _members({"loss": 3, "acc": 3})
    refs = {"loss/0": 2.0, "loss/1": 4.0, "loss/2": 1.0, "acc/0": 0.5, "acc/1": 0.8, "acc/2": 0.4}
    modes = {"loss": "min", "acc": "max"}
    # loss: (2 - 1.0) / 2 = 0.5, (4 - 3.0) / 4 = 0.25, (1 - 0.1) / 1 = 0.9 -> median 0.5
    # acc: (0.55 - 0.5) / 0.5 = 0.1, (0.4 - 0.8) / 0.8 = -0.5, (0.6 - 0.4) / 0.4 = 0.5 -> median 0.1
    value = score([1.0, 3.0, 0.1, 0.55, 0.4, 0.6], members, "median", refs, modes)
    assert value == pytest.approx((0.5 + 0.1) / 2)  # pooled: median(-0.5, 0.1, 0.25, 0.5, 0.5, 0.9) = 0.375


# -- the lockstep trainable: seeds that early-stop at different epochs -----------------------------

#: validation loss per seed and epoch, patience 1 (min_delta 1e-3): seed 0 stops after epoch 3
#: (0.9 is no better than 0.8; trained on it would reach 0.6), seed 1 improves every epoch to the
#: budget of 5, seed 2 stops after epoch 4 (0.75 > 0.7; it would have reached 0.1).
SCRIPT = {0: [1.0, 0.8, 0.9, 0.7, 0.6], 1: [1.0, 0.9, 0.7, 0.6, 0.5], 2: [1.0, 0.9, 0.7, 0.75, 0.1]}
OWN_END = {0: (3, 0.8), 1: (5, 0.5), 2: (4, 0.7)}  # seed -> (epochs trained, best value)

PLUGIN = f'''
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ablate.tasks.base import TaskInstance, register_task

SCRIPT = {SCRIPT!r}


@register_task("tune_scores_es", metrics=[("loss", "min")],
               defaults={{"epochs": 5, "batch_size": 4, "patience": 1, "meta_every": 1000, "modulator_layers": 1,
                         "warmup_epochs": 0, "grouping": "original"}},
               description="synthetic: a scripted validation loss per seed and epoch")
def build(config):
    ds = TensorDataset(torch.zeros(4, 1), torch.zeros(4, 1))
    evaluations = []

    def loss_fn(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    def evaluate(model, loader):
        evaluations.append(1)
        return {{"loss": SCRIPT[config["seed"]][len(evaluations) - 1]}}

    return TaskInstance(name="tune_scores_es", model=nn.Linear(1, 1), train=ds, val=ds, loss_fn=loss_fn,
                        evaluate=evaluate, data_source="synthetic")
'''


def test_a_suggestion_whose_seeds_stop_early_at_different_epochs_scores_every_seed_at_its_own_end(
        tmp_path, monkeypatch):
    import ray.tune

    from ablate.trial import Trial

    (tmp_path / "tune_scores_es.py").write_text(PLUGIN)
    spec_path = tmp_path / "es.yaml"
    spec_path.write_text(textwrap.dedent("""\
        name: es
        tasks: [tune_scores_es]
        seeds: 3
        plugins: [tune_scores_es]
        adamw: false
        budget: {epochs: 5, patience: 1}
        tune:
          trials: 1
          aggregate: mean
          priorities: {low: 0.5, high: 2.0, log: true}
          scheduler: none
        """))
    spec = load_tune_spec(spec_path)
    (target,) = build_targets(spec)
    assert [m["seed"] for m in target.members] == [0, 1, 2]
    # the trainable's config as the search gives it (see _run_target), one suggestion's values added
    config = {"members": target.members, "modes": target.modes, "aggregate": "mean", "direction": target.direction,
              "references": target.references, "param_names": list(PRIORITY_PARAMS), "plugins": ["tune_scores_es"],
              "plugin_dir": str(tmp_path), "cwd": os.getcwd(), "cpus": 1, **{p: 1.0 for p in PRIORITY_PARAMS}}
    reports = []
    monkeypatch.setattr(ray.tune, "report", lambda metrics, **kw: reports.append(metrics))
    threads = torch.get_num_threads()
    try:
        tune_trainable(config)
    finally:  # (the trainable sets a Ray worker's threads to its CPUs: here, the test process's)
        torch.set_num_threads(threads)

    # one report per epoch up to the longest seed's end, and only the last one says final
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4, 5]
    assert [r[FINAL] for r in reports] == [False, False, False, False, True]
    last = reports[-1]
    assert json.loads(last["member_epochs"]) == [OWN_END[s][0] for s in (0, 1, 2)] == [3, 5, 4]
    assert json.loads(last["member_values"]) == pytest.approx([OWN_END[s][1] for s in (0, 1, 2)])
    assert last[OBJECTIVE] == pytest.approx((0.8 + 0.5 + 0.7) / 3) and last["objective_is_finite"] is True
    # each epoch's objective: the mean over seeds of the best so far, a stopped seed holding its best
    best_so_far = {s: [min(SCRIPT[s][:min(e, OWN_END[s][0])]) for e in range(1, 6)] for s in SCRIPT}
    assert [r[OBJECTIVE] for r in reports] == pytest.approx(
        [sum(best_so_far[s][e] for s in SCRIPT) / 3 for e in range(5)])
    assert [r["members_running"] for r in reports] == [3, 3, 2, 1, 0]

    # and each seed trained alone (as `ablate run` does) ends where the lockstep run left it
    for m in target.members:
        alone = Trial(dict(m["config"], priorities=[1.0, 1.0, 1.0]))
        alone.run()
        assert (alone.epoch, alone.best_value) == pytest.approx(OWN_END[m["seed"]]), m["seed"]
        assert alone.stop_reason == ("max_epochs" if m["seed"] == 1 else "early_stopping")
