# Shared by the benchmark scripts: paths, the canned upstream, cleanup. Source it, do not run it.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=${BENCH:-$ROOT/benchmarks}   # nginx configs, post.lua, naive proxy, side_by_side.sh
PY=${PY:-$ROOT/.venv/bin/python}
SIDECAR=${SIDECAR:-$ROOT/.venv/bin/sidecar}
WORK=${WORK:-/tmp/sidecar-bench}
PORT=${PORT:-18005}   # the sidecar proxy port; the admin port is PORT+1
mkdir -p "$WORK" /tmp/bench
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT

need() { # command... : fail early with the package to install
  for c in "$@"; do
    command -v "$c" >/dev/null || { echo "missing $c (apt-get install -y nginx wrk)" >&2; exit 2; }
  done
}

start_upstream() { # the canned iris model (nginx) on 127.0.0.1:18001, CPU 0
  taskset -c 0 nginx -c "$BENCH/nginx-upstream.conf" & pids+=($!)
}

wait_port() { # port: until something listens
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2; exit 1
}

# A sidecar stopped between runs has no load balancer to warn: no shutdown_delay.
FAST_STOP="--shutdown-delay 0"
TICK_US=$((1000000 / $(getconf CLK_TCK)))  # microseconds in a clock tick of /proc/PID/stat

cpu_ticks() { # pid...: user + system clock ticks, summed
  cat $(for p in "$@"; do echo "/proc/$p/stat"; done) 2>/dev/null | awk '{t += $14 + $15} END {print t}'
}

warm() { # port...: a second of light load on each sidecar, before it is measured
  for port in "$@"; do
    taskset -c 0 wrk -t1 -c8 -d1s -s "$BENCH/post.lua" "http://127.0.0.1:$port/v1/models/iris:predict" >/dev/null
  done
}

build_profile() { # features: training and traffic CSVs of normal columns, and a profile of them
  "$PY" - "$WORK/train.csv" "$WORK/traffic.csv" "$1" <<'PYEOF'
import sys
import numpy as np
train, traffic, width = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(0)
header = ",".join(f"f{j}" for j in range(width))
for path, rows in ((train, 50_000), (traffic, 20_000)):
    np.savetxt(path, rng.normal(size=(rows, width)).round(4), delimiter=",", header=header, comments="")
PYEOF
  "$SIDECAR" profile build "$WORK/train.csv" -o "$WORK/profile.json" --quiet
}
