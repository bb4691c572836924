"""Token-feature distillation for masked-image students: DMAE, G2SD's generic decoder loss and Hybrid Distill.

All three distil ViT token sequences (B, T, C), where token 0 is CLS when the model has one. Teachers are fixed
targets: every loss detaches them, as the official codes do (DMAE ``feature_teacher.detach()``; G2SD freezes the
teacher's parameters). Losses carry no weight; the methods multiply by theirs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.losses.functional import at_least_float32
from zoo.losses.trg import gather_tokens

__all__ = [
    "DMAEFeatLoss",
    "G2SDDecoderLoss",
    "HybridFeatureLoss",
    "HybridRelationLoss",
    "ProgressiveMaskSchedule",
    "attention_logits",
    "keep_with_cls",
    "ln0",
    "masked_relations",
    "redundant_token_keep",
]


def _check_tokens(name: str, student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 3 or teacher.dim() != 3:
        raise ValueError(
            f"{name}: expected (B, T, C) student and teacher tokens, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must agree in batch and tokens"
        )


def ln0(x: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm without affine parameters over the last dim: (x − mean) / √(var + eps), biased variance.

    The target whitening of G2SD (``nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)`` in the official
    ``G2SD/engine_distill.py``) and of FD (arXiv 2205.14141, which uses PyTorch's default eps 1e-5).

    Example:
        >>> ln0(torch.tensor([[1.0, 2.0, 3.0]]), eps=0.0)
        tensor([[-1.2247,  0.0000,  1.2247]])
    """
    return F.layer_norm(x, x.shape[-1:], eps=eps)


# ---------------------------------------------------------------------------------------------------------------
# DMAE
# ---------------------------------------------------------------------------------------------------------------


class DMAEFeatLoss(nn.Module):
    """DMAE's feature alignment: L1 between L2-normalised teacher tokens and projected student tokens.

        L = (1/(B·T·C_T)) · Σ_{b,t,c} | n(h_T)[b,t,c] − n(g(h_S))[b,t,c] |,   n(v) = v / ‖v‖₂ per token

    h_S and h_T are the raw outputs (before the final LayerNorm) of one student and one teacher block over the same
    tokens [CLS; visible], CLS included, and g projects C_S → C_T. The element mean over unit vectors makes the
    values small (about 1/√C_T per element), as in the official code. Paper: Bai et al., "Masked Autoencoders Enable
    Efficient Knowledge Distillers", CVPR 2023, arXiv 2208.12256.

    Args:
        student_dim: C_S.
        teacher_dim: C_T.
        projection: g, as the official ``models_mae_distill.py`` (UCSC-VLAA/DMAE) builds it: ``"fc-1layer"``
            Linear(C_S, C_T) (default, the released ``pretrain.sh``); ``"mlp-1layer"`` Linear(C_S, C_T) − GELU −
            Linear(C_T, C_T); ``"mlp-2layer"`` two such MLPs in sequence, with no activation between them.
        distance: ``"l1"`` (default) or ``"l2"``, the mean of squares (``nn.MSELoss`` in the official code).

    Notes:
        The official heads are built after the model's xavier initialisation, so they keep PyTorch's default
        ``nn.Linear`` init, as here; the optional dropout of ``mlp-1layer`` (0 there) is left out. The official
        ``mlp-2layer`` takes its input width from an undefined name and never ran; here it is C_S, the only width
        that fits.

    Example:
        >>> loss = DMAEFeatLoss(8, 16)
        >>> h_s, h_t = torch.randn(2, 5, 8), torch.randn(2, 5, 16)
        >>> loss(h_s, h_t).shape
        torch.Size([])
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        projection: Literal["fc-1layer", "mlp-1layer", "mlp-2layer"] = "fc-1layer",
        distance: Literal["l1", "l2"] = "l1",
    ) -> None:
        super().__init__()
        if distance not in ("l1", "l2"):
            raise ValueError(f"DMAEFeatLoss.distance must be 'l1' or 'l2', got {distance!r}")
        self.distance = distance
        self.projection_mode = projection
        c_s, c_t = student_dim, teacher_dim
        if projection == "fc-1layer":
            self.projection: nn.Module = nn.Linear(c_s, c_t)
        elif projection == "mlp-1layer":
            self.projection = _mlp(c_s, c_t, c_t)
        elif projection == "mlp-2layer":
            self.projection = nn.Sequential(_mlp(c_s, c_t, c_t), _mlp(c_t, c_t, c_t))
        else:
            raise ValueError(
                f"DMAEFeatLoss.projection must be 'fc-1layer', 'mlp-1layer' or 'mlp-2layer', got {projection!r}"
            )

    def forward(self, student_tokens: Tensor, teacher_tokens: Tensor) -> Tensor:
        _check_tokens("DMAEFeatLoss", student_tokens, teacher_tokens)
        s = F.normalize(at_least_float32(self.projection(student_tokens)), dim=-1)
        t = F.normalize(at_least_float32(teacher_tokens.detach()), dim=-1)
        if self.distance == "l1":
            return F.l1_loss(s, t)
        return F.mse_loss(s, t)


def _mlp(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, hidden), nn.GELU(), nn.Linear(hidden, c_out))


# ---------------------------------------------------------------------------------------------------------------
# G2SD
# ---------------------------------------------------------------------------------------------------------------


class G2SDDecoderLoss(nn.Module):
    """G2SD's generic distillation: the student's decoder predicts the teacher's intermediate decoder states.

        L = mean_{b, t ∈ S, c} SL1_β(φ(H_S)[b,t,c], LN0(H_T)[b,t,c]),   SL1_β(d) = 0.5·d²/β if |d| < β else |d| − β/2

    with φ = Linear(C_S, hidden) − GELU − Linear(hidden, C_T), H_S the student's full decoder output and H_T the
    teacher decoder's hidden states after its first k blocks (neither through the decoder norm), both (B, T, ·) over
    the unshuffled sequence [CLS; patches]. Paper: Huang et al., "Generic-to-Specific Distillation of Masked
    Autoencoders", CVPR 2023, arXiv 2302.14771.

    Defaults from the official code (pengzhiliang/G2SD, ``G2SD/models_mae.py``, ``main_distill.py``, ``GD.sh``):
    hidden = C_T, β = 2, LN0 eps 1e-6, and S = every token (``supervise_all=True``); ``supervise_all=False``
    keeps only the masked patches (CLS never counts). φ gets xavier-uniform weights and zero biases, as the official
    head gets from the model's init pass. The official encoder-feature branch is multiplied by 0 and is left out.

    ``forward(student_tokens, teacher_tokens, mask)``: ``mask`` marks masked patches with 1, as MAE returns it,
    (B, T−1) after a leading CLS or (B, T) per token; it is needed only with ``supervise_all=False``, and a batch
    without a masked token gives 0 (the official mean would be NaN).

    Example:
        >>> loss = G2SDDecoderLoss(8, 16)
        >>> h_s, h_t = torch.randn(2, 5, 8), torch.randn(2, 5, 16)
        >>> loss(h_s, h_t).shape
        torch.Size([])
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        hidden: int | None = None,
        beta: float = 2.0,
        supervise_all: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"G2SDDecoderLoss.beta must be positive, got {beta}")
        self.beta = beta
        self.supervise_all = supervise_all
        self.eps = eps
        self.head = _mlp(student_dim, hidden or teacher_dim, teacher_dim)
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, student_tokens: Tensor, teacher_tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        _check_tokens("G2SDDecoderLoss", student_tokens, teacher_tokens)
        pred = at_least_float32(self.head(student_tokens))
        target = ln0(at_least_float32(teacher_tokens.detach()), self.eps)
        if self.supervise_all:
            return F.smooth_l1_loss(pred, target, beta=self.beta)
        if mask is None:
            raise ValueError("G2SDDecoderLoss: supervise_all=False needs the MAE mask (1 = masked patch)")
        selected = self._token_mask(mask, student_tokens.shape[:2])
        if not selected.any():
            return pred.sum() * 0.0
        return F.smooth_l1_loss(pred[selected], target[selected], beta=self.beta)

    @staticmethod
    def _token_mask(mask: Tensor, shape: torch.Size) -> Tensor:
        b, t = shape
        mask = mask.bool()
        if mask.shape == (b, t - 1):
            return torch.cat([mask.new_zeros(b, 1), mask], dim=1)
        if mask.shape == (b, t):
            return mask
        raise ValueError(f"G2SDDecoderLoss: mask must be (B, T-1) = {(b, t - 1)} or (B, T), got {tuple(mask.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# Hybrid Distill
# ---------------------------------------------------------------------------------------------------------------


def attention_logits(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """Pre-softmax attention q·kᵀ·scale of (B, H, T, d) queries and keys: (B, H, T, T); scale defaults to 1/√d.

    Example:
        >>> attention_logits(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)).shape
        torch.Size([2, 3, 5, 5])
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return (q @ k.transpose(-2, -1)) * scale


def keep_with_cls(patch_keep: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Token indices [0, …, P−1, patch_keep + P] for a sequence with P prefix tokens (CLS) before the patches.

    ``redundant_token_keep`` and MAE's ``ids_keep`` index patches; the relation and feature losses index the full
    token sequence. The prefix tokens come first and are always kept, the patches follow in ``patch_keep`` order,
    which must be the order of the student's own sequence.

    Example:
        >>> keep_with_cls(torch.tensor([[3, 0]]))
        tensor([[0, 4, 1]])
    """
    prefix = torch.arange(num_prefix_tokens, device=patch_keep.device, dtype=patch_keep.dtype)
    return torch.cat([prefix.expand(patch_keep.shape[0], -1), patch_keep + num_prefix_tokens], dim=1)


def _masked_log_relations(logits: Tensor, keep: Tensor) -> Tensor:
    b, h, t, _ = logits.shape
    if keep.dim() != 2 or keep.shape[0] != b:
        raise ValueError(f"keep must be (B, K) token indices with B = {b}, got {tuple(keep.shape)}")
    k = keep.shape[1]
    rows = logits.gather(2, keep[:, None, :, None].expand(b, h, k, t))
    kept = rows.gather(3, keep[:, None, None, :].expand(b, h, k, k))
    return F.log_softmax(at_least_float32(kept), dim=-1)


def masked_relations(logits: Tensor, keep: Tensor) -> Tensor:
    """Token relations restricted to the kept tokens: softmax over the kept columns of the kept rows.

    ``logits`` (B, H, T, T) are pre-softmax attention scores on the full sequence (``attention_logits``); ``keep``
    (B, K) are token indices into it (use ``keep_with_cls`` to keep CLS at index 0). Returns (B, H, K, K), each row
    summing to 1: R[b, h, i, j] = exp(A[b, h, keep_i, keep_j]) / Σ_{j'} exp(A[b, h, keep_i, keep_j']). With every
    token kept in order it is softmax(logits). Hybrid Distill has no official code; this masked softmax is this
    module's reading of it: the teacher's relations are what its attention would be among the tokens the student
    sees.

    Example:
        >>> masked_relations(torch.zeros(1, 1, 4, 4), torch.tensor([[0, 2]]))
        tensor([[[[0.5000, 0.5000],
                  [0.5000, 0.5000]]]])
    """
    return _masked_log_relations(logits, keep).exp()


def _log_mean_heads(log_p: Tensor, groups: int) -> Tensor:
    """log of the head-average of the relations, within ``groups`` contiguous groups of heads: (B, groups, K, K)."""
    b, h = log_p.shape[:2]
    grouped = log_p.reshape(b, groups, h // groups, *log_p.shape[2:])
    return torch.logsumexp(grouped, dim=2) - math.log(h // groups)


class HybridRelationLoss(nn.Module):
    """Hybrid Distill's token-relation term: the student's attention relations match the MIM teacher's.

        D_r = 1/(B·H·K) · Σ_{b,h,i} KL(R_T[b,h,i,:] ‖ R_S[b,h,i,:]),
        R_S = softmax(student logits),   R_T = masked_relations(teacher logits, keep)

    for one student layer; the method sums or averages over the distilled layers. The student sees only the K kept
    tokens (logits (B, H_S, K, K), token order = ``keep``); the teacher sees the full image (logits (B, H_T, T, T))
    and is detached. Paper: Shi et al., "Hybrid Distillation: Connecting Masked Autoencoders with Contrastive
    Learners", ICLR 2024, arXiv 2306.15876.

    Args:
        head_reduction: how unequal head counts are compared (equal counts always pair head h with head h).
            ``"mean"``: each side's relations averaged over all its heads (as probabilities, so rows still sum to
            1); ``"match"``: the side with more heads averaged in contiguous groups down to the smaller count, which
            must divide the larger, and the groups paired.

    Notes:
        Hybrid Distill has no official code; the head handling is this module's choice.

    Example:
        >>> loss = HybridRelationLoss()
        >>> t = torch.randn(2, 4, 5, 5)
        >>> keep = torch.tensor([[0, 1, 3], [0, 2, 4]])
        >>> s = masked_relations(t, keep).log()
        >>> abs(float(loss(s, t, keep))) < 1e-6
        True
    """

    def __init__(self, head_reduction: Literal["mean", "match"] = "mean") -> None:
        super().__init__()
        if head_reduction not in ("mean", "match"):
            raise ValueError(f"HybridRelationLoss.head_reduction must be 'mean' or 'match', got {head_reduction!r}")
        self.head_reduction = head_reduction

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, keep: Tensor) -> Tensor:
        if student_logits.dim() != 4 or teacher_logits.dim() != 4:
            raise ValueError(
                "HybridRelationLoss: expected (B, H, K, K) student and (B, H, T, T) teacher logits, got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        k = keep.shape[-1]
        if student_logits.shape[-2:] != (k, k):
            raise ValueError(
                f"HybridRelationLoss: student logits {tuple(student_logits.shape)} must be over the K = {k} kept tokens"
            )
        log_t = _masked_log_relations(teacher_logits.detach(), keep)
        log_s = F.log_softmax(at_least_float32(student_logits), dim=-1)
        h_s, h_t = log_s.shape[1], log_t.shape[1]
        if h_s != h_t:
            if self.head_reduction == "mean":
                log_s, log_t = _log_mean_heads(log_s, 1), _log_mean_heads(log_t, 1)
            else:
                small, large = min(h_s, h_t), max(h_s, h_t)
                if large % small:
                    raise ValueError(
                        f"HybridRelationLoss: head_reduction='match' needs one head count to divide the other, got "
                        f"student {h_s} and teacher {h_t}"
                    )
                log_s, log_t = _log_mean_heads(log_s, small), _log_mean_heads(log_t, small)
        return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1).mean()


class HybridFeatureLoss(nn.Module):
    """Hybrid Distill's feature term: the student's last-layer tokens predict the discriminative teacher's.

        D_f = mean_{b,i,c} SL1_β(h(s)[b,i,c], LN0(t[b, keep_i, :])[c])      (or the mean squared error)

    with h = Linear(C_S, C_T) on the student's last-layer tokens s (B, K, C_S) and the teacher's (CLIP, DeiT)
    last-layer tokens t (B, T, C_T) on the full image, gathered at the ``keep`` (B, K) token indices
    (:func:`keep_with_cls`) and detached. Paper: arXiv 2306.15876. Defaults β = 2, smooth-L1, follow FD
    (arXiv 2205.14141, official ``models/feature_distillation.py``).

    Notes:
        Hybrid Distill has no official code, so its loss form is not verified; this module follows FD: a linear
        head, a LayerNorm-without-affine target, smooth-L1 with β = 2 and a mean reduction. FD's LayerNorm eps is
        PyTorch's 1e-5; :func:`ln0`'s 1e-6 is used here, as in G2SD.

    Example:
        >>> loss = HybridFeatureLoss(8, 16)
        >>> keep = torch.tensor([[0, 2, 3], [0, 1, 4]])
        >>> loss(torch.randn(2, 3, 8), torch.randn(2, 5, 16), keep).shape
        torch.Size([])
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        distance: Literal["smooth_l1", "mse"] = "smooth_l1",
        beta: float = 2.0,
    ) -> None:
        super().__init__()
        if distance not in ("smooth_l1", "mse"):
            raise ValueError(f"HybridFeatureLoss.distance must be 'smooth_l1' or 'mse', got {distance!r}")
        if beta <= 0:
            raise ValueError(f"HybridFeatureLoss.beta must be positive, got {beta}")
        self.distance = distance
        self.beta = beta
        self.head = nn.Linear(student_dim, teacher_dim)

    def forward(self, student_tokens: Tensor, teacher_tokens: Tensor, keep: Tensor) -> Tensor:
        if student_tokens.dim() != 3 or teacher_tokens.dim() != 3 or keep.shape != student_tokens.shape[:2]:
            raise ValueError(
                "HybridFeatureLoss: expected student (B, K, C_S), teacher (B, T, C_T) and keep (B, K), got "
                f"{tuple(student_tokens.shape)}, {tuple(teacher_tokens.shape)} and {tuple(keep.shape)}"
            )
        pred = at_least_float32(self.head(student_tokens))
        target = ln0(at_least_float32(gather_tokens(teacher_tokens.detach(), keep)))
        if self.distance == "smooth_l1":
            return F.smooth_l1_loss(pred, target, beta=self.beta)
        return F.mse_loss(pred, target)


def redundant_token_keep(cls_attention: Tensor, drop_ratio: float) -> Tensor:
    """Indices (B, N − round(drop_ratio·N)) of the most-attended patches, sorted ascending.

    ``cls_attention`` is the discriminative teacher's last-layer CLS→patch attention, (B, H, N) (averaged over heads
    here) or (B, N); for a ViT with CLS first that is ``attn[:, :, 0, 1:]``. The least-attended patches are dropped
    (Hybrid Distill's redundant token masking; the ranking rule is this module's reading of the paper). round() is
    half-up. The indices are patch indices; pass them through :func:`keep_with_cls` for the losses.

    Example:
        >>> redundant_token_keep(torch.tensor([[0.1, 0.4, 0.2, 0.3]]), drop_ratio=0.5)
        tensor([[1, 3]])
    """
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"redundant_token_keep: drop_ratio must be in [0, 1), got {drop_ratio}")
    if cls_attention.dim() == 3:
        cls_attention = cls_attention.mean(1)
    if cls_attention.dim() != 2:
        raise ValueError(
            f"redundant_token_keep: expected (B, H, N) or (B, N) attention, got {tuple(cls_attention.shape)}"
        )
    n = cls_attention.shape[1]
    n_keep = n - math.floor(drop_ratio * n + 0.5)
    if n_keep < 1:
        raise ValueError(f"redundant_token_keep: drop_ratio {drop_ratio} leaves no patch of {n}")
    return cls_attention.topk(n_keep, dim=1).indices.sort(dim=1).values


class ProgressiveMaskSchedule:
    """Stepwise drop ratio for Hybrid Distill's progressive redundant token masking.

    ``schedule(progress)`` with progress = step / total_steps in [0, 1] returns ``ratios[i]`` for the last
    ``milestones[i] ≤ progress`` (0 before the first milestone). The defaults, three equal stages 0 → 0.15 → 0.3,
    are this module's choice: the paper's masking is progressive, but its exact schedule is not known.

    Example:
        >>> s = ProgressiveMaskSchedule()
        >>> s(0.0), s(0.5), s(1.0)
        (0.0, 0.15, 0.3)
    """

    def __init__(
        self,
        milestones: Sequence[float] = (0.0, 0.33, 0.66),
        ratios: Sequence[float] = (0.0, 0.15, 0.3),
    ) -> None:
        milestones, ratios = [float(m) for m in milestones], [float(r) for r in ratios]
        if not milestones or len(milestones) != len(ratios):
            raise ValueError(
                f"ProgressiveMaskSchedule: milestones and ratios must be non-empty and of equal length, got "
                f"{milestones} and {ratios}"
            )
        increasing = all(a < b for a, b in itertools.pairwise(milestones))
        if not increasing or not 0.0 <= milestones[0] <= milestones[-1] <= 1.0:
            raise ValueError(
                f"ProgressiveMaskSchedule.milestones must increase strictly within [0, 1], got {milestones}"
            )
        if any(not 0.0 <= r < 1.0 for r in ratios):
            raise ValueError(f"ProgressiveMaskSchedule.ratios must lie in [0, 1), got {ratios}")
        self.milestones = milestones
        self.ratios = ratios

    def __call__(self, progress: float) -> float:
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"ProgressiveMaskSchedule: progress must be in [0, 1], got {progress}")
        ratio = 0.0
        for milestone, r in zip(self.milestones, self.ratios):
            if progress >= milestone:
                ratio = r
        return ratio

    def __repr__(self) -> str:
        return f"ProgressiveMaskSchedule(milestones={self.milestones}, ratios={self.ratios})"
