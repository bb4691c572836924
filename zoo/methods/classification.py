"""Image classification: the family base, supervised training (teachers and baselines), Hinton KD and DKD."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from zoo.losses import DKDLoss, KDLoss
from zoo.methods.base import DistillationMethod, ModelLike, Outputs, TeacherLike
from zoo.models.sources import check_source_fits, num_classes_of
from zoo.soft_labels import SoftLabels, prepare_soft_labels, soft_labels_to_logits
from zoo.teacher import FeatureTaps, Teacher

__all__ = ["DKD", "KD", "ClassificationMethod", "Supervised"]


class ClassificationMethod(DistillationMethod):
    """Base of the image-classification methods: one teacher and one student forward per batch, then the method's
    :meth:`loss_terms`; top-1/top-5 (``val/acc``, ``val/acc5``), the teacher's top-1 (``val/teacher_acc``) and
    student–teacher agreement (``val/agreement``).

    The teacher runs first under ``torch.no_grad`` in eval mode, inside the same autocast region as the student
    (Lightning's ``precision: bf16-mixed`` covers the step), on the student's normalised batch mapped to the
    normalisation its weights expect; optionally channels-last and compiled. Methods that read intermediate
    features list them in ``student_taps`` / ``teacher_taps`` (:class:`zoo.teacher.FeatureTaps` names).

    Args:
        teacher_ensemble: how a list of teachers is combined (``prob``: log of the mean softmax; ``logit``: the
            mean logit).
        channels_last: keep the student's convolution weights and the input batches channels-last (fast with bf16
            autocast on recent NVIDIA GPUs).
        teacher_channels_last: run the teacher channels-last (``None``: on CUDA devices only).
        teacher_compile: ``torch.compile`` the teacher alone (``true`` or a dict of ``torch.compile`` options).
        soft_labels: cached soft labels (:class:`zoo.soft_labels.SoftLabels`): the teacher labels pre-sampled
            augmentations once at fit start and training replays them, so it never runs during training. Only for
            methods that read the teacher through its logits at one temperature (KD, DKD).
        **kwargs: the arguments of :class:`~zoo.methods.base.DistillationMethod`.
    """

    task: ClassVar[str] = "classification"  # the task a published checkpoint of the method is listed under
    student_taps: ClassVar[Sequence[str]] = ()
    teacher_taps: ClassVar[Sequence[str]] = ()

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike | None = None,
        *,
        teacher_ensemble: Literal["prob", "logit"] = "prob",
        channels_last: bool = False,
        teacher_channels_last: bool | None = None,
        teacher_compile: bool | dict[str, Any] = False,
        soft_labels: SoftLabels | None = None,
        **kwargs: Any,
    ) -> None:
        cls = type(self)
        if (
            cls.loss_terms is ClassificationMethod.loss_terms
            and cls.training_step is ClassificationMethod.training_step
        ):
            raise TypeError(f"{cls.__name__} defines no loss: override loss_terms (or training_step)")
        # Methods whose loss reads more than the logits at one temperature (features, several temperatures) refuse.
        needs_teacher = cls.cached_soft_label_temperature is ClassificationMethod.cached_soft_label_temperature
        if soft_labels is not None and (needs_teacher or cls.teacher_taps):
            raise ValueError(
                f"{cls.__name__}.soft_labels: this method reads more of the teacher than its logits at one "
                "temperature, so cached soft labels cannot replace it (KD and DKD support them)"
            )
        super().__init__(student, teacher, **kwargs)
        self.soft_labels = SoftLabels(**soft_labels) if isinstance(soft_labels, dict) else soft_labels

    def configure_models(self) -> None:
        for name in ("student", "teacher"):
            check_source_fits(self.source(name), name, self.hparams.num_classes, self.hparams.in_chans)
        self.student = self.build_student()
        self.num_classes = self.hparams.num_classes or num_classes_of(self.student)
        if self.num_classes is None:
            raise ValueError(f"{type(self).__name__}.num_classes: not given and not readable from the student")
        if self.source("teacher") is not None:
            teacher = Teacher.from_sources(
                self.source("teacher"),
                num_classes=self.num_classes,
                in_chans=self.hparams.in_chans,
                ensemble=self.hparams.teacher_ensemble,
                taps=self.teacher_taps,
            )
            self.add_teacher("teacher", teacher)
        self._student_taps = FeatureTaps(self.student, self.student_taps) if self.student_taps else None

    def configure_metrics(self) -> None:
        n = self.num_classes
        top5 = min(5, n)
        scores = MetricCollection(
            {"acc": MulticlassAccuracy(n, average="micro"), "acc5": MulticlassAccuracy(n, top_k=top5, average="micro")}
        )
        # no argument checks on the training batches: torchmetrics reads the labels back to the host (a CUDA sync)
        train_acc = MulticlassAccuracy(n, average="micro", validate_args=False)
        self.train_metrics = MetricCollection({"acc": train_acc}, prefix="train/")
        self.val_metrics, self.test_metrics = scores.clone(prefix="val/"), scores.clone(prefix="test/")
        self.val_teacher = MetricCollection({"teacher_acc": MulticlassAccuracy(n, average="micro")}, prefix="val/")
        self.test_teacher = self.val_teacher.clone(prefix="test/")
        self.val_agreement = MulticlassAccuracy(n, average="micro")
        self.test_agreement = MulticlassAccuracy(n, average="micro")

    # ----------------------------------------------------------------------------------------------- fast path
    def _configure_teacher(self) -> None:
        if self.teacher is None:
            return
        channels_last = self.hparams.teacher_channels_last
        if channels_last is None:
            channels_last = self.device.type == "cuda"
        self.teacher.set_fast_path(channels_last=channels_last, compile=self.hparams.teacher_compile)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.channels_last:
            self.student.to(memory_format=torch.channels_last)
        self._configure_teacher()
        if self.soft_labels is not None:
            prepare_soft_labels(
                self.soft_labels,
                self.teacher,
                getattr(self.trainer, "datamodule", None),
                self.trainer,
                num_classes=self.num_classes,
                temperature=float(self.cached_soft_label_temperature()),
                owner=type(self).__name__,
            )

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._configure_teacher()

    def cached_soft_label_temperature(self) -> float | None:
        """The one temperature at which the loss reads the teacher's logits, or ``None`` when cached soft labels
        cannot stand in for the teacher (the default: the method needs features or several temperatures)."""
        return None

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """Student logits (what inference and exported checkpoints use)."""
        return self.student(x)

    def forward_student(self, x: Tensor) -> Outputs:
        if self._student_taps is None:
            return Outputs(self.student(x))
        logits, feats = self._student_taps(x)
        return Outputs(logits, feats)

    def forward_teacher(self, x: Tensor) -> Outputs | None:
        if self.teacher is None:
            return None
        logits, feats = self.teacher.forward_features(x)
        return Outputs(logits, feats)

    def cached_teacher_outputs(self, batch: dict[str, Tensor]) -> Outputs:
        """The teacher's stored answer for the replayed views of a cached batch, as pseudo-logits."""
        temperature = float(self.cached_soft_label_temperature())
        return Outputs(soft_labels_to_logits(batch["soft_index"], batch["soft_prob"], self.num_classes, temperature))

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        """The weighted loss terms of one batch by name (``ce``, ``kd`` ...); their sum is minimised."""
        return {}

    def cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        """The CE term: CE(z, y) with the method's ``label_smoothing`` (0 unless the method has that option)."""
        return F.cross_entropy(logits, target, label_smoothing=self.hparams.get("label_smoothing", 0.0))

    # ----------------------------------------------------------------------------------------------- steps
    @staticmethod
    def unpack_batch(batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, dict):
            return batch["image"], batch["label"]
        return batch[0], batch[1]

    def prepare_input(self, x: Tensor) -> Tensor:
        """The batch in the student's memory format (channels-last when ``channels_last`` is set)."""
        if self.hparams.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.unpack_batch(batch)
        x = self.prepare_input(x)
        # Teacher first: its activations are freed before the student's graph is built (lower peak memory, and
        # about 7 % less step time for resnet32x4 → resnet8x4 on a CPU: benchmarks/teacher_order.py).
        if isinstance(batch, dict) and "soft_prob" in batch:
            teacher = self.cached_teacher_outputs(batch)
        else:
            teacher = self.forward_teacher(x)
        student = self.forward_student(x)
        loss = self.log_loss_terms(self.loss_terms(student, teacher, y), x.shape[0])
        # update(), not forward(): the metrics are logged per epoch only, so forward's per-batch value is dead work.
        self.train_metrics.update(student.logits.detach(), y)
        # Handing Lightning the metric objects on an epoch's first batch is enough: it computes them over every
        # update at the epoch's end (and a self.log call costs more host time than a small model's step).
        if getattr(getattr(self._trainer, "_logger_connector", None), "_first_loop_iter", True) is not False:
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    def evaluate(self, batch: Any, stage: Literal["val", "test"], batch_idx: int = 0) -> dict[str, Tensor]:
        """Updates the metrics; returns the logits so callbacks (monitor, gallery) need no second forward."""
        x, y = self.unpack_batch(batch)
        x = self.prepare_input(x)
        logits = self(x)
        bs = x.shape[0]
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), batch_size=bs)
        self.log_dict(metrics, batch_size=bs, prog_bar=stage == "val")
        if self.teacher is None:
            return {"logits": logits, "target": y}
        t_logits = self.teacher(x)
        teacher_metrics = self.val_teacher if stage == "val" else self.test_teacher
        agreement = self.val_agreement if stage == "val" else self.test_agreement
        teacher_metrics.update(t_logits, y)
        agreement.update(logits, t_logits.argmax(1))
        self.log_dict(teacher_metrics, batch_size=bs)
        self.log(f"{stage}/agreement", agreement, batch_size=bs)
        return {"logits": logits, "teacher_logits": t_logits, "target": y}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(-1)


class Supervised(ClassificationMethod):
    """Cross-entropy training without a teacher: trains teachers and the no-KD baselines on the same code path.

    L = CE(z^s, y) (with optional label smoothing). A teacher may still be given, to report agreement.
    """

    requires_teacher = False

    def __init__(
        self, student: ModelLike, teacher: TeacherLike | None = None, *, label_smoothing: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(student, teacher, **kwargs)

    def forward_teacher(self, x: Tensor) -> Outputs | None:
        return None  # the teacher plays no part in the loss

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        return {"ce": self.cross_entropy(student.logits, target)}


class KD(ClassificationMethod):
    """Hinton knowledge distillation (arXiv 1503.02531): L = w_ce·CE + w_kd·T²·KL(p^T(z^t) ‖ p^T(z^s)).

    Defaults are mdistiller's CIFAR-100 values (T = 4, w_ce = 0.1, w_kd = 0.9); its ImageNet R34→R18 config uses
    T = 1 and 0.5 / 0.5. See :class:`zoo.losses.KDLoss`.
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

    def configure_losses(self) -> None:
        self.kd_loss = KDLoss(self.hparams.temperature)

    def cached_soft_label_temperature(self) -> float | None:
        return self.hparams.temperature

    def kd_factor(self) -> float:
        """The weight of the KD term this step (KD++ warms it up)."""
        return self.hparams.kd_weight

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        return {
            "ce": self.hparams.ce_weight * self.cross_entropy(student.logits, target),
            "kd": self.kd_factor() * self.kd_loss(student.logits, teacher.logits),
        }


class DKD(ClassificationMethod):
    """Decoupled KD (arXiv 2203.08679): L = w_ce·CE + min(e / warm, 1)·(α·TCKD + β·NCKD).

    The warm-up counts epochs from 1 as mdistiller's trainer does (e = ``current_epoch + 1``), so the first epoch
    already has weight 1/warm. Defaults are mdistiller's CIFAR-100 values (α = 1, β = 8, T = 4, warm = 20); its
    ImageNet R34→R18 config uses α = 1, β = 0.5, T = 1, warm = 1. Logged terms: ``ce``, ``tckd`` and ``nckd``
    (each weighted, warm-up included). See :class:`zoo.losses.DKDLoss`.
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
        if warmup_epochs < 1:
            raise ValueError(f"{type(self).__name__}.warmup_epochs must be ≥ 1, got {warmup_epochs}")
        super().__init__(student, teacher, **kwargs)

    def configure_losses(self) -> None:
        self.dkd_loss = DKDLoss(self.hparams.alpha, self.hparams.beta, self.hparams.temperature)

    def cached_soft_label_temperature(self) -> float | None:
        return self.hparams.temperature

    def warmup_factor(self) -> float:
        return min((self.current_epoch + 1) / self.hparams.warmup_epochs, 1.0)

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        tckd, nckd = self.dkd_loss.parts(student.logits, teacher.logits, target)
        w = self.warmup_factor()
        return {
            "ce": self.hparams.ce_weight * self.cross_entropy(student.logits, target),
            "tckd": w * self.hparams.alpha * tckd,
            "nckd": w * self.hparams.beta * nckd,
        }
