//! Forward throughput, part of `make bench` (`cargo bench --bench relay`).
//!
//! Starts a private PostgreSQL with the default durability settings, fills
//! kit outboxes, and times the release relay binary (`--once`: drain and
//! exit) forwarding them to a file and to private brokers. Beside every
//! relay figure, in the same run and on the same rows, it measures the
//! limit the relay works against:
//!
//! - the PostgreSQL read limit: a bare client reading the same outbox rows
//!   with their payload text, in the relay's order, both with
//!   `COPY (SELECT id, txid::text, refresh_id::text, payload::text,
//!   headers::text ... ORDER BY txid, id) TO STDOUT` and with a portal of
//!   the same SELECT fetched 1,000 rows at a time (as the relay reads); the
//!   faster of the two is the limit (COPY skips the per-row protocol
//!   overhead, the portal is the relay's own access path);
//! - each broker's own publish limit: a bare pipelined publisher in this
//!   binary, with the crates the relay uses, sending the same messages
//!   (body, headers, keys and ids as the relay's sink makes them, taken
//!   from a relay run to a file) and awaiting every acknowledgement: NATS
//!   JetStream PubAcks (4,096 in flight), Redis `XADD` pipelined 1,000 per
//!   round trip, Kafka (Tansu) with `acks=all` and the idempotent producer,
//!   RabbitMQ persistent messages with publisher confirms (5,000 in
//!   flight: RabbitMQ did worse with 16,384).
//!
//! A relay figure's limit is the PostgreSQL read limit, or for a broker
//! min(read limit, broker limit). Every figure is the median of
//! `BENCH_RUNS` runs (default 3); a broker's limit run precedes each relay
//! run. `BENCH_ONLY` (comma-separated substrings of the figure names)
//! selects scenarios, `BENCH_BATCH` sets the pipelines' batch_size.
//! JSON lines on stdout (see benches/common/mod.rs), progress on stderr.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::Instant;

use common::{emit, median, selected, Limit};
use serde::Deserialize;
use serde_json::{json, value::RawValue};
use support::{relay, temp_dir, Pg};

/// ~200 bytes of JSON per event.
const ROW: &str = "jsonb_build_object('id', g, 'customer', 'customer-' || (g % 9973), \
     'sku', md5(g::text), 'qty', g % 10, 'price', 12.34, 'note', repeat('x', 60))";

/// Rows of the one-event outbox every sink scenario reads: `BENCH_EVENTS`
/// (default 200,000). The batched outbox has a thousandth as many rows of
/// 1,000 events each, the claim-check outbox five times as many events
/// (at least 20,000).
fn single() -> u64 {
    common::env_or("BENCH_EVENTS", 200_000)
}

fn pg() -> &'static Pg {
    Pg::shared_durable()
}

/// Run the relay once over `pipeline` from the start; wall seconds and
/// peak RSS (MB).
fn run_relay(url: &str, pipeline: &str) -> (f64, f64) {
    let mut c = pg().client(url);
    c.execute(
        "DELETE FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = $1",
        &[&pipeline],
    )
    .unwrap();
    let start = Instant::now();
    let mut child = relay(url)
        .args(["--once", "--log-level", "warn", "--pipeline", pipeline])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (status, rss) = common::wait_peak_rss(&mut child);
    let seconds = start.elapsed().as_secs_f64();
    assert!(status.success(), "relay failed: {status}");
    (seconds, rss)
}

fn count_lines(file: &std::path::Path) -> u64 {
    let mut f = std::fs::File::open(file).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            return n;
        }
        n += buf[..k].iter().filter(|c| **c == b'\n').count() as u64;
    }
}

/// A broker's publish limit: its name and a bare publisher of the
/// messages (run after `reset`), returning its seconds.
type Broker<'a> = (&'a str, &'a dyn Fn() -> f64);

/// One relay scenario: `reset` empties the destination before each run,
/// `delivered` counts what arrived after it.
struct Scenario<'a> {
    name: &'a str,
    pipeline: &'a str,
    events: u64,
    reset: &'a dyn Fn(),
    delivered: &'a dyn Fn() -> u64,
    pg_read: Option<&'a Limit>,
    broker: Option<Broker<'a>>,
}

impl Scenario<'_> {
    fn run(&self, url: &str, runs: usize) {
        if !selected(self.name) {
            return;
        }
        let events = self.events as f64;
        let (mut rates, mut rss, mut limits) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs {
            if let Some((broker, publish)) = &self.broker {
                (self.reset)();
                let secs = publish();
                eprintln!(
                    "{broker} limit run {}: {secs:.2}s, {:.0} events/s",
                    i + 1,
                    events / secs
                );
                limits.push(events / secs);
            }
            (self.reset)();
            let (secs, peak) = run_relay(url, self.pipeline);
            let got = (self.delivered)();
            assert_eq!(got, self.events, "{}: every event must arrive", self.name);
            eprintln!(
                "{} run {}: {secs:.2}s, {:.0} events/s, peak RSS {peak:.1} MB",
                self.name,
                i + 1,
                events / secs
            );
            rates.push(events / secs);
            rss.push(peak);
        }
        let params = json!({"events": self.events, "runs": runs, "pipeline": self.pipeline});
        let broker = self.broker.map(|(b, _)| {
            let l = Limit::new(median(&limits), b);
            emit(
                &format!("limit_{b}_{}_events", self.events),
                l.value,
                "events/s",
                None,
                json!({"events": self.events, "runs": runs,
                       "min": limits.iter().cloned().fold(f64::MAX, f64::min).round()}),
            );
            l
        });
        let limit = match (self.pg_read, &broker) {
            (Some(r), Some(b)) => Some(Limit::min(r, b)),
            (Some(r), None) => Some(r.clone()),
            (None, b) => b.clone(),
        };
        let mut p = params.clone();
        p["min"] = json!(rates.iter().cloned().fold(f64::MAX, f64::min).round());
        emit(self.name, median(&rates), "events/s", limit.as_ref(), p);
        let mut p = params;
        p["max"] = json!(common::round(rss.iter().cloned().fold(0.0, f64::max), 1));
        emit(
            &format!("{}_peak_rss", self.name),
            median(&rss),
            "MB",
            None,
            p,
        );
    }
}

/// The PostgreSQL read limit of outbox `outbox` (`events` events): a bare
/// client reading the same rows with their payload text, in the relay's
/// order, by COPY and by a portal fetched 1,000 rows at a time, `runs`
/// times each. Emits both (named `limit_pg_read_{copy,portal}_<what>`) and
/// returns the faster as `pg_read`.
fn pg_read_limit(url: &str, outbox: &str, what: &str, events: u64, runs: usize) -> Limit {
    let mut c = pg().client(url);
    let row = c
        .query_one(
            "SELECT outbox_table, delta_table FROM pgtrickle.relay_outbox_info($1)",
            &[&outbox],
        )
        .unwrap();
    let (table, delta): (String, Option<String>) = (row.get(0), row.get(1));
    // A claim-check outbox's events are the rows of its delta table.
    let sql = match delta {
        Some(d) if what.contains("claim") => format!(
            "SELECT outbox_id, row_num, op::text, payload::text FROM pgtrickle.\"{d}\" \
             ORDER BY outbox_id, row_num"
        ),
        _ => format!(
            "SELECT id, txid::text, refresh_id::text, payload::text, headers::text \
             FROM pgtrickle.\"{table}\" ORDER BY txid, id"
        ),
    };
    let (mut copy, mut portal) = (Vec::new(), Vec::new());
    let mut rows = 0u64;
    for i in 0..runs {
        let t = Instant::now();
        let mut r = c.copy_out(&format!("COPY ({sql}) TO STDOUT")).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut lines = 0u64;
        loop {
            let k = r.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            lines += buf[..k].iter().filter(|b| **b == b'\n').count() as u64;
        }
        drop(r);
        copy.push(events as f64 / t.elapsed().as_secs_f64());
        rows = lines;

        let t = Instant::now();
        let mut tx = c.transaction().unwrap();
        let st = tx.prepare(&sql).unwrap();
        let p = tx.bind(&st, &[]).unwrap();
        let (mut n, mut bytes) = (0u64, 0usize);
        loop {
            let got = tx.query_portal(&p, 1000).unwrap();
            for r in &got {
                let payload: &str = r.get(3);
                bytes += payload.len();
            }
            n += got.len() as u64;
            if got.len() < 1000 {
                break;
            }
        }
        tx.commit().unwrap();
        assert_eq!(n, lines, "COPY and the portal read the same rows");
        assert!(bytes > 0);
        portal.push(events as f64 / t.elapsed().as_secs_f64());
        eprintln!(
            "pg read limit {what} run {}: COPY {:.0} events/s, portal {:.0} events/s ({n} rows)",
            i + 1,
            copy[i],
            portal[i]
        );
    }
    let params = json!({"events": events, "rows": rows, "runs": runs, "outbox": outbox});
    let (cm, pm) = (median(&copy), median(&portal));
    emit(
        &format!("limit_pg_read_copy_{what}"),
        cm,
        "events/s",
        None,
        params.clone(),
    );
    emit(
        &format!("limit_pg_read_portal_{what}"),
        pm,
        "events/s",
        None,
        params,
    );
    Limit::new(cm.max(pm), "pg_read")
}

/// One event as the relay's file sink wrote it (the fields the brokers'
/// messages are made of).
#[derive(Deserialize)]
#[cfg_attr(
    not(any(
        feature = "redis",
        feature = "nats",
        feature = "kafka",
        feature = "rabbitmq"
    )),
    allow(dead_code)
)]
struct Msg {
    dedup_key: String,
    subject: String,
    op: String,
    payload: Box<RawValue>,
    is_full_refresh: bool,
    outbox_id: i64,
    refresh_id: Option<String>,
}

/// The events of outbox `single` as the relay delivers them: one relay run
/// to a file, read back.
fn messages(url: &str, dir: &std::path::Path) -> Vec<Msg> {
    let file = dir.join("messages.jsonl");
    set_pipeline(url, "messages", json!({"type": "stdout", "path": file}));
    run_relay(url, "messages");
    let text = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    let msgs: Vec<Msg> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(msgs.len() as u64, single());
    msgs
}

fn main() {
    if !common::benching() {
        return;
    }
    let runs = common::runs();
    let url = pg().new_db("bench");
    let dir = temp_dir("bench");
    let mut c = pg().client(&url);
    let n = single();
    // Over outbox_inline_threshold (10,000): a claim-check row.
    let claim = (5 * n).max(20_000);
    let file_cases = [
        (format!("forward_file_{n}_rows_x1_event"), "single", n),
        (
            format!("forward_file_{}_rows_x1000_events", n / 1000),
            "batched",
            n / 1000 * 1000,
        ),
        (
            format!("forward_file_claim_check_{claim}_events"),
            "claim",
            claim,
        ),
    ];
    let sink_names = [
        "redis",
        "pg_inbox",
        "http_batch",
        "nats",
        "kafka",
        "rabbitmq",
    ]
    .map(|s| format!("forward_{s}_{n}_rows_x1_event"));
    let any_sink = sink_names.iter().any(|s| selected(s));
    let t = Instant::now();
    let load = [
        ("single", format!("SELECT count(pgtrickle.outbox_publish('single', {ROW})) FROM generate_series(1, {n}) g")),
        ("batched", format!("SELECT count(pgtrickle.outbox_publish_delta('batched', \
                  (SELECT jsonb_agg({ROW}) FROM generate_series(b * 1000, b * 1000 + 999) g))) \
           FROM generate_series(1, {}) b", n / 1000)),
        ("claim", format!("SELECT pgtrickle.outbox_publish_delta('claim', \
                  (SELECT jsonb_agg({ROW}) FROM generate_series(1, {claim}) g))")),
    ];
    for (outbox, sql) in &load {
        let needed = file_cases
            .iter()
            .any(|(name, o, _)| o == outbox && selected(name))
            || (*outbox == "single" && any_sink);
        if needed {
            c.execute("SELECT pgtrickle.enable_outbox($1)", &[outbox])
                .unwrap();
            c.batch_execute(sql).unwrap();
        }
    }
    c.batch_execute("VACUUM ANALYZE").unwrap();
    eprintln!("loaded outboxes in {:.1}s", t.elapsed().as_secs_f64());
    // BENCH_BATCH sets the pipelines' batch_size; else the relay's default.
    let batch: Option<u64> = std::env::var("BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok());
    let with_batch = |mut sink: serde_json::Value| {
        if let Some(b) = batch {
            sink["batch_size"] = json!(b);
        }
        sink
    };
    let mut single_read = None;
    for (name, outbox, events) in &file_cases {
        let (name, outbox, events) = (name.as_str(), *outbox, *events);
        if !selected(name) {
            continue;
        }
        let what = name.trim_start_matches("forward_file_");
        let limit = pg_read_limit(&url, outbox, what, events, runs);
        if outbox == "single" {
            single_read = Some(limit.clone());
        }
        let file = dir.join(format!("{outbox}.jsonl"));
        c.execute(
            "SELECT pgtrickle.set_relay_outbox($1, $1, 'bench', $2::text::jsonb)",
            &[
                &outbox,
                &with_batch(json!({"type": "stdout", "path": file})).to_string(),
            ],
        )
        .unwrap();
        Scenario {
            name,
            pipeline: outbox,
            events,
            reset: &|| {
                let _ = std::fs::remove_file(&file);
            },
            delivered: &|| count_lines(&file),
            pg_read: Some(&limit),
            broker: None,
        }
        .run(&url, runs);
    }
    if any_sink {
        let read = single_read.unwrap_or_else(|| {
            pg_read_limit(&url, "single", &format!("{n}_rows_x1_event"), n, runs)
        });
        let sinks = Sinks {
            url: &url,
            runs,
            read: &read,
            msgs: &messages(&url, &dir),
            batch,
        };
        sinks.all();
    }
    #[cfg(feature = "sqs")]
    bench_sqs(&url, runs);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Point pipeline `name` at outbox `single` with `sink`.
fn set_pipeline(url: &str, name: &str, sink: serde_json::Value) {
    pg().client(url)
        .execute(
            "SELECT pgtrickle.set_relay_outbox($1, 'single', 'bench', $2::text::jsonb)",
            &[&name, &sink.to_string()],
        )
        .unwrap();
}

/// The sink scenarios over outbox `single`, with what they share.
#[cfg_attr(
    not(all(
        feature = "redis",
        feature = "nats",
        feature = "kafka",
        feature = "rabbitmq"
    )),
    allow(dead_code)
)]
struct Sinks<'a> {
    url: &'a str,
    runs: usize,
    /// The PostgreSQL read limit of outbox `single`.
    read: &'a Limit,
    /// Its events as the relay delivers them.
    msgs: &'a [Msg],
    batch: Option<u64>,
}

impl Sinks<'_> {
    fn all(&self) {
        #[cfg(feature = "redis")]
        self.redis();
        #[cfg(feature = "pg-inbox")]
        self.pg_inbox();
        #[cfg(feature = "http")]
        self.http();
        #[cfg(feature = "nats")]
        self.nats();
        #[cfg(feature = "kafka")]
        self.kafka();
        #[cfg(feature = "rabbitmq")]
        self.rabbitmq();
    }

    /// Point pipeline `name` at outbox `single` with `sink` (and
    /// `BENCH_BATCH`).
    fn set(&self, name: &str, mut sink: serde_json::Value) {
        if let Some(b) = self.batch {
            sink["batch_size"] = json!(b);
        }
        set_pipeline(self.url, name, sink);
    }

    /// A scenario over outbox `single`.
    fn scenario<'a>(
        &'a self,
        name: &'a str,
        pipeline: &'a str,
        reset: &'a dyn Fn(),
        delivered: &'a dyn Fn() -> u64,
        broker: Option<Broker<'a>>,
    ) -> Scenario<'a> {
        Scenario {
            name,
            pipeline,
            events: single(),
            reset,
            delivered,
            pg_read: Some(self.read),
            broker,
        }
    }

    /// To a private redis-server; its limit: the same `XADD`s (explicit
    /// ids, same fields), pipelined 1,000 per round trip.
    #[cfg(feature = "redis")]
    fn redis(&self) {
        let name = &format!("forward_redis_{}_rows_x1_event", single());
        if !selected(name) {
            return;
        }
        let r = support::brokers::Redis::start();
        self.set(
            "redis",
            json!({"type": "redis", "url": r.url(), "stream": "bench"}),
        );
        let publish = || {
            let mut con = redis::Client::open(r.url())
                .unwrap()
                .get_connection()
                .unwrap();
            let t = Instant::now();
            for chunk in self.msgs.chunks(1000) {
                let mut p = redis::pipe();
                for m in chunk {
                    let index = m.dedup_key.rsplit(':').next().unwrap();
                    let cmd = p
                        .cmd("XADD")
                        .arg("bench")
                        .arg(format!("{}-{index}", m.outbox_id))
                        .arg("dedup_key")
                        .arg(&m.dedup_key)
                        .arg("subject")
                        .arg(&m.subject)
                        .arg("op")
                        .arg(&m.op)
                        .arg("payload")
                        .arg(m.payload.get())
                        .arg("full_refresh")
                        .arg(if m.is_full_refresh { "true" } else { "false" })
                        .arg("outbox_id")
                        .arg(m.outbox_id);
                    if let Some(rid) = &m.refresh_id {
                        cmd.arg("refresh_id").arg(rid);
                    }
                    cmd.ignore();
                }
                p.query::<()>(&mut con).unwrap();
            }
            t.elapsed().as_secs_f64()
        };
        let xlen = || {
            let reply = r.command(&["XLEN", "bench"]);
            reply.trim().trim_start_matches(':').parse().unwrap_or(0)
        };
        let reset = || {
            r.command(&["DEL", "bench"]);
        };
        self.scenario(name, "redis", &reset, &xlen, Some(("redis_xadd", &publish)))
            .run(self.url, self.runs);
    }

    /// To an inbox on a second private PostgreSQL (also durable); limit:
    /// the read limit.
    #[cfg(feature = "pg-inbox")]
    fn pg_inbox(&self) {
        let name = &format!("forward_pg_inbox_{}_rows_x1_event", single());
        if !selected(name) {
            return;
        }
        let remote = Pg::durable();
        let inbox = remote.new_db("bench_inbox");
        let c = std::cell::RefCell::new(remote.client(&inbox));
        c.borrow_mut()
            .batch_execute("SELECT pgtrickle.create_inbox('events')")
            .unwrap();
        self.set(
            "pg-inbox",
            json!({"type": "pg-inbox", "url": inbox, "inbox": "events"}),
        );
        let reset = || {
            c.borrow_mut()
                .batch_execute("TRUNCATE pgtrickle.events")
                .unwrap();
        };
        let count = || {
            let n: i64 = c
                .borrow_mut()
                .query_one("SELECT count(*) FROM pgtrickle.events", &[])
                .unwrap()
                .get(0);
            n as u64
        };
        self.scenario(name, "pg-inbox", &reset, &count, None)
            .run(self.url, self.runs);
    }

    /// To a local HTTP receiver, batch mode; limit: the read limit.
    #[cfg(feature = "http")]
    fn http(&self) {
        let name = &format!("forward_http_batch_{}_rows_x1_event", single());
        if !selected(name) {
            return;
        }
        let h = support::brokers::HttpReceiver::start();
        self.set(
            "http",
            json!({"type": "http", "url": h.url("/bench"), "mode": "batch"}),
        );
        let count =
            |body: &[u8]| body.windows(12).filter(|w| *w == b"\"dedup_key\":").count() as u64;
        let reset = || h.requests.lock().unwrap().clear();
        let delivered = || h.accepted().iter().map(|r| count(&r.body)).sum();
        self.scenario(name, "http", &reset, &delivered, None)
            .run(self.url, self.runs);
    }

    /// To a private nats-server's JetStream (acks awaited); its limit: the
    /// same messages (`Nats-Msg-Id` and the relay's headers), 4,096 PubAcks
    /// in flight. The stream is made anew for every run: a purge would keep
    /// the Nats-Msg-Id duplicate window, and the repeated ids would be
    /// dropped.
    #[cfg(feature = "nats")]
    #[allow(deprecated)]
    fn nats(&self) {
        let name = &format!("forward_nats_{}_rows_x1_event", single());
        if !selected(name) {
            return;
        }
        let n = support::brokers::Nats::start();
        let nc = nats::connect(n.url()).unwrap();
        let api = |subject: &str, body: serde_json::Value| -> serde_json::Value {
            let m = nc
                .request_timeout(
                    subject,
                    body.to_string(),
                    std::time::Duration::from_secs(10),
                )
                .unwrap();
            serde_json::from_slice(&m.data).unwrap()
        };
        self.set(
            "nats",
            json!({"type": "nats", "url": n.url(), "stream": "BENCH", "subject": "bench.{op}"}),
        );
        let reset = || {
            api("$JS.API.STREAM.DELETE.BENCH", json!({}));
            let r = api(
                "$JS.API.STREAM.CREATE.BENCH",
                json!({"name": "BENCH", "subjects": ["bench.>"], "storage": "file",
                       "num_replicas": 1}),
            );
            assert!(r.get("error").is_none(), "{r}");
        };
        let count = || {
            api("$JS.API.STREAM.INFO.BENCH", json!({}))["state"]["messages"]
                .as_u64()
                .unwrap_or(0)
        };
        let publish = || {
            let pc = nats::connect(n.url()).unwrap();
            let inbox = pc.new_inbox();
            let acks = pc.subscribe(&format!("{inbox}.*")).unwrap();
            let timeout = std::time::Duration::from_secs(10);
            let ack = || {
                let m = acks.next_timeout(timeout).expect("a PubAck");
                assert!(
                    !String::from_utf8_lossy(&m.data).contains("\"error\""),
                    "{}",
                    String::from_utf8_lossy(&m.data)
                );
            };
            let mut h = nats::HeaderMap::new();
            let mut outstanding = 0;
            let t = Instant::now();
            for (i, m) in self.msgs.iter().enumerate() {
                h.clear();
                h.insert("Nats-Msg-Id", m.dedup_key.as_str());
                h.insert(
                    "Pgtrickle-Full-Refresh",
                    if m.is_full_refresh { "true" } else { "false" },
                );
                h.insert("Pgtrickle-Op", m.op.as_str());
                h.insert("Pgtrickle-Outbox-Id", m.outbox_id.to_string());
                if let Some(r) = &m.refresh_id {
                    h.insert("Pgtrickle-Refresh-Id", r.as_str());
                }
                while outstanding >= 4096 {
                    ack();
                    outstanding -= 1;
                }
                pc.publish_with_reply_or_headers(
                    &format!("bench.{}", m.op),
                    Some(&format!("{inbox}.{i}")),
                    Some(&h),
                    m.payload.get(),
                )
                .unwrap();
                outstanding += 1;
            }
            for _ in 0..outstanding {
                ack();
            }
            t.elapsed().as_secs_f64()
        };
        self.scenario(
            name,
            "nats",
            &reset,
            &count,
            Some(("nats_jetstream_publish", &publish)),
        )
        .run(self.url, self.runs);
    }

    /// To a private Tansu broker (memory storage), every delivery report
    /// awaited; its limit: the same records (key, headers) from an
    /// idempotent `acks=all` producer with the relay's `linger.ms=1`. Each
    /// run writes a topic of its own (a run's records are counted by
    /// reading the topic back; Tansu's high watermarks cannot be trusted).
    #[cfg(feature = "kafka")]
    fn kafka(&self) {
        use rdkafka::config::ClientConfig;
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let name = &format!("forward_kafka_{}_rows_x1_event", single());
        if !selected(name) {
            return;
        }
        let k = support::kafka::Kafka::start();
        let run = std::cell::Cell::new(0);
        let topic = |run: u32| format!("bench{run}");
        let reset = || {
            run.set(run.get() + 1);
            k.create_topic(&topic(run.get()), 3);
            self.set(
                "kafka",
                json!({"type": "kafka", "brokers": k.brokers(), "topic": topic(run.get())}),
            );
        };
        let count = || k.read(&topic(run.get()), single() as usize, 120).len() as u64;
        let publish = || {
            let ctx = Reports::default();
            let p: BaseProducer<Reports> = ClientConfig::new()
                .set("bootstrap.servers", k.brokers())
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("linger.ms", "1")
                .set("message.timeout.ms", "30000")
                .create_with_context(ctx)
                .unwrap();
            let topic = topic(run.get());
            let t = Instant::now();
            for m in self.msgs {
                let oid = m.outbox_id.to_string();
                let mut h = OwnedHeaders::new()
                    .insert(Header {
                        key: "Pgtrickle-Op",
                        value: Some(m.op.as_str()),
                    })
                    .insert(Header {
                        key: "Pgtrickle-Full-Refresh",
                        value: Some(if m.is_full_refresh { "true" } else { "false" }),
                    })
                    .insert(Header {
                        key: "Pgtrickle-Outbox-Id",
                        value: Some(oid.as_str()),
                    })
                    .insert(Header {
                        key: "Pgtrickle-Subject",
                        value: Some(m.subject.as_str()),
                    });
                if let Some(r) = &m.refresh_id {
                    h = h.insert(Header {
                        key: "Pgtrickle-Refresh-Id",
                        value: Some(r.as_str()),
                    });
                }
                let mut rec = BaseRecord::to(&topic)
                    .key(m.dedup_key.as_str())
                    .payload(m.payload.get())
                    .headers(h);
                loop {
                    match p.send(rec) {
                        Ok(()) => break,
                        Err((_, back)) => {
                            rec = back;
                            p.poll(std::time::Duration::from_millis(5));
                        }
                    }
                }
                p.poll(std::time::Duration::ZERO);
            }
            p.flush(std::time::Duration::from_secs(120)).unwrap();
            let secs = t.elapsed().as_secs_f64();
            let ctx = p.context();
            use std::sync::atomic::Ordering::SeqCst;
            assert_eq!(ctx.failed.load(SeqCst), 0, "delivery failures");
            assert_eq!(ctx.ok.load(SeqCst), single(), "delivery reports");
            secs
        };
        self.scenario(
            name,
            "kafka",
            &reset,
            &count,
            Some(("kafka_produce", &publish)),
        )
        .run(self.url, self.runs);
    }

    /// To a private RabbitMQ node: persistent messages into a durable
    /// queue, every one confirmed; its limit: the same messages
    /// (properties, headers) on a TCP_NODELAY connection as the relay's,
    /// 5,000 confirms outstanding (the relay's default batch; 16,384 made
    /// RabbitMQ slower than the relay itself).
    #[cfg(feature = "rabbitmq")]
    fn rabbitmq(&self) {
        use amiquip::{
            AmqpProperties, AmqpValue, Auth, Confirm, Connection, ConnectionOptions,
            ConnectionTuning, FieldTable, Publish,
        };
        let name = &format!("forward_rabbitmq_{}_rows_x1_event", single());
        if !selected(name) {
            return;
        }
        let r = support::rabbitmq::Rabbit::start();
        r.declare("bench", "bench", "#");
        self.set(
            "rabbitmq",
            json!({"type": "rabbitmq", "url": r.url(), "exchange": "bench"}),
        );
        let reset = || {
            let (_conn, ch) = r.open();
            ch.queue_purge("bench").unwrap();
        };
        let count = || u64::from(r.count("bench"));
        let publish = || {
            let socket = std::net::TcpStream::connect(("127.0.0.1", r.port)).unwrap();
            socket.set_nodelay(true).unwrap();
            let stream = mio::net::TcpStream::from_stream(socket).unwrap();
            let options = ConnectionOptions::default().auth(Auth::Plain {
                username: "guest".into(),
                password: "guest".into(),
            });
            let mut conn = Connection::insecure_open_stream(
                stream,
                options,
                ConnectionTuning::default().mem_channel_bound(1024),
            )
            .unwrap();
            let ch = conn.open_channel(None).unwrap();
            let confirms = ch.listen_for_publisher_confirms().unwrap();
            ch.enable_publisher_confirms().unwrap();
            let mut confirmed = vec![false; self.msgs.len() + 1];
            let (mut low, mut done) = (1usize, 0usize);
            let mut take = |c: Confirm| {
                let p = match c {
                    Confirm::Ack(p) => p,
                    Confirm::Nack(p) => panic!("broker nacked {p:?}"),
                };
                let tag = p.delivery_tag as usize;
                let from = if p.multiple { low } else { tag };
                for slot in &mut confirmed[from..=tag] {
                    if !*slot {
                        *slot = true;
                        done += 1;
                    }
                }
                while low < confirmed.len() && confirmed[low] {
                    low += 1;
                }
                done
            };
            let timeout = std::time::Duration::from_secs(30);
            let t = Instant::now();
            let mut acked = 0;
            for (i, m) in self.msgs.iter().enumerate() {
                while i - acked >= 5_000 {
                    acked = take(confirms.recv_timeout(timeout).unwrap());
                }
                let mut headers = FieldTable::new();
                let text = |s: &str| AmqpValue::LongString(s.to_string());
                headers.insert("pgtrickle-op".into(), text(&m.op));
                headers.insert(
                    "pgtrickle-outbox-id".into(),
                    AmqpValue::LongLongInt(m.outbox_id),
                );
                headers.insert(
                    "pgtrickle-full-refresh".into(),
                    text(if m.is_full_refresh { "true" } else { "false" }),
                );
                if let Some(rid) = &m.refresh_id {
                    headers.insert("pgtrickle-refresh-id".into(), text(rid));
                }
                let properties = AmqpProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(m.dedup_key.clone())
                    .with_content_type("application/json".into())
                    .with_app_id("pgtrickle-relay".into())
                    .with_headers(headers);
                ch.basic_publish(
                    "bench",
                    Publish {
                        body: m.payload.get().as_bytes(),
                        routing_key: m.subject.clone(),
                        mandatory: true,
                        immediate: false,
                        properties,
                    },
                )
                .unwrap();
                while let Ok(c) = confirms.try_recv() {
                    acked = take(c);
                }
            }
            while acked < self.msgs.len() {
                acked = take(confirms.recv_timeout(timeout).unwrap());
            }
            let secs = t.elapsed().as_secs_f64();
            drop(ch);
            let _ = conn.close();
            secs
        };
        self.scenario(
            name,
            "rabbitmq",
            &reset,
            &count,
            Some(("rabbitmq_confirmed_publish", &publish)),
        )
        .run(self.url, self.runs);
    }
}

/// Counts a bare Kafka producer's delivery reports.
#[cfg(feature = "kafka")]
#[derive(Default)]
struct Reports {
    ok: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

#[cfg(feature = "kafka")]
impl rdkafka::client::ClientContext for Reports {}

#[cfg(feature = "kafka")]
impl rdkafka::producer::ProducerContext for Reports {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        use std::sync::atomic::Ordering::SeqCst;
        match result {
            Ok(_) => self.ok.fetch_add(1, SeqCst),
            Err(_) => self.failed.fetch_add(1, SeqCst),
        };
    }
}

/// One-event rows (`BENCH_SQS_EVENTS`, default 5,000: moto manages a few
/// hundred a second on a busy machine, so 200,000 would take a quarter of
/// an hour a run) to a standard queue
/// of a private moto_server, while 4 consumers receive and delete them:
/// moto does work proportional to the queue's length for every message
/// sent, so a queue left to grow would measure moto's quadratic slowdown.
/// One request in flight (`max_in_flight: 1`) lets the consumers keep up.
/// moto is single-process Python: this measures moto more than the relay,
/// and no limit is reported.
#[cfg(feature = "sqs")]
fn bench_sqs(url: &str, runs: usize) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let events: u64 = common::env_or("BENCH_SQS_EVENTS", 5_000);
    let name = format!("forward_sqs_{events}_rows_x1_event");
    if !selected(&name) {
        return;
    }
    let mut c = pg().client(url);
    c.batch_execute(&format!(
        "SELECT pgtrickle.enable_outbox('sqs_single');
         SELECT count(pgtrickle.outbox_publish('sqs_single', {ROW})) FROM generate_series(1, {events}) g;"
    ))
    .unwrap();
    let moto = support::sqs::Moto::start();
    let sqs = moto.client();
    let queue = sqs.create_queue("bench", json!({}));
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('sqs', 'sqs_single', 'bench', $1::text::jsonb)",
        &[&json!({"type": "sqs", "queue_url": queue,
            "region": support::sqs::REGION, "access_key_id": "bench",
            "secret_access_key": "bench", "max_in_flight": 1})
        .to_string()],
    )
    .unwrap();
    let stop = AtomicBool::new(false);
    // Distinct dedup keys: moto can hand one message to two concurrent
    // receivers.
    let drained = std::sync::Mutex::new(std::collections::HashSet::<String>::new());
    /// Stops the consumers however the scenario ends (a failed assertion
    /// included), so the scope can end.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop = Stop(&stop);
        for _ in 0..4 {
            s.spawn(|| {
                let sqs = moto.client();
                while !stop.load(Ordering::Relaxed) {
                    // moto can answer 500 to concurrent receivers: an
                    // undeleted message comes again.
                    let got = sqs.try_receive(&queue, 0).unwrap_or_default();
                    if got.is_empty() {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        continue;
                    }
                    let _ = sqs.try_delete(&queue, &got);
                    let mut d = drained.lock().unwrap();
                    for m in &got {
                        d.insert(support::sqs::attr(m, "dedup_key").unwrap().to_string());
                    }
                }
            });
        }
        let reset = || drained.lock().unwrap().clear();
        let delivered = || {
            // The relay has exited: everything sent is queued, in flight
            // to a consumer, or drained. A consumer records what it
            // received after deleting it: wait for that too.
            let deadline = Instant::now() + std::time::Duration::from_secs(60);
            while (sqs.counts(&queue) != (0, 0) || (drained.lock().unwrap().len() as u64) < events)
                && Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            drained.lock().unwrap().len() as u64
        };
        Scenario {
            name: &name,
            pipeline: "sqs",
            events,
            reset: &reset,
            delivered: &delivered,
            pg_read: None,
            broker: None,
        }
        .run(url, runs);
    });
}
