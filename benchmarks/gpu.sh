#!/usr/bin/env bash
# One prepared GPU run (H100/H200 class): ResNet-34 → ResNet-18 KD at 224 on ImageNet-shaped synthetic batches
# (batch 256, 1000 classes), distill-zoo (Lightning) in fp32, bf16-mixed, bf16-mixed + channels-last, and
# bf16-mixed + channels-last + compiled teacher, next to torchdistill (fp32, its own DistillationBox), a
# hand-written loop and the student alone, all in the same run on the same card. Prints one table and writes
# benchmarks/results/throughput_gpu.md (+ the per-setting throughput_kd_gpu_*.json/md), with the card's name.
#
# Preparation (on a machine with pip access, from the repository root), for packages the GPU image lacks:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl torchdistill==1.1.5
# Then (device tool): run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600).
# About 6–8 minutes on an H100 (each setting: 5 rounds × 20 steps after 10 warm-up steps).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh: a dry run of the whole script on a CPU with tiny sizes (checks the
# plumbing only; its numbers mean nothing).
if [ "${QUICK:-0}" = 1 ]; then SIZES=(--batch 4 --rounds 1 --steps 1 --warmup 1 --no-memory); else SIZES=(--batch 256 --rounds 5 --steps 20 --warmup 10); fi
COMMON=(--preset imagenet --device "${DEVICE:-cuda}" "${SIZES[@]}")
python3 benchmarks/throughput_kd.py "${COMMON[@]}" --precision fp32 --variants zoo_kd torchdistill loop_kd student --tag gpu_fp32
python3 benchmarks/throughput_kd.py "${COMMON[@]}" --precision bf16-mixed --variants zoo_kd torchdistill loop_kd --tag gpu_bf16
python3 benchmarks/throughput_kd.py "${COMMON[@]}" --precision bf16-mixed --channels-last --variants zoo_kd torchdistill loop_kd student --tag gpu_bf16_cl
python3 benchmarks/throughput_kd.py "${COMMON[@]}" --precision bf16-mixed --channels-last --compile-teacher --variants zoo_kd torchdistill --tag gpu_bf16_cl_compiled
python3 - <<'PY'
import json
from pathlib import Path

results = Path("benchmarks/results")
settings = [("fp32", "gpu_fp32"), ("bf16-mixed", "gpu_bf16"), ("bf16-mixed + channels-last", "gpu_bf16_cl"),
            ("bf16-mixed + channels-last + compiled teacher", "gpu_bf16_cl_compiled")]
rows, card, base = [], None, None
for name, tag in settings:
    data = json.loads((results / f"throughput_kd_{tag}.json").read_text())
    card = data["machine"]
    v = {k: x["median_images_per_sec"] for k, x in data["variants"].items()}
    base = base or v["zoo_kd"]
    td = v.get("torchdistill")
    rows.append(f"| {name} | {v['zoo_kd']:.0f} | {td:.0f} | {v.get('loop_kd', float('nan')):.0f} | "
                f"{v.get('student', float('nan')):.0f} | {v['zoo_kd'] / base:.2f} | {v['zoo_kd'] / td:.2f} | "
                f"{max((x.get('peak_mb', float('nan')) for x in data['variants'].values()), default=float('nan')):.0f} |")
td_fp32 = json.loads((results / "throughput_kd_gpu_fp32.json").read_text())["variants"]["torchdistill"]["median_images_per_sec"]
table = "\n".join([
    f"ResNet-34 → ResNet-18 KD, 224², batch 256, synthetic ImageNet-shaped data; card: {card}; command: `bash benchmarks/gpu.sh`.",
    "torchdistill always runs its own fp32 step (it has no autocast in this path); images/s are medians of 5 rounds.",
    "",
    "| setting | zoo KD img/s | torchdistill img/s | hand loop img/s | student only img/s | zoo ÷ zoo fp32 | zoo ÷ torchdistill (same run) | peak MB (max) |",
    "|---|---|---|---|---|---|---|---|",
    *rows,
    "",
    f"Best zoo setting ÷ torchdistill fp32 (first run): {max(float(r.split('|')[2]) for r in rows) / td_fp32:.2f}.",
])
(results / "throughput_gpu.md").write_text(table + "\n")
print(table)
PY
