"""Cached soft labels vs online KD on digits: accuracy parity over seeds, and the speed of each.

Both arms train ``configs/classification/digits/kd.yaml`` (the shipped resnet32 teacher into a resnet8 student,
30 epochs, random translation by up to 4 px) with ``seed_everything`` set to each seed; the cached arm adds
``--model.init_args.soft_labels.path=<cache> --model.init_args.soft_labels.repeats=R``, so the teacher labels R
pre-drawn translations of each training image once (the first cached run builds the cache; its build time is
reported apart) and training replays them. After fit the student is tested on the held-out test split.

Reported: test top-1 mean ± std per arm, the paired difference (cached − online) with its std, the std of the
online arm (the seed noise the difference is judged against), and mean fit seconds per arm (the teacher also runs
in validation in both arms; benchmarks/throughput_kd.py measures the training step alone).

    python benchmarks/soft_label_cache_digits.py               # 5 seeds, R = 10, about 10 min on 2 CPU cores
    python benchmarks/soft_label_cache_digits.py --seeds 2 --repeats 5

Results: benchmarks/results/soft_label_cache_digits_r<R>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs" / "classification" / "digits" / "kd.yaml"
sys.path.insert(0, str(ROOT / "benchmarks"))
from classification_digits import fit_and_test


def run(seed: int, workdir: Path, extra: list[str]) -> dict[str, float]:
    cli, seconds = fit_and_test(CONFIG, seed, workdir, extra)
    metrics = cli.trainer.callback_metrics
    return {
        "seed": seed,
        "test_acc": float(metrics["test/acc"]),
        "agreement": float(metrics["test/agreement"]),
        "seconds": seconds,
    }


def mean_std(values: list[float], scale: float = 100.0, sign: bool = False) -> str:
    fmt = "+.2f" if sign else ".2f"
    return f"{scale * statistics.mean(values):{fmt}} ± {scale * statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    results: dict = {"online": [], "cached": [], "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "soft_labels"
        cached_args = [
            f"--model.init_args.soft_labels.path={cache}",
            f"--model.init_args.soft_labels.repeats={args.repeats}",
        ]
        for seed in range(args.seeds):
            results["online"].append(run(seed, Path(tmp) / f"online{seed}", []))
            first = not cache.exists()
            row = run(seed, Path(tmp) / f"cached{seed}", cached_args)
            if first:  # this fit also built the cache: time a build-free rerun for the speed column
                results["cache_build_fit_seconds"] = row["seconds"]
                row = run(seed, Path(tmp) / f"cached{seed}b", cached_args)
            results["cached"].append(row)
            print(seed, results["online"][-1], results["cached"][-1], flush=True)
    online = [r["test_acc"] for r in results["online"]]
    cached = [r["test_acc"] for r in results["cached"]]
    diffs = [c - o for c, o in zip(cached, online)]
    results["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU"
    results["command"] = "python benchmarks/soft_label_cache_digits.py " + " ".join(sys.argv[1:])
    secs = {arm: statistics.mean(r["seconds"] for r in results[arm]) for arm in ("online", "cached")}
    lines = [
        (
            f"Digits KD (`configs/classification/digits/kd.yaml`, resnet32 → resnet8, 30 epochs), {args.seeds} seeds; "
            f"cached soft labels with R = {args.repeats} replayed translations per image, all 10 classes stored."
        ),
        f"Command: `{results['command']}`; machine: {results['machine']}.",
        "",
        "| arm | test top-1 % | agreement % | fit s (mean) |",
        "|---|---|---|---|",
        f"| online KD | {mean_std(online)} | {mean_std([r['agreement'] for r in results['online']])} "
        f"| {secs['online']:.1f} |",
        (
            f"| cached soft labels | {mean_std(cached)} | {mean_std([r['agreement'] for r in results['cached']])} | "
            f"{secs['cached']:.1f} |"
        ),
        "",
        (
            f"Paired difference cached − online: {mean_std(diffs, sign=True)} points (online seed std "
            f"{100 * statistics.stdev(online):.2f}). The first cached fit, which built the cache, took "
            f"{results['cache_build_fit_seconds']:.1f} s. Fit time ratio online / cached: "
            f"{secs['online'] / secs['cached']:.2f}."
        ),
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"soft_label_cache_digits_r{args.repeats}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
