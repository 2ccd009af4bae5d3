"""The ETT forecasting tasks: CSV reading, splits, scaling, persistence, errors, embedded training."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from ablate.config import ConfigError
from ablate.tasks import DOWNLOADS, DataWarning, DatasetNotFoundError, get_task
from ablate.tasks import etth
from tests.ablate.task_helpers import SHARED_DATA, task_config, train_with_adamw

HEADER = "date,HUFL,HULL,MUFL,MULL,LUFL,LULL,OT"
# the small fixtures are not the published files: the tests that check the warning catch it themselves
pytestmark = pytest.mark.filterwarnings("ignore:ett[hm][12]. .* is not the published file:UserWarning")
# Persistence on the real ETTh1, 80/20 split of the windows, seq_len 96 (measured).
ETTH1_PERSISTENCE = {"standard": (0.0054353268, 0.0504869516), "standard_full": (0.0058514313, 0.0523838452)}


def write_ett_csv(path: Path, ot: np.ndarray, header: str = HEADER, freq: str = "h") -> np.ndarray:
    """An ETT CSV with hourly dates (``freq="15min"``: ETTm's); the load columns are 10 * OT + column index.
    Returns all 7 columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    loads = ot[:, None] * 10 + np.arange(6)[None, :]
    values = np.column_stack([loads, ot])
    hours = pd.date_range("2016-07-01", periods=len(ot), freq=freq)
    lines = [header] + [f"{h:%Y-%m-%d %H:%M:%S}," + ",".join(repr(float(v)) for v in row) for h, row in zip(hours, values)]
    path.write_text("\n".join(lines) + "\n")
    return values


def real_config(tmp_path: Path, **overrides) -> dict:
    return task_config("etth1", data="real", data_dir=str(tmp_path), seq_len=4, d_model=8, n_heads=2, n_layers=1, **overrides)


# -- reading ---------------------------------------------------------------------------------


def test_read_ett_csv_returns_the_requested_columns(tmp_path):
    ot = np.arange(10, dtype=float) * 0.5
    values = write_ett_csv(tmp_path / "ETTh1.csv", ot)
    np.testing.assert_array_equal(etth.read_ett_csv(tmp_path / "ETTh1.csv", ("OT",))[:, 0], ot)
    np.testing.assert_array_equal(etth.read_ett_csv(tmp_path / "ETTh1.csv", etth.ETT_COLUMNS), values)
    # a header with a space after each comma (as the values may have): the same columns, not "lacks OT"
    spaced = tmp_path / "spaced.csv"
    spaced.write_text((tmp_path / "ETTh1.csv").read_text().replace(",", ", "))
    np.testing.assert_array_equal(etth.read_ett_csv(spaced, etth.ETT_COLUMNS), values)


def test_csv_missing_ot_column_is_reported(tmp_path):
    path = tmp_path / "ETTh1.csv"
    write_ett_csv(path, np.arange(10.0), header="date,HUFL,HULL,MUFL,MULL,LUFL,LULL,TEMP")
    with pytest.raises(DatasetNotFoundError, match=r"lacks the column\(s\) OT") as info:
        etth.build_ett_task(real_config(tmp_path), etth.VARIANTS[0])
    assert str(path) in str(info.value)


def test_csv_with_non_numeric_value_is_reported(tmp_path):
    path = tmp_path / "ETTh1.csv"
    write_ett_csv(path, np.arange(10.0))
    lines = path.read_text().splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + ",n/a"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetNotFoundError, match=r"column OT has 1 empty or non-numeric value\(s\), the first on line 5: 'n/a'"):
        etth.read_ett_csv(path, ("OT",))


def test_errors_after_a_blank_line_name_the_line_of_the_file(tmp_path):
    # pandas skips blank lines: row + 2 named the line before the bad one once a blank line came above it
    path = tmp_path / "ETTh1.csv"
    write_ett_csv(path, np.arange(10.0))
    lines = path.read_text().splitlines()
    bad = lines[:3] + ["", "   "] + lines[3:]  # lines 4 and 5 blank: the 4th row is on line 7
    bad[7] = bad[7].rsplit(",", 1)[0] + ",n/a"  # line 8 (the 5th row)
    path.write_text("\n".join(bad) + "\n")
    with pytest.raises(DatasetNotFoundError, match=r"the first on line 8: 'n/a'"):
        etth.read_ett_csv(path, ("OT",))
    swapped = lines[:3] + [""] + [lines[4], lines[3]] + lines[5:]  # rows 3 and 4 swapped, on lines 5 and 6
    path.write_text("\n".join(swapped) + "\n")
    with pytest.raises(DatasetNotFoundError, match=r"not in time order: line 6 \(2016-07-01 02:00:00\) comes before "
                                                   r"line 5 \(2016-07-01 03:00:00\)"):
        etth.read_ett_csv(path, ("OT",))
    repeated = [lines[0], ""] + lines[1:4] + [lines[3]] + lines[4:]  # row 4 repeats row 3's stamp, on line 6
    path.write_text("\n".join(repeated) + "\n")
    with pytest.warns(UserWarning, match=r"repeat the timestamp of the row before, the first on line 6 "):
        assert len(etth.read_ett_csv(path, ("OT",))) == 11


def test_a_bad_value_met_in_a_sweep_names_the_fix(tmp_path):
    path = tmp_path / "ETTh1.csv"
    write_ett_csv(path, np.arange(10.0))
    path.write_text(path.read_text().replace(",9.0\n", ",\n"))
    with pytest.raises(DatasetNotFoundError, match=r"column OT .* line 11: ''\. If the file is damaged, move or delete it, "
                                                   r"then get it with `ablate data download etth1`"):
        etth.build_ett_task(real_config(tmp_path), etth.VARIANTS[0])


def test_rows_out_of_time_order_are_refused(tmp_path):
    # the splits are chronological: a reversed or shuffled file would train on the newest months
    path = tmp_path / "ETTh1.csv"
    write_ett_csv(path, np.arange(10.0))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + lines[:0:-1]) + "\n")  # header, then the rows newest first
    with pytest.raises(DatasetNotFoundError, match=r"not in time order: line 3 \(2016-07-01 08:00:00\) comes before "
                                                   r"line 2 \(2016-07-01 09:00:00\).*sort the file by date"):
        etth.read_ett_csv(path, ("OT",))
    # a repeated hour (a local clock's autumn change) is only a warning, as are stamps that cannot be
    # ordered reliably (day-first dates of a spreadsheet, step numbers): the rows are taken in file order
    path.write_text("\n".join(lines[:4] + lines[3:]) + "\n")
    with pytest.warns(DataWarning, match=r"1 row\(s\) repeat the timestamp of the row before, the first on line 5"):
        assert len(etth.read_ett_csv(path, ("OT",))) == 11
    day_first = [lines[0]] + [f"{i + 1:02d}/07/2016 00:00," + line.split(",", 1)[1] for i, line in enumerate(lines[1:])]
    path.write_text("\n".join(day_first) + "\n")
    with pytest.warns(DataWarning, match="time order of the rows is not checked: column date is mostly not ISO 8601"):
        assert etth.read_ett_csv(path, ("OT",))[:, 0].tolist() == list(np.arange(10.0))
    # one unreadable stamp among ISO ones does not switch the check off for the others
    blank = [lines[0]] + [("" if i == 3 else line.split(",", 1)[0]) + "," + line.split(",", 1)[1]
                          for i, line in enumerate(lines[:0:-1])]
    path.write_text("\n".join(blank) + "\n")
    with pytest.warns(DataWarning, match=r"1 empty or unreadable stamp\(s\), the first on line 5"):
        with pytest.raises(DatasetNotFoundError, match="not in time order: line 3"):
            etth.read_ett_csv(path, ("OT",))
    # ISO stamps with UTC offsets that change (daylight saving) are compared in UTC
    iso = [lines[0], "2016-10-30T01:30:00+02:00,1,1,1,1,1,1,1", "2016-10-30T01:00:00+01:00,1,1,1,1,1,1,2"]
    path.write_text("\n".join(iso) + "\n")
    assert etth.read_ett_csv(path, ("OT",))[:, 0].tolist() == [1.0, 2.0]
    path.write_text("\n".join(lines) + "\n")
    assert etth.read_ett_csv(path, ("OT",))[:, 0].tolist() == list(np.arange(10.0))


def test_empty_csv_is_reported(tmp_path):
    (tmp_path / "ETTh1.csv").write_text("")
    with pytest.raises(DatasetNotFoundError, match="not a readable ETT CSV"):
        etth.build_ett_task(real_config(tmp_path), etth.VARIANTS[0])


def test_a_file_too_short_for_the_split_says_what_fits_and_how_to_fetch_the_whole(tmp_path):
    write_ett_csv(tmp_path / "ETTh1.csv", np.arange(5, dtype=float))  # a copy cut short
    with pytest.raises(DatasetNotFoundError) as info:
        etth.build_ett_task(real_config(tmp_path), etth.VARIANTS[0])
    assert str(info.value) == (
        f"etth1 (real:{(tmp_path / 'ETTh1.csv').resolve()}): 5 steps are too few for the 80/20 split with seq_len=4. "
        f"A shorter seq_len fits a shorter series; if the file is a cut-short copy, `ablate data download etth1 "
        f"--data-dir {tmp_path} --force` fetches the published one, read in its place")  # (where the config looks:
    # the command named no --data-dir, so that it fetched the file into ./data, not where this config reads it)
    with pytest.raises(DatasetNotFoundError, match=r"seq_len=4\. If the file is a cut-short copy, `ablate data "):
        etth.build_ett_task(real_config(tmp_path, split="12/4/4"), etth.VARIANTS[0])  # (20 months, whatever seq_len)


def test_missing_file_names_the_expected_paths_and_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        etth.build_ett_task(real_config(tmp_path), etth.VARIANTS[0])
    message = str(info.value)
    assert str(tmp_path / "ETTh1.csv") in message and str(tmp_path / "ETT-small" / "ETTh1.csv") in message
    assert "ablate data download etth1" in message and etth.ETT_REPO in message


def test_the_download_command_named_fetches_where_the_config_looks(tmp_path):
    # without --data-dir the download landed in ./data; given the dataset's own folder (.../ETT-small) it
    # made .../ETT-small/ETT-small: either way the loader did not find it, and the error came back
    for data_dir, expected in ((tmp_path / "data", tmp_path / "data"), (tmp_path / "ETT-small", tmp_path),
                               (tmp_path / "my data", "'" + str(tmp_path / "my data") + "'")):
        with pytest.raises(DatasetNotFoundError) as info:
            get_task("etth1").build(task_config("etth1", data="real", data_dir=str(data_dir)))
        assert f"`ablate data download etth1 --data-dir {expected}`" in str(info.value)
    write_ett_csv(tmp_path / "ETT-small" / "ETTh1.csv", np.arange(3000.0))  # (not the published file: a warning)
    with pytest.warns(UserWarning, match=rf"`ablate data download etth1 --data-dir {tmp_path} --force` fetches the published one"):
        get_task("etth1").build(task_config("etth1", data="real", data_dir=str(tmp_path / "ETT-small"), seq_len=4,
                                            d_model=8, n_heads=2, n_layers=1))


def test_a_header_with_a_column_twice_is_reported(tmp_path):
    path = tmp_path / "ETTh1.csv"
    write_ett_csv(path, np.arange(10.0), header="date,HUFL,HULL,MUFL,MULL,LUFL,LULL, OT,OT")
    with pytest.raises(DatasetNotFoundError, match=r"has the column\(s\) OT more than once"):
        etth.read_ett_csv(path, ("OT",))


def test_missing_directory_names_the_expected_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match=str(missing / "ETT-small" / "ETTm2.csv")):
        get_task("ettm2").build(task_config("ettm2", data="real", data_dir=str(missing)))


def test_no_data_directory_at_all(monkeypatch):
    monkeypatch.delenv("ABLATE_DATA_DIR", raising=False)
    with pytest.raises(DatasetNotFoundError, match="needs a data directory") as info:
        get_task("etth1").build(task_config("etth1", data="real"))
    # the advice is what `ablate train` accepts (it refuses --set data_dir=... in favour of --data-dir)
    assert "--data-dir DIR for ablate train" in str(info.value) and "--set data_dir" not in str(info.value)


def test_too_short_file_is_reported(tmp_path):
    write_ett_csv(tmp_path / "ETTh1.csv", np.arange(200.0))
    with pytest.raises(DatasetNotFoundError, match=r"12/4/4 split needs 20 months of 720 steps \(14400 steps\)"):
        etth.build_ett_task(real_config(tmp_path, split="12/4/4"), etth.VARIANTS[0])


# -- splitting, scaling, windows ----------------------------------------------------------------


def test_split_80_20_splits_the_windows_chronologically():
    # 30 steps, seq_len 5: 25 windows, the first 20 train (targets 5..24), the last 5 validate.
    assert etth.split_bounds(30, 5, "80/20", month=1) == {"train": (5, 25), "val": (25, 30)}


def test_split_12_4_4_uses_months_of_the_file():
    assert etth.VARIANTS[0].month == 720 and etth.VARIANTS[2].month == 2880
    assert etth.split_bounds(17420, 96, "12/4/4", month=720) == {
        "train": (96, 8640),
        "val": (8640, 11520),
        "test": (11520, 14400),
    }
    with pytest.raises(ValueError, match="needs 20 months"):
        etth.split_bounds(14399, 96, "12/4/4", month=720)


@pytest.mark.parametrize("split, n_steps, month", [("80/20", 732, 36), ("12/4/4", 732, 36), ("12/4/4", 14400, 720)])
def test_max_seq_len_is_the_longest_window_split_bounds_accepts(split, n_steps, month):
    limit = etth.max_seq_len(split, n_steps, month)
    etth.split_bounds(n_steps, limit, split, month)
    with pytest.raises(ValueError):
        etth.split_bounds(n_steps, limit + 1, split, month)


def test_the_check_knows_the_length_of_the_embedded_series():
    assert len(etth.load_embedded_series()) == etth.EMBEDDED_STEPS
    task = get_task("etth1").build(task_config("etth1", seq_len=etth.max_seq_len("80/20", etth.EMBEDDED_STEPS, 0)))
    assert (len(task.train), len(task.val)) == (1, 1)
    with pytest.raises(ConfigError, match="seq_len=731 is too long"):
        task_config("etth1", seq_len=731)


def test_scalers_fit_the_training_part_only():
    values = np.array([[1.0], [2.0], [3.0], [100.0]])
    shift, scale = etth.fit_scaler(values, 3, "standard")
    assert shift[0] == pytest.approx(2.0) and scale[0] == pytest.approx(np.std([1.0, 2.0, 3.0]))
    shift, scale = etth.fit_scaler(values, 3, "minmax")
    assert (shift[0], scale[0]) == (1.0, 2.0)
    shift, scale = etth.fit_scaler(values, 3, "standard_full")
    assert shift[0] == pytest.approx(26.5)
    _, scale = etth.fit_scaler(np.ones((4, 1)), 3, "standard")
    assert scale[0] == 1.0  # constant column


def test_persistence_by_hand():
    target = np.array([0.0, 1.0, 3.0, 2.0, 2.0])
    # targets 3, 4: errors 2 - 3 = -1 and 2 - 2 = 0
    assert etth.persistence_metrics(target, 3, 5) == {"persistence_mse": 0.5, "persistence_mae": 0.5}


def test_the_12_4_4_split_reads_20_months_of_any_longer_file_without_a_warning(tmp_path):
    # a file cut to 15,000 rows gives the same 12/4/4 windows as the published 17,420: it was called not comparable
    write_ett_csv(tmp_path / "ETTh1.csv", np.sin(np.arange(15_000) / 24.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task = etth.build_ett_task(real_config(tmp_path, split="12/4/4"), etth.VARIANTS[0])
    assert "not the published" not in task.data_source and len(task.test) == 2880


def test_a_cut_short_file_scaled_by_the_whole_series_is_not_the_published_one_under_12_4_4(tmp_path):
    # standard_full scales by every row of the file, not only the 20 months 12/4/4 reads: an ETTm1 cut to
    # 60,000 of its 69,680 rows scored other metrics than the published file, without a warning or a mark
    path = (tmp_path / "ETT-small" / "ETTm1.csv").resolve()
    write_ett_csv(path, np.sin(np.arange(60_000) / 96.0), freq="15min")
    config = task_config("ettm1", data="real", data_dir=str(tmp_path), split="12/4/4", seq_len=4, d_model=8,
                         n_heads=2, n_layers=1)
    with pytest.warns(DataWarning, match=r"ettm1: .* is not the published file: 60,000 rows where it has 69,680"):
        task = get_task("ettm1").build({**config, "scaling": "standard_full"})
    assert task.data_source == f"real:{path} (not the published file: 60,000 rows where it has 69,680)"
    assert (len(task.train), len(task.val), len(task.test)) == (34560 - 4, 11520, 11520)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (scaled by the training months: the same as on the published file)
        assert get_task("ettm1").build(config).data_source == f"real:{path}"


def test_task_windows_scaling_and_reference_on_a_fixture(tmp_path):
    rng = np.random.default_rng(0)
    ot = np.cumsum(rng.normal(size=30))
    path = (tmp_path / "ETT-small" / "ETTh1.csv").resolve()
    write_ett_csv(path, ot)
    # a file of other length than the published one (a copy cut short): said, and recorded with the results
    with pytest.warns(DataWarning, match=rf"etth1: {path} is not the published file: 30 rows where it has 17,420 - "
                                         rf"metrics not comparable .*`ablate data download etth1 --data-dir {tmp_path} --force` fetches the published one"):
        task = get_task("etth1").build(real_config(tmp_path, scaling="standard"))
    assert task.data_source == f"real:{path} (not the published file: 30 rows where it has 17,420)"
    # 26 windows of 4 steps: 20 train (targets 4..23), 6 validate (targets 24..29)
    assert (len(task.train), len(task.val), task.test) == (20, 6, None)
    mean, std = ot[:24].mean(), ot[:24].std()
    scaled = (ot - mean) / std
    x, y = task.train[0]
    assert x.shape == (4, 1) and y.shape == ()
    np.testing.assert_allclose(x[:, 0].numpy(), scaled[:4], rtol=1e-5, atol=1e-6)
    assert float(y) == pytest.approx(scaled[4], abs=1e-6)
    x, y = task.val[0]  # the first validation window reads the last training steps
    np.testing.assert_allclose(x[:, 0].numpy(), scaled[20:24], rtol=1e-5, atol=1e-6)
    assert float(y) == pytest.approx(scaled[24], abs=1e-6)
    error = scaled[24:30] - scaled[23:29]
    assert task.reference["persistence_mse"] == pytest.approx(np.mean(error**2))
    assert task.reference["persistence_mae"] == pytest.approx(np.mean(np.abs(error)))
    with pytest.raises(IndexError):
        task.val[6]


def test_multivariate_inputs_end_with_ot(tmp_path):
    values = write_ett_csv(tmp_path / "ETTh1.csv", np.linspace(0.0, 1.0, 30))
    task = get_task("etth1").build(real_config(tmp_path, multivariate=True, scaling="standard"))
    x, _ = task.train[0]
    assert x.shape == (4, 7) and task.info["inputs"][-1] == "OT"
    train_part = values[:24]
    expected = (values[:4] - train_part.mean(axis=0)) / train_part.std(axis=0)
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert task.model(x[None]).shape == (1,)


def test_split_12_4_4_on_a_fixture_with_a_test_set(tmp_path):
    ot = np.sin(np.arange(14400) / 24.0) + np.arange(14400) / 1000.0
    write_ett_csv(tmp_path / "ETTh1.csv", ot)
    task = get_task("etth1").build(real_config(tmp_path, split="12/4/4", scaling="standard"))
    assert (len(task.train), len(task.val), len(task.test)) == (8640 - 4, 2880, 2880)
    assert task.info["target_shift"] == pytest.approx(ot[:8640].mean())
    _, y = task.test[len(task.test) - 1]
    assert float(y) == pytest.approx((ot[14399] - ot[:8640].mean()) / ot[:8640].std(), abs=1e-4)
    # the persistence reference on each split (the test tables show the test split's)
    scaled = (ot - ot[:8640].mean()) / ot[:8640].std()
    for prefix, (start, stop) in (("", (8640, 11520)), ("test_", (11520, 14400))):
        error = scaled[start:stop] - scaled[start - 1:stop - 1]
        assert task.reference[f"{prefix}persistence_mse"] == pytest.approx(np.mean(error**2), rel=1e-6)
        assert task.reference[f"{prefix}persistence_mae"] == pytest.approx(np.mean(np.abs(error)), rel=1e-6)


def test_unknown_split_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="split='70/30' is not allowed; choose one of: 80/20, 12/4/4"):
        get_task("etth1").build(task_config("etth1", split="70/30"))


# -- registration --------------------------------------------------------------------------------


def test_the_four_variants_are_registered_with_the_paper_defaults():
    for name in ("etth1", "etth2", "ettm1", "ettm2"):
        spec = get_task(name)
        assert [(m.name, m.mode) for m in spec.metrics] == [("mse", "min"), ("mae", "min")]
        assert spec.defaults["meta_every"] == 217 and spec.defaults["gating"] is True
        assert spec.defaults["seq_len"] == 96 and spec.defaults["d_model"] == 128
        assert spec.defaults["scaling"] == "standard" and spec.embedded_defaults["scaling"] == "standard"
        (download,) = DOWNLOADS[name]
        assert download.url.startswith(etth.ETT_RAW_URL) and download.subdir == "ETT-small"
        assert download.sha256 or download.md5


# -- embedded variant, training and evaluation -----------------------------------------------------


@pytest.fixture(scope="module")
def embedded_task():
    torch.manual_seed(0)
    return get_task("etth1").build(task_config("etth1"))


def test_embedded_variant_is_the_statsmodels_elnino_series(embedded_task):
    assert embedded_task.data_source == "embedded:statsmodels-elnino"
    assert etth.load_embedded_series().shape == (732, 1)
    assert (len(embedded_task.train), len(embedded_task.val)) == (566, 142)
    assert embedded_task.reference["persistence_mse"] == pytest.approx(0.26526, abs=1e-4)
    with pytest.raises(ConfigError, match="univariate"):
        get_task("etth1").build(task_config("etth1", multivariate=True))


def test_embedded_variant_trains_with_adamw():
    torch.manual_seed(0)
    task = get_task("etth1").build(task_config("etth1"))
    train_loader = DataLoader(task.train, batch_size=16, shuffle=True)
    val_loader = DataLoader(task.val, batch_size=64)
    before = task.evaluate(task.model, val_loader)
    losses = train_with_adamw(task, train_loader)  # one epoch, 36 steps
    after = task.evaluate(task.model, val_loader)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert after["mse"] < 0.8 * before["mse"]


def test_evaluate_averages_over_the_split_and_restores_the_mode(embedded_task):
    model = embedded_task.model
    model.train()
    by_7 = embedded_task.evaluate(model, DataLoader(embedded_task.val, batch_size=7))
    whole = embedded_task.evaluate(model, DataLoader(embedded_task.val, batch_size=len(embedded_task.val)))
    assert set(by_7) == {"mse", "mae"} and model.training
    assert by_7["mse"] == pytest.approx(whole["mse"], rel=1e-5) and by_7["mae"] == pytest.approx(whole["mae"], rel=1e-5)
    model.eval()
    embedded_task.evaluate(model, DataLoader(embedded_task.val, batch_size=64))
    assert not model.training


@pytest.mark.parametrize("training", [True, False])
def test_loss_is_twice_differentiable(embedded_task, training):
    embedded_task.model.train(training)
    batch = next(iter(DataLoader(embedded_task.train, batch_size=8)))
    params = [p for p in embedded_task.model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):  # as MetaAdamW's meta-update does
        grads = torch.autograd.grad(embedded_task.loss_fn(embedded_task.model, batch), params, create_graph=True)
        second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), params, allow_unused=True)
    assert any(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in second)


# -- the real file (skipped where ../shared/data is absent) ----------------------------------------


@pytest.mark.realdata
@pytest.mark.parametrize("scaling", ["standard", "standard_full"])
def test_real_etth1_persistence(scaling):
    """The paper's 0.005851 is the persistence MSE with the whole-series standardisation."""
    if not (SHARED_DATA / "ETT-small" / "ETTh1.csv").is_file():
        pytest.skip(f"no real ETTh1 under {SHARED_DATA}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the published file: 17,420 rows, no warning)
        task = get_task("etth1").build(task_config("etth1", data="real", data_dir=str(SHARED_DATA), scaling=scaling))
    assert task.data_source == f"real:{(SHARED_DATA / 'ETT-small' / 'ETTh1.csv').resolve()}"
    assert (len(task.train), len(task.val)) == (13859, 3465)
    mse, mae = ETTH1_PERSISTENCE[scaling]
    assert task.reference["persistence_mse"] == pytest.approx(mse, rel=1e-6)
    assert task.reference["persistence_mae"] == pytest.approx(mae, rel=1e-6)
    if scaling == "standard_full":
        assert round(task.reference["persistence_mse"], 6) == 0.005851


@pytest.mark.realdata
def test_real_etth1_checksum_matches_the_registered_download():
    path = SHARED_DATA / "ETT-small" / "ETTh1.csv"
    if not path.is_file():
        pytest.skip(f"no real ETTh1 under {SHARED_DATA}")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DOWNLOADS["etth1"][0].sha256


def test_a_file_directly_in_data_dir_is_found_beside_an_ett_small_folder_of_other_variants(tmp_path):
    # `ablate data download etth2` made data_dir/ETT-small; the ETTh1.csv already in data_dir is still read
    write_ett_csv(tmp_path / "ETTh1.csv", np.arange(300.0))
    write_ett_csv(tmp_path / "ETT-small" / "ETTh2.csv", np.arange(300.0))
    task = etth.build_ett_task(real_config(tmp_path), etth.VARIANTS[0])
    assert task.data_source.startswith(f"real:{(tmp_path / 'ETTh1.csv').resolve()}")
    assert get_task("etth1").locate(real_config(tmp_path)) == [tmp_path / "ETTh1.csv"]


def test_a_short_file_directly_in_data_dir_is_read_no_more_once_the_download_advised_has_run(tmp_path):
    # the warning said the download "fetches it over this one", but the download writes data_dir/ETT-small/ETTh1.csv
    # beside the copy directly in data_dir: the published file is read in its place (ETT-small is looked in first)
    write_ett_csv(tmp_path / "ETTh1.csv", np.arange(600.0) % 24)
    with pytest.warns(DataWarning) as caught:
        etth.build_ett_task(real_config(tmp_path), etth.VARIANTS[0])
    said = [str(w.message) for w in caught if "not the published file" in str(w.message)]
    assert len(said) == 1 and said[0].endswith(
        f"(`ablate data download etth1 --data-dir {tmp_path} --force` fetches the published one, read in its place)")
    published = tmp_path / "ETT-small" / "ETTh1.csv"  # where that download writes it (its 17,420 rows, here any)
    write_ett_csv(published, np.arange(900.0) % 24)
    assert get_task("etth1").locate(real_config(tmp_path)) == [published]
    task = etth.build_ett_task(real_config(tmp_path), etth.VARIANTS[0])
    assert task.data_source.startswith(f"real:{published.resolve()}")
