#!/bin/bash
# Pending check 11 (GPU_NOTES): the batch-1 rows with the greedy pass in the decode graphs
# (HEAD) against ae6bb29 (.cache/base30, before it), alternating, two rounds, on one machine;
# then the GPU tests on HEAD. On a machine that is not an H200 the timings are skipped (the
# H100 figures exist, run2 of the thirty-first session) and the GPU suite runs instead.
set -u
gpu=$(nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader)
echo "$gpu" | tee "$OUT/gpu.txt"
timeline() {  # tree, out dir, formats
    (cd "$1" && PYTHONPATH=. python3 benchmarks/issue12_tenth_pass/batch1_timeline.py \
        --formats "$3" --out "$2") >> "$OUT/timeline.log" 2>&1
}
tests="tests/gpu tests/builder tests/quantization tests/runtime"
suite_s=330
if [[ $gpu == *H200* ]]; then
    for round in 1 2; do
        timeline . "$OUT/head$round" fp8,int4_wo
        timeline .cache/base30 "$OUT/base$round" fp8,int4_wo
    done
    timeline . "$OUT/bf16" bf16
    rm -f "$OUT"/*/batch1_trace*.json*
else
    tests="${H100_TESTS:-$tests tests/plugins}"
    suite_s=540
    [[ $tests == none ]] && exit 0  # a call that came for the H200's timings alone
fi
[[ ${SUITE:-} == none ]] && exit 0  # the timings alone (on an H200)
export PYTHONPATH=.:$PWD/${SERVE_PKGS:-.cache/serve312}
timeout "$suite_s" python3 -m pytest -m gpu -q -n 16 -p no:cacheprovider $tests \
    > "$OUT/gpu_suite.txt" 2>&1
echo "suite rc=$?" >> "$OUT/gpu_suite.txt"
