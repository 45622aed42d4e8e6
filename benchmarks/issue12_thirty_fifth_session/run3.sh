#!/bin/bash
# Thirty-fifth session, a call for pending check 11 alone: on an H200, the batch-1 rows (HEAD
# against ae6bb29 in .cache/base30, alternating, two rounds; bf16 once); on any other GPU,
# nothing (the GPU suite ran this session, run1 and run2).
set -u
gpu=$(nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader)
echo "$gpu" | tee "$OUT/gpu.txt"
[[ $gpu == *H200* ]] || exit 0
SUITE=none bash benchmarks/issue12_thirty_second_session/check11.sh
grep -h "^int4\|^fp8\|^bf16" "$OUT/timeline.log" | cut -c1-200
