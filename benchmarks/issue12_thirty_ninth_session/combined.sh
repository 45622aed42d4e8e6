#!/bin/bash
# Thirty-ninth session, one call (any GPU): pending check 17 in the time one call has.
# 1. batch-1 INT4 g128 through EngineCore: this tree, then .cache/base38 (01071f6, before the
#    words' evict_first), one round each (the A/B of run3.sh);
# 2. the whole GPU suite on this tree (it holds run3.sh's fragment and engine tests), in the
#    time left. Carry .cache/serve312b and .cache/base38.
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONPATH=.:$PWD/${SERVE_PKGS:-.cache/serve312b}
tl=benchmarks/issue12_tenth_pass/batch1_timeline.py
timeout 100 python3 $tl --formats int4_wo --out "$OUT/head1" > "$OUT/head1.log" 2>&1
(cd .cache/base38 && PYTHONPATH=. timeout 100 python3 $tl --formats int4_wo \
    --out "$OUT/base1" > "$OUT/base1.log" 2>&1)
rm -f "$OUT"/*/batch1_trace*.json*
grep -h "^int4" "$OUT/head1.log" "$OUT/base1.log" | cut -c1-120
left=$(( ${LIMIT_S:-585} - SECONDS ))
echo "suite gets ${left} s"
timeout $left python3 -m pytest -m gpu -q -n 16 -p no:cacheprovider \
    tests/gpu tests/builder tests/quantization tests/runtime tests/plugins tests/serve \
    > "$OUT/gpu_suite.txt" 2>&1
echo "suite rc=$?" >> "$OUT/gpu_suite.txt"
tail -12 "$OUT/gpu_suite.txt"
