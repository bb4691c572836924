"""LLaVA-KD's distillation terms (Cai et al., ICCV 2025, arXiv 2410.16236): MDist on response and visual tokens,
RDist on the visual tokens' self-relation.

    L = L_reg + α·L_res + β·L_vis + γ·L_rel      (α = β = γ = 1 in the trainer)

- L_res = mean_{i ∈ R} D(p_T,i ‖ p_S,i), R the shifted response positions (the logits that predict answer tokens);
- L_vis = mean over the visual positions of D(p_T ‖ p_S), *not* shifted (the distributions emitted at the image
  tokens themselves);
- L_rel = 1 − cos(vec Rel_S, vec Rel_T), Rel = Z Zᵀ (K × K) of the raw visual-position logits Z (K × V), the whole
  batch flattened into one vector.

p = softmax(z) (no temperature). Teachers are fixed targets (detached). The models' full logits are read at the
positions a boolean mask gives (see ``zoo.data.vqa``: visual positions are ``input_ids == image_token_id``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.losses.functional import at_least_float32

__all__ = ["DIVERGENCES", "MDistLoss", "RDistLoss", "response_mask", "token_divergence", "visual_spans"]

#: The divergences of the official ``llavakd/utils/distill_loss_utils.py``, with their default λ.
DIVERGENCES: dict[str, float | None] = {
    "forward_kl": None,
    "reverse_kl": None,
    "symmetric_kl": 0.9,
    "js": 0.9,
    "tv": None,
    "skewed_forward_kl": 0.1,
    "skewed_reverse_kl": 0.1,
}


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ_v p (log p − log q), with 0·log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def token_divergence(student_logits: Tensor, teacher_logits: Tensor, kind: str = "forward_kl",
                     lam: float | None = None) -> Tensor:
    """Per-row divergence between teacher and student next-token distributions, shape ``logits.shape[:-1]``.

    With p = softmax(z_T), q = softmax(z_S) and λ (default: :data:`DIVERGENCES`):
        forward_kl KL(p‖q); reverse_kl KL(q‖p); symmetric_kl (1−λ)·KL(p‖q) + λ·KL(q‖p);
        js λ·KL(q‖m) + (1−λ)·KL(p‖m), m = (1−λ)p + λq; tv ½Σ|p−q|;
        skewed_forward_kl KL(p‖λp + (1−λ)q); skewed_reverse_kl KL(q‖(1−λ)p + λq).
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence: unknown {kind!r}; expected one of {sorted(DIVERGENCES)}")
    lam = DIVERGENCES[kind] if lam is None else lam
    log_q = F.log_softmax(at_least_float32(student_logits), -1)
    log_p = F.log_softmax(at_least_float32(teacher_logits).detach(), -1)
    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    if kind == "symmetric_kl":
        return (1 - lam) * _kl(log_p, log_q) + lam * _kl(log_q, log_p)
    if kind == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if kind == "js":
        log_m = _log_mix(log_p, 1 - lam, log_q, lam)
        return lam * _kl(log_q, log_m) + (1 - lam) * _kl(log_p, log_m)
    if kind == "skewed_forward_kl":
        return _kl(log_p, _log_mix(log_p, lam, log_q, 1 - lam))
    return _kl(log_q, _log_mix(log_p, 1 - lam, log_q, lam))  # skewed_reverse_kl


def _log_mix(log_a: Tensor, wa: float, log_b: Tensor, wb: float) -> Tensor:
    """log(wa·a + wb·b) from log a and log b."""
    wa_t, wb_t = torch.tensor(wa, dtype=log_a.dtype), torch.tensor(wb, dtype=log_a.dtype)
    return torch.logaddexp(log_a + wa_t.log(), log_b + wb_t.log())


def response_mask(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """(B, L) bool: positions whose logits predict a labelled token (i with labels[i + 1] ≠ ignore), i.e. the shifted
    response positions R of L_reg and L_res.

    Example:
        >>> response_mask(torch.tensor([[-100, -100, 5, 2]])).tolist()
        [[False, True, True, False]]
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


class MDistLoss(nn.Module):
    """LLaVA-KD's multimodal distillation term: the mean over the masked rows of D(p_T ‖ p_S).

        L = (1/|M|) · Σ_{(b,i) ∈ M} D(softmax(z_T[b,i]) ‖ softmax(z_S[b,i]))

    L_res uses M = :func:`response_mask` (shifted response positions), L_vis the visual positions (no shift). The
    divergence D is one of :data:`DIVERGENCES` (:func:`token_divergence`); default forward KL, as the trainer
    (``KLDivLoss(reduction="batchmean")`` over the (|M|, V) rows, i.e. this mean). An empty mask gives 0.

    Notes:
        The official helpers minimise −Σ p_T log p_S (cross-entropy form); this loss reports the true divergence
        (the same student gradient, 0 when student = teacher). λ of the mixed divergences defaults to the official
        values (symmetric 0.9, JS 0.9, skewed 0.1).

    Args:
        divergence: a name of :data:`DIVERGENCES`.
        lam: λ of the mixed divergences (default: the official value).

    Example:
        >>> z = torch.randn(2, 5, 11)
        >>> mask = torch.ones(2, 5, dtype=torch.bool)
        >>> float(MDistLoss()(z, z, mask))
        0.0
    """

    def __init__(self, divergence: str = "forward_kl", lam: float | None = None) -> None:
        super().__init__()
        if divergence not in DIVERGENCES:
            raise ValueError(f"MDistLoss.divergence: unknown {divergence!r}; expected one of {sorted(DIVERGENCES)}")
        self.divergence, self.lam = divergence, lam

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"MDistLoss: student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} differ (same vocabulary and sequence needed)"
            )
        rows_s, rows_t = student_logits[mask], teacher_logits[mask]
        if rows_s.shape[0] == 0:
            return at_least_float32(student_logits).sum() * 0.0
        return token_divergence(rows_s, rows_t, self.divergence, self.lam).mean()


def visual_spans(visual_mask: Tensor) -> list[tuple[int, int, int]]:
    """(sample, start, length) of the visual-token run of each sample that has one; one contiguous run per sample
    (one image per sample, as LLaVA-KD's visual terms require)."""
    spans = []
    for b, row in enumerate(visual_mask):
        idx = torch.nonzero(row, as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        start, length = int(idx[0]), int(idx.numel())
        if int(idx[-1]) - start + 1 != length:
            raise ValueError(f"RDistLoss: sample {b} has visual tokens in more than one run (one image per sample)")
        spans.append((b, start, length))
    return spans


class _ChunkedGram(torch.autograd.Function):
    """Rel = Z Zᵀ over vocabulary chunks: only a (K, chunk) slice of Z is ever copied (to the compute dtype); the
    backward recomputes per chunk, dZ = (G + Gᵀ) Z."""

    @staticmethod
    def forward(ctx, z: Tensor, chunk: int) -> Tensor:  # noqa: ANN001
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        rel = torch.zeros(z.shape[0], z.shape[0], dtype=dtype, device=z.device)
        for start in range(0, z.shape[1], chunk):
            part = z[:, start : start + chunk].to(dtype)
            rel.addmm_(part, part.T)
        ctx.save_for_backward(z)
        ctx.chunk = chunk
        return rel

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        (z,) = ctx.saved_tensors
        sym = grad + grad.T
        out = torch.empty_like(z)
        for start in range(0, z.shape[1], ctx.chunk):
            out[:, start : start + ctx.chunk] = (sym @ z[:, start : start + ctx.chunk].to(sym.dtype)).to(z.dtype)
        return out, None


class RDistLoss(nn.Module):
    """LLaVA-KD's relation distillation: cosine between the student's and teacher's visual self-relation matrices.

        Rel = Z Zᵀ ∈ R^{K×K},  Z = raw logits at the K visual positions of a sample (K × V)
        batch:  L = 1 − cos(concat_b vec Rel_S,b, concat_b vec Rel_T,b)     (the trainer: one vector per batch)
        sample: L = mean_b [1 − cos(vec Rel_S,b, vec Rel_T,b)]

    The logits are read in place (views of the (B, L, V) logits); with ``chunk_size`` the Gram product runs over
    vocabulary chunks in a custom autograd function, so the extra memory is O(K² + K·chunk) rather than a float32
    copy of the (K, V) logits kept for backward. ``chunk_size=None`` is plain autograd (the reference).

    Notes:
        The code hard-codes K = 728 (27² SigLIP patches less one) and a batch of one image per sample; here K is each
        sample's run of visual positions. Raw logits, no temperature, as the trainer.

    Args:
        reduction: ``batch`` (official) or ``sample``.
        chunk_size: vocabulary columns per chunk (``None``: unchunked).

    Example:
        >>> z = torch.randn(2, 6, 50)
        >>> visual = torch.zeros(2, 6, dtype=torch.bool); visual[:, 1:5] = True
        >>> round(float(RDistLoss()(z, z, visual)), 6)
        0.0
    """

    def __init__(self, reduction: Literal["batch", "sample"] = "batch", chunk_size: int | None = 8192) -> None:
        super().__init__()
        if reduction not in ("batch", "sample"):
            raise ValueError(f"RDistLoss.reduction must be 'batch' or 'sample', got {reduction!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"RDistLoss.chunk_size must be ≥ 1 or None, got {chunk_size}")
        self.reduction, self.chunk_size = reduction, chunk_size

    def relation(self, z: Tensor) -> Tensor:
        """Z Zᵀ of one sample's (K, V) logits, in at least float32."""
        if self.chunk_size is None:
            z = at_least_float32(z)
            return z @ z.T
        return _ChunkedGram.apply(z, self.chunk_size)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, visual_mask: Tensor) -> Tensor:
        spans = visual_spans(visual_mask)
        if not spans:
            return at_least_float32(student_logits).sum() * 0.0
        rel_s, rel_t = [], []
        for b, start, k in spans:
            rel_s.append(self.relation(student_logits[b, start : start + k]).reshape(-1))
            with torch.no_grad():
                rel_t.append(self.relation(teacher_logits[b, start : start + k].detach()).reshape(-1))
        if self.reduction == "batch":
            return 1 - F.cosine_similarity(torch.cat(rel_s), torch.cat(rel_t), dim=0)
        return torch.stack([1 - F.cosine_similarity(s, t, dim=0) for s, t in zip(rel_s, rel_t)]).mean()
