"""What made a stored trial besides its config: the code, torch, Python and the host.

A trial's identity is its config (:mod:`ablate.config`), which does not see code: a run reuses a
stored trial however the code changed since. So the row of every trial that trains records
:func:`provenance` (``code_fingerprint``: a hash of the installed ``ablate`` and ``metaadamw``
packages' Python files and of a plugin task's own code, the same for every node and process that
runs the same code;
``torch_version``, ``python_version``, ``hostname``: the node that ran it), and a run that reuses
trials made by other code or torch says how many (:func:`note_other_code`), with what runs them
again.
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


def code_fingerprint(task: Any = None) -> str:
    """The :func:`fingerprint` of :data:`PACKAGES` as this process imports them and, for a ``task``
    (a :class:`~ablate.tasks.base.TaskSpec`) whose factory comes from outside them (a plugin next to
    the study file, a package registering tasks through an entry point), of that code too: the
    module file its factory is defined in or, for a package, the whole top-level package (its
    helpers included). Computed once per process for each, at the first call: a trial makes it when
    it is built, before it trains."""
    return _code_fingerprint(_task_code(task))


def _task_code(task: Any) -> tuple[str, str] | None:
    """(top-level module name, its file or package folder) of a task's factory from outside
    :data:`PACKAGES`; None for a built-in task, or one defined in the running script or
    interactively (``__main__``: each process has its own, a Ray worker Ray's)."""
    module = getattr(getattr(task, "factory", None), "__module__", None)
    top = module.split(".")[0] if isinstance(module, str) else None
    loaded = sys.modules.get(top) if top and top not in (*PACKAGES, "__main__") else None
    if loaded is None:
        return None
    file = getattr(loaded, "__file__", None)
    if file:
        path = Path(file)
        return top, str(path.parent if path.name == "__init__.py" else path)
    folders = list(getattr(loaded, "__path__", []))  # a namespace package: its (first) folder
    return (top, str(folders[0])) if folders else None


@functools.lru_cache(maxsize=None)
def _code_fingerprint(task_code: tuple[str, str] | None) -> str:
    import importlib

    sources = {name: Path(importlib.import_module(name).__file__).parent for name in PACKAGES}
    if task_code is not None:
        sources[task_code[0]] = Path(task_code[1])
    return fingerprint(sources)


def fingerprint(packages: dict[str, Path]) -> str:
    """12 hex digits of a SHA-256 over the ``.py`` files of the package folders ``packages`` (name
    -> folder, or the file of a single-module plugin): their paths inside the package and their
    bytes. Caches, hidden files and folders (an editor's lock files, ``.ipynb_checkpoints``) and
    anything that is not a regular file, or vanishes before it is read, are left out (as are the
    files of a symlinked folder, which ``rglob`` does not enter)."""
    digest = hashlib.sha256()
    for name, root in packages.items():
        single = root.suffix == ".py" and root.is_file()
        for path in [root] if single else sorted(root.rglob("*.py")):
            inside = Path(root.name) if single else path.relative_to(root)
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


def provenance(task: Any = None) -> dict[str, str]:
    """The columns a trial's row records about what ran it (also in ``ablate.config.RESULT_COLUMNS``);
    ``task``: the trial's :class:`~ablate.tasks.base.TaskSpec` (see :func:`code_fingerprint`)."""
    import torch

    return {"code_fingerprint": code_fingerprint(task), "torch_version": torch.__version__,
            "python_version": platform.python_version(), "hostname": socket.gethostname()}


def note_other_code(stored, reused: set[str], again: str) -> None:
    """Print how many of the ``reused`` stored trials (ids; ``stored``: the stored trials' rows)
    were made by other code (of ablate, metaadamw or their task's plugin) or another torch than
    this process runs, and how many were stored without saying; ``again``: what runs them again."""
    if not reused:
        return
    import torch

    from ablate.tasks import TASKS

    def now(task: Any) -> tuple[str, str]:
        return code_fingerprint(TASKS.get(task) if isinstance(task, str) and task in TASKS else None), torch.__version__

    made: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {}  # trial id -> (what made it, what runs it now)
    if {"code_fingerprint", "torch_version"} <= set(stored.columns):
        made = {r.trial_id: ((r.code_fingerprint, r.torch_version), now(getattr(r, "task", None)))
                for r in stored.itertuples()
                if r.trial_id in reused and isinstance(r.code_fingerprint, str) and r.code_fingerprint}
    other = [(by, here) for by, here in made.values() if by != here]
    unknown = len(reused) - len(made)
    if not other and not unknown:
        return
    parts = []
    if other:
        kinds = " | ".join(sorted({f"code {code}, torch {version}" for (code, version), _ in other}))
        heres = " | ".join(sorted({f"code {code}, torch {version}" for _, (code, version) in other}))
        parts.append(f"{len(other)} {'was' if len(other) == 1 else 'were'} made by other code or torch ({kinds}; "
                     f"now: {heres})")
    if unknown:
        parts.append(f"{unknown} {'was' if unknown == 1 else 'were'} stored by an ablate that did not record its code")
    print(f"note: of the {len(reused)} reused trial(s), {' and '.join(parts)}: they are kept as stored, since a trial "
          f"is identified by its config. If a change since alters results, run them again with this code: {again}; "
          f"the trials table's code_fingerprint and torch_version columns say what made each", flush=True)
