"""VL2V-ADiP (distillation from a CLIP teacher into an ImageNet-style student) and the contrastive trainer of the
digits CLIP teacher.

The recipe runs one method in two stages, each its own config (``configs/vlm/<data>/vl2v_{align,distill}*.yaml``):
Align trains the linear map P on the frozen backbone, Distill trains the backbone through the frozen P, starting
from the Align run's checkpoint. The ERM baseline is :class:`zoo.methods.Supervised` on the same data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from zoo.losses.vl2v_adip import ClassPromptCLIPLoss, VL2VADiPLoss
from zoo.methods.base import DistillationMethod, ModelLike
from zoo.models.clip import CLIPSpaceStudent, class_text_embeddings, clip_tokenizer
from zoo.models.sources import ModelSource, load_weights, source_from_config
from zoo.step_logging import log_step_values

__all__ = ["CLIPContrastive", "VL2VADiP", "cutmix_box"]

DEFAULT_TEMPLATES = ("a photo of a {}",)


def cutmix_box(
    height: int, width: int, mix: float, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """CutMix's box (rows r0:r1, columns c0:c1) for a kept share ``mix``: sides √(1 − mix) of the image's, centre
    uniform, clipped to the image (so the kept share is then recomputed from the box), as the official CutMix and
    VL2V-ADiP code."""
    cut = math.sqrt(1.0 - mix)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(height, (), generator=generator))
    cx = int(torch.randint(width, (), generator=generator))
    r0, r1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    c0, c1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return r0, r1, c0, c1


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping):
        return batch["image"], batch["label"]
    return batch[0], batch[1]


def _class_names(module: DistillationMethod, num_classes: int) -> list[str]:
    names = module.hparams.get("class_names")
    if names is None and module._trainer is not None:
        names = getattr(getattr(module.trainer, "datamodule", None), "class_names", None)
    if names is None:
        raise ValueError(
            f"{type(module).__name__}.class_names: not given and the data module has no class_names; name the "
            "classes (their words go into the prompts)"
        )
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise ValueError(f"{type(module).__name__}.class_names: {len(names)} names for {num_classes} classes")
    return names


class VL2VADiP(DistillationMethod):
    """VL2V-ADiP: align a student to a CLIP teacher's image and text embeddings, then predict with CLIP's text head.

    The student (:class:`zoo.models.clip.CLIPSpaceStudentModel`) maps its backbone's features g(x) into the teacher's
    space, u = P·g(x) + b, û = u/‖u‖, and is trained with :class:`zoo.losses.vl2v_adip.VL2VADiPLoss`,

        L = −λ · mean cos(û, e_I) − (1 − λ) · mean cos(û, e_y),   λ = 0.5,

    where e_I is the teacher's image embedding of the same augmented batch and e_y the text embedding of the class
    prompt ("a photo of a {class}", ``_`` read as a space; the normalised mean over ``templates``). Prediction:
    logits_c = s·⟨û, e_c⟩ with s = exp(teacher logit scale) = 100 for OpenAI CLIP. Paper: Addepalli et al., CVPR
    2024, arXiv 2310.08255; code ``val-iisc/VL2V-ADiP`` (``DFC_STAGE1``, ``DFC_STAGE2``).

    Stages (two configs of this method):

    - ``align`` (``DFC_STAGE1``): only P trains; the backbone is outside the optimizer and kept in eval mode, so its
      BatchNorm statistics (and dropout) do not change.
    - ``distill`` (``DFC_STAGE2``): only the backbone trains; P is frozen (``requires_grad_(False)``) with the weights
      of ``align_checkpoint`` (P, text head and backbone of the Align run), loaded when a fit starts.

    The class text embeddings and s are computed from the teacher once, at the first fit, and kept in the student
    as buffers: they are saved with every checkpoint, and evaluation and prediction read them, never the teacher
    (``VL2VADiP.load_from_checkpoint(path, teacher=None)`` evaluates without one). Logged: ``train/loss_image``,
    ``train/loss_text``; ``<stage>/acc``, ``<stage>/loss`` (CE of the prediction, SWAD's monitor), and with a
    teacher ``<stage>/teacher_acc`` (zero-shot CLIP), ``<stage>/agreement`` and ``<stage>/cosine`` (mean cos(û, e_I)).

    Args:
        student: a ``CLIPSpaceStudentModel`` source (backbone source and ``embed_dim``) or a ready
            :class:`~zoo.models.clip.CLIPSpaceStudent`.
        teacher: an open_clip model (``zoo.models.clip.OpenCLIPModel`` source, ``zoo.hub.Pretrained`` of one, or a
            module with ``encode_image`` / ``encode_text`` / ``logit_scale``). Needed to train, not to evaluate.
        stage: ``align`` or ``distill``.
        lmd: λ (official ``lmd``, 0.5).
        templates: prompt templates with ``{}`` for the class name (official ``prompt_style=2``: one template).
        class_names: the class words; default: the data module's ``class_names``.
        align_checkpoint: the Align run's checkpoint (required to fit the ``distill`` stage; read at fit setup only).
        freeze_bn: keep the backbone's BatchNorm layers in eval mode while the backbone trains (official
            ``freeze_bn`` true: DomainBed's ResNet freezes them in every stage).
        renormalize_teacher: map the student's normalised batch to the normalisation the teacher's weights expect
            before the teacher reads it. The official code feeds CLIP the student's ImageNet-normalised batch as it is
            (``false``).
        cutmix_beta, cutmix_prob: CutMix (official ``beta``, ``cutmix_prob``; 0 = off, the default): with
            probability ``cutmix_prob`` a batch is mixed with a permutation of itself at a share drawn from
            Beta(β, β); the teacher embeds the mixed images and the text term mixes the two classes' targets.
        **kwargs: :class:`~zoo.methods.base.DistillationMethod` arguments (optimizer, lr_scheduler ...).

    .. warning::
        The official Distill stage loads ``TE<env>_best.pth``, the raw weights at the best training-domain validation
        accuracy of the Align run (saved from step ``model_save`` on), not its SWAD average; the Align configs save
        that checkpoint with ``ModelCheckpoint(monitor="val/acc")``.
    """

    task = "classification"

    requires_teacher: ClassVar[bool] = False  # required by fit (checked there), not by evaluation

    def __init__(
        self,
        student: ModelLike,
        teacher: ModelSource | nn.Module | None = None,
        *,
        stage: Literal["align", "distill"] = "align",
        lmd: float = 0.5,
        templates: list[str] | None = None,
        class_names: list[str] | None = None,
        align_checkpoint: str | None = None,
        freeze_bn: bool = True,
        renormalize_teacher: bool = False,
        cutmix_beta: float = 0.0,
        cutmix_prob: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if stage not in ("align", "distill"):
            raise ValueError(f"VL2VADiP.stage must be 'align' or 'distill', got {stage!r}")
        if cutmix_beta < 0 or not 0.0 <= cutmix_prob <= 1.0:
            raise ValueError(
                f"VL2VADiP: cutmix_beta ({cutmix_beta}) must be ≥ 0 and cutmix_prob ({cutmix_prob}) in [0, 1]"
            )
        super().__init__(student, teacher, **kwargs)

    # ----------------------------------------------------------------------------------------------- hooks
    def configure_models(self) -> None:
        self.student = self.build_student()
        if not isinstance(self.student, CLIPSpaceStudent):
            raise TypeError(
                "VL2VADiP.student: expected a zoo.models.clip.CLIPSpaceStudentModel source (the backbone's source "
                f"and embed_dim) or a CLIPSpaceStudent, got a {type(self.student).__name__}"
            )
        self._teacher_norm: tuple[Any, Any] = (None, None)
        source = self.source("teacher")
        if source is not None:
            if isinstance(source, Mapping):
                source = source_from_config(source)
            if isinstance(source, nn.Module):
                teacher = source
            else:
                teacher = source.build(num_classes=None, in_chans=self.hparams.in_chans)
                self._teacher_norm = (source.mean, source.std)
            if not all(hasattr(teacher, a) for a in ("encode_image", "encode_text", "logit_scale")):
                raise TypeError(
                    f"VL2VADiP.teacher: expected an open_clip model (encode_image, encode_text, logit_scale), got "
                    f"{type(teacher).__name__}; use zoo.models.clip.OpenCLIPModel"
                )
            self.add_teacher("teacher", teacher)
        if self.hparams.stage == "align":
            self.student.backbone.requires_grad_(False)
            self.student.projection.requires_grad_(True)
        else:
            self.student.projection.requires_grad_(False)
        self._input_map: tuple[Tensor, Tensor] | None = None

    def configure_losses(self) -> None:
        self.loss = VL2VADiPLoss(self.hparams.lmd)

    def configure_metrics(self) -> None:
        n = self.student.num_classes
        top1 = MulticlassAccuracy(n, average="micro")
        self.train_metrics = MetricCollection({"acc": top1.clone()}, prefix="train/")
        self.val_metrics = MetricCollection({"acc": top1.clone()}, prefix="val/")
        self.test_metrics = MetricCollection({"acc": top1.clone()}, prefix="test/")
        self.val_teacher, self.test_teacher = top1.clone(), top1.clone()
        self.val_agreement, self.test_agreement = top1.clone(), top1.clone()
        self.val_cosine, self.test_cosine = MeanMetric(), MeanMetric()

    def freeze_modes(self) -> None:
        """Eval mode for what must not change in training: the whole backbone in ``align`` (BatchNorm statistics
        and dropout), its BatchNorm layers in ``distill`` with ``freeze_bn``. Lightning keeps a module's modes as it
        finds them, so this runs at every training epoch start and after every ``train()``."""
        if self.hparams.stage == "align":
            self.student.backbone.eval()
        elif self.hparams.freeze_bn:
            for m in self.student.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def train(self, mode: bool = True) -> VL2VADiP:
        super().train(mode)
        if mode:
            self.freeze_modes()
        return self

    def on_train_epoch_start(self) -> None:
        self.freeze_modes()

    # ----------------------------------------------------------------------------------------------- text head
    def ensure_text_head(self) -> None:
        """Computes the class text embeddings and s from the teacher unless the student already holds them."""
        if self.student.has_text_head:
            return
        if self.teacher is None:
            raise ValueError(
                "VL2VADiP: the student has no text head yet and there is no teacher to compute it; give a teacher or "
                "load a checkpoint of a VL2VADiP run"
            )
        names = _class_names(self, self.student.num_classes)
        templates = self.hparams.templates or list(DEFAULT_TEMPLATES)
        embeddings = class_text_embeddings(self.teacher, names, templates, tokenizer=clip_tokenizer(self.teacher))
        if embeddings.shape[1] != self.student.embed_dim:
            raise ValueError(
                f"VL2VADiP: the teacher embeds in {embeddings.shape[1]} dimensions but the student's P maps to "
                f"{self.student.embed_dim}; set student.init_args.embed_dim to {embeddings.shape[1]}"
            )
        self.student.set_text_head(embeddings, float(self.teacher.logit_scale.exp()))

    def load_align_checkpoint(self) -> None:
        """Loads the Align run's student (backbone, P, text head) from ``align_checkpoint``."""
        load_weights(self.student, self.hparams.align_checkpoint, field="VL2VADiP.align_checkpoint")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # At fit setup, before Lightning restores a resumed run's checkpoint over it; a method loaded from a Distill
        # checkpoint for evaluation never reads the Align file.
        if stage == "fit" and self.hparams.align_checkpoint:
            self.load_align_checkpoint()
        mean, std = self._teacher_norm
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_mean, data_std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if self.hparams.renormalize_teacher and None not in (mean, std, data_mean, data_std):
            # x_teacher = (x·σ_d + μ_d − μ_t) / σ_t
            dm, ds = torch.tensor(data_mean).view(1, -1, 1, 1), torch.tensor(data_std).view(1, -1, 1, 1)
            tm, ts = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
            self._input_map = (ds / ts, (dm - tm) / ts)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.teacher is None:
            raise ValueError("VL2VADiP.teacher is required to train (an OpenCLIPModel source)")
        if self.hparams.stage == "distill" and not self.hparams.align_checkpoint:
            raise ValueError(
                "VL2VADiP(stage='distill') trains the backbone through the frozen P of the Align stage: set "
                "align_checkpoint to the Align run's checkpoint"
            )
        self.ensure_text_head()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self.ensure_text_head()

    def on_test_start(self) -> None:
        super().on_test_start()
        self.ensure_text_head()

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """Class logits s·⟨û, e_c⟩ of the student alone."""
        return self.student(x)

    @torch.no_grad()
    def teacher_embedding(self, x: Tensor) -> Tensor:
        """e_I: the teacher's unit image embedding of the (student-normalised) batch."""
        if self._input_map is not None:
            scale, shift = (t.to(x.device, x.dtype) for t in self._input_map)
            x = x * scale + shift
        return F.normalize(self.teacher.encode_image(x).float(), dim=-1)

    def _cutmix(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None, float]:
        beta, prob = self.hparams.cutmix_beta, self.hparams.cutmix_prob
        if beta <= 0 or float(torch.rand(())) >= prob:
            return x, None, 1.0
        mix = float(torch.distributions.Beta(beta, beta).sample())
        order = torch.randperm(x.shape[0], device=x.device)
        r0, r1, c0, c1 = cutmix_box(x.shape[-2], x.shape[-1], mix)
        mixed = x.clone()
        mixed[..., r0:r1, c0:c1] = x[order][..., r0:r1, c0:c1]
        mix = 1.0 - (r1 - r0) * (c1 - c0) / (x.shape[-2] * x.shape[-1])
        return mixed, y[order], mix

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = _unpack(batch)
        x, y_b, mix = self._cutmix(x, y)
        image = self.teacher_embedding(x)
        u = self.student.embed(x)
        heads = self.student.class_embeddings
        text_b = heads[y_b] if y_b is not None else None
        image_term, text_term = self.loss.parts(u, image, heads[y], text_b, mix)
        loss = self.log_loss_terms({"image": image_term, "text": text_term}, x.shape[0])
        self.train_metrics.update(self.student.classify(u.detach()), y)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    def evaluate(self, batch: Any, stage: Literal["val", "test"], batch_idx: int = 0) -> dict[str, Tensor]:
        x, y = _unpack(batch)
        bs = x.shape[0]
        u = self.student.embed(x)
        logits = self.student.classify(u)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits.float(), y), batch_size=bs)
        self.log_dict(metrics, batch_size=bs, prog_bar=stage == "val")
        if self.teacher is None:
            return {"logits": logits, "target": y}
        image = self.teacher_embedding(x)
        t_logits = self.student.classify(image)
        teacher_acc, agreement, cosine = (
            (self.val_teacher, self.val_agreement, self.val_cosine)
            if stage == "val"
            else (self.test_teacher, self.test_agreement, self.test_cosine)
        )
        teacher_acc.update(t_logits, y)
        agreement.update(logits, t_logits.argmax(1))
        cosine.update((u.float() * image).sum(-1))
        self.log(f"{stage}/teacher_acc", teacher_acc, batch_size=bs)
        self.log(f"{stage}/agreement", agreement, batch_size=bs)
        self.log(f"{stage}/cosine", cosine, batch_size=bs)
        return {"logits": logits, "teacher_logits": t_logits, "target": y}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(-1)

    def describe(self) -> dict[str, str]:
        out = super().describe()
        source = self.source("teacher")
        if isinstance(source, Mapping):
            source = source_from_config(source)
        if isinstance(source, ModelSource):
            out["teacher"] = source.describe()
        return out


class CLIPContrastive(DistillationMethod):
    """Trains an open_clip model contrastively on labelled images with class-prompt captions (no teacher).

    The caption of an image of class c is a prompt ("a photo of a {c}"; one of ``templates`` drawn per batch); the
    loss is :class:`zoo.losses.vl2v_adip.ClassPromptCLIPLoss` (CLIP's symmetric InfoNCE, each distinct prompt once)
    with CLIP's learnt logit scale, clamped to [0, ln 100] after every step as open_clip's trainer does. Validation
    and test report zero-shot top-1 (``<stage>/acc``) with the class text embeddings of the current text tower. This
    is how the shipped digits CLIP teacher of VL2V-ADiP is made (``configs/vlm/digits/clip_teacher.yaml``).

    Args:
        student: the CLIP to train (``zoo.models.clip.OpenCLIPModel``).
        teacher: must be ``None``.
        templates: prompt templates with ``{}`` for the class name.
        class_names: the class words; default: the data module's ``class_names``.
        **kwargs: :class:`~zoo.methods.base.DistillationMethod` arguments.
    """

    task = "vision-language"

    requires_teacher: ClassVar[bool] = False
    summary_keys: ClassVar[tuple[str, str, str, str]] = (
        "val/acc", "val/teacher_acc", "val/agreement", "val zero-shot top-1",
    )

    def __init__(
        self,
        student: ModelLike,
        teacher: None = None,
        *,
        templates: list[str] | None = None,
        class_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if teacher is not None:
            raise ValueError("CLIPContrastive trains a CLIP from image-label pairs and takes no teacher")
        super().__init__(student, None, **kwargs)

    def configure_models(self) -> None:
        source = self.source("student")
        if isinstance(source, Mapping):
            source = source_from_config(source)
        self.student = source if isinstance(source, nn.Module) else source.build(in_chans=self.hparams.in_chans)
        if not all(hasattr(self.student, a) for a in ("encode_image", "encode_text", "logit_scale")):
            raise TypeError(
                f"CLIPContrastive.student: expected an open_clip model, got {type(self.student).__name__}; use "
                "zoo.models.clip.OpenCLIPModel"
            )
        self.num_classes = self.hparams.num_classes
        if self.num_classes is None:
            raise ValueError("CLIPContrastive.num_classes: not given (the CLI links it from the data module)")
        self._zero_shot: Tensor | None = None
        self._tokens: Tensor | None = None

    def configure_losses(self) -> None:
        self.loss = ClassPromptCLIPLoss()

    def configure_metrics(self) -> None:
        top1 = MulticlassAccuracy(self.num_classes, average="micro")
        self.val_metrics = MetricCollection({"acc": top1.clone()}, prefix="val/")
        self.test_metrics = MetricCollection({"acc": top1.clone()}, prefix="test/")

    def _templates(self) -> list[str]:
        return list(self.hparams.templates or DEFAULT_TEMPLATES)

    def prompt_tokens(self) -> Tensor:
        """Tokens of every (template, class) prompt, (T, C, L)."""
        if self._tokens is None:
            names = [n.replace("_", " ") for n in _class_names(self, self.num_classes)]
            tokenizer = clip_tokenizer(self.student)
            self._tokens = torch.stack([tokenizer([t.format(n) for n in names]) for t in self._templates()])
        return self._tokens.to(self.device)

    def zero_shot_weights(self) -> Tensor:
        """The current class text embeddings (C, D), recomputed at every evaluation."""
        if self._zero_shot is None:
            names = _class_names(self, self.num_classes)
            self._zero_shot = class_text_embeddings(
                self.student, names, self._templates(), tokenizer=clip_tokenizer(self.student)
            )
        return self._zero_shot

    def on_validation_epoch_start(self) -> None:
        self._zero_shot = None

    def on_test_epoch_start(self) -> None:
        self._zero_shot = None

    def on_predict_epoch_start(self) -> None:
        self._zero_shot = None

    def forward(self, x: Tensor) -> Tensor:
        """Zero-shot logits exp(logit_scale)·⟨v, e_c⟩."""
        image = F.normalize(self.student.encode_image(x).float(), dim=-1)
        return self.student.logit_scale.exp() * image @ self.zero_shot_weights().t()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = _unpack(batch)
        tokens = self.prompt_tokens()
        template = int(torch.randint(tokens.shape[0], ())) if tokens.shape[0] > 1 else 0
        classes, target = torch.unique(y, return_inverse=True)
        text = F.normalize(self.student.encode_text(tokens[template, classes]).float(), dim=-1)
        image = F.normalize(self.student.encode_image(x).float(), dim=-1)
        loss = self.loss(image, text, target, self.student.logit_scale.exp())
        log_step_values(self, {"train/logit_scale": self.student.logit_scale.exp().detach()}, x.shape[0])
        return self.log_loss_terms({"clip": loss}, x.shape[0])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        with torch.no_grad():
            self.student.logit_scale.clamp_(0, math.log(100))

    def evaluate(self, batch: Any, stage: Literal["val", "test"], batch_idx: int = 0) -> dict[str, Tensor]:
        x, y = _unpack(batch)
        logits = self(x)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), batch_size=x.shape[0])
        self.log_dict(metrics, batch_size=x.shape[0], prog_bar=stage == "val")
        return {"logits": logits, "target": y}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(-1)
