-- pgtrickle-relay: 40_inbox_workers.sql — processing inboxes safely, in plain SQL.
--
-- Over any inbox (created with create_inbox or adopted with
-- enable_inbox_tracking; column names come from pgt_inbox_config):
--   * workers: inbox_claim (FOR UPDATE SKIP LOCKED), inbox_mark_processed,
--     inbox_mark_failed (dead letter at max_retries), inbox_is_my_partition;
--   * replay_inbox_messages: dead letters (or processed events) back to pending.
-- Ordering, priority tiers, monitoring and retention are in 41_ to 44_.
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
