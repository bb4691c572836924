"""MEAL V2 losses: soft cross-entropy to the ensemble's averaged softmax, and the logit discriminator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LogitDiscriminator", "MEALV2DiscriminatorLoss", "SoftCrossEntropy"]


class SoftCrossEntropy(nn.Module):
    """Soft cross-entropy to a target distribution (MEAL V2's similarity loss, arXiv 2009.08453):

        L_sim = −(1/B)·Σ_i Σ_c p̄_ic·log softmax(z^s_i)_c  =  KL(p̄ ‖ p^s) + H(p̄),

    where p̄ = (1/K)·Σ_k softmax(z^{t_k}) is the ensemble's average of *probabilities* at T = 1 (official
    ``extensions/kd_loss.py``). The target is passed as log-probabilities (``zoo.teacher.Teacher`` returns log p̄
    for a ``prob`` ensemble). No hard label enters.
    """

    def forward(self, student_logits: Tensor, target_log_probs: Tensor) -> Tensor:
        target = target_log_probs.float().exp()
        return -(target * F.log_softmax(student_logits.float(), dim=1)).sum(1).mean()


class LogitDiscriminator(nn.Sequential):
    """MEAL V2's discriminator on C-dimensional logits (``models/discriminator.py``: three 1×1 convolutions).

    C → h1 → h2 → 2 with h1 = max(C // 8, min_hidden) and h2 = max(h1 // 8, min_hidden), and a ReLU after *every*
    layer, the last one included, as in the official code. ``min_hidden`` is our addition: the official widths
    reach 0 for C < 64 (C = 10: 1 and 0). The default floor 1 changes only a 0, so ImageNet (1000 → 125 → 15 → 2)
    and CIFAR-100 (100 → 12 → 1 → 2) keep the official widths. The digits config's floor 5 gives 10 → 5 → 5 → 2 (the
    spec's prototype used 10 → 5 → 2 → 2, which no single floor gives).
    """

    def __init__(self, num_classes: int, min_hidden: int = 1) -> None:
        h1 = max(num_classes // 8, min_hidden)
        h2 = max(h1 // 8, min_hidden)
        super().__init__(
            nn.Linear(num_classes, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 2), nn.ReLU()
        )


class MEALV2DiscriminatorLoss(nn.Module):
    """BCE-with-logits of the discriminator on [z^s; z̄^t] (official ``loss.py``, ``discriminatorLoss``).

    Student rows have target [1, 0], teacher rows [0, 1]; the mean runs over the 2B × 2 entries. z̄^t is the mean
    of the teachers' raw logits. In MEAL V2 the student minimises this loss jointly with the discriminator (one
    optimizer, no gradient reversal): the discriminator acts as a regulariser, not as an adversary.
    """

    def forward(self, discriminator: nn.Module, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        inputs = torch.cat([student_logits, teacher_logits.detach().to(student_logits.dtype)], dim=0)
        b = student_logits.shape[0]
        targets = torch.zeros(2 * b, 2, device=inputs.device)
        targets[:b, 0] = 1.0
        targets[b:, 1] = 1.0
        return F.binary_cross_entropy_with_logits(discriminator(inputs).float(), targets)
