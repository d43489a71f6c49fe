-- pgtrickle-relay: 50_maintenance.sql — housekeeping to schedule, and dashboards.
--
--   * reap_dead_consumers: a consumer-group member whose heartbeat is older
--     than a threshold has its open leases released at once, so the rest of
--     its group takes its batches over without waiting for the visibility
--     timeout (the consumer dashboards, pgt_consumer_status,
--     pgt_consumer_group_lag and pgt_consumer_active_leases, are in
--     20_consumer_groups.sql);
--   * pgt_inbox_status: the inbox dashboard (one row per inbox, inbox_status());
--   * run_maintenance: outbox retention, inbox retention and reaping in one
--     call, for pg_cron or any scheduler (docs/inbox.md shows how).

-- Release the open leases of every consumer (of p_group, or of all groups)
-- whose last heartbeat is more than p_dead_after_seconds old, by expiring
-- them: the next poll_outbox of the group takes each batch over whole. With
-- p_remove, the dead consumers' rows are deleted too (a consumer that comes
-- back is simply registered again). Returns one row per dead consumer.
CALL pgtrickle._kit_define('function', 'reap_dead_consumers', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.reap_dead_consumers(
    p_dead_after_seconds INT DEFAULT 60, p_group TEXT DEFAULT NULL, p_remove BOOLEAN DEFAULT false)
RETURNS TABLE(group_name TEXT, consumer_id TEXT, last_heartbeat_at TIMESTAMPTZ, leases_released INT)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    v_group text;
    v_dead  record;
    v_n     int;
BEGIN
    IF p_dead_after_seconds IS NULL OR p_dead_after_seconds < 1 THEN
        RAISE EXCEPTION 'reap_dead_consumers: p_dead_after_seconds must be 1 or more, got %', coalesce(p_dead_after_seconds::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_group IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pgtrickle.pgt_consumer_groups g WHERE g.group_name = p_group) THEN
        RAISE EXCEPTION 'reap_dead_consumers: consumer group "%" does not exist', p_group
            USING ERRCODE = 'no_data_found';
    END IF;

    FOR v_group IN SELECT g.group_name FROM pgtrickle.pgt_consumer_groups g
                    WHERE p_group IS NULL OR g.group_name = p_group
                    ORDER BY g.group_name LOOP
        -- Same lock order as poll_outbox and commit_offset: group row, then leases.
        PERFORM 1 FROM pgtrickle.pgt_consumer_groups g WHERE g.group_name = v_group FOR NO KEY UPDATE;
        FOR v_dead IN SELECT o.consumer_id, o.last_heartbeat_at
                        FROM pgtrickle.pgt_consumer_offsets o
                       WHERE o.group_name = v_group
                         AND coalesce(o.last_heartbeat_at, '-infinity') < now() - make_interval(secs => p_dead_after_seconds)
                       ORDER BY o.consumer_id
                         FOR UPDATE LOOP
            UPDATE pgtrickle.pgt_consumer_leases l
               SET lease_expires = now() - interval '1 microsecond'
             WHERE l.group_name = v_group AND l.consumer_id = v_dead.consumer_id
               AND NOT l.done AND l.lease_expires >= now();
            GET DIAGNOSTICS v_n = ROW_COUNT;
            IF coalesce(p_remove, false) THEN
                DELETE FROM pgtrickle.pgt_consumer_offsets o
                 WHERE o.group_name = v_group AND o.consumer_id = v_dead.consumer_id;
            END IF;
            group_name := v_group;
            consumer_id := v_dead.consumer_id;
            last_heartbeat_at := v_dead.last_heartbeat_at;
            leases_released := v_n;
            RETURN NEXT;
        END LOOP;
    END LOOP;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.reap_dead_consumers(INT, TEXT, BOOLEAN) FROM PUBLIC;
$ddl$);

-- Inbox dashboard: one row per inbox with its health (SELECT granted to pgtrickle_relay).
CALL pgtrickle._kit_define('relation', 'pgt_inbox_status', $ddl$
CREATE OR REPLACE VIEW pgtrickle.pgt_inbox_status AS
SELECT * FROM pgtrickle.inbox_status();
GRANT SELECT ON pgtrickle.pgt_inbox_status TO pgtrickle_relay;
$ddl$);

-- Everything to run periodically, in one transaction: outbox retention (never
-- what a consumer has not committed, unless p_force_outbox), inbox retention,
-- reaping consumers silent for p_dead_after_seconds, and recounting the
-- sleepers of kit outboxes whose sleep counter is above 0 (a relay killed
-- while asleep, or a crash that emptied the unlogged sleepers table, leaves
-- it up and every writer notifying; relay_outbox_sleep drops the sessions
-- that are gone). Returns a summary.
CALL pgtrickle._kit_define('function', 'run_maintenance', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.run_maintenance(
    p_force_outbox BOOLEAN DEFAULT false, p_dead_after_seconds INT DEFAULT 60, p_batch_size INT DEFAULT 10000)
RETURNS JSONB
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_outbox bigint;
    v_inbox  jsonb;
    v_reaped jsonb;
    v_reset  int := 0;
    v_sync   text := pg_catalog.current_setting('synchronous_commit');
    v_seq    regclass;
    v_before bigint;
    o        record;
BEGIN
    v_outbox := pgtrickle.outbox_retention(NULL, coalesce(p_force_outbox, false), p_batch_size);
    FOR o IN SELECT c.outbox_table_name AS t FROM pgtrickle.pgt_outbox_config c
              WHERE c.stream_table_oid IS NULL ORDER BY 1
    LOOP
        v_seq := pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I', pgtrickle._outbox_sleep_counter(o.t)));
        CONTINUE WHEN v_seq IS NULL;
        v_before := coalesce(pg_catalog.pg_sequence_last_value(v_seq), 0);
        CONTINUE WHEN v_before = 0;
        PERFORM pgtrickle.relay_outbox_sleep(o.t, false);
        IF coalesce(pg_catalog.pg_sequence_last_value(v_seq), 0) < v_before THEN
            v_reset := v_reset + 1;
        END IF;
    END LOOP;
    -- relay_outbox_sleep makes its transaction's commit asynchronous: not
    -- this one's.
    PERFORM pg_catalog.set_config('synchronous_commit', v_sync, true);
    SELECT coalesce(jsonb_agg(to_jsonb(r) ORDER BY r.inbox_name), '[]'::jsonb) INTO v_inbox
      FROM pgtrickle.inbox_retention(NULL, p_batch_size) r;
    SELECT coalesce(jsonb_agg(to_jsonb(d) ORDER BY d.group_name, d.consumer_id), '[]'::jsonb) INTO v_reaped
      FROM pgtrickle.reap_dead_consumers(p_dead_after_seconds) d;
    RETURN jsonb_build_object('outbox_rows_deleted', v_outbox,
                              'inbox_rows_deleted', v_inbox,
                              'dead_consumers', v_reaped,
                              'sleep_counters_reset', v_reset);
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.run_maintenance(BOOLEAN, INT, INT) FROM PUBLIC;
$ddl$);
