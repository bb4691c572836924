"""``zoo.hub.Pretrained``: a published checkpoint of the registry as a model source."""

from __future__ import annotations

from torch import nn

from zoo.hub import TASK_DISTILLED, get_entry, load
from zoo.models.sources import ModelSource

__all__ = ["Pretrained"]


class Pretrained(ModelSource):
    """A published checkpoint of the registry, usable wherever a model source is expected::

        teacher: {class_path: zoo.hub.Pretrained, init_args: {name: digits-resnet32-teacher}}

    The architecture comes from the entry, the weights from ``download(name)`` (shipped, cached or fetched on first
    use, verified against the entry's sha256), and the normalisation the weights expect (``mean``/``std``) from the
    entry, so a teacher re-normalises its input when needed.

    Args:
        name: the registry name (see ``zoo checkpoints list``).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        entry = get_entry(name)
        if entry["task"] == TASK_DISTILLED:
            raise ValueError(
                f"Pretrained.name: {name!r} is a distilled set, not a model; use it as data: "
                f"DistilledDataModule(path='hub:{name}')"
            )
        self.mean, self.std = tuple(entry["mean"]), tuple(entry["std"])
        # what the weights were trained for, checked against the data before they are loaded
        arch = entry["architecture"].get("init_args", {})
        input_size = entry.get("input_size") or []
        self.num_classes = arch.get("num_classes")
        self.in_chans = arch.get("in_chans") or (input_size[0] if input_size else None)

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
        model, entry = load(self.name)
        arch = entry["architecture"].get("init_args", {})
        for field, given in (("num_classes", num_classes), ("in_chans", in_chans)):
            own = arch.get(field)
            if given is not None and own is not None and own != given:
                raise ValueError(
                    f"Pretrained({self.name!r}) has {field}={own} but the data has {given}; use a checkpoint "
                    "trained for this data or change the data module"
                )
        return model

    def describe(self) -> str:
        return f"hub:{self.name}"


Pretrained.__module__ = "zoo.hub"  # configs and checkpoints name it zoo.hub.Pretrained
