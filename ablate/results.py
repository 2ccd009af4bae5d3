"""Result storage: tidy Parquet tables under a study's output directory.

Every finished trial writes its own three Parquet *parts*, atomically (write to a temporary
file, then rename), the moment it finishes, so a crash never loses a finished trial and never
leaves a truncated file::

    OUT/parts/<trial_id>.trials.parquet      one row: the trial
    OUT/parts/<trial_id>.history.parquet     one row per epoch
    OUT/parts/<trial_id>.telemetry.parquet   one row per meta-update per modulator group

:func:`load_results` concatenates the parts (a later part for the same trial id replaces an
earlier one, so a retried trial appears exactly once) and :func:`consolidate` also writes the
combined ``OUT/trials.parquet``, ``OUT/history.parquet`` and ``OUT/telemetry.parquet``.

Parsing thousands of small parts is slow (about 5-8 ms a file: minutes for a study of a few
thousand trials), so :func:`consolidate` also keeps ``OUT/parts_cache/``: each table's rows of the
parts it read, in one file, and an index of those parts with a hash of their bytes. While every
part a table's cache holds still hashes the same (reading and hashing costs ~0.1 ms a part), its
rows come from the cache and only parts added since are parsed; a table one of whose cached parts
was rewritten or removed is parsed whole. The parts stay the record; deleting the cache only
costs time.

``OUT/study_trials.json`` (:func:`write_manifest`, written by every ``ablate run``) lists the trials
of the study as last run there, with their arm labels. A results directory outlives edits of its
study file: trials of an earlier budget, of removed seeds or arms stay on disk (and are reused when
the study asks for them again). :func:`load_results` keeps only the listed trials, labelled as the
study labels them now (a renamed arm, or an arm merged with an existing trial, gets its row), and
says how many stored trials it left out; ``all_trials=True`` loads everything on disk.

Columns
-------
trials (one row per trial):
    trial_id, study, arm, axis, status ("ok" | "failed" | "diverged"), error (traceback or ""),
    task, data, data_source, data_fingerprint (real data: the name and size of each file read,
    hashed; see :func:`ablate.tasks.data_fingerprint`), optimizer, seed, every other key of the resolved trial config (list
    values stored as JSON strings, e.g. priorities "[1.0, 1.0, 1.0]"), metric (primary metric
    name), mode ("min" | "max"), best_metric, best_epoch, epochs_run, steps, stop_reason
    ("early_stopping" | "max_epochs" | "max_steps" | "diverged" | "failed"), time_total_s,
    time_train_s, time_meta_s, time_eval_s, meta_updates, meta_skipped, best_<metric> for every
    task metric, ref_<name> for every trivial reference (e.g. ref_persistence_mse),
    test_<metric> where a test split was evaluated, device_used (the device the trial trained on:
    "cpu", "cuda:0", ...; the config's device column is the one asked for, "auto" say),
    finished_at (ISO time), code_fingerprint,
    torch_version, python_version, hostname (what ran it, where it trained: see :mod:`ablate.provenance`),
    provenance_source ("trial": recorded by the process that ran it; "driver": a failed trial whose
    process raised or died, recorded from Ray's error, with the driver's code, torch and Python, and
    the node Ray named as hostname, where it named one).
history (one row per trial-epoch):
    trial_id, epoch (1-based), step (optimizer steps so far), train_loss (the epoch's training
    losses, each batch's weighted by its examples: a last, partial batch counts for its size),
    val_<metric> for every task metric, time_train_s, time_meta_s, time_eval_s (this epoch),
    wall_s (cumulative train + meta + eval seconds at the end of the epoch), meta_updates (so far).
telemetry (one row per meta-update per group):
    trial_id, meta_update (0-based index within the trial), step, epoch, group (name),
    group_index, alpha, beta, lambda1, lambda2, meta_loss, skipped (bool), and for each objective
    term T: term_T (value) and sigma_T (the weighting's sigma, NaN when it has none), e.g.
    term_gradient, term_loss_decrease, term_gen_gap, sigma_gradient, ...
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import io
import json
import os
import shlex
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from ablate.files import atomic_write, atomic_write_bytes

TABLES = ("trials", "history", "telemetry")


class ResultsError(RuntimeError):
    """Stored results that cannot be read at all, or results that cannot be stored (the message names
    the file, or the trial, and the fix)."""

PARTS_DIR = "parts"
#: the cache of the parts' rows (see the module's docstring)
CACHE_DIR = "parts_cache"
_CACHE_INDEX = "index.json"
MANIFEST = "study_trials.json"
#: the trials an ``ablate run --rerun`` selected that are not computed again yet, and those it has:
#: ``{"trials": [trial ids], "done": [trial ids]}`` (every later run of the study computes the first)
RERUN_FILE = "rerun.json"
#: in a study's ``tune/`` folder: the targets (tasks, or cross_task) of the last ``ablate tune`` run
#: into it, so that the report names those whose search has not started
TUNE_TARGETS_FILE = "targets.json"
#: the trial columns that depend on the study rather than on the trial's config
LABEL_COLUMNS = ("study", "arm", "arms", "axis")
#: the columns without which a table's rows cannot be used: a row without its trial id cannot be told
#: apart from another trial's (its history would be dropped without a word), one without its status
#: cannot be counted or reused. A part or combined table with rows that lacks them is taken for damaged
REQUIRED_COLUMNS = {"trials": ("trial_id", "status"), "history": ("trial_id",), "telemetry": ("trial_id",)}
#: the trial columns the statistics and the report read (every trial row ablate writes has them; a study's arm
#: labels may come from its manifest instead), and the one an "ok" trial needs too: a trials table written by
#: hand or by other code without them is refused, naming them (:func:`check_statistics_columns`)
STATISTICS_COLUMNS = ("task", "seed", "arm")
OK_COLUMNS = ("best_metric",)
#: the version of the cache's index (:func:`_write_cache`); 5: parts are checked for
#: :data:`REQUIRED_COLUMNS` as they are parsed, so a cache of parts parsed before is not used
_CACHE_VERSION = 5


@dataclasses.dataclass
class Results:
    """The three tables of a study as pandas DataFrames."""

    trials: pd.DataFrame
    history: pd.DataFrame
    telemetry: pd.DataFrame

    def ok(self) -> "Results":
        """Only the trials that finished with status 'ok' and a finite best metric (and their history
        and telemetry), as the statistics count them."""
        ids = set(self.trials.loc[ok_mask(self.trials), "trial_id"]) if len(self.trials) else set()
        return Results(
            self.trials[self.trials["trial_id"].isin(ids)] if len(self.trials) else self.trials,
            self.history[self.history["trial_id"].isin(ids)] if len(self.history) else self.history,
            self.telemetry[self.telemetry["trial_id"].isin(ids)] if len(self.telemetry) else self.telemetry,
        )


def ok_mask(trials: pd.DataFrame) -> pd.Series:
    """Trials with status "ok" and a finite best metric (an "ok" trial with a NaN or inf metric -
    hand-made or damaged tables - would otherwise poison means and tests)."""
    ok = trials["status"] == "ok"
    if "best_metric" in trials:
        ok &= np.isfinite(pd.to_numeric(trials["best_metric"], errors="coerce").to_numpy(dtype=float))
    return ok


def flatten_value(value: Any) -> Any:
    """Store list/tuple/dict config values as JSON strings so every column has a scalar type."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


def atomic_write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` to ``path`` through a temporary file in the same directory and a rename."""
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_trial(
    out_dir: str | os.PathLike,
    trial_row: Mapping[str, Any],
    history_rows: Iterable[Mapping[str, Any]] = (),
    telemetry_rows: Iterable[Mapping[str, Any]] = (),
) -> None:
    """Write one finished trial's three parts (telemetry and history first, the trial row last,
    so a trial row on disk always has its history and telemetry beside it)."""
    trial_id = trial_row["trial_id"]
    parts = Path(out_dir) / PARTS_DIR
    row = {k: flatten_value(v) for k, v in trial_row.items()}
    for name, rows in (("telemetry", telemetry_rows), ("history", history_rows)):
        df = pd.DataFrame([{**r, "trial_id": trial_id} for r in rows])
        if df.empty:
            df = pd.DataFrame({"trial_id": pd.Series([], dtype="string")})
        atomic_write_parquet(df, parts / f"{trial_id}.{name}.parquet")
    atomic_write_parquet(pd.DataFrame([row]), parts / f"{trial_id}.trials.parquet")


def write_manifest(out_dir: str | os.PathLike, study: str, labels: Mapping[str, Mapping[str, Any]]) -> None:
    """Record the trials of ``study`` as run now: trial id -> its :data:`LABEL_COLUMNS` values."""
    manifest = {"study": study, "trials": {k: dict(v) for k, v in labels.items()}}
    atomic_write_bytes(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=1).encode())


def read_manifest(out_dir: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """Trial id -> labels of the study last run in ``out_dir`` (None for results written before
    manifests existed, or by hand)."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        trials = json.loads(path.read_text())["trials"]
        if not isinstance(trials, dict) or not all(isinstance(v, dict) for v in trials.values()):
            raise ValueError("'trials' is not a mapping of trial id -> labels")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"{path} is unreadable ({type(exc).__name__}: {exc}): every stored trial is loaded, those of "
                      f"earlier versions of the study included, without the study's labels; the next "
                      f"`ablate run` rewrites it", stacklevel=3)
        return None
    return trials


def pending_reruns(out_dir: str | os.PathLike) -> tuple[set[str], set[str]]:
    """The trial ids of :data:`RERUN_FILE`: still to compute again, and computed again already."""
    path = Path(out_dir) / RERUN_FILE
    if not path.exists():
        return set(), set()
    try:
        data = json.loads(path.read_text())
        return set(data["trials"]), set(data.get("done", []))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ResultsError(f"{path} is unreadable ({type(exc).__name__}: {exc}): it lists the trials an `ablate run "
                           f"--rerun` has still to compute. Delete it and run the --rerun again") from None


def write_reruns(out_dir: str | os.PathLike, ids: set[str], done: set[str]) -> None:
    """Record the trials still to be computed again, and those that were (none left: the file is
    removed)."""
    path = Path(out_dir) / RERUN_FILE
    if ids:
        atomic_write_bytes(path, json.dumps({"trials": sorted(ids), "done": sorted(done)}, indent=1).encode())
    else:
        path.unlink(missing_ok=True)


def finished_trial_ids(out_dir: str | os.PathLike, statuses: tuple[str, ...] = ("ok", "diverged")) -> set[str]:
    """Ids of the trials whose results are on disk, complete and readable, with one of ``statuses``
    (a trial with a damaged part that the combined tables cannot stand in for is not finished:
    ``--resume`` recomputes it)."""
    trials = finished_trials(out_dir, statuses)
    return set(trials["trial_id"]) if len(trials) else set()


def finished_trials(out_dir: str | os.PathLike, statuses: tuple[str, ...] = ("ok", "diverged"), *,
                    cache: bool = False) -> pd.DataFrame:
    """The stored trial rows of :func:`finished_trial_ids`. ``cache``: where parts were parsed, also cache their
    rows (:func:`_write_cache`), as :func:`consolidate` does: ``ablate run`` reads the parts again to consolidate
    at its end, which would otherwise parse every part not in the cache a second time (~20 s per 1,000 trials)."""
    stored = _read_tables(Path(out_dir))
    if cache and stored.parsed:
        _write_cache(Path(out_dir), stored.parts)
    for trial_id, why in stored.damaged.items():
        warnings.warn(f"{why}, and the combined tables do not hold its rows: trial {trial_id} counts as not finished "
                      f"and is computed again", stacklevel=3)
    trials = stored.tables["trials"]
    if trials.empty:
        return trials
    return trials[trials["status"].isin(statuses)].reset_index(drop=True)


@dataclasses.dataclass
class _Stored:
    """What :func:`_read_tables` found: the tables, the trials left out (trial id -> why) and the
    parts that the combined tables stood in for ((table, trial id) -> their rows)."""

    tables: dict[str, pd.DataFrame]
    damaged: dict[str, str]
    recovered: dict[tuple[str, str], pd.DataFrame]
    #: per table, the rows of its readable parts and those parts (``[file name, hash of its bytes,
    #: rows, columns]`` in file order), which :func:`consolidate` caches
    parts: dict[str, tuple[pd.DataFrame, list[list]]] = dataclasses.field(default_factory=dict)
    #: how many parts were parsed (the others' rows came from the cache)
    parsed: int = 0


def _signature(data: bytes) -> str:
    """A hash of a part's bytes. Not its size and modification time: a part rewritten within the
    file system's clock tick (milliseconds) with the same size kept them."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _as_stored(df: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """``df`` with the column types a Parquet file gives it, and whether it can be stored. Rows
    concatenated from many parts otherwise depend on how they were grouped: a column of ints in
    some parts and None in others is ``object`` when the parts are concatenated, ``float64`` (NaN)
    once stored together - in the cache, or in the combined tables."""
    if df.empty:
        return df, True
    try:
        return pd.read_parquet(io.BytesIO(df.to_parquet(index=False))), True
    except Exception:  # (columns of mixed types: kept as they are, not cached)
        return df, False


#: errors reading a part that say nothing about its bytes (permissions, a failing or unreachable disk):
#: the part is not taken for damaged, which would make a run compute its trial again over it
_CANNOT_READ_NOW = frozenset(getattr(errno, name) for name in ("EACCES", "EPERM", "EIO", "ESTALE", "EAGAIN",
                                                                 "ETIMEDOUT", "ENOMEM") if hasattr(errno, name))


def _cache_index(out_dir: Path) -> dict[str, tuple[str, list[list]]]:
    """Table -> (its cache file's name, the parts it holds: ``[file name, hash, rows, columns]`` in
    file order); empty when there is no usable cache."""
    try:
        data = json.loads((out_dir / CACHE_DIR / _CACHE_INDEX).read_text())
        if data.get("version") != _CACHE_VERSION:
            return {}
        out = {}
        for table, entry in data["tables"].items():
            columns = [[str(c) for c in cols] for cols in entry["columns"]]
            out[str(table)] = (str(entry["file"]), [[str(n), str(h), int(r), columns[k]] for n, h, r, k in entry["parts"]])
        return out
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError, KeyError, IndexError):
        return {}


def _part_rows(out_dir: Path, table: str, files: list[Path], cache: tuple[str, list[list]] | None
               ) -> tuple[pd.DataFrame, list[list], dict[str, str], int]:
    """The rows of ``table`` from its part ``files`` (in file order), the parts read (``[name, hash,
    rows, columns]``), the unreadable ones (trial id -> why) and how many parts were parsed. The
    rows of the parts a cache holds come from it when every one of those parts is still there with
    the same bytes (else the cache is not used: rows of a rewritten or deleted part may have widened
    the types of its columns); the other parts are parsed, and their rows and columns put in file
    order among the cached ones, as if every part had been parsed and concatenated."""
    in_cache = {p[0] for p in cache[1]} if cache is not None else set()
    hashes: dict[str, str | None] = {}
    frames: dict[str, pd.DataFrame] = {}
    unreadable: dict[str, str] = {}

    def parse(f: Path, data: bytes | None = None) -> None:
        try:
            frames[f.name] = _parse_part(f, table, data)
        except Exception as exc:  # one unreadable file must not hide every other result
            unreadable[f.name.split(".")[0]] = f"result part {f} is unreadable ({type(exc).__name__}: {exc})"

    for f in files:  # each part read once: hashed, and parsed from the same bytes unless the cache may hold it
        try:
            data = f.read_bytes()
        except OSError as exc:
            if exc.errno in _CANNOT_READ_NOW:  # (the part may be fine: not damage, which a run computes again over)
                if _combined_holds(out_dir, table, f.name.split(".")[0]):  # (then its rows stand in for the part)
                    over, lost = ("write over it with the rows of the combined table", f"delete it: the rows of "
                                  f"{out_dir / f'{table}.parquet'} stand in for it, and the next `ablate run` "
                                  f"rewrites it from them")
                else:
                    over, lost = ("compute its trial again and write over it", "delete it (and the trial's other "
                                  "parts): the next `ablate run` computes the trial again")
                raise ResultsError(
                    f"cannot read the result part {f} ({type(exc).__name__}: {exc}): make it readable (its "
                    f"permissions, its file system) and try again; it is not taken for a damaged part, since a run "
                    f"would then {over}. If it is lost for good, {lost}") from None
            hashes[f.name] = None
            parse(f)  # (says why it cannot be read)
            continue
        hashes[f.name] = _signature(data)
        if f.name not in in_cache:
            parse(f, data)
    cached_df, cached = None, []
    if in_cache and all(hashes.get(p[0]) == p[1] for p in cache[1]):
        cached_df = _cached_table(out_dir, cache[0], sum(p[2] for p in cache[1]))
        cached = cache[1] if cached_df is not None else []
    for f in files:  # the cache cannot stand in for its parts: they are parsed too
        if f.name in in_cache and not cached and hashes[f.name] is not None:
            parse(f)
    parsed = [(f.name, frames[f.name]) for f in files if f.name in frames]  # (file order, as the unreadable)
    unreadable = {t: unreadable[t] for t in (f.name.split(".")[0] for f in files) if t in unreadable}
    listed = sorted(cached + [[n, hashes[n], len(df), [str(c) for c in df.columns]] for n, df in parsed
                              if hashes[n] is not None], key=lambda p: p[0])
    new = [(n, df) for n, df in parsed if len(df)]  # (parts without rows add neither rows nor columns)
    if cached_df is None or not len(cached_df):
        return ((pd.concat([df for _, df in new], ignore_index=True) if new else pd.DataFrame()), listed, unreadable,
                len(parsed))
    if not new:
        return cached_df, listed, unreadable, len(parsed)
    order = sorted([(p[0], p[2], p[3]) for p in cached if p[2]] + [(n, len(df), list(df.columns)) for n, df in new])
    columns = list(dict.fromkeys(c for _, _, cols in order for c in cols))
    keys = np.concatenate([np.repeat(np.array([p[0] for p in cached], dtype=object), [p[2] for p in cached]),
                           *[np.repeat(np.array([n], dtype=object), len(df)) for n, df in new]])
    both = pd.concat([cached_df, *[df for _, df in new]], ignore_index=True)
    return both.iloc[np.argsort(keys, kind="stable")].reset_index(drop=True)[columns], listed, unreadable, len(parsed)


def _parse_part(path: Path, table: str, data: bytes | None = None) -> pd.DataFrame:
    """A part's rows, from its bytes when they were read already (a part of ``table`` with rows but
    without its :data:`REQUIRED_COLUMNS` raises ValueError)."""
    df = pd.read_parquet(io.BytesIO(path.read_bytes() if data is None else data))
    _check_columns(df, table)
    return df


def _check_columns(df: pd.DataFrame, table: str) -> None:
    """Raise ValueError naming the :data:`REQUIRED_COLUMNS` of ``table`` that ``df``, a part or a
    combined table, lacks (a table without rows needs none: its rows cannot be lost)."""
    missing = [c for c in REQUIRED_COLUMNS.get(table, ()) if c not in df.columns]
    if missing and len(df):
        raise ValueError(f"it has no {' and no '.join(missing)} column (its {len(df)} row(s) cannot be used)")


def _cached_table(out_dir: Path, file: str, rows: int) -> pd.DataFrame | None:
    """The cache file ``file`` if it holds ``rows`` rows; None when it cannot be read."""
    try:
        df = pd.read_parquet(out_dir / CACHE_DIR / Path(file).name)
    except Exception:  # (damaged, or replaced by another process's cache since the index was read)
        return None
    return df if len(df) == rows else None


def _write_cache(out_dir: Path, parts: dict[str, tuple[pd.DataFrame, list[list]]]) -> None:
    """Cache the parts' rows that :func:`_read_tables` read: each table in a file of its own name,
    then the index naming those files (an index never names another write's files, also when two
    processes consolidate at once), then the older files are removed. Tables whose rows cannot be
    stored together (a column of mixed types) are not cached. Best effort: only time is lost
    without it."""
    folder = out_dir / CACHE_DIR
    token = f"{os.getpid()}-{time.time_ns()}"
    try:
        folder.mkdir(exist_ok=True)
        tables = {}
        for table, (df, listed) in parts.items():
            if not listed:
                continue
            name = f"{table}.{token}.parquet"
            atomic_write_parquet(df if len(df.columns) else pd.DataFrame({"trial_id": pd.Series([], dtype="string")}),
                                 folder / name)  # (parts without rows)
            columns = list(dict.fromkeys(tuple(p[3]) for p in listed))  # (few distinct column lists)
            tables[table] = {"file": name, "columns": [list(c) for c in columns],
                             "parts": [[n, h, r, columns.index(tuple(cols))] for n, h, r, cols in listed]}
        atomic_write_bytes(folder / _CACHE_INDEX, json.dumps({"version": _CACHE_VERSION, "tables": tables}).encode())
    except Exception as exc:  # (best effort)
        warnings.warn(f"could not write the cache of result parts in {folder} ({type(exc).__name__}: {exc}): "
                      f"results load more slowly, nothing is lost", stacklevel=3)
        return
    for old in folder.glob("*.parquet"):
        if token not in old.name:
            old.unlink(missing_ok=True)


def _read_tables(out_dir: Path) -> _Stored:
    """The three tables from the parts (each falling back to its combined file when it has no
    parts), without the trials whose parts are damaged.

    Parts are written atomically, history and telemetry before the trial row, so an unreadable
    part, or a trial row without its history or telemetry part, was damaged afterwards (a disk
    fault, a careless copy or clean-up); a part, or a combined table, whose rows lack their
    :data:`REQUIRED_COLUMNS` counts as unreadable. That trial's rows then come from the combined table that
    the last ``ablate run`` wrote, where it has them (:func:`consolidate` rewrites the part from
    them); otherwise the trial is left out of all three tables, as if it had not finished, so that
    ``ablate run --resume`` computes it again. Nothing is deleted."""
    parts = out_dir / PARTS_DIR
    files = {table: sorted(parts.glob(f"*.{table}.parquet")) for table in TABLES}
    finished = {f.name.split(".")[0] for f in files["trials"]}
    tables: dict[str, pd.DataFrame] = {}
    damaged: dict[str, str] = {}
    recovered: dict[tuple[str, str], pd.DataFrame] = {}
    read_parts: dict[str, tuple[pd.DataFrame, list[list]]] = {}
    combined_trials: set[str] = set()  # trial ids of the combined trials table
    index = _cache_index(out_dir)
    parsed = 0
    for table in TABLES:
        part_rows, listed, unreadable, n_parsed = _part_rows(out_dir, table, files[table], index.get(table))
        parsed += n_parsed
        has_parts = len(files[table]) > len(unreadable)  # (parts parsed, or standing in the cache)
        # (rows of the cache alone were read from one Parquet file: they have its types already, and a
        # round trip of a table of a million telemetry rows costs about a second)
        part_rows, storable = _as_stored(part_rows) if n_parsed else (part_rows, True)
        read_parts[table] = (part_rows, listed if storable else [])
        frames = [part_rows] if has_parts else []
        if table != "trials":
            expected = finished
        elif any(files.values()):  # a trial of the combined table had its part (results of parts, not of
            # combined tables alone); a trial with other parts but no trial row was cut off before it
            # finished (the row is written last): not finished, and not damaged either
            combined_trials = _ids_in(out_dir / "trials.parquet")
            expected = combined_trials
        else:
            expected = set()
        for trial_id in sorted(expected - {f.name.split(".")[0] for f in files[table]}):
            unreadable[trial_id] = f"result part {parts / f'{trial_id}.{table}.parquet'} is missing"
        combined_path = out_dir / f"{table}.parquet"
        combined, combined_read, combined_error = pd.DataFrame(), False, ""
        if combined_path.exists() and (unreadable or not frames):
            try:
                read = pd.read_parquet(combined_path)
                _check_columns(read, table)
                combined, combined_read = read, True
            except Exception as exc:
                if not frames and not unreadable:
                    raise ResultsError(f"could not read {combined_path} ({type(exc).__name__}: {exc}), and there are "
                                       f"no result parts beside it to read instead") from exc
                combined_error = f", and {combined_path} is unreadable too ({type(exc).__name__}: {exc})"
        if not frames and not unreadable:
            tables[table] = combined
            continue
        in_combined = set(combined["trial_id"]) if "trial_id" in combined else set()
        restored = []
        for trial_id, why in unreadable.items():
            # (a trial's history and telemetry may have no rows: then its trial row says it was combined,
            # provided this table's combined file was read: else its rows are lost, not absent)
            if trial_id in in_combined or (combined_read and table != "trials" and trial_id in combined_trials):
                rows = combined[combined["trial_id"] == trial_id] if in_combined else pd.DataFrame()
                frames.append(rows)
                recovered[(table, trial_id)] = rows
                restored.append(why)
            else:
                damaged.setdefault(trial_id, why + combined_error)
        if restored:  # (one warning per table: results copied without their parts/ miss them all)
            what = restored[0] if len(restored) == 1 else (
                f"{len(restored)} result parts of the {table} table are missing or unreadable ({'; '.join(restored[:3])}"
                f"{'; ...' if len(restored) > 3 else ''})")
            warnings.warn(f"{what}: {'its' if len(restored) == 1 else 'their'} rows come from {combined_path} instead "
                          f"(`ablate run` rewrites the part{'s' if len(restored) > 1 else ''} from them)", stacklevel=3)
        if table == "trials":  # a trial row restored from the combined table: its history and telemetry too
            finished |= {tid for (t, tid) in recovered if t == "trials"}
        frames = [f for f in frames if len(f)]
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if table == "trials" and len(df):
            if "finished_at" in df:
                df = df.sort_values("finished_at", kind="stable")
            df = df.drop_duplicates("trial_id", keep="last").reset_index(drop=True)
        tables[table] = df
    if damaged:
        for table, df in tables.items():
            if len(df) and "trial_id" in df:
                tables[table] = df[~df["trial_id"].isin(list(damaged))].reset_index(drop=True)
    return _Stored(tables, damaged, {k: v for k, v in recovered.items() if k[1] not in damaged}, read_parts, parsed)


def _combined_holds(out_dir: Path, table: str, trial_id: str) -> bool:
    """Whether the combined tables stand in for the ``table`` part of ``trial_id`` once the part is
    gone, as :func:`_read_tables` restores it: the combined trials table lists the trial, and the
    combined ``table`` can be read (a trial's history or telemetry may have no rows in it)."""
    if trial_id not in _ids_in(out_dir / "trials.parquet"):
        return False
    try:
        _check_columns(pd.read_parquet(out_dir / f"{table}.parquet"), table)
    except Exception:
        return False
    return True


def _ids_in(path: Path) -> set[str]:
    """Trial ids of a combined table (empty when it is missing or unreadable)."""
    try:
        return set(pd.read_parquet(path, columns=["trial_id"])["trial_id"]) if path.exists() else set()
    except Exception:
        return set()


def load_results(out_dir: str | os.PathLike, *, all_trials: bool = False) -> Results:
    """Load a study's tables (from its parts, falling back to the consolidated files): the trials of
    the study as last run in ``out_dir`` (see :data:`MANIFEST`), or every stored trial with
    ``all_trials=True``. A trial with an unreadable part is left out, with a warning, unless the
    combined tables hold its rows (see :func:`_read_tables`)."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        raise FileNotFoundError(f"no results directory at {out_dir}; "
                                + (_inside_results(out_dir) or "run `ablate run SPEC` first"))
    if not out_dir.is_dir():
        inside = _inside_results(out_dir)
        raise FileNotFoundError(f"{out_dir} is a file, not a study's results directory (results/<study name>)"
                                + (f"; {inside}" if inside else ""))
    return _results(out_dir, _read_tables(out_dir), all_trials)


def check_statistics_columns(trials: pd.DataFrame, out_dir: str | os.PathLike) -> None:
    """Raise :class:`ResultsError` naming the :data:`STATISTICS_COLUMNS` (and, where some trial is "ok",
    :data:`OK_COLUMNS`) that a trials table with rows lacks (``ablate report`` checks it first): the statistics
    would fail on the first one with a bare KeyError, or count an "ok" trial without a metric as ok in one
    table and as not ok in another."""
    if trials.empty:
        return
    missing = [c for c in STATISTICS_COLUMNS if c not in trials]
    if (trials["status"] == "ok").any():
        missing += [c for c in OK_COLUMNS if c not in trials]
    if missing:
        raise ResultsError(
            f"the trials table of {out_dir} has no {', '.join(missing)} column{'s' if len(missing) > 1 else ''}: it was "
            f"not written by ablate (every trial row `ablate run` writes has trial_id, status, task, seed, arm and, "
            f"for a finished trial, best_metric; see the Columns of ablate.results), so it cannot be reported. "
            f"Add the column{'s' if len(missing) > 1 else ''}, or run the study with `ablate run`")


def _inside_results(path: Path) -> str:
    """Where ``path`` - a folder or file in a study's results directory (its ``report/``,
    ``parts/``, ``trials.parquet``), or one that does not exist there - lies inside the nearest
    enclosing results directory: the hint that names that directory, else ``""``. (``ablate report
    results/quick/report`` was told to run the study first, which would only run it again.)"""
    given, absolute = list(path.parents), list(path.absolute().parents)
    for level, folder in enumerate(absolute):
        if _holds_results(folder):
            named = given[level] if level < len(given) and str(given[level]) not in ("", ".") else folder
            return f"it is inside the results of study {folder.resolve().name}: give that folder, {named}"
    return ""


def _holds_results(folder: Path) -> bool:
    """Whether ``folder`` is a study's results directory (False where it cannot be read)."""
    try:
        return folder.is_dir() and ((folder / PARTS_DIR).is_dir() or (folder / "trials.parquet").is_file())
    except OSError:
        return False


def _holds_tuning(folder: Path) -> bool:
    """Whether ``folder`` holds the stored outputs of an ``ablate tune`` (``tune/history.parquet``)."""
    try:
        return (folder / "tune" / "history.parquet").is_file()
    except OSError:
        return False


def _results(out_dir: Path, stored: _Stored, all_trials: bool = False, warn_missing: bool = True) -> Results:
    """:func:`load_results` of the tables :func:`_read_tables` read. ``warn_missing``: warn about
    the study's trials that have no stored result (``ablate run`` says which itself)."""
    tables, damaged = stored.tables, stored.damaged
    manifest = None if all_trials else read_manifest(out_dir)
    if manifest is not None:  # (a damaged part of a trial the study no longer has is not loaded anyway)
        damaged = {t: why for t, why in damaged.items() if t in manifest}
    if damaged:
        warnings.warn(
            f"{out_dir}: {len(damaged)} trial(s) left out, as not finished, because a result part is damaged and the "
            f"combined tables do not hold its rows: " + "; ".join(f"{t}: {why}" for t, why in damaged.items())
            + ". `ablate run SPEC --out ... --resume` computes them again.", stacklevel=3)
    if tables["trials"].empty and not (out_dir / PARTS_DIR).exists():
        studies = sorted(d.name for d in out_dir.iterdir() if _holds_results(d)) if out_dir.is_dir() else []
        inside = (f"; it holds the results of {', '.join(studies)}: give that folder, e.g. {out_dir / studies[0]}"
                  if studies else "")
        tuned = sorted(d.name for d in out_dir.iterdir() if d.is_dir() and d.name not in studies and _holds_tuning(d))
        if tuned:  # (a folder of `ablate tune` alone: `ablate report` reports it, load_results has no trials to load)
            inside += (f"{'; and' if inside else '; it holds'} the tuning stud{'ies' if len(tuned) > 1 else 'y'} (`ablate tune`) "
                       f"of {', '.join(tuned)}: `ablate report {shlex.quote(str(out_dir / tuned[0]))}` reports "
                       f"{'them' if len(tuned) > 1 else 'it'}")
        # (the folder as `ablate run --out PARENT` names it: `.` or `..` has no name, and `.`'s parent is not `..`)
        named = out_dir if out_dir.name not in ("", ".", "..") else out_dir.resolve()
        if _holds_tuning(out_dir):  # (the folder of an `ablate tune` alone)
            inside += (f"{'; and it' if inside else '; it'} holds a tuning study (`ablate tune`) and no study trials "
                       f"(`ablate run`): `ablate report {shlex.quote(str(out_dir))}` reports it")
        elif not inside and (out_dir / MANIFEST).exists():  # (`ablate run` started here: no trial finished yet)
            inside = ("; none of the study's trials has finished yet (a run still running, or cut off before its first "
                      f"trial finished: `ablate run SPEC --out {shlex.quote(str(named.parent))} --resume` continues it)")
        elif not inside and (enclosing := _inside_results(out_dir)):  # (its report/ or parts/ folder: it has run)
            inside = f"; {enclosing}"
        elif not inside:
            inside = (f"; run the study first (`ablate run SPEC --out {shlex.quote(str(named.parent))}` writes "
                      f"{named.name}/ there for a study named {named.name})")
        raise FileNotFoundError(f"{out_dir} holds no study results (no {PARTS_DIR}/ and no trials.parquet){inside}")
    if manifest is not None and len(tables["trials"]):
        tables["trials"] = _as_in_manifest(tables["trials"], manifest, out_dir)
    if manifest is not None and warn_missing:
        stored_ids = set(tables["trials"]["trial_id"]) if len(tables["trials"]) else set()
        missing = collections.Counter(str(labels.get("arm")) for t, labels in manifest.items()
                                      if t not in stored_ids and t not in damaged)  # (damaged: warned above)
        try:
            stale = pending_reruns(out_dir)[0] & stored_ids
        except ResultsError as exc:
            warnings.warn(str(exc), stacklevel=3)
            stale = set()
        if stale:
            warnings.warn(f"{out_dir}: {len(stale)} trial(s) hold results from before an `ablate run --rerun` that is not "
                          f"complete (their ids are in {RERUN_FILE}): the next `ablate run` of the study computes them "
                          f"again", stacklevel=3)
        if missing:
            warnings.warn(
                f"{out_dir}: {sum(missing.values())} of the study's {len(manifest)} trials have no stored result (not "
                f"run yet, still running, or cut off; by arm: {', '.join(f'{a} {n}' for a, n in missing.items())}): "
                f"the tables and figures leave them out. `ablate run SPEC --out {shlex.quote(str(out_dir.parent))} --resume` runs "
                f"them.", stacklevel=3)
    ids = set(tables["trials"]["trial_id"]) if len(tables["trials"]) else set()
    for name in ("history", "telemetry"):
        df = tables[name]
        if len(df) and "trial_id" in df:
            tables[name] = df[df["trial_id"].isin(ids)].reset_index(drop=True)
    return Results(**tables)


def _as_in_manifest(trials: pd.DataFrame, manifest: Mapping[str, Mapping[str, Any]], out_dir: Path) -> pd.DataFrame:
    """The stored trials that belong to the study of the manifest, with its labels."""
    keep = trials["trial_id"].isin(list(manifest))
    left_out = int((~keep).sum())
    if left_out:
        warnings.warn(
            f"{out_dir}: {left_out} stored trial(s) are not part of the study as last run there (another budget, "
            f"seed, task or arm of an earlier version of the study file); they are left out. "
            f"load_results({str(out_dir)!r}, all_trials=True) includes them.", stacklevel=3)
    trials = trials[keep].reset_index(drop=True)
    for col in LABEL_COLUMNS:
        values = [manifest[t].get(col) for t in trials["trial_id"]]
        if col in trials or any(v is not None for v in values):
            trials[col] = values
    return trials


def consolidate(out_dir: str | os.PathLike) -> Results:
    """Write the combined tables next to the parts and return them."""
    out_dir = Path(out_dir)
    stored = _read_tables(out_dir)  # (read once: the parts of every trial)
    for (table, trial_id), rows in stored.recovered.items():  # damaged parts, repaired
        if rows.empty:
            rows = pd.DataFrame({"trial_id": pd.Series([], dtype="string")})
        atomic_write_parquet(rows.reset_index(drop=True), out_dir / PARTS_DIR / f"{trial_id}.{table}.parquet")
    results = _results(out_dir, stored, warn_missing=False)
    for name in TABLES:
        path = Path(out_dir) / f"{name}.parquet"
        try:
            atomic_write_parquet(getattr(results, name), path)
        except Exception:  # (pyarrow's ArrowTypeError or ArrowInvalid: a column of values of several types)
            table, as_text = _mixed_columns_as_text(getattr(results, name))
            if not as_text:
                raise
            warnings.warn(f"{path}: the column(s) {', '.join(as_text)} hold values of several types (e.g. a setting "
                          f"given as a number in some trials and as a string in others): they are stored there as "
                          f"text (the parts keep each trial's own values)", stacklevel=2)
            atomic_write_parquet(table, path)
    _write_cache(out_dir, stored.parts)
    return results


def _mixed_columns_as_text(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``df`` with its object columns whose values are of several types (which Parquet cannot store
    in one column: tried when it could not be stored) as strings (missing values kept), and their
    names."""
    def missing(v: Any) -> bool:
        return v is None or (isinstance(v, float) and np.isnan(v))

    mixed = [c for c in df.columns if df[c].dtype == object and len({type(v) for v in df[c] if not missing(v)}) > 1]
    if not mixed:
        return df, []
    df = df.copy()
    for c in mixed:
        df[c] = df[c].map(lambda v: v if missing(v) else str(v))
    return df, [str(c) for c in mixed]
