"""Segmentation distillation: supervised training, pixel KD, CWD, LAD (label-assisted teacher) and MGD.

All methods share :class:`SegmentationMethod`: networks return logits at the input size, losses read the
pre-upsampling logits (``logits``), the decoder feature (``features``) and the auxiliary head (``aux``) by module
path (:func:`zoo.models.segmentation.segmentation_taps` finds them for smp, torchvision and mmseg models; the
``student_paths`` / ``teacher_paths`` options override them), and evaluation reports mIoU, per-class IoU and
pixel accuracy ignoring label 255 (``val/miou``, ``val/iou_<class>``, ``val/pixel_acc``), the teacher's mIoU
(``val/teacher_miou``) and the student–teacher pixel agreement (``val/agreement``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from zoo.losses.segmentation import (
    BoxMaskGenerator,
    CWDLoss,
    LabelNoiser,
    MGDContentLoss,
    MGDSemanticLoss,
    OhemCrossEntropy,
    PixelKDLoss,
    cutmix,
)
from zoo.methods.base import (
    DistillationMethod,
    ModelLike,
    Outputs,
    TeacherLike,
    _as_config,
)
from zoo.metrics import SegmentationMetrics
from zoo.models.segmentation import segmentation_taps
from zoo.teacher import FeatureTaps, Teacher

__all__ = ["CWD", "LAD", "MGD", "LADTeacher", "PixelKD", "SegmentationMethod", "SupervisedSegmentation"]

TapName = Literal["logits", "features", "aux"]


def _resize_like(logits: Tensor, target: Tensor) -> Tensor:
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return logits


class SegmentationMethod(DistillationMethod):
    """Base of the segmentation methods: CE with ignore index, optional auxiliary CE, taps by name, mIoU metrics.

    Subclasses list the taps they read in ``student_needs`` / ``teacher_needs`` and implement ``loss_terms``;
    LAD's and MGD's steps override :meth:`training_step`.

    Args:
        student, teacher: see ``DistillationMethod``.
        ignore_index: label value excluded from losses and metrics.
        aux_weight: weight of the CE on the student's auxiliary head (needs an ``aux`` tap; 0 = off).
        student_paths, teacher_paths: module paths by tap name (``logits``, ``features``, ``aux``) that
            override the ones found automatically.
        **kwargs: the arguments of ``DistillationMethod`` (``num_classes``, ``in_chans``, ``optimizer`` ...).
    """

    summary_keys = ("val/miou", "val/teacher_miou", "val/agreement", "val mIoU")
    agreement_name = "pixel"
    student_needs: tuple[TapName, ...] = ()
    teacher_needs: tuple[TapName, ...] = ()

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
        self.ignore_index = ignore_index  # read by build_metrics during the base's __init__
        super().__init__(student, teacher, **kwargs)
        self.aux_weight = aux_weight
        needs = self.student_needs + (("aux",) if aux_weight > 0 else ())
        self._student_paths = self._resolve_paths(self.student, student_paths, needs, "student")
        if self._student_paths:
            self._student_taps = FeatureTaps(self.student, list(self._student_paths.values()))
        self._teacher_paths: dict[str, str] = {}
        if self.teacher is not None and self.teacher_needs:
            self._teacher_paths = self._resolve_paths(self.teacher.members[0], teacher_paths, self.teacher_needs, "teacher")
            self.teacher.taps = FeatureTaps(self.teacher.members[0], list(self._teacher_paths.values()))

    def _resolve_paths(
        self, model: nn.Module, given: Mapping[str, str] | None, needs: Sequence[str], who: str
    ) -> dict[str, str]:
        given = dict(given or {})
        unknown = set(given) - {"logits", "features", "aux"}
        if unknown:
            raise ValueError(f"{type(self).__name__}.{who}_paths: unknown tap names {sorted(unknown)}")
        if not needs:
            return {}
        found: dict[str, str | None] = {}
        if any(n not in given for n in needs):
            found = segmentation_taps(model)
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

    # ------------------------------------------------------------------------------------------- metrics
    def build_metrics(self, num_classes: int) -> None:
        ignore = self.ignore_index
        self.val_seg = SegmentationMetrics(num_classes, ignore)
        self.test_seg = SegmentationMetrics(num_classes, ignore)
        self.val_teacher_seg = SegmentationMetrics(num_classes, ignore)
        self.test_teacher_seg = SegmentationMetrics(num_classes, ignore)
        self.val_agree = MeanMetric()
        self.test_agree = MeanMetric()

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if mean is not None and std is not None:
            for teacher in self._teacher:
                teacher.set_input_normalization(mean, std)
        dm_ignore = getattr(datamodule, "ignore_index", None)
        if dm_ignore is not None and dm_ignore != self.ignore_index:
            raise ValueError(
                f"{type(self).__name__}.ignore_index is {self.ignore_index} but the data marks ignored pixels "
                f"with {dm_ignore}"
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
        if not self._student_paths:
            return Outputs(self.student(x))
        logits, feats = self._student_taps(x)
        return Outputs(logits, {name: feats[path] for name, path in self._student_paths.items()})

    def forward_teacher(self, x: Tensor, teacher: Teacher | None = None) -> Outputs | None:
        teacher = teacher if teacher is not None else self.teacher
        if teacher is None:
            return None
        logits, feats = teacher.forward_features(x)
        paths = self._teacher_paths if teacher is self.teacher else getattr(teacher, "tap_names", {})
        return Outputs(logits, {name: feats[path] for name, path in paths.items()})

    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if isinstance(batch, Mapping) and "labelled" in batch:
            batch = batch["labelled"]  # semi-supervised loaders: supervised methods use the labelled part
        return DistillationMethod.unpack_batch(batch)

    # ------------------------------------------------------------------------------------------- losses
    def ce(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(_resize_like(logits, target), target, ignore_index=self.ignore_index)

    def supervised_terms(self, student: Outputs, target: Tensor) -> dict[str, Tensor]:
        terms = {"ce": self.ce(student.logits, target)}
        if self.aux_weight > 0:
            terms["aux"] = self.aux_weight * self.ce(student.features["aux"], target)
        return terms

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.unpack_batch(batch)
        student = self.forward_student(self.student_input(x, y, train=True))
        teacher = self.forward_teacher(self.teacher_input(x, y)) if self.teacher is not None else None
        return self.log_loss_terms(self.loss_terms(student, teacher, y), x.shape[0])

    # ------------------------------------------------------------------------------------------- evaluation
    def _eval_step(self, batch: Any, stage: str) -> dict[str, Tensor]:
        x, y = self.unpack_batch(batch)
        logits = self.student(self.student_input(x, y, train=False))
        bs = x.shape[0]
        (self.val_seg if stage == "val" else self.test_seg).update(logits, y)
        self.log(f"{stage}/loss", self.ce(logits, y), batch_size=bs)
        out = {"logits": logits, "target": y}
        if self.teacher is not None:
            t_logits = self.teacher(self.teacher_input(x, y))
            (self.val_teacher_seg if stage == "val" else self.test_teacher_seg).update(t_logits, y)
            valid = y != self.ignore_index
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

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        return self.supervised_terms(student, target)


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
        self.kd_weight, self.mask_ignore = kd_weight, mask_ignore
        self.kd_loss = PixelKDLoss(temperature, ignore_index=self.ignore_index)

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        terms = self.supervised_terms(student, target)
        kd = self.kd_loss(
            student.features["logits"], teacher.features["logits"], target if self.mask_ignore else None
        )
        terms["kd"] = self.kd_weight * kd
        return terms


class CWD(SegmentationMethod):
    """Channel-wise distillation (Shu et al., ICCV'21): CE + ``cwd_weight``·CWD_τ on the pre-upsampling logits.

    Defaults follow the original code (TorchDistiller SemSeg-distill: τ = 4, weight 3); mmrazor's Cityscapes
    config uses τ = 1 and weight 5 (set them in the config).

    Args:
        temperature: τ of the spatial softmax.
        cwd_weight: weight of the CWD term.
    """

    student_needs = ("logits",)
    teacher_needs = ("logits",)

    def __init__(
        self, student: ModelLike, teacher: TeacherLike, *, temperature: float = 4.0, cwd_weight: float = 3.0, **kwargs: Any
    ) -> None:
        super().__init__(student, teacher, **kwargs)
        self.cwd_weight = cwd_weight
        self.cwd_loss = CWDLoss(temperature)

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        terms = self.supervised_terms(student, target)
        terms["cwd"] = self.cwd_weight * self.cwd_loss(student.features["logits"], teacher.features["logits"])
        return terms


class LADTeacher(SegmentationMethod):
    """LAD stage 1 (arXiv 2407.13254): train a label-assisted teacher with dual-path noised-label input.

    The network takes the image plus one label channel (its stem has ``in_chans + 1`` inputs). Each step noises the
    label twice with fresh random class codes (:class:`~zoo.losses.segmentation.LabelNoiser`) and minimises
    ``Σ_p [CE(o_p, y) + aux_weight·CE(aux_p, y)] + consistency_weight·[CWD_τ(o₁ → sg o₂) + CWD_τ(o₂ → sg o₁)]`` on
    the pre-upsampling logits, as ``train_baseline.py::train_teacher`` of the official code.

    Evaluation feeds the label channel as distillation does (``eval_label="fixed"``: codes (k − 11)/10); ``random``
    uses fresh codes, ``zero`` an all-zero channel (the teacher without label assistance).

    Args:
        aux_weight: weight of each path's auxiliary CE (0.4 in the code; needs an ``aux`` tap).
        consistency_weight: weight of the symmetric CWD between the paths (5).
        temperature: τ of that CWD (4).
        dual_path: two noised paths with the consistency term; ``False`` trains one path (the ablation).
        label_scale: the factor on the label channel: 100 in the code, whose images are mean-subtracted BGR
            without std division (about ±128); with std-normalised images use 1–2 (the digit configs use 1).
        noise_std, fixed_noise_std: pixel noise of the random and fixed codes.
        eval_label: the label channel used at evaluation.
    """

    requires_teacher = False
    student_needs = ("logits",)

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike | None = None,
        *,
        aux_weight: float = 0.4,
        consistency_weight: float = 5.0,
        temperature: float = 4.0,
        dual_path: bool = True,
        label_scale: float = 100.0,
        noise_std: float = 0.03,
        fixed_noise_std: float = 0.02,
        eval_label: Literal["fixed", "random", "zero"] = "fixed",
        **kwargs: Any,
    ) -> None:
        if teacher is not None:
            raise ValueError("LADTeacher trains the label-assisted teacher itself; it takes no teacher")
        super().__init__(student, None, aux_weight=aux_weight, **kwargs)
        self.consistency_weight, self.dual_path, self.eval_label = consistency_weight, dual_path, eval_label
        self.noiser = LabelNoiser(
            self.num_classes,
            ignore_index=self.ignore_index,
            noise_std=noise_std,
            fixed_noise_std=fixed_noise_std,
            scale=label_scale,
        )
        self.cwd_loss = CWDLoss(temperature)

    def student_in_chans(self, in_chans: int | None) -> int | None:
        return (in_chans or 3) + 1

    def student_input(self, x: Tensor, y: Tensor | None, train: bool) -> Tensor:
        mode = "random" if train else self.eval_label
        if y is None or mode == "zero":
            channel = x.new_zeros(x.shape[0], 1, *x.shape[-2:])
        else:
            channel = self.noiser(y, fixed=mode == "fixed").to(x.dtype)
        return torch.cat([x, channel], 1)

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        return self.supervised_terms(student, target)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.unpack_batch(batch)
        paths = [self.forward_student(self.student_input(x, y, train=True)) for _ in range(2 if self.dual_path else 1)]
        terms: dict[str, Tensor] = {}
        for out in paths:
            for name, value in self.supervised_terms(out, y).items():
                terms[name] = terms[name] + value if name in terms else value
        if self.dual_path and self.consistency_weight > 0:
            o1, o2 = (p.features["logits"] for p in paths)
            cwd = self.cwd_loss(o1, o2.detach()) + self.cwd_loss(o2, o1.detach())
            terms["consistency"] = self.consistency_weight * cwd
        return self.log_loss_terms(terms, x.shape[0])


class LAD(SegmentationMethod):
    """LAD stage 2: distil an RGB student from the label-assisted teacher (arXiv 2407.13254).

    The teacher receives the image plus the label channel with fixed class codes (k − 11)/10 and noise std 0.02,
    scaled by ``label_scale``; the student receives the image only (the code's x ⊕ 0 through a 4-channel stem is
    the same network). Loss, as ``train_baseline.py`` (student branch):
    ``CE(o_S, y) + aux_weight·CE(aux_S, y) + cwd_weight·CWD_τ(o_S, o_T)`` on the pre-upsampling logits. The code's
    pixel KL and DIST terms are commented out and not offered.

    Args:
        aux_weight: weight of the student's auxiliary CE (0.02 in the code; needs an ``aux`` tap, else set 0).
        cwd_weight, temperature: weight and τ of CWD (3 and 4).
        label_scale, fixed_noise_std: as the teacher was trained with (see :class:`LADTeacher`).
    """

    student_needs = ("logits",)
    teacher_needs = ("logits",)

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        *,
        aux_weight: float = 0.02,
        cwd_weight: float = 3.0,
        temperature: float = 4.0,
        label_scale: float = 100.0,
        fixed_noise_std: float = 0.02,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, aux_weight=aux_weight, **kwargs)
        self.cwd_weight = cwd_weight
        self.cwd_loss = CWDLoss(temperature)
        self.noiser = LabelNoiser(
            self.num_classes, ignore_index=self.ignore_index, fixed_noise_std=fixed_noise_std, scale=label_scale
        )

    def teacher_in_chans(self, in_chans: int | None) -> int | None:
        return (in_chans or 3) + 1

    def teacher_input(self, x: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            raise ValueError("LAD's teacher needs the labels (it reads them as an input channel)")
        return torch.cat([x, self.noiser(y, fixed=True).to(x.dtype)], 1)

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        terms = self.supervised_terms(student, target)
        terms["cwd"] = self.cwd_weight * self.cwd_loss(student.features["logits"], teacher.features["logits"])
        return terms


class MGD(SegmentationMethod):
    """Multi-granularity distillation for semi-supervised segmentation (MGD, ECCV'22; JayQine/MGD-SSSS).

    Two complementary frozen teachers: ``teacher`` (deep; image-level semantic loss) and ``wide_teacher`` (wide;
    region-level content loss on its decoder feature). Each step takes a labelled batch (x, y) and two unlabelled
    batches u₀, u₁ (``semi_supervised`` data), mixes ū = u₀(1−m) + u₁m with CutMix boxes m, and minimises::

        CE(f_S(x), y)  (OHEM CE with ``sup_loss="ohem"``)          supervised ("sup")
        + pixel_weight·Σ_{k∈W,D} CE(f_S(x), argmax f_k(x))         labelled pixel consistency ("pixel_l")
        + pixel_weight·Σ_{k∈W,D} CE(f_S(ū), argmax[f_k(u₀)(1−m) + f_k(u₁)m])   unlabelled ("pixel_u")
        + semantic_weight·Σ_{n,c} |GAP f_S(ū) − GAP f_D(ū)|        ("semantic")
        + content_weight·mean (A_S − A_W)², A = cosine self-similarity of 7×7-pooled decoder features ("content")

    The code's reverse CE terms (teacher against student pseudo-labels) carry no gradient and are left out.
    Teachers run in eval mode (``teacher_bn="eval"``); the official code leaves their BatchNorm in train mode
    (batch statistics, drifting running statistics): ``teacher_bn="train"`` reproduces that.

    Args:
        wide_teacher: the wide teacher's source.
        semantic_weight, content_weight: λ₁ and λ₂ (0.002 and 100: VOC, R18 student; 0.0005/50 for MBv2,
            0.001/100 for Cityscapes R18).
        pixel_weight: weight of the pixel-level terms (1).
        n_boxes, box_prop_range: CutMix boxes per mask and the area fraction range of each.
        semantic_reduction: ``sum`` over batch and classes as the code, or ``mean``.
        teacher_bn: ``eval`` (frozen statistics) or ``train`` (the official code's behaviour).
        sup_loss: ``ce`` (the VOC scripts) or ``ohem`` (:class:`~zoo.losses.OhemCrossEntropy`, the Cityscapes
            scripts: thresh 0.7, min_kept 50 000 × the per-GPU batch); only the supervised term changes.
        ohem_thresh, ohem_min_kept: the OHEM threshold and minimum of kept pixels per device batch.
    """

    student_needs = ("features",)

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        wide_teacher: ModelLike,
        *,
        semantic_weight: float = 0.002,
        content_weight: float = 100.0,
        pixel_weight: float = 1.0,
        n_boxes: int = 3,
        box_prop_range: tuple[float, float] = (0.25, 0.5),
        semantic_reduction: Literal["sum", "mean"] = "sum",
        teacher_bn: Literal["eval", "train"] = "eval",
        wide_teacher_paths: dict[str, str] | None = None,
        sup_loss: Literal["ce", "ohem"] = "ce",
        ohem_thresh: float = 0.7,
        ohem_min_kept: int = 100_000,
        **kwargs: Any,
    ) -> None:
        if sup_loss not in ("ce", "ohem"):
            raise ValueError(f"MGD.sup_loss must be 'ce' or 'ohem', got {sup_loss!r}")
        super().__init__(student, teacher, **kwargs)
        if isinstance(wide_teacher, nn.Module):
            self.hparams.pop("wide_teacher", None)
        else:
            self.hparams["wide_teacher"] = _as_config(wide_teacher)
        wide = Teacher.from_sources(wide_teacher, num_classes=self.num_classes, in_chans=kwargs.get("in_chans"))
        tap_names = self._resolve_paths(wide.members[0], wide_teacher_paths, ("features",), "wide_teacher")
        wide.taps = FeatureTaps(wide.members[0], list(tap_names.values()))
        wide.tap_names = tap_names
        self._teacher.append(wide)
        if teacher_bn not in ("eval", "train"):
            raise ValueError(f"MGD.teacher_bn must be 'eval' or 'train', got {teacher_bn!r}")
        self.semantic_weight, self.content_weight, self.pixel_weight = semantic_weight, content_weight, pixel_weight
        self.teacher_bn = teacher_bn
        self.mask_generator = BoxMaskGenerator(n_boxes=n_boxes, prop_range=tuple(box_prop_range))
        self.semantic_loss = MGDSemanticLoss(reduction=semantic_reduction)
        self.content_loss = MGDContentLoss()
        self.ohem = OhemCrossEntropy(ohem_thresh, ohem_min_kept, self.ignore_index) if sup_loss == "ohem" else None

    @property
    def wide_teacher(self) -> Teacher:
        return self._teacher[1]

    def describe(self) -> dict[str, str]:
        out = super().describe()
        out["teacher"] = f"{self.teacher.describe()} + {self.wide_teacher.describe()}"
        return out

    @contextlib.contextmanager
    def _teacher_mode(self) -> Iterator[None]:
        if self.teacher_bn == "eval":
            yield
            return
        norms = [m for t in self._teacher for m in t.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.training = True
        try:
            yield
        finally:
            for m in norms:
                m.training = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if not (isinstance(batch, Mapping) and "unlabelled" in batch and "unlabelled_mix" in batch):
            raise ValueError(
                "MGD needs labelled and unlabelled batches: set data.init_args.semi_supervised: true "
                "(with labelled_fraction < 1 or an unlabelled list)"
            )
        x, y = DistillationMethod.unpack_batch(batch["labelled"])
        u0, u1 = batch["unlabelled"][0], batch["unlabelled_mix"][0]
        n = min(len(u0), len(u1))
        u0, u1 = u0[:n], u1[:n]
        mask = self.mask_generator.generate(n, tuple(u0.shape[-2:])).to(u0)
        u_mix = cutmix(u0, u1, mask)
        deep, wide = self.teacher, self.wide_teacher
        with torch.no_grad(), self._teacher_mode():
            d0, d1 = deep(torch.cat([u0, u1])).chunk(2)
            w0, w1 = wide(torch.cat([u0, u1])).chunk(2)
            pseudo_d = cutmix(d0, d1, mask).argmax(1)
            pseudo_w = cutmix(w0, w1, mask).argmax(1)
            label_d, label_w = deep(x).argmax(1), wide(x).argmax(1)
            deep_mix = deep(u_mix)
            wide_mix = self.forward_teacher(u_mix, wide).features["features"]
        s_x = self.forward_student(x)
        s_u = self.forward_student(u_mix)
        logits_x, logits_u = s_x.logits, s_u.logits
        terms = {
            "sup": self.ce(logits_x, y) if self.ohem is None else self.ohem(logits_x, y),
            "pixel_l": self.pixel_weight * (F.cross_entropy(logits_x, label_w) + F.cross_entropy(logits_x, label_d)),
            "pixel_u": self.pixel_weight * (F.cross_entropy(logits_u, pseudo_w) + F.cross_entropy(logits_u, pseudo_d)),
            "semantic": self.semantic_weight * self.semantic_loss(logits_u, deep_mix),
            "content": self.content_weight * self.content_loss(s_u.features["features"], wide_mix),
        }
        return self.log_loss_terms(terms, x.shape[0])
