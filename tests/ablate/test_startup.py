"""What `ablate run` and `ablate tune` do before (or instead of) any trial: a run whose every trial is
stored starts no Ray, imports neither Ray nor matplotlib, and reads the stored tables no more often
than it needs; the modules the commands import at start-up leave scipy and matplotlib to their
first use. (A user's no-op `ablate run` of 6 stored trials took 55 s on a loaded machine, mostly
imports; these tests assert on what is done, not on time.)"""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from ablate.results import load_results, write_trial
from ablate.study import load_study
from tests.ablate.study_helpers import tiny_study

REPO = Path(__file__).resolve().parents[2]


def _store_every_trial(spec: Path, out: Path) -> list[str]:
    """Write a finished row (and a 2-epoch history) for every trial of the study file ``spec`` into
    ``out/<name>``, as a run that finished them would have; the trial ids, in the study's order."""
    study = load_study(spec)
    for k, t in enumerate(study.trials):
        best = 0.5 + 0.01 * k
        row = {"trial_id": t.trial_id, "study": study.name, "arm": t.arms[0], "arms": json.dumps(list(t.arms)),
               "axis": t.arms[0].split("=")[0] if "=" in t.arms[0] else "", "status": "ok", "error": "",
               "task": t.task, "data": "embedded", "data_source": "embedded:statsmodels-elnino",
               "optimizer": t.config["optimizer"], "seed": t.seed, "metric": "mse", "mode": "min",
               "best_metric": best, "best_mse": best, "best_epoch": 2, "epochs_run": 2, "steps": 8,
               "stop_reason": "max_epochs", "time_total_s": 1.0, "time_meta_s": 0.0, "meta_updates": 0,
               "finished_at": f"2026-01-01T00:00:{k:02d}"}
        history = [{"epoch": e, "step": 4 * e, "train_loss": 1.0 / e, "val_mse": best + 0.1 * (2 - e)}
                   for e in (1, 2)]
        write_trial(out / study.name, row, history)
    return [t.trial_id for t in study.trials]


def test_a_run_with_every_trial_stored_starts_no_ray_and_reports_them(tmp_path, monkeypatch, capsys):
    # nothing to run: no ray.init (nor Ray's import, seconds), and the stored tables are read for the
    # run's own bookkeeping only - not once more by the clean-up when there is no checkpoint to sort
    from ablate import cluster, sweep
    from ablate.cli import main

    spec = tiny_study(tmp_path)
    ids = _store_every_trial(spec, tmp_path / "results")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started although every trial is stored")

    reads: list[Path] = []
    finished_trial_ids = sweep.store.finished_trial_ids
    monkeypatch.setattr(cluster, "init_ray", no_ray)
    monkeypatch.setattr(sweep, "init_ray", no_ray)
    monkeypatch.setattr(sweep.store, "finished_trial_ids",
                        lambda out_dir, *a, **k: reads.append(Path(out_dir)) or finished_trial_ids(out_dir, *a, **k))
    before = load_results(tmp_path / "results" / "tiny").trials
    assert main(["run", str(spec), "--out", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert f"study tiny: {len(ids)} trials, {len(ids)} already done (reused), 0 to run" in out
    assert f"0 trials run, {len(ids)} reused, 0 failed; results in {tmp_path / 'results' / 'tiny'}" in out
    table = out[out.index("\netth1 (mse, lower is better"):]
    rows = [line.split()[0] for line in table.splitlines() if line.startswith("  ") and "vs baseline" not in line]
    assert rows == ["baseline", "objective=loss_decrease", "adamw"]
    baseline = [line.split() for line in table.splitlines() if line.startswith("  baseline")][0]
    stored = [0.5 + 0.01 * k for k, t in enumerate(load_study(spec).trials) if t.arms[0] == "baseline"]
    assert len(stored) == 2 and baseline[1:3] == [f"{sum(stored) / 2:.6g}", "2"]  # (the stored seeds' mean best)
    assert reads == [], "the clean-up read the stored tables again although no checkpoint was there to sort"
    after = load_results(tmp_path / "results" / "tiny").trials
    pd.testing.assert_frame_equal(before, after)  # the stored results as they were


def test_a_run_with_every_trial_stored_imports_neither_ray_nor_matplotlib(tmp_path):
    # (in a fresh interpreter: this test process has imported both long ago)
    spec = tiny_study(tmp_path)
    n = len(_store_every_trial(spec, tmp_path / "results"))
    script = textwrap.dedent(f"""\
        import json, sys
        from ablate.cli import main
        rc = main(["run", {str(spec)!r}, "--out", {str(tmp_path / "results")!r}])
        print(json.dumps({{"rc": rc, "imported": [m for m in ("ray", "matplotlib") if m in sys.modules]}}))
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "imported": []}
    assert f"0 trials run, {n} reused, 0 failed" in done.stdout


def test_the_commands_modules_leave_scipy_and_matplotlib_to_their_first_use():
    # `ablate tune` imports ablate.stats for its tie rule and `ablate run` ablate.report for a percentage's
    # format: scipy.stats and matplotlib (seconds each) come with the first interval and the first figure
    script = textwrap.dedent("""\
        import json, sys
        import ablate.report, ablate.stats, ablate.sweep, ablate.tune
        before = [m for m in ("scipy.stats", "matplotlib", "ray") if m in sys.modules]
        ci = ablate.stats.mean_ci([1.0, 2.0, 3.0])
        print(json.dumps({"before": before, "scipy_after": "scipy.stats" in sys.modules, "ci": [ci["lo"], ci["hi"]],
                          "pct": ablate.report.fmt_pct(0.0426)}))
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before"] == [] and result["scipy_after"] is True and result["pct"] == "+4.26%"
    # mean 2, sd 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051
    assert result["ci"] == pytest.approx([2 - 2.4841377, 2 + 2.4841377], rel=1e-6)


def test_a_figure_is_still_drawn_on_the_agg_backend(tmp_path):
    from ablate import report

    path = report.plot_tune_history(pd.DataFrame({"number": [0, 1, 2], "value": [0.9, 0.7, 0.8]}), tmp_path)
    import matplotlib

    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend().lower() == "agg"


def test_a_figure_leaves_the_backend_a_notebook_chose(tmp_path):
    # a notebook's backend (inline; here svg, which needs no display) and its pyplot stay as they were:
    # the report's figures are bare Figures drawn to files (matplotlib.use("Agg") at the first one
    # switched the notebook's backend, and its own plots no longer showed)
    script = textwrap.dedent(f"""\
        import json, sys
        from pathlib import Path
        import matplotlib.pyplot as plt
        import pandas as pd
        from ablate import report
        before = plt.get_backend()
        out = Path({str(tmp_path)!r})
        paths = [report.plot_tune_history(pd.DataFrame({{"number": [0, 1, 2], "value": [0.9, 0.7, 0.8]}}), out),
                 report.plot_tune_importances(pd.DataFrame({{"param": ["lr", "wd"], "importance": [0.7, 0.3]}}), out)]
        print(json.dumps({{"before": before, "after": plt.get_backend(), "open": plt.get_fignums(),
                          "png": [p.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n" for p in paths]}}))
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "svg"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"before": "svg", "after": "svg", "open": [], "png": [True, True]}


def test_a_study_of_one_cpu_per_trial_does_not_ask_ray_for_the_cpu_count(tmp_path, monkeypatch):
    # any machine runs a one-CPU trial: Ray's own count (ray._private.utils, a second or more to import)
    # is needed only for more; a study asking for more than there are is still refused
    from ablate import cluster
    from ablate.config import ConfigError

    monkeypatch.setattr(cluster, "_running_ray", lambda: False)
    calls: list[int] = []
    monkeypatch.setattr(cluster, "available_cpus", lambda: calls.append(1) or 2)
    one = tmp_path / "one.yaml"
    one.write_text("name: one\ntasks: [etth1]\nseeds: 1\nbudget: {epochs: 1}\nresources: {cpus: 1}\n")
    cluster.check_resources(load_study(one))
    assert calls == []
    three = tmp_path / "three.yaml"
    three.write_text("name: three\ntasks: [etth1]\nseeds: 1\nbudget: {epochs: 1}\nresources: {cpus: 3}\n")
    with pytest.raises(ConfigError, match=r"resources.cpus=3, but Ray runs here with 2 CPU\(s\)"):
        cluster.check_resources(load_study(three))
    assert calls == [1]


def test_did_you_mean_scores_only_the_options_that_can_reach_the_cutoff(monkeypatch):
    # every task's registration looks up each of its keys among the trial keys at start-up; an option
    # whose quick upper bound is below the cutoff cannot be the answer and is not scored in full
    from ablate.config import COMMON_FIELDS, did_you_mean

    scored: list[str] = []
    ratio = difflib.SequenceMatcher.ratio
    monkeypatch.setattr(difflib.SequenceMatcher, "ratio", lambda self: scored.append(self.a) or ratio(self))
    assert did_you_mean("lerning_rate", ["learning_rate", "momentum", "x"]) == " (did you mean 'learning_rate'?)"
    assert scored == ["learning_rate"]
    scored.clear()
    assert did_you_mean("patiense", COMMON_FIELDS, cutoff=0.85) == " (did you mean 'patience'?)"
    assert 0 < len(scored) < len(COMMON_FIELDS) / 4, scored
    # the answers are those of scoring every option: ties named together, case ignored, nothing below the cutoff
    assert did_you_mean("etth", ["etth1", "etth2", "wikitext2"]) == " (did you mean 'etth1' or 'etth2'?)"
    assert did_you_mean("ETTh1", ["etth1", "imdb"]) == " (did you mean 'etth1'?)"
    assert did_you_mean("zzz", ["etth1", "imdb"]) == ""
