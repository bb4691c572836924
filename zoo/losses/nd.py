"""ND loss: the student's embedding should point at the teacher's class centre, with at least the teacher's norm."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zoo.losses.functional import at_least_float32

__all__ = ["NDLoss", "NDProjector"]


class NDLoss(nn.Module):
    """Norm-and-direction (ND) loss of KD++ / DKD++: the student embedding points at the teacher's class centre
    with at least the teacher's norm.

    With e_k = c_k / ‖c_k‖ the unit class centre of the teacher's embeddings, g_i the (projected) student embedding
    and f_t,i the teacher embedding of the same image (detached):

        L = (1/B) · Σ_i [1 − ⟨g_i, e_{y_i}⟩ / max(‖g_i‖, ‖f_t,i‖)]

    When ‖g‖ ≥ ‖f_t‖ the term is 1 − cos(g, e_y); otherwise it also pushes ‖g‖ up to ‖f_t‖. Paper: Wang et al.,
    "Improving Knowledge Distillation via Regularizing Feature Norm and Direction", arXiv 2305.17007. This is the
    vectorised form of the per-sample loop of the official code (Knowledge-Distillation-via-ND, ``CIFAR/utils.py``,
    ``DirectNormLoss.project_center``); the centres c_k are the teacher's per-class mean embeddings over the
    training set, computed once and set with :meth:`set_centers`. The weight λ_nd belongs to the method.

    Args:
        num_classes: number of classes.
        dim: teacher embedding dimension.

    Example:
        >>> loss = NDLoss(num_classes=2, dim=2)
        >>> loss.set_centers(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        >>> g = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
        >>> f_t = torch.tensor([[4.0, 0.0], [1.0, 0.0]])
        >>> round(float(loss(g, f_t, torch.tensor([0, 1]))), 4)  # ((1 − 2/4) + (1 − 1/√2)) / 2
        0.3964
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("centers", torch.zeros(num_classes, dim))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def set_centers(self, centers: Tensor) -> None:
        """Stores the teacher's class centres ``(num_classes, dim)``; they need not be normalised."""
        if centers.shape != self.centers.shape:
            raise ValueError(f"NDLoss: centres of shape {tuple(centers.shape)}, expected {tuple(self.centers.shape)}")
        self.centers.copy_(centers)
        self.ready.fill_(True)

    def forward(self, student_emb: Tensor, teacher_emb: Tensor, target: Tensor) -> Tensor:
        if not bool(self.ready):
            raise RuntimeError("NDLoss: class centres are not set (call set_centers or let the method compute them)")
        g, f_t = at_least_float32(student_emb), at_least_float32(teacher_emb.detach())
        dtype = torch.promote_types(g.dtype, f_t.dtype)
        e = nn.functional.normalize(self.centers.to(dtype), dim=1)[target]
        denom = torch.maximum(g.norm(dim=1), f_t.norm(dim=1))
        return (1.0 - (g * e).sum(1) / denom).mean()


class NDProjector(nn.Sequential):
    """ND's projector from the student to the teacher embedding width: BN1d(d_s) → Dropout(p) → Linear(d_s → d_t).

    Used only when the two widths differ, and only for the ND term (official ``Models/embtrans*.py``). ``init`` picks
    the official initialisation: ``"cifar"`` keeps PyTorch's default Linear weights with bias 0; ``"imagenet"``
    draws weight and bias from N(0, 0.01). Dropout p = 0.5 as in the official code.

    Example:
        >>> NDProjector(8, 16).eval()(torch.randn(4, 8)).shape
        torch.Size([4, 16])
    """

    def __init__(self, student_dim: int, teacher_dim: int, init: str = "cifar", dropout: float = 0.5) -> None:
        linear = nn.Linear(student_dim, teacher_dim)
        if init == "cifar":
            nn.init.zeros_(linear.bias)
        elif init == "imagenet":
            nn.init.normal_(linear.weight, 0.0, 0.01)
            nn.init.normal_(linear.bias, 0.0, 0.01)
        else:
            raise ValueError(f"NDProjector.init must be 'cifar' or 'imagenet', got {init!r}")
        super().__init__(nn.BatchNorm1d(student_dim), nn.Dropout(dropout), linear)
