"""TRG: knowledge distillation via a token-level relationship graph (Zhang, Liu, He; arXiv 2306.12442)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from zoo.losses import (
    KDLoss,
    TokenSampler,
    TRGGlobalLoss,
    TRGInnerLoss,
    TRGLocalLoss,
    feature_tokens,
)
from zoo.methods.base import ModelLike, Outputs, TeacherLike
from zoo.methods.classification import ClassificationMethod

__all__ = ["TRG"]


def _prefix_tokens(model: nn.Module) -> int:
    """Class/register tokens in front of a timm ViT's patch tokens (0 for CNNs)."""
    n = getattr(model, "num_prefix_tokens", 0)
    return n if isinstance(n, int) else 0


def _fixed_image_size(model: nn.Module) -> int | None:
    """The input side a patch-embedding model insists on (timm ViTs without ``dynamic_img_size``), else None."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None or getattr(patch_embed, "dynamic_img_size", False):
        return None
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class TRG(ClassificationMethod):
    """TRG (arXiv 2306.12442): L = w_ce·CE + λ_kd·KD + α·L_inner + β·L_local + γ·L_global.

    Tokens are read from ``student_layer`` / ``teacher_layer`` (:class:`zoo.teacher.FeatureTaps` names: a module path
    such as ``"layer3"`` or ``"blocks.11"``, or ``"intermediates.11"``): one token per location of a CNN map, or a
    ViT's patch tokens (prefix tokens dropped), optionally pooled to ``token_grid × token_grid``. Teacher and student
    must give the same number of tokens per image (checked at construction with a blank batch, and on every batch).

    - L_inner (:class:`zoo.losses.TRGInnerLoss`): per-image contextual similarity over all tokens of the image.
    - L_local, L_global (:class:`zoo.losses.TRGLocalLoss`, :class:`zoo.losses.TRGGlobalLoss`): on the graph of
      B·``tokens`` nodes drawn per batch, shared by teacher and student; L_global compares ``projector(student
      token)`` with the teacher token (a Linear to the teacher's width, or with ``projector_dim=P`` Linear heads from
      both widths to P); τ_g decays linearly from ``tau_start`` to ``tau_end`` over the estimated training steps.
    - KD is Hinton's (:class:`zoo.losses.KDLoss`) at ``temperature``. Under DDP each device builds its batch's graph.

    Logged terms: ``ce``, ``kd``, ``inner``, ``local``, ``global`` (each weighted). The remaining options go to the
    loss classes, whose docstrings say what each means.

    Notes:
        No official code exists. The defaults beyond the formulas are choices, each an option: α = β = γ = 0.1,
        k = 8, σ from the data, 16 tokens per image, τ_g 0.5 → 0.1, CE 1 + KD 1 at T = 4.
    """

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        *,
        student_layer: str = "layer3",
        teacher_layer: str = "layer3",
        tokens: int = 16,
        token_grid: int | None = None,
        k: int = 8,
        sigma: float | None = None,
        normalize_graph: bool = True,
        knn_source: Literal["teacher", "own"] = "teacher",
        local_support: Literal["knn", "all"] = "knn",
        local_direction: Literal["teacher_student", "student_teacher"] = "teacher_student",
        local_row_logits: Literal["affinity", "log_affinity"] = "affinity",
        tau_start: float = 0.5,
        tau_end: float = 0.1,
        normalize_inner: bool = False,
        projector_dim: int | None = None,
        inner_weight: float = 0.1,
        local_weight: float = 0.1,
        global_weight: float = 0.1,
        kd_weight: float = 1.0,
        ce_weight: float = 1.0,
        temperature: float = 4.0,
        **kwargs: Any,
    ) -> None:
        if tokens < 1:
            raise ValueError(f"TRG.tokens must be ≥ 1, got {tokens}")
        super().__init__(student, teacher, **kwargs)
        self._total_steps: float | None = None

    @property
    def student_taps(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.hparams.student_layer,)

    @property
    def teacher_taps(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.hparams.teacher_layer,)

    def configure_models(self) -> None:
        super().configure_models()
        hp = self.hparams
        self._student_prefix = _prefix_tokens(self.student)
        self._teacher_prefix = _prefix_tokens(self.teacher.members[0])
        (l_s, d_s), (l_t, d_t) = self._probe_tokens()
        if l_s != l_t:
            raise ValueError(
                f"TRG: the student's {hp.student_layer!r} gives {l_s} tokens per image but the teacher's "
                f"{hp.teacher_layer!r} gives {l_t}; choose layers with the same spatial size or set token_grid to "
                "pool both to a grid"
            )
        if hp.projector_dim is None:
            self.projector = nn.Linear(d_s, d_t)
            self.teacher_projector: nn.Module = nn.Identity()
        else:
            self.projector = nn.Linear(d_s, hp.projector_dim)
            self.teacher_projector = nn.Linear(d_t, hp.projector_dim)

    def configure_losses(self) -> None:
        hp = self.hparams
        self.sampler = TokenSampler(hp.tokens)
        self.kd_loss = KDLoss(hp.temperature)
        self.inner_loss = TRGInnerLoss(normalize=hp.normalize_inner)
        self.local_loss = TRGLocalLoss(
            hp.k, "data" if hp.sigma is None else hp.sigma, hp.normalize_graph, hp.knn_source, hp.local_support,
            hp.local_direction, hp.local_row_logits,
        )
        self.global_loss = TRGGlobalLoss(hp.tau_start, hp.tau_end)

    # ----------------------------------------------------------------------------------------------- tokens
    @torch.no_grad()
    def _probe_tokens(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(tokens per image, token width) of the student and the teacher, from one forward of a blank batch."""
        sizes = {s for s in (_fixed_image_size(self.student), _fixed_image_size(self.teacher.members[0])) if s}
        if len(sizes) > 1:
            raise ValueError(f"TRG: student and teacher expect different fixed input sizes {sorted(sizes)}")
        side = sizes.pop() if sizes else 32
        x = torch.zeros(2, self.hparams.get("in_chans") or 3, side, side)
        was_training = self.student.training
        self.student.eval()  # no BatchNorm statistics from the blank batch
        try:
            s = self._tokens(self.forward_student(x).features[self.hparams.student_layer], self._student_prefix)
        finally:
            self.student.train(was_training)
        t = self._tokens(self.teacher.forward_features(x)[1][self.hparams.teacher_layer], self._teacher_prefix)
        return (s.shape[1], s.shape[2]), (t.shape[1], t.shape[2])

    def _tokens(self, features: Tensor, prefix: int) -> Tensor:
        return feature_tokens(features, prefix_tokens=prefix, grid=self.hparams.token_grid)

    # ----------------------------------------------------------------------------------------------- schedule
    def on_train_start(self) -> None:
        super().on_train_start()
        total = self.trainer.estimated_stepping_batches
        self._total_steps = float(total) if total and total != float("inf") else None

    def progress(self) -> float:
        """Training progress in [0, 1] for τ_g: global_step / estimated_stepping_batches (0 outside fit)."""
        if self._trainer is None or not self._total_steps:
            return 0.0
        return min(1.0, self.trainer.global_step / self._total_steps)

    # ----------------------------------------------------------------------------------------------- loss
    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        hp = self.hparams
        s_tokens = self._tokens(student.features[hp.student_layer], self._student_prefix)
        t_tokens = self._tokens(teacher.features[hp.teacher_layer], self._teacher_prefix).detach()
        if self.sampler.m > s_tokens.shape[1]:
            raise ValueError(
                f"TRG.tokens={self.sampler.m} exceeds the {s_tokens.shape[1]} tokens per image that "
                f"{hp.student_layer!r} gives at this input size; lower tokens"
            )
        (s_nodes, t_nodes), _ = self.sampler(s_tokens, t_tokens)
        g_s = self.projector(s_nodes)
        g_t = self.teacher_projector(t_nodes)
        return {
            "ce": hp.ce_weight * self.cross_entropy(student.logits, target),
            "kd": hp.kd_weight * self.kd_loss(student.logits, teacher.logits),
            "inner": hp.inner_weight * self.inner_loss(s_tokens, t_tokens),
            "local": hp.local_weight * self.local_loss(s_nodes, t_nodes),
            "global": hp.global_weight * self.global_loss(g_s, g_t, self.progress()),
        }
