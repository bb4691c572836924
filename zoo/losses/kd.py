"""Logit distillation: Hinton's KD and Decoupled KD (DKD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.losses.functional import at_least_float32

__all__ = ["DKDLoss", "KDLoss"]


class KDLoss(nn.Module):
    """Hinton's knowledge distillation: KL between the temperature-softened teacher and student softmaxes.

        L = T² · (1/B) · Σ_i KL(softmax(z^t_i / T) ‖ softmax(z^s_i / T))

    The T² factor keeps the gradient scale roughly independent of T. Paper: Hinton, Vinyals, Dean, "Distilling the
    Knowledge in a Neural Network", arXiv 1503.02531.

    Args:
        temperature: T. Default 4, the CIFAR-100 value of the official mdistiller code
            (``mdistiller/distillers/KD.py``; its ImageNet R34→R18 config uses 1). The CE and KD weights belong to
            the method (:class:`zoo.methods.KD`).

    Example:
        >>> loss = KDLoss(temperature=4.0)
        >>> zs = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> zt = torch.tensor([[1.0, 1.0, -2.0], [0.5, 0.0, 2.0]])
        >>> round(float(loss(zs, zt)), 4), float(loss(zt, zt))
        (0.517, 0.0)
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"KDLoss.temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        t = self.temperature
        log_p_s = F.log_softmax(at_least_float32(student_logits) / t, dim=1)
        log_p_t = F.log_softmax(at_least_float32(teacher_logits) / t, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1).mean()
        return kl * t * t


class DKDLoss(nn.Module):
    """Decoupled knowledge distillation (DKD): KD split into a target-class and a non-target-class term.

    With p = softmax(z / T), b = [p_y, 1 − p_y] (target vs. the other classes) and p̂ the softmax over the
    classes c ≠ y:

        TCKD = T² · KL(b^t ‖ b^s),   NCKD = T² · KL(p̂^t ‖ p̂^s),   L = α · TCKD + β · NCKD   (batch mean)

    Paper: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, arXiv 2203.08679. Defaults α = 1, β = 8,
    T = 4: the CIFAR-100 values of the official code (mdistiller, ``mdistiller/distillers/DKD.py``). The warm-up
    factor min(epoch / warm, 1) belongs to the method (:class:`zoo.methods.DKD`).

    Notes:
        Per sample and without T², KL(p^t ‖ p^s) = TCKD + (1 − p^t_y) · NCKD, so α = β = 1 is not KD. As in the
        official code, p̂ is softmax(z/T − 1000 · onehot(y)): the target's share underflows to exactly 0.

    Example:
        >>> loss = DKDLoss(alpha=1.0, beta=8.0, temperature=4.0)
        >>> zs = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> zt = torch.tensor([[1.0, 1.0, -2.0], [0.5, 0.0, 2.0]])
        >>> y = torch.tensor([0, 2])
        >>> round(float(loss(zs, zt, y)), 4)
        2.5051
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DKDLoss.temperature must be positive, got {temperature}")
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature

    def parts(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(TCKD, NCKD), each with the T² factor and averaged over the batch, unweighted."""
        t = self.temperature
        zs, zt = at_least_float32(student_logits) / t, at_least_float32(teacher_logits) / t
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
