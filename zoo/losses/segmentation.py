"""Segmentation distillation: pixel KD, channel-wise distillation (CWD), LAD's label noiser, MGD's semantic and
content losses, the CutMix box masks MGD shares with CPS, and the OHEM cross-entropy MGD supervises Cityscapes with.

Every loss takes (student, teacher) and treats the teacher as a fixed target: it is detached, as in the official
codes (TorchDistiller/LAD ``CriterionCWD`` detach it; CIRKD and MGD run their teachers under ``no_grad``). Losses
carry no weight; the methods multiply by theirs. Half-precision inputs are promoted to float32 (float64 is kept), so
softmaxes over tens of thousands of positions stay accurate under AMP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BoxMaskGenerator",
    "CWDLoss",
    "LabelNoiser",
    "MGDContentLoss",
    "MGDSemanticLoss",
    "OhemCrossEntropy",
    "PixelKDLoss",
    "cutmix",
]


def _at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _resize_like(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear (align_corners=False) resize of a (N, C, h, w) map to ``size`` when it differs."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _check_pair(name: str, student: Tensor, teacher: Tensor, same_channels: bool = True) -> None:
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"{name}: expected (N, C, H, W) student and teacher maps, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0] or (same_channels and student.shape[1] != teacher.shape[1]):
        raise ValueError(
            f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must agree in batch"
            + (" and channels" if same_channels else "")
        )


class PixelKDLoss(nn.Module):
    """Pixel-wise knowledge distillation for segmentation logits (the SKD pixel term, arXiv 1903.04197).

    With p^τ(z) = softmax(z / τ) over classes at each pixel i of the teacher's grid:

        L = τ² / |Ω| · Σ_{n, i ∈ Ω} KL( p^τ(z_T[n, :, i]) ‖ p^τ(z_S[n, :, i]) ),

    where Ω is every pixel (as CIRKD ``losses/kd.py::CriterionKD``, ``kl_div(..., 'batchmean')`` over the N·H·W pixel
    rows). Student logits are bilinearly resized (align_corners=False) to the teacher's H×W if they differ.

    ``target`` is our option, not CIRKD's (CIRKD does not mask): when given, it is nearest-resized to the teacher's
    size and Ω becomes the pixels whose label is not ``ignore_index`` (padding, void). If every pixel is ignored the
    loss is 0. Default τ = 1 as in CIRKD; its weight (1 in CIRKD's scripts) belongs to the method.

    Example:
        >>> loss = PixelKDLoss(temperature=1.0)
        >>> z = torch.randn(2, 5, 8, 8)
        >>> float(loss(z, z))
        0.0
    """

    def __init__(self, temperature: float = 1.0, ignore_index: int = 255) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"PixelKDLoss.temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.ignore_index = ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        _check_pair("PixelKDLoss", student_logits, teacher_logits)
        t = self.temperature
        zt = _at_least_float32(teacher_logits.detach())
        zs = _resize_like(_at_least_float32(student_logits), zt.shape[-2:])
        log_ps = F.log_softmax(zs / t, dim=1)
        log_pt = F.log_softmax(zt / t, dim=1)
        kl = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(1)  # (N, H, W)
        if target is None:
            return kl.mean() * t * t
        if target.dim() != 3 or target.shape[0] != zt.shape[0]:
            raise ValueError(f"PixelKDLoss: target must be (N, H, W) with N = {zt.shape[0]}, got {tuple(target.shape)}")
        if tuple(target.shape[-2:]) != tuple(zt.shape[-2:]):
            target = F.interpolate(target[:, None].float(), size=zt.shape[-2:], mode="nearest")[:, 0].long()
        keep = (target != self.ignore_index).to(kl.dtype)
        return (kl * keep).sum() / keep.sum().clamp_min(1.0) * t * t


class CWDLoss(nn.Module):
    """Channel-wise distillation, CWD (Shu et al., ICCV 2021, arXiv 2011.13256).

    Each channel (class) map is turned into a distribution over the H·W spatial positions i:

        L = τ² / (N·C) · Σ_{n,c} KL( softmax_i(T[n,c,:] / τ) ‖ softmax_i(S[n,c,:] / τ) ).

    Equal to mmrazor ``ChannelWiseDivergence`` and to TorchDistiller ``CriterionCWD(norm_type='channel',
    divergence='kl')``, which LAD copies; those take the log of the softmax, here ``log_softmax`` (same value, no
    underflow). The loss is unchanged by adding a constant to any (n, c) map. If spatial sizes differ the student is
    bilinearly resized to the teacher's. The official codes use pre-upsample (stride-8) logits.

    Defaults: τ = 4 as the original SemSeg-distill code (``exp_cwd.sh channel kl 3 4``: weight 3, τ = 4), which
    LAD also uses (weight 3 for the student, 5 for its teacher consistency). mmrazor's Cityscapes config uses τ = 1,
    loss_weight = 5 instead. The weight belongs to the method. The teacher is detached, so LAD's symmetric teacher
    consistency is ``cwd(o1, o2) + cwd(o2, o1)``, with each side a fixed target in turn, as in its code.

    Example:
        >>> loss = CWDLoss(temperature=4.0)
        >>> z = torch.randn(2, 19, 16, 16)
        >>> abs(float(loss(z, z + torch.randn(2, 19, 1, 1)))) < 1e-4  # per-channel shifts do not count
        True
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"CWDLoss.temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check_pair("CWDLoss", student, teacher)
        t = self.temperature
        zt = _at_least_float32(teacher.detach())
        zs = _resize_like(_at_least_float32(student), zt.shape[-2:])
        n, c = zt.shape[:2]
        log_ps = F.log_softmax(zs.flatten(2) / t, dim=2)
        log_pt = F.log_softmax(zt.flatten(2) / t, dim=2)
        kl = F.kl_div(log_ps, log_pt, reduction="sum", log_target=True)
        return kl / (n * c) * t * t


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


class MGDSemanticLoss(nn.Module):
    """MGD's image-level semantic-sensitive loss (Qin et al., ECCV 2022, arXiv 2208.10169).

    With z = global average pool of the logits over H×W, shape (N, C):

        L = Σ_{n,c} |z_S[n,c] − z_T[n,c]|      (``reduction="sum"``, as the code; grows with the batch)

    or the mean over the N·C entries (``reduction="mean"``). The code (``exp.voc/*/train.py``) pools the logits
    after they are upsampled to the input size (bilinear, align_corners=True, inside the network); pass them so. If
    sizes still differ the student is resized to the teacher here (bilinear, align_corners=False). MGD applies it
    against the deep teacher with λ₁ = 0.002 (VOC R18), 0.0005 (VOC MBv2), 0.001 (Cityscapes R18).

    Example:
        >>> loss = MGDSemanticLoss()
        >>> z = torch.randn(2, 21, 16, 16)
        >>> float(loss(z, z))
        0.0
    """

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"MGDSemanticLoss.reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        _check_pair("MGDSemanticLoss", student_logits, teacher_logits)
        zt = _at_least_float32(teacher_logits.detach())
        zs = _resize_like(_at_least_float32(student_logits), zt.shape[-2:])
        diff = (zs.mean(dim=(2, 3)) - zt.mean(dim=(2, 3))).abs()
        return diff.sum() if self.reduction == "sum" else diff.mean()


class OhemCrossEntropy(nn.Module):
    """Cross-entropy over the hard pixels only: online hard example mining by probability (the ``ProbOhemCrossEntropy2d``
    of the CPS code base that MGD's Cityscapes scripts use for their supervised term, thresh 0.7, min_kept 50 000 ×
    the per-GPU batch).

    With p_i the softmax probability of pixel i's label and V the labelled (not ignored) pixels:

        t = max(thresh, p_(k))          p_(k): the k-th smallest p over the batch (ignored pixels count as p = 1)
        L = mean_{i ∈ V, p_i ≤ t} −log p_i

    so every pixel the network is less than ``thresh`` sure of is kept, and at least k = ``min_kept`` pixels are.
    As in the official code, no pixel is dropped when ``min_kept`` is 0 or exceeds |V|; the selection is made
    without gradient. Logits are resized to the labels (bilinear) first. A batch without labelled pixels gives 0.
    Nothing is read back to the host (the |V| ≥ k test stays a tensor), so the step keeps the device busy.
    """

    def __init__(self, thresh: float = 0.7, min_kept: int = 100_000, ignore_index: int = 255) -> None:
        super().__init__()
        if not 0.0 < thresh <= 1.0:
            raise ValueError(f"OhemCrossEntropy.thresh must be in (0, 1], got {thresh}")
        if min_kept < 0:
            raise ValueError(f"OhemCrossEntropy.min_kept must be ≥ 0, got {min_kept}")
        self.thresh, self.min_kept, self.ignore_index = float(thresh), int(min_kept), ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = _resize_like(_at_least_float32(logits), target.shape[-2:])
        valid = target != self.ignore_index
        log_p = logits.log_softmax(1).gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
        keep = valid
        if self.min_kept > 0:
            with torch.no_grad():
                prob = log_p.exp().masked_fill(~valid, 1.0)
                kth = prob.flatten().kthvalue(min(self.min_kept, prob.numel())).values
                mined = valid & (prob <= torch.clamp(kth, min=self.thresh))
                keep = torch.where(valid.sum() >= self.min_kept, mined, valid)
        return -(log_p * keep).sum() / keep.sum().clamp_min(1)


class MGDContentLoss(nn.Module):
    """MGD's region-level content-aware loss (Qin et al., ECCV 2022, arXiv 2208.10169).

    Each feature map is average-pooled to P×P regions (P = ``pool_size`` = 7) and flattened to Q ∈ ℝ^{N×C×P²}. Its
    cosine self-similarity between regions is A[n, i, j] = ⟨q_i, q_j⟩ / (‖q_i‖ ‖q_j‖), with q_i the C-vector of
    region i (``criterion.py::CriterionCosineSimilarity``). Then

        L = mean_{n,i,j} (A_S[n,i,j] − A_T[n,i,j])²      (``F.mse_loss``, as the code).

    The channel counts of student and teacher need not match, nor their spatial sizes. The official code divides by
    the norms with no epsilon (an all-zero region gives NaN); here norms are clamped at 1e-12, so such a region has
    similarity 0. MGD uses the DeepLabv3+ decoder feature (256 channels, stride 4) of the wide teacher with
    λ₂ = 100 (VOC R18, Cityscapes R18) or 50 (VOC MBv2).

    Example:
        >>> loss = MGDContentLoss()
        >>> f = torch.randn(2, 64, 32, 32)
        >>> float(loss(f, torch.cat([f, f], dim=1))) < 1e-10  # repeated channels: same cosines
        True
    """

    def __init__(self, pool_size: int = 7) -> None:
        super().__init__()
        if pool_size < 1:
            raise ValueError(f"MGDContentLoss.pool_size must be positive, got {pool_size}")
        self.pool_size = pool_size

    def similarity(self, features: Tensor) -> Tensor:
        """Region-to-region cosine similarity, (N, P², P²)."""
        q = F.adaptive_avg_pool2d(_at_least_float32(features), self.pool_size).flatten(2)
        q = F.normalize(q, dim=1, eps=1e-12)
        return q.transpose(1, 2) @ q

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        _check_pair("MGDContentLoss", student_features, teacher_features, same_channels=False)
        return F.mse_loss(self.similarity(student_features), self.similarity(teacher_features.detach()))


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
