//! Forward to NATS JetStream end to end: outbox → relay binary → a private
//! nats-server with JetStream.
#![cfg(feature = "nats")]
// The sync `nats` client is deprecated upstream; it is what the sink uses.
#![allow(deprecated)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::brokers::Nats;
use support::*;

/// A database with outbox `orders` and pipeline `fwd` with `sink`.
fn setup(db: &str, sink: Value) -> String {
    outbox_pipeline(db, &sink)
}

fn api(nc: &nats::Connection, subject: &str, body: &Value) -> Value {
    let m = nc
        .request_timeout(subject, body.to_string(), Duration::from_secs(5))
        .unwrap();
    serde_json::from_slice(&m.data).unwrap()
}

fn create_stream(n: &Nats, name: &str, subjects: &[&str]) {
    let nc = nats::connect(n.url()).unwrap();
    let r = api(
        &nc,
        &format!("$JS.API.STREAM.CREATE.{name}"),
        &json!({"name": name, "subjects": subjects, "storage": "file", "num_replicas": 1}),
    );
    assert!(r.get("error").is_none(), "{r}");
}

/// Messages in `stream` (0 while the server is down).
fn count(n: &Nats, stream: &str) -> u64 {
    let Ok(nc) = nats::connect(n.url()) else {
        return 0;
    };
    match nc.request_timeout(
        &format!("$JS.API.STREAM.INFO.{stream}"),
        "",
        Duration::from_secs(2),
    ) {
        Ok(m) => serde_json::from_slice::<Value>(&m.data).unwrap_or_default()["state"]["messages"]
            .as_u64()
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// A stored message: subject, headers, body.
struct Stored {
    subject: String,
    headers: BTreeMap<String, String>,
    body: Value,
}

/// Every message of `stream`, in stream order (an ephemeral push consumer).
fn read_all(n: &Nats, stream: &str) -> Vec<Stored> {
    let want = count(n, stream);
    let nc = nats::connect(n.url()).unwrap();
    let inbox = nc.new_inbox();
    let sub = nc.subscribe(&inbox).unwrap();
    let r = api(
        &nc,
        &format!("$JS.API.CONSUMER.CREATE.{stream}"),
        &json!({"stream_name": stream, "config": {"deliver_subject": inbox,
                "ack_policy": "none", "deliver_policy": "all"}}),
    );
    assert!(r.get("error").is_none(), "{r}");
    let mut out = Vec::new();
    while (out.len() as u64) < want {
        let m = sub.next_timeout(Duration::from_secs(10)).unwrap();
        let headers = m
            .headers
            .as_ref()
            .map(|h| {
                h.iter()
                    .map(|(k, v)| (k.to_string(), v.iter().next().cloned().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Stored {
            subject: m.subject.clone(),
            headers,
            body: serde_json::from_slice(&m.data).unwrap(),
        });
    }
    out
}

fn ns(msgs: &[Stored]) -> Vec<i64> {
    msgs.iter().map(|m| m.body["n"].as_i64().unwrap()).collect()
}

#[test]
fn ten_thousand_events_arrive_in_order_and_replays_are_deduplicated() {
    let n = Nats::start();
    create_stream(&n, "ORDERS", &["pgtrickle.orders.*"]);
    let url = setup(
        "nats_order",
        json!({"type": "nats", "url": n.url(), "stream": "ORDERS"}),
    );
    publish(&url, 0, 10_000);
    let mut r = Relay::spawn(&mut relay(&url));
    wait_until(60, "10,000 messages", || count(&n, "ORDERS") >= 10_000);
    let msgs = read_all(&n, "ORDERS");
    assert_eq!(ns(&msgs), (0..10_000).collect::<Vec<_>>());
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.subject, "pgtrickle.orders.insert");
        assert_eq!(
            m.headers.get("Nats-Msg-Id").map(String::as_str),
            Some(format!("outbox_orders:{}:0", i + 1).as_str())
        );
        assert_eq!(
            m.headers.get("Pgtrickle-Full-Refresh").map(String::as_str),
            Some("false")
        );
        assert_eq!(
            m.headers.get("Pgtrickle-Op").map(String::as_str),
            Some("insert")
        );
    }
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(10), Some(0));
    // A full replay: JetStream drops every repeat by Nats-Msg-Id.
    Pg::shared()
        .client(&url)
        .execute("DELETE FROM pgtrickle.relay_consumer_offsets", &[])
        .unwrap();
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count(&n, "ORDERS"), 10_000);
}

#[test]
fn sigkill_mid_stream_then_restart_delivers_every_event_once() {
    let n = Nats::start();
    create_stream(&n, "K", &["k.>"]);
    let url = setup(
        "nats_kill",
        // Small batches: a backlog of 30,000 takes seconds to go out, so
        // the kill lands in the middle of it.
        json!({"type": "nats", "url": n.url(), "stream": "K", "subject": "k.{op}",
               "batch_size": 10}),
    );
    publish(&url, 0, 30_000);
    let r = Relay::spawn(&mut relay(&url));
    wait_until(30, "some messages", || count(&n, "K") > 2_000);
    r.signal(libc::SIGKILL);
    drop(r);
    assert!(
        count(&n, "K") < 30_000,
        "the kill came too late to test anything"
    );
    publish(&url, 30_000, 100);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ns(&read_all(&n, "K")), (0..30_100).collect::<Vec<_>>());
}

#[test]
fn nats_stopped_for_ten_seconds_loses_nothing_and_delivery_resumes_at_once() {
    let mut n = Nats::start();
    create_stream(&n, "O", &["o.>"]);
    let url = setup(
        "nats_outage",
        json!({"type": "nats", "url": n.url(), "stream": "O", "subject": "o.{op}",
               "batch_size": 200}),
    );
    let r = Relay::spawn(&mut relay(&url));
    let writer = {
        let url = url.clone();
        std::thread::spawn(move || {
            for k in 0..200 {
                publish(&url, k * 50, 50);
                std::thread::sleep(Duration::from_millis(65));
            }
        })
    };
    wait_until(30, "some messages", || count(&n, "O") > 500);
    n.stop();
    std::thread::sleep(Duration::from_secs(10));
    n.start_again();
    // Back once JetStream answers again (it recovers its streams after the
    // port opens).
    let started = Instant::now();
    let mut before = 0;
    wait_until(10, "JetStream to answer", || {
        before = count(&n, "O");
        before > 0
    });
    let back = Instant::now();
    assert!(before < 10_000, "the outage came too late to test anything");
    wait_until(10, "delivery after the restart", || count(&n, "O") > before);
    let resumed = back.elapsed();
    eprintln!(
        "JetStream answered {:?} after the restart; delivery resumed {resumed:?} later",
        back - started
    );
    writer.join().unwrap();
    wait_until(60, "every event", || count(&n, "O") >= 10_000);
    let msgs = read_all(&n, "O");
    assert_eq!(ns(&msgs), (0..10_000).collect::<Vec<_>>());
    if std::env::var("PGTR_SHOW_LOG").is_ok() {
        eprintln!("{}", r.stderr());
    }
    assert!(
        resumed < Duration::from_millis(1500),
        "delivery resumed {resumed:?} after JetStream came back; log:\n{}",
        r.stderr()
    );
}

fn dead_letters(url: &str) -> i64 {
    Pg::shared()
        .client(url)
        .query_one("SELECT count(*) FROM pgtrickle.relay_dead_letters", &[])
        .unwrap()
        .get(0)
}

/// Five inserts, a delete of n = 99 (outbox id 6), five more inserts.
fn publish_with_a_delete(url: &str) {
    publish(url, 0, 5);
    Pg::shared()
        .client(url)
        .batch_execute(
            "SELECT pgtrickle.outbox_publish_delta('orders', '[]', '[{\"n\": 99}]', false)",
        )
        .unwrap();
    publish(url, 5, 5);
}

#[test]
fn a_subject_no_stream_captures_is_retried_until_a_stream_does() {
    let n = Nats::start();
    create_stream(&n, "EV", &["ev.orders.insert"]);
    let url = setup(
        "nats_unroutable",
        json!({"type": "nats", "url": n.url(), "stream": "EV",
               "subject": "ev.{stream_table}.{op}"}),
    );
    publish_with_a_delete(&url);
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no JetStream stream captures subject \"ev.orders.delete\"")
            && stderr.contains("on_unroutable"),
        "{stderr}"
    );
    assert_eq!(dead_letters(&url), 0);
    // The stream is changed to capture deletes too: everything arrives.
    let nc = nats::connect(n.url()).unwrap();
    let r = api(
        &nc,
        "$JS.API.STREAM.UPDATE.EV",
        &json!({"name": "EV", "subjects": ["ev.orders.*"], "storage": "file",
                "num_replicas": 1}),
    );
    assert!(r.get("error").is_none(), "{r}");
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got = ns(&read_all(&n, "EV"));
    got.sort();
    assert_eq!(got, (0..10).chain([99]).collect::<Vec<_>>());
    assert_eq!(dead_letters(&url), 0);
}

#[test]
fn a_subject_no_stream_captures_is_dead_lettered_when_configured() {
    let n = Nats::start();
    create_stream(&n, "EV", &["ev.orders.insert"]);
    let url = setup(
        "nats_dead",
        json!({"type": "nats", "url": n.url(), "stream": "EV",
               "subject": "ev.{stream_table}.{op}", "on_unroutable": "dead_letter"}),
    );
    publish_with_a_delete(&url);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ns(&read_all(&n, "EV")), (0..10).collect::<Vec<_>>());
    let error = the_one_dead_letter(&url, "outbox_orders:6:0", 99);
    assert!(
        error.contains("no JetStream stream captures subject \"ev.orders.delete\""),
        "{error}"
    );
}

#[test]
fn a_full_or_sealed_stream_is_retried_never_dead_lettered() {
    let n = Nats::start();
    let nc = nats::connect(n.url()).unwrap();
    let full = |max: i64| {
        json!({"name": "FULL", "subjects": ["pgtrickle.>"], "storage": "file",
               "num_replicas": 1, "max_msgs": max, "discard": "new"})
    };
    let r = api(&nc, "$JS.API.STREAM.CREATE.FULL", &full(5));
    assert!(r.get("error").is_none(), "{r}");
    let url = setup(
        "nats_full",
        json!({"type": "nats", "url": n.url(), "stream": "FULL"}),
    );
    publish(&url, 0, 8);
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(count(&n, "FULL"), 5);
    assert_eq!(dead_letters(&url), 0);
    let r = api(&nc, "$JS.API.STREAM.UPDATE.FULL", &full(100));
    assert!(r.get("error").is_none(), "{r}");
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ns(&read_all(&n, "FULL")), (0..8).collect::<Vec<_>>());
    assert_eq!(dead_letters(&url), 0);
    // A sealed stream refuses every message (400): the stream's problem,
    // not the events'.
    let mut sealed = full(100);
    sealed["sealed"] = json!(true);
    let r = api(&nc, "$JS.API.STREAM.UPDATE.FULL", &sealed);
    assert!(r.get("error").is_none(), "{r}");
    publish(&url, 8, 2);
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("sealed"), "{stderr}");
    assert_eq!(count(&n, "FULL"), 8);
    assert_eq!(dead_letters(&url), 0);
}

#[test]
fn headers_that_push_a_message_over_max_payload_dead_letter_only_that_event() {
    let n = Nats::start_with_config("max_payload: 65536\n");
    create_stream(&n, "BIG", &["pgtrickle.>"]);
    let url = setup(
        "nats_max_payload",
        json!({"type": "nats", "url": n.url(), "stream": "BIG"}),
    );
    // A body of ~60 KB fits, but with 8 KB of outbox headers the message
    // is over max_payload: the server would close the connection.
    let c = &mut Pg::shared().client(&url);
    publish(&url, 0, 2);
    c.batch_execute(
        "SELECT pgtrickle.outbox_publish('orders', \
           jsonb_build_object('n', 99, 'pad', repeat('x', 60000)), \
           jsonb_build_object('trace', repeat('t', 8000)))",
    )
    .unwrap();
    publish(&url, 2, 2);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ns(&read_all(&n, "BIG")), vec![0, 1, 2, 3]);
    let error = the_one_dead_letter(&url, "outbox_orders:3:0", 99);
    assert!(error.contains("max_payload (65536)"), "{error}");
}

#[test]
fn a_missing_stream_is_named_or_created_on_request() {
    let n = Nats::start();
    let url = setup(
        "nats_nostream",
        json!({"type": "nats", "url": n.url(), "stream": "MISSING"}),
    );
    publish(&url, 0, 3);
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("JetStream stream \"MISSING\" does not exist")
            && stderr.contains("create_stream"),
        "{stderr}"
    );
    Pg::shared()
        .client(&url)
        .execute(
            "SELECT pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb)",
            &[&json!({"type": "nats", "url": n.url(), "stream": "MISSING",
                       "create_stream": true})
            .to_string()],
        )
        .unwrap();
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let msgs = read_all(&n, "MISSING");
    assert_eq!(ns(&msgs), [0, 1, 2]);
    let ids: BTreeSet<&String> = msgs.iter().map(|m| &m.headers["Nats-Msg-Id"]).collect();
    assert_eq!(ids.len(), 3);
    let nc = nats::connect(n.url()).unwrap();
    let info = api(&nc, "$JS.API.STREAM.INFO.MISSING", &json!({}));
    assert_eq!(info["config"]["subjects"], json!(["pgtrickle.*.*"]));
}

#[test]
fn a_bad_nats_config_names_pipeline_and_key() {
    let url = setup("nats_badcfg", json!({"type": "nats", "stream": "S"}));
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline \"fwd\"") && stderr.contains("sink.url"),
        "{stderr}"
    );
}

#[test]
fn subjects_route_by_payload_content_per_tenant() {
    let n = Nats::start();
    create_stream(&n, "TENANTS", &["ten.>"]);
    let url = setup(
        "nats_route",
        json!({"type": "nats", "url": n.url(), "stream": "TENANTS",
               "subject": "ten.{payload.tenant}.{op}"}),
    );
    publish_tenants(&url, 100);
    let mut r = Relay::spawn(&mut relay(&url));
    wait_until(60, "100 messages", || count(&n, "TENANTS") >= 100);
    wait_until(30, "the dead letter", || dead_letters(&url) == 1);
    let msgs = read_all(&n, "TENANTS");
    assert_eq!(msgs.len(), 100);
    for m in &msgs {
        let tenant = if m.body["n"].as_i64().unwrap() % 2 == 0 {
            "a"
        } else {
            "b"
        };
        assert_eq!(m.subject, format!("ten.{tenant}.insert"));
    }
    assert!(dead_letter_reasons(&url)[0].1.contains("payload.tenant"));
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(10), Some(0));
}
