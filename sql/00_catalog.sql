-- pgtrickle-relay: 00_catalog.sql — schema, role, install helpers and the relay catalog.
--
-- The relay catalog is where pipelines live: relay_outbox_config (forward:
-- outbox -> broker), relay_inbox_config (reverse: broker -> inbox) and
-- relay_consumer_offsets (how far each forward pipeline, and each reverse
-- pipeline reading another database's outbox, got). The relay's login role is
-- granted pgtrickle_relay, which reads the catalog only through the SECURITY
-- DEFINER functions below, never the tables.
--
-- Safe to run twice. Objects that belong to an installed extension (the
-- pg_trickle extension ships most of them) are left exactly as they are:
-- every function and view is created through CALL pgtrickle._kit_define, which
-- skips it when an extension owns an object of that name.
-- Plain SQL only (no psql meta-commands): it is also piped into psql by
-- `pgtrickle-relay sql`.
--
-- Every function of the kit pins search_path = pg_catalog, pgtrickle, pg_temp
-- (pg_catalog alone for the install helpers, then pg_temp). pg_temp must be
-- named, and last: PostgreSQL otherwise searches the calling session's
-- temporary schema *first* for tables and types, so a caller could make a
-- SECURITY DEFINER function use its own look-alike pg_attribute or a domain
-- named text whose CHECK runs the caller's code as the owner. Catalogs are
-- written pg_catalog.<name> all the same.

CREATE SCHEMA IF NOT EXISTS pgtrickle;

-- The role the relay's login role is made a member of. Roles are cluster-wide,
-- so two databases installing at once may race on it: the loser just goes on.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgtrickle_relay') THEN
        CREATE ROLE pgtrickle_relay NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

GRANT USAGE ON SCHEMA pgtrickle TO pgtrickle_relay;

-- ---------------------------------------------------------------------------
-- Install helpers
-- ---------------------------------------------------------------------------

-- The extension owning pgtrickle.<p_name> (p_kind 'relation': that table/view;
-- 'function': any function of that name), or NULL when no extension does.
CREATE OR REPLACE FUNCTION pgtrickle._kit_owner_extension(p_kind text, p_name text)
RETURNS name
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e.extname
      FROM pg_catalog.pg_depend d
      JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
     WHERE d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
       AND d.deptype = 'e'
       AND (   (p_kind = 'function'
                AND d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                AND d.objid IN (SELECT p.oid FROM pg_catalog.pg_proc p
                                 WHERE p.pronamespace = 'pgtrickle'::pg_catalog.regnamespace
                                   AND p.proname = p_name))
            OR (p_kind = 'relation'
                AND d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                AND d.objid = pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I', p_name))))
     LIMIT 1
$$;

-- Run p_ddl (which defines pgtrickle.<p_name>) unless an extension owns that name.
CREATE OR REPLACE PROCEDURE pgtrickle._kit_define(p_kind text, p_name text, p_ddl text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_ext name := pgtrickle._kit_owner_extension(p_kind, p_name);
BEGIN
    IF v_ext IS NOT NULL THEN
        RAISE NOTICE 'pgtrickle.% belongs to extension "%": left as it is', p_name, v_ext;
    ELSE
        EXECUTE p_ddl;
    END IF;
END
$$;

-- A PostgreSQL identifier for p_full: itself when it fits in 63 bytes, else cut
-- on a character boundary and suffixed with '_' and 8 hex digits of its md5.
CREATE OR REPLACE FUNCTION pgtrickle._kit_ident(p_full text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v text;
BEGIN
    IF octet_length(p_full) <= 63 THEN
        RETURN p_full;
    END IF;
    v := left(p_full, 54);
    WHILE octet_length(v) > 54 LOOP
        v := left(v, -1);
    END LOOP;
    RETURN v || '_' || left(md5(p_full), 8);
END
$$;

REVOKE EXECUTE ON FUNCTION pgtrickle._kit_owner_extension(text, text) FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE pgtrickle._kit_define(text, text, text) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Relay catalog tables (no access for pgtrickle_relay: it uses the functions)
-- ---------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS pgtrickle.relay_outbox_config (
    name    TEXT PRIMARY KEY,
    enabled BOOLEAN NOT NULL DEFAULT true,
    config  JSONB NOT NULL
);

CREATE TABLE IF NOT EXISTS pgtrickle.relay_inbox_config (
    name    TEXT PRIMARY KEY,
    enabled BOOLEAN NOT NULL DEFAULT true,
    config  JSONB NOT NULL
);

CREATE TABLE IF NOT EXISTS pgtrickle.relay_consumer_offsets (
    relay_group_id TEXT,
    pipeline_id    TEXT,
    last_change_id BIGINT DEFAULT 0,
    worker_id      TEXT,
    updated_at     TIMESTAMPTZ DEFAULT now(),
    PRIMARY KEY (relay_group_id, pipeline_id)
);

-- Commit-horizon position for outboxes that record their writer's transaction
-- (the kit's); NULL for id-ordered outboxes. Added even when the table belongs
-- to the pg_trickle extension: it is nullable and the relay's offset functions
-- below need it.
ALTER TABLE pgtrickle.relay_consumer_offsets ADD COLUMN IF NOT EXISTS last_txid xid8;
-- The outbox table the position belongs to (a position is meaningless in
-- another outbox), and the PostgreSQL cluster whose transaction ids last_txid
-- counts (pg_control_system().system_identifier): after a dump and restore or
-- a logical-replication cutover the new cluster counts from elsewhere.
ALTER TABLE pgtrickle.relay_consumer_offsets ADD COLUMN IF NOT EXISTS outbox TEXT;
ALTER TABLE pgtrickle.relay_consumer_offsets ADD COLUMN IF NOT EXISTS system_identifier BIGINT;

-- Tell running relays which pipeline changed (they reload just that one).
CALL pgtrickle._kit_define('function', '_relay_config_notify', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._relay_config_notify()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
BEGIN
    -- A rename is a delete of the old name and an insert of the new one.
    IF TG_OP = 'UPDATE' AND OLD.name IS DISTINCT FROM NEW.name THEN
        PERFORM pg_notify('pgtrickle_relay_config', json_build_object(
            'direction', TG_ARGV[0], 'event', 'delete',
            'name', OLD.name, 'enabled', OLD.enabled)::text);
        PERFORM pg_notify('pgtrickle_relay_config', json_build_object(
            'direction', TG_ARGV[0], 'event', 'insert',
            'name', NEW.name, 'enabled', NEW.enabled)::text);
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('pgtrickle_relay_config', json_build_object(
            'direction', TG_ARGV[0], 'event', 'delete',
            'name', OLD.name, 'enabled', OLD.enabled)::text);
    ELSE
        PERFORM pg_notify('pgtrickle_relay_config', json_build_object(
            'direction', TG_ARGV[0], 'event', lower(TG_OP),
            'name', NEW.name, 'enabled', NEW.enabled)::text);
    END IF;
    RETURN NULL;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._relay_config_notify() FROM PUBLIC;
$ddl$);

CALL pgtrickle._kit_define('relation', 'relay_outbox_config', $ddl$
DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger
                    WHERE tgrelid = 'pgtrickle.relay_outbox_config'::regclass
                      AND tgname = 'pgtrickle_relay_config_notify') THEN
        CREATE TRIGGER pgtrickle_relay_config_notify
            AFTER INSERT OR UPDATE OR DELETE ON pgtrickle.relay_outbox_config
            FOR EACH ROW EXECUTE FUNCTION pgtrickle._relay_config_notify('forward');
    END IF;
END
$do$;
$ddl$);

CALL pgtrickle._kit_define('relation', 'relay_inbox_config', $ddl$
DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger
                    WHERE tgrelid = 'pgtrickle.relay_inbox_config'::regclass
                      AND tgname = 'pgtrickle_relay_config_notify') THEN
        CREATE TRIGGER pgtrickle_relay_config_notify
            AFTER INSERT OR UPDATE OR DELETE ON pgtrickle.relay_inbox_config
            FOR EACH ROW EXECUTE FUNCTION pgtrickle._relay_config_notify('reverse');
    END IF;
END
$do$;
$ddl$);

-- ---------------------------------------------------------------------------
-- Pipeline management (administrators only: no EXECUTE for PUBLIC)
-- ---------------------------------------------------------------------------

-- The table of outbox p_outbox (a stream name or an outbox table name), as
-- relay_outbox_info resolves it; p_outbox itself when it does not resolve
-- (not created yet).
CALL pgtrickle._kit_define('function', '_relay_outbox_table', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._relay_outbox_table(p_outbox TEXT)
RETURNS text
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
BEGIN
    RETURN (SELECT i.outbox_table FROM pgtrickle.relay_outbox_info(p_outbox) i);
EXCEPTION WHEN no_data_found OR undefined_table THEN
    RETURN p_outbox;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._relay_outbox_table(TEXT) FROM PUBLIC;
$ddl$);

-- Create or update a forward pipeline: outbox p_outbox -> sink p_sink.
CALL pgtrickle._kit_define('function', 'set_relay_outbox', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.set_relay_outbox(
    p_name TEXT, p_outbox TEXT, p_group TEXT, p_sink JSONB,
    p_retention_hours INT DEFAULT 24, p_enabled BOOLEAN DEFAULT true)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_config     jsonb;
    v_old_outbox text;
BEGIN
    IF p_name IS NULL OR btrim(p_name) = '' THEN
        RAISE EXCEPTION 'set_relay_outbox: p_name must be a non-empty pipeline name'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_outbox IS NULL OR btrim(p_outbox) = '' THEN
        RAISE EXCEPTION 'set_relay_outbox: p_outbox must be a non-empty outbox name (the name given to pgtrickle.enable_outbox)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_sink IS NULL OR jsonb_typeof(p_sink) <> 'object'
       OR jsonb_typeof(p_sink -> 'type') IS DISTINCT FROM 'string'
       OR btrim(p_sink ->> 'type') = '' THEN
        RAISE EXCEPTION 'set_relay_outbox: p_sink must be a JSON object with a non-empty "type" (e.g. {"type":"stdout"})'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_retention_hours IS NULL OR p_retention_hours < 0 THEN
        RAISE EXCEPTION 'set_relay_outbox: p_retention_hours must be 0 or more, got %', coalesce(p_retention_hours::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_enabled IS NULL THEN
        RAISE EXCEPTION 'set_relay_outbox: p_enabled must be true or false, not NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- One name, one direction: serialise against set_relay_inbox.
    LOCK TABLE pgtrickle.relay_outbox_config, pgtrickle.relay_inbox_config IN SHARE ROW EXCLUSIVE MODE;
    IF EXISTS (SELECT 1 FROM pgtrickle.relay_inbox_config c WHERE c.name = p_name) THEN
        RAISE EXCEPTION 'set_relay_outbox: relay pipeline "%" already exists as a reverse (inbox) pipeline; delete it first with pgtrickle.delete_relay(%)',
            p_name, quote_literal(p_name)
            USING ERRCODE = 'duplicate_object';
    END IF;

    v_config := jsonb_build_object(
        'source_type', 'outbox',
        'source', jsonb_build_object('outbox', p_outbox, 'group', p_group,
                                     'retention_hours', p_retention_hours),
        'sink_type', p_sink ->> 'type',
        'sink', p_sink);

    -- Another outbox: the pipeline starts at its beginning. A position in
    -- one outbox means nothing in another (it would skip rows).
    SELECT c.config -> 'source' ->> 'outbox' INTO v_old_outbox
      FROM pgtrickle.relay_outbox_config c WHERE c.name = p_name;
    IF v_old_outbox IS NOT NULL
       AND pgtrickle._relay_outbox_table(v_old_outbox) IS DISTINCT FROM pgtrickle._relay_outbox_table(p_outbox) THEN
        DELETE FROM pgtrickle.relay_consumer_offsets o WHERE o.pipeline_id = p_name;
    END IF;

    -- An unchanged pipeline is not rewritten, so relays are not told to restart it.
    INSERT INTO pgtrickle.relay_outbox_config AS c (name, enabled, config)
    VALUES (p_name, p_enabled, v_config)
    ON CONFLICT (name) DO UPDATE
        SET enabled = EXCLUDED.enabled, config = EXCLUDED.config
        WHERE c.enabled IS DISTINCT FROM EXCLUDED.enabled
           OR c.config IS DISTINCT FROM EXCLUDED.config;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.set_relay_outbox(TEXT, TEXT, TEXT, JSONB, INT, BOOLEAN) FROM PUBLIC;
$ddl$);

-- Create or update a reverse pipeline: source p_source -> inbox p_inbox
-- (created with pgtrickle.create_inbox when it does not exist yet).
CALL pgtrickle._kit_define('function', 'set_relay_inbox', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.set_relay_inbox(
    p_name TEXT, p_inbox TEXT, p_source JSONB,
    p_max_retries INT DEFAULT 3, p_schedule TEXT DEFAULT '1s',
    p_with_dead_letter BOOLEAN DEFAULT true, p_retention_hours INT DEFAULT 24,
    p_enabled BOOLEAN DEFAULT true)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_config jsonb;
BEGIN
    IF p_name IS NULL OR btrim(p_name) = '' THEN
        RAISE EXCEPTION 'set_relay_inbox: p_name must be a non-empty pipeline name'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_inbox IS NULL OR btrim(p_inbox) = '' THEN
        RAISE EXCEPTION 'set_relay_inbox: p_inbox must be a non-empty inbox name'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_source IS NULL OR jsonb_typeof(p_source) <> 'object'
       OR jsonb_typeof(p_source -> 'type') IS DISTINCT FROM 'string'
       OR btrim(p_source ->> 'type') = '' THEN
        RAISE EXCEPTION 'set_relay_inbox: p_source must be a JSON object with a non-empty "type" (e.g. {"type":"stdin"})'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_max_retries IS NULL OR p_max_retries < 0 THEN
        RAISE EXCEPTION 'set_relay_inbox: p_max_retries must be 0 or more, got %', coalesce(p_max_retries::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_schedule IS NULL OR btrim(p_schedule) = '' THEN
        RAISE EXCEPTION 'set_relay_inbox: p_schedule must be a non-empty schedule such as ''1s'''
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_retention_hours IS NULL OR p_retention_hours < 0 THEN
        RAISE EXCEPTION 'set_relay_inbox: p_retention_hours must be 0 or more, got %', coalesce(p_retention_hours::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_with_dead_letter IS NULL OR p_enabled IS NULL THEN
        RAISE EXCEPTION 'set_relay_inbox: p_with_dead_letter and p_enabled must be true or false, not NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- One name, one direction: serialise against set_relay_outbox.
    LOCK TABLE pgtrickle.relay_outbox_config, pgtrickle.relay_inbox_config IN SHARE ROW EXCLUSIVE MODE;
    IF EXISTS (SELECT 1 FROM pgtrickle.relay_outbox_config c WHERE c.name = p_name) THEN
        RAISE EXCEPTION 'set_relay_inbox: relay pipeline "%" already exists as a forward (outbox) pipeline; delete it first with pgtrickle.delete_relay(%)',
            p_name, quote_literal(p_name)
            USING ERRCODE = 'duplicate_object';
    END IF;

    -- The pipeline needs somewhere to write.
    IF NOT EXISTS (SELECT 1 FROM pgtrickle.pgt_inbox_config i WHERE i.inbox_name = p_inbox) THEN
        PERFORM pgtrickle.create_inbox(p_inbox, 'pgtrickle', p_max_retries, p_schedule,
                                       p_with_dead_letter, true, p_retention_hours);
    END IF;

    v_config := jsonb_build_object(
        'source_type', p_source ->> 'type',
        'source', p_source,
        'sink_type', 'pg-inbox',
        'sink', jsonb_build_object('inbox', p_inbox,
                                   'max_retries', p_max_retries,
                                   'schedule', p_schedule,
                                   'with_dead_letter', p_with_dead_letter,
                                   'retention_hours', p_retention_hours));

    INSERT INTO pgtrickle.relay_inbox_config AS c (name, enabled, config)
    VALUES (p_name, p_enabled, v_config)
    ON CONFLICT (name) DO UPDATE
        SET enabled = EXCLUDED.enabled, config = EXCLUDED.config
        WHERE c.enabled IS DISTINCT FROM EXCLUDED.enabled
           OR c.config IS DISTINCT FROM EXCLUDED.config;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.set_relay_inbox(TEXT, TEXT, JSONB, INT, TEXT, BOOLEAN, INT, BOOLEAN) FROM PUBLIC;
$ddl$);

-- Switch a pipeline (forward or reverse) on or off; raises no_data_found if unknown.
CALL pgtrickle._kit_define('function', '_relay_set_enabled', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle._relay_set_enabled(p_name TEXT, p_enabled BOOLEAN)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_found boolean := false;
BEGIN
    UPDATE pgtrickle.relay_outbox_config SET enabled = p_enabled WHERE name = p_name;
    v_found := FOUND;
    UPDATE pgtrickle.relay_inbox_config SET enabled = p_enabled WHERE name = p_name;
    IF NOT (v_found OR FOUND) THEN
        RAISE EXCEPTION 'relay pipeline "%" does not exist', p_name
            USING ERRCODE = 'no_data_found',
                  HINT = 'pgtrickle.list_relay_configs() lists the pipelines.';
    END IF;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle._relay_set_enabled(TEXT, BOOLEAN) FROM PUBLIC;
$ddl$);

-- Turn a pipeline on.
CALL pgtrickle._kit_define('function', 'enable_relay', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.enable_relay(p_name TEXT)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
BEGIN
    PERFORM pgtrickle._relay_set_enabled(p_name, true);
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.enable_relay(TEXT) FROM PUBLIC;
$ddl$);

-- Turn a pipeline off (its configuration and offsets are kept).
CALL pgtrickle._kit_define('function', 'disable_relay', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.disable_relay(p_name TEXT)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
BEGIN
    PERFORM pgtrickle._relay_set_enabled(p_name, false);
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.disable_relay(TEXT) FROM PUBLIC;
$ddl$);

-- Delete a pipeline and its committed offsets (a pipeline created again under
-- the same name starts afresh instead of resuming from an unrelated position).
CALL pgtrickle._kit_define('function', 'delete_relay', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.delete_relay(p_name TEXT)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_found boolean := false;
BEGIN
    DELETE FROM pgtrickle.relay_outbox_config WHERE name = p_name;
    v_found := FOUND;
    DELETE FROM pgtrickle.relay_inbox_config WHERE name = p_name;
    IF NOT (v_found OR FOUND) THEN
        RAISE EXCEPTION 'relay pipeline "%" does not exist', p_name
            USING ERRCODE = 'no_data_found',
                  HINT = 'pgtrickle.list_relay_configs() lists the pipelines.';
    END IF;
    DELETE FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = p_name;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.delete_relay(TEXT) FROM PUBLIC;
$ddl$);

-- ---------------------------------------------------------------------------
-- What the relay calls (EXECUTE granted to pgtrickle_relay)
-- ---------------------------------------------------------------------------

-- Every pipeline, forward then reverse, by name.
CALL pgtrickle._kit_define('function', 'list_relay_configs', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.list_relay_configs()
RETURNS TABLE(name TEXT, direction TEXT, enabled BOOLEAN, config JSONB)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
    SELECT c.name, 'forward'::text, c.enabled, c.config FROM pgtrickle.relay_outbox_config c
    UNION ALL
    SELECT c.name, 'reverse'::text, c.enabled, c.config FROM pgtrickle.relay_inbox_config c
    ORDER BY 2, 1
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.list_relay_configs() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.list_relay_configs() TO pgtrickle_relay;
$ddl$);

-- One pipeline; no row when it does not exist (e.g. it was just deleted).
CALL pgtrickle._kit_define('function', 'get_relay_config', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.get_relay_config(p_name TEXT)
RETURNS TABLE(name TEXT, direction TEXT, enabled BOOLEAN, config JSONB)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
    SELECT c.name, 'forward'::text, c.enabled, c.config FROM pgtrickle.relay_outbox_config c
     WHERE c.name = p_name
    UNION ALL
    SELECT c.name, 'reverse'::text, c.enabled, c.config FROM pgtrickle.relay_inbox_config c
     WHERE c.name = p_name
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.get_relay_config(TEXT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.get_relay_config(TEXT) TO pgtrickle_relay;
$ddl$);

-- The committed position of a forward pipeline in a relay group; no row when
-- it never committed. last_txid is xid8 as text (NULL for id-ordered outboxes).
CALL pgtrickle._kit_define('function', 'relay_get_offset', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.relay_get_offset(p_relay_group TEXT, p_pipeline TEXT)
RETURNS TABLE(last_change_id BIGINT, last_txid TEXT)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
    SELECT o.last_change_id, o.last_txid::text
      FROM pgtrickle.relay_consumer_offsets o
     WHERE o.relay_group_id = p_relay_group AND o.pipeline_id = p_pipeline
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.relay_get_offset(TEXT, TEXT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.relay_get_offset(TEXT, TEXT) TO pgtrickle_relay;
$ddl$);

-- Record a forward pipeline's position (after the sink acknowledged everything
-- before it): true when recorded. False, recording nothing, when the pipeline
-- no longer exists as a forward pipeline, or (p_config given) its configuration
-- is no longer p_config: a relay stopping a pipeline that was just deleted or
-- changed must not write its position back (a deleted pipeline would get its
-- offset again; one moved to another outbox would resume at a position of the
-- old one). p_outbox is the outbox table the position belongs to.
CALL pgtrickle._kit_define('function', 'relay_commit_offset', $ddl$
DO $drop$ BEGIN  -- an older signature; silent on a fresh install
    IF pg_catalog.to_regprocedure('pgtrickle.relay_commit_offset(text,text,bigint,text,text)') IS NOT NULL THEN
        DROP FUNCTION pgtrickle.relay_commit_offset(TEXT, TEXT, BIGINT, TEXT, TEXT);
    END IF;
END $drop$;
CREATE OR REPLACE FUNCTION pgtrickle.relay_commit_offset(
    p_relay_group TEXT, p_pipeline TEXT, p_last_change_id BIGINT,
    p_last_txid TEXT, p_worker_id TEXT, p_outbox TEXT DEFAULT NULL, p_config JSONB DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    v_config jsonb;
BEGIN
    IF p_relay_group IS NULL OR p_relay_group = '' OR p_pipeline IS NULL OR p_pipeline = '' THEN
        RAISE EXCEPTION 'relay_commit_offset: p_relay_group and p_pipeline must be non-empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_last_change_id IS NULL THEN
        RAISE EXCEPTION 'relay_commit_offset: p_last_change_id must not be NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- FOR SHARE: a concurrent delete_relay or set_relay_outbox either comes
    -- first (and this commit is refused) or waits for it (and then deletes
    -- what it wrote).
    SELECT c.config INTO v_config
      FROM pgtrickle.relay_outbox_config c WHERE c.name = p_pipeline
       FOR SHARE;
    IF NOT FOUND OR (p_config IS NOT NULL AND v_config IS DISTINCT FROM p_config) THEN
        RETURN false;
    END IF;
    INSERT INTO pgtrickle.relay_consumer_offsets AS o
           (relay_group_id, pipeline_id, last_change_id, last_txid, worker_id, updated_at,
            outbox, system_identifier)
    VALUES (p_relay_group, p_pipeline, p_last_change_id, p_last_txid::xid8, p_worker_id, now(),
            p_outbox, (SELECT s.system_identifier FROM pg_catalog.pg_control_system() s))
    ON CONFLICT (relay_group_id, pipeline_id) DO UPDATE
        SET last_change_id    = EXCLUDED.last_change_id,
            last_txid         = EXCLUDED.last_txid,
            worker_id         = EXCLUDED.worker_id,
            updated_at        = EXCLUDED.updated_at,
            outbox            = coalesce(EXCLUDED.outbox, o.outbox),
            system_identifier = EXCLUDED.system_identifier;
    RETURN true;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.relay_commit_offset(TEXT, TEXT, BIGINT, TEXT, TEXT, TEXT, JSONB) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.relay_commit_offset(TEXT, TEXT, BIGINT, TEXT, TEXT, TEXT, JSONB) TO pgtrickle_relay;
$ddl$);

-- Called by the relay before it loads a forward pipeline's position in
-- outbox table p_outbox. One row when there is something to say:
--   'rebased': this database moved to another cluster and nothing had been
--              written since; every position was rebased (see outbox_rebase);
--   'reset':   the position belonged to another outbox: deleted, the pipeline
--              starts at the beginning of p_outbox;
--   'moved':   the position counts transaction ids of another cluster (or is
--              ahead of this one's) and no rule tells which rows are new: the
--              pipeline must wait for an operator (detail says what to run).
CALL pgtrickle._kit_define('function', 'relay_check_offset', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.relay_check_offset(
    p_relay_group TEXT, p_pipeline TEXT, p_outbox TEXT)
RETURNS TABLE(action TEXT, detail TEXT)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
DECLARE
    o        pgtrickle.relay_consumer_offsets;
    v_sys    bigint := (SELECT s.system_identifier FROM pg_catalog.pg_control_system() s);
    v_next   xid8;
    v_stream text;
    v_fix    text;
    v_ahead  xid8;
BEGIN
    IF pgtrickle._outbox_cluster_sync() THEN
        action := 'rebased';
        detail := 'this database was moved to another PostgreSQL cluster (its system identifier changed) '
               || 'and nothing was written to an outbox since: every position was rebased; the last '
               || 'events before the move may be sent again, with the same dedup keys';
        RETURN NEXT;
    END IF;
    SELECT x.* INTO o FROM pgtrickle.relay_consumer_offsets x
     WHERE x.relay_group_id = p_relay_group AND x.pipeline_id = p_pipeline;
    IF FOUND AND o.outbox IS NOT NULL AND o.outbox IS DISTINCT FROM p_outbox THEN
        DELETE FROM pgtrickle.relay_consumer_offsets x
         WHERE x.relay_group_id = p_relay_group AND x.pipeline_id = p_pipeline;
        action := 'reset';
        detail := pg_catalog.format('the committed position belonged to outbox %s: starting at the beginning of outbox %s',
                                    o.outbox, p_outbox);
        RETURN NEXT;
        o := NULL;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = pg_catalog.to_regclass(pg_catalog.format('pgtrickle.%I', p_outbox))
                      AND a.attname = 'txid' AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RETURN;  -- an id-ordered outbox: transaction ids do not matter
    END IF;
    SELECT c.stream_table_name INTO v_stream FROM pgtrickle.pgt_outbox_config c
     WHERE c.outbox_table_name = p_outbox;
    v_fix := pg_catalog.format('SELECT pgtrickle.outbox_rebase(%L);', coalesce(v_stream, p_outbox));
    -- The counter and the scan in one statement, so in one snapshot: a row
    -- committed since an earlier statement is not "ahead" of an older count.
    EXECUTE pg_catalog.format(
        'SELECT n.xmax, (SELECT max(o.txid) FROM pgtrickle.%I o WHERE o.txid >= n.xmax)
           FROM (SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()) AS xmax) n',
        p_outbox)
       INTO v_next, v_ahead;
    IF v_ahead IS NOT NULL THEN
        action := 'moved';
        detail := pg_catalog.format('pipeline %I: outbox %s holds rows with transaction ids ahead of this '
                                    'PostgreSQL cluster''s next one %s (up to %s): they were written on '
                                    'another cluster and would wait for years', p_pipeline, p_outbox,
                                    v_next, v_ahead);
    ELSIF o.last_txid IS NULL THEN
        RETURN;  -- no position, or one by id only
    ELSIF o.system_identifier IS DISTINCT FROM v_sys AND o.system_identifier IS NOT NULL THEN
        action := 'moved';
        detail := pg_catalog.format('pipeline %I: its committed position (txid %s, outbox id %s) was written on another '
                         'PostgreSQL cluster (system identifier %s; this one is %s)', p_pipeline,
                         o.last_txid, o.last_change_id, o.system_identifier, v_sys);
    ELSIF o.last_txid >= v_next THEN
        action := 'moved';
        detail := pg_catalog.format('pipeline %I: its committed position (txid %s, outbox id %s) is ahead of this '
                         'PostgreSQL cluster''s next transaction id %s: the database was restored or moved '
                         'from another cluster, or the position was set by hand', p_pipeline,
                         o.last_txid, o.last_change_id, v_next);
    ELSE
        RETURN;
    END IF;
    detail := detail || '. Nothing was skipped: the pipeline waits. Check that rows written since the '
           || 'move have higher outbox ids than the rows before it (pg_dump carries the id sequence '
           || 'over; after a logical-replication cutover set it with setval), then run: ' || v_fix
           || ' (README: "Moving a database")';
    RETURN NEXT;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.relay_check_offset(TEXT, TEXT, TEXT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.relay_check_offset(TEXT, TEXT, TEXT) TO pgtrickle_relay;
$ddl$);

-- ---------------------------------------------------------------------------
-- Dead letters: events a destination refused for good
-- ---------------------------------------------------------------------------

-- One row per (pipeline, dedup_key): a replayed batch updates the row instead
-- of adding another. payload is the whole event envelope the sink was given.
CREATE TABLE IF NOT EXISTS pgtrickle.relay_dead_letters (
    id          BIGSERIAL PRIMARY KEY,
    pipeline    TEXT NOT NULL,
    dedup_key   TEXT NOT NULL,
    payload     JSONB,
    error       TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (pipeline, dedup_key)
);
-- The relay counts them for `pgtrickle-relay status`; operators read them.
GRANT SELECT ON pgtrickle.relay_dead_letters TO pgtrickle_relay;

-- Record events the sink of p_pipeline rejected permanently (arrays of equal
-- length); called by the relay in the transaction that commits the offset.
CALL pgtrickle._kit_define('function', 'relay_dead_letter', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.relay_dead_letter(
    p_pipeline TEXT, p_dedup_keys TEXT[], p_payloads TEXT[], p_errors TEXT[])
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
    INSERT INTO pgtrickle.relay_dead_letters AS d (pipeline, dedup_key, payload, error)
    SELECT p_pipeline, k, p::jsonb, e FROM unnest(p_dedup_keys, p_payloads, p_errors) AS t(k, p, e)
    ON CONFLICT (pipeline, dedup_key) DO UPDATE
        SET payload = EXCLUDED.payload, error = EXCLUDED.error, created_at = now();
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.relay_dead_letter(TEXT, TEXT[], TEXT[], TEXT[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.relay_dead_letter(TEXT, TEXT[], TEXT[], TEXT[]) TO pgtrickle_relay;
$ddl$);

-- ---------------------------------------------------------------------------
-- Positions of reverse pipelines that read another database's outbox
-- ---------------------------------------------------------------------------

-- A reverse pipeline with source "postgres" keeps its position in the remote
-- outbox in its own relay_consumer_offsets row, written in the transaction
-- that writes the events into the inbox. last_row_num: inside a claim-check
-- row (last_change_id), the last delta row written (NULL: the row is done).
-- source_id: what the position counts in, '<system identifier of the remote
-- cluster>:<outbox table>'. Both NULL for forward pipelines.
ALTER TABLE pgtrickle.relay_consumer_offsets
    ADD COLUMN IF NOT EXISTS last_row_num INT,
    ADD COLUMN IF NOT EXISTS source_id TEXT;

-- The committed position of a reverse pipeline in a relay group; no row when
-- it never committed.
CALL pgtrickle._kit_define('function', 'relay_get_source_offset', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.relay_get_source_offset(p_relay_group TEXT, p_pipeline TEXT)
RETURNS TABLE(last_change_id BIGINT, last_txid TEXT, last_row_num INT, source_id TEXT)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
    SELECT o.last_change_id, o.last_txid::text, o.last_row_num, o.source_id
      FROM pgtrickle.relay_consumer_offsets o
     WHERE o.relay_group_id = p_relay_group AND o.pipeline_id = p_pipeline
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.relay_get_source_offset(TEXT, TEXT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.relay_get_source_offset(TEXT, TEXT) TO pgtrickle_relay;
$ddl$);

-- Record a reverse pipeline's position, in the transaction that writes what
-- it read into the inbox: true when recorded. False, recording nothing, when
-- the pipeline is no longer a reverse pipeline (it was deleted while a relay
-- ran it: the caller rolls back).
CALL pgtrickle._kit_define('function', 'relay_commit_source_offset', $ddl$
CREATE OR REPLACE FUNCTION pgtrickle.relay_commit_source_offset(
    p_relay_group TEXT, p_pipeline TEXT, p_last_change_id BIGINT, p_last_txid TEXT,
    p_last_row_num INT, p_source_id TEXT, p_worker_id TEXT)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgtrickle, pg_temp
AS $fn$
BEGIN
    IF p_relay_group IS NULL OR p_relay_group = '' OR p_pipeline IS NULL OR p_pipeline = '' THEN
        RAISE EXCEPTION 'relay_commit_source_offset: p_relay_group and p_pipeline must be non-empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_last_change_id IS NULL OR p_source_id IS NULL THEN
        RAISE EXCEPTION 'relay_commit_source_offset: p_last_change_id and p_source_id must not be NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- FOR SHARE: a concurrent delete_relay either comes first (nothing is
    -- recorded) or waits for this transaction (and then deletes the row).
    PERFORM 1 FROM pgtrickle.relay_inbox_config c WHERE c.name = p_pipeline FOR SHARE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO pgtrickle.relay_consumer_offsets AS o
           (relay_group_id, pipeline_id, last_change_id, last_txid, last_row_num, source_id,
            worker_id, updated_at)
    VALUES (p_relay_group, p_pipeline, p_last_change_id, p_last_txid::xid8, p_last_row_num,
            p_source_id, p_worker_id, now())
    ON CONFLICT (relay_group_id, pipeline_id) DO UPDATE
        SET last_change_id = EXCLUDED.last_change_id,
            last_txid      = EXCLUDED.last_txid,
            last_row_num   = EXCLUDED.last_row_num,
            source_id      = EXCLUDED.source_id,
            worker_id      = EXCLUDED.worker_id,
            updated_at     = EXCLUDED.updated_at;
    RETURN true;
END
$fn$;
REVOKE EXECUTE ON FUNCTION pgtrickle.relay_commit_source_offset(TEXT, TEXT, BIGINT, TEXT, INT, TEXT, TEXT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.relay_commit_source_offset(TEXT, TEXT, BIGINT, TEXT, INT, TEXT, TEXT) TO pgtrickle_relay;
$ddl$);
