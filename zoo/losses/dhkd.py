"""Logit-level binary KL losses of Dual-Head Knowledge Distillation (DHKD, arXiv 2411.08937)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BinaryKLLoss", "BinaryKLNormLoss"]


def _logit_bound(eps: float) -> float:
    """ln((1 − eps)/eps): clamping σ(x) to [eps, 1 − eps] is the same as clamping x to ± this bound."""
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps}")
    return math.inf if eps == 0.0 else math.log((1.0 - eps) / eps)


def _log_cosh(x: Tensor) -> Tensor:
    """log cosh(x), accurate near 0 and finite for any x (each branch sees only inputs where it is exact)."""
    a = x.abs()
    small, large = a.clamp(max=1.0), a.clamp(min=1.0)
    near = torch.log1p(torch.expm1(small) * -torch.expm1(-small) * 0.5)  # cosh x − 1 = (e^a − 1)(1 − e^−a)/2
    far = large - math.log(2.0) + torch.log1p(torch.exp(-2.0 * large))
    return torch.where(a <= 1.0, near, far)


def _check_temperature(owner: str, temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"{owner}.temperature must be positive, got {temperature}")


class BinaryKLNormLoss(nn.Module):
    """BinaryKL-Norm, the distillation loss of DHKD's auxiliary head (Yang et al., arXiv 2411.08937).

    Every class is treated as a binary problem on the *difference* of the logits, u = (z^s − z^t)/T, and pulled to
    the point where student and teacher agree, σ(u) = ½:

        L = (T²/B) · Σ_i Σ_c KL(Bern(½) ‖ Bern(σ(u_ic)))
          = (T²/B) · Σ_i Σ_c [½·softplus(u_ic) + ½·softplus(−u_ic) − ln 2].

    The sum runs over classes and is divided by the batch size B (not a per-element mean). L = 0 iff z^s = z^t;
    L ≈ Σ (z^s − z^t)²/(8B) near agreement and grows like T·|z^s − z^t|/(2B) far from it; the gradient
    ∂L/∂z^s = (T/B)·(σ(u) − ½) is bounded.

    Form used here: the bracket equals log cosh(u/2) exactly (softplus(u) + softplus(−u) = 2·ln(2·cosh(u/2))), and
    that is what is computed, with log1p/expm1 near 0, so the value keeps its relative precision in float32 where
    "½·softplus(u) + ½·softplus(−u) − ln 2" would cancel. The official code (penghui-yang/DHKD, ``distiller_zoo/
    BinaryKLNorm.py``) evaluates the same KL through ``sigmoid`` and ``log`` with σ clamped to [eps, 1 − eps]
    (eps = 1e-8). Clamping σ(u) to [eps, 1 − eps] equals clamping u to ±ln((1 − eps)/eps) ≈ ±18.42, which is done
    here, so the two forms agree in value and gradient (the clamp flattens the loss beyond |u| ≈ 18.4, as in the
    code). This form is also finite where the code's float32 sigmoid is not: there 1 − 1e-8 rounds to 1, so
    log(1 − σ(u)) = −inf once u ≳ 17. ``eps=0`` removes the clamp. Default T = 2 (the official ``--BinaryKL_T``).

    Args:
        temperature: T.
        eps: the clamp of σ(u), 1e-8 as in the official code.

    Example:
        >>> loss = BinaryKLNormLoss(temperature=2.0)
        >>> z = torch.randn(8, 10)
        >>> float(loss(z, z))
        0.0
    """

    def __init__(self, temperature: float = 2.0, eps: float = 1e-8) -> None:
        super().__init__()
        _check_temperature("BinaryKLNormLoss", temperature)
        self.temperature = temperature
        self.eps = eps
        self._bound = _logit_bound(eps)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        t = self.temperature
        u = ((student_logits.float() - teacher_logits.detach().float()) / t).clamp(-self._bound, self._bound)
        return _log_cosh(0.5 * u).sum() * (t * t / student_logits.shape[0])


class BinaryKLLoss(nn.Module):
    """BinaryKL, the per-class sigmoid KL that DHKD's analysis starts from (Yang et al., arXiv 2411.08937).

    With p = σ(z^t/T) and q = σ(z^s/T) per class (each logit a one-vs-rest probability):

        L = (T²/B) · Σ_i Σ_c KL(Bern(p_ic) ‖ Bern(q_ic))
          = (T²/B) · Σ_i Σ_c [p·(log p − log q) + (1 − p)·(log(1 − p) − log(1 − q))].

    Unlike softmax KD it keeps each logit's own scale. The paper reports that adding it to CE on one linear head
    makes that head collapse, which DHKD avoids by giving the teacher signal a second head and
    :class:`BinaryKLNormLoss`. Computed in log-sigmoid (softplus) form, with both σ clamped to [eps, 1 − eps] as
    in the official ``distiller_zoo/BinaryKL.py`` (again as a clamp of z/T to ±ln((1 − eps)/eps)).

    Example:
        >>> loss = BinaryKLLoss(temperature=2.0)
        >>> z = torch.randn(4, 5)
        >>> abs(float(loss(z, z))) < 1e-6
        True
    """

    def __init__(self, temperature: float = 2.0, eps: float = 1e-8) -> None:
        super().__init__()
        _check_temperature("BinaryKLLoss", temperature)
        self.temperature = temperature
        self.eps = eps
        self._bound = _logit_bound(eps)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        t, bound = self.temperature, self._bound
        s = (student_logits.float() / t).clamp(-bound, bound)
        z = (teacher_logits.detach().float() / t).clamp(-bound, bound)
        p = torch.sigmoid(z)
        # log σ(x) = −softplus(−x), log(1 − σ(x)) = −softplus(x)
        kl = p * (F.softplus(-s) - F.softplus(-z)) + (1.0 - p) * (F.softplus(s) - F.softplus(z))
        return kl.sum() * (t * t / student_logits.shape[0])
