"""Model sources (timm, torchvision, the CIFAR KD architectures) and checkpoint reading.

Every source keeps the arguments it was given, so a config names a model the same way whatever library it comes
from::

    student: {class_path: zoo.models.CIFARModel, init_args: {name: resnet8x4}}
    teacher: {class_path: zoo.models.TimmModel, init_args: {name: resnet34.tv_in1k, pretrained: true}}
    teacher: {class_path: zoo.models.CIFARModel,
              init_args: {name: resnet32x4, checkpoint: checkpoints/resnet32x4_vanilla/ckpt_epoch_240.pth}}
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "ModelSource",
    "as_config",
    "as_normalization",
    "CIFARModel",
    "TimmModel",
    "TorchvisionModel",
    "build_model",
    "check_source_fits",
    "num_classes_of",
    "pick_size",
    "load_weights",
    "read_state_dict",
    "source_from_config",
]

# Keys under which training scripts commonly nest the weights (Lightning, mdistiller/RepDistiller, timm, DeiT).
_NESTED_KEYS = ("state_dict", "model", "net", "module", "student")
# Prefixes left by wrappers: DDP/DataParallel and torch.compile.
_STRIP_PREFIXES = ("module.", "_orig_mod.")


class ModelSource(abc.ABC):
    """Where a network comes from. Subclasses take type-hinted arguments and build an ``nn.Module``.

    Attributes:
        mean, std: the input normalisation the weights expect, or ``None`` when they expect whatever the data
            module produces. The teacher uses them to re-normalise the student's input (see ``zoo.teacher``).
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @abc.abstractmethod
    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
        """Returns the network. ``num_classes``/``in_chans`` come from the data; the source's own values win."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A short human-readable name, e.g. ``cifar:resnet8x4`` or ``timm:resnet34.tv_in1k``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def to_config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": ...}``: the source as config data (for checkpoints and cards)."""
        params = list(inspect.signature(type(self).__init__).parameters)[1:]
        args = {}
        for name in params:
            value = getattr(self, name)
            args[name] = list(value) if isinstance(value, tuple) else value
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}


def as_config(value: Any) -> Any:
    """A value as plain config data: a model source as ``{class_path, init_args}``, a dataclass as a dict, lists of
    them element by element; anything else as it is."""
    if isinstance(value, ModelSource):
        return value.to_config()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [as_config(v) for v in value]
    return value


def source_from_config(spec: Mapping[str, Any]) -> Any:
    """Builds the object a ``{"class_path": ..., "init_args": ...}`` mapping describes."""
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ValueError(f"expected a mapping with class_path and init_args, got {spec!r}")
    module_name, _, class_name = str(spec["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"class_path {spec['class_path']!r} cannot be imported: {err}") from err
    return cls(**dict(spec.get("init_args") or {}))


def pick_size(own: int | None, given: int | None, default: int) -> int:
    """A size a source was given (``own``), else the data's (``given``), else ``default``."""
    if own is not None:
        return own
    return given if given is not None else default


def as_normalization(value: Sequence[float] | None, field: str, owner: str) -> tuple[float, ...] | None:
    """A source's ``mean``/``std`` option as a tuple of floats (``None`` stays None); a std ≤ 0 is refused."""
    if value is None:
        return None
    values = tuple(float(v) for v in value)
    if field == "std" and any(v <= 0 for v in values):
        raise ValueError(f"{owner}.std must be positive, got {values}")
    return values


class CIFARModel(ModelSource):
    """The CIFAR-100 KD architectures of the CRD/mdistiller tables (``resnet8x4``, ``wrn_40_2``, ``vgg13`` ...).

    Args:
        name: a key of ``zoo.models.CIFAR_MODELS``.
        num_classes: classifier size; defaults to the data set's.
        in_chans: input channels; defaults to the data set's.
        checkpoint: optional weights file (safetensors, or a torch pickle such as mdistiller's
            ``ckpt_epoch_240.pth``, whose keys match these models).
        mean, std: normalisation the checkpoint was trained with, when it differs from the data's.
    """

    def __init__(
        self,
        name: str,
        num_classes: int | None = None,
        in_chans: int | None = None,
        checkpoint: str | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        from zoo.models.cifar import CIFAR_MODELS

        if name not in CIFAR_MODELS:
            raise ValueError(f"CIFARModel.name: unknown model {name!r}; expected one of {sorted(CIFAR_MODELS)}")
        self.name = name
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.checkpoint = checkpoint
        self.mean = as_normalization(mean, "mean", "CIFARModel")
        self.std = as_normalization(std, "std", "CIFARModel")

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
        from zoo.models.cifar import create_cifar_model

        model = create_cifar_model(
            self.name,
            num_classes=pick_size(self.num_classes, num_classes, 100),
            in_chans=pick_size(self.in_chans, in_chans, 3),
        )
        if self.checkpoint:
            load_weights(model, self.checkpoint, field="CIFARModel.checkpoint")
        return model

    def describe(self) -> str:
        return f"cifar:{self.name}"


class TimmModel(ModelSource):
    """Any model of timm by name (``resnet18``, ``resnet34.tv_in1k``, ``vit_small_patch16_224.augreg_in21k`` ...).

    Args:
        name: a timm model name, optionally with a pretrained tag.
        pretrained: load timm's pretrained weights (downloads unless cached; the normalisation of the weights
            is then taken from timm's ``pretrained_cfg``).
        checkpoint: optional local weights file, loaded after creation.
        num_classes, in_chans: default to the data set's.
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``drop_path_rate``).
        mean, std: override the normalisation the weights expect.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        checkpoint: str | None = None,
        num_classes: int | None = None,
        in_chans: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        self.name = name
        self.pretrained = pretrained
        self.checkpoint = checkpoint
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.model_kwargs = dict(model_kwargs or {})
        self.mean = as_normalization(mean, "mean", "TimmModel")
        self.std = as_normalization(std, "std", "TimmModel")

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
        import timm

        kwargs = dict(self.model_kwargs)
        kwargs["num_classes"] = pick_size(self.num_classes, num_classes, 1000)
        kwargs["in_chans"] = pick_size(self.in_chans, in_chans, 3)
        try:
            model = timm.create_model(self.name, pretrained=self.pretrained, **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(f"TimmModel.name: timm has no model {self.name!r} ({err})") from err
            raise
        if self.checkpoint:
            load_weights(model, self.checkpoint, field="TimmModel.checkpoint")
        if self.pretrained and self.mean is None:
            cfg = getattr(model, "pretrained_cfg", None) or {}
            if "mean" in cfg and "std" in cfg:
                self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        return model

    def describe(self) -> str:
        return f"timm:{self.name}"


class TorchvisionModel(ModelSource):
    """A torchvision classification model by name (``resnet18``, ``mobilenet_v3_small`` ...).

    Args:
        name: a name known to ``torchvision.models.get_model``.
        weights: a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``) or ``None``; downloads unless cached.
        checkpoint: optional local weights file, loaded after creation.
        num_classes: defaults to the data set's (must equal the weights' when ``weights`` is set).
        mean, std: normalisation the weights expect (torchvision's ImageNet weights use the ImageNet values).
    """

    def __init__(
        self,
        name: str,
        weights: str | None = None,
        checkpoint: str | None = None,
        num_classes: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        self.name = name
        self.weights = weights
        self.checkpoint = checkpoint
        self.num_classes = num_classes
        self.mean = as_normalization(mean, "mean", "TorchvisionModel")
        self.std = as_normalization(std, "std", "TorchvisionModel")

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
        import torchvision

        if in_chans not in (None, 3):
            raise ValueError(
                f"TorchvisionModel({self.name!r}) takes 3-channel input but the data has {in_chans} channels; "
                "use data that yields 3 channels (e.g. DigitsDataModule(channels=3)) or a CIFARModel/TimmModel"
            )
        if self.name not in torchvision.models.list_models():
            raise ValueError(f"TorchvisionModel.name: torchvision has no model {self.name!r}")
        kwargs: dict[str, Any] = {}
        classes = self.num_classes if self.num_classes is not None else num_classes
        if classes is not None:
            kwargs["num_classes"] = classes
        model = torchvision.models.get_model(self.name, weights=self.weights, **kwargs)
        if self.checkpoint:
            load_weights(model, self.checkpoint, field="TorchvisionModel.checkpoint")
        if self.weights and self.mean is None:
            self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        return model

    def describe(self) -> str:
        return f"torchvision:{self.name}"


def build_model(
    source: ModelSource | nn.Module, num_classes: int | None = None, in_chans: int | None = None
) -> nn.Module:
    """Builds a source, or returns a ready ``nn.Module`` unchanged (for Python users who pass a model)."""
    if isinstance(source, nn.Module):
        return source
    if isinstance(source, Mapping):
        source = source_from_config(source)
    if isinstance(source, ModelSource):
        return source.build(num_classes=num_classes, in_chans=in_chans)
    raise TypeError(f"expected a zoo.models.ModelSource or an nn.Module, got {type(source).__name__}")


def read_state_dict(path: str | os.PathLike, field: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Reads a state dict from safetensors or a torch file, unwrapping the usual nesting and wrapper prefixes.

    Accepts plain state dicts, Lightning checkpoints (``state_dict`` with a ``student.`` prefix), and the
    ``{"model": ...}`` / ``{"net": ...}`` dicts of mdistiller, RepDistiller and timm training scripts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(
                f"{field}: cannot read {path} as safetensors (truncated or not safetensors: {err})"
            ) from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{field}: cannot read {path} as a torch checkpoint ({reason})") from None
    for _ in range(3):
        if isinstance(state, Mapping) and not _is_tensor_dict(state):
            nested = next((state[k] for k in _NESTED_KEYS if k in state and isinstance(state[k], Mapping)), None)
            if nested is None:
                break
            state = nested
    if not isinstance(state, Mapping) or not _is_tensor_dict(state):
        raise ValueError(f"{field}: {path} holds no state dict (top-level keys: {list(state)[:8]})")
    out = dict(state)
    for prefix in _STRIP_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    # Lightning checkpoints of a zoo method hold only the student (and the method's own heads).
    if any(k.startswith("student.") for k in out):
        out = {k[len("student.") :]: v for k, v in out.items() if k.startswith("student.")}
    return out


def _is_tensor_dict(state: Mapping) -> bool:
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def load_weights(model: nn.Module, path: str | os.PathLike, field: str = "checkpoint", strict: bool = True) -> None:
    """Loads a weights file into ``model``; a mismatch fails with the file and the first differing keys."""
    state = read_state_dict(path, field=field)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if wrong_shape or (strict and (missing or unexpected)):
        raise ValueError(
            f"{field}: {path} does not fit {type(model).__name__}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
            f"{len(wrong_shape)} shape mismatches {wrong_shape[:3]}"
        )
    model.load_state_dict(state, strict=strict)


def num_classes_of(model: nn.Module) -> int | None:
    """A classifier's number of classes: its ``num_classes`` attribute, else the width of its last Linear."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    for module in reversed(list(model.modules())):
        if isinstance(module, nn.Linear):
            return module.out_features
    return None


def check_source_fits(source: Any, field: str, num_classes: int | None, in_chans: int | None) -> None:
    """Refuses, before anything is built, a source (or list of sources) that declares a number of classes or of
    input channels other than the data's, naming the config field and both values."""
    if isinstance(source, (list, tuple)):
        for i, item in enumerate(source):
            check_source_fits(item, f"{field}[{i}]", num_classes, in_chans)
        return
    for name, want, what in (("num_classes", num_classes, "classes"), ("in_chans", in_chans, "input channels")):
        own = getattr(source, name, None)
        if isinstance(own, int) and want is not None and own != want:
            settable = name in inspect.signature(type(source).__init__).parameters
            hint = f" (or drop {field}.init_args.{name} to take the data's)" if settable else ""
            raise ValueError(
                f"{field}: {source.describe()} has {name} {own} but the data has {want} {what}; use a {field} "
                f"built for this data{hint}"
            )
