#!/bin/bash
# Thirty-fourth session, a shorter call for what device time is left. On an H200: check 11's
# FP8 row (the goal row 3 tok/s short), HEAD against ae6bb29 (.cache/base30), alternating,
# then INT4. Elsewhere: the new GPU test of kiln serve and the GPU tests of the engine paths
# this session touched, within ${LIMIT_S:-240} s.
set -u
gpu=$(nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader)
echo "$gpu" | tee "$OUT/gpu.txt"
timeline() {  # tree, out dir, formats
    (cd "$1" && PYTHONPATH=. timeout 150 python3 benchmarks/issue12_tenth_pass/batch1_timeline.py \
        --formats "$3" --out "$2") >> "$OUT/timeline.log" 2>&1
}
if [[ $gpu == *H200* ]]; then
    timeline . "$OUT/head1" fp8
    timeline .cache/base30 "$OUT/base1" fp8
    timeline . "$OUT/head2" fp8,int4_wo
    rm -f "$OUT"/*/batch1_trace*.json*
    grep -h "^int4\|^fp8\|^bf16" "$OUT/timeline.log" | cut -c1-200
    exit 0
fi
export PYTHONPATH=.:$PWD/.cache/serve312b
timeout "${LIMIT_S:-240}" python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider \
    tests/gpu/test_serve_gpu.py tests/gpu/test_quantized_torch_gpu.py \
    tests/gpu/test_llm_threads_gpu.py tests/gpu/test_smollm2_greedy.py \
    > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/gpu_tests.txt"
tail -15 "$OUT/gpu_tests.txt"
