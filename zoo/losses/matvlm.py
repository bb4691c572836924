"""MaTVLM's distillation terms (Li et al., "MaTVLM: Hybrid Mamba-Transformer for Efficient Vision-Language
Modeling", ICCV 2025, arXiv 2503.13440): a logit KL over every position and a teacher-forced layer alignment.

    L = w_kl · L_KL + w_layer · L_layer + w_ce · CE        (1, 1, 0: the released yaml files)

Defaults follow the official training script (``hustvl/MaTVLM`` @cac174f, ``train_tinyllava_mamba2/train_hybrid.py``
with ``mamba2_tinyllava/tinyllava_0.{25,50}_mamba2_665k.yaml``: ``loss_type: kl``, ``temperature: 1.0``,
``tl_loss_type: l2``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from zoo.losses.functional import at_least_float32
from zoo.losses.llava_kd import token_divergence

__all__ = ["LayerAlignmentLoss", "SequenceKLLoss"]


class SequenceKLLoss(nn.Module):
    """KL(p_T ‖ p_S) between teacher and student next-token distributions, summed over every position.

        batchmean (code):  L = τ² · (1/B) · Σ_b Σ_i KL(softmax(z_T[b,i] / τ) ‖ softmax(z_S[b,i] / τ))
        mean:              L = τ² · mean_{(b,i) ∈ M} KL(...)

    With ``batchmean`` the sum runs over all B·L positions (prompt, image tokens and padding included) and is
    divided by the batch size only, as ``F.kl_div(..., reduction="batchmean")`` on (B, L, V) logits in the official
    script; τ = 1 there. ``mean`` averages over the positions of ``mask`` (every position without one), so the value
    no longer grows with the sequence length.

    Notes:
        .. warning:: ``batchmean`` (the paper's L_KL and the code's) grows with the sequence length: a 1.4k-token
           TinyLLaVA sample weighs ~60× a 24-token digits sample. ``reduction="mean"`` is the per-token variant.

        The code also has ``loss_type`` values ``jsd``, ``reverse``, ``ce`` and ``l2``; no released config uses them,
        so they are not offered. The code has no mask; given one, ``batchmean`` sums only its positions.

    Args:
        temperature: τ (1.0, the yaml's ``temperature``).
        reduction: ``batchmean`` (official) or ``mean``.

    Example:
        >>> z_t = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
        >>> z_s = torch.zeros(1, 2, 2)
        >>> p = torch.softmax(z_t[0, 0], -1)
        >>> expected = float((p * (p.log() - torch.tensor(0.5).log())).sum())   # only position 0 differs
        >>> abs(float(SequenceKLLoss()(z_s, z_t)) - expected) < 1e-6
        True
        >>> float(SequenceKLLoss()(z_t, z_t))
        0.0
    """

    def __init__(self, temperature: float = 1.0, reduction: Literal["batchmean", "mean"] = "batchmean") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"SequenceKLLoss.temperature must be positive, got {temperature}")
        if reduction not in ("batchmean", "mean"):
            raise ValueError(f"SequenceKLLoss.reduction must be 'batchmean' or 'mean', got {reduction!r}")
        self.temperature, self.reduction = temperature, reduction

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
        """``student_logits``, ``teacher_logits``: (B, L, V); ``mask``: (B, L) positions to include (default all)."""
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"SequenceKLLoss: student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} differ (same vocabulary and sequence needed)")
        tau = self.temperature
        kl = token_divergence(at_least_float32(student_logits) / tau, at_least_float32(teacher_logits) / tau)
        if mask is not None:
            kl = kl * mask.to(kl.dtype)
        scale = tau * tau
        if self.reduction == "batchmean":
            return scale * kl.sum() / kl.shape[0]
        count = mask.sum() if mask is not None else torch.tensor(kl.numel())
        return scale * kl.sum() / count.clamp_min(1).to(kl.dtype)


class LayerAlignmentLoss(nn.Module):
    """Teacher-forced layer alignment: each replaced layer, fed the teacher's input to that layer, should give the
    teacher's output.

        sum (code):  L = Σ_{ℓ ∈ S} ‖f_S^ℓ(h_T^ℓ) − h_T^{ℓ+1}‖_F
        mean:        L = (1/|S|) Σ_{ℓ ∈ S} ‖(f_S^ℓ(h_T^ℓ) − h_T^{ℓ+1})[M]‖_F / √(|M|·D)

    S are the Mamba layers, h_T^ℓ the teacher's input to layer ℓ and h_T^{ℓ+1} its output (after the final norm for
    the last layer, on both sides), f_S^ℓ the student's layer ℓ. ``sum`` is the official ``tl_loss_type: l2``:
    ``torch.norm(·, p=2)`` of the whole (B, L, D) difference, neither squared nor averaged, padding included, summed
    over the layers. ``mean`` is a normalised variant: the root-mean-square error per element over the positions of
    ``mask``, averaged over the layers, so it does not grow with batch, length, width or the number of layers.

    Notes:
        The official ``HybridPhiModel.forward(teacher_outputs=...)`` runs *every* layer a second time on the
        teacher's states and keeps only the Mamba layers' results; here only the Mamba layers are run (an attention
        layer's result is the teacher's own, since it is frozen and unchanged).

    Args:
        reduction: ``sum`` (official) or ``mean``.

    Example:
        >>> y = torch.zeros(1, 2, 2)
        >>> y_hat = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])
        >>> float(LayerAlignmentLoss()([y_hat, y], [y, y]))   # ‖(3, 4)‖ + 0
        5.0
        >>> float(LayerAlignmentLoss("mean")([y_hat], [y]))   # √((9 + 16) / 4) / 1
        2.5
    """

    def __init__(self, reduction: Literal["sum", "mean"] = "sum") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"LayerAlignmentLoss.reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def per_layer(self, student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        """(|S|,) the per-layer values (‖·‖_F for ``sum``, the masked RMS for ``mean``)."""
        if len(student) != len(teacher) or not student:
            raise ValueError(f"LayerAlignmentLoss: {len(student)} student and {len(teacher)} teacher states; give one "
                             "pair per replaced layer (at least one)")
        values = []
        for s, t in zip(student, teacher):
            if s.shape != t.shape:
                raise ValueError(f"LayerAlignmentLoss: student state {tuple(s.shape)} ≠ teacher {tuple(t.shape)}")
            diff = at_least_float32(s) - at_least_float32(t).detach()
            if self.reduction == "sum":
                values.append(torch.linalg.vector_norm(diff))
                continue
            if mask is not None:
                diff = diff * mask.to(diff.dtype)[..., None]
            count = (mask.sum() if mask is not None else torch.tensor(diff.shape[0] * diff.shape[1])) * diff.shape[-1]
            values.append(torch.linalg.vector_norm(diff) / count.clamp_min(1).to(diff.dtype).sqrt())
        return torch.stack(values)

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        """``student[k]`` = f_S^ℓ(h_T^ℓ) and ``teacher[k]`` = h_T^{ℓ+1} for the k-th replaced layer, each (B, L, D);
        ``mask``: (B, L) positions of the ``mean`` reduction (default all)."""
        values = self.per_layer(student, teacher, mask)
        return values.sum() if self.reduction == "sum" else values.mean()
