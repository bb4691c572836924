"""MGD, multi-granularity distillation for semi-supervised segmentation (Qin et al., ECCV 2022, arXiv 2208.10169;
official code JayQine/MGD-SSSS)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.data.mixing import BoxMaskGenerator, cutmix
from zoo.losses.segmentation import MGDContentLoss, MGDSemanticLoss, OhemCrossEntropy
from zoo.methods.base import ModelLike, TeacherLike
from zoo.methods.segmentation import SegmentationMethod

__all__ = ["MGD"]


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
        if teacher_bn not in ("eval", "train"):
            raise ValueError(f"MGD.teacher_bn must be 'eval' or 'train', got {teacher_bn!r}")
        super().__init__(student, teacher, **kwargs)

    def configure_models(self) -> None:
        super().configure_models()
        self.build_segmentation_teacher("wide_teacher", ("features",), self.hparams.wide_teacher_paths)

    def configure_losses(self) -> None:
        hp = self.hparams
        self.mask_generator = BoxMaskGenerator(n_boxes=hp.n_boxes, prop_range=tuple(hp.box_prop_range))
        self.semantic_loss = MGDSemanticLoss(reduction=hp.semantic_reduction)
        self.content_loss = MGDContentLoss()
        self.ohem = (
            OhemCrossEntropy(hp.ohem_thresh, hp.ohem_min_kept, hp.ignore_index) if hp.sup_loss == "ohem" else None
        )

    @property
    def wide_teacher(self) -> Any:
        return self._teachers["wide_teacher"]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if not (isinstance(batch, Mapping) and "unlabelled" in batch and "unlabelled_mix" in batch):
            raise ValueError(
                "MGD needs labelled and unlabelled batches: set data.init_args.semi_supervised: true "
                "(with labelled_fraction < 1 or an unlabelled list)"
            )
        hp = self.hparams
        x, y = self.unpack_batch(batch["labelled"])
        u0, u1 = batch["unlabelled"][0], batch["unlabelled_mix"][0]
        n = min(len(u0), len(u1))
        u0, u1 = u0[:n], u1[:n]
        mask = self.mask_generator.generate(n, tuple(u0.shape[-2:])).to(u0)
        u_mix = cutmix(u0, u1, mask)
        deep, wide = self.teacher, self.wide_teacher
        with torch.no_grad(), deep.batchnorm_mode(hp.teacher_bn), wide.batchnorm_mode(hp.teacher_bn):
            d0, d1 = deep(torch.cat([u0, u1])).chunk(2)
            w0, w1 = wide(torch.cat([u0, u1])).chunk(2)
            pseudo_d = cutmix(d0, d1, mask).argmax(1)
            pseudo_w = cutmix(w0, w1, mask).argmax(1)
            label_d, label_w = deep(x).argmax(1), wide(x).argmax(1)
            deep_mix = deep(u_mix)
            wide_mix = self.forward_teacher(u_mix, "wide_teacher").features["features"]
        s_x = self.forward_student(x)
        s_u = self.forward_student(u_mix)
        logits_x, logits_u = s_x.logits, s_u.logits
        w = hp.pixel_weight
        terms = {
            "sup": self.ce(logits_x, y) if self.ohem is None else self.ohem(logits_x, y),
            "pixel_l": w * (F.cross_entropy(logits_x, label_w) + F.cross_entropy(logits_x, label_d)),
            "pixel_u": w * (F.cross_entropy(logits_u, pseudo_w) + F.cross_entropy(logits_u, pseudo_d)),
            "semantic": hp.semantic_weight * self.semantic_loss(logits_u, deep_mix),
            "content": hp.content_weight * self.content_loss(s_u.features["features"], wide_mix),
        }
        return self.log_loss_terms(terms, x.shape[0])
