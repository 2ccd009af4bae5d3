"""ablate.stats against hand-computed values on constructed result tables."""

from __future__ import annotations

import itertools
import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from ablate import stats
from ablate.results import Results, load_results, write_trial


def hand_ci(values):
    x = np.asarray(values, dtype=float)
    half = sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return x.mean(), x.mean() - half, x.mean() + half


def row_of(df, **where):
    mask = np.ones(len(df), dtype=bool)
    for k, v in where.items():
        mask &= (df[k] == v).to_numpy()
    assert mask.sum() == 1, f"expected one row for {where}, got {mask.sum()}"
    return df[mask].iloc[0]


# -- elementary statistics --------------------------------------------------------------------
def test_mean_ci_matches_t_interval():
    ci = stats.mean_ci([1.0, 2.0, 4.0, 7.0])
    mean, lo, hi = hand_ci([1.0, 2.0, 4.0, 7.0])
    assert ci["n"] == 4
    assert ci["mean"] == pytest.approx(3.5)
    assert (ci["lo"], ci["hi"]) == pytest.approx((lo, hi))


def test_mean_ci_one_value_gives_nan_interval_and_none_gives_nan_mean():
    one = stats.mean_ci([0.5])
    assert one["mean"] == 0.5 and np.isnan(one["lo"]) and np.isnan(one["hi"]) and one["n"] == 1
    assert np.isnan(stats.mean_ci([])["mean"])
    assert stats.mean_ci([1.0, np.nan, 3.0])["n"] == 2


def test_mean_ci_ignores_infinite_values_as_it_ignores_nan():
    ci, hand = stats.mean_ci([1.0, np.inf, 3.0, -np.inf, 5.0]), hand_ci([1.0, 3.0, 5.0])
    assert ci["n"] == 3 and (ci["mean"], ci["lo"], ci["hi"]) == pytest.approx(hand)


@pytest.mark.parametrize(
    "ref, new, mode, expected",
    [
        (0.006147, 0.005885, "min", 0.0426),  # paper Table 2, ETTh1 MSE
        (120.47, 115.51, "min", 0.0412),  # WikiText-2 perplexity
        (87.02, 88.05, "max", 0.0118),  # CIFAR-10 accuracy
        (74.53, 82.79, "max", 0.1108),  # IMDB accuracy
        (0.80, 0.84, "min", -0.05),  # worse on a min metric is negative
        (0.80, 0.76, "max", -0.05),  # worse on a max metric is negative
    ],
)
def test_relative_change_sign_convention(ref, new, mode, expected):
    assert round(float(stats.relative_change(ref, new, mode)), 4) == pytest.approx(expected)


def test_relative_change_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        stats.relative_change(1.0, 2.0, "lower")


def test_sign_flip_consistent_improvement_over_six_seeds_is_two_of_64():
    assert stats.sign_flip_pvalue([0.4, 0.3, 0.5, 0.2, 0.6, 0.1]) == pytest.approx(2 / 64)


@pytest.mark.parametrize("scale", [1e3, 1.0, 1e-9, 1e-12])
def test_sign_flip_pvalue_does_not_depend_on_the_metrics_units(scale):
    # the tie tolerance was absolute below 1: an MSE of 1e-11 better on every seed got p = 1
    d = scale * np.array([0.4, 0.3, 0.5, 0.2, 0.6, 0.1, 0.35, 0.45])
    assert stats.sign_flip_pvalue(d) == pytest.approx(2 / 256)
    assert stats.sign_flip_pvalue(d, exact_max_n=4) == stats.sign_flip_pvalue(d / scale, exact_max_n=4)


def test_sign_flip_exact_matches_enumeration_by_hand():
    d = np.array([1.0, 2.0, -0.5, 0.7])
    hits = sum(abs(np.mean(np.array(s) * d)) >= abs(d.mean()) - 1e-12 for s in itertools.product([-1, 1], repeat=4))
    assert stats.sign_flip_pvalue(d) == pytest.approx(hits / 16)
    assert stats.sign_flip_pvalue([0.0, 0.0, 0.0]) == 1.0
    assert np.isnan(stats.sign_flip_pvalue([]))


def test_sign_flip_monte_carlo_is_deterministic_and_close_to_exact():
    d = np.random.default_rng(3).normal(0.3, 1.0, size=17)
    exact = stats.sign_flip_pvalue(d, exact_max_n=17)
    mc = stats.sign_flip_pvalue(d)
    assert mc == stats.sign_flip_pvalue(d)
    assert mc == pytest.approx(exact, abs=0.01)


def test_paired_t_pvalue_matches_scipy():
    a = np.array([0.80, 0.82, 0.81, 0.79, 0.83, 0.80])
    b = np.array([0.81, 0.81, 0.83, 0.80, 0.82, 0.82])
    assert stats.paired_t_pvalue(b - a) == pytest.approx(sps.ttest_rel(b, a).pvalue)
    assert np.isnan(stats.paired_t_pvalue([0.1]))
    # differences equal up to the rounding of their inputs are identical: p = 0, not a t of float noise (1e-76)
    same = np.array([0.9, 1.0, 1.2, 0.7]) - np.array([1.0, 1.1, 1.3, 0.8])
    assert np.ptp(same) > 0 and stats.paired_t_pvalue(same) == 0.0
    assert stats.paired_t_pvalue([0.0, 0.0, 0.0]) == 1.0
    # perplexity-sized metrics, each improved by 0.01: their rounding (~1e-14) is far above 1e-12 of 0.01
    ref = np.array([361.4186, 414.0556, 317.2992, 413.8379, 337.4198])
    new = np.round(ref - 0.01, 4)
    assert np.ptp(new - ref) > 0 and stats.paired_t_pvalue(new - ref) < 1e-40  # (the differences alone: a t of noise)
    assert stats.paired_comparison(ref, new, "min")["p_t"] == 0.0
    # ... and differences that are rounding noise around 0 are no difference (p = 1, not 0)
    ref = np.array([300.0, 310, 305, 299, 302])
    noise = stats.paired_comparison(ref, ref + np.array([1, -1, 2, -1, 0]) * np.spacing(ref), "min")
    assert (noise["p_t"], noise["p_signflip"]) == (1.0, 1.0)


def test_the_sign_flip_test_ties_means_equal_up_to_the_rounding_of_the_compared_values():
    # improvements of 0.01, -0.01, 0.05, 0.02 on metrics ~1e4: flipping the first two gives the same mean, which
    # the rounding of 1e4-sized values (~1e-12) hid from a tolerance of 1e-12 of the differences (p 0.25, not 0.375)
    ref = np.array([10032.9299, 10290.8962, 11898.1862, 10686.6955])
    new = np.round(ref + np.array([0.01, -0.01, 0.05, 0.02]), 4)
    assert stats.sign_flip_pvalue(new - ref) == 0.25  # (the differences alone)
    assert stats.paired_comparison(ref, new, "max")["p_signflip"] == 0.375 == stats.sign_flip_pvalue([1, -1, 5, 2])


def test_paired_comparison_fields():
    ref, new = np.array([1.0, 2.0, 4.0]), np.array([0.9, 2.2, 3.6])
    cmp = stats.paired_comparison(ref, new, "min")
    rel = (ref - new) / ref
    assert cmp["diff_mean"] == pytest.approx(np.mean(new - ref))
    assert (cmp["diff_lo"], cmp["diff_hi"]) == pytest.approx(hand_ci(new - ref)[1:])
    assert (cmp["rel_mean"], cmp["rel_lo"], cmp["rel_hi"]) == pytest.approx(hand_ci(rel))
    assert cmp["n_pairs"] == 3 and cmp["n_better"] == 2
    with pytest.raises(ValueError, match="length"):
        stats.paired_comparison([1.0], [1.0, 2.0], "min")


def test_a_relative_change_is_undefined_where_a_reference_is_zero():
    # an accuracy of 0 on one seed of 8: the mean relative change was that of the other 7 (+16.67%), beside
    # 8 pairs and 8 wins, and numpy's division warning was the only trace
    ref, new = np.array([0.0] + [0.6] * 7), np.full(8, 0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cmp = stats.paired_comparison(ref, new, "max")
    assert np.isnan([cmp["rel_mean"], cmp["rel_lo"], cmp["rel_hi"]]).all()
    assert cmp["diff_mean"] == pytest.approx(np.mean(new - ref)) and (cmp["n_pairs"], cmp["n_better"]) == (8, 8)
    tie = stats.paired_comparison([0.0, 0.5], [0.0, 0.6], "max")  # (0 against 0: a tie, not a win)
    assert np.isnan(tie["rel_mean"]) and tie["n_better"] == 1


# -- arms and failures --------------------------------------------------------------------------
def test_explode_arms_uses_the_arms_list_and_falls_back_to_arm():
    trials = pd.DataFrame({"trial_id": ["a", "b"], "arm": ["baseline", "adamw"],
                           "arms": [json.dumps(["baseline", "grouping=fine_grained"]), None]})
    out = stats.explode_arms(trials)
    assert list(zip(out["trial_id"], out["arm"])) == [("a", "baseline"), ("a", "grouping=fine_grained"), ("b", "adamw")]
    assert list(stats.explode_arms(trials.drop(columns="arms"))["arm"]) == ["baseline", "adamw"]


def test_failed_trials_are_counted_and_listed(report_study, report_kit):
    results = load_results(report_study)
    assert stats.status_counts(results) == {"ok": 46, "failed": 1, "diverged": 1, "no_metric": 0, "total": 48}
    failed = stats.failed_summary(results)
    assert set(failed["trial_id"]) == {report_kit.FAILED_ID, report_kit.DIVERGED_ID}
    errors = dict(zip(failed["trial_id"], failed["error"]))
    assert errors[report_kit.FAILED_ID] == "RuntimeError: CUDA out of memory"
    assert errors[report_kit.DIVERGED_ID] == "loss is NaN at epoch 2"
    seeds = stats.seeds_per_arm(results)
    gating = row_of(seeds, task="etth1", arm="gating=true")
    assert (gating["n_ok"], gating["n_not_ok"], gating["seeds"]) == (5, 1, "0,1,2,3,4")


def test_embedded_data_is_detected(report_study):
    results = load_results(report_study)
    assert stats.uses_embedded_data(results)
    real = Results(results.trials.assign(data="real", data_source="real:/data/x.csv"), results.history, results.telemetry)
    assert not stats.uses_embedded_data(real)
    # a plugin task on its own default data (data: embedded) is no stand-in for a paper dataset
    own = Results(results.trials.assign(data="embedded", data_source="synthetic:sine"), results.history, results.telemetry)
    assert not stats.uses_embedded_data(own)
    assert stats.uses_embedded_data(Results(results.trials.drop(columns="data_source"), results.history,
                                            results.telemetry))  # (stored without the column: by `data`)


def test_a_failed_trials_error_is_its_exception_also_in_ray_s_error_text():
    ray_text = ("Failure # 1 (occurred at 2026-12-02_02-16-19)\n\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=4347)\n"
                "  File \"/x/ablate/sweep.py\", line 155, in trainable\n    result = trial.run(callback=report)\n"
                "  File \"/x/bad_tasks.py\", line 53, in evaluate\n    raise ValueError(\"evaluate broke\")\n"
                "ValueError: evaluate broke\n")
    assert stats.error_summary(ray_text) == "ValueError: evaluate broke"
    assert stats.error_summary("Traceback (most recent call last):\n  File \"x\"\nKeyError: 'a'") == "KeyError: 'a'"
    assert stats.error_summary("training loss became nan at step 1\nstopped") == "training loss became nan at step 1"
    # a trial whose process died after its checkpoint was set aside: the note the run put first is not the error
    died = ("note: trial ab12: its checkpoint ab12.pt is unreadable; moved aside, starting afresh\n"
            "Failure # 1 (occurred at x)\nThe actor died unexpectedly before finishing this task.\n\tpid: 8\n"
            "The actor is dead because its worker process has died.\n")
    assert stats.error_summary(died) == "The actor is dead because its worker process has died."
    assert stats.error_summary("note: only a note\n") == "note: only a note"


# -- Table 2 and Table 3 ------------------------------------------------------------------------
def test_table2_numbers(report_study, report_kit):
    t2 = stats.table2(load_results(report_study))
    m = report_kit.REPORT_METRICS
    etth = row_of(t2, task="etth1")
    a, b = np.array(m["etth1"]["adamw"]), np.array(m["etth1"]["baseline"])
    assert (etth["adamw_mean"], etth["adamw_lo"], etth["adamw_hi"]) == pytest.approx(hand_ci(a))
    assert (etth["meta_mean"], etth["meta_lo"], etth["meta_hi"]) == pytest.approx(hand_ci(b))
    assert (etth["rel_mean"], etth["rel_lo"], etth["rel_hi"]) == pytest.approx(hand_ci((a - b) / a))
    assert etth["rel_mean"] > 0  # lower mse = better
    assert etth["p_signflip"] == pytest.approx(2 / 64)
    # Holm over the table's two tasks: the smaller p doubled, so 6 seeds are not enough at 0.05
    assert etth["p_holm"] == pytest.approx(2 * 2 / 64) and not etth["significant"]
    assert etth["p_t"] == pytest.approx(sps.ttest_rel(b, a).pvalue)
    assert etth["n_pairs"] == 6 and etth["n_better"] == 6
    assert etth["time_change"] == pytest.approx((36 - 30) / 30)
    assert etth["ref_persistence_mse"] == pytest.approx(report_kit.PERSISTENCE_MSE)

    imdb = row_of(t2, task="imdb")
    a, b = np.array(m["imdb"]["adamw"]), np.array(m["imdb"]["baseline"])
    assert imdb["rel_mean"] == pytest.approx(np.mean((b - a) / a))  # higher accuracy = better
    assert imdb["p_t"] == pytest.approx(sps.ttest_rel(b, a).pvalue)
    assert imdb["p_signflip"] > 0.05 and not imdb["significant"]
    assert imdb["p_holm"] == pytest.approx(max(imdb["p_signflip"], 2 * 2 / 64))
    assert np.isnan(imdb["ref_persistence_mse"])


def test_table2_alpha_is_configurable(report_study):
    assert row_of(stats.table2(load_results(report_study), alpha=0.1), task="etth1")["significant"]
    assert not row_of(stats.table2(load_results(report_study), alpha=0.05), task="etth1")["significant"]


def test_table3_numbers_and_failed_seed_excluded(report_study, report_kit):
    t3 = stats.table3(load_results(report_study))
    m = report_kit.REPORT_METRICS
    assert set(t3["arm"]) == {"gating=true", "grouping=original", "grouping=fine_grained"}

    sig = row_of(t3, task="imdb", arm="grouping=original")
    base, arm = np.array(m["imdb"]["baseline"]), np.array(m["imdb"]["grouping=original"])
    assert (sig["rel_mean"], sig["rel_lo"], sig["rel_hi"]) == pytest.approx(hand_ci((arm - base) / base))
    # Holm over the task's arms that have trials of their own (not the baseline's own level) and can reach p < 0.05:
    # imdb's gating=true diverged on a seed, and its 5 pairs (smallest sign-flip p 2/32) leave the family
    # (Tarone's rule; this test once expected the family of two, 2 * 2/64, not significant)
    gating = row_of(t3, task="imdb", arm="gating=true")
    assert gating["n_pairs"] == 5 and np.isnan(gating["p_holm"]) and not gating["significant"]
    assert sig["p_signflip"] == pytest.approx(2 / 64) and sig["p_holm"] == pytest.approx(2 / 64)
    assert sig["significant"] and sig["mark"] == "*"
    # at alpha = 0.1 the 5 pairs can reach it: a family of two, 2 * 2/64 = 0.0625 < 0.1
    sig = row_of(stats.table3(load_results(report_study), alpha=0.1), task="imdb", arm="grouping=original")
    assert sig["p_holm"] == pytest.approx(2 * 2 / 64) and sig["significant"] and sig["mark"] == "*"

    mixed = row_of(t3, task="etth1", arm="grouping=original")
    assert mixed["p_signflip"] > 0.05 and not mixed["significant"] and mixed["mark"] == ""

    gating = row_of(t3, task="etth1", arm="gating=true")  # seed 5 failed: 5 pairs, min p = 2/32
    assert gating["n_pairs"] == 5 and gating["n_not_ok"] == 1
    assert gating["p_signflip"] == pytest.approx(2 / 32) and not gating["significant"]
    base5, arm5 = np.array(m["etth1"]["baseline"][:5]), np.array(m["etth1"]["gating=true"][:5])
    assert gating["rel_mean"] == pytest.approx(np.mean((base5 - arm5) / base5))

    same = row_of(t3, task="etth1", arm="grouping=fine_grained")  # the baseline trials themselves
    assert same["same_as_baseline"] and same["n_pairs"] == 6
    assert np.isnan(same["diff_mean"]) and np.isnan(same["p_signflip"]) and np.isnan(same["p_holm"])
    assert not same["significant"] and not row_of(t3, task="etth1", arm="gating=true")["same_as_baseline"]


# -- factorial ----------------------------------------------------------------------------------
def test_factorial_effects_match_cell_means(report_factorial_study, report_kit):
    effects = stats.factorial_effects(load_results(report_factorial_study))
    cells = {k: np.array(v) for k, v in report_kit.FACTORIAL_METRICS.items()}
    task_mean = np.mean(np.concatenate(list(cells.values())))
    y = {k: -(v - task_mean) / task_mean for k, v in cells.items()}  # min metric: lower = better
    cell = {k: v.mean() for k, v in y.items()}
    fine = (cell[("fine_grained", "false")] + cell[("fine_grained", "true")]) / 2
    orig = (cell[("original", "false")] + cell[("original", "true")]) / 2
    main = row_of(effects, kind="main", term="grouping", level="fine_grained")
    assert main["estimate"] == pytest.approx((fine - orig) / 2)
    assert row_of(effects, kind="main", term="grouping", level="original")["estimate"] == pytest.approx(-(fine - orig) / 2)
    inter = row_of(effects, kind="interaction", term="grouping x gating")
    expected = (cell[("fine_grained", "false")] - cell[("fine_grained", "true")]
                - cell[("original", "false")] + cell[("original", "true")]) / 4
    assert inter["estimate"] == pytest.approx(expected)
    assert main["lo"] < main["estimate"] < main["hi"] and main["significant"]
    assert (effects["n"] == 12).all()


def test_factorial_effects_take_seeds_as_matched_blocks(tmp_path, report_kit):
    # every cell of a seed shares its initial weights and data order: a seed that is better or worse
    # for every cell alike must not widen the effects' CIs (as a paired comparison ignores it)
    offsets, noise = [0.0, 0.3, -0.2, 0.5], [0.002, -0.001, 0.0015, -0.002]
    for seed, (offset, eps) in enumerate(zip(offsets, noise)):
        for k, (grouping, gating) in enumerate([("fine_grained", "false"), ("fine_grained", "true"),
                                                ("original", "false"), ("original", "true")]):
            arm = f"factorial:grouping={grouping},gating={gating}"
            best = 2.0 + offset - 0.1 * (grouping == "fine_grained") + eps * (-1) ** k
            row = report_kit.trial_row("etth1", "baseline", seed, best)
            row.update(trial_id=f"f{seed}{k}", arm=arm, axis="factorial", arms=json.dumps([arm]))
            write_trial(tmp_path, row)
    main = row_of(stats.factorial_effects(load_results(tmp_path)), kind="main", term="grouping", level="fine_grained")
    mean = 2.0 + np.mean(offsets) - 0.05
    assert main["estimate"] == pytest.approx(0.05 / mean)  # (lower is better: +, in units of the task's mean)
    assert main["significant"] and main["hi"] - main["lo"] < 0.01  # seeds' offsets (0.7 apart) are not noise


def test_several_trials_of_one_factorial_cell_and_seed_are_averaged_with_a_warning(tmp_path, report_kit):
    # results of two study versions (load_results(..., all_trials=True)) must not count a cell-seed twice:
    # the fit is that of the averaged values, with the degrees of freedom of one value per cell-seed
    def cell(seed, k, grouping, gating, best, version=""):
        arm = f"factorial:grouping={grouping},gating={gating}"
        row = report_kit.trial_row("etth1", "baseline", seed, best)
        row.update(trial_id=f"f{seed}{k}{version}", arm=arm, axis="factorial", arms=json.dumps([arm]))
        return row

    levels = [("fine_grained", "false"), ("fine_grained", "true"), ("original", "false"), ("original", "true")]
    rows = [cell(seed, k, *lv, 2.0 + 0.1 * k + 0.01 * seed * (-1) ** k) for seed in range(3) for k, lv in enumerate(levels)]
    once, twice = tmp_path / "once", tmp_path / "twice"
    for row in rows:
        write_trial(once, row)
        write_trial(twice, row)
    first = rows[1]  # its cell-seed ran twice, 2.11 and 2.31: their mean 2.21 is the cell-seed's value
    write_trial(once, {**first, "best_metric": 2.21})
    write_trial(twice, {**first, "best_metric": 2.11})
    write_trial(twice, {**first, "trial_id": first["trial_id"] + "v2", "best_metric": 2.31})
    expected = stats.factorial_effects(load_results(once))
    with pytest.warns(stats.StatsWarning, match=r"2 trials of 1 cell-seeds\); their values are averaged"):
        got = stats.factorial_effects(load_results(twice, all_trials=True))
    assert got["n"].iloc[0] == 12
    cols = ["estimate", "se", "p_value"]
    np.testing.assert_allclose(got[cols].to_numpy(dtype=float), expected[cols].to_numpy(dtype=float), rtol=1e-9)


def test_parse_factorial_arm_keeps_commas_inside_levels():
    arm = "factorial:priorities=[1.0, 3.0, 5.0],gating=true"
    assert stats.parse_factorial_arm(arm) == {"priorities": "[1.0, 3.0, 5.0]", "gating": "true"}
    with pytest.raises(ValueError, match="factorial"):
        stats.parse_factorial_arm("grouping=original")


def test_parse_factorial_arm_splits_at_every_axis_name_a_study_file_allows():
    # axis names match [A-Za-z0-9_.+-]+ (a named-level axis "lr-scale", "2x"): the cell
    # "factorial:gating=true,lr-scale=big" was one factor gating with the level "true,lr-scale=big"
    assert stats.parse_factorial_arm("factorial:gating=true,lr-scale=big") == {"gating": "true", "lr-scale": "big"}
    assert stats.parse_factorial_arm("factorial:priorities=[1, 1e-3, 5],2x=on") == {"priorities": "[1, 1e-3, 5]", "2x": "on"}


def test_the_factorial_effects_of_an_axis_named_with_a_hyphen(tmp_path, report_kit):
    for gating, scale in itertools.product(("false", "true"), ("big", "small")):
        arm = f"factorial:gating={gating},lr-scale={scale}"
        for seed in range(3):
            row = report_kit.trial_row("etth1", "baseline", seed, 1.0 + 0.2 * (scale == "small") + 0.01 * seed)
            row.update(trial_id=f"f-{gating}-{scale}-{seed}", arm=arm, axis="factorial", arms=json.dumps([arm]))
            write_trial(tmp_path, row)
    effects = stats.factorial_effects(load_results(tmp_path))
    assert set(effects["term"]) == {"gating", "lr-scale", "gating x lr-scale"}
    main = effects[effects["kind"] == "main"].set_index(["term", "level"])["estimate"]
    assert main["gating", "true"] == pytest.approx(0, abs=1e-12)
    assert main["lr-scale", "big"] > 0 > main["lr-scale", "small"]  # (mse: lower is better, big is better)


def test_no_factorial_cells_gives_empty_effects(report_study):
    assert stats.factorial_effects(load_results(report_study)).empty


# -- cost ---------------------------------------------------------------------------------------
def _write_cost_study(out, report_kit):
    """etth1: seed 0 reaches AdamW's best at epoch 2, seed 1 never does, seed 2's MetaAdamW failed."""
    def hist(vals, epoch_s):
        return [{"epoch": e, "step": 100 * e, "val_mse": v, "wall_s": epoch_s * e} for e, v in enumerate(vals, 1)]

    cases = {0: [0.0120, 0.0099, 0.0095], 1: [0.013, 0.012, 0.011], 2: [0.013, 0.012, 0.011]}
    for seed, meta_vals in cases.items():
        write_trial(out, report_kit.trial_row("etth1", "adamw", seed, 0.0100), hist([0.012, 0.0105, 0.0100], 10.0))
        row = report_kit.trial_row("etth1", "baseline", seed, min(meta_vals))
        if seed == 2:
            row.update(status="failed", error="boom", trial_id="meta-failed")
        write_trial(out, row, hist(meta_vals, 12.5))


def test_time_to_target_reached_and_not_reached(tmp_path, report_kit):
    _write_cost_study(tmp_path, report_kit)
    ttt = stats.time_to_target(load_results(tmp_path)).set_index("seed")
    hit = ttt.loc[0]
    assert hit["reached"] and (hit["epoch"], hit["step"], hit["wall_s"]) == (2, 200, 25.0)
    assert hit["target"] == pytest.approx(0.0100)
    assert (hit["ref_epoch"], hit["ref_step"], hit["ref_wall_s"]) == (3, 300, 30.0)
    assert hit["wall_ratio"] == pytest.approx(25.0 / 30.0)
    miss = ttt.loc[1]
    assert not miss["reached"] and np.isnan(miss["step"]) and np.isnan(miss["wall_s"]) and miss["note"] == "not reached"
    failed = ttt.loc[2]
    assert not failed["reached"] and "meta-failed" in failed["note"] and "failed" in failed["note"]
    # AdamW has a result to reach there: the seed has its target and counts as not reaching it (it had none,
    # and the report's 'reached on k of n seeds' left it out of n)
    assert failed["target"] == pytest.approx(0.0100) and failed["ref_epoch"] == 3


def test_validation_curves_average_the_matched_seeds(tmp_path, report_kit):
    # AdamW finished seeds 0, 2, 3; MetaAdamW seeds 1, 2, 3 (seed 0 diverged): the curves, as Table 2, show
    # seeds 2 and 3 (each arm's mean was over its own three, with n=3 beside a table of 2 pairs)
    vals = {("adamw", 0): [1.0, 0.5], ("adamw", 2): [2.0, 1.0], ("adamw", 3): [3.0, 1.5],
            ("baseline", 1): [9.0, 9.0], ("baseline", 2): [1.0, 0.2], ("baseline", 3): [2.0, 0.4]}
    for (arm, seed), curve in vals.items():
        write_trial(tmp_path, report_kit.trial_row("etth1", arm, seed, min(curve)),
                    [{"epoch": e, "val_mse": v} for e, v in enumerate(curve, 1)])
    row = report_kit.trial_row("etth1", "baseline", 0, float("nan"))
    row.update(status="diverged")
    write_trial(tmp_path, row)
    curves = stats.validation_curves(load_results(tmp_path), "etth1").set_index(["arm", "epoch"])
    assert curves.loc[("adamw", 1), ["mean", "min", "max"]].tolist() == [2.5, 2.0, 3.0]
    assert curves.loc[("baseline", 2), ["mean", "min", "max"]].tolist() == pytest.approx([0.3, 0.2, 0.4])
    assert curves.loc[("adamw", 1), ["n", "left_out"]].tolist() == [2, 1]
    assert curves.loc[("baseline", 1), ["n", "left_out"]].tolist() == [2, 1]
    alone = stats.validation_curves(load_results(tmp_path), "etth1", arms=["adamw", "gating=true"])
    assert set(alone["arm"]) == {"adamw"} and alone["n"].iloc[0] == 3, "an arm without ok trials matches nothing"
    # two ok trials of one seed (an older study version's, loaded with all_trials=True): the seed counts once,
    # with their mean, as the tables count it
    row = report_kit.trial_row("etth1", "adamw", 2, 0.5)
    row.update(trial_id="adamw-2-again")
    write_trial(tmp_path, row, [{"epoch": 1, "val_mse": 4.0}, {"epoch": 2, "val_mse": 0.5}])
    both = stats.validation_curves(Results(load_results(tmp_path, all_trials=True).trials,
                                           load_results(tmp_path, all_trials=True).history, pd.DataFrame()), "etth1")
    both = both.set_index(["arm", "epoch"])
    assert both.loc[("adamw", 1), ["mean", "min", "max", "n", "left_out"]].tolist() == [3.0, 3.0, 3.0, 2, 1]


def test_time_to_target_for_max_metric(report_study):
    ttt = stats.time_to_target(load_results(report_study))
    imdb = ttt[ttt["task"] == "imdb"].set_index("seed")
    # seed 1: baseline 0.81 never reaches AdamW's 0.82; seed 0: baseline 0.81 reaches 0.80 at epoch 3
    assert not imdb.loc[1, "reached"] and imdb.loc[1, "note"] == "not reached"
    assert imdb.loc[0, "reached"] and imdb.loc[0, "epoch"] == 3 and imdb.loc[0, "wall_s"] == 36.0


def test_cost_table(report_study):
    cost = stats.cost_table(load_results(report_study))
    base = row_of(cost, task="etth1", arm="baseline")
    assert base["meta_share"] == pytest.approx(2.0 / 12.0)
    assert base["epochs_mean"] == 3 and base["time_total_mean_s"] == 36.0 and base["early_stopped"] == 0.0
    gating = row_of(cost, task="imdb", arm="gating=true")
    assert (gating["n_ok"], gating["n_not_ok"]) == (5, 1)


# -- performance profiles -----------------------------------------------------------------------
def test_performance_profile_values(tmp_path, report_kit):
    for task in ("imdb", "etth1"):  # (stored first: the order of the arms must not follow the order of storing)
        row = report_kit.trial_row(task, "gating=true", 0, 0.95)
        row.update(status="failed")
        write_trial(tmp_path, row)
    values = {("imdb", "baseline"): 0.6, ("etth1", "adamw"): 1.0, ("etth1", "baseline"): 0.8, ("imdb", "adamw"): 0.9}
    for (task, arm), best in values.items():
        write_trial(tmp_path, report_kit.trial_row(task, arm, 0, best))
    results = load_results(tmp_path)
    ratios = stats.profile_ratios(results)
    assert (list(ratios.index), list(ratios.columns)) == (["etth1", "imdb"], ["adamw", "baseline", "gating=true", "grouping=fine_grained"])
    assert ratios.loc["etth1", "adamw"] == pytest.approx(1.25)  # min: arm / best
    assert ratios.loc["imdb", "baseline"] == pytest.approx(1.5)  # max: best / arm
    assert ratios.loc["etth1", "baseline"] == ratios.loc["imdb", "adamw"] == 1.0
    # its only trial failed: no ok result on any task, inf everywhere (never within any tau)
    assert ratios["gating=true"].tolist() == [np.inf, np.inf]
    profile = stats.performance_profile(results, taus=[1.0, 1.25, 1.3, 1.5])
    assert list(profile["adamw"]) == [0.5, 1.0, 1.0, 1.0]
    assert list(profile["baseline"]) == [0.5, 0.5, 0.5, 1.0]
    assert list(profile["gating=true"]) == [0.0, 0.0, 0.0, 0.0]


def test_arms_with_equal_means_tie_in_the_performance_profile(tmp_path, report_kit):
    # (357 + 351 + 355) / 3 and (358 + 352 + 353) / 3 correct of 360: the same mean, whose float sums differ in the
    # last bit - the table printed 1.0000 for both, the figure gave one of them rho(1) = 0
    for arm, correct in (("adamw", [357, 351, 355]), ("baseline", [358, 352, 353])):
        for seed, c in enumerate(correct):
            row = report_kit.trial_row("imdb", arm, seed, c / 360)
            write_trial(tmp_path, row)
    results = load_results(tmp_path)
    ratios = stats.profile_ratios(results)
    assert ratios.loc["imdb", "adamw"] == ratios.loc["imdb", "baseline"] == 1.0
    assert stats.performance_profile(results, taus=[1.0]).loc[1.0, ["adamw", "baseline"]].tolist() == [1.0, 1.0]


def test_a_seed_with_several_trials_counts_once_in_the_performance_profile_as_in_the_tables(tmp_path, report_kit):
    # results of two versions of a study (load_results(..., all_trials=True)): the baseline's seed 0
    # stored twice. Table 2 averages per seed first (1.0 and 2.0: 1.5, AdamW's 1.4 and 1.6: 1.5, a
    # tie); the profile took the mean of the three trials (1.333) and made AdamW 12.5% worse
    for trial_id, arm, seed, best in (("b0v1", "baseline", 0, 1.0), ("b0v2", "baseline", 0, 1.0),
                                      ("b1", "baseline", 1, 2.0), ("a0", "adamw", 0, 1.4), ("a1", "adamw", 1, 1.6)):
        row = report_kit.trial_row("etth1", arm, seed, best)
        row.update(trial_id=trial_id, arms=json.dumps([arm]))
        write_trial(tmp_path, row)
    results = load_results(tmp_path, all_trials=True)
    with pytest.warns(stats.StatsWarning, match="several trials share a seed"):
        t2 = stats.table2(results)
    assert t2["adamw_mean"].iloc[0] == pytest.approx(1.5) and t2["meta_mean"].iloc[0] == pytest.approx(1.5)
    ratios = stats.profile_ratios(results)
    assert ratios.loc["etth1", "adamw"] == ratios.loc["etth1", "baseline"] == 1.0


def test_performance_profile_of_an_arm_that_never_ran_is_an_error(report_study):
    with pytest.raises(ValueError, match="no trial of arm.s. 'no_such_arm'.*adamw, baseline"):
        stats.performance_profile(load_results(report_study), arms=["adamw", "no_such_arm"])


def test_a_study_manifest_scopes_the_loaded_results_and_relabels_them(tmp_path):
    # a results directory outlives edits of its study file: only the trials of the study as last run
    # there are loaded (labelled as it labels them now); all_trials=True loads everything
    from ablate.results import write_manifest

    for tid, arm, seed in (("a", "baseline", 0), ("b", "objective=gradient", 0), ("old", "baseline", 0)):
        write_trial(tmp_path, {"trial_id": tid, "study": "s", "arm": arm, "arms": json.dumps([arm]), "axis": "",
                               "status": "ok", "task": "etth1", "seed": seed, "metric": "mse", "mode": "min",
                               "best_metric": 1.0, "finished_at": f"2026-01-01T00:00:0{seed}"},
                    [{"epoch": 1, "train_loss": 1.0}])
    write_manifest(tmp_path, "s", {"a": {"study": "s", "arm": "baseline", "arms": json.dumps(["baseline"]), "axis": ""},
                                   "b": {"study": "s", "arm": "obj=grad", "arms": json.dumps(["obj=grad"]), "axis": "obj"}})
    with pytest.warns(UserWarning, match="1 stored trial.s. are not part of the study"):
        res = load_results(tmp_path)
    assert sorted(res.trials["trial_id"]) == ["a", "b"] and sorted(res.history["trial_id"]) == ["a", "b"]
    assert res.trials.set_index("trial_id").loc["b", "arm"] == "obj=grad"
    everything = load_results(tmp_path, all_trials=True)
    assert len(everything.trials) == 3
    with pytest.warns(UserWarning, match="several trials share a seed"):
        stats._per_seed(stats.explode_arms(everything.trials), "etth1", "baseline")


# -- matched seeds, non-finite metrics, multiple comparisons, aliasing -------------------------
def _write(tmp_path, report_kit, task, arm, seed, best, *, status="ok", arms=None, trial_id=None):
    row = report_kit.trial_row(task, "adamw" if arm == "adamw" else "gating=true", seed, best)
    row.update(arm=arm, arms=json.dumps(arms or [arm]), status=status,
               trial_id=trial_id or f"{task}-{arm}-{seed}".replace("=", "_"))
    write_trial(tmp_path, row)


def test_holm_adjustment_by_hand():
    adjusted = stats.holm([0.01, 0.04, np.nan, 0.03])
    assert adjusted[[0, 1, 3]] == pytest.approx([0.03, 0.06, 0.06]) and np.isnan(adjusted[2])
    assert stats.holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])  # capped at 1, monotone
    assert stats.holm([]).shape == (0,)


def test_means_are_over_the_seeds_both_arms_finished(tmp_path, report_kit):
    # MetaAdamW failed on its hardest seed (2): AdamW's mean must not include that seed either, or
    # the table would put AdamW's mean of three seeds next to MetaAdamW's mean of two
    adamw, meta = [1.0, 1.1, 2.0], [0.9, 1.0, None]
    for seed in range(3):
        _write(tmp_path, report_kit, "etth1", "adamw", seed, adamw[seed])
        _write(tmp_path, report_kit, "etth1", "baseline", seed, meta[seed] if meta[seed] else 0.5,
               status="ok" if meta[seed] else "failed")
    _write(tmp_path, report_kit, "etth1", "adamw", 3, 0.1)  # an extra seed of AdamW alone
    row = row_of(stats.table2(load_results(tmp_path)), task="etth1")
    assert row["adamw_mean"] == pytest.approx(1.05) and row["meta_mean"] == pytest.approx(0.95)
    assert (row["adamw_n"], row["meta_n"], row["n_pairs"]) == (2, 2, 2)
    assert (row["adamw_n_unmatched"], row["meta_n_unmatched"], row["meta_n_not_ok"]) == (2, 0, 1)
    from ablate import report
    assert report.table2_display(stats.table2(load_results(tmp_path)))["seeds (better)"].iloc[0] == "2 (2); 2 unpaired left out"


def test_an_ok_trial_with_a_nan_metric_is_not_ok(tmp_path, report_kit):
    diffs = [0.01, -0.01, 0.02]
    for seed, d in enumerate(diffs):
        _write(tmp_path, report_kit, "etth1", "adamw", seed, 1.0)
        _write(tmp_path, report_kit, "etth1", "baseline", seed, np.nan if seed == 2 else 1.0 + d)
    results = load_results(tmp_path)
    row = row_of(stats.table2(results), task="etth1")
    assert row["n_pairs"] == 2 and row["meta_n_not_ok"] == 1 and row["p_signflip"] == pytest.approx(1.0)
    assert not row["significant"]
    seeds = stats.seeds_per_arm(results)
    assert row_of(seeds, arm="baseline")["n_ok"] == 2 and row_of(seeds, arm="baseline")["n_not_ok"] == 1
    failed = stats.failed_summary(results)
    assert failed["error"].tolist() == ["best_metric is nan (not finite)"]
    counts = stats.status_counts(results)  # counted once, as not ok, everywhere
    assert (counts["ok"], counts["no_metric"], counts["total"]) == (5, 1, 6)
    assert len(results.ok().trials) == 5
    # the elementary tests never read a NaN as a (significant) difference
    assert np.isnan(stats.sign_flip_pvalue([0.1, np.nan, 0.2])) and np.isnan(stats.paired_t_pvalue([0.1, np.inf]))
    cmp = stats.paired_comparison([1.0, 1.0, np.nan], [1.1, 0.9, 1.0], "min")
    assert cmp["n_pairs"] == 2 and cmp["p_signflip"] == 1.0


def test_profile_takes_matched_seeds_and_leaves_out_tasks_not_every_arm_ran(tmp_path, report_kit):
    # on etth1 the ablation arm failed on the hardest seed (2); compared on seeds 0-1 it is worse
    for seed, (base, arm) in enumerate([(1.0, 1.03), (1.0, 1.03), (2.0, None)]):
        _write(tmp_path, report_kit, "etth1", "baseline", seed, base)
        _write(tmp_path, report_kit, "etth1", "gating=true", seed, arm or 0.5, status="ok" if arm else "diverged")
    _write(tmp_path, report_kit, "imdb", "baseline", 0, 0.8)  # the ablation arm never ran imdb
    results = load_results(tmp_path)
    ratios = stats.profile_ratios(results)
    assert list(ratios.index) == ["etth1"]
    assert ratios.loc["etth1", "baseline"] == 1.0 and ratios.loc["etth1", "gating=true"] == pytest.approx(1.03)
    notes = stats.profile_notes(results)
    assert "etth1: means over seeds 0, 1 (seed(s) 2 not finished ok by every arm - not finished by gating=true: 2)" in notes
    assert "imdb: left out (not run by gating=true)" in notes


def test_a_task_no_arm_finished_ok_is_left_out_of_the_profile_with_a_note(tmp_path, report_kit):
    for seed in range(2):
        _write(tmp_path, report_kit, "etth1", "baseline", seed, 1.0)
        _write(tmp_path, report_kit, "etth1", "gating=true", seed, 1.1)
        for arm in ("baseline", "gating=true"):  # every imdb trial failed: its rows would cap every rho at 1/2
            _write(tmp_path, report_kit, "imdb", arm, seed, np.nan, status="failed")
    results = load_results(tmp_path)
    assert list(stats.profile_ratios(results).index) == ["etth1"]
    assert "imdb: left out (no arm finished a trial ok)" in stats.profile_notes(results)
    assert stats.performance_profile(results).max().to_dict() == {"baseline": 1.0, "gating=true": 1.0}


def test_a_non_positive_mean_metric_in_a_profile_is_named_in_the_notes(tmp_path, report_kit):
    # a perfect 0 on a "min" metric has no ratio to the others: it counts as never within any tau,
    # which must not pass for "the worst arm" without a word
    for seed in range(2):
        _write(tmp_path, report_kit, "etth1", "baseline", seed, 0.0)
        _write(tmp_path, report_kit, "etth1", "gating=true", seed, 1.0)
    results = load_results(tmp_path)
    assert stats.profile_ratios(results).loc["etth1"].to_dict() == {"baseline": np.inf, "gating=true": 1.0}
    assert stats.profile_notes(results) == [
        "etth1: baseline (mean 0) counted as never within any tau: a performance ratio needs positive metrics"]


def test_a_failed_trial_without_a_data_source_takes_its_tasks(tmp_path, report_kit):
    for seed in range(3):
        _write(tmp_path, report_kit, "etth1", "baseline", seed, 1.0, status="failed" if seed == 2 else "ok")
    row = report_kit.trial_row("etth1", "gating=true", 2, np.nan)  # (a trial failed before loading its data)
    row.update(trial_id="failed-early", status="failed", data_source=None)
    write_trial(tmp_path, row)
    sources = stats.data_sources(load_results(tmp_path))
    assert sources.to_dict("records") == [{"task": "etth1", "data": "embedded", "data_source": "embedded:synthetic-etth1",
                                           "n_trials": 4}]


def _write_test_split(tmp_path, report_kit, arm, seed, best, test):
    row = report_kit.trial_row("etth1", "adamw" if arm == "adamw" else "gating=true", seed, best)
    row.update(arm=arm, arms=json.dumps([arm]), trial_id=f"t-{arm}-{seed}".replace("=", "_"), test_mse=test,
               ref_test_persistence_mse=1.5)
    write_trial(tmp_path, row)


@pytest.mark.parametrize("missing", [np.nan, np.inf])  # (no test part, or a test perplexity that overflowed)
def test_the_paired_tables_on_the_held_out_test_split(tmp_path, report_kit, missing):
    # on validation MetaAdamW wins every seed; on the test split it loses every seed
    for seed in range(3):
        _write_test_split(tmp_path, report_kit, "adamw", seed, 1.0, 2.0)
        _write_test_split(tmp_path, report_kit, "baseline", seed, 0.9, 2.2 + seed / 10)
        _write_test_split(tmp_path, report_kit, "gating=true", seed, 0.8, missing if seed == 0 else 2.0)
    _write(tmp_path, report_kit, "imdb", "adamw", 0, 0.8)  # a task without a test split
    results = load_results(tmp_path)
    assert stats.tasks_with_test_split(results) == ["etth1"]
    val = row_of(stats.table2(results), task="etth1")
    test = stats.table2(results, split="test")
    assert list(test["task"]) == ["etth1"]
    test = test.iloc[0]
    assert (val["split"], val["metric"], val["rel_mean"] > 0) == ("validation", "mse", True)
    assert (test["split"], test["metric"], test["mode"]) == ("test", "test_mse", "min")
    assert test["adamw_mean"] == pytest.approx(2.0) and test["meta_mean"] == pytest.approx(2.3)
    assert test["rel_mean"] == pytest.approx(np.mean([-(0.2 + s / 10) / 2.0 for s in range(3)]))
    assert test["n_better"] == 0 and [c for c in test.index if c.startswith("ref_")] == ["ref_test_persistence_mse"]
    assert test["ref_test_persistence_mse"] == 1.5 and "ref_test_persistence_mse" not in val.index  # (each split its own)
    assert (test["adamw_n_not_ok"], test["meta_n_not_ok"], val["meta_n_not_ok"]) == (0, 0, 0)
    arm = row_of(stats.table3(results, split="test"), task="etth1", arm="gating=true")
    assert arm["n_pairs"] == 2 and arm["arm_mean"] == pytest.approx(2.0)  # (seed 0 has no test metric)
    assert arm["n_not_ok"] == 1 and row_of(stats.table3(results), task="etth1", arm="gating=true")["n_not_ok"] == 0
    assert arm["baseline_mean"] == pytest.approx(np.mean([2.3, 2.4]))
    from ablate import report
    md = report.write_report(tmp_path, tmp_path / "out", formats=("md",)).read_text()
    section = md.split("## MetaAdamW vs AdamW (Table 2 analogue, test split)", 1)[1].split("\n## ", 1)[0]
    assert "| etth1 | test_mse (min) | 2 " in section and "imdb" not in section and "held-out test metric" in section
    assert "## Ablations (Table 3 analogue, test split)" in md and "(Table 2 analogue, validation split)" in md
    with pytest.raises(ValueError, match="split must be one of"):
        stats.table2(results, split="train")


@pytest.mark.parametrize("sign", [1, -1])
def test_half_fraction_factorial_fits_main_effects_and_names_the_aliases(tmp_path, report_kit, sign):
    # 2^(3-1) with C = AB (or C = -AB): each two-factor interaction is confounded with the third main
    # effect; fitting it anyway would split every main effect in half between the two names
    true = {"a": 0.02, "b": 0.01, "c": -0.015}
    rng = np.random.default_rng(0)
    cells = [(a, b, sign * a * b) for a in (1, -1) for b in (1, -1)]
    level = {1: "x", -1: "y"}  # "x" sorts first: its effect-coded column is +1
    for seed in range(3):
        for k, (a, b, c) in enumerate(cells):
            y = true["a"] * a + true["b"] * b + true["c"] * c + rng.normal(0, 1e-4)
            arm = f"factorial:a={level[a]},b={level[b]},c={level[c]}"
            _write(tmp_path, report_kit, "etth1", arm, seed, 2.0 * (1 - y), trial_id=f"f{seed}{k}")
    effects = stats.factorial_effects(load_results(tmp_path))
    mean = np.mean([2.0 * (1 - (true["a"] * a + true["b"] * b + true["c"] * c)) for a, b, c in cells])
    for name, effect in true.items():  # y normalised by the task mean (2.0 here, up to the noise)
        est = row_of(effects, kind="main", term=name, level="x")
        assert est["estimate"] == pytest.approx(effect * 2.0 / mean, abs=3e-4) and est["aliased"] == ""
        assert est["significant"] and est["hi"] - est["lo"] < 1e-3
    inter = effects[effects["kind"] == "interaction"].set_index("term")
    assert inter["estimate"].isna().all() and not inter["significant"].any()
    minus = "-" if sign < 0 else ""
    assert inter.loc["a x b", "aliased"] == f"{minus}c=x" and inter.loc["a x c", "aliased"] == f"{minus}b=x"
    # and the fitted effect says what it stands for as well: c=x's estimate is C + A x B, and c=y's,
    # minus c=x's, is C_y - A x B (the sign used to be lost: both rows read "+ a x b")
    plus, minus = ("+", "-") if sign > 0 else ("-", "+")
    assert row_of(effects, kind="main", term="c", level="x")["confounded"] == f"{plus} a x b (x x x)"
    assert row_of(effects, kind="main", term="c", level="y")["confounded"] == f"{minus} a x b (x x x)"
    from ablate import report
    shown = report.factorial_display(effects)
    assert set(shown.loc[shown["term"] == "c", "level"].str.replace(" *", "", regex=False)) == {
        f"x ({plus} a x b (x x x))", f"y ({minus} a x b (x x x))"}
    assert (shown.loc[shown["term"] == "a x b", "effect [95% CI]"] == f"aliased with {'-' if sign < 0 else ''}c=x").all()
    assert report.plot_factorial_effects(effects, tmp_path).stat().st_size > 0  # the estimable effects


def test_table3_counts_the_baselines_unpaired_seeds_too(tmp_path, report_kit):
    for seed in range(4):  # the baseline finished seeds 0-3, the arm only 0-1
        _write(tmp_path, report_kit, "etth1", "baseline", seed, 1.0 + seed)
        if seed < 2:
            _write(tmp_path, report_kit, "etth1", "gating=true", seed, 1.1 + seed)
    t3 = stats.table3(load_results(tmp_path))
    row = row_of(t3, arm="gating=true")
    assert (row["n_pairs"], row["n_unmatched"], row["baseline_n_unmatched"]) == (2, 0, 2)
    assert row["baseline_mean"] == pytest.approx(1.5)  # seeds 0-1 only
    from ablate import report
    assert report.table3_display(t3)["seeds (better)"].iloc[0] == "2 (0); 2 unpaired left out"


def test_metaadamw_trials_without_a_meta_update_are_named_in_the_report_and_the_run_summary(tmp_path, report_kit):
    for seed in range(2):
        _write(tmp_path, report_kit, "etth1", "adamw", seed, 1.0)
        for arm in ("baseline", "gating=true"):
            row = report_kit.trial_row("etth1", arm, seed, 0.9)
            row.update(arm=arm, arms=json.dumps([arm]), trial_id=f"{arm}-{seed}".replace("=", "_"),
                       meta_updates=0 if arm == "baseline" or seed == 0 else 3)
            write_trial(tmp_path, row)
    results = load_results(tmp_path)
    idle = stats.without_meta_updates(results)
    assert idle.to_dict("records") == [{"task": "etth1", "arm": "baseline", "n": 2}, {"task": "etth1", "arm": "gating=true", "n": 1}]
    note = stats.idle_note(idle)
    assert note.startswith("3 ok MetaAdamW trial(s) made no meta-update (etth1 baseline: 2, etth1 gating=true: 1)")
    from ablate import report
    md = report.write_report(tmp_path, tmp_path / "out", formats=("md",)).read_text()
    assert f"**WARNING: {note}**" in md
    assert stats.without_meta_updates(Results(*(pd.DataFrame() for _ in range(3)))).empty


def test_trials_stored_under_the_earlier_best_epoch_rule_are_named_in_the_report(tmp_path, report_kit):
    # before ce49eab a gain under min_delta was not the best: such a trial's best_metric is not the
    # best value its history recorded, and comparing it with newer trials mixes two rules
    def history(trial_id, values, metric):
        return [{"trial_id": trial_id, "epoch": e, "step": 10 * e, "wall_s": float(e), f"val_{metric}": v}
                for e, v in enumerate(values, 1)]

    for seed in range(2):
        for task, arm, values, best in (("etth1", "baseline", [1.0, 0.9, 0.8995], 0.9),  # 0.8995: under min_delta
                                        ("etth1", "adamw", [1.0, 0.9, 0.95], 0.9),
                                        ("imdb", "baseline", [0.7, 0.8, 0.8004], 0.8 if seed else 0.8004)):
            row = report_kit.trial_row(task, arm, seed, best)
            row.update(arm=arm, arms=json.dumps([arm]), trial_id=f"{task}-{arm}-{seed}")
            write_trial(tmp_path, row, history_rows=history(row["trial_id"], values, row["metric"]))
    results = load_results(tmp_path)
    stale = stats.best_not_recorded_best(results)
    assert stale.to_dict("records") == [{"task": "etth1", "arm": "baseline", "n": 2}, {"task": "imdb", "arm": "baseline", "n": 1}]
    note = stats.best_rule_note(stale)
    assert note.startswith("3 ok trial(s) report a best metric that is not the best validation value they recorded "
                           "(etth1 baseline: 2, imdb baseline: 1)") and "--rerun TASK" in note
    from ablate import report
    md = report.write_report(tmp_path, tmp_path / "out", formats=("md",)).read_text()
    assert f"**WARNING: {note}**" in md


def test_the_run_summary_shows_an_arm_served_by_the_baselines_trials_as_such(tmp_path, report_kit):
    from ablate.sweep import summary_table

    for seed in range(2):
        _write(tmp_path, report_kit, "etth1", "baseline", seed, 1.0 + seed, arms=["baseline", "gating=true"])
        _write(tmp_path, report_kit, "etth1", "gating=false", seed, 1.1 + seed)
    table = summary_table(load_results(tmp_path))
    assert re.search(r"\n  gating=true += baseline \(same trials\)\n", table), table
    assert "+0.00%" not in table and "-7.50%" in table  # (gating=false: -10% and -5% per seed)


def test_cost_means_pair_each_arm_with_the_baseline_as_the_tables_do(tmp_path, report_kit):
    # MetaAdamW is 10% slower on every seed but failed its longest one: over its own ok seeds it
    # looked 45% faster than AdamW, contradicting Table 2's time change
    for seed, seconds in enumerate([100.0, 200.0, 400.0]):
        for arm, factor, status in (("adamw", 1.0, "ok"), ("baseline", 1.1, "failed" if seed == 2 else "ok")):
            row = report_kit.trial_row("etth1", "adamw" if arm == "adamw" else "gating=true", seed, 1.0)
            row.update(arm=arm, arms=json.dumps([arm]), status=status, trial_id=f"c-{arm}-{seed}",
                       time_total_s=seconds * factor, epochs_run=5 + seed * 5)
            write_trial(tmp_path, row)
    results = load_results(tmp_path)
    cost = stats.cost_table(results).set_index("arm")
    assert cost.loc["adamw", "time_total_mean_s"] == pytest.approx(150.0)
    assert cost.loc["baseline", "time_total_mean_s"] == pytest.approx(165.0)
    assert cost.loc["adamw", "epochs_mean"] == pytest.approx(7.5) and cost.loc["baseline", "epochs_mean"] == pytest.approx(7.5)
    assert (cost.loc["adamw", "n_ok"], cost.loc["adamw", "n_unmatched"]) == (3, 1)
    assert (cost.loc["baseline", "n_ok"], cost.loc["baseline", "n_not_ok"], cost.loc["baseline", "n_unmatched"]) == (2, 1, 0)
    assert stats.table2(results).iloc[0]["time_change"] == pytest.approx(0.1)
    from ablate.report import cost_display

    assert cost_display(stats.cost_table(results)).set_index("arm").loc["adamw", "ok / not ok"] == \
        "3 / 0; 1 unpaired left out"
    # an ablation arm that failed other seeds leaves AdamW's and the baseline's means alone
    for seed, status in enumerate(["ok", "failed", "ok"]):
        row = report_kit.trial_row("etth1", "gating=true", seed, 1.0)
        row.update(status=status, trial_id=f"c-gating-{seed}", time_total_s=50.0, epochs_run=5)
        write_trial(tmp_path, row)
    cost = stats.cost_table(load_results(tmp_path)).set_index("arm")
    assert cost.loc["adamw", "time_total_mean_s"] == pytest.approx(150.0)
    assert cost.loc["baseline", "time_total_mean_s"] == pytest.approx(165.0)
    assert (cost.loc["gating=true", "time_total_mean_s"], cost.loc["gating=true", "n_unmatched"]) == (50.0, 1)


def test_an_arm_served_by_the_baselines_trials_has_the_baselines_cost_row(tmp_path, report_kit):
    for seed, seconds in enumerate([100.0, 200.0, 400.0]):
        _write(tmp_path, report_kit, "etth1", "adamw", seed, 1.0, status="failed" if seed == 2 else "ok")
        row = report_kit.trial_row("etth1", "gating=true", seed, 1.0)
        row.update(arm="baseline", arms=json.dumps(["baseline", "features=basic"]), trial_id=f"m-{seed}",
                   time_total_s=seconds)
        write_trial(tmp_path, row)
    cost = stats.cost_table(load_results(tmp_path)).set_index("arm")
    columns = ["time_total_mean_s", "epochs_mean", "n_ok", "n_unmatched"]
    assert cost.loc["features=basic", columns].tolist() == cost.loc["baseline", columns].tolist() == [150.0, 3.0, 3, 1]


def test_the_table2_section_of_a_study_without_adamw_says_so(tmp_path, report_kit):
    from ablate.report import write_report

    for seed in range(2):
        _write(tmp_path, report_kit, "etth1", "baseline", seed, 1.0)
        _write(tmp_path, report_kit, "etth1", "gating=true", seed, 1.1)
    text = write_report(tmp_path, formats=("md",)).read_text()
    assert "No task on which both the 'adamw' and the 'baseline' arm have an ok trial: nothing to compare." in text
    assert "| etth1 | mse (min) | n/a" not in text  # (no Table 2 row of n/a means)


def test_arms_without_a_shared_seed_show_no_means_as_if_matched(tmp_path, report_kit):
    # AdamW finished seeds 0-1 only, MetaAdamW seeds 2-3 only: their means describe different seeds
    for seed, (a, m) in enumerate([(1.0, None), (1.1, None), (None, 0.5), (None, 0.6)]):
        _write(tmp_path, report_kit, "etth1", "adamw", seed, a if a is not None else 0.0,
               status="ok" if a is not None else "failed")
        _write(tmp_path, report_kit, "etth1", "baseline", seed, m if m is not None else 0.0,
               status="ok" if m is not None else "failed")
    row = stats.table2(load_results(tmp_path)).iloc[0]
    assert np.isnan(row["adamw_mean"]) and np.isnan(row["meta_mean"]) and row["n_pairs"] == 0
    assert (row["adamw_n_unmatched"], row["meta_n_unmatched"]) == (2, 2)
    from ablate.report import table2_display

    shown = table2_display(stats.table2(load_results(tmp_path))).iloc[0]
    assert shown["AdamW"] == shown["MetaAdamW"] == "n/a" and shown["seeds (better)"] == "0 (0); 4 unpaired left out"
    from ablate.report import write_report

    text = write_report(tmp_path, formats=("md",)).read_text()  # the table, not "no ok trial"
    assert "No ok trial of the 'adamw' or 'baseline' arm" not in text and "4 unpaired left out" in text


@pytest.mark.parametrize("who_diverged", ["winner", "loser"])
def test_a_win_on_the_seeds_the_winner_survived_is_not_marked_significant(tmp_path, report_kit, who_diverged):
    # MetaAdamW better by 10% on 8 seeds (sign-flip p = 2/256), but on 2 more seeds one arm diverged
    # where the other finished: the matched comparison leaves them out, and a '*' for the arm that
    # diverged there would rest on the seeds it survived
    for seed in range(10):
        adamw, meta = 1.0, 0.9
        status = {"adamw": "ok", "baseline": "ok"}
        if seed >= 8:
            status["baseline" if who_diverged == "winner" else "adamw"] = "diverged"
        for arm, value in (("adamw", adamw), ("baseline", meta)):
            _write(tmp_path, report_kit, "etth1", arm, seed, value, status=status[arm])
        _write(tmp_path, report_kit, "etth1", "gating=false", seed, adamw, status=status["adamw"])  # (as AdamW)
    results = load_results(tmp_path)
    t2 = row_of(stats.table2(results), task="etth1")
    assert t2["n_pairs"] == 8 and t2["rel_mean"] > 0 and t2["p_holm"] == pytest.approx(2 / 256)
    assert bool(t2["significant"]) is (who_diverged == "loser") and bool(t2["withheld"]) is (who_diverged == "winner")
    t3 = row_of(stats.table3(results), task="etth1", arm="gating=false")  # (the baseline wins here too)
    assert t3["mark"] == ("(*)" if who_diverged == "winner" else "*")
    from ablate import report

    md = report.write_report(tmp_path, tmp_path / "out", formats="md").read_text()
    assert ("| (*) |" in md) is (who_diverged == "winner")


@pytest.mark.parametrize("left_out", ["winner diverged", "winner not run", "loser diverged"])
def test_a_factorial_effect_resting_on_the_seeds_its_favoured_cell_survived_is_withheld(tmp_path, report_kit, left_out):
    # fine_grained is better by 0.1 (min metric) and fine_grained x gating=true by another 0.05 (an
    # interaction), over 8 seeds with small noise; on seed 7 one cell has no ok result. The fit leaves
    # it out, so an effect favouring that cell is withheld, as in Tables 2 and 3; one against it is not
    cells = [("fine_grained", "false"), ("fine_grained", "true"), ("original", "false"), ("original", "true")]
    gone = ("fine_grained", "true") if left_out.startswith("winner") else ("original", "true")
    rng = np.random.default_rng(0)
    for seed in range(8):
        for grouping, gating in cells:
            if (grouping, gating) == gone and seed == 7 and left_out == "winner not run":
                continue
            arm = f"factorial:grouping={grouping},gating={gating}"
            best = (2.0 + 0.1 * seed - 0.1 * (grouping == "fine_grained")
                    - 0.05 * (grouping == "fine_grained" and gating == "true") + 0.002 * rng.standard_normal())
            row = report_kit.trial_row("etth1", "baseline", seed, best)
            row.update(trial_id=f"f{seed}{grouping}{gating}", arm=arm, axis="factorial", arms=json.dumps([arm]))
            if (grouping, gating) == gone and seed == 7:
                row.update(status="diverged", best_metric=np.nan)
            write_trial(tmp_path, row)
    results = load_results(tmp_path)
    missing = stats.factorial_missing(results)
    assert missing[["seed", "arm", "status"]].values.tolist() == [
        [7, f"factorial:grouping={gone[0]},gating={gone[1]}", "not run" if left_out == "winner not run" else "diverged"]]
    effects = stats.factorial_effects(results)
    assert (effects["n"] == 31).all() and (effects["n_missing"] == 1).all()
    main = row_of(effects, kind="main", term="grouping", level="fine_grained")
    inter = row_of(effects, kind="interaction", term="grouping x gating")
    assert main["estimate"] > 0 and inter["estimate"] < 0 and main["p_holm"] < 0.05 and inter["p_holm"] < 0.05
    # every effect favours (fine_grained, true) - gating=true is better on average too, by the
    # interaction; (original, true) is favoured by gating's main effect alone (its interaction code is +1)
    winner = left_out.startswith("winner")
    assert effects["p_holm"].lt(0.05).all()
    assert effects["withheld"].tolist() == [winner, winner, True, True, winner]  # grouping (2 rows), gating (2), x
    assert (effects["significant"] == ~effects["withheld"]).all()
    from ablate import report

    shown = report.factorial_display(effects)["level"].tolist()
    mark = " (*)" if winner else " *"
    assert shown == [f"fine_grained{mark}", f"original{mark}", "false (*)", "true (*)", f"fine_grained x false{mark}"]
    md = report.write_report(tmp_path, tmp_path / "out", formats="md").read_text()
    status = "not run" if left_out == "winner not run" else "diverged"
    assert f"1 cell-seed(s) without an ok result where other cells of the seed have one: grouping={gone[0]}," \
           f"gating={gone[1]} on etth1 seed 7 ({status})" in md


def test_an_interaction_with_a_three_level_factor_is_withheld_when_it_rests_on_a_diverged_cell(tmp_path, report_kit):
    # A (2 levels) x B (3 levels): only cell (a1, b2) is better, and it diverged on seed 7. Interaction
    # a1 x b1 is estimated from that cell too - its weight there is (1 - 1/2)(0 - 1/3), though b2's
    # effect code in the a1 x b1 column is 0 - so it must be withheld like every other effect it drives
    rng = np.random.default_rng(1)
    for seed in range(8):
        for a in ("a1", "a2"):
            for b in ("b1", "b2", "b3"):
                arm = f"factorial:A={a},B={b}"
                best = 2.0 + 0.1 * seed - 0.1 * (a == "a1" and b == "b2") + 0.001 * rng.standard_normal()
                row = report_kit.trial_row("etth1", "baseline", seed, best)
                row.update(trial_id=f"f{seed}{a}{b}", arm=arm, axis="factorial", arms=json.dumps([arm]))
                if (a, b, seed) == ("a1", "b2", 7):
                    row.update(status="diverged", best_metric=np.nan)
                write_trial(tmp_path, row)
    effects = stats.factorial_effects(load_results(tmp_path))
    a1b1 = row_of(effects, kind="interaction", level="a1 x b1")
    assert a1b1["estimate"] < 0 and a1b1["p_holm"] < 0.05 and a1b1["withheld"] and not a1b1["significant"]
    tested = effects[effects["p_holm"] < 0.05]
    assert len(tested) == len(effects) and tested["withheld"].all()  # (every effect here is that cell's)


def test_a_factorial_cell_that_never_ran_on_one_task_is_missing_there(tmp_path, report_kit):
    for task, cells in (("etth1", ("a1", "a2")), ("imdb", ("a2",))):
        for seed in range(2):
            for a in cells:
                arm = f"factorial:A={a},B=b1"
                row = report_kit.trial_row(task, "baseline", seed, 1.0 + 0.1 * seed)
                row.update(trial_id=f"{task}{seed}{a}", arm=arm, axis="factorial", arms=json.dumps([arm]))
                write_trial(tmp_path, row)
    missing = stats.factorial_missing(load_results(tmp_path))
    assert missing.values.tolist() == [["imdb", 0, "factorial:A=a1,B=b1", "not run"],
                                       ["imdb", 1, "factorial:A=a1,B=b1", "not run"]]


def test_a_trial_whose_patience_ran_out_at_its_last_epoch_did_not_stop_early():
    # AdamW trials with a budget of 3 epochs: a1's patience ran out at epoch 3 (its stop_reason says
    # early_stopping) but it ran every epoch, as a0 did; only a2, stopped after epoch 2, stopped early
    base = {"task": "imdb", "arm": "adamw", "arms": '["adamw"]', "status": "ok", "metric": "accuracy",
            "mode": "max", "epochs": 3, "epochs_run": 3, "time_total_s": 1.0, "time_meta_s": 0.0}
    trials = pd.DataFrame([
        {**base, "trial_id": "a0", "seed": 0, "best_metric": 0.52, "stop_reason": "max_epochs"},
        {**base, "trial_id": "a1", "seed": 1, "best_metric": 0.53, "stop_reason": "early_stopping"},
        {**base, "trial_id": "a2", "seed": 2, "best_metric": 0.51, "stop_reason": "early_stopping", "epochs_run": 2},
    ])
    cost = stats.cost_table(Results(trials, pd.DataFrame(), pd.DataFrame()))
    assert cost["early_stopped"].iloc[0] == pytest.approx(1 / 3), "only the trial that ran 2 of its 3 epochs stopped early"


def test_time_to_target_counts_a_seed_with_several_ok_trials_once_with_their_mean(tmp_path, report_kit):
    # two ok AdamW trials of seed 0 (an older study version's, loaded with all_trials=True): the target was the
    # first stored one's best (the oldest), silently, where Table 2 takes their mean with a warning
    for arm, versions in (("adamw", [(0.020, "00"), (0.010, "09")]), ("baseline", [(0.012, "01"), (0.016, "05")])):
        for k, (best, second) in enumerate(versions):
            row = report_kit.trial_row("etth1", arm, 0, best)
            row.update(trial_id=f"{arm}-v{k}", arms=json.dumps([arm]), finished_at=f"2026-01-01T00:00:{second}")
            write_trial(tmp_path, row, report_kit.history_rows("etth1", arm, best))
    results = load_results(tmp_path, all_trials=True)
    with pytest.warns(stats.StatsWarning, match="several trials share a seed"):
        hit = stats.time_to_target(results).iloc[0]
    with pytest.warns(stats.StatsWarning):
        assert hit["target"] == pytest.approx(stats.table2(results)["adamw_mean"].iloc[0]) == pytest.approx(0.015)
    # AdamW reached its best at epoch 3 in both (30 s); each baseline trial's time counts, as each AdamW trial's
    # does: 0.0156, 0.0132, 0.012 reaches 0.015 at epoch 2, but 0.0208, 0.0176, 0.016 never does, so the seed has
    # no mean time (the two trials' mean curve 0.0182, 0.0154, 0.014 reached it at epoch 3: another rule than
    # the reference's)
    assert (hit["ref_epoch"], hit["ref_step"], hit["ref_wall_s"]) == (3, 300, 30.0)
    assert not hit["reached"] and np.isnan(hit["wall_s"]) and np.isnan(hit["wall_ratio"])
    assert hit["note"] == "not reached by trial baseline-v1 (1 of 2 ok trials of the seed reached it)"


def test_a_factorial_fit_without_residual_gives_p_0_or_1_as_the_paired_tests_do(tmp_path, report_kit):
    # every seed shows the same cell differences: the residual is 0 up to rounding; p was NaN for an exactly
    # zero standard error and a t of float noise otherwise (0.62 for an effect of 4e-17)
    cells = {("a", "x"): [0.9, 1.1], ("a", "y"): [0.9, 1.1], ("b", "x"): [1.3, 1.5], ("b", "y"): [1.3, 1.5]}
    for (grouping, gating), values in cells.items():
        arm = f"factorial:grouping={grouping},gating={gating}"
        for seed, best in enumerate(values):
            row = report_kit.trial_row("etth1", "baseline", seed, best)
            row.update(trial_id=f"f-{grouping}-{gating}-{seed}", arm=arm, axis="factorial", arms=json.dumps([arm]))
            write_trial(tmp_path / "additive", row)
            row.update(best_metric=1.0, best_mse=1.0)
            write_trial(tmp_path / "flat", row)
    effects = stats.factorial_effects(load_results(tmp_path / "additive")).set_index(["term", "level"])
    assert stats.paired_t_pvalue([0.4, 0.4]) == 0.0 and stats.paired_t_pvalue([0.0, 0.0]) == 1.0
    assert effects.loc[("grouping", "a"), "p_value"] == 0.0 and effects.loc[("grouping", "a"), "significant"]
    assert effects.loc[("gating", "x"), "p_value"] == 1.0 and effects.loc[("grouping x gating", "a x x"), "p_value"] == 1.0
    flat = stats.factorial_effects(load_results(tmp_path / "flat"))
    assert (flat["se"] == 0).all() and (flat["p_value"] == 1.0).all() and (flat["p_holm"] == 1.0).all()


def test_table3s_holm_family_is_the_ablation_arms_not_the_factorial_cells_too(tmp_path, report_kit):
    # a one-factor arm better on all 6 seeds (sign-flip p = 2/64) is significant alone; three factorial cells
    # compared with the baseline in the same table made it a family of 4 (p_holm 0.125)
    def write(out, factorial):
        for arm, values in {"baseline": [1.0] * 6, "gating=true": [0.9, 0.91, 0.92, 0.93, 0.94, 0.95]}.items():
            for seed, best in enumerate(values):
                row = report_kit.trial_row("etth1", "baseline", seed, best)
                row.update(trial_id=f"{arm}{seed}", arm=arm, arms=json.dumps([arm]))
                write_trial(out, row)
        for cell in ("a", "b", "c") if factorial else ():
            arm = f"factorial:grouping={cell},gating=true"
            for seed in range(6):
                row = report_kit.trial_row("etth1", "baseline", seed, 1.0 + 0.01 * (seed % 2 - 0.5))
                row.update(trial_id=f"{cell}{seed}", arm=arm, axis="factorial", arms=json.dumps([arm]))
                write_trial(out, row)
        return stats.table3(load_results(out))

    alone, mixed = write(tmp_path / "alone", False), write(tmp_path / "mixed", True)
    assert len(mixed) == 4
    for t3 in (alone, mixed):
        arm = row_of(t3, arm="gating=true")
        assert arm["p_holm"] == pytest.approx(2 / 64) and arm["significant"] and arm["mark"] == "*"
    cells = mixed[mixed["axis"] == "factorial"]
    assert cells["p_holm"].to_numpy() == pytest.approx(stats.holm(cells["p_signflip"]))  # (a family of their own)


def test_the_paired_intervals_of_tables_2_and_3_use_the_confidence_asked_for(report_study):
    # confidence=0.9 gave the arms' means 90% intervals but left diff_* and rel_* at 95%
    results = load_results(report_study)
    t2 = row_of(stats.table2(results, confidence=0.9), task="etth1")
    ok = results.trials[(results.trials["task"] == "etth1") & (results.trials["status"] == "ok")]
    adamw = ok[ok["arm"] == "adamw"].set_index("seed")["best_metric"]
    meta = ok[ok["arm"] == "baseline"].set_index("seed")["best_metric"]
    seeds = adamw.index.intersection(meta.index)
    d = (meta.loc[seeds] - adamw.loc[seeds]).to_numpy()
    half = sps.t.ppf(0.95, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert (t2["diff_lo"], t2["diff_hi"]) == pytest.approx((d.mean() - half, d.mean() + half))
    rel = (adamw.loc[seeds] - meta.loc[seeds]).to_numpy() / np.abs(adamw.loc[seeds].to_numpy())
    half = sps.t.ppf(0.95, len(rel) - 1) * rel.std(ddof=1) / np.sqrt(len(rel))
    assert (t2["rel_lo"], t2["rel_hi"]) == pytest.approx((rel.mean() - half, rel.mean() + half))
    t3 = row_of(stats.table3(results, confidence=0.9), task="etth1", arm="grouping=original")
    t3_95 = row_of(stats.table3(results), task="etth1", arm="grouping=original")
    ratio = sps.t.ppf(0.95, t3["n_pairs"] - 1) / sps.t.ppf(0.975, t3["n_pairs"] - 1)
    assert t3["diff_hi"] - t3["diff_mean"] == pytest.approx(ratio * (t3_95["diff_hi"] - t3_95["diff_mean"]))
