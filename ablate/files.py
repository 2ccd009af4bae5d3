"""Writing files so that a crash never leaves a half-written one in place."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Callable


def _new_temporary(path: Path) -> Path:
    """A new empty file ``.<name>.<random>.tmp`` beside ``path``, made as ``open()`` makes files: the
    kernel applies the umask and the folder's default ACL (``tempfile.mkstemp``'s are 0600, which made
    results shared with colleagues unreadable to them). ``<name>`` is cut short where the whole would
    pass the 255 bytes most file systems allow a name (a file named near that limit could be written,
    but not its temporary)."""
    name = path.name
    while len(os.fsencode(name)) > 255 - 14:  # (14: the two dots, 8 random hex digits and ".tmp")
        name = name[:-1]
    while True:
        tmp = path.parent / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` to fill a uniquely named temporary file in ``path``'s directory
    (``.<name>.<random>.tmp``), then rename it to ``path``: readers see the old file or the new one,
    never a part, concurrent writers do not share a temporary, and a failed write leaves no
    temporary behind. The file gets the permissions any new file in that folder gets. The data
    are handed to the disk before the rename, and the rename before the return (``fsync`` of the
    file, then of the folder; on macOS the drive may still cache them, and on Windows folders are
    not synced): a machine that crashes or loses power leaves the old file or the new one, not an
    empty one under the new name (a rename can reach the disk before the data it names). Where a
    file system cannot sync, the write goes on without it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path)
    try:
        write(str(tmp))
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name != "nt":  # (Windows opens no folder as a file)
        _fsync(path.parent)
    return path


#: what a file system that cannot sync (some network or virtual ones), or a file or folder that
#: cannot be opened for it, answers: the write goes on without the sync
_CANNOT_SYNC = frozenset(getattr(errno, name) for name in ("EINVAL", "ENOTSUP", "EOPNOTSUPP", "ENOSYS", "EBADF",
                                                           "EACCES", "EPERM", "EISDIR") if hasattr(errno, name))


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's data to the disk, where the file system can (EIO, lost data, is
    raised)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        if exc.errno in _CANNOT_SYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _CANNOT_SYNC:
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
