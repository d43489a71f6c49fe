//! Forward to an HTTP webhook end to end: outbox → relay binary → a
//! receiver of the test's own that answers chosen status codes.
#![cfg(feature = "http")]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;
use support::brokers::{HttpReceiver, Received};
use support::*;

/// A database with outbox `orders` and pipeline `fwd` with `sink`.
fn setup(db: &str, sink: Value) -> String {
    outbox_pipeline(db, &sink)
}

/// The events of a request (batch: its array; event: the one envelope).
fn events_of(r: &Received) -> Vec<Value> {
    match r.json() {
        Value::Array(a) => a,
        v => vec![v],
    }
}

/// Every delivered event, in delivery order.
fn delivered(h: &HttpReceiver) -> Vec<Value> {
    h.accepted().iter().flat_map(events_of).collect()
}

fn n_of(e: &Value) -> i64 {
    e["payload"]["n"].as_i64().unwrap()
}

/// Every n in 0..n delivered, a repeat always with the same dedup key.
fn assert_complete(events: &[Value], n: i64) {
    let mut key_of: BTreeMap<i64, String> = BTreeMap::new();
    for e in events {
        let k = e["dedup_key"].as_str().unwrap().to_string();
        let first = key_of.entry(n_of(e)).or_insert_with(|| k.clone());
        assert_eq!(*first, k);
    }
    let missing: Vec<i64> = (0..n).filter(|i| !key_of.contains_key(i)).collect();
    assert!(missing.is_empty(), "missing events: {missing:?}");
}

#[test]
fn ten_thousand_events_arrive_in_order_in_signed_batches() {
    let h = HttpReceiver::start();
    let url = setup(
        "http_order",
        serde_json::json!({"type": "http", "url": h.url("/hook"), "mode": "batch",
            "headers": {"Authorization": "Bearer ${ENV:PGTR_HTTP_TOKEN}"},
            "timeout_ms": 5000, "signing_secret": "${ENV:PGTR_HTTP_SECRET}"}),
    );
    publish(&url, 0, 10_000);
    let mut r = Relay::spawn(
        relay(&url)
            .env("PGTR_HTTP_TOKEN", "t0k3n")
            .env("PGTR_HTTP_SECRET", "s3cret"),
    );
    wait_until(60, "10,000 events", || delivered(&h).len() >= 10_000);
    let events = delivered(&h);
    assert_eq!(
        events.iter().map(n_of).collect::<Vec<_>>(),
        (0..10_000).collect::<Vec<_>>()
    );
    for req in h.accepted() {
        assert_eq!(req.method, "POST");
        assert_eq!(req.url, "/hook");
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!(req.header("authorization"), Some("Bearer t0k3n"));
        let evs = events_of(&req);
        let key = format!(
            "{}..{}",
            evs[0]["dedup_key"].as_str().unwrap(),
            evs[evs.len() - 1]["dedup_key"].as_str().unwrap()
        );
        assert_eq!(req.header("idempotency-key"), Some(key.as_str()));
        let ts = req.header("pgtrickle-timestamp").unwrap();
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"s3cret").unwrap();
        mac.update(ts.as_bytes());
        mac.update(b".");
        mac.update(&req.body);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            req.header("pgtrickle-signature"),
            Some(format!("v1={hex}").as_str())
        );
    }
    let e = &events[0];
    assert_eq!(e["dedup_key"], "outbox_orders:1:0");
    assert_eq!(e["subject"], "pgtrickle.orders.insert");
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(10), Some(0));
}

#[test]
fn event_mode_posts_each_event_with_its_dedup_key() {
    let h = HttpReceiver::start();
    let url = setup(
        "http_event",
        serde_json::json!({"type": "http", "url": h.url("/e"), "mode": "event"}),
    );
    publish(&url, 0, 300);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reqs = h.accepted();
    assert_eq!(reqs.len(), 300);
    for (i, req) in reqs.iter().enumerate() {
        let e = req.json();
        assert_eq!(n_of(&e), i as i64);
        assert_eq!(
            req.header("idempotency-key"),
            e["dedup_key"].as_str(),
            "one event per request, keyed by its dedup key"
        );
        assert!(req.header("pgtrickle-signature").is_none());
    }
}

#[test]
fn sigkill_mid_stream_then_restart_delivers_every_event() {
    let h = HttpReceiver::start();
    let url = setup(
        "http_kill",
        serde_json::json!({"type": "http", "url": h.url("/k"), "batch_size": 100}),
    );
    publish(&url, 0, 30_000);
    let r = Relay::spawn(&mut relay(&url));
    wait_until(30, "some events", || delivered(&h).len() > 2_000);
    r.signal(libc::SIGKILL);
    drop(r);
    assert!(
        delivered(&h).len() < 30_000,
        "the kill came too late to test anything"
    );
    publish(&url, 30_000, 100);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_complete(&delivered(&h), 30_100);
}

#[test]
fn receiver_down_for_ten_seconds_loses_nothing_and_delivery_resumes_at_once() {
    let mut h = HttpReceiver::start();
    let url = setup(
        "http_outage",
        serde_json::json!({"type": "http", "url": h.url("/o"), "batch_size": 200}),
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
    wait_until(30, "some events", || delivered(&h).len() > 500);
    // Five seconds of 503 answers, then five of refused connections.
    h.respond_with(|_| (503, Vec::new()));
    std::thread::sleep(Duration::from_secs(5));
    h.stop();
    h.respond_with(|_| (200, Vec::new()));
    std::thread::sleep(Duration::from_secs(5));
    let before = delivered(&h).len();
    assert!(before < 10_000, "the outage came too late to test anything");
    h.start_again();
    let back = Instant::now();
    wait_until(10, "delivery after the outage", || {
        delivered(&h).len() > before
    });
    let resumed = back.elapsed();
    writer.join().unwrap();
    wait_until(60, "every event", || delivered(&h).len() >= 10_000);
    let events = delivered(&h);
    assert_eq!(
        events.iter().map(n_of).collect::<Vec<_>>(),
        (0..10_000).collect::<Vec<_>>()
    );
    eprintln!("delivery resumed {resumed:?} after the receiver came back");
    assert!(
        resumed < Duration::from_millis(2000),
        "delivery resumed {resumed:?} after the receiver came back; log:\n{}",
        r.stderr()
    );
}

#[test]
fn retry_after_is_honoured() {
    let h = HttpReceiver::start();
    let url = setup(
        "http_retry_after",
        serde_json::json!({"type": "http", "url": h.url("/r")}),
    );
    publish(&url, 0, 3);
    let first = std::sync::Mutex::new(true);
    h.respond_with(move |_| {
        if std::mem::take(&mut *first.lock().unwrap()) {
            (429, vec![("Retry-After".to_string(), "2".to_string())])
        } else {
            (200, Vec::new())
        }
    });
    let start = Instant::now();
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(start.elapsed() >= Duration::from_secs(2));
    let reqs = h.requests.lock().unwrap().clone();
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        [429, 200]
    );
    assert_eq!(reqs[0].body, reqs[1].body, "the same batch again");
}

#[test]
fn a_400_for_one_event_dead_letters_it_and_the_rest_are_delivered() {
    let h = HttpReceiver::start();
    h.respond_with(|r| {
        if events_of(r).iter().any(|e| n_of(e) == 13) {
            (400, Vec::new())
        } else {
            (200, Vec::new())
        }
    });
    let url = setup(
        "http_dead",
        serde_json::json!({"type": "http", "url": h.url("/d"), "mode": "event"}),
    );
    publish(&url, 0, 20);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: Vec<i64> = (0..20).filter(|n| *n != 13).collect();
    assert_eq!(delivered(&h).iter().map(n_of).collect::<Vec<_>>(), expected);
    let error = the_one_dead_letter(&url, "outbox_orders:14:0", 13);
    assert!(error.contains("status 400"), "{error}");

    // In batch mode the refused request is split until the one event the
    // receiver refuses alone is found; only that one is dead-lettered.
    let h2 = HttpReceiver::start();
    h2.respond_with(|r| {
        if events_of(r).iter().any(|e| n_of(e) == 13) {
            (422, Vec::new())
        } else {
            (200, Vec::new())
        }
    });
    let url2 = setup(
        "http_dead_batch",
        serde_json::json!({"type": "http", "url": h2.url("/d"), "batch_size": 10}),
    );
    publish(&url2, 0, 30);
    let out = run_once(&url2);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<i64> = delivered(&h2).iter().map(n_of).collect();
    assert_eq!(got, (0..30).filter(|n| *n != 13).collect::<Vec<_>>());
    let error = the_one_dead_letter(&url2, "outbox_orders:14:0", 13);
    assert!(error.contains("status 422"), "{error}");
    for req in h2.accepted() {
        let evs = events_of(&req);
        let key = format!(
            "{}..{}",
            evs[0]["dedup_key"].as_str().unwrap(),
            evs[evs.len() - 1]["dedup_key"].as_str().unwrap()
        );
        assert_eq!(req.header("idempotency-key"), Some(key.as_str()));
    }
}

#[test]
fn a_413_splits_the_batch_and_dead_letters_only_the_event_too_large_alone() {
    let h = HttpReceiver::start();
    h.respond_with(|r| {
        if r.body.len() > 20_000 {
            (413, Vec::new())
        } else {
            (200, Vec::new())
        }
    });
    let url = setup(
        "http_413",
        serde_json::json!({"type": "http", "url": h.url("/big"), "batch_size": 50}),
    );
    // 40 events of ~1 KB (several requests' worth), one of 30 KB among them.
    let pg = Pg::shared();
    pg.client(&url)
        .batch_execute(
            "SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('n', g, 'pad', \
               repeat('x', CASE WHEN g = 17 THEN 30000 ELSE 1000 END))) \
             FROM generate_series(0, 39) g",
        )
        .unwrap();
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<i64> = delivered(&h).iter().map(n_of).collect();
    assert_eq!(got, (0..40).filter(|n| *n != 17).collect::<Vec<_>>());
    let error = the_one_dead_letter(&url, "outbox_orders:18:0", 17);
    assert!(error.contains("status 413"), "{error}");
}

/// The committed offset of pipeline `fwd` (0: none).
fn offset(url: &str) -> i64 {
    Pg::shared()
        .client(url)
        .query_opt(
            "SELECT last_change_id FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = 'fwd'",
            &[],
        )
        .unwrap()
        .map_or(0, |r| r.get(0))
}

fn dead_letters(url: &str) -> i64 {
    Pg::shared()
        .client(url)
        .query_one("SELECT count(*) FROM pgtrickle.relay_dead_letters", &[])
        .unwrap()
        .get(0)
}

#[test]
fn endpoint_and_config_statuses_are_retried_and_never_dead_lettered() {
    let h = HttpReceiver::start();
    let url = setup(
        "http_endpoint",
        serde_json::json!({"type": "http", "url": h.url("/moved"), "batch_size": 10}),
    );
    publish(&url, 0, 3);
    for status in [301, 302, 307, 308, 401, 403, 404, 405, 407, 410] {
        h.respond_with(move |_| {
            let location = ("Location".to_string(), "http://127.0.0.1:9/x".to_string());
            (status, vec![location])
        });
        let out = run_once(&url);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "status {status}: {stderr}");
        assert!(stderr.contains(&format!("status {status}")), "{stderr}");
        assert_eq!(dead_letters(&url), 0, "status {status}: dead letters");
        assert_eq!(offset(&url), 0, "status {status}: the offset moved");
    }
    h.respond_with(|_| (200, Vec::new()));
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        delivered(&h).iter().map(n_of).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(dead_letters(&url), 0);
}

#[test]
fn a_rotated_token_holds_the_pipeline_back_visibly_and_loses_nothing() {
    let h = HttpReceiver::start();
    h.respond_with(|_| (401, Vec::new()));
    let url = setup(
        "http_401",
        serde_json::json!({"type": "http", "url": h.url("/auth")}),
    );
    publish(&url, 0, 3);
    let r = Relay::spawn(&mut relay(&url));
    let fwd_health = || {
        let (code, body) = r.get("/health");
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        (code, v["pipelines"]["fwd"].clone())
    };
    wait_until(20, "/health 503, retrying after a 401", || {
        let (code, p) = fwd_health();
        code == 503
            && p["state"] == "retrying"
            && p["last_error"]
                .as_str()
                .unwrap_or("")
                .contains("status 401")
    });
    // Retried, not dead-lettered: the same events are sent again.
    wait_until(20, "a second attempt", || {
        h.requests.lock().unwrap().len() >= 2
    });
    assert_eq!(dead_letters(&url), 0);
    assert_eq!(offset(&url), 0);
    h.respond_with(|_| (200, Vec::new()));
    wait_until(20, "the 3 events", || delivered(&h).len() >= 3);
    wait_until(20, "/health 200", || fwd_health().0 == 200);
    assert_eq!(
        delivered(&h).iter().map(n_of).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(dead_letters(&url), 0);
    wait_until(20, "the offset", || offset(&url) == 3);
}

#[test]
fn a_bad_http_config_names_pipeline_and_key() {
    let url = setup(
        "http_badcfg",
        serde_json::json!({"type": "http", "mode": "event"}),
    );
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline \"fwd\"") && stderr.contains("sink.url"),
        "{stderr}"
    );
}
