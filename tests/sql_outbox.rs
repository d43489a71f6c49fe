//! The outbox kit (sql/10_outbox.sql): enable_outbox, publishing inline and
//! claim-check rows, relay_outbox_info, outbox_rows_consumed, retention.
//!
//! Every test gets its own database on the shared per-binary PostgreSQL.
//! Tests run in parallel on that one server, and the commit horizon
//! (pg_snapshot_xmin) is cluster-wide, so a test that expects rows to be
//! handed out first waits until the horizon has passed them.

mod support;

use postgres::Client;
use serde_json::{json, Value};
use support::sqlcheck::*;

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

    // Publishing notifies with the table name (while a relay is asleep on
    // the outbox: tests/forward_wake.rs).
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
    c.batch_execute("UNLISTEN *").unwrap();
    // No trigger on the outbox: the publish functions check the cluster and
    // notify themselves (a trigger would cost every publishing transaction).
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'pgtrickle.outbox_orders'::regclass AND NOT tgisinternal"
        ),
        0
    );
    // Rows written directly (by the table's owner) get their transaction id too.
    c.batch_execute("INSERT INTO pgtrickle.outbox_orders (payload) VALUES ('{}'), ('{}')")
        .unwrap();
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
        0
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

/// A relay killed while asleep leaves the outbox's sleep counter above 0,
/// and every writer notifies; so does a PostgreSQL crash (the sleepers
/// table is unlogged, the counter is not). `run_maintenance` recounts: a
/// counter held up by nobody alive goes back to 0, and a live sleeper
/// stays counted.
#[test]
fn maintenance_resets_sleep_counters_held_up_by_relays_that_are_gone() {
    let (pg, url, mut c) = setup("sqlt_sleepers_gone");
    c.batch_execute("SELECT pgtrickle.enable_outbox('a'), pgtrickle.enable_outbox('b');")
        .unwrap();
    let counter = |c: &mut Client, t: &str| {
        i64_of(
            c,
            &format!(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM pgtrickle.outbox_{t}_asleep"
            ),
        )
    };
    // a: a sleeper whose session is gone (no backend has pid 1), and one
    // counted by a crash that emptied the sleepers table (b).
    c.batch_execute(
        "INSERT INTO pgtrickle.outbox_sleepers (outbox_table, pid) VALUES ('outbox_a', 1);
         SELECT setval('pgtrickle.outbox_a_asleep', 1), setval('pgtrickle.outbox_b_asleep', 1);",
    )
    .unwrap();
    // And a live relay session asleep on b.
    let mut relay = pg.client(&url);
    relay
        .query_one("SELECT pgtrickle.relay_outbox_sleep('outbox_b', true)", &[])
        .unwrap();
    c.batch_execute("SELECT setval('pgtrickle.outbox_b_asleep', 2)")
        .unwrap();
    let summary = json_of(&mut c, "pgtrickle.run_maintenance()");
    assert_eq!(summary["sleep_counters_reset"], 2, "{summary}");
    assert_eq!(counter(&mut c, "a"), 0);
    assert_eq!(counter(&mut c, "b"), 1, "the live sleeper stays counted");
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.outbox_sleepers"),
        1
    );
    // Nothing to reset the second time.
    let summary = json_of(&mut c, "pgtrickle.run_maintenance()");
    assert_eq!(summary["sleep_counters_reset"], 0, "{summary}");
    drop(relay);
}
