#!/usr/bin/env bash
# Side-by-side proxy benchmark: every proxy gets CPU 1 alone; the load generator (wrk) and the canned
# upstream share CPU 0. Prints requests/s and wrk's latency percentiles for each hop, then the ratios.
#
#   needs: nginx, wrk (apt-get install -y nginx wrk), and a Python with aiohttp uvloop
#          prometheus-client orjson (PY=/path/to/python, default python3)
#   usage: SIDECAR_CMD='sidecar serve --upstream http://127.0.0.1:18001 --port 18005 ...' ./side_by_side.sh
#   knobs: C (connections, default 32), DUR (default 8s), BODY (a .lua file setting wrk.body, default post.lua)
set -u
PY=${PY:-python3}
D=$(cd "$(dirname "$0")" && pwd)
mkdir -p /tmp/bench
C=${C:-32}; DUR=${DUR:-8s}; BODY=${BODY:-$D/post.lua}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
taskset -c 0 nginx -c "$D/nginx-upstream.conf" & pids+=($!)
taskset -c 1 nginx -c "$D/nginx-proxy.conf" & pids+=($!)
taskset -c 1 "$PY" "$D/naive_proxy.py" 18003 http://127.0.0.1:18001 & pids+=($!)
taskset -c 1 "$PY" "$D/naive_proxy.py" 18004 http://127.0.0.1:18001 --instrument & pids+=($!)
if [ -n "${SIDECAR_CMD:-}" ]; then taskset -c 1 bash -c "exec $SIDECAR_CMD" & pids+=($!); fi
sleep "${WAIT:-3}"
declare -A RPS
run() { # name port
  taskset -c 0 wrk -t1 -c4 -d1s -s "$BODY" "http://127.0.0.1:$2/v1/models/iris:predict" >/dev/null 2>&1
  local out rps p50 p99
  out=$(taskset -c 0 wrk -t1 -c"$C" -d"$DUR" --latency -s "$BODY" "http://127.0.0.1:$2/v1/models/iris:predict" 2>&1)
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  RPS[$1]=$rps
  printf "%-16s rps=%-10s p50=%-9s p99=%s\n" "$1" "$rps" "$p50" "$p99"
}
run direct 18001
run nginx-proxy 18002
run naive-aiohttp 18003
run naive+metrics 18004
if [ -n "${SIDECAR_CMD:-}" ]; then
  run sidecar 18005
  awk -v s="${RPS[sidecar]}" -v n="${RPS[naive-aiohttp]}" -v g="${RPS[nginx-proxy]}" \
    'BEGIN { printf "sidecar/naive-aiohttp=%.2f sidecar/nginx=%.2f\n", s/n, s/g }'
fi
