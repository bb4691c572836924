"""Divergence: a non-finite loss stops a run at once, and non-finite weights are never saved or published; and
what else a training step's loss terms cost the host: they are logged only on the steps whose values Lightning
keeps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DivergenceError", "check_finite_state", "check_finite_terms", "keeps_step_values", "log_loss_values",
    "log_stopped_step",
]


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


# ----------------------------------------------------------------------------------------------- logging cadence
def keeps_step_values(trainer: Any) -> bool:
    """Whether Lightning keeps what a training step logs: it writes the step's row to the loggers (every
    ``log_every_n_steps``-th step, ``fast_dev_run``, a stop), or the step ends an epoch or the fit (whose values
    ``callback_metrics`` keep). Always true outside a fit."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or not trainer.training or trainer.fast_dev_run or connector.should_update_logs:
        return True
    ends_epoch = getattr(trainer.fit_loop.epoch_loop, "_num_ready_batches_reached", lambda: True)()
    return ends_epoch or 0 < trainer.max_steps <= trainer.global_step + 1


def log_loss_values(module: Any, terms: Mapping[str, Tensor], loss: Tensor, batch_size: int) -> None:
    """Logs ``train/loss_<name>`` for each term and ``train/loss`` with ``module.log`` on the steps whose values
    Lightning keeps (:func:`keeps_step_values`), and ``train/loss`` on the others too while a progress bar shows it.

    A ``self.log`` call costs a few tenths of a millisecond of host time (``benchmarks/step_overhead.py``), a small
    model's whole step, and Lightning writes a training step's values only every ``log_every_n_steps`` steps; in
    between, ``trainer.callback_metrics`` hold the last logged step's values. A skipped step's values wait for
    :func:`log_stopped_step`.
    """
    values = {**{f"train/loss_{k}": v.detach() for k, v in terms.items()}, "train/loss": loss.detach()}
    keep = keeps_step_values(module._trainer)
    module._unlogged_step = None if keep else (values, batch_size)
    _log(module, values if keep else {"train/loss": values["train/loss"]}, batch_size, bar_only=not keep)


def log_stopped_step(module: Any) -> None:
    """Logs a skipped step's values if Lightning writes its row after all, because a callback stopped the run at it
    after ``training_step`` (Lightning's ``Timer`` does); for ``on_train_batch_end``."""
    unlogged, module._unlogged_step = getattr(module, "_unlogged_step", None), None
    if unlogged is not None and module.trainer.should_stop:  # Lightning writes the row of a step that stops the run
        hook, module._current_fx_name = module._current_fx_name, "training_step"  # the step's own entries
        _log(module, *unlogged)
        module._current_fx_name = hook


def _log(module: Any, values: dict[str, Tensor], batch_size: int, bar_only: bool = False) -> None:
    bar = module._trainer is not None and module._trainer.progress_bar_callback is not None
    if bar_only and not bar:
        return
    for name, value in values.items():  # prog_bar only with a bar: Lightning reads those to the host every step
        module.log(name, value, prog_bar=bar and name == "train/loss", batch_size=batch_size)
