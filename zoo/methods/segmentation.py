"""Semantic segmentation: the family base, supervised training, pixel KD and channel-wise distillation (CWD).

LAD and MGD, which build on the base, have their own files (``zoo.methods.lad``, ``zoo.methods.mgd``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from zoo.losses.segmentation import CWDLoss, PixelKDLoss
from zoo.methods.base import DistillationMethod, ModelLike, Outputs, TeacherLike
from zoo.metrics import SegmentationMetrics
from zoo.models.segmentation import segmentation_taps
from zoo.models.sources import build_model, check_source_fits, num_classes_of
from zoo.teacher import FeatureTaps, Teacher

__all__ = ["CWD", "PixelKD", "SegmentationMethod", "SupervisedSegmentation", "TapName"]

TapName = Literal["logits", "features", "aux"]


def _resize_like(logits: Tensor, target: Tensor) -> Tensor:
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return logits


class SegmentationMethod(DistillationMethod):
    """Base of the segmentation methods: CE with ignore index, optional auxiliary CE, taps by name, mIoU metrics.

    Networks return logits at the input size; losses read the pre-upsampling logits (``logits``), the decoder
    feature (``features``) and the auxiliary head (``aux``) by module path
    (:func:`zoo.models.segmentation.segmentation_taps` finds them for smp, torchvision and mmseg models; the
    ``student_paths`` / ``teacher_paths`` options override them). Subclasses list the taps they read in
    ``student_needs`` / ``teacher_needs`` and implement :meth:`loss_terms` (or their own ``training_step``).
    Evaluation reports mIoU, per-class IoU and pixel accuracy ignoring ``ignore_index`` (``val/miou``,
    ``val/iou_<class>``, ``val/pixel_acc``), the teacher's mIoU (``val/teacher_miou``) and the student–teacher
    pixel agreement (``val/agreement``).

    Args:
        ignore_index: label value excluded from losses and metrics.
        aux_weight: weight of the CE on the student's auxiliary head (needs an ``aux`` tap; 0 = off).
        student_paths, teacher_paths: module paths by tap name (``logits``, ``features``, ``aux``) that
            override the ones found automatically.
        **kwargs: the arguments of :class:`~zoo.methods.base.DistillationMethod`.
    """

    summary_keys = ("val/miou", "val/teacher_miou", "val/agreement", "val mIoU")
    agreement_name = "pixel"
    task = "segmentation"
    student_needs: ClassVar[tuple[TapName, ...]] = ()
    teacher_needs: ClassVar[tuple[TapName, ...]] = ()

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike | None = None,
        *,
        ignore_index: int = 255,
        aux_weight: float = 0.0,
        student_paths: dict[str, str] | None = None,
        teacher_paths: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, **kwargs)

    # ------------------------------------------------------------------------------------------- models
    def student_in_chans(self) -> int | None:
        """Input channels the student is built with (LAD's teacher stage adds its label channel)."""
        return self.hparams.in_chans

    def teacher_in_chans(self) -> int | None:
        """Input channels the teacher is built with (LAD's label-assisted teacher takes one more)."""
        return self.hparams.in_chans

    def build_student(self) -> nn.Module:
        return build_model(
            self.source("student"), num_classes=self.hparams.num_classes, in_chans=self.student_in_chans()
        )

    def build_segmentation_teacher(self, name: str, needs: Sequence[TapName], paths: Mapping[str, str] | None) -> None:
        """Builds teacher ``name`` from its source, taps the features ``needs`` names, and adds it."""
        teacher = Teacher.from_sources(
            self.source(name), num_classes=self.num_classes, in_chans=self.teacher_in_chans()
        )
        if needs:
            teacher.set_taps(self.resolve_paths(teacher.members[0], paths, needs, name))
        self.add_teacher(name, teacher)

    def configure_models(self) -> None:
        check_source_fits(self.source("student"), "student", self.hparams.num_classes, self.student_in_chans())
        check_source_fits(self.source("teacher"), "teacher", self.hparams.num_classes, self.teacher_in_chans())
        self.student = self.build_student()
        self.num_classes = self.hparams.num_classes or num_classes_of(self.student)
        if self.source("teacher") is not None:
            self.build_segmentation_teacher("teacher", self.teacher_needs, self.hparams.teacher_paths)
        needs = self.student_needs + (("aux",) if self.hparams.aux_weight > 0 else ())
        self._student_paths = self.resolve_paths(self.student, self.hparams.student_paths, needs, "student")
        self._student_taps = FeatureTaps(self.student, list(self._student_paths.values())) if needs else None

    def resolve_paths(
        self, model: nn.Module, given: Mapping[str, str] | None, needs: Sequence[str], who: str
    ) -> dict[str, str]:
        """The module path of every tap name in ``needs``: given in the config, else found by name."""
        given = dict(given or {})
        unknown = set(given) - {"logits", "features", "aux"}
        if unknown:
            raise ValueError(f"{type(self).__name__}.{who}_paths: unknown tap names {sorted(unknown)}")
        if not needs:
            return {}
        found = segmentation_taps(model) if any(n not in given for n in needs) else {}
        paths = {}
        for name in needs:
            path = given.get(name) or found.get(name)
            if path is None:
                hint = " (set aux_weight: 0 or give one)" if name == "aux" else ""
                raise ValueError(
                    f"{type(self).__name__}: the {who} ({type(model).__name__}) has no '{name}' tap{hint}; "
                    f"give {who}_paths.{name}: <module path>"
                )
            paths[name] = path
        return paths

    def configure_metrics(self) -> None:
        n, ignore = self.num_classes, self.hparams.ignore_index
        self.val_seg, self.test_seg = SegmentationMetrics(n, ignore), SegmentationMetrics(n, ignore)
        self.val_teacher_seg, self.test_teacher_seg = SegmentationMetrics(n, ignore), SegmentationMetrics(n, ignore)
        self.val_agree, self.test_agree = MeanMetric(), MeanMetric()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dm_ignore = getattr(datamodule, "ignore_index", None)
        if dm_ignore is not None and dm_ignore != self.hparams.ignore_index:
            raise ValueError(
                f"{type(self).__name__}.ignore_index is {self.hparams.ignore_index} but the data marks ignored "
                f"pixels with {dm_ignore}"
            )
        self._class_names = getattr(datamodule, "class_names", None)

    # ------------------------------------------------------------------------------------------- forward
    def student_input(self, x: Tensor, y: Tensor | None, train: bool) -> Tensor:
        """What the student sees (LAD's teacher stage appends its label channel)."""
        return x

    def teacher_input(self, x: Tensor, y: Tensor | None) -> Tensor:
        """What the teacher sees (LAD appends the label channel with fixed codes)."""
        return x

    def forward_student(self, x: Tensor) -> Outputs:
        if self._student_taps is None:
            return Outputs(self.student(x))
        logits, feats = self._student_taps(x)
        return Outputs(logits, {name: feats[path] for name, path in self._student_paths.items()})

    def forward_teacher(self, x: Tensor, name: str = "teacher") -> Outputs | None:
        teacher = self._teachers.get(name)
        if teacher is None:
            return None
        return Outputs(*teacher.forward_features(x))

    @staticmethod
    def unpack_batch(batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, Mapping) and "labelled" in batch:
            batch = batch["labelled"]  # semi-supervised loaders: supervised methods use the labelled part
        if isinstance(batch, Mapping):
            return batch["image"], batch["label"]
        return batch[0], batch[1]

    # ------------------------------------------------------------------------------------------- losses
    def ce(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(_resize_like(logits, target), target, ignore_index=self.hparams.ignore_index)

    def supervised_terms(self, student: Outputs, target: Tensor) -> dict[str, Tensor]:
        terms = {"ce": self.ce(student.logits, target)}
        if self.hparams.aux_weight > 0:
            terms["aux"] = self.hparams.aux_weight * self.ce(student.features["aux"], target)
        return terms

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        return self.supervised_terms(student, target)

    def check_labels(self, y: Tensor, where: str) -> None:
        """Refuses a batch whose labels hold a value that is neither a class nor ``ignore_index`` (read on the
        first batch of training and of evaluation, so a wrong data set fails at once, not inside a loss)."""
        ignore = self.hparams.ignore_index
        bad = ((y < 0) | (y >= self.num_classes)) & (y != ignore)
        if bool(bad.any()):
            raise ValueError(
                f"{where}: label value {int(y[bad][0])} is neither a class (0..{self.num_classes - 1}) nor "
                f"ignore_index {ignore}; `zoo check-data --config <config>` lists the files"
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == 0 and batch_idx == 0:
            self.check_labels(self.unpack_batch(batch)[1], "the first training batch")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.unpack_batch(batch)
        student = self.forward_student(self.student_input(x, y, train=True))
        teacher = self.forward_teacher(self.teacher_input(x, y)) if self.teacher is not None else None
        return self.log_loss_terms(self.loss_terms(student, teacher, y), x.shape[0])

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, batch: Any, stage: Literal["val", "test"], batch_idx: int = 0) -> dict[str, Tensor]:
        x, y = self.unpack_batch(batch)
        if batch_idx == 0:
            self.check_labels(y, f"the first {stage} batch")
        logits = self.student(self.student_input(x, y, train=False))
        bs = x.shape[0]
        (self.val_seg if stage == "val" else self.test_seg).update(logits, y)
        self.log(f"{stage}/loss", self.ce(logits, y), batch_size=bs)
        out = {"logits": logits, "target": y}
        if self.teacher is not None:
            t_logits = self.teacher(self.teacher_input(x, y))
            (self.val_teacher_seg if stage == "val" else self.test_teacher_seg).update(t_logits, y)
            valid = y != self.hparams.ignore_index
            agree = (logits.argmax(1) == t_logits.argmax(1))[valid].float()
            if agree.numel():
                (self.val_agree if stage == "val" else self.test_agree).update(agree.mean(), agree.numel())
            out["teacher_logits"] = t_logits
        return out

    def _log_epoch(self, stage: str) -> None:
        seg = self.val_seg if stage == "val" else self.test_seg
        result = seg.compute()
        self.log(f"{stage}/miou", result["miou"], prog_bar=stage == "val")
        self.log(f"{stage}/pixel_acc", result["pixel_acc"])
        names = self._class_names if getattr(self, "_class_names", None) else range(self.num_classes)
        for name, iou in zip(names, result["iou"]):
            if not torch.isnan(iou):
                self.log(f"{stage}/iou_{name}", iou)
        seg.reset()
        if self.teacher is not None:
            teacher_seg = self.val_teacher_seg if stage == "val" else self.test_teacher_seg
            agree = self.val_agree if stage == "val" else self.test_agree
            self.log(f"{stage}/teacher_miou", teacher_seg.compute()["miou"])
            teacher_seg.reset()
            if agree.update_count:
                self.log(f"{stage}/agreement", agree.compute())
            agree.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.student(self.student_input(x, None, train=False)).softmax(1)


class SupervisedSegmentation(SegmentationMethod):
    """Supervised segmentation (teachers and baselines): CE with ignore index (+ ``aux_weight``·aux CE).

    Takes no teacher. With a semi-supervised data module it trains on the labelled batches only, so a baseline can
    take as many steps as MGD.
    """

    requires_teacher = False

    def __init__(self, student: ModelLike, teacher: TeacherLike | None = None, **kwargs: Any) -> None:
        if teacher is not None:
            raise ValueError("SupervisedSegmentation takes no teacher; use PixelKD, CWD, LAD or MGD to distil")
        super().__init__(student, None, **kwargs)


class PixelKD(SegmentationMethod):
    """Pixel-wise KD (SKD's pixel term, CIRKD ``losses/kd.py``): CE + ``kd_weight``·τ²·mean_pixels KL(p_T ‖ p_S).

    The KL compares the pre-upsampling logits (student resized to the teacher's size). CIRKD does not mask
    ignored pixels (the default here too); ``mask_ignore`` averages over labelled pixels only.

    Args:
        temperature: τ (1 in CIRKD).
        kd_weight: weight of the KD term.
        mask_ignore: leave pixels labelled ``ignore_index`` out of the KD average.
    """

    student_needs = ("logits",)
    teacher_needs = ("logits",)

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        *,
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        mask_ignore: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, **kwargs)

    def configure_losses(self) -> None:
        self.kd_loss = PixelKDLoss(self.hparams.temperature, ignore_index=self.hparams.ignore_index)

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        terms = self.supervised_terms(student, target)
        mask = target if self.hparams.mask_ignore else None
        terms["kd"] = self.hparams.kd_weight * self.kd_loss(
            student.features["logits"], teacher.features["logits"], mask
        )
        return terms


class CWD(SegmentationMethod):
    """Channel-wise distillation (Shu et al., ICCV'21, arXiv 2011.13256): CE + ``cwd_weight``·CWD_τ on the
    pre-upsampling logits.

    Defaults follow the original code (TorchDistiller SemSeg-distill: τ = 4, weight 3); mmrazor's Cityscapes
    config uses τ = 1 and weight 5 (set them in the config).

    Args:
        temperature: τ of the spatial softmax.
        cwd_weight: weight of the CWD term.
    """

    student_needs = ("logits",)
    teacher_needs = ("logits",)

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        *,
        temperature: float = 4.0,
        cwd_weight: float = 3.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, **kwargs)

    def configure_losses(self) -> None:
        self.cwd_loss = CWDLoss(self.hparams.temperature)

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        terms = self.supervised_terms(student, target)
        terms["cwd"] = self.hparams.cwd_weight * self.cwd_loss(student.features["logits"], teacher.features["logits"])
        return terms
