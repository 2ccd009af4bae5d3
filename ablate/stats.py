"""Statistics on a study's result tables: confidence intervals, paired tests, the paper's
tables, factorial effects, cost and performance profiles.

Every function here is a pure function of DataFrames (or arrays) and returns a DataFrame or a
dict; :mod:`ablate.report` renders them.

Conventions
-----------
* Arms: a trial may serve several arms; the ``arms`` column holds a JSON list of them (the
  ``arm`` column alone when ``arms`` is missing). :func:`explode_arms` gives one row per
  (trial, arm). The AdamW reference arm is ``"adamw"``, the MetaAdamW baseline ``"baseline"``,
  ablation arms ``"<axis>=<level>"`` and factorial cells ``"factorial:<axis>=<level>,..."``.
* Pairing: trials of the same task and seed share initialisation and data order, so arms are
  compared over matched seeds (paired differences).
* Direction: ``mode`` is ``"min"`` or ``"max"``. A *relative change* of ``new`` against
  ``ref`` is signed so that positive means better: ``(ref - new) / |ref|`` for "min" and
  ``(new - ref) / |ref|`` for "max" (for positive metrics this is the paper's
  ``(b_adamw - b_meta) / b_adamw``; ETTh1 MSE 0.006147 -> 0.005885 gives +4.26%).
* Differences: paired differences are ``arm - reference`` in raw metric units; the p-values
  (paired t-test and exact sign-flip permutation test, both two-sided) test them against 0.
* Failed trials: only trials with ``status == "ok"`` (and a finite best metric) enter statistics. Every table that
  aggregates trials says what it left out - ``n_not_ok`` counts (the factorial effects: ``n_missing``
  cell-seeds; the performance profiles: :func:`profile_notes`) - and :func:`failed_summary` lists
  every trial whose status is not "ok", so nothing is dropped silently.
"""

from __future__ import annotations

import itertools
import math
import json
import re
import warnings
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ablate.results import Results, ok_mask

ADAMW = "adamw"
BASELINE = "baseline"
FACTORIAL_PREFIX = "factorial:"


class StatsWarning(UserWarning):
    """Something about the stored results the statistics had to work around (seeds averaged, ...):
    ``ablate report`` shows these in the report too."""


ALPHA = 0.05
CONFIDENCE = 0.95
#: largest number of pairs for which the sign-flip test enumerates all 2^n flips
EXACT_SIGN_FLIP_MAX_N = 16
#: random sign vectors drawn by the Monte Carlo sign-flip test (beyond EXACT_SIGN_FLIP_MAX_N)
SIGN_FLIP_DRAWS = 20_000
#: relative difference below which two values are equal up to the rounding of their sums
#: (means of the same seeds' metrics summed in another order, differences of rounded inputs)
TIE = 1e-12


# -- elementary statistics --------------------------------------------------------------------
def _student_t():
    """``scipy.stats.t``, imported at the first interval or test, not with this module: scipy.stats
    takes seconds, which ``ablate tune`` (its tie rule) and ``ablate run`` would pay at start-up."""
    from scipy import stats as sps

    return sps.t


def mean_ci(values: Iterable[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean and two-sided t confidence interval of ``values`` (non-finite values - NaN, inf -
    ignored, as the paired tables drop them: one would make the interval NaN).

    Returns ``{"mean", "lo", "hi", "sd", "n"}`` (``n``: the finite values); with one value the
    interval is NaN, with none the mean is NaN too.
    """
    x = np.asarray(list(values), dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    mean = float(x.mean()) if n else np.nan
    if n < 2:
        return {"mean": mean, "lo": np.nan, "hi": np.nan, "sd": np.nan, "n": n}
    sd = float(x.std(ddof=1))
    half = float(_student_t().ppf(0.5 + confidence / 2, n - 1)) * sd / np.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "n": n}


def _tie_tolerance(d: np.ndarray, scale: float | None) -> float:
    """How far apart two sums of the differences ``d`` may be and still be equal: :data:`TIE`
    relative to ``scale``, the size of the values they are differences of (their rounding, ~1e-16
    of it, is in them: 357.1234 - 357.1134 is not 0.01 to 1e-12 of 0.01), else of ``d``."""
    return TIE * (scale if scale is not None and np.isfinite(scale) else float(np.abs(d).max()))


def paired_t_pvalue(diffs: Sequence[float], scale: float | None = None) -> float:
    """Two-sided one-sample t-test of the paired differences against 0 (NaN for n < 2).

    Identical non-zero differences give p = 0 (an infinite t), all-zero differences p = 1; equal
    up to the rounding of the values they are differences of (of magnitude ``scale``, default the
    differences' own) counts as identical.
    """
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n < 2 or not np.isfinite(d).all():
        return np.nan
    mean, sd = d.mean(), d.std(ddof=1)
    tol = _tie_tolerance(d, scale)
    if sd <= tol:  # identical up to rounding (0.9 - 1.0 and 1.0 - 1.1): no t of float noise
        return 1.0 if abs(mean) <= tol else 0.0  # (rounding noise around 0 is no difference)
    t = mean / (sd / np.sqrt(n))
    return float(2 * _student_t().sf(abs(t), n - 1))


def sign_flip_pvalue(
    diffs: Sequence[float],
    *,
    exact_max_n: int = EXACT_SIGN_FLIP_MAX_N,
    draws: int = SIGN_FLIP_DRAWS,
    seed: int = 0,
    scale: float | None = None,
) -> float:
    """Two-sided sign-flip permutation p-value of the mean paired difference.

    Under the null hypothesis each difference is equally likely to have either sign. The p-value
    is the share of sign vectors whose |mean| is at least the observed |mean|: exact over all
    2^n vectors for n <= ``exact_max_n``, otherwise Monte Carlo with ``draws`` vectors from a
    fixed ``seed`` (reported as (1 + hits) / (1 + draws)). The smallest attainable exact value is
    2 / 2^n when no difference is 0, e.g. 2/64 = 0.03125 for 6 pairs and 0.0625 for 5 (a zero
    difference's sign does not count: 2 / 2^(number of non-zero differences)). NaN for n = 0 and for non-finite
    differences (a NaN would otherwise compare as never reached and give p = 0). Means equal up to
    rounding (:func:`_tie_tolerance`, with ``scale`` the size of the values differenced) tie.
    """
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0 or not np.isfinite(d).all():
        return np.nan
    observed = abs(d.mean())
    tol = _tie_tolerance(d, scale)  # rounding of the sums, relative: metrics of any scale (MSE 1e-11)
    if n <= exact_max_n:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ d / n) >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(draws, n))
    hits = int(np.sum(np.abs(signs @ d / n) >= observed - tol))
    return (1 + hits) / (1 + draws)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate;
    valid under any dependence). NaNs stay NaN and are not counted in the family."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = len(idx)
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adjusted, 1.0)
    return out


def relative_change(ref: Sequence[float] | float, new: Sequence[float] | float, mode: str) -> np.ndarray:
    """Signed relative change of ``new`` against ``ref``; positive means ``new`` is better."""
    ref, new = np.asarray(ref, dtype=float), np.asarray(new, dtype=float)
    if mode == "min":
        return (ref - new) / np.abs(ref)
    if mode == "max":
        return (new - ref) / np.abs(ref)
    raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


def mean_relative_change(ref: Sequence[float], new: Sequence[float], mode: str,
                         confidence: float = CONFIDENCE) -> dict[str, float]:
    """:func:`mean_ci` of the per-pair :func:`relative_change` of matched finite pairs; all NaN
    where ``ref`` is 0 on some pair (undefined there; a mean over the other pairs would describe
    other seeds than the pairs' other statistics)."""
    with np.errstate(divide="ignore", invalid="ignore"):  # (ref 0: +-inf, or NaN for 0/0)
        rel = relative_change(ref, new, mode)
    if np.isfinite(rel).all():
        return mean_ci(rel, confidence)
    return {"mean": np.nan, "lo": np.nan, "hi": np.nan, "sd": np.nan, "n": len(rel)}


def paired_comparison(
    ref: Sequence[float], new: Sequence[float], mode: str, confidence: float = CONFIDENCE
) -> dict[str, float]:
    """Compare ``new`` with ``ref`` over matched pairs (equal-length arrays, same seed order).

    Returns the mean paired difference ``new - ref`` and its CI (``diff_*``), the mean per-pair
    relative change (positive = better, see :func:`relative_change`) and its CI (``rel_*``), the
    paired t-test and sign-flip p-values, the number of pairs and how many pairs ``new`` wins.
    Pairs with a non-finite value are left out (and not counted). The relative change is NaN
    where ``ref`` is 0 on some pair (:func:`mean_relative_change`).
    """
    ref, new = np.asarray(ref, dtype=float), np.asarray(new, dtype=float)
    if ref.shape != new.shape:
        raise ValueError(f"paired arrays differ in length: {len(ref)} vs {len(new)}")
    keep = np.isfinite(ref) & np.isfinite(new)
    ref, new = ref[keep], new[keep]
    diff = new - ref
    d, r = mean_ci(diff, confidence), mean_relative_change(ref, new, mode, confidence)
    scale = float(max(np.abs(ref).max(), np.abs(new).max())) if len(ref) else None
    return {
        "diff_mean": d["mean"],
        "diff_lo": d["lo"],
        "diff_hi": d["hi"],
        "rel_mean": r["mean"],
        "rel_lo": r["lo"],
        "rel_hi": r["hi"],
        "p_t": paired_t_pvalue(diff, scale),
        "p_signflip": sign_flip_pvalue(diff, scale=scale),
        "n_pairs": len(diff),
        "n_better": int(np.sum(diff > 0 if mode == "max" else diff < 0)),  # (the sign of the relative change)
    }


# -- arms, statuses and the study's make-up -----------------------------------------------------
def arm_list(arms: object, arm: str) -> list[str]:
    """The arms a trial serves: its ``arms`` JSON list (or list), else ``[arm]``."""
    if isinstance(arms, str) and arms:
        return list(json.loads(arms))
    if isinstance(arms, (list, tuple, np.ndarray)):
        return list(arms)
    return [arm]


#: columns the statistics read, with the value assumed where a trials table lacks them (a study
#: whose every trial failed early may have written little more than ids, statuses and errors)
EXPECTED_COLUMNS = {
    "metric": "?", "mode": "min", "best_metric": np.nan, "best_epoch": np.nan, "epochs_run": np.nan,
    "stop_reason": "", "time_total_s": np.nan, "time_meta_s": np.nan,
}


def explode_arms(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (trial, arm) from the ``arms`` JSON list (or ``arm`` when it is missing), with
    every column of :data:`EXPECTED_COLUMNS` present."""
    if trials.empty:
        return trials.assign(arm=pd.Series(dtype=object))
    out = trials.assign(**{c: v for c, v in EXPECTED_COLUMNS.items() if c not in trials})
    listed = out["arms"] if "arms" in out else [None] * len(out)
    out["arm"] = [arm_list(a, arm) for a, arm in zip(listed, out["arm"])]
    return out.explode("arm", ignore_index=True)


def is_ablation_arm(arm: str) -> bool:
    """A one-factor ablation arm (``"<axis>=<level>"``): not AdamW, the baseline or a factorial cell."""
    return arm_axis(arm) not in ("factorial", ADAMW, BASELINE)


def arm_axis(arm: str) -> str:
    """The ablation axis an arm name belongs to ("factorial", "<axis>", or the arm itself)."""
    if arm.startswith(FACTORIAL_PREFIX):
        return "factorial"
    return arm.split("=", 1)[0] if "=" in arm else arm


def _ok(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[ok_mask(trials)] if len(trials) else trials


def _not_ok(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[~ok_mask(trials)] if len(trials) else trials


def status_counts(results: Results) -> dict[str, int]:
    """Number of trials per status, always with the keys "ok", "failed", "diverged", "no_metric"
    (status "ok" but a non-finite best metric: not ok for the statistics, and not in "ok") and
    "total"."""
    counts = {"ok": 0, "failed": 0, "diverged": 0, "no_metric": 0}
    trials = results.trials
    if len(trials):
        counts.update({str(k): int(v) for k, v in trials["status"].value_counts().items()})
        counts["no_metric"] = int(((trials["status"] == "ok") & ~ok_mask(trials)).sum())
        counts["ok"] -= counts["no_metric"]
    counts["total"] = int(len(trials))
    return counts


def without_meta_updates(results: Results) -> pd.DataFrame:
    """The ok MetaAdamW trials that made no meta-update (their budget ended before the first):
    their modulator stayed as initialised, so they differ from AdamW by its initial multipliers
    alone. Columns: task, arm, n."""
    t = results.trials
    if t.empty or "meta_updates" not in t or "optimizer" not in t:
        return _counted(t.iloc[:0])
    idle = ok_mask(t) & (t["optimizer"] == "metaadamw") & (pd.to_numeric(t["meta_updates"], errors="coerce") == 0)
    return _counted(t[idle])


def _counted(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials counted per task and arm (columns task, arm, n), for the notes below."""
    if trials.empty:
        return pd.DataFrame(columns=["task", "arm", "n"])
    return trials.groupby(["task", "arm"], sort=True).size().rename("n").reset_index()


def _listed(counts: pd.DataFrame) -> str:
    """``"task arm: n, ..."`` of :func:`_counted`'s counts."""
    return ", ".join(f"{r.task} {r.arm}: {r.n}" for r in counts.itertuples())


def idle_note(idle: pd.DataFrame) -> str:
    """What :func:`without_meta_updates` found, in words."""
    return (f"{int(idle['n'].sum())} ok MetaAdamW trial(s) made no meta-update ({_listed(idle)}): their budget "
            f"ended before the first (warmup_epochs, then one every meta_every steps or meta_per_epoch times per epoch), so their "
            f"modulator stayed as initialised and they differ from AdamW and from each other by its initial "
            f"multipliers alone. Give them more steps, fewer warm-up epochs or more frequent meta-updates.")


def best_not_recorded_best(results: Results) -> pd.DataFrame:
    """The ok trials whose ``best_metric`` is not the best validation value their history recorded:
    stored before the best epoch became the best value (ce49eab; until then an improvement smaller
    than ``min_delta`` was neither the best nor reported), so a comparison with newer trials mixes
    two rules. Columns: task, arm, n."""
    t, h = results.trials, results.history
    if t.empty or h.empty or "trial_id" not in h or not {"metric", "mode"} <= set(t.columns):
        return _counted(t.iloc[:0])
    ok = t[ok_mask(t)]
    stale = []
    for (metric, mode), rows in ok.groupby(["metric", "mode"]):
        column = f"val_{metric}"
        if column not in h:
            continue
        values = pd.to_numeric(h[column], errors="coerce")
        recorded = (values.groupby(h["trial_id"]).max() if mode == "max" else values.groupby(h["trial_id"]).min())
        best = recorded.reindex(rows["trial_id"]).to_numpy(dtype=float)
        stored = pd.to_numeric(rows["best_metric"], errors="coerce").to_numpy(dtype=float)
        sign = 1.0 if mode == "max" else -1.0
        worse = sign * (best - stored) > 1e-9 * np.maximum(np.abs(best), np.abs(stored))  # (NaN: no history, kept)
        stale.append(rows[worse])
    return _counted(pd.concat(stale) if stale else ok.iloc[:0])


def best_rule_note(stale: pd.DataFrame) -> str:
    """What :func:`best_not_recorded_best` found, in words."""
    return (f"{int(stale['n'].sum())} ok trial(s) report a best metric that is not the best validation value they "
            f"recorded ({_listed(stale)}): they were stored by an earlier version of ablate, whose best epoch ignored gains "
            f"smaller than min_delta, and compare under another rule than the trials stored since. Run them again: "
            f"`ablate run STUDY --rerun TASK` (or `--rerun ARM`, `--rerun all`).")


def result_notes(results: Results) -> list[str]:
    """The warnings about stored results that the report, the run summary and the analysis notebook
    show: MetaAdamW trials without a meta-update, trials stored under the earlier best-epoch rule."""
    idle, stale = without_meta_updates(results), best_not_recorded_best(results)
    notes = [idle_note(idle)] if len(idle) else []
    if len(stale):
        notes.append(best_rule_note(stale))
    return notes


def smallest_sign_flip_p(n: int) -> float:
    """The smallest p :func:`sign_flip_pvalue` can give for n non-zero differences: 2/2^n exact,
    1/(1 + draws) beyond :data:`EXACT_SIGN_FLIP_MAX_N`."""
    return 2 / 2**n if n <= EXACT_SIGN_FLIP_MAX_N else 1 / (1 + SIGN_FLIP_DRAWS)


def can_reach(n: int, alpha: float = ALPHA) -> bool:
    """Whether a sign-flip test of ``n`` pairs can give p < ``alpha`` at all (its smallest p,
    :func:`smallest_sign_flip_p`, is below alpha): the rows that count in a Holm family
    (:func:`_holm_family`). False for n = 0 and, at alpha = 0.05, for n <= 5."""
    return n >= 1 and smallest_sign_flip_p(n) < alpha


def fewest_seeds_reaching(alpha: float = ALPHA) -> int | None:
    """The fewest paired seeds whose smallest sign-flip p (:func:`smallest_sign_flip_p`) is below
    ``alpha`` (6 at 0.05, 5 at 0.1, 8 at 0.01); None where no count reaches it (an alpha at or
    below the Monte Carlo test's smallest p). The report's legends and ``ablate run``'s start note
    (:func:`too_few_seeds_to_test`) say it."""
    return next((k for k in range(1, EXACT_SIGN_FLIP_MAX_N + 2) if can_reach(k, alpha)), None)


def fewest_seeds_for_family(k: int, alpha: float = ALPHA) -> int | None:
    """The fewest paired seeds with which one of a Holm family of ``k`` comparisons can be significant
    at ``alpha``: Holm's first step needs the smallest p, 2/2^n at best (:func:`smallest_sign_flip_p`),
    below alpha/k (6 for one comparison at 0.05, 8 for 5, 10 for 20); None where no count reaches it.
    (Every row of such a family has as many seeds, so Tarone's rule leaves none of them out.)"""
    return fewest_seeds_reaching(alpha / max(k, 1))


def too_few_seeds_to_test(n_seeds: int, arms: Iterable[str], alpha: float = ALPHA, n_tasks: int = 1) -> str:
    """A note for a study about to run ``n_seeds`` seeds of ``arms`` (its arm names) on ``n_tasks``
    tasks when a table of its report can mark no paired difference significant at ``alpha``,
    whatever the results: Table 2 compares the baseline with AdamW on each task, Holm-adjusted over
    the tasks (:func:`table2`), Table 3 with each ablation arm, Holm-adjusted over a task's arms, and
    with each factorial cell, Holm-adjusted over a task's cells, a family of their own
    (:func:`table3`), by sign-flip tests over the seeds, whose smallest p is 2/2^n
    (:func:`fewest_seeds_for_family`). ``""`` where every family's seeds can reach alpha, or the study
    compares no arm with the baseline. The count of arms is the study's: on a task where an arm
    equals the baseline (run once for both) the family is smaller."""
    arms = set(arms)
    ablations = sorted(a for a in arms if a not in (BASELINE, ADAMW) and arm_axis(a) != "factorial")
    cells = sorted(a for a in arms if arm_axis(a) == "factorial")
    families = []  # (the table, in words; its family size)
    if BASELINE in arms and ADAMW in arms:
        families.append((f"Table 2 (the baseline against AdamW on {n_tasks} task(s))", n_tasks))
    # (Table 3's two families named apart where both are there: one may reach alpha, the other not)
    ablation_family = "Table 3's ablation family" if cells else "Table 3"
    if BASELINE in arms and ablations:
        families.append((f"{ablation_family} (the baseline against {len(ablations)} ablation arm(s) per task)",
                         len(ablations)))
    if BASELINE in arms and cells:
        families.append((f"Table 3's factorial family (the baseline against {len(cells)} factorial cell(s) per task, "
                         f"Holm-adjusted apart from the ablation arms)", len(cells)))
    short = [(table, fewest_seeds_for_family(k, alpha)) for table, k in families]
    short = [(table, need) for table, need in short if need is None or n_seeds < need]
    if not short:
        return ""
    needs = [need for _, need in short if need is not None]
    factorial = any(arm_axis(a) == "factorial" for a in arms)
    return (f"with {n_seeds} seed(s) no paired difference in {' or '.join(t.split(' (')[0] for t, _ in short)} of the "
            f"report can be significant at {alpha}, whatever the results: the smallest sign-flip p of {n_seeds} paired "
            f"seed(s) is {smallest_sign_flip_p(n_seeds):.4g}, and Holm's adjustment over a table's k comparisons "
            f"needs it below {alpha}/k. "
            + "; ".join(f"{table} takes {need} seeds or more" if need is not None else f"{table}: no seed count does"
                        for table, need in short)
            + (f": {max(needs) - n_seeds} more than this run has (`seeds:` in the study file, or --extra-seeds)"
               if needs else "")
            + (" (the factorial design's effects, fitted over its cells, can be significant with fewer)."
               if factorial else "."))


def seeds_per_arm(results: Results) -> pd.DataFrame:
    """Per task and arm: ok seeds, trials that are not ok, and the ok seed list."""
    arms = explode_arms(results.trials)
    if arms.empty:
        return pd.DataFrame(columns=["task", "arm", "n_ok", "n_not_ok", "seeds"])
    rows = []
    for (task, arm), g in arms.groupby(["task", "arm"], sort=True):
        ok = _ok(g)
        rows.append(
            {
                "task": task,
                "arm": arm,
                "n_ok": int(ok["seed"].nunique()),
                "n_not_ok": int(len(_not_ok(g))),
                "seeds": ",".join(str(s) for s in sorted(ok["seed"].unique())),
            }
        )
    return pd.DataFrame(rows)


def data_sources(results: Results) -> pd.DataFrame:
    """Per task, data kind and data source: the number of trials."""
    t = results.trials
    if t.empty:
        return pd.DataFrame(columns=["task", "data", "data_source", "n_trials"])
    cols = [c for c in ("task", "data", "data_source") if c in t]
    t = t[cols].copy()
    if "data_source" in t:  # a trial that failed before loading its data has none: its task's, where it has one
        only = t.groupby(cols[:-1])["data_source"].transform(lambda s: s.dropna().iloc[0] if s.nunique() == 1 else None)
        t["data_source"] = t["data_source"].fillna(only)
    out = t.fillna("?").groupby(cols).size().rename("n_trials").reset_index()
    for c in ("data", "data_source"):
        if c not in out:
            out[c] = "?"
    return out[["task", "data", "data_source", "n_trials"]]


def uses_embedded_data(results: Results) -> bool:
    """True when any trial ran on the embedded stand-in for a paper dataset: a built-in task's
    ``data_source`` "embedded:..." (a task of a plugin records its own data source; its key
    ``data: embedded`` says only that it ran on its default data). Results stored without a
    ``data_source`` column are judged by ``data``."""
    t = results.trials
    if t.empty:
        return False
    if "data_source" in t:
        return bool(t["data_source"].astype(str).str.startswith("embedded").any())
    return bool("data" in t and (t["data"].astype(str) == "embedded").any())


def error_summary(text: object) -> str:
    """The last non-empty line of a traceback (the exception; also of Ray's "Failure # 1 (occurred
    at ...)" error texts, which start with that header), or the first line of a message. The
    ``note: ...`` lines a run puts before a failed trial's error (a checkpoint set aside:
    :func:`ablate.sweep._with_notes`) are not the error: a dead process's text, which holds no
    ``File "...`` line, was summed up as its note."""
    if not isinstance(text, str) or not text.strip():
        return ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    lines = list(itertools.dropwhile(lambda ln: ln.startswith("note: "), lines)) or lines
    traceback = lines[0].startswith(("Traceback", "Failure #")) or any(ln.startswith('File "') for ln in lines)
    return lines[-1] if traceback else lines[0]


def failed_summary(results: Results) -> pd.DataFrame:
    """Every trial that is not ok (status not "ok", or a non-finite best metric): id, task, arms, seed, status, stop reason and the
    error's first line (for a traceback, its final exception line)."""
    cols = ["trial_id", "task", "arms", "seed", "status", "stop_reason", "error"]
    bad = _not_ok(results.trials)
    if bad.empty:
        return pd.DataFrame(columns=cols)
    rows = [
        {
            "trial_id": r["trial_id"],
            "task": r.get("task"),
            "arms": ", ".join(arm_list(r.get("arms"), r["arm"])),
            "seed": r.get("seed"),
            "status": r["status"],
            "stop_reason": r.get("stop_reason", ""),
            "error": error_summary(r.get("error", "")) or (
                f"best_metric is {r.get('best_metric')} (not finite)" if r["status"] == "ok" else ""),
        }
        for _, r in bad.iterrows()
    ]
    return pd.DataFrame(rows, columns=cols).sort_values(["task", "arms", "seed"], kind="stable").reset_index(drop=True)


# -- paired tables ------------------------------------------------------------------------------
def task_metric(trials: pd.DataFrame, task: str) -> tuple[str, str]:
    """The primary metric name and its mode ("min" | "max") of a task (from its ok trials if any)."""
    rows = trials[trials["task"] == task]
    ok = _ok(rows)
    src = ok if len(ok) else rows

    def first(column: str) -> str:
        values = src[column].dropna() if column in src else []
        return str(values.iloc[0]) if len(values) else EXPECTED_COLUMNS[column]

    return first("metric"), first("mode")


def _shared_seeds(task: str, arm: str, ok: pd.DataFrame) -> str:
    """The warning that ``arm``'s ok trials ``ok`` on ``task`` share seeds (one text wherever the
    statistics average them per seed, so that the report shows it once)."""
    return (f"{task}, arm {arm}: several trials share a seed ({len(ok)} trials, {ok['seed'].nunique()} seeds); "
            f"their values are averaged per seed. Are results of different study versions mixed "
            f"(load_results(..., all_trials=True))?")


def _per_seed(arms: pd.DataFrame, task: str, arm: str, column: str = "best_metric") -> pd.Series:
    """Ok trials' ``column`` per seed for one task and arm (several trials of one seed - results
    loaded with ``all_trials=True`` across versions of a study - are averaged, with a warning)."""
    g = arms[(arms["task"] == task) & (arms["arm"] == arm) & ok_mask(arms)]
    if g["seed"].duplicated().any():
        warnings.warn(_shared_seeds(task, arm, g), StatsWarning, stacklevel=3)
    if column not in g:
        return pd.Series(dtype=float)
    # (an ok trial always has a finite best metric; a test metric may be missing, or inf - an
    # overflowed perplexity - which :func:`_n_not_ok` counts as left out)
    return g[_finite(g[column])].groupby("seed")[column].mean()


def _finite(values: pd.Series) -> np.ndarray:
    """Where ``values`` are finite numbers (NaN, inf and what is not a number: False)."""
    return np.isfinite(pd.to_numeric(values, errors="coerce").to_numpy(dtype=float))


def _n_not_ok(arms: pd.DataFrame, task: str, arm: str, column: str = "best_metric") -> int:
    """Trials of ``arm`` on ``task`` that give no value of ``column``: not ok, or ok without a finite
    one (a test metric the trial's split has no test part for, or one that overflowed)."""
    has = ok_mask(arms) & (_finite(arms[column]) if column in arms else False)
    return int(((arms["task"] == task) & (arms["arm"] == arm) & ~has).sum())


def _matched(arms: pd.DataFrame, task: str, ref_arm: str, arm: str, column: str = "best_metric"
             ) -> tuple[pd.Series, pd.Series, int, int]:
    """Both arms' per-seed values over the seeds both finished ok, and how many ok seeds each arm
    has that the other lacks (left out of its mean, so that the two means describe the same
    seeds). When they share no seed, both are empty and every ok seed is left out: means over
    different seeds would read as a comparison."""
    ref, new = _per_seed(arms, task, ref_arm, column), _per_seed(arms, task, arm, column)
    seeds = ref.index.intersection(new.index).sort_values()
    return ref.loc[seeds], new.loc[seeds], len(ref) - len(seeds), len(new) - len(seeds)


def _compare(ref: pd.Series, new: pd.Series, mode: str, confidence: float = CONFIDENCE) -> dict:
    if not ref.index.equals(new.index):  # no matched seed
        ref, new = ref.iloc[:0], new.iloc[:0]
    return paired_comparison(ref.to_numpy(), new.to_numpy(), mode, confidence)


#: ``ablate tune`` scores this close are ties (float rounding, as when the searched values change
#: nothing), and a tie goes to the searched arm's own values: relative for a task's metric, absolute
#: for a cross-task score (a relative improvement over AdamW, which sits near 0)
TUNING_TIE_TOL = 1e-6


def tuning_tie(value: float, best: float, cross_task: bool) -> bool:
    """Whether a tuning score ``value`` ties with the ``best`` one (see :data:`TUNING_TIE_TOL`)."""
    return abs(value - best) <= TUNING_TIE_TOL * (1.0 if cross_task else abs(best))


def significance_mark(significant: bool, withheld: bool = False) -> str:
    """How the tables and figures mark a difference: ``*`` significant, ``(*)`` withheld (see
    :func:`_holm_family`), else nothing."""
    return "*" if significant else "(*)" if withheld else ""


def _holm_family(rows: list[dict], alpha: float, ref_unmatched: str, new_unmatched: str) -> None:
    """``p_holm`` (Holm-adjusted sign-flip p over ``rows``, one family) and ``significant``:
    p_holm < alpha, ``withheld`` where the arm the difference favours has no ok result on a seed
    the other arm finished (it diverged or failed there, or has not run it yet) (``ref_unmatched``/``new_unmatched``: the columns counting each arm's
    ok seeds the other lacks). The matched comparison leaves such a seed out - a run that diverged
    there is not a loss the paired test can count - so a win built on the seeds it survived is
    not marked: ``significant`` is False and ``withheld`` True.

    A row whose smallest attainable sign-flip p (:func:`smallest_sign_flip_p`: 2/2^n for n pairs)
    is not below ``alpha`` is not counted in the family (its ``p_holm`` is NaN; Tarone's rule for
    discrete tests, Tarone 1990): at alpha = 0.05 a row with 5 pairs or fewer (2/32 = 0.0625) can
    never be significant, whatever its differences, and would only raise the other rows' adjusted
    p (an arm run on five seeds of six would turn the 2/64 of another arm's six wins into 4/64,
    above 0.05). Which rows count depends on their pair counts only, never on the differences'
    signs, so Holm over the rest still controls the family-wise error rate; ``p_holm`` depends on
    ``alpha`` through the family. This is the first step of Tarone's rule only: its further step
    (leave out the rows that cannot reach alpha/K, for the smallest K with at most K rows left) is
    not taken, which keeps the family larger and the marks, if anything, conservative. A pair whose
    difference is exactly 0 is counted in n, so a row with ties may stay in the family though it
    cannot reach alpha (conservative too: selecting rows on their differences is not done)."""
    adjusted = holm([r["p_signflip"] if can_reach(r["n_pairs"], alpha) else np.nan for r in rows])
    for r, p in zip(rows, adjusted):
        r["p_holm"] = float(p)
        better = -r["diff_mean"] if r["mode"] == "min" else r["diff_mean"]  # (> 0: new is better; the tested sign)
        lacking = r[ref_unmatched] if better > 0 else r[new_unmatched] if better < 0 else 0
        r["withheld"] = bool(p < alpha and lacking > 0)
        r["significant"] = bool(p < alpha and not r["withheld"])


#: which metric the paired tables compare: the best validation metric (what early stopping and the
#: meta-objectives saw), or the held-out test metric at the best weights (``test_<metric>``, where
#: the task's data have a test part: WikiText-2, Multi30k, IMDB (not from a CSV), ETT's ``split: 12/4/4``,
#: real CIFAR-10's ``split: holdout``; not the embedded digits)
SPLITS = ("validation", "test")


def _metric_column(split: str, metric: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return "best_metric" if split == "validation" else f"test_{metric}"


def tasks_with_test_split(results: Results) -> list[str]:
    """The tasks whose ok trials carry a held-out test metric (``test_<metric>``)."""
    trials = results.trials
    if trials.empty or "task" not in trials:
        return []
    out = []
    for task in sorted(trials["task"].unique()):
        column = _metric_column("test", task_metric(trials, task)[0])
        ok = _ok(trials[trials["task"] == task])
        if column in ok and ok[column].notna().any():
            out.append(task)
    return out


def table2(results: Results, *, alpha: float = ALPHA, confidence: float = CONFIDENCE,
           split: str = "validation") -> pd.DataFrame:
    """The paper's Table 2 with seeds: per task, AdamW ("adamw") vs the MetaAdamW "baseline", on
    the best validation metric or (``split="test"``) on the held-out test metric at the best
    weights, for the tasks that have one (:func:`tasks_with_test_split`).

    Columns: task, split, metric (``test_<name>`` on the test split), mode; adamw_* and meta_* (mean, lo, hi and n over the matched seeds -
    the seeds both arms finished ok, so that the two means describe the same seeds; NaN when they
    share none - plus n_unmatched, ok seeds left out because the other arm has
    none there, and n_not_ok: trials not ok, or on the test split ok without a test metric); rel_mean/rel_lo/rel_hi (mean and CI of the per-seed relative
    improvement, positive = MetaAdamW better); diff_* (paired difference meta - adamw);
    time_change (total training time of MetaAdamW over the matched seeds relative to AdamW's);
    p_t, p_signflip, p_holm (the sign-flip p adjusted by Holm over the table's tasks whose pair count
    can reach p < alpha at all, :func:`can_reach`: 6 pairs or more at 0.05; NaN for the others), n_pairs,
    n_better, ``significant`` (p_holm < alpha) and ``withheld`` (p_holm < alpha, but the arm the
    difference favours did not finish a seed the other finished: not marked, see
    :func:`_holm_family`); ref_<name> means of the trivial references
    when the trials table has them.
    """
    trials = results.trials
    _metric_column(split, "")  # (an unknown split is refused before anything is computed)
    if trials.empty:
        return pd.DataFrame()
    arms = explode_arms(trials)
    ref_cols = [c for c in trials.columns if c.startswith("ref_") and c.startswith("ref_test_") is (split == "test")]
    rows = []
    for task in _split_tasks(results, split):
        metric, mode = task_metric(trials, task)
        column = _metric_column(split, metric)
        row: dict = {"task": task, "split": split, "metric": metric if split == "validation" else column, "mode": mode}
        ref, new, ref_extra, new_extra = _matched(arms, task, ADAMW, BASELINE, column)
        for prefix, arm, values, extra in (("adamw", ADAMW, ref, ref_extra), ("meta", BASELINE, new, new_extra)):
            ci = mean_ci(values, confidence)
            row.update({f"{prefix}_{k}": ci[k] for k in ("mean", "lo", "hi", "n")})
            row[f"{prefix}_n_unmatched"] = extra
            row[f"{prefix}_n_not_ok"] = _n_not_ok(arms, task, arm, column)
        row.update(_compare(ref, new, mode, confidence))
        row["time_change"] = _time_change(arms, task, ref.index if ref.index.equals(new.index) else ref.index[:0])
        ok_task = _ok(trials[trials["task"] == task])
        row.update({c: float(pd.to_numeric(ok_task[c], errors="coerce").mean()) for c in ref_cols})
        rows.append(row)
    _holm_family(rows, alpha, "adamw_n_unmatched", "meta_n_unmatched")
    return pd.DataFrame(rows)


def _time_change(arms: pd.DataFrame, task: str, seeds: pd.Index) -> float:
    """(MetaAdamW total time - AdamW total time) / AdamW total time over the matched seeds ``seeds``
    (those of the table's metric)."""
    a, m = _per_seed(arms, task, ADAMW, "time_total_s"), _per_seed(arms, task, BASELINE, "time_total_s")
    seeds = seeds.intersection(a.index).intersection(m.index)
    total_a = a.loc[seeds].sum()
    return float((m.loc[seeds].sum() - total_a) / total_a) if len(seeds) and total_a > 0 else np.nan


def _same_trials(arms: pd.DataFrame, task: str, arm: str, other: str) -> bool:
    """Whether ``arm`` is served by exactly ``other``'s trials on ``task`` (a study merges arms
    whose configs are equal, e.g. an ablation level that is the baseline's own)."""
    ids = arms.loc[(arms["task"] == task) & (arms["arm"] == arm), "trial_id"]
    other_ids = arms.loc[(arms["task"] == task) & (arms["arm"] == other), "trial_id"]
    return len(ids) > 0 and set(ids) == set(other_ids)


def _split_tasks(results: Results, split: str) -> list[str]:
    return sorted(results.trials["task"].unique()) if split == "validation" else tasks_with_test_split(results)


def table3(results: Results, *, alpha: float = ALPHA, confidence: float = CONFIDENCE,
           split: str = "validation") -> pd.DataFrame:
    """The paper's Table 3 with seeds: per task, every arm other than "adamw" and "baseline"
    against "baseline" over matched seeds, on the best validation metric or the held-out test
    metric (``split``, as in :func:`table2`).

    Columns: task, split, axis, arm, metric, mode, arm_mean/lo/hi and baseline_mean (over the matched
    seeds, as in :func:`table2`), n_unmatched and baseline_n_unmatched (ok seeds of the arm, of
    the baseline, that the other lacks: left out of both means), n_not_ok, rel_* (per seed relative change vs
    baseline, positive = the arm is better), diff_*, p_t, p_signflip, p_holm (Holm over the ablation
    arms of the task whose pair count can reach p < alpha, :func:`can_reach` - 5 pairs' sign-flip p is
    at least 2/32 = 0.0625 whatever they are; NaN for the others; a task's factorial cells, compared with the baseline too, are a family of
    their own, so that adding a factorial design to a study does not weaken its ablations), n_pairs, n_better, significant (p_holm < alpha), withheld (as in :func:`table2`),
    ``mark`` ("*" where significant, "(*)" where withheld) and ``same_as_baseline``: the arm ran the baseline's own trials (its level is
    the baseline's), so there is nothing to compare - its statistics are NaN and it is not
    counted in the Holm family.
    """
    trials = results.trials
    _metric_column(split, "")
    if trials.empty:
        return pd.DataFrame()
    arms = explode_arms(trials)
    rows = []
    for task in _split_tasks(results, split):
        metric, mode = task_metric(trials, task)
        column = _metric_column(split, metric)
        names = sorted(set(arms.loc[arms["task"] == task, "arm"]) - {ADAMW, BASELINE})
        task_rows = []
        for arm in names:
            base, values, base_extra, extra = _matched(arms, task, BASELINE, arm, column)
            ci = mean_ci(values, confidence)
            row = {"task": task, "split": split, "axis": arm_axis(arm), "arm": arm,
                   "metric": metric if split == "validation" else column, "mode": mode}
            row.update({f"arm_{k}": ci[k] for k in ("mean", "lo", "hi")})
            row["baseline_mean"] = float(base.mean()) if len(base) else np.nan
            row["n_unmatched"], row["baseline_n_unmatched"] = extra, base_extra
            row["n_not_ok"] = _n_not_ok(arms, task, arm, column)
            row["same_as_baseline"] = _same_trials(arms, task, arm, BASELINE)
            cmp = _compare(base, values, mode, confidence)
            if row["same_as_baseline"]:
                cmp = {k: (np.nan if k not in ("n_pairs", "n_better") else v) for k, v in cmp.items()}
            row.update(cmp)
            task_rows.append(row)
        for cells in (False, True):  # (the ablation arms one family, the factorial cells, where any, another)
            _holm_family([r for r in task_rows if not r["same_as_baseline"] and (r["axis"] == "factorial") is cells],
                         alpha, "baseline_n_unmatched", "n_unmatched")
        for row in task_rows:
            row.setdefault("p_holm", np.nan)
            row.setdefault("significant", False)
            row.setdefault("withheld", False)
            row["mark"] = significance_mark(row["significant"], row["withheld"])
        rows += task_rows
    return pd.DataFrame(rows)


# -- factorial studies --------------------------------------------------------------------------
#: a comma that starts a new factor: one followed by an axis name (a study file's axis names match
#: ``[A-Za-z0-9_.+-]+``: "lr-scale", "2x" too) and "="
_LEVEL_SPLIT = re.compile(r",(?=\s*[A-Za-z0-9_.+-]+=)")


def parse_factorial_arm(arm: str) -> dict[str, str]:
    """``"factorial:grouping=original,gating=true"`` -> ``{"grouping": "original", "gating": "true"}``.

    Commas inside a level (e.g. ``priorities=[1, 3, 5]``) are kept: a new factor starts only at
    a comma followed by ``name=``, ``name`` an axis name as a study file allows it (letters,
    digits and ``_.+-``: ``factorial:gating=true,lr-scale=big``).
    """
    if not arm.startswith(FACTORIAL_PREFIX):
        raise ValueError(f"{arm!r} is not a factorial cell (expected '{FACTORIAL_PREFIX}<axis>=<level>,...')")
    body = arm[len(FACTORIAL_PREFIX):]
    pairs = [p.split("=", 1) for p in _LEVEL_SPLIT.split(body) if p.strip()]
    return {k.strip(): v.strip() for k, v in pairs}


def factorial_frame(results: Results) -> pd.DataFrame:
    """One row per ok cell-seed: task, seed, one column per factor, the raw best_metric and ``y``,
    the per-task normalised metric ``sign * (m - mean_task) / |mean_task|`` (sign +1 for "max",
    -1 for "min": positive = better, in units of the task's mean). Several ok trials of one cell
    and seed (results of study versions loaded with ``all_trials=True``) are averaged, with a
    warning, as in the paired tables: each would otherwise count as one more observation."""
    arms = explode_arms(_ok(results.trials))
    if arms.empty:
        return pd.DataFrame()
    cells = arms[arms["arm"].astype(str).str.startswith(FACTORIAL_PREFIX)]
    if cells.empty:
        return pd.DataFrame()
    repeated = cells.duplicated(["task", "seed", "arm"], keep=False)
    if repeated.any():
        warnings.warn(f"factorial cells: several ok trials share a task, seed and cell ({int(repeated.sum())} trials "
                      f"of {len(cells[repeated].drop_duplicates(['task', 'seed', 'arm']))} cell-seeds); their values "
                      f"are averaged. Are results of different study versions mixed (load_results(..., "
                      f"all_trials=True))?", StatsWarning, stacklevel=2)
        cells = cells.groupby(["task", "seed", "arm"], as_index=False, sort=False).agg(
            mode=("mode", "first"), best_metric=("best_metric", "mean"))
    levels = pd.DataFrame([parse_factorial_arm(a) for a in cells["arm"]], index=cells.index)
    out = pd.concat([cells[["task", "seed", "arm", "mode", "best_metric"]], levels], axis=1)
    task_mean = out.groupby("task")["best_metric"].transform("mean")
    sign = np.where(out["mode"] == "max", 1.0, -1.0)
    out["y"] = sign * (out["best_metric"] - task_mean) / task_mean.abs()
    return out.reset_index(drop=True)


def factorial_missing(results: Results) -> pd.DataFrame:
    """The factorial cells without an ok result on a (task, seed) where another cell has one:
    task, seed, arm (the cell) and status (``diverged``, ``failed``, ``no_metric``, or ``not run``
    when the results hold no trial of that cell and seed). The effects are fitted without them
    (see :func:`factorial_effects`' ``withheld``)."""
    columns = ["task", "seed", "arm", "status"]
    arms = explode_arms(results.trials)
    if arms.empty:
        return pd.DataFrame(columns=columns)
    arms = arms[arms["arm"].astype(str).str.startswith(FACTORIAL_PREFIX)]
    ok = ok_mask(arms) if len(arms) else pd.Series(dtype=bool)
    done = set(zip(arms.loc[ok, "task"], arms.loc[ok, "seed"], arms.loc[ok, "arm"]))
    status = {(t, s, a): st for t, s, a, st in zip(arms["task"], arms["seed"], arms["arm"], arms["status"])}
    rows = []
    cells = sorted(set(arms["arm"]))  # (the study runs every cell on every task)
    for task in sorted(set(arms.loc[ok, "task"])):
        for seed in sorted({s for t, s, _ in done if t == task}):
            rows += [{"task": task, "seed": seed, "arm": cell, "status": "no_metric" if status.get((task, seed, cell)) == "ok"
                      else status.get((task, seed, cell), "not run")}
                     for cell in cells if (task, seed, cell) not in done]
    return pd.DataFrame(rows, columns=columns)


def _effect_columns(levels: pd.Series) -> tuple[list[str], np.ndarray]:
    """Sum-to-zero (effect) coding: one column per level but the last, which is coded -1."""
    names = sorted(levels.astype(str).unique())
    cols = np.zeros((len(levels), len(names) - 1))
    for j, name in enumerate(names[:-1]):
        cols[:, j] = np.where(levels == name, 1.0, np.where(levels == names[-1], -1.0, 0.0))
    return names, cols


def factorial_effects(
    results: Results, *, alpha: float = ALPHA, confidence: float = CONFIDENCE
) -> pd.DataFrame:
    """Main effects and two-way interactions of a factorial study on the normalised metric.

    Fits ``y ~ 1 + main effects + two-way interactions`` by least squares on effect-coded factors
    (see :func:`factorial_frame` for ``y``). A main-effect estimate is a level's deviation from
    the grand mean - in a balanced design its mean's; with cell-seeds missing, the least-squares
    estimate adjusted for the seeds and the other factors, not the raw means' deviation (every
    level is listed; for a two-level factor the difference between its levels is twice the
    estimate). An interaction estimate is the coefficient of the product of
    two non-reference level columns (the last level of each factor, alphabetically, is the
    reference). Each (task, seed) is a block with an effect of its own: the cells of one seed
    share its initial weights, data order and dropout masks (seeds are matched pairs), so what all
    cells of a seed have in common is not counted as noise - as a paired comparison does for two
    arms. CIs and p-values use the residual variance with n - rank degrees of freedom (NaN when
    the design has no residual degrees of freedom).

    Fractional designs: an interaction column that the design cannot tell apart from the columns
    before it (main effects first: in the half fraction C = AB, the A x B interaction *is* C's
    main effect) is left out of the fit, as resolution-III analyses do, and its row has a NaN
    estimate and ``aliased`` naming what it is confounded with. Fitting it anyway would split
    each main effect in half between the two names. A main-effect contrast the design cannot
    estimate is NaN with ``aliased = "not estimable"``. A fitted effect that stands for unfitted
    ones lists them in ``confounded`` (in 2^(4-1) with D = ABC, the A x B row's estimate is
    A x B + C x D): its estimate is theirs as much as its own.

    ``p_holm`` adjusts the p-values by Holm over the fit's estimable effects (a two-level
    factor's two rows are one test) and ``significant`` is p_holm < alpha, unless ``withheld``:
    as in Tables 2 and 3 (:func:`_holm_family`), an effect is not marked when a cell it favours
    has no ok result on a seed where other cells have one (:func:`factorial_missing`: it
    diverged, failed or has not run there). The fit leaves such a cell-seed out - a divergence is
    not a bad result it can count - so the effect would rest on the seeds that cell survived.
    A cell is favoured by an effect when its weight in the effect has the estimate's sign: a main
    effect of level a is mean(a) - grand mean, weights ``1[f=a] - 1/I`` (I levels: the level a
    with a positive estimate, the other levels with a negative one); an interaction a x b is the
    cell-mean contrast with weights ``(1[f=a] - 1/I) (1[g=b] - 1/J)`` (with a middle level of a
    three-level factor also weighted, unlike its effect code 0). ``n_missing`` counts the
    cell-seeds left out. Returns an empty frame when the study has no factorial cells.
    """
    frame = factorial_frame(results)
    if frame.empty:
        return pd.DataFrame()
    missing = [parse_factorial_arm(a) for a in factorial_missing(results)["arm"]]
    factors = [c for c in frame.columns if c not in {"task", "seed", "arm", "mode", "best_metric", "y"}]
    factors = [f for f in factors if frame[f].nunique() > 1]
    if not factors:  # (one cell finished so far: no effect to estimate)
        return pd.DataFrame()
    columns, labels = [np.ones(len(frame))], [("intercept", "", "")]
    coded = {}
    for f in factors:
        names, cols = _effect_columns(frame[f].astype(str))
        coded[f] = (names, cols)
        for j, name in enumerate(names[:-1]):
            columns.append(cols[:, j])
            labels.append(("main", f, name))
    blocks = frame["task"].astype(str) + "\x00" + frame["seed"].astype(str)
    for block in sorted(blocks.unique())[1:]:  # treatment-coded against the first block (the intercept's)
        columns.append((blocks == block).to_numpy(dtype=float))
        labels.append(("block", block, ""))
    aliased: dict[tuple[str, str], str] = {}
    confounded: dict[tuple[str, str], list[tuple[float, str]]] = {}  # fitted term -> (coef, unfitted term) it stands for
    rank = np.linalg.matrix_rank(np.column_stack(columns))
    for f, g in itertools.combinations(factors, 2):
        for (i, a), (j, b) in itertools.product(enumerate(coded[f][0][:-1]), enumerate(coded[g][0][:-1])):
            col, label = coded[f][1][:, i] * coded[g][1][:, j], ("interaction", f"{f} x {g}", f"{a} x {b}")
            grown = np.linalg.matrix_rank(np.column_stack(columns + [col]))
            if grown > rank:
                columns.append(col)
                labels.append(label)
                rank = grown
            else:
                aliased[label[1:]], partners = _alias_of(col, np.column_stack(columns), labels)
                for term, level, coef in partners:
                    confounded.setdefault((term, level), []).append((coef, f"{label[1]} ({label[2]})"))
    X, y = np.column_stack(columns), frame["y"].to_numpy(dtype=float)
    beta, cov, dof = _least_squares(X, y)
    # rounding of y (metrics over their task's mean, ~1e-16 of that): a standard error or an estimate
    # no larger is 0, as :func:`paired_t_pvalue` treats identical differences (no t of float noise)
    task_mean = frame.groupby("task")["best_metric"].transform("mean").abs()
    with np.errstate(divide="ignore", invalid="ignore"):
        tol = TIE * float(np.max(np.abs(frame["best_metric"]) / task_mean))
    tol = tol if np.isfinite(tol) else 0.0  # (a task mean of 0: y is not finite either)
    row_space = np.linalg.pinv(X) @ X  # c is estimable iff c @ row_space == c
    rows, tests = [], []
    for f in factors:
        names = coded[f][0]
        idx = [k for k, lab in enumerate(labels) if lab[0] == "main" and lab[1] == f]
        for j, name in enumerate(names):
            c = np.zeros(len(beta))
            if j < len(names) - 1:
                c[idx[j]] = 1.0
            else:
                c[idx] = -1.0
            row = _contrast_row("main", f, name, c, beta, cov, dof, confidence, tol)
            row["aliased"] = ""
            row["favoured_missing"] = _favoured(missing, row["estimate"], (f, name, len(names)))
            # a two-level factor's second row is minus its first: what it stands for flips sign too
            flip = -1.0 if len(names) == 2 and j == 1 else 1.0
            row["confounded"] = _signed(confounded.get((f, names[0] if len(names) == 2 else name), []), flip)
            if not np.allclose(c @ row_space, c, atol=1e-8):
                row.update(estimate=np.nan, se=np.nan, lo=np.nan, hi=np.nan, p_value=np.nan, aliased="not estimable")
            rows.append(row)
            tests.append(("main", f) if len(names) == 2 else ("main", f, name))
    for f, g in itertools.combinations(factors, 2):
        for a, b in itertools.product(coded[f][0][:-1], coded[g][0][:-1]):
            key = (f"{f} x {g}", f"{a} x {b}")
            if key in aliased:
                rows.append({"kind": "interaction", "term": key[0], "level": key[1], "estimate": np.nan, "se": np.nan,
                             "lo": np.nan, "hi": np.nan, "p_value": np.nan, "aliased": aliased[key], "confounded": ""})
            else:
                c = np.zeros(len(beta))
                c[labels.index(("interaction", *key))] = 1.0
                row = _contrast_row("interaction", *key, c, beta, cov, dof, confidence, tol)
                row["favoured_missing"] = _favoured(missing, row["estimate"], (f, a, len(coded[f][0])),
                                                    (g, b, len(coded[g][0])))
                rows.append({**row, "aliased": "", "confounded": _signed(confounded.get(key, []))})
            tests.append(("interaction", *key))
    out = pd.DataFrame(rows)
    family = out.assign(test=tests).groupby("test", sort=False)["p_value"].first()
    out["p_holm"] = pd.Series(tests).map(dict(zip(family.index, holm(family.to_numpy())))).to_numpy(dtype=float)
    out["withheld"] = (out["p_holm"] < alpha) & (out["favoured_missing"].fillna(0) > 0)
    out["significant"] = (out["p_holm"] < alpha) & ~out["withheld"]
    out["n"] = len(frame)
    out["n_missing"] = len(missing)
    return out.drop(columns="favoured_missing")


def _favoured(cells: list[dict[str, str]], estimate: float, *terms: tuple[str, str, int]) -> int:
    """How many of ``cells`` an effect with ``estimate`` favours: those whose weight in it - the
    product over its ``terms`` (factor, level, number of levels) of ``1[cell's level] - 1/levels``
    - has the estimate's sign (see :func:`factorial_effects`)."""
    return sum(math.prod((cell.get(f) == level) - 1 / n for f, level, n in terms) * estimate > 0 for cell in cells)


def _signed_term(coef: float, name: str, sep: str = "") -> str:
    """``coef * name`` as ``"+name"``, ``"-0.5*name"`` (``sep`` between the sign and the rest)."""
    scale = "" if np.isclose(abs(coef), 1.0) else f"{abs(coef):.3g}*"
    return f"{'-' if coef < 0 else '+'}{sep}{scale}{name}"


def _signed(terms: list[tuple[float, str]], flip: float = 1.0) -> str:
    """``[(coef, name), ...]`` as ``"+ name, - 0.5*name"``: what a fitted effect's estimate adds
    to its own (``flip`` -1 for the second level of a two-level factor, minus the first)."""
    return ", ".join(_signed_term(c * flip, name, " ") for c, name in terms)


def _alias_of(col: np.ndarray, X: np.ndarray,
              labels: list[tuple[str, str, str]]) -> tuple[str, list[tuple[str, str, float]]]:
    """What a column the design cannot separate from ``X``'s columns is confounded with, e.g.
    ``"-features=basic"`` (its least-squares expression in the effect columns; the intercept and
    blocks are left out of the name), and the (term, level, coefficient) of those fitted effects:
    a fitted effect's estimate includes the coefficient times the unfitted column's effect."""
    coef, *_ = np.linalg.lstsq(X, col, rcond=None)
    parts, partners = [], []
    for b, (kind, term, level) in zip(coef, labels):
        if kind in ("main", "interaction") and abs(b) > 1e-8:
            parts.append(_signed_term(b, f"{term}={level}" if kind == "main" else f"{term} ({level})"))
            partners.append((term, level, float(b)))
    return " ".join(parts).lstrip("+") or "the blocks", partners


def _least_squares(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """OLS coefficients, their covariance (NaN without residual degrees of freedom) and the dof."""
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    rank = np.linalg.matrix_rank(X)
    dof = len(y) - rank
    if dof <= 0:
        return beta, np.full((len(beta), len(beta)), np.nan), dof
    resid = y - X @ beta
    sigma2 = float(resid @ resid) / dof
    return beta, sigma2 * np.linalg.pinv(X.T @ X), dof


def _contrast_row(kind, term, level, c, beta, cov, dof, confidence, tol: float = 0.0) -> dict:
    """A fitted contrast's estimate, CI and t-test p. A standard error of at most ``tol`` (the
    rounding of the fitted values: no residual, every seed shows the same cell differences) gives
    p = 0 for an estimate beyond ``tol`` and p = 1 for one within it, as the paired tests do for
    identical differences (:func:`paired_t_pvalue`), and a CI of the estimate alone. An estimate within
    ``tol`` is 0: rounding noise of an effect the design shows to be none (it printed as "+1.77e-15%")."""
    est = float(c @ beta)
    est = 0.0 if abs(est) <= tol else est
    se = float(np.sqrt(max(float(c @ cov @ c), 0.0))) if dof > 0 else np.nan
    if dof > 0 and se > tol:
        half = float(_student_t().ppf(0.5 + confidence / 2, dof)) * se
        p = float(2 * _student_t().sf(abs(est) / se, dof))
    elif dof > 0:  # (no residual variance up to rounding: no t of float noise)
        half, p = 0.0, (1.0 if abs(est) <= tol else 0.0)
    else:
        half, p = np.nan, np.nan
    return {"kind": kind, "term": term, "level": level, "estimate": est, "se": se,
            "lo": est - half, "hi": est + half, "p_value": p}


# -- cost ---------------------------------------------------------------------------------------
def _history_of(history: pd.DataFrame, trial_id: str) -> pd.DataFrame:
    if history.empty or "trial_id" not in history:
        return pd.DataFrame()
    return history[history["trial_id"] == trial_id].sort_values("epoch")


def _trial_per_seed(arms: pd.DataFrame, task: str, arm: str) -> dict:
    g = arms[(arms["task"] == task) & (arms["arm"] == arm)]
    return {seed: rows for seed, rows in g.groupby("seed")}


def _reached(values: pd.Series, target: float, mode: str) -> pd.Series:
    return values <= target if mode == "min" else values >= target


def validation_curves(results: Results, task: str, arms: Sequence[str] = (ADAMW, BASELINE)) -> pd.DataFrame:
    """Per arm and epoch the mean, min and max validation primary metric of ``task`` over the
    seeds every one of ``arms`` with an ok trial there finished ok (matched seeds, as Tables 2 and
    3 pair them; the report's curves). Columns: arm, epoch, mean, min, max, n (the arm's seeds
    drawn), left_out (its ok seeds left out as unmatched). A seed with several ok trials (results
    loaded with ``all_trials=True``) counts once, with their mean, as in the tables. Seeds that
    stopped early leave the later epochs' statistics to the seeds still running. Arms without an
    ok trial or history have no rows."""
    columns = ["arm", "epoch", "mean", "min", "max", "n", "left_out"]
    ok = explode_arms(_ok(results.trials))
    if results.history.empty or ok.empty:
        return pd.DataFrame(columns=columns)
    col = f"val_{task_metric(results.trials, task)[0]}"
    trials = {arm: ok[(ok["task"] == task) & (ok["arm"] == arm)] for arm in arms}
    seed_sets = [set(t["seed"]) for t in trials.values() if len(t)]
    matched = set.intersection(*seed_sets) if seed_sets else set()
    frames = []
    for arm, rows in trials.items():
        drawn = rows[rows["seed"].isin(matched)]
        h = results.history.merge(drawn[["trial_id", "seed"]], on="trial_id")
        if h.empty or col not in h:
            continue
        per_seed = h.groupby(["epoch", "seed"])[col].mean()
        g = per_seed.groupby("epoch").agg(["mean", "min", "max"]).reset_index()
        frames.append(g.assign(arm=arm, n=drawn["seed"].nunique(), left_out=rows["seed"].nunique() - drawn["seed"].nunique()))
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def time_to_target(results: Results, *, arm: str = BASELINE, ref_arm: str = ADAMW) -> pd.DataFrame:
    """Per task and seed: when ``arm`` first reaches ``ref_arm``'s best validation metric.

    The target is the ``best_metric`` of the ``ref_arm`` trial of the same seed; the arm's
    history column ``val_<metric>`` is scanned epoch by epoch. Columns: task, seed, metric,
    target, reached, epoch, step, wall_s (cumulative seconds including meta-updates; NaN when not
    reached), ref_epoch, ref_step, ref_wall_s (when ``ref_arm`` itself reached its best),
    wall_ratio (wall_s / ref_wall_s) and note ("" | "not reached" | why the seed has no answer:
    a trial that is not ok, missing, or without history). The target is set wherever ``ref_arm``
    has an ok trial and ``arm`` a stored one: an ``arm`` trial that is not ok (diverged, failed)
    did not reach it (a seed ``arm`` has not run has no target).

    A seed with several ok trials of an arm (results loaded with ``all_trials=True``) counts once,
    with the mean of its trials' values, as in the tables (with the same warning), and by the same
    rule for both arms - each trial's own time, then their mean: the target is the mean of the
    ``ref_arm`` trials' best metrics (Table 2's value of that seed); ref_epoch, ref_step and
    ref_wall_s are the means of when each ``ref_arm`` trial reached its own best (NaN when one has no
    history row at its best epoch); epoch, step and
    wall_s the means of when each ``arm`` trial first reached the target, which the seed reached
    only if every one of them did (the note names those that did not). (The time at which the
    trials' mean curve reaches the target would be another rule: the ``ref_arm``'s mean curve
    need not reach the mean of its trials' bests at all, when they peaked at different epochs.)
    Fractional mean epochs are kept as such.
    """
    trials, history = results.trials, results.history
    if trials.empty:
        return pd.DataFrame()
    arms = explode_arms(trials)
    rows = []
    for task in sorted(trials["task"].unique()):
        metric, mode = task_metric(trials, task)
        refs, news = _trial_per_seed(arms, task, ref_arm), _trial_per_seed(arms, task, arm)
        targets = _seed_targets(arms, task, ref_arm, arm)
        for seed in sorted(set(refs) | set(news)):
            rows.append(_seed_time_to_target(task, seed, metric, mode, refs.get(seed), news.get(seed), history, arm,
                                             ref_arm, targets.get(seed, np.nan)))
    return pd.DataFrame(rows)


def _seed_targets(arms: pd.DataFrame, task: str, ref_arm: str, arm: str) -> pd.Series:
    """``ref_arm``'s per-seed best metric, Table 2's (:func:`_per_seed`, which warns of several ok
    trials on a seed, of ``arm`` too; called here so that the warning names this module, as the
    tables' do)."""
    _per_seed(arms, task, arm)
    return _per_seed(arms, task, ref_arm)


def _seed_time_to_target(task, seed, metric, mode, ref_rows, new_rows, history, arm, ref_arm, target) -> dict:
    row = {"task": task, "seed": seed, "metric": metric, "target": np.nan, "reached": False,
           "epoch": np.nan, "step": np.nan, "wall_s": np.nan, "ref_epoch": np.nan,
           "ref_step": np.nan, "ref_wall_s": np.nan, "wall_ratio": np.nan, "note": ""}

    def not_ok(name: str, rows: pd.DataFrame) -> str:
        status = rows["status"].iloc[0]
        return f"{name} trial {rows['trial_id'].iloc[0]} is {status if status != 'ok' else 'without a finite metric'}"

    for name, rows in ((ref_arm, ref_rows), (arm, new_rows)):
        if rows is None:
            row["note"] = f"no {name} trial"
            return row
    if not ok_mask(ref_rows).any():
        row["note"] = not_ok(ref_arm, ref_rows)
        return row
    row["target"] = float(target)  # (the mean of the seed's ok trials' best metrics)
    at_best = []
    for _, ref in _ok(ref_rows).iterrows():
        ref_hist = _history_of(history, ref["trial_id"])
        hit = ref_hist[ref_hist["epoch"] == ref["best_epoch"]] if len(ref_hist) else ref_hist
        if len(hit):
            at_best.append((float(ref["best_epoch"]), float(hit["step"].iloc[0]), float(hit["wall_s"].iloc[0])))
    if at_best and len(at_best) == int(ok_mask(ref_rows).sum()):  # (the mean of each ok trial's own time)
        row.update(zip(("ref_epoch", "ref_step", "ref_wall_s"), _mean_time(at_best)))
    if not ok_mask(new_rows).any():  # (a diverged or failed trial did not reach the target: it counts)
        row["note"] = not_ok(arm, new_rows)
        return row
    new = _ok(new_rows)
    col = f"val_{metric}"
    reached, missed = [], []
    for trial_id in new["trial_id"]:
        new_hist = _history_of(history, trial_id)
        if new_hist.empty or col not in new_hist:
            row["note"] = f"no history column {col} for trial {trial_id}"
            return row
        hit = new_hist[_reached(new_hist[col], row["target"], mode)]
        if hit.empty:
            missed.append(str(trial_id))
        else:
            first = hit.iloc[0]
            reached.append((float(first["epoch"]), float(first["step"]), float(first["wall_s"])))
    if missed:  # (several ok trials on the seed: a mean time needs every one of them to have one)
        row["note"] = "not reached" if not reached else (
            f"not reached by trial {', '.join(missed)} ({len(reached)} of {len(new)} ok trials of the seed reached it)")
        return row
    row.update(zip(("epoch", "step", "wall_s"), _mean_time(reached)), reached=True)
    row["wall_ratio"] = row["wall_s"] / row["ref_wall_s"] if row["ref_wall_s"] > 0 else np.nan
    return row


def _mean_time(times: list[tuple[float, float, float]]) -> tuple[int | float, float, float]:
    """The mean (epoch, step, seconds) of a seed's trials' times; the epoch an int when whole."""
    epoch, step, wall = np.mean(times, axis=0)
    return (int(epoch) if epoch == int(epoch) else float(epoch)), float(step), float(wall)


def _stopped_early(trials: pd.DataFrame) -> pd.Series:
    """The trials that early stopping ended before their epoch budget: patience running out at the
    last epoch of the budget saved no epoch (``stop_reason`` says early_stopping there, yet the
    trial ran every epoch it had), as a step budget's ``max_steps`` wins over it."""
    early = trials["stop_reason"] == "early_stopping"
    if "epochs" in trials:
        budget = pd.to_numeric(trials["epochs"], errors="coerce")
        early &= ~(pd.to_numeric(trials["epochs_run"], errors="coerce") >= budget).fillna(False)
    return early


def cost_table(results: Results, *, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per task and arm: epochs until early stopping (mean and CI of ``epochs_run``), the share of
    ok trials stopped early, mean total seconds, and the mean share of time spent in
    meta-updates (``time_meta_s / time_total_s``); n_ok and n_not_ok count the trials. A trial
    counts as stopped early when early stopping ended it before its epoch budget (not when the
    patience ran out at its last epoch).

    The means pair the arms as Tables 2 and 3 do: each arm over the seeds it and the baseline
    both finished ok, the baseline over those it and AdamW both finished ok (an arm that failed
    its longest seed would otherwise look fast); n_unmatched counts an arm's ok trials left out
    for that (all of them when it shares no seed). A task without those arms takes each arm's own.
    A seed with several ok trials of an arm (results loaded with ``all_trials=True``) counts once,
    with their means, as in the tables (with the same warning): the means and the interval are
    over seeds, not trials, which would weigh that seed more and narrow the interval."""
    arms = explode_arms(results.trials)
    if arms.empty:
        return pd.DataFrame()
    ok_seeds = {key: set(g["seed"]) for key, g in _ok(arms).groupby(["task", "arm"], sort=False)}
    present = set(zip(arms["task"], arms["arm"]))
    rows = []
    for (task, arm), g in arms.groupby(["task", "arm"], sort=True):
        own = _ok(g)
        same = arm == BASELINE or _same_trials(arms, task, arm, BASELINE)  # (an arm served by the baseline's trials)
        partner = ADAMW if same else BASELINE
        if (task, partner) in present:
            ok = own[own["seed"].isin(ok_seeds.get((task, partner), set()))]
        else:  # (no baseline, or no AdamW arm, in this study)
            ok = own
        if own["seed"].duplicated().any():  # (the tables' warning, with the same text: the report shows it once)
            warnings.warn(_shared_seeds(task, arm, own), StatsWarning, stacklevel=1)  # (naming this module)
        total = pd.to_numeric(ok["time_total_s"], errors="coerce")
        per_seed = pd.DataFrame({  # (a seed's several ok trials: their mean, one value per seed)
            "epochs": pd.to_numeric(ok["epochs_run"], errors="coerce"), "early": _stopped_early(ok).astype(float),
            "total": total, "share": pd.to_numeric(ok["time_meta_s"], errors="coerce") / total.where(total > 0),
            "seed": ok["seed"]}).groupby("seed").mean()
        ep = mean_ci(per_seed["epochs"], confidence)
        rows.append({
            "task": task, "arm": arm, "n_ok": len(own), "n_not_ok": len(_not_ok(g)), "n_unmatched": len(own) - len(ok),
            "epochs_mean": ep["mean"], "epochs_lo": ep["lo"], "epochs_hi": ep["hi"],
            "early_stopped": float(per_seed["early"].mean()) if len(ok) else np.nan,
            "time_total_mean_s": float(per_seed["total"].mean()) if len(ok) else np.nan,
            "meta_share": float(per_seed["share"].mean()) if len(ok) else np.nan,
        })
    return pd.DataFrame(rows)


# -- performance profiles -----------------------------------------------------------------------
def _profile_plan(results: Results, arms: Sequence[str] | None) -> tuple[list[str], dict[str, list], list[str]]:
    """The arms of a profile, the seeds each task's means are taken over and notes on what was
    left out. A task enters only if every arm attempted it (a profile compares arms on a common
    set of problems); its means are over the seeds every arm with an ok trial on it finished ok,
    so that no arm's mean leaves out a hard seed another arm's includes."""
    every = explode_arms(results.trials)
    ok = explode_arms(_ok(results.trials))
    # (AdamW, the baseline, then the others by name: the same order whatever order the results were stored in)
    names = list(arms) if arms is not None else sorted(
        map(str, pd.unique(every["arm"])), key=lambda a: (a != ADAMW, a != BASELINE, a))
    unknown = [a for a in names if a not in set(every["arm"])]
    if unknown:
        raise ValueError(f"no trial of arm(s) {', '.join(map(repr, unknown))} in these results; their arms: "
                         f"{', '.join(sorted(map(str, pd.unique(every['arm']))))}")
    seeds, notes = {}, []
    for task in sorted(map(str, pd.unique(every["task"]))):
        tried = set(every.loc[every["task"] == task, "arm"])
        missing = [a for a in names if a not in tried]
        if missing:
            notes.append(f"{task}: left out (not run by {', '.join(missing)})")
            continue
        rows = ok[(ok["task"] == task) & ok["arm"].isin(names)]
        by_arm = [set(rows.loc[rows["arm"] == a, "seed"]) for a in names]
        if not any(by_arm):
            notes.append(f"{task}: left out (no arm finished a trial ok)")
            continue
        common = set.intersection(*[s for s in by_arm if s])
        if not common:
            notes.append(f"{task}: left out (no seed was finished ok by every arm)")
            continue
        dropped = sorted(set.union(*by_arm) - common)
        if dropped:  # (naming the arms: one that diverged where the others finished is not credited silently)
            missing = "; ".join(f"{a}: {', '.join(map(str, sorted(set(dropped) - s)))}"
                                for a, s in zip(names, by_arm) if set(dropped) - s)
            notes.append(f"{task}: means over seeds {', '.join(map(str, sorted(common)))} (seed(s) "
                         f"{', '.join(map(str, dropped))} not finished ok by every arm - not finished by {missing})")
        seeds[task] = sorted(common)
        means = _arm_means(rows[rows["seed"].isin(common)])
        if (means <= 0).any():  # (a perfect 0 would otherwise read as the worst arm, without a word)
            notes.append(f"{task}: {', '.join(f'{a} (mean {v:.4g})' for a, v in means[means <= 0].items())} counted as "
                         f"never within any tau: a performance ratio needs positive metrics")
    return names, seeds, notes


def _arm_means(rows: pd.DataFrame) -> pd.Series:
    """Each arm's mean best metric over its seeds, a seed with several ok trials (results loaded
    with ``all_trials=True``) counting once, with their mean, as in the paired tables
    (:func:`_per_seed`): a mean over the trials would weigh that seed more."""
    return rows.groupby(["arm", "seed"])["best_metric"].mean().groupby("arm").mean()


def profile_ratios(results: Results, arms: Sequence[str] | None = None) -> pd.DataFrame:
    """Performance ratios (task x arm) of each arm's mean best metric to the best arm's on that
    task: ``arm / best`` for "min" metrics and ``best / arm`` for "max" metrics, so 1 is the best
    arm and larger is worse either way. Means are over the seeds that every arm with an ok trial
    on the task finished ok (matched seeds, as in the paired tables); a task that some arm did
    not run is left out (:func:`profile_notes` says which, and which seeds were dropped). Metrics
    must be positive; an arm without an ok trial on a task, or with a non-positive metric, gets
    ``inf`` (never within any tau)."""
    if _ok(results.trials).empty:
        return pd.DataFrame()
    names, seeds, _ = _profile_plan(results, arms)
    ok = explode_arms(_ok(results.trials))
    ratios = {}
    for task, task_seeds in seeds.items():
        rows = ok[(ok["task"] == task) & ok["seed"].isin(task_seeds)]
        vals = _arm_means(rows).reindex(names)
        vals = vals.where(vals > 0)
        ratio = vals / vals.min() if task_metric(results.trials, task)[1] == "min" else vals.max() / vals
        # a tie with the best arm up to the rounding of the means (357+351+355 and 358+352+353 over 3)
        ratios[task] = ratio.mask((ratio - 1).abs() < TIE, 1.0)
    if not ratios:
        return pd.DataFrame(columns=pd.Index(names, name="arm"), index=pd.Index([], name="task"), dtype=float)
    return pd.DataFrame(ratios).T.reindex(columns=names).fillna(np.inf).rename_axis(index="task", columns="arm")


def profile_notes(results: Results, arms: Sequence[str] | None = None) -> list[str]:
    """What :func:`profile_ratios` left out: tasks not run by every arm, seeds not finished by every
    arm, and arms whose mean metric is not positive (counted as never within any tau)."""
    if results.trials.empty:
        return []
    return _profile_plan(results, arms)[2]


def performance_profile(
    results: Results, taus: Sequence[float] | None = None, arms: Sequence[str] | None = None
) -> pd.DataFrame:
    """AlgoPerf-style performance profiles: rho_arm(tau) = share of tasks whose performance ratio
    (:func:`profile_ratios`) is <= tau. Rows are taus (index ``tau``), columns arms. Default taus
    run from 1 to a little beyond the largest finite ratio."""
    ratios = profile_ratios(results, arms)
    if ratios.empty:
        return pd.DataFrame()
    if taus is None:
        finite = ratios.to_numpy()[np.isfinite(ratios.to_numpy())]
        top = max(1.1, float(finite.max()) * 1.05) if finite.size else 1.1
        taus = np.linspace(1.0, top, 200)
    taus = np.asarray(taus, dtype=float)
    data = {arm: [(ratios[arm] <= tau).mean() for tau in taus] for arm in ratios.columns}
    return pd.DataFrame(data, index=pd.Index(taus, name="tau"))
