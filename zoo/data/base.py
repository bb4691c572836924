"""The shared base of the data modules."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["ZooDataModule", "default_num_workers", "default_pin_memory"]


def default_num_workers() -> int:
    """DataLoader workers for one training process on this machine: Lightning's suggestion (the usable cores − 1,
    ``suggested_max_num_workers``), at most 8; 0 where that suggestion is below 2 (a 1–2-core machine), where
    Lightning does not ask for more and a worker process would only compete with training for the cores."""
    from lightning.fabric.utilities.data import suggested_max_num_workers

    n = min(8, suggested_max_num_workers(1))
    return n if n >= 2 else 0


def default_pin_memory() -> bool:
    """Pin host memory only where there is a CUDA device to copy to (elsewhere PyTorch warns that it is unused)."""
    return torch.cuda.is_available()


class ZooDataModule(L.LightningDataModule):
    """Base data module: loaders with one set of options, plus the facts methods and teachers need.

    Subclasses set ``train_set``, ``val_set``, ``test_set`` in ``setup`` and provide ``num_classes``,
    ``in_chans``, ``mean`` and ``std`` (the normalisation applied to every image they yield).

    Semi-supervised data (segmentation: MGD) also sets ``unlabelled_set``. With ``semi_supervised`` true the
    training loader is a ``CombinedLoader`` of three loaders, ``{"labelled": (x, y), "unlabelled": (u0, _),
    "unlabelled_mix": (u1, _)}`` (two independent shuffles of the unlabelled set, for CutMix), in
    ``max_size_cycle`` mode: an epoch is max(#labelled, #unlabelled) / batch steps and the shorter loader cycles,
    as in the MGD and CPS code. Without it only the labelled ``train_set`` is used.

    Args:
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes; None: ``default_num_workers()`` (min(8, usable cores − 1), 0 on a
            machine with 2 cores or fewer).
        pin_memory: pin host memory; None: ``default_pin_memory()`` (true when CUDA is available).
        drop_last: the training loader drops its last partial batch (when the set holds more than one batch), as
            timm's training loader does. Trajectory experts set it false: the official MTT/DATM/AST ``buffer.py``
            keeps the partial batch (CIFAR at batch 256: 196 steps per epoch, not 195). With it false, a last batch
            of one image fails in a BatchNorm layer in training mode; pick a batch size that leaves more.
    """

    num_classes: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    semi_supervised: bool = False

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"{type(self).__name__}.num_workers must be ≥ 0 or null (automatic), got {num_workers}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = default_pin_memory() if pin_memory is None else pin_memory
        self.drop_last = drop_last
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.unlabelled_set: Dataset | None = None

    def check_paths(self) -> None:
        """Refuses missing data folders or files, naming them; the ``zoo`` command calls it when the data module is
        built, before any model is. Data modules that read files override it (nothing to check here)."""

    @property
    def drops_partial_batch(self) -> bool:
        """Whether the training loader leaves images out every epoch: ``drop_last`` and a set that is more than one
        batch but not a whole number of them (false before ``setup``)."""
        n = len(self.train_set) if self.train_set is not None else 0
        return self.drop_last and n > self.batch_size and n % self.batch_size != 0

    @property
    def name(self) -> str:
        """Short data set name used in run names (``digits``, ``cifar100`` ...)."""
        return type(self).__name__.replace("DataModule", "").lower()

    def replay_source(self) -> tuple[Dataset, Any, Any]:
        """For cached soft labels (``zoo.soft_labels``): the training set without its random augmentation, that
        augmentation as a ``ReplayAugment``, and the transform from an augmented view to the normalised tensor
        (``None`` when the view already is one). Data modules whose augmentation cannot be replayed refuse."""
        raise ValueError(
            f"{type(self).__name__} cannot replay its training augmentation, so cached soft labels are not available "
            "for it (DigitsDataModule, CIFAR10DataModule, CIFAR100DataModule and ImageFolderDataModule can)"
        )

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a loader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train and self.drop_last and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> Any:
        if not self.semi_supervised:
            return self._loader(self.train_set, train=True)
        if self.unlabelled_set is None or len(self.unlabelled_set) == 0:
            raise ValueError(
                f"{type(self).__name__}.semi_supervised is true but there are no unlabelled training images "
                "(set the labelled fraction below 1 or give an unlabelled list)"
            )
        from lightning.pytorch.utilities import CombinedLoader

        loaders = {
            "labelled": self._loader(self.train_set, train=True),
            "unlabelled": self._loader(self.unlabelled_set, train=True),
            "unlabelled_mix": self._loader(self.unlabelled_set, train=True),
        }
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
