"""LLaVA-KD (Cai et al., ICCV 2025, arXiv 2410.16236): three-stage distillation of a small LLaVA from a large one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor

from zoo.losses.llava_kd import DIVERGENCES, MDistLoss, RDistLoss, response_mask
from zoo.methods.base import ModelLike, TeacherLike
from zoo.methods.vlm import VLMMethod, next_token_loss

__all__ = ["LLaVAKD"]

_STAGES = ("dpt", "sft", "dft")


class LLaVAKD(VLMMethod):
    """LLaVA-KD: multimodal distillation (MDist) on response and visual tokens, plus relation distillation (RDist).

        L = L_reg + α·L_res + β·L_vis + γ·L_rel

    L_reg is the next-token CE on the answers; L_res and L_vis are :class:`zoo.losses.MDistLoss` at the shifted
    response positions and at the visual positions (not shifted); L_rel is :class:`zoo.losses.RDistLoss` (1 − cos of
    the visual self-relation Z Zᵀ of raw logits, batch-flattened). α = β = γ = 1 and forward KL are the official
    trainer's (``DistillLLaVATrainer.compute_loss``); a term with weight 0 is not computed.

    Stages (one config each; stage k+1 starts from stage k's checkpoint: ``student.init_args.checkpoint``):

    ====  ==========================================  ===================================  ==================
    dpt   distilled pre-training on captions          projector only (the frozen LLM       L_reg + MDist + RDist
                                                      still passes gradients to it)
    sft   supervised fine-tuning, no teacher needed   projector + LLM                      L_reg
    dft   distilled fine-tuning                       projector + LLM                      L_reg + MDist + RDist
    ====  ==========================================  ===================================  ==================

    The vision tower stays frozen throughout.

    Notes:
        The trainer silently falls back to CE when the teacher's and student's masked rows differ, and hard-codes
        K = 728 visual tokens; here both read the same token sequence, so rows match by construction, K comes from the
        models, and a teacher/student pair that cannot be compared is refused at construction.

    Args:
        stage: ``dpt``, ``sft`` or ``dft``.
        alpha, beta, gamma: weights of L_res, L_vis, L_rel (1, 1, 1).
        divergence: D of MDist, one of ``zoo.losses.llava_kd.DIVERGENCES`` (``forward_kl``).
        divergence_lambda: λ of the mixed divergences (default: the official values).
        rel_reduction: ``batch`` (official: one cosine over the batch-flattened relations) or ``sample``.
        rel_chunk_size: vocabulary chunk of the relation's Gram product (``None``: unchunked).
        **kwargs: the arguments of :class:`~zoo.methods.vlm.VLMMethod` (``trainable`` overrides the stage's default).
    """

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike | None = None,
        *,
        stage: Literal["dpt", "sft", "dft"] = "dft",
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        divergence: str = "forward_kl",
        divergence_lambda: float | None = None,
        rel_reduction: Literal["batch", "sample"] = "batch",
        rel_chunk_size: int | None = 8192,
        **kwargs: Any,
    ) -> None:
        if stage not in _STAGES:
            raise ValueError(f"LLaVAKD.stage must be one of {_STAGES}, got {stage!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"LLaVAKD.divergence: unknown {divergence!r}; expected one of {sorted(DIVERGENCES)}")
        if min(alpha, beta, gamma) < 0:
            raise ValueError(f"LLaVAKD: alpha, beta, gamma must be ≥ 0, got {alpha}, {beta}, {gamma}")
        if stage != "sft" and max(alpha, beta, gamma) > 0 and teacher is None:
            raise ValueError(f"LLaVAKD(stage={stage!r}) distils: a teacher is required (or alpha = beta = gamma = 0)")
        super().__init__(student, teacher, **kwargs)

    def default_trainable(self) -> list[str]:
        return ["projector"] if self.hparams.stage == "dpt" else ["projector", "language_model"]

    @property
    def uses_teacher(self) -> bool:
        h = self.hparams
        return self.teacher is not None and h.stage != "sft" and max(h.alpha, h.beta, h.gamma) > 0

    @property
    def uses_visual_positions(self) -> bool:
        return self.uses_teacher and max(self.hparams.beta, self.hparams.gamma) > 0

    def configure_losses(self) -> None:
        h = self.hparams
        self.mdist = MDistLoss(h.divergence, h.divergence_lambda)
        self.rdist = RDistLoss(h.rel_reduction, h.rel_chunk_size)
        super().configure_losses()

    def loss_terms(self, student: Any, teacher: Any | None, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        h, labels = self.hparams, batch["labels"]
        terms = {"reg": next_token_loss(student.logits, labels)}
        if teacher is None or not self.uses_teacher:
            return terms
        zs, zt = self.cut(student.logits), self.cut(teacher.logits)
        if h.alpha > 0:
            terms["res"] = h.alpha * self.mdist(zs, zt, response_mask(labels))
        if h.beta > 0:
            terms["vis"] = h.beta * self.mdist(zs, zt, student.visual_mask)
        if h.gamma > 0:
            terms["rel"] = h.gamma * self.rdist(zs, zt, student.visual_mask)
        return terms
