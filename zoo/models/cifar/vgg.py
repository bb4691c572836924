"""VGG with batch norm (Simonyan & Zisserman, arXiv:1409.1556) as adapted for CIFAR in the CRD/mdistiller tables.

Five conv blocks (``block0``..``block4``, each conv3x3-BN-ReLU repeated, the last ReLU applied outside the block),
2x2 max pooling after the first three, global average pooling and one linear ``classifier`` of 512 inputs.
``vgg8`` (configuration "S") is the KD-specific one-conv-per-block variant. Shapes and ``state_dict`` keys follow
mdistiller's ``models/cifar/vgg.py`` (``*_bn`` constructors), so its ``vgg13_vanilla`` checkpoint loads strictly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from zoo.models.cifar.resnet import CifarModel, init_weights

__all__ = ["VGG", "VGG_CONFIGS", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]

# Output channels of the convs of each of the five blocks.
VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _conv_block(in_chans: int, widths: Sequence[int]) -> nn.Sequential:
    """conv3x3(bias)-BN-ReLU per width, without the trailing ReLU (indices match the reference checkpoints)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_chans, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_chans = width
    return nn.Sequential(*layers[:-1])


class VGG(CifarModel):
    """VGG-BN for CIFAR (arXiv:1409.1556), shapes as in the CRD/mdistiller CIFAR definitions.

    A 32x32 input is max-pooled to 4x4 after ``block2``; ``block3`` and ``block4`` run at 4x4. As in the
    reference, ``pool3`` is applied only to 64x64 inputs (its Tiny-ImageNet setting). Smaller inputs need no
    change: 16x16 reaches ``block3`` at 2x2 and 8x8 at 1x1, and the final pooling is adaptive.

    ``reluN`` is the ReLU applied to the output of ``blockN`` (a hook on it sees the pre-activation feature).

    Args:
        cfg: conv widths of the five blocks (see ``VGG_CONFIGS``).
        num_classes: classifier outputs.
        in_chans: input channels of the first conv.
    """

    classifier_attr = "classifier"

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if len(cfg) != 5:
            raise ValueError(f"VGG cfg needs 5 blocks, got {len(cfg)}")
        prev = in_chans
        for i, widths in enumerate(cfg):
            self.add_module(f"block{i}", _conv_block(prev, widths))
            self.add_module(f"relu{i}", nn.ReLU())
            if i < 4:
                self.add_module(f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
            prev = widths[-1]
        self._init_head(prev, num_classes)
        init_weights(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Five blocks with ReLU and max pooling: ``(B, 512, H/8, W/8)`` (``H/16`` for 64x64 input)."""
        pool3 = x.shape[-2] == 64
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if pool3:
            x = self.pool3(x)
        return self.relu4(self.block4(x))


def vgg8(num_classes: int = 100, in_chans: int = 3) -> VGG:
    """VGG-8 with BN (arXiv:1409.1556 family), the CRD/mdistiller CIFAR ``vgg8_bn`` (configuration "S")."""
    return VGG(VGG_CONFIGS["vgg8"], num_classes, in_chans)


def vgg11(num_classes: int = 100, in_chans: int = 3) -> VGG:
    """VGG-11 with BN (arXiv:1409.1556, configuration A), the CRD/mdistiller CIFAR ``vgg11_bn``."""
    return VGG(VGG_CONFIGS["vgg11"], num_classes, in_chans)


def vgg13(num_classes: int = 100, in_chans: int = 3) -> VGG:
    """VGG-13 with BN (arXiv:1409.1556, configuration B), the CRD/mdistiller CIFAR ``vgg13_bn``."""
    return VGG(VGG_CONFIGS["vgg13"], num_classes, in_chans)


def vgg16(num_classes: int = 100, in_chans: int = 3) -> VGG:
    """VGG-16 with BN (arXiv:1409.1556, configuration D), the CRD/mdistiller CIFAR ``vgg16_bn``."""
    return VGG(VGG_CONFIGS["vgg16"], num_classes, in_chans)


def vgg19(num_classes: int = 100, in_chans: int = 3) -> VGG:
    """VGG-19 with BN (arXiv:1409.1556, configuration E), the CRD/mdistiller CIFAR ``vgg19_bn``."""
    return VGG(VGG_CONFIGS["vgg19"], num_classes, in_chans)
