"""Real-format data through YAML alone: digits as an ImageFolder of 28×28 grayscale PNGs, stock vs simple augmentation.

scikit-learn's 1797 digits are written as PNG files (``zoo.data.digits.write_digits_imagefolder``: bilinear 8 → 28
px, 8-bit grayscale, ``<root>/{train,val,test}/<digit>/*.png``, the 1077 / 360 / 360 split of the digits data
module) and trained with the shipped templates ``configs/classification/mnist_like/{teacher,baseline,kd}.yaml``
(CIFAR resnet32 teacher, resnet8 baseline, resnet8 KD student of that teacher), changing only command-line
overrides, as a user with their own folder would:

    stock    ``--data.init_args.augmentation=imagenet``: ImageFolderDataModule's ImageNet augmentation
             (RandomResizedCrop(0.08–1) + horizontal flip), evaluated with timm's resize ⌊28 / 0.875⌋ = 32 + centre
             crop 28;
    simple   the templates as shipped: pad by 4 px and crop back, no flip; evaluated on the whole image.

Each arm trains the teacher, the baseline and KD (from that arm's teacher of the same seed) for ``--epochs`` epochs
per seed, then tests on the held-out test folder (``--data.init_args.test_dir=test``). The stock arm's last column
re-evaluates its trained models with ``resize_size: 256`` (the module's earlier fixed evaluation resize, which
centre-cropped 28 px out of a 256-px upscale): the silent failure of a config that sets ``image_size: 28`` alone.

    python benchmarks/imagefolder_digits.py                   # 3 seeds, 15 epochs: about 35 min on 2 busy CPU cores
    python benchmarks/imagefolder_digits.py --seeds 1 --epochs 3

Results: benchmarks/results/imagefolder_digits.{json,md}.
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
CONFIGS = ROOT / "configs" / "classification" / "mnist_like"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from commands import this_command

ARMS = {"stock": ["--data.init_args.augmentation=imagenet"], "simple": []}
ROLES = ("teacher", "baseline", "kd")


def fit_and_test(config: str, data_root: Path, seed: int, workdir: Path, extra: list[str]) -> tuple[dict, object]:
    """Fits a template config on the folder (quietly; the last checkpoint is kept for KD) and tests it."""
    from zoo.cli import ZooCLI

    cli = ZooCLI(
        args=[
            "--config", str(CONFIGS / f"{config}.yaml"), f"--seed_everything={seed}",
            f"--data.init_args.root={data_root}", "--data.init_args.test_dir=test",
            f"--trainer.default_root_dir={workdir}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--summary.enabled=false", *extra,
        ],
        run=False,
    )
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    row = {"test_acc": float(cli.trainer.callback_metrics["test/acc"]), "seconds": seconds}
    return row, cli


def old_eval_acc(cli, data_root: Path) -> float:
    """Test accuracy of the trained student with the earlier fixed evaluation resize (256) and crop 28."""
    from zoo.data import ImageFolderDataModule

    dm = cli.datamodule
    old = ImageFolderDataModule(
        root=str(data_root), test_dir="test", image_size=dm.image_size, resize_size=256, in_chans=dm.in_chans,
        mean=list(dm.mean), std=list(dm.std), batch_size=256, num_workers=0,
    )
    old.setup("test")
    cli.trainer.test(cli.model, dataloaders=old.test_dataloader(), verbose=False)
    return float(cli.trainer.callback_metrics["test/acc"])


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def table(results: dict) -> str:
    head = "| augmentation | teacher resnet32 (%) | baseline resnet8 (%) | KD resnet8 (%) | s / seed |"
    head += " with the old eval resize 256: teacher / baseline (%) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm, runs in results.items():
        cells = [arm] + [mean_std([r[role]["test_acc"] for r in runs]) for role in ROLES]
        cells.append(f"{statistics.mean(sum(r[role]['seconds'] for role in ROLES) for r in runs):.0f}")
        if "old_eval" in runs[0]["teacher"]:
            cells.append(" / ".join(mean_std([r[role]["old_eval"] for r in runs]) for role in ("teacher", "baseline")))
        else:
            cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", default=str(RESULTS / "imagefolder_digits"))
    args = parser.parse_args(argv)
    from zoo.data.digits import write_digits_imagefolder

    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        data_root = write_digits_imagefolder(Path(tmp) / "digits_png", image_size=28)
        for seed in range(args.seeds):
            for arm, arm_args in ARMS.items():
                extra = [*arm_args, f"--trainer.max_epochs={args.epochs}"]
                run: dict[str, dict] = {}
                work = Path(tmp) / arm / str(seed)
                run["teacher"], teacher_cli = fit_and_test("teacher", data_root, seed, work / "teacher", extra)
                teacher_ckpt = next((work / "teacher").rglob("last.ckpt"))
                run["baseline"], baseline_cli = fit_and_test("baseline", data_root, seed, work / "baseline", extra)
                kd_extra = [*extra, f"--model.init_args.teacher.init_args.checkpoint={teacher_ckpt}"]
                run["kd"], _ = fit_and_test("kd", data_root, seed, work / "kd", kd_extra)
                if arm == "stock":
                    run["teacher"]["old_eval"] = old_eval_acc(teacher_cli, data_root)
                    run["baseline"]["old_eval"] = old_eval_acc(baseline_cli, data_root)
                results[arm].append(run)
                print(arm, seed, {k: round(100 * v["test_acc"], 2) for k, v in run.items()}, flush=True)
    command = this_command("imagefolder_digits.py")
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "machine": machine, "epochs": args.epochs, "seeds": args.seeds, "results": results}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    md = [
        "# Digits as an ImageFolder (28×28 grayscale PNGs): stock vs `simple` augmentation, YAML only",
        "",
        f"Test top-1 on the held-out test folder (360 images), mean ± std over {args.seeds} seeds, "
        f"{args.epochs} epochs, configs/classification/mnist_like/*.yaml with command-line overrides only. "
        "See the docstring of benchmarks/imagefolder_digits.py for the arms.",
        "",
        table(results),
        "",
        f"Machine: {machine}. Command: `{command}`",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
