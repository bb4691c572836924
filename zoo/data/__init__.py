"""LightningDataModules. Each exposes ``num_classes``, ``in_chans`` and its normalisation (``mean``, ``std``)."""

from zoo.data.base import ZooDataModule
from zoo.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from zoo.data.digit_scenes import DigitScenesDataModule
from zoo.data.digits import DigitsDataModule
from zoo.data.imagefolder import ImageFolderDataModule
from zoo.data.segmentation import ADE20KDataModule, CityscapesDataModule, VOCSegmentationDataModule

__all__ = [
    "ADE20KDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CityscapesDataModule",
    "DigitScenesDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "VOCSegmentationDataModule",
    "ZooDataModule",
]
