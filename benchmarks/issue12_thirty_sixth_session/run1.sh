#!/bin/bash
# Thirty-sixth session, first call. On an H200: pending check 11's batch-1 rows (HEAD against
# ae6bb29 in .cache/base30, alternating, two rounds; bf16 once) and INT4 with the lm_head in INT4
# as a labelled row. On any other GPU: the whole GPU suite (last run on c699213).
set -u
gpu=$(nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader)
echo "$gpu" | tee "$OUT/gpu.txt"
if [[ $gpu == *H200* ]]; then
    SUITE=none bash benchmarks/issue12_thirty_second_session/check11.sh
    (PYTHONPATH=. timeout 150 python3 benchmarks/issue12_tenth_pass/batch1_timeline.py \
        --formats int4_wo_head --out "$OUT/int4_head") >> "$OUT/timeline.log" 2>&1
    rm -f "$OUT"/*/batch1_trace*.json*
    grep -h "^int4\|^fp8\|^bf16" "$OUT/timeline.log" | cut -c1-200
    exit 0
fi
export PYTHONPATH=.:$PWD/.cache/serve312b
timeout 560 python3 -m pytest -m gpu -q -n 16 -p no:cacheprovider \
    tests/gpu tests/builder tests/quantization tests/runtime tests/plugins tests/serve \
    > "$OUT/gpu_suite.txt" 2>&1
echo "suite rc=$?" >> "$OUT/gpu_suite.txt"
tail -15 "$OUT/gpu_suite.txt"
