"""Cached soft labels (FKD-style): the teacher labels pre-sampled augmentations once; training replays them.

Online KD runs the teacher on every training batch. With a cache, the teacher runs once, before training, on
``repeats`` (R) augmentations per training image whose parameters are drawn in advance (crop offsets and flip for
the pad-and-crop recipe of CIFAR/digits; crop box and flip for ImageNet's random-resized crop). Its top-k
probabilities at the method's temperature are stored with those parameters, and training draws one of the R
stored augmentations per image and access, rebuilds exactly that view of the image and reads the teacher's
answer instead of computing it (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition",
arXiv 2112.01528). A cache built for another teacher, data set, augmentation, temperature or top-k is refused.

Stored distribution: the top-k probabilities p_i of softmax(z_t / T); the remaining mass 1 − Σ p_i is spread
evenly over the other C − k classes (FKD's "marginal smoothing"). With k = C (the default) it is exact up to
float16 storage. The method receives pseudo-logits T·log p, which give back p under softmax(·/T), so any loss that
reads the teacher only through softmax(z_t / T) at that T (KD, DKD) computes the same value as online.

Layout of a cache folder::

    cache.json                   format, fingerprints, R, k, T, C, shard size, parameter layout; "complete"
    shard_00000.index.npy        (n, R, k) class indices (int16, or int32 for C > 32767)
    shard_00000.prob.npy         (n, R, k) probabilities (float16)
    shard_00000.params.npy       (n, R, P) augmentation parameters (float32)
    ...

Every file is written to a temporary name and renamed, so an interrupted build leaves whole shards only; the
next build with the same fingerprints keeps them and computes the rest. Shards are read memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from zoo.data.transforms import ReplayAugment
from zoo.io import atomic_path, atomic_write
from zoo.progress import progress

__all__ = [
    "CACHE_FORMAT",
    "CachedSoftLabelDataset",
    "SoftLabelCache",
    "SoftLabels",
    "build_soft_label_cache",
    "dataset_fingerprint",
    "prepare_soft_labels",
    "soft_labels_to_logits",
    "teacher_fingerprint",
    "teacher_top_k",
]

CACHE_FORMAT = "distill-zoo/soft-labels/1"
MANIFEST = "cache.json"


# ----------------------------------------------------------------------------------------------- fingerprints
def _hash_tensor(h: Any, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer of the teacher (names, dtypes, shapes, bytes) and its input map."""
    h = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        _hash_tensor(h, tensor)
    h.update(repr(getattr(teacher, "expected_norm", None)).encode())
    h.update(repr(getattr(teacher, "ensemble", None)).encode())
    return h.hexdigest()[:16]


def dataset_fingerprint(dataset: Dataset, max_images: int = 256) -> str:
    """sha256 over the length, every label and an evenly strided sample of ≤ ``max_images`` un-augmented images."""
    n = len(dataset)
    h = hashlib.sha256(str(n).encode())
    labels = getattr(dataset, "labels", None) if not hasattr(dataset, "targets") else dataset.targets
    if labels is None:
        labels = [dataset[i][1] for i in range(n)]
    _hash_tensor(h, torch.as_tensor(np.asarray(labels)).long())
    for i in range(0, n, max(1, n // max_images)):
        image = dataset[i][0]
        if not isinstance(image, Tensor):
            image = torch.from_numpy(np.asarray(image).copy())
        _hash_tensor(h, image)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- the cache
@dataclass
class SoftLabels:
    """Options of the cached soft-label mode (``soft_labels:`` of a method that supports it).

    Args:
        path: cache folder (built at fit start when absent or incomplete; refused when built for another teacher,
            data set, augmentation, temperature or top-k).
        repeats: R, augmentations labelled per training image (FKD labels hundreds of crops for ImageNet; a
            few tens suffice for CIFAR-sized data).
        top_k: probabilities stored per view (``None``: all classes, exact).
        shard_size: images per shard file.
        seed: seeds the augmentation draws (independent of the training seed).
        batch_size: teacher batch size while building.
    """

    path: str
    repeats: int = 16
    top_k: int | None = None
    shard_size: int = 10000
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"soft_labels.repeats must be ≥ 1, got {self.repeats}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"soft_labels.top_k must be ≥ 1 or null, got {self.top_k}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("soft_labels.shard_size and soft_labels.batch_size must be ≥ 1")

    def stored_k(self, num_classes: int) -> int:
        """Probabilities stored per view for ``num_classes`` classes (``top_k``, at most all of them)."""
        return min(self.top_k or num_classes, num_classes)


def teacher_top_k(logits: Tensor, temperature: float, k: int) -> tuple[Tensor, Tensor]:
    """(probabilities, class indices) of the ``k`` largest entries of softmax(logits / T): what a cache stores."""
    top = (logits.float() / temperature).softmax(-1).topk(k, dim=-1)
    return top.values, top.indices


def _atomic_save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _atomic_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2))


def _shard_files(root: Path, shard: int) -> dict[str, Path]:
    return {k: root / f"shard_{shard:05d}.{k}.npy" for k in ("index", "prob", "params")}


def _check_manifest(path: Path, manifest: dict, expected: dict) -> None:
    if manifest.get("format") != CACHE_FORMAT:
        found = manifest.get("format")
        raise ValueError(f"{path}: not a soft-label cache (format {found!r}, expected {CACHE_FORMAT!r})")
    for key, want in expected.items():
        have = manifest.get(key)
        if have != want:
            raise ValueError(
                f"soft-label cache {path}: built for {key}={have!r}, this run has {key}={want!r}; delete the folder "
                "to rebuild it or point soft_labels.path elsewhere"
            )


def build_soft_label_cache(
    path: str | os.PathLike,
    teacher: Callable[[Tensor], Tensor],
    dataset: Dataset,
    augment: ReplayAugment,
    fingerprint: dict[str, Any],
    *,
    num_classes: int,
    temperature: float,
    options: SoftLabels,
    to_tensor: Callable[[Any], Tensor] | None = None,
    device: torch.device | str = "cpu",
    shards: Sequence[int] | None = None,
    num_workers: int = 0,
) -> Path:
    """Labels ``options.repeats`` replayable views of every image of ``dataset`` with ``teacher``; see the module.

    ``dataset[i]`` gives the un-augmented ``(image, label)``; ``augment.apply`` makes a view and ``to_tensor``
    (if given) turns it into the normalised tensor the teacher takes. ``fingerprint`` (teacher, data,
    augmentation, normalisation) goes into ``cache.json``; finished shards of an interrupted build with the same
    fingerprint are kept. ``shards`` limits the work to some shard numbers (one process per rank builds its share;
    the manifest is marked complete by whoever finds every shard present). Each image is loaded once and its R
    views are made together; ``num_workers`` DataLoader workers do that in parallel. Returns the folder.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    k = options.stored_k(num_classes)
    header = {
        "format": CACHE_FORMAT,
        **fingerprint,
        "num_images": n,
        "num_classes": num_classes,
        "temperature": float(temperature),
        "top_k": k,
        "repeats": options.repeats,
        "seed": options.seed,
        "shard_size": options.shard_size,
        "num_params": augment.num_params,
    }
    manifest_path = root / MANIFEST
    if manifest_path.is_file():
        _check_manifest(manifest_path, json.loads(manifest_path.read_text()), {k2: v for k2, v in header.items()})
    else:
        _atomic_json(manifest_path, {**header, "complete": False})
    num_shards = math.ceil(n / options.shard_size)
    index_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
    todo = range(num_shards) if shards is None else shards
    for shard in todo:
        files = _shard_files(root, shard)
        if all(f.is_file() for f in files.values()):
            continue
        start, stop = shard * options.shard_size, min(n, (shard + 1) * options.shard_size)
        g = torch.Generator().manual_seed(options.seed * 1_000_003 + shard)
        params = augment.sample((stop - start) * options.repeats, g).view(stop - start, options.repeats, -1)
        views = _Views(dataset, augment, params, start, to_tensor)
        loader = torch.utils.data.DataLoader(
            views, batch_size=max(1, options.batch_size // options.repeats), num_workers=num_workers
        )
        index = np.empty((stop - start, options.repeats, k), dtype=index_dtype)
        prob = np.empty((stop - start, options.repeats, k), dtype=np.float16)
        done = 0
        batches = progress(loader, f"soft labels, shard {shard + 1}/{num_shards}")
        for images in batches:  # (images, R, C, H, W): every view of an image from one decode
            b = images.shape[0]
            with torch.no_grad():
                top_prob, top_index = teacher_top_k(teacher(images.flatten(0, 1).to(device)), temperature, k)
            index[done : done + b] = top_index.view(b, options.repeats, k).cpu().numpy().astype(index_dtype)
            prob[done : done + b] = top_prob.view(b, options.repeats, k).cpu().numpy().astype(np.float16)
            done += b
        _atomic_save(files["params"], params.numpy())
        _atomic_save(files["prob"], prob)
        _atomic_save(files["index"], index)  # written last: its presence marks the shard done
    if all(all(f.is_file() for f in _shard_files(root, s).values()) for s in range(num_shards)):
        _atomic_json(manifest_path, {**header, "complete": True})
    return root


class _Views(Dataset):
    """The R stored views of each image of one shard, made from one load of the image."""

    def __init__(self, dataset: Dataset, augment: ReplayAugment, params: Tensor, start: int, to_tensor: Any) -> None:
        self.dataset, self.augment, self.params, self.start, self.to_tensor = dataset, augment, params, start, to_tensor

    def __len__(self) -> int:
        return self.params.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        image = self.dataset[self.start + i][0]
        views = [self.augment.apply(image, p) for p in self.params[i]]
        return torch.stack([self.to_tensor(v) if self.to_tensor is not None else v for v in views])


class SoftLabelCache:
    """A finished cache, opened memory-mapped; ``expected`` fields are checked against its ``cache.json``."""

    def __init__(self, path: str | os.PathLike, expected: dict[str, Any] | None = None) -> None:
        self.root = Path(path)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"soft-label cache {self.root}: no {MANIFEST} (build it first)")
        self.manifest = json.loads(manifest_path.read_text())
        _check_manifest(manifest_path, self.manifest, expected or {})
        if not self.manifest.get("complete"):
            raise ValueError(
                f"soft-label cache {self.root}: incomplete (an interrupted build); build it again to finish"
            )
        self.shard_size = int(self.manifest["shard_size"])
        self.num_shards = math.ceil(self.manifest["num_images"] / self.shard_size)
        for s in range(self.num_shards):
            for f in _shard_files(self.root, s).values():
                if not f.is_file():
                    raise FileNotFoundError(f"soft-label cache {self.root}: shard file {f.name} is missing")
        self._maps: dict[int, dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self.manifest["num_images"])

    @property
    def repeats(self) -> int:
        return int(self.manifest["repeats"])

    def __getstate__(self) -> dict:  # memory maps are reopened in each DataLoader worker, not pickled
        return {**self.__dict__, "_maps": None}

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if self._maps is None:
            self._maps = {}
        if s not in self._maps:
            self._maps[s] = {k: np.load(f, mmap_mode="r") for k, f in _shard_files(self.root, s).items()}
        return self._maps[s]

    def view(self, i: int, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """(class indices, probabilities, augmentation parameters) of view ``r`` of image ``i``."""
        shard = self._shard(i // self.shard_size)
        j = i % self.shard_size
        return (
            torch.from_numpy(np.array(shard["index"][j, r], dtype=np.int64)),
            torch.from_numpy(np.array(shard["prob"][j, r], dtype=np.float32)),
            torch.from_numpy(np.array(shard["params"][j, r], dtype=np.float32)),
        )


class CachedSoftLabelDataset(Dataset):
    """Training set that replays cached views: ``{"image", "label", "soft_index", "soft_prob"}`` per item.

    Each access draws one of the R stored views of the image with torch's RNG (seeded per DataLoader worker by
    Lightning's ``seed_everything(workers=True)`` / torch's worker seeding), rebuilds it with the stored
    parameters and returns the teacher's stored probabilities for it.
    """

    def __init__(
        self,
        source: Dataset,
        cache: SoftLabelCache,
        augment: ReplayAugment,
        to_tensor: Callable[[Any], Tensor] | None = None,
    ) -> None:
        if len(source) != len(cache):
            raise ValueError(f"soft-label cache {cache.root}: {len(cache)} images, the training set has {len(source)}")
        self.source, self.cache, self.augment, self.to_tensor = source, cache, augment, to_tensor

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label = self.source[i]
        r = int(torch.randint(self.cache.repeats, ()))
        index, prob, params = self.cache.view(i, r)
        view = self.augment.apply(image, params)
        if self.to_tensor is not None:
            view = self.to_tensor(view)
        return {"image": view, "label": label, "soft_index": index, "soft_prob": prob}


def soft_labels_to_logits(index: Tensor, prob: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Pseudo-logits T·log p̂ of the stored top-k (index, prob), the rest of the mass spread evenly (module doc).

    softmax(result / T) = p̂, so a loss that reads teacher logits only through softmax(z_t / T) at this T gets p̂.
    """
    prob = prob.float()
    k = index.shape[-1]
    if k < num_classes:
        rest = (1.0 - prob.sum(-1, keepdim=True)).clamp_min(0.0) / (num_classes - k)
        full = rest.expand(*prob.shape[:-1], num_classes).clone()
    else:
        full = prob.new_zeros(*prob.shape[:-1], num_classes)
    full.scatter_(-1, index.long(), prob)
    full = full / full.sum(-1, keepdim=True)
    return temperature * full.clamp_min(torch.finfo(torch.float32).tiny).log()


def prepare_soft_labels(
    options: SoftLabels,
    teacher: torch.nn.Module,
    datamodule: Any,
    trainer: Any,
    *,
    num_classes: int,
    temperature: float,
    owner: str,
) -> None:
    """Builds the cache at fit start when missing (each rank its shards), checks it, and swaps the data module's
    training set for the replaying :class:`CachedSoftLabelDataset`.

    The build runs under a forked RNG, so a run that builds the cache and one that reuses it train from the same
    random state. ``owner`` names the method in errors.
    """
    from zoo.data.base import ZooDataModule

    if not isinstance(datamodule, ZooDataModule) or datamodule.semi_supervised:
        raise ValueError(
            f"{owner}.soft_labels needs a (fully supervised) zoo data module to replay its augmentation; "
            "pass data: (a ZooDataModule) rather than loaders"
        )
    source, augment, to_tensor = datamodule.replay_source()
    fingerprint = {
        "teacher": teacher_fingerprint(teacher),
        "data": f"{datamodule.name}:{dataset_fingerprint(source)}",
        "augmentation": augment.spec(),
        "normalization": [[round(float(v), 6) for v in datamodule.mean], [round(float(v), 6) for v in datamodule.std]],
    }
    expected = {
        **fingerprint,
        "temperature": float(temperature),
        "num_classes": num_classes,
        "top_k": options.stored_k(num_classes),
        "repeats": options.repeats,
        "seed": options.seed,
    }
    manifest = Path(options.path) / MANIFEST
    if not (manifest.is_file() and json.loads(manifest.read_text()).get("complete")):
        strategy, rank, world = trainer.strategy, trainer.global_rank, trainer.world_size
        device = next(teacher.parameters(), torch.empty(0)).device
        kwargs = {"num_classes": num_classes, "temperature": temperature, "options": options,
                  "to_tensor": to_tensor, "device": device, "num_workers": datamodule.num_workers}
        num_shards = -(-len(source) // options.shard_size)
        with torch.random.fork_rng(devices=[]):
            if rank == 0:  # writes (or checks) the header first
                build_soft_label_cache(options.path, teacher, source, augment, fingerprint, shards=[], **kwargs)
            strategy.barrier("soft_labels_header")
            build_soft_label_cache(
                options.path, teacher, source, augment, fingerprint, shards=range(rank, num_shards, world), **kwargs
            )
            strategy.barrier("soft_labels_shards")
            if rank == 0:  # marks the cache complete once every shard is there
                build_soft_label_cache(options.path, teacher, source, augment, fingerprint, shards=[], **kwargs)
            strategy.barrier("soft_labels_done")
    cache = SoftLabelCache(options.path, expected)
    datamodule.train_set = CachedSoftLabelDataset(source, cache, augment, to_tensor)
