"""Dual-Head Knowledge Distillation (DHKD, arXiv 2411.08937): CE on the student's head, BinaryKL-Norm on a second
one."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from zoo.losses import BinaryKLNormLoss
from zoo.methods.base import ModelLike, Outputs, TeacherLike
from zoo.methods.classification import ClassificationMethod
from zoo.teacher import PRE_LOGITS, embedding_dim

__all__ = ["DHKD", "build_aux_head", "pcgrad_project"]

AUX_LOGITS = "aux_logits"


def build_aux_head(kind: Literal["linear", "nonlinear"], dim: int, num_classes: int) -> nn.Module:
    """DHKD's auxiliary head on the pooled embedding: ``Linear(d, C)`` or the official ``NonLinearClassifier``,
    Linear(d, 200) → Dropout(0.1) → BN1d(200) → ReLU → Linear(200, C), with PyTorch's default initialisation as in
    the official code (``models/classifier.py``)."""
    if kind == "linear":
        return nn.Linear(dim, num_classes)
    if kind == "nonlinear":
        return nn.Sequential(
            nn.Linear(dim, 200), nn.Dropout(0.1), nn.BatchNorm1d(200), nn.ReLU(), nn.Linear(200, num_classes)
        )
    raise ValueError(f"DHKD.aux_head must be 'linear' or 'nonlinear', got {kind!r}")


def pcgrad_project(g_kd: Tensor, g_ce: Tensor) -> Tensor:
    """PCGrad-style gradient alignment with the CE gradient as the reference (DHKD's ``--ga``).

    If ⟨g_kd, g_ce⟩ < 0, returns g_kd − (⟨g_kd, g_ce⟩/‖g_ce‖²)·g_ce (g_kd without its component against g_ce);
    otherwise g_kd unchanged. Only the distillation gradient is projected (official ``helper/optimizer.py``).
    Branch-free, so a step on an accelerator needs no host synchronisation; a zero g_ce never conflicts.
    """
    conflict = torch.dot(g_kd, g_ce).clamp(max=0.0)
    return g_kd - (conflict / g_ce.dot(g_ce).clamp(min=torch.finfo(g_ce.dtype).tiny)) * g_ce


class DHKD(ClassificationMethod):
    """Dual-Head KD (Yang, Zong, Huang, Feng, An; arXiv 2411.08937; official code penghui-yang/DHKD at 7976c69).

    A second (auxiliary) head h₂ reads the same pooled embedding f_s as the student's classifier W₁:

        L = γ·CE(W₁·f_s, y) + α·L_BKLN(h₂(f_s), z^t),

    with L_BKLN the BinaryKL-Norm loss (``zoo.losses.BinaryKLNormLoss``). CE reaches only the main head, the teacher
    signal only the auxiliary head; both train the backbone. There is no softmax-KD term (as in the official
    ``helper/loops.py``). Inference, validation metrics, predictions and exported checkpoints use the main head only:
    ``forward`` is the student's own logits and the auxiliary head lives outside ``self.student`` (in the optimizer,
    not in ``student.*`` checkpoint keys). ``val/acc_aux`` reports the auxiliary head's top-1.

    Gradient alignment (``gradient_alignment=True``, the official ``--ga``): g_ce = ∇(γ·CE) and g_kd = ∇(α·L_BKLN)
    are taken separately over all trainable parameters; if they conflict, g_kd is projected onto the normal plane of
    g_ce (:func:`pcgrad_project`), and the step uses g_ce + g_kd. This needs manual optimisation; the LR schedulers
    are then stepped here at their interval. Gradient clipping and accumulation are not available in that mode
    (Lightning's manual-optimisation rules). Under DDP, GA needs ``strategy: ddp_find_unused_parameters_true``
    (each term leaves the other head without a gradient); each of the two backward passes is averaged over the
    processes before the projection, so every process applies the same step.

    ``kd_stop_epoch``: α = 0 from that epoch on, epochs counted from 1 as in the official ImageNet script
    (``train_student_imagenet.py``: ``if epoch >= early_stop_epoch: alpha = 0``, 50 there), so ``kd_stop_epoch=50``
    distils during epochs 1–49 (Lightning's ``current_epoch`` 0–48). ``None`` never stops.

    Defaults: γ = 1, α = 1, T = 2, linear head, no GA (the official CLI's γ, T, head and GA defaults; its ``-a``
    has no default and the README passes ``-a 1``, so α = 1 is the README's CIFAR value). The README's CIFAR example
    (resnet32x4 → ShuffleV2) uses the nonlinear head with GA; its ImageNet R34 → R18 run: α = 0.1, linear head,
    no GA, ``kd_stop_epoch`` 50.

    Args:
        temperature: T of BinaryKL-Norm.
        ce_weight: γ.
        kd_weight: α.
        aux_head: ``linear`` (Linear(d, C)) or ``nonlinear`` (see :func:`build_aux_head`).
        gradient_alignment: PCGrad-style projection of the distillation gradient (manual optimisation).
        kd_stop_epoch: first epoch (counted from 1) with α = 0, or ``None``.
        log_aux_accuracy: log ``val/acc_aux`` (one extra head on the pooled feature already computed).
    """

    student_taps = (PRE_LOGITS,)

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        *,
        temperature: float = 2.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        aux_head: Literal["linear", "nonlinear"] = "linear",
        gradient_alignment: bool = False,
        kd_stop_epoch: int | None = None,
        log_aux_accuracy: bool = True,
        **kwargs: Any,
    ) -> None:
        if kd_stop_epoch is not None and kd_stop_epoch < 1:
            raise ValueError(f"DHKD.kd_stop_epoch must be ≥ 1 (epochs count from 1) or None, got {kd_stop_epoch}")
        super().__init__(student, teacher, **kwargs)
        self.automatic_optimization = not gradient_alignment
        self._pooled_sink: list[Tensor] | None = None
        self._terms: dict[str, Tensor] = {}

    def configure_models(self) -> None:
        super().configure_models()
        if len(self.teacher.members) > 1 and self.teacher.ensemble != "logit":
            # a ``prob`` ensemble yields log p̄; BinaryKL-Norm is not shift-invariant, so it needs real logits
            raise ValueError(
                "DHKD.teacher_ensemble must be 'logit' for a teacher ensemble: BinaryKL-Norm compares logit values, "
                "and a 'prob' ensemble gives log-probabilities"
            )
        dim = embedding_dim(self.student, self.hparams.in_chans)
        self.aux_head = build_aux_head(self.hparams.aux_head, dim, self.num_classes)

    def configure_losses(self) -> None:
        self.bkl_loss = BinaryKLNormLoss(self.hparams.temperature)

    def configure_metrics(self) -> None:
        super().configure_metrics()
        self.val_aux_acc = (
            MulticlassAccuracy(self.num_classes, average="micro") if self.hparams.log_aux_accuracy else None
        )

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """Main-head logits (the student's own classifier): inference, validation and exported checkpoints."""
        if self._pooled_sink is None:
            return self.student(x)
        out = self.forward_student(x)  # the same logits, read together with the pooled embedding
        self._pooled_sink.append(out.features[PRE_LOGITS])
        return out.logits

    def forward_student(self, x: Tensor) -> Outputs:
        out = super().forward_student(x)
        out.features[AUX_LOGITS] = self.aux_head(out.features[PRE_LOGITS])
        return out

    def current_kd_weight(self) -> float:
        """α, or 0 from ``kd_stop_epoch`` on (epochs counted from 1)."""
        stop = self.hparams.kd_stop_epoch
        if stop is not None and self.current_epoch + 1 >= stop:
            return 0.0
        return self.hparams.kd_weight

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        terms = {
            "ce": self.hparams.ce_weight * self.cross_entropy(student.logits, target),
            "bkl": self.current_kd_weight() * self.bkl_loss(student.features[AUX_LOGITS], teacher.logits),
        }
        if not self.automatic_optimization:
            self._terms = terms  # the aligned step needs each term's own gradient
        return terms

    # ----------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)  # forward, loss terms and logging, in either mode
        if self.automatic_optimization:
            return loss
        terms, self._terms = self._terms, {}
        self._aligned_step(terms["ce"], terms["bkl"])
        self._step_schedulers("step", batch_idx)
        return loss.detach()

    def _aligned_step(self, ce: Tensor, kd: Tensor) -> None:
        """One optimizer step on g_ce + pcgrad_project(g_kd, g_ce) over every parameter the optimizer holds."""
        opt = self.optimizers()
        params = [p for group in opt.param_groups for p in group["params"]]
        kd_active = kd.requires_grad and self.current_kd_weight() != 0.0
        opt.zero_grad(set_to_none=True)
        self.manual_backward(ce, retain_graph=kd_active)
        g_ce = _flat_grads(params)
        if kd_active:
            opt.zero_grad(set_to_none=True)
            self.manual_backward(kd)
            g = g_ce + pcgrad_project(_flat_grads(params), g_ce)
        else:
            g = g_ce
        # Every parameter gets a gradient (zero where neither loss reaches it), as the official optimizer sets them.
        for p, chunk in zip(params, g.split([p.numel() for p in params])):
            p.grad = chunk.view_as(p).to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization:
            loop = self.trainer.fit_loop.epoch_loop
            # as Lightning's automatic loop: only after a complete epoch (not one cut short by max_steps)
            if getattr(loop, "_num_ready_batches_reached", lambda: True)():
                self._step_schedulers("epoch", self.current_epoch)

    def _step_schedulers(self, interval: str, index: int) -> None:
        """Steps the schedulers of ``interval`` whose frequency divides index + 1, as Lightning does automatically."""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval or (index + 1) % config.frequency:
                continue
            metric = None
            if config.reduce_on_plateau:
                metric = self.trainer.callback_metrics.get(config.monitor)
                if metric is None:
                    raise ValueError(
                        f"DHKD: ReduceLROnPlateau monitors {config.monitor!r}, which is not logged (logged: "
                        f"{sorted(self.trainer.callback_metrics)})"
                    )
            self.lr_scheduler_step(config.scheduler, metric)

    # ----------------------------------------------------------------------------------------------- validation
    def evaluate(self, batch: Any, stage: Literal["val", "test"], batch_idx: int = 0) -> dict[str, Tensor]:
        if self.val_aux_acc is None or stage != "val":
            return super().evaluate(batch, stage, batch_idx)
        self._pooled_sink = []
        try:
            out = super().evaluate(batch, stage, batch_idx)
            (pooled,) = self._pooled_sink
        finally:
            self._pooled_sink = None
        self.val_aux_acc.update(self.aux_head(pooled), out["target"])
        self.log("val/acc_aux", self.val_aux_acc, batch_size=out["target"].shape[0])
        return out


def _flat_grads(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
