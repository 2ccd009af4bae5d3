"""The study report: tables and figures from a results directory, as Markdown and HTML.

:func:`write_report` loads a study's tables (:func:`ablate.results.load_results`), computes the
statistics of :mod:`ablate.stats`, draws PNG figures into ``<out>/figures/`` and writes
``report.md`` and a self-contained ``report.html`` (figures embedded) from one list of content
blocks, so both say the same thing. Every ``plot_*`` function returns the path of the PNG it
wrote, or None when the results hold nothing to draw.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd

from ablate import stats
from ablate.config import first_ten
from ablate.results import TUNE_TARGETS_FILE, Results, check_statistics_columns, load_results, read_manifest

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = ("md", "html")
FIGURES_DIR = "figures"
TUNE_DIR = "tune"
MISSING = "n/a"


# -- content blocks -----------------------------------------------------------------------------
@dataclasses.dataclass
class Block:
    """One piece of report content. ``kind`` is "heading" (text, level), "text", "warning",
    "table" (a DataFrame of display strings) or "figure" (path, text = caption). Text and table cells
    are Markdown, with every name in them :func:`md_escape`d; :func:`render_html` shows them as plain text."""

    kind: str
    text: str = ""
    level: int = 2
    table: pd.DataFrame | None = None
    path: Path | None = None


def _heading(text: str, level: int = 2) -> Block:
    return Block("heading", text, level)


def _text(text: str) -> Block:
    return Block("text", text)


def _table(df: pd.DataFrame) -> Block:
    return Block("table", table=df)


def _figure(path: Path | None, caption: str) -> list[Block]:
    return [Block("figure", caption, path=path)] if path is not None else []


# -- number formatting --------------------------------------------------------------------------
def fmt_num(x: object, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; NaN/None/``pd.NA`` as "n/a" (and no "-0"). NaN of any
    float type: a numpy.float32 is no Python float (a float32 column's NaN printed "nan")."""
    if x is None or x is pd.NA or (isinstance(x, (float, np.floating)) and np.isnan(x)):
        return MISSING
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    text = f"{float(x):.{digits}g}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def fmt_pct(x: object) -> str:
    """A fraction as a signed percentage (0.0426 -> "+4.26%"), with as many more decimals as it
    takes for a non-zero value not to read as zero: its sign shows (-1e-7 -> "-0.00001%", not
    "+0.00%", which would put a CI bound below zero on the wrong side)."""
    if x is None or not np.isfinite(float(x)):
        return MISSING
    value = 100 * float(x)
    if value == 0:
        return "0.00%"
    for decimals in range(2, 10):
        text = f"{value:+.{decimals}f}"
        if float(text) != 0:
            return text + "%"
    return f"{value:+.2e}%"


def fmt_ci(mean: float, lo: float, hi: float, pct: bool = False) -> str:
    """``mean [lo, hi]``; just the mean when the interval is NaN (one seed)."""
    f = fmt_pct if pct else fmt_num
    if lo is None or np.isnan(lo):
        return f(mean)
    return f"{f(mean)} [{f(lo)}, {f(hi)}]"


def fmt_p(p: float, alpha: float = stats.ALPHA) -> str:
    """A p-value with three significant digits, or more where three would round it onto
    ``alpha`` (0.049957 is "0.04996", not "0.05" next to a significance mark)."""
    if p is None or np.isnan(p):
        return MISSING
    for digits in range(3, 8):
        text = f"{p:.{digits}g}"
        if (float(text) < alpha) == (p < alpha):
            return text
    return repr(float(p))


# -- display tables -----------------------------------------------------------------------------
def _seeds_cell(r: pd.Series, *unmatched: str) -> str:
    """``pairs (better)``, plus the ok seeds left out of the means because the other arm has none."""
    extra = sum(int(r[c]) for c in unmatched if c in r and pd.notna(r[c]))
    return f"{r['n_pairs']} ({r['n_better']})" + (f"; {extra} unpaired left out" if extra else "")


def table2_display(t2: pd.DataFrame, alpha: float = stats.ALPHA, *, name: Callable[[object], str] = str) -> pd.DataFrame:
    """Table 2 as display strings: AdamW and MetaAdamW mean [95% CI], relative improvement
    [95% CI], time change, p-values (not rounded onto ``alpha``, the level the table was computed
    with: see :func:`fmt_p`), pairs, significance and the trivial references. ``name``: how a name (task,
    arm, ...) is written into a cell: as it is, or :func:`md_escape` for the Markdown report."""
    rows = []
    for _, r in t2.iterrows():
        row = {
            "task": name(r["task"]),
            "metric": f"{name(r['metric'])} ({r['mode']})",
            "AdamW": fmt_ci(r["adamw_mean"], r["adamw_lo"], r["adamw_hi"]),
            "MetaAdamW": fmt_ci(r["meta_mean"], r["meta_lo"], r["meta_hi"]),
            "rel. improvement": fmt_ci(r["rel_mean"], r["rel_lo"], r["rel_hi"], pct=True),
            "time change": fmt_pct(r["time_change"]),
            "p (t)": fmt_p(r["p_t"], alpha),
            "p (sign-flip)": fmt_p(r["p_signflip"], alpha),
            "p (Holm)": fmt_p(r["p_holm"], alpha),
            "seeds (better)": _seeds_cell(r, "adamw_n_unmatched", "meta_n_unmatched"),
            "not ok (AdamW/Meta)": f"{r['adamw_n_not_ok']}/{r['meta_n_not_ok']}",
            "sig.": stats.significance_mark(r["significant"], r.get("withheld", False)),
        }
        row.update({name(c): fmt_num(r[c]) for c in t2.columns if c.startswith("ref_")})
        rows.append(row)
    return pd.DataFrame(rows)


def table3_display(t3: pd.DataFrame, alpha: float = stats.ALPHA, *, name: Callable[[object], str] = str) -> pd.DataFrame:
    """Table 3 as display strings: each arm against the baseline, asterisk where significant; an
    arm that ran the baseline's own trials says so instead of showing a zero difference. ``alpha``:
    the level the table was computed with (p-values are not rounded onto it, see :func:`fmt_p`).
    ``name``: how a name (task, arm, ...) is written into a cell: as it is, or
    :func:`md_escape` for the Markdown report."""
    rows = []
    for _, r in t3.iterrows():
        mark = stats.significance_mark(r["significant"], r.get("withheld", False))
        row = {"task": name(r["task"]), "axis": name(r["axis"]), "arm": name(r["arm"]) + (f" {mark}" if mark else "")}
        if r.get("same_as_baseline", False):
            same = "= baseline (same trials)"
            row.update({"arm mean": same, "baseline mean": fmt_num(r["baseline_mean"]), "rel. change vs baseline": same,
                        "p (t)": MISSING, "p (sign-flip)": MISSING, "p (Holm)": MISSING,
                        "seeds (better)": str(r["n_pairs"]), "not ok": str(r["n_not_ok"])})
        else:
            row.update({
                "arm mean": fmt_ci(r["arm_mean"], r["arm_lo"], r["arm_hi"]),
                "baseline mean": fmt_num(r["baseline_mean"]),
                "rel. change vs baseline": fmt_ci(r["rel_mean"], r["rel_lo"], r["rel_hi"], pct=True),
                "p (t)": fmt_p(r["p_t"], alpha),
                "p (sign-flip)": fmt_p(r["p_signflip"], alpha),
                "p (Holm)": fmt_p(r["p_holm"], alpha),
                "seeds (better)": _seeds_cell(r, "n_unmatched", "baseline_n_unmatched"),
                "not ok": str(r["n_not_ok"]),
            })
        rows.append(row)
    return pd.DataFrame(rows)


def factorial_display(effects: pd.DataFrame, alpha: float = stats.ALPHA, *,
                      name: Callable[[object], str] = str) -> pd.DataFrame:
    """Factorial effects as display strings (estimates in % of the task mean, positive = better;
    p-values not rounded onto ``alpha``, the level the effects were computed with: see :func:`fmt_p`).
    ``name``: how a name (task, arm, ...) is written into a cell: as it is, or
    :func:`md_escape` for the Markdown report."""
    return pd.DataFrame([
        {
            "kind": r["kind"],
            "term": name(r["term"]),
            "level": name(r["level"]) + (f" ({name(r['confounded'])})" if r.get("confounded") else "")
                     + (f" {mark}" if (mark := stats.significance_mark(r["significant"], r.get("withheld", False)))
                        else ""),
            "effect [95% CI]": (fmt_ci(r["estimate"], r["lo"], r["hi"], pct=True) if not r.get("aliased")
                                else f"aliased with {name(r['aliased'])}" if r["aliased"] != "not estimable"
                                else "not estimable in this design"),
            "p": fmt_p(r["p_value"], alpha),
            "p (Holm)": fmt_p(r["p_holm"], alpha),
        }
        for _, r in effects.iterrows()
    ])


def time_to_target_note(ttt: pd.DataFrame) -> str:
    """How many seeds with an AdamW result to reach MetaAdamW reached (:func:`ablate.stats.time_to_target`);
    "" when no seed has a target (a study without AdamW)."""
    targets = ttt[np.isfinite(ttt["target"].to_numpy(dtype=float))] if len(ttt) else ttt
    if not len(targets):
        return ""
    return (f"MetaAdamW reached AdamW's best on {int(targets['reached'].astype(bool).sum())} of the {len(targets)} "
            f"seed(s) with an AdamW result to reach (a MetaAdamW trial that diverged or failed did not).")


def time_to_target_display(ttt: pd.DataFrame, *, name: Callable[[object], str] = str) -> pd.DataFrame:
    """Time-to-target rows as display strings. ``name``: how a name (task, arm, ...) is written into a cell: as
    it is, or :func:`md_escape` for the Markdown report."""
    return pd.DataFrame([
        {
            "task": name(r["task"]),
            "seed": str(r["seed"]),
            "target (AdamW best)": fmt_num(r["target"]),
            "MetaAdamW reaches it at": (
                f"epoch {fmt_num(r['epoch'])}, step {fmt_num(r['step'], 8)}, {fmt_num(r['wall_s'])} s"
                if r["reached"] else name(r["note"])  # (it names trials and columns)
            ),
            "AdamW best at": (
                f"epoch {fmt_num(r['ref_epoch'])}, step {fmt_num(r['ref_step'], 8)}, {fmt_num(r['ref_wall_s'])} s"
                if np.isfinite(r["ref_wall_s"]) else MISSING
            ),
            "wall-time ratio": fmt_num(r["wall_ratio"], 3),
        }
        for _, r in ttt.iterrows()
    ])


def cost_display(cost: pd.DataFrame, *, name: Callable[[object], str] = str) -> pd.DataFrame:
    """Epochs, early stopping, total time and meta-update share per task and arm. ``name``: how a name (task,
    arm, ...) is written into a cell: as it is, or :func:`md_escape` for the Markdown report."""
    return pd.DataFrame([
        {
            "task": name(r["task"]),
            "arm": name(r["arm"]),
            "ok / not ok": f"{r['n_ok']} / {r['n_not_ok']}" + (
                f"; {int(r['n_unmatched'])} unpaired left out" if r.get("n_unmatched", 0) else ""),
            "epochs run": fmt_ci(r["epochs_mean"], r["epochs_lo"], r["epochs_hi"]),
            "stopped early": fmt_pct(r["early_stopped"]).lstrip("+"),
            "total time (s)": fmt_num(r["time_total_mean_s"]),
            "meta-update share": fmt_pct(r["meta_share"]).lstrip("+"),
        }
        for _, r in cost.iterrows()
    ])


def seeds_display(seeds: pd.DataFrame) -> pd.DataFrame:
    """Task x arm grid of ok seeds ("n_ok" or "n_ok (+k not ok)")."""
    if seeds.empty:
        return seeds
    cell = seeds["n_ok"].astype(str) + np.where(seeds["n_not_ok"] > 0, " (+" + seeds["n_not_ok"].astype(str) + " not ok)", "")
    grid = seeds.assign(cell=cell).pivot(index="arm", columns="task", values="cell").fillna("0")
    return grid.reset_index()


# -- figures ------------------------------------------------------------------------------------
#: the longest a name goes into a figure's file name (:func:`_slug`): the longest file name,
#: "alpha_beta_<task>_<arm>.png", stays well below the 255 bytes a file system allows
SLUG_MAX = 100


def _slug(text: str) -> str:
    """``text`` as part of a figure's file name: a name of letters, digits, "." and "-" (every built-in
    task, "baseline") as it is; any other - a task of a plugin, "my task", "ett/h1", "x_test" - with
    the characters a file name cannot hold replaced by "_" and a hash of the whole name appended.
    Replacing alone mapped "a b", "a/b", "a|b" and "a_b" onto one file (one task's figure drawn over
    another's, both report sections showing the last); and since a kept name has no "_", the names
    joined with "_" ("alpha_beta_<task>_<arm>", "ablation_<task>_test") cannot meet either. A name longer
    than :data:`SLUG_MAX` characters is cut to fit, with the hash: a file name holds 255 bytes at most, and a
    long task or arm name failed the whole report with "File name too long" at its first figure."""
    text = str(text)
    if re.fullmatch(r"[A-Za-z0-9.-]+", text) and len(text) <= SLUG_MAX:
        return text
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=4).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")[:SLUG_MAX - len(digest) - 1].rstrip("_")
    return f"{stem or 'x'}_{digest}"


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs) -> tuple[Figure, Any]:
    """A new figure and its axes, as ``pyplot.subplots`` gives them, but a bare
    :class:`matplotlib.figure.Figure` that pyplot never knows: figures here are files, never shown, so
    no backend is chosen, switched or forced (``matplotlib.use("Agg")`` turned a notebook's inline
    backend to Agg at the report's first figure: the notebook's own plots no longer showed), and
    none is closed. matplotlib is imported here, at the first figure, not with this module: it takes
    seconds, and ``ablate run``'s summary table (:func:`fmt_pct`) and the notebooks' tables draw none."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _save(fig: Figure, path: Path, outside: bool = False) -> Path:
    """``outside``: the figure has a legend outside its axes: the saved image grows to hold it
    (tight_layout would shrink the axes instead)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not outside:
        fig.tight_layout()
    fig.savefig(path, dpi=110, **({"bbox_inches": "tight"} if outside else {}))
    return path


#: above this many arms, the performance profile's legend goes beside the plot and its table
#: lists the arms as rows (one column per arm made lines of thousands of characters)
MANY_ARMS = 8


def _arm_trials(results: Results, task: str, arm: str) -> pd.DataFrame:
    arms = stats.explode_arms(results.ok().trials)
    if arms.empty:
        return arms
    return arms[(arms["task"] == task) & (arms["arm"] == arm)]


def plot_validation_curves(
    results: Results, task: str, out_dir: Path, arms: Sequence[str] = (stats.ADAMW, stats.BASELINE)
) -> Path | None:
    """Validation primary metric vs epoch for one task (:func:`ablate.stats.validation_curves`:
    per arm the mean over the matched seeds with a min-max band; the paper's Figures 1-5)."""
    curves = stats.validation_curves(results, task, arms)
    if curves.empty:
        return None
    metric, mode = stats.task_metric(results.trials, task)
    from matplotlib.ticker import MaxNLocator

    fig, ax = _subplots(figsize=(6, 4))
    for arm, g in curves.groupby("arm", sort=False):
        name = "MetaAdamW (baseline)" if arm == stats.BASELINE else "AdamW" if arm == stats.ADAMW else arm
        n, left_out = int(g["n"].iloc[0]), int(g["left_out"].iloc[0])
        ax.plot(g["epoch"], g["mean"], marker="o",
                label=f"{name} (n={n}" + (f"; {left_out} unmatched ok seed(s) left out)" if left_out else ")"))
        ax.fill_between(g["epoch"], g["min"], g["max"], alpha=0.2)
    ax.set(xlabel="epoch", ylabel=f"validation {metric} ({mode} is better)", title=f"{task}: validation {metric}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    return _save(fig, out_dir / f"curves_{_slug(task)}.png")


def plot_ablation_bars(t3: pd.DataFrame, task: str, out_dir: Path, suffix: str = "") -> Path | None:
    """Relative change vs baseline (%) of every non-factorial ablation arm of one task, with 95%
    CI error bars; significant arms are marked with an asterisk."""
    if t3.empty:
        return None
    rows = t3[(t3["task"] == task) & (t3["axis"] != "factorial")]
    if rows.empty or rows["rel_mean"].isna().all():  # (no arm has a comparison: no chart that reads as "no change")
        return None
    mean = 100 * rows["rel_mean"].to_numpy(dtype=float)
    err = 100 * np.abs(np.vstack([rows["rel_mean"] - rows["rel_lo"], rows["rel_hi"] - rows["rel_mean"]]).astype(float))
    fig, ax = _subplots(figsize=(max(5, 0.7 * len(rows) + 2), 4))
    x = np.arange(len(rows))
    ax.bar(x, mean, color=["C2" if m >= 0 else "C3" for m in mean])
    # an arm with one paired seed has no interval (the table shows its mean alone): a zero error bar with its
    # caps read as an interval of zero width, a change known exactly
    ci = np.isfinite(err).all(axis=0)
    if ci.any():
        ax.errorbar(x[ci], mean[ci], yerr=err[:, ci], fmt="none", ecolor="black", capsize=4)
    tops = mean + np.nan_to_num(err[1])  # (the error bars are >= 0; NaN for an arm without ok trials)
    withheld = rows["withheld"] if "withheld" in rows else [False] * len(rows)
    for xi, top, sig, held, m in zip(x, tops, rows["significant"], withheld, mean):
        if sig or held:
            ax.annotate(stats.significance_mark(sig, held), (xi, top), ha="center", va="bottom",
                        fontsize=16 if sig else 11)
        if not np.isfinite(m):  # (no matched ok seeds, or the baseline's own trials): not a zero change
            ax.annotate("n/a", (xi, 0), ha="center", va="bottom", fontsize=9, color="0.4")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.margins(y=0.15)
    ax.set_xlim(-0.6, len(rows) - 0.4)  # (an n/a arm at an end keeps its slot: NaN bars do not set the range)
    ax.set_xticks(x, rows["arm"], rotation=45, ha="right")
    split = f", {rows['split'].iloc[0]} split" if "split" in rows else ""
    ax.set_ylabel("change vs baseline (%)")
    ax.set_title(f"{task}: ablations{split}\n(+ = better, * = significant, (*) = withheld)", fontsize="medium")
    return _save(fig, out_dir / f"ablation_{_slug(task)}{suffix}.png")


def _telemetry_of(results: Results, task: str, arm: str) -> pd.DataFrame:
    """The telemetry of the arm's ok trials on ``task``, with each trial's seed (a seed may have several
    trials, of study versions loaded with ``all_trials=True``: the figures average them first, as the
    tables do, and count seeds, not trials)."""
    tel = results.ok().telemetry
    if tel.empty or "trial_id" not in tel:
        return pd.DataFrame()
    seeds = _arm_trials(results, task, arm).set_index("trial_id")["seed"]
    tel = tel[tel["trial_id"].isin(seeds.index)]
    return tel.assign(seed=tel["trial_id"].map(seeds))


def plot_alpha_beta(results: Results, task: str, out_dir: Path, arm: str = stats.BASELINE) -> Path | None:
    """Per-group learning-rate (alpha) and weight-decay (beta) multipliers vs step for one arm,
    averaged over its ok seeds at each meta-update, one line per parameter group."""
    tel = _telemetry_of(results, task, arm)
    if tel.empty or "alpha" not in tel:
        return None
    g = (tel.groupby(["group", "meta_update", "seed"])[["step", "alpha", "beta"]].mean()
         .groupby(["group", "meta_update"]).mean().reset_index())  # (a seed's several trials: their mean first)
    n_groups = g["group"].nunique()
    columns = -(-n_groups // 16)  # (legend columns of at most 16 entries, beside the axes)
    from matplotlib import colormaps

    tab20 = colormaps["tab20"]
    fig, axes = _subplots(1, 2, figsize=(11 + 2.2 * columns, 4.5), sharex=True)
    for k, (name, rows) in enumerate(g.groupby("group")):
        # 20 colours, then line styles: every group told apart (fine_grained gives up to 30 groups)
        style = {"color": tab20(k % 20), "linestyle": ("-", "--", ":")[k // 20 % 3]}
        for ax, col in zip(axes, ("alpha", "beta")):
            ax.plot(rows["step"], rows[col], label=str(name), **style)
    for ax, col, what in zip(axes, ("alpha", "beta"), ("learning-rate", "weight-decay")):
        ax.set(xlabel="step", ylabel=col, title=f"{what} multiplier {col}")
        # (multipliers near 1 - modulator_init=zero, a small alpha_range - would read as "-0.5 ... 4.5" with
        # matplotlib's "1e-5+1" offset, as the sigmas did)
        ax.ticklabel_format(axis="y", useOffset=False)
    axes[1].legend(fontsize="small" if n_groups <= 16 else "x-small", title="group", loc="upper left",
                   bbox_to_anchor=(1.02, 1.0), ncol=columns)
    n_seeds, n_trials = tel["seed"].nunique(), tel["trial_id"].nunique()
    fig.suptitle(f"{task} / {arm}: mean over {n_seeds} seeds"
                 + (f" ({n_trials} trials: the trials of a seed averaged first)" if n_trials > n_seeds else ""))
    return _save(fig, out_dir / f"alpha_beta_{_slug(task)}_{_slug(arm)}.png")


def plot_sigmas(results: Results, task: str, out_dir: Path, arm: str = stats.BASELINE) -> Path | None:
    """The uncertainty weighting's sigma of each objective term over meta-updates (mean over
    groups and ok seeds); None when the weighting has no sigmas."""
    tel = _telemetry_of(results, task, arm)
    cols = [c for c in tel.columns if c.startswith("sigma_")]
    if tel.empty or not cols or tel[cols].isna().all().all():
        return None
    g = tel.groupby(["meta_update", "seed"])[cols].mean().groupby("meta_update").mean()  # (seeds, as plot_alpha_beta)
    from matplotlib.ticker import MaxNLocator

    fig, ax = _subplots(figsize=(6, 4))
    for c in cols:
        if g[c].notna().any():
            ax.plot(g.index, g[c], label=c.removeprefix("sigma_"))
    ax.set(xlabel="meta-update", ylabel="sigma", title=f"{task} / {arm}: weighting sigmas")
    ax.ticklabel_format(axis="y", useOffset=False)  # (sigmas near 1 read as "-0.0001" with matplotlib's "+1" offset)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    return _save(fig, out_dir / f"sigmas_{_slug(task)}_{_slug(arm)}.png")


def plot_performance_profile(profile: pd.DataFrame, out_dir: Path) -> Path | None:
    """rho(tau) step curves, one per arm."""
    if profile.empty:
        return None
    n = len(profile.columns)
    fig, ax = _subplots(figsize=(6, 4 if n <= MANY_ARMS else max(4.0, 0.16 * n)))
    for k, arm in enumerate(profile.columns):  # styles, markers and narrowing widths: coinciding arms stay visible
        ax.step(profile.index, profile[arm], where="post", label=arm, linestyle=("-", "--", "-.", ":")[k % 4],
                marker="osD^v<>"[k % 7], markersize=4, markevery=(3 * k % 25, 25),
                linewidth=1 + 2.5 * (n - 1 - k) / max(n - 1, 1), alpha=0.85)
    ax.set(xlabel="tau (ratio to the best arm)", ylabel="share of tasks within tau", ylim=(-0.02, 1.02),
           title="performance profiles")
    if n <= MANY_ARMS:
        ax.legend(fontsize="small")
        return _save(fig, out_dir / "performance_profile.png")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, out_dir / "performance_profile.png", outside=True)


def plot_factorial_effects(effects: pd.DataFrame, out_dir: Path) -> Path | None:
    """Factorial main effects and interactions with 95% CI (in % of the task mean); effects a
    fractional design cannot estimate (aliased) are left out."""
    if "aliased" in effects:
        effects = effects[effects["aliased"].fillna("") == ""]
    if effects.empty:
        return None
    labels = effects["term"] + ": " + effects["level"]
    y = np.arange(len(effects))[::-1]
    est = 100 * effects["estimate"].to_numpy(dtype=float)
    err = 100 * np.abs(np.vstack([effects["estimate"] - effects["lo"], effects["hi"] - effects["estimate"]]).astype(float))
    fig, ax = _subplots(figsize=(7, 0.4 * len(effects) + 1.5))
    # an effect without an interval (no residual degrees of freedom: the table shows the estimate alone) gets a
    # marker and no error bar (one of zero width, with its caps, read as an effect known exactly)
    ci = np.isfinite(err).all(axis=0)
    ax.plot(est, y, "o", color="C0")
    if ci.any():
        ax.errorbar(est[ci], y[ci], xerr=err[:, ci], fmt="none", ecolor="C0", capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, labels)
    ax.set(xlabel="effect (% of task mean, + = better)", title="factorial effects")
    return _save(fig, out_dir / "factorial_effects.png")


def _by_task(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """One (task, rows) pair per task of a tune table (a table without a task column is one task)."""
    if "task" not in df:
        return [("", df)]
    return [(str(task), rows) for task, rows in df.groupby("task", sort=True)]


def _maximized(history: pd.DataFrame) -> bool:
    return "direction" in history and str(history["direction"].iloc[0]).lower().startswith("max")


def tune_best_so_far(history: pd.DataFrame) -> pd.Series:
    """The best objective value so far of one tuning study (rows in trial order), over its
    finished (COMPLETE) suggestions only: a pruned one's value - its last intermediate value, as
    Optuna stores it - is a partial-budget score and never the study's best."""
    done = history["value"]
    if "state" in history:
        done = done.where(history["state"].astype(str).str.upper() == "COMPLETE")
    return (done.cummax() if _maximized(history) else done.cummin()).ffill()


def plot_tune_history(history: pd.DataFrame, out_dir: Path) -> Path | None:
    """Each task's tuning study: the objective value per Optuna trial and the best so far (the
    study's ``direction`` column when present, else minimisation), one panel per task."""
    if history.empty or "value" not in history:
        return None
    groups = _by_task(history)
    from matplotlib.ticker import MaxNLocator

    fig, axes = _subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, (task, h) in zip(axes[0], groups):
        h = h.sort_values("number")
        maximize = _maximized(h)
        best = tune_best_so_far(h)
        pruned = h["state"].astype(str).str.upper() == "PRUNED" if "state" in h else pd.Series(False, index=h.index)
        ax.scatter(h["number"][~pruned], h["value"][~pruned], s=14, label="trial")
        if pruned.any():  # (a partial-budget value: not comparable with the finished ones)
            ax.scatter(h["number"][pruned], h["value"][pruned], s=14, facecolors="none", edgecolors="C0",
                       label="stopped early (value at that epoch)")
        ax.plot(h["number"], best, color="C1", drawstyle="steps-post", label="best so far")
        ax.set(xlabel="Optuna trial", ylabel=f"objective ({'maximised' if maximize else 'minimised'})",
               title=f"tuning study history{': ' + task if task else ''}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    return _save(fig, out_dir / "tune_history.png")


def plot_tune_importances(importances: pd.DataFrame, out_dir: Path) -> Path | None:
    """Hyperparameter importances of each task's tuning study as horizontal bars."""
    if importances.empty or not {"param", "importance"} <= set(importances.columns):
        return None
    groups = _by_task(importances)
    tallest = max(len(rows) for _, rows in groups)
    fig, axes = _subplots(1, len(groups), figsize=(6 * len(groups), 0.4 * tallest + 1.5), squeeze=False)
    for ax, (task, imp) in zip(axes[0], groups):
        imp = imp.sort_values("importance")
        ax.barh(imp["param"].astype(str), imp["importance"])
        ax.set(xlabel="importance", title=f"parameter importances{': ' + task if task else ''}")
    return _save(fig, out_dir / "tune_importances.png")


# -- report sections ----------------------------------------------------------------------------
def planned_arms(results_dir: Path) -> set[str]:
    """The arms of the study as last run (its manifest), stored results or not."""
    manifest = read_manifest(results_dir) or {}
    return {str(a) for labels in manifest.values() for a in stats.arm_list(labels.get("arms"), labels.get("arm")) if a}


def _intro(results: Results, results_dir: Path, planned_arms: set[str]) -> list[Block]:
    t = results.trials
    studies = ", ".join(md_escape(s) for s in sorted(map(str, t["study"].dropna().unique()))) if "study" in t else "?"
    arms = sorted(stats.explode_arms(t)["arm"].unique())
    counts = stats.status_counts(results)
    every = set(arms) | planned_arms
    with_adamw = stats.ADAMW in every
    kinds = [what for what, present in (
        ("arms '<axis>=<level>'", any(stats.is_ablation_arm(a) for a in every)),
        ("factorial cells 'factorial:...'", any(stats.arm_axis(a) == "factorial" for a in every))) if present]
    blocks = [
        _heading(f"Ablation report: {studies}", 1),
        _text(
            (f"This study has no MetaAdamW arm: it runs AdamW (arm {stats.ADAMW!r}) alone"
             if every == {stats.ADAMW} else
             f"This study {'compares' if with_adamw else 'has no AdamW arm: it runs'} MetaAdamW (arm 'baseline', "
             f"the task-optimal settings){' with AdamW (arm ' + repr(stats.ADAMW) + ')' if with_adamw else ''}"
             f"{' and ablates its components (' + ', '.join(kinds) + ')' if kinds else ''}")
            + ", over paired seeds: "
            f"matching seeds of one task share initialisation and data order. Results directory: {md_escape(results_dir)}. "
            f"Tasks: {', '.join(map(md_escape, sorted(t['task'].unique())))}. Arms: {', '.join(map(md_escape, arms))}."
        ),
        _text(
            f"Trials: {counts['total']} in all - {counts['ok']} ok, {counts['failed']} failed, "
            f"{counts['diverged']} diverged{_no_metric(counts)}. Only ok trials enter the statistics; every other "
            f"trial is listed under 'Failed and diverged trials'."
        ),
    ]
    if counts["total"] > counts["ok"]:
        blocks.append(Block("warning", f"{counts['total'] - counts['ok']} trial(s) did not finish ok "
                                       f"({counts['failed']} failed, {counts['diverged']} diverged{_no_metric(counts)}); "
                                       f"see the last section."))
    blocks += [Block("warning", md_message(note)) for note in stats.result_notes(results)]  # (they name tasks and arms)
    if stats.uses_embedded_data(results):
        blocks.append(Block("warning", "THESE RESULTS ARE ON EMBEDDED DATA: small offline stand-ins for the "
                                       "paper's datasets, with smaller models and budgets. They exercise the "
                                       "pipeline; they say nothing about the paper's claims."))
    blocks += [_heading("Data sources", 3), _table(_md_frame(stats.data_sources(results))),
               _heading("Ok seeds per arm", 3), _table(_md_frame(seeds_display(stats.seeds_per_arm(results))))]
    return blocks


_SIG_LEGEND = (
    "Means with 95% t confidence intervals over the matched seeds (those both arms finished ok; "
    "an ok seed the other arm lacks is left out of both means and counted in 'seeds (better)' as "
    "'unpaired left out'). "
    "Relative change is computed per seed "
    "and signed so that positive = better ((ref - new)/|ref| for 'min' metrics, (new - ref)/|ref| "
    "for 'max'). p-values are two-sided paired tests of the per-seed differences: a t-test (p (t), "
    "not adjusted for the many comparisons, and marking nothing) and an "
    "exact sign-flip permutation test (Monte Carlo beyond 16 seeds). p (Holm) is the sign-flip p "
    "adjusted by Holm's method over {family}, and * marks p (Holm) < {alpha}. "
    "With n paired seeds the smallest attainable sign-flip p is 2/2^n (0.0625 for 5 seeds, 0.03125 "
    "for 6), before the adjustment; a row whose smallest attainable p is not below {alpha} ({too_few}) is not "
    "counted in the family and its p (Holm) reads n/a (Tarone's rule for discrete tests): it "
    "cannot be significant whatever the differences, and counting it would only raise the other rows' p (Holm). "
    "'seeds (better)' is the number of pairs and how many of them favour the arm. "
    "(*): p (Holm) < {alpha}, but not marked significant because the arm the difference favours has no ok "
    "result (diverged, failed, not run yet) on some seed the other arm finished: the paired test cannot count "
    "that seed, and the win is on the seeds it finished."
)


#: the fewest paired seeds that can reach alpha (in :mod:`ablate.stats`, which ``ablate run``'s start note uses too)
fewest_seeds_reaching = stats.fewest_seeds_reaching


def sig_legend(alpha: float, family: str) -> str:
    """The significance legend of Tables 2 and 3 (:data:`_SIG_LEGEND`) for ``alpha`` and the Holm
    ``family``, saying how many paired seeds leave a row out of its family at that alpha (5 or
    fewer at 0.05, 4 at 0.1, 7 at 0.01), not at 0.05 whatever the report's alpha."""
    fewest = fewest_seeds_reaching(alpha)
    too_few = (f"here: {fewest - 1} paired seed(s) or fewer" if fewest and fewest > 1
               else "here: no row" if fewest else "here: every row")
    return _SIG_LEGEND.format(alpha=alpha, family=family, too_few=too_few)


def too_few_seeds_note(n_pairs: pd.Series, alpha: float = stats.ALPHA) -> str:
    """A sentence when no row can be significant: with n pairs the smallest sign-flip p is 2/2^n
    (1/(1 + draws) beyond the exact test's seeds)."""
    n = int(pd.to_numeric(n_pairs, errors="coerce").max()) if len(n_pairs) and n_pairs.notna().any() else 0
    if n == 0 or stats.smallest_sign_flip_p(n) < alpha:
        return ""
    fewest = fewest_seeds_reaching(alpha)
    return (f" With at most {n} paired seed(s) here the smallest sign-flip p is {stats.smallest_sign_flip_p(n):.4g}, not "
            f"below {alpha}: no row of this table can be marked significant, whatever the differences"
            + (f" (it takes {fewest} seeds or more, before Holm's adjustment)." if fewest else "."))


def absent_arms_note(results: Results, t3: pd.DataFrame, planned: set[str] = frozenset(), split: str = "validation") -> str:
    """The ablation arms of the study with no row for some task of this table (no trial, or none
    to compare there), named: they leave the table, its figure and the Holm family. ``planned``:
    :func:`planned_arms` of the results directory. Markdown: the names :func:`md_escape`d."""
    arms = {a for a in set(stats.explode_arms(results.trials)["arm"]) | set(planned) if stats.is_ablation_arm(a)}
    tasks = stats.tasks_with_test_split(results) if split == "test" else sorted(results.trials["task"].unique())
    shown = set(zip(t3["task"], t3["arm"]))
    absent = [f"{md_escape(task)} {md_escape(arm)}" for task in tasks for arm in sorted(arms) if (task, arm) not in shown]
    return (f" Not in this table (no trial of the arm on that task with a result to compare): {first_ten(absent)}."
            if absent else "")


def _no_metric(counts: dict[str, int]) -> str:
    n = counts.get("no_metric", 0)
    return f", {n} with status ok but no finite metric" if n else ""


_SPLIT_NOTE = {
    "validation": "The metric is the best validation metric of each trial: the split that early stopping and "
                  "MetaAdamW's meta-objectives saw.",
    "test": "The metric is the held-out test metric at each trial's best weights (test_<metric>): a split that "
            "neither early stopping nor the meta-objectives saw. Only the tasks whose split has a test part; "
            "'not ok' also counts ok trials without a finite test metric.",
}


def undefined_relative_note(t: pd.DataFrame) -> str:
    """The sentence for a table (:func:`ablate.stats.table2`, :func:`~ablate.stats.table3`) whose
    relative change is n/a where it compares (a reference of 0), with a leading space; else "" (Markdown: the
    tasks :func:`md_escape`d)."""
    tasks = sorted(set(t.loc[t["rel_mean"].isna() & t["diff_mean"].notna(), "task"])) if len(t) else []
    return (f" The relative change is n/a on {', '.join(map(md_escape, tasks))}: the reference's metric is 0 on a paired seed, where "
            f"it is undefined." if tasks else "")


def table2_comparable(t2: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The rows of :func:`ablate.stats.table2` with something to compare (tasks on which both AdamW
    and MetaAdamW finished an ok trial), and a sentence naming the others with their counts (with a
    leading space; "" when none is left out; Markdown, the tasks :func:`md_escape`d). The report and the notebook
    show Table 2 this way."""
    if t2.empty:
        return t2, ""
    both = (((t2["adamw_n"] + t2["adamw_n_unmatched"]) > 0) & ((t2["meta_n"] + t2["meta_n_unmatched"]) > 0)).to_numpy()
    left_out = "".join(
        f" Left out: {md_escape(r['task'])} (AdamW {r['adamw_n'] + r['adamw_n_unmatched']} ok seed(s), {r['adamw_n_not_ok']} not "
        f"ok; MetaAdamW {r['meta_n'] + r['meta_n_unmatched']} ok seed(s), {r['meta_n_not_ok']} not ok)."
        for _, r in t2[~both].iterrows()
        if r["adamw_n"] + r["adamw_n_unmatched"] + r["adamw_n_not_ok"] + r["meta_n"] + r["meta_n_unmatched"]
        + r["meta_n_not_ok"])  # (a task that neither arm ran is no news)
    return t2[both], left_out


#: what Table 2 says when no task has both arms ok
NOTHING_TO_COMPARE = "No task on which both the 'adamw' and the 'baseline' arm have an ok trial: nothing to compare."


def _table2_section(results: Results, fig_dir: Path, alpha: float, split: str = "validation") -> list[Block]:
    heading = _heading(f"MetaAdamW vs AdamW (Table 2 analogue, {split} split)")
    # a task one of the two never finished ok has nothing to compare: named, with its counts
    t2, left_out = table2_comparable(stats.table2(results, alpha=alpha, split=split))
    if t2.empty:
        blocks = [heading, _text(NOTHING_TO_COMPARE + left_out + (" " + _SPLIT_NOTE[split] if split == "test" else ""))]
        if split == "validation":  # (a study without AdamW, or without the baseline: the curves of the one that ran)
            ok = results.ok().trials
            for task in sorted(ok["task"].unique()) if len(ok) else []:
                blocks += _figure(plot_validation_curves(results, task, fig_dir),
                                  f"{md_escape(task)}: validation metric per epoch of the arm that ran, mean over its seeds with "
                                  f"min-max band (a seed that stopped early leaves later epochs to the seeds still running)")
        return blocks
    blocks = [heading, _table(table2_display(t2, alpha, name=md_escape)),
              _text(_SPLIT_NOTE[split] + " " + sig_legend(alpha, "the tasks of this table")
                    + too_few_seeds_note(t2["n_pairs"], alpha)
                    + " Time change is MetaAdamW's summed trial time (training, meta-updates and evaluation) over "
                      "the matched seeds relative to AdamW's: positive = slower, unlike the other columns"
                    # (not "ref_*": that "*" closed an emphasis the legend's "(*)" opened, the text between in italics)
                    + "; columns named ref_... are trivial references (on this split)." + undefined_relative_note(t2) + left_out)]
    if split == "validation":
        for task in t2["task"]:
            blocks += _figure(plot_validation_curves(results, task, fig_dir),
                              f"{md_escape(task)}: validation metric per epoch, mean over the matched seeds with min-max band "
                              f"(a seed that stopped early leaves later epochs to the seeds still running)")
    return blocks


def _table3_section(results: Results, fig_dir: Path, alpha: float, split: str = "validation",
                    planned_arms: set[str] = frozenset()) -> list[Block]:
    t3 = stats.table3(results, alpha=alpha, split=split)
    heading = _heading(f"Ablations (Table 3 analogue, {split} split)")
    if t3.empty:
        if split != "validation":
            return []
        waiting = sorted(a for a in planned_arms if stats.is_ablation_arm(a))
        return [heading, _text(f"No ablation arm has a stored result to compare yet "
                               f"({', '.join(map(md_escape, waiting))}: see the "
                               f"warning about the trials without a stored result)." if waiting
                               else "No ablation arms in this study.")]
    blocks = [heading, _table(table3_display(t3, alpha, name=md_escape)),
              _text("Each arm against the MetaAdamW baseline over matched seeds. * = significant "
                    "difference. '= baseline (same trials)': the arm's level is the baseline's, so the study "
                    "ran it once for both. " + _SPLIT_NOTE[split] + " "
                    + sig_legend(alpha, "the ablation arms of each task" + (
                        ", its factorial cells a family of their own" if (t3["axis"] == "factorial").any() else ""))
                    + too_few_seeds_note(table3_compared_pairs(t3), alpha)
                    + undefined_relative_note(t3) + absent_arms_note(results, t3, planned_arms, split))]
    for task in sorted(t3["task"].unique()):
        caption = f"{md_escape(task)}: ablation arms vs baseline, 95% CI" + ("" if split == "validation" else ", test split")
        blocks += _figure(plot_ablation_bars(t3, task, fig_dir, suffix="" if split == "validation" else "_test"),
                          caption)
    return blocks


def table3_compared_pairs(t3: pd.DataFrame) -> pd.Series:
    """The paired-seed counts of the rows of :func:`ablate.stats.table3` that compare (not the
    arms whose level is the baseline's own), for :func:`too_few_seeds_note`."""
    return t3["n_pairs"][~t3["same_as_baseline"].astype(bool)] if "same_as_baseline" in t3 else t3["n_pairs"]


def _test_split_sections(results: Results, fig_dir: Path, alpha: float,
                         planned_arms: set[str] = frozenset()) -> list[Block]:
    """Tables 2 and 3 again on the held-out test metric, where some task has a test split
    (``planned_arms``: as for the validation Table 3, an arm without a stored trial is named)."""
    if not stats.tasks_with_test_split(results):
        return []
    return (_table2_section(results, fig_dir, alpha, "test")
            + _table3_section(results, fig_dir, alpha, "test", planned_arms=planned_arms))


def _factorial_section(results: Results, fig_dir: Path, alpha: float) -> list[Block]:
    effects = stats.factorial_effects(results, alpha=alpha)
    if effects.empty:
        return []
    return [
        _heading("Factorial effects"),
        _text("Least-squares fit on effect-coded factors of the per-task normalised metric "
              "(sign * (m - task mean) / |task mean|, positive = better). Main effects are each "
              "level's deviation from the grand mean; interactions are products of non-reference "
              "levels. Each (task, seed) is a block with its own effect: the cells of a seed share its "
              "initial weights and data order, so differences between seeds are not counted as noise. "
              "In a fractional design an interaction the design confounds with a main effect is not "
              "fitted ('aliased with ...'): the main effects are estimated assuming it is negligible; a fitted "
              "effect that stands for unfitted ones names them with their signs, e.g. 'grouping=original (- A x B)' "
              "(its estimate is its own effect plus that signed sum). "
              f"p (Holm) adjusts p over the fitted effects; * marks p (Holm) < {alpha}, shown (*) - not "
              f"marked - where a cell the effect favours has no ok result on a seed where other cells have one "
              f"(the fit cannot count a divergence, so the effect would rest on the seeds that cell survived). "
              f"Observations: {int(effects['n'].iloc[0])}." + factorial_missing_note(results)),
        _table(factorial_display(effects, alpha, name=md_escape)),
        *_figure(plot_factorial_effects(effects, fig_dir), "factorial effects with 95% CI"),
    ]


def factorial_missing_note(results: Results) -> str:
    """The cell-seeds the factorial fit leaves out, named (the first ten), and what the main effects
    are then: the legend's "deviation from the grand mean" holds in a balanced design only (see
    :func:`ablate.stats.factorial_effects`). Markdown: the names :func:`md_escape`d."""
    missing = stats.factorial_missing(results)
    if missing.empty:
        return ""
    names = [f"{md_escape(r.arm[len(stats.FACTORIAL_PREFIX):])} on {md_escape(r.task)} seed {r.seed} ({r.status})"
             for r in missing.itertuples()]
    return (f" Left out of the fit, {len(names)} cell-seed(s) without an ok result where other cells of the seed "
            f"have one: {first_ten(names)}. With them missing, a main effect is the least-squares estimate adjusted "
            f"for the seeds and the other factors, not the deviation of the level's raw mean from the grand mean.")


def _ratio_cell(v: float) -> str:
    """A profile ratio with four decimals ("1.0000" for the best arm), or as many more as it takes
    for another arm's ratio not to read as the best's (1.00004 is "1.00004", not "1.0000")."""
    if not np.isfinite(v):
        return "inf"
    if abs(v - 1) < stats.TIE:  # the best arm, or tied with it up to rounding (as stats.profile_ratios counts it)
        return "1.0000"
    for decimals in range(4, 12):
        text = f"{v:.{decimals}f}"
        if float(text) != 1:
            return text
    return repr(float(v))


def _profile_section(results: Results, fig_dir: Path) -> list[Block]:
    ratios = stats.profile_ratios(results)
    notes = [md_message(note) for note in stats.profile_notes(results)]  # (they name tasks and arms)
    if ratios.empty:  # (every task left out: say why)
        return [_heading("Performance profiles"), _text("No task to profile: " + "; ".join(notes) + ".")] if notes else []
    shown = ratios.map(_ratio_cell)
    shown = (shown.T.rename_axis("arm") if len(ratios.columns) > MANY_ARMS else shown).reset_index()
    return [
        _heading("Performance profiles"),
        _text("Per task, each arm's mean best metric relative to the best arm's: arm/best for 'min' "
              "metrics, best/arm for 'max' metrics (1 = best, larger = worse; inf = no ok trial). "
              "Means are over the seeds every arm finished ok. "
              "rho(tau) is the share of tasks whose ratio is at most tau."
              + ("" if not notes else " " + "; ".join(notes) + ".")),
        _table(_md_frame(shown)),
        *_figure(plot_performance_profile(stats.performance_profile(results), fig_dir), "performance profiles"),
    ]


def _cost_section(results: Results) -> list[Block]:
    ttt = stats.time_to_target(results)
    blocks = [_heading("Cost")]
    reached = time_to_target_note(ttt)
    if reached:  # (a study without AdamW has no target)
        blocks += [_heading("Time to AdamW's best", 3),
                   _text(f"{reached} Per seed, the first "
                         "epoch at which MetaAdamW's validation metric reaches the best validation metric of AdamW's "
                         "trial of the same seed; wall seconds are cumulative and include the meta-updates. The "
                         "wall-time ratio is MetaAdamW's seconds to the target over AdamW's seconds to its best: "
                         "below 1, MetaAdamW got there sooner. A seed with several ok trials of an arm (study "
                         "versions mixed) takes the mean of its trials' best metrics as the target and the mean of "
                         "each trial's own time for both arms (reached only if every trial of the seed reached it)."),
                   _table(time_to_target_display(ttt, name=md_escape))]
    blocks += [_heading("Epochs, early stopping and meta-update share", 3),
               _table(cost_display(stats.cost_table(results), name=md_escape)),
               _text("Means over the arm's paired seeds (a seed with several ok trials counting once, with their "
                     "mean): 'epochs run' with its 95% t interval, 'total time "
                     "(s)' the mean of each trial's training, meta-update and evaluation time, 'meta-update share' the "
                     "mean of each trial's meta-update time over its total, 'stopped early' the share of trials early "
                     "stopping ended before their epoch budget. Means pair the arms as Tables 2 and 3 do: each arm over the seeds it and the "
                     "baseline both finished ok, the baseline over those it and AdamW both finished ok; 'unpaired left "
                     "out' in 'ok / not ok' counts an arm's ok trials outside those seeds.")]
    return blocks


def _telemetry_section(results: Results, fig_dir: Path) -> list[Block]:
    blocks = []
    for task in sorted(results.trials["task"].unique()):
        blocks += _figure(plot_alpha_beta(results, task, fig_dir),
                          f"{md_escape(task)}: per-group alpha and beta (baseline arm)")
        blocks += _figure(plot_sigmas(results, task, fig_dir), f"{md_escape(task)}: weighting sigmas (baseline arm)")
    if not blocks:
        arms = stats.explode_arms(results.trials)
        baseline = set(arms.loc[arms["arm"] == stats.BASELINE, "trial_id"]) if len(arms) else set()
        ok = set(results.ok().trials["trial_id"]) if len(results.trials) else set()
        tel = results.telemetry
        recorded = set(tel["trial_id"]) & baseline if len(tel) and "trial_id" in tel else set()
        if baseline and not baseline & ok:  # (telemetry of trials that diverged or failed is not drawn)
            why = (f"No ok trial of the baseline arm, whose telemetry is drawn: its {len(baseline)} trial(s) diverged "
                   f"or failed" + (f" ({len(recorded)} with telemetry recorded before they ended, left out as every "
                                   f"statistic leaves them out)." if recorded else "."))
        elif not baseline:
            why = "No trial of the baseline arm (MetaAdamW) is stored: no telemetry to draw."
        else:
            why = "No telemetry recorded for the baseline arm."
        return [_heading("Meta-parameter trajectories"), _text(why)]
    return [_heading("Meta-parameter trajectories"), *blocks]


def tune_states(history: pd.DataFrame, planned: Sequence[str] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per task of a tuning study's history: how many suggestions ended in each state, and the
    best finished value (trial number and value); and every suggestion that did not finish, with
    why (its ``ended`` record: diverged, stopped by the scheduler, the error, interrupted).
    ``planned``: the run's targets; one without a stored suggestion (its search did not start, or was cut
    off before one finished or failed) is a row saying so."""
    not_started = [{"task": key, "suggestions": 0, "complete": 0, "stopped early": 0, "fail": 0, "running": 0,
                    "best": "no suggestion stored"} for key in planned
                   if "task" not in history or key not in set(history["task"].astype(str))]
    if history.empty or not {"state", "value"} <= set(history.columns):  # (a history written by other code)
        return pd.DataFrame(not_started), pd.DataFrame()
    rows = []
    for task, h in _by_task(history):
        states = h["state"].astype(str).str.upper()
        row = {"task": task, "suggestions": len(h)}
        for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING"):
            row[state.lower() if state != "PRUNED" else "stopped early"] = int((states == state).sum())
        done = h[states == "COMPLETE"].dropna(subset=["value"])
        chosen = done[done["chosen"].eq(True)] if "chosen" in done else done.iloc[:0]
        if len(chosen):  # the suggestion `ablate tune` wrote to the best-values file
            row["best"] = f"{chosen['value'].iloc[0]:.6g} (#{int(chosen['number'].iloc[0])})"
        elif len(done):  # (a history from before the chosen column: the same rule, applied here)
            best = done.loc[done["value"].idxmax() if _maximized(h) else done["value"].idxmin()]
            own = done[done["baseline"].astype(bool)] if "baseline" in done else done.iloc[:0]
            ties = own[[stats.tuning_tie(v, best["value"], task == "cross_task") for v in own["value"]]]
            if len(ties):  # (as `ablate tune` picks it: a tie goes to the searched arm's own values)
                best = ties.iloc[0]
            row["best"] = f"{best['value']:.6g} (#{int(best['number'])})"
        else:
            row["best"] = "none finished"
        rows.append(row)
    rows += not_started
    unfinished = history[history["state"].astype(str).str.upper() != "COMPLETE"]
    cols = [c for c in ("task", "number", "state", "ended", "epochs") if c in unfinished]
    unfinished = unfinished[cols].sort_values(cols[:2]).reset_index(drop=True)
    if "epochs" in unfinished:  # (a suggestion that reported no epoch - a crash, an interrupt - has none: not "nan")
        unfinished["epochs"] = [int(e) if pd.notna(e) else "none" for e in unfinished["epochs"]]
    return pd.DataFrame(rows), unfinished


def tune_targets(tune: Path) -> list[str]:
    """The targets the last `ablate tune` run into this folder had (none known: an older folder)."""
    try:
        keys = json.loads((tune / TUNE_TARGETS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(k) for k in keys] if isinstance(keys, list) else []


def _tune_section(results_dir: Path, fig_dir: Path) -> list[Block]:
    tune = results_dir / TUNE_DIR
    blocks, history = [], pd.DataFrame()
    if (tune / "history.parquet").exists():
        history = pd.read_parquet(tune / "history.parquet")
        counts, unfinished = tune_states(history, tune_targets(tune))
        if len(counts):
            blocks += [_table(_md_frame(counts))]
        if len(unfinished):
            blocks += [_text("Suggestions that did not finish (never candidates for the best values):"),
                       _table(_md_frame(unfinished))]
        blocks += _figure(plot_tune_history(history, fig_dir), "tuning study history")
        searched = sorted(c[len("params_"):] for c in history.columns if str(c).startswith("params_"))
        if searched:
            arm = str(history["arm"].iloc[0]) if "arm" in history else "baseline"  # (older histories: baseline)
            blocks.insert(0, _text(f"`ablate tune` searched the {md_escape(arm)} arm's "
                                   f"{', '.join(map(md_escape, searched))}."))
    if (tune / "importances.parquet").exists():
        importances = pd.read_parquet(tune / "importances.parquet")
        blocks += _figure(plot_tune_importances(importances, fig_dir), "tuning study parameter importances")
        note = missing_importances_note(history, importances)
        if note:
            blocks += [_text(note)]
    return [_heading("Tuning study (Optuna)"), *blocks] if blocks else []


def missing_importances_note(history: pd.DataFrame, importances: pd.DataFrame) -> str:
    """The sentence naming the tuned tasks without parameter importances ("" when none; Markdown: the tasks
    :func:`md_escape`d)."""
    if "task" not in history:
        return ""
    lacking = sorted(set(history["task"].astype(str)) - set(importances.get("task", pd.Series(dtype=str)).astype(str)))
    # (of the suggestions drawn from the search space as last run, see ablate.tune.study_importances: after a range
    # change a task with many finished suggestions may have fewer than two of those)
    return (f"No parameter importances for {', '.join(map(md_escape, lacking))}: fewer than two finished suggestions "
            f"drawn from the search space as last run (where a range changed between runs, those drawn from an "
            f"earlier one do not count), or scores that do not vary with the searched values (fANOVA has nothing to "
            f"attribute; `ablate tune` says which)." if lacking else "")


def _failed_section(results: Results) -> list[Block]:
    failed = stats.failed_summary(results)
    blocks = [_heading("Failed and diverged trials")]
    if failed.empty:
        return blocks + [_text("None: every trial finished ok.")]
    counts = stats.status_counts(results)
    return blocks + [
        _text(f"{len(failed)} trial(s) are excluded from every statistic above ({counts['failed']} failed, "
              f"{counts['diverged']} diverged{_no_metric(counts)}). 'error' is the first line of the message (for a traceback, "
              f"its final exception line)."),
        _table(_md_frame(failed)),
    ]


def build_blocks(results: Results, results_dir: Path, fig_dir: Path, *, alpha: float = stats.ALPHA,
                 progress: Callable[[str], None] = lambda _: None) -> list[Block]:
    """Every section of the report, in order, drawing figures into ``fig_dir`` on the way."""
    planned = planned_arms(results_dir)
    blocks = _intro(results, results_dir, planned)
    steps = [
        ("Table 2", lambda: _table2_section(results, fig_dir, alpha)),
        ("Table 3", lambda: _table3_section(results, fig_dir, alpha, planned_arms=planned)),
        ("test split", lambda: _test_split_sections(results, fig_dir, alpha, planned)),
        ("factorial effects", lambda: _factorial_section(results, fig_dir, alpha)),
        ("performance profiles", lambda: _profile_section(results, fig_dir)),
        ("cost", lambda: _cost_section(results)),
        ("telemetry figures", lambda: _telemetry_section(results, fig_dir)),
        ("tuning study", lambda: _tune_section(results_dir, fig_dir)),
        ("failed trials", lambda: _failed_section(results)),
    ]
    for name, make in steps:
        progress(f"  {name}")
        blocks += make()
    return blocks


# -- rendering ----------------------------------------------------------------------------------
#: a "<" that a Markdown renderer would take for the start of an HTML tag ("<axis>", "<metric>"):
#: the tag would be passed through and the text between the angle brackets not shown
_MD_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


#: the characters Markdown (GitHub's included) gives a meaning to inside a line: emphasis, code, links and
#: images, HTML tags and entities, strikethrough, math, table cells, and the backslash that escapes them
_MD_SPECIAL = frozenset("\\`*_[]<>|~&$")


def md_escape(name: object) -> str:
    """A name users chose (a task, arm, axis, level, parameter, study, path, error text) as Markdown shows it
    literally: each character of :data:`_MD_SPECIAL` backslash-escaped, line breaks as spaces. Unescaped,
    "a*b*" rendered as "a" and an italic "b", "lr=[x|y]" split its table row, and a "]" ended a figure's
    alt text. An "_" between two letters or digits stays as it is: it cannot start or end emphasis, and
    "gating_true" or "p_gradient" read better without a backslash. Every string the report builds (block
    text, table cells) is Markdown with its names escaped this way; :func:`render_html` turns the escapes back
    (:func:`_unescape`). Numbers need no escaping and the report's own text is left as it is."""
    text = " ".join(str(name).splitlines())
    return "".join(
        "\\" + c if c in _MD_SPECIAL and not (c == "_" and 0 < i < len(text) - 1 and text[i - 1].isalnum()
                                                and text[i + 1].isalnum()) else c
        for i, c in enumerate(text))


#: a `code` span of a message (:func:`md_message`), as ablate writes them: opened at the start or after a space,
#: "(" or a quote, closed before the end, a space or punctuation, no space just inside. A backtick in a name
#: ("x`y", "a`") is none of these: paired with the next backtick of the message, it turned the text between
#: into code and left that span's own closing backtick unpaired.
_MESSAGE_CODE = re.compile(r"((?<![^\s(\"'])`[^`\s](?:[^`\n]*[^`\s])?`(?=[\s).,;:!?'\"]|$))")


def md_message(message: object) -> str:
    """A message of another module (a warning, a note of :mod:`ablate.stats`) that names tasks, arms and files
    in plain text, as Markdown: :func:`md_escape`d outside its `code` spans (commands to run,
    :data:`_MESSAGE_CODE`), which stay code. The report's warnings and the analysis notebook's show them so."""
    parts = _MESSAGE_CODE.split(" ".join(str(message).splitlines()))
    return "".join(part if k % 2 else md_escape(part) for k, part in enumerate(parts))


def _md_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A table of names and plain strings (no Markdown of its own), every cell and label :func:`md_escape`d."""
    return df.rename(columns=md_escape).astype(str).map(md_escape) if len(df.columns) else df


def _unescape(text: object) -> str:
    """Markdown built with :func:`md_escape` as plain text (for HTML): a backslash before ASCII punctuation
    dropped, as a Markdown renderer drops it."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", str(text))


def _md_text(value: object) -> str:
    """Text as Markdown shows it literally: a "<" that would start a tag backslash-escaped, outside code
    spans (inside them the backslash would show) and where not escaped already (:func:`md_escape`: a name's
    escaped backtick starts no code span)."""
    parts = re.split(r"(\\.|`[^`\n]+`)", str(value))
    return "".join(part if k % 2 else _MD_TAG_START.sub(r"\\<", part) for k, part in enumerate(parts))


def _md_cell(value: object) -> str:
    # (a "|" a name brought in is escaped already: one backslash more would show, and end the cell)
    return _md_text(re.sub(r"(?<!\\)((?:\\\\)*)\|", r"\1\\|", str(value)).replace("\n", " "))


def df_to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no index)."""
    if df.empty:
        return "_(no rows)_"
    header = "| " + " | ".join(_md_cell(c) for c in df.columns) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def render_markdown(blocks: Sequence[Block], out_dir: Path) -> str:
    """The report as Markdown; figures are linked relative to ``out_dir``."""
    parts = []
    for b in blocks:
        if b.kind == "heading":
            parts.append("#" * b.level + " " + _md_text(b.text))
        elif b.kind == "text":
            parts.append(_md_text(b.text))
        elif b.kind == "warning":
            parts.append(f"> **WARNING: {_md_text(b.text)}**")
        elif b.kind == "table":
            parts.append(df_to_markdown(b.table))
        elif b.kind == "figure":
            caption = _md_text(b.text)
            parts.append(f"![{caption}]({b.path.relative_to(out_dir).as_posix()})\n\n*{caption}*")
    return "\n\n".join(parts) + "\n"


_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
    "td,th{border:1px solid #bbb;padding:3px 6px;text-align:left}"
    ".warning{background:#fdd;border:2px solid #c00;padding:0.7em;font-weight:bold}"
    "img{max-width:100%}"
)


def render_html(blocks: Sequence[Block], title: str) -> str:
    """The report as one self-contained HTML page (figures embedded as base64 PNG)."""
    parts = []
    for b in blocks:
        if b.kind == "heading":
            parts.append(f"<h{b.level}>{html.escape(_unescape(b.text))}</h{b.level}>")
        elif b.kind == "text":
            parts.append(f"<p>{html.escape(_unescape(b.text))}</p>")
        elif b.kind == "warning":
            parts.append(f'<div class="warning">WARNING: {html.escape(_unescape(b.text))}</div>')
        elif b.kind == "table":
            table = b.table.rename_axis(index=None, columns=None)  # (a pivot's names: a column of their own in HTML)
            table = table.rename(columns=_unescape).map(_unescape)  # (its names md_escape'd: as plain text)
            parts.append(table.to_html(index=False, escape=True, border=0) if len(table) else "<p><i>(no rows)</i></p>")
        elif b.kind == "figure":
            data, caption = base64.b64encode(b.path.read_bytes()).decode("ascii"), html.escape(_unescape(b.text))
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                         f"<figcaption>{caption}</figcaption></figure>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(_unescape(title))}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def no_trials_error(results_dir: str | Path) -> Exception:
    """The error for a results directory with no stored trial to report (the report and the notebook raise it)."""
    from ablate.config import ConfigError

    return ConfigError(f"{results_dir} holds no trials yet; nothing to report (run the study first, or wait "
                       f"for its first trial to finish)")


def write_report(
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    formats: Sequence[str] = FORMATS,
    alpha: float = stats.ALPHA,
    progress: Callable[[str], None] = lambda _: None,
) -> Path:
    """Write ``report.md`` and/or ``report.html`` and ``figures/*.png`` for a results directory.

    ``out_dir`` defaults to ``<results_dir>/report``. Returns the path of the Markdown report
    (the HTML one when only "html" is asked for). ``progress`` receives one line per step.
    """
    if isinstance(formats, str):  # formats="md"
        formats = [formats]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ValueError(f"unknown report format(s) {unknown or list(formats)}; choose from {', '.join(FORMATS)}")
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results_dir / "report"
    progress(f"loading results from {results_dir}")
    tune_only = (results_dir / TUNE_DIR / "history.parquet").exists() and not (
        (results_dir / "parts").exists() or (results_dir / "trials.parquet").exists())
    if tune_only:  # `ablate tune` alone: its history and importances
        fig_dir = out / FIGURES_DIR
        fig_dir.mkdir(parents=True, exist_ok=True)
        blocks = [_heading(f"Tuning study: {md_escape(results_dir.name)}", 1),
                  _text(f"Results directory {md_escape(results_dir)} holds an Optuna tuning study (`ablate tune`) and no "
                        f"study trials (`ablate run`)."), *_tune_section(results_dir, fig_dir)]
        return _write(blocks, out, formats, progress)
    with warnings.catch_warnings(record=True) as caught:  # (trials left out, damaged parts): also in the report
        warnings.simplefilter("always")
        results = load_results(results_dir)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if results.trials.empty:
        raise no_trials_error(results_dir)
    check_statistics_columns(results.trials, results_dir)
    fig_dir = out / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    progress("computing tables and drawing figures")
    with warnings.catch_warnings(record=True) as computing:  # (the caller's filters apply: "error" raises, ...)
        blocks = build_blocks(results, results_dir, fig_dir, alpha=alpha, progress=progress)
    package = Path(__file__).parent
    issued = set()
    for w in computing:  # (as they were, once each: with their module, for the caller's filters by module)
        if (str(w.message), w.category) not in issued:
            issued.add((str(w.message), w.category))
            module = f"ablate.{Path(w.filename).stem}" if Path(w.filename).parent == package else None
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, module=module)
    # the statistics' own warnings (duplicate seeds averaged) also in the report, once each; not
    # matplotlib's or numpy's (a missing glyph, a division by zero), which name ablate's lines too
    computed = dict.fromkeys(str(w.message) for w in computing if issubclass(w.category, stats.StatsWarning))
    blocks[1:1] = ([Block("warning", f"Loading the results: {md_message(w.message)}") for w in caught]  # (they name
                   + [Block("warning", md_message(message)) for message in computed])  # files, tasks, arms)
    return _write(blocks, out, formats, progress)


#: the file names the ``plot_*`` functions give their figures (:func:`_write` removes those this report did not draw)
_FIGURE_NAME = re.compile(r"(?:curves|ablation|alpha_beta|sigmas)_.+\.png"
                          r"|(?:performance_profile|factorial_effects|tune_history|tune_importances)\.png")


def _write(blocks: list[Block], out: Path, formats: Sequence[str], progress: Callable[[str], None]) -> Path:
    """Write the report files, then remove the figures of an earlier report into ``out`` that this one did not
    draw (a task or arm the study no longer has, a chart with nothing to show now): left in ``figures/``, they
    read as this report's. Only the file names the report gives its figures (:data:`_FIGURE_NAME`) are removed."""
    written = {}
    if "md" in formats:
        written["md"] = out / "report.md"
        written["md"].write_text(render_markdown(blocks, out), encoding="utf-8")
    if "html" in formats:
        written["html"] = out / "report.html"
        written["html"].write_text(render_html(blocks, blocks[0].text), encoding="utf-8")
    drawn = {b.path.name for b in blocks if b.kind == "figure"}
    for figure in sorted((out / FIGURES_DIR).glob("*.png")):
        if figure.name not in drawn and _FIGURE_NAME.fullmatch(figure.name):
            figure.unlink(missing_ok=True)
    for path in written.values():
        progress(f"wrote {path}")
    return written.get("md", written.get("html"))


def report_command(results_dir: str, out: str | None) -> Path:
    """``ablate report RESULTS_DIR [--out OUT]``: write the report, printing progress lines."""
    path = write_report(results_dir, out, progress=lambda line: print(line, flush=True))
    print(f"report: {path}", flush=True)
    return path
