#!/usr/bin/env bash
# Memory footprint against the targets: idle RSS of `sidecar serve --preset kserve-v1 --profile P`
# (a 20-feature profile built here), the highest RSS under RATE req/s (default 2,000) for DUR
# (default 20s), and with `--workers 2` the supervisor's RSS and each worker's (RSS and PSS: the
# pages of numpy, libpython and libcrypto are shared between processes, so what an extra worker
# adds is closer to its PSS). Loopback only, bounded: about a minute.
#
#   usage: benchmarks/footprint.sh              knobs: RATE, DUR, FEATURES (default 20), SETTLE (4s)
. "$(dirname "$0")/common.sh"
need nginx taskset
FEATURES=${FEATURES:-20}
SETTLE=${SETTLE:-4}  # seconds after the port opens before idle RSS is read
IDLE_TARGET=60; LOAD_TARGET=75; WORKER_TARGET=60  # MiB, from the "Layout and footprint" issue
export SIDECAR_SHUTDOWN_DELAY=0  # no load balancer to wait for: SIGTERM stops at once

build_profile "$FEATURES"  # $WORK/train.csv, traffic.csv and profile.json
start_upstream
wait_port 18001

ARGS=(serve --upstream http://127.0.0.1:18001 --host 127.0.0.1 --port "$PORT"
  --metrics-port "$((PORT + 1))" --log-level warning --preset kserve-v1 --model-name iris
  --profile "$WORK/profile.json")
kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }  # RSS of a pid, KiB
pss() { awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
verdict() { # MiB target: "ok" or "OVER"
  awk -v m="$1" -v t="$2" 'BEGIN {print (m <= t ? "ok" : "OVER")}'
}
stop() { kill "$1" 2>/dev/null; wait "$1" 2>/dev/null; }

echo "== one process, $FEATURES-feature profile"
taskset -c 1 "$SIDECAR" "${ARGS[@]}" & sc=$!; pids+=($sc)
wait_port "$PORT"; sleep "$SETTLE"
idle=$(mib "$(kib $sc)")
printf "idle RSS            %6s MiB   target <= %s MiB   %s\n" "$idle" "$IDLE_TARGET" \
  "$(verdict "$idle" "$IDLE_TARGET")"
taskset -c 0 "$SIDECAR" loadtest "http://127.0.0.1:$PORT" --data "$WORK/traffic.csv" \
  --rate "${RATE:-2000}" --duration "${DUR:-20s}" --quiet --json > "$WORK/footprint.json" & load=$!
high=0
while kill -0 "$load" 2>/dev/null; do
  now=$(kib $sc); ((now > high)) && high=$now
  sleep 0.5
done
wait "$load"
high=$(mib "$high")
printf "max RSS under load  %6s MiB   target <= %s MiB   %s   (%s req/s for %s)\n" "$high" \
  "$LOAD_TARGET" "$(verdict "$high" "$LOAD_TARGET")" "${RATE:-2000}" "${DUR:-20s}"
"$PY" - "$WORK/footprint.json" <<'PYEOF'
import json, sys
load = json.load(open(sys.argv[1]))["targets"][0]
print(f"  load: {load['ok']} of {load['sent']} answered 200, {load['throughput_rps']:.0f} req/s, "
      f"p99 {load['latency_ms']['p99']:.1f} ms, errors {load['errors'] or 'none'}")
PYEOF
stop $sc

echo "== --workers 2"
taskset -c 1 "$SIDECAR" "${ARGS[@]}" --workers 2 & sc=$!; pids+=($sc)
wait_port "$PORT"; sleep "$SETTLE"
workers=$(pgrep -P "$sc" | tr '\n' ' ')
printf "supervisor RSS      %6s MiB   (admin port, probe, merged metrics)\n" "$(mib "$(kib $sc)")"
for w in $workers; do
  rss=$(mib "$(kib "$w")")
  printf "worker %-7s RSS  %6s MiB   target <= %s MiB   %s   PSS %s MiB\n" "$w" "$rss" \
    "$WORKER_TARGET" "$(verdict "$rss" "$WORKER_TARGET")" "$(mib "$(pss "$w")")"
done
stop $sc
