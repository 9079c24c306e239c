#!/usr/bin/env bash
# make profile: py-spy on the gateway under the simple-GET wrk load; flame graph, raw
# stacks and the top frames by own time in load/results/profile-<timestamp>/.
# See load/README.md. Knobs: PROFILE_SECONDS, PROFILE_NATIVE, PROFILE_CONNECTIONS, ...
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ensure_tools
rc=0
run_child "$PY" load/profile.py --work "$WORK" "$@" || rc=$?
exit "${INTERRUPTED:-$rc}"
