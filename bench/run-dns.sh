#!/usr/bin/env bash
# Geo-DNS queries per second (issue 7): `cdn geo` (joined to a cluster of one control
# node and three edges, answering the nearest two edges per query, ECS on) against
# gdnsd serving the same zone statically, both measured with dnsperf in one run,
# the server pinned to CPU 0 and dnsperf to CPU 1.
#   bench/run-dns.sh                 # installs dnsperf and gdnsd if missing
#   SECONDS_PER_RUN=20 bench/run-dns.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

RUN=${SECONDS_PER_RUN:-10}
SECRET=bench-cluster-secret-0123456789
need=()
command -v dnsperf >/dev/null || need+=(dnsperf)
command -v gdnsd >/dev/null || [[ -x /usr/sbin/gdnsd ]] || need+=(gdnsd)
if ((${#need[@]})); then
    log "apt-get install ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
GDNSD=$(command -v gdnsd || echo /usr/sbin/gdnsd)
make_work
build_cdn

# A small cluster so geo has healthy edges to choose from.
mkdir -p "$WORK/content" && echo ok > "$WORK/content/index.html"
printf 'root = "%s"\n[listen]\nhttp = "127.0.0.80:8080"\n' "$WORK/content" > "$WORK/origin.toml"
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
RUST_LOG=warn "$CDN" origin --config "$WORK/origin.toml" 2>"$WORK/origin.log" & track $!
RUST_LOG=warn "$CDN" control --config "$WORK/control.toml" 2>"$WORK/control.log" & track $!
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
    RUST_LOG=warn "$CDN" edge --config "$WORK/edge-$i.toml" 2>"$WORK/edge-$i.log" & track $!
done
cat > "$WORK/geo.toml" <<TOML
node_id = "geo-1"
zone = "cdn.test."
rate_limit = 0            # measuring throughput, not the limiter
[listen]
dns = "127.0.0.80:5300"
admin = "127.0.0.80:9053"
[[networks]]
cidr = "10.1.0.0/16"
location = { lat = 40.71, lon = -74.01 }
[[networks]]
cidr = "127.0.0.0/8"
location = { lat = 53.35, lon = -6.26 }
[cluster]
listen = "127.0.0.80:7947"
seeds = ["127.0.0.80:7946"]
secret = "$SECRET"
TOML
RUST_LOG=warn taskset -c 0 "$CDN" geo --config "$WORK/geo.toml" 2>"$WORK/geo.log" & GEO=$!; track $GEO
for _ in $(seq 1 100); do
    [[ $(dig @127.0.0.80 -p 5300 www.cdn.test A +short 2>/dev/null | wc -l) -ge 2 ]] && break
    sleep 0.1
done
[[ $(dig @127.0.0.80 -p 5300 www.cdn.test A +short | wc -l) -ge 2 ]] || die "geo does not answer with edges"

# gdnsd: the same zone, static answers.
mkdir -p "$WORK/gdnsd/zones" "$WORK/gdnsd/run" "$WORK/gdnsd/state"
cat > "$WORK/gdnsd/config" <<CONF
options => { listen => [ 127.0.0.90:5300 ], run_dir => $WORK/gdnsd/run, state_dir => $WORK/gdnsd/state }
CONF
cat > "$WORK/gdnsd/zones/cdn.test" <<ZONE
@    3600 SOA ns1 hostmaster 1 3600 600 604800 30
@    3600 NS  ns1
ns1  3600 A   127.0.0.90
www  30   A   127.0.0.81
www  30   A   127.0.0.82
ZONE
taskset -c 0 "$GDNSD" -c "$WORK/gdnsd" -f start >"$WORK/gdnsd.log" 2>&1 & GDNSD_PID=$!; track $GDNSD_PID
for _ in $(seq 1 50); do dig @127.0.0.90 -p 5300 www.cdn.test A +short >/dev/null 2>&1 && break; sleep 0.1; done
dig @127.0.0.90 -p 5300 www.cdn.test A +short | grep -q 127.0.0.8 || die "gdnsd does not answer (see $WORK/gdnsd.log)"

printf 'www.cdn.test A\n' > "$WORK/queries"
# ECS queries (each from a /24) exercise the per-client location path of geo.
measure() { # name addr [extra dnsperf flags]
    local name=$1 addr=$2; shift 2
    wait_quiet
    taskset -c 1 dnsperf -s "$addr" -p 5300 -d "$WORK/queries" -l "$RUN" -c 8 -q 200 "$@" 2>&1 \
        | awk -v n="$name" '/Queries per second/ { qps = $4 } /Average Latency/ { lat = $4 } /Queries lost/ { lost = $3 }
                          END { printf "%s %s %s %s\n", n, qps, lat, lost }'
}
{
    measure geo 127.0.0.80
    measure geo-ecs 127.0.0.80 -E 8:00011800c0000200   # ECS 192.0.2.0/24
    measure gdnsd 127.0.0.90
} > "$WORK/qps.txt"
cat "$WORK/qps.txt" >&2
awk '
    { qps[$1] = $2; lat[$1] = $3; lost[$1] = $4 }
    END {
        print "| server | queries/s | avg latency s | lost | ratio to gdnsd |"
        print "|---|---|---|---|---|"
        split("geo geo-ecs gdnsd", order, " ")
        for (i = 1; i <= 3; i++) { n = order[i]
            printf "| %s | %.0f | %s | %s | %.2f |\n", n, qps[n], lat[n], lost[n], qps[n] / qps["gdnsd"] }
    }' "$WORK/qps.txt" | tee "$WORK/result.md"
{
    echo
    machine
    echo "- command: \`bench/run-dns.sh\` (${RUN} s per server, dnsperf -c 8 -q 200, server on CPU 0, dnsperf on CPU 1)"
} >> "$WORK/result.md"
mkdir -p "$BENCH/out" && cp "$WORK/result.md" "$BENCH/out/dns.md"
