#!/bin/bash
# Thirty-seventh session, call 3 (any GPU): the INT4 Gluon kernel's words through a TMA ring.
# 1. the ring's tests (bit for bit against the register path) with the fragment tests beside;
# 2. the sweep of warps x chunks x stages per Llama-3.1-8B shape at one token;
# 3. batch-1 INT4 g128 through EngineCore: committed, then the sweep's fastest per shape,
#    alternating while the call has time. Carry .cache/serve312b (pytest-xdist).
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
git apply benchmarks/issue12_thirty_seventh_session/int4_tma_ring_not_kept.patch || exit 1
export PYTHONPATH=.:$PWD/${SERVE_PKGS:-.cache/serve312b}
timeout 170 python3 -m pytest -m gpu -q -n 12 -p no:cacheprovider -x \
    tests/plugins/test_quant_linear_triton.py -k "fragment" > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/gpu_tests.txt"
tail -3 "$OUT/gpu_tests.txt"
d=benchmarks/issue12_thirty_seventh_session
timeout 200 python3 $d/int4_tma.py --out "$OUT/sweep" --ms 1 --warps 2,4,8 --chunks 1,2,4 \
    --stages 3,6 > "$OUT/sweep.log" 2>&1
grep "@\|rror" "$OUT/sweep.log" | head -20
for round in 1 2; do
    (( SECONDS > ${LIMIT_S:-440} )) && break
    timeout 100 python3 $d/int4_tma.py --out "$OUT/committed$round" --timeline committed \
        > "$OUT/committed$round.log" 2>&1
    cp -r "$OUT/sweep" "$OUT/best$round"
    timeout 100 python3 $d/int4_tma.py --out "$OUT/best$round" --timeline best \
        > "$OUT/best$round.log" 2>&1
    rm -f "$OUT"/*/batch1_trace*.json* "$OUT"/best*/int4_tma.json
    grep -h "^int4\|^timeline" "$OUT/committed$round.log" "$OUT/best$round.log" | cut -c1-200
done
