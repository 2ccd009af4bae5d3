"""``ablate run SPEC``: execute a study's trials on Ray Tune and store every result.

* Each trial is a Ray Tune trial of the function trainable :func:`trainable`, which runs
  :class:`ablate.trial.Trial`, reports every epoch (``tune.report`` with a checkpoint), and
  resumes from ``tune.get_checkpoint()`` when Ray restarts it (a lost node, a retry).
* Results are written by the driver, from the trial's last report, the moment a trial finishes:
  one atomic Parquet part per table per trial (:mod:`ablate.results`). A crash loses nothing that
  finished.
* Identity: a trial's id is derived from its full config. Running a study again - with more
  seeds, tasks or arms - runs only the trials whose results are not on disk yet (Ray's own
  experiment restore cannot extend a sweep). ``--resume`` additionally continues unfinished
  trials from their last per-epoch checkpoint (``OUT/<name>/checkpoints/<trial_id>.pt``).
* Local by default (Ray started in-process, as many CPUs as the machine has); ``--address``
  joins a running cluster, ``--storage`` puts Ray's experiment (and its checkpoints) on shared
  storage. Plugin modules of the study are shipped to every worker with Ray's runtime
  environment (``py_modules``) and imported there before a trial is built. Starting or joining
  Ray, the checks before any trial and the SIGTERM exit are :mod:`ablate.cluster`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import logging
import math
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from ablate import results as store
from ablate.cluster import (DropMessages, check_cluster_nodes, check_real_data, check_resources, exit_on_sigterm,
                            import_worker_plugins, init_ray, local_storage, no_result_files, ray_storage_path,
                            ray_tune_quiet, worker_spec)
from ablate.config import ConfigError, did_you_mean, first_ten
from ablate.files import atomic_write_bytes
from ablate.provenance import note_other_code
from ablate.study import Study, TrialSpec, format_trials, load_study

CHECKPOINT_FILE = "trial.pt"
RESULT_KEY = "ablate_result"
FAILED_KEY = "ablate_failed"  # a trial that failed deterministically, reported (not raised: no retry)
#: with FAILED_KEY: the notes and warnings of the failed trial (a JSON list), printed by the driver as an ok trial's
WARNINGS_KEY = "ablate_warnings"
#: with FAILED_KEY: those of its warnings that are about its task's data files (:class:`ablate.tasks.DataWarning`, a
#: JSON list), which the driver prints once per task, as an ok trial's ``data_warnings``
DATA_WARNINGS_KEY = "ablate_data_warnings"
#: with FAILED_KEY: what ran the failed trial (:func:`ablate.provenance.provenance` in the worker, a JSON object)
PROVENANCE_KEY = "ablate_provenance"
#: a report of its own, before the trial trains: the notes of what happened to its checkpoints (a JSON list), which
#: the driver prints and, should the trial then raise or die (Ray reports that error, which cannot carry them),
#: puts before the stored error. Ray Tune counts it as a result: such a trial's epoch N is Ray's training_iteration
#: N + 1, and Ray's own progress.csv (off unless TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0) takes its columns from this
#: first result, so has none of the trial's metrics; ablate's stored results are not affected
NOTES_KEY = "ablate_notes"

#: Ray Tune's "Trial task failed for trial ...", a traceback of ~40 lines for every failed attempt:
#: ``ablate run`` prints one line per failed attempt (and whether it is retried) and stores the
#: traceback with the trial's row (``ablate report`` lists it)
_NO_TRIAL_TRACEBACK = DropMessages("Trial task failed for trial")
#: Ray Tune's "ERROR ... Trials did not complete: [trainable_69bf2_00003, ...]" at the end of a run with a
#: failed trial: Ray's own trial names, which the user cannot map to anything; the run has named each
#: failed trial (task, seed, arm) as it failed, and its summary counts them
_NO_INCOMPLETE_LIST = DropMessages("Trials did not complete")
#: per-trial checkpoints of the last finished epoch, under a study's output directory (deleted once
#: the trial's results are stored)
CHECKPOINTS_DIR = "checkpoints"
#: a progress line for an epoch a running trial finished, at most this often (seconds): trials on
#: real data run for minutes, and a run must not look stalled until the first one ends
PROGRESS_EVERY_S = 30.0


# ---------------------------------------------------------------------------------------------
# the trainable (runs in Ray workers)


def trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one :class:`ablate.trial.Trial`."""
    import torch
    from ray import tune

    prepare_worker(config)
    from ablate.trial import Trial, UnusableCheckpoint

    spec = config["trial"]
    trial_config = dict(spec["config"])
    if not trial_config.get("num_threads"):
        trial_config["num_threads"] = max(1, int(config["cpus"]))
    torch.set_num_threads(trial_config["num_threads"])
    from ablate.config import ConfigError
    from ablate.tasks import DatasetNotFoundError

    data_warnings: list[str] = []  # (those about the task's data files: the driver prints them once per task)
    try:
        with worker_warnings(data_warnings) as trial_warnings:  # (printed by the driver with the result)
            trial = Trial(trial_config)
    except (DatasetNotFoundError, ConfigError):  # deterministic (missing data on this node, a bad config):
        tune.report({"done_trial": True, FAILED_KEY: traceback.format_exc(),  # a retry would fail alike
                     PROVENANCE_KEY: json.dumps(_provenance_of(trial_config)),
                     WARNINGS_KEY: json.dumps(trial_warnings), DATA_WARNINGS_KEY: json.dumps(data_warnings)})
        return
    stable = Path(config["checkpoint_dir"]) / f"{spec['trial_id']}.pt" if config.get("checkpoint_dir") else None
    # what happened to the trial's checkpoints (one set aside, say): a worker's output does not reach the
    # driver (Ray's log_to_driver is off), which prints these with the trial's result, as its warnings
    notes: list[str] = []
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            try:
                trial.load(Path(d) / CHECKPOINT_FILE)
            except UnusableCheckpoint as exc:  # (the data changed under a retried trial, ...) start afresh
                _note(notes, f"trial {trial.trial_id}: Ray's checkpoint is not used ({_reason(exc)})")
    # The stable checkpoint: with --resume, or when an earlier attempt of this very run wrote it (a
    # retry after a lost node). It can be an epoch ahead of Ray's: Ray registers a reported
    # checkpoint only when a later save() call on the trial's actor returns, which a dying node
    # cuts off, so Ray may hand back the previous epoch's checkpoint, or none.
    if stable is not None and stable.exists() and (
            config.get("resume") or stable.stat().st_mtime >= config.get("started_at", math.inf)):
        state = _stable_checkpoint(trial, stable, notes)
        if state is not None and state["epoch"] > trial.epoch:
            try:
                trial.load_state_dict(state)
            except UnusableCheckpoint as exc:  # (a model or optimizer of other code: the trial is as it was)
                _set_aside(trial, stable, exc, notes)

    if notes:  # (now, not only with the result: a trial that raises or dies in training reports nothing more)
        tune.report({NOTES_KEY: json.dumps(notes)})

    def report(row: dict[str, Any], t: Trial) -> None:
        data = t.checkpoint_bytes()  # serialised once, for Ray's checkpoint and the stable copy
        with tempfile.TemporaryDirectory() as d:
            atomic_write_bytes(Path(d) / CHECKPOINT_FILE, data)
            if stable is not None:
                atomic_write_bytes(stable, data)
            tune.report(_flat_metrics(row), checkpoint=tune.Checkpoint.from_directory(d))

    try:
        result = trial.run(callback=report)
    except ConfigError:  # (the task's loss_fn or evaluate() breaks its contract: a retry would fail alike)
        # (with what happened to its checkpoints: a checkpoint set aside must not go unmentioned when the trial fails)
        tune.report({"done_trial": True, FAILED_KEY: _with_notes(traceback.format_exc(), notes),
                     WARNINGS_KEY: json.dumps([*notes, *trial_warnings]), DATA_WARNINGS_KEY: json.dumps(data_warnings),
                     PROVENANCE_KEY: json.dumps(trial.provenance)})
        return
    payload = {"row": result.row, "history": result.history, "telemetry": result.telemetry,
               "warnings": [*notes, *trial_warnings], "data_warnings": data_warnings}
    last = result.history[-1] if result.history else {"epoch": 0}
    tune.report({**_flat_metrics(last), "done_trial": True, RESULT_KEY: json.dumps(payload, default=_json_default)})


def _provenance_of(trial_config: dict[str, Any]) -> dict[str, str]:
    """What runs a trial of ``trial_config`` here (:func:`ablate.provenance.provenance`, with its task's plugin and
    components): a worker's for a trial that could not be built, the driver's for one whose error Ray reported
    (:func:`_failed_row` marks it so)."""
    from ablate.provenance import provenance
    from ablate.tasks import find_task

    return provenance(find_task(trial_config.get("task")), trial_config)


def _note_lines(note: str) -> list[str]:
    """The lines of a note (or a warning) as a run shows them, in a failed trial's stored error and in its output
    alike: a note can quote a multi-line message (torch's "Error(s) in loading state_dict ...:\n\tsize mismatch
    for weight ...\n\tsize mismatch for bias ..."), whose lines stay lines - one run into the next is unreadable -
    its continuation lines indented under the first; blank lines and the spaces around each line dropped."""
    lines = [line.strip() for line in note.strip().splitlines() if line.strip()]
    return lines[:1] + [f"  {line}" for line in lines[1:]]


def _with_notes(error: str, notes: list[str]) -> str:
    """A failed trial's error text with the ``notes`` of its checkpoints before the traceback (whose last line,
    the exception's message, stays the last: the run prints it), every line of a note (:func:`_note_lines`) a
    ``note: ...`` line: the continuation lines of a multi-line note are not taken by
    :func:`ablate.stats.error_summary` for the error of a dead process, which it skips ``note:`` lines for."""
    return "".join(f"note: {line}\n" for n in notes for line in _note_lines(n)) + error


def _going_on(trial: Any) -> str:
    """What a trial whose stable checkpoint is not used does: starts afresh, or goes on from Ray's checkpoint."""
    epoch = getattr(trial, "epoch", 0)
    return f"continuing from Ray's checkpoint of epoch {epoch}" if epoch else "starting afresh"


#: the advice that ends the errors of :meth:`ablate.trial.Trial.check_checkpoint` and ``load_state_dict`` (for
#: ``ablate train --resume``): a worker decides for itself what the trial does next, and says so
_AFRESH_ADVICE = ": start the trial afresh instead"


def _reason(exc: BaseException) -> str:
    """Why a checkpoint is not used, without the advice to start the trial afresh: the note says what the worker does
    (it may go on from Ray's checkpoint, or from the stable one)."""
    text = str(exc)
    return text[: -len(_AFRESH_ADVICE)] if text.endswith(_AFRESH_ADVICE) else text


def _note(notes: list[str] | None, message: str) -> None:
    """Print ``message`` (in the worker's log) and keep it in ``notes`` (for the driver to print)."""
    print(message, flush=True)
    if notes is not None:
        notes.append(message)


def _set_aside(trial: Any, stable: Path, exc: BaseException, notes: list[str] | None, what: str = "cannot be used") -> None:
    """Move the stable checkpoint ``stable`` aside to ``<id>.pt.unreadable-<time>`` (or every ``--resume``
    would fail alike) and say so."""
    aside = stable.with_name(f"{stable.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        os.replace(stable, aside)
        where = f"moved to {aside.name}"
    except OSError as move:
        where = f"left in place (moving it aside failed: {move})"
    _note(notes, f"trial {trial.trial_id}: its checkpoint {stable} {what} ({type(exc).__name__}: {_reason(exc)}); "
                 f"{where}, {_going_on(trial)}")


def _stable_checkpoint(trial: Any, stable: Path, notes: list[str] | None = None) -> dict[str, Any] | None:
    """The trial's stable checkpoint, or None - saying why, in the worker's output and in ``notes`` - when it
    was made on other data, or is unreadable (damaged on disk, a copy cut short) or unusable (another trial's,
    one of another version without the keys this one needs): such a one is moved aside to
    ``<id>.pt.unreadable-<time>``, or every ``--resume`` would fail alike. ``trial``: the
    :class:`ablate.trial.Trial` to resume."""
    import torch

    from ablate.trial import StaleCheckpoint, UnusableCheckpoint

    try:
        state = torch.load(stable, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "epoch" not in state:
            raise ValueError("not a trial checkpoint")
    except Exception as exc:
        if isinstance(exc, (PermissionError, MemoryError)) or (
                isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.ESTALE, errno.EAGAIN, errno.ETIMEDOUT)):
            raise  # (the file itself may be fine: the trial fails, and a retry or --resume reads it again)
        _set_aside(trial, stable, exc, notes, "is unreadable")
        return None
    try:
        trial.check_checkpoint(state)
    except StaleCheckpoint:
        _note(notes, f"trial {trial.trial_id}: its checkpoint {stable} was made on other data files; {_going_on(trial)}")
        return None
    except UnusableCheckpoint as exc:
        _set_aside(trial, stable, exc, notes)
        return None
    return state


@contextlib.contextmanager
def worker_warnings(data: list[str] | None = None) -> Iterator[list[str]]:
    """The messages of the warnings raised within, each once, in the list it gives: a Ray worker's
    output does not reach the driver (``log_to_driver`` is off), which prints them with the result
    (a trial's while it is built: meta_per_epoch above an epoch's steps, data that is not the
    published set, ...). ``data``, where given, also gets those of them that are about the task's
    data files (:class:`ablate.tasks.DataWarning`): every trial reading the files says them alike,
    and the driver prints them once per task, not once per arm."""
    said: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield said
        finally:
            said.extend(dict.fromkeys(str(w.message) for w in caught))
            if data is not None:
                from ablate.tasks import DataWarning

                data.extend(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, DataWarning)))


def prepare_worker(config: dict[str, Any]) -> None:
    """In a Ray worker, before a trial is built: the driver's working directory, where this machine
    has it (Ray Tune runs each trial in a folder of its own, where relative paths in a task's keys
    would not mean what they mean to ``ablate train``), then the study's plugins."""
    if config.get("cwd") and os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])
    import_worker_plugins(config["plugins"], config.get("plugin_dir"))


def _flat_metrics(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float, str, bool))}


def _json_default(value: Any) -> Any:
    """A value of a trial's result that JSON cannot write, as the driver stores it: a NumPy scalar, a
    one-element NumPy array (``np.asarray(0.08)``, 0-d) or a one-element tensor (a task's
    ``reference`` computed with NumPy is a ``numpy.float32``) as the Python number it holds - as a
    string, the ``ref_*`` column of ``ablate run`` was text ("0.080046", "tensor(0.2500)": NaN to the
    report), where ``ablate train`` stored the number -; anything else as its string."""
    import numpy as np

    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.size == 1):
        return value.item()
    if type(value).__module__.startswith("torch") and hasattr(value, "numel") and value.numel() == 1:
        return value.detach().cpu().item()
    return str(value)


# ---------------------------------------------------------------------------------------------
# the driver


@dataclasses.dataclass
class SweepOutcome:
    out_dir: Path
    ran: int
    reused: int
    failed: int
    results: store.Results
    unfinished: int = 0  # trials neither recorded nor failed: the run was interrupted (Ctrl-C)
    unfinished_trials: list[str] = dataclasses.field(default_factory=list)  # "<id> (task, arm, seed N)"


def _labels(spec: TrialSpec, study: Study) -> dict[str, Any]:
    """The columns of a trial row that the study gives it (:data:`ablate.results.LABEL_COLUMNS`)."""
    return {"study": study.name, "arm": spec.arm, "arms": json.dumps(spec.arms), "axis": spec.axis}


def _trial_row(spec: TrialSpec, study: Study, row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "trial_id": spec.trial_id, **_labels(spec, study)}


def _failed_row(spec: TrialSpec, study: Study, error: str, made: dict[str, Any] | None = None,
                node: str | None = None) -> dict[str, Any]:
    """The row of a failed trial; ``made``: what ran it, as the worker reported it (:func:`ablate.provenance.provenance`).
    Without it (the worker raised or died, and Ray reported the error), the driver's code, torch and Python - which
    every node's are compared with before the trials, but a node running other code is only warned about - with
    ``provenance_source`` "driver" to say so, and as ``hostname`` the ``node`` Ray says the trial failed on
    (:func:`_failed_node`; none where Ray did not say: the driver's host need not be the trial's)."""
    from ablate.tasks import find_task

    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    task = find_task(spec.task)
    metric = task.metric if task is not None else None  # (the reports read its direction)
    known = {} if metric is None else {"metric": metric.name, "mode": metric.mode}
    if made is None:
        made = {k: v for k, v in _provenance_of(spec.config).items() if k != "hostname"}
        made["provenance_source"] = "driver"
        if node:
            made["hostname"] = node
    return _trial_row(spec, study, {**spec.config, **known, "status": "failed", "error": error,
                                    "stop_reason": "failed", "best_metric": math.nan, "finished_at": now, **made})


def _make_callbacks(study: Study, by_id: dict[str, TrialSpec], out_dir: Path, total: int, reused: int,
                    keep_checkpoints: bool = False, reruns: _Reruns | None = None):
    from ray import tune

    class Recorder(tune.Callback):
        """Writes each finished trial's results and prints progress with an estimate of time left."""

        def __init__(self) -> None:
            self.start = time.monotonic()
            self.written: set[str] = set()  # trials recorded ok or diverged
            self.failed_ids: set[str] = set()
            self.attempts: dict[str, int] = {}  # trial id -> failed attempts so far (retried)
            self.counted: dict[str, int] = {}  # trial id -> Ray's num_failures at the last retry
            self.write_error: tuple[TrialSpec, OSError] | None = None
            self.eta = TimeLeft([spec.task for spec in by_id.values()])
            self.last_line = time.monotonic()
            #: (task, arm, message) printed: once, not per seed; (task, None, message) for a warning about the
            #: task's data files: once for the task, not per arm (a paper study has 15 arms or more per task)
            self.warned: set[tuple[str, str | None, str]] = set()
            self.notes: dict[str, list[str]] = {}  # trial id -> the notes of its checkpoints its worker reported

        @property
        def done(self) -> int:
            return len(self.written)

        def _store(self, spec: TrialSpec, row: dict, history=(), telemetry=()) -> None:
            try:
                store.write_trial(out_dir, row, history, telemetry)
            except OSError as exc:  # (disk full, a folder made read-only): the run stops; see _run_study
                self.write_error = (spec, exc)
                raise

        @property
        def failed(self) -> int:
            return len(self.failed_ids)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            spec = by_id[trial.config["trial"]["trial_id"]]
            if NOTES_KEY in result:  # what happened to its checkpoints, reported before it trains (see trainable)
                said = self.notes.setdefault(spec.trial_id, [])
                said += [n for n in json.loads(result.pop(NOTES_KEY)) if n not in said]
                self._warn(spec, said)
                return
            if FAILED_KEY in result:  # a deterministic failure the worker reported without raising
                made = json.loads(result.pop(PROVENANCE_KEY, None) or "null")
                self._record_failure(trials, spec, result[FAILED_KEY], "; not retried",
                                     json.loads(result.pop(WARNINGS_KEY, None) or "[]"), made,
                                     data_messages=json.loads(result.pop(DATA_WARNINGS_KEY, None) or "[]"))
                return
            if RESULT_KEY not in result:  # an epoch of a running trial
                if time.monotonic() - self.last_line >= PROGRESS_EVERY_S and "epoch" in result:
                    from ablate.tasks import find_task

                    task = find_task(spec.task)
                    name = task.metric.name if task is not None else None
                    value = result.get(f"val_{name}")
                    shown = f" {name}={value:.5g}" if isinstance(value, (int, float)) else ""
                    self._progress(trials, f"{spec.task} seed {spec.seed} {spec.arm}: epoch {result['epoch']}/"
                                           f"{spec.config.get('epochs', '?')}{shown}")
                return
            # taken out of the result (Ray Tune lets callbacks change it in place): the driver would otherwise keep
            # every finished trial's history and telemetry in its last_result, and write them into every
            # experiment snapshot, to the end of the sweep - they are stored here
            payload = json.loads(result.pop(RESULT_KEY))
            # missing metrics as NaN; config values keep their None (a row must rebuild its config)
            row = {k: (math.nan if v is None and k not in spec.config else v) for k, v in payload["row"].items()}
            self._store(spec, _trial_row(spec, study, row), payload["history"], payload["telemetry"])
            self.written.add(spec.trial_id)
            self._warn(spec, payload.get("warnings") or (), payload.get("data_warnings") or ())
            self._rerun_done(spec)
            if not keep_checkpoints:  # its results are stored: the checkpoint for --resume is no longer needed
                (out_dir / CHECKPOINTS_DIR / f"{spec.trial_id}.pt").unlink(missing_ok=True)
            self.eta.finished(spec.task, row.get("time_total_s"))
            self._progress(trials, f"{spec.task} seed {spec.seed} {spec.arm}: {_finished_line(row)}")

        def on_trial_error(self, iteration, trials, trial, **info):
            spec = by_id[trial.config["trial"]["trial_id"]]
            error = _trial_error(trial)
            # (the notes its worker reported before it raised or died, which Ray's error cannot carry)
            notes = [n for n in self.notes.get(spec.trial_id, []) if n not in error]
            self._record_failure(trials, spec, _with_notes(error, notes), node=_failed_node(trial, error))

        def on_trial_recover(self, iteration, trials, trial, **info):
            spec = by_id[trial.config["trial"]["trial_id"]]
            attempt = self.attempts[spec.trial_id] = self.attempts.get(spec.trial_id, 0) + 1
            counted = trial.num_failures > self.counted.get(spec.trial_id, 0)  # (Ray counts no preemption)
            self.counted[spec.trial_id] = trial.num_failures
            retry = (f"retrying ({trial.num_failures} of {study.retries} retries)" if counted
                     else "retrying (not counted against the retries: its node was preempted)")
            self._progress(trials, f"{spec.task} seed {spec.seed} {spec.arm}: attempt {attempt} failed "
                                   f"({_last_line(_trial_error(trial))}); {retry}")

        def _warn(self, spec: TrialSpec, messages, data_messages=()) -> None:
            """Print a trial's ``messages`` not printed yet: an arm's seeds warn alike (its first says it), and
            every trial of a task says those about the task's data files (``data_messages``, among ``messages``)
            alike: the first says them, under the task's name only."""
            for message in messages:
                shared = message in data_messages
                key = (spec.task, None if shared else spec.arm, message)
                if key not in self.warned:
                    self.warned.add(key)
                    who = spec.task if shared else f"{spec.task} seed {spec.seed} {spec.arm}"
                    # (a multi-line note's lines as the stored error has them, the continuation ones indented; a task's
                    # warning that starts with its name - "etth1: ..." - not said "etth1: warning: etth1: ...")
                    first, *rest = _note_lines(message.removeprefix(f"{spec.task}: ")) or [""]
                    print("\n".join([f"{who}: warning: {first}", *rest]), flush=True)

        def _record_failure(self, trials, spec: TrialSpec, error: str, note: str = "", messages=(),
                            made: dict[str, Any] | None = None, node: str | None = None, data_messages=()) -> None:
            self._store(spec, _failed_row(spec, study, error, made, node))
            self._warn(spec, messages, data_messages)
            self.failed_ids.add(spec.trial_id)
            self._rerun_done(spec)
            self.eta.finished(spec.task, None)
            # (said for a traceback, not for a one-line error that only has the ``note:`` lines of _with_notes before it)
            own = error.strip().splitlines()
            while own and own[0].startswith("note: "):
                own.pop(0)
            stored = "; the traceback is stored with the trial" if len(own) > 1 else ""
            self._progress(trials, f"{spec.task} seed {spec.seed} {spec.arm}: FAILED ({_last_line(error)}{note}{stored})")

        def _rerun_done(self, spec: TrialSpec) -> None:
            if reruns is not None:
                try:
                    reruns.finished(out_dir, spec.trial_id)
                except OSError as exc:  # (disk full: the trial is stored, rerun.json is not): as in _store
                    self.write_error = (spec, exc)
                    raise

        def _progress(self, trials, last: str) -> None:
            # (Ray Tune marks the trial that just reported its result or error as finished only after
            # these callbacks: a trial already recorded here is not running any more)
            recorded = self.written | self.failed_ids
            running = sum(1 for t in trials if t.status == "RUNNING" and _spec_id(t) not in recorded)
            finished = self.done + self.failed
            seconds = self.eta.seconds_left(time.monotonic() - self.start)
            eta = f", about {_duration(seconds)} left" if seconds is not None else ""
            print(f"[{reused + finished}/{total} done ({reused} reused), {running} running, {self.failed} failed"
                  f"{eta}] {last}", flush=True)
            self.last_line = time.monotonic()

    return Recorder()


def _finished_line(row: dict[str, Any]) -> str:
    """What the progress line says of a finished trial's result: ``ok mse=0.41``; for a trial that
    diverged, that it has no result (the run's table and the report leave it out, as "not ok"), and
    the best metric of its epochs before it diverged only as such - ``diverged mse=3.7115`` read as
    the trial's result."""
    metric, best = row.get("metric"), row.get("best_metric")
    if row.get("status") != "diverged":
        return f"{row.get('status')} {metric}={best:.5g}"
    if not isinstance(best, (int, float)) or not math.isfinite(best):
        return f"diverged, no result (no finite {metric} before it diverged)"
    epoch = row.get("best_epoch")
    at = f", epoch {int(epoch)}" if isinstance(epoch, (int, float)) and math.isfinite(epoch) else ""
    return f"diverged, no result (its best {metric} before it diverged: {best:.5g}{at})"


def _spec_id(trial: Any) -> str | None:
    """The ablate trial id of a Ray Tune trial (None for one that is not an ablate trial)."""
    spec = (getattr(trial, "config", None) or {}).get("trial")
    return spec.get("trial_id") if isinstance(spec, dict) else None


class TimeLeft:
    """The estimate of a sweep's time left: the trials still to run, each at the mean duration of
    the finished trials of its task (of all finished trials, for a task with none yet), converted
    to wall time by the run's own ratio of wall time to trial time so far (which takes in the
    concurrent slots and the framework's cost). Tasks differ by 10x in trial length, so a plain
    "elapsed / finished x left" is far off while the first, short, tasks finish."""

    def __init__(self, tasks: list[str]) -> None:
        self.left: dict[str, int] = {}
        for task in tasks:
            self.left[task] = self.left.get(task, 0) + 1
        self.durations: dict[str, list[float]] = {}
        self.count = 0

    def finished(self, task: str, seconds: float | None) -> None:
        """One trial of ``task`` ended, after ``seconds`` of trial time (None: unknown, e.g. failed)."""
        self.left[task] = max(0, self.left.get(task, 0) - 1)
        self.count += 1
        if seconds is not None and math.isfinite(seconds) and seconds >= 0:
            self.durations.setdefault(task, []).append(float(seconds))

    def seconds_left(self, elapsed: float) -> float | None:
        """Wall seconds left, or None when nothing is left or nothing is known yet."""
        if not any(self.left.values()) or not self.count:
            return None
        known = [d for ds in self.durations.values() for d in ds]
        if not known or sum(known) <= 0:
            return elapsed / self.count * sum(self.left.values())
        overall = sum(known) / len(known)
        work_left = sum(n * (sum(self.durations[t]) / len(self.durations[t]) if self.durations.get(t) else overall)
                        for t, n in self.left.items())
        return work_left * elapsed / sum(known)


def _last_line(error: str, default: str = "no error message") -> str:
    """The last line of an error text (the exception's message), or ``default`` when it is empty."""
    lines = error.strip().splitlines()
    return lines[-1] if lines else default


#: the node of a failed attempt in Ray's error text, as Ray writes it: a RayTaskError's task line
#: ("ray::ImplicitFunc.train() (pid=123, ip=10.0.0.5, actor_id=...)", its name perhaps still coloured) and an
#: ActorDiedError's "\tip: 10.0.0.5" line - not any "ip=" or "ip:", which the trainable's own message or a line of
#: code its traceback quotes may hold ("connection to ip=10.1.2.3 refused")
_ERROR_IP = re.compile(r"(?:ray::[^\n]*?\(\)(?:\x1b\[[0-9;]*m)? \(pid=\d+, ip=|^\tip: )([0-9A-Fa-f.:]+)",
                       re.MULTILINE)


#: the header Ray's error file puts before each failed attempt's error ("Failure # 2 (occurred at 2026-...)")
_FAILURE_HEADER = re.compile(r"^Failure # \d+ \(occurred at [^\n]*\)$", re.MULTILINE)


def _failed_node(trial: Any, error: str) -> str | None:
    """The host a Ray Tune trial's last attempt failed on, as Ray reports it (None where it does not): the node's IP
    address from the last attempt's error in the text (``error``, Ray's error file: a ``RayTaskError`` - the
    trainable raised - names it as ``ip=`` in its first line, an ``ActorDiedError`` - the process died - in an ``ip:``
    line; the first of the section, not an address the exception's own message gives, "ip=10.9.8.7"), or, for
    a text without Ray's "Failure # N" headers (made from the pickled error itself), from the error Ray pickled
    (``RayTaskError.ip``), else from the text's first such line of Ray's (:data:`_ERROR_IP`: not the last ``ip=``,
    which may be one the message quotes); then that node's host name from the trial's last result (Ray's
    ``hostname``, where its ``node_ip`` is that address) or from ``ray.nodes()``; the address itself where neither
    names the node. Not the
    host of the trial's last result alone, which may be an earlier attempt's, on another node; nor the node of an
    earlier attempt's error: Ray pickles only a task's or an actor's error, so a later failure of another kind (a
    ``TuneError`` of the driver, which names no node) leaves the earlier attempt's pickled error in place, and its
    text stays above the last attempt's in the file - the row's node would not be that of the error it stores last."""
    sections = _FAILURE_HEADER.split(error)
    if len(sections) > 1:  # Ray's error file: the last attempt's error is the last section
        # (its first address: Ray's own line, which heads the section - "ray::ImplicitFunc.train() (pid=.., ip=..)"
        # or the dead actor's "ip:" line -, not one the trainable's message or its traceback's code quotes below it)
        found = _ERROR_IP.findall(sections[-1])
        ip = found[0] if found else None
    else:
        ip = None
        # (the driver's copy of the pickled error: get_pickled_error() reads the storage's, which may not be synced yet)
        path = getattr(trial, "pickled_error_file", None)
        try:
            if path and os.path.exists(path):
                from ray import cloudpickle

                with open(path, "rb") as f:
                    ip = getattr(cloudpickle.load(f), "ip", None)
        except Exception:  # noqa: BLE001 - (an error that does not unpickle here): the text below
            ip = None
        if not isinstance(ip, str) or not ip:  # (the first: Ray's line heads its error, the message comes below it)
            found = _ERROR_IP.findall(error)
            ip = found[0] if found else None
    if ip is None:
        return None
    last = getattr(getattr(trial, "run_metadata", None), "last_result", None) or {}
    if last.get("node_ip") == ip and isinstance(last.get("hostname"), str) and last["hostname"]:
        return last["hostname"]
    try:
        import ray

        for node in ray.nodes() if ray.is_initialized() else ():
            if node.get("NodeManagerAddress") == ip and node.get("NodeManagerHostname"):
                return str(node["NodeManagerHostname"])
    except Exception:  # noqa: BLE001 - (Ray going down): the address is what is known
        pass
    return ip


#: a terminal's colour and style codes (ANSI CSI sequences): Ray's error text colours the failing task's name
#: ("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=..., ip=...)"), which a stored error, a report or a
#: notebook shows as raw escape bytes
_ANSI_CODES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def _trial_error(trial) -> str:
    """The error text of a Ray Tune trial's failed attempts (Ray's error file, else its pickled error), without the
    terminal colour codes Ray puts in it: the text is stored with the trial's row and printed."""
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return _ANSI_CODES.sub("", Path(path).read_text())
    err = trial.get_pickled_error() if hasattr(trial, "get_pickled_error") else None
    text = "".join(traceback.format_exception(err)) if err else "the trial failed without an error message"
    return _ANSI_CODES.sub("", text)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def longest_first(trials: list[TrialSpec]) -> list[TrialSpec]:
    """The trials in the order they are handed to Ray: the probably longest first (more epochs),
    then each task and seed together, in the study's order, its MetaAdamW arms before its AdamW
    arm. Concurrent slots then finish together instead of one slot running a long trial alone at
    the end (longest-processing-time scheduling; on the sweep benchmark's 8 short trials two slots
    otherwise ended 1.6 s apart), and each AdamW trial runs beside the MetaAdamW trials of its
    task and seed, not after every one of them: the reports' time change compares trials that ran
    under the same load (with every AdamW trial last, a run that shared its machine with other
    work for a while compared MetaAdamW's loaded trials with AdamW's quiet ones)."""
    blocks: dict[tuple[str, int], int] = {}  # (task, seed) -> its place in the study's order
    for t in trials:
        blocks.setdefault((t.task, t.seed), len(blocks))

    def cost(t: TrialSpec) -> tuple[int, int, int]:
        return (-int(t.config.get("epochs") or 0), blocks[t.task, t.seed],
                0 if t.config.get("optimizer") == "metaadamw" else 1)

    return sorted(trials, key=cost)


def set_aside_stale_data(study: Study, out_dir: Path, stored) -> set[str]:
    """Ids of the study's stored trials that were made on other real data than their data
    directory holds now (:func:`ablate.tasks.data_fingerprint` differs: a file replaced by a
    subset or a newer version; ``data_dir`` is not part of a trial's identity, so that moving
    the data keeps its results). They run again; their result parts are first copied to
    ``OUT/<study>/stale-data/<time>/`` (their rows of the three tables, and their checkpoints,
    which a ``--resume`` must not continue), so nothing is lost. Trials stored before fingerprints
    were recorded, and data this machine cannot locate (``--address``: it may live on the workers
    only), are not checked. An unfinished trial's checkpoint records its fingerprint too: the
    trial ignores it when the data changed (:meth:`ablate.trial.Trial.can_resume_from`)."""
    from ablate.tasks import DatasetNotFoundError, data_fingerprint, get_task

    if stored.empty or "data_fingerprint" not in stored:
        return set()
    recorded = {r.trial_id: r.data_fingerprint for r in stored.itertuples()
                if isinstance(r.data_fingerprint, str) and r.data_fingerprint}
    now: dict[str, str | None] = {}
    walked: dict = {}  # (each located file or folder's count and size: walked once for all the trials reading it)
    stale: dict[str, list] = {}
    for spec in study.trials:
        if spec.trial_id not in recorded or spec.config.get("data") != "real":
            continue
        key = json.dumps(sorted(spec.config.items()), default=str)  # (a task's locate may read any key)
        if key not in now:
            try:
                now[key] = data_fingerprint(get_task(spec.task), spec.config, walked)
            except (DatasetNotFoundError, OSError):
                now[key] = None
        if now[key] is not None and now[key] != recorded[spec.trial_id]:
            stale.setdefault(spec.task, []).append(spec.trial_id)
    if not stale:
        return set()
    stale_ids = {t for task_ids in stale.values() for t in task_ids}
    # (a --resume must not continue a checkpoint made on the old data)
    keep = _copy_aside(out_dir, stale_ids, "stale-data", _checkpoints_of(out_dir, stale_ids))
    for task, ids in stale.items():
        print(f"{task}: {len(ids)} stored trial(s) were made on other data files than its data directory holds now "
              f"(a file's size differs); they run again. Their old results are kept in {keep}", flush=True)
    return stale_ids


def _checkpoints_of(out_dir: Path, ids: set[str]) -> list[Path]:
    """The stable checkpoints (``OUT/<name>/checkpoints``) of the trials ``ids`` that exist."""
    return [c for c in (out_dir / CHECKPOINTS_DIR / f"{t}.pt" for t in sorted(ids)) if c.exists()]


def _copy_aside(out_dir: Path, ids: set[str], folder: str, checkpoints: Sequence[Path] = ()) -> Path:
    """Copy the stored rows of the trials ``ids`` into ``OUT/<name>/<folder>/<now>/<table>.parquet``
    before they are computed again (results already made are never lost), and move ``checkpoints``
    there (a ``--resume`` must not continue them)."""
    keep = out_dir / folder / f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
    keep.mkdir(parents=True, exist_ok=True)
    old = store.load_results(out_dir, all_trials=True)  # (parts, or the combined tables standing in for them)
    for name in store.TABLES:
        df = getattr(old, name)
        if "trial_id" in df:
            store.atomic_write_parquet(df[df["trial_id"].isin(list(ids))].reset_index(drop=True), keep / f"{name}.parquet")
    for ckpt in checkpoints:
        shutil.move(str(ckpt), keep / ckpt.name)
    return keep


def rerun_selection(study: Study, selectors: Sequence[str]) -> set[str]:
    """The trials of ``study`` that ``--rerun`` selects: every one for ``all``, else those whose
    task, or one of whose arms, is named."""
    from ablate.config import ConfigError

    if "all" in selectors:
        return {t.trial_id for t in study.trials}
    names = {t.task for t in study.trials} | {a for t in study.trials for a in t.arms}
    unknown = [s for s in selectors if s not in names]
    if unknown:
        raise ConfigError(f"--rerun {' '.join(unknown)}: not a task or arm of study {study.name}"
                          f"{did_you_mean(unknown[0], names)}; its tasks and arms: {', '.join(sorted(names))} (or all)")
    return {t.trial_id for t in study.trials if t.task in selectors or any(a in selectors for a in t.arms)}


@dataclasses.dataclass
class _Reruns:
    """The trials an ``ablate run --rerun`` has still to compute again, and those it has."""

    ids: set[str]
    done: set[str]

    def finished(self, out_dir: Path, trial_id: str) -> None:
        if trial_id in self.ids:  # computed again: a later run reuses it
            self.ids.discard(trial_id)
            self.done.add(trial_id)
            store.write_reruns(out_dir, self.ids, self.done)


def _start_reruns(study: Study, out_dir: Path, selectors: Sequence[str] | None, finished: set[str]) -> _Reruns:
    """The trials to compute again: those a rerun cut off left (:data:`ablate.results.RERUN_FILE`)
    and, with ``--rerun``, every trial of the study it selects - bar those that an incomplete rerun
    of this study has computed again already (the same command given again after Ctrl-C continues
    it). The selected trials' stored rows are copied to ``replaced/<time>/`` and their checkpoints
    moved there: a ``--resume`` must not continue a checkpoint of the code being replaced."""
    ids, done = store.pending_reruns(out_dir)
    study_ids = {t.trial_id for t in study.trials}
    earlier = len(ids & finished & study_ids)
    if not ids & study_ids:  # no rerun of this study is under way: what one did before is history
        done = set()
    if selectors:
        selected = rerun_selection(study, selectors)
        skipped = selected & done
        if skipped:
            print(f"--rerun: {len(skipped)} of the selected trial(s) were computed again by an earlier --rerun that is "
                  f"not complete yet: not again (to start over, delete {out_dir / store.RERUN_FILE} first)", flush=True)
        again = selected - ids - done
        checkpoints = _checkpoints_of(out_dir, again)
        if again & finished or checkpoints:
            keep = _copy_aside(out_dir, again & finished, "replaced", checkpoints)
            print(f"--rerun: {len(again & finished)} stored trial(s) run again (their current results are copied to "
                  f"{keep}){f'; {len(checkpoints)} checkpoint(s) of the code before moved there too' if checkpoints else ''}",
                  flush=True)
        if again:
            ids |= again
            store.write_reruns(out_dir, ids, done)
    if earlier:
        print(f"{earlier} trial(s) that an earlier `ablate run --rerun` selected and that were not computed again yet "
              f"run again", flush=True)
    return _Reruns(ids, done)


def no_meta_updates(study: Study) -> int:
    """How many MetaAdamW trials end within their warm-up epochs (so never meta-update)."""
    return sum(1 for t in study.trials if t.config.get("optimizer") == "metaadamw"
               and (t.config.get("epochs") or 0) <= (t.config.get("warmup_epochs") or 0))


def _note_idle_trials(study: Study) -> None:
    idle = no_meta_updates(study)
    if idle:
        print(f"note: {idle} MetaAdamW trial(s) train no more epochs than their warm-up (epochs <= warmup_epochs): "
              f"they make no meta-update, so their modulator stays as initialised", flush=True)


def _note_too_few_seeds(study: Study) -> None:
    """Say at the start of a run (and of a dry run) what the report would say only at the end: with
    its seeds, no paired comparison of a table of the report can be significant at the report's alpha
    (:func:`ablate.stats.too_few_seeds_to_test`: 5 seeds or fewer at 0.05 for one comparison, more for
    a Holm family of several)."""
    from ablate.stats import ADAMW, BASELINE, arm_axis, too_few_seeds_to_test

    # Table 3's two families at their largest over the tasks (the ablation arms of one task, the factorial cells of
    # another, maybe): an arm whose trial is the baseline's (a level equal to the task's baseline setting) is no row
    # of its family. (The task with the most arms in all, AdamW and cells counted, could have fewer ablation arms
    # than another, and the note ask too few seeds.)
    own: dict[str, set[str]] = {task: set() for task in study.tasks}
    for t in study.trials:
        if BASELINE not in t.arms:
            own[t.task].update(a for a in t.arms if a != ADAMW)
    if BASELINE in study.arms():
        ablations = max(({a for a in arms if arm_axis(a) != "factorial"} for arms in own.values()), key=len)
        cells = max(({a for a in arms if arm_axis(a) == "factorial"} for arms in own.values()), key=len)
        arms = {BASELINE, *({ADAMW} & set(study.arms())), *ablations, *cells}
    else:
        arms = set(study.arms())
    note = too_few_seeds_to_test(len(study.seeds), arms, n_tasks=len(study.tasks))
    if note:
        print(f"note: {note}", flush=True)


def run_study(
    study: Study,
    out_root: str | os.PathLike = "results",
    *,
    resume: bool = False,
    address: str | None = None,
    storage: str | None = None,
    max_concurrent: int | None = None,
    num_cpus: int | None = None,
    keep_checkpoints: bool = False,
    rerun: Sequence[str] | None = None,
    wait_for_folder: bool = False,
    resume_hint: str | None = None,
) -> SweepOutcome:
    """Run every trial of ``study`` whose result is not stored yet; return the study's tables.

    A trial's checkpoint (``OUT/<name>/checkpoints/<trial_id>.pt``: model, optimizer, best weights) is
    deleted once its results are stored, and Ray's copies of them once every trial is recorded,
    unless ``keep_checkpoints``: on the paper's study they would take tens of GB. ``rerun``: run
    these stored trials again (selectors of :func:`rerun_selection`: tasks, arms, or ``["all"]``),
    as after a fix to code that trial ids, which hash the configuration, cannot see. One run at a
    time writes into a study's output folder: a second is refused (:class:`ablate.config.ConfigError`),
    or waits for the first with ``wait_for_folder``. ``resume_hint``: the command that continues the
    run, printed when SIGTERM ends it (:func:`ablate.cluster.exit_on_sigterm`)."""
    storage = ray_storage_path(storage)
    check_resources(study, address, num_cpus)
    if address is None:  # trials run on this machine: a missing data directory is an error now, not in a worker
        check_real_data(study)
    out_dir = Path(out_root) / study.name
    make_out_folder(out_dir)
    with _exclusive(out_dir, wait=wait_for_folder):
        return _run_study(study, out_dir, resume=resume, rerun=rerun, address=address, storage=storage,
                          max_concurrent=max_concurrent, num_cpus=num_cpus, keep_checkpoints=keep_checkpoints,
                          resume_hint=resume_hint)


#: the lock file of a study's output directory, held by the ``ablate run`` writing into it
LOCK_FILE = ".ablate-run.lock"


@contextlib.contextmanager
def _exclusive(out_dir: Path, wait: bool = False) -> Iterator[None]:
    """Hold ``OUT/<name>/.ablate-run.lock`` while a run writes into ``out_dir``: a second run of the
    same study into the same folder (a seed added from another terminal) is refused, not left to
    delete the first one's live Ray directory and rewrite its manifest; with ``wait`` (``ablate
    tune``'s AdamW reference, which two tuning processes may want at once) it waits for the first
    instead, then reuses what that stored. A lock of the operating system (``flock``): a killed run
    releases it; on a file system that does not support it, runs are not kept apart."""
    from ablate.config import ConfigError

    try:
        import fcntl
    except ImportError:  # (not on Windows)
        yield
        return
    path = out_dir / LOCK_FILE
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(f)
            if not wait:
                raise ConfigError(f"{out_dir} is in use by another run of this study ({holder}): wait for it to finish "
                                  f"(it stores every trial it runs; a later run reuses them), or give this run "
                                  f"another --out") from None
            print(f"waiting for {out_dir}, in use by {holder}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without locks
            yield
            return
        try:
            f.seek(0)
            f.truncate()
            command = " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:2]) if sys.argv and sys.argv[0] else "python"
            f.write(f"`{command}`, pid {os.getpid()} on {socket.gethostname()}, "
                    f"started {datetime.datetime.now():%Y-%m-%d %H:%M:%S}")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


#: how long a run refused the folder reads its lock file again while it is empty (seconds): see :func:`_lock_holder`
HOLDER_WAIT_S = 1.0


def _lock_holder(f) -> str:
    """Who holds the lock file ``f``: what that run wrote there (its command, pid, host and start). It
    empties the file and writes that just after it took the lock, so a run refused in that instant -
    two runs started at once - found it empty and named no one ("another process"); it reads again,
    for up to :data:`HOLDER_WAIT_S`, until the holder has written it."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        f.seek(0)
        holder = f.read().strip()
        if holder or time.monotonic() >= deadline:
            return holder or "another process"
        time.sleep(0.02)


def _run_again(study: Study, out_dir: Path, resume_hint: str | None) -> str:
    """What runs the study's stored trials again with this code: ``ablate run``'s command (its resume
    command, which ends with --resume) with ``--rerun``; the command of ``run_study`` called from
    Python; for another command's study (``ablate tune``'s AdamW reference), deleting its folder."""
    import shlex

    rerun = " --rerun all (or --rerun TASK or ARM for some)"
    if resume_hint is None:
        return shlex.join(["ablate", "run", str(study.path or "SPEC"), "--out", str(out_dir.parent)]) + rerun
    if resume_hint.endswith(" --resume"):
        return resume_hint.removesuffix(" --resume") + rerun
    return (f"delete {out_dir} and run `{resume_hint}` again (values stored before from these trials, such as a "
            f"search's scores, stay as they were)")


def _run_study(study: Study, out_dir: Path, *, resume: bool, rerun: Sequence[str] | None, address: str | None,
               storage: str | None, max_concurrent: int | None, num_cpus: int | None,
               keep_checkpoints: bool, resume_hint: str | None = None) -> SweepOutcome:
    for folder in (out_dir / store.PARTS_DIR, out_dir / store.CACHE_DIR, out_dir / CHECKPOINTS_DIR, out_dir):  # cut off
        for stale in folder.glob(".*.tmp"):  # (the folder's lock: no other run of the study is writing)
            stale.unlink(missing_ok=True)
    copy = out_dir / "study.yaml"
    if study.path is not None and not (copy.exists() and os.path.samefile(study.path, copy)):
        shutil.copyfile(study.path, copy)
    store.write_manifest(out_dir, study.name, {t.trial_id: _labels(t, study) for t in study.trials})
    stored = store.finished_trials(out_dir, cache=True)  # (consolidate reads the parts again)
    finished = set(stored["trial_id"]) if len(stored) else set()
    finished -= set_aside_stale_data(study, out_dir, stored)
    reruns = _start_reruns(study, out_dir, rerun, finished)
    finished -= reruns.ids
    pending = longest_first([t for t in study.trials if t.trial_id not in finished])
    reused = len(study.trials) - len(pending)
    print(f"study {study.name}: {len(study.trials)} trials, {reused} already done (reused), {len(pending)} to run "
          f"-> {out_dir}", flush=True)
    note_other_code(stored, {t.trial_id for t in study.trials} & finished, _run_again(study, out_dir, resume_hint))
    _note_idle_trials(study)
    _note_too_few_seeds(study)
    if not pending:
        if not keep_checkpoints:
            _clean_up(out_dir, study, storage, None)
        return SweepOutcome(out_dir, 0, reused, 0, store.consolidate(out_dir))

    # one checkpoint per epoch makes Ray warn about frequent experiment snapshots; that is intended
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    try:
        # (imported only now: Ray takes seconds to import, and a run whose every trial is stored needs none of it)
        from ray import tune

        no_result_files()
        started = init_ray(study, address, num_cpus)
    except KeyboardInterrupt:  # Ctrl-C while Ray is imported or starts (init_ray shut down what it had started)
        return _interrupted_or_done(out_dir, pending, set(), 0, 0, reused)
    controller_log = logging.getLogger("ray.tune.execution.tune_controller")
    controller_log.addFilter(_NO_TRIAL_TRACEBACK)  # during this sweep only (the Recorder says what failed)
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addFilter(_NO_INCOMPLETE_LIST)
    made: dict[str, Any] = {}  # (the recorder, for the SIGTERM message: what did not finish)
    with exit_on_sigterm(lambda: _sigterm_message(pending, made.get("recorder"), resume_hint, out_dir),
                         fallback=resume_hint or "the same command with --resume") as rearm:
        try:
            if address is not None:  # a cluster: what the trials need on the nodes that run them
                folders = {"checkpoints": out_dir / CHECKPOINTS_DIR}
                shared = out_dir / "ray" if storage is None else local_storage(storage)
                if shared is not None:  # (a URI is Ray's business)
                    folders["storage"] = shared
                check_cluster_nodes(study, folders)
            by_id = {t.trial_id: t for t in pending}
            recorder = made["recorder"] = _make_callbacks(study, by_id, out_dir, len(study.trials), reused,
                                                          keep_checkpoints, reruns)
            cpus, gpus = study.resources.get("cpus", 1), study.resources.get("gpus", 0)
            space = {
                "trial": tune.grid_search([worker_spec(t) for t in pending]),
                "plugins": list(study.plugins),
                "plugin_dir": str(study.path.parent.resolve()) if study.path is not None else None,
                "cwd": os.getcwd(),
                "checkpoint_dir": str((out_dir / CHECKPOINTS_DIR).resolve()),
                "resume": resume,
                "started_at": time.time(),  # stable checkpoints written since then belong to this run
                "cpus": cpus,
            }
            storage_path = storage or str((out_dir / "ray").resolve())
            # (with the process id: two output folders sharing a --storage may start runs in the same second)
            run_name = f"{study.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
            if storage is not None:  # (its folder there is deleted once every trial is recorded, also by a later run)
                with open(out_dir / STORAGE_RUNS, "a", encoding="utf-8") as f:
                    f.write(json.dumps([storage, run_name]) + "\n")
            tuner = tune.Tuner(
                tune.with_resources(trainable, {"cpu": cpus, "gpu": gpus}),
                param_space=space,
                tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
                run_config=tune.RunConfig(
                    name=run_name,
                    storage_path=storage_path,
                    failure_config=tune.FailureConfig(max_failures=study.retries),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    callbacks=[recorder],
                    verbose=0,
                ),
            )
            try:
                with ray_tune_quiet():
                    tuner.fit()
            except KeyboardInterrupt:  # a second Ctrl-C, which Ray's message invites ("Press CTRL+C ... to skip"):
                pass  # what finished is stored; the unfinished trials are named below, as after the first
            except Exception:  # (Ray wraps the callback's error in a TuneError of some 80 lines)
                if recorder.write_error is None:
                    raise
                spec, exc = recorder.write_error
                raise store.ResultsError(
                    f"could not store the results of trial {spec.trial_id} ({spec.task}, seed {spec.seed}) in {out_dir} "
                    f"({type(exc).__name__}: {exc}), so the run stopped; the results stored before are kept. Free space "
                    f"or make the folder writable, then run the same command with --resume") from None
        finally:
            controller_log.removeFilter(_NO_TRIAL_TRACEBACK)  # (ablate tune prints no line per retry of its own)
            tune_log.removeFilter(_NO_INCOMPLETE_LIST)
            if started:
                import ray

                ray.shutdown()
                rearm()
        recorded = recorder.written | recorder.failed_ids
        if not keep_checkpoints and all(t.trial_id in recorded for t in pending):
            _clean_up(out_dir, study, storage, run_name)  # Ray's copies: --resume reads the stable ones
        return _interrupted_or_done(out_dir, pending, recorded, recorder.done + recorder.failed, recorder.failed,
                                    reused)


def _interrupted_or_done(out_dir: Path, pending: list[TrialSpec], recorded: set[str], ran: int, failed: int,
                         reused: int) -> SweepOutcome:
    """The outcome of a run: the trials of ``pending`` not ``recorded`` did not finish (Ray Tune catches
    Ctrl-C itself and returns from fit() as if done; a Ctrl-C while Ray starts ends it before any)."""
    left = [t for t in pending if t.trial_id not in recorded]
    names = [_trial_label(t) for t in left]
    if left:
        print(f"\ninterrupted: {len(left)} trial(s) did not finish: {first_ten(names)}", flush=True)
    if any((out_dir / store.PARTS_DIR).glob("*.trials.parquet")):
        results = store.consolidate(out_dir)
    else:  # interrupted before any trial finished
        import pandas as pd

        results = store.Results(*(pd.DataFrame() for _ in store.TABLES))
    return SweepOutcome(out_dir, ran, reused, failed, results, len(left), names)


# ---------------------------------------------------------------------------------------------
# summary


def summary_table(results: store.Results, study: Study | None = None) -> str:
    """Per task and arm: mean best metric, n and the change vs baseline (the mean per-seed relative
    change), an arm's mean and n over the seeds it and the baseline both finished ok, as in the
    report's tables (a mean over its own seeds would credit an arm with leaving out the seed the
    baseline found hardest, or the other way round); the baseline's over its own ok seeds. With
    ``study``, its arms and tasks without a stored trial (a run cut short) are named too."""
    import pandas as pd

    from ablate.report import fmt_pct
    from ablate.stats import _matched, _per_seed, _same_trials, explode_arms, mean_relative_change

    trials = results.trials
    if trials.empty:
        return "(no trials)"
    arms = explode_arms(trials)
    planned: dict[str, list[str]] = {}  # task -> the study's arms, in their order
    for t in study.trials if study is not None else []:
        planned.setdefault(t.task, [])
        planned[t.task] += [a for a in t.arms if a not in planned[t.task]]
    lines, changes_shown = [], False
    tasks = {task: k for k, task in enumerate(planned)}  # (the study's order; others as stored, after them)
    for task, df in sorted(arms.groupby("task", sort=False), key=lambda item: tasks.get(item[0], len(tasks))):
        missing = [a for a in planned.get(task, []) if a not in set(df["arm"])]
        missing_line = f"  (no trial stored yet: {', '.join(missing)})" if missing else None
        known = df[df["status"] != "failed"]  # (failed rows of older runs carry no metric)
        if known.empty:
            failed_n = df["trial_id"].nunique() if "trial_id" in df else len(df)  # (a merged trial is one row per arm)
            lines += [f"\n{task}: every trial failed ({failed_n})", *([missing_line] if missing else [])]
            continue
        metric, mode = known["metric"].iloc[0], known["mode"].iloc[0]
        ok_rows = store.ok_mask(df)  # (as the report: status ok and a finite best metric)
        ok = df[ok_rows]
        means = ok.groupby("arm", sort=False)["best_metric"].agg(["mean", "count"])
        base_n = len(_per_seed(arms, task, "baseline"))
        sources = ", ".join(sorted(set(df.get("data_source", pd.Series(dtype=object)).dropna())))
        lines.append(f"\n{task} ({metric}, {'lower' if mode == 'min' else 'higher'} is better"
                     + (f"; data: {sources})" if sources else ")"))
        lines.append(f"  {'arm':<34} {'mean':>12} {'n':>3} {'vs baseline':>12} {'not ok':>7}")
        # the baseline, the ablations in the study's order (else as stored), AdamW last
        order = {"baseline": 0, "adamw": 2}
        place = {a: k for k, a in enumerate(planned.get(task, []))}
        for arm in sorted(pd.unique(df["arm"]), key=lambda a: (order.get(a, 1), place.get(a, len(place)))):
            if arm != "baseline" and _same_trials(arms, task, arm, "baseline"):
                lines.append(f"  {arm:<34} = baseline (same trials)")
                continue
            mean, n = (float(means.loc[arm, "mean"]), int(means.loc[arm, "count"])) if arm in means.index else (math.nan, 0)
            change, notes = math.nan, []
            if arm != "baseline" and base_n:
                ref, new, _, left_out = _matched(arms, task, "baseline", arm)
                if len(new):
                    mean, n = float(new.mean()), len(new)
                    change = mean_relative_change(ref.to_numpy(), new.to_numpy(), mode)["mean"]
                    if math.isnan(change):
                        notes.append("change n/a: the baseline's metric is 0 on a paired seed")
                    if len(ref) != base_n:
                        notes.append(f"baseline {ref.mean():.6g} on these {len(ref)} seeds")
                    if left_out:
                        notes.append(f"{left_out} seed(s) the baseline did not finish left out")
                elif n:
                    notes.append("no seed in common with the baseline: mean over its own seeds")
            elif arm != "baseline" and n and (df["arm"] == "baseline").any():
                notes.append("the baseline finished no seed ok: mean over its own seeds")
            bad = int((~ok_rows[df["arm"] == arm]).sum())
            change_s = "" if math.isnan(change) else fmt_pct(change)
            changes_shown = changes_shown or bool(change_s)
            lines.append((f"  {arm:<34} {mean:>12.6g} {n:>3} {change_s:>12} {bad or '':>7}"
                          + (f"  ({'; '.join(notes)})" if notes else "")).rstrip())
        if missing:
            lines.append(missing_line)
    lines += [f"\n{task}: no trial stored yet" for task in planned if task not in set(arms["task"])]
    if changes_shown:
        lines.append("\n(the change is the mean per-seed relative change, positive = the arm is better than the "
                     "baseline; an arm's mean and n: over the seeds it and the baseline both finished ok, as in the report)")
    return "\n".join(lines)


def check_out_folder(out_dir: Path) -> None:
    """Refuse an output folder that cannot be made because a file is in the way: ``out_dir`` itself
    or any folder above it (``--out`` naming a file), with the path at fault."""
    from ablate.config import ConfigError

    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out_dir else f" (the results go in {out_dir}, below it)"
                raise ConfigError(f"{path} is a file: a run needs a folder there{where}; give another --out")
            return


def make_out_folder(out_dir: Path) -> None:
    """Make the results folder (and those above it), or say which --out cannot hold it and why
    (``--out /proc/x``: "No such file or directory" named no folder and gave no way out)."""
    check_out_folder(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ConfigError(f"cannot make the results folder {out_dir}: {exc.strerror or exc}"
                          f"{f' ({exc.filename})' if exc.filename and str(exc.filename) != str(out_dir) else ''}; "
                          f"give an --out where you can write (a folder of yours, or one to be made there)") from exc


def _dry_run_plan(study: Study, out_dir: Path, rerun: Sequence[str] | None) -> str:
    """What ``ablate run`` would do with the results already in ``out_dir`` (read only): how many
    trials it would reuse and run, ``--rerun`` checked as the run checks it."""
    check_out_folder(out_dir)
    selected = rerun_selection(study, rerun) if rerun else set()
    done = store.finished_trial_ids(out_dir) if out_dir.is_dir() else set()
    # (what an earlier --rerun left, and what it computed again already: not again, as in _start_reruns)
    pending, redone = store.pending_reruns(out_dir) if out_dir.is_dir() else (set(), set())
    study_ids = {t.trial_id for t in study.trials}
    if pending & study_ids:
        selected -= redone
    reuse = study_ids & done - selected - pending
    line = (f"\nwith {out_dir}: {len(reuse)} trial(s) stored (reused), {len(study.trials) - len(reuse)} to run"
            + (f" ({len(selected & done)} of them again, selected by --rerun)" if rerun else "")
            # (real data only: an embedded trial has no data files, its data version is in its id)
            + ("; a run also runs again stored trials whose data files changed" if study.data == "real" else ""))
    return line if out_dir.is_dir() else f"\n{out_dir} does not exist yet: all {len(study.trials)} trial(s) to run"


def run_command(args) -> int:
    if getattr(args, "list", False) and not args.dry_run:
        raise ConfigError("--list lists the trials of a dry run: add --dry-run")
    study = load_study(args.spec, extra_seeds=args.extra_seeds)
    if args.dry_run:
        if getattr(args, "rerun", None):
            rerun_selection(study, args.rerun)  # (a misspelt name: refused before the listing, not after it)
        print(format_trials(study, every=getattr(args, "list", False)))
        print(_dry_run_plan(study, Path(args.out) / study.name, getattr(args, "rerun", None)))
        _note_idle_trials(study)
        _note_too_few_seeds(study)
        ray_storage_path(getattr(args, "storage", None))  # what the run would refuse before Ray starts, refused here too
        check_resources(study, args.address, None)
        if args.address is None:
            check_real_data(study)
        return 0
    outcome = run_study(study, args.out, resume=args.resume, address=args.address, storage=args.storage,
                        max_concurrent=args.max_concurrent, keep_checkpoints=args.keep_checkpoints,
                        rerun=getattr(args, "rerun", None), resume_hint=resume_command(args))
    print(summary_table(outcome.results, study))
    from ablate.stats import result_notes

    for note in [*result_notes(outcome.results), rerun_note(outcome.out_dir, outcome.results, resume_command(args))]:
        if note:
            print(f"\nnote: {note}", flush=True)
    trials = outcome.results.trials
    diverged = int((trials["status"] == "diverged").sum()) if "status" in trials else 0
    print(f"\n{outcome.ran} trial{'' if outcome.ran == 1 else 's'} run, {outcome.reused} reused, {outcome.failed} failed"
          + (f", {diverged} diverged (no result; in the table's 'not ok')" if diverged else "")
          + (f", {outcome.unfinished} interrupted" if outcome.unfinished else "")
          + f"; results in {outcome.out_dir} "
          f"(load them with ablate.results.load_results, or run `ablate report {shlex.quote(str(outcome.out_dir))}`)")
    if outcome.unfinished:
        print(f"continue the interrupted trials from their last checkpoint (finished trials are kept and reused) "
              f"with:\n  {resume_command(args)}", flush=True)
    return 130 if outcome.unfinished else 1 if outcome.failed else 0


def rerun_note(out_dir: Path, results: store.Results, resume_hint: str) -> str:
    """What the summary table shows of an ``--rerun`` cut off before it ended: the trials it has
    still to compute show their earlier results (``""`` when there are none)."""
    try:
        waiting = store.pending_reruns(out_dir)[0]
    except store.ResultsError as exc:
        return str(exc)
    stored = set(results.trials["trial_id"]) if "trial_id" in results.trials else set()
    waiting &= stored
    if not waiting:
        return ""
    return (f"{len(waiting)} trial(s) an `ablate run --rerun` selected have not run again yet: the table shows their "
            f"earlier results. Continue with: {resume_hint}")


def _trial_label(t: TrialSpec) -> str:
    """A trial as the messages about unfinished trials name it."""
    return f"{t.trial_id} ({t.task}, {' = '.join(t.arms)}, seed {t.seed})"


def _sigterm_message(pending: list[TrialSpec], recorder: Any, resume_hint: str | None, out_dir: Path) -> str:
    done = set() if recorder is None else recorder.written | recorder.failed_ids
    # a trial whose row is on disk is stored, also where the signal came before the recorder noted it
    # (its trial part is written last: a row on disk has its history and telemetry beside it)
    left = [_trial_label(t) for t in pending
            if t.trial_id not in done and not (out_dir / store.PARTS_DIR / f"{t.trial_id}.trials.parquet").exists()]
    hint = resume_hint or "the same command with --resume"
    if not left:
        return f"every trial is stored; the combined tables were not written: run {hint}"
    return f"{len(left)} trial(s) did not finish: {first_ten(left)}. The finished ones are stored; continue with: {hint}"


#: the runs into a ``--storage`` of a study's output folder, one JSON ``[storage, run name]`` a line:
#: their folders there are deleted once every trial is recorded (those of interrupted runs too,
#: whatever storage a later run is given)
STORAGE_RUNS = "storage_runs.jsonl"


def _storage_runs(out_dir: Path, study_name: str) -> list[tuple[str, str]]:
    """The runs of ``study_name`` that :data:`STORAGE_RUNS` records (a line cut short, or not a pair
    of a storage and a run name of the study, is skipped)."""
    try:
        text = (out_dir / STORAGE_RUNS).read_text(encoding="utf-8")
    except OSError:
        return []
    runs = []
    for line in text.splitlines():
        try:
            where, name = json.loads(line)
        except (ValueError, TypeError):
            continue
        if isinstance(where, str) and where and isinstance(name, str) and name.startswith(f"{study_name}-") \
                and "/" not in name:
            runs.append((where, name))
    return runs


def _clean_up(out_dir: Path, study: Study, storage: str | None, run_name: str | None) -> None:
    """Once every trial of ``study`` is recorded, delete Ray Tune's copies of the checkpoints
    (each holds a model, its optimizer and its best weights: on ``paper.yaml``, tens of GB;
    ``--resume`` reads the stable ones): the study's experiment directories under ``OUT/ray`` - this
    run's and those of earlier runs that were interrupted (the run holds the folder's lock: no
    other run of the study is using them) - and the directories in a ``--storage`` of every run of
    this folder (:data:`STORAGE_RUNS`; a URI's are left, and their paths printed). Stable
    checkpoints of trials that are not in the study as run now (extra seeds, a study file edited
    since they were cut off) are kept - a run of the study that has them continues them - and
    listed. ``OUT/ray`` and ``OUT/checkpoints`` are removed when that leaves them empty (a later
    run makes them again), never while they hold anything."""
    for run_dir in (out_dir / "ray").glob(f"{study.name}-*"):
        if run_dir.is_dir():
            shutil.rmtree(run_dir, ignore_errors=True)
    runs = _storage_runs(out_dir, study.name)
    if storage is not None and run_name is not None and (storage, run_name) not in runs:
        runs.append((storage, run_name))
    elsewhere, left = [], []
    for where, name in dict.fromkeys(runs):
        folder = local_storage(where)
        if folder is None:
            elsewhere.append(f"{where}/{name}")
        else:
            shutil.rmtree(folder / name, ignore_errors=True)
            if (folder / name).exists():  # (not deleted: permissions, say): kept for a later run
                left.append((where, name))
    if elsewhere:
        print(f"note: Ray's copies of the checkpoints stay in {', '.join(elsewhere)}: delete them there (`ablate run "
              f"--resume` reads the copies in {out_dir / CHECKPOINTS_DIR})", flush=True)
    if left:
        atomic_write_bytes(out_dir / STORAGE_RUNS, "".join(json.dumps(list(r)) + "\n" for r in left).encode())
    else:
        (out_dir / STORAGE_RUNS).unlink(missing_ok=True)
    ids = {t.trial_id for t in study.trials}
    checkpoints = list((out_dir / CHECKPOINTS_DIR).glob("*.pt"))
    # (no checkpoint to tell apart, as after most runs: the stored tables are not read again)
    stored = store.finished_trial_ids(out_dir) if checkpoints else set()
    # (a stored trial's, also one the study as run now does not have - an extra seed's kept by --keep-checkpoints -:
    # no run continues it, which the note on the others says)
    others = [p for p in checkpoints if p.stem not in ids and p.stem not in stored]
    done = [p for p in checkpoints if p.stem in stored]
    if done:  # (kept by an earlier run with --keep-checkpoints, or left by a run killed as it stored the trial)
        size = sum(p.stat().st_size for p in done) / 2**20
        print(f"note: {len(done)} checkpoint(s) of trials whose results are stored stay in {out_dir / CHECKPOINTS_DIR} "
              f"({size:.0f} MiB; kept by a run with --keep-checkpoints, or left by a run killed as it stored the "
              f"trial): delete them if you do not need the trials' weights", flush=True)
    failed = [p for p in checkpoints if p.stem in ids and p.stem not in stored]
    if failed:  # (every trial is recorded here: these failed, after their checkpoints were written)
        size = sum(p.stat().st_size for p in failed) / 2**20
        print(f"note: {len(failed)} failed trial(s) left their last epoch's checkpoint in {out_dir / CHECKPOINTS_DIR} "
              f"({size:.0f} MiB): the same command with --resume runs them again from there, which is right after a "
              f"passing failure (memory, a lost node); if the fix changes what their earlier epochs computed, delete "
              f"{'them' if len(failed) > 1 else 'it'} first ({', '.join(p.name for p in failed[:3])}"
              f"{', ...' if len(failed) > 3 else ''})", flush=True)
    aside = sorted((out_dir / CHECKPOINTS_DIR).glob("*.pt.unreadable-*"))
    if aside:  # (set aside by a trial that started afresh: kept for a look, never read again)
        size = sum(p.stat().st_size for p in aside) / 2**20
        print(f"note: {len(aside)} unreadable or unusable checkpoint(s) set aside stay in {out_dir / CHECKPOINTS_DIR} "
              f"({size:.0f} MiB; their trials started afresh, or from Ray's copy of an earlier epoch): delete them ({', '.join(p.name for p in aside[:3])}"
              f"{', ...' if len(aside) > 3 else ''})", flush=True)
    if others:
        size = sum(p.stat().st_size for p in others) / 2**20
        print(f"note: {len(others)} checkpoint(s) of trials that are not in the study as run now (extra seeds, or a "
              f"study file edited since they were cut off) stay in {out_dir / CHECKPOINTS_DIR} ({size:.0f} MiB): a "
              f"run of the study that has them continues them with --resume; delete them if none will", flush=True)
    for folder in (out_dir / "ray", out_dir / CHECKPOINTS_DIR):  # (empty folders left behind said nothing)
        _remove_if_empty(folder)


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` when it is an empty directory; leave it (and say nothing) when it holds
    anything, is a link, or cannot be removed (``os.rmdir`` refuses a folder that is not empty, so
    a file written meanwhile is never lost)."""
    if folder.is_symlink() or not folder.is_dir():
        return
    try:
        folder.rmdir()
    except OSError:  # (not empty, or not ours to remove: kept)
        pass


def resume_command(args) -> str:
    """The ``ablate run`` (or ``ablate tune``) command line that continues the one of ``args``:
    the same study file, output directory, storages, cluster and options."""
    words = ["ablate", args.command, args.spec]
    for flag, value in (("--out", getattr(args, "out", None)), ("--storage", getattr(args, "storage", None)),
                        ("--study-storage", getattr(args, "study_storage", None)),
                        ("--address", getattr(args, "address", None)),
                        ("--max-concurrent", getattr(args, "max_concurrent", None)),
                        ("--extra-seeds", getattr(args, "extra_seeds", None)),
                        ("--trials", getattr(args, "trials", None))):
        if value is not None:
            words += [flag, str(value)]
    if getattr(args, "keep_checkpoints", False):
        words.append("--keep-checkpoints")
    if args.command == "run":
        words.append("--resume")
    return shlex.join(words)
