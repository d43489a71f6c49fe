-- pgtrickle-relay: 10_outbox.sql — the outbox kit, for PostgreSQL without pg_trickle.
--
-- pgtrickle.enable_outbox('orders') creates pgtrickle.outbox_orders (one row
-- per published change set), pgtrickle.outbox_delta_rows_orders (the rows of
-- large "claim-check" change sets) and pgtrickle.pgt_outbox_latest_orders,
-- the same shapes as the pg_trickle extension's outboxes, so the relay reads
-- both the same way. Applications publish with pgtrickle.outbox_publish() or
-- pgtrickle.outbox_publish_delta(), inside their own transaction.
--
-- Unlike pg_trickle's outboxes (written by one refresh at a time), the kit's
-- are written by concurrent application transactions, so ids can commit out of
-- order. Each row therefore records its writer's transaction (txid xid8), and
-- readers hand out only rows whose transaction is older than their snapshot's
-- xmin, in (txid, id) order: the commit horizon (see ARCHITECTURE.md).

-- One row per outbox (kit outboxes have no stream table: stream_table_oid is NULL).
CREATE TABLE IF NOT EXISTS pgtrickle.pgt_outbox_config (
    stream_table_oid   OID,
    stream_table_name  TEXT PRIMARY KEY,
    outbox_table_name  TEXT NOT NULL UNIQUE,
    retention_hours    INT NOT NULL DEFAULT 24,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_drained_at    TIMESTAMPTZ,
    last_drained_count BIGINT
);

CALL pgtrickle._kit_define('relation', 'pgt_outbox_config', $ddl$
GRANT SELECT ON pgtrickle.pgt_outbox_config TO pgtrickle_relay;
$ddl$);

-- The PostgreSQL cluster whose transaction ids the txid columns of the kit
-- outboxes (and every position in them) count: its
-- pg_control_system().system_identifier. A dump restored into another
-- cluster, or a logical-replication cutover, brings rows and positions with
-- txids of the old cluster into one that counts from elsewhere (often lower:
-- new rows would sort before positions already committed). The first write to
-- a kit outbox there, or the first relay, finds another identifier here and
-- rebases every kit outbox and every position in it first
-- (_outbox_cluster_sync). A physical standby keeps the identifier and the ids.
CREATE TABLE IF NOT EXISTS pgtrickle.outbox_cluster (
    singleton         BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    system_identifier BIGINT NOT NULL
);
INSERT INTO pgtrickle.outbox_cluster (system_identifier)
SELECT s.system_identifier FROM pg_catalog.pg_control_system() s
ON CONFLICT DO NOTHING;

-- ---------------------------------------------------------------------------
-- Internal helpers
-- ---------------------------------------------------------------------------

-- The pgt_outbox_config row of outbox p_outbox (its stream name or its table
-- name); raises no_data_found, naming p_caller, when there is none.
CALL pgtrickle._kit_define('function', '_outbox_lookup', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._outbox_lookup(p_outbox TEXT, p_caller TEXT)
RETURNS pgtrickle.pgt_outbox_config
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg pgtrickle.pgt_outbox_config;
BEGIN
    SELECT c.* INTO v_cfg
      FROM pgtrickle.pgt_outbox_config c
     WHERE c.stream_table_name = p_outbox OR c.outbox_table_name = p_outbox
     ORDER BY (c.stream_table_name = p_outbox) DESC
     LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION '%: outbox "%" does not exist (create it with pgtrickle.enable_outbox(%))',
            p_caller, p_outbox, quote_literal(coalesce(p_outbox, ''))
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v_cfg;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._outbox_lookup(TEXT, TEXT) FROM PUBLIC;
$ddl$);

-- Replace function p_old (a regprocedure text) by p_new, an existing function
-- with a new signature (an optional argument was added): the roles that may
-- execute p_old get EXECUTE on p_new (applications keep publishing after an
-- upgrade), then p_old is dropped. Silent when p_old does not exist.
CALL pgtrickle._kit_define('function', '_kit_retire_function', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._kit_retire_function(p_old TEXT, p_new TEXT)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_old oid := pg_catalog.to_regprocedure(p_old);
    r     record;
BEGIN
    IF v_old IS NULL THEN
        RETURN;
    END IF;
    FOR r IN SELECT DISTINCT a.grantee
               FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
              WHERE p.oid = v_old AND a.privilege_type = 'EXECUTE'
                AND a.grantee <> 0 AND a.grantee <> p.proowner
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I',
                                  p_new, pg_catalog.pg_get_userbyid(r.grantee));
    END LOOP;
    EXECUTE pg_catalog.format('DROP FUNCTION %s', v_old::pg_catalog.regprocedure);
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._kit_retire_function(TEXT, TEXT) FROM PUBLIC;
$ddl$);

-- A SQL condition on an outbox row (columns txid, id) that is true when every
-- consumer of the outbox has committed past that row: each consumer group on
-- it, and each relay pipeline reading it. A pipeline whose source.group names
-- a consumer group of this outbox reads through that group (its watermark,
-- above, is its position); one naming a group of another outbox cannot run;
-- any other pipeline has its own offsets (one per relay group). What proves
-- nothing keeps every row: a pipeline that never committed, one that cannot
-- run, and a position at or beyond the next transaction id of this database
-- (e.g. written before a dump and restore into another cluster).
-- p_if_none is the answer when nobody consumes the outbox.
CALL pgtrickle._kit_define('function', '_outbox_consumed_sql', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._outbox_consumed_sql(
    p_stream TEXT, p_outbox_table TEXT, p_has_txid BOOLEAN, p_if_none BOOLEAN)
RETURNS text
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_next  xid8 := pg_snapshot_xmax(pg_current_snapshot());
    v_conds text[] := '{}';
    r record;
    o record;
    v_any boolean;
BEGIN
    FOR r IN SELECT g.committed_txid, g.committed_id
               FROM pgtrickle.pgt_consumer_groups g
              WHERE g.outbox_name IN (p_stream, p_outbox_table)
    LOOP
        IF NOT p_has_txid THEN
            v_conds := v_conds || format('id <= %s', r.committed_id);
        ELSIF r.committed_txid >= v_next THEN
            v_conds := v_conds || 'false'::text;
        ELSE
            v_conds := v_conds || format('(txid, id) <= (%L::xid8, %s)', r.committed_txid, r.committed_id);
        END IF;
    END LOOP;

    FOR r IN SELECT c.name, g.outbox_name AS group_outbox
               FROM pgtrickle.relay_outbox_config c
               LEFT JOIN pgtrickle.pgt_consumer_groups g
                      ON g.group_name = nullif(c.config -> 'source' ->> 'group', '')
              WHERE c.config -> 'source' ->> 'outbox' IN (p_stream, p_outbox_table)
    LOOP
        IF r.group_outbox IN (p_stream, p_outbox_table) THEN
            CONTINUE;  -- reads through its consumer group: counted above
        ELSIF r.group_outbox IS NOT NULL THEN
            v_conds := v_conds || 'false'::text;  -- a group of another outbox
            CONTINUE;
        END IF;
        v_any := false;
        FOR o IN SELECT x.last_change_id, x.last_txid
                   FROM pgtrickle.relay_consumer_offsets x
                  WHERE x.pipeline_id = r.name
        LOOP
            v_any := true;
            IF p_has_txid AND o.last_txid >= v_next THEN
                v_conds := v_conds || 'false'::text;
            ELSIF p_has_txid AND o.last_txid IS NOT NULL THEN
                v_conds := v_conds || format('(txid, id) <= (%L::xid8, %s)', o.last_txid, coalesce(o.last_change_id, 0));
            ELSE
                v_conds := v_conds || format('id <= %s', coalesce(o.last_change_id, 0));
            END IF;
        END LOOP;
        IF NOT v_any THEN
            v_conds := v_conds || 'false'::text;
        END IF;
    END LOOP;

    IF cardinality(v_conds) = 0 THEN
        RETURN p_if_none::text;
    END IF;
    IF 'false' = ANY (v_conds) THEN
        RETURN 'false';
    END IF;
    RETURN '(' || array_to_string(v_conds, ' AND ') || ')';
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._outbox_consumed_sql(TEXT, TEXT, BOOLEAN, BOOLEAN) FROM PUBLIC;
$ddl$);

-- Rebase kit outbox p_table (of outbox p_stream) after its rows' txids stopped
-- meaning anything in this cluster: every row gets txid 2 (frozen; below every
-- transaction this cluster will run), so rows are ordered by id, before every
-- later write. Every position in it, relay pipelines' and consumer groups',
-- moves to txid 2 and the highest id up to which every row was delivered by
-- its old (txid, id) order, never past its own id: a row delivered before the
-- move may go out again (same dedup key), none is skipped. Consumer-group
-- leases are dropped (their batches are polled again). Every row present must
-- predate the move, or have a higher id than each row before it.
CALL pgtrickle._kit_define('function', '_outbox_rebase_table', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._outbox_rebase_table(p_stream TEXT, p_table TEXT)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_sys   bigint := (SELECT s.system_identifier FROM pg_catalog.pg_control_system() s);
    -- The first row not yet delivered by a position ($1, $2).
    v_first text := pg_catalog.format(
        'SELECT min(id) FROM pgtrickle.%I WHERE (txid, id) > ($1, $2)', p_table);
    r       record;
    k       record;
    v_min   bigint;
BEGIN
    -- Writers wait (readers do not) until the rows and positions agree again.
    EXECUTE pg_catalog.format('LOCK TABLE pgtrickle.%I IN SHARE ROW EXCLUSIVE MODE', p_table);

    FOR r IN SELECT o.relay_group_id, o.pipeline_id, o.last_txid, o.last_change_id
               FROM pgtrickle.relay_consumer_offsets o
              WHERE o.outbox = p_table
                 OR (o.outbox IS NULL AND EXISTS (
                        SELECT 1 FROM pgtrickle.relay_outbox_config c
                         WHERE c.name = o.pipeline_id
                           AND c.config -> 'source' ->> 'outbox' IN (p_stream, p_table)))
                FOR UPDATE
    LOOP
        EXECUTE v_first INTO v_min
          USING coalesce(r.last_txid, '0'::xid8), coalesce(r.last_change_id, 0);
        UPDATE pgtrickle.relay_consumer_offsets o
           SET last_txid = '2', outbox = p_table, system_identifier = v_sys,
               last_change_id = least(coalesce(r.last_change_id, 0), v_min - 1)
         WHERE o.relay_group_id = r.relay_group_id AND o.pipeline_id = r.pipeline_id;
    END LOOP;

    FOR r IN SELECT g.group_name, g.committed_txid, g.committed_id
               FROM pgtrickle.pgt_consumer_groups g
              WHERE g.outbox_name IN (p_stream, p_table)
                FOR UPDATE
    LOOP
        EXECUTE v_first INTO v_min USING r.committed_txid, r.committed_id;
        UPDATE pgtrickle.pgt_consumer_groups g
           SET committed_txid = '2', committed_id = least(r.committed_id, v_min - 1)
         WHERE g.group_name = r.group_name;
        DELETE FROM pgtrickle.pgt_consumer_leases l WHERE l.group_name = r.group_name;
        FOR k IN SELECT o.consumer_id, o.committed_txid, o.committed_offset
                   FROM pgtrickle.pgt_consumer_offsets o
                  WHERE o.group_name = r.group_name AND o.committed_txid IS NOT NULL
        LOOP
            EXECUTE v_first INTO v_min USING k.committed_txid, k.committed_offset;
            UPDATE pgtrickle.pgt_consumer_offsets o
               SET committed_txid = '2', committed_offset = least(k.committed_offset, v_min - 1)
             WHERE o.group_name = r.group_name AND o.consumer_id = k.consumer_id;
        END LOOP;
    END LOOP;

    EXECUTE pg_catalog.format('UPDATE pgtrickle.%I SET txid = ''2'' WHERE txid <> ''2''', p_table);
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._outbox_rebase_table(TEXT, TEXT) FROM PUBLIC;
$ddl$);

-- Bring the kit outboxes in line with the cluster they are in: when
-- outbox_cluster names another cluster (the database was restored or cut over
-- into this one), rebase every kit outbox and record this cluster. Callers make
-- sure nothing was written to an outbox here before (the outboxes' insert
-- trigger calls this first; so do the relay and poll_outbox), so every row
-- present predates the move. True when it rebased.
CALL pgtrickle._kit_define('function', '_outbox_cluster_sync', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._outbox_cluster_sync()
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_sys bigint := (SELECT s.system_identifier FROM pg_catalog.pg_control_system() s);
    v_was bigint;
    c     record;
BEGIN
    SELECT k.system_identifier INTO v_was FROM pgtrickle.outbox_cluster k;
    IF v_was = v_sys THEN
        RETURN false;
    END IF;
    -- One session rebases; the others wait here and then find it done.
    INSERT INTO pgtrickle.outbox_cluster (system_identifier) VALUES (0) ON CONFLICT DO NOTHING;
    SELECT k.system_identifier INTO v_was FROM pgtrickle.outbox_cluster k FOR UPDATE;
    IF v_was = v_sys THEN
        RETURN false;
    END IF;
    FOR c IN SELECT o.stream_table_name, o.outbox_table_name
               FROM pgtrickle.pgt_outbox_config o
              WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                             WHERE a.attrelid = pg_catalog.to_regclass(
                                       pg_catalog.format('pgtrickle.%I', o.outbox_table_name))
                               AND a.attname = 'txid' AND a.attnum > 0 AND NOT a.attisdropped)
              ORDER BY o.stream_table_name
    LOOP
        PERFORM pgtrickle._outbox_rebase_table(c.stream_table_name, c.outbox_table_name);
    END LOOP;
    UPDATE pgtrickle.outbox_cluster SET system_identifier = v_sys;
    RAISE LOG 'pgtrickle: this database moved from PostgreSQL cluster % to %: kit outboxes and their positions rebased',
        v_was, v_sys;
    RETURN true;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._outbox_cluster_sync() FROM PUBLIC;
$ddl$);

-- Called by the publish functions before they write to a kit outbox: the
-- first write of a session makes sure (once) that the outboxes belong to this
-- cluster. The generated outbox_publish tests the setting itself and calls
-- this only while it is not 'on', so later writes pay one current_setting().
CALL pgtrickle._kit_define('function', '_outbox_cluster_once', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._outbox_cluster_once()
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
BEGIN
    IF pg_catalog.current_setting('pgtrickle_relay.outbox_cluster_checked', true) IS DISTINCT FROM 'on' THEN
        PERFORM pgtrickle._outbox_cluster_sync();
        PERFORM pg_catalog.set_config('pgtrickle_relay.outbox_cluster_checked', 'on', false);
    END IF;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._outbox_cluster_once() FROM PUBLIC;
$ddl$);

-- Relays asleep on kit outboxes, waiting for a notification (see
-- relay_outbox_sleep). Unlogged: after a crash nobody is asleep, and relays
-- read everything when they connect again.
CREATE UNLOGGED TABLE IF NOT EXISTS pgtrickle.outbox_sleepers (
    outbox_table TEXT NOT NULL,
    pid          INT NOT NULL,
    since        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (outbox_table, pid)
);

-- Called by the publish functions after they inserted a row into kit outbox
-- table p_table: wake up the relays, but only while one is asleep on this
-- outbox. A NOTIFY makes commits wait for each other (PostgreSQL holds a
-- global lock from the NOTIFY's queue write through the commit's WAL flush,
-- so notifying commits cannot share an fsync), so writers notify only when it
-- is needed. The outbox's sleep counter, a sequence, holds the number of
-- relays asleep (relay_outbox_sleep keeps it); an outbox without one (made
-- with p_notify => false, for two-phase commit) never notifies. A sequence is
-- read without a snapshot, so the check sees the counter as it is now, also
-- in a REPEATABLE READ transaction; it runs after the insert gave the
-- transaction its id, which is what relay_outbox_sleep's guard relies on.
-- (Older kits did this, and the cluster check, in statement triggers on the
-- outbox: firing them cost every publishing transaction about a tenth of its
-- CPU time. Rows inserted into an outbox table directly, which only its
-- owner may do, wake nobody: relays find them at their next poll.)
CALL pgtrickle._kit_define('function', '_outbox_written', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._outbox_written(p_table TEXT)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_seq regclass := pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I', pgtrickle._outbox_sleep_counter(p_table)));
BEGIN
    IF v_seq IS NOT NULL AND pg_catalog.pg_sequence_last_value(v_seq) > 0 THEN
        PERFORM pg_catalog.pg_notify('pgtrickle_outbox_new', p_table);
    END IF;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._outbox_written(TEXT) FROM PUBLIC;
$ddl$);

-- The sleep counter of kit outbox table p_table (a sequence, see _outbox_written).
CALL pgtrickle._kit_define('function', '_outbox_sleep_counter', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._outbox_sleep_counter(p_table TEXT)
RETURNS TEXT
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
    SELECT pgtrickle._kit_ident(p_table || '_asleep')
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._outbox_sleep_counter(TEXT) FROM PUBLIC;
$ddl$);

-- A relay reading kit outbox table p_outbox falls asleep (p_asleep) or wakes
-- up. Writers notify only while the outbox's sleep counter is above 0, so a
-- relay must not sleep on a write that did not notify:
--  1. it calls this with p_asleep => true, which counts it in (the counter
--     changes at once, transaction or not) and returns a transaction id G
--     given out after that;
--  2. it reads the outbox again, and sleeps only once nothing is left to read
--     AND pg_snapshot_xmin(pg_current_snapshot()) >= G, checked before that
--     read. A writer that read the counter before step 1 changed it got its
--     own transaction id before that (it inserted first), so below G: once
--     every transaction below G has ended, its rows are committed (or rolled
--     back) and that last read sees them. Until then the relay reads again
--     every few ms. Every later writer sees the counter and notifies.
-- On waking with work to do it calls this with p_asleep => false, and writers
-- stop notifying. The counter is recomputed from outbox_sleepers under an
-- advisory lock (several pipelines may read one outbox), skipping sessions
-- that are gone. Returns NULL, and does nothing, for an outbox without a
-- sleep counter (not a kit outbox, or one made without notifications).
CALL pgtrickle._kit_define('function', 'relay_outbox_sleep', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.relay_outbox_sleep(p_outbox TEXT, p_asleep BOOLEAN)
RETURNS xid8
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_seq oid;
    v_n   bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgtrickle.pgt_outbox_config c
                    WHERE c.outbox_table_name = p_outbox AND c.stream_table_oid IS NULL) THEN
        RETURN NULL;
    END IF;
    v_seq := pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I', pgtrickle._outbox_sleep_counter(p_outbox)));
    IF v_seq IS NULL THEN
        RETURN NULL;
    END IF;
    -- The relay need not wait for this commit's WAL flush: after a crash
    -- nobody is asleep.
    PERFORM pg_catalog.set_config('synchronous_commit', 'off', true);
    PERFORM pg_catalog.pg_advisory_xact_lock(
        pg_catalog.hashtextextended('pgtrickle-relay/asleep/' || p_outbox, 0));
    SELECT count(*) INTO v_n
      FROM pgtrickle.outbox_sleepers s
     WHERE s.outbox_table = p_outbox AND s.pid <> pg_catalog.pg_backend_pid()
       AND s.pid IN (SELECT a.pid FROM pg_catalog.pg_stat_activity a);
    PERFORM pg_catalog.setval(v_seq, v_n + CASE WHEN p_asleep THEN 1 ELSE 0 END, true);
    -- Only now write (which gives this transaction its id: after the counter changed).
    DELETE FROM pgtrickle.outbox_sleepers s
     WHERE s.outbox_table = p_outbox
       AND (s.pid = pg_catalog.pg_backend_pid()
            OR s.pid NOT IN (SELECT a.pid FROM pg_catalog.pg_stat_activity a));
    IF p_asleep THEN
        INSERT INTO pgtrickle.outbox_sleepers (outbox_table, pid) VALUES (p_outbox, pg_catalog.pg_backend_pid());
    END IF;
    RETURN pg_catalog.pg_current_xact_id();
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.relay_outbox_sleep(TEXT, BOOLEAN) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.relay_outbox_sleep(TEXT, BOOLEAN) TO pgtrickle_relay;
$ddl$);

-- ---------------------------------------------------------------------------
-- Creating and dropping outboxes (administrators)
-- ---------------------------------------------------------------------------

-- Create outbox p_name (or update its retention); returns the outbox table name.
-- p_notify: whether publishing sends pg_notify('pgtrickle_outbox_new', <table>)
-- while a relay is asleep on the outbox (see _outbox_written; the default for
-- a new outbox; NULL keeps what an existing outbox has).
-- A transaction that ran NOTIFY cannot PREPARE TRANSACTION: outboxes written by
-- two-phase-commit (XA) transactions need p_notify => false, and relays then
-- poll them every 100 ms instead of waiting for a notification.
CALL pgtrickle._kit_define('function', 'enable_outbox', $ddl$
DO $drop$ BEGIN  -- an older signature; silent on a fresh install
    IF pg_catalog.to_regprocedure('pgtrickle.enable_outbox(text,int)') IS NOT NULL THEN
        DROP FUNCTION pgtrickle.enable_outbox(TEXT, INT);
    END IF;
END $drop$;
CREATE OR REPLACE FUNCTION pgtrickle.enable_outbox(
    p_name TEXT, p_retention_hours INT DEFAULT 24, p_notify BOOLEAN DEFAULT NULL)
RETURNS TEXT
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
SET client_min_messages = warning  -- no "already exists, skipping" on a second call
AS $fn$
DECLARE
    v_outbox text;
    v_delta  text;
    v_view   text;
    v_rel    text;
    v_new    boolean := false;
    v_notify boolean;
BEGIN
    IF p_name IS NULL OR pg_catalog.btrim(p_name) = '' THEN
        RAISE EXCEPTION 'enable_outbox: p_name must be a non-empty outbox name'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_retention_hours IS NULL OR p_retention_hours < 0 THEN
        RAISE EXCEPTION 'enable_outbox: p_retention_hours must be 0 or more, got %', coalesce(p_retention_hours::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    LOCK TABLE pgtrickle.pgt_outbox_config IN SHARE ROW EXCLUSIVE MODE;

    SELECT c.outbox_table_name INTO v_outbox
      FROM pgtrickle.pgt_outbox_config c WHERE c.stream_table_name = p_name;
    IF FOUND THEN
        UPDATE pgtrickle.pgt_outbox_config SET retention_hours = p_retention_hours
         WHERE stream_table_name = p_name;
    ELSE
        v_new := true;
        v_outbox := pgtrickle._kit_ident('outbox_' || p_name);
        IF EXISTS (SELECT 1 FROM pgtrickle.pgt_outbox_config c WHERE c.outbox_table_name = v_outbox) THEN
            RAISE EXCEPTION 'enable_outbox: table name pgtrickle.% is already used by another outbox', pg_catalog.quote_ident(v_outbox)
                USING ERRCODE = 'duplicate_table';
        END IF;
        FOREACH v_rel IN ARRAY ARRAY[v_outbox,
                                     pgtrickle._kit_ident('outbox_delta_rows_' || p_name),
                                     pgtrickle._kit_ident('pgt_outbox_latest_' || p_name)]
        LOOP
            IF pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I', v_rel)) IS NOT NULL THEN
                RAISE EXCEPTION 'enable_outbox: pgtrickle.% already exists and does not belong to an outbox; drop or rename it first', pg_catalog.quote_ident(v_rel)
                    USING ERRCODE = 'duplicate_table';
            END IF;
        END LOOP;
        INSERT INTO pgtrickle.pgt_outbox_config (stream_table_oid, stream_table_name, outbox_table_name, retention_hours)
        VALUES (NULL, p_name, v_outbox, p_retention_hours);
    END IF;

    v_delta := pgtrickle._kit_ident('outbox_delta_rows_' || p_name);
    v_view  := pgtrickle._kit_ident('pgt_outbox_latest_' || p_name);

    -- Everything IF NOT EXISTS: a second call repairs what is missing.
    EXECUTE pg_catalog.format($sql$
        CREATE TABLE IF NOT EXISTS pgtrickle.%I (
            id             BIGSERIAL PRIMARY KEY,
            pgt_id         UUID,
            refresh_id     UUID,
            created_at     TIMESTAMPTZ DEFAULT now(),
            inserted_count INT,
            deleted_count  INT,
            is_claim_check BOOLEAN DEFAULT false,
            payload        JSONB,
            txid           xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
            headers        JSONB,
            idempotency_key TEXT
        )$sql$, v_outbox);
    PERFORM pgtrickle._outbox_upgrade(v_outbox);
    EXECUTE pg_catalog.format('CREATE INDEX IF NOT EXISTS %I ON pgtrickle.%I (created_at)',
                   pgtrickle._kit_ident(v_outbox || '_created_at_idx'), v_outbox);
    -- The relay's read path: WHERE (txid, id) > (...) AND txid < horizon ORDER BY txid, id.
    EXECUTE pg_catalog.format('CREATE INDEX IF NOT EXISTS %I ON pgtrickle.%I (txid, id)',
                   pgtrickle._kit_ident(v_outbox || '_txid_id_idx'), v_outbox);
    EXECUTE pg_catalog.format($sql$
        CREATE TABLE IF NOT EXISTS pgtrickle.%I (
            outbox_id BIGINT NOT NULL REFERENCES pgtrickle.%I (id) ON DELETE CASCADE,
            row_num   INT NOT NULL,
            op        CHAR(1) NOT NULL CHECK (op IN ('I', 'D')),
            payload   JSONB,
            PRIMARY KEY (outbox_id, row_num)
        )$sql$, v_delta, v_outbox);
    EXECUTE pg_catalog.format('CREATE OR REPLACE VIEW pgtrickle.%I AS SELECT * FROM pgtrickle.%I ORDER BY id DESC LIMIT 1',
                   v_view, v_outbox);
    v_notify := coalesce(p_notify, v_new OR pg_catalog.to_regclass(
        pg_catalog.format('pgtrickle.%I', pgtrickle._outbox_sleep_counter(v_outbox))) IS NOT NULL);
    PERFORM pgtrickle._outbox_set_notify(v_outbox, v_notify);
    EXECUTE pg_catalog.format('GRANT SELECT ON pgtrickle.%I, pgtrickle.%I, pgtrickle.%I TO pgtrickle_relay',
                   v_outbox, v_delta, v_view);
    -- outbox_publish names the outbox, and its sleep counter if it notifies.
    PERFORM pgtrickle._outbox_publish_generate();
    RETURN v_outbox;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.enable_outbox(TEXT, INT, BOOLEAN) FROM PUBLIC;
$ddl$);

-- Make kit outbox table p_table notify (p_on: give it its sleep counter, see
-- _outbox_written) or not (drop the counter and forget its sleepers). The
-- caller generates outbox_publish again.
CALL pgtrickle._kit_define('function', '_outbox_set_notify', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._outbox_set_notify(p_table TEXT, p_on BOOLEAN)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
SET client_min_messages = warning
AS $fn$
DECLARE
    v_seq text := pg_catalog.format('pgtrickle.%I', pgtrickle._outbox_sleep_counter(p_table));
BEGIN
    IF p_on THEN
        EXECUTE pg_catalog.format('CREATE SEQUENCE IF NOT EXISTS %s MINVALUE 0 START 0', v_seq);
        -- Read by the publish functions, as their owner (older kits let
        -- PUBLIC read it, for a trigger that ran as the inserting role).
        EXECUTE pg_catalog.format('REVOKE ALL ON SEQUENCE %s FROM PUBLIC', v_seq);
    ELSE
        EXECUTE pg_catalog.format('DROP SEQUENCE IF EXISTS %s', v_seq);
        DELETE FROM pgtrickle.outbox_sleepers s WHERE s.outbox_table = p_table;
    END IF;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._outbox_set_notify(TEXT, BOOLEAN) FROM PUBLIC;
$ddl$);

-- Bring kit outbox table p_table up to this version of the kit: the
-- idempotency_key column and its partial unique index, and no statement
-- triggers (see _outbox_written). Called by enable_outbox and, for every kit outbox, by
-- the install script (so installing the SQL again upgrades existing
-- outboxes). Quiet: it only adds what is missing.
CALL pgtrickle._kit_define('function', '_outbox_upgrade', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._outbox_upgrade(p_table TEXT)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
SET client_min_messages = warning
AS $fn$
DECLARE
    v_oid oid := pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I', p_table));
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = v_oid AND a.attname = 'idempotency_key'
                      AND a.attnum > 0 AND NOT a.attisdropped) THEN
        EXECUTE pg_catalog.format('ALTER TABLE pgtrickle.%I ADD COLUMN idempotency_key TEXT', p_table);
    END IF;
    -- Partial: rows published without a key (NULL) are not in the index, so
    -- they cost nothing more to insert.
    EXECUTE pg_catalog.format(
        'CREATE UNIQUE INDEX IF NOT EXISTS %I ON pgtrickle.%I (idempotency_key) WHERE idempotency_key IS NOT NULL',
        pgtrickle._kit_ident(p_table || '_idempotency_key_idx'), p_table);
    -- An outbox of an older kit, written through statement triggers: it
    -- notifies (now through a sleep counter) if it had the notify trigger.
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                WHERE t.tgrelid = v_oid AND t.tgname IN ('pgtrickle_outbox_notify', 'pgtrickle_outbox_cluster')) THEN
        PERFORM pgtrickle._outbox_set_notify(p_table, EXISTS (
            SELECT 1 FROM pg_catalog.pg_trigger t
             WHERE t.tgrelid = v_oid AND t.tgname = 'pgtrickle_outbox_notify'));
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgtrickle_outbox_notify ON pgtrickle.%I', p_table);
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgtrickle_outbox_cluster ON pgtrickle.%I', p_table);
    END IF;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._outbox_upgrade(TEXT) FROM PUBLIC;
$ddl$);

-- Kit outboxes made by an older kit are upgraded.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT o.outbox_table_name FROM pgtrickle.pgt_outbox_config o
              WHERE o.stream_table_oid IS NULL
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                             WHERE a.attrelid = pg_catalog.to_regclass(
                                       pg_catalog.format('pgtrickle.%I', o.outbox_table_name))
                               AND a.attname = 'txid' AND a.attnum > 0 AND NOT a.attisdropped)
    LOOP
        PERFORM pgtrickle._outbox_upgrade(c.outbox_table_name);
    END LOOP;
END
$$;
-- What the statement triggers of older kits ran goes with the triggers (kept
-- while a trigger still uses it, or an extension owns it).
DO $$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY['_outbox_notify()', '_outbox_cluster_check()',
                             '_outbox_notify_trigger(text)', '_outbox_cluster_trigger(text)']
    LOOP
        IF pg_catalog.to_regprocedure('pgtrickle.' || f) IS NOT NULL
           AND pgtrickle._kit_owner_extension('function', pg_catalog.split_part(f, '(', 1)) IS NULL
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                            WHERE t.tgfoid = pg_catalog.to_regprocedure('pgtrickle.' || f)) THEN
            EXECUTE 'DROP FUNCTION pgtrickle.' || f;
        END IF;
    END LOOP;
END
$$;

-- Drop outbox p_name: its tables, view, configuration and consumer groups.
CALL pgtrickle._kit_define('function', 'disable_outbox', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.disable_outbox(p_name TEXT, p_if_exists BOOLEAN DEFAULT false)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg pgtrickle.pgt_outbox_config;
    v_pipelines text;
BEGIN
    LOCK TABLE pgtrickle.pgt_outbox_config IN SHARE ROW EXCLUSIVE MODE;
    SELECT c.* INTO v_cfg FROM pgtrickle.pgt_outbox_config c
     WHERE c.stream_table_name = p_name OR c.outbox_table_name = p_name
     ORDER BY (c.stream_table_name = p_name) DESC LIMIT 1;
    IF NOT FOUND THEN
        IF coalesce(p_if_exists, false) THEN
            RAISE NOTICE 'disable_outbox: outbox "%" does not exist, skipping', p_name;
            RETURN;
        END IF;
        RAISE EXCEPTION 'disable_outbox: outbox "%" does not exist', p_name
            USING ERRCODE = 'no_data_found';
    END IF;

    EXECUTE format('DROP VIEW IF EXISTS pgtrickle.%I',
                   pgtrickle._kit_ident('pgt_outbox_latest_' || v_cfg.stream_table_name));
    EXECUTE format('DROP TABLE IF EXISTS pgtrickle.%I',
                   pgtrickle._kit_ident('outbox_delta_rows_' || v_cfg.stream_table_name));
    EXECUTE format('DROP TABLE IF EXISTS pgtrickle.%I', v_cfg.outbox_table_name);
    EXECUTE format('DROP SEQUENCE IF EXISTS pgtrickle.%I', pgtrickle._outbox_sleep_counter(v_cfg.outbox_table_name));
    DELETE FROM pgtrickle.outbox_sleepers WHERE outbox_table = v_cfg.outbox_table_name;
    DELETE FROM pgtrickle.pgt_outbox_config WHERE stream_table_name = v_cfg.stream_table_name;
    PERFORM pgtrickle._outbox_publish_generate();

    -- Consumer groups on a dropped outbox have nothing left to read.
    DELETE FROM pgtrickle.pgt_consumer_leases l USING pgtrickle.pgt_consumer_groups g
     WHERE l.group_name = g.group_name AND g.outbox_name IN (v_cfg.stream_table_name, v_cfg.outbox_table_name);
    DELETE FROM pgtrickle.pgt_consumer_offsets o USING pgtrickle.pgt_consumer_groups g
     WHERE o.group_name = g.group_name AND g.outbox_name IN (v_cfg.stream_table_name, v_cfg.outbox_table_name);
    DELETE FROM pgtrickle.pgt_consumer_groups g
     WHERE g.outbox_name IN (v_cfg.stream_table_name, v_cfg.outbox_table_name);

    SELECT string_agg(c.name, ', ' ORDER BY c.name) INTO v_pipelines
      FROM pgtrickle.relay_outbox_config c
     WHERE c.config -> 'source' ->> 'outbox' IN (v_cfg.stream_table_name, v_cfg.outbox_table_name);
    IF v_pipelines IS NOT NULL THEN
        RAISE WARNING 'disable_outbox: relay pipelines still read outbox "%": %', p_name, v_pipelines
            USING HINT = 'Delete them with pgtrickle.delete_relay(name) or point them at another outbox.';
    END IF;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.disable_outbox(TEXT, BOOLEAN) FROM PUBLIC;
$ddl$);

-- ---------------------------------------------------------------------------
-- Publishing (grant EXECUTE to your application roles)
-- ---------------------------------------------------------------------------

-- Insert an outbox row carrying idempotency key p_key into kit outbox table
-- p_table, unless a row with that key is there: then write nothing and return
-- that row's id. The key is a column of the row (unique where not NULL), so it
-- lasts exactly as long as the row: outbox_retention removes both.
-- Two transactions racing with one key: the second waits on the first one's
-- index entry; if the first commits, the second returns its id, if it rolls
-- back, the second inserts. (Under REPEATABLE READ or SERIALIZABLE, a first
-- row committed after the second's snapshot was taken raises
-- serialization_failure instead: retry the transaction.)
-- Returns (id, inserted).
CALL pgtrickle._kit_define('function', '_outbox_insert_keyed', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._outbox_insert_keyed(
    p_table TEXT, p_key TEXT, p_refresh UUID, p_ins INT, p_del INT, p_claim BOOLEAN,
    p_payload JSONB, p_headers JSONB, OUT id BIGINT, OUT inserted BOOLEAN)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
BEGIN
    LOOP
        EXECUTE pg_catalog.format($sql$
            INSERT INTO pgtrickle.%I AS o
                   (refresh_id, inserted_count, deleted_count, is_claim_check, payload, headers, idempotency_key)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING o.id$sql$, p_table)
           INTO id
          USING p_refresh, p_ins, p_del, p_claim, p_payload, p_headers, p_key;
        IF id IS NOT NULL THEN
            inserted := true;
            RETURN;
        END IF;
        EXECUTE pg_catalog.format('SELECT o.id FROM pgtrickle.%I o WHERE o.idempotency_key = $1', p_table)
           INTO id USING p_key;
        IF id IS NOT NULL THEN
            inserted := false;
            RETURN;
        END IF;
        -- The row went (retention) between the two statements: insert again.
    END LOOP;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._outbox_insert_keyed(TEXT, TEXT, UUID, INT, INT, BOOLEAN, JSONB, JSONB) FROM PUBLIC;
$ddl$);

-- W3C Trace Context: the headers an outbox row gets when the writing session
-- or transaction sets pgtrickle.traceparent (SET LOCAL pgtrickle.traceparent
-- = '00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>') and, with it,
-- pgtrickle.tracestate: p_headers plus "traceparent" (and "tracestate").
-- Headers the caller gives win: with a "traceparent" in p_headers, nothing
-- is taken from the settings. A value that is not a version-00 traceparent
-- in lowercase hex (or whose version is ff, or whose trace or parent id is
-- all zeros) is ignored, with its tracestate: a bad setting must not fail
-- the application's transaction. A tracestate longer than 512 characters is
-- ignored too. The publish functions call this only when the setting is
-- not empty, so a transaction without trace context pays one
-- current_setting() call.
CALL pgtrickle._kit_define('function', '_outbox_trace_headers', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._outbox_trace_headers(p_headers JSONB, p_traceparent TEXT)
RETURNS JSONB
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_tp      text := btrim(p_traceparent);
    v_ts      text;
    v_headers jsonb := coalesce(p_headers, '{}'::jsonb);
BEGIN
    IF v_headers ? 'traceparent'
       OR v_tp !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
       OR left(v_tp, 2) = 'ff'
       OR substr(v_tp, 4, 32) = repeat('0', 32)
       OR substr(v_tp, 37, 16) = repeat('0', 16) THEN
        RETURN p_headers;
    END IF;
    v_headers := v_headers || jsonb_build_object('traceparent', v_tp);
    v_ts := btrim(current_setting('pgtrickle.tracestate', true));
    IF v_ts <> '' AND length(v_ts) <= 512 AND NOT v_headers ? 'tracestate' THEN
        v_headers := v_headers || jsonb_build_object('tracestate', v_ts);
    END IF;
    RETURN v_headers;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._outbox_trace_headers(JSONB, TEXT) FROM PUBLIC;
$ddl$);

-- Publish one row as an inline v1 change set; returns the outbox id.
-- p_headers (a JSON object) become the row's headers; with the setting
-- pgtrickle.traceparent set, its trace context is added (see
-- _outbox_trace_headers; a "traceparent" in p_headers wins).
-- p_idempotency_key: when given, a second publish with the same key into the
-- same outbox writes nothing and returns the first row's id (see
-- _outbox_insert_keyed).
--
-- It runs once per application transaction, so it is generated: one static
-- INSERT per kit outbox (PL/pgSQL keeps its plan for the session), chosen by
-- comparing names, instead of a catalog lookup and dynamic SQL per call
-- (which plans the INSERT again every time), and with the outbox's
-- notification (_outbox_written) inline, reading its sleep counter by name.
-- enable_outbox and disable_outbox generate it again; so does installing the
-- SQL. An outbox it does not know yet (none: the generation runs in the same
-- transaction that creates one) and keyed calls take the general path.
CALL pgtrickle._kit_define('function', '_outbox_publish_generate', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._outbox_publish_generate()
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $gen$
DECLARE
    v_branches text := '';
    v_kw       text := 'IF';
    v_wake     text;
    r          record;
BEGIN
    IF pgtrickle._kit_owner_extension('function', 'outbox_publish') IS NOT NULL THEN
        RETURN;  -- an extension's: left as it is
    END IF;
    -- Stream names first, then table names: _outbox_lookup's preference.
    FOR r IN SELECT n.name, c.outbox_table_name,
                    pg_catalog.format('pgtrickle.%I', pgtrickle._outbox_sleep_counter(c.outbox_table_name)) AS counter
               FROM pgtrickle.pgt_outbox_config c
               CROSS JOIN LATERAL (VALUES (1, c.stream_table_name), (2, c.outbox_table_name)) AS n(pass, name)
              WHERE c.stream_table_oid IS NULL
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                             WHERE a.attrelid = pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I', c.outbox_table_name))
                               AND a.attname = 'headers' AND a.attnum > 0 AND NOT a.attisdropped)
              ORDER BY n.pass, n.name
    LOOP
        v_wake := '';
        -- As _outbox_written does; looked up by name at each call, so that a
        -- counter dropped by hand stops the notifications, not the writes.
        IF pg_catalog.to_regclass(r.counter) IS NOT NULL THEN
            v_wake := pg_catalog.format($w$
            IF pg_catalog.pg_sequence_last_value(pg_catalog.to_regclass(%L)) > 0 THEN
                PERFORM pg_catalog.pg_notify('pgtrickle_outbox_new', %L);
            END IF;$w$, r.counter, r.outbox_table_name);
        END IF;
        v_branches := v_branches || pg_catalog.format($b$
        %s p_outbox = %L THEN
            INSERT INTO pgtrickle.%I (refresh_id, inserted_count, deleted_count, is_claim_check, payload, headers)
            VALUES (pg_catalog.gen_random_uuid(), 1, 0, false, v_payload, p_headers)
            RETURNING id INTO v_id;%s
            RETURN v_id;$b$, v_kw, r.name, r.outbox_table_name, v_wake);
        v_kw := 'ELSIF';
    END LOOP;
    IF v_branches <> '' THEN
        v_branches := 'IF p_idempotency_key IS NULL THEN' || v_branches || '
        END IF;
    END IF;';
    END IF;
    EXECUTE pg_catalog.format($f$
CREATE OR REPLACE FUNCTION pgtrickle.outbox_publish(
    p_outbox TEXT, p_payload JSONB, p_headers JSONB DEFAULT NULL, p_idempotency_key TEXT DEFAULT NULL)
RETURNS BIGINT
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_payload jsonb;
    v_table   text;
    v_id      bigint;
    v_new     boolean;
    v_trace   text := current_setting('pgtrickle.traceparent', true);
BEGIN
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        RAISE EXCEPTION 'outbox_publish: p_payload must be a JSON object (the row), got %%', coalesce(jsonb_typeof(p_payload), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_headers IS NOT NULL AND jsonb_typeof(p_headers) <> 'object' THEN
        RAISE EXCEPTION 'outbox_publish: p_headers must be a JSON object or NULL, got %%', jsonb_typeof(p_headers)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_trace <> '' THEN  -- W3C trace context of the caller (NULL or '': none)
        p_headers := pgtrickle._outbox_trace_headers(p_headers, v_trace);
    END IF;
    v_payload := jsonb_build_object('v', 1, 'inserted', jsonb_build_array(p_payload), 'deleted', '[]'::jsonb);
    IF current_setting('pgtrickle_relay.outbox_cluster_checked', true) IS DISTINCT FROM 'on' THEN
        PERFORM pgtrickle._outbox_cluster_once();
    END IF;
    -- Generated by _outbox_publish_generate:
    %s
    v_table := (pgtrickle._outbox_lookup(p_outbox, 'outbox_publish')).outbox_table_name;
    IF p_idempotency_key IS NOT NULL THEN
        SELECT k.id, k.inserted INTO v_id, v_new
          FROM pgtrickle._outbox_insert_keyed(v_table, p_idempotency_key, gen_random_uuid(), 1, 0, false,
                                              v_payload, p_headers) k;
        IF v_new THEN
            PERFORM pgtrickle._outbox_written(v_table);
        END IF;
        RETURN v_id;
    END IF;
    EXECUTE format($sql$
        INSERT INTO pgtrickle.%%I (refresh_id, inserted_count, deleted_count, is_claim_check, payload, headers)
        VALUES (gen_random_uuid(), 1, 0, false, $1, $2)
        RETURNING id$sql$, v_table)
       INTO v_id
      USING v_payload, p_headers;
    RETURN v_id;
END
$fn$$f$, v_branches);
END
$gen$;
REVOKE EXECUTE ON FUNCTION pgtrickle._outbox_publish_generate() FROM PUBLIC;
$ddl$);

CALL pgtrickle._kit_define('function', 'outbox_publish', $ddl$
SELECT pgtrickle._outbox_publish_generate();
SELECT pgtrickle._kit_retire_function('pgtrickle.outbox_publish(text,jsonb,jsonb)',
                                      'pgtrickle.outbox_publish(text,jsonb,jsonb,text)');
REVOKE EXECUTE ON FUNCTION pgtrickle.outbox_publish(TEXT, JSONB, JSONB, TEXT) FROM PUBLIC;
$ddl$);

-- Publish a change set (arrays of deleted and inserted rows): inline up to
-- pgtrickle.outbox_inline_threshold rows (default 10000), claim-check above.
-- A NULL array counts as empty (jsonb_agg over no rows gives NULL).
-- p_idempotency_key: as for outbox_publish (a repeat writes no delta rows).
-- The row's headers: the caller's W3C trace context from the settings
-- pgtrickle.traceparent and pgtrickle.tracestate (see _outbox_trace_headers),
-- else none (and none in an outbox table without a headers column).
CALL pgtrickle._kit_define('function', 'outbox_publish_delta', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.outbox_publish_delta(
    p_outbox TEXT, p_inserted JSONB, p_deleted JSONB DEFAULT '[]',
    p_full_refresh BOOLEAN DEFAULT false, p_idempotency_key TEXT DEFAULT NULL)
RETURNS BIGINT
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg       pgtrickle.pgt_outbox_config := pgtrickle._outbox_lookup(p_outbox, 'outbox_publish_delta');
    v_ins       jsonb := coalesce(p_inserted, '[]'::jsonb);
    v_del       jsonb := coalesce(p_deleted, '[]'::jsonb);
    v_setting   text := current_setting('pgtrickle.outbox_inline_threshold', true);
    v_threshold bigint;
    v_n_ins     int;
    v_n_del     int;
    v_refresh   uuid := gen_random_uuid();
    v_payload   jsonb;
    v_claim     boolean;
    v_id        bigint;
    v_role      text;
    v_fast      boolean;
    v_new       boolean;
    v_trace     text := current_setting('pgtrickle.traceparent', true);
    v_headers   jsonb;
BEGIN
    IF jsonb_typeof(v_ins) <> 'array' THEN
        RAISE EXCEPTION 'outbox_publish_delta: p_inserted must be a JSON array of rows, got %', jsonb_typeof(v_ins)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(v_del) <> 'array' THEN
        RAISE EXCEPTION 'outbox_publish_delta: p_deleted must be a JSON array of rows, got %', jsonb_typeof(v_del)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    BEGIN
        v_threshold := coalesce(nullif(btrim(v_setting), '')::bigint, 10000);
    EXCEPTION WHEN invalid_text_representation OR numeric_value_out_of_range THEN
        v_threshold := -1;
    END;
    IF v_threshold < 0 THEN
        RAISE EXCEPTION 'outbox_publish_delta: pgtrickle.outbox_inline_threshold must be a whole number of rows >= 0, got "%"', v_setting
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    v_n_ins := jsonb_array_length(v_ins);
    v_n_del := jsonb_array_length(v_del);
    v_claim := v_n_ins + v_n_del > v_threshold;
    IF v_claim THEN
        v_payload := jsonb_build_object('v', 1, 'claim_check', true,
                                        'inserted_count', v_n_ins, 'deleted_count', v_n_del,
                                        'refresh_id', v_refresh::text);
    ELSE
        v_payload := jsonb_build_object('v', 1, 'inserted', v_ins, 'deleted', v_del);
    END IF;
    IF coalesce(p_full_refresh, false) THEN
        v_payload := v_payload || '{"full_refresh": true}'::jsonb;
    END IF;
    -- W3C trace context of the caller (NULL or '': none), into an outbox
    -- that has a headers column (the pg_trickle extension's has none).
    IF v_trace <> '' AND EXISTS (
           SELECT 1 FROM pg_catalog.pg_attribute a
            WHERE a.attrelid = pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I', v_cfg.outbox_table_name))
              AND a.attname = 'headers' AND a.attnum > 0 AND NOT a.attisdropped) THEN
        v_headers := pgtrickle._outbox_trace_headers(NULL, v_trace);
    END IF;

    PERFORM pgtrickle._outbox_cluster_once();
    IF p_idempotency_key IS NOT NULL THEN
        SELECT k.id, k.inserted INTO v_id, v_new
          FROM pgtrickle._outbox_insert_keyed(v_cfg.outbox_table_name, p_idempotency_key, v_refresh,
                                              v_n_ins, v_n_del, v_claim, v_payload, v_headers) k;
        IF NOT v_new THEN
            RETURN v_id;  -- published before under this key: nothing more to write
        END IF;
    ELSIF v_headers IS NULL THEN
        EXECUTE format($sql$
            INSERT INTO pgtrickle.%I (refresh_id, inserted_count, deleted_count, is_claim_check, payload)
            VALUES ($1, $2, $3, $4, $5)
            RETURNING id$sql$, v_cfg.outbox_table_name)
           INTO v_id
          USING v_refresh, v_n_ins, v_n_del, v_claim, v_payload;
    ELSE
        EXECUTE format($sql$
            INSERT INTO pgtrickle.%I (refresh_id, inserted_count, deleted_count, is_claim_check, payload, headers)
            VALUES ($1, $2, $3, $4, $5, $6)
            RETURNING id$sql$, v_cfg.outbox_table_name)
           INTO v_id
          USING v_refresh, v_n_ins, v_n_del, v_claim, v_payload, v_headers;
    END IF;
    PERFORM pgtrickle._outbox_written(v_cfg.outbox_table_name);

    IF v_claim THEN
        -- Every delta row references the outbox row inserted just above, so
        -- the per-row foreign-key check can only pass; it is half the cost of
        -- a million-row delta. Skip it (triggers off for this one statement)
        -- when the function's owner may do so, i.e. is a superuser.
        v_role := current_setting('session_replication_role');
        BEGIN
            PERFORM set_config('session_replication_role', 'replica', true);
            v_fast := true;
        EXCEPTION WHEN insufficient_privilege THEN
            v_fast := false;
        END;
        -- Deletes first (row_num 0..), then inserts: an update is "delete old,
        -- insert new" and must be applied in that order.
        EXECUTE format($sql$
            INSERT INTO pgtrickle.%I (outbox_id, row_num, op, payload)
            SELECT $1, (d.ord - 1)::int, 'D', d.row FROM jsonb_array_elements($2) WITH ORDINALITY AS d(row, ord)
            UNION ALL
            SELECT $1, ($3 + i.ord - 1)::int, 'I', i.row FROM jsonb_array_elements($4) WITH ORDINALITY AS i(row, ord)
            $sql$, pgtrickle._kit_ident('outbox_delta_rows_' || v_cfg.stream_table_name))
          USING v_id, v_del, v_n_del, v_ins;
        IF v_fast THEN
            PERFORM set_config('session_replication_role', v_role, true);
        END IF;
    END IF;
    RETURN v_id;
END
$fn$;
SELECT pgtrickle._kit_retire_function('pgtrickle.outbox_publish_delta(text,jsonb,jsonb,boolean)',
                                      'pgtrickle.outbox_publish_delta(text,jsonb,jsonb,boolean,text)');
REVOKE EXECUTE ON FUNCTION pgtrickle.outbox_publish_delta(TEXT, JSONB, JSONB, BOOLEAN, TEXT) FROM PUBLIC;
$ddl$);

-- ---------------------------------------------------------------------------
-- What the relay calls (EXECUTE granted to pgtrickle_relay)
-- ---------------------------------------------------------------------------

-- Record that the claim-check rows of outbox row outbox_id were drained.
-- Idempotent; deletes nothing (other pipelines may still need the rows:
-- retention removes them together with their outbox row).
CALL pgtrickle._kit_define('function', 'outbox_rows_consumed', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.outbox_rows_consumed(stream_table TEXT, outbox_id BIGINT)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg   pgtrickle.pgt_outbox_config;
    v_count bigint;
BEGIN
    SELECT c.* INTO v_cfg FROM pgtrickle.pgt_outbox_config c
     WHERE c.stream_table_name = $1 OR c.outbox_table_name = $1
     ORDER BY (c.stream_table_name = $1) DESC LIMIT 1;
    IF NOT FOUND OR to_regclass(format('pgtrickle.%I', v_cfg.outbox_table_name)) IS NULL THEN
        RETURN;  -- an outbox without a catalog row: nothing to record
    END IF;
    EXECUTE format('SELECT coalesce(inserted_count, 0)::bigint + coalesce(deleted_count, 0) FROM pgtrickle.%I WHERE id = $1',
                   v_cfg.outbox_table_name)
       INTO v_count USING $2;
    IF v_count IS NULL THEN
        RETURN;  -- already removed by retention
    END IF;
    UPDATE pgtrickle.pgt_outbox_config
       SET last_drained_at = now(), last_drained_count = v_count
     WHERE stream_table_name = v_cfg.stream_table_name;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.outbox_rows_consumed(TEXT, BIGINT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.outbox_rows_consumed(TEXT, BIGINT) TO pgtrickle_relay;
$ddl$);

-- How the relay finds an outbox's tables: p_outbox is a stream name or an
-- outbox table name, from pgt_outbox_config or else from the tables present.
-- notifies: inserts send pg_notify (false for a kit outbox made with
-- p_notify => false: the relay polls it).
CALL pgtrickle._kit_define('function', 'relay_outbox_info', $ddl$
DO $drop$ BEGIN  -- an older signature; silent on a fresh install
    IF pg_catalog.to_regprocedure('pgtrickle.relay_outbox_info(text)') IS NOT NULL THEN
        DROP FUNCTION pgtrickle.relay_outbox_info(TEXT);
    END IF;
END $drop$;
CREATE OR REPLACE FUNCTION pgtrickle.relay_outbox_info(p_outbox TEXT)
RETURNS TABLE(stream_table TEXT, outbox_table TEXT, delta_table TEXT, has_txid BOOLEAN, notifies BOOLEAN,
              notifies_sleepers BOOLEAN)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_stream text;
    v_table  text;
    v_oid    oid;
    v_kit    boolean := false;
BEGIN
    SELECT c.stream_table_name, c.outbox_table_name, c.stream_table_oid IS NULL
      INTO v_stream, v_table, v_kit
      FROM pgtrickle.pgt_outbox_config c
     WHERE c.stream_table_name = p_outbox OR c.outbox_table_name = p_outbox
     ORDER BY (c.stream_table_name = p_outbox) DESC LIMIT 1;
    IF FOUND THEN
        v_oid := pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I', v_table));
        IF v_oid IS NULL THEN
            RAISE EXCEPTION 'outbox "%" is registered in pgtrickle.pgt_outbox_config but its table pgtrickle.% is missing',
                p_outbox, pg_catalog.quote_ident(v_table)
                USING ERRCODE = 'undefined_table';
        END IF;
    ELSIF p_outbox LIKE 'outbox\_%' AND pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I', p_outbox)) IS NOT NULL THEN
        v_table := p_outbox;
        v_stream := pg_catalog.substr(p_outbox, 8);
        v_oid := pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I', p_outbox));
    ELSIF pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I', pgtrickle._kit_ident('outbox_' || p_outbox))) IS NOT NULL THEN
        v_table := pgtrickle._kit_ident('outbox_' || p_outbox);
        v_stream := p_outbox;
        v_oid := pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I', v_table));
    ELSE
        RAISE EXCEPTION 'outbox "%" not found: no pgtrickle.pgt_outbox_config row and no table pgtrickle.outbox_% (create it with pgtrickle.enable_outbox(%))',
            p_outbox, p_outbox, pg_catalog.quote_literal(coalesce(p_outbox, ''))
            USING ERRCODE = 'no_data_found';
    END IF;

    stream_table := v_stream;
    outbox_table := v_table;
    -- The claim-check table is the one whose foreign key references the outbox.
    SELECT r.relname INTO delta_table
      FROM pg_catalog.pg_constraint k
      JOIN pg_catalog.pg_class r ON r.oid = k.conrelid
     WHERE k.contype = 'f' AND k.confrelid = v_oid
       AND r.relnamespace = 'pgtrickle'::pg_catalog.regnamespace
     ORDER BY (r.relname LIKE 'outbox\_delta\_rows\_%') DESC, r.relname
     LIMIT 1;
    has_txid := EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                         WHERE a.attrelid = v_oid AND a.attname = 'txid'
                           AND a.attnum > 0 AND NOT a.attisdropped);
    -- pg_trickle notifies for its own outboxes. The kit's publish functions
    -- notify for a kit outbox with a sleep counter, and only while a relay is
    -- asleep on it (_outbox_written, relay_outbox_sleep).
    notifies_sleepers := coalesce(v_kit, false)
                AND pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I',
                        pgtrickle._outbox_sleep_counter(v_table))) IS NOT NULL;
    notifies := NOT coalesce(v_kit, false) OR notifies_sleepers;
    RETURN NEXT;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.relay_outbox_info(TEXT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.relay_outbox_info(TEXT) TO pgtrickle_relay;
$ddl$);

-- After moving this database to another cluster when nothing proves which
-- outbox rows came before the move (the relay says so and names this call):
-- rebase outbox p_outbox (see _outbox_rebase_table). Rows written since the
-- move must have higher ids than the rows before it: pg_dump carries the id
-- sequence over; after a logical-replication cutover set it with setval. The
-- relays reading the outbox must be stopped: a pipeline whose lock stays held
-- for 10 s makes it fail, changing nothing.
CALL pgtrickle._kit_define('function', 'outbox_rebase', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.outbox_rebase(p_outbox TEXT)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
SET lock_timeout = '10s'
AS $fn$
DECLARE
    v_cfg pgtrickle.pgt_outbox_config := pgtrickle._outbox_lookup(p_outbox, 'outbox_rebase');
    r     record;
BEGIN
    IF NOT (SELECT i.has_txid FROM pgtrickle.relay_outbox_info(v_cfg.stream_table_name) i) THEN
        RAISE EXCEPTION 'outbox_rebase: outbox "%" has no txid column: it is read by id and needs no rebase', p_outbox
            USING ERRCODE = 'feature_not_supported';
    END IF;
    PERFORM pgtrickle._outbox_cluster_sync();
    -- A running relay keeps its position in memory: it must not run on.
    FOR r IN SELECT o.relay_group_id, o.pipeline_id FROM pgtrickle.relay_consumer_offsets o
              WHERE o.outbox = v_cfg.outbox_table_name
                 OR (o.outbox IS NULL AND EXISTS (
                        SELECT 1 FROM pgtrickle.relay_outbox_config c
                         WHERE c.name = o.pipeline_id
                           AND c.config -> 'source' ->> 'outbox' IN (v_cfg.stream_table_name, v_cfg.outbox_table_name)))
    LOOP
        BEGIN
            PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(
                pg_catalog.format('pgtrickle-relay/%s/%s', r.relay_group_id, r.pipeline_id), 0));
        EXCEPTION WHEN lock_not_available THEN
            RAISE EXCEPTION 'outbox_rebase: pipeline "%" of relay group "%" is running: stop the relays reading outbox "%", then run this again',
                r.pipeline_id, r.relay_group_id, p_outbox
                USING ERRCODE = 'lock_not_available';
        END;
    END LOOP;
    PERFORM pgtrickle._outbox_rebase_table(v_cfg.stream_table_name, v_cfg.outbox_table_name);
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.outbox_rebase(TEXT) FROM PUBLIC;
$ddl$);

-- ---------------------------------------------------------------------------
-- Monitoring and retention (administrators)
-- ---------------------------------------------------------------------------

-- A JSON summary of outbox p_name: size, age, drains, and every consumer's position.
CALL pgtrickle._kit_define('function', 'outbox_status', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.outbox_status(p_name TEXT)
RETURNS JSONB
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg     pgtrickle.pgt_outbox_config := pgtrickle._outbox_lookup(p_name, 'outbox_status');
    v_info    record;
    v_stats   record;
    v_groups  jsonb;
    v_relays  jsonb;
BEGIN
    SELECT * INTO v_info FROM pgtrickle.relay_outbox_info(v_cfg.stream_table_name);

    -- pending_claim_checks: claim-check rows some consumer has not committed
    -- yet (all of them when nobody consumes the outbox).
    EXECUTE format($sql$
        SELECT count(*) AS row_count,
               count(*) FILTER (WHERE is_claim_check AND NOT %s) AS pending_claim_checks,
               min(created_at) AS oldest, max(created_at) AS newest, max(id) AS newest_id
          FROM pgtrickle.%I$sql$,
        pgtrickle._outbox_consumed_sql(v_cfg.stream_table_name, v_cfg.outbox_table_name, v_info.has_txid, false),
        v_cfg.outbox_table_name)
      INTO v_stats;

    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'group', g.group_name,
               'auto_offset_reset', g.auto_offset_reset,
               'committed_id', g.committed_id,
               'committed_txid', g.committed_txid::text,
               'consumers', (SELECT count(*) FROM pgtrickle.pgt_consumer_offsets o WHERE o.group_name = g.group_name),
               'active_leases', (SELECT count(*) FROM pgtrickle.pgt_consumer_leases l
                                  WHERE l.group_name = g.group_name AND NOT l.done AND l.lease_expires > now()))
             ORDER BY g.group_name), '[]'::jsonb)
      INTO v_groups
      FROM pgtrickle.pgt_consumer_groups g
     WHERE g.outbox_name IN (v_cfg.stream_table_name, v_cfg.outbox_table_name);

    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'pipeline', c.name,
               'enabled', c.enabled,
               'offsets', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                                       'relay_group', x.relay_group_id,
                                       'last_change_id', x.last_change_id,
                                       'last_txid', x.last_txid::text,
                                       'worker_id', x.worker_id,
                                       'updated_at', x.updated_at) ORDER BY x.relay_group_id), '[]'::jsonb)
                             FROM pgtrickle.relay_consumer_offsets x WHERE x.pipeline_id = c.name))
             ORDER BY c.name), '[]'::jsonb)
      INTO v_relays
      FROM pgtrickle.relay_outbox_config c
     WHERE c.config -> 'source' ->> 'outbox' IN (v_cfg.stream_table_name, v_cfg.outbox_table_name);

    RETURN jsonb_build_object(
        'outbox', v_cfg.stream_table_name,
        'outbox_table', v_cfg.outbox_table_name,
        'delta_table', v_info.delta_table,
        'row_count', v_stats.row_count,
        'pending_claim_checks', v_stats.pending_claim_checks,
        'oldest_created_at', v_stats.oldest,
        'newest_created_at', v_stats.newest,
        'newest_id', v_stats.newest_id,
        'retention_hours', v_cfg.retention_hours,
        'last_drained_at', v_cfg.last_drained_at,
        'last_drained_count', v_cfg.last_drained_count,
        'consumer_groups', v_groups,
        'relay_pipelines', v_relays);
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.outbox_status(TEXT) FROM PUBLIC;
$ddl$);

-- Delete outbox rows older than their outbox's retention_hours, in batches of
-- p_batch_size; unless p_force, never a row that a consumer group or a relay
-- pipeline reading the outbox has not committed (a pipeline that never
-- committed keeps everything). p_name NULL: every outbox. Returns rows deleted.
CALL pgtrickle._kit_define('function', 'outbox_retention', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.outbox_retention(
    p_name TEXT DEFAULT NULL, p_force BOOLEAN DEFAULT false, p_batch_size INT DEFAULT 10000)
RETURNS BIGINT
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg     pgtrickle.pgt_outbox_config;
    v_info    record;
    v_cond    text;
    v_sql     text;
    v_n       bigint;
    v_total   bigint := 0;
BEGIN
    IF p_batch_size IS NULL OR p_batch_size < 1 THEN
        RAISE EXCEPTION 'outbox_retention: p_batch_size must be 1 or more, got %', coalesce(p_batch_size::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_name IS NOT NULL THEN
        PERFORM pgtrickle._outbox_lookup(p_name, 'outbox_retention');
    END IF;

    FOR v_cfg IN SELECT c.* FROM pgtrickle.pgt_outbox_config c
                  WHERE p_name IS NULL OR c.stream_table_name = p_name OR c.outbox_table_name = p_name
                  ORDER BY c.stream_table_name
    LOOP
        IF to_regclass(format('pgtrickle.%I', v_cfg.outbox_table_name)) IS NULL THEN
            RAISE NOTICE 'outbox_retention: table pgtrickle.% of outbox "%" is missing, skipped',
                quote_ident(v_cfg.outbox_table_name), v_cfg.stream_table_name;
            CONTINUE;
        END IF;
        SELECT * INTO v_info FROM pgtrickle.relay_outbox_info(v_cfg.stream_table_name);
        IF coalesce(p_force, false) THEN
            v_cond := 'true';
        ELSE
            v_cond := pgtrickle._outbox_consumed_sql(v_cfg.stream_table_name, v_cfg.outbox_table_name,
                                                     v_info.has_txid, true);
        END IF;
        IF v_cond = 'false' THEN
            CONTINUE;  -- a pipeline that never committed: keep everything
        END IF;
        v_sql := format($sql$
            DELETE FROM pgtrickle.%1$I WHERE id IN (
                SELECT id FROM pgtrickle.%1$I
                 WHERE created_at < now() - make_interval(hours => $1) AND %2$s
                 ORDER BY id LIMIT $2)$sql$, v_cfg.outbox_table_name, v_cond);
        LOOP
            EXECUTE v_sql USING v_cfg.retention_hours, p_batch_size;
            GET DIAGNOSTICS v_n = ROW_COUNT;
            v_total := v_total + v_n;
            EXIT WHEN v_n < p_batch_size;
        END LOOP;
    END LOOP;
    RETURN v_total;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.outbox_retention(TEXT, BOOLEAN, INT) FROM PUBLIC;
$ddl$);
