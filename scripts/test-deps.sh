#!/usr/bin/env bash
# Installs the peers and tools the tests drive (idempotent, quiet when present).
set -euo pipefail

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
command -v dig >/dev/null || need_apt+=(dnsutils)

if ((${#need_apt[@]})); then
    echo "test-deps: installing ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# HTTP/3 peer: aioquic (the library from a wheel, its example client from the sdist).
peers="$(cd "$(dirname "$0")/.." && pwd)/target/peers"
if ! python3 -c 'import aioquic, wsproto' 2>/dev/null; then
    echo "test-deps: installing aioquic" >&2
    python3 -m pip install -q 'aioquic==1.7.2' wsproto
fi
if [ ! -f "$peers/aioquic/examples/http3_client.py" ]; then
    tmp="$(mktemp -d)"
    python3 -m pip download -q --no-binary :all: --no-deps -d "$tmp" 'aioquic==1.7.2'
    mkdir -p "$peers/aioquic"
    tar -xzf "$tmp"/aioquic-1.7.2.tar.gz -C "$peers/aioquic" --strip-components=1
    rm -rf "$tmp"
fi

# Browser tests (tests/browser, run by tests/browser.rs): Debian's Chromium and its
# WebDriver, ffmpeg for the generated test video, Python selenium + pytest to drive them.
need_apt=()
[ -x /usr/lib/chromium/chromium ] || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
command -v ffmpeg >/dev/null || need_apt+=(ffmpeg)
command -v ip >/dev/null || need_apt+=(iproute2)  # loopback up in the suite's network namespace
# ACME test (tests/control/acme.rs): Let's Encrypt's test CA.
command -v pebble >/dev/null || [ -x /usr/bin/pebble ] || need_apt+=(pebble)
if ((${#need_apt[@]})); then
    echo "test-deps: installing ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if ! python3 -c 'import selenium, pytest' 2>/dev/null; then
    echo "test-deps: installing selenium pytest" >&2
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore selenium pytest
fi

# Docker deployment test (tests/docker.rs, only where a docker daemon answers): it
# drives the cluster with curl and dig (above), adds WAN latency inside container
# network namespaces with nsenter and tc netem, or iptables NFQUEUE + python3 where
# the kernel has no netem.
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    need_apt=()
    command -v nsenter >/dev/null || need_apt+=(util-linux)
    command -v tc >/dev/null || need_apt+=(iproute2)
    command -v iptables >/dev/null || need_apt+=(iptables)
    command -v python3 >/dev/null || need_apt+=(python3)
    command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need_apt+=(docker-compose)
    if ((${#need_apt[@]})); then
        echo "test-deps: installing ${need_apt[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    fi
fi
