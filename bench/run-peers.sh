#!/usr/bin/env bash
# bench/run-peers.sh: the edge against nginx (proxy_cache) and Varnish, same origin,
# same machine, same run (issue 10); about 10 minutes for all scenarios on an idle
# machine. Scenarios (SCENARIOS, default all of them):
#   memory      RSS of each cache holding MEMORY_OBJECTS distinct 1 KiB objects, per object
#   storm       a miss storm: STORM_OBJECTS uncached objects × STORM_PER_OBJECT concurrent
#               requests; origin requests seen (coalescing) and total time
#   h1          1 KiB cache HITs over HTTP/1.1 keep-alive (wrk): req/s, p50/p99, CPU-µs per request
#   h2          1 KiB cache HITs over cleartext HTTP/2, prior knowledge (h2load): the same
#   throughput  MB/s of 1 MiB and 100 MiB cache HITs over HTTP/1.1 (loadgen)
#   ranges      MB/s of random 1 MiB ranges of a cached 1 GiB object over HTTP/1.1
#               (loadgen; nginx through its `slice 1m` location, aligned and unaligned)
#
# Installs its peers from Debian when they are missing (nginx, varnish, wrk,
# nghttp2-client), starts one `cdn origin` with generated objects and, in front of
# it, `cdn edge`, nginx and Varnish, each on its own loopback address, warms each
# cache, and then measures them in rotating order, REPEAT times (h1 and h2: ROUNDS times,
# default 5; with the edge and one peer that is the edge and nginx alternately, each
# going first in every other round). Every server is pinned
# to CPU 0 (`taskset -c 0`, one worker/thread pool where the server has the knob), the
# load generators to CPU 1. Prints markdown tables of medians with the edge's ratio to
# each peer (bench/peers-report.py); the raw runs go to bench/out/peers-<time>.jsonl.
#
# Before/after comparisons: BASELINE=/path/to/an/older/cdn starts that binary too, as
# the server `edge-base`, with the edge's config on 127.0.0.45 (plain HTTP and h2c on
# :8080, admin on :9090), warmed and measured in the same rotating rounds; the tables
# then also give the edge's ratio to edge-base (the current build ÷ the older one).
#
# Environment (all optional):
#   SCENARIOS="memory storm h1 h2 throughput ranges"   which to run (always in this order)
#   DURATION=5s    each timed run;  REPEAT=3  rounds (tables show medians)
#   ROUNDS=5       rounds of the h1 and h2 scenarios (tables: median [min–max])
#   CONNS=50 THREADS=1 OBJECT=1KiB           h1: wrk connections, threads, object
#   H2_CONNS=10 H2_STREAMS=10                h2: h2load connections, streams per connection
#   SIZES="1MiB 100MiB" CONNS_1MiB=8 CONNS_100MiB=1   throughput: objects, loadgen connections
#   RANGE_OBJECT=1GiB RANGE_CONNS=8 RANGE_MODES="aligned unaligned"
#   MEMORY_OBJECTS=10000
#   STORM_OBJECTS=100 STORM_PER_OBJECT=10 STORM_SIZE=64KiB STORM_RATE=65536 (origin bytes/s:
#                  each storm object takes the origin about a second to send)
#   EDGE_CPUS=0           the CPUs the edge may use (0-1: both, the load generator
#                          then shares CPU 1 with it; for HIT req/s by cores)
#   BASELINE=/path/to/cdn   also measure this (older) cdn binary as `edge-base`
#   PEERS="nginx varnish"    which peers to start (a subset, or "" for none);
#   SKIP_VARNISH=1           the same as leaving varnish out of PEERS
#   SKIP_BUILD=1   use target/release as it is (CARGO_TARGET_DIR: where to find it)
#   KEEP_WORK=1    keep the scratch directory (configs, logs)
#   QUIET_WAIT=30  seconds to wait for an idle machine before each run
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ALL_SCENARIOS="memory storm h1 h2 throughput ranges"
SCENARIOS=${SCENARIOS:-$ALL_SCENARIOS}
DURATION=${DURATION:-5s}
REPEAT=${REPEAT:-3}
ROUNDS=${ROUNDS:-5}
CONNS=${CONNS:-50}
THREADS=${THREADS:-1}
OBJECT=${OBJECT:-1KiB}
H2_CONNS=${H2_CONNS:-10}
H2_STREAMS=${H2_STREAMS:-10}
SIZES=${SIZES:-"1MiB 100MiB"}
CONNS_1MiB=${CONNS_1MiB:-8}
CONNS_100MiB=${CONNS_100MiB:-1}
RANGE_OBJECT=${RANGE_OBJECT:-1GiB}
RANGE_CONNS=${RANGE_CONNS:-8}
RANGE_MODES=${RANGE_MODES:-"aligned unaligned"}
MEMORY_OBJECTS=${MEMORY_OBJECTS:-10000}
STORM_OBJECTS=${STORM_OBJECTS:-100}
STORM_PER_OBJECT=${STORM_PER_OBJECT:-10}
STORM_SIZE=${STORM_SIZE:-64KiB}
STORM_RATE=${STORM_RATE:-65536}
BASELINE=${BASELINE:-}
PEERS=${PEERS-"nginx varnish"}
[[ -n "${SKIP_VARNISH:-}" ]] && PEERS=${PEERS//varnish/}
read -r -a PEERS_LIST <<<"$PEERS"
PEERS="${PEERS_LIST[*]}" # spaces normalised

for s in $SCENARIOS; do
    [[ " $ALL_SCENARIOS " == *" $s "* ]] || die "unknown scenario $s (known: $ALL_SCENARIOS)"
done
wants() { [[ " $SCENARIOS " == *" $1 "* ]]; }
for p in $PEERS; do
    [[ $p == nginx || $p == varnish ]] || die "unknown peer $p (known: nginx varnish)"
done
peer() { [[ " $PEERS " == *" $1 "* ]]; }
if [[ -n "$BASELINE" ]]; then
    [[ -x "$BASELINE" ]] || die "BASELINE=$BASELINE is not an executable"
    BASELINE=$(realpath "$BASELINE")
fi

ORIGIN=127.0.0.41:8080
ORIGIN_ADMIN=127.0.0.41:9091
declare -A ADDR=([edge]=127.0.0.42:8080 [nginx]=127.0.0.43:8080 [varnish]=127.0.0.44:8080
    [edge-base]=127.0.0.45:8080)
# Cleartext HTTP/2 (prior knowledge): the edge and Varnish take it on their HTTP/1.1
# port (by the connection preface); nginx 1.22 needs a listener of its own.
declare -A H2ADDR=([edge]=127.0.0.42:8080 [nginx]=127.0.0.43:8081 [varnish]=127.0.0.44:8080
    [edge-base]=127.0.0.45:8080)
SERVERS=(edge)
[[ -n "$BASELINE" ]] && SERVERS+=(edge-base)
SERVERS+=("${PEERS_LIST[@]}")

install_peers() {
    local missing=()
    if peer nginx; then command -v nginx >/dev/null || missing+=(nginx); fi
    if peer varnish; then command -v varnishd >/dev/null || missing+=(varnish); fi
    if wants h1; then command -v wrk >/dev/null || missing+=(wrk); fi
    if wants h2; then command -v h2load >/dev/null || missing+=(nghttp2-client); fi
    if ((${#missing[@]})); then
        log "apt-get install ${missing[*]}"
        # policy-rc.d in Debian's container images keeps the packages' services from starting.
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
    if peer nginx; then
        nginx -V 2>&1 | grep -q -- --with-http_slice_module || die "this nginx lacks the slice module"
        nginx -V 2>&1 | grep -q -- --with-http_v2_module || die "this nginx lacks the HTTP/2 module"
    fi
}

command -v taskset >/dev/null || die "taskset (util-linux) is needed"
command -v python3 >/dev/null || die "python3 is needed for the tables"
[[ $(nproc) -ge 2 ]] || die "needs 2 CPUs (servers on CPU 0, load generators on CPU 1)"
install_peers
# The storm opens STORM_OBJECTS × STORM_PER_OBJECT connections at once.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

make_work
build_binaries
mkdir -p "$BENCH/out"
RESULTS="$BENCH/out/peers-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
for addr in "$ORIGIN" "${ADDR[@]}" "${H2ADDR[nginx]}"; do ensure_free "$addr"; done
if [[ -n "$BASELINE" ]]; then
    # A copy, like the edge's: a rebuild cannot swap it mid-run.
    cp "$BASELINE" "$WORK/cdn-base"
    BASELINE_VERSION=$("$WORK/cdn-base" --version 2>/dev/null || echo unknown)
fi
declare -A PID
python3 -c 'import json, sys; print(json.dumps({"settings": dict(a.split("=", 1) for a in sys.argv[1:])}))' \
    "SCENARIOS=$SCENARIOS" "DURATION=$DURATION" "REPEAT=$REPEAT" "ROUNDS=$ROUNDS" "CONNS=$CONNS" "THREADS=$THREADS" \
    "OBJECT=$OBJECT" "H2_CONNS=$H2_CONNS" "H2_STREAMS=$H2_STREAMS" "RANGE_OBJECT=$RANGE_OBJECT" \
    "RANGE_CONNS=$RANGE_CONNS" "MEMORY_OBJECTS=$MEMORY_OBJECTS" "STORM_OBJECTS=$STORM_OBJECTS" \
    "STORM_PER_OBJECT=$STORM_PER_OBJECT" "STORM_SIZE=$STORM_SIZE" "STORM_RATE=$STORM_RATE" \
    "PEERS=$PEERS" "BASELINE=$BASELINE" "SERVERS=${SERVERS[*]}" >"$RESULTS"

# --- origin: generated objects; its access log (JSON) counts the storm's origin requests --
mkdir -p "$WORK/content"
cat >"$WORK/origin.toml" <<EOF
root = "$WORK/content"
generate = true
default_cache_control = "public, max-age=86400"
[listen]
http = "$ORIGIN"
admin = "$ORIGIN_ADMIN"
EOF
log "origin on $ORIGIN (CPU 1: idle once the caches are warm)"
RUST_LOG="info,cdn_origin::access=debug" taskset -c 1 "$CDN" --log-format json origin \
    --config "$WORK/origin.toml" >"$WORK/origin.log" 2>&1 &
track $!
wait_http "http://$ORIGIN_ADMIN/healthz"

# --- edge: memory cache big enough for the 1 GiB range object (stored in 1 MiB slices) ----
# start_edge NAME BINARY: the same config for the edge and edge-base, only the addresses
# differ (the same node_id, so the responses are byte for byte alike).
start_edge() {
    local name=$1 binary=$2
    cat >"$WORK/$name.toml" <<EOF
node_id = "bench-edge"
[listen]
http = "${ADDR[$name]}"
admin = "${ADDR[$name]%:*}:9090"
[origin]
url = "http://$ORIGIN"
[cache]
memory = "2GiB"
[limits]
max_connections = 100000
EOF
    taskset -c "${EDGE_CPUS:-0}" "$binary" edge --config "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
    PID[$name]=$!
    track "${PID[$name]}"
}
log "edge on ${ADDR[edge]} (CPU 0)"
start_edge edge "$CDN"
if [[ -n "$BASELINE" ]]; then
    log "edge-base ($BASELINE, $BASELINE_VERSION) on ${ADDR[edge-base]} (CPU 0)"
    start_edge edge-base "$WORK/cdn-base"
fi

# --- nginx: one worker, proxy_cache in files, slice for ranges, an h2c listener -------------
if peer nginx; then
mkdir -p "$WORK/nginx/cache" "$WORK/nginx/temp"
cat >"$WORK/nginx/nginx.conf" <<EOF
user root;
daemon off;
master_process on;
worker_processes 1;
# Pinned as the edge is (taskset -c 0 as well, which the worker inherits).
worker_cpu_affinity 01;
worker_rlimit_nofile 65536;
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
    # Its cache files stay open between HITs (no open/fstat/close per request).
    open_file_cache max=10000 inactive=60s;
    open_file_cache_valid 60s;
    open_file_cache_min_uses 1;
    open_file_cache_errors on;
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
        listen ${H2ADDR[nginx]} http2 backlog=4096;
        http2_max_requests 100000000;
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
log "nginx $(nginx -v 2>&1 | cut -d/ -f2) on ${ADDR[nginx]}, h2c on ${H2ADDR[nginx]} (CPU 0, 1 worker)"
taskset -c 0 nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >"$WORK/nginx/stdout.log" 2>&1 &
PID[nginx]=$!
track "${PID[nginx]}"
fi

# --- Varnish: malloc storage (room for the 1 GiB object), default thread pools, HTTP/2 on ---
if peer varnish; then
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
    -s malloc,2G -p feature=+http2 -T none >"$WORK/varnish.log" 2>&1 &
PID[varnish]=$!
track "${PID[varnish]}"
fi

for server in "${SERVERS[@]}"; do
    url="http://${ADDR[$server]}/_gen/0"
    for _ in $(seq 1 100); do
        curl -s -o /dev/null --max-time 1 "$url" 2>/dev/null && break
        sleep 0.1
    done
done

# --- helpers ---------------------------------------------------------------------------------
# The X-Cache header of a GET (extra curl arguments after the URL).
x_cache() {
    curl -s -o /dev/null -D - "$@" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-cache" { print $2 }'
}

# Fetches URL until it is a cache HIT (extra curl arguments after the URL), or dies.
warm() {
    local server=$1 url=$2 status=""
    shift 2
    for _ in 1 2 3; do
        status=$(x_cache "$url" "$@")
        [[ "$status" == HIT ]] && return 0
    done
    die "$server: $url is not a cache HIT after warming (X-Cache: $status; logs in $WORK)"
}

# All CPU of a server: nginx's and Varnish's workers are children of the pid we started.
# "total user system" CPU seconds.
tree_cpu() {
    local pid
    for pid in $1 $(pgrep -P "$1" 2>/dev/null); do
        cat "/proc/$pid/stat" 2>/dev/null
    done | awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); u += $12; s += $13 }
        END { printf "%.2f %.2f %.2f\n", (u + s) / hz, u / hz, s / hz }'
}

# The order of round REP: rotated (so no server always goes first or last).
order() {
    local shift_by=$((($1 - 1) % ${#SERVERS[@]}))
    echo "${SERVERS[@]:shift_by}" "${SERVERS[@]:0:shift_by}"
}

# measure SCENARIO CASE SERVER REP PARSER COMMAND...: waits for a quiet machine, runs
# COMMAND (which pins itself to CPU 1), turns its output into a JSON object with PARSER
# and appends it to $RESULTS with the server's CPU use and everyone else's.
measure() {
    local scenario=$1 case=$2 server=$3 rep=$4 parser=$5 before after user0 user1 sys0 sys1 busy0 busy1 t0 t1 out line
    shift 5
    wait_quiet
    read -r before user0 sys0 < <(tree_cpu "${PID[$server]}")
    busy0=$(busy_seconds)
    t0=$(date +%s.%N)
    out=$("$@")
    t1=$(date +%s.%N)
    busy1=$(busy_seconds)
    read -r after user1 sys1 < <(tree_cpu "${PID[$server]}")
    line=$("$parser" <<<"$out")
    log "$scenario $case $server #$rep: $line"
    python3 -c '
import json, sys
d = json.loads(sys.argv[1])
a = sys.argv[2:]
d.update(scenario=a[0], case=a[1], server=a[2], rep=int(a[3]), wall_s=round(float(a[5]) - float(a[4]), 3),
         server_cpu_s=round(float(a[7]) - float(a[6]), 2), busy_cpu_s=round(float(a[9]) - float(a[8]), 2),
         server_user_s=round(float(a[11]) - float(a[10]), 2), server_sys_s=round(float(a[13]) - float(a[12]), 2))
print(json.dumps(d))' "$line" "$scenario" "$case" "$server" "$rep" "$t0" "$t1" "$before" "$after" "$busy0" "$busy1" \
        "$user0" "$user1" "$sys0" "$sys1" \
        >>"$RESULTS"
}

as_is() { cat; }

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

# h2load's output → JSON; p50/p99 from its per-request log ($WORK/h2load.log, the
# third column: microseconds from request to the end of the response).
h2load_json() {
    python3 -c '
import json, re, sys
text = sys.stdin.read()
rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
lat = sorted(int(l.split("\t")[2]) for l in open(sys.argv[1]) if l.count("\t") >= 2)
pct = lambda p: round(lat[max(0, -(-len(lat) * p // 100) - 1)] / 1000, 3) if lat else None
print(json.dumps({"req_per_s": float(rps.group(1)) if rps else 0.0,
                  "requests": int(m.group(4)) if m else 0,
                  "p50_ms": pct(50), "p99_ms": pct(99),
                  "errors": (int(m.group(5)) + int(m.group(6)) + int(m.group(7)) if m else 1)
                            + (int(codes.group(2)) + int(codes.group(3)) + int(codes.group(4)) if codes else 0)}))' \
        "$WORK/h2load.log"
}

# GET requests the origin answered for PATH so far (its access log; the edge's HEAD
# probes of the origin are not counted).
origin_gets() {
    grep -F "\"path\":\"$1\"" "$WORK/origin.log" | grep -c '"method":"GET"' || true
}

# --- memory: resident memory of each cache holding MEMORY_OBJECTS distinct 1 KiB objects ----
# The processes whose memory counts: the edge; nginx's master and worker (its cache
# manager and loader only maintain the shared keys zone, which the worker's RssShmem
# already shows); Varnish's manager and child.
server_pids() {
    local child
    echo "${PID[$1]}"
    for child in $(pgrep -P "${PID[$1]}" 2>/dev/null); do
        if [[ $1 != nginx ]] || grep -q 'worker process' "/proc/$child/cmdline" 2>/dev/null; then
            echo "$child"
        fi
    done
}

# "rss anon file shmem" in KiB, summed over server_pids.
server_rss() {
    local pid
    for pid in $(server_pids "$1"); do
        cat "/proc/$pid/status"
    done | awk '$1 ~ /^(VmRSS|RssAnon|RssFile|RssShmem):$/ { s[$1] += $2 }
        END { printf "%d %d %d %d\n", s["VmRSS:"], s["RssAnon:"], s["RssFile:"], s["RssShmem:"] }'
}

# Objects the cache says it holds.
stored_objects() {
    case $1 in
        # cdn_cache_objects{tier="memory"} since the disk tier (an older edge-base: no label).
        edge | edge-base) curl -s "http://${ADDR[$1]%:*}:9090/metrics" |
            awk '$1 == "cdn_cache_objects" || $1 == "cdn_cache_objects{tier=\"memory\"}" { print $2 }' ;;
        nginx) find "$WORK/nginx/cache" -type f | wc -l ;;
        varnish) varnishstat -n "$WORK/varnish" -1 -f MAIN.n_object | awk '{ print $2 }' ;;
    esac
}

# curl_urls FILE PREFIX FIRST LAST [REPEAT]: GETs PREFIX<n> for n in FIRST..LAST, one after
# another on one keep-alive connection (each REPEAT times).
curl_urls() {
    local file=$1 prefix=$2 first=$3 last=$4 times=${5:-1}
    seq "$first" "$last" | awk -v p="$prefix" -v t="$times" \
        '{ for (i = 0; i < t; i++) printf "url = \"%s%d\"\noutput = \"/dev/null\"\n", p, $1 }' >"$file"
    taskset -c 1 curl -s --fail -K "$file" || die "curl: some of $prefix$first..$last failed"
}

memory_run() {
    local server=$1 base="http://${ADDR[$1]}/_gen/1KiB?v=" empty full files0 files1 app0 app1 disk0 disk1 t0 t1 hits
    # Baseline: a running cache that has served (1,000 requests for one object, v=0).
    curl_urls "$WORK/urls" "$base" 0 0 1000
    sleep 2
    empty=$(server_rss "$server")
    read -r files0 app0 disk0 < <(nginx_files)
    t0=$(date +%s.%N)
    curl_urls "$WORK/urls" "$base" 1 "$MEMORY_OBJECTS"
    t1=$(date +%s.%N)
    sleep 2
    full=$(server_rss "$server")
    read -r files1 app1 disk1 < <(nginx_files)
    hits=0
    for v in 1 $((MEMORY_OBJECTS / 2)) "$MEMORY_OBJECTS"; do
        [[ "$(x_cache "$base$v")" == HIT ]] && hits=$((hits + 1))
    done
    python3 -c '
import json, sys
a = sys.argv[1:]
e, f = [int(x) for x in a[2].split()], [int(x) for x in a[3].split()]
d = dict(scenario="memory", case="1KiB", server=a[0], objects=int(a[1]), load_s=round(float(a[11]) - float(a[10]), 2),
         rss_empty_kib=e[0], rss_full_kib=f[0], anon_delta_kib=f[1] - e[1], file_delta_kib=f[2] - e[2],
         shmem_delta_kib=f[3] - e[3], stored_objects=int(float(a[4] or 0)), sample_hits=f"{a[5]}/3")
if a[0] == "nginx":
    d.update(cache_files_delta=int(a[7]) - int(a[6]), cache_apparent_bytes_delta=int(a[9]) - int(a[8]),
             cache_disk_bytes_delta=int(a[13]) - int(a[12]))
print(json.dumps(d))' "$server" "$MEMORY_OBJECTS" "$empty" "$full" "$(stored_objects "$server")" "$hits" \
        "$files0" "$files1" "$app0" "$app1" "$t0" "$t1" "$disk0" "$disk1" | tee -a "$RESULTS" >&2
}

# "files apparent-bytes disk-bytes" of the files in nginx's cache directory (not its
# levels=1:2 directories).
nginx_files() {
    if [[ ! -d "$WORK/nginx/cache" ]]; then echo "0 0 0"; return; fi
    find "$WORK/nginx/cache" -type f -printf '%s %b\n' | awk '{ n++; a += $1; d += $2 * 512 } END { printf "%d %d %d\n", n, a, d }'
}

# --- storm: concurrent misses for new objects --------------------------------------------
storm_run() {
    local server=$1 first=$2 path="/_gen/$STORM_SIZE" before after out
    before=$(origin_gets "$path")
    out=$(taskset -c 1 "$STORM" --addr "${ADDR[$server]}" --path "$path?v={n}&rate=$STORM_RATE" \
        --objects "$STORM_OBJECTS" --per-object "$STORM_PER_OBJECT" --first "$first")
    sleep 0.5 # the origin logs a request when its response is done
    after=$(origin_gets "$path")
    python3 -c 'import json, sys; d = json.loads(sys.argv[1]); d["origin_requests"] = int(sys.argv[3]) - int(sys.argv[2]); print(json.dumps(d))' \
        "$out" "$before" "$after"
}

# --- run -------------------------------------------------------------------------------------
if wants memory; then
    for server in "${SERVERS[@]}"; do
        log "memory: $server, $MEMORY_OBJECTS objects"
        memory_run "$server"
    done
fi

if wants storm; then
    for rep in $(seq 1 "$REPEAT"); do
        for server in $(order "$rep"); do
            # New object numbers every round; each cache sees them for the first time.
            measure storm "${STORM_OBJECTS}x$STORM_PER_OBJECT" "$server" "$rep" as_is \
                storm_run "$server" $((1000000 + rep * 100000))
        done
    done
fi

if wants h1 || wants h2; then
    for server in "${SERVERS[@]}"; do
        warm "$server" "http://${ADDR[$server]}/_gen/$OBJECT"
        if wants h2; then
            warm "$server" "http://${H2ADDR[$server]}/_gen/$OBJECT" --http2-prior-knowledge
            [[ "$(curl -s -o /dev/null -w '%{http_version}' --http2-prior-knowledge "http://${H2ADDR[$server]}/_gen/$OBJECT")" == 2 ]] ||
                die "$server does not answer HTTP/2 with prior knowledge on ${H2ADDR[$server]}"
        fi
    done
fi
if wants h1; then
    for rep in $(seq 1 "$ROUNDS"); do
        for server in $(order "$rep"); do
            measure h1 "$OBJECT" "$server" "$rep" wrk_json \
                taskset -c 1 wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "http://${ADDR[$server]}/_gen/$OBJECT"
        done
    done
fi
if wants h2; then
    for rep in $(seq 1 "$ROUNDS"); do
        for server in $(order "$rep"); do
            measure h2 "$OBJECT" "$server" "$rep" h2load_json \
                taskset -c 1 h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D"${DURATION%s}" \
                --log-file="$WORK/h2load.log" "http://${H2ADDR[$server]}/_gen/$OBJECT"
        done
    done
fi

if wants throughput; then
    for size in $SIZES; do
        for server in "${SERVERS[@]}"; do
            curl -s -o /dev/null "http://${ADDR[$server]}/_gen/$size"
            warm "$server" "http://${ADDR[$server]}/_gen/$size"
        done
    done
    for rep in $(seq 1 "$REPEAT"); do
        for size in $SIZES; do
            conns_var="CONNS_$size"
            for server in $(order "$rep"); do
                measure throughput "$size" "$server" "$rep" as_is \
                    taskset -c 1 "$LOADGEN" --proto h1 --threads 1 --url "http://${ADDR[$server]}/_gen/$size" \
                    --connections "${!conns_var:-1}" --duration "$DURATION"
            done
        done
    done
fi

# nginx caches ranges through its slice location; the edge slices by itself ([cache]
# slice, 1 MiB); Varnish stores the whole object and cuts ranges out of it.
range_url() {
    if [[ $1 == nginx ]]; then echo "http://${ADDR[$1]}/slice/_gen/$RANGE_OBJECT"; else echo "http://${ADDR[$1]}/_gen/$RANGE_OBJECT"; fi
}
if wants ranges; then
    for server in "${SERVERS[@]}"; do
        log "ranges: $server fetches the whole $RANGE_OBJECT once"
        got=$(curl -s -o /dev/null -w '%{size_download} %{time_total}' "$(range_url "$server")" || true)
        log "$server: ${got% *} bytes in ${got#* } s"
        [[ ${got% *} == "$(curl -s -o /dev/null -r 0-0 -D - "$(range_url "$server")" | tr -d '\r' |
            awk -F/ 'tolower($0) ~ /^content-range:/ { print $2 }')" ]] ||
            die "$server: the whole $RANGE_OBJECT ended early, after ${got% *} bytes (logs with KEEP_WORK=1; the runs so far: python3 bench/peers-report.py $RESULTS)"
        warm "$server" "$(range_url "$server")" -r 5000000-6048575
    done
    for rep in $(seq 1 "$REPEAT"); do
        for mode in $RANGE_MODES; do
            flags=()
            [[ $mode == unaligned ]] && flags=(--range-unaligned)
            for server in $(order "$rep"); do
                measure ranges "$mode" "$server" "$rep" as_is \
                    taskset -c 1 "$LOADGEN" --proto h1 --threads 1 --url "$(range_url "$server")" \
                    --range-random "$RANGE_OBJECT" "${flags[@]}" --connections "$RANGE_CONNS" --duration "$DURATION"
            done
        done
    done
fi

for f in "$WORK/edge.log" "$WORK/edge-base.log" "$WORK/nginx/error.log" "$WORK/varnish.log"; do
    if grep -E -i ' (WARN|ERROR|\[error\]|\[crit\])' "$f" >/dev/null 2>&1; then
        log "$(basename "$f") has warnings or errors:"
        grep -E -i ' (WARN|ERROR|\[error\]|\[crit\])' "$f" | sed 's/\x1b\[[0-9;]*m//g' | head -10 >&2
    fi
done

python3 "$BENCH/peers-report.py" "$RESULTS"
