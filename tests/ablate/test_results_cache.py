"""The cache of result parts (``OUT/parts_cache/``): loading takes the rows of unchanged parts from
it instead of parsing thousands of small files, and gives exactly what parsing every part gives."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest

from ablate import results as store
from ablate.results import CACHE_DIR, PARTS_DIR, consolidate, load_results, write_manifest, write_trial


def _trial(out: Path, k: int, best: float | None = None) -> str:
    """Trial number ``k``: columns that differ between trials (a test metric on some, no telemetry
    or no history on others, an integer setting that is None for some: an object column when
    parts are concatenated, float64 once stored together)."""
    trial_id = f"{k:012x}"
    row = {"trial_id": trial_id, "study": "s", "arm": f"arm{k % 3}", "status": "ok" if k % 5 else "diverged",
           "best_metric": 0.5 + k if best is None else best, "finished_at": f"2026-11-30T10:{k:02d}:00",
           "seed": k, "priorities": [1.0, float(k), 1.0], "meta_every": None if k % 3 == 0 else 10}
    if k % 2:
        row["test_mse"] = 0.25 * k
    history = [] if k % 7 == 3 else [{"epoch": e, "val_mse": 1.0 / e + k, "meta_updates": e * k} for e in (1, 2, 3)]
    telemetry = [] if k % 4 == 1 else [{"meta_update": m, "group": f"g{g}", "alpha": 1.0 + m / (k + 1),
                                        "skipped": bool(m % 2)} for m in (0, 1) for g in range(2)]
    write_trial(out, row, history, telemetry)
    return trial_id


def _study(out: Path, n: int = 12) -> list[str]:
    ids = [_trial(out, k) for k in range(n)]
    write_manifest(out, "s", {t: {"study": "s", "arm": f"arm{k % 3}"} for k, t in enumerate(ids)})
    consolidate(out)
    return ids


def _parsed(out: Path, tmp: Path, **kwargs) -> store.Results:
    """load_results of a copy of ``out`` without its cache: every part parsed."""
    copy = tmp / "uncached"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(CACHE_DIR))
    return load_results(copy, **kwargs)


def _same(got: store.Results, want: store.Results) -> None:
    for table in store.TABLES:
        pd.testing.assert_frame_equal(getattr(got, table), getattr(want, table), obj=table)


@pytest.fixture
def parsed_parts(monkeypatch):
    """The part files parsed, in order."""
    seen: list[str] = []
    parse = store._parse_part

    def counting(path, *args, **kwargs):
        if Path(path).parent.name == PARTS_DIR:
            seen.append(Path(path).name)
        return parse(path, *args, **kwargs)

    monkeypatch.setattr(store, "_parse_part", counting)
    return seen


def test_unchanged_parts_come_from_the_cache_with_the_same_tables(tmp_path, parsed_parts):
    out = tmp_path / "s"
    _study(out)
    assert (out / CACHE_DIR / "index.json").exists()
    want = _parsed(out, tmp_path)
    parsed_parts.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = load_results(out)
    assert parsed_parts == [], "every part is in the cache"
    _same(got, want)
    assert len(got.trials) == 12 and "test_mse" in got.trials and len(got.history) == 3 * 10
    _same(load_results(out, all_trials=True), _parsed(out, tmp_path, all_trials=True))


def test_new_and_rewritten_parts_are_parsed_and_replace_their_cached_rows(tmp_path, parsed_parts):
    out = tmp_path / "s"
    ids = _study(out)
    # computed again (--rerun): its three parts rewritten at once, the trial row with another value of the
    # same size (a size and modification time would not tell), history and telemetry with the same bytes.
    # A table whose cached part changed is parsed whole (the part's old rows may have widened the
    # types of its columns in the cache); the others take the new parts' rows in file order
    _trial(out, 4, best=-1.0)
    extra = _trial(out, 20)  # a new seed's trial
    write_manifest(out, "s", {t: {"study": "s", "arm": "arm0"} for t in [*ids, extra]})
    parsed_parts.clear()
    got = load_results(out)
    assert sorted(parsed_parts) == sorted([f"{t}.trials.parquet" for t in [*ids, extra]]
                                          + [f"{extra}.{t}.parquet" for t in ("history", "telemetry")])
    _same(got, _parsed(out, tmp_path))
    assert got.trials.set_index("trial_id").loc[ids[4], "best_metric"] == -1.0
    consolidate(out)  # the next run's end caches them too, in new files named by the new index
    parsed_parts.clear()
    again = load_results(out)
    assert parsed_parts == []
    _same(again, _parsed(out, tmp_path))
    assert sorted(p.name.split(".")[0] for p in (out / CACHE_DIR).glob("*.parquet")) == sorted(store.TABLES)


@pytest.mark.parametrize("damage", ["cache_table", "cache_table_gone", "index", "no_index", "other_version"])
def test_a_damaged_or_partial_cache_costs_time_only(tmp_path, damage):
    out = tmp_path / "s"
    _study(out)
    cache = out / CACHE_DIR
    (history,) = cache.glob("history.*.parquet")
    if damage == "cache_table":
        history.write_bytes(b"not parquet")
    elif damage == "cache_table_gone":  # (another process's consolidate replaced it since the index was read)
        history.unlink()
    elif damage == "index":
        (cache / "index.json").write_text("{")
    elif damage == "no_index":  # (a write cut off: the index is written last)
        (cache / "index.json").unlink()
    else:
        (cache / "index.json").write_text('{"version": 99, "tables": {}}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same(load_results(out), _parsed(out, tmp_path))
    consolidate(out)  # rewrites it
    _same(load_results(out), _parsed(out, tmp_path))


def test_a_damaged_part_is_noticed_through_the_cache_and_restored(tmp_path):
    # a cached part damaged afterwards is not taken from the cache: its bytes hash otherwise
    out = tmp_path / "s"
    ids = _study(out)
    before = load_results(out)
    part = out / PARTS_DIR / f"{ids[2]}.history.parquet"
    part.write_bytes(part.read_bytes()[:60])
    with pytest.warns(UserWarning, match=f"{ids[2]}.history.parquet is unreadable.*rows come from"):
        got = load_results(out)
    key = ["trial_id", "epoch"]
    pd.testing.assert_frame_equal(got.history.sort_values(key, ignore_index=True),
                                  before.history.sort_values(key, ignore_index=True))


@pytest.mark.parametrize("change", ["rewritten", "deleted"])
def test_a_part_that_widened_a_column_changes_it_back_with_or_without_the_cache(tmp_path, change):
    # the cache was written while one trial had None in an integer column (float64 once stored
    # together); that trial computed again with an integer, or its parts removed: int64 again
    out = tmp_path / "s"
    ids = _study(out)  # (meta_every None on trials 0, 3, 6, 9)
    for k in (0, 3, 6, 9):
        if change == "rewritten":
            write_trial(out, {**load_results(out).trials.set_index("trial_id").loc[ids[k]].to_dict(),
                              "trial_id": ids[k], "meta_every": 10})
        else:  # (removed by hand with the combined tables, which would otherwise restore them)
            for table in store.TABLES:
                (out / PARTS_DIR / f"{ids[k]}.{table}.parquet").unlink()
                (out / f"{table}.parquet").unlink(missing_ok=True)
    got = load_results(out, all_trials=True)
    assert got.trials["meta_every"].dtype == "int64" and len(got.trials) == (12 if change == "rewritten" else 8)
    _same(got, _parsed(out, tmp_path, all_trials=True))


def test_parts_of_unusual_ids_types_or_rows_load_as_parsed(tmp_path):
    out = tmp_path / "s"
    ids = ["abc", "abc-1", "abd"]  # ('-' sorts before '.': file order is not the order of the ids)
    for k, trial_id in enumerate(ids):
        write_trial(out, {"trial_id": trial_id, "status": "ok", "best_metric": 1.0 + k,
                          "finished_at": f"2026-11-30T10:0{k}:00", "warmup": "auto" if k == 0 else 5},
                    [{"epoch": e, "x": float(k)} for e in (1, 2)])
    # a part holding another trial's rows (copied over it), and a column of mixed types (str in one
    # trial, int in the others: the rows cannot be stored together, nor cached)
    store.atomic_write_parquet(pd.read_parquet(out / PARTS_DIR / "abd.history.parquet"),
                               out / PARTS_DIR / "abc.history.parquet")
    with pytest.warns(UserWarning, match=r"the column\(s\) warmup hold values of several types .* stored there as text"):
        consolidate(out)  # (it raised ArrowTypeError at the end of the run)
    assert sorted(pd.read_parquet(out / "trials.parquet")["warmup"]) == ["5", "5", "auto"]
    _trial(out, 7)  # a new part among the cached ones
    got = load_results(out, all_trials=True)
    _same(got, _parsed(out, tmp_path, all_trials=True))
    # file order: abc-1's part before abc's (which holds abd's rows, as parsing gives them: twice)
    assert list(dict.fromkeys(got.history["trial_id"])) == ["000000000007", "abc-1", "abd"]
    assert (got.history["trial_id"] == "abd").sum() == 4
    assert sorted(got.trials["warmup"].map(str)) == ["5", "5", "auto", "nan"]


def test_a_run_with_every_trial_stored_parses_each_part_once(tmp_path, parsed_parts, capsys):
    # results without a cache (a first run killed before its end wrote one): the run's start reads every part
    # to find the finished trials and its end reads them again to consolidate - from the cache the start wrote,
    # not parsing each part a second time (~20 s per 1,000 trials)
    from ablate.study import load_study
    from ablate.sweep import run_study
    from tests.ablate.study_helpers import tiny_study

    study = load_study(tiny_study(tmp_path))
    out = tmp_path / "results" / study.name
    for k, spec in enumerate(study.trials):
        write_trial(out, {**spec.config, "trial_id": spec.trial_id, "study": study.name, "arm": spec.arm,
                          "status": "ok", "best_metric": 0.5 + k, "best_epoch": 1, "metric": "mse", "mode": "min",
                          "finished_at": f"2026-11-30T10:0{k}:00"},
                    [{"epoch": 1, "val_mse": 0.5 + k}], [{"meta_update": 0, "group": "g0", "alpha": 1.0}])
    outcome = run_study(study, tmp_path / "results")
    assert (outcome.ran, outcome.reused) == (0, len(study.trials))
    assert sorted(parsed_parts) == sorted(p.name for p in (out / PARTS_DIR).iterdir()), "each part parsed once"
    _same(outcome.results, _parsed(out, tmp_path))
