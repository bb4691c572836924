"""CIFAR-10 and CIFAR-100 through torchvision, with the standard KD augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.data.base import ZooDataModule
from zoo.data.transforms import ClassificationAugmentation

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]


class _CIFARDataModule(ZooDataModule):
    """CIFAR in torchvision's layout (``<root>/cifar-10-batches-py`` or ``<root>/cifar-100-python``).

    Train: RandomCrop(32, padding=4), RandomHorizontalFlip, normalisation (the CRD/mdistiller recipe): the ``simple``
    preset of ``zoo.data.transforms.ClassificationAugmentation`` with ``pad`` 4 and ``hflip`` 0.5, to which timm's
    ``vflip``, ``color_jitter``, ``auto_augment`` and ``re_prob`` can be added. Validation and test both use the
    official 10,000-image test split, as the KD benchmark tables do (``val_split`` and ``test_split`` both say
    ``"test"``).

    Args:
        root: folder holding (or receiving) the data set.
        download: download it when missing (torchvision); otherwise a missing data set fails at once.
        batch_size, eval_batch_size, num_workers, pin_memory, drop_last: see ``ZooDataModule`` (``num_workers`` and
            ``pin_memory`` default to what the machine supports).
        augment: random training augmentation at all (dataset distillation's experts use DSA instead); false
            refuses the options below.
        normalize: normalise with ``mean``/``std`` (MTT's ZCA setting whitens raw [0, 1] pixels instead).
        mean, std: override the normalisation (MTT uses CIFAR-10's (0.4914, 0.4822, 0.4465) /
            (0.2023, 0.1994, 0.2010) for both CIFARs).
        pad: padding of the random crop in pixels (default 4).
        hflip, vflip: flip probabilities (default 0.5 and 0).
        color_jitter, auto_augment, re_prob: timm's colour jitter factor(s), auto-augment policy and random-erasing
            probability (default off). These three, ``vflip`` and an ``hflip`` other than 0 or 0.5 cannot be
            replayed by cached soft labels, which are then refused naming the option.
    """

    _folder: str
    _dataset_name: str
    num_classes: int
    in_chans = 3
    val_split = "test"
    test_split = "test"

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        drop_last: bool = True,
        augment: bool = True,
        normalize: bool = True,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        pad: int = 4,
        hflip: float | None = None,
        vflip: float = 0.0,
        color_jitter: float | list[float] | None = None,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, drop_last)
        self.root = root
        self.download = download
        self.augment = augment
        self.normalize = normalize
        if augment:
            self.augmentation = ClassificationAugmentation(
                "simple", pad=pad, hflip=0.5 if hflip is None else hflip, vflip=vflip, color_jitter=color_jitter,
                auto_augment=auto_augment, re_prob=re_prob, owner=type(self).__name__,
            )
        else:
            for name, value in (("hflip", hflip), ("vflip", vflip), ("color_jitter", color_jitter),
                                ("auto_augment", auto_augment), ("re_prob", re_prob)):
                if value:
                    raise ValueError(f"{type(self).__name__}.{name}={value!r} is training augmentation; it needs "
                                     "augment: true")
            self.augmentation = ClassificationAugmentation("none", owner=type(self).__name__)
        if mean is not None:
            self.mean = tuple(float(v) for v in mean)
        if std is not None:
            self.std = tuple(float(v) for v in std)
        if not normalize:
            self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def _check(self) -> None:
        folder = Path(self.root) / self._folder
        if not self.download and not folder.is_dir():
            raise FileNotFoundError(
                f"{type(self).__name__}: {self._dataset_name} not found: looked for {folder.resolve()}. "
                f"Set data.init_args.download: true to fetch it with torchvision, or unpack the python version "
                f"of {self._dataset_name} there (data.init_args.root names the parent folder)."
            )

    def prepare_data(self) -> None:
        self._check()
        if self.download:
            self._torchvision_class()(self.root, train=True, download=True)
            self._torchvision_class()(self.root, train=False, download=True)

    def _torchvision_class(self):
        import torchvision

        return getattr(torchvision.datasets, self._dataset_name.replace("-", ""))

    def transforms(self, train: bool):
        import torchvision.transforms as T

        if train:
            return self.augmentation.train_transform(32, self.mean, self.std, fit=False, normalize=self.normalize)
        norm = [T.Normalize(self.mean, self.std)] if self.normalize else []
        return T.Compose([T.ToTensor(), *norm])

    def replay_source(self) -> tuple[Any, Any, None]:
        """The un-augmented training set (normalised tensors) and RandomCrop(32, 4) + flip as ``PadCropFlip``;
        options that cannot be replayed are refused by name."""
        fill = [-m / s for m, s in zip(self.mean, self.std)] if self.normalize else [0.0, 0.0, 0.0]
        augment = self.augmentation.replay_augment(32, fill=fill)
        self._check()
        source = self._torchvision_class()(self.root, train=True, transform=self.transforms(train=False))
        return source, augment, None

    def setup(self, stage: str | None = None) -> None:
        self._check()
        cls = self._torchvision_class()
        self.train_set = cls(self.root, train=True, transform=self.transforms(train=True))
        self.val_set = cls(self.root, train=False, transform=self.transforms(train=False))
        self.test_set = self.val_set


class CIFAR10DataModule(_CIFARDataModule):
    __doc__ = _CIFARDataModule.__doc__
    _folder = "cifar-10-batches-py"
    _dataset_name = "CIFAR-10"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARDataModule):
    __doc__ = _CIFARDataModule.__doc__
    _folder = "cifar-100-python"
    _dataset_name = "CIFAR-100"
    num_classes = 100
    # The CRD/RepDistiller/mdistiller statistics.
    mean = (0.5071, 0.4867, 0.4408)
    std = (0.2675, 0.2565, 0.2761)
