//! Forward to a remote PostgreSQL inbox end to end: outbox → relay binary
//! → an inbox made with `pgtrickle.create_inbox` in another database.
#![cfg(feature = "pg-inbox")]

mod support;

use std::time::{Duration, Instant};

use support::*;

/// An inbox `events` in a new database of `pg`; returns its URL.
fn inbox_db(pg: &Pg, db: &str) -> String {
    let url = pg.new_db(db);
    pg.client(&url)
        .batch_execute("SELECT pgtrickle.create_inbox('events')")
        .unwrap();
    url
}

/// A database with outbox `orders` and pipeline `fwd` to the inbox at
/// `inbox_url` (with extra sink keys).
fn setup(db: &str, inbox_url: &str, extra: serde_json::Value) -> String {
    let mut sink = serde_json::json!({"type": "pg-inbox", "url": inbox_url, "inbox": "events"});
    for (k, v) in extra.as_object().unwrap() {
        sink[k] = v.clone();
    }
    outbox_pipeline(db, &sink)
}

/// Rows in the inbox (0 while its server is down).
fn count(inbox_url: &str) -> i64 {
    match postgres::Client::connect(inbox_url, postgres::NoTls) {
        Ok(mut c) => c
            .query_one("SELECT count(*) FROM pgtrickle.events", &[])
            .map(|r| r.get(0))
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// The `n` of every inbox row, by outbox id.
fn ns(inbox_url: &str) -> Vec<i64> {
    postgres::Client::connect(inbox_url, postgres::NoTls)
        .unwrap()
        .query(
            "SELECT (payload->>'n')::bigint FROM pgtrickle.events \
             ORDER BY split_part(event_id, ':', 2)::bigint, split_part(event_id, ':', 3)::int",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn ten_thousand_events_arrive_in_order_as_inbox_rows() {
    let pg = Pg::shared();
    let inbox = inbox_db(pg, "pginbox_order_in");
    let url = setup(
        "pginbox_order",
        &inbox,
        serde_json::json!({"schema": "pgtrickle"}),
    );
    publish(&url, 0, 10_000);
    let mut relay_proc = Relay::spawn(&mut relay(&url));
    wait_until(60, "10,000 inbox rows", || count(&inbox) >= 10_000);
    assert_eq!(ns(&inbox), (0..10_000).collect::<Vec<_>>());
    let mut c = pg.client(&inbox);
    let row = c
        .query_one(
            "SELECT event_id, event_type, source, payload::text, processed_at IS NULL \
             FROM pgtrickle.events WHERE event_id = 'outbox_orders:1:0'",
            &[],
        )
        .unwrap();
    let (id, ty, src, payload, pending): (String, String, String, String, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(
        (
            id.as_str(),
            ty.as_str(),
            src.as_str(),
            payload.as_str(),
            pending
        ),
        (
            "outbox_orders:1:0",
            "pgtrickle.orders.insert",
            "outbox_orders",
            r#"{"n": 0}"#,
            true
        )
    );
    // In order: batches are committed one after another, so received_at
    // never goes backwards along the outbox order.
    let backwards: i64 = c
        .query_one(
            "SELECT count(*) FROM (SELECT received_at < lag(received_at) OVER \
               (ORDER BY split_part(event_id, ':', 2)::bigint) AS back FROM pgtrickle.events) t \
             WHERE back",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(backwards, 0);
    relay_proc.signal(libc::SIGTERM);
    assert_eq!(relay_proc.wait_exit(10), Some(0));
    // A full replay adds nothing.
    pg.client(&url)
        .execute("DELETE FROM pgtrickle.relay_consumer_offsets", &[])
        .unwrap();
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count(&inbox), 10_000);
}

#[test]
fn sigkill_mid_stream_then_restart_delivers_every_event_once() {
    let inbox = inbox_db(Pg::shared(), "pginbox_kill_in");
    let url = setup(
        "pginbox_kill",
        &inbox,
        serde_json::json!({"batch_size": 100}),
    );
    publish(&url, 0, 30_000);
    let r = Relay::spawn(&mut relay(&url));
    wait_until(30, "some rows", || count(&inbox) > 2_000);
    r.signal(libc::SIGKILL);
    drop(r);
    assert!(
        count(&inbox) < 30_000,
        "the kill came too late to test anything"
    );
    publish(&url, 30_000, 100);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ns(&inbox), (0..30_100).collect::<Vec<_>>());
}

#[test]
fn inbox_server_stopped_for_ten_seconds_loses_nothing_and_delivery_resumes_at_once() {
    let mut remote = Pg::start();
    let inbox = inbox_db(&remote, "pginbox_outage_in");
    let url = setup(
        "pginbox_outage",
        &inbox,
        serde_json::json!({"batch_size": 200}),
    );
    let relay_proc = Relay::spawn(&mut relay(&url));
    let writer = {
        let url = url.clone();
        std::thread::spawn(move || {
            for k in 0..200 {
                publish(&url, k * 50, 50);
                std::thread::sleep(Duration::from_millis(65));
            }
        })
    };
    wait_until(30, "some rows", || count(&inbox) > 500);
    remote.stop();
    std::thread::sleep(Duration::from_secs(10));
    remote.start_again();
    let back = Instant::now();
    let before = count(&inbox);
    assert!(before < 10_000, "the outage came too late to test anything");
    wait_until(10, "delivery after the restart", || count(&inbox) > before);
    let resumed = back.elapsed();
    writer.join().unwrap();
    wait_until(60, "every event", || count(&inbox) >= 10_000);
    assert_eq!(ns(&inbox), (0..10_000).collect::<Vec<_>>());
    eprintln!("delivery resumed {resumed:?} after the inbox server came back");
    assert!(
        resumed < Duration::from_millis(2000),
        "delivery resumed {resumed:?} after the inbox server came back; log:\n{}",
        relay_proc.stderr()
    );
}

#[test]
fn an_event_the_inbox_refuses_is_dead_lettered_and_the_rest_delivered() {
    let pg = Pg::shared();
    let inbox = inbox_db(pg, "pginbox_dead_in");
    pg.client(&inbox)
        .batch_execute(
            "ALTER TABLE pgtrickle.events ADD CONSTRAINT no_13 CHECK (payload->>'n' <> '13')",
        )
        .unwrap();
    let url = setup("pginbox_dead", &inbox, serde_json::json!({}));
    publish(&url, 0, 20);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: Vec<i64> = (0..20).filter(|n| *n != 13).collect();
    assert_eq!(ns(&inbox), expected);
    let error = the_one_dead_letter(&url, "outbox_orders:14:0", 13);
    assert!(error.contains("no_13"), "{error}");
}

#[test]
fn an_inbox_column_the_sink_does_not_fill_is_retried_never_dead_lettered() {
    let pg = Pg::shared();
    let inbox = inbox_db(pg, "pginbox_notnull_in");
    // A NOT NULL column without a default: every insert is refused alike;
    // the inbox's definition is wrong, not the events.
    pg.client(&inbox)
        .batch_execute("ALTER TABLE pgtrickle.events ADD COLUMN tenant text NOT NULL")
        .unwrap();
    let url = setup("pginbox_notnull", &inbox, serde_json::json!({}));
    publish(&url, 0, 5);
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("tenant"), "{stderr}");
    let dead: i64 = pg
        .client(&url)
        .query_one("SELECT count(*) FROM pgtrickle.relay_dead_letters", &[])
        .unwrap()
        .get(0);
    assert_eq!(dead, 0);
    pg.client(&inbox)
        .batch_execute("ALTER TABLE pgtrickle.events ALTER COLUMN tenant SET DEFAULT 't1'")
        .unwrap();
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ns(&inbox), (0..5).collect::<Vec<_>>());
}

#[test]
fn a_bad_pg_inbox_config_names_pipeline_and_key() {
    let pg = Pg::shared();
    let url = pg.new_db("pginbox_badcfg");
    pg.client(&url)
        .batch_execute(
            r#"SELECT pgtrickle.enable_outbox('orders');
               SELECT pgtrickle.set_relay_outbox('fwd', 'orders', 'default',
                  '{"type": "pg-inbox", "inbox": "events"}');"#,
        )
        .unwrap();
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline \"fwd\"") && stderr.contains("sink.url"),
        "{stderr}"
    );
    // A missing inbox is named too.
    let inbox = pg.new_db("pginbox_badcfg_in");
    pg.client(&url)
        .execute(
            "SELECT pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb)",
            &[&serde_json::json!({"type": "pg-inbox", "url": inbox, "inbox": "nope"}).to_string()],
        )
        .unwrap();
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("pgtrickle.create_inbox('nope')"),
        "{stderr}"
    );
}

/// Without `schema`, the sink finds the inbox as the reverse direction
/// does: in the schema its `pgt_inbox_config` row records there (an inbox
/// made in schema `app`), and in a database without the kit, a plain table
/// with the inbox columns in `pgtrickle` (without the error columns).
#[test]
fn the_inbox_is_found_in_the_schema_its_config_records_or_as_a_plain_table() {
    let pg = Pg::shared();
    let inbox = pg.new_db("pginbox_schema_in");
    pg.client(&inbox)
        .batch_execute("CREATE SCHEMA app; SELECT pgtrickle.create_inbox('events', 'app')")
        .unwrap();
    let url = setup("pginbox_schema", &inbox, serde_json::json!({}));
    publish(&url, 0, 3);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: i64 = pg
        .client(&inbox)
        .query_one("SELECT count(*) FROM app.events", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 3);

    // A database without the kit: a plain table.
    let mut c = pg.client(&pg.url("postgres"));
    c.batch_execute("DROP DATABASE IF EXISTS pginbox_plain_in WITH (FORCE)")
        .unwrap();
    c.batch_execute("CREATE DATABASE pginbox_plain_in").unwrap();
    let plain = pg.url("pginbox_plain_in");
    pg.client(&plain)
        .batch_execute(
            "CREATE SCHEMA pgtrickle; CREATE TABLE pgtrickle.events (event_id text PRIMARY KEY, \
             event_type text, source text, aggregate_id text, payload jsonb NOT NULL, trace_id text)",
        )
        .unwrap();
    let url = setup("pginbox_plain", &plain, serde_json::json!({}));
    publish(&url, 0, 4);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ns(&plain), vec![0, 1, 2, 3]);
}
