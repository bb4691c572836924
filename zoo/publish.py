"""Publishing a trained student (safetensors weights) or a distilled set, with a model card and a registry entry,
written atomically.

Used by ``zoo checkpoints publish`` (finished runs, distilled-set artifacts) and by ``callbacks.CheckpointPublisher``
(end of fit).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from zoo import hub

__all__ = [
    "architecture_from_hparams",
    "describe_source",
    "model_card",
    "publish",
    "publish_distilled",
    "write_atomic",
    "write_publication",
]


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path`` and renames it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _versions() -> dict[str, str]:
    import lightning
    import timm

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
    """The student's source as class_path/init_args, with the data's num_classes/in_chans filled in."""
    student = source_config(hparams.get("student"))
    if student is None:
        raise ValueError("the run does not record its student as a zoo.models source (class_path/init_args)")
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


def model_card(entry: dict[str, Any], card: dict[str, Any]) -> str:
    """The Markdown model card."""
    distilled = entry["task"] == hub.TASK_DISTILLED
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
        *[f"- {k}: {v}" for k, v in entry["metrics"].items()],
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


def write_publication(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    entry: dict[str, Any],
    card: dict[str, Any],
    url_bases: Sequence[str] = (),
    export: Callable[[Any, Any, str], tuple[Path, str]] = hub.export_student,
) -> tuple[Path, dict[str, Any]]:
    """Exports the student (``export``: ``hub.export_student``; ``hub.export_file`` copies a finished file such as
    a distilled set) and writes ``<file>.json`` (the card, with the registry entry under ``"entry"``) and
    ``<file>.md`` (the model card).

    ``entry`` holds every registry field but ``sha256``, ``file_size`` and ``file``, which are filled in here;
    each of ``url_bases`` adds ``<base>/<file>`` to the entry's ``urls``.
    Every file is written under a temporary name and renamed, the weights last of the three to become visible
    only after their card exists; a crash leaves no half-written file under a final name. The name must be a plain
    file-name stem (``hub.NAME_PATTERN``: letters, digits, ``.``, ``_``, ``-``; no folders).
    """
    if not re.fullmatch(hub.NAME_PATTERN, str(entry["name"])):
        raise ValueError(
            f"publish: name {entry['name']!r} must be a plain name (letters, digits, '.', '_', '-', starting with a "
            "letter or digit); it becomes the file name"
        )
    out_dir = Path(out_dir)
    file, digest = export(checkpoint, out_dir, entry["name"])
    urls = [f"{base.rstrip('/')}/{file.name}" for base in url_bases] + list(entry.get("urls", []))
    entry = {**entry, "sha256": digest, "file_size": file.stat().st_size, "file": file.name, "urls": urls}
    card = {**card, "versions": _versions(), "git_commit": _git_commit(), "entry": entry}
    try:
        write_atomic(file.with_suffix(".json"), json.dumps(card, indent=2, default=str) + "\n")
        write_atomic(file.with_suffix(".md"), model_card(entry, card))
    except BaseException:
        for path in (file, file.with_suffix(".json"), file.with_suffix(".md")):
            path.unlink(missing_ok=True)
        raise
    return file, entry


def _run_dir(path: Path) -> tuple[Path, Path]:
    """(checkpoint file, run folder) from either one."""
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
    return {"mean": list(dm.mean), "std": list(dm.std), "input_size": [dm.in_chans, size, size], "dataset": dm.name}


def _test_metrics(config_file: Path, ckpt: Path) -> dict[str, float]:
    """Runs ``zoo test`` on the run's own config and checkpoint; returns the test split's metrics."""
    from zoo.cli import ZooCLI

    cli = ZooCLI(
        args=["test", "--config", str(config_file), "--ckpt_path", str(ckpt), "--trainer.logger=false",
              "--trainer.enable_progress_bar=false", "--verbose=false"],
        save_config_callback=None,
    )
    return {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}


def publish(
    path: str | Path,
    name: str,
    out_dir: str | Path,
    dataset: str | None = None,
    config_path: str | None = None,
    test: bool = True,
    fit_command: str | None = None,
) -> dict[str, Any]:
    """Exports the student of a finished run; returns its registry entry (the card is ``<file>.json``/``.md``).

    ``config_path`` names the project config that produced the run (default: the run's saved ``config.yaml``);
    ``fit_command`` is the exact training command when it had overrides (default ``zoo fit --config <config>``).
    With ``test``, the checkpoint is evaluated on the data module's test split and ``test_acc`` is recorded next
    to the last validation metrics.
    """
    ckpt, run = _run_dir(Path(path))
    hparams = torch.load(ckpt, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    config_file = run / "config.yaml"
    config: dict[str, Any] = {}
    if config_file.is_file():
        import yaml

        config = yaml.safe_load(config_file.read_text()) or {}
    facts = _data_facts(config)
    config_path = config_path or str(config_file)
    metrics = _last_val_metrics(run)
    if test and config_file.is_file():
        metrics.update(_test_metrics(config_file, ckpt))
    entry = {
        "name": name,
        "task": "classification",
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
        raise ValueError(f"{path}: the distilled set carries no final evaluation (metadata.evaluation); publish the "
                         "artifact a finished run wrote")
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
        "task": hub.TASK_DISTILLED,
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
    _, entry = write_publication(path, out_dir, entry, card, url_bases=url_bases, export=hub.export_file)
    return entry
