"""`ablate data download` without the network: every way a download goes wrong is one line with
exit 2, and leaves nothing half-written (urllib.request.urlopen is replaced by fakes)."""

from __future__ import annotations

import hashlib
import http.client
import io
import shlex
import tarfile
import urllib.error
import urllib.request

import pytest

from ablate import data
from ablate.cli import main
from ablate.tasks import Download


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _CutResponse(_Response):
    def read(self, *args):
        raise http.client.IncompleteRead(b"partial", 1000)


def _run(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("ablate: error: ") and "Traceback" not in err, (rc, err)
    return err


@pytest.mark.parametrize("response, expected", [
    (lambda: _Response(b"<html>not the file</html>"), "differs from the published"),
    (lambda: _CutResponse(b""), "IncompleteRead"),  # (an HTTPException, not an OSError)
])
def test_a_bad_or_cut_download_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, response, expected):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: response())
    err = _run(["data", "download", "etth1", "--data-dir", str(tmp_path / "d")], capsys)
    assert expected in err
    assert not (tmp_path / "d").exists()


def test_an_existing_modified_file_says_to_move_it(tmp_path, capsys):
    (tmp_path / "ETT-small").mkdir()
    (tmp_path / "ETT-small" / "ETTh1.csv").write_text("date,OT\n2016-07-01 00:00:00,1.0\n")
    err = _run(["data", "download", "etth1", "--data-dir", str(tmp_path)], capsys)
    assert "ETTh1.csv exists but its sha256" in err
    # the command that replaces it, with the task and the data directory (it said "rerun `ablate data download`
    # with --force", which without them fetches nothing, or into ./data)
    assert f"`ablate data download etth1 --data-dir {tmp_path} --force` replaces it" in err
    assert "the download is corrupt" not in err  # (nothing was downloaded)
    # a data_dir naming the dataset's own folder is named as given (the download finds its parent itself)
    err = _run(["data", "download", "etth1", "--data-dir", str(tmp_path / "ETT-small")], capsys)
    assert f"`ablate data download etth1 --data-dir {tmp_path / 'ETT-small'} --force` replaces it" in err


def test_force_replaces_a_damaged_file_in_place(tmp_path, monkeypatch, capsys):
    published = b"date,OT\n2016-07-01 00:00:00,1.0\n"
    item = Download(url="https://example.org/e.csv", filename="e.csv", sha256=hashlib.sha256(published).hexdigest(),
                    subdir="ETT-small")
    monkeypatch.setitem(data.DOWNLOADS, "etth1", [item])
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(published))
    (tmp_path / "ETT-small").mkdir()
    (tmp_path / "ETT-small" / "e.csv").write_bytes(published[:20])  # (cut off)
    err = _run(["data", "download", "etth1", "--data-dir", str(tmp_path)], capsys)
    command = err.split("`")[1]  # (the one the error names: it replaces the file)
    assert main(shlex.split(command)[1:]) == 0
    assert (tmp_path / "ETT-small" / "e.csv").read_bytes() == published


def test_a_data_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    err = _run(["data", "download", "etth1", "--data-dir", str(tmp_path / "afile")], capsys)
    assert "cannot create the data directory" in err and "give --data-dir a folder" in err


def test_an_archive_member_outside_the_data_dir_is_refused(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        t.addfile(info, io.BytesIO(b"evil"))
    blob = buf.getvalue()
    item = Download(url="https://example.org/a.tar.gz", filename="a.tar.gz", sha256=hashlib.sha256(blob).hexdigest(),
                    extract=True, subdir="x")
    monkeypatch.setitem(data.DOWNLOADS, "evil", [item])
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(blob))
    with pytest.raises(data.DownloadError, match="refusing to unpack '../evil.txt'"):
        data.download("evil", tmp_path / "d")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "d").exists()


def _archive(name: str, text: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo(name)
        info.size = len(text)
        t.addfile(info, io.BytesIO(text))
    return buf.getvalue()


def test_a_dead_url_falls_back_to_the_mirror_that_gives_the_published_file(tmp_path, monkeypatch, capsys):
    # WikiText's first home refuses downloads now: the next URL serves the file, which the checksum accepts
    blob = _archive("w/wiki.valid.tokens", b" = A = \n")
    item = Download(url="https://dead.example/a.tar.gz", mirrors=("https://wrong.example/a.tar.gz",
                                                                   "https://good.example/a.tar.gz"),
                    filename="a.tar.gz", md5=hashlib.md5(blob).hexdigest(), extract=True)
    asked = []

    def urlopen(request, timeout=None):
        asked.append((request.full_url, request.get_header("User-agent")))
        if "dead" in request.full_url:
            raise urllib.error.HTTPError(request.full_url, 403, "Forbidden", {}, None)
        return _Response(b"<html>a login page</html>" if "wrong" in request.full_url else blob)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setitem(data.DOWNLOADS, "w", [item])
    assert data.download("w", tmp_path) == [tmp_path]
    assert (tmp_path / "w" / "wiki.valid.tokens").read_bytes() == b" = A = \n"
    assert [url for url, _ in asked] == [item.url, *item.mirrors]
    assert all(agent == data.USER_AGENT for _, agent in asked)  # (not urllib's, which some hosts refuse)
    # the marker: a second run fetches nothing and says where the files are ...
    asked.clear()
    assert data.download("w", tmp_path) == [tmp_path] and asked == []
    assert "a.tar.gz: unpacked in" in capsys.readouterr().out
    # ... while they are all there: a deleted folder is fetched again (the fix the loaders' errors name)
    (tmp_path / "w" / "wiki.valid.tokens").unlink()
    assert data.download("w", tmp_path) == [tmp_path] and len(asked) == 3
    assert "a.tar.gz: files it held are missing from" in capsys.readouterr().out
    assert (tmp_path / "w" / "wiki.valid.tokens").read_bytes() == b" = A = \n"
    # a damaged file, every name in place: the marker trusts it, and --force (the loaders' errors name it)
    # fetches the archive again over it
    (tmp_path / "w" / "wiki.valid.tokens").write_bytes(b"\xff\xfe")
    asked.clear()
    assert data.download("w", tmp_path) == [tmp_path] and asked == []
    assert "--force fetches it again" in capsys.readouterr().out
    assert data.download("w", tmp_path, force=True) == [tmp_path] and len(asked) == 3
    assert (tmp_path / "w" / "wiki.valid.tokens").read_bytes() == b" = A = \n"
    # a forced fetch that fails (offline) leaves the record of the files in place as it was
    marker = data.unpacked_marker(item, tmp_path)
    recorded = marker.read_text()
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout=None: (_ for _ in ()).throw(
        urllib.error.URLError("offline")))
    with pytest.raises(data.DownloadError):
        data.download("w", tmp_path, force=True)
    assert marker.read_text() == recorded


def test_when_every_source_fails_the_error_names_each_and_what_it_answered(tmp_path, monkeypatch, capsys):
    item = Download(url="https://dead.example/a.zip", mirrors=("https://offline.example/a.zip",), filename="a.zip",
                    md5="0" * 32, extract=True, subdir="x")

    def urlopen(request, timeout=None):
        if "dead" in request.full_url:
            raise urllib.error.HTTPError(request.full_url, 403, "Forbidden", {}, None)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setitem(data.DOWNLOADS, "w", [item])
    with pytest.raises(data.DownloadError) as info:
        data.download("w", tmp_path / "d")
    assert str(info.value) == (
        "a.zip: none of its 2 sources gave the published file - https://dead.example/a.zip: cannot download "
        "https://dead.example/a.zip: the server answered HTTP 403 Forbidden; https://offline.example/a.zip: cannot "
        "download https://offline.example/a.zip: Name or service not known; this needs the network (or copy the "
        f"files into {tmp_path / 'd' / 'x'} by hand)")
    assert not (tmp_path / "d").exists()


def test_wikitext_is_fetched_from_its_authors_host_first():
    (item,) = data.DOWNLOADS["wikitext2"]
    assert item.url.startswith("https://wikitext.smerity.com/") and "research.metamind.io" in item.mirrors[0]


def test_a_data_dir_that_is_the_dataset_folder_is_filled_where_the_loader_looks(tmp_path, monkeypatch, capsys):
    # `--data-dir data/ETT-small`, as `ablate train` accepts it, wrote data/ETT-small/ETT-small/ETTh1.csv, which
    # `ablate train --data real --data-dir data/ETT-small` did not find
    published = b"date,OT\n2016-07-01 00:00:00,1.0\n"
    item = Download(url="https://example.org/ETTh1.csv", filename="ETTh1.csv",
                    sha256=hashlib.sha256(published).hexdigest(), subdir="ETT-small")
    monkeypatch.setitem(data.DOWNLOADS, "etth1", [item])
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(published))
    folder = tmp_path / "data" / "ETT-small"
    assert main(["data", "download", "etth1", "--data-dir", str(folder)]) == 0
    assert (folder / "ETTh1.csv").read_bytes() == published and not (folder / "ETT-small").exists()
    from ablate.tasks import get_task
    from tests.ablate.task_helpers import task_config
    assert get_task("etth1").locate(task_config("etth1", data="real", data_dir=str(folder))) == [folder / "ETTh1.csv"]


class _ShortResponse(_Response):
    """A body cut off by a closed connection: http.client returns what came as if it were all of it."""
    headers = {"Content-Length": "1000"}


def test_a_connection_closed_half_way_leaves_no_file_even_without_a_checksum(tmp_path, monkeypatch):
    item = Download(url="https://example.org/f.csv", filename="f.csv", subdir="x")  # (a plugin's: no checksum)
    monkeypatch.setitem(data.DOWNLOADS, "plug", [item])
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout=None: _ShortResponse(b"a" * 400))
    with pytest.raises(data.DownloadError, match="the connection closed after 400 of its 1,000 bytes"):
        data.download("plug", tmp_path / "d")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("linkname", ["/etc", "../../outside"])
def test_an_archive_link_out_of_the_data_dir_is_one_line_and_unpacks_nothing(tmp_path, monkeypatch, capsys, linkname):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("x/ok.txt")
        info.size = 2
        t.addfile(info, io.BytesIO(b"ok"))
        link = tarfile.TarInfo("x/link")
        link.type = tarfile.SYMTYPE
        link.linkname = linkname
        t.addfile(link)
    blob = buf.getvalue()
    item = Download(url="https://example.org/a.tar.gz", filename="a.tar.gz", sha256=hashlib.sha256(blob).hexdigest(),
                    extract=True)
    monkeypatch.setitem(data.DOWNLOADS, "etth1", [item])
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout=None: _Response(blob))
    err = _run(["data", "download", "etth1", "--data-dir", str(tmp_path / "d")], capsys)
    assert "refusing to unpack 'x/link'" in err and "nothing was unpacked" in err
    assert not (tmp_path / "d").exists()


class _FullDisk(io.RawIOBase):
    """A file on a full disk whose every write fails."""

    def writable(self):
        return True

    def write(self, b):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("written", ["at write", "at close"])
def test_a_full_disk_is_not_called_a_network_failure_nor_tried_at_each_mirror(tmp_path, monkeypatch, capsys, written):
    # at close: a small file's bytes stay in the file's buffer until close (NFS and quotas report at close too):
    # the ENOSPC came from close, outside the write's guard, and was called a network failure at every mirror
    import builtins

    published = b"date,OT\n"
    item = Download(url="https://example.org/e.csv", mirrors=("https://mirror.example/e.csv",), filename="e.csv",
                    sha256=hashlib.sha256(published).hexdigest())
    asked = []

    def urlopen(request, timeout=None):
        asked.append(request.full_url)
        return _Response(published)

    def full(mode):
        return _FullDisk() if written == "at write" else builtins.open("/dev/full", mode)

    monkeypatch.setitem(data.DOWNLOADS, "etth1", [item])
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(data, "open", lambda path, mode="r", *a, **k: full(mode) if "w" in mode
                        else builtins.open(path, mode, *a, **k), raising=False)
    err = _run(["data", "download", "etth1", "--data-dir", str(tmp_path / "d")], capsys)
    assert "No space left on device" in err and "free space" in err and "needs the network" not in err
    assert asked == [item.url]


def _serve(monkeypatch, item: Download, blob: bytes) -> list[str]:
    """Dataset "w" is ``item``, and every URL serves ``blob``; returns the URLs asked for, as they are asked."""
    asked = []

    def urlopen(request, timeout=None):
        asked.append(request.full_url)
        return _Response(blob)

    monkeypatch.setitem(data.DOWNLOADS, "w", [item])
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return asked


def test_a_forced_unpack_that_stops_half_way_is_fetched_again_not_trusted(tmp_path, monkeypatch, capsys):
    import errno
    from pathlib import Path

    blob = _archive("w/b.tokens", b"B" * 1000)
    item = Download(url="https://example.org/a.tar.gz", filename="a.tar.gz", md5=hashlib.md5(blob).hexdigest(),
                    extract=True)
    asked = _serve(monkeypatch, item, blob)
    data.download("w", tmp_path)
    real = tarfile.TarFile.extractall

    def cut(self, path, *args, **kwargs):  # the disk fills up while the file is written over
        (Path(path) / "w" / "b.tokens").write_bytes(b"B" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", cut)
    with pytest.raises(OSError):
        data.download("w", tmp_path, force=True)
    monkeypatch.setattr(tarfile.TarFile, "extractall", real)
    asked.clear()
    assert data.download("w", tmp_path) == [tmp_path] and asked == [item.url]
    assert (tmp_path / "w" / "b.tokens").read_bytes() == b"B" * 1000


def test_a_dataset_folder_linked_elsewhere_is_named_not_called_an_unsafe_archive(tmp_path, monkeypatch):
    import os
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("wikitext-2/wiki.valid.tokens", " = A = \n")
    blob = buf.getvalue()
    item = Download(url="https://example.org/a.zip", filename="a.zip", md5=hashlib.md5(blob).hexdigest(), extract=True,
                    folder="wikitext-2")
    monkeypatch.setitem(data.DOWNLOADS, "w", [item])
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout=None: _Response(blob))
    (tmp_path / "big" / "wikitext-2").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "big" / "wikitext-2", tmp_path / "data" / "wikitext-2")  # (the data on another disk)
    with pytest.raises(data.DownloadError) as info:
        data.download("w", tmp_path / "data")
    assert f"through {tmp_path / 'data' / 'wikitext-2'}, a link to {tmp_path / 'big' / 'wikitext-2'}" in str(info.value)
    assert "give --data-dir the folder it points to" in str(info.value)
    # ... which is then filled as it is
    assert data.download("w", tmp_path / "big" / "wikitext-2") == [tmp_path / "big"]
    assert (tmp_path / "data" / "wikitext-2" / "wiki.valid.tokens").read_bytes() == b" = A = \n"


def test_a_python_without_tarfile_filters_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    # Python 3.10.0-3.10.11 and 3.11.0-3.11.3 (pyproject allows >=3.10) have no tarfile.data_filter,
    # FilterError nor extractall(filter=): a .tar.gz download (cifar10, imdb) ended in an AttributeError
    blob = _archive("x/ok.txt", b"ok")
    item = Download(url="https://example.org/a.tar.gz", filename="a.tar.gz", sha256=hashlib.sha256(blob).hexdigest(),
                    extract=True)
    monkeypatch.setitem(data.DOWNLOADS, "etth1", [item])
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout=None: _Response(blob))
    monkeypatch.delattr(tarfile, "data_filter")
    monkeypatch.delattr(tarfile, "FilterError")
    err = _run(["data", "download", "etth1", "--data-dir", str(tmp_path / "d")], capsys)
    assert "lacks tarfile's extraction filters" in err and "nothing was unpacked" in err
    assert not (tmp_path / "d" / "x").exists()


@pytest.mark.parametrize("target, folder, subdir, top", [
    ("wt2", "wikitext-2", "", "wikitext-2"),  # linked to a folder of another name
    ("aclImdb", "", "imdb", "aclImdb"),  # imdb's layout: the archive's top folder below the task's subdir
])
def test_a_linked_folder_no_data_dir_fills_is_not_answered_with_a_data_dir(tmp_path, monkeypatch, target, folder,
                                                                            subdir, top):
    # "give --data-dir the folder it points to", followed, unpacked into <target>/<top>/ (or
    # <target>/imdb/aclImdb/), one folder below where the link - and so the loader - reads
    import os
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{top}/f.txt", "x")
    blob = buf.getvalue()
    item = Download(url="https://example.org/a.zip", filename="a.zip", md5=hashlib.md5(blob).hexdigest(), extract=True,
                    folder=folder, subdir=subdir)
    monkeypatch.setitem(data.DOWNLOADS, "w", [item])
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout=None: _Response(blob))
    (tmp_path / "big" / target).mkdir(parents=True)
    (tmp_path / "data" / subdir).mkdir(parents=True)
    os.symlink(tmp_path / "big" / target, tmp_path / "data" / subdir / top)
    with pytest.raises(data.DownloadError) as info:
        data.download("w", tmp_path / "data")
    assert "--data-dir" not in str(info.value) and "remove the link" in str(info.value)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_forced_download_whose_unpack_is_refused_keeps_the_record_of_the_files_in_place(tmp_path, monkeypatch, kind):
    # (the old files stand - nothing was unpacked -, so the next run must not fetch the archive again)
    import os
    import shutil
    import zipfile

    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("wikitext-2/wiki.valid.tokens", " = A = \n")
        blob = buf.getvalue()
    else:
        blob = _archive("wikitext-2/wiki.valid.tokens", b" = A = \n")
    item = Download(url="https://example.org/a", filename="a", md5=hashlib.md5(blob).hexdigest(), extract=True,
                    folder="wikitext-2")
    asked = _serve(monkeypatch, item, blob)
    d = tmp_path / "data"
    data.download("w", d)
    (tmp_path / "big").mkdir()  # the data moved to another disk and linked back: the loaders find them
    shutil.move(str(d / "wikitext-2"), tmp_path / "big" / "wikitext-2")
    os.symlink(tmp_path / "big" / "wikitext-2", d / "wikitext-2")
    with pytest.raises(data.DownloadError, match="nothing was unpacked"):
        data.download("w", d, force=True)
    assert data.unpacked_marker(item, d).exists()
    asked.clear()
    assert data.download("w", d) == [d] and asked == []
    assert (d / "wikitext-2" / "wiki.valid.tokens").read_bytes() == b" = A = \n"


def test_a_dataset_folder_linked_to_another_disk_gets_its_file(tmp_path, monkeypatch):
    # the file was fetched into a temporary folder in the data directory and renamed into the dataset's folder:
    # across a link to another disk the rename failed (EXDEV), a traceback, and the download was lost
    import errno
    import os

    published = b"date,OT\n2016-07-01 00:00:00,1.0\n"
    item = Download(url="https://example.org/e.csv", filename="e.csv", sha256=hashlib.sha256(published).hexdigest(),
                    subdir="ETT-small")
    monkeypatch.setitem(data.DOWNLOADS, "etth1", [item])
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(published))
    disk = tmp_path / "other disk"
    (disk / "ETT-small").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    os.symlink(disk / "ETT-small", tmp_path / "data" / "ETT-small")
    real = os.replace

    def replace(src, dst):  # ("other disk" is another file system: no rename into it or out of it)
        if os.path.realpath(src).startswith(str(disk)) != os.path.realpath(dst).startswith(str(disk)):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        real(src, dst)

    monkeypatch.setattr(data.os, "replace", replace)
    assert data.download("etth1", tmp_path / "data") == [tmp_path / "data" / "ETT-small" / "e.csv"]
    assert (disk / "ETT-small" / "e.csv").read_bytes() == published
    assert sorted(p.name for p in disk.rglob("*")) == ["ETT-small", "e.csv"]  # (no temporary left)


def test_ablate_data_without_a_command_names_the_commands(capsys):
    # argparse said "the following arguments are required: data_command", the name of its own attribute
    with pytest.raises(SystemExit) as exit_:
        main(["data"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "data_command" not in err
    assert "ablate data: error: say what to do with the datasets: download (`ablate data download TASK`" in err
