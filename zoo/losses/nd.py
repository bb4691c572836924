"""ND loss: the student's embedding should point at the teacher's class centre, with at least the teacher's norm."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["NDLoss", "NDProjector"]


class NDLoss(nn.Module):
    """Norm-and-direction loss of KD++ / DKD++ (Wang et al., "Improving Knowledge Distillation via Regularizing
    Feature Norm and Direction", arXiv 2305.17007).

    With e_k = c_k / ‖c_k‖ the unit class centre of the teacher's embeddings (computed once, offline, from the
    frozen teacher over the training set), g_i the (projected) student embedding and f_t,i the teacher embedding
    of the same image (detached):

        ℓ_nd(i) = 1 − ⟨g_i, e_{y_i}⟩ / max(‖g_i‖, ‖f_t,i‖),     L_nd = (1/B)·Σ_i ℓ_nd(i).

    When ‖g‖ ≥ ‖f_t‖ the term is 1 − cos(g, e_y) (direction only); otherwise it also pushes the norm of g up to
    the teacher's. The term is not squared and has no temperature. This is the vectorised form of the official
    per-sample loop (``CIFAR/utils.py``, ``DirectNormLoss.project_center``); the weight λ_nd is the method's.

    Args:
        num_classes: number of classes.
        dim: teacher embedding dimension.

    Example:
        >>> loss = NDLoss(num_classes=3, dim=4)
        >>> loss.set_centers(torch.eye(3, 4))
        >>> g = torch.tensor([[5.0, 0, 0, 0]]); f_t = torch.tensor([[0.0, 2, 0, 0]])
        >>> float(loss(g, f_t, torch.tensor([0])))
        0.0
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("centers", torch.zeros(num_classes, dim))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def set_centers(self, centers: Tensor) -> None:
        if centers.shape != self.centers.shape:
            raise ValueError(f"NDLoss: centres of shape {tuple(centers.shape)}, expected {tuple(self.centers.shape)}")
        self.centers.copy_(centers)
        self.ready.fill_(True)

    def forward(self, student_emb: Tensor, teacher_emb: Tensor, target: Tensor) -> Tensor:
        if not bool(self.ready):
            raise RuntimeError("NDLoss: class centres are not set (call set_centers or let the method compute them)")
        e = nn.functional.normalize(self.centers.float(), dim=1)[target]
        g = student_emb.float()
        denom = torch.maximum(g.norm(dim=1), teacher_emb.detach().float().norm(dim=1))
        return (1.0 - (g * e).sum(1) / denom).mean()


class NDProjector(nn.Sequential):
    """The ND projector, used only when the student and teacher embedding dims differ (``Models/embtrans*.py``):
    BN1d(d_s) → Dropout(0.5) → Linear(d_s → d_t). The official CIFAR code keeps PyTorch's default Linear weights
    with bias 0 (``init="cifar"``); the ImageNet code draws weight and bias from N(0, 0.01) (``init="imagenet"``).
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
