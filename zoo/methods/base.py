"""The base of every distillation method: a student, frozen teachers, logged loss terms, optimizers."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import Tensor, nn

from zoo.divergence import check_finite_state, check_finite_terms
from zoo.models.sources import ModelSource, as_config, build_model, source_from_config
from zoo.step_logging import log_loss_values, log_stopped_step
from zoo.teacher import Teacher, freeze

__all__ = ["DistillationMethod", "ModelLike", "Outputs", "TeacherLike"]

ModelLike = ModelSource | nn.Module
TeacherLike = ModelSource | nn.Module | list[ModelSource]


@dataclass
class Outputs:
    """What one forward pass of a network gives the losses: logits and the tapped features."""
    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


def _holds(value: Any, kinds: type | tuple[type, ...]) -> bool:
    return isinstance(value, kinds) or (isinstance(value, (list, tuple)) and any(isinstance(v, kinds) for v in value))


def _init_arguments(frame: Any) -> dict[str, Any]:
    """Every init argument of the subclass chain whose ``__init__`` frames end at ``frame`` (Lightning's own walk)."""
    return {k: v for level in collect_init_args(frame, [], classes=(HyperparametersMixin,)) for k, v in level.items()}


class DistillationMethod(L.LightningModule):
    """A student, its frozen teachers and the loss terms a method defines: the task-neutral base of every family.

    ``__init__`` records every init argument of the subclass chain once as hyper-parameters (model sources as config
    dicts; modules and optimizer factories left out), then calls :meth:`configure_models`, :meth:`configure_losses`
    and :meth:`configure_metrics`, which read ``self.hparams`` (torchgeo's ``BaseTask``). Family bases add the
    task's step, metrics and :meth:`evaluate`; a method adds its loss. Teachers (:meth:`add_teacher`) live outside
    the registered submodules: never in ``parameters()``, ``state_dict()``, the optimizer or DDP, never reached by
    ``train()``, moved with the method, rebuilt from their sources when a checkpoint is loaded.

    Args:
        student, teacher: sources (``zoo.models``; a list of teachers is an ensemble) or ready modules.
        num_classes, in_chans: of the data (linked from the data module by the CLI).
        optimizer: factory over :meth:`param_groups`; default SGD(lr 0.05, momentum 0.9, weight decay 5e-4).
        lr_scheduler: factory, or ``None`` for a constant lr; stepped every ``lr_scheduler_interval``.
    """

    requires_teacher: ClassVar[bool] = True
    #: What the fit summary prints: (student metric, teacher metric, agreement metric, what the score is called).
    summary_keys: ClassVar[tuple[str, str, str, str]] = ("val/acc", "val/teacher_acc", "val/agreement", "val top-1")

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike | None = None,
        *,
        num_classes: int | None = None,
        in_chans: int | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
    ) -> None:
        super().__init__()
        if type(self).training_step is L.LightningModule.training_step:
            raise TypeError(f"{type(self).__name__} defines no training_step (family bases and methods define it)")
        arguments = _init_arguments(inspect.currentframe())
        # Arguments as given (modules too) for building; hparams are config data only (weights_only checkpoints)
        self.sources: dict[str, Any] = {k: v for k, v in arguments.items() if _holds(v, (nn.Module, ModelSource))}
        hparams = {k: as_config(v) for k, v in arguments.items() if not _holds(v, nn.Module)}
        hparams = {k: v for k, v in hparams.items() if k not in ("optimizer", "lr_scheduler")}
        # LightningCLI's class path and instantiator, so `zoo test --ckpt_path` and load_from_checkpoint rebuild it
        given = _given_hyperparameters.get() or {}
        self.save_hyperparameters({**{k: given[k] for k in ("_class_path", "_instantiator") if k in given}, **hparams})
        if teacher is None and self.requires_teacher:
            raise ValueError(f"{type(self).__name__}.teacher is required (a zoo.models source, a list, or a module)")
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self._teachers: dict[str, nn.Module] = {}
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    def source(self, name: str) -> Any:
        """The init argument ``name`` as given (module or source object), else its config data."""
        return self.sources.get(name, self.hparams.get(name))

    def build_student(self) -> nn.Module:
        return build_model(self.source("student"), self.hparams.num_classes, self.hparams.in_chans)

    def build_teacher(self) -> nn.Module:
        return Teacher.from_sources(self.source("teacher"), self.hparams.num_classes, self.hparams.in_chans)

    def configure_models(self) -> None:
        """Builds ``self.student`` and, when one is given, the teacher named ``teacher``."""
        self.student = self.build_student()
        if self.source("teacher") is not None:
            self.add_teacher("teacher", self.build_teacher())

    def configure_losses(self) -> None:
        """Creates the loss modules."""

    def configure_metrics(self) -> None:
        """Creates the metric modules."""

    def add_teacher(self, name: str, module: nn.Module) -> nn.Module:
        """Freezes ``module`` and holds it as teacher ``name``, outside the registered submodules."""
        self._teachers[name] = freeze(module)
        return module

    @property
    def teacher(self) -> Any:  # the teacher named ``teacher`` (``None`` without one)
        return self._teachers.get("teacher")

    @property
    def teachers(self) -> dict[str, nn.Module]:
        return dict(self._teachers)  # a copy: teachers are added with add_teacher

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001 - nn.Module's private signature
        super()._apply(fn, *args, **kwargs)
        for teacher in self._teachers.values():
            teacher._apply(fn, *args, **kwargs)
        return self

    def on_fit_start(self) -> None:  # strategies that place parameters (FSDP, DeepSpeed) may not call .to()
        for teacher in self._teachers.values():
            teacher.to(self.device).eval()

    on_validation_start = on_test_start = on_predict_start = on_fit_start

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        mean, std = getattr(data, "mean", None), getattr(data, "std", None)
        if mean is not None and std is not None:
            for teacher in self._teachers.values():
                if isinstance(teacher, Teacher):
                    teacher.set_input_normalization(mean, std)

    def log_loss_terms(self, terms: Mapping[str, Tensor], batch_size: int) -> Tensor:
        """Logs the terms as ``train/loss_<name>``, their sum as ``train/loss`` (zoo.step_logging); returns the sum."""
        loss = torch.stack(list(terms.values())).sum()
        check_finite_terms(terms, loss, self.global_step)
        log_loss_values(self, terms, loss, batch_size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:  # Lightning writes a stop's step
        log_stopped_step(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_finite_state(checkpoint["state_dict"], f"checkpoint at step {self.global_step}")

    def evaluate(self, batch: Any, stage: Literal["val", "test"], batch_idx: int = 0) -> dict[str, Tensor]:
        """Updates and logs the ``<stage>/...`` metrics of one batch; returns tensors for callbacks."""
        return {}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.evaluate(batch, "val", batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.evaluate(batch, "test", batch_idx)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates: the student and any heads the method adds, never a teacher."""
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; methods with their own lr for a module override."""
        return [{"params": self.trainable_parameters()}]

    def configure_optimizers(self) -> Any:
        params = self.param_groups()
        sgd = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4)
        optimizer = (self.optimizer_factory or sgd)(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        schedule = {"scheduler": self.lr_scheduler_factory(optimizer), "interval": self.hparams.lr_scheduler_interval}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def describe(self) -> dict[str, str]:
        """Names of the method, student and teacher(s) for summaries and model cards."""
        source = self.source("student")
        source = source_from_config(source) if isinstance(source, Mapping) else source
        student = source.describe() if isinstance(source, ModelSource) else type(self.student).__name__
        names = [t.describe() if isinstance(t, Teacher) else type(t).__name__ for t in self._teachers.values()]
        return {"method": type(self).__name__, "student": student, **({"teacher": " + ".join(names)} if names else {})}
