#!/bin/bash
# Forty-fourth session: the batch-1 rows on an H200, the goals' machine (pending checks 18 and
# 19): HEAD's FP8, INT4 g128, bf16 and INT8 weight-only through EngineCore, the INT4 row of the
# tree before the words' evict_first (.cache/base38), then HEAD's FP8 and INT4 again. On any
# other GPU it only names the GPU (the H100 figures are in the forty-third session's notes).
# Carry .cache/base38.
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
grep -q H200 "$OUT/gpu.txt" || { echo "not an H200: nothing run"; exit 0; }
tl=benchmarks/issue12_tenth_pass/batch1_timeline.py
timeline() {  # tree, name, formats
    (( SECONDS > ${LIMIT_S:-420} )) && { echo "$2 skipped at ${SECONDS}s"; return; }
    (cd "$1" && PYTHONPATH=. timeout 200 python3 $tl --formats "$3" --out "$OUT/$2") \
        > "$OUT/$2.log" 2>&1
    rm -f "$OUT"/*/batch1_trace*.json*
    grep -h '^int4\|^fp8\|^bf16\|^int8' "$OUT/$2.log" | cut -c1-110 | sed "s/^/$2 /"
    echo "$2 done at ${SECONDS}s"
}
timeline . head1 fp8,int4_wo,bf16,int8_wo
timeline .cache/base38 base1 int4_wo
timeline . head2 fp8,int4_wo
