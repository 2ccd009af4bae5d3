"""The messages of study files and tune specs that need fixing: a list mis-indented in the YAML,
a key said twice, every problem of a tuned file's entries and of the search against the study said
at once, unknown keys said alike in both parts, and the plugins imported in their order."""

from __future__ import annotations

import os
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from ablate.config import MAX_SEED
from ablate.study import StudyError, load_study, parse_study
from ablate.tune import load_tune_spec, parse_tune_spec

BASE = {"name": "s", "tasks": ["etth1"], "seeds": 1}


def problems_of(path: Path, text: str, load=load_study) -> list[str]:
    """The problems of the study file (or tune spec) ``text`` written to ``path``."""
    path.write_text(textwrap.dedent(text))
    with warnings.catch_warnings(), pytest.raises(StudyError) as info:
        warnings.simplefilter("ignore")
        load(path)
    return info.value.problems


def mapping_problems(mapping: dict, parse=parse_study) -> list[str]:
    with warnings.catch_warnings(), pytest.raises(StudyError) as info:
        warnings.simplefilter("ignore")
        parse(mapping, "s.yaml")
    return info.value.problems


# -- a list mis-indented in the YAML ------------------------------------------------------------


@pytest.mark.parametrize(("key", "text", "item"), [
    ("tasks", "name: s\ntasks:\n- etth1\n  - etth2\nseeds: 1\n", "tasks[0]: 'etth1 - etth2'"),
    ("seeds", "name: s\ntasks: [etth1]\nseeds:\n- 1\n  - 2\n", "seeds[0]: '1 - 2'"),
    ("plugins", "name: s\ntasks: [etth1]\nseeds: 1\nplugins:\n  - a\n   - b\n", "plugins[0]: 'a - b'"),
])
def test_a_list_item_indented_deeper_than_the_one_before_is_said_to_be_two_items(tmp_path, key, text, item):
    # YAML continues a plain item with a deeper line: it said "task='etth1 - etth2' is not allowed (a task a
    # plugin registers...)" or "seed must be an integer, got '1 - 2'"
    path = tmp_path / "s.yaml"
    first, second = item.split("'")[1].split(" - ")
    assert problems_of(path, text) == [
        f"{path}: {item} is one item, read from the lines `- {first}` and `- {second}`: YAML continues a list item "
        f"with a line indented deeper than its `-`; indent every item of {key}: alike"]


@pytest.mark.parametrize(("text", "at", "line", "indent", "items", "why"), [
    ("seeds:\n  - 1\n - 2\n", "5:2", 5, 1, 2, "YAML ends a list at an item indented less"),
    ("seeds:\n    - 1\n  - 2\n", "5:3", 5, 2, 4, "YAML ends a list at an item indented less"),
    ("seeds:\n  - 1\n- 2\n", "5:1", 5, 0, 2, "YAML ends a list at an item indented less"),
    ("seeds:\n  - 1\n  - 3\n  # three\n    - 2\n", "7:5", 7, 4, 2,
     "YAML reads an item indented deeper as the start of a list inside the item before it"),
])
def test_a_list_item_indented_unlike_the_items_before_it_names_the_key_and_the_indentation(
        tmp_path, text, at, line, indent, items, why):
    # it said only "while parsing a block mapping expected <block end>, but found '<block sequence start>'"
    path = tmp_path / "s.yaml"
    [problem] = problems_of(path, "name: s\ntasks: [etth1]\n" + text)
    assert problem.startswith(f"{path}:{at}: invalid YAML: while parsing a block ")
    assert problem.endswith(
        f" (the list item '- 2' at line {line} is indented by {indent} space(s), the items of seeds: before it by "
        f"{items}: {why}; indent every item of seeds: by {items} spaces, like its first)")


def test_a_registered_task_whose_name_holds_a_dash_is_not_said_to_be_two_items(tmp_path):
    # a plugin task named "ett - hourly" (any non-empty name registers) was refused as the folded items
    # `- ett` and `- hourly`; an unknown name with a dash still gets the hint
    from ablate.tasks import TASKS, register_task

    register_task("ett - hourly", metrics=[("mse", "min")], defaults={"epochs": 2})(lambda config: None)
    try:
        path = tmp_path / "s.yaml"
        path.write_text("name: s\ntasks:\n- ett - hourly\nseeds: 1\ndata: embedded\n")
        assert load_study(path).tasks == ["ett - hourly"]
        assert problems_of(path, "name: s\ntasks:\n- ett\n  - daily\nseeds: 1\n") == [
            f"{path}: tasks[0]: 'ett - daily' is one item, read from the lines `- ett` and `- daily`: YAML continues "
            f"a list item with a line indented deeper than its `-`; indent every item of tasks: alike"]
    finally:
        TASKS.remove("ett - hourly")


def test_a_list_of_mappings_item_indented_less_names_the_key_and_the_indentation(tmp_path):
    # an item after an item whose mapping spans lines got no hint: the look back stopped at the mapping's line
    path = tmp_path / "s.yaml"
    [problem] = problems_of(path, "name: s\ntasks: [etth1]\nseeds: 1\nablations:\n  levels:\n    - a: 1\n"
                                  "      b: 2\n   - c\n")
    assert problem.endswith(
        " (the list item '- c' at line 8 is indented by 3 space(s), the items of levels: before it by 4: YAML ends a "
        "list at an item indented less; indent every item of levels: by 4 spaces, like its first)")
    # a deeper line that is no item's content (a mapping's, after the list) still gets no hint
    [problem] = problems_of(path, "name: s\ntasks: [etth1]\nseeds: 1\nfoo:\n      bar: 1\n   - c\n")
    assert "list item" not in problem


def test_a_yaml_error_elsewhere_gets_no_list_hint(tmp_path):
    path = tmp_path / "s.yaml"
    [problem] = problems_of(path, "name: s\ntasks: [etth1\nseeds: 1\n")
    assert "list item" not in problem and "indent every item" not in problem


# -- a key said once ------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "expected"), [
    ({"baseline": {"priorities": 3}},
     "s.yaml: baseline.priorities: must be a list, got 3 (HUW priorities [gradient alignment, loss decrease, "
     "generalization gap])"),
    ({"overrides": {"etth1": {"priorities": "a"}}},
     "s.yaml: overrides.etth1.priorities: must be a list, got 'a' (HUW priorities [gradient alignment, loss "
     "decrease, generalization gap])"),
    ({"baseline": {"priorities": [1, 2]}},
     "s.yaml: baseline.priorities: [1, 2] must be a list of three non-negative numbers [gradient alignment, loss "
     "decrease, generalization gap] (HUW priorities [gradient alignment, loss decrease, generalization gap])"),
    ({"budget": {"epochs": 2.5}}, "s.yaml: budget.epochs: must be an integer, got 2.5 (maximum number of epochs)"),
    ({"baseline": {"meta_every": 0}},
     "s.yaml: baseline.meta_every: 0 must be > 0 (K_meta: steps between meta-updates (null when meta_per_epoch "
     "sets it))"),
])
def test_a_setting_s_problem_names_its_key_once(fields, expected):
    # it said "baseline.priorities: priorities must be a list"
    assert mapping_problems({**BASE, **fields}) == [expected]


def test_a_setting_s_problem_outside_a_study_still_names_the_key():
    from ablate.config import ConfigError, validate_value

    with pytest.raises(ConfigError, match=r"^trial config: priorities must be a list, got 3 "):
        validate_value("priorities", 3, "trial config")
    with pytest.raises(ConfigError, match=r"^trial config: meta_every=0 must be > 0 "):
        validate_value("meta_every", 0, "trial config")


# -- every problem of a tuned file's entries ------------------------------------------------------


def test_a_tuned_file_says_every_problem_of_every_task_s_entry(tmp_path):
    # it said one problem per task: fixing a file took a run per problem
    (tmp_path / "best.yaml").write_text(
        "etth1: {priorities: [1, 2, 0.5], tuned_for: adamw, tuned_on_seeds: x, tuned_with: 3, meta_lr: 0.01}\n"
        "etth2: {priorities: [1, 2], tuned_on_seeds: y}\n")
    path = tmp_path / "s.yaml"
    at = f"{path}: baseline.priorities_from (best.yaml)"
    assert problems_of(path, """\
        name: s
        tasks: [etth1, etth2]
        seeds: 1
        baseline: {priorities_from: best.yaml, meta_lr: 0.001}
        """) == [
        f"{at}.etth1: holds values `ablate tune` tuned for the 'adamw' arm (tuned_for: adamw), not for the 'baseline' "
        f"arm that baseline.priorities_from sets; use the file as adamw: {{tuned_from: FILE}}",
        f"{at}.etth1.tuned_on_seeds: must be the list of seeds `ablate tune` scored the values on, got 'x'",
        f"{at}.etth1.tuned_with: must be the mapping of the settings `ablate tune` tuned the values with, got 3",
        f"{at}.etth1: sets 'meta_lr', which baseline: sets too; keep one of them",
        f"{at}.etth2.tuned_on_seeds: must be the list of seeds `ablate tune` scored the values on, got 'y'",
        f"{at}.etth2.priorities: [1, 2] must be a list of three non-negative numbers [gradient alignment, loss "
        f"decrease, generalization gap] (HUW priorities [gradient alignment, loss decrease, generalization gap])",
    ]


# -- the tune: section ----------------------------------------------------------------------------


def test_the_search_against_the_study_says_the_problems_of_every_task(tmp_path):
    # it stopped at the first problem of the first task
    path = tmp_path / "s.yaml"
    problems = problems_of(path, """\
        name: s
        tasks: [etth1, etth2]
        seeds: 1
        budget: {epochs: 1}
        baseline: {weighting: sum}
        tune: {scheduler: {grace_period: 5}}
        """, load=load_tune_spec)
    expected = []
    for task in ("etth1", "etth2"):
        expected += [
            f"{path}: tune.priorities: the baseline of task '{task}' uses weighting='sum', which ignores the "
            f"priorities; set baseline: {{weighting: huw_priority}} or tune.priorities: false",
            f"{path}: budget.epochs: task '{task}' trains 1 epoch(s), all of them warm-up epochs (warmup_epochs=1) "
            f"without meta-updates, so no suggestion can change anything; give it more epochs or fewer warm-up epochs",
            f"{path}: tune.scheduler.grace_period: 5 is more than the 1 epoch(s) of task '{task}'; lower it",
        ]
    assert problems == expected


def test_the_tune_section_says_its_refused_keys_together(tmp_path):
    problems = mapping_problems({**BASE, "tune": {"arm": "adamw", "priorities": {"low": 1, "high": 2},
                                                  "params": {"lr": {"low": 1.0e-4, "high": 1.0e-2}},
                                                  "cross_task": "yes", "enqueue_baseline": 1}}, parse_tune_spec)
    assert problems == [
        "s.yaml: tune.priorities: are MetaAdamW's, and arm: adamw searches AdamW's settings; remove tune.priorities "
        "(or set it to false)",
        "s.yaml: tune.cross_task: must be true or false, got 'yes'",
        "s.yaml: tune.enqueue_baseline: must be true or false, got 1",
    ]


def test_unknown_keys_are_said_alike_in_the_study_and_the_tune_section():
    from ablate.tune import TUNE_KEYS

    problems = mapping_problems({**BASE, "resources": {"cpu": 1},
                                 "tune": {"trails": 3, "priorities": {"lo": 1}, "scheduler": {"grace_periods": 2}}},
                                parse_tune_spec)
    assert problems == [
        f"s.yaml: tune.trails: unknown key (did you mean 'trials'?); allowed keys: {', '.join(TUNE_KEYS)}",
        "s.yaml: tune.priorities.lo: unknown key (did you mean 'log' or 'low'?); allowed keys: low, high, log",
        "s.yaml: tune.scheduler.grace_periods: unknown key (did you mean 'grace_period'?); allowed keys: type, grace_period, "
        "reduction_factor",
        "s.yaml: resources.cpu: unknown key (did you mean 'cpus'?); allowed keys: cpus, gpus",
    ]
    study = mapping_problems({**BASE, "resources": {"cpu": 1}, "factorial": {"axis": {}}})
    assert "s.yaml: resources.cpu: unknown key (did you mean 'cpus'?); allowed keys: cpus, gpus" in study
    assert "s.yaml: factorial.axis: unknown key (did you mean 'axes'?); allowed keys: axes, fraction, generators" \
        in study
    assert "s.yaml: factorial.axes: is required: " in " ".join(study)


# -- plugins --------------------------------------------------------------------------------------


@pytest.fixture
def plugin_modules(monkeypatch):
    """Restore sys.path and forget the test plugin modules afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [m for m in sys.modules if m.startswith("msg_plugin_")]:
        del sys.modules[name]


def test_plugins_are_imported_in_the_listed_order_and_a_failing_one_is_named_with_the_file(tmp_path, plugin_modules):
    (tmp_path / "msg_plugin_order.py").write_text("ORDER = []\n")
    for name in ("c", "a", "b"):
        (tmp_path / f"msg_plugin_{name}.py").write_text("import msg_plugin_order\nmsg_plugin_order.ORDER.append(__name__)\n")
    (tmp_path / "msg_plugin_boom.py").write_text("import msg_plugin_order\nmsg_plugin_order.ORDER.append(__name__)\n"
                                                 "raise RuntimeError('boom')\n")
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ntasks: [etth1]\nseeds: 1\nplugins: [msg_plugin_c, msg_plugin_a, msg_plugin_b]\n")
    assert load_study(path).plugins == ["msg_plugin_c", "msg_plugin_a", "msg_plugin_b"]
    assert sys.modules["msg_plugin_order"].ORDER == ["msg_plugin_c", "msg_plugin_a", "msg_plugin_b"]
    assert problems_of(tmp_path / "t.yaml", "name: s\ntasks: [etth1]\nseeds: 1\nplugins: [msg_plugin_a, msg_plugin_boom]\n") == [
        f"{tmp_path / 't.yaml'}: plugins[1]: cannot import plugin module 'msg_plugin_boom': RuntimeError: boom. "
        f"Fix the error it raises"]
    assert sys.modules["msg_plugin_order"].ORDER[-1] == "msg_plugin_boom"


# -- a key said once: where the field path names it -------------------------------------------------


@pytest.mark.parametrize(("study", "problem"), [
    # a level of an ablation axis: said "ablations.lr[0]: lr=-1.0 must be > 0"
    ({"ablations": {"lr": [-1.0, 1e-3]}}, "s.yaml: ablations.lr[0]: -1.0 must be > 0 (learning rate)"),
    # a task key through resolve_config: said "baseline.seq_len (task etth1): etth1: seq_len=-1 must be ..."
    ({"baseline": {"seq_len": -1}},
     "s.yaml: baseline.seq_len (task etth1): -1 must be an integer >= 1 (input window length in steps)"),
    ({"ablations": {"seq_len": [8, -1]}},
     "s.yaml: ablations.seq_len[1] (task etth1): -1 must be an integer >= 1 (input window length in steps)"),
    # said "baseline.seq_len (task etth1): seq_len must be an integer, ...", then "... like 24 (task etth1), got 'x'"
    ({"baseline": {"seq_len": "x"}}, "s.yaml: baseline.seq_len (task etth1): must be an integer, like 24, got 'x'"),
    ({"overrides": {"etth1": {"pooling": 3}}},
     "s.yaml: overrides.etth1.pooling (task etth1): must be a string, like 'last', got 3"),
    # a path that does not name the key keeps it, and the task's name where the path does not say it
    ({"seeds": [-2]}, f"s.yaml: seeds[0]: seed=-2 must be >= 0 and at most {MAX_SEED} (seeds Python, NumPy, torch "
                      f"and the data order)"),
    ({"baseline": {"lr": -1}}, "s.yaml: baseline.lr: -1 must be > 0 (learning rate)"),
])
def test_a_bad_value_names_its_key_once(study, problem):
    assert mapping_problems({**BASE, **study}) == [problem]


def test_a_task_check_run_on_a_trial_config_still_names_the_task_and_the_key():
    from ablate.config import ConfigError, resolve_config

    with pytest.raises(ConfigError) as info:
        resolve_config({"task": "etth1", "seq_len": -1})
    assert str(info.value) == "trial config: etth1: seq_len=-1 must be an integer >= 1 (input window length in steps)"


def test_a_value_of_the_wrong_kind_or_a_null_names_the_task_once():
    # a study file said "baseline.hidden (task plug_once): must not be null (task plug_once's default: 16; ...)";
    # a plain trial config, whose `where` does not name the task, still names it
    from ablate.config import ConfigError, resolve_config
    from ablate.tasks import TASKS, register_task

    register_task("plug_once", metrics=[("mse", "min")], defaults={"hidden": 16})(lambda c: None)
    try:
        assert mapping_problems({**BASE, "tasks": ["plug_once"], "baseline": {"hidden": None}}) == [
            "s.yaml: baseline.hidden (task plug_once): must not be null (the task's default: 16; leave the key out to "
            "take it)"]
        assert mapping_problems({**BASE, "tasks": ["plug_once"], "baseline": {"hidden": "x"}}) == [
            "s.yaml: baseline.hidden (task plug_once): must be an integer, like 16, got 'x'"]
        for value, message in ((None, "hidden must not be null (task plug_once's default: 16; leave the key out to "
                                      "take it)"),
                               ("x", "hidden must be an integer, like 16 (task plug_once), got 'x'")):
            with pytest.raises(ConfigError) as info:
                resolve_config({"task": "plug_once", "hidden": value})
            assert str(info.value) == f"trial config: {message}"
    finally:
        TASKS.remove("plug_once")


def test_a_bound_of_a_tuned_range_names_its_key_once():
    # said "tune.params.meta_lr.low: meta_lr=-1.0 must be > 0"
    assert mapping_problems({**BASE, "tune": {"params": {"meta_lr": {"low": -1.0, "high": 1e-2}}}},
                            parse_tune_spec) == [
        "s.yaml: tune.params.meta_lr.low: -1.0 must be > 0 (learning rate of the modulator's optimizer)"]


# -- every problem of a range and of the scheduler ---------------------------------------------------


def test_every_problem_of_a_tuned_range_is_said_together():
    # a bad low hid a bad high and a bad log
    assert mapping_problems({**BASE, "tune": {"params": {"meta_lr": {"low": -1.0, "high": -2.0, "log": "yes"}}}},
                            parse_tune_spec) == [
        "s.yaml: tune.params.meta_lr.low: -1.0 must be > 0 (learning rate of the modulator's optimizer)",
        "s.yaml: tune.params.meta_lr.high: -2.0 must be > 0 (learning rate of the modulator's optimizer)",
        "s.yaml: tune.params.meta_lr.log: must be true or false, got 'yes'"]
    assert mapping_problems({**BASE, "tune": {"priorities": {"low": "a", "high": -1}}}, parse_tune_spec) == [
        "s.yaml: tune.priorities.low: must be a finite number, got 'a'",
        "s.yaml: tune.priorities.high: must be >= 0.0, got -1"]


def test_every_problem_of_the_scheduler_is_said_together():
    # a bad type hid a bad grace_period and reduction_factor
    assert mapping_problems({**BASE, "tune": {"scheduler": {"type": "hyperband", "grace_period": 0,
                                                            "reduction_factor": 1}}}, parse_tune_spec) == [
        "s.yaml: tune.scheduler.type: 'hyperband' is not allowed; choose one of: asha, none",
        "s.yaml: tune.scheduler.grace_period: must be an integer >= 1, got 0",
        "s.yaml: tune.scheduler.reduction_factor: must be a number > 1, got 1"]


# -- a path that is not a study file ------------------------------------------------------------


def test_a_path_that_is_not_a_study_file_says_what_to_give_instead(tmp_path, capsys):
    # `ablate run` / `ablate tune` on a missing path, a folder (a study's results folder, say) or a
    # binary file: exit code 2 and one line naming the problem and the fix, not the bare OS error
    from ablate.cli import main

    results = tmp_path / "results" / "tiny"
    results.mkdir(parents=True)
    (results / "study.yaml").write_text("name: tiny\ntasks: [etth1]\nseeds: 1\n")
    (results / "trials.parquet").write_bytes(b"PAR1\xeb\x00\xff")
    cases = {
        tmp_path / "nope.yaml": "cannot read the study file: no such file; give the path of a study's YAML file "
                                "(search_spaces/ holds examples, e.g. search_spaces/quick.yaml)",
        tmp_path / "results": "cannot read the study file: it is a folder; give a study's YAML file, e.g. "
                              "search_spaces/quick.yaml",
        results: f"cannot read the study file: it is a folder; give a study's YAML file, e.g. {results / 'study.yaml'}, "
                 f"the copy of the study file that wrote these results",
        results / "trials.parquet": "cannot read the study file: it is not a UTF-8 text file; give a study's YAML "
                                    "file, e.g. search_spaces/quick.yaml",
    }
    for command in ("run", "tune"):
        for path, said in cases.items():
            assert main([command, str(path), "--out", str(tmp_path / "out")]) == 2
            captured = capsys.readouterr()
            assert captured.err == f"ablate: error: {path}: {said}\n"
            assert "Errno" not in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()  # (nothing written for a study that was never read)


def _copy_advice(results, note: str) -> str:
    """The error of `ablate run RESULTS_FOLDER`: give the folder's copy of the study file, with ``note``."""
    return (f"ablate: error: {results}: cannot read the study file: it is a folder; give a study's YAML file, e.g. "
            f"{results / 'study.yaml'}, the copy of the study file that wrote these results ({note})\n")


def test_a_results_folder_whose_copy_has_a_relative_data_dir_says_it_is_relative_to_the_copy(tmp_path, capsys):
    # the advice to give the results folder's study.yaml failed for a study with a relative data_dir:
    # the copy reads it relative to the results folder ("data directory ... does not exist")
    from ablate.cli import main

    results = tmp_path / "results" / "tiny"
    results.mkdir(parents=True)
    (results / "study.yaml").write_text("name: tiny\ndata: real\ndata_dir: ../data\ntasks: [etth1]\nseeds: 1\n")
    assert main(["run", str(results), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == _copy_advice(results, (
        f"its data_dir '../data' is relative to the study file's folder, which is now {results}: give the original "
        f"study file, or make data_dir absolute in the copy"))


def test_a_results_folders_copy_with_relative_tuned_files_says_they_are_read_from_the_results_folder(tmp_path, capsys):
    # the copy `ablate run` keeps reads baseline.priorities_from / adamw.tuned_from relative to the results
    # folder: the folder's advice to give the copy did not say so, and the copy said the tuned file did not
    # exist and to run `ablate tune` first - a search the user had run
    from ablate.cli import main

    tune = tmp_path / "results" / "tune_priorities" / "tune"
    tune.mkdir(parents=True)
    (tune / "best_priorities.yaml").write_text("etth1: [1, 2, 3]\n")
    text = ("name: tiny\ntasks: [etth1]\nseeds: 1\n"
            "baseline: {priorities_from: ../results/tune_priorities/tune/best_priorities.yaml}\n")
    spec = tmp_path / "studies" / "tiny.yaml"
    spec.parent.mkdir()
    spec.write_text(text)
    assert main(["run", str(spec), "--dry-run", "--out", str(tmp_path / "results")]) == 0  # (the original finds it)
    capsys.readouterr()
    results = tmp_path / "results" / "tiny"
    results.mkdir()
    (results / "study.yaml").write_text(text)
    (results / "study_trials.json").write_text('{"study": "tiny", "trials": {}}')
    assert main(["run", str(results), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == _copy_advice(results, (
        f"its baseline.priorities_from '../results/tune_priorities/tune/best_priorities.yaml' is relative to the "
        f"study file's folder, which is now {results}: give the original study file, or make "
        f"baseline.priorities_from absolute in the copy"))
    assert main(["run", str(results / "study.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"this study file is the copy `ablate run` keeps in its results folder {str(results)!r}" in err, err
    assert "give the original study file, or make the path absolute in the copy" in err, err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_study_file_says_how_to_make_it_readable(tmp_path, capsys):
    # the bare "Permission denied" named no fix
    from ablate.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text("name: tiny\ntasks: [etth1]\nseeds: 1\n")
    spec.chmod(0)
    try:
        assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 2
    finally:
        spec.chmod(0o644)
    assert capsys.readouterr().err == (f"ablate: error: {spec}: cannot read the study file: permission denied; make it "
                                       f"readable (`chmod u+r {spec}`, or ask its owner) or give a readable copy\n")


@pytest.mark.parametrize("folder, quoted", [("studies", False), ("my studies", True)])
def test_an_unreadable_study_file_is_refused_with_the_fix(tmp_path, monkeypatch, folder, quoted):
    # (as the test above, where the tests run as root, who reads any file: the read itself refused). In a folder with
    # a space the path is quoted: `chmod u+r /x/my studies/s.yaml` the shell split into two paths, neither the file
    spec = tmp_path / folder / "s.yaml"
    spec.parent.mkdir()
    spec.write_text("name: tiny\ntasks: [etth1]\nseeds: 1\n")
    real = Path.read_text

    def refused(self, *args, **kwargs):
        if self == spec:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refused)
    with pytest.raises(StudyError) as caught:
        load_study(spec)
    shown = f"'{spec}'" if quoted else f"{spec}"
    assert str(caught.value) == (f"{spec}: cannot read the study file: permission denied; make it readable "
                                 f"(`chmod u+r {shown}`, or ask its owner) or give a readable copy")


@pytest.mark.parametrize("task", ["plug(a)", "plug)", "plug.x"])
def test_a_task_whose_name_holds_parentheses_names_the_key_once(task):
    # the task taken off the field path was "(task NAME)" with no parenthesis in NAME: a plugin task "plug(a)" said
    # "baseline.hidden (task plug(a)): hidden must be an integer ..." and "... (task plug(a)): hidden=-1 must be >= 1"
    from ablate.tasks import TASKS, register_task

    def check(config: dict) -> None:
        if config["hidden"] < 1:
            raise ValueError(f"{task}: hidden={config['hidden']} must be >= 1")

    register_task(task, metrics=[("mse", "min")], defaults={"hidden": 16}, check=check)(lambda c: None)
    try:
        study = {**BASE, "tasks": [task]}
        assert mapping_problems({**study, "baseline": {"hidden": "x"}}) == [
            f"s.yaml: baseline.hidden (task {task}): must be an integer, like 16, got 'x'"]
        assert mapping_problems({**study, "baseline": {"hidden": None}}) == [
            f"s.yaml: baseline.hidden (task {task}): must not be null (the task's default: 16; leave the key out to "
            f"take it)"]
        assert mapping_problems({**study, "ablations": {"hidden": [4, -1]}}) == [
            f"s.yaml: ablations.hidden[1] (task {task}): -1 must be >= 1"]
    finally:
        TASKS.remove(task)


@pytest.mark.parametrize(("arm", "key", "written"), [("baseline", "priorities_from", "best_priorities.yaml"),
                                                      ("adamw", "tuned_from", "best_adamw.yaml")])
def test_a_tuned_file_that_is_not_text_is_not_said_to_be_a_study_file(tmp_path, arm, key, written):
    # a tuned file given as tune/history.parquet was refused as "cannot read the study file: it is not a UTF-8 text
    # file; give a study's YAML file, e.g. search_spaces/quick.yaml", which is not what the key takes
    (tmp_path / "history.parquet").write_bytes(b"PAR1\xeb\x00\xff")
    with pytest.raises(StudyError) as info:
        parse_study({**BASE, arm: {key: "history.parquet"}}, "s.yaml", base_dir=tmp_path)
    assert info.value.problems == [
        f"s.yaml: {arm}.{key}: {tmp_path / 'history.parquet'}: cannot read the tuned file: it is not a UTF-8 text "
        f"file; give the {written} `ablate tune` wrote"]


def test_a_trial_s_cross_key_problem_names_the_task_once():
    # a trial's where names the task ("arm 'baseline' on task 'etth1'"); the task's check said it again:
    # "s.yaml: arm 'baseline' on task 'etth1': etth1: seq_len=5000 is too long ..."
    assert mapping_problems({**BASE, "baseline": {"seq_len": 5000}}) == [
        "s.yaml: arm 'baseline' on task 'etth1': seq_len=5000 is too long for the 80/20 split (the embedded series "
        "has 732 steps): choose seq_len <= 730"]
    assert mapping_problems({**BASE, "ablations": {"d_model": [130]}}) == [
        "s.yaml: arm 'd_model=130' on task 'etth1': d_model=130 is not a multiple of n_heads=4: choose d_model "
        "divisible by n_heads"]


def test_a_task_check_refusing_an_end_of_a_tuned_range_names_the_task_once():
    # ablate tune checks each task at the low and the high ends of the ranges, under "tune (high ends of the ranges,
    # task T)", which _names_task did not take for naming the task: a plugin task's check refusing a searched lr said
    # "...(high ends of the ranges, task plug): plug: lr=0.5 must be <= 0.1"
    from ablate.tasks import TASKS, register_task

    def check(config: dict) -> None:
        if config["lr"] > 0.1:
            raise ValueError(f"plug: lr={config['lr']} must be <= 0.1")

    register_task("plug", metrics=[("mse", "min")], defaults={"hidden": 16}, check=check)(lambda c: None)
    try:
        tune = {"arm": "adamw", "params": {"lr": {"low": 1.0e-4, "high": 0.5}}}
        assert mapping_problems({**BASE, "tasks": ["plug"], "tune": tune}, parse_tune_spec) == [
            "s.yaml: tune (high ends of the ranges, task plug): lr=0.5 must be <= 0.1"]
    finally:
        TASKS.remove("plug")
