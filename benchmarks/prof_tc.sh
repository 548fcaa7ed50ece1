NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
cd benchmarks
timeout 150 $NCU --clock-control none -k regex:_tc_kernel -s 2 -c 1 --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section MemoryWorkloadAnalysis python3 profile_w4a16.py --k 4096 --n 28672 --m 16 --config "TcConfig(block_m=16, block_w=32, block_k=64, num_warps=2, num_stages=3, scale_in_a=False)" > $OUT/ncu16.log 2>&1
grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Stall|Warp Cycles Per Issued|Issued Ipc|Eligible Warps|Grid Size|Waves Per|Block Limit|L2 Hit|L1/TEX Hit|Shared Memory Configuration Size|Dynamic Shared" $OUT/ncu16.log | sed 's/  */ /g' | head -40
timeout 400 python3 tc_explore.py --no-check --fine --ms 16 --shapes 7B:w13 7B:wo --json $OUT/tc3.json 2>&1 | grep -v skip | tail -12
