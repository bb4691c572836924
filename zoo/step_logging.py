"""What a training step logs, logged only on the steps whose values Lightning keeps.

A ``self.log`` call costs a few tenths of a millisecond of host time (``benchmarks/step_overhead.py``), a small
model's whole step, and Lightning writes a training step's values only every ``log_every_n_steps`` steps; in
between, ``trainer.callback_metrics`` hold the last logged step's values. So a method's per-step values go through
:func:`log_step_values`: logged when Lightning keeps them, otherwise held until the batch ends, and logged then only
if a callback stopped the run at that step (:func:`log_stopped_step`), since Lightning writes that step's row too.
The files hold what logging every step would give (``tests/methods/test_logging_cadence.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["keeps_step_values", "log_loss_values", "log_step_values", "log_stopped_step"]


def keeps_step_values(trainer: Any) -> bool:
    """Whether Lightning keeps what a training step logs: it writes the step's row to the loggers (every
    ``log_every_n_steps``-th step, ``fast_dev_run``, a stop), or the step ends an epoch or the fit (whose values
    ``callback_metrics`` keep). Always true outside a fit."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or not trainer.training or trainer.fast_dev_run or connector.should_update_logs:
        return True
    ends_epoch = getattr(trainer.fit_loop.epoch_loop, "_num_ready_batches_reached", lambda: True)()
    return ends_epoch or 0 < trainer.max_steps <= trainer.global_step + 1


def log_step_values(module: Any, values: Mapping[str, Tensor], batch_size: int) -> bool:
    """Logs ``values`` (name → tensor) with ``module.log`` if Lightning keeps this step's values, else holds them
    for :func:`log_stopped_step`; returns whether they were logged."""
    if keeps_step_values(module._trainer):
        _log(module, {k: (v, batch_size) for k, v in values.items()})
        return True
    held = getattr(module, "_unlogged_step", None) or {}
    module._unlogged_step = {**held, **{k: (v, batch_size) for k, v in values.items()}}
    return False


def log_loss_values(module: Any, terms: Mapping[str, Tensor], loss: Tensor, batch_size: int) -> None:
    """:func:`log_step_values` of ``train/loss_<name>`` for each term and ``train/loss``; ``train/loss`` is logged on
    the other steps too while a progress bar shows it."""
    values = {**{f"train/loss_{k}": v.detach() for k, v in terms.items()}, "train/loss": loss.detach()}
    if not log_step_values(module, values, batch_size) and _has_bar(module):
        _log(module, {"train/loss": (values["train/loss"], batch_size)})


def log_stopped_step(module: Any) -> None:
    """Logs the values held for this batch if Lightning writes its row after all, because a callback stopped the run
    at it after ``training_step`` (Lightning's ``Timer`` does); for ``on_train_batch_end``."""
    held, module._unlogged_step = getattr(module, "_unlogged_step", None), None
    if held and module.trainer.should_stop:
        hook, module._current_fx_name = module._current_fx_name, "training_step"  # the step's own entries
        _log(module, held)
        module._current_fx_name = hook


def _has_bar(module: Any) -> bool:
    return module._trainer is not None and module._trainer.progress_bar_callback is not None


def _log(module: Any, values: Mapping[str, tuple[Tensor, int]]) -> None:
    bar = _has_bar(module)
    for name, (value, batch_size) in values.items():  # prog_bar only with a bar: Lightning reads it every step
        module.log(name, value, prog_bar=bar and name == "train/loss", batch_size=batch_size)
