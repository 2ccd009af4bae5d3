"""Where a study's trials run: Ray started here or a cluster joined, and checked before any trial.

* :func:`init_ray` starts Ray in-process (or joins ``--address``) with the study's plugins in the
  runtime environment; :func:`ray_storage_path` gives ``--storage`` its one spelling.
* Checks that refuse, before anything runs, what would fail every trial later: resources no node
  has (:func:`check_resources`), an address nothing answers on or no Ray head listens on (:func:`check_reachable`), real
  data missing (:func:`check_real_data`), and, on a cluster, what each node must see - Ray Tune's
  storage, the checkpoints' folder, the plugins, the data (:func:`check_cluster_nodes`).
* Ray's console output that would mislead a user of ``ablate`` is filtered
  (:func:`no_result_files`, :func:`ray_tune_quiet`), and SIGTERM - a scheduler's stop - ends a run
  at once with one message and Ray shut down (:func:`exit_on_sigterm`).

Used by ``ablate run`` (:mod:`ablate.sweep`) and ``ablate tune`` (:mod:`ablate.tune`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ablate.config import ConfigError
from ablate.study import Study, TrialSpec, import_plugins


class DropMessages(logging.Filter):
    """A logging filter that drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


#: Ray Tune's end-of-run warning that trials have no result.json / progress.csv: a sweep turns those
#: files off on purpose (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``; its results are in the Parquet
#: tables), so the warning, with a FileNotFoundError per trial, would only alarm
_NO_METRIC_FILES = DropMessages("Failed to fetch metrics")
#: Ray Tune's "Experiment has been interrupted ... Resume experiment with: Tuner.restore(...)":
#: ``ablate`` continues an interrupted study with its own command (which it prints), and an
#: experiment restore cannot extend a sweep
_NO_RESTORE_HINT = DropMessages("Experiment has been interrupted")
#: Ray's "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt
#: out", printed whenever it starts a local cluster (every ``ablate run``): the in-process cluster
#: is the study's own, and authentication stays on. Ray's warning that it is *disabled*, and every
#: authentication error, still reach the user
_NO_TOKEN_AUTH_NOTICE = DropMessages("Token authentication is enabled for this Ray cluster")


def ray_storage_path(storage: str | None) -> str | None:
    """``--storage`` as Ray Tune needs it: a URI as given (without a trailing ``/``), a local path
    (``file://`` too) made absolute (Ray Tune reads a relative path as a URI without a scheme, and
    fails once the sweep has started): one spelling of each folder."""
    if storage is not None and storage.startswith("file://"):
        storage = storage.removeprefix("file://")
    if storage is None or "://" in storage:
        return storage if storage is None else storage.rstrip("/")
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


def import_worker_plugins(plugins: list[str], plugin_dir: str | None) -> None:
    """Import the study's plugins in a worker: from the runtime environment Ray shipped them in
    (``py_modules``) or an installed package; from the study's directory only as a fallback, which
    works when Ray was started by someone else on a machine that sees that directory."""
    try:
        import_plugins(plugins)
    except Exception:
        if not plugin_dir:
            raise
        import_plugins(plugins, plugin_dir)


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


def worker_spec(spec: TrialSpec) -> dict[str, Any]:
    """A trial spec for the workers: a relative data_dir (relative to the driver's working
    directory) made absolute, since Ray Tune runs each trial in its own working directory.
    data_dir is not part of a trial's identity, so its id stays the same."""
    out = dataclasses.asdict(spec)
    if out["config"].get("data_dir"):
        out["config"]["data_dir"] = os.path.abspath(os.path.expanduser(out["config"]["data_dir"]))
    return out


def no_result_files() -> None:
    """Ray Tune's own per-result CSV/JSON/TensorBoard files off (unless the user's environment sets
    ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``): ablate stores the results itself, the files would only
    cost the driver CPU time that the trials need on a small machine, and TensorBoard's writer
    prints "NaN or Inf found in input tensor." for a diverged trial's value."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1":
        logging.getLogger("ray.tune.analysis.experiment_analysis").addFilter(_NO_METRIC_FILES)


def available_cpus() -> int:
    """The CPUs a trial of this machine can run on, which Ray started here gets: those this process
    may use (its CPU affinity: ``taskset``, a Slurm job's CPUs), at most a container's CPU limit
    (cgroups: ``docker --cpus``, Kubernetes), which Ray's own count reads. Not ``os.cpu_count()``,
    the host's: in a container or a Slurm job it ran one trial per host CPU on the few given."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        from ray._private.utils import get_num_cpus

        count = min(count, get_num_cpus(override_docker_cpu_warning=True, truncate=True))
    except Exception:  # noqa: BLE001 - (a Ray without it: the affinity alone)
        pass
    return max(1, int(count))


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
    try:
        if address:
            try:
                ray.init(address=address, **kwargs)
            except RuntimeError as exc:
                if not str(exc).startswith("Version mismatch"):
                    raise
                raise ConfigError(f"--address {address}: the cluster runs other versions of Ray or Python than this "
                                  f"driver, and every node and the driver need the same: {exc}".rstrip()) from None
            except ConnectionError as exc:
                if not _authentication_failed(exc):  # (a gRPC server that is not a GCS; auto finding no Ray)
                    cause = exc.__cause__ or exc.__context__
                    why = str(cause).strip().splitlines()[-1] if cause is not None and str(cause).strip() else ""
                    raise ConfigError(
                        f"--address {address}: Ray could not join a cluster there ({exc}{f': {why}' if why else ''}). "
                        f"Give the address `ray start --head` printed (HEAD_IP:6379, the GCS's port), with the head "
                        f"running. Nothing was run.") from None
                raise ConfigError(
                    f"--address {address}: the Ray cluster refused this machine's authentication. `ray start` turns on "
                    f"token authentication (Ray {ray.__version__}: when the head is not on localhost): run ablate with "
                    f"RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or ~/.ray/auth_token copied from the "
                    f"head), or, on a trusted network, set RAY_AUTH_MODE=disabled for both `ray start` and ablate") from None
            _warn_if_no_node_fits(study, address)
        else:
            # address="local": always a new in-process cluster, never a `ray start` cluster found on the machine
            _note_ray_address_unused()
            ray.init(address="local", num_cpus=num_cpus or available_cpus(), object_store_memory=256 * 1024**2, **kwargs)
    except KeyboardInterrupt:  # Ctrl-C while Ray starts: its agents, half started, would outlive the run
        ray.shutdown()
        raise
    return True


def _note_ray_address_unused() -> None:
    """Say so when ``RAY_ADDRESS`` names a cluster but Ray starts here (no ``--address``): Ray's own
    tools join it (and ``ray job submit`` sets it for its entrypoint), so without a word the trials
    ran on this one machine, its cluster idle. A ``ray://`` or ``http(s)://`` one (Ray Client's, or the
    dashboard's that Ray's docs export for ``ray job submit``) is no address ``--address`` takes
    (:func:`check_reachable` refuses it, and ``--address auto`` with it): the note says how to join."""
    given = os.environ.get("RAY_ADDRESS", "").strip()
    if given and given not in ("local", "auto"):
        join = (f"give --address auto (or --address {given}) to run them on that cluster" if "://" not in given else
                "to run them on that cluster, run ablate on one of its nodes with --address HEAD_IP:6379 (the head's GCS "
                "port; a ray:// or http:// address is Ray Client's or the dashboard's, which ablate does not join)")
        print(f"ablate: note: RAY_ADDRESS={given} is set, but without --address ablate runs its trials on a Ray it "
              f"starts on this machine; {join}", file=sys.stderr, flush=True)


def _warn_if_no_node_fits(study: Study, address: str) -> None:
    """Say so when no node of the joined cluster has the CPUs or GPUs one trial asks for: Ray would
    wait for such a node without end (an autoscaling cluster may add one, so this is no error)."""
    if not _trial_nodes(study):  # (per node: a node with the CPUs and another with the GPU hold no such trial)
        asks, has = _asks_and_has(study)
        print(f"ablate: warning: each trial asks for {asks} on one node, which no node of the cluster at {address} "
              f"has (its nodes: {has}): no trial starts until such a node joins (an autoscaler may add one). Ctrl-C, "
              f"then lower resources: in the study file, if none will.", file=sys.stderr, flush=True)


def _asks_and_has(study: Study) -> tuple[str, str]:
    """What one of the study's trials asks for (``2 CPUs and 1 GPUs``) and what the nodes of the
    running Ray have (``1 CPUs, 0 GPUs; ...``), as messages say them."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    has = "; ".join(sorted({f"{float(n.get('CPU', 0)):g} CPUs, {float(n.get('GPU', 0)):g} GPUs" for n in nodes})) or "none"
    asks = " and ".join(f"{v:g} {k}s" for k, v in (("CPU", study.resources.get("cpus", 1)),
                                                    ("GPU", study.resources.get("gpus", 0))) if v)
    return asks, has


#: how long the check of a cluster's nodes waits for each node's answer
NODE_CHECK_S = 60.0


def _node_view(markers: dict[str, str], study: Study | None, plugins: list[str], plugin_dir: str | None) -> dict:
    """On one node of a cluster: which of the driver's ``markers`` (what -> a file it wrote there)
    this node does not see, why the study's plugins do not import here and why its real data
    (``study``: its real-data trials, or None) is missing here (None: nothing is wrong), and the
    code it runs (:func:`_code_view`)."""
    view: dict[str, Any] = {"missing": [k for k, m in markers.items() if not os.path.exists(m)], "plugins": None,
                            "data": None, "code": _code_view(), "gpu_build": torch_gpu_build()}
    try:
        import_worker_plugins(plugins, plugin_dir)
    except Exception as exc:  # noqa: BLE001 - reported by the driver, with the node's name
        view["plugins"] = f"{type(exc).__name__}: {exc}"
        return view
    if study is not None:
        try:
            check_real_data(study)
        except Exception as exc:  # noqa: BLE001
            view["data"] = str(exc).removesuffix(" Nothing was run.")
    return view


def torch_gpu_build() -> bool:
    """Whether this process's torch is built for GPUs (CUDA, or ROCm); not whether it sees one now
    (Ray hides the GPUs from a task that asks for none, as the node check does)."""
    import torch

    return bool(torch.version.cuda or getattr(torch.version, "hip", None))


def _code_view() -> str:
    """The code a process runs, as the trials' rows record it: ablate's and metaadamw's fingerprint
    and torch's version."""
    from ablate.provenance import provenance

    made = provenance()
    return f"code {made['code_fingerprint']}, torch {made['torch_version']}"


def _trial_nodes(study: Study) -> dict[str, str]:
    """The nodes alive now that can hold one of the study's trials (its CPUs and GPUs), by id, as
    messages name them: ``host (ip, node 1a2b3c4d)``."""
    import ray

    want = {"CPU": study.resources.get("cpus", 1), "GPU": study.resources.get("gpus", 0)}
    return {n["NodeID"]: f"{n.get('NodeManagerHostname') or '?'} ({n.get('NodeManagerAddress')}, node {n['NodeID'][:8]})"
            for n in ray.nodes() if n.get("Alive")
            and all(float(n.get("Resources", {}).get(k, 0)) >= v for k, v in want.items())}


#: the node check's warnings said within :func:`node_warnings_once` (None outside it)
_SAID: list[set[str] | None] = [None]


@contextlib.contextmanager
def node_warnings_once() -> Iterator[None]:
    """Within: a warning of :func:`check_cluster_nodes` that was said already is not said again
    (``ablate tune`` checks the nodes, and so does the study of its AdamW reference, on the same
    nodes: a node running other code was named twice)."""
    outer, _SAID[0] = _SAID[0], set() if _SAID[0] is None else _SAID[0]
    try:
        yield
    finally:
        _SAID[0] = outer


def _warn(message: str) -> None:
    said = _SAID[0]
    if said is not None:
        if message in said:
            return
        said.add(message)
    print(message, file=sys.stderr, flush=True)


def check_cluster_nodes(study: Study, folders: dict[str, Path]) -> None:
    """On a cluster (``--address``), before any trial: ask every node alive now that can hold a
    trial whether it sees the ``folders`` (what -> a folder of this machine that each trial writes
    to from its node: Ray Tune's storage, the trials' checkpoints), imports the study's plugins and
    has its real data, as its trials would, which code it runs and, for trials that hold GPUs, whether
    its torch is built with CUDA. Ray Tune's storage, the plugins or the data missing on a node, or a
    CPU-only torch there for ``device: cuda`` trials - its trials would all fail there - is an error
    naming the nodes (a CPU-only torch for other trials, which would train on the CPU, a warning);
    the checkpoints' folder a warning (``--resume`` cannot continue the trials those nodes cut off,
    and their checkpoints stay on their disks), as is other code than the driver's (another version
    of ablate, metaadamw or torch: its trials' results come from that code, which their rows
    record). A node that dies, or does not answer within :data:`NODE_CHECK_S`, is named, not
    checked."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ablate.tasks import DatasetNotFoundError

    real = [dataclasses.replace(t, config=worker_spec(t)["config"]) for t in study.trials
            if t.config.get("data") == "real"]
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
        _warn(f"ablate: warning: node(s) {', '.join(unchecked)} not checked for what their trials need")
    where = {what: [nodes[n] for n, a in answers.items() if what in a["missing"]] for what in folders}
    for key, error, what, fix in (
            ("plugins", ConfigError, "the study's plugins do not import on node(s) of the cluster, where its trials "
             "would fail", "Ray ships the plugin modules next to the study file to every node; install what they "
             "import there too."),
            ("data", DatasetNotFoundError, "node(s) of the cluster cannot run the study's real-data trials, which would "
             "fail there", "Every node needs the data at the same absolute path (or $ABLATE_DATA_DIR on the driver "
             "naming one that every node has).")):
        wrong = {nodes[n]: a[key] for n, a in answers.items() if a[key]}
        if wrong:
            raise error(f"{what}: " + "; ".join(f"{node}: {why}" for node, why in wrong.items())
                        + f". {fix} Nothing was run.")
    gpus = study.resources.get("gpus", 0)
    cpu_torch = [nodes[n] for n, a in answers.items() if gpus and a.get("gpu_build") is False]  # (None: older ablate)
    if cpu_torch:
        cuda = sorted({t.task for t in study.trials if t.config.get("device") == "cuda"})
        what = (f"each trial holds {gpus:g} GPU(s), but torch on node(s) {', '.join(cpu_torch)} is built without CUDA "
                f"(a CPU-only torch)")
        if cuda:
            raise ConfigError(f"{what}: the trials of {cuda} run on device: cuda and would fail there. Install a CUDA "
                              f"build of torch on every GPU node (or set resources.gpus: 0 and device: cpu). Nothing "
                              f"was run.")
        _warn(f"ablate: warning: {what}: trials there train on the CPU while each holds a GPU that none can use; "
              f"install a CUDA build of torch there (or set resources.gpus: 0)")
    if "storage" in where and where["storage"]:
        raise ConfigError(
            f"Ray Tune's storage {folders['storage']} is not on node(s) {', '.join(where['storage'])}: each trial writes "
            f"its checkpoints there from the node that runs it, and would fail. Give --storage a folder every node "
            f"shares (NFS, say) or a URI (s3://..., gs://...). Nothing was run.")
    here = _code_view()
    other = {nodes[n]: a.get("code") or "an older ablate, which does not say" for n, a in answers.items()
             if a.get("code") != here}
    if other:
        _warn(f"ablate: warning: node(s) of the cluster run other code than this driver ({here}): "
              + "; ".join(f"{node}: {code}" for node, code in other.items()) + ". Their trials run that code (`ablate run` "
              "records it in each trial's row: the trials table's code_fingerprint, which for a plugin's task and "
              "components also covers the plugin modules that define them, and torch_version columns): install the same ablate, "
              "metaadamw and torch on every node for results that compare")
    if "checkpoints" in where and where["checkpoints"]:
        _warn(f"ablate: warning: {folders['checkpoints']} is not on node(s) {', '.join(where['checkpoints'])}: trials "
              f"there write their checkpoints to that path on their own disk, so `--resume` cannot continue a trial "
              f"that a stop cut off there (it starts again), and the checkpoints stay on those disks. Run from an --out "
              f"folder every node shares to have them.")


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


def _running_ray() -> bool:
    """Whether this process runs Ray already (``ray.init`` called before: a notebook's, an earlier run's)."""
    ray = sys.modules.get("ray")  # (not imported: not running, and an import takes seconds)
    return ray is not None and ray.is_initialized()


def check_resources(study: Study, address: str | None = None, num_cpus: int | None = None) -> None:
    """Refuse, before Ray starts, resources that can never be met: a trial asking for more CPUs or
    GPUs than this machine has (when Ray runs here; Ray would wait for them forever) or than every
    node of the Ray this process runs already has (``ray.init`` called before ``run_study``), and trials on
    ``device: cuda`` without a GPU (Ray hides the GPUs from a trial that asked for none)."""
    cpus, gpus = study.resources.get("cpus", 1), study.resources.get("gpus", 0)
    cuda = sorted({t.task for t in study.trials if t.config.get("device") == "cuda"})
    if cuda and not gpus:
        raise ConfigError(f"{study.name}: trials of {cuda} run on device: cuda, but resources.gpus is 0 (Ray hides the "
                          f"GPUs from a trial that asks for none): set resources: {{gpus: 1}} (or a fraction)")
    if address is not None:
        check_reachable(address)
        return
    if _running_ray():  # a Ray this process runs already (init_ray keeps it): its nodes count
        if not _trial_nodes(study):
            asks, has = _asks_and_has(study)
            raise ConfigError(f"{study.name}: each trial asks for {asks} on one node, but the Ray this process runs "
                              f"already has no such node (its nodes: {has}), so no trial could ever start: lower "
                              f"resources: in the study file, or start Ray with more (ray.init(num_cpus=...))")
        return
    # (a trial of at most one CPU fits any machine: Ray's count, seconds to import, only for more)
    have_cpus = (num_cpus or available_cpus()) if cpus > 1 else 1
    if cpus > have_cpus:
        raise ConfigError(f"{study.name}: each trial asks for resources.cpus={cpus:g}, but Ray runs here with {have_cpus} "
                          f"CPU(s), so no trial could ever start: lower resources.cpus, or run on a cluster with --address")
    if gpus:
        import torch

        have_gpus = torch.cuda.device_count()
        if gpus > have_gpus and not torch_gpu_build():  # (this machine's GPUs, if any, are not what torch lacks)
            raise ConfigError(f"{study.name}: each trial asks for resources.gpus={gpus:g}, but torch here "
                              f"({torch.__version__}) is built without CUDA, so it sees no GPU whatever this machine "
                              f"has: install a CUDA build of torch, or set resources.gpus: 0 (and device: cpu)")
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


#: the HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (a Ray head's GCS) answers with a frame
#: of its own SETTINGS (frame type 4 in the 4th byte of its 9-byte header)
_GRPC_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse, before Ray starts, a cluster address ``HOST:PORT`` that nothing answers on within
    ``timeout_s`` (``ray.init`` would retry for minutes), or one without its port, or one where
    something answers that is not a Ray head's GCS (a gRPC server): another port of the head - its
    dashboard's 8265, ssh's 22 - on which ``ray.init`` retried for a quarter of an hour (unless
    ``RAY_USE_TLS`` is on: a TLS GCS answers no plain HTTP/2). ``auto`` is checked as the address
    Ray takes for it from ``RAY_ADDRESS`` when that is set; else it is left to Ray. A ``ray://``
    (Ray Client) address is refused: through it the driver's work - ablate's results, the folder
    checks - would run on the head, writing there."""
    given = "--address"
    if address == "auto" and os.environ.get("RAY_ADDRESS", "").strip() not in ("", "auto", "local"):
        # (Ray reads `auto` as $RAY_ADDRESS: unchecked, an unreachable one hung the run, a ray:// one ended in a traceback)
        address, given = os.environ["RAY_ADDRESS"].strip(), "--address auto, from $RAY_ADDRESS,"
    if address.startswith("ray://"):
        raise ConfigError(f"{given} {address}: Ray Client (ray://) is not supported - ablate stores the results from "
                          f"its driver, which through a client would run on the head. Run ablate on a node of the cluster "
                          f"(the head, say) with --address HEAD_IP:6379 (the head's GCS port), or --address auto there")
    if "://" in address:  # (Ray hands any scheme to a Ray Client builder: http:// fails there with a traceback)
        raise ConfigError(f"{given} {address}: expected HOST:PORT of the Ray head's GCS (e.g. 10.0.0.1:6379, the "
                          f"port `ray start --head` printed), or auto; an address with a scheme is a Ray Client's or, "
                          f"with http(s)://, the dashboard's (for `ray job submit`), which ablate does not use")
    if address in ("auto", "local"):
        return
    if ":" not in address:  # (Ray's own answer is a traceback: "ValueError: Invalid address format")
        raise ConfigError(f"{given} {address!r}: expected HOST:PORT of the Ray head (e.g. {address}:6379, the port "
                          f"`ray start --head` printed), or auto")
    host, _, port = address.rpartition(":")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):  # (Ray refuses it: "Invalid address format")
        raise ConfigError(f"{given} {address!r}: an IPv6 address goes in brackets before the port, as Ray reads it: "
                          f"[ADDRESS]:PORT (e.g. [fe80::1]:6379), or auto")
    if not (port.isascii() and port.isdigit()):  # (isdigit alone takes "²", which int() refuses)
        raise ConfigError(f"{given} {address!r}: expected HOST:PORT of the Ray head (e.g. 10.0.0.1:6379), or auto")
    if not 0 < int(port) < 65536:  # (the socket library takes a larger one modulo 65536: another port was probed)
        raise ConfigError(f"{given} {address!r}: port {port} is no TCP port (1 to 65535): give the port "
                          f"`ray start --head` printed (6379 by default)")
    try:
        connection = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
    except OSError as exc:
        raise ConfigError(
            f"{given} {address}: nothing answers there ({type(exc).__name__}: {exc}). Is the head started "
            f"(`ray start --head --port {port}` on {host}), and is the port open from this machine?") from None
    with connection:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return
        answer, closed, deadline = b"", False, time.monotonic() + timeout_s
        try:
            connection.sendall(_GRPC_HELLO)
            # a frame header may arrive in pieces (recv returns what has come so far): read its 9 bytes within timeout_s
            while len(answer) < 9:
                connection.settimeout(max(deadline - time.monotonic(), 1e-3))
                piece = connection.recv(9 - len(answer))
                if not piece:
                    closed = True
                    break
                answer += piece
        except TimeoutError:
            pass
        except OSError:  # (the connection reset)
            closed = True
    if len(answer) < 4 or answer[3] != 4:
        said = (f"it answered {answer!r}" if answer else "it closed the connection without a gRPC answer" if closed
                else f"no gRPC answer within {timeout_s:g} s")
        raise ConfigError(
            f"{given} {address}: something listens there, but not a Ray head's GCS ({said}): give the port "
            f"`ray start --head` printed (the GCS's, 6379 by default; not the dashboard's 8265 nor the Ray Client's "
            f"10001). Nothing was run.")


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
