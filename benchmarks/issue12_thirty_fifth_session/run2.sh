#!/bin/bash
# Thirty-fifth session, second call: the new multi-row graph test against HF (every variant,
# float32) with the rest of tests/gpu/test_torch_vs_hf.py; on an H200 first, pending check 11's
# batch-1 rows (HEAD against ae6bb29 in .cache/base30, alternating, two rounds; bf16 once).
set -u
gpu=$(nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader)
echo "$gpu" | tee "$OUT/gpu.txt"
if [[ $gpu == *H200* ]]; then
    SUITE=none bash benchmarks/issue12_thirty_second_session/check11.sh
    grep -h "^int4\|^fp8\|^bf16" "$OUT/timeline.log" | cut -c1-200
fi
timeout 240 python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider tests/gpu/test_torch_vs_hf.py \
    > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/gpu_tests.txt"
tail -15 "$OUT/gpu_tests.txt"
