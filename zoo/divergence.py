"""Divergence: a non-finite loss stops a run at once, and non-finite weights are never saved or published."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["DivergenceError", "check_finite_state", "check_finite_terms"]


class DivergenceError(RuntimeError):
    """Training diverged: a loss term or a weight is NaN or infinite."""


def check_finite_terms(terms: Mapping[str, Tensor], total: Tensor, step: int) -> None:
    """Raises :class:`DivergenceError` naming the step and the first non-finite term when ``total`` is not finite
    (one host read of ``total``; the terms are read only when it fails)."""
    if bool(torch.isfinite(total)):
        return
    bad = next((k for k, v in terms.items() if not bool(torch.isfinite(v).all())), None)
    what = f"loss term '{bad}' (train/loss_{bad})" if bad is not None else "the summed loss (train/loss)"
    value = float(terms[bad].detach().float().sum()) if bad is not None else float(total)
    raise DivergenceError(
        f"training diverged at step {step}: {what} is {value}; lower the learning rate "
        "(model.init_args.optimizer.init_args.lr) or check the data"
    )


def check_finite_state(state: Mapping[str, Tensor], where: str) -> None:
    """Raises :class:`DivergenceError` when a floating tensor of ``state`` holds a NaN or an infinity."""
    for name, tensor in state.items():
        if isinstance(tensor, Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DivergenceError(f"{where}: weight '{name}' is not finite (the run diverged); nothing was written")
