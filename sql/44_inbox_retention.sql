-- pgtrickle-relay: 44_inbox_retention.sql — set_inbox_retention and
-- inbox_retention (processed messages and dead letters, in bounded batches).
-- No statement is ever built from input values: identifiers come from the
-- catalog through format('%I'), values are passed as parameters.

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
