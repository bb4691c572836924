"""``zoo check-data --config C``: read every example of a config's data once and report what would break a run.

Builds only the data module of the config (no model, no teacher), reads each split item by item and reports, per
split, the examples whose file cannot be read and the labels outside ``[0, num_classes)`` (segmentation: outside
``[0, num_classes)`` and not ``ignore_index``), with the file or index of the first few. Exits 1 when anything is
wrong, 0 otherwise.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

__all__ = ["check_dataset", "main"]


def _path_of(dataset: Any, index: int) -> str:
    for attr in ("samples", "imgs", "files", "images"):
        items = getattr(dataset, attr, None)
        if isinstance(items, (list, tuple)) and index < len(items):
            item = items[index]
            return str(item[0] if isinstance(item, (list, tuple)) else item)
    return f"index {index}"


def check_dataset(dataset: Any, num_classes: int, ignore_index: int | None = None, limit: int | None = None) -> dict:
    """Counts unreadable examples and out-of-range labels of ``dataset``; returns a report with the first few."""
    unreadable: list[str] = []
    bad_labels: list[str] = []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(n):
        try:
            item = dataset[i]
        except Exception as err:  # noqa: BLE001 - a decoding error of any kind is what this reports
            unreadable.append(f"{_path_of(dataset, i)} ({type(err).__name__}: {err})")
            continue
        label = item["label"] if isinstance(item, dict) else item[1]
        y = torch.as_tensor(label)
        valid = (y >= 0) & (y < num_classes)
        if ignore_index is not None:
            valid |= y == ignore_index
        if not bool(valid.all()):
            bad = sorted({int(v) for v in y[~valid].flatten()[:5]})
            bad_labels.append(f"{_path_of(dataset, i)} (label values {bad})")
    return {"checked": n, "unreadable": unreadable, "bad_labels": bad_labels}


def main(argv: list[str], parser_mode: str = "omegaconf") -> None:
    """``zoo check-data`` (``parser_mode``: the ``zoo`` command's, so configs interpolate as they do for ``fit``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from zoo.data.base import ZooDataModule

    parser = ArgumentParser(prog="zoo check-data", exit_on_error=False, parser_mode=parser_mode)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(ZooDataModule, "data", required=True)
    for section in ("trainer", "model", "summary", "optimizer", "lr_scheduler"):
        parser.add_argument(f"--{section}", type=dict | None, default=None)
    parser.add_argument("--seed_everything", type=bool | int, default=0)
    parser.add_argument("--run_name", type=str | None, default=None)
    parser.add_argument("--ckpt_path", type=str | None, default=None)
    parser.add_argument("--limit", type=int | None, default=None, help="check at most this many examples per split")
    cfg = parser.parse_args(argv)
    dm = parser.instantiate_classes(cfg).data
    dm.prepare_data()
    dm.setup("fit")
    ignore = getattr(dm, "ignore_index", None)
    failed = False
    for split in ("train", "val", "test"):
        if split == "test":
            dm.setup("test")
        dataset = getattr(dm, f"{split}_set", None)
        if dataset is None:
            continue
        report = check_dataset(dataset, dm.num_classes, ignore, cfg.limit)
        problems = len(report["unreadable"]) + len(report["bad_labels"])
        failed |= problems > 0
        print(f"{split}: {report['checked']} examples, {len(report['unreadable'])} unreadable, "
              f"{len(report['bad_labels'])} with labels outside [0, {dm.num_classes})"
              + (f" other than ignore_index {ignore}" if ignore is not None else ""))
        for line in (report["unreadable"] + report["bad_labels"])[:5]:
            print(f"  {line}")
    if failed:
        print("zoo check-data: problems found (see above)", file=sys.stderr)
        raise SystemExit(1)
