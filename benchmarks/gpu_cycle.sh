#!/usr/bin/env bash
# The GPU cycle in one device call, from the repository root: check the kernels, then time them.
#   bash benchmarks/gpu_cycle.sh [full|check|quick|bench]
#     full   the whole check, then the kernel and decode benchmarks (default)
#     check  the whole check only;  quick  the quick check only
#     bench  the quick check, then the kernel and decode benchmarks
# (the check's Triton compilations land in Triton's cache: a bench after a check on the same warm
# machine compiles little)
# Results go to $OUT (or benchmarks/results/ when OUT is unset), named after the card (from the CUDA
# device name, e.g. "NVIDIA H200" -> h200): check-h200.json/.log, w4a16-h200.json + bench-h200.log,
# decode-h200.json/.log. Exit status 1 if the check fails or a benchmark errs.
# W4A16_BASELINE=DIR (a kernels/ copy, e.g. benchmarks/_base) times that copy beside this tree's in the
# kernel benchmark (bench_w4a16.py --baseline).
set -uo pipefail
MODE=${1:-full}
case "$MODE" in
    full | check) QUICK= ;;
    quick | bench) QUICK=--quick ;;
    *) echo "gpu_cycle.sh: unknown mode '$MODE' (full, check, quick or bench)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
TAG=$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[1].lower())' 2>/dev/null || echo gpu)
rc=0
NAME=check${QUICK:+-quick}-$TAG
# run LOG COMMAND...: the command's output to LOG; on failure rc=1 and LOG's tail shown
run() {
    local log=$1
    shift
    "$@" > "$log" 2>&1 || { rc=1; echo "== $* failed; the end of $log:"; tail -15 "$log"; }
}
python3 benchmarks/check_w4a16_gpu.py $QUICK --out "$OUT/$NAME.json" > "$OUT/$NAME.log" 2>&1 || rc=1
grep -E "^FAIL" "$OUT/$NAME.log" | head -20
grep -q " cases, " "$OUT/$NAME.log" && sed -n '/ cases, /,$p' "$OUT/$NAME.log" || tail -15 "$OUT/$NAME.log"
if [ "$MODE" = full ] || [ "$MODE" = bench ]; then
    run "$OUT/bench-$TAG.log" python3 benchmarks/bench_w4a16.py --out "$OUT/w4a16-$TAG.json" \
        ${W4A16_BASELINE:+--baseline "$W4A16_BASELINE"}
    run "$OUT/decode-$TAG.log" python3 benchmarks/bench_decode.py --out "$OUT/decode-$TAG.json"
    sed -n '/^model shape/,$p' "$OUT/bench-$TAG.log"
    cat "$OUT/decode-$TAG.log"
fi
exit $rc
