#!/usr/bin/env bash
# One prepared GPU run (H100/H200 class): ResNet-34 → ResNet-18 KD at 224 on ImageNet-shaped synthetic batches
# (batch 256, 1000 classes), distill-zoo (Lightning) in fp32, bf16-mixed, bf16-mixed + channels-last, and
# bf16-mixed + channels-last + compiled teacher, next to torchdistill (fp32, its own DistillationBox), a
# hand-written loop and the student alone, all in the same run on the same card. Prints one table and writes
# benchmarks/results/throughput_gpu.md (+ the per-setting throughput_kd_gpu_*.json/md), with the card's name.
#
# Preparation (on a machine with pip access, from the repository root), for packages the GPU image lacks
# (torchdistill; jsonargparse[signatures], which Lightning's CLI module imports when it is installed):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl torchdistill==1.1.5 jsonargparse==4.53.0 docstring_parser==0.18.0 \
#     typeshed_client==2.15.0
# Then (device tool): run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=560).
# Sized for a 15-minute device lease: each setting 3 rounds × 20 timed steps after 10 warm-up steps (cuDNN
# autotuning happens there); peak memory is measured for fp32 and bf16 + channels-last only. Settings run in order
# of importance and, where $OUT is set (the device tool), each finished one is copied there at once, so a run cut
# short still returns what it finished. ONLY=fp32,bf16_cl bash benchmarks/gpu.sh runs only the settings named.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
# DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh: a dry run of the whole script on a CPU with tiny sizes (checks the
# plumbing only; its numbers mean nothing).
if [ "${QUICK:-0}" = 1 ]; then SIZES=(--batch 4 --rounds 1 --steps 1 --warmup 1); NOMEM=(--no-memory); else
  SIZES=(--batch 256 --rounds 3 --steps 20 --warmup 10); NOMEM=(); fi
COMMON=(--preset imagenet --device "${DEVICE:-cuda}" "${SIZES[@]}")
save() {  # copy what is finished to the device tool's $OUT (one archive: its file count is limited)
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu_results.tgz" benchmarks/results/throughput_kd_gpu_* \
    $(ls benchmarks/results/throughput_gpu.md 2>/dev/null); fi
}
setting() {  # setting TAG ARGS...: one throughput_kd.py run, skipped when ONLY (comma-separated tags) leaves it out
  local tag=$1; shift
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$tag,"* ]]; then return; fi
  python3 benchmarks/throughput_kd.py "${COMMON[@]}" "$@" --tag "gpu_$tag"; save
}
# The test suite's CUDA-only checks (skipped on the CPU-only CI machine; a few seconds): ONLY=checks runs them alone.
if [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",checks,"* ]]; then
  python3 -m pytest -q -p no:cacheprovider -k "gpu or cuda" tests/dataset_distillation/test_augment.py 2>&1 | tail -3 \
    || echo "GPU checks: failed or pytest unavailable (see above)"
fi
setting fp32 "${NOMEM[@]}" --precision fp32 --variants zoo_kd torchdistill loop_kd student
setting bf16_cl "${NOMEM[@]}" --precision bf16-mixed --channels-last \
  --variants zoo_kd torchdistill loop_kd student zoo_kd_cached_mem
setting bf16 --no-memory --precision bf16-mixed --variants zoo_kd torchdistill loop_kd
setting bf16_cl_compiled --no-memory --precision bf16-mixed --channels-last --compile-teacher \
  --variants zoo_kd torchdistill
python3 benchmarks/gpu_table.py
save
