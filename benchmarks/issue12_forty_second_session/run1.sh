#!/bin/bash
# Forty-second session, call 1 (any Hopper GPU): the persistent warp-specialized INT4 kernel
# (int4_ws.py). 1. the sweep per Llama-3.1-8B shape at 1 and 8 tokens, every output compared
# bit for bit with the committed kernel at the same (W, U); 2. where a config beat the committed
# kernel at one token, batch-1 INT4 g128 through EngineCore, committed and best alternating,
# until LIMIT_S seconds (default 500). Carry .cache/serve312b.
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONPATH=.:$PWD/${SERVE_PKGS:-.cache/serve312b}
d=benchmarks/issue12_forty_second_session
timeout ${SWEEP_S:-260} python3 $d/int4_ws.py --out "$OUT/sweep" --ms ${MS:-1,8} \
    ${CONFIGS:+--configs $CONFIGS} > "$OUT/sweep.log" 2>&1
echo "sweep rc=$? after ${SECONDS}s"
grep -v '^{' "$OUT/sweep.log" | grep -v "^\s*$" | tail -25 | cut -c1-300
python3 - "$OUT/sweep.log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for r in rows:
    if "error" in r:
        print(r["shape"], r["m"], r["config"], r["error"][:160])
    else:
        print(r["shape"], r["m"], r["config"], r["us"], r["tbps"], r.get("equal", ""),
              r.get("max_diff", ""))
PY
[[ -f "$OUT/sweep/int4_ws.json" ]] || exit 0
python3 -c "import json, sys; b = json.load(open(sys.argv[1]))['best']; sys.exit(not any(
    'best' in v and v['best'][1] < v['committed'] for v in b.values()))" \
    "$OUT/sweep/int4_ws.json" || { echo "no config beat the committed kernel"; exit 0; }
run=0
failed=0
while (( SECONDS < ${LIMIT_S:-500} )); do
    run=$((run + 1))
    which=committed
    (( run % 2 == 0 )) && which=best
    out="$OUT/$which$run"
    mkdir -p "$out"
    [[ $which == best ]] && cp "$OUT/sweep/int4_ws.json" "$out/"
    timeout 100 python3 $d/int4_ws.py --out "$out" --timeline $which > "$out.log" 2>&1
    rc=$?
    (( rc != 0 )) && failed=$((failed + 1))
    rm -f "$out"/batch1_trace*.json*
    (( run == 2 )) && grep -h "^timeline with" "$out.log" | cut -c1-200
    echo "run $run $which rc=$rc at ${SECONDS}s: $(grep -h '^int4_wo' "$out.log" | cut -c1-170)"
    (( failed >= 2 )) && { tail -5 "$out.log" | cut -c1-240; break; }
done
