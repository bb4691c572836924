"""TRG: knowledge distillation via a token-level relationship graph (Zhang, Liu, He; arXiv 2306.12442).

Tokens are the positions of a feature map (CNN) or the patch tokens of a ViT. The same m positions are sampled in
every image for teacher and student, giving N = B·m graph nodes, and three terms transfer the teacher's relations:
:class:`TRGLocalLoss` (k-NN neighbourhoods of the token graph), :class:`TRGGlobalLoss` (InfoNCE over all nodes with
a decaying temperature) and :class:`TRGInnerLoss` (the "contextual loss": token similarities within each image).

.. warning::
    No official code is public, and the formulas here follow a published summary of the paper rather than its
    method section (the abstract confirms token-level relations, a contextual loss and gains on imbalanced data).
    Everything a formula leaves open is this module's choice and a constructor argument, named in each class's
    Notes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.losses.functional import at_least_float32

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
    """``m`` distinct token positions per image, ``(B, m)``, drawn uniformly with the torch RNG (or ``generator``).

    Example:
        >>> sample_token_positions(2, 16, 4).shape
        torch.Size([2, 4])
    """
    if not 1 <= m <= length:
        raise ValueError(f"sample_token_positions: m must be in [1, {length}] (tokens per image), got {m}")
    return torch.rand(batch, length, device=device, generator=generator).argsort(dim=1)[:, :m]


def gather_tokens(tokens: Tensor, positions: Tensor) -> Tensor:
    """The tokens ``(B, L, D)`` at ``positions`` ``(B, m)``: ``(B, m, D)``.

    Example:
        >>> tokens = torch.arange(12.0).view(1, 4, 3)
        >>> gather_tokens(tokens, torch.tensor([[2, 0]]))
        tensor([[[6., 7., 8.],
                 [0., 1., 2.]]])
    """
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

    Example:
        >>> idx, d2 = knn_graph(torch.tensor([[0.0], [1.0], [3.0]]), k=1)
        >>> idx.flatten().tolist(), d2[0].tolist()
        ([1, 0, 1], [0.0, 1.0, 9.0])
    """
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"knn_graph: k must be in [1, {n - 1}] for {n} nodes, got {k}")
    d2 = _squared_distances(x)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    idx = d2.detach().masked_fill(eye, float("inf")).topk(k, dim=1, largest=False).indices
    return idx, d2


class TRGLocalLoss(nn.Module):
    """TRG's local-preserving loss: the student keeps the teacher's k-NN token neighbourhoods.

    On N token nodes, with kNN(i) the teacher's k nearest neighbours of node i (Euclidean, self excluded) and the
    Gaussian kernel A_ij = exp(−‖x_i − x_j‖² / (2σ)) on the teacher's (A^T) and the student's (A^S) tokens:

        L = (1/N) · Σ_i KL(softmax_{j ∈ kNN(i)}(A^T_ij) ‖ softmax_{j ∈ kNN(i)}(A^S_ij))

    Paper: arXiv 2306.12442 (the k-NN graph, the kernel with 2σ and a KL between row-softmaxes of the two
    adjacency matrices). The teacher's graph is built under ``no_grad``.

    Args:
        k: neighbours per node, capped at N − 1 (a single node gives 0).
        sigma: a fixed σ, or ``"data"``: the mean squared k-NN distance of the teacher's graph, per batch, used for
            both graphs.
        normalize: L2-normalise the tokens first, so both graphs' squared distances lie in [0, 4].
        knn_source: ``"teacher"``: both graphs use the teacher's neighbour sets; ``"own"``: each graph its own
            (needs ``support="all"``).
        support: ``"knn"``: the softmax runs over the k neighbours; ``"all"``: over every other node, with A = 0
            off the graph (the summary's formula read literally).
        direction: ``"teacher_student"``: KL(teacher ‖ student), as in Hinton KD; ``"student_teacher"`` flips it.
        row_logits: ``"affinity"``: the softmax takes A, as the formula is written; ``"log_affinity"``: it takes
            log A = −‖·‖²/(2σ), a normalised Gaussian kernel as in SNE, with far sharper rows (needs
            ``support="knn"``).

    Notes:
        - The defaults are this module's choices. With a fixed σ = 1 on normalised tokens every row of A is nearly
          uniform and the term stays near 0, hence ``sigma="data"``.
        - Since A ∈ (0, 1], the rows of ``row_logits="affinity"`` are close to uniform, so the term stays small
          whatever the student does; ``"log_affinity"`` gives it a wider range.
        - The node mean (1/N) replaces the paper's sum, so the scale does not grow with the batch. The summary
          writes the KL with the student first, but it writes Hinton's KD that way too, so the default follows KD.

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
        x = at_least_float32(x)
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

        L = −(1/N) · Σ_i log [exp(cos(g_i, t_i) / τ) / Σ_j exp(cos(g_i, t_j) / τ)],
        τ(p) = τ_start + (τ_end − τ_start) · p

    over all N nodes, with g_i the projected student token i, t_j the teacher tokens and p ∈ [0, 1] the training
    progress. The projector belongs to the method: pass student tokens already at the teacher's width. Paper: arXiv
    2306.12442 (InfoNCE on cosine similarity after a linear projection, the same node as the positive, and a
    temperature that is high early and low late).

    Args:
        tau_start: τ at p = 0.
        tau_end: τ at p = 1.

    Notes:
        The linear schedule with τ from 0.5 to 0.1, the node mean (1/N) instead of the sum, and the single
        direction (student anchors, teacher candidates) are this module's choices.

    Example:
        >>> loss = TRGGlobalLoss()
        >>> loss.temperature(0.0), loss.temperature(1.0)
        (0.5, 0.1)
        >>> x = torch.eye(8)
        >>> round(float(loss(x, x, progress=1.0)), 4)  # log(1 + 7·e^−10)
        0.0003
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
        s = F.normalize(at_least_float32(student), dim=-1)
        t = F.normalize(at_least_float32(teacher), dim=-1)
        logits = s @ t.T / self.temperature(progress)
        return F.cross_entropy(logits, torch.arange(s.shape[0], device=s.device))


# ----------------------------------------------------------------------------------------------- inner
class TRGInnerLoss(nn.Module):
    """TRG's contextual (inner-image) loss: the student keeps the teacher's token-to-token similarities per image.

        CS = softmax_row(F · Fᵀ / √D),   L = (1/(B·L)) · Σ_{b,i} Σ_j (CS^T[b,i,j] − CS^S[b,i,j])²

    for each image's token matrix F (L × D). Teacher and student need the same L, not the same D: each side scales
    by its own √D. CS^T is computed under ``no_grad``. Paper: arXiv 2306.12442 (the CS formula and an MSE).

    Args:
        normalize: L2-normalise the tokens first, which keeps the softmax from saturating when feature norms are
            large. Off by default: raw features, as the formula is written.

    Notes:
        The reduction (sum over each row, mean over images and rows) is this module's choice;
        :class:`zoo.methods.TRG` passes every token of the image, not only the m sampled ones.

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
        f = at_least_float32(tokens)
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
