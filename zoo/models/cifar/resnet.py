"""CIFAR ResNets (He et al., arXiv:1512.03385) of the CRD / RepDistiller / mdistiller KD benchmark tables.

``resnet{8,14,20,32,44,56,110}`` use stage widths 16-16-32-64; ``resnet8x4``/``resnet32x4`` are the 4x wider
32-64-128-256 variants. Layer shapes and ``state_dict`` keys follow mdistiller's ``models/cifar/resnet.py`` so
its released teacher checkpoints load with ``strict=True``.

This module also holds :class:`CifarModel`, the timm-style head API shared by every model of the package, and
:func:`init_weights`, the shared initialisation.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "BasicBlock",
    "CifarModel",
    "ResNet",
    "conv3x3",
    "init_weights",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
]


class CifarModel(nn.Module, metaclass=abc.ABCMeta):
    """Base class of the CIFAR KD zoo: a timm-style head on top of :meth:`forward_features`.

    Subclasses build their trunk, then call :meth:`_init_head`, and implement :meth:`forward_features` (the last
    feature map before global pooling). The head is adaptive average pooling + flatten + the classifier stored
    under the attribute named ``classifier_attr`` (the official checkpoint's name for it).

    Adaptive pooling gives the same numbers as the official fixed-size ``AvgPool2d`` at 32x32 input, and unlike
    it also works on smaller inputs (e.g. 16x16, where the official ``AvgPool2d(8)`` / ``avg_pool2d(x, 4)``
    kernels would be larger than the feature map).
    """

    classifier_attr: str = "fc"
    num_classes: int
    num_features: int

    def _init_head(self, num_features: int, num_classes: int) -> None:
        self.num_features = num_features
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.reset_classifier(num_classes)

    @abc.abstractmethod
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the final feature map ``(B, C, H, W)`` before global pooling."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool a feature map; return the pooled embedding ``(B, num_features)`` if ``pre_logits``, else logits."""
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """Return the final classifier (an ``nn.Linear``, or ``nn.Identity`` after ``reset_classifier(0)``)."""
        return getattr(self, self.classifier_attr)

    def _set_classifier(self, head: nn.Module) -> None:
        setattr(self, self.classifier_attr, head)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs (0: no classifier)."""
        self.num_classes = num_classes
        self._set_classifier(nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity())


def init_weights(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """Initialise ``model`` the way the mdistiller CIFAR definitions do.

    Convolutions get He-normal fan-out init, N(0, 2 / (k*k*out_channels)), which is what both the
    ``kaiming_normal_(mode="fan_out")`` and the explicit ``normal_(0, sqrt(2 / n))`` variants there compute;
    conv biases are zeroed. BatchNorm keeps PyTorch's default (weight 1, bias 0). Linear layers keep PyTorch's
    default unless ``linear_std`` is given (weights N(0, linear_std), bias 0) or ``zero_linear_bias`` is set.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(m.bias)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation two-conv residual block (arXiv:1512.03385), keys as in mdistiller's ``BasicBlock``.

    ``relu`` follows ``bn1``; ``out_relu`` follows the residual sum, so a forward hook on it sees the
    pre-activation feature (its input) and the block output.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.out_relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.out_relu(out + shortcut)


class ResNet(CifarModel):
    """CIFAR ResNet with three stages of ``(depth - 2) / 6`` basic blocks (arXiv:1512.03385).

    Shapes follow the CRD/mdistiller CIFAR definition: 3x3 stem conv (stride 1), stages at strides 1, 2, 2,
    global average pooling and a linear classifier ``fc``.

    Args:
        depth: 6n + 2.
        widths: channels of the stem and of the three stages.
        num_classes: classifier outputs.
        in_chans: input channels of the stem conv.
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n + 2 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        stages = []
        for planes, stride in zip(widths[1:4], (1, 2, 2)):
            blocks = [BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self._init_head(widths[3], num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, then ``layer1``..``layer3``: ``(B, widths[3], H/4, W/4)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


def resnet8(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-8 (arXiv:1512.03385), CRD/mdistiller CIFAR widths 16-16-32-64."""
    return ResNet(8, (16, 16, 32, 64), num_classes, in_chans)


def resnet14(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-14 (arXiv:1512.03385), CRD/mdistiller CIFAR widths 16-16-32-64."""
    return ResNet(14, (16, 16, 32, 64), num_classes, in_chans)


def resnet20(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-20 (arXiv:1512.03385), CRD/mdistiller CIFAR widths 16-16-32-64."""
    return ResNet(20, (16, 16, 32, 64), num_classes, in_chans)


def resnet32(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-32 (arXiv:1512.03385), CRD/mdistiller CIFAR widths 16-16-32-64."""
    return ResNet(32, (16, 16, 32, 64), num_classes, in_chans)


def resnet44(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-44 (arXiv:1512.03385), CRD/mdistiller CIFAR widths 16-16-32-64."""
    return ResNet(44, (16, 16, 32, 64), num_classes, in_chans)


def resnet56(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-56 (arXiv:1512.03385), CRD/mdistiller CIFAR widths 16-16-32-64."""
    return ResNet(56, (16, 16, 32, 64), num_classes, in_chans)


def resnet110(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-110 (arXiv:1512.03385), CRD/mdistiller CIFAR widths 16-16-32-64."""
    return ResNet(110, (16, 16, 32, 64), num_classes, in_chans)


def resnet8x4(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-8x4 (arXiv:1512.03385), the 4x wide CRD/mdistiller CIFAR variant, widths 32-64-128-256."""
    return ResNet(8, (32, 64, 128, 256), num_classes, in_chans)


def resnet32x4(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-32x4 (arXiv:1512.03385), the 4x wide CRD/mdistiller CIFAR variant, widths 32-64-128-256."""
    return ResNet(32, (32, 64, 128, 256), num_classes, in_chans)
