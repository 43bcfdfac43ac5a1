#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need
# (Debian packages, Python peers) and then runs every Rust test.
#   ./test.sh                 everything
#   ./test.sh --test edge     one integration test file (arguments go to cargo test)
set -euo pipefail
cd "$(dirname "$0")"
scripts/test-deps.sh
exec cargo test --workspace --locked "$@"
