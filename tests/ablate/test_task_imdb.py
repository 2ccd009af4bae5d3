"""imdb: the aclImdb tree and CSV files, the stratified split, generated reviews, the BiLSTM
classifier, metrics and second-order gradients."""

import functools
import math
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from ablate.tasks import DOWNLOADS, DataWarning, DatasetNotFoundError, get_task
from ablate.tasks.imdb import clean, generate_reviews, read_csv, stratified_split
from ablate.tasks.models_text import BiLSTMClassifier, reverse_padded
from ablate.tasks.text import PAD_ID, UNK_ID, Vocab, tokenize
from tests.ablate.task_helpers import SHARED_DATA, assert_second_order_gradients, task_config, train_with_adamw

#: The resolved trial config of this task with the given overrides.
make_config = functools.partial(task_config, "imdb")

TINY = dict(embed_dim=8, hidden_size=8, num_layers=2)

TREE = {
    ("train", "pos"): ["Great film!<br /><br />Loved it.", "A good movie.", "Superb acting.", "Nice.", "Fun, fun."],
    ("train", "neg"): ["Awful.<br/>Boring plot.", "Bad movie.", "Terrible acting.", "Dull.", "Not fun."],
    ("test", "pos"): ["Wonderful zebra!", "Good."],
    ("test", "neg"): ["Awful zebra.", "Bad."],
}


#: what the data source of :data:`TREE` notes (the published tree has 12,500 reviews in each folder)
TINY_TREE_NOTE = ("(not the published tree: train/pos 5 reviews, train/neg 5 reviews, test/pos 2 reviews, test/neg 2 "
                  "reviews where each folder has 12,500)")


def write_tree(root: Path) -> Path:
    tree = root / "aclImdb"
    for (split, label), texts in TREE.items():
        folder = tree / split / label
        folder.mkdir(parents=True)
        for i, text in enumerate(texts):
            (folder / f"{i}_{7 + i}.txt").write_text(text, encoding="utf-8")
    (tree / "train" / "unsup").mkdir()
    (tree / "train" / "unsup" / "0_0.txt").write_text("unlabelled", encoding="utf-8")
    return tree


def test_registration():
    spec = get_task("imdb")
    assert [(m.name, m.mode) for m in spec.metrics] == [("accuracy", "max"), ("loss", "min")]
    d = spec.defaults
    assert (d["batch_size"], d["epochs"], d["meta_every"], d["modulator_layers"], d["modulator_ff"]) == (64, 15, 39, 64, 64)
    assert (d["modulator_heads"], d["features"], d["gating"], d["priorities"]) == (11, "basic_plus", True, [1.0, 3.0, 5.0])
    assert (d["embed_dim"], d["hidden_size"], d["num_layers"], d["vocab_size"], d["max_len"]) == (32, 64, 2, 25000, 256)
    (download,) = DOWNLOADS["imdb"]
    assert download.filename == "aclImdb_v1.tar.gz" and download.md5 == "7c2ac02c03563afcf9b574c7e56c153a"


def test_clean_strips_line_breaks():
    assert clean("a<br /><br />b<BR>c<br/>d") == "a  b c d"


def test_stratified_split_is_deterministic_and_balanced():
    reviews = [(f"r{i}", int(i < 30)) for i in range(100)]  # 30 positive, 70 negative
    train, val = stratified_split(reviews, 0.2, seed=3)
    assert len(val) == 20 and sum(y for _, y in val) == 6  # 20 % of each label
    assert sorted(train + val) == sorted(reviews)
    assert stratified_split(reviews, 0.2, seed=3) == (train, val)
    assert stratified_split(reviews, 0.2, seed=4)[1] != val
    assert [r for r in reviews if r in val] == val  # original order kept


def encode_row(vocab: Vocab, text: str, max_len: int) -> list[int]:
    ids = vocab.encode(tokenize(clean(text))[:max_len])
    return ids + [PAD_ID] * (max_len - len(ids))


def test_acl_tree_parsed_with_train_only_vocab(tmp_path):
    write_tree(tmp_path / "imdb")
    config = make_config(data="real", data_dir=str(tmp_path), max_len=4, split_seed=5, **TINY)
    with pytest.warns(UserWarning, match="not the published tree"):  # (a tiny tree)
        task = get_task("imdb").build(config)
    assert task.info["reviews"] == {"train": 8, "val": 2, "test": 4}
    assert task.data_source == f"real:{tmp_path / 'imdb' / 'aclImdb'} {TINY_TREE_NOTE}"
    # files in sorted order, pos (label 1) before neg (label 0); 20 % of each label to validation
    labelled = [(clean(t), 1) for t in TREE["train", "pos"]] + [(clean(t), 0) for t in TREE["train", "neg"]]
    train, val = stratified_split(labelled, 0.2, seed=5)
    vocab = Vocab.build([tokenize(text) for text, _ in train])
    assert task.info["vocab_size"] == len(vocab)
    assert task.train.ids.tolist() == [encode_row(vocab, text, 4) for text, _ in train]
    assert task.train.labels.tolist() == [y for _, y in train]
    assert task.val.ids.tolist() == [encode_row(vocab, text, 4) for text, _ in val]
    assert sorted(task.val.labels.tolist()) == [0, 1]
    # words seen only outside the training part are unknown
    train_words = {tok for text, _ in train for tok in tokenize(text)}
    for text, _ in val:
        assert [vocab[t] == UNK_ID for t in tokenize(text)] == [t not in train_words for t in tokenize(text)]
    assert task.test.labels.tolist() == [1, 1, 0, 0]
    assert task.test.ids[0].tolist()[1] == UNK_ID  # "zebra" never occurs in training
    assert task.test.ids[1].tolist()[2:] == [PAD_ID, PAD_ID]  # "good ." padded to max_len
    # the majority class of the (balanced) training part decides ties for positive
    assert task.reference == {"majority_accuracy": 0.5, "test_majority_accuracy": 0.5}  # (on the test tree too)


def test_data_dir_may_name_the_tree_itself(tmp_path):
    tree = write_tree(tmp_path)
    with pytest.warns(UserWarning, match="not the published tree"):
        task = get_task("imdb").build(make_config(data="real", data_dir=str(tree), **TINY))
    assert task.data_source == f"real:{tree} {TINY_TREE_NOTE}"


def test_a_tree_of_other_sizes_than_the_published_one_is_warned_about_and_recorded(tmp_path, monkeypatch):
    # a copy cut short or a subset used to train and score without a word, on other data
    import ablate.tasks.imdb as imdb

    tree = write_tree(tmp_path / "imdb")
    config = make_config(data="real", data_dir=str(tmp_path), **TINY)
    with pytest.warns(DataWarning, match=rf"imdb: {tree} is not the published tree: train/pos 5 reviews, train/neg 5 "
                                         rf"reviews, test/pos 2 reviews, test/neg 2 reviews where each folder has 12,500 "
                                         rf"- accuracies not comparable .*`ablate data download imdb --data-dir "
                                         rf"{tmp_path} --force`"):
        assert get_task("imdb").build(config).data_source == f"real:{tree} {TINY_TREE_NOTE}"
    for f in sorted((tree / "train" / "pos").iterdir())[2:]:  # train/pos: 2 reviews; the unsup folder is not counted
        f.unlink()
    for f in sorted((tree / "train" / "neg").iterdir())[2:]:
        f.unlink()
    monkeypatch.setattr(imdb, "PUBLISHED_PER_FOLDER", 2)  # the published sizes: no warning, the plain source
    monkeypatch.setattr(imdb, "VAL_FRACTION", 0.5)  # (20 % of 2 training reviews a label, rounded, validates none)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_task("imdb").build(config).data_source == f"real:{tree}"
    (tree / "test" / "neg" / "0_7.txt").unlink()
    with pytest.warns(DataWarning, match="not the published tree: test/neg 1 reviews where each folder has 2 "):
        assert get_task("imdb").build(config).data_source == (
            f"real:{tree} (not the published tree: test/neg 1 reviews where each folder has 2)")


def test_a_tree_with_more_reviews_than_the_published_one_is_moved_aside_before_the_download_advised(
        tmp_path, monkeypatch):
    # the warning said the forced download "fetches the published one, read in its place", but it unpacks into
    # data_dir/imdb/aclImdb, over this very tree: a review file beyond the archive's stays, and the warning with it
    import hashlib
    import io
    import shlex
    import shutil
    import tarfile
    import urllib.request

    import ablate.tasks.imdb as imdb
    from ablate import data
    from ablate.cli import main
    from ablate.tasks import Download

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:  # the published tree: 2 reviews in each folder
        for (split, label), texts in TREE.items():
            for i, text in enumerate(texts[:2]):
                info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_{7 + i}.txt")
                info.size = len(text.encode())
                archive.addfile(info, io.BytesIO(text.encode()))
    published = buffer.getvalue()
    monkeypatch.setitem(data.DOWNLOADS, "imdb", [Download(url="https://example.org/a.tar.gz", filename=
                        "aclImdb_v1.tar.gz", md5=hashlib.md5(published).hexdigest(), extract=True, subdir="imdb")])
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Response(published))
    monkeypatch.setattr(imdb, "PUBLISHED_PER_FOLDER", 2)
    monkeypatch.setattr(imdb, "VAL_FRACTION", 0.5)  # (20 % of 2 training reviews a label, rounded, validates none)
    tree = write_tree(tmp_path / "imdb")  # (5, 5, 2, 2 reviews: the first two of each folder the archive's)
    for f in sorted((tree / "train" / "neg").iterdir())[2:]:
        f.unlink()
    for f in sorted((tree / "train" / "pos").iterdir())[3:]:
        f.unlink()  # train/pos: one review more than the published folder
    config = make_config(data="real", data_dir=str(tmp_path), **TINY)
    with pytest.warns(DataWarning) as caught:
        get_task("imdb").build(config)
    (said,) = [str(w.message) for w in caught if "not the published tree" in str(w.message)]
    assert said.endswith(f"(move {tree} aside, then `ablate data download imdb --data-dir {tmp_path} --force` "
                         f"fetches the published one, read in its place)"), said
    command = shlex.split(said.split("`")[1])[1:]
    assert main(command) == 0  # (not moved: the published tree is unpacked over it, and the extra review stays)
    with pytest.warns(DataWarning, match="train/pos 3 reviews where each folder has 2"):
        get_task("imdb").build(config)
    shutil.move(tree, tmp_path / "mine")
    assert main(command) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_task("imdb").build(config).data_source == f"real:{tree}"
    # a tree beside the one the download makes (data_dir/aclImdb): that one is read in its place, nothing to move
    shutil.rmtree(tmp_path / "imdb")
    shutil.move(tmp_path / "mine", tmp_path / "aclImdb")
    with pytest.warns(DataWarning) as caught:
        get_task("imdb").build(config)
    (said,) = [str(w.message) for w in caught if "not the published tree" in str(w.message)]
    assert "aside" not in said and said.endswith(f"(`ablate data download imdb --data-dir {tmp_path} --force` "
                                                 f"fetches the published one, read in its place)")


def test_missing_tree_names_the_expected_folders(tmp_path):
    tree = write_tree(tmp_path / "imdb")
    for f in (tree / "test" / "neg").iterdir():
        f.unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        get_task("imdb").build(make_config(data="real", data_dir=str(tmp_path), **TINY))
    msg = str(info.value)
    for split in ("train", "test"):
        for label in ("pos", "neg"):
            assert str(tree / split / label / "*.txt") in msg
    assert "ablate data download imdb" in msg and "csv_file" in msg


def test_a_tree_too_small_for_a_validation_split_names_its_folders_and_the_fix(tmp_path):
    # 2 reviews in each training folder: 20 % of 2, rounded, is none - an empty validation set, which the
    # trial's DataLoader refused with a bare "num_samples should be a positive integer value" (a CSV said why)
    tree = write_tree(tmp_path / "imdb")
    for label in ("pos", "neg"):
        for f in sorted((tree / "train" / label).iterdir())[2:]:
            f.unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        get_task("imdb").build(make_config(data="real", data_dir=str(tmp_path), **TINY))
    msg = str(info.value)
    assert f"{tree / 'train'} holds too few reviews for a validation split" in msg
    assert "give at least 3 reviews in train/pos and train/neg" in msg
    assert f"`ablate data download imdb --data-dir {tmp_path} --force`" in msg


def test_the_tree_beside_an_imdb_folder_is_found(tmp_path):
    # data_dir holding imdb/ (a CSV, say) and aclImdb/ side by side: only imdb/aclImdb was searched
    (tmp_path / "imdb").mkdir()
    (tmp_path / "imdb" / "reviews.csv").write_text("label,text\n1,good\n", encoding="utf-8")
    tree = write_tree(tmp_path)
    with pytest.warns(UserWarning, match="not the published tree"):
        task = get_task("imdb").build(make_config(data="real", data_dir=str(tmp_path), **TINY))
    assert task.data_source == f"real:{tree} {TINY_TREE_NOTE}" and task.info["reviews"]["test"] == 4
    assert get_task("imdb").locate(make_config(data="real", data_dir=str(tmp_path), **TINY))[0].folder.parent.parent == tree
    for f in (tree / "train" / "pos").iterdir():
        f.unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        get_task("imdb").build(make_config(data="real", data_dir=str(tmp_path), **TINY))
    msg = str(info.value)  # the tree the user began, and both places looked in
    assert f"no review files {tree / 'train' / 'pos'}/*.txt" in msg
    assert f"looked in {tmp_path / 'imdb' / 'aclImdb'} and {tree}" in msg


def test_without_a_tree_the_error_names_the_csv_files_the_data_directory_holds(tmp_path):
    # a folder of IMDB CSV exports (as ../shared/data/imdb) and csv_file unset: the error only named the tree
    (tmp_path / "imdb").mkdir()
    (tmp_path / "imdb" / "reviews.csv").write_text("label,text\n1,good\n", encoding="utf-8")
    (tmp_path / "more.csv").write_text("label,text\n0,bad\n", encoding="utf-8")
    with pytest.raises(DatasetNotFoundError) as info:
        get_task("imdb").build(make_config(data="real", data_dir=str(tmp_path), **TINY))
    assert (f"the data directory holds the CSV file(s) {tmp_path / 'imdb' / 'reviews.csv'}, {tmp_path / 'more.csv'}: "
            f"pass csv_file=NAME (e.g. csv_file=reviews.csv) to read one instead of the aclImdb tree") in str(info.value)
    # another dataset's CSV in a shared data directory (ETTh1.csv) is no CSV of reviews: not suggested
    (tmp_path / "ETTh1.csv").write_text("date,HUFL,OT\n2016-07-01 00:00:00,5.8,30.5\n", encoding="utf-8")
    with pytest.raises(DatasetNotFoundError) as info:
        get_task("imdb").build(make_config(data="real", data_dir=str(tmp_path), **TINY))
    assert "ETTh1.csv" not in str(info.value) and "e.g. csv_file=reviews.csv)" in str(info.value)
    (tmp_path / "imdb" / "reviews.csv").unlink()
    (tmp_path / "more.csv").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        get_task("imdb").build(make_config(data="real", data_dir=str(tmp_path), **TINY))
    assert "holds the CSV" not in str(info.value)


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_the_data_fingerprint_counts_the_review_files_only(tmp_path):
    # a README, a subfolder or another format in a class folder counted (every file below the folder): each
    # changed every trial's fingerprint and marked stored results stale though the task reads only */*.txt
    import hashlib
    import os

    from ablate.tasks import data_fingerprint

    tree = write_tree(tmp_path / "imdb")
    spec, config = get_task("imdb"), make_config(data="real", data_dir=str(tmp_path), **TINY)
    lines = []  # (folder name, count, total size of its *.txt: what a canonical tree's fingerprint always was)
    for split, label in sorted(TREE, key=lambda key: key[1]):
        texts = TREE[(split, label)]
        lines.append(f"{label}\0{len(texts)}\0{sum(len(t.encode()) for t in texts)}\n")
    expected = hashlib.sha256("".join(lines).encode()).hexdigest()[:16]
    assert data_fingerprint(spec, config) == expected
    (tree / "train" / "pos" / "README").write_text("where these came from", encoding="utf-8")
    (tree / "train" / "pos" / "0_7.json").write_text('{"text": "Great film!"}', encoding="utf-8")
    (tree / "test" / "neg" / "old").mkdir()
    (tree / "test" / "neg" / "old" / "9_1.txt").write_text("an older copy", encoding="utf-8")
    (tree / "train" / "neg.tar.gz").write_bytes(b"x" * 100)
    (tmp_path / "imdb" / "reviews.csv").write_text("label,text\n1,good\n", encoding="utf-8")
    assert data_fingerprint(spec, config) == expected
    (tree / "test" / "neg" / "9_1.txt").write_text("A new review.", encoding="utf-8")  # one the task reads
    added = data_fingerprint(spec, config)
    assert added != expected
    # a class folder on another disk, linked in: its review files count, and a change there shows
    os.rename(tree / "train" / "neg", tmp_path / "neg_elsewhere")
    os.symlink(tmp_path / "neg_elsewhere", tree / "train" / "neg")
    assert data_fingerprint(spec, config) == added
    (tmp_path / "neg_elsewhere" / "0_7.txt").write_text("Awful, awful.", encoding="utf-8")
    assert data_fingerprint(spec, config) != added
    # the same tree's CSV, named by csv_file: the CSV alone
    with_csv = make_config(data="real", data_dir=str(tmp_path), csv_file="reviews.csv", **TINY)
    size = (tmp_path / "imdb" / "reviews.csv").stat().st_size
    assert data_fingerprint(spec, with_csv) == hashlib.sha256(f"reviews.csv\0{1}\0{size}\n".encode()).hexdigest()[:16]


CSV = """id,label,text
1,1,"Great film!<br /><br />Loved it, truly."
2,0,"Bad, ""very"" bad.
Two lines."
3,1,Good.
4,0,Awful.
5,1,Nice.
6,0,Dull.
7,1,Fun.
8,0,Boring.
9,1,Superb.
10,0,Weak.
"""


def test_csv_split_80_20_stratified_by_split_seed(tmp_path, monkeypatch):
    (tmp_path / "imdb").mkdir()
    path = tmp_path / "imdb" / "reviews.csv"
    path.write_text(CSV, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # a relative data_dir: the source recorded with the results is absolute
    config = make_config(data="real", data_dir=".", csv_file="reviews.csv", max_len=6, **TINY)
    task = get_task("imdb").build(config)
    assert task.test is None and task.data_source == f"real:{path.resolve()}"
    assert task.info["reviews"] == {"train": 8, "val": 2}
    assert sorted(task.val.labels.tolist()) == [0, 1]
    # an absolute csv_file needs no data directory; the same seed gives the same split
    again = get_task("imdb").build(make_config(data="real", csv_file=str(path), max_len=6, **TINY))
    assert torch.equal(again.val.ids, task.val.ids) and torch.equal(again.train.ids, task.train.ids)
    reviews = [
        ("Great film!  Loved it, truly.", 1), ('Bad, "very" bad.\nTwo lines.', 0), ("Good.", 1), ("Awful.", 0),
        ("Nice.", 1), ("Dull.", 0), ("Fun.", 1), ("Boring.", 0), ("Superb.", 1), ("Weak.", 0),
    ]
    train, val = stratified_split(reviews, 0.2, seed=config["split_seed"])
    vocab = Vocab.build([tokenize(text) for text, _ in train])
    assert task.val.ids.tolist() == [encode_row(vocab, text, 6) for text, _ in val]
    assert [y for _, y in train] == task.train.labels.tolist()
    # "<br />" became a space; the quoted two-line field is one review
    assert read_csv(path) == reviews
    other = get_task("imdb").build(make_config(data="real", csv_file=str(path), split_seed=2, max_len=6, **TINY))
    assert other.info["reviews"] == {"train": 8, "val": 2}
    train1, _ = stratified_split(reviews, 0.2, seed=2)
    assert train1 != train
    vocab1 = Vocab.build([tokenize(text) for text, _ in train1])
    assert other.train.ids.tolist() == [encode_row(vocab1, text, 6) for text, _ in train1]


def test_a_relative_csv_file_is_found_below_the_data_directory_or_its_imdb_folder(tmp_path):
    # csv_file "imdb/reviews.csv" with data_dir holding imdb/: it was looked for in data_dir/imdb/imdb/
    (tmp_path / "imdb").mkdir()
    path = tmp_path / "imdb" / "reviews.csv"
    path.write_text(CSV, encoding="utf-8")
    for csv_file in ("imdb/reviews.csv", "reviews.csv"):
        task = get_task("imdb").build(make_config(data="real", data_dir=str(tmp_path), csv_file=csv_file, **TINY))
        assert task.data_source == f"real:{path}" and task.info["reviews"] == {"train": 8, "val": 2}
    with pytest.raises(DatasetNotFoundError) as info:
        get_task("imdb").build(make_config(data="real", data_dir=str(tmp_path), csv_file="other.csv", **TINY))
    assert f"csv_file {tmp_path / 'imdb' / 'other.csv'} or {tmp_path / 'other.csv'} does not exist" in str(info.value)


def test_bad_csv_files(tmp_path):
    path = tmp_path / "bad.csv"
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        get_task("imdb").build(make_config(data="real", csv_file=str(path), **TINY))
    path.write_text("id,review_text,stars\n1,Good,5\n", encoding="utf-8")
    with pytest.raises(DatasetNotFoundError, match="text column"):
        get_task("imdb").build(make_config(data="real", csv_file=str(path), **TINY))
    path.write_text("sentiment,review\npositive,Good\nmaybe,Hm\n", encoding="utf-8")
    with pytest.raises(DatasetNotFoundError, match="line 3: label 'maybe'"):
        get_task("imdb").build(make_config(data="real", csv_file=str(path), **TINY))
    path.write_text("label,text\n1,good film\n1,great film\n0,bad film\n0,awful film\n", encoding="utf-8")
    with pytest.raises(DatasetNotFoundError, match="too few reviews for a validation split.*at least 3 reviews of each"):
        get_task("imdb").build(make_config(data="real", csv_file=str(path), **TINY))  # (was ZeroDivisionError)


def test_csv_errors_advise_on_the_csv_file(tmp_path):
    # `ablate data download imdb` fetches the aclImdb tree, not a CSV: it is not the fix for a bad csv_file
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DatasetNotFoundError, match="has a header but no reviews") as info:
        get_task("imdb").build(make_config(data="real", csv_file=str(path), **TINY))
    assert "Fix the file or the csv_file path" in str(info.value) and "Obtain them with" not in str(info.value)
    path.write_text("id,stars\n", encoding="utf-8")
    with pytest.raises(DatasetNotFoundError, match=r"found columns \['id', 'stars'\]"):
        read_csv(path)


def test_a_broken_csv_is_an_error_not_fewer_or_merged_reviews():
    good = 'label,text\n1,"a fine\nfilm, really"\n\n0,"dull, long"\n1,ok\n'
    assert read_csv_text(good) == [(clean("a fine\nfilm, really"), 1), ("dull, long", 0), ("ok", 1)]  # (blank skipped)
    # cut off inside a review (a copy that stopped early): it was accepted cut off, with the reviews before it
    with pytest.raises(DatasetNotFoundError, match=r"cannot read .*r\.csv as a UTF-8 CSV file \(line 7\): "
                                                   r"unexpected end of data"):
        read_csv_text(good + '0,"the last review, cut')
    # a stray quote inside a quoted field: two reviews became one
    with pytest.raises(DatasetNotFoundError, match=r"\(line 2\): ',' expected after '\"'"):
        read_csv_text('label,text\n1,"great "film" indeed"\n0,bad\n')
    with pytest.raises(DatasetNotFoundError, match=r"r\.csv line 3: 3 field\(s\) where the header has 2 \(a comma or quote"):
        read_csv_text("label,text\n1,fine\n0,bad, really bad\n")
    with pytest.raises(DatasetNotFoundError, match=r"line 4: 1 field\(s\) where the header has 2"):
        read_csv_text('label,text\n1,"two\nlines"\n0\n')
    # a review over lines 3-5: a bad label names its first line, a stray quote the line it is on
    with pytest.raises(DatasetNotFoundError, match=r"line 3: label 'maybe'"):
        read_csv_text('label,text\n1,ok\nmaybe,"first\nsecond\nthird"\n')
    with pytest.raises(DatasetNotFoundError, match=r"\(line 5\): ',' expected after"):
        read_csv_text('label,text\n1,ok\n0,"first line\nsecond line\nthird "bad" line\n1,next\n')


def test_escaped_quotes_are_unescaped():
    # the text2vec CSV keeps the Kaggle release's \" escapes: the backslash must not become a token
    assert read_csv_text('label,text\n1,"\\""Great\\"" fun, isn\\\'t it"\n') == [('"Great" fun, isn\'t it', 1)]


def read_csv_text(text: str) -> list:
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.csv"
        path.write_text(text, encoding="utf-8")
        return read_csv(path)


def test_a_csv_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("label,text\n1,great movie\n0,bad movie\n1,good\n0,awful\n1,fine fine\n0,poor poor\n",
                    encoding="utf-8-sig")
    assert read_csv(path)[:2] == [("great movie", 1), ("bad movie", 0)]


def test_a_review_file_with_a_byte_order_mark_reads(tmp_path):
    # as read_lines and the CSV reader: a review re-saved by a Windows editor started with a "\ufeff" token
    from ablate.tasks.imdb import read_tree

    tree = write_tree(tmp_path)
    (tree / "train" / "pos" / "0_7.txt").write_text(TREE[("train", "pos")][0], encoding="utf-8-sig")
    assert read_tree(tree)["train"][0] == ("Great film!  Loved it.", 1)
    assert tokenize(read_tree(tree)["train"][0][0])[:2] == ["great", "film"]


def test_a_csv_header_with_blanks_around_its_names_reads(tmp_path):
    # "label, text" (as a spreadsheet or a hand-written header has it; ETT's reader strips them too) was refused:
    # its text column was " text"
    assert read_csv_text("label, text\n1, great movie\n0,bad movie\n") == [(" great movie", 1), ("bad movie", 0)]
    assert read_csv_text(" review ,\tsentiment\ngood,pos\n") == [("good", 1)]
    # and a data directory holding such a file is told to pass csv_file
    (tmp_path / "reviews.csv").write_text("label, text\n1,good\n", encoding="utf-8")
    with pytest.raises(DatasetNotFoundError, match=r"e\.g\. csv_file=reviews\.csv\)"):
        get_task("imdb").build(make_config(data="real", data_dir=str(tmp_path), **TINY))


def test_csv_file_with_embedded_data_is_refused():
    from ablate.config import ConfigError
    from ablate.tasks import get_task as task_spec

    with pytest.raises(ConfigError, match="csv_file='x.csv' is given but data='embedded'"):
        task_spec("imdb").check(make_config(data="embedded", csv_file="x.csv", **TINY))


def test_bilstm_matches_a_packed_bidirectional_lstm():
    torch.manual_seed(0)
    model = BiLSTMClassifier(20, 6, 5, num_layers=2, dropout=0.0, pad_id=PAD_ID).eval()
    reference = nn.LSTM(6, 5, num_layers=2, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for layer in range(2):
            for suffix, lstm in (("", model.forward_lstms[layer]), ("_reverse", model.backward_lstms[layer])):
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(reference, f"{kind}_l{layer}{suffix}").copy_(getattr(lstm, f"{kind}_l0"))
        ids = torch.tensor([[5, 6, 7, 8, 9], [4, 3, PAD_ID, PAD_ID, PAD_ID], [7, 7, 7, 2, PAD_ID]])
        lengths = (ids != PAD_ID).sum(1)
        _, (h_n, _) = reference(pack_padded_sequence(model.embed(ids), lengths, batch_first=True, enforce_sorted=False))
        expected = model.fc(torch.cat([h_n[-2], h_n[-1]], dim=1))
        assert torch.allclose(model(ids), expected, atol=1e-6)
        # trailing padding columns change nothing
        padded = torch.cat([ids, torch.full((3, 4), PAD_ID)], dim=1)
        assert torch.allclose(model(padded), expected, atol=1e-6)


def test_reverse_padded():
    x = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    lengths = torch.tensor([3, 2])
    assert reverse_padded(x, lengths).tolist() == [[3, 2, 1, 0], [5, 4, 0, 0]]
    x3 = torch.randn(2, 4, 3)
    assert torch.equal(reverse_padded(reverse_padded(x3, lengths), lengths), x3)


def test_generated_reviews_are_deterministic_and_need_word_order():
    generate_reviews.cache_clear()
    random.seed(0)
    first = repr(generate_reviews(50, 9)).encode()
    generate_reviews.cache_clear()
    random.seed(1)
    torch.manual_seed(1)
    assert repr(generate_reviews(50, 9)).encode() == first
    reviews = generate_reviews(400, 9)
    labels = [y for _, y in reviews]
    assert 0.4 < sum(labels) / len(labels) < 0.6
    # sentiment words appear in reviews of both labels, often negated
    with_good_words = [y for text, y in reviews if any(w in text.split() for w in ("good", "great", "excellent"))]
    assert 0.3 < sum(with_good_words) / len(with_good_words) < 0.7
    assert sum(" not " in text for text, _ in reviews) > 200


def test_embedded_task_trains_with_adamw():
    torch.manual_seed(0)
    config = make_config()
    task = get_task("imdb").build(config)
    assert task.data_source == "embedded:generated-reviews-v1"
    assert 0.4 < task.reference["majority_accuracy"] < 0.6
    loader = torch.utils.data.DataLoader(task.train, batch_size=config["batch_size"], shuffle=True)
    probe = next(iter(loader))
    task.model.eval()
    before = task.loss_fn(task.model, probe).item()
    train_with_adamw(task, [probe] * 40, config["lr"], config["weight_decay"])
    task.model.eval()
    after = task.loss_fn(task.model, probe).item()
    assert before == pytest.approx(math.log(2), abs=0.05) and after < before - 0.15


def test_evaluate_accuracy_and_loss_over_the_whole_split():
    torch.manual_seed(0)
    task = get_task("imdb").build(make_config(**TINY))
    subset = torch.utils.data.Subset(task.val, range(7))
    metrics = task.evaluate(task.model, torch.utils.data.DataLoader(subset, batch_size=3))
    assert task.model.training and set(metrics) == {"accuracy", "loss"}
    task.model.eval()
    with torch.no_grad():
        ids = torch.stack([subset[i][0] for i in range(7)])
        labels = torch.stack([subset[i][1] for i in range(7)])
        logits = task.model(ids)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())


def test_second_order_gradients():
    torch.manual_seed(0)
    task = get_task("imdb").build(make_config(**TINY))
    batch = next(iter(torch.utils.data.DataLoader(task.train, batch_size=4)))
    assert_second_order_gradients(task, batch)


@pytest.mark.realdata
def test_real_csv():
    path = SHARED_DATA / "imdb" / "text2vec_movie_review_5000.csv"
    if not path.is_file():
        pytest.skip("../shared/data/imdb is not available")
    task = get_task("imdb").build(make_config(data="real", data_dir=str(SHARED_DATA), csv_file=path.name, **TINY))
    assert task.info["reviews"] == {"train": 4000, "val": 1000}
    assert task.info["vocab_size"] == 25000 + 4
    assert task.test is None and task.data_source == f"real:{path.resolve()}"
    assert task.train.labels.float().mean().item() == pytest.approx(task.val.labels.float().mean().item(), abs=0.002)
    assert 0.45 < task.reference["majority_accuracy"] < 0.55
