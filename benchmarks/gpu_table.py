"""The GPU table of ``benchmarks/gpu.sh``, assembled from its per-setting results.

Reads ``benchmarks/results/throughput_kd_gpu_{gap,fp32,bf16,bf16_cl,bf16_cl_compiled}.json`` and
``throughput_seg_gpu.json`` (settings not run are left out) and writes ``benchmarks/results/throughput_gpu.md``;
``--gap`` prints only the line of the cached step's gap to the student alone (the first number gpu.sh prints):

    python benchmarks/gpu_table.py [--gap]
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = [
    ("fp32", "gpu_fp32"),
    ("bf16-mixed", "gpu_bf16"),
    ("bf16-mixed + channels-last", "gpu_bf16_cl"),
    ("bf16-mixed + channels-last + compiled teacher", "gpu_bf16_cl_compiled"),
]
NAN = float("nan")


def gap_line() -> str | None:
    """The cached step (soft labels in the batch) against the student alone, from gpu.sh's first run (one run)."""
    path = RESULTS / "throughput_kd_gpu_gap.json"
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    cached, student = (run["variants"][k] for k in ("zoo_kd_cached_mem", "student"))
    per_round = [a / b for a, b in zip(cached["images_per_sec"], student["images_per_sec"])]
    return (
        f"cached-step gap: {statistics.median(per_round):.3f} = zoo KD with cached soft labels "
        f"{cached['median_images_per_sec']:.0f} img/s ÷ student alone {student['median_images_per_sec']:.0f} img/s "
        f"(per round {min(per_round):.3f}–{max(per_round):.3f}; ResNet-18, batch {run['config']['batch']}, "
        f"bf16-mixed + channels-last, {run['machine']}, torch {run['torch']}; same run, interleaved)"
    )


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def seg_lines() -> list[str]:
    """The segmentation steps of gpu.sh (benchmarks/throughput_seg.py --tag gpu), as a table."""
    path = RESULTS / "throughput_seg_gpu.json"
    if not path.exists():
        return []
    run = json.loads(path.read_text())
    cfg, v = run["config"], run["variants"]
    lines = [
        "",
        f"Segmentation distillation steps (VOC recipes' models, {cfg['size']}², batch CWD {cfg['batches']['cwd']}, "
        f"MGD {cfg['batches']['mgd']} + 2 × {cfg['batches']['mgd']} unlabelled, {cfg['precision']}; {run['machine']}; "
        f"command: `{run['command'].strip()}`; median of {cfg['rounds']} rounds × {cfg['steps']} steps after "
        f"{cfg['warmup']} warm-up steps):",
        "",
        "| variant | step ms | peak MB |",
        "|---|---|---|",
        *(f"| {k} | {x['median_step_ms']:.1f} | {_mb(x.get('peak_mb'))} |" for k, x in v.items()),
        "",
        "| step-time ratio | per round: median [min, max] |",
        "|---|---|",
        *(f"| {k} | {r['round_median']:.3f} [{r['round_min']:.3f}, {r['round_max']:.3f}] |"
          for k, r in run["ratios"].items()),
    ]
    return lines


def main() -> None:
    if "--gap" in sys.argv[1:]:
        print(gap_line() or "cached-step gap: benchmarks/results/throughput_kd_gpu_gap.json is missing")
        return
    runs = {
        tag: json.loads((RESULTS / f"throughput_kd_{tag}.json").read_text())
        for _, tag in SETTINGS
        if (RESULTS / f"throughput_kd_{tag}.json").exists()
    }
    if "gpu_fp32" not in runs:
        raise SystemExit("benchmarks/results/throughput_kd_gpu_fp32.json is missing: run benchmarks/gpu.sh first")

    def ips(tag: str, kind: str) -> float:
        return runs[tag]["variants"].get(kind, {}).get("median_images_per_sec", NAN) if tag in runs else NAN

    def mb(tag: str, kind: str) -> str:
        value = runs[tag]["variants"].get(kind, {}).get("peak_mb")
        return "—" if value is None else f"{value:.0f}"

    def f(value: float, digits: int = 0) -> str:
        return "—" if math.isnan(value) else f"{value:.{digits}f}"

    zoo_fp32, td_fp32 = ips("gpu_fp32", "zoo_kd"), ips("gpu_fp32", "torchdistill")
    rows = []
    for name, tag in SETTINGS:
        if tag not in runs:
            continue
        zoo, td = ips(tag, "zoo_kd"), ips(tag, "torchdistill")
        rows.append(
            f"| {name} | {zoo:.0f} | {td:.0f} | {f(ips(tag, 'loop_kd'))} | {f(ips(tag, 'student'))} | "
            f"{zoo / zoo_fp32:.2f} | {zoo / td:.2f} | {zoo / td_fp32:.2f} | {mb(tag, 'zoo_kd')} | "
            f"{mb(tag, 'torchdistill')} |"
        )
    # the cached step: gpu.sh's first run (with its own student alone), or the bf16_cl run of older results
    gap = (RESULTS / "throughput_kd_gpu_gap.json")
    if gap.exists():
        runs["gpu_gap"] = json.loads(gap.read_text())
    source = "gpu_gap" if "gpu_gap" in runs else "gpu_bf16_cl"
    cached = ips(source, "zoo_kd_cached_mem")
    if not math.isnan(cached):
        td = ips(source, "torchdistill") if source == "gpu_bf16_cl" else ips("gpu_bf16_cl", "torchdistill")
        top_k = runs[source]["config"].get("top_k", "k")
        rows.append(
            f"| bf16-mixed + channels-last, cached soft labels (in memory, top-{top_k}) | {cached:.0f} | {f(td)} "
            f"| — | {f(ips(source, 'student'))} | {cached / zoo_fp32:.2f} | {cached / td:.2f} "
            f"| {cached / td_fp32:.2f} | "
            f"{mb(source, 'zoo_kd_cached_mem')} | — |"
        )
    td_all = [x for run in runs.values() for x in run["variants"].get("torchdistill", {}).get("images_per_sec", [])]
    cards = ", ".join(sorted({run["machine"] for run in runs.values()}))
    torches = ", ".join(sorted({run["torch"] for run in runs.values()}))
    header = (
        "| setting | zoo KD img/s | torchdistill img/s (same run) | hand loop img/s | student alone img/s | "
        "zoo ÷ zoo fp32 | zoo ÷ torchdistill (same run) | zoo ÷ torchdistill fp32 (fp32 run) | zoo peak MB | "
        "torchdistill peak MB |"
    )
    intro = (
        f"ResNet-34 → ResNet-18 KD, 224², batch 256, synthetic ImageNet-shaped batches held on the card; "
        f"card: {cards}; "
        f"torch {torches}; command: `bash benchmarks/gpu.sh`. Images/s are medians of 3 rounds × 20 steps after 10 "
        "warm-up steps, cudnn.benchmark on for every variant. torchdistill runs its own fp32 step in every setting "
        "(its mixed precision goes through Hugging Face accelerate, not benchmarked here); timed in every run as the "
        "common yardstick, it gave "
        f"{min(td_all):.0f}–{max(td_all):.0f} img/s over all rounds of all settings, so ratios across settings "
        "(separate processes) hold to well under 1 %. Peak MB: torch.cuda.max_memory_allocated in a separate short "
        "process (— where not measured)."
    )
    gap_text = gap_line()
    lines = [
        *([gap_text[0].upper() + gap_text[1:] + ".", ""] if gap_text else []),
        intro,
        "",
        header,
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        *seg_lines(),
    ]
    table = "\n".join(lines)
    (RESULTS / "throughput_gpu.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
