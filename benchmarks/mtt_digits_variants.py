"""MTT on digits at IPC 1: does any setting get near the prototype's +25-point gap over random real?

Each variant distils ``configs/dataset_distillation/digits/mtt.yaml`` with a few CLI overrides (and, where named,
experts retrained with overrides of ``experts.yaml`` into their own buffer under
``runs/dataset_distillation/digits/variants/``), with seeds 0 and 1, through the worker of
``benchmarks/dataset_distillation_digits.py`` (same evaluation: 5 fresh networks per seed at the final iteration).
The 1000-epoch evaluation variant also gets its own random-real baseline at 1000 epochs (the first 10 draws of the
main benchmark's baseline).

    python benchmarks/mtt_digits_variants.py                  # about 20 min on 2 CPU cores
    python benchmarks/mtt_digits_variants.py --variants base eval1000

Results: benchmarks/results/mtt_digits_variants.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset_distillation_digits import (
    CONFIGS,
    RESULTS,
    ROOT,
    mean_std,
    random_real,
    run_worker,
)

VARIANT_ROOT = "runs/dataset_distillation/digits/variants"
# name: (description, mtt.yaml overrides, experts.yaml overrides or None for the shipped buffer)
VARIANTS: dict[str, tuple[str, list[str], list[str] | None]] = {
    "base": ("shipped config", [], None),
    "experts30": ("experts 30 epochs, T+ 20", ["--model.init_args.max_start_epoch=20"],
                  ["--trainer.max_epochs=300", "--model.init_args.train_epochs=30"]),
    "M3_N30": ("N 30, M 3", ["--model.init_args.expert_epochs=3", "--model.init_args.syn_steps=30"], None),
    "lr_lr_1e-4": ("lr_lr 1e-4", ["--model.init_args.lr_lr=1e-4"], None),
    "experts_lr05": ("experts at lr 0.05, alpha0 0.05", ["--model.init_args.lr_teacher=0.05"],
                     ["--model.init_args.lr=0.05"]),
    "lr_img_300": ("image lr 300", ["--model.init_args.lr_img=300"], None),
    "zca": ("ZCA-whitened experts and distillation", [], ["--model.init_args.zca=true"]),
    "eval1000": ("1000 evaluation epochs", ["--model.init_args.eval_epochs=1000"], None),
}


def experts(name: str, overrides: list[str]) -> str:
    """Trains (once) the experts of a variant into their own buffer; returns the folder."""
    from zoo.cli import ZooCLI

    folder = f"{VARIANT_ROOT}/{name}"
    if len(list((ROOT / folder).glob("expert_*.safetensors"))) < 10:  # resumes an interrupted buffer
        ZooCLI(args=["fit", "--config", str(CONFIGS / "experts.yaml"), f"--model.init_args.buffer_dir={folder}",
                     "--summary.enabled=false", *overrides])
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()

    path = RESULTS / "mtt_digits_variants.json"
    results = json.loads(path.read_text()) if path.is_file() else {"variants": {}}
    for name in args.variants:
        description, overrides, expert_overrides = VARIANTS[name]
        if expert_overrides is not None:
            overrides = [f"--model.init_args.buffer_dir={experts(name, expert_overrides)}", *overrides]
        runs = [run_worker("mtt", seed, overrides) for seed in range(args.seeds)]
        results["variants"][name] = {"description": description, "overrides": overrides, "runs": runs}
        print(name, mean_std([a for r in runs for a in r["accuracies"]]), flush=True)
        if name == "eval1000":
            results["random_ipc1_eval1000"] = {"draws": 10, "accuracies": random_real(1, draws=10, epochs=1000)}
    results["command"] = " ".join(["python benchmarks/mtt_digits_variants.py", *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    lines = [
        (
            "MTT on digits, IPC 1 (`configs/dataset_distillation/digits/mtt.yaml` + overrides), seeds × 5 evaluation "
            f"networks at the final iteration. Command: `{results['command']}`."
        ),
        "",
        "| variant | test accuracy | learned lr |",
        "|---|---|---|",
    ]
    for name, row in results["variants"].items():
        accs = [a for r in row["runs"] for a in r["accuracies"]]
        lr = statistics.mean(r["syn_lr"] for r in row["runs"])
        lines.append(f"| {row['description']} | {mean_std(accs)} | {lr:.4f} |")
    if "random_ipc1_eval1000" in results:
        baseline = mean_std(results["random_ipc1_eval1000"]["accuracies"])
        lines += ["", f"Random real at 1000 evaluation epochs (10 draws): {baseline}."]
    (RESULTS / "mtt_digits_variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
