# Sourced by bench.sh and profile.sh: tools, limits, a temp dir and the trap that cleans.
# shellcheck shell=bash

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { printf '==> %s\n' "$*" >&2; }

# nginx, wrk and taskset from apt where missing (root, or through sudo).
# Extra arguments: more commands, each `COMMAND` (from its namesake package) or
# `COMMAND:PACKAGE` (h2load:nghttp2-client).
ensure_tools() {
    local missing=() sudo=() extra
    command -v nginx >/dev/null || missing+=(nginx)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v taskset >/dev/null || missing+=(util-linux)
    for extra in "$@"; do
        command -v "${extra%%:*}" >/dev/null || missing+=("${extra#*:}")
    done
    ((${#missing[@]} == 0)) && return 0
    ((EUID == 0)) || sudo=(sudo)
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 600 "${sudo[@]}" apt-get install -y -q "${missing[@]}"; then
        timeout 600 "${sudo[@]}" apt-get update -q
        timeout 600 "${sudo[@]}" apt-get install -y -q "${missing[@]}"
    fi
}

if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi

# As many open files as the hard limit allows: 10,000 idle connections and wrk's 1024.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gateway-load.XXXXXX")
chmod 755 "$WORK" # nginx workers run as nobody

# The Python side stops what it started; this trap is the safety net if it was killed:
# every process group it recorded in $WORK/pids gets TERM, then KILL.
# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
    local pid i
    trap - EXIT INT TERM
    if [[ -f $WORK/pids ]]; then
        while read -r pid; do
            kill -TERM -- "-$pid" 2>/dev/null || true
        done <"$WORK/pids"
        for ((i = 0; i < 30; i++)); do
            local left=0
            while read -r pid; do
                kill -0 -- "-$pid" 2>/dev/null && left=1
            done <"$WORK/pids"
            ((left)) || break
            sleep 0.1
        done
        while read -r pid; do
            kill -KILL -- "-$pid" 2>/dev/null || true
        done <"$WORK/pids"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# The Python side runs in the background so that INT/TERM reach this script at once;
# they are passed on as TERM, on which it stops what it started and writes what it
# measured so far. Then the EXIT trap above.
CHILD=
INTERRUPTED=
forward() { if [[ -n $CHILD ]]; then kill -TERM "$CHILD" 2>/dev/null || true; fi; }
trap 'INTERRUPTED=130; forward' INT
trap 'INTERRUPTED=143; forward' TERM

run_child() {
    local rc=0
    "$@" &
    CHILD=$!
    while :; do
        wait "$CHILD" && rc=0 || rc=$?
        kill -0 "$CHILD" 2>/dev/null || break # else a trapped signal interrupted wait
    done
    CHILD=
    return "$rc"
}
