"""Publishing a trained student (safetensors weights) or a distilled set, with a model card and a registry entry,
written atomically.

Used by ``zoo checkpoints publish`` (finished runs, distilled-set artifacts) and by ``callbacks.CheckpointPublisher``
(end of fit).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zoo import hub
from zoo.hub import TASK_DISTILLED, download_url_to_file, list_checkpoints, sha256_file
from zoo.io import atomic_write

__all__ = [
    "architecture_from_hparams",
    "describe_source",
    "export_file",
    "export_student",
    "model_card",
    "publish",
    "publish_distilled",
    "check_target",
    "render_markdown",
    "resolve_run",
    "source_config",
    "write_publication",
]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _versions() -> dict[str, str]:
    import lightning
    import timm
    import torch

    import zoo

    return {
        "distill-zoo": zoo.__version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def source_config(spec: Any) -> dict[str, Any] | None:
    """A model source recorded in hparams as ``{class_path, init_args}`` without the unset (None) arguments; None
    when it was recorded as something else (e.g. the string of an object)."""
    if hasattr(spec, "to_config"):
        spec = spec.to_config()
    if not isinstance(spec, dict) or "class_path" not in spec:
        return None
    args = {k: v for k, v in (spec.get("init_args") or {}).items() if v is not None}
    return {"class_path": spec["class_path"], "init_args": args}


def architecture_from_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """The student's source as class_path/init_args, with the data's num_classes/in_chans filled in and without the
    weights it was started from (``checkpoint``: the published file holds the trained weights)."""
    student = source_config(hparams.get("student"))
    if student is None:
        raise ValueError("the run does not record its student as a zoo.models source (class_path/init_args)")
    student["init_args"].pop("checkpoint", None)
    for key in ("num_classes", "in_chans"):
        if hparams.get(key) is not None and key not in student["init_args"]:
            student["init_args"][key] = hparams[key]
    return student


def describe_source(spec: Any) -> str | None:
    """A short name (``cifar:resnet8``) for a source given as an object, a config dict or a list of them."""
    from zoo.models.sources import ModelSource, source_from_config

    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        return "ensemble[" + ", ".join(str(describe_source(s)) for s in spec) + "]"
    try:
        source = source_from_config(spec) if isinstance(spec, dict) else spec
    except (ValueError, TypeError, KeyError):
        return str(spec)
    return source.describe() if isinstance(source, ModelSource) else type(source).__name__


_SPLIT_WORDS = {"val": "validation split, last epoch", "test": "test split"}  # others: the data module's words


def model_card(entry: dict[str, Any], card: dict[str, Any]) -> str:
    """The Markdown model card."""
    distilled = entry["task"] == TASK_DISTILLED
    lines = [f"# {entry['name']}", "", f"- method: {card.get('method', entry['method'])}"]
    for key in ("student", "teacher", "dataset"):
        if card.get(key) or entry.get(key):
            lines.append(f"- {key}: {card.get(key) or entry.get(key)}")
    lines += [
        f"- file: `{entry['file']}` ({entry['file_size']:,} bytes)",
        f"- sha256: `{entry['sha256']}`",
        f"- input: {entry['input_size']}, mean {entry['mean']}, std {entry['std']}",
        f"- reproduce: `{entry['command']}`",
        f"- git commit: {card.get('git_commit')}",
        "",
        "## Metrics",
        "",
        *[f"- {k}: {v}" + (f" ({_SPLIT_WORDS.get(s, s)})" if (s := entry.get("metric_splits", {}).get(k)) else "")
          for k, v in entry["metrics"].items()],
        "",
        "## Library versions",
        "",
        *[f"- {k}: {v}" for k, v in card.get("versions", {}).items()],
        "",
        "## Load",
        "",
        "```python",
    ]
    if distilled:
        lines += [
            "from zoo.dataset_distillation import DistilledDataModule, load_distilled",
            f"artifact = load_distilled('hub:{entry['name']}')  # images, labels, lr, metadata, zca",
            f"data = DistilledDataModule(path='hub:{entry['name']}', real=...)  # the real data module: val/test",
        ]
    else:
        lines += [
            "from safetensors.torch import load_file",
            "from zoo.models.sources import source_from_config",
            f"model = source_from_config({json.dumps(entry['architecture'])}).build()",
            f"model.load_state_dict(load_file('{entry['file']}'))",
        ]
    lines += ["```", ""]
    return "\n".join(lines)


def export_student(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, name: str) -> tuple[Path, str]:
    """Writes the student weights of a Lightning checkpoint (or a weights file) to ``<name>-<sha8>.safetensors``.

    The file is written to a temporary name in ``out_dir`` and renamed into place, so an interruption never
    leaves a half-written checkpoint under its final name. Returns the path and the full sha256.
    """
    import torch
    from safetensors.torch import save as safetensors_bytes

    from zoo.divergence import check_finite_state
    from zoo.models.sources import read_state_dict

    state = {k: v.contiguous() for k, v in read_state_dict(checkpoint).items() if isinstance(v, torch.Tensor)}
    check_finite_state(state, f"publish {checkpoint}")
    data = safetensors_bytes(state, metadata={"name": name, "format": "pt"})
    digest = hashlib.sha256(data).hexdigest()
    final = atomic_write(Path(out_dir) / f"{name}-{digest[:8]}.safetensors", data)
    return final, digest


def export_file(path: str | os.PathLike, out_dir: str | os.PathLike, name: str) -> tuple[Path, str]:
    """Copies a finished file (e.g. a distilled set) to ``out_dir/<name>-<sha8>.safetensors``, verified, through a
    temporary file and a rename (nothing half-written under the final name). Returns the path and the sha256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file to publish")
    digest, size = sha256_file(path), path.stat().st_size
    final = Path(out_dir) / f"{name}-{digest[:8]}.safetensors"
    download_url_to_file(path.resolve().as_uri(), final, digest, size)
    return final, digest


def write_publication(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    entry: dict[str, Any],
    card: dict[str, Any],
    url_bases: Sequence[str] = (),
    export: Callable[[Any, Any, str], tuple[Path, str]] = export_student,
) -> tuple[Path, dict[str, Any]]:
    """Exports the student (``export``: ``export_student``; ``export_file`` copies a finished file such as
    a distilled set) and writes ``<file>.json`` (the card, with the registry entry under ``"entry"``) and
    ``<file>.md`` (the model card).

    ``entry`` holds every registry field but ``sha256``, ``file_size`` and ``file``, which are filled in here;
    each of ``url_bases`` adds ``<base>/<file>`` to the entry's ``urls``.
    Every file is written under a temporary name and renamed, the weights last of the three to become visible
    only after their card exists; a crash leaves no half-written file under a final name. The name must be a plain
    file-name stem (``hub.NAME_PATTERN``: letters, digits, ``.``, ``_``, ``-``; no folders).
    """
    out_dir = check_target(entry["name"], out_dir)
    file, digest = export(checkpoint, out_dir, entry["name"])
    urls = [f"{base.rstrip('/')}/{file.name}" for base in url_bases] + list(entry.get("urls", []))
    entry = {**entry, "sha256": digest, "file_size": file.stat().st_size, "file": file.name, "urls": urls}
    card = {**card, "versions": _versions(), "git_commit": _git_commit(), "entry": entry}
    try:
        atomic_write(file.with_suffix(".json"), json.dumps(card, indent=2, default=str) + "\n")
        atomic_write(file.with_suffix(".md"), model_card(entry, card))
    except BaseException:
        for path in (file, file.with_suffix(".json"), file.with_suffix(".md")):
            path.unlink(missing_ok=True)
        raise
    return file, entry


def resolve_run(path: str | os.PathLike) -> tuple[Path, Path]:
    """(checkpoint file, run folder) from either one: a run folder gives its best (else last) checkpoint."""
    path = Path(path)
    if path.is_dir():
        ckpts = sorted((path / "checkpoints").glob("*.ckpt"))
        if not ckpts:
            raise FileNotFoundError(f"{path}: no checkpoints/*.ckpt in this run folder")
        best = [c for c in ckpts if c.name != "last.ckpt"]
        return (best or ckpts)[-1], path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or run folder")
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path, run


def _last_val_metrics(run: Path) -> dict[str, float]:
    metrics_file = run / "metrics.csv"
    if not metrics_file.is_file():
        return {}
    last: dict[str, float] = {}
    with open(metrics_file) as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k.startswith("val/") and v not in ("", None):
                    last[k] = round(float(v), 4)
    return last


def _data_facts(config: dict[str, Any]) -> dict[str, Any]:
    """Normalisation and input size of the run's data module (built from its config; no data is read)."""
    data = config.get("data") or {}
    if "class_path" not in data:
        return {}
    from zoo.models.sources import source_from_config

    dm = source_from_config(data)
    size = getattr(dm, "image_size", None)
    return {"mean": list(dm.mean), "std": list(dm.std), "input_size": [dm.in_chans, size, size], "dataset": dm.name,
            "test_split": getattr(dm, "test_split", "test")}


def _task_of(class_path: str) -> str:
    """The task a method's checkpoints are listed under (its family's ``task``; classification when unknown)."""
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError, ValueError):
        return "classification"
    return str(getattr(cls, "task", "classification"))


def check_target(name: str, out_dir: str | os.PathLike) -> Path:
    """Refuses, before anything is evaluated or written, a name that is not a plain file stem
    (``hub.NAME_PATTERN``) or an output folder that cannot be created or written. Returns the folder."""
    if not re.fullmatch(hub.NAME_PATTERN, str(name)):
        raise ValueError(
            f"publish: name {name!r} must be a plain name (letters, digits, '.', '_', '-', starting with a "
            "letter or digit); it becomes the file name"
        )
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"publish: cannot create the output folder {out}: {err.strerror or err}") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"publish: the output folder {out} is not writable")
    return out


def publish(
    path: str | Path,
    name: str,
    out_dir: str | Path,
    dataset: str | None = None,
    config_path: str | None = None,
    test_metrics: dict[str, float] | None = None,
    fit_command: str | None = None,
) -> dict[str, Any]:
    """Exports the student of a finished run; returns its registry entry (the card is ``<file>.json``/``.md``).

    ``config_path`` names the project config that produced the run (default: the run's saved ``config.yaml``);
    ``fit_command`` is the exact training command when it had overrides (default ``zoo fit --config <config>``).
    ``test_metrics`` (``test/...`` values, e.g. from ``zoo test`` on the run's config and checkpoint, which the
    ``zoo checkpoints publish`` command runs) are recorded next to the last validation metrics.
    """
    check_target(name, out_dir)
    ckpt, run = resolve_run(path)
    import torch

    hparams = torch.load(ckpt, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    config_file = run / "config.yaml"
    config: dict[str, Any] = {}
    if config_file.is_file():
        import yaml

        config = yaml.safe_load(config_file.read_text()) or {}
    facts = _data_facts(config)
    config_path = config_path or str(config_file)
    metrics = _last_val_metrics(run)
    test_split = facts.get("test_split", "test")
    if test_split != "val":
        metrics.update(test_metrics or {})
    # a data module whose test loader reads the validation split has no test metric: the card never calls it test
    entry = {
        "name": name,
        "task": _task_of(str(config.get("model", {}).get("class_path", ""))),
        "method": str(config.get("model", {}).get("class_path", "")).rsplit(".", 1)[-1],
        "architecture": architecture_from_hparams(hparams),
        "dataset": dataset or facts.get("dataset", ""),
        "metrics": {
            k.replace("/", "_"): v for k, v in metrics.items() if k in ("test/acc", "test/acc5", "val/acc", "val/acc5")
        },
        "input_size": facts.get("input_size"),
        "mean": facts.get("mean"),
        "std": facts.get("std"),
        "urls": [],
        "license": "Apache-2.0",
        "config": config_path,
        "command": f"{fit_command or f'zoo fit --config {config_path}'} && zoo checkpoints publish {run} --name {name} "
        f"--dir {out_dir} --config {config_path}",
    }
    entry["metric_splits"] = {k: (test_split if k.startswith("test_") else "val") for k in entry["metrics"]}
    card = {
        "method": entry["method"],
        "student": describe_source(hparams.get("student")),
        "teacher": describe_source(hparams.get("teacher")),
        "dataset": entry["dataset"],
        "config": config,
    }
    _, entry = write_publication(ckpt, out_dir, entry, card)
    return entry


def publish_distilled(
    path: str | Path,
    name: str,
    out_dir: str | Path,
    dataset: str | None = None,
    config_path: str | None = None,
    fit_command: str | None = None,
    url_bases: Sequence[str] = (),
    license: str = "Apache-2.0",
    publish_command: bool = True,
) -> dict[str, Any]:
    """Publishes a distilled-set artifact (``distilled.safetensors`` of a trajectory-matching run) as it is, under
    ``<name>-<sha8>.safetensors`` with its card; returns the registry entry (task ``dataset-distillation``).

    The entry's ``architecture`` is the network the set was distilled for, ``input_size``/``mean``/``std`` those of
    the set and its real data, and ``metrics`` the run's own final evaluation (``eval_acc_mean``/``eval_acc_std``
    over its evaluation networks, and the learned lr ``syn_lr``); ``ipc``, ``iteration`` and ``eval_nets`` are
    recorded next to them. ``config_path`` names the distillation config (default: the run's ``config.yaml``
    beside the artifact, when there is one; else none is recorded); ``fit_command`` the commands that made it
    (default ``zoo fit --config <config>``), to which ``publish_command`` appends the ``zoo checkpoints publish``
    command that publishes it this way (``CheckpointPublisher`` records the fit alone, as for students);
    ``url_bases`` and ``license`` as in :func:`write_publication` and the registry.
    """
    from zoo.dataset_distillation.distilled import load_distilled

    path = Path(path)
    artifact = load_distilled(path)  # fails early, naming the file, on anything that is not a distilled set
    meta = artifact["metadata"]
    evaluation = meta.get("evaluation") or {}
    if "eval/acc_mean" not in evaluation:
        raise ValueError(
            f"{path}: the distilled set carries no final evaluation (metadata.evaluation); publish the "
            "artifact a finished run wrote"
        )
    network = (meta.get("hparams") or {}).get("network")
    # a set distilled for a network given as an object keeps only its description
    architecture = source_config(network) or {"class_path": None, "description": str(meta.get("network") or network)}
    beside = path.parent / "config.yaml"
    config_path = config_path or (str(beside) if beside.is_file() else None)
    command = fit_command or (f"zoo fit --config {config_path}" if config_path else None)
    if publish_command:
        config_flag = f" --config {config_path}" if config_path else ""
        command = f"{command} && " if command else ""
        command += f"zoo checkpoints publish {path} --name {name} --dir {out_dir}{config_flag}"
    entry = {
        "name": name,
        "task": TASK_DISTILLED,
        "method": str(meta.get("method", "")),
        "architecture": architecture,
        "dataset": dataset or meta.get("dataset") or "",
        "metrics": {
            "eval_acc_mean": round(float(evaluation["eval/acc_mean"]), 4),
            "eval_acc_std": round(float(evaluation["eval/acc_std"]), 4),
            "syn_lr": round(float(artifact["lr"]), 6),
        },
        "ipc": meta.get("ipc"),
        "iteration": meta.get("iteration"),
        "eval_nets": len(evaluation.get("accuracies") or []),
        "input_size": list(artifact["images"].shape[1:]),
        "mean": meta.get("mean"),
        "std": meta.get("std"),
        "urls": [],
        "license": license,
        "config": config_path,
        "command": command,
    }
    card = {"method": entry["method"], "dataset": entry["dataset"], "hparams": meta.get("hparams")}
    _, entry = write_publication(path, out_dir, entry, card, url_bases=url_bases, export=export_file)
    return entry


def render_markdown(entries: list[dict[str, Any]] | None = None) -> str:
    """The text of ``checkpoints.md``, generated from the registry."""
    entries = entries if entries is not None else list_checkpoints()
    lines = [
        "# Published checkpoints",
        "",
        "Generated from `zoo/checkpoints/registry.json` by `zoo checkpoints markdown > checkpoints.md`; "
        "a test fails when this file and the registry disagree. Load one with `zoo.hub.load(name)` or use it in a "
        "config as `{class_path: zoo.hub.Pretrained, init_args: {name: ...}}`. Entries of task "
        f"`{TASK_DISTILLED}` are distilled sets, not weights: train on one with "
        "`{class_path: zoo.dataset_distillation.DistilledDataModule, init_args: {path: hub:<name>, real: ...}}`; "
        "their architecture is the network the set was distilled for.",
        "",
        "| name | task | method | architecture | data | metrics | file | size | sha256 | license |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        arch = e["architecture"]
        arch_name = arch.get("init_args", {}).get("name") or str(arch.get("class_path") or arch.get("description"))
        arch_name = arch_name.rsplit(".", 1)[-1]
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
        ]
        if e.get("metric_splits"):
            splits = ", ".join(f"{k}: {_SPLIT_WORDS.get(s, s)}" for k, s in e["metric_splits"].items())
            lines.append(f"- metrics from: {splits}")
        if e["task"] == TASK_DISTILLED:
            lines.append(
                f"- distilled set: {e['ipc']} image(s) per class at iteration {e['iteration']}; eval_acc_mean/std: "
                f"test accuracy of {e['eval_nets']} fresh networks trained on it (the run's final evaluation); "
                "syn_lr: the learned lr they train at"
            )
        lines += [""]
    return "\n".join(lines)
