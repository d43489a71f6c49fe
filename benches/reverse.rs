//! Reverse throughput, part of `make bench` (`cargo bench --bench reverse`):
//! 200,000 messages of about 200 bytes into an inbox, from a file (`stdin`
//! source), from a private redis-server (`redis` source), from a private
//! nats-server with JetStream (`nats` source), from a private Tansu broker
//! (`kafka` source) and from a private RabbitMQ node (`rabbitmq` source),
//! and `BENCH_SQS_MESSAGES` (default 1,000) from a private moto_server's
//! SQS queue (`sqs` source), with the release relay run `--once`, into a
//! private PostgreSQL with the default durability settings.
//!
//! Beside them, in the same run and on the same rows, PostgreSQL's own
//! insert limit: the 200,000 rows (event_id, event_type, payload) inserted
//! by a bare client into the same inbox in transactions of 5,000 (the
//! relay's default batch), once as one multi-row
//! `INSERT ... SELECT FROM unnest($1::text[], ...) ON CONFLICT (event_id) DO
//! NOTHING` per transaction, once as `COPY` into a temporary staging table
//! then `INSERT ... SELECT ... ON CONFLICT` from it; both are reported and
//! the faster is every reverse figure's limit.
//!
//! `BENCH_ONLY` (comma-separated substrings) selects scenarios;
//! `BENCH_RUNS` (default 3) runs each, the median is reported. JSON lines
//! on stdout (see benches/common/mod.rs), progress on stderr.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Instant;

use common::{emit, median, selected, Limit};
use serde_json::json;
use support::{relay, temp_dir, Pg};

/// Messages per scenario: `BENCH_EVENTS` (default 200,000).
fn events() -> usize {
    common::env_or("BENCH_EVENTS", 200_000)
}

/// Rows per transaction of the insert limit: the relay's default batch.
const INSERT_BATCH: usize = 5_000;

fn body(i: usize) -> String {
    format!(
        r#"{{"id":{i},"customer":"customer-{}","sku":"{:032x}","qty":{},"price":12.34,"note":"{}"}}"#,
        i % 9973,
        i.wrapping_mul(2654435761),
        i % 10,
        "x".repeat(60)
    )
}

/// Every reverse figure's limit, set once measured.
static LIMIT: std::sync::OnceLock<Limit> = std::sync::OnceLock::new();

/// Run `pipeline` `runs` times (`reset` before each) and report; `n`
/// messages must arrive each time.
fn scenario(url: &str, name: &str, pipeline: &str, n: usize, runs: usize, reset: &dyn Fn()) {
    if !selected(name) {
        return;
    }
    let mut c = Pg::shared_durable().client(url);
    let mut rates = Vec::new();
    let mut peak = 0f64;
    for i in 0..runs {
        c.batch_execute("TRUNCATE pgtrickle.events").unwrap();
        reset();
        let t = Instant::now();
        let mut child = relay(url)
            .args(["--once", "--log-level", "warn", "--pipeline", pipeline])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (status, mb) = common::wait_peak_rss(&mut child);
        let secs = t.elapsed().as_secs_f64();
        let out = child.wait_with_output().unwrap();
        assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        peak = peak.max(mb);
        let rows: i64 = c
            .query_one("SELECT count(*) FROM pgtrickle.events", &[])
            .unwrap()
            .get(0);
        assert_eq!(rows as usize, n, "{name}: every message must arrive");
        eprintln!(
            "{name} run {}: {secs:.2}s, {:.0} events/s, peak RSS {mb:.1} MB",
            i + 1,
            n as f64 / secs
        );
        rates.push(n as f64 / secs);
    }
    let params = json!({"events": n, "runs": runs, "pipeline": pipeline,
        "min": rates.iter().cloned().fold(f64::MAX, f64::min).round()});
    // moto, not PostgreSQL, bounds the SQS source: no limit beside it.
    let limit = LIMIT.get().filter(|_| !name.contains("_sqs_"));
    emit(name, median(&rates), "events/s", limit, params);
    emit(
        &format!("{name}_peak_rss"),
        peak,
        "MB",
        None,
        json!({"events": n, "runs": runs, "pipeline": pipeline, "of": "max over runs"}),
    );
}

/// One COPY text field: backslash, tab, newline and carriage return escaped.
fn copy_field(out: &mut String, s: &str) {
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// PostgreSQL's insert limit for the reverse rows (see the module doc):
/// `runs` times each way into inbox `events` (emptied before each);
/// emits both and returns the faster as `pg_insert`.
fn insert_limit(url: &str, runs: usize) -> Limit {
    let mut c = Pg::shared_durable().client(url);
    let ids: Vec<String> = (0..events()).map(|i| format!("e{i}")).collect();
    let bodies: Vec<String> = (0..events()).map(body).collect();
    let types = vec!["order"; INSERT_BATCH];
    let unnest = c
        .prepare(
            "INSERT INTO pgtrickle.events (event_id, event_type, payload) \
             SELECT id, et, p::jsonb FROM unnest($1::text[], $2::text[], $3::text[]) AS m(id, et, p) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .unwrap();
    c.batch_execute(
        "CREATE TEMP TABLE stage (event_id text, event_type text, payload text) ON COMMIT DELETE ROWS",
    )
    .unwrap();
    let count = |c: &mut postgres::Client| -> usize {
        let n: i64 = c
            .query_one("SELECT count(*) FROM pgtrickle.events", &[])
            .unwrap()
            .get(0);
        n as usize
    };
    let (mut by_unnest, mut by_copy) = (Vec::new(), Vec::new());
    for run in 0..runs {
        c.batch_execute("TRUNCATE pgtrickle.events").unwrap();
        let t = Instant::now();
        for (id, b) in ids.chunks(INSERT_BATCH).zip(bodies.chunks(INSERT_BATCH)) {
            c.execute(&unnest, &[&id, &&types[..id.len()], &b]).unwrap();
        }
        by_unnest.push(events() as f64 / t.elapsed().as_secs_f64());
        assert_eq!(count(&mut c), events());

        c.batch_execute("TRUNCATE pgtrickle.events").unwrap();
        let t = Instant::now();
        let mut text = String::new();
        for (id, b) in ids.chunks(INSERT_BATCH).zip(bodies.chunks(INSERT_BATCH)) {
            text.clear();
            for (i, p) in id.iter().zip(b) {
                copy_field(&mut text, i);
                text.push_str("\torder\t");
                copy_field(&mut text, p);
                text.push('\n');
            }
            let mut tx = c.transaction().unwrap();
            let mut w = tx.copy_in("COPY stage FROM STDIN").unwrap();
            w.write_all(text.as_bytes()).unwrap();
            w.finish().unwrap();
            tx.execute(
                "INSERT INTO pgtrickle.events (event_id, event_type, payload) \
                 SELECT event_id, event_type, payload::jsonb FROM stage \
                 ON CONFLICT (event_id) DO NOTHING",
                &[],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        by_copy.push(events() as f64 / t.elapsed().as_secs_f64());
        assert_eq!(count(&mut c), events());
        eprintln!(
            "pg insert limit run {}: unnest {:.0} rows/s, COPY+INSERT {:.0} rows/s",
            run + 1,
            by_unnest[run],
            by_copy[run]
        );
    }
    c.batch_execute("TRUNCATE pgtrickle.events").unwrap();
    let params = json!({"events": events(), "runs": runs, "batch": INSERT_BATCH});
    let (u, k) = (median(&by_unnest), median(&by_copy));
    emit(
        &format!("limit_pg_insert_unnest_{}", events()),
        u,
        "events/s",
        None,
        params.clone(),
    );
    emit(
        &format!("limit_pg_insert_copy_{}", events()),
        k,
        "events/s",
        None,
        params,
    );
    Limit::new(u.max(k), "pg_insert")
}

fn main() {
    if !common::benching() {
        return;
    }
    let runs = common::runs();
    let url = Pg::shared_durable().new_db("bench_reverse");
    Pg::shared_durable()
        .client(&url)
        .batch_execute("SELECT pgtrickle.create_inbox('events')")
        .unwrap();
    let names = ["file", "redis", "nats", "kafka", "rabbitmq"]
        .map(|s| format!("reverse_{s}_to_inbox_{}", events()));
    if names.iter().any(|n| selected(n)) || selected("limit_pg_insert_") {
        LIMIT.set(insert_limit(&url, runs)).unwrap();
    }
    let dir = temp_dir("bench_reverse");
    let file = dir.join("in.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
    for i in 0..events() {
        writeln!(
            f,
            r#"{{"event_id":"e{i}","event_type":"order","payload":{}}}"#,
            body(i)
        )
        .unwrap();
    }
    drop(f);
    let mut c = Pg::shared_durable().client(&url);
    c.execute(
        "SELECT pgtrickle.set_relay_inbox('file-in', 'events', $1::text::jsonb)",
        &[&serde_json::json!({"type": "stdin", "path": file}).to_string()],
    )
    .unwrap();
    scenario(
        &url,
        &format!("reverse_file_to_inbox_{}", events()),
        "file-in",
        events(),
        runs,
        &|| {},
    );
    c.batch_execute("SELECT pgtrickle.disable_relay('file-in')")
        .unwrap();
    #[cfg(feature = "redis")]
    if selected(&format!("reverse_redis_to_inbox_{}", events())) {
        let r = support::brokers::Redis::start();
        let client = redis::Client::open(r.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        for chunk in (0..events()).collect::<Vec<_>>().chunks(1000) {
            let mut p = redis::pipe();
            for i in chunk {
                p.cmd("XADD")
                    .arg("bench")
                    .arg("*")
                    .arg("dedup_key")
                    .arg(format!("r{i}"))
                    .arg("payload")
                    .arg(body(*i))
                    .ignore();
            }
            p.query::<()>(&mut con).unwrap();
        }
        c.execute(
            "SELECT pgtrickle.set_relay_inbox('redis-in', 'events', $1::text::jsonb)",
            &[
                &serde_json::json!({"type": "redis", "url": r.url(), "stream": "bench",
                "group": "bench", "consumer": "bench"})
                .to_string(),
            ],
        )
        .unwrap();
        scenario(
            &url,
            &format!("reverse_redis_to_inbox_{}", events()),
            "redis-in",
            events(),
            runs,
            &|| {
                // Read everything again: drop the group, the relay recreates it
                // from the start.
                let _: redis::RedisResult<i64> = redis::cmd("XGROUP")
                    .arg("DESTROY")
                    .arg("bench")
                    .arg("bench")
                    .query(&mut client.get_connection().unwrap());
            },
        );
    }
    #[cfg(feature = "nats")]
    if selected(&format!("reverse_nats_to_inbox_{}", events())) {
        let n = support::brokers::Nats::start();
        nats_fill(&n);
        c.execute(
            "SELECT pgtrickle.set_relay_inbox('nats-in', 'events', $1::text::jsonb)",
            &[
                &serde_json::json!({"type": "nats", "url": n.url(), "stream": "BENCH",
                "consumer": "bench"})
                .to_string(),
            ],
        )
        .unwrap();
        scenario(
            &url,
            &format!("reverse_nats_to_inbox_{}", events()),
            "nats-in",
            events(),
            runs,
            &|| nats_reset(&n),
        );
    }
    #[cfg(feature = "kafka")]
    if selected(&format!("reverse_kafka_to_inbox_{}", events())) {
        let k = support::kafka::Kafka::start();
        k.create_topic("bench", 3);
        let records: Vec<support::kafka::Produce> = (0..events())
            .map(|i| (Some(format!("k{i}")), body(i).into_bytes(), Vec::new()))
            .collect();
        k.produce("bench", &records);
        drop(records);
        // Read everything again in every run: a new consumer group each
        // time starts at the earliest record.
        let run = std::cell::Cell::new(0);
        scenario(
            &url,
            &format!("reverse_kafka_to_inbox_{}", events()),
            "kafka-in",
            events(),
            runs,
            &|| {
                run.set(run.get() + 1);
                set_kafka_pipeline(&url, &k.brokers(), &format!("bench-{}", run.get()));
            },
        );
    }
    #[cfg(feature = "rabbitmq")]
    bench_rabbitmq(&url, runs);
    #[cfg(feature = "sqs")]
    bench_sqs(&url, runs);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stream `BENCH` on `bench.>` with the `events()` messages, each with a
/// `Nats-Msg-Id`, published in windows of 10,000 awaited PubAcks.
#[cfg(feature = "nats")]
#[allow(deprecated)]
fn nats_fill(n: &support::brokers::Nats) {
    let nc = nats::connect(n.url()).unwrap();
    let timeout = std::time::Duration::from_secs(20);
    let created = nc
        .request_timeout(
            "$JS.API.STREAM.CREATE.BENCH",
            serde_json::json!({"name": "BENCH", "subjects": ["bench.>"], "storage": "file",
                "num_replicas": 1})
            .to_string(),
            timeout,
        )
        .unwrap();
    assert!(!String::from_utf8_lossy(&created.data).contains("\"error\""));
    let inbox = nc.new_inbox();
    let acks = nc.subscribe(&format!("{inbox}.*")).unwrap();
    for chunk in (0..events()).collect::<Vec<_>>().chunks(10_000) {
        for i in chunk {
            let mut h = nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("n{i}"));
            nc.publish_with_reply_or_headers(
                "bench.orders",
                Some(&format!("{inbox}.{i}")),
                Some(&h),
                body(*i),
            )
            .unwrap();
        }
        for _ in chunk {
            let m = acks.next_timeout(timeout).unwrap();
            assert!(!String::from_utf8_lossy(&m.data).contains("\"error\""));
        }
    }
}

/// Read everything again: delete the consumer, the relay recreates it at
/// the first message.
#[cfg(feature = "nats")]
#[allow(deprecated)]
fn nats_reset(n: &support::brokers::Nats) {
    let nc = nats::connect(n.url()).unwrap();
    let _ = nc.request_timeout(
        "$JS.API.CONSUMER.DELETE.BENCH.bench",
        "",
        std::time::Duration::from_secs(5),
    );
}

/// Point pipeline `kafka-in` at topic `bench` as consumer group `group`.
#[cfg(feature = "kafka")]
fn set_kafka_pipeline(url: &str, brokers: &str, group: &str) {
    Pg::shared_durable()
        .client(url)
        .execute(
            "SELECT pgtrickle.set_relay_inbox('kafka-in', 'events', $1::text::jsonb)",
            &[
                &serde_json::json!({"type": "kafka", "brokers": brokers, "topic": "bench",
                "group_id": group, "properties": {"session.timeout.ms": 6000}})
                .to_string(),
            ],
        )
        .unwrap();
}

/// 200,000 persistent messages from a durable queue of a private RabbitMQ
/// node (the default prefetch), filled anew before each run.
#[cfg(feature = "rabbitmq")]
fn bench_rabbitmq(url: &str, runs: usize) {
    if !selected(&format!("reverse_rabbitmq_to_inbox_{}", events())) {
        return;
    }
    let r = support::rabbitmq::Rabbit::start();
    r.declare("bench", "", "");
    let messages: Vec<(Option<String>, Option<String>, Vec<u8>)> = (0..events())
        .map(|i| (Some(format!("q{i}")), None, body(i).into_bytes()))
        .collect();
    Pg::shared_durable()
        .client(url)
        .execute(
            "SELECT pgtrickle.set_relay_inbox('rabbitmq-in', 'events', $1::text::jsonb)",
            &[
                &serde_json::json!({"type": "rabbitmq", "url": r.url(), "queue": "bench",
                                  "max_wait_ms": 1000})
                .to_string(),
            ],
        )
        .unwrap();
    scenario(
        url,
        &format!("reverse_rabbitmq_to_inbox_{}", events()),
        "rabbitmq-in",
        events(),
        runs,
        &|| {
            let (_conn, ch) = r.open();
            ch.queue_purge("bench").unwrap();
            r.publish("", "bench", &messages);
        },
    );
}

/// `BENCH_SQS_MESSAGES` (default 1,000) messages from a standard queue of
/// a private moto_server, each with a `dedup_key` attribute; the queue is
/// filled anew (8 senders) before each run. moto does work proportional to
/// the queue's length for every message sent, so filling it is quadratic:
/// keep the count small.
#[cfg(feature = "sqs")]
fn bench_sqs(url: &str, runs: usize) {
    let n: usize = common::env_or("BENCH_SQS_MESSAGES", 1_000);
    let name = format!("reverse_sqs_to_inbox_{n}");
    if !selected(&name) {
        return;
    }
    let moto = support::sqs::Moto::start();
    let queue = moto.client().create_queue("bench", serde_json::json!({}));
    Pg::shared_durable()
        .client(url)
        .execute(
            "SELECT pgtrickle.set_relay_inbox('sqs-in', 'events', $1::text::jsonb)",
            &[&serde_json::json!({"type": "sqs", "queue_url": queue,
                "region": support::sqs::REGION, "access_key_id": "bench",
                "secret_access_key": "bench", "wait_time_seconds": 1})
            .to_string()],
        )
        .unwrap();
    let fill = || {
        let t = Instant::now();
        std::thread::scope(|s| {
            for part in 0..8 {
                let (moto, queue) = (&moto, &queue);
                s.spawn(move || {
                    let msgs: Vec<serde_json::Value> = (part..n)
                        .step_by(8)
                        .map(|i| {
                            serde_json::json!({"MessageBody": body(i), "MessageAttributes":
                                {"dedup_key": {"DataType": "String",
                                               "StringValue": format!("s{i}")}}})
                        })
                        .collect();
                    moto.client().send(queue, &msgs);
                });
            }
        });
        eprintln!("filled the queue in {:.1}s", t.elapsed().as_secs_f64());
    };
    scenario(url, &name, "sqs-in", n, runs, &fill);
}
