#!/bin/bash
# Forty-second session, call 6 (any Hopper GPU): the INT4 kernel's conversion bias folded into
# its MMAs (int4_fold.py). 1. the sweep (committed, the probe kernel as committed, FOLD, and both
# with the words from L2), errors against float64; 2. where FOLD beat the committed kernel on
# gate_up at one token, batch-1 INT4 g128 through EngineCore, committed and fold alternating,
# until LIMIT_S seconds (default 480). Carry .cache/serve312b.
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONPATH=.:$PWD/${SERVE_PKGS:-.cache/serve312b}
d=benchmarks/issue12_forty_second_session
timeout ${SWEEP_S:-200} python3 $d/int4_fold.py --out "$OUT/sweep" --ms ${MS:-1,8,64} \
    > "$OUT/sweep.log" 2>&1
echo "sweep rc=$? after ${SECONDS}s"
grep -v '^{' "$OUT/sweep.log" | grep -v "^\s*$" | tail -8 | cut -c1-300
python3 - "$OUT/sweep.log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for r in rows:
    if "error" in r:
        print(r["shape"], r["m"], r["config"], r["error"][:200])
    else:
        print(r["shape"], r["m"], r["config"], r["us"], r["tbps"], "equal", r["equal"],
              r["differ"], "err %.2e base %.2e" % (r["max_err_rel"], r["base_err_rel"]))
best = {(r["shape"], r["config"]): r["us"] for r in rows if r.get("m") == 1 and "us" in r}
win = best.get(("gate_up", "fold"), 1e9) < best.get(("gate_up", "committed"), 0)
open(sys.argv[1] + ".win", "w").write("1" if win else "0")
PY
[[ "$(cat "$OUT/sweep.log.win" 2>/dev/null)" == 1 ]] || { echo "fold did not win"; exit 0; }
run=0
while (( SECONDS < ${LIMIT_S:-480} )); do
    run=$((run + 1))
    which=committed
    (( run % 2 == 0 )) && which=fold
    out="$OUT/$which$run"
    timeout 100 python3 $d/int4_fold.py --out "$out" --timeline $which > "$out.log" 2>&1
    echo "run $run $which rc=$? at ${SECONDS}s: $(grep -h '^int4_wo' "$out.log" | cut -c1-170)"
    rm -f "$out"/batch1_trace*.json*
done
