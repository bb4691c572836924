"""Expert trajectories on disk: one safetensors file per expert, and the folder of them (the "buffer").

File format (``expert_{k:04d}.safetensors``, no pickles):

- tensor ``trajectory``: float32 of shape (E + 1, P); row e holds the flattened parameters after e epochs (row 0 is
  the initialisation), P = ``layout.num_params``, parameters in ``named_parameters()`` order.
- metadata (safetensors' string map): ``format`` (``distill-zoo/expert-trajectory/1``), ``layout`` (JSON of
  :meth:`ParamLayout.to_metadata`: names and shapes), and every entry of the metadata dict given to
  :func:`save_trajectory`, JSON-encoded. :class:`~zoo.dataset_distillation.experts.ExpertTraining` records
  ``network`` (e.g. ``convnet:D3-w128-instancenorm``), ``network_config``, ``dataset``, ``zca``, ``dsa_strategy``,
  ``mean`` and ``std`` (the data module's input normalisation), the training hyper-parameters, ``seed`` and
  ``expert``.

A buffer folder holds the expert files and, when the experts were trained on ZCA-whitened images, the fitted
transform as ``zca.safetensors`` (``ZCAWhitening.save``), so distillation whitens its real images the same way.
MTT's ``replay_buffer_{k}.pt`` pickles (10 experts × lists of tensors) are not read; the layout is equivalent.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from zoo.dataset_distillation.functional import ParamLayout
from zoo.io import atomic_path

__all__ = [
    "FORMAT",
    "LazyParams",
    "Trajectory",
    "TrajectoryBuffer",
    "TrajectoryHeader",
    "expert_file",
    "load_trajectory",
    "read_header",
    "same_dsa_strategy",
    "same_normalisation",
    "save_trajectory",
]

FORMAT = "distill-zoo/expert-trajectory/1"
ZCA_FILE = "zca.safetensors"
_RESERVED = ("format", "layout")


def same_dsa_strategy(a: str | None, b: str | None) -> bool:
    """Whether two DSA strategy strings name the same augmentation (``""``, ``"none"`` and ``"None"`` are all none)."""

    def canonical(s: str | None) -> str | None:
        return "" if isinstance(s, str) and s.lower() in ("", "none") else s

    return canonical(a) == canonical(b)


def same_normalisation(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    """Whether two per-channel mean (or std) vectors agree to float32 round-off (relative 1e-6)."""
    if a is None or b is None:
        return a is None and b is None
    a, b = [float(v) for v in a], [float(v) for v in b]
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b))


def expert_file(buffer_dir: str | os.PathLike, k: int) -> Path:
    """``<buffer_dir>/expert_{k:04d}.safetensors``."""
    return Path(buffer_dir) / f"expert_{k:04d}.safetensors"


@dataclass
class TrajectoryHeader:
    """What a trajectory file says about itself, read without loading the tensor."""

    path: Path
    layout: ParamLayout
    metadata: dict[str, Any]
    shape: tuple[int, int]

    @property
    def num_epochs(self) -> int:
        """E: the number of training epochs recorded (the file holds E + 1 snapshots)."""
        return self.shape[0] - 1


class LazyParams:
    """A trajectory's (E + 1, P) snapshots read row by row from its memory-mapped file: ``rows[e]`` reads only row e.

    Distillation needs two to M + 1 snapshots of one expert per iteration, so a buffer of many experts costs disk
    reads, not RAM (100 CIFAR-100 ConvNet-3 experts × 101 snapshots would be about 20 GB in memory).
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int], device: str | torch.device = "cpu") -> None:
        self.path, self._shape, self.device = Path(path), (int(shape[0]), int(shape[1])), str(device)
        self._handle: Any = None
        self._rows: Any = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape)

    def __len__(self) -> int:
        return self._shape[0]

    def __getitem__(self, e: int) -> Tensor:
        if isinstance(e, bool) or not isinstance(e, int):
            raise TypeError(f"LazyParams: index one snapshot with an int, got {type(e).__name__}")
        if not -self._shape[0] <= e < self._shape[0]:
            raise IndexError(f"LazyParams: snapshot {e} out of range ({self.path} holds {self._shape[0]})")
        if self._rows is None:
            self._handle = safe_open(str(self.path), framework="pt", device=self.device)
            self._rows = self._handle.get_slice("trajectory")
        return self._rows[e]

    def __getstate__(self) -> dict[str, Any]:  # the file handle stays behind (reopened on first use)
        return {**self.__dict__, "_handle": None, "_rows": None}


@dataclass
class Trajectory:
    """One expert: ``params[e]`` is the flat parameter vector after e epochs (``params[0]``: the initialisation);
    a tensor, or :class:`LazyParams` for ``TrajectoryBuffer.load(..., lazy=True)``."""

    params: Tensor | LazyParams
    layout: ParamLayout
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_epochs(self) -> int:
        return self.params.shape[0] - 1


def save_trajectory(
    path: str | os.PathLike, trajectory: Tensor, layout: ParamLayout, metadata: dict[str, Any] | None = None
) -> Path:
    """Writes an (E + 1, P) trajectory atomically (``zoo.io.atomic_path``).

    A crash or error leaves either the previous file or none, never a half-written one under the final name.
    ``metadata`` values must be JSON-able; the keys ``format`` and ``layout`` are reserved.
    """
    path = Path(path)
    if trajectory.dim() != 2 or trajectory.shape[1] != layout.num_params or trajectory.shape[0] < 1:
        raise ValueError(
            f"save_trajectory({path}): expected a tensor of shape (epochs + 1, {layout.num_params}), "
            f"got {tuple(trajectory.shape)}"
        )
    metadata = dict(metadata or {})
    clash = [k for k in _RESERVED if k in metadata]
    if clash:
        raise ValueError(f"save_trajectory({path}): metadata keys {clash} are reserved")
    header = {"format": FORMAT, "layout": json.dumps(layout.to_metadata())}
    header.update({str(k): json.dumps(v) for k, v in metadata.items()})
    tensor = trajectory.detach().to("cpu", torch.float32).contiguous()
    with atomic_path(path) as tmp:
        save_file({"trajectory": tensor}, str(tmp), metadata=header)
    return path


def _decode(path: Path, raw: dict[str, str] | None) -> tuple[ParamLayout, dict[str, Any]]:
    raw = dict(raw or {})
    if raw.get("format") != FORMAT or "layout" not in raw:
        raise ValueError(
            f"{path}: not an expert trajectory of distill-zoo (metadata format {raw.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    layout = ParamLayout.from_metadata(json.loads(raw["layout"]))
    metadata: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _RESERVED:
            continue
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    return layout, metadata


def read_header(path: str | os.PathLike) -> TrajectoryHeader:
    """Layout, metadata and shape of a trajectory file (the tensor is not read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expert trajectory not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata()
            names = list(f.keys())  # a safe_open handle has keys() but no __contains__
            if "trajectory" not in names:
                raise ValueError(f"{path}: no tensor 'trajectory' (found {names})")
            shape = tuple(f.get_slice("trajectory").get_shape())
    except (OSError, RuntimeError, SafetensorError) as err:  # truncated or foreign files
        raise ValueError(f"{path}: cannot read as safetensors ({err})") from err
    layout, metadata = _decode(path, raw)
    if len(shape) != 2 or shape[1] != layout.num_params:
        raise ValueError(f"{path}: trajectory of shape {shape} does not fit its layout ({layout.num_params} values)")
    return TrajectoryHeader(path, layout, metadata, (int(shape[0]), int(shape[1])))


def load_trajectory(path: str | os.PathLike, device: str | torch.device = "cpu") -> Trajectory:
    """Reads a file written by :func:`save_trajectory`."""
    header = read_header(path)
    with safe_open(str(header.path), framework="pt", device=str(device)) as f:
        params = f.get_tensor("trajectory")
    return Trajectory(params, header.layout, header.metadata, header.path)


def _show(value: Any) -> str:
    """A field value for error messages: sequences as lists (JSON gives lists, data modules tuples)."""
    return repr(list(value)) if isinstance(value, (list, tuple)) else repr(value)


def _set_name(buffer_dir: Path) -> str:
    parts = buffer_dir.parts
    if "dataset_distillation" in parts:
        i = parts.index("dataset_distillation")
        if i + 1 < len(parts) - 1:
            return parts[i + 1]
    return "<set>"


class TrajectoryBuffer:
    """The expert trajectories in a folder (``expert_*.safetensors``, sorted by name).

    Args:
        buffer_dir: the folder ``ExpertTraining`` wrote (its ``buffer_dir``).
        cache: keep loaded trajectories in memory (useful for small nets; CIFAR ConvNet-3 experts are ≈65 MB each).
    """

    def __init__(self, buffer_dir: str | os.PathLike, cache: bool = False) -> None:
        self.buffer_dir = Path(buffer_dir)
        self.files = sorted(self.buffer_dir.glob("expert_*.safetensors")) if self.buffer_dir.is_dir() else []
        if not self.files:
            what = "is empty" if self.buffer_dir.is_dir() else "does not exist"
            raise FileNotFoundError(
                f"TrajectoryBuffer: no expert trajectories (expert_*.safetensors) in {self.buffer_dir} (the folder "
                f"{what}); train experts first: zoo fit --config "
                f"configs/dataset_distillation/{_set_name(self.buffer_dir)}/experts.yaml"
            )
        self.cache = cache
        self._headers: list[TrajectoryHeader] | None = None
        self._loaded: dict[int, Trajectory] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"TrajectoryBuffer({str(self.buffer_dir)!r}, experts={len(self)})"

    @property
    def headers(self) -> list[TrajectoryHeader]:
        if self._headers is None:
            self._headers = [read_header(f) for f in self.files]
        return self._headers

    @property
    def num_epochs(self) -> int:
        """The number of epochs every expert has (the minimum over the files)."""
        return min(h.num_epochs for h in self.headers)

    def load(self, i: int, device: str | torch.device = "cpu", lazy: bool = False) -> Trajectory:
        """Expert ``i``; ``lazy=True`` reads its snapshots from the file only when indexed (:class:`LazyParams`)."""
        if not 0 <= i < len(self):
            raise IndexError(f"TrajectoryBuffer: expert {i} out of range (the buffer holds {len(self)})")
        if lazy:
            header = self.headers[i]
            params = LazyParams(header.path, header.shape, device)
            return Trajectory(params, header.layout, header.metadata, header.path)
        if i in self._loaded:
            return self._loaded[i]
        trajectory = load_trajectory(self.files[i], device=device)
        if self.cache:
            self._loaded[i] = trajectory
        return trajectory

    def sample(self, generator: torch.Generator | None = None) -> Trajectory:
        """A uniformly drawn expert."""
        return self.load(int(torch.randint(len(self), (1,), generator=generator)))

    def check(
        self,
        layout: ParamLayout,
        dataset: str | None = None,
        zca: bool | None = None,
        dsa_strategy: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        """Refuses experts recorded for another network layout, data set or preprocessing (``None``: not checked).

        Preprocessing is ZCA, the DSA strategy and the input normalisation (per-channel ``mean`` and ``std``): MTT
        (arXiv 2203.11932) matches a student to an expert only when both saw the same images, so a mismatch is refused
        with one line naming the file, the field and both values. A file written before experts recorded ``mean``
        and ``std`` cannot be checked and is refused with its own message.
        """
        where = _set_name(self.buffer_dir)
        for header in self.headers:
            diff = header.layout.difference(layout)
            if diff is not None:
                raise ValueError(
                    f"{header.path}: recorded for another network (field 'layout': file vs network: {diff}; the file's "
                    f"network is {header.metadata.get('network', 'unrecorded')}); train experts for this network or "
                    "point buffer_dir at matching ones"
                )
            meta = header.metadata
            if mean is not None or std is not None:
                unrecorded = [k for k, want in (("mean", mean), ("std", std)) if want is not None and k not in meta]
                if unrecorded:
                    raise ValueError(
                        f"{header.path}: was written before expert files recorded the input normalisation (field "
                        f"{unrecorded[0]!r}), so it cannot be checked against this run's mean {_show(mean)} and std "
                        f"{_show(std)}; retrain the experts into a new buffer_dir (zoo fit --config "
                        f"configs/dataset_distillation/{where}/experts.yaml)"
                    )
            checks = (
                ("dataset", dataset, lambda a, b: a == b),
                ("zca", zca, lambda a, b: a == b),
                ("dsa_strategy", dsa_strategy, same_dsa_strategy),
                ("mean", mean, same_normalisation),
                ("std", std, same_normalisation),
            )
            for key, want, same in checks:
                if want is None:
                    continue
                got = meta.get(key)
                if key not in meta or not same(got, want):
                    recorded = f"is {_show(got)}" if key in meta else "is not recorded"
                    raise ValueError(
                        f"{header.path}: field {key!r} {recorded} in the expert file but {_show(want)} in this run; "
                        "experts and distillation must see the same data, DSA strategy and input normalisation (train "
                        "experts with this run's settings, or point buffer_dir at matching ones)"
                    )
        zca_file = self.buffer_dir / ZCA_FILE
        with_zca = [h.path.name for h in self.headers if h.metadata.get("zca")]
        if with_zca and not zca_file.is_file():
            raise ValueError(
                f"{self.buffer_dir}: experts {with_zca[:3]} were trained with ZCA but {ZCA_FILE} is missing"
            )
        if zca_file.is_file() and len(with_zca) < len(self):
            plain = [h.path.name for h in self.headers if not h.metadata.get("zca")]
            raise ValueError(f"{self.buffer_dir}: holds {ZCA_FILE} but experts {plain[:3]} were trained without ZCA")

    def zca(self, device: str | torch.device = "cpu") -> Any:
        """The ``ZCAWhitening`` the experts' images went through, or ``None`` when they were not whitened."""
        path = self.buffer_dir / ZCA_FILE
        if not path.is_file():
            return None
        from zoo.dataset_distillation.augment import ZCAWhitening

        return ZCAWhitening.load(path, device=device)
