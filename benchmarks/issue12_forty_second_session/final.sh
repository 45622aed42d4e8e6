#!/bin/bash
# Forty-second session, last call: on an H200 first pending check 18 (batch-1 INT4 g128, HEAD /
# the tree before the words' evict_first / HEAD: issue12_thirty_ninth_session/ab_short.sh,
# LIMIT_S 200); on any GPU then the GPU tests of the session's serve and runtime changes
# (tests/gpu tests/runtime tests/serve tests/builder -m gpu). Carry .cache/serve312b and
# .cache/base38.
set -u
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    LIMIT_S=200 bash benchmarks/issue12_thirty_ninth_session/ab_short.sh
else
    nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader \
        | tee "$OUT/gpu.txt"
fi
PYTHONPATH=.:$PWD/.cache/serve312b timeout ${TESTS_S:-300} python3 -m pytest -m gpu -q -n 16 \
    -p no:cacheprovider tests/gpu tests/runtime tests/serve tests/builder \
    > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$? after ${SECONDS}s" >> "$OUT/gpu_tests.txt"
tail -3 "$OUT/gpu_tests.txt"
grep "^FAILED\|^ERROR" "$OUT/gpu_tests.txt" | head -10 | cut -c1-240
