#!/usr/bin/env bash
# Purge propagation (issue 6): 1 control node + 6 edges as separate processes on
# loopback (127.0.0.70-76), 200 purges; the time from the API's acknowledgement to
# the last edge's `applied` report, as measured by the control node (`completed_ms`).
#   bench/run-purge.sh            # builds release, runs, prints a markdown table
#   PURGES=500 bench/run-purge.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PURGES=${PURGES:-200}
TOKEN=bench-token-0123456789abcdef
SECRET=bench-cluster-secret-0123456789
make_work
build_cdn

mkdir -p "$WORK/content"
echo hello > "$WORK/content/index.html"
cat > "$WORK/origin.toml" <<TOML
root = "$WORK/content"
[listen]
http = "127.0.0.70:8080"
TOML
cat > "$WORK/control.toml" <<TOML
node_id = "control-1"
data_dir = "$WORK/control"
token = "$TOKEN"
[listen]
api = "127.0.0.70:9000"
admin = "127.0.0.70:9001"
[cluster]
listen = "127.0.0.70:7946"
secret = "$SECRET"
TOML
ensure_free 127.0.0.70:9000
RUST_LOG=warn "$CDN" origin --config "$WORK/origin.toml" 2>"$WORK/origin.log" & track $!
RUST_LOG=warn "$CDN" control --config "$WORK/control.toml" 2>"$WORK/control.log" & track $!
for i in 1 2 3 4 5 6; do
    ip=127.0.0.7$i
    cat > "$WORK/edge-$i.toml" <<TOML
node_id = "edge-$i"
region = "r$i"
[listen]
http = "$ip:8080"
admin = "$ip:9090"
[origin]
url = "http://127.0.0.70:8080"
[cluster]
listen = "$ip:7946"
seeds = ["127.0.0.70:7946"]
secret = "$SECRET"
TOML
    RUST_LOG=warn "$CDN" edge --config "$WORK/edge-$i.toml" 2>"$WORK/edge-$i.log" & track $!
done
for i in 1 2 3 4 5 6; do wait_http "http://127.0.0.7$i:9090/readyz"; done
export CDN_CONTROL=http://127.0.0.70:9000 CDN_TOKEN=$TOKEN
for _ in $(seq 1 100); do
    [[ $("$CDN" nodes | grep -c 'edge .*alive') == 6 ]] && break
    sleep 0.1
done
log "cluster up: $("$CDN" nodes | grep -c 'alive') members alive; $PURGES purges"
wait_quiet

python3 - "$PURGES" <<'PY' | tee "$WORK/result.md"
import json, os, sys, time, urllib.request

base, token, n = os.environ["CDN_CONTROL"], os.environ["CDN_TOKEN"], int(sys.argv[1])

def call(method, path, body=None):
    request = urllib.request.Request(base + path, method=method, data=body,
                                     headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())

ids = []
started = time.monotonic()
for i in range(n):
    kind = ("tags", ["t%d" % i]) if i % 2 else ("urls", ["https://www.cdn.test/obj/%d" % i])
    ids.append(call("POST", "/v1/purge", json.dumps({kind[0]: kind[1]}).encode())["id"])
    time.sleep(0.02)  # 50 purges/s
done = {}
while len(done) < n and time.monotonic() - started < 120:
    for purge_id in ids:
        if purge_id not in done:
            status = call("GET", "/v1/purge/" + purge_id)
            if status["status"] == "complete" and status["completed_ms"] is not None:
                done[purge_id] = status["completed_ms"]
    time.sleep(0.05)
values = sorted(done.values())
if len(values) < n:
    sys.exit("only %d of %d purges completed" % (len(values), n))
pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]
print("| purges | edges | p50 ms | p90 ms | p99 ms | max ms |")
print("|---|---|---|---|---|---|")
print("| %d | 6 | %d | %d | %d | %d |" % (n, pick(0.50), pick(0.90), pick(0.99), values[-1]))
PY
{
    echo
    machine
    echo "- command: \`bench/run-purge.sh\` (PURGES=$PURGES)"
} >> "$WORK/result.md"
mkdir -p "$BENCH/out" && cp "$WORK/result.md" "$BENCH/out/purge.md"
