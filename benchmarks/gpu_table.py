"""The GPU table of ``benchmarks/gpu.sh``, assembled from its per-setting results.

Reads ``benchmarks/results/throughput_kd_gpu_{fp32,bf16,bf16_cl,bf16_cl_compiled}.json`` (settings not run are left
out) and writes ``benchmarks/results/throughput_gpu.md``:

    python benchmarks/gpu_table.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = [
    ("fp32", "gpu_fp32"),
    ("bf16-mixed", "gpu_bf16"),
    ("bf16-mixed + channels-last", "gpu_bf16_cl"),
    ("bf16-mixed + channels-last + compiled teacher", "gpu_bf16_cl_compiled"),
]
NAN = float("nan")


def main() -> None:
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
    cached = ips("gpu_bf16_cl", "zoo_kd_cached_mem")
    if not math.isnan(cached):
        td, top_k = ips("gpu_bf16_cl", "torchdistill"), runs["gpu_bf16_cl"]["config"].get("top_k", "k")
        rows.append(
            f"| bf16-mixed + channels-last, cached soft labels (in memory, top-{top_k}) | {cached:.0f} | {td:.0f} "
            f"| — | {f(ips('gpu_bf16_cl', 'student'))} | {cached / zoo_fp32:.2f} | {cached / td:.2f} "
            f"| {cached / td_fp32:.2f} | "
            f"{mb('gpu_bf16_cl', 'zoo_kd_cached_mem')} | — |"
        )
    td_all = [x for run in runs.values() for x in run["variants"]["torchdistill"]["images_per_sec"]]
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
    lines = [
        intro,
        "",
        header,
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    table = "\n".join(lines)
    (RESULTS / "throughput_gpu.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
