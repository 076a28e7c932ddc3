#!/usr/bin/env bash
# The prediction log's cost and throughput (docs/ground-truth.md: "What the log costs the proxy"
# and "PostgreSQL"). First the PostgreSQL store alone: ROWS rows (default 1,000,000; 0 skips it)
# written in batches of BATCH (500), and a join of 10,000 labels against them. Then sidecars
# pinned to CPU 1 under wrk (C connections, default 32, for DUR, default 10s) against the canned
# nginx iris model, with `feedback.store` a SQLite file, a PostgreSQL database, or none: ROUNDS
# rounds (3; 0 skips them), each with a run of every store alone (the issue's measure, 1 core /
# requests a second, and the sidecar's CPU time per request) and, side by side on CPU 1, a
# sidecar with each store beside one without (C/2 connections each): the same neighbours at the
# same time, so their CPU ratio holds still on a noisy machine. Prints each run, then the medians,
# logged rows a second and rows dropped. PostgreSQL is a throwaway cluster on CPU 0 (Debian's
# postgresql package, as in the tests) unless PG_URL names a scratch database.
#
#   usage: benchmarks/prediction_log.sh        knobs: ROWS, BATCH, DUR, C, ROUNDS, PG_URL
PORT=${PORT:-18045}  # not common.sh's 18005: the other benchmarks may be running
. "$(dirname "$0")/common.sh"
need nginx wrk taskset
start_upstream
wait_port 18001
ROWS=${ROWS:-1000000} BATCH=${BATCH:-500} DUR=${DUR:-10s} C=${C:-32} ROUNDS=${ROUNDS:-3} \
  PORT=$PORT SIDECAR=$SIDECAR "$PY" "$BENCH/prediction_log.py"
