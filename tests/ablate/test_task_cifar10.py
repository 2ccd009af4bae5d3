"""The CIFAR-10 task: batch reading, errors, normalisation, augmentation, embedded training."""

from __future__ import annotations

import io
import itertools
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ablate.tasks import DOWNLOADS, DataWarning, DatasetNotFoundError, get_task
from ablate.tasks import cifar10
from ablate.tasks.models_vision_ts import ResNet
from tests.ablate.task_helpers import SHARED_DATA, task_config, train_with_adamw

# the small fixtures are partial datasets: the tests that check the warning catch it themselves
pytestmark = pytest.mark.filterwarnings("ignore:cifar10. partial:UserWarning")


def write_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    """A batch file in the canonical format: a pickled dict with bytes keys, data (N, 3072)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {
        b"batch_label": b"fixture",
        b"labels": list(labels),
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"img{i}.png".encode() for i in range(len(images))],
    }
    with open(path, "wb") as file:
        pickle.dump(batch, file, protocol=2)


def fixture_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def write_cifar(root: Path, train_batches=("data_batch_1",), n: int = 6) -> dict[str, tuple[np.ndarray, list[int]]]:
    written = {}
    for seed, name in enumerate((*train_batches, "test_batch")):
        images, labels = fixture_images(n, seed), [(seed + i) % 10 for i in range(n)]
        write_batch(root / name, images, labels)
        written[name] = (images, labels)
    return written


def real_config(root: Path, **overrides) -> dict:
    return task_config("cifar10", data="real", data_dir=str(root), width=4, blocks=[1, 1], **overrides)


# -- reading -------------------------------------------------------------------------------------


def test_read_batch_keeps_the_channel_planes(tmp_path):
    data = np.concatenate([np.full((2, 1024), value, dtype=np.uint8) for value in (10, 20, 30)], axis=1)
    write_batch(tmp_path / "data_batch_1", data, [3, 7])
    images, labels = cifar10.read_batch(tmp_path / "data_batch_1")
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8
    assert [int(images[0, c].min()) for c in range(3)] == [10, 20, 30]
    assert [int(images[0, c].max()) for c in range(3)] == [10, 20, 30]
    assert labels.tolist() == [3, 7] and labels.dtype == np.int64


def test_loader_uses_the_training_batches_that_exist(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    written = write_cifar(root, train_batches=("data_batch_1", "data_batch_3"))
    train_x, train_y, val_x, val_y, files = cifar10.load_cifar10(root)
    assert files == ["data_batch_1", "data_batch_3"]
    np.testing.assert_array_equal(train_x, np.concatenate([written["data_batch_1"][0], written["data_batch_3"][0]]))
    assert train_y.tolist() == written["data_batch_1"][1] + written["data_batch_3"][1]
    np.testing.assert_array_equal(val_x, written["test_batch"][0])
    assert val_y.tolist() == written["test_batch"][1]


def test_task_on_a_fixture_with_the_papers_split(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    written = write_cifar(root)
    with pytest.warns(DataWarning, match=r"cifar10: partial: 6 training images from data_batch_1, of the 50,000 in "
                                         r"data_batch_1..5; 6 test images, of the 10,000 in test_batch in .* - "
                                         r"accuracies not comparable with the full dataset's \(`ablate data "
                                         r"download cifar10 --data-dir .* --force` fetches the published one, read in "
                                         r"its place\)$"):
        task = get_task("cifar10").build(real_config(tmp_path, split="paper"))  # data_dir is the parent folder
    # (a short test_batch too: the paper's split validates on it, and its accuracy was recorded as the full set's)
    assert task.data_source == (f"real:{root.resolve()} (partial: 6 training images from data_batch_1, of the 50,000 "
                                f"in data_batch_1..5; 6 test images, of the 10,000 in test_batch)")
    assert (len(task.train), len(task.val)) == (6, 6) and task.test is None
    assert task.info["train_files"] == ["data_batch_1"] and task.info["image_shape"] == [3, 32, 32]
    image, label = task.val[2]
    expected = (torch.from_numpy(written["test_batch"][0][2]).float() / 255 - torch.tensor(cifar10.CIFAR_MEAN).view(3, 1, 1)) / torch.tensor(cifar10.CIFAR_STD).view(3, 1, 1)
    torch.testing.assert_close(image, expected)
    assert int(label) == written["test_batch"][1][2]
    # training labels 0-5 tie, so the majority class is the first, 0, which the test labels 1-6 lack
    assert task.reference == {"majority_accuracy": 0.0}
    images, _ = next(iter(DataLoader(task.train, batch_size=6)))
    assert task.model(images).shape == (6, 10)


def test_holdout_split_validates_on_training_images_and_tests_on_the_test_batch(tmp_path):
    # the paper validates on test_batch, so early stopping and MetaAdamW's validation objectives
    # saw the test images; the default holds out 10% of each class of the training images instead
    root = tmp_path / "cifar-10-batches-py"
    images, labels = fixture_images(40, 7), [i % 4 for i in range(40)]
    write_batch(root / "data_batch_1", images, labels)
    test_images = fixture_images(5, 8)
    write_batch(root / "test_batch", test_images, [9, 8, 7, 6, 5])
    task = get_task("cifar10").build(real_config(tmp_path))
    assert (len(task.train), len(task.val), len(task.test)) == (36, 4, 5)
    assert task.info["n_test"] == 5 and sorted(int(task.val[i][1]) for i in range(4)) == [0, 1, 2, 3]
    train_idx, val_idx = cifar10.holdout_split(np.array(labels))
    assert set(train_idx).isdisjoint(val_idx) and len(train_idx) + len(val_idx) == 40
    assert np.array_equal(val_idx, cifar10.holdout_split(np.array(labels))[1])  # fixed, whatever the trial seed
    mean, std = torch.tensor(cifar10.CIFAR_MEAN).view(3, 1, 1), torch.tensor(cifar10.CIFAR_STD).view(3, 1, 1)
    torch.testing.assert_close(task.val[0][0], (torch.from_numpy(images[val_idx[0]]).float() / 255 - mean) / std)
    torch.testing.assert_close(task.test[1][0], (torch.from_numpy(test_images[1]).float() / 255 - mean) / std)
    assert int(task.test[1][1]) == 8
    # classes 0-3 tie in training, so the majority class is 0, which the test labels 9..5 lack
    assert task.reference == {"majority_accuracy": 0.25, "test_majority_accuracy": 0.0}
    with pytest.raises(DatasetNotFoundError, match="too few to hold out 10% of each class"):
        write_cifar(tmp_path / "small" / "cifar-10-batches-py")  # one image per class
        get_task("cifar10").build(real_config(tmp_path / "small"))


def test_missing_directory_is_reported(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match="does not exist") as info:
        get_task("cifar10").build(real_config(missing))
    assert str(missing / "data_batch_1") in str(info.value)
    # (with the config's data_dir: without it the download lands in ./data, where this config does not look)
    assert f"`ablate data download cifar10 --data-dir {missing}`" in str(info.value)
    assert f"and there is no folder {missing / 'cifar-10-batches-py'}, the other place" in str(info.value)
    with pytest.raises(DatasetNotFoundError, match=f"`ablate data download cifar10 --data-dir {missing}`"):
        get_task("cifar10").locate(real_config(missing))  # (what ablate run checks before Ray starts)


def test_a_packed_archive_is_named_with_the_command_that_unpacks_it(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    unpack = f"`tar -xzf {archive} -C {tmp_path}` unpacks it into {tmp_path / 'cifar-10-batches-py'}"
    for data_dir, problem in ((archive, f"the data directory {archive} is a file, not a folder"),  # (it said "does not exist")
                              (tmp_path, f"no training batch data_batch_1..5 in {tmp_path}")):
        with pytest.raises(DatasetNotFoundError) as info:
            get_task("cifar10").build(real_config(data_dir))
        assert problem in str(info.value) and unpack in str(info.value)


def test_missing_training_batches_are_reported(tmp_path):
    write_batch(tmp_path / "test_batch", fixture_images(2, 0), [0, 1])
    with pytest.raises(DatasetNotFoundError, match="no training batch data_batch_1..5") as info:
        get_task("cifar10").build(real_config(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "data_batch_1") in message and str(tmp_path / "data_batch_5") in message
    assert cifar10.CIFAR_URL in message


def test_missing_test_batch_is_reported(tmp_path):
    write_batch(tmp_path / "data_batch_2", fixture_images(2, 0), [0, 1])
    with pytest.raises(DatasetNotFoundError, match=f"no test_batch in {tmp_path}"):
        get_task("cifar10").build(real_config(tmp_path))


def test_malformed_batches_are_reported(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"not a pickle")
    with pytest.raises(DatasetNotFoundError, match=f"{path} is not a readable CIFAR-10 python batch") as info:
        cifar10.read_batch(path)
    assert "`ablate data download cifar10 --force` fetches them again" in str(info.value)
    write_batch(path, np.zeros((2, 100), dtype=np.uint8), [0, 1])
    with pytest.raises(DatasetNotFoundError, match=r"no valid b'data': it must be a uint8 array \(N, 3072\)"):
        cifar10.read_batch(path)
    write_batch(path, fixture_images(2, 0), [0, 10])
    with pytest.raises(DatasetNotFoundError, match="class indices in 0-9"):
        cifar10.read_batch(path)
    with open(path, "wb") as file:
        pickle.dump({b"data": os.system}, file)
    with pytest.raises(DatasetNotFoundError, match="unexpected object"):
        cifar10.read_batch(path)


# -- normalisation and augmentation ---------------------------------------------------------------


def test_random_crop_is_a_window_of_the_zero_padded_image():
    image = torch.arange(16.0).view(1, 4, 4) + 1
    torch.manual_seed(0)
    crops = [cifar10.random_crop(image, 1) for _ in range(50)]
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1))
    windows = [padded[:, i : i + 4, j : j + 4] for i in range(3) for j in range(3)]
    assert all(any(torch.equal(c, w) for w in windows) for c in crops)
    assert len({tuple(c.flatten().tolist()) for c in crops}) > 3


def test_augmentation_is_reproducible_under_manual_seed(tmp_path):
    write_cifar(tmp_path)
    task = get_task("cifar10").build(real_config(tmp_path, split="paper"))
    torch.manual_seed(3)
    first = [task.train[i][0] for i in range(6)]
    torch.manual_seed(3)
    second = [task.train[i][0] for i in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(task.train[0][0], task.train[0][0]) for _ in range(5))  # it does augment
    assert torch.equal(task.val[0][0], task.val[0][0])  # validation is never augmented


def test_flip_only_mirrors_the_image():
    images = fixture_images(1, 0)
    dataset = cifar10.ImageDataset(images, np.array([0]), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), hflip=True)
    plain = torch.from_numpy(images[0]).float() / 255
    torch.manual_seed(0)
    seen = [dataset[0][0] for _ in range(20)]
    assert all(torch.equal(s, plain) or torch.equal(s, plain.flip(-1)) for s in seen)
    assert any(torch.equal(s, plain) for s in seen) and any(torch.equal(s, plain.flip(-1)) for s in seen)


def test_majority_accuracy_by_hand():
    assert cifar10.majority_accuracy(np.array([1, 1, 2]), np.array([1, 2, 1, 1])) == 0.75


def test_resnet18_layout():
    model = ResNet(blocks=[2, 2, 2, 2], width=64)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # ResNet-18, CIFAR variant
    assert len(model.stages) == 8 and model.fc.in_features == 512


# -- registration and the embedded variant ---------------------------------------------------------


def test_a_partial_copy_is_fetched_again_by_the_command_its_warning_names(tmp_path, monkeypatch, capsys):
    # the warning named `ablate data download cifar10 --data-dir D`, without --force: a copy unpacked by that command
    # (its marker there) whose batches were later cut short has every file in place, and the command fetched nothing
    import hashlib
    import shlex
    import tarfile
    import urllib.request

    from ablate import data
    from ablate.cli import main
    from ablate.tasks import Download

    staged = tmp_path / "staged"
    write_cifar(staged / cifar10.CIFAR_SUBDIR, cifar10.TRAIN_FILES, n=7)  # (the "published" archive: 35 images)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(staged / cifar10.CIFAR_SUBDIR, arcname=cifar10.CIFAR_SUBDIR)
    archive = buf.getvalue()
    item = Download(url="https://example.org/c.tar.gz", filename=cifar10.ARCHIVE, md5=hashlib.md5(archive).hexdigest(),
                    extract=True, folder=cifar10.CIFAR_SUBDIR)
    monkeypatch.setitem(data.DOWNLOADS, "cifar10", [item])
    fetched = []
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda request, timeout=None: fetched.append(1) or _BytesResponse(archive))
    root = tmp_path / "data"
    assert main(["data", "download", "cifar10", "--data-dir", str(root)]) == 0 and len(fetched) == 1
    write_cifar(root / cifar10.CIFAR_SUBDIR, cifar10.TRAIN_FILES, n=2)  # (cut short in place: every file there)
    with pytest.warns(DataWarning, match="partial: 10 training images") as caught:
        get_task("cifar10").build(real_config(root, split="paper"))
    command = str(caught[0].message).split("`")[1]
    assert command == f"ablate data download cifar10 --data-dir {root} --force"
    assert main(["data", "download", "cifar10", "--data-dir", str(root)]) == 0 and len(fetched) == 1  # (no --force)
    assert main(shlex.split(command)[1:]) == 0 and len(fetched) == 2
    assert get_task("cifar10").build(real_config(root, split="paper")).info["n_train"] == 35  # (fetched again)
    capsys.readouterr()
    # the holdout split's error for batches too small to hold out a validation set names the command with --force too
    write_cifar(root / cifar10.CIFAR_SUBDIR, cifar10.TRAIN_FILES, n=1)
    with pytest.raises(DatasetNotFoundError, match=f"`ablate data download cifar10 --data-dir {root} --force`"):
        get_task("cifar10").build(real_config(root))


class _BytesResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_registration_and_download():
    spec = get_task("cifar10")
    assert [(m.name, m.mode) for m in spec.metrics] == [("accuracy", "max"), ("loss", "min")]
    assert spec.defaults["priorities"] == [5.0, 2.0, 1.0] and spec.defaults["weighting_form"] == "classification"
    assert spec.defaults["width"] == 64 and spec.defaults["blocks"] == [2, 2, 2, 2]
    (download,) = DOWNLOADS["cifar10"]
    assert download.url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert download.md5 == "c58f30108f718f92721af3b95e74349a" and download.extract


@pytest.fixture(scope="module")
def embedded_task():
    torch.manual_seed(0)
    return get_task("cifar10").build(task_config("cifar10"))


def test_embedded_variant_is_a_fixed_stratified_digits_split(embedded_task):
    assert embedded_task.data_source == "embedded:sklearn-digits"
    assert (len(embedded_task.train), len(embedded_task.val)) == (1437, 360)
    assert embedded_task.info["image_shape"] == [3, 16, 16]
    val_counts = np.bincount(embedded_task.val.labels.numpy(), minlength=10)
    assert val_counts.min() >= 35 and val_counts.max() <= 37  # stratified: about 36 per class
    again = get_task("cifar10").build(task_config("cifar10", seed=5))
    assert torch.equal(again.val.images, embedded_task.val.images)
    assert embedded_task.reference["majority_accuracy"] == pytest.approx(36 / 360)


def test_embedded_variant_trains_with_adamw():
    torch.manual_seed(0)
    task = get_task("cifar10").build(task_config("cifar10"))
    loader = DataLoader(task.train, batch_size=64, shuffle=True)
    val_loader = DataLoader(task.val, batch_size=180)
    before = task.evaluate(task.model, val_loader)
    losses = train_with_adamw(task, itertools.islice(loader, 16))
    after = task.evaluate(task.model, val_loader)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert after["loss"] < before["loss"] and after["accuracy"] > 2 * task.reference["majority_accuracy"]


def test_evaluate_averages_over_the_split_and_restores_the_mode(embedded_task):
    model = embedded_task.model
    model.train()
    by_100 = embedded_task.evaluate(model, DataLoader(embedded_task.val, batch_size=100))
    whole = embedded_task.evaluate(model, DataLoader(embedded_task.val, batch_size=360))
    assert set(by_100) == {"accuracy", "loss"} and model.training
    assert by_100["accuracy"] == whole["accuracy"] and by_100["loss"] == pytest.approx(whole["loss"], rel=1e-4)


def test_loss_is_twice_differentiable(embedded_task):
    batch = next(iter(DataLoader(embedded_task.train, batch_size=8)))
    params = list(embedded_task.model.parameters())
    grads = torch.autograd.grad(embedded_task.loss_fn(embedded_task.model, batch), params, create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in second)


# -- the real files (skipped where ../shared/data is absent) ---------------------------------------


@pytest.mark.realdata
def test_real_cifar_batches():
    root = (SHARED_DATA / "cifar-10-batches-py").resolve()
    if not (root / "test_batch").is_file():
        pytest.skip(f"no CIFAR-10 batches under {root}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = get_task("cifar10").build(task_config("cifar10", data="real", data_dir=str(SHARED_DATA)))
    n = 5000 * len(task.info["train_files"])  # 10% of each class held out (rounded per class)
    partial = [str(w.message) for w in caught if "partial" in str(w.message)]
    short = [f"{n:,} training images from {', '.join(task.info['train_files'])}, of the 50,000 in data_batch_1..5"
             ] if n < 50_000 else []
    short += [f"{len(task.test):,} test images, of the 10,000 in test_batch"] if len(task.test) < 10_000 else []
    assert (task.data_source, len(partial)) == ((f"real:{root} (partial: {'; '.join(short)})", 1) if short else
                                                (f"real:{root}", 0))
    assert len(task.train) + len(task.val) == n and abs(len(task.val) - n // 10) <= 5 and len(task.test) == 2000
    assert 0.09 < task.reference["majority_accuracy"] < 0.12
    images, labels = next(iter(DataLoader(task.val, batch_size=2)))
    assert images.shape == (2, 3, 32, 32) and abs(float(images.mean())) < 1.5
    task.model.eval()
    with torch.no_grad():
        assert task.model(images).shape == (2, 10)


def test_embedded_digits_are_cached_and_rebuilt_when_the_cache_is_bad(tmp_path, monkeypatch):
    monkeypatch.setenv("ABLATE_CACHE_DIR", str(tmp_path))
    path = cifar10.digits_cache_path()
    assert path is not None and path.parent == tmp_path and not path.exists()
    first = cifar10.load_digits_images()
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))

    def no_sklearn():
        raise AssertionError("the cached arrays must be read without scikit-learn")

    with monkeypatch.context() as m:
        m.setattr(cifar10, "_digits_from_sklearn", no_sklearn)
        cached = cifar10.load_digits_images()
    for a, b in zip(first, cached):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    good = path.read_bytes()
    for damaged in (b"not an npz file", good[: len(good) // 2], b""):  # foreign, truncated (BadZipFile), empty (EOFError)
        path.write_bytes(damaged)
        rebuilt = cifar10.load_digits_images()
        assert all(np.array_equal(a, b) for a, b in zip(first, rebuilt))
    assert np.load(path)["train_x"].shape == first[0].shape
