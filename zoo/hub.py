"""Published checkpoints: a registry kept as data, hash-checked loading, and the ``Pretrained`` model source.

The registry is ``zoo/checkpoints/registry.json``: one entry per checkpoint with its name, task, method, the model
source that builds its architecture, data set, metrics, input size, normalisation, sha256, file size, URLs,
license, the config and the command that produced it. ``checkpoints.md`` is generated from it
(``zoo checkpoints markdown``). Files named ``<name>-<sha256[:8]>.safetensors`` hold the student weights only.

Example:
    >>> from zoo import hub
    >>> [e["name"] for e in hub.list_checkpoints("digits-*")]
    ['digits-resnet32-teacher']
    >>> model, meta = hub.load("digits-resnet32-teacher")
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.models.sources import ModelSource, load_weights, read_state_dict, source_from_config

__all__ = [
    "Pretrained",
    "export_student",
    "get_entry",
    "list_checkpoints",
    "load",
    "registry",
    "render_markdown",
    "resolve",
    "sha256_file",
]

PACKAGE_DIR = Path(__file__).parent / "checkpoints"
REGISTRY_FILE = PACKAGE_DIR / "registry.json"
REQUIRED_FIELDS = (
    "name",
    "task",
    "method",
    "architecture",
    "dataset",
    "metrics",
    "input_size",
    "mean",
    "std",
    "sha256",
    "file_size",
    "file",
    "urls",
    "license",
    "config",
    "command",
)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def registry(path: str | os.PathLike = REGISTRY_FILE) -> list[dict[str, Any]]:
    """All registry entries, validated (a malformed entry fails naming the entry and the field)."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint registry {path} is not valid JSON: {err}") from err
    if not isinstance(entries, list):
        raise ValueError(f"checkpoint registry {path} must hold a JSON list of entries")
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        missing = [k for k in REQUIRED_FIELDS if k not in entry]
        if missing:
            raise ValueError(f"checkpoint registry {path}: entry {i} ({entry.get('name')!r}) lacks {missing}")
        if entry["name"] in seen:
            raise ValueError(f"checkpoint registry {path}: duplicate name {entry['name']!r}")
        seen.add(entry["name"])
        if not str(entry["file"]).endswith(f"-{entry['sha256'][:8]}.safetensors"):
            raise ValueError(f"checkpoint registry {path}: {entry['name']}.file must end in -<sha256[:8]>.safetensors")
    return entries


def list_checkpoints(pattern: str = "*") -> list[dict[str, Any]]:
    """Registry entries whose name matches a shell-style pattern (``*resnet*``), sorted by name."""
    return sorted((e for e in registry() if fnmatch.fnmatch(e["name"], pattern)), key=lambda e: e["name"])


def get_entry(name: str) -> dict[str, Any]:
    for entry in registry():
        if entry["name"] == name:
            return entry
    known = ", ".join(e["name"] for e in registry())
    raise KeyError(f"no published checkpoint named {name!r}; known: {known}")


def resolve(name: str) -> Path:
    """The local, hash-verified weights file of a registry entry (shipped inside the package)."""
    entry = get_entry(name)
    path = PACKAGE_DIR / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {name!r}: {path} is missing from this installation")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise ValueError(f"checkpoint {name!r}: {path} has sha256 {actual}, expected {entry['sha256']}")
    return path


def load(name: str) -> tuple[nn.Module, dict[str, Any]]:
    """A ready model (eval mode) with its registry entry (mean, std, input size, metrics ...)."""
    entry = get_entry(name)
    model = source_from_config(entry["architecture"]).build()
    load_weights(model, resolve(name), field=f"checkpoint {name!r}")
    return model.eval(), entry


class Pretrained(ModelSource):
    """A published checkpoint of the registry, usable wherever a model source is expected::

        teacher: {class_path: zoo.hub.Pretrained, init_args: {name: digits-resnet32-teacher}}

    The architecture comes from the entry, the weights are verified against its sha256, and the normalisation the
    weights expect (``mean``/``std``) is taken from the entry so a teacher re-normalises its input when needed.

    Args:
        name: the registry name (see ``zoo checkpoints list``).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        entry = get_entry(name)
        self.mean, self.std = tuple(entry["mean"]), tuple(entry["std"])

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


def export_student(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, name: str) -> tuple[Path, str]:
    """Writes the student weights of a Lightning checkpoint (or a weights file) to ``<name>-<sha8>.safetensors``.

    The file is written to a temporary name in ``out_dir`` and renamed into place, so an interruption never
    leaves a half-written checkpoint under its final name. Returns the path and the full sha256.
    """
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in read_state_dict(checkpoint).items() if isinstance(v, torch.Tensor)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"name": name, "format": "pt"})
        digest = sha256_file(tmp)
        final = out_dir / f"{name}-{digest[:8]}.safetensors"
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final, digest


def render_markdown(entries: list[dict[str, Any]] | None = None) -> str:
    """The text of ``checkpoints.md``, generated from the registry."""
    entries = entries if entries is not None else list_checkpoints()
    lines = [
        "# Published checkpoints",
        "",
        "Generated from `zoo/checkpoints/registry.json` by `zoo checkpoints markdown > checkpoints.md`; "
        "a test fails when this file and the registry disagree. Load one with `zoo.hub.load(name)` or use it in a "
        "config as `{class_path: zoo.hub.Pretrained, init_args: {name: ...}}`.",
        "",
        "| name | task | method | architecture | data | metrics | file | size | sha256 | license |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        arch = e["architecture"]
        arch_name = arch.get("init_args", {}).get("name", arch["class_path"])
        metrics = ", ".join(f"{k} {v}" for k, v in e["metrics"].items())
        lines.append(
            f"| {e['name']} | {e['task']} | {e['method']} | {arch_name} | {e['dataset']} | {metrics} | "
            f"`{e['file']}` | {e['file_size']:,} B | `{e['sha256']}` | {e['license']} |"
        )
    lines += ["", "## How each was made", ""]
    for e in entries:
        lines += [
            f"### {e['name']}",
            "",
            f"- config: `{e['config']}`",
            f"- command: `{e['command']}`",
            f"- input: {e['input_size']}, mean {e['mean']}, std {e['std']}",
            "",
        ]
    return "\n".join(lines)
