#!/usr/bin/env bash
# Latency the hop adds at a fixed offered rate, open loop (latency counts from the intended send
# time, so queueing shows): `sidecar loadtest --rate R --compare DIRECT` sends the same bodies to
# the sidecar and straight to the canned upstream, interleaved, and prints both and the ratios.
#
#   usage: benchmarks/latency.sh               knobs: RATE (default 1000), DUR (default 60s)
. "$(dirname "$0")/common.sh"
need nginx taskset
start_upstream
taskset -c 1 "$SIDECAR" serve --upstream http://127.0.0.1:18001 --host 127.0.0.1 --port "$PORT" \
  --metrics-port "$((PORT + 1))" --log-level warning ${SIDECAR_ARGS:---preset kserve-v1 --model-name iris} & pids+=($!)
wait_port 18001; wait_port "$PORT"
taskset -c 0 "$SIDECAR" loadtest http://127.0.0.1:$PORT --compare http://127.0.0.1:18001 \
  --rate "${RATE:-1000}" --duration "${DUR:-60s}" --quiet "$@"
