"""LAD, "Make a Strong Teacher with Label Assistance" (arXiv 2407.13254): a label-assisted segmentation teacher
(stage 1, :class:`LADTeacher`) and the distillation of an RGB student from it (stage 2, :class:`LAD`)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from zoo.data.transforms import LabelNoiser
from zoo.losses.segmentation import CWDLoss
from zoo.methods.base import ModelLike, Outputs, TeacherLike
from zoo.methods.segmentation import SegmentationMethod

__all__ = ["LAD", "LADTeacher"]


class LADTeacher(SegmentationMethod):
    """LAD stage 1: train a label-assisted teacher with dual-path noised-label input.

    The network takes the image plus one label channel (its stem has ``in_chans + 1`` inputs). Each step noises the
    label twice with fresh random class codes (:class:`~zoo.data.transforms.LabelNoiser`) and minimises
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

    def configure_losses(self) -> None:
        hp = self.hparams
        self.noiser = LabelNoiser(self.num_classes, ignore_index=hp.ignore_index, noise_std=hp.noise_std,
                                  fixed_noise_std=hp.fixed_noise_std, scale=hp.label_scale)
        self.cwd_loss = CWDLoss(hp.temperature)

    def student_in_chans(self) -> int | None:
        return (self.hparams.in_chans or 3) + 1

    def student_input(self, x: Tensor, y: Tensor | None, train: bool) -> Tensor:
        mode = "random" if train else self.hparams.eval_label
        if y is None or mode == "zero":
            channel = x.new_zeros(x.shape[0], 1, *x.shape[-2:])
        else:
            channel = self.noiser(y, fixed=mode == "fixed").to(x.dtype)
        return torch.cat([x, channel], 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.unpack_batch(batch)
        n_paths = 2 if self.hparams.dual_path else 1
        paths = [self.forward_student(self.student_input(x, y, train=True)) for _ in range(n_paths)]
        terms: dict[str, Tensor] = {}
        for out in paths:
            for name, value in self.supervised_terms(out, y).items():
                terms[name] = terms[name] + value if name in terms else value
        if self.hparams.dual_path and self.hparams.consistency_weight > 0:
            o1, o2 = (p.features["logits"] for p in paths)
            cwd = self.cwd_loss(o1, o2.detach()) + self.cwd_loss(o2, o1.detach())
            terms["consistency"] = self.hparams.consistency_weight * cwd
        return self.log_loss_terms(terms, x.shape[0])


class LAD(SegmentationMethod):
    """LAD stage 2: distil an RGB student from the label-assisted teacher.

    The teacher receives the image plus the label channel with fixed class codes (k − 11)/10 and noise std 0.02,
    scaled by ``label_scale``; the student receives the image only (the code's x ⊕ 0 through a 4-channel stem is
    the same network). Loss, as ``train_baseline.py`` (student branch):
    ``CE(o_S, y) + aux_weight·CE(aux_S, y) + cwd_weight·CWD_τ(o_S, o_T)`` on the pre-upsampling logits.

    Notes:
        The official code's pixel KL and DIST terms are commented out there and not offered here.

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

    def configure_losses(self) -> None:
        hp = self.hparams
        self.cwd_loss = CWDLoss(hp.temperature)
        self.noiser = LabelNoiser(self.num_classes, ignore_index=hp.ignore_index,
                                  fixed_noise_std=hp.fixed_noise_std, scale=hp.label_scale)

    def teacher_in_chans(self) -> int | None:
        return (self.hparams.in_chans or 3) + 1

    def teacher_input(self, x: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            raise ValueError("LAD's teacher needs the labels (it reads them as an input channel)")
        return torch.cat([x, self.noiser(y, fixed=True).to(x.dtype)], 1)

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        terms = self.supervised_terms(student, target)
        terms["cwd"] = self.hparams.cwd_weight * self.cwd_loss(student.features["logits"], teacher.features["logits"])
        return terms
