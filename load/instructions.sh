#!/usr/bin/env bash
# make instructions: CPU instructions per proxied request under callgrind (deterministic,
# unlike wall time on a shared machine). See load/instructions.py. Arguments pass through.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ensure_tools valgrind
rc=0
run_child "$PY" load/instructions.py "$@" || rc=$?
exit "${INTERRUPTED:-$rc}"
