#!/bin/bash
# Thirty-eighth session, call 3 (any GPU): the INT4 Gluon kernel's words first out of the caches
# (L1::evict_first, kept from run 2) as committed, against the tree before it in .cache/base38.
# 1. the fragment tests, the fused silu * up against the unfused kernel, the INT4 engines
#    against the oracle;
# 2. batch-1 INT4 g128 through EngineCore: HEAD, then .cache/base38, alternating while the
#    call has time. Carry .cache/base38 and .cache/serve312b (pytest-xdist).
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONPATH=.:$PWD/${SERVE_PKGS:-.cache/serve312b}
timeout 130 python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider \
    tests/plugins/test_quant_linear_triton.py tests/plugins/test_gemv_epilogue_triton.py \
    tests/gpu/test_quantized_torch_gpu.py -k "fragment or int4" > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/gpu_tests.txt"
tail -3 "$OUT/gpu_tests.txt"
tl=benchmarks/issue12_tenth_pass/batch1_timeline.py
for round in 1 2; do
    (( SECONDS > ${LIMIT_S:-250} )) && break
    timeout 90 python3 $tl --formats int4_wo --out "$OUT/head$round" > "$OUT/head$round.log" 2>&1
    (cd .cache/base38 && PYTHONPATH=. timeout 90 python3 $tl --formats int4_wo \
        --out "$OUT/base$round" > "$OUT/base$round.log" 2>&1)
    rm -f "$OUT"/*/batch1_trace*.json*
    grep -h "^int4" "$OUT/head$round.log" "$OUT/base$round.log" | cut -c1-120
done
