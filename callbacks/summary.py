"""A printed summary at the end of fit: who taught whom, and how well."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["FitSummary"]


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


class FitSummary(L.Callback):
    """Prints a table at the end of ``fit``: method, teacher and student (parameters, held-out top-1), agreement.

    The numbers are the last validation epoch's (``val/acc``, ``val/teacher_acc``, ``val/agreement``), i.e. on
    the validation split, which is held out from training. ``summary`` is also kept as a dict for programs.

    Args:
        enabled: print the table (the dict is filled either way).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.summary: dict[str, Any] = {}
        self._start = 0.0
        self.score_name = "val top-1"
        self._keys = ("val/acc", "val/teacher_acc", "val/agreement")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        names = pl_module.describe() if hasattr(pl_module, "describe") else {"method": type(pl_module).__name__}
        teacher = getattr(pl_module, "teacher", None)
        score, teacher_score, agreement, self.score_name = getattr(
            pl_module, "summary_keys", ("val/acc", "val/teacher_acc", "val/agreement", "val top-1")
        )
        self.summary = {
            **names,
            "student_params": _count(getattr(pl_module, "student", pl_module)),
            "teacher_params": _count(teacher),
            "epochs": trainer.current_epoch,
            "seconds": round(time.perf_counter() - self._start, 1),
            "log_dir": trainer.log_dir,
            **{k: metrics[k] for k in ("val/acc", "val/acc5", "val/teacher_acc", "val/agreement") if k in metrics},
            **{k: metrics[k] for k in (score, teacher_score, agreement) if k in metrics},
        }
        self._keys = (score, teacher_score, agreement)
        self.agreement_name = getattr(pl_module, "agreement_name", "top-1")
        # a method that trains without a teacher (a teacher, a baseline) trains a model, not a student
        self.role = "student" if getattr(pl_module, "requires_teacher", True) else "model"
        if self.enabled:
            self._print()

    @rank_zero_only
    def _print(self) -> None:
        from rich.console import Console
        from rich.table import Table

        s = self.summary
        table = Table(title=f"{s['method']}: {s['epochs']} epochs in {s['seconds']} s", show_header=True)
        score, teacher_score, agreement = self._keys
        for col in ("", "model", "parameters", self.score_name):
            table.add_column(col)
        if "teacher" in s:
            table.add_row("teacher", s["teacher"], f"{s['teacher_params']:,}", _pct(s.get(teacher_score)))
        table.add_row(getattr(self, "role", "student"), s["student"], f"{s['student_params']:,}", _pct(s.get(score)))
        console = Console()
        console.print(table)
        if agreement in s:
            kind = getattr(self, "agreement_name", "top-1")
            console.print(f"student–teacher {kind} agreement: {_pct(s[agreement])}")
        console.print(f"logs, config and checkpoints: {s['log_dir']}")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"
