"""MEAL V2: label-free distillation from a teacher ensemble with a logit discriminator (arXiv 2009.08453)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from zoo.losses import LogitDiscriminator, MEALV2DiscriminatorLoss, SoftCrossEntropy
from zoo.methods.base import ModelLike, Outputs, TeacherLike
from zoo.methods.classification import ClassificationMethod

__all__ = ["MEALV2"]


class MEALV2(ClassificationMethod):
    """MEAL V2 (Shen & Savvides, arXiv 2009.08453; official code MEAL-V2 at 59e6bca).

    L = L_sim + L_D: soft cross-entropy to the ensemble's average softmax p̄ (T = 1; probabilities, not logits,
    are averaged) plus the discriminator's BCE on [z^s; z̄^t] (z̄^t: the teachers' mean raw logits). No hard label
    is used (labels only score accuracy). Student and discriminator share one optimizer and one backward pass, so
    the student also *minimises* L_D (no gradient reversal, no alternating updates), exactly as the official
    ``train.py``.

    Recipe (paper/README): start from a converged student (give the student source a ``checkpoint`` or a
    ``zoo.hub.Pretrained`` name), SGD momentum 0.9 with weight decay 0, lr 0.01 then 0.001 after epoch 100
    (``LR_REGIME``), RandomResizedCrop + flip only.

    Args:
        teacher: a list of sources (the ensemble); a single teacher also works (p̄ is then its softmax).
        discriminator_min_hidden: floor for the discriminator's hidden widths (see ``LogitDiscriminator``; 1, the
            default, keeps the official C//8 and C//64 wherever they are not 0).
        discriminator_lr: the discriminator's lr, or ``None`` for the student's.
        discriminator_weight: weight of L_D (1 in the paper; 0 gives MEAL V2 without D).

    Notes:
        The discriminator's lr is nominally 1e-4 in the official code, but its ``_set_learning_rate`` overwrites
        every param group each epoch, so D trains at the student's lr. ``discriminator_lr=None`` (default) follows
        the code; a number puts D in its own param group with that lr, which the scheduler scales like the rest.
    """

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        *,
        discriminator_min_hidden: int = 1,
        discriminator_lr: float | None = None,
        discriminator_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("teacher_ensemble", "prob") != "prob":
            raise ValueError("MEALV2.teacher_ensemble must be 'prob': MEAL V2 averages probabilities, not logits")
        super().__init__(student, teacher, **kwargs)

    def configure_models(self) -> None:
        super().configure_models()
        self.discriminator = LogitDiscriminator(self.num_classes, self.hparams.discriminator_min_hidden)

    def configure_losses(self) -> None:
        self.similarity = SoftCrossEntropy()
        self.discriminator_loss = MEALV2DiscriminatorLoss()

    def forward_teacher(self, x: Tensor) -> Outputs:
        """``logits`` carries log p̄ (what ``SoftCrossEntropy`` takes), for one teacher as for K; ``mean_logits``
        carries z̄^t for the discriminator. ``Teacher.combine`` is not used: for one member it returns raw logits."""
        members = self.teacher.member_logits(x)
        return Outputs(self.teacher.log_mean_prob(members), {"mean_logits": self.teacher.mean_logit(members)})

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        terms = {"sim": self.similarity(student.logits, teacher.logits)}
        if self.hparams.discriminator_weight:
            d = self.discriminator_loss(self.discriminator, student.logits, teacher.features["mean_logits"])
            terms["disc"] = self.hparams.discriminator_weight * d
        return terms

    def param_groups(self) -> list[dict[str, Any]]:
        if self.hparams.discriminator_lr is None:
            return super().param_groups()
        d_params = {id(p) for p in self.discriminator.parameters()}
        student = [p for p in self.trainable_parameters() if id(p) not in d_params]
        return [
            {"params": student},
            {"params": list(self.discriminator.parameters()), "lr": self.hparams.discriminator_lr},
        ]
