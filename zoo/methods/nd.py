"""KD++ and DKD++: KD or DKD plus the ND loss on the pooled embeddings (arXiv 2305.17007)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

from zoo.io import atomic_path
from zoo.losses import NDLoss, NDProjector
from zoo.methods.base import ModelLike, Outputs, TeacherLike
from zoo.methods.classification import DKD, KD, ClassificationMethod
from zoo.progress import progress
from zoo.teacher import PRE_LOGITS, Teacher, embedding_dim

__all__ = ["DKDND", "KDND", "compute_class_centers"]


@torch.no_grad()
def compute_class_centers(teacher: Teacher, loader, num_classes: int, device: torch.device) -> Tensor:
    """Mean teacher embedding per class over a loader (the official code uses the augmented training set)."""
    sums: Tensor | None = None
    counts = torch.zeros(num_classes, device=device)
    for batch in progress(loader, "ND class centres"):
        x, y = ClassificationMethod.unpack_batch(batch)
        x, y = x.to(device), y.to(device)
        emb = teacher.forward_features(x)[1][PRE_LOGITS].float()
        if sums is None:
            sums = torch.zeros(num_classes, emb.shape[1], device=device)
        sums.index_add_(0, y, emb)
        counts += torch.bincount(y, minlength=num_classes).float()
    if sums is None:
        raise ValueError("ND: the training loader is empty; cannot compute class centres")
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"ND: classes {empty[:10]} have no training images; cannot compute their centres")
    return sums / counts[:, None]


class _NDTerm(ClassificationMethod):
    """The ND term, its projector and the class centres that KD++ and DKD++ add to KD and DKD."""

    student_taps = (PRE_LOGITS,)
    teacher_taps = (PRE_LOGITS,)

    def configure_losses(self) -> None:
        super().configure_losses()
        hp = self.hparams
        if hp.warmup_epochs < 1:
            raise ValueError(f"{type(self).__name__}.warmup_epochs must be ≥ 1, got {hp.warmup_epochs}")
        d_s = embedding_dim(self.student, hp.in_chans)
        d_t = embedding_dim(self.teacher.members[0], hp.in_chans)
        self.projector = NDProjector(d_s, d_t, init=hp.projector_init) if d_s != d_t else nn.Identity()
        self.nd_loss = NDLoss(self.num_classes, d_t)

    def kd_warmup(self) -> float:
        """w(e) = min(1, e / warm) with e counted from 0, as in the official ND scripts (epoch 0 has no KD)."""
        return min(1.0, self.current_epoch / self.hparams.warmup_epochs)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if bool(self.nd_loss.ready):  # restored from a checkpoint
            return
        path = Path(self.hparams.centers_file) if self.hparams.centers_file else None
        if path is not None and path.is_file():
            self.nd_loss.set_centers(self._load_centers(path).to(self.device))
            return
        train = self._train_loader()
        # every training image once (the training loader may drop its last partial batch), with its augmentation
        loader = DataLoader(train.dataset, batch_size=train.batch_size, num_workers=train.num_workers,
                            collate_fn=train.collate_fn)
        centers = compute_class_centers(self.teacher, loader, self.num_classes, self.device)
        self.nd_loss.set_centers(centers)
        if path is None:
            path = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "nd_class_centers.safetensors"
        if self.trainer.is_global_zero:
            with atomic_path(path) as tmp:
                save_file({"centers": centers.detach().cpu().contiguous()}, str(tmp), metadata=self._centers_metadata())

    def _train_loader(self) -> DataLoader:
        datamodule = self.trainer.datamodule
        if datamodule is not None:
            return datamodule.train_dataloader()
        source = getattr(self.trainer.fit_loop, "_data_source", None)  # loaders passed to fit() directly
        loader = source.dataloader() if source is not None and source.is_defined() else None
        if not isinstance(loader, DataLoader):
            raise ValueError(
                f"{type(self).__name__}: computing class centres needs a training DataLoader or centers_file"
            )
        return loader

    def _centers_metadata(self) -> dict[str, str]:
        return {"teacher": self.teacher.describe(), "num_classes": str(self.num_classes)}

    def _load_centers(self, path: Path) -> Tensor:
        with safe_open(str(path), framework="pt") as f:
            meta, centers = f.metadata() or {}, f.get_tensor("centers")
        expected = self._centers_metadata()
        if meta.get("teacher") != expected["teacher"] or tuple(centers.shape) != tuple(self.nd_loss.centers.shape):
            raise ValueError(
                f"{type(self).__name__}.centers_file: {path} holds centres for teacher {meta.get('teacher')!r} "
                f"with shape {tuple(centers.shape)}, but this run's teacher is {expected['teacher']!r} with shape "
                f"{tuple(self.nd_loss.centers.shape)}; delete the file or point centers_file elsewhere"
            )
        return centers

    def nd_term(self, student: Outputs, teacher: Outputs, target: Tensor) -> Tensor:
        g = self.projector(student.features[PRE_LOGITS])
        return self.hparams.nd_weight * self.nd_loss(g, teacher.features[PRE_LOGITS], target)


class KDND(_NDTerm, KD):
    """KD++ (arXiv 2305.17007): L = CE + w(e)·λ_kd·T²·KL(p^T(z^t) ‖ p^T(z^s)) + λ_nd·L_nd.

    w(e) = min(1, e / warm) with epochs counted from 0 (epoch 0 has no KD); the ND term is not warmed up. The class
    centres are computed at fit start from the frozen teacher over the training loader (with its augmentation, as
    the official CIFAR script does) and written to ``centers_file`` (default
    ``<log_dir>/nd_class_centers.safetensors``); an existing ``centers_file`` of the same teacher is loaded instead.
    The projector (BN → Dropout(0.5) → Linear) exists only when the embedding dims differ and feeds only the ND
    term. Defaults: the official CIFAR-100 resnet32x4→resnet8x4 weights (λ_kd 3.5, λ_nd 2), T = 4, warm = 20.
    """

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        *,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        kd_weight: float = 3.5,
        nd_weight: float = 2.0,
        warmup_epochs: int = 20,
        centers_file: str | None = None,
        projector_init: Literal["cifar", "imagenet"] = "cifar",
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, **kwargs)

    def kd_factor(self) -> float:
        return self.kd_warmup() * self.hparams.kd_weight

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        terms = super().loss_terms(student, teacher, target)
        terms["nd"] = self.nd_term(student, teacher, target)
        return terms


class DKDND(_NDTerm, DKD):
    """DKD++ (arXiv 2305.17007): L = CE + w(e)·(α·TCKD + β·NCKD) + λ_nd·L_nd.

    Same warm-up rule, centres and projector as :class:`KDND` (w(e) counts epochs from 0 here, unlike plain DKD's
    mdistiller rule). Defaults: the official CIFAR-100 resnet32x4→resnet8x4 weights (α 2, β 8, λ_nd 0.5), T = 4,
    warm = 20.
    """

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        *,
        temperature: float = 4.0,
        alpha: float = 2.0,
        beta: float = 8.0,
        ce_weight: float = 1.0,
        nd_weight: float = 0.5,
        warmup_epochs: int = 20,
        centers_file: str | None = None,
        projector_init: Literal["cifar", "imagenet"] = "cifar",
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, temperature=temperature, alpha=alpha, beta=beta, ce_weight=ce_weight,
                         warmup_epochs=warmup_epochs, **kwargs)

    def warmup_factor(self) -> float:
        return self.kd_warmup()

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        terms = super().loss_terms(student, teacher, target)
        terms["nd"] = self.nd_term(student, teacher, target)
        return terms
