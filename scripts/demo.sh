#!/usr/bin/env bash
# The demo: build the relay, start a throwaway PostgreSQL, install the SQL,
# create an outbox, write events in a few transactions, and relay them to
# stdout as JSON lines. Logs go to stderr; stdout carries only events.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --demo
# The demo needs only the stdout sink: a build without the broker clients
# (librdkafka, OpenSSL for AMQP …) takes seconds, not minutes. It goes to
# its own target dir so it never replaces a full build.
cargo build --quiet --no-default-features --target-dir target/demo
relay=target/demo/debug/pgtrickle-relay

source scripts/pg-throwaway.sh
pg_throwaway_start
psql=("$PGT_PSQL" -X -q -v ON_ERROR_STOP=1 -d "$PGT_URL")

echo "== installing the SQL: pgtrickle-relay sql | psql" >&2
"$relay" sql | "${psql[@]}" >/dev/null

echo "== an outbox 'orders' and a pipeline printing it to stdout" >&2
"${psql[@]}" <<'SQL' >/dev/null
SELECT pgtrickle.enable_outbox('orders');
SELECT pgtrickle.set_relay_outbox('orders-to-stdout', 'orders', 'demo',
                                  '{"type": "stdout", "format": "jsonl"}');
SQL

echo "== writing events in three transactions" >&2
"${psql[@]}" <<'SQL' >/dev/null
BEGIN;
  SELECT pgtrickle.outbox_publish('orders', '{"order_id": 1, "status": "placed", "total": 42.50}');
  SELECT pgtrickle.outbox_publish('orders', '{"order_id": 2, "status": "placed", "total": 7.00}',
                                  '{"trace_id": "abc123"}');
COMMIT;
BEGIN;
  SELECT pgtrickle.outbox_publish_delta('orders',
    '[{"order_id": 1, "status": "shipped", "total": 42.50}]',
    '[{"order_id": 1, "status": "placed", "total": 42.50}]');
COMMIT;
SELECT pgtrickle.outbox_publish('orders', '{"order_id": 3, "status": "placed", "total": 19.99}');
SQL

echo "== pgtrickle-relay --once (events on stdout):" >&2
"$relay" --postgres-url "$PGT_URL" --once --log-level warn
