//! Forward to Amazon SQS end to end: outbox → relay binary → a private
//! moto_server, read back with a signed client of the test's own.
//!
//! moto dedups FIFO deduplication ids only against messages still queued,
//! so the restart test leaves its messages in the queue until the end; and
//! moto forgets everything when it stops, so the outage test drains what
//! was delivered before the stop and checks that everything published
//! during the outage arrives once the queue is back.
#![cfg(feature = "sqs")]

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::sqs::{attr, Moto, REGION};
use support::*;

/// A sink config for `queue` with credentials in the config (the secret
/// from the environment).
fn sink(queue: &str, extra: Value) -> Value {
    let mut s = json!({"type": "sqs", "queue_url": queue, "region": REGION,
        "access_key_id": "AKIDTEST", "secret_access_key": "${ENV:PGTR_SQS_SECRET}"});
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

/// The relay for `url`, with the secret key in its environment.
fn relay_cmd(url: &str) -> std::process::Command {
    let mut c = relay(url);
    c.env("PGTR_SQS_SECRET", "s3cr3t-sqs-key");
    c
}

/// The `n` of a message body `{"n": ...}`.
fn n_of(m: &Value) -> i64 {
    let body: Value = serde_json::from_str(m["Body"].as_str().unwrap()).unwrap();
    body["n"].as_i64().unwrap()
}

/// The committed offset of pipeline `fwd`.
fn offset(url: &str) -> i64 {
    Pg::shared()
        .client(url)
        .query_opt(
            "SELECT last_change_id FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = 'fwd'",
            &[],
        )
        .unwrap()
        .map(|r| r.get(0))
        .unwrap_or(0)
}

#[test]
fn two_thousand_events_arrive_in_order_in_their_message_group() {
    // A server of its own: moto works one request at a time, and its FIFO
    // queues slow down with every message queued (the suite's other long
    // test runs beside this one).
    let moto = Moto::start();
    let sqs = moto.client();
    let queue = sqs.create_queue("order.fifo", json!({}));
    // Credentials from the standard AWS environment variables.
    let url = outbox_pipeline(
        "sqs_order",
        &json!({"type": "sqs", "queue_url": queue,
                "message_group_id": "{stream_table}-{op}"}),
    );
    // 2,000, not the 10,000 of the other sinks: moto's FIFO queues do work
    // proportional to the queue for every message, and 10,000 took over ten
    // minutes on a 2-core CI machine.
    publish(&url, 0, 2_000);
    let mut r = Relay::spawn(
        relay(&url)
            .env("AWS_ACCESS_KEY_ID", "AKIDENV")
            .env("AWS_SECRET_ACCESS_KEY", "s3cr3t-env-key")
            .env("AWS_REGION", REGION),
    );
    let got = sqs.drain_until(&queue, 600, "2,000 messages", |m| m.len() >= 2_000);
    assert_eq!(
        got.iter().map(n_of).collect::<Vec<_>>(),
        (0..2_000).collect::<Vec<_>>(),
        "every event, once, in order"
    );
    for m in &got {
        let key = attr(m, "dedup_key").unwrap();
        assert_eq!(m["Attributes"]["MessageDeduplicationId"], key);
        assert_eq!(m["Attributes"]["MessageGroupId"], "orders-insert");
        assert_eq!(attr(m, "op"), Some("insert"));
        assert_eq!(attr(m, "subject"), Some("pgtrickle.orders.insert"));
        assert_eq!(attr(m, "full_refresh"), Some("false"));
        assert_eq!(m["MessageAttributes"]["outbox_id"]["DataType"], "Number");
        assert_eq!(
            key,
            format!("outbox_orders:{}:0", attr(m, "outbox_id").unwrap())
        );
    }
    assert_eq!(attr(&got[0], "dedup_key"), Some("outbox_orders:1:0"));
    let (_, health) = r.get("/health");
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(10), Some(0));
    let log = r.stderr();
    assert!(log.contains("FIFO"), "{log}");
    for text in [&log, &health] {
        assert!(
            !text.contains("s3cr3t-env-key"),
            "the secret key leaked: {text}"
        );
    }
}

#[test]
fn sigkill_mid_stream_then_restart_delivers_every_event_once() {
    let moto = Moto::start();
    let sqs = moto.client();
    let queue = sqs.create_queue("restart.fifo", json!({}));
    // moto's FIFO queues slow down as messages pile up: keep this small.
    let url = outbox_pipeline("sqs_kill", &sink(&queue, json!({"batch_size": 20})));
    let n = 600;
    publish(&url, 0, n);
    let mut r = Relay::spawn(&mut relay_cmd(&url));
    // The messages stay queued to the end: moto dedups only against them.
    wait_until(120, "some messages", || sqs.counts(&queue).0 >= 100);
    r.signal(libc::SIGKILL);
    r.wait_exit(10);
    let at_kill = sqs.counts(&queue).0;
    assert!(
        (at_kill as i64) < n,
        "the relay was killed after it delivered everything ({at_kill}); nothing to test"
    );
    let resumed_from = offset(&url);
    let mut r = Relay::spawn(&mut relay_cmd(&url));
    wait_until(300, "every message", || sqs.counts(&queue).0 >= n as u64);
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(10), Some(0), "{}", r.stderr());
    let got = sqs.drain_until(&queue, 300, "every message", |m| m.len() >= n as usize);
    // Anything left would be a duplicate.
    let extra = sqs.receive(&queue, 1);
    assert!(extra.is_empty(), "duplicates: {extra:?}");
    let ns: HashSet<i64> = got.iter().map(n_of).collect();
    assert_eq!(got.len(), ns.len(), "an event was delivered twice");
    assert_eq!(ns, (0..n).collect::<HashSet<_>>());
    assert!(resumed_from < n, "resumed from {resumed_from}");
}

#[test]
fn sqs_stopped_for_ten_seconds_loses_nothing_and_delivery_resumes() {
    let mut moto = Moto::start();
    let sqs = moto.client();
    let queue = sqs.create_queue("outage", json!({}));
    let url = outbox_pipeline(
        "sqs_outage",
        &sink(&queue, json!({"batch_size": 50, "timeout_ms": 3000})),
    );
    let r = Relay::spawn(&mut relay_cmd(&url));
    publish(&url, 0, 500);
    let before = sqs.drain_until(&queue, 120, "the first 500", |m| m.len() >= 500);
    assert_eq!(
        before.iter().map(n_of).collect::<HashSet<_>>(),
        (0..500).collect::<HashSet<_>>()
    );
    // Everything delivered is committed once the relay is caught up.
    let committed = {
        let mut last = -1;
        wait_until(30, "the offset to settle", || {
            let o = offset(&url);
            let settled = o == last && o > 0;
            last = o;
            std::thread::sleep(Duration::from_millis(300));
            settled
        });
        last
    };
    let stopped = Instant::now();
    moto.stop();
    publish(&url, 500, 500);
    r.wait_log("sqs SendMessageBatch on", 60);
    r.wait_log("retrying", 60);
    // The destination stays down for 10 s; the offset must not move.
    while stopped.elapsed() < Duration::from_secs(10) {
        assert_eq!(
            offset(&url),
            committed,
            "the offset moved while SQS was down"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    moto.start_again();
    let sqs = moto.client();
    let recreated = sqs.create_queue("outage", json!({}));
    assert_eq!(recreated, queue);
    let back = Instant::now();
    let first = sqs.drain_until(&queue, 60, "the first message after the outage", |m| {
        !m.is_empty()
    });
    let resumed_after = back.elapsed();
    let rest = sqs.drain_until(&queue, 120, "the 500 published during the outage", |m| {
        let mut ns: HashSet<i64> = first.iter().map(n_of).collect();
        ns.extend(m.iter().map(n_of));
        (500..1000).all(|i| ns.contains(&i))
    });
    assert!(
        first
            .iter()
            .chain(&rest)
            .all(|m| (500..1000).contains(&n_of(m))),
        "only the events not yet acknowledged are sent again"
    );
    assert!(
        resumed_after < Duration::from_secs(20),
        "delivery resumed {resumed_after:?} after the queue was back"
    );
    wait_until(30, "the offset to move on", || offset(&url) > committed);
}

#[test]
fn an_oversize_event_is_dead_lettered_and_the_rest_delivered() {
    let moto = Moto::shared();
    let sqs = moto.client();
    let queue = sqs.create_queue("oversize.fifo", json!({}));
    let url = outbox_pipeline("sqs_oversize", &sink(&queue, json!({})));
    let mut c = Pg::shared().client(&url);
    c.batch_execute(
        "SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('n', g, 'pad',
                CASE WHEN g = 2 THEN repeat('x', 270000)
                     WHEN g = 3 THEN repeat('x', 200000) ELSE '' END),
                CASE WHEN g = 3 THEN jsonb_build_object('trace', repeat('t', 70000)) END)
         FROM generate_series(0, 4) g",
    )
    .unwrap();
    let out = relay_cmd(&url)
        .args(["--once", "--pipeline", "fwd"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let got = sqs.drain_until(&queue, 60, "three messages", |m| m.len() >= 3);
    assert_eq!(got.iter().map(n_of).collect::<Vec<_>>(), vec![0, 1, 4]);
    let dead = c
        .query(
            "SELECT dedup_key, error, payload->'payload'->>'n' FROM pgtrickle.relay_dead_letters \
             WHERE pipeline = 'fwd' ORDER BY dedup_key",
            &[],
        )
        .unwrap();
    assert_eq!(dead.len(), 2);
    // The body fits; with its headers attribute the message does not.
    let (key, error): (String, String) = (dead[1].get(0), dead[1].get(1));
    assert_eq!(key, "outbox_orders:4:0");
    assert!(error.contains("over the limit of 262144 bytes"), "{error}");
    let (key, error, n): (String, String, Option<String>) =
        (dead[0].get(0), dead[0].get(1), dead[0].get(2));
    assert_eq!(key, "outbox_orders:3:0");
    assert_eq!(n.as_deref(), Some("2"));
    assert!(error.contains("over the limit of 262144 bytes"), "{error}");
    assert!(
        stderr.contains("dead-lettered event outbox_orders:3:0"),
        "{stderr}"
    );
}

#[test]
fn a_bad_sqs_config_names_pipeline_and_key() {
    let run = |db: &str, sink: Value| {
        let url = outbox_pipeline(db, &sink);
        let out = relay(&url)
            .args(["--once", "--pipeline", "fwd"])
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("pipeline \"fwd\""), "{stderr}");
        stderr
    };
    let e = run("sqs_badcfg", json!({"type": "sqs", "region": REGION}));
    assert!(e.contains("sink.queue_url"), "{e}");
    let e = run(
        "sqs_badcfg_secret",
        json!({"type": "sqs", "queue_url": "https://sqs.us-east-1.amazonaws.com/1/q",
               "secret_access_key": "hunter2-secret"}),
    );
    assert!(e.contains("sink.access_key_id"), "{e}");
    assert!(!e.contains("hunter2"), "the secret leaked: {e}");
    let e = run(
        "sqs_badcfg_creds",
        json!({"type": "sqs", "queue_url": "https://sqs.us-east-1.amazonaws.com/1/q"}),
    );
    assert!(
        e.contains("no AWS credentials") && e.contains("sink.access_key_id"),
        "{e}"
    );
}

/// A proxy in front of moto that answers `SendMessageBatch` itself while a
/// rule is set: every entry whose body contains the rule's marker (any
/// entry for an empty marker) is failed with the rule's code, as SQS fails
/// entries (`SenderFault: true`); the others are forwarded.
struct EntryFaults {
    port: u16,
    rule: std::sync::Arc<std::sync::Mutex<Option<(String, String)>>>,
    server: std::sync::Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EntryFaults {
    fn start(endpoint: &str) -> EntryFaults {
        let server = std::sync::Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let rule: std::sync::Arc<std::sync::Mutex<Option<(String, String)>>> = Default::default();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let (srv, r, target) = (server.clone(), rule.clone(), format!("{endpoint}/"));
        let thread = std::thread::spawn(move || {
            while let Ok(mut req) = srv.recv() {
                let mut body = Vec::new();
                let _ = req.as_reader().read_to_end(&mut body);
                let header = |name: &str| {
                    req.headers()
                        .iter()
                        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
                        .map(|h| h.value.as_str().to_string())
                };
                let batch = header("X-Amz-Target").as_deref() == Some("AmazonSQS.SendMessageBatch");
                let rule = r.lock().unwrap().clone();
                let mut failed = Vec::new();
                if let (true, Some((marker, code))) = (batch, rule) {
                    let mut v: Value = serde_json::from_slice(&body).unwrap();
                    let entries = v["Entries"].as_array_mut().unwrap();
                    entries.retain(|e| {
                        let hit = e["MessageBody"].as_str().unwrap().contains(&marker);
                        if hit {
                            failed.push(json!({"Id": e["Id"], "Code": code,
                                "Message": "injected by the test", "SenderFault": true}));
                        }
                        !hit
                    });
                    if entries.is_empty() {
                        let answer = json!({"Successful": [], "Failed": failed});
                        let _ = req.respond(tiny_http::Response::from_string(answer.to_string()));
                        continue;
                    }
                    body = v.to_string().into_bytes();
                }
                // Forward (re-signed bodies are not checked by moto).
                let mut out = agent.post(&target);
                for name in [
                    "Content-Type",
                    "X-Amz-Target",
                    "X-Amz-Date",
                    "Authorization",
                ] {
                    if let Some(v) = header(name) {
                        out = out.header(name, v);
                    }
                }
                let (status, text) = match out.send(&body[..]) {
                    Ok(mut r) => (
                        r.status().as_u16(),
                        r.body_mut().read_to_vec().unwrap_or_default(),
                    ),
                    Err(e) => (502, e.to_string().into_bytes()),
                };
                let mut text = text;
                if !failed.is_empty() && status == 200 {
                    let mut v: Value = serde_json::from_slice(&text).unwrap();
                    v["Failed"] = Value::Array(failed);
                    text = v.to_string().into_bytes();
                }
                let _ = req.respond(tiny_http::Response::from_data(text).with_status_code(status));
            }
        });
        EntryFaults {
            port,
            rule,
            server,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Fail entries whose body contains `marker` with `code` (None: stop).
    fn fail(&self, rule: Option<(&str, &str)>) {
        *self.rule.lock().unwrap() = rule.map(|(m, c)| (m.to_string(), c.to_string()));
    }
}

impl Drop for EntryFaults {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn an_entry_refused_for_its_content_is_dead_lettered_and_a_queue_problem_is_retried() {
    let moto = Moto::shared();
    let sqs = moto.client();
    let queue = sqs.create_queue("entry-faults", json!({}));
    let faults = EntryFaults::start(&moto.endpoint());
    let url = outbox_pipeline(
        "sqs_entry_faults",
        &sink(&queue, json!({"endpoint": faults.endpoint()})),
    );
    let run = || {
        relay_cmd(&url)
            .args(["--once", "--pipeline", "fwd"])
            .output()
            .unwrap()
    };
    // The queue's KMS key is disabled: every entry fails, SenderFault set.
    publish(&url, 0, 3);
    faults.fail(Some(("", "KMS.DisabledException")));
    let out = run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("KMS.DisabledException"), "{stderr}");
    assert!(dead_letter_reasons(&url).is_empty());
    assert_eq!(offset(&url), 0);
    // The key is enabled again, but one event's content is refused.
    faults.fail(Some(("\"n\": 1", "InvalidMessageContents")));
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = sqs.drain_until(&queue, 60, "two messages", |m| m.len() >= 2);
    let mut ns: Vec<i64> = got.iter().map(n_of).collect();
    ns.sort();
    assert_eq!(ns, vec![0, 2]);
    let dead = dead_letter_reasons(&url);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, "outbox_orders:2:0");
    assert!(
        dead[0].1.contains("InvalidMessageContents"),
        "{}",
        dead[0].1
    );
}

#[test]
fn message_groups_route_by_payload_content_per_tenant() {
    let moto = Moto::shared();
    let sqs = moto.client();
    let queue = sqs.create_queue("route.fifo", json!({}));
    let url = outbox_pipeline(
        "sqs_route",
        &sink(
            &queue,
            json!({"message_group_id": "tenant-{payload.tenant}"}),
        ),
    );
    publish_tenants(&url, 20);
    let _r = Relay::spawn(&mut relay_cmd(&url));
    let got = sqs.drain_until(&queue, 120, "20 messages", |m| m.len() >= 20);
    assert_eq!(got.len(), 20);
    for m in &got {
        let tenant = if n_of(m) % 2 == 0 { "a" } else { "b" };
        assert_eq!(
            m["Attributes"]["MessageGroupId"],
            format!("tenant-{tenant}")
        );
    }
    wait_until(30, "the dead letter", || {
        dead_letter_reasons(&url).len() == 1
    });
    assert!(dead_letter_reasons(&url)[0].1.contains("payload.tenant"));
}
