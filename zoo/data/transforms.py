"""Data transforms: the replayable training augmentations (``PadCropFlip``, ``ResizedCropFlip``) that cached soft
labels store and replay, and LAD's label channel (``LabelNoiser``)."""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LabelNoiser", "PadCropFlip", "ReplayAugment", "ResizedCropFlip"]


class ReplayAugment(abc.ABC):
    """A random augmentation whose draw is a small parameter vector, so it can be stored and replayed.

    ``sample(n, generator)`` draws ``n`` parameter rows; ``apply(image, params)`` makes that view of one image
    (a (C, H, W) tensor for the tensor pipelines, a PIL image for ImageFolder). ``spec()`` identifies the
    augmentation in the cache fingerprint.
    """

    num_params: int

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` parameter rows, shape (n, num_params)."""

    @abc.abstractmethod
    def apply(self, image: Any, params: Tensor) -> Any:
        """The view of ``image`` that one parameter row describes."""

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """What identifies the augmentation in a cache's fingerprint."""


class PadCropFlip(ReplayAugment):
    """Zero-pad by ``pad`` pixels, crop back to the original size at offset (dy, dx), optionally flip horizontally.

    This is CIFAR's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` and the digits translation, applied
    to an already normalised (C, H, W) tensor: padding there with ``fill`` = −mean/std per channel equals padding
    the raw image with black. Parameters: (dy, dx, flip) with dy, dx ∈ [0, 2·pad] and flip ∈ {0, 1}.
    """

    num_params = 3

    def __init__(self, pad: int, flip: bool, fill: Sequence[float] | float = 0.0) -> None:
        if pad < 0:
            raise ValueError(f"PadCropFlip.pad must be ≥ 0, got {pad}")
        self.pad, self.flip = int(pad), bool(flip)
        self.fill = [float(v) for v in fill] if isinstance(fill, Sequence) else [float(fill)]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)
        flips = torch.randint(0, 2, (n, 1), generator=generator) if self.flip else torch.zeros(n, 1, dtype=torch.long)
        return torch.cat([offsets, flips], 1).float()

    def apply(self, image: Tensor, params: Tensor) -> Tensor:
        dy, dx, flip = (int(v) for v in params.tolist())
        if self.pad:
            c, h, w = image.shape
            fill = torch.tensor(self.fill if len(self.fill) == c else self.fill * c, dtype=image.dtype)
            padded = fill.view(c, 1, 1).expand(c, h + 2 * self.pad, w + 2 * self.pad).clone()
            padded[:, self.pad : self.pad + h, self.pad : self.pad + w] = image
            image = padded[:, dy : dy + h, dx : dx + w]
        return image.flip(-1) if flip else image

    def spec(self) -> dict[str, Any]:
        return {"name": "pad_crop_flip", "pad": self.pad, "flip": self.flip, "fill": [round(v, 6) for v in self.fill]}


class ResizedCropFlip(ReplayAugment):
    """ImageNet's ``RandomResizedCrop(size, scale, ratio)`` + horizontal flip, replayable (FKD's stored crops).

    Parameters: the crop box relative to the image, (top, left, height, width) in [0, 1], and flip. The box is
    drawn with torchvision's rule (10 tries of area ∈ scale·A and log-uniform aspect ratio, then a centre crop)
    from a unit square, so one draw replays on images of any size; ``apply`` takes a PIL image or a tensor and
    returns a ``size``×``size`` crop (then the data module's ToTensor/normalisation follow).
    """

    num_params = 5

    def __init__(
        self, size: int, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
    ) -> None:
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)

    def _box(self, g: torch.Generator) -> tuple[float, float, float, float]:
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            area = float(torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=g))
            aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)))
            w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
            if 0 < w <= 1 and 0 < h <= 1:
                top = float(torch.rand(1, generator=g)) * (1 - h)
                left = float(torch.rand(1, generator=g)) * (1 - w)
                return top, left, h, w
        aspect = min(max(1.0, self.ratio[0]), self.ratio[1])  # fallback: the largest centre crop in range
        w, h = (1.0, 1.0 / aspect) if aspect >= 1 else (aspect, 1.0)
        return (1 - h) / 2, (1 - w) / 2, h, w

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        rows = [[*self._box(generator), float(torch.randint(0, 2, (1,), generator=generator))] for _ in range(n)]
        return torch.tensor(rows, dtype=torch.float32)

    def apply(self, image: Any, params: Tensor) -> Any:
        import torchvision.transforms.v2.functional as TF

        top, left, h, w, flip = params.tolist()
        width, height = TF.get_size(image)[::-1]
        box = (round(top * height), round(left * width), max(1, round(h * height)), max(1, round(w * width)))
        out = TF.resized_crop(image, *box, [self.size, self.size], antialias=True)
        return TF.horizontal_flip(out) if flip >= 0.5 else out

    def spec(self) -> dict[str, Any]:
        return {"name": "resized_crop_flip", "size": self.size, "scale": list(self.scale), "ratio": list(self.ratio)}


class LabelNoiser(nn.Module):
    """LAD's label noising module: the ground truth as a noisy scalar channel for a label-assisted teacher.

    From "Make a Strong Teacher with Label Assistance" (LAD, arXiv 2407.13254), following the official
    ``train_baseline.py``. Pixels labelled ``ignore_index`` become an extra class K = ``num_classes`` (the code maps
    its ignore label −1, from VOC's 255 and from crop padding, to 21 = K). Each class k ∈ {0..K} gets a code c_k,
    each pixel the code of its class, plus Gaussian noise, and the result is scaled:

        ℓ̃[n, 0, i] = (c_{n, y[n, i]} + ε[n, i]) · scale,   ε ~ N(0, σ²).

    - Random mode (``fixed=False``, teacher training): c_{n,k} ~ N(0, 1) drawn independently per image and per class
      (for all K + 1 classes, present or not), σ = ``noise_std`` = 0.03.
    - Fixed mode (``fixed=True``, distillation): c_k = (k − ``fixed_offset``) / ``fixed_step`` = (k − 11) / 10,
      σ = ``fixed_noise_std`` = 0.02.

    ``scale`` = 100 matches the official inputs: mean-subtracted BGR without std division (about ±128). With
    std-normalised inputs use scale ≈ 1–2. The offset 11 and step 10 are hard-coded in the code for VOC's 22 codes
    (spanning [−1.1, 1.0]); on other datasets they are kept here, so the codes span (K − 11)/10 at the top.
    The official in-place loop could re-code a pixel whose random code lands within 1e-5 of a later class index;
    looking the codes up in a table has no such collision.

    Returns a float32 (N, 1, H, W) map on the target's device; concatenate it to the teacher's input channels.

    Example:
        >>> noiser = LabelNoiser(num_classes=21)
        >>> y = torch.randint(0, 21, (2, 8, 8))
        >>> noiser(y).shape, noiser(y, fixed=True).shape
        (torch.Size([2, 1, 8, 8]), torch.Size([2, 1, 8, 8]))
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        noise_std: float = 0.03,
        fixed_noise_std: float = 0.02,
        scale: float = 100.0,
        fixed_offset: float = 11.0,
        fixed_step: float = 10.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LabelNoiser.num_classes must be positive, got {num_classes}")
        if noise_std < 0 or fixed_noise_std < 0:
            raise ValueError(
                f"LabelNoiser.noise_std and fixed_noise_std must be non-negative, got {noise_std}, {fixed_noise_std}"
            )
        if fixed_step == 0:
            raise ValueError("LabelNoiser.fixed_step must be non-zero")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.noise_std = noise_std
        self.fixed_noise_std = fixed_noise_std
        self.scale = scale
        self.fixed_offset = fixed_offset
        self.fixed_step = fixed_step

    def fixed_codes(self, device: torch.device | None = None) -> Tensor:
        """The distillation-time codes c_k = (k − offset) / step for k = 0..K, shape (K + 1,), before scaling."""
        k = torch.arange(self.num_classes + 1, device=device, dtype=torch.float32)
        return (k - self.fixed_offset) / self.fixed_step

    def class_map(self, target: Tensor) -> Tensor:
        """Labels with ``ignore_index`` replaced by the extra class K; raises on any other out-of-range label."""
        if target.dim() != 3 or target.dtype.is_floating_point:
            raise ValueError(f"LabelNoiser: target must be an integer (N, H, W) tensor, got {target.dtype} "
                             f"{tuple(target.shape)}")
        k = self.num_classes
        classes = torch.where(target == self.ignore_index, torch.full_like(target, k), target).long()
        if classes.numel() and (classes.min() < 0 or classes.max() > k):
            raise ValueError(
                f"LabelNoiser: labels must lie in [0, {k - 1}] or equal ignore_index={self.ignore_index}, got range "
                f"[{int(target.min())}, {int(target.max())}]"
            )
        return classes

    def forward(self, target: Tensor, fixed: bool = False, generator: torch.Generator | None = None) -> Tensor:
        classes = self.class_map(target)
        n = classes.shape[0]
        device = classes.device
        if fixed:
            codes = self.fixed_codes(device).expand(n, -1)
            std = self.fixed_noise_std
        else:
            codes = torch.randn(n, self.num_classes + 1, device=device, generator=generator)
            std = self.noise_std
        label = codes.gather(1, classes.flatten(1)).view(classes.shape)[:, None]
        noise = torch.randn(label.shape, device=device, generator=generator) * std
        return (label + noise) * self.scale
