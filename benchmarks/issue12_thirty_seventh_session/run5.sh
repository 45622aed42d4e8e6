#!/bin/bash
# Thirty-seventh session, call 5 (any GPU; the least the device time left allows): the TMA
# ring applied (int4_tma_ring_not_kept.patch), its tests, and the sweep on gate_up (silu * up)
# and down at one token. Carry .cache/serve312b.
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
d=benchmarks/issue12_thirty_seventh_session
git apply $d/int4_tma_ring_not_kept.patch || exit 1
export PYTHONPATH=.:$PWD/${SERVE_PKGS:-.cache/serve312b}
timeout 80 python3 -m pytest -m gpu -q -n 12 -p no:cacheprovider -x \
    tests/plugins/test_quant_linear_triton.py -k "ring" > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/gpu_tests.txt"
tail -3 "$OUT/gpu_tests.txt"
timeout 90 python3 $d/int4_tma.py --out "$OUT/sweep" --ms 1 --shapes gate_up,down \
    --warps 2,4 --chunks 1,2 --stages 4 > "$OUT/sweep.log" 2>&1
grep "@\|rror" "$OUT/sweep.log" | head -20
