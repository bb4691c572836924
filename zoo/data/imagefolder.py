"""Image classification folders in the ImageNet layout (``<root>/train/<class>/*.JPEG``, ``<root>/val/<class>/``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from torchvision.datasets import ImageFolder

from zoo.data.base import ZooDataModule
from zoo.data.transforms import IMAGENET_CROP_PCT, ClassificationAugmentation, eval_resize_size

__all__ = ["ImageFolderDataModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# One-channel default: the average of ImageNet's three statistics, what a first convolution whose RGB filters
# were summed into one (timm's in_chans=1 adaptation of pretrained weights) expects of a grey image.
GRAY_MEAN = (sum(IMAGENET_MEAN) / 3,)
GRAY_STD = (sum(IMAGENET_STD) / 3,)


def _open(path: str, mode: str) -> Any:
    """The image at ``path`` in PIL ``mode``. An unreadable file stops the run naming it (silently skipping it would
    change the data set); ``zoo check-data`` lists every such file of a config's data at once."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    except (OSError, ValueError, SyntaxError) as err:  # PIL's decoding errors
        raise ValueError(
            f"{path}: cannot read this image ({type(err).__name__}: {err}); fix or remove it "
            "(`zoo check-data --config <config>` lists every unreadable file)"
        ) from None


def _open_rgb(path: str) -> Any:
    return _open(path, "RGB")


def _open_gray(path: str) -> Any:
    return _open(path, "L")


def class_folders(folder: Path) -> list[str]:
    """The class sub-folders of one split, sorted as torchvision does; hidden ones (``.ipynb_checkpoints``) skipped."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


class ClassFolder(ImageFolder):
    """torchvision's ``ImageFolder`` over one split with a given class list, so every split uses the training
    split's label indices (a validation folder that lacks a class does not shift the others)."""

    def __init__(self, root: str, classes: list[str], transform: Any, loader: Any, allow_empty: bool) -> None:
        self._given_classes = list(classes)
        super().__init__(root, transform=transform, loader=loader, allow_empty=allow_empty)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return list(self._given_classes), {c: i for i, c in enumerate(self._given_classes)}


class ImageFolderDataModule(ZooDataModule):
    """Classification folders read with ``torchvision.datasets.ImageFolder``, with timm's augmentation options.

    Layout: ``<root>/<train_dir>/<class name>/<image files>`` and the same for ``val_dir`` (and ``test_dir`` when
    given). Class indices are the sorted class folder names of the training split, used for every split.

    Training augmentation (``augmentation``, see ``zoo.data.transforms.ClassificationAugmentation``):

    - ``imagenet`` (default): timm's ImageNet training transform, RandomResizedCrop(``image_size``, ``scale``
      (0.08, 1), ``ratio`` (3/4, 4/3)) + horizontal flip (``hflip`` 0.5), optionally ``vflip``, ``color_jitter``,
      ``auto_augment``, ``re_prob`` (random erasing). Meant for photographs.
    - ``simple``: resize + centre crop to ``image_size``, zero-pad by ``pad`` pixels (default ``image_size / 8``) and
      crop back at a random offset, no flip unless ``hflip``/``vflip`` ask for one (the colour options apply too).
      Meant for small images whose orientation matters (digits, characters, icons): a flipped 3 is no longer a 3.
    - ``none``: resize + centre crop only.

    Evaluation (val/test): resize the shorter side to ``resize_size`` and take the centre ``image_size`` crop,
    as ``timm.data.transforms_imagenet_eval`` does. Unless ``resize_size`` is set, it follows timm's rule
    ``resize_size = ⌊image_size / crop_pct⌋``, with ``crop_pct`` 0.875 for ``imagenet`` (224 → 256, 28 → 32) and 1
    for ``simple``/``none`` (the whole image, as training sees it).

    Cached soft labels (``soft_labels:`` of KD/DKD) replay ``imagenet`` and ``simple`` with ``hflip`` 0 or 0.5
    (``replay_source``); ``auto_augment``, ``color_jitter``, ``re_prob`` and ``vflip`` cannot be replayed, and the
    cache is refused naming the option.

    Args:
        root: data set folder.
        train_dir, val_dir: sub-folders of ``root``.
        test_dir: sub-folder the test loader reads; by default ``val_dir`` (``test_split`` then says ``"val"``:
            test metrics are validation metrics).
        num_classes: number of classes; when omitted it is the number of class folders in ``train_dir``.
        image_size: side of the square training crop and evaluation crop.
        resize_size: evaluation resize of the shorter side (≥ ``image_size``); default from ``crop_pct``.
        crop_pct: evaluation crop fraction (timm's name): ``image_size / resize_size``, in (0, 1]; default 0.875
            for ``imagenet``, 1 otherwise. Give ``resize_size`` or ``crop_pct``, not both.
        in_chans: 3 (RGB) or 1 (grayscale: images converted with PIL's ``"L"`` mode, one-channel tensors).
        mean, std: normalisation, one value per channel (one value is repeated, as in timm); default ImageNet's,
            or for ``in_chans: 1`` their average (0.449 / 0.226).
        augmentation: ``imagenet`` | ``simple`` | ``none`` (above).
        scale, ratio: RandomResizedCrop ranges (``imagenet`` only; default (0.08, 1) and (3/4, 4/3)).
        hflip: horizontal flip probability (default 0.5 for ``imagenet``, 0 for ``simple``).
        vflip: vertical flip probability (default 0).
        color_jitter: timm's colour jitter: one factor for brightness/contrast/saturation, or 3–4 factors (with
            hue); default off.
        auto_augment: a timm policy (``rand-m9-mstd0.5-inc1``, ``augmix-m5-w3``, ``original``, ...); default off.
        re_prob: random-erasing probability (default 0).
        interpolation: resize interpolation for the training crop and evaluation resize (default bilinear).
        pad: pixels of padding of the ``simple`` pad-crop (default ``image_size / 8`` rounded, at least 1).
        batch_size, eval_batch_size, num_workers, pin_memory, drop_last: see ``ZooDataModule`` (``num_workers`` and
            ``pin_memory`` default to what the machine supports).
    """

    val_split = "val"

    def __init__(
        self,
        root: str = "data/imagenet",
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        num_classes: int | None = None,
        image_size: int = 224,
        resize_size: int | None = None,
        crop_pct: float | None = None,
        in_chans: int = 3,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        augmentation: Literal["imagenet", "simple", "none"] = "imagenet",
        scale: tuple[float, float] | None = None,
        ratio: tuple[float, float] | None = None,
        hflip: float | None = None,
        vflip: float = 0.0,
        color_jitter: float | list[float] | None = None,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"] = "bilinear",
        pad: int | None = None,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, drop_last)
        owner = type(self).__name__
        if in_chans not in (1, 3):
            raise ValueError(f"{owner}.in_chans must be 1 (grayscale) or 3 (RGB); got {in_chans}")
        if image_size < 1:
            raise ValueError(f"{owner}.image_size must be ≥ 1; got {image_size}")
        self.root = root
        self.train_dir, self.val_dir, self.test_dir = train_dir, val_dir, test_dir or val_dir
        self.image_size, self.in_chans = image_size, in_chans
        self.augmentation = ClassificationAugmentation(
            augmentation, scale=scale, ratio=ratio, hflip=hflip, vflip=vflip, color_jitter=color_jitter,
            auto_augment=auto_augment, re_prob=re_prob, interpolation=interpolation, pad=pad, owner=owner,
        )
        self.resize_size, self.crop_pct = self._eval_resize(owner, augmentation, image_size, resize_size, crop_pct)
        self.mean = self._stats(owner, "mean", mean, IMAGENET_MEAN if in_chans == 3 else GRAY_MEAN)
        self.std = self._stats(owner, "std", std, IMAGENET_STD if in_chans == 3 else GRAY_STD)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"{owner}.std must be positive; got {list(self.std)}")
        self.transforms(train=True)  # an unknown auto_augment policy fails here, not in a loader worker
        self._num_classes = num_classes
        self._classes: list[str] | None = None

    def check_paths(self) -> None:
        """Refuses a missing root or split folder (the CLI calls it before building any model for the data)."""
        self._folder(self.train_dir, "train_dir")
        self._folder(self.val_dir, "val_dir")

    @staticmethod
    def _eval_resize(owner: str, preset: str, image_size: int, resize_size: int | None,
                     crop_pct: float | None) -> tuple[int, float]:
        if resize_size is not None and crop_pct is not None:
            raise ValueError(
                f"{owner}: give resize_size ({resize_size}) or crop_pct ({crop_pct}), not both "
                "(resize_size = floor(image_size / crop_pct))"
            )
        if resize_size is not None:
            if resize_size < image_size:
                raise ValueError(
                    f"{owner}.resize_size ({resize_size}) is smaller than image_size ({image_size}): the evaluation "
                    "centre crop would not fit; leave resize_size unset to derive it from crop_pct"
                )
            return resize_size, image_size / resize_size
        if crop_pct is None:
            crop_pct = IMAGENET_CROP_PCT if preset == "imagenet" else 1.0
        if not 0 < crop_pct <= 1:
            raise ValueError(f"{owner}.crop_pct must be in (0, 1] (image_size / resize_size); got {crop_pct}")
        return eval_resize_size(image_size, crop_pct), float(crop_pct)

    def _stats(self, owner: str, field: str, values: list[float] | None, default: tuple) -> tuple[float, ...]:
        if values is None:
            return tuple(default)
        values = tuple(float(v) for v in values)
        if len(values) == 1:
            return values * self.in_chans
        if len(values) != self.in_chans:
            raise ValueError(f"{owner}.{field} has {len(values)} values but in_chans is {self.in_chans}")
        return values

    @property
    def name(self) -> str:
        return Path(self.root).name.lower() or "imagefolder"

    @property
    def test_split(self) -> Literal["val", "test"]:
        """Which split the test loader reads: ``"val"`` while ``test_dir`` is ``val_dir`` (the default), so that
        reports can say that test metrics are validation metrics; ``"test"`` for a separate folder."""
        return "val" if self.test_dir == self.val_dir else "test"

    def _folder(self, sub: str, field: str) -> Path:
        owner = type(self).__name__
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"{owner}: the data root {root.resolve()} does not exist (data.init_args.root={self.root!r}); expected "
                f"<root>/{self.train_dir}/<class name>/<image files> and <root>/{self.val_dir}/<class name>/..."
            )
        folder = root / sub
        if not folder.is_dir():
            inside = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            holds = f"it holds the folders {inside[:8]}" if inside else "it holds no folders"
            raise FileNotFoundError(
                f"{owner}: no {field.removesuffix('_dir')} split: looked for {folder.resolve()} "
                f"(data.init_args.{field}={sub!r}); {holds}. Expected <root>/{sub}/<class name>/<image files>."
            )
        return folder

    def _train_classes(self) -> list[str]:
        if self._classes is None:
            folder = self._folder(self.train_dir, "train_dir")
            classes = class_folders(folder)
            if not classes:
                files = sum(1 for p in folder.iterdir() if p.is_file())
                raise FileNotFoundError(
                    f"{type(self).__name__}: no class folders in {folder.resolve()} ({files} files directly inside); "
                    f"expected one sub-folder per class, {folder}/<class name>/<image files>"
                )
            self._classes = classes
        return self._classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        if self._num_classes is None:
            self._num_classes = len(self._train_classes())
        return self._num_classes

    def _normalize(self) -> Any:
        import torchvision.transforms as T
        from timm.data.transforms import MaybeToTensor

        return T.Compose([MaybeToTensor(), T.Normalize(self.mean, self.std)])

    def transforms(self, train: bool) -> Any:
        """The training transform (``augmentation``) or the evaluation one (timm's resize + centre crop)."""
        if train:
            return self.augmentation.train_transform(self.image_size, self.mean, self.std)
        from timm.data.transforms_factory import transforms_imagenet_eval

        # timm derives the resize as floor(image_size / crop_pct); this crop_pct gives exactly resize_size even
        # when image_size / resize_size is not exact in floating point.
        crop_pct = self.image_size / (self.resize_size + 0.5)
        return transforms_imagenet_eval(
            self.image_size, crop_pct=crop_pct, interpolation=self.augmentation.interpolation, mean=self.mean,
            std=self.std,
        )

    def _loader_fn(self) -> Any:
        return _open_gray if self.in_chans == 1 else _open_rgb

    def _dataset(self, sub: str, field: str, transform: Any) -> Any:
        owner = type(self).__name__
        folder = self._folder(sub, field)
        classes = self._train_classes()
        is_train = field == "train_dir"
        if not is_train:
            extra = sorted(set(class_folders(folder)) - set(classes))
            if extra:
                raise ValueError(
                    f"{owner}: {folder.resolve()} holds class folders that {self.train_dir!r} does not: {extra[:10]} "
                    "(every split must use the training split's classes)"
                )
        try:
            dataset = ClassFolder(str(folder), classes, transform, self._loader_fn(), allow_empty=not is_train)
        except FileNotFoundError as err:  # torchvision: a class folder without a single image file
            raise FileNotFoundError(f"{owner}: {folder.resolve()}: {err}") from err
        if len(dataset) == 0:
            raise FileNotFoundError(f"{owner}: no image files in the class folders of {folder.resolve()}")
        return dataset

    def replay_source(self) -> tuple[Any, Any, Any]:
        """For cached soft labels. ``imagenet``: the training images as PIL, the resized crop + flip as
        ``ResizedCropFlip``, then ToTensor + normalisation. ``simple``/``none``: the training images resized,
        centre-cropped and normalised, the pad-crop + flip as ``PadCropFlip`` on those tensors. Options that cannot
        be replayed are refused by name."""
        augment = self.augmentation.replay_augment(self.image_size, fill=[-m / s for m, s in zip(self.mean, self.std)])
        if self.augmentation.preset == "imagenet":
            return self._dataset(self.train_dir, "train_dir", None), augment, self._normalize()
        from timm.data.transforms_factory import transforms_noaug_train

        # the deterministic part of simple/none: resize + centre crop to image_size, ToTensor, normalisation
        fitted = transforms_noaug_train(self.image_size, interpolation=self.augmentation.interpolation,
                                        mean=self.mean, std=self.std)
        return self._dataset(self.train_dir, "train_dir", fitted), augment, None

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._dataset(self.train_dir, "train_dir", self.transforms(train=True))
        found = len(self.train_set.classes)
        if found != self.num_classes:
            raise ValueError(
                f"{type(self).__name__}.num_classes is {self.num_classes} but "
                f"{self._folder(self.train_dir, 'train_dir')} holds {found} class folders"
            )
        self.val_set = self._dataset(self.val_dir, "val_dir", self.transforms(train=False))
        self.test_set = (
            self.val_set
            if self.test_dir == self.val_dir
            else self._dataset(self.test_dir, "test_dir", self.transforms(train=False))
        )
