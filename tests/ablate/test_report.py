"""ablate.report: the Markdown/HTML report and its figures on constructed studies."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ablate import report, stats
from ablate.results import load_results, write_trial
from tests.ablate.conftest import write_tune

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path is not None and path.exists(), f"figure {path} was not written"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, f"{path} is not a non-empty PNG"


@pytest.fixture(scope="module")
def full_report(tmp_path_factory, report_study_template):
    """The constructed study with a priority-study summary, reported once for this module:
    (results dir, output dir, Markdown text)."""
    study = Path(shutil.copytree(report_study_template, tmp_path_factory.mktemp("full") / "study"))
    write_tune(study)
    out = study.parent / "out"
    path = report.write_report(study, out)
    assert path == out / "report.md"
    return study, out, path.read_text()


def test_full_report_writes_every_figure_and_both_formats(full_report):
    _, out, md = full_report
    assert (out / "report.html").stat().st_size > 0
    expected = [f"{kind}_{task}.png" for kind in ("curves", "ablation") for task in ("etth1", "imdb")]
    expected += [f"{kind}_{task}_baseline.png" for kind in ("alpha_beta", "sigmas") for task in ("etth1", "imdb")]
    expected += ["performance_profile.png", "tune_history.png", "tune_importances.png"]
    for name in expected:
        assert_png(out / "figures" / name)
        assert f"figures/{name}" in md


def test_report_content(full_report):
    md = full_report[2]
    assert md.startswith("# Ablation report: report-test")
    assert "48 in all - 46 ok, 1 failed, 1 diverged" in md
    assert "EMBEDDED DATA" in md
    for heading in ("Table 2 analogue", "Table 3 analogue", "Performance profiles", "Cost",
                    "Tuning study", "Failed and diverged trials"):
        assert heading in md
    assert "Factorial effects" not in md  # no factorial cells in this study
    # the paired improvement on etth1 has the smallest sign-flip p of 6 seeds, which Holm's adjustment
    # over the two tasks doubles: no asterisk at 0.05
    etth_line = next(ln for ln in md.splitlines() if ln.startswith("| etth1 | mse (min)"))
    imdb_line = next(ln for ln in md.splitlines() if ln.startswith("| imdb | accuracy (max)"))
    assert "| 0.0312 | 0.0625 | 6 (6) | 0/0 |" in etth_line and etth_line.rstrip().endswith("0.012 |")
    assert "| * |" not in etth_line + imdb_line
    # imdb's grouping=original (6 of 6 seeds, 2/64) is marked: imdb's gating=true, 5 pairs (one diverged), cannot
    # reach 0.05 and is left out of the Holm family (Tarone's rule; this test once expected no mark, a family of two)
    assert "| imdb | grouping | grouping=original * |" in md and "* marks p (Holm) < 0.05" in md
    # an arm run by the baseline's own trials shows no (zero) difference
    assert "| etth1 | grouping | grouping=fine_grained | = baseline (same trials) |" in md
    assert "| imdb | 1 | 0.82 | not reached |" in md
    # profile ratios in fixed decimals: only the best arm reads 1.0000 (1.00036 must not print as "1")
    profile = md.split("## Performance profiles", 1)[1].split("\n## ", 1)[0]
    assert "| etth1 |" in profile and "1.0000" in profile and "| 1 |" not in profile


def test_failed_trials_are_listed_not_dropped(full_report, report_kit):
    md = full_report[2]
    failed_section = md.split("## Failed and diverged trials", 1)[1]
    assert "2 trial(s) are excluded" in failed_section
    assert f"| {report_kit.FAILED_ID} | etth1 | gating=true | 5 | failed | failed | RuntimeError: CUDA out of memory |" in failed_section
    assert f"| {report_kit.DIVERGED_ID} | imdb | gating=true | 2 | diverged | diverged | loss is NaN at epoch 2 |" in failed_section
    assert "| gating=true | 5 (+1 not ok) | 5 (+1 not ok) |" in md


def test_html_is_self_contained(full_report):
    page = (full_report[1] / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert 'src="figures/' not in page
    assert '<div class="warning">' in page and "RuntimeError: CUDA out of memory" in page


def test_the_table2_legend_has_no_asterisk_that_closes_the_emphasis_its_own_mark_opens(full_report):
    # "(*)" of the significance legend can open emphasis and the bare "*" of "ref_* columns" later in the same
    # paragraph closed it: rendered (CommonMark, GitHub), both asterisks vanished and the text between was italic
    _, out, md = full_report
    legend = next(para for para in md.split("\n\n") if para.startswith("The metric is the best validation metric"))
    assert "(*): p (Holm) < 0.05" in legend and "; columns named ref_... are trivial references" in legend
    assert legend.count("*") == legend.count("(*)") + legend.count(" * "), legend  # (no other "*" to pair with)
    assert "; columns named ref_... are trivial references" in (out / "report.html").read_text()


def test_a_report_written_again_removes_the_figures_it_no_longer_draws(tmp_path, report_kit):
    # the figures of a report of two tasks stayed in figures/ when the report was written again for one of them
    # (the study re-run with fewer tasks, or another study with --out to the same folder): they read as its own
    report_kit.write_study(tmp_path / "two")
    report.write_report(tmp_path / "two", tmp_path / "out")
    assert list((tmp_path / "out" / "figures").glob("*_imdb*.png"))
    (tmp_path / "out" / "figures" / "mine.png").write_bytes(b"not the report's")
    report_kit.write_study(tmp_path / "one", {"etth1": report_kit.REPORT_METRICS["etth1"]}, telemetry=False)
    md = report.write_report(tmp_path / "one", tmp_path / "out").read_text()
    links = {Path(link).name for link in re.findall(r"\]\((figures/[^)]+)\)", md)}
    figures = {path.name for path in (tmp_path / "out" / "figures").iterdir()}
    assert figures == links | {"mine.png"}, figures - links  # (a file the report did not name is kept)
    assert "curves_etth1.png" in links and not any("imdb" in name or "alpha_beta" in name for name in figures)


def test_missing_optional_tables_do_not_crash(tmp_path, report_kit):
    metrics = {"etth1": {arm: report_kit.REPORT_METRICS["etth1"][arm] for arm in ("adamw", "baseline")}}
    report_kit.write_study(tmp_path / "s", metrics, telemetry=False)
    md = report.write_report(tmp_path / "s").read_text()
    assert "No telemetry recorded" in md and "Tuning study" not in md
    assert not list((tmp_path / "s" / "report" / "figures").glob("alpha_beta_*"))


def write_small_study(out, report_kit):
    """Two seeds of adamw and baseline on etth1, without history, telemetry or an arms column."""
    for seed in range(2):
        for arm, best in (("adamw", 0.010), ("baseline", 0.009)):
            row = report_kit.trial_row("etth1", arm, seed, best + seed * 1e-4)
            del row["arms"]  # older tables without the arms column: each trial serves its arm
            write_trial(out, row)


def test_trials_without_history_or_telemetry(tmp_path, report_kit):
    write_small_study(tmp_path, report_kit)
    md = report.write_report(tmp_path, tmp_path / "out", formats=("md",)).read_text()
    assert "Table 2 analogue" in md and "No ablation arms" in md
    assert not (tmp_path / "out" / "report.html").exists()
    assert not list((tmp_path / "out" / "figures").glob("curves_*"))


def test_factorial_section_and_figure(report_factorial_study):
    md = report.write_report(report_factorial_study, formats=("html", "md")).read_text()
    assert "## Factorial effects" in md and "| main | grouping | fine_grained * |" in md
    assert_png(report_factorial_study / "report" / "figures" / "factorial_effects.png")


def test_the_factorial_legend_says_main_effects_are_adjusted_when_cell_seeds_are_left_out(report_factorial_study,
                                                                                          report_kit):
    # grouping=original,gating=true diverged on seed 2: the fit leaves that cell-seed out, and gating=true's main
    # effect (the least-squares estimate with seed blocks) is no longer its raw mean's deviation from the grand mean,
    # which the legend alone says it is
    cell = report_factorial_study / "parts" / "f-original-true-2.trials.parquet"
    row = pd.read_parquet(cell).assign(status="diverged", best_metric=float("nan"), stop_reason="diverged")
    row.to_parquet(cell)
    results = load_results(report_factorial_study)
    frame = stats.factorial_frame(results)
    raw = frame.loc[frame["gating"] == "true", "y"].mean() - frame["y"].mean()
    estimate = stats.factorial_effects(results).set_index(["term", "level"]).loc[("gating", "true"), "estimate"]
    assert (len(frame), raw) == (11, pytest.approx(0.05289, abs=1e-5)) and estimate == pytest.approx(0.04454, abs=1e-5)
    adjusted = ("With them missing, a main effect is the least-squares estimate adjusted for the seeds and the other "
                "factors, not the deviation of the level's raw mean from the grand mean.")
    assert report.factorial_missing_note(results).endswith(adjusted)
    md = report.write_report(report_factorial_study, formats=("md",)).read_text()
    assert "level's deviation from the grand mean" in md and adjusted in md
    # every cell-seed in the fit: no such sentence
    row.assign(status="ok", best_metric=report_kit.FACTORIAL_METRICS[("original", "true")][2]).to_parquet(cell)
    assert report.factorial_missing_note(load_results(report_factorial_study)) == ""


def test_formats(tmp_path, report_kit):
    write_small_study(tmp_path / "s", report_kit)
    assert report.write_report(tmp_path / "s", tmp_path, formats=("html",)) == tmp_path / "report.html"
    assert not (tmp_path / "report.md").exists()
    with pytest.raises(ValueError, match="pdf"):
        report.write_report(tmp_path / "s", tmp_path, formats=("pdf",))


def test_figure_functions_return_the_path_they_wrote(report_study, tmp_path):
    results = load_results(report_study)
    assert_png(report.plot_validation_curves(results, "imdb", tmp_path, arms=["adamw", "baseline", "gating=true"]))
    assert_png(report.plot_ablation_bars(stats.table3(results), "etth1", tmp_path))
    assert_png(report.plot_alpha_beta(results, "etth1", tmp_path))
    assert_png(report.plot_sigmas(results, "etth1", tmp_path))
    assert report.plot_alpha_beta(results, "etth1", tmp_path, arm="adamw") is None  # AdamW has no telemetry


def test_report_command_prints_progress(tmp_path, report_kit, capsys):
    write_small_study(tmp_path, report_kit)
    path = report.report_command(str(tmp_path), None)
    printed = capsys.readouterr().out
    assert path == tmp_path / "report" / "report.md" and path.exists()
    assert f"loading results from {tmp_path}" in printed and f"report: {path}" in printed


def test_markdown_table_escapes_pipes():
    md = report.df_to_markdown(pd.DataFrame({"a": ["x|y"], "b": ["line\nbreak"]}))
    assert md.splitlines() == ["| a | b |", "| --- | --- |", "| x\\|y | line break |"]


def test_study_whose_every_trial_failed_still_reports_them(tmp_path):
    for i, arm in enumerate(["adamw", "baseline"]):
        write_trial(tmp_path, {"trial_id": f"dead{i}", "study": "broken", "arm": arm, "status": "failed",
                               "task": "etth1", "seed": 0, "error": "DatasetNotFoundError: no ETTh1.csv"})
    md = report.write_report(tmp_path).read_text()
    assert "2 in all - 0 ok, 2 failed, 0 diverged" in md and "nothing to compare" in md
    assert "| dead0 | etth1 | adamw | 0 | failed |" in md and "| dead1 | etth1 | baseline | 0 | failed |" in md


def test_a_directory_of_ablate_tune_alone_gets_a_report_of_its_priority_study(tmp_path):
    # `ablate tune` writes OUT/<name>/tune/ and no study trials; the docs promise that
    # `ablate report OUT/<name>` plots its history and importances
    write_tune(tmp_path)
    path = report.write_report(tmp_path, tmp_path / "out")
    md = path.read_text()
    assert "Tuning study" in md and "figures/tune_history.png" in md and "figures/tune_importances.png" in md
    assert_png(tmp_path / "out" / "figures" / "tune_history.png")
    assert (tmp_path / "out" / "report.html").stat().st_size > 0
    assert "No parameter importances" not in md


def test_the_parent_of_a_tuning_study_folder_names_it(tmp_path, report_kit):
    # `ablate report results` named the study folders inside it, but not a folder of `ablate tune`
    # alone (which `ablate report` reports): "holds no study results" and no way forward
    (tmp_path / "tune_priorities").mkdir()
    write_tune(tmp_path / "tune_priorities")
    with pytest.raises(FileNotFoundError, match=r"tuning study \(`ablate tune`\) of tune_priorities: `ablate report "
                                                 + re.escape(str(tmp_path / "tune_priorities"))):
        report.write_report(tmp_path)
    write_trial(tmp_path / "quick", report_kit.trial_row("etth1", "adamw", 0, 0.5))  # (and a study folder beside it)
    with pytest.raises(FileNotFoundError, match="results of quick: give that folder.*; and the tuning study"):
        report.write_report(tmp_path)


def test_a_task_of_the_tuning_study_without_importances_is_named(tmp_path):
    # fANOVA finds nothing to attribute when every suggestion scored the same: an empty table said nothing
    import pandas as pd

    tune = tmp_path / "tune"
    tune.mkdir()
    pd.DataFrame({"task": ["etth1", "etth1", "imdb", "imdb"], "number": [0, 1, 0, 1], "value": [0.9, 0.7, 0.5, 0.5],
                  "state": ["COMPLETE"] * 4}).to_parquet(tune / "history.parquet")
    pd.DataFrame({"task": ["etth1"], "param": ["p_gradient"], "importance": [1.0]}).to_parquet(tune / "importances.parquet")
    history = pd.read_parquet(tune / "history.parquet")
    history.assign(params_lr=[1e-3, 2e-3, 1e-3, 2e-3], arm="adamw", baseline=[True, False, True, False],
                   value=[0.9, 0.7, 0.5, 0.5 - 1e-9]).to_parquet(tune / "history.parquet")
    md = report.write_report(tmp_path, tmp_path / "out", formats="md").read_text()
    assert ("No parameter importances for imdb: fewer than two finished suggestions drawn from the search space as "
            "last run (where a range changed between runs, those drawn from an earlier one do not count), or scores "
            "that do not vary") in md
    assert "`ablate tune` searched the adamw arm's lr." in md
    # imdb's #1 beats its own values (#0) by float rounding only: as `ablate tune` does, the table names #0
    assert "| etth1 | 2 | 2 | 0 | 0 | 0 | 0.7 (#1) |" in md and "| imdb | 2 | 2 | 0 | 0 | 0 | 0.5 (#0) |" in md


def test_ablate_report_says_in_one_line_how_many_stored_trials_the_study_left_out(report_study):
    # a study edited and run again leaves trials on disk that are not part of it any more
    from ablate.results import write_manifest

    trials = load_results(report_study).trials
    keep = trials.iloc[1:]
    write_manifest(report_study, "report-test", {r.trial_id: {"study": r.study, "arm": r.arm, "arms": r.arms,
                                                             "axis": r.axis} for r in keep.itertuples()})
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ablate.cli", "report", str(report_study), "--out",
                           str(report_study / "r")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    err = done.stderr
    assert "ablate: warning: " in err and "1 stored trial(s) are not part of the study" in err
    md = (report_study / "r" / "report.md").read_text()  # and the report says so too
    assert "1 stored trial(s) are not part of the study" in md.split("\n## ", 1)[0]  # before the first section
    assert "UserWarning" not in err and "results.py" not in err


def test_an_arm_whose_every_trial_failed_stays_in_the_profile_and_draws_no_warning(tmp_path, report_kit):
    import warnings

    write_small_study(tmp_path, report_kit)
    for seed in range(2):
        row = report_kit.trial_row("etth1", "gating=true", seed, 1.0)
        row.update(trial_id=f"diverged{seed}", arm="lr=1e6", arms='["lr=1e6"]', axis="lr", status="diverged",
                   best_metric=float("nan"), stop_reason="diverged")
        write_trial(tmp_path, row)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "All-NaN slice" came from the arm's bar in the ablation figure
        md = report.write_report(tmp_path, tmp_path / "out", formats=("md",)).read_text()
    profile = md.split("Performance profile", 1)[1]
    assert "lr=1e6" in profile and "inf" in profile


def test_the_performance_profile_of_many_arms_lists_them_as_rows_beside_a_legend_outside_the_plot(tmp_path, report_kit):
    # 82 arms: a table of 83 columns (lines of 8,290 characters), and a 660 x 440 figure whose legend
    # of 82 long names covered the curves and was cut off
    from PIL import Image

    write_small_study(tmp_path, report_kit)
    arms = [f"factorial:features=enhanced,gating=true,modulator_layers={k}" for k in range(report.MANY_ARMS + 4)]
    for k, arm in enumerate(arms):
        for seed in range(2):
            row = report_kit.trial_row("etth1", "gating=true", seed, 0.011 + k * 1e-4)
            row.update(trial_id=f"many{k:03d}s{seed}", arm=arm, arms=json.dumps([arm]), axis="factorial")
            write_trial(tmp_path, row)
    md = report.write_report(tmp_path, tmp_path / "out", formats=("md",)).read_text()
    profile = md.split("## Performance profiles", 1)[1].split("\n## ", 1)[0]
    table = [line for line in profile.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "arm" and "etth1" in table[0]
    assert len(table) == 2 + len(arms) + 2 and max(map(len, table)) < 200  # (adamw, baseline and the cells)
    with Image.open(tmp_path / "out" / "figures" / "performance_profile.png") as image:
        width, height = image.size
    assert width > 660 * 1.3 and height > 400  # (the legend beside the 6 x 4 in axes, not over them)


def test_numbers_near_a_threshold_or_zero_are_not_rounded_onto_it():
    # p = 0.049957 (the exact sign-flip p of 16 pairs) printed as "0.05" next to a "*" for p < 0.05
    assert report.fmt_p(0.049957) == "0.04996" and report.fmt_p(0.050004) == "0.05"
    assert report.fmt_p(0.03125) == "0.0312" and report.fmt_p(float("nan")) == "n/a"
    assert report.fmt_p(0.0506) == "0.0506"
    # a profile ratio of another arm must not read as 1, the best arm's mark
    assert report._ratio_cell(1.0) == report._ratio_cell(1.0000000000000002) == "1.0000"
    assert report._ratio_cell(1.00004) == "1.00004"
    assert report._ratio_cell(1.03) == "1.0300" and report._ratio_cell(float("inf")) == "inf"
    assert report.fmt_num(-0.0) == "0" and report.fmt_num(-1e-9, 3) == "-1e-09" and report.fmt_pct(-1e-7) == "-0.00001%"
    # a CI bound just below zero must not read as above it, nor a tiny loss as a gain
    assert (report.fmt_pct(-3e-5), report.fmt_pct(0.0), report.fmt_pct(0.0426)) == ("-0.003%", "0.00%", "+4.26%")


def test_tasks_and_sections_left_out_are_named_and_statistics_warnings_reach_the_report(tmp_path, report_kit):
    # Table 2 dropped a task one arm never finished ok without a word, the profile section vanished
    # when every task was left out, and a warning of the statistics (seeds averaged) went to stderr only
    write_small_study(tmp_path, report_kit)
    for seed in range(2):
        for arm in ("adamw", "baseline"):
            row = report_kit.trial_row("imdb", arm, seed, 0.5)
            if arm == "baseline":
                row.update(status="failed", error="RuntimeError: boom", stop_reason="failed", best_metric=float("nan"))
            write_trial(tmp_path, row)
        # a second baseline trial per etth1 seed (another version of the study): averaged, with a warning
        row = report_kit.trial_row("etth1", "baseline", seed, 0.0085)
        row["trial_id"] += "-again"
        write_trial(tmp_path, row)
    with pytest.warns(UserWarning, match="several trials share a seed") as seen:
        md = report.write_report(tmp_path, tmp_path / "out", formats="md").read_text()
    assert sum("several trials share a seed" in str(w.message) for w in seen) == 1  # (one per message, not per use)
    table2 = md.split("Table 2 analogue", 1)[1].split("\n## ", 1)[0]
    assert "| etth1 |" in table2 and "| imdb |" not in table2
    assert "Left out: imdb (AdamW 2 ok seed(s), 0 not ok; MetaAdamW 0 ok seed(s), 2 not ok)." in table2
    assert md.count("several trials share a seed") == 1 and "> **WARNING: etth1, arm baseline: several" in md

    # a task one arm has not run at all (a report made mid-study) is named too
    partial = tmp_path / "partial"
    for seed in range(2):
        for task, arm in (("etth1", "adamw"), ("etth1", "baseline"), ("imdb", "adamw")):
            write_trial(partial, report_kit.trial_row(task, arm, seed, 0.5))
    md = report.write_report(partial, partial / "out", formats="md").read_text()
    assert "Left out: imdb (AdamW 2 ok seed(s), 0 not ok; MetaAdamW 0 ok seed(s), 0 not ok)." in md

    # no seed that every arm finished ok: the profile section says so instead of vanishing
    only = tmp_path / "uneven"
    for arm, seeds in (("adamw", (0, 1)), ("baseline", (2, 3))):
        for seed in seeds:
            write_trial(only, report_kit.trial_row("etth1", arm, seed, 0.01))
    md = report.write_report(only, only / "out", formats=("md",)).read_text()
    assert "## Performance profiles\n\nNo task to profile: etth1: left out (no seed was finished ok by every arm)." in md


def test_an_ablation_chart_with_no_comparison_is_not_drawn():
    t3 = pd.DataFrame({"task": ["etth1"] * 2, "axis": ["gating", "lr"], "arm": ["gating=true", "lr=1"],
                       "rel_mean": [float("nan")] * 2, "rel_lo": [float("nan")] * 2, "rel_hi": [float("nan")] * 2,
                       "significant": [False, False]})
    assert report.plot_ablation_bars(t3, "etth1", Path("/nonexistent")) is None  # (it would read as "no change")


def test_an_ablation_arm_of_one_paired_seed_gets_no_error_bar_of_zero_width(tmp_path, monkeypatch):
    # the table shows a one-seed arm's mean alone (no interval); the chart drew a zero error bar with its caps at the
    # bar's top, which reads as an interval of zero width: a change known exactly
    from matplotlib.container import ErrorbarContainer

    t3 = pd.DataFrame({"task": ["etth1"] * 2, "axis": ["gating", "lr"], "arm": ["gating=true", "lr=1"],
                       "rel_mean": [0.10, 0.045], "rel_lo": [float("nan"), 0.004], "rel_hi": [float("nan"), 0.086],
                       "significant": [False, False]})
    figures = []
    saved = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path, outside=False: (figures.append(fig), saved(fig, path, outside))[1])
    assert_png(report.plot_ablation_bars(t3, "etth1", tmp_path))
    ax = figures[0].axes[0]
    caps = [line for c in ax.containers if isinstance(c, ErrorbarContainer) for line in c.lines[1]]
    with_bars = sorted({round(float(x)) for line in caps for x in line.get_xdata()})
    assert with_bars == [1], with_bars  # (the arm with an interval only)
    assert [round(h.get_height(), 6) for h in ax.patches] == [10.0, 4.5]  # (the bars, in %, as before)


def test_a_factorial_effect_without_an_interval_gets_no_error_bar(tmp_path, monkeypatch):
    # with no residual degrees of freedom the table shows an estimate alone; the figure drew an error bar of zero
    # width (caps at the marker), as for an effect known exactly
    from matplotlib.container import ErrorbarContainer

    effects = pd.DataFrame({"term": ["grouping", "gating"], "level": ["fine_grained", "true"],
                            "estimate": [0.05, -0.02], "lo": [float("nan"), -0.04], "hi": [float("nan"), 0.0]})
    figures = []
    saved = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path, outside=False: (figures.append(fig), saved(fig, path, outside))[1])
    assert_png(report.plot_factorial_effects(effects, tmp_path))
    ax = figures[0].axes[0]
    caps = [line for c in ax.containers if isinstance(c, ErrorbarContainer) for line in c.lines[1]]
    assert sorted({round(float(y)) for line in caps for y in line.get_ydata()}) == [0]  # (gating's row, at y 0)
    markers = [line for line in ax.lines if line.get_marker() == "o"]
    assert [list(np.round(line.get_xdata(), 6)) for line in markers] == [[5.0, -2.0]]  # (both estimates, in %)


def test_only_the_statistics_warnings_reach_the_report_and_filters_by_module_apply(tmp_path, report_kit):
    # matplotlib's (a glyph the font lacks) and numpy's warnings name ablate's lines as their source
    # too, and were copied into the report; a caller's filter by module no longer matched
    import warnings

    write_small_study(tmp_path, report_kit)
    for seed in range(2):
        row = report_kit.trial_row("etth1", "gating=true", seed, 0.0095)
        row.update(trial_id=f"cjk{seed}", arm="名前=値", arms='["名前=値"]', axis="名前")
        write_trial(tmp_path, row)
        again = report_kit.trial_row("etth1", "baseline", seed, 0.0085)
        again["trial_id"] += "-again"  # two baseline trials per seed: averaged, with a StatsWarning
        write_trial(tmp_path, again)
    with pytest.warns(UserWarning) as seen:
        md = report.write_report(tmp_path, tmp_path / "out", formats=("md",)).read_text()
    assert any("Glyph" in str(w.message) for w in seen) and "Glyph" not in md  # (stderr only)
    assert md.count("> **WARNING: etth1, arm baseline: several trials share a seed") == 1
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module=r"ablate\.stats")
        report.write_report(tmp_path, tmp_path / "out2", formats=("md",))
    assert not [w for w in shown if issubclass(w.category, stats.StatsWarning)]


def test_a_study_whose_ablation_arms_have_no_result_yet_is_not_said_to_have_none(tmp_path, report_kit):
    # an interrupted study: only the baseline's trials finished; its ablation arms are in the manifest
    import json

    from ablate.results import write_manifest

    labels = {}
    for seed in range(2):
        row = report_kit.trial_row("etth1", "baseline", seed, 1.0)
        row.update(trial_id=f"b{seed}", arms=json.dumps(["baseline"]))
        write_trial(tmp_path, row)
        labels[f"b{seed}"] = {"study": row["study"], "arm": "baseline", "arms": row["arms"], "axis": ""}
        labels[f"g{seed}"] = {"study": row["study"], "arm": "gating=false", "arms": '["gating=false"]', "axis": "gating"}
    write_manifest(tmp_path, "report-test", labels)
    with pytest.warns(UserWarning, match="2 of the study's 4 trials have no stored result"):
        md = report.write_report(tmp_path, tmp_path / "out", formats="md").read_text()
    assert "No ablation arms in this study." not in md
    assert "No ablation arm has a stored result to compare yet (gating=false: see the warning" in md
    assert "This study has no AdamW arm: it runs MetaAdamW (arm 'baseline'" in md  # (adamw: false)
    assert "with AdamW (arm 'adamw')" not in md


def _three_seed_study(out, report_kit, arms_by_task):
    """``arms_by_task``: task -> the arms run there, seeds 0-2 of REPORT_METRICS' values."""
    for task, arms in arms_by_task.items():
        for arm in arms:
            for seed, best in zip(range(3), report_kit.REPORT_METRICS[task][arm]):
                row = report_kit.trial_row(task, arm, seed, best)
                row.update(arms=json.dumps([arm]), status="ok", error="", stop_reason="max_epochs")
                write_trial(out, row, report_kit.history_rows(task, arm, best))


def test_the_report_states_which_rows_leave_the_holm_family(tmp_path, report_kit):
    # stats._holm_family leaves out every row whose smallest attainable sign-flip p (2/2^n) is not below alpha - not
    # only those with one paired seed, as the legend said -: with three seeds every row, so p (Holm) reads n/a
    _three_seed_study(tmp_path, report_kit, {"etth1": ["adamw", "baseline", "grouping=original"]})
    md = report.write_report(tmp_path, tmp_path / "out", formats=("md",)).read_text()
    rule = ("a row whose smallest attainable p is not below 0.05 (here: 5 paired seed(s) or fewer) is not counted in "
            "the family and its p (Holm) reads n/a (Tarone's rule for discrete tests)")
    assert md.count(rule) == 2  # (Tables 2 and 3)
    assert "a row with one paired seed is not counted" not in md
    t2, t3 = stats.table2(load_results(tmp_path)), stats.table3(load_results(tmp_path))
    assert t2["p_holm"].isna().all() and t3["p_holm"].isna().all()


@pytest.mark.parametrize("alpha, too_few", [(0.1, "4 paired seed(s) or fewer"), (0.01, "7 paired seed(s) or fewer"),
                                            (1e-5, "every row")])
def test_the_holm_family_legend_counts_the_seeds_at_the_reports_alpha(tmp_path, report_kit, alpha, too_few):
    # the legend gave the seed count at 0.05 ("at 0.05: 5 paired seeds or fewer") whatever alpha the report was
    # written with; at 0.1 four seeds or fewer leave the family (2/16 = 0.125, 2/32 = 0.0625 < 0.1), at 0.01 seven
    # (2/128 = 0.0156, 2/256 = 0.0078); at 1e-5 every row (2/2^16 = 3.1e-5, Monte Carlo beyond: 1/20001 = 5e-5)
    _three_seed_study(tmp_path, report_kit, {"etth1": ["adamw", "baseline", "grouping=original"]})
    md = report.write_report(tmp_path, tmp_path / "out", formats=("md",), alpha=alpha).read_text()
    assert md.count(f"a row whose smallest attainable p is not below {alpha} (here: {too_few}) is not counted") == 2
    assert "at 0.05: 5 paired seeds" not in md
    assert [report.fewest_seeds_reaching(a) for a in (0.05, 0.1, 0.01, 1e-5)] == [6, 5, 8, None]


def test_the_report_says_what_its_study_holds_and_what_its_tables_cannot_show(tmp_path, report_kit):
    _three_seed_study(tmp_path, report_kit, {"etth1": ["adamw", "baseline", "gating=true", "grouping=original"],
                                             "imdb": ["adamw", "baseline", "grouping=original"]})
    md = report.write_report(tmp_path, tmp_path / "out", formats=("md", "html")).read_text()
    # the intro names what the study has: ablation arms, no factorial cells
    assert "and ablates its components (arms '\\<axis>=\\<level>'), over paired seeds" in md and "factorial" not in md
    # three seeds: no row can be significant, and the tables say so (an empty 'sig.' is not 'no effect')
    untestable = ("With at most 3 paired seed(s) here the smallest sign-flip p is 0.25, not below 0.05: no row of this "
                  "table can be marked significant, whatever the differences (it takes 6 seeds or more")
    assert md.count(untestable) == 2  # (Tables 2 and 3)
    # an arm the study did not run on a task leaves Table 3 (and its Holm family) with a word
    assert "Not in this table (no trial of the arm on that task with a result to compare): imdb gating=true." in md
    ttt = stats.time_to_target(load_results(tmp_path))
    assert f"MetaAdamW reached AdamW's best on {int(ttt['reached'].sum())} of the 6 seed(s) with an AdamW result" in md
    # the HTML's pivoted table has no column of its own for the pivot's name (it had an empty 'task' column)
    html_text = (tmp_path / "out" / "report.html").read_text()
    seeds_table = html_text.split("Ok seeds per arm</h3>", 1)[1].split("</table>", 1)[0]
    headers = re.findall(r"<th[^>]*>(.*?)</th>", seeds_table)
    assert headers == ["arm", "etth1", "imdb"], headers


def test_a_relative_change_of_a_zero_reference_is_n_a_and_said_so(tmp_path, report_kit):
    for arm, best in (("adamw", [0.0, 0.6, 0.6]), ("baseline", [0.7, 0.7, 0.7]), ("gating=true", [0.7, 0.8, 0.7])):
        for seed, value in enumerate(best):
            row = report_kit.trial_row("imdb", arm, seed, value)
            row.update(arms=json.dumps([arm]))
            write_trial(tmp_path, row, report_kit.history_rows("imdb", arm, value))
    md = report.write_report(tmp_path, tmp_path / "out", formats=("md",)).read_text()
    table2 = md.split("(Table 2 analogue, validation split)", 1)[1].split("(Table 3 analogue", 1)[0]
    imdb = next(line for line in table2.splitlines() if line.startswith("| imdb"))
    assert "| n/a |" in imdb and "3 (3)" in imdb, imdb
    assert ("The relative change is n/a on imdb: the reference's metric is 0 on a paired seed, where it is "
            "undefined.") in table2
    table3 = md.split("(Table 3 analogue, validation split)", 1)[1]
    assert "relative change is n/a" not in table3.split("\n#", 1)[0]  # (the baseline is not 0 there)


def test_a_study_without_adamw_has_no_time_to_target_section(tmp_path, report_kit):
    _three_seed_study(tmp_path, report_kit, {"etth1": ["baseline", "gating=true"]})
    md = report.write_report(tmp_path, tmp_path / "out", formats=("md",)).read_text()
    assert "Time to AdamW's best" not in md and "no adamw trial" not in md
    assert "has no AdamW arm: it runs MetaAdamW (arm 'baseline', the task-optimal settings) and ablates" in md
    # the validation curves, drawn with Table 2, are drawn for the arm that ran (there were none)
    assert "figures/curves_etth1.png" in md and "etth1: validation metric per epoch of the arm that ran" in md
    assert_png(tmp_path / "out" / "figures" / "curves_etth1.png")
    # AdamW on one task of two: the seeds of the other have no target, and are not counted as missing it
    _three_seed_study(tmp_path / "half", report_kit, {"etth1": ["adamw", "baseline"], "imdb": ["baseline"]})
    md = report.write_report(tmp_path / "half", tmp_path / "half_out", formats=("md",)).read_text()
    assert re.search(r"MetaAdamW reached AdamW's best on \d of the 3 seed\(s\) with an AdamW result to reach", md)


def test_one_finished_factorial_cell_gives_no_effects_and_no_error():
    # a factorial study's first finished trial: no factor varies yet (it raised KeyError: 'p_value', failing the report)
    from ablate.results import Results
    trials = pd.DataFrame([{"trial_id": f"t{s}", "task": "etth1", "seed": s, "arm": "factorial:gating=true,grouping=original",
                            "status": "ok", "mode": "min", "metric": "mse", "best_metric": 1.0 + s} for s in range(2)])
    assert stats.factorial_effects(Results(trials, pd.DataFrame(), pd.DataFrame())).empty


def test_the_sign_of_a_small_change_is_shown_in_the_run_summary_too():
    from ablate.sweep import summary_table
    from ablate.results import Results
    rows = [{"trial_id": f"{arm}{s}", "task": "etth1", "seed": s, "arm": arm, "arms": json.dumps([arm]), "status": "ok",
             "mode": "min", "metric": "mse", "best_metric": best} for s in range(2)
            for arm, best in (("baseline", 1.0), ("gating=true", 1.0 + 1e-7))]
    text = summary_table(Results(pd.DataFrame(rows), pd.DataFrame(), pd.DataFrame()))
    assert "-0.00001%" in text and "+0.00%" not in text


def test_the_run_summary_says_why_a_change_against_a_zero_baseline_is_n_a():
    # it printed "n/a" (an infinite mean) or nothing (0/0), two numpy warnings on stderr and no reason
    from ablate.results import Results
    from ablate.sweep import summary_table
    rows = [{"trial_id": f"{arm}{s}", "task": "imdb", "seed": s, "arm": arm, "arms": json.dumps([arm]), "status": "ok",
             "mode": "max", "metric": "accuracy", "best_metric": best} for arm, values in
            (("baseline", [0.0, 0.6, 0.6]), ("gating=true", [0.7, 0.7, 0.7]), ("adamw", [0.0, 0.5, 0.6]))
            for s, best in enumerate(values)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lines = summary_table(Results(pd.DataFrame(rows), pd.DataFrame(), pd.DataFrame())).splitlines()
    for arm in ("gating=true", "adamw"):
        line = next(ln for ln in lines if ln.strip().startswith(arm))
        assert line.endswith("(change n/a: the baseline's metric is 0 on a paired seed)") and "%" not in line, line


def test_the_run_summary_names_the_studys_arms_and_tasks_without_a_stored_trial():
    # a run cut short: the summary listed only what was stored, so an arm with no finished trial vanished from it
    from types import SimpleNamespace

    from ablate.results import Results
    from ablate.sweep import summary_table
    rows = [{"trial_id": f"{arm}{s}", "task": "etth1", "seed": s, "arm": arm, "arms": json.dumps([arm]), "status": "ok",
             "mode": "min", "metric": "mse", "best_metric": 1.0} for s in range(2) for arm in ("baseline", "adamw")]
    study = SimpleNamespace(trials=[SimpleNamespace(task=task, arms=arms) for task, arms in (
        ("etth1", ["baseline", "gating=true"]), ("etth1", ["adamw"]), ("etth1", ["grouping=original"]),
        ("imdb", ["baseline"]))])
    results = Results(pd.DataFrame(rows), pd.DataFrame(), pd.DataFrame())
    text = summary_table(results, study)
    assert "  (no trial stored yet: gating=true, grouping=original)" in text
    assert text.rstrip().endswith("imdb: no trial stored yet") or "\nimdb: no trial stored yet\n" in text
    assert "no trial stored yet" not in summary_table(results)  # (without the study: only what is stored)


def test_the_run_summary_lists_the_arms_and_tasks_in_the_studys_order_whatever_order_they_were_stored_in():
    # they came in the order their first trial was stored, which differs between two runs of one study
    from types import SimpleNamespace

    from ablate.results import Results
    from ablate.sweep import summary_table
    arms = ["baseline", "weighting=none", "grouping=original", "objective=loss_decrease", "adamw"]
    tasks = ["etth1", "wikitext2", "cifar10"]
    rows = [{"trial_id": f"{task}{arm}{s}", "task": task, "seed": s, "arm": arm, "arms": json.dumps([arm]),
             "status": "ok", "mode": "min", "metric": "mse", "best_metric": 1.0 + s}
            for arm in reversed(arms) for task in reversed(tasks) for s in range(2)]
    study = SimpleNamespace(trials=[SimpleNamespace(task=task, arms=[arm]) for task in tasks for arm in arms])
    lines = summary_table(Results(pd.DataFrame(rows), pd.DataFrame(), pd.DataFrame()), study).splitlines()
    listed = [line.split()[0] for line in lines if line.startswith("  ") and line.split()[0] in arms]
    assert listed == arms * 3
    assert [line.split()[0] for line in lines if line.split() and line.split()[0] in tasks] == tasks


def test_the_run_summary_explains_the_change_column_only_where_it_shows_a_change():
    # a run whose every trial failed printed "(the change is the mean per-seed relative change, ...)" below
    # tables without one
    from ablate.results import Results
    from ablate.sweep import summary_table

    def rows(status):
        return [{"trial_id": f"{arm}{s}", "task": "etth1", "seed": s, "arm": arm, "arms": json.dumps([arm]),
                 "status": status, "mode": "min", "metric": "mse", "best_metric": 1.0 + (arm == "adamw")}
                for s in range(2) for arm in ("baseline", "adamw")]

    note = "(the change is the mean per-seed relative change"
    assert note not in summary_table(Results(pd.DataFrame(rows("failed")), pd.DataFrame(), pd.DataFrame()))
    shown = summary_table(Results(pd.DataFrame(rows("ok")), pd.DataFrame(), pd.DataFrame()))
    assert note in shown and "-100.00%" in shown


def test_the_run_summary_counts_a_failed_trial_that_serves_several_arms_once():
    # "boom: every trial failed (2)" for the one trial of a study whose ablation level equals the baseline's
    # (one row per arm after explode_arms): the count of trials must count each trial once
    from ablate.results import Results
    from ablate.sweep import summary_table

    arms = ["baseline", "grouping=fine_grained"]
    rows = [{"trial_id": f"t{s}", "task": "etth1", "seed": s, "arm": arms[0], "arms": json.dumps(arms),
             "status": "failed", "mode": "min", "metric": "mse", "best_metric": float("nan")} for s in range(2)]
    text = summary_table(Results(pd.DataFrame(rows), pd.DataFrame(), pd.DataFrame()))
    assert "etth1: every trial failed (2)" in text, text


def test_placeholders_in_angle_brackets_are_not_html_tags_in_the_markdown_report(tmp_path, report_kit):
    # "arms '<axis>=<level>'" and "(test_<metric>)" are raw HTML to a Markdown renderer (GitHub, VS Code,
    # markdown-it): rendered, report.md read "arms '='" and "(test_)"
    for arm in ("adamw", "baseline", "gating=true"):
        for seed in range(3):
            row = report_kit.trial_row("imdb", arm, seed, 0.8 + 0.01 * seed)
            row.update(arms=json.dumps([arm]), test_accuracy=0.7 + 0.01 * seed)
            write_trial(tmp_path, row)
    md = report.write_report(tmp_path, tmp_path / "out", formats="md").read_text()
    outside_code = re.sub(r"`[^`\n]+`", "", md)
    assert not re.findall(r"(?<!\\)<[A-Za-z/!?][^>]*>", outside_code), re.findall(r"(?<!\\)<[A-Za-z/!?][^>]*>", outside_code)
    assert "arms '\\<axis>=\\<level>'" in md and "(test_\\<metric>)" in md  # (shown as written when rendered)
    assert "p (Holm) < 0.05" in md  # (a "<" that starts no tag is left alone)
    assert report.df_to_markdown(pd.DataFrame({"error": ["ValueError: got <unset>"]})).endswith("| ValueError: got \\<unset> |")


def test_multipliers_near_one_are_labelled_as_values_not_as_an_offset(tmp_path, monkeypatch):
    # modulator_init=zero: alpha and beta stay within 1e-4 of 1; matplotlib's offset would label
    # the axes "-0.5 ... 4.5" and "5.5 ... 10.5" with a "1e-5+9.999e-1" offset in the corner
    from ablate.results import Results

    trials = pd.DataFrame([{"trial_id": "b0", "task": "etth1", "arm": "baseline", "arms": '["baseline"]', "seed": 0,
                            "status": "ok", "best_metric": 1.0, "metric": "mse", "mode": "min"}])
    tel = pd.DataFrame([{"trial_id": "b0", "meta_update": k, "step": 10 * (k + 1), "group": "linear/weight",
                         "alpha": 1 + 1e-5 * k, "beta": 1 - 1e-5 * k} for k in range(5)])
    figures = []
    saved = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path, outside=False: (figures.append(fig), fig.canvas.draw(),
                                                                           saved(fig, path, outside))[2])
    assert_png(report.plot_alpha_beta(Results(trials, pd.DataFrame(), tel), "etth1", tmp_path))
    for ax in figures[0].axes[:2]:
        assert ax.yaxis.get_offset_text().get_text() == "", ax.get_ylabel()
        ticks = [float(t.get_text().replace("\N{MINUS SIGN}", "-")) for t in ax.get_yticklabels()]
        assert all(abs(t - 1) < 1e-3 for t in ticks), (ax.get_ylabel(), ticks)


def test_a_folder_without_study_results_names_what_it_holds_and_the_fix(tmp_path):
    # the folder of `ablate tune` alone (which `ablate report` reports, but load_results - and so the
    # notebook - cannot load) was called "holds no study results" and nothing more; so was an empty
    # folder, and the folder of a run cut off before its first trial finished
    (tmp_path / "tuned").mkdir()
    write_tune(tmp_path / "tuned")
    with pytest.raises(FileNotFoundError, match=r"holds a tuning study \(`ablate tune`\) and no study trials \(`ablate "
                                                 r"run`\): `ablate report " + re.escape(str(tmp_path / "tuned"))):
        load_results(tmp_path / "tuned")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"run the study first \(`ablate run SPEC --out "):
        load_results(tmp_path / "empty")
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "study_trials.json").write_text(json.dumps({"study": "s", "trials": {"t1": {"arm": "adamw"}}}))
    with pytest.raises(FileNotFoundError, match=r"none of the study's trials has finished yet .*--resume` continues it"):
        load_results(tmp_path / "started")


def test_a_path_inside_a_results_folder_names_that_folder(tmp_path, report_kit, capsys, monkeypatch):
    # `ablate report results/quick/report` (or parts/, a file in it, a typo below it) was told to run
    # the study first (`ablate run SPEC --out results/quick`, which would write results/quick/report/)
    from ablate.cli import main

    study = tmp_path / "results" / "quick"
    write_trial(study, report_kit.trial_row("etth1", "adamw", 0, 0.5))
    (study / "report" / "figures").mkdir(parents=True)
    (study / "study.yaml").write_text("name: quick\n")
    hint = f"it is inside the results of study quick: give that folder, {study}"
    cases = {
        study / "report": f"{study / 'report'} holds no study results (no parts/ and no trials.parquet); {hint}",
        study / "report" / "figures": f"{study / 'report' / 'figures'} holds no study results (no parts/ and no "
                                      f"trials.parquet); {hint}",
        study / "parts": f"{study / 'parts'} holds no study results (no parts/ and no trials.parquet); {hint}",
        study / "study.yaml": f"{study / 'study.yaml'} is a file, not a study's results directory "
                                  f"(results/<study name>); {hint}",
        study / "reprot": f"no results directory at {study / 'reprot'}; {hint}",
    }
    for path, said in cases.items():
        assert main(["report", str(path)]) == 2
        assert capsys.readouterr().err == f"ablate: error: {said}\n"
        assert not (path / "report").exists()
    monkeypatch.chdir(study / "report")  # (relative paths: the folder named as the user can give it)
    assert main(["report", "."]) == 2
    assert capsys.readouterr().err.endswith(f"; {hint}\n")
    assert main(["report", "../parts"]) == 2
    assert capsys.readouterr().err == ("ablate: error: ../parts holds no study results (no parts/ and no "
                                       "trials.parquet); it is inside the results of study quick: give that folder, ..\n")
    outside = tmp_path / "elsewhere"  # (not inside a results folder: the advice as before)
    outside.mkdir()
    assert main(["report", str(outside)]) == 2
    assert "run the study first" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"ablate: error: no results directory at {tmp_path / 'nope'}; run `ablate run SPEC` first\n"


def test_a_study_of_adamw_alone_is_not_said_to_compare_metaadamw(tmp_path, report_kit):
    # results where only the AdamW arm is stored (the MetaAdamW trials not run, or removed) opened with
    # "This study compares MetaAdamW (arm 'baseline', the task-optimal settings) with AdamW"
    for seed in range(2):
        write_trial(tmp_path, report_kit.trial_row("etth1", "adamw", seed, 0.01 + seed / 1000),
                    report_kit.history_rows("etth1", "adamw", 0.01))
    md = report.write_report(tmp_path, formats="md").read_text()
    assert "compares MetaAdamW" not in md
    assert "This study has no MetaAdamW arm: it runs AdamW (arm 'adamw') alone" in md


def test_telemetry_of_a_baseline_that_never_finished_ok_is_not_called_unrecorded(tmp_path, report_kit):
    # every baseline trial diverged after its meta-updates: the report said "No telemetry recorded for
    # the baseline arm", though their telemetry is stored (and left out, as every statistic leaves them out)
    for seed in range(2):
        for arm in ("adamw", "baseline"):
            row = report_kit.trial_row("etth1", arm, seed, 0.01)
            if arm == "baseline":
                row.update(status="diverged", error="loss is NaN at epoch 3", stop_reason="diverged", best_metric=float("nan"))
            write_trial(tmp_path, row, report_kit.history_rows("etth1", arm, 0.01),
                        report_kit.telemetry_rows() if arm == "baseline" else ())
    md = report.write_report(tmp_path, formats="md").read_text()
    assert "No telemetry recorded" not in md
    assert "No ok trial of the baseline arm, whose telemetry is drawn: its 2 trial(s) diverged or failed (2 with " in md


def test_a_p_value_is_not_rounded_onto_the_reports_own_alpha(tmp_path, report_kit):
    # write_report(alpha=0.1): the gating effect's p (Holm) is 0.09997, marked "*" (< 0.1); it was
    # printed "0.1" - rounded against the default 0.05, not against the alpha the report marks with
    cells = {("a", "false"): [1.00, 1.02, 0.98], ("a", "true"): [0.90, 0.93 + 0.133514404296875, 0.88],
             ("b", "false"): [1.10, 1.12, 1.09], ("b", "true"): [1.05, 1.01, 1.04 - 0.133514404296875]}
    study = tmp_path / "study"
    for (grouping, gating), values in cells.items():
        arm = f"factorial:grouping={grouping},gating={gating}"
        for seed, best in enumerate(values):
            row = report_kit.trial_row("etth1", "baseline", seed, best)
            row.update(trial_id=f"f-{grouping}-{gating}-{seed}", arm=arm, axis="factorial", arms=json.dumps([arm]))
            write_trial(study, row)
    effects = stats.factorial_effects(load_results(study), alpha=0.1)
    row = effects[(effects["term"] == "gating") & (effects["level"] == "true")].iloc[0]
    assert 0.09995 <= row["p_holm"] < 0.1 and row["significant"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = report.write_report(study, tmp_path / "out", alpha=0.1, formats=["md"]).read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| main | gating | true *"))
    assert line.split("|")[-2].strip() == "0.09997"
    assert report.factorial_display(effects, 0.1)["p (Holm)"].tolist() == [
        report.fmt_p(p, 0.1) for p in effects["p_holm"]]
    t2 = pd.DataFrame([{**{c: 0.0 for c in ("adamw_mean", "adamw_lo", "adamw_hi", "meta_mean", "meta_lo", "meta_hi",
                                            "rel_mean", "rel_lo", "rel_hi", "time_change")},
                        "task": "t", "metric": "mse", "mode": "min", "p_t": 0.09997, "p_signflip": 0.09997,
                        "p_holm": 0.09997, "n_pairs": 17, "n_better": 17, "adamw_n_not_ok": 0, "meta_n_not_ok": 0,
                        "significant": True}])
    assert report.table2_display(t2, 0.1)["p (Holm)"].iloc[0] == "0.09997"
    t3 = t2.assign(axis="gating", arm="gating=true", arm_mean=0.0, arm_lo=0.0, arm_hi=0.0, baseline_mean=0.0,
                   n_not_ok=0, same_as_baseline=False)
    assert report.table3_display(t3, 0.1)["p (Holm)"].iloc[0] == "0.09997"


def test_the_test_split_table3_names_a_planned_arm_without_a_stored_trial_as_the_validation_one_does(tmp_path,
                                                                                                     report_kit):
    # the validation Table 3 named a planned arm with no stored trial ('Not in this table ...'), the test-split
    # Table 3 of the same report did not (it was not given the manifest's arms), while analysis.ipynb did
    from ablate.results import write_manifest

    labels = {}
    for arm, values in {"adamw": [1.0, 1.1, 1.2], "baseline": [0.9, 1.0, 1.05], "grouping=original": [1.0, 1.05, 1.1]}.items():
        for seed, best in enumerate(values):
            row = report_kit.trial_row("etth1", arm, seed, best)
            row.update(arms=json.dumps([arm]), status="ok", error="", stop_reason="max_epochs", test_mse=best * 1.1)
            write_trial(tmp_path, row, report_kit.history_rows("etth1", arm, best))
            labels[row["trial_id"]] = {"study": row["study"], "arm": arm, "arms": row["arms"], "axis": row["axis"]}
    for seed in range(3):
        labels[f"g{seed}"] = {"study": "report-test", "arm": "gating=true", "arms": '["gating=true"]', "axis": "gating"}
    write_manifest(tmp_path, "report-test", labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = report.write_report(tmp_path, tmp_path / "out", formats="md").read_text()
    note = "Not in this table (no trial of the arm on that task with a result to compare): etth1 gating=true."
    assert md.count(note) == 2, "named under both Table 3s (validation and test split)"


def test_a_folder_without_study_results_given_as_dot_names_its_parent_and_name(tmp_path, monkeypatch):
    # `ablate report .` inside an empty study folder suggested `ablate run SPEC --out .` (which writes ./<name>/
    # below it) "for a study named " - the folder `.` has no name, and its parent is not `.`
    (tmp_path / "quick").mkdir()
    monkeypatch.chdir(tmp_path / "quick")
    with pytest.raises(FileNotFoundError, match=re.escape(f"`ablate run SPEC --out {tmp_path}` writes quick/ there "
                                                          f"for a study named quick")):
        load_results(".")
    (tmp_path / "quick" / "study_trials.json").write_text(json.dumps({"study": "quick", "trials": {"t1": {"arm": "adamw"}}}))
    with pytest.raises(FileNotFoundError, match=re.escape(f"`ablate run SPEC --out {tmp_path} --resume` continues it")):
        load_results(".")


def test_tasks_whose_names_differ_in_characters_a_file_name_cannot_hold_get_figures_of_their_own(tmp_path, report_kit):
    # "my task|x" and "my task/x" were both slugged to "my_task_x": the second task's curves, ablation bars and
    # telemetry figures were drawn over the first's, and both report sections showed the last task's figures
    tasks = {"my task|x": ("mse", "min", 0.5), "my task/x": ("accuracy", "max", 0.8)}
    for task, (metric, mode, level) in tasks.items():
        for arm, shift in (("adamw", 0.0), ("baseline", 0.01), ("gating=true", 0.02)):
            for seed in range(3):
                best = level + shift + 0.001 * seed
                row = report_kit.trial_row("etth1", arm, seed, best)
                row.update(task=task, metric=metric, mode=mode, arms=json.dumps([arm]),
                           trial_id=f"{metric}-{arm.replace('=', '_')}-s{seed}")
                history = [{**h, f"val_{metric}": best * f} for h, f in
                           zip(report_kit.history_rows("etth1", arm, best), (1.3, 1.1, 1.0))]
                write_trial(tmp_path, row, history, report_kit.telemetry_rows() if arm == "baseline" else ())
    md = report.write_report(tmp_path, tmp_path / "out", formats="md").read_text()
    for kind in ("curves", "ablation", "alpha_beta", "sigmas"):
        links = re.findall(rf"\]\((figures/{kind}_[^)]+)\)", md)
        assert len(links) == 2 and len(set(links)) == 2, links  # (one figure per task, each its own file)
        for link in links:
            assert_png(tmp_path / "out" / link)
    curves = {task: re.search(rf"!\[{re.escape(report.md_escape(task))}: validation metric[^\]]*\]\((figures/[^)]+)\)", md).group(1)
              for task in tasks}
    assert (tmp_path / "out" / curves["my task|x"]).read_bytes() != (tmp_path / "out" / curves["my task/x"]).read_bytes()
    # the names of the built-in tasks and arms stay as they are; others are told apart, "_"-joined names included
    assert [report._slug(name) for name in ("etth1", "wikitext2", "baseline")] == ["etth1", "wikitext2", "baseline"]
    names = ["a b", "a/b", "a|b", "a_b", "a%b", "a__b"]
    assert len({report._slug(name) for name in names}) == len(names)
    assert f"ablation_{report._slug('x_test')}" != f"ablation_{report._slug('x')}_test"
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", report._slug(name)) for name in names + ["../x", "ü"])


def test_md_escape_escapes_what_markdown_would_read_and_nothing_else():
    assert report.md_escape("a*b*") == r"a\*b\*"
    assert report.md_escape("lr=[x|y]_*") == r"lr=\[x\|y\]\_\*"
    assert report.md_escape("`code` <b> ~~s~~ $x$ &amp; C:\\d") == r"\`code\` \<b\> \~\~s\~\~ \$x\$ \&amp; C:\\d"
    # an "_" inside a word cannot start or end emphasis: kept; one at either end of a word is escaped
    assert [report.md_escape(n) for n in ("gating_true", "p_gradient", "_x_", "a__b", "x_1")] == [
        "gating_true", "p_gradient", r"\_x\_", r"a\_\_b", "x_1"]
    assert report.md_escape("two\nlines") == "two lines" and report.md_escape(0.0125) == "0.0125"
    # the HTML report shows the name as it is
    assert report._unescape(report.md_escape("lr=[x|y]_* `c` C:\\d")) == "lr=[x|y]_* `c` C:\\d"
    # a table cell escapes a pipe once: a name's escaped pipe is not escaped again (that backslash would show)
    assert report.df_to_markdown(pd.DataFrame({"a": [report.md_escape("x|y")], "b": ["p|q"]})).splitlines()[2] == (
        r"| x\|y | p\|q |")


def test_names_with_markdown_characters_are_written_literally(tmp_path, report_kit):
    # names went into the Markdown unescaped: the task "*t_a*sk_" rendered "t" and "a" in italics, the arm
    # "lr=[x|y]_*" split its table row after "lr=[x", and the captions' "*...*" emphasis broke apart
    task, arm = "*t_a*sk_", "lr=[x|y]_*"
    for seed in range(2):
        for name, best in (("adamw", 0.010), ("baseline", 0.009), (arm, 0.0095)):
            row = report_kit.trial_row("etth1", "adamw" if name == "adamw" else "baseline", seed, best + seed * 1e-4)
            row.update(task=task, study="st_u_dy_", arm=name, axis=name.split("=")[0] if "=" in name else "",
                       arms=json.dumps([name]), trial_id=f"{name}-{seed}")
            write_trial(tmp_path, row, report_kit.history_rows("etth1", "adamw", best),
                        report_kit.telemetry_rows() if name == "baseline" else ())
    report.write_report(tmp_path, tmp_path / "out")
    lines = (tmp_path / "out" / "report.md").read_text().splitlines()
    t, a = r"\*t_a\*sk\_", r"lr=\[x\|y\]\_\*"
    assert lines[0] == r"# Ablation report: st_u_dy\_"
    assert next(ln for ln in lines if ln.startswith("This study")).endswith(f"Tasks: {t}. Arms: adamw, baseline, {a}.")
    assert f"| {t} | lr | {a} | 0.00955 [0.008915, 0.01019] | 0.00905 | -5.53% [-5.91%, -5.14%] | 0 | 0.5 | n/a | " \
           f"2 (0) | 0 |" in lines
    assert f"| {t} | {a} | 2 / 0 | 3 [3, 3] | 0.00% | 36 | 16.67% |" in lines  # (cost)
    assert f"| {a} | 2 |" in lines and f"| arm | {t} |" in lines  # (ok seeds per arm)
    assert f"| task | adamw | baseline | {a} |" in lines  # (performance profile)
    slug = report._slug(task)
    assert f"![{t}: ablation arms vs baseline, 95% CI](figures/ablation_{slug}.png)" in lines
    assert f"*{t}: ablation arms vs baseline, 95% CI*" in lines
    assert f"*{t}: weighting sigmas (baseline arm)*" in lines
    # the report's own text and the numbers are not escaped
    assert "| etth1 |" not in lines and "(arms '\\<axis>=\\<level>')" in lines[2]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "\\" not in page  # (no Markdown escape shows in HTML)
    assert "<title>Ablation report: st_u_dy_</title>" in page and f"Tasks: {task}. Arms: adamw, baseline, {arm}." in page
    assert f"<td>{task}</td>\n      <td>lr</td>\n      <td>{arm}</td>" in page
    assert f"<figcaption>{task}: ablation arms vs baseline, 95% CI</figcaption>" in page


@pytest.mark.filterwarnings("ignore:Tight layout not applied")  # (the 207-character arm label of the bar chart)
def test_a_very_long_task_or_arm_name_gets_figure_files_a_file_system_can_hold(tmp_path, report_kit):
    # "curves_<task>.png" of a 260-character task name failed the whole report: "File name too long"
    task, arm = "t" * 260, "gating=" + "x" * 200
    for seed in range(2):
        for name, best in (("adamw", 0.010), ("baseline", 0.009), (arm, 0.0095)):
            row = report_kit.trial_row("etth1", "adamw" if name == "adamw" else "baseline", seed, best + seed * 1e-4)
            row.update(task=task, arm=name, axis=name.split("=")[0] if "=" in name else "", arms=json.dumps([name]),
                       trial_id=f"{name[:10]}-{seed}")
            write_trial(tmp_path, row, report_kit.history_rows("etth1", "adamw", best),
                        report_kit.telemetry_rows() if name == "baseline" else ())
    md = report.write_report(tmp_path, tmp_path / "out", formats="md").read_text()
    links = re.findall(r"\]\((figures/[^)]+)\)", md)
    assert len(links) == 5 and all(len(Path(link).name) <= 255 for link in links), links
    for link in links:
        assert_png(tmp_path / "out" / link)
    assert f"| {task} | gating | {arm} |" in md  # (the name itself is written whole)
    # cut to report.SLUG_MAX characters with the hash of the whole name: names that share their first
    # characters stay apart; a short name stays as it is
    slugs = [report._slug(name) for name in ("a" * 150, "a" * 151, "a" * 100, "a" * 101)]
    assert [len(s) for s in slugs] == [100, 100, 100, 100] and len(set(slugs)) == 4 and slugs[2] == "a" * 100
    assert re.fullmatch("a{91}_[0-9a-f]{8}", slugs[0]) and re.fullmatch("a{91}_[0-9a-f]{8}", slugs[3])


def test_fmt_num_says_n_a_for_a_missing_value_of_any_float_type():
    # a numpy.float32 NaN is no Python float: it printed "nan" (and pd.NA, of a nullable column, raised TypeError)
    assert [report.fmt_num(x) for x in (np.float32("nan"), np.float16("nan"), np.float64("nan"), pd.NA, None)] == [
        "n/a"] * 5
    assert report.fmt_ci(np.float32("nan"), np.float32("nan"), np.float32("nan")) == "n/a"
    assert [report.fmt_num(x) for x in (np.float32(0.25), np.float32(-0.0), np.int64(3))] == ["0.25", "0", "3"]


def test_a_backtick_in_a_name_does_not_pair_with_a_code_span_of_the_message():
    # the name's backtick opened a code span up to the message's next backtick: "`y: ... again: `" showed as
    # code, and the last command lost its closing backtick ("`--rerun all\\`")
    note = ("2 ok trial(s) report a best metric (x`y baseline: 1, a` b: 1, `z c: 1). Run them again: "
            "`ablate run STUDY --rerun TASK` (or `--rerun ARM`, `--rerun all`).")
    assert report.md_message(note) == (
        "2 ok trial(s) report a best metric (x\\`y baseline: 1, a\\` b: 1, \\`z c: 1). Run them again: "
        "`ablate run STUDY --rerun TASK` (or `--rerun ARM`, `--rerun all`).")
    # ablate's own code spans stay code wherever they stand; the text around them is escaped
    assert report.md_message('"`ray start --head`" then `ablate tune`\'s *best*.') == (
        '"`ray start --head`" then `ablate tune`\'s \\*best\\*.')


def test_a_stats_note_naming_a_task_with_a_backtick_keeps_its_commands_as_code(tmp_path, report_kit):
    task = "et`th1"
    for seed in range(2):
        for arm in ("adamw", "baseline"):
            row = report_kit.trial_row("etth1", arm, seed, 0.010 + seed * 1e-4)
            row.update(task=task)
            if arm == "baseline" and seed == 0:  # stored under the earlier best-epoch rule: a note with commands
                row.update(best_metric=0.0105, best_mse=0.0105)
            write_trial(tmp_path, row, report_kit.history_rows("etth1", arm, 0.010 + seed * 1e-4))
    md = report.write_report(tmp_path, tmp_path / "out", formats="md").read_text()
    line = next(ln for ln in md.splitlines() if "earlier version of ablate" in ln)
    assert "(et\\`th1 baseline: 1)" in line, line
    assert line.endswith("Run them again: `ablate run STUDY --rerun TASK` (or `--rerun ARM`, `--rerun all`).**"), line


def test_ordinary_names_and_paths_are_written_without_escapes(tmp_path, report_study, report_kit):
    # md_escape leaves an "_" between letters or digits as it is: the report of an ordinary study - arms
    # such as features=basic_plus and modulator_init=zero, a results path with "_" - shows no backslash
    # but the one of its own text ("arms '\\<axis>=\\<level>'")
    study = Path(shutil.copytree(report_study, tmp_path / "results_quick" / "my_study_1"))
    for seed in report_kit.SEEDS:
        for arm in ("features=basic_plus", "modulator_init=zero"):
            row = report_kit.trial_row("etth1", arm if arm in report_kit.EPOCH_SECONDS else "baseline", seed, 0.0095)
            row.update(arm=arm, axis=arm.split("=")[0], arms=json.dumps([arm]), trial_id=f"{arm}-{seed}")
            write_trial(study, row, report_kit.history_rows("etth1", "baseline", 0.0095))
    report.write_report(study, study / "report")
    md = (study / "report" / "report.md").read_text()
    assert f"Results directory: {study}." in md
    assert "| etth1 | features | features=basic_plus |" in md and "| etth1 | modulator_init | modulator_init=zero |" in md
    assert md.replace("'\\<axis>=\\<level>'", "").count("\\") == 0, [ln for ln in md.splitlines() if "\\" in ln]


def test_a_factorial_effect_of_zero_prints_as_zero_not_as_rounding_noise(report_kit):
    # gating changes nothing in any cell: its effects are 0 up to the rounding of the fit (1.77e-17), which
    # printed as "+1.77e-15%" and "-1.77e-15%", a sign and a size the data do not have
    from ablate.results import Results

    cells = {("fine_grained", "false"): [1.00, 1.02, 0.98], ("fine_grained", "true"): [1.00, 1.02, 0.98],
             ("original", "false"): [1.10, 1.12, 1.09], ("original", "true"): [1.10, 1.12, 1.09]}
    rows = []
    for (grouping, gating), values in cells.items():
        arm = f"factorial:grouping={grouping},gating={gating}"
        for seed, best in enumerate(values):
            row = report_kit.trial_row("etth1", "baseline", seed, best)
            rows.append({**row, "trial_id": f"f-{grouping}-{gating}-{seed}", "arm": arm, "axis": "factorial",
                         "arms": json.dumps([arm])})
    effects = stats.factorial_effects(Results(pd.DataFrame(rows), pd.DataFrame(), pd.DataFrame()))
    zero = effects[(effects["term"] == "gating") | (effects["kind"] == "interaction")]
    assert len(zero) == 3 and (zero["estimate"] == 0.0).all() and (zero["p_value"] == 1.0).all()
    shown = report.factorial_display(effects).set_index(["term", "level"])["effect [95% CI]"]
    assert shown[("gating", "false")] == shown[("gating", "true")] == "0.00% [-0.22%, +0.22%]"
    assert shown[("grouping x gating", "fine_grained x false")] == "0.00% [-0.22%, +0.22%]"
    assert shown[("grouping", "fine_grained *")] == "+4.91% [+4.69%, +5.14%]"  # (a real effect as it was)


@pytest.mark.parametrize("drop, named", [(["task"], "no task column"), (["seed"], "no seed column"),
                                         (["arm"], "no arm column"), (["task", "seed", "arm"], "no task, seed, arm columns"),
                                         (["best_metric"], "no best_metric column")])
def test_a_trials_table_without_the_columns_the_statistics_read_is_refused_up_front_naming_them(tmp_path, drop, named,
                                                                                                capsys):
    # a trials table written by hand or by other code failed deep in the statistics with a bare KeyError: 'task'
    # (or, without best_metric, reported its ok trials as "6 ok" and "0 ok seeds" at once)
    from ablate.cli import main
    from ablate.results import ResultsError

    rows = [{"trial_id": f"t{seed}{arm}", "status": "ok", "task": "etth1", "seed": seed, "arm": arm, "metric": "mse",
             "mode": "min", "best_metric": 1.0 + seed} for seed in range(3) for arm in ("adamw", "baseline")]
    pd.DataFrame(rows).drop(columns=drop).to_parquet(tmp_path / "trials.parquet", index=False)
    with pytest.raises(ResultsError, match=f"trials table of .* has {named}: it was not written by ablate .*every "
                                           f"trial row `ablate run` writes has trial_id, status, task, seed, arm and, "
                                           f"for a finished trial, best_metric"):
        report.write_report(tmp_path)
    assert not (tmp_path / "report").exists()
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ablate: error: the trials table") and named in err and "KeyError" not in err


def test_failed_trials_without_a_best_metric_column_are_still_reported(tmp_path):
    # (only an "ok" trial needs a best_metric: a study whose every trial failed early may have written none)
    rows = [{"trial_id": f"dead{seed}", "status": "failed", "task": "etth1", "seed": seed, "arm": "baseline",
             "error": "boom"} for seed in range(2)]
    pd.DataFrame(rows).to_parquet(tmp_path / "trials.parquet", index=False)
    assert "2 in all - 0 ok, 2 failed, 0 diverged" in report.write_report(tmp_path, formats="md").read_text()


def test_the_telemetry_figures_of_several_trials_of_a_seed_count_and_weigh_seeds_not_trials(tmp_path, monkeypatch):
    # results of two study versions (load_results(..., all_trials=True)): seed 0 ran twice. The figure said "mean over
    # 3 seeds" and weighed seed 0 twice, where the tables average a seed's trials first
    from ablate.results import Results

    trials = pd.DataFrame([{"trial_id": tid, "task": "etth1", "arm": "baseline", "arms": '["baseline"]', "seed": seed,
                            "status": "ok", "best_metric": 1.0, "metric": "mse", "mode": "min"}
                           for tid, seed in (("a0", 0), ("b0", 0), ("a1", 1))])
    values = {"a0": 1.0, "b0": 1.2, "a1": 2.0}
    tel = pd.DataFrame([{"trial_id": tid, "meta_update": k, "step": 10 * (k + 1), "group": "g", "alpha": v + k,
                         "beta": v, "sigma_gradient": v} for tid, v in values.items() for k in range(2)])
    figures = []
    saved = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path, outside=False: (figures.append(fig), saved(fig, path, outside))[1])
    results = Results(trials, pd.DataFrame(), tel)
    assert_png(report.plot_alpha_beta(results, "etth1", tmp_path))
    assert figures[0]._suptitle.get_text() == ("etth1 / baseline: mean over 2 seeds (3 trials: the trials of a seed "
                                               "averaged first)")
    alpha, beta = (figures[0].axes[k].lines[0].get_ydata() for k in (0, 1))
    np.testing.assert_allclose(alpha, [1.55, 2.55])  # (seed 0: 1.1, seed 1: 2.0; not 1.4667 over the trials)
    np.testing.assert_allclose(beta, [1.55, 1.55])
    assert_png(report.plot_sigmas(results, "etth1", tmp_path))
    np.testing.assert_allclose(figures[1].axes[0].lines[0].get_ydata(), [1.55, 1.55])
    # one trial a seed: as before, no word of trials
    assert_png(report.plot_alpha_beta(Results(trials[trials["trial_id"] != "b0"], pd.DataFrame(), tel), "etth1", tmp_path))
    assert figures[2]._suptitle.get_text() == "etth1 / baseline: mean over 2 seeds"
