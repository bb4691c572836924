"""The distilled set as a versioned artifact, and :class:`DistilledDataModule` to train any zoo method on it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from zoo.data.base import ZooDataModule
from zoo.io import atomic_path

__all__ = ["FORMAT", "DistilledDataModule", "load_distilled", "save_distilled"]

FORMAT = "distill-zoo/distilled-set/1"


def save_distilled(
    path: str | os.PathLike,
    images: Tensor,
    labels: Tensor,
    lr: float,
    metadata: dict[str, Any],
    zca: Any = None,
) -> Path:
    """Writes images, labels (int64 classes or float label logits), the learned lr and the config atomically.

    One safetensors file: tensors ``images``, ``labels``, ``lr`` (and ``zca_mean``, ``zca_matrix``,
    ``zca_inverse`` when the set lives in ZCA space); metadata ``format``, and ``metadata`` as JSON (method,
    data set, IPC, iteration, the resolved config, the data normalisation).
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        "images": images.detach().float().cpu().contiguous(),
        "labels": labels.detach().cpu().contiguous(),
        "lr": torch.tensor([float(lr)]),
    }
    if zca is not None:
        for key, value in zca.state_dict().items():
            tensors[f"zca_{key}"] = value.detach().cpu().contiguous()
    meta = {"format": FORMAT, "metadata": json.dumps(metadata, default=str)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


HUB_PREFIX = "hub:"


def load_distilled(path: str | os.PathLike, field: str | None = None) -> dict[str, Any]:
    """Reads an artifact of :func:`save_distilled`; returns images, labels, lr, metadata and the ZCA state.

    ``path`` is a file, or ``hub:<name>`` for a published distilled set of the checkpoint registry (task
    ``dataset-distillation``; shipped, cached or downloaded, and verified against the entry's sha256 by
    ``zoo.hub.download``). ``field`` names the setting that gave the path in error messages (e.g.
    ``DistilledDataModule.path``).
    """
    from safetensors import safe_open

    where = f"{field}: " if field else ""
    if str(path).startswith(HUB_PREFIX):
        from zoo import hub

        name = str(path)[len(HUB_PREFIX) :]
        entry = hub.get_entry(name)
        if entry["task"] != hub.TASK_DISTILLED:
            raise ValueError(
                f"{where}{path} is a {entry['task']} checkpoint, not a distilled set (task "
                f"{hub.TASK_DISTILLED!r}); see `zoo checkpoints list`"
            )
        path = hub.download(name)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}no distilled set at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            ours = meta.get("format") == FORMAT
            tensors = {k: f.get_tensor(k) for k in f.keys()} if ours else {}  # noqa: SIM118 - safe_open has no items()
    except Exception as err:
        raise ValueError(f"{where}{path}: not a distilled set (unreadable as safetensors: {err})") from err
    if not ours:
        raise ValueError(f"{where}{path}: not a distilled set (format {meta.get('format')!r}, expected {FORMAT!r})")
    zca = {k[len("zca_") :]: v for k, v in tensors.items() if k.startswith("zca_")}
    return {
        "images": tensors["images"],
        "labels": tensors["labels"],
        "lr": float(tensors["lr"][0]),
        "metadata": json.loads(meta.get("metadata", "{}")),
        "zca": zca or None,
    }


class _TensorPairs(Dataset):
    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]


class _Transformed(Dataset):
    def __init__(self, base: Dataset, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.base[i]
        with torch.no_grad():
            return self.transform(x.unsqueeze(0))[0], y


class DistilledDataModule(ZooDataModule):
    """A distilled set as training data, with a real data module's validation and test splits.

    Any zoo method trains on it: ``data: {class_path: zoo.dataset_distillation.DistilledDataModule, init_args:
    {path: runs/.../distilled.safetensors, real: {class_path: zoo.data.DigitsDataModule, ...}}}``. Soft labels (DATM)
    are turned into hard classes (argmax) unless ``soft_labels`` is true (then the label is the logit vector, for
    methods that accept soft targets). A set distilled in ZCA space gets the same whitening applied to the real
    validation and test images. ``num_classes``, ``in_chans``, ``mean`` and ``std`` are the real data module's.

    Args:
        path: the ``.safetensors`` artifact written by a trajectory-matching run, or ``hub:<name>`` for a published
            one (``zoo checkpoints list``; downloaded and verified on first use).
        real: the data module of the real data (validation/test splits and normalisation).
        soft_labels: keep DATM's label logits instead of their argmax.
        repeat: repeat the (tiny) synthetic set this many times per epoch, so an epoch has several batches.
        batch_size, eval_batch_size, num_workers, pin_memory: see ``ZooDataModule``.
        drop_last: default false here: MTT's ``evaluate_synset`` trains on every synthetic image each epoch (a
            CIFAR-10 IPC 50 set of 500 images at batch 256 is 2 batches, not 1).
    """

    def __init__(
        self,
        path: str,
        real: ZooDataModule | None = None,
        soft_labels: bool = False,
        repeat: int = 1,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, drop_last)
        self.path, self.real, self.soft_labels, self.repeat = path, real, soft_labels, repeat
        self.artifact = load_distilled(path, field="DistilledDataModule.path")
        images = self.artifact["images"]
        meta = self.artifact["metadata"]
        self.num_classes = int(meta.get("num_classes") or (self.artifact["labels"].max() + 1))
        self.in_chans = images.shape[1]
        self.lr = self.artifact["lr"]

    @property
    def name(self) -> str:
        return f"distilled-{self.artifact['metadata'].get('dataset', 'set')}"

    @property
    def mean(self) -> tuple[float, ...]:  # type: ignore[override]
        return tuple(self.real.mean) if self.real is not None else (0.0,) * self.in_chans

    @property
    def std(self) -> tuple[float, ...]:  # type: ignore[override]
        return tuple(self.real.std) if self.real is not None else (1.0,) * self.in_chans

    def zca(self) -> Any:
        state = self.artifact["zca"]
        if not state:
            return None
        from zoo.dataset_distillation.augment import ZCAWhitening

        zca = ZCAWhitening()
        zca.load_state_dict(state)
        return zca

    def setup(self, stage: str | None = None) -> None:
        labels = self.artifact["labels"]
        if labels.is_floating_point() and not self.soft_labels:
            labels = labels.argmax(-1)
        images = self.artifact["images"]
        if self.repeat > 1:
            images = images.repeat(self.repeat, 1, 1, 1)
            labels = labels.repeat(self.repeat, *([1] * (labels.dim() - 1)))
        self.train_set = _TensorPairs(images, labels)
        if self.real is not None:
            self.real.setup(stage)
            zca = self.zca()
            val, test = self.real.val_set, self.real.test_set
            self.val_set = _Transformed(val, zca) if zca is not None and val is not None else val
            self.test_set = _Transformed(test, zca) if zca is not None and test is not None else test
