#!/bin/bash
# Forty-first session, first call. On an H200 (the INT4 row's goal machine, pending check 18):
# the fortieth session's combined.sh (HEAD / before the words' evict_first / HEAD, then the
# GPU suite). On any other card: the whole GPU suite on this tree only.
# Carry .cache/serve312b and .cache/base38.
set -u
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    exec bash benchmarks/issue12_fortieth_session/combined.sh
fi
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONPATH=.:$PWD/.cache/serve312b
timeout $(( ${LIMIT_S:-585} - SECONDS )) python3 -m pytest -m gpu -q -n 16 -p no:cacheprovider \
    tests/gpu tests/builder tests/quantization tests/runtime tests/plugins tests/serve \
    > "$OUT/gpu_suite.txt" 2>&1
echo "suite rc=$?" >> "$OUT/gpu_suite.txt"
tail -12 "$OUT/gpu_suite.txt"
