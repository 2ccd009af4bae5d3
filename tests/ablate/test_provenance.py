"""What made a stored trial (ablate.provenance): the code fingerprint, and the note of a run that
reuses trials made by other code."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

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


def test_a_run_reusing_trials_made_by_other_code_says_how_many_and_how_to_run_them_again(tmp_path, capsys):
    spec = tiny_study(tmp_path, "prov", seeds=1)
    study = load_study(spec)
    out = tmp_path / "results"
    codes = ["0123456789ab", provenance.code_fingerprint(), None]  # another code, this one, none recorded
    for trial, code in zip(study.trials, codes):
        row = {**trial.config, "trial_id": trial.trial_id, "status": "ok", "best_metric": 1.0}
        if code:
            row["code_fingerprint"] = code
        write_trial(out / "prov", row, [{"epoch": 1}])
    assert main(["run", str(spec), "--out", str(out)]) == 0  # every trial is stored: no Ray, no training
    printed = capsys.readouterr().out
    assert "3 already done (reused), 0 to run" in printed
    assert (f"note: 1 of the 3 reused trial(s) were made by other code than this run's (another version of ablate or "
            f"metaadamw: code 0123456789ab, this run's {provenance.code_fingerprint()})") in printed, printed
    assert f"ablate run {spec} --out {out} --rerun all (or --rerun TASK or ARM for some)" in printed, printed
    assert len(load_results(out / "prov").trials) == 3  # kept as stored

    for trial in study.trials[:1]:  # made by this code after all: no note
        write_trial(out / "prov", {**trial.config, "trial_id": trial.trial_id, "status": "ok", "best_metric": 1.0,
                                   "code_fingerprint": provenance.code_fingerprint()}, [{"epoch": 1}])
    assert main(["run", str(spec), "--out", str(out)]) == 0
    assert "made by other code" not in capsys.readouterr().out
