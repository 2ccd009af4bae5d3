"""``ablate data download TASK``: fetch a task's canonical files, verify, unpack.

Thin on purpose: the URLs and checksums live with each task (``register_download``); this
module downloads to a temporary file, verifies the checksum before anything is unpacked or
moved into place, and refuses archives whose members would escape the data directory. A file
with mirrors is tried at each URL in turn until one gives the published checksum; an unpacked
archive leaves a marker (``.<archive>.unpacked``, the files it held) so that running the command
again does not fetch it again while those files are all in place. It needs the network: the test suite replaces ``urlopen`` with fakes.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shlex
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from ablate.config import ConfigError
from ablate.files import atomic_write_bytes
from ablate.tasks import DATA_DIR_ENV, DOWNLOADS, Download, list_tasks
from ablate.tasks.base import download_root


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or "data").expanduser()


class DownloadError(OSError):
    """A dataset could not be fetched, or what was fetched is not the published file (no network,
    a server error, a checksum mismatch, an unsafe archive): one line for the user, exit 2."""


def verify(path: Path, item: Download, *, fetched: bool = True,
           again: str = "ablate data download TASK --force") -> None:
    """Raise :class:`DownloadError` when the file's checksum differs from the published one
    (``fetched``: just downloaded; else a file already in the data directory, whose message names
    ``again``, the command that replaces it)."""
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
                                        f"{expected} (a modified or partial copy?): `{again}` replaces it, or "
                                        f"keep it and skip the download")
                raise DownloadError(f"{item.filename}: {algo} {h.hexdigest()} differs from the published {expected}; "
                                    f"the download is corrupt or the file changed upstream - nothing was unpacked")
            return


def _safe_members(names: list[str], dest: Path, data_dir_for: Callable[[Path], Path | None] | None = None) -> None:
    """``data_dir_for``: the --data-dir that fills the folder a link in ``dest`` points to as the link shows it
    (None: no --data-dir does)."""
    root = dest.resolve()
    for name in names:
        target = (dest / name).resolve()
        if not target.is_relative_to(root):
            inside = os.path.normpath(root / name)  # (the name alone, links on disk aside)
            if not os.path.isabs(name) and Path(inside).is_relative_to(root):
                # the archive's name is fine: a link already in the data directory leads out of it
                link = next((p for p in (dest / name).parents if p.is_symlink()), dest / name)
                # (the folder it points to is the data directory only where the download fills it as the link
                # shows it: named as the dataset folder - not data/wikitext-2 -> /big/wt2, data/imdb/aclImdb -> ...)
                other = data_dir_for(link) if data_dir_for is not None else None
                fix = (f"give --data-dir the folder it points to, {other} (or remove the link)" if other is not None else
                       f"remove the link and download again, then move the files to {link.resolve()} and link it again")
                raise DownloadError(f"refusing to unpack {name!r} through {link}, a link to {link.resolve()} "
                                    f"outside {dest}: {fix} - nothing was unpacked")
            raise DownloadError(f"refusing to unpack {name!r}: it would land outside {dest} - nothing was unpacked")


def unpack(archive: Path, dest: Path, data_dir_for: Callable[[Path], Path | None] | None = None,
           before_writing: Callable[[], None] | None = None) -> list[str]:
    """Unpack ``archive`` into ``dest``; returns the files it held (paths relative to ``dest``).
    ``before_writing``: called once every member has been checked, just before the first is written
    (an archive refused - :class:`DownloadError`, "nothing was unpacked" - never calls it)."""
    start = before_writing or (lambda: None)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            _safe_members(z.namelist(), dest, data_dir_for)
            start()
            z.extractall(dest)
            return [i.filename for i in z.infolist() if not i.is_dir()]
    if not hasattr(tarfile, "data_filter"):  # (PEP 706: Python 3.10.12+, 3.11.4+, 3.12+)
        raise DownloadError(f"cannot unpack {archive.name} safely: this Python ({sys.version.split()[0]}) lacks "
                            f"tarfile's extraction filters (Python 3.10.12+, 3.11.4+ or 3.12+ has them); upgrade "
                            f"Python, or unpack the archive into {dest} by hand - nothing was unpacked")
    with tarfile.open(archive) as t:
        members = t.getmembers()
        _safe_members([m.name for m in members], dest, data_dir_for)
        # links that point outside ``dest`` (or to an absolute path), device files: refused before anything
        # is unpacked, as the names are (tarfile's "data" filter would stop at the first, a FilterError -
        # not an OSError - with the members before it already unpacked)
        for m in members:
            try:
                tarfile.data_filter(m, str(dest))
            except tarfile.FilterError as exc:
                raise DownloadError(f"refusing to unpack {m.name!r}: {exc} - nothing was unpacked") from exc
        start()
        try:
            t.extractall(dest, members=members, filter="data")
        except tarfile.FilterError as exc:  # (a link through a link unpacked before it)
            raise DownloadError(f"refusing to unpack the rest of {archive.name}: {exc}") from exc
        return [m.name for m in members if m.isfile()]


def download(task: str, data_dir: str | os.PathLike | None = None, force: bool = False) -> list[Path]:
    """Download every file of ``task``'s real dataset into the data directory (or, when ``data_dir`` is
    the dataset's own folder, e.g. ``.../ETT-small``, into that folder); returns the paths.
    ``force``: fetch and verify every file again, over those in place (a damaged copy: a file
    present is otherwise trusted, an unpacked archive's files by name)."""
    if task not in DOWNLOADS:
        known = sorted(DOWNLOADS)
        raise ConfigError(f"no download is registered for task {task!r}; tasks with downloads: "
                         f"{', '.join(known) or '(none)'} (registered tasks: {', '.join(list_tasks())})")
    # (the dataset's own folder, .../ETT-small, which the loaders accept as data_dir: the files go into it,
    # not into a folder of that name below it, where a loader given the same directory would not look)
    root = download_root(task, default_data_dir(data_dir))
    # (the command that replaces a file in place that is not the published one: this task, this data directory)
    again = f"ablate data download {task} --data-dir {shlex.quote(str(default_data_dir(data_dir)))} --force"
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
            out.append(_download_one(item, root, dest, force, again))
        except BaseException:
            for d in created:  # innermost first; only if empty
                try:
                    d.rmdir()
                except OSError:
                    break
            raise
    return out


#: some hosts refuse urllib's default agent (``Python-urllib/3.x``) with 403 Forbidden
USER_AGENT = "Mozilla/5.0 (compatible; ablate-data-download)"


def unpacked_marker(item: Download, dest: Path) -> Path:
    """The file that records an archive as fetched, verified and unpacked into ``dest``: the
    files it held, one a line (what a later run checks are all still there)."""
    return dest / f".{item.filename}.unpacked"


def _still_unpacked(marker: Path, dest: Path) -> bool:
    """Whether every file the marker lists is in ``dest`` (a deleted folder, a lost file: fetch again)."""
    try:
        files = marker.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return all((dest / name).is_file() for name in files)  # (an archive of no files: nothing to miss)


def _download_one(item: Download, root: Path, dest: Path, force: bool = False,
                  again: str = "ablate data download TASK --force") -> Path:
    """``again``: the command that fetches ``item`` over a file in place that is not the published one."""
    final = dest / item.filename
    if final.exists() and not item.extract and not force:
        verify(final, item, fetched=False, again=again)
        return final
    marker = unpacked_marker(item, dest)
    if item.extract and marker.exists() and not force:  # (forced: the marker is rewritten once the files are)
        if _still_unpacked(marker, dest):
            print(f"{item.filename}: unpacked in {dest} already, every file in place (--force fetches it again, "
                  f"over damaged files)", flush=True)
            return dest
        print(f"{item.filename}: files it held are missing from {dest}: fetching it again", flush=True)
        marker.unlink()
    failures = []
    # (beside the file's place, not in ``root``: a dataset folder linked to another disk takes the file by a rename)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        tmp_file = Path(tmp) / item.filename
        for url in (item.url, *item.mirrors):
            print(f"downloading {url} ...", flush=True)
            try:
                _fetch(url, tmp_file)
                verify(tmp_file, item)
                break
            except WriteError:
                raise  # (this machine's disk: another source would fail the same way)
            except DownloadError as exc:
                failures.append((url, str(exc)))
        else:
            if len(failures) == 1:
                raise DownloadError(f"{failures[0][1]} (or copy the files into {dest} by hand)")
            tried = "; ".join(f"{url}: {why}" for url, why in failures)
            raise DownloadError(f"{item.filename}: none of its {len(failures)} sources gave the published file - "
                                f"{tried} (or copy the files into {dest} by hand)")
        if item.extract:
            # (a forced run's old record goes once the archive's members are checked, before the first is
            # written: an unpack that stops half way - a full disk, Ctrl-C - leaves cut files that the next run
            # must fetch again, not trust; an archive refused has written nothing, and the old files stand)
            def data_dir_for(link: Path) -> Path | None:  # (download() given the folder the link points to)
                target = link.resolve()
                other = (target.parent if target.name == item.dataset_folder else target) / item.subdir
                try:
                    return target if (other / link.relative_to(dest)).resolve() == target else None
                except ValueError:  # (a link above the data directory)
                    return None

            files = unpack(tmp_file, dest, data_dir_for, before_writing=lambda: marker.unlink(missing_ok=True))
            atomic_write_bytes(marker, "".join(f"{name}\n" for name in files).encode("utf-8"))
            return dest
        os.replace(tmp_file, final)
        return final


def _fetch(url: str, path: Path) -> None:
    """``url`` into ``path``; :class:`DownloadError` saying whether the server refused it (an
    HTTP status: the file moved, or the host blocks the client) or no connection was made."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            f = open(path, "wb")
            try:
                expected = _content_length(r)
                received = 0
                while chunk := r.read(1 << 20):
                    try:
                        f.write(chunk)
                    except OSError as exc:  # a full disk, a read-only folder: this machine, not the network
                        raise _LocalWriteError(exc) from exc
                    received += len(chunk)
            except BaseException:
                try:
                    f.close()
                except OSError:  # (what failed first is the one to tell)
                    pass
                raise
            try:  # (the buffer's last bytes - a small file's every byte - are written at close: a full disk shows here)
                f.close()
            except OSError as exc:
                raise _LocalWriteError(exc) from exc
        if expected is not None and received < expected:
            # (http.client returns a body cut off by a closed connection as if it were whole)
            raise DownloadError(f"cannot download {url}: the connection closed after {received:,} of its "
                                f"{expected:,} bytes; run the command again")
    except DownloadError:
        raise
    except _LocalWriteError as exc:
        cause = exc.__cause__
        raise WriteError(f"cannot write the download of {url} into {path.parent.parent}: "
                         f"{cause.strerror or cause}; free space or give --data-dir a folder you can "
                         f"write to") from cause
    except urllib.error.HTTPError as exc:  # (an OSError too: the server answered, so the network is there)
        raise DownloadError(f"cannot download {url}: the server answered HTTP {exc.code} {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, refused or cut connections
        raise DownloadError(f"cannot download {url}: {getattr(exc, 'reason', None) or exc}; this needs "
                            f"the network") from exc


class WriteError(DownloadError):
    """The download could not be written on this machine (a full disk): no other source is tried."""


class _LocalWriteError(Exception):
    """Writing the download failed on this machine (its cause: the OSError)."""


def _content_length(response) -> int | None:
    """The length the server announced (None: none, or one not to hold the body to)."""
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    if value is None or (headers.get("Content-Encoding") or "identity").lower() != "identity":
        return None
    try:
        return int(value)
    except ValueError:
        return None
