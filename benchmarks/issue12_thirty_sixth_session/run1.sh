#!/bin/bash
# Thirty-sixth session, first call: the thirty-fourth session's run1.sh as it is. On an H200,
# pending check 11 (the batch-1 rows, HEAD against ae6bb29 in .cache/base30) and INT4 with the
# head in INT4; on any other GPU, the whole GPU suite. Carry .cache/base30 and .cache/serve312b.
exec bash benchmarks/issue12_thirty_fourth_session/run1.sh
