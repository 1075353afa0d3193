#!/usr/bin/env bash
# One-shot GPU check: turn a short GPU window (<= 8 minutes on one H100/H200) into numbers.
#
#   bash benchmarks/gpu_check.sh OUT_DIR              # on a CUDA machine
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run    # CPU, tiny shapes, Triton interpreter
#   PREFIX_RFT_DRY_RUN=1 bash benchmarks/gpu_check.sh OUT_DIR
#
# Stages, each under `timeout` (the GPU-mode limits add up to 480 s); a failed stage never
# stops the next (statuses in OUT_DIR/stages.tsv, each stage's output in OUT_DIR/NAME.log):
#   env          device, torch/triton versions, commit, date              -> env.txt
#   install      pip install --no-deps of this checkout into OUT_DIR/site (used by every
#                later stage through PYTHONPATH; nothing global is touched)
#   tests        kernel tests on CUDA (bf16 included), from OUT_DIR so the installed copy runs
#   correctness  both Triton backwards vs an fp32 reference, N=2048, V=151936, H=1536/4096
#   kernels      side-by-side benchmark: bare lm_head GEMMs, naive, torch-chunked, triton
#                split / atomic, Liger FLCE and Cut Cross-Entropy when installed; fwd and
#                fwd+bwd (and bwd); ms and peak MiB                      -> kernels.{csv,md,png}
#   train_step   one Qwen2.5-1.5B-shaped update step, fused vs full logits -> train_step.*
#   summary      ratios against the goals + stage statuses              -> summary.md
set -u
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
DRY=${PREFIX_RFT_DRY_RUN:-0}
[ "${2:-}" = "--dry-run" ] && DRY=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PREFIX_RFT_COMMIT=${PREFIX_RFT_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}
export TRITON_DEFAULT_FP_FUSION=1
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""; fi
printf "stage\tstatus\tseconds\n" > "$OUT/stages.tsv"

stage() {  # stage NAME LIMIT_SECONDS CMD...: run from OUT_DIR, log to OUT_DIR/NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s)"
    (cd "$OUT" && timeout --kill-after=10 "$limit" "$@") > "$OUT/$name.log" 2>&1
    rc=$?
    local status=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="timeout"
    [ $rc -ne 0 ] && [ "$status" = ok ] && status="failed (exit $rc)"
    printf "%s\t%s\t%s\n" "$name" "$status" "$(( $(date +%s) - start ))" >> "$OUT/stages.tsv"
    echo "   $status; last lines of $name.log:"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

SLOW=1; [ "$DRY" = 1 ] && SLOW=3  # the dry run's limits are loose: CPU machines are shared
stage env $((30 * SLOW)) "$PY" "$REPO/benchmarks/gpu_summary.py" --env "$OUT"
install() {  # no build isolation first (a GPU box may be offline), then with it
    "$PY" -m pip install --no-deps --no-build-isolation --no-input -q --upgrade \
        --target "$OUT/site" "$REPO" \
    || "$PY" -m pip install --no-deps --no-input -q --upgrade --target "$OUT/site" "$REPO"
}
stage install $((60 * SLOW)) bash -c "$(declare -f install); PY='$PY' OUT='$OUT' REPO='$REPO' install"
export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"

B="$REPO/benchmarks"
if [ "$DRY" = 1 ]; then
    stage tests 120 "$PY" -m pytest -q -p no:cacheprovider "$REPO/tests/test_triton_configs.py" \
        "$REPO/tests/test_kernels_triton_split.py" -k "optimal or fills or rejects"
    stage correctness 120 "$PY" "$B/gpu_correctness.py" --out-dir "$OUT" --dry-run
    stage kernels 180 "$PY" "$B/kernels.py" --smoke --shapes 20,16,130 --modes fwd+bwd \
        --warmup 0 --reps 1 --csv "$OUT/kernels.csv"
    stage train_step 120 "$PY" "$B/train_step.py" --smoke --out "$OUT/train_step.csv"
else
    stage tests 80 "$PY" -m pytest -q -p no:cacheprovider "$REPO/tests/test_kernels_triton.py" \
        "$REPO/tests/test_kernels_triton_split.py" "$REPO/tests/test_kernels_torch.py"
    stage correctness 60 "$PY" "$B/gpu_correctness.py" --out-dir "$OUT"
    stage kernels 140 "$PY" "$B/kernels.py" --csv "$OUT/kernels.csv"
    stage train_step 90 "$PY" "$B/train_step.py" --gpu --tokens 8192 --repeats 2 \
        --out "$OUT/train_step.csv"
fi
stage summary $((20 * SLOW)) "$PY" "$B/gpu_summary.py" "$OUT"
echo "== done: $OUT/summary.md"
cat "$OUT/summary.md" 2>/dev/null
exit 0
