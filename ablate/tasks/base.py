"""What a task is: data + model + loss + metrics, with the paper's defaults.

A task is registered under a name with :func:`register_task`. Registration takes a *factory*
``factory(config: dict) -> TaskInstance`` where ``config`` is the fully resolved, flat trial
config (common defaults, then the task's own ``defaults``, then ``embedded_defaults`` when
``config["data"] == "embedded"``, then the user's values). The factory reads what it needs from
it (``data``, ``data_dir``, ``seed``, and its own model keys such as ``d_model``) and builds:

* ``train`` / ``val`` / ``test`` map-style ``torch.utils.data.Dataset`` objects whose items
  collate with the default collate function (or ``collate_fn``) into a *batch*;
* ``model``: an ``nn.Module`` (on CPU; the trial runner moves it);
* ``loss_fn(model, batch) -> scalar tensor`` - the training loss, also used by MetaAdamW's
  meta-update, so it must be a pure function of the model and the batch;
* ``evaluate(model, loader) -> dict[str, float]`` - every metric of ``metrics`` on a loader,
  averaged over the whole split (not over batches); the trial calls it with the model in
  evaluation mode (``model.eval()``) under ``torch.no_grad()``, and puts it back in training mode
  after it;
* ``reference``: metrics of a trivial reference on the validation split with the same scaling
  (for ETT the persistence forecast), so a user sees at once whether a model learned anything,
  and, under keys starting with ``test_``, on the test split where there is one;
* ``data_source``: where the data came from, e.g. ``"embedded:statsmodels-elnino"`` or
  ``"real:/data/ETT-small/ETTh1.csv"`` - recorded with every result. The prefix ``embedded:``
  marks a built-in task's small stand-in for a paper dataset (the report warns that such results
  say nothing about the paper's claims); a task's own generated data takes another prefix
  (``"synthetic:sine"``).

Batches are moved to the trial's device by :func:`move_to_device` (tensors, and tuples / lists /
dicts of tensors).

A task may also register ``check(config)``, which range-checks its own keys in the resolved config
(:attr:`TaskSpec.check`); :func:`check_int`, :func:`check_probability`, :func:`check_choice`,
:func:`check_bool` and :func:`check_multiple` raise the one-line errors the built-in tasks use.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import functools
import hashlib
import numbers
import os
import re
import shlex
import stat
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ablate.config import ConfigError, CrossKeyError, is_number
from metaadamw.registry import Registry

TASKS = Registry("task", "ablate.tasks", export_name="TASKS")

#: Environment variable naming the directory that holds the real datasets.
DATA_DIR_ENV = "ABLATE_DATA_DIR"


class DatasetNotFoundError(FileNotFoundError):
    """A real dataset is missing or malformed. The message says which files were expected
    where, and how to obtain them."""


class DataWarning(UserWarning):
    """A warning about a task's data files themselves (not the published files, a subset, pairs or stamps a loader
    skips or cannot check), raised while the task is built: the same for every trial that reads those files, so
    ``ablate run`` prints it once per task for the whole run, not once per trial or arm (each trial still records
    what it read in its ``data_source``). A plugin's task may raise it for warnings of that kind."""


@dataclasses.dataclass
class Metric:
    name: str
    mode: str  # "min" or "max"

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"metric {self.name!r}: mode must be 'min' or 'max', got {self.mode!r}")

    def better(self, a: float, b: float, min_delta: float = 0.0) -> bool:
        """True when ``a`` improves on ``b`` by more than ``min_delta``."""
        return a < b - min_delta if self.mode == "min" else a > b + min_delta


@dataclasses.dataclass
class TaskInstance:
    name: str
    model: nn.Module
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module, Any], dict[str, float]]
    data_source: str
    test: torch.utils.data.Dataset | None = None
    collate_fn: Callable | None = None
    reference: dict[str, float] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # vocab size, shapes, ...


@dataclasses.dataclass
class TaskSpec:
    """A registered task: its factory, metrics and defaults."""

    name: str
    factory: Callable[[dict], TaskInstance]
    metrics: tuple[Metric, ...]  # the first one is the primary (early stopping, reports)
    defaults: dict[str, Any]  # paper settings: training, MetaAdamW (Table 4) and model keys
    embedded_defaults: dict[str, Any]  # overrides for the small offline variant
    description: str = ""
    #: ``locate(config) -> paths`` of the real data files the task would read (no parsing), raising
    #: DatasetNotFoundError naming the expected paths when one is missing: lets ``ablate run``
    #: refuse a study before Ray starts instead of failing every trial in a worker. Optional. The
    #: paths make the trials' :func:`data_fingerprint`: name the files read, or a :class:`FolderFiles`
    #: for the matching files of a folder (a plain folder path stands for every file below it).
    locate: Callable[[dict], list[Path | FolderFiles]] | None = None
    #: ``check(config)`` validates the task's own keys (model sizes, dropout, choices, and
    #: constraints between keys such as ``d_model`` a multiple of ``n_heads``) in the fully resolved
    #: config, raising ablate.config.ConfigError (or ValueError) with a one-line message that names
    #: the key, the bad value and the allowed range or the fix: :func:`ablate.config.resolve_config`
    #: calls it, so a bad value is refused before Ray starts (``ablate run``, ``ablate train``: exit
    #: code 2) instead of failing every trial in a worker. Optional; see :func:`check_int` and friends.
    check: Callable[[dict], None] | None = None
    #: the version of the task's embedded data, owned by the code that makes them (a generator's
    #: ``"generated-grammar-v2"``, a bundled set's ``"sklearn-digits"``): part of an embedded trial's
    #: identity (:func:`ablate.config.identity_config`), so bumping it when the embedded data change
    #: runs their trials again instead of reusing (or ``--resume``-continuing) results made on the old
    #: data. "" (a task without one): the id is as before. Real-data trials never see it.
    embedded_version: str = ""
    #: the task's own keys whose values name files (``csv_file``): absolute, or relative to the data
    #: directory (looked for in the dataset's folder below it, then in it: :func:`data_dir_candidates`).
    #: ``ablate list --task TASK --keys`` calls them paths, and a tuned file's ``tuned_with`` and a study
    #: compare them as the files they name, not as text (``./x.csv`` is ``x.csv``)
    path_keys: tuple[str, ...] = ()

    @property
    def metric(self) -> Metric:
        return self.metrics[0]

    def build(self, config: Mapping[str, Any]) -> TaskInstance:
        with download_hint_with_data_dir(config):
            return self.factory(dict(config))


#: the download command a loader's error names, without a --data-dir
_DOWNLOAD_COMMAND = re.compile(r"`ablate data download (\S+?)( --force)?`")


def download_command(task: str, config: Mapping[str, Any], force: bool = False) -> str:
    """``ablate data download TASK`` as it fetches the data where ``config`` looks: with
    ``--data-dir`` for a config with its own ``data_dir`` (else the download lands in
    ``$ABLATE_DATA_DIR`` or ``./data``) - its parent where ``data_dir`` is the dataset's own folder
    (``.../ETT-small``: the download makes that folder below the directory it is given)."""
    data_dir = config.get("data_dir")
    where = ""
    if data_dir:
        path = download_root(task, Path(os.path.expanduser(str(data_dir))))
        where = f" --data-dir {shlex.quote(str(path))}"
    return f"ablate data download {task}{where}{' --force' if force else ''}"


def refetch_advice(task: str, config: Mapping[str, Any], plural: bool = False) -> str:
    """The advice for a copy that is not the published one: :func:`download_command` with
    ``--force``, which fetches the published file(s) into the dataset's own folder - the first place
    the loaders look, or the copy's own - so that they are read in its place."""
    which = "ones, read in their place" if plural else "one, read in its place"
    return f"`{download_command(task, config, force=True)}` fetches the published {which}"


def download_root(task: str, data_dir: Path) -> Path:
    """The directory a download of ``task`` is given so that its files land where a loader given
    ``data_dir`` looks: ``data_dir``, or its parent where it is the dataset's own folder
    (``.../ETT-small``: the download makes that folder below the directory it is given)."""
    if data_dir.name and data_dir.name in {d.dataset_folder for d in DOWNLOADS.get(task, ())}:
        return data_dir.parent
    return data_dir


@contextlib.contextmanager
def download_hint_with_data_dir(config: Mapping[str, Any]) -> Iterator[None]:
    """A loader's :class:`DatasetNotFoundError` naming ``ablate data download TASK``: the command
    as :func:`download_command` gives it for ``config``."""
    try:
        yield
    except DatasetNotFoundError as error:
        text = str(error)
        fixed = _DOWNLOAD_COMMAND.sub(lambda m: f"`{download_command(m[1], config, bool(m[2]))}`", text)
        if fixed == text:
            raise
        raise DatasetNotFoundError(fixed) from error


def _not_a_task(obj: Any) -> str | None:
    """Why an object cannot be registered as a task (None: it can), with ``TASKS.register`` or
    through an ``ablate.tasks`` entry point."""
    if isinstance(obj, TaskSpec):
        return None
    return (f"it is a {type(obj).__name__} ({getattr(obj, '__qualname__', obj)!r}), not a task: decorate the task's "
            f"factory with @register_task(name, metrics=..., defaults=...) from ablate.tasks, which registers a "
            f"TaskSpec (an entry point may also name the module that does so, \"my_pkg.tasks\")")


TASKS.validate = _not_a_task
TASKS.register_hint = '@register_task("{name}", metrics=[("<metric>", "min" or "max")], defaults={{...}}) (from ablate.tasks)'


def register_task(
    name: str,
    *,
    metrics: list[tuple[str, str]] | tuple[tuple[str, str], ...],
    defaults: dict[str, Any],
    embedded_defaults: dict[str, Any] | None = None,
    description: str = "",
    aliases: tuple[str, ...] = (),
    locate: Callable[[dict], list[Path | FolderFiles]] | None = None,
    check: Callable[[dict], None] | None = None,
    embedded_version: str = "",
    path_keys: tuple[str, ...] = (),
    override: bool = False,
) -> Callable:
    """Decorator registering a task factory ``factory(config) -> TaskInstance`` (``locate``: see
    :attr:`TaskSpec.locate`; ``check``: see :attr:`TaskSpec.check`; ``embedded_version``: see
    :attr:`TaskSpec.embedded_version`; ``path_keys``: see :attr:`TaskSpec.path_keys`; ``override``:
    replace a task of that name registered elsewhere)."""

    def decorator(factory: Callable[[dict], TaskInstance]) -> Callable[[dict], TaskInstance]:
        from ablate.config import COMMON_FIELDS, RESULT_COLUMNS, RESULT_PREFIXES, did_you_mean

        pairs = isinstance(metrics, (list, tuple)) and all(
            isinstance(m, (list, tuple)) and len(m) == 2 and isinstance(m[0], str) and m[0] for m in metrics)
        if not pairs or not metrics:  # (an empty list failed later, in every trial, with an IndexError)
            raise ValueError(f"task {name!r}: metrics must list one or more (name, 'min' or 'max') pairs, the first "
                             f"being the one early stopping, the best weights and the reports use, e.g. "
                             f"metrics=[('mse', 'min')]; got {metrics!r}")
        taken = {m: f"metric {m!r} (stored as best_{m})" for m, _ in metrics if f"best_{m}" in RESULT_COLUMNS}
        for where, keys in (("defaults", defaults), ("embedded_defaults", embedded_defaults or {})):
            # (best_<metric>, test_<metric> and ref_<reference> are result columns too)
            taken.update({key: f"{where} key {key!r}" for key in keys
                          if key in RESULT_COLUMNS or key.startswith(RESULT_PREFIXES)})
        if taken:  # the stored row would keep one of the two values, silently
            raise ValueError(f"task {name!r}: {'; '.join(taken.values())}: the name of a column of the trial's stored "
                             f"results; rename it (e.g. {name}_{next(iter(taken))}). The results' columns: "
                             f"{', '.join(sorted(RESULT_COLUMNS))}, and {', '.join(p + '*' for p in RESULT_PREFIXES)}")
        for where, keys in (("defaults", defaults), ("embedded_defaults", embedded_defaults or {})):
            for key in keys:  # a misspelt trial key would be a task key of its own, and the trial key keep its default
                hint = "" if key in COMMON_FIELDS else did_you_mean(key, COMMON_FIELDS, cutoff=0.85)
                if hint:
                    warnings.warn(f"task {name!r}: {where} key {key!r} is no trial key{hint}; a task's own keys are "
                                  f"fine, a misspelt trial key leaves that key at its default", stacklevel=2)
        if not isinstance(path_keys, (tuple, list)):  # (a string's letters would be the keys; None crashed iterating)
            raise ValueError(f"task {name!r}: path_keys must be a tuple of key names, e.g. ('csv_file',); got "
                             f"{path_keys!r}")
        own = {*defaults, *(embedded_defaults or {})} - set(COMMON_FIELDS)
        strays = [key for key in path_keys if key not in own]
        if strays:  # (a misspelt path key would leave the key compared as text)
            raise ValueError(f"task {name!r}: path_keys {', '.join(map(repr, strays))}: not one of the task's own keys "
                             f"(its defaults' keys that are no trial key): {', '.join(sorted(own)) or 'none'}")
        spec = TaskSpec(
            name=name,
            factory=factory,
            metrics=tuple(Metric(n, m) for n, m in metrics),
            defaults=dict(defaults),
            embedded_defaults=dict(embedded_defaults or {}),
            description=description or (factory.__doc__ or "").strip().split("\n")[0],
            locate=None if locate is None else _located_with_hint(locate),
            check=check,
            embedded_version=str(embedded_version or ""),
            path_keys=tuple(path_keys),
        )
        # (all or none: an alias that is taken leaves no name of the task registered, half-made)
        TASKS.add_all([(name, spec)] + [(alias, dataclasses.replace(spec, name=alias)) for alias in aliases],
                      override=override)
        return factory

    return decorator


def _located_with_hint(locate: Callable[[dict], list[Path | FolderFiles]]) -> Callable[[dict], list[Path | FolderFiles]]:
    """``locate`` whose errors name the download command with the config's ``data_dir``."""
    @functools.wraps(locate)
    def located(config: dict) -> list[Path | FolderFiles]:
        with download_hint_with_data_dir(config):
            return locate(config)
    return located


# -- checks of task keys, for TaskSpec.check -------------------------------------------------------
#
# Each raises ConfigError "TASK: KEY=VALUE must be ... (what the key is)" for config[key].


def _bad(config: Mapping[str, Any], key: str, requirement: str, what: str = "") -> ConfigError:
    return ConfigError(f"{config['task']}: {key}={config[key]!r} {requirement}" + (f" ({what})" if what else ""))


def check_int(config: Mapping[str, Any], key: str, what: str = "", minimum: int | None = 1) -> None:
    """``config[key]`` is an integer (not a bool) >= ``minimum`` (any integer for ``None``)."""
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        raise _bad(config, key, "must be an integer" + (f" >= {minimum}" if minimum is not None else ""), what)


def check_probability(config: Mapping[str, Any], key: str, what: str = "dropout probability") -> None:
    """``config[key]`` is a number in [0, 1)."""
    value = config[key]
    if not (is_number(value) and 0 <= value < 1):
        raise _bad(config, key, "must be a number in [0, 1)", what)


def check_choice(config: Mapping[str, Any], key: str, allowed: Iterable[str]) -> None:
    """``config[key]`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if config[key] not in allowed:
        raise _bad(config, key, f"is not allowed; choose one of: {', '.join(map(str, allowed))}")


def check_bool(config: Mapping[str, Any], key: str, what: str = "") -> None:
    """``config[key]`` is true or false."""
    if not isinstance(config[key], bool):
        raise _bad(config, key, "must be true or false", what)


def check_multiple(config: Mapping[str, Any], key: str, of: str) -> None:
    """``config[key]`` is a multiple of ``config[of]`` (both already checked to be positive integers)."""
    if config[key] % config[of]:
        raise CrossKeyError(
            f"{config['task']}: {key}={config[key]} is not a multiple of {of}={config[of]}: "
            f"choose {key} divisible by {of}"
        )


def get_task(name: str) -> TaskSpec:
    return TASKS.get(name)


def find_task(name: Any) -> TaskSpec | None:
    """The task registered as ``name``, or None where there is none (``name`` not a registered name,
    or no string at all: a row or config that recorded no task), for callers that go on without
    one; :func:`get_task` raises instead, naming the registered tasks."""
    return TASKS.get(name) if isinstance(name, str) and name in TASKS else None


def list_tasks(pattern: str | None = None) -> list[str]:
    return TASKS.list(pattern)


def data_dir_candidates(config: Mapping[str, Any], subdir: str | None = None) -> list[Path]:
    """Where a real dataset may lie, in the order it is looked for: ``data_dir/subdir`` (the
    dataset's own folder, e.g. ``ETT-small``) and ``data_dir`` itself; only ``data_dir`` when it
    already ends in ``subdir``. ``data_dir``: ``config["data_dir"]``, else ``$ABLATE_DATA_DIR``."""
    raw = config.get("data_dir") or os.environ.get(DATA_DIR_ENV)
    if not raw:
        raise DatasetNotFoundError(
            f"task {config.get('task')!r} with data='real' needs a data directory: pass data_dir "
            f"(data_dir: in a study file, or --data-dir DIR for ablate train) or set ${DATA_DIR_ENV}; "
            f"or use data='embedded' for the small offline variant"
        )
    root = Path(os.path.expanduser(str(raw)))
    return [root] if not subdir or root.name == subdir else [root / subdir, root]


def resolve_data_dir(config: Mapping[str, Any], subdir: str | None = None) -> Path:
    """The directory holding a real dataset (:func:`data_dir_candidates`): ``data_dir/subdir`` when
    it exists, else ``data_dir``, so both ``/data`` and ``/data/ETT-small`` work."""
    candidates = data_dir_candidates(config, subdir)
    return candidates[0] if len(candidates) == 1 or candidates[0].exists() else candidates[1]


def also_looked_in(config: Mapping[str, Any], subdir: str, root: Path) -> str:
    """For an error about files missing from ``root``: where else the dataset may lie (the
    dataset's own folder below the data directory, when ``root`` is not it), or ""."""
    others = [c for c in data_dir_candidates(config, subdir) if c != root and c.name == subdir]
    return f" (and there is no folder {others[0]}, the other place it may lie)" if others else ""


@dataclasses.dataclass(frozen=True)
class FolderFiles:
    """What a task reads of a folder, for :attr:`TaskSpec.locate`: the files directly in ``folder``
    whose names match ``pattern`` (as ``folder.glob(pattern)`` finds them; ``folder`` may be a link,
    a class folder on another disk). :func:`data_fingerprint` counts those only, so a README, a
    subfolder or the same data in another format beside them changes no trial's fingerprint, where a
    plain folder path counts every file below it. ``folder`` may be given as a string: it is made a
    :class:`~pathlib.Path` here, so that two FolderFiles of one folder are equal (and hash alike)
    however it was given."""

    folder: Path
    pattern: str = "*"

    def __post_init__(self) -> None:
        if not isinstance(self.folder, (str, os.PathLike)):  # (Path()'s own TypeError names no FolderFiles)
            raise TypeError(f"FolderFiles({self.folder!r}, {self.pattern!r}): the folder must be a path (a str or a "
                            f"pathlib.Path), not {type(self.folder).__name__}: give the folder that holds the files")
        object.__setattr__(self, "folder", Path(self.folder))  # (frozen: set through object)
        if not self.pattern or "/" in self.pattern or os.sep in self.pattern:
            raise ValueError(f"FolderFiles({str(self.folder)!r}, {self.pattern!r}): the pattern matches the names of "
                             f"files directly in the folder (e.g. '*.txt'), not a path: give each folder its own "
                             f"FolderFiles")

    def __fspath__(self) -> str:  # (where a path is expected, e.g. an error naming what is missing: the folder)
        return os.fspath(self.folder)

    @property
    def name(self) -> str:
        return Path(self.folder).name

    def sizes(self) -> list[int]:
        """The sizes of the matching files (a link to a file counts as that file; a link that leads
        nowhere, or a matching folder, is no file)."""
        sizes = []
        for path in Path(self.folder).glob(self.pattern):
            try:
                st = os.stat(path)
            except OSError:  # (a broken link)
                continue
            if stat.S_ISREG(st.st_mode):
                sizes.append(st.st_size)
        return sizes


def data_fingerprint(spec: "TaskSpec", config: Mapping[str, Any],
                     walked: dict[Path | FolderFiles, tuple[int, int]] | None = None) -> str:
    """A cheap fingerprint of the real data a trial reads: the name and size of each file the task's
    ``locate`` names (a :class:`FolderFiles`: the count and total size of its matching files; a plain
    folder: of the files in it and in its subfolders, those reached through a link included, each
    folder once), hashed; "" for embedded data or a task without ``locate``. It survives copying the
    data to another directory or machine and changes when a file is replaced by another (a subset, a
    newer version): ``ablate run`` reruns stored trials whose fingerprint differs instead of reusing
    results made on other data. ``walked``, a dict the caller keeps for one pass over many trials,
    remembers each located path's count and size, so that trials reading the same files (one per
    seed and arm) walk a large tree (IMDB's 50,000 reviews) once, not once each."""
    if config.get("data") != "real" or spec.locate is None:
        return ""
    digest = hashlib.sha256()
    located = (p if isinstance(p, FolderFiles) else Path(p) for p in spec.locate(dict(config)))
    for path in sorted(located, key=lambda p: p.name):
        if walked is not None and path in walked:
            count, total = walked[path]
        elif isinstance(path, FolderFiles):
            sizes = path.sizes()
            count, total = len(sizes), sum(sizes)
        elif path.is_dir():
            sizes = _file_sizes(path)
            count, total = len(sizes), sum(sizes)
        else:
            count, total = 1, path.stat().st_size
        if walked is not None:
            walked[path] = (count, total)
        digest.update(f"{path.name}\0{count}\0{total}\n".encode())
    return digest.hexdigest()[:16]


def _file_sizes(folder: Path) -> list[int]:
    """The sizes of the files below ``folder``, following links to folders (a dataset folder linked in
    from another disk: ``Path.rglob`` skips it, so changed data there went unnoticed) but entering each
    folder once (a link to a folder above it is no loop); a link that leads nowhere is no file."""
    sizes, seen, root = [], set(), Path(os.path.realpath(folder))
    for top, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        # (not a link to the folder or one above it: that would fingerprint the whole tree above, the data directory)
        dirs[:] = [d for d in dirs if not root.is_relative_to(os.path.realpath(os.path.join(top, d)))]
        for name in files:
            try:
                st = os.stat(os.path.join(top, name))
            except OSError:  # (a broken link)
                continue
            if stat.S_ISREG(st.st_mode):
                sizes.append(st.st_size)
    return sizes


class TaskContractError(ConfigError):
    """A task's own code breaks the contract of :class:`TaskInstance` (its factory's return value,
    a loss that is not a scalar tensor, evaluate() without the declared metrics): deterministic, so
    a trial that hits it is failed at once, not retried."""


def check_task_instance(spec: "TaskSpec", instance: Any) -> None:
    """Refuse what a task's factory returned, naming the fix, when it is not a usable
    :class:`TaskInstance` (a tuple, a DataLoader for ``train``)."""
    where = f"task {spec.name!r} (factory {getattr(spec.factory, '__module__', '?')}."
    where += f"{getattr(spec.factory, '__qualname__', '?')})"
    if not isinstance(instance, TaskInstance):
        raise TaskContractError(f"{where} returned a {type(instance).__name__}: return an ablate.tasks.TaskInstance "
                                f"(name, model, train, val, loss_fn, evaluate, data_source)")
    if not isinstance(instance.model, nn.Module):
        raise TaskContractError(f"{where}: its TaskInstance.model is a {type(instance.model).__name__}, not a "
                                f"torch.nn.Module")
    for split in ("train", "val", "test"):
        data = getattr(instance, split)
        if split == "test" and (data is None or isinstance(data, torch.utils.data.IterableDataset)):
            continue  # (read once in order: a stream will do)
        if isinstance(data, (torch.utils.data.DataLoader, torch.utils.data.IterableDataset)) or not (
                hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise TaskContractError(
                f"{where}: its TaskInstance.{split} is a {type(data).__name__}: give a map-style dataset (len() and "
                f"indexing, e.g. a torch.utils.data.TensorDataset or a list of examples); the trial makes the "
                f"DataLoaders itself (batch_size, seeded shuffling; a collate_fn goes in TaskInstance.collate_fn)")


def check_loss(spec: "TaskSpec", loss: Any) -> None:
    """Refuse a training loss that is not a scalar tensor (checked on a trial's first batch)."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else f"a {type(loss).__name__}"
        raise TaskContractError(f"task {spec.name!r}: its loss_fn(model, batch) returned {got}: return the batch's "
                                f"mean loss as a scalar tensor (e.g. loss.mean())")


def check_metrics(spec: "TaskSpec", metrics: Any) -> None:
    """Refuse evaluate() results without the task's declared metrics, or with values that are not numbers."""
    declared = [m.name for m in spec.metrics]
    if not isinstance(metrics, collections.abc.Mapping) or not set(declared) <= set(metrics):
        got = sorted(metrics) if isinstance(metrics, collections.abc.Mapping) else type(metrics).__name__
        raise TaskContractError(f"task {spec.name!r}: its evaluate(model, loader) returned {got}, without its "
                                f"declared metric(s) {declared}: return a dict with a value for each (the names given "
                                f"to @register_task(metrics=...))")
    bad = {k: type(v).__name__ for k, v in metrics.items() if not (
        (isinstance(v, numbers.Real) and not isinstance(v, bool)) or (isinstance(v, torch.Tensor) and v.numel() == 1))}
    if bad:
        raise TaskContractError(f"task {spec.name!r}: its evaluate(model, loader) returned values that are not numbers: "
                                f"{bad}")


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """The tensors of a batch on ``device``: a tensor, or lists, tuples (named ones too) and mappings
    (dicts, and dict-like batches such as a tokenizer's) of them; anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple (torch's collate keeps them)
        return type(batch)(*(move_to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(b, device) for b in batch)
    if isinstance(batch, collections.abc.Mapping):
        moved = {k: move_to_device(v, device) for k, v in batch.items()}
        try:
            return moved if type(batch) is dict else type(batch)(moved)
        except Exception:  # a mapping type that is not built from a dict: a plain dict
            return moved
    return batch


# -- evaluation helpers shared by the tasks ----------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Evaluation mode without gradients; the previous training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


BatchSums = Callable[[nn.Module, Any], tuple[Mapping[str, Any], Any]]


def evaluate_sums(model: nn.Module, loader: Iterable, batch_sums: BatchSums) -> tuple[dict[str, float], int]:
    """Sums over a whole split, for ``evaluate`` functions that average over examples (not batches).

    In :func:`evaluating` mode, every batch of ``loader`` is moved to the model's device and passed
    to ``batch_sums(model, batch) -> (sums, count)``: a dict of per-batch sums (floats or scalar
    tensors) and how many examples (or tokens) they are over. Returns the totals of each sum and
    the total count; raises ``ValueError`` when the loader yields no examples.
    """
    device = model_device(model)
    totals: dict[str, float] = {}
    count = 0
    with evaluating(model):
        for batch in loader:
            sums, n = batch_sums(model, move_to_device(batch, device))
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            count += int(n)
    if count == 0:
        raise ValueError("evaluate: the loader yielded no examples")
    return totals, count


def classifier_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the class logits ``model(inputs)`` on a batch ``(inputs, labels)``."""
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def _classifier_sums(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict, int]:
    inputs, labels = batch
    logits = model(inputs)
    correct = (logits.argmax(dim=1) == labels).sum()
    return {"loss": F.cross_entropy(logits, labels, reduction="sum"), "correct": correct}, labels.numel()


def evaluate_classifier(model: nn.Module, loader: Iterable) -> dict[str, float]:
    """Accuracy and mean cross-entropy over every example of the loader (batches ``(inputs, labels)``)."""
    totals, count = evaluate_sums(model, loader, _classifier_sums)
    return {"accuracy": totals["correct"] / count, "loss": totals["loss"] / count}


@dataclasses.dataclass(frozen=True)
class Download:
    """One canonical archive or file of a real dataset, fetched by ``ablate data download TASK``.

    ``sha256`` (or, where only that is published, ``md5``) is verified before anything is
    unpacked; ``extract`` unpacks a .tar.gz/.zip archive into the data directory. ``mirrors``:
    further URLs of the same file, tried in order when ``url`` fails (the checksum decides what
    is the same file).
    """

    url: str
    filename: str
    sha256: str | None = None
    md5: str | None = None
    extract: bool = False
    subdir: str = ""  # where the file (or the archive's contents) goes under the data directory
    mirrors: tuple[str, ...] = ()
    #: the dataset's folder the download makes under the data directory (``subdir``, or an archive's
    #: top folder): a ``data_dir`` that names it is that folder, and a download goes to its parent
    folder: str = ""

    @property
    def dataset_folder(self) -> str:
        return self.folder or self.subdir


#: task name -> the downloads that make up its real dataset
DOWNLOADS: dict[str, tuple[Download, ...]] = {}


def register_download(task: str, *downloads: Download) -> None:
    DOWNLOADS[task] = tuple(downloads)
