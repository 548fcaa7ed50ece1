#!/usr/bin/env bash
# The whole GPU cycle in one device call, from the repository root:
#   check (kernels vs reference), kernel benchmark, decode benchmark; or a config sweep.
# Usage (device tool):  bash benchmarks/gpu_cycle.sh [full|check|bench|quick|sweep|profile|all] [sweep Ms...]
#   check: quick checks of both layouts (the K-packed kernels the plugin runs on CUDA, and the AWQ ones)
#   bench: kernel benchmark + decode benchmark;  full: check + bench (about 9 minutes)
#   File names end in the card's name (w4a16-h100.json, w4a16-h200.json, ...).
#   quick/sweep/all/profile: the AWQ-layout check, then benchmarks and/or the AWQ-layout config sweep
# Writes JSON and logs under $OUT (or benchmarks/results/ when OUT is unset) and prints tables last.
set -uo pipefail
MODE=${1:-full}
shift || true
SWEEP_MS="$*"
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
# file names carry the card: h100, h200, ... (from the CUDA device name, e.g. "NVIDIA H200")
TAG=$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[1].lower())' 2>/dev/null || echo gpu)
rc=0
if [ "$MODE" = profile ]; then
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    for spec in "4096 28672 1 _gemv_kernel" "4096 4096 1 _gemv_kernel" "4096 28672 16 _gemm_kernel"; do
        set -- $spec
        echo "== ncu K=$1 N=$2 M=$3 $4"
        timeout 150 "$NCU" --clock-control none -k "regex:$4" -s 2 -c 1 --section SpeedOfLight --section Occupancy \
            --section WarpStateStats --section LaunchStats python3 benchmarks/profile_w4a16.py --k "$1" --n "$2" --m "$3" \
            > "$OUT/ncu-$3-$2.log" 2>&1
        grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Stall Long|Stall Wait|Stall Math|Stall Not Sel|Stall Short|Warp Cycles Per Issued|Issued Ipc|Eligible Warps|Grid Size|Waves Per" "$OUT/ncu-$3-$2.log" | sed 's/  */ /g' | head -24
    done
    MODE=sweep
fi
if [ "$MODE" = check ] || [ "$MODE" = full ]; then
    python3 benchmarks/pk_explore.py --quick-check --defaults-only --ms 1 --shapes 7B:wo \
        --json "$OUT/pk-check-${TAG}.json" > "$OUT/pk-check.log" 2>&1 || rc=1
    grep -E "^check|FAIL" "$OUT/pk-check.log" | tail -8
    python3 benchmarks/check_w4a16_gpu.py --quick --json "$OUT/check-${TAG}.json" > "$OUT/check.log" 2>&1 || rc=1
    tail -6 "$OUT/check.log"
    [ "$MODE" = check ] && exit $rc
    MODE=bench
fi
if [ "$MODE" = bench ]; then
    python3 benchmarks/bench_w4a16.py --json "$OUT/w4a16-${TAG}.json" > "$OUT/bench.log" 2>&1 || rc=1
    python3 benchmarks/bench_decode.py --json "$OUT/decode-${TAG}.json" 2>&1 | tee "$OUT/decode.log" || rc=1
    sed -n '/^model shape/,$p' "$OUT/bench.log"
    exit $rc
fi
if [ "$MODE" = quick ] || [ "$MODE" = sweep ] || [ "$MODE" = all ]; then
    python3 benchmarks/check_w4a16_gpu.py --quick --json "$OUT/check-${TAG}.json" > "$OUT/check.log" 2>&1 || rc=1
else
    python3 benchmarks/check_w4a16_gpu.py --json "$OUT/check-${TAG}.json" > "$OUT/check.log" 2>&1 || rc=1
fi
tail -6 "$OUT/check.log"
if [ "$MODE" = all ]; then
    python3 benchmarks/bench_w4a16.py --json "$OUT/w4a16-${TAG}.json" > "$OUT/bench.log" 2>&1 || rc=1
    python3 benchmarks/bench_decode.py --json "$OUT/decode-${TAG}.json" > "$OUT/decode.log" 2>&1 || rc=1
    MODE=sweep
fi
if [ "$MODE" = sweep ]; then
    python3 benchmarks/bench_w4a16.py --sweep ${SWEEP_MS:+--sweep-ms $SWEEP_MS} --json "$OUT/sweep-${TAG}.json" > "$OUT/sweep.log" 2>&1 || rc=1
    grep -A2 "best:" "$OUT/sweep.log"
    [ -f "$OUT/decode.log" ] && cat "$OUT/decode.log"
    [ -f "$OUT/bench.log" ] && sed -n '/^model shape/,$p' "$OUT/bench.log"
else
    python3 benchmarks/bench_w4a16.py --json "$OUT/w4a16-${TAG}.json" > "$OUT/bench.log" 2>&1 || rc=1
    python3 benchmarks/bench_decode.py --json "$OUT/decode-${TAG}.json" 2>&1 | tee "$OUT/decode.log" || rc=1
    sed -n '/^model shape/,$p' "$OUT/bench.log"
fi
exit $rc
