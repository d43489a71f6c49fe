//! Idempotency keys of `outbox_publish` and `outbox_publish_delta` (the
//! third dedup layer, issue 13 item 1): a repeat with the same key in the
//! same outbox returns the first row's id and writes nothing, also when two
//! transactions race; keys last exactly as long as their rows.

mod support;

use std::sync::mpsc;
use std::time::Duration;

use postgres::Client;
use serde_json::{json, Value};
use support::sqlcheck::*;

/// `outbox_publish(outbox, {"n": n}, NULL, key)`.
fn publish_keyed(c: &mut Client, outbox: &str, n: i64, key: Option<&str>) -> i64 {
    c.query_one(
        "SELECT pgtrickle.outbox_publish($1, jsonb_build_object('n', $2::bigint), NULL, $3)",
        &[&outbox, &n, &key],
    )
    .unwrap()
    .get(0)
}

fn count(c: &mut Client, table: &str) -> i64 {
    i64_of(c, &format!("SELECT count(*) FROM pgtrickle.{table}"))
}

#[test]
fn the_same_key_twice_is_one_row_and_the_same_id() {
    let (_pg, _url, mut c) = setup("sqlk_same_key");
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('orders'); SELECT pgtrickle.enable_outbox('billing');",
    )
    .unwrap();
    let first = publish_keyed(&mut c, "orders", 1, Some("evt-1"));
    // A repeat writes nothing, whatever it carries: the first row stands.
    let again = publish_keyed(&mut c, "orders", 2, Some("evt-1"));
    assert_eq!(again, first);
    assert_eq!(count(&mut c, "outbox_orders"), 1);
    assert_eq!(
        json_of(
            &mut c,
            &format!("(SELECT payload FROM pgtrickle.outbox_orders WHERE id = {first})")
        ),
        json!({"v": 1, "inserted": [{"n": 1}], "deleted": []})
    );
    // The key is kept on the row.
    assert_eq!(
        text_of(
            &mut c,
            &format!("SELECT idempotency_key FROM pgtrickle.outbox_orders WHERE id = {first}")
        )
        .as_deref(),
        Some("evt-1")
    );
    // Within one transaction too.
    c.batch_execute("BEGIN").unwrap();
    let a = publish_keyed(&mut c, "orders", 3, Some("evt-2"));
    let b = publish_keyed(&mut c, "orders", 4, Some("evt-2"));
    c.batch_execute("COMMIT").unwrap();
    assert_eq!(a, b);
    assert_eq!(count(&mut c, "outbox_orders"), 2);

    // Keys are per outbox: the same key in another outbox is another row.
    let other = publish_keyed(&mut c, "billing", 1, Some("evt-1"));
    assert_eq!(count(&mut c, "outbox_billing"), 1);
    assert_eq!(
        publish_keyed(&mut c, "billing", 9, Some("evt-1")),
        other,
        "and a repeat there is absorbed there"
    );

    // No key: a new row every time; the old call forms still work.
    let n1 = publish_keyed(&mut c, "orders", 5, None);
    let n2 = publish_keyed(&mut c, "orders", 5, None);
    assert_ne!(n1, n2);
    let n3 = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 6}')",
    );
    let n4 = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 6}', '{\"h\": 1}')",
    );
    assert!(n3 > n2 && n4 > n3);
    assert_eq!(count(&mut c, "outbox_orders"), 6);
    // Named: headers and key.
    let named = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 7}', p_headers => '{\"h\": 2}', \
         p_idempotency_key => 'evt-3')",
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 8}', p_idempotency_key => 'evt-3')"
        ),
        named
    );
    assert_eq!(
        json_of(
            &mut c,
            &format!("(SELECT headers FROM pgtrickle.outbox_orders WHERE id = {named})")
        ),
        json!({"h": 2})
    );
}

#[test]
fn a_keyed_delta_is_written_once_with_its_claim_check_rows() {
    let (_pg, _url, mut c) = setup("sqlk_delta");
    c.batch_execute("SELECT pgtrickle.enable_outbox('orders')")
        .unwrap();
    let delta = |c: &mut Client, key: Option<&str>| -> i64 {
        c.query_one(
            "SELECT pgtrickle.outbox_publish_delta('orders', '[{\"id\":1},{\"id\":2}]', \
             '[{\"id\":0}]', false, $1)",
            &[&key],
        )
        .unwrap()
        .get(0)
    };
    let inline = delta(&mut c, Some("d-1"));
    assert_eq!(delta(&mut c, Some("d-1")), inline);
    assert_eq!(count(&mut c, "outbox_orders"), 1);
    // A claim-check: its delta rows are written once.
    c.batch_execute("SET pgtrickle.outbox_inline_threshold = 1")
        .unwrap();
    let claim = delta(&mut c, Some("d-2"));
    assert_eq!(delta(&mut c, Some("d-2")), claim);
    assert_eq!(count(&mut c, "outbox_orders"), 2);
    assert_eq!(count(&mut c, "outbox_delta_rows_orders"), 3);
    assert!(bool_of(
        &mut c,
        &format!("SELECT is_claim_check FROM pgtrickle.outbox_orders WHERE id = {claim}")
    ));
    // Without a key: a new delta each time; the old call form works.
    let a = delta(&mut c, None);
    let b = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish_delta('orders', '[{\"id\":1}]', '[]', true)",
    );
    assert!(b > a && a > claim);
    assert_eq!(count(&mut c, "outbox_delta_rows_orders"), 3 + 3);
}

/// The backend pid of `c`.
fn pid(c: &mut Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0)
}

/// Publish `key` on a second connection in a thread; returns its pid and
/// the channel its id arrives on once the call returns.
fn race(url: &str, key: &'static str) -> (i32, mpsc::Receiver<i64>) {
    let mut c = support::Pg::shared().client(url);
    let p = pid(&mut c);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let id = publish_keyed(&mut c, "orders", 2, Some(key));
        tx.send(id).unwrap();
    });
    (p, rx)
}

/// Wait until backend `pid` waits for a lock (on the first transaction's
/// index entry).
fn wait_blocked(c: &mut Client, pid: i32) {
    support::wait_until(30, "the second publish to wait for the first", || {
        c.query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)",
            &[&pid],
        )
        .unwrap()
        .get(0)
    });
}

#[test]
fn two_transactions_racing_with_one_key_give_one_row() {
    let (_pg, url, mut c) = setup("sqlk_race");
    c.batch_execute("SELECT pgtrickle.enable_outbox('orders')")
        .unwrap();
    let mut watcher = support::Pg::shared().client(&url);

    // The first commits: the second returns its id and writes nothing.
    c.batch_execute("BEGIN").unwrap();
    let first = publish_keyed(&mut c, "orders", 1, Some("race-1"));
    let (p, rx) = race(&url, "race-1");
    wait_blocked(&mut watcher, p);
    assert!(rx.try_recv().is_err(), "it waits for the first transaction");
    c.batch_execute("COMMIT").unwrap();
    let second = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(second, first);
    assert_eq!(count(&mut c, "outbox_orders"), 1);

    // The first rolls back: the second inserts.
    c.batch_execute("BEGIN").unwrap();
    let gone = publish_keyed(&mut c, "orders", 1, Some("race-2"));
    let (p, rx) = race(&url, "race-2");
    wait_blocked(&mut watcher, p);
    c.batch_execute("ROLLBACK").unwrap();
    let second = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_ne!(second, gone);
    assert_eq!(count(&mut c, "outbox_orders"), 2);
    let rows = c
        .query(
            "SELECT idempotency_key, payload->'inserted'->0->>'n' FROM pgtrickle.outbox_orders ORDER BY id",
            &[],
        )
        .unwrap();
    let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        [("race-1".into(), "1".into()), ("race-2".into(), "2".into())]
    );

    // Under REPEATABLE READ a key committed after the snapshot is a
    // serialization failure (retry), never a second row.
    let mut rr = support::Pg::shared().client(&url);
    rr.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .unwrap();
    publish_keyed(&mut c, "orders", 3, Some("race-3"));
    let e = rr
        .query_one(
            "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 4}', NULL, 'race-3')",
            &[],
        )
        .unwrap_err();
    assert_eq!(e.code().map(|s| s.code()), Some("40001"), "{e}");
    rr.batch_execute("ROLLBACK").unwrap();
    assert_eq!(count(&mut c, "outbox_orders"), 3);
}

#[test]
fn retention_removes_rows_and_with_them_their_keys() {
    let (_pg, _url, mut c) = setup("sqlk_retention");
    c.batch_execute("SELECT pgtrickle.enable_outbox('orders', 1)")
        .unwrap();
    let old = publish_keyed(&mut c, "orders", 1, Some("k-old"));
    let young = publish_keyed(&mut c, "orders", 2, Some("k-young"));
    c.execute(
        "UPDATE pgtrickle.outbox_orders SET created_at = now() - interval '2 hours' WHERE id = $1",
        &[&old],
    )
    .unwrap();
    // Nobody consumes the outbox: retention_hours alone decides.
    assert_eq!(
        i64_of(&mut c, "SELECT pgtrickle.outbox_retention('orders')"),
        1
    );
    // The young row's key still holds; the old one's went with its row.
    assert_eq!(publish_keyed(&mut c, "orders", 3, Some("k-young")), young);
    let again = publish_keyed(&mut c, "orders", 4, Some("k-old"));
    assert!(again > young);
    assert_eq!(count(&mut c, "outbox_orders"), 2);
}

#[test]
fn installing_again_upgrades_older_outboxes_and_keeps_grants() {
    let (pg, url, mut c) = setup("sqlk_upgrade");
    // An outbox made by an older kit (no key column), and publishing
    // functions of the older signatures that an application may execute.
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('orders');
         DROP VIEW pgtrickle.pgt_outbox_latest_orders;
         DROP INDEX pgtrickle.outbox_orders_idempotency_key_idx;
         ALTER TABLE pgtrickle.outbox_orders DROP COLUMN idempotency_key;
         CREATE VIEW pgtrickle.pgt_outbox_latest_orders AS
             SELECT * FROM pgtrickle.outbox_orders ORDER BY id DESC LIMIT 1;
         DROP ROLE IF EXISTS sqlk_app;
         CREATE ROLE sqlk_app;
         CREATE FUNCTION pgtrickle.outbox_publish(p_outbox TEXT, p_payload JSONB, p_headers JSONB DEFAULT NULL)
             RETURNS BIGINT LANGUAGE sql AS $$ SELECT -1::bigint $$;
         CREATE FUNCTION pgtrickle.outbox_publish_delta(p_outbox TEXT, p_inserted JSONB,
                 p_deleted JSONB DEFAULT '[]', p_full_refresh BOOLEAN DEFAULT false)
             RETURNS BIGINT LANGUAGE sql AS $$ SELECT -1::bigint $$;
         REVOKE EXECUTE ON FUNCTION pgtrickle.outbox_publish(text, jsonb, jsonb),
                                    pgtrickle.outbox_publish_delta(text, jsonb, jsonb, boolean) FROM PUBLIC;
         GRANT EXECUTE ON FUNCTION pgtrickle.outbox_publish(text, jsonb, jsonb),
                                   pgtrickle.outbox_publish_delta(text, jsonb, jsonb, boolean) TO sqlk_app;",
    )
    .unwrap();
    pg.install_sql(&url);
    let may = |c: &mut Client, f: &str| {
        bool_of(
            c,
            &format!("SELECT has_function_privilege('sqlk_app', '{f}', 'EXECUTE')"),
        )
    };
    assert!(may(
        &mut c,
        "pgtrickle.outbox_publish(text,jsonb,jsonb,text)"
    ));
    assert!(may(
        &mut c,
        "pgtrickle.outbox_publish_delta(text,jsonb,jsonb,boolean,text)"
    ));
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgtrickle'::regnamespace
                AND proname IN ('outbox_publish', 'outbox_publish_delta')"
        ),
        2,
        "the older signatures are gone"
    );
    let first = publish_keyed(&mut c, "orders", 1, Some("u-1"));
    assert!(first > 0);
    assert_eq!(publish_keyed(&mut c, "orders", 2, Some("u-1")), first);
    let v: Value = json_of(
        &mut c,
        "(SELECT jsonb_agg(payload->'inserted'->0->'n') FROM pgtrickle.outbox_orders)",
    );
    assert_eq!(v, json!([1]));
    c.batch_execute("DROP OWNED BY sqlk_app; DROP ROLE sqlk_app")
        .unwrap();
}
