"""Differentiable Siamese augmentation (DSA) and ZCA whitening, the preprocessing of MTT, DATM and AST."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.io import atomic_path

__all__ = [
    "DIGITS_DSA_STRATEGY",
    "DSA_FAMILIES",
    "DSA_STRATEGY",
    "DSAParams",
    "DiffAugment",
    "ZCAWhitening",
    "brightness",
    "contrast",
    "cutout",
    "flip",
    "rotate",
    "saturation",
    "scale",
    "translate",
]

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
"""The DSA default of MTT, DATM and AST (``--dsa_strategy``) for natural images."""

DIGITS_DSA_STRATEGY = "color_crop_cutout_scale_rotate"
"""DSA for digit datasets (MNIST, SVHN, sklearn digits): no flip, as the DatasetCondensation README recommends."""

DSA_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAParams:
    """Strengths of the DSA families; the defaults are those of the official ``ParamDiffAug``.

    Args:
        brightness: b in x + (u − ½)·b.
        saturation: s in (x − mean_c)·(u·s) + mean_c.
        contrast: c in (x − mean_CHW)·(u + c) + mean_CHW (an offset, so the factor lies in [c, c + 1]).
        crop: the largest shift as a fraction of the side, int(ratio·H + ½) pixels (4 px at 32², 1 px at 8²).
        cutout: the side of the zeroed square as a fraction of the image side, int(ratio·H + ½).
        flip: the probability of a horizontal flip.
        scale: x and y factors are drawn independently from U[1/scale, scale].
        rotate: the largest rotation in degrees; the angle is drawn from U[−rotate, rotate].
        align_corners: passed to ``affine_grid``/``grid_sample`` for scale and rotate. True as in MTT and DATM
            (``utils.py``); the original DatasetCondensation code leaves PyTorch's default (False).
    """

    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop: float = 0.125
    cutout: float = 0.5
    flip: float = 0.5
    scale: float = 1.2
    rotate: float = 15.0
    align_corners: bool = True


# --- the transforms with explicit parameters: one value per sample, shape (B,) ---------------------------------------


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def brightness(x: Tensor, u: Tensor, ratio: float = 1.0) -> Tensor:
    """x + (u − ½)·ratio per sample."""
    return x + (_per_sample(u, x) - 0.5) * ratio


def saturation(x: Tensor, u: Tensor, ratio: float = 2.0) -> Tensor:
    """(x − m)·(u·ratio) + m, with m the mean over channels at each pixel."""
    m = x.mean(dim=1, keepdim=True)
    return (x - m) * (_per_sample(u, x) * ratio) + m


def contrast(x: Tensor, u: Tensor, ratio: float = 0.5) -> Tensor:
    """(x − m)·(u + ratio) + m, with m the mean of each image over (C, H, W)."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_per_sample(u, x) + ratio) + m


def translate(x: Tensor, shift_h: Tensor, shift_w: Tensor) -> Tensor:
    """Integer translation with zero fill: out[b, :, i, j] = x[b, :, i + shift_h[b], j + shift_w[b]], or 0 outside.

    The official crop pads one zero pixel and clamps the source index into the padded image, so every out-of-range
    index lands on a zero; this does the same. A gather, hence differentiable in x.
    """
    b, _, h, w = x.shape
    dev = x.device
    rows = (torch.arange(h, device=dev) + shift_h.to(dev).view(b, 1) + 1).clamp(0, h + 1)  # (B, H)
    cols = (torch.arange(w, device=dev) + shift_w.to(dev).view(b, 1) + 1).clamp(0, w + 1)  # (B, W)
    padded = F.pad(x, (1, 1, 1, 1))
    batch = torch.arange(b, device=dev).view(b, 1, 1)
    # The advanced indices are split by a slice, so their dimensions (B, H, W) come first and C last.
    return padded[batch, :, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)


def cutout(x: Tensor, centre_h: Tensor, centre_w: Tensor, size: tuple[int, int]) -> Tensor:
    """Zeroes the square rows [c_h − s_h//2, c_h − s_h//2 + s_h) × cols likewise, clipped to the image, per sample."""
    b, _, h, w = x.shape
    dev = x.device
    top = centre_h.to(dev).view(b, 1) - size[0] // 2
    left = centre_w.to(dev).view(b, 1) - size[1] // 2
    r, c = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (r >= top) & (r < top + size[0])  # (B, H)
    in_cols = (c >= left) & (c < left + size[1])  # (B, W)
    keep = ~(in_rows.view(b, 1, h, 1) & in_cols.view(b, 1, 1, w))
    return x * keep.to(x.dtype)


def flip(x: Tensor, u: Tensor, prob: float = 0.5) -> Tensor:
    """Flips sample b horizontally where u[b] < prob."""
    return torch.where(u.to(x.device).view(-1, 1, 1, 1) < prob, x.flip(3), x)


def _warp(x: Tensor, theta: Tensor, align_corners: bool) -> Tensor:
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=align_corners)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)


def scale(x: Tensor, sx: Tensor, sy: Tensor, align_corners: bool = True) -> Tensor:
    """Resamples with the affine map diag(sx, sy) on normalised coordinates (s > 1 shrinks the content)."""
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], -1), torch.stack([zero, sy, zero], -1)], -2)
    return _warp(x, theta, align_corners)


def rotate(x: Tensor, angle: Tensor, align_corners: bool = True) -> Tensor:
    """Resamples with the rotation [[cos a, −sin a], [sin a, cos a]] on normalised coordinates; angle in radians."""
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], -2)
    return _warp(x, theta, align_corners)


# --- the random module ------------------------------------------------------------------------------------------------


class _Sampler:
    """Draws the random parameters of one call: per sample, or one value broadcast to the batch (Siamese)."""

    def __init__(self, x: Tensor, generator: torch.Generator | None, shared: bool) -> None:
        self.batch = x.shape[0]
        self.n = 1 if shared else self.batch
        self.generator = generator
        self.device = generator.device if generator is not None else x.device
        self.dtype = x.dtype

    def _expand(self, v: Tensor) -> Tensor:
        return v.expand(self.batch)

    def uniform(self) -> Tensor:
        u = torch.rand(self.n, generator=self.generator, device=self.device, dtype=self.dtype)
        return self._expand(u)

    def integers(self, low: int, high: int) -> Tensor:
        """Uniform on {low, ..., high − 1}."""
        return self._expand(torch.randint(low, high, (self.n,), generator=self.generator, device=self.device))

    def choice(self, k: int) -> int:
        # Without a generator draw on the CPU, as the official code does, so a CUDA batch does not sync here.
        device = self.device if self.generator is not None else torch.device("cpu")
        return int(torch.randint(k, (1,), generator=self.generator, device=device).item())


class DiffAugment(nn.Module):
    """Differentiable Siamese augmentation, DSA (Zhao & Bilen, ICML 2021, arXiv 2102.08259), as used by MTT/DATM/AST.

    ``strategy`` names families joined by "_": color, crop, cutout, flip, scale, rotate. In mode "S" (the default,
    used by MTT, DATM and AST) each call applies ONE family drawn uniformly from the strategy; mode "M" applies
    every family in the strategy's order. With u ~ U(0, 1) drawn afresh per sample (and per family):

    - color: brightness x + (u₁ − ½)·b, then saturation (x − mean_c)·(u₂·s) + mean_c, then contrast
      (x − mean_CHW)·(u₃ + c) + mean_CHW; b = 1, s = 2, c = 0.5. mean_c is the channel mean at each pixel.
    - crop: integer shifts in {−k, ..., k} along H and W, k = int(0.125·H + ½), zero fill.
    - cutout: a zeroed square of side int(0.5·H + ½) centred uniformly (may be clipped at the border).
    - flip: horizontal with probability 0.5.
    - scale: x and y factors from U[1/1.2, 1.2]; rotate: angle from U[−15°, 15°]; both by ``affine_grid`` +
      bilinear ``grid_sample`` with zero padding (``align_corners=True`` as in MTT/DATM).

    Every transform is a torch op on ``x`` (no in-place writes), so gradients reach the input, which is what lets
    the synthetic pixels be learned through the augmentation. Defaults come from ``ParamDiffAug`` in
    VICO-UoE/DatasetCondensation ``utils.py``, identical in mtt-distillation and DATM.

    Randomness: a plain ``aug(x)`` draws fresh per-sample parameters from the global RNG, in the order and amounts
    of the official ``DiffAugment`` on a CPU batch and with its float32 arithmetic: the same RNG state gives the
    same augmented batch bit for bit (``benchmarks/peers/mtt_official.py`` compares the two). ``generator`` draws
    them from that generator instead (per sample); trajectory matching passes one seeded from its own generator in
    every inner step, so a checkpoint carries the stream. ``seed`` is DSA's Siamese mode for gradient/distribution
    matching: one parameter set for the whole batch, drawn from a fresh generator seeded with ``seed``, so
    ``aug(real, seed=k)`` and ``aug(syn, seed=k)`` receive the same family and the same parameters even when the
    batch sizes differ.

    Example:
        >>> aug = DiffAugment(DSA_STRATEGY)
        >>> x = torch.randn(4, 3, 32, 32, requires_grad=True)
        >>> aug(x).sum().backward()
        >>> x.grad.shape
        torch.Size([4, 3, 32, 32])

    Args:
        strategy: families joined by "_"; "" or "none" disables augmentation.
        mode: "S" (one family per call) or "M" (all families in turn).
        params: strengths; ``DSAParams()`` by default.
    """

    def __init__(
        self,
        strategy: str = DSA_STRATEGY,
        mode: Literal["S", "M"] = "S",
        params: DSAParams | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("S", "M"):
            raise ValueError(f"DiffAugment.mode must be 'S' (one family per call) or 'M' (all), got {mode!r}")
        self.strategy = strategy
        self.mode = mode
        self.params = params if params is not None else DSAParams()
        self.families: tuple[str, ...] = () if strategy.lower() in ("", "none") else tuple(strategy.split("_"))
        unknown = [f for f in self.families if f not in DSA_FAMILIES]
        if unknown:
            raise ValueError(
                f"DiffAugment.strategy {strategy!r}: unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                f"expected names from {list(DSA_FAMILIES)} joined by '_', or '' / 'none'"
            )

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, mode={self.mode!r}, params={self.params}"

    def forward(self, x: Tensor, generator: torch.Generator | None = None, seed: int | None = None) -> Tensor:
        """Augments a batch (B, C, H, W).

        Args:
            x: the images; any floating dtype, any device.
            generator: draw the random parameters from this generator (on its device) instead of the global RNG.
            seed: Siamese mode: one parameter set for the batch, from ``torch.Generator().manual_seed(seed)``.
        """
        if not self.families:
            return x
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"DiffAugment expects a floating (B, C, H, W) batch, got {x.dtype} {tuple(x.shape)}")
        if seed is not None:
            if generator is not None:
                raise ValueError("DiffAugment: pass either generator or seed, not both")
            generator = torch.Generator().manual_seed(seed)
        rng = _Sampler(x, generator, shared=seed is not None)
        if self.mode == "S":
            x = self._apply_family(self.families[rng.choice(len(self.families))], x, rng)
        else:
            for family in self.families:
                x = self._apply_family(family, x, rng)
        return x.contiguous()

    def _apply_family(self, family: str, x: Tensor, rng: _Sampler) -> Tensor:
        p = self.params
        h, w = x.shape[2], x.shape[3]
        if family == "color":
            x = brightness(x, rng.uniform(), p.brightness)
            x = saturation(x, rng.uniform(), p.saturation)
            return contrast(x, rng.uniform(), p.contrast)
        if family == "crop":
            kh, kw = int(h * p.crop + 0.5), int(w * p.crop + 0.5)
            return translate(x, rng.integers(-kh, kh + 1), rng.integers(-kw, kw + 1))
        if family == "cutout":
            size = (int(h * p.cutout + 0.5), int(w * p.cutout + 0.5))
            # Centres range over [0, H) for odd sides and [0, H] for even ones, as in the official rand_cutout.
            return cutout(x, rng.integers(0, h + 1 - size[0] % 2), rng.integers(0, w + 1 - size[1] % 2), size)
        if family == "flip":
            return flip(x, rng.uniform(), p.flip)
        if family == "scale":
            lo = 1.0 / p.scale
            sx = rng.uniform() * (p.scale - lo) + lo
            sy = rng.uniform() * (p.scale - lo) + lo
            return scale(x, sx, sy, p.align_corners)
        if family == "rotate":
            # the official rand_rotate's float32 arithmetic, step by step, so the same draw gives the same angle
            angle = (rng.uniform() - 0.5) * 2 * p.rotate / 180 * math.pi
            return rotate(x, angle, p.align_corners)
        raise AssertionError(family)  # the constructor validated the names


# --- ZCA whitening ----------------------------------------------------------------------------------------------------


class ZCAWhitening(nn.Module):
    """ZCA whitening fitted on training images, as ``kornia.enhance.ZCAWhitening(eps=0.1)`` in MTT and DATM.

    With the training images flattened to X ∈ R^{N×D}, μ their mean and Σ = (X − μ)ᵀ(X − μ)/(N − 1) (unbiased, the
    kornia default that MTT keeps), Σ = U·diag(S)·Uᵀ:

        W = U·diag(1/√(S + eps))·Uᵀ,   zca(x) = (x − μ)·W,   inverse(z) = z·W⁻¹ + μ,   W⁻¹ = U·diag(√(S + eps))·Uᵀ.

    eps = 0.1 (MTT ``utils.get_dataset``) damps the directions of small variance, so whitened training data has
    covariance U·diag(S/(S + eps))·Uᵀ rather than exactly the identity. Images (ToTensor only, in [0, 1]) are
    whitened once; distillation then runs in ZCA space, and ``inverse`` maps synthetic images back for viewing.

    The eigendecomposition runs in float64 on the images' device (the covariance is accumulated in chunks, so
    CIFAR's 50 000 × 3072 never exists in float64); μ, W and W⁻¹ are stored as float32 buffers ``mean`` (D,),
    ``matrix`` and ``inverse_matrix`` (D, D), so a fitted transform travels in a ``state_dict`` or, with
    :meth:`save`/:meth:`load`, in a safetensors file.

    Args:
        eps: added to the eigenvalues before the inverse square root.
        unbiased: divide the scatter by N − 1 (kornia's default) rather than N.
    """

    mean: Tensor
    matrix: Tensor
    inverse_matrix: Tensor

    def __init__(self, eps: float = 0.1, unbiased: bool = True) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"ZCAWhitening.eps must be positive, got {eps}")
        self.eps = float(eps)
        self.unbiased = unbiased
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("matrix", torch.empty(0))
        self.register_buffer("inverse_matrix", torch.empty(0))

    def extra_repr(self) -> str:
        return f"eps={self.eps}, unbiased={self.unbiased}, dim={self.mean.numel() if self.fitted else None}"

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    @torch.no_grad()
    def fit(self, images: Tensor, chunk_size: int = 4096) -> ZCAWhitening:
        """Fits μ, W and W⁻¹ on ``images`` (N, C, H, W) (any (N, ...) works); returns ``self``."""
        n = images.shape[0]
        if images.dim() < 2 or n < 2:
            raise ValueError(f"ZCAWhitening.fit needs at least 2 images of shape (N, ...), got {tuple(images.shape)}")
        flat = images.detach().reshape(n, -1)
        mean = torch.zeros(flat.shape[1], dtype=torch.float64, device=flat.device)
        for chunk in flat.split(chunk_size):
            mean += chunk.to(torch.float64).sum(0)
        mean /= n
        cov = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
        for chunk in flat.split(chunk_size):
            centred = chunk.to(torch.float64) - mean
            cov.addmm_(centred.T, centred)
        cov /= n - 1 if self.unbiased else n
        # Σ is symmetric PSD, so eigh gives the same U and S as kornia's SVD; clamp the round-off negatives.
        s, u = torch.linalg.eigh(cov)
        s = s.clamp_min(0.0) + self.eps
        self.mean = mean.float()
        self.matrix = ((u * s.rsqrt()) @ u.T).float()
        self.inverse_matrix = ((u * s.sqrt()) @ u.T).float()
        return self

    def _flat(self, x: Tensor, what: str) -> Tensor:
        if not self.fitted:
            raise RuntimeError(f"ZCAWhitening.{what} called before fit: call .fit(train_images) or ZCAWhitening.load()")
        d = self.mean.numel()
        if x.dim() < 2 or x[0].numel() != d:
            raise ValueError(
                f"ZCAWhitening.{what}: fitted on images of {d} values each, got a batch of shape {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], d)

    def forward(self, x: Tensor) -> Tensor:
        """(x − μ)·W per image; the output has the shape, dtype and device of ``x`` (wherever the module is: a
        Lightning run moves it to the GPU while test images are collected on the CPU)."""
        flat = self._flat(x, "forward")
        return ((flat - self.mean.to(flat)) @ self.matrix.to(flat)).reshape(x.shape)

    def inverse(self, x: Tensor) -> Tensor:
        """z·W⁻¹ + μ: maps whitened images back to the input space (for viewing and saving synthetic images)."""
        flat = self._flat(x, "inverse")
        return torch.addmm(self.mean.to(flat), flat, self.inverse_matrix.to(flat)).reshape(x.shape)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The buffers are empty until fit; take the stored shapes so an unfitted module can load a fitted one.
        for name in ("mean", "matrix", "inverse_matrix"):
            stored = state_dict.get(prefix + name)
            if isinstance(stored, Tensor):
                setattr(self, name, torch.empty(stored.shape, dtype=torch.float32, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the fitted transform to a safetensors file atomically (``zoo.io.atomic_path``)."""
        from safetensors.torch import save_file

        if not self.fitted:
            raise RuntimeError("ZCAWhitening.save called before fit")
        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"eps": repr(self.eps), "unbiased": str(self.unbiased)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ZCAWhitening:
        """Reads a transform written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            missing = {"mean", "matrix", "inverse_matrix"} - set(f.keys())
            if missing or "eps" not in meta:
                what = sorted(missing) + ([] if "eps" in meta else ["metadata 'eps'"])
                raise ValueError(f"ZCAWhitening.load: {path} is not a saved ZCAWhitening (missing {what})")
            tensors = {k: f.get_tensor(k) for k in ("mean", "matrix", "inverse_matrix")}
        zca = cls(eps=float(meta["eps"]), unbiased=meta.get("unbiased", "True") == "True")
        zca.load_state_dict(tensors)
        return zca.to(device)
