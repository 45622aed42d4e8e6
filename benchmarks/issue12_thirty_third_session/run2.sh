#!/bin/bash
# Thirty-third session, call 2 (any GPU): the INT4 Gluon kernel two iterations ahead (not kept:
# run after `git apply benchmarks/issue12_thirty_third_session/int4_depth_not_kept.patch`).
# 1. its tests (bit for bit against one ahead; the fragment kernels' tests beside them);
# 2. the one-token sweep of (warps, chunks, depth) per Llama-3.1-8B shape;
# 3. batch-1 INT4 g128 through EngineCore: the committed configs, then the sweep's fastest,
#    alternating while the call has time.
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONPATH=.:$PWD/${SERVE_PKGS:-.cache/serve312b}  # pytest-xdist
timeout 200 python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider \
    tests/plugins/test_quant_linear_triton.py tests/plugins/test_gemv_epilogue_triton.py \
    -k "fragment" > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/gpu_tests.txt"
tail -2 "$OUT/gpu_tests.txt"
d=benchmarks/issue12_thirty_third_session
timeout 200 python3 $d/int4_depth.py --out "$OUT/sweep" --ms 1 --warps 2,4,8 --chunks 1,2,4 \
    > "$OUT/sweep.log" 2>&1
grep "@1" "$OUT/sweep.log"
for round in 1 2; do
    (( SECONDS > 420 )) && break
    timeout 120 python3 benchmarks/issue12_tenth_pass/batch1_timeline.py --formats int4_wo \
        --out "$OUT/committed$round" > "$OUT/committed$round.log" 2>&1
    cp -r "$OUT/sweep" "$OUT/best$round"
    timeout 120 python3 $d/int4_depth.py --out "$OUT/best$round" --timeline best \
        > "$OUT/best$round.log" 2>&1
    rm -f "$OUT"/*/batch1_trace*.json*
    grep -h "^int4\|^timeline" "$OUT/committed$round.log" "$OUT/best$round.log" | cut -c1-160
done
