"""The four-stage ResNet-50 of the CRD / mdistiller CIFAR tables (arXiv:1512.03385).

This is mdistiller's ``models/cifar/resnetv2.py`` lineage: ImageNet stage widths (64-128-256-512 bottlenecks,
expansion 4) on a 3x3 stride-1 stem without max pooling, so a 32x32 input ends at 4x4. Despite the file name it
is a post-activation ResNet, not the pre-activation "ResNet v2". ``state_dict`` keys match mdistiller's
``ResNet50`` so its ``ResNet50_vanilla`` teacher checkpoint loads with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from zoo.models.cifar.resnet import CifarModel, init_weights

__all__ = ["Bottleneck", "ResNetV2", "resnet50"]


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck block with expansion 4 (arXiv:1512.03385), keys as in mdistiller's resnetv2.

    ``reluN`` follows ``bnN``; ``out_relu`` follows the residual sum (a hook on it sees the pre-activation).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        self.out_relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.out_relu(out + self.shortcut(x))


class ResNetV2(CifarModel):
    """Four-stage bottleneck ResNet for CIFAR (arXiv:1512.03385), shapes as in CRD/mdistiller ``resnetv2.py``.

    Args:
        num_blocks: bottleneck blocks per stage (``(3, 4, 6, 3)`` for ResNet-50).
        num_classes: classifier outputs (the classifier is called ``linear`` as in the checkpoints).
        in_chans: input channels of the stem conv.
    """

    classifier_attr = "linear"

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        in_planes = 64
        stages = []
        for planes, n, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self._init_head(in_planes, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, then ``layer1``..``layer4``: ``(B, 2048, H/8, W/8)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet50(num_classes: int = 100, in_chans: int = 3) -> ResNetV2:
    """ResNet-50 (arXiv:1512.03385) as the CRD/mdistiller CIFAR teacher ``ResNet50`` (23.7M parameters)."""
    return ResNetV2((3, 4, 6, 3), num_classes, in_chans)
