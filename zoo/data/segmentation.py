"""Semantic segmentation data sets in their usual on-disk layouts: Pascal VOC 2012 (+ SBD), Cityscapes, ADE20K.

Every module yields ``(image, mask)``: a float (3, H, W) image normalised with ``mean``/``std`` and an int64
(H, W) mask of class ids with ``ignore_index`` (255) on unlabelled pixels. Training uses the mmseg/DeepLab joint
augmentation (:class:`SegmentationTrainTransform`); evaluation reads images at full resolution
(:class:`SegmentationEvalTransform`), so evaluation batches hold one image by default. Randomness comes from
torch's generator, so ``lightning.seed_everything`` makes the augmentation reproducible (DataLoader workers
derive their seeds from it).

Semi-supervised lists (the CPS/MGD partitions) are read with ``labelled_list`` and ``unlabelled_list``: the first
replaces the training set, the second becomes ``unlabelled_set`` (images with all-255 masks), which the base
class turns into a three-way training loader when ``semi_supervised`` is true (see ``ZooDataModule``).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from zoo.data.base import ZooDataModule
from zoo.data.digit_scenes import IGNORE_INDEX
from zoo.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ADE20K_CLASSES",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABEL_TO_TRAIN_ID",
    "VOC_CLASSES",
    "ADE20KDataModule",
    "CityscapesDataModule",
    "SegmentationDataset",
    "SegmentationEvalTransform",
    "SegmentationSample",
    "SegmentationTrainTransform",
    "VOCSegmentationDataModule",
]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# labelId -> trainId from the official cityscapesScripts (helpers/labels.py); every labelId not listed here
# (unlabeled, ego vehicle, ..., parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer,
# license plate) is ignored (255).
CITYSCAPES_LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

# The SceneParsing (ADEChallengeData2016) classes in annotation order 1..150, as mmseg lists them.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip


def _lookup_table(mapping: dict[int, int]) -> np.ndarray:
    """A 256-entry uint8 table: ``table[value]`` is the class id of a stored mask value (255 where unmapped)."""
    table = np.full(256, IGNORE_INDEX, np.uint8)
    for value, class_id in mapping.items():
        table[value] = class_id
    return table


CITYSCAPES_LABEL_ID_TABLE = _lookup_table(CITYSCAPES_LABEL_TO_TRAIN_ID)
# mmseg's reduce_zero_label: 0 (other/unlabelled) -> 255, k -> k - 1, 255 stays 255.
ADE20K_REDUCE_ZERO_TABLE = _lookup_table({k: k - 1 for k in range(1, 151)})


# --------------------------------------------------------------------------------------------- joint transforms
class _Normalise:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={tuple(mean)} std={tuple(std)}")
        self.mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(3, 1, 1)

    def __call__(self, image: Tensor) -> Tensor:
        return (image.float().div_(255) - self.mean) / self.std


class SegmentationTrainTransform:
    """Joint training augmentation of an image and its mask (the mmseg / DeepLab / CPS recipe).

    1. Random scale by a factor drawn uniformly from ``scale_range`` (image bilinear with antialiasing, mask
       nearest-neighbour with pixel-centre alignment (``NEAREST_EXACT``) so both stay on the same grid).
    2. Random crop of ``crop_size``; a side shorter than the crop is padded at the bottom/right, the image with 0
       after normalisation (the mean colour) and the mask with ``ignore_index``, so padding never counts in the loss.
    3. Horizontal flip with probability ``flip_prob``, of image and mask together.
    4. uint8 → float in [0, 1], normalised with ``mean``/``std``; mask to int64.

    The crop is taken before normalising, so only ``crop_size`` pixels are converted to float. All random draws use
    torch's generator.

    Args:
        crop_size: crop side, or (height, width).
        scale_range: (min, max) scale factor; mmseg's ``ratio_range=(0.5, 2.0)`` by default.
        mean: per-channel normalisation mean (ImageNet's by default).
        std: per-channel normalisation std (ImageNet's by default).
        flip_prob: probability of a horizontal flip.
        ignore_index: mask value of padded pixels.

    Call with a uint8 (3, H, W) image tensor and a uint8 (H, W) mask tensor; returns (float (3, h, w), int64 (h, w))
    with (h, w) = ``crop_size``.
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flip_prob: float = 0.5,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if len(crop) != 2 or min(crop) < 1:
            raise ValueError(f"crop_size must be a positive int or (height, width), got {crop_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (min, max) with 0 < min ≤ max, got {scale_range}")
        self.crop_size = (int(crop[0]), int(crop[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip_prob = flip_prob
        self.ignore_index = ignore_index
        self.normalise = _Normalise(mean, std)

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        height, width = image.shape[-2:]
        scale = float(torch.empty(()).uniform_(*self.scale_range))
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        if size != [height, width]:
            image = TF.resize(image, size, InterpolationMode.BILINEAR, antialias=True)
            mask = TF.resize(mask[None], size, InterpolationMode.NEAREST_EXACT)[0]
        crop_h, crop_w = self.crop_size
        # Cropping the bottom/right-padded image at (top, left) = cropping the image there, then padding.
        top = int(torch.randint(max(size[0] - crop_h, 0) + 1, ()))
        left = int(torch.randint(max(size[1] - crop_w, 0) + 1, ()))
        image = self.normalise(image[:, top : top + crop_h, left : left + crop_w])
        mask = mask[top : top + crop_h, left : left + crop_w]
        pad = (0, crop_w - mask.shape[1], 0, crop_h - mask.shape[0])
        if any(pad):
            image = torch.nn.functional.pad(image, pad, value=0.0)
            mask = torch.nn.functional.pad(mask, pad, value=self.ignore_index)
        if float(torch.rand(())) < self.flip_prob:
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.long()


class SegmentationEvalTransform:
    """Evaluation: the full-resolution image normalised with ``mean``/``std`` and the mask as int64 (no resize).

    Call with a uint8 (3, H, W) image tensor and a uint8 (H, W) mask tensor.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.normalise = _Normalise(mean, std)

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.normalise(image), mask.long()


# ------------------------------------------------------------------------------------------------------ data set
class SegmentationSample(NamedTuple):
    """One image file, its label file (``None``: unlabelled, all pixels ``ignore_index``) and the table that maps
    stored label values to class ids (``None``: stored values are the class ids)."""

    image: str
    mask: str | None = None
    label_table: np.ndarray | None = None


class SegmentationDataset(Dataset):
    """``(image, mask)`` pairs read from files with PIL and passed through a joint transform.

    Images are converted to RGB. Masks are read as single-channel index images (a palette PNG gives its indices,
    not its colours), mapped through the sample's ``label_table`` and must match the image size. With
    ``num_classes``, a mask holding a value outside ``[0, num_classes)`` other than ``ignore_index`` is refused,
    naming the file.
    """

    def __init__(
        self,
        samples: Sequence[SegmentationSample],
        transform,
        num_classes: int | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        from PIL import Image
        from torchvision.transforms.v2.functional import pil_to_tensor

        sample = self.samples[index]
        with Image.open(sample.image) as file:
            image = pil_to_tensor(file.convert("RGB"))
        if sample.mask is None:
            mask = torch.full(image.shape[1:], IGNORE_INDEX, dtype=torch.uint8)
        else:
            with Image.open(sample.mask) as file:
                labels = np.array(file)
                mode = file.mode
            if labels.ndim != 2:
                raise ValueError(f"{sample.mask}: expected a single-channel label image of class ids, got mode {mode}")
            if labels.dtype != np.uint8:
                if labels.size and (labels.min() < 0 or labels.max() > 255):
                    raise ValueError(f"{sample.mask}: label values must lie in 0..255")
                labels = labels.astype(np.uint8)
            if sample.label_table is not None:
                labels = sample.label_table[labels]
            if self.num_classes is not None:
                bad = (labels >= self.num_classes) & (labels != self.ignore_index)
                if bad.any():
                    raise ValueError(
                        f"{sample.mask}: label value {int(labels[bad][0])} is not a class (0..{self.num_classes - 1}) "
                        f"nor ignore_index {self.ignore_index}"
                    )
            if labels.shape != tuple(image.shape[1:]):
                raise ValueError(
                    f"{sample.mask}: label image is {labels.shape[1]}×{labels.shape[0]} but {sample.image} is "
                    f"{image.shape[2]}×{image.shape[1]}"
                )
            mask = torch.from_numpy(np.ascontiguousarray(labels))
        return self.transform(image, mask)


# ------------------------------------------------------------------------------------------------- data modules
class _SegmentationDataModule(ZooDataModule, abc.ABC):
    """Shared logic: root lookup, list files, transforms and the train/val/test/unlabelled sets.

    Subclasses implement ``_locate`` (the data folder, or one error naming where it looked), ``_split`` (the
    standard samples of a split) and ``_from_line`` (a sample from one list line).

    Args:
        root: data set folder.
        crop_size: training crop side or (height, width).
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size; 1 because evaluation images keep their own sizes.
        num_workers, pin_memory, drop_last: see ``ZooDataModule``.
        scale_range: (min, max) of the random training scale (mmseg's ``ratio_range``).
        mean: per-channel normalisation mean (ImageNet's by default, as ImageNet-pretrained backbones expect).
        std: per-channel normalisation std (ImageNet's by default).
        labelled_list: list file naming the labelled training images; replaces the standard training split.
        unlabelled_list: list file naming the unlabelled training images (``unlabelled_set``, all-255 masks).
        semi_supervised: also yield unlabelled batches during training (see ``ZooDataModule``).
    """

    num_classes: int
    class_names: tuple[str, ...]
    in_chans = 3
    ignore_index = IGNORE_INDEX
    _name: str
    _how_to_get: str

    def __init__(
        self,
        root: str,
        batch_size: int = 8,
        eval_batch_size: int = 1,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        drop_last: bool = True,
        crop_size: int | tuple[int, int] = 512,
        scale_range: tuple[float, float] = (0.5, 2.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        labelled_list: str | None = None,
        unlabelled_list: str | None = None,
        semi_supervised: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, drop_last)
        self.root = root
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        # Built here so a bad crop_size, scale_range, mean or std fails at construction.
        self.train_transform = SegmentationTrainTransform(crop_size, scale_range, self.mean, self.std)
        self.eval_transform = SegmentationEvalTransform(self.mean, self.std)
        self.crop_size = self.train_transform.crop_size
        self.scale_range = self.train_transform.scale_range
        self.labelled_list = labelled_list
        self.unlabelled_list = unlabelled_list
        self.semi_supervised = semi_supervised

    def check_paths(self) -> None:
        """Refuses a missing data set folder (the CLI calls it before building any model for the data)."""
        self._locate()

    @property
    def name(self) -> str:
        return self._name

    # -- subclass hooks
    @abc.abstractmethod
    def _locate(self) -> Path:
        """The data set's folder under ``root`` (raises ``self._fail`` when it is not there)."""

    @abc.abstractmethod
    def _split(self, base: Path, split: str) -> list[SegmentationSample]:
        """The samples of a standard split."""

    @abc.abstractmethod
    def _from_line(self, base: Path, tokens: list[str]) -> SegmentationSample:
        """The sample named by one line of a labelled/unlabelled list file."""

    # -- shared
    def _fail(self, field: str, what: str) -> FileNotFoundError:
        """One error naming the argument at fault (``root``, a list), what was looked for, and how to get the data."""
        return FileNotFoundError(f"{type(self).__name__}.{field}: {what}. {self._how_to_get}")

    def _read_list(
        self, base: Path, list_file: str | Path, labelled: bool, field: str, parse=None
    ) -> list[SegmentationSample]:
        """Samples named by a list file, one per line (blank lines and ``#`` comments skipped); every file checked.

        ``parse(base, tokens)`` turns a line's tokens into a sample (default: ``self._from_line``).
        """
        parse = parse or self._from_line
        path = Path(list_file)
        if not path.is_file():
            raise FileNotFoundError(f"{type(self).__name__}.{field}: no list file {path.resolve()}")
        samples = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            tokens = line.split("#", 1)[0].split()
            if not tokens:
                continue
            sample = parse(base, tokens)
            if not labelled:
                sample = SegmentationSample(sample.image)
            for kind, file in (("image", sample.image), ("mask", sample.mask)):
                if file is not None and not Path(file).is_file():
                    what = f"{path.resolve()} line {number} ({line.strip()!r}) names {kind} {file}, which is missing"
                    if Path(file).parent.is_dir():  # a stray line, not a missing download
                        raise FileNotFoundError(f"{type(self).__name__}.{field}: {what}")
                    raise self._fail(field, f"{what}; there is no folder {Path(file).parent}")
            samples.append(sample)
        if not samples:
            raise ValueError(f"{type(self).__name__}.{field}: {path.resolve()} names no images")
        return samples

    def prepare_data(self) -> None:
        self._locate()

    def setup(self, stage: str | None = None) -> None:
        base = self._locate()
        if stage in (None, "fit"):
            if self.labelled_list is not None:
                train = self._read_list(base, self.labelled_list, labelled=True, field="labelled_list")
            else:
                train = self._split(base, "train")
            self.train_set = SegmentationDataset(train, self.train_transform, self.num_classes, self.ignore_index)
            self.unlabelled_set = None
            if self.unlabelled_list is not None:
                unlabelled = self._read_list(base, self.unlabelled_list, labelled=False, field="unlabelled_list")
                self.unlabelled_set = SegmentationDataset(unlabelled, self.train_transform)
        self.val_set = SegmentationDataset(self._split(base, "val"), self.eval_transform, self.num_classes,
                                           self.ignore_index)
        self.test_set = self.val_set


class VOCSegmentationDataModule(_SegmentationDataModule):
    """Pascal VOC 2012 segmentation, 21 classes (background + 20), with the SBD augmented training set.

    Layout (``root`` is the folder holding ``VOCdevkit/VOC2012`` or the ``VOC2012`` folder itself)::

        VOC2012/JPEGImages/<id>.jpg
        VOC2012/SegmentationClass/<id>.png            palette PNGs: index = class id, 255 = object border (ignored)
        VOC2012/ImageSets/Segmentation/{train,val}.txt
        VOC2012/SegmentationClassAug/<id>.png         SBD labels as index PNGs (DeepLab's SegmentationClassAug)
        VOC2012/ImageSets/Segmentation/train_aug.txt  or VOC2012/train_aug.txt or <root>/train_aug.txt

    ``train_split="train_aug"`` (default) trains on the 10,582 images of ``train_aug.txt`` with the
    SegmentationClassAug labels, as DeepLab, mmseg (``aug``), CPS and MGD do; ``"train"`` uses the 1,464 images of
    ``train.txt`` with SegmentationClass labels. Validation and test both use the 1,449 images of ``val.txt``
    with SegmentationClass labels (the test labels are not public).

    List lines (``train_aug.txt``, ``labelled_list``, ``unlabelled_list``) are a bare id (``2007_000032``) or an
    image/label pair relative to VOC2012 (``JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png``, a
    leading ``/`` allowed, as in DeepLab's list). A bare id takes its label from the ``train_split`` label folder.

    Defaults: 512×512 crops and scales 0.5–2.0 (mmseg, CPS); batch 8 per process (mmseg uses 4 GPUs × 4).

    Args:
        root: folder holding ``VOCdevkit/VOC2012``, or the ``VOC2012`` folder.
        train_split: ``"train_aug"`` or ``"train"``.
        crop_size: training crop side or (height, width).
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size; 1 because evaluation images keep their own sizes.
        num_workers, pin_memory, drop_last: see ``ZooDataModule``.
        scale_range: (min, max) of the random training scale (mmseg's ``ratio_range``).
        mean: per-channel normalisation mean (ImageNet's by default, as ImageNet-pretrained backbones expect).
        std: per-channel normalisation std (ImageNet's by default).
        labelled_list: list file naming the labelled training images; replaces the standard training split.
        unlabelled_list: list file naming the unlabelled training images (``unlabelled_set``, all-255 masks).
        semi_supervised: also yield unlabelled batches during training (see ``ZooDataModule``).
    """

    num_classes = 21
    class_names = VOC_CLASSES
    _name = "voc"
    _how_to_get = (
        "Download VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and extract it in "
        "root (it creates VOCdevkit/VOC2012); for train_aug also unpack DeepLab's SegmentationClassAug.zip (SBD "
        "labels as index PNGs) into VOC2012/ and put its train_aug.txt list in VOC2012/ImageSets/Segmentation/."
    )

    def __init__(
        self,
        root: str = "data/voc",
        train_split: str = "train_aug",
        crop_size: int | tuple[int, int] = 512,
        **kwargs,
    ) -> None:
        if train_split not in ("train", "train_aug"):
            raise ValueError(
                f"VOCSegmentationDataModule.train_split must be 'train' or 'train_aug', got {train_split!r}"
            )
        super().__init__(root=root, crop_size=crop_size, **kwargs)
        self.train_split = train_split

    def _locate(self) -> Path:
        root = Path(self.root)
        candidates = [root / "VOCdevkit" / "VOC2012", root]
        for folder in candidates:
            if (folder / "JPEGImages").is_dir():
                return folder.resolve()
        looked = " and ".join(str((c / "JPEGImages").resolve()) for c in candidates)
        raise self._fail("root", f"no VOC2012 at {root.resolve()} (looked for {looked})")

    def _from_line(self, base: Path, tokens: list[str], mask_folder: str | None = None) -> SegmentationSample:
        if len(tokens) >= 2:
            return SegmentationSample(str(base / tokens[0].lstrip("/")), str(base / tokens[1].lstrip("/")))
        stem = Path(tokens[0]).stem
        if mask_folder is None:
            mask_folder = "SegmentationClassAug" if self.train_split == "train_aug" else "SegmentationClass"
        return SegmentationSample(str(base / "JPEGImages" / f"{stem}.jpg"), str(base / mask_folder / f"{stem}.png"))

    def _split(self, base: Path, split: str) -> list[SegmentationSample]:
        if split == "train" and self.train_split == "train_aug":
            candidates = [base / "ImageSets" / "Segmentation" / "train_aug.txt", base / "train_aug.txt"]
            candidates += [] if Path(self.root).resolve() == base.resolve() else [Path(self.root) / "train_aug.txt"]
            for list_file in candidates:
                if list_file.is_file():
                    return self._read_list(base, list_file, labelled=True, field="train_split")
            looked = ", ".join(str(c.resolve()) for c in candidates)
            raise self._fail("train_split", f"'train_aug' but there is no train_aug.txt (looked for {looked})")
        list_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise self._fail("root", f"no {split} list {list_file.resolve()}")
        # train.txt and val.txt go with the original VOC labels, whichever train_split.
        return self._read_list(
            base, list_file, labelled=True, field="root",
            parse=lambda base, tokens: self._from_line(base, tokens, "SegmentationClass"),
        )


class CityscapesDataModule(_SegmentationDataModule):
    """Cityscapes fine annotations, 19 training classes (all other labels ignored as 255).

    Layout (``root`` is the Cityscapes folder, or a folder holding ``cityscapes/``)::

        leftImg8bit/{train,val,test}/<city>/<frame>_leftImg8bit.png
        gtFine/{train,val,test}/<city>/<frame>_gtFine_labelTrainIds.png   used when present
        gtFine/{train,val,test}/<city>/<frame>_gtFine_labelIds.png        otherwise, mapped with
                                                                          CITYSCAPES_LABEL_TO_TRAIN_ID

    Trains on the 2,975 ``train`` images; validation and test both use the 500 ``val`` images (the test labels are
    not public). List lines (``labelled_list``, ``unlabelled_list``) are an image path relative to ``root``
    (``leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png``; ``train/aachen/...`` is read under
    ``leftImg8bit/``), optionally followed by its label path, or a frame id (``aachen_000000_000019``).

    Defaults: 800×800 crops as in CPS and MGD (mmseg uses 512×1024, its DeepLabV3+ recipes 769×769), scales
    0.5–2.0; batch 8 per process. Evaluation runs on the full 1024×2048 frames.

    Args:
        root: the Cityscapes folder.
        crop_size: training crop side or (height, width).
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size; 1 because evaluation images keep their own sizes.
        num_workers, pin_memory, drop_last: see ``ZooDataModule``.
        scale_range: (min, max) of the random training scale (mmseg's ``ratio_range``).
        mean: per-channel normalisation mean (ImageNet's by default, as ImageNet-pretrained backbones expect).
        std: per-channel normalisation std (ImageNet's by default).
        labelled_list: list file naming the labelled training images; replaces the standard training split.
        unlabelled_list: list file naming the unlabelled training images (``unlabelled_set``, all-255 masks).
        semi_supervised: also yield unlabelled batches during training (see ``ZooDataModule``).
    """

    num_classes = 19
    class_names = CITYSCAPES_CLASSES
    _name = "cityscapes"
    _how_to_get = (
        "Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
        "https://www.cityscapes-dataset.com/downloads/ (free account) and extract both in root; optionally run "
        "cityscapesscripts/preparation/createTrainIdLabelImgs.py to write the *_gtFine_labelTrainIds.png files."
    )

    def __init__(self, root: str = "data/cityscapes", crop_size: int | tuple[int, int] = (800, 800), **kwargs) -> None:
        super().__init__(root=root, crop_size=crop_size, **kwargs)

    def _locate(self) -> Path:
        root = Path(self.root)
        candidates = [root, root / "cityscapes"]
        for folder in candidates:
            if (folder / "leftImg8bit" / "train").is_dir():
                return folder.resolve()
        looked = " and ".join(str((c / "leftImg8bit" / "train").resolve()) for c in candidates)
        raise self._fail("root", f"no Cityscapes at {root.resolve()} (looked for {looked})")

    @staticmethod
    def _label_for(image: Path) -> SegmentationSample:
        frame = image.name.removesuffix("_leftImg8bit.png")
        split_dir = image.parent.parent
        folder = split_dir.parent.parent / "gtFine" / split_dir.name / image.parent.name
        train_ids = folder / f"{frame}_gtFine_labelTrainIds.png"
        if train_ids.is_file():
            return SegmentationSample(str(image), str(train_ids))
        return SegmentationSample(str(image), str(folder / f"{frame}_gtFine_labelIds.png"), CITYSCAPES_LABEL_ID_TABLE)

    def _from_line(self, base: Path, tokens: list[str]) -> SegmentationSample:
        token = tokens[0].lstrip("/")
        if "/" not in token and not token.endswith(".png"):  # a frame id: <city>_<seq>_<frame>
            city = token.split("_")[0]
            options = [base / "leftImg8bit" / s / city / f"{token}_leftImg8bit.png" for s in ("train", "val", "test")]
            image = next((p for p in options if p.is_file()), options[0])
        else:
            image = base / token
            if not image.is_file() and (base / "leftImg8bit" / token).is_file():
                image = base / "leftImg8bit" / token
        if len(tokens) >= 2:
            label = base / tokens[1].lstrip("/")
            table = CITYSCAPES_LABEL_ID_TABLE if label.name.endswith("_labelIds.png") else None
            return SegmentationSample(str(image), str(label), table)
        return self._label_for(image)

    def _split(self, base: Path, split: str) -> list[SegmentationSample]:
        folder = base / "leftImg8bit" / split
        images = sorted(folder.glob("*/*_leftImg8bit.png"))
        if not images:
            raise self._fail("root", f"no images matching {folder.resolve()}/<city>/*_leftImg8bit.png")
        samples = [self._label_for(image) for image in images]
        for sample in samples:
            if not Path(sample.mask).is_file():
                raise self._fail(
                    "root",
                    f"no label for {sample.image}: looked for {sample.mask} and its *_gtFine_labelTrainIds.png"
                )
        return samples


class ADE20KDataModule(_SegmentationDataModule):
    """ADE20K SceneParsing (ADEChallengeData2016), 150 classes with mmseg's ``reduce_zero_label``.

    Layout (``root`` is ``ADEChallengeData2016`` or its parent)::

        ADEChallengeData2016/images/{training,validation}/<id>.jpg
        ADEChallengeData2016/annotations/{training,validation}/<id>.png   0 = other, 1..150 = classes

    Annotations are mapped 0 → 255 (ignored) and k → k − 1, as mmseg's ``reduce_zero_label=True`` does, so class
    ids are 0..149. Trains on the 20,210 training images; validation and test both use the 2,000 validation images.
    Evaluation keeps each image's own size (mmseg instead resizes to a 512 short side; ADE20K images are mostly
    near that already). List lines are an id (``ADE_train_00000001``) or an image path relative to
    ``ADEChallengeData2016``, optionally followed by its annotation path.

    Defaults: 512×512 crops and scales 0.5–2.0 (mmseg); batch 8 per process (mmseg uses 4 GPUs × 4).

    Args:
        root: ``ADEChallengeData2016`` or the folder holding it.
        crop_size: training crop side or (height, width).
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size; 1 because evaluation images keep their own sizes.
        num_workers, pin_memory, drop_last: see ``ZooDataModule``.
        scale_range: (min, max) of the random training scale (mmseg's ``ratio_range``).
        mean: per-channel normalisation mean (ImageNet's by default, as ImageNet-pretrained backbones expect).
        std: per-channel normalisation std (ImageNet's by default).
        labelled_list: list file naming the labelled training images; replaces the standard training split.
        unlabelled_list: list file naming the unlabelled training images (``unlabelled_set``, all-255 masks).
        semi_supervised: also yield unlabelled batches during training (see ``ZooDataModule``).
    """

    num_classes = 150
    class_names = ADE20K_CLASSES
    _name = "ade20k"
    _how_to_get = (
        "Download ADEChallengeData2016.zip from http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip "
        "and extract it in root."
    )

    def __init__(self, root: str = "data/ade", crop_size: int | tuple[int, int] = 512, **kwargs) -> None:
        super().__init__(root=root, crop_size=crop_size, **kwargs)

    def _locate(self) -> Path:
        root = Path(self.root)
        candidates = [root / "ADEChallengeData2016", root]
        for folder in candidates:
            if (folder / "images" / "training").is_dir():
                return folder.resolve()
        looked = " and ".join(str((c / "images" / "training").resolve()) for c in candidates)
        raise self._fail("root", f"no ADEChallengeData2016 at {root.resolve()} (looked for {looked})")

    def _from_line(self, base: Path, tokens: list[str]) -> SegmentationSample:
        token = tokens[0].lstrip("/")
        if "/" in token:
            image = base / token
        else:
            stem = Path(token).stem
            image = base / "images" / ("validation" if "_val_" in stem else "training") / f"{stem}.jpg"
        if len(tokens) >= 2:
            label = base / tokens[1].lstrip("/")
        else:
            label = base / "annotations" / image.parent.name / f"{image.stem}.png"
        return SegmentationSample(str(image), str(label), ADE20K_REDUCE_ZERO_TABLE)

    def _split(self, base: Path, split: str) -> list[SegmentationSample]:
        folder = {"train": "training", "val": "validation"}[split]
        images = sorted((base / "images" / folder).glob("*.jpg"))
        if not images:
            raise self._fail("root", f"no images matching {(base / 'images' / folder).resolve()}/*.jpg")
        samples = []
        for image in images:
            label = base / "annotations" / folder / f"{image.stem}.png"
            if not label.is_file():
                raise self._fail("root", f"no annotation {label} for {image}")
            samples.append(SegmentationSample(str(image), str(label), ADE20K_REDUCE_ZERO_TABLE))
        return samples
