#!/bin/bash
# Forty-first session: pending check 18 on an H200 only (the INT4 row's goal machine):
# batch-1 INT4 g128 through EngineCore, HEAD / .cache/base38 (before the words' evict_first) /
# HEAD, as the thirty-ninth session's ab_short.sh. Any other card: exit 3 at once.
# Carry .cache/base38.
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || { nvidia-smi -L; exit 3; }
exec bash benchmarks/issue12_thirty_ninth_session/ab_short.sh
