#!/usr/bin/env bash
# Geo-DNS queries per second against gdnsd (issues 7 and 23): `cdn geo` (joined to a
# cluster of one control node and three edges, answering the nearest two edges per
# query, ECS on) against gdnsd 3 serving the same zone statically, measured with
# dnsperf, alternately, in ROUNDS rounds; medians with min-max.
#
#   bench/run-dns.sh                              # 5 rounds, one core each (about 6 minutes)
#   ROUNDS=7 SECONDS_PER_RUN=5 bench/run-dns.sh
#   BASELINE=/path/to/older/cdn bench/run-dns.sh  # an older geo in the same rounds (geo-base)
#   CORES=2 bench/run-dns.sh                      # geo on 1 core vs 2 cores (see bench/README.md)
#
# CORES=1 (default): every server is pinned to CPU 0 with one UDP socket/thread
# (geo `udp_sockets = 1`, gdnsd `udp_threads = 1`), dnsperf to CPU 1.
# CORES=2: additionally geo-2 with two sockets on CPUs 0-1; dnsperf then shares
# those two cores with it (there is no third core for the load generator).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

RUN=${SECONDS_PER_RUN:-10}
ROUNDS=${ROUNDS:-5}
CORES=${CORES:-1}
LATENCY_QPS=${LATENCY_QPS:-20000}
LATENCY_SECONDS=${LATENCY_SECONDS:-5}
export QUIET_WAIT=${QUIET_WAIT:-10}
SECRET=bench-cluster-secret-0123456789
need=()
command -v dnsperf >/dev/null || need+=(dnsperf)
command -v gdnsd >/dev/null || [[ -x /usr/sbin/gdnsd ]] || need+=(gdnsd)
if ((${#need[@]})); then
    log "apt-get install ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
GDNSD=$(command -v gdnsd || echo /usr/sbin/gdnsd)
command -v taskset >/dev/null || die "needs taskset (util-linux)"
(($(nproc) >= 2)) || die "needs two CPUs"
make_work dns-bench
build_cdn

# A small cluster so geo has healthy edges to choose from; kept off CPU 0 and niced
# (idle once up: gossip only).
aside() { exec taskset -c 1 nice -n 10 "$@"; }  # exec: $! of `aside … &` is the server itself (cleanup kills it)
mkdir -p "$WORK/content" && echo ok > "$WORK/content/index.html"
printf 'root = "%s"\n[listen]\nhttp = "127.0.0.80:8080"\nadmin = "127.0.0.80:9091"\n' "$WORK/content" > "$WORK/origin.toml"
cat > "$WORK/control.toml" <<TOML
node_id = "control-1"
data_dir = "$WORK/control"
token = "bench-token-0123456789abcdef"
[listen]
api = "127.0.0.80:9000"
admin = "127.0.0.80:9001"
[cluster]
listen = "127.0.0.80:7946"
secret = "$SECRET"
TOML
RUST_LOG=warn aside "$CDN" origin --config "$WORK/origin.toml" 2>"$WORK/origin.log" & track $!
RUST_LOG=warn aside "$CDN" control --config "$WORK/control.toml" 2>"$WORK/control.log" & track $!
i=0
for spec in "40.71 -74.01" "53.35 -6.26" "19.08 72.88"; do
    i=$((i + 1)); ip=127.0.0.8$i
    read -r lat lon <<<"$spec"
    cat > "$WORK/edge-$i.toml" <<TOML
node_id = "edge-$i"
region = "r$i"
location = { lat = $lat, lon = $lon }
[listen]
http = "$ip:8080"
admin = "$ip:9090"
[origin]
url = "http://127.0.0.80:8080"
[cluster]
listen = "$ip:7946"
seeds = ["127.0.0.80:7946"]
secret = "$SECRET"
TOML
    RUST_LOG=warn aside "$CDN" edge --config "$WORK/edge-$i.toml" 2>"$WORK/edge-$i.log" & track $!
done
# The edges must be ready (origin reachable), or geo answers degraded (the slow path).
for i in 1 2 3; do wait_http "http://127.0.0.8$i:9090/readyz"; done

# geo_config NAME ADDR ADMIN GOSSIP [listen extras]
geo_config() {
    cat > "$WORK/$1.toml" <<TOML
node_id = "$1"
zone = "cdn.test."
rate_limit = 0            # measuring throughput, not the limiter
[listen]
dns = "$2:5300"
admin = "$3"
$5
[[networks]]
cidr = "10.1.0.0/16"
location = { lat = 40.71, lon = -74.01 }
[[networks]]
cidr = "127.0.0.0/8"
location = { lat = 53.35, lon = -6.26 }
[cluster]
listen = "$4"
seeds = ["127.0.0.80:7946"]
secret = "$SECRET"
TOML
}
# Servers: name address pid cpus-of-the-server cpus-of-dnsperf
SERVERS=()
start_geo() { # name binary addr admin gossip cpus extras
    local name=$1 binary=$2 addr=$3
    geo_config "$name" "$addr" "$4" "$5" "$7"
    RUST_LOG=warn taskset -c "$6" "$binary" geo --config "$WORK/$name.toml" 2>"$WORK/$name.log" & track $!
    SERVERS+=("$name $addr $! $6")
}
start_geo geo "$CDN" 127.0.0.80 127.0.0.80:9053 127.0.0.80:7947 0 "udp_sockets = 1"
if [[ -n "${BASELINE:-}" ]]; then
    cp "$BASELINE" "$WORK/cdn-base"
    start_geo geo-base "$WORK/cdn-base" 127.0.0.79 127.0.0.79:9053 127.0.0.79:7947 0 ""
fi
if ((CORES == 2)); then
    start_geo geo-2 "$CDN" 127.0.0.78 127.0.0.78:9053 127.0.0.78:7947 0,1 "udp_sockets = 2"
fi

# gdnsd: the same zone, static answers, one UDP thread (two with CORES=2: gdnsd-2).
start_gdnsd() { # name addr cpus threads
    local dir="$WORK/$1"
    mkdir -p "$dir/zones" "$dir/run" "$dir/state"
    cat > "$dir/config" <<CONF
options => {
  listen => [ $2:5300 ]
  run_dir => $dir/run
  state_dir => $dir/state
  udp_threads => $4
  tcp_threads => 1
}
CONF
    cat > "$dir/zones/cdn.test" <<ZONE
@    3600 SOA ns1 hostmaster 1 3600 600 604800 30
@    3600 NS  ns1
ns1  3600 A   $2
www  30   A   127.0.0.81
www  30   A   127.0.0.82
ZONE
    taskset -c "$3" "$GDNSD" -c "$dir" -f start >"$dir.log" 2>&1 & track $!
    SERVERS+=("$1 $2 $! $3")
}
start_gdnsd gdnsd 127.0.0.90 0 1
((CORES == 2)) && start_gdnsd gdnsd-2 127.0.0.91 0,1 2

for server in "${SERVERS[@]}"; do
    read -r name addr _ _ <<<"$server"
    for _ in $(seq 1 100); do
        [[ $(dig @"$addr" -p 5300 www.cdn.test A +short 2>/dev/null | wc -l) -ge 2 ]] && break
        sleep 0.1
    done
    [[ $(dig @"$addr" -p 5300 www.cdn.test A +short | wc -l) -ge 2 ]] || die "$name does not answer with two edges (see $WORK)"
done
# geo must see the edges healthy (ready gossiped): a degraded answer goes the slow way.
degraded() { curl -s "http://$1:9053/metrics" | awk '/^cdn_dns_degraded_answers_total/ { print $2 }'; }
for server in "${SERVERS[@]}"; do
    read -r name addr _ _ <<<"$server"
    [[ $name == geo* ]] || continue
    for attempt in $(seq 1 100); do
        before=$(degraded "$addr")
        dig @"$addr" -p 5300 www.cdn.test A +short >/dev/null
        [[ $(degraded "$addr") == "$before" ]] && break
        ((attempt < 100)) || die "$name answers degraded (no healthy edge; see $WORK)"
        sleep 0.2
    done
done
log "servers up: $(printf '%s; ' "${SERVERS[@]}")"
declare -A DEGRADED
for server in "${SERVERS[@]}"; do
    read -r name addr _ _ <<<"$server"
    [[ $name == geo* ]] && DEGRADED[$name]=$(degraded "$addr")
done

printf 'www.cdn.test A\n' > "$WORK/queries"
# The ECS queries (each from 192.0.2.0/24) exercise geo's per-client location path.
# The address is three octets, as RFC 7871 wants for a /24: gdnsd answers FORMERR
# when it carries more (8:00011800c0000200, a whole address, as often written).
ECS=(-E 8:00011800c00002)
MODES=${MODES:-plain ecs}
RAW="$WORK/runs.txt"
: > "$RAW"

# measure ROUND NAME ADDR PID SERVER_CPUS MODE: one throughput run (closed loop,
# 8 sockets x 200 queries in flight) and one latency run (LATENCY_QPS offered).
measure() {
    local round=$1 name=$2 addr=$3 pid=$4 cpus=$5 mode=$6 flags=() client=1 cpu0 cpu1 busy0 busy1 out
    [[ $mode == ecs ]] && flags=("${ECS[@]}")
    [[ $cpus == *,* ]] && client=0,1
    wait_quiet
    cpu0=$(cpu_seconds "$pid"); busy0=$(busy_seconds)
    out=$(taskset -c "$client" dnsperf -s "$addr" -p 5300 -d "$WORK/queries" -l "$RUN" -c 8 -q 200 "${flags[@]}" 2>&1)
    cpu1=$(cpu_seconds "$pid"); busy1=$(busy_seconds)
    grep -q 'Response codes: *NOERROR [0-9]* (100.00%)' <<<"$out" ||
        log "warning: $name $mode: not every response was NOERROR: $(grep 'Response codes' <<<"$out")"
    awk -v r="$round" -v n="$name" -v m="$mode" -v c0="$cpu0" -v c1="$cpu1" -v b0="$busy0" -v b1="$busy1" '
        /Queries completed/ { done = $3 } /Queries lost/ { lost = $3 } /Queries per second/ { qps = $4 }
        /Average Latency/ { lat = $4 }
        END { printf "qps %s %s %s %s %s %s %s %.2f %.2f\n", r, n, m, qps, lat, done, lost, c1 - c0, b1 - b0 }' <<<"$out" >> "$RAW"
    # Latency at a moderate, fixed load: every response's latency, then percentiles.
    taskset -c "$client" dnsperf -s "$addr" -p 5300 -d "$WORK/queries" -l "$LATENCY_SECONDS" -c 8 -q 200 \
        -Q "$LATENCY_QPS" -v "${flags[@]}" 2>/dev/null > "$WORK/latency.txt" || true
    awk '$1 == ">" && $2 == "NOERROR" { print $NF }' "$WORK/latency.txt" | sort -g |
        awk -v r="$round" -v n="$name" -v m="$mode" '{ v[NR] = $1 }
            END { if (NR == 0) { print "lat", r, n, m, "nan", "nan", 0; exit }
                  p50 = v[int(NR * 0.50 + 0.999)]; p99 = v[int(NR * 0.99 + 0.999)]
                  printf "lat %s %s %s %s %s %d\n", r, n, m, p50, p99, NR }' >> "$RAW"
    tail -n 2 "$RAW" >&2
}

for round in $(seq 1 "$ROUNDS"); do
    # Alternate: forwards in odd rounds, backwards in even ones.
    order=("${SERVERS[@]}")
    if ((round % 2 == 0)); then
        order=()
        for ((k = ${#SERVERS[@]} - 1; k >= 0; k--)); do order+=("${SERVERS[k]}"); done
    fi
    for mode in $MODES; do
        for server in "${order[@]}"; do
            read -r name addr pid cpus <<<"$server"
            measure "$round" "$name" "$addr" "$pid" "$cpus" "$mode"
        done
    done
done

for server in "${SERVERS[@]}"; do
    read -r name addr _ _ <<<"$server"
    if [[ $name == geo* && $(degraded "$addr") != "${DEGRADED[$name]}" ]]; then
        log "warning: $name answered degraded during the run (an edge not ready?): its figures include the slow path"
    fi
done
python3 "$BENCH/dns-report.py" "$RAW" > "$WORK/result.md"
{
    echo
    machine
    echo "- gdnsd: $({ "$GDNSD" -h 2>&1 || true; } | grep -m1 -o 'gdnsd version [0-9.]*'), dnsperf: $({ dnsperf -h 2>&1 || true; } | grep -m1 -o 'Version [0-9.]*')"
    echo "- command: \`ROUNDS=$ROUNDS SECONDS_PER_RUN=$RUN CORES=$CORES MODES=\"$MODES\" bench/run-dns.sh\` (dnsperf -c 8 -q 200 for ${RUN} s; latency runs -Q $LATENCY_QPS for ${LATENCY_SECONDS} s)"
} >> "$WORK/result.md"
cat "$WORK/result.md"
mkdir -p "$BENCH/out" && cp "$WORK/result.md" "$BENCH/out/dns.md" && cp "$RAW" "$BENCH/out/dns-runs.txt"
