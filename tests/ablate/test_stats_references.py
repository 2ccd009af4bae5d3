"""Independent-reference checks of ablate.stats.

Each test computes what a function of :mod:`ablate.stats` should return by other means - by hand,
with exact rational arithmetic, scipy or a least-squares fit of its own - on a small constructed
study, and compares. The studies are written with :func:`ablate.results.write_trial` and read back
with :func:`ablate.results.load_results`, as in ``test_stats.py`` (``report_kit`` is the fixture
module of ``conftest.py``).
"""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from ablate import stats
from ablate.results import Results, load_results, write_trial
from tests.ablate.test_stats import row_of


def _trial(report_kit, task, arm, seed, best, **fields):
    """A trial row of ``arm`` (any name) on ``task`` ("etth1": mse/min, "imdb": accuracy/max),
    with ``fields`` overriding the fixture's values."""
    row = report_kit.trial_row(task, "adamw" if arm == "adamw" else "grouping=original", seed, best)
    row.update(arm=arm, arms=json.dumps([arm]), trial_id=f"{task}-{arm}-{seed}".replace("=", "_").replace(",", "_"),
               status="ok", error="", stop_reason="max_epochs", best_metric=best)
    row.update(fields)
    return row


def _history(values, metric, epoch_s):
    """Per-epoch history: ``val_<metric>`` = ``values``, 100 steps and ``epoch_s`` seconds an epoch."""
    return [{"epoch": e, "step": 100 * e, "wall_s": epoch_s * e, f"val_{metric}": v} for e, v in enumerate(values, 1)]


def _exact_sign_flip(diffs):
    """Two-sided sign-flip p by enumerating every sign vector in exact rational arithmetic (the
    floats' own binary values: a tie is a tie, no tolerance needed)."""
    d = [Fraction(float(x)) for x in diffs]
    observed = abs(sum(d))
    flips = list(itertools.product((-1, 1), repeat=len(d)))
    return sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed for signs in flips) / len(flips)


# -- elementary statistics --------------------------------------------------------------------
@pytest.mark.parametrize("draws", [999, stats.SIGN_FLIP_DRAWS])
def test_a_monte_carlo_sign_flip_p_of_a_consistent_improvement_is_one_over_draws_plus_one(draws):
    # 24 differences of one sign: only the all-+ and all-- vectors (2 of 2^24) reach the observed
    # |mean|, so no random draw hits it and the estimate is (1 + 0) / (1 + draws) - never 0, which
    # would claim an impossible certainty
    d = -0.001 * np.arange(1, 25)
    assert len(d) > stats.EXACT_SIGN_FLIP_MAX_N
    p = stats.sign_flip_pvalue(d, draws=draws)
    assert p > 0
    assert p == pytest.approx(1 / (1 + draws), rel=1e-12)


def test_a_consistent_improvement_with_one_tied_seed_has_the_exact_sign_flip_p():
    # the tied seed's sign flips freely: 4 of the 2^6 vectors reach the observed |mean| (not 0: the
    # observed vector itself always counts, however the float sums round)
    d = [0.05, 0.08, 0.03, 0.01, 0.05, 0.0]
    assert _exact_sign_flip(d) == 4 / 64
    assert stats.sign_flip_pvalue(d) == pytest.approx(4 / 64)
    for d in ([0.074, 0.025, 0.046, 0.0], [0.032, 0.089, 0.015, 0.04, 0.0], [0.375, -0.125, 0.25, 0.0, 0.125]):
        assert stats.sign_flip_pvalue(d) == pytest.approx(_exact_sign_flip(d))


@pytest.mark.parametrize(
    "ref, new, mode, expected",
    [
        (-2.0, -1.0, "min", -0.5),  # a min metric that rose from -2 to -1 got worse: negative
        (-1.0, -2.0, "min", 1.0),  # ... and one that fell from -1 to -2 got better by 1 / |-1| = 100%
        (-2.0, -1.0, "max", 0.5),  # a max metric (log-likelihood) that rose got better
        (-1.0, -2.0, "max", -1.0),
    ],
)
def test_the_relative_change_of_a_negative_metric_is_positive_when_new_is_better(ref, new, mode, expected):
    # module docstring: (ref - new) / |ref| for "min", (new - ref) / |ref| for "max", positive = better
    assert float(stats.relative_change(ref, new, mode)) == pytest.approx(expected)


def test_a_pair_with_a_nan_new_value_is_left_out_of_every_statistic():
    ref = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    new = np.array([0.75, np.nan, 2.5, 4.25, 4.5])  # (binary fractions: the differences are exact)
    keep = [0, 2, 3, 4]
    r, n = ref[keep], new[keep]
    cmp = stats.paired_comparison(ref, new, "min")
    assert cmp["n_pairs"] == 4
    assert cmp["diff_mean"] == pytest.approx(np.mean(n - r))
    assert cmp["rel_mean"] == pytest.approx(np.mean((r - n) / r))
    assert cmp["p_t"] == pytest.approx(sps.ttest_rel(n, r).pvalue)
    assert cmp["p_signflip"] == pytest.approx(_exact_sign_flip(n - r))
    assert cmp["n_better"] == 3
    # the same with the NaN on the other side
    swapped = stats.paired_comparison(np.where(np.isnan(new), np.nan, ref), np.where(np.isnan(new), 2.0, new), "min")
    assert swapped["n_pairs"] == 4 and swapped["p_t"] == pytest.approx(cmp["p_t"])


def test_a_tied_pair_does_not_count_as_better():
    cmp = stats.paired_comparison([1.0, 2.0, 3.0], [1.0, 1.9, 3.1], "min")  # tie, better, worse
    assert cmp["n_pairs"] == 3 and cmp["n_better"] == 1
    cmp = stats.paired_comparison([0.8, 0.8], [0.8, 0.8], "max")
    assert cmp["n_better"] == 0


def test_a_seed_on_which_both_arms_tie_is_not_counted_as_a_win_in_table2(tmp_path, report_kit):
    for seed, (a, m) in enumerate([(1.0, 1.0), (1.0, 0.9), (1.2, 1.1)]):
        write_trial(tmp_path, _trial(report_kit, "etth1", "adamw", seed, a))
        write_trial(tmp_path, _trial(report_kit, "etth1", "baseline", seed, m))
    row = row_of(stats.table2(load_results(tmp_path)), task="etth1")
    assert (row["n_pairs"], row["n_better"]) == (3, 2)


def test_an_arm_with_one_paired_seed_is_not_counted_in_table3s_holm_family(tmp_path, report_kit):
    # grouping=original and uncertainty=false beat the baseline on all six seeds: sign-flip p 2/64 each. gating=true
    # ran seed 0 only: one difference, whose sign-flip p is 1 whatever it is, so no test. Holm over the two tested
    # arms: 2 * 2/64 = 0.0625 for both (counting gating=true too: 3 * 2/64 = 0.09375).
    def study(out, six_seed_arms):
        for seed, b in enumerate([0.0100, 0.0110, 0.0105, 0.0098, 0.0102, 0.0108]):
            write_trial(out, _trial(report_kit, "etth1", "baseline", seed, b))
            for arm in six_seed_arms:
                write_trial(out, _trial(report_kit, "etth1", arm, seed, b - 0.0005))
        write_trial(out, _trial(report_kit, "etth1", "gating=true", 0, 0.0090))
        return stats.table3(load_results(out))

    t3 = study(tmp_path / "two", ["grouping=original", "uncertainty=false"])
    one = row_of(t3, arm="gating=true")
    assert (one["n_pairs"], one["p_signflip"]) == (1, 1.0) and np.isnan(one["p_holm"]) and not one["significant"]
    for arm in ("grouping=original", "uncertainty=false"):
        row = row_of(t3, arm=arm)
        assert row["p_signflip"] == _exact_sign_flip(np.full(6, 0.0005)) == 2 / 64
        assert row["p_holm"] == pytest.approx(2 * 2 / 64)
    # a single tested arm is a family of one: six wins of six are significant, a one-seed arm beside it or not
    row = row_of(study(tmp_path / "one", ["grouping=original"]), arm="grouping=original")
    assert row["p_holm"] == pytest.approx(2 / 64) and row["significant"] and row["mark"] == "*"


def test_a_task_with_one_paired_seed_is_not_counted_in_table2s_holm_family(tmp_path, report_kit):
    # etth1: MetaAdamW better on all six seeds (2/64); imdb ran seed 0 only (p 1, no test): p (Holm) of etth1 2/64
    for seed in range(6):
        write_trial(tmp_path, _trial(report_kit, "etth1", "adamw", seed, 0.0110 + 0.0001 * seed))
        write_trial(tmp_path, _trial(report_kit, "etth1", "baseline", seed, 0.0100 + 0.0001 * seed))
    write_trial(tmp_path, _trial(report_kit, "imdb", "adamw", 0, 0.80))
    write_trial(tmp_path, _trial(report_kit, "imdb", "baseline", 0, 0.82))
    t2 = stats.table2(load_results(tmp_path))
    imdb, etth1 = row_of(t2, task="imdb"), row_of(t2, task="etth1")
    assert (imdb["n_pairs"], imdb["p_signflip"]) == (1, 1.0) and np.isnan(imdb["p_holm"])
    assert etth1["p_signflip"] == 2 / 64 and etth1["p_holm"] == pytest.approx(2 / 64) and etth1["significant"]


# -- time to target -----------------------------------------------------------------------------
@pytest.mark.parametrize("task, metric, ref_values, new_values", [
    ("etth1", "mse", [0.012, 0.0105, 0.0100], [0.0120, 0.0100, 0.0095]),
    ("imdb", "accuracy", [0.78, 0.80, 0.82], [0.78, 0.82, 0.83]),
])
def test_a_history_value_equal_to_the_target_counts_as_reached(tmp_path, report_kit, task, metric, ref_values,
                                                                  new_values):
    # the arm's epoch 2 equals AdamW's best exactly: it has reached it then, not at epoch 3
    best = ref_values[-1]
    write_trial(tmp_path, _trial(report_kit, task, "adamw", 0, best, best_epoch=3), _history(ref_values, metric, 10.0))
    write_trial(tmp_path, _trial(report_kit, task, "baseline", 0, new_values[-1]), _history(new_values, metric, 12.5))
    row = stats.time_to_target(load_results(tmp_path)).iloc[0]
    assert row["target"] == best and row["reached"] and row["note"] == ""
    assert (row["epoch"], row["step"], row["wall_s"]) == (2, 200.0, 25.0)
    assert row["wall_ratio"] == pytest.approx(25.0 / 30.0)


def test_the_reference_time_is_taken_at_the_reference_trials_best_epoch_not_its_last(tmp_path, report_kit):
    # AdamW peaked at epoch 2 of 4 (then early stopping ran two more epochs): its time to its best is
    # epoch 2's, 20 s; MetaAdamW first gets below 0.0100 at epoch 3, 37.5 s
    ref_values, new_values = [0.012, 0.0100, 0.0103, 0.0105], [0.013, 0.011, 0.0099, 0.0098]
    write_trial(tmp_path, _trial(report_kit, "etth1", "adamw", 0, 0.0100, best_epoch=2, epochs_run=4),
                _history(ref_values, "mse", 10.0))
    write_trial(tmp_path, _trial(report_kit, "etth1", "baseline", 0, 0.0098, best_epoch=4, epochs_run=4),
                _history(new_values, "mse", 12.5))
    row = stats.time_to_target(load_results(tmp_path)).iloc[0]
    assert row["reached"] and (row["epoch"], row["step"], row["wall_s"]) == (3, 300.0, 37.5)
    assert (row["ref_epoch"], row["ref_step"], row["ref_wall_s"]) == (2, 200.0, 20.0)
    assert row["wall_ratio"] == pytest.approx(37.5 / 20.0)


def test_time_to_target_times_a_seeds_several_trials_by_one_rule_for_both_arms(tmp_path, report_kit):
    # seed 0 with two ok trials of each arm (study versions loaded with all_trials=True). AdamW: 0.010 at epoch 1
    # and 0.020 at epoch 3, so the target is 0.015 and AdamW's time the mean of its trials' times to their best:
    # epoch (1 + 3) / 2 = 2, step 200, 20 s. MetaAdamW's trials first reach 0.015 at epochs 1 and 3: the same
    # rule gives epoch 2, step 200, 20 s and a ratio of 1. (Its trials' mean curve 0.026, 0.021, 0.0135 reaches
    # 0.015 only at epoch 3, 30 s: a ratio of 1.5 against a reference that AdamW's own mean curve 0.020, 0.018,
    # 0.016 never reaches.)
    for k, (values, best_epoch) in enumerate([([0.010, 0.011, 0.012], 1), ([0.030, 0.025, 0.020], 3)]):
        write_trial(tmp_path, _trial(report_kit, "etth1", "adamw", 0, min(values), best_epoch=best_epoch,
                                     trial_id=f"a{k}", finished_at=f"2026-01-01T00:00:0{k}"),
                    _history(values, "mse", 10.0))
    for k, values in enumerate([[0.012, 0.012, 0.012], [0.040, 0.030, 0.015]]):
        write_trial(tmp_path, _trial(report_kit, "etth1", "baseline", 0, min(values), best_epoch=3,
                                     trial_id=f"b{k}", finished_at=f"2026-01-01T00:00:0{k}"),
                    _history(values, "mse", 10.0))
    with pytest.warns(stats.StatsWarning, match="several trials share a seed"):
        row = stats.time_to_target(load_results(tmp_path, all_trials=True)).iloc[0]
    assert row["target"] == pytest.approx(0.015) and row["reached"] and row["note"] == ""
    assert (row["ref_epoch"], row["ref_step"], row["ref_wall_s"]) == (2, 200.0, 20.0)
    assert (row["epoch"], row["step"], row["wall_s"]) == (2, 200.0, 20.0)
    assert row["wall_ratio"] == pytest.approx(1.0)


# -- Table 2 time change on the test split ------------------------------------------------------
def test_time_change_on_the_test_split_is_over_the_seeds_with_a_test_metric(tmp_path, report_kit):
    # MetaAdamW's seed 0 finished ok but has no test metric: the test-split comparison pairs seeds 1
    # and 2 only, and its time change must describe those same seeds
    times = {"adamw": [10.0, 20.0, 40.0], "baseline": [30.0, 22.0, 44.0]}
    tests = {"adamw": [2.0, 2.1, 2.2], "baseline": [np.nan, 2.0, 2.3]}
    for arm in ("adamw", "baseline"):
        for seed in range(3):
            write_trial(tmp_path, _trial(report_kit, "etth1", arm, seed, 1.0 - 0.1 * (arm == "baseline"),
                                         time_total_s=times[arm][seed], test_mse=tests[arm][seed]))
    results = load_results(tmp_path)
    test = row_of(stats.table2(results, split="test"), task="etth1")
    assert (test["n_pairs"], test["meta_n_not_ok"]) == (2, 1)
    assert test["time_change"] == pytest.approx((22.0 + 44.0 - (20.0 + 40.0)) / (20.0 + 40.0))
    val = row_of(stats.table2(results), task="etth1")
    assert val["n_pairs"] == 3 and val["time_change"] == pytest.approx((96.0 - 70.0) / 70.0)


# -- factorial effects --------------------------------------------------------------------------
def _factorial_cell(report_kit, task, seed, levels, best, **fields):
    arm = "factorial:" + ",".join(f"{k}={v}" for k, v in levels.items())
    return _trial(report_kit, task, arm, seed, best, axis="factorial", **fields)


def test_factorial_effect_inference_matches_a_hand_least_squares_fit_with_seed_blocks(tmp_path, report_kit):
    # 2 x 3 design over 4 seeds, unbalanced: cell (a2, b3) never ran seed 0, cell (a1, b2) diverged
    # on seed 3 - 22 observations
    effect = {("a1", "b1"): 0.0, ("a1", "b2"): -0.10, ("a1", "b3"): 0.03,
              ("a2", "b1"): 0.05, ("a2", "b2"): 0.0, ("a2", "b3"): -0.02}
    noise = [0.004, -0.007, 0.011, -0.002, 0.006, -0.009, 0.001, 0.008, -0.012, 0.005, -0.003, 0.010,
             -0.006, 0.002, 0.007, -0.011, 0.003, -0.004, 0.009, -0.008, 0.012, -0.001, 0.005, -0.010]
    data = []
    for seed in range(4):
        for k, ((a, b), e) in enumerate(effect.items()):
            if (a, b, seed) == ("a2", "b3", 0):
                continue
            best = 2.0 + 0.2 * seed + e + noise[6 * seed + k]
            diverged = (a, b, seed) == ("a1", "b2", 3)
            write_trial(tmp_path, _factorial_cell(report_kit, "etth1", seed, {"A": a, "B": b},
                                                  np.nan if diverged else best,
                                                  status="diverged" if diverged else "ok"))
            if not diverged:
                data.append((seed, a, b, best))
    effects = stats.factorial_effects(load_results(tmp_path))

    # the reference: y = -(m - mean) / |mean| (min metric), effect coding (last level -1), the seeds
    # as blocks (treatment coded against seed 0), the two A x B interaction columns
    seed, a, b, m = (np.array(c) for c in zip(*data))
    y = -(m - m.mean()) / abs(m.mean())
    ca = np.where(a == "a1", 1.0, -1.0)
    cb1 = np.select([b == "b1", b == "b3"], [1.0, -1.0], 0.0)
    cb2 = np.select([b == "b2", b == "b3"], [1.0, -1.0], 0.0)
    blocks = [(seed == s).astype(float) for s in (1, 2, 3)]
    X = np.column_stack([np.ones(len(y)), ca, cb1, cb2, *blocks, ca * cb1, ca * cb2])
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(y) - X.shape[1]
    assert (len(y), np.linalg.matrix_rank(X), dof) == (22, 9, 13)
    resid = y - X @ beta
    cov = (resid @ resid / dof) * np.linalg.inv(X.T @ X)
    t975 = sps.t.ppf(0.975, dof)

    def unit(*idx, sign=1.0):
        c = np.zeros(X.shape[1])
        c[list(idx)] = sign
        return c

    contrasts = {("main", "A", "a1"): unit(1), ("main", "A", "a2"): unit(1, sign=-1.0),
                 ("main", "B", "b1"): unit(2), ("main", "B", "b2"): unit(3), ("main", "B", "b3"): unit(2, 3, sign=-1.0),
                 ("interaction", "A x B", "a1 x b1"): unit(7), ("interaction", "A x B", "a1 x b2"): unit(8)}
    assert len(effects) == len(contrasts)
    for (kind, term, level), c in contrasts.items():
        row = row_of(effects, kind=kind, term=term, level=level)
        est, se = c @ beta, np.sqrt(c @ cov @ c)
        assert row["estimate"] == pytest.approx(est, rel=1e-9, abs=1e-12), (term, level)
        assert row["se"] == pytest.approx(se, rel=1e-9), (term, level)
        assert (row["lo"], row["hi"]) == pytest.approx((est - t975 * se, est + t975 * se), rel=1e-9), (term, level)
        assert row["p_value"] == pytest.approx(2 * sps.t.sf(abs(est) / se, dof), rel=1e-9), (term, level)
    assert (effects["n"] == 22).all() and (effects["n_missing"] == 2).all()


def test_factorial_effects_on_a_negative_metric_favour_the_level_that_is_better(tmp_path, report_kit):
    # a "max" metric below 0 (a log-likelihood around -2): gating=true is 0.1 higher, i.e. better, on
    # every seed; y is normalised by |task mean| (about 1.98), so its main effect is about +0.05 / 1.98
    # (positive = better; dividing by the signed mean would flip it)
    wobble = {("true", "a"): 0.004, ("true", "b"): -0.004, ("false", "a"): -0.003, ("false", "b"): 0.003}
    values = {}
    for seed, offset in enumerate([0.0, -0.3, 0.2]):
        for (gating, grouping), w in wobble.items():
            best = -2.0 + offset + 0.1 * (gating == "true") + w * (-1) ** seed
            values[(seed, gating, grouping)] = best
            write_trial(tmp_path, _factorial_cell(report_kit, "imdb", seed, {"gating": gating, "grouping": grouping},
                                                  best, metric="log_likelihood", mode="max"))
    effects = stats.factorial_effects(load_results(tmp_path))
    m = np.array(list(values.values()))
    on = np.array([v for (s, g, _), v in values.items() if g == "true"])
    expected = (on.mean() - m.mean()) / abs(m.mean())  # balanced: level mean - grand mean
    assert m.mean() < 0 and expected > 0
    row = row_of(effects, kind="main", term="gating", level="true")
    assert row["estimate"] == pytest.approx(expected)
    assert row["lo"] > 0 and row["significant"]
    assert row_of(effects, kind="main", term="gating", level="false")["estimate"] == pytest.approx(-expected)


# -- cost table ---------------------------------------------------------------------------------
def test_the_cost_table_counts_a_seed_with_several_ok_trials_once_with_their_mean():
    # seed 0 with two ok trials of each arm (study versions loaded with all_trials=True): 2 epochs, 10 s, stopped
    # early, and 4 epochs, 20 s; seed 1 one trial of 4 epochs, 30 s. Per seed, as the tables count a seed: epochs
    # 3 and 4 (mean 3.5, sd 1/sqrt(2), CI 3.5 +- t(0.975, 1) * 0.5), seconds 15 and 30 (22.5), stopped early 0.5 and 0
    # (0.25). Over the trials seed 0 weighed twice: 3.33 epochs, 20 s, a third stopped early, and n = 3.
    base = {"task": "imdb", "status": "ok", "metric": "accuracy", "mode": "max", "epochs": 4, "best_metric": 0.5,
            "stop_reason": "max_epochs", "time_meta_s": 0.0}
    rows = []
    for arm in ("adamw", "baseline"):
        tag = {"arm": arm, "arms": json.dumps([arm])}
        rows += [{**base, **tag, "trial_id": f"{arm}-0", "seed": 0, "epochs_run": 2, "time_total_s": 10.0,
                  "stop_reason": "early_stopping"},
                 {**base, **tag, "trial_id": f"{arm}-0b", "seed": 0, "epochs_run": 4, "time_total_s": 20.0},
                 {**base, **tag, "trial_id": f"{arm}-1", "seed": 1, "epochs_run": 4, "time_total_s": 30.0}]
    with pytest.warns(stats.StatsWarning, match="several trials share a seed"):
        cost = stats.cost_table(Results(pd.DataFrame(rows), pd.DataFrame(), pd.DataFrame())).set_index("arm")
    half = sps.t.ppf(0.975, 1) * (1 / np.sqrt(2)) / np.sqrt(2)
    for arm in ("adamw", "baseline"):
        row = cost.loc[arm]
        assert (row["n_ok"], row["n_unmatched"]) == (3, 0)
        assert (row["epochs_mean"], row["epochs_lo"], row["epochs_hi"]) == pytest.approx((3.5, 3.5 - half, 3.5 + half))
        assert row["time_total_mean_s"] == pytest.approx(22.5) and row["early_stopped"] == pytest.approx(0.25)


@pytest.mark.parametrize("n_short", [2, 3, 4, 5])
def test_an_arm_whose_seeds_cannot_reach_alpha_is_not_counted_in_table3s_holm_family(tmp_path, report_kit, n_short):
    # grouping=original beats the baseline on all six seeds: sign-flip p 2/64. gating=true also wins on every seed it
    # ran, but ran only n_short of them: its smallest attainable p, 2/2^n_short >= 2/32 = 0.0625, is not below 0.05,
    # so it can never be significant (Tarone's rule). Counted in the family it raised grouping=original's p (Holm) to
    # 2 * 2/64 = 0.0625 and took its mark away; left out, grouping=original is a family of one: 2/64, significant.
    for seed, b in enumerate([0.0100, 0.0110, 0.0105, 0.0098, 0.0102, 0.0108]):
        write_trial(tmp_path, _trial(report_kit, "etth1", "baseline", seed, b))
        write_trial(tmp_path, _trial(report_kit, "etth1", "grouping=original", seed, b - 0.0005))
        if seed < n_short:
            write_trial(tmp_path, _trial(report_kit, "etth1", "gating=true", seed, b - 0.0010))
    t3 = stats.table3(load_results(tmp_path))
    short, six = row_of(t3, arm="gating=true"), row_of(t3, arm="grouping=original")
    assert short["n_pairs"] == n_short and short["p_signflip"] == pytest.approx(2 / 2**n_short)
    assert np.isnan(short["p_holm"]) and not short["significant"] and short["mark"] == ""
    assert six["p_signflip"] == 2 / 64 and six["p_holm"] == pytest.approx(2 / 64)
    assert six["significant"] and six["mark"] == "*"
    # at alpha = 0.1, 5 pairs (smallest p 0.0625) can reach it: a family of two again, Holm 2 * 2/64 for the six
    loose = stats.table3(load_results(tmp_path), alpha=0.1)
    short, six = row_of(loose, arm="gating=true"), row_of(loose, arm="grouping=original")
    if n_short == 5:
        assert six["p_holm"] == pytest.approx(2 * 2 / 64) and short["p_holm"] == pytest.approx(2 / 32)
    else:
        assert np.isnan(short["p_holm"]) and six["p_holm"] == pytest.approx(2 / 64)


def test_a_task_whose_seeds_cannot_reach_alpha_is_not_counted_in_table2s_holm_family(tmp_path, report_kit):
    # etth1: MetaAdamW better on all six seeds (2/64); imdb better on all of its five (2/32 = 0.0625, never below
    # 0.05): left out of the family, so etth1's p (Holm) stays 2/64 (with imdb counted it was 2 * 2/64, not marked)
    for seed in range(6):
        write_trial(tmp_path, _trial(report_kit, "etth1", "adamw", seed, 0.0110 + 0.0001 * seed))
        write_trial(tmp_path, _trial(report_kit, "etth1", "baseline", seed, 0.0100 + 0.0001 * seed))
    for seed in range(5):
        write_trial(tmp_path, _trial(report_kit, "imdb", "adamw", seed, 0.80 + 0.01 * seed))
        write_trial(tmp_path, _trial(report_kit, "imdb", "baseline", seed, 0.82 + 0.01 * seed))
    t2 = stats.table2(load_results(tmp_path))
    imdb, etth1 = row_of(t2, task="imdb"), row_of(t2, task="etth1")
    assert (imdb["n_pairs"], imdb["p_signflip"]) == (5, 2 / 32) and np.isnan(imdb["p_holm"])
    assert etth1["p_holm"] == pytest.approx(2 / 64) and etth1["significant"]


@pytest.mark.parametrize("n, alpha, expected", [(0, 0.05, False), (1, 0.05, False), (5, 0.05, False), (6, 0.05, True),
                                                (5, 0.1, True), (4, 0.1, False), (40, 0.05, True)])
def test_can_reach_is_whether_the_smallest_sign_flip_p_is_below_alpha(n, alpha, expected):
    assert stats.can_reach(n, alpha) is expected
