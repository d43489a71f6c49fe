-- pgtrickle-relay: install everything into the current database.
--   psql -v ON_ERROR_STOP=1 -d <database> -f sql/install.sql
-- Safe to run again (upgrades in place); leaves an installed pg_trickle
-- extension's own objects alone. `pgtrickle-relay sql` prints the same files.
\ir 00_catalog.sql
\ir 10_outbox.sql
\ir 20_consumer_groups.sql
\ir 30_inbox.sql
\ir 40_inbox_workers.sql
\ir 41_inbox_ordering.sql
\ir 42_inbox_priority.sql
\ir 43_inbox_monitoring.sql
\ir 44_inbox_retention.sql
\ir 50_maintenance.sql
