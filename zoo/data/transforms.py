"""Data transforms: the replayable training augmentations (``PadCropFlip``, ``ResizedCropFlip``) that cached soft
labels store and replay, the classification modules' training augmentation in timm's option names
(``ClassificationAugmentation``) and LAD's label channel (``LabelNoiser``)."""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "AUGMENTATION_PRESETS",
    "ClassificationAugmentation",
    "LabelNoiser",
    "PadCropFlip",
    "ReplayAugment",
    "ResizedCropFlip",
    "eval_resize_size",
]


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
    returns a ``size``×``size`` crop resized with ``interpolation`` (then the data module's ToTensor/normalisation
    follow). ``flip=False`` never flips (the flip parameter is then always 0).
    """

    num_params = 5

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        interpolation: str = "bilinear",
    ) -> None:
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.flip, self.interpolation = bool(flip), str(interpolation)

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
        rows = []
        for _ in range(n):
            box = self._box(generator)
            flip = float(torch.randint(0, 2, (1,), generator=generator)) if self.flip else 0.0
            rows.append([*box, flip])
        return torch.tensor(rows, dtype=torch.float32)

    def apply(self, image: Any, params: Tensor) -> Any:
        import torchvision.transforms.v2.functional as TF
        from timm.data.transforms import str_to_interp_mode

        top, left, h, w, flip = params.tolist()
        width, height = TF.get_size(image)[::-1]
        box = (round(top * height), round(left * width), max(1, round(h * height)), max(1, round(w * width)))
        mode = str_to_interp_mode(self.interpolation)
        out = TF.resized_crop(image, *box, [self.size, self.size], interpolation=mode, antialias=True)
        return TF.horizontal_flip(out) if flip >= 0.5 else out

    def spec(self) -> dict[str, Any]:
        spec = {"name": "resized_crop_flip", "size": self.size, "scale": list(self.scale), "ratio": list(self.ratio)}
        # Only non-default values enter the fingerprint, so caches built before these options existed stay valid.
        if not self.flip:
            spec["flip"] = False
        if self.interpolation != "bilinear":
            spec["interpolation"] = self.interpolation
        return spec


AUGMENTATION_PRESETS = ("imagenet", "simple", "none")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
# timm's eval crop fraction (timm.data.constants.DEFAULT_CROP_PCT): 224 of 256.
IMAGENET_CROP_PCT = 0.875


def eval_resize_size(image_size: int, crop_pct: float) -> int:
    """timm's evaluation resize (``transforms_imagenet_eval``): the shorter side goes to ⌊image_size / crop_pct⌋,
    then the centre ``image_size`` crop is taken (224 at 0.875 → 256; 28 at 0.875 → 32; any size at 1 → itself)."""
    return math.floor(image_size / crop_pct)


class ClassificationAugmentation:
    """The training augmentation of the image classification data modules, with timm's option names.

    Presets (``preset``):

    - ``imagenet``: timm's ImageNet training transform (``timm.data.create_transform(is_training=True)``):
      RandomResizedCrop(``scale``, ``ratio``, ``interpolation``), horizontal flip with probability ``hflip``
      (default 0.5), vertical flip ``vflip``, then ``auto_augment`` or ``color_jitter``, ToTensor, normalisation
      and random erasing with probability ``re_prob``. Defaults scale (0.08, 1) and ratio (3/4, 4/3): torchvision's
      RandomResizedCrop + flip, the torchvision/timm ImageNet recipe.
    - ``simple``: for small images whose orientation carries meaning (digits, characters, CIFAR): the image is
      resized (shorter side) and centre-cropped to ``image_size`` (nothing happens when it already has that size),
      zero-padded by ``pad`` pixels and cropped back at a random offset (CIFAR's ``RandomCrop(32, padding=4)``),
      flipped only when ``hflip``/``vflip`` say so (default: never), then timm's colour stage, normalisation and
      random erasing as above.
    - ``none``: timm's no-augmentation training transform (``transforms_noaug_train``): resize and centre crop
      only; the random options must stay unset.

    Options that do not apply to the preset (``scale``/``ratio`` outside ``imagenet``, ``pad`` outside ``simple``,
    any random option with ``none``) are refused, naming the option. The stages come from timm's
    ``transforms_imagenet_train(separate=True)``; ``simple``/``none`` replace its resized crop with timm's no-aug
    resize + centre crop and, for ``simple``, torchvision's ``RandomCrop(padding=pad)`` and the flips. Colour
    jitter is off by default (timm's factory default is 0.4); as in timm it is skipped when ``auto_augment`` is set
    (unless the policy contains ``3a``).

    Cached soft labels (``zoo.soft_labels``) replay ``imagenet`` (as :class:`ResizedCropFlip`) and ``simple``
    (as :class:`PadCropFlip`) with ``hflip`` 0 or 0.5; ``replay_blocker()`` names the first option that rules the
    cache out (``auto_augment``, ``color_jitter``, ``re_prob``, ``vflip``, another ``hflip``).

    Args:
        preset: ``imagenet`` | ``simple`` | ``none``.
        scale, ratio: RandomResizedCrop area and aspect-ratio ranges (``imagenet`` only; timm's defaults).
        hflip: horizontal flip probability (default 0.5 for ``imagenet``, 0 for ``simple``).
        vflip: vertical flip probability.
        color_jitter: brightness/contrast/saturation factor (one number) or 3–4 factors (with hue); None: off.
        auto_augment: a timm policy string (``rand-m9-mstd0.5-inc1``, ``augmix-m5-w3``, ``original``, ``v0``, ...).
        re_prob: random-erasing probability (timm's ``RandomErasing``, constant mode).
        interpolation: resize interpolation (timm's names).
        pad: padding of the ``simple`` pad-crop in pixels (default: ``image_size / 8`` rounded, at least 1).
        owner: names the data module in error messages.
    """

    def __init__(
        self,
        preset: Literal["imagenet", "simple", "none"] = "imagenet",
        *,
        scale: Sequence[float] | None = None,
        ratio: Sequence[float] | None = None,
        hflip: float | None = None,
        vflip: float = 0.0,
        color_jitter: float | Sequence[float] | None = None,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        interpolation: str = "bilinear",
        pad: int | None = None,
        owner: str = "data",
    ) -> None:
        if preset not in AUGMENTATION_PRESETS:
            raise ValueError(f"{owner}.augmentation must be one of {', '.join(AUGMENTATION_PRESETS)}; got {preset!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"{owner}.interpolation must be one of {', '.join(INTERPOLATIONS)}; got {interpolation!r}")
        only = {"scale": ("imagenet", scale), "ratio": ("imagenet", ratio), "pad": ("simple", pad)}
        for name, (wanted, value) in only.items():
            if value is not None and preset != wanted:
                raise ValueError(f"{owner}.{name} applies to augmentation: {wanted} only; this one is {preset}")
        if color_jitter is not None and not isinstance(color_jitter, (int, float)):
            color_jitter = tuple(float(v) for v in color_jitter)
            if len(color_jitter) not in (3, 4):
                raise ValueError(f"{owner}.color_jitter takes one factor or 3–4 (with hue); got {list(color_jitter)}")
        if color_jitter is not None and not any(color_jitter if isinstance(color_jitter, tuple) else [color_jitter]):
            color_jitter = None  # all-zero factors: no jitter at all
        if preset == "none":
            for name, value in (("hflip", hflip), ("vflip", vflip), ("color_jitter", color_jitter),
                                ("auto_augment", auto_augment), ("re_prob", re_prob)):
                if value:
                    raise ValueError(
                        f"{owner}.{name}={value!r} asks for random augmentation; augmentation: none has none"
                    )
        hflip = (0.5 if preset == "imagenet" else 0.0) if hflip is None else float(hflip)
        for name, p in (("hflip", hflip), ("vflip", vflip), ("re_prob", re_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{owner}.{name} is a probability in [0, 1]; got {p}")
        if scale is not None:
            scale = tuple(float(v) for v in scale)
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{owner}.scale must be [min, max] with 0 < min ≤ max ≤ 1; got {list(scale)}")
        if ratio is not None:
            ratio = tuple(float(v) for v in ratio)
            if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
                raise ValueError(f"{owner}.ratio must be [min, max] with 0 < min ≤ max; got {list(ratio)}")
        if pad is not None and pad < 0:
            raise ValueError(f"{owner}.pad must be ≥ 0; got {pad}")
        self.preset, self.owner = preset, owner
        self.scale = scale or (0.08, 1.0)
        self.ratio = ratio or (3 / 4, 4 / 3)
        self.hflip, self.vflip, self.re_prob = hflip, float(vflip), float(re_prob)
        self.color_jitter, self.auto_augment = color_jitter, auto_augment or None
        self.interpolation, self.pad = interpolation, pad

    def _timm_stages(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> tuple[Any, Any, Any]:
        """timm's three training stages (crop + flips, colour / auto-augment, ToTensor + normalise + erasing)."""
        from timm.data.transforms_factory import transforms_imagenet_train

        try:
            return transforms_imagenet_train(
                image_size, scale=self.scale, ratio=self.ratio, hflip=self.hflip, vflip=self.vflip,
                color_jitter=self.color_jitter, auto_augment=self.auto_augment, interpolation=self.interpolation,
                mean=tuple(mean), std=tuple(std), re_prob=self.re_prob, separate=True,
            )
        except AssertionError as err:  # timm asserts on an unknown auto-augment policy
            raise ValueError(
                f"{self.owner}.auto_augment={self.auto_augment!r} is not a timm policy ({err}); e.g. "
                "rand-m9-mstd0.5-inc1, augmix-m5-w3, original, v0"
            ) from err

    def train_transform(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        fit: bool = True,
        normalize: bool = True,
        pad_fill: int = 0,
    ) -> Any:
        """The training transform from a PIL image to a normalised tensor.

        ``fit`` first resizes and centre-crops to ``image_size`` for ``simple``/``none`` (data modules whose images
        already have that size, such as CIFAR, pass False); ``normalize`` False gives [0, 1] tensors without the
        normalisation (random erasing still applies). ``pad_fill`` is the pad value of ``simple`` (0: black).
        """
        import torchvision.transforms as T
        from timm.data.random_erasing import RandomErasing
        from timm.data.transforms import MaybeToTensor, str_to_interp_mode

        primary, secondary, final = self._timm_stages(image_size, mean, std)
        if self.preset == "imagenet":
            stages = list(primary.transforms)
        else:  # timm's no-aug fitting (transforms_noaug_train), then the pad-crop and flips of ``simple``
            fitting = [T.Resize(image_size, interpolation=str_to_interp_mode(self.interpolation)),
                       T.CenterCrop(image_size)] if fit else []
            pad = self.pad_for(image_size)
            stages = [*fitting, *([T.RandomCrop(image_size, padding=pad, fill=pad_fill)] if pad else [])]
            stages += [T.RandomHorizontalFlip(p=self.hflip)] if self.hflip > 0 else []
            stages += [T.RandomVerticalFlip(p=self.vflip)] if self.vflip > 0 else []
        if normalize:
            tail = list(final.transforms)
        else:
            tail = [MaybeToTensor(), *([RandomErasing(self.re_prob, device="cpu")] if self.re_prob > 0 else [])]
        return T.Compose([*stages, *secondary.transforms, *tail])

    def pad_for(self, image_size: int) -> int:
        """The pad-crop padding: ``pad``, by default an eighth of the side (CIFAR's 4 at 32 px, 4 at 28 px), at
        least 1; 0 outside ``simple``."""
        if self.preset != "simple":
            return 0
        return self.pad if self.pad is not None else max(1, round(image_size / 8))

    def replay_blocker(self) -> str | None:
        """The first option that cached soft labels cannot replay, as ``name=value``; None when replayable."""
        if self.auto_augment:
            return f"auto_augment={self.auto_augment!r}"
        if self.color_jitter is not None:
            value = list(self.color_jitter) if isinstance(self.color_jitter, tuple) else self.color_jitter
            return f"color_jitter={value}"
        if self.re_prob > 0:
            return f"re_prob={self.re_prob}"
        if self.vflip > 0:
            return f"vflip={self.vflip}"
        if self.hflip not in (0.0, 0.5):
            return f"hflip={self.hflip}"
        return None

    def replay_augment(self, image_size: int, fill: Sequence[float] | float = 0.0) -> ReplayAugment:
        """This augmentation as a :class:`ReplayAugment`: ``ResizedCropFlip`` (``imagenet``, applied to the PIL
        image) or ``PadCropFlip`` (``simple``/``none``, applied to the fitted, normalised tensor with ``fill`` =
        −mean/std per channel: the black border of the PIL pad-crop). Raises when ``replay_blocker()`` names one."""
        blocker = self.replay_blocker()
        if blocker is not None:
            raise ValueError(
                f"{self.owner}: cached soft labels cannot replay {blocker}; they replay the resized crop "
                "(augmentation: imagenet) or the pad-crop (simple) with hflip 0 or 0.5 only: drop that option "
                "or model.init_args.soft_labels"
            )
        if self.preset == "imagenet":
            return ResizedCropFlip(image_size, self.scale, self.ratio, flip=self.hflip > 0,
                                   interpolation=self.interpolation)
        return PadCropFlip(self.pad_for(image_size), flip=self.hflip > 0, fill=fill)

    def __repr__(self) -> str:
        options = {"scale": self.scale, "ratio": self.ratio} if self.preset == "imagenet" else {"pad": self.pad}
        options.update(hflip=self.hflip, vflip=self.vflip, color_jitter=self.color_jitter,
                       auto_augment=self.auto_augment, re_prob=self.re_prob, interpolation=self.interpolation)
        return f"ClassificationAugmentation({self.preset!r}, {', '.join(f'{k}={v!r}' for k, v in options.items())})"


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
