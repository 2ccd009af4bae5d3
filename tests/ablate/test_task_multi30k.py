"""multi30k: raw Multi30k files, the shared vocabulary, the generated bilingual corpus, the
Transformer encoder-decoder, token-weighted metrics and corpus BLEU."""

import functools
import gzip
import itertools
import math
import random
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ablate.tasks import DOWNLOADS, DataWarning, DatasetNotFoundError, get_task
from ablate.tasks.multi30k import TranslationPairs, bleu, collate, corpus_bleu, generate_pairs
from ablate.tasks.text import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocab
from tests.ablate.task_helpers import SHARED_DATA, assert_second_order_gradients, task_config, train_with_adamw

#: The resolved trial config of this task with the given overrides.
make_config = functools.partial(task_config, "multi30k")

TINY = dict(d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, dim_feedforward=32)

FILES = {
    "train.de": "Ein Hund läuft.\nZwei Hunde laufen schnell!\n",
    "train.en": "A dog runs.\nTwo dogs run fast!\n",
    "val.de": "Ein Pferd läuft.\n",
    "val.en": "A horse runs.\n",
    "test_2016_flickr.de": "Ein Hund.\n",
    "test_2016_flickr.en": "A dog.\n",
}


def write_files(folder: Path, gz: set[str] = frozenset()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in FILES.items():
        if name in gz:
            with gzip.open(folder / f"{name}.gz", "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_registration():
    spec = get_task("multi30k")
    assert [(m.name, m.mode) for m in spec.metrics] == [("ppl", "min"), ("loss", "min")]
    d = spec.defaults
    assert (d["batch_size"], d["epochs"], d["meta_every"], d["modulator_layers"], d["modulator_ff"]) == (64, 25, 454, 128, 64)
    assert (d["modulator_heads"], d["features"], d["gating"], d["priorities"]) == (6, "basic", False, [2.0, 5.0, 1.0])
    assert (d["d_model"], d["n_encoder_layers"], d["n_decoder_layers"], d["n_heads"], d["dim_feedforward"]) == (256, 4, 4, 8, 1024)
    assert (d["vocab_size"], d["max_len"], d["dropout"]) == (10000, 64, 0.1)
    names = sorted(dl.filename for dl in DOWNLOADS["multi30k"])
    assert names == sorted(f"{s}.{l}.gz" for s in ("train", "val", "test_2016_flickr") for l in ("de", "en"))


def test_plain_and_gzip_files_parse_to_framed_ids_with_shared_train_vocab(tmp_path):
    write_files(tmp_path / "multi30k", gz={"train.en", "val.de", "test_2016_flickr.de", "test_2016_flickr.en"})
    with pytest.warns(UserWarning, match="not the published files"):  # (tiny files)
        task = get_task("multi30k").build(make_config(data="real", data_dir=str(tmp_path), **TINY))
    vocab = Vocab.build(
        [["ein", "hund", "läuft", "."], ["a", "dog", "runs", "."], ["zwei", "hunde", "laufen", "schnell", "!"],
         ["two", "dogs", "run", "fast", "!"]]
    )
    assert task.info["vocab_size"] == len(vocab) == 4 + 16
    assert task.info["pairs"] == {"train": 2, "val": 1, "test": 1}
    src, tgt = task.train[1]
    assert src.tolist() == [BOS_ID, *vocab.encode(["zwei", "hunde", "laufen", "schnell", "!"]), EOS_ID]
    assert tgt.tolist() == [BOS_ID, *vocab.encode(["two", "dogs", "run", "fast", "!"]), EOS_ID]
    # "pferd" / "horse" occur only in the validation files: unknown
    val_src, val_tgt = task.val[0]
    assert val_src.tolist() == [BOS_ID, vocab["ein"], UNK_ID, vocab["läuft"], vocab["."], EOS_ID]
    assert val_tgt.tolist() == [BOS_ID, vocab["a"], UNK_ID, vocab["runs"], vocab["."], EOS_ID]
    assert "train.en.gz" in task.data_source and "train.de," in task.data_source


def test_pairs_with_an_empty_side_are_skipped_said_and_recorded(tmp_path, monkeypatch):
    folder = write_files(tmp_path / "multi30k")
    (folder / "test_2016_flickr.de").write_text("Ein Hund.\nZwei Hunde.\n", encoding="utf-8")
    (folder / "test_2016_flickr.en").write_text("A dog.\n\n", encoding="utf-8")  # a blanked line: the test split shrinks
    (folder / "train.de").write_text("Ein Hund läuft.\n   \n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # a relative data_dir: the recorded source is absolute all the same
    with pytest.warns(DataWarning, match=r"multi30k: skipped pairs with an empty side: train 1, test 1 \(of "):
        task = get_task("multi30k").build(make_config(data="real", data_dir=".", **TINY))
    assert task.info["pairs"] == {"train": 1, "val": 1, "test": 1}
    assert task.data_source.startswith(f"real:{(folder / 'train.de').resolve()},")
    assert task.data_source.endswith(" (skipped pairs with an empty side: train 1, test 1)")


def test_files_of_other_line_counts_than_the_published_ones_are_warned_about_and_recorded(tmp_path, monkeypatch):
    # a copy cut short in both languages (still line-aligned) used to train and score without a word, on other data
    import ablate.tasks.multi30k as multi30k

    folder = write_files(tmp_path / "multi30k")  # 2, 1 and 1 pairs
    config = make_config(data="real", data_dir=str(tmp_path), **TINY)
    with pytest.warns(DataWarning, match=r"multi30k: not the published files: train 2 pairs where it has 29,000; val 1 "
                                         r"pairs where it has 1,014; test_2016_flickr 1 pairs where it has 1,000 \(in "
                                         r".*\) - perplexities and BLEU not comparable .*`ablate data download multi30k "
                                         r"--data-dir .* --force`"):
        task = get_task("multi30k").build(config)
    files = ",".join(str((folder / f"{stem}.{lang}").resolve()) for stem in ("train", "val", "test_2016_flickr")
                     for lang in ("de", "en"))
    assert task.data_source == (f"real:{files} (not the published files: train 2 pairs where it has 29,000; val 1 pairs "
                                f"where it has 1,014; test_2016_flickr 1 pairs where it has 1,000)")
    monkeypatch.setattr(multi30k, "PUBLISHED_PAIRS", {"train": 2, "val": 1, "test": 1})  # the published sizes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_task("multi30k").build(config).data_source == f"real:{files}"
    monkeypatch.setattr(multi30k, "PUBLISHED_PAIRS", {"train": 2, "val": 2, "test": 1})
    with pytest.warns(DataWarning, match="not the published files: val 1 pairs where it has 2 "):
        assert get_task("multi30k").build(config).data_source == (
            f"real:{files} (not the published files: val 1 pairs where it has 2)")
    # lines, not kept pairs, are compared: a blanked line is the skipped-pairs note's, not this one's
    (folder / "val.de").write_text("Ein Pferd.\nZwei Pferde.\n", encoding="utf-8")
    (folder / "val.en").write_text("A horse.\n\n", encoding="utf-8")
    with pytest.warns(DataWarning, match="skipped pairs with an empty side: val 1 "):
        source = get_task("multi30k").build(config).data_source
    assert source == f"real:{files} (skipped pairs with an empty side: val 1)"


def test_the_advice_for_a_cut_short_uncompressed_copy_says_to_delete_it_first(tmp_path, monkeypatch):
    # the download writes NAME.gz, but an uncompressed NAME beside it is read first: "fetches it over these" left the
    # cut-short copy read after the download, the same warning given again
    import ablate.tasks.multi30k as multi30k

    folder = write_files(tmp_path / "multi30k", gz={"train.de", "train.en", "test_2016_flickr.de"})
    for name in ("val.de", "val.en"):  # the published .gz files beside the plain ones, as a download writes them
        with gzip.open(folder / f"{name}.gz", "wt", encoding="utf-8") as f:
            f.write(FILES[name] * 2)
    monkeypatch.setattr(multi30k, "PUBLISHED_PAIRS", {"train": 2, "val": 2, "test": 2})
    config = make_config(data="real", data_dir=str(tmp_path), **TINY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = get_task("multi30k").build(config).data_source
    # val (plain files, cut short): only they are named; test (one plain file, one .gz) names its plain one
    assert [str(w.message) for w in caught] == [
        f"multi30k: not the published files: val 1 pairs where it has 2; test_2016_flickr 1 pairs where it has 2 (in "
        f"{folder.resolve()}) - perplexities and BLEU not comparable with the published dataset's (delete the "
        f"uncompressed {folder / 'val.de'}, {folder / 'val.en'}, {folder / 'test_2016_flickr.en'} first: they are "
        f"read before the .gz files that `ablate data download multi30k --data-dir {tmp_path} --force` fetches)"]
    assert source.endswith(" (not the published files: val 1 pairs where it has 2; test_2016_flickr 1 pairs where it "
                           "has 2)")
    for name in ("val.de", "val.en", "test_2016_flickr.en"):  # as the warning says: the .gz files are read instead
        (folder / name).unlink()
    with gzip.open(folder / "test_2016_flickr.en.gz", "wt", encoding="utf-8") as f:
        f.write("A dog.\nTwo dogs.\n")
    with gzip.open(folder / "test_2016_flickr.de.gz", "wt", encoding="utf-8") as f:
        f.write("Ein Hund.\nZwei Hunde.\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert " (" not in get_task("multi30k").build(config).data_source
    # only .gz files cut short: the download fetches them over these, as before
    with gzip.open(folder / "val.de.gz", "wt", encoding="utf-8") as f:
        f.write("Ein Pferd.\n")
    with gzip.open(folder / "val.en.gz", "wt", encoding="utf-8") as f:
        f.write("A horse.\n")
    with pytest.warns(UserWarning, match=r"published dataset's \(`ablate data download multi30k --data-dir .* --force` "
                                         r"fetches it over these\)$"):
        get_task("multi30k").build(config)


def test_collate_pads_and_max_len_truncates():
    vocab = Vocab.build([["a", "b", "c", "d"]])
    data = TranslationPairs([(["a", "b", "c", "d"], ["a"]), (["b"], ["c", "d"])], vocab, max_len=4)
    assert data[0][0].tolist() == [BOS_ID, vocab["a"], vocab["b"], EOS_ID]  # truncated to max_len - 2 tokens
    src, tgt = collate([data[0], data[1]])
    assert src.tolist() == [[BOS_ID, vocab["a"], vocab["b"], EOS_ID], [BOS_ID, vocab["b"], EOS_ID, PAD_ID]]
    assert tgt.tolist() == [[BOS_ID, vocab["a"], EOS_ID, PAD_ID], [BOS_ID, vocab["c"], vocab["d"], EOS_ID]]


def test_missing_and_misaligned_files(tmp_path):
    folder = write_files(tmp_path / "multi30k")
    (folder / "val.en").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        get_task("multi30k").build(make_config(data="real", data_dir=str(tmp_path), **TINY))
    msg = str(info.value)
    for name in FILES:
        assert str(folder / name) in msg
    assert "val.en" in msg.splitlines()[0] and "ablate data download multi30k" in msg
    with pytest.raises(DatasetNotFoundError) as info:  # no multi30k folder: it names the one that would do too
        get_task("multi30k").build(make_config(data="real", data_dir=str(tmp_path / "elsewhere"), **TINY))
    assert f"and there is no folder {tmp_path / 'elsewhere' / 'multi30k'}, the other place" in str(info.value)
    (folder / "val.en").write_text("A horse runs.\nOne line too many.\n", encoding="utf-8")
    with pytest.raises(DatasetNotFoundError, match="line-aligned") as info:
        get_task("multi30k").build(make_config(data="real", data_dir=str(folder), **TINY))
    # the fix it names works: the download writes NAME.gz, which the uncompressed files would hide
    first = str(info.value).splitlines()[0]
    assert (f"(the uncompressed {folder / 'val.de'} and {folder / 'val.en'} are read before NAME.gz, which is what "
            f"the download writes: delete or replace them first)") in first
    # (data_dir is the dataset's own folder here: the download makes multi30k/ below the directory it is given)
    assert f"`ablate data download multi30k --data-dir {tmp_path} --force`" in str(info.value)


def test_corrupt_gzip_data_names_the_file(tmp_path):
    # an intact gzip header over damaged deflate data raises zlib.error, not OSError: it escaped as a traceback
    folder = write_files(tmp_path / "multi30k", gz={"val.de"})
    blob = bytearray((folder / "val.de.gz").read_bytes())
    blob[12:20] = b"\xff" * 8
    (folder / "val.de.gz").write_bytes(bytes(blob))
    with pytest.raises(DatasetNotFoundError) as info:
        get_task("multi30k").build(make_config(data="real", data_dir=str(folder), **TINY))
    first = str(info.value).splitlines()[0]
    assert f"cannot read {folder / 'val.de.gz'} as UTF-8 text" in first and "val.en" not in first


def test_corpus_bleu_hand_computed():
    assert corpus_bleu([["a", "b", "c", "d"]], [["a", "b", "c", "d"]]) == pytest.approx(100.0)
    # p1..p4 = 4/5, 3/4, 2/3, 1/2; equal lengths
    assert corpus_bleu([list("abcde")], [list("abcdf")]) == pytest.approx(100 * 0.2**0.25)
    # all n-grams match, but 4 hypothesis words for 6 reference words: BP = exp(1 - 6/4)
    assert corpus_bleu([list("abcd")], [list("abcdef")]) == pytest.approx(100 * math.exp(-0.5))
    # clipping: "the" counts at most twice
    assert corpus_bleu([["the"] * 4], [["the", "cat", "the"]], max_n=1) == pytest.approx(50.0)
    # statistics are summed over the corpus before the geometric mean: (5/6 * 3/4 * 2/2 * 1/1) ** (1/4)
    hyps, refs = [list("abcd"), list("xy")], [list("abcd"), list("xz")]
    assert corpus_bleu(hyps, refs) == pytest.approx(100 * (5 / 6 * 3 / 4) ** 0.25)
    assert corpus_bleu([["a", "b"]], [["c", "d"]]) == 0.0
    assert corpus_bleu([[]], [["a"]]) == 0.0
    with pytest.raises(ValueError):
        corpus_bleu([["a"]], [])


class CopyModel(nn.Module):
    """Translates by copying the source: a stand-in with a known output for :func:`bleu`."""

    def greedy_decode(self, src, bos_id, eos_id):
        return src


def test_bleu_scores_greedy_output_against_targets():
    vocab = Vocab.build([list("abcdef")])
    same = TranslationPairs([(list("abcd"), list("abcd"))] * 3, vocab, max_len=10)
    assert bleu(CopyModel(), same, batch_size=2) == pytest.approx(100.0)
    # copies "abcde" for the reference "abcdf": BOS/EOS/padding are not words
    data = TranslationPairs([(list("abcde"), list("abcdf")), (list("ab"), list("abcdef"))], vocab, max_len=10)
    expected = corpus_bleu([list("abcde"), list("ab")], [list("abcdf"), list("abcdef")])
    assert bleu(CopyModel(), data, batch_size=1) == pytest.approx(expected)


def test_greedy_decode_frames_and_pads():
    torch.manual_seed(0)
    task = get_task("multi30k").build(make_config(**TINY, max_len=12))
    src, _ = collate([task.test[i] for i in range(4)])
    task.model.eval()
    out = task.model.greedy_decode(src, BOS_ID, EOS_ID)
    assert out.shape[0] == 4 and out.shape[1] <= 12
    assert (out[:, 0] == BOS_ID).all()
    for row in out.tolist():
        if EOS_ID in row:
            assert all(t == PAD_ID for t in row[row.index(EOS_ID) + 1 :])


def test_generated_pairs_are_deterministic():
    generate_pairs.cache_clear()
    random.seed(5)
    first = repr(generate_pairs(20, 7)).encode()
    generate_pairs.cache_clear()
    random.seed(6)
    torch.manual_seed(6)
    assert repr(generate_pairs(20, 7)).encode() == first
    assert generate_pairs(20, 8) != generate_pairs(20, 7)
    de, en = generate_pairs(20, 7)[0]
    assert de.endswith(" .") and en.endswith(" .")


def test_embedded_task_trains_with_adamw():
    torch.manual_seed(0)
    config = make_config()
    task = get_task("multi30k").build(config)
    assert task.data_source == "embedded:generated-bilingual-grammar-v1"
    assert task.collate_fn is collate and len(task.test) > 0
    assert 1.0 < task.reference["unigram_ppl"] < task.info["vocab_size"]
    assert 1.0 < task.reference["test_unigram_ppl"] < task.info["vocab_size"]
    assert task.reference["test_unigram_ppl"] != task.reference["unigram_ppl"]  # (its own split)
    loader = torch.utils.data.DataLoader(task.train, batch_size=config["batch_size"], shuffle=True, collate_fn=collate)
    probe = collate([task.val[i] for i in range(32)])
    task.model.eval()
    before = task.loss_fn(task.model, probe).item()
    train_with_adamw(task, itertools.islice(loader, 15), config["lr"], config["weight_decay"])
    task.model.eval()
    after = task.loss_fn(task.model, probe).item()
    assert before > 5.0 and after < before - 0.4
    assert 0.0 <= bleu(task.model, torch.utils.data.Subset(task.test, range(16))) <= 100.0


def test_evaluate_weights_by_non_padding_target_tokens():
    torch.manual_seed(0)
    task = get_task("multi30k").build(make_config(**TINY))
    items = [task.val[i] for i in range(5)]
    loader = torch.utils.data.DataLoader(items, batch_size=2, collate_fn=collate)
    metrics = task.evaluate(task.model, loader)
    assert task.model.training and set(metrics) == {"ppl", "loss"}
    task.model.eval()
    with torch.no_grad():  # each pair on its own, no padding at all
        nll = [F.cross_entropy(task.model(s[None], t[None, :-1])[0], t[1:], reduction="sum").item() for s, t in items]
    count = sum(len(t) - 1 for _, t in items)
    assert metrics["loss"] == pytest.approx(sum(nll) / count, rel=1e-4)
    assert metrics["ppl"] == pytest.approx(math.exp(sum(nll) / count), rel=1e-4)


def test_second_order_gradients():
    torch.manual_seed(0)
    task = get_task("multi30k").build(make_config(**TINY))
    batch = collate([task.train[i] for i in range(4)])
    assert_second_order_gradients(task, batch)


@pytest.mark.realdata
def test_real_multi30k():
    folder = SHARED_DATA / "multi30k"
    if not folder.is_dir():
        pytest.skip("../shared/data/multi30k is not available")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the published files: no warning)
        task = get_task("multi30k").build(make_config(data="real", data_dir=str(SHARED_DATA), **TINY))
    assert task.info["pairs"] == {"train": 29000, "val": 1014, "test": 1000}
    assert " (" not in task.data_source  # (nothing noted)
    assert task.info["vocab_size"] == 10000 + 4
    src, tgt = task.train[0]
    assert src[0] == BOS_ID and src[-1] == EOS_ID and tgt[0] == BOS_ID and tgt[-1] == EOS_ID
    assert 1.0 < task.reference["unigram_ppl"] < 10004
    assert task.data_source.startswith("real:") and str(folder.resolve()) in task.data_source
