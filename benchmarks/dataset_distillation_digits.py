"""Dataset distillation on digits: random real images vs MTT vs DATM vs AST at IPC 1 and 10.

Experts come from ``configs/dataset_distillation/digits/experts.yaml`` (MTT, DATM) and ``experts_smooth.yaml`` (AST),
trained by the first run; later runs pass the buffers through ``ExpertTraining`` again, which skips finished experts
and refuses files made with other settings. Each method distils from its shipped config
(``{mtt,datm,ast}[_ipc10].yaml``: 500 iterations) with ``seed_everything`` and the method's seed set to each seed,
in its own process, so its wall time and peak resident memory are its own. Every distilled set is evaluated with
the spec's protocol at the final iteration: 5 fresh ConvNet-2 networks × 300 epochs (MTT's loop: 301 passes, the
learned lr ÷10 after pass 151 in a fresh optimizer), SGD momentum 0.9, weight decay 5e-4, no-flip DSA, test split of
digits (held out). The random-real baseline runs the same protocol on IPC random training images per class with hard
labels and the experts' lr 0.02, over ``--random-draws`` random draws (20).

Reported: test accuracy mean ± std over all evaluation networks (seeds × 5), the gap to random real, distillation
seconds (fit time minus evaluation time) and peak RSS of the distillation process (an idle process that imports
torch and the zoo is listed for reference).

Run from the repository root:
    python benchmarks/dataset_distillation_digits.py              # 2 seeds, about 26 min on 2 CPU cores
    python benchmarks/dataset_distillation_digits.py --seeds 1 --ipc 1
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from commands import merge_commands, this_command

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "configs" / "dataset_distillation" / "digits"
BUFFERS = {
    "experts": "runs/dataset_distillation/digits/experts",
    "experts_smooth": "runs/dataset_distillation/digits/experts_smooth",
}
METHODS = ("mtt", "datm", "ast")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def worker(config: str, seed: int, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Runs one distillation in this process (``overrides``: extra CLI arguments); prints a JSON line of numbers."""
    from zoo.cli import ZooCLI

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cli = ZooCLI(
            args=[
                "--config", str(CONFIGS / f"{config}.yaml"), f"--seed_everything={seed}",
                f"--model.init_args.seed={seed}", f"--model.init_args.output={tmp}/set.safetensors",
                f"--trainer.default_root_dir={tmp}", "--trainer.enable_checkpointing=false", "--summary.enabled=false",
                *overrides,
            ],
            run=False,
        )
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        total = time.perf_counter() - start
        evaluation = cli.model.last_eval
        print("RESULT " + json.dumps({
            "config": config, "seed": seed, "accuracies": evaluation["accuracies"],
            "syn_lr": evaluation["eval/syn_lr"], "seconds": total - evaluation["seconds_total"],
            "eval_seconds": evaluation["seconds_total"], "peak_rss_mb": peak_rss_mb(),
        }), flush=True)


def idle_rss() -> float:
    code = ("import torch, zoo.dataset_distillation, resource; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def run_worker(config: str, seed: int, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", config, str(seed), *overrides], cwd=ROOT, capture_output=True, text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{config} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def train_buffer(config: str, overrides: list[str] | tuple[str, ...] = ()) -> float:
    """Trains the experts of ``configs/dataset_distillation/digits/<config>.yaml`` (+ CLI overrides); returns the
    seconds. ``ExpertTraining`` skips experts already in the buffer, so an interrupted buffer is finished."""
    from zoo.cli import ZooCLI

    start = time.perf_counter()
    ZooCLI(args=["fit", "--config", str(CONFIGS / f"{config}.yaml"), "--summary.enabled=false", *overrides])
    return time.perf_counter() - start


def train_experts() -> dict[str, float]:
    """Trains or finishes both buffers; every call goes through ``ExpertTraining``, which skips finished experts and
    refuses files made with other settings (e.g. an older buffer that dropped the last batch). Returns the seconds of
    the buffers that were incomplete."""
    seconds = {}
    for name, folder in BUFFERS.items():
        wanted = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]["init_args"]["num_experts"]
        complete = len(list((ROOT / folder).glob("expert_*.safetensors"))) >= wanted
        elapsed = train_buffer(name)
        if not complete:
            seconds[name] = elapsed
    return seconds


def random_real(ipc: int, draws: int, epochs: int = 300) -> list[float]:
    """IPC random training images per class, hard labels, lr 0.02, the same evaluation protocol (5 nets each)."""
    import torch

    from zoo.data import DigitsDataModule
    from zoo.dataset_distillation import (
        DIGITS_DSA_STRATEGY,
        DiffAugment,
        evaluate_synthetic,
    )
    from zoo.models import ConvNetModel

    dm = DigitsDataModule(image_size=8, channels=1, augment=False, split_seed=0)
    dm.setup()
    images = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    labels = torch.tensor([int(dm.train_set[i][1]) for i in range(len(dm.train_set))])
    test = [(x, y) for x, y in dm.test_dataloader()]
    source = ConvNetModel(depth=2, width=32, image_size=8)
    accs: list[float] = []
    for draw in range(draws):
        g = torch.Generator().manual_seed(draw)
        idx = torch.cat([
            (labels == c).nonzero().flatten()[torch.randperm(int((labels == c).sum()), generator=g)[:ipc]]
            for c in range(10)
        ])
        result = evaluate_synthetic(
            lambda: source.build(num_classes=10, in_chans=1), images[idx], labels[idx], 0.02, lambda: test,
            num_nets=5, seed=1000 + draw, epochs=epochs, augment=DiffAugment(DIGITS_DSA_STRATEGY),
        )
        accs.extend(result.accuracies)
    return accs


def mean_std(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10], choices=[1, 10])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                        help="methods to (re)run; rows of others already in the results file are kept")
    parser.add_argument("--random-draws", type=int, default=20, help="random-real draws (5 networks each)")
    if sys.argv[1:2] == ["--worker"]:  # internal: --worker CONFIG SEED [CLI OVERRIDE ...]
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
        return
    args = parser.parse_args()
    import torch

    previous = RESULTS / "dataset_distillation_digits.json"
    rows = json.loads(previous.read_text()).get("rows", {}) if previous.is_file() else {}
    results: dict = {"experts_seconds": train_experts(), "idle_rss_mb": idle_rss(), "rows": rows}
    for ipc in args.ipc:
        suffix = "" if ipc == 1 else "_ipc10"
        start = time.perf_counter()
        base = random_real(ipc, draws=args.random_draws)
        results["rows"][f"random_ipc{ipc}"] = {"accuracies": base, "seconds": time.perf_counter() - start,
                                               "draws": args.random_draws}
        print("random", ipc, mean_std(base), flush=True)
        for method in args.methods:
            runs = [run_worker(f"{method}{suffix}", seed) for seed in range(args.seeds)]
            results["rows"][f"{method}_ipc{ipc}"] = {"runs": runs}
            accs = [a for r in runs for a in r["accuracies"]]
            print(method, ipc, mean_std(accs), [round(r["seconds"]) for r in runs], flush=True)
    results["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU"
    results["command"] = this_command("dataset_distillation_digits.py")
    earlier = json.loads(previous.read_text()) if previous.is_file() else {}
    results["commands"] = merge_commands(earlier, results["command"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dataset_distillation_digits.json").write_text(json.dumps(results, indent=2))
    table = render(results, args)
    (RESULTS / "dataset_distillation_digits.md").write_text(table)
    print(table)


def render(results: dict, args: argparse.Namespace) -> str:
    lines = [
        (
            "Digits (8×8, 1 channel), ConvNet-2 width 32; test accuracy % at the final iteration (500), mean ± std "
            "over the distillation seeds × 5 evaluation networks (random real: draws × 5 networks)."
        ),
        (
            "Commands (rows of a later command replace the same rows of an earlier one): "
            + "; ".join(f"`{c}`" for c in results["commands"])
            + f". Machine: {results['machine']}; an idle process (torch + zoo imported) peaks at "
            f"{results['idle_rss_mb']:.0f} MB RSS."
        ),
        "",
        "| IPC | method | test accuracy | gap vs random real | distillation s / run | peak RSS MB | learned lr |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = results["rows"]
    for ipc in (1, 10):
        if f"random_ipc{ipc}" not in rows:
            continue
        base = rows[f"random_ipc{ipc}"]["accuracies"]
        draws = rows[f"random_ipc{ipc}"].get("draws", len(base) // 5)
        lines.append(f"| {ipc} | random real (lr 0.02, {draws} draws) | {mean_std(base)} | — | — | — | 0.02 |")
        for method in METHODS:
            if f"{method}_ipc{ipc}" not in rows:
                continue
            runs = rows[f"{method}_ipc{ipc}"]["runs"]
            accs = [a for r in runs for a in r["accuracies"]]
            gap = 100 * (statistics.mean(accs) - statistics.mean(base))
            secs = statistics.mean(r["seconds"] for r in runs)
            rss = max(r["peak_rss_mb"] for r in runs)
            lr = statistics.mean(r["syn_lr"] for r in runs)
            lines.append(
                f"| {ipc} | {method.upper()} | {mean_std(accs)} | {gap:+.2f} | {secs:.0f} | {rss:.0f} | {lr:.4f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
