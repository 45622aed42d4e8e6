#!/bin/bash
# Fortieth session, call 1 (any GPU; the batch-1 figures are the issue's on an H200): the INT4
# Gluon kernel with its activations in shared memory (SMEM_X) and its words and scales two
# iterations ahead (DEPTH), from int4_smemx_not_kept.patch.
# 1. the new tests (bit for bit against the default config at 1, 3 and 8 tokens, silu * up
#    fused too; the refusals) beside the fragment kernels' tests;
# 2. the sweep per Llama-3.1-8B shape at one token (int4_smemx.py);
# 3. batch-1 INT4 g128 through EngineCore: the committed kernel and the sweep's fastest per
#    shape, alternating, one line a run; no run starts after LIMIT_S seconds (default 480;
#    each run at most 90 s, so ask the device for 600).
# Carry .cache/serve312b (pytest-xdist).
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
git apply benchmarks/issue12_fortieth_session/int4_smemx_not_kept.patch || exit 1
export PYTHONPATH=.:$PWD/${SERVE_PKGS:-.cache/serve312b}
workers="-n 8"
python3 -c "import xdist" 2> /dev/null || workers=""  # without the carried packages: serial
timeout 150 python3 -m pytest -m gpu -q $workers -p no:cacheprovider \
    tests/plugins/test_quant_linear_triton.py -k "fragment" > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$? after ${SECONDS}s" >> "$OUT/gpu_tests.txt"
tail -3 "$OUT/gpu_tests.txt"
grep "^FAILED\|^ERROR" "$OUT/gpu_tests.txt" | head -5 | cut -c1-200
d=benchmarks/issue12_fortieth_session
timeout 170 python3 $d/int4_smemx.py --out "$OUT/sweep" --ms 1 > "$OUT/sweep.log" 2>&1
echo "sweep rc=$? after ${SECONDS}s"
grep "@" "$OUT/sweep.log"
echo "outputs not bit-equal: $(grep -c '"equal": false' "$OUT/sweep.log")," \
    "configs failed: $(grep -c '"error"' "$OUT/sweep.log")"
grep '"error"' "$OUT/sweep.log" | head -3 | cut -c1-240
# the sweep's fastest may be the committed config on every shape: then there is nothing to
# time (the first call timed the same kernel 40 times)
python3 -c "import json, sys; b = json.load(open(sys.argv[1]))['best']; sys.exit(all(
    v['best'][0] == v['committed'][0] for v in b.values()))" "$OUT/sweep/int4_smemx.json" \
    || { echo "the committed configs are the fastest: no timeline"; exit 0; }
run=0
failed=0
while (( SECONDS < ${LIMIT_S:-480} )); do
    run=$((run + 1))
    which=committed
    if (( run % 2 == 0 )); then
        [[ -f "$OUT/sweep/int4_smemx.json" ]] || continue
        which=best
    fi
    out="$OUT/$which$run"
    mkdir -p "$out"
    [[ $which == best ]] && cp "$OUT/sweep/int4_smemx.json" "$out/"
    timeout 90 python3 $d/int4_smemx.py --out "$out" --timeline $which > "$out.log" 2>&1
    rc=$?
    (( rc != 0 )) && failed=$((failed + 1))
    rm -f "$out"/batch1_trace*.json*
    (( run == 2 )) && grep -h "^timeline with" "$out.log" | cut -c1-200
    echo "run $run $which rc=$rc at ${SECONDS}s: $(grep -h '^int4_wo' "$out.log" | cut -c1-170)"
    (( failed >= 2 )) && { tail -5 "$out.log" | cut -c1-240; break; }
done
