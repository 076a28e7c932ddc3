#!/usr/bin/env bash
# CPU per request of several builds of the sidecar, interleaved, so that all see the same noise:
# a change's effect on cost, where requests/s alone move by ±20% from run to run on a shared
# machine. A build is a git revision (checked out into a worktree), a directory holding a
# `sidecar` package (such as a compiled build from scripts/build-compiled), or HEAD for this
# checkout. Each round runs each build for DUR under wrk (-c C) with the kserve-v1 preset (ARGS
# to change), the sidecar alone on CPU 1, wrk and the canned upstream on CPU 0, and reads the
# user + system CPU of the sidecar's processes (a supervisor's workers too) from /proc. A build
# may be followed, in the same argument, by `sidecar serve` arguments of its own, such as
# "HEAD --workers 2". The last build is the baseline the others are divided by.
#
#   usage: benchmarks/compare.sh BUILD... [HEAD]   knobs: ROUNDS (default 5), DUR (3s), C (32),
#                                                   ARGS (extra `sidecar serve` arguments)
#   e.g.   benchmarks/compare.sh main~3             (main~3 against this checkout)
#          benchmarks/compare.sh /tmp/compiled/src HEAD
#          benchmarks/compare.sh "HEAD --workers 2" HEAD   (what two workers cost on one core)
. "$(dirname "$0")/common.sh"
need nginx wrk taskset
[ $# -ge 1 ] || { echo "usage: benchmarks/compare.sh BUILD... [HEAD]" >&2; exit 2; }
builds=("$@")
[ $# -eq 1 ] && builds+=(HEAD)
source_of() { # build: the directory to put on PYTHONPATH
  if [ "$1" = HEAD ]; then echo "$ROOT/src"
  elif [ -d "$1/sidecar" ]; then (cd "$1" && pwd)
  else
    local tree; tree="$WORK/compare-$(git -C "$ROOT" rev-parse --short "$1")"
    [ -d "$tree" ] || git -C "$ROOT" worktree add --detach -f "$tree" "$1" >/dev/null
    echo "$tree/src"
  fi
}
sources=(); extras=()
for build in "${builds[@]}"; do
  read -r revision extra <<<"$build"
  sources+=("$(source_of "$revision")"); extras+=("$extra")
done
ARGS=${ARGS:---preset kserve-v1 --model-name iris}
start_upstream
wait_port 18001
measure() { # label src extra: one run; appends "label cpu_us rps" to $WORK/compare.txt
  PYTHONPATH="$2" taskset -c 1 "$SIDECAR" serve --upstream http://127.0.0.1:18001 --host 127.0.0.1 \
    --port "$PORT" --metrics-port "$((PORT + 1))" --log-level warning $FAST_STOP $ARGS $3 & local sc=$!
  wait_port "$PORT"; sleep 2  # every worker of a supervisor serving
  local procs; procs="$sc $(pgrep -P "$sc" | tr '\n' ' ')"
  warm "$PORT"
  local before after out requests
  before=$(cpu_ticks $procs)
  out=$(taskset -c 0 wrk -t1 -c"${C:-32}" -d"${DUR:-3s}" -s "$BENCH/post.lua" \
    "http://127.0.0.1:$PORT/v1/models/iris:predict")
  after=$(cpu_ticks $procs)
  requests=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "${1// /_} $(( (after - before) * TICK_US / requests ))" \
    "$(echo "$out" | awk '/Requests\/sec/ {print $2}')" >> "$WORK/compare.txt"
  kill "$sc"; wait "$sc" 2>/dev/null
}
: > "$WORK/compare.txt"
for _ in $(seq "${ROUNDS:-5}"); do
  for i in "${!builds[@]}"; do measure "${builds[i]}" "${sources[i]}" "${extras[i]}"; done
done
"$PY" - "$WORK/compare.txt" <<'PYEOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    label, cost, rate = line.split()
    runs.setdefault(label, []).append((int(cost), float(rate)))
for label, found in runs.items():
    costs, rates = [c for c, _ in found], [r for _, r in found]
    print(f"{label:>20}: CPU per request median {statistics.median(costs):.0f} us "
          f"(min {min(costs)}), requests/s median {statistics.median(rates):,.0f} ({len(found)} runs)")
*others, (base, base_cost) = ((k, statistics.median(c for c, _ in v)) for k, v in runs.items())
for label, cost in others:
    print(f"{label} costs {cost / base_cost:.2f}x the CPU per request of {base}")
PYEOF
