"""wikitext2: WikiText token files, blocks, the generated corpus, MiniGPT, loss and metrics."""

import functools
import itertools
import math
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ablate.tasks import DOWNLOADS, DataWarning, DatasetNotFoundError, get_task
from ablate.tasks.text import EOS_ID, UNK_ID
from ablate.config import ConfigError
from ablate.tasks.wikitext import EMBEDDED_MIN_TOKENS, LMBlocks, embedded_splits, generate_corpus, lines_to_tokens
from tests.ablate.task_helpers import SHARED_DATA, assert_second_order_gradients, task_config, train_with_adamw

#: The resolved trial config of this task with the given overrides.
make_config = functools.partial(task_config, "wikitext2")


def write_wiki(root: Path, train: str, valid: str, test: str) -> Path:
    folder = root / "wikitext-2"
    folder.mkdir(parents=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"wiki.{name}.tokens").write_text(text, encoding="utf-8")
    return folder


TRAIN = " = Title = \n \n the cat sat . the cat ran . \n a dog sat <unk> . \n"
VALID = " the dog ate . \n the zebra sat . \n"
TEST = " a cat sat . \n the cat sat . \n"


def test_registration():
    spec = get_task("wikitext2")
    assert [(m.name, m.mode) for m in spec.metrics] == [("ppl", "min"), ("loss", "min")]
    d = spec.defaults
    assert (d["batch_size"], d["epochs"], d["meta_every"], d["modulator_layers"], d["modulator_ff"]) == (64, 15, 123, 8, 16)
    assert (d["modulator_heads"], d["features"], d["gating"], d["priorities"], d["weighting_form"]) == (
        6, "basic", False, [1.0, 1.0, 1.0], "classification",
    )
    assert (d["d_model"], d["n_layers"], d["n_heads"], d["block_size"], d["vocab_size"]) == (128, 2, 4, 128, 10000)
    (download,) = DOWNLOADS["wikitext2"]
    assert download.url.endswith("wikitext-2-v1.zip") and download.md5 == "542ccefacc6c27f945fb54453812b3cd"


def test_tokens_get_eos_at_every_line_end():
    assert lines_to_tokens([" = A = ", " ", " x y . "]) == ["=", "A", "=", "<eos>", "<eos>", "x", "y", ".", "<eos>"]


def test_blocks_are_contiguous_and_shifted():
    blocks = LMBlocks(torch.arange(10), block_size=3)
    assert len(blocks) == 3  # (10 - 1) // 3; the trailing partial block is dropped
    x, y = blocks[1]
    assert x.tolist() == [3, 4, 5] and y.tolist() == [4, 5, 6]
    assert blocks[2][1].tolist() == [7, 8, 9]
    with pytest.raises(IndexError):
        blocks[3]


def test_real_format_parsed_to_blocks_with_train_only_vocab(tmp_path):
    write_wiki(tmp_path, TRAIN, VALID, TEST)
    with pytest.warns(UserWarning, match="not the published files"):  # (tiny files)
        task = get_task("wikitext2").build(make_config(data="real", data_dir=str(tmp_path), block_size=4, vocab_size=6))
    # train counts: "." 3; "=", cat, sat, the 2; Title, a, dog, ran 1 (ties alphabetical; <unk>, <eos> are specials)
    itos = ["<pad>", "<unk>", "<bos>", "<eos>", ".", "=", "cat", "sat", "the", "Title"]
    stoi = {w: i for i, w in enumerate(itos)}
    encode = lambda text: [stoi.get(t, UNK_ID) for t in lines_to_tokens(text.splitlines())]  # noqa: E731
    assert task.info["vocab_size"] == len(itos)
    assert task.train.ids.tolist() == encode(TRAIN)
    assert task.train.ids.tolist()[:6] == [5, 9, 5, EOS_ID, EOS_ID, 8]
    # the train stream has 20 tokens -> (20 - 1) // 4 = 4 blocks
    assert len(task.train) == 4 and task.info["blocks"] == {"train": 4, "val": 2, "test": 2}
    x, y = task.train[3]
    assert x.tolist() == [4, EOS_ID, UNK_ID, UNK_ID] and y.tolist() == [EOS_ID, UNK_ID, UNK_ID, 7]
    # "zebra" and "ate" never occur in the training file, "dog" fell to the size cap
    assert task.val.ids.tolist() == [8, UNK_ID, UNK_ID, 4, EOS_ID, 8, UNK_ID, 7, 4, EOS_ID]
    assert task.data_source.startswith("real:") and str(tmp_path / "wikitext-2" / "wiki.train.tokens") in task.data_source
    # unigram reference: add-one counts of the train ids, on the 8 validation targets of the 2 blocks
    counts = torch.bincount(task.train.ids, minlength=len(itos)).double() + 1
    targets = task.val.ids[1:9]
    expected = -(counts[targets] / counts.sum()).log().mean().item()
    assert task.reference["unigram_loss"] == pytest.approx(expected)
    assert task.reference["unigram_ppl"] == pytest.approx(math.exp(expected))
    targets = task.test.ids[1:9]  # and on the test split's
    assert task.reference["test_unigram_loss"] == pytest.approx(-(counts[targets] / counts.sum()).log().mean().item())


def test_missing_train_file_names_every_expected_path(tmp_path):
    folder = write_wiki(tmp_path, TRAIN, VALID, TEST)
    (folder / "wiki.train.tokens").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        get_task("wikitext2").build(make_config(data="real", data_dir=str(tmp_path)))
    msg = str(info.value)
    for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
        assert str(folder / name) in msg
    assert "ablate data download wikitext2" in msg and "there is no folder" not in msg  # (it is there)
    with pytest.raises(DatasetNotFoundError) as info:  # no wikitext-2 folder: it names the one that would do too
        get_task("wikitext2").build(make_config(data="real", data_dir=str(tmp_path / "elsewhere")))
    assert f"and there is no folder {tmp_path / 'elsewhere' / 'wikitext-2'}, the other place" in str(info.value)


def test_malformed_files(tmp_path):
    folder = write_wiki(tmp_path, TRAIN, VALID, TEST)
    (folder / "wiki.valid.tokens").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(DatasetNotFoundError, match="UTF-8"):
        get_task("wikitext2").build(make_config(data="real", data_dir=str(folder), block_size=4))
    (folder / "wiki.valid.tokens").write_text(" a \n", encoding="utf-8")
    with pytest.raises(DatasetNotFoundError, match="too few"):
        get_task("wikitext2").build(make_config(data="real", data_dir=str(folder), block_size=4))


def test_files_of_other_token_counts_than_the_published_ones_are_warned_about_and_recorded(tmp_path, monkeypatch):
    # a copy cut short (at a line end: still valid UTF-8) used to train and score without a word, on other data
    import ablate.tasks.wikitext as wikitext

    folder = write_wiki(tmp_path, TRAIN, VALID, TEST)  # 20, 10 and 10 tokens
    config = make_config(data="real", data_dir=str(tmp_path), block_size=4)
    with pytest.warns(DataWarning, match=r"wikitext2: not the published files: wiki\.train\.tokens 20 tokens where it "
                                         r"has 2,088,628; wiki\.valid\.tokens 10 tokens where it has 217,646; "
                                         r"wiki\.test\.tokens 10 tokens where it has 245,569 \(in .*\) - perplexities "
                                         r"not comparable .*`ablate data download wikitext2 --data-dir .* --force` fetches the "
                                         r"published ones, read in their place\)$"):
        task = get_task("wikitext2").build(config)
    files = ",".join(str((folder / name).resolve()) for name in ("wiki.train.tokens", "wiki.valid.tokens",
                                                                 "wiki.test.tokens"))
    assert task.data_source == (f"real:{files} (not the published files: wiki.train.tokens 20 tokens where it has "
                                f"2,088,628; wiki.valid.tokens 10 tokens where it has 217,646; wiki.test.tokens 10 "
                                f"tokens where it has 245,569)")
    # files of the published sizes: no warning, the plain source (only the differing file is named)
    monkeypatch.setattr(wikitext, "PUBLISHED_TOKENS", {"train": 20, "val": 10, "test": 10})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_task("wikitext2").build(config).data_source == f"real:{files}"
    monkeypatch.setattr(wikitext, "PUBLISHED_TOKENS", {"train": 20, "val": 10, "test": 11})
    with pytest.warns(DataWarning, match="not the published files: wiki.test.tokens 10 tokens where it has 11 "):
        assert get_task("wikitext2").build(config).data_source.endswith(
            " (not the published files: wiki.test.tokens 10 tokens where it has 11)")


def test_embedded_corpus_is_deterministic_and_independent_of_global_rng():
    generate_corpus.cache_clear()
    random.seed(1)
    torch.manual_seed(1)
    first = generate_corpus(5, 123).encode()
    generate_corpus.cache_clear()
    random.seed(2)
    torch.manual_seed(2)
    assert generate_corpus(5, 123).encode() == first
    assert generate_corpus(5, 124).encode() != first
    lines = first.decode().splitlines()
    assert lines[0].startswith(" = ") and lines[0].endswith(" = ")  # an article title, WikiText style


def test_the_check_knows_the_length_of_the_smallest_embedded_split():
    assert min(len(tokens) for tokens in embedded_splits().values()) == EMBEDDED_MIN_TOKENS
    assert len(LMBlocks(torch.arange(EMBEDDED_MIN_TOKENS), EMBEDDED_MIN_TOKENS - 1)) == 1
    assert make_config(block_size=EMBEDDED_MIN_TOKENS - 1)["block_size"] == EMBEDDED_MIN_TOKENS - 1
    with pytest.raises(ConfigError, match=f"block_size={EMBEDDED_MIN_TOKENS} leaves the embedded validation split"):
        make_config(block_size=EMBEDDED_MIN_TOKENS)


def test_embedded_task_trains_with_adamw():
    torch.manual_seed(0)
    config = make_config()
    task = get_task("wikitext2").build(config)
    assert task.data_source == "embedded:generated-grammar-v2"
    assert len(task.train) > 0 and len(task.val) > 0 and len(task.test) > 0
    assert 100 < task.info["vocab_size"] <= config["vocab_size"] + 4
    assert 1.0 < task.reference["unigram_ppl"] < task.info["vocab_size"]
    loader = torch.utils.data.DataLoader(task.train, batch_size=config["batch_size"], shuffle=True)
    probe = next(iter(torch.utils.data.DataLoader(task.val, batch_size=16)))
    task.model.eval()
    before = task.loss_fn(task.model, probe).item()
    assert before == pytest.approx(math.log(task.info["vocab_size"]), abs=0.3)  # near-uniform at init
    train_with_adamw(task, itertools.islice(loader, 12), config["lr"], config["weight_decay"])
    task.model.eval()
    after = task.loss_fn(task.model, probe).item()
    assert after < before - 0.4


def test_evaluate_is_token_weighted_and_restores_mode():
    torch.manual_seed(0)
    task = get_task("wikitext2").build(make_config(block_size=16, d_model=32, n_heads=2, n_layers=1))
    subset = torch.utils.data.Subset(task.val, range(5))
    loader = torch.utils.data.DataLoader(subset, batch_size=2)  # batches of 2, 2 and 1 blocks
    task.model.train()
    metrics = task.evaluate(task.model, loader)
    assert task.model.training
    assert set(metrics) == {"ppl", "loss"}
    task.model.eval()
    with torch.no_grad():
        x = torch.stack([subset[i][0] for i in range(5)])
        y = torch.stack([subset[i][1] for i in range(5)])
        expected = F.cross_entropy(task.model(x).flatten(0, 1), y.flatten()).item()
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    task.evaluate(task.model, loader)
    assert not task.model.training


def test_second_order_gradients():
    torch.manual_seed(0)
    task = get_task("wikitext2").build(make_config(block_size=16, d_model=32, n_heads=2, n_layers=1))
    batch = next(iter(torch.utils.data.DataLoader(task.train, batch_size=4)))
    assert_second_order_gradients(task, batch)


@pytest.mark.realdata
def test_real_wikitext2_layout():
    folder = SHARED_DATA / "wikitext-2"
    if not (folder / "wiki.valid.tokens").is_file():
        pytest.skip("../shared/data/wikitext-2 is not available")
    config = make_config(data="real", data_dir=str(SHARED_DATA))
    if (folder / "wiki.train.tokens").is_file():
        assert get_task("wikitext2").build(config).info["vocab_size"] == 10000 + 4
        return
    with pytest.raises(DatasetNotFoundError) as info:
        get_task("wikitext2").build(config)
    assert str(folder / "wiki.train.tokens") in str(info.value)
    assert "ablate data download wikitext2" in str(info.value)


@pytest.mark.realdata
def test_real_valid_file_through_the_real_parser(tmp_path):
    folder = SHARED_DATA / "wikitext-2"
    if not (folder / "wiki.valid.tokens").is_file() or not (folder / "wiki.test.tokens").is_file():
        pytest.skip("../shared/data/wikitext-2 is not available")
    target = tmp_path / "wikitext-2"
    target.mkdir()
    valid = (folder / "wiki.valid.tokens").read_text(encoding="utf-8")
    (target / "wiki.train.tokens").write_text(valid, encoding="utf-8")  # the real train file is not shipped
    shutil.copy(folder / "wiki.valid.tokens", target)
    shutil.copy(folder / "wiki.test.tokens", target)
    with pytest.warns(UserWarning, match="not the published files: wiki.train.tokens 217,646 tokens "):
        task = get_task("wikitext2").build(make_config(data="real", data_dir=str(tmp_path)))
    n_lines = len(valid.splitlines())
    assert task.info["tokens"]["val"] == len(valid.split()) + n_lines  # one <eos> per line
    # the published token counts of the valid and test files (the train file here is a copy of valid)
    assert (task.info["tokens"]["val"], task.info["tokens"]["test"]) == (217_646, 245_569)
    assert task.data_source.endswith(" (not the published files: wiki.train.tokens 217,646 tokens where it has 2,088,628)")
    assert task.info["vocab_size"] == 10000 + 4  # the file has ~13.8k word types: capped
    assert len(task.val) == (task.info["tokens"]["val"] - 1) // 128
    assert 0.03 < task.info["unk_rate"]["val"] < 0.15  # the file's own <unk> plus the words past the cap
    assert 100 < task.reference["unigram_ppl"] < 2000


def test_embedded_splits_share_the_training_splits_topics():
    # The grammar's topics (the nouns each owns, and their Zipf ranks) are drawn from the generator's seed:
    # validation and test must be articles of the same grammar as training. A seed of their own gave them
    # topics of their own - another distribution, which nothing learned on train could predict: their noun
    # frequencies were 0.38 / 0.34 from train's in total variation (0.35 still for 400 articles of such a seed),
    # against 0.10-0.22 for any 40 further articles of the training grammar.
    from collections import Counter

    import ablate.tasks.wikitext as wikitext

    nouns = {**{n: n for n in wikitext._NOUNS}, **{wikitext._plural(n): n for n in wikitext._NOUNS}}

    def noun_frequencies(tokens):
        counts = Counter(nouns[t.lower()] for t in tokens if t.lower() in nouns)
        total = sum(counts.values())
        return {n: c / total for n, c in counts.items()}

    splits = embedded_splits()
    train = noun_frequencies(splits["train"])
    for split in ("val", "test"):
        held_out = noun_frequencies(splits[split])
        distance = sum(abs(train.get(n, 0) - held_out.get(n, 0)) for n in set(train) | set(held_out)) / 2
        assert distance < 0.28, (split, distance)
