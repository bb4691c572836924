"""Sparse mixture-of-experts upcycling of a language model's FFNs, in plain PyTorch (LLaVA-MoD, arXiv 2408.15881).

Each chosen decoder layer's FFN (``layer.mlp``) becomes :class:`SparseMoE`: E deep copies of it (the experts) and a
fresh router ``Linear(d, E, bias=False)``. Routing follows DeepSpeed 0.9.5's ``top2gating`` (which LLaVA-MoD uses
through ``deepspeed.moe.layer.MoE``), token by token over the flattened (B·L) tokens:

    g_t = softmax(W_g h_t)                        (float32)
    e1_t = argmax_e g_t,e;   e2_t = argmax_{e ≠ e1} (W_g h_t + Gumbel noise)_e    (noise in training only)
    capacity C = max(ceil(k · cf · S / E), min_capacity),  cf = capacity_factor (train) / eval_capacity_factor
    slots are given in token order, first choices before second choices; a choice beyond C is dropped
    y_t = Σ_kept ĝ_t,e · FFN_e(h_t),   ĝ = the kept gates renormalised to sum 1 (top-2)
    l_aux = E · Σ_e me_e · ce_e,  me_e = mean_t g_t,e,  ce_e = share of tokens whose top-1 expert is e

A token whose choices are all dropped gets a zero FFN output (only the residual passes). With ``drop_tokens=False``
the capacity is the largest expert load, so nothing is dropped and, at upcycling (identical experts), the layer
equals the dense FFN up to rounding.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MoEConfig",
    "SparseMoE",
    "aux_losses",
    "expert_counts",
    "expert_load_entropy",
    "load_balancing_loss",
    "moe_layers",
    "upcycle",
]


@dataclass
class MoEConfig:
    """Upcycling options; defaults are LLaVA-MoD's Qwen2 dense→sparse script (``shells/train/qwen``).

    Attributes:
        num_experts: E, experts per MoE layer (4).
        top_k: experts per token, 1 or 2 (2).
        layers: ``"sparse"`` (every other layer from 0: LLaVA-MoD's ``moe_mode``), ``"dense"`` (all),
            ``"first_half"``, ``"second_half"``, or explicit layer indices.
        capacity_factor, eval_capacity_factor: per-expert capacity multipliers in training / evaluation (1.5, 2.0).
        min_capacity: smallest capacity (0).
        drop_tokens: drop choices beyond the capacity (DeepSpeed's behaviour); false: the capacity is the largest load.
        gumbel_noise: pick the second expert with Gumbel noise in training (DeepSpeed ``top2gating``); never at eval.
    """

    num_experts: int = 4
    top_k: int = 2
    layers: str | list[int] = "sparse"
    capacity_factor: float = 1.5
    eval_capacity_factor: float = 2.0
    min_capacity: int = 0
    drop_tokens: bool = True
    gumbel_noise: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_experts < 2:
            raise ValueError(f"MoEConfig.num_experts must be ≥ 2, got {self.num_experts}")
        if self.top_k not in (1, 2) or self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k must be 1 or 2 (DeepSpeed top-1/top-2 gating), got {self.top_k}")
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            raise ValueError("MoEConfig: capacity factors must be positive")
        if isinstance(self.layers, str) and self.layers not in ("sparse", "dense", "first_half", "second_half"):
            raise ValueError(
                f"MoEConfig.layers: {self.layers!r}; expected 'sparse', 'dense', 'first_half', 'second_half' or indices"
            )
        if self.extra:
            raise ValueError(f"MoEConfig: unknown options {sorted(self.extra)}")

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> MoEConfig:
        options = dict(options or {})
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        extra = {k: options.pop(k) for k in list(options) if k not in known}
        return cls(**options, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        return out

    def layer_indices(self, num_layers: int) -> list[int]:
        if isinstance(self.layers, str):
            return {
                "sparse": list(range(0, num_layers, 2)),
                "dense": list(range(num_layers)),
                "first_half": list(range(num_layers // 2)),
                "second_half": list(range(num_layers // 2, num_layers)),
            }[self.layers]
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"MoEConfig.layers: indices {bad} outside the model's {num_layers} layers")
        return sorted(set(int(i) for i in self.layers))


def load_balancing_loss(gates: Tensor, top1: Tensor) -> Tensor:
    """DeepSpeed/GShard auxiliary loss l_aux = E · Σ_e mean_t(g_t,e) · mean_t(1[top1_t = e]).

    Equals 1 under uniform gates (whatever the assignment) and under a perfectly balanced top-1 assignment.

    Example:
        >>> round(float(load_balancing_loss(torch.full((6, 3), 1 / 3), torch.tensor([0, 0, 0, 1, 2, 2]))), 6)
        1.0
    """
    num_experts = gates.shape[-1]
    me = gates.mean(0)
    ce = F.one_hot(top1, num_experts).to(gates.dtype).mean(0)
    return num_experts * (me * ce).sum()


def expert_load_entropy(counts: Tensor) -> Tensor:
    """Entropy (nats) of the expert-load distribution ``counts / counts.sum()``; log E when perfectly balanced."""
    p = counts.double() / counts.sum().clamp_min(1)
    return -(p * p.clamp_min(1e-30).log()).sum()


class SparseMoE(nn.Module):
    """E experts (deep copies of one FFN) behind a top-k router; see the module docstring for the routing.

    After each forward, ``l_aux`` holds the layer's load-balancing loss and ``expert_counts`` the top-1 load per
    expert (detached), ``dropped`` the share of token choices dropped for capacity.

    Args:
        expert: the dense FFN to copy (kept as expert 0's initial weights).
        hidden_size: d, the FFN input width.
        config: routing options (:class:`MoEConfig`).
    """

    def __init__(self, expert: nn.Module, hidden_size: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts, self.top_k = config.num_experts, config.top_k
        self.experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(config.num_experts)])
        # DeepSpeed's ``wg``: default nn.Linear init; routing is computed in float32 whatever the weights' dtype.
        self.router = nn.Linear(hidden_size, config.num_experts, bias=False)
        self.l_aux: Tensor | None = None
        self.expert_counts: Tensor | None = None
        self.dropped: Tensor | None = None

    def capacity(self, num_tokens: int, load: Tensor) -> int:
        if not self.config.drop_tokens:
            return max(int(load.max()), 1)
        factor = self.config.capacity_factor if self.training else self.config.eval_capacity_factor
        return max(math.ceil(self.top_k * factor * num_tokens / self.num_experts), self.config.min_capacity)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` (S, d) → (expert index (S, k), combine weight (S, k), l_aux); dropped choices have weight 0."""
        logits = F.linear(x.float(), self.router.weight.float())
        gates = logits.softmax(-1)
        top1 = gates.argmax(-1)
        l_aux = load_balancing_loss(gates, top1)
        masks = [F.one_hot(top1, self.num_experts)]
        index = [top1]
        if self.top_k == 2:
            noisy = logits
            if self.training and self.config.gumbel_noise:
                uniform = torch.rand_like(logits).clamp_(1e-10, 1 - 1e-10)
                noisy = logits - torch.log(-torch.log(uniform))
            second = noisy.masked_fill(masks[0].bool(), torch.finfo(noisy.dtype).min).argmax(-1)
            masks.append(F.one_hot(second, self.num_experts))
            index.append(second)
        load = sum(m.sum(0) for m in masks)
        capacity = self.capacity(x.shape[0], load)
        offset = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        weights = []
        for mask, idx in zip(masks, index):
            location = (mask.cumsum(0) - 1 + offset).gather(1, idx[:, None])[:, 0]
            offset = offset + mask.sum(0)
            kept = location < capacity
            weights.append(gates.gather(1, idx[:, None])[:, 0] * kept)
        weight = torch.stack(weights, 1)
        if self.top_k == 2:
            weight = weight / weight.sum(1, keepdim=True).clamp_min(torch.finfo(weight.dtype).eps)
        self.expert_counts = masks[0].sum(0).detach()
        self.dropped = (weight == 0).float().mean().detach()
        return torch.stack(index, 1), weight, l_aux

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        index, weight, self.l_aux = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero((index == e) & (weight > 0), as_tuple=True)
            if token.numel() == 0:
                continue
            y = expert(x[token]) * weight[token, slot, None].to(x.dtype)
            out.index_add_(0, token, y)
        return out.reshape(shape)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(hasattr(m, "mlp") for m in module):
            return module
    raise ValueError(f"upcycle: {type(model).__name__} has no list of decoder layers with an 'mlp' FFN")


def _ffn_width(layer: nn.Module, model: nn.Module) -> int:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    if config is not None and getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    first = next(m for m in layer.mlp.modules() if isinstance(m, nn.Linear))
    return first.in_features


def upcycle(model: nn.Module, config: MoEConfig | dict[str, Any]) -> list[int]:
    """Replaces the FFN (``mlp``) of the chosen decoder layers of ``model`` (a causal LM) by :class:`SparseMoE`;
    returns the layer indices. Layers already upcycled are refused."""
    if isinstance(config, dict):
        config = MoEConfig.from_dict(config)
    layers = _decoder_layers(model)
    indices = config.layer_indices(len(layers))
    for i in indices:
        if isinstance(layers[i].mlp, SparseMoE):
            raise ValueError(f"upcycle: layer {i} is already a SparseMoE")
        layers[i].mlp = SparseMoE(layers[i].mlp, _ffn_width(layers[i], model), config)
    return indices


def moe_layers(model: nn.Module) -> list[SparseMoE]:
    """The :class:`SparseMoE` layers of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def aux_losses(model: nn.Module) -> list[Tensor]:
    """Each MoE layer's ``l_aux`` from the last forward."""
    return [m.l_aux for m in moe_layers(model) if m.l_aux is not None]


def expert_counts(layers: Sequence[SparseMoE]) -> Tensor:
    """(layers, E) top-1 loads of the last forward."""
    return torch.stack([m.expert_counts for m in layers])
