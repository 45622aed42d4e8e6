#!/bin/bash
# Fortieth session, one call (an H200 wanted: the INT4 row's goal machine).
# 1. batch-1 INT4 g128 through EngineCore: HEAD, .cache/base38 (01071f6, before the words'
#    evict_first), HEAD again (the order of ab_short.sh);
# 2. the whole GPU suite on this tree in the time left (the commits after 94085a0 were tested
#    on the CPU only). Carry .cache/serve312b and .cache/base38.
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONPATH=.:$PWD/${SERVE_PKGS:-.cache/serve312b}
tl=benchmarks/issue12_tenth_pass/batch1_timeline.py
for run in head1 base1 head2; do
    if [[ $run == base* ]]; then
        (cd .cache/base38 && PYTHONPATH=. timeout 90 python3 $tl --formats int4_wo \
            --out "$OUT/$run" > "$OUT/$run.log" 2>&1)
    else
        timeout 90 python3 $tl --formats int4_wo --out "$OUT/$run" > "$OUT/$run.log" 2>&1
    fi
    rm -f "$OUT"/*/batch1_trace*.json*
    echo "$run $(grep -h '^int4' "$OUT/$run.log" | cut -c1-110)"
done
left=$(( ${LIMIT_S:-585} - SECONDS ))
echo "suite gets ${left} s"
timeout $left python3 -m pytest -m gpu -q -n 16 -p no:cacheprovider \
    tests/gpu tests/builder tests/quantization tests/runtime tests/plugins tests/serve \
    > "$OUT/gpu_suite.txt" 2>&1
echo "suite rc=$?" >> "$OUT/gpu_suite.txt"
tail -12 "$OUT/gpu_suite.txt"
