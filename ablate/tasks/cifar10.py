"""CIFAR-10 image classification with a ResNet-18 (``cifar10``).

Real data: the canonical python version of CIFAR-10 (Krizhevsky, 2009), the folder
``cifar-10-batches-py`` with ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``: pickled
dicts whose ``b"data"`` is a uint8 array (N, 3072) - 1024 red, then green, then blue pixels of a
32x32 image, row by row - and ``b"labels"`` a list of N class indices 0-9. The task trains on
whichever ``data_batch_*`` files exist; fewer than the 50,000 training images of the five, or
than the 10,000 of ``test_batch``, is warned about and recorded in the results' ``data_source``
(``"real:<dir> (partial: ...)"``). Task key ``split``:

* ``"holdout"`` (default): a fixed stratified 10% of the training images (seed 0, whatever the
  trial's seed) is the validation split - early stopping, the best weights and MetaAdamW's
  validation-loss objectives use it - and ``test_batch`` is the test split, evaluated once at the
  best weights (``test_accuracy``): a held-out number neither optimizer has seen.
* ``"paper"``: validate on ``test_batch`` and train on every training image, as the paper does.
  Then model selection and the meta-objective see the test images, and the reported accuracy is
  on the same images: use it to compare with the paper, not as a held-out result.
Images are normalised per channel with the CIFAR-10 training mean/std; training images are
augmented on the fly (random 32x32 crop of the zero-padded image, random horizontal flip) with
torch's global RNG, so ``torch.manual_seed`` makes the augmentation reproducible.

Model: ResNet-18 for 32x32 images (3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2], widths
64-128-256-512, BatchNorm); task keys ``width`` and ``blocks``. Metrics: accuracy (primary) and
cross-entropy; ``reference`` holds the accuracy of always predicting the most frequent training
class.

Embedded variant (``data: embedded``): scikit-learn's real 8x8 handwritten digits
(``sklearn.datasets.load_digits``, 1,797 images of 10 classes, shipped with the package), each
upsampled to 16x16 by pixel repetition and copied into three channels; a fixed stratified 80/20
train/validation split; a ResNet of width 16 with one block per stage; augmentation without
flips (digits are not mirror-symmetric) and with a 2-pixel crop padding.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from ablate.config import ConfigError
from ablate.files import atomic_write_bytes
from ablate.tasks.base import (
    DataWarning,
    DatasetNotFoundError,
    Download,
    TaskInstance,
    also_looked_in,
    check_bool,
    check_choice,
    check_int,
    classifier_loss,
    evaluate_classifier,
    refetch_advice,
    register_download,
    register_task,
    resolve_data_dir,
)
from ablate.tasks.models_vision_ts import ResNet

CIFAR_SUBDIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
FULL_TRAIN_IMAGES = 50_000  # (10,000 in each)
FULL_TEST_IMAGES = 10_000  # (test_batch)
TEST_FILE = "test_batch"
SPLITS = ("holdout", "paper")
HOLDOUT_FRACTION = 0.1  # of each class's training images
HOLDOUT_SEED = 0  # the split is fixed, whatever the trial's seed
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
# Per-channel mean and standard deviation of the 50,000 CIFAR-10 training images (in [0, 1]).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
#: the embedded data's version (TaskSpec.embedded_version: part of an embedded trial's id; change it with the data)
EMBEDDED_VERSION = "sklearn-digits"
EMBEDDED_SOURCE = f"embedded:{EMBEDDED_VERSION}"
DIGITS_UPSAMPLE = 2  # 8x8 -> 16x16
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # the split is fixed, whatever the trial's seed

# The paper's settings (Table 4 and its training set-up).
DEFAULTS: dict[str, Any] = {
    "batch_size": 128,
    "epochs": 15,
    "min_delta": 1e-3,
    "lr": 5e-4,
    "weight_decay": 1e-2,
    "meta_every": 190,
    "modulator_layers": 64,
    "modulator_ff": 64,
    "modulator_heads": 6,
    "features": "basic",
    "gating": False,
    "priorities": [5.0, 2.0, 1.0],
    "weighting_form": "classification",
    # task keys
    "split": "holdout",
    "width": 64,
    "blocks": [2, 2, 2, 2],
    "crop_padding": 4,
    "hflip": True,
}

# About 0.5 s per epoch on one idle CPU core with AdamW (23 steps of 64 images; 1.2-1.6 s on a
# busy machine), two meta-updates per epoch; the validation accuracy passes 0.95 within 4 epochs.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "batch_size": 64,
    "epochs": 4,
    "meta_every": 11,
    "modulator_layers": 2,
    "modulator_ff": 16,
    "width": 16,
    "blocks": [1, 1, 1, 1],
    "crop_padding": 2,
    "hflip": False,
}


# -- reading the canonical batches -------------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds (dicts, lists, bytes, numbers, numpy arrays), so a
    tampered file cannot run code."""

    ALLOWED = {
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one CIFAR-10 python batch file."""
    try:
        with open(path, "rb") as file:
            batch = _BatchUnpickler(file, encoding="bytes").load()
    except Exception as error:  # any corruption: truncated file, wrong format, foreign objects
        raise _damaged(path, f"is not a readable CIFAR-10 python batch: {str(error).rstrip('. ')}") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise _damaged(path, "is not a CIFAR-10 python batch: expected a dict with keys b'data' and b'labels'")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    n_pixels = int(np.prod(IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != n_pixels:
        raise _damaged(path, f"has no valid b'data': it must be a uint8 array (N, {n_pixels}), got {data.dtype} {data.shape}")
    integral = labels.shape == (len(data),) and np.issubdtype(labels.dtype, np.integer)
    if not integral or (labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES)):
        raise _damaged(path, f"has no valid b'labels': they must be {len(data)} class indices in 0-{NUM_CLASSES - 1}")
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


def _damaged(path: Path, problem: str) -> DatasetNotFoundError:
    """The error for a batch file that is there but unreadable: what is wrong, and how to replace it."""
    return DatasetNotFoundError(
        f"cifar10: {path} {problem}. Replace the batches: `ablate data download cifar10 --force` fetches them again "
        f"(a file in place is otherwise kept), or download {CIFAR_URL} and unpack it into the data directory"
    )


def _missing_message(root: Path, what: str, force: bool = False) -> str:
    """``force``: the batches are all there, cut short - a download recorded as unpacked, its files in place, is
    fetched again only with --force."""
    return (
        f"cifar10: {what}; expected the CIFAR-10 python batches {root / 'data_batch_1'} ... "
        f"{root / 'data_batch_5'} (at least one) and {root / TEST_FILE}. Get them with "
        f"`ablate data download cifar10{' --force' if force else ''}`, or download {CIFAR_URL} and unpack it into "
        f"the data directory"
    )


def _packed_hint(archive: Path) -> str:
    """For a folder without the batches: the CIFAR-10 archive that is there, still packed."""
    if not (archive.is_file() and archive.name.endswith((".tar.gz", ".tgz"))):
        return ""
    return (f" ({archive} is an archive, still packed: `tar -xzf {archive} -C {archive.parent}` unpacks it into "
            f"{archive.parent / CIFAR_SUBDIR}, which data_dir={archive.parent} finds)")


def _batch_files(root: Path, also: str = "") -> list[str]:
    """The training batches present in ``root`` (DatasetNotFoundError when none, or no test batch;
    ``also``: where else the batches may lie, for its message)."""
    if root.is_file():
        raise DatasetNotFoundError(_missing_message(root, f"the data directory {root} is a file, not a folder"
                                                          f"{_packed_hint(root)}"))
    if not root.is_dir():
        raise DatasetNotFoundError(_missing_message(root, f"the directory {root} does not exist{also}"))
    train_files = [name for name in TRAIN_FILES if (root / name).is_file()]
    if not train_files:
        raise DatasetNotFoundError(_missing_message(root, f"no training batch data_batch_1..5 in {root}{also}"
                                                          f"{_packed_hint(root / ARCHIVE)}"))
    if not (root / TEST_FILE).is_file():
        raise DatasetNotFoundError(_missing_message(root, f"no {TEST_FILE} in {root}{also}"))
    return train_files


def locate(config: dict) -> list[Path]:
    """The real batch files (:attr:`ablate.tasks.base.TaskSpec.locate`)."""
    root = resolve_data_dir(config, CIFAR_SUBDIR)
    return [root / name for name in [*_batch_files(root, also_looked_in(config, CIFAR_SUBDIR, root)), TEST_FILE]]


def load_cifar10(root: Path, also: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Train images/labels (every existing data_batch_*), test images/labels (test_batch), and
    the names of the training files used (``also``: see :func:`_batch_files`)."""
    train_files = _batch_files(root, also)
    batches = [read_batch(root / name) for name in train_files]
    train_x = np.concatenate([x for x, _ in batches])
    train_y = np.concatenate([y for _, y in batches])
    val_x, val_y = read_batch(root / TEST_FILE)
    return train_x, train_y, val_x, val_y, train_files


def holdout_split(labels: np.ndarray, fraction: float = HOLDOUT_FRACTION,
                  seed: int = HOLDOUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of the training and validation images: ``round(fraction * n)`` of each
    class's n images, drawn with ``numpy.random.default_rng(seed)``, go to validation."""
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        val.append(rng.permutation(idx)[: round(fraction * len(idx))])
    val_idx = np.sort(np.concatenate(val)) if val else np.array([], dtype=int)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def load_digits_images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 RGB images (N, 3, 16, 16): train and validation images and
    labels of a fixed stratified 80/20 split.

    The arrays are cached in :func:`digits_cache_path` (1.4 MB) the first time: importing
    scikit-learn costs a fresh Ray worker about 0.7 s, paid once per worker and sweep otherwise."""
    path = digits_cache_path()
    if path is not None and path.is_file():
        try:
            with np.load(path) as cached:
                return cached["train_x"], cached["train_y"], cached["val_x"], cached["val_y"]
        except Exception:  # unreadable, truncated (BadZipFile, EOFError), another layout: rebuild it
            pass
    arrays = _digits_from_sklearn()
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, train_x=arrays[0], train_y=arrays[1], val_x=arrays[2], val_y=arrays[3])
        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError:  # a read-only home: no cache, same arrays
            pass
    return arrays


def digits_cache_path() -> Path | None:
    """``$ABLATE_CACHE_DIR`` (else ``$XDG_CACHE_HOME/ablate``, else ``~/.cache/ablate``) /
    ``digits-<split settings>-sklearn<version>.npz``; None when scikit-learn is not installed."""
    try:
        version = importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:
        return None
    root = os.environ.get("ABLATE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "ablate")
    name = f"digits-x{DIGITS_UPSAMPLE}-val{DIGITS_VAL_FRACTION}-seed{DIGITS_SPLIT_SEED}-sklearn{version}.npz"
    return Path(root).expanduser() / name


def _digits_from_sklearn() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    gray = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # pixel values 0-16 -> 0-255
    gray = gray.repeat(DIGITS_UPSAMPLE, axis=1).repeat(DIGITS_UPSAMPLE, axis=2)
    images = np.repeat(gray[:, None], 3, axis=1)
    labels = digits.target.astype(np.int64)
    train, val = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_VAL_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    return images[train], labels[train], images[val], labels[val]


# -- datasets ----------------------------------------------------------------------------------


def random_crop(image: torch.Tensor, padding: int) -> torch.Tensor:
    """A crop of the image's size from the zero-padded image, at a position drawn with torch's
    global RNG (torchvision's ``RandomCrop(size, padding)``)."""
    height, width = image.shape[-2:]
    padded = F.pad(image, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    return padded[..., top : top + height, left : left + width]


class ImageDataset(Dataset):
    """uint8 images (N, C, H, W) and labels; item ``i`` is ``(normalised float image, label)``.

    ``crop_padding > 0`` crops each item at random from the zero-padded image and ``hflip`` flips
    it horizontally with probability 1/2; both draw from torch's global RNG. The validation set
    uses neither.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, crop_padding: int = 0, hflip: bool = False):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels))
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.crop_padding = crop_padding
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i].float() / 255.0
        if self.crop_padding:
            image = random_crop(image, self.crop_padding)
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return (image - self.mean) / self.std, self.labels[i]


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W), in [0, 1] units."""
    scaled = images.astype(np.float64) / 255.0
    return scaled.mean(axis=(0, 2, 3)), scaled.std(axis=(0, 2, 3))


def majority_accuracy(train_labels: np.ndarray, val_labels: np.ndarray) -> float:
    """Validation accuracy of always predicting the most frequent training class."""
    majority = np.bincount(train_labels, minlength=NUM_CLASSES).argmax()
    return float(np.mean(val_labels == majority))


# -- the task ----------------------------------------------------------------------------------


def check(config: dict) -> None:
    """The task keys of a resolved config (:attr:`ablate.tasks.base.TaskSpec.check`)."""
    check_int(config, "width", "channels of the first ResNet stage")
    blocks = config["blocks"]
    if not (isinstance(blocks, (list, tuple)) and blocks
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in blocks)):
        raise ConfigError(
            f"cifar10: blocks={blocks!r} must be a non-empty list of integers >= 1 (BasicBlocks per ResNet stage)"
        )
    check_int(config, "crop_padding", "zero padding of the random crop; 0: no crop", minimum=0)
    check_choice(config, "split", SPLITS)
    check_bool(config, "hflip", "random horizontal flips")


@register_task(
    "cifar10",
    metrics=[("accuracy", "max"), ("loss", "min")],
    defaults=DEFAULTS,
    embedded_defaults=EMBEDDED_DEFAULTS,
    description="CIFAR-10 image classification with a ResNet-18",
    locate=locate,
    check=check,
    embedded_version=EMBEDDED_VERSION,
)
def build_cifar10_task(config: dict) -> TaskInstance:
    """Build the CIFAR-10 task (or its embedded digits variant) from a resolved trial config."""
    if config["data"] == "embedded":
        train_x, train_y, val_x, val_y = load_digits_images()
        mean, std = channel_stats(train_x)
        source, train_files, test = EMBEDDED_SOURCE, [], None
    else:
        root = resolve_data_dir(config, CIFAR_SUBDIR)
        train_x, train_y, test_x, test_y, train_files = load_cifar10(root, also_looked_in(config, CIFAR_SUBDIR, root))
        mean, std = CIFAR_MEAN, CIFAR_STD
        source = f"real:{root.resolve()}"
        short = [f"{len(train_y):,} training images from {', '.join(train_files)}, of the {FULL_TRAIN_IMAGES:,} in "
                 f"data_batch_1..5"] if len(train_y) < FULL_TRAIN_IMAGES else []
        if len(test_y) < FULL_TEST_IMAGES:  # (split 'paper' validates on it, 'holdout' tests on it)
            short.append(f"{len(test_y):,} test images, of the {FULL_TEST_IMAGES:,} in test_batch")
        if short:  # (recorded with every result: the report's data sources say so)
            partial = "partial: " + "; ".join(short)
            # (--force: without it, an archive recorded as unpacked with its files all in place - batches cut short
            # or swapped for smaller ones - is not fetched again)
            warnings.warn(f"cifar10: {partial} in {root} - accuracies not comparable with the full dataset's "
                          f"({refetch_advice('cifar10', config)})",
                          DataWarning, stacklevel=2)
            source += f" ({partial})"
        if config["split"] == "paper":
            val_x, val_y, test = test_x, test_y, None
        else:
            train_idx, val_idx = holdout_split(train_y)
            if not len(val_idx) or not len(train_idx):
                raise DatasetNotFoundError(_missing_message(
                    root, f"{len(train_y)} training images are too few to hold out {HOLDOUT_FRACTION:.0%} of each "
                          f"class for validation (or use split='paper')", force=True))
            val_x, val_y = train_x[val_idx], train_y[val_idx]
            train_x, train_y = train_x[train_idx], train_y[train_idx]
            test = ImageDataset(test_x, test_y, mean, std)
    model = ResNet(blocks=config["blocks"], width=config["width"], num_classes=NUM_CLASSES, in_channels=train_x.shape[1])
    return TaskInstance(
        name="cifar10",
        model=model,
        train=ImageDataset(train_x, train_y, mean, std, crop_padding=config["crop_padding"], hflip=config["hflip"]),
        val=ImageDataset(val_x, val_y, mean, std),
        test=test,
        loss_fn=classifier_loss,
        evaluate=evaluate_classifier,
        data_source=source,
        reference={"majority_accuracy": majority_accuracy(train_y, val_y),
                   **({"test_majority_accuracy": majority_accuracy(train_y, test.labels.numpy())} if test is not None else {})},
        info={
            "num_classes": NUM_CLASSES,
            "image_shape": list(train_x.shape[1:]),
            "n_train": len(train_y),
            "n_val": len(val_y),
            "n_test": 0 if test is None else len(test),
            "train_files": train_files,
        },
    )


register_download("cifar10", Download(url=CIFAR_URL, filename=ARCHIVE, md5=CIFAR_MD5, extract=True, folder=CIFAR_SUBDIR))
