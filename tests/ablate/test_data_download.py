"""`ablate data download` without the network: every way a download goes wrong is one line with
exit 2, and leaves nothing half-written (urllib.request.urlopen is replaced by fakes)."""

from __future__ import annotations

import hashlib
import http.client
import io
import tarfile
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
    assert "ETTh1.csv exists but its sha256" in err and "move or delete it" in err
    assert "the download is corrupt" not in err  # (nothing was downloaded)


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
