"""Study files: parsing, expansion into trials, merging, factorial designs and every validation
error (ablate/study.py).

Most tests run on two tiny stand-in tasks registered here (``tiny_ts``, ``tiny_cls``) so they do
not depend on the real tasks; the shipped study files are parsed against the real registries.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import yaml

import metaadamw
from ablate.config import trial_id
from ablate.study import STUDY_KEYS, Study, StudyError, format_trials, load_study, parse_study
from ablate.tasks import TASKS, list_tasks, register_task

SEARCH_SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
PAPER_TASKS = ["etth1", "wikitext2", "multi30k", "cifar10", "imdb"]
COMPONENTS = {
    metaadamw.FEATURES: ["basic", "basic_plus", "enhanced", "norm_basic", "norm_basic_plus"],
    metaadamw.GROUPINGS: ["original", "fine_grained"],
    metaadamw.OBJECTIVES: ["gradient", "loss_decrease", "gen_gap", "combined"],
    metaadamw.WEIGHTINGS: ["sum", "fixed", "huw", "huw_priority"],
}
TINY_TASKS = {
    # a time-series-like task: gating on, its own K_meta and a model key
    "tiny_ts": dict(defaults={"epochs": 4, "meta_every": 50, "gating": True, "d_model": 16}, embedded_defaults={"d_model": 8}),
    # a classifier-like task: basic_plus features, its own priorities and a model key
    "tiny_cls": dict(defaults={"features": "basic_plus", "priorities": [1, 3, 5], "hidden": 8}),
}


# -- registries ----------------------------------------------------------------------------


@contextlib.contextmanager
def stand_in_components():
    """Register a placeholder for every intended component name that is not registered yet."""
    added = [(registry, name) for registry, names in COMPONENTS.items() for name in names if name not in registry]
    for registry, name in added:
        registry.add(name, type(f"StandIn_{name}", (), {}))  # (a class: components are callable)
    try:
        yield
    finally:
        for registry, name in added:
            registry.remove(name)


@contextlib.contextmanager
def stand_in_tasks(tasks: dict[str, dict]):
    """Register each task (name -> register_task keyword arguments) that is not registered yet."""
    added = [name for name in tasks if name not in list_tasks()]
    for name in added:
        register_task(name, metrics=[("loss", "min")], **tasks[name])(lambda config: None)
    try:
        yield
    finally:
        for name in added:
            TASKS.remove(name)


@pytest.fixture(autouse=True)
def tiny_tasks():
    with stand_in_components(), stand_in_tasks(TINY_TASKS):
        yield


def real_registries_or_skip() -> None:
    missing = [t for t in PAPER_TASKS if t not in list_tasks()]
    missing += [n for registry, names in COMPONENTS.items() for n in names if n not in registry]
    if missing:
        pytest.skip(f"the real tasks/components are not all registered yet (missing: {', '.join(missing)})")


# -- helpers -------------------------------------------------------------------------------

BASE = {"name": "t", "tasks": ["tiny_ts", "tiny_cls"], "seeds": 2}


def write(tmp_path: Path, mapping_or_text, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    text = mapping_or_text if isinstance(mapping_or_text, str) else yaml.safe_dump(mapping_or_text, sort_keys=False)
    path.write_text(text)
    return path


def load(tmp_path: Path, **fields) -> Study:
    return load_study(write(tmp_path, {**BASE, **fields}))


def error(tmp_path: Path, mapping_or_text) -> str:
    with pytest.raises(StudyError) as info:
        load_study(write(tmp_path, mapping_or_text))
    return str(info.value)


def trial(study: Study, task: str, arm: str, seed: int = 0):
    (found,) = [t for t in study.trials if t.task == task and t.seed == seed and arm in t.arms]
    return found


def check_invariants(study: Study) -> None:
    """Every (task, seed) holds every arm exactly once; ids are unique and match the configs."""
    ids = [t.trial_id for t in study.trials]
    assert len(ids) == len(set(ids))
    for t in study.trials:
        assert t.trial_id == trial_id(t.config)
        assert json.loads(json.dumps(t.config)) == t.config
        assert (t.config["task"], t.config["seed"]) == (t.task, t.seed)
        assert t.arm == t.arms[0]
        assert t.axis == study.arm_axes[t.arm]
    for task, seed in itertools.product(study.tasks, study.seeds):
        arms = [a for t in study.trials if (t.task, t.seed) == (task, seed) for a in t.arms]
        assert sorted(arms) == sorted(study.arms())


# -- shipped study files -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quick", "paper", "factorial"])
def test_shipped_study_files_parse_with_the_real_registries(name):
    real_registries_or_skip()
    study = load_study(SEARCH_SPACES / f"{name}.yaml")
    check_invariants(study)
    assert study.name == name
    assert study.tasks == (["etth1", "imdb"] if name == "factorial" else PAPER_TASKS)
    assert format_trials(study).count("\n") > len(study.trials)


def test_quick_study_is_small_and_embedded():
    real_registries_or_skip()
    study = load_study(SEARCH_SPACES / "quick.yaml")
    assert study.data == "embedded" and study.seeds == [0, 1, 2]
    assert study.arms() == ["adamw", "baseline", "grouping=original", "features=basic_plus", "objective=loss_decrease",
                            "weighting=none", "modulator_init=zero"]
    assert len(study.trials) == 5 * 3 * 7 - 3  # features=basic_plus is imdb's baseline
    assert all(t.config["epochs"] == 4 for t in study.trials)


def test_paper_study_covers_table_3():
    real_registries_or_skip()
    study = load_study(SEARCH_SPACES / "paper.yaml")
    assert study.data == "real" and study.seeds == list(range(5))
    axes = {axis for axis in study.arm_axes.values() if axis}
    assert axes == {"grouping", "features", "objective", "weighting", "gating", "meta_per_epoch", "modulator_size"}
    assert len(study.arms()) == 2 + 2 + 3 + 4 + 2 + 2 + 3 + 2
    assert all(t.config["patience"] == 2 for t in study.trials)
    # Table 3's HUW levels: none, priorities [1, 1, 1] (and tuned). `weighting: huw` is huw_priority with
    # [1, 1, 1] under another name: as a level of its own it reran the baseline on etth1 and wikitext2 (and
    # huw_priority_111 on the other tasks) in a trial of another id, 25 trials and a Table 3 row of nothing
    def computation(config):
        if config["weighting"] == "huw":
            config = {**config, "weighting": "huw_priority", "priorities": [1.0, 1.0, 1.0]}
        return json.dumps(config, sort_keys=True)

    for task, seed in itertools.product(study.tasks, study.seeds):
        trials = [t for t in study.trials if (t.task, t.seed) == (task, seed)]
        same = len(trials) - len({computation(t.config) for t in trials})
        assert same == 0, (task, [t.arm for t in trials])
    large = trial(study, "etth1", "modulator_size=layers64_ff64").config
    assert (large["modulator_layers"], large["modulator_ff"]) == (64, 64)
    assert trial(study, "cifar10", "modulator_size=layers64_ff64") is trial(study, "cifar10", "baseline"), \
        "Table 4's CIFAR-10 modulator is 64 x 64: that level is its baseline"


def test_factorial_study_and_its_fractional_variant():
    real_registries_or_skip()
    mapping = yaml.safe_load((SEARCH_SPACES / "factorial.yaml").read_text())
    full = parse_study(mapping)
    assert sum(axis == "factorial" for axis in full.arm_axes.values()) == 8
    for variant in ({"fraction": 2}, {"generators": ["C=AB"]}):
        mapping["factorial"] = {"axes": mapping["factorial"]["axes"], **variant}
        assert sum(axis == "factorial" for axis in parse_study(mapping).arm_axes.values()) == 4


@pytest.mark.parametrize("name", ["quick", "paper", "factorial"])
def test_shipped_study_files_have_the_documented_shape(name):
    """With stand-ins for tasks not registered yet, so this runs before the real tasks exist."""
    with stand_in_tasks({t: {"defaults": {}} for t in PAPER_TASKS}):
        study = load_study(SEARCH_SPACES / f"{name}.yaml")
    check_invariants(study)


# -- expansion -----------------------------------------------------------------------------


def test_trials_are_tasks_times_seeds_times_arms(tmp_path):
    study = load(
        tmp_path,
        ablations={"grouping": ["original"], "objective": ["gradient", "gen_gap"], "size": {"big": {"modulator_layers": 16}}},
    )
    check_invariants(study)
    assert study.arms() == ["adamw", "baseline", "grouping=original", "objective=gradient", "objective=gen_gap", "size=big"]
    assert len(study.trials) == 2 * 2 * 6
    assert [t.arm for t in study.trials[:6]] == study.arms()
    assert [(t.task, t.seed) for t in study.trials[::6]] == [("tiny_ts", 0), ("tiny_ts", 1), ("tiny_cls", 0), ("tiny_cls", 1)]
    assert trial(study, "tiny_ts", "size=big").axis == "size"
    assert trial(study, "tiny_ts", "baseline").axis == trial(study, "tiny_ts", "adamw").axis == ""
    assert trial(study, "tiny_ts", "size=big").config["modulator_layers"] == 16


def test_the_dry_run_names_a_merge_of_two_arms(tmp_path):
    study = load(tmp_path, ablations={"grouping": ["fine_grained"]})  # the baseline's own grouping: one trial
    text = format_trials(study)
    for task in ("tiny_ts", "tiny_cls"):
        assert f"merged on {task} (same trial): baseline = grouping=fine_grained" in text
    assert f"(a merged trial counts in each of its arms above: {len(study.trials)} distinct trials)" in text


def test_the_dry_run_of_a_big_study_counts_its_trials_and_lists_them_with_list(tmp_path, capsys):
    # 3,830 trials printed 3,924 lines of up to 516 characters before the counts per arm and task
    from ablate.cli import main
    from ablate.study import LISTED_TRIALS

    study = load(tmp_path, seeds=60, ablations={"gating": [True], "modulator_layers": [2, 4]})
    assert len(study.trials) > LISTED_TRIALS
    spec, out = str(study.path), str(tmp_path / "results")
    assert main(["run", spec, "--dry-run", "--out", out]) == 0
    short = capsys.readouterr().out
    assert f"study {study.name}: {len(study.trials)} trials (one line per trial with --list)" in short
    assert "trials per arm and task" in short and study.trials[0].trial_id not in short
    assert len(short.splitlines()) < 20
    assert main(["run", spec, "--dry-run", "--list", "--out", out]) == 0
    listed = capsys.readouterr().out
    assert all(t.trial_id in listed for t in study.trials) and "trials per arm and task" in listed
    assert main(["run", spec, "--list", "--out", out]) == 2
    assert "--list lists the trials of a dry run: add --dry-run" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_trial_configs_layer_budget_baseline_and_arm(tmp_path):
    study = load(tmp_path, budget={"epochs": 2, "batch_size": 8}, baseline={"gating": False}, ablations={"gating": [True]})
    baseline, arm = trial(study, "tiny_ts", "baseline").config, trial(study, "tiny_ts", "gating=true").config
    assert (baseline["epochs"], baseline["batch_size"], baseline["gating"], arm["gating"]) == (2, 8, False, True)
    assert baseline["optimizer"] == "metaadamw" and baseline["data"] == "embedded"
    assert baseline["d_model"] == 8  # the task's embedded default
    assert trial(study, "tiny_ts", "adamw").config["epochs"] == 2  # the budget applies to AdamW too


def test_a_level_equal_to_the_baseline_is_merged_into_its_trial(tmp_path):
    study = load(tmp_path, ablations={"features": ["basic", "basic_plus"], "grouping": ["fine_grained"]})
    check_invariants(study)
    assert study.arms() == ["adamw", "baseline", "features=basic", "features=basic_plus", "grouping=fine_grained"]
    ts_baseline = trial(study, "tiny_ts", "baseline")
    assert ts_baseline.arms == ["baseline", "features=basic", "grouping=fine_grained"]
    assert trial(study, "tiny_cls", "baseline").arms == ["baseline", "features=basic_plus", "grouping=fine_grained"]
    assert len(study.trials) == 2 * 2 * 3
    text = format_trials(study)
    assert "merged on tiny_ts (same trial): baseline = features=basic = grouping=fine_grained" in text
    # every arm gets its row, merged trials counted in each of their arms (they had 0 or no row)
    assert re.search(r"\ngrouping=fine_grained\s+2\s+2\s+4\n", text) and re.search(r"\nfeatures=basic\s+2\s+2\s+4\n", text)
    assert "(a merged trial counts in each of its arms above: 12 distinct trials)" in text


def test_named_levels_with_the_same_settings_are_merged(tmp_path):
    study = load(tmp_path, ablations={"weighting": {"none": {"weighting": "sum"}, "plain": {"weighting": "sum"}}})
    assert trial(study, "tiny_ts", "weighting=none").arms == ["weighting=none", "weighting=plain"]


def test_overrides_apply_to_their_task_and_to_adamw_where_the_key_applies(tmp_path):
    study = load(
        tmp_path,
        overrides={"tiny_ts": {"lr": 1e-3, "meta_every": 20}},
        ablations={"meta_per_epoch": [2]},
    )
    assert trial(study, "tiny_ts", "baseline").config["meta_every"] == 20
    assert trial(study, "tiny_ts", "baseline").config["lr"] == 1e-3
    assert trial(study, "tiny_ts", "adamw").config["lr"] == 1e-3
    assert trial(study, "tiny_cls", "baseline").config["lr"] == 5e-4
    # an arm that sets the frequency per epoch replaces the override's K_meta instead of contradicting it
    assert trial(study, "tiny_ts", "meta_per_epoch=2").config["meta_per_epoch"] == 2


def test_adamw_arm_takes_a_dict_of_settings(tmp_path):
    path = write(tmp_path, "name: t\ntasks: [tiny_ts]\nseeds: 1\nadamw: {lr: 1e-3, weight_decay: 0.1}\n")
    config = trial(load_study(path), "tiny_ts", "adamw").config
    assert config["optimizer"] == "adamw"
    assert config["lr"] == 0.001 and isinstance(config["lr"], float)  # 1e-3 is a number, not YAML 1.1's string
    assert config["weight_decay"] == 0.1


def test_adamw_false_leaves_only_metaadamw_arms(tmp_path):
    study = load(tmp_path, adamw=False)
    assert study.arms() == ["baseline"]
    assert {t.config["optimizer"] for t in study.trials} == {"metaadamw"}


@pytest.mark.parametrize(
    ("seeds", "extra", "expected"),
    [(3, None, [0, 1, 2]), ([4, 9], None, [4, 9]), (2, 2, [0, 1, 2, 3]), ([5], [1, 2], [5, 1, 2])],
)
def test_seeds_int_list_and_extra_seeds(tmp_path, seeds, extra, expected):
    study = load_study(write(tmp_path, {**BASE, "seeds": seeds}), extra_seeds=extra)
    assert study.seeds == expected
    assert sorted({t.seed for t in study.trials}) == sorted(expected)
    assert len(study.trials) == 2 * len(expected) * 2


def test_study_fields(tmp_path):
    study = load(tmp_path, description="d", resources={"gpus": 0.5}, retries=2, data="real", data_dir="datasets")
    assert (study.description, study.resources, study.retries) == ("d", {"cpus": 1, "gpus": 0.5}, 2)
    assert study.path == tmp_path / "s.yaml"
    # a relative data_dir is relative to the study file
    assert trial(study, "tiny_ts", "baseline").config["data_dir"] == str(tmp_path / "datasets")
    assert trial(study, "tiny_ts", "baseline").config["d_model"] == 16  # real data: no embedded defaults


def test_empty_keys_take_their_defaults(tmp_path):
    study = load_study(write(tmp_path, "name: t\ntasks: [tiny_ts]\nseeds: 1\nbudget:\noverrides:\nablations:\nadamw:\n"))
    assert study.arms() == ["adamw", "baseline"]


def test_format_trials_lists_every_trial_and_a_summary(tmp_path):
    study = load(tmp_path, ablations={"features": ["enhanced"]})
    text = format_trials(study)
    for t in study.trials:
        assert t.trial_id in text
    assert re.search(r"tiny_ts\s+seed=1\s+adamw\s+optimizer=adamw", text)
    assert re.search(r"tiny_cls\s+seed=0\s+features=enhanced\s+features=enhanced", text)
    assert "trials per arm and task (2 tasks x 2 seeds)" in text
    assert re.search(r"features=enhanced\s+2\s+2\s+4", text)


# -- factorial designs ---------------------------------------------------------------------

TWO_LEVEL_AXES = {
    "grouping": ["original", "fine_grained"],
    "gating": [False, True],
    "objective": ["gradient", "combined"],
    "features": ["basic", "enhanced"],
    "time_step": [False, True],
    "second_moment": [False, True],
}


def design(study: Study, axes: dict[str, list]) -> list[list[int]]:
    """The factorial cells of one task and seed as rows of -1/+1 codes (first/second level)."""
    cells = [t for t in study.trials if t.task == "tiny_ts" and t.seed == 0 and any(a.startswith("factorial:") for a in t.arms)]
    return [[1 if t.config[axis] == levels[1] else -1 for axis, levels in axes.items()] for t in cells]


def factorial_study(**factorial) -> Study:
    return parse_study({**BASE, "tasks": ["tiny_ts"], "seeds": 1, "adamw": False, "factorial": factorial})


def test_full_factorial_grid(tmp_path):
    axes = dict(itertools.islice(TWO_LEVEL_AXES.items(), 3))
    study = factorial_study(axes={**axes, "modulator_size": {"s": {"modulator_layers": 2}, "m": {}, "l": {"modulator_layers": 32}}})
    cells = [a for a in study.arms() if a.startswith("factorial:")]
    assert len(cells) == 2 * 2 * 2 * 3
    assert cells[0] == "factorial:grouping=original,gating=false,objective=gradient,modulator_size=s"
    check_invariants(study)
    # the cell equal to tiny_ts's baseline (fine_grained, gating on, combined, its own size) is merged
    assert trial(study, "tiny_ts", "baseline").arms == ["baseline", "factorial:grouping=fine_grained,gating=true,objective=combined,modulator_size=m"]


@pytest.mark.parametrize(
    "fractional",
    [{"fraction": 2}, {"generators": ["C=AB"]}, {"generators": ["C = -AB"]}, {"generators": ["A=BC"]}],
)
def test_half_fraction_of_three_axes_is_balanced_and_orthogonal(fractional):
    axes = dict(itertools.islice(TWO_LEVEL_AXES.items(), 3))
    rows = design(factorial_study(axes=axes, **fractional), axes)
    assert len(rows) == 4
    assert_balanced_and_orthogonal(rows)


def test_the_two_halves_make_the_full_grid():
    axes = dict(itertools.islice(TWO_LEVEL_AXES.items(), 3))
    halves = [design(factorial_study(axes=axes, generators=[g]), axes) for g in ("C=AB", "C=-AB")]
    assert sorted(halves[0] + halves[1]) == sorted(map(list, itertools.product([-1, 1], repeat=3)))


@pytest.mark.parametrize(("k", "fraction", "resolution"), [(4, 2, 4), (5, 2, 5), (5, 4, 3), (6, 4, 4), (6, 2, 6)])
def test_automatic_fractions_have_the_best_resolution(k, fraction, resolution):
    axes = dict(itertools.islice(TWO_LEVEL_AXES.items(), k))
    rows = design(factorial_study(axes=axes, fraction=fraction), axes)
    assert len(rows) == 2**k // fraction
    assert_balanced_and_orthogonal(rows)
    assert design_resolution(rows) == resolution


def assert_balanced_and_orthogonal(rows: list[list[int]]) -> None:
    """Each level of each axis equally often; each pair of axes sees its 4 combinations equally
    often (so the main effects are orthogonal)."""
    columns = list(zip(*rows))
    for column in columns:
        assert sum(column) == 0
    for a, b in itertools.combinations(columns, 2):
        pairs = list(zip(a, b))
        assert all(pairs.count(combo) == len(rows) // 4 for combo in itertools.product([-1, 1], repeat=2))


def design_resolution(rows: list[list[int]]) -> int:
    """The length of the shortest word: the fewest columns whose product is constant."""
    columns = list(zip(*rows))
    for size in range(1, len(columns) + 1):
        for subset in itertools.combinations(columns, size):
            products = {math.prod(values) for values in zip(*subset)}
            if len(products) == 1:
                return size
    return len(columns) + 1  # a full grid: no word at all


# -- validation ----------------------------------------------------------------------------

ERRORS = [
    # (fields merged into BASE, substrings the message must contain)
    ({"budgte": {}}, ["s.yaml: budgte", "did you mean 'budget'", "allowed keys: name, description"]),
    ({"name": None}, ["s.yaml: name", "is required"]),
    ({"name": "a b"}, ["s.yaml: name", "[A-Za-z0-9_-]+", "'a b'"]),
    ({"name": True}, ["s.yaml: name", "got True (YAML reads on, off, yes, no, true and false unquoted as True: quote "
                                      "the name, name: \"on\")"]),  # (name: on)
    ({"name": 2024}, ["s.yaml: name", "got 2024 (YAML reads an unquoted number as one: quote the name)"]),
    ({"description": 3}, ["description", "string"]),
    ({"tasks": ["tiny_ts", "nope"]}, ["s.yaml: tasks[1]", "'nope'", "tiny_cls", "tiny_ts"]),
    ({"tasks": []}, ["s.yaml: tasks", "non-empty"]),
    ({"tasks": "tiny_ts"}, ["s.yaml: tasks", "list"]),
    ({"tasks": ["tiny_ts", "tiny_ts"]}, ["tasks[1]", "twice"]),
    ({"seeds": True}, ["s.yaml: seeds", "True", "integer N"]),
    ({"seeds": 0}, ["s.yaml: seeds", "must be in 1.."]),
    ({"seeds": []}, ["s.yaml: seeds", "non-empty list"]),
    ({"seeds": [0, 1, 0]}, ["s.yaml: seeds[2]", "twice"]),
    ({"seeds": [0, -1]}, ["s.yaml: seeds[1]", ">= 0"]),
    ({"seeds": [0, 1.5]}, ["s.yaml: seeds[1]", "integer", "1.5"]),
    ({"data": "cloud"}, ["s.yaml: data", "'cloud'", "embedded, real"]),
    ({"data_dir": "/data"}, ["s.yaml: data_dir", "'embedded'", "data: real"]),
    ({"budget": {"epochs": 2.5}}, ["s.yaml: budget.epochs", "integer", "2.5"]),
    ({"budget": {"epochs": True}}, ["s.yaml: budget.epochs", "integer", "True"]),
    ({"budget": {"epochs": -1}}, ["s.yaml: budget.epochs", "> 0"]),
    ({"budget": {"epoch": 3}}, ["s.yaml: budget.epoch", "did you mean 'epochs'", "Common keys: device, num_threads, epochs", "keys of task tiny_ts: d_model"]),
    ({"budget": {"d_model": 8}}, ["s.yaml: budget.d_model", "tiny_ts only", "overrides.<task>"]),
    # (an override sets the key on every arm of its task, the baseline included: it cannot ablate the key)
    ({"ablations": {"d_model": [8]}}, ["s.yaml: ablations.d_model[0]", "tiny_ts only", "to ablate it, run the axis in "
                                       "a study of tiny_ts only (under overrides.<task> it would change every arm"]),
    ({"factorial": {"axes": {"d_model": [8, 16]}}}, ["s.yaml: factorial.axes.d_model[0]", "a study of tiny_ts only"]),
    ({"budget": {"seed": 1}}, ["s.yaml: budget.seed", "seeds:"]),
    ({"budget": {"optimizer": "adamw"}}, ["s.yaml: budget.optimizer", "adamw:"]),
    ({"budget": {"meta_every": 5, "meta_per_epoch": 2}}, ["s.yaml: budget", "meta_every", "meta_per_epoch", "give only one"]),
    ({"budget": [1]}, ["s.yaml: budget", "mapping"]),
    ({"baseline": {"features": "fancy"}}, ["s.yaml: baseline.features", "'fancy'", "basic, basic_plus"]),
    ({"resources": {"cpus": 0}}, ["s.yaml: resources.cpus", "> 0"]),
    ({"resources": {"cpus": True}}, ["s.yaml: resources.cpus", "True"]),
    ({"resources": {"gpus": -1}}, ["s.yaml: resources.gpus", ">= 0"]),
    ({"resources": {"memory": 4}}, ["s.yaml: resources.memory", "unknown key", "cpus, gpus"]),
    ({"retries": -1}, ["s.yaml: retries", ">= 0"]),
    ({"retries": 1.5}, ["s.yaml: retries", "integer"]),
    ({"plugins": "mod"}, ["s.yaml: plugins", "list of module names"]),
    ({"plugins": ["not a module"]}, ["s.yaml: plugins[0]", "'not a module'"]),
    ({"adamw": "yes"}, ["s.yaml: adamw", "true, false or a mapping"]),
    ({"adamw": {"gating": True}}, ["s.yaml: adamw.gating", "MetaAdamW setting"]),
    ({"adamw": {"lr": -1}}, ["s.yaml: adamw.lr", "> 0"]),
    ({"overrides": {"other": {"lr": 1e-3}}}, ["s.yaml: overrides.other", "tiny_ts, tiny_cls"]),
    ({"overrides": {"tiny_cls": {"d_model": 8}}}, ["s.yaml: overrides.tiny_cls.d_model", "unknown config key", "keys of task tiny_cls: hidden"]),
    ({"overrides": {"tiny_ts": {"d_model": "wide"}}}, ["s.yaml: overrides.tiny_ts.d_model", "(task tiny_ts)", "'wide'"]),
    ({"ablations": {"features": ["basic_plus", "fancy"]}}, ["s.yaml: ablations.features[1]", "'fancy'", "basic, basic_plus, enhanced"]),
    ({"ablations": {"features": ["basic", "basic"]}}, ["s.yaml: ablations.features[1]", "twice"]),
    ({"ablations": {"features": []}}, ["s.yaml: ablations.features", "non-empty"]),
    ({"ablations": {"gating": [1]}}, ["s.yaml: ablations.gating[0]", "true/false"]),
    ({"ablations": {"modulator_size": [8, 64]}}, ["s.yaml: ablations.modulator_size", "not a config key", "level_name"]),
    ({"ablations": {"size": {"small": {"modulator_layer": 8}}}}, ["s.yaml: ablations.size.small.modulator_layer", "did you mean 'modulator_layers'"]),
    ({"ablations": {"size": {"small": 8}}}, ["s.yaml: ablations.size.small", "mapping"]),
    ({"ablations": {"size": {"a b": {}}}}, ["s.yaml: ablations.size.a b", "level names"]),
    ({"ablations": {"freq": {"both": {"meta_every": 5, "meta_per_epoch": 2}}}}, ["s.yaml: ablations.freq.both", "give only one"]),
    ({"ablations": {"priorities": [[1, 1]]}}, ["s.yaml: ablations.priorities[0]", "three non-negative numbers"]),
    ({"factorial": {"fraction": 2}}, ["s.yaml: factorial.axes", "is required"]),
    ({"factorial": {"axes": {}}}, ["s.yaml: factorial.axes", "non-empty"]),
    ({"factorial": {"axes": {"gating": [False, True]}, "levels": 2}}, ["s.yaml: factorial.levels", "axes, fraction, generators"]),
    (
        {"factorial": {"axes": {"gating": [False, True], "features": ["basic", "basic_plus", "enhanced"]}, "fraction": 2}},
        ["s.yaml: factorial.fraction", "exactly two levels", "features (3 levels)"],
    ),
    ({"factorial": {"axes": dict(itertools.islice(TWO_LEVEL_AXES.items(), 3)), "fraction": 3}}, ["s.yaml: factorial.fraction", "power of two"]),
    ({"factorial": {"axes": dict(itertools.islice(TWO_LEVEL_AXES.items(), 3)), "fraction": 4}}, ["s.yaml: factorial.fraction", "largest fraction is 2"]),
    (
        {"factorial": {"axes": dict(itertools.islice(TWO_LEVEL_AXES.items(), 3)), "fraction": 2, "generators": ["C=AB"]}},
        ["s.yaml: factorial", "not both"],
    ),
    ({"factorial": {"axes": dict(itertools.islice(TWO_LEVEL_AXES.items(), 3)), "generators": ["C=A"]}}, ["factorial.generators[0]", "two or more", "A=grouping, B=gating, C=objective"]),
    ({"factorial": {"axes": dict(itertools.islice(TWO_LEVEL_AXES.items(), 3)), "generators": ["D=AB"]}}, ["factorial.generators[0]", "letter D names no axis"]),
    ({"factorial": {"axes": dict(itertools.islice(TWO_LEVEL_AXES.items(), 3)), "generators": ["C=AB", "C=AB"]}}, ["factorial.generators[1]", "generated twice"]),
    ({"factorial": {"axes": dict(itertools.islice(TWO_LEVEL_AXES.items(), 4)), "generators": ["C=AB", "D=AB"]}}, ["factorial.generators[1]", "share a right-hand side"]),
    ({"factorial": {"axes": dict(itertools.islice(TWO_LEVEL_AXES.items(), 4)), "fraction": 4}}, ["s.yaml: factorial.fraction", "largest fraction is 2"]),
    ({"factorial": {"axes": dict(itertools.islice(TWO_LEVEL_AXES.items(), 4)), "generators": ["D=AB", "C=AD"]}}, ["factorial.generators[1]", "no generator defines"]),
    ({"factorial": {"axes": dict(itertools.islice(TWO_LEVEL_AXES.items(), 4)), "generators": ["CAB"]}}, ["factorial.generators[0]", "'CAB'", "like 'C=AB'"]),
    (
        {"factorial": {"axes": {"gating": [False, True], "gate": {"on": {"gating": True}, "off": {"gating": False}}}}},
        ["s.yaml: factorial.axes.gate", "'gating'", "independent"],
    ),
    # the reports told arms 'adamw=fast' and 'baseline=slow' from ablation arms by their axis
    ({"ablations": {"adamw": {"fast": {"lr": 0.01}}}}, ["s.yaml: ablations.adamw", "cannot name an ablation axis",
                                                         "'adamw=<level>' as the AdamW arm", "name the axis otherwise"]),
    ({"ablations": {"baseline": {"slow": {"lr": 1e-4}}}}, ["s.yaml: ablations.baseline", "as the baseline"]),
    ({"ablations": {"factorial": {"big": {"lr": 1e-4}}}}, ["s.yaml: ablations.factorial", "as factorial cells"]),
]


@pytest.mark.parametrize(("fields", "expected"), ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_validation_errors_name_the_file_the_field_and_the_fix(tmp_path, fields, expected):
    message = error(tmp_path, {key: value for key, value in {**BASE, **fields}.items()})
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_a_study_that_expands_too_far_is_refused(tmp_path):
    message = error(tmp_path, {**BASE, "seeds": 20_000})
    assert "s.yaml" in message and "trials, more than 20000" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: t\ntasks: [tiny_ts\nseeds: 1\n", r"s\.yaml:\d+:\d+: invalid YAML: .*"),
        ("name: t\ntasks: [tiny_ts]\nname: u\nseeds: 1\n", r"s\.yaml:3:1: invalid YAML: .*duplicate key 'name'"),
        ("name: t\n  tasks: x\n", r"s\.yaml:2:8: invalid YAML"),
        ("name: t\ndescription: 2024-13-45\n", r"s\.yaml:2:14: invalid YAML: cannot read '2024-13-45'"),
        ("", r"s\.yaml: the file is empty"),  # (it said "a study must be a mapping ...; got None")
        ("- name\n", r"s\.yaml: a study must be a mapping .* got \['name'\]"),
        ("name: t\ntasks: [tiny_ts]\nseeds: 1\ndescription: 2024-01-01\n", r"s\.yaml: description: .*date.*quote"),
        ("name: t\ntasks: [tiny_ts]\nseeds: 1\nablations: {1: [x]}\n", r"s\.yaml: ablations: key 1 \(int\) is not a string; quote it"),
        ("a: &x [*x]\n", r"s\.yaml: a\[0\]: contains itself"),
    ],
)
def test_yaml_problems_name_the_file_and_position(tmp_path, text, expected):
    assert re.search(expected, error(tmp_path, text)), error(tmp_path, text)


def test_a_missing_file_is_a_study_error(tmp_path):
    with pytest.raises(StudyError, match="nope.yaml: cannot read the study file"):
        load_study(tmp_path / "nope.yaml")


def test_parse_study_names_its_source():
    with pytest.raises(StudyError, match=r"^<string>: seeds"):
        parse_study({**BASE, "seeds": "three"})
    with pytest.raises(StudyError, match=r"^cli: seeds"):
        parse_study({**BASE, "seeds": "three"}, source="cli")


@pytest.mark.parametrize(("extra", "expected"), [(0, "extra_seeds: must be an integer N >= 1"), ([1], "extra_seeds[0]: seed 1 is given twice"), ("x", "extra_seeds")])
def test_bad_extra_seeds(tmp_path, extra, expected):
    with pytest.raises(StudyError, match=re.escape(expected)):
        load_study(write(tmp_path, BASE), extra_seeds=extra)


def test_a_value_that_contradicts_a_task_default_names_the_field_and_the_task(tmp_path):
    with stand_in_tasks({"tiny_heads": {"defaults": {"modulator_heads": 5}}}):
        message = error(tmp_path, {**BASE, "tasks": ["tiny_ts", "tiny_heads"], "ablations": {"modulator_width": [12]}})
    assert "s.yaml: arm 'modulator_width=12' on task 'tiny_heads'" in message
    assert "modulator_width=12 is not a multiple of modulator_heads=5" in message


def test_keys_constrained_together_may_come_from_different_layers(tmp_path):
    # modulator_width must be a multiple of modulator_heads (and a task's d_model of its n_heads):
    # a width set by an arm is checked against the heads of the trial's whole config, not the defaults
    study = load(tmp_path, baseline={"modulator_heads": 5}, ablations={"modulator_width": [10, 20]})
    assert {t.config["modulator_width"] for t in study.trials} == {None, 10, 20}
    study = load(tmp_path, tasks=["etth1"], overrides={"etth1": {"d_model": 96, "n_heads": 3}})
    assert {(t.config["d_model"], t.config["n_heads"]) for t in study.trials} == {(96, 3)}
    study = load(tmp_path, tasks=["etth1"], baseline={"n_heads": 3}, overrides={"etth1": {"d_model": 96}})
    assert {t.arm: (t.config["d_model"], t.config["n_heads"]) for t in study.trials} == {
        "baseline": (96, 3), "adamw": (96, 4)}  # (the AdamW arm has no baseline settings)
    message = error(tmp_path, {**BASE, "tasks": ["etth1"], "overrides": {"etth1": {"n_heads": 3}}})
    # (the task said once: it said "on task 'etth1': etth1: d_model=32 ...")
    assert "on task 'etth1': d_model=32 is not a multiple of n_heads=3: choose d_model divisible by n_heads" in message


def test_layers_that_contradict_each_other_name_the_arm_and_the_task(tmp_path):
    message = error(tmp_path, {**BASE, "budget": {"modulator_width": 12}, "ablations": {"heads": {"five": {"modulator_heads": 5}}}})
    assert "s.yaml: arm 'heads=five' on task 'tiny_ts'" in message and "multiple of modulator_heads=5" in message


# -- plugins -------------------------------------------------------------------------------


@pytest.fixture
def isolated_imports(monkeypatch):
    """Restore sys.path and forget the test plugin modules afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [m for m in sys.modules if m.startswith("study_plugin_")]:
        del sys.modules[name]


def test_a_plugin_next_to_the_study_file_registers_a_feature_extractor(tmp_path, isolated_imports):
    (tmp_path / "study_plugin_features.py").write_text(
        "from metaadamw import FEATURES\nfrom metaadamw.features import FeatureExtractor\n\n\n"
        "class PluginFeatures(FeatureExtractor):\n    def __init__(self, layout, *, time_step, second_moment):\n"
        "        super().__init__(layout, time_step=time_step, second_moment=second_moment)\n\n\n"
        "FEATURES.add('plugin_features', PluginFeatures)\n"
    )
    try:
        study = load(tmp_path, plugins=["study_plugin_features"], ablations={"features": ["plugin_features"]})
        assert study.plugins == ["study_plugin_features"]
        assert trial(study, "tiny_ts", "features=plugin_features").config["features"] == "plugin_features"
        assert str(tmp_path) in sys.path
    finally:
        metaadamw.FEATURES.remove("plugin_features")


def test_a_plugin_package_next_to_the_study_file_is_found(tmp_path, isolated_imports):
    package = tmp_path / "study_plugin_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "objectives.py").write_text("from metaadamw import OBJECTIVES\n\nOBJECTIVES.add('plugin_objective', type('PluginObjective', (), {}))\n")
    try:
        study = load(tmp_path, plugins=["study_plugin_pkg.objectives"], baseline={"objective": "plugin_objective"})
        assert trial(study, "tiny_cls", "baseline").config["objective"] == "plugin_objective"
    finally:
        metaadamw.OBJECTIVES.remove("plugin_objective")


def test_a_failing_plugin_names_the_module_and_the_exception(tmp_path, isolated_imports):
    (tmp_path / "study_plugin_broken.py").write_text("raise RuntimeError('no GPU driver here')\n")
    message = error(tmp_path, {**BASE, "plugins": ["study_plugin_broken"]})
    assert "s.yaml: plugins[0]" in message
    assert "'study_plugin_broken'" in message and "RuntimeError: no GPU driver here" in message


def test_a_missing_plugin_names_the_module(tmp_path, isolated_imports):
    message = error(tmp_path, {**BASE, "plugins": ["study_plugin_missing"]})
    assert "plugins[0]" in message and "ModuleNotFoundError" in message and "study_plugin_missing.py next to the study file" in message


@pytest.mark.parametrize("resources, budget, message", [
    ("{cpus: 4096}", "{epochs: 1}", "resources.cpus=4096, but Ray runs here with"),
    ("{cpus: 1, gpus: 4096}", "{epochs: 1}", "resources.gpus=4096, but this machine has"),
    ("{cpus: 1, gpus: 0}", "{epochs: 1, device: cuda}", "run on device: cuda, but resources.gpus is 0"),
])
def test_resources_that_can_never_be_met_are_refused_before_ray_starts(tmp_path, monkeypatch, resources, budget, message):
    # Ray would wait forever for a CPU or GPU count this machine lacks (only logging a warning
    # every minute), and hides GPUs from trials that ask for none
    from ablate import cluster
    from ablate.config import ConfigError
    from ablate.sweep import run_study

    monkeypatch.setattr(cluster, "torch_gpu_build", lambda: True)  # (a CPU-only torch is said so: the next test)
    monkeypatch.setattr(cluster, "_running_ray", lambda: False)  # (Ray an earlier test left in this process: its nodes)

    path = tmp_path / "res.yaml"
    path.write_text(f"name: res\ntasks: [etth1]\nseeds: 1\nbudget: {budget}\nresources: {resources}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_study(load_study(path), tmp_path / "out")
    assert not (tmp_path / "out").exists(), "refused before anything is written"


def test_gpus_asked_of_a_cpu_only_torch_say_that_torch_is_what_lacks_them(tmp_path, monkeypatch):
    # a machine with GPUs but a CPU build of torch: "this machine has 0 GPU(s)" sent the user looking for
    # GPUs that are there (Ray itself finds them); what is missing is a CUDA build of torch
    import torch

    from ablate import cluster
    from ablate.config import ConfigError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    path = tmp_path / "res.yaml"
    path.write_text("name: res\ntasks: [etth1]\nseeds: 1\nbudget: {epochs: 1, device: auto}\nresources: {gpus: 1}\n")
    with pytest.raises(ConfigError, match=re.escape(f"resources.gpus=1, but torch here ({torch.__version__}) is built "
                                                    f"without CUDA, so it sees no GPU whatever this machine has")):
        cluster.check_resources(load_study(path))


def _write_real_data(task: str, root: Path) -> None:
    """Each task's files in its canonical layout, from the task tests' own fixture writers."""
    import numpy as np

    if task == "etth1":
        from tests.ablate.test_task_etth import write_ett_csv
        write_ett_csv(root / "ETT-small" / "ETTh1.csv", np.arange(200.0))
    elif task == "cifar10":
        from tests.ablate.test_task_cifar10 import write_cifar
        write_cifar(root)
    elif task == "imdb":
        from tests.ablate.test_task_imdb import write_tree
        write_tree(root / "imdb")
    elif task == "multi30k":
        from tests.ablate.test_task_multi30k import write_files
        write_files(root / "multi30k")
    else:
        from tests.ablate.test_task_wikitext import TEST, TRAIN, VALID, write_wiki
        write_wiki(root, TRAIN, VALID, TEST)


@pytest.mark.parametrize("task, expected", [("etth1", "ETTh1.csv"), ("cifar10", "data_batch_1..5"),
                                            ("imdb", "review files"), ("multi30k", "train.de"),
                                            ("wikitext2", "wiki.train.tokens")])
def test_a_data_directory_without_a_tasks_files_is_refused_before_ray_starts(tmp_path, task, expected):
    # every built-in task locates its files (without reading them) before any trial starts; a data
    # directory holding only some datasets failed, and was retried, trial by trial inside Ray
    from ablate.sweep import run_study
    from ablate.tasks import DatasetNotFoundError, get_task

    data = tmp_path / "data"
    data.mkdir()
    path = tmp_path / "real.yaml"
    path.write_text(f"name: real\ntasks: [{task}]\nseeds: 1\nbudget: {{epochs: 2}}\ndata: real\ndata_dir: {data}\n")
    study = load_study(path)
    with pytest.raises(DatasetNotFoundError, match=rf"task '{task}' has data: real, but .*{re.escape(expected)}"):
        run_study(study, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _write_real_data(task, data)
    files = get_task(task).locate(dict(study.trials[0].config))
    assert files and all(Path(p).exists() for p in files)  # (a FolderFiles too: its folder)


def test_a_toml_file_gets_a_hint_and_idle_metaadamw_trials_are_counted(tmp_path):
    from ablate.sweep import no_meta_updates

    toml = tmp_path / "s.toml"
    toml.write_text('name = "tiny"\ntasks = ["etth1"]\n')
    with pytest.raises(StudyError, match="this looks like TOML"):
        load_study(toml)
    path = tmp_path / "idle.yaml"
    path.write_text("name: idle\ntasks: [etth1]\nseeds: 2\nbudget: {epochs: 1}\n")  # warm-up is 1 epoch
    study = load_study(path)
    assert no_meta_updates(study) == 2 == sum(t.config["optimizer"] == "metaadamw" for t in study.trials)
    path.write_text("name: idle\ntasks: [etth1]\nseeds: 2\nbudget: {epochs: 2}\n")
    assert no_meta_updates(load_study(path)) == 0


def test_model_or_budget_keys_under_baseline_warn_that_adamw_does_not_get_them(tmp_path):
    with pytest.warns(UserWarning, match=r"baseline: sets epochs, d_model, which AdamW's trials use as well but do not "
                                         r"get .* Put what both should have under budget:"):
        study = load(tmp_path, tasks=["tiny_ts"], baseline={"epochs": 2, "d_model": 4, "gating": False})
    assert trial(study, "tiny_ts", "adamw").config["epochs"] == 4 and trial(study, "tiny_ts", "baseline").config["epochs"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MetaAdamW keys; a difference set on purpose; no AdamW arm; budget:
        load(tmp_path, tasks=["tiny_ts"], baseline={"gating": False, "epochs": 2}, adamw={"epochs": 3})
        load(tmp_path, tasks=["tiny_ts"], baseline={"epochs": 2}, adamw=False)
        load(tmp_path, tasks=["tiny_ts"], budget={"epochs": 2}, baseline={"meta_every": 5})


def test_a_seed_too_large_for_torch_is_refused_with_the_allowed_range(tmp_path):
    """A trial seeds torch generators with ``seed * 1000 + k``, which torch takes as an unsigned 64-bit
    integer: a larger seed passed the study file's checks, then failed inside every trial with a bare
    "ValueError: Overflow when unpacking long long" (a traceback from ``ablate train --seed``)."""
    import torch

    from ablate.config import MAX_SEED
    from ablate.trial import seed_everything

    torch.Generator().manual_seed(MAX_SEED * 1000 + 2)  # the largest seed allowed works
    seed_everything(MAX_SEED + 7919)
    with pytest.raises(StudyError, match=re.escape(f"seeds[0]: seed={MAX_SEED + 1} must be >= 0 and at most {MAX_SEED}")):
        parse_study({**BASE, "seeds": [MAX_SEED + 1]})
    with pytest.raises(StudyError, match=re.escape(f"extra_seeds: seed={MAX_SEED + 1} must be >= 0 and at most {MAX_SEED}")):
        parse_study({**BASE, "seeds": [MAX_SEED]}, extra_seeds=1)
    assert parse_study({**BASE, "seeds": [MAX_SEED]}).seeds == [MAX_SEED]


def test_ablate_train_refuses_a_seed_too_large_in_one_line(capsys):
    from ablate.cli import main
    from ablate.config import MAX_SEED

    assert main(["train", "--task", "etth1", "--seed", str(MAX_SEED + 1), "--no-progress"]) == 2
    assert f"ablate: error: trial config: seed={MAX_SEED + 1} must be >= 0 and at most {MAX_SEED}" in capsys.readouterr().err


@pytest.mark.parametrize("resources", [{"cpus": 1, "gpus": None}, {"cpus": None, "gpus": 0}, {"cpus": None}])
def test_a_resource_set_to_null_takes_its_default(resources):
    # search_spaces/README.md: "A key that is left empty (`budget:`) or set to `null` takes its default"
    study = parse_study({"name": "n", "tasks": ["etth1"], "seeds": 1, "resources": resources})
    assert study.resources == {"cpus": 1, "gpus": 0}


def test_a_budget_key_set_to_null_takes_the_task_s_default(tmp_path):
    # budget: {epochs: null} was refused ("budget.epochs: must not be null"); a null that is a value of its key
    # (max_train_batches: null, the whole split) is kept, and a key refused whatever its value still is
    study = load(tmp_path, tasks=["tiny_ts"],
                 budget={"epochs": None, "d_model": None, "max_train_batches": None, "batch_size": 8})
    for arm in ("baseline", "adamw"):
        config = trial(study, "tiny_ts", arm).config
        assert (config["epochs"], config["d_model"], config["max_train_batches"], config["batch_size"]) == (4, 8, None, 8)
    study = load(tmp_path, budget={"epochs": None})
    assert [trial(study, task, "baseline").config["epochs"] for task in ("tiny_ts", "tiny_cls")] == [4, 10]
    assert "s.yaml: budget.seed: seed cannot be set here" in error(tmp_path, {**BASE, "budget": {"seed": None}})
    assert "s.yaml: budget.epoch: unknown config key 'epoch'" in error(tmp_path, {**BASE, "budget": {"epoch": None}})


def test_keys_of_a_priorities_from_file_that_adamw_does_not_get_are_warned_about_too(tmp_path):
    """``ablate tune`` with ``params: {lr: ...}`` writes the tuned ``lr`` into best_priorities.yaml, and
    ``baseline: {priorities_from: ...}`` gives it to the MetaAdamW arms only: AdamW kept its own lr
    without a word, where the same key under ``baseline:`` is warned about. And a ``baseline:`` key that
    AdamW gets from its own tuned file (``adamw: {tuned_from: ...}``) is paired: its warning advised
    setting it under ``adamw:``, which that file forbids."""
    (tmp_path / "best_priorities.yaml").write_text(
        "tiny_ts: {priorities: [2.0, 1.0, 0.5], lr: 2.0e-3, tuned_on_seeds: [7], tuned_for: baseline}\n")
    (tmp_path / "best_adamw.yaml").write_text("tiny_ts: {lr: 3.0e-3, tuned_on_seeds: [7], tuned_for: adamw}\n")
    with pytest.warns(UserWarning, match=r"baseline.priorities_from: its file sets tiny_ts: lr, which AdamW's trials "
                                         r"use as well but do not get"):
        study = load(tmp_path, tasks=["tiny_ts"], baseline={"priorities_from": "best_priorities.yaml"})
    assert trial(study, "tiny_ts", "baseline").config["lr"] == 2e-3 != trial(study, "tiny_ts", "adamw").config["lr"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # AdamW has an lr of its own (tuned, set, or an override for both)
        load(tmp_path, tasks=["tiny_ts"], baseline={"priorities_from": "best_priorities.yaml"},
             adamw={"tuned_from": "best_adamw.yaml"})
        load(tmp_path, tasks=["tiny_ts"], baseline={"priorities_from": "best_priorities.yaml"}, adamw={"lr": 1e-3})
        load(tmp_path, tasks=["tiny_ts"], baseline={"priorities_from": "best_priorities.yaml"},
             overrides={"tiny_ts": {"lr": 1e-3}})
        load(tmp_path, tasks=["tiny_ts"], baseline={"lr": 1e-3}, adamw={"tuned_from": "best_adamw.yaml"})


def test_a_plugin_component_with_the_wrong_signature_fails_the_study_load_not_every_trial(tmp_path, isolated_imports):
    # the study loaded, and every trial of the sweep failed with a bare TypeError from the constructor
    (tmp_path / "study_plugin_wrong.py").write_text(
        "from metaadamw import WEIGHTINGS\nfrom metaadamw.weighting import Sum\n\n\n"
        "class Wrong(Sum):\n    def __init__(self, terms):\n        super().__init__(terms)\n\n\n"
        "WEIGHTINGS.add('plugin_wrong', Wrong)\n")
    try:
        message = error(tmp_path, {**BASE, "plugins": ["study_plugin_wrong"], "ablations": {"weighting": ["plugin_wrong"]}})
        assert "ablations.weighting[0]: 'plugin_wrong': the loss weighting 'plugin_wrong' (study_plugin_wrong.Wrong(terms)) cannot be " \
               "called as MetaAdamW calls it, cls(terms, signed_terms, *, priorities, weights, form)" in message
    finally:
        metaadamw.WEIGHTINGS.remove("plugin_wrong")


def test_a_study_file_with_several_independent_problems_names_them_all_at_once(tmp_path, capsys):
    # a dry run named only the first problem: a file with five took five runs to fix
    from ablate.cli import main

    path = write(tmp_path, {"name": "bad name", "tasks": ["tiny_ts"], "seeds": 2, "retries": -1, "resources": {"cpus": 0},
                            "budget": {"epochs": 0, "lrr": 1}, "budgte": {}, "ablations": {"gating": ["yes"]}})
    with pytest.raises(StudyError) as info:
        load_study(path)
    problems = info.value.problems
    for where in ("budgte:", "name:", "retries:", "resources.cpus:", "budget.epochs:", "budget.lrr:", "ablations.gating[0]:"):
        assert sum(f"{path}: {where}" in p for p in problems) == 1, (where, problems)
    assert len(problems) == 7 and str(info.value) == "\n".join(problems)
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 7 and all(line.startswith(f"ablate: error: {path}: ") for line in err)
    # a problem that makes later checks meaningless stops there: the settings are not checked against a bad task
    problems = error(tmp_path, {"name": "t", "tasks": ["nosuch"], "seeds": [0, 0], "budget": {"lrr": 1}}).splitlines()
    assert len(problems) == 2 and "tasks[0]" in problems[0] and "seed 0 is given twice" in problems[1]


@pytest.mark.parametrize("text, said", [("", "the file is empty"), ("# nothing yet\n\n", "the file is empty (nothing but comments)")])
def test_an_empty_study_file_is_called_empty(tmp_path, text, said):
    # it said "a study must be a mapping with at least name, tasks, seeds; got None"
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(StudyError) as info:
        load_study(path)
    assert str(info.value) == f"{path}: {said}"


@pytest.mark.parametrize("fields, wheres", [
    # the problems of budget:, baseline: and adamw: were named together, but those of several ablation axes,
    # levels, override tasks or factorial axes one per run
    ({"ablations": {"gating": ["yes"], "lr": [-1]}}, ["ablations.gating[0]:", "ablations.lr[0]:"]),
    ({"ablations": {"gating": ["yes", "no"]}}, ["ablations.gating[0]:", "ablations.gating[1]:"]),
    ({"ablations": {"baseline": [1], "lvl": {"a": {"lr": -1}, "b": {"lrr": 1}}}},
     ["ablations.baseline:", "ablations.lvl.a.lr:", "ablations.lvl.b.lrr:"]),
    ({"overrides": {"tiny_ts": {"lr": -1}, "nosuch": {}}}, ["overrides.tiny_ts.lr:", "overrides.nosuch:"]),
    ({"factorial": {"axes": {"gating": ["yes"], "lr": [-1, 1]}}}, ["factorial.axes.gating[0]:", "factorial.axes.lr[0]:"]),
])
def test_the_problems_of_several_axes_levels_and_override_tasks_are_named_at_once(tmp_path, fields, wheres):
    path = write(tmp_path, {"name": "t", "tasks": ["tiny_ts"], "seeds": 1, **fields})
    with pytest.raises(StudyError) as info:
        load_study(path)
    problems = info.value.problems
    assert len(problems) == len(wheres) and all(f"{path}: {w}" in p for w, p in zip(wheres, problems)), problems
    # (a level given twice is still one)
    assert "level 1 is given twice" in error(tmp_path, {"name": "t", "tasks": ["tiny_ts"], "seeds": 1,
                                                        "ablations": {"meta_every": [1, 1]}})


def test_every_bad_task_of_a_tuned_file_is_named_at_once(tmp_path):
    # the tasks of a priorities_from file were checked one at a time: the first bad entry hid the others
    (tmp_path / "best.yaml").write_text("tiny_ts: {priorities: [1, 2, 3], tuned_on_seeds: seven}\n"
                                        "tiny_cls: {priorities: [1, 2, 3], lrr: 0.1}\n")
    with pytest.raises(StudyError) as info:
        load_study(write(tmp_path, {**BASE, "baseline": {"priorities_from": "best.yaml"}}))
    problems = info.value.problems
    assert len(problems) == 2, problems
    assert "baseline.priorities_from (best.yaml).tiny_ts.tuned_on_seeds: must be the list of seeds" in problems[0]
    assert "baseline.priorities_from (best.yaml).tiny_cls.lrr: unknown config key 'lrr'" in problems[1]
    # (a task the file lacks, beside a bad entry: both named too)
    (tmp_path / "best.yaml").write_text("tiny_ts: {priorities: [1, 2]}\n")
    with pytest.raises(StudyError) as info:
        load_study(write(tmp_path, {**BASE, "baseline": {"priorities_from": "best.yaml"}}))
    problems = info.value.problems
    assert len(problems) == 2 and "tiny_ts.priorities" in problems[0], problems
    assert "has no entry for task 'tiny_cls'" in problems[1]


def test_an_unknown_resources_key_and_a_bad_value_beside_it_are_named_together(tmp_path):
    # the unknown key hid the bad value: fixing the one then met the other
    with pytest.raises(StudyError) as info:
        load_study(write(tmp_path, {**BASE, "resources": {"cpu": 2, "gpus": -1}}))
    path = tmp_path / "s.yaml"
    assert info.value.problems == [
        f"{path}: resources.cpu: unknown key (did you mean 'cpus'?); allowed keys: cpus, gpus",
        f"{path}: resources.gpus: must be a number >= 0, got -1",
    ]
    with pytest.raises(StudyError) as info:
        load_study(write(tmp_path, {**BASE, "resources": {"cpus": 0, "gpus": "one"}}))
    assert [p.split(": ")[1] for p in info.value.problems] == ["resources.cpus", "resources.gpus"]
    assert load_study(write(tmp_path, {**BASE, "resources": {"cpus": 2, "gpus": None}})).resources == {"cpus": 2, "gpus": 0}


@pytest.mark.parametrize("text, said", [
    # a lone document marker or directive, or a byte-order mark, said "a study must be a mapping ...; got None" or
    # gave a YAML error ("expected '<document start>', but found '<stream end>'")
    ("---\n", "the file is empty (nothing but document markers)"),
    ("--- # a study\n...\n", "the file is empty (nothing but document markers)"),
    ("---\n---\n", "the file is empty (nothing but document markers)"),
    ("%YAML 1.2\n---\n", "the file is empty (nothing but directives and document markers)"),
    ("%YAML 1.1\n", "the file is empty (nothing but directives)"),
    ("# to do\n---\n", "the file is empty (nothing but comments and document markers)"),
    ("\ufeff", "the file is empty"),
    ("\ufeff  \n\n", "the file is empty"),
    ("\ufeff# nothing yet\n", "the file is empty (nothing but comments)"),
])
def test_a_study_file_of_markers_directives_or_a_byte_order_mark_alone_is_called_empty(tmp_path, text, said):
    path = tmp_path / "s.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(StudyError) as info:
        load_study(path)
    assert str(info.value) == f"{path}: {said}"


def test_a_study_file_with_a_byte_order_mark_and_markers_parses(tmp_path):
    # (the empty-file check skips a byte-order mark: one before real content must still parse)
    path = tmp_path / "s.yaml"
    path.write_text("\ufeff%YAML 1.1\n---\nname: t\ntasks: [tiny_ts]\nseeds: 2\n...\n", encoding="utf-8")
    study = load_study(path)
    assert (study.name, study.tasks, study.seeds) == ("t", ["tiny_ts"], [0, 1])


def test_every_bad_seed_and_task_of_a_list_is_named_at_once(tmp_path):
    # the lists stopped at their first bad item: a seed given twice hid a negative one, a task listed twice an unknown one
    path = tmp_path / "s.yaml"
    with pytest.raises(StudyError) as info:
        load_study(write(tmp_path, {"name": "t", "tasks": ["tiny_ts", "tiny_ts", "nosuch"], "seeds": [1, 1, -2]}))
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert problems[0] == f"{path}: tasks[1]: 'tiny_ts' is listed twice"
    assert problems[1].startswith(f"{path}: tasks[2]: task='nosuch' is not allowed")
    assert problems[2] == f"{path}: seeds[1]: seed 1 is given twice"
    assert problems[3].startswith(f"{path}: seeds[2]: seed=-2 must be >= 0")


@pytest.mark.parametrize("text, at", [("name: t\ntasks: [tiny_ts]\nseeds: 1\nbudget:\n\tepochs: 2\n", ":5:1"),
                                      ("name: t\ntasks: [tiny_ts]\nseeds: 1\nbudget:\n  epochs: 2\t# two\n", ":5:12")])
def test_a_tab_in_a_study_file_is_named_as_a_tab_to_replace(tmp_path, text, at):
    # PyYAML's "found character '\t' that cannot start any token" did not say what to do
    message = error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 's.yaml'}{at}: invalid YAML: ")
    assert message.endswith("(a tab at that line and column: replace it with spaces, which YAML indents and separates "
                            "with)")


def test_a_missing_required_key_does_not_hide_the_problems_beside_it(tmp_path):
    # a study without name: (or tasks:, seeds:) said that alone, hiding a bad seeds:, retries: or budget:
    path = tmp_path / "s.yaml"
    with pytest.raises(StudyError) as info:
        load_study(write(tmp_path, {"tasks": ["tiny_ts"], "seeds": -1, "retries": "x", "budget": {"lr": -1}}))
    assert [p.split(": ")[1] for p in info.value.problems] == ["name", "seeds", "retries", "budget.lr"]
    assert info.value.problems[0] == f"{path}: name: is required: {STUDY_KEYS['name']}"
    # without tasks: the settings, checked against the tasks, wait; the rest is still said
    with pytest.raises(StudyError) as info:
        load_study(write(tmp_path, {"name": "t", "seeds": [1, 1], "budget": {"lr": -1}}))
    assert info.value.problems == [f"{path}: tasks: is required: {STUDY_KEYS['tasks']}",
                                   f"{path}: seeds[1]: seed 1 is given twice"]


def test_a_tuned_file_path_that_is_a_folder_is_called_a_folder(tmp_path):
    # priorities_from: a folder said "'...' does not exist"
    (tmp_path / "tune").mkdir()
    path = tmp_path / "s.yaml"
    mapping = {**BASE, "baseline": {"priorities_from": "tune"}}
    assert error(tmp_path, mapping) == (f"{path}: baseline.priorities_from: {str(tmp_path / 'tune')!r} is a folder: "
                                        f"give the file `ablate tune` wrote (best_priorities.yaml)")
    (tmp_path / "tune" / "best_priorities.yaml").write_text("tiny_ts: [1, 2, 3]\ntiny_cls: [1, 2, 3]\n")
    assert error(tmp_path, mapping).endswith(f"is a folder: give the file `ablate tune` wrote, "
                                             f"{str(tmp_path / 'tune' / 'best_priorities.yaml')!r}")
    assert error(tmp_path, {**BASE, "adamw": {"tuned_from": "tune"}}).endswith("(best_adamw.yaml)")


def test_the_comparing_study_that_tune_adamw_yaml_describes_is_not_warned_about_tuned_with(tmp_path):
    # search_spaces/tune_adamw.yaml's comment gives the study file that compares the two tuned arms; its budget
    # left out patience: 0, which both searches ran with (tuned_with records it), so the study ran the default
    # patience 2 over 4 epochs and was warned "patience (tuned with 0, here 2)" on both arms
    from ablate.study import tuning_context

    searches = {}
    for name, arm, searched in (("tune_priorities", "baseline", ["priorities"]), ("tune_adamw", "adamw", ["lr"])):
        study = load_study(SEARCH_SPACES / f"{name}.yaml")
        searches[name] = study
        entries = {}
        for task in study.tasks:  # (what `ablate tune` writes: the searched arm's settings, less the searched keys)
            config = next(t.config for t in study.trials if t.task == task and arm in t.arms)
            entries[task] = {searched[0]: config[searched[0]], "tuned_on_seeds": list(study.seeds), "tuned_for": arm,
                             "tuned_with": tuning_context(config, arm, searched)}
        out = tmp_path / "results" / name / "tune"
        out.mkdir(parents=True)
        (out / f"best_{'priorities' if arm == 'baseline' else 'adamw'}.yaml").write_text(yaml.safe_dump(entries))
    text = (SEARCH_SPACES / "tune_adamw.yaml").read_text()
    comment = text.split("in the comparing study file")[1].split("\n#\n")[0].split("\n")[1:]
    snippet = yaml.safe_load("\n".join(line.removeprefix("#   ") for line in comment))
    assert set(snippet) == {"baseline", "adamw", "budget", "seeds"}
    adamw = searches["tune_adamw"]
    spec = {"name": "compare", "data": "embedded", "tasks": list(adamw.tasks), **snippet}
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "compare.yaml").write_text(yaml.safe_dump(spec))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study = load_study(tmp_path / "studies" / "compare.yaml")
    assert [str(w.message) for w in caught] == []
    assert {t.config["patience"] for t in study.trials} == {0}
    assert {(t.config["meta_lr"], t.config["meta_per_epoch"]) for t in study.trials if "baseline" in t.arms} == {(0.01, 5)}
    assert study.seeds == [3, 4, 5]
