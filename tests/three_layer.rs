//! The three dedup layers end to end, on real servers: a payment event
//! arrives from NATS JetStream (layer 1: `Nats-Msg-Id`), the reverse
//! pipeline writes it into inbox `events` (layer 2: `ON CONFLICT
//! (event_id)`), a processor publishes its follow-up into outbox `orders`
//! keyed by the inbox event id (layer 3: the idempotency key) and crashes
//! before marking the event processed, runs again, and the forward pipeline
//! delivers exactly one follow-up message to JetStream.
#![cfg(feature = "nats")]
// The sync `nats` client is deprecated upstream; it is what the relay uses.
#![allow(deprecated)]

mod support;

use std::time::Duration;

use postgres::Client;
use serde_json::{json, Value};
use support::brokers::Nats;
use support::*;

fn api(nc: &nats::Connection, subject: &str, body: &Value) -> Value {
    let m = nc
        .request_timeout(subject, body.to_string(), Duration::from_secs(5))
        .unwrap();
    serde_json::from_slice(&m.data).unwrap()
}

/// Create stream `name` capturing `subjects`; `dup_window_ms`: its
/// duplicate window (None: the server's default, 2 minutes).
fn create_stream(nc: &nats::Connection, name: &str, subjects: &[&str], dup_window_ms: Option<u64>) {
    let mut cfg = json!({"name": name, "subjects": subjects, "storage": "file",
                         "num_replicas": 1});
    if let Some(ms) = dup_window_ms {
        cfg["duplicate_window"] = json!(ms * 1_000_000);
    }
    let r = api(nc, &format!("$JS.API.STREAM.CREATE.{name}"), &cfg);
    assert!(r.get("error").is_none(), "{r}");
}

/// Publish `body` to `subject` with `Nats-Msg-Id: id`; JetStream's PubAck.
fn js_publish(nc: &nats::Connection, subject: &str, id: &str, body: &Value) -> Value {
    let mut h = nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", id);
    let m = nc
        .request_with_headers_or_timeout(
            subject,
            Some(&h),
            Some(Duration::from_secs(5)),
            body.to_string(),
        )
        .unwrap();
    let ack: Value = serde_json::from_slice(&m.data).unwrap();
    assert!(ack.get("error").is_none(), "{ack}");
    ack
}

/// Messages in `stream`.
fn count(nc: &nats::Connection, stream: &str) -> u64 {
    api(nc, &format!("$JS.API.STREAM.INFO.{stream}"), &json!({}))["state"]["messages"]
        .as_u64()
        .unwrap_or(0)
}

/// Message `seq` of `stream`: its `Nats-Msg-Id` and body.
fn message(nc: &nats::Connection, stream: &str, seq: u64) -> (String, Value) {
    let r = api(
        nc,
        &format!("$JS.API.STREAM.MSG.GET.{stream}"),
        &json!({"seq": seq}),
    );
    let m = &r["message"];
    let b64 = |s: &str| String::from_utf8(base64_decode(s)).unwrap();
    let headers = b64(m["hdrs"].as_str().unwrap_or(""));
    let id = headers
        .lines()
        .find_map(|l| l.strip_prefix("Nats-Msg-Id:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    (
        id,
        serde_json::from_str(&b64(m["data"].as_str().unwrap())).unwrap(),
    )
}

/// Standard base64, as JetStream's message API encodes headers and data.
fn base64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The processor: claim pending events of inbox `events`, and for each
/// publish its follow-up into outbox `orders` keyed by the event id, in its
/// own committed transaction. `crash`: stop there, before marking the
/// events processed (the mark is a second transaction that never runs).
/// Returns the follow-ups' outbox ids.
fn process(c: &mut Client, crash: bool) -> Vec<i64> {
    let mut tx = c.transaction().unwrap();
    let claimed: Vec<(String, Value)> = tx
        .query(
            "SELECT event_id, message::text FROM pgtrickle.inbox_claim('events', 10)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            let m: String = r.get(1);
            (r.get(0), serde_json::from_str(&m).unwrap())
        })
        .collect();
    let mut ids = Vec::new();
    for (event_id, message) in &claimed {
        let follow_up = json!({"payment": message["payload"]["payment"], "status": "paid"});
        ids.push(
            tx.query_one(
                "SELECT pgtrickle.outbox_publish('orders', $1::text::jsonb, NULL, \
                 p_idempotency_key => $2)",
                &[&follow_up.to_string(), event_id],
            )
            .unwrap()
            .get(0),
        );
    }
    tx.commit().unwrap();
    if !crash {
        let done: Vec<String> = claimed.into_iter().map(|(id, _)| id).collect();
        c.execute(
            "SELECT pgtrickle.inbox_mark_processed('events', $1)",
            &[&done],
        )
        .unwrap();
    }
    ids
}

#[test]
fn an_event_processed_twice_leaves_one_follow_up_message() {
    let n = Nats::start();
    let nc = nats::connect(n.url()).unwrap();
    // Incoming payments, with a short duplicate window so that a repeat
    // past it reaches the relay (and only the inbox can drop it).
    create_stream(&nc, "PAYMENTS", &["payments.>"], Some(100));
    create_stream(&nc, "ORDERS", &["pgtrickle.orders.*"], None);
    let url = outbox_pipeline(
        "three_layer",
        &json!({"type": "nats", "url": n.url(), "stream": "ORDERS"}),
    );
    set_inbox(
        &url,
        json!({"type": "nats", "url": n.url(), "stream": "PAYMENTS", "max_wait_ms": 50}),
    );
    let mut c = Pg::shared().client(&url);
    let relay = Relay::spawn(&mut relay(&url));

    // Layer 1: a repeat within the duplicate window is dropped by JetStream.
    let payment = json!({"payment": "p-7", "amount": 42});
    js_publish(&nc, "payments.received", "pay-7", &payment);
    let ack = js_publish(&nc, "payments.received", "pay-7", &payment);
    assert_eq!(ack["duplicate"], json!(true), "{ack}");
    wait_until(30, "the payment in the inbox", || inbox_count(&url) == 1);

    // Layer 2: a repeat past the window is stored by JetStream and
    // delivered; the inbox absorbs it (ON CONFLICT (event_id)).
    wait_until(30, "JetStream to store the repeat", || {
        js_publish(&nc, "payments.received", "pay-7", &payment)
            .get("duplicate")
            .is_none()
    });
    wait_until(30, "the repeat delivered and acknowledged", || {
        let info = api(
            &nc,
            "$JS.API.CONSUMER.INFO.PAYMENTS.pgtrickle-relay-rin",
            &json!({}),
        );
        info["delivered"]["stream_seq"].as_u64() == Some(count(&nc, "PAYMENTS"))
            && info["num_ack_pending"] == json!(0)
    });
    assert_eq!(inbox_count(&url), 1);
    assert_eq!(inbox_ids(&url), ["pay-7".to_string()].into_iter().collect());

    // Layer 3: the processor publishes the follow-up and crashes before
    // marking the payment processed; it runs again.
    let first = process(&mut c, true);
    assert_eq!(first.len(), 1);
    let second = process(&mut c, false);
    assert_eq!(second, first, "the repeat returned the first follow-up");
    let rows: i64 = c
        .query_one("SELECT count(*) FROM pgtrickle.outbox_orders", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    let pending: i64 = c
        .query_one("SELECT count(*) FROM pgtrickle.events_pending", &[])
        .unwrap()
        .get(0);
    assert_eq!(pending, 0);

    // The forward pipeline delivers it once, under its stable Nats-Msg-Id.
    wait_until(30, "the follow-up in ORDERS", || count(&nc, "ORDERS") >= 1);
    wait_until(30, "the forward pipeline to commit it", || {
        c.query_one(
            "SELECT EXISTS (SELECT 1 FROM pgtrickle.relay_consumer_offsets \
             WHERE pipeline_id = 'fwd' AND last_change_id >= $1)",
            &[&first[0]],
        )
        .unwrap()
        .get(0)
    });
    drop(relay);
    assert_eq!(count(&nc, "ORDERS"), 1);
    let (msg_id, body) = message(&nc, "ORDERS", 1);
    assert_eq!(msg_id, format!("outbox_orders:{}:0", first[0]));
    assert_eq!(body["payment"], "p-7");
    assert_eq!(body["status"], "paid");

    // Layer 1 again: a replay of the outbox (offsets lost) is dropped by
    // JetStream by Nats-Msg-Id.
    c.execute(
        "DELETE FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = 'fwd'",
        &[],
    )
    .unwrap();
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count(&nc, "ORDERS"), 1);
}
