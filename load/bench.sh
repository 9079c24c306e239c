#!/usr/bin/env bash
# make bench [QUICK=1]: the gateway side by side with nginx and the Python reference
# proxies, every scenario of issue 13, results in load/results/<timestamp>/.
# See load/README.md. Knobs are environment variables (BENCH_*, QUICK).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ensure_tools h2load:nghttp2-client # the h2 scenario's load generator
rc=0
run_child "$PY" load/bench.py --work "$WORK" "$@" || rc=$?
exit "${INTERRUPTED:-$rc}"
