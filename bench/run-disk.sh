#!/usr/bin/env bash
# bench/run-disk.sh: the edge's disk tier against nginx's proxy_cache on the same
# filesystem, same origin, same run (issue 18); about 17 minutes for every scenario on
# an idle machine. Scenarios (SCENARIOS, default all of them, always in this order):
#   hits     MB/s of 1 MiB and 100 MiB cache HITs over HTTP/1.1 from a working set
#            larger than the edge's memory tier (HIT_OBJECTS_1MiB × 1 MiB and
#            HIT_OBJECTS_100MiB × 100 MiB, requested uniformly at random; loadgen --objects)
#   ranges   MB/s of random 1 MiB ranges of a 1 GiB object held on disk (the edge in its
#            own 1 MiB slices, nginx through a `slice 1m` location), aligned and unaligned
#   restart  RESTART_OBJECTS 1 KiB objects on disk, then stop (SIGTERM, or SIGKILL) and
#            start again, cold (page cache dropped) or warm: time from the start to ready (edge:
#            /readyz 200; nginx: its listener, which serves at once) and to HITs for known
#            objects; nginx's cache loader, once; and memory per disk-resident object
#            (edge: RSS after a restart minus RSS of an empty edge; nginx: the pages of its
#            keys zone, before and after, plus its processes' RSS)
#
# Both caches get a small memory share and the same disk: the edge `[cache] memory =
# EDGE_MEMORY` (64 MiB) with one `[[cache.disk]]` of DISK_SIZE, nginx `proxy_cache_path`
# (levels=1:2, 64 MiB keys zone, max_size DISK_SIZE) in a directory beside it. The
# files of both live in the OS page cache alike (24 GiB here: every working set fits);
# a "disk HIT" is a HIT the edge serves from its disk tier, whether the kernel then
# reads the device or its page cache. The servers are pinned to CPU 0, loadgen to
# CPU 1, and measured in alternating order (edge first in odd rounds, nginx first in
# even ones). Prints markdown tables (bench/disk-report.py); raw runs go to
# bench/out/disk-<time>.jsonl.
#
# Environment (all optional):
#   SCENARIOS="hits ranges restart"
#   DURATION=5s REPEAT=5                  each timed run; rounds (tables: medians, min–max)
#   EDGE_MEMORY=64MiB DISK_SIZE=8GiB      the edge's memory tier; each cache's disk share
#   HIT_SIZES="1MiB 100MiB"  HIT_OBJECTS_1MiB=1024 HIT_OBJECTS_100MiB=10
#   CONNS_1MiB=8 CONNS_100MiB=1           loadgen connections per size
#   HIT_STATES=warm                       "warm cold": cold drops the page cache before each run
#   RANGE_OBJECT=1GiB RANGE_CONNS=8 RANGE_MODES="aligned unaligned"
#   RESTART_OBJECTS=100000 RESTART_SIZE=1KiB FILL_PARALLEL=4
#   RESTART_CASES="term-cold term-warm kill-cold"   how each restart stops the server (term:
#                                         SIGTERM, a clean stop; kill: SIGKILL to its processes)
#                                         and starts it (cold: sync and drop the page cache first)
#   NGINX_LOADER=1                        wait for nginx's cache loader once (it starts 60 s
#                                         after nginx and walks the cache; about 2 minutes)
#   NGINX_AIO=off                         nginx `aio`: off (measured faster here, where the page
#                                         cache holds every file) or threads
#   SERVERS="edge nginx"                  a subset to check the script (e.g. SERVERS=nginx)
#   DISK_ROOT=$WORK                       where both caches' directories go (the same filesystem)
#   SKIP_BUILD=1 KEEP_WORK=1 QUIET_WAIT=30   as in run-peers.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ALL_SCENARIOS="hits ranges restart"
SCENARIOS=${SCENARIOS:-$ALL_SCENARIOS}
DURATION=${DURATION:-5s}
REPEAT=${REPEAT:-5}
EDGE_MEMORY=${EDGE_MEMORY:-64MiB}
DISK_SIZE=${DISK_SIZE:-8GiB}
HIT_SIZES=${HIT_SIZES:-"1MiB 100MiB"}
HIT_OBJECTS_1MiB=${HIT_OBJECTS_1MiB:-1024}
HIT_OBJECTS_100MiB=${HIT_OBJECTS_100MiB:-10}
CONNS_1MiB=${CONNS_1MiB:-8}
CONNS_100MiB=${CONNS_100MiB:-1}
HIT_STATES=${HIT_STATES:-warm}
RANGE_OBJECT=${RANGE_OBJECT:-1GiB}
RANGE_CONNS=${RANGE_CONNS:-8}
RANGE_MODES=${RANGE_MODES:-"aligned unaligned"}
RESTART_OBJECTS=${RESTART_OBJECTS:-100000}
RESTART_SIZE=${RESTART_SIZE:-1KiB}
FILL_PARALLEL=${FILL_PARALLEL:-4}
RESTART_CASES=${RESTART_CASES:-"term-cold term-warm kill-cold"}
for c in $RESTART_CASES; do
    [[ $c =~ ^(term|kill)-(cold|warm)$ ]] || die "RESTART_CASES: $c is not term|kill-cold|warm"
done
NGINX_LOADER=${NGINX_LOADER:-1}
NGINX_AIO=${NGINX_AIO:-off}
KEYS_ZONE_MIB=64

for s in $SCENARIOS; do
    [[ " $ALL_SCENARIOS " == *" $s "* ]] || die "unknown scenario $s (known: $ALL_SCENARIOS)"
done
wants() { [[ " $SCENARIOS " == *" $1 "* ]]; }

ORIGIN=127.0.0.51:8080
ORIGIN_ADMIN=127.0.0.51:9091
declare -A ADDR=([edge]=127.0.0.52:8080 [nginx]=127.0.0.53:8080)
EDGE_ADMIN=127.0.0.52:9090
read -r -a SERVERS <<<"${SERVERS:-edge nginx}"
for s in "${SERVERS[@]}"; do [[ $s == edge || $s == nginx ]] || die "unknown server $s (SERVERS: edge nginx)"; done
has() { [[ " ${SERVERS[*]} " == *" $1 "* ]]; }

command -v taskset >/dev/null || die "taskset (util-linux) is needed"
command -v python3 >/dev/null || die "python3 is needed"
[[ $(nproc) -ge 2 ]] || die "needs 2 CPUs (servers on CPU 0, load generators on CPU 1)"
if ! command -v nginx >/dev/null; then
    log "apt-get install nginx"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >&2
fi
nginx -V 2>&1 | grep -q -- --with-http_slice_module || die "this nginx lacks the slice module"
nginx -V 2>&1 | grep -q -- --with-threads || [[ $NGINX_AIO != threads ]] || die "this nginx lacks thread pools (NGINX_AIO=off)"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# Dropping the page cache needs root and a kernel that lets us; otherwise every run is warm.
CAN_DROP=0
if [[ -w /proc/sys/vm/drop_caches ]] && sync && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then CAN_DROP=1; fi
if ((!CAN_DROP)); then
    log "cannot drop the page cache here: every run is warm"
    RESTART_CASES=$(echo "$RESTART_CASES" | tr ' ' '\n' | sed 's/-cold$/-warm/' | sort -u | xargs)
    HIT_STATES=warm
fi
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# A scratch directory and a binary name without "cdn" in them: another session's broad
# `pkill -f cdn` (or `pkill cdn`) stopped this script's edge mid-run once.
make_work diskbench
build_binaries
mv "$CDN" "$WORK/server"
CDN="$WORK/server"
DISK_ROOT=${DISK_ROOT:-$WORK}
mkdir -p "$DISK_ROOT" "$BENCH/out"
RESULTS="$BENCH/out/disk-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
# Room on the disk: both caches hold every object (the edge's files are a little larger);
# hits and ranges share their directories, restart gets fresh ones after them. Refuse to
# fill the filesystem for everyone else: keep 2 GiB spare.
NEED_MIB=$(python3 - "$SCENARIOS" "$HIT_SIZES" "$HIT_OBJECTS_1MiB" "$HIT_OBJECTS_100MiB" "$RANGE_OBJECT" \
    "$RESTART_OBJECTS" "${#SERVERS[@]}" <<'PY'
import sys
scen, sizes, n1, n100, rng, nrestart, servers = sys.argv[1:]
mib = lambda s: float(s[:-3]) * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[s[-3:]]
count = {"1MiB": int(n1), "100MiB": int(n100)}
big = sum(mib(s) * count.get(s, 1) for s in sizes.split()) if "hits" in scen else 0
big += mib(rng) if "ranges" in scen else 0
small = int(nrestart) * 4.5 / 1024 if "restart" in scen else 0
print(int(max(big, small) * 1.06 * int(servers)) + 2048)
PY
)
FREE_MIB=$(df -Pm "$DISK_ROOT" | awk 'NR == 2 { print $4 }')
((FREE_MIB >= NEED_MIB)) || die "$DISK_ROOT has $FREE_MIB MiB free; these scenarios need about $NEED_MIB MiB (with 2 GiB spare): run fewer at once or with smaller sizes"
log "disk: $FREE_MIB MiB free on $(df -P "$DISK_ROOT" | awk 'NR == 2 { print $6 }'), about $NEED_MIB MiB needed"
for addr in "$ORIGIN" "${ADDR[@]}"; do ensure_free "$addr"; done
declare -A PID
python3 -c 'import json, sys; print(json.dumps({"settings": dict(a.split("=", 1) for a in sys.argv[1:])}))' \
    "SCENARIOS=$SCENARIOS" "DURATION=$DURATION" "REPEAT=$REPEAT" "EDGE_MEMORY=$EDGE_MEMORY" \
    "DISK_SIZE=$DISK_SIZE" "HIT_SIZES=$HIT_SIZES" "HIT_OBJECTS_1MiB=$HIT_OBJECTS_1MiB" \
    "HIT_OBJECTS_100MiB=$HIT_OBJECTS_100MiB" "CONNS_1MiB=$CONNS_1MiB" "CONNS_100MiB=$CONNS_100MiB" \
    "HIT_STATES=$HIT_STATES" "RANGE_OBJECT=$RANGE_OBJECT" "RANGE_CONNS=$RANGE_CONNS" \
    "RESTART_OBJECTS=$RESTART_OBJECTS" "RESTART_SIZE=$RESTART_SIZE" "RESTART_CASES=$RESTART_CASES" \
    "NGINX_AIO=$NGINX_AIO" "KEYS_ZONE_MIB=$KEYS_ZONE_MIB" "CAN_DROP=$CAN_DROP" \
    "DISK_FS=$(df -T "$DISK_ROOT" | awk 'NR == 2 { print $1 " " $2 }')" \
    "NGINX=$(nginx -v 2>&1 | cut -d/ -f2)" "COMMIT=$(git -C "$ROOT" rev-parse --short HEAD)" >"$RESULTS"

# untrack PID: a process that has been stopped is no longer ours to kill at exit.
untrack() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# --- origin: generated objects; its access log counts what reaches it ------------------------
mkdir -p "$WORK/content"
cat >"$WORK/origin.toml" <<EOF
root = "$WORK/content"
generate = true
default_cache_control = "public, max-age=86400"
[listen]
http = "$ORIGIN"
admin = "$ORIGIN_ADMIN"
EOF
log "origin on $ORIGIN (CPU 1: idle once the caches are full)"
RUST_LOG="info,cdn_origin::access=debug" taskset -c 1 "$CDN" --log-format json origin \
    --config "$WORK/origin.toml" >"$WORK/origin.log" 2>&1 &
track $!
wait_http "http://$ORIGIN_ADMIN/healthz"

# GETs of generated objects the origin answered so far (not the edge's HEAD probes).
origin_gets() {
    grep -F '"path":"/_gen/' "$WORK/origin.log" | grep -c '"method":"GET"' || true
}

# --- the two caches --------------------------------------------------------------------------
# write_edge_config NAME DISKDIR
write_edge_config() {
    cat >"$WORK/$1.toml" <<EOF
node_id = "bench-edge"
[listen]
http = "${ADDR[edge]}"
admin = "$EDGE_ADMIN"
[origin]
url = "http://$ORIGIN"
[cache]
memory = "$EDGE_MEMORY"
[[cache.disk]]
path = "$2"
size = "$DISK_SIZE"
[limits]
max_connections = 100000
EOF
}

# write_nginx_config NAME CACHEDIR: one worker, proxy_cache in files on the same
# filesystem, sendfile, open_file_cache, thread-pool aio, a slice location for ranges.
write_nginx_config() {
    local dir="$WORK/$1"
    mkdir -p "$dir/temp" "$2"
    cat >"$dir/nginx.conf" <<EOF
user root;
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
pid $dir/nginx.pid;
error_log $dir/error.log notice;
events { worker_connections 16384; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    aio $NGINX_AIO;
    open_file_cache max=20000 inactive=60s;
    open_file_cache_valid 60s;
    open_file_cache_errors on;
    keepalive_timeout 65s;
    keepalive_requests 100000000;
    client_body_temp_path $dir/temp/body;
    proxy_temp_path $dir/temp/proxy;
    fastcgi_temp_path $dir/temp/fastcgi;
    uwsgi_temp_path $dir/temp/uwsgi;
    scgi_temp_path $dir/temp/scgi;
    proxy_cache_path $2 levels=1:2 keys_zone=bench:${KEYS_ZONE_MIB}m max_size=$(python3 -c "
import sys; s = sys.argv[1]; u = {'GiB': 'g', 'MiB': 'm'}
print(next((s[:-3] + v for k, v in u.items() if s.endswith(k)), s))" "$DISK_SIZE") inactive=7d use_temp_path=off;
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
        proxy_cache_valid 200 206 7d;
        add_header X-Cache \$upstream_cache_status;
        location / {
            proxy_pass http://origin;
        }
        # Sliced caching for ranges: /slice/<path> caches <path> in 1 MiB slices.
        location /slice/ {
            slice 1m;
            proxy_cache_key \$uri\$is_args\$args\$slice_range;
            proxy_set_header Range \$slice_range;
            proxy_pass http://origin/;
        }
    }
}
EOF
}

# start SERVER CONFIGNAME: starts it pinned to CPU 0 and waits until it answers.
declare -A CONF_NAME
start() {
    local server=$1 name=$2
    CONF_NAME[$server]=$name
    if [[ $server == edge ]]; then
        taskset -c 0 "$CDN" edge --config "$WORK/$name.toml" >>"$WORK/$name.log" 2>&1 &
        PID[edge]=$!
        track "${PID[edge]}"
        wait_ok "http://$EDGE_ADMIN/readyz" 60
    else
        taskset -c 0 nginx -p "$WORK/$name" -c "$WORK/$name/nginx.conf" >>"$WORK/$name/stdout.log" 2>&1 &
        PID[nginx]=$!
        track "${PID[nginx]}"
        for _ in $(seq 1 100); do
            curl -s -o /dev/null --max-time 1 "http://${ADDR[nginx]}/_gen/0" && return 0
            sleep 0.1
        done
        die "nginx did not come up (logs in $WORK/$name)"
    fi
}

# Whether PID is running: not gone and not a zombie (a server started by startup.py is
# reaped by init, which may take a while).
running() {
    local state
    state=$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

# stop SERVER [kill]: SIGTERM (nginx: fast shutdown) and wait; with `kill`, SIGKILL to
# each of its processes (nginx: master and children) instead, an unclean stop. Prints
# the seconds it took.
stop() {
    local pid=${PID[$1]} t0 p pids
    t0=$(date +%s.%N)
    if [[ ${2:-term} == kill ]]; then
        pids=$(server_pids "$1")
        for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
    else
        pids=$pid
        kill -TERM "$pid" 2>/dev/null || true
    fi
    for p in $pids; do
        for _ in $(seq 1 3000); do
            running "$p" || break
            sleep 0.01
        done
        running "$p" && die "$1 (pid $p) did not stop within 30 s"
    done
    wait "$pid" 2>/dev/null || true
    untrack "$pid"
    awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f\n", b - a }'
}

# --- helpers ---------------------------------------------------------------------------------
# Waits until URL answers 200, up to LIMIT seconds (a starting edge reads its index first).
wait_ok() {
    local url=$1 limit=${2:-10}
    for _ in $(seq 1 $((limit * 10))); do
        [[ "$(curl -sk -o /dev/null -w '%{http_code}' --max-time 1 "$url" 2>/dev/null)" == 200 ]] && return 0
        sleep 0.1
    done
    die "$url did not come up"
}

x_cache() {
    curl -s -o /dev/null -D - "$@" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-cache" { print $2 }'
}

# Dies (with the end of its log) when SERVER's process is gone.
alive() {
    kill -0 "${PID[$1]}" 2>/dev/null && return 0
    local logf="$WORK/${CONF_NAME[$1]}.log"
    [[ $1 == nginx ]] && logf="$WORK/${CONF_NAME[$1]}/error.log"
    wait "${PID[$1]}" 2>/dev/null
    log "$1 (pid ${PID[$1]}) is gone, exit status $?; the end of $logf:"
    tail -20 "$logf" | sed 's/\x1b\[[0-9;]*m//g' >&2
    KEEP_WORK=1
    die "$1 died (scratch directory kept: $WORK)"
}

# The sum of an edge metric's samples (NAME exactly, or NAME{labels} as given).
edge_metric() {
    curl -s "http://$EDGE_ADMIN/metrics" |
        awk -v m="$1" '$1 == m || (m !~ /\{/ && index($1, m "{") == 1) { s += $2 } END { printf "%.0f\n", s }'
}

# "busy all": the edge's disk write errors for 1024 pending writes (the entry stayed in
# memory only), and all its disk errors.
edge_disk_errors() {
    curl -s "http://$EDGE_ADMIN/metrics" | awk 'index($1, "cdn_cache_disk_errors_total{") == 1 {
        all += $2; if ($1 ~ /kind="busy"/) busy += $2 } END { printf "%.0f %.0f\n", busy, all }'
}

# The server's processes: the edge; nginx's master and its children.
server_pids() {
    echo "${PID[$1]}"
    pgrep -P "${PID[$1]}" 2>/dev/null || true
}

tree_cpu() {
    local total=0 pid
    for pid in $(server_pids "$1"); do
        total=$(awk -v t="$total" -v c="$(cpu_seconds "$pid" 2>/dev/null || echo 0)" 'BEGIN { printf "%.2f", t + c }')
    done
    echo "$total"
}

# Bytes the server's processes made the kernel read from the block device (not the page cache).
tree_io_read() {
    local pid
    for pid in $(server_pids "$1"); do
        awk '$1 == "read_bytes:" { print $2 }' "/proc/$pid/io" 2>/dev/null || true
    done | awk '{ s += $1 } END { printf "%.0f\n", s }'
}

# "rss anon file shmem" in KiB summed over the server's processes (nginx: master and
# workers, not the cache manager and loader).
server_rss() {
    local pid
    for pid in $(server_pids "$1"); do
        if [[ $1 == nginx ]] && ! grep -qE 'master|worker' "/proc/$pid/cmdline" 2>/dev/null; then continue; fi
        cat "/proc/$pid/status" 2>/dev/null || true
    done | awk '$1 ~ /^(VmRSS|RssAnon|RssFile|RssShmem):$/ { s[$1] += $2 }
        END { printf "%d %d %d %d\n", s["VmRSS:"], s["RssAnon:"], s["RssFile:"], s["RssShmem:"] }'
}

# Bytes of nginx's keys zone that exist in memory (the pages any process ever touched):
# the shared mapping's backing shmem file, whose st_blocks counts its pages, through
# /proc/<master>/map_files (needs root). The zone is the one KEYS_ZONE_MIB mapping.
zone_bytes() {
    python3 - "${PID[nginx]}" "$KEYS_ZONE_MIB" <<'EOF'
import os, sys
pid, mib = sys.argv[1], int(sys.argv[2])
for line in open(f"/proc/{pid}/maps"):
    rng, perms = line.split()[:2]
    a, b = (int(x, 16) for x in rng.split("-"))
    if b - a == mib << 20 and perms.startswith("rw-s"):
        print(os.stat(f"/proc/{pid}/map_files/{rng}").st_blocks * 512)
        break
else:
    sys.exit("no keys zone mapping found")
EOF
}

# Waits until the edge's disk tier stops growing (background writes done): its disk
# objects and written bytes unchanged over 3 s. Prints "objects bytes".
settle_edge() {
    local last="" now same=0
    for _ in $(seq 1 300); do
        now="$(edge_metric 'cdn_cache_objects{tier="disk"}') $(edge_metric cdn_cache_disk_write_bytes_total)"
        if [[ $now == "$last" ]]; then
            same=$((same + 1))
            ((same >= 3)) && break
        else
            same=0
        fi
        last=$now
        sleep 1
    done
    echo "$(edge_metric 'cdn_cache_objects{tier="disk"}') $(edge_metric 'cdn_cache_bytes{tier="disk"}')"
}

# fill SERVER URLPREFIX FIRST LAST PARALLEL: GETs URLPREFIX<n> for each n with PARALLEL
# curls at once, each on one keep-alive connection; prints the seconds it took.
fill() {
    local server=$1 prefix=$2 first=$3 last=$4 parallel=$5 t0 lists=() i
    t0=$(date +%s.%N)
    for i in $(seq 0 $((parallel - 1))); do
        seq "$first" "$last" | awk -v p="$prefix" -v k="$i" -v n="$parallel" \
            'NR % n == k { printf "url = \"%s%d\"\noutput = \"/dev/null\"\n", p, $1 }' >"$WORK/urls.$i"
        taskset -c 1 curl -s --fail -K "$WORK/urls.$i" &
        lists+=($!)
    done
    for i in "${lists[@]}"; do wait "$i" || die "fill: some of $prefix$first..$last failed through $server"; done
    awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f\n", b - a }'
}

# fill_record SERVER CASE OBJECTS SECONDS: the state of a cache after a fill.
fill_record() {
    local server=$1 case=$2 objects=$3 seconds=$4 disk="" mem="" errors="0 0"
    if [[ $server == edge ]]; then
        disk=$(settle_edge)
        mem="$(edge_metric 'cdn_cache_objects{tier="memory"}') $(edge_metric 'cdn_cache_bytes{tier="memory"}')"
        errors=$(edge_disk_errors)
    else
        disk=$(find "$NGINX_CACHE" -type f -printf '%b\n' | awk '{ n++; b += $1 * 512 } END { printf "%d %d\n", n, b }')
        mem="0 0"
    fi
    python3 -c '
import json, sys
a = sys.argv[1:]
d, m = a[4].split(), a[5].split()
print(json.dumps(dict(scenario="fill", case=a[1], server=a[0], objects=int(a[2]), seconds=float(a[3]),
    disk_objects=int(d[0]), disk_bytes=int(d[1]), memory_objects=int(m[0]), memory_bytes=int(m[1]),
    disk_write_busy=int(a[6].split()[0]), disk_errors=int(a[6].split()[1]))))' \
        "$server" "$case" "$objects" "$seconds" "$disk" "$mem" "$errors" | tee -a "$RESULTS" >&2
}

# The order of round REP: edge first in odd rounds, nginx first in even ones.
order() { if (($1 % 2)); then echo "${SERVERS[@]}"; else printf '%s\n' "${SERVERS[@]}" | tac | xargs; fi; }

# measure SCENARIO CASE STATE SERVER REP COMMAND...: runs a loadgen COMMAND (pinned to
# CPU 1) and appends its JSON with the server's CPU, the machine's, the origin GETs and
# the disk reads meanwhile.
measure() {
    local scenario=$1 case=$2 state=$3 server=$4 rep=$5 before after busy0 busy1 t0 t1 out o0 o1 d0=0 d1=0 io0 io1
    shift 5
    [[ $state == cold ]] && drop_caches
    wait_quiet
    alive "$server"
    o0=$(origin_gets)
    [[ $server == edge ]] && d0=$(edge_metric cdn_cache_disk_read_bytes_total)
    io0=$(tree_io_read "$server")
    before=$(tree_cpu "$server")
    busy0=$(busy_seconds)
    t0=$(date +%s.%N)
    out=$("$@")
    t1=$(date +%s.%N)
    alive "$server"
    busy1=$(busy_seconds)
    after=$(tree_cpu "$server")
    io1=$(tree_io_read "$server")
    [[ $server == edge ]] && d1=$(edge_metric cdn_cache_disk_read_bytes_total)
    sleep 0.3
    o1=$(origin_gets)
    python3 -c '
import json, sys
d = json.loads(sys.argv[1])
a = sys.argv[2:]
d.update(scenario=a[0], case=a[1], state=a[2], server=a[3], rep=int(a[4]), wall_s=round(float(a[6]) - float(a[5]), 3),
         server_cpu_s=round(float(a[8]) - float(a[7]), 2), busy_cpu_s=round(float(a[10]) - float(a[9]), 2),
         origin_gets=int(a[12]) - int(a[11]), device_read_bytes=int(a[14]) - int(a[13]))
if a[3] == "edge":
    d["disk_tier_read_bytes"] = int(a[16]) - int(a[15])
print(json.dumps(d))' "$out" "$scenario" "$case" "$state" "$server" "$rep" "$t0" "$t1" "$before" "$after" \
        "$busy0" "$busy1" "$o0" "$o1" "$io0" "$io1" "$d0" "$d1" | tee -a "$RESULTS" |
        python3 -c 'import json, sys; d = json.loads(sys.stdin.read()); print("== %s %s %s %s #%d: %.0f MB/s, %d/%d HITs, %d errors, %d origin GETs, disk tier %s MB, device %d MB" % (d["scenario"], d["case"], d["state"], d["server"], d["rep"], d["mb_per_s"], d["x_cache_hits"], d["requests"], d["errors"], d["origin_gets"], round(d["disk_tier_read_bytes"] / 1e6) if "disk_tier_read_bytes" in d else "-", d["device_read_bytes"] / 1e6))' >&2
}

# --- hits and ranges: large objects, working set larger than the edge's memory ----------------
if wants hits || wants ranges; then
    EDGE_DISK="$DISK_ROOT/edge-disk"
    NGINX_CACHE="$DISK_ROOT/nginx-cache"
    write_edge_config edge "$EDGE_DISK"
    write_nginx_config nginx "$NGINX_CACHE"
    log "edge on ${ADDR[edge]} (memory $EDGE_MEMORY, disk $EDGE_DISK), nginx $(nginx -v 2>&1 | cut -d/ -f2) on ${ADDR[nginx]} (cache $NGINX_CACHE, aio $NGINX_AIO); CPU 0"
    if has edge; then start edge edge; fi
    if has nginx; then start nginx nginx; fi

    if wants hits; then
        for size in $HIT_SIZES; do
            n_var="HIT_OBJECTS_$size"
            n=${!n_var:?HIT_OBJECTS_$size is not set}
            for server in "${SERVERS[@]}"; do
                log "hits: filling $server with $n × $size"
                secs=$(fill "$server" "http://${ADDR[$server]}/_gen/$size?v=" 1 "$n" 1)
                fill_record "$server" "$size" "$n" "$secs"
            done
        done
        for size in $HIT_SIZES; do
            n_var="HIT_OBJECTS_$size"
            for server in "${SERVERS[@]}"; do
                for v in 1 "${!n_var}"; do
                    status=$(x_cache "http://${ADDR[$server]}/_gen/$size?v=$v")
                    [[ $status == HIT ]] || die "$server: /_gen/$size?v=$v is not a HIT after the fill (X-Cache: $status)"
                done
            done
            log "edge: $(curl -s -o /dev/null -D - "http://${ADDR[edge]}/_gen/$size?v=2" | tr -d '\r' | grep -i '^cache-status' || echo 'no Cache-Status')"
        done
        for rep in $(seq 1 "$REPEAT"); do
            for size in $HIT_SIZES; do
                n_var="HIT_OBJECTS_$size"
                conns_var="CONNS_$size"
                for state in $HIT_STATES; do
                    for server in $(order "$rep"); do
                        measure hits "$size" "$state" "$server" "$rep" \
                            taskset -c 1 "$LOADGEN" --proto h1 --threads 1 \
                            --url "http://${ADDR[$server]}/_gen/$size?v={n}" --objects "${!n_var}" \
                            --connections "${!conns_var:-1}" --duration "$DURATION"
                    done
                done
            done
        done
    fi

    if wants ranges; then
        range_url() {
            if [[ $1 == nginx ]]; then echo "http://${ADDR[$1]}/slice/_gen/$RANGE_OBJECT"; else echo "http://${ADDR[$1]}/_gen/$RANGE_OBJECT"; fi
        }
        for server in "${SERVERS[@]}"; do
            log "ranges: $server fetches the whole $RANGE_OBJECT once"
            t0=$(date +%s.%N)
            got=$(curl -s -o /dev/null -w '%{size_download}' "$(range_url "$server")" || true)
            secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f\n", b - a }')
            [[ $got == "$(curl -s -o /dev/null -r 0-0 -D - "$(range_url "$server")" | tr -d '\r' |
                awk -F/ 'tolower($0) ~ /^content-range:/ { print $2 }')" ]] ||
                die "$server: the whole $RANGE_OBJECT ended early, after $got bytes"
            fill_record "$server" "range-$RANGE_OBJECT" 1 "$secs"
            status=$(x_cache "$(range_url "$server")" -r 5000000-6048575)
            [[ $status == HIT ]] || die "$server: a range of $RANGE_OBJECT is not a HIT (X-Cache: $status)"
        done
        for rep in $(seq 1 "$REPEAT"); do
            for mode in $RANGE_MODES; do
                flags=()
                [[ $mode == unaligned ]] && flags=(--range-unaligned)
                for state in $HIT_STATES; do
                    for server in $(order "$rep"); do
                        measure ranges "$mode" "$state" "$server" "$rep" \
                            taskset -c 1 "$LOADGEN" --proto h1 --threads 1 --url "$(range_url "$server")" \
                            --range-random "$RANGE_OBJECT" "${flags[@]}" --connections "$RANGE_CONNS" --duration "$DURATION"
                    done
                done
            done
        done
    fi
    if has edge; then log "edge after hits/ranges: disk $(edge_metric 'cdn_cache_objects{tier="disk"}') objects / $(edge_metric 'cdn_cache_bytes{tier="disk"}') B, memory $(edge_metric 'cdn_cache_bytes{tier="memory"}') B, disk reads $(edge_metric cdn_cache_disk_read_bytes_total) B, writes $(edge_metric cdn_cache_disk_write_bytes_total) B"; fi
    for f in "$WORK/edge.log" "$WORK/nginx/error.log"; do
        if grep -E -i ' (WARN|ERROR|\[error\]|\[crit\])' "$f" >/dev/null 2>&1; then
            log "$(basename "$(dirname "$f")")/$(basename "$f") has warnings or errors:"
            grep -E -i ' (WARN|ERROR|\[error\]|\[crit\])' "$f" | sed 's/\x1b\[[0-9;]*m//g' | head -10 >&2
        fi
    done
    for server in "${SERVERS[@]}"; do stop "$server" >/dev/null; done
    rm -rf "$EDGE_DISK" "$NGINX_CACHE" # room for the next scenario
fi

# --- restart: many small objects on disk; stop, start, time to ready; memory per object --------
# memory_record SERVER PHASE OBJECTS [ZONE]: RSS (and nginx's keys zone) now.
memory_record() {
    python3 -c '
import json, sys
a = sys.argv[1:]
r = [int(x) for x in a[3].split()]
d = dict(scenario="memory", server=a[0], phase=a[1], objects=int(a[2]), rss_kib=r[0], anon_kib=r[1], file_kib=r[2], shmem_kib=r[3])
if a[4]:
    d["zone_bytes"] = int(a[4])
print(json.dumps(d))' "$1" "$2" "$3" "$(server_rss "$1")" "${4:-}" | tee -a "$RESULTS" >&2
}

# The same 1,000 requests for one object before each memory reading (a cache that has served).
serve_some() {
    seq 1 1000 | awk -v u="http://${ADDR[$1]}/_gen/$RESTART_SIZE?v=0" '{ printf "url = \"%s\"\noutput = \"/dev/null\"\n", u }' >"$WORK/urls.warm"
    taskset -c 1 curl -s --fail -K "$WORK/urls.warm" || die "$1: requests for v=0 failed"
}

if wants restart; then
    EDGE_DISK="$DISK_ROOT/edge-disk-small"
    NGINX_CACHE="$DISK_ROOT/nginx-cache-small"
    write_edge_config edge-small "$EDGE_DISK"
    write_nginx_config nginx-small "$NGINX_CACHE"
    if has edge; then start edge edge-small; fi
    if has nginx; then start nginx nginx-small; fi
    N=$RESTART_OBJECTS
    SAMPLE=(1 $((N / 3)) $((2 * N / 3)) "$N")
    for server in "${SERVERS[@]}"; do
        serve_some "$server"
        sleep 2
        if [[ $server == nginx ]]; then memory_record nginx empty 0 "$(zone_bytes)"; else memory_record edge empty 0; fi
        log "restart: filling $server with $N × $RESTART_SIZE ($FILL_PARALLEL curls)"
        secs=$(fill "$server" "http://${ADDR[$server]}/_gen/$RESTART_SIZE?v=" 1 "$N" "$FILL_PARALLEL")
        fill_record "$server" "$RESTART_SIZE" "$N" "$secs"
        sleep 2
        if [[ $server == nginx ]]; then
            memory_record nginx filled "$(find "$NGINX_CACHE" -type f | wc -l)" "$(zone_bytes)"
        else
            memory_record edge filled "$(edge_metric 'cdn_cache_objects{tier="disk"}')"
        fi
    done
    for rep in $(seq 1 "$REPEAT"); do
        for server in $(order "$rep"); do
            for case in $RESTART_CASES; do
                state=${case#*-}
                wait_quiet
                stop_s=$(stop "$server" "${case%-*}")
                [[ $state == cold ]] && drop_caches
                o0=$(origin_gets)
                hits=()
                for v in "${SAMPLE[@]}"; do hits+=(--hit "http://${ADDR[$server]}/_gen/$RESTART_SIZE?v=$v"); done
                if [[ $server == edge ]]; then
                    out=$(python3 "$BENCH/startup.py" --pidfile "$WORK/pid" --log "$WORK/edge-small.log" \
                        --ready "http://$EDGE_ADMIN/readyz" "${hits[@]}" -- \
                        taskset -c 0 "$CDN" edge --config "$WORK/edge-small.toml")
                else
                    out=$(python3 "$BENCH/startup.py" --pidfile "$WORK/pid" --log "$WORK/nginx-small/stdout.log" \
                        "${hits[@]}" -- taskset -c 0 nginx -p "$WORK/nginx-small" -c "$WORK/nginx-small/nginx.conf")
                fi
                PID[$server]=$(cat "$WORK/pid")
                track "${PID[$server]}"
                sleep 0.3
                o1=$(origin_gets)
                objects=""
                index_s=""
                if [[ $server == edge ]]; then
                    sleep 1 # the tier gauges are refreshed every second
                    objects=$(edge_metric 'cdn_cache_objects{tier="disk"}')
                    index_s=$(curl -s "http://$EDGE_ADMIN/metrics" | awk '$1 == "cdn_cache_disk_index_seconds" { print $2 }')
                fi
                line=$(python3 -c '
import json, sys
d = json.loads(sys.argv[1])
a = sys.argv[2:]
d.update(scenario="restart", case=a[0], server=a[1], rep=int(a[2]), stop_s=float(a[3]), origin_gets=int(a[5]) - int(a[4]))
if a[6]:
    d["disk_objects"] = int(a[6])
if a[7]:
    d["index_s"] = float(a[7])
print(json.dumps(d))' "$out" "$case" "$server" "$rep" "$stop_s" "$o0" "$o1" "$objects" "$index_s")
                echo "$line" >>"$RESULTS"
                log "restart $case $server #$rep: $line"
                # Memory after a restart: the index only (and the same 1,000 requests as before).
                serve_some "$server"
                sleep 1
                if [[ $server == edge ]]; then
                    memory_record edge "restart-$case" "$objects"
                elif ((NGINX_LOADER)) && [[ $rep == "$REPEAT" && $case == "${RESTART_CASES##* }" ]]; then
                    # nginx's cache loader starts 60 s after nginx and walks the cache
                    # (loader_files=100 per iteration, loader_sleep=50ms: the defaults).
                    memory_record nginx "restart-$case" 0 "$(zone_bytes)"
                    log "restart: waiting for nginx's cache loader (it starts 60 s after nginx)"
                    t_start=$(date -d "$(ps -o lstart= -p "${PID[nginx]}")" +%s)
                    seen=0
                    for _ in $(seq 1 3000); do
                        if pgrep -P "${PID[nginx]}" -f 'cache loader' >/dev/null; then
                            seen=1
                        elif ((seen)); then
                            break
                        fi
                        sleep 0.1
                    done
                    loader_s=$(($(date +%s) - t_start))
                    memory_record nginx "loaded" "$(find "$NGINX_CACHE" -type f | wc -l)" "$(zone_bytes)"
                    echo "{\"scenario\":\"loader\",\"server\":\"nginx\",\"case\":\"$case\",\"loader_done_s\":$loader_s,\"seen\":$seen}" | tee -a "$RESULTS" >&2
                else
                    memory_record nginx "restart-$case" 0 "$(zone_bytes)"
                fi
            done
        done
    done
    grep -E -i ' (WARN|ERROR)' "$WORK/edge-small.log" | sed 's/\x1b\[[0-9;]*m//g' | head -10 >&2 || true
    for server in "${SERVERS[@]}"; do stop "$server" >/dev/null; done
fi

python3 "$BENCH/disk-report.py" "$RESULTS"
