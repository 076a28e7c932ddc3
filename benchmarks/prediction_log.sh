#!/usr/bin/env bash
# The PostgreSQL prediction log's throughput (docs/ground-truth.md, "PostgreSQL"): ROWS rows
# (default 1,000,000) written through the store alone in batches of BATCH (500), with a join of
# 10,000 labels against them; then a sidecar with `feedback.store: postgresql://…` pinned to CPU 1
# under wrk (C connections, default 32, for DUR, default 10s) against the canned nginx iris model:
# the logged rows per second, and whether any was dropped. PostgreSQL is a throwaway cluster
# (Debian's postgresql package, as in the tests) unless PG_URL names a scratch database.
#
#   usage: benchmarks/prediction_log.sh        knobs: ROWS, BATCH, DUR, C, PG_URL
PORT=${PORT:-18045}  # not common.sh's 18005: the other benchmarks may be running
. "$(dirname "$0")/common.sh"
need nginx wrk taskset
start_upstream
wait_port 18001
ROWS=${ROWS:-1000000} BATCH=${BATCH:-500} DUR=${DUR:-10s} C=${C:-32} PORT=$PORT \
  SIDECAR=$SIDECAR "$PY" "$BENCH/prediction_log.py"
