#!/usr/bin/env bash
# bench/run-h3.sh: HTTP/3 vs HTTP/2 throughput of cached objects at one edge (issue 5).
#
# Starts `cdn origin` (generated objects) and `cdn edge` (https + h3 on one port,
# self-signed TLS) on loopback, warms /_gen/1MiB and /_gen/100MiB into the cache, and
# measures with `loadgen` the HIT throughput over h2 and h3, for each QUIC congestion
# controller. The edge is pinned to CPU 0 and loadgen to CPU 1. Prints a markdown
# table (medians of REPEAT runs) with the h3/h2 ratios; the raw runs go to
# bench/out/h3-<time>.jsonl.
#
# Environment (all optional):
#   DURATION=10s          each loadgen run
#   REPEAT=3              runs per cell (order h2/h3 alternates), the table shows medians
#   CONGESTIONS="cubic bbr"
#   SIZES="1MiB 100MiB"
#   SHAPE_1MiB="1 8"      connections and streams per connection for 1MiB (and SHAPE_100MiB="1 1")
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
EDGE_IP=127.0.0.32
EDGE_URL="https://$EDGE_IP:8443"

command -v taskset >/dev/null || die "taskset (util-linux) is needed"
command -v python3 >/dev/null || die "python3 is needed for the table"
[[ $(nproc) -ge 2 ]] || die "needs 2 CPUs (edge on CPU 0, loadgen on CPU 1)"

make_work
build_binaries
mkdir -p "$BENCH/out"
RESULTS="$BENCH/out/h3-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
: >"$RESULTS"

ensure_free "$ORIGIN_IP:8080"
ensure_free "$EDGE_IP:8443"

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
    local cc=$1
    cat >"$WORK/edge-$cc.toml" <<EOF
node_id = "bench-edge"
[listen]
http = "$EDGE_IP:8080"
https = "$EDGE_IP:8443"
h3 = "$EDGE_IP:8443"
admin = "$EDGE_IP:9090"
[tls]
self_signed = true
[origin]
url = "http://$ORIGIN_IP:8080"
[cache]
memory = "1GiB"
[quic]
congestion = "$cc"
EOF
    log "edge with congestion=$cc on $EDGE_URL (CPU 0)"
    taskset -c 0 "$CDN" edge --config "$WORK/edge-$cc.toml" >"$WORK/edge-$cc.log" 2>&1 &
    EDGE_PID=$!
    track "$EDGE_PID"
    wait_http "http://$EDGE_IP:9090/healthz"
}

warm() {
    local size=$1 status
    curl -sk -o /dev/null "$EDGE_URL/_gen/$size" || die "warming /_gen/$size failed"
    status=$(curl -sk -o /dev/null -D - "$EDGE_URL/_gen/$size" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-cache" { print $2 }')
    [[ "$status" == HIT ]] || die "/_gen/$size is not a cache HIT after warming (X-Cache: $status)"
}

measure() {
    local cc=$1 size=$2 proto=$3 rep=$4 shape conns streams before after busy0 busy1 line
    shape="SHAPE_$size"
    read -r conns streams <<<"${!shape}"
    wait_quiet
    before=$(cpu_seconds "$EDGE_PID")
    busy0=$(busy_seconds)
    line=$(taskset -c 1 "$LOADGEN" --proto "$proto" --url "$EDGE_URL/_gen/$size" --insecure \
        --connections "$conns" --streams "$streams" --duration "$DURATION" 2>>"$WORK/loadgen.err")
    after=$(cpu_seconds "$EDGE_PID")
    busy1=$(busy_seconds)
    log "$cc $size $proto #$rep: $line"
    # other_cpu_s: CPU the rest of the machine used meanwhile (noise from other work).
    python3 -c '
import json, sys
d = json.loads(sys.argv[1])
edge = float(sys.argv[6]) - float(sys.argv[5])
busy = float(sys.argv[8]) - float(sys.argv[7])
d.update(cc=sys.argv[2], size=sys.argv[3], rep=int(sys.argv[4]), edge_cpu_s=round(edge, 2),
         other_cpu_s=round(max(0.0, busy - edge - (d.get("client_cpu_s") or 0)), 2))
print(json.dumps(d))' "$line" "$cc" "$size" "$rep" "$before" "$after" "$busy0" "$busy1" >>"$RESULTS"
}

for cc in $CONGESTIONS; do
    start_edge "$cc"
    for size in $SIZES; do warm "$size"; done
    for rep in $(seq 1 "$REPEAT"); do
        for size in $SIZES; do
            if ((rep % 2)); then order="h2 h3"; else order="h3 h2"; fi
            for proto in $order; do measure "$cc" "$size" "$proto" "$rep"; done
        done
    done
    if grep -E ' (WARN|ERROR) ' "$WORK/edge-$cc.log" >/dev/null; then
        log "edge ($cc) logged warnings or errors:"
        grep -E ' (WARN|ERROR) ' "$WORK/edge-$cc.log" | sed 's/\x1b\[[0-9;]*m//g' | sort | uniq -c | head -20 >&2
    fi
    stop "$EDGE_PID"
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
    other = statistics.median(100 * r.get("other_cpu_s", 0) / r["seconds"] for r in rs)
    return dict(other=other, mb=mb, p50=med(rs, "p50_ms"), p99=med(rs, "p99_ms"), eff=eff, cpu=cpu, errors=errors, misses=misses,
                shape=f'{rs[0]["connections"]}×{rs[0]["streams"]}', runs=[r["mb_per_s"] for r in rs])
ccs = list(dict.fromkeys(r["cc"] for r in runs))
sizes = list(dict.fromkeys(r["size"] for r in runs))
print(f"HIT throughput, medians of {repeat} runs of {duration}; MB = 10^6 bytes; edge on CPU 0, loadgen on CPU 1. "
      "Edge CPU: % of one CPU; other load: CPU used by everything else on the machine during the run (noise).\n")
print("| congestion | object | conns×streams | h2 MB/s | h3 MB/s | **h3/h2** | h2 p50 / p99 ms | h3 p50 / p99 ms | edge CPU h2 / h3 | MB per edge CPU-s h2 / h3 | errors h2 / h3 | other load h2 / h3 |")
print("|---|---|---|---:|---:|---:|---|---|---|---|---|---|")
for cc in ccs:
    for size in sizes:
        a, b = cell(cc, size, "h2"), cell(cc, size, "h3")
        print(f'| {cc} | {size} | {a["shape"]} | {a["mb"]:.0f} | {b["mb"]:.0f} | **{b["mb"] / a["mb"]:.2f}** | '
              f'{a["p50"]:.1f} / {a["p99"]:.1f} | {b["p50"]:.1f} / {b["p99"]:.1f} | {a["cpu"]:.0f}% / {b["cpu"]:.0f}% | '
              f'{a["eff"]:.0f} / {b["eff"]:.0f} | {a["errors"]} / {b["errors"]} | {a["other"]:.0f}% / {b["other"]:.0f}% |')
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
