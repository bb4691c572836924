"""What a distillation run does besides its loss: teacher reference, student–teacher divergence, loss mix, speed."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor

from zoo.methods.base import DistillationMethod

__all__ = ["DistillationMonitor"]

_TERM_PREFIX = "train/loss_"


class DistillationMonitor(L.Callback):
    """Logs the teacher's accuracy once, student–teacher agreement and KL, loss-term shares and throughput.

    Everything is read from what the method already produces (the ``validation_step`` outputs ``logits``,
    ``teacher_logits``, ``target`` and the logged ``train/loss_<name>`` values), so the monitor runs no model.

    Logged names:
        - ``val/teacher_acc_once``: the teacher's top-1 on the validation split, logged in the first validation
          epoch after the sanity check and never again (the teacher is frozen, so one value is its accuracy; a
          reference line for dashboards). Computed from ``teacher_logits.argmax`` and ``target`` of that epoch,
          weighted by batch size. ``DistillationMethod`` also logs ``val/teacher_acc`` every epoch; this is the
          cheap one-off copy under its own name.
        - ``val/kl_teacher_student``: KL(p_t ‖ p_s) at T = 1, summed over classes, averaged over every validation
          sample of the epoch (each batch's mean weighted by its size; reduced across processes). For segmentation
          logits (N, C, H, W) it is the per-pixel KL averaged over pixels, and the teacher accuracy is per pixel,
          leaving out the method's ``ignore_index``.
        - ``val/agreement``: share of samples where student and teacher top-1 agree. Only for modules that do not
          log it themselves: every ``DistillationMethod`` already does (exact, with torchmetrics), so for the
          zoo's methods the monitor leaves that name to the method instead of logging a duplicate.
        - ``train/share_<name>``: ``train/loss_<name> / train/loss`` for each logged loss term, per logging step
          (the values of that step, not an epoch average). They sum to 1 when the total is the sum of the terms, as
          in ``DistillationMethod``; a term can be negative or exceed 1 if another term is negative.
        - ``perf/images_per_sec``, ``perf/data_time``, ``perf/step_time``, ``perf/data_share``: per process,
          averaged over the training batches since the previous write. ``step_time`` is the mean time from
          ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer step); ``data_time`` the
          mean gap from the previous batch's end (or the epoch's start) to this batch's start (loading, host→device
          copy, other callbacks and logging; validation is excluded); ``images_per_sec`` = images / (data time +
          step time), i.e. end-to-end training throughput; ``data_share`` = data time / (data time + step time).

    Validation values are logged with ``self.log`` (epoch level). Train-time values (shares, throughput) are
    written straight to every logger (and ``trainer.logged_metrics``) on every ``log_every_n_steps``-th optimizer
    step, at the step number of Lightning's own rows for that batch; they are not in ``trainer.callback_metrics``.
    Whatever cannot apply is skipped silently: no teacher (or no ``teacher_logits`` in the outputs) means no
    teacher accuracy, agreement or KL; no loss terms means no shares; no logger means nothing is written.

    Args:
        teacher_acc: log ``val/teacher_acc_once``.
        agreement: log ``val/agreement`` for modules that do not log it themselves.
        kl: log ``val/kl_teacher_student``.
        loss_shares: log ``train/share_<name>``.
        throughput: log the ``perf/*`` values.
        log_every_n_steps: optimizer steps between train-time writes; ``None`` follows the trainer's.
        cuda_sync: call ``torch.cuda.synchronize()`` at batch start and end on a CUDA device, so ``step_time`` is
            the GPU's work rather than the time to queue it (costs a little speed; off by default).
    """

    def __init__(
        self,
        teacher_acc: bool = True,
        agreement: bool = True,
        kl: bool = True,
        loss_shares: bool = True,
        throughput: bool = True,
        log_every_n_steps: int | None = None,
        cuda_sync: bool = False,
    ) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"DistillationMonitor.log_every_n_steps must be ≥ 1 or None, got {log_every_n_steps}")
        self.teacher_acc = teacher_acc
        self.agreement = agreement
        self.kl = kl
        self.loss_shares = loss_shares
        self.throughput = throughput
        self.log_every_n_steps = log_every_n_steps
        self.cuda_sync = cuda_sync
        self._teacher_acc_logged = False
        self._teacher_acc_epoch = False
        self._last_global_step = -1
        self._batch_start: float | None = None
        self._last_end: float | None = None
        self._pending_data = 0.0
        self._window = [0.0, 0.0, 0, 0]  # data seconds, step seconds, images, batches since the last log

    # --------------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._teacher_acc_epoch = self.teacher_acc and not self._teacher_acc_logged and not trainer.sanity_checking

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict):
            return
        student, teacher = outputs.get("logits"), outputs.get("teacher_logits")
        if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
            return
        bs = student.shape[0]
        # sync_dist: Lightning sums value·batch_size and batch sizes over processes, so the mean stays exact.
        log = dict(on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        # Classes are on dim 1: (N, C) for classification, (N, C, H, W) for segmentation (then per pixel).
        if self.kl:
            log_s = F.log_softmax(student.detach().float(), 1)
            log_t = F.log_softmax(teacher.detach().float(), 1)
            kl = (log_t.exp() * (log_t - log_s)).sum(1).mean()
            pl_module.log("val/kl_teacher_student", kl, **log)
        if self.agreement and not isinstance(pl_module, DistillationMethod):
            agree = (student.argmax(1) == teacher.argmax(1)).float().mean()
            pl_module.log("val/agreement", agree, **log)
        target = outputs.get("target")
        if self._teacher_acc_epoch and isinstance(target, Tensor):
            valid = target != getattr(pl_module, "ignore_index", -100)
            acc = (teacher.argmax(1) == target)[valid].float().mean()
            pl_module.log("val/teacher_acc_once", acc, **log)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._teacher_acc_epoch:
            self._teacher_acc_logged = True
            self._teacher_acc_epoch = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A validation inside a training epoch (val_check_interval < 1) must not count as data time.
        if self._last_end is not None:
            self._last_end = time.perf_counter()

    # --------------------------------------------------------------------------------------------- training
    def _sync(self, pl_module: L.LightningModule) -> None:
        if self.cuda_sync and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_global_step = trainer.global_step  # a resumed run starts at its checkpoint's step
        self._window = [0.0, 0.0, 0, 0]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.throughput:
            return
        self._sync(pl_module)
        now = time.perf_counter()
        self._pending_data = now - self._last_end if self._last_end is not None else 0.0
        self._batch_start = now

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.throughput and self._batch_start is not None:
            self._sync(pl_module)
            now = time.perf_counter()
            w = self._window
            w[0] += self._pending_data
            w[1] += now - self._batch_start
            w[2] += _batch_size(batch)
            w[3] += 1
            self._last_end = now
            self._batch_start = None
        # Log once per optimizer step (not on accumulating batches) at the requested cadence.
        stepped = trainer.global_step != self._last_global_step
        self._last_global_step = trainer.global_step
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if not stepped or not every or trainer.global_step % every:
            return
        values = {}
        if self.loss_shares:
            values.update(self._shares(trainer))
        if self.throughput:
            values.update(self._throughput())
        _write(trainer, values)

    def _shares(self, trainer: L.Trainer) -> dict[str, float]:
        metrics = trainer.callback_metrics  # this step's values of the on_step metrics
        terms = {k[len(_TERM_PREFIX) :]: v for k, v in metrics.items() if k.startswith(_TERM_PREFIX)}
        # A term logged with on_step and on_epoch also appears as <name>_step / <name>_epoch.
        forked = [k for k in terms if k.endswith(("_step", "_epoch")) and k.rsplit("_", 1)[0] in terms]
        terms = {k: float(v) for k, v in terms.items() if k not in forked}
        total = float(metrics["train/loss"]) if "train/loss" in metrics else sum(terms.values())
        if not terms or total == 0.0:
            return {}
        return {f"train/share_{name}": value / total for name, value in terms.items()}

    def _throughput(self) -> dict[str, float]:
        data, step, images, batches = self._window
        self._window = [0.0, 0.0, 0, 0]
        if not batches or data + step <= 0.0:
            return {}
        return {
            "perf/images_per_sec": images / (data + step),
            "perf/data_time": data / batches,
            "perf/step_time": step / batches,
            "perf/data_share": data / (data + step),
        }


def _write(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Writes to every logger at once, at the step of Lightning's own rows for this batch, and to logged_metrics.

    ``self.log(on_step=True)`` would not do for a cadence of its own: Lightning writes the last logged value again on
    each of its logging steps, so a value logged every n-th step would reappear, stale, in between. Lightning's own
    ``ThroughputMonitor`` writes through the logger connector in the same way.
    """
    if not metrics:
        return
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None and hasattr(connector, "log_metrics"):
        connector.log_metrics(metrics)
        return
    for logger in trainer.loggers:  # pragma: no cover - a Lightning without the connector API
        logger.log_metrics(metrics, step=trainer.global_step)


def _batch_size(batch: Any) -> int:
    try:
        return extract_batch_size(batch)
    except Exception:  # an unusual batch: throughput per batch is still meaningful as batches/s
        return 1
