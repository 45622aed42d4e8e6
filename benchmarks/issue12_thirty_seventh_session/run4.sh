#!/bin/bash
# Thirty-seventh session, call 4 (any GPU; run3.sh cut to the device time left): the TMA
# ring's tests, the sweep on gate_up (silu * up) and down at one token, then batch-1 INT4 g128
# through EngineCore, committed against the sweep's fastest. Carry .cache/serve312b.
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
git apply benchmarks/issue12_thirty_seventh_session/int4_tma_ring_not_kept.patch || exit 1
export PYTHONPATH=.:$PWD/${SERVE_PKGS:-.cache/serve312b}
timeout 100 python3 -m pytest -m gpu -q -n 12 -p no:cacheprovider -x \
    tests/plugins/test_quant_linear_triton.py -k "ring or fragment_kernel_configs" \
    > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/gpu_tests.txt"
tail -3 "$OUT/gpu_tests.txt"
d=benchmarks/issue12_thirty_seventh_session
timeout 100 python3 $d/int4_tma.py --out "$OUT/sweep" --ms 1 --shapes gate_up,down \
    --warps 1,2,4 --chunks 1,2,4 --stages 4 > "$OUT/sweep.log" 2>&1
grep "@\|rror" "$OUT/sweep.log" | head -20
timeout 80 python3 $d/int4_tma.py --out "$OUT/committed" --timeline committed \
    > "$OUT/committed.log" 2>&1
cp -r "$OUT/sweep" "$OUT/best"
timeout 80 python3 $d/int4_tma.py --out "$OUT/best" --timeline best > "$OUT/best.log" 2>&1
rm -f "$OUT"/*/batch1_trace*.json* "$OUT"/best/int4_tma.json
grep -h "^int4\|^timeline" "$OUT/committed.log" "$OUT/best.log" | cut -c1-200
