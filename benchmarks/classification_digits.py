"""Classification on digits: every classification method's student, over seeds, from the shipped configs.

Each method trains from its own config (``configs/classification/digits/<method>.yaml``: a CIFAR resnet8 student;
the distillation methods use the shipped resnet32 teacher, MEAL V2 the three shipped teachers) with
``seed_everything`` set to each seed; the data split stays fixed (``split_seed: 0``), so seeds vary initialisation
and batch order, and runs are paired by seed. MEAL V2 starts from the baseline student of the same seed and setting
(it fine-tunes a converged student, as in the paper). After fit (the final epoch, no selection) the student is
evaluated on the held-out test split.

Settings:
    plain        the configs as shipped;
    quarter      students train on a stratified quarter of the training split (teachers saw all of it), where
                 the spec expects MEAL V2's gain to show;
    long_tailed  the training split is long-tailed (imbalance ratio 10, class 0 most frequent, class 9 least;
                 test stays balanced), where the spec expects TRG's gain; "tail" is the accuracy on classes 7–9.

Writes a Markdown table per setting (mean ± std top-1, paired differences vs the baseline and vs KD, agreement, time
per run) and the raw per-seed numbers to ``benchmarks/results/``.

Run from the repository root:
    python benchmarks/classification_digits.py                       # all settings, 5 seeds
    python benchmarks/classification_digits.py --settings plain --methods baseline kd --seeds 2
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
# Every student config of the digits folder is a row of the plain setting (a new method's config adds its row);
# the teacher and the cached-soft-label variant have their own benchmarks.
ORDER = ["baseline", "kd", "dkd", "meal_v2", "kd_nd", "dkd_nd", "dhkd", "trg"]
NOT_STUDENTS = {"teacher", "kd_cached"}
PLAIN = ORDER + sorted({p.stem for p in CONFIGS.glob("*.yaml")} - set(ORDER) - NOT_STUDENTS)
SETTINGS: dict[str, tuple[list[str], list[str]]] = {
    "plain": (PLAIN, []),
    "quarter": (["baseline", "kd", "meal_v2"], ["--data.init_args.train_fraction=0.25"]),
    "long_tailed": (["baseline", "kd", "trg"], ["--data.init_args.imbalance_ratio=10"]),
}
TAIL = (7, 8, 9)


def fit_and_test(config: Path, seed: int, workdir: Path, extra: list[str]):
    """Fits ``config`` (quietly, no checkpoints) with ``seed`` and tests it; returns the CLI and the fit seconds."""
    from zoo.cli import ZooCLI

    cli = ZooCLI(
        args=[
            "--config", str(config), f"--seed_everything={seed}",
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
    return cli, seconds


def run(method: str, seed: int, workdir: Path, extra: list[str]) -> dict[str, float]:
    cli, seconds = fit_and_test(CONFIGS / f"{method}.yaml", seed, workdir, extra)
    metrics = cli.trainer.callback_metrics
    out = {"test_acc": float(metrics["test/acc"]), "seconds": seconds}
    if "test/agreement" in metrics:
        out["test_agreement"] = float(metrics["test/agreement"])
    probs = torch.cat(cli.trainer.predict(cli.model, dataloaders=cli.datamodule.test_dataloader()))
    labels = cli.datamodule.test_set.labels
    hit = probs.argmax(1) == labels
    tail = torch.isin(labels, torch.tensor(TAIL))
    out["tail_acc"] = float(hit[tail].float().mean())
    torch.save(cli.model.student.state_dict(), workdir / "student.pt")
    return out


def mean_std(values: list[float], sign: bool = False) -> str:
    mean, sd = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{'+' if sign and mean >= 0 else ''}{100 * mean:.2f} ± {100 * sd:.2f}"


def table(results: dict[str, list[dict[str, float]]], tail: bool) -> str:
    head = "| method | student top-1 (%) | paired Δ vs baseline | paired Δ vs KD |"
    head += " tail classes 7–9 (%) |" if tail else ""
    head += " agreement with teacher (%) | s / run |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for method, runs in results.items():
        accs = [r["test_acc"] for r in runs]
        cells = [method, mean_std(accs)]
        for ref in ("baseline", "kd"):
            if ref in results and method != ref:
                cells.append(mean_std([a - b["test_acc"] for a, b in zip(accs, results[ref])], sign=True))
            else:
                cells.append("—")
        if tail:
            cells.append(mean_std([r["tail_acc"] for r in runs]))
        agree = [r["test_agreement"] for r in runs if "test_agreement" in r]
        cells += [mean_std(agree) if agree else "—", f"{statistics.mean(r['seconds'] for r in runs):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=None, help="restrict to these methods")
    parser.add_argument("--out", default=str(RESULTS / "classification_digits"))
    parser.add_argument("extra", nargs="*", help="extra CLI overrides for every run, after --")
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds))
    all_results: dict[str, dict[str, list[dict[str, float]]]] = {}
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            methods, data_args = SETTINGS[setting]
            methods = [m for m in methods if args.methods is None or m in args.methods]
            results: dict[str, list[dict[str, float]]] = {}
            for method in methods:
                results[method] = []
                for seed in seeds:
                    workdir = Path(tmp) / setting / f"{method}-{seed}"
                    workdir.mkdir(parents=True)
                    extra = [*data_args, *args.extra]
                    if method == "meal_v2":
                        init = Path(tmp) / setting / f"baseline-{seed}" / "student.pt"
                        if not init.is_file():
                            raise SystemExit("meal_v2 starts from the baseline of the same seed: include baseline")
                        student = {"class_path": "zoo.models.CIFARModel",
                                   "init_args": {"name": "resnet8", "checkpoint": str(init)}}
                        extra.append(f"--model.init_args.student={json.dumps(student)}")
                    r = run(method, seed, workdir, extra)
                    results[method].append(r)
                    print(f"[{setting}] {method} seed {seed}: test top-1 {100 * r['test_acc']:.2f}% "
                          f"(tail {100 * r['tail_acc']:.2f}%) in {r['seconds']:.1f} s", flush=True)
            all_results[setting] = results
            sections.append(f"#### {setting}\n\n{table(results, tail=setting == 'long_tailed')}")
    command = "python benchmarks/classification_digits.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"Digits (scikit-learn, 16×16, split_seed 0: 1077 train / 360 val / 360 test), CIFAR resnet8 student, "
        f"shipped resnet32 teacher(s); {len(seeds)} seeds ({seeds[0]}–{seeds[-1]}), paired by seed, final epoch, test "
        f"split. Machine: {platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}. Command: `{command.strip()}`"
    )
    text = header + "\n\n" + "\n\n".join(sections) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"seeds": seeds, "results": all_results}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
