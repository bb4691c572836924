#!/usr/bin/env bash
# One prepared GPU run (H100/H200 class). The first number it prints is the cached-soft-label step's gap to the
# student alone (ResNet-18, bf16-mixed + channels-last, one run: the host cost a step still adds). Then the
# segmentation steps (CWD and MGD on the VOC recipes' models at 512², bf16-mixed: zoo vs a hand-written loop, and
# the zoo's CWD step without its per-step divergence read, which is a CUDA sync; benchmarks/throughput_seg.py), and
# ResNet-34 → ResNet-18 KD at 224 on ImageNet-shaped synthetic batches (batch 256, 1000 classes), distill-zoo
# (Lightning) in fp32, bf16-mixed, bf16-mixed + channels-last, and bf16-mixed + channels-last + compiled teacher,
# next to torchdistill (fp32, its own DistillationBox), a hand-written loop and the student alone, all in the same
# run on the same card. Prints one table and writes benchmarks/results/throughput_gpu.md (+ the per-setting
# throughput_kd_gpu_*.json/md and throughput_seg_gpu.json/md), with the card's name.
#
# Preparation (on a machine with pip access, from the repository root), for packages the GPU image lacks
# (torchdistill; jsonargparse[signatures], which Lightning's CLI module imports when it is installed;
# segmentation_models_pytorch for the segmentation rows):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl torchdistill==1.1.5 jsonargparse==4.53.0 docstring_parser==0.18.0 \
#     typeshed_client==2.15.0 segmentation_models_pytorch==0.6.0
# Then (device tool): run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=560).
# Sized for a 15-minute device lease: each KD setting 3 rounds × 20 timed steps after 10 warm-up steps (cuDNN
# autotuning happens there; the segmentation steps 3 rounds × 10 after 5); peak memory is measured for fp32 and
# bf16 + channels-last only. Settings run in order of importance (gap, seg, checks, fp32, bf16_cl, bf16,
# bf16_cl_compiled) and, where $OUT is set (the device tool), each finished one is copied there at once, so a run cut
# short still returns what it finished. ONLY=fp32,bf16_cl bash benchmarks/gpu.sh runs only the settings named.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
# DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh: a dry run of the whole script on a CPU with tiny sizes (checks the
# plumbing only; its numbers mean nothing).
if [ "${QUICK:-0}" = 1 ]; then SIZES=(--batch 4 --rounds 1 --steps 1 --warmup 1); NOMEM=(--no-memory)
  SEG=(--preset voc --size 64 --batch-scale 0.25 --rounds 1 --steps 1 --warmup 1); else
  SIZES=(--batch 256 --rounds 3 --steps 20 --warmup 10); NOMEM=()
  SEG=(--preset voc --precision bf16-mixed --rounds 3 --steps 10 --warmup 5); fi
COMMON=(--preset imagenet --device "${DEVICE:-cuda}" "${SIZES[@]}")
save() {  # copy what is finished to the device tool's $OUT (one archive: its file count is limited)
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu_results.tgz" benchmarks/results/throughput_kd_gpu_* \
    $(ls benchmarks/results/throughput_seg_gpu.* benchmarks/results/throughput_gpu.md 2>/dev/null); fi
}
wanted() { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$1,"* ]]; }
setting() {  # setting TAG ARGS...: one throughput_kd.py run, skipped when ONLY (comma-separated tags) leaves it out
  local tag=$1; shift
  if ! wanted "$tag"; then return; fi
  python3 benchmarks/throughput_kd.py "${COMMON[@]}" "$@" --tag "gpu_$tag"; save
}
# First, quietly: the cached step and the student alone in one run (bf16-mixed + channels-last); one line, the gap.
if wanted gap; then
  if python3 benchmarks/throughput_kd.py "${COMMON[@]}" --no-memory --precision bf16-mixed --channels-last \
    --variants zoo_kd_cached_mem student --tag gpu_gap > /tmp/gpu_gap.log 2>&1; then
    python3 benchmarks/gpu_table.py --gap; save
  else tail -40 /tmp/gpu_gap.log; echo "cached-step gap: the run failed (above)"; fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
if wanted seg; then  # CWD and MGD, VOC recipes' models, zoo vs hand-written loop (and CWD without the loss read)
  python3 benchmarks/throughput_seg.py "${SEG[@]}" --device "${DEVICE:-cuda}" \
    --variants zoo_cwd loop_cwd zoo_mgd loop_mgd zoo_cwd_nocheck --tag gpu || echo "segmentation rows: failed (above)"
  save
fi
# The test suite's CUDA-only checks (skipped on the CPU-only CI machine; a few seconds): ONLY=checks runs them alone.
if [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",checks,"* ]]; then
  python3 -m pytest -q -p no:cacheprovider -k "gpu or cuda" tests/dataset_distillation/test_augment.py 2>&1 | tail -3 \
    || echo "GPU checks: failed or pytest unavailable (see above)"
fi
setting fp32 "${NOMEM[@]}" --precision fp32 --variants zoo_kd torchdistill loop_kd student
setting bf16_cl "${NOMEM[@]}" --precision bf16-mixed --channels-last \
  --variants zoo_kd torchdistill loop_kd student
setting bf16 --no-memory --precision bf16-mixed --variants zoo_kd torchdistill loop_kd
setting bf16_cl_compiled --no-memory --precision bf16-mixed --channels-last --compile-teacher \
  --variants zoo_kd torchdistill
python3 benchmarks/gpu_table.py
save
