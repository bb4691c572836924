"""Segmentation on digit scenes: supervised baseline vs pixel KD vs CWD vs LAD vs MGD, over seeds, from the configs.

Teachers are trained once (seed 0) from their own configs, which write their weights to
``runs/segmentation/digit_scenes/<name>/last.ckpt`` where the distillation configs read them:
``teacher.yaml`` (pixel KD and CWD), ``lad_teacher.yaml`` (LAD), ``mgd_teacher_{deep,wide}.yaml`` (MGD; trained on
the labelled eighth only). Students then train from ``configs/segmentation/digit_scenes/<method>.yaml`` with
``seed_everything`` set to each seed; the scenes stay fixed (data ``seed: 0``), so seeds vary initialisation,
batch order, label noise and CutMix boxes, and runs are paired by seed. After fit (the final epoch, no selection)
each network is evaluated on the held-out test scenes (glyphs disjoint from training).

Settings: ``full`` (all training labels: baseline, pixel KD, CWD, LAD) and ``1/8`` (an eighth of the training
scenes labelled: the supervised baseline on the labelled batches with as many steps as MGD, and MGD). The LAD
teacher is also evaluated with its label channel (fixed codes, as distillation feeds it) and with a zero channel.

Writes a Markdown table (test mIoU mean ± std, paired difference vs the baseline of the same setting, seconds
per run) and the raw per-seed numbers to ``benchmarks/results/``.

Run from the repository root:
    python benchmarks/segmentation_digit_scenes.py                 # 3 seeds (about 40 min on 2 CPU cores)
    python benchmarks/segmentation_digit_scenes.py --seeds 1 --methods baseline cwd
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "configs" / "segmentation" / "digit_scenes"
TEACHERS = {
    "teacher": ["pixel_kd", "cwd"],
    "lad_teacher": ["lad"],
    "mgd_teacher_deep": ["mgd"],
    "mgd_teacher_wide": ["mgd"],
}
METHODS = {
    "baseline": ("full", "supervised"),
    "pixel_kd": ("full", "pixel KD (τ 1, w 1)"),
    "cwd": ("full", "CWD (τ 4, w 3)"),
    "lad": ("full", "LAD (CWD from the label-assisted teacher)"),
    "baseline_semi": ("1/8", "supervised (labelled batches, MGD's steps)"),
    "mgd": ("1/8", "MGD (λ₁ 0.002, λ₂ 100)"),
}


def fit_and_test(config: str, seed: int, extra: list[str] = ()) -> tuple[Any, dict[str, float]]:
    from zoo.cli import ZooCLI

    start = time.perf_counter()
    cli = ZooCLI(
        args=[
            "--config",
            str(CONFIGS / f"{config}.yaml"),
            f"--seed_everything={seed}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--summary.enabled=false",
            *extra,
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    return cli, {
        "miou": metrics["test/miou"],
        "pixel_acc": metrics["test/pixel_acc"],
        "teacher_miou": metrics.get("test/teacher_miou"),
        "seconds": seconds,
    }


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--skip-teachers", action="store_true", help="reuse the teachers already in runs/")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, object] = {"teachers": {}, "students": {}}
    if not args.skip_teachers:
        for name, users in TEACHERS.items():
            if not set(users) & set(args.methods):
                continue
            cli, m = fit_and_test(name, 0)
            entry = {"test_miou": m["miou"], "seconds": m["seconds"]}
            if name == "lad_teacher":
                for mode in ("zero", "random"):
                    cli.model.eval_label = mode
                    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
                    entry[f"test_miou_{mode}_label"] = float(cli.trainer.callback_metrics["test/miou"])
            results["teachers"][name] = entry
            print(name, entry, flush=True)
    for method in args.methods:
        runs = []
        for seed in range(args.seeds):
            _, m = fit_and_test(method, seed)
            runs.append(m)
            print(method, seed, m, flush=True)
        results["students"][method] = runs
    results["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU"
    results["command"] = "python benchmarks/segmentation_digit_scenes.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "segmentation_digit_scenes.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "segmentation_digit_scenes.md").write_text(render(results, args.seeds))
    print(render(results, args.seeds))


def render(results: dict, seeds: int) -> str:
    lines = [
        (
            f"Digit scenes (64×64, 11 classes), test mIoU % over {seeds} seeds (mean ± std), final epoch, "
            "DeepLabV3+ ResNet-10-T students."
        ),
        f"Command: `{results['command']}`; machine: {results['machine']}.",
        "",
        "| labels | method | test mIoU | Δ vs baseline (paired) | s / run |",
        "|---|---|---|---|---|",
    ]
    students = results["students"]
    for method, runs in students.items():
        setting, label = METHODS[method]
        base = "baseline" if setting == "full" else "baseline_semi"
        diff = "—"
        if method != base and base in students:
            pairs = [a["miou"] - b["miou"] for a, b in zip(runs, students[base])]
            diff = ("+" if statistics.mean(pairs) >= 0 else "") + mean_std(pairs)
        secs = statistics.mean(r["seconds"] for r in runs)
        lines.append(f"| {setting} | {label} | {mean_std([r['miou'] for r in runs])} | {diff} | {secs:.0f} |")
    teachers = results["teachers"]
    if teachers:
        lines += ["", "| teacher (seed 0) | test mIoU | s |", "|---|---|---|"]
        names = {
            "teacher": "DeepLabV3+ ResNet-26-D, all labels",
            "lad_teacher": "LAD teacher (ResNet-10-T + label channel), fixed codes",
            "mgd_teacher_deep": "MGD deep: DeepLabV3+ ResNet-26-D, 1/8 labels",
            "mgd_teacher_wide": "MGD wide: 3-stage U-Net ResNet-18-D, 1/8 labels",
        }
        for name, t in teachers.items():
            lines.append(f"| {names[name]} | {100 * t['test_miou']:.2f} | {t['seconds']:.0f} |")
            if "test_miou_zero_label" in t:
                lines.append(f"| LAD teacher with a zero label channel | {100 * t['test_miou_zero_label']:.2f} | |")
                lines.append(f"| LAD teacher with random codes | {100 * t['test_miou_random_label']:.2f} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
