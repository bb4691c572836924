"""Classification methods: supervised training (teachers and baselines), Hinton KD and DKD."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from zoo.losses import DKDLoss, KDLoss
from zoo.methods.base import DistillationMethod, ModelLike, Outputs, TeacherLike

__all__ = ["Supervised", "KD", "DKD"]


class Supervised(DistillationMethod):
    """Cross-entropy training without a teacher: trains teachers and the no-KD baselines on the same code path.

    L = CE(z^s, y) (with optional label smoothing). A teacher may still be given, to report agreement.
    """

    requires_teacher = False

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike | None = None,
        *,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, **kwargs)
        self.label_smoothing = label_smoothing

    def forward_teacher(self, x: Tensor) -> Outputs | None:
        return None  # the teacher plays no part in the loss

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        return {"ce": F.cross_entropy(student.logits, target, label_smoothing=self.label_smoothing)}


class KD(DistillationMethod):
    """Hinton knowledge distillation (arXiv 1503.02531): L = w_ce·CE + w_kd·T²·KL(p^T(z^t) ‖ p^T(z^s)).

    Defaults are mdistiller's CIFAR-100 values (T = 4, w_ce = 0.1, w_kd = 0.9); its ImageNet R34→R18 config uses
    T = 1 and 0.5 / 0.5. See ``zoo.losses.KDLoss``.
    """

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        *,
        temperature: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, **kwargs)
        self.kd_loss = KDLoss(temperature)
        self.ce_weight, self.kd_weight = ce_weight, kd_weight

    def cached_soft_label_temperature(self) -> float | None:
        return self.kd_loss.temperature

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        return {
            "ce": self.ce_weight * F.cross_entropy(student.logits, target),
            "kd": self.kd_weight * self.kd_loss(student.logits, teacher.logits),
        }


class DKD(DistillationMethod):
    """Decoupled KD (arXiv 2203.08679): L = w_ce·CE + min(e / warm, 1)·(α·TCKD + β·NCKD).

    The warm-up counts epochs from 1 as mdistiller's trainer does (epoch index e = ``current_epoch + 1``), so the
    first epoch already has weight 1/warm. Defaults are mdistiller's CIFAR-100 values (α = 1, β = 8, T = 4,
    warm = 20); its ImageNet R34→R18 config uses α = 1, β = 0.5, T = 1, warm = 1. Logged terms: ``ce``, ``tckd``
    and ``nckd`` (each weighted, warm-up included). See ``zoo.losses.DKDLoss``.
    """

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        *,
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        ce_weight: float = 1.0,
        warmup_epochs: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, **kwargs)
        if warmup_epochs < 1:
            raise ValueError(f"DKD.warmup_epochs must be ≥ 1, got {warmup_epochs}")
        self.dkd_loss = DKDLoss(alpha, beta, temperature)
        self.ce_weight, self.warmup_epochs = ce_weight, warmup_epochs

    def cached_soft_label_temperature(self) -> float | None:
        return self.dkd_loss.temperature

    def warmup_factor(self) -> float:
        return min((self.current_epoch + 1) / self.warmup_epochs, 1.0)

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        tckd, nckd = self.dkd_loss.parts(student.logits, teacher.logits, target)
        w = self.warmup_factor()
        return {
            "ce": self.ce_weight * F.cross_entropy(student.logits, target),
            "tckd": w * self.dkd_loss.alpha * tckd,
            "nckd": w * self.dkd_loss.beta * nckd,
        }
