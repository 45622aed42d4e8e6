#!/bin/bash
# Forty-third session, second call: the FP8 GEMV's configs in the graph with the weight rows
# first out of the caches (fp8_configs.py, 240 s at most), then the GPU tests of the engine,
# runtime, serve and builder (tests/gpu tests/runtime tests/serve tests/builder -m gpu) on HEAD.
# Carry .cache/serve312b.
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
PYTHONPATH=. timeout 300 python3 benchmarks/issue12_forty_third_session/fp8_configs.py \
    --out "$OUT" --limit_s ${SWEEP_S:-240} > "$OUT/sweep.log" 2>&1
grep -v Warning "$OUT/sweep.log" | grep -v "^ " | tail -25
PYTHONPATH=.:$PWD/.cache/serve312b timeout ${TESTS_S:-200} python3 -m pytest -m gpu -q -n 16 \
    -p no:cacheprovider ${TESTS:-tests/gpu tests/runtime tests/serve tests/builder} \
    > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$? after ${SECONDS}s" >> "$OUT/gpu_tests.txt"
tail -3 "$OUT/gpu_tests.txt"
grep "^FAILED\|^ERROR" "$OUT/gpu_tests.txt" | head -10 | cut -c1-240
