#!/usr/bin/env bash
# Big JSON bodies and aborted uploads (benchmarks/big_bodies.py says what each case does): p50
# and p99 of one-row requests alone and while another client streams 5 to 10 MB bodies back to
# back (and the same through a sidecar without the preset, which parses nothing); peak RSS with
# 16 such bodies at once against baseline + 3 x bytes in flight; RSS after 2,000 aborted 1 MiB
# uploads and 30 s idle against the baseline. The sidecar runs on CPU 1 with the kserve-v1
# preset and the default max_body_bytes (10 MiB: every body is parsed), in front of a canned
# KServe V1 model on CPU 0. Loopback only; about 4 minutes.
#
#   usage: benchmarks/big_bodies.sh   knobs: SRC (sidecar sources to run, e.g. another worktree's
#                                      src; default this checkout), CASES ("latency relay peak
#                                      aborts"), RATE (one-row requests/s, 200), DUR (s per
#                                      latency run, 15), MODEL_US_PER_ROW (the model's time, 1),
#                                      ABORTS (2000), IDLE (s, 30), PORT, UPSTREAM_PORT (18011)
. "$(dirname "$0")/common.sh"
need taskset
export UPSTREAM_PORT=${UPSTREAM_PORT:-18011} PORT
PYTHONPATH=${SRC:-} taskset -c 0 "$PY" "$ROOT/benchmarks/big_bodies.py" \
  "$SIDECAR" serve --upstream "http://127.0.0.1:$UPSTREAM_PORT" --host 127.0.0.1 \
  --port "$PORT" --metrics-port "$((PORT + 1))" --log-level warning --preset kserve-v1 \
  --model-name iris
