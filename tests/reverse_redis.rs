//! The `redis` source end to end: a private redis-server → relay binary →
//! inbox table, entries added and inspected with the redis crate.
#![cfg(feature = "redis")]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use redis::Value;
use serde_json::json;
use support::brokers::Redis;
use support::proxy::Proxy;
use support::*;

const STREAM: &str = "orders";
const GROUP: &str = "pgtrickle-relay";

fn conn(r: &Redis) -> redis::Connection {
    redis::Client::open(r.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

/// XADD entries (field/value lists) in one pipeline; returns their ids.
fn xadd(r: &Redis, entries: &[Vec<(String, String)>]) -> Vec<String> {
    let mut c = conn(r);
    let mut ids = Vec::new();
    for chunk in entries.chunks(500) {
        let mut p = redis::pipe();
        for fields in chunk {
            p.cmd("XADD").arg(STREAM).arg("*").arg(fields);
        }
        let got: Vec<String> = p.query(&mut c).unwrap();
        ids.extend(got);
    }
    ids
}

fn fields(kv: &[(&str, &str)]) -> Vec<(String, String)> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Pending entries of the group (all consumers, or one).
fn pending(r: &Redis, consumer: Option<&str>) -> usize {
    let mut c = conn(r);
    let mut cmd = redis::cmd("XPENDING");
    cmd.arg(STREAM).arg(GROUP).arg("-").arg("+").arg(100_000);
    if let Some(name) = consumer {
        cmd.arg(name);
    }
    match cmd.query::<Value>(&mut c) {
        Ok(Value::Array(items)) => items.len(),
        Ok(other) => panic!("XPENDING: {other:?}"),
        Err(e) if e.code() == Some("NOGROUP") => 0,
        Err(e) => panic!("XPENDING: {e}"),
    }
}

/// Entry `i` of a numbered series: every 10th without a dedup_key (its
/// entry id is the event id), the others with keys repeating every 1500.
fn numbered(from: usize, to: usize) -> Vec<Vec<(String, String)>> {
    (from..to)
        .map(|i| {
            let payload = json!({"n": i}).to_string();
            let mut f = fields(&[("payload", &payload), ("type", "order.placed")]);
            if i % 10 != 0 {
                f.push(("dedup_key".into(), format!("k{}", i % 1500)));
            }
            f
        })
        .collect()
}

/// The event ids `numbered` entries must produce.
fn expected(entries: &[Vec<(String, String)>], entry_ids: &[String]) -> HashSet<String> {
    entries
        .iter()
        .zip(entry_ids)
        .map(|(f, id)| {
            f.iter()
                .find(|(k, _)| k == "dedup_key")
                .map_or_else(|| id.clone(), |(_, v)| v.clone())
        })
        .collect()
}

#[test]
fn entries_dedup_into_the_inbox_and_are_all_acked() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_redis_dedup");
    let r = Redis::start();
    // A backlog before the relay's first start: the group starts at 0.
    let first = numbered(0, 1000);
    let mut entry_ids = xadd(&r, &first);
    set_inbox(
        &url,
        json!({"type": "redis", "url": "${ENV:RURL}", "stream": STREAM, "consumer": "c1",
               "event_type": {"field": "type"}, "source": "shop", "max_wait_ms": 50}),
    );
    let relay = Relay::spawn(relay(&url).env("RURL", r.url()));
    let second = numbered(1000, 2000);
    entry_ids.extend(xadd(&r, &second));
    // One without a payload field: all fields become the payload.
    let plain = xadd(&r, &[fields(&[("dedup_key", "plain"), ("amount", "5")])]);
    let mut all = first;
    all.extend(second);
    let mut want = expected(&all, &entry_ids);
    want.insert("plain".into());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while inbox_count(&url) != want.len() as i64 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} ids in the inbox; log:\n{}",
            inbox_count(&url),
            want.len(),
            relay.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_until(20, "every entry acked", || pending(&r, None) == 0);
    let mut c = pg.client(&url);
    assert_eq!(inbox_ids(&url), want);
    assert_eq!(want.len(), 1350 + 200 + 1);
    let row = c
        .query_one(
            "SELECT event_type, source, payload->>'n' FROM pgtrickle.events WHERE event_id = $1",
            &[&entry_ids[10]],
        )
        .unwrap();
    let got: (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(got, ("order.placed".into(), "shop".into(), "10".into()));
    let amount: String = c
        .query_one(
            "SELECT payload->>'amount' FROM pgtrickle.events WHERE event_id = 'plain'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(amount, "5");
    assert_eq!(plain.len(), 1);
    assert!(!relay.stderr().contains("ERROR"), "{}", relay.stderr());
}

#[test]
fn killed_mid_stream_and_restarted_under_the_same_consumer() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_redis_kill");
    let r = Redis::start();
    // 10,000 entries: enough that the first relay is still at work when
    // it is killed, on a loaded machine too.
    let entries: Vec<_> = (0..10_000)
        .map(|i| {
            let payload = json!({"n": i}).to_string();
            fields(&[("payload", &payload), ("dedup_key", &format!("e{i}"))])
        })
        .collect();
    xadd(&r, &entries);
    set_inbox(
        &url,
        json!({"type": "redis", "url": r.url(), "stream": STREAM, "consumer": "same",
               "batch_size": 20}),
    );
    kill_relay_mid_inbox(&url, 10_000, 30);
    let second = Relay::spawn(&mut relay(&url));
    // Well within claim_idle_ms (30 s): the restarted consumer reads its
    // own unacknowledged entries again itself.
    wait_until(60, "all entries in the inbox", || {
        inbox_count(&url) == 10_000
    });
    wait_until(60, "every entry acked", || pending(&r, None) == 0);
    assert_eq!(inbox_ids(&url).len(), 10_000);
    drop(second);
}

#[test]
fn pending_entries_of_a_dead_consumer_are_claimed() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_redis_claim");
    let r = Redis::start();
    let mut c = conn(&r);
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut c)
        .unwrap();
    let entries: Vec<_> = (0..100)
        .map(|i| fields(&[("payload", "{}"), ("dedup_key", &format!("d{i}"))]))
        .collect();
    xadd(&r, &entries);
    // Consumer "dead" reads them and never acknowledges.
    let _: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("dead")
        .arg("COUNT")
        .arg(1000)
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query(&mut c)
        .unwrap();
    assert_eq!(pending(&r, Some("dead")), 100);
    set_inbox(
        &url,
        json!({"type": "redis", "url": r.url(), "stream": STREAM, "consumer": "live",
               "claim_idle_ms": 300, "max_wait_ms": 50}),
    );
    let relay = Relay::spawn(&mut relay(&url));
    wait_until(30, "the dead consumer's entries in the inbox", || {
        inbox_count(&url) == 100
    });
    wait_until(20, "every entry acked", || pending(&r, None) == 0);
    relay.wait_log("claimed", 5);
}

#[test]
fn postgres_down_nothing_acked_everything_arrives() {
    let mut pg = Pg::start();
    let url = pg.new_db("rev_redis_pgdown");
    let r = Redis::start();
    set_inbox(
        &url,
        json!({"type": "redis", "url": r.url(), "stream": STREAM, "consumer": "c",
               "max_wait_ms": 50}),
    );
    let relay = Relay::spawn(&mut relay(&url));
    xadd(&r, &numbered(1, 10));
    wait_until(30, "the first entries", || inbox_count(&url) == 9);
    pg.stop();
    let during: Vec<_> = (0..200)
        .map(|i| fields(&[("payload", "{}"), ("dedup_key", &format!("during-{i}"))]))
        .collect();
    xadd(&r, &during);
    wait_until(20, "entries read by the relay", || {
        pending(&r, Some("c")) > 0
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        pending(&r, Some("c")) > 0,
        "entries acked while PostgreSQL was down"
    );
    pg.start_again();
    wait_until(60, "everything after the restart", || {
        inbox_count(&url) == 209
    });
    wait_until(20, "every entry acked", || pending(&r, None) == 0);
    drop(relay);
}

#[test]
fn a_malformed_payload_is_a_dead_letter_and_the_rest_arrive() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_redis_bad");
    let r = Redis::start();
    let mut entries: Vec<_> = (0..10)
        .map(|i| {
            fields(&[
                ("payload", r#"{"ok":true}"#),
                ("dedup_key", &format!("g{i}")),
            ])
        })
        .collect();
    entries.insert(5, fields(&[("payload", "{not json"), ("dedup_key", "bad")]));
    xadd(&r, &entries);
    set_inbox(
        &url,
        json!({"type": "redis", "url": r.url(), "stream": STREAM, "max_wait_ms": 50}),
    );
    let out = relay(&url).arg("--once").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(inbox_count(&url), 11);
    assert_eq!(pending(&r, None), 0);
    let mut c = pg.client(&url);
    let row = c
        .query_one(
            "SELECT event_id, payload->>'raw', error FROM pgtrickle.events_dlq",
            &[],
        )
        .unwrap();
    let (id, raw, error): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((id.as_str(), raw.as_str()), ("bad", "{not json"));
    assert!(error.contains("not valid JSON"), "{error}");
    let waiting: i64 = c
        .query_one("SELECT count(*) FROM pgtrickle.events_pending", &[])
        .unwrap()
        .get(0);
    assert_eq!(waiting, 10);
}

#[test]
fn missing_url_is_named() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_redis_badcfg");
    set_inbox(&url, json!({"type": "redis", "stream": STREAM}));
    let out = relay(&url).arg("--once").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline \"rin\"") && stderr.contains("source.url"),
        "{stderr}"
    );
}

#[test]
fn redis_restarted_mid_stream_loses_nothing() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_redis_restart");
    let mut r = Redis::start();
    set_inbox(
        &url,
        json!({"type": "redis", "url": r.url(), "stream": STREAM, "consumer": "c",
               "max_wait_ms": 50}),
    );
    let relay = Relay::spawn(&mut relay(&url));
    let batch = |from: usize| -> Vec<_> {
        (from..from + 100)
            .map(|i| fields(&[("payload", "{}"), ("dedup_key", &format!("r{i}"))]))
            .collect()
    };
    xadd(&r, &batch(0));
    wait_until(30, "the first entries", || inbox_count(&url) == 100);
    r.stop();
    std::thread::sleep(Duration::from_millis(1000));
    r.start_again();
    xadd(&r, &batch(100));
    wait_until(60, "the entries after the restart", || {
        inbox_count(&url) == 200
    });
    wait_until(20, "every entry acked", || pending(&r, None) == 0);
    assert!(relay.stderr().contains("retrying"), "{}", relay.stderr());
}

#[test]
fn committed_but_not_acked_is_redelivered_and_absorbed() {
    // The state a SIGKILL between the inbox commit and XACK leaves: the
    // rows are in the inbox and the entries pending for the consumer.
    let pg = Pg::shared();
    let url = pg.new_db("rev_redis_noack");
    let r = Redis::start();
    set_inbox(
        &url,
        json!({"type": "redis", "url": r.url(), "stream": STREAM, "consumer": "same",
               "max_wait_ms": 50}),
    );
    let mut c = conn(&r);
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut c)
        .unwrap();
    let entries: Vec<_> = (0..50)
        .map(|i| fields(&[("payload", r#"{"v":1}"#), ("dedup_key", &format!("n{i}"))]))
        .collect();
    xadd(&r, &entries);
    let _: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("same")
        .arg("COUNT")
        .arg(30)
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query(&mut c)
        .unwrap();
    let mut db = pg.client(&url);
    for i in 0..30 {
        db.execute(
            "INSERT INTO pgtrickle.events (event_id, payload) VALUES ($1, '{\"v\":1}')",
            &[&format!("n{i}")],
        )
        .unwrap();
    }
    assert_eq!(pending(&r, Some("same")), 30);
    let relay = Relay::spawn(&mut relay(&url));
    wait_until(20, "all entries in the inbox", || inbox_count(&url) == 50);
    wait_until(20, "every entry acked", || pending(&r, None) == 0);
    assert_eq!(inbox_ids(&url).len(), 50);
    drop(relay);
}

#[test]
fn connections_cut_mid_stream_lose_nothing_and_everything_is_acked() {
    let url = Pg::shared().new_db("rev_redis_cuts");
    let r = Redis::start();
    // The relay talks to Redis only through the proxy, which cuts its
    // connection at arbitrary points of the batches.
    let proxy = Proxy::start(&format!("127.0.0.1:{}", r.port));
    set_inbox(
        &url,
        json!({"type": "redis", "url": format!("redis://{}/", proxy.addr()), "stream": STREAM,
               "consumer": "c1", "batch_size": 40, "max_wait_ms": 20}),
    );
    let _relay = Relay::spawn(&mut relay(&url));
    let mut want = HashSet::new();
    for chunk in 0..8 {
        let before = inbox_count(&url);
        let entries = numbered(chunk * 200, chunk * 200 + 200);
        let ids = xadd(&r, &entries);
        want.extend(expected(&entries, &ids));
        wait_until(60, "the relay to take some", || inbox_count(&url) > before);
        proxy.cut();
    }
    wait_until(120, "every entry in the inbox", || {
        inbox_count(&url) == want.len() as i64
    });
    wait_until(60, "every entry acked", || pending(&r, None) == 0);
    assert_eq!(inbox_ids(&url), want);
    assert_eq!(proxy.cuts(), 8);
}
