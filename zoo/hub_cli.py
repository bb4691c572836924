"""``zoo checkpoints list|publish|verify|download|markdown``: the command-line side of ``zoo.hub``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from zoo import hub
from zoo.publish import check_target, publish, publish_distilled, render_markdown, resolve_run

__all__ = ["main"]

#: Evaluates a run on its test split: (config file, checkpoint) -> {"test/...": value}. The ``zoo`` command passes
#: one built on its LightningCLI; this module does not import the CLI.
TestMetrics = Callable[[Path, Path], dict[str, float]]


def main(argv: list[str] | None = None, test_metrics: TestMetrics | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zoo checkpoints", description="Published checkpoints of distill-zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list registry entries")
    p_list.add_argument("pattern", nargs="?", default="*")
    p_pub = sub.add_parser(
        "publish", help="export the student of a run, or a distilled set, as <name>-<sha8>.safetensors"
    )
    p_pub.add_argument("path", help="a run folder, a .ckpt file, or a distilled set (distilled.safetensors)")
    p_pub.add_argument("--name", required=True)
    p_pub.add_argument("--dir", default=".", help="output folder")
    p_pub.add_argument("--dataset", default=None)
    p_pub.add_argument("--config", default=None, help="the project config that produced the run")
    p_pub.add_argument("--no-test", action="store_true", help="skip the evaluation on the test split")
    p_pub.add_argument(
        "--command", dest="fit_command", default=None, help="the exact training command, when it had overrides"
    )
    p_ver = sub.add_parser("verify", help="check a file against the registry (by the hash prefix in its name)")
    p_ver.add_argument("file")
    p_dl = sub.add_parser("download", help="fetch a checkpoint (verified, cached under $ZOO_HOME); prints its path")
    p_dl.add_argument("name", help="a registry name (see `zoo checkpoints list`)")
    p_dl.add_argument("--dir", default=None, help="also copy it to this folder (default: the cache only)")
    sub.add_parser("markdown", help="print checkpoints.md generated from the registry")
    args = parser.parse_args(argv)

    if args.command == "list":
        rows = [("name", "task", "method", "data", "metrics", "file")]
        for e in hub.list_checkpoints(args.pattern):
            metrics = ", ".join(f"{k}={v}" for k, v in e["metrics"].items())
            rows.append((e["name"], e["task"], e["method"], e["dataset"], metrics, e["file"]))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    elif args.command == "publish" and Path(args.path).suffix == ".safetensors":
        try:
            entry = publish_distilled(args.path, args.name, args.dir, args.dataset, args.config, args.fit_command)
        except (FileNotFoundError, ValueError) as err:
            print(f"zoo checkpoints publish: {err}", file=sys.stderr)
            return 1
        print(json.dumps(entry, indent=2))
    elif args.command == "publish":
        try:
            check_target(args.name, args.dir)  # before the evaluation, which can take minutes
            ckpt, run = resolve_run(args.path)
            config_file = run / "config.yaml"
            evaluate = test_metrics is not None and not args.no_test and config_file.is_file()
            metrics = test_metrics(config_file, ckpt) if evaluate else None
            entry = publish(
                args.path,
                args.name,
                args.dir,
                args.dataset,
                args.config,
                test_metrics=metrics,
                fit_command=args.fit_command,
            )
        except (FileNotFoundError, ValueError) as err:
            print(f"zoo checkpoints publish: {err}", file=sys.stderr)
            return 1
        print(json.dumps(entry, indent=2))
    elif args.command == "verify":
        path = Path(args.file)
        if not path.is_file():
            print(f"zoo checkpoints verify: {path}: no such file" + (" (a folder)" if path.is_dir() else ""),
                  file=sys.stderr)
            return 1
        actual = hub.sha256_file(path)
        # <name>-<hash8>.safetensors names its entry: a known name with another hash is a corrupt or stale file.
        named = re.fullmatch(r"(?P<name>.+)-[0-9a-f]{8}\.safetensors", path.name)
        entry = next((e for e in hub.registry() if named and e["name"] == named["name"]), None)
        if entry is not None and entry["sha256"] != actual:
            print(f"zoo checkpoints verify: {path}: sha256 {actual} is not the registry's {entry['sha256']} "
                  f"(entry {entry['name']}; the file is corrupt or stale)", file=sys.stderr)
            return 1
        match = [entry] if entry is not None else [e for e in hub.registry() if e["sha256"] == actual]
        if not match:
            print(f"zoo checkpoints verify: {path}: sha256 {actual} matches no registry entry", file=sys.stderr)
            return 1
        print(f"{path}: OK, {match[0]['name']} (sha256 {actual})")
    elif args.command == "download":
        try:
            print(hub.download(args.name, dir=args.dir))
        except (KeyError, FileNotFoundError, hub.ChecksumError, hub.DownloadError) as err:
            print(f"zoo checkpoints download: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
            return 1
    elif args.command == "markdown":
        print(render_markdown(), end="")
    return 0
