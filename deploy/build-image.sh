#!/usr/bin/env bash
# Builds the `cdn` image without any base image or registry: the release binary is
# built on this host and put in a FROM scratch image together with the shared
# libraries `ldd` names, the CA certificates and `cdn-healthcheck` (deploy/healthcheck.rs,
# the Docker HEALTHCHECK, since a scratch image has no curl).
#
#   deploy/build-image.sh                     # builds target/release/cdn, tags cdn:local
#   CDN_IMAGE=cdn:test deploy/build-image.sh  # another tag
#   CDN_BINARY=path/to/cdn deploy/build-image.sh   # use an already built binary
#
# The host's glibc goes into the image, so the image runs wherever Docker runs on
# the same architecture. For a conventional image built from base images, see
# deploy/Dockerfile.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
image="${CDN_IMAGE:-cdn:local}"
out="$root/target/deploy"
mkdir -p "$out"

if [ -n "${CDN_BINARY:-}" ]; then
    bin="$CDN_BINARY"
else
    echo "build-image: cargo build --release --bin cdn" >&2
    (cd "$root" && cargo build --release --locked --bin cdn)
    bin="$root/target/release/cdn"
fi
[ -x "$bin" ] || { echo "build-image: no executable at $bin" >&2; exit 1; }

hc="$out/cdn-healthcheck"
if [ ! -x "$hc" ] || [ "$root/deploy/healthcheck.rs" -nt "$hc" ]; then
    (cd "$root" && rustc --edition 2021 -O -C strip=symbols deploy/healthcheck.rs -o "$hc")
fi

ctx="$(mktemp -d "$out/image.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
rootfs="$ctx/rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/var/lib/cdn"
chmod 1777 "$rootfs/tmp"

# The binary without its debug sections (the release profile keeps line tables).
if command -v objcopy >/dev/null; then
    objcopy --strip-debug "$bin" "$rootfs/usr/local/bin/cdn"
else
    cp "$bin" "$rootfs/usr/local/bin/cdn"
fi
cp "$hc" "$rootfs/usr/local/bin/cdn-healthcheck"

# Every shared library either program loads (and the dynamic loader), at its path.
for exe in "$rootfs/usr/local/bin/cdn" "$rootfs/usr/local/bin/cdn-healthcheck"; do
    ldd "$exe" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u | while read -r lib; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done

# CA certificates (for https:// origins), a minimal passwd/group and nsswitch so
# name lookups in the container go to Docker's DNS as usual.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
else
    echo "build-image: warning: no /etc/ssl/certs/ca-certificates.crt on this host" >&2
fi
printf 'root:x:0:0:root:/:/usr/local/bin/cdn\nnobody:x:65534:65534:nobody:/:/usr/local/bin/cdn\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"

cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
WORKDIR /var/lib/cdn
ENTRYPOINT ["/usr/local/bin/cdn"]
CMD ["--help"]
DOCKERFILE

version="$("$bin" --version 2>/dev/null | awk '{print $2}')"
echo "build-image: building $image (cdn ${version:-?}, $(du -sh "$rootfs" | cut -f1))" >&2
# The classic builder needs nothing but the daemon (no buildx, no registry).
DOCKER_BUILDKIT=0 docker build -q --label "org.opencontainers.image.version=${version:-unknown}" \
    -t "$image" "$ctx" >/dev/null 2>"$ctx/build.log" || { cat "$ctx/build.log" >&2; exit 1; }
echo "build-image: $image ready" >&2
