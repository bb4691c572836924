"""Logit distillation: Hinton's KD and Decoupled KD (DKD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KDLoss", "DKDLoss"]


class KDLoss(nn.Module):
    """Hinton knowledge distillation (arXiv 1503.02531).

    L_kd = T² · (1/B) · Σ_i KL(p^T(z^t_i) ‖ p^T(z^s_i)),  with p^T(z) = softmax(z / T).

    The T² factor keeps gradient magnitudes roughly independent of T. Defaults follow mdistiller
    (``mdistiller/distillers/KD.py``): T = 4 on CIFAR-100 (T = 1 in its ImageNet R34→R18 config). The CE and KD
    weights (0.1 / 0.9 on CIFAR, 0.5 / 0.5 on ImageNet) belong to the method, not to this loss.

    Example:
        >>> loss = KDLoss(temperature=4.0)
        >>> z = torch.randn(8, 10)
        >>> float(loss(z, z))
        0.0
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"KDLoss.temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        t = self.temperature
        log_p_s = F.log_softmax(student_logits / t, dim=1)
        log_p_t = F.log_softmax(teacher_logits / t, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1).mean()
        return kl * t * t


class DKDLoss(nn.Module):
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022, arXiv 2203.08679).

    With b = [p_gt, 1 − p_gt] (target vs all non-target classes) and p̂ the softmax over the non-target classes:

        TCKD = T² · KL(b^t ‖ b^s),   NCKD = T² · KL(p̂^t ‖ p̂^s),   L = α·TCKD + β·NCKD   (batch mean).

    Identity (per sample, without T²): KL(p^t ‖ p^s) = TCKD + (1 − p^t_gt)·NCKD, so DKD with α = β = 1 is not KD.
    As in the official code (mdistiller ``DKD.py``), p̂ is the softmax of z/T − 1000·onehot(y): in float32 the
    target's share underflows to exactly 0. Defaults α = 1, β = 8, T = 4 are mdistiller's CIFAR-100 values; the
    warm-up min(epoch / warm, 1) is applied by the method (``zoo.methods.DKD``).

    Example:
        >>> loss = DKDLoss(alpha=1.0, beta=8.0, temperature=4.0)
        >>> z, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
        >>> float(loss(z, z, y))
        0.0
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DKDLoss.temperature must be positive, got {temperature}")
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature

    def parts(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (TCKD, NCKD), each with the T² factor and averaged over the batch, unweighted."""
        t = self.temperature
        zs, zt = student_logits / t, teacher_logits / t
        gt = F.one_hot(target, zs.shape[1]).to(torch.bool)
        # Binary target/non-target split in log space: log p_gt and log(1 − p_gt) = lse(non-target) − lse(all).
        log_bs = _binary_log_probs(zs, gt)
        log_bt = _binary_log_probs(zt, gt)
        tckd = F.kl_div(log_bs, log_bt, reduction="none", log_target=True).sum(1).mean()
        mask = gt.to(zs.dtype) * 1000.0
        log_ps_hat = F.log_softmax(zs - mask, dim=1)
        p_t_hat = F.softmax(zt - mask, dim=1)
        nckd = F.kl_div(log_ps_hat, p_t_hat, reduction="none").sum(1).mean()
        return tckd * t * t, nckd * t * t

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        tckd, nckd = self.parts(student_logits, teacher_logits, target)
        return self.alpha * tckd + self.beta * nckd


def _binary_log_probs(z: Tensor, gt: Tensor) -> Tensor:
    lse_all = torch.logsumexp(z, dim=1)
    log_p_gt = z.masked_select(gt) - lse_all
    log_p_other = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=1) - lse_all
    return torch.stack([log_p_gt, log_p_other], dim=1)
