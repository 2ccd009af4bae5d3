"""Result parts that were damaged after they were written: what the combined tables can restore is
restored, and what they cannot is counted as not finished (``--resume`` computes it again); nothing
already stored is lost on the way."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

from ablate.results import PARTS_DIR, consolidate, finished_trial_ids, load_results, write_manifest, write_trial


def _study(out: Path) -> None:
    """Two finished trials (three epochs of history and two meta-updates each), combined."""
    for k, trial_id in enumerate(("aaaaaaaaaaaa", "bbbbbbbbbbbb")):
        write_trial(out, {"trial_id": trial_id, "study": "s", "arm": f"arm{k}", "status": "ok", "best_metric": 0.5 + k,
                          "finished_at": f"2026-11-30T10:0{k}:00"},
                    history_rows=[{"epoch": e, "val_mse": 1.0 / e + k} for e in (1, 2, 3)],
                    telemetry_rows=[{"meta_update": m, "alpha": 1.0 + m} for m in (0, 1)])
    write_manifest(out, "s", {"aaaaaaaaaaaa": {"study": "s", "arm": "arm0"}, "bbbbbbbbbbbb": {"study": "s", "arm": "arm1"}})
    consolidate(out)


def _damage(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


@pytest.mark.parametrize("table, how", [("trials", "truncated"), ("history", "truncated"), ("telemetry", "truncated"),
                                        ("trials", "deleted"), ("history", "deleted"), ("telemetry", "deleted")])
def test_a_damaged_part_is_restored_from_the_combined_tables_and_rewritten(tmp_path, table, how):
    _study(tmp_path)
    before = load_results(tmp_path)
    part = tmp_path / PARTS_DIR / f"aaaaaaaaaaaa.{table}.parquet"
    if how == "truncated":
        _damage(part)
    else:  # (the combined trials table, and the trial's other parts, say that it had finished)
        part.unlink()
    with pytest.warns(UserWarning, match=f"aaaaaaaaaaaa.{table}.parquet is (unreadable|missing).*rows come from"):
        after = load_results(tmp_path)
    for name in ("trials", "history", "telemetry"):
        key = ["trial_id"] + (["epoch"] if name == "history" else ["meta_update"] if name == "telemetry" else [])
        got = getattr(after, name).sort_values(key).reset_index(drop=True)
        want = getattr(before, name).sort_values(key).reset_index(drop=True)
        assert got[want.columns].equals(want), name
    with pytest.warns(UserWarning, match="rows come from"):
        assert finished_trial_ids(tmp_path) == {"aaaaaaaaaaaa", "bbbbbbbbbbbb"}
    with pytest.warns(UserWarning, match="rows come from"):
        consolidate(tmp_path)  # rewrites the part from the combined rows, and keeps the combined rows
    assert part.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: no warning any more
        again = load_results(tmp_path)
    assert len(again.history) == 6 and len(again.telemetry) == 4 and len(again.trials) == 2


@pytest.mark.parametrize("table", ["trials", "history", "telemetry"])
def test_a_damaged_part_the_combined_tables_lack_makes_its_trial_unfinished_and_keeps_the_others(tmp_path, table):
    _study(tmp_path)
    for name in ("trials", "history", "telemetry"):
        (tmp_path / f"{name}.parquet").unlink()  # results copied without the combined tables
    _damage(tmp_path / PARTS_DIR / f"aaaaaaaaaaaa.{table}.parquet")
    with pytest.warns(UserWarning, match="aaaaaaaaaaaa.*computed again"):
        assert finished_trial_ids(tmp_path) == {"bbbbbbbbbbbb"}
    with pytest.warns(UserWarning, match="1 trial.*left out.*--resume"):
        res = load_results(tmp_path)
    assert list(res.trials["trial_id"]) == ["bbbbbbbbbbbb"]
    assert set(res.history["trial_id"]) == {"bbbbbbbbbbbb"} and len(res.history) == 3
    assert set(res.telemetry["trial_id"]) == {"bbbbbbbbbbbb"} and len(res.telemetry) == 2
    # the trial, computed again, replaces the damaged part
    write_trial(tmp_path, {"trial_id": "aaaaaaaaaaaa", "study": "s", "arm": "arm0", "status": "ok", "best_metric": 0.5,
                           "finished_at": "2026-11-30T11:00:00"}, history_rows=[{"epoch": 1, "val_mse": 1.0}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(consolidate(tmp_path).trials) == 2


def test_a_damaged_part_of_a_trial_the_study_no_longer_has_raises_no_alarm(tmp_path):
    # the study dropped trial aaaa (an arm or seed removed): its damaged part is not loaded anyway, and
    # no --resume will compute it again - a warning saying so would send the user after nothing
    _study(tmp_path)
    for name in ("trials", "history", "telemetry"):
        (tmp_path / f"{name}.parquet").unlink()
    _damage(tmp_path / PARTS_DIR / "aaaaaaaaaaaa.trials.parquet")
    write_manifest(tmp_path, "s", {"bbbbbbbbbbbb": {"study": "s", "arm": "arm1"}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = load_results(tmp_path)
    assert list(res.trials["trial_id"]) == ["bbbbbbbbbbbb"]
    assert [str(w.message) for w in caught if "damaged" in str(w.message)] == []
    with pytest.warns(UserWarning, match="1 trial.*left out.*damaged"):  # (all trials: it is one of them)
        load_results(tmp_path, all_trials=True)


@pytest.mark.parametrize("table", ["history", "telemetry"])
@pytest.mark.parametrize("how", ["unreadable", "missing"])
def test_a_damaged_part_whose_combined_table_is_lost_too_is_computed_again_not_emptied(tmp_path, table, how):
    # the combined trials table listed the trial, which was taken to mean that the combined history
    # held all its rows (maybe none): with that file unreadable or gone the trial was reused with no
    # history, and the next `ablate run` wrote the empty part, making the loss permanent
    _study(tmp_path)
    combined = tmp_path / f"{table}.parquet"
    _damage(combined) if how == "unreadable" else combined.unlink()
    _damage(tmp_path / PARTS_DIR / f"aaaaaaaaaaaa.{table}.parquet")
    message = "aaaaaaaaaaaa.*" + (f"{table}.parquet is unreadable too.*" if how == "unreadable" else "") + "computed again"
    with pytest.warns(UserWarning, match=message):
        assert finished_trial_ids(tmp_path) == {"bbbbbbbbbbbb"}
    with pytest.warns(UserWarning, match="1 trial.*left out"):
        assert list(load_results(tmp_path).trials["trial_id"]) == ["bbbbbbbbbbbb"]


def test_a_report_on_a_study_with_trials_not_run_says_how_many_and_of_which_arms(tmp_path):
    _study(tmp_path)
    write_manifest(tmp_path, "s", {"aaaaaaaaaaaa": {"study": "s", "arm": "arm0"}, "bbbbbbbbbbbb": {"study": "s", "arm": "arm1"},
                                   "cccccccccccc": {"study": "s", "arm": "arm1"}, "dddddddddddd": {"study": "s", "arm": "arm2"}})
    with pytest.warns(UserWarning, match=r"2 of the study's 4 trials have no stored result .*by arm: arm1 1, arm2 1\).*"
                                         r"--resume"):
        assert len(load_results(tmp_path).trials) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # `ablate run` says which trials did not finish itself
        consolidate(tmp_path)


@pytest.mark.parametrize("content", ["{bad", "", '{"study": "s", "trials": ["aaaaaaaaaaaa"]}'])
def test_an_unreadable_manifest_loads_every_stored_trial_with_a_warning(tmp_path, content):
    _study(tmp_path)
    (tmp_path / "study_trials.json").write_text(content)
    with pytest.warns(UserWarning, match=r"study_trials.json is unreadable .* every stored trial is loaded"):
        assert sorted(load_results(tmp_path).trials["trial_id"]) == ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]


def test_an_unreadable_combined_table_alone_is_one_line_and_exit_2(tmp_path, capsys):
    from ablate.cli import main
    from ablate.results import ResultsError

    (tmp_path / "trials.parquet").write_text("garbage")
    with pytest.raises(ResultsError, match=r"could not read .*trials.parquet .* no result parts"):
        load_results(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ablate: error: could not read") and "Traceback" not in err


def test_a_trial_cut_off_before_its_trial_row_is_not_run_not_damaged(tmp_path):
    # a driver killed between writing a trial's history and telemetry parts and its trial row
    # (written last): the trial did not finish, and no part of it is damaged
    _study(tmp_path)
    for name in ("trials", "history", "telemetry"):
        (tmp_path / f"{name}.parquet").unlink()  # (killed before any combined table was written)
    (tmp_path / PARTS_DIR / "aaaaaaaaaaaa.trials.parquet").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert finished_trial_ids(tmp_path) == {"bbbbbbbbbbbb"}
    with pytest.warns(UserWarning) as caught:
        res = load_results(tmp_path)
    assert [str(w.message) for w in caught if "damaged" in str(w.message)] == []
    assert any("1 of the study's 2 trials have no stored result" in str(w.message) for w in caught)
    assert list(res.trials["trial_id"]) == ["bbbbbbbbbbbb"] and set(res.history["trial_id"]) == {"bbbbbbbbbbbb"}


def test_results_of_combined_tables_alone_load_quietly_and_parts_added_beside_them_keep_them(tmp_path):
    _study(tmp_path)
    shutil.rmtree(tmp_path / PARTS_DIR)  # results copied without their parts/
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_results(tmp_path).trials) == 2
        consolidate(tmp_path)
        assert len(load_results(tmp_path).history) == 6
    # a new trial's parts beside them (an extra seed run into the copy): the combined rows are kept,
    # with one warning per table, and the next consolidate writes their parts
    write_trial(tmp_path, {"trial_id": "cccccccccccc", "study": "s", "arm": "arm0", "status": "ok", "best_metric": 0.1,
                           "finished_at": "2026-11-30T12:00:00"}, history_rows=[{"epoch": 1, "val_mse": 1.0}])
    with pytest.warns(UserWarning, match=r"2 result parts of the trials table are missing .*: their rows come from"):
        res = load_results(tmp_path, all_trials=True)
    assert sorted(res.trials["trial_id"]) == ["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"] and len(res.history) == 7
    with pytest.warns(UserWarning, match="rows come from"):
        consolidate(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_results(tmp_path, all_trials=True).history) == 7


@pytest.mark.parametrize("err", ["EACCES", "EIO"])
@pytest.mark.parametrize("cached", [False, True])
def test_a_part_that_cannot_be_read_for_now_is_an_error_not_damage_computed_again_over_it(tmp_path, monkeypatch, err,
                                                                                       cached):
    # a part the reader may not open (written by a colleague with a private umask) or a read error of
    # the disk says nothing about the part's bytes: it was taken for a damaged part, so the trial
    # counted as not finished and the next `ablate run` computed it again and wrote over it
    import errno

    from ablate.results import ResultsError

    _study(tmp_path)
    for name in ("trials", "history", "telemetry"):
        (tmp_path / f"{name}.parquet").unlink()  # (no combined table to stand in for it)
    if not cached:
        shutil.rmtree(tmp_path / "parts_cache")
    part = tmp_path / PARTS_DIR / "aaaaaaaaaaaa.history.parquet"
    read_bytes = Path.read_bytes

    def failing(self):
        if self == part:
            raise OSError(getattr(errno, err), os.strerror(getattr(errno, err)), str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", failing)
    for load in (finished_trial_ids, load_results, consolidate):
        with pytest.raises(ResultsError, match=f"cannot read the result part {part}.*make it readable") as raised:
            load(tmp_path)
        assert str(raised.value).endswith("If it is lost for good, delete it (and the trial's other parts): the next "
                                          "`ablate run` computes the trial again")
    monkeypatch.undo()
    assert finished_trial_ids(tmp_path) == {"aaaaaaaaaaaa", "bbbbbbbbbbbb"}


@pytest.mark.parametrize("table", ["trials", "history", "telemetry"])
def test_a_part_that_cannot_be_read_for_now_beside_combined_tables_says_deleting_it_restores_it(tmp_path, monkeypatch,
                                                                                             table):
    # the message said that deleting the part has the trial computed again, where the combined tables
    # hold the trial: deleting it restores it from them instead
    import errno

    from ablate.results import ResultsError

    _study(tmp_path)
    part = tmp_path / PARTS_DIR / f"aaaaaaaaaaaa.{table}.parquet"
    read_bytes = Path.read_bytes

    def failing(self):
        if self == part:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", failing)
    with pytest.raises(ResultsError, match=f"cannot read the result part {part}") as raised:
        finished_trial_ids(tmp_path)
    assert str(raised.value).endswith(
        f"a run would then write over it with the rows of the combined table. If it is lost for good, delete it: the "
        f"rows of {tmp_path / f'{table}.parquet'} stand in for it, and the next `ablate run` rewrites it from them")
    assert "computes the trial again" not in str(raised.value)
    monkeypatch.undo()
    part.unlink()  # (as the message says: the trial stays finished, its rows restored)
    with pytest.warns(UserWarning, match="rows come from"):
        assert finished_trial_ids(tmp_path) == {"aaaaaaaaaaaa", "bbbbbbbbbbbb"}
    with pytest.warns(UserWarning, match="rows come from"):
        consolidate(tmp_path)
    assert part.exists()


def _drop_column(path: Path, column: str) -> None:
    """Rewrite a Parquet table without ``column`` (a part or table written by hand, or by other code)."""
    import pandas as pd

    pd.read_parquet(path).drop(columns=[column]).to_parquet(path, index=False)


@pytest.mark.parametrize("table, column", [("trials", "status"), ("trials", "trial_id"), ("history", "trial_id"),
                                           ("telemetry", "trial_id")])
def test_a_part_without_a_column_its_rows_need_is_damaged_restored_from_the_combined_tables(tmp_path, table, column):
    # (a history part without trial_id lost the trial's curves without a word; a trials part without status or
    # trial_id gave a row no run reuses, or one of no trial, "not part of the study")
    _study(tmp_path)
    before = load_results(tmp_path)
    _drop_column(tmp_path / PARTS_DIR / f"aaaaaaaaaaaa.{table}.parquet", column)
    with pytest.warns(UserWarning, match=f"aaaaaaaaaaaa.{table}.parquet is unreadable .*no {column} column.*rows come "
                                         f"from"):
        after = load_results(tmp_path)
    for name in ("trials", "history", "telemetry"):
        got = getattr(after, name).sort_values(["trial_id"], kind="stable").reset_index(drop=True)
        want = getattr(before, name).sort_values(["trial_id"], kind="stable").reset_index(drop=True)
        assert got[want.columns].equals(want), name
    assert list(after.trials.sort_values("trial_id")["status"]) == ["ok", "ok"]
    with pytest.warns(UserWarning, match="rows come from"):
        assert finished_trial_ids(tmp_path) == {"aaaaaaaaaaaa", "bbbbbbbbbbbb"}


def test_a_part_without_a_column_its_rows_need_and_no_combined_table_leaves_its_trial_out_alone(tmp_path):
    _study(tmp_path)
    for name in ("trials", "history", "telemetry"):
        (tmp_path / f"{name}.parquet").unlink()
    _drop_column(tmp_path / PARTS_DIR / "aaaaaaaaaaaa.history.parquet", "trial_id")
    with pytest.warns(UserWarning, match="1 trial.*left out.*aaaaaaaaaaaa.history.parquet is unreadable .*no trial_id "
                                         "column"):
        res = load_results(tmp_path)
    assert list(res.trials["trial_id"]) == ["bbbbbbbbbbbb"] and len(res.history) == 3 and len(res.telemetry) == 2
    with pytest.warns(UserWarning, match="computed again"):
        assert finished_trial_ids(tmp_path) == {"bbbbbbbbbbbb"}


@pytest.mark.parametrize("column", ["status", "trial_id"])
def test_a_combined_trials_table_alone_without_a_column_its_rows_need_is_one_line_and_exit_2(tmp_path, column,
                                                                                             capsys):
    from ablate.cli import main
    from ablate.results import ResultsError

    _study(tmp_path)
    shutil.rmtree(tmp_path / PARTS_DIR)  # (the combined tables alone: results shared without their parts)
    _drop_column(tmp_path / "trials.parquet", column)
    with pytest.raises(ResultsError, match=f"could not read .*trials.parquet .*no {column} column.* no result parts"):
        load_results(tmp_path)
    with pytest.raises(ResultsError, match=f"no {column} column"):  # (`ablate run` failed with a bare KeyError)
        finished_trial_ids(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ablate: error: could not read") and "Traceback" not in err and "KeyError" not in err
