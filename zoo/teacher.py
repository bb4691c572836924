"""The frozen teacher and feature taps: all teacher hygiene lives here, not in the methods.

:func:`freeze` is the one place a network becomes a teacher: ``requires_grad_(False)`` and ``eval()``. Methods hold
their teachers outside their registered submodules (``DistillationMethod.add_teacher``), so a teacher is never in
the optimizer, never DDP-wrapped and never saved in the student's checkpoint; it is rebuilt from its source when a
checkpoint is loaded.

A :class:`Teacher` wraps one image network or an ensemble. It stays in ``eval()`` whatever ``train()`` is called
with (:meth:`Teacher.batchnorm_mode` is the one declared exception), and runs under ``torch.no_grad()`` (not
``inference_mode``: its outputs enter losses that autograd records).

:class:`FeatureTaps` reads intermediate outputs by module path with forward hooks, and takes timm's
``forward_features`` / ``forward_head(pre_logits=True)`` / ``forward_intermediates`` as a fast path, for the
teacher and the student alike.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zoo.losses.functional import at_least_float32
from zoo.models.sources import ModelSource, build_model, source_from_config

__all__ = ["FeatureTaps", "PRE_LOGITS", "Teacher", "embedding_dim", "freeze"]

PRE_LOGITS = "pre_logits"
_INTERMEDIATES = "intermediates."
_CLASSIFIER_NAMES = ("fc", "classifier", "head", "heads", "linear")


def freeze(module: nn.Module) -> nn.Module:
    """Makes ``module`` a teacher: no parameter requires a gradient and it is in eval mode. Returns it."""
    module.requires_grad_(False)
    module.eval()
    return module


def _find_classifier(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
            return head
    for name in _CLASSIFIER_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(
        f"cannot find the classifier of {type(model).__name__} for the '{PRE_LOGITS}' tap: it has no "
        f"get_classifier() and none of the attributes {_CLASSIFIER_NAMES}; tap '<classifier path>:input' instead"
    )


def _disable_inplace(model: nn.Module) -> None:
    # An in-place activation after a hooked module would overwrite the recorded tensor.
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False


class FeatureTaps:
    """Runs a model and returns its logits together with intermediate tensors named by module path.

    Tap names:
        - ``"pre_logits"``: the pooled embedding that feeds the classifier. timm-style models (``forward_features``
          + ``forward_head``) take the fast path without hooks; others hook the classifier's input.
        - ``"intermediates.<i>"``: output ``i`` of timm's ``forward_intermediates`` (stage or block index).
        - ``"<module.path>"`` or ``"<module.path>:output"``: the output of that submodule (forward hook).
        - ``"<module.path>:input"``: the first positional input of that submodule.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", num_classes=10)
        >>> taps = FeatureTaps(model, ["pre_logits", "layer3"])
        >>> logits, feats = taps(torch.randn(2, 3, 64, 64))
        >>> feats["pre_logits"].shape, feats["layer3"].shape
        (torch.Size([2, 512]), torch.Size([2, 256, 4, 4]))
    """

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        self._store: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._indices = [int(p[len(_INTERMEDIATES) :]) for p in self.paths if p.startswith(_INTERMEDIATES)]
        timm_like = all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier"))
        self._fast_pre_logits = PRE_LOGITS in self.paths and timm_like
        if self._indices and not hasattr(model, "forward_intermediates"):
            raise ValueError(
                f"taps {[p for p in self.paths if p.startswith(_INTERMEDIATES)]}: {type(model).__name__} has no "
                "forward_intermediates(); tap modules by path instead"
            )
        if self._indices and not timm_like:
            raise ValueError(f"'intermediates.<i>' taps need a timm-style model, not {type(model).__name__}")
        hooked = False
        for path in self.paths:
            if path.startswith(_INTERMEDIATES) or (path == PRE_LOGITS and self._fast_pre_logits):
                continue
            if path == PRE_LOGITS:
                self._hook(_find_classifier(model), path, "input")
            else:
                name, _, where = path.partition(":")
                if where not in ("", "output", "input"):
                    raise ValueError(f"tap {path!r}: the suffix must be ':input' or ':output'")
                try:
                    module = model.get_submodule(name)
                except AttributeError as err:
                    children = [n for n, _ in model.named_modules() if n][:12]
                    raise ValueError(
                        f"tap {path!r}: {type(model).__name__} has no submodule {name!r} (some paths: {children})"
                    ) from err
                self._hook(module, path, where or "output")
            hooked = True
        if hooked:
            _disable_inplace(model)

    def _hook(self, module: nn.Module, key: str, where: str) -> None:
        store = self._store
        if where == "input":
            handle = module.register_forward_pre_hook(lambda _m, args: store.__setitem__(key, args[0]))
        else:
            handle = module.register_forward_hook(lambda _m, _args, out: store.__setitem__(key, out))
        self._handles.append(handle)

    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self._store.clear()
        model = self.model
        if self._indices:
            final, inters = model.forward_intermediates(x, indices=self._indices)
            for i, t in zip(self._indices, inters):
                self._store[f"{_INTERMEDIATES}{i}"] = t
        elif self._fast_pre_logits:
            final = model.forward_features(x)
        else:
            return model(x), self._collect()
        if self._fast_pre_logits:
            pre = model.forward_head(final, pre_logits=True)
            self._store[PRE_LOGITS] = pre
            logits = model.get_classifier()(pre)
        else:
            logits = model.forward_head(final)
        return logits, self._collect()

    def _collect(self) -> dict[str, Tensor]:
        missing = [p for p in self.paths if p not in self._store]
        if missing:
            raise RuntimeError(f"taps {missing} were not reached by {type(self.model).__name__}.forward")
        out = dict(self._store)
        self._store.clear()
        return out

    def remove(self) -> None:
        """Removes the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def embedding_dim(model: nn.Module, in_chans: int | None) -> int:
    """The pooled embedding size: ``num_features`` (timm, zoo CIFAR models) or one dummy forward."""
    dim = getattr(model, "num_features", None)
    if isinstance(dim, int):
        return dim
    was_training = model.training
    taps = FeatureTaps(model, [PRE_LOGITS])
    try:
        with torch.no_grad():
            _, feats = taps(torch.zeros(2, in_chans or 3, 32, 32))
    finally:
        taps.remove()
        model.train(was_training)
    return feats[PRE_LOGITS].shape[1]


class Teacher(nn.Module):
    """A frozen teacher network or ensemble, with input re-normalisation and feature taps.

    Ensembles combine their members' outputs at T=1, as MEAL V2 does (arXiv 2009.08453):
    ``ensemble="prob"`` returns log p̄ with p̄ = (1/K)·Σ_k softmax(z_k), so softmax of the output is the average of
    the members' probabilities; ``ensemble="logit"`` returns the mean of the raw logits. A single network returns
    its logits.

    Re-normalisation: when a member's weights expect mean/std (m_t, s_t) but the data is normalised with
    (m_s, s_s), its input is mapped by the affine ``x·(s_s/s_t) + (m_s − m_t)/s_t``, which equals normalising
    the raw image with the teacher's statistics (the timm KD task does the same).

    Args:
        members: one network or a list of networks (an ensemble).
        ensemble: how an ensemble's outputs are combined.
        expected_norm: per member, the (mean, std) its weights expect, or ``None`` for "the data's".
        taps: feature taps (see :class:`FeatureTaps`) on the first member: module paths, or a mapping from the
            names the features are returned under to module paths (see :meth:`set_taps`).
        names: per member, a short name for summaries and logs.
    """

    def __init__(
        self,
        members: nn.Module | Sequence[nn.Module],
        ensemble: Literal["prob", "logit"] = "prob",
        expected_norm: Sequence[tuple[Sequence[float], Sequence[float]] | None] | None = None,
        taps: Sequence[str] | Mapping[str, str] = (),
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        members = [members] if isinstance(members, nn.Module) else list(members)
        if not members:
            raise ValueError("Teacher needs at least one network")
        if ensemble not in ("prob", "logit"):
            raise ValueError(f"Teacher.ensemble must be 'prob' or 'logit', got {ensemble!r}")
        self.members = nn.ModuleList(members)
        self.ensemble = ensemble
        self.expected_norm = list(expected_norm) if expected_norm is not None else [None] * len(members)
        if len(self.expected_norm) != len(members):
            raise ValueError("Teacher.expected_norm needs one entry per member")
        # Per member, the re-normalisation map as non-persistent buffers, so device/dtype moves carry them and the
        # forward does no conversion; _affine[i] is None while member i needs no map.
        self._affine: list[int | None] = [None] * len(members)
        self.taps: FeatureTaps | None = None
        self.tap_names: dict[str, str] = {}
        self.set_taps(taps)
        self.names = list(names) if names is not None else [type(m).__name__ for m in members]
        self.channels_last = False
        self._compiled = False
        freeze(self)

    @classmethod
    def from_sources(
        cls,
        sources: ModelSource | nn.Module | Sequence[ModelSource | nn.Module],
        num_classes: int | None = None,
        in_chans: int | None = None,
        ensemble: Literal["prob", "logit"] = "prob",
        taps: Sequence[str] | Mapping[str, str] = (),
    ) -> Teacher:
        """Builds every source and records the normalisation each one's weights expect."""
        if isinstance(sources, Teacher):
            return sources
        items = [sources] if isinstance(sources, (ModelSource, nn.Module, Mapping)) else list(sources)
        items = [source_from_config(s) if isinstance(s, Mapping) else s for s in items]
        members = [build_model(s, num_classes, in_chans) for s in items]
        norms = [
            (s.mean, s.std) if isinstance(s, ModelSource) and s.mean is not None and s.std is not None else None
            for s in items
        ]
        names = [s.describe() if isinstance(s, ModelSource) else type(s).__name__ for s in items]
        return cls(members, ensemble=ensemble, expected_norm=norms, taps=taps, names=names)

    def train(self, mode: bool = True) -> Teacher:
        """Ignores ``mode``: a teacher is always in eval mode (BatchNorm statistics and dropout frozen)."""
        return super().train(False)

    def set_taps(self, taps: Sequence[str] | Mapping[str, str]) -> None:
        """Reads these features of the first member in :meth:`forward_features` (replacing earlier taps).

        With a sequence of module paths the features are keyed by path; with a mapping ``{name: path}`` (e.g.
        ``{"logits": "decoder.head"}``) they are keyed by name.
        """
        if self.taps is not None:
            self.taps.remove()
        self.tap_names = dict(taps) if isinstance(taps, Mapping) else {p: p for p in taps}
        paths = list(dict.fromkeys(self.tap_names.values()))
        self.taps = FeatureTaps(self.members[0], paths) if paths else None

    @contextlib.contextmanager
    def batchnorm_mode(self, mode: Literal["eval", "train"]) -> Iterator[None]:
        """Within the block, BatchNorm layers use batch statistics (and update their running statistics) when
        ``mode="train"``; everything else stays in eval mode, and no gradient flows either way. ``"eval"`` changes
        nothing. MGD's official code runs its teachers this way."""
        if mode not in ("eval", "train"):
            raise ValueError(f"Teacher.batchnorm_mode: expected 'eval' or 'train', got {mode!r}")
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if mode == "train" else []
        for m in norms:
            m.training = True
        try:
            yield
        finally:
            for m in norms:
                m.training = False

    def set_fast_path(self, channels_last: bool = False, compile: bool | Mapping[str, Any] = False) -> None:
        """Channels-last weights and inputs (4-D convolution weights only; a no-op for other tensors), and
        ``torch.compile`` of each member (once; ``compile`` may carry ``torch.compile`` options). Hooks of feature
        taps stay on the compiled modules (``nn.Module.compile`` keeps the module and its hooks)."""
        if channels_last != self.channels_last:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            for member in self.members:
                member.to(memory_format=fmt)
            self.channels_last = channels_last
        if compile and not self._compiled:
            options = dict(compile) if isinstance(compile, Mapping) else {}
            for member in self.members:
                member.compile(**options)
            self._compiled = True

    def set_input_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Tells the teacher how the data it receives is normalised, so each member gets what it expects."""
        for i, norm in enumerate(self.expected_norm):
            self._affine[i] = None
            if norm is None:
                continue
            m_t = torch.as_tensor(norm[0], dtype=torch.float32).view(1, -1, 1, 1)
            s_t = torch.as_tensor(norm[1], dtype=torch.float32).view(1, -1, 1, 1)
            m_s = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
            s_s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
            if m_t.shape != m_s.shape and m_s.numel() != 1 and m_t.numel() != 1:
                raise ValueError(
                    f"teacher member {i} expects {m_t.numel()}-channel normalisation but the data has {m_s.numel()}"
                )
            scale, shift = s_s / s_t, (m_s - m_t) / s_t
            if torch.allclose(scale, torch.ones_like(scale)) and torch.allclose(shift, torch.zeros_like(shift)):
                continue
            device = next(self.members[i].parameters(), torch.empty(0)).device
            self.register_buffer(f"_scale{i}", scale.to(device), persistent=False)
            self.register_buffer(f"_shift{i}", shift.to(device), persistent=False)
            self._affine[i] = i

    def member_input(self, i: int, x: Tensor) -> Tensor:
        """``x`` as member ``i`` takes it: re-normalised for its weights, in its memory format."""
        if self._affine[i] is not None:
            x = x * getattr(self, f"_scale{i}").to(x.dtype) + getattr(self, f"_shift{i}").to(x.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Teacher logits (or the ensemble's combination), without an autograd graph."""
        return self.forward_features(x)[0]

    @torch.no_grad()
    def forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and the tapped features of the first member."""
        outputs = []
        feats: dict[str, Tensor] = {}
        for i, member in enumerate(self.members):
            xi = self.member_input(i, x)
            if i == 0 and self.taps is not None:
                logits, by_path = self.taps(xi)
                feats = {name: by_path[path] for name, path in self.tap_names.items()}
            else:
                logits = member(xi)
            outputs.append(logits)
        return self.combine(outputs), feats

    @torch.no_grad()
    def member_logits(self, x: Tensor) -> list[Tensor]:
        """Each member's raw logits (e.g. MEAL V2's discriminator takes their mean)."""
        return [member(self.member_input(i, x)) for i, member in enumerate(self.members)]

    def combine(self, logits: Sequence[Tensor]) -> Tensor:
        """One member's logits as they are; an ensemble's mean logit (``logit``) or log p̄ (``prob``)."""
        if len(logits) == 1:
            return logits[0]
        return self.mean_logit(logits) if self.ensemble == "logit" else self.log_mean_prob(logits)

    @staticmethod
    def mean_logit(logits: Sequence[Tensor]) -> Tensor:
        """z̄ = (1/K)·Σ_k z_k in at-least-float32."""
        return torch.stack([at_least_float32(z) for z in logits]).mean(0)

    @staticmethod
    def log_mean_prob(logits: Sequence[Tensor]) -> Tensor:
        """log p̄ with p̄ = (1/K)·Σ_k softmax(z_k), computed stably: logsumexp_k log_softmax(z_k) − log K
        (at-least-float32; for K = 1 it is log_softmax(z), a distribution, where ``combine`` keeps the raw logits)."""
        stacked = torch.stack([at_least_float32(z) for z in logits])
        return torch.logsumexp(stacked.log_softmax(-1), dim=0) - math.log(len(logits))

    def describe(self) -> str:
        names = self.names
        return names[0] if len(names) == 1 else f"ensemble[{', '.join(names)}] ({self.ensemble})"
