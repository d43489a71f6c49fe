//! CloudEvents 1.0 end to end: sinks with `format: "cloudevents"` in
//! structured and binary mode, against real brokers (Kafka via Tansu,
//! an HTTP receiver, NATS JetStream, RabbitMQ; SQS via moto and Redis
//! Streams, structured only), every event validated
//! against the specification's own JSON schema (vendored in
//! `tests/data/cloudevents/`), and relay → broker → relay round trips
//! into an inbox.
#![cfg(all(
    feature = "kafka",
    feature = "http",
    feature = "nats",
    feature = "rabbitmq",
    feature = "sqs",
    feature = "redis"
))]
// The sync `nats` client is deprecated upstream; it is what the relay uses.
#![allow(deprecated)]

mod support;

use std::time::Duration;

use serde_json::{json, Map, Value};
use support::brokers::{HttpReceiver, Nats, Received, Redis};
use support::kafka::{Kafka, Record};
use support::rabbitmq::amqp::Got;
use support::rabbitmq::Rabbit;
use support::sqs::{Moto, REGION};
use support::*;

/// The specification's JSON schema of an event.
const SCHEMA: &str = include_str!("data/cloudevents/cloudevents.json");
/// The trace context every test event is published with.
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

// ---------------------------------------------------------------------
// The schema, and the specification's rules a schema cannot say.

/// Check `event` against the vendored schema, and against the rules of
/// the specification the schema leaves out (attribute names, string
/// values, `specversion` 1.0).
fn validate(event: &Value) -> Result<(), String> {
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    check(&schema, &schema, event, "event")?;
    let obj = event.as_object().ok_or("not an object")?;
    if obj["specversion"] != "1.0" {
        return Err(format!("specversion {}", obj["specversion"]));
    }
    for (name, v) in obj {
        if name == "data" || name == "data_base64" {
            continue;
        }
        let ok_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !ok_name {
            return Err(format!(
                "attribute name {name:?}: lowercase letters and digits only"
            ));
        }
        if !v.is_string() {
            return Err(format!("attribute {name} is not a string: {v}"));
        }
    }
    Ok(())
}

/// The JSON-schema keywords the vendored schema uses, interpreted; any
/// other keyword fails the check (so a changed schema is not half-read).
fn check(root: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let schema = schema.as_object().expect("a schema is an object");
    for (k, s) in schema {
        match k.as_str() {
            "$ref" => {
                let name = s.as_str().unwrap().strip_prefix("#/definitions/").unwrap();
                check(root, &root["definitions"][name], v, at)?;
            }
            "definitions" => {}
            "type" => {
                let types: Vec<&str> = match s {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(a) => a.iter().map(|t| t.as_str().unwrap()).collect(),
                    _ => panic!("type {s}"),
                };
                let is = |t: &str| match t {
                    "object" => v.is_object(),
                    "string" => v.is_string(),
                    "array" => v.is_array(),
                    "boolean" => v.is_boolean(),
                    "integer" => v.is_i64() || v.is_u64(),
                    "number" => v.is_number(),
                    "null" => v.is_null(),
                    other => panic!("type {other}"),
                };
                if !types.iter().any(|t| is(t)) {
                    return Err(format!("{at}: {v} is not of type {s}"));
                }
            }
            "properties" => {
                if let Some(obj) = v.as_object() {
                    for (name, sub) in s.as_object().unwrap() {
                        if let Some(x) = obj.get(name) {
                            check(root, sub, x, &format!("{at}.{name}"))?;
                        }
                    }
                }
            }
            "required" => {
                if let Some(obj) = v.as_object() {
                    for name in s.as_array().unwrap() {
                        if !obj.contains_key(name.as_str().unwrap()) {
                            return Err(format!("{at}: required {name} missing"));
                        }
                    }
                }
            }
            "minLength" => {
                if let Some(t) = v.as_str() {
                    if (t.chars().count() as u64) < s.as_u64().unwrap() {
                        return Err(format!("{at}: {t:?} is shorter than {s}"));
                    }
                }
            }
            "format" => {
                if let Some(t) = v.as_str() {
                    let ok = match s.as_str().unwrap() {
                        "date-time" => rfc3339(t).is_some(),
                        "uri" => uri_reference(t) && has_scheme(t),
                        "uri-reference" => uri_reference(t),
                        other => panic!("format {other}"),
                    };
                    if !ok {
                        return Err(format!("{at}: {t:?} is not a {s}"));
                    }
                }
            }
            other => panic!("schema keyword {other:?} is not interpreted by this check"),
        }
    }
    Ok(())
}

/// An RFC 3339 date-time as microseconds since the Unix epoch.
fn rfc3339(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = t.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &t[start..i];
        let six: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
        micros = six.parse().ok()?;
    }
    let offset = match &t[i..] {
        "Z" | "z" => 0,
        o if o.len() == 6 && matches!(o.as_bytes()[0], b'+' | b'-') && o.as_bytes()[3] == b':' => {
            let m = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if o.starts_with('-') {
                -m
            } else {
                m
            }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y2, m2) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + s - offset * 60;
    Some(secs * 1_000_000 + micros)
}

/// RFC 3986 characters only, and `%` only as `%XX`.
fn uri_reference(t: &str) -> bool {
    let b = t.as_bytes();
    b.iter().enumerate().all(|(i, c)| match c {
        b'%' => {
            b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
        }
        c => c.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=".contains(c),
    })
}

fn has_scheme(t: &str) -> bool {
    t.split_once(':').is_some_and(|(s, _)| {
        s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    })
}

#[test]
fn the_schema_check_refuses_what_the_specification_refuses() {
    let good = json!({"specversion": "1.0", "id": "1", "source": "/s", "type": "t",
                      "time": "2026-12-02T13:52:06.123456Z", "data": {"a": 1}});
    validate(&good).unwrap();
    for (key, bad) in [
        ("id", json!("")),
        ("id", json!(7)),
        ("time", json!("2026-12-02 13:52:06")),
        ("time", json!("2026-13-02T13:52:06Z")),
        ("source", json!("a source")),
        ("type", Value::Null),
        ("dataschema", json!("no-scheme")),
        ("data", json!(1)),
        ("Bad_Name", json!("x")),
    ] {
        let mut e = good.clone();
        e[key] = bad.clone();
        assert!(validate(&e).is_err(), "{key}: {bad} passed");
    }
    for required in ["specversion", "id", "source", "type"] {
        let mut e = good.clone();
        e.as_object_mut().unwrap().remove(required);
        assert!(validate(&e).is_err(), "without {required}");
    }
    assert_eq!(rfc3339("1970-01-01T00:00:01.5Z"), Some(1_500_000));
    assert_eq!(rfc3339("1970-01-01T01:00:00+01:00"), Some(0));
}

// ---------------------------------------------------------------------
// Helpers.

/// Publish `n` events `{"n": i, "agg": "agg-<i % 3>"}` into outbox
/// `orders`, each row's headers carrying a W3C trace context.
fn publish_traced(url: &str, n: i64) {
    Pg::shared()
        .client(url)
        .execute(
            "SELECT pgtrickle.outbox_publish('orders', \
               jsonb_build_object('n', g, 'agg', 'agg-' || g % 3), \
               jsonb_build_object('traceparent', $2::text, 'tracestate', 'shop=1')) \
             FROM generate_series(0, $1::bigint - 1) g",
            &[&n, &TRACEPARENT],
        )
        .unwrap();
}

/// Each outbox row's `created_at` in microseconds since the epoch, by id.
fn created_at(url: &str) -> std::collections::HashMap<i64, i64> {
    Pg::shared()
        .client(url)
        .query(
            "SELECT id, (extract(epoch FROM created_at) * 1000000)::bigint \
             FROM pgtrickle.outbox_orders",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Check the `n` events of outbox `orders` at `url` (published by
/// [`publish_traced`], one per row, `n` = row index) arrived as valid
/// CloudEvents with the expected attributes, in order.
fn assert_events(url: &str, events: &[Value], n: usize, kind: &str, partitionkey: bool) {
    assert_eq!(events.len(), n, "{events:?}");
    let created = created_at(url);
    for (i, e) in events.iter().enumerate() {
        if let Err(why) = validate(e) {
            panic!("event {i} is not a valid CloudEvent: {why}\n{e}");
        }
        let outbox_id = i as i64 + 1;
        assert_eq!(e["id"], format!("outbox_orders:{outbox_id}:0"), "{e}");
        assert_eq!(e["source"], "/pgtrickle/outbox_orders", "{e}");
        assert_eq!(e["type"], kind, "{e}");
        assert_eq!(e["datacontenttype"], "application/json", "{e}");
        assert_eq!(e["data"], json!({"n": i, "agg": format!("agg-{}", i % 3)}));
        assert_eq!(e["traceparent"], TRACEPARENT, "{e}");
        assert_eq!(e["tracestate"], "shop=1", "{e}");
        let time = rfc3339(e["time"].as_str().unwrap()).unwrap();
        assert_eq!(
            time, created[&outbox_id],
            "time is the row's created_at: {e}"
        );
        match partitionkey {
            true => assert_eq!(e["partitionkey"], format!("agg-{}", i % 3)),
            false => assert!(e.get("partitionkey").is_none(), "{e}"),
        }
    }
}

/// A CloudEvent put together from binary-mode headers (`prefix` stripped,
/// values percent-decoded when `percent`), the content type and the data.
fn from_binary(
    headers: &[(String, String)],
    prefix: &str,
    percent: bool,
    content_type: Option<&str>,
    data: &[u8],
) -> Value {
    let mut e = Map::new();
    for (k, v) in headers {
        if let Some(name) = k.strip_prefix(prefix) {
            let v = if percent {
                percent_decode(v)
            } else {
                v.clone()
            };
            e.insert(name.to_string(), Value::String(v));
        }
    }
    if let Some(t) = content_type {
        e.insert("datacontenttype".into(), Value::String(t.into()));
    }
    e.insert("data".into(), serde_json::from_slice(data).unwrap());
    Value::Object(e)
}

fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&v[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Run pipeline `fwd` once; it must succeed.
fn forward_once(url: &str) {
    let out = run_once(url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Inbox rows (event_id, event_type, source, trace_id, payload), by id.
fn inbox(url: &str, table: &str) -> Vec<(String, String, String, Option<String>, Value)> {
    Pg::shared()
        .client(url)
        .query(
            &format!(
                "SELECT event_id, event_type, source, trace_id, payload::text \
                 FROM pgtrickle.{table} ORDER BY split_part(event_id, ':', 2)::int"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            let p: String = r.get(4);
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                serde_json::from_str(&p).unwrap(),
            )
        })
        .collect()
}

/// The inbox holds the `n` events of [`publish_traced`] with the
/// CloudEvents attributes: event_id = dedup key, event_type = `type`,
/// source, trace_id = `traceparent`, payload = data.
fn assert_inbox(url: &str, table: &str, n: usize, kind: &str) {
    let rows = inbox(url, table);
    assert_eq!(rows.len(), n);
    for (i, (id, event_type, source, trace_id, payload)) in rows.into_iter().enumerate() {
        assert_eq!(id, format!("outbox_orders:{}:0", i + 1));
        assert_eq!(event_type, kind);
        assert_eq!(source, "/pgtrickle/outbox_orders");
        assert_eq!(trace_id.as_deref(), Some(TRACEPARENT));
        assert_eq!(payload, json!({"n": i, "agg": format!("agg-{}", i % 3)}));
    }
}

// ---------------------------------------------------------------------
// Kafka.

fn header<'a>(r: &'a Record, name: &str) -> Option<&'a str> {
    r.header(name)
}

#[test]
fn kafka_structured_and_binary() {
    let k = Kafka::start();
    k.create_topic("ce.s", 1);
    k.create_topic("ce.b", 1);
    let structured = outbox_pipeline(
        "ce_kafka_s",
        &json!({"type": "kafka", "brokers": k.brokers(), "topic": "ce.s",
                "key": "{payload.agg}", "format": "cloudevents"}),
    );
    let binary = outbox_pipeline(
        "ce_kafka_b",
        &json!({"type": "kafka", "brokers": k.brokers(), "topic": "ce.b",
                "format": "cloudevents", "cloudevents_mode": "binary",
                "cloudevents_type": "com.shop.{stream_table}.{op}"}),
    );
    publish_traced(&structured, 20);
    publish_traced(&binary, 20);
    forward_once(&structured);
    forward_once(&binary);

    let records = k.read("ce.s", 20, 60);
    for r in &records {
        assert_eq!(
            header(r, "content-type"),
            Some("application/cloudevents+json; charset=UTF-8")
        );
    }
    let events: Vec<Value> = records.iter().map(Record::json).collect();
    assert_events(&structured, &events, 20, "orders.insert", true);
    assert_eq!(records[4].key.as_deref(), Some("agg-1"), "the key template");

    let records = k.read("ce.b", 20, 60);
    let events: Vec<Value> = records
        .iter()
        .map(|r| {
            assert_eq!(r.key.as_deref(), r.header("ce_id"), "no key: the dedup key");
            from_binary(
                &r.headers,
                "ce_",
                false,
                header(r, "content-type"),
                &r.value,
            )
        })
        .collect();
    assert_events(&binary, &events, 20, "com.shop.orders.insert", false);
}

// ---------------------------------------------------------------------
// HTTP.

fn requests(h: &HttpReceiver, path: &str) -> Vec<Received> {
    h.accepted().into_iter().filter(|r| r.url == path).collect()
}

#[test]
fn http_structured_batches_and_events_and_binary_events() {
    let h = HttpReceiver::start();
    let batch = outbox_pipeline(
        "ce_http_batch",
        &json!({"type": "http", "url": h.url("/batch"), "format": "cloudevents",
                "cloudevents_mode": "structured"}),
    );
    let event = outbox_pipeline(
        "ce_http_event",
        &json!({"type": "http", "url": h.url("/event"), "mode": "event",
                "format": "cloudevents"}),
    );
    let binary = outbox_pipeline(
        "ce_http_binary",
        &json!({"type": "http", "url": h.url("/binary"), "mode": "event",
                "format": "cloudevents", "cloudevents_mode": "binary",
                "cloudevents_source": "//shop.example/{stream_table}",
                "cloudevents_subject": "order {payload.n}"}),
    );
    for url in [&batch, &event, &binary] {
        publish_traced(url, 10);
        forward_once(url);
    }

    let got = requests(&h, "/batch");
    assert!(!got.is_empty());
    let mut events = Vec::new();
    for r in &got {
        assert_eq!(
            r.header("content-type"),
            Some("application/cloudevents-batch+json; charset=UTF-8")
        );
        events.extend(r.json().as_array().unwrap().iter().cloned());
    }
    assert_events(&batch, &events, 10, "orders.insert", false);

    let got = requests(&h, "/event");
    for r in &got {
        assert_eq!(
            r.header("content-type"),
            Some("application/cloudevents+json; charset=UTF-8")
        );
    }
    let events: Vec<Value> = got.iter().map(Received::json).collect();
    assert_events(&event, &events, 10, "orders.insert", false);

    let got = requests(&h, "/binary");
    let events: Vec<Value> = got
        .iter()
        .map(|r| from_binary(&r.headers, "ce-", true, r.header("content-type"), &r.body))
        .collect();
    assert_eq!(
        got[3].header("ce-subject"),
        Some("order%203"),
        "percent-encoded"
    );
    for (i, e) in events.iter().enumerate() {
        validate(e).unwrap();
        assert_eq!(e["source"], "//shop.example/orders");
        assert_eq!(e["subject"], format!("order {i}"));
        assert_eq!(e["id"], format!("outbox_orders:{}:0", i + 1));
        assert_eq!(e["traceparent"], TRACEPARENT);
        assert_eq!(e["data"]["n"], i);
    }
}

#[test]
fn bad_cloudevents_keys_name_pipeline_and_key() {
    for (db, sink, key) in [
        (
            "ce_bad_mode",
            json!({"type": "kafka", "brokers": "127.0.0.1:9", "format": "cloudevents",
                   "cloudevents_mode": "binery"}),
            "sink.cloudevents_mode",
        ),
        (
            "ce_bad_format",
            json!({"type": "nats", "url": "nats://127.0.0.1:9", "stream": "S",
                   "format": "cloud_events"}),
            "sink.format",
        ),
        (
            "ce_bad_batch",
            json!({"type": "http", "url": "http://127.0.0.1:9/", "format": "cloudevents",
                   "cloudevents_mode": "binary"}),
            "sink.cloudevents_mode",
        ),
        (
            "ce_bad_type",
            json!({"type": "rabbitmq", "url": "amqp://127.0.0.1:9", "exchange": "x",
                   "cloudevents_type": "{stream_table}"}),
            "sink.cloudevents_type",
        ),
        (
            "ce_bad_redis",
            json!({"type": "redis", "url": "redis://127.0.0.1:9", "format": "cloudevents",
                   "cloudevents_mode": "binary"}),
            "sink.cloudevents_mode",
        ),
        (
            "ce_bad_stdout",
            json!({"type": "stdout", "format": "cloudevents"}),
            "sink.format",
        ),
        (
            "ce_bad_sqs",
            json!({"type": "sqs", "queue_url": "http://127.0.0.1:9/1/q", "region": "us-east-1",
                   "format": "cloudevents", "cloudevents_mode": "binary"}),
            "sink.cloudevents_mode",
        ),
        (
            "ce_bad_pg_inbox",
            json!({"type": "pg-inbox", "url": "postgres://127.0.0.1:9/x", "inbox": "i",
                   "format": "cloudevents"}),
            "sink.format",
        ),
    ] {
        let url = outbox_pipeline(db, &sink);
        let out = run_once(&url);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{db}: {stderr}");
        assert!(
            stderr.contains("pipeline \"fwd\"") && stderr.contains(key),
            "{db}: {stderr}"
        );
    }
}

/// Events `{"n": 0, "kind": "paid"}`, `{"n": 1}` (no kind), `{"n": 2, "kind": "paid"}`.
fn publish_kinds(url: &str) {
    Pg::shared()
        .client(url)
        .batch_execute(
            "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 0, \"kind\": \"paid\"}'); \
             SELECT pgtrickle.outbox_publish('orders', '{\"n\": 1}'); \
             SELECT pgtrickle.outbox_publish('orders', '{\"n\": 2, \"kind\": \"paid\"}');",
        )
        .unwrap();
}

#[test]
fn an_event_a_cloudevents_template_cannot_render_is_a_dead_letter_on_every_sink() {
    let k = Kafka::start();
    k.create_topic("ce.dl", 1);
    let h = HttpReceiver::start();
    let n = Nats::start();
    create_stream(&n, "CEDL", &["cedl.>"]);
    let r = Rabbit::shared();
    r.declare("ce_dl_q", "ce_dl_x", "#");
    let moto = Moto::start();
    let sqs_queue = moto.client().create_queue("ce_dl", json!({}));
    let redis = Redis::start();
    let ce = json!({"format": "cloudevents", "cloudevents_type": "shop.{payload.kind}"});
    let with = |mut sink: Value| {
        for (key, v) in ce.as_object().unwrap() {
            sink[key] = v.clone();
        }
        sink
    };
    let sinks = [
        (
            "ce_dl_kafka",
            with(json!({"type": "kafka", "brokers": k.brokers(), "topic": "ce.dl"})),
        ),
        (
            "ce_dl_http",
            with(json!({"type": "http", "url": h.url("/dl")})),
        ),
        (
            "ce_dl_nats",
            with(json!({"type": "nats", "url": n.url(), "stream": "CEDL",
                        "subject": "cedl.{stream_table}"})),
        ),
        (
            "ce_dl_rmq",
            with(json!({"type": "rabbitmq", "url": r.url(), "exchange": "ce_dl_x"})),
        ),
        ("ce_dl_sqs", with(sqs(&sqs_queue, json!({})))),
        (
            "ce_dl_redis",
            with(json!({"type": "redis", "url": redis.url(), "stream": "ce.dl"})),
        ),
    ];
    for (db, sink) in sinks {
        let url = outbox_pipeline(db, &sink);
        publish_kinds(&url);
        forward_once(&url);
        let dead = dead_letter_reasons(&url);
        assert_eq!(dead.len(), 1, "{db}: {dead:?}");
        assert_eq!(dead[0].0, "outbox_orders:2:0", "{db}");
        assert!(
            dead[0].1.contains("shop.{payload.kind}") && dead[0].1.contains("payload.kind"),
            "{db}: {}",
            dead[0].1
        );
    }
    let types = |events: Vec<Value>| -> Vec<(Value, Value)> {
        events
            .into_iter()
            .map(|e| (e["type"].clone(), e["data"]["n"].clone()))
            .collect()
    };
    let want = vec![
        (json!("shop.paid"), json!(0)),
        (json!("shop.paid"), json!(2)),
    ];
    assert_eq!(
        types(k.read("ce.dl", 2, 60).iter().map(Record::json).collect()),
        want
    );
    let http: Vec<Value> = requests(&h, "/dl")
        .iter()
        .flat_map(|r| r.json().as_array().unwrap().clone())
        .collect();
    assert_eq!(types(http), want);
    let nats = read_stream(&n, "CEDL", 2);
    assert_eq!(
        types(
            nats.iter()
                .map(|(_, b)| serde_json::from_slice(b).unwrap())
                .collect()
        ),
        want
    );
    assert_eq!(
        types(r.take("ce_dl_q", 2, 60).iter().map(Got::json).collect()),
        want
    );
    // A standard queue: the two messages may come in any order.
    let got = moto
        .client()
        .drain_until(&sqs_queue, 60, "2 messages", |g| g.len() >= 2);
    let mut sqs: Vec<Value> = got
        .iter()
        .map(|m| serde_json::from_str(m["Body"].as_str().unwrap()).unwrap())
        .collect();
    sqs.sort_by_key(|e| e["data"]["n"].as_i64());
    assert_eq!(types(sqs), want);
    let entries = redis_entries(&redis, "ce.dl");
    let events = entries
        .iter()
        .map(|f| serde_json::from_str(f["payload"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(types(events), want);
}

// ---------------------------------------------------------------------
// NATS.

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

/// Header (name, value) pairs.
type Headers = Vec<(String, String)>;

/// The first `want` messages of `stream`: headers and body.
fn read_stream(n: &Nats, stream: &str, want: usize) -> Vec<(Headers, Vec<u8>)> {
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
    while out.len() < want {
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
        out.push((headers, m.data.clone()));
    }
    out
}

fn nats_header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[test]
fn nats_structured_and_binary() {
    let n = Nats::start();
    create_stream(&n, "CES", &["ces.>"]);
    create_stream(&n, "CEB", &["ceb.>"]);
    let structured = outbox_pipeline(
        "ce_nats_s",
        &json!({"type": "nats", "url": n.url(), "stream": "CES",
                "subject": "ces.{stream_table}", "format": "cloudevents"}),
    );
    let binary = outbox_pipeline(
        "ce_nats_b",
        &json!({"type": "nats", "url": n.url(), "stream": "CEB",
                "subject": "ceb.{stream_table}", "format": "cloudevents",
                "cloudevents_mode": "binary"}),
    );
    for url in [&structured, &binary] {
        publish_traced(url, 10);
        forward_once(url);
    }
    let got = read_stream(&n, "CES", 10);
    let events: Vec<Value> = got
        .iter()
        .map(|(h, body)| {
            assert_eq!(
                nats_header(h, "content-type"),
                Some("application/cloudevents+json; charset=UTF-8")
            );
            serde_json::from_slice(body).unwrap()
        })
        .collect();
    assert_events(&structured, &events, 10, "orders.insert", false);
    let got = read_stream(&n, "CEB", 10);
    let events: Vec<Value> = got
        .iter()
        .map(|(h, body)| from_binary(h, "ce-", true, nats_header(h, "content-type"), body))
        .collect();
    assert_events(&binary, &events, 10, "orders.insert", false);
}

// ---------------------------------------------------------------------
// RabbitMQ.

/// The `cloudEvents:*` headers of a message, as (name, text).
fn amqp_headers(g: &Got) -> Vec<(String, String)> {
    let Some(table) = g.properties.headers().as_ref() else {
        return Vec::new();
    };
    table
        .keys()
        .filter_map(|k| Some((k.clone(), g.header(k)?)))
        .collect()
}

#[test]
fn rabbitmq_structured_and_binary() {
    let r = Rabbit::shared();
    r.declare("ce_s_q", "ce_s_x", "#");
    r.declare("ce_b_q", "ce_b_x", "#");
    let structured = outbox_pipeline(
        "ce_rmq_s",
        &json!({"type": "rabbitmq", "url": r.url(), "exchange": "ce_s_x",
                "routing_key": "{payload.agg}", "format": "cloudevents"}),
    );
    let binary = outbox_pipeline(
        "ce_rmq_b",
        &json!({"type": "rabbitmq", "url": r.url(), "exchange": "ce_b_x",
                "format": "cloudevents", "cloudevents_mode": "binary"}),
    );
    for url in [&structured, &binary] {
        publish_traced(url, 10);
        forward_once(url);
    }
    let got = r.take("ce_s_q", 10, 60);
    let events: Vec<Value> = got
        .iter()
        .map(|g| {
            assert_eq!(
                g.properties.content_type().as_deref(),
                Some("application/cloudevents+json; charset=UTF-8")
            );
            g.json()
        })
        .collect();
    assert_events(&structured, &events, 10, "orders.insert", true);
    let got = r.take("ce_b_q", 10, 60);
    let events: Vec<Value> = got
        .iter()
        .map(|g| {
            let ct = g.properties.content_type().clone();
            from_binary(
                &amqp_headers(g),
                "cloudEvents:",
                false,
                ct.as_deref(),
                &g.body,
            )
        })
        .collect();
    assert_events(&binary, &events, 10, "orders.insert", false);
}

// ---------------------------------------------------------------------
// SQS (structured mode only: SQS has no CloudEvents binding).

/// An SQS sink or source config for `queue` on moto.
fn sqs(queue: &str, extra: Value) -> Value {
    let mut s = json!({"type": "sqs", "queue_url": queue, "region": REGION,
                       "access_key_id": "AKIDTEST", "secret_access_key": "test-secret"});
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

#[test]
fn sqs_structured() {
    let m = Moto::start();
    let q = m.client();
    let queue = q.create_queue(
        "ce.fifo",
        json!({"FifoQueue": "true", "ContentBasedDeduplication": "false"}),
    );
    let url = outbox_pipeline(
        "ce_sqs_s",
        &sqs(
            &queue,
            json!({"message_group_id": "{payload.agg}", "format": "cloudevents"}),
        ),
    );
    publish_traced(&url, 10);
    forward_once(&url);
    let got = q.drain_until(&queue, 60, "10 messages", |g| g.len() >= 10);
    let mut events: Vec<Value> = got
        .iter()
        .map(|msg| {
            assert_eq!(
                support::sqs::attr(msg, "content-type"),
                Some("application/cloudevents+json; charset=UTF-8")
            );
            serde_json::from_str(msg["Body"].as_str().unwrap()).unwrap()
        })
        .collect();
    // Each message group is in order; the groups interleave.
    let id = |e: &Value| -> i64 {
        let id = e["id"].as_str().unwrap();
        id.split(':').nth(1).unwrap().parse().unwrap()
    };
    events.sort_by_key(id);
    assert_events(&url, &events, 10, "orders.insert", true);
}

// ---------------------------------------------------------------------
// Redis Streams (structured mode only: Redis has no CloudEvents binding).

/// The entries of `stream`, each as its fields.
fn redis_entries(r: &Redis, stream: &str) -> Vec<Map<String, Value>> {
    let mut c = redis::Client::open(r.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query(&mut c)
        .unwrap();
    reply
        .ids
        .into_iter()
        .map(|e| {
            e.map
                .iter()
                .map(|(k, v)| {
                    let v: String = redis::from_redis_value_ref(v).unwrap();
                    (k.clone(), Value::String(v))
                })
                .collect()
        })
        .collect()
}

#[test]
fn redis_structured_and_round_trip() {
    let r = Redis::start();
    let url = outbox_pipeline(
        "ce_redis",
        &json!({"type": "redis", "url": r.url(), "stream": "ce.{stream_table}",
                "format": "cloudevents"}),
    );
    publish_traced(&url, 10);
    forward_once(&url);
    let events: Vec<Value> = redis_entries(&r, "ce.orders")
        .iter()
        .map(|f| {
            assert_eq!(
                f["content-type"],
                "application/cloudevents+json; charset=UTF-8"
            );
            serde_json::from_str(f["payload"].as_str().unwrap()).unwrap()
        })
        .collect();
    assert_events(&url, &events, 10, "orders.insert", false);
    set_inbox(
        &url,
        json!({"type": "redis", "url": r.url(), "stream": "ce.orders", "max_wait_ms": 50}),
    );
    run_until_inbox(&url, "events", 10, &mut relay(&url));
    assert_inbox(&url, "events", 10, "orders.insert");
}

// ---------------------------------------------------------------------
// Round trips: relay → broker → relay into an inbox.

/// Run every pipeline of `url` until inbox `table` holds `n` rows.
fn run_until_inbox(url: &str, table: &str, n: i64, cmd: &mut std::process::Command) {
    let relay = Relay::spawn(cmd);
    let count = || {
        Pg::shared()
            .client(url)
            .query_one(&format!("SELECT count(*) FROM pgtrickle.{table}"), &[])
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(-1)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} in {table}; log:\n{}",
            count(),
            relay.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!relay.stderr().contains("ERROR"), "{}", relay.stderr());
}

#[test]
fn round_trip_through_kafka_in_both_modes() {
    let k = Kafka::start();
    for (db, mode) in [("ce_rt_kafka_b", "binary"), ("ce_rt_kafka_s", "structured")] {
        let topic = format!("rt.{mode}");
        k.create_topic(&topic, 2);
        let url = outbox_pipeline(
            db,
            &json!({"type": "kafka", "brokers": k.brokers(), "topic": topic,
                    "key": "{payload.agg}", "format": "cloudevents",
                    "cloudevents_mode": mode}),
        );
        set_inbox(
            &url,
            json!({"type": "kafka", "brokers": k.brokers(), "topic": topic,
                   "group_id": format!("g-{mode}"), "max_wait_ms": 50,
                   "properties": {"session.timeout.ms": 6000}}),
        );
        publish_traced(&url, 30);
        run_until_inbox(&url, "events", 30, &mut relay(&url));
        assert_inbox(&url, "events", 30, "orders.insert");
    }
}

#[test]
fn round_trip_through_http_batches() {
    let port = free_port();
    let url = outbox_pipeline(
        "ce_rt_http",
        &json!({"type": "http", "url": format!("http://127.0.0.1:{port}/hooks"),
                "format": "cloudevents"}),
    );
    set_inbox(
        &url,
        json!({"type": "http", "listen": format!("127.0.0.1:{port}"), "path": "/hooks"}),
    );
    publish_traced(&url, 25);
    run_until_inbox(&url, "events", 25, &mut relay(&url));
    assert_inbox(&url, "events", 25, "orders.insert");
}

#[test]
fn round_trip_through_sqs() {
    let m = Moto::start();
    let queue = m.client().create_queue("ce_rt", json!({}));
    let url = outbox_pipeline("ce_rt_sqs", &sqs(&queue, json!({"format": "cloudevents"})));
    set_inbox(
        &url,
        sqs(&queue, json!({"wait_time_seconds": 1, "max_wait_ms": 50})),
    );
    publish_traced(&url, 20);
    run_until_inbox(&url, "events", 20, &mut relay(&url));
    assert_inbox(&url, "events", 20, "orders.insert");
}

#[test]
fn round_trip_through_nats_and_rabbitmq() {
    let n = Nats::start();
    create_stream(&n, "RTN", &["rtn.>"]);
    let url = outbox_pipeline(
        "ce_rt_nats",
        &json!({"type": "nats", "url": n.url(), "stream": "RTN",
                "subject": "rtn.{stream_table}", "format": "cloudevents",
                "cloudevents_mode": "binary"}),
    );
    set_inbox(
        &url,
        json!({"type": "nats", "url": n.url(), "stream": "RTN", "max_wait_ms": 50}),
    );
    publish_traced(&url, 20);
    run_until_inbox(&url, "events", 20, &mut relay(&url));
    assert_inbox(&url, "events", 20, "orders.insert");

    let r = Rabbit::shared();
    let url = outbox_pipeline(
        "ce_rt_rmq",
        &json!({"type": "rabbitmq", "url": r.url(), "exchange": "ce_rt_x",
                "declare": true, "format": "cloudevents", "cloudevents_mode": "binary"}),
    );
    set_inbox(
        &url,
        json!({"type": "rabbitmq", "url": r.url(), "queue": "ce_rt_q", "declare": true,
               "exchange": "ce_rt_x", "binding_key": "#", "max_wait_ms": 50}),
    );
    publish_traced(&url, 20);
    run_until_inbox(&url, "events", 20, &mut relay(&url));
    assert_inbox(&url, "events", 20, "orders.insert");
}
