"""Digit scenes: an embedded segmentation data set composed from scikit-learn's digits (no download)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from zoo.data.base import ZooDataModule

__all__ = ["IGNORE_INDEX", "DigitScenesDataModule", "make_digit_scenes"]

IGNORE_INDEX = 255


def make_digit_scenes(
    digits: np.ndarray,
    labels: np.ndarray,
    count: int,
    rng: np.random.Generator,
    size: int = 64,
    digits_per_image: tuple[int, int] = (2, 5),
    scale_range: tuple[float, float] = (1.5, 3.0),
    noise: float = 0.1,
    ignore_border: bool = False,
) -> tuple[Tensor, Tensor]:
    """Composes ``count`` canvases; returns images (count, 1, size, size) in [0, 1] and int64 masks.

    Each canvas has a smooth random background texture plus Gaussian noise and 2–5 digits (sources drawn from
    ``digits``, values in [0, 1]) pasted at random positions and scales; a later digit covers an earlier one. A pixel
    is labelled ``1 + digit class`` where the pasted digit's intensity exceeds 0.25, background (0) elsewhere; with
    ``ignore_border`` the faint rim (intensity in (0.05, 0.25]) is labelled 255 (ignored).
    """
    images = np.zeros((count, size, size), np.float32)
    masks = np.zeros((count, size, size), np.int64)
    for n in range(count):
        coarse = rng.random((4, 4)).astype(np.float32)
        texture = F.interpolate(torch.from_numpy(coarse)[None, None], size=(size, size), mode="bilinear")[0, 0]
        canvas = 0.3 * texture.numpy() + noise * rng.standard_normal((size, size)).astype(np.float32)
        mask = np.zeros((size, size), np.int64)
        for _ in range(int(rng.integers(digits_per_image[0], digits_per_image[1] + 1))):
            k = int(rng.integers(len(digits)))
            side = int(round(8 * rng.uniform(*scale_range)))
            side = min(side, size)
            glyph = F.interpolate(torch.from_numpy(digits[k])[None, None], size=(side, side), mode="bilinear")[0, 0]
            glyph = glyph.clamp(0, 1).numpy()
            y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            region = canvas[y : y + side, x : x + side]
            canvas[y : y + side, x : x + side] = np.maximum(region * (1 - glyph), glyph)
            sub = mask[y : y + side, x : x + side]
            sub[glyph > 0.25] = 1 + int(labels[k])
            if ignore_border:
                sub[(glyph > 0.05) & (glyph <= 0.25)] = IGNORE_INDEX
        images[n] = np.clip(canvas, 0.0, 1.0)
        masks[n] = mask
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(masks)


class _SceneDataset(Dataset):
    def __init__(self, images: Tensor, masks: Tensor) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.masks[index]


class DigitScenesDataModule(ZooDataModule):
    """Segmentation on canvases of scikit-learn digits: 11 classes (background + digits 0–9), ignore index 255.

    The source digits are split (stratified, ``seed``) into disjoint train/val/test pools of 70/15/15 %, so no
    validation or test scene reuses a training glyph. Scenes are generated once in ``setup`` from ``seed``, so the
    same arguments give the same data. Images are normalised with the training scenes' pixel mean and std and
    repeated to ``channels``.

    ``labelled_fraction`` < 1 keeps the labels of only that share of the training scenes (the first ones; a fixed
    choice given the seed; ``labelled`` holds the flag per scene): ``train_set`` holds the labelled scenes and
    ``unlabelled_set`` the others, whose masks are all 255. Supervised methods then train on the labelled scenes
    only; with ``semi_supervised`` the training loader also yields unlabelled batches (see ``ZooDataModule``), for
    MGD, and for a supervised baseline that should take as many steps as MGD (it uses the labelled part only).

    Args:
        batch_size, eval_batch_size, num_workers, pin_memory, drop_last: see ``ZooDataModule``.
        image_size: canvas side.
        num_train, num_val, num_test: scenes per split.
        digits_per_image: inclusive range of digits per canvas.
        scale_range: digit side as a multiple of 8 pixels.
        noise: standard deviation of the Gaussian pixel noise.
        ignore_border: label the faint rim of each digit 255.
        labelled_fraction: share of training scenes that keep their labels.
        semi_supervised: also yield unlabelled batches during training.
        channels: 1 or 3.
        seed: seed of the source split and of the scene generator.
    """

    def __init__(
        self,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
        image_size: int = 64,
        num_train: int = 512,
        num_val: int = 128,
        num_test: int = 128,
        digits_per_image: tuple[int, int] = (2, 5),
        scale_range: tuple[float, float] = (1.5, 3.0),
        noise: float = 0.1,
        ignore_border: bool = False,
        labelled_fraction: float = 1.0,
        semi_supervised: bool = False,
        channels: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, drop_last)
        if image_size < 16:
            raise ValueError(f"DigitScenesDataModule.image_size must be ≥ 16, got {image_size}")
        if not (1 <= digits_per_image[0] <= digits_per_image[1]):
            raise ValueError(f"DigitScenesDataModule.digits_per_image must be (low ≥ 1, high ≥ low), got {digits_per_image}")
        if not 0 < labelled_fraction <= 1:
            raise ValueError(f"DigitScenesDataModule.labelled_fraction must be in (0, 1], got {labelled_fraction}")
        if channels not in (1, 3):
            raise ValueError(f"DigitScenesDataModule.channels must be 1 or 3, got {channels}")
        if 8 * scale_range[1] > image_size:
            raise ValueError(f"DigitScenesDataModule.scale_range {scale_range} makes digits larger than the canvas")
        self.image_size, self.channels, self.seed = image_size, channels, seed
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.scene_args = dict(
            size=image_size, digits_per_image=tuple(digits_per_image), scale_range=tuple(scale_range), noise=noise,
            ignore_border=ignore_border,
        )
        self.labelled_fraction = labelled_fraction
        self.semi_supervised = semi_supervised
        self.num_classes = 11
        self.class_names = ("background", *(f"digit{k}" for k in range(10)))
        self.in_chans = channels
        self.ignore_index = IGNORE_INDEX
        self._scenes: dict[str, tuple[Tensor, Tensor]] | None = None
        self.labelled: Tensor | None = None

    @property
    def name(self) -> str:
        return "digit_scenes"

    def _generate(self) -> dict[str, tuple[Tensor, Tensor]]:
        if self._scenes is None:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            data = load_digits()
            glyphs = (data.images / 16.0).astype(np.float32)
            idx = np.arange(len(data.target))
            train, rest = train_test_split(idx, test_size=0.3, stratify=data.target, random_state=self.seed)
            val, test = train_test_split(rest, test_size=0.5, stratify=data.target[rest], random_state=self.seed)
            self.source_indices = {"train": train, "val": val, "test": test}
            scenes = {}
            for offset, (split, pool) in enumerate((("train", train), ("val", val), ("test", test))):
                rng = np.random.default_rng([self.seed, offset])
                scenes[split] = make_digit_scenes(
                    glyphs[pool], data.target[pool], self.sizes[split], rng, **self.scene_args
                )
            images, masks = scenes["train"]
            n_labelled = max(1, int(round(self.labelled_fraction * len(masks))))
            self.labelled = torch.arange(len(masks)) < n_labelled
            masks = masks.clone()
            masks[~self.labelled] = IGNORE_INDEX
            scenes["train"] = (images, masks)
            self._stats = (float(images.mean()), float(images.std()))
            self._scenes = scenes
        return self._scenes

    @property
    def mean(self) -> tuple[float, ...]:  # type: ignore[override]
        self._generate()
        return (self._stats[0],) * self.channels

    @property
    def std(self) -> tuple[float, ...]:  # type: ignore[override]
        self._generate()
        return (self._stats[1],) * self.channels

    def _dataset(self, split: str, keep: Tensor | None = None) -> _SceneDataset:
        images, masks = self._generate()[split]
        if keep is not None:
            images, masks = images[keep], masks[keep]
        m, s = self._stats
        return _SceneDataset(((images - m) / s).expand(-1, self.channels, -1, -1).contiguous(), masks)

    def setup(self, stage: str | None = None) -> None:
        self._generate()
        assert self.labelled is not None
        if self.labelled.all():
            self.train_set, self.unlabelled_set = self._dataset("train"), None
        else:
            self.train_set = self._dataset("train", self.labelled)
            self.unlabelled_set = self._dataset("train", ~self.labelled)
        self.val_set = self._dataset("val")
        self.test_set = self._dataset("test")
