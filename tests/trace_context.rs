//! W3C trace context end to end, per broker: a traceparent (and
//! tracestate) set in the writing transaction (`SET LOCAL
//! pgtrickle.traceparent`) goes with `outbox_publish` into the row's
//! headers, the relay's sink sends it to the broker as a native header
//! (checked with the broker's own client), and the relay's source for that
//! broker brings it back into an inbox's `trace_id`: relay → broker →
//! relay. An event published without one arrives without one.
// The sync `nats` client is deprecated upstream; it is what the relay uses.
#![allow(deprecated)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TS: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";

/// A database with outbox `orders` and pipeline `fwd` writing to `sink`,
/// holding two events: `{"n": 1}` published in a transaction with
/// `pgtrickle.traceparent` and `pgtrickle.tracestate` set, `{"n": 2}`
/// without.
fn traced_outbox(db: &str, sink: Value) -> String {
    let url = outbox_pipeline(db, &sink);
    let mut c = Pg::shared().client(&url);
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(&format!(
        "SET LOCAL pgtrickle.traceparent = '{TP}';
         SET LOCAL pgtrickle.tracestate = '{TS}';
         SELECT pgtrickle.outbox_publish('orders', '{{\"n\": 1}}');"
    ))
    .unwrap();
    tx.commit().unwrap();
    c.batch_execute("SELECT pgtrickle.outbox_publish('orders', '{\"n\": 2}')")
        .unwrap();
    url
}

/// Run pipeline `pipeline` of `url` with `--once`; it must succeed.
fn run(url: &str, pipeline: &str) {
    let out = relay(url)
        .args(["--once", "--pipeline", pipeline])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{pipeline}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` → `trace_id` of the rows of inbox `inbox` at `url`.
fn traces(url: &str, inbox: &str) -> BTreeMap<i64, Option<String>> {
    Pg::shared()
        .client(url)
        .query(
            &format!("SELECT (payload->>'n')::bigint, trace_id FROM pgtrickle.{inbox}"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// What every round trip must end with: event 1 under the traceparent,
/// event 2 without a trace id (`untraced`: what the source's previous
/// default finds for it).
fn expect(url: &str, inbox: &str, untraced: Option<&str>) {
    let got = traces(url, inbox);
    let want = BTreeMap::from([(1, Some(TP.to_string())), (2, untraced.map(str::to_string))]);
    assert_eq!(got, want, "inbox {inbox}");
}

/// Feed inbox `events` of `url` from `source` (pipeline `rin`), run it
/// once, and check the trace ids.
fn round_trip(url: &str, source: Value) {
    set_inbox(url, source);
    run(url, "rin");
    expect(url, "events", None);
}

/// Check what a broker got for the two events: `headers(n)` gives the
/// (traceparent, tracestate) native headers of event `n`.
fn expect_native(mut headers: impl FnMut(i64) -> (Option<String>, Option<String>)) {
    assert_eq!(
        headers(1),
        (Some(TP.to_string()), Some(TS.to_string())),
        "event 1"
    );
    assert_eq!(headers(2), (None, None), "event 2");
}

#[cfg(feature = "kafka")]
#[test]
fn kafka_record_headers_and_back() {
    use support::kafka::Kafka;
    let k = Kafka::start();
    k.create_topic("orders", 1);
    let url = traced_outbox(
        "trace_kafka",
        json!({"type": "kafka", "brokers": k.brokers(), "topic": "orders"}),
    );
    run(&url, "fwd");
    let records = k.read("orders", 2, 60);
    let by_n: BTreeMap<i64, _> = records
        .iter()
        .map(|r| (r.json()["n"].as_i64().unwrap(), r))
        .collect();
    expect_native(|n| {
        let r = by_n[&n];
        (
            r.header("traceparent").map(str::to_string),
            r.header("tracestate").map(str::to_string),
        )
    });
    round_trip(
        &url,
        json!({"type": "kafka", "brokers": k.brokers(), "topic": "orders",
               "group_id": "trace", "max_wait_ms": 50}),
    );
}

#[cfg(feature = "nats")]
#[test]
fn nats_headers_and_back() {
    use support::brokers::Nats;
    let n = Nats::start();
    let nc = nats::connect(n.url()).unwrap();
    let api = |subject: &str, body: Value| -> Value {
        let m = nc
            .request_timeout(subject, body.to_string(), Duration::from_secs(5))
            .unwrap();
        serde_json::from_slice(&m.data).unwrap()
    };
    let r = api(
        "$JS.API.STREAM.CREATE.ORDERS",
        json!({"name": "ORDERS", "subjects": ["pgtrickle.orders.*"], "storage": "file",
               "num_replicas": 1}),
    );
    assert!(r.get("error").is_none(), "{r}");
    let url = traced_outbox(
        "trace_nats",
        json!({"type": "nats", "url": n.url(), "stream": "ORDERS"}),
    );
    run(&url, "fwd");
    // Read both messages with an ephemeral push consumer.
    let inbox = nc.new_inbox();
    let sub = nc.subscribe(&inbox).unwrap();
    let r = api(
        "$JS.API.CONSUMER.CREATE.ORDERS",
        json!({"stream_name": "ORDERS", "config": {"deliver_subject": inbox,
               "ack_policy": "none", "deliver_policy": "all"}}),
    );
    assert!(r.get("error").is_none(), "{r}");
    let mut by_n = BTreeMap::new();
    while by_n.len() < 2 {
        let m = sub.next_timeout(Duration::from_secs(10)).unwrap();
        let body: Value = serde_json::from_slice(&m.data).unwrap();
        let h = m.headers.clone().unwrap_or_default();
        let get = |name: &str| h.get(name).cloned();
        by_n.insert(
            body["n"].as_i64().unwrap(),
            (get("traceparent"), get("tracestate")),
        );
    }
    expect_native(|n| by_n[&n].clone());
    round_trip(
        &url,
        json!({"type": "nats", "url": n.url(), "stream": "ORDERS", "max_wait_ms": 50}),
    );
}

#[cfg(feature = "redis")]
#[test]
fn redis_entry_fields_and_back() {
    use support::brokers::Redis;
    let r = Redis::start();
    let url = traced_outbox(
        "trace_redis",
        json!({"type": "redis", "url": r.url(), "stream": "orders"}),
    );
    run(&url, "fwd");
    // XRANGE's reply as its strings in order: per entry its id, then
    // field name, value, name, value ...
    let reply = r.command(&["XRANGE", "orders", "-", "+"]);
    let strings: Vec<&str> = reply
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.starts_with('*') && !l.starts_with('$'))
        .collect();
    let is_id = |s: &str| {
        s.split_once('-').is_some_and(|(a, b)| {
            !a.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
        })
    };
    let mut by_n = BTreeMap::new();
    for entry in strings.split(|s| is_id(s)).filter(|e| !e.is_empty()) {
        let field = |name: &str| {
            entry
                .chunks(2)
                .find(|kv| kv[0] == name)
                .map(|kv| kv[1].to_string())
        };
        let payload: Value = serde_json::from_str(&field("payload").unwrap()).unwrap();
        by_n.insert(
            payload["n"].as_i64().unwrap(),
            (field("traceparent"), field("tracestate")),
        );
    }
    assert_eq!(by_n.len(), 2, "{reply}");
    expect_native(|n| by_n[&n].clone());
    round_trip(
        &url,
        json!({"type": "redis", "url": r.url(), "stream": "orders", "consumer": "c1",
               "max_wait_ms": 50}),
    );
}

#[cfg(feature = "rabbitmq")]
#[test]
fn rabbitmq_headers_table_and_back() {
    use support::rabbitmq::Rabbit;
    let r = Rabbit::shared();
    // One queue for this test to look at, one for the relay's source.
    r.declare("trace_peek", "trace_x", "#");
    r.declare("trace_in", "trace_x", "#");
    let url = traced_outbox(
        "trace_rabbitmq",
        json!({"type": "rabbitmq", "url": r.url(), "exchange": "trace_x"}),
    );
    run(&url, "fwd");
    let got = r.take("trace_peek", 2, 60);
    let by_n: BTreeMap<i64, _> = got
        .iter()
        .map(|g| (g.json()["n"].as_i64().unwrap(), g))
        .collect();
    expect_native(|n| {
        let g = by_n[&n];
        (g.header("traceparent"), g.header("tracestate"))
    });
    // Event 2 has no traceparent: its trace id is the previous default,
    // the correlation-id property, which the sink does not set.
    round_trip(
        &url,
        json!({"type": "rabbitmq", "url": r.url(), "queue": "trace_in", "max_wait_ms": 50}),
    );
}

#[cfg(feature = "sqs")]
#[test]
fn sqs_message_attributes_and_back() {
    use support::sqs::{attr, Moto, REGION};
    let moto = Moto::shared();
    let sqs = moto.client();
    let queue = sqs.create_queue("trace", json!({}));
    let keys = json!({"type": "sqs", "queue_url": queue, "region": REGION,
                      "endpoint": moto.endpoint(), "access_key_id": "AKIDTEST",
                      "secret_access_key": "test-secret"});
    let url = traced_outbox("trace_sqs", keys.clone());
    run(&url, "fwd");
    // Look without taking: visibility timeout 0.
    let mut by_n = BTreeMap::new();
    wait_until(60, "both messages in the queue", || {
        let r = sqs.ok(
            "ReceiveMessage",
            json!({"QueueUrl": queue, "MaxNumberOfMessages": 10, "WaitTimeSeconds": 1,
                   "VisibilityTimeout": 0, "MessageAttributeNames": ["All"]}),
        );
        for m in r["Messages"].as_array().cloned().unwrap_or_default() {
            let body: Value = serde_json::from_str(m["Body"].as_str().unwrap()).unwrap();
            let a = |name: &str| attr(&m, name).map(str::to_string);
            by_n.insert(
                body["n"].as_i64().unwrap(),
                (a("traceparent"), a("tracestate")),
            );
        }
        by_n.len() == 2
    });
    expect_native(|n| by_n[&n].clone());
    let mut source = keys;
    source["wait_time_seconds"] = json!(1);
    source["max_wait_ms"] = json!(50);
    round_trip(&url, source);
}

#[cfg(feature = "http")]
#[test]
fn http_request_headers_and_back() {
    use support::brokers::HttpReceiver;
    let h = HttpReceiver::start();
    // `fwd`: one request per event to a receiver this test looks at.
    let url = traced_outbox(
        "trace_http",
        json!({"type": "http", "url": h.url("/hook"), "mode": "event"}),
    );
    // `fwd2`: batches to the relay's own http source (pipeline `rin`, in
    // the same relay): the batch holds both events, so the request has no
    // traceparent of its own and each event's comes from its envelope.
    let port = free_port();
    let mut c = Pg::shared().client(&url);
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('fwd2', 'orders', 'default', $1::text::jsonb)",
        &[&json!({"type": "http", "url": format!("http://127.0.0.1:{port}/in")}).to_string()],
    )
    .unwrap();
    set_inbox(
        &url,
        json!({"type": "http", "listen": format!("127.0.0.1:{port}"), "path": "/in"}),
    );
    let relay_proc = Relay::spawn(&mut relay(&url));
    // The two pipelines run independently: wait for both, not only the
    // inbox (CI once saw the receiver with one request of two here).
    wait_until(60, "both events in the inbox and at the receiver", || {
        traces(&url, "events").len() == 2 && h.accepted().len() == 2
    });
    drop(relay_proc);
    let requests = h.accepted();
    let by_n: BTreeMap<i64, _> = requests
        .iter()
        .map(|r| (r.json()["payload"]["n"].as_i64().unwrap(), r))
        .collect();
    assert_eq!(by_n.len(), 2);
    expect_native(|n| {
        let r = by_n[&n];
        (
            r.header("traceparent").map(str::to_string),
            r.header("tracestate").map(str::to_string),
        )
    });
    expect(&url, "events", None);
}

#[test]
fn postgres_inbox_and_outbox_carry_it_into_trace_id() {
    // The pg-inbox sink writes the traceparent into trace_id ...
    let pg = Pg::shared();
    let db = "trace_postgres";
    let url = pg.url(db);
    let url = traced_outbox(
        db,
        json!({"type": "pg-inbox", "url": url, "inbox": "direct"}),
    );
    pg.client(&url)
        .batch_execute("SELECT pgtrickle.create_inbox('direct')")
        .unwrap();
    run(&url, "fwd");
    expect(&url, "direct", None);
    // ... and so does the postgres source, from the outbox headers.
    round_trip(
        &url,
        json!({"type": "postgres", "url": url, "outbox": "orders"}),
    );
}

#[test]
fn stdout_lines_carry_it_and_stdin_reads_it_back() {
    let dir = temp_dir("trace_stdout");
    let file = dir.join("events.jsonl");
    let url = traced_outbox("trace_stdout", json!({"type": "stdout", "path": file}));
    run(&url, "fwd");
    let lines = read_jsonl(&file);
    let by_n: BTreeMap<i64, &Value> = lines
        .iter()
        .map(|l| (l["payload"]["n"].as_i64().unwrap(), l))
        .collect();
    expect_native(|n| {
        let h = &by_n[&n]["headers"];
        let get = |name: &str| h.get(name).and_then(Value::as_str).map(str::to_string);
        (get("traceparent"), get("tracestate"))
    });
    round_trip(&url, json!({"type": "stdin", "path": file}));
}
