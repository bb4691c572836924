"""MobileNetV2 (Sandler et al., arXiv:1801.04381) as used for CIFAR in the CRD/mdistiller tables.

The tables' "MobileNetV2" is mdistiller's ``mobile_half``: expansion 6, width multiplier 0.5 on the inverted
residual blocks (the 1x1 head conv stays at 1280 channels), a stride-2 stem, so a 32x32 input ends at 2x2.
Shapes and ``state_dict`` keys (``conv1.0``, ``blocks.3.1.conv.4``, ``conv2.1``, ``classifier.0`` ...) follow
mdistiller's ``models/cifar/mobilenetv2.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.models.cifar.resnet import CifarModel, init_weights

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenetv2"]

# (output channels, blocks, first stride) of the seven stages before width scaling. The first stage uses
# expansion 1, the others ``expand_ratio``.
_STAGES: tuple[tuple[int, int, int], ...] = (
    (16, 1, 1),
    (24, 2, 1),
    (32, 3, 2),
    (64, 4, 2),
    (96, 3, 1),
    (160, 3, 2),
    (320, 1, 1),
)


def conv_bn_relu(in_chans: int, out_chans: int, kernel_size: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias, 'same' padding), BN, ReLU as a list of modules."""
    conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out_chans), nn.ReLU()]


class InvertedResidual(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (arXiv:1801.04381).

    The expand conv is present even for expansion 1, as in the reference, so ``conv`` indices match its keys.
    """

    def __init__(self, in_chans: int, out_chans: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_chans * expand_ratio
        self.use_res_connect = stride == 1 and in_chans == out_chans
        self.conv = nn.Sequential(
            *conv_bn_relu(in_chans, hidden, 1),
            *conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_chans, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(CifarModel):
    """MobileNetV2 for CIFAR (arXiv:1801.04381), shapes as in the CRD/mdistiller CIFAR definitions.

    ``conv1`` (3x3 stride 2) -> seven stages in ``blocks`` -> ``conv2`` (1x1 to 1280, BN, ReLU) -> global average
    pooling -> ``classifier`` (``nn.Sequential`` holding one ``nn.Linear``, key ``classifier.0``).

    Args:
        expand_ratio: expansion of stages 2-7 (T in the reference; 6).
        width_mult: channel multiplier of stem and blocks; the head conv keeps 1280 channels unless it is > 1.
        num_classes: classifier outputs.
        in_chans: input channels of the stem conv.
    """

    classifier_attr = "classifier"

    def __init__(
        self, expand_ratio: int = 6, width_mult: float = 0.5, num_classes: int = 100, in_chans: int = 3
    ) -> None:
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = nn.Sequential(*conv_bn_relu(in_chans, channels, 3, stride=2))
        self.blocks = nn.ModuleList()
        for s, (c, n, stride) in enumerate(_STAGES):
            out_chans = int(c * width_mult)
            t = 1 if s == 0 else expand_ratio
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(channels, out_chans, stride if i == 0 else 1, t))
                channels = out_chans
            self.blocks.append(nn.Sequential(*stage))
        last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(*conv_bn_relu(channels, last_channel, 1))
        self._init_head(last_channel, num_classes)
        init_weights(self, linear_std=0.01)

    def get_classifier(self) -> nn.Module:
        """Return the final ``nn.Linear`` (``classifier[0]``)."""
        return self.classifier[0]

    def _set_classifier(self, head: nn.Module) -> None:
        self.classifier = nn.Sequential(head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, inverted residual stages and the 1x1 head conv: ``(B, 1280, H/16, W/16)``."""
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.conv2(x)


def mobilenetv2(num_classes: int = 100, in_chans: int = 3) -> MobileNetV2:
    """MobileNetV2 x0.5 (arXiv:1801.04381), the CRD/mdistiller CIFAR ``mobile_half`` (T=6, width 0.5)."""
    return MobileNetV2(6, 0.5, num_classes, in_chans)
