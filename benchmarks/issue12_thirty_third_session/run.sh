#!/bin/bash
# Thirty-third session, one call on any GPU:
# 1. the quantized-engine GPU tests, the quantized lm_head's new cases among them;
# 2. batch-1 INT4 g128 through EngineCore with the lm_head in bf16 (the issue's row) and in INT4
#    (--quantize_lm_head, as torchao's peer quantizes every Linear), one process, twice.
set -u
gpu=$(nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader)
echo "$gpu" | tee "$OUT/gpu.txt"
export PYTHONPATH=.:$PWD/${SERVE_PKGS:-.cache/serve312b}  # pytest-xdist
timeout 240 python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider \
    tests/gpu/test_quantized_torch_gpu.py > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/gpu_tests.txt"
tail -3 "$OUT/gpu_tests.txt"
for round in 1 2; do
    timeout 200 python3 benchmarks/issue12_tenth_pass/batch1_timeline.py \
        --formats int4_wo,int4_wo_head --out "$OUT/head$round" >> "$OUT/timeline.log" 2>&1
done
rm -f "$OUT"/*/batch1_trace*.json*
grep -h "^int4\|^fp8\|^bf16" "$OUT/timeline.log" | cut -c1-200
