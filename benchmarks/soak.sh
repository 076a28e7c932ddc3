#!/usr/bin/env bash
# Memory under sustained load: RATE req/s (default 2,000) for DUR (default 10m) through a sidecar
# with a 20-feature drift profile, RSS sampled every 10 s; prints min, max and the spread.
#
#   usage: benchmarks/soak.sh                  knobs: RATE, DUR, FEATURES (default 20)
. "$(dirname "$0")/common.sh"
need nginx taskset
FEATURES=${FEATURES:-20}
build_profile "$FEATURES"  # $WORK/train.csv, traffic.csv and profile.json
start_upstream
taskset -c 1 "$SIDECAR" serve --upstream http://127.0.0.1:18001 --host 127.0.0.1 --port "$PORT" \
  --metrics-port "$((PORT + 1))" --log-level warning --preset kserve-v1 --model-name iris \
  --profile "$WORK/profile.json" & sc=$!; pids+=($sc)
wait_port 18001; wait_port "$PORT"
taskset -c 0 "$SIDECAR" loadtest http://127.0.0.1:$PORT --data "$WORK/traffic.csv" \
  --rate "${RATE:-2000}" --duration "${DUR:-10m}" --quiet --json > "$WORK/soak.json" & load=$!
rss() { awk '/^VmRSS/ {print $2}' "/proc/$sc/status"; }
: > "$WORK/rss.txt"
while kill -0 "$load" 2>/dev/null; do
  echo "$(date +%s) $(rss)" >> "$WORK/rss.txt"
  sleep 10
done
wait "$load"
"$PY" - "$WORK/rss.txt" "$WORK/soak.json" <<'PYEOF'
import json, sys
samples = [int(line.split()[1]) for line in open(sys.argv[1]) if len(line.split()) == 2]
steady = samples[len(samples) // 10 :] or samples  # after the first tenth: warm-up
report = json.load(open(sys.argv[2]))
low, high = min(steady), max(steady)
print(f"RSS over {len(samples)} samples (first tenth skipped): min {low / 1024:.1f} MiB, "
      f"max {high / 1024:.1f} MiB, spread {100 * (high - low) / low:.1f}% of min")
print(json.dumps(report, indent=1)[:1500])
PYEOF
