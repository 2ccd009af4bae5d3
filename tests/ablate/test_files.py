"""ablate.files: atomic writes."""

from __future__ import annotations

import os

import pytest

from ablate import files


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "state.bin"
    assert files.atomic_write_bytes(path, b"first") == path
    files.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    path = tmp_path / "state.bin"
    files.atomic_write_bytes(path, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a file descriptor's file through /proc (Linux)")
def test_the_data_reach_the_disk_before_the_rename_and_the_rename_before_the_return(tmp_path, monkeypatch):
    # a crash after a rename whose data were still in the page cache can leave an empty file under
    # the new name: the file is fsync'ed (with its full contents) before os.replace, the folder after
    path, events = tmp_path / "state.bin", []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", os.path.basename(target),
                       None if os.path.isdir(target) else open(target, "rb").read()))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst), None))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.atomic_write_bytes(path, b"data")
    assert [(kind, data) for kind, _, data in events] == [("fsync", b"data"), ("replace", None), ("fsync", None)]
    assert events[0][1].startswith(".state.bin.") and events[2][1] == tmp_path.name


def test_a_file_system_that_cannot_fsync_still_gets_the_file_but_a_failing_disk_is_an_error(tmp_path, monkeypatch):
    import errno

    def refused(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refused)
    files.atomic_write_bytes(tmp_path / "a.bin", b"a")
    assert (tmp_path / "a.bin").read_bytes() == b"a"

    def lost(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", lost)
    with pytest.raises(OSError, match="Input/output"):
        files.atomic_write_bytes(tmp_path / "a.bin", b"b")
    assert (tmp_path / "a.bin").read_bytes() == b"a" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_a_folder_that_cannot_be_opened_for_its_sync_does_not_fail_a_write_that_happened(tmp_path, monkeypatch):
    # (a folder without read permission, or Windows, where no folder opens as a file): the file is in
    # place, so the write must not be reported as failed
    import errno

    real_open = os.open

    def open_(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_)
    files.atomic_write_bytes(tmp_path / "a.bin", b"new")
    assert (tmp_path / "a.bin").read_bytes() == b"new"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_the_umask_gives_new_files(tmp_path, umask):
    # tempfile.mkstemp makes 0600 files and the rename kept that: every result file, checkpoint and
    # table was unreadable to colleagues sharing the results directory
    import pandas as pd

    from ablate.results import atomic_write_parquet

    old = os.umask(umask)
    try:
        files.atomic_write_bytes(tmp_path / "a.json", b"{}")
        atomic_write_parquet(pd.DataFrame({"x": [1]}), tmp_path / "b.parquet")
        (tmp_path / "c.txt").write_text("plain")  # what open() gives
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.json": 0o666 & ~umask, "b.parquet": 0o666 & ~umask, "c.txt": 0o666 & ~umask}


@pytest.mark.parametrize("name", ["a" * 252 + ".pt", "é" * 125 + ".pt"])  # (255 and 253 bytes)
def test_a_file_named_near_the_name_limit_is_written(tmp_path, name):
    # its temporary, ".<name>.<random>.tmp", was 14 bytes longer than the name: File name too long
    path = tmp_path / name
    temporaries = []

    def write(tmp):
        temporaries.append(os.path.basename(tmp))
        with open(tmp, "wb") as f:
            f.write(b"data")

    assert files.atomic_write(path, write) == path
    assert path.read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    (temporary,) = temporaries
    assert temporary.startswith(".") and temporary.endswith(".tmp") and len(os.fsencode(temporary)) <= 255
