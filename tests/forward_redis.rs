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

/// Pipeline `fwd`'s entry of the relay's `/health`: (status, entry).
fn fwd_health(relay: &Relay) -> (u16, serde_json::Value) {
    let (code, body) = relay.get("/health");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    (code, v["pipelines"]["fwd"].clone())
}

fn dead_letters(url: &str) -> i64 {
    Pg::shared()
        .client(url)
        .query_one("SELECT count(*) FROM pgtrickle.relay_dead_letters", &[])
        .unwrap()
        .get(0)
}

#[test]
fn a_key_that_is_not_a_stream_holds_the_pipeline_back_until_fixed_and_nothing_is_dead_lettered() {
    let r = Redis::start();
    // Deletes go to a key that is not a stream: XADD fails with WRONGTYPE,
    // a problem of the destination, not of the event.
    assert!(r
        .command(&["SET", "t.delete", "not a stream"])
        .contains("OK"));
    let url = setup(
        "redis_wrongtype",
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
    let relay_proc = Relay::spawn(&mut relay(&url));
    wait_until(30, "/health 503, retrying with WRONGTYPE", || {
        let (code, h) = fwd_health(&relay_proc);
        code == 503
            && h["state"] == "retrying"
            && h["last_error"].as_str().unwrap_or("").contains("WRONGTYPE")
    });
    assert_eq!(dead_letters(&url), 0);
    assert!(r.command(&["DEL", "t.delete"]).contains(":1"));
    wait_until(30, "every event after the fix", || {
        xlen(&r, "t.insert") >= 10 && xlen(&r, "t.delete") >= 1
    });
    wait_until(30, "/health 200", || fwd_health(&relay_proc).0 == 200);
    assert_eq!(ns(&r, "t.insert"), (0..10).collect::<Vec<_>>());
    assert_eq!(ns(&r, "t.delete"), vec![99]);
    assert_eq!(dead_letters(&url), 0);
}

#[test]
fn an_event_over_proto_max_bulk_len_is_dead_lettered_and_the_next_delivered() {
    let r = Redis::start();
    assert!(r
        .command(&["CONFIG", "SET", "proto-max-bulk-len", "1mb"])
        .contains("OK"));
    let url = setup(
        "redis_oversize",
        serde_json::json!({"type": "redis", "url": r.url(), "stream": "big"}),
    );
    publish(&url, 0, 2);
    Pg::shared()
        .client(&url)
        .batch_execute(
            "SELECT pgtrickle.outbox_publish('orders', \
             jsonb_build_object('n', 99, 'pad', repeat('x', 1100000)))",
        )
        .unwrap();
    publish(&url, 2, 2);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ns(&r, "big"), vec![0, 1, 2, 3]);
    let error = the_one_dead_letter(&url, "outbox_orders:3:0", 99);
    assert!(error.contains("proto-max-bulk-len"), "{error}");
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

/// `(dedup_key, n)` of every entry of `stream`, in stream order.
fn keys_and_ns(r: &Redis, stream: &str) -> Vec<(String, i64)> {
    entries(r, stream)
        .iter()
        .map(|(_, f)| {
            let p: serde_json::Value = serde_json::from_str(&f["payload"]).unwrap();
            (f["dedup_key"].clone(), p["n"].as_i64().unwrap())
        })
        .collect()
}

/// Publish `{"n": start..start+n}` into outbox `outbox`, one row each.
fn publish_to(url: &str, outbox: &str, start: i64, n: i64) {
    Pg::shared()
        .client(url)
        .execute(
            "SELECT pgtrickle.outbox_publish($1, jsonb_build_object('n', g)) \
             FROM generate_series($2::bigint, $3::bigint) g",
            &[&outbox, &start, &(start + n - 1)],
        )
        .unwrap();
}

#[test]
fn two_pipelines_into_one_stream_each_deliver_every_event_once() {
    let r = Redis::start();
    let sink = serde_json::json!({"type": "redis", "url": r.url(), "stream": "shared"});
    let url = setup("redis_shared", sink.clone());
    Pg::shared()
        .client(&url)
        .execute(
            "SELECT pgtrickle.enable_outbox('payments'), \
             pgtrickle.set_relay_outbox('fwd2', 'payments', 'default', $1::text::jsonb)",
            &[&sink.to_string()],
        )
        .unwrap();
    // Both outboxes number their rows 1, 2, 3, ...: the entry ids the two
    // pipelines derive collide.
    publish_to(&url, "orders", 0, 3);
    publish_to(&url, "payments", 1000, 3);
    let once = |what: &str| {
        let out = relay(&url).arg("--once").output().unwrap();
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    once("first run");
    // Then interleaved, with a relay running both pipelines.
    let mut relay_proc = Relay::spawn(&mut relay(&url));
    for k in 0..20 {
        publish_to(&url, "orders", 3 + k * 50, 50);
        publish_to(&url, "payments", 1003 + k * 50, 50);
    }
    wait_until(60, "2,006 entries", || xlen(&r, "shared") >= 2_006);
    relay_proc.signal(libc::SIGTERM);
    assert_eq!(relay_proc.wait_exit(10), Some(0));
    let check = |what: &str| {
        let got = keys_and_ns(&r, "shared");
        let mut by_key = BTreeMap::new();
        for (k, n) in &got {
            assert!(
                by_key.insert(k.clone(), *n).is_none(),
                "{what}: {k} twice in the stream"
            );
        }
        let mut expected = BTreeMap::new();
        for i in 0..1003 {
            expected.insert(format!("outbox_orders:{}:0", i + 1), i);
            expected.insert(format!("outbox_payments:{}:0", i + 1), 1000 + i);
        }
        let missing: Vec<&String> = expected
            .keys()
            .filter(|k| !by_key.contains_key(*k))
            .collect();
        assert!(missing.is_empty(), "{what}: missing {missing:?}");
        assert_eq!(by_key, expected, "{what}");
        let dead: i64 = Pg::shared()
            .client(&url)
            .query_one("SELECT count(*) FROM pgtrickle.relay_dead_letters", &[])
            .unwrap()
            .get(0);
        assert_eq!(dead, 0, "{what}: dead letters");
    };
    check("delivered");
    // A replay of both pipelines from the start adds nothing.
    Pg::shared()
        .client(&url)
        .execute("DELETE FROM pgtrickle.relay_consumer_offsets", &[])
        .unwrap();
    once("replay");
    check("replayed");
}

#[test]
fn streams_route_by_payload_content_per_tenant() {
    let r = Redis::start();
    let url = setup(
        "redis_route",
        serde_json::json!({"type": "redis", "url": r.url(), "stream": "s.{payload.tenant}"}),
    );
    publish_tenants(&url, 100);
    let mut relay = Relay::spawn(&mut relay(&url));
    wait_until(60, "50 entries in each stream", || {
        xlen(&r, "s.a") >= 50 && xlen(&r, "s.b") >= 50
    });
    wait_until(30, "the dead letter", || dead_letters(&url) == 1);
    assert_eq!(ns(&r, "s.a"), (0..100).step_by(2).collect::<Vec<_>>());
    assert_eq!(ns(&r, "s.b"), (1..100).step_by(2).collect::<Vec<_>>());
    assert!(dead_letter_reasons(&url)[0].1.contains("payload.tenant"));
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(10), Some(0));
}
