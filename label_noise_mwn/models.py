"""Models of Meta-Weight-Net (Shu et al., NeurIPS 2019): CIFAR ResNet-32 and the weighting net VNet.

ResNet-(6n+2) for 32x32 inputs (He et al. 2016, the CIFAR variant used by MWN): a 3x3 stem,
three stages of n basic blocks with 16w, 32w, 64w channels (w = width multiplier), option-A
(parameter-free, zero-padded) shortcuts, global average pooling and a linear classifier.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.distributed import shared_mean


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (option A: subsample + zero-pad channels) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra_channels = planes - in_planes

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride == 1 and self.extra_channels == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-``depth`` (depth = 6n + 2; 32 by default) for 32x32 images, channels scaled by ``width``.

    Stage channels are ``base_channels · width · (1, 2, 4)``; MWN's ResNet-32 has base 16, width 1.
    """

    def __init__(self, num_classes: int = 10, depth: int = 32, width: int = 1, in_channels: int = 3,
                 base_channels: int = 16) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        if width < 1:
            raise ValueError(f"width multiplier must be >= 1, got {width}")
        blocks = (depth - 2) // 6
        planes = [base_channels * width * m for m in (1, 2, 4)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        layers, in_planes = [], planes[0]
        for stage, p in enumerate(planes):
            for b in range(blocks):
                layers.append(BasicBlock(in_planes, p, stride=2 if stage > 0 and b == 0 else 1))
                in_planes = p
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, 32, 32] -> logits [B, num_classes]."""
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class VNet(nn.Module):
    """MWN weighting network: per-example loss [B, 1] -> weight in (0, 1) [B, 1] (1 -> hidden -> 1)."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.hidden = nn.Linear(1, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, losses: Tensor) -> Tensor:
        return torch.sigmoid(self.out(F.relu(self.hidden(losses))))


def normalized_weights(vnet: VNet, per_example_loss: Tensor) -> Tensor:
    """VNet weights of the detached losses, divided by their sum over the batch (MWN), shape [B].

    As in the MWN code, the weights are left unnormalised if their sum is exactly zero.
    """
    return normalize_over_batch(vnet(per_example_loss.detach().reshape(-1, 1)).reshape(-1))


def normalize_over_batch(raw_weights: Tensor) -> Tensor:
    """w_i / Σ_j w_j, or w unchanged when the sum is exactly zero (as in the MWN code).

    Decided on the device (``torch.where`` on the divisor), without reading the sum on the host,
    so it runs under vmap and costs no GPU synchronisation. Under torchrun the sum is the whole
    batch's: each rank divides by the mean over ranks of the shards' sums (``shared_mean``), so
    the ranks' mean of Σ_i ℓ_i w_i is the whole batch's weighted loss, gradients included.
    """
    total = shared_mean(raw_weights.sum())
    return raw_weights / torch.where(total != 0, total, torch.ones_like(total))


def weighted_loss(vnet: VNet, per_example_loss: Tensor) -> Tensor:
    """Σ_i ℓ_i · v(ℓ_i) / Σ_j v(ℓ_j): the MWN training loss (VNet sees the detached ℓ)."""
    return (per_example_loss * normalized_weights(vnet, per_example_loss)).sum()
