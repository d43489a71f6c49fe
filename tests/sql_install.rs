//! The install path of sql/: idempotent re-install, a silent fresh install,
//! extension members left alone, and the SECURITY DEFINER hardening every
//! function must carry (pinned search_path ending in pg_temp, qualified
//! catalogs, PUBLIC execute revoked).
//!
//! Every test gets its own database on the shared per-binary PostgreSQL.
//! Tests run in parallel on that one server, and the commit horizon
//! (pg_snapshot_xmin) is cluster-wide, so a test that expects rows to be
//! handed out first waits until the horizon has passed them.

mod support;

use std::process::Command;

use postgres::Client;
use support::sqlcheck::*;

#[test]
fn install_twice_is_harmless_and_keeps_data() {
    let (pg, url, mut c) = setup("sqlt_install");
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('orders');
         SELECT pgtrickle.outbox_publish('orders', '{\"id\": 1}');
         SELECT pgtrickle.set_relay_outbox('p1', 'orders', 'g', '{\"type\":\"stdout\"}');
         SELECT pgtrickle.create_inbox('inb');
         SELECT pgtrickle.relay_commit_offset('default', 'p1', 1, NULL, 'w');",
    )
    .unwrap();
    let count_objects =
        "SELECT count(*) FROM pg_class WHERE relnamespace = 'pgtrickle'::regnamespace";
    let count_funcs = "SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgtrickle'::regnamespace";
    let (rels, funcs) = (i64_of(&mut c, count_objects), i64_of(&mut c, count_funcs));

    // Again through install.sql, and again as the concatenated stream.
    pg.install_sql(&url);
    let (ok, stderr) = psql_stdin(&url, &concatenated_sql());
    assert!(ok, "piped install failed: {stderr}");
    assert!(!stderr.contains("ERROR"), "{stderr}");

    assert_eq!(i64_of(&mut c, count_objects), rels);
    assert_eq!(i64_of(&mut c, count_funcs), funcs);
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.outbox_orders"),
        1
    );
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.relay_outbox_config"),
        1
    );
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.pgt_inbox_config"),
        1
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT last_change_id FROM pgtrickle.relay_consumer_offsets"
        ),
        1
    );
    // Triggers are not duplicated by a reinstall.
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'pgtrickle.relay_outbox_config'::regclass AND NOT tgisinternal"
        ),
        1
    );
}

/// Issue 10, item 8: `pgtrickle-relay sql | psql` on an empty database
/// prints nothing (no "already exists, skipping" NOTICE). Installing again
/// over it (an upgrade) may say what it skipped, but fails on nothing.
#[test]
fn a_fresh_install_prints_nothing() {
    let pg = support::Pg::shared();
    let mut admin = pg.client(&pg.url("postgres"));
    admin
        .batch_execute("DROP DATABASE IF EXISTS sqlt_quiet WITH (FORCE)")
        .unwrap();
    admin.batch_execute("CREATE DATABASE sqlt_quiet").unwrap();
    let url = pg.url("sqlt_quiet");
    let out = Command::new(support::relay_bin())
        .arg("sql")
        .output()
        .unwrap();
    assert!(out.status.success());
    let sql = String::from_utf8(out.stdout).unwrap();
    let (ok, stderr) = psql_stdin(&url, &sql);
    assert!(ok, "fresh install failed: {stderr}");
    assert_eq!(stderr, "", "a fresh install printed something");
    // An older catalog gains the columns it lacks.
    pg.client(&url)
        .batch_execute(
            "ALTER TABLE pgtrickle.pgt_inbox_config DROP COLUMN table_name, DROP COLUMN dlq_retention_hours",
        )
        .unwrap();
    let (ok, stderr) = psql_stdin(&url, &sql);
    assert!(ok && !stderr.contains("ERROR"), "install again: {stderr}");
    assert_eq!(
        i64_of(
            &mut pg.client(&url),
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'pgtrickle.pgt_inbox_config'::regclass
                AND attname IN ('table_name', 'dlq_retention_hours') AND NOT attisdropped"
        ),
        2
    );
}

#[test]
fn numbered_files_have_no_psql_meta_commands() {
    for f in [
        "00_catalog.sql",
        "10_outbox.sql",
        "20_consumer_groups.sql",
        "30_inbox.sql",
    ] {
        let text = std::fs::read_to_string(sql_dir().join(f)).unwrap();
        for (i, line) in text.lines().enumerate() {
            assert!(
                !line.trim_start().starts_with('\\'),
                "{f}:{}: psql meta-command in a file that is also piped: {line}",
                i + 1
            );
        }
    }
}

#[test]
fn extension_members_are_left_alone() {
    // A real pg_trickle is not available here; any extension will do, since
    // the rule is "never replace an object that belongs to an extension".
    let (pg, url, mut c) = setup("sqlt_extension");
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION pgtrickle.list_relay_configs()
             RETURNS TABLE(name TEXT, direction TEXT, enabled BOOLEAN, config JSONB)
             LANGUAGE sql AS $$ SELECT 'from-extension'::text, 'forward'::text, true, '{}'::jsonb $$;
         ALTER EXTENSION plpgsql ADD FUNCTION pgtrickle.list_relay_configs();
         DROP VIEW pgtrickle.pgt_consumer_active_leases;
         CREATE VIEW pgtrickle.pgt_consumer_active_leases AS SELECT 'from-extension'::text AS marker;
         ALTER EXTENSION plpgsql ADD VIEW pgtrickle.pgt_consumer_active_leases;
         -- a kit function that does NOT belong to an extension is replaced
         CREATE OR REPLACE FUNCTION pgtrickle.get_relay_config(p_name TEXT)
             RETURNS TABLE(name TEXT, direction TEXT, enabled BOOLEAN, config JSONB)
             LANGUAGE sql AS $$ SELECT 'stale'::text, 'forward'::text, true, '{}'::jsonb $$;",
    )
    .unwrap();
    assert_eq!(
        text_of(
            &mut c,
            "SELECT pgtrickle._kit_owner_extension('function', 'list_relay_configs')::text"
        )
        .as_deref(),
        Some("plpgsql")
    );
    assert_eq!(
        text_of(
            &mut c,
            "SELECT pgtrickle._kit_owner_extension('relation', 'pgt_consumer_active_leases')::text"
        )
        .as_deref(),
        Some("plpgsql")
    );
    assert_eq!(
        text_of(
            &mut c,
            "SELECT pgtrickle._kit_owner_extension('function', 'get_relay_config')::text"
        ),
        None
    );

    let (ok, stderr) = psql_stdin(&url, &concatenated_sql());
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("pgtrickle.list_relay_configs belongs to extension \"plpgsql\""),
        "{stderr}"
    );
    pg.install_sql(&url);

    assert_eq!(
        text_of(&mut c, "SELECT name FROM pgtrickle.list_relay_configs()").as_deref(),
        Some("from-extension")
    );
    assert_eq!(
        text_of(
            &mut c,
            "SELECT marker FROM pgtrickle.pgt_consumer_active_leases"
        )
        .as_deref(),
        Some("from-extension")
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.get_relay_config('stale')"
        ),
        0,
        "a kit function that no extension owns is brought back to the kit's definition"
    );
}

#[test]
fn security_definer_functions_pin_search_path_and_revoke_public() {
    let (_pg, _url, mut c) = setup("sqlt_secdef");
    let rows = c
        .query(
            "SELECT p.oid::regprocedure::text, coalesce(array_to_string(p.proconfig, ';'), ''),
                    p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a
                                                 WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')
               FROM pg_proc p
              WHERE p.pronamespace = 'pgtrickle'::regnamespace AND p.prosecdef",
            &[],
        )
        .unwrap();
    assert!(
        rows.len() >= 30,
        "only {} SECURITY DEFINER functions",
        rows.len()
    );
    for r in &rows {
        let (name, config, public): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
        assert!(
            config
                .split(';')
                .any(|s| s == "search_path=pg_catalog, pgtrickle, pg_temp"),
            "{name} does not pin search_path: {config:?}"
        );
        assert!(!public, "{name} is executable by PUBLIC");
    }

    let may = |c: &mut Client, f: &str| {
        bool_of(
            c,
            &format!("SELECT has_function_privilege('pgtrickle_relay', '{f}', 'EXECUTE')"),
        )
    };
    for f in [
        "pgtrickle.list_relay_configs()",
        "pgtrickle.get_relay_config(text)",
        "pgtrickle.relay_get_offset(text,text)",
        "pgtrickle.relay_commit_offset(text,text,bigint,text,text,text,jsonb)",
        "pgtrickle.relay_check_offset(text,text,text)",
        "pgtrickle.outbox_rows_consumed(text,bigint)",
        "pgtrickle.relay_outbox_info(text)",
        "pgtrickle.poll_outbox(text,text,integer,integer)",
        "pgtrickle.commit_offset(text,text,bigint)",
        "pgtrickle.extend_lease(text,text,integer)",
        "pgtrickle.consumer_heartbeat(text,text)",
        "pgtrickle.consumer_lag(text)",
    ] {
        assert!(may(&mut c, f), "pgtrickle_relay may not execute {f}");
    }
    for f in [
        "pgtrickle.set_relay_outbox(text,text,text,jsonb,integer,boolean)",
        "pgtrickle.set_relay_inbox(text,text,jsonb,integer,text,boolean,integer,boolean)",
        "pgtrickle.enable_relay(text)",
        "pgtrickle.disable_relay(text)",
        "pgtrickle.delete_relay(text)",
        "pgtrickle.enable_outbox(text,integer,boolean)",
        "pgtrickle.outbox_rebase(text)",
        "pgtrickle.disable_outbox(text,boolean)",
        "pgtrickle.outbox_publish(text,jsonb,jsonb,text)",
        "pgtrickle.outbox_retention(text,boolean,integer)",
        "pgtrickle.create_inbox(text,text,integer,text,boolean,boolean,integer)",
        "pgtrickle.seek_offset(text,text,bigint)",
    ] {
        assert!(
            !may(&mut c, f),
            "pgtrickle_relay may execute admin function {f}"
        );
    }
    for t in [
        "relay_outbox_config",
        "relay_inbox_config",
        "relay_consumer_offsets",
    ] {
        assert!(
            !bool_of(
                &mut c,
                &format!(
                    "SELECT has_table_privilege('pgtrickle_relay', 'pgtrickle.{t}', 'SELECT')"
                )
            ),
            "pgtrickle_relay can read {t}"
        );
    }
    for t in [
        "pgt_outbox_config",
        "pgt_consumer_groups",
        "pgt_inbox_config",
    ] {
        assert!(bool_of(
            &mut c,
            &format!("SELECT has_table_privilege('pgtrickle_relay', 'pgtrickle.{t}', 'SELECT')")
        ));
    }
}

/// Issue 9, item 1: PostgreSQL searches pg_temp *first* for relations and
/// types unless search_path names it, so every function of the kit that
/// pins a search_path (every SECURITY DEFINER one must) names pg_temp last,
/// and the SQL names the catalogs it reads with pg_catalog.
#[test]
fn pinned_search_paths_end_with_pg_temp_and_catalogs_are_qualified() {
    let (_pg, _url, mut c) = setup("sqlt_pg_temp_last");
    let rows = c
        .query(
            "SELECT p.oid::pg_catalog.regprocedure::text, p.prosecdef,
                    (SELECT substr(s, 13) FROM unnest(p.proconfig) s WHERE s LIKE 'search_path=%')
               FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'pgtrickle'::pg_catalog.regnamespace",
            &[],
        )
        .unwrap();
    let mut bad = Vec::new();
    let mut secdef = 0;
    for r in &rows {
        let (name, definer, path): (String, bool, Option<String>) = (r.get(0), r.get(1), r.get(2));
        secdef += usize::from(definer);
        match path {
            None if definer => bad.push(format!("{name}: SECURITY DEFINER without a search_path")),
            None => {}
            Some(p) if p.split(',').map(str::trim).next_back() != Some("pg_temp") => bad.push(
                format!("{name}: search_path {p:?} does not end with pg_temp"),
            ),
            Some(_) => {}
        }
    }
    assert!(secdef >= 30, "only {secdef} SECURITY DEFINER functions");
    assert!(bad.is_empty(), "{}", bad.join("\n"));

    // Every relation of pg_catalog the SQL names is written pg_catalog.<name>.
    let catalogs: Vec<String> = c
        .query(
            "SELECT relname::text FROM pg_catalog.pg_class
              WHERE relnamespace = 'pg_catalog'::pg_catalog.regnamespace AND relkind IN ('r', 'v')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for entry in std::fs::read_dir(sql_dir()).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("--").next().unwrap();
            let bytes = code.as_bytes();
            for (at, _) in code.match_indices("pg_") {
                let word: String = code[at..]
                    .chars()
                    .take_while(|ch| ch.is_ascii_alphanumeric() || *ch == '_')
                    .collect();
                let starts_word =
                    at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
                if starts_word && catalogs.contains(&word) && !code[..at].ends_with("pg_catalog.") {
                    bad.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(bad.is_empty(), "unqualified catalogs:\n{}", bad.join("\n"));
}
