#!/usr/bin/env bash
# bench/run-h3.sh: HTTP/3 vs HTTP/2 throughput of cached objects at one edge (issue 5).
#
# Starts `cdn origin` (generated objects) and one `cdn edge` per QUIC congestion
# controller (https + h3 on one port, self-signed TLS) on loopback, warms /_gen/1MiB
# and /_gen/100MiB into each cache, and measures with `loadgen` the HIT throughput over
# h2 and h3 of each edge, every (controller, protocol) pair once per round in rotating
# order. The edges are pinned to CPU 0 (only the measured one is busy) and loadgen to
# CPU 1. Prints a markdown table (medians of REPEAT rounds) with the h3/h2 ratios; the
# raw runs go to bench/out/h3-<time>.jsonl.
#
# Environment (all optional):
#   DURATION=10s          each loadgen run
#   REPEAT=3              rounds (each measures every pair once), the table shows medians
#   QUIET_WAIT=30         seconds to wait for an idle machine before each measurement
#   CONGESTIONS="cubic bbr"
#   SIZES="1MiB 100MiB"
#   SHAPE_1MiB="1 8"      connections and streams per connection for 1MiB (and SHAPE_100MiB="1 1")
#   QUIC_EXTRA="..."      extra lines for each edge's [quic] section (e.g. "max_udp_payload = 65527")
#   SKIP_BUILD=1          use target/release as it is
#   KEEP_WORK=1           keep the scratch directory (configs, logs)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DURATION=${DURATION:-10s}
REPEAT=${REPEAT:-3}
CONGESTIONS=${CONGESTIONS:-"cubic bbr"}
SIZES=${SIZES:-"1MiB 100MiB"}
SHAPE_1MiB=${SHAPE_1MiB:-"1 8"}
SHAPE_100MiB=${SHAPE_100MiB:-"1 1"}

ORIGIN_IP=127.0.0.31
# One edge per congestion controller, 127.0.0.32, .33, ...: all run at once (each
# pinned to CPU 0, idle unless measured), so every round interleaves all
# (controller, protocol) pairs and a noisy minute hurts them alike.
declare -A EDGE_IP EDGE_PID
i=0
for cc in $CONGESTIONS; do
    EDGE_IP[$cc]=127.0.0.$((32 + i))
    i=$((i + 1))
done

command -v taskset >/dev/null || die "taskset (util-linux) is needed"
command -v python3 >/dev/null || die "python3 is needed for the table"
[[ $(nproc) -ge 2 ]] || die "needs 2 CPUs (edge on CPU 0, loadgen on CPU 1)"

make_work
build_binaries
mkdir -p "$BENCH/out"
RESULTS="$BENCH/out/h3-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
: >"$RESULTS"

ensure_free "$ORIGIN_IP:8080"
for cc in $CONGESTIONS; do ensure_free "${EDGE_IP[$cc]}:8443"; done

cat >"$WORK/origin.toml" <<EOF
root = "$WORK/content"
generate = true
default_cache_control = "public, max-age=86400"
[listen]
http = "$ORIGIN_IP:8080"
admin = "$ORIGIN_IP:9091"
EOF
mkdir -p "$WORK/content"
log "origin on $ORIGIN_IP:8080 (CPU 1: idle once the cache is warm)"
taskset -c 1 "$CDN" origin --config "$WORK/origin.toml" >"$WORK/origin.log" 2>&1 &
track $!
wait_http "http://$ORIGIN_IP:9091/healthz"

start_edge() {
    local cc=$1 ip=${EDGE_IP[$1]}
    cat >"$WORK/edge-$cc.toml" <<EOF
node_id = "bench-edge-$cc"
[listen]
http = "$ip:8080"
https = "$ip:8443"
h3 = "$ip:8443"
admin = "$ip:9090"
[tls]
self_signed = true
[origin]
url = "http://$ORIGIN_IP:8080"
[cache]
memory = "1GiB"
[quic]
congestion = "$cc"
${QUIC_EXTRA:-}
EOF
    log "edge with congestion=$cc on https://$ip:8443 (CPU 0)"
    taskset -c 0 "$CDN" edge --config "$WORK/edge-$cc.toml" >"$WORK/edge-$cc.log" 2>&1 &
    EDGE_PID[$cc]=$!
    track "${EDGE_PID[$cc]}"
    wait_http "http://$ip:9090/healthz"
}

warm() {
    local url=$1 status
    curl -sk -o /dev/null "$url" || die "warming $url failed"
    status=$(curl -sk -o /dev/null -D - "$url" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-cache" { print $2 }')
    [[ "$status" == HIT ]] || die "$url is not a cache HIT after warming (X-Cache: $status)"
}

measure() {
    local cc=$1 size=$2 proto=$3 rep=$4 pid=${EDGE_PID[$1]} shape conns streams before after busy0 busy1 drops0 drops1 line
    shape="SHAPE_$size"
    read -r conns streams <<<"${!shape}"
    wait_quiet
    before=$(cpu_seconds "$pid")
    busy0=$(busy_seconds)
    drops0=$(udp_drops)
    line=$(taskset -c 1 "$LOADGEN" --proto "$proto" --url "https://${EDGE_IP[$cc]}:8443/_gen/$size" --insecure \
        --connections "$conns" --streams "$streams" --duration "$DURATION" 2>>"$WORK/loadgen.err")
    after=$(cpu_seconds "$pid")
    busy1=$(busy_seconds)
    drops1=$(udp_drops)
    log "$cc $size $proto #$rep: $line"
    # other_cpu_s: CPU the rest of the machine used meanwhile (noise from other work).
    python3 -c '
import json, sys
d = json.loads(sys.argv[1])
edge = float(sys.argv[6]) - float(sys.argv[5])
busy = float(sys.argv[8]) - float(sys.argv[7])
d.update(cc=sys.argv[2], size=sys.argv[3], rep=int(sys.argv[4]), edge_cpu_s=round(edge, 2),
         other_cpu_s=round(max(0.0, busy - edge - (d.get("client_cpu_s") or 0)), 2),
         udp_rcvbuf_drops=int(sys.argv[10]) - int(sys.argv[9]))
print(json.dumps(d))' "$line" "$cc" "$size" "$rep" "$before" "$after" "$busy0" "$busy1" "$drops0" "$drops1" >>"$RESULTS"
}

for cc in $CONGESTIONS; do
    start_edge "$cc"
    for size in $SIZES; do warm "https://${EDGE_IP[$cc]}:8443/_gen/$size"; done
done
combos=()
for cc in $CONGESTIONS; do for proto in h2 h3; do combos+=("$cc $proto"); done; done
for rep in $(seq 1 "$REPEAT"); do
    for size in $SIZES; do
        # Rotate (and on even rounds reverse) the order so no pair always goes first.
        n=${#combos[@]}
        k=$(((rep - 1) % n))
        order=("${combos[@]:k}" "${combos[@]:0:k}")
        if ((rep % 2 == 0)); then
            reversed=()
            for ((j = n - 1; j >= 0; j--)); do reversed+=("${order[j]}"); done
            order=("${reversed[@]}")
        fi
        for combo in "${order[@]}"; do
            read -r cc proto <<<"$combo"
            measure "$cc" "$size" "$proto" "$rep"
        done
    done
done
for cc in $CONGESTIONS; do
    if grep -E ' (WARN|ERROR) ' "$WORK/edge-$cc.log" >/dev/null; then
        log "edge ($cc) logged warnings or errors:"
        grep -E ' (WARN|ERROR) ' "$WORK/edge-$cc.log" | sed 's/\x1b\[[0-9;]*m//g' | sort | uniq -c | head -20 >&2
    fi
done
if [[ -s "$WORK/loadgen.err" ]]; then
    log "loadgen errors:"
    sort "$WORK/loadgen.err" | uniq -c | head -20 >&2
fi

python3 - "$RESULTS" "$DURATION" "$REPEAT" <<'EOF'
import json, statistics, sys
path, duration, repeat = sys.argv[1], sys.argv[2], sys.argv[3]
runs = [json.loads(l) for l in open(path) if l.strip()]
cells = {}
for r in runs:
    cells.setdefault((r["cc"], r["size"], r["proto"]), []).append(r)
med = lambda rs, k: statistics.median(r[k] for r in rs)
def cell(cc, size, proto):
    rs = cells[(cc, size, proto)]
    mb = med(rs, "mb_per_s")
    eff = statistics.median(r["bytes"] / 1e6 / r["edge_cpu_s"] for r in rs if r["edge_cpu_s"] > 0) if any(r["edge_cpu_s"] > 0 for r in rs) else 0
    cpu = statistics.median(100 * r["edge_cpu_s"] / r["seconds"] for r in rs)
    errors = sum(r["errors"] for r in rs)
    misses = sum(r["requests"] - r["x_cache_hits"] for r in rs)
    client = statistics.median(100 * (r.get("client_cpu_s") or 0) / r["seconds"] for r in rs)
    other = statistics.median(100 * r.get("other_cpu_s", 0) / r["seconds"] for r in rs)
    drops = sum(r.get("udp_rcvbuf_drops", 0) for r in rs)
    return dict(drops=drops, client=client, other=other, mb=mb, p50=med(rs, "p50_ms"), p99=med(rs, "p99_ms"), eff=eff, cpu=cpu, errors=errors, misses=misses,
                shape=f'{rs[0]["connections"]}×{rs[0]["streams"]}', runs=[r["mb_per_s"] for r in rs])
ccs = list(dict.fromkeys(r["cc"] for r in runs))
sizes = list(dict.fromkeys(r["size"] for r in runs))
print(f"HIT throughput, medians of {repeat} runs of {duration}; MB = 10^6 bytes; edge on CPU 0, loadgen on CPU 1. "
      "Edge CPU: % of one CPU; h3 UDP drops: datagrams the kernel dropped for a full receive buffer during the h3 runs; "
      "other load: CPU used by everything else on the machine during the run (noise).\n")
print("| congestion | object | conns×streams | h2 MB/s | h3 MB/s | **h3/h2** | h2 p50 / p99 ms | h3 p50 / p99 ms | edge CPU h2 / h3 | MB per edge CPU-s h2 / h3 | loadgen CPU h2 / h3 | errors h2 / h3 | h3 UDP drops | other load h2 / h3 |")
print("|---|---|---|---:|---:|---:|---|---|---|---|---|---|---:|---|")
for cc in ccs:
    for size in sizes:
        a, b = cell(cc, size, "h2"), cell(cc, size, "h3")
        print(f'| {cc} | {size} | {a["shape"]} | {a["mb"]:.0f} | {b["mb"]:.0f} | **{b["mb"] / a["mb"]:.2f}** | '
              f'{a["p50"]:.1f} / {a["p99"]:.1f} | {b["p50"]:.1f} / {b["p99"]:.1f} | {a["cpu"]:.0f}% / {b["cpu"]:.0f}% | '
              f'{a["eff"]:.0f} / {b["eff"]:.0f} | {a["client"]:.0f}% / {b["client"]:.0f}% | {a["errors"]} / {b["errors"]} | {b["drops"]} | {a["other"]:.0f}% / {b["other"]:.0f}% |')
if len(ccs) > 1:
    print("\nHTTP/3 by congestion controller (h3 MB/s, medians; each run's value in brackets):\n")
    print("| object | " + " | ".join(ccs) + f" | {ccs[1]}/{ccs[0]} |")
    print("|---|" + "---:|" * (len(ccs) + 1))
    for size in sizes:
        vals = [cell(cc, size, "h3") for cc in ccs]
        print(f"| {size} | " + " | ".join(f'{v["mb"]:.0f} {v["runs"]}' for v in vals) + f' | **{vals[1]["mb"] / vals[0]["mb"]:.2f}** |')
misses = sum(r["requests"] - r["x_cache_hits"] for r in runs)
if misses:
    print(f"\nWARNING: {misses} responses were not X-Cache: HIT")
print(f"\nraw runs: {path}")
EOF
