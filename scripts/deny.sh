#!/usr/bin/env bash
# cargo deny over the workspace, with deny.toml (installs cargo-deny once).
#   bans, licenses, sources   always
#   advisories                when the RustSec advisory database (a git repository)
#                             can be fetched, or a copy of it is already on disk;
#                             otherwise it says SKIPPED and why. DENY_ADVISORIES=require
#                             turns that skip into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.20.2  # builds with the workspace's Rust 1.95 (it needs 1.88)
if ! cargo deny --version 2>/dev/null | grep -qxF "cargo-deny $version"; then
    echo "deny: installing cargo-deny $version" >&2
    cargo install --locked --quiet "cargo-deny@$version"
fi

cargo deny --locked check --hide-inclusion-graph bans licenses sources

# Where deny.toml's [advisories] keeps the database (cargo-deny's default db-path):
# one clone per database URL, advisory-db-<hash>/.
db_root="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
if fetch_log="$(cargo deny --locked fetch db 2>&1)"; then
    echo "deny: advisory database fetched"
    cargo deny --locked --offline check --hide-inclusion-graph advisories
elif copy="$(compgen -G "$db_root/*/crates" | head -n1)" && [ -n "$copy" ]; then
    echo "deny: cannot fetch the advisory database; checking against the copy in ${copy%/crates}" \
        "(last updated $(git -C "${copy%/crates}" log -1 --format=%cs 2>/dev/null || echo '?'))"
    cargo deny --locked --offline check --hide-inclusion-graph advisories
else
    reason="$(grep -m1 '^fatal:' <<<"$fetch_log" || grep -m1 ERROR <<<"$fetch_log" || tail -n1 <<<"$fetch_log")"
    echo "deny: advisories SKIPPED: the RustSec advisory database cannot be fetched and there is" \
        "no copy in $db_root: ${reason}"
    if [ "${DENY_ADVISORIES:-}" = require ]; then
        echo "deny: DENY_ADVISORIES=require: failing" >&2
        exit 1
    fi
fi
