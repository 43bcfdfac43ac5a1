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
