#!/bin/bash
# Thirty-eighth session, call 2 (any GPU; the batch-1 figures are the issue's on an H200): the
# INT4 Gluon kernel with its words loaded past L1 or first out of it (CACHE), with the
# activations in their own iteration (XJIT) and the words two ahead (DEPTH) or not.
# 1. the new test (bit for bit against the default config) beside the fragment kernels' tests;
# 2. the sweep per Llama-3.1-8B shape at one token (int4_xjit.py);
# 3. batch-1 INT4 g128 through EngineCore: the committed kernel, then the sweep's fastest per
#    shape, alternating while the call has time.
# Carry .cache/serve312b (pytest-xdist).
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
# the patch is against the kernel before run 2's CACHE 2 was kept
git checkout 01071f6 -- kiln/plugins/quant_linear tests/plugins/test_quant_linear_triton.py
git apply benchmarks/issue12_thirty_eighth_session/int4_xjit_not_kept.patch || exit 1
export PYTHONPATH=.:$PWD/${SERVE_PKGS:-.cache/serve312b}
timeout 170 python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider \
    tests/plugins/test_quant_linear_triton.py -k "fragment" > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/gpu_tests.txt"
tail -3 "$OUT/gpu_tests.txt"
d=benchmarks/issue12_thirty_eighth_session
timeout 170 python3 $d/int4_xjit.py --out "$OUT/sweep" --ms 1 --run 2 > "$OUT/sweep.log" 2>&1
grep "@" "$OUT/sweep.log"
grep -c '"equal": false' "$OUT/sweep.log"
for round in 1 2; do
    (( SECONDS > ${LIMIT_S:-430} )) && break
    timeout 100 python3 $d/int4_xjit.py --out "$OUT/committed$round" --timeline committed \
        > "$OUT/committed$round.log" 2>&1
    cp -r "$OUT/sweep" "$OUT/best$round"
    timeout 100 python3 $d/int4_xjit.py --out "$OUT/best$round" --timeline best \
        > "$OUT/best$round.log" 2>&1
    rm -f "$OUT"/*/batch1_trace*.json*
    grep -h "^int4\|^timeline" "$OUT/committed$round.log" "$OUT/best$round.log" | cut -c1-200
done
