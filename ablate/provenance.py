"""What made a stored trial besides its config: the code, torch, Python and the host.

A trial's identity is its config (:mod:`ablate.config`), which does not see code: a run reuses a
stored trial however the code changed since. So the row of every trial that trains records
:func:`provenance` (``code_fingerprint``: a hash of the installed ``ablate`` and ``metaadamw``
packages' Python files and, for a plugin's task, of the module defining it - for a MetaAdamW trial, also
of those defining the plugin components it uses -, the same for every
node and process that runs the same code;
``torch_version``, ``python_version``, ``hostname``: the node that ran it; ``provenance_source``:
``"trial"``, recorded by the process that ran the trial, or ``"driver"`` for a failed trial whose
process raised or died, whose row the driver records from what Ray reported: see
:func:`ablate.sweep._failed_row`), and a run that reuses trials made by other code or torch says
how many (:func:`note_other_code`), with what runs them again.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import socket
import sys
from pathlib import Path
from typing import Any

#: the packages whose files make the code fingerprint
PACKAGES = ("metaadamw", "ablate")


def code_fingerprint(task: Any = None, config: Any = None) -> str:
    """The :func:`fingerprint` of :data:`PACKAGES` as this process imports them (computed once, at
    the first call: a trial makes it when it is built, before it trains) and, for a ``task`` (a
    :class:`~ablate.tasks.base.TaskSpec`) whose factory is defined outside them - in a plugin next
    to the study file, or a package registering tasks through an entry point - of the module that
    defines the factory, by its name and bytes (read again when the file changes: a notebook that
    edits a plugin sees it). Only that module: not the other modules of a plugin package (helpers
    the factory imports), since Ray ships a plugin package to its workers without the files its
    ``.gitignore`` names, and a fingerprint of the whole package would differ between them and the
    driver. A factory defined in the running script (``__main__``) adds nothing: each process has
    its own. ``config``: a MetaAdamW trial's config, whose plugin components (``features``,
    ``grouping``, ``objective``, ``weighting`` registered outside these packages) add the modules
    defining them the same way, so that a fix to a plugin's feature extractor is seen as other code."""
    base = _packages_fingerprint()
    sources = [source for source in (_task_source(task), *_component_sources(config)) if source is not None]
    for module, path in dict.fromkeys(sources):  # (once each, in order: the task's module first)
        try:
            stat = path.stat()
        except OSError:
            continue
        base = _with_module(base, module, str(path), stat.st_mtime_ns, stat.st_size)
    return base


def _component_registries() -> dict[str, Any]:
    """The config keys naming a component MetaAdamW builds, with their registries: MetaAdamW's own
    (:func:`metaadamw.optimizer.component_registries`), imported when needed, since this module imports
    neither torch nor metaadamw."""
    from metaadamw.optimizer import component_registries

    return component_registries()


def _component_sources(config: Any) -> list[tuple[str, Path]]:
    """(module name, file) of the modules defining the components a MetaAdamW trial's ``config``
    names, for those defined outside :data:`PACKAGES` and ``__main__`` (an AdamW trial builds none)."""
    if not isinstance(config, dict) or config.get("optimizer") != "metaadamw":
        return []
    out = []
    for key, registry in _component_registries().items():
        name = config.get(key)
        if not isinstance(name, str) or name not in registry:
            continue
        obj = registry.get(name)
        while isinstance(obj, functools.partial):  # (a partial's own module is functools: its function's counts)
            obj = obj.func
        defined = obj if isinstance(obj, type) or hasattr(obj, "__qualname__") else type(obj)  # (an instance: its class)
        out.append(_module_source(getattr(defined, "__module__", None)))
    return [source for source in out if source is not None]


def _module_source(module: Any) -> tuple[str, Path] | None:
    """(module name, file) of a module outside :data:`PACKAGES` and ``__main__``; else None."""
    if not isinstance(module, str) or module.split(".")[0] in (*PACKAGES, "__main__"):
        return None
    file = getattr(sys.modules.get(module), "__file__", None)
    return (module, Path(file)) if isinstance(file, str) and file.endswith(".py") else None


def _task_source(task: Any) -> tuple[str, Path] | None:
    """(module name, file) of the module defining a task's factory (of a ``functools.partial``'s
    function), when that is outside :data:`PACKAGES` and ``__main__``; else None."""
    factory = getattr(task, "factory", None)
    while isinstance(factory, functools.partial):
        factory = factory.func
    return _module_source(getattr(factory, "__module__", None))


@functools.lru_cache(maxsize=1)
def _packages_fingerprint() -> str:
    import importlib

    return fingerprint({name: Path(importlib.import_module(name).__file__).parent for name in PACKAGES})


@functools.lru_cache(maxsize=None)
def _with_module(base: str, module: str, path: str, mtime_ns: int, size: int) -> str:
    """``base`` combined with a module's name and bytes (cached by its file's path, time and size)."""
    digest = hashlib.sha256(f"{base}\0{module}\0".encode())
    try:
        digest.update(Path(path).read_bytes())
    except OSError:
        return base
    return digest.hexdigest()[:12]


def fingerprint(packages: dict[str, Path]) -> str:
    """12 hex digits of a SHA-256 over the ``.py`` files of the package folders ``packages`` (name
    -> folder): their paths inside the package and their bytes. Caches, hidden files and folders
    (an editor's lock files, ``.ipynb_checkpoints``) and anything that is not a regular file, or
    vanishes before it is read, are left out (as are the files of a symlinked folder, which
    ``rglob`` does not enter)."""
    digest = hashlib.sha256()
    for name, root in packages.items():
        for path in sorted(root.rglob("*.py")):
            inside = path.relative_to(root)
            if any(part == "__pycache__" or part.startswith(".") for part in inside.parts):
                continue
            try:
                if not path.is_file():
                    continue
                data = path.read_bytes()
            except OSError:  # (removed by a checkout since the listing, say)
                continue
            digest.update(f"{name}/{inside.as_posix()}\0".encode())
            digest.update(data)
            digest.update(b"\0")
    return digest.hexdigest()[:12]


def provenance(task: Any = None, config: Any = None) -> dict[str, str]:
    """The columns a trial's row records about what ran it (also in ``ablate.config.RESULT_COLUMNS``);
    ``task``: the trial's :class:`~ablate.tasks.base.TaskSpec`, ``config`` its config (see
    :func:`code_fingerprint`). Called in the process that runs the trial: ``provenance_source`` is ``"trial"``."""
    import torch

    return {"code_fingerprint": code_fingerprint(task, config), "torch_version": torch.__version__,
            "python_version": platform.python_version(), "hostname": socket.gethostname(), "provenance_source": "trial"}


def note_other_code(stored, reused: set[str], again: str) -> None:
    """Print how many of the ``reused`` stored trials (ids; ``stored``: the stored trials' rows)
    were made by other code (of ablate, metaadamw or their task's plugin) or another torch than
    this process runs, and how many were stored without saying; ``again``: what runs them again."""
    if not reused:
        return
    import torch

    from ablate.tasks import find_task

    def now(task: Any, row: Any) -> tuple[str, str]:
        config = {k: getattr(row, k, None) for k in ("optimizer", *_component_registries())}
        return code_fingerprint(find_task(task), config), torch.__version__

    recorded: set[str] = set()  # reused trials whose row says what made them
    other: dict[str, list[tuple[tuple[str, str], tuple[str, str]]]] = {}  # task -> [(made by, what runs it now)]
    if {"code_fingerprint", "torch_version"} <= set(stored.columns):
        for r in stored.itertuples():
            if (r.trial_id in reused and r.trial_id not in recorded and isinstance(r.code_fingerprint, str)
                    and r.code_fingerprint):
                recorded.add(r.trial_id)
                task = getattr(r, "task", None)
                by, here = (r.code_fingerprint, r.torch_version), now(task, r)
                if by != here:
                    other.setdefault(task if isinstance(task, str) else "(task not recorded)", []).append((by, here))
    unknown = len(reused) - len(recorded)
    if not other and not unknown:
        return
    parts = []
    if other:
        said = "; ".join(
            f"{task}: " + " | ".join(sorted({f"code {code}, torch {version}" for (code, version), _ in pairs}))
            + " - now " + " | ".join(sorted({f"code {code}, torch {version}" for _, (code, version) in pairs}))
            for task, pairs in sorted(other.items()))
        count = sum(map(len, other.values()))
        parts.append(f"{count} {'was' if count == 1 else 'were'} made by other code or torch ({said})")
    if unknown:
        parts.append(f"{unknown} {'was' if unknown == 1 else 'were'} stored by an ablate that did not record its code")
    print(f"note: of the {len(reused)} reused trial(s), {' and '.join(parts)}: they are kept as stored, since a trial "
          f"is identified by its config. If a change since alters results, run them again with this code: {again}; "
          f"the trials table's code_fingerprint and torch_version columns say what made each", flush=True)
