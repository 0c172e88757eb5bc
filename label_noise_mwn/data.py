"""Data for Meta-Weight-Net label-noise experiments: CIFAR/MNIST readers, label corruption, meta split.

    data = load_dataset("cifar10", data_root)            # uint8 images [N, C, 32, 32], int64 labels
    split = make_noisy_split(data.train_labels, num_classes, num_meta=1000,
                             corruption="unif", corruption_prob=0.4, seed=2, meta_seed=1)
    x = augment(normalize_batch(images_uint8, data.mean, data.std), generator, flip=True)

CIFAR is read from the official python-pickle archives (``cifar-10-batches-py/``,
``cifar-100-python/``), optionally downloaded from the official URL with the MD5 checked.
MNIST comes from ``common.mnist`` (full IDX files or the embedded 5k subset), zero-padded to 32x32.
Label corruption follows Shu et al.'s MWN code (``uniform_mix_C``, ``flip_labels_C``,
``flip_labels_C_two``): a row-stochastic matrix C with C[true, noisy] = P(noisy | true).
"""
from __future__ import annotations

import hashlib
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.mnist import MNIST_MEAN, MNIST_STD, load_mnist
from common.runtime import DataError

CIFAR_ARCHIVES = {  # dataset: (folder, url, md5 of the .tar.gz, train files, test file, label key)
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                b"labels"),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", ["train"], "test", b"fine_labels"),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10}
# per-channel statistics used by the MWN code for CIFAR (pixel values / 255)
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
CORRUPTIONS = ("unif", "flip", "flip2")


@dataclass
class ImageData:
    train_images: torch.Tensor  # uint8 [N, C, 32, 32]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor   # uint8 [M, C, 32, 32]
    test_labels: torch.Tensor   # int64 [M]
    num_classes: int
    mean: tuple[float, ...]     # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    source: str


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------

def _read_pickle_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One official CIFAR pickle file -> (uint8 [n, 3, 32, 32], int64 [n]).

    Pixels must be integers in 0..255 and labels integers in 0..num_classes − 1; anything else
    (float pixels, which a cast to uint8 would silently wrap, or labels naming unknown classes) is
    a DataError naming the file.
    """
    if not path.is_file():
        raise DataError(f"missing CIFAR file {path}: pass --download or put the official python "
                        "archive (extracted) under --data-root")
    try:
        with path.open("rb") as handle:
            entry = pickle.load(handle, encoding="bytes")
        data = np.asarray(entry[b"data"])
        labels = np.asarray(entry[label_key])
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataError(f"corrupt CIFAR file {path}: {type(err).__name__}: {err}") from None
    except ImportError as err:  # a pickle naming a module or class that is not here
        raise DataError(f"{path} is not an official CIFAR pickle: it refers to {err.name or 'a module'!s}, which "
                        f"cannot be imported ({type(err).__name__}); download the archive again") from None
    if data.dtype.kind not in "ui":
        raise DataError(f"corrupt CIFAR file {path}: pixel data of type {data.dtype}, expected integers 0..255")
    if labels.dtype.kind not in "ui":
        raise DataError(f"corrupt CIFAR file {path}: labels of type {labels.dtype}, expected integers")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"corrupt CIFAR file {path}: data shape {data.shape}, {len(labels)} labels")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(f"corrupt CIFAR file {path}: pixel values in {data.min()}..{data.max()}, expected 0..255")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"corrupt CIFAR file {path}: labels in {labels.min()}..{labels.max()} name unknown "
                        f"classes (this dataset has classes 0..{num_classes - 1})")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


def download_cifar(name: str, root: str | Path) -> Path:
    """Download and extract the official CIFAR python archive into ``root``, checking its MD5."""
    folder, url, md5, *_ = CIFAR_ARCHIVES[name]
    root = Path(root)
    if (root / folder).is_dir():
        return root
    root.mkdir(parents=True, exist_ok=True)
    archive = root / url.rsplit("/", 1)[1]
    if not archive.is_file() or hashlib.md5(archive.read_bytes()).hexdigest() != md5:
        try:
            with urllib.request.urlopen(url, timeout=120) as response:
                payload = response.read()
        except OSError as err:
            raise DataError(f"could not download {url}: {err}") from None
        if hashlib.md5(payload).hexdigest() != md5:
            raise DataError(f"MD5 mismatch for {url}; the download is corrupt, try again")
        archive.write_bytes(payload)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")
    return root


def load_cifar(name: str, data_root: str | Path | None, download: bool = False) -> ImageData:
    """CIFAR-10 or CIFAR-100 from the official pickle archives under ``data_root``."""
    if data_root is None:
        raise DataError(f"{name} needs --data-root (the folder holding {CIFAR_ARCHIVES[name][0]}/); "
                        "use --dataset mnist for the embedded offline data")
    if download:
        download_cifar(name, data_root)
    folder, _, _, train_files, test_file, label_key = CIFAR_ARCHIVES[name]
    base = Path(data_root) / folder
    if not base.is_dir():
        raise DataError(f"CIFAR folder {base} does not exist: pass --download or extract the official "
                        "python archive there")
    num_classes = NUM_CLASSES[name]
    parts = [_read_pickle_batch(base / f, label_key, num_classes) for f in train_files]
    test_x, test_y = _read_pickle_batch(base / test_file, label_key, num_classes)
    train_y = np.concatenate([p[1] for p in parts])
    return ImageData(torch.from_numpy(np.concatenate([p[0] for p in parts])), torch.from_numpy(train_y),
                     torch.from_numpy(test_x), torch.from_numpy(test_y), num_classes,
                     CIFAR_MEAN, CIFAR_STD, name)


def load_mnist32(data_root: str | Path | None, download: bool = False) -> ImageData:
    """MNIST (full from ``data_root`` or the embedded subset) zero-padded to uint8 [N, 1, 32, 32]."""
    mnist = load_mnist(data_root, download)

    def pad(images: torch.Tensor) -> torch.Tensor:
        return F.pad(images.unsqueeze(1), (2, 2, 2, 2))  # 28x28 -> 32x32, background 0

    return ImageData(pad(mnist.train_images), mnist.train_labels, pad(mnist.test_images), mnist.test_labels,
                     10, (MNIST_MEAN,), (MNIST_STD,), mnist.source)


def load_dataset(name: str, data_root: str | Path | None, download: bool = False) -> ImageData:
    """``cifar10``, ``cifar100`` or ``mnist`` as ``ImageData``."""
    if name == "mnist":
        return load_mnist32(data_root, download)
    if name in CIFAR_ARCHIVES:
        return load_cifar(name, data_root, download)
    raise DataError(f"unknown dataset {name!r}; choose cifar10, cifar100 or mnist")


# ---------------------------------------------------------------------------------------------
# label corruption and the clean meta set
# ---------------------------------------------------------------------------------------------

def corruption_matrix(kind: str, prob: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Row-stochastic C [num_classes, num_classes], C[i, j] = P(noisy label j | true label i).

    ``unif``: (1 − p) I + p / C (the replacement class may be the true one);
    ``flip``: 1 − p on the diagonal, p on one other class chosen at random per row;
    ``flip2``: 1 − p on the diagonal, p/2 on each of two other classes chosen at random per row.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"corruption probability must be in [0, 1], got {prob}")
    if kind == "unif":
        return prob * np.full((num_classes, num_classes), 1.0 / num_classes) + (1.0 - prob) * np.eye(num_classes)
    n_targets = {"flip": 1, "flip2": 2}.get(kind)
    if n_targets is None:
        raise ValueError(f"unknown corruption {kind!r}; choose from {CORRUPTIONS}")
    matrix = np.eye(num_classes) * (1.0 - prob)
    for i in range(num_classes):
        others = np.delete(np.arange(num_classes), i)
        matrix[i, rng.choice(others, n_targets, replace=False)] = prob / n_targets
    return matrix


def corrupt_labels(labels: np.ndarray, matrix: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw each noisy label from the row of ``matrix`` of its true label (inverse-CDF, vectorised)."""
    cdf = np.cumsum(matrix, axis=1)
    cdf[:, -1] = 1.0  # guard against rounding
    u = rng.random(len(labels))
    return (u[:, None] >= cdf[labels]).sum(axis=1).astype(np.int64)


@dataclass
class NoisySplit:
    train_index: torch.Tensor   # int64 [N_train], into the original training set
    train_labels: torch.Tensor  # int64 [N_train], noisy
    clean_labels: torch.Tensor  # int64 [N_train], true
    meta_index: torch.Tensor    # int64 [num_meta], clean and class-balanced
    matrix: np.ndarray          # corruption matrix used

    @property
    def noise_rate(self) -> float:
        """Fraction of training labels that differ from the true label."""
        return (self.train_labels != self.clean_labels).float().mean().item()

    @property
    def meta_in_train(self) -> int:
        """Number of meta images that are also in the (noisy) training set."""
        return int(np.isin(self.meta_index.numpy(), self.train_index.numpy()).sum())


def _class_split(labels: np.ndarray, num_classes: int, per_class: int,
                 rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Shuffle each class's indices with ``rng``; the first ``per_class`` of each go to meta, the rest to train."""
    meta, rest = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) <= per_class:
            raise ValueError(f"class {c} has {len(idx)} images, not enough for {per_class} meta images")
        meta.append(idx[:per_class])
        rest.append(idx[per_class:])
    return meta, rest


def make_noisy_split(labels: torch.Tensor, num_classes: int, num_meta: int, corruption: str,
                     corruption_prob: float, seed: int, train_size: int | None = None,
                     meta_seed: int | None = 1) -> NoisySplit:
    """A clean class-balanced meta set of ``num_meta`` images and a training set with corrupted labels.

    Two protocols:

    * ``meta_seed`` an integer (default 1: the authors' ``load_corrupted_data.py``, where the meta
      set and the flip matrices always come from seed 1): the meta set is the first num_meta / C
      images of each class shuffled by ``meta_seed``, the corruption matrix is drawn from
      ``meta_seed``; the training set is what remains of each class shuffled by ``seed`` and its
      noisy labels are drawn from ``seed``. When ``seed != meta_seed`` most meta images are also in
      the training set, there with possibly corrupted labels (``NoisySplit.meta_in_train``).
    * ``meta_seed=None`` (ours): one stream from ``seed`` draws the meta split, the training set,
      the corruption matrix and the labels; meta and training sets are disjoint for every seed.

    With ``seed == meta_seed`` and ``unif`` noise both protocols give the same split.

    Args:
        labels: true training labels, int64 [N].
        num_classes: number of classes C; ``num_meta`` must be a multiple of C.
        num_meta: size of the clean meta set (num_meta / C images per class).
        corruption: ``unif``, ``flip`` or ``flip2``.
        corruption_prob: p.
        seed: seeds the training set and the label draws (and, with ``meta_seed=None``, everything).
        train_size: keep only this many (random) noisy training examples; None keeps all.
        meta_seed: seed of the meta set and the corruption matrix, or None for ours (above).

    Raises:
        ValueError: if ``num_meta`` is not a multiple of C or a class has too few images.
    """
    if num_meta % num_classes:
        raise ValueError(f"num_meta ({num_meta}) must be a multiple of the number of classes ({num_classes})")
    rng = np.random.default_rng(seed)
    labels_np = labels.numpy()
    per_class = num_meta // num_classes
    meta, rest = _class_split(labels_np, num_classes, per_class, rng)
    if meta_seed is not None:  # the authors': the meta set from its own seed, the training set from ``seed``
        meta, _ = _class_split(labels_np, num_classes, per_class, np.random.default_rng(meta_seed))
    train_index = rng.permutation(np.concatenate(rest))
    if train_size is not None:
        train_index = train_index[:train_size]
    matrix_rng = rng if meta_seed is None else np.random.default_rng(meta_seed)
    matrix = corruption_matrix(corruption, corruption_prob, num_classes, matrix_rng)
    clean = labels_np[train_index]
    noisy = corrupt_labels(clean, matrix, rng)
    return NoisySplit(torch.from_numpy(train_index), torch.from_numpy(noisy), torch.from_numpy(clean),
                      torch.from_numpy(np.sort(np.concatenate(meta))), matrix)


# ---------------------------------------------------------------------------------------------
# normalisation and augmentation (torch, batched)
# ---------------------------------------------------------------------------------------------

def normalize_batch(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float, (x / 255 − mean_c) / std_c."""
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float().div_(255.0) - mean_t).div_(std_t)


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """MWN augmentation: reflect-pad by ``padding``, random crop back to H x W, random horizontal flip.

    Args:
        images: float [B, C, H, W] (already normalised).
        generator: CPU generator for the crop offsets and flips.
        padding: pad on each side before cropping.
        flip: flip each image horizontally with probability 1/2.

    Returns:
        float [B, C, H, W].
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (top[:, None] + torch.arange(h))[:, None, :, None]     # [B, 1, H, 1]
    cols = (left[:, None] + torch.arange(w))                      # [B, W]
    if flip:
        flipped = torch.rand(b, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    cols = cols[:, None, None, :]                                 # [B, 1, 1, W]
    batch = torch.arange(b)[:, None, None, None]
    channel = torch.arange(c)[None, :, None, None]
    return padded[batch, channel, rows, cols]
