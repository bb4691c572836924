"""``zoo checkpoints list|publish|verify|markdown``: the command-line side of ``zoo.hub``."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import torch

from zoo import hub

__all__ = ["main", "publish"]


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
) -> dict[str, Any]:
    """Exports the student of a finished run and returns its registry entry (also written as ``<file>.json``).

    ``config_path`` names the project config that produced the run (default: the run's saved ``config.yaml``).
    With ``test``, the checkpoint is evaluated on the data module's test split and ``test_acc`` is recorded next
    to the last validation metrics.
    """
    ckpt, run = _run_dir(Path(path))
    hparams = torch.load(ckpt, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    student = hparams.get("student")
    if not isinstance(student, dict) or "class_path" not in student:
        raise ValueError(f"{ckpt}: the checkpoint does not record its student as class_path/init_args")
    arch = {"class_path": student["class_path"], "init_args": dict(student.get("init_args", {}))}
    for key in ("num_classes", "in_chans"):
        if hparams.get(key) is not None and arch["init_args"].get(key) is None:
            arch["init_args"][key] = hparams[key]
    arch["init_args"] = {k: v for k, v in arch["init_args"].items() if v is not None}
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
    file, digest = hub.export_student(ckpt, out_dir, name)
    entry = {
        "name": name,
        "task": "classification",
        "method": str(hparams.get("_class_path", config.get("model", {}).get("class_path", ""))).rsplit(".", 1)[-1],
        "architecture": arch,
        "dataset": dataset or facts.get("dataset", ""),
        "metrics": {
            k.replace("/", "_"): v for k, v in metrics.items() if k in ("test/acc", "test/acc5", "val/acc", "val/acc5")
        },
        "input_size": facts.get("input_size"),
        "mean": facts.get("mean"),
        "std": facts.get("std"),
        "sha256": digest,
        "file_size": file.stat().st_size,
        "file": file.name,
        "urls": [],
        "license": "Apache-2.0",
        "config": config_path,
        "command": f"zoo fit --config {config_path} && zoo checkpoints publish {run} --name {name} --dir {out_dir} --config {config_path}",
    }
    file.with_suffix(".json").write_text(json.dumps(entry, indent=2) + "\n")
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zoo checkpoints", description="Published checkpoints of distill-zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list registry entries")
    p_list.add_argument("pattern", nargs="?", default="*")
    p_pub = sub.add_parser("publish", help="export the student of a run as <name>-<sha8>.safetensors")
    p_pub.add_argument("path", help="a run folder or a .ckpt file")
    p_pub.add_argument("--name", required=True)
    p_pub.add_argument("--dir", default=".", help="output folder")
    p_pub.add_argument("--dataset", default=None)
    p_pub.add_argument("--config", default=None, help="the project config that produced the run")
    p_pub.add_argument("--no-test", action="store_true", help="skip the evaluation on the test split")
    p_ver = sub.add_parser("verify", help="check a file against the registry (by the hash prefix in its name)")
    p_ver.add_argument("file")
    sub.add_parser("markdown", help="print checkpoints.md generated from the registry")
    args = parser.parse_args(argv)

    if args.command == "list":
        for e in hub.list_checkpoints(args.pattern):
            metrics = ", ".join(f"{k}={v}" for k, v in e["metrics"].items())
            print(f"{e['name']}\t{e['method']}\t{e['dataset']}\t{metrics}\t{e['file']}")
    elif args.command == "publish":
        entry = publish(args.path, args.name, args.dir, args.dataset, args.config, test=not args.no_test)
        print(json.dumps(entry, indent=2))
    elif args.command == "verify":
        path = Path(args.file)
        actual = hub.sha256_file(path)
        match = [e for e in hub.registry() if e["sha256"] == actual]
        if not match:
            print(f"{path}: sha256 {actual} matches no registry entry")
            return 1
        print(f"{path}: OK, {match[0]['name']} (sha256 {actual})")
    elif args.command == "markdown":
        print(hub.render_markdown(), end="")
    return 0
