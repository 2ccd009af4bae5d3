"""``ablate data download TASK``: fetch a task's canonical files, verify, unpack.

Thin on purpose: the URLs and checksums live with each task (``register_download``); this
module downloads to a temporary file, verifies the checksum before anything is unpacked or
moved into place, and refuses archives whose members would escape the data directory.
It needs the network, so it is not exercised by the test suite beyond the offline parts.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from ablate.config import ConfigError
from ablate.tasks import DATA_DIR_ENV, DOWNLOADS, Download, list_tasks


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or "data").expanduser()


class DownloadError(OSError):
    """A dataset could not be fetched, or what was fetched is not the published file (no network,
    a server error, a checksum mismatch, an unsafe archive): one line for the user, exit 2."""


def verify(path: Path, item: Download, *, fetched: bool = True) -> None:
    """Raise :class:`DownloadError` when the file's checksum differs from the published one
    (``fetched``: just downloaded; else a file already in the data directory)."""
    for algo in ("sha256", "md5"):
        expected = getattr(item, algo)
        if expected:
            h = hashlib.new(algo)
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != expected.lower():
                if not fetched:
                    raise DownloadError(f"{path} exists but its {algo} {h.hexdigest()} differs from the published "
                                        f"{expected} (a modified or partial copy?): move or delete it and rerun "
                                        f"`ablate data download`, or keep it and skip the download")
                raise DownloadError(f"{item.filename}: {algo} {h.hexdigest()} differs from the published {expected}; "
                                    f"the download is corrupt or the file changed upstream - nothing was unpacked")
            return


def _safe_members(names: list[str], dest: Path) -> None:
    root = dest.resolve()
    for name in names:
        target = (dest / name).resolve()
        if root != target and root not in target.parents:
            raise DownloadError(f"refusing to unpack {name!r}: it would land outside {dest} - nothing was unpacked")


def unpack(archive: Path, dest: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            _safe_members(z.namelist(), dest)
            z.extractall(dest)
    else:
        with tarfile.open(archive) as t:
            _safe_members(t.getnames(), dest)
            t.extractall(dest, filter="data")


def download(task: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Download every file of ``task``'s real dataset into the data directory; returns the paths."""
    if task not in DOWNLOADS:
        known = sorted(DOWNLOADS)
        raise ConfigError(f"no download is registered for task {task!r}; tasks with downloads: "
                         f"{', '.join(known) or '(none)'} (registered tasks: {', '.join(list_tasks())})")
    root = default_data_dir(data_dir)
    out = []
    for item in DOWNLOADS[task]:
        dest = root / item.subdir
        created = [d for d in (dest, *dest.parents) if not d.exists()]  # removed again if nothing lands there
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file where a folder should be, no permission
            raise DownloadError(f"cannot create the data directory {dest}: {exc.strerror or exc}; give --data-dir "
                                f"a folder you can write to") from exc
        try:
            out.append(_download_one(item, root, dest))
        except BaseException:
            for d in created:  # innermost first; only if empty
                try:
                    d.rmdir()
                except OSError:
                    break
            raise
    return out


def _download_one(item: Download, root: Path, dest: Path) -> Path:
    final = dest / item.filename
    if final.exists() and not item.extract:
        verify(final, item, fetched=False)
        return final
    print(f"downloading {item.url} ...", flush=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp_file = Path(tmp) / item.filename
        try:
            with urllib.request.urlopen(item.url, timeout=60) as r, open(tmp_file, "wb") as f:
                shutil.copyfileobj(r, f)
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, refused or cut connections
            raise DownloadError(f"cannot download {item.url}: {getattr(exc, 'reason', None) or exc!r}; this needs "
                                f"the network (or copy the files into {dest} by hand)") from exc
        verify(tmp_file, item)
        if item.extract:
            unpack(tmp_file, dest)
            return dest
        os.replace(tmp_file, final)
        return final
