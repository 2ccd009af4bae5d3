"""Tasks from installed packages (the ``ablate.tasks`` entry-point group)."""

from __future__ import annotations

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
    _fake_distribution(tmp_path, "decorated_tasks", "[ablate.tasks]\nep_decorated = decorated_tasks:build\n")
    _fake_distribution(tmp_path, "plain_tasks", "[ablate.tasks]\nep_plain = plain_tasks:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(TASKS, "_entry_points_loaded", False)
    yield
    for name in ("ep_decorated", "ep_plain"):
        TASKS.remove(name)
    for module in ("decorated_tasks", "plain_tasks"):
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
        assert "put no_such_plugin_mod.py in the working directory" in err
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
