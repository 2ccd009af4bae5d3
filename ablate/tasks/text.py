"""Tokenisation, vocabularies and small helpers shared by the text tasks (wikitext2, multi30k, imdb).

* :func:`tokenize` - a simple, documented word tokeniser;
* :class:`Vocab` - a token <-> id map built from the *training* split only, with a size cap, a
  minimum frequency and the specials ``<pad>`` (id 0), ``<unk>`` (1), ``<bos>`` (2), ``<eos>`` (3);
* :func:`read_lines` - UTF-8 text files, plain or gzip-compressed, as a list of lines;
* :func:`dataset_error` - the :class:`DatasetNotFoundError` every text task raises for a missing or
  malformed dataset (it names each expected file with its full path and how to obtain it);
* :func:`evaluating` and :func:`model_device` - what every ``evaluate`` function needs (defined
  in :mod:`ablate.tasks.base`, with :func:`~ablate.tasks.base.evaluate_sums`; importable from here);
* :func:`unigram_cross_entropy` - the trivial reference of the language-modelling tasks;
* :func:`perplexity_metrics` - ``ppl`` and ``loss`` of a mean cross-entropy (metrics and reference
  of the language-modelling tasks).
"""

from __future__ import annotations

import gzip
import math
import re
import unicodedata
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ablate.tasks.base import DatasetNotFoundError, evaluating, model_device  # noqa: F401  (re-exported)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
#: The special tokens, in id order: every :class:`Vocab` starts with them.
SPECIALS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(SPECIALS))


def _combining_marks() -> str:
    """A regex class body of the combining marks (Unicode categories Mn, Mc, Me) of the Basic
    Multilingual Plane: accents that NFC cannot compose (the dot of ``"İ".lower()``) and the vowel
    signs of Indic scripts belong to the letter before them, which ``\\w`` alone does not know."""
    marks = [c for c in range(0x10000) if unicodedata.category(chr(c)).startswith("M")]
    ranges, start = [], marks[0]
    for prev, cur in zip(marks, marks[1:] + [None]):
        if cur != prev + 1:
            ranges.append(f"\\u{start:04x}" + (f"-\\u{prev:04x}" if prev != start else ""))
            start = cur
    return "".join(ranges)


# A word is a run of letters/digits/underscores (each with its combining marks), optionally joined
# by apostrophes ("don't", "it's" stay whole); every other non-space character is a token of its own.
_WORD = rf"\w[{_combining_marks()}]*"
_TOKEN_RE = re.compile(rf"(?:{_WORD})+(?:'(?:{_WORD})+)*|[^\w\s]")


def tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Split ``text`` into words and punctuation marks.

    The text is first put in Unicode normal form NFC (a decomposed ``"é"`` becomes one
    character) and, with ``lowercase``, lower-cased. Words are maximal runs of Unicode letters,
    digits and underscores with their combining marks, with inner apostrophes kept (``"don't"``
    is one token); each other non-whitespace character (``.,!?()"-`` ...) is a token of its own;
    whitespace only separates.

    >>> tokenize("A dog, isn't it? Ein Hund!")
    ['a', 'dog', ',', "isn't", 'it', '?', 'ein', 'hund', '!']
    """
    if lowercase:
        text = text.lower()
    return _TOKEN_RE.findall(unicodedata.normalize("NFC", text))


class Vocab:
    """A token <-> id map whose first ids are :data:`SPECIALS` (``<pad>`` = 0, ``<unk>`` = 1,
    ``<bos>`` = 2, ``<eos>`` = 3). Unknown tokens map to ``<unk>``."""

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, words: Sequence[str]):
        """``words``: the regular tokens, most frequent first (the specials are prepended)."""
        self.itos: list[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")

    @classmethod
    def build(cls, sequences: Iterable[Sequence[str]], max_size: int | None = None, min_freq: int = 1) -> "Vocab":
        """The vocabulary of tokenised ``sequences`` (pass the training split only).

        Keeps the ``max_size`` most frequent regular tokens (ties broken alphabetically, so the
        result does not depend on the input order) that occur at least ``min_freq`` times; the
        specials come on top. Occurrences of a special in the text (WikiText's own ``<unk>``)
        are not counted as words.
        """
        counts = Counter(tok for seq in sequences for tok in seq)
        kept = (w for w, c in counts.items() if c >= min_freq and w not in SPECIALS)
        ranked = sorted(kept, key=lambda w: (-counts[w], w))
        return cls(ranked[:max_size] if max_size is not None else ranked)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __getitem__(self, token: str) -> int:
        return self.stoi.get(token, self.unk_id)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Token ids; unknown tokens become ``<unk>``."""
        unk = self.unk_id
        return [self.stoi.get(t, unk) for t in tokens]

    def decode(self, ids: Iterable[int], skip_specials: bool = False) -> list[str]:
        """Tokens of ``ids``; with ``skip_specials`` ``<pad>``, ``<bos>`` and ``<eos>`` are dropped."""
        drop = {self.pad_id, self.bos_id, self.eos_id} if skip_specials else set()
        return [self.itos[i] for i in map(int, ids) if i not in drop]



def read_lines(path: Path) -> list[str]:
    """The lines (without line breaks) of a UTF-8 text file; gzip-compressed files are decompressed.

    Whether a file is compressed is read from its first bytes (the gzip magic ``1f 8b``, which no
    UTF-8 text starts with), not from its name: a ``val.de.gz`` saved by a client that undid the
    transfer's compression is plain text, and a ``val.de`` renamed from ``val.de.gz`` is still
    compressed - by the name alone the first was "not a gzipped file" and the second "not UTF-8"
    (byte 0x8b), with the advice to delete a file that holds the right sentences.

    Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` only (not at the other characters that
    ``str.splitlines`` breaks at, such as U+2028 or a form feed inside a sentence: parallel files
    like Multi30k's are aligned line by line, and an extra break would shift every later pair).

    A UTF-8 byte-order mark at the start (a file re-saved by a Windows editor) is dropped, not read
    as a token of its own (in WikiText it would also make the file one token longer than published).

    Raises ``OSError`` / ``UnicodeDecodeError`` / ``EOFError`` for unreadable, non-UTF-8 or
    truncated files (corrupt compressed data too); callers turn them into :func:`dataset_error`.
    """
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            lines = f.read().split("\n")  # (text mode has turned \r\n and \r into \n)
    except zlib.error as exc:  # damaged deflate data inside an intact gzip header
        raise OSError(f"corrupt compressed data: {exc}") from exc
    return lines[:-1] if lines[-1] == "" else lines


def dataset_error(task: str, problem: str, expected: Iterable[Path], source: str,
                  damaged: bool = False) -> DatasetNotFoundError:
    """A :class:`DatasetNotFoundError` for ``task``: what is wrong, every expected file with its
    full path, and how to obtain the data (``ablate data download TASK`` or ``source``;
    ``damaged``: a file is there but unusable, which only ``--force`` fetches again)."""
    files = "\n".join(f"  {p.expanduser().absolute()}" for p in expected)
    how = (f"Replace them with `ablate data download {task} --force` (a file in place is otherwise kept)"
           if damaged else f"Obtain them with `ablate data download {task}`")
    return DatasetNotFoundError(
        f"task {task!r}: {problem}.\nExpected files:\n{files}\n"
        f"{how} or from {source}; or use data='embedded' for the small offline variant."
    )


def unigram_cross_entropy(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Mean cross-entropy (nats per token) of ``eval_ids`` under the add-one smoothed unigram
    model of ``train_ids`` over a vocabulary of ``vocab_size`` ids; ``exp`` of it is the
    unigram perplexity."""
    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - math.log(counts.sum().item())
    return float(-log_probs[eval_ids.flatten()].mean())


def perplexity_metrics(loss: float, prefix: str = "") -> dict[str, float]:
    """``{prefix}ppl = exp(loss)`` and ``{prefix}loss`` for a mean cross-entropy ``loss`` in nats
    per token (the metrics of the language-modelling tasks; ``prefix="unigram_"`` for their reference).
    A loss above ~709.8 nats (a diverging model) gives ``ppl = inf``, which the trial reports as diverged,
    not an OverflowError."""
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = math.inf
    return {f"{prefix}ppl": ppl, f"{prefix}loss": loss}
