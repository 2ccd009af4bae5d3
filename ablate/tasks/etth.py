"""ETT one-step forecasting (``etth1``, and its siblings ``etth2``, ``ettm1``, ``ettm2``).

Real data: the ETT-small CSV files of the ETDataset (Zhou et al., Informer, AAAI 2021) - two
years of one electricity transformer, hourly (ETTh*) or every 15 minutes (ETTm*), with the header
``date,HUFL,HULL,MUFL,MULL,LUFL,LULL,OT``. The task predicts the next oil temperature (OT) from
the previous ``seq_len`` values (univariate, as in the paper); ``multivariate: true`` feeds all
seven columns as input and still predicts OT. The rows must be in time order: a file whose ISO 8601
``date`` stamps go back in time is refused (a column mostly in other formats is not checked, with a
warning). With the 80/20 split or ``standard_full`` scaling, which read the whole file, a file of
another length than the published one (17,420 rows for ETTh*, 69,680 for ETTm*: a copy cut short,
a subset) is warned about and recorded in the results' ``data_source`` (``"real:<file> (not the
published file: ...)"``).

Splits (task key ``split``), both chronological, in terms of the *target* index of each window
(a window's input is the ``seq_len`` steps before its target, so validation inputs may reach back
into the training part, but no training target lies in the validation part):

* ``"80/20"`` (the paper's): the first 80% of the windows train, the last 20% validate.
* ``"12/4/4"`` (Informer's): 12 months train, 4 validate, 4 test, with months of 30 days in
  steps of the file (hours for ETTh, 15-minute steps for ETTm).

Scaling (task key ``scaling``), per column: ``"standard"`` (the default) - mean/std of the
training part only (every step before the first validation target), so nothing of the validation
part leaks into the inputs; ``"standard_full"`` - mean/std of the whole series, which is what the
paper's code does and what reproduces its ETTh1 numbers (persistence MSE 0.005851 on the 80/20
split, exactly; with ``"standard"`` persistence scores 0.005435): use it only to compare with the
paper, knowing that it uses validation statistics; ``"minmax"`` - min/max of the training part. Metrics
(MSE, MAE) are on the scaled target; ``reference`` holds those of the persistence forecast
(predict the last input value) on the same validation split and scaling.

Embedded variant (``data: embedded``): real data shipped with statsmodels - the monthly sea
surface temperature of the Pacific El Nino region, 1950-2010 (``statsmodels.datasets.elnino``,
732 months, no gaps): univariate, yearly seasonality plus El Nino / La Nina swings, stationary,
so a model trained on the first 80% can be judged on the last 20%. A smaller model (two-year
windows, d_model 32) trains an epoch in a fraction of a second on one CPU core.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ablate.config import ConfigError, CrossKeyError
from ablate.tasks.base import (
    DataWarning,
    DatasetNotFoundError,
    Download,
    TaskInstance,
    check_bool,
    check_choice,
    check_int,
    check_multiple,
    check_probability,
    data_dir_candidates,
    evaluate_sums,
    refetch_advice,
    register_download,
    register_task,
)
from ablate.tasks.models_vision_ts import POOLINGS, TimeSeriesTransformer

ETT_COLUMNS = ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
TARGET = "OT"
ETT_SUBDIR = "ETT-small"
ETT_REPO = "https://github.com/zhouhaoyi/ETDataset"
ETT_RAW_URL = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/"
SPLITS = ("80/20", "12/4/4")
SCALINGS = ("standard", "standard_full", "minmax")
TRAIN_FRACTION = 0.8
DAYS_PER_MONTH = 30
#: the embedded data's version (TaskSpec.embedded_version: part of an embedded trial's id; change it with the data)
EMBEDDED_VERSION = "statsmodels-elnino"
EMBEDDED_SOURCE = f"embedded:{EMBEDDED_VERSION}"
EMBEDDED_COLUMN = "sea_surface_temperature"
EMBEDDED_STEPS = 732  # months in the El Nino series (len(load_embedded_series()), checked by the tests)


@dataclasses.dataclass(frozen=True)
class EttVariant:
    """One ETT file: its task name, file name, steps per hour, rows of the published file (two
    years from 2016-07-01) and canonical checksum."""

    name: str
    filename: str
    steps_per_hour: int
    rows: int
    sha256: str | None = None
    md5: str | None = None

    @property
    def month(self) -> int:
        """Steps in a 30-day month (the unit of the 12/4/4 split)."""
        return DAYS_PER_MONTH * 24 * self.steps_per_hour

    @property
    def download(self) -> Download:
        return Download(
            url=ETT_RAW_URL + self.filename,
            filename=self.filename,
            sha256=self.sha256,
            md5=self.md5,
            subdir=ETT_SUBDIR,
        )


# ETTh1's sha256 was computed on the unmodified file; the siblings' md5 sums are the ones darts
# publishes for its ETT loaders (darts.datasets, whose ETTh1 md5 matches the unmodified file).
VARIANTS = (
    EttVariant("etth1", "ETTh1.csv", 1, 17_420, sha256="f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066"),
    EttVariant("etth2", "ETTh2.csv", 1, 17_420, md5="51a229a3fc13579dd939364fefe9c7ab"),
    EttVariant("ettm1", "ETTm1.csv", 4, 69_680, md5="82d6bd89109c63d075d99c1077b33f38"),
    EttVariant("ettm2", "ETTm2.csv", 4, 69_680, md5="7687e47825335860bf58bccb31be0c56"),
)

# The paper's ETTh1 settings (Table 4 and its training set-up); the siblings share them.
DEFAULTS: dict[str, Any] = {
    "lr": 5e-4,
    "weight_decay": 1e-2,
    "batch_size": 64,
    "epochs": 8,
    "min_delta": 1e-4,
    "patience": 2,
    "meta_every": 217,
    "modulator_layers": 8,
    "modulator_ff": 16,
    "modulator_heads": 6,
    "features": "basic",
    "gating": True,
    "priorities": [1.0, 1.0, 1.0],
    "weighting_form": "regression",
    # task keys
    "seq_len": 96,
    "d_model": 128,
    "n_layers": 2,
    "n_heads": 4,
    "dropout": 0.2,
    "pooling": "last",
    "multivariate": False,
    "split": "80/20",
    "scaling": "standard",
}

# About 0.2 s per epoch on one idle CPU core with AdamW (36 steps of 16 windows; 0.4-0.8 s on a
# busy machine), two meta-updates per epoch; after 4 epochs the validation MSE (about 0.07) is
# far below persistence's (0.265).
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "epochs": 4,
    "batch_size": 16,
    "meta_every": 18,
    "modulator_layers": 2,
    "modulator_ff": 16,
    "seq_len": 24,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "scaling": "standard",
}


# -- reading ---------------------------------------------------------------------------------


def _how_to_get(variant: EttVariant) -> str:
    return (
        f"get it with `ablate data download {variant.name}`, or download {variant.filename} from "
        f"{ETT_REPO} (folder ETT-small) into the data directory"
    )


def expected_paths(root: Path, variant: EttVariant) -> list[Path]:
    """Where the CSV may lie: ``root/FILE`` and, unless root is already ETT-small, ``root/ETT-small/FILE``."""
    paths = [root / variant.filename]
    if root.name != ETT_SUBDIR:
        paths.append(root / ETT_SUBDIR / variant.filename)
    return paths


def find_csv(root: Path | list[Path], variant: EttVariant) -> Path:
    """The first existing expected path (of ``root``, or of each root in turn), else
    :class:`DatasetNotFoundError` naming all of them."""
    roots = [root] if isinstance(root, Path) else root
    paths = list(dict.fromkeys(path for r in roots for path in expected_paths(r, variant)))
    for path in paths:
        if path.is_file():
            return path
    raise DatasetNotFoundError(
        f"{variant.name}: {variant.filename} not found; expected "
        f"{' or '.join(str(p) for p in paths)}. {_how_to_get(variant)}"
    )


def read_ett_csv(path: Path, columns: tuple[str, ...]) -> np.ndarray:
    """The given columns of an ETT CSV as a float64 array (steps, len(columns)).

    Raises :class:`DatasetNotFoundError` when the file cannot be parsed, lacks a column, has an
    empty or non-numeric value, or (when it has the ``date`` column, as ETT files do) its rows go
    back in time: the splits are chronological, and a file in another order would train on the
    newest months and validate on the oldest without a word (see :func:`_check_time_order`).
    """
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DatasetNotFoundError(f"{path} is not a readable ETT CSV file: {error}") from error
    frame.columns = [str(c).strip() for c in frame.columns]  # (a header written "date, HUFL, ..."; values are stripped too)
    twice = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if twice:
        raise DatasetNotFoundError(f"{path} has the column(s) {', '.join(twice)} more than once (blanks around "
                                   f"the names aside); an ETT CSV has the header date,{','.join(ETT_COLUMNS)}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetNotFoundError(
            f"{path} lacks the column(s) {', '.join(missing)}; an ETT CSV has the header "
            f"date,{','.join(ETT_COLUMNS)} (found: {','.join(map(str, frame.columns))})"
        )
    lines = functools.cache(lambda: _line_numbers(path, len(frame)))  # (read only for an error or a warning)
    values = np.empty((len(frame), len(columns)))
    for j, column in enumerate(columns):
        parsed = pd.to_numeric(frame[column].str.strip(), errors="coerce")
        bad = np.flatnonzero(~np.isfinite(parsed.to_numpy(dtype=float)))
        if bad.size:
            row = bad[0]
            raise DatasetNotFoundError(
                f"{path}: column {column} has {bad.size} empty or non-numeric value(s), the first on "
                f"line {lines()[row]}: {frame[column].iloc[row]!r}"
            )
        values[:, j] = parsed.to_numpy(dtype=float)
    if "date" in frame.columns:
        _check_time_order(path, frame["date"], lines)
    return values


def _line_numbers(path: Path, n_rows: int) -> np.ndarray:
    """The line of the file (1-based) of each of the ``n_rows`` data rows pandas read from ``path``.

    pandas skips blank and whitespace-only lines, so after one (a blank line between the rows of a
    file joined by hand) ``row + 2`` would name the line before the bad one. Where the count of
    non-blank lines after the header is not ``n_rows`` (a quoted value over several lines), ``row + 2``.
    """
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            numbers = [number for number, line in enumerate(f, 1) if line.strip(" \t\r\n")]
    except OSError:
        numbers = []
    rows = numbers[1:]  # (the first non-blank line is the header)
    return np.asarray(rows) if len(rows) == n_rows else np.arange(n_rows) + 2


def _check_time_order(path: Path, dates: pd.Series, lines: Callable[[], np.ndarray] | None = None) -> None:
    """:class:`DatasetNotFoundError` if the ISO 8601 timestamps of ``dates`` go back in time.

    Only ISO 8601 stamps (ETT's own ``2016-07-01 00:00:00``; offsets are compared in UTC) are
    checked. A column that is mostly something else (day-first dates of a spreadsheet, epoch
    seconds) cannot be ordered reliably: a warning, and the file is read in its row order. A few
    unreadable stamps among ISO ones get a warning, and the order of the others is still checked.
    A repeated stamp (a local clock's autumn change) gets a warning, not an error. ``lines()``: the
    file's line of each row, for the messages (default: :func:`_line_numbers`)."""
    lines = lines or functools.cache(lambda: _line_numbers(path, len(dates)))
    try:
        stamps = pd.to_datetime(dates.str.strip(), format="ISO8601", utc=True, errors="coerce")
    except (ValueError, TypeError, OverflowError):
        stamps = pd.Series(pd.NaT, index=dates.index, dtype="datetime64[ns, UTC]")
    bad = np.flatnonzero(stamps.isna().to_numpy())
    if bad.size:
        where = f"line {lines()[bad[0]]}: {dates.iloc[bad[0]]!r}"
        if 2 * bad.size > len(dates):
            warnings.warn(f"{path}: the time order of the rows is not checked: column date is mostly not ISO 8601 ("
                          f"{bad.size} of {len(dates)} stamps are not, the first on {where}); the splits are "
                          f"chronological and take the rows in file order", DataWarning, stacklevel=4)
            return
        warnings.warn(f"{path}: column date has {bad.size} empty or unreadable stamp(s), the first on {where}; the "
                      f"order of the others is checked", DataWarning, stacklevel=4)
    readable = np.flatnonzero(stamps.notna().to_numpy())
    later = stamps.to_numpy()[readable]
    back = np.flatnonzero(later[1:] < later[:-1])
    if back.size:
        row, before = readable[back[0] + 1], readable[back[0]]
        raise DatasetNotFoundError(
            f"{path}: the rows are not in time order: line {lines()[row]} ({dates.iloc[row].strip()}) comes before "
            f"line {lines()[before]} ({dates.iloc[before].strip()}); the splits are chronological, so sort the file by date"
        )
    same = np.flatnonzero(later[1:] == later[:-1])
    if same.size:
        row = readable[same[0] + 1]
        warnings.warn(f"{path}: {same.size} row(s) repeat the timestamp of the row before, the first on line "
                      f"{lines()[row]} ({dates.iloc[row].strip()})", DataWarning, stacklevel=4)


def load_embedded_series() -> np.ndarray:
    """The monthly El Nino sea surface temperature shipped with statsmodels, in time order: (732, 1)."""
    try:
        from statsmodels.datasets import elnino
    except ImportError as error:  # pragma: no cover - statsmodels is a dependency of ablate
        raise ImportError("the embedded ETT variant needs statsmodels: pip install statsmodels") from error
    table = elnino.load_pandas().data.sort_values("YEAR")  # one row per year, one column per month
    return table.drop(columns="YEAR").to_numpy(dtype=np.float64).reshape(-1, 1)


# -- splitting and scaling ---------------------------------------------------------------------


def split_bounds(n_steps: int, seq_len: int, split: str, month: int) -> dict[str, tuple[int, int]]:
    """Target index ranges ``[start, stop)`` of each split of a series of ``n_steps`` steps.

    The window for target ``t`` is the input ``[t - seq_len, t)``; ``month`` is the length of a
    month in steps (used by the 12/4/4 split). Raises ``ValueError`` when the series is too short.
    """
    if split == "80/20":
        n_windows = n_steps - seq_len
        n_train = int(TRAIN_FRACTION * n_windows)
        if n_train < 1 or n_train == n_windows:
            raise ValueError(f"{n_steps} steps are too few for the 80/20 split with seq_len={seq_len}")
        return {"train": (seq_len, seq_len + n_train), "val": (seq_len + n_train, n_steps)}
    if split == "12/4/4":
        if n_steps < 20 * month or seq_len >= 12 * month:
            raise ValueError(
                f"the 12/4/4 split needs 20 months of {month} steps ({20 * month} steps) and "
                f"seq_len < {12 * month}; the series has {n_steps} steps, seq_len={seq_len}"
            )
        return {"train": (seq_len, 12 * month), "val": (12 * month, 16 * month), "test": (16 * month, 20 * month)}
    raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")


def fit_scaler(values: np.ndarray, fit_stop: int, scaling: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-column ``(shift, scale)``; the scaled series is ``(values - shift) / scale``.

    ``standard`` and ``minmax`` use ``values[:fit_stop]`` (the training part), ``standard_full``
    the whole series. A constant column gets scale 1.
    """
    if scaling == "standard":
        part = values[:fit_stop]
        shift, scale = part.mean(axis=0), part.std(axis=0)
    elif scaling == "standard_full":
        shift, scale = values.mean(axis=0), values.std(axis=0)
    elif scaling == "minmax":
        part = values[:fit_stop]
        shift, scale = part.min(axis=0), part.max(axis=0) - part.min(axis=0)
    else:
        raise ValueError(f"scaling={scaling!r} is not one of {', '.join(SCALINGS)}")
    return shift, np.where(scale > 0, scale, 1.0)


def persistence_metrics(target: np.ndarray, start: int, stop: int) -> dict[str, float]:
    """MSE and MAE of predicting ``target[t - 1]`` for every ``t`` in ``[start, stop)``."""
    error = target[start:stop] - target[start - 1 : stop - 1]
    return {"persistence_mse": float(np.mean(error**2)), "persistence_mae": float(np.mean(np.abs(error)))}


class WindowDataset(Dataset):
    """Windows of a scaled series: item ``i`` is ``(inputs[t - seq_len : t], target[t])`` with
    ``t = start + i``, shapes ``(seq_len, n_inputs)`` and ``()``."""

    def __init__(self, inputs: torch.Tensor, target: torch.Tensor, start: int, stop: int, seq_len: int):
        if start < seq_len:
            raise ValueError(f"the first target {start} has fewer than seq_len={seq_len} steps before it")
        self.inputs, self.target = inputs, target
        self.start, self.stop, self.seq_len = start, stop, seq_len

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        t = self.start + i
        return self.inputs[t - self.seq_len : t], self.target[t]


@dataclasses.dataclass
class ForecastData:
    """The datasets of one series and split, with the scaler and the persistence reference."""

    train: WindowDataset
    val: WindowDataset
    test: WindowDataset | None
    shift: np.ndarray
    scale: np.ndarray
    reference: dict[str, float]


def make_forecast_data(values: np.ndarray, seq_len: int, split: str, scaling: str, month: int) -> ForecastData:
    """Split, scale and window ``values`` (steps, columns); the last column is the target."""
    bounds = split_bounds(len(values), seq_len, split, month)
    shift, scale = fit_scaler(values, bounds["val"][0], scaling)
    scaled = (values - shift) / scale
    inputs = torch.as_tensor(scaled, dtype=torch.float32)
    target = inputs[:, -1].contiguous()
    datasets = {name: WindowDataset(inputs, target, start, stop, seq_len) for name, (start, stop) in bounds.items()}
    return ForecastData(
        train=datasets["train"],
        val=datasets["val"],
        test=datasets.get("test"),
        shift=shift,
        scale=scale,
        reference={**persistence_metrics(scaled[:, -1], *bounds["val"]),
                   **({f"test_{k}": v for k, v in persistence_metrics(scaled[:, -1], *bounds["test"]).items()}
                      if "test" in bounds else {})},
    )


# -- loss and evaluation -----------------------------------------------------------------------


def mse_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of the one-step forecast on a batch ``(windows, targets)``."""
    inputs, target = batch
    return F.mse_loss(model(inputs), target)


def _forecast_sums(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict, int]:
    inputs, target = batch
    error = model(inputs) - target
    return {"squared": error.pow(2).sum(), "absolute": error.abs().sum()}, error.numel()


def evaluate_forecast(model: nn.Module, loader) -> dict[str, float]:
    """MSE and MAE over every window of the loader (sums over examples / count)."""
    totals, count = evaluate_sums(model, loader, _forecast_sums)
    return {"mse": totals["squared"] / count, "mae": totals["absolute"] / count}


# -- the task ----------------------------------------------------------------------------------


def _choice(config: dict, key: str, allowed: tuple[str, ...]) -> str:
    value = config[key]
    if value not in allowed:
        raise ConfigError(f"{config['task']}: {key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    return value


def _load_values(config: dict, variant: EttVariant, columns: tuple[str, ...]) -> tuple[np.ndarray, str, int, list[str]]:
    """The raw series (steps, columns), its data_source, its month length in steps and its column names."""
    if config["data"] == "embedded":
        if len(columns) > 1:
            raise ConfigError(
                f"{variant.name}: multivariate=true needs the seven-column ETT file (data: real); "
                f"the embedded El Nino series is univariate"
            )
        values = load_embedded_series()
        # 20 "months" span the series, so 12/4/4 is a 60/20/20 split of it.
        return values, EMBEDDED_SOURCE, len(values) // 20, [EMBEDDED_COLUMN]
    path = find_csv(data_dir_candidates(config, ETT_SUBDIR), variant)
    try:
        values = read_ett_csv(path, columns)
    except DatasetNotFoundError as error:
        problem = str(error).rstrip(". \n")
        raise DatasetNotFoundError(f"{problem}. If the file is damaged, move or delete it, then "
                                   f"{_how_to_get(variant)}") from error
    return values, f"real:{path.resolve()}", variant.month, list(columns)


def build_ett_task(config: dict, variant: EttVariant) -> TaskInstance:
    """Build the ETT forecasting task for ``variant`` from a resolved trial config."""
    split = _choice(config, "split", SPLITS)
    scaling = _choice(config, "scaling", SCALINGS)
    pooling = _choice(config, "pooling", POOLINGS)
    seq_len = config["seq_len"]
    columns = ETT_COLUMNS if config["multivariate"] else (TARGET,)
    values, source, month, names = _load_values(config, variant, columns)
    try:
        data = make_forecast_data(values, seq_len, split, scaling, month)
    except ValueError as error:  # the series is too short for the split and seq_len
        if config["data"] == "embedded":
            raise ConfigError(f"{variant.name} ({source}): {error}") from error
        shorter = "A shorter seq_len fits a shorter series; if" if split == "80/20" else "If"
        raise DatasetNotFoundError(f"{variant.name} ({source}): {error}. {shorter} the file is a cut-short copy, "
                                   f"{refetch_advice(variant.name, config)}") from error
    # (recorded with every result, as CIFAR-10's); 12/4/4 reads the first 20 months, the same in a longer or
    # shorter file that has them (a shorter one is refused above) - unless standard_full scales by the whole file
    if config["data"] == "real" and (split == "80/20" or scaling == "standard_full") and len(values) != variant.rows:
        other = f"not the published file: {len(values):,} rows where it has {variant.rows:,}"
        warnings.warn(f"{variant.name}: {source[len('real:'):]} is {other} - metrics not comparable with the published "
                      f"dataset's ({refetch_advice(variant.name, config)})",
                      DataWarning, stacklevel=2)
        source += f" ({other})"
    model = TimeSeriesTransformer(
        n_inputs=len(columns),
        seq_len=seq_len,
        d_model=config["d_model"],
        n_heads=config["n_heads"],
        n_layers=config["n_layers"],
        dropout=config["dropout"],
        pooling=pooling,
    )
    return TaskInstance(
        name=variant.name,
        model=model,
        train=data.train,
        val=data.val,
        test=data.test,
        loss_fn=mse_loss,
        evaluate=evaluate_forecast,
        data_source=source,
        reference=data.reference,
        info={
            "inputs": names,
            "target": names[-1],
            "seq_len": seq_len,
            "split": split,
            "scaling": scaling,
            "n_train": len(data.train),
            "n_val": len(data.val),
            "n_test": len(data.test) if data.test is not None else 0,
            "target_shift": float(data.shift[-1]),
            "target_scale": float(data.scale[-1]),
        },
    )


def max_seq_len(split: str, n_steps: int, month: int) -> int:
    """The longest ``seq_len`` that :func:`split_bounds` accepts for a series of ``n_steps`` steps."""
    return n_steps - 2 if split == "80/20" else 12 * month - 1


def check_ett_config(config: dict, variant: EttVariant) -> None:
    """The task keys of a resolved config (:attr:`ablate.tasks.base.TaskSpec.check`): the model's
    sizes, dropout and choices, and ``seq_len`` against the split where the series length is known
    without reading it (the embedded series; the 12 training months of a real 12/4/4 split)."""
    check_int(config, "seq_len", "input window length in steps")
    check_int(config, "d_model", "width of the Transformer")
    check_int(config, "n_layers", "Transformer encoder layers")
    check_int(config, "n_heads", "attention heads of the Transformer")
    check_multiple(config, "d_model", "n_heads")
    check_probability(config, "dropout")
    check_choice(config, "pooling", POOLINGS)
    check_choice(config, "split", SPLITS)
    check_choice(config, "scaling", SCALINGS)
    check_bool(config, "multivariate", "all seven ETT columns as input")
    split, seq_len = config["split"], config["seq_len"]
    if config["data"] == "embedded":
        if config["multivariate"]:
            raise ConfigError(
                f"{variant.name}: multivariate=true needs the seven-column ETT file (data: real); "
                f"the embedded El Nino series is univariate"
            )
        limit = max_seq_len(split, EMBEDDED_STEPS, EMBEDDED_STEPS // 20)
        series = f"the embedded series has {EMBEDDED_STEPS} steps"
    elif split == "12/4/4":
        limit = max_seq_len(split, 20 * variant.month, variant.month)
        series = f"its 12 training months are {12 * variant.month} steps"
    else:
        return  # the real series' length is known only once it is read
    if seq_len > limit:
        raise CrossKeyError(
            f"{variant.name}: seq_len={seq_len} is too long for the {split} split ({series}): choose seq_len <= {limit}"
        )


def _register(variant: EttVariant) -> None:
    def factory(config: dict) -> TaskInstance:
        return build_ett_task(config, variant)

    def locate(config: dict) -> list[Path]:
        # (data_dir/ETT-small, else data_dir itself: ETTh1.csv directly in data_dir is found even when an
        # ETT-small folder holds the other variants)
        return [find_csv(data_dir_candidates(config, ETT_SUBDIR), variant)]

    def check(config: dict) -> None:
        check_ett_config(config, variant)

    factory.__doc__ = build_ett_task.__doc__
    register_task(
        variant.name,
        metrics=[("mse", "min"), ("mae", "min")],
        defaults=DEFAULTS,
        embedded_defaults=EMBEDDED_DEFAULTS,
        description=f"{variant.filename[:-4]}: next-step oil temperature forecasting with a Transformer encoder",
        locate=locate,
        check=check,
        embedded_version=EMBEDDED_VERSION,
    )(factory)
    register_download(variant.name, variant.download)


for _variant in VARIANTS:
    _register(_variant)
