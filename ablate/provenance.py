"""What made a stored trial besides its config: the code, torch, Python and the host.

A trial's identity is its config (:mod:`ablate.config`), which does not see code: a run reuses a
stored trial however the code changed since. So the row of every trial that trains records
:func:`provenance` (``code_fingerprint``: a hash of the installed ``ablate`` and ``metaadamw``
packages' Python files, the same for every node and process that runs the same code;
``torch_version``, ``python_version``, ``hostname``: the node that ran it), and a run that reuses
trials made by other code or torch says how many (:func:`note_other_code`), with what runs them
again.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import socket
from pathlib import Path

#: the packages whose files make the code fingerprint
PACKAGES = ("metaadamw", "ablate")


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """The :func:`fingerprint` of :data:`PACKAGES` as this process imports them (computed once, at
    the first call: a trial makes it when it is built, before it trains)."""
    import importlib

    return fingerprint({name: Path(importlib.import_module(name).__file__).parent for name in PACKAGES})


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


def provenance() -> dict[str, str]:
    """The columns a trial's row records about what ran it (also in ``ablate.config.RESULT_COLUMNS``)."""
    import torch

    return {"code_fingerprint": code_fingerprint(), "torch_version": torch.__version__,
            "python_version": platform.python_version(), "hostname": socket.gethostname()}


def note_other_code(stored, reused: set[str], again: str) -> None:
    """Print how many of the ``reused`` stored trials (ids; ``stored``: the stored trials' rows)
    were made by other code or another torch than this process runs, and how many were stored
    without saying; ``again``: what runs them again."""
    if not reused:
        return
    import torch

    here = (code_fingerprint(), torch.__version__)
    made: dict[str, tuple[str, str]] = {}
    if {"code_fingerprint", "torch_version"} <= set(stored.columns):
        made = {r.trial_id: (r.code_fingerprint, r.torch_version) for r in stored.itertuples()
                if r.trial_id in reused and isinstance(r.code_fingerprint, str) and r.code_fingerprint}
    other = [by for by in made.values() if by != here]
    unknown = len(reused) - len(made)
    if not other and not unknown:
        return
    parts = []
    if other:
        kinds = " | ".join(sorted({f"code {code}, torch {version}" for code, version in other}))
        parts.append(f"{len(other)} {'was' if len(other) == 1 else 'were'} made by other code or torch ({kinds}; "
                     f"now: code {here[0]}, torch {here[1]})")
    if unknown:
        parts.append(f"{unknown} {'was' if unknown == 1 else 'were'} stored by an ablate that did not record its code")
    print(f"note: of the {len(reused)} reused trial(s), {' and '.join(parts)}: they are kept as stored, since a trial "
          f"is identified by its config. If a change since alters results, run them again with this code: {again}; "
          f"the trials table's code_fingerprint and torch_version columns say what made each", flush=True)
