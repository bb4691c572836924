"""ShuffleNet v1 (Zhang et al., arXiv:1707.01083) as used for CIFAR in the CRD/mdistiller tables ("ShuffleV1").

1x1 stem conv to 24 channels, three stages of 4/8/4 grouped bottlenecks (groups 3, widths 240-480-960), each
stage starting with a stride-2 block whose shortcut is 3x3 average pooling concatenated to the branch. A 32x32
input ends at 4x4. Shapes and ``state_dict`` keys follow mdistiller's ``models/cifar/ShuffleNetv1.py``.

Also holds :class:`ChannelShuffle`, shared with ShuffleNet v2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from zoo.models.cifar.resnet import CifarModel

__all__ = ["ChannelShuffle", "ShuffleV1Bottleneck", "ShuffleNetV1", "channel_shuffle", "shufflenetv1"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel shuffle of ShuffleNet (arXiv:1707.01083): interleave the channels of ``groups`` equal groups."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ChannelShuffle(nn.Module):
    """Channel shuffle (arXiv:1707.01083) as a module, so hooks can read it."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class ShuffleV1Bottleneck(nn.Module):
    """ShuffleNet unit (arXiv:1707.01083): grouped 1x1, shuffle, depthwise 3x3, grouped 1x1.

    With stride 2 the shortcut is ``AvgPool2d(3, 2, 1)`` and is concatenated (so ``out_planes`` is the branch
    width, not the block output width); with stride 1 it is the identity and is added. The first 1x1 conv is not
    grouped when its input is the 24-channel stem. ``reluN`` follows ``bnN``; ``out_relu`` follows the merge.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.relu1 = nn.ReLU()
        self.shuffle1 = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.out_relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return self.out_relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(CifarModel):
    """ShuffleNet v1 for CIFAR (arXiv:1707.01083), shapes as in the CRD/mdistiller CIFAR definitions.

    Args:
        out_planes: output channels of the three stages.
        num_blocks: blocks per stage.
        groups: groups of the 1x1 convs.
        num_classes: classifier outputs (the classifier is called ``linear`` as in the checkpoints).
        in_chans: input channels of the stem conv.
    """

    classifier_attr = "linear"

    def __init__(
        self,
        out_planes: Sequence[int] = (240, 480, 960),
        num_blocks: Sequence[int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        in_planes = 24
        stages = []
        for planes, n in zip(out_planes, num_blocks):
            # The first block of a stage concatenates its pooled input, so its branch makes the remainder.
            blocks = [ShuffleV1Bottleneck(in_planes, planes - in_planes, 2, groups)]
            blocks += [ShuffleV1Bottleneck(planes, planes, 1, groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self._init_head(in_planes, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """1x1 stem and three stride-2 stages: ``(B, 960, H/8, W/8)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


def shufflenetv1(num_classes: int = 100, in_chans: int = 3) -> ShuffleNetV1:
    """ShuffleNet v1, g=3 (arXiv:1707.01083), the CRD/mdistiller CIFAR ``ShuffleV1``."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes, in_chans)
