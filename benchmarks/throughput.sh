#!/usr/bin/env bash
# Throughput, one run side by side (side_by_side.sh): direct, nginx proxy_pass, the naive
# aiohttp proxy and the sidecar with the kserve-v1 preset on post.lua's iris traffic, one worker
# pinned to CPU 1; then the proxy alone. Then `--workers 1` against `--workers 2`: the CPU each
# request costs them, which is what decides how two workers scale on two free cores.
#
#   usage: benchmarks/throughput.sh            knobs: DUR (default 8s), C (connections, 32)
. "$(dirname "$0")/common.sh"
need nginx wrk taskset
ARGS="serve --upstream http://127.0.0.1:18001 --host 127.0.0.1 --port 18005 --metrics-port 18006 --log-level warning --preset kserve-v1 --model-name iris"
echo "== one worker, pinned to CPU 1 (side by side with the baselines)"
PY=$PY SIDECAR_CMD="$SIDECAR $ARGS" bash "$BENCH/side_by_side.sh"
echo
echo "== proxy only (no preset), one worker"
PY=$PY SIDECAR_CMD="$SIDECAR ${ARGS% --preset*}" bash "$BENCH/side_by_side.sh" | grep -E "^sidecar|naive-aiohttp |nginx-proxy"
echo
echo "== --workers 1 vs --workers 2, all of them on CPU 1; upstream and wrk on CPU 0"
# Two workers can only double the rate on two cores the load generator does not need; this
# machine has none to spare. What carries over to free cores is the CPU a request costs (all
# worker processes, user + system) and how evenly SO_REUSEPORT spreads the requests (each
# worker's share of that CPU), so both workers share CPU 1 here, out of the way of wrk. Sharing
# one core, each worker also sees half the connections and half the rate, and so records in
# smaller batches: that cost per request is a pessimistic bound for two free cores. The last run,
# one process with half the connections, is what each of two workers on its own core would see
# (less the snapshots each hands the supervisor): twice its rate is the optimistic bound. Then two
# separate one-process sidecars share CPU 1, 16 connections each: what taking turns on one core
# costs any two processes. --workers 2 against that is what the workers themselves cost.
start_upstream
tick_us=$((1000000 / $(getconf CLK_TCK)))
cpu_ticks() { # pid...: user + system clock ticks of each, space-separated
  for p in "$@"; do awk '{printf "%d ", $14 + $15}' "/proc/$p/stat" 2>/dev/null || printf "0 "; done
}
rates=(); costs=()
for run in "1 ${C:-32}" "2 ${C:-32}" "1 $((${C:-32} / 2))"; do
  read -r workers connections <<<"$run"
  taskset -c 1 "$SIDECAR" $ARGS --workers "$workers" & sc=$!
  wait_port 18005; sleep 2
  procs=$(pgrep -P "$sc" | tr '\n' ' ')  # with --workers 2 its workers; one worker serves itself
  taskset -c 0 wrk -t1 -c8 -d1s -s "$BENCH/post.lua" http://127.0.0.1:18005/v1/models/iris:predict >/dev/null
  before=($(cpu_ticks $sc $procs))
  out=$(taskset -c 0 wrk -t1 -c"$connections" -d"${DUR:-8s}" -s "$BENCH/post.lua" \
    http://127.0.0.1:18005/v1/models/iris:predict)
  after=($(cpu_ticks $sc $procs))
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  requests=$(echo "$out" | awk '/requests in/ {print $1}')
  total=0; shares=""
  for i in "${!after[@]}"; do total=$((total + after[i] - before[i])); done
  for i in "${!after[@]}"; do
    [ "$i" -eq 0 ] && continue  # the supervisor: admin port only
    shares+="$(( (after[i] - before[i]) * 100 / (total > 0 ? total : 1) ))% "
  done
  echo "workers=$workers connections=$connections rps=$rps" \
    "cpu_us_per_request=$((total * tick_us / requests)) worker_cpu_shares=${shares:-100% }"
  rates+=("$rps"); costs+=("$((total * tick_us / requests))")
  kill "$sc"; wait "$sc" 2>/dev/null
done
taskset -c 1 "$SIDECAR" $ARGS & first=$!
SECOND_ARGS=${ARGS/--port 18005 --metrics-port 18006/--port 18015 --metrics-port 18016}
taskset -c 1 "$SIDECAR" $SECOND_ARGS & second=$!
pids+=("$first" "$second")  # cleanup() stops them if this block fails
wait_port 18005; wait_port 18015; sleep 2
for port in 18005 18015; do
  taskset -c 0 wrk -t1 -c8 -d1s -s "$BENCH/post.lua" \
    "http://127.0.0.1:$port/v1/models/iris:predict" >/dev/null
done
before=($(cpu_ticks $first $second)); loads=(); reports=()
for port in 18005 18015; do
  reports+=("$WORK/separate-$port.txt")
  taskset -c 0 wrk -t1 -c$((${C:-32} / 2)) -d"${DUR:-8s}" -s "$BENCH/post.lua" \
    "http://127.0.0.1:$port/v1/models/iris:predict" > "${reports[-1]}" & loads+=($!)
done
wait "${loads[@]}"
after=($(cpu_ticks $first $second))
requests=$(awk '/requests in/ {n += $1} END {print n}' "${reports[@]}")
separate=$(( (after[0] - before[0] + after[1] - before[1]) * tick_us / requests ))
echo "two separate processes, connections=$((${C:-32} / 2)) each: cpu_us_per_request=$separate"
kill "$first" "$second"; wait "$first" "$second" 2>/dev/null
awk -v one="${costs[0]}" -v two="${costs[1]}" -v r1="${rates[0]}" -v half="${rates[2]}" \
  -v separate="$separate" 'BEGIN {
  printf "two workers on two free cores, against one: %.2fx (pessimistic, 2 x %d / %d us)" \
    " to %.2fx (optimistic, 2 x %.0f / %.0f req/s)\n", 2 * one / two, one, two, 2 * half / r1, half, r1
  printf "CPU per request, --workers 2 against one process: %.2fx; against two separate processes" \
    " on one core: %.2fx\n", two / one, two / separate }'
