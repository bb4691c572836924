"""ShuffleNet v2 1x (Ma et al., arXiv:1807.11164) as used for CIFAR in the CRD/mdistiller tables ("ShuffleV2").

1x1 stem conv to 24 channels, three stages (116-232-464 channels, 3/7/3 basic units after a stride-2 down-sampling
unit), a 1x1 conv to 1024 channels, global average pooling and ``linear``. A 32x32 input ends at 4x4. Shapes and
``state_dict`` keys follow mdistiller's ``models/cifar/ShuffleNetv2.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from zoo.models.cifar.resnet import CifarModel
from zoo.models.cifar.shufflenetv1 import ChannelShuffle

__all__ = ["ShuffleNetV2", "ShuffleV2Block", "ShuffleV2DownBlock", "shufflenetv2"]


def _dwconv3x3(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size=3, stride=stride, padding=1, groups=channels, bias=False)


def _conv1x1(in_chans: int, out_chans: int) -> nn.Conv2d:
    return nn.Conv2d(in_chans, out_chans, kernel_size=1, bias=False)


class ShuffleV2Block(nn.Module):
    """ShuffleNet v2 basic unit (arXiv:1807.11164): split channels, transform one half, concat, shuffle.

    The transformed half is 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU (``reluN`` follows ``bnN``).
    """

    def __init__(self, channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split_ratio = split_ratio
        c = int(channels * split_ratio)
        self.conv1 = _conv1x1(c, c)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = _dwconv3x3(c, 1)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = _conv1x1(c, c)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu3 = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = int(x.shape[1] * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = self.relu1(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = self.relu3(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([x1, out], 1))


class ShuffleV2DownBlock(nn.Module):
    """ShuffleNet v2 stride-2 unit (arXiv:1807.11164): two branches of ``out_chans / 2`` channels, concat, shuffle.

    Left: depthwise 3x3/2-BN (``conv1``), 1x1-BN-ReLU (``conv2``). Right: 1x1-BN-ReLU (``conv3``), depthwise
    3x3/2-BN (``conv4``), 1x1-BN-ReLU (``conv5``).
    """

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        mid = out_chans // 2
        self.conv1 = _dwconv3x3(in_chans, 2)
        self.bn1 = nn.BatchNorm2d(in_chans)
        self.conv2 = _conv1x1(in_chans, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv1x1(in_chans, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = _dwconv3x3(mid, 2)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = _conv1x1(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(self.relu3(self.bn3(self.conv3(x)))))
        right = self.relu5(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(CifarModel):
    """ShuffleNet v2 for CIFAR (arXiv:1807.11164), shapes as in the CRD/mdistiller CIFAR definitions.

    Args:
        out_channels: channels of the three stages and of the final 1x1 conv.
        num_blocks: basic units per stage (after its down-sampling unit).
        num_classes: classifier outputs (the classifier is called ``linear`` as in the checkpoints).
        in_chans: input channels of the stem conv.
    """

    classifier_attr = "linear"

    def __init__(
        self,
        out_channels: Sequence[int] = (116, 232, 464, 1024),
        num_blocks: Sequence[int] = (3, 7, 3),
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_chans, 24)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu1 = nn.ReLU()
        channels = 24
        stages = []
        for out, n in zip(out_channels[:3], num_blocks):
            stages.append(nn.Sequential(ShuffleV2DownBlock(channels, out), *[ShuffleV2Block(out) for _ in range(n)]))
            channels = out
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = _conv1x1(channels, out_channels[3])
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu2 = nn.ReLU()
        self._init_head(out_channels[3], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """1x1 stem, three stride-2 stages, 1x1 conv + BN + ReLU: ``(B, 1024, H/8, W/8)``."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.relu2(self.bn2(self.conv2(x)))


def shufflenetv2(num_classes: int = 100, in_chans: int = 3) -> ShuffleNetV2:
    """ShuffleNet v2 1x (arXiv:1807.11164), the CRD/mdistiller CIFAR ``ShuffleV2``."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes, in_chans)
