#!/bin/bash
# Forty-third session, first call: the GEMVs' weight rows first out of the caches
# (row_tile_evict_first.patch: the bf16, FP8 and INT8 GEMVs' weight loads
# `ld.global.L1::evict_first.L2::cache_hint`, as the INT4 kernel's words since the thirty-eighth
# session; compiled for sm_90a they were plain `ld.global.v4.b32`, no cp.async). Batch-1
# through EngineCore, HEAD (.) against the patched tree (.cache/evict43), alternating, two
# rounds; INT4 on HEAD in round 1 (pending check 18 on an H200; the patch does not touch it);
# INT8 weight-only once each where time is left. Carry .cache/evict43.
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
tl=benchmarks/issue12_tenth_pass/batch1_timeline.py
timeline() {  # tree, name, formats
    (( SECONDS > ${LIMIT_S:-480} )) && { echo "$2 skipped at ${SECONDS}s"; return; }
    (cd "$1" && PYTHONPATH=. timeout 200 python3 $tl --formats "$3" --out "$OUT/$2") \
        > "$OUT/$2.log" 2>&1
    rm -f "$OUT"/*/batch1_trace*.json*
    grep -h '^int4\|^fp8\|^bf16\|^int8' "$OUT/$2.log" | cut -c1-110 | sed "s/^/$2 /"
    echo "$2 done at ${SECONDS}s"
}
timeline . head1 fp8,bf16,int4_wo
timeline .cache/evict43 new1 fp8,bf16
timeline . head2 fp8,bf16
timeline .cache/evict43 new2 fp8,bf16
timeline .cache/evict43 new3 int8_wo
timeline . head3 int8_wo
