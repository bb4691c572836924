"""scikit-learn's bundled 8×8 digits: the embedded data set that needs no download."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from zoo.data.base import ZooDataModule
from zoo.data.transforms import PadCropFlip

__all__ = ["DigitsDataModule", "TensorImageDataset", "load_digits_tensors", "write_digits_imagefolder"]


def load_digits_tensors(image_size: int = 8) -> tuple[Tensor, Tensor]:
    """All 1797 digits as float images in [0, 1] of shape (N, 1, S, S) (bilinear upsampling) and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images, torch.from_numpy(data.target.astype(np.int64))


def _long_tailed(index: np.ndarray, labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Keeps n_max·ratio^(−c/(C−1)) images of class c (a seeded random choice within each class)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[index])
    n_max = max(int((labels[index] == c).sum()) for c in classes)
    keep = []
    for i, c in enumerate(classes):
        members = index[labels[index] == c]
        n = max(1, int(round(n_max * ratio ** (-i / (len(classes) - 1)))))
        keep.append(rng.permutation(members)[: min(n, len(members))])
    return np.sort(np.concatenate(keep))


class TensorImageDataset(Dataset):
    """Images held in memory, with an optional random translation by up to ``shift`` pixels (zero-padded).

    The translation is ``zoo.data.transforms.PadCropFlip`` without flip, drawn from torch's global generator, so the
    online pipeline and a replayed soft-label cache (``replay_source``) use the same operation.
    """

    def __init__(self, images: Tensor, labels: Tensor, shift: int = 0, fill: float = 0.0) -> None:
        self.images, self.labels = images, labels
        self.augment = PadCropFlip(shift, flip=False, fill=fill) if shift > 0 else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment.apply(image, self.augment.sample(1, torch.default_generator)[0])
        return image, self.labels[index]


class DigitsDataModule(ZooDataModule):
    """The 8×8 digits of scikit-learn (1797 images, 10 classes), split stratified by class with a seed.

    Images are scaled to [0, 1], optionally upsampled (bilinear) to ``image_size``, repeated to ``channels``
    channels and normalised with the train split's pixel mean and std. Training images are randomly translated by
    up to ``shift`` pixels. Nothing is ever downloaded: the data ships inside scikit-learn.

    Args:
        batch_size, eval_batch_size, num_workers, pin_memory, drop_last: see ``ZooDataModule``.
        image_size: side of the square images (8 = native).
        channels: 1 (grayscale) or 3 (for models that want RGB input).
        val_fraction, test_fraction: shares of the 1797 images held out for validation and test.
        split_seed: seed of the stratified split (independent of the training seed).
        augment: random translation of training images.
        shift: maximum translation in pixels at ``image_size`` (default: 2 pixels per 8 of side, at least 1).
        train_fraction: keep only this stratified share of the training split (seeded by ``split_seed``; the
            validation and test splits are unchanged), e.g. for students that see less data than their teachers.
        imbalance_ratio: make the training split long-tailed: class c keeps n_max·ratio^(−c/(C−1)) of its images
            (class 0 all, class 9 a ratio-th), the CIFAR-100-LT profile; validation and test stay balanced.
    """

    val_split = "val"
    test_split = "test"

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
        image_size: int = 16,
        channels: int = 1,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        augment: bool = True,
        shift: int | None = None,
        train_fraction: float = 1.0,
        imbalance_ratio: float = 1.0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, drop_last)
        if image_size < 8:
            raise ValueError(f"DigitsDataModule.image_size must be ≥ 8, got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"DigitsDataModule.channels must be 1 or 3, got {channels}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"DigitsDataModule: val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in "
                "(0, 1) and sum to less than 1"
            )
        if not 0 < train_fraction <= 1:
            raise ValueError(f"DigitsDataModule.train_fraction must be in (0, 1], got {train_fraction}")
        if imbalance_ratio < 1:
            raise ValueError(f"DigitsDataModule.imbalance_ratio must be ≥ 1, got {imbalance_ratio}")
        self.train_fraction = train_fraction
        self.imbalance_ratio = imbalance_ratio
        self.image_size = image_size
        self.channels = channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.augment = augment
        self.shift = shift if shift is not None else max(1, round(image_size / 4))
        self.num_classes = 10
        self.in_chans = channels
        self._splits: dict[str, tuple[Tensor, Tensor]] | None = None
        self._stats: tuple[float, float] | None = None

    @property
    def name(self) -> str:
        return "digits"

    def _split(self) -> dict[str, tuple[Tensor, Tensor]]:
        if self._splits is None:
            from sklearn.model_selection import train_test_split

            images, labels = load_digits_tensors(self.image_size)
            idx = np.arange(len(labels))
            rest, test = train_test_split(
                idx, test_size=self.test_fraction, stratify=labels.numpy(), random_state=self.split_seed
            )
            val_share = self.val_fraction / (1.0 - self.test_fraction)
            train, val = train_test_split(
                rest, test_size=val_share, stratify=labels.numpy()[rest], random_state=self.split_seed
            )
            if self.train_fraction < 1:
                train, _ = train_test_split(
                    train, train_size=self.train_fraction, stratify=labels.numpy()[train], random_state=self.split_seed
                )
            if self.imbalance_ratio > 1:
                train = _long_tailed(train, labels.numpy(), self.imbalance_ratio, self.split_seed)
            train_images = images[train]
            self._stats = (float(train_images.mean()), float(train_images.std()))
            self._splits = {
                name: (images[ix], labels[ix]) for name, ix in (("train", train), ("val", val), ("test", test))
            }
        return self._splits

    @property
    def mean(self) -> tuple[float, ...]:  # type: ignore[override]
        self._split()
        return (self._stats[0],) * self.channels

    @property
    def std(self) -> tuple[float, ...]:  # type: ignore[override]
        self._split()
        return (self._stats[1],) * self.channels

    def _dataset(self, split: str, train: bool) -> TensorImageDataset:
        images, labels = self._split()[split]
        m, s = self._stats
        images = ((images - m) / s).expand(-1, self.channels, -1, -1).contiguous()
        shift = self.shift if (train and self.augment) else 0
        return TensorImageDataset(images, labels, shift=shift, fill=-m / s)

    def replay_source(self) -> tuple[Dataset, Any, None]:
        self._split()
        m, s = self._stats
        shift = self.shift if self.augment else 0
        return self._dataset("train", train=False), PadCropFlip(shift, flip=False, fill=-m / s), None

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._dataset("train", train=True)
        self.val_set = self._dataset("val", train=False)
        self.test_set = self._dataset("test", train=False)


def write_digits_imagefolder(
    root: str | os.PathLike,
    image_size: int = 28,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> Path:
    """Writes the digits as an ImageFolder of grayscale PNGs, a real-format stand-in for MNIST that needs no download.

    ``<root>/{train,val,test}/<digit>/<index>.png``: the splits of ``DigitsDataModule`` with the same fractions and
    ``split_seed`` (so the same images land in each split), pixels in [0, 1] upsampled bilinearly to
    ``image_size`` and stored as 8-bit ``"L"`` PNGs. Existing files are overwritten. Returns ``root``.
    """
    from PIL import Image

    splits = DigitsDataModule(
        image_size=image_size, val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed
    )._split()
    root = Path(root)
    for split, (images, labels) in splits.items():
        pixels = (images[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        for i, (image, label) in enumerate(zip(pixels, labels.tolist())):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")
    return root
