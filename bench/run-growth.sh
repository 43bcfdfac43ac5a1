#!/usr/bin/env bash
# How cost grows with the fleet (issue 23, part 4): for each fleet size in EDGES, one
# control node and N edges as separate processes on loopback (127.0.8.1-N, control and
# origin on 127.0.8.200), then
#   - gossip bytes per node per second, idle (IDLE seconds) and while purging, from
#     every member's `cdn_gossip_bytes_total{direction="sent"}`;
#   - purge propagation: PURGES purges at RATE per second; the time from the API's
#     acknowledgement to the last edge's `applied` report (`completed_ms`), p50/p99.
# The other growth figures come from the other scripts (see bench/README.md):
# memory per object (run-peers.sh memory), DNS and HIT req/s by cores (run-dns.sh,
# run-peers.sh with EDGE_CPUS).
#   bench/run-growth.sh                      # EDGES="3 10 30 60", builds release
#   EDGES="3 10" PURGES=50 SKIP_BUILD=1 bench/run-growth.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

EDGES=${EDGES:-"3 10 30 60"}
PURGES=${PURGES:-100}
RATE=${RATE:-20}
IDLE=${IDLE:-10}
TOKEN=bench-token-0123456789abcdef
SECRET=bench-cluster-secret-0123456789
HUB=127.0.8.200
make_work cdn-growth
build_cdn

mkdir -p "$WORK/content"
echo hello > "$WORK/content/index.html"
cat > "$WORK/origin.toml" <<TOML
root = "$WORK/content"
[listen]
http = "$HUB:8080"
TOML
RUST_LOG=warn "$CDN" origin --config "$WORK/origin.toml" 2>"$WORK/origin.log" & track $!

# Sum of a counter over the members' metrics endpoints (admin addresses on stdin).
sum_metric() {
    local pattern=$1 total=0 value addr
    while read -r addr; do
        value=$(curl -s --max-time 2 "http://$addr/metrics" | awk -v p="$pattern" 'index($0, p) == 1 { print $2 }')
        total=$(awk -v a="$total" -v b="${value:-0}" 'BEGIN { printf "%.0f", a + b }')
    done
    echo "$total"
}

results="$WORK/rows.md"
: > "$results"
for n in $EDGES; do
    ((n <= 199)) || die "at most 199 edges"
    log "fleet of $n edges"
    rm -rf "$WORK/control"
    cat > "$WORK/control.toml" <<TOML
node_id = "control-1"
data_dir = "$WORK/control"
token = "$TOKEN"
[listen]
api = "$HUB:9000"
admin = "$HUB:9001"
[cluster]
listen = "$HUB:7946"
secret = "$SECRET"
TOML
    fleet=()
    RUST_LOG=warn "$CDN" control --config "$WORK/control.toml" 2>"$WORK/control-$n.log" & track $!; fleet+=($!)
    admins=("$HUB:9001")
    for i in $(seq 1 "$n"); do
        ip=127.0.8.$i
        cat > "$WORK/edge-$i.toml" <<TOML
node_id = "edge-$i"
region = "r$((i % 6))"
[listen]
http = "$ip:8080"
admin = "$ip:9090"
[origin]
url = "http://$HUB:8080"
[cache]
memory = "16MiB"
[cluster]
listen = "$ip:7946"
seeds = ["$HUB:7946"]
secret = "$SECRET"
TOML
        RUST_LOG=warn "$CDN" edge --config "$WORK/edge-$i.toml" 2>"$WORK/edge-$n-$i.log" & track $!; fleet+=($!)
        admins+=("$ip:9090")
    done
    for i in $(seq 1 "$n"); do wait_http "http://127.0.8.$i:9090/readyz"; done
    export CDN_CONTROL=http://$HUB:9000 CDN_TOKEN=$TOKEN
    alive=0
    for _ in $(seq 1 600); do
        alive=$("$CDN" nodes 2>/dev/null | grep -c 'edge .*alive' || true)
        ((alive == n)) && break
        sleep 0.1
    done
    ((alive == n)) || die "only $alive of $n edges alive in the control's view"
    sleep 2
    wait_quiet
    sent_a=$(printf '%s\n' "${admins[@]}" | sum_metric 'cdn_gossip_bytes_total{direction="sent"}')
    t_a=$(date +%s.%N)
    sleep "$IDLE"
    sent_b=$(printf '%s\n' "${admins[@]}" | sum_metric 'cdn_gossip_bytes_total{direction="sent"}')
    t_b=$(date +%s.%N)
    cpu_a=0
    for pid in "${fleet[@]}"; do cpu_a=$(awk -v a="$cpu_a" -v b="$(cpu_seconds "$pid")" 'BEGIN { print a + b }'); done
    python3 - "$PURGES" "$RATE" > "$WORK/purge-$n.json" <<'PY'
import json, os, sys, time, urllib.request

base, token = os.environ["CDN_CONTROL"], os.environ["CDN_TOKEN"]
n, rate = int(sys.argv[1]), float(sys.argv[2])

def call(method, path, body=None):
    request = urllib.request.Request(base + path, method=method, data=body,
                                     headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())

ids, started = [], time.monotonic()
for i in range(n):
    kind = ("tags", ["t%d" % i]) if i % 2 else ("urls", ["https://www.cdn.test/obj/%d" % i])
    ids.append(call("POST", "/v1/purge", json.dumps({kind[0]: kind[1]}).encode())["id"])
    time.sleep(1.0 / rate)
sent_s = time.monotonic() - started
done = {}
while len(done) < n and time.monotonic() - started < 180:
    for purge_id in ids:
        if purge_id not in done:
            status = call("GET", "/v1/purge/" + purge_id)
            if status["status"] == "complete" and status["completed_ms"] is not None:
                done[purge_id] = status["completed_ms"]
    time.sleep(0.05)
values = sorted(done.values())
pick = lambda q: values[min(len(values) - 1, int(q * len(values)))] if values else None
print(json.dumps({"purges": n, "completed": len(values), "sent_s": round(sent_s, 2),
                  "p50": pick(0.5), "p99": pick(0.99), "max": values[-1] if values else None}))
PY
    t_c=$(date +%s.%N)
    sent_c=$(printf '%s\n' "${admins[@]}" | sum_metric 'cdn_gossip_bytes_total{direction="sent"}')
    cpu_b=0
    for pid in "${fleet[@]}"; do cpu_b=$(awk -v a="$cpu_b" -v b="$(cpu_seconds "$pid")" 'BEGIN { print a + b }'); done
    rss=0
    for pid in "${fleet[@]:1}"; do rss=$((rss + $(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"))); done
    python3 - "$n" "$sent_a" "$sent_b" "$t_a" "$t_b" "$sent_c" "$t_c" "$cpu_a" "$cpu_b" "$rss" "$WORK/purge-$n.json" >> "$results" <<'PY'
import json, sys
n = int(sys.argv[1]); sa, sb, ta, tb, sc, tc = map(float, sys.argv[2:8]); ca, cb = map(float, sys.argv[8:10])
rss = int(sys.argv[10]); p = json.load(open(sys.argv[11]))
members = n + 1
idle = (sb - sa) / (tb - ta) / members
busy = (sc - sb) / (tc - tb) / members
print("| %d | %.0f | %.0f | %s / %s | %s | %d/%d | %.2f | %.1f |" % (
    n, idle, busy, p["p50"], p["p99"], p["max"], p["completed"], p["purges"],
    (cb - ca) / (tc - tb) / members, rss / n / 1024))
PY
    tail -1 "$results" >&2
    for pid in "${fleet[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${fleet[@]}"; do wait "$pid" 2>/dev/null || true; done
done

{
    echo "| edges | gossip B/s per node, idle | gossip B/s per node, purging | purge p50 / p99 ms | max ms | completed | CPU per node while purging (cores) | RSS per edge MiB |"
    echo "|---:|---:|---:|---|---:|---|---:|---:|"
    cat "$results"
    echo
    machine
    echo "- command: \`bench/run-growth.sh\` (EDGES=\"$EDGES\" PURGES=$PURGES RATE=$RATE IDLE=$IDLE)"
} | tee "$WORK/result.md"
mkdir -p "$BENCH/out" && cp "$WORK/result.md" "$BENCH/out/growth.md"
