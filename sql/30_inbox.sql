-- pgtrickle-relay: 30_inbox.sql — the inbox, for PostgreSQL without pg_trickle.
--
-- pgtrickle.create_inbox('payments') creates the table pgtrickle.payments,
-- where the relay's reverse pipelines (and applications) insert received
-- events with ON CONFLICT (event_id) DO NOTHING, plus the views
-- payments_pending (to process), payments_dlq (gave up after max_retries)
-- and payments_stats (counts per event_type). In pg_trickle these three are
-- stream tables; here they are plain views. A processor marks an event done
-- by setting processed_at, or failed by raising retry_count and setting error.
--
-- pgtrickle.enable_inbox_tracking('legacy', 'app.messages', ...) adopts an
-- existing table instead, with its own column names (the mapping is kept in
-- pgt_inbox_config); drop_inbox never drops an adopted table.
--
-- This file also holds the inbox catalog of the kit's processing features
-- (pgt_inbox_ordering, pgt_inbox_priority) and the helpers every inbox
-- function uses; the features themselves are in 40_inbox_workers.sql to 44_inbox_retention.sql.

CREATE TABLE IF NOT EXISTS pgtrickle.pgt_inbox_config (
    inbox_name          TEXT PRIMARY KEY,
    inbox_schema        TEXT NOT NULL DEFAULT 'pgtrickle',
    max_retries         INT NOT NULL DEFAULT 3,
    schedule            TEXT NOT NULL DEFAULT '1s',
    with_dead_letter    BOOLEAN NOT NULL DEFAULT true,
    with_stats          BOOLEAN NOT NULL DEFAULT true,
    retention_hours     INT NOT NULL DEFAULT 72,
    id_column           TEXT NOT NULL DEFAULT 'event_id',
    processed_at_column TEXT NOT NULL DEFAULT 'processed_at',
    -- optional columns of an adopted table: NULL when the table has none
    retry_count_column  TEXT DEFAULT 'retry_count',
    error_column        TEXT DEFAULT 'error',
    received_at_column  TEXT DEFAULT 'received_at',
    event_type_column   TEXT DEFAULT 'event_type',
    is_managed          BOOLEAN NOT NULL DEFAULT true,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- the kit's additions: the adopted table's name when it is not inbox_name,
    -- and how long dead letters are kept (NULL: until deleted by hand)
    table_name          TEXT,
    dlq_retention_hours INT
);

-- Upgrade an older kit catalog in place (not a table of the pg_trickle
-- extension). Only the columns it lacks are added: ADD COLUMN IF NOT EXISTS
-- would print "already exists, skipping" on every fresh install.
CALL pgtrickle._kit_define('relation', 'pgt_inbox_config', $ddl$
DO $do$
DECLARE
    v_col text[];
BEGIN
    FOREACH v_col SLICE 1 IN ARRAY ARRAY[['table_name', 'TEXT'], ['dlq_retention_hours', 'INT']] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                        WHERE a.attrelid = 'pgtrickle.pgt_inbox_config'::pg_catalog.regclass
                          AND a.attname = v_col[1] AND NOT a.attisdropped) THEN
            EXECUTE pg_catalog.format('ALTER TABLE pgtrickle.pgt_inbox_config ADD COLUMN %I %s', v_col[1], v_col[2]);
        END IF;
    END LOOP;
END
$do$;
ALTER TABLE pgtrickle.pgt_inbox_config ALTER COLUMN retry_count_column DROP NOT NULL;
ALTER TABLE pgtrickle.pgt_inbox_config ALTER COLUMN error_column DROP NOT NULL;
ALTER TABLE pgtrickle.pgt_inbox_config ALTER COLUMN received_at_column DROP NOT NULL;
ALTER TABLE pgtrickle.pgt_inbox_config ALTER COLUMN event_type_column DROP NOT NULL;
GRANT SELECT ON pgtrickle.pgt_inbox_config TO pgtrickle_relay;
$ddl$);

-- Ordered processing of an inbox (enable_inbox_ordering): per aggregate, in
-- sequence order, starting at first_sequence.
CREATE TABLE IF NOT EXISTS pgtrickle.pgt_inbox_ordering (
    inbox_name       TEXT PRIMARY KEY,
    aggregate_column TEXT NOT NULL,
    sequence_column  TEXT NOT NULL,
    first_sequence   BIGINT NOT NULL DEFAULT 1,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Priority tiers of an inbox (enable_inbox_priority): tiers is
-- {"<tier>": [lowest, highest], ...}; a lower number is more urgent.
CREATE TABLE IF NOT EXISTS pgtrickle.pgt_inbox_priority (
    inbox_name      TEXT PRIMARY KEY,
    priority_column TEXT NOT NULL,
    tiers           JSONB NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The relay may read the feature catalogs (they hold only column names).
CALL pgtrickle._kit_define('relation', 'pgt_inbox_ordering', $ddl$
GRANT SELECT ON pgtrickle.pgt_inbox_ordering TO pgtrickle_relay;
$ddl$);
-- (same)
CALL pgtrickle._kit_define('relation', 'pgt_inbox_priority', $ddl$
GRANT SELECT ON pgtrickle.pgt_inbox_priority TO pgtrickle_relay;
$ddl$);

-- ---------------------------------------------------------------------------
-- Internal helpers (no EXECUTE for anyone but the owner)
-- ---------------------------------------------------------------------------

-- The pgt_inbox_config row of inbox p_name; raises no_data_found naming p_caller.
CALL pgtrickle._kit_define('function', '_inbox_lookup', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_lookup(p_name TEXT, p_caller TEXT)
RETURNS pgtrickle.pgt_inbox_config
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg pgtrickle.pgt_inbox_config;
BEGIN
    SELECT c.* INTO v_cfg FROM pgtrickle.pgt_inbox_config c WHERE c.inbox_name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION '%: inbox "%" does not exist (create it with pgtrickle.create_inbox or adopt a table with pgtrickle.enable_inbox_tracking)',
            p_caller, p_name
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v_cfg;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_lookup(TEXT, TEXT) FROM PUBLIC;
$ddl$);

-- The inbox's table, schema-qualified and quoted, for format('%s').
CALL pgtrickle._kit_define('function', '_inbox_rel', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_rel(p_cfg pgtrickle.pgt_inbox_config)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
    SELECT format('%I.%I', p_cfg.inbox_schema, coalesce(p_cfg.table_name, p_cfg.inbox_name))
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_rel(pgtrickle.pgt_inbox_config) FROM PUBLIC;
$ddl$);

-- SQL condition "row p_alias is pending": not processed, retries left.
CALL pgtrickle._kit_define('function', '_inbox_pending_cond', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_pending_cond(p_cfg pgtrickle.pgt_inbox_config, p_alias TEXT)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
    SELECT format('%I.%I IS NULL', p_alias, p_cfg.processed_at_column)
        || CASE WHEN p_cfg.retry_count_column IS NULL THEN ''
                ELSE format(' AND coalesce(%I.%I, 0) < %s', p_alias, p_cfg.retry_count_column, p_cfg.max_retries)
           END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_pending_cond(pgtrickle.pgt_inbox_config, TEXT) FROM PUBLIC;
$ddl$);

-- SQL condition "row p_alias is a dead letter": not processed, no retries left.
CALL pgtrickle._kit_define('function', '_inbox_dlq_cond', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_dlq_cond(p_cfg pgtrickle.pgt_inbox_config, p_alias TEXT)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
    SELECT CASE WHEN p_cfg.retry_count_column IS NULL THEN 'false'
                ELSE format('%I.%I IS NULL AND coalesce(%I.%I, 0) >= %s', p_alias, p_cfg.processed_at_column,
                            p_alias, p_cfg.retry_count_column, p_cfg.max_retries)
           END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_dlq_cond(pgtrickle.pgt_inbox_config, TEXT) FROM PUBLIC;
$ddl$);

-- The SQL type of column p_column of the inbox's table (for casting text
-- ids), as format_type writes it: quoted, and schema-qualified unless the
-- type is visible on the search_path every kit function runs with, so it
-- may be spliced into SQL with %s.
CALL pgtrickle._kit_define('function', '_inbox_column_type', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_column_type(p_cfg pgtrickle.pgt_inbox_config, p_column TEXT)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
    SELECT pg_catalog.format_type(a.atttypid, a.atttypmod)
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = to_regclass(pgtrickle._inbox_rel(p_cfg))
       AND a.attname = p_column AND a.attnum > 0 AND NOT a.attisdropped
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_column_type(pgtrickle.pgt_inbox_config, TEXT) FROM PUBLIC;
$ddl$);

-- Raise duplicate_table when <p_schema>.<p_name> is taken (p_caller names the function).
CALL pgtrickle._kit_define('function', '_inbox_require_free', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_require_free(p_schema TEXT, p_name TEXT, p_caller TEXT)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
BEGIN
    IF octet_length(p_name) > 63 THEN
        RAISE EXCEPTION '%: the name "%" is longer than PostgreSQL''s 63-byte identifiers; use a shorter inbox or tier name', p_caller, p_name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF to_regclass(format('%I.%I', p_schema, p_name)) IS NOT NULL THEN
        RAISE EXCEPTION '%: %.% already exists; drop or rename it first', p_caller, quote_ident(p_schema), quote_ident(p_name)
            USING ERRCODE = 'duplicate_table';
    END IF;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_require_free(TEXT, TEXT, TEXT) FROM PUBLIC;
$ddl$);

-- SELECT text of the plain <name>_pending view.
CALL pgtrickle._kit_define('function', '_inbox_pending_view_sql', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_pending_view_sql(p_cfg pgtrickle.pgt_inbox_config)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
    SELECT format('SELECT * FROM %s t WHERE %s', pgtrickle._inbox_rel(p_cfg), pgtrickle._inbox_pending_cond(p_cfg, 't'))
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_pending_view_sql(pgtrickle.pgt_inbox_config) FROM PUBLIC;
$ddl$);

-- Create the views <name>_pending, <name>_dlq (with_dead_letter) and
-- <name>_stats (with_stats) over the mapped columns of the inbox's table.
CALL pgtrickle._kit_define('function', '_inbox_create_views', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_create_views(p_cfg pgtrickle.pgt_inbox_config)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_tbl     text := pgtrickle._inbox_rel(p_cfg);
    v_pending text := pgtrickle._inbox_pending_cond(p_cfg, 't');
    v_dlq     text := pgtrickle._inbox_dlq_cond(p_cfg, 't');
    v_type    text := CASE WHEN p_cfg.event_type_column IS NULL THEN 'NULL::text' ELSE format('t.%I::text', p_cfg.event_type_column) END;
    v_recv    text := CASE WHEN p_cfg.received_at_column IS NULL THEN 'NULL::timestamptz' ELSE format('t.%I', p_cfg.received_at_column) END;
BEGIN
    EXECUTE format('CREATE VIEW %I.%I AS %s', p_cfg.inbox_schema, p_cfg.inbox_name || '_pending',
                   pgtrickle._inbox_pending_view_sql(p_cfg));
    IF p_cfg.with_dead_letter THEN
        EXECUTE format('CREATE VIEW %I.%I AS SELECT * FROM %s t WHERE %s',
                       p_cfg.inbox_schema, p_cfg.inbox_name || '_dlq', v_tbl, v_dlq);
    END IF;
    IF p_cfg.with_stats THEN
        EXECUTE format($sql$
            CREATE VIEW %1$I.%2$I AS
            SELECT %3$s AS event_type,
                   count(*) AS total,
                   count(*) FILTER (WHERE %4$s) AS pending,
                   count(*) FILTER (WHERE t.%5$I IS NOT NULL) AS processed,
                   count(*) FILTER (WHERE %6$s) AS dlq,
                   min(%7$s) FILTER (WHERE %4$s) AS oldest_pending_at,
                   max(%7$s) AS last_received_at
              FROM %8$s t
             GROUP BY 1$sql$,
            p_cfg.inbox_schema, p_cfg.inbox_name || '_stats', v_type, v_pending,
            p_cfg.processed_at_column, v_dlq, v_recv, v_tbl);
    END IF;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_create_views(pgtrickle.pgt_inbox_config) FROM PUBLIC;
$ddl$);

-- ---------------------------------------------------------------------------
-- Creating, adopting and dropping inboxes (administrators)
-- ---------------------------------------------------------------------------

-- Create inbox p_name as table <p_schema>.<p_name> with its views; calling it
-- again for an existing inbox changes nothing (NOTICE).
CALL pgtrickle._kit_define('function', 'create_inbox', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.create_inbox(
    p_name TEXT, p_schema TEXT DEFAULT 'pgtrickle', p_max_retries INT DEFAULT 3,
    p_schedule TEXT DEFAULT '1s', p_with_dead_letter BOOLEAN DEFAULT true,
    p_with_stats BOOLEAN DEFAULT true, p_retention_hours INT DEFAULT 72)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg pgtrickle.pgt_inbox_config;
    v_tbl text;
BEGIN
    IF p_name IS NULL OR btrim(p_name) = '' THEN
        RAISE EXCEPTION 'create_inbox: p_name must be a non-empty inbox name'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- <name>_pending must fit in PostgreSQL's 63-byte identifiers.
    IF octet_length(p_name) > 55 THEN
        RAISE EXCEPTION 'create_inbox: inbox name "%" is too long (% bytes, at most 55)', p_name, octet_length(p_name)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_schema IS NULL OR btrim(p_schema) = '' THEN
        RAISE EXCEPTION 'create_inbox: p_schema must be a non-empty schema name'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF to_regnamespace(quote_ident(p_schema)) IS NULL THEN
        RAISE EXCEPTION 'create_inbox: schema "%" does not exist', p_schema
            USING ERRCODE = 'invalid_schema_name';
    END IF;
    IF p_max_retries IS NULL OR p_max_retries < 0 THEN
        RAISE EXCEPTION 'create_inbox: p_max_retries must be 0 or more, got %', coalesce(p_max_retries::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_schedule IS NULL OR btrim(p_schedule) = '' THEN
        RAISE EXCEPTION 'create_inbox: p_schedule must be a non-empty schedule such as ''1s'''
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_retention_hours IS NULL OR p_retention_hours < 0 THEN
        RAISE EXCEPTION 'create_inbox: p_retention_hours must be 0 or more, got %', coalesce(p_retention_hours::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_with_dead_letter IS NULL OR p_with_stats IS NULL THEN
        RAISE EXCEPTION 'create_inbox: p_with_dead_letter and p_with_stats must be true or false, not NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    LOCK TABLE pgtrickle.pgt_inbox_config IN SHARE ROW EXCLUSIVE MODE;
    SELECT c.* INTO v_cfg FROM pgtrickle.pgt_inbox_config c WHERE c.inbox_name = p_name;
    IF FOUND THEN
        RAISE NOTICE 'create_inbox: inbox "%" already exists (table %); settings unchanged',
            p_name, pgtrickle._inbox_rel(v_cfg);
        RETURN;
    END IF;
    v_tbl := format('%I.%I', p_schema, p_name);
    IF to_regclass(v_tbl) IS NOT NULL THEN
        RAISE EXCEPTION 'create_inbox: table % already exists and is not an inbox', v_tbl
            USING ERRCODE = 'duplicate_table',
                  HINT = 'Choose another name, drop or rename the table, or adopt it with pgtrickle.enable_inbox_tracking.';
    END IF;
    PERFORM pgtrickle._inbox_require_free(p_schema, p_name || v_suffix, 'create_inbox')
       FROM unnest(ARRAY['_pending', '_dlq', '_stats']) AS v_suffix;

    EXECUTE format($sql$
        CREATE TABLE %s (
            event_id     TEXT PRIMARY KEY,
            event_type   TEXT,
            source       TEXT,
            aggregate_id TEXT,
            payload      JSONB,
            received_at  TIMESTAMPTZ DEFAULT now(),
            processed_at TIMESTAMPTZ,
            error        TEXT,
            retry_count  INT DEFAULT 0,
            trace_id     TEXT
        )$sql$, v_tbl);
    -- What a processor scans: the unprocessed events, oldest first.
    EXECUTE format('CREATE INDEX %I ON %s (received_at) WHERE processed_at IS NULL',
                   pgtrickle._kit_ident(p_name || '_pending_idx'), v_tbl);
    -- What retention and inbox_health scan: the processed events by age.
    EXECUTE format('CREATE INDEX %I ON %s (processed_at) WHERE processed_at IS NOT NULL',
                   pgtrickle._kit_ident(p_name || '_processed_idx'), v_tbl);

    INSERT INTO pgtrickle.pgt_inbox_config
           (inbox_name, inbox_schema, max_retries, schedule, with_dead_letter, with_stats,
            retention_hours, is_managed)
    VALUES (p_name, p_schema, p_max_retries, p_schedule, p_with_dead_letter, p_with_stats,
            p_retention_hours, true)
    RETURNING * INTO v_cfg;
    PERFORM pgtrickle._inbox_create_views(v_cfg);

    EXECUTE format('GRANT SELECT, INSERT ON %s TO pgtrickle_relay', v_tbl);
    IF p_schema <> 'pgtrickle' THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO pgtrickle_relay', p_schema);
    END IF;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.create_inbox(TEXT, TEXT, INT, TEXT, BOOLEAN, BOOLEAN, INT) FROM PUBLIC;
$ddl$);

-- Adopt the existing table p_table as inbox p_name: validate the mapped
-- columns (id with a unique index, processed_at required; retry count, error,
-- received_at and event type optional: NULL takes the conventional name when
-- the table has it), then create the same views as create_inbox over them.
-- Calling it again with the same name and table changes nothing (NOTICE).
CALL pgtrickle._kit_define('function', 'enable_inbox_tracking', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.enable_inbox_tracking(
    p_name TEXT, p_table REGCLASS,
    p_id_column TEXT DEFAULT 'event_id',
    p_processed_at_column TEXT DEFAULT 'processed_at',
    p_retry_count_column TEXT DEFAULT NULL,
    p_error_column TEXT DEFAULT NULL,
    p_received_at_column TEXT DEFAULT NULL,
    p_event_type_column TEXT DEFAULT NULL,
    p_max_retries INT DEFAULT 3,
    p_with_dead_letter BOOLEAN DEFAULT true,
    p_with_stats BOOLEAN DEFAULT true,
    p_retention_hours INT DEFAULT 72,
    p_create_index BOOLEAN DEFAULT true)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_schema  text;
    v_table   text;
    v_kind    "char";
    v_cfg     pgtrickle.pgt_inbox_config;
    v_other   text;
    v_cols    text[] := ARRAY[p_id_column, p_processed_at_column, p_retry_count_column,
                              p_error_column, p_received_at_column, p_event_type_column];
    v_params  text[] := ARRAY['p_id_column', 'p_processed_at_column', 'p_retry_count_column',
                              'p_error_column', 'p_received_at_column', 'p_event_type_column'];
    v_default text[] := ARRAY['event_id', 'processed_at', 'retry_count', 'error', 'received_at', 'event_type'];
    v_types   regtype[] := ARRAY[NULL, NULL, NULL, NULL, NULL, NULL]::regtype[];
    v_attnum  int2;
    v_type    regtype;
    v_dead    boolean := p_with_dead_letter;
    i         int;
BEGIN
    IF p_name IS NULL OR btrim(p_name) = '' THEN
        RAISE EXCEPTION 'enable_inbox_tracking: p_name must be a non-empty inbox name'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(p_name) > 55 THEN
        RAISE EXCEPTION 'enable_inbox_tracking: inbox name "%" is too long (% bytes, at most 55)', p_name, octet_length(p_name)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_table IS NULL THEN
        RAISE EXCEPTION 'enable_inbox_tracking: p_table must name an existing table'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_max_retries IS NULL OR p_max_retries < 0 THEN
        RAISE EXCEPTION 'enable_inbox_tracking: p_max_retries must be 0 or more, got %', coalesce(p_max_retries::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_retention_hours IS NULL OR p_retention_hours < 0 THEN
        RAISE EXCEPTION 'enable_inbox_tracking: p_retention_hours must be 0 or more, got %', coalesce(p_retention_hours::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_with_dead_letter IS NULL OR p_with_stats IS NULL OR p_create_index IS NULL THEN
        RAISE EXCEPTION 'enable_inbox_tracking: p_with_dead_letter, p_with_stats and p_create_index must be true or false, not NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_id_column IS NULL OR p_processed_at_column IS NULL THEN
        RAISE EXCEPTION 'enable_inbox_tracking: p_id_column and p_processed_at_column are required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    SELECT n.nspname, c.relname, c.relkind INTO v_schema, v_table, v_kind
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p_table;
    IF v_kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'enable_inbox_tracking: % is not a table', p_table
            USING ERRCODE = 'wrong_object_type';
    END IF;

    LOCK TABLE pgtrickle.pgt_inbox_config IN SHARE ROW EXCLUSIVE MODE;
    SELECT c.* INTO v_cfg FROM pgtrickle.pgt_inbox_config c WHERE c.inbox_name = p_name;
    IF FOUND THEN
        IF v_cfg.inbox_schema = v_schema AND coalesce(v_cfg.table_name, v_cfg.inbox_name) = v_table THEN
            RAISE NOTICE 'enable_inbox_tracking: inbox "%" already tracks %; settings unchanged', p_name, p_table;
            RETURN;
        END IF;
        RAISE EXCEPTION 'enable_inbox_tracking: inbox "%" already exists (table %)', p_name, pgtrickle._inbox_rel(v_cfg)
            USING ERRCODE = 'duplicate_object';
    END IF;
    SELECT c.inbox_name INTO v_other FROM pgtrickle.pgt_inbox_config c
     WHERE c.inbox_schema = v_schema AND coalesce(c.table_name, c.inbox_name) = v_table;
    IF FOUND THEN
        RAISE EXCEPTION 'enable_inbox_tracking: table % is already inbox "%"', p_table, v_other
            USING ERRCODE = 'duplicate_object';
    END IF;

    -- Resolve and check every mapped column.
    FOR i IN 1 .. 6 LOOP
        v_attnum := NULL;
        SELECT a.attnum, a.atttypid INTO v_attnum, v_type
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = p_table AND a.attname = coalesce(v_cols[i], v_default[i])
           AND a.attnum > 0 AND NOT a.attisdropped;
        IF v_attnum IS NULL THEN
            IF v_cols[i] IS NOT NULL THEN
                RAISE EXCEPTION 'enable_inbox_tracking: table % has no column "%" (%)', p_table, v_cols[i], v_params[i]
                    USING ERRCODE = 'undefined_column';
            END IF;
            CONTINUE;  -- an optional column the table does not have
        END IF;
        v_cols[i] := coalesce(v_cols[i], v_default[i]);
        v_types[i] := v_type;
    END LOOP;
    IF v_types[2] NOT IN ('timestamptz'::regtype, 'timestamp'::regtype) THEN
        RAISE EXCEPTION 'enable_inbox_tracking: column "%" (p_processed_at_column) must be timestamptz or timestamp, not %', v_cols[2], v_types[2]
            USING ERRCODE = 'datatype_mismatch';
    END IF;
    IF v_types[3] IS NOT NULL AND v_types[3] NOT IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype) THEN
        RAISE EXCEPTION 'enable_inbox_tracking: column "%" (p_retry_count_column) must be an integer type, not %', v_cols[3], v_types[3]
            USING ERRCODE = 'datatype_mismatch';
    END IF;
    IF v_types[4] IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_type t WHERE t.oid = v_types[4] AND t.typcategory = 'S') THEN
        RAISE EXCEPTION 'enable_inbox_tracking: column "%" (p_error_column) must be a string type, not %', v_cols[4], v_types[4]
            USING ERRCODE = 'datatype_mismatch';
    END IF;
    IF v_types[5] IS NOT NULL AND v_types[5] NOT IN ('timestamptz'::regtype, 'timestamp'::regtype) THEN
        RAISE EXCEPTION 'enable_inbox_tracking: column "%" (p_received_at_column) must be timestamptz or timestamp, not %', v_cols[5], v_types[5]
            USING ERRCODE = 'datatype_mismatch';
    END IF;
    IF cardinality(ARRAY(SELECT DISTINCT x FROM unnest(v_cols) x WHERE x IS NOT NULL))
       <> cardinality(array_remove(v_cols, NULL)) THEN
        RAISE EXCEPTION 'enable_inbox_tracking: one column is mapped twice: %', array_to_string(v_cols, ', ', '-')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The id must be unique on its own: a primary key or a plain unique index.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index x JOIN pg_catalog.pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
                    WHERE x.indrelid = p_table AND x.indisunique AND x.indnkeyatts = 1
                      AND x.indpred IS NULL AND x.indexprs IS NULL AND a.attname = v_cols[1]) THEN
        RAISE EXCEPTION 'enable_inbox_tracking: column "%" (p_id_column) of % is not unique', v_cols[1], p_table
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'The id needs a primary key or a unique index on that column alone (writers insert with ON CONFLICT on it).';
    END IF;
    IF v_dead AND v_cols[3] IS NULL THEN
        RAISE NOTICE 'enable_inbox_tracking: table % has no retry-count column: no dead-letter view', p_table;
        v_dead := false;
    END IF;
    PERFORM pgtrickle._inbox_require_free(v_schema, p_name || s, 'enable_inbox_tracking')
       FROM unnest(ARRAY['_pending', '_dlq', '_stats']) AS s;

    INSERT INTO pgtrickle.pgt_inbox_config
           (inbox_name, inbox_schema, table_name, max_retries, schedule, with_dead_letter, with_stats,
            retention_hours, id_column, processed_at_column, retry_count_column, error_column,
            received_at_column, event_type_column, is_managed)
    VALUES (p_name, v_schema, nullif(v_table, p_name), p_max_retries, '1s', v_dead, p_with_stats,
            p_retention_hours, v_cols[1], v_cols[2], v_cols[3], v_cols[4], v_cols[5], v_cols[6], false)
    RETURNING * INTO v_cfg;
    PERFORM pgtrickle._inbox_create_views(v_cfg);
    -- As for create_inbox: the relay may write into it.
    EXECUTE format('GRANT SELECT, INSERT ON %s TO pgtrickle_relay', p_table);
    IF v_schema <> 'pgtrickle' THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO pgtrickle_relay', v_schema);
    END IF;
    IF p_create_index THEN
        EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s (%I) WHERE %I IS NULL',
                       pgtrickle._kit_ident(p_name || '_pending_idx'), p_table,
                       coalesce(v_cols[5], v_cols[1]), v_cols[2]);
    END IF;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.enable_inbox_tracking(TEXT, REGCLASS, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, INT, BOOLEAN, BOOLEAN, INT, BOOLEAN) FROM PUBLIC;
$ddl$);

-- Drop the index <p_schema>.<p_index> if it exists and belongs to table p_table.
CALL pgtrickle._kit_define('function', '_inbox_drop_index', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._inbox_drop_index(p_schema TEXT, p_index TEXT, p_table TEXT)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_index x
                WHERE x.indexrelid = to_regclass(format('%I.%I', p_schema, p_index))
                  AND x.indrelid = to_regclass(format('%I.%I', p_schema, p_table))) THEN
        EXECUTE format('DROP INDEX %I.%I', p_schema, p_index);
    END IF;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._inbox_drop_index(TEXT, TEXT, TEXT) FROM PUBLIC;
$ddl$);

-- Drop inbox p_name: its views (with ordering and priority views) and
-- configuration, and its table when the kit created it. An adopted table is
-- never dropped, only the kit's indexes on it. Without p_cascade, objects
-- that depend on the inbox make the drop fail and nothing changes; with it,
-- they are dropped too.
CALL pgtrickle._kit_define('function', 'drop_inbox', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.drop_inbox(
    p_name TEXT, p_if_exists BOOLEAN DEFAULT false, p_cascade BOOLEAN DEFAULT false)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_cfg       pgtrickle.pgt_inbox_config;
    v_mode      text := CASE WHEN coalesce(p_cascade, false) THEN 'CASCADE' ELSE 'RESTRICT' END;
    v_view      text;
    v_index     text;
    v_pipelines text;
BEGIN
    SELECT c.* INTO v_cfg FROM pgtrickle.pgt_inbox_config c WHERE c.inbox_name = p_name;
    IF NOT FOUND THEN
        IF coalesce(p_if_exists, false) THEN
            RAISE NOTICE 'drop_inbox: inbox "%" does not exist, skipping', p_name;
            RETURN;
        END IF;
        RAISE EXCEPTION 'drop_inbox: inbox "%" does not exist', p_name
            USING ERRCODE = 'no_data_found';
    END IF;

    -- Ordered processing (41_inbox_ordering.sql): views, trigger, positions.
    IF EXISTS (SELECT 1 FROM pgtrickle.pgt_inbox_ordering o WHERE o.inbox_name = p_name) THEN
        PERFORM pgtrickle._inbox_ord_drop(v_cfg, v_mode);
    END IF;
    FOR v_view IN
        SELECT p_name || '_pending_' || k
          FROM pgtrickle.pgt_inbox_priority pr, jsonb_object_keys(pr.tiers) k
         WHERE pr.inbox_name = p_name
        UNION ALL
        SELECT unnest(ARRAY[p_name || '_stats', p_name || '_dlq', p_name || '_pending'])
    LOOP
        EXECUTE format('DROP VIEW IF EXISTS %I.%I %s', v_cfg.inbox_schema, v_view, v_mode);
    END LOOP;
    IF v_cfg.is_managed THEN
        EXECUTE format('DROP TABLE IF EXISTS %s %s', pgtrickle._inbox_rel(v_cfg), v_mode);
    ELSE
        FOREACH v_index IN ARRAY ARRAY['_pending_idx', '_prio_pending_idx'] LOOP
            PERFORM pgtrickle._inbox_drop_index(v_cfg.inbox_schema, pgtrickle._kit_ident(p_name || v_index),
                                                coalesce(v_cfg.table_name, v_cfg.inbox_name));
        END LOOP;
    END IF;
    DELETE FROM pgtrickle.pgt_inbox_ordering WHERE inbox_name = p_name;
    DELETE FROM pgtrickle.pgt_inbox_priority WHERE inbox_name = p_name;
    DELETE FROM pgtrickle.pgt_inbox_config WHERE inbox_name = p_name;

    SELECT string_agg(c.name, ', ' ORDER BY c.name) INTO v_pipelines
      FROM pgtrickle.relay_inbox_config c
     WHERE c.config -> 'sink' ->> 'inbox' = p_name;
    IF v_pipelines IS NOT NULL THEN
        RAISE WARNING 'drop_inbox: relay pipelines still write to inbox "%": %', p_name, v_pipelines
            USING HINT = 'Delete them with pgtrickle.delete_relay(name).';
    END IF;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.drop_inbox(TEXT, BOOLEAN, BOOLEAN) FROM PUBLIC;
$ddl$);
