//! Forward to RabbitMQ end to end: outbox → relay binary → a private
//! rabbitmq-server node, messages read back with amiquip.
#![cfg(feature = "rabbitmq")]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::json;
use support::rabbitmq::amqp::Got;
use support::rabbitmq::Rabbit;
use support::*;

fn run_once(url: &str) -> std::process::Output {
    relay(url)
        .args(["--once", "--pipeline", "fwd"])
        .output()
        .unwrap()
}

fn ns(got: &[Got]) -> Vec<i64> {
    got.iter()
        .map(|g| g.json()["n"].as_i64().unwrap())
        .collect()
}

#[test]
fn ten_thousand_events_arrive_in_order_as_persistent_messages_with_message_ids() {
    let r = Rabbit::shared();
    // Two queues on one exchange, one per routing key.
    r.declare("order_ins", "order_x", "rk.orders.insert");
    r.declare("order_del", "order_x", "rk.orders.delete");
    let url = outbox_pipeline(
        "rmq_order",
        &json!({"type": "rabbitmq", "url": r.url(), "exchange": "order_x", "declare": true,
                "exchange_type": "topic", "routing_key": "rk.{stream_table}.{op}"}),
    );
    publish(&url, 0, 9_000);
    Pg::shared()
        .client(&url)
        .batch_execute(
            "SELECT pgtrickle.outbox_publish_delta('orders', \
               (SELECT jsonb_agg(jsonb_build_object('n', g)) FROM generate_series(9000, 9499) g), \
               (SELECT jsonb_agg(jsonb_build_object('n', g)) FROM generate_series(9500, 9999) g), \
               false)",
        )
        .unwrap();
    let relay = Relay::spawn(&mut relay(&url));
    let ins = r.take("order_ins", 9_500, 120);
    let del = r.take("order_del", 500, 60);
    assert_eq!(ns(&ins), (0..9_500).collect::<Vec<_>>());
    assert_eq!(ns(&del), (9_500..10_000).collect::<Vec<_>>());
    for (i, g) in ins.iter().take(9_000).enumerate() {
        let outbox_id = i + 1;
        assert_eq!(
            g.message_id.as_deref(),
            Some(format!("outbox_orders:{outbox_id}:0").as_str())
        );
        assert_eq!(g.routing_key, "rk.orders.insert");
        assert_eq!(g.header("pgtrickle-outbox-id"), Some(outbox_id.to_string()));
        assert_eq!(g.header("pgtrickle-op").as_deref(), Some("insert"));
        assert_eq!(g.header("pgtrickle-full-refresh").as_deref(), Some("false"));
        assert_eq!(*g.properties.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            g.properties.content_type().as_deref(),
            Some("application/json")
        );
    }
    // The delta row: keys by row index, deletes before inserts.
    assert_eq!(del[0].message_id.as_deref(), Some("outbox_orders:9001:0"));
    assert_eq!(
        ins[9_000].message_id.as_deref(),
        Some("outbox_orders:9001:500")
    );
    assert_eq!(del[0].header("pgtrickle-op").as_deref(), Some("delete"));
    // Nothing more: no duplicates, no dead letters.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(r.count("order_ins") + r.count("order_del"), 0);
    assert!(dead_letter_reasons(&url).is_empty());
    assert!(!relay.stderr().contains("ERROR"), "{}", relay.stderr());
}

#[test]
fn sigkill_mid_stream_then_restart_loses_nothing() {
    let r = Rabbit::shared();
    r.declare("kill_q", "kill_x", "#");
    let url = outbox_pipeline(
        "rmq_kill",
        &json!({"type": "rabbitmq", "url": r.url(), "exchange": "kill_x", "batch_size": 100}),
    );
    publish(&url, 0, 30_000);
    let first = Relay::spawn(&mut relay(&url));
    wait_until(60, "some messages", || r.count("kill_q") > 2_000);
    first.signal(libc::SIGKILL);
    drop(first);
    let partial = r.count("kill_q");
    assert!(partial < 30_000, "the kill came too late to test anything");
    publish(&url, 30_000, 100);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // RabbitMQ does not deduplicate: what was delivered after the last
    // offset commit before the kill arrives twice. Nothing may be missing,
    // and a repeat is the same event under the same message-id.
    let total = r.count("kill_q") as usize;
    assert!(total >= 30_100, "{total} messages for 30,100 events");
    let got = r.take("kill_q", total, 60);
    let mut by_id: BTreeMap<String, i64> = BTreeMap::new();
    for (g, n) in got.iter().zip(ns(&got)) {
        let id = g.message_id.clone().expect("a message-id");
        assert_eq!(*by_id.entry(id.clone()).or_insert(n), n, "{id}");
    }
    assert_eq!(by_id.len(), 30_100);
    let unique: BTreeSet<i64> = by_id.values().copied().collect();
    assert_eq!(unique, (0..30_100).collect::<BTreeSet<_>>());
    eprintln!("{} duplicates after the kill", total - 30_100);
}

#[test]
fn broker_stopped_for_ten_seconds_loses_nothing_and_delivery_resumes_at_once() {
    // Its own node: it is stopped and started again.
    let mut r = Rabbit::start();
    r.declare("out_q", "out_x", "#");
    let url = outbox_pipeline(
        "rmq_outage",
        &json!({"type": "rabbitmq", "url": r.url(), "exchange": "out_x", "batch_size": 200}),
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
    wait_until(60, "some messages", || r.count("out_q") > 500);
    r.stop();
    std::thread::sleep(Duration::from_secs(10));
    r.start_again();
    let back = Instant::now();
    let saved = r.count("out_q");
    assert!(saved < 10_000, "the outage came too late to test anything");
    wait_until(20, "delivery after the restart", || {
        r.count("out_q") > saved
    });
    let resumed = back.elapsed();
    writer.join().unwrap();
    wait_until(120, "every event", || r.count("out_q") >= 10_000);
    let total = r.count("out_q") as usize;
    let got = r.take("out_q", total, 60);
    let unique: BTreeSet<i64> = ns(&got).into_iter().collect();
    assert_eq!(unique, (0..10_000).collect::<BTreeSet<_>>());
    assert!(
        resumed < Duration::from_millis(3000),
        "delivery resumed {resumed:?} after RabbitMQ came back; log:\n{}",
        relay_proc.stderr()
    );
    eprintln!(
        "delivery resumed {resumed:?} after RabbitMQ came back; {} duplicates",
        total - 10_000
    );
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
fn an_unroutable_event_is_retried_until_a_queue_is_bound() {
    let r = Rabbit::shared();
    // Only inserts are routed: the delete comes back (312 NO_ROUTE), as
    // while consumers rebind their queues.
    r.declare("retry_ins_q", "retry_x", "insert");
    let url = outbox_pipeline(
        "rmq_route_retry",
        &json!({"type": "rabbitmq", "url": r.url(), "exchange": "retry_x",
                "routing_key": "{op}"}),
    );
    publish_with_a_delete(&url);
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("NO_ROUTE") && stderr.contains("on_unroutable"),
        "{stderr}"
    );
    assert!(dead_letter_reasons(&url).is_empty());
    // The consumer binds its queue: the delete is delivered, nothing lost.
    r.declare("retry_del_q", "retry_x", "delete");
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ns(&r.take("retry_del_q", 1, 30)), vec![99]);
    let total = r.count("retry_ins_q") as usize;
    let inserts: BTreeSet<i64> = ns(&r.take("retry_ins_q", total, 30)).into_iter().collect();
    assert_eq!(inserts, (0..10).collect::<BTreeSet<_>>());
    assert!(dead_letter_reasons(&url).is_empty());
}

#[test]
fn an_unroutable_event_is_dead_lettered_when_configured() {
    let r = Rabbit::shared();
    r.declare("route_q", "route_x", "insert");
    let url = outbox_pipeline(
        "rmq_route",
        &json!({"type": "rabbitmq", "url": r.url(), "exchange": "route_x",
                "routing_key": "{op}", "on_unroutable": "dead_letter"}),
    );
    publish_with_a_delete(&url);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ns(&r.take("route_q", 10, 30)), (0..10).collect::<Vec<_>>());
    let dead = dead_letter_reasons(&url);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, "outbox_orders:6:0");
    assert!(
        dead[0].1.contains("312") && dead[0].1.contains("NO_ROUTE"),
        "{}",
        dead[0].1
    );
    // Without mandatory the broker drops it, as asked.
    let url2 = outbox_pipeline(
        "rmq_route_drop",
        &json!({"type": "rabbitmq", "url": r.url(), "exchange": "route_x",
                "routing_key": "{op}", "mandatory": false}),
    );
    Pg::shared()
        .client(&url2)
        .batch_execute(
            "SELECT pgtrickle.outbox_publish_delta('orders', '[{\"n\": 1}]', '[{\"n\": 2}]', false)",
        )
        .unwrap();
    let out = run_once(&url2);
    assert!(out.status.success());
    assert_eq!(ns(&r.take("route_q", 1, 30)), vec![1]);
    assert!(dead_letter_reasons(&url2).is_empty());
}

#[test]
fn headers_over_the_frame_size_dead_letter_only_that_event() {
    let r = Rabbit::shared();
    r.declare("hdr_q", "hdr_x", "#");
    let url = outbox_pipeline(
        "rmq_headers",
        &json!({"type": "rabbitmq", "url": r.url(), "exchange": "hdr_x"}),
    );
    publish(&url, 0, 3);
    // A small body, but 200 KB of outbox headers: the content header frame
    // would be over the connection's frame_max (128 KiB).
    Pg::shared()
        .client(&url)
        .batch_execute(
            "SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('n', 99), \
               jsonb_build_object('trace', repeat('t', 200000)))",
        )
        .unwrap();
    publish(&url, 3, 3);
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let total = r.count("hdr_q") as usize;
    let got: BTreeSet<i64> = ns(&r.take("hdr_q", total, 30)).into_iter().collect();
    assert_eq!(got, (0..6).collect::<BTreeSet<_>>());
    let dead = dead_letter_reasons(&url);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, "outbox_orders:4:0");
    assert!(dead[0].1.contains("frame_max"), "{}", dead[0].1);
}

#[test]
fn an_event_over_the_brokers_max_message_size_is_dead_lettered() {
    let r = Rabbit::shared();
    r.declare("size_q", "size_x", "#");
    let url = outbox_pipeline(
        "rmq_size",
        &json!({"type": "rabbitmq", "url": r.url(), "exchange": "size_x"}),
    );
    publish(&url, 0, 5);
    // The node's max_message_size is 65536 bytes.
    Pg::shared()
        .client(&url)
        .batch_execute(
            "SELECT pgtrickle.outbox_publish('orders', \
               jsonb_build_object('n', 99, 'blob', repeat('x', 70000)))",
        )
        .unwrap();
    publish(&url, 5, 5);
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The broker closes the channel at the oversized message: what was
    // published before it and not yet confirmed is published again.
    let total = r.count("size_q") as usize;
    let got = r.take("size_q", total, 30);
    let unique: BTreeSet<i64> = ns(&got).into_iter().collect();
    assert_eq!(unique, (0..10).collect::<BTreeSet<_>>());
    assert!(total <= 15, "{total} messages for 10 events");
    let dead = dead_letter_reasons(&url);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, "outbox_orders:6:0");
    assert!(dead[0].1.contains("max_message_size"), "{}", dead[0].1);
    assert!(stderr.contains("max_message_size is 65536"), "{stderr}");
}

#[test]
fn a_bad_rabbitmq_config_names_pipeline_and_key() {
    let url = outbox_pipeline("rmq_badcfg", &json!({"type": "rabbitmq", "exchange": "x"}));
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline \"fwd\"") && stderr.contains("sink.url"),
        "{stderr}"
    );
    // An exchange that does not exist, not declared by the sink.
    let r = Rabbit::shared();
    let url = outbox_pipeline(
        "rmq_noexchange",
        &json!({"type": "rabbitmq", "url": r.url(), "exchange": "no_such_exchange"}),
    );
    publish(&url, 0, 1);
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline \"fwd\"")
            && stderr.contains("sink.exchange")
            && stderr.contains("no_such_exchange")
            && stderr.contains("sink.declare"),
        "{stderr}"
    );
}

#[test]
fn routing_keys_route_by_payload_content_per_tenant() {
    let r = Rabbit::shared();
    r.declare("route_a", "route_x", "t.a");
    r.declare("route_b", "route_x", "t.b");
    let url = outbox_pipeline(
        "rmq_route",
        &json!({"type": "rabbitmq", "url": r.url(), "exchange": "route_x",
                "routing_key": "t.{payload.tenant}"}),
    );
    publish_tenants(&url, 100);
    let relay = Relay::spawn(&mut relay(&url));
    let a = r.take("route_a", 50, 60);
    let b = r.take("route_b", 50, 60);
    assert_eq!(ns(&a), (0..100).step_by(2).collect::<Vec<_>>());
    assert_eq!(ns(&b), (1..100).step_by(2).collect::<Vec<_>>());
    wait_until(30, "the dead letter", || {
        dead_letter_reasons(&url).len() == 1
    });
    assert!(
        dead_letter_reasons(&url)[0].1.contains("payload.tenant"),
        "{}",
        relay.stderr()
    );
}
