"""VL2V-ADiP vs ERM on the digit domains (the VLM spec's §4(g) CPU check): held-out rotated digits and in-domain.

The teacher is the tiny open_clip CLIP trained contrastively on all four digit domains
(``configs/vlm/digits/clip_teacher.yaml``); the student starts from a tiny timm ViT trained with cross-entropy on the
clean domain (``vit_clean.yaml``). Both are trained once (seed 0) and reused by every seed; the script trains the one
that is missing under ``runs/vlm/digits/``. Then, for each seed (``seed_everything``; the data split is fixed):

    ERM        erm.yaml: the ViT fine-tuned with cross-entropy on the clean, noise and inverted domains (SWAD);
    ADiP       vl2v_align.yaml (P only; best in-domain validation checkpoint) then vl2v_distill.yaml (the backbone
               through the frozen P; SWAD); prediction with the teacher's class text embeddings;
    ERM probe  vl2v_align.yaml on the ERM student's backbone: P fitted as in ADiP's Align, only to measure how close
               ERM's features come to the teacher's embedding space (its cos(û, e_I)).

Every model is evaluated as training leaves it (the SWAD average for ERM and Distill, Align's best checkpoint) on
the rotated domain's test split (D4: digits never trained on, in a domain never trained on) and on the source
domains' test split (in-domain). The spec's pass criteria: ADiP > ERM on D4; in-domain within about 1 point; a
higher student–teacher cosine on D4 for ADiP than for ERM. Writes ``benchmarks/results/vl2v_adip_digits.{md,json}``.

Run from the repository root:
    python benchmarks/vl2v_adip_digits.py             # 3 seeds
    python benchmarks/vl2v_adip_digits.py --seeds 1   # a quick look
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
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from commands import this_command  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "configs" / "vlm" / "digits"
PREREQUISITES = {
    "clip_teacher": "runs/vlm/digits/clip_teacher/last.ckpt",
    "vit_clean": "runs/vlm/digits/vit_clean/last.ckpt",
}
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--summary.enabled=false"]
EXTRA: list[str] = []  # CLI overrides for every seed's runs (``-- --trainer.max_steps=20`` for a quick check)


def _cli(config: str, seed: int, workdir: Path, extra: list[str]):
    from zoo.cli import ZooCLI

    args = ["--config", str(CONFIGS / f"{config}.yaml"), f"--seed_everything={seed}",
            f"--trainer.default_root_dir={workdir}", *QUIET, *EXTRA, *extra]
    return ZooCLI(args=args, run=False)


def _redirect_outputs(cli, workdir: Path) -> None:
    """Checkpoints of a benchmark run go to its temporary folder, not to the shipped runs/ paths."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.swad import SWAD

    for callback in cli.trainer.callbacks:
        if isinstance(callback, ModelCheckpoint):
            callback.dirpath = str(workdir)
        if isinstance(callback, SWAD):
            callback.save_path = None


def _evaluate(cli, ckpt_path: str | None = None) -> dict[str, float]:
    dm = cli.datamodule
    out: dict[str, float] = {}
    for where, loader in (("d4", dm.eval_dataloader(dm.test_domains, "test")),
                          ("in_domain", dm.eval_dataloader(dm.train_domains, "test"))):
        metrics = cli.trainer.test(cli.model, dataloaders=loader, ckpt_path=ckpt_path, verbose=False)[0]
        out[f"{where}_acc"] = metrics["test/acc"]
        for key in ("cosine", "teacher_acc"):
            if f"test/{key}" in metrics:
                out[f"{where}_{key}"] = metrics[f"test/{key}"]
    return out


def _fit(cli) -> float:
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return time.perf_counter() - start


def ensure_prerequisites() -> list[str]:
    """Trains the digits CLIP teacher and the clean-domain ViT from their configs when their checkpoints are missing;
    returns the commands that made them."""
    from zoo.cli import ZooCLI

    commands = []
    for config, ckpt in PREREQUISITES.items():
        command = f"zoo fit --config configs/vlm/digits/{config}.yaml"
        commands.append(command)
        if not (ROOT / ckpt).is_file():
            print(f"{ckpt} is missing: {command}", flush=True)
            ZooCLI(args=["fit", "--config", str(CONFIGS / f"{config}.yaml"), *QUIET])
    return commands


def run_seed(seed: int, workdir: Path) -> dict[str, dict[str, float]]:
    """ERM, ADiP (Align, Distill) and the ERM probe for one seed; their metrics by arm."""
    rows: dict[str, dict[str, float]] = {}
    erm = _cli("erm", seed, workdir / "erm", [])
    _redirect_outputs(erm, workdir / "erm")
    seconds = _fit(erm)
    rows["erm"] = {**_evaluate(erm), "seconds": seconds}
    erm_weights = workdir / "erm_student.pt"
    torch.save(erm.model.student.state_dict(), erm_weights)

    align = _cli("vl2v_align", seed, workdir / "align", [])
    _redirect_outputs(align, workdir / "align")
    seconds = _fit(align)
    best = str(workdir / "align" / "best.ckpt")
    rows["adip_align"] = {**_evaluate(align, ckpt_path=best), "seconds": seconds}

    distill = _cli("vl2v_distill", seed, workdir / "distill", [f"--model.init_args.align_checkpoint={best}"])
    _redirect_outputs(distill, workdir / "distill")
    seconds = _fit(distill)
    rows["adip"] = {**_evaluate(distill), "seconds": seconds + rows["adip_align"]["seconds"]}

    student = align.model.hparams.student  # the Align config's student, on the ERM backbone's weights
    student = json.loads(json.dumps(student))
    student["init_args"]["backbone"]["init_args"]["checkpoint"] = str(erm_weights)
    probe = _cli("vl2v_align", seed, workdir / "probe", [f"--model.init_args.student={json.dumps(student)}"])
    _redirect_outputs(probe, workdir / "probe")
    _fit(probe)
    rows["erm_probe"] = _evaluate(probe, ckpt_path=str(workdir / "probe" / "best.ckpt"))
    return rows


def mean_std(values: list[float], sign: bool = False, scale: float = 100.0, digits: int = 2) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{'+' if sign and mean >= 0 else ''}{scale * mean:.{digits}f} ± {scale * sd:.{digits}f}"


def run_benchmark(seeds: list[int]) -> dict[str, Any]:
    """Runs every arm for every seed; returns ``{"seeds", "runs": {arm: [per-seed metrics]}, "rows", "criteria"}``."""
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            rows = run_seed(seed, Path(tmp) / f"seed{seed}")
            for arm, metrics in rows.items():
                runs.setdefault(arm, []).append(metrics)
            shown = [f"{arm} D4 {100 * m['d4_acc']:.2f} / in-domain {100 * m['in_domain_acc']:.2f}"
                     for arm, m in rows.items()]
            print(f"seed {seed}: " + ", ".join(shown), flush=True)
    erm, adip, probe = runs["erm"], runs["adip"], runs["erm_probe"]
    d4_gain = [a["d4_acc"] - e["d4_acc"] for a, e in zip(adip, erm)]
    in_gap = [a["in_domain_acc"] - e["in_domain_acc"] for a, e in zip(adip, erm)]
    cos_gain = [a["d4_cosine"] - p["d4_cosine"] for a, p in zip(adip, probe)]
    criteria = {
        "ADiP > ERM on D4": statistics.mean(d4_gain) > 0,
        "in-domain within about 1 point": abs(statistics.mean(in_gap)) <= 0.01,
        "higher student–teacher cosine on D4": statistics.mean(cos_gain) > 0,
    }
    return {"seeds": seeds, "runs": runs, "differences": {"d4": d4_gain, "in_domain": in_gap, "d4_cosine": cos_gain},
            "criteria": criteria}


def table(result: dict[str, Any]) -> str:
    runs, diff = result["runs"], result["differences"]
    names = {"erm": "ERM", "adip_align": "ADiP after Align (P only)", "adip": "ADiP (Align → Distill)",
             "erm_probe": "ERM backbone + P fitted as Align (probe)"}
    lines = ["| model | D4 rotated top-1 (%) | in-domain top-1 (%) | cos(û, e_I) on D4 | s / run |",
             "|---|---|---|---|---|"]
    for arm in ("erm", "erm_probe", "adip_align", "adip"):
        rows = runs[arm]
        cosine = mean_std([r["d4_cosine"] for r in rows], scale=1.0, digits=3) if "d4_cosine" in rows[0] else "—"
        seconds = f"{statistics.mean(r['seconds'] for r in rows):.0f}" if "seconds" in rows[0] else "—"
        lines.append(f"| {names[arm]} | {mean_std([r['d4_acc'] for r in rows])} | "
                     f"{mean_std([r['in_domain_acc'] for r in rows])} | {cosine} | {seconds} |")
    teacher = runs["adip"]
    lines.append(f"| teacher: digits CLIP, zero-shot | {mean_std([r['d4_teacher_acc'] for r in teacher])} | "
                 f"{mean_std([r['in_domain_teacher_acc'] for r in teacher])} | — | — |")
    lines += [
        "",
        f"Paired by seed, ADiP − ERM: D4 {mean_std(diff['d4'], sign=True)} points, in-domain "
        f"{mean_std(diff['in_domain'], sign=True)} points; cos(û, e_I) on D4, ADiP − ERM probe: "
        f"{mean_std(diff['d4_cosine'], sign=True, scale=1.0, digits=3)}.",
        "",
        "Pass criteria (VLM spec §4(g)): " + "; ".join(
            f"{name}: {'met' if ok else 'NOT met'}" for name, ok in result["criteria"].items()) + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "vl2v_adip_digits"))
    parser.add_argument("extra", nargs="*", help="CLI overrides for every seed's runs, after --")
    args = parser.parse_args(argv)
    EXTRA[:] = args.extra
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prerequisites = ensure_prerequisites()
    result = run_benchmark(list(range(args.seeds)))
    command = this_command("vl2v_adip_digits.py") if argv is None else " ".join(
        ["python", "benchmarks/vl2v_adip_digits.py", *argv])
    seeds = result["seeds"]
    header = (
        f"VL2V-ADiP vs ERM on the digit domains (VLM spec §4(g)): train on clean, noise (σ 0.3) and inverted digits "
        f"(1079 train digits each, 32 of each domain per step), test on the 359 test digits rotated 90° (D4) and on "
        f"the same test digits in the three training domains (in-domain); tiny timm ViT student (clean-domain CE "
        f"pre-training, `vit_clean.yaml`), digits CLIP teacher (`clip_teacher.yaml`, trained on all four domains). "
        f"{len(seeds)} seeds ({seeds[0]}–{seeds[-1]}), final models (SWAD for ERM and Distill). Machine: "
        f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}.\n\n"
        f"Command: `{command}` (teacher and student initialisation, made once before: "
        + ", ".join(f"`{c}`" for c in prerequisites) + ")"
    )
    text = header + "\n\n" + table(result) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"command": command, **result}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
