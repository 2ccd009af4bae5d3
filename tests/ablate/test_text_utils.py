"""Tokeniser, vocabulary, file reading and evaluation helpers shared by the text tasks."""

import gzip
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ablate.tasks import DatasetNotFoundError
from ablate.tasks.text import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIALS,
    UNK_ID,
    Vocab,
    dataset_error,
    evaluating,
    model_device,
    read_lines,
    tokenize,
    unigram_cross_entropy,
)


def test_tokenize_splits_punctuation_and_keeps_contractions():
    assert tokenize("A dog, isn't it? (Yes!)") == ["a", "dog", ",", "isn't", "it", "?", "(", "yes", "!", ")"]
    assert tokenize("Ein Mädchen läuft.") == ["ein", "mädchen", "läuft", "."]
    assert tokenize("Hello  World", lowercase=False) == ["Hello", "World"]
    assert tokenize("") == []
    assert tokenize("1,000 @-@ e-mail") == ["1", ",", "000", "@", "-", "@", "e", "-", "mail"]


def test_tokenize_keeps_combining_marks_with_their_letter():
    import unicodedata
    text = "Ein Café in İzmir; नमस्ते"
    expected = ["ein", "café", "in", "i̇zmir", ";", "नमस्ते"]
    assert tokenize(text) == expected
    assert tokenize(unicodedata.normalize("NFD", text)) == expected  # decomposed accents: the same tokens
    assert tokenize("\u0301a") == ["\u0301", "a"]  # a mark with no letter before it is a token of its own


def test_vocab_specials_ranking_and_cap():
    train = [["b", "a", "c", "a"], ["b", "a", "d", "<unk>", "<eos>"]]
    vocab = Vocab.build(train)
    assert vocab.itos[:4] == list(SPECIALS) == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert (vocab.pad_id, vocab.unk_id, vocab.bos_id, vocab.eos_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    # by frequency, ties alphabetical; specials in the text are not words of their own
    assert vocab.itos[4:] == ["a", "b", "c", "d"]
    assert len(Vocab.build(train, max_size=2)) == 4 + 2
    assert Vocab.build(train, max_size=2).itos[4:] == ["a", "b"]
    assert Vocab.build(train, min_freq=2).itos[4:] == ["a", "b"]


def test_vocab_encode_decode():
    vocab = Vocab.build([["x", "y", "y"]])
    assert vocab.encode(["y", "x", "zzz", "<eos>"]) == [4, 5, UNK_ID, EOS_ID]
    assert vocab["zzz"] == UNK_ID and "zzz" not in vocab and "x" in vocab
    assert vocab.decode([BOS_ID, 4, 5, EOS_ID, PAD_ID]) == ["<bos>", "y", "x", "<eos>", "<pad>"]
    assert vocab.decode([BOS_ID, 4, 5, EOS_ID, PAD_ID], skip_specials=True) == ["y", "x"]
    with pytest.raises(ValueError, match="unique"):
        Vocab(["a", "a"])


def test_read_lines_plain_and_gzip(tmp_path):
    text = "erste Zeile\nzweite Zeile – ü\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    expected = ["erste Zeile", "zweite Zeile – ü"]
    assert read_lines(tmp_path / "a.txt") == expected
    assert read_lines(tmp_path / "a.txt.gz") == expected
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UnicodeDecodeError):
        read_lines(tmp_path / "bad.txt")


def test_read_lines_knows_gzip_by_its_bytes_not_its_name(tmp_path):
    # a val.de renamed from val.de.gz was called "not UTF-8 (byte 0x8b)" with the advice to delete it, and a
    # val.de.gz decompressed on the way by a download client was "not a gzipped file"
    text = "erste Zeile\nzweite Zeile – ü\n"
    (tmp_path / "plain.gz").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "packed.txt", "wt", encoding="utf-8") as f:
        f.write(text)
    assert read_lines(tmp_path / "plain.gz") == read_lines(tmp_path / "packed.txt") == ["erste Zeile", "zweite Zeile – ü"]


def test_read_lines_drops_a_byte_order_mark(tmp_path):
    # a file re-saved by a Windows editor starts with U+FEFF: it was read as a token of its own ("\ufeff"
    # before the first word of a Multi30k sentence; one token more than the published WikiText-2 file)
    text = "\ufeff = Valkyria = \nzwei Männer\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    for name in ("a.txt", "a.txt.gz"):
        lines = read_lines(tmp_path / name)
        assert lines == [" = Valkyria = ", "zwei Männer"]
        assert lines[0].split() == ["=", "Valkyria", "="] and tokenize(lines[0]) == ["=", "valkyria", "="]
    # (only at the start: U+FEFF inside a line is text)
    (tmp_path / "b.txt").write_text("a\ufeffb\n", encoding="utf-8")
    assert read_lines(tmp_path / "b.txt") == ["a\ufeffb"]


def test_read_lines_breaks_at_line_ends_only(tmp_path):
    # U+2028, U+0085, form feed and the like inside a sentence must not split it: Multi30k's
    # .de and .en files are aligned line by line, and one extra break shifts every later pair
    path = tmp_path / "a.txt"
    path.write_bytes("a\u2028b\r\nc\x0cd\x85e\rlast".encode("utf-8"))
    assert read_lines(path) == ["a\u2028b", "c\x0cd\x85e", "last"]
    path.write_bytes(b"one\n\ntwo\n")
    assert read_lines(path) == ["one", "", "two"]
    path.write_bytes(b"")
    assert read_lines(path) == []


def test_dataset_error_names_full_paths_and_how_to_get_them(tmp_path):
    err = dataset_error("wikitext2", "missing files", [tmp_path / "x" / "a.tokens", Path("rel/b.tokens")], "https://example.org/x.zip")
    assert isinstance(err, DatasetNotFoundError)
    msg = str(err)
    assert str(tmp_path / "x" / "a.tokens") in msg
    assert str(Path("rel/b.tokens").absolute()) in msg
    assert "ablate data download wikitext2" in msg and "https://example.org/x.zip" in msg


@pytest.mark.parametrize("training", [True, False])
def test_evaluating_restores_mode_and_disables_grad(training):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(training)
    with evaluating(model):
        assert not model.training and not model[1].training
        assert not torch.is_grad_enabled()
    assert model.training is training and model[1].training is training
    assert model_device(model) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")


def test_unigram_cross_entropy_by_hand():
    # train counts over a vocabulary of 4: [0, 2, 1, 0] + 1 -> [1, 3, 2, 1] / 7
    train, evaluated = torch.tensor([1, 1, 2]), torch.tensor([1, 3])
    expected = -(math.log(3 / 7) + math.log(1 / 7)) / 2
    assert unigram_cross_entropy(train, evaluated, 4) == pytest.approx(expected)


def test_perplexity_of_a_diverged_model_is_inf_not_an_overflow_error():
    # a mean cross-entropy above ~709.8 nats (a model blown up by a too high learning rate) overflows math.exp:
    # ppl is inf, which the trial reports as diverged, instead of the trial failing with OverflowError
    from ablate.tasks.text import perplexity_metrics

    assert perplexity_metrics(800.0) == {"ppl": math.inf, "loss": 800.0}
    assert perplexity_metrics(math.log(120.0), prefix="unigram_")["unigram_ppl"] == pytest.approx(120.0)
