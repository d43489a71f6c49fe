-- pgtrickle-relay: 20_consumer_groups.sql — Kafka-style consumer groups on kit outboxes.
--
-- Several consumers (relays, workers) share one outbox through a group. Rows
-- are handed out in commit-horizon order: only rows whose writing transaction
-- is older than pg_snapshot_xmin(pg_current_snapshot()) (every older
-- transaction has finished, so nothing can still appear before them), ordered
-- by (txid, id). A position is such a (txid, id) pair.
--
-- poll_outbox leases the next batch to a consumer until now() + visibility; the
-- leases of a group tile the order contiguously after the group's watermark
-- (committed_txid, committed_id). commit_offset marks a lease done and moves
-- the watermark over the prefix of done leases, so a batch that is still out
-- never gets skipped. An expired lease is taken over by the next poll, and its
-- former owner's commit is then refused (false, with a WARNING).

CREATE TABLE IF NOT EXISTS pgtrickle.pgt_consumer_groups (
    group_name        TEXT PRIMARY KEY,
    outbox_name       TEXT NOT NULL,
    auto_offset_reset TEXT NOT NULL DEFAULT 'latest'
                      CHECK (auto_offset_reset IN ('earliest', 'latest')),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- the group watermark: every row at or before this position is committed
    committed_txid    xid8 NOT NULL DEFAULT '0',
    committed_id      BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS pgtrickle.pgt_consumer_offsets (
    group_name        TEXT NOT NULL REFERENCES pgtrickle.pgt_consumer_groups ON DELETE CASCADE,
    consumer_id       TEXT NOT NULL,
    committed_offset  BIGINT NOT NULL DEFAULT 0,
    -- the txid of row committed_offset: the consumer's own position
    committed_txid    xid8,
    last_committed_at TIMESTAMPTZ,
    last_heartbeat_at TIMESTAMPTZ,
    PRIMARY KEY (group_name, consumer_id)
);

CREATE TABLE IF NOT EXISTS pgtrickle.pgt_consumer_leases (
    lease_id      BIGSERIAL PRIMARY KEY,
    group_name    TEXT NOT NULL REFERENCES pgtrickle.pgt_consumer_groups ON DELETE CASCADE,
    consumer_id   TEXT NOT NULL,
    batch_start   BIGINT NOT NULL,   -- id of the first row of the range
    batch_end     BIGINT NOT NULL,   -- id of the last row of the range
    lease_expires TIMESTAMPTZ NOT NULL,
    start_txid    xid8 NOT NULL,     -- txid of the first row
    end_txid      xid8 NOT NULL,     -- txid of the last row
    done          BOOLEAN NOT NULL DEFAULT false
);

CALL pgtrickle._kit_define('relation', 'pgt_consumer_leases', $ddl$
CREATE INDEX IF NOT EXISTS pgt_consumer_leases_group_start_idx
    ON pgtrickle.pgt_consumer_leases (group_name, start_txid, batch_start);
$ddl$);

CALL pgtrickle._kit_define('relation', 'pgt_consumer_groups', $ddl$
GRANT SELECT ON pgtrickle.pgt_consumer_groups TO pgtrickle_relay;
$ddl$);

-- ---------------------------------------------------------------------------
-- Internal helpers
-- ---------------------------------------------------------------------------

-- Group p_group and the table of its outbox; raises no_data_found naming p_caller.
CALL pgtrickle._kit_define('function', '_cg_lookup', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._cg_lookup(
    p_group TEXT, p_caller TEXT,
    OUT grp pgtrickle.pgt_consumer_groups, OUT outbox_table TEXT)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
BEGIN
    SELECT g.* INTO grp FROM pgtrickle.pgt_consumer_groups g WHERE g.group_name = p_group;
    IF NOT FOUND THEN
        RAISE EXCEPTION '%: consumer group "%" does not exist (create it with pgtrickle.create_consumer_group)', p_caller, p_group
            USING ERRCODE = 'no_data_found';
    END IF;
    outbox_table := (pgtrickle._outbox_lookup(grp.outbox_name, p_caller)).outbox_table_name;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._cg_lookup(TEXT, TEXT) FROM PUBLIC;
$ddl$);

-- Raise invalid_parameter_value unless p_consumer is a non-empty consumer id.
CALL pgtrickle._kit_define('function', '_cg_check_consumer', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._cg_check_consumer(p_consumer TEXT, p_caller TEXT)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
BEGIN
    IF p_consumer IS NULL OR btrim(p_consumer) = '' THEN
        RAISE EXCEPTION '%: p_consumer must be a non-empty consumer id', p_caller
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._cg_check_consumer(TEXT, TEXT) FROM PUBLIC;
$ddl$);

-- The newest outbox id and the number of rows after the group's watermark.
CALL pgtrickle._kit_define('function', '_cg_outbox_stats', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._cg_outbox_stats(p_group TEXT, OUT max_outbox_id BIGINT, OUT lag BIGINT)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v record := pgtrickle._cg_lookup(p_group, 'consumer_lag');
BEGIN
    EXECUTE format('SELECT max(id), count(*) FILTER (WHERE (txid, id) > ($1, $2)) FROM pgtrickle.%I',
                   v.outbox_table)
       INTO max_outbox_id, lag
      USING (v.grp).committed_txid, (v.grp).committed_id;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._cg_outbox_stats(TEXT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle._cg_outbox_stats(TEXT) TO pgtrickle_relay;
$ddl$);

-- ---------------------------------------------------------------------------
-- Groups (administrators)
-- ---------------------------------------------------------------------------

-- Create group p_name on outbox p_outbox, starting before every row ('earliest')
-- or after the last row committed so far ('latest').
CALL pgtrickle._kit_define('function', 'create_consumer_group', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.create_consumer_group(
    p_name TEXT, p_outbox TEXT, p_auto_offset_reset TEXT DEFAULT 'latest')
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg  pgtrickle.pgt_outbox_config;
    v_txid xid8 := '0';
    v_id   bigint := 0;
BEGIN
    IF p_name IS NULL OR btrim(p_name) = '' THEN
        RAISE EXCEPTION 'create_consumer_group: p_name must be a non-empty group name'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_auto_offset_reset IS NULL OR p_auto_offset_reset NOT IN ('earliest', 'latest') THEN
        RAISE EXCEPTION 'create_consumer_group: p_auto_offset_reset must be ''earliest'' or ''latest'', got %',
            coalesce(quote_literal(p_auto_offset_reset), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_cfg := pgtrickle._outbox_lookup(p_outbox, 'create_consumer_group');
    IF NOT (SELECT i.has_txid FROM pgtrickle.relay_outbox_info(v_cfg.stream_table_name) i) THEN
        RAISE EXCEPTION 'create_consumer_group: outbox "%" has no txid column; consumer groups need a kit outbox (pgtrickle.enable_outbox)', p_outbox
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF EXISTS (SELECT 1 FROM pgtrickle.pgt_consumer_groups g WHERE g.group_name = p_name) THEN
        RAISE EXCEPTION 'create_consumer_group: consumer group "%" already exists', p_name
            USING ERRCODE = 'duplicate_object';
    END IF;

    IF p_auto_offset_reset = 'latest' THEN
        EXECUTE format('SELECT txid, id FROM pgtrickle.%I WHERE txid < pg_snapshot_xmin(pg_current_snapshot())
                         ORDER BY txid DESC, id DESC LIMIT 1', v_cfg.outbox_table_name)
           INTO v_txid, v_id;
    END IF;

    INSERT INTO pgtrickle.pgt_consumer_groups (group_name, outbox_name, auto_offset_reset, committed_txid, committed_id)
    VALUES (p_name, v_cfg.stream_table_name, p_auto_offset_reset, coalesce(v_txid, '0'), coalesce(v_id, 0));
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.create_consumer_group(TEXT, TEXT, TEXT) FROM PUBLIC;
$ddl$);

-- Drop group p_name with its consumers' offsets and leases.
CALL pgtrickle._kit_define('function', 'drop_consumer_group', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.drop_consumer_group(p_name TEXT)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
BEGIN
    DELETE FROM pgtrickle.pgt_consumer_leases WHERE group_name = p_name;
    DELETE FROM pgtrickle.pgt_consumer_offsets WHERE group_name = p_name;
    DELETE FROM pgtrickle.pgt_consumer_groups WHERE group_name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'drop_consumer_group: consumer group "%" does not exist', p_name
            USING ERRCODE = 'no_data_found';
    END IF;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.drop_consumer_group(TEXT) FROM PUBLIC;
$ddl$);

-- ---------------------------------------------------------------------------
-- Consuming (EXECUTE granted to pgtrickle_relay)
-- ---------------------------------------------------------------------------

-- Lease and return the next batch for p_consumer: an expired lease of the
-- group if there is one (its exact range again), else up to p_batch_size rows
-- after everything leased or committed, below the commit horizon.
CALL pgtrickle._kit_define('function', 'poll_outbox', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.poll_outbox(
    p_group TEXT, p_consumer TEXT, p_batch_size INT DEFAULT 100, p_visibility_seconds INT DEFAULT 30)
RETURNS TABLE(outbox_id BIGINT, pgt_id UUID, created_at TIMESTAMPTZ, inserted_count BIGINT,
              deleted_count BIGINT, is_claim_check BOOL, payload JSONB)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    -- First: the outboxes and this group's position belong to this cluster
    -- (a restored or cut-over database is rebased before anything is read).
    v_synced  boolean := pgtrickle._outbox_cluster_sync();
    v         record := pgtrickle._cg_lookup(p_group, 'poll_outbox');
    v_lease   pgtrickle.pgt_consumer_leases;
    v_horizon xid8;
    v_next    xid8;
    v_txid    xid8;
    v_id      bigint;
    v_ids     bigint[];
    v_txids   xid8[];
    v_rows    text := format('SELECT id, pgt_id, created_at, inserted_count::bigint, deleted_count::bigint,
                                     is_claim_check, payload
                                FROM pgtrickle.%I
                               WHERE (txid, id) >= ($1, $2) AND (txid, id) <= ($3, $4)
                               ORDER BY txid, id', v.outbox_table);
BEGIN
    PERFORM pgtrickle._cg_check_consumer(p_consumer, 'poll_outbox');
    IF p_batch_size IS NULL OR p_batch_size < 1 THEN
        RAISE EXCEPTION 'poll_outbox: p_batch_size must be 1 or more, got %', coalesce(p_batch_size::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_visibility_seconds IS NULL OR p_visibility_seconds < 1 THEN
        RAISE EXCEPTION 'poll_outbox: p_visibility_seconds must be 1 or more, got %', coalesce(p_visibility_seconds::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- The horizon, taken before this transaction writes anything.
    v_horizon := pg_snapshot_xmin(pg_current_snapshot());
    -- A watermark or rows ahead of this cluster's transaction counter count
    -- another cluster's ids: new rows would sort before the watermark and be
    -- skipped, those rows would wait for years.
    -- The counter and the scan in one statement, so in one snapshot: a row
    -- committed since an earlier statement is not "ahead" of an older count.
    EXECUTE pg_catalog.format(
        'SELECT n.xmax, (SELECT max(o.txid) FROM pgtrickle.%I o WHERE o.txid >= n.xmax)
           FROM (SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()) AS xmax) n',
        v.outbox_table)
       INTO v_next, v_txid;
    IF (v.grp).committed_txid >= v_next OR v_txid IS NOT NULL THEN
        RAISE EXCEPTION 'poll_outbox: %, ahead of this PostgreSQL cluster''s next transaction id %: the database was restored or moved from another cluster, or the position was set by hand. Nothing was skipped: the group waits. Check that rows written since the move have higher outbox ids than the rows before it (pg_dump carries the id sequence over; after a logical-replication cutover set it with setval), then run: SELECT pgtrickle.outbox_rebase(%); (README: "Moving a database")',
            CASE WHEN v_txid IS NOT NULL
                 THEN pg_catalog.format('outbox %s holds rows with transaction ids up to %s', v.outbox_table, v_txid)
                 ELSE pg_catalog.format('the position of consumer group "%s" is txid %s, outbox id %s',
                                        p_group, (v.grp).committed_txid, (v.grp).committed_id)
            END,
            v_next, pg_catalog.quote_literal((v.grp).outbox_name)
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;

    INSERT INTO pgtrickle.pgt_consumer_offsets AS o (group_name, consumer_id, last_heartbeat_at)
    VALUES (p_group, p_consumer, now())
    ON CONFLICT (group_name, consumer_id) DO UPDATE SET last_heartbeat_at = now();

    -- 1. Take over the oldest expired lease, if any.
    SELECT l.* INTO v_lease
      FROM pgtrickle.pgt_consumer_leases l
     WHERE l.group_name = p_group AND NOT l.done AND l.lease_expires < now()
     ORDER BY l.start_txid, l.batch_start
     LIMIT 1
       FOR UPDATE SKIP LOCKED;
    IF FOUND THEN
        UPDATE pgtrickle.pgt_consumer_leases
           SET consumer_id = p_consumer,
               lease_expires = now() + make_interval(secs => p_visibility_seconds)
         WHERE lease_id = v_lease.lease_id;
        RETURN QUERY EXECUTE v_rows
            USING v_lease.start_txid, v_lease.batch_start, v_lease.end_txid, v_lease.batch_end;
        RETURN;
    END IF;

    -- 2. Lease the next batch after the watermark and every existing lease.
    SELECT g.committed_txid, g.committed_id INTO v_txid, v_id
      FROM pgtrickle.pgt_consumer_groups g WHERE g.group_name = p_group
       FOR NO KEY UPDATE;
    SELECT l.* INTO v_lease
      FROM pgtrickle.pgt_consumer_leases l
     WHERE l.group_name = p_group
     ORDER BY l.end_txid DESC, l.batch_end DESC
     LIMIT 1;
    IF FOUND AND (v_lease.end_txid, v_lease.batch_end) > (v_txid, v_id) THEN
        v_txid := v_lease.end_txid;
        v_id := v_lease.batch_end;
    END IF;

    EXECUTE format('SELECT array_agg(id ORDER BY txid, id), array_agg(txid ORDER BY txid, id)
                      FROM (SELECT txid, id FROM pgtrickle.%I
                             WHERE (txid, id) > ($1, $2) AND txid < $3
                             ORDER BY txid, id LIMIT $4) b', v.outbox_table)
       INTO v_ids, v_txids
      USING v_txid, v_id, v_horizon, p_batch_size;
    IF v_ids IS NULL THEN
        RETURN;  -- nothing new below the horizon
    END IF;

    INSERT INTO pgtrickle.pgt_consumer_leases
           (group_name, consumer_id, batch_start, batch_end, start_txid, end_txid, lease_expires)
    VALUES (p_group, p_consumer, v_ids[1], v_ids[cardinality(v_ids)],
            v_txids[1], v_txids[cardinality(v_txids)],
            now() + make_interval(secs => p_visibility_seconds));
    RETURN QUERY EXECUTE v_rows
        USING v_txids[1], v_ids[1], v_txids[cardinality(v_txids)], v_ids[cardinality(v_ids)];
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.poll_outbox(TEXT, TEXT, INT, INT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.poll_outbox(TEXT, TEXT, INT, INT) TO pgtrickle_relay;
$ddl$);

-- Commit p_consumer's batch ending at outbox id p_last_offset: true when
-- committed; false (with a WARNING, nothing changed) when the consumer holds no
-- such lease, e.g. because it expired and another consumer took it over.
CALL pgtrickle._kit_define('function', 'commit_offset', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.commit_offset(p_group TEXT, p_consumer TEXT, p_last_offset BIGINT)
RETURNS BOOLEAN
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v          record := pgtrickle._cg_lookup(p_group, 'commit_offset');
    v_lease    pgtrickle.pgt_consumer_leases;
    v_off      pgtrickle.pgt_consumer_offsets;
    v_pos_txid xid8;
    v_open     pgtrickle.pgt_consumer_leases;
    v_has_open boolean;
    v_new      pgtrickle.pgt_consumer_leases;
BEGIN
    PERFORM pgtrickle._cg_check_consumer(p_consumer, 'commit_offset');
    IF p_last_offset IS NULL THEN
        RAISE EXCEPTION 'commit_offset: p_last_offset must not be NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- Same lock order as poll_outbox and seek_offset: group row, then leases.
    PERFORM 1 FROM pgtrickle.pgt_consumer_groups g WHERE g.group_name = p_group FOR NO KEY UPDATE;

    SELECT l.* INTO v_lease
      FROM pgtrickle.pgt_consumer_leases l
     WHERE l.group_name = p_group AND l.consumer_id = p_consumer
       AND l.batch_end = p_last_offset AND NOT l.done
     ORDER BY l.lease_id
     LIMIT 1
       FOR UPDATE;

    IF NOT FOUND THEN
        SELECT o.* INTO v_off FROM pgtrickle.pgt_consumer_offsets o
         WHERE o.group_name = p_group AND o.consumer_id = p_consumer;
        IF v_off.committed_txid IS NOT NULL AND v_off.committed_offset = p_last_offset THEN
            RETURN true;  -- the same commit again
        END IF;
        EXECUTE format('SELECT txid FROM pgtrickle.%I WHERE id = $1', v.outbox_table)
           INTO v_pos_txid USING p_last_offset;
        IF v_off.committed_txid IS NOT NULL
           AND ((v_pos_txid IS NOT NULL AND (v_pos_txid, p_last_offset) < (v_off.committed_txid, v_off.committed_offset))
                OR (v_pos_txid IS NULL AND p_last_offset < v_off.committed_offset)) THEN
            RAISE WARNING 'commit_offset: regression refused: consumer "%" of group "%" already committed offset %, which comes after %',
                p_consumer, p_group, v_off.committed_offset, p_last_offset;
            RETURN false;
        END IF;
        RAISE WARNING 'commit_offset: consumer "%" of group "%" holds no lease ending at offset %; nothing committed',
            p_consumer, p_group, p_last_offset
            USING HINT = 'The lease may have expired and been taken over by another consumer: poll again.';
        RETURN false;
    END IF;

    UPDATE pgtrickle.pgt_consumer_leases SET done = true WHERE lease_id = v_lease.lease_id;

    -- Move the watermark over the done leases that precede the first open one.
    SELECT l.* INTO v_open FROM pgtrickle.pgt_consumer_leases l
     WHERE l.group_name = p_group AND NOT l.done
     ORDER BY l.start_txid, l.batch_start LIMIT 1;
    v_has_open := FOUND;
    SELECT l.* INTO v_new FROM pgtrickle.pgt_consumer_leases l
     WHERE l.group_name = p_group AND l.done
       AND (NOT v_has_open OR (l.start_txid, l.batch_start) < (v_open.start_txid, v_open.batch_start))
     ORDER BY l.end_txid DESC, l.batch_end DESC LIMIT 1;
    IF FOUND THEN
        UPDATE pgtrickle.pgt_consumer_groups g
           SET committed_txid = v_new.end_txid, committed_id = v_new.batch_end
         WHERE g.group_name = p_group
           AND (g.committed_txid, g.committed_id) < (v_new.end_txid, v_new.batch_end);
        DELETE FROM pgtrickle.pgt_consumer_leases l
         WHERE l.group_name = p_group AND l.done
           AND (NOT v_has_open OR (l.start_txid, l.batch_start) < (v_open.start_txid, v_open.batch_start));
    END IF;

    -- The consumer's own position only moves forward.
    INSERT INTO pgtrickle.pgt_consumer_offsets AS o
           (group_name, consumer_id, committed_offset, committed_txid, last_committed_at, last_heartbeat_at)
    VALUES (p_group, p_consumer, p_last_offset, v_lease.end_txid, now(), now())
    ON CONFLICT (group_name, consumer_id) DO UPDATE
       SET committed_offset = CASE WHEN o.committed_txid IS NULL
                                     OR (o.committed_txid, o.committed_offset) < (EXCLUDED.committed_txid, EXCLUDED.committed_offset)
                                   THEN EXCLUDED.committed_offset ELSE o.committed_offset END,
           committed_txid   = CASE WHEN o.committed_txid IS NULL
                                     OR (o.committed_txid, o.committed_offset) < (EXCLUDED.committed_txid, EXCLUDED.committed_offset)
                                   THEN EXCLUDED.committed_txid ELSE o.committed_txid END,
           last_committed_at = now(),
           last_heartbeat_at = now();
    RETURN true;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.commit_offset(TEXT, TEXT, BIGINT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.commit_offset(TEXT, TEXT, BIGINT) TO pgtrickle_relay;
$ddl$);

-- Replay: move the group's watermark to just after outbox row p_new_offset
-- (0: before everything) and drop its leases; every consumer of the group
-- restarts from there.
CALL pgtrickle._kit_define('function', 'seek_offset', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.seek_offset(p_group TEXT, p_consumer TEXT, p_new_offset BIGINT)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v      record := pgtrickle._cg_lookup(p_group, 'seek_offset');
    v_txid xid8 := '0';
BEGIN
    PERFORM pgtrickle._cg_check_consumer(p_consumer, 'seek_offset');
    IF p_new_offset IS NULL OR p_new_offset < 0 THEN
        RAISE EXCEPTION 'seek_offset: p_new_offset must be an outbox id, or 0 for the beginning, got %', coalesce(p_new_offset::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM 1 FROM pgtrickle.pgt_consumer_groups g WHERE g.group_name = p_group FOR NO KEY UPDATE;
    IF p_new_offset > 0 THEN
        EXECUTE format('SELECT txid FROM pgtrickle.%I WHERE id = $1', v.outbox_table)
           INTO v_txid USING p_new_offset;
        IF v_txid IS NULL THEN
            RAISE EXCEPTION 'seek_offset: outbox row % does not exist in pgtrickle.%', p_new_offset, quote_ident(v.outbox_table)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    UPDATE pgtrickle.pgt_consumer_groups
       SET committed_txid = v_txid, committed_id = p_new_offset
     WHERE group_name = p_group;
    DELETE FROM pgtrickle.pgt_consumer_leases WHERE group_name = p_group;
    UPDATE pgtrickle.pgt_consumer_offsets
       SET committed_offset = p_new_offset, committed_txid = v_txid
     WHERE group_name = p_group;
    INSERT INTO pgtrickle.pgt_consumer_offsets (group_name, consumer_id, committed_offset, committed_txid, last_heartbeat_at)
    VALUES (p_group, p_consumer, p_new_offset, v_txid, now())
    ON CONFLICT (group_name, consumer_id) DO UPDATE SET last_heartbeat_at = now();
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.seek_offset(TEXT, TEXT, BIGINT) FROM PUBLIC;
$ddl$);

-- Push back the expiry of all of p_consumer's open leases; returns how many.
CALL pgtrickle._kit_define('function', 'extend_lease', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.extend_lease(p_group TEXT, p_consumer TEXT, p_extension_seconds INT DEFAULT 30)
RETURNS INT
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v   record := pgtrickle._cg_lookup(p_group, 'extend_lease');
    v_n int;
BEGIN
    PERFORM pgtrickle._cg_check_consumer(p_consumer, 'extend_lease');
    IF p_extension_seconds IS NULL OR p_extension_seconds < 1 THEN
        RAISE EXCEPTION 'extend_lease: p_extension_seconds must be 1 or more, got %', coalesce(p_extension_seconds::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE pgtrickle.pgt_consumer_leases
       SET lease_expires = now() + make_interval(secs => p_extension_seconds)
     WHERE group_name = p_group AND consumer_id = p_consumer AND NOT done;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.extend_lease(TEXT, TEXT, INT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.extend_lease(TEXT, TEXT, INT) TO pgtrickle_relay;
$ddl$);

-- Liveness only: records the heartbeat, does not extend leases.
CALL pgtrickle._kit_define('function', 'consumer_heartbeat', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.consumer_heartbeat(p_group TEXT, p_consumer TEXT)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v record := pgtrickle._cg_lookup(p_group, 'consumer_heartbeat');
BEGIN
    PERFORM pgtrickle._cg_check_consumer(p_consumer, 'consumer_heartbeat');
    INSERT INTO pgtrickle.pgt_consumer_offsets (group_name, consumer_id, last_heartbeat_at)
    VALUES (p_group, p_consumer, now())
    ON CONFLICT (group_name, consumer_id) DO UPDATE SET last_heartbeat_at = now();
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.consumer_heartbeat(TEXT, TEXT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.consumer_heartbeat(TEXT, TEXT) TO pgtrickle_relay;
$ddl$);

-- Per consumer of p_group: its committed offset, the newest outbox id, the
-- group's lag (rows after the group watermark, committed or not yet), and
-- is_alive = a heartbeat (poll, commit or consumer_heartbeat) within 60 s.
CALL pgtrickle._kit_define('function', 'consumer_lag', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.consumer_lag(p_group TEXT)
RETURNS TABLE(consumer_id TEXT, committed_offset BIGINT, max_outbox_id BIGINT, lag BIGINT,
              last_heartbeat_at TIMESTAMPTZ, is_alive BOOLEAN)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    s record := pgtrickle._cg_outbox_stats(p_group);
BEGIN
    RETURN QUERY
    SELECT o.consumer_id, o.committed_offset, s.max_outbox_id, s.lag, o.last_heartbeat_at,
           coalesce(o.last_heartbeat_at > now() - interval '60 seconds', false)
      FROM pgtrickle.pgt_consumer_offsets o
     WHERE o.group_name = p_group
     ORDER BY o.consumer_id;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.consumer_lag(TEXT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.consumer_lag(TEXT) TO pgtrickle_relay;
$ddl$);

-- ---------------------------------------------------------------------------
-- Monitoring views (SELECT granted to pgtrickle_relay)
-- ---------------------------------------------------------------------------

-- One row per consumer (is_alive: heartbeat within 60 s).
CALL pgtrickle._kit_define('relation', 'pgt_consumer_status', $ddl$
CREATE OR REPLACE VIEW pgtrickle.pgt_consumer_status AS
SELECT o.group_name,
       g.outbox_name,
       o.consumer_id,
       o.committed_offset,
       o.last_committed_at,
       o.last_heartbeat_at,
       coalesce(o.last_heartbeat_at > now() - interval '60 seconds', false) AS is_alive,
       (SELECT count(*) FROM pgtrickle.pgt_consumer_leases l
         WHERE l.group_name = o.group_name AND l.consumer_id = o.consumer_id
           AND NOT l.done AND l.lease_expires > now()) AS active_leases
  FROM pgtrickle.pgt_consumer_offsets o
  JOIN pgtrickle.pgt_consumer_groups g ON g.group_name = o.group_name;
GRANT SELECT ON pgtrickle.pgt_consumer_status TO pgtrickle_relay;
$ddl$);

-- One row per group: its watermark, consumers and lag.
CALL pgtrickle._kit_define('relation', 'pgt_consumer_group_lag', $ddl$
CREATE OR REPLACE VIEW pgtrickle.pgt_consumer_group_lag AS
SELECT g.group_name,
       g.outbox_name,
       g.auto_offset_reset,
       g.committed_id,
       g.committed_txid,
       (SELECT count(*) FROM pgtrickle.pgt_consumer_offsets o
         WHERE o.group_name = g.group_name) AS consumers,
       (SELECT count(*) FROM pgtrickle.pgt_consumer_offsets o
         WHERE o.group_name = g.group_name
           AND o.last_heartbeat_at > now() - interval '60 seconds') AS alive_consumers,
       s.max_outbox_id,
       s.lag
  FROM pgtrickle.pgt_consumer_groups g
  LEFT JOIN LATERAL pgtrickle._cg_outbox_stats(g.group_name) s ON true;
GRANT SELECT ON pgtrickle.pgt_consumer_group_lag TO pgtrickle_relay;
$ddl$);

-- Leases that are out and not expired.
CALL pgtrickle._kit_define('relation', 'pgt_consumer_active_leases', $ddl$
CREATE OR REPLACE VIEW pgtrickle.pgt_consumer_active_leases AS
SELECT l.lease_id,
       l.group_name,
       l.consumer_id,
       l.batch_start,
       l.batch_end,
       l.lease_expires,
       extract(epoch FROM l.lease_expires - now()) AS seconds_left
  FROM pgtrickle.pgt_consumer_leases l
 WHERE NOT l.done AND l.lease_expires > now();
GRANT SELECT ON pgtrickle.pgt_consumer_active_leases TO pgtrickle_relay;
$ddl$);
