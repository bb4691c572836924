"""Classification on digits: the no-KD baseline vs KD vs DKD students, over seeds, from the shipped configs.

Each method trains from its own config (``configs/classification/digits/<method>.yaml``: a CIFAR resnet8 student;
KD and DKD distil the shipped resnet32 teacher) with ``seed_everything`` set to each seed; the data split stays
fixed (``split_seed: 0``), so seeds vary initialisation and batch order. After fit (the final epoch, no selection)
the student is evaluated on the held-out test split. Writes a Markdown table (mean ± std top-1, paired difference
vs the baseline, wall time per run) and the raw per-seed numbers to ``benchmarks/results/``.

Run from the repository root:
    python benchmarks/classification_digits.py            # 5 seeds, baseline/kd/dkd
    python benchmarks/classification_digits.py --seeds 2 --methods baseline kd
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "configs" / "classification" / "digits"


def run(method: str, seed: int, workdir: Path, extra: list[str]) -> dict[str, float]:
    from zoo.cli import ZooCLI

    cli = ZooCLI(
        args=[
            "--config", str(CONFIGS / f"{method}.yaml"), f"--seed_everything={seed}",
            f"--trainer.default_root_dir={workdir}", "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--summary.enabled=false", *extra,
        ],
        run=False,
    )
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics = cli.trainer.callback_metrics
    out = {"test_acc": float(metrics["test/acc"]), "seconds": seconds, "epochs": cli.trainer.current_epoch}
    if "test/agreement" in metrics:
        out["test_agreement"] = float(metrics["test/agreement"])
    return out


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def table(results: dict[str, list[dict[str, float]]], seeds: list[int]) -> str:
    base = results.get("baseline")
    lines = [
        "| method | student top-1 (%) | paired Δ vs baseline (points) | agreement with teacher (%) | s / run |",
        "|---|---|---|---|---|",
    ]
    for method, runs in results.items():
        accs = [r["test_acc"] for r in runs]
        delta = "—"
        if base is not None and method != "baseline":
            diffs = [a - b["test_acc"] for a, b in zip(accs, base)]
            delta = ("+" if statistics.mean(diffs) >= 0 else "") + mean_std(diffs)
        agree = [r["test_agreement"] for r in runs if "test_agreement" in r]
        lines.append(
            f"| {method} | {mean_std(accs)} | {delta} | {mean_std(agree) if agree else '—'} | "
            f"{statistics.mean(r['seconds'] for r in runs):.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["baseline", "kd", "dkd"])
    parser.add_argument("--out", default=str(RESULTS / "classification_digits"))
    parser.add_argument("extra", nargs="*", help="extra CLI overrides, e.g. --trainer.max_epochs=5 (after --)")
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds))
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            results[method] = []
            for seed in seeds:
                r = run(method, seed, Path(tmp) / f"{method}-{seed}", args.extra)
                results[method].append(r)
                print(f"{method} seed {seed}: test top-1 {100 * r['test_acc']:.2f}% in {r['seconds']:.1f} s", flush=True)
    command = "python benchmarks/classification_digits.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"Digits (scikit-learn, 16×16, split_seed 0: 1077 train / 360 val / 360 test), CIFAR resnet8 student, "
        f"shipped resnet32 teacher; {len(seeds)} seeds ({seeds[0]}–{seeds[-1]}), final epoch, test split. "
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
        f"Command: `{command.strip()}`"
    )
    text = header + "\n\n" + table(results, seeds) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"seeds": seeds, "results": results}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
