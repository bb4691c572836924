"""Logit-level binary KL losses of Dual-Head Knowledge Distillation (DHKD, arXiv 2411.08937)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.losses.functional import at_least_float32

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
    """BinaryKL-Norm, DHKD's auxiliary-head loss: a per-class Bernoulli KL that pulls σ((z^s − z^t)/T) to ½.

        u = (z^s − z^t) / T,
        L = (T²/B) · Σ_{i,c} KL(Bern(½) ‖ Bern(σ(u_ic))) = (T²/B) · Σ_{i,c} log cosh(u_ic / 2)

    summed over classes and divided by the batch size B (not an element mean). L = 0 iff z^s = z^t; the gradient
    ∂L/∂z^s = (T/B) · (σ(u) − ½) is bounded. Paper: Yang et al., "Dual-Head Knowledge Distillation", arXiv
    2411.08937. Defaults from the official code (penghui-yang/DHKD, ``distiller_zoo/BinaryKLNorm.py``): T = 2
    (``--BinaryKL_T``), eps = 1e-8.

    Args:
        temperature: T.
        eps: σ(u) is clamped to [eps, 1 − eps]; 0 removes the clamp.

    .. warning::
        The official code evaluates the KL through ``sigmoid`` and ``log`` with σ(u) clamped to [eps, 1 − eps].
        Here the same KL is computed as log cosh(u/2) (log1p/expm1 near 0, so no cancellation) with u clamped to
        ±ln((1 − eps)/eps) ≈ ±18.42, the equivalent clamp: value and gradient agree with the code, and the loss
        stays finite in float32 where the code's log(1 − σ(u)) becomes −inf for u ≳ 17.

    Example:
        >>> loss = BinaryKLNormLoss(temperature=2.0)
        >>> zs = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> zt = torch.tensor([[1.0, 1.0, -2.0], [0.5, 0.0, 2.0]])
        >>> round(float(loss(zs, zt)), 4), float(loss(zt, zt))
        (0.457, 0.0)
    """

    def __init__(self, temperature: float = 2.0, eps: float = 1e-8) -> None:
        super().__init__()
        _check_temperature("BinaryKLNormLoss", temperature)
        self.temperature = temperature
        self.eps = eps
        self._bound = _logit_bound(eps)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        t = self.temperature
        zs, zt = at_least_float32(student_logits), at_least_float32(teacher_logits.detach())
        u = ((zs - zt) / t).clamp(-self._bound, self._bound)
        return _log_cosh(0.5 * u).sum() * (t * t / student_logits.shape[0])


class BinaryKLLoss(nn.Module):
    """BinaryKL: the per-class sigmoid KL between teacher and student that DHKD's analysis starts from.

    With p = σ(z^t / T) and q = σ(z^s / T) per class (each logit a one-vs-rest probability):

        L = (T²/B) · Σ_{i,c} [p · (log p − log q) + (1 − p) · (log(1 − p) − log(1 − q))]

    Paper: Yang et al., "Dual-Head Knowledge Distillation", arXiv 2411.08937. It reports that adding this loss to
    CE on a single linear head makes the head collapse; DHKD gives the teacher signal a second head and
    :class:`BinaryKLNormLoss` instead. Defaults T = 2 and eps = 1e-8 as :class:`BinaryKLNormLoss`.

    Notes:
        The official code (``distiller_zoo/BinaryKL.py``) clamps both σ to [eps, 1 − eps]; here the loss is computed
        in log-sigmoid (softplus) form with z/T clamped to ±ln((1 − eps)/eps), the same clamp.

    Example:
        >>> loss = BinaryKLLoss(temperature=2.0)
        >>> zs = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> zt = torch.tensor([[1.0, 1.0, -2.0], [0.5, 0.0, 2.0]])
        >>> round(float(loss(zs, zt)), 4), float(loss(zt, zt))
        (0.4228, 0.0)
    """

    def __init__(self, temperature: float = 2.0, eps: float = 1e-8) -> None:
        super().__init__()
        _check_temperature("BinaryKLLoss", temperature)
        self.temperature = temperature
        self.eps = eps
        self._bound = _logit_bound(eps)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        t, bound = self.temperature, self._bound
        s = (at_least_float32(student_logits) / t).clamp(-bound, bound)
        z = (at_least_float32(teacher_logits.detach()) / t).clamp(-bound, bound)
        p = torch.sigmoid(z)
        # log σ(x) = −softplus(−x), log(1 − σ(x)) = −softplus(x)
        kl = p * (F.softplus(-s) - F.softplus(-z)) + (1.0 - p) * (F.softplus(s) - F.softplus(z))
        return kl.sum() * (t * t / student_logits.shape[0])
