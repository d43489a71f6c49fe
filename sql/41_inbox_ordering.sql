-- pgtrickle-relay: 41_inbox_ordering.sql — ordered processing of an inbox:
-- enable_inbox_ordering gives next_<inbox> (per aggregate only the next
-- expected message) and gaps_<inbox> / inbox_ordering_gaps (missing sequence
-- numbers); disable_inbox_ordering. Exclusive with priority tiers.
-- No statement is ever built from input values: identifiers come from the
-- catalog through format('%I'), values are passed as parameters.

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
