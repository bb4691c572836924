"""The shared base of every distillation method: student, frozen teacher, weighted loss terms, metrics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from zoo.data.base import ZooDataModule
from zoo.models.sources import ModelSource, build_model, source_from_config
from zoo.soft_labels import (
    MANIFEST,
    CachedSoftLabelDataset,
    SoftLabelCache,
    SoftLabels,
    build_soft_label_cache,
    dataset_fingerprint,
    soft_labels_to_logits,
    teacher_fingerprint,
)
from zoo.teacher import FeatureTaps, Teacher

__all__ = ["DistillationMethod", "Outputs", "ModelLike", "TeacherLike"]

ModelLike = ModelSource | nn.Module
TeacherLike = ModelSource | nn.Module | list[ModelSource]
_NO_CACHE = (
    "{}.soft_labels: this method reads more of the teacher than its logits at one temperature, so cached soft labels "
    "cannot replace it (KD and DKD support them)"
)
# Checkpoints made from Python store sources as {"class_path", "init_args"} dicts; loading passes them back.


@dataclass
class Outputs:
    """What one forward pass of a network gives the losses: logits and the tapped features."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


def _as_config(value: Any) -> Any:
    if isinstance(value, ModelSource):
        return value.to_config()
    if isinstance(value, (list, tuple)):
        return [_as_config(v) for v in value]
    return value


def _num_classes_of(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    for module in reversed(list(model.modules())):
        if isinstance(module, nn.Linear):
            return module.out_features
    return None


class DistillationMethod(L.LightningModule):
    """Base LightningModule: a student, an optional frozen teacher, and loss terms that subclasses define.

    Subclasses implement :meth:`loss_terms` (a dict of already-weighted loss tensors), or their own
    ``training_step`` when one forward of student and teacher cannot give the terms; the base sums them, logs
    each as ``train/loss_<name>`` and the total as ``train/loss``, and reports top-1/top-5 (``val/acc``,
    ``val/acc5``), the teacher's top-1 (``val/teacher_acc``) and student–teacher top-1 agreement
    (``val/agreement``). Subclasses that need intermediate features set ``student_taps`` / ``teacher_taps``.

    The teacher is held outside the registered submodules: ``parameters()``, ``state_dict()`` and DDP never see
    it, ``train()`` never reaches it, and device/dtype moves (``_apply``) carry it along. A checkpoint therefore
    holds the student only; loading one rebuilds the teacher from its source.

    Args:
        student: the network to train (a ``zoo.models`` source or a ready ``nn.Module``).
        teacher: a source, a list of sources (an ensemble), a ready module, or ``None``.
        num_classes: classes of the data (linked from the data module by the CLI).
        in_chans: input channels of the data (linked from the data module by the CLI).
        optimizer: optimizer factory over the trainable parameters; default SGD(lr=0.05, momentum=0.9,
            weight_decay=5e-4), the CIFAR-100 KD recipe of mdistiller.
        lr_scheduler: scheduler factory (stepped per epoch), or ``None`` for a constant lr.
        teacher_ensemble: how ensemble members are combined (``prob``: mean of softmax; ``logit``: mean logit).
        lr_scheduler_interval: step the scheduler every ``epoch`` or every optimizer ``step`` (iteration-based
            recipes such as segmentation's poly schedule).
        channels_last: keep the student's convolution weights and the input batches channels-last (with bf16
            autocast on recent NVIDIA GPUs this is the fast layout; the teacher follows ``teacher_channels_last``).
        teacher_channels_last: run the teacher in channels-last memory format (``None``: on CUDA devices only,
            where cuDNN/Tensor Cores gain from it; on CPUs it can be slower).
        teacher_compile: ``torch.compile`` the teacher alone (``true``, or a dict of ``torch.compile`` options such
            as ``{mode: max-autotune}``); the student and the loss stay eager.
        soft_labels: cached soft labels (``zoo.soft_labels.SoftLabels``: ``{path, repeats, top_k, ...}``): the
            teacher labels pre-sampled augmentations once at fit start and training replays them, so it never
            runs during training. Only for methods that read the teacher through its logits at one temperature
            (KD, DKD); validation still runs the teacher.

    Teacher fast path: the teacher runs under ``torch.no_grad`` in eval mode, inside the same autocast region as
    the student (Lightning's ``precision: bf16-mixed`` / ``16-mixed`` covers the whole training step), takes the
    student's normalised batch through an affine re-normalisation, and optionally runs channels-last and compiled.

    Methods take ``student`` and ``teacher`` positionally, their own options by keyword, and pass the arguments
    above through ``**kwargs`` (LightningCLI/jsonargparse resolves them from this signature).
    """

    student_taps: Sequence[str] = ()
    teacher_taps: Sequence[str] = ()
    requires_teacher: bool = True
    #: The metrics the fit summary prints: (student, teacher, agreement, what the score is called).
    summary_keys: tuple[str, str, str, str] = ("val/acc", "val/teacher_acc", "val/agreement", "val top-1")
    agreement_name: str = "top-1"

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike | None = None,
        num_classes: int | None = None,
        in_chans: int | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        teacher_ensemble: Literal["prob", "logit"] = "prob",
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        channels_last: bool = False,
        teacher_channels_last: bool | None = None,
        teacher_compile: bool | dict[str, Any] = False,
        soft_labels: SoftLabels | None = None,
    ) -> None:
        super().__init__()
        cls = type(self)
        if cls.loss_terms is DistillationMethod.loss_terms and cls.training_step is DistillationMethod.training_step:
            raise TypeError(f"{cls.__name__} defines no loss: override loss_terms (or training_step)")
        ignore = [name for name, value in (("student", student), ("teacher", teacher)) if isinstance(value, nn.Module)]
        self.save_hyperparameters(ignore=ignore + ["optimizer", "lr_scheduler"])
        # Sources are kept as config data, so checkpoints load with torch.load(weights_only=True).
        for name, value in (("student", student), ("teacher", teacher)):
            if name in self.hparams:
                self.hparams[name] = _as_config(value)
        if isinstance(soft_labels, dict):
            soft_labels = SoftLabels(**soft_labels)
        if soft_labels is not None:
            self.hparams["soft_labels"] = asdict(soft_labels)
            if type(self).cached_soft_label_temperature is DistillationMethod.cached_soft_label_temperature:
                raise ValueError(_NO_CACHE.format(type(self).__name__))
        self.soft_labels = soft_labels
        if teacher is None and self.requires_teacher:
            raise ValueError(f"{type(self).__name__}.teacher is required (a zoo.models source, a list, or a module)")
        # A plain dict, so that a module passed as the source is not registered a second time.
        self._sources: dict[str, Any] = {"student": student, "teacher": teacher}
        self.student = build_model(student, num_classes=num_classes, in_chans=self.student_in_chans(in_chans))
        resolved = num_classes if num_classes is not None else _num_classes_of(self.student)
        if resolved is None:
            raise ValueError(f"{type(self).__name__}.num_classes: not given and not readable from the student")
        self.num_classes = resolved
        self._teacher: list[Teacher] = []
        if teacher is not None:
            self._teacher.append(
                Teacher.from_sources(
                    teacher,
                    num_classes=resolved,
                    in_chans=self.teacher_in_chans(in_chans),
                    ensemble=teacher_ensemble,
                    taps=self.teacher_taps,
                )
            )
        self._student_taps = FeatureTaps(self.student, self.student_taps) if self.student_taps else None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}")
        self.lr_scheduler_interval = lr_scheduler_interval
        self.channels_last = channels_last
        self.teacher_channels_last = teacher_channels_last
        self.teacher_compile = teacher_compile
        self.build_metrics(resolved)

    def build_metrics(self, num_classes: int) -> None:
        """Creates the metric modules (classification here; segmentation methods override)."""
        top5 = min(5, num_classes)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "acc5": MulticlassAccuracy(num_classes, top_k=top5, average="micro"),
            }
        )
        self.train_metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro")}, prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_teacher = MetricCollection({"teacher_acc": MulticlassAccuracy(num_classes, average="micro")}, prefix="val/")
        self.val_agreement = MulticlassAccuracy(num_classes, average="micro")
        self.test_teacher = self.val_teacher.clone(prefix="test/")
        self.test_agreement = MulticlassAccuracy(num_classes, average="micro")

    def student_in_chans(self, in_chans: int | None) -> int | None:
        """Input channels the student is built with (LAD's teacher stage adds its label channel)."""
        return in_chans

    def teacher_in_chans(self, in_chans: int | None) -> int | None:
        """Input channels the teacher is built with (LAD's label-assisted teacher takes one more)."""
        return in_chans

    # ----------------------------------------------------------------------------------------------- teacher
    @property
    def teacher(self) -> Teacher | None:
        """The frozen teacher (not a registered submodule, on purpose)."""
        return self._teacher[0] if self._teacher else None

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001 - nn.Module's private signature
        super()._apply(fn, *args, **kwargs)
        for teacher in self._teacher:
            teacher._apply(fn, *args, **kwargs)
        return self

    def _sync_teacher(self) -> None:
        # Strategies that place parameters themselves (FSDP, DeepSpeed) may not call .to() on the module.
        for teacher in self._teacher:
            teacher.to(self.device)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if self.teacher is not None and mean is not None and std is not None:
            self.teacher.set_input_normalization(mean, std)

    def _configure_teacher(self) -> None:
        if self.teacher is None:
            return
        channels_last = self.teacher_channels_last
        if channels_last is None:
            channels_last = self.device.type == "cuda"
        self.teacher.set_fast_path(channels_last=channels_last, compile=self.teacher_compile)

    def on_fit_start(self) -> None:
        self._sync_teacher()
        if self.channels_last:
            self.student.to(memory_format=torch.channels_last)
        self._configure_teacher()
        if self.soft_labels is not None:
            self._prepare_soft_labels()

    def on_validation_start(self) -> None:
        self._sync_teacher()
        self._configure_teacher()

    def on_test_start(self) -> None:
        self._sync_teacher()

    def on_predict_start(self) -> None:
        self._sync_teacher()

    # ----------------------------------------------------------------------------------------------- soft labels
    def cached_soft_label_temperature(self) -> float | None:
        """The one temperature at which the loss reads the teacher's logits, or ``None`` when cached soft labels
        cannot stand in for the teacher (the default: the method needs features or several temperatures)."""
        return None

    def _prepare_soft_labels(self) -> None:
        """Builds the cache when missing (each rank its shards), checks it, swaps the data module's train set."""
        opts = self.soft_labels
        if self.cached_soft_label_temperature() is None or self.teacher_taps:
            raise ValueError(_NO_CACHE.format(type(self).__name__))
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, ZooDataModule) or datamodule.semi_supervised:
            raise ValueError(
                f"{type(self).__name__}.soft_labels needs a (fully supervised) zoo data module to replay its "
                "augmentation; pass data: (a ZooDataModule) rather than loaders"
            )
        source, augment, to_tensor = datamodule.replay_source()
        temperature = float(self.cached_soft_label_temperature())
        fingerprint = {
            "teacher": teacher_fingerprint(self.teacher),
            "data": f"{datamodule.name}:{dataset_fingerprint(source)}",
            "augmentation": augment.spec(),
            "normalization": [[round(float(v), 6) for v in datamodule.mean], [round(float(v), 6) for v in datamodule.std]],
        }
        expected = {**fingerprint, "temperature": temperature, "num_classes": self.num_classes,
                    "top_k": opts.stored_k(self.num_classes),
                    "repeats": opts.repeats, "seed": opts.seed}
        manifest = Path(opts.path) / MANIFEST
        complete = manifest.is_file() and json.loads(manifest.read_text()).get("complete")
        if not complete:
            strategy = self.trainer.strategy
            rank, world = self.trainer.global_rank, self.trainer.world_size
            kwargs = {"num_classes": self.num_classes, "temperature": temperature, "options": opts,
                      "to_tensor": to_tensor, "device": self.device, "num_workers": datamodule.num_workers}
            num_shards = -(-len(source) // opts.shard_size)
            if rank == 0:  # writes (or checks) the header first
                build_soft_label_cache(opts.path, self.teacher, source, augment, fingerprint, shards=[], **kwargs)
            strategy.barrier("soft_labels_header")
            build_soft_label_cache(opts.path, self.teacher, source, augment, fingerprint,
                                   shards=range(rank, num_shards, world), **kwargs)
            strategy.barrier("soft_labels_shards")
            if rank == 0:  # marks the cache complete once every shard is there
                build_soft_label_cache(opts.path, self.teacher, source, augment, fingerprint, shards=[], **kwargs)
            strategy.barrier("soft_labels_done")
        cache = SoftLabelCache(opts.path, expected)
        datamodule.train_set = CachedSoftLabelDataset(source, cache, augment, to_tensor)

    def cached_teacher_outputs(self, batch: dict[str, Tensor]) -> Outputs:
        """The teacher's stored answer for the replayed views of a cached batch, as pseudo-logits."""
        temperature = float(self.cached_soft_label_temperature())
        return Outputs(soft_labels_to_logits(batch["soft_index"], batch["soft_prob"], self.num_classes, temperature))

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """Student logits (what inference and exported checkpoints use)."""
        return self.student(x)

    def forward_student(self, x: Tensor) -> Outputs:
        if self._student_taps is None:
            return Outputs(self.student(x))
        logits, feats = self._student_taps(x)
        return Outputs(logits, feats)

    def forward_teacher(self, x: Tensor) -> Outputs | None:
        if self.teacher is None:
            return None
        logits, feats = self.teacher.forward_features(x)
        return Outputs(logits, feats)

    def loss_terms(self, student: Outputs, teacher: Outputs | None, target: Tensor) -> dict[str, Tensor]:
        """The weighted loss terms of one batch, by name (``ce``, ``kd`` ...); their sum is minimised.

        The base training step computes them from one student and one teacher forward. Methods whose terms need
        more than that (the MAE family's shared mask, MGD's unlabelled batches) compute them in their own
        ``training_step`` and leave this empty; a method must override one of the two (checked at construction).
        """
        return {}

    # ----------------------------------------------------------------------------------------------- steps
    @staticmethod
    def unpack_batch(batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, dict):
            return batch["image"], batch["label"]
        return batch[0], batch[1]

    def prepare_input(self, x: Tensor) -> Tensor:
        """The batch in the student's memory format (channels-last when ``channels_last`` is set)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.unpack_batch(batch)
        x = self.prepare_input(x)
        # Teacher first: its activations are freed before the student's graph is built (lower peak memory, and
        # about 7 % less step time for resnet32x4 → resnet8x4 on a CPU: benchmarks/teacher_order.py, throughput_kd.py).
        if isinstance(batch, dict) and "soft_prob" in batch:
            teacher = self.cached_teacher_outputs(batch)
        else:
            teacher = self.forward_teacher(x)
        student = self.forward_student(x)
        terms = self.loss_terms(student, teacher, y)
        loss = self.log_loss_terms(terms, x.shape[0])
        # update(), not forward(): the metrics are logged per epoch only, so forward's per-batch value would be
        # computed and thrown away (a few small kernels and host time every step).
        self.train_metrics.update(student.logits.detach(), y)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    def log_loss_terms(self, terms: dict[str, Tensor], batch_size: int) -> Tensor:
        """Logs each term as ``train/loss_<name>`` and their sum as ``train/loss``; returns the sum."""
        loss = torch.stack(list(terms.values())).sum()
        self.log_dict({f"train/loss_{k}": v.detach() for k, v in terms.items()}, batch_size=batch_size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> dict[str, Tensor]:
        """Updates the metrics; returns the logits so callbacks (monitor, gallery) need no second forward."""
        x, y = self.unpack_batch(batch)
        x = self.prepare_input(x)
        logits = self(x)
        bs = x.shape[0]
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), batch_size=bs)
        self.log_dict(metrics, batch_size=bs, prog_bar=stage == "val")
        if self.teacher is not None:
            t_logits = self.teacher(x)
            teacher_metrics = self.val_teacher if stage == "val" else self.test_teacher
            agreement = self.val_agreement if stage == "val" else self.test_agreement
            teacher_metrics.update(t_logits, y)
            agreement.update(logits, t_logits.argmax(1))
            self.log_dict(teacher_metrics, batch_size=bs)
            self.log(f"{stage}/agreement", agreement, batch_size=bs)
            return {"logits": logits, "teacher_logits": t_logits, "target": y}
        return {"logits": logits, "target": y}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(-1)

    # ----------------------------------------------------------------------------------------------- optim
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates: the student and any heads the method adds, never the teacher."""
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; methods with their own lr for a module (MEAL V2's discriminator) override."""
        return [{"params": self.trainable_parameters()}]

    def configure_optimizers(self) -> Any:
        params = self.param_groups()
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval}}

    # ----------------------------------------------------------------------------------------------- info
    def describe(self) -> dict[str, str]:
        """Names of the student and teacher for summaries and model cards."""

        def name(source: Any, module: nn.Module) -> str:
            if isinstance(source, dict):
                source = source_from_config(source)
            return source.describe() if isinstance(source, ModelSource) else type(module).__name__

        out = {"method": type(self).__name__, "student": name(self._sources["student"], self.student)}
        if self.teacher is not None:
            out["teacher"] = self.teacher.describe()
        return out
