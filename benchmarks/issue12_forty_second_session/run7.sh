#!/bin/bash
# Forty-second session, call 7 (any Hopper GPU): the thirty-seventh session's TMA ring in
# one-warp programs (int4_fold.py --ring: no barrier but the warp's), one token, every output
# bit for bit the register kernel's at the same (W, U); where a ring config beat the committed
# kernel, batch-1 INT4 g128 through EngineCore, committed and ring alternating, until LIMIT_S
# (default 300). Carry .cache/serve312b.
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONPATH=.:$PWD/${SERVE_PKGS:-.cache/serve312b}
d=benchmarks/issue12_forty_second_session
timeout ${SWEEP_S:-150} python3 $d/int4_fold.py --out "$OUT/sweep" \
    --ring ${RING:-1x2x4,1x2x8,1x2x12,1x4x4,1x4x8,2x2x8,2x1x8} > "$OUT/sweep.log" 2>&1
echo "sweep rc=$? after ${SECONDS}s"
grep -v '^{' "$OUT/sweep.log" | grep -v "^\s*$" | tail -5 | cut -c1-300
python3 - "$OUT/sweep.log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
best = {}
for r in rows:
    print(r["shape"], r["config"], r.get("us", ""), r.get("tbps", ""), r.get("equal", ""),
          r.get("error", "")[:200])
    if "us" in r and r["config"].count("x") == 2 and r["equal"]:
        if r["us"] < best.get(r["shape"], ("", 1e9))[1]:
            best[r["shape"]] = (r["config"], r["us"])
base = {r["shape"]: r["us"] for r in rows if r["config"] == "committed" and "us" in r}
win = [f"{s}={c}" for s, (c, us) in best.items() if us < base.get(s, 0)]
print("ring wins:", win)
open(sys.argv[1] + ".win", "w").write(",".join(win))
PY
win=$(cat "$OUT/sweep.log.win" 2>/dev/null)
[[ -n "$win" ]] || { echo "no ring config beat the committed kernel"; exit 0; }
run=0
while (( SECONDS < ${LIMIT_S:-300} )); do
    run=$((run + 1))
    which=committed
    (( run % 2 == 0 )) && which="ring:$win"
    out="$OUT/run$run"
    timeout 100 python3 $d/int4_fold.py --out "$out" --timeline "$which" > "$out.log" 2>&1
    echo "run $run $which rc=$? at ${SECONDS}s: $(grep -h '^int4_wo' "$out.log" | cut -c1-150)"
    rm -rf "$out"
done
