#!/usr/bin/env bash
# gRPC: unary ModelInfer (one iris row, 4 FP64 features) against a canned gRPC model (grpc_upstream.py,
# a fixed ModelInferResponse with predict and predict_proba): straight to it; through a naive grpc.aio
# relay (grpc_upstream.py --relay-to: the floor, like naive_proxy.py for HTTP); and through the
# sidecar with instrumentation (--preset open-inference-v2) and without (no preset: RED metrics
# only). The relays have CPU 1 (one loaded at a time); the upstream and the driver (grpc_driver.py,
# grpc.aio over CHANNELS connections) share CPU 0. Rounds interleave the targets, so that all see the
# same noise; medians are printed, with each relay's CPU per call (user + system from /proc, every
# thread) and, from the closed loop, what that CPU cost makes of one core.
#
#   closed loop: C calls in flight for DUR seconds (max calls/s);
#   fixed rate:  RATE calls/s for DUR seconds, latency from each call's due time (added p50).
#
#   usage: benchmarks/grpc.sh      knobs: ROUNDS (default 3), DUR (5), C (32), RATE (1000),
#                                         CHANNELS (4), GRPC_UPSTREAM_PORT (18101)
. "$(dirname "$0")/common.sh"
need taskset
ROUNDS=${ROUNDS:-3}; DUR=${DUR:-5}; C=${C:-32}; RATE=${RATE:-1000}; CHANNELS=${CHANNELS:-4}
UPSTREAM_PORT=${GRPC_UPSTREAM_PORT:-18101}
export SIDECAR_SHUTDOWN_DELAY=0  # no load balancer to wait for

taskset -c 0 "$PY" "$BENCH/grpc_upstream.py" "$UPSTREAM_PORT" & upstream=$!; pids+=($upstream)
declare -A TARGET RELAY_PID
TARGET[direct]=127.0.0.1:$UPSTREAM_PORT
TARGET[naive]=127.0.0.1:$((PORT + 6))
taskset -c 1 "$PY" "$BENCH/grpc_upstream.py" "$((PORT + 6))" --relay-to "${TARGET[direct]}" & pids+=($!)
RELAY_PID[naive]=$!
start_sidecar() { # name first-port args...: HTTP on first-port, admin +1, gRPC +2, on CPU 1
  local name=$1 port=$2; shift 2
  # Nothing serves HTTP here (port 9 refuses): only the gRPC port is driven.
  taskset -c 1 "$SIDECAR" serve --upstream http://127.0.0.1:9 --host 127.0.0.1 --port "$port" \
    --metrics-port "$((port + 1))" --grpc-port "$((port + 2))" \
    --grpc-upstream "127.0.0.1:$UPSTREAM_PORT" --log-level error "$@" & pids+=($!)
  RELAY_PID[$name]=$!
  TARGET[$name]=127.0.0.1:$((port + 2))
}
start_sidecar bare "$PORT"
start_sidecar instrumented "$((PORT + 3))" --preset open-inference-v2
wait_port "$UPSTREAM_PORT"; wait_port "$((PORT + 2))"; wait_port "$((PORT + 5))"
wait_port "$((PORT + 6))"
NAMES=(direct naive bare instrumented)

drive() { # name mode-args...: one measured run, appended to $WORK/grpc.txt
  local name=$1; shift
  taskset -c 0 "$PY" "$BENCH/grpc_driver.py" "${TARGET[$name]}" "$name" "$@" --duration "$DUR" \
    --channels "$CHANNELS" --upstream "$upstream" \
    ${RELAY_PID[$name]:+--relay "${RELAY_PID[$name]}"} | tee -a "$WORK/grpc.txt"
}
: > "$WORK/grpc.txt"
echo "label mode calls/s p50_ms p99_ms relay_cpu_us/call upstream_cpu_us/call failed"
for _ in $(seq "$ROUNDS"); do
  for name in "${NAMES[@]}"; do drive "$name" --concurrency "$C"; done
  for name in "${NAMES[@]}"; do drive "$name" --rate "$RATE"; done
done
echo
"$PY" - "$WORK/grpc.txt" <<'PYEOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    label, mode, rate, p50, p99, relay, upstream, failed = line.split()
    runs.setdefault((mode, label), []).append(
        (float(rate), float(p50), float(p99), None if relay == "-" else int(relay), int(failed)))
def med(found, i):
    return statistics.median(run[i] for run in found)
for mode in dict.fromkeys(m for m, _ in runs):
    direct = runs[(mode, "direct")]
    print(f"-- {mode} (medians of {len(direct)} rounds)")
    for label in ("direct", "naive", "bare", "instrumented"):
        found = runs[(mode, label)]
        line = (f"{label:>12}: {med(found, 0):7.0f} calls/s  p50 {med(found, 1):6.3f} ms  "
                f"p99 {med(found, 2):7.3f} ms")
        if label != "direct":
            cpu = med(found, 3)
            line += f"  relay CPU {cpu:4.0f} us/call"
            if mode.startswith("c"):
                naive = runs[(mode, "naive")]
                line += (f" (one core: {1e6 / cpu:5.0f} calls/s)  calls/s vs direct "
                         f"{med(found, 0) / med(direct, 0):.2f}, vs naive "
                         f"{med(found, 0) / med(naive, 0):.2f}")
            else:
                line += f"  added p50 {med(found, 1) - med(direct, 1):+.3f} ms"
        failures = sum(run[4] for run in found)
        print(line + (f"  FAILED CALLS {failures}" if failures else ""))
PYEOF
