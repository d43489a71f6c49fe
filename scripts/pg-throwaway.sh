#!/usr/bin/env bash
# Start a throwaway PostgreSQL in a temp dir on a free port.
# Usage: source scripts/pg-throwaway.sh; pg_throwaway_start; ...; (stopped on EXIT)
# Sets PGT_URL, PGT_PSQL, PGT_DIR. As root, the server runs as user postgres.

pg_bindir() {
  if [ -n "${PG_BINDIR:-}" ]; then echo "$PG_BINDIR"; return; fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$(( 20000 + RANDOM % 40000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  echo "no free port found" >&2; return 1
}

pg_throwaway_start() {
  local bindir port as=()
  bindir=$(pg_bindir)
  [ -x "$bindir/initdb" ] || { echo "PostgreSQL server binaries not found: run scripts/install-deps.sh" >&2; return 1; }
  PGT_DIR=$(mktemp -d /tmp/pgtrickle-demo.XXXXXX)
  chmod 755 "$PGT_DIR"
  if [ "$(id -u)" -eq 0 ]; then chown postgres: "$PGT_DIR"; as=(runuser -u postgres --); fi
  port=$(free_port)
  "${as[@]}" "$bindir/initdb" -D "$PGT_DIR/data" -A trust -U postgres -E UTF8 --no-sync >/dev/null
  "${as[@]}" "$bindir/pg_ctl" -D "$PGT_DIR/data" -l "$PGT_DIR/postgres.log" -w \
    -o "-p $port -k $PGT_DIR -c listen_addresses=127.0.0.1" start >/dev/null
  PGT_STOP=("${as[@]}" "$bindir/pg_ctl" -D "$PGT_DIR/data" -m fast stop)
  trap pg_throwaway_stop EXIT
  PGT_URL="postgres://postgres@127.0.0.1:$port/postgres"
  PGT_PSQL="$bindir/psql"
  [ -x "$PGT_PSQL" ] || PGT_PSQL=psql
  export PGT_URL PGT_PSQL PGT_DIR
}

pg_throwaway_stop() {
  "${PGT_STOP[@]}" >/dev/null 2>&1 || true
  rm -rf "$PGT_DIR"
}
