"""Masked image modelling: MAE pre-training (the base of DMAE, G2SD and Hybrid Distill), fine-tuning, linear probing.

:class:`MAEPretrain` trains a :class:`~zoo.models.mae.MaskedAutoencoder` (from :class:`~zoo.models.mae.MAEModel`)
on unlabelled images; distillers subclass it and add terms in :meth:`MAEPretrain.pretrain_terms`, reusing the one
mask sampled per step. :class:`FineTune` and :class:`LinearProbe` train the encoder as a timm ViT classifier
(:class:`~zoo.models.mae.MAEEncoderModel`) with MAE's evaluation protocols.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zoo.methods.base import DistillationMethod, ModelLike, TeacherLike
from zoo.methods.classification import Supervised
from zoo.models.mae import MaskedAutoencoder, PatchMask

__all__ = ["FineTune", "LinearProbe", "MAEPass", "MAEPretrain", "layer_decay_param_groups"]


@dataclass
class MAEPass:
    """What one masked pass of an MAE gives the losses.

    Attributes:
        mask: the :class:`~zoo.models.mae.PatchMask` the pass used.
        latent: ``(B, 1 + K, D)`` encoder output over ``[CLS; kept]`` after the final norm.
        blocks: raw (pre-norm) outputs of the requested encoder blocks, ``{index: (B, 1 + K, D)}``.
        hidden: ``(B, 1 + N, D_dec)`` decoder tokens after its last block, before ``decoder_norm``.
        pred: ``(B, N, p²·C)`` predicted pixels.
    """

    mask: PatchMask
    latent: Tensor
    blocks: dict[int, Tensor] = field(default_factory=dict)
    hidden: Tensor | None = None
    pred: Tensor | None = None


class MAEPretrain(DistillationMethod):
    """MAE pre-training (arXiv 2111.06377): L = w_rec · L_rec, the masked-patch pixel MSE of the student's decoder.

    The batch's labels, if any, are ignored. Each step samples one mask (:meth:`mask_for`), runs the student
    once on it (:meth:`student_pass`), and sums :meth:`pretrain_terms`, logged as ``train/loss_<name>``
    (``train/loss_rec`` here) and ``train/loss``. Validation and test run the same terms on masks drawn from a
    fixed seed (``val_seed`` + batch index, so every epoch sees the same masks) and log ``<stage>/loss_<name>``,
    ``<stage>/loss`` and, always, the unweighted reconstruction ``<stage>/loss_rec``; no class metric is kept.

    Distillers subclass it: set :attr:`student_blocks` to get raw encoder block outputs in the pass, and extend
    :meth:`pretrain_terms` (call ``super()`` for the reconstruction term, then add theirs computed from the same
    ``mask``; a teacher MAE gets ``mask.ids_keep``/``mask.ids_restore``). ``rec_weight: 0`` drops the pixel loss
    (G2SD's generic stage).

    Args:
        student: a :class:`~zoo.models.mae.MAEModel` (or a ready ``MaskedAutoencoder``).
        teacher: unused here; subclasses that distil take one.
        mask_ratio: r, the fraction of patches removed (MAE, DMAE and G2SD: 0.75).
        rec_weight: w_rec (1, as MAE and DMAE).
        val_seed: seed of the validation masks.
        **kwargs: the arguments of ``DistillationMethod`` (``optimizer``, ``lr_scheduler`` ...). MAE's recipe
            is AdamW(lr = 1.5e-4·batch/256, betas (0.9, 0.95), weight_decay 0.05) with warm-up and cosine decay.

    ``forward(x)`` returns the encoder's pooled CLS features ``(B, D)`` on the whole image (no masking).
    """

    requires_teacher = False
    task = "masked-image-modelling"
    # FitSummary prints the score ×100 with a % sign; for a loss that reads as "MSE × 100".
    summary_keys = ("val/loss_rec", "val/teacher_loss_rec", "val/agreement", "val MSE×100")
    #: Encoder blocks (0-based) whose raw outputs :meth:`student_pass` returns; distillers set it.
    student_blocks: Sequence[int] = ()

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike | None = None,
        *,
        mask_ratio: float = 0.75,
        rec_weight: float = 1.0,
        val_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"{type(self).__name__}.mask_ratio must be in [0, 1), got {mask_ratio}")
        super().__init__(student, teacher, **kwargs)

    def configure_models(self) -> None:
        super().configure_models()
        if not isinstance(self.student, MaskedAutoencoder):
            raise TypeError(
                f"{type(self).__name__}.student must build a MaskedAutoencoder (zoo.models.mae.MAEModel), "
                f"got {type(self.student).__name__}"
            )

    # ------------------------------------------------------------------------------------------- hooks
    @staticmethod
    def images_of(batch: Any) -> Tensor:
        """The images of a batch (``(x, y)``, ``{"image": x, ...}`` or ``x``); labels are ignored."""
        if isinstance(batch, Tensor):
            return batch
        if isinstance(batch, dict):
            return batch["image"]
        return batch[0]

    def sample_mask(self, batch_size: int, generator: torch.Generator | None = None) -> PatchMask:
        """A random mask over the student's patches at ``mask_ratio``, on the module's device."""
        return self.student.mask(batch_size, self.hparams.mask_ratio, generator=generator)

    def mask_for(self, x: Tensor, generator: torch.Generator | None = None) -> PatchMask:
        """The mask of a batch; random by default (Hybrid Distill's redundancy masking overrides it)."""
        return self.sample_mask(x.shape[0], generator=generator)

    def student_pass(self, x: Tensor, mask: PatchMask) -> MAEPass:
        """The student on the kept patches: encoder (with :attr:`student_blocks`), then the whole decoder."""
        latent, blocks = self.student.forward_encoder(x, mask.ids_keep, return_blocks=self.student_blocks)
        pred, hidden = self.student.forward_decoder(latent, mask.ids_restore, return_hidden=True)
        return MAEPass(mask, latent, blocks, hidden, pred)

    def pretrain_terms(self, x: Tensor, mask: PatchMask, student: MAEPass) -> dict[str, Tensor]:
        """The weighted loss terms of one batch; subclasses extend the dict."""
        terms: dict[str, Tensor] = {}
        if self.hparams.rec_weight:
            terms["rec"] = self.hparams.rec_weight * self.student.reconstruction_loss(x, student.pred, mask.mask)
        return terms

    # ------------------------------------------------------------------------------------------- steps
    def forward(self, x: Tensor) -> Tensor:
        """Pooled encoder features (CLS after the final norm) of whole images."""
        return self.student.encoder(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = self.images_of(batch)
        mask = self.mask_for(x)
        terms = self.pretrain_terms(x, mask, self.student_pass(x, mask))
        if not terms:
            raise RuntimeError(f"{type(self).__name__}: no loss term (rec_weight is 0 and no other term was added)")
        return self.log_loss_terms(terms, x.shape[0])

    def evaluate(self, batch: Any, stage: Literal["val", "test"], batch_idx: int = 0) -> dict[str, Tensor]:
        x = self.images_of(batch)
        # A CPU generator: the same masks whatever the device.
        generator = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        mask = self.mask_for(x, generator=generator)
        student = self.student_pass(x, mask)
        terms = self.pretrain_terms(x, mask, student)
        bs = x.shape[0]
        logs = {f"{stage}/loss_{k}": v for k, v in terms.items() if k != "rec"}
        if terms:
            logs[f"{stage}/loss"] = torch.stack(list(terms.values())).sum()
        if logs:
            self.log_dict(logs, batch_size=bs)
        rec = self.student.reconstruction_loss(x, student.pred, mask.mask)
        self.log(f"{stage}/loss_rec", rec, batch_size=bs, prog_bar=stage == "val")
        return {"pred": student.pred, "mask": mask.mask}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(self.images_of(batch))


# ---------------------------------------------------------------------------------------------- fine-tuning
def _vit_layer_id(name: str, depth: int) -> int:
    """MAE's layer index of a ViT parameter: embeddings 0, block i → i + 1, everything after → depth + 1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token", "dist_token", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_param_groups(
    module: nn.Module,
    vit: nn.Module,
    layer_decay: float | None,
    exclude_from_weight_decay: bool = True,
    prefix: str = "student.",
) -> list[dict[str, Any]]:
    """Parameter groups for layer-wise lr decay (BEiT/MAE ``lr_decay.py``): block i of a depth-L ViT gets
    ``lr_scale = layer_decay^(L + 1 − (i + 1))``, the embeddings ``layer_decay^(L + 1)``, the head 1.

    Groups carry ``lr_scale``; with ``exclude_from_weight_decay`` the 1-D parameters (biases, norms) and the
    ViT's ``no_weight_decay()`` names get ``weight_decay: 0`` (the others keep the optimizer's). Parameters of
    ``module`` outside ``vit`` (found under ``prefix``) count as head parameters.
    """
    depth = len(vit.blocks) if hasattr(vit, "blocks") else None
    if layer_decay is not None and depth is None:
        raise ValueError(f"layer_decay needs a ViT with .blocks, got {type(vit).__name__}")
    skip = set(vit.no_weight_decay()) if exclude_from_weight_decay and hasattr(vit, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        inner = name[len(prefix) :] if name.startswith(prefix) else None
        layer = _vit_layer_id(inner, depth) if inner is not None and depth is not None else (depth or 0) + 1
        no_decay = exclude_from_weight_decay and (param.ndim <= 1 or (inner is not None and inner in skip))
        key = (layer, no_decay)
        if key not in groups:
            scale = 1.0 if layer_decay is None else layer_decay ** ((depth or 0) + 1 - layer)
            groups[key] = {"params": [], "lr_scale": scale}
            if no_decay:
                groups[key]["weight_decay"] = 0.0
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


class FineTune(Supervised):
    """Supervised fine-tuning of a pre-trained encoder (MAE's protocol): CE with label smoothing, optional
    layer-wise lr decay, no weight decay on biases, norms, position embedding and CLS.

    L = CE_ε(z, y). With ``layer_decay`` = d, parameter groups get lr × d^(L+1−l) (l = 0 for the embeddings,
    i + 1 for block i, L + 1 for the head), applied to the optimizer's lr before the scheduler is built, so
    warm-up and cosine schedules keep the ratios (MAE rescales every step; the same for schedules that scale
    multiplicatively, e.g. cosine to 0). MAE's ViT-B recipe: d = 0.65, ε = 0.1, AdamW(lr = 5e-4·batch/256,
    weight_decay 0.05), drop-path 0.1, 100 epochs (mixup/cutmix/RandAug are data-side and not done here).

    Args:
        student: usually a :class:`~zoo.models.mae.MAEEncoderModel`.
        teacher: optional, for agreement only (as :class:`Supervised`).
        label_smoothing: ε.
        layer_decay: d, or ``None`` for one lr.
        exclude_from_weight_decay: weight decay 0 for 1-D parameters, ``pos_embed`` and ``cls_token``.
    """

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike | None = None,
        *,
        label_smoothing: float = 0.0,
        layer_decay: float | None = None,
        exclude_from_weight_decay: bool = True,
        **kwargs: Any,
    ) -> None:
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"FineTune.layer_decay must be in (0, 1], got {layer_decay}")
        super().__init__(student, teacher, label_smoothing=label_smoothing, **kwargs)
        if layer_decay is not None and not hasattr(self.student, "blocks"):
            raise ValueError(
                f"FineTune.layer_decay needs a ViT student with .blocks, got {type(self.student).__name__}"
            )

    def param_groups(self) -> list[dict[str, Any]]:
        decay, exclude = self.hparams.layer_decay, self.hparams.exclude_from_weight_decay
        if decay is None and not exclude:
            return super().param_groups()
        return layer_decay_param_groups(self, self.student, decay, exclude)

    def configure_optimizers(self) -> Any:
        # The optimizer is built without the scheduler, its group lrs scaled, and only then the scheduler made,
        # so that the scheduler's base lrs are the scaled ones.
        scheduler_factory = self.lr_scheduler_factory
        self.lr_scheduler_factory = None
        try:
            optimizer = super().configure_optimizers()
        finally:
            self.lr_scheduler_factory = scheduler_factory
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        if scheduler_factory is None:
            return optimizer
        scheduler = scheduler_factory(optimizer)
        interval = self.hparams.lr_scheduler_interval
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


_HEAD_NAMES = ("head", "fc", "classifier", "linear")


class LinearProbe(Supervised):
    """Linear probing (MAE's protocol): only a linear classifier on frozen features is trained.

    L = CE_ε(W·BN(f(x)) + b, y), where f is the frozen network up to its classifier and BN is a
    ``BatchNorm1d(affine=False, eps=1e-6)`` that MAE puts before the head to standardise the features (it has no
    parameters, only running statistics). The method wraps the student's classifier in place as
    ``Sequential(BN, head)`` (so the student's own forward, evaluation and export all include it; its state-dict
    keys become ``head.0.*``/``head.1.*``; :meth:`folded_head` gives the equivalent single ``nn.Linear``).
    Every other student parameter gets ``requires_grad_(False)`` and the student stays in eval mode during
    training (dropout, drop-path and BatchNorm statistics frozen); only the probe is in train mode. MAE's
    recipe: LARS(lr = 0.1·batch/256, weight_decay 0), 90 epochs, head init N(0, 0.01)
    (``MAEEncoderModel(head_init_std=0.01, global_pool="token")``).

    Args:
        student: a classifier whose head is an ``nn.Linear`` named ``head``/``fc``/``classifier``/``linear``
            (usually a :class:`~zoo.models.mae.MAEEncoderModel`).
        teacher: optional, for agreement only.
        label_smoothing: ε (MAE: 0).
        head_name: the classifier's attribute name, if not found automatically.
    """

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike | None = None,
        *,
        label_smoothing: float = 0.0,
        head_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, label_smoothing=label_smoothing, **kwargs)

    def configure_models(self) -> None:
        super().configure_models()
        head_name = self.hparams.head_name
        name = head_name or next(
            (n for n in _HEAD_NAMES if isinstance(getattr(self.student, n, None), nn.Linear)), None
        )
        head = getattr(self.student, name, None) if name else None
        if not isinstance(head, nn.Linear):
            raise TypeError(
                f"LinearProbe.head_name: {type(self.student).__name__} has no nn.Linear classifier "
                f"{'named ' + repr(head_name) if head_name else 'among ' + str(_HEAD_NAMES)}"
            )
        self.head_name = name
        self.student.requires_grad_(False)
        probe = nn.Sequential(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)
        probe.requires_grad_(True)
        setattr(self.student, name, probe)
        self.train(self.training)

    @property
    def probe(self) -> nn.Sequential:
        """``Sequential(BatchNorm1d(affine=False), head)``: the trained part."""
        return getattr(self.student, self.head_name)

    def train(self, mode: bool = True) -> LinearProbe:
        """Sets the mode; in training only the probe trains, the frozen network stays in eval mode."""
        super().train(mode)
        if mode:
            self.student.eval()
            self.probe.train()
        return self

    @torch.no_grad()
    def folded_head(self) -> nn.Linear:
        """The probe as one ``nn.Linear``, folding the BN's running statistics: W' = W/σ, b' = b − W·μ/σ."""
        norm, head = self.probe[0], self.probe[1]
        inv = (norm.running_var + norm.eps).rsqrt()
        folded = nn.Linear(head.in_features, head.out_features).to(head.weight)
        folded.weight.copy_(head.weight * inv)
        folded.bias.copy_(head.bias - (head.weight * inv) @ norm.running_mean)
        return folded
