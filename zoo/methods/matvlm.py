"""MaTVLM (Li et al., ICCV 2025, arXiv 2503.13440): a VLM whose chosen decoder layers became Mamba-2, distilled from
the original model in one stage."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from zoo.losses.matvlm import LayerAlignmentLoss, SequenceKLLoss
from zoo.methods.base import ModelLike, TeacherLike
from zoo.methods.vlm import VLMMethod, next_token_loss
from zoo.models.hybrid_mamba import MambaDecoderLayer, decoder_stack, final_norm, mamba_layer_indices
from zoo.models.vlm import VLMOutput
from zoo.step_logging import log_step_values

__all__ = ["LayerTrace", "MaTVLM", "MaTVLMTeacherOutput", "WarmupStableDecayLR", "record_layers"]


@dataclass
class LayerTrace:
    """What chosen decoder layers of a forward received and returned: input hidden states, the other call
    arguments (masks, rotary embeddings), output hidden states; by layer index."""

    inputs: dict[int, Tensor] = field(default_factory=dict)
    kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[int, Tensor] = field(default_factory=dict)


@dataclass
class MaTVLMTeacherOutput(VLMOutput):
    """The teacher's :class:`~zoo.models.vlm.VLMOutput` and the trace of the layers the student replaced."""

    trace: LayerTrace = field(default_factory=LayerTrace)


@contextmanager
def record_layers(lm: nn.Module, indices: Sequence[int]) -> Iterator[LayerTrace]:
    """Records the inputs, call arguments and outputs of decoder layers ``indices`` of ``lm`` while the block runs."""
    _, layers = decoder_stack(lm)
    trace = LayerTrace()

    def tap(i: int):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            trace.inputs[i] = args[0] if args else kwargs["hidden_states"]
            trace.kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            trace.outputs[i] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layers[i].register_forward_hook(tap(i), with_kwargs=True) for i in indices]
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()


class MaTVLM(VLMMethod):
    """MaTVLM: the student is the teacher with chosen decoder layers converted to Mamba-2 and initialised from their
    attention (``zoo.models.hybrid_mamba.HybridMambaVLM``); one distillation stage trains it.

        L = w_kl · L_KL + w_layer · L_layer + w_ce · CE,     (w_kl, w_layer, w_ce) = (1, 1, 0)

    L_KL is :class:`zoo.losses.matvlm.SequenceKLLoss` over every position (τ 1, summed and divided by the batch
    size); L_layer is :class:`zoo.losses.matvlm.LayerAlignmentLoss` under teacher forcing: the teacher's input to each
    Mamba layer ℓ (recorded in the teacher's forward) runs through the student's layer ℓ and is compared with the
    teacher's output of layer ℓ (after the final norm for the last layer), ‖·‖_F unsquared, summed over the layers;
    CE is the next-token loss on the answers (weight 0 in the paper's configs). Logged: ``train/loss_kl``,
    ``train/loss_layer`` (weighted) and each Mamba layer's ``train/layer<ℓ>``.

    Trained: parameters whose name contains ``mamba`` and the projector (the connector, ``tune_mlp``), as the
    official script; the vision tower, embeddings, head, the attention layers and *every* MLP and norm, those inside
    the Mamba layers included, stay frozen (``trainable`` overrides). Weight decay is not applied to 1-D parameters
    (biases, norms, A_log, D, dt_bias), as the script's ``get_parameter_groups``.

    Notes:
        Defaults are the official ``train_hybrid.py`` with the released yaml files (``kl_weight: 1``,
        ``tl_weight: 1``, ``ce_weight: 0``, ``loss_type: kl``, ``tl_loss_type: l2``, ``temperature: 1.0``).
        ``kl_reduction: mean`` and ``layer_reduction: mean`` are length- and size-normalised variants
        (see the losses); the code's sums grow with the sequence length and the batch.

    Args:
        kl_weight, layer_weight, ce_weight: w_kl, w_layer, w_ce (1, 1, 0).
        temperature: τ of L_KL (1).
        kl_reduction: ``batchmean`` (official) or ``mean`` (per attended token).
        layer_reduction: ``sum`` (official) or ``mean`` (per-element RMS over attended tokens, mean over layers).
        **kwargs: the arguments of :class:`~zoo.methods.vlm.VLMMethod` (``trainable`` defaults to
            ``[mamba, projector]``).
    """

    requires_teacher: ClassVar[bool] = True

    def __init__(
        self,
        student: ModelLike,
        teacher: TeacherLike,
        *,
        kl_weight: float = 1.0,
        layer_weight: float = 1.0,
        ce_weight: float = 0.0,
        temperature: float = 1.0,
        kl_reduction: Literal["batchmean", "mean"] = "batchmean",
        layer_reduction: Literal["sum", "mean"] = "sum",
        **kwargs: Any,
    ) -> None:
        weights = (kl_weight, layer_weight, ce_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError(f"MaTVLM: kl_weight, layer_weight, ce_weight must be ≥ 0 and not all 0, got {weights}")
        super().__init__(student, teacher, **kwargs)

    # ----------------------------------------------------------------------------------------------- models
    def default_trainable(self) -> list[str]:
        return ["mamba", "projector"]

    def check_student(self) -> None:
        self.ssm_layers = mamba_layer_indices(self.student)
        if not self.ssm_layers:
            raise ValueError("MaTVLM.student: the student has no Mamba layer; build it with "
                             "zoo.models.hybrid_mamba.HybridMambaVLM (source: the teacher's source, ssm_layers: [...])")

    def check_models(self) -> None:
        super().check_models()
        _, s_layers = decoder_stack(self.student.language_model())
        _, t_layers = decoder_stack(self.teacher.language_model())
        if len(s_layers) != len(t_layers):
            raise ValueError(f"MaTVLM: the student has {len(s_layers)} decoder layers but the teacher {len(t_layers)}; "
                             "the student must be the teacher with some layers converted (same source)")
        t_mamba = [i for i in self.ssm_layers if isinstance(t_layers[i], MambaDecoderLayer)]
        if t_mamba:
            raise ValueError(f"MaTVLM: teacher layers {t_mamba} are Mamba layers too; the teacher is the attention "
                             "model the student was converted from")

    def configure_losses(self) -> None:
        h = self.hparams
        self.kl = SequenceKLLoss(h.temperature, h.kl_reduction)
        self.layer_loss = LayerAlignmentLoss(h.layer_reduction)
        self._layer_values: Tensor | None = None
        super().configure_losses()

    # ----------------------------------------------------------------------------------------------- forward
    def teacher_outputs(self, batch: Mapping[str, Any], part: Mapping[str, Tensor] | None = None) -> Any:
        """The teacher's output with the trace of the Mamba layers' positions (when the layer term is on)."""
        indices = self.ssm_layers if self.hparams.layer_weight > 0 else []
        with torch.no_grad(), record_layers(self.teacher.language_model(), indices) as trace:
            out = self.run(self.teacher, batch, part)
        return MaTVLMTeacherOutput(out.logits, out.visual_mask, out.aux_losses, trace=trace)

    def teacher_forced(
        self, trace: LayerTrace, batch: Mapping[str, Any], layers: Sequence[int] | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(f_S^ℓ(h_T^ℓ), h_T^{ℓ+1}) for each recorded layer ℓ (``layers``, default the Mamba layers): the student's
        layer run on the teacher's input to it with the teacher's call arguments; the last layer through the final
        norms."""
        lm = self.student.language_model()
        _, stack = decoder_stack(lm)
        last = len(stack) - 1
        student_out, teacher_out = [], []
        for i in self.ssm_layers if layers is None else layers:
            layer = stack[i]
            kwargs = dict(trace.kwargs[i])
            if isinstance(layer, MambaDecoderLayer):
                kwargs["padding_mask"] = batch["attention_mask"]
            dtype = next(layer.parameters()).dtype
            out = layer(trace.inputs[i].to(dtype), **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            target = trace.outputs[i]
            if i == last:
                out = final_norm(lm)(out)
                with torch.no_grad():
                    target = final_norm(self.teacher.language_model())(target)
            student_out.append(out)
            teacher_out.append(target)
        return student_out, teacher_out

    def loss_terms(self, student: Any, teacher: Any | None, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        h, terms = self.hparams, {}
        attended = batch["attention_mask"]
        if h.kl_weight > 0:
            mask = attended if h.kl_reduction == "mean" else None
            terms["kl"] = h.kl_weight * self.kl(self.cut(student.logits), self.cut(teacher.logits), mask)
        if h.layer_weight > 0:
            outs, targets = self.teacher_forced(teacher.trace, batch)
            values = self.layer_loss.per_layer(outs, targets, attended if h.layer_reduction == "mean" else None)
            self._layer_values = values.detach()
            terms["layer"] = h.layer_weight * (values.sum() if h.layer_reduction == "sum" else values.mean())
        if h.ce_weight > 0:
            terms["ce"] = h.ce_weight * next_token_loss(student.logits, batch["labels"])
        return terms

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self._layer_values is not None:
            bs = batch["input_ids"].shape[0]
            log_step_values(self, {f"train/layer{i}": v for i, v in zip(self.ssm_layers, self._layer_values)}, bs)
        return loss

    # ----------------------------------------------------------------------------------------------- optimizer
    def param_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices only: 1-D parameters and biases get none (the script's parameter groups)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups


class WarmupStableDecayLR(torch.optim.lr_scheduler.LambdaLR):
    """Warmup-stable-decay: linear warm-up from 0 over ``warmup_steps``, constant, then cosine decay to 0 over the
    last ``decay_steps`` of ``total_steps`` (transformers' ``get_wsd_schedule`` defaults, MaTVLM's
    ``lr_scheduler_type: warmup_stable_decay``); step it every optimizer step (``lr_scheduler_interval: step``).

    Args:
        optimizer: the optimizer.
        total_steps: optimizer steps of the run (the stable phase is what warm-up and decay leave).
        warmup_steps: MaTVLM: 64000 micro-steps / 16 accumulation = 4000.
        decay_steps: MaTVLM: 4000, as the warm-up.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 decay_steps: int) -> None:
        if min(total_steps, warmup_steps + 1, decay_steps + 1) < 1 or warmup_steps + decay_steps > total_steps:
            raise ValueError(f"WarmupStableDecayLR: need 0 ≤ warmup_steps + decay_steps ≤ total_steps, got "
                             f"{warmup_steps} + {decay_steps} vs {total_steps}")
        stable_end = total_steps - decay_steps

        def factor(step: int) -> float:
            if step < warmup_steps:
                return step / max(1, warmup_steps)
            if step < stable_end:
                return 1.0
            progress = min(1.0, (step - stable_end) / max(1, decay_steps))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)
