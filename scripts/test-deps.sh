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
