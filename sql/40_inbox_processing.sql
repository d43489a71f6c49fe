-- pgtrickle-relay: 40_inbox_processing.sql — processing inboxes safely, in plain SQL.
--
-- What a pg_trickle user gets from the extension's stream tables, here with
-- views and functions over any inbox (created with create_inbox or adopted
-- with enable_inbox_tracking; column names come from pgt_inbox_config):
--   * workers: inbox_claim (FOR UPDATE SKIP LOCKED), inbox_mark_processed,
--     inbox_mark_failed (dead letter at max_retries), inbox_is_my_partition;
--   * replay_inbox_messages: dead letters (or processed events) back to pending;
--   * monitoring: inbox_health (JSONB with healthy/degraded/critical) and
--     inbox_status (every inbox);
--   * ordered processing: enable_inbox_ordering gives next_<inbox> (per
--     aggregate only the next expected message) and gaps_<inbox> /
--     inbox_ordering_gaps (missing sequence numbers), disable_inbox_ordering;
--   * priority tiers: enable_inbox_priority gives <inbox>_pending_<tier>
--     views, disable_inbox_priority; exclusive with ordering;
--   * retention: set_inbox_retention, inbox_retention (bounded batches).
-- No statement is ever built from input values: identifiers come from the
-- catalog through format('%I'), values are passed as parameters.

-- ---------------------------------------------------------------------------
-- Partitioning workers (EXECUTE granted to pgtrickle_relay; grant it to
-- your worker roles). Plain SQL, so it is inlined into the caller's query.
-- ---------------------------------------------------------------------------

-- True when aggregate_id belongs to worker worker_id of total_workers
-- (0-based): abs(hashtext(aggregate_id)) % total_workers = worker_id, computed
-- in bigint so that hashtext's minimum value cannot overflow abs().
CALL pgtrickle._kit_define('function', 'inbox_is_my_partition', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.inbox_is_my_partition(aggregate_id TEXT, worker_id INT, total_workers INT)
RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $fn$
    SELECT pg_catalog.abs(pg_catalog.hashtext(aggregate_id)::bigint) OPERATOR(pg_catalog.%) total_workers
           OPERATOR(pg_catalog.=) worker_id
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.inbox_is_my_partition(TEXT, INT, INT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.inbox_is_my_partition(TEXT, INT, INT) TO pgtrickle_relay;
$ddl$);

-- ---------------------------------------------------------------------------
-- Processing (administrators; grant EXECUTE to your worker roles)
-- ---------------------------------------------------------------------------

-- Replay: reset processed_at, retry_count and error of exactly the events
-- p_event_ids, so they are pending again; returns how many rows changed.
CALL pgtrickle._kit_define('function', 'replay_inbox_messages', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.replay_inbox_messages(p_name TEXT, p_event_ids TEXT[])
RETURNS BIGINT
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg pgtrickle.pgt_inbox_config := pgtrickle._inbox_lookup(p_name, 'replay_inbox_messages');
    v_set text;
    v_n   bigint;
BEGIN
    IF p_event_ids IS NULL THEN
        RAISE EXCEPTION 'replay_inbox_messages: p_event_ids must be an array of event ids, not NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_set := format('%I = NULL', v_cfg.processed_at_column);
    IF v_cfg.retry_count_column IS NOT NULL THEN
        v_set := v_set || format(', %I = 0', v_cfg.retry_count_column);
    END IF;
    IF v_cfg.error_column IS NOT NULL THEN
        v_set := v_set || format(', %I = NULL', v_cfg.error_column);
    END IF;
    EXECUTE format('UPDATE %s SET %s WHERE %I = ANY ($1::%s[])',
                   pgtrickle._inbox_rel(v_cfg), v_set, v_cfg.id_column,
                   pgtrickle._inbox_column_type(v_cfg, v_cfg.id_column))
      USING p_event_ids;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.replay_inbox_messages(TEXT, TEXT[]) FROM PUBLIC;
$ddl$);

-- Mark the unprocessed events p_event_ids processed (processed_at = now());
-- returns how many were marked.
CALL pgtrickle._kit_define('function', 'inbox_mark_processed', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.inbox_mark_processed(p_name TEXT, p_event_ids TEXT[])
RETURNS BIGINT
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg pgtrickle.pgt_inbox_config := pgtrickle._inbox_lookup(p_name, 'inbox_mark_processed');
    v_n   bigint;
BEGIN
    EXECUTE format('UPDATE %s SET %I = now() WHERE %I = ANY ($1::%s[]) AND %I IS NULL',
                   pgtrickle._inbox_rel(v_cfg), v_cfg.processed_at_column, v_cfg.id_column,
                   pgtrickle._inbox_column_type(v_cfg, v_cfg.id_column), v_cfg.processed_at_column)
      USING coalesce(p_event_ids, '{}');
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.inbox_mark_processed(TEXT, TEXT[]) FROM PUBLIC;
$ddl$);

-- Record a failed attempt at event p_event_id: retry_count + 1 and error =
-- p_error. Returns 'retry' while retries are left, 'dead_letter' once
-- retry_count reached max_retries (the event is then in <inbox>_dlq).
CALL pgtrickle._kit_define('function', 'inbox_mark_failed', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.inbox_mark_failed(p_name TEXT, p_event_id TEXT, p_error TEXT)
RETURNS TEXT
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg     pgtrickle.pgt_inbox_config := pgtrickle._inbox_lookup(p_name, 'inbox_mark_failed');
    v_tbl     text := pgtrickle._inbox_rel(v_cfg);
    v_idtype  text := pgtrickle._inbox_column_type(v_cfg, v_cfg.id_column);
    v_retries bigint;
    v_done    timestamptz;
BEGIN
    IF v_cfg.retry_count_column IS NULL THEN
        RAISE EXCEPTION 'inbox_mark_failed: inbox "%" has no retry-count column, so it has no retries and no dead letters', p_name
            USING ERRCODE = 'feature_not_supported';
    END IF;
    EXECUTE format('UPDATE %s SET %I = coalesce(%I, 0) + 1%s WHERE %I = $1::%s AND %I IS NULL RETURNING %I',
                   v_tbl, v_cfg.retry_count_column, v_cfg.retry_count_column,
                   CASE WHEN v_cfg.error_column IS NULL THEN '' ELSE format(', %I = $2', v_cfg.error_column) END,
                   v_cfg.id_column, v_idtype, v_cfg.processed_at_column, v_cfg.retry_count_column)
       INTO v_retries
      USING p_event_id, p_error;
    IF v_retries IS NULL THEN
        EXECUTE format('SELECT %I FROM %s WHERE %I = $1::%s', v_cfg.processed_at_column, v_tbl, v_cfg.id_column, v_idtype)
           INTO v_done USING p_event_id;
        IF v_done IS NOT NULL THEN
            RAISE EXCEPTION 'inbox_mark_failed: event "%" of inbox "%" is already processed', p_event_id, p_name
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'pgtrickle.replay_inbox_messages makes it pending again.';
        END IF;
        RAISE EXCEPTION 'inbox_mark_failed: event "%" does not exist in inbox "%"', p_event_id, p_name
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN CASE WHEN v_retries >= v_cfg.max_retries THEN 'dead_letter' ELSE 'retry' END;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.inbox_mark_failed(TEXT, TEXT, TEXT) FROM PUBLIC;
$ddl$);

-- ---------------------------------------------------------------------------
-- Ordered processing
--
-- Per ordered inbox the kit keeps pgtrickle.pgt_ordering_<inbox>: per
-- aggregate, the highest sequence processed so far. A statement-level
-- trigger on the inbox table keeps it up to date (the analogue of the
-- extension's incrementally refreshed stream table), so next_<inbox> reads
-- only the unprocessed rows (through the partial index <inbox>_ord_pending_idx)
-- and that small table, however many processed rows the inbox holds, and
-- retention may delete processed rows freely.
-- ---------------------------------------------------------------------------

-- Name of the position table of ordered inbox p_inbox (in schema pgtrickle).
CALL pgtrickle._kit_define('function', '_inbox_ord_state_name', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_ord_state_name(p_inbox TEXT)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
    SELECT pgtrickle._kit_ident('pgt_ordering_' || p_inbox)
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_ord_state_name(TEXT) FROM PUBLIC;
$ddl$);

-- Trigger (AFTER INSERT / UPDATE, per statement, transition table kit_new):
-- raise each aggregate's position to the highest processed sequence among
-- the new rows. Arguments: position table, aggregate, sequence and
-- processed-at columns. Aggregates are locked in order (no deadlocks).
CALL pgtrickle._kit_define('function', '_inbox_ord_track', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_ord_track()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
BEGIN
    EXECUTE format($sql$
        INSERT INTO pgtrickle.%1$I AS s (aggregate, last_sequence, updated_at)
        SELECT n.%2$I, max(n.%3$I), now()
          FROM kit_new n
         WHERE n.%4$I IS NOT NULL AND n.%2$I IS NOT NULL AND n.%3$I IS NOT NULL
         GROUP BY n.%2$I
         ORDER BY n.%2$I
        ON CONFLICT (aggregate) DO UPDATE
           SET last_sequence = EXCLUDED.last_sequence, updated_at = EXCLUDED.updated_at
         WHERE s.last_sequence < EXCLUDED.last_sequence$sql$,
        TG_ARGV[0], TG_ARGV[1], TG_ARGV[2], TG_ARGV[3]);
    RETURN NULL;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_ord_track() FROM PUBLIC;
$ddl$);

-- The unprocessed head of each aggregate whose sequence is at most its
-- position + 1 (first_sequence for a new aggregate): p_next true, the next
-- messages; false, the heads beyond that (gaps). Columns agg, seq, last
-- (the position) and expected; an index-only scan of <inbox>_ord_pending_idx
-- joined with the position table: processed rows are never read.
CALL pgtrickle._kit_define('function', '_inbox_ord_heads_sql', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_ord_heads_sql(
    p_cfg pgtrickle.pgt_inbox_config, p_ord pgtrickle.pgt_inbox_ordering, p_next BOOLEAN)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
    SELECT format($sql$(SELECT h.agg, h.seq, s.last_sequence AS last,
                coalesce(s.last_sequence + 1, %6$s) AS expected
           FROM (SELECT DISTINCT ON (u.%1$I) u.%1$I AS agg, u.%2$I AS seq
                   FROM %3$s u
                  WHERE u.%4$I IS NULL AND u.%1$I IS NOT NULL AND u.%2$I IS NOT NULL
                  ORDER BY u.%1$I, u.%2$I) h
           LEFT JOIN pgtrickle.%5$I s ON s.aggregate = h.agg
          WHERE h.seq %7$s coalesce(s.last_sequence + 1, %6$s)
         OFFSET 0)$sql$,
        p_ord.aggregate_column, p_ord.sequence_column, pgtrickle._inbox_rel(p_cfg), p_cfg.processed_at_column,
        pgtrickle._inbox_ord_state_name(p_cfg.inbox_name), p_ord.first_sequence,
        CASE WHEN p_next THEN '<=' ELSE '>' END)
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_ord_heads_sql(pgtrickle.pgt_inbox_config, pgtrickle.pgt_inbox_ordering, BOOLEAN) FROM PUBLIC;
$ddl$);

-- Create next_<inbox> (the whole rows of the next heads, when pending) and
-- gaps_<inbox> (the heads beyond, with what waits behind them).
CALL pgtrickle._kit_define('function', '_inbox_ord_create_views', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_ord_create_views(p_cfg pgtrickle.pgt_inbox_config, p_ord pgtrickle.pgt_inbox_ordering)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_tbl  text := pgtrickle._inbox_rel(p_cfg);
    v_recv text := CASE WHEN p_cfg.received_at_column IS NULL THEN 'NULL::timestamptz' ELSE format('w.%I', p_cfg.received_at_column) END;
BEGIN
    EXECUTE format($sql$
        CREATE VIEW %1$I.%2$I AS
        SELECT t.*
          FROM %3$s n
          JOIN %4$s t ON t.%5$I = n.agg AND t.%6$I = n.seq
         WHERE t.%7$I IS NULL AND t.%5$I IS NOT NULL AND t.%6$I IS NOT NULL AND %8$s$sql$,
        p_cfg.inbox_schema, 'next_' || p_cfg.inbox_name,
        pgtrickle._inbox_ord_heads_sql(p_cfg, p_ord, true), v_tbl,
        p_ord.aggregate_column, p_ord.sequence_column, p_cfg.processed_at_column,
        pgtrickle._inbox_pending_cond(p_cfg, 't'));

    EXECUTE format($sql$
        CREATE VIEW %1$I.%2$I AS
        SELECT n.agg AS aggregate_id,
               n.last AS last_processed_sequence,
               n.expected::bigint AS expected_sequence,
               n.seq::bigint AS next_waiting_sequence,
               (n.seq - n.expected)::bigint AS missing_count,
               w.waiting_count,
               w.oldest_waiting_at,
               extract(epoch FROM now() - w.oldest_waiting_at)::double precision AS waiting_seconds
          FROM %3$s n
          CROSS JOIN LATERAL (SELECT count(*) AS waiting_count, min(%8$s) AS oldest_waiting_at
                                FROM %4$s w
                               WHERE w.%5$I = n.agg AND w.%7$I IS NULL AND w.%6$I IS NOT NULL) w$sql$,
        p_cfg.inbox_schema, 'gaps_' || p_cfg.inbox_name,
        pgtrickle._inbox_ord_heads_sql(p_cfg, p_ord, false), v_tbl,
        p_ord.aggregate_column, p_ord.sequence_column, p_cfg.processed_at_column, v_recv);
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_ord_create_views(pgtrickle.pgt_inbox_config, pgtrickle.pgt_inbox_ordering) FROM PUBLIC;
$ddl$);

-- Process inbox p_inbox in order per aggregate: creates next_<inbox>,
-- gaps_<inbox>, the partial index they read, the aggregates' position table
-- (filled from the rows already processed) and its trigger. Sequences of an
-- aggregate start at p_first_sequence. Refused while priority tiers are enabled.
CALL pgtrickle._kit_define('function', 'enable_inbox_ordering', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.enable_inbox_ordering(
    p_inbox TEXT, p_aggregate_column TEXT, p_sequence_column TEXT, p_first_sequence BIGINT DEFAULT 1)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg   pgtrickle.pgt_inbox_config := pgtrickle._inbox_lookup(p_inbox, 'enable_inbox_ordering');
    v_ord   pgtrickle.pgt_inbox_ordering;
    v_tbl   text := pgtrickle._inbox_rel(v_cfg);
    v_state text := pgtrickle._inbox_ord_state_name(p_inbox);
    v_type  text;
    v_agg   text;
    v_op    text;
BEGIN
    IF p_first_sequence IS NULL THEN
        RAISE EXCEPTION 'enable_inbox_ordering: p_first_sequence must not be NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM 1 FROM pgtrickle.pgt_inbox_config c WHERE c.inbox_name = p_inbox FOR UPDATE;
    IF EXISTS (SELECT 1 FROM pgtrickle.pgt_inbox_priority p WHERE p.inbox_name = p_inbox) THEN
        RAISE EXCEPTION 'enable_inbox_ordering: inbox "%" has priority tiers; ordering and priority are mutually exclusive', p_inbox
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Call pgtrickle.disable_inbox_priority(%L) first.', p_inbox);
    END IF;
    SELECT o.* INTO v_ord FROM pgtrickle.pgt_inbox_ordering o WHERE o.inbox_name = p_inbox;
    IF FOUND THEN
        IF (v_ord.aggregate_column, v_ord.sequence_column, v_ord.first_sequence)
           = (p_aggregate_column, p_sequence_column, p_first_sequence) THEN
            RAISE NOTICE 'enable_inbox_ordering: inbox "%" is already ordered by (%, %); nothing changed',
                p_inbox, p_aggregate_column, p_sequence_column;
            RETURN;
        END IF;
        RAISE EXCEPTION 'enable_inbox_ordering: inbox "%" is already ordered by (%, %) from %', p_inbox,
            v_ord.aggregate_column, v_ord.sequence_column, v_ord.first_sequence
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Call pgtrickle.disable_inbox_ordering(%L) first.', p_inbox);
    END IF;

    v_agg := pgtrickle._inbox_column_type(v_cfg, p_aggregate_column);
    IF v_agg IS NULL THEN
        RAISE EXCEPTION 'enable_inbox_ordering: table % has no column "%" (p_aggregate_column)', v_tbl, p_aggregate_column
            USING ERRCODE = 'undefined_column';
    END IF;
    v_type := pgtrickle._inbox_column_type(v_cfg, p_sequence_column);
    IF v_type IS NULL THEN
        RAISE EXCEPTION 'enable_inbox_ordering: table % has no column "%" (p_sequence_column)', v_tbl, p_sequence_column
            USING ERRCODE = 'undefined_column',
                  HINT = 'Add one, e.g. ALTER TABLE ... ADD COLUMN seq bigint GENERATED ALWAYS AS ((payload->>''seq'')::bigint) STORED';
    END IF;
    IF v_type NOT IN ('smallint', 'integer', 'bigint') THEN
        RAISE EXCEPTION 'enable_inbox_ordering: column "%" (p_sequence_column) must be smallint, integer or bigint, not %', p_sequence_column, v_type
            USING ERRCODE = 'datatype_mismatch';
    END IF;
    IF p_aggregate_column = p_sequence_column THEN
        RAISE EXCEPTION 'enable_inbox_ordering: the aggregate and sequence columns must differ'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pgtrickle._inbox_require_free(v_cfg.inbox_schema, v || p_inbox, 'enable_inbox_ordering')
       FROM unnest(ARRAY['next_', 'gaps_']) AS v;
    PERFORM pgtrickle._inbox_require_free('pgtrickle', v_state, 'enable_inbox_ordering');

    INSERT INTO pgtrickle.pgt_inbox_ordering (inbox_name, aggregate_column, sequence_column, first_sequence)
    VALUES (p_inbox, p_aggregate_column, p_sequence_column, p_first_sequence)
    RETURNING * INTO v_ord;

    -- The unprocessed messages per aggregate in sequence order: small (only
    -- what is not processed yet), whatever the number of processed rows.
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s (%I, %I) WHERE %I IS NULL AND %I IS NOT NULL AND %I IS NOT NULL',
                   pgtrickle._kit_ident(p_inbox || '_ord_pending_idx'), v_tbl,
                   p_aggregate_column, p_sequence_column, v_cfg.processed_at_column,
                   p_aggregate_column, p_sequence_column);
    -- Each aggregate's position: the highest sequence processed.
    EXECUTE format('CREATE TABLE pgtrickle.%I (aggregate %s PRIMARY KEY, last_sequence BIGINT NOT NULL,
                                               updated_at TIMESTAMPTZ NOT NULL DEFAULT now())',
                   v_state, v_agg);
    EXECUTE format('INSERT INTO pgtrickle.%1$I (aggregate, last_sequence)
                    SELECT t.%2$I, max(t.%3$I) FROM %4$s t
                     WHERE t.%5$I IS NOT NULL AND t.%2$I IS NOT NULL AND t.%3$I IS NOT NULL
                     GROUP BY t.%2$I',
                   v_state, p_aggregate_column, p_sequence_column, v_tbl, v_cfg.processed_at_column);
    EXECUTE format('GRANT SELECT ON pgtrickle.%I TO pgtrickle_relay', v_state);
    FOREACH v_op IN ARRAY ARRAY['INSERT', 'UPDATE'] LOOP
        EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s REFERENCING NEW TABLE AS kit_new
                        FOR EACH STATEMENT EXECUTE FUNCTION pgtrickle._inbox_ord_track(%L, %L, %L, %L)',
                       'pgtrickle_ordering_' || lower(v_op), v_op, v_tbl,
                       v_state, p_aggregate_column, p_sequence_column, v_cfg.processed_at_column);
    END LOOP;
    PERFORM pgtrickle._inbox_ord_create_views(v_cfg, v_ord);
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.enable_inbox_ordering(TEXT, TEXT, TEXT, BIGINT) FROM PUBLIC;
$ddl$);

-- Drop what enable_inbox_ordering created for inbox p_cfg (p_mode RESTRICT
-- or CASCADE applies to the views); the pgt_inbox_ordering row is the caller's.
CALL pgtrickle._kit_define('function', '_inbox_ord_drop', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_ord_drop(p_cfg pgtrickle.pgt_inbox_config, p_mode TEXT)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_tbl text := pgtrickle._inbox_rel(p_cfg);
BEGIN
    EXECUTE format('DROP VIEW IF EXISTS %I.%I %s', p_cfg.inbox_schema, 'next_' || p_cfg.inbox_name,
                   CASE WHEN p_mode = 'CASCADE' THEN 'CASCADE' ELSE 'RESTRICT' END);
    EXECUTE format('DROP VIEW IF EXISTS %I.%I %s', p_cfg.inbox_schema, 'gaps_' || p_cfg.inbox_name,
                   CASE WHEN p_mode = 'CASCADE' THEN 'CASCADE' ELSE 'RESTRICT' END);
    IF to_regclass(v_tbl) IS NOT NULL THEN
        EXECUTE format('DROP TRIGGER IF EXISTS pgtrickle_ordering_insert ON %s', v_tbl);
        EXECUTE format('DROP TRIGGER IF EXISTS pgtrickle_ordering_update ON %s', v_tbl);
        PERFORM pgtrickle._inbox_drop_index(p_cfg.inbox_schema, pgtrickle._kit_ident(p_cfg.inbox_name || '_ord_pending_idx'),
                                            coalesce(p_cfg.table_name, p_cfg.inbox_name));
    END IF;
    EXECUTE format('DROP TABLE IF EXISTS pgtrickle.%I', pgtrickle._inbox_ord_state_name(p_cfg.inbox_name));
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_ord_drop(pgtrickle.pgt_inbox_config, TEXT) FROM PUBLIC;
$ddl$);

-- Stop ordered processing of p_inbox: drops next_<inbox>, gaps_<inbox>, the
-- position table, its trigger and the index (views of yours on them make it
-- fail: drop those first).
CALL pgtrickle._kit_define('function', 'disable_inbox_ordering', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.disable_inbox_ordering(p_inbox TEXT, p_if_exists BOOLEAN DEFAULT false)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg pgtrickle.pgt_inbox_config := pgtrickle._inbox_lookup(p_inbox, 'disable_inbox_ordering');
BEGIN
    DELETE FROM pgtrickle.pgt_inbox_ordering WHERE inbox_name = p_inbox;
    IF NOT FOUND THEN
        IF coalesce(p_if_exists, false) THEN
            RAISE NOTICE 'disable_inbox_ordering: inbox "%" is not ordered, skipping', p_inbox;
            RETURN;
        END IF;
        RAISE EXCEPTION 'disable_inbox_ordering: inbox "%" is not ordered', p_inbox
            USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM pgtrickle._inbox_ord_drop(v_cfg, 'RESTRICT');
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.disable_inbox_ordering(TEXT, BOOLEAN) FROM PUBLIC;
$ddl$);

-- The gaps of ordered inbox p_inbox (gaps_<inbox>) waiting at least
-- p_min_age_seconds, the longest-waiting first.
CALL pgtrickle._kit_define('function', 'inbox_ordering_gaps', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.inbox_ordering_gaps(p_inbox TEXT, p_min_age_seconds DOUBLE PRECISION DEFAULT 0)
RETURNS TABLE(aggregate_id TEXT, last_processed_sequence BIGINT, expected_sequence BIGINT,
              next_waiting_sequence BIGINT, missing_count BIGINT, waiting_count BIGINT,
              oldest_waiting_at TIMESTAMPTZ, waiting_seconds DOUBLE PRECISION)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg pgtrickle.pgt_inbox_config := pgtrickle._inbox_lookup(p_inbox, 'inbox_ordering_gaps');
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgtrickle.pgt_inbox_ordering o WHERE o.inbox_name = p_inbox) THEN
        RAISE EXCEPTION 'inbox_ordering_gaps: inbox "%" is not ordered (pgtrickle.enable_inbox_ordering)', p_inbox
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT g.aggregate_id::text, g.last_processed_sequence, g.expected_sequence, g.next_waiting_sequence,
                g.missing_count, g.waiting_count, g.oldest_waiting_at::timestamptz, g.waiting_seconds
           FROM %I.%I g
          WHERE coalesce(g.waiting_seconds, 0) >= $1
          ORDER BY g.waiting_seconds DESC NULLS LAST, g.aggregate_id',
        v_cfg.inbox_schema, 'gaps_' || p_inbox)
      USING coalesce(p_min_age_seconds, 0);
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.inbox_ordering_gaps(TEXT, DOUBLE PRECISION) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.inbox_ordering_gaps(TEXT, DOUBLE PRECISION) TO pgtrickle_relay;
$ddl$);

-- ---------------------------------------------------------------------------
-- Priority tiers
-- ---------------------------------------------------------------------------

-- Validate tiers {"name": [lowest, highest], ...} and return them by urgency
-- with their SQL condition on t.<p_column>: tier k takes the priorities
-- above tier k-1's highest up to its own highest; the last tier also takes
-- everything above and NULL.
CALL pgtrickle._kit_define('function', '_inbox_priority_tiers', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_priority_tiers(p_column TEXT, p_tiers JSONB, p_caller TEXT)
RETURNS TABLE(tier TEXT, lo BIGINT, hi BIGINT, cond TEXT)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    r       record;
    v_prev  bigint;
    v_n     int;
    i       int := 0;
BEGIN
    IF p_tiers IS NULL OR jsonb_typeof(p_tiers) <> 'object' OR p_tiers = '{}'::jsonb THEN
        RAISE EXCEPTION '%: p_tiers must be a non-empty JSON object {"tier": [lowest, highest], ...}', p_caller
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR r IN SELECT e.key, e.value FROM jsonb_each(p_tiers) e LOOP
        IF r.key !~ '^[a-z][a-z0-9_]*$' THEN
            RAISE EXCEPTION '%: tier name "%" must be lower-case letters, digits and _ (it becomes a view name)', p_caller, r.key
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF jsonb_typeof(r.value) <> 'array' OR jsonb_array_length(r.value) <> 2
           OR jsonb_typeof(r.value -> 0) <> 'number' OR jsonb_typeof(r.value -> 1) <> 'number'
           OR (r.value ->> 0) !~ '^-?[0-9]+$' OR (r.value ->> 1) !~ '^-?[0-9]+$'
           OR (r.value ->> 0)::numeric > (r.value ->> 1)::numeric THEN
            RAISE EXCEPTION '%: tier "%" must be [lowest, highest] with whole numbers, lowest <= highest; got %', p_caller, r.key, r.value
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    v_n := (SELECT count(*) FROM jsonb_object_keys(p_tiers));
    FOR r IN SELECT e.key AS tier, (e.value ->> 0)::bigint AS lo, (e.value ->> 1)::bigint AS hi
               FROM jsonb_each(p_tiers) e ORDER BY 2, 3 LOOP
        i := i + 1;
        IF v_prev IS NOT NULL AND r.lo <= v_prev THEN
            RAISE EXCEPTION '%: tier "%" [%, %] overlaps the tier before it (which ends at %)', p_caller, r.tier, r.lo, r.hi, v_prev
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        tier := r.tier;
        lo := r.lo;
        hi := r.hi;
        cond := CASE
            WHEN v_n = 1 THEN 'true'
            WHEN i = 1 THEN format('t.%I <= %s', p_column, r.hi)
            WHEN i = v_n THEN format('(t.%I > %s OR t.%I IS NULL)', p_column, v_prev, p_column)
            ELSE format('t.%I > %s AND t.%I <= %s', p_column, v_prev, p_column, r.hi)
        END;
        v_prev := r.hi;
        RETURN NEXT;
    END LOOP;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_priority_tiers(TEXT, JSONB, TEXT) FROM PUBLIC;
$ddl$);

-- Split the pending messages of p_inbox into priority tiers (a lower number
-- is more urgent): one view <inbox>_pending_<tier> per tier, and a
-- priority_tier column on <inbox>_pending. Called again, it replaces the
-- tiers. Refused while ordering is enabled.
CALL pgtrickle._kit_define('function', 'enable_inbox_priority', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.enable_inbox_priority(
    p_inbox TEXT, p_priority_column TEXT DEFAULT 'priority',
    p_tiers JSONB DEFAULT '{"critical": [1, 2], "normal": [3, 6], "background": [7, 9]}')
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg     pgtrickle.pgt_inbox_config := pgtrickle._inbox_lookup(p_inbox, 'enable_inbox_priority');
    v_old     pgtrickle.pgt_inbox_priority;
    v_tbl     text := pgtrickle._inbox_rel(v_cfg);
    v_type    text;
    v_case    text := '';
    v_last    text;
    r         record;
BEGIN
    PERFORM 1 FROM pgtrickle.pgt_inbox_config c WHERE c.inbox_name = p_inbox FOR UPDATE;
    IF EXISTS (SELECT 1 FROM pgtrickle.pgt_inbox_ordering o WHERE o.inbox_name = p_inbox) THEN
        RAISE EXCEPTION 'enable_inbox_priority: inbox "%" is ordered; ordering and priority are mutually exclusive', p_inbox
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Call pgtrickle.disable_inbox_ordering(%L) first.', p_inbox);
    END IF;
    v_type := pgtrickle._inbox_column_type(v_cfg, p_priority_column);
    IF v_type IS NULL THEN
        RAISE EXCEPTION 'enable_inbox_priority: table % has no column "%" (p_priority_column)', v_tbl, p_priority_column
            USING ERRCODE = 'undefined_column',
                  HINT = 'Add one, e.g. ALTER TABLE ... ADD COLUMN priority int GENERATED ALWAYS AS ((payload->>''priority'')::int) STORED';
    END IF;
    IF v_type NOT IN ('smallint', 'integer', 'bigint') THEN
        RAISE EXCEPTION 'enable_inbox_priority: column "%" (p_priority_column) must be smallint, integer or bigint, not %', p_priority_column, v_type
            USING ERRCODE = 'datatype_mismatch';
    END IF;
    -- Validates the tiers (raises on bad ones).
    PERFORM 1 FROM pgtrickle._inbox_priority_tiers(p_priority_column, p_tiers, 'enable_inbox_priority');

    -- Replacing: the old tier views go first.
    SELECT p.* INTO v_old FROM pgtrickle.pgt_inbox_priority p WHERE p.inbox_name = p_inbox;
    IF FOUND THEN
        FOR r IN SELECT k FROM jsonb_object_keys(v_old.tiers) k LOOP
            EXECUTE format('DROP VIEW IF EXISTS %I.%I', v_cfg.inbox_schema, p_inbox || '_pending_' || r.k);
        END LOOP;
        DELETE FROM pgtrickle.pgt_inbox_priority WHERE inbox_name = p_inbox;
        PERFORM pgtrickle._inbox_drop_index(v_cfg.inbox_schema, pgtrickle._kit_ident(p_inbox || '_prio_pending_idx'),
                                            coalesce(v_cfg.table_name, v_cfg.inbox_name));
    END IF;

    FOR r IN SELECT * FROM pgtrickle._inbox_priority_tiers(p_priority_column, p_tiers, 'enable_inbox_priority') LOOP
        PERFORM pgtrickle._inbox_require_free(v_cfg.inbox_schema, p_inbox || '_pending_' || r.tier, 'enable_inbox_priority');
        EXECUTE format('CREATE VIEW %I.%I AS SELECT * FROM %s t WHERE %s AND %s',
                       v_cfg.inbox_schema, p_inbox || '_pending_' || r.tier, v_tbl,
                       pgtrickle._inbox_pending_cond(v_cfg, 't'), r.cond);
        v_case := v_case || format(' WHEN %s THEN %L', r.cond, r.tier);
        v_last := r.tier;
    END LOOP;
    EXECUTE format('CREATE OR REPLACE VIEW %I.%I AS SELECT t.*, CASE%s ELSE %L END AS priority_tier FROM %s t WHERE %s',
                   v_cfg.inbox_schema, p_inbox || '_pending', v_case, v_last, v_tbl,
                   pgtrickle._inbox_pending_cond(v_cfg, 't'));
    -- What inbox_claim walks: pending messages, most urgent and oldest first.
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s (%I, %I) WHERE %I IS NULL',
                   pgtrickle._kit_ident(p_inbox || '_prio_pending_idx'), v_tbl, p_priority_column,
                   coalesce(v_cfg.received_at_column, v_cfg.id_column), v_cfg.processed_at_column);

    INSERT INTO pgtrickle.pgt_inbox_priority (inbox_name, priority_column, tiers)
    VALUES (p_inbox, p_priority_column, p_tiers);
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.enable_inbox_priority(TEXT, TEXT, JSONB) FROM PUBLIC;
$ddl$);

-- Remove the priority tiers of p_inbox: drops the tier views and restores
-- the plain <inbox>_pending view (views of yours on them make it fail).
CALL pgtrickle._kit_define('function', 'disable_inbox_priority', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.disable_inbox_priority(p_inbox TEXT, p_if_exists BOOLEAN DEFAULT false)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg pgtrickle.pgt_inbox_config := pgtrickle._inbox_lookup(p_inbox, 'disable_inbox_priority');
    v_pr  pgtrickle.pgt_inbox_priority;
    v_k   text;
BEGIN
    DELETE FROM pgtrickle.pgt_inbox_priority WHERE inbox_name = p_inbox RETURNING * INTO v_pr;
    IF NOT FOUND THEN
        IF coalesce(p_if_exists, false) THEN
            RAISE NOTICE 'disable_inbox_priority: inbox "%" has no priority tiers, skipping', p_inbox;
            RETURN;
        END IF;
        RAISE EXCEPTION 'disable_inbox_priority: inbox "%" has no priority tiers', p_inbox
            USING ERRCODE = 'no_data_found';
    END IF;
    FOR v_k IN SELECT jsonb_object_keys(v_pr.tiers) LOOP
        EXECUTE format('DROP VIEW IF EXISTS %I.%I', v_cfg.inbox_schema, p_inbox || '_pending_' || v_k);
    END LOOP;
    EXECUTE format('DROP VIEW IF EXISTS %I.%I', v_cfg.inbox_schema, p_inbox || '_pending');
    EXECUTE format('CREATE VIEW %I.%I AS %s', v_cfg.inbox_schema, p_inbox || '_pending',
                   pgtrickle._inbox_pending_view_sql(v_cfg));
    PERFORM pgtrickle._inbox_drop_index(v_cfg.inbox_schema, pgtrickle._kit_ident(p_inbox || '_prio_pending_idx'),
                                        coalesce(v_cfg.table_name, v_cfg.inbox_name));
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.disable_inbox_priority(TEXT, BOOLEAN) FROM PUBLIC;
$ddl$);

-- ---------------------------------------------------------------------------
-- Parallel workers
-- ---------------------------------------------------------------------------

-- Claim up to p_batch_size pending messages of p_name for the calling
-- transaction (FOR UPDATE SKIP LOCKED: concurrent workers get disjoint rows),
-- oldest first (most urgent first with priority tiers; only next_<inbox>
-- rows when ordered). With p_worker_id / p_total_workers, only that worker's
-- partition (inbox_is_my_partition on the aggregate, else the event id).
-- Process and mark them (inbox_mark_processed / inbox_mark_failed) before
-- the transaction ends: the claim is the row lock.
CALL pgtrickle._kit_define('function', 'inbox_claim', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.inbox_claim(
    p_name TEXT, p_batch_size INT DEFAULT 100, p_worker_id INT DEFAULT NULL, p_total_workers INT DEFAULT NULL)
RETURNS TABLE(event_id TEXT, retry_count INT, message JSONB)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg   pgtrickle.pgt_inbox_config := pgtrickle._inbox_lookup(p_name, 'inbox_claim');
    v_ord   pgtrickle.pgt_inbox_ordering;
    v_prio  pgtrickle.pgt_inbox_priority;
    v_key   text;
    v_where text;
    v_order text;
BEGIN
    IF p_batch_size IS NULL OR p_batch_size < 1 THEN
        RAISE EXCEPTION 'inbox_claim: p_batch_size must be 1 or more, got %', coalesce(p_batch_size::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (p_worker_id IS NULL) <> (p_total_workers IS NULL)
       OR p_total_workers < 1 OR p_worker_id < 0 OR p_worker_id >= p_total_workers THEN
        RAISE EXCEPTION 'inbox_claim: give both p_worker_id and p_total_workers (0 <= p_worker_id < p_total_workers) or neither; got % and %',
            coalesce(p_worker_id::text, 'NULL'), coalesce(p_total_workers::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT o.* INTO v_ord FROM pgtrickle.pgt_inbox_ordering o WHERE o.inbox_name = p_name;
    SELECT p.* INTO v_prio FROM pgtrickle.pgt_inbox_priority p WHERE p.inbox_name = p_name;

    v_where := pgtrickle._inbox_pending_cond(v_cfg, 't');
    IF p_total_workers IS NOT NULL THEN
        v_key := coalesce(v_ord.aggregate_column,
                          CASE WHEN pgtrickle._inbox_column_type(v_cfg, 'aggregate_id') IS NOT NULL THEN 'aggregate_id' END);
        v_where := v_where || format(' AND pgtrickle.inbox_is_my_partition(%s, $2, $3)',
                   CASE WHEN v_key IS NULL THEN format('t.%I::text', v_cfg.id_column)
                        ELSE format('coalesce(t.%I::text, t.%I::text)', v_key, v_cfg.id_column) END);
    END IF;
    IF v_ord.inbox_name IS NOT NULL THEN
        v_where := v_where || format(' AND t.%1$I IN (SELECT n.%1$I FROM %2$I.%3$I n)',
                                     v_cfg.id_column, v_cfg.inbox_schema, 'next_' || p_name);
    END IF;
    v_order := format('t.%I', coalesce(v_cfg.received_at_column, v_cfg.id_column));
    IF v_prio.inbox_name IS NOT NULL THEN
        v_order := format('t.%I, ', v_prio.priority_column) || v_order;
    END IF;

    RETURN QUERY EXECUTE format(
        'SELECT t.%I::text, %s, to_jsonb(t)
           FROM %s t
          WHERE %s
          ORDER BY %s
          LIMIT $1
            FOR UPDATE OF t SKIP LOCKED',
        v_cfg.id_column,
        CASE WHEN v_cfg.retry_count_column IS NULL THEN 'NULL::int' ELSE format('t.%I::int', v_cfg.retry_count_column) END,
        pgtrickle._inbox_rel(v_cfg), v_where, v_order)
      USING p_batch_size, p_worker_id, p_total_workers;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.inbox_claim(TEXT, INT, INT, INT) FROM PUBLIC;
$ddl$);

-- ---------------------------------------------------------------------------
-- Monitoring (EXECUTE granted to pgtrickle_relay)
-- ---------------------------------------------------------------------------

-- Health of inbox p_name as JSONB: pending_count, dlq_count,
-- oldest_pending_age_seconds, throughput_per_minute (processed in the last 5
-- minutes / 5), ordering gaps when ordered, and status: critical when the
-- oldest pending message waits >= 300 s or dlq_count >= 100; degraded when it
-- waits >= 60 s, any dead letter, or an ordering gap waits >= 60 s; else
-- healthy. "reasons" says which threshold was crossed.
CALL pgtrickle._kit_define('function', 'inbox_health', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.inbox_health(p_name TEXT)
RETURNS JSONB
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    c_degraded_age  constant int := 60;
    c_critical_age  constant int := 300;
    c_degraded_dlq  constant int := 1;
    c_critical_dlq  constant int := 100;
    c_degraded_gap  constant int := 60;
    v_cfg       pgtrickle.pgt_inbox_config := pgtrickle._inbox_lookup(p_name, 'inbox_health');
    v_tbl       text := pgtrickle._inbox_rel(v_cfg);
    v_ordered   boolean := EXISTS (SELECT 1 FROM pgtrickle.pgt_inbox_ordering o WHERE o.inbox_name = p_name);
    v_pending   bigint;
    v_dlq       bigint;
    v_oldest    double precision;
    v_recent    bigint;
    v_gaps      bigint;
    v_gap_age   double precision;
    v_critical  text[] := '{}';
    v_degraded  text[] := '{}';
    v_result    jsonb;
BEGIN
    v_result := jsonb_build_object(
        'inbox', p_name,
        'table', v_tbl,
        'thresholds', jsonb_build_object(
            'degraded', jsonb_build_object('oldest_pending_age_seconds', c_degraded_age,
                                           'dlq_count', c_degraded_dlq,
                                           'ordering_gap_age_seconds', c_degraded_gap),
            'critical', jsonb_build_object('oldest_pending_age_seconds', c_critical_age,
                                           'dlq_count', c_critical_dlq)));
    IF to_regclass(v_tbl) IS NULL THEN
        RETURN v_result || jsonb_build_object('status', 'critical',
                                              'reasons', jsonb_build_array(format('table %s is missing', v_tbl)));
    END IF;

    EXECUTE format('SELECT count(*) FILTER (WHERE %s), count(*) FILTER (WHERE %s), %s
                      FROM %s t WHERE t.%I IS NULL',
                   pgtrickle._inbox_pending_cond(v_cfg, 't'), pgtrickle._inbox_dlq_cond(v_cfg, 't'),
                   CASE WHEN v_cfg.received_at_column IS NULL THEN 'NULL::double precision'
                        ELSE format('extract(epoch FROM now() - min(t.%I) FILTER (WHERE %s))::double precision',
                                    v_cfg.received_at_column, pgtrickle._inbox_pending_cond(v_cfg, 't')) END,
                   v_tbl, v_cfg.processed_at_column)
       INTO v_pending, v_dlq, v_oldest;
    EXECUTE format('SELECT count(*) FROM %s t WHERE t.%I >= now() - interval ''5 minutes''',
                   v_tbl, v_cfg.processed_at_column)
       INTO v_recent;

    IF v_oldest >= c_critical_age THEN
        v_critical := v_critical || format('oldest pending message waits %s s (critical at %s s)', round(v_oldest::numeric), c_critical_age);
    ELSIF v_oldest >= c_degraded_age THEN
        v_degraded := v_degraded || format('oldest pending message waits %s s (degraded at %s s)', round(v_oldest::numeric), c_degraded_age);
    END IF;
    IF v_dlq >= c_critical_dlq THEN
        v_critical := v_critical || format('%s dead letters (critical at %s)', v_dlq, c_critical_dlq);
    ELSIF v_dlq >= c_degraded_dlq THEN
        v_degraded := v_degraded || format('%s dead letters (degraded at %s)', v_dlq, c_degraded_dlq);
    END IF;
    IF v_ordered THEN
        EXECUTE format('SELECT count(*), max(g.waiting_seconds) FROM %I.%I g', v_cfg.inbox_schema, 'gaps_' || p_name)
           INTO v_gaps, v_gap_age;
        IF v_gap_age >= c_degraded_gap THEN
            v_degraded := v_degraded || format('an ordering gap has held messages back for %s s (degraded at %s s)',
                                               round(v_gap_age::numeric), c_degraded_gap);
        END IF;
        v_result := v_result || jsonb_build_object('ordering_gaps', v_gaps, 'oldest_gap_seconds', v_gap_age);
    END IF;

    RETURN v_result || jsonb_build_object(
        'pending_count', v_pending,
        'dlq_count', v_dlq,
        'oldest_pending_age_seconds', v_oldest,
        'processed_last_5_minutes', v_recent,
        'throughput_per_minute', round(v_recent / 5.0, 2),
        'status', CASE WHEN cardinality(v_critical) > 0 THEN 'critical'
                       WHEN cardinality(v_degraded) > 0 THEN 'degraded'
                       ELSE 'healthy' END,
        'reasons', to_jsonb(v_critical || v_degraded));
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.inbox_health(TEXT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.inbox_health(TEXT) TO pgtrickle_relay;
$ddl$);

-- One row per inbox with its health (inbox_health), by name.
CALL pgtrickle._kit_define('function', 'inbox_status', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.inbox_status()
RETURNS TABLE(inbox_name TEXT, inbox_schema TEXT, table_name TEXT, is_managed BOOLEAN,
              ordered BOOLEAN, prioritized BOOLEAN, pending_count BIGINT, dlq_count BIGINT,
              oldest_pending_age_seconds DOUBLE PRECISION, throughput_per_minute DOUBLE PRECISION,
              status TEXT, health JSONB)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg pgtrickle.pgt_inbox_config;
BEGIN
    FOR v_cfg IN SELECT c.* FROM pgtrickle.pgt_inbox_config c ORDER BY c.inbox_name LOOP
        health := pgtrickle.inbox_health(v_cfg.inbox_name);
        inbox_name := v_cfg.inbox_name;
        inbox_schema := v_cfg.inbox_schema;
        table_name := coalesce(v_cfg.table_name, v_cfg.inbox_name);
        is_managed := v_cfg.is_managed;
        ordered := EXISTS (SELECT 1 FROM pgtrickle.pgt_inbox_ordering o WHERE o.inbox_name = v_cfg.inbox_name);
        prioritized := EXISTS (SELECT 1 FROM pgtrickle.pgt_inbox_priority p WHERE p.inbox_name = v_cfg.inbox_name);
        pending_count := (health ->> 'pending_count')::bigint;
        dlq_count := (health ->> 'dlq_count')::bigint;
        oldest_pending_age_seconds := (health ->> 'oldest_pending_age_seconds')::double precision;
        throughput_per_minute := (health ->> 'throughput_per_minute')::double precision;
        status := health ->> 'status';
        RETURN NEXT;
    END LOOP;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.inbox_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.inbox_status() TO pgtrickle_relay;
$ddl$);

-- ---------------------------------------------------------------------------
-- Retention (administrators; schedule inbox_retention, see docs/inbox.md)
-- ---------------------------------------------------------------------------

-- Set how long inbox p_name keeps processed messages (p_retention_hours) and
-- dead letters (p_dlq_retention_hours, counted from received_at; NULL keeps
-- them until deleted or replayed by hand).
CALL pgtrickle._kit_define('function', 'set_inbox_retention', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.set_inbox_retention(
    p_name TEXT, p_retention_hours INT, p_dlq_retention_hours INT DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg pgtrickle.pgt_inbox_config := pgtrickle._inbox_lookup(p_name, 'set_inbox_retention');
BEGIN
    IF p_retention_hours IS NULL OR p_retention_hours < 0 THEN
        RAISE EXCEPTION 'set_inbox_retention: p_retention_hours must be 0 or more, got %', coalesce(p_retention_hours::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_dlq_retention_hours < 0 THEN
        RAISE EXCEPTION 'set_inbox_retention: p_dlq_retention_hours must be 0 or more, or NULL to keep dead letters, got %', p_dlq_retention_hours
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_dlq_retention_hours IS NOT NULL AND v_cfg.received_at_column IS NULL THEN
        RAISE EXCEPTION 'set_inbox_retention: inbox "%" has no received-at column, so dead letters have no age', p_name
            USING ERRCODE = 'feature_not_supported';
    END IF;
    UPDATE pgtrickle.pgt_inbox_config
       SET retention_hours = p_retention_hours, dlq_retention_hours = p_dlq_retention_hours
     WHERE inbox_name = p_name;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.set_inbox_retention(TEXT, INT, INT) FROM PUBLIC;
$ddl$);

-- Delete processed messages older than retention_hours (by processed_at)
-- and dead letters older than dlq_retention_hours (by received_at, when
-- set), p_batch_size rows per statement, at most p_max_batches statements
-- per inbox and kind (NULL: until done). Ordered inboxes lose nothing by it:
-- their aggregates' positions are kept apart. p_name NULL: every inbox.
-- Returns what was deleted per inbox.
CALL pgtrickle._kit_define('function', 'inbox_retention', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.inbox_retention(
    p_name TEXT DEFAULT NULL, p_batch_size INT DEFAULT 10000, p_max_batches INT DEFAULT NULL)
RETURNS TABLE(inbox_name TEXT, processed_deleted BIGINT, dlq_deleted BIGINT)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg   pgtrickle.pgt_inbox_config;
    v_tbl   text;
    v_sql   text;
    v_n     bigint;
    v_b     int;
BEGIN
    IF p_batch_size IS NULL OR p_batch_size < 1 THEN
        RAISE EXCEPTION 'inbox_retention: p_batch_size must be 1 or more, got %', coalesce(p_batch_size::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_max_batches < 1 THEN
        RAISE EXCEPTION 'inbox_retention: p_max_batches must be 1 or more, or NULL for no limit, got %', p_max_batches
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_name IS NOT NULL THEN
        PERFORM pgtrickle._inbox_lookup(p_name, 'inbox_retention');
    END IF;

    FOR v_cfg IN SELECT c.* FROM pgtrickle.pgt_inbox_config c
                  WHERE p_name IS NULL OR c.inbox_name = p_name ORDER BY c.inbox_name LOOP
        v_tbl := pgtrickle._inbox_rel(v_cfg);
        IF to_regclass(v_tbl) IS NULL THEN
            RAISE NOTICE 'inbox_retention: table % of inbox "%" is missing, skipped', v_tbl, v_cfg.inbox_name;
            CONTINUE;
        END IF;
        inbox_name := v_cfg.inbox_name;
        processed_deleted := 0;
        dlq_deleted := 0;

        v_sql := format('DELETE FROM %1$s WHERE %2$I IN (
                             SELECT t.%2$I FROM %1$s t
                              WHERE t.%3$I < now() - make_interval(hours => $1)
                              LIMIT $2)',
                        v_tbl, v_cfg.id_column, v_cfg.processed_at_column);
        v_b := 0;
        LOOP
            EXECUTE v_sql USING v_cfg.retention_hours, p_batch_size;
            GET DIAGNOSTICS v_n = ROW_COUNT;
            processed_deleted := processed_deleted + v_n;
            v_b := v_b + 1;
            EXIT WHEN v_n < p_batch_size OR v_b >= p_max_batches;
        END LOOP;

        IF v_cfg.dlq_retention_hours IS NOT NULL AND v_cfg.received_at_column IS NOT NULL
           AND v_cfg.retry_count_column IS NOT NULL THEN
            v_sql := format('DELETE FROM %1$s WHERE %2$I IN (
                                 SELECT t.%2$I FROM %1$s t
                                  WHERE %3$s AND t.%4$I < now() - make_interval(hours => $1)
                                  LIMIT $2)',
                            v_tbl, v_cfg.id_column, pgtrickle._inbox_dlq_cond(v_cfg, 't'), v_cfg.received_at_column);
            v_b := 0;
            LOOP
                EXECUTE v_sql USING v_cfg.dlq_retention_hours, p_batch_size;
                GET DIAGNOSTICS v_n = ROW_COUNT;
                dlq_deleted := dlq_deleted + v_n;
                v_b := v_b + 1;
                EXIT WHEN v_n < p_batch_size OR v_b >= p_max_batches;
            END LOOP;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.inbox_retention(TEXT, INT, INT) FROM PUBLIC;
$ddl$);
