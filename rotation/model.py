"""Differentiable image rotation, the one-angle rotation transformer, and a widenable LeNet.

Angles are in radians inside the code (the angle is the hyperparameter λ, optimised by Adam in
radians as in the original code) and in degrees in results and plots. A positive angle rotates
the image counter-clockwise, as ``torchvision.transforms.functional.rotate`` does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rotation_grid(angle: Tensor, size: torch.Size) -> Tensor:
    """Sampling grid that rotates images of ``size`` [N, C, H, W] by ``angle`` (radians, 1 element).

    Output pixel at normalised (x, y) samples the input at (x cos a − y sin a, x sin a + y cos a);
    with y pointing down, that turns the picture counter-clockwise by a.
    """
    cos, sin = torch.cos(angle.reshape(())), torch.sin(angle.reshape(()))
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero]), torch.stack([sin, cos, zero])])  # [2, 3]
    return F.affine_grid(theta.expand(size[0], 2, 3), list(size), align_corners=False)


def rotate_images(images: Tensor, angle: Tensor | float, fill: float = 0.0, mode: str = "bilinear") -> Tensor:
    """Rotate a batch by one angle, differentiably in both the images and the angle (bilinear).

    Args:
        images: [N, C, H, W].
        angle: radians; a float or a 1-element tensor (gradients flow to it through the grid).
        fill: value of the pixels that come from outside the image. The authors' transformer
            leaves ``grid_sample``'s 0, which for normalised MNIST is grey (pixel 0.1307); the
            normalised value of black is ``rotation.data.BACKGROUND``.
        mode: ``bilinear`` or ``nearest`` (the latter as torchvision's ``RandomRotation`` default,
            which made the authors' rotated validation and test images; no gradient to the angle).

    Returns:
        Rotated images, [N, C, H, W].
    """
    angle = torch.as_tensor(angle, dtype=images.dtype, device=images.device)
    grid = rotation_grid(angle, images.shape)
    # grid_sample pads with zeros: shift so that the padding equals ``fill``.
    return F.grid_sample(images - fill, grid, mode=mode, padding_mode="zeros", align_corners=False) + fill


class RotationTransformer(nn.Module):
    """One meta-learned angle (radians, starts at 0) that rotates the training images."""

    def __init__(self, fill: float = 0.0, init_deg: float = 0.0) -> None:
        super().__init__()
        self.fill = fill
        self.angle = nn.Parameter(torch.tensor([math.radians(init_deg)]))

    def forward(self, images: Tensor) -> Tensor:
        return rotate_images(images, self.angle, self.fill)

    def degrees(self) -> float:
        """The current angle in degrees."""
        return math.degrees(self.angle.item())


class LeNet(nn.Module):
    """LeNet for 28×28 inputs: conv 6@5×5 pad 2, pool, conv 16@5×5, pool, fc 120, fc 84, fc 10.

    ``width`` multiplies every channel and hidden-unit count (the scaling sweep); width 1 is the
    paper's network (61,706 parameters).
    """

    def __init__(self, width: int = 1, n_classes: int = 10) -> None:
        super().__init__()
        c1, c2, h1, h2 = 6 * width, 16 * width, 120 * width, 84 * width
        self.conv1 = nn.Conv2d(1, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 5 * 5, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, n_classes)

    def forward(self, x: Tensor) -> Tensor:  # x: [N, 1, 28, 28] -> logits [N, n_classes]
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)   # [N, c1, 14, 14]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)   # [N, c2, 5, 5]
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def n_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
