#!/usr/bin/env bash
# make soak [SOAK=10m]: a bounded soak of the gateway on loopback (load/soak.py): steady
# mixed load, upstream faults switched on and off, clients leaving mid-stream; samples
# RSS, descriptors, asyncio tasks and upstream connections; results in
# load/results/soak-<timestamp>/; exit 1 if any keeps growing after the warm-up.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SOAK=${SOAK:-10m}
if [[ ! $SOAK =~ ^([0-9]+)(s|m|h)?$ ]]; then
    echo "SOAK must look like 60s, 10m or 1h (got '$SOAK')" >&2
    exit 2
fi
case ${BASH_REMATCH[2]} in
    m) seconds=$((BASH_REMATCH[1] * 60)) ;;
    h) seconds=$((BASH_REMATCH[1] * 3600)) ;;
    *) seconds=${BASH_REMATCH[1]} ;;
esac

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi

# Bounded whatever happens: the run, two minutes to settle and report, then INT/KILL.
exec timeout --signal=INT --kill-after=30 $((seconds + 120)) \
    "$PY" load/soak.py --duration "${seconds}s" "$@"
