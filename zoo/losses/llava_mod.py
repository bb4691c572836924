"""LLaVA-MoD's distillation terms (Shu et al., ICLR 2025, arXiv 2408.15881): mimic distillation and preference
distillation with the teacher as the reference policy. The router's load-balancing loss is
:func:`zoo.models.moe.load_balancing_loss` (computed inside each MoE layer).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.losses.functional import at_least_float32
from zoo.losses.llava_kd import token_divergence

__all__ = ["MimicLoss", "PreferenceLoss", "sequence_logprobs"]


class MimicLoss(nn.Module):
    """Mimic distillation: the mean over the labelled positions of KL(p_T ‖ p_S), with τ = 1.

        L_KD = (1/|M|) · Σ_{i ∈ M} KL(softmax(z_T,i[:V']) ‖ softmax(z_S,i[:V'])),   M = {i : labels_i ≠ −100}

    M uses the *unshifted* labels (``AlignTrainer.compute_align_loss``): the distributions at the answer tokens
    themselves, one step after the ones that predict them. Both logits are cut to the first V' = ``vocab_slice``
    entries (151,936 in the code: the teacher's padded Qwen vocabulary).

    Notes:
        The official loss is −Σ p_T log p_S (the cross-entropy form); this reports the true KL (same student
        gradient, 0 when the student equals the teacher). ``all_tokens`` is the code's ``distill_all_tokens``: every
        position, padding included, as the code's ``ones_like(labels)`` mask.

    Args:
        vocab_slice: V', or ``None`` to use the whole (equal) vocabularies.
        all_tokens: distil every position.

    Example:
        >>> z, labels = torch.randn(2, 5, 9), torch.tensor([[-100, -100, 3, 4, 2]] * 2)
        >>> float(MimicLoss()(z, z, labels))
        0.0
    """

    def __init__(self, vocab_slice: int | None = None, all_tokens: bool = False) -> None:
        super().__init__()
        if vocab_slice is not None and vocab_slice < 1:
            raise ValueError(f"MimicLoss.vocab_slice must be positive, got {vocab_slice}")
        self.vocab_slice, self.all_tokens = vocab_slice, all_tokens

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                ignore_index: int = -100) -> Tensor:
        if self.vocab_slice is not None:
            cut = self.vocab_slice
            student_logits, teacher_logits = student_logits[..., :cut], teacher_logits[..., :cut]
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"MimicLoss: student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} differ; give vocab_slice for vocabularies of different sizes"
            )
        mask = torch.ones_like(labels, dtype=torch.bool) if self.all_tokens else labels != ignore_index
        if not mask.any():
            return at_least_float32(student_logits).sum() * 0.0
        return token_divergence(student_logits[mask], teacher_logits[mask], "forward_kl").mean()


def sequence_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100, average: bool = False) -> Tensor:
    """log π(y | x) per sequence: the sum (or mean) over the labelled tokens of the shifted next-token log-probs.

        log π(y) = Σ_{i : labels_{i+1} ≠ −100} log softmax(z_i)[labels_{i+1}]      (``DPOTrainer.get_logp``)

    Example:
        >>> logits = torch.zeros(1, 3, 4)
        >>> round(float(sequence_logprobs(logits, torch.tensor([[-100, 1, 2]]))), 4)  # two tokens at p = 1/4
        -2.7726
    """
    target = labels[:, 1:]
    mask = target != ignore_index
    logp = F.log_softmax(at_least_float32(logits[:, :-1]), -1)
    picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    total = picked.sum(-1)
    return total / mask.sum(-1).clamp_min(1) if average else total


class PreferenceLoss(nn.Module):
    """Preference distillation: DPO with the frozen teacher as the reference policy.

    With r = log π_θ(y) − log π_T(y) per sequence (student θ, teacher T) for the chosen (w) and rejected (l) answers:

        sigmoid:  L = mean[ −(1−ε)·log σ(β(r_w − r_l)) − ε·log σ(−β(r_w − r_l)) ]       (DPO; ε label smoothing)
        kto_pair: L = mean over concat[ 1 − σ(β(r_w − KL_l)),  1 − σ(β(KL_w − r_l)) ],
                  KL_w = max(0, mean_batch r_w),  KL_l = max(0, mean_batch r_l)      (KTO's paired form)

    ``forward`` returns the loss and the rewards β·r_w, β·r_l (detached); reward accuracy is mean[β r_w > β r_l].

    Notes:
        The paper describes DPO, which is the default here; the shipped script (``shells/train/qwen/dpo.sh``) runs
        ``loss_type=kto_pair``, available as an option. β = 0.1 and ε = 0 are the trainer's defaults.

    Args:
        beta: β (0.1).
        loss_type: ``sigmoid`` (paper) or ``kto_pair`` (official script).
        label_smoothing: ε of the sigmoid loss (0).

    Example:
        >>> loss, rw, rl = PreferenceLoss()(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
        ...                                 torch.tensor([-2.0]))
        >>> round(float(loss), 4), round(float(rw - rl), 2)
        (0.5981, 0.2)
    """

    def __init__(self, beta: float = 0.1, loss_type: Literal["sigmoid", "kto_pair"] = "sigmoid",
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if loss_type not in ("sigmoid", "kto_pair"):
            raise ValueError(f"PreferenceLoss.loss_type must be 'sigmoid' or 'kto_pair', got {loss_type!r}")
        if beta <= 0:
            raise ValueError(f"PreferenceLoss.beta must be positive, got {beta}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def forward(self, policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
                reference_rejected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r_w = policy_chosen - reference_chosen.detach()
        r_l = policy_rejected - reference_rejected.detach()
        if self.loss_type == "sigmoid":
            h = self.beta * (r_w - r_l)
            losses = -(1 - self.label_smoothing) * F.logsigmoid(h) - self.label_smoothing * F.logsigmoid(-h)
        else:
            kl_w, kl_l = r_w.mean().clamp(min=0), r_l.mean().clamp(min=0)
            chosen, rejected = self.beta * (r_w - kl_l), self.beta * (kl_w - r_l)
            losses = torch.cat([1 - torch.sigmoid(chosen), 1 - torch.sigmoid(rejected)])
        return losses.mean(), self.beta * r_w.detach(), self.beta * r_l.detach()
