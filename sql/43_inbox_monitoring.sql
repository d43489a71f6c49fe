-- pgtrickle-relay: 43_inbox_monitoring.sql — inbox_health (JSONB with
-- healthy/degraded/critical) and inbox_status (every inbox).
-- No statement is ever built from input values: identifiers come from the
-- catalog through format('%I'), values are passed as parameters.

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
