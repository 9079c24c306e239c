#!/usr/bin/env bash
# make load: locust, headless, against a running gateway (default: the demo of
# `make run` on http://127.0.0.1:8080). Bounded in time (DURATION) and in requests
# (LOAD_MAX_REQUESTS); HTML report and CSV in load/results/locust-<timestamp>/.
#   make load HOST=http://127.0.0.1:8080 USERS=50 SPAWN_RATE=10 DURATION=1m
#   bash load/load.sh --host http://127.0.0.1:8081 FanOut   # extra args go to locust
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

HOST=${HOST:-http://127.0.0.1:8080}
USERS=${USERS:-50}
SPAWN_RATE=${SPAWN_RATE:-10}
DURATION=${DURATION:-1m}
LOCUST=${LOCUST:-.venv/bin/locust}

[[ -x $LOCUST ]] || { echo "load: $LOCUST not found (run 'make load', or: pip install -e '.[dev]')" >&2; exit 2; }
[[ $USERS =~ ^[0-9]+$ && $SPAWN_RATE =~ ^[0-9.]+$ ]] || { echo "load: USERS and SPAWN_RATE must be numbers" >&2; exit 2; }

# 1h30m, 5m, 90s or 90 -> seconds (for the outer timeout; locust reads DURATION itself).
seconds_of() {
    local text=$1 total=0
    [[ $text =~ ^[0-9]+$ ]] && { echo "$text"; return 0; }
    while [[ $text =~ ^([0-9]+)([hms])(.*)$ ]]; do
        case ${BASH_REMATCH[2]} in
        h) total=$((total + BASH_REMATCH[1] * 3600)) ;;
        m) total=$((total + BASH_REMATCH[1] * 60)) ;;
        s) total=$((total + BASH_REMATCH[1])) ;;
        esac
        text=${BASH_REMATCH[3]}
    done
    [[ -z $text && $total -gt 0 ]] && echo "$total"
}
LIMIT=$(seconds_of "$DURATION") || { echo "load: DURATION must look like 90, 90s, 5m or 1h30m" >&2; exit 2; }

OUT=load/results/locust-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if command -v curl >/dev/null && ! curl -s -o /dev/null --max-time 3 "$HOST/"; then
    echo "load: nothing answers at $HOST (start the demo with 'make run', or pass HOST=...)" >&2
    exit 1
fi
echo "==> locust: $USERS users (+$SPAWN_RATE/s) for $DURATION against $HOST; results in $OUT" >&2
rc=0
timeout --kill-after=30 "$((LIMIT + 120))" \
    "$LOCUST" -f load/locustfile.py --headless \
    --users "$USERS" --spawn-rate "$SPAWN_RATE" --run-time "$DURATION" --stop-timeout 10 \
    --host "$HOST" --html "$OUT/report.html" --csv "$OUT/locust" --only-summary \
    "$@" || rc=$?
echo "==> report: $OUT/report.html, CSV: $OUT/locust_stats.csv (exit $rc: 0 = no failures)" >&2
exit "$rc"
