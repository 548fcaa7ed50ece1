#!/usr/bin/env bash
# The whole GPU cycle in one device call, from the repository root:
#   check (kernel vs reference), optional config sweep, kernel benchmark, decode benchmark.
# Usage (device tool):  bash benchmarks/gpu_cycle.sh [quick|full|sweep]
# Writes JSON and logs under $OUT (or benchmarks/results/ when OUT is unset) and prints tables last.
set -uo pipefail
MODE=${1:-full}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
rc=0
if [ "$MODE" = quick ] || [ "$MODE" = sweep ]; then
    python3 benchmarks/check_w4a16_gpu.py --quick --json "$OUT/check-h100.json" > "$OUT/check.log" 2>&1 || rc=1
else
    python3 benchmarks/check_w4a16_gpu.py --json "$OUT/check-h100.json" > "$OUT/check.log" 2>&1 || rc=1
fi
tail -8 "$OUT/check.log"
if [ "$MODE" = sweep ]; then
    python3 benchmarks/bench_w4a16.py --sweep --json "$OUT/sweep-h100.json" 2>&1 > "$OUT/sweep.log" 2>&1 || rc=1; grep -A2 "best:" "$OUT/sweep.log"
else
    python3 benchmarks/bench_w4a16.py --json "$OUT/w4a16-h100.json" > "$OUT/bench.log" 2>&1 || rc=1
    python3 benchmarks/bench_decode.py --json "$OUT/decode-h100.json" 2>&1 | tee "$OUT/decode.log" || rc=1
    sed -n '/^model shape/,$p' "$OUT/bench.log"
fi
exit $rc
