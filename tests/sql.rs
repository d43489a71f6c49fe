//! The SQL under sql/: relay catalog, outbox kit, consumer groups, inbox.
//!
//! Every test gets its own database on the shared per-binary PostgreSQL.
//! Tests run in parallel on that one server, and the commit horizon
//! (pg_snapshot_xmin) is cluster-wide, so a test that expects rows to be
//! handed out first waits until the horizon has passed them.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;
use serde_json::{json, Value};
use support::sqlcheck::*;

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

fn poll(c: &mut Client, group: &str, consumer: &str, n: i32) -> Vec<i64> {
    ids(
        c,
        "SELECT outbox_id FROM pgtrickle.poll_outbox($1, $2, $3)",
        &[&group, &consumer, &n],
    )
}

fn commit(c: &mut Client, group: &str, consumer: &str, last: i64) -> bool {
    c.query_one(
        "SELECT pgtrickle.commit_offset($1, $2, $3)",
        &[&group, &consumer, &last],
    )
    .unwrap()
    .get(0)
}

fn watermark(c: &mut Client, group: &str) -> i64 {
    c.query_one(
        "SELECT committed_id FROM pgtrickle.pgt_consumer_groups WHERE group_name = $1",
        &[&group],
    )
    .unwrap()
    .get(0)
}

fn publish(c: &mut Client, outbox: &str, n: usize) -> Vec<i64> {
    (0..n)
        .map(|i| {
            let payload = json!({ "n": i }).to_string();
            c.query_one(
                "SELECT pgtrickle.outbox_publish($1, $2::text::jsonb)",
                &[&outbox, &payload],
            )
            .unwrap()
            .get(0)
        })
        .collect()
}

/// Wait until every row of `pgtrickle.<table>` is below the commit horizon
/// (other tests' transactions on this server may hold it back briefly).
fn wait_horizon(c: &mut Client, table: &str) {
    let sql = format!(
        "SELECT coalesce((SELECT max(txid) FROM pgtrickle.{table}) < pg_snapshot_xmin(pg_current_snapshot()), true)"
    );
    support::wait_until(30, "the commit horizon", || bool_of(c, &sql));
}

/// Notifications on `c`: wait for `want` of them, then make sure no more come.
fn notifications(c: &mut Client, want: usize) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < want && Instant::now() < deadline {
        let mut notes = c.notifications();
        let next = notes
            .timeout_iter(Duration::from_millis(100))
            .next()
            .unwrap();
        if let Some(n) = next {
            got.push((n.channel().to_string(), n.payload().to_string()));
        }
    }
    let mut notes = c.notifications();
    let extra = notes
        .timeout_iter(Duration::from_millis(200))
        .next()
        .unwrap();
    if let Some(n) = extra {
        panic!(
            "unexpected extra notification {} {} after {got:?}",
            n.channel(),
            n.payload()
        );
    }
    assert_eq!(got.len(), want, "notifications: {got:?}");
    got
}

fn config_note(payload: &str) -> Value {
    serde_json::from_str(payload).unwrap()
}

fn sql_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"))
}

/// 00..30 concatenated, as `pgtrickle-relay sql` prints them.
fn concatenated_sql() -> String {
    [
        "00_catalog.sql",
        "10_outbox.sql",
        "20_consumer_groups.sql",
        "30_inbox.sql",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(sql_dir().join(f)).unwrap())
    .collect::<Vec<_>>()
    .join("\n")
}

/// Pipe SQL text into psql, like `pgtrickle-relay sql | psql`.
fn psql_stdin(url: &str, sql: &str) -> (bool, String) {
    let mut child = Command::new(support::pg_bindir().join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------
// install
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// relay catalog
// ---------------------------------------------------------------------------

#[test]
fn relay_catalog_validation_errors() {
    let (_pg, _url, mut c) = setup("sqlt_validation");
    let bad_sink =
        "p_sink must be a JSON object with a non-empty \"type\" (e.g. {\"type\":\"stdout\"})";
    let cases: &[(&str, &str, &str)] = &[
        (
            "SELECT pgtrickle.set_relay_outbox(NULL, 'o', 'g', '{\"type\":\"stdout\"}')",
            "22023",
            "set_relay_outbox: p_name must be a non-empty pipeline name",
        ),
        (
            "SELECT pgtrickle.set_relay_outbox('  ', 'o', 'g', '{\"type\":\"stdout\"}')",
            "22023",
            "set_relay_outbox: p_name must be a non-empty pipeline name",
        ),
        (
            "SELECT pgtrickle.set_relay_outbox('p', '', 'g', '{\"type\":\"stdout\"}')",
            "22023",
            "set_relay_outbox: p_outbox must be a non-empty outbox name",
        ),
        (
            "SELECT pgtrickle.set_relay_outbox('p', NULL, 'g', '{\"type\":\"stdout\"}')",
            "22023",
            "p_outbox must be a non-empty",
        ),
        (
            "SELECT pgtrickle.set_relay_outbox('p', 'o', 'g', NULL)",
            "22023",
            bad_sink,
        ),
        (
            "SELECT pgtrickle.set_relay_outbox('p', 'o', 'g', '[]')",
            "22023",
            bad_sink,
        ),
        (
            "SELECT pgtrickle.set_relay_outbox('p', 'o', 'g', '{}')",
            "22023",
            bad_sink,
        ),
        (
            "SELECT pgtrickle.set_relay_outbox('p', 'o', 'g', '{\"type\":\"\"}')",
            "22023",
            bad_sink,
        ),
        (
            "SELECT pgtrickle.set_relay_outbox('p', 'o', 'g', '{\"type\":7}')",
            "22023",
            bad_sink,
        ),
        (
            "SELECT pgtrickle.set_relay_outbox('p', 'o', 'g', '{\"type\":\"nats\"}', -1)",
            "22023",
            "p_retention_hours must be 0 or more",
        ),
        (
            "SELECT pgtrickle.set_relay_outbox('p', 'o', 'g', '{\"type\":\"nats\"}', 24, NULL)",
            "22023",
            "p_enabled",
        ),
        (
            "SELECT pgtrickle.set_relay_inbox('', 'i', '{\"type\":\"stdin\"}')",
            "22023",
            "set_relay_inbox: p_name must be a non-empty pipeline name",
        ),
        (
            "SELECT pgtrickle.set_relay_inbox('r', '', '{\"type\":\"stdin\"}')",
            "22023",
            "set_relay_inbox: p_inbox must be a non-empty inbox name",
        ),
        (
            "SELECT pgtrickle.set_relay_inbox('r', 'i', NULL)",
            "22023",
            "set_relay_inbox: p_source must be a JSON object with a non-empty \"type\"",
        ),
        (
            "SELECT pgtrickle.set_relay_inbox('r', 'i', '{\"kind\":\"nats\"}')",
            "22023",
            "p_source must be a JSON object",
        ),
        (
            "SELECT pgtrickle.set_relay_inbox('r', 'i', '\"nats\"')",
            "22023",
            "p_source must be a JSON object",
        ),
        (
            "SELECT pgtrickle.set_relay_inbox('r', 'i', '{\"type\":\"nats\"}', -1)",
            "22023",
            "p_max_retries must be 0 or more",
        ),
        (
            "SELECT pgtrickle.set_relay_inbox('r', 'i', '{\"type\":\"nats\"}', 3, '')",
            "22023",
            "p_schedule",
        ),
        (
            "SELECT pgtrickle.enable_relay('nope')",
            "P0002",
            "relay pipeline \"nope\" does not exist",
        ),
        (
            "SELECT pgtrickle.disable_relay('nope')",
            "P0002",
            "relay pipeline \"nope\" does not exist",
        ),
        (
            "SELECT pgtrickle.delete_relay('nope')",
            "P0002",
            "relay pipeline \"nope\" does not exist",
        ),
        (
            "SELECT pgtrickle.relay_commit_offset('', 'p', 1, NULL, 'w')",
            "22023",
            "p_relay_group and p_pipeline",
        ),
        (
            "SELECT pgtrickle.relay_commit_offset('g', 'p', NULL, NULL, 'w')",
            "22023",
            "p_last_change_id",
        ),
    ];
    for (sql, code, msg) in cases {
        assert_err(&mut c, sql, code, msg);
    }
    // Nothing was written by the refused calls.
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.list_relay_configs()"
        ),
        0
    );
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.pgt_inbox_config"),
        0
    );

    // One name, one direction.
    c.batch_execute("SELECT pgtrickle.set_relay_outbox('both', 'o', 'g', '{\"type\":\"stdout\"}')")
        .unwrap();
    assert_err(
        &mut c,
        "SELECT pgtrickle.set_relay_inbox('both', 'i', '{\"type\":\"stdin\"}')",
        "42710",
        "relay pipeline \"both\" already exists as a forward (outbox) pipeline",
    );
    c.batch_execute("SELECT pgtrickle.set_relay_inbox('rev', 'i', '{\"type\":\"stdin\"}')")
        .unwrap();
    assert_err(
        &mut c,
        "SELECT pgtrickle.set_relay_outbox('rev', 'o', 'g', '{\"type\":\"stdout\"}')",
        "42710",
        "relay pipeline \"rev\" already exists as a reverse (inbox) pipeline",
    );
}

#[test]
fn relay_catalog_configs_and_offsets() {
    let (_pg, _url, mut c) = setup("sqlt_catalog");
    c.batch_execute(
        "SELECT pgtrickle.set_relay_outbox('fwd', 'orders', 'grp', '{\"type\":\"nats\",\"url\":\"nats://x\"}', 48);
         SELECT pgtrickle.set_relay_inbox('rev', 'payments', '{\"type\":\"kafka\",\"topic\":\"t\"}', 5, '2s', false, 12, false);",
    )
    .unwrap();
    assert_eq!(
        json_of(
            &mut c,
            "(SELECT config FROM pgtrickle.get_relay_config('fwd'))"
        ),
        json!({
            "source_type": "outbox",
            "source": {"outbox": "orders", "group": "grp", "retention_hours": 48},
            "sink_type": "nats",
            "sink": {"type": "nats", "url": "nats://x"}
        })
    );
    assert_eq!(
        json_of(
            &mut c,
            "(SELECT config FROM pgtrickle.get_relay_config('rev'))"
        ),
        json!({
            "source_type": "kafka",
            "source": {"type": "kafka", "topic": "t"},
            "sink_type": "pg-inbox",
            "sink": {"inbox": "payments", "max_retries": 5, "schedule": "2s",
                     "with_dead_letter": false, "retention_hours": 12}
        })
    );
    let listed: Vec<(String, String, bool)> = c
        .query(
            "SELECT name, direction, enabled FROM pgtrickle.list_relay_configs()",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("fwd".to_string(), "forward".to_string(), true),
            ("rev".to_string(), "reverse".to_string(), false)
        ]
    );
    // set_relay_inbox created the missing inbox with its settings.
    let row = c
        .query_one(
            "SELECT inbox_schema, max_retries, schedule, with_dead_letter, with_stats, retention_hours
               FROM pgtrickle.pgt_inbox_config WHERE inbox_name = 'payments'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pgtrickle");
    assert_eq!(row.get::<_, i32>(1), 5);
    assert_eq!(row.get::<_, String>(2), "2s");
    assert!(!row.get::<_, bool>(3));
    assert!(row.get::<_, bool>(4));
    assert_eq!(row.get::<_, i32>(5), 12);
    assert!(bool_of(
        &mut c,
        "SELECT to_regclass('pgtrickle.payments') IS NOT NULL"
    ));

    c.batch_execute("SELECT pgtrickle.enable_relay('rev'); SELECT pgtrickle.disable_relay('fwd');")
        .unwrap();
    assert!(bool_of(
        &mut c,
        "SELECT enabled FROM pgtrickle.get_relay_config('rev')"
    ));
    assert!(!bool_of(
        &mut c,
        "SELECT enabled FROM pgtrickle.get_relay_config('fwd')"
    ));

    // Offsets: upsert, txid as text, no row before the first commit.
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.relay_get_offset('default', 'fwd')"
        ),
        0
    );
    c.batch_execute("SELECT pgtrickle.relay_commit_offset('default', 'fwd', 10, '1234', 'w1')")
        .unwrap();
    c.batch_execute("SELECT pgtrickle.relay_commit_offset('default', 'fwd', 12, NULL, 'w2')")
        .unwrap();
    let r = c
        .query_one(
            "SELECT * FROM pgtrickle.relay_get_offset('default', 'fwd')",
            &[],
        )
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 12);
    assert_eq!(r.get::<_, Option<String>>(1), None);

    // delete_relay removes the pipeline and its offsets; get_relay_config then returns no row.
    c.batch_execute("SELECT pgtrickle.delete_relay('fwd')")
        .unwrap();
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.get_relay_config('fwd')"
        ),
        0
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.relay_consumer_offsets"
        ),
        0
    );
}

#[test]
fn relay_config_notifications() {
    let (_pg, _url, mut c) = setup("sqlt_notify");
    c.batch_execute("LISTEN pgtrickle_relay_config").unwrap();
    let sink = "'{\"type\":\"stdout\"}'";

    c.batch_execute(&format!(
        "SELECT pgtrickle.set_relay_outbox('p1', 'orders', 'g', {sink})"
    ))
    .unwrap();
    let n = notifications(&mut c, 1);
    assert_eq!(n[0].0, "pgtrickle_relay_config");
    assert_eq!(
        config_note(&n[0].1),
        json!({"direction": "forward", "event": "insert", "name": "p1", "enabled": true})
    );

    // The same configuration again changes nothing and tells nobody.
    c.batch_execute(&format!(
        "SELECT pgtrickle.set_relay_outbox('p1', 'orders', 'g', {sink})"
    ))
    .unwrap();
    notifications(&mut c, 0);

    c.batch_execute(&format!(
        "SELECT pgtrickle.set_relay_outbox('p1', 'orders2', 'g', {sink})"
    ))
    .unwrap();
    assert_eq!(
        config_note(&notifications(&mut c, 1)[0].1),
        json!({"direction": "forward", "event": "update", "name": "p1", "enabled": true})
    );

    c.batch_execute("SELECT pgtrickle.disable_relay('p1')")
        .unwrap();
    assert_eq!(
        config_note(&notifications(&mut c, 1)[0].1),
        json!({"direction": "forward", "event": "update", "name": "p1", "enabled": false})
    );

    c.batch_execute("SELECT pgtrickle.set_relay_inbox('r1', 'inb', '{\"type\":\"stdin\"}')")
        .unwrap();
    assert_eq!(
        config_note(&notifications(&mut c, 1)[0].1),
        json!({"direction": "reverse", "event": "insert", "name": "r1", "enabled": true})
    );

    // A rename is a delete of the old name and an insert of the new one.
    c.batch_execute("UPDATE pgtrickle.relay_inbox_config SET name = 'r2' WHERE name = 'r1'")
        .unwrap();
    let n = notifications(&mut c, 2);
    assert_eq!(
        config_note(&n[0].1),
        json!({"direction": "reverse", "event": "delete", "name": "r1", "enabled": true})
    );
    assert_eq!(
        config_note(&n[1].1),
        json!({"direction": "reverse", "event": "insert", "name": "r2", "enabled": true})
    );

    c.batch_execute("SELECT pgtrickle.delete_relay('r2'); SELECT pgtrickle.delete_relay('p1');")
        .unwrap();
    let n = notifications(&mut c, 2);
    assert_eq!(
        config_note(&n[0].1),
        json!({"direction": "reverse", "event": "delete", "name": "r2", "enabled": true})
    );
    assert_eq!(
        config_note(&n[1].1),
        json!({"direction": "forward", "event": "delete", "name": "p1", "enabled": false})
    );
}

#[test]
fn relay_role_reads_through_functions_only() {
    let (pg, _url, mut c) = setup("sqlt_role");
    c.batch_execute(
        "SELECT pgtrickle.set_relay_outbox('p1', 'orders', 'g', '{\"type\":\"stdout\"}');
         SELECT pgtrickle.enable_outbox('orders');
         SELECT pgtrickle.outbox_publish('orders', '{\"id\": 1}');
         SELECT pgtrickle.create_inbox('inb');",
    )
    .unwrap();
    let mut r = relay_login(pg, &mut c, "sqlt_role", "sqlt_relay_login");

    assert_eq!(
        i64_of(
            &mut r,
            "SELECT count(*) FROM pgtrickle.list_relay_configs()"
        ),
        1
    );
    assert_eq!(
        text_of(
            &mut r,
            "SELECT direction FROM pgtrickle.get_relay_config('p1')"
        )
        .as_deref(),
        Some("forward")
    );
    assert_eq!(
        i64_of(
            &mut r,
            "SELECT count(*) FROM pgtrickle.get_relay_config('gone')"
        ),
        0
    );

    for t in [
        "relay_outbox_config",
        "relay_inbox_config",
        "relay_consumer_offsets",
    ] {
        assert_err(
            &mut r,
            &format!("SELECT * FROM pgtrickle.{t}"),
            "42501",
            "permission denied",
        );
    }
    assert_err(
        &mut r,
        "SELECT pgtrickle.set_relay_outbox('p2', 'orders', 'g', '{\"type\":\"stdout\"}')",
        "42501",
        "permission denied for function set_relay_outbox",
    );
    assert_err(
        &mut r,
        "SELECT pgtrickle.delete_relay('p1')",
        "42501",
        "permission denied",
    );
    assert_err(
        &mut r,
        "SELECT pgtrickle.enable_outbox('x')",
        "42501",
        "permission denied",
    );

    // Offsets round trip as the relay.
    r.batch_execute("SELECT pgtrickle.relay_commit_offset('default', 'p1', 41, '777', 'worker-1')")
        .unwrap();
    let row = r
        .query_one(
            "SELECT last_change_id, last_txid FROM pgtrickle.relay_get_offset('default', 'p1')",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 41);
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("777"));
    assert_eq!(
        text_of(
            &mut c,
            "SELECT worker_id FROM pgtrickle.relay_consumer_offsets"
        )
        .as_deref(),
        Some("worker-1")
    );

    // What the relay reads to forward an outbox.
    let info = r
        .query_one("SELECT * FROM pgtrickle.relay_outbox_info('orders')", &[])
        .unwrap();
    assert_eq!(info.get::<_, String>(1), "outbox_orders");
    assert_eq!(
        i64_of(&mut r, "SELECT count(*) FROM pgtrickle.outbox_orders"),
        1
    );
    assert_eq!(
        i64_of(
            &mut r,
            "SELECT count(*) FROM pgtrickle.outbox_delta_rows_orders"
        ),
        0
    );
    assert_eq!(
        i64_of(&mut r, "SELECT count(*) FROM pgtrickle.pgt_outbox_config"),
        1
    );
    r.batch_execute("SELECT pgtrickle.outbox_rows_consumed('orders', 1)")
        .unwrap();
    // ... and writes an inbox.
    r.batch_execute(
        "INSERT INTO pgtrickle.inb (event_id, payload) VALUES ('e1', '{}') ON CONFLICT (event_id) DO NOTHING",
    )
    .unwrap();
    assert_err(
        &mut r,
        "DELETE FROM pgtrickle.inb",
        "42501",
        "permission denied",
    );
    assert_err(
        &mut r,
        "INSERT INTO pgtrickle.outbox_orders (payload) VALUES ('{}')",
        "42501",
        "permission denied",
    );
}

/// Issue 9, item 1: an application role that publishes (the README's
/// grants) and is also the relay's role plants objects in its temporary
/// schema that a function running as the owner would pick up before
/// pg_catalog's: nothing of it may ever run as the owner.
#[test]
fn publishers_and_the_relay_cannot_run_code_as_the_owner() {
    let db = "sqlt_temp_traps";
    let role = "sqlt_trap_app";
    let (pg, _url, mut c) = setup(db);
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('o');
         SELECT pgtrickle.outbox_publish('o', jsonb_build_object('n', g)) FROM generate_series(1, 6) g;
         SELECT pgtrickle.create_consumer_group('g', 'o', 'earliest');
         SELECT pgtrickle.set_relay_outbox('p', 'o', NULL, '{\"type\":\"stdout\"}');",
    )
    .unwrap();
    wait_horizon(&mut c, "outbox_o");
    let t2 = text_of(
        &mut c,
        "SELECT txid::text FROM pgtrickle.outbox_o WHERE id = 2",
    )
    .unwrap();
    relay_login(pg, &mut c, db, role);
    c.batch_execute(&format!(
        "ALTER ROLE {role} NOSUPERUSER;
         GRANT EXECUTE ON FUNCTION pgtrickle.outbox_publish(text, jsonb, jsonb, text),
                                   pgtrickle.outbox_publish_delta(text, jsonb, jsonb, boolean, text) TO {role};"
    ))
    .unwrap();

    let commit = format!("SELECT pgtrickle.relay_commit_offset('default', 'p', 2, '{t2}', 'w')");
    let failures: Vec<String> = [
        "SELECT * FROM pgtrickle.list_relay_configs()",
        "SELECT * FROM pgtrickle.get_relay_config('p')",
        commit.as_str(),
        "SELECT * FROM pgtrickle.relay_get_offset('default', 'p')",
        "SELECT pgtrickle.relay_dead_letter('p', ARRAY['k1'], ARRAY['{}'], ARRAY['refused'])",
        "SELECT pgtrickle.outbox_rows_consumed('o', 1)",
        // The catalogs it reads are shadowed too: it must still see the real ones.
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pgtrickle.relay_outbox_info('o')
                             WHERE delta_table = 'outbox_delta_rows_o' AND has_txid) THEN
                 RAISE EXCEPTION 'relay_outbox_info read the temporary catalogs';
             END IF;
         END $$",
        "SELECT * FROM pgtrickle.poll_outbox('g', 'c1', 2)",
        "SELECT pgtrickle.commit_offset('g', 'c1', max(outbox_id)) FROM pgtrickle.poll_outbox('g', 'c1', 2)",
        "SELECT pgtrickle.extend_lease('g', 'c1', 30)",
        "SELECT pgtrickle.consumer_heartbeat('g', 'c1')",
        "SELECT * FROM pgtrickle.consumer_lag('g')",
        "SELECT * FROM pgtrickle._cg_outbox_stats('g')",
        "SELECT * FROM pgtrickle.pgt_consumer_status",
        "SELECT * FROM pgtrickle.pgt_consumer_group_lag",
        "SELECT * FROM pgtrickle.pgt_consumer_active_leases",
        "SELECT pgtrickle.outbox_publish('o', '{\"a\": 1}', '{\"h\": \"v\"}')",
        "SELECT pgtrickle.outbox_publish_delta('o', '[{\"a\": 1}]', '[{\"a\": 0}]')",
        "SET pgtrickle.outbox_inline_threshold = 1;
         SELECT pgtrickle.outbox_publish_delta('o', '[{\"a\": 1}, {\"a\": 2}]', NULL, true)",
    ]
    .iter()
    .filter_map(|sql| attack(pg, &mut c, db, role, sql))
    .collect();
    assert!(
        failures.is_empty(),
        "{} of the calls were exploited or failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The calls did their work.
    assert_eq!(i64_of(&mut c, "SELECT count(*) FROM pgtrickle.outbox_o"), 9);
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.outbox_delta_rows_o"),
        2
    );
    assert_eq!(watermark(&mut c, "g"), 0, "rows 1-2 are still leased");
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT last_change_id FROM pgtrickle.relay_consumer_offsets"
        ),
        2
    );
}

// ---------------------------------------------------------------------------
// outbox kit
// ---------------------------------------------------------------------------

#[test]
fn enable_outbox_creates_everything() {
    let (_pg, _url, mut c) = setup("sqlt_enable_outbox");
    assert_eq!(
        text_of(&mut c, "SELECT pgtrickle.enable_outbox('orders')").as_deref(),
        Some("outbox_orders")
    );
    for rel in [
        "outbox_orders",
        "outbox_delta_rows_orders",
        "pgt_outbox_latest_orders",
    ] {
        assert!(
            bool_of(
                &mut c,
                &format!("SELECT to_regclass('pgtrickle.{rel}') IS NOT NULL")
            ),
            "{rel} missing"
        );
        assert!(
            bool_of(
                &mut c,
                &format!(
                    "SELECT has_table_privilege('pgtrickle_relay', 'pgtrickle.{rel}', 'SELECT')"
                )
            ),
            "no SELECT for pgtrickle_relay on {rel}"
        );
    }
    let cols: Vec<String> = c
        .query(
            "SELECT attname || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = 'pgtrickle.outbox_orders'::regclass AND attnum > 0 AND NOT attisdropped
              ORDER BY attnum",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        cols,
        [
            "id bigint",
            "pgt_id uuid",
            "refresh_id uuid",
            "created_at timestamp with time zone",
            "inserted_count integer",
            "deleted_count integer",
            "is_claim_check boolean",
            "payload jsonb",
            "txid xid8",
            "headers jsonb",
            "idempotency_key text"
        ]
    );
    let indexes: Vec<String> = c
        .query(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'pgtrickle' AND tablename = 'outbox_orders'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        indexes.iter().any(|d| d.ends_with("(created_at)")),
        "{indexes:?}"
    );
    assert!(
        indexes.iter().any(|d| d.ends_with("(txid, id)")),
        "{indexes:?}"
    );
    let fk = text_of(
        &mut c,
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint
          WHERE conrelid = 'pgtrickle.outbox_delta_rows_orders'::regclass AND contype = 'f'",
    )
    .unwrap();
    assert!(
        fk.contains("REFERENCES pgtrickle.outbox_orders(id) ON DELETE CASCADE"),
        "{fk}"
    );

    // The notify trigger fires once per statement with the table name
    // (while a relay is asleep on the outbox: tests/forward_wake.rs).
    c.batch_execute("SELECT pgtrickle.relay_outbox_sleep('outbox_orders', true)")
        .unwrap();
    c.batch_execute("LISTEN pgtrickle_outbox_new").unwrap();
    c.batch_execute("SELECT pgtrickle.outbox_publish('orders', '{\"id\": 1}')")
        .unwrap();
    let n = notifications(&mut c, 1);
    assert_eq!(
        n[0],
        (
            "pgtrickle_outbox_new".to_string(),
            "outbox_orders".to_string()
        )
    );
    c.batch_execute("INSERT INTO pgtrickle.outbox_orders (payload) VALUES ('{}'), ('{}')")
        .unwrap();
    notifications(&mut c, 1);
    c.batch_execute("UNLISTEN *").unwrap();
    // Application rows written directly get their transaction id too.
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.outbox_orders WHERE txid IS NOT NULL"
        ),
        3
    );
    assert_eq!(
        i64_of(&mut c, "SELECT id FROM pgtrickle.pgt_outbox_latest_orders"),
        3
    );

    // Idempotent: a second call updates the retention only.
    c.batch_execute("SELECT pgtrickle.enable_outbox('orders', 72)")
        .unwrap();
    assert_eq!(
        i64_of(&mut c, "SELECT retention_hours::bigint FROM pgtrickle.pgt_outbox_config WHERE stream_table_name = 'orders'"),
        72
    );
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.outbox_orders"),
        3
    );
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'pgtrickle.outbox_orders'::regclass AND NOT tgisinternal"),
        2
    );

    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_outbox('')",
        "22023",
        "enable_outbox: p_name must be a non-empty outbox name",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_outbox('x', -1)",
        "22023",
        "p_retention_hours",
    );
    c.batch_execute("CREATE TABLE pgtrickle.outbox_taken (x int)")
        .unwrap();
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_outbox('taken')",
        "42P07",
        "pgtrickle.outbox_taken already exists",
    );

    // Odd names are quoted, not interpolated.
    assert_eq!(
        text_of(
            &mut c,
            "SELECT pgtrickle.enable_outbox('Weird Name\"; DROP TABLE x; --')"
        )
        .as_deref(),
        Some("outbox_Weird Name\"; DROP TABLE x; --")
    );
    c.batch_execute("SELECT pgtrickle.outbox_publish('Weird Name\"; DROP TABLE x; --', '{}')")
        .unwrap();

    // disable_outbox drops it all; a missing outbox is an error unless p_if_exists.
    c.batch_execute("SELECT pgtrickle.create_consumer_group('g', 'orders', 'earliest')")
        .unwrap();
    c.batch_execute("SELECT pgtrickle.disable_outbox('orders')")
        .unwrap();
    for rel in [
        "outbox_orders",
        "outbox_delta_rows_orders",
        "pgt_outbox_latest_orders",
    ] {
        assert!(bool_of(
            &mut c,
            &format!("SELECT to_regclass('pgtrickle.{rel}') IS NULL")
        ));
    }
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.pgt_consumer_groups"),
        0
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.disable_outbox('orders')",
        "P0002",
        "outbox \"orders\" does not exist",
    );
    c.batch_execute("SELECT pgtrickle.disable_outbox('orders', true)")
        .unwrap();
}

#[test]
fn long_outbox_names_are_truncated_with_a_hash() {
    let (_pg, _url, mut c) = setup("sqlt_long_names");
    let long = "a".repeat(80);
    let table = text_of(&mut c, &format!("SELECT pgtrickle.enable_outbox('{long}')")).unwrap();
    assert_eq!(table.len(), 63, "{table}");
    assert!(table.starts_with("outbox_aaaa"), "{table}");
    let suffix = &table[54..];
    assert!(
        suffix.starts_with('_') && suffix[1..].chars().all(|ch| ch.is_ascii_hexdigit()),
        "{table}"
    );
    assert_eq!(
        text_of(&mut c, &format!("SELECT outbox_table_name FROM pgtrickle.pgt_outbox_config WHERE stream_table_name = '{long}'"))
            .as_deref(),
        Some(table.as_str())
    );
    // Another long name with the same first 54 bytes gets another table.
    let long2 = format!("{}b", "a".repeat(79));
    let table2 = text_of(
        &mut c,
        &format!("SELECT pgtrickle.enable_outbox('{long2}')"),
    )
    .unwrap();
    assert_ne!(table, table2);

    // The delta table and the view follow the same rule; the relay finds them.
    let info = c
        .query_one("SELECT * FROM pgtrickle.relay_outbox_info($1)", &[&long])
        .unwrap();
    assert_eq!(info.get::<_, String>(0), long);
    assert_eq!(info.get::<_, String>(1), table);
    let delta: String = info.get(2);
    assert!(
        delta.starts_with("outbox_delta_rows_aaa") && delta.len() == 63,
        "{delta}"
    );
    assert!(info.get::<_, bool>(3));
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pg_class WHERE relnamespace = 'pgtrickle'::regnamespace AND relname LIKE 'pgt_outbox_latest_aaa%' AND length(relname) = 63"),
        2
    );
    c.batch_execute("SET pgtrickle.outbox_inline_threshold = 0")
        .unwrap();
    c.query_one(
        "SELECT pgtrickle.outbox_publish_delta($1, '[{\"a\":1}]')",
        &[&long],
    )
    .unwrap();
    assert_eq!(
        i64_of(
            &mut c,
            &format!("SELECT count(*) FROM pgtrickle.\"{delta}\"")
        ),
        1
    );

    // Multi-byte names are cut on a character boundary.
    let wide = "é".repeat(40); // 80 bytes
    let t = text_of(&mut c, &format!("SELECT pgtrickle.enable_outbox('{wide}')")).unwrap();
    assert!(t.len() <= 63 && t.starts_with("outbox_éé"), "{t}");

    c.batch_execute(&format!("SELECT pgtrickle.disable_outbox('{long}')"))
        .unwrap();
    assert_eq!(
        i64_of(
            &mut c,
            &format!("SELECT count(*) FROM pg_class WHERE relname IN ('{table}', '{delta}')")
        ),
        0
    );
}

#[test]
fn relay_outbox_info_resolution() {
    let (_pg, _url, mut c) = setup("sqlt_outbox_info");
    c.batch_execute("SELECT pgtrickle.enable_outbox('orders')")
        .unwrap();
    for name in ["orders", "outbox_orders"] {
        let r = c
            .query_one("SELECT * FROM pgtrickle.relay_outbox_info($1)", &[&name])
            .unwrap();
        assert_eq!(r.get::<_, String>(0), "orders");
        assert_eq!(r.get::<_, String>(1), "outbox_orders");
        assert_eq!(
            r.get::<_, Option<String>>(2).as_deref(),
            Some("outbox_delta_rows_orders")
        );
        assert!(r.get::<_, bool>(3));
    }
    // An outbox table without a catalog row (e.g. made by hand, pg_trickle style, no txid).
    c.batch_execute(
        "CREATE TABLE pgtrickle.outbox_legacy (id BIGSERIAL PRIMARY KEY, payload JSONB);",
    )
    .unwrap();
    for name in ["legacy", "outbox_legacy"] {
        let r = c
            .query_one("SELECT * FROM pgtrickle.relay_outbox_info($1)", &[&name])
            .unwrap();
        assert_eq!(r.get::<_, String>(0), "legacy");
        assert_eq!(r.get::<_, String>(1), "outbox_legacy");
        assert_eq!(r.get::<_, Option<String>>(2), None);
        assert!(!r.get::<_, bool>(3));
    }
    assert_err(
        &mut c,
        "SELECT * FROM pgtrickle.relay_outbox_info('nothing')",
        "P0002",
        "outbox \"nothing\" not found: no pgtrickle.pgt_outbox_config row and no table pgtrickle.outbox_nothing (create it with pgtrickle.enable_outbox('nothing'))",
    );
}

#[test]
fn publish_inline_and_claim_check() {
    let (_pg, _url, mut c) = setup("sqlt_publish");
    c.batch_execute("SELECT pgtrickle.enable_outbox('orders')")
        .unwrap();

    let id = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish('orders', '{\"id\": 1}', '{\"trace\": \"t1\"}')",
    );
    let row = c
        .query_one(
            "SELECT payload::text, inserted_count, deleted_count, is_claim_check, refresh_id IS NOT NULL, headers::text
               FROM pgtrickle.outbox_orders WHERE id = $1",
            &[&id],
        )
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&row.get::<_, String>(0)).unwrap(),
        json!({"v": 1, "inserted": [{"id": 1}], "deleted": []})
    );
    assert_eq!((row.get::<_, i32>(1), row.get::<_, i32>(2)), (1, 0));
    assert!(!row.get::<_, bool>(3));
    assert!(row.get::<_, bool>(4));
    assert_eq!(
        serde_json::from_str::<Value>(&row.get::<_, String>(5)).unwrap(),
        json!({"trace": "t1"})
    );

    // At the threshold: inline. One more row: claim-check.
    c.batch_execute("SET pgtrickle.outbox_inline_threshold = 3")
        .unwrap();
    let inline = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish_delta('orders', '[{\"id\":2},{\"id\":3}]', '[{\"id\":1}]')",
    );
    assert_eq!(
        json_of(
            &mut c,
            &format!("(SELECT payload FROM pgtrickle.outbox_orders WHERE id = {inline})")
        ),
        json!({"v": 1, "inserted": [{"id": 2}, {"id": 3}], "deleted": [{"id": 1}]})
    );
    let claim = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish_delta('orders', '[{\"id\":4},{\"id\":5}]', '[{\"id\":2},{\"id\":3}]', true)",
    );
    let row = c
        .query_one(
            "SELECT payload::text, is_claim_check, refresh_id::text, inserted_count, deleted_count
               FROM pgtrickle.outbox_orders WHERE id = $1",
            &[&claim],
        )
        .unwrap();
    let refresh: String = row.get(2);
    assert_eq!(
        serde_json::from_str::<Value>(&row.get::<_, String>(0)).unwrap(),
        json!({"v": 1, "claim_check": true, "inserted_count": 2, "deleted_count": 2,
               "refresh_id": refresh, "full_refresh": true})
    );
    assert!(row.get::<_, bool>(1));
    assert_eq!((row.get::<_, i32>(3), row.get::<_, i32>(4)), (2, 2));
    // Deletes first, then inserts, numbered from 0.
    let delta: Vec<(i32, String, String)> = c
        .query(
            "SELECT row_num, op::text, payload::text FROM pgtrickle.outbox_delta_rows_orders
              WHERE outbox_id = $1 ORDER BY row_num",
            &[&claim],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        delta,
        vec![
            (0, "D".into(), "{\"id\": 2}".into()),
            (1, "D".into(), "{\"id\": 3}".into()),
            (2, "I".into(), "{\"id\": 4}".into()),
            (3, "I".into(), "{\"id\": 5}".into()),
        ]
    );
    // Inline rows have no delta rows; full_refresh on an inline payload.
    let full = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish_delta('orders', '[]', NULL, true)",
    );
    assert_eq!(
        json_of(
            &mut c,
            &format!("(SELECT payload FROM pgtrickle.outbox_orders WHERE id = {full})")
        ),
        json!({"v": 1, "inserted": [], "deleted": [], "full_refresh": true})
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.outbox_delta_rows_orders"
        ),
        4
    );

    // A larger claim-check delta, set-based (and the FK still holds afterwards).
    c.batch_execute("SET pgtrickle.outbox_inline_threshold = 100")
        .unwrap();
    let big = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish_delta('orders',
             (SELECT jsonb_agg(jsonb_build_object('id', g)) FROM generate_series(1, 50000) g),
             (SELECT jsonb_agg(jsonb_build_object('id', -g)) FROM generate_series(1, 10) g))",
    );
    let r = c
        .query_one(
            "SELECT count(*), min(row_num), max(row_num), count(*) FILTER (WHERE op = 'D' AND row_num < 10)
               FROM pgtrickle.outbox_delta_rows_orders WHERE outbox_id = $1",
            &[&big],
        )
        .unwrap();
    assert_eq!(
        (
            r.get::<_, i64>(0),
            r.get::<_, i32>(1),
            r.get::<_, i32>(2),
            r.get::<_, i64>(3)
        ),
        (50010, 0, 50009, 10)
    );
    assert_eq!(
        text_of(&mut c, "SHOW session_replication_role").as_deref(),
        Some("origin"),
        "the fast path must restore session_replication_role"
    );
    assert_err(
        &mut c,
        "INSERT INTO pgtrickle.outbox_delta_rows_orders VALUES (999999, 0, 'I', '{}')",
        "23503",
        "foreign key",
    );

    // Bad input.
    c.batch_execute("RESET pgtrickle.outbox_inline_threshold")
        .unwrap();
    assert_err(&mut c, "SELECT pgtrickle.outbox_publish('nope', '{}')", "P0002", "outbox_publish: outbox \"nope\" does not exist (create it with pgtrickle.enable_outbox('nope'))");
    assert_err(
        &mut c,
        "SELECT pgtrickle.outbox_publish('orders', NULL)",
        "22023",
        "p_payload must be a JSON object",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.outbox_publish('orders', '[1]')",
        "22023",
        "p_payload must be a JSON object",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.outbox_publish('orders', '{}', '\"h\"')",
        "22023",
        "p_headers must be a JSON object",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.outbox_publish_delta('orders', '{}')",
        "22023",
        "p_inserted must be a JSON array",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.outbox_publish_delta('orders', '[]', '1')",
        "22023",
        "p_deleted must be a JSON array",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.outbox_publish_delta('nope', '[]')",
        "P0002",
        "does not exist",
    );
    c.batch_execute("SET pgtrickle.outbox_inline_threshold = 'lots'")
        .unwrap();
    assert_err(
        &mut c,
        "SELECT pgtrickle.outbox_publish_delta('orders', '[]')",
        "22023",
        "pgtrickle.outbox_inline_threshold must be a whole number",
    );
}

#[test]
fn outbox_rows_consumed_is_idempotent_and_keeps_rows() {
    let (_pg, _url, mut c) = setup("sqlt_consumed");
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('orders');
         SET pgtrickle.outbox_inline_threshold = 1;",
    )
    .unwrap();
    let id = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish_delta('orders', '[{\"a\":1},{\"a\":2}]', '[{\"a\":0}]')",
    );
    for stream in ["orders", "outbox_orders", "orders"] {
        c.execute(
            "SELECT pgtrickle.outbox_rows_consumed($1, $2)",
            &[&stream, &id],
        )
        .unwrap();
        let r = c
            .query_one(
                "SELECT last_drained_count, last_drained_at IS NOT NULL FROM pgtrickle.pgt_outbox_config",
                &[],
            )
            .unwrap();
        assert_eq!(r.get::<_, Option<i64>>(0), Some(3));
        assert!(r.get::<_, bool>(1));
    }
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.outbox_delta_rows_orders"
        ),
        3,
        "delta rows are kept for other consumers"
    );
    // Unknown rows or outboxes are no error.
    c.batch_execute("SELECT pgtrickle.outbox_rows_consumed('orders', 12345)")
        .unwrap();
    c.batch_execute("SELECT pgtrickle.outbox_rows_consumed('nobody', 1)")
        .unwrap();

    let status = json_of(&mut c, "pgtrickle.outbox_status('orders')");
    assert_eq!(status["outbox_table"], "outbox_orders");
    assert_eq!(status["row_count"], 1);
    assert_eq!(status["pending_claim_checks"], 1);
    assert_eq!(status["newest_id"], id);
    assert_eq!(status["last_drained_count"], 3);
    assert_eq!(status["retention_hours"], 24);
    assert_err(
        &mut c,
        "SELECT pgtrickle.outbox_status('nope')",
        "P0002",
        "outbox \"nope\" does not exist",
    );
}

#[test]
fn retention_keeps_what_consumers_have_not_committed() {
    let (_pg, _url, mut c) = setup("sqlt_retention");
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('ret'); SELECT pgtrickle.enable_outbox('other');",
    )
    .unwrap();
    let published = publish(&mut c, "ret", 6); // 1..6
    c.batch_execute("SET pgtrickle.outbox_inline_threshold = 1")
        .unwrap();
    let claim = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish_delta('ret', '[{\"a\":1},{\"a\":2}]')",
    );
    assert_eq!(claim, 7);
    c.batch_execute(
        "UPDATE pgtrickle.outbox_ret SET created_at = now() - interval '48 hours';
         SELECT pgtrickle.outbox_publish('ret', '{\"fresh\": true}');",
    )
    .unwrap(); // row 8 is young
    wait_horizon(&mut c, "outbox_ret");
    let txid_of = |c: &mut Client, id: i64| -> String {
        c.query_one(
            "SELECT txid::text FROM pgtrickle.outbox_ret WHERE id = $1",
            &[&id],
        )
        .unwrap()
        .get(0)
    };
    let remaining = |c: &mut Client| ids(c, "SELECT id FROM pgtrickle.outbox_ret ORDER BY id", &[]);

    // A consumer group that has committed nothing keeps everything.
    c.batch_execute("SELECT pgtrickle.create_consumer_group('g', 'ret', 'earliest')")
        .unwrap();
    assert_eq!(
        i64_of(&mut c, "SELECT pgtrickle.outbox_retention('ret')"),
        0
    );

    // It commits 1..3: those go (in batches of 1).
    assert_eq!(poll(&mut c, "g", "c1", 3), published[..3].to_vec());
    assert!(commit(&mut c, "g", "c1", 3));
    assert_eq!(
        i64_of(&mut c, "SELECT pgtrickle.outbox_retention('ret', false, 1)"),
        3
    );
    assert_eq!(remaining(&mut c), vec![4, 5, 6, 7, 8]);

    // A relay pipeline that never committed keeps everything.
    c.batch_execute(
        "SELECT pgtrickle.set_relay_outbox('pipe', 'ret', 'x', '{\"type\":\"stdout\"}')",
    )
    .unwrap();
    assert_eq!(poll(&mut c, "g", "c1", 10), vec![4, 5, 6, 7, 8]);
    assert!(commit(&mut c, "g", "c1", 8));
    assert_eq!(i64_of(&mut c, "SELECT pgtrickle.outbox_retention()"), 0);

    // Once it committed row 5 (by commit horizon), rows up to 5 go.
    let t5 = txid_of(&mut c, 5);
    c.execute(
        "SELECT pgtrickle.relay_commit_offset('default', 'pipe', 5, $1, 'w')",
        &[&t5],
    )
    .unwrap();
    // A second relay group on the same pipeline that is further behind holds rows back.
    let t4 = txid_of(&mut c, 4);
    c.execute(
        "SELECT pgtrickle.relay_commit_offset('other-group', 'pipe', 4, $1, 'w')",
        &[&t4],
    )
    .unwrap();
    assert_eq!(
        i64_of(&mut c, "SELECT pgtrickle.outbox_retention('ret')"),
        1
    );
    assert_eq!(remaining(&mut c), vec![5, 6, 7, 8]);
    let t7 = txid_of(&mut c, 7);
    c.execute(
        "SELECT pgtrickle.relay_commit_offset('other-group', 'pipe', 7, $1, 'w')",
        &[&t7],
    )
    .unwrap();
    assert_eq!(
        i64_of(&mut c, "SELECT pgtrickle.outbox_retention('ret')"),
        1
    );
    assert_eq!(remaining(&mut c), vec![6, 7, 8]);

    // Forced: everything old goes, young rows stay, claim-check rows go with their delta.
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.outbox_delta_rows_ret"
        ),
        2
    );
    assert_eq!(
        i64_of(&mut c, "SELECT pgtrickle.outbox_retention('ret', true)"),
        2
    );
    assert_eq!(remaining(&mut c), vec![8]);
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.outbox_delta_rows_ret"
        ),
        0
    );

    assert_err(
        &mut c,
        "SELECT pgtrickle.outbox_retention('nope')",
        "P0002",
        "does not exist",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.outbox_retention('ret', false, 0)",
        "22023",
        "p_batch_size",
    );
}

#[test]
fn retention_of_id_ordered_positions() {
    // A relay offset without a txid (e.g. written before the kit recorded one)
    // protects by id.
    let (_pg, _url, mut c) = setup("sqlt_retention_ids");
    c.batch_execute("SELECT pgtrickle.enable_outbox('r')")
        .unwrap();
    publish(&mut c, "r", 5);
    c.batch_execute(
        "UPDATE pgtrickle.outbox_r SET created_at = now() - interval '2 days';
         SELECT pgtrickle.set_relay_outbox('p', 'outbox_r', 'x', '{\"type\":\"stdout\"}');
         SELECT pgtrickle.relay_commit_offset('default', 'p', 2, NULL, 'w');",
    )
    .unwrap();
    assert_eq!(i64_of(&mut c, "SELECT pgtrickle.outbox_retention('r')"), 2);
    assert_eq!(i64_of(&mut c, "SELECT min(id) FROM pgtrickle.outbox_r"), 3);
}

/// Issue 9, item 12: retention of outboxes that relay pipelines read, in
/// both modes, run by the real relay: its own offset, and a consumer group
/// (where the pipeline has no offset row of its own). Rows the relay
/// delivered go; rows it has not delivered stay, however old.
#[test]
fn retention_follows_relay_pipelines_in_both_modes() {
    let (_pg, url, mut c) = setup("sqlt_retention_modes");
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('own', 1), pgtrickle.enable_outbox('grp', 1);
         SELECT pgtrickle.create_consumer_group('workers', 'grp', 'earliest');
         SELECT pgtrickle.set_relay_outbox('own-out', 'own', NULL, '{\"type\":\"stdout\"}');
         SELECT pgtrickle.set_relay_outbox('grp-out', 'outbox_grp', 'workers', '{\"type\":\"stdout\"}');",
    )
    .unwrap();
    let old = |c: &mut Client, n: usize| {
        publish(c, "own", n);
        publish(c, "grp", n);
        c.batch_execute(
            "UPDATE pgtrickle.outbox_own SET created_at = now() - interval '2 hours';
             UPDATE pgtrickle.outbox_grp SET created_at = now() - interval '2 hours';",
        )
        .unwrap();
        wait_horizon(c, "outbox_own");
        wait_horizon(c, "outbox_grp");
    };
    let remaining =
        |c: &mut Client, t: &str| ids(c, &format!("SELECT id FROM pgtrickle.{t} ORDER BY id"), &[]);
    old(&mut c, 5);
    // Nobody delivered anything yet: everything stays.
    assert_eq!(i64_of(&mut c, "SELECT pgtrickle.outbox_retention()"), 0);

    let out = support::relay(&url).arg("--once").output().unwrap();
    assert!(
        out.status.success(),
        "relay --once: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        10,
        "both pipelines delivered their 5 events"
    );
    assert_eq!(watermark(&mut c, "workers"), 5);
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = 'grp-out'"
        ),
        0,
        "a consumer-group pipeline keeps no offset of its own"
    );

    // Three more old rows each, not delivered: retention takes exactly what
    // each pipeline delivered.
    old(&mut c, 3);
    assert_eq!(
        i64_of(&mut c, "SELECT pgtrickle.outbox_retention('own')"),
        5
    );
    assert_eq!(
        i64_of(&mut c, "SELECT pgtrickle.outbox_retention('grp', false, 2)"),
        5
    );
    assert_eq!(remaining(&mut c, "outbox_own"), vec![6, 7, 8]);
    assert_eq!(remaining(&mut c, "outbox_grp"), vec![6, 7, 8]);
    assert_eq!(i64_of(&mut c, "SELECT pgtrickle.outbox_retention()"), 0);
    let summary = json_of(&mut c, "pgtrickle.run_maintenance()");
    assert_eq!(summary["outbox_rows_deleted"], 0, "{summary}");

    // Delivered too: now they go as well.
    let out = support::relay(&url).arg("--once").output().unwrap();
    assert!(out.status.success());
    let summary = json_of(&mut c, "pgtrickle.run_maintenance()");
    assert_eq!(summary["outbox_rows_deleted"], 6, "{summary}");
}

/// Whose positions retention trusts: a consumer-group pipeline is at its
/// group's watermark (an offset row it kept from before does not hold rows
/// back); a pipeline whose group belongs to another outbox, or a position
/// beyond every transaction of this database (e.g. written before a
/// dump and restore), has delivered nothing provably.
#[test]
fn retention_trusts_only_positions_of_this_outbox_and_database() {
    let (_pg, _url, mut c) = setup("sqlt_retention_trust");
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('a', 1), pgtrickle.enable_outbox('b', 1);
         SELECT pgtrickle.create_consumer_group('ga', 'a', 'earliest');
         SELECT pgtrickle.create_consumer_group('gb', 'b', 'earliest');
         SELECT pgtrickle.set_relay_outbox('pa', 'a', 'ga', '{\"type\":\"stdout\"}');",
    )
    .unwrap();
    publish(&mut c, "a", 4);
    c.batch_execute("UPDATE pgtrickle.outbox_a SET created_at = now() - interval '2 hours'")
        .unwrap();
    wait_horizon(&mut c, "outbox_a");
    // An offset row from when pa ran without its group: behind, ignored.
    c.batch_execute("SELECT pgtrickle.relay_commit_offset('default', 'pa', 0, '0', 'w')")
        .unwrap();
    assert_eq!(poll(&mut c, "ga", "c", 2), vec![1, 2]);
    assert!(commit(&mut c, "ga", "c", 2));
    assert_eq!(i64_of(&mut c, "SELECT pgtrickle.outbox_retention('a')"), 2);

    // A pipeline on a that names b's group: the relay refuses to run it, so
    // it has delivered nothing.
    c.batch_execute("SELECT pgtrickle.set_relay_outbox('pb', 'a', 'gb', '{\"type\":\"stdout\"}')")
        .unwrap();
    assert_eq!(poll(&mut c, "ga", "c", 2), vec![3, 4]);
    assert!(commit(&mut c, "ga", "c", 4));
    assert_eq!(i64_of(&mut c, "SELECT pgtrickle.outbox_retention('a')"), 0);

    // An own-offset pipeline whose position lies beyond this database's
    // transactions proves nothing either.
    c.batch_execute(
        "SELECT pgtrickle.delete_relay('pb');
         SELECT pgtrickle.set_relay_outbox('pc', 'a', NULL, '{\"type\":\"stdout\"}');
         SELECT pgtrickle.relay_commit_offset('default', 'pc', 4,
                    (pg_current_xact_id()::text::bigint + 1000000)::text, 'w');",
    )
    .unwrap();
    assert_eq!(i64_of(&mut c, "SELECT pgtrickle.outbox_retention('a')"), 0);
    // Nor does such a group watermark.
    c.batch_execute(
        "SELECT pgtrickle.delete_relay('pc');
         UPDATE pgtrickle.pgt_consumer_groups
            SET committed_txid = (pg_current_xact_id()::text::bigint + 1000000)::text::xid8
          WHERE group_name = 'ga';",
    )
    .unwrap();
    assert_eq!(i64_of(&mut c, "SELECT pgtrickle.outbox_retention('a')"), 0);
    c.batch_execute(
        "UPDATE pgtrickle.pgt_consumer_groups g
            SET committed_txid = (SELECT txid FROM pgtrickle.outbox_a WHERE id = 4)
          WHERE group_name = 'ga';",
    )
    .unwrap();
    assert_eq!(i64_of(&mut c, "SELECT pgtrickle.outbox_retention('a')"), 2);
}

// ---------------------------------------------------------------------------
// consumer groups
// ---------------------------------------------------------------------------

#[test]
fn consumer_groups_lease_disjoint_batches_and_commit_the_done_prefix() {
    let (_pg, _url, mut c) = setup("sqlt_groups");
    c.batch_execute("SELECT pgtrickle.enable_outbox('o')")
        .unwrap();
    publish(&mut c, "o", 7);
    wait_horizon(&mut c, "outbox_o");
    c.batch_execute("SELECT pgtrickle.create_consumer_group('g', 'o', 'earliest')")
        .unwrap();

    let a = poll(&mut c, "g", "c1", 2);
    let b = poll(&mut c, "g", "c2", 2);
    let a2 = poll(&mut c, "g", "c1", 2);
    assert_eq!(
        (a.clone(), b.clone(), a2.clone()),
        (vec![1, 2], vec![3, 4], vec![5, 6])
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.pgt_consumer_active_leases WHERE group_name = 'g'"
        ),
        3
    );

    // Later batches done first: the watermark waits for the first one.
    assert!(commit(&mut c, "g", "c2", 4));
    assert_eq!(watermark(&mut c, "g"), 0);
    assert!(commit(&mut c, "g", "c1", 6));
    assert_eq!(watermark(&mut c, "g"), 0);
    assert!(commit(&mut c, "g", "c1", 2));
    assert_eq!(watermark(&mut c, "g"), 6);
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.pgt_consumer_leases"),
        0
    );
    // Committing the same offset again is harmless.
    assert!(commit(&mut c, "g", "c1", 6));

    // The consumer's own offset never goes back; lag counts rows after the watermark.
    let lag: Vec<(String, i64, i64, i64, bool)> = c
        .query("SELECT consumer_id, committed_offset, max_outbox_id, lag, is_alive FROM pgtrickle.consumer_lag('g')", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        lag,
        vec![("c1".into(), 6, 7, 1, true), ("c2".into(), 4, 7, 1, true)]
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT lag FROM pgtrickle.pgt_consumer_group_lag WHERE group_name = 'g'"
        ),
        1
    );
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.pgt_consumer_status WHERE group_name = 'g' AND is_alive"),
        2
    );

    // Regression is refused.
    let b7 = poll(&mut c, "g", "c1", 5);
    assert_eq!(b7, vec![7]);
    assert!(commit(&mut c, "g", "c1", 7));
    assert!(!commit(&mut c, "g", "c1", 5));
    assert_eq!(watermark(&mut c, "g"), 7);
    assert!(poll(&mut c, "g", "c1", 5).is_empty());
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.pgt_consumer_leases"),
        0,
        "an empty poll leases nothing"
    );

    // Errors.
    assert_err(
        &mut c,
        "SELECT * FROM pgtrickle.poll_outbox('nope', 'c')",
        "P0002",
        "poll_outbox: consumer group \"nope\" does not exist",
    );
    assert_err(
        &mut c,
        "SELECT * FROM pgtrickle.poll_outbox('g', '')",
        "22023",
        "p_consumer",
    );
    assert_err(
        &mut c,
        "SELECT * FROM pgtrickle.poll_outbox('g', 'c', 0)",
        "22023",
        "p_batch_size",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.create_consumer_group('g', 'o')",
        "42710",
        "consumer group \"g\" already exists",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.create_consumer_group('g2', 'o', 'middle')",
        "22023",
        "p_auto_offset_reset must be 'earliest' or 'latest'",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.create_consumer_group('g2', 'nope')",
        "P0002",
        "outbox \"nope\" does not exist",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.commit_offset('nope', 'c', 1)",
        "P0002",
        "does not exist",
    );

    c.batch_execute("SELECT pgtrickle.drop_consumer_group('g')")
        .unwrap();
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.pgt_consumer_offsets"
        ),
        0
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.drop_consumer_group('g')",
        "P0002",
        "consumer group \"g\" does not exist",
    );
}

#[test]
fn concurrent_consumers_see_every_row_once() {
    let (pg, url, mut c) = setup("sqlt_groups_parallel");
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('o');
         SELECT pgtrickle.create_consumer_group('g', 'o', 'earliest');
         SELECT pgtrickle.outbox_publish('o', jsonb_build_object('n', g)) FROM generate_series(1, 300) g;",
    )
    .unwrap();
    wait_horizon(&mut c, "outbox_o");
    let handles: Vec<_> = (0..4)
        .map(|k| {
            let mut client = pg.client(&url);
            std::thread::spawn(move || {
                let me = format!("c{k}");
                let mut seen = Vec::new();
                loop {
                    let batch = poll(&mut client, "g", &me, 7);
                    let Some(&last) = batch.last() else { break };
                    seen.extend(&batch);
                    assert!(commit(&mut client, "g", &me, last));
                }
                seen
            })
        })
        .collect();
    let mut all: Vec<i64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort();
    assert_eq!(
        all,
        (1..=300).collect::<Vec<i64>>(),
        "every row exactly once"
    );
    assert_eq!(watermark(&mut c, "g"), 300);
}

#[test]
fn expired_lease_is_taken_over() {
    let (pg, url, mut c) = setup("sqlt_takeover");
    c.batch_execute("SELECT pgtrickle.enable_outbox('o')")
        .unwrap();
    publish(&mut c, "o", 5);
    wait_horizon(&mut c, "outbox_o");
    c.batch_execute("SELECT pgtrickle.create_consumer_group('g', 'o', 'earliest')")
        .unwrap();

    assert_eq!(poll(&mut c, "g", "c1", 2), vec![1, 2]);
    // Not expired: c2 gets the next batch.
    assert_eq!(poll(&mut c, "g", "c2", 1), vec![3]);
    assert!(commit(&mut c, "g", "c2", 3));
    // c1 "dies": its lease expires.
    c.batch_execute("UPDATE pgtrickle.pgt_consumer_leases SET lease_expires = now() - interval '1 second' WHERE consumer_id = 'c1'")
        .unwrap();
    // c2's next poll takes over exactly that range, whatever its batch size.
    assert_eq!(poll(&mut c, "g", "c2", 10), vec![1, 2]);
    // The old owner's commit is refused, with a warning.
    let (ok, out, err) = pg.psql(&url, "SELECT pgtrickle.commit_offset('g', 'c1', 2)");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "f");
    assert!(err.contains("WARNING:  commit_offset: consumer \"c1\" of group \"g\" holds no lease ending at offset 2"), "{err}");
    assert_eq!(watermark(&mut c, "g"), 0);
    assert!(commit(&mut c, "g", "c2", 2));
    assert_eq!(watermark(&mut c, "g"), 3);

    // extend_lease keeps a lease alive; heartbeat alone does not.
    assert_eq!(poll(&mut c, "g", "c1", 1), vec![4]);
    c.batch_execute(
        "UPDATE pgtrickle.pgt_consumer_leases SET lease_expires = now() + interval '1 second'",
    )
    .unwrap();
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT pgtrickle.extend_lease('g', 'c1', 600)::bigint"
        ),
        1
    );
    assert!(bool_of(
        &mut c,
        "SELECT lease_expires > now() + interval '500 seconds' FROM pgtrickle.pgt_consumer_leases"
    ));
    c.batch_execute("SELECT pgtrickle.consumer_heartbeat('g', 'c3')")
        .unwrap();
    assert!(bool_of(
        &mut c,
        "SELECT lease_expires > now() + interval '500 seconds' FROM pgtrickle.pgt_consumer_leases"
    ));
    assert!(bool_of(&mut c, "SELECT last_heartbeat_at IS NOT NULL FROM pgtrickle.pgt_consumer_offsets WHERE consumer_id = 'c3'"));
    assert_eq!(
        poll(&mut c, "g", "c2", 10),
        vec![5],
        "c1's extended lease is not taken over"
    );

    // Regression warning text.
    assert!(commit(&mut c, "g", "c1", 4));
    let (_, out, err) = pg.psql(&url, "SELECT pgtrickle.commit_offset('g', 'c1', 1)");
    assert_eq!(out.trim(), "f");
    assert!(err.contains("regression refused"), "{err}");
}

#[test]
fn seek_offset_replays_and_reset_modes() {
    let (_pg, _url, mut c) = setup("sqlt_seek");
    c.batch_execute("SELECT pgtrickle.enable_outbox('o')")
        .unwrap();
    publish(&mut c, "o", 3);
    wait_horizon(&mut c, "outbox_o");
    c.batch_execute(
        "SELECT pgtrickle.create_consumer_group('early', 'o', 'earliest');
         SELECT pgtrickle.create_consumer_group('late', 'o', 'latest');
         SELECT pgtrickle.create_consumer_group('default_reset', 'o');",
    )
    .unwrap();
    assert_eq!(
        text_of(&mut c, "SELECT auto_offset_reset FROM pgtrickle.pgt_consumer_groups WHERE group_name = 'default_reset'").as_deref(),
        Some("latest")
    );
    publish(&mut c, "o", 2); // 4, 5
    wait_horizon(&mut c, "outbox_o");
    assert_eq!(poll(&mut c, "early", "c", 10), vec![1, 2, 3, 4, 5]);
    assert_eq!(poll(&mut c, "late", "c", 10), vec![4, 5]);
    assert_eq!(poll(&mut c, "default_reset", "c", 10), vec![4, 5]);
    assert!(commit(&mut c, "early", "c", 5));

    c.batch_execute("SELECT pgtrickle.seek_offset('early', 'c', 2)")
        .unwrap();
    assert_eq!(watermark(&mut c, "early"), 2);
    assert_eq!(poll(&mut c, "early", "c", 10), vec![3, 4, 5]);
    assert!(
        commit(&mut c, "early", "c", 5),
        "after a seek the replayed batch commits"
    );
    c.batch_execute("SELECT pgtrickle.seek_offset('early', 'c', 0)")
        .unwrap();
    assert_eq!(poll(&mut c, "early", "c", 2), vec![1, 2]);
    // A seek drops outstanding leases (late's lease on 4..5 is untouched).
    c.batch_execute("SELECT pgtrickle.seek_offset('early', 'c', 4)")
        .unwrap();
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.pgt_consumer_leases WHERE group_name = 'early'"
        ),
        0
    );
    assert_eq!(poll(&mut c, "early", "c", 10), vec![5]);
    assert_err(
        &mut c,
        "SELECT pgtrickle.seek_offset('early', 'c', 999)",
        "22023",
        "outbox row 999 does not exist",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.seek_offset('early', 'c', -1)",
        "22023",
        "p_new_offset",
    );
}

#[test]
fn open_transactions_hold_back_the_horizon() {
    let (pg, url, mut c) = setup("sqlt_horizon");
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('o');
         SELECT pgtrickle.create_consumer_group('g', 'o', 'earliest');",
    )
    .unwrap();

    // Case 1: A takes id 1 and stays open; B writes id 2 and commits.
    let mut a = pg.client(&url);
    let mut b = pg.client(&url);
    let mut ta = a.transaction().unwrap();
    let id1: i64 = ta
        .query_one(
            "SELECT pgtrickle.outbox_publish('o', '{\"w\": \"A\"}')",
            &[],
        )
        .unwrap()
        .get(0);
    let id2 = i64_of(
        &mut b,
        "SELECT pgtrickle.outbox_publish('o', '{\"w\": \"B\"}')",
    );
    assert!(id1 < id2);
    // Neither A's row nor B's later one is handed out while A is open.
    for _ in 0..3 {
        assert!(poll(&mut c, "g", "c", 10).is_empty());
        std::thread::sleep(Duration::from_millis(50));
    }
    ta.commit().unwrap();
    wait_horizon(&mut c, "outbox_o");
    assert_eq!(poll(&mut c, "g", "c", 10), vec![id1, id2]);
    assert!(commit(&mut c, "g", "c", id2));

    // Case 2: B's transaction is older than A's but writes the larger id;
    // B commits while A is still open. B's row may go out first, and A's
    // smaller id must not be skipped afterwards.
    let mut tb = b.transaction().unwrap();
    tb.batch_execute("SELECT pg_current_xact_id()").unwrap();
    let mut ta = a.transaction().unwrap();
    let id3: i64 = ta
        .query_one(
            "SELECT pgtrickle.outbox_publish('o', '{\"w\": \"A2\"}')",
            &[],
        )
        .unwrap()
        .get(0);
    let id4: i64 = tb
        .query_one(
            "SELECT pgtrickle.outbox_publish('o', '{\"w\": \"B2\"}')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(id3 < id4);
    tb.commit().unwrap();
    let mut got = Vec::new();
    support::wait_until(30, "B's row below the horizon", || {
        got = poll(&mut c, "g", "c", 10);
        !got.is_empty()
    });
    assert_eq!(
        got,
        vec![id4],
        "only the committed, older transaction's row"
    );
    assert!(commit(&mut c, "g", "c", id4));
    assert!(poll(&mut c, "g", "c", 10).is_empty());
    ta.commit().unwrap();
    wait_horizon(&mut c, "outbox_o");
    assert_eq!(
        poll(&mut c, "g", "c", 10),
        vec![id3],
        "the smaller id is not skipped"
    );

    // A rolled-back row never shows up and does not block anything.
    let mut ta = a.transaction().unwrap();
    ta.batch_execute("SELECT pgtrickle.outbox_publish('o', '{\"w\": \"gone\"}')")
        .unwrap();
    ta.rollback().unwrap();
    assert!(commit(&mut c, "g", "c", id3));
    let id6 = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish('o', '{\"w\": \"after\"}')",
    );
    wait_horizon(&mut c, "outbox_o");
    assert_eq!(poll(&mut c, "g", "c", 10), vec![id6]);
}

// ---------------------------------------------------------------------------
// inbox
// ---------------------------------------------------------------------------

#[test]
fn inbox_objects_dedup_views_and_drop() {
    let (pg, _url, mut c) = setup("sqlt_inbox");
    c.batch_execute("SELECT pgtrickle.create_inbox('payments', p_max_retries => 2)")
        .unwrap();
    for rel in [
        "payments",
        "payments_pending",
        "payments_dlq",
        "payments_stats",
    ] {
        assert!(
            bool_of(
                &mut c,
                &format!("SELECT to_regclass('pgtrickle.{rel}') IS NOT NULL")
            ),
            "{rel} missing"
        );
    }
    let cols: Vec<String> = c
        .query(
            "SELECT attname || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = 'pgtrickle.payments'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        cols,
        [
            "event_id text",
            "event_type text",
            "source text",
            "aggregate_id text",
            "payload jsonb",
            "received_at timestamp with time zone",
            "processed_at timestamp with time zone",
            "error text",
            "retry_count integer",
            "trace_id text"
        ]
    );
    assert_eq!(
        text_of(&mut c, "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'pgtrickle.payments'::regclass AND contype = 'p'").as_deref(),
        Some("PRIMARY KEY (event_id)")
    );
    assert!(bool_of(
        &mut c,
        "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = 'pgtrickle' AND tablename = 'payments'
                          AND indexdef LIKE '%WHERE (processed_at IS NULL)')"
    ));
    let cfg = c
        .query_one(
            "SELECT inbox_schema, max_retries, is_managed, id_column FROM pgtrickle.pgt_inbox_config WHERE inbox_name = 'payments'",
            &[],
        )
        .unwrap();
    assert_eq!(cfg.get::<_, String>(0), "pgtrickle");
    assert_eq!(cfg.get::<_, i32>(1), 2);
    assert!(cfg.get::<_, bool>(2));
    assert_eq!(cfg.get::<_, String>(3), "event_id");

    // A second call is fine and changes nothing.
    c.batch_execute("SELECT pgtrickle.create_inbox('payments', p_max_retries => 9)")
        .unwrap();
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT max_retries::bigint FROM pgtrickle.pgt_inbox_config"
        ),
        2
    );

    // The relay inserts with ON CONFLICT DO NOTHING: one row per event.
    let mut r = relay_login(pg, &mut c, "sqlt_inbox", "sqlt_inbox_relay");
    for _ in 0..2 {
        r.batch_execute(
            "INSERT INTO pgtrickle.payments (event_id, event_type, payload) VALUES
                 ('e1', 'paid', '{}'), ('e2', 'paid', '{}'), ('e3', 'refund', '{}'), ('e4', 'paid', '{}')
             ON CONFLICT (event_id) DO NOTHING",
        )
        .unwrap();
    }
    assert_eq!(i64_of(&mut c, "SELECT count(*) FROM pgtrickle.payments"), 4);
    c.batch_execute(
        "UPDATE pgtrickle.payments SET processed_at = now() WHERE event_id = 'e1';
         UPDATE pgtrickle.payments SET retry_count = 2, error = 'boom' WHERE event_id = 'e2';
         UPDATE pgtrickle.payments SET retry_count = 1 WHERE event_id = 'e3';",
    )
    .unwrap();
    assert_eq!(
        ids(
            &mut c,
            "SELECT substr(event_id, 2)::bigint FROM pgtrickle.payments_pending ORDER BY 1",
            &[]
        ),
        vec![3, 4]
    );
    assert_eq!(
        ids(
            &mut c,
            "SELECT substr(event_id, 2)::bigint FROM pgtrickle.payments_dlq",
            &[]
        ),
        vec![2]
    );
    let stats: Vec<(String, i64, i64, i64, i64)> = c
        .query("SELECT event_type, total, pending, processed, dlq FROM pgtrickle.payments_stats ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        stats,
        vec![("paid".into(), 3, 1, 1, 1), ("refund".into(), 1, 1, 0, 0)]
    );

    // Optional views, another schema.
    c.batch_execute(
        "CREATE SCHEMA app;
         SELECT pgtrickle.create_inbox('orders_in', 'app', 3, '1s', false, false);",
    )
    .unwrap();
    assert!(bool_of(
        &mut c,
        "SELECT to_regclass('app.orders_in_pending') IS NOT NULL"
    ));
    assert!(bool_of(&mut c, "SELECT to_regclass('app.orders_in_dlq') IS NULL AND to_regclass('app.orders_in_stats') IS NULL"));
    r.batch_execute(
        "INSERT INTO app.orders_in (event_id) VALUES ('x') ON CONFLICT (event_id) DO NOTHING",
    )
    .unwrap();

    // Validation.
    assert_err(
        &mut c,
        "SELECT pgtrickle.create_inbox('')",
        "22023",
        "create_inbox: p_name must be a non-empty inbox name",
    );
    assert_err(
        &mut c,
        &format!("SELECT pgtrickle.create_inbox('{}')", "x".repeat(56)),
        "22023",
        "is too long",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.create_inbox('i', 'no_such_schema')",
        "3F000",
        "schema \"no_such_schema\" does not exist",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.create_inbox('i', p_max_retries => -1)",
        "22023",
        "p_max_retries",
    );
    c.batch_execute("CREATE TABLE pgtrickle.plain (x int)")
        .unwrap();
    assert_err(
        &mut c,
        "SELECT pgtrickle.create_inbox('plain')",
        "42P07",
        "already exists and is not an inbox",
    );

    // drop_inbox: a dependent view needs p_cascade.
    c.batch_execute(
        "CREATE VIEW public.paid AS SELECT * FROM pgtrickle.payments WHERE event_type = 'paid'",
    )
    .unwrap();
    let (code, _) = db_err(&mut c, "SELECT pgtrickle.drop_inbox('payments')");
    assert_eq!(code, "2BP01");
    assert!(
        bool_of(
            &mut c,
            "SELECT to_regclass('pgtrickle.payments_pending') IS NOT NULL"
        ),
        "a failed drop changes nothing"
    );
    c.batch_execute("SELECT pgtrickle.drop_inbox('payments', p_cascade => true)")
        .unwrap();
    for rel in [
        "pgtrickle.payments",
        "pgtrickle.payments_pending",
        "pgtrickle.payments_dlq",
        "pgtrickle.payments_stats",
        "public.paid",
    ] {
        assert!(
            bool_of(&mut c, &format!("SELECT to_regclass('{rel}') IS NULL")),
            "{rel} still there"
        );
    }
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.pgt_inbox_config WHERE inbox_name = 'payments'"
        ),
        0
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.drop_inbox('payments')",
        "P0002",
        "drop_inbox: inbox \"payments\" does not exist",
    );
    c.batch_execute("SELECT pgtrickle.drop_inbox('payments', true)")
        .unwrap();

    // An adopted (unmanaged) table keeps its table; only the views and row go.
    c.batch_execute(
        "UPDATE pgtrickle.pgt_inbox_config SET is_managed = false WHERE inbox_name = 'orders_in';
                     SELECT pgtrickle.drop_inbox('orders_in');",
    )
    .unwrap();
    assert!(bool_of(&mut c, "SELECT to_regclass('app.orders_in') IS NOT NULL AND to_regclass('app.orders_in_pending') IS NULL"));
}
