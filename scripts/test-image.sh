#!/usr/bin/env bash
# Test the image that `make image` built, for real: run it with podman
# against a throwaway PostgreSQL, install the SQL with it, relay events with
# it, and check its HEALTHCHECK, its user and its layer contents.
#   scripts/test-image.sh [IMAGE]     (default pgtrickle-relay:<version>)
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
image=${1:-pgtrickle-relay:$version}
fail() { echo "test-image: FAIL: $*" >&2; exit 1; }

# This sandbox's quirks, harmless elsewhere: crun cannot run here (hybrid
# cgroups) and raising RLIMIT_NPROC is refused, so use runc with cgroupfs
# and no default ulimits.
conf=$(mktemp /tmp/pgtrickle-containers.XXXXXX.conf)
printf '[containers]\ndefault_ulimits = []\n' > "$conf"
export CONTAINERS_CONF=$conf
# (Nor is there systemd to time health checks: podman's complaints about that
# are silenced, and the checks are run by hand below.)
podman=(podman --runtime runc --cgroup-manager cgroupfs --log-level fatal)
"${podman[@]}" image exists "$image" || fail "no image $image: run 'make image' first"

source scripts/pg-throwaway.sh
pg_throwaway_start
ctr=""
cleanup() {
  [ -n "$ctr" ] && "${podman[@]}" rm -f "$ctr" >/dev/null 2>&1 || true
  rm -f "$conf"
  pg_throwaway_stop
}
trap cleanup EXIT
psql=("$PGT_PSQL" -X -q -v ON_ERROR_STOP=1 -d "$PGT_URL")
run=("${podman[@]}" run --rm --network host --health-interval disable "$image")

echo "== the image's config" >&2
user=$("${podman[@]}" image inspect --format '{{.Config.User}}' "$image")
[ "$user" = "65532:65532" ] || fail "user is '$user', not 65532:65532"
entry=$("${podman[@]}" image inspect --format '{{json .Config.Entrypoint}}' "$image")
[ "$entry" = '["/usr/local/bin/pgtrickle-relay"]' ] || fail "entrypoint $entry"
hc=$("${podman[@]}" image inspect --format '{{json .Config.Healthcheck.Test}}' "$image")
[ "$hc" = '["CMD","/usr/local/bin/pgtrickle-relay","probe"]' ] || fail "healthcheck $hc"

echo "== its layer contents" >&2
ctr=$("${podman[@]}" create "$image")
files=$("${podman[@]}" export "$ctr" | tar -t)
"${podman[@]}" rm "$ctr" >/dev/null; ctr=""
for f in usr/local/bin/pgtrickle-relay etc/ssl/certs/ca-certificates.crt etc/passwd \
         usr/local/share/pgtrickle-relay/sql/00_catalog.sql usr/local/share/man/man1/pgtrickle-relay.1; do
  grep -qx "$f" <<<"$files" || fail "$f is not in the image"
done
if grep -q '^bin/\|^usr/bin/\|systemd' <<<"$files"; then fail "unexpected files in the image"; fi

echo "== the binary inside runs, as the non-root user" >&2
"${run[@]}" --version | grep -q "^pgtrickle-relay $version" || fail "--version"

echo "== installing the SQL with the image: podman run IMAGE sql | psql" >&2
"${run[@]}" sql | "${psql[@]}" >/dev/null

echo "== relaying three events with the image (--once)" >&2
"${psql[@]}" >/dev/null <<'SQL'
SELECT pgtrickle.enable_outbox('orders');
SELECT pgtrickle.set_relay_outbox('orders-out', 'orders', 'image', '{"type": "stdout"}');
SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('n', i)) FROM generate_series(1, 3) i;
SQL
out=$("${run[@]}" --postgres-url "$PGT_URL" --once --log-level warn)
[ "$(grep -c '"dedup_key":"outbox_orders:' <<<"$out")" = 3 ] || fail "expected 3 events, got: $out"

echo "== running as a daemon: HEALTHCHECK and /readyz" >&2
port=$(free_port)
# The address by environment, as users set it: the relay and its
# HEALTHCHECK (pgtrickle-relay probe) both read it.
ctr=$("${podman[@]}" run -d --network host --health-interval disable \
  -e PGTRICKLE_RELAY_METRICS_ADDR="127.0.0.1:$port" "$image" --postgres-url "$PGT_URL")
healthy=false
for _ in $(seq 1 50); do
  if "${podman[@]}" healthcheck run "$ctr" >/dev/null 2>&1; then healthy=true; break; fi
  sleep 0.2
done
$healthy || fail "HEALTHCHECK never passed: $("${podman[@]}" logs "$ctr" 2>&1 | tail -5)"
ready=false
for _ in $(seq 1 50); do
  if "${podman[@]}" exec "$ctr" /usr/local/bin/pgtrickle-relay probe --ready 2>/dev/null; then ready=true; break; fi
  sleep 0.2
done
$ready || fail "/readyz never answered 200"
who=$("${podman[@]}" top "$ctr" user | tail -n +2 | sort -u)
[ "$who" = relay ] || [ "$who" = 65532 ] || fail "the relay runs as '$who', not the image's user"
"${podman[@]}" stop -t 10 "$ctr" >/dev/null
code=$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "$ctr")
[ "$code" = 0 ] || fail "the relay exited $code on SIGTERM"
echo "test-image: ok ($image)" >&2
