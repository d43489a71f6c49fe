#!/usr/bin/env bash
# Build the pgtrickle-relay OCI image from the static binary, daemonless,
# with buildah (no Docker engine needed).
#   dist/image/build.sh [--binary target/pgtrickle-relay-static] [--tag pgtrickle-relay:VERSION]
# The image is FROM scratch: the static binary, the man page and SQL laid out
# by install.sh, the CA certificates, a non-root user (65532), ENTRYPOINT
# the relay, and a HEALTHCHECK that runs `pgtrickle-relay probe` (GET /livez).
# It is written in Docker format (OCI images drop HEALTHCHECK); add
# --archive FILE to also save it as a docker-archive tarball.
set -euo pipefail
export BUILDAH_FORMAT=docker   # HEALTHCHECK is kept in Docker-format images only
cd "$(dirname "$0")/../.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
binary=target/pgtrickle-relay-static tag="pgtrickle-relay:$version" archive=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --archive) archive=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$binary" ] || { echo "build.sh: no $binary: run 'make static' first" >&2; exit 1; }
if readelf -l "$binary" | grep -q INTERP; then
  echo "build.sh: $binary is dynamically linked; the image needs the static one ('make static')" >&2
  exit 1
fi
command -v buildah >/dev/null || { echo "build.sh: buildah is required (scripts/install-deps.sh installs it)" >&2; exit 1; }
certs=/etc/ssl/certs/ca-certificates.crt
[ -f "$certs" ] || { echo "build.sh: $certs missing (Debian package ca-certificates)" >&2; exit 1; }

root=$(mktemp -d /tmp/pgtrickle-image.XXXXXX)
trap 'rm -rf "$root"' EXIT
./install.sh --prefix /usr/local --destdir "$root" --binary "$binary" >/dev/null
rm -rf "$root/usr/local/lib/systemd"   # no systemd in a container
install -d "$root/etc/ssl/certs" "$root/tmp"
chmod 1777 "$root/tmp"
install -m 0644 "$certs" "$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/:/sbin/nologin\nrelay:x:65532:65532:pgtrickle-relay:/:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nrelay:x:65532:\n' > "$root/etc/group"
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"

ctr=$(buildah from scratch)
trap 'rm -rf "$root"; buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah copy --quiet "$ctr" "$root/" / >/dev/null
buildah config \
  --user 65532:65532 \
  --workingdir / \
  --entrypoint '["/usr/local/bin/pgtrickle-relay"]' \
  --cmd '[]' \
  --env PGTRICKLE_RELAY_METRICS_ADDR=0.0.0.0:9090 \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --port 9090/tcp \
  --healthcheck 'CMD /usr/local/bin/pgtrickle-relay probe' \
  --healthcheck-interval 10s --healthcheck-timeout 5s --healthcheck-retries 3 \
  --label org.opencontainers.image.title=pgtrickle-relay \
  --label "org.opencontainers.image.version=$version" \
  --label org.opencontainers.image.description="Moves events between PostgreSQL outbox/inbox tables and message brokers" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  "$ctr"
buildah commit --quiet --format docker --rm "$ctr" "$tag" >/dev/null
echo "image $tag built ($(buildah images --format '{{.Size}}' "$tag" | head -1))"
if [ -n "$archive" ]; then
  rm -f "$archive"
  buildah push --quiet "$tag" "docker-archive:$archive:$tag" >/dev/null
  echo "saved to $archive"
fi
