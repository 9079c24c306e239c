#!/usr/bin/env bash
# wrk against nginx direct, nginx as a reverse proxy, and the gateway (once per
# upstream transport), side by side. See load/README.md.
#
# Everything listens on 127.0.0.1 on ports picked free at start, lives in one
# temp dir, is bounded in time, and is stopped by the EXIT trap whatever
# happens. Exit status: 0 when every target answered with at most 1% errors.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

DURATION=${BENCH_SECONDS:-10}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
WARMUP=${BENCH_WARMUP:-2}
READY_TIMEOUT=${BENCH_READY_TIMEOUT:-20}
TARGETS=${BENCH_TARGETS:-direct,nginx-proxy,gateway-aiohttp,gateway-httpx}
MAX_ERROR_RATIO=${BENCH_MAX_ERROR_RATIO:-0.01}
CLIENT_CPU=${BENCH_CLIENT_CPU:-0}
PROXY_CPU=${BENCH_PROXY_CPU:-1}
GATEWAY=${BENCH_GATEWAY:-.venv/bin/gateway}
RESULTS_DIR=load/results

for knob in DURATION CONNECTIONS WARMUP READY_TIMEOUT CLIENT_CPU PROXY_CPU; do
    [[ ${!knob} =~ ^[0-9]+$ ]] || { echo "bench: $knob must be a whole number, got '${!knob}'" >&2; exit 2; }
done
((DURATION > 0 && CONNECTIONS > 0)) || { echo "bench: BENCH_SECONDS and BENCH_CONNECTIONS must be > 0" >&2; exit 2; }

if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
LIB=(timeout 60 "$PY" load/benchlib.py)

log() { printf '==> %s\n' "$*" >&2; }

# --- tools -------------------------------------------------------------------

ensure_tools() {
    local missing=() sudo=()
    command -v nginx >/dev/null || missing+=(nginx)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v taskset >/dev/null || missing+=(util-linux)
    ((${#missing[@]} == 0)) && return 0
    ((EUID == 0)) || sudo=(sudo)
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 600 "${sudo[@]}" apt-get install -y -q "${missing[@]}"; then
        timeout 600 "${sudo[@]}" apt-get update -q
        timeout 600 "${sudo[@]}" apt-get install -y -q "${missing[@]}"
    fi
}
ensure_tools

# One core for the client (and the upstream nginx), one for the proxy under
# test, as in STYLE.md's figures. Without two cores, nothing is pinned.
if (($(nproc) >= 2)); then
    CLIENT_PIN=(taskset -c "$CLIENT_CPU")
    PROXY_PIN=(taskset -c "$PROXY_CPU")
    PINNING="wrk and upstream nginx on CPU $CLIENT_CPU, proxy under test on CPU $PROXY_CPU"
else
    CLIENT_PIN=()
    PROXY_PIN=()
    PINNING="not pinned (fewer than 2 CPUs)"
fi

# --- processes ---------------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gateway-bench.XXXXXX")
chmod 755 "$WORK" # nginx workers run as nobody
PIDS=()

# Each process gets its own session (setsid execs in place, so $! is both its
# pid and its process group), so stopping it also stops anything it forked.
stop_pid() {
    local pid=$1 i
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
    local i
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${PIDS[i]}"
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

nginx_common() { # name
    cat <<EOF
worker_processes 1;
daemon off;
pid $WORK/$1.pid;
error_log $WORK/$1-error.log warn;
events { worker_connections 4096; }
EOF
}

nginx_http_common() { # name
    cat <<EOF
    access_log off;
    client_body_temp_path $WORK/$1-temp/body;
    proxy_temp_path $WORK/$1-temp/proxy;
    fastcgi_temp_path $WORK/$1-temp/fastcgi;
    uwsgi_temp_path $WORK/$1-temp/uwsgi;
    scgi_temp_path $WORK/$1-temp/scgi;
    keepalive_requests 100000;
    keepalive_timeout 75s;
EOF
}

# Sets STARTED_PID (not echoed: a $(...) subshell would orphan the process).
start_nginx() { # name conf pin...
    local name=$1 conf=$2
    shift 2
    mkdir -p "$WORK/$name-temp"
    "$@" setsid nginx -p "$WORK" -e "$WORK/$name-error.log" -c "$conf" \
        >"$WORK/$name.out" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

# --- measuring ---------------------------------------------------------------

RESULT_ARGS=()

fail_target() { # label slug reason
    printf '%s\n' "$3" >"$WORK/$2.wrk"
    RESULT_ARGS+=("$1=$WORK/$2.wrk")
    log "$1: $3"
}

run_wrk() { # label slug url
    local label=$1 slug=$2 url=$3 out=$WORK/$2.wrk rc=0
    if ((WARMUP > 0)); then
        log "$label: warm-up ${WARMUP}s"
        timeout $((WARMUP + 30)) "${CLIENT_PIN[@]}" \
            wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" "$url" >/dev/null 2>&1 || true
    fi
    log "$label: wrk -t1 -c$CONNECTIONS -d${DURATION}s --latency $url"
    timeout $((DURATION + 30)) "${CLIENT_PIN[@]}" \
        wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$url" >"$out" 2>&1 || rc=$?
    ((rc == 0)) || echo "wrk exited with status $rc" >>"$out"
    RESULT_ARGS+=("$label=$out")
}

wanted() { [[ ",$TARGETS," == *",$1,"* ]]; }

read -r UP_PORT PX_PORT < <("${LIB[@]}" ports 2)

# The upstream: a fixed tiny body over keep-alive, beside wrk on the client core.
cat >"$WORK/upstream.conf" <<EOF
$(nginx_common upstream)
http {
$(nginx_http_common upstream)
    server {
        listen 127.0.0.1:$UP_PORT;
        location = /hello {
            default_type text/plain;
            return 200 "hello\n";
        }
    }
}
EOF

# nginx as a reverse proxy: the bar for any proxy on one core.
cat >"$WORK/proxy.conf" <<EOF
$(nginx_common proxy)
http {
$(nginx_http_common proxy)
    upstream backend {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 100000;
    }
    server {
        listen 127.0.0.1:$PX_PORT;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF

log "upstream nginx on 127.0.0.1:$UP_PORT"
start_nginx upstream "$WORK/upstream.conf" "${CLIENT_PIN[@]}"
UP_PID=$STARTED_PID
if ! "${LIB[@]}" wait-http "http://127.0.0.1:$UP_PORT/hello" --timeout 10 --pid "$UP_PID"; then
    cat "$WORK/upstream.out" "$WORK/upstream-error.log" >&2 2>/dev/null || true
    echo "bench: the upstream nginx did not start" >&2
    exit 1
fi

if wanted direct; then
    run_wrk direct direct "http://127.0.0.1:$UP_PORT/hello"
fi

if wanted nginx-proxy; then
    log "nginx reverse proxy on 127.0.0.1:$PX_PORT"
    start_nginx proxy "$WORK/proxy.conf" "${PROXY_PIN[@]}"
    PX_PID=$STARTED_PID
    if "${LIB[@]}" wait-http "http://127.0.0.1:$PX_PORT/hello" --timeout 10 --pid "$PX_PID" \
        2>"$WORK/proxy.wait"; then
        run_wrk nginx-proxy nginx-proxy "http://127.0.0.1:$PX_PORT/hello"
    else
        fail_target nginx-proxy nginx-proxy "nginx proxy not ready: $(cat "$WORK/proxy.wait")"
    fi
    stop_pid "$PX_PID"
fi

run_gateway() { # transport label
    local transport=$1 label=$2 slug=gateway-$1 port admin pid yaml
    read -r port admin < <("${LIB[@]}" ports 2)
    yaml=$WORK/$slug.yaml
    cat >"$yaml" <<EOF
server:
  host: 127.0.0.1
  port: $port
  admin_host: 127.0.0.1
  admin_port: $admin
  access_log: false
  log_level: warning
  drain_timeout: 1s
upstreams:
  nginx:
    targets: ["http://127.0.0.1:$UP_PORT"]
    max_connections: 256
    max_keepalive: 128
routes:
  - {name: hello, path: /hello, upstream: nginx}
EOF
    log "$label on 127.0.0.1:$port (admin $admin)"
    GATEWAY_TRANSPORT=$transport "${PROXY_PIN[@]}" setsid "$GATEWAY" run -c "$yaml" \
        >"$WORK/$slug.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    if ! "${LIB[@]}" wait-http "http://127.0.0.1:$admin/readyz" --timeout "$READY_TIMEOUT" \
        --pid "$pid" 2>"$WORK/$slug.wait"; then
        fail_target "$label" "$slug" "not ready: $(cat "$WORK/$slug.wait")"
        tail -n 20 "$WORK/$slug.log" | sed "s/^/    [$slug] /" >&2
    elif ! "${LIB[@]}" wait-http "http://127.0.0.1:$port/hello" --timeout 5 --pid "$pid" \
        2>"$WORK/$slug.wait"; then
        fail_target "$label" "$slug" "GET /hello: $(cat "$WORK/$slug.wait")"
        tail -n 20 "$WORK/$slug.log" | sed "s/^/    [$slug] /" >&2
    else
        run_wrk "$label" "$slug" "http://127.0.0.1:$port/hello"
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "the gateway exited during the run" >>"$WORK/$slug.wrk"
            tail -n 20 "$WORK/$slug.log" | sed "s/^/    [$slug] /" >&2
        fi
    fi
    stop_pid "$pid"
}

if wanted gateway-aiohttp; then
    run_gateway aiohttp "gateway (aiohttp transport)"
fi
if wanted gateway-httpx; then
    run_gateway httpx "gateway (httpx default transport)"
fi

((${#RESULT_ARGS[@]} > 0)) || { echo "bench: BENCH_TARGETS='$TARGETS' names no target" >&2; exit 2; }

# --- report ------------------------------------------------------------------

STAMP=$(date +%Y%m%d-%H%M%S)
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
CONTEXT=(
    "date: $(date -Iseconds)"
    "machine: $(nproc) CPUs${CPU_MODEL:+ ($CPU_MODEL)}, kernel $(uname -r)"
    "load: wrk -t1 -c$CONNECTIONS -d${DURATION}s --latency, after a ${WARMUP}s warm-up, GET /hello (6-byte body), keep-alive"
    "pinning: $PINNING"
    "tools: $(nginx -v 2>&1 | sed 's/^nginx version: //'), $(wrk -v 2>&1 | head -n 1 | awk '{print $1, $2}'), $("$PY" --version 2>&1)"
    "gateway: $(git rev-parse --short HEAD 2>/dev/null || echo 'no commit')$(git diff --quiet HEAD -- gateway 2>/dev/null || echo ' + uncommitted changes')"
)
echo
rc=0
"${LIB[@]}" report --out "$RESULTS_DIR/bench-$STAMP.md" --max-error-ratio "$MAX_ERROR_RATIO" \
    "${CONTEXT[@]/#/--context=}" "${RESULT_ARGS[@]}" || rc=$?
exit "$rc"
