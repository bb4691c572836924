"""Wide Residual Networks WRN-d-k (Zagoruyko & Komodakis, arXiv:1605.07146) of the CRD/mdistiller CIFAR tables.

Shapes and ``state_dict`` keys (``block1.layer.0.bn1``, ``convShortcut``, ``fc`` ...) follow mdistiller's
``models/cifar/wrn.py`` so its ``wrn_40_2_vanilla`` teacher checkpoint loads with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.models.cifar.resnet import CifarModel, init_weights

__all__ = ["WideBasicBlock", "WideResNet", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


class WideBasicBlock(nn.Module):
    """Pre-activation BN-ReLU-conv3x3 x2 block of a WRN (arXiv:1605.07146).

    As in the reference implementation, when the channel count changes the 1x1 ``convShortcut`` is applied to the
    *activated* input; otherwise the identity shortcut carries the raw input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class WideStage(nn.Module):
    """A WRN stage (arXiv:1605.07146) of ``n`` wide blocks, wrapped in ``.layer`` to keep the checkpoint keys."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(CifarModel):
    """WRN-depth-widen_factor for CIFAR (arXiv:1605.07146), shapes as in the CRD/mdistiller definitions.

    Stem conv to 16 channels, three stages of ``(depth - 4) / 6`` blocks with 16k, 32k, 64k channels at strides
    1, 2, 2, then BN + ReLU (``bn1``/``relu``), global average pooling and ``fc``.

    Args:
        depth: 6n + 4.
        widen_factor: the width multiplier k.
        num_classes: classifier outputs.
        in_chans: input channels of the stem conv.
        drop_rate: dropout between the two convs of each block (0 in the KD tables).
    """

    def __init__(
        self, depth: int, widen_factor: int = 1, num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = WideStage(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = WideStage(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self._init_head(widths[3], num_classes)
        init_weights(self, zero_linear_bias=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, three stages, final BN + ReLU: ``(B, 64k, H/4, W/4)``."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(x))


def wrn_16_1(num_classes: int = 100, in_chans: int = 3) -> WideResNet:
    """WRN-16-1 (arXiv:1605.07146), CRD/mdistiller CIFAR definition."""
    return WideResNet(16, 1, num_classes, in_chans)


def wrn_16_2(num_classes: int = 100, in_chans: int = 3) -> WideResNet:
    """WRN-16-2 (arXiv:1605.07146), CRD/mdistiller CIFAR definition."""
    return WideResNet(16, 2, num_classes, in_chans)


def wrn_40_1(num_classes: int = 100, in_chans: int = 3) -> WideResNet:
    """WRN-40-1 (arXiv:1605.07146), CRD/mdistiller CIFAR definition."""
    return WideResNet(40, 1, num_classes, in_chans)


def wrn_40_2(num_classes: int = 100, in_chans: int = 3) -> WideResNet:
    """WRN-40-2 (arXiv:1605.07146), CRD/mdistiller CIFAR definition."""
    return WideResNet(40, 2, num_classes, in_chans)
