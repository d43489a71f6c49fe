//! The `nats` source end to end: a private nats-server with JetStream →
//! relay binary → inbox table; messages published and the consumer
//! inspected with the nats crate.
#![cfg(feature = "nats")]
// The sync `nats` client is deprecated upstream; it is what the relay uses.
#![allow(deprecated)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use support::brokers::Nats;
use support::proxy::Proxy;
use support::*;

/// The durable consumer the relay creates for pipeline `rin`.
const CONSUMER: &str = "pgtrickle-relay-rin";

fn api(nc: &nats::Connection, subject: &str, body: &Value) -> Value {
    let m = nc
        .request_timeout(subject, body.to_string(), Duration::from_secs(5))
        .unwrap();
    serde_json::from_slice(&m.data).unwrap()
}

/// Create stream `name` capturing `subjects`, with a duplicate window of
/// `dup_window_ms` (None: the server's default, 2 minutes).
fn create_stream(n: &Nats, name: &str, subjects: &[&str], dup_window_ms: Option<u64>) {
    let nc = nats::connect(n.url()).unwrap();
    let mut cfg = json!({"name": name, "subjects": subjects, "storage": "file",
                         "num_replicas": 1});
    if let Some(ms) = dup_window_ms {
        cfg["duplicate_window"] = json!(ms * 1_000_000);
    }
    let r = api(&nc, &format!("$JS.API.STREAM.CREATE.{name}"), &cfg);
    assert!(r.get("error").is_none(), "{r}");
}

/// One message to publish: subject, `Nats-Msg-Id` (if any), extra
/// headers, body.
#[derive(Clone)]
struct Out {
    subject: String,
    id: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn out(subject: &str, id: Option<&str>, body: impl Into<Vec<u8>>) -> Out {
    Out {
        subject: subject.into(),
        id: id.map(Into::into),
        headers: Vec::new(),
        body: body.into(),
    }
}

/// Publish to JetStream, pipelined, and return every PubAck in order
/// (each asserted to be a success).
fn js_publish(n: &Nats, msgs: &[Out]) -> Vec<Value> {
    let nc = nats::connect(n.url()).unwrap();
    let inbox = nc.new_inbox();
    let sub = nc.subscribe(&format!("{inbox}.*")).unwrap();
    for (i, m) in msgs.iter().enumerate() {
        let mut h = nats::HeaderMap::new();
        if let Some(id) = &m.id {
            h.insert("Nats-Msg-Id", id.as_str());
        }
        for (k, v) in &m.headers {
            h.insert(k.as_str(), v.as_str());
        }
        nc.publish_with_reply_or_headers(
            &m.subject,
            Some(&format!("{inbox}.{i}")),
            (!h.is_empty()).then_some(&h),
            &m.body,
        )
        .unwrap();
    }
    let mut acks = vec![Value::Null; msgs.len()];
    for _ in 0..msgs.len() {
        let m = sub.next_timeout(Duration::from_secs(20)).unwrap();
        let i: usize = m.subject.rsplit('.').next().unwrap().parse().unwrap();
        let ack: Value = serde_json::from_slice(&m.data).unwrap();
        assert!(ack.get("error").is_none(), "{ack}");
        acks[i] = ack;
    }
    acks
}

/// The consumer's info (`Null` while the server or consumer is missing).
fn consumer(n: &Nats, stream: &str, name: &str) -> Value {
    let Ok(nc) = nats::connect(n.url()) else {
        return Value::Null;
    };
    match nc.request_timeout(
        &format!("$JS.API.CONSUMER.INFO.{stream}.{name}"),
        "",
        Duration::from_secs(5),
    ) {
        Ok(m) => {
            let v: Value = serde_json::from_slice(&m.data).unwrap_or_default();
            if v.get("error").is_some() {
                Value::Null
            } else {
                v
            }
        }
        Err(_) => Value::Null,
    }
}

/// Every message delivered to the consumer is acknowledged and none waits.
fn all_acked(n: &Nats, stream: &str, name: &str) -> bool {
    let c = consumer(n, stream, name);
    c["num_ack_pending"] == json!(0) && c["num_pending"] == json!(0)
}

/// Messages `from..to` on `orders.placed`: every 10th without a
/// `Nats-Msg-Id` (its stream sequence is the event id), the others with
/// ids repeating every 1500.
fn numbered(from: usize, to: usize) -> Vec<Out> {
    (from..to)
        .map(|i| {
            let id = (i % 10 != 0).then(|| format!("k{}", i % 1500));
            let mut m = out(
                "orders.placed",
                id.as_deref(),
                json!({"n": i, "trace_id": format!("t{i}")}).to_string(),
            );
            m.headers.push(("Order-Id".into(), format!("o{}", i % 7)));
            m
        })
        .collect()
}

/// The event ids `numbered` messages must produce, given their PubAcks.
fn expected(stream: &str, msgs: &[Out], acks: &[Value]) -> HashSet<String> {
    msgs.iter()
        .zip(acks)
        .map(|(m, a)| {
            m.id.clone()
                .unwrap_or_else(|| format!("{stream}:{}", a["seq"].as_u64().unwrap()))
        })
        .collect()
}

#[test]
fn messages_dedup_into_the_inbox_and_are_all_acked() {
    let url = Pg::shared().new_db("rev_nats_dedup");
    let n = Nats::start();
    // A 100 ms duplicate window: the repeats published later are stored by
    // JetStream, so only the inbox can drop them.
    create_stream(&n, "ORDERS", &["orders.>"], Some(100));
    // A backlog before the relay's first start: the consumer starts at the
    // first message.
    let first = numbered(0, 1000);
    let mut acks = js_publish(&n, &first);
    set_inbox(
        &url,
        json!({"type": "nats", "url": "${ENV:NURL}", "stream": "ORDERS",
               "aggregate_id": {"header": "Order-Id"}, "source": "shop",
               "max_wait_ms": 50}),
    );
    let relay = Relay::spawn(relay(&url).env("NURL", n.url()));
    // Past the duplicate window (setup, not an assertion).
    std::thread::sleep(Duration::from_millis(300));
    let second = numbered(1000, 2000);
    let mut second_acks = js_publish(&n, &second);
    // JetStream forgets ids on a timer: publish again any repeat it still
    // dropped, until every message is stored.
    wait_until(30, "JetStream to store every repeat", || {
        let dropped: Vec<usize> = (0..second.len())
            .filter(|&i| second_acks[i].get("duplicate").is_some())
            .collect();
        let again: Vec<Out> = dropped.iter().map(|&i| second[i].clone()).collect();
        for (&i, a) in dropped.iter().zip(js_publish(&n, &again)) {
            second_acks[i] = a;
        }
        dropped.is_empty()
    });
    acks.extend(second_acks);
    let mut all = first;
    all.extend(second);
    let want = expected("ORDERS", &all, &acks);
    assert_eq!(want.len(), 1350 + 200);
    wait_until(60, "every distinct id in the inbox", || {
        inbox_count(&url) == want.len() as i64
    });
    wait_until(20, "every message acked", || {
        all_acked(&n, "ORDERS", CONSUMER)
    });
    let mut c = Pg::shared().client(&url);
    assert_eq!(inbox_ids(&url), want);
    let row = c
        .query_one(
            "SELECT event_type, source, aggregate_id, trace_id, payload->>'n' \
             FROM pgtrickle.events WHERE event_id = 'k11'",
            &[],
        )
        .unwrap();
    let got: (String, String, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    // k11 was first published by message 11 (the backlog).
    assert_eq!(
        got,
        (
            "orders.placed".into(),
            "shop".into(),
            "o4".into(),
            "t11".into(),
            "11".into()
        )
    );
    let info = consumer(&n, "ORDERS", CONSUMER);
    assert_eq!(info["config"]["deliver_policy"], "all", "{info}");
    assert_eq!(info["config"]["ack_policy"], "explicit", "{info}");
    assert_eq!(
        info["config"]["ack_wait"],
        json!(30_000_000_000u64),
        "{info}"
    );
    let log = relay.stderr();
    assert!(
        !log.contains("ERROR") && !log.contains("did not confirm"),
        "{log}"
    );
}

#[test]
fn committed_but_not_acked_is_redelivered_and_absorbed() {
    // The state a SIGKILL between the inbox commit and the acks leaves: the
    // rows are in the inbox, the messages delivered and unacknowledged.
    let url = Pg::shared().new_db("rev_nats_noack");
    let n = Nats::start();
    create_stream(&n, "NOACK", &["noack.>"], None);
    let msgs: Vec<_> = (0..50)
        .map(|i| out("noack.x", Some(&format!("n{i}")), r#"{"v":1}"#))
        .collect();
    js_publish(&n, &msgs);
    let nc = nats::connect(n.url()).unwrap();
    let r = api(
        &nc,
        &format!("$JS.API.CONSUMER.DURABLE.CREATE.NOACK.{CONSUMER}"),
        &json!({"stream_name": "NOACK", "config": {"durable_name": CONSUMER,
                "ack_policy": "explicit", "deliver_policy": "all",
                "ack_wait": 60_000_000_000u64}}),
    );
    assert!(r.get("error").is_none(), "{r}");
    set_inbox(
        &url,
        json!({"type": "nats", "url": n.url(), "stream": "NOACK", "ack_wait_ms": 2000,
               "max_wait_ms": 50}),
    );
    // The "crashed relay" takes 30 messages and never acknowledges them.
    let inbox = nc.new_inbox();
    let sub = nc.subscribe(&inbox).unwrap();
    nc.publish_request(
        &format!("$JS.API.CONSUMER.MSG.NEXT.NOACK.{CONSUMER}"),
        &inbox,
        json!({"batch": 30}).to_string(),
    )
    .unwrap();
    let mut db = Pg::shared().client(&url);
    for _ in 0..30 {
        let m = sub.next_timeout(Duration::from_secs(10)).unwrap();
        let id = m.headers.as_ref().unwrap().get("Nats-Msg-Id").unwrap();
        db.execute(
            "INSERT INTO pgtrickle.events (event_id, payload) VALUES ($1, '{\"v\":1}')",
            &[id],
        )
        .unwrap();
    }
    drop(sub);
    assert_eq!(consumer(&n, "NOACK", CONSUMER)["num_ack_pending"], 30);
    // The relay shortens the ack wait of the existing consumer: the 30 are
    // redelivered within 2 s.
    let relay = Relay::spawn(&mut relay(&url));
    wait_until(30, "every message acked", || {
        all_acked(&n, "NOACK", CONSUMER)
    });
    assert_eq!(inbox_count(&url), 50);
    assert_eq!(inbox_ids(&url).len(), 50);
    assert_eq!(
        consumer(&n, "NOACK", CONSUMER)["config"]["ack_wait"],
        json!(2_000_000_000u64)
    );
    relay.wait_log("set the ack wait", 5);
}

#[test]
fn sigkill_after_the_commit_before_the_acks_is_redelivered_once() {
    // The relay's user may not publish acks: the server refuses them, so
    // the real relay commits to the inbox and never gets its acks confirmed;
    // it is SIGKILLed in that state and restarted as a user that may.
    let n = Nats::start_with_config(
        r#"
        authorization {
          users = [
            {user: admin, password: admin}
            {user: noack, password: noack, permissions: {publish: {deny: ["$JS.ACK.>"]}}}
          ]
        }
        no_auth_user: admin
        "#,
    );
    let url = Pg::shared().new_db("rev_nats_realkill");
    create_stream(&n, "RK", &["rk.>"], None);
    let msgs: Vec<_> = (0..50)
        .map(|i| out("rk.x", Some(&format!("m{i}")), json!({"n": i}).to_string()))
        .collect();
    js_publish(&n, &msgs);
    set_inbox(
        &url,
        json!({"type": "nats", "url": n.url_as("noack", "noack"), "stream": "RK",
               "ack_wait_ms": 2000, "max_wait_ms": 50}),
    );
    let mut first = Relay::spawn(&mut relay(&url));
    wait_until(30, "every message in the inbox", || inbox_count(&url) == 50);
    first.wait_log("did not confirm the acks", 30);
    let info = consumer(&n, "RK", CONSUMER);
    assert_eq!(info["ack_floor"]["stream_seq"], 0, "acked: {info}");
    first.signal(libc::SIGKILL);
    first.wait_exit(10);
    set_inbox(
        &url,
        json!({"type": "nats", "url": n.url(), "stream": "RK", "ack_wait_ms": 2000,
               "max_wait_ms": 50}),
    );
    let second = Relay::spawn(&mut relay(&url));
    wait_until(30, "every message acked", || all_acked(&n, "RK", CONSUMER));
    let info = consumer(&n, "RK", CONSUMER);
    assert_eq!(info["ack_floor"]["stream_seq"], 50, "{info}");
    assert_eq!(inbox_count(&url), 50);
    assert_eq!(inbox_ids(&url).len(), 50);
    drop(second);
}

#[test]
fn sigkill_mid_stream_then_restart_delivers_every_id_once() {
    let url = Pg::shared().new_db("rev_nats_kill");
    let n = Nats::start();
    create_stream(&n, "KILL", &["kill.>"], None);
    let msgs: Vec<_> = (0..10_000)
        .map(|i| {
            out(
                "kill.x",
                Some(&format!("e{i}")),
                json!({"n": i}).to_string(),
            )
        })
        .collect();
    js_publish(&n, &msgs);
    set_inbox(
        &url,
        json!({"type": "nats", "url": n.url(), "stream": "KILL", "ack_wait_ms": 2000,
               "batch_size": 20}),
    );
    kill_relay_mid_inbox(&url, 10_000, 30);
    // Messages delivered to the killed relay and not acknowledged.
    let pending = consumer(&n, "KILL", CONSUMER)["num_ack_pending"]
        .as_u64()
        .unwrap();
    let second = Relay::spawn(&mut relay(&url));
    wait_until(120, "every message in the inbox", || {
        inbox_count(&url) == 10_000
    });
    wait_until(30, "every message acked", || {
        all_acked(&n, "KILL", CONSUMER)
    });
    assert_eq!(inbox_ids(&url).len(), 10_000);
    eprintln!("{pending} messages were unacknowledged at the kill");
    drop(second);
}

#[test]
fn postgres_down_nothing_acked_everything_arrives() {
    let mut pg = Pg::start();
    let url = pg.new_db("rev_nats_pgdown");
    let n = Nats::start();
    create_stream(&n, "PGDOWN", &["pgdown.>"], None);
    pg.client(&url)
        .execute(
            "SELECT pgtrickle.set_relay_inbox('rin', 'events', $1::text::jsonb)",
            &[&json!({"type": "nats", "url": n.url(), "stream": "PGDOWN",
                      "max_wait_ms": 50})
            .to_string()],
        )
        .unwrap();
    let relay = Relay::spawn(&mut relay(&url));
    let before: Vec<_> = (0..9)
        .map(|i| out("pgdown.x", Some(&format!("b{i}")), "{}"))
        .collect();
    js_publish(&n, &before);
    wait_until(30, "the first messages", || inbox_count(&url) == 9);
    wait_until(20, "the first messages acked", || {
        all_acked(&n, "PGDOWN", CONSUMER)
    });
    pg.stop();
    let during: Vec<_> = (0..200)
        .map(|i| out("pgdown.x", Some(&format!("during-{i}")), "{}"))
        .collect();
    js_publish(&n, &during);
    // The relay received them and failed to write them.
    wait_until(30, "messages delivered to the relay", || {
        consumer(&n, "PGDOWN", CONSUMER)["num_ack_pending"]
            .as_u64()
            .is_some_and(|p| p > 0)
    });
    relay.wait_log("writing into inbox", 30);
    let info = consumer(&n, "PGDOWN", CONSUMER);
    assert_eq!(
        info["ack_floor"]["stream_seq"], 9,
        "acked while PostgreSQL was down: {info}"
    );
    pg.start_again();
    wait_until(60, "everything after the restart", || {
        inbox_count(&url) == 209
    });
    wait_until(20, "every message acked", || {
        all_acked(&n, "PGDOWN", CONSUMER)
    });
    drop(relay);
}

#[test]
fn malformed_bodies_are_dead_letters_and_the_rest_arrive() {
    let url = Pg::shared().new_db("rev_nats_bad");
    let n = Nats::start();
    create_stream(&n, "BAD", &["bad.>"], None);
    let mut msgs: Vec<_> = (0..10)
        .map(|i| out("bad.ok", Some(&format!("g{i}")), r#"{"ok":true}"#))
        .collect();
    msgs.insert(3, out("bad.text", Some("text"), "{not json"));
    msgs.insert(6, out("bad.binary", None, vec![0xff, 0x00, 0x41]));
    msgs.insert(9, out("bad.nul", Some("nul"), r#"{"a":"x\u0000"}"#));
    let acks = js_publish(&n, &msgs);
    set_inbox(
        &url,
        json!({"type": "nats", "url": n.url(), "stream": "BAD", "max_wait_ms": 50}),
    );
    let out = relay(&url).arg("--once").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(inbox_count(&url), 13);
    assert!(all_acked(&n, "BAD", CONSUMER));
    let mut c = Pg::shared().client(&url);
    let rows = c
        .query(
            "SELECT event_id, event_type, payload->>'raw', error FROM pgtrickle.events_dlq \
             ORDER BY event_id",
            &[],
        )
        .unwrap();
    let got: Vec<(String, String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(got.len(), 3, "{got:?}");
    let binary_id = format!("BAD:{}", acks[6]["seq"]);
    assert_eq!(got[0].0, binary_id);
    assert_eq!(got[0].1, "bad.binary");
    assert_eq!(got[0].2, "\u{FFFD}\u{FFFD}A");
    assert!(got[0].3.contains("not UTF-8"), "{}", got[0].3);
    assert_eq!(
        (got[1].0.as_str(), got[1].2.as_str()),
        ("nul", r#"{"a":"x\u0000"}"#)
    );
    assert!(got[1].3.contains("\\u0000"), "{}", got[1].3);
    assert_eq!(
        (got[2].0.as_str(), got[2].2.as_str()),
        ("text", "{not json")
    );
    assert!(
        got[2].3.contains("not valid JSON") && got[2].3.contains("BAD seq 4"),
        "{}",
        got[2].3
    );
    let waiting: i64 = c
        .query_one("SELECT count(*) FROM pgtrickle.events_pending", &[])
        .unwrap()
        .get(0);
    assert_eq!(waiting, 10);
}

#[test]
fn start_new_skips_the_backlog() {
    let url = Pg::shared().new_db("rev_nats_new");
    let n = Nats::start();
    create_stream(&n, "NEW", &["new.>"], None);
    js_publish(&n, &[out("new.x", Some("old"), "{}")]);
    set_inbox(
        &url,
        json!({"type": "nats", "url": n.url(), "stream": "NEW", "start": "new",
               "subject": "new.x", "max_wait_ms": 50}),
    );
    let relay = Relay::spawn(&mut relay(&url));
    relay.wait_log("created durable consumer", 30);
    js_publish(
        &n,
        &[
            out("new.x", Some("a"), "{}"),
            out("new.y", Some("filtered"), "{}"),
            out("new.x", Some("b"), "{}"),
        ],
    );
    wait_until(30, "the new messages", || inbox_count(&url) == 2);
    wait_until(20, "every message acked", || all_acked(&n, "NEW", CONSUMER));
    let want: HashSet<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
    assert_eq!(inbox_ids(&url), want);
    let info = consumer(&n, "NEW", CONSUMER);
    assert_eq!(info["config"]["deliver_policy"], "new", "{info}");
    assert_eq!(info["config"]["filter_subject"], "new.x", "{info}");
}

#[test]
fn nats_restarted_mid_stream_loses_nothing() {
    let url = Pg::shared().new_db("rev_nats_restart");
    let mut n = Nats::start();
    create_stream(&n, "RST", &["rst.>"], None);
    set_inbox(
        &url,
        json!({"type": "nats", "url": n.url(), "stream": "RST", "max_wait_ms": 50}),
    );
    let relay = Relay::spawn(&mut relay(&url));
    let batch = |from: usize| -> Vec<Out> {
        (from..from + 100)
            .map(|i| out("rst.x", Some(&format!("r{i}")), "{}"))
            .collect()
    };
    js_publish(&n, &batch(0));
    wait_until(30, "the first messages", || inbox_count(&url) == 100);
    n.stop();
    relay.wait_log("not connected", 30);
    n.start_again();
    // JetStream recovers its streams after the port opens.
    wait_until(30, "JetStream to answer", || {
        !consumer(&n, "RST", CONSUMER).is_null()
    });
    js_publish(&n, &batch(100));
    wait_until(60, "the messages after the restart", || {
        inbox_count(&url) == 200
    });
    wait_until(20, "every message acked", || all_acked(&n, "RST", CONSUMER));
}

#[test]
fn connections_cut_mid_stream_lose_nothing_and_everything_is_acked() {
    let url = Pg::shared().new_db("rev_nats_cuts");
    let n = Nats::start();
    create_stream(&n, "CUTS", &["orders.>"], None);
    // The relay talks to JetStream only through the proxy, which cuts its
    // connection at arbitrary points of the batches.
    let proxy = Proxy::start(&format!("127.0.0.1:{}", n.port));
    set_inbox(
        &url,
        json!({"type": "nats", "url": format!("nats://{}", proxy.addr()), "stream": "CUTS",
               "batch_size": 40, "max_wait_ms": 20, "ack_wait_ms": 2000}),
    );
    let _relay = Relay::spawn(&mut relay(&url));
    let mut want = HashSet::new();
    for chunk in 0..8 {
        let before = inbox_count(&url);
        let msgs = numbered(chunk * 200, chunk * 200 + 200);
        let acks = js_publish(&n, &msgs);
        want.extend(expected("CUTS", &msgs, &acks));
        wait_until(60, "the relay to take some", || inbox_count(&url) > before);
        proxy.cut();
    }
    wait_until(120, "every message in the inbox", || {
        inbox_count(&url) == want.len() as i64
    });
    wait_until(60, "every message acked", || {
        all_acked(&n, "CUTS", CONSUMER)
    });
    assert_eq!(inbox_ids(&url), want);
    assert_eq!(proxy.cuts(), 8);
}

#[test]
fn a_missing_stream_is_named() {
    let url = Pg::shared().new_db("rev_nats_nostream");
    let n = Nats::start();
    set_inbox(
        &url,
        json!({"type": "nats", "url": n.url(), "stream": "MISSING"}),
    );
    let out = relay(&url).arg("--once").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline \"rin\"")
            && stderr.contains("source.stream")
            && stderr.contains("JetStream stream \"MISSING\" does not exist"),
        "{stderr}"
    );
}

#[test]
fn an_unusable_consumer_is_named() {
    let url = Pg::shared().new_db("rev_nats_push");
    let n = Nats::start();
    create_stream(&n, "PUSH", &["push.>"], None);
    let nc = nats::connect(n.url()).unwrap();
    let r = api(
        &nc,
        "$JS.API.CONSUMER.DURABLE.CREATE.PUSH.mine",
        &json!({"stream_name": "PUSH", "config": {"durable_name": "mine",
                "ack_policy": "none", "deliver_policy": "all"}}),
    );
    assert!(r.get("error").is_none(), "{r}");
    set_inbox(
        &url,
        json!({"type": "nats", "url": n.url(), "stream": "PUSH", "consumer": "mine"}),
    );
    let out = relay(&url).arg("--once").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline \"rin\"")
            && stderr.contains("source.consumer")
            && stderr.contains("ack policy none"),
        "{stderr}"
    );
}

#[test]
fn a_bad_config_names_pipeline_and_key() {
    let url = Pg::shared().new_db("rev_nats_badcfg");
    for (source, key) in [
        (json!({"type": "nats", "stream": "S"}), "source.url"),
        (
            json!({"type": "nats", "url": "nats://127.0.0.1:1", "stream": "S",
                   "ack_wait_ms": 5}),
            "source.ack_wait_ms",
        ),
    ] {
        set_inbox(&url, source);
        let out = relay(&url).arg("--once").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("pipeline \"rin\"") && stderr.contains(key),
            "{stderr}"
        );
    }
}

#[test]
fn a_consumer_deleted_while_running_is_created_again() {
    let url = Pg::shared().new_db("rev_nats_recreate");
    let n = Nats::start();
    create_stream(&n, "GONE", &["gone.>"], None);
    set_inbox(
        &url,
        json!({"type": "nats", "url": n.url(), "stream": "GONE", "max_wait_ms": 50}),
    );
    let relay = Relay::spawn(&mut relay(&url));
    let batch = |tag: &str| -> Vec<Out> {
        (0..10)
            .map(|i| out("gone.x", Some(&format!("{tag}{i}")), "{}"))
            .collect()
    };
    js_publish(&n, &batch("a"));
    wait_until(30, "the first messages", || inbox_count(&url) == 10);
    wait_until(20, "the first messages acked", || {
        all_acked(&n, "GONE", CONSUMER)
    });
    let nc = nats::connect(n.url()).unwrap();
    let r = api(
        &nc,
        &format!("$JS.API.CONSUMER.DELETE.GONE.{CONSUMER}"),
        &json!({}),
    );
    assert_eq!(r["success"], true, "{r}");
    js_publish(&n, &batch("b"));
    // The new consumer starts at the first message again: the inbox absorbs
    // the first ten.
    wait_until(60, "the messages after the deletion", || {
        inbox_count(&url) == 20
    });
    wait_until(20, "every message acked", || {
        all_acked(&n, "GONE", CONSUMER)
    });
    assert_eq!(
        relay.stderr().matches("created durable consumer").count(),
        2,
        "{}",
        relay.stderr()
    );
}
