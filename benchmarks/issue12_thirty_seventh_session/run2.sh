#!/bin/bash
# Thirty-seventh session, call 2 (an H100: ncu's counters): where the INT4 Gluon kernel's
# time goes at one token, gate_up (silu * up fused) and down, committed configs.
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONPATH=.
d=benchmarks/issue12_thirty_seventh_session
for shape in gate_up down; do
    timeout 240 ncu --clock-control none -k regex:_int4_fragments_kernel --launch-skip 2 \
        --launch-count 1 --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section LaunchStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section SpeedOfLight --section SourceCounters --print-details all \
        python3 $d/int4_ncu.py --shapes $shape > "$OUT/ncu_$shape.txt" 2>&1
    echo "$shape rc=$?"
    grep -E "Duration|Throughput|Warp Cycles Per Issued|Issued Warp|Active Warps Per|Registers Per|Achieved Occupancy|Theoretical Occupancy|Stall" "$OUT/ncu_$shape.txt" | head -40
done
