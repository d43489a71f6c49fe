-- pgtrickle-relay: 42_inbox_priority.sql — priority tiers of an inbox:
-- enable_inbox_priority gives <inbox>_pending_<tier> views;
-- disable_inbox_priority. Exclusive with ordered processing.
-- No statement is ever built from input values: identifiers come from the
-- catalog through format('%I'), values are passed as parameters.

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
