"""What made a stored trial besides its config: the code, torch, Python and the host.

A trial's identity is its config (:mod:`ablate.config`), which does not see code: a run reuses a
stored trial however the code changed since. So every trial's row records :func:`provenance`
(``code_fingerprint``: a hash of the installed ``ablate`` and ``metaadamw`` packages' Python
files, the same for every node and process that runs the same code; ``torch_version``,
``python_version``, ``host``: the node that ran it), and a run that reuses trials made by other
code says how many (:func:`note_other_code`), with the ``--rerun`` that runs them again.
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
    """The :func:`fingerprint` of :data:`PACKAGES` as this process imports them."""
    import importlib

    return fingerprint({name: Path(importlib.import_module(name).__file__).parent for name in PACKAGES})


def fingerprint(packages: dict[str, Path]) -> str:
    """12 hex digits of a SHA-256 over the ``.py`` files of the package folders ``packages`` (name
    -> folder): their paths inside the package and their bytes (caches and other files left out)."""
    digest = hashlib.sha256()
    for name, root in packages.items():
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            digest.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()[:12]


def provenance() -> dict[str, str]:
    """The columns a trial's row records about what ran it."""
    import torch

    return {"code_fingerprint": code_fingerprint(), "torch_version": torch.__version__,
            "python_version": platform.python_version(), "host": socket.gethostname()}


def note_other_code(stored, reused: set[str], rerun_hint: str) -> None:
    """Print how many of the ``reused`` stored trials (ids; ``stored``: the stored trials' rows)
    were made by other code than this process runs. Trials stored before ablate recorded its
    code are not counted. ``rerun_hint``: the command that runs a selection again, with
    ``--rerun`` left for the caller's choice to follow."""
    if stored.empty or "code_fingerprint" not in stored or not reused:
        return
    now = code_fingerprint()
    made_by = {r.trial_id: r.code_fingerprint for r in stored.itertuples()
               if r.trial_id in reused and isinstance(r.code_fingerprint, str) and r.code_fingerprint}
    other = sorted({code for code in made_by.values() if code != now})
    if not other:
        return
    count = sum(code != now for code in made_by.values())
    print(f"note: {count} of the {len(reused)} reused trial(s) were made by other code than this run's (another "
          f"version of ablate or metaadamw: code {', '.join(other)}, this run's {now}); they are kept as stored, "
          f"since a trial is identified by its config. If the change alters results, run them again with this code: "
          f"{rerun_hint} --rerun all (or --rerun TASK or ARM for some); the trials table's code_fingerprint column "
          f"says which code made each", flush=True)
