"""MAE-family distillation on digits: MAE-only vs DMAE vs G2SD vs Hybrid Distill students, probed and fine-tuned.

Teachers are trained once (seed 0) from their configs, which save to the fixed paths the distillation configs read:
``mae_teacher.yaml`` (MAE ViT d128 depth 6) and ``vit_teacher.yaml`` (its encoder fine-tuned on the labels; G2SD's
specific-stage teacher and Hybrid's discriminative teacher). Then, for each seed, every student (ViT d64 depth 4,
patch 4, on 16×16 digits) is pre-trained from its config (``mae_baseline``, ``dmae``, ``g2sd_generic``, ``hybrid``;
30 epochs, validation off so the step time is the training step's), and its encoder is evaluated twice from
the same checkpoint: ``linear_probe.yaml`` (frozen encoder, BatchNorm + linear head, 20 epochs) and ``finetune.yaml``
(20 epochs, layer decay 0.75). The G2SD student also runs its own specific stage (``g2sd_specific.yaml``: distillation
token, hard labels from the ViT teacher). Top-1 is measured on the held-out test split at the final epoch.

Run from the repository root:
    python benchmarks/feature_distillation_digits.py               # 3 seeds, about 15 min on 2 CPU cores
    python benchmarks/feature_distillation_digits.py --seeds 1
    python benchmarks/feature_distillation_digits.py --students hybrid   # rerun one row, keep the others

Rows of a later command replace the same rows of an earlier one (the results file lists every command). The teachers
are trained again by every command, with the same seed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from commands import merge_commands, this_command

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "configs" / "feature_distillation" / "digits"
RUNS = "runs/feature_distillation/digits"
STUDENTS = {"mae_baseline": "MAE only", "dmae": "DMAE", "g2sd_generic": "G2SD", "hybrid": "Hybrid Distill"}


def fit(config: str, seed: int, extra: list[str] = (), test: bool = True) -> dict[str, float]:
    from zoo.cli import ZooCLI

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
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "steps": cli.trainer.global_step}
    if test:
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        out["test_acc"] = float(cli.trainer.callback_metrics["test/acc"])
    return out


def evaluate(student: str, seed: int) -> dict[str, float]:
    ckpt = f"--model.init_args.student.init_args.checkpoint={RUNS}/{student}/last.ckpt"
    result = {
        "probe": fit("linear_probe", seed, [ckpt])["test_acc"],
        "finetune": fit("finetune", seed, [ckpt])["test_acc"],
    }
    if student == "g2sd_generic":
        result["specific"] = fit("g2sd_specific", seed)["test_acc"]
    return result


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    args = parser.parse_args()
    previous = RESULTS / "feature_distillation_digits.json"
    earlier = json.loads(previous.read_text()) if previous.is_file() else {}
    results: dict = {"teachers": {}, "students": earlier.get("students", {})}
    teacher = fit("mae_teacher", 0, ["--trainer.limit_val_batches=0"], test=False)
    results["teachers"]["mae_teacher"] = teacher
    results["teachers"]["vit_teacher"] = fit("vit_teacher", 0)
    print("teachers", results["teachers"], flush=True)
    for student in args.students:
        runs = []
        for seed in range(args.seeds):
            pre = fit(student, seed, ["--trainer.limit_val_batches=0"], test=False)
            run = {
                "seed": seed,
                "pretrain_seconds": pre["seconds"],
                "ms_per_step": 1000 * pre["seconds"] / pre["steps"],
            }
            run.update(evaluate(student, seed))
            runs.append(run)
            print(student, run, flush=True)
        results["students"][student] = runs
    results["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU"
    results["command"] = this_command("feature_distillation_digits.py")
    results["commands"] = merge_commands(earlier, results["command"])
    results["students"] = {k: results["students"][k] for k in STUDENTS if k in results["students"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "feature_distillation_digits.json").write_text(json.dumps(results, indent=2))
    seeds = {len(runs) for runs in results["students"].values()}
    table = render(results, seeds.pop() if len(seeds) == 1 else "per-row")
    (RESULTS / "feature_distillation_digits.md").write_text(table)
    print(table)


def render(results: dict, seeds: int | str) -> str:
    vit = results["teachers"]["vit_teacher"]["test_acc"]
    lines = [
        (
            f"Digits 16×16, ViT d64 depth 4 students pre-trained 30 epochs; test top-1 % (mean ± std over {seeds} "
            f"seeds) of a linear probe and of fine-tuning (20 epochs each). ViT teacher (fine-tuned MAE teacher): "
            f"{100 * vit:.2f}."
        ),
        (
            "Commands (rows of a later command replace the same rows of an earlier one): "
            + "; ".join(f"`{c}`" for c in results["commands"])
            + f"; machine: {results['machine']}."
        ),
        "",
        "| student | linear probe | fine-tune | G2SD specific stage | pre-training ms / step |",
        "|---|---|---|---|---|",
    ]
    for student, runs in results["students"].items():
        specific = mean_std([r["specific"] for r in runs]) if "specific" in runs[0] else "—"
        ms = statistics.mean(r["ms_per_step"] for r in runs)
        lines.append(
            f"| {STUDENTS[student]} | {mean_std([r['probe'] for r in runs])} | "
            f"{mean_std([r['finetune'] for r in runs])} | {specific} | {ms:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
