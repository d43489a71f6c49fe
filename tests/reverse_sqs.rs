//! The `sqs` source end to end: a private moto_server → relay binary →
//! inbox table; messages sent and queues inspected with a signed client of
//! the test's own, deletes refused on demand by a proxy in front of moto.
#![cfg(feature = "sqs")]

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::sqs::{Moto, Proxy, REGION};
use support::*;

/// A source config for `queue` (short long-polls, small batches' wait).
fn source(queue: &str, extra: Value) -> Value {
    let mut s = json!({"type": "sqs", "queue_url": queue, "region": REGION,
        "access_key_id": "AKIDTEST", "secret_access_key": "test-secret",
        "wait_time_seconds": 1, "max_wait_ms": 50});
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

/// A database with inbox `events` fed by pipeline `rin` from `source`.
fn setup(db: &str, source: Value) -> String {
    let pg = Pg::shared();
    let url = pg.new_db(db);
    pg.client(&url)
        .execute(
            "SELECT pgtrickle.set_relay_inbox('rin', 'events', $1::text::jsonb)",
            &[&source.to_string()],
        )
        .unwrap();
    url
}

/// Plain messages `{"n": i}` for i in `from..to`.
fn plain(from: usize, to: usize) -> Vec<Value> {
    (from..to)
        .map(|i| json!({"MessageBody": json!({"n": i}).to_string()}))
        .collect()
}

#[test]
fn repeated_ids_land_once_with_their_attributes() {
    let moto = Moto::shared();
    let sqs = moto.client();
    let queue = sqs.create_queue("dedup.fifo", json!({}));
    // FIFO messages k<i>; moto itself drops a repeat only while the first
    // copy is still queued, so the repeats are sent after the first copies
    // were received and deleted: only the inbox can absorb them.
    let msgs = |from: usize, to: usize| -> Vec<Value> {
        (from..to)
            .map(|i| {
                json!({"MessageBody": json!({"n": i, "customer": format!("c{}", i % 7)}).to_string(),
                       "MessageGroupId": format!("g{}", i % 4),
                       "MessageDeduplicationId": format!("k{i}"),
                       "MessageAttributes": {"type": {"DataType": "String",
                                                      "StringValue": "order.placed"}}})
            })
            .collect()
    };
    sqs.send(&queue, &msgs(0, 200));
    let url = setup(
        "rev_sqs_dedup",
        source(
            &queue,
            json!({"event_type": {"header": "type"}, "aggregate_id": {"field": "customer"},
                   "source": "shop"}),
        ),
    );
    let mut r = Relay::spawn(&mut relay(&url));
    wait_until(120, "the first 200", || inbox_count(&url) == 200);
    wait_until(60, "every message deleted", || sqs.counts(&queue) == (0, 0));
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(10), Some(0), "{}", r.stderr());
    // 50 repeats (k150..k199) and 50 new ones.
    sqs.send(&queue, &msgs(150, 250));
    assert_eq!(sqs.counts(&queue).0, 100, "moto kept every repeat");
    let _r = Relay::spawn(&mut relay(&url));
    wait_until(120, "every message deleted", || {
        sqs.counts(&queue) == (0, 0)
    });
    wait_until(30, "the inbox to settle", || inbox_count(&url) == 250);
    assert_eq!(
        inbox_ids(&url),
        (0..250).map(|i| format!("k{i}")).collect::<HashSet<_>>()
    );
    let row = Pg::shared()
        .client(&url)
        .query_one(
            "SELECT event_type, aggregate_id, source, payload->>'n' FROM pgtrickle.events \
             WHERE event_id = 'k10'",
            &[],
        )
        .unwrap();
    let got: (String, String, String, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        got,
        (
            "order.placed".into(),
            "c3".into(),
            "shop".into(),
            "10".into()
        )
    );
}

#[test]
fn killed_after_the_inbox_commit_before_delete_is_redelivered_and_absorbed() {
    let moto = Moto::shared();
    let sqs = moto.client();
    let queue = sqs.create_queue("nodelete", json!({}));
    let proxy = Proxy::start(&moto.endpoint());
    proxy.refuse(&["DeleteMessageBatch"]);
    let url = setup(
        "rev_sqs_nodelete",
        source(
            &queue,
            json!({"endpoint": proxy.endpoint(), "visibility_timeout": 2}),
        ),
    );
    sqs.send(&queue, &plain(0, 50));
    let r = Relay::spawn(&mut relay(&url));
    wait_until(60, "every message in the inbox", || inbox_count(&url) == 50);
    // The inbox committed and the delete was refused: the state a crash
    // between the two leaves.
    wait_until(30, "a refused delete", || proxy.refused() > 0);
    let before = inbox_ids(&url);
    drop(r); // SIGKILL
    let (visible, in_flight) = sqs.counts(&queue);
    assert_eq!(visible + in_flight, 50, "nothing may be deleted");
    proxy.refuse(&[]);
    let r = Relay::spawn(&mut relay(&url));
    wait_until(60, "every message deleted", || sqs.counts(&queue) == (0, 0));
    assert_eq!(inbox_count(&url), 50, "one row per message");
    assert_eq!(inbox_ids(&url), before);
    drop(r);
}

#[test]
fn a_receive_failing_mid_batch_deletes_only_what_reached_the_inbox() {
    let moto = Moto::shared();
    let sqs = moto.client();
    let queue = sqs.create_queue("midbatch", json!({}));
    let proxy = Proxy::start(&moto.endpoint());
    // The first batch's first ReceiveMessage brings 10 of the 12; its
    // second one fails.
    proxy.refuse_nth("ReceiveMessage", 2);
    sqs.send(&queue, &plain(0, 12));
    let url = setup(
        "rev_sqs_midbatch",
        source(
            &queue,
            json!({"endpoint": proxy.endpoint(), "visibility_timeout": 60,
                   "batch_size": 100, "max_wait_ms": 5000}),
        ),
    );
    let _r = Relay::spawn(&mut relay(&url));
    wait_until(60, "the refused receive", || proxy.refused() == 1);
    wait_until(60, "every message deleted", || sqs.counts(&queue) == (0, 0));
    // Deleted only after the inbox committed: every one is there.
    assert_eq!(inbox_count(&url), 12);
}

#[test]
fn an_unwritable_inbox_deletes_nothing_and_loses_nothing() {
    let moto = Moto::shared();
    let sqs = moto.client();
    let queue = sqs.create_queue("locked", json!({}));
    // Deletes are counted at a proxy: moto's message counts are not
    // consistent while visibility timeouts run out.
    let proxy = Proxy::start(&moto.endpoint());
    let url = setup(
        "rev_sqs_locked",
        source(
            &queue,
            json!({"endpoint": proxy.endpoint(), "visibility_timeout": 2}),
        ),
    );
    let _r = Relay::spawn(&mut relay(&url));
    sqs.send(&queue, &plain(0, 20));
    wait_until(60, "the first 20", || inbox_count(&url) == 20);
    wait_until(60, "the first 20 deleted", || sqs.counts(&queue) == (0, 0));
    let mut lock = Pg::shared().client(&url);
    let mut tx = lock.transaction().unwrap();
    tx.batch_execute("LOCK TABLE pgtrickle.events IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let deletes = proxy.forwarded("DeleteMessageBatch");
    sqs.send(&queue, &plain(20, 120));
    wait_until(60, "the relay to hold messages", || {
        sqs.counts(&queue).1 > 0
    });
    // Longer than the visibility timeout: held messages come back too.
    let locked = Instant::now();
    while locked.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            proxy.forwarded("DeleteMessageBatch"),
            deletes,
            "deleted while the inbox was locked"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    tx.commit().unwrap();
    wait_until(120, "every message in the inbox", || {
        inbox_count(&url) == 120
    });
    wait_until(60, "every message deleted", || sqs.counts(&queue) == (0, 0));
    assert_eq!(inbox_count(&url), 120);
    assert!(proxy.forwarded("DeleteMessageBatch") > deletes);
}

#[test]
fn malformed_bodies_are_dead_letters_and_the_rest_arrive() {
    let moto = Moto::shared();
    let sqs = moto.client();
    let queue = sqs.create_queue("malformed", json!({}));
    let key = |k: &str| json!({"dedup_key": {"DataType": "String", "StringValue": k}});
    let mut msgs: Vec<Value> = (0..10)
        .map(|i| json!({"MessageBody": r#"{"ok":true}"#, "MessageAttributes": key(&format!("g{i}"))}))
        .collect();
    msgs.insert(
        5,
        json!({"MessageBody": "{not json", "MessageAttributes": key("bad")}),
    );
    sqs.send(&queue, &msgs);
    let url = setup("rev_sqs_bad", source(&queue, json!({})));
    let out = relay(&url).arg("--once").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(inbox_count(&url), 11);
    assert_eq!(sqs.counts(&queue), (0, 0), "every message deleted");
    let mut c = Pg::shared().client(&url);
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
fn a_bad_sqs_source_config_names_pipeline_and_key() {
    for (db, src, key) in [
        (
            "rev_sqs_badcfg",
            json!({"type": "sqs", "region": REGION}),
            "source.queue_url",
        ),
        (
            "rev_sqs_badwait",
            json!({"type": "sqs", "queue_url": "https://sqs.us-east-1.amazonaws.com/1/q",
                   "wait_time_seconds": 30}),
            "source.wait_time_seconds",
        ),
    ] {
        let url = setup(db, src);
        let out = relay(&url).arg("--once").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("pipeline \"rin\"") && stderr.contains(key),
            "{stderr}"
        );
    }
}
