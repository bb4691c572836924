"""Vision-language distillation: the family base (:class:`VLMMethod`) and supervised training of VLMs.

Every VLM method runs the same step: the teacher (when the loss reads it) under ``torch.no_grad``, then the student,
on one batch of ``zoo.data.vqa`` (token ids with each image expanded to its visual tokens, labels on the answers);
:meth:`VLMMethod.loss_terms` turns the two :class:`zoo.models.vlm.VLMOutput` into weighted terms.

Evaluation (``val/...``, ``test/...``):
    acc        the answer is exactly right: every labelled token is the argmax of the logits before it, i.e. greedy
               decoding would produce exactly the reference answer (and its end token);
    teacher_acc the same for the teacher, computed in the first evaluation epoch only (the teacher is frozen);
    agreement  student and teacher give the same greedy answer;
    loss_<term> the method's loss terms on the evaluation batch.

``zoo predict`` decodes greedily an answer to the question of each sample (its tokens before the first labelled one)
and prints ``question → answer``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from zoo.losses.functional import at_least_float32
from zoo.methods.base import DistillationMethod, ModelLike, TeacherLike
from zoo.models.sources import ModelSource, build_model, source_from_config

__all__ = ["VLMMethod", "VLMSupervised", "WarmupCosineLR", "answer_correct", "next_token_loss", "prompts_from_batch"]

IGNORE_INDEX = -100
_GROUPS = ("vision_tower", "projector", "language_model")


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The language-modelling CE: mean over labelled tokens of −log softmax(z_i)[labels_{i+1}] (shifted)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        at_least_float32(logits[:, :-1]).reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def answer_correct(logits: Tensor, labels: Tensor) -> Tensor:
    """(B,) bool: every labelled token is the argmax of the logits before it (teacher-forced greedy exact match)."""
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    hit = (logits[:, :-1].argmax(-1) == target) | ~mask
    return hit.all(1) & mask.any(1)


def _same_answer(a: Tensor, b: Tensor, labels: Tensor) -> Tensor:
    mask = labels[:, 1:] != IGNORE_INDEX
    return ((a[:, :-1].argmax(-1) == b[:, :-1].argmax(-1)) | ~mask).all(1)


def prompts_from_batch(batch: Mapping[str, Any], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded prompts (ids, attention mask): each sample's tokens before its first labelled token (all of them
    when it has no label)."""
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prompts = []
    for i in range(ids.shape[0]):
        labelled = torch.nonzero(labels[i] != IGNORE_INDEX, as_tuple=True)[0]
        end = int(labelled[0]) if labelled.numel() else int(attn[i].sum())
        prompts.append(ids[i, :end])
    length = max(len(p) for p in prompts)
    out = torch.full((len(prompts), length), pad_id, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros_like(out)
    for i, p in enumerate(prompts):
        out[i, length - len(p) :], mask[i, length - len(p) :] = p, 1
    return out, mask


class VLMMethod(DistillationMethod, ABC):
    """Base of the vision-language methods: VLM student and teacher, compatibility checks, exact-answer metrics.

    Student and teacher are :class:`zoo.models.vlm.VisionLanguageModel` sources (``LlavaModel``,
    ``HFVisionLanguageModel``, ``zoo.hub.Pretrained``). At construction the method checks what its loss needs of the
    pair (same vocabulary, or both at least ``vocab_slice``; same image token id; the same number of visual tokens
    when a term reads the visual positions), and at setup what it needs of the data (its image token id, its
    visual tokens per image and its vocabulary fit the models). A mismatch fails with one line naming both values.

    Args:
        trainable: what the optimiser trains: parameter groups (``vision_tower``, ``projector``,
            ``language_model``) and/or substrings of parameter names (``experts``, ``router``); everything else is
            frozen. ``None``: the method's default (all but a frozen vision tower unless a method says otherwise).
        vocab_slice: compare teacher and student on their first ``vocab_slice`` logits (LLaVA-MoD's 151,936: the
            teacher's padded Qwen vocabulary); ``None`` requires equal vocabularies.
        max_new_tokens: longest answer ``zoo predict`` generates.
        eval_loss_terms: log the loss terms on the evaluation batches (needs a teacher forward each epoch).
        print_predictions: print ``question → answer`` lines in ``predict``.
        shard_teacher: under a distributed strategy (``fsdp`` on GPUs, or ``ddp``), wrap the frozen teacher in
            PyTorch FSDP (full sharding, each decoder/ViT block a unit, or the FSDP strategy's ``auto_wrap_policy``),
            so each process holds 1/world of its weights; it stays outside the student's module and optimizer.
        **kwargs: the arguments of :class:`~zoo.methods.base.DistillationMethod`.
    """

    task = "vision-language"

    requires_teacher: ClassVar[bool] = False
    summary_keys: ClassVar[tuple[str, str, str, str]] = (
        "val/acc", "val/teacher_acc", "val/agreement", "val exact answer"
    )

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike | None = None,
        *,
        trainable: list[str] | None = None,
        vocab_slice: int | None = None,
        max_new_tokens: int = 16,
        eval_loss_terms: bool = True,
        print_predictions: bool = True,
        shard_teacher: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, **kwargs)

    # ----------------------------------------------------------------------------------------------- hooks
    def build_student(self) -> nn.Module:
        return build_model(self.source("student"), in_chans=self.hparams.in_chans)

    def build_teacher(self) -> nn.Module:
        return build_model(self.source("teacher"), in_chans=self.hparams.in_chans)

    def configure_models(self) -> None:
        self.student = self.build_student()
        if self.source("teacher") is not None:
            self.add_teacher("teacher", self.build_teacher())
        for model, role in ((self.student, "student"), (self.teacher, "teacher")):
            if model is not None and not hasattr(model, "image_token_id"):
                raise ValueError(f"{type(self).__name__}.{role}: {type(model).__name__} is not a vision-language model "
                                 "(use zoo.models.vlm.LlavaModel or zoo.models.vlm.HFVisionLanguageModel)")
        self.check_student()
        self.set_trainable(self.hparams.trainable if self.hparams.trainable is not None else self.default_trainable())

    def configure_losses(self) -> None:
        self.check_models()

    def configure_metrics(self) -> None:
        for stage in ("val", "test"):
            setattr(self, f"{stage}_acc", MeanMetric())
            setattr(self, f"{stage}_agreement", MeanMetric())
            setattr(self, f"{stage}_teacher_acc", MeanMetric())
        self._teacher_acc: dict[str, float] = {}

    def check_student(self) -> None:
        """Refuses a student the method cannot train (called after the models are built)."""

    # ----------------------------------------------------------------------------------------------- what trains
    def default_trainable(self) -> list[str] | None:
        """The trainable parts when ``trainable`` is not given (``None``: leave the student's own settings)."""
        return None

    def set_trainable(self, names: Sequence[str] | None) -> None:
        """Makes exactly the named groups / name substrings of the student trainable (``None``: no change)."""
        if names is None:
            return
        used = {n: False for n in names}
        for pname, p in self.student.named_parameters():
            group = self.student.group_of(pname)
            hit = [n for n in names if (n in _GROUPS and group == n) or (n not in _GROUPS and n in pname)]
            for n in hit:
                used[n] = True
            p.requires_grad_(bool(hit))
        unused = [n for n, u in used.items() if not u]
        if unused:
            raise ValueError(
                f"{type(self).__name__}.trainable: {unused} match no parameter of the student (groups: "
                f"{list(_GROUPS)}, or substrings of parameter names such as 'experts', 'router')"
            )

    # ----------------------------------------------------------------------------------------------- checks
    @property
    def uses_teacher(self) -> bool:
        """The loss reads the teacher (so the teacher runs in the training step)."""
        return self.teacher is not None

    @property
    def uses_visual_positions(self) -> bool:
        """A loss term reads the visual positions (then teacher and student need the same visual tokens)."""
        return False

    def _names(self) -> tuple[str, str]:
        return self.describe().get("student", "student"), self.describe().get("teacher", "teacher")

    def check_models(self) -> None:
        """Refuses a teacher/student pair the loss cannot compare (one line naming both values)."""
        t, s = self.teacher, self.student
        if t is None or not self.uses_teacher:
            return
        owner, (s_name, t_name) = type(self).__name__, self._names()
        cut = self.hparams.vocab_slice
        if cut is None and t.vocab_size != s.vocab_size:
            raise ValueError(
                f"{owner}: teacher vocabulary {t.vocab_size} ({t_name}) ≠ student vocabulary {s.vocab_size} "
                f"({s_name}); use one tokenizer or give vocab_slice (e.g. LLaVA-MoD's 151936)"
            )
        if cut is not None and min(t.vocab_size, s.vocab_size) < cut:
            raise ValueError(
                f"{owner}.vocab_slice {cut} exceeds the teacher vocabulary {t.vocab_size} or the student vocabulary "
                f"{s.vocab_size}"
            )
        if t.image_token_id != s.image_token_id:
            raise ValueError(
                f"{owner}: teacher image token id {t.image_token_id} ({t_name}) ≠ student image token id "
                f"{s.image_token_id} ({s_name}); teacher and student must read the same token sequence"
            )
        if self.uses_visual_positions and None not in (t.num_visual_tokens, s.num_visual_tokens) and (
            t.num_visual_tokens != s.num_visual_tokens
        ):
            raise ValueError(
                f"{owner}: teacher visual tokens per image {t.num_visual_tokens} ({t_name}) ≠ student "
                f"{s.num_visual_tokens} ({s_name}); the visual-position terms compare them one to one"
            )

    def check_data(self, datamodule: Any) -> None:
        """Refuses data whose image tokens or vocabulary do not fit the models."""
        if datamodule is None or not hasattr(datamodule, "image_token_id"):
            return
        owner = type(self).__name__
        for role, model in (("student", self.student), ("teacher", self.teacher)):
            if model is None:
                continue
            if datamodule.image_token_id != model.image_token_id:
                raise ValueError(
                    f"{owner}: the data marks images with token id {datamodule.image_token_id} but the {role} expects "
                    f"{model.image_token_id}; use the {role}'s processor in the data (processor: <model folder>)"
                )
            k_data, k_model = getattr(datamodule, "image_tokens", None), model.num_visual_tokens
            if None not in (k_data, k_model) and k_data != k_model:
                raise ValueError(
                    f"{owner}: the data gives {k_data} visual tokens per image but the {role} makes {k_model}; "
                    f"set data image_tokens: {k_model}"
                )
            vocab = getattr(datamodule, "vocab_size", None)
            if vocab is not None and vocab > model.vocab_size:
                raise ValueError(
                    f"{owner}: the data's tokenizer has {vocab} tokens but the {role} vocabulary only "
                    f"{model.vocab_size}"
                )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.check_data(getattr(self.trainer, "datamodule", None) if self._trainer is not None else None)

    # ----------------------------------------------------------------------------------------------- teacher sharding
    def shard_teacher(self) -> None:
        """Wraps the teacher in FSDP (``shard_teacher``); called at the start of fit/validate/test/predict."""
        if not self.hparams.shard_teacher or self.teacher is None:
            return
        import torch.distributed as dist
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if isinstance(self.teacher, FullyShardedDataParallel):
            return
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"{type(self).__name__}.shard_teacher needs a distributed strategy (fsdp or ddp), "
                             f"got {type(self.trainer.strategy).__name__}")
        policy = getattr(self.trainer.strategy, "kwargs", {}).get("auto_wrap_policy")
        if policy is None:
            blocks = {type(m[0]) for _, m in self.teacher.named_modules() if isinstance(m, nn.ModuleList) and len(m)}
            policy = ModuleWrapPolicy(blocks)
        wrapped = FullyShardedDataParallel(
            self.teacher, auto_wrap_policy=policy, sharding_strategy=ShardingStrategy.FULL_SHARD,
            device_id=self.device, use_orig_params=True,
        )
        self.add_teacher("teacher", wrapped)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.shard_teacher()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self.shard_teacher()

    def on_test_start(self) -> None:
        super().on_test_start()
        self.shard_teacher()

    # ----------------------------------------------------------------------------------------------- forward
    def run(self, model: nn.Module, batch: Mapping[str, Any], part: Mapping[str, Tensor] | None = None) -> Any:
        """One forward of ``model`` on the batch (or on ``part``, a chosen/rejected half of a preference batch)."""
        text = part if part is not None else batch
        return model(text["input_ids"], text["attention_mask"], **batch.get("images", {}))

    def forward(self, batch: Mapping[str, Any]) -> Any:
        """The student's :class:`~zoo.models.vlm.VLMOutput` on a batch."""
        return self.run(self.student, batch)

    def teacher_outputs(self, batch: Mapping[str, Any], part: Mapping[str, Tensor] | None = None) -> Any:
        with torch.no_grad():
            return self.run(self.teacher, batch, part)

    def cut(self, logits: Tensor) -> Tensor:
        """The logits the teacher and student are compared on (the first ``vocab_slice`` entries)."""
        cut = self.hparams.vocab_slice
        return logits[..., :cut] if cut is not None else logits

    @abstractmethod
    def loss_terms(self, student: Any, teacher: Any | None, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The weighted loss terms of one batch by name; their sum is minimised."""

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        teacher = self.teacher_outputs(batch) if self.uses_teacher else None
        student = self.run(self.student, batch)
        return self.log_loss_terms(self.loss_terms(student, teacher, batch), batch["input_ids"].shape[0])

    # ----------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, batch: Any, stage: Literal["val", "test"], batch_idx: int = 0) -> dict[str, Tensor]:
        labels, bs = batch["labels"], batch["input_ids"].shape[0]
        student = self.run(self.student, batch)
        correct = answer_correct(student.logits, labels)
        acc = getattr(self, f"{stage}_acc")
        acc.update(correct.float())
        self.log(f"{stage}/acc", acc, batch_size=bs, prog_bar=stage == "val")
        out = {"correct": correct}
        if self.teacher is None:
            return out
        need_teacher_acc = stage not in self._teacher_acc and not self.trainer.sanity_checking
        teacher = self.teacher_outputs(batch)
        if need_teacher_acc:
            getattr(self, f"{stage}_teacher_acc").update(answer_correct(teacher.logits, labels).float())
        agreement = getattr(self, f"{stage}_agreement")
        agreement.update(_same_answer(self.cut(student.logits), self.cut(teacher.logits), labels).float())
        self.log(f"{stage}/agreement", agreement, batch_size=bs)
        if self.hparams.eval_loss_terms and self.uses_teacher:
            terms = self.loss_terms(student, teacher, batch)
            self.log_dict({f"{stage}/loss_{k}": v.detach() for k, v in terms.items()}, batch_size=bs)
        return out

    def _log_teacher_acc(self, stage: str) -> None:
        if self.teacher is None or self.trainer.sanity_checking:
            return
        metric = getattr(self, f"{stage}_teacher_acc")
        if stage not in self._teacher_acc and metric.update_count:
            self._teacher_acc[stage] = float(metric.compute())
            metric.reset()
        if stage in self._teacher_acc:
            self.log(f"{stage}/teacher_acc", self._teacher_acc[stage])

    def on_validation_epoch_end(self) -> None:
        self._log_teacher_acc("val")

    def on_test_epoch_end(self) -> None:
        self._log_teacher_acc("test")

    # ----------------------------------------------------------------------------------------------- predict
    def _tokenizer(self) -> Any:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "tokenizer", None)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        tokenizer = self._tokenizer()
        pad = tokenizer.pad_token_id if tokenizer is not None else 0
        prompt, mask = prompts_from_batch(batch, pad)
        new = self.student.generate(prompt, mask, max_new_tokens=self.hparams.max_new_tokens, **batch.get("images", {}))
        out = []
        for i in range(prompt.shape[0]):
            tokens = new[i].tolist()
            eos = self.student.eos_token_id
            if isinstance(eos, int) and eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            item: dict[str, Any] = {"tokens": tokens}
            if tokenizer is not None:
                labelled = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
                item["question"] = tokenizer.decode(prompt[i][mask[i].bool()].tolist())
                item["answer"] = tokenizer.decode(tokens)
                item["reference"] = tokenizer.decode(labelled) if labelled else None
            out.append(item)
        return out

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.hparams.print_predictions:
            return
        for item in outputs:
            if "answer" in item:
                ref = f"   (reference: {item['reference']})" if item.get("reference") else ""
                rank_zero_info(f"{item['question']} → {item['answer']}{ref}")

    # ----------------------------------------------------------------------------------------------- info
    def describe(self) -> dict[str, str]:
        def name(role: str, model: nn.Module | None) -> str | None:
            source = self.source(role)
            if isinstance(source, Mapping):
                source = source_from_config(source)
            if isinstance(source, ModelSource):
                return source.describe()
            return getattr(model, "name", None) or (type(model).__name__ if model is not None else None)

        out = {"method": type(self).__name__, "student": name("student", self.student)}
        if self.teacher is not None:
            out["teacher"] = name("teacher", self.teacher)
        return out


class VLMSupervised(VLMMethod):
    """Next-token cross-entropy on the answers: trains VLM teachers and the no-distillation baselines.

        L = −mean_{i ∈ R} log p_S(y_{i+1} | image, y_≤i)      (R: the shifted answer positions)

    A teacher may be given to report its accuracy and the agreement; it plays no part in the loss.
    """

    @property
    def uses_teacher(self) -> bool:
        return False

    def loss_terms(self, student: Any, teacher: Any | None, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"ce": next_token_loss(student.logits, batch["labels"])}


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up over ``warmup_ratio·total_steps`` steps, then cosine decay to 0 (transformers'
    ``get_cosine_schedule_with_warmup``, the schedule of the LLaVA, LLaVA-KD and LLaVA-MoD scripts); step it every
    optimizer step (``lr_scheduler_interval: step``).

    Args:
        optimizer: the optimizer.
        total_steps: optimizer steps of the run.
        warmup_ratio: share of warm-up steps (0.03 in the scripts).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.03) -> None:
        if total_steps < 1 or not 0 <= warmup_ratio < 1:
            raise ValueError(f"WarmupCosineLR: total_steps must be ≥ 1 and warmup_ratio in [0, 1), got {total_steps}, "
                             f"{warmup_ratio}")
        warmup = math.ceil(warmup_ratio * total_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        super().__init__(optimizer, factor)
