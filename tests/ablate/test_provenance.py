"""What made a stored trial (ablate.provenance): the code fingerprint, and the note of a run that
reuses trials made by other code."""

from __future__ import annotations

import importlib
import shlex
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ablate import provenance
from ablate.cli import main
from ablate.results import load_results, write_trial
from ablate.study import load_study
from tests.ablate.study_helpers import tiny_study


def test_the_code_fingerprint_follows_the_packages_python_files_and_nothing_else(tmp_path):
    installed = {name: Path(importlib.import_module(name).__file__).parent for name in provenance.PACKAGES}
    assert provenance.code_fingerprint() == provenance.fingerprint(installed)
    copy = {name: Path(shutil.copytree(root, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")))
            for name, root in installed.items()}
    before = provenance.code_fingerprint()
    assert provenance.fingerprint(copy) == before  # the same files elsewhere: the same code
    (copy["ablate"] / "notes.txt").write_text("not code")
    (copy["metaadamw"] / "__pycache__").mkdir()
    (copy["metaadamw"] / "__pycache__" / "stray.py").write_text("x = 1")
    (copy["ablate"] / ".ipynb_checkpoints").mkdir()
    (copy["ablate"] / ".ipynb_checkpoints" / "trial-checkpoint.py").write_text("x = 1")
    (copy["ablate"] / ".#trial.py").symlink_to("user@host.12345:1700000000")  # (Emacs's lock: dangling)
    (copy["ablate"] / "tasks" / "gone.py").symlink_to(tmp_path / "nowhere.py")
    assert provenance.fingerprint(copy) == before
    optimizer = copy["metaadamw"] / "optimizer.py"
    optimizer.write_text(optimizer.read_text() + "\n# a change\n")
    changed = provenance.fingerprint(copy)
    assert changed != before and len(changed) == 12
    (copy["ablate"] / "tasks" / "mine.py").write_text("# a new module\n")
    assert provenance.fingerprint(copy) not in (before, changed)
    # a file moved to the other package is another code
    moved = {"metaadamw": copy["ablate"], "ablate": copy["metaadamw"]}
    assert provenance.fingerprint(moved) != provenance.fingerprint(copy)


def _store(out, trial, **made):
    write_trial(out, {**trial.config, "trial_id": trial.trial_id, "status": "ok", "best_metric": 1.0, **made},
                [{"epoch": 1}])


def test_a_run_reusing_trials_made_by_other_code_says_how_many_and_how_to_run_them_again(tmp_path, capsys, one_ray):
    spec = tiny_study(tmp_path, "prov", seeds=1)
    study = load_study(spec)
    out = tmp_path / "results"
    this = {"code_fingerprint": provenance.code_fingerprint(), "torch_version": torch.__version__}
    made = [{"code_fingerprint": "0123456789ab", "torch_version": torch.__version__},  # other code
            {**this, "torch_version": "1.0.0"},  # another torch
            {}]  # stored before ablate recorded it
    for trial, by in zip(study.trials, made):
        _store(out / "prov", trial, **by)
    assert main(["run", str(spec), "--out", str(out)]) == 0  # every trial is stored: no Ray, no training
    printed = capsys.readouterr().out
    assert "3 already done (reused), 0 to run" in printed
    assert (f"note: of the 3 reused trial(s), 2 were made by other code or torch (etth1: code 0123456789ab, torch "
            f"{torch.__version__} | code {this['code_fingerprint']}, torch 1.0.0 - now code {this['code_fingerprint']}, "
            f"torch {torch.__version__}) and 1 was stored by an ablate that did not record its code: they are kept "
            f"as stored") in printed, printed
    rerun = f"ablate run {spec} --out {out} --rerun all"
    assert f"{rerun} (or --rerun TASK or ARM for some)" in printed, printed
    assert len(load_results(out / "prov").trials) == 3  # kept as stored

    # the command it gave runs them again, with this code (on Ray: one_ray), and then nothing is said
    hint = next(line for line in printed.splitlines() if line.startswith("note: of the")).split(
        "run them again with this code: ")[1].split(" (or --rerun")[0]
    assert shlex.split(hint)[:2] == ["ablate", "run"] and main(shlex.split(hint)[1:]) == 0
    trials = load_results(out / "prov").trials
    assert len(trials) == 3 and set(trials["code_fingerprint"]) == {this["code_fingerprint"]}
    assert set(trials["status"]) == {"ok"} and set(trials["torch_version"]) == {torch.__version__}
    capsys.readouterr()
    assert main(["run", str(spec), "--out", str(out)]) == 0
    assert "note: of the" not in capsys.readouterr().out


def test_outside_ablate_run_the_note_says_what_to_delete_and_from_python_which_out_to_give(tmp_path, capsys):
    from ablate.sweep import run_study

    study = load_study(tiny_study(tmp_path, "ref", seeds=1))
    for trial in study.trials:
        _store(tmp_path / "elsewhere" / "ref", trial, code_fingerprint="0123456789ab", torch_version="1.0.0")
    # as ablate tune's cross-task reference runs it: its command cannot rerun the study's trials
    run_study(study, tmp_path / "elsewhere", resume_hint="ablate tune s.yaml --trials 5")
    printed = capsys.readouterr().out
    assert (f"run them again with this code: delete {tmp_path / 'elsewhere' / 'ref'} and run `ablate tune s.yaml "
            f"--trials 5` again (values stored before from these trials") in printed, printed
    assert "--rerun" not in printed
    run_study(study, tmp_path / "elsewhere")  # from Python: the command names the output folder
    assert f"ablate run {study.path} --out {tmp_path / 'elsewhere'} --rerun all" in capsys.readouterr().out


def _plugin(folder: Path, name: str, how: str) -> Path:
    """A plugin registering the task ``<name>_task`` (``how``: a module ``<name>.py``; a package
    ``<name>/`` whose ``tasks.py`` registers it and has a helper module beside it; the same as a
    namespace package, without ``__init__.py``; a module whose factory is a ``functools.partial``).
    Returns the file that defines the factory."""
    factory = textwrap.dedent(f"""\
        import functools

        from ablate.tasks.base import register_task


        def build(config, scale=1.0):
            raise RuntimeError("not built in these tests")


        register_task("{name}_task", metrics=[("score", "max")], defaults={{"epochs": 1, "grouping": "original"}})(
            {"functools.partial(build, scale=2.0)" if how == "partial" else "build"})
        """)
    if how in ("module", "partial"):
        (folder / f"{name}.py").write_text(factory)
        return folder / f"{name}.py"
    (folder / name).mkdir()
    if how == "package":
        (folder / name / "__init__.py").write_text(f"from {name} import tasks\n")
    (folder / name / "tasks.py").write_text(factory)
    (folder / name / "helpers.py").write_text("SCALE = 1.0\n")
    return folder / name / "tasks.py"


@pytest.fixture
def plugin_cleanup():
    names = []
    yield names
    from ablate.tasks import TASKS

    for name in names:
        for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            del sys.modules[module]
        if f"{name}_task" in TASKS:
            TASKS.remove(f"{name}_task")


@pytest.mark.parametrize("how", ["module", "package", "namespace", "partial"])
def test_a_plugin_tasks_fingerprint_covers_the_module_that_defines_it(tmp_path, monkeypatch, plugin_cleanup, how):
    from ablate.tasks import TASKS, get_task

    name = f"fp_plugin_{how}"
    plugin_cleanup.append(name)
    source = _plugin(tmp_path, name, how)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module(name if how in ("module", "partial") else f"{name}.tasks")
    spec = TASKS.get(f"{name}_task")
    base = provenance.code_fingerprint()
    assert provenance.code_fingerprint(get_task("etth1")) == base  # a built-in task: ablate's code
    before = provenance.code_fingerprint(spec)
    assert before != base and len(before) == 12
    if how in ("package", "namespace"):  # (its other modules are not covered: see code_fingerprint)
        helper = source.parent / "helpers.py"
        helper.write_text(helper.read_text() + "# a change\n")
        assert provenance.code_fingerprint(spec) == before
    source.write_text(source.read_text() + "# a change\n")  # seen at once (the file's time and size changed)
    changed = provenance.code_fingerprint(spec)
    assert changed not in (before, base)
    # the same module elsewhere (as Ray ships a plugin to a worker) is the same code
    elsewhere = tmp_path / "worker" / source.name
    elsewhere.parent.mkdir()
    shutil.copy(source, elsewhere)
    module = spec.factory.func.__module__ if how == "partial" else spec.factory.__module__
    monkeypatch.setattr(sys.modules[module], "__file__", str(elsewhere))
    assert provenance.code_fingerprint(spec) == changed


def test_reused_trials_of_a_plugin_task_made_before_its_code_changed_are_noted(tmp_path, capsys, plugin_cleanup):
    # a trial's id does not see its task's code: after a fix to a plugin, its stored trials were reused without a word
    name = "noted_plugin"
    plugin_cleanup.append(name)
    _plugin(tmp_path, name, "module")
    spec = tmp_path / "plugged.yaml"
    spec.write_text(f"name: plugged\ntasks: [{name}_task, etth1]\nseeds: 2\nadamw: false\nplugins: [{name}]\n")
    study = load_study(spec)
    from ablate.tasks import TASKS

    task = TASKS.get(f"{name}_task")
    out = tmp_path / "results"
    before_fix = provenance.code_fingerprint()  # (as an ablate that did not fingerprint plugins recorded it)
    ours = [t for t in study.trials if t.config["task"] == f"{name}_task"]
    theirs = [t for t in study.trials if t.config["task"] == "etth1"]
    _store(out / "plugged", ours[0], code_fingerprint=before_fix, torch_version=torch.__version__)
    _store(out / "plugged", ours[1], code_fingerprint=provenance.code_fingerprint(task), torch_version=torch.__version__)
    _store(out / "plugged", theirs[0], code_fingerprint="0123456789ab", torch_version=torch.__version__)
    _store(out / "plugged", theirs[1], code_fingerprint=before_fix, torch_version=torch.__version__)
    assert main(["run", str(spec), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (f"note: of the 4 reused trial(s), 2 were made by other code or torch (etth1: code 0123456789ab, torch "
            f"{torch.__version__} - now code {before_fix}, torch {torch.__version__}; {name}_task: code {before_fix}, "
            f"torch {torch.__version__} - now code {provenance.code_fingerprint(task)}, torch {torch.__version__})"
            ) in printed, printed


def test_reused_trials_whose_plugin_component_changed_since_are_noted(tmp_path, capsys, plugin_cleanup):
    # a study whose plugin registers a feature extractor (the README's `plugins: [my_features]`) for a built-in
    # task: only a plugin *task's* module was fingerprinted, so after a fix to the extractor its stored trials were
    # reused without a word, while an edit of a plugin task's module was noted
    from metaadamw import FEATURES

    name = "noted_features_plugin"
    plugin_cleanup.append(name)
    source = tmp_path / f"{name}.py"
    source.write_text(textwrap.dedent(f"""\
        from metaadamw import FEATURES
        from metaadamw.features import FeatureExtractor


        @FEATURES.register("{name}_feats")
        class Feats(FeatureExtractor):
            stats = ("grad_norm",)

            def columns(self):
                return ["grad_norm"]

            def statistics(self, stats):
                return self.group_mean(stats["grad_norm"][:, None])
        """))
    spec = tmp_path / "plugged.yaml"
    spec.write_text(f"name: plugged\ntasks: [etth1]\nseeds: 1\nplugins: [{name}]\n"
                    f"baseline: {{features: {name}_feats, modulator_heads: 3}}\n")
    try:
        study = load_study(spec)
        from ablate.tasks import TASKS

        task = TASKS.get("etth1")
        out = tmp_path / "results"
        for trial in study.trials:  # made by this code, before the fix
            _store(out / "plugged", trial, code_fingerprint=provenance.code_fingerprint(task, trial.config),
                   torch_version=torch.__version__)
        meta = next(t for t in study.trials if t.config["optimizer"] == "metaadamw")
        adamw = next(t for t in study.trials if t.config["optimizer"] == "adamw")
        before = provenance.code_fingerprint(task, meta.config)
        assert before != provenance.code_fingerprint(task)  # the extractor's module counts
        assert provenance.code_fingerprint(task, adamw.config) == provenance.code_fingerprint(task)  # AdamW builds none
        source.write_text(source.read_text() + "# a fix\n")
        after = provenance.code_fingerprint(task, meta.config)
        assert after != before
        assert main(["run", str(spec), "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert (f"note: of the 2 reused trial(s), 1 was made by other code or torch (etth1: code {before}, torch "
                f"{torch.__version__} - now code {after}, torch {torch.__version__})") in printed, printed
    finally:
        FEATURES.remove(f"{name}_feats")


@pytest.mark.parametrize("kind", ["features", "grouping", "objective", "weighting", "a_new_kind"])
def test_every_component_kind_metaadamw_builds_is_fingerprinted_from_its_own_table(tmp_path, monkeypatch,
                                                                                   plugin_cleanup, kind):
    # ablate kept a list of MetaAdamW's component registries of its own: a kind added to MetaAdamW's table
    # (metaadamw.optimizer._COMPONENT_CALLS) would have gone unfingerprinted. It reads MetaAdamW's table now
    from metaadamw import optimizer
    from metaadamw.registry import Registry

    if kind == "a_new_kind":
        monkeypatch.setitem(optimizer._COMPONENT_CALLS, kind, (Registry("new kind"), "cls()", (), {}))
    assert list(provenance._component_registries()) == list(optimizer._COMPONENT_CALLS)
    registry = optimizer._COMPONENT_CALLS[kind][0]
    name = f"fp_component_{kind}"
    plugin_cleanup.append(name)
    (tmp_path / f"{name}.py").write_text("class Component:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    monkeypatch.setitem(registry._items, name, module.Component)  # (the registry's checks of a real one: not the point)
    config = {"optimizer": "metaadamw", kind: name}
    assert provenance._component_sources(config) == [(name, tmp_path / f"{name}.py")]
    assert provenance.code_fingerprint(None, config) != provenance.code_fingerprint()
    assert provenance.code_fingerprint(None, {**config, "optimizer": "adamw"}) == provenance.code_fingerprint()


def test_a_component_registered_as_a_functools_partial_is_fingerprinted_from_its_functions_module(
        tmp_path, monkeypatch, plugin_cleanup):
    # (a partial's class is functools.partial: the fingerprint covered the standard library's functools.py, and a
    # fix to the plugin's grouping function left it as it was)
    import functools

    from metaadamw import GROUPINGS

    name = "fp_partial_grouping"
    plugin_cleanup.append(name)
    source = tmp_path / f"{name}.py"
    source.write_text("def by_depth(tensors, depth=1):\n    return ['.'.join(t.name.split('.')[:depth]) for t in tensors]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    monkeypatch.setitem(GROUPINGS._items, name, functools.partial(module.by_depth, depth=2))
    config = {"optimizer": "metaadamw", "grouping": name}
    assert provenance._component_sources(config) == [(name, source)]
    before = provenance.code_fingerprint(None, config)
    assert before != provenance.code_fingerprint()
    source.write_text(source.read_text() + "# a fix\n")
    assert provenance.code_fingerprint(None, config) != before
