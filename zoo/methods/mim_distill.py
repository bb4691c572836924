"""Masked-image-modelling distillers: DMAE, G2SD (generic and specific stages) and Hybrid Distill.

All pre-training distillers extend :class:`~zoo.methods.mim.MAEPretrain`: one mask per step, shared by the student
and the teachers (``mask.ids_keep`` / ``mask.ids_restore``), and the teachers run only as far as a loss needs
(partial execution: ``forward_encoder(upto=k)``, ``forward_decoder(upto=k)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.losses.feature import (
    DMAEFeatLoss,
    G2SDDecoderLoss,
    HybridFeatureLoss,
    HybridRelationLoss,
    ProgressiveMaskSchedule,
    attention_logits,
    keep_with_cls,
    redundant_token_keep,
)
from zoo.methods.base import ModelLike, Outputs, TeacherLike
from zoo.methods.classification import ClassificationMethod
from zoo.methods.mim import MAEPass, MAEPretrain
from zoo.models.mae import MaskedAutoencoder, PatchMask
from zoo.teacher import Teacher

__all__ = ["DMAE", "G2SDGeneric", "G2SDSpecific", "HybridDistill"]


def _mae_member(teacher: Teacher, owner: str) -> MaskedAutoencoder:
    model = teacher.members[0]
    if not isinstance(model, MaskedAutoencoder):
        raise TypeError(
            f"{owner}.teacher must build a MaskedAutoencoder (zoo.models.MAEModel), got {type(model).__name__}"
        )
    return model


class DMAE(MAEPretrain):
    """DMAE (Bai et al., CVPR'23; UCSC-VLAA/DMAE ``models_mae_distill.py``): MAE pixel loss + feature alignment.

    L = L_rec + feat_weight·mean_{b,t,c} |n(h_T) − n(g(h_S))|, with h_S the raw output of student block
    ``student_block`` and h_T of teacher block ``teacher_block`` (0-based, before the final norm, over [CLS; V]), n the
    per-token L2 normalisation and g a projection (``fc-1layer`` by default). The teacher sees the student's visible
    patches (the same ``ids_keep``) and runs only up to ``teacher_block`` (the official code runs it whole; the
    truncation gives identical values and gradients). The official recipe: ViT-L teacher block 17 → ViT-B student
    block 8, mask ratio 0.75 (0.95 and 0.98 also work), raw-pixel targets (``norm_pix_loss`` off).

    Args:
        teacher: a :class:`~zoo.models.MAEModel` (an MAE pre-trained teacher).
        student_block, teacher_block: k_S and k_T (negative indices count from the end).
        projection, distance: see :class:`~zoo.losses.feature.DMAEFeatLoss`.
        feat_weight: weight of the feature term (1).
    """

    requires_teacher = True

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        *,
        student_block: int = 8,
        teacher_block: int = 17,
        projection: Literal["fc-1layer", "mlp-1layer", "mlp-2layer"] = "fc-1layer",
        distance: Literal["l1", "l2"] = "l1",
        feat_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, **kwargs)

    def configure_losses(self) -> None:
        super().configure_losses()
        hp = self.hparams
        t_mae = _mae_member(self.teacher, type(self).__name__)
        self.student_block = self.student.block_index(hp.student_block, self.student.depth, "student_block")
        self.teacher_block = t_mae.block_index(hp.teacher_block, t_mae.depth, "teacher_block")
        self.student_blocks = (self.student_block,)
        self.feat_loss = DMAEFeatLoss(
            self.student.encoder.embed_dim, t_mae.encoder.embed_dim, hp.projection, hp.distance
        )

    def pretrain_terms(self, x: Tensor, mask: PatchMask, student: MAEPass) -> dict[str, Tensor]:
        terms = super().pretrain_terms(x, mask, student)
        t_mae = self.teacher.members[0]
        with torch.no_grad():
            _, blocks = t_mae.forward_encoder(
                self.teacher.member_input(0, x),
                mask.ids_keep,
                upto=self.teacher_block,
                return_blocks=(self.teacher_block,),
            )
        feat = self.feat_loss(student.blocks[self.student_block], blocks[self.teacher_block])
        terms["feat"] = self.hparams.feat_weight * feat
        return terms


class G2SDGeneric(MAEPretrain):
    """G2SD generic stage (Huang et al., CVPR'23; pengzhiliang/G2SD ``engine_distill.py``): decoder-state distillation.

    The teacher MAE encodes the student's visible patches, then runs only its first ``teacher_decoder_blocks`` decoder
    blocks (no ``decoder_norm``), giving H_T. The student's full decoder output before its norm, H_S, goes through an
    MLP φ; L_GD = mean smooth-L1_{β=2}(φ(H_S), LN0(H_T)) over all tokens (``supervise_all``, the released default;
    ``false`` keeps masked patches only). There is no pixel loss (``rec_weight: 0``); the code's encoder branch has
    weight 0 and is left out.

    Args:
        teacher: a :class:`~zoo.models.MAEModel` (MAE ViT-B in the paper).
        teacher_decoder_blocks: k, decoder blocks of the teacher that run (4 of 8).
        beta, supervise_all: see :class:`~zoo.losses.feature.G2SDDecoderLoss`.
        gd_weight: weight of L_GD (1).
    """

    requires_teacher = True

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        *,
        teacher_decoder_blocks: int = 4,
        beta: float = 2.0,
        supervise_all: bool = True,
        gd_weight: float = 1.0,
        rec_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, rec_weight=rec_weight, **kwargs)

    def configure_losses(self) -> None:
        super().configure_losses()
        hp = self.hparams
        t_mae = _mae_member(self.teacher, type(self).__name__)
        if not 1 <= hp.teacher_decoder_blocks <= t_mae.decoder_depth:
            raise ValueError(
                f"G2SDGeneric.teacher_decoder_blocks must be in [1, {t_mae.decoder_depth}], "
                f"got {hp.teacher_decoder_blocks}"
            )
        s_dim = self.student.decoder_embed.out_features
        t_dim = t_mae.decoder_embed.out_features
        self.gd_loss = G2SDDecoderLoss(s_dim, t_dim, beta=hp.beta, supervise_all=hp.supervise_all)

    def pretrain_terms(self, x: Tensor, mask: PatchMask, student: MAEPass) -> dict[str, Tensor]:
        terms = super().pretrain_terms(x, mask, student)
        t_mae = self.teacher.members[0]
        with torch.no_grad():
            latent, _ = t_mae.forward_encoder(self.teacher.member_input(0, x), mask.ids_keep)
            _, hidden = t_mae.forward_decoder(
                latent, mask.ids_restore, upto=self.hparams.teacher_decoder_blocks, return_hidden=True
            )
        terms["gd"] = self.hparams.gd_weight * self.gd_loss(student.hidden, hidden, mask.mask)
        return terms


class G2SDSpecific(ClassificationMethod):
    """G2SD specific stage for classification: a distillation token and hard-label distillation (DeiT style).

    The student ViT (e.g. :class:`~zoo.models.MAEEncoderModel` initialised from the generic stage, ``global_pool:
    token``) gets a learnable distillation token appended at the *end* of the sequence, without position embedding,
    and a second head on it. L = ½·CE(z_cls, y) + ½·CE(z_dist, argmax z_T), with z_T a fine-tuned teacher's logits on
    the same batch; inference returns (z_cls + z_dist)/2. Mixup/cutmix of the official recipe are not applied here.

    Args:
        student: a timm VisionTransformer source.
        teacher: the fine-tuned teacher (any classifier source).
        label_smoothing: of the CE on the class head.
    """

    def __init__(
        self, student: ModelLike, teacher: TeacherLike, *, label_smoothing: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(student, teacher, **kwargs)

    def configure_models(self) -> None:
        super().configure_models()
        vit = self.student
        for name in ("patch_embed", "_pos_embed", "blocks", "norm", "head"):
            if not hasattr(vit, name):
                raise TypeError(f"G2SDSpecific.student must be a timm VisionTransformer (no {name!r})")
        dim = vit.embed_dim
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        self.dist_head = nn.Linear(dim, self.num_classes)
        nn.init.trunc_normal_(self.dist_head.weight, std=2e-5)
        nn.init.zeros_(self.dist_head.bias)

    def two_heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z_cls, z_dist) of the student with the distillation token appended."""
        vit = self.student
        tokens = vit._pos_embed(vit.patch_embed(x))
        tokens = torch.cat([tokens, self.dist_token.expand(tokens.shape[0], -1, -1)], dim=1)
        tokens = vit.norm_pre(tokens) if hasattr(vit, "norm_pre") else tokens
        tokens = vit.norm(vit.blocks(tokens))
        return vit.head(tokens[:, 0]), self.dist_head(tokens[:, -1])

    def forward(self, x: Tensor) -> Tensor:
        z_cls, z_dist = self.two_heads(x)
        return (z_cls + z_dist) / 2

    def forward_student(self, x: Tensor) -> Outputs:
        z_cls, z_dist = self.two_heads(x)
        return Outputs((z_cls + z_dist) / 2, {"cls": z_cls, "dist": z_dist})

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        ce = self.cross_entropy(student.features["cls"], target)
        dist = F.cross_entropy(student.features["dist"], teacher.logits.argmax(-1))
        return {"ce": 0.5 * ce, "dist": 0.5 * dist}


class _QKVRecorder:
    """Records the q·kᵀ logits of ViT blocks by hooking each block's ``attn.qkv`` Linear (module paths, no rewrite)."""

    def __init__(self, blocks: nn.ModuleList, indices: Sequence[int]) -> None:
        self.store: dict[int, Tensor] = {}
        self.handles = []
        for i in indices:
            attn = blocks[i].attn
            self.handles.append(attn.qkv.register_forward_hook(self._hook(i, attn)))

    def _hook(self, i: int, attn: nn.Module):
        def hook(_module: nn.Module, _args: Any, out: Tensor) -> None:
            b, t, _ = out.shape
            qkv = out.reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = qkv[0], qkv[1]
            q, k = attn.q_norm(q), attn.k_norm(k)
            self.store[i] = attention_logits(q, k, getattr(attn, "scale", None))

        return hook

    def pop(self) -> dict[int, Tensor]:
        out, self.store = self.store, {}
        return out


class HybridDistill(MAEPretrain):
    """Hybrid Distill (Shi et al., ICLR'24, arXiv 2306.15876): a discriminative and an MIM teacher, token masking.

    No official code exists; the structure follows the paper's abstract and reviews, and every unverified choice is
    an option. L = feature_weight·D_f + relation_weight·Σ_{i∈I} D_r:

    - D_f: the student's last-layer tokens (after the final norm) through a linear head against LN0 of the
      discriminative teacher's (``teacher``: DeiT, or CLIP's image tower through timm's ``*_clip_*`` ViTs) final
      tokens, gathered at the kept positions; smooth-L1 (β 2, FD style).
    - D_r: at student blocks I (default: all but the last), KL(teacher ‖ student) between the MIM teacher's
      (``mim_teacher``, an MAE) attention relations softmax(QKᵀ/√d) on the full image, restricted to the kept
      tokens (masked softmax), and the student's on its kept tokens; student block i reads teacher block
      round((i+1)·D_T/D_S) − 1; heads are averaged when their numbers differ.
    - Progressive redundant-token masking: the student sees only the patches the discriminative teacher's
      last-layer CLS attends to most; the dropped fraction follows ``mask_schedule`` over training
      (default 0 → 0.15 → 0.3 at 0 / ⅓ / ⅔ of the steps: our choice). Teachers always see the full image, each
      with its own input normalisation.

    Args:
        teacher: the discriminative teacher T_c (a timm ViT source; its last block's ``attn.qkv`` is hooked).
        mim_teacher: the MIM teacher T_m (a :class:`~zoo.models.MAEModel`).
        feature_weight, relation_weight: α and β (1 and 1, as a reviewer quotes).
        relation_layers: student blocks I (0-based); ``None`` = every block but the last.
        milestones, drop_ratios: the masking schedule (fractions of training and dropped fractions).
        head_reduction: see :class:`~zoo.losses.feature.HybridRelationLoss`.
        relation_reduction: ``sum`` over the layers I (the paper's Σ, default) or ``mean`` (Σ / |I|, a β that does
            not grow with the number of layers).
    """

    requires_teacher = True

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        mim_teacher: ModelLike,
        *,
        feature_weight: float = 1.0,
        relation_weight: float = 1.0,
        relation_layers: list[int] | None = None,
        milestones: list[float] | None = None,
        drop_ratios: list[float] | None = None,
        head_reduction: Literal["mean", "match"] = "mean",
        relation_reduction: Literal["sum", "mean"] = "sum",
        rec_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if relation_reduction not in ("sum", "mean"):
            raise ValueError(f"HybridDistill.relation_reduction must be 'sum' or 'mean', got {relation_reduction!r}")
        kwargs.pop("mask_ratio", None)  # the student's mask comes from the teacher's attention, not a ratio
        super().__init__(student, teacher, rec_weight=rec_weight, mask_ratio=0.0, **kwargs)
        self._tc_tokens: Tensor | None = None

    def configure_models(self) -> None:
        super().configure_models()
        mim = Teacher.from_sources(
            self.source("mim_teacher"), num_classes=self.hparams.num_classes, in_chans=self.hparams.in_chans
        )
        self.add_teacher("mim_teacher", mim)

    def configure_losses(self) -> None:
        super().configure_losses()
        hp = self.hparams
        t_m = _mae_member(self.mim_teacher, "HybridDistill.mim_teacher")
        t_c = self.teacher.members[0]
        if not hasattr(t_c, "blocks") or not hasattr(t_c, "forward_features"):
            raise TypeError("HybridDistill.teacher must be a timm VisionTransformer (DeiT, or a timm CLIP image tower)")
        depth_s, depth_m = self.student.depth, t_m.depth
        layers = list(range(depth_s - 1)) if hp.relation_layers is None else list(hp.relation_layers)
        if any(not 0 <= i < depth_s for i in layers):
            raise ValueError(f"HybridDistill.relation_layers must be in [0, {depth_s}), got {layers}")
        self.relation_layers = layers
        self.teacher_layers = {i: max(0, round((i + 1) * depth_m / depth_s) - 1) for i in layers}
        self.schedule = ProgressiveMaskSchedule(
            hp.milestones if hp.milestones is not None else (0.0, 0.33, 0.66),
            hp.drop_ratios if hp.drop_ratios is not None else (0.0, 0.15, 0.3),
        )
        self.relation_loss = HybridRelationLoss(hp.head_reduction)
        self.feature_loss = HybridFeatureLoss(self.student.encoder.embed_dim, t_c.embed_dim)
        self._student_qkv = _QKVRecorder(self.student.encoder.blocks, layers)
        self._mim_qkv = _QKVRecorder(t_m.encoder.blocks, sorted(set(self.teacher_layers.values())))
        self._tc_qkv = _QKVRecorder(t_c.blocks, [len(t_c.blocks) - 1])

    @property
    def mim_teacher(self) -> Teacher:
        return self._teachers["mim_teacher"]

    def drop_ratio(self) -> float:
        if self._trainer is None or not self.training:
            return 0.0
        total = max(int(self.trainer.estimated_stepping_batches or 1), 1)
        return self.schedule(min(self.global_step / total, 1.0))

    def mask_for(self, x: Tensor, generator: torch.Generator | None = None) -> PatchMask:
        """Runs T_c on the full image, keeps the patches its last-layer CLS attends to most."""
        t_c = self.teacher.members[0]
        with torch.no_grad():
            tokens = t_c.forward_features(self.teacher.member_input(0, x))
        logits = self._tc_qkv.pop()[len(t_c.blocks) - 1]
        prefix = getattr(t_c, "num_prefix_tokens", 1)
        # the CLS row's real attention (softmax over every token, prefix included), then its patch columns: each
        # head's weights keep their own normaliser before the head average, as the attention the teacher applies
        cls_attention = logits[:, :, 0].softmax(-1)[..., prefix:]
        self._tc_tokens = tokens
        n = cls_attention.shape[-1]
        keep = redundant_token_keep(cls_attention, self.drop_ratio())
        dropped_mask = torch.ones(x.shape[0], n, device=x.device)
        dropped_mask.scatter_(1, keep, 0.0)
        order = torch.cat([keep, dropped_mask.argsort(dim=1, stable=True)[:, : n - keep.shape[1]]], dim=1)
        return PatchMask(keep, order.argsort(dim=1), dropped_mask)

    def student_pass(self, x: Tensor, mask: PatchMask) -> MAEPass:
        latent, blocks = self.student.forward_encoder(x, mask.ids_keep, return_blocks=self.student_blocks)
        return MAEPass(mask, latent, blocks)

    def pretrain_terms(self, x: Tensor, mask: PatchMask, student: MAEPass) -> dict[str, Tensor]:
        student_logits = self._student_qkv.pop()
        t_c = self.teacher.members[0]
        t_m = self.mim_teacher.members[0]
        with torch.no_grad():
            t_m.forward_encoder(self.mim_teacher.member_input(0, x), None, upto=max(self.teacher_layers.values()))
        mim_logits = self._mim_qkv.pop()
        keep = keep_with_cls(mask.ids_keep, 1)
        relation = sum(
            self.relation_loss(student_logits[i], mim_logits[self.teacher_layers[i]], keep)
            for i in self.relation_layers
        )
        if self.hparams.relation_reduction == "mean":
            relation = relation / max(len(self.relation_layers), 1)
        tc_keep = keep_with_cls(mask.ids_keep, getattr(t_c, "num_prefix_tokens", 1))[:, -keep.shape[1] :]
        tc_keep = torch.cat([torch.zeros_like(tc_keep[:, :1]), tc_keep[:, 1:]], dim=1)
        feature = self.feature_loss(student.latent, self._tc_tokens, tc_keep)
        return {"feat": self.hparams.feature_weight * feature, "rel": self.hparams.relation_weight * relation}

    def evaluate(self, batch: Any, stage: Literal["val", "test"], batch_idx: int = 0) -> dict[str, Tensor]:
        x = self.images_of(batch)
        mask = self.mask_for(x)
        terms = self.pretrain_terms(x, mask, self.student_pass(x, mask))
        self.log_dict({f"{stage}/loss_{k}": v for k, v in terms.items()}, batch_size=x.shape[0])
        self.log(f"{stage}/loss", torch.stack(list(terms.values())).sum(), batch_size=x.shape[0], prog_bar=True)
        return {}
