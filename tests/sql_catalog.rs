//! The relay catalog (sql/00_catalog.sql): pipeline config validation,
//! offsets, config notifications, and what the relay role and publishers
//! may and may not do.
//!
//! Every test gets its own database on the shared per-binary PostgreSQL.
//! Tests run in parallel on that one server, and the commit horizon
//! (pg_snapshot_xmin) is cluster-wide, so a test that expects rows to be
//! handed out first waits until the horizon has passed them.

mod support;

use serde_json::json;
use support::sqlcheck::*;

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
