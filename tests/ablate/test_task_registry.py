"""Tasks from installed packages (the ``ablate.tasks`` entry-point group)."""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
import warnings

import pytest

from ablate.tasks import TASKS, TaskSpec
from tests.metaadamw.test_registry import _fake_distribution


@pytest.fixture
def task_packages(tmp_path, monkeypatch):
    """Two installed packages: one names a factory decorated with @register_task (the object form
    that works), the other a plain function (not a task)."""
    (tmp_path / "decorated_tasks.py").write_text(textwrap.dedent("""
        from ablate.tasks import register_task

        @register_task("ep_decorated", metrics=[("loss", "min")], defaults={})
        def build(config):
            raise NotImplementedError
    """))
    (tmp_path / "plain_tasks.py").write_text("def build(config):\n    raise NotImplementedError\n")
    (tmp_path / "renamed_tasks.py").write_text(textwrap.dedent("""
        from ablate.tasks import register_task

        @register_task("ep_inner_name", metrics=[("loss", "min")], defaults={"width": 4})
        def build(config):
            raise NotImplementedError
    """))
    _fake_distribution(tmp_path, "decorated_tasks", "[ablate.tasks]\nep_decorated = decorated_tasks:build\n")
    _fake_distribution(tmp_path, "renamed_tasks", "[ablate.tasks]\nep_outer_name = renamed_tasks:build\n")
    _fake_distribution(tmp_path, "plain_tasks", "[ablate.tasks]\nep_plain = plain_tasks:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(TASKS, "_entry_points_loaded", False)
    monkeypatch.setattr(TASKS, "_entry_point_problems", {}, raising=False)
    yield
    for name in ("ep_decorated", "ep_plain", "ep_inner_name", "ep_outer_name"):
        TASKS.remove(name)
    for module in ("decorated_tasks", "plain_tasks", "renamed_tasks"):
        sys.modules.pop(module, None)


def test_a_task_entry_point_names_a_decorated_factory_or_is_ignored_with_the_reason(task_packages):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = TASKS.list()
    messages = [str(w.message) for w in caught]
    assert "ep_decorated" in names and isinstance(TASKS.get("ep_decorated"), TaskSpec)
    assert not [m for m in messages if "ep_decorated" in m]  # its module registered it: no "already registered"
    assert "ep_plain" not in names  # a plain function is not a task: every command would crash on it
    assert [m for m in messages if "entry point 'ep_plain'" in m and "is ignored: it is a function" in m
            and "@register_task" in m]
    # an entry point named otherwise than its decorator: both names (it was "ignored: it is a function")
    assert not [m for m in messages if "ep_outer_name" in m or "ep_inner_name" in m], messages
    inner, outer = TASKS.get("ep_inner_name"), TASKS.get("ep_outer_name")
    assert (inner.name, outer.name) == ("ep_inner_name", "ep_outer_name") and outer.factory is inner.factory
    assert outer.defaults == {"width": 4}


def test_train_and_list_import_plugins_from_the_command_line(tmp_path, monkeypatch, capsys):
    from ablate.cli import main
    from metaadamw import FEATURES

    (tmp_path / "cli_plugin_feats.py").write_text(textwrap.dedent("""
        from metaadamw import FEATURES
        from metaadamw.features import Basic

        @FEATURES.register("cli_plugin_features")
        class CliPluginFeatures(Basic):
            pass
    """))
    monkeypatch.chdir(tmp_path)
    train = ["train", "--task", "etth1", "--no-progress", "--set", "epochs=1", "--set", "max_train_batches=2",
             "--set", "features=cli_plugin_features", "--set", "num_threads=1"]
    try:
        assert main(train) == 2  # not registered without the plugin
        assert "cli_plugin_features" in capsys.readouterr().err
        assert main(["list", "--plugin", "cli_plugin_feats"]) == 0
        assert "cli_plugin_features" in capsys.readouterr().out
        assert main([*train, "--plugin", "cli_plugin_feats"]) == 0
        assert "status: ok" in capsys.readouterr().out
        assert main(["list", "--plugin", "no_such_plugin_mod"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ablate: error: command line: --plugin[0]: cannot import plugin module 'no_such_plugin_mod'")
        assert err.rstrip().endswith("Install it, or put no_such_plugin_mod.py in the working directory")
        # found, but it raises: the fix is in it (the hint said to install it or put it where it is)
        (tmp_path / "cli_broken_syntax.py").write_text("def broken(:\n")
        (tmp_path / "cli_broken_dependency.py").write_text("import cli_no_such_dependency\n")
        assert main(["list", "--plugin", "cli_broken_syntax"]) == 2
        err = capsys.readouterr().err
        assert "SyntaxError" in err and err.rstrip().endswith(
            f"Fix the error it raises ({tmp_path / 'cli_broken_syntax.py'}, line 1)"), err
        assert main(["list", "--plugin", "cli_broken_dependency"]) == 2
        assert capsys.readouterr().err.rstrip().endswith(
            "It imports 'cli_no_such_dependency', which is not installed here: install it")
        for given in ("cli_plugin_feats.py", "sub/cli_plugin_feats.py"):  # a file path: the module name to give
            assert main(["list", "--plugin", given]) == 2
            assert (f"--plugin[0]: {given!r} is a file path: give the module name 'cli_plugin_feats' (its file in "
                    f"the working directory") in capsys.readouterr().err
    finally:
        FEATURES.remove("cli_plugin_features")
        sys.modules.pop("cli_plugin_feats", None)


def test_list_task_shows_the_tasks_paper_settings_and_its_embedded_ones(capsys):
    import re

    from ablate.cli import main

    assert main(["list", "--task", "multi30k"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(2): (m.group(1) == "*", m.group(3), m.group(4))
            for m in re.finditer(r"^  ([* ]) (\w+)\s+(\S+(?: \S+)*?)\s{2,}(\S.*)$", out, re.M)}
    assert rows["meta_every"] == (True, "454", "24")  # Table 4's K_meta on the real data
    assert rows["modulator_layers"] == (True, "128", "2") and rows["priorities"] == (True, "[2.0, 5.0, 1.0]", "[2.0, 5.0, 1.0]")
    assert rows["lr"] == (False, "0.0005", "0.0005")  # the common default (Table 1)
    assert out.startswith("multi30k: ") and "ppl (min)" in out
    assert main(["list", "--task", "multi3Ok"]) == 2 and "unknown task 'multi3Ok'" in capsys.readouterr().err


def test_list_task_with_keys_also_lists_what_each_key_means(capsys):
    # --keys was dropped without a word when --task was given
    from ablate.cli import main
    from ablate.config import describe_fields

    assert main(["list", "--task", "etth1", "--keys"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("etth1: ") and "trial config (* = set by the task" in out
    assert "trial-config keys (ablate train --set KEY=VALUE, or in study files):" in out
    assert out.rstrip().endswith(describe_fields()) and "tasks:" not in out


def test_registering_a_plain_function_as_a_task_is_refused_with_the_decorator_to_use():
    # the unknown-task error said "@TASKS.register(...)", and following it registered a function
    # that crashed `ablate list` later with AttributeError
    from ablate.tasks import get_task
    from metaadamw import UnknownComponentError

    with pytest.raises(UnknownComponentError, match=r'decorate it with @register_task\("nope", metrics=\[') as info:
        get_task("nope")
    assert "TASKS.register" not in str(info.value)
    with pytest.raises(TypeError, match=r"cannot register 'mytask' as a task: it is a function \('.*build'\), not a "
                                        r"task: decorate the task's factory with @register_task"):
        @TASKS.register("mytask")
        def build(config):
            raise NotImplementedError
    assert "mytask" not in TASKS.list()


def test_batches_of_named_tuples_and_mappings_move_to_the_device():
    # torch's collate keeps named tuples, which type(batch)(generator) could not build; a dict-like
    # batch that is not a dict (a tokenizer's) came back unmoved
    import collections

    import torch

    from ablate.tasks.base import move_to_device

    Batch = collections.namedtuple("Batch", "x y")

    class Encoding(collections.UserDict):
        pass

    batch = [Batch(torch.ones(2), torch.zeros(1)), Encoding(ids=torch.ones(3), text="a"), {"m": (torch.ones(1),)}]
    moved = move_to_device(batch, "meta")
    assert type(moved[0]) is Batch and moved[0].x.device.type == moved[0].y.device.type == "meta"
    assert type(moved[1]) is Encoding and moved[1]["ids"].device.type == "meta" and moved[1]["text"] == "a"
    assert moved[2]["m"][0].device.type == "meta"


def test_a_task_name_taken_says_where_and_how_to_replace_it():
    from ablate.tasks import register_task
    from ablate.tasks.base import TaskInstance

    def factory(config: dict) -> TaskInstance:
        raise NotImplementedError

    with pytest.raises(ValueError, match=r"already registered \(ablate.tasks.etth.*override=True"):
        register_task("etth1", metrics=[("mse", "min")], defaults={})(factory)
    assert TASKS.get("etth1").factory is not factory


@pytest.mark.parametrize("mistake, message", [
    ("tuple", "returned a tuple: return an ablate.tasks.TaskInstance"),
    ("loader", "TaskInstance.train is a DataLoader: give a map-style dataset"),
    ("vector_loss", "loss_fn(model, batch) returned a tensor of shape (8,): return the batch's mean loss"),
    ("float_loss", "loss_fn(model, batch) returned a float"),
    ("metric_name", "evaluate(model, loader) returned ['MSE'], without its declared metric(s) ['mse']"),
])
def test_a_tasks_own_code_that_breaks_the_contract_is_one_clear_error(mistake, message):
    # a factory returning a tuple, a DataLoader as the training set, a loss that is not a scalar, or
    # evaluate() keys other than the declared metrics gave tracebacks (AttributeError, KeyError at
    # the end of a trial), and Ray retried them although they fail alike every time
    import torch
    from torch import nn

    from ablate.config import ConfigError
    from ablate.tasks import register_task
    from ablate.tasks.base import TaskContractError, TaskInstance
    from ablate.trial import run_trial

    def factory(config):
        torch.manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(32, 3), torch.randn(32, 1))
        model = nn.Linear(3, 1)

        def loss_fn(model, batch):
            error = (model(batch[0]) - batch[1]).squeeze(1) ** 2
            return {"vector_loss": error, "float_loss": float(error.mean())}.get(mistake, error.mean())

        def evaluate(model, loader):
            with torch.no_grad():
                value = float(sum(loss_fn(model, b) for b in loader) / len(loader)) if mistake not in (
                    "vector_loss", "float_loss") else 1.0
            return {"MSE" if mistake == "metric_name" else "mse": value}

        if mistake == "tuple":
            return model, data
        train = torch.utils.data.DataLoader(data, batch_size=8) if mistake == "loader" else data
        return TaskInstance(name="contract", model=model, train=train, val=data, loss_fn=loss_fn, evaluate=evaluate,
                            data_source="synthetic")

    register_task("contract_task", metrics=[("mse", "min")], defaults={"epochs": 1, "batch_size": 8})(factory)
    try:
        with pytest.raises(TaskContractError, match=re.escape(message)) as err:
            run_trial({"task": "contract_task", "optimizer": "adamw", "epochs": 1, "num_threads": 1})
        assert isinstance(err.value, ConfigError)  # (one line from the CLI; a sweep fails the trial without retries)
    finally:
        TASKS.remove("contract_task")


def test_a_task_check_that_raises_by_mistake_is_named_not_a_traceback():
    from ablate.config import ConfigError, resolve_config
    from ablate.tasks import register_task

    def check(config):
        return config["n_hiden"]  # a misspelt key: KeyError

    register_task("buggy_check_task", metrics=[("mse", "min")], defaults={"n_hidden": 4}, check=check)(lambda c: None)
    try:
        with pytest.raises(ConfigError, match=r"task 'buggy_check_task': its check\(config\) raised KeyError: 'n_hiden'"):
            resolve_config({"task": "buggy_check_task"})
    finally:
        TASKS.remove("buggy_check_task")


@pytest.mark.parametrize("files, plugin, fix", [
    ({"hint_pkg_a/__init__.py": ""}, "hint_pkg_a.tasks",
     "Install it, or put hint_pkg_a/tasks.py next to the study file"),
    ({"hint_pkg_b/__init__.py": "from .helpers import x\n"}, "hint_pkg_b",
     "It imports 'hint_pkg_b.helpers', a module of its own package that does not exist: add hint_pkg_b/helpers.py"),
    ({"hint_mod_c.py": "import json.no_such_submodule\n"}, "hint_mod_c",
     "It imports 'json.no_such_submodule', which the installed 'json' does not have (another version?)"),
    ({"hint_mod_d.py": "import hint_no_such_dependency.sub\n"}, "hint_mod_d",
     "It imports 'hint_no_such_dependency', which is not installed here: install it"),
])
def test_a_plugin_that_fails_to_import_is_told_what_is_missing(tmp_path, files, plugin, fix):
    from ablate.study import StudyError, import_plugins

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    try:
        with pytest.raises(StudyError) as info:
            import_plugins([plugin], tmp_path)
        assert str(info.value).endswith(fix), str(info.value)
    finally:
        for module in [m for m in sys.modules if m.startswith("hint_")]:
            sys.modules.pop(module)
        if str(tmp_path.resolve()) in sys.path:
            sys.path.remove(str(tmp_path.resolve()))


def test_a_namespace_package_next_to_the_study_file_is_a_plugin(tmp_path):
    from ablate.study import import_plugins

    (tmp_path / "hint_ns_pkg").mkdir()  # (no __init__.py)
    (tmp_path / "hint_ns_pkg" / "tasks.py").write_text("LOADED = True\n")
    try:
        import_plugins(["hint_ns_pkg.tasks"], tmp_path)
        assert sys.modules["hint_ns_pkg.tasks"].LOADED
    finally:
        for module in [m for m in sys.modules if m.startswith("hint_ns_pkg")]:
            sys.modules.pop(module)
        if str(tmp_path.resolve()) in sys.path:
            sys.path.remove(str(tmp_path.resolve()))


def test_a_task_keys_type_is_its_default_for_the_data_mode():
    # an integer for a key whose real-data default is a float is that float (the embedded default's int typed it),
    # and a None default takes the type of the other mode's
    from ablate.config import ConfigError, resolve_config, trial_id
    from ablate.tasks import register_task

    register_task("typed_task", metrics=[("mse", "min")], defaults={"scale": 1.0, "clip": None, "scales": [0.5, 1.0]},
                  embedded_defaults={"scale": 2, "clip": 1.0})(lambda c: None)
    try:
        # a list of floats: [1, 2] and [1.0, 2.0] are one trial (they were two ids that trained alike)
        listed = resolve_config({"task": "typed_task", "scales": [1, 2.5, True]})
        assert [type(v) for v in listed["scales"]] == [float, float, bool] and listed["scales"] == [1.0, 2.5, True]
        assert trial_id(resolve_config({"task": "typed_task", "scales": [1, 2]})) == trial_id(
            resolve_config({"task": "typed_task", "scales": [1.0, 2.0]}))
        real = resolve_config({"task": "typed_task", "data": "real", "scale": 3, "clip": 2})
        assert (real["scale"], type(real["scale"]), real["clip"], type(real["clip"])) == (3.0, float, 2.0, float)
        assert type(resolve_config({"task": "typed_task", "scale": 3})["scale"]) is int  # (embedded: like 2)
        with pytest.raises(ConfigError, match=r"clip must be a number, like 1\.0 \(task typed_task\), got 'abc'"):
            resolve_config({"task": "typed_task", "data": "real", "clip": "abc"})
    finally:
        TASKS.remove("typed_task")


def test_a_misspelt_trial_key_in_a_tasks_defaults_is_named_at_registration():
    # "epoch" became a task key of its own while "epochs" kept its default, without a word
    from ablate.tasks import register_task

    with pytest.warns(UserWarning, match=r"task 'typo_task': defaults key 'epoch' is no trial key \(did you mean 'epochs'\?\)"):
        register_task("typo_task", metrics=[("mse", "min")], defaults={"epoch": 3, "d_model": 8})(lambda c: None)
    TASKS.remove("typo_task")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a task's own keys draw no warning
        register_task("own_keys_task", metrics=[("mse", "min")], defaults={"d_model": 8, "n_heads": 2})(lambda c: None)
    TASKS.remove("own_keys_task")


@pytest.mark.parametrize("metrics, defaults, embedded, named", [
    ([("mse", "min"), ("metric", "min")], {}, {}, "metric 'metric' (stored as best_metric)"),
    ([("epoch", "max")], {}, {}, "metric 'epoch' (stored as best_epoch)"),
    ([("mse", "min")], {"mode": "fast", "d_model": 8}, {}, "defaults key 'mode'"),
    ([("mse", "min")], {}, {"error": 0.1}, "embedded_defaults key 'error'"),
    ([("mse", "min")], {"best_mse": 0.5}, {}, "defaults key 'best_mse'"),  # (best_<metric>: overwritten)
    ([("mse", "min")], {"ref_scale": 1.0}, {}, "defaults key 'ref_scale'"),
    ([("mse", "min")], {}, {"test_mse": 0.1}, "embedded_defaults key 'test_mse'"),
])
def test_a_tasks_key_or_metric_named_like_a_results_column_is_refused(metrics, defaults, embedded, named):
    # the stored row kept one of the two: best_metric became the secondary metric 'metric', an ablated task key
    # 'mode' was stored as the metric's direction, 'error' read 0.1 on ok trials
    from ablate.tasks import register_task

    with pytest.raises(ValueError, match=rf"task 'clash': {re.escape(named)}: the name of a column of the trial's "
                                         rf"stored results; rename it \(e.g. clash_"):
        register_task("clash", metrics=metrics, defaults=defaults, embedded_defaults=embedded)(lambda c: None)
    assert "clash" not in TASKS


@pytest.mark.parametrize("metrics", [[], (), [("mse",)], [("", "min")], "mse", [("mse", "min"), "acc"]])
def test_a_task_without_a_well_formed_metric_is_refused_at_registration(metrics):
    # metrics=[] was accepted; every trial then failed with an IndexError in TaskSpec.metric, after Ray started
    from ablate.tasks import register_task

    with pytest.raises(ValueError, match=r"task 'nometric': metrics must list one or more \(name, 'min' or 'max'\) "
                                         r"pairs, the first being the one early stopping"):
        register_task("nometric", metrics=metrics, defaults={})(lambda c: None)
    assert "nometric" not in TASKS


def test_the_reserved_result_columns_are_the_columns_a_trial_stores(tmp_path):
    from ablate.config import COMMON_FIELDS, RESULT_COLUMNS
    from ablate.results import LABEL_COLUMNS
    from ablate.tasks import get_task
    from ablate.trial import run_trial

    assert not RESULT_COLUMNS & set(COMMON_FIELDS) and set(LABEL_COLUMNS) <= RESULT_COLUMNS
    config = {"task": "etth1", "optimizer": "adamw", "epochs": 1, "max_train_batches": 2}
    row = run_trial(config).row
    spec = get_task("etth1")
    own = {k for k in row if k.startswith(("best_", "ref_", "test_"))} - RESULT_COLUMNS
    assert own and all(k[5:] in {m.name for m in spec.metrics} for k in own if k.startswith("best_"))
    keys = set(COMMON_FIELDS) | set(spec.defaults) | set(spec.embedded_defaults)
    assert set(row) - keys - own == RESULT_COLUMNS - set(LABEL_COLUMNS)  # (the labels come from the study)


def test_a_streamed_test_split_is_accepted():
    # the test split is read once, in order: an IterableDataset will do (train and val are shuffled)
    import torch

    from ablate.tasks import TaskInstance, get_task
    from ablate.tasks.base import check_task_instance

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(torch.ones(3), torch.ones(1))])

    data = torch.utils.data.TensorDataset(torch.randn(4, 3), torch.randn(4, 1))
    instance = TaskInstance(name="s", model=torch.nn.Linear(3, 1), train=data, val=data, loss_fn=None,
                            evaluate=None, data_source="x", test=Stream())
    check_task_instance(get_task("etth1"), instance)  # no error
    with pytest.raises(ValueError, match="TaskInstance.val is a Stream"):
        check_task_instance(get_task("etth1"), dataclasses.replace(instance, val=Stream()))


def test_a_config_naming_a_broken_entry_point_says_why_it_is_missing(task_packages, tmp_path, monkeypatch):
    from ablate.config import ConfigError, resolve_config
    from metaadamw import FEATURES

    (tmp_path / "broken_feats.py").write_text("import a_dependency_that_is_not_installed\n")
    _fake_distribution(tmp_path, "broken_feats", "[metaadamw.features]\nfancy = broken_feats:Fancy\n")
    monkeypatch.setattr(FEATURES, "_entry_points_loaded", False)
    monkeypatch.setattr(FEATURES, "_entry_point_problems", {}, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match=r"features='fancy' is not allowed \(the entry point 'fancy' "
                                              r"\(broken_feats:Fancy\) of group 'metaadamw.features' could not be "
                                              r"loaded: ModuleNotFoundError"):
            resolve_config({"task": "etth1", "features": "fancy"})
        # a task entry point that names an undecorated function: the config error says what is wrong with it
        with pytest.raises(ConfigError, match=r"task='ep_plain' is not allowed \(the entry point 'ep_plain' "
                                              r"\(plain_tasks:build\) of group 'ablate.tasks' is ignored: it is a "
                                              r"function .*@register_task"):
            resolve_config({"task": "ep_plain"})
    sys.modules.pop("broken_feats", None)


def test_register_task_with_a_taken_alias_leaves_nothing_registered():
    from ablate.tasks import register_task

    with pytest.raises(ValueError, match="a task named 'etth2' is already registered"):
        @register_task("test_half_made", metrics=[("mse", "min")], defaults={}, aliases=("test_half_alias", "etth2"))
        def build(config):
            raise NotImplementedError
    try:
        assert "test_half_made" not in TASKS.list() and "test_half_alias" not in TASKS.list()
        assert TASKS.get("etth2").name == "etth2"
    finally:
        TASKS.remove("test_half_made")
        TASKS.remove("test_half_alias")


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_the_data_fingerprint_of_a_folder_sees_the_files_behind_a_linked_subfolder_and_survives_a_loop(tmp_path):
    # (an ImageFolder-like reader walks links to folders: changed data behind one must run the trials again)
    import os

    from ablate.tasks import Metric, data_fingerprint

    images = tmp_path / "data" / "images"
    (images / "cat").mkdir(parents=True)
    (images / "cat" / "1.png").write_bytes(b"x" * 10)
    (tmp_path / "big" / "dog").mkdir(parents=True)
    (tmp_path / "big" / "dog" / "1.png").write_bytes(b"y" * 10)
    os.symlink(tmp_path / "big" / "dog", images / "dog")  # a class folder on another disk
    os.symlink(images, images / "cat" / "loop")  # a link to a folder above it: no loop
    os.symlink(tmp_path / "nowhere", images / "broken")
    spec = TaskSpec("folder_task", lambda c: None, (Metric("mse", "min"),), {}, {}, locate=lambda c: [images])
    before = data_fingerprint(spec, {"data": "real"})
    assert data_fingerprint(spec, {"data": "real"}) == before
    (tmp_path / "big" / "dog" / "1.png").write_bytes(b"y" * 11)
    assert data_fingerprint(spec, {"data": "real"}) != before
    # a link to the data directory above: its other files are not the dataset's (they counted, all of them)
    os.symlink(tmp_path / "data", images / "cat" / "up")
    now = data_fingerprint(spec, {"data": "real"})
    (tmp_path / "data" / "another_dataset.bin").write_bytes(b"z" * 100)
    assert data_fingerprint(spec, {"data": "real"}) == now


def test_folder_files_of_one_folder_are_equal_however_the_folder_is_given():
    # FolderFiles("x") and FolderFiles(Path("x")) were unequal and hashed apart: a locate giving strings
    from pathlib import Path

    from ablate.tasks import FolderFiles

    given_str, given_path = FolderFiles("data/x", "*.txt"), FolderFiles(Path("data/x"), "*.txt")
    assert given_str == given_path and hash(given_str) == hash(given_path) and len({given_str, given_path}) == 1
    assert given_str.folder == Path("data/x") and isinstance(given_str.folder, Path)
    assert FolderFiles("data/x", "*.txt") != FolderFiles("data/x", "*.csv")


@pytest.mark.parametrize("folder", [None, 3, b"data/x"])
def test_folder_files_of_no_path_is_refused_naming_folder_files(folder):
    # FolderFiles(None) raised Path()'s own "expected str, bytes or os.PathLike object, not NoneType"
    from ablate.tasks import FolderFiles

    with pytest.raises(TypeError) as info:
        FolderFiles(folder, "*.txt")
    assert str(info.value) == (f"FolderFiles({folder!r}, '*.txt'): the folder must be a path (a str or a pathlib.Path), "
                               f"not {type(folder).__name__}: give the folder that holds the files")


@pytest.mark.parametrize("path_keys", [None, 3, "csv_file"])
def test_path_keys_of_no_tuple_are_refused_naming_the_task(path_keys):
    # path_keys=None (meaning "none") crashed in register_task with a bare "'NoneType' object is not iterable"
    from ablate.tasks import TASKS, register_task

    with pytest.raises(ValueError) as info:
        register_task("plug_path_keys", metrics=[("loss", "min")], defaults={"csv_file": None},
                      path_keys=path_keys)(lambda c: None)
    assert str(info.value) == (f"task 'plug_path_keys': path_keys must be a tuple of key names, e.g. ('csv_file',); "
                               f"got {path_keys!r}")
    assert "plug_path_keys" not in TASKS.list()
    register_task("plug_path_keys", metrics=[("loss", "min")], defaults={"csv_file": None},
                  path_keys=["csv_file"])(lambda c: None)  # (a list, as before)
    try:
        assert TASKS.get("plug_path_keys").path_keys == ("csv_file",)
    finally:
        TASKS.remove("plug_path_keys")


@pytest.mark.parametrize("plugins, message", [
    ([3], "<string>: plugins[0]: 3 is not a module name: give the plugin's module name as a string, "
          "e.g. 'my_package.my_features'"),
    (["json", None], "<string>: plugins[1]: None is not a module name: give the plugin's module name as a string, "
                     "e.g. 'my_package.my_features'"),
    ("my_plugin", "<string>: plugins: must be a list of module names, e.g. ['my_package.my_features']; "
                  "got the single string 'my_plugin': give ['my_plugin']"),
])
def test_import_plugins_refuses_a_name_that_is_no_string(plugins, message):
    # a Python caller's non-string name crashed in name.endswith (AttributeError); a bare string imported its letters
    from ablate.study import StudyError, import_plugins

    with pytest.raises(StudyError) as info:
        import_plugins(plugins)
    assert str(info.value) == message


def test_null_for_a_task_key_whose_default_is_a_value_is_refused():
    # {hidden: null} passed validation and the factory crashed in every trial on None
    from ablate.config import ConfigError, resolve_config
    from ablate.tasks import register_task

    register_task("null_task", metrics=[("mse", "min")], defaults={"hidden": 16, "clip": None},
                  embedded_defaults={"clip": 1.0})(lambda c: None)
    try:
        with pytest.raises(ConfigError, match=r"s.yaml: hidden must not be null \(task null_task's default: 16; "
                                              r"leave the key out to take it\)"):
            resolve_config({"task": "null_task", "hidden": None}, where="s.yaml")
        # a key whose default is null (in either data mode) may be null
        assert resolve_config({"task": "null_task", "clip": None})["clip"] is None
        assert resolve_config({"task": "null_task", "data": "real", "clip": None})["clip"] is None
        assert resolve_config({"task": "null_task"})["hidden"] == 16
    finally:
        TASKS.remove("null_task")


def test_list_task_with_keys_describes_the_tasks_own_keys_with_their_defaults(capsys):
    # --keys described the common keys only, not the task's own (pooling, n_layers, ...)
    from ablate.cli import main

    assert main(["list", "--task", "etth1", "--keys"]) == 0
    out = capsys.readouterr().out
    own = out[out.index("\nkeys of task etth1"):out.index("\ntrial-config keys")]
    rows = {line.split()[0]: line.split() for line in own.strip().splitlines()[2:]}
    assert rows["pooling"] == ["pooling", '"last"', '"last"', "a", "string"]
    assert rows["n_layers"] == ["n_layers", "2", "2", "an", "integer"]
    assert rows["seq_len"][:3] == ["seq_len", "96", "24"]  # (real data, then the embedded data)
    assert rows["multivariate"] == ["multivariate", "false", "false", "true", "or", "false"]
    assert "lr" not in rows and "overrides.etth1:" in own
    assert main(["list", "--task", "etth1"]) == 0 and "keys of task" not in capsys.readouterr().out


def test_find_task_gives_the_registered_task_or_none_for_anything_else():
    # one helper for "the task of this name, if there is one" (it was spelled out at four call sites)
    from ablate.tasks import TASKS, find_task

    assert find_task("etth1") is TASKS.get("etth1")
    assert find_task("etth1").metric.name == TASKS.get("etth1").metric.name
    for name in ("no_such_task", "", None, float("nan"), 3, ["etth1"]):  # (a list is no key: no TypeError either)
        assert find_task(name) is None


def test_list_task_of_a_plugin_without_plugin_names_the_option(tmp_path, monkeypatch, capsys):
    """`ablate list --task T` for a plugin's task without `--plugin` says to give it, as `ablate
    train` and study files do (it said only to decorate the factory "in a module you import", which
    the user's plugin already does); with `--plugin` the task's config is listed."""
    from ablate.cli import main

    (tmp_path / "cli_plugin_task.py").write_text(textwrap.dedent("""
        from ablate.tasks import register_task

        @register_task("cli_listed_task", metrics=[("loss", "min")], defaults={"epochs": 3, "width": 4})
        def build(config):
            raise NotImplementedError
    """))
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["list", "--task", "cli_listed_task"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ablate: error: unknown task 'cli_listed_task'. Registered: "), err
        assert err.rstrip().endswith("A task a plugin registers: give --plugin MODULE (the module that registers "
                                     "it, in the working directory or installed)."), err
        assert len(err.strip().splitlines()) == 1
        assert main(["list", "--task", "cli_listed_task", "--plugin", "cli_plugin_task"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("cli_listed_task: ") and re.search(r"\* width +4 +4", out), out
    finally:
        TASKS.remove("cli_listed_task")
        sys.modules.pop("cli_plugin_task", None)


def test_list_task_names_the_plugin_option_only_where_a_plugin_may_register_the_task(task_packages, capsys):
    """`ablate list --task ETTh1` (a built-in task in other case) said to give --plugin, which `ablate train`
    does not say for it: no plugin registers it; a misspelling ('ettth1') keeps its did-you-mean (and, as
    `ablate train`, the plugin option: 'cifar100' is as close to 'cifar10' and may be a plugin's); a task
    from an installed package's entry point is listed, a broken one's error says what is wrong with it."""
    from ablate.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the entry point that names an undecorated function)
        assert main(["list", "--task", "ETTh1"]) == 2
        err = capsys.readouterr().err
        assert "unknown task 'ETTh1'" in err and "Did you mean 'etth1'" in err and "--plugin" not in err, err
        assert main(["list", "--task", "ettth1"]) == 2
        err = capsys.readouterr().err
        assert "Did you mean 'etth1'" in err and "give --plugin MODULE" in err, err
        assert main(["list", "--task", "ep_decorated"]) == 0
        assert capsys.readouterr().out.startswith("ep_decorated: ")
        assert main(["list", "--task", "ep_plain"]) == 2
    err = capsys.readouterr().err
    assert "the entry point 'ep_plain' (plain_tasks:build)" in err and "--plugin" not in err, err
