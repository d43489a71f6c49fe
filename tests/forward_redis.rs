//! Forward to Redis Streams end to end: outbox → relay binary → a private
//! redis-server.
#![cfg(feature = "redis")]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::brokers::Redis;
use support::*;

/// A database with outbox `orders` and pipeline `fwd` with `sink`.
fn setup(db: &str, sink: serde_json::Value) -> String {
    outbox_pipeline(db, &sink)
}

fn conn(r: &Redis) -> redis::Connection {
    redis::Client::open(r.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

/// Entries of `stream`: (id, fields).
fn entries(r: &Redis, stream: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let mut c = conn(r);
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query(&mut c)
        .unwrap();
    reply
        .ids
        .into_iter()
        .map(|e| {
            let fields = e
                .map
                .iter()
                .map(|(k, v)| (k.clone(), redis::from_redis_value_ref::<String>(v).unwrap()))
                .collect();
            (e.id, fields)
        })
        .collect()
}

fn xlen(r: &Redis, stream: &str) -> usize {
    let Ok(client) = redis::Client::open(r.url()) else {
        return 0;
    };
    let Ok(mut c) = client.get_connection() else {
        return 0;
    };
    redis::cmd("XLEN").arg(stream).query(&mut c).unwrap_or(0)
}

/// The `n` of every entry.
fn ns(r: &Redis, stream: &str) -> Vec<i64> {
    entries(r, stream)
        .iter()
        .map(|(_, f)| {
            let p: serde_json::Value = serde_json::from_str(&f["payload"]).unwrap();
            p["n"].as_i64().unwrap()
        })
        .collect()
}

#[test]
fn ten_thousand_events_arrive_in_order_with_entry_ids_and_replays_are_harmless() {
    let r = Redis::start();
    let url = setup(
        "redis_order",
        serde_json::json!({"type": "redis", "url": r.url(), "stream": "s.{stream_table}",
                           "maxlen": 1000000}),
    );
    publish(&url, 0, 10_000);
    let mut relay = Relay::spawn(&mut relay(&url));
    wait_until(60, "10,000 entries", || xlen(&r, "s.orders") >= 10_000);
    let es = entries(&r, "s.orders");
    assert_eq!(es.len(), 10_000);
    for (i, (id, f)) in es.iter().enumerate() {
        let outbox_id = i + 1;
        assert_eq!(id, &format!("{outbox_id}-0"));
        assert_eq!(f["dedup_key"], format!("outbox_orders:{outbox_id}:0"));
        assert_eq!(f["subject"], "pgtrickle.orders.insert");
        assert_eq!(f["op"], "insert");
        assert_eq!(f["full_refresh"], "false");
        assert_eq!(f["outbox_id"], outbox_id.to_string());
    }
    assert_eq!(ns(&r, "s.orders"), (0..10_000).collect::<Vec<_>>());
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(10), Some(0));
    // Replay everything from the start: Redis refuses the ids, nothing is
    // added twice, and nothing is dead-lettered.
    let mut c = Pg::shared().client(&url);
    c.execute("DELETE FROM pgtrickle.relay_consumer_offsets", &[])
        .unwrap();
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(xlen(&r, "s.orders"), 10_000);
    let dead: i64 = c
        .query_one("SELECT count(*) FROM pgtrickle.relay_dead_letters", &[])
        .unwrap()
        .get(0);
    assert_eq!(dead, 0);
}

#[test]
fn sigkill_mid_stream_then_restart_delivers_every_event_once() {
    let r = Redis::start();
    let url = setup(
        "redis_sigkill",
        serde_json::json!({"type": "redis", "url": r.url(), "stream": "k", "batch_size": 100}),
    );
    publish(&url, 0, 30_000);
    let relay_proc = Relay::spawn(&mut relay(&url));
    wait_until(30, "some entries", || xlen(&r, "k") > 2_000);
    relay_proc.signal(libc::SIGKILL);
    drop(relay_proc);
    let partial = xlen(&r, "k");
    assert!(partial < 30_000, "the kill came too late to test anything");
    publish(&url, 30_000, 100);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ns(&r, "k"), (0..30_100).collect::<Vec<_>>());
}

#[test]
fn redis_stopped_for_ten_seconds_loses_nothing_and_delivery_resumes_at_once() {
    let mut r = Redis::start();
    let url = setup(
        "redis_outage",
        serde_json::json!({"type": "redis", "url": r.url(), "stream": "o", "batch_size": 200}),
    );
    let relay_proc = Relay::spawn(&mut relay(&url));
    // A steady writer: 10,000 events over ~13 s, in 50-row transactions.
    let writer = {
        let url = url.clone();
        std::thread::spawn(move || {
            for k in 0..200 {
                publish(&url, k * 50, 50);
                std::thread::sleep(Duration::from_millis(65));
            }
        })
    };
    wait_until(30, "some entries", || xlen(&r, "o") > 500);
    r.stop();
    std::thread::sleep(Duration::from_secs(10));
    r.start_again();
    let back = Instant::now();
    let saved = xlen(&r, "o");
    assert!(saved < 10_000, "the outage came too late to test anything");
    wait_until(10, "delivery after the restart", || xlen(&r, "o") > saved);
    let resumed = back.elapsed();
    writer.join().unwrap();
    wait_until(60, "every event", || xlen(&r, "o") >= 10_000);
    assert_eq!(ns(&r, "o"), (0..10_000).collect::<Vec<_>>());
    assert!(
        resumed < Duration::from_millis(2000),
        "delivery resumed {resumed:?} after Redis came back; log:\n{}",
        relay_proc.stderr()
    );
    eprintln!("delivery resumed {resumed:?} after Redis came back");
}

#[test]
fn an_event_redis_refuses_is_dead_lettered_and_the_rest_delivered() {
    let r = Redis::start();
    // Deletes go to a key that is not a stream: XADD fails with WRONGTYPE.
    assert!(r
        .command(&["SET", "t.delete", "not a stream"])
        .contains("OK"));
    let url = setup(
        "redis_dead",
        serde_json::json!({"type": "redis", "url": r.url(), "stream": "t.{op}"}),
    );
    publish(&url, 0, 5);
    Pg::shared()
        .client(&url)
        .batch_execute(
            "SELECT pgtrickle.outbox_publish_delta('orders', '[]', '[{\"n\": 99}]', false)",
        )
        .unwrap();
    publish(&url, 5, 5);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ns(&r, "t.insert"), (0..10).collect::<Vec<_>>());
    let error = the_one_dead_letter(&url, "outbox_orders:6:0", 99);
    assert!(error.contains("WRONGTYPE"), "{error}");
}

#[test]
fn an_event_committed_after_a_later_id_is_appended_after_the_top_once() {
    let r = Redis::start();
    let url = setup(
        "redis_late",
        serde_json::json!({"type": "redis", "url": r.url(), "stream": "late"}),
    );
    // Transaction a takes its transaction id first, b inserts (id 1) and
    // commits, then a inserts (id 2) and commits: the relay reads id 2
    // (older transaction) before id 1.
    let pg = Pg::shared();
    let mut a = pg.client(&url);
    let mut ta = a.transaction().unwrap();
    ta.batch_execute("SELECT pg_current_xact_id()").unwrap();
    publish(&url, 1, 1);
    ta.execute(
        "SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('n', 0))",
        &[],
    )
    .unwrap();
    ta.commit().unwrap();
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids = |r: &Redis| -> Vec<(String, String)> {
        entries(r, "late")
            .into_iter()
            .map(|(id, f)| (id, f["dedup_key"].clone()))
            .collect()
    };
    let expected = vec![
        ("2-0".to_string(), "outbox_orders:2:0".to_string()),
        ("2-1".to_string(), "outbox_orders:1:0".to_string()),
    ];
    assert_eq!(ids(&r), expected);
    // A replay finds both and adds nothing; nothing is dead-lettered.
    let mut c = pg.client(&url);
    c.execute("DELETE FROM pgtrickle.relay_consumer_offsets", &[])
        .unwrap();
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ids(&r), expected);
    let dead: i64 = c
        .query_one("SELECT count(*) FROM pgtrickle.relay_dead_letters", &[])
        .unwrap()
        .get(0);
    assert_eq!(dead, 0);
}

#[test]
fn a_bad_redis_config_names_pipeline_and_key() {
    let url = setup(
        "redis_badcfg",
        serde_json::json!({"type": "redis", "stream": "x"}),
    );
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline \"fwd\"") && stderr.contains("sink.url"),
        "{stderr}"
    );
}
