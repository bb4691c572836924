"""SWAD: dense weight averaging inside the validation-loss valley, as a Lightning callback.

Why a callback of our own: Lightning's ``StochasticWeightAveraging`` is SWA (Izmailov et al.): it averages from a
fixed epoch on, once per epoch, under its own learning-rate schedule. SWAD (Cha et al., "SWAD: Domain
Generalization by Seeking Flat Minima", NeurIPS 2021, arXiv 2102.08604) averages the weights of *every* step, and
only over the stretch of training that the validation loss marks as a valley; no kept library ships it. This
follows the official ``LossValley`` rule (``khanrc/swad``, ``domainbed/swad.py``, copied unchanged into
``val-iisc/VL2V-ADiP``), which VL2V-ADiP uses in both of its stages.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

__all__ = ["LossValley", "SWAD", "Segment"]


@dataclass
class Segment:
    """The running mean of the weights of consecutive steps ``start_step``..``end_step``, closed by a validation
    whose loss (of the weights at ``end_step``) is ``loss``. ``buffers`` are the module's buffers when it opened."""

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    start_step: int
    end_step: int
    count: int = 1
    loss: float = float("inf")


@dataclass
class _Average:
    """``swa_utils.AveragedModel`` of the SWAD code at segment level: each added segment counts once. Like that
    class it is created holding a segment's weights with a count of 0, so the first segment added replaces them."""

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    count: int = 0
    start_step: int = -1
    end_step: int = -1
    added: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def seeded_from(cls, segment: Segment) -> _Average:
        params = {k: v.clone() for k, v in segment.params.items()}
        return cls(params, {k: v.clone() for k, v in segment.buffers.items()})

    def add(self, segment: Segment) -> None:
        for name, value in self.params.items():
            if self.count == 0:
                value.copy_(segment.params[name])
            else:
                value.add_((segment.params[name] - value) / (self.count + 1))
        self.count += 1
        if self.count == 1:
            self.start_step = segment.start_step
        self.end_step = segment.end_step
        self.added.append((segment.start_step, segment.end_step))


class LossValley:
    """SWAD's loss-valley rule over closed segments (the official ``LossValley``, in the same order of tests).

    - Start: once ``n_converge`` segments are in, the first time the oldest of the last ``n_converge`` has the
      lowest loss (ties to the oldest), the valley starts at its end step. threshold = (1 + ``tolerance_ratio``) ×
      the mean loss of those ``n_converge`` segments. The average is seeded with the oldest one and, when
      ``n_tolerance`` > ``n_converge``, takes the segments of the first ``n_tolerance − n_converge + 1`` of the
      last ``n_tolerance`` that follow the latest one above the threshold (the code skips the first segment after it).
    - After the start, at each new segment: once the oldest of the last ``n_tolerance`` segments ends at or after
      the start, it joins the average if the lowest loss of the last ``n_tolerance`` is at most the threshold;
      otherwise the valley is dead and nothing more is added.
    - :meth:`final`: unless dead, the rest of the window (without its oldest, added already) joins oldest first,
      while the lowest loss of what remains is at most the threshold. Without a start, the last segment is the result.

    .. warning::
        Kept as the official code has them (they shape the published numbers): every added segment counts once
        whatever its length; the segment the valley starts from is replaced by the first segment added (the
        ``AveragedModel`` count starts at 0), and the oldest window segment at the start can be added twice.
        The paper's Algorithm 1 states the rule per iteration: average every iterate from the loss minimum to the
        end of the valley.

    Args:
        n_converge: N_s, the window that detects the start (official: 3).
        n_tolerance: N_e, the window whose lowest loss must stay under the threshold (official: 6).
        tolerance_ratio: r − 1 (official: 0.3).
    """

    def __init__(self, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3) -> None:
        if n_converge < 1 or n_tolerance < 1:
            raise ValueError(f"LossValley: n_converge ({n_converge}) and n_tolerance ({n_tolerance}) must be ≥ 1")
        if tolerance_ratio < 0:
            raise ValueError(f"LossValley.tolerance_ratio must be ≥ 0, got {tolerance_ratio}")
        self.n_converge, self.n_tolerance, self.tolerance_ratio = n_converge, n_tolerance, tolerance_ratio
        self.recent: deque[Segment] = deque(maxlen=n_converge)
        self.window: deque[Segment] = deque(maxlen=n_tolerance)
        self.average: _Average | None = None
        self.converge_step: int | None = None
        self.threshold: float | None = None
        self.dead = False

    @property
    def converged(self) -> bool:
        return self.converge_step is not None

    def update(self, segment: Segment) -> None:
        if self.dead:
            return
        self.recent.append(segment)
        self.window.append(segment)
        if not self.converged:
            if len(self.recent) < self.n_converge:
                return
            losses = [s.loss for s in self.recent]
            if losses.index(min(losses)) != 0:
                return
            self.converge_step = self.recent[0].end_step
            self.average = _Average.seeded_from(self.recent[0])
            self.threshold = sum(losses) / len(losses) * (1.0 + self.tolerance_ratio)
            if self.n_tolerance < self.n_converge:
                for s in list(self.recent)[1 : 1 + self.n_converge - self.n_tolerance]:
                    self.average.add(s)
            elif self.n_tolerance > self.n_converge:
                head = list(self.window)[: self.n_tolerance - self.n_converge + 1]
                start = 0
                for i in reversed(range(len(head))):
                    if head[i].loss > self.threshold:
                        start = i + 1
                        break
                for s in head[start + 1 :]:
                    self.average.add(s)
            return
        if self.window[0].end_step < self.converge_step:
            return
        if min(s.loss for s in self.window) > self.threshold:
            self.dead = True
            return
        self.average.add(self.window[0])

    def final(self) -> tuple[dict[str, Tensor], dict[str, Tensor], tuple[int, int]] | None:
        """The averaged parameters and buffers and the step range they span, or ``None`` before any segment."""
        if not self.converged:
            if not self.recent:
                return None
            last = self.recent[-1]
            return last.params, last.buffers, (last.start_step, last.end_step)
        if not self.dead:
            rest = deque(self.window)
            rest.popleft()
            while rest:
                if min(s.loss for s in rest) > self.threshold:
                    break
                self.average.add(rest.popleft())
        avg = self.average
        return avg.params, avg.buffers, (avg.start_step, avg.end_step)


class SWAD(L.Callback):
    """SWAD weight averaging (arXiv 2102.08604) with the official loss-valley rule (:class:`LossValley`).

    Every optimizer step the module's parameters enter a running mean (a *segment*); each validation during fit
    closes the segment with the validation loss ``monitor`` (DomainBed's ``tr_outloss``: the cross-entropy on the
    source domains' validation split, ``val/loss`` in the zoo) and hands it to the rule. Validate every
    ``checkpoint_freq`` steps as the recipe does (``trainer.val_check_interval: 200`` with
    ``check_val_every_n_epoch: null``). A dead valley stops training (``stop_on_dead_valley``), as the official
    trainer does. When training ends the averaged weights replace the module's, so ``trainer.test`` after ``fit``
    and ``save_path`` see the SWAD model; checkpoints written during training hold the raw weights (VL2V-ADiP's
    Distill stage starts from the Align stage's best raw checkpoint, as the official code).

    Defaults are the official ``config.yaml`` ``swad_kwargs``. The official trainer also closes a segment after
    the very first step (it evaluates at step 0); Lightning validates after ``val_check_interval`` steps, so the
    first segment here is a whole interval.

    Args:
        n_converge, n_tolerance, tolerance_ratio: the loss-valley rule (3, 6, 0.3).
        monitor: the validation metric that traces the valley (lower is better).
        module: the attribute of the LightningModule whose weights are averaged (``student``).
        stop_on_dead_valley: end training when the valley is dead.
        bn_update_batches: after averaging, re-estimate BatchNorm statistics over this many training batches
            (official: 500 when BatchNorm is not frozen, else none). 0 keeps the buffers of the segment the valley
            started from.
        save_path: write a checkpoint of the averaged model here after training (relative to the working folder).
    """

    def __init__(
        self,
        n_converge: int = 3,
        n_tolerance: int = 6,
        tolerance_ratio: float = 0.3,
        monitor: str = "val/loss",
        module: str = "student",
        stop_on_dead_valley: bool = True,
        bn_update_batches: int = 0,
        save_path: str | None = None,
    ) -> None:
        super().__init__()
        self.n_converge, self.n_tolerance, self.tolerance_ratio = n_converge, n_tolerance, tolerance_ratio
        LossValley(n_converge, n_tolerance, tolerance_ratio)  # validates the arguments early
        if bn_update_batches < 0:
            raise ValueError(f"SWAD.bn_update_batches must be ≥ 0, got {bn_update_batches}")
        self.monitor, self.module_name = monitor, module
        self.stop_on_dead_valley = stop_on_dead_valley
        self.bn_update_batches = bn_update_batches
        self.save_path = save_path
        self.valley = LossValley(n_converge, n_tolerance, tolerance_ratio)
        self.segment: Segment | None = None
        self.result: dict[str, Any] = {}
        self._last_step = -1

    def _module(self, pl_module: L.LightningModule) -> nn.Module:
        module = getattr(pl_module, self.module_name, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"SWAD.module: the LightningModule has no submodule {self.module_name!r}")
        return module

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.valley = LossValley(self.n_converge, self.n_tolerance, self.tolerance_ratio)
        self.segment, self.result, self._last_step = None, {}, trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: no optimizer step on this batch
            return
        self._last_step = step
        module = self._module(pl_module)
        params = {k: p.detach() for k, p in module.named_parameters() if p.is_floating_point()}
        if self.segment is None:
            self.segment = Segment(
                params={k: p.to(torch.float64 if p.dtype == torch.float64 else torch.float32, copy=True)
                        for k, p in params.items()},
                buffers={k: b.detach().clone() for k, b in module.named_buffers()},
                start_step=step,
                end_step=step,
            )
            return
        seg = self.segment
        for name, mean in seg.params.items():
            mean.add_((params[name].to(mean.dtype) - mean) / (seg.count + 1))
        seg.count += 1
        seg.end_step = step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or self.segment is None:
            return
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(
                f"SWAD.monitor: {self.monitor!r} was not logged by validation; logged: "
                f"{sorted(trainer.callback_metrics)}"
            )
        segment, self.segment = self.segment, None
        segment.loss = float(trainer.callback_metrics[self.monitor])
        segment.params = {k: v.cpu() for k, v in segment.params.items()}
        segment.buffers = {k: v.cpu() for k, v in segment.buffers.items()}
        was_dead = self.valley.dead
        self.valley.update(segment)
        if self.valley.dead and not was_dead:
            rank_zero_info(f"SWAD: the loss valley is dead at step {segment.end_step}")
            if self.stop_on_dead_valley:
                trainer.should_stop = True

    @torch.no_grad()
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        final = self.valley.final()
        if final is None:
            rank_zero_info("SWAD: no validation closed a segment during training; the weights are left as they are")
            return
        params, buffers, (start, end) = final
        module = self._module(pl_module)
        for name, p in module.named_parameters():
            if name in params:
                p.copy_(params[name].to(device=p.device, dtype=p.dtype))
        for name, b in module.named_buffers():
            if name in buffers:
                b.copy_(buffers[name].to(device=b.device, dtype=b.dtype))
        if self.bn_update_batches:
            self._update_bn(trainer, module)
        average = self.valley.average
        self.result = {
            "converged": self.valley.converged,
            "dead_valley": self.valley.dead,
            "start_step": start,
            "end_step": end,
            "segments": average.count if average is not None else 1,
            "threshold": self.valley.threshold,
        }
        rank_zero_info(
            f"SWAD: averaged steps {start}-{end} ({self.result['segments']} segment(s); converged "
            f"{self.result['converged']}, dead valley {self.result['dead_valley']})"
        )
        if self.save_path:
            Path(self.save_path).parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(self.save_path)

    def _update_bn(self, trainer: L.Trainer, module: nn.Module) -> None:
        norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        momenta = {m: m.momentum for m in norms}
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches, as torch.optim.swa_utils.update_bn
        was_training = module.training
        module.train()
        device = next(module.parameters()).device
        for i, batch in enumerate(trainer.train_dataloader):
            if i >= self.bn_update_batches:
                break
            x = batch["image"] if isinstance(batch, dict) else batch[0]
            module(x.to(device))
        for m, momentum in momenta.items():
            m.momentum = momentum
        module.train(was_training)
