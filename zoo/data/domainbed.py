"""Domain generalisation data in the DomainBed layout: leave-domains-out, one batch per training domain.

``<root>/<domain>/<class>/<image>`` for PACS, VLCS, OfficeHome, TerraIncognita and DomainNet as DomainBed's
``download.py`` lays them out (e.g. ``PACS/{art_painting,cartoon,photo,sketch}/<class>/*.jpg``). Without ``root``
the module builds the digit domains of the VLM spec's CPU check from scikit-learn's digits, so nothing is read
from disk or downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset

from zoo.data.base import ZooDataModule
from zoo.data.digits import TensorImageDataset, load_digits_tensors

__all__ = ["DIGIT_DOMAINS", "DomainBatchSampler", "DomainBedDataModule", "digit_domain_images"]

#: The digit domains, in order: clean, Gaussian noise (σ 0.3), inverted, rotated 90°.
DIGIT_DOMAINS: tuple[str, ...] = ("clean", "noise", "inverted", "rotated")
_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def digit_domain_images(
    image_size: int = 16, noise_std: float = 0.3, noise_seed: int = 0
) -> tuple[dict[str, Tensor], Tensor]:
    """The 1797 scikit-learn digits in the four domains, as images in [0, 1] (noise may leave it) of shape
    (N, 1, S, S), and their labels. The same digit has the same index in every domain; the noise is drawn once
    from ``noise_seed``."""
    base, labels = load_digits_tensors(image_size)
    generator = torch.Generator().manual_seed(noise_seed)
    images = {
        "clean": base,
        "noise": base + noise_std * torch.randn(base.shape, generator=generator),
        "inverted": 1.0 - base,
        "rotated": torch.rot90(base, 1, dims=(2, 3)),
    }
    return images, labels


class _Domain(Dataset):
    """Items of ``dataset`` as ``(image, label, domain index)``."""

    def __init__(self, dataset: Dataset, domain: int) -> None:
        self.dataset, self.domain = dataset, domain

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Any, int]:
        image, label = self.dataset[index][:2]
        return image, label, self.domain


class DomainBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` items from each of several concatenated domains, domain after domain.

    Each domain is read from its own endless stream of reshuffled permutations, as DomainBed's infinite
    per-domain loaders: a domain larger than the smallest one is not cut at an epoch boundary, it carries on where it
    stopped. An epoch is ``min_d n_d // batch_size`` steps (DomainBed's ``steps_per_epoch``). The shuffling generator
    is seeded from torch's global generator on the first epoch (as ``RandomSampler``), so ``seed_everything``
    makes runs repeatable.

    Args:
        sizes: number of items of each domain, in the order of the concatenation.
        batch_size: items per domain and step.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int) -> None:
        if not sizes:
            raise ValueError("DomainBatchSampler: no domains")
        if min(sizes) < batch_size:
            raise ValueError(
                f"DomainBatchSampler: a training domain has {min(sizes)} images, fewer than batch_size={batch_size} "
                "per domain; lower the batch size"
            )
        self.sizes = [int(n) for n in sizes]
        self.offsets = np.cumsum([0, *self.sizes[:-1]]).tolist()
        self.batch_size = batch_size
        self._generator: torch.Generator | None = None
        self._streams: list[list[int]] = [[] for _ in self.sizes]

    def __len__(self) -> int:
        return min(n // self.batch_size for n in self.sizes)

    def _take(self, domain: int) -> list[int]:
        stream = self._streams[domain]
        while len(stream) < self.batch_size:
            stream.extend(torch.randperm(self.sizes[domain], generator=self._generator).tolist())
        batch, self._streams[domain] = stream[: self.batch_size], stream[self.batch_size :]
        return [self.offsets[domain] + i for i in batch]

    def __iter__(self):
        if self._generator is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            self._generator = torch.Generator().manual_seed(seed)
        for _ in range(len(self)):
            yield [i for d in range(len(self.sizes)) for i in self._take(d)]


class DomainBedDataModule(ZooDataModule):
    """Leave-domains-out domain generalisation: train on the source domains, test on the held-out ones.

    Every domain is split with ``split_seed`` into train / validation (``holdout_fraction``, DomainBed's "out"
    split) / test (``test_fraction``). Training batches hold ``batch_size`` images of *each* source domain,
    concatenated domain after domain (DomainBed's ``zip`` of per-domain loaders); every item is ``(image, label,
    domain index)``. Validation is the source domains' validation splits (training-domain validation, DomainBed's
    model selection and SWAD's loss); test is the held-out domains (their test split when ``test_fraction`` > 0,
    otherwise all their images), or the source domains' test splits when no domain is held out.
    :meth:`eval_dataloader` gives any domains and split.

    Image folders (``root``): DomainBed's transforms, i.e. RandomResizedCrop(``image_size``, scale 0.7–1), flip,
    ColorJitter(0.3, 0.3, 0.3, 0.3), RandomGrayscale(0.1) for training and Resize((``image_size``, ``image_size``))
    for evaluation, then ImageNet normalisation. Every domain must hold the same class folders. The split is seeded
    per domain (``split_seed`` + domain index), not DomainBed's ``seed_hash``, so its images differ from DomainBed's.

    Digit domains (no ``root``): scikit-learn's 1797 digits, bilinearly upsampled to ``image_size``, in four domains
    (``DIGIT_DOMAINS``: clean; Gaussian noise σ = ``noise_std``; inverted; rotated 90°), repeated to RGB and
    normalised with mean = std = 0.5. One stratified split of the digits is shared by every domain, so no test digit
    is seen in training in any domain. Training images are translated by up to ``shift`` pixels (filled with the
    domain's background).

    Args:
        root: the data set folder, or ``None`` for the digit domains.
        domains: domain names to use, in order (default: every sub-folder of ``root``, sorted as DomainBed does;
            the four digit domains).
        test_domains: held-out domain names (default for the digit domains: ``["rotated"]``; required with
            ``root``); ``[]`` trains on every domain.
        holdout_fraction: share of each domain kept for validation (DomainBed: 0.2).
        test_fraction: share of each domain kept for in-domain testing (default: 0 for folders, as DomainBed;
            0.2 for the digit domains).
        split_seed: seed of the splits (DomainBed's ``trial_seed``).
        image_size: side of the images (default 224 for folders, 16 for digits).
        augment: random training augmentation.
        mean, std: normalisation (default ImageNet's for folders, 0.5 for digits).
        noise_std: σ of the digit noise domain.
        shift: maximum translation of training digits in pixels (default: ``image_size`` // 16, one pixel at 16×16;
            ``DigitsDataModule``'s quarter of the side slows the 4-pixel-patch ViTs of the CPU check a lot: the digits
            CLIP reached 24 % zero-shot top-1 after 400 steps with 4 pixels, 63 % with 1).
        batch_size: images per source domain and step (DomainBed: 32).
        eval_batch_size, num_workers, pin_memory: see ``ZooDataModule`` (``drop_last`` does not apply: every training
            batch is full).
    """

    in_chans = 3

    def __init__(
        self,
        root: str | None = None,
        domains: list[str] | None = None,
        test_domains: list[str] | None = None,
        holdout_fraction: float = 0.2,
        test_fraction: float | None = None,
        split_seed: int = 0,
        image_size: int | None = None,
        augment: bool = True,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        noise_std: float = 0.3,
        shift: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, drop_last=True)
        self.root = root
        self.digits = root is None
        test_fraction = (0.2 if self.digits else 0.0) if test_fraction is None else test_fraction
        if not (0 < holdout_fraction < 1 and 0 <= test_fraction < 1 and holdout_fraction + test_fraction < 1):
            raise ValueError(
                f"DomainBedDataModule: holdout_fraction ({holdout_fraction}) must be in (0, 1), test_fraction "
                f"({test_fraction}) in [0, 1), and their sum below 1"
            )
        self.holdout_fraction, self.test_fraction, self.split_seed = holdout_fraction, test_fraction, split_seed
        self.image_size = image_size or (16 if self.digits else 224)
        self.augment = augment
        self.mean = tuple(mean) if mean else ((0.5,) * 3 if self.digits else _IMAGENET_MEAN)
        self.std = tuple(std) if std else ((0.5,) * 3 if self.digits else _IMAGENET_STD)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"DomainBedDataModule.mean/std: expected 3 values each (std > 0), got {self.mean}, {self.std}"
            )
        self.noise_std = noise_std
        self.shift = shift if shift is not None else max(1, self.image_size // 16)
        available = list(DIGIT_DOMAINS) if self.digits else self._folder_domains()
        self.domains = list(domains) if domains else available
        unknown = [d for d in self.domains if d not in available]
        if unknown:
            raise ValueError(f"DomainBedDataModule.domains: unknown {unknown}; the data has {available}")
        if test_domains is None:
            if not self.digits:
                raise ValueError(
                    f"DomainBedDataModule.test_domains: name the held-out domain(s) of {root}, from {self.domains} "
                    "(DomainBed runs each in turn), or [] to train on all"
                )
            test_domains = ["rotated"] if "rotated" in self.domains else []
        unknown = [d for d in test_domains if d not in self.domains]
        if unknown:
            raise ValueError(f"DomainBedDataModule.test_domains: {unknown} not among the domains {self.domains}")
        self.test_domains = list(test_domains)
        self.train_domains = [d for d in self.domains if d not in self.test_domains]
        if not self.train_domains:
            raise ValueError("DomainBedDataModule.test_domains holds every domain: nothing is left to train on")
        self._class_names: list[str] | None = list(_DIGIT_NAMES) if self.digits else None
        self._splits: dict[str, dict[str, np.ndarray]] | None = None
        self._digit_images: tuple[dict[str, Tensor], Tensor] | None = None
        self._folders: dict[tuple[str, bool], Any] = {}

    # ----------------------------------------------------------------------------------------------- facts
    @property
    def name(self) -> str:
        return "digit_domains" if self.digits else (Path(self.root).name.lower() or "domainbed")

    @property
    def class_names(self) -> list[str]:
        """Class names (folder names for image folders), in label order."""
        if self._class_names is None:
            self._class_names = sorted(p.name for p in self._domain_dir(self.domains[0]).iterdir() if p.is_dir())
        return list(self._class_names)

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.class_names)

    def domain_index(self, domain: str) -> int:
        return self.domains.index(domain)

    # ----------------------------------------------------------------------------------------------- folders
    def _folder_domains(self) -> list[str]:
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"DomainBedDataModule.root: no folder {root.resolve()}; expected DomainBed's layout "
                "<root>/<domain>/<class>/<image> (e.g. PACS/art_painting/dog/pic_001.jpg)"
            )
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise FileNotFoundError(f"DomainBedDataModule.root: {root} holds no domain folders")
        return found

    def _domain_dir(self, domain: str) -> Path:
        return Path(self.root) / domain

    def _image_folder(self, domain: str, train: bool) -> Any:
        key = (domain, train)
        if key not in self._folders:
            from torchvision.datasets import ImageFolder

            folder = ImageFolder(str(self._domain_dir(domain)), transform=self.transforms(train))
            if folder.classes != self.class_names:
                raise ValueError(
                    f"DomainBedDataModule: domain {domain!r} has classes {folder.classes}, but "
                    f"{self.domains[0]!r} has {self.class_names}; every domain needs the same class folders"
                )
            self._folders[key] = folder
        return self._folders[key]

    def transforms(self, train: bool) -> Any:
        """DomainBed's image transforms (image folders only)."""
        import torchvision.transforms as T

        size = self.image_size
        if train and self.augment:
            ops = [
                T.RandomResizedCrop(size, scale=(0.7, 1.0)),
                T.RandomHorizontalFlip(),
                T.ColorJitter(0.3, 0.3, 0.3, 0.3),
                T.RandomGrayscale(),
            ]
        else:
            ops = [T.Resize((size, size))]
        return T.Compose([*ops, T.ToTensor(), T.Normalize(self.mean, self.std)])

    # ----------------------------------------------------------------------------------------------- splits
    def _split_index(self, n: int, seed: int, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
        index = np.arange(n)
        n_val, n_test = int(n * self.holdout_fraction), int(n * self.test_fraction)
        if labels is None:
            order = np.random.RandomState(seed).permutation(n)
            val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
        else:
            from sklearn.model_selection import train_test_split

            rest, val = train_test_split(index, test_size=n_val, stratify=labels, random_state=seed)
            if n_test:
                train, test = train_test_split(rest, test_size=n_test, stratify=labels[rest], random_state=seed)
            else:
                train, test = rest, index[:0]
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test), "all": index}

    def splits(self) -> dict[str, dict[str, np.ndarray]]:
        """Indices of each domain's ``train`` / ``val`` / ``test`` split (and ``all``), by domain name."""
        if self._splits is None:
            if self.digits:
                images, labels = self._digits()
                shared = self._split_index(len(labels), self.split_seed, labels.numpy())
                self._splits = {d: shared for d in self.domains}
            else:
                self._splits = {
                    d: self._split_index(len(self._image_folder(d, False)), self.split_seed + self.domain_index(d))
                    for d in self.domains
                }
        return self._splits

    def _digits(self) -> tuple[dict[str, Tensor], Tensor]:
        if self._digit_images is None:
            self._digit_images = digit_domain_images(self.image_size, self.noise_std)
        return self._digit_images

    def domain_dataset(self, domain: str, split: str, train: bool = False) -> Dataset:
        """One domain's ``split`` (``train`` / ``val`` / ``test`` / ``all``) as ``(image, label, domain)`` items,
        with the training augmentation when ``train``."""
        if domain not in self.domains:
            raise ValueError(f"DomainBedDataModule: unknown domain {domain!r}; the domains are {self.domains}")
        index = self.splits()[domain][split]
        if self.digits:
            images, labels = self._digits()
            m, s = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
            x = (images[domain][index].expand(-1, 3, -1, -1) - m) / s
            background = 1.0 if domain == "inverted" else 0.0
            fill = float((background - self.mean[0]) / self.std[0])
            data: Dataset = TensorImageDataset(
                x.contiguous(), labels[index], shift=self.shift if train and self.augment else 0, fill=fill
            )
        else:
            data = Subset(self._image_folder(domain, train and self.augment), index.tolist())
        return _Domain(data, self.domain_index(domain))

    def _concat(self, domains: Sequence[str], split: str, train: bool = False) -> ConcatDataset:
        return ConcatDataset([self.domain_dataset(d, split, train) for d in domains])

    def _test_split(self) -> str:
        return "test" if self.test_fraction > 0 else "all"

    @property
    def test_split(self) -> str:
        """What the test loader reads, as a published card names it: the held-out domains, or a test share of
        the training domains."""
        return f"held-out domains {', '.join(self.test_domains)}" if self.test_domains else "test"

    # ----------------------------------------------------------------------------------------------- loaders
    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._concat(self.train_domains, "train", train=True)
        self.val_set = self._concat(self.train_domains, "val")
        if self.test_domains:
            self.test_set = self._concat(self.test_domains, self._test_split())
        elif self.test_fraction > 0:
            self.test_set = self._concat(self.train_domains, "test")
        else:
            self.test_set = self.val_set

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("DomainBedDataModule: call setup() before asking for a loader")
        sizes = [len(d) for d in self.train_set.datasets]
        return DataLoader(
            self.train_set,
            batch_sampler=DomainBatchSampler(sizes, self.batch_size),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def eval_dataloader(self, domains: Sequence[str], split: str = "test") -> DataLoader:
        """An evaluation loader over ``domains``' ``split`` (``all`` for every image), e.g. the in-domain test
        ``eval_dataloader(dm.train_domains, "test")`` or the held-out ``eval_dataloader(dm.test_domains)``."""
        if split == "test" and self.test_fraction == 0:
            raise ValueError("DomainBedDataModule.eval_dataloader: test_fraction is 0, so there is no test split")
        return self._loader(self._concat(list(domains), split), train=False)

    @property
    def steps_per_epoch(self) -> int:
        """Training steps in one epoch: the smallest source domain's train split over ``batch_size``."""
        sizes = [len(self.splits()[d]["train"]) for d in self.train_domains]
        return max(1, math.floor(min(sizes) / self.batch_size))
