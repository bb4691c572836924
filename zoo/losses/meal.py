"""MEAL V2 losses: soft cross-entropy to the ensemble's averaged softmax, and the logit discriminator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.losses.functional import at_least_float32

__all__ = ["LogitDiscriminator", "MEALV2DiscriminatorLoss", "SoftCrossEntropy"]


class SoftCrossEntropy(nn.Module):
    """Soft cross-entropy to a target distribution: MEAL V2's similarity loss.

        L = −(1/B) · Σ_i Σ_c p̄_ic · log softmax(z^s_i)_c  =  KL(p̄ ‖ p^s) + H(p̄)

    In MEAL V2, p̄ = (1/K) · Σ_k softmax(z^{t_k}) is the teacher ensemble's average of probabilities at T = 1, and
    no hard label enters (official code, szq0214/MEAL-V2, ``extensions/kd_loss.py`` and
    ``extensions/teacher_wrapper.py``). Paper: Shen and Savvides, "MEAL V2", arXiv 2009.08453. The target is passed
    as log-probabilities, as :class:`zoo.teacher.Teacher` returns log p̄ for a ``prob`` ensemble.

    Example:
        >>> loss = SoftCrossEntropy()
        >>> zs = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> zt = torch.tensor([[1.0, 1.0, -2.0], [0.5, 0.0, 2.0]])
        >>> round(float(loss(zs, zt.log_softmax(dim=1))), 4)
        1.2489
    """

    def forward(self, student_logits: Tensor, target_log_probs: Tensor) -> Tensor:
        target = at_least_float32(target_log_probs).exp()
        return -(target * F.log_softmax(at_least_float32(student_logits), dim=1)).sum(1).mean()


class LogitDiscriminator(nn.Sequential):
    """MEAL V2's discriminator on C-dimensional logits: C → h1 → h2 → 2, with a ReLU after every layer.

    h1 = max(C // 8, min_hidden), h2 = max(h1 // 8, min_hidden). The official code (``models/discriminator.py``)
    builds it from three 1×1 convolutions, which act as these linear layers, and ends with a ReLU, kept here.

    Notes:
        ``min_hidden`` is not in the official code, whose widths reach 0 for C < 64 (C = 10: 1 and 0). The default
        floor 1 changes only a 0, so ImageNet (1000 → 125 → 15 → 2) and CIFAR-100 (100 → 12 → 1 → 2) keep the
        official widths.

    Example:
        >>> [m.out_features for m in LogitDiscriminator(1000) if isinstance(m, nn.Linear)]
        [125, 15, 2]
    """

    def __init__(self, num_classes: int, min_hidden: int = 1) -> None:
        h1 = max(num_classes // 8, min_hidden)
        h2 = max(h1 // 8, min_hidden)
        super().__init__(
            nn.Linear(num_classes, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 2), nn.ReLU()
        )


class MEALV2DiscriminatorLoss(nn.Module):
    """MEAL V2's discriminator loss: BCE-with-logits of the discriminator on student and teacher logits.

        L = mean over the 2B × 2 entries of BCEWithLogits(D([z^s; z̄^t]), [[1, 0]] * B + [[0, 1]] * B)

    Student rows have target [1, 0], teacher rows [0, 1]; z̄^t is the mean of the teachers' raw logits (official
    code, ``loss.py``, ``discriminatorLoss``). Paper: Shen and Savvides, "MEAL V2", arXiv 2009.08453. The student
    minimises this loss jointly with the discriminator (one optimizer, no gradient reversal): the discriminator is a
    regulariser, not an adversary. The teacher logits are detached.

    Example:
        >>> loss = MEALV2DiscriminatorLoss()
        >>> round(float(loss(nn.Identity(), torch.zeros(4, 2), torch.zeros(4, 2))), 4)  # cannot tell: ln 2
        0.6931
    """

    def forward(self, discriminator: nn.Module, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        inputs = torch.cat([student_logits, teacher_logits.detach().to(student_logits.dtype)], dim=0)
        b = student_logits.shape[0]
        scores = at_least_float32(discriminator(inputs))
        targets = torch.zeros(2 * b, 2, device=scores.device, dtype=scores.dtype)
        targets[:b, 0] = 1.0
        targets[b:, 1] = 1.0
        return F.binary_cross_entropy_with_logits(scores, targets)
