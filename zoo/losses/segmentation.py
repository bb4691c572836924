"""Segmentation distillation losses: pixel KD, channel-wise distillation (CWD), MGD's semantic and content losses,
and the OHEM cross-entropy MGD supervises Cityscapes with.

Every loss takes (student, teacher) and treats the teacher as a fixed target: it is detached, as in the official
codes (TorchDistiller/LAD ``CriterionCWD`` detach it; CIRKD and MGD run their teachers under ``no_grad``). Losses
carry no weight; the methods multiply by theirs. Half-precision inputs are promoted to float32 (float64 is kept), so
softmaxes over tens of thousands of positions stay accurate under AMP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.losses.functional import at_least_float32

__all__ = [
    "CWDLoss",
    "MGDContentLoss",
    "MGDSemanticLoss",
    "OhemCrossEntropy",
    "PixelKDLoss",
]


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
    """Pixel-wise knowledge distillation for segmentation logits: KL between the per-pixel class softmaxes.

        L = τ² / |Ω| · Σ_{n, i ∈ Ω} KL(softmax(z_T[n, :, i] / τ) ‖ softmax(z_S[n, :, i] / τ))

    over the pixels Ω of the teacher's grid; student logits are bilinearly resized (align_corners=False) to it.
    Paper: the pixel term of structured KD (Liu et al., arXiv 1903.04197). Default τ = 1 and Ω = every pixel, as in
    the official CIRKD code (``losses/kd.py``, ``CriterionKD``: a 'batchmean' KL over the N·H·W pixel rows); the
    weight belongs to the method.

    Args:
        temperature: τ.
        ignore_index: the label of pixels left out when ``forward`` gets a ``target``.

    Notes:
        The optional ``target`` of ``forward`` is not in CIRKD, which does not mask: when given, it is
        nearest-resized to the teacher's grid and Ω becomes the pixels whose label is not ``ignore_index``
        (padding, void); if every pixel is ignored the loss is 0.

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
        zt = at_least_float32(teacher_logits.detach())
        zs = _resize_like(at_least_float32(student_logits), zt.shape[-2:])
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
    """Channel-wise distillation (CWD): KL between the spatial softmaxes of each teacher and student channel map.

        L = τ² / (N·C) · Σ_{n,c} KL(softmax_i(T[n,c,:] / τ) ‖ softmax_i(S[n,c,:] / τ))

    over the H·W positions i; the student is bilinearly resized to the teacher's size if they differ. Adding a
    constant to any (n, c) map leaves L unchanged. Paper [0]; equal to [1] and [2], which LAD copies (they take the
    log of a softmax; ``log_softmax`` here gives the same value without underflow). The official codes apply it to
    pre-upsample (stride-8) logits.

    Args:
        temperature: τ. Default 4, as [2] (``exp_cwd.sh``: weight 3, τ = 4) and LAD; the Cityscapes config of [1]
            uses τ = 1 with weight 5. The weight belongs to the method.

    Notes:
        The teacher is detached, so LAD's symmetric teacher consistency is ``cwd(o1, o2) + cwd(o2, o1)``, each side
        a fixed target in turn, as in its code.

    - [0] Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021, arXiv 2011.13256
    - [1] mmrazor, ``mmrazor/models/losses/cwd.py``, ``ChannelWiseDivergence``
    - [2] TorchDistiller SemSeg-distill (the original code), ``CriterionCWD(norm_type='channel', divergence='kl')``

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
        zt = at_least_float32(teacher.detach())
        zs = _resize_like(at_least_float32(student), zt.shape[-2:])
        n, c = zt.shape[:2]
        log_ps = F.log_softmax(zs.flatten(2) / t, dim=2)
        log_pt = F.log_softmax(zt.flatten(2) / t, dim=2)
        kl = F.kl_div(log_ps, log_pt, reduction="sum", log_target=True)
        return kl / (n * c) * t * t


class MGDSemanticLoss(nn.Module):
    """MGD's image-level semantic-sensitive loss: L1 between the spatially averaged student and teacher logits.

        z = mean of the logits over H×W, (N, C),   L = Σ_{n,c} |z_S[n,c] − z_T[n,c]|

    (``reduction="sum"``, the official code's, which grows with the batch; ``"mean"`` averages over the N·C
    entries). Paper: Qin et al., "Multi-Granularity Distillation Scheme Towards Lightweight Semi-Supervised Semantic
    Segmentation", ECCV 2022, arXiv 2208.10169. The official code (JayQine/MGD-SSSS, ``exp.voc/*/train.py``) pools
    the logits after they are upsampled to the input size (bilinear, align_corners=True, inside the network): pass
    them so. If sizes still differ, the student is resized to the teacher here (bilinear, align_corners=False). MGD
    weights it by λ₁ = 0.002 (VOC R18), 0.0005 (VOC MBv2) or 0.001 (Cityscapes R18) against the deep teacher.

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
        zt = at_least_float32(teacher_logits.detach())
        zs = _resize_like(at_least_float32(student_logits), zt.shape[-2:])
        diff = (zs.mean(dim=(2, 3)) - zt.mean(dim=(2, 3))).abs()
        return diff.sum() if self.reduction == "sum" else diff.mean()


class OhemCrossEntropy(nn.Module):
    """Cross-entropy over the hard pixels only: online hard example mining by probability.

        t = max(thresh, p_(k)),   L = mean_{i ∈ V, p_i ≤ t} −log p_i

    with p_i the softmax probability of pixel i's label, V the labelled (not ignored) pixels and p_(k) the k-th
    smallest p over the batch (ignored pixels count as p = 1), k = ``min_kept``: every pixel predicted with less
    than ``thresh`` confidence is kept, and at least k pixels are. This is ``ProbOhemCrossEntropy2d`` of the CPS
    code base, MGD's supervised term on Cityscapes (thresh 0.7, min_kept 50 000 × the per-GPU batch; the default
    100 000 is a per-GPU batch of 2). OHEM: Shrivastava et al., arXiv 1604.03540.

    Notes:
        As in the official code, no pixel is dropped when ``min_kept`` is 0 or exceeds |V|, and the selection is
        made without gradient. Logits are resized (bilinear) to the labels first; a batch without labelled pixels
        gives 0. The |V| ≥ k test stays a tensor, so nothing is read back to the host.

    Example:
        >>> loss = OhemCrossEntropy(thresh=0.7, min_kept=1)
        >>> logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2): an easy pixel and one at p = ½
        >>> round(float(loss(logits, torch.tensor([[[0, 1]]]))), 4)  # only the hard pixel counts: ln 2
        0.6931
    """

    def __init__(self, thresh: float = 0.7, min_kept: int = 100_000, ignore_index: int = 255) -> None:
        super().__init__()
        if not 0.0 < thresh <= 1.0:
            raise ValueError(f"OhemCrossEntropy.thresh must be in (0, 1], got {thresh}")
        if min_kept < 0:
            raise ValueError(f"OhemCrossEntropy.min_kept must be ≥ 0, got {min_kept}")
        self.thresh, self.min_kept, self.ignore_index = float(thresh), int(min_kept), ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = _resize_like(at_least_float32(logits), target.shape[-2:])
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
    """MGD's region-level content-aware loss: MSE between the region-to-region cosine similarities of two maps.

    Each feature map is average-pooled to P×P regions and flattened to (N, C, P²); with q_i the C-vector of region i:

        A[n,i,j] = ⟨q_i, q_j⟩ / (‖q_i‖ ‖q_j‖),   L = mean_{n,i,j} (A_S[n,i,j] − A_T[n,i,j])²

    Student and teacher may differ in channels and spatial size. Paper: arXiv 2208.10169; official code
    (``criterion.py``, ``CriterionCosineSimilarity``, with ``F.mse_loss``): P = ``pool_size`` = 7. MGD applies it
    to the DeepLabv3+ decoder feature (256 channels, stride 4) against the wide teacher with λ₂ = 100 (VOC R18,
    Cityscapes R18) or 50 (VOC MBv2).

    Notes:
        The official code divides by the norms with no epsilon, so an all-zero region gives NaN; here the norms are
        clamped at 1e-12 and such a region has similarity 0.

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
        q = F.adaptive_avg_pool2d(at_least_float32(features), self.pool_size).flatten(2)
        q = F.normalize(q, dim=1, eps=1e-12)
        return q.transpose(1, 2) @ q

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        _check_pair("MGDContentLoss", student_features, teacher_features, same_channels=False)
        return F.mse_loss(self.similarity(student_features), self.similarity(teacher_features.detach()))
