#!/usr/bin/env bash
# make corun: CPU per request of gateways loaded at the same time on one CPU, side by
# side (steady where one-after-the-other wall figures are not). See load/corun.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ensure_tools nginx wrk
rc=0
run_child "$PY" load/corun.py --work "$WORK" "$@" || rc=$?
exit "${INTERRUPTED:-$rc}"
