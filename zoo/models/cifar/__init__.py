"""The CIFAR-100 knowledge-distillation architectures of the CRD / RepDistiller / mdistiller benchmark tables.

Every model takes ``num_classes`` and ``in_chans``, returns logits from ``forward`` and has the timm-style
``forward_features`` / ``forward_head(pre_logits=...)`` / ``get_classifier`` / ``reset_classifier`` API and
``num_features``. With the defaults (``in_chans=3``) the ``state_dict`` keys and shapes equal mdistiller's, so
its released teacher checkpoints (``cifar_teachers.tar``, ``ckpt["model"]``) load with ``strict=True``.

Names: ``resnet8``..``resnet110``, ``resnet8x4``, ``resnet32x4``, ``resnet50``, ``wrn_16_1``, ``wrn_16_2``,
``wrn_40_1``, ``wrn_40_2``, ``vgg8``..``vgg19`` (BN versions), ``mobilenetv2`` (x0.5), ``shufflenetv1``,
``shufflenetv2``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from zoo.models.cifar.mobilenetv2 import MobileNetV2, mobilenetv2
from zoo.models.cifar.resnet import (
    CifarModel,
    ResNet,
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from zoo.models.cifar.resnetv2 import ResNetV2, resnet50
from zoo.models.cifar.shufflenetv1 import ShuffleNetV1, shufflenetv1
from zoo.models.cifar.shufflenetv2 import ShuffleNetV2, shufflenetv2
from zoo.models.cifar.vgg import VGG, vgg8, vgg11, vgg13, vgg16, vgg19
from zoo.models.cifar.wrn import WideResNet, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = [
    "CIFAR_MODELS",
    "CifarModel",
    "MobileNetV2",
    "ResNet",
    "ResNetV2",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "VGG",
    "WideResNet",
    "create_cifar_model",
    "list_cifar_models",
]

CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "resnet50": resnet50,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "mobilenetv2": mobilenetv2,
    "shufflenetv1": shufflenetv1,
    "shufflenetv2": shufflenetv2,
}


def list_cifar_models() -> list[str]:
    """Return the registry names of the CIFAR KD architectures, sorted."""
    return sorted(CIFAR_MODELS)


def create_cifar_model(name: str, num_classes: int = 100, in_chans: int = 3) -> nn.Module:
    """Build the CIFAR KD architecture ``name`` (a key of ``CIFAR_MODELS``).

    Raises:
        ValueError: ``name`` is unknown; the message lists the valid names.
    """
    try:
        constructor = CIFAR_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown CIFAR model {name!r}; valid names: {', '.join(list_cifar_models())}"
        ) from None
    return constructor(num_classes=num_classes, in_chans=in_chans)
