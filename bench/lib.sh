# shellcheck shell=bash disable=SC2034  # sourced: the variables are for the scripts
# Shared helpers of the bench/ scripts (sourced, not run).
#
# Every process a script starts is recorded with `track PID` and killed (by its id)
# on exit; nothing else is touched.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
PIDS=()
WORK=""

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

track() { PIDS+=("$1"); }

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Give each a moment for its graceful shutdown, then insist.
        for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    if [[ -n "$WORK" && -z "${KEEP_WORK:-}" ]]; then
        rm -rf "$WORK"
    fi
}

# A scratch directory removed on exit (KEEP_WORK=1 keeps it for the logs); its name
# starts with PREFIX (default cdn-bench).
make_work() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/${1:-cdn-bench}.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

# Builds the release binaries (SKIP_BUILD=1: use what target/release has) and copies
# them into $WORK so a concurrent rebuild cannot swap them mid-run.
build_binaries() {
    if [[ -z "${SKIP_BUILD:-}" ]]; then
        log "cargo build --release -p cdn -p cdn-bench"
        (cd "$ROOT" && cargo build --release -p cdn -p cdn-bench) >&2
    fi
    local target="${CARGO_TARGET_DIR:-$ROOT/target}/release"
    [[ -x "$target/cdn" && -x "$target/loadgen" && -x "$target/storm" ]] ||
        die "no release binaries in $target (build failed?)"
    cp "$target/cdn" "$target/loadgen" "$target/storm" "$WORK/"
    CDN="$WORK/cdn"
    LOADGEN="$WORK/loadgen"
    STORM="$WORK/storm"
}

# Builds the release `cdn` only (SKIP_BUILD=1: use what target/release has) and copies
# it into $WORK as $CDN.
build_cdn() {
    if [[ -z "${SKIP_BUILD:-}" ]]; then
        log "cargo build --release -p cdn"
        (cd "$ROOT" && cargo build --release -p cdn) >&2
    fi
    local target="${CARGO_TARGET_DIR:-$ROOT/target}/release"
    [[ -x "$target/cdn" ]] || die "no release cdn in $target (build failed?)"
    cp "$target/cdn" "$WORK/cdn"
    CDN="$WORK/cdn"
}

# Fails when something already listens on addr:port (TCP), so a stale server is not measured.
ensure_free() {
    local addr=$1
    if curl -s -o /dev/null --max-time 1 "http://$addr/" 2>/dev/null; then
        die "$addr is already in use: stop what runs there first"
    fi
}

# Waits until `curl URL` answers 200 (up to 10 s).
wait_http() {
    local url=$1
    for _ in $(seq 1 100); do
        if [[ "$(curl -sk -o /dev/null -w '%{http_code}' --max-time 1 "$url" 2>/dev/null)" == 200 ]]; then
            return 0
        fi
        sleep 0.1
    done
    die "$url did not come up"
}

# CPU seconds (user + system) a process has used so far.
cpu_seconds() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f\n", ($12 + $13) / hz }' "/proc/$1/stat"
}

# Machine-wide busy CPU seconds so far (all CPUs; /proc/stat, minus idle and iowait).
busy_seconds() {
    awk -v hz="$(getconf CLK_TCK)" '/^cpu / { printf "%.2f\n", ($2 + $3 + $4 + $7 + $8 + $9) / hz; exit }' /proc/stat
}

# Datagrams the kernel dropped so far for want of UDP receive-buffer space (all sockets).
udp_drops() {
    awk '/^Udp:/ { if (!n) { for (i = 1; i <= NF; i++) col[$i] = i; n = 1 } else { print $col["RcvbufErrors"]; exit } }' /proc/net/snmp
}

# Waits (up to QUIET_WAIT seconds, default 30) until the machine is mostly idle:
# under 0.3 CPUs busy over one second. Other people's builds would skew a run.
wait_quiet() {
    local limit=${QUIET_WAIT:-30} start a b
    start=$SECONDS
    while ((SECONDS - start < limit)); do
        a=$(busy_seconds)
        sleep 1
        b=$(busy_seconds)
        if awk -v a="$a" -v b="$b" 'BEGIN { exit !(b - a < 0.3) }'; then
            return 0
        fi
    done
    log "the machine stayed busy for ${limit}s; measuring anyway (see other_cpu_s)"
}

# The "date, machine" header of a results section.
machine() {
    printf -- '- date: %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf -- '- machine: %s CPUs (nproc), %s, %s, kernel %s\n' \
        "$(nproc)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" \
        "$(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo)" "$(uname -r)"
    printf -- '- commit: %s%s\n' "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
        "$(git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || echo ' (with uncommitted changes in the tree)')"
}
