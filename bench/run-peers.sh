#!/usr/bin/env bash
# bench/run-peers.sh: the edge against nginx (proxy_cache) and Varnish, same origin,
# same machine, same run (issue 10). Today: 1 KiB cache-HIT requests/s and p50/p99
# latency over HTTP/1.1 keep-alive, measured with wrk.
#
# Installs its peers from Debian when they are missing (nginx, varnish, wrk,
# nghttp2-client), starts one `cdn origin` with generated objects and, in front of
# it, `cdn edge`, nginx and Varnish, each on its own loopback address, warms each
# cache, and then measures them in rotating order, REPEAT times. Every server is pinned
# to CPU 0 (`taskset -c 0`, one worker/thread pool where the server has the knob), wrk
# to CPU 1. Prints a markdown table of medians with the edge's ratio to each peer; the
# raw runs go to bench/out/peers-<time>.jsonl.
#
# Environment (all optional):
#   DURATION=10s   each wrk run
#   REPEAT=3       rounds; the table shows medians
#   CONNS=50       wrk connections (keep-alive); THREADS=1 wrk threads
#   OBJECT=1KiB    the generated object (/_gen/<OBJECT>)
#   SKIP_BUILD=1   use target/release as it is
#   KEEP_WORK=1    keep the scratch directory (configs, logs)
#   QUIET_WAIT=30  seconds to wait for an idle machine before each run
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DURATION=${DURATION:-10s}
REPEAT=${REPEAT:-3}
CONNS=${CONNS:-50}
THREADS=${THREADS:-1}
OBJECT=${OBJECT:-1KiB}

ORIGIN=127.0.0.41:8080
declare -A ADDR=([edge]=127.0.0.42:8080 [nginx]=127.0.0.43:8080 [varnish]=127.0.0.44:8080)
SERVERS=(edge nginx varnish)

install_peers() {
    local missing=()
    command -v nginx >/dev/null || missing+=(nginx)
    command -v varnishd >/dev/null || missing+=(varnish)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v h2load >/dev/null || missing+=(nghttp2-client)
    if ((${#missing[@]})); then
        log "apt-get install ${missing[*]}"
        # policy-rc.d in Debian's container images keeps the packages' services from starting.
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
    nginx -V 2>&1 | grep -q -- --with-http_slice_module || die "this nginx lacks the slice module"
}

command -v taskset >/dev/null || die "taskset (util-linux) is needed"
command -v python3 >/dev/null || die "python3 is needed for the table"
[[ $(nproc) -ge 2 ]] || die "needs 2 CPUs (servers on CPU 0, wrk on CPU 1)"
install_peers

make_work
build_binaries
mkdir -p "$BENCH/out"
RESULTS="$BENCH/out/peers-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
: >"$RESULTS"
for addr in "$ORIGIN" "${ADDR[@]}"; do ensure_free "$addr"; done
declare -A PID

# --- origin -------------------------------------------------------------------------
mkdir -p "$WORK/content"
cat >"$WORK/origin.toml" <<EOF
root = "$WORK/content"
generate = true
default_cache_control = "public, max-age=86400"
[listen]
http = "$ORIGIN"
admin = "${ORIGIN%:*}:9091"
EOF
log "origin on $ORIGIN (CPU 1: idle once the caches are warm)"
taskset -c 1 "$CDN" origin --config "$WORK/origin.toml" >"$WORK/origin.log" 2>&1 &
track $!
wait_http "http://${ORIGIN%:*}:9091/healthz"

# --- edge ---------------------------------------------------------------------------
cat >"$WORK/edge.toml" <<EOF
node_id = "bench-edge"
[listen]
http = "${ADDR[edge]}"
admin = "${ADDR[edge]%:*}:9090"
[origin]
url = "http://$ORIGIN"
[cache]
memory = "1GiB"
[limits]
max_connections = 100000
EOF
log "edge on ${ADDR[edge]} (CPU 0)"
taskset -c 0 "$CDN" edge --config "$WORK/edge.toml" >"$WORK/edge.log" 2>&1 &
PID[edge]=$!
track "${PID[edge]}"

# --- nginx: one worker, proxy_cache in memory-backed files, slice for ranges --------
mkdir -p "$WORK/nginx/cache" "$WORK/nginx/temp"
cat >"$WORK/nginx/nginx.conf" <<EOF
user root;
daemon off;
master_process on;
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65s;
    keepalive_requests 100000000;
    client_body_temp_path $WORK/nginx/temp/body;
    proxy_temp_path $WORK/nginx/temp/proxy;
    fastcgi_temp_path $WORK/nginx/temp/fastcgi;
    uwsgi_temp_path $WORK/nginx/temp/uwsgi;
    scgi_temp_path $WORK/nginx/temp/scgi;
    proxy_cache_path $WORK/nginx/cache levels=1:2 keys_zone=bench:64m max_size=4g inactive=1d use_temp_path=off;
    upstream origin {
        server $ORIGIN;
        keepalive 32;
    }
    server {
        listen ${ADDR[nginx]} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_cache bench;
        proxy_cache_lock on;
        add_header X-Cache \$upstream_cache_status;
        location / {
            proxy_pass http://origin;
        }
        # Sliced caching for range scenarios: /slice/<path> caches <path> in 1 MiB slices.
        location /slice/ {
            slice 1m;
            proxy_cache_key \$uri\$is_args\$args\$slice_range;
            proxy_set_header Range \$slice_range;
            proxy_cache_valid 200 206 1d;
            proxy_pass http://origin/;
        }
    }
}
EOF
log "nginx $(nginx -v 2>&1 | cut -d/ -f2) on ${ADDR[nginx]} (CPU 0, 1 worker)"
taskset -c 0 nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >"$WORK/nginx/stdout.log" 2>&1 &
PID[nginx]=$!
track "${PID[nginx]}"

# --- Varnish: malloc storage, default thread pools --------------------------------------
cat >"$WORK/default.vcl" <<EOF
vcl 4.1;
backend origin { .host = "${ORIGIN%:*}"; .port = "${ORIGIN#*:}"; }
sub vcl_deliver {
    if (obj.hits > 0) { set resp.http.X-Cache = "HIT"; } else { set resp.http.X-Cache = "MISS"; }
}
EOF
mkdir -p "$WORK/varnish"
log "varnish $(varnishd -V 2>&1 | grep -o 'varnish-[0-9.]*' | head -1) on ${ADDR[varnish]} (CPU 0)"
taskset -c 0 varnishd -F -j none -n "$WORK/varnish" -a "${ADDR[varnish]}" -f "$WORK/default.vcl" \
    -s malloc,1G -T none >"$WORK/varnish.log" 2>&1 &
PID[varnish]=$!
track "${PID[varnish]}"

# --- warm ---------------------------------------------------------------------------------
for server in "${SERVERS[@]}"; do
    url="http://${ADDR[$server]}/_gen/$OBJECT"
    for _ in $(seq 1 100); do
        [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" 2>/dev/null)" == 200 ]] && break
        sleep 0.1
    done
    status=$(curl -s -o /dev/null -D - "$url" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-cache" { print $2 }')
    [[ "$status" == HIT ]] || die "$server: $url is not a cache HIT after warming (X-Cache: $status; logs in $WORK)"
    log "$server warm: X-Cache $status"
done

# --- measure ------------------------------------------------------------------------------
# wrk's output → JSON: requests/s, p50/p99 in ms, errors (socket errors + non-2xx).
wrk_json() {
    python3 -c '
import json, re, sys
text = sys.stdin.read()
unit = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}
def lat(p):
    m = re.search(r"^\s*" + p + r"%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    return round(float(m.group(1)) * unit[m.group(2)], 3) if m else None
rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
reqs = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
print(json.dumps({"req_per_s": float(rps.group(1)) if rps else 0.0,
                  "requests": int(reqs.group(1)) if reqs else 0,
                  "p50_ms": lat("50"), "p99_ms": lat("99"),
                  "errors": errors + (int(non2xx.group(1)) if non2xx else 0)}))'
}

# All CPU of a server: nginx's and Varnish's workers are children of the pid we started.
tree_cpu() {
    local total=0 pid
    for pid in $1 $(pgrep -P "$1" 2>/dev/null); do
        total=$(awk -v t="$total" -v c="$(cpu_seconds "$pid" 2>/dev/null || echo 0)" 'BEGIN { printf "%.2f", t + c }')
    done
    echo "$total"
}

measure() {
    local server=$1 rep=$2 before after busy0 busy1 out line
    wait_quiet
    before=$(tree_cpu "${PID[$server]}")
    busy0=$(busy_seconds)
    out=$(taskset -c 1 wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "http://${ADDR[$server]}/_gen/$OBJECT")
    busy1=$(busy_seconds)
    after=$(tree_cpu "${PID[$server]}")
    line=$(wrk_json <<<"$out")
    log "$server #$rep: $line"
    python3 -c '
import json, sys
d = json.loads(sys.argv[1])
d.update(server=sys.argv[2], rep=int(sys.argv[3]), seconds=float(sys.argv[4].rstrip("s")),
         server_cpu_s=round(float(sys.argv[6]) - float(sys.argv[5]), 2),
         busy_cpu_s=round(float(sys.argv[8]) - float(sys.argv[7]), 2))
print(json.dumps(d))' "$line" "$server" "$rep" "$DURATION" "$before" "$after" "$busy0" "$busy1" >>"$RESULTS"
}

for rep in $(seq 1 "$REPEAT"); do
    # Rotate the order so no server always goes first (or last).
    shift_by=$(((rep - 1) % ${#SERVERS[@]}))
    order=("${SERVERS[@]:shift_by}" "${SERVERS[@]:0:shift_by}")
    for server in "${order[@]}"; do measure "$server" "$rep"; done
done

for f in "$WORK/edge.log" "$WORK/nginx/error.log" "$WORK/varnish.log"; do
    if grep -E -i ' (WARN|ERROR|\[error\]|\[crit\])' "$f" >/dev/null 2>&1; then
        log "$(basename "$f") has warnings or errors:"
        grep -E -i ' (WARN|ERROR|\[error\]|\[crit\])' "$f" | sed 's/\x1b\[[0-9;]*m//g' | head -10 >&2
    fi
done

python3 - "$RESULTS" "$DURATION" "$REPEAT" "$CONNS" "$THREADS" "$OBJECT" <<'EOF'
import json, statistics, sys
path, duration, repeat, conns, threads, obj = sys.argv[1:7]
runs = [json.loads(l) for l in open(path) if l.strip()]
by = {}
for r in runs:
    by.setdefault(r["server"], []).append(r)
med = lambda rs, k: statistics.median(r[k] for r in rs if r[k] is not None)
cells = {s: dict(rps=med(rs, "req_per_s"), p50=med(rs, "p50_ms"), p99=med(rs, "p99_ms"),
                 cpu=statistics.median(100 * r["server_cpu_s"] / r["seconds"] for r in rs),
                 per_cpu=statistics.median(r["requests"] / r["server_cpu_s"] for r in rs if r["server_cpu_s"] > 0),
                 other=statistics.median(100 * max(0, r["busy_cpu_s"] - r["server_cpu_s"]) / r["seconds"] for r in rs),
                 errors=sum(r["errors"] for r in rs), runs=[round(r["req_per_s"]) for r in rs])
         for s, rs in by.items()}
e = cells["edge"]
print(f"{obj} cache HIT over HTTP/1.1 keep-alive: wrk -t{threads} -c{conns} -d{duration} --latency, medians of {repeat} rounds; "
      "server on CPU 0, wrk on CPU 1. Server CPU: % of one CPU; wrk+other: CPU used by everything but the server.\n")
print("| server | req/s | edge ÷ this (req/s) | p50 ms | p99 ms | server CPU | requests per server CPU-s | errors | wrk+other CPU | runs (req/s) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for s in ("edge", "nginx", "varnish"):
    if s not in cells:
        continue
    c = cells[s]
    print(f'| {s} | {c["rps"]:.0f} | **{e["rps"] / c["rps"]:.2f}** | {c["p50"]:.3f} | {c["p99"]:.3f} | {c["cpu"]:.0f}% | '
          f'{c["per_cpu"]:.0f} | {c["errors"]} | {c["other"]:.0f}% | {c["runs"]} |')
print(f"\nraw runs: {path}")
EOF
