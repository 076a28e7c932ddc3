#!/usr/bin/env bash
# Throughput, one run side by side (../shared/bench/run.sh): direct, nginx proxy_pass, the naive
# aiohttp proxy and the sidecar with the kserve-v1 preset on post.lua's iris traffic, one worker
# pinned to CPU 1. Then the same with `--workers 2` on both cores (this machine has two: wrk and
# the canned upstream share them, so the two-worker figure is a floor).
#
#   usage: benchmarks/throughput.sh            knobs: DUR (default 8s), C (connections, 32)
. "$(dirname "$0")/common.sh"
need nginx wrk taskset
ARGS="serve --upstream http://127.0.0.1:18001 --host 127.0.0.1 --port 18005 --metrics-port 18006 --log-level warning --preset kserve-v1 --model-name iris"
echo "== one worker, pinned to CPU 1 (side by side with the baselines)"
PY=$PY SIDECAR_CMD="$SIDECAR $ARGS" bash "$BENCH/run.sh"
echo
echo "== proxy only (no preset), one worker"
PY=$PY SIDECAR_CMD="$SIDECAR ${ARGS% --preset*}" bash "$BENCH/run.sh" | grep -E "^sidecar|naive-aiohttp |nginx-proxy"
echo
echo "== --workers 1 vs --workers 2, unpinned, same upstream and wrk (CPU 0)"
start_upstream
for workers in 1 2; do
  "$SIDECAR" $ARGS --workers "$workers" & sc=$!
  wait_port 18005; sleep 2
  taskset -c 0 wrk -t1 -c8 -d1s -s "$BENCH/post.lua" http://127.0.0.1:18005/v1/models/iris:predict >/dev/null
  rps=$(taskset -c 0 wrk -t1 -c"${C:-32}" -d"${DUR:-8s}" -s "$BENCH/post.lua" \
    http://127.0.0.1:18005/v1/models/iris:predict | awk '/Requests\/sec/ {print $2}')
  echo "workers=$workers rps=$rps"
  kill "$sc"; wait "$sc" 2>/dev/null
done
