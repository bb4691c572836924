"""A network's parameters as one flat vector, and its forward pass on such a vector.

Trajectory matching stores an expert as flat parameter vectors and unrolls SGD on a student that is itself a flat
vector w: every inner step makes a new w = w − α·g, so gradients flow back through all of them into the synthetic
images. ``torch.func.functional_call`` runs the unchanged module with the tensors of ``unflatten(w)`` in place of its
parameters; the module supplies only the architecture (this replaces MTT's ``ReparamModule``).

Example:
    >>> from zoo.models.convnet import ConvNet
    >>> net = ConvNet(num_classes=10, in_chans=1, width=8, depth=2, image_size=8)
    >>> layout = ParamLayout.from_module(net)
    >>> w = layout.flatten(net).requires_grad_()
    >>> logits = functional_forward(net, layout, w, torch.randn(4, 1, 8, 8))
    >>> g, = torch.autograd.grad(logits.square().sum(), w, create_graph=True)
    >>> w = w - 0.01 * g          # a new tensor: never update w in place
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ParamLayout", "check_functional", "functional_forward"]


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a module's parameters in ``named_parameters()`` order: how a flat vector splits.

    Two layouts are equal when names and shapes are; an expert trajectory is usable for a network only then.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "shapes", tuple(tuple(int(d) for d in s) for s in self.shapes))
        if len(self.names) != len(self.shapes):
            raise ValueError(f"ParamLayout: {len(self.names)} names but {len(self.shapes)} shapes")

    @classmethod
    def from_module(cls, model: nn.Module) -> ParamLayout:
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(prod(s) for s in self.shapes)

    @property
    def num_params(self) -> int:
        return sum(self.numels)

    def difference(self, other: ParamLayout) -> str | None:
        """A short description of the first difference to ``other`` (``None`` when equal), for error messages."""
        if self == other:
            return None
        for i, (a, b) in enumerate(zip(zip(self.names, self.shapes), zip(other.names, other.shapes))):
            if a != b:
                return f"parameter {i}: {a[0]} {list(a[1])} vs {b[0]} {list(b[1])}"
        return f"{len(self.names)} parameters ({self.num_params:,} values) vs {len(other.names)} ({other.num_params:,})"

    def _check_module(self, model: nn.Module) -> list[Tensor]:
        params = list(model.named_parameters())
        own = ParamLayout(tuple(n for n, _ in params), tuple(tuple(p.shape) for _, p in params))
        diff = self.difference(own)
        if diff is not None:
            raise ValueError(f"ParamLayout: {type(model).__name__} does not have this layout ({diff})")
        return [p for _, p in params]

    def flatten(self, model: nn.Module) -> Tensor:
        """A detached copy of ``model``'s parameters as one vector of length ``num_params``."""
        params = self._check_module(model)
        return torch.cat([p.detach().reshape(-1) for p in params])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``{name: view}`` of ``flat`` (differentiable: gradients of the views reach ``flat``)."""
        if flat.dim() != 1 or flat.numel() != self.num_params:
            raise ValueError(
                f"ParamLayout.unflatten: expected a vector of {self.num_params} values, got {tuple(flat.shape)}"
            )
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes)}

    @torch.no_grad()
    def load_into(self, model: nn.Module, flat: Tensor) -> None:
        """Copies ``flat`` into ``model``'s parameters (in place, keeping their device and dtype)."""
        params = self._check_module(model)
        for p, t in zip(params, self.unflatten(flat.detach()).values()):
            p.copy_(t)

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able form: ``{"names": [...], "shapes": [[...], ...]}``."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_metadata(cls, data: Mapping[str, Any]) -> ParamLayout:
        try:
            return cls(tuple(data["names"]), tuple(tuple(s) for s in data["shapes"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"ParamLayout.from_metadata: expected names and shapes, got {data!r}") from err


def check_functional(model: nn.Module) -> None:
    """Raises ``ValueError`` unless ``model`` is a function of its parameters alone (no BatchNorm, no buffers).

    A functional forward on a flat vector would otherwise use, and in training mode update, the module's own
    running statistics: the unrolled student steps would not be a function of w, and experts would not replay.
    """
    bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn:
        raise ValueError(
            f"{type(model).__name__} has BatchNorm layers ({', '.join(bn[:3])}): trajectory matching needs networks "
            "without running statistics; use norm='instancenorm' (GroupNorm) or 'none'"
        )
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        raise ValueError(
            f"{type(model).__name__} has buffers ({', '.join(buffers[:3])}): trajectory matching needs networks whose "
            "output depends on their parameters only"
        )


def functional_forward(model: nn.Module, layout: ParamLayout, flat: Tensor, x: Tensor) -> Tensor:
    """``model(x)`` with the parameters taken from the flat vector ``flat`` (differentiable in ``flat`` and ``x``)."""
    return torch.func.functional_call(model, layout.unflatten(flat), (x,))
