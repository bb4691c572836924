"""Tensor helpers shared by the loss modules."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["at_least_float32"]


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in the precision a loss computes in: float64 stays float64, every other dtype becomes float32.

    Half and bfloat16 activations (AMP) are promoted, so softmaxes, norms and reductions run in full precision;
    float64 inputs keep float64, so golden tests can check a loss to float64 accuracy.

    Example:
        >>> at_least_float32(torch.ones(2, dtype=torch.bfloat16)).dtype
        torch.float32
        >>> at_least_float32(torch.ones(2, dtype=torch.float64)).dtype
        torch.float64
    """
    return x if x.dtype == torch.float64 else x.float()
