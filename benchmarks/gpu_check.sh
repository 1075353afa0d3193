#!/usr/bin/env bash
# One-shot GPU check: every verdict a GPU must give, in one run of <= 5 minutes (H100/H200).
#
#   bash benchmarks/gpu_check.sh OUT_DIR              # on a CUDA machine
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run    # CPU, tiny shapes, Triton interpreter
#   PREFIX_RFT_DRY_RUN=1 bash benchmarks/gpu_check.sh OUT_DIR
#
# Every stage runs under its own `timeout` inside a total budget (GPU_CHECK_BUDGET seconds,
# default 300); a failed or timed-out stage never stops the next, and every measuring script
# appends each row to its CSV the moment it is measured, so a timeout loses one row at most.
# Statuses go to OUT_DIR/stages.tsv, each stage's output to OUT_DIR/NAME.log; the summary is
# written last whatever happened before (and needs nothing beyond the standard library).
#   install      this checkout's prefix_rft (+ kernels/) copied into OUT_DIR/site; no pip, no
#                network (a copy of the tree without .git works: PREFIX_RFT_COMMIT names it)
#   env          GPU, SMs, clocks, torch/CUDA/cuBLAS/triton versions, TF32 flags, dX path
#   floor        N=8192, H=4096, V=151936 bf16: x@W.T, bare GEMMs, floor8, split fwd / bwd
#                (dz, dX, dW, rest) / fwd+bwd, atomic, Liger, naive   -> kernels.csv
#   correctness  vs a chunked fp64 reference at that shape; determinism; split vs atomic;
#                ignored rows; N=16384 (N*V > 2^31) on 512 sampled rows -> correctness.csv
#   dz_sweep     dz tile candidates: ms + the real JIT's registers / spills / shared memory
#   fused_head   benchmarks/gpu_fused_head.py when the checkout has it -> kernels.csv
#   train_step   Qwen2.5-Math-1.5B shape, one packed 8k-token micro-batch per preset, beside
#                `prefix-rft plan`'s figures for that config           -> train_step.csv
#   tests        the kernel tests on CUDA, with whatever time is left
#   summary      verdict, ratios, PASS/FAIL, planner terms             -> summary.md
set -u
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
DRY=${PREFIX_RFT_DRY_RUN:-0}
[ "${2:-}" = "--dry-run" ] && DRY=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PREFIX_RFT_COMMIT=${PREFIX_RFT_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null \
    || echo "unknown (no .git)")}
export TRITON_DEFAULT_FP_FUSION=1
DRYFLAG=""
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DRYFLAG="--dry-run"
fi
BUDGET=${GPU_CHECK_BUDGET:-300}
SLOW=1  # the dry run's limits are 4x looser: shared CPU machines, the Triton interpreter
[ "$DRY" = 1 ] && BUDGET=${GPU_CHECK_BUDGET:-1200} && SLOW=4
T0=$(date +%s)
printf "stage\tstatus\tseconds\n" > "$OUT/stages.tsv"

stage() {  # stage NAME LIMIT_SECONDS CMD...: run from OUT_DIR under min(limit, budget left)
    local name=$1 limit=$(( $2 * SLOW )) start rc left status=ok
    shift 2
    left=$(( BUDGET - ($(date +%s) - T0) - ${RESERVE:-15} ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        printf "%s\t%s\t0\n" "$name" "skipped (budget spent)" >> "$OUT/stages.tsv"
        echo "== $name: skipped, budget spent"
        return
    fi
    start=$(date +%s)
    echo "== $name (limit ${limit}s)"
    (cd "$OUT" && timeout --kill-after=5 "$limit" "$@") > "$OUT/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timeout"
    elif [ $rc -ne 0 ]; then status="failed (exit $rc)"; fi
    printf "%s\t%s\t%s\n" "$name" "$status" "$(( $(date +%s) - start ))" >> "$OUT/stages.tsv"
    echo "   $status; last lines of $name.log:"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

B="$REPO/benchmarks"
install() {  # a copy, not pip: no build backend, no network, no setuptools version to need
    rm -rf "$OUT/site" && mkdir -p "$OUT/site" \
        && cp -R "$REPO/prefix_rft" "$OUT/site/prefix_rft" \
        && rm -rf "$OUT/site/prefix_rft/kernels" \
        && cp -R "$REPO/kernels" "$OUT/site/prefix_rft/kernels" \
        && cd /tmp && PYTHONPATH="$OUT/site" "$PY" -c \
           "import prefix_rft.kernels as k; print('prefix_rft.kernels from', k.__file__)"
}
stage install 20 bash -c "$(declare -f install); PY='$PY' OUT='$OUT' REPO='$REPO' install"
export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
stage env 20 "$PY" "$B/gpu_env.py" "$OUT" $DRYFLAG

stage floor 100 "$PY" "$B/gpu_floor.py" --out-dir "$OUT" $DRYFLAG
stage correctness 60 "$PY" "$B/gpu_correctness.py" --out-dir "$OUT" $DRYFLAG
stage dz_sweep 45 "$PY" "$B/gpu_dz_sweep.py" --out-dir "$OUT" $DRYFLAG
if [ -f "$B/gpu_fused_head.py" ]; then
    stage fused_head 30 "$PY" "$B/gpu_fused_head.py" --out-dir "$OUT" $DRYFLAG
fi
stage train_step 60 "$PY" "$B/gpu_train_step.py" --out-dir "$OUT" $DRYFLAG
# Kernel tests last: whatever time is left (the summary keeps its reserve).
if [ "$DRY" = 1 ]; then
    stage tests 300 "$PY" -m pytest -q -p no:cacheprovider -x "$REPO/tests/test_triton_configs.py" \
        "$REPO/tests/test_kernels_triton_split.py" -k "optimal or fills or rejects"
else
    stage tests 300 "$PY" -m pytest -q -p no:cacheprovider "$REPO/tests/test_kernels_triton_split.py" \
        "$REPO/tests/test_kernels_triton.py" "$REPO/tests/test_kernels_torch.py"
fi
RESERVE=0 stage summary 15 "$PY" "$B/gpu_summary.py" "$OUT"
echo "== done in $(( $(date +%s) - T0 ))s: $OUT/summary.md"
cat "$OUT/summary.md" 2>/dev/null
exit 0
