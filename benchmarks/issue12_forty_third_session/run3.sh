#!/bin/bash
# Forty-third session: the whole GPU suite on HEAD (the GEMVs' rows evict_first, the replicas'
# outboxes), then, in the time left, fp8_configs.py (the FP8 GEMV's configs in the graph).
# TESTS: the test dirs (default the whole GPU suite); CALL_S=0: no sweep. Carry
# .cache/serve312b.
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
PYTHONPATH=.:$PWD/.cache/serve312b timeout ${TESTS_S:-420} python3 -m pytest -m gpu -q -n 16 \
    -p no:cacheprovider ${TESTS:-tests/gpu tests/builder tests/quantization tests/runtime \
    tests/plugins tests/serve} > "$OUT/gpu_suite.txt" 2>&1
echo "suite rc=$? after ${SECONDS}s" >> "$OUT/gpu_suite.txt"
tail -3 "$OUT/gpu_suite.txt"
grep "^FAILED\|^ERROR" "$OUT/gpu_suite.txt" | head -10 | cut -c1-240
left=$(( ${CALL_S:-585} - SECONDS - 45 ))
if (( left > 40 )); then
    PYTHONPATH=. timeout $(( left + 40 )) python3 \
        benchmarks/issue12_forty_third_session/fp8_configs.py --out "$OUT" --limit_s $left \
        > "$OUT/sweep.log" 2>&1
    grep -v Warning "$OUT/sweep.log" | grep -v "^ " | tail -25
fi
