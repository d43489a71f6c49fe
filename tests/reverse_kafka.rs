//! The `kafka` source end to end: a private Tansu broker → relay binary →
//! inbox table, records produced and offsets inspected with rdkafka.
#![cfg(feature = "kafka")]

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value as Json};
use support::kafka::{Kafka, Produce, Record};
use support::*;

/// A JSON record with key `key` (None: no key).
fn rec(key: Option<&str>, value: Json, headers: &[(&str, &str)]) -> Produce {
    (
        key.map(str::to_string),
        value.to_string().into_bytes(),
        headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// The offset after the last record of each partition: what a group that
/// consumed everything has committed.
fn ends(records: &[Record]) -> HashMap<i32, i64> {
    let mut m = HashMap::new();
    for r in records {
        let e = m.entry(r.partition).or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    m
}

/// The source config every test starts from.
fn source(k: &Kafka, topic: &str, group: &str, extra: Json) -> Json {
    let mut s = json!({"type": "kafka", "brokers": k.brokers(), "topic": topic,
                       "group_id": group, "max_wait_ms": 50,
                       "properties": {"session.timeout.ms": 6000}});
    for (key, v) in extra.as_object().unwrap() {
        s[key] = v.clone();
    }
    s
}

/// Records `from..to`: every 10th without a key (its event id is
/// `topic:partition:offset`), the others with keys repeating every 300.
fn numbered(from: usize, to: usize) -> Vec<Produce> {
    (from..to)
        .map(|i| {
            let key = (i % 10 != 0).then(|| format!("k{}", i % 300));
            rec(
                key.as_deref(),
                json!({"n": i, "customer": format!("c{}", i % 7)}),
                &[("type", "order.placed")],
            )
        })
        .collect()
}

#[test]
fn records_dedup_into_the_inbox_and_offsets_are_committed() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_kafka_dedup");
    let k = Kafka::start();
    k.create_topic("orders", 3);
    // A backlog before the group exists: a new group starts at the earliest.
    k.produce("orders", &numbered(0, 1000));
    set_inbox(
        &url,
        json!({"type": "kafka", "brokers": "${ENV:KBROKERS}", "topic": "orders",
               "group_id": "inbox-orders", "max_wait_ms": 50,
               "event_type": {"header": "type"}, "aggregate_id": {"field": "customer"},
               "source": "shop", "properties": {"session.timeout.ms": "6000"}}),
    );
    let relay = Relay::spawn(relay(&url).env("KBROKERS", k.brokers()));
    k.produce("orders", &numbered(1000, 2000));
    let records = k.read("orders", 2000, 60);
    assert_eq!(records.len(), 2000);
    let want: HashSet<String> = records
        .iter()
        .map(|r| {
            r.key
                .clone()
                .unwrap_or_else(|| format!("orders:{}:{}", r.partition, r.offset))
        })
        .collect();
    // Keys k1..k299 except multiples of 10, and 200 keyless records.
    assert_eq!(want.len(), 270 + 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
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
    let mut c = pg.client(&url);
    assert_eq!(inbox_ids(&url), want);
    wait_until(30, "every offset committed", || {
        k.committed("inbox-orders", "orders") == ends(&records)
    });
    let keyless = records.iter().find(|r| r.key.is_none()).unwrap();
    let row = c
        .query_one(
            "SELECT event_type, source, aggregate_id, payload->>'n' FROM pgtrickle.events \
             WHERE event_id = $1",
            &[&format!("orders:{}:{}", keyless.partition, keyless.offset)],
        )
        .unwrap();
    let got: (String, String, String, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
    let n = keyless.json()["n"].as_i64().unwrap();
    assert_eq!(
        got,
        (
            "order.placed".into(),
            "shop".into(),
            format!("c{}", n % 7),
            n.to_string()
        )
    );
    assert!(!relay.stderr().contains("ERROR"), "{}", relay.stderr());
}

#[test]
fn killed_between_inbox_commit_and_broker_commit_redelivers_one_row_per_id() {
    // The state a SIGKILL after the inbox commit and before the offset
    // commit leaves: rows in the inbox, nothing committed in the group.
    let pg = Pg::shared();
    let url = pg.new_db("rev_kafka_noack");
    let k = Kafka::start();
    k.create_topic("noack", 1);
    let records: Vec<_> = (0..50)
        .map(|i| rec(Some(&format!("n{i}")), json!({"v": i}), &[]))
        .collect();
    k.produce("noack", &records);
    set_inbox(&url, source(&k, "noack", "g-noack", json!({})));
    let mut db = pg.client(&url);
    for i in 0..30 {
        db.execute(
            "INSERT INTO pgtrickle.events (event_id, payload) VALUES ($1, '{\"v\":0}')",
            &[&format!("n{i}")],
        )
        .unwrap();
    }
    assert!(k.committed("g-noack", "noack").is_empty());
    let relay = Relay::spawn(&mut relay(&url));
    wait_until(60, "all records in the inbox", || inbox_count(&url) == 50);
    wait_until(30, "the offset committed", || {
        k.committed("g-noack", "noack") == HashMap::from([(0, 50)])
    });
    assert_eq!(inbox_ids(&url).len(), 50);
    drop(relay);
}

#[test]
fn sigkill_mid_stream_and_restart_keeps_one_row_per_id() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_kafka_kill");
    let k = Kafka::start();
    k.create_topic("kill", 2);
    let records: Vec<_> = (0..3000)
        .map(|i| rec(Some(&format!("e{i}")), json!({"n": i}), &[]))
        .collect();
    k.produce("kill", &records);
    set_inbox(
        &url,
        source(&k, "kill", "g-kill", json!({"batch_size": 20})),
    );
    kill_relay_mid_inbox(&url, 3000, 60);
    let second = Relay::spawn(&mut relay(&url));
    wait_until(90, "all records in the inbox", || inbox_count(&url) == 3000);
    let all = k.read("kill", 3000, 30);
    wait_until(30, "every offset committed", || {
        k.committed("g-kill", "kill") == ends(&all)
    });
    assert_eq!(inbox_ids(&url).len(), 3000);
    drop(second);
}

#[test]
fn postgres_down_nothing_committed_to_kafka_everything_arrives() {
    let mut pg = Pg::start();
    let url = pg.new_db("rev_kafka_pgdown");
    let k = Kafka::start();
    k.create_topic("down", 1);
    set_inbox(&url, source(&k, "down", "g-down", json!({})));
    let relay = Relay::spawn(&mut relay(&url));
    let first: Vec<_> = (0..9)
        .map(|i| rec(Some(&format!("before-{i}")), json!({"i": i}), &[]))
        .collect();
    k.produce("down", &first);
    wait_until(60, "the first records", || inbox_count(&url) == 9);
    wait_until(30, "their offsets committed", || {
        k.committed("g-down", "down") == HashMap::from([(0, 9)])
    });
    pg.stop();
    let during: Vec<_> = (0..200)
        .map(|i| rec(Some(&format!("during-{i}")), json!({"i": i}), &[]))
        .collect();
    k.produce("down", &during);
    // The relay has read some of them and failed to write them.
    relay.wait_log("writing into inbox", 60);
    assert_eq!(
        k.committed("g-down", "down"),
        HashMap::from([(0, 9)]),
        "offsets committed while the inbox could not be written"
    );
    pg.start_again();
    wait_until(90, "everything after the restart", || {
        inbox_count(&url) == 209
    });
    wait_until(30, "every offset committed", || {
        k.committed("g-down", "down") == HashMap::from([(0, 209)])
    });
    drop(relay);
}

#[test]
fn an_inbox_lock_holds_commits_back_until_it_is_released() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_kafka_lock");
    let k = Kafka::start();
    k.create_topic("locked", 1);
    set_inbox(&url, source(&k, "locked", "g-lock", json!({})));
    let relay = Relay::spawn(&mut relay(&url));
    k.produce("locked", &[rec(Some("first"), json!({}), &[])]);
    wait_until(60, "the first record", || inbox_count(&url) == 1);
    wait_until(30, "its offset committed", || {
        k.committed("g-lock", "locked") == HashMap::from([(0, 1)])
    });
    // An exclusive lock on the inbox: the relay's insert waits behind it.
    let mut locker = pg.client(&url);
    let mut tx = locker.transaction().unwrap();
    tx.batch_execute("LOCK TABLE pgtrickle.events IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let more: Vec<_> = (0..100)
        .map(|i| rec(Some(&format!("l{i}")), json!({"i": i}), &[]))
        .collect();
    k.produce("locked", &more);
    let mut probe = pg.client(&url);
    wait_until(60, "the relay's insert waiting for the lock", || {
        probe
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE 'INSERT INTO%'",
                &[],
            )
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    });
    assert_eq!(
        k.committed("g-lock", "locked"),
        HashMap::from([(0, 1)]),
        "offsets committed before the inbox commit"
    );
    tx.commit().unwrap();
    wait_until(60, "everything after the lock", || inbox_count(&url) == 101);
    wait_until(30, "every offset committed", || {
        k.committed("g-lock", "locked") == HashMap::from([(0, 101)])
    });
    drop(relay);
}

#[test]
fn malformed_records_are_dead_letters_and_the_rest_arrive() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_kafka_bad");
    let k = Kafka::start();
    k.create_topic("bad", 1);
    let mut records: Vec<_> = (0..10)
        .map(|i| rec(Some(&format!("g{i}")), json!({"ok": true}), &[]))
        .collect();
    records.insert(3, (Some("bad".into()), b"{not json".to_vec(), vec![]));
    records.insert(7, (Some("binary".into()), vec![0xff, 0xfe, 0x00], vec![]));
    records.insert(
        9,
        (Some("nul".into()), br#"{"a":"\u0000"}"#.to_vec(), vec![]),
    );
    k.produce("bad", &records);
    set_inbox(&url, source(&k, "bad", "g-bad", json!({})));
    let out = relay(&url).arg("--once").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(inbox_count(&url), 13, "{stderr}");
    assert_eq!(k.committed("g-bad", "bad"), HashMap::from([(0, 13)]));
    let mut c = pg.client(&url);
    let rows = c
        .query(
            "SELECT event_id, payload->>'raw', error FROM pgtrickle.events_dlq ORDER BY event_id",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 3);
    let (id, raw, error): (String, String, String) =
        (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert_eq!((id.as_str(), raw.as_str()), ("bad", "{not json"));
    assert!(error.contains("not valid JSON"), "{error}");
    assert_eq!(rows[1].get::<_, String>(0), "binary");
    assert!(rows[1].get::<_, String>(2).contains("not UTF-8"));
    assert_eq!(rows[2].get::<_, String>(0), "nul");
    assert!(rows[2].get::<_, String>(2).contains("u0000"));
    let waiting: i64 = c
        .query_one("SELECT count(*) FROM pgtrickle.events_pending", &[])
        .unwrap()
        .get(0);
    assert_eq!(waiting, 10);
}

#[test]
fn a_rebalance_between_two_relays_loses_nothing() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_kafka_rebalance");
    let k = Kafka::start();
    k.create_topic("shared", 4);
    set_inbox(
        &url,
        source(&k, "shared", "g-shared", json!({"batch_size": 50})),
    );
    // Two relay instances in different relay groups both run the pipeline:
    // two members of one Kafka consumer group.
    let mut a = Relay::spawn(relay(&url).args(["--relay-group-id", "a"]));
    let producer = {
        let brokers = k.brokers();
        std::thread::spawn(move || {
            for step in 0..20 {
                let batch: Vec<_> = (step * 100..step * 100 + 100)
                    .map(|i| rec(Some(&format!("s{i}")), json!({"i": i}), &[]))
                    .collect();
                support::kafka::produce_to(&brokers, "shared", &batch);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    wait_until(60, "some records in the inbox", || inbox_count(&url) > 200);
    let b = Relay::spawn(relay(&url).args(["--relay-group-id", "b"]));
    b.wait_log("kafka partitions assigned", 60);
    a.signal(libc::SIGTERM);
    assert_eq!(a.wait_exit(30), Some(0), "{}", a.stderr());
    producer.join().unwrap();
    wait_until(90, "every record in the inbox", || {
        inbox_count(&url) == 2000
    });
    let all = k.read("shared", 2000, 30);
    wait_until(30, "every offset committed", || {
        k.committed("g-shared", "shared") == ends(&all)
    });
    assert!(
        a.stderr().contains("kafka partitions revoked"),
        "{}",
        a.stderr()
    );
    drop(b);
}

#[test]
fn kafka_restarted_mid_stream_loses_nothing() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_kafka_restart");
    let mut k = Kafka::start_persistent();
    k.create_topic("restart", 1);
    set_inbox(&url, source(&k, "restart", "g-restart", json!({})));
    let relay = Relay::spawn(&mut relay(&url));
    let batch = |from: usize| -> Vec<Produce> {
        (from..from + 100)
            .map(|i| rec(Some(&format!("r{i}")), json!({"i": i}), &[]))
            .collect()
    };
    k.produce("restart", &batch(0));
    wait_until(60, "the first records", || inbox_count(&url) == 100);
    wait_until(30, "their offsets committed", || {
        k.committed("g-restart", "restart") == HashMap::from([(0, 100)])
    });
    k.stop();
    std::thread::sleep(Duration::from_secs(3));
    k.start_again();
    k.produce("restart", &batch(100));
    wait_until(90, "the records after the restart", || {
        inbox_count(&url) == 200
    });
    wait_until(30, "every offset committed", || {
        k.committed("g-restart", "restart") == HashMap::from([(0, 200)])
    });
    drop(relay);
}

#[test]
fn a_bad_kafka_source_config_names_pipeline_and_key() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_kafka_badcfg");
    set_inbox(
        &url,
        json!({"type": "kafka", "brokers": "127.0.0.1:9", "topic": "t"}),
    );
    let out = relay(&url).arg("--once").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline \"rin\"") && stderr.contains("source.group_id"),
        "{stderr}"
    );
}
