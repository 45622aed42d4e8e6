#!/bin/bash
# Thirty-ninth session, a short call for an H200 (the INT4 row's goal machine): batch-1 INT4
# g128 through EngineCore, HEAD, the tree before the words' evict_first (.cache/base38), HEAD.
# Carry .cache/base38.
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONPATH=.
tl=benchmarks/issue12_tenth_pass/batch1_timeline.py
for run in head1 base1 head2; do
    (( SECONDS > ${LIMIT_S:-200} )) && break
    if [[ $run == base* ]]; then
        (cd .cache/base38 && timeout 90 python3 $tl --formats int4_wo --out "$OUT/$run" \
            > "$OUT/$run.log" 2>&1)
    else
        timeout 90 python3 $tl --formats int4_wo --out "$OUT/$run" > "$OUT/$run.log" 2>&1
    fi
    rm -f "$OUT"/*/batch1_trace*.json*
    echo "$run $(grep -h '^int4' "$OUT/$run.log" | cut -c1-100)"
done
