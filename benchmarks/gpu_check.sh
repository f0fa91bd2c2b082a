#!/usr/bin/env bash
# Every check of pipefold that needs a CUDA GPU, as one prepared run for a session lent one GPU
# (an H100 or H200 for ~15 minutes in all, reached through a tool that copies the working tree
# there and runs one command; nothing is installed there: its python3 holds torch, rich, numpy,
# matplotlib, pytest).
#
#     OUT=/tmp/gpu bash benchmarks/gpu_check.sh            # ~5 min on an H100 (estimate: not yet run)
#     OUT=/tmp/gpu bash benchmarks/gpu_check.sh --quick    # ~2.5 min: shorter profile, 2 memory configurations
#
# Steps, each under its own time limit so one that hangs leaves the others their time (the limits
# add up to 550 s, inside the device tool's 600 s a command: give it timeout_s 600):
#   1. the device, torch and driver;
#   2. the CUDA tests the CPU suite skips (tests/model/test_cuda.py, the allocator peak tracker);
#   3. every flush schedule at one rank on the GPU, exact against a CPU reference
#      (tests/runtime/_gpu_check.py: device placement, CUDA-event timing, activation counting);
#   4. `pipefold profile --hardware` measures the GPU (matmul curves per dtype, copy bandwidth) and
#      writes $OUT/gpu.toml; the links are the h100-80gb preset's (one GPU measures no link);
#   5. Megatron-LM's Figure 16 priced on the a100-80gb preset with that measured curve
#      (`benchmarks/paper.py --matmul-from`: the figure's trend hangs on the curve, docs/plan.md);
#   6. the update's temporaries (the gradient norm, AdamW foreach and single-tensor, fp32 and
#      bf16-pure) against the CUDA allocator's peak (`benchmarks/update_temporaries.py`: seconds);
#   7. the planner's memory model against the allocator's peaks of `pipefold train --device cuda`
#      (`benchmarks/planner_memory.py --device cuda`: one rank on one GPU, since NCCL refuses two
#      ranks on one device).
# Everything printed also goes to $OUT/gpu_check.log; the files under $OUT are at most 6 (the
# device tool brings back 8). The exit status is the number of steps that failed.
set -o pipefail
OUT=${OUT:-/tmp/pipefold-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
QUICK=""; BUDGET=60; MEMORY_FLAGS=()
if [[ "${1:-}" == "--quick" ]]; then QUICK=1; BUDGET=30; MEMORY_FLAGS=(--quick); fi
LOG="$OUT/gpu_check.log"
: > "$LOG"
failed=0

step() {  # step NAME SECONDS COMMAND...: run it under its limit, log it, count a failure
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit $status in $((SECONDS - start)) s" | tee -a "$LOG"
  if [[ $status -ne 0 ]]; then failed=$((failed + 1)); fi
}

step device 20 bash -c "nvidia-smi -L; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(), torch.cuda.device_count(), \"GPU(s)\"); assert torch.cuda.is_available()'"
step cuda-tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/model/test_cuda.py tests/test_allocator_peaks.py
step exact-on-gpu 80 "$PY" tests/runtime/_gpu_check.py
step hardware-profile $((BUDGET + 40)) "$PY" -m pipefold profile --hardware "$OUT/gpu.toml" --device cuda \
  --links-from h100-80gb --devices-per-node 8 --budget "$BUDGET"
if [[ -f "$OUT/gpu.toml" ]]; then
  step figure-16 30 bash -c "$PY benchmarks/paper.py --rows 1.7B --figures --matmul-from '$OUT/gpu.toml' \
    | sed -n '/Figure 16/,/Figure 17/p' | tee '$OUT/figure16.txt'"
fi
step update-temporaries 50 "$PY" benchmarks/update_temporaries.py --device cuda --shapes gpu
step planner-memory 210 "$PY" benchmarks/planner_memory.py --device cuda "${MEMORY_FLAGS[@]}" \
  --json "$OUT/planner_memory_cuda.json"
echo "== gpu_check: $failed step(s) failed${QUICK:+ (quick)}; files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
exit "$failed"
