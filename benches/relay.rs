//! The benchmark command: `make bench` (= `cargo bench --bench relay`).
//!
//! Starts a private PostgreSQL, fills kit outboxes, and times the release
//! relay binary (`--once`, drain and exit) forwarding them to a file. Each
//! scenario runs several times; one JSON object per scenario goes to stdout
//! with the median events/s and the peak RSS (from wait4's rusage).
//! Progress goes to stderr.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Stdio;
use std::time::Instant;

use support::{relay, temp_dir, Pg};

/// ~200 bytes of JSON per event.
const ROW: &str = "jsonb_build_object('id', g, 'customer', 'customer-' || (g % 9973), \
     'sku', md5(g::text), 'qty', g % 10, 'price', 12.34, 'note', repeat('x', 60))";

struct Run {
    seconds: f64,
    peak_rss_kb: i64,
}

/// Run the relay once over `pipeline` from the start; wall time and peak RSS.
fn run_relay(url: &str, pipeline: &str) -> Run {
    let mut c = Pg::shared().client(url);
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
    // Peak RSS from /proc (VmHWM): rusage's ru_maxrss would include the
    // high-water mark this process had when it spawned the relay.
    let pid = child.id() as i32;
    let status_file = format!("/proc/{pid}/status");
    let mut peak_rss_kb = 0;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&status_file) {
            if let Some(kb) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
            {
                peak_rss_kb = peak_rss_kb.max(kb);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    let seconds = start.elapsed().as_secs_f64();
    assert!(status.success(), "relay failed: {status}");
    Run {
        seconds,
        peak_rss_kb,
    }
}

fn count_lines(file: &std::path::Path) -> u64 {
    use std::io::Read;
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn scenario(
    url: &str,
    name: &str,
    pipeline: &str,
    file: &std::path::Path,
    events: u64,
    runs: usize,
) {
    scenario_with(
        url,
        name,
        pipeline,
        events,
        runs,
        &|| {
            let _ = std::fs::remove_file(file);
        },
        &|| count_lines(file),
    );
}

/// Whether `BENCH_ONLY` (a comma-separated list of substrings) selects
/// scenario `name`; all run when it is unset.
fn selected(name: &str) -> bool {
    match std::env::var("BENCH_ONLY") {
        Ok(only) if !only.is_empty() => only.split(',').any(|p| name.contains(p.trim())),
        _ => true,
    }
}

/// Run scenario `name`: `reset` empties the destination before each run,
/// `delivered` counts what arrived after it.
fn scenario_with(
    url: &str,
    name: &str,
    pipeline: &str,
    events: u64,
    runs: usize,
    reset: &dyn Fn(),
    delivered: &dyn Fn() -> u64,
) {
    if !selected(name) {
        return;
    }
    let mut rates = Vec::new();
    let mut rss = Vec::new();
    for i in 0..runs {
        reset();
        let r = run_relay(url, pipeline);
        let lines = delivered();
        assert_eq!(lines, events, "{name}: every event must be written");
        eprintln!(
            "{name} run {}: {:.2}s, {:.0} events/s, peak RSS {:.1} MB",
            i + 1,
            r.seconds,
            events as f64 / r.seconds,
            r.peak_rss_kb as f64 / 1024.0
        );
        rates.push(events as f64 / r.seconds);
        rss.push(r.peak_rss_kb as f64 / 1024.0);
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": name,
            "events": events,
            "runs": runs,
            "median_events_per_sec": median(rates.clone()).round(),
            "min_events_per_sec": rates.iter().cloned().fold(f64::MAX, f64::min).round(),
            "median_peak_rss_mb": (median(rss.clone()) * 10.0).round() / 10.0,
            "max_peak_rss_mb": (rss.iter().cloned().fold(0.0, f64::max) * 10.0).round() / 10.0,
        })
    );
}

fn main() {
    // `cargo test --benches` runs this without --bench: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let pg = Pg::shared();
    let url = pg.new_db("bench");
    let dir = temp_dir("bench");
    let mut c = pg.client(&url);
    let t = Instant::now();
    c.batch_execute(&format!(
        "SELECT pgtrickle.enable_outbox('single');
         SELECT pgtrickle.enable_outbox('batched');
         SELECT pgtrickle.enable_outbox('claim');
         SELECT count(pgtrickle.outbox_publish('single', {ROW})) FROM generate_series(1, 200000) g;
         SELECT count(pgtrickle.outbox_publish_delta('batched',
                  (SELECT jsonb_agg({ROW}) FROM generate_series(b * 1000, b * 1000 + 999) g)))
           FROM generate_series(1, 200) b;
         SELECT pgtrickle.outbox_publish_delta('claim',
                  (SELECT jsonb_agg({ROW}) FROM generate_series(1, 1000000) g));"
    ))
    .unwrap();
    c.batch_execute("VACUUM ANALYZE").unwrap();
    eprintln!("loaded outboxes in {:.1}s", t.elapsed().as_secs_f64());
    // BENCH_BATCH sets the pipelines' batch_size; else the relay's default.
    let batch: Option<u64> = std::env::var("BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok());
    let cases = [
        ("forward_file_200000_rows_x1_event", "single", 200_000u64),
        ("forward_file_200_rows_x1000_events", "batched", 200_000),
        (
            "forward_file_claim_check_1000000_events",
            "claim",
            1_000_000,
        ),
    ];
    for (name, outbox, events) in cases {
        let file = dir.join(format!("{outbox}.jsonl"));
        c.execute(
            "SELECT pgtrickle.set_relay_outbox($1, $1, 'bench', $2::text::jsonb)",
            &[
                &outbox,
                &match batch {
                    Some(b) => serde_json::json!({"type": "stdout", "path": file, "batch_size": b}),
                    None => serde_json::json!({"type": "stdout", "path": file}),
                }
                .to_string(),
            ],
        )
        .unwrap();
        scenario(&url, name, outbox, &file, events, runs);
    }
    #[cfg(feature = "redis")]
    bench_redis(&url, runs);
    #[cfg(feature = "pg-inbox")]
    bench_pg_inbox(&url, runs);
    #[cfg(feature = "http")]
    bench_http(&url, runs);
    #[cfg(feature = "nats")]
    bench_nats(&url, runs);
    #[cfg(feature = "kafka")]
    bench_kafka(&url, runs);
    #[cfg(feature = "rabbitmq")]
    bench_rabbitmq(&url, runs);
    #[cfg(feature = "sqs")]
    bench_sqs(&url, runs);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Point pipeline `name` at outbox `single` with `sink`.
#[cfg_attr(
    not(any(
        feature = "redis",
        feature = "pg-inbox",
        feature = "http",
        feature = "nats",
        feature = "kafka",
        feature = "rabbitmq",
        feature = "sqs"
    )),
    allow(dead_code)
)]
fn set_pipeline(url: &str, name: &str, sink: serde_json::Value) {
    Pg::shared()
        .client(url)
        .execute(
            "SELECT pgtrickle.set_relay_outbox($1, 'single', 'bench', $2::text::jsonb)",
            &[&name, &sink.to_string()],
        )
        .unwrap();
}

/// The 200,000 one-event rows to a private redis-server.
#[cfg(feature = "redis")]
fn bench_redis(url: &str, runs: usize) {
    let name = "forward_redis_200000_rows_x1_event";
    if !selected(name) {
        return;
    }
    let r = support::brokers::Redis::start();
    set_pipeline(
        url,
        "redis",
        serde_json::json!({"type": "redis", "url": r.url(), "stream": "bench"}),
    );
    scenario_with(
        url,
        name,
        "redis",
        200_000,
        runs,
        &|| {
            r.command(&["DEL", "bench"]);
        },
        &|| {
            let reply = r.command(&["XLEN", "bench"]);
            reply.trim().trim_start_matches(':').parse().unwrap_or(0)
        },
    );
}

/// The 200,000 one-event rows to an inbox on a second private PostgreSQL.
#[cfg(feature = "pg-inbox")]
fn bench_pg_inbox(url: &str, runs: usize) {
    let name = "forward_pg_inbox_200000_rows_x1_event";
    if !selected(name) {
        return;
    }
    let remote = Pg::start();
    let inbox = remote.new_db("bench_inbox");
    let mut c = remote.client(&inbox);
    c.batch_execute("SELECT pgtrickle.create_inbox('events')")
        .unwrap();
    set_pipeline(
        url,
        "pg-inbox",
        serde_json::json!({"type": "pg-inbox", "url": inbox, "inbox": "events"}),
    );
    let c = std::cell::RefCell::new(c);
    scenario_with(
        url,
        name,
        "pg-inbox",
        200_000,
        runs,
        &|| {
            c.borrow_mut()
                .batch_execute("TRUNCATE pgtrickle.events")
                .unwrap();
        },
        &|| {
            let n: i64 = c
                .borrow_mut()
                .query_one("SELECT count(*) FROM pgtrickle.events", &[])
                .unwrap()
                .get(0);
            n as u64
        },
    );
}

/// The 200,000 one-event rows to a local HTTP receiver, batch mode.
#[cfg(feature = "http")]
fn bench_http(url: &str, runs: usize) {
    let name = "forward_http_batch_200000_rows_x1_event";
    if !selected(name) {
        return;
    }
    let h = support::brokers::HttpReceiver::start();
    set_pipeline(
        url,
        "http",
        serde_json::json!({"type": "http", "url": h.url("/bench"), "mode": "batch"}),
    );
    let count = |body: &[u8]| body.windows(12).filter(|w| *w == b"\"dedup_key\":").count() as u64;
    scenario_with(
        url,
        name,
        "http",
        200_000,
        runs,
        &|| h.requests.lock().unwrap().clear(),
        &|| h.accepted().iter().map(|r| count(&r.body)).sum(),
    );
}

/// The 200,000 one-event rows to a private nats-server's JetStream (acks
/// awaited). The stream is made anew for every run: a purge would keep the
/// Nats-Msg-Id duplicate window, and the replayed ids would be dropped.
#[cfg(feature = "nats")]
#[allow(deprecated)]
fn bench_nats(url: &str, runs: usize) {
    let name = "forward_nats_200000_rows_x1_event";
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
    set_pipeline(
        url,
        "nats",
        serde_json::json!({"type": "nats", "url": n.url(), "stream": "BENCH",
                           "subject": "bench.{op}"}),
    );
    scenario_with(
        url,
        name,
        "nats",
        200_000,
        runs,
        &|| {
            api("$JS.API.STREAM.DELETE.BENCH", serde_json::json!({}));
            let r = api(
                "$JS.API.STREAM.CREATE.BENCH",
                serde_json::json!({"name": "BENCH", "subjects": ["bench.>"],
                                   "storage": "file", "num_replicas": 1}),
            );
            assert!(r.get("error").is_none(), "{r}");
        },
        &|| {
            api("$JS.API.STREAM.INFO.BENCH", serde_json::json!({}))["state"]["messages"]
                .as_u64()
                .unwrap_or(0)
        },
    );
}

/// The 200,000 one-event rows to a private Tansu broker (memory storage),
/// every delivery report awaited. Each run writes a topic of its own (a
/// run's records are counted by reading the topic back; Tansu's high
/// watermarks cannot be trusted).
#[cfg(feature = "kafka")]
fn bench_kafka(url: &str, runs: usize) {
    let name = "forward_kafka_200000_rows_x1_event";
    if !selected(name) {
        return;
    }
    let k = support::kafka::Kafka::start();
    let run = std::cell::Cell::new(0);
    scenario_with(
        url,
        name,
        "kafka",
        200_000,
        runs,
        &|| {
            run.set(run.get() + 1);
            let topic = format!("bench{}", run.get());
            k.create_topic(&topic, 3);
            set_pipeline(
                url,
                "kafka",
                serde_json::json!({"type": "kafka", "brokers": k.brokers(), "topic": topic}),
            );
        },
        &|| k.read(&format!("bench{}", run.get()), 200_000, 120).len() as u64,
    );
}

/// The 200,000 one-event rows to a private RabbitMQ node: persistent
/// messages into a durable queue, every one confirmed.
#[cfg(feature = "rabbitmq")]
fn bench_rabbitmq(url: &str, runs: usize) {
    let name = "forward_rabbitmq_200000_rows_x1_event";
    if !selected(name) {
        return;
    }
    let r = support::rabbitmq::Rabbit::start();
    r.declare("bench", "bench", "#");
    set_pipeline(
        url,
        "rabbitmq",
        serde_json::json!({"type": "rabbitmq", "url": r.url(), "exchange": "bench"}),
    );
    scenario_with(
        url,
        name,
        "rabbitmq",
        200_000,
        runs,
        &|| {
            let (_conn, ch) = r.open();
            ch.queue_purge("bench").unwrap();
        },
        &|| u64::from(r.count("bench")),
    );
}

/// One-event rows (`BENCH_SQS_EVENTS`, default 20,000: moto manages a few
/// hundred a second, so 200,000 would take a quarter of an hour a run) to a standard queue
/// of a private moto_server, while 4 consumers receive and delete them:
/// moto does work proportional to the queue's length for every message
/// sent, so a queue left to grow would measure moto's quadratic slowdown.
/// One request in flight (`max_in_flight: 1`) lets the consumers keep up.
/// moto is single-process Python: this measures moto more than the relay.
#[cfg(feature = "sqs")]
fn bench_sqs(url: &str, runs: usize) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let events: u64 = std::env::var("BENCH_SQS_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let name = format!("forward_sqs_{events}_rows_x1_event");
    if !selected(&name) {
        return;
    }
    let mut c = Pg::shared().client(url);
    c.batch_execute(&format!(
        "SELECT pgtrickle.enable_outbox('sqs_single');
         SELECT count(pgtrickle.outbox_publish('sqs_single', {ROW})) FROM generate_series(1, {events}) g;"
    ))
    .unwrap();
    let moto = support::sqs::Moto::start();
    let sqs = moto.client();
    let queue = sqs.create_queue("bench", serde_json::json!({}));
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('sqs', 'sqs_single', 'bench', $1::text::jsonb)",
        &[&serde_json::json!({"type": "sqs", "queue_url": queue,
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
        scenario_with(
            url,
            &name,
            "sqs",
            events,
            runs,
            &|| drained.lock().unwrap().clear(),
            &|| {
                // The relay has exited: everything sent is queued, in
                // flight to a consumer, or drained.
                while sqs.counts(&queue) != (0, 0) {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
                drained.lock().unwrap().len() as u64
            },
        );
    });
}
