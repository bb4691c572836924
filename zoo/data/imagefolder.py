"""Image classification folders in the ImageNet layout (``<root>/train/<class>/*.JPEG``, ``<root>/val/<class>/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.data.base import ZooDataModule

__all__ = ["ImageFolderDataModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderDataModule(ZooDataModule):
    """ImageNet-style folders read with ``torchvision.datasets.ImageFolder``.

    Train: RandomResizedCrop(``image_size``) and horizontal flip; evaluation: Resize(``resize_size``) and
    CenterCrop(``image_size``) (the torchvision/timm ImageNet recipe), then normalisation.

    Args:
        root: data set folder.
        train_dir, val_dir: sub-folders of ``root``; ``test_dir`` defaults to ``val_dir``.
        num_classes: number of classes; when omitted it is the number of class folders in ``train_dir``.
        image_size, resize_size: crop and evaluation resize sides.
        mean, std: normalisation (ImageNet's by default).
        batch_size, eval_batch_size, num_workers, pin_memory, drop_last: see ``ZooDataModule``.
    """

    in_chans = 3

    def __init__(
        self,
        root: str = "data/imagenet",
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        num_classes: int | None = None,
        image_size: int = 224,
        resize_size: int = 256,
        mean: list[float] = list(IMAGENET_MEAN),
        std: list[float] = list(IMAGENET_STD),
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        drop_last: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, drop_last)
        self.root = root
        self.train_dir, self.val_dir, self.test_dir = train_dir, val_dir, test_dir or val_dir
        self.image_size, self.resize_size = image_size, resize_size
        self.mean, self.std = tuple(mean), tuple(std)
        self._num_classes = num_classes

    @property
    def name(self) -> str:
        return Path(self.root).name.lower() or "imagefolder"

    def _folder(self, sub: str) -> Path:
        folder = Path(self.root) / sub
        if not folder.is_dir():
            raise FileNotFoundError(
                f"ImageFolderDataModule: no folder {folder.resolve()} (data.init_args.root={self.root!r}, "
                f"sub-folder {sub!r}). Expected the ImageNet layout <root>/{sub}/<class name>/<image files>; for "
                "ImageNet-1k, extract the ILSVRC2012 train and val archives and sort val images into class folders."
            )
        return folder

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        if self._num_classes is None:
            folder = self._folder(self.train_dir)
            self._num_classes = sum(1 for p in folder.iterdir() if p.is_dir())
        return self._num_classes

    def transforms(self, train: bool):
        import torchvision.transforms as T

        if train:
            ops = [T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip()]
        else:
            ops = [T.Resize(self.resize_size), T.CenterCrop(self.image_size)]
        return T.Compose([*ops, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def replay_source(self) -> tuple[Any, Any, Any]:
        """The training images as PIL, RandomResizedCrop + flip as ``ResizedCropFlip``, ToTensor + normalisation."""
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder

        from zoo.data.transforms import ResizedCropFlip

        source = ImageFolder(str(self._folder(self.train_dir)))
        to_tensor = T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])
        return source, ResizedCropFlip(self.image_size), to_tensor

    def setup(self, stage: str | None = None) -> None:
        from torchvision.datasets import ImageFolder

        self.train_set = ImageFolder(str(self._folder(self.train_dir)), transform=self.transforms(train=True))
        found = len(self.train_set.classes)
        if found != self.num_classes:
            raise ValueError(
                f"ImageFolderDataModule.num_classes is {self.num_classes} but {self._folder(self.train_dir)} holds "
                f"{found} class folders"
            )
        self.val_set = ImageFolder(str(self._folder(self.val_dir)), transform=self.transforms(train=False))
        self.test_set = (
            self.val_set
            if self.test_dir == self.val_dir
            else ImageFolder(str(self._folder(self.test_dir)), transform=self.transforms(train=False))
        )
