#!/bin/bash
# A new user's GPU path on the device (no network, no SmolLM2 there): a tiny random Llama with
# a tokenizer, converted, built for the torch backend, run; then careless input: an edited
# engine config, a Ctrl-C mid-run, a wrong path. Output: $OUT/flow.txt
set -u
export PYTHONPATH=. KILN_CACHE_DIR=/tmp/kc
W=/tmp/flow; rm -rf $W; mkdir -p $W
k() { python3 -c 'import sys; from kiln.cli.main import run; sys.argv[0]="kiln"; run()' "$@"; }
{
python3 -c "from tests.models import hf_model_with_tokenizer as h; from pathlib import Path; h('llama-gqa', Path('$W/hf'))" && echo made
k convert_checkpoint --model_dir $W/hf --output_dir $W/ck; echo "convert rc=$?"
k build --checkpoint_dir $W/ck --output_dir $W/eng --backend torch --max_seq_len 64; echo "build rc=$?"
k run --engine_dir $W/eng --input_text "Hello there" --max_output_len 8; echo "run rc=$?"
k bench --engine_dir $W/eng --num_requests 4 --input_len 8 --output_len 8 2>&1 | tail -4; echo "bench rc=$?"
cp -r $W/eng $W/eng2; python3 - <<PY
import json; p='$W/eng2/config.json'; d=json.load(open(p)); d['limits']['max_batch_size']=1; json.dump(d, open(p,'w'))
PY
k run --engine_dir $W/eng2 --input_text "Hello" --max_output_len 4; echo "edited run rc=$?"
k run --engine_dir $W/engx --input_text "Hello"; echo "typo rc=$?"
bash -c "set -m; python3 -c 'import sys; from kiln.cli.main import run; sys.argv[0]=\"kiln\"; run()' run --engine_dir $W/eng --input_text hi --max_output_len 40 --ignore_eos & pid=\$!; sleep 6; s=\$(date +%s.%N); kill -INT \$pid; wait \$pid; echo \"ctrl-c rc=\$? after \$(python3 -c \"print(round(\$(date +%s.%N)-\$s,2))\") s\""
k verify $W/eng; echo "verify rc=$?"
} > $OUT/flow.txt 2>&1
