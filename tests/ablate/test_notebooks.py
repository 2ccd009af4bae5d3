"""The analysis notebooks: stored without outputs, and analysis.ipynb runs on a results directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from ablate import report, stats
from ablate.results import load_results

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
KERNEL = "ablate-tests"


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec that runs this very interpreter (whatever other python3 kernels the machine has)."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ablate tests", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    assert KERNEL in KernelSpecManager().find_kernel_specs()
    return KERNEL


def outputs_by_cell(nb) -> list[str]:
    """Every code cell's outputs flattened to one string (stream text, text/plain, text/html, markdown)."""
    texts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        parts = []
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            data = out.get("data", {})
            parts += [data.get(k, "") for k in ("text/plain", "text/html", "text/markdown")]
            if "image/png" in data:
                parts.append("<image/png>")
        texts.append("\n".join(parts))
    return texts


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    # nbformat 4.5 cells carry ids; nbformat warns that a cell without one will be refused
    assert all("id" in cell for cell in json.loads(path.read_text())["cells"]), f"{path.name}: a cell without an id"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has stored outputs"


def test_analysis_notebook_runs_on_a_results_dir(report_study, report_kit, monkeypatch, kernel):
    report_kit.write_tune(report_study)  # with a tuning study, as `ablate report` draws it
    monkeypatch.setenv("ABLATE_RESULTS_DIR", str(report_study))
    nb = nbformat.read(NOTEBOOKS / "analysis.ipynb", as_version=4)
    assert nb.cells[1].source.strip() == 'RESULTS_DIR = "results/quick"'
    NotebookClient(nb, kernel_name=KERNEL, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = outputs_by_cell(nb)
    everything = "\n".join(outputs)
    assert "trials: 48 - 46 ok, 1 failed, 1 diverged" in everything
    assert "EMBEDDED" in everything
    assert "rel. improvement" in everything and "MetaAdamW" in everything  # Table 2
    assert "rel. change vs baseline" in everything and "p (Holm)" in everything  # Table 3
    assert "= baseline (same trials)" in everything  # grouping=fine_grained ran the baseline's own trials
    assert "No factorial cells in this study." in everything
    assert "not reached" in everything and "meta-update share" in everything  # cost
    reached = report.time_to_target_note(stats.time_to_target(load_results(report_study)))
    assert reached.startswith("MetaAdamW reached AdamW's best on ") and reached in everything  # (the report's line)
    assert report_kit.FAILED_ID in everything and report_kit.DIVERGED_ID in everything
    assert everything.count("<image/png>") >= 11
    assert (report_study / "report" / "report.md").exists()
    for name in ("tune_history.png", "tune_importances.png"):  # the figures of `ablate report`, all of them
        assert (report_study / "report" / "figures" / name).stat().st_size > 0


def test_custom_feature_extractor_notebook_runs(tmp_path, monkeypatch, kernel):
    monkeypatch.setenv("ABLATE_NOTEBOOK_WORK_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / "custom_feature_extractor.ipynb", as_version=4)
    NotebookClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    everything = "\n".join(outputs_by_cell(nb))
    assert "'grad_stats'" in everything and "columns=['log_grad_norm', 'grad_to_param', 'cos'" in everything
    assert "meta-update at step 20" in everything
    # the extractor's width is a multiple of the default 6 heads: no zero-padding warning in the toy check, nor in
    # the study's features=grad_stats arm (the baseline's 6 heads); grad_stats was 5 wide, padded to 6 there
    assert "GradStats(width=6" in everything and "modulator width 6, zero-padded columns 0" in everything
    assert "zero-padded with" not in everything
    check = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c",
         "import torch, grad_stats_features\nfrom metaadamw.optimizer import MetaAdamW\n"
         "MetaAdamW(torch.nn.Linear(2, 1).named_parameters(), features='grad_stats')"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(NOTEBOOKS.parent)])},
        capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "study custom_features: 6 trials" in everything and "features=grad_stats" in everything
    # the study really ran on Ray Tune, with the plugin in the workers
    assert "[6/6 done (0 reused)" in everything and "features=grad_stats" in everything.split("vs baseline")[-1]
    trials = load_results(tmp_path / "results" / "custom_features").trials
    assert len(trials) == 6 and set(trials["status"]) == {"ok"}
    assert (tmp_path / "grad_stats_features.py").exists() and (tmp_path / "custom_features.yaml").exists()
    # ... and the analysis notebook renders that real study's results
    monkeypatch.setenv("ABLATE_RESULTS_DIR", str(tmp_path / "results" / "custom_features"))
    analysis = nbformat.read(NOTEBOOKS / "analysis.ipynb", as_version=4)
    NotebookClient(analysis, kernel_name=KERNEL, timeout=300,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    rendered = "\n".join(outputs_by_cell(analysis))
    assert "trials: 6 - 6 ok" in rendered and "features=grad_stats" in rendered and "EMBEDDED" in rendered


def test_analysis_notebook_says_where_a_relative_change_is_n_a(tmp_path, report_kit, monkeypatch, kernel):
    # a reference metric of 0 on a paired seed: the notebook's tables print n/a and say why, on both splits
    # (AdamW's 0 in Table 2; in Table 3 the baseline's 0 on the test split only)
    from ablate.results import write_trial

    values = {"adamw": ([0.0, 0.6, 0.6], [0.0, 0.5, 0.5]), "baseline": ([0.7, 0.7, 0.7], [0.4, 0.0, 0.4]),
              "gating=true": ([0.7, 0.8, 0.7], [0.3, 0.3, 0.3])}
    for arm, (best, test) in values.items():
        for seed, (value, test_value) in enumerate(zip(best, test)):
            row = report_kit.trial_row("etth1", arm, seed, value)
            row.update(arms=json.dumps([arm]), test_mse=test_value)
            write_trial(tmp_path, row, report_kit.history_rows("etth1", arm, value))
    for seed in range(2):  # a task the baseline never finished ok: left out of Table 2 and named, as in the report
        for arm in ("adamw", "baseline"):
            row = report_kit.trial_row("imdb", arm, seed, 0.5)
            if arm == "baseline":
                row.update(status="failed", error="RuntimeError: boom", stop_reason="failed", best_metric=float("nan"))
            write_trial(tmp_path, row)
    monkeypatch.setenv("ABLATE_RESULTS_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / "analysis.ipynb", as_version=4)
    NotebookClient(nb, kernel_name=KERNEL, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = outputs_by_cell(nb)
    note = "The relative change is n/a on etth1: the reference's metric is 0 on a paired seed, where it is undefined."
    code = [c.source for c in nb.cells if c.cell_type == "code"]  # (outputs_by_cell's order)
    table2, table3, test = (next(i for i, c in enumerate(code) if c.startswith(s))
                            for s in ("t2, left_out = report.table2_comparable", "t3 = stats.table3",
                                      "if stats.tasks_with_test_split"))
    assert note in outputs[table2] and note not in outputs[table3], outputs[table3]
    left_out = "Left out: imdb (AdamW 2 ok seed(s), 0 not ok; MetaAdamW 0 ok seed(s), 2 not ok)."
    assert left_out in outputs[table2] and outputs[table2].count("imdb") == 1, outputs[table2]  # (no all-n/a row)
    assert outputs[test].count(note) == 2, outputs[test]  # (Table 2 and Table 3 on the test split)


def test_analysis_notebook_shows_no_time_to_target_table_without_an_adamw_result(tmp_path, report_kit, monkeypatch,
                                                                                 kernel):
    # a study without AdamW (`adamw: false`): `ablate report` leaves the time-to-target table out; the
    # notebook showed one row per seed reading "no adamw trial", target n/a
    from ablate.results import write_trial

    for arm in ("baseline", "gating=true"):
        for seed, value in enumerate(report_kit.REPORT_METRICS["etth1"][arm][:3]):
            row = report_kit.trial_row("etth1", arm, seed, value)
            row.update(arms=json.dumps([arm]))
            write_trial(tmp_path, row, report_kit.history_rows("etth1", arm, value))
    monkeypatch.setenv("ABLATE_RESULTS_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / "analysis.ipynb", as_version=4)
    NotebookClient(nb, kernel_name=KERNEL, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    cost = outputs_by_cell(nb)[next(i for i, c in enumerate(code) if c.startswith("ttt = stats.time_to_target"))]
    assert "no adamw trial" not in cost and "target (AdamW best)" not in cost, cost
    assert "meta-update share" in cost  # (the cost table itself stays)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "no adamw trial" not in md and "Time to AdamW's best" not in md


def test_analysis_notebook_shows_long_arm_names_and_errors_in_full(tmp_path, report_kit, monkeypatch, kernel):
    # pandas cut every cell at 50 characters ("factorial:grouping=fine_grained,gating=false,o..."): the
    # cells of a 2^3 design that differ in their last factor read alike, and an error lost its end
    from ablate.results import write_trial

    cells = [(g, ga, o) for g in ("fine_grained", "original") for ga in ("false", "true") for o in ("gradient", "combined")]
    error = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB; 1.50 GiB free (the end of the message)"
    for k, (grouping, gating, objective) in enumerate(cells):
        arm = f"factorial:grouping={grouping},gating={gating},objective={objective}"
        for seed in range(3):
            value = 1.0 + 0.05 * k + 0.01 * seed
            row = report_kit.trial_row("etth1", "baseline", seed, value)
            row.update(trial_id=f"f{k}-{seed}", arm=arm, axis="factorial", arms=json.dumps([arm]))
            if k == 7 and seed == 2:
                row.update(status="failed", error=error, stop_reason="failed", best_metric=float("nan"))
            write_trial(tmp_path, row, report_kit.history_rows("etth1", "baseline", value))
    monkeypatch.setenv("ABLATE_RESULTS_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / "analysis.ipynb", as_version=4)
    NotebookClient(nb, kernel_name=KERNEL, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    html = "\n".join(out.get("data", {}).get("text/html", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []))
    for grouping, gating, objective in cells:
        assert f"<td>factorial:grouping={grouping},gating={gating},objective={objective}</td>" in html
    assert error in html and "...</td>" not in html


def test_custom_feature_extractor_notebook_writes_its_files_to_a_path_with_a_space(tmp_path, monkeypatch, kernel):
    # `%%writefile {WORK_DIR}/...` split a path with a space (a checkout under "My Projects", whose
    # default WORK_DIR is inside it) into two arguments: "UsageError: unrecognized arguments"
    work = tmp_path / "my projects" / "demo"
    monkeypatch.setenv("ABLATE_NOTEBOOK_WORK_DIR", str(work))
    nb = nbformat.read(NOTEBOOKS / "custom_feature_extractor.ipynb", as_version=4)
    upto = next(i for i, c in enumerate(nb.cells) if c.source.startswith("from ablate.study import format_trials"))
    nb.cells = nb.cells[:upto + 1]  # (up to the study's trials: Ray's run is the test above's)
    NotebookClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    everything = "\n".join(outputs_by_cell(nb))
    assert "'grad_stats'" in everything and "study custom_features: 6 trials" in everything
    assert (work / "grad_stats_features.py").exists() and (work / "custom_features.yaml").exists()


def test_analysis_notebook_prints_the_notes_the_report_prints(tmp_path, report_kit, monkeypatch, kernel):
    # the notebook left out notes `ablate report` prints: that with 3 seeds no row can be significant, the
    # ablation arms with no row on a task, the factorial cell-seeds left out of the fit, the tuning targets
    # without a stored suggestion and the tuned tasks without parameter importances
    import pandas as pd

    from ablate.results import TUNE_TARGETS_FILE, write_trial

    for task in ("etth1", "imdb"):
        for arm in ("adamw", "baseline", "gating=true"):
            for seed in range(3) if (task, arm) != ("imdb", "gating=true") else ():
                best = 0.5 + 0.01 * seed + (0.05 if arm == "adamw" else 0.0)
                row = report_kit.trial_row(task, arm, seed, best)
                row.update(arms=json.dumps([arm]))
                write_trial(tmp_path, row, report_kit.history_rows(task, arm, best))
    for (grouping, gating), values in report_kit.FACTORIAL_METRICS.items():
        arm = f"factorial:grouping={grouping},gating={gating}"
        for seed, best in enumerate(values):
            row = report_kit.trial_row("etth1", "baseline", seed, best)
            row.update(trial_id=f"f-{grouping}-{gating}-{seed}", arm=arm, axis="factorial", arms=json.dumps([arm]))
            if (grouping, gating, seed) == ("original", "true", 2):
                row.update(status="diverged", best_metric=float("nan"), stop_reason="diverged")
            write_trial(tmp_path, row, report_kit.history_rows("etth1", "baseline", best))
    tune = tmp_path / "tune"
    tune.mkdir()
    pd.DataFrame({"task": ["etth1", "etth1", "imdb", "imdb"], "number": [0, 1, 0, 1], "value": [0.9, 0.7, 0.5, 0.5],
                  "state": ["COMPLETE"] * 4, "params_p_gradient": [1.0, 2.0, 1.0, 2.0]}).to_parquet(tune / "history.parquet")
    pd.DataFrame({"task": ["etth1"], "param": ["p_gradient"], "importance": [1.0]}).to_parquet(tune / "importances.parquet")
    (tune / TUNE_TARGETS_FILE).write_text(json.dumps(["etth1", "imdb", "cifar10"]))
    md = report.write_report(tmp_path, tmp_path / "out", formats="md").read_text()
    notes = ["With at most 3 paired seed(s) here the smallest sign-flip p is 0.25, not below 0.05",
             "Not in this table (no trial of the arm on that task with a result to compare): imdb gating=true.",
             "Left out of the fit, 1 cell-seed(s) without an ok result where other cells of the seed have one: "
             "grouping=original,gating=true on etth1 seed 2 (diverged).",
             "No parameter importances for imdb: fewer than two finished suggestions drawn from the search space "
             "as last run (where a range changed between runs, those drawn from an earlier one do not count)"]
    for note in notes:
        assert note in md, note
    assert "| cifar10 | 0 | 0 | 0 | 0 | 0 | no suggestion stored |" in md
    monkeypatch.setenv("ABLATE_RESULTS_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / "analysis.ipynb", as_version=4)
    NotebookClient(nb, kernel_name=KERNEL, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    everything = "\n".join(outputs_by_cell(nb))
    for note in notes:
        assert note in everything, note
    assert "no suggestion stored" in everything and "cifar10" in everything


def test_analysis_notebook_on_a_folder_without_trials_stops_with_the_reports_error(tmp_path, report_kit,
                                                                                  monkeypatch, kernel):
    # parts/ with no trial row yet (a trial cut off between its history part and its trial row): `ablate
    # report` says "holds no trials yet"; the notebook ran on to its figures cell and failed with KeyError: 'task'
    from nbclient.exceptions import CellExecutionError

    from ablate.results import atomic_write_parquet

    atomic_write_parquet(pd.DataFrame(report_kit.history_rows("etth1", "adamw", 0.01)).assign(trial_id="t0"),
                         tmp_path / "parts" / "t0.history.parquet")
    monkeypatch.setenv("ABLATE_RESULTS_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / "analysis.ipynb", as_version=4)
    with pytest.raises(CellExecutionError) as err:
        NotebookClient(nb, kernel_name=KERNEL, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    assert "holds no trials yet; nothing to report" in str(err.value) and "KeyError" not in str(err.value)


def test_analysis_notebook_refuses_a_trials_table_without_the_columns_the_statistics_read(tmp_path, monkeypatch, kernel):
    # a trials table written by hand or by other code (no task column): `ablate report` names the missing column up
    # front; the notebook ran on into the statistics and failed there with a bare KeyError: 'task'
    from nbclient.exceptions import CellExecutionError

    rows = [{"trial_id": f"t{seed}{arm}", "status": "ok", "seed": seed, "arm": arm, "metric": "mse", "mode": "min",
             "best_metric": 1.0 + seed} for seed in range(3) for arm in ("adamw", "baseline")]
    pd.DataFrame(rows).to_parquet(tmp_path / "trials.parquet", index=False)
    monkeypatch.setenv("ABLATE_RESULTS_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / "analysis.ipynb", as_version=4)
    with pytest.raises(CellExecutionError) as err:
        NotebookClient(nb, kernel_name=KERNEL, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    assert "has no task column: it was not written by ablate" in str(err.value) and "KeyError" not in str(err.value)


def test_analysis_notebook_names_table_3_s_holm_families_as_the_report_does():
    # Table 3's factorial cells became a Holm family of their own (stats.table3, the report's legend); the notebook
    # still said "Holm over the task's arms", and it shows the factorial cells in that table too
    import json

    cells = json.loads((NOTEBOOKS / "analysis.ipynb").read_text())["cells"]
    text = next("".join(c["source"]) for c in cells if "".join(c["source"]).startswith("## Ablations (Table 3"))
    assert "Holm over the task's arms" not in text, text
    assert "ablation arms, its factorial cells a family of their own" in text, text


def test_analysis_notebook_states_which_rows_are_left_out_of_the_holm_family():
    # stats._holm_family leaves a row whose smallest attainable sign-flip p is not below alpha out of its family
    # (Tarone's rule: 5 paired seeds or fewer at 0.05, Tables 2 and 3; the report's legend and the README say so);
    # the notebook's two table paragraphs said so first of one paired seed only, then of nothing at all
    import json

    cells = json.loads((NOTEBOOKS / "analysis.ipynb").read_text())["cells"]
    texts = ["".join(c["source"]) for c in cells]
    table2 = next(t for t in texts if "Holm over the tasks" in t)
    table3 = next(t for t in texts if t.startswith("## Ablations (Table 3"))
    assert "a task with 5 paired seeds or fewer" in table2 and "left out of the family" in table2, table2
    assert "Tarone" in table2, table2
    assert "an arm with 5 paired seeds or fewer" in table3 and "left out of its family" in table3, table3


def test_analysis_notebook_states_the_cost_sections_rule_for_a_seed_with_several_trials():
    # stats.time_to_target and stats.cost_table count a seed with several ok trials once (each trial's own time,
    # then their mean; the cost means per seed), as the report's Cost text says; the notebook said nothing of it
    import json

    cells = json.loads((NOTEBOOKS / "analysis.ipynb").read_text())["cells"]
    text = next("".join(c["source"]) for c in cells if "".join(c["source"]).startswith("## Cost"))
    assert "A seed with several ok trials of an arm" in text, text
    assert "the cost means average its trials first" in text, text
    assert "the mean of each trial's own time for both arms (reached only if every MetaAdamW trial" in text, text


def test_analysis_notebook_writes_the_names_in_a_results_warning_literally(tmp_path, report_kit, monkeypatch, kernel):
    # the warnings of stats.result_notes went into Markdown as they are: the task "*et*th1" showed "et" in italics
    # (and a name's backtick could pair with one of the commands); the notebook escapes them as the report does
    from ablate.results import write_trial

    for seed in range(2):
        for arm in ("adamw", "baseline"):
            row = report_kit.trial_row("etth1", arm, seed, 0.010 + seed * 1e-4)
            row.update(task="*et*th1", arms=json.dumps([arm]))
            if arm == "baseline" and seed == 0:  # stored under the earlier best-epoch rule: a note naming the task
                row.update(best_metric=0.0105, best_mse=0.0105)
            write_trial(tmp_path, row, report_kit.history_rows("etth1", arm, 0.010 + seed * 1e-4))
    monkeypatch.setenv("ABLATE_RESULTS_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / "analysis.ipynb", as_version=4)
    NotebookClient(nb, kernel_name=KERNEL, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    counts = outputs_by_cell(nb)[next(i for i, c in enumerate(code) if c.startswith("counts = stats.status_counts"))]
    assert "(\\*et\\*th1 baseline: 1)" in counts and "(*et*th1 baseline: 1)" not in counts, counts
    assert "Run them again: `ablate run STUDY --rerun TASK` (or `--rerun ARM`, `--rerun all`).**" in counts, counts
    md = (tmp_path / "report" / "report.md").read_text()  # (the report's warning reads the same)
    assert "(\\*et\\*th1 baseline: 1)" in md
