#!/usr/bin/env bash
# Throughput, one run side by side (side_by_side.sh): direct, nginx proxy_pass, the naive
# aiohttp proxy and the sidecar with the kserve-v1 preset on post.lua's iris traffic, one worker
# pinned to CPU 1; then the proxy alone. Then `--workers 1` against `--workers 2`: the CPU each
# request costs them, which is what decides how two workers scale on two free cores.
#
#   usage: benchmarks/throughput.sh   knobs: DUR (default 8s), C (connections, 32), ROUNDS (the
#                                     workers block's interleaved rounds, 3), WORKERS_ONLY=1 (that
#                                     block alone)
. "$(dirname "$0")/common.sh"
need nginx wrk taskset
ARGS="serve --upstream http://127.0.0.1:18001 --host 127.0.0.1 --port 18005 --metrics-port 18006 --log-level warning --preset kserve-v1 --model-name iris"
if [ -z "${WORKERS_ONLY:-}" ]; then
  echo "== one worker, pinned to CPU 1 (side by side with the baselines)"
  PY=$PY SIDECAR_CMD="$SIDECAR $ARGS" bash "$BENCH/side_by_side.sh"
  echo
  echo "== proxy only (no preset), one worker"
  PY=$PY SIDECAR_CMD="$SIDECAR ${ARGS% --preset*}" bash "$BENCH/side_by_side.sh" | grep -E "^sidecar|naive-aiohttp |nginx-proxy"
  echo
fi
echo "== --workers 1 vs --workers 2, all of them on CPU 1; upstream and wrk on CPU 0"
# Two workers can only double the rate on two cores the load generator does not need; this
# machine has none to spare. What carries over to free cores is the CPU a request costs (all
# worker processes, user + system) and how evenly SO_REUSEPORT spreads the requests (each
# worker's share of that CPU), so both workers share CPU 1 here, out of the way of wrk. Sharing
# one core, each worker also sees half the connections and half the rate, and so records in
# smaller batches: that cost per request is a pessimistic bound for two free cores. One process
# with half the connections is what each of two workers on its own core would see (less the
# snapshots each hands the supervisor): twice its rate is the optimistic bound. Two separate
# one-process sidecars sharing CPU 1, C/2 connections each, are what taking turns on one core
# costs any two processes: --workers 2 against them is what the workers themselves cost. A
# request's CPU moves by ±20% from minute to minute on a shared machine, so the four runs are
# interleaved, ROUNDS times, and each figure is the median of its runs.
start_upstream
load() { # port connections: wrk's report
  taskset -c 0 wrk -t1 -c"$2" -d"${DUR:-8s}" -s "$BENCH/post.lua" "http://127.0.0.1:$1/v1/models/iris:predict"
}
workers_run() { # label workers connections: appends "label cpu_us rps shares" to $RUNS
  taskset -c 1 "$SIDECAR" $ARGS $FAST_STOP --workers "$2" & local sc=$!
  wait_port 18005; sleep 2
  local children; children=$(pgrep -P "$sc" | tr '\n' ' ')  # --workers 2: its workers
  warm 18005
  local before=() after=() out requests total=0 shares="" i
  for p in $sc $children; do before+=("$(cpu_ticks "$p")"); done
  out=$(load 18005 "$3")
  for p in $sc $children; do after+=("$(cpu_ticks "$p")"); done
  requests=$(echo "$out" | awk '/requests in/ {print $1}')
  for i in "${!after[@]}"; do total=$((total + after[i] - before[i])); done
  for i in "${!after[@]}"; do
    [ "$i" -eq 0 ] && continue  # the supervisor: admin port only
    shares+="${shares:+,}$(( (after[i] - before[i]) * 100 / (total > 0 ? total : 1) ))%"
  done
  echo "$1 $((total * TICK_US / requests)) $(echo "$out" | awk '/Requests\/sec/ {print $2}') ${shares:-100%}" >> "$RUNS"
  kill "$sc"; wait "$sc" 2>/dev/null
}
separate_run() { # appends "separate cpu_us rps -" to $RUNS
  taskset -c 1 "$SIDECAR" $ARGS $FAST_STOP & local first=$!
  taskset -c 1 "$SIDECAR" ${ARGS/--port 18005 --metrics-port 18006/--port 18015 --metrics-port 18016} \
    $FAST_STOP & local second=$!
  pids+=("$first" "$second")  # cleanup() stops them if this block fails
  wait_port 18005; wait_port 18015; sleep 2
  warm 18005 18015
  local before after loads=() port
  before=$(cpu_ticks $first $second)
  for port in 18005 18015; do load "$port" $((${C:-32} / 2)) > "$WORK/separate-$port.txt" & loads+=($!); done
  wait "${loads[@]}"
  after=$(cpu_ticks $first $second)
  awk -v ticks=$((after - before)) -v tick="$TICK_US" '/requests in/ {n += $1} /Requests\/sec/ {r += $2}
    END {printf "separate %d %.0f -\n", ticks * tick / n, r}' "$WORK/separate-18005.txt" \
    "$WORK/separate-18015.txt" >> "$RUNS"
  kill "$first" "$second"; wait "$first" "$second" 2>/dev/null
}
RUNS="$WORK/workers.txt"; : > "$RUNS"
for round in $(seq "${ROUNDS:-3}"); do
  workers_run one 1 "${C:-32}"
  workers_run two 2 "${C:-32}"
  workers_run half 1 $((${C:-32} / 2))
  separate_run
  echo "round $round: $(tail -4 "$RUNS" | awk '{printf "%s %s us  ", $1, $2}')"
done
"$PY" - "$RUNS" "${C:-32}" <<'PYEOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    label, cost, rate, shares = line.split()
    runs.setdefault(label, []).append((int(cost), float(rate), shares))
cost = {k: statistics.median(c for c, _, _ in v) for k, v in runs.items()}
rate = {k: statistics.median(r for _, r, _ in v) for k, v in runs.items()}
c = int(sys.argv[2])
for label, what in (("one", f"workers=1 connections={c}"), ("two", f"workers=2 connections={c}"),
                    ("half", f"workers=1 connections={c // 2}"),
                    ("separate", f"two separate processes, connections={c // 2} each")):
    shares = " ".join(s for _, _, s in runs[label]) if label == "two" else ""
    print(f"{what}: cpu_us_per_request={cost[label]:.0f} rps={rate[label]:.0f}"
          + (f" worker_cpu_shares={shares}" if shares else "") + f" (median of {len(runs[label])})")
print(f"two workers on two free cores, against one: {2 * cost['one'] / cost['two']:.2f}x (pessimistic, "
      f"2 x {cost['one']:.0f} / {cost['two']:.0f} us) to {2 * rate['half'] / rate['one']:.2f}x "
      f"(optimistic, 2 x {rate['half']:.0f} / {rate['one']:.0f} req/s)")
ratios = [t[0] / o[0] for t, o in zip(runs["two"], runs["one"])]
print(f"CPU per request, --workers 2 against one process: {cost['two'] / cost['one']:.2f}x "
      f"(round by round {statistics.median(ratios):.2f}x median); against two separate processes "
      f"on one core: {cost['two'] / cost['separate']:.2f}x")
PYEOF
