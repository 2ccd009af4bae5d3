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
  environment (``py_modules``) and imported there before a trial is built.
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
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ablate import results as store
from ablate.config import ConfigError, did_you_mean, first_ten
from ablate.files import atomic_write_bytes
from ablate.study import Study, TrialSpec, format_trials, import_plugins, load_study

CHECKPOINT_FILE = "trial.pt"
RESULT_KEY = "ablate_result"
FAILED_KEY = "ablate_failed"  # a trial that failed deterministically, reported (not raised: no retry)


class _DropMessages(logging.Filter):
    """A logging filter that drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


#: Ray Tune's end-of-run warning that trials have no result.json / progress.csv: a sweep turns those
#: files off on purpose (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``; its results are in the Parquet
#: tables), so the warning, with a FileNotFoundError per trial, would only alarm
_NO_METRIC_FILES = _DropMessages("Failed to fetch metrics")
#: Ray Tune's "Experiment has been interrupted ... Resume experiment with: Tuner.restore(...)":
#: ``ablate`` continues an interrupted study with its own command (which it prints), and an
#: experiment restore cannot extend a sweep
_NO_RESTORE_HINT = _DropMessages("Experiment has been interrupted")
#: Ray's "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt
#: out", printed whenever it starts a local cluster (every ``ablate run``): the in-process cluster
#: is the study's own, and authentication stays on. Ray's warning that it is *disabled*, and every
#: authentication error, still reach the user
_NO_TOKEN_AUTH_NOTICE = _DropMessages("Token authentication is enabled for this Ray cluster")
#: Ray Tune's "Trial task failed for trial ...", a traceback of ~40 lines for every failed attempt:
#: ``ablate run`` prints one line per failed attempt (and whether it is retried) and stores the
#: traceback with the trial's row (``ablate report`` lists it)
_NO_TRIAL_TRACEBACK = _DropMessages("Trial task failed for trial")


def ray_storage_path(storage: str | None) -> str | None:
    """``--storage`` as Ray Tune needs it: a URI as given (without a trailing ``/``), a local path
    (``file://`` too) made absolute (Ray Tune reads a relative path as a URI without a scheme, and
    fails once the sweep has started): one spelling of each folder."""
    if storage is not None and storage.startswith("file://"):
        storage = storage.removeprefix("file://")
    if storage is None or "://" in storage:
        return storage if storage is None else storage.rstrip("/")
    from ablate.config import ConfigError

    path = Path(os.path.expanduser(storage)).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())  # (the root always exists)
    if not existing.is_dir():
        raise ConfigError(f"--storage {storage}: {existing} is a file; --storage takes a folder (or a URI such as "
                          f"s3://bucket/path) for Ray Tune's experiment state. Nothing was run.")
    return str(path)


def local_storage(storage: str) -> Path | None:
    """The folder of a ``--storage`` (as :func:`ray_storage_path` gives it) that is one on this
    machine; None for a URI (``s3://...``)."""
    return None if "://" in storage else Path(storage)


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
    from ablate.trial import StaleCheckpoint, Trial

    spec = config["trial"]
    trial_config = dict(spec["config"])
    if not trial_config.get("num_threads"):
        trial_config["num_threads"] = max(1, int(config["cpus"]))
    torch.set_num_threads(trial_config["num_threads"])
    from ablate.config import ConfigError
    from ablate.tasks import DatasetNotFoundError

    try:
        trial = Trial(trial_config)
    except (DatasetNotFoundError, ConfigError):  # deterministic (missing data on this node, a bad config):
        tune.report({"done_trial": True, FAILED_KEY: traceback.format_exc()})  # a retry would fail alike
        return
    stable = Path(config["checkpoint_dir"]) / f"{spec['trial_id']}.pt" if config.get("checkpoint_dir") else None
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            try:
                trial.load(Path(d) / CHECKPOINT_FILE)
            except StaleCheckpoint as exc:  # (the data changed under a retried trial) start afresh
                print(f"trial {trial.trial_id}: {exc}", flush=True)
    # The stable checkpoint: with --resume, or when an earlier attempt of this very run wrote it (a
    # retry after a lost node). It can be an epoch ahead of Ray's: Ray registers a reported
    # checkpoint only when a later save() call on the trial's actor returns, which a dying node
    # cuts off, so Ray may hand back the previous epoch's checkpoint, or none.
    if stable is not None and stable.exists() and (
            config.get("resume") or stable.stat().st_mtime >= config.get("started_at", math.inf)):
        state = _stable_checkpoint(trial, stable)
        if state is not None and state["epoch"] > trial.epoch:
            trial.load_state_dict(state)

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
        tune.report({"done_trial": True, FAILED_KEY: traceback.format_exc()})
        return
    payload = {"row": result.row, "history": result.history, "telemetry": result.telemetry}
    last = result.history[-1] if result.history else {"epoch": 0}
    tune.report({**_flat_metrics(last), "done_trial": True, RESULT_KEY: json.dumps(payload, default=_json_default)})


def _stable_checkpoint(trial: Any, stable: Path) -> dict[str, Any] | None:
    """The trial's stable checkpoint, or None - saying why - when it was made on other data, or is
    unreadable (damaged on disk, a copy cut short: it is moved aside to ``<id>.pt.unreadable-<time>``, or
    every ``--resume`` would fail alike). ``trial``: the :class:`ablate.trial.Trial` to resume."""
    import torch

    try:
        state = torch.load(stable, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "epoch" not in state:
            raise ValueError("not a trial checkpoint")
    except Exception as exc:
        if isinstance(exc, (PermissionError, MemoryError)) or (
                isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.ESTALE, errno.EAGAIN, errno.ETIMEDOUT)):
            raise  # (the file itself may be fine: the trial fails, and a retry or --resume reads it again)
        aside = stable.with_name(f"{stable.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.replace(stable, aside)
            where = f"moved to {aside.name}"
        except OSError as move:
            where = f"left in place (moving it aside failed: {move})"
        print(f"trial {trial.trial_id}: its checkpoint {stable} is unreadable ({type(exc).__name__}: {exc}); "
              f"{where}, starting afresh", flush=True)
        return None
    if not trial.can_resume_from(state):
        print(f"trial {trial.trial_id}: its checkpoint {stable} was made on other data files; starting afresh",
              flush=True)
        return None
    return state


def prepare_worker(config: dict[str, Any]) -> None:
    """In a Ray worker, before a trial is built: the driver's working directory, where this machine
    has it (Ray Tune runs each trial in a folder of its own, where relative paths in a task's keys
    would not mean what they mean to ``ablate train``), then the study's plugins."""
    if config.get("cwd") and os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])
    _import_worker_plugins(config["plugins"], config.get("plugin_dir"))


def _import_worker_plugins(plugins: list[str], plugin_dir: str | None) -> None:
    """Import the study's plugins in a worker: from the runtime environment Ray shipped them in
    (``py_modules``) or an installed package; from the study's directory only as a fallback, which
    works when Ray was started by someone else on a machine that sees that directory."""
    try:
        import_plugins(plugins)
    except Exception:
        if not plugin_dir:
            raise
        import_plugins(plugins, plugin_dir)


def _flat_metrics(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float, str, bool))}


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
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


def _failed_row(spec: TrialSpec, study: Study, error: str) -> dict[str, Any]:
    from ablate.tasks import TASKS

    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    metric = TASKS.get(spec.task).metric if spec.task in TASKS else None  # (the reports read its direction)
    known = {} if metric is None else {"metric": metric.name, "mode": metric.mode}
    return _trial_row(spec, study, {**spec.config, **known, "status": "failed", "error": error,
                                    "stop_reason": "failed", "best_metric": math.nan, "finished_at": now})


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
            if FAILED_KEY in result:  # a deterministic failure the worker reported without raising
                self._record_failure(trials, spec, result[FAILED_KEY], "; not retried")
                return
            if RESULT_KEY not in result:  # an epoch of a running trial
                if time.monotonic() - self.last_line >= PROGRESS_EVERY_S and "epoch" in result:
                    from ablate.tasks import TASKS

                    name = TASKS.get(spec.task).metric.name if spec.task in TASKS else None
                    value = result.get(f"val_{name}")
                    shown = f" {name}={value:.5g}" if isinstance(value, (int, float)) else ""
                    self._progress(trials, f"{spec.task} seed {spec.seed} {spec.arm}: epoch {result['epoch']}/"
                                           f"{spec.config.get('epochs', '?')}{shown}")
                return
            payload = json.loads(result[RESULT_KEY])
            # missing metrics as NaN; config values keep their None (a row must rebuild its config)
            row = {k: (math.nan if v is None and k not in spec.config else v) for k, v in payload["row"].items()}
            self._store(spec, _trial_row(spec, study, row), payload["history"], payload["telemetry"])
            self.written.add(spec.trial_id)
            self._rerun_done(spec.trial_id)
            if not keep_checkpoints:  # its results are stored: the checkpoint for --resume is no longer needed
                (out_dir / CHECKPOINTS_DIR / f"{spec.trial_id}.pt").unlink(missing_ok=True)
            self.eta.finished(spec.task, row.get("time_total_s"))
            self._progress(trials, f"{spec.task} seed {spec.seed} {spec.arm}: {row['status']} "
                                   f"{row['metric']}={row['best_metric']:.5g}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._record_failure(trials, by_id[trial.config["trial"]["trial_id"]], _trial_error(trial))

        def on_trial_recover(self, iteration, trials, trial, **info):
            spec = by_id[trial.config["trial"]["trial_id"]]
            attempt = self.attempts[spec.trial_id] = self.attempts.get(spec.trial_id, 0) + 1
            counted = trial.num_failures > self.counted.get(spec.trial_id, 0)  # (Ray counts no preemption)
            self.counted[spec.trial_id] = trial.num_failures
            retry = (f"retrying ({trial.num_failures} of {study.retries} retries)" if counted
                     else "retrying (not counted against the retries: its node was preempted)")
            self._progress(trials, f"{spec.task} seed {spec.seed} {spec.arm}: attempt {attempt} failed "
                                   f"({_last_line(_trial_error(trial))}); {retry}")

        def _record_failure(self, trials, spec: TrialSpec, error: str, note: str = "") -> None:
            self._store(spec, _failed_row(spec, study, error))
            self.failed_ids.add(spec.trial_id)
            self._rerun_done(spec.trial_id)
            self.eta.finished(spec.task, None)
            stored = "; the traceback is stored with the trial" if len(error.strip().splitlines()) > 1 else ""
            self._progress(trials, f"{spec.task} seed {spec.seed} {spec.arm}: FAILED ({_last_line(error)}{note}{stored})")

        def _rerun_done(self, trial_id: str) -> None:
            if reruns is not None:
                reruns.finished(out_dir, trial_id)

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


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text()
    err = trial.get_pickled_error() if hasattr(trial, "get_pickled_error") else None
    return "".join(traceback.format_exception(err)) if err else "the trial failed without an error message"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _plugin_modules(study: Study) -> list[str]:
    """Files or package directories of the study's plugins that sit next to the study file."""
    if study.path is None:
        return []
    base = study.path.parent
    found = []
    for name in study.plugins:
        top = name.split(".")[0]
        for candidate in (base / f"{top}.py", base / top):
            if candidate.exists():
                found.append(str(candidate.resolve()))
                break
    return found


def _worker_spec(spec: TrialSpec) -> dict[str, Any]:
    """A trial spec for the workers: a relative data_dir (relative to the driver's working
    directory) made absolute, since Ray Tune runs each trial in its own working directory.
    data_dir is not part of a trial's identity, so its id stays the same."""
    out = dataclasses.asdict(spec)
    if out["config"].get("data_dir"):
        out["config"]["data_dir"] = os.path.abspath(os.path.expanduser(out["config"]["data_dir"]))
    return out


def longest_first(trials: list[TrialSpec]) -> list[TrialSpec]:
    """The trials in the order they are handed to Ray: the probably longest first (more epochs,
    MetaAdamW before AdamW), otherwise as the study lists them. Concurrent slots then finish
    together instead of one slot running a long trial alone at the end (longest-processing-time
    scheduling; on the sweep benchmark's 8 short trials two slots otherwise ended 1.6 s apart)."""
    def cost(t: TrialSpec) -> tuple[int, int]:
        return -int(t.config.get("epochs") or 0), 0 if t.config.get("optimizer") == "metaadamw" else 1

    return sorted(trials, key=cost)


def no_result_files() -> None:
    """Ray Tune's own per-result CSV/JSON/TensorBoard files off (unless the user's environment sets
    ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``): ablate stores the results itself, the files would only
    cost the driver CPU time that the trials need on a small machine, and TensorBoard's writer
    prints "NaN or Inf found in input tensor." for a diverged trial's value."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1":
        logging.getLogger("ray.tune.analysis.experiment_analysis").addFilter(_NO_METRIC_FILES)


def init_ray(study: Study, address: str | None = None, num_cpus: int | None = None) -> bool:
    """Start Ray in-process (or join ``address``) with the study's plugins in the runtime
    environment. Returns True when this call started or joined Ray (and should shut it down)."""
    import ray

    logging.getLogger("ray.tune.tune").addFilter(_NO_RESTORE_HINT)
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_NO_TOKEN_AUTH_NOTICE)
    if ray.is_initialized():
        return False
    runtime_env: dict[str, Any] = {}
    modules = _plugin_modules(study)
    if modules:
        runtime_env["py_modules"] = modules
    data_dir = os.environ.get("ABLATE_DATA_DIR")
    if data_dir:
        runtime_env["env_vars"] = {"ABLATE_DATA_DIR": os.path.abspath(os.path.expanduser(data_dir))}
    kwargs: dict[str, Any] = {"runtime_env": runtime_env or None, "include_dashboard": False,
                              "log_to_driver": False, "configure_logging": True, "logging_level": "warning"}
    if address:
        try:
            ray.init(address=address, **kwargs)
        except RuntimeError as exc:
            if not str(exc).startswith("Version mismatch"):
                raise
            from ablate.config import ConfigError

            raise ConfigError(f"--address {address}: the cluster runs other versions of Ray or Python than this "
                              f"driver, and every node and the driver need the same: {exc}".rstrip()) from None
        except ConnectionError as exc:
            if not _authentication_failed(exc):
                raise
            from ablate.config import ConfigError

            raise ConfigError(
                f"--address {address}: the Ray cluster refused this machine's authentication. `ray start` turns on "
                f"token authentication (Ray {ray.__version__}: when the head is not on localhost): run ablate with "
                f"RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or ~/.ray/auth_token copied from the "
                f"head), or, on a trusted network, set RAY_AUTH_MODE=disabled for both `ray start` and ablate") from None
        _warn_if_no_node_fits(study, address)
    else:
        # address="local": always a new in-process cluster, never a `ray start` cluster found on the machine
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), object_store_memory=256 * 1024**2, **kwargs)
    return True


def _warn_if_no_node_fits(study: Study, address: str) -> None:
    """Say so when no node of the joined cluster has the CPUs or GPUs one trial asks for: Ray would
    wait for such a node without end (an autoscaling cluster may add one, so this is no error)."""
    import ray

    if not _trial_nodes(study):  # (per node: a node with the CPUs and another with the GPU hold no such trial)
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        has = "; ".join(sorted({f"{float(n.get('CPU', 0)):g} CPUs, {float(n.get('GPU', 0)):g} GPUs" for n in nodes})) or "none"
        asks = " and ".join(f"{v:g} {k}s" for k, v in (("CPU", study.resources.get("cpus", 1)),
                                                        ("GPU", study.resources.get("gpus", 0))) if v)
        print(f"ablate: warning: each trial asks for {asks} on one node, which no node of the cluster at {address} "
              f"has (its nodes: {has}): no trial starts until such a node joins (an autoscaler may add one). Ctrl-C, "
              f"then lower resources: in the study file, if none will.", file=sys.stderr, flush=True)


#: how long the check of a cluster's nodes waits for each node's answer
NODE_CHECK_S = 60.0


def _node_view(markers: dict[str, str], study: Study | None, plugins: list[str], plugin_dir: str | None) -> dict:
    """On one node of a cluster: which of the driver's ``markers`` (what -> a file it wrote there)
    this node does not see, why the study's plugins do not import here and why its real data
    (``study``: its real-data trials, or None) is missing here (None: nothing is wrong)."""
    view: dict[str, Any] = {"missing": [k for k, m in markers.items() if not os.path.exists(m)], "plugins": None,
                            "data": None}
    try:
        _import_worker_plugins(plugins, plugin_dir)
    except Exception as exc:  # noqa: BLE001 - reported by the driver, with the node's name
        view["plugins"] = f"{type(exc).__name__}: {exc}"
        return view
    if study is not None:
        try:
            check_real_data(study)
        except Exception as exc:  # noqa: BLE001
            view["data"] = str(exc).removesuffix(" Nothing was run.")
    return view


def _trial_nodes(study: Study) -> dict[str, str]:
    """The nodes alive now that can hold one of the study's trials (its CPUs and GPUs), by id, as
    messages name them: ``host (ip, node 1a2b3c4d)``."""
    import ray

    want = {"CPU": study.resources.get("cpus", 1), "GPU": study.resources.get("gpus", 0)}
    return {n["NodeID"]: f"{n.get('NodeManagerHostname') or '?'} ({n.get('NodeManagerAddress')}, node {n['NodeID'][:8]})"
            for n in ray.nodes() if n.get("Alive")
            and all(float(n.get("Resources", {}).get(k, 0)) >= v for k, v in want.items())}


def check_cluster_nodes(study: Study, folders: dict[str, Path]) -> None:
    """On a cluster (``--address``), before any trial: ask every node alive now that can hold a
    trial whether it sees the ``folders`` (what -> a folder of this machine that each trial writes
    to from its node: Ray Tune's storage, the trials' checkpoints), imports the study's plugins and
    has its real data, as its trials would. Ray Tune's storage, the plugins or the data missing on a
    node - its trials would all fail there - is an error naming the nodes; the checkpoints' folder a
    warning (``--resume`` cannot continue the trials those nodes cut off, and their checkpoints
    stay on their disks). A node that dies, or does not answer within :data:`NODE_CHECK_S`, is named,
    not checked."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ablate.tasks import DatasetNotFoundError

    real = [dataclasses.replace(t, config=_worker_spec(t)["config"]) for t in study.trials
            if t.config.get("data") == "real"]
    if not (folders or real or study.plugins):
        return
    nodes = _trial_nodes(study)
    markers: dict[str, str] = {}
    answers: dict[str, dict] = {}
    unchecked: list[str] = []
    try:
        for what, folder in folders.items():
            folder.mkdir(parents=True, exist_ok=True)
            marker = folder / f".ablate-node-check-{uuid.uuid4().hex}"
            marker.touch()
            markers[what] = str(marker.resolve())
        view = ray.remote(num_cpus=0)(_node_view)
        plugin_dir = str(study.path.parent.resolve()) if study.path else None
        pending = {view.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            markers, dataclasses.replace(study, trials=real) if real else None, list(study.plugins), plugin_dir): node
            for node in nodes}
        end = time.monotonic() + NODE_CHECK_S
        while pending and time.monotonic() < end:  # in slices: a node that dies is dropped, not waited for
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=2.0)
            for ref in done:
                node = pending.pop(ref)
                try:
                    answers[node] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - (the node died as it ran): its trials will tell
                    unchecked.append(f"{nodes[node]} ({type(exc).__name__})")
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            for ref in [r for r, node in pending.items() if node not in alive]:
                unchecked.append(f"{nodes[pending.pop(ref)]} (died)")
        unchecked += [f"{nodes[node]} (no answer within {NODE_CHECK_S:g} s)" for node in pending.values()]
        for ref in pending:
            ray.cancel(ref, force=True)
    finally:
        for marker in markers.values():
            Path(marker).unlink(missing_ok=True)
    if unchecked:
        print(f"ablate: warning: node(s) {', '.join(unchecked)} not checked for what their trials need",
              file=sys.stderr, flush=True)
    where = {what: [nodes[n] for n, a in answers.items() if what in a["missing"]] for what in folders}
    no_plugins = {nodes[n]: a["plugins"] for n, a in answers.items() if a["plugins"]}
    if no_plugins:
        raise ConfigError(
            "the study's plugins do not import on node(s) of the cluster, where its trials would fail: "
            + "; ".join(f"{node}: {why}" for node, why in no_plugins.items())
            + ". Ray ships the plugin modules next to the study file to every node; install what they import there "
              "too. Nothing was run.")
    no_data = {nodes[n]: a["data"] for n, a in answers.items() if a["data"]}
    if no_data:
        raise DatasetNotFoundError(
            "node(s) of the cluster cannot run the study's real-data trials, which would fail there: "
            + "; ".join(f"{node}: {why}" for node, why in no_data.items())
            + ". Every node needs the data at the same absolute path (or $ABLATE_DATA_DIR on the driver naming one "
              "that every node has). Nothing was run.")
    if "storage" in where and where["storage"]:
        raise ConfigError(
            f"Ray Tune's storage {folders['storage']} is not on node(s) {', '.join(where['storage'])}: each trial writes "
            f"its checkpoints there from the node that runs it, and would fail. Give --storage a folder every node "
            f"shares (NFS, say) or a URI (s3://..., gs://...). Nothing was run.")
    if "checkpoints" in where and where["checkpoints"]:
        print(f"ablate: warning: {folders['checkpoints']} is not on node(s) {', '.join(where['checkpoints'])}: trials "
              f"there write their checkpoints to that path on their own disk, so `--resume` cannot continue a trial "
              f"that a stop cut off there (it starts again), and the checkpoints stay on those disks. Run from an --out "
              f"folder every node shares to have them.", file=sys.stderr, flush=True)


def check_real_data(study: Study) -> None:
    """Refuse, before Ray starts or anything is written, a study whose real-data trials have no data
    here: the loaders' own rule (``data_dir``, else ``$ABLATE_DATA_DIR``,
    :func:`ablate.tasks.resolve_data_dir`) must name an existing directory (built-in tasks), and the
    files a task's ``locate`` names must exist (every task that has one: all built-in ones). The files
    are not parsed here; the trial reads, and checks, them."""
    from ablate.tasks import DATA_DIR_ENV, DatasetNotFoundError, get_task, resolve_data_dir

    checked: set[Path] = set()
    located: set[tuple[str, str]] = set()
    for spec in study.trials:
        cfg = spec.config
        if cfg.get("data") != "real":
            continue
        task = get_task(spec.task)
        absolute_file = any(k.endswith("_file") and isinstance(v, str) and os.path.isabs(os.path.expanduser(v))
                            for k, v in cfg.items())
        if task.factory.__module__.startswith("ablate.tasks.") and not absolute_file:
            root = resolve_data_dir(cfg)  # DatasetNotFoundError when neither data_dir nor $ABLATE_DATA_DIR is set
            if root not in checked and not root.is_dir():
                given = "data_dir" if cfg.get("data_dir") else f"${DATA_DIR_ENV}"
                raise DatasetNotFoundError(
                    f"{study.name}: task {spec.task!r} has data: real, but its data directory {root} (from {given}) "
                    f"does not exist; fix data_dir, or fetch the dataset with `ablate data download {spec.task} "
                    f"--data-dir {root}`. Nothing was run."
                )
            checked.add(root)
        key = (spec.task, json.dumps([cfg.get("data_dir"), *[v for k, v in sorted(cfg.items()) if k.endswith("_file")]],
                                     default=str))
        if task.locate is not None and key not in located:
            try:
                task.locate(dict(cfg))
            except DatasetNotFoundError as exc:
                raise DatasetNotFoundError(f"{study.name}: task {spec.task!r} has data: real, but "
                                           f"{str(exc).rstrip().rstrip('.')}. Nothing was run.") from exc
            located.add(key)


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
    stale: dict[str, list] = {}
    for spec in study.trials:
        if spec.trial_id not in recorded or spec.config.get("data") != "real":
            continue
        key = json.dumps(sorted(spec.config.items()), default=str)  # (a task's locate may read any key)
        if key not in now:
            try:
                now[key] = data_fingerprint(get_task(spec.task), spec.config)
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


def check_resources(study: Study, address: str | None = None, num_cpus: int | None = None) -> None:
    """Refuse, before Ray starts, resources that can never be met: a trial asking for more CPUs or
    GPUs than this machine has (when Ray runs here; Ray would wait for them forever), and trials on
    ``device: cuda`` without a GPU (Ray hides the GPUs from a trial that asked for none)."""
    from ablate.config import ConfigError

    cpus, gpus = study.resources.get("cpus", 1), study.resources.get("gpus", 0)
    cuda = sorted({t.task for t in study.trials if t.config.get("device") == "cuda"})
    if cuda and not gpus:
        raise ConfigError(f"{study.name}: trials of {cuda} run on device: cuda, but resources.gpus is 0 (Ray hides the "
                          f"GPUs from a trial that asks for none): set resources: {{gpus: 1}} (or a fraction)")
    if address is not None:
        check_reachable(address)
        return
    have_cpus = num_cpus or os.cpu_count() or 1
    if cpus > have_cpus:
        raise ConfigError(f"{study.name}: each trial asks for resources.cpus={cpus:g}, but Ray runs here with {have_cpus} "
                          f"CPU(s), so no trial could ever start: lower resources.cpus, or run on a cluster with --address")
    if gpus:
        import torch

        have_gpus = torch.cuda.device_count()
        if gpus > have_gpus:
            raise ConfigError(f"{study.name}: each trial asks for resources.gpus={gpus:g}, but this machine has "
                              f"{have_gpus} GPU(s), so no trial could ever start: set resources.gpus: 0 (and device: "
                              f"cpu), or run on a cluster with GPUs (--address)")


def _authentication_failed(exc: BaseException) -> bool:
    """Whether ``ray.init``'s error comes from the cluster's token authentication."""
    seen = 0
    while exc is not None and seen < 10:
        if "AuthenticationError" in type(exc).__name__ or "InvalidAuthToken" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse, before Ray starts, a cluster address ``HOST:PORT`` that nothing answers on within
    ``timeout_s`` (``ray.init`` would retry for minutes); ``auto`` is left to Ray. A ``ray://``
    (Ray Client) address is refused: through it the driver's work - ablate's results, the folder
    checks - would run on the head, writing there."""
    import socket

    from ablate.config import ConfigError

    if address.startswith("ray://"):
        raise ConfigError(f"--address {address}: Ray Client (ray://) is not supported - ablate stores the results from "
                          f"its driver, which through a client would run on the head. Run ablate on a node of the cluster "
                          f"(the head, say) with --address HEAD_IP:6379 (the head's GCS port), or --address auto there")
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"--address {address!r}: expected HOST:PORT of the Ray head (e.g. 10.0.0.1:6379), or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"--address {address}: nothing answers there ({type(exc).__name__}: {exc}). Is the head started "
            f"(`ray start --head --port {port}` on {host}), and is the port open from this machine?") from None


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
    run, printed when SIGTERM ends it (:func:`exit_on_sigterm`)."""
    storage = ray_storage_path(storage)
    check_resources(study, address, num_cpus)
    if address is None:  # trials run on this machine: a missing data directory is an error now, not in a worker
        check_real_data(study)
    out_dir = Path(out_root) / study.name
    check_out_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
            f.seek(0)
            holder = f.read().strip() or "another process"
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


def _run_study(study: Study, out_dir: Path, *, resume: bool, rerun: Sequence[str] | None, address: str | None,
               storage: str | None, max_concurrent: int | None, num_cpus: int | None,
               keep_checkpoints: bool, resume_hint: str | None = None) -> SweepOutcome:
    from ray import tune

    for folder in (out_dir / store.PARTS_DIR, out_dir / store.CACHE_DIR, out_dir / CHECKPOINTS_DIR, out_dir):  # cut off
        for stale in folder.glob(".*.tmp"):  # (the folder's lock: no other run of the study is writing)
            stale.unlink(missing_ok=True)
    copy = out_dir / "study.yaml"
    if study.path is not None and not (copy.exists() and os.path.samefile(study.path, copy)):
        shutil.copyfile(study.path, copy)
    store.write_manifest(out_dir, study.name, {t.trial_id: _labels(t, study) for t in study.trials})
    stored = store.finished_trials(out_dir)
    finished = set(stored["trial_id"]) if len(stored) else set()
    finished -= set_aside_stale_data(study, out_dir, stored)
    reruns = _start_reruns(study, out_dir, rerun, finished)
    finished -= reruns.ids
    pending = longest_first([t for t in study.trials if t.trial_id not in finished])
    reused = len(study.trials) - len(pending)
    print(f"study {study.name}: {len(study.trials)} trials, {reused} already done (reused), {len(pending)} to run "
          f"-> {out_dir}", flush=True)
    _note_idle_trials(study)
    if not pending:
        if not keep_checkpoints:
            _clean_up(out_dir, study, storage, None)
        return SweepOutcome(out_dir, 0, reused, 0, store.consolidate(out_dir))

    # one checkpoint per epoch makes Ray warn about frequent experiment snapshots; that is intended
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    no_result_files()
    started = init_ray(study, address, num_cpus)
    controller_log = logging.getLogger("ray.tune.execution.tune_controller")
    controller_log.addFilter(_NO_TRIAL_TRACEBACK)  # during this sweep only (the Recorder says what failed)
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
                "trial": tune.grid_search([_worker_spec(t) for t in pending]),
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
            if started:
                import ray

                ray.shutdown()
                rearm()
        left = [t for t in pending if t.trial_id not in recorder.written | recorder.failed_ids]
        unfinished = len(left)
        if not unfinished and not keep_checkpoints:  # Ray's copies: --resume reads the stable ones
            _clean_up(out_dir, study, storage, run_name)
        names = [_trial_label(t) for t in left]
        if unfinished:  # Ray Tune catches Ctrl-C itself and returns from fit() as if done
            print(f"\ninterrupted: {unfinished} trial(s) did not finish: {first_ten(names)}", flush=True)
        has_parts = any((out_dir / store.PARTS_DIR).glob("*.trials.parquet"))
        if has_parts:
            results = store.consolidate(out_dir)
        else:  # interrupted before any trial finished
            import pandas as pd

            results = store.Results(*(pd.DataFrame() for _ in store.TABLES))
        return SweepOutcome(out_dir, recorder.done + recorder.failed, reused, recorder.failed, results, unfinished, names)


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
            lines += [f"\n{task}: every trial failed ({len(df)})", *([missing_line] if missing else [])]
            continue
        metric, mode = known["metric"].iloc[0], known["mode"].iloc[0]
        ok = df[df["status"] == "ok"]
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
            bad = int((df[df["arm"] == arm]["status"] != "ok").sum())
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


def _dry_run_plan(study: Study, out_dir: Path, rerun: Sequence[str] | None) -> str:
    """What ``ablate run`` would do with the results already in ``out_dir`` (read only): how many
    trials it would reuse and run, ``--rerun`` checked as the run checks it."""
    check_out_folder(out_dir)
    selected = rerun_selection(study, rerun) if rerun else set()
    done = store.finished_trial_ids(out_dir) if out_dir.is_dir() else set()
    pending = store.pending_reruns(out_dir)[0] if out_dir.is_dir() else set()  # (what an earlier --rerun left)
    reuse = {t.trial_id for t in study.trials} & done - selected - pending
    line = (f"\nwith {out_dir}: {len(reuse)} trial(s) stored (reused), {len(study.trials) - len(reuse)} to run"
            + (f" ({len(selected & done)} of them again, selected by --rerun)" if rerun else "")
            + "; a run also runs again stored trials whose data files changed")
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
        check_resources(study, args.address, None)  # what the run would refuse before Ray starts, refused here too
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
          f"(load them with ablate.results.load_results, or run `ablate report {outcome.out_dir}`)")
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


#: how long a SIGTERM'd run waits for ``ray.shutdown()`` (Slurm's grace period is 30 s)
SIGTERM_SHUTDOWN_S = 10.0
#: how long it waits for its bookkeeping and message (:func:`exit_on_sigterm`)
SIGTERM_BOOKKEEPING_S = 5.0


def _within(call: Callable[[], Any], seconds: float) -> tuple[bool, Any]:
    """``(True, call())``, run in a thread given ``seconds``; else ``(False, why)``. A signal handler
    runs on the main thread, which the signal may have interrupted holding a lock that ``call``
    needs (an Optuna storage's, say): called there, it could wait for ever."""
    out: list[Any] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as exc:  # noqa: BLE001 - said by the caller
            failed.append(exc)

    worker = threading.Thread(target=run, name=f"within-{getattr(call, '__name__', 'call')}", daemon=True)
    worker.start()
    worker.join(seconds)
    if out:
        return True, out[0]
    return False, f"{type(failed[0]).__name__}: {failed[0]}" if failed else f"it took more than {seconds:g} s"


def _shutdown_ray_within(seconds: float) -> None:
    """``ray.shutdown()``, given at most ``seconds``: without it, the Ray processes this driver
    started that ignore SIGTERM (its dashboard and runtime-env agents) outlive it when the signal
    reached the driver alone (``kill PID``). In a thread: the signal may have interrupted the main
    thread holding a lock the shutdown needs, and the run must end anyway (:func:`_within`)."""
    ray = sys.modules.get("ray")  # (not imported: nothing to shut down, and an import takes seconds)
    if ray is not None and ray.is_initialized():
        _within(ray.shutdown, seconds)


@contextlib.contextmanager
def ray_tune_quiet() -> Iterator[None]:
    """Ray Tune's console output off while ``Tuner.fit`` runs: ``verbose=0`` still prints its
    experiment box and "View detailed results here: OUT/<name>/ray/...", a folder emptied once
    every trial is stored (ablate prints its own progress and says where the results are). The
    variable is restored afterwards (a caller's own Ray Tune runs in this process keep theirs)."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the legacy reporter, silent at verbose=0
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


@contextlib.contextmanager
def exit_on_sigterm(describe: Callable[[], str], on_exit: Callable[[], None] | None = None,
                    fallback: str = "the same command") -> Iterator[Callable[[], None]]:
    """SIGTERM (Slurm's scancel or time limit, ``timeout``, ``docker stop``) ends the run at once with
    exit code 143 and one message, ``describe()``: what did not finish and how to continue (after
    ``on_exit()``, quick bookkeeping such as marking unfinished suggestions failed). Results are
    stored as trials finish, so nothing finished is lost. Not the graceful stop of Ctrl-C: a
    scheduler signals the whole process group, Ray's trial processes die with the driver, and Ray
    Tune would wait a minute for them (past Slurm's 30 s grace), while Ray's own handler would end
    the driver without a word. Ray itself is shut down, within :data:`SIGTERM_SHUTDOWN_S`, so
    that its agents do not outlive the run. Installed after ``ray.init``, which sets that handler; yields a
    function that installs it again, for after ``ray.shutdown()``, which resets the signal's
    handling in the kernel while Python still reports this handler. The message and the bookkeeping
    are each given :data:`SIGTERM_BOOKKEEPING_S` (see :func:`_within`); where the message cannot be
    made, it says so and names ``fallback``, the command that goes on."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (a second one, while this one's threads run)
        try:
            made, text = _within(describe, SIGTERM_BOOKKEEPING_S)
            if not made:
                text = f"what finished is stored (this message could not say more: {text}); continue with: {fallback}"
            if on_exit is not None:
                done, why = _within(on_exit, SIGTERM_BOOKKEEPING_S)
                if not done:
                    text += f" (its bookkeeping did not finish - {why} - a later run of the command does it)"
            try:
                print(f"\nterminated (SIGTERM): {text}", flush=True)
            except Exception:  # noqa: BLE001 - (a pipe the scheduler's signal closed first): Ray still shut down
                pass
            _shutdown_ray_within(SIGTERM_SHUTDOWN_S)
        finally:
            os._exit(143)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield lambda: signal.signal(signal.SIGTERM, on_sigterm)
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    listed."""
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
    others = [p for p in (out_dir / CHECKPOINTS_DIR).glob("*.pt") if p.stem not in ids]
    stored = store.finished_trial_ids(out_dir)
    done = [p for p in (out_dir / CHECKPOINTS_DIR).glob("*.pt") if p.stem in ids and p.stem in stored]
    if done:  # (kept by an earlier run with --keep-checkpoints, or left by a run killed as it stored the trial)
        size = sum(p.stat().st_size for p in done) / 2**20
        print(f"note: {len(done)} checkpoint(s) of trials whose results are stored stay in {out_dir / CHECKPOINTS_DIR} "
              f"({size:.0f} MiB; kept by a run with --keep-checkpoints, or left by a run killed as it stored the "
              f"trial): delete them if you do not need the trials' weights", flush=True)
    if others:
        size = sum(p.stat().st_size for p in others) / 2**20
        print(f"note: {len(others)} checkpoint(s) of trials that are not in the study as run now (extra seeds, or a "
              f"study file edited since they were cut off) stay in {out_dir / CHECKPOINTS_DIR} ({size:.0f} MiB): a "
              f"run of the study that has them continues them with --resume; delete them if none will", flush=True)


def resume_command(args) -> str:
    """The ``ablate run`` (or ``ablate tune``) command line that continues the one of ``args``:
    the same study file, output directory, storages, cluster and options."""
    import shlex

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
