"""CutMix box masks and mixing, for semi-supervised segmentation (MGD, CPS)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BoxMaskGenerator", "cutmix"]


class BoxMaskGenerator:
    """CutMix box masks, as CPS and MGD ``mask_gen.py::BoxMaskGenerator`` (defaults: MGD's VOC/Cityscapes config).

    Per mask, each of ``n_boxes`` boxes gets an area fraction a ~ U(``prop_range``) (``prop_by_area=True``). With a
    random aspect ratio its height and width fractions are a^u and a^(1−u), u ~ U(0, 1), otherwise both √a. Both
    are then multiplied by √(1 / n_boxes), so each box covers a / n_boxes of the image and three boxes together
    cover at most a. With ``prop_by_area=False``, height and width fractions are drawn from ``prop_range``
    directly (the same draw for both without a random aspect ratio), times the same √(1 / n_boxes). Sizes in
    pixels are rounded, and a box's corner is placed uniformly so that it lies inside the image
    (``within_bounds``), or its centre is (then it is clipped to the image).

    Boxes toggle the mask: with ``invert=True`` (MGD's setting, ``cutmix_boxmask_no_invert = False``) the mask
    starts at 0 and box pixels flip to 1; with ``invert=False`` it starts at 1 and boxes flip to 0. Where boxes
    overlap they flip back, as in the official code. Mix with ``cutmix``: ū = u₀·(1 − m) + u₁·m, so with
    ``invert=True`` the boxes show u₁ and the rest u₀. The official code clips out-of-bounds boxes by numpy
    slicing, which wraps negative starts round; here they are clipped to the image.

    Example:
        >>> gen = BoxMaskGenerator()
        >>> m = gen.generate(4, (32, 32), generator=torch.Generator().manual_seed(0))
        >>> m.shape
        torch.Size([4, 1, 32, 32])
    """

    def __init__(
        self,
        n_boxes: int = 3,
        prop_range: tuple[float, float] | float = (0.25, 0.5),
        random_aspect_ratio: bool = True,
        prop_by_area: bool = True,
        within_bounds: bool = True,
        invert: bool = True,
    ) -> None:
        if isinstance(prop_range, (int, float)):
            prop_range = (float(prop_range), float(prop_range))
        lo, hi = prop_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"BoxMaskGenerator.prop_range must satisfy 0 <= low <= high <= 1, got {prop_range}")
        if n_boxes < 1:
            raise ValueError(f"BoxMaskGenerator.n_boxes must be positive, got {n_boxes}")
        self.n_boxes = n_boxes
        self.prop_range = (float(lo), float(hi))
        self.random_aspect_ratio = random_aspect_ratio
        self.prop_by_area = prop_by_area
        self.within_bounds = within_bounds
        self.invert = invert

    def _uniform(self, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        lo, hi = self.prop_range
        return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=torch.float64)

    def boxes(self, n: int, size: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """Box corners (y0, x0, y1, x1) in pixels, (n, n_boxes, 4), float64 on the CPU, before clipping."""
        shape = (n, self.n_boxes)
        if self.prop_by_area:
            props = self._uniform(shape, generator)
            if self.random_aspect_ratio:
                u = torch.rand(shape, generator=generator, dtype=torch.float64)
                # a^u with a = 0 is 0 for every u (the official code masks these NaN-prone zeros the same way).
                y_props = torch.where(props > 0, torch.exp(u * torch.log(props.clamp_min(1e-300))), props)
                x_props = torch.where(props > 0, props / y_props.clamp_min(1e-300), props)
            else:
                y_props = x_props = props.sqrt()
        elif self.random_aspect_ratio:
            y_props = self._uniform(shape, generator)
            x_props = self._uniform(shape, generator)
        else:
            y_props = x_props = self._uniform(shape, generator)
        fac = math.sqrt(1.0 / self.n_boxes)
        extent = torch.tensor([float(size[0]), float(size[1])], dtype=torch.float64)
        sizes = torch.round(torch.stack([y_props * fac, x_props * fac], dim=2) * extent)
        u = torch.rand(sizes.shape, generator=generator, dtype=torch.float64)
        if self.within_bounds:
            start = torch.round((extent - sizes) * u)
            return torch.cat([start, start + sizes], dim=2)
        centre = torch.round(extent * u)
        return torch.cat([centre - sizes * 0.5, centre + sizes * 0.5], dim=2)

    def generate(
        self,
        n: int,
        size: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``n`` masks of ``size`` = (H, W), as a float32 (n, 1, H, W) tensor of 0s and 1s.

        Drawn on the CPU (with ``generator``, a CPU generator, if given), then moved to ``device``.
        """
        h, w = int(size[0]), int(size[1])
        masks = torch.full((n, 1, h, w), 0.0 if self.invert else 1.0)
        for i, rects in enumerate(self.boxes(n, (h, w), generator).tolist()):
            for y0, x0, y1, x1 in rects:
                # int() truncates like the official slicing; clipping keeps out-of-bounds boxes inside the image.
                ya, yb = min(max(int(y0), 0), h), min(max(int(y1), 0), h)
                xa, xb = min(max(int(x0), 0), w), min(max(int(x1), 0), w)
                masks[i, 0, ya:yb, xa:xb] = 1.0 - masks[i, 0, ya:yb, xa:xb]
        return masks.to(device) if device is not None else masks

    def __call__(self, n: int, size: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        return self.generate(n, size, generator)


def cutmix(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """CutMix two batches with a (N, 1, H, W) mask from ``BoxMaskGenerator``: a·(1 − m) + b·m.

    Where m = 1 the result comes from ``b``, elsewhere from ``a``. Works on images and logits (N, C, H, W) and on
    integer label maps (N, H, W), which are selected rather than blended so they keep their dtype. Mixing teacher
    logits of u₀ and u₁ with the same mask and taking the argmax gives MGD's pseudo-labels for ū.
    """
    m = mask[:, 0] if a.dim() == mask.dim() - 1 and mask.shape[1] == 1 else mask
    if a.dtype.is_floating_point:
        m = m.to(a.dtype)
        return a * (1 - m) + b * m
    return torch.where(m > 0.5, b, a)
