"""TRG: knowledge distillation via a token-level relationship graph (Zhang, Liu, He; arXiv 2306.12442).

Tokens are the positions of a feature map (CNN) or the patch tokens of a ViT. The same ``m`` positions are sampled
in every image for teacher and student, giving N = B·m graph nodes, and three terms transfer the teacher's token
relations:

- :class:`TRGLocalLoss`: the k-NN neighbourhoods of the teacher's token graph (Gaussian-kernel edges);
- :class:`TRGGlobalLoss`: the global token topology, as InfoNCE between projected student tokens and teacher
  tokens with a temperature that decays over training;
- :class:`TRGInnerLoss`: the "contextual loss", token-to-token similarity inside each image.

What could be checked, and against what: no official or third-party code was found, and the method section of the
paper could not be read here (only its abstract and the opening of its introduction, on arxiv.org and ar5iv). The
abstract confirms token-level relations, a "contextual loss" for the inner-instance context, and gains on
imbalanced data. The formulas below come from secondary summaries, not from the paper: a paper-summary note in a
public GitHub repository, which writes out L_total, the kernel, L_local, L_global and CS, and this project's spec
(``shared/specs/classification.md`` §5, itself from "a third-party summary"). The two agree except for the order
of the KL arguments in L_local. Everything not in a formula is this module's choice, named as such in the class
docstrings, and each choice is a constructor argument.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TRGGlobalLoss",
    "TRGInnerLoss",
    "TRGLocalLoss",
    "TokenSampler",
    "feature_tokens",
    "gather_tokens",
    "knn_graph",
    "sample_token_positions",
]


# ----------------------------------------------------------------------------------------------- tokens
def feature_tokens(features: Tensor, prefix_tokens: int = 0, grid: int | None = None) -> Tensor:
    """Turns a feature map or a ViT token sequence into tokens ``(B, L, D)``.

    - ``(B, C, H, W)`` (a CNN map, or timm's ``forward_intermediates`` output): one token per location, L = H·W,
      D = C. With ``grid``, the map is first average-pooled to ``grid × grid`` patches (the paper cuts the CNN map
      into fixed-size patches; one token per location is the ``grid=None`` default).
    - ``(B, L', D)`` (a ViT block's output): the first ``prefix_tokens`` (class / register tokens) are dropped. With
      ``grid``, the remaining tokens must form a square and are pooled like a map.

    Example:
        >>> feature_tokens(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 64])
        >>> feature_tokens(torch.randn(2, 65, 192), prefix_tokens=1, grid=4).shape
        torch.Size([2, 16, 192])
    """
    if features.dim() == 3:
        tokens = features[:, prefix_tokens:]
        if grid is None:
            return tokens
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(
                f"feature_tokens: grid={grid} needs a square number of patch tokens, got {tokens.shape[1]} "
                f"(after dropping {prefix_tokens} prefix tokens)"
            )
        features = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    elif features.dim() != 4:
        raise ValueError(f"feature_tokens: expected (B, C, H, W) or (B, L, D) features, got {tuple(features.shape)}")
    if grid is not None:
        features = F.adaptive_avg_pool2d(features, grid)
    return features.flatten(2).transpose(1, 2)


def sample_token_positions(
    batch: int, length: int, m: int, device: torch.device | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """``m`` distinct token positions per image, ``(B, m)``, drawn uniformly with the torch RNG (or ``generator``)."""
    if not 1 <= m <= length:
        raise ValueError(f"sample_token_positions: m must be in [1, {length}] (tokens per image), got {m}")
    return torch.rand(batch, length, device=device, generator=generator).argsort(dim=1)[:, :m]


def gather_tokens(tokens: Tensor, positions: Tensor) -> Tensor:
    """The tokens ``(B, L, D)`` at ``positions`` ``(B, m)``: ``(B, m, D)``."""
    return tokens.gather(1, positions.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class TokenSampler:
    """Samples the same ``m`` token positions of each image from several token tensors (teacher and student).

    Returns the graph nodes, each tensor flattened to ``(B·m, D)`` (image-major: node ``b·m + r`` is the r-th
    sampled token of image b), and the positions ``(B, m)``. ``m=None`` keeps every token.

    Example:
        >>> sampler = TokenSampler(4)
        >>> (s, t), pos = sampler(torch.randn(2, 16, 8), torch.randn(2, 16, 32))
        >>> s.shape, t.shape, pos.shape
        (torch.Size([8, 8]), torch.Size([8, 32]), torch.Size([2, 4]))
    """

    def __init__(self, m: int | None) -> None:
        if m is not None and m < 1:
            raise ValueError(f"TokenSampler.m must be ≥ 1 or None, got {m}")
        self.m = m

    def __call__(self, *tokens: Tensor, generator: torch.Generator | None = None) -> tuple[list[Tensor], Tensor]:
        b, length = tokens[0].shape[:2]
        for t in tokens[1:]:
            if t.shape[:2] != (b, length):
                raise ValueError(
                    f"TokenSampler: all token tensors need the same (B, L), got {tuple(tokens[0].shape[:2])} and "
                    f"{tuple(t.shape[:2])}"
                )
        m = length if self.m is None else self.m
        positions = sample_token_positions(b, length, m, tokens[0].device, generator)
        return [gather_tokens(t, positions).flatten(0, 1) for t in tokens], positions


# ----------------------------------------------------------------------------------------------- graph
def _squared_distances(x: Tensor) -> Tensor:
    # ‖a‖² + ‖b‖² − 2a·b has a smooth gradient everywhere (cdist's square root does not at 0).
    sq = x.pow(2).sum(-1)
    return (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)


def knn_graph(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k nearest neighbours (Euclidean, self excluded) of each row of ``x`` ``(N, D)``.

    Returns the indices ``(N, k)`` (nearest first) and all squared distances ``(N, N)``.
    """
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"knn_graph: k must be in [1, {n - 1}] for {n} nodes, got {k}")
    d2 = _squared_distances(x)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    idx = d2.detach().masked_fill(eye, float("inf")).topk(k, dim=1, largest=False).indices
    return idx, d2


class TRGLocalLoss(nn.Module):
    """TRG's local preserving loss: the student keeps the teacher's k-NN token neighbourhoods.

    On the N = B·m sampled tokens (nodes), the teacher's k-NN graph (Euclidean) has Gaussian-kernel edges

        A_ij = exp(−‖T_i − T_j‖² / (2σ))  for j ∈ kNN(i),  0 otherwise,

    A^S is the same kernel on the student's tokens, and

        L_local = (1/N) · Σ_i KL(softmax_j(A^T_i) ‖ softmax_j(A^S_i)).

    From the paper (via the summaries): the k-NN graph on Euclidean distance, the kernel with 2σ, a KL between
    row-softmaxes of the two adjacency matrices, summed over nodes. The softmax is of the kernel values A themselves
    (not of log A), as the formula is written. Because A ∈ (0, 1], every row distribution is close to uniform and the
    term stays small whatever the student does: on digits (resnet32 layer3 teacher, 512 nodes, k = 8, σ from the
    data) a student whose tokens are the teacher's shuffled scores about 0.009, and a random student about the same;
    ``row_logits="log_affinity"`` raises both to 0.05–0.13.

    Choices (unverified, each an argument):
        - ``sigma="data"`` (default): σ = mean squared k-NN distance of the teacher graph, recomputed per batch and
          used for both graphs. The spec's toy found that a fixed σ = 1 on L2-normalised tokens leaves this term
          near 0 (about 0.01) for the whole run.
        - ``normalize=True``: tokens are L2-normalised before the graph, so teacher and student distances share a
          scale (both in [0, 4]) whatever their widths.
        - ``knn_source="teacher"``: both A^T and A^S use the teacher's neighbour sets (``"own"``: each graph its own
          k-NN, which needs ``support="all"``).
        - ``support="knn"``: the softmax runs over the k neighbours of node i. ``"all"`` takes the summary's
          formula literally: a softmax over all other nodes, with A = 0 (exp(0) = 1 in the softmax) off the graph.
        - ``direction="teacher_student"``: KL(teacher ‖ student), as in Hinton KD. The summary writes the student
          first, but it writes Hinton's KD as KL(p^S ‖ p^T) too, so its order is not evidence;
          ``"student_teacher"`` flips it.
        - ``row_logits="affinity"``: the softmax takes A, as written. ``"log_affinity"`` takes log A =
          −‖·‖²/(2σ) instead (a normalised Gaussian kernel, as in SNE), whose rows are far sharper; with
          ``support="all"`` it is only defined on the k-NN support, so it needs ``support="knn"``.
        - k is capped at N − 1 when a batch has fewer nodes; a single node gives 0.
        - Self-loops are excluded from kNN(i); the node mean (1/N) replaces the paper's sum so the scale does not
          grow with the batch.
        - The teacher's graph (neighbours, σ, A^T) is built under ``no_grad``.

    Example:
        >>> loss = TRGLocalLoss(k=4)
        >>> t = torch.randn(32, 16)
        >>> float(loss(t, t))
        0.0
    """

    def __init__(
        self,
        k: int = 8,
        sigma: float | Literal["data"] = "data",
        normalize: bool = True,
        knn_source: Literal["teacher", "own"] = "teacher",
        support: Literal["knn", "all"] = "knn",
        direction: Literal["teacher_student", "student_teacher"] = "teacher_student",
        row_logits: Literal["affinity", "log_affinity"] = "affinity",
    ) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"TRGLocalLoss.k must be ≥ 1, got {k}")
        if sigma != "data" and not (isinstance(sigma, (int, float)) and sigma > 0):
            raise ValueError(f"TRGLocalLoss.sigma must be 'data' or a positive number, got {sigma!r}")
        if knn_source not in ("teacher", "own"):
            raise ValueError(f"TRGLocalLoss.knn_source must be 'teacher' or 'own', got {knn_source!r}")
        if support not in ("knn", "all"):
            raise ValueError(f"TRGLocalLoss.support must be 'knn' or 'all', got {support!r}")
        if direction not in ("teacher_student", "student_teacher"):
            raise ValueError(
                f"TRGLocalLoss.direction must be 'teacher_student' or 'student_teacher', got {direction!r}"
            )
        if row_logits not in ("affinity", "log_affinity"):
            raise ValueError(f"TRGLocalLoss.row_logits must be 'affinity' or 'log_affinity', got {row_logits!r}")
        if row_logits == "log_affinity" and support == "all":
            raise ValueError("TRGLocalLoss: row_logits='log_affinity' needs support='knn' (log 0 off the graph)")
        if knn_source == "own" and support == "knn":
            raise ValueError(
                "TRGLocalLoss: knn_source='own' gives the two rows different neighbour sets, so the KL needs "
                "support='all' (a softmax over every node)"
            )
        self.k, self.sigma, self.normalize = k, sigma, normalize
        self.knn_source, self.support, self.direction, self.row_logits = knn_source, support, direction, row_logits

    def _prepare(self, x: Tensor) -> Tensor:
        x = x.float()
        return F.normalize(x, dim=-1) if self.normalize else x

    @torch.no_grad()
    def teacher_graph(self, teacher: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The teacher's k-NN indices ``(N, k)``, squared distances ``(N, N)`` and σ (a 0-d tensor)."""
        idx, d2 = knn_graph(self._prepare(teacher), min(self.k, teacher.shape[0] - 1))
        if self.sigma == "data":
            sigma = d2.gather(1, idx).mean().clamp_min(1e-12)
        else:
            sigma = d2.new_tensor(float(self.sigma))
        return idx, d2, sigma

    def _rows(self, d2: Tensor, idx: Tensor, sigma: Tensor) -> Tensor:
        """Row logits of the softmax: the kernel values on the support, ``(N, k)`` or ``(N, N − 1)``."""
        if self.support == "knn":
            log_a = -d2.gather(1, idx) / (2.0 * sigma)
            return log_a if self.row_logits == "log_affinity" else log_a.exp()
        n = d2.shape[0]
        on_graph = torch.zeros_like(d2, dtype=torch.bool).scatter_(1, idx, True)
        a = torch.where(on_graph, torch.exp(-d2 / (2.0 * sigma)), torch.zeros_like(d2))
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=d2.device)
        return a[off_diagonal].view(n, n - 1)  # "all other nodes": drop the self column

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """``student`` ``(N, D_s)`` and ``teacher`` ``(N, D_t)`` tokens of the same N nodes (D_s may differ)."""
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(f"TRGLocalLoss: {student.shape[0]} student nodes vs {teacher.shape[0]} teacher nodes")
        if student.shape[0] < 2:
            return student.sum() * 0.0  # one node has no neighbours
        idx_t, d2_t, sigma = self.teacher_graph(teacher)
        s = self._prepare(student)
        if self.knn_source == "teacher":
            idx_s, d2_s = idx_t, _squared_distances(s)
        else:
            idx_s, d2_s = knn_graph(s, idx_t.shape[1])
        with torch.no_grad():
            log_p_t = F.log_softmax(self._rows(d2_t, idx_t, sigma), dim=1)
        log_p_s = F.log_softmax(self._rows(d2_s, idx_s, sigma), dim=1)
        if self.direction == "teacher_student":
            kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True)
        else:
            kl = F.kl_div(log_p_t, log_p_s, reduction="none", log_target=True)
        return kl.sum(1).mean()


# ----------------------------------------------------------------------------------------------- global
class TRGGlobalLoss(nn.Module):
    """TRG's global topology loss: InfoNCE between student and teacher tokens with a decaying temperature.

        L_global = −(1/N) · Σ_i log [ exp(cos(g_i, T_j=i) / τ_g) / Σ_j exp(cos(g_i, T_j) / τ_g) ]

    where g_i is the linear projection of student token i (the projector belongs to the method, so this loss is
    parameter-free: pass already projected student tokens of the teacher's width), T_j the teacher tokens, and the
    sums run over all N = B·m nodes with j = i the positive.

    From the paper (via the summaries): InfoNCE, cosine similarity after a linear projection of the student, the
    same node as the positive, and a dynamic τ_g, high early (coarse structure) and low late (fine structure).
    Choices (unverified): the schedule, τ_g(p) = τ_start + (τ_end − τ_start)·p for training progress p ∈ [0, 1],
    with τ_start = 0.5 and τ_end = 0.1 (the spec's choice); the node mean (1/N) instead of the sum; one direction
    (student anchors, teacher candidates).

    Example:
        >>> loss = TRGGlobalLoss()
        >>> loss.temperature(0.0), loss.temperature(1.0)
        (0.5, 0.1)
        >>> x = torch.eye(8)
        >>> float(loss(x, x, progress=1.0)) < 0.01
        True
    """

    def __init__(self, tau_start: float = 0.5, tau_end: float = 0.1) -> None:
        super().__init__()
        if tau_start <= 0 or tau_end <= 0:
            raise ValueError(
                f"TRGGlobalLoss: temperatures must be positive, got tau_start={tau_start}, tau_end={tau_end}"
            )
        self.tau_start, self.tau_end = tau_start, tau_end

    def temperature(self, progress: float) -> float:
        """τ_g at training progress ``progress`` (clamped to [0, 1])."""
        p = min(max(float(progress), 0.0), 1.0)
        return (1.0 - p) * self.tau_start + p * self.tau_end

    def forward(self, student: Tensor, teacher: Tensor, progress: float = 0.0) -> Tensor:
        """``student`` ``(N, D)`` (projected) and ``teacher`` ``(N, D)`` tokens of the same N nodes."""
        if student.shape != teacher.shape:
            raise ValueError(
                f"TRGGlobalLoss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} tokens must have "
                "the same shape (project the student tokens to the teacher's width first)"
            )
        s = F.normalize(student.float(), dim=-1)
        t = F.normalize(teacher.float(), dim=-1)
        logits = s @ t.T / self.temperature(progress)
        return F.cross_entropy(logits, torch.arange(s.shape[0], device=s.device))


# ----------------------------------------------------------------------------------------------- inner
class TRGInnerLoss(nn.Module):
    """TRG's contextual (inner-image) loss: the student keeps the teacher's token-to-token similarities per image.

    For each image, with F its token matrix (L × D),

        CS = softmax_row(F·Fᵀ / √D),    L_inner = MSE(CS^T, CS^S),

    the MSE summed over the last dimension (each row is a distribution) and averaged over images and rows. Teacher
    and student need the same tokens per image L but may differ in D (each side scales by its own √D).

    From the paper (via the summaries): the CS formula and the MSE. Choices (unverified): the reduction (the spec's),
    every token of the image rather than the m sampled ones (what :class:`zoo.methods.TRG` passes), and
    ``normalize=False`` (raw features, as the formula is written; ``True`` L2-normalises the tokens first, which
    keeps the softmax from saturating when the feature norms are large). CS^T is computed under ``no_grad``.

    Example:
        >>> loss = TRGInnerLoss()
        >>> t = torch.randn(2, 16, 32)
        >>> float(loss(t, t))
        0.0
    """

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = normalize

    def contextual_similarity(self, tokens: Tensor) -> Tensor:
        """CS = softmax(F·Fᵀ / √D) of tokens ``(B, L, D)``: ``(B, L, L)``, rows sum to 1."""
        f = tokens.float()
        if self.normalize:
            f = F.normalize(f, dim=-1)
        return torch.softmax(f @ f.transpose(1, 2) / math.sqrt(f.shape[-1]), dim=-1)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """``student`` ``(B, L, D_s)`` and ``teacher`` ``(B, L, D_t)`` tokens."""
        if student.shape[:2] != teacher.shape[:2]:
            raise ValueError(
                f"TRGInnerLoss: student tokens {tuple(student.shape[:2])} and teacher tokens "
                f"{tuple(teacher.shape[:2])} must agree in (B, L)"
            )
        with torch.no_grad():
            cs_t = self.contextual_similarity(teacher)
        cs_s = self.contextual_similarity(student)
        return (cs_t - cs_s).pow(2).sum(-1).mean()
