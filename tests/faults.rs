//! Fault injection: a seeded random schedule of relay SIGKILLs, broker
//! stops, PostgreSQL restarts (fast and crash) and claim-check deltas,
//! while six writers commit outbox transactions out of id order (each
//! takes its ids, then commits after writers that took larger ones), for
//! every forward sink with a durable destination we can stop (file, NATS,
//! Kafka, Redis, pg-inbox) and, in the same run, for the NATS, Kafka and
//! Redis sources: a reverse pipeline `rin` reads back what the forward
//! pipeline wrote to the broker, and `rext` reads what two external
//! producers send meanwhile, both into inbox `events`.
//!
//! The check is set equality with what was written (see
//! [`chaos::compare`]): every event written is at each destination, none
//! is there under a key that was not written (an event under a second
//! dedup key), and a key repeats only where the destination can hold a
//! replay (file, stream, topic; never an inbox table). No dead letters.
//!
//! Knobs: `FAULTS_SEED` replays a run (every failure prints the line to
//! replay it), `FAULTS_ROUNDS` (fault episodes per scenario, default 8)
//! and `FAULTS_SCALE` (events per transaction and rows per claim-check
//! delta, as a multiple) run longer; `make soak` does.

#![allow(deprecated)] // the sync `nats` client, as the relay uses it

#[path = "support/chaos.rs"]
mod chaos;
mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use chaos::*;
use serde_json::{json, Value};
use support::*;

/// A destination of the forward pipeline, and maybe a source of reverse
/// ones.
trait Dest {
    /// The forward pipeline's sink.
    fn sink(&self, batch_size: u64) -> Value;
    /// Whether there is a server to stop.
    fn has_broker(&self) -> bool {
        true
    }
    /// Stop the server (keeping its data).
    fn stop(&mut self);
    /// Start it again.
    fn start(&mut self);
    /// Whether it may only be stopped while nothing is produced to it.
    fn quiet_stops_only(&self) -> bool {
        false
    }
    /// Everything the forward pipeline delivered, as (key, n); `want` is
    /// how many distinct events are expected.
    fn delivered(&self, want: usize) -> Vec<(String, i64)>;
    /// Whether a key can be there twice (a replay after a crash).
    fn repeats_allowed(&self) -> bool {
        true
    }
    /// The sources of `rin` (reading what the sink wrote) and `rext`
    /// (reading the external producers'), if this broker has a source.
    fn sources(&self) -> Option<(Value, Value)> {
        None
    }
    /// A new external producer for `rext`.
    fn producer(&self) -> Box<dyn Producer> {
        unreachable!("no source")
    }
    /// Whether reverse pipeline `pipeline` has acknowledged everything
    /// at its source (for telling a loss from a stall).
    fn source_drained(&self, _pipeline: &str) -> String {
        unreachable!("no source")
    }
}

/// One kind of fault episode.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// SIGKILL the relay, start it again after a moment.
    Kill,
    /// Stop the broker for 0.5–3 s.
    Broker,
    /// Stop the broker, SIGKILL and restart the relay while it is away.
    BrokerAndKill,
    /// PostgreSQL fast shutdown, down for up to 2 s.
    PgRestart,
    /// PostgreSQL immediate shutdown (crash recovery on start).
    PgCrash,
    /// PostgreSQL down, and the relay SIGKILLed and started while it is.
    PgAndKill,
    /// A claim-check delta of 500–2,000 rows (×scale).
    ClaimCheck,
}

/// The schedule: each kind of fault at least once, then random ones up
/// to `rounds`, shuffled.
fn schedule(rng: &mut Rng, rounds: usize, broker: bool) -> Vec<Fault> {
    let mut all = vec![
        Fault::Kill,
        Fault::PgRestart,
        Fault::PgCrash,
        Fault::PgAndKill,
        Fault::ClaimCheck,
    ];
    let mut faults = vec![
        Fault::Kill,
        rng.pick(&[Fault::PgRestart, Fault::PgCrash]),
        Fault::ClaimCheck,
    ];
    if broker {
        all.extend([Fault::Broker, Fault::BrokerAndKill]);
        faults.push(Fault::Broker);
    }
    while faults.len() < rounds {
        faults.push(rng.pick(&all));
    }
    for i in (1..faults.len()).rev() {
        let j = rng.range(0, i as u64 + 1) as usize;
        faults.swap(i, j);
    }
    faults
}

/// SIGQUIT to the postmaster (immediate shutdown: no checkpoint, crash
/// recovery at the next start), then reap it.
fn crash(pg: &mut Pg) {
    let pid = std::fs::read_to_string(pg.dir.join("data/postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse::<i32>().ok())
        .expect("postmaster.pid");
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    pg.stop();
}

/// Rows of inbox `events` at `url`: (event_id, n).
fn inbox_rows(url: &str) -> Vec<(String, i64)> {
    let Ok(mut c) = postgres::Client::connect(url, postgres::NoTls) else {
        return Vec::new();
    };
    c.query(
        "SELECT event_id, coalesce((payload->>'n')::bigint, -1) FROM pgtrickle.events",
        &[],
    )
    .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    .unwrap_or_default()
}

/// How long the forward pipeline may take to commit past the last outbox
/// row once the faults are over (times `FAULTS_SCALE`).
const FORWARD_SECS: u64 = 90;
/// How long the inbox may then take to hold everything (times
/// `FAULTS_SCALE`).
const INBOX_SECS: u64 = 60;

/// Run scenario `name` against `dest`.
fn run(name: &str, mut dest: impl Dest) {
    let knobs = Knobs::from_env();
    let mut rng = Rng::new(knobs.scenario_seed(name));
    let timeline = Timeline::new();
    let mut guard = SeedGuard {
        replay: knobs.replay(name),
        timeline: timeline.clone(),
        reported: false,
    };
    eprintln!("faults {name}: {}", knobs.replay(name));

    // Durable commits, so that a crash of PostgreSQL loses nothing it
    // acknowledged (the harness turns synchronous_commit off for speed).
    // Commit timestamps tell how many transactions committed out of id
    // order.
    let mut pg = Pg::start_with(&["synchronous_commit=on", "track_commit_timestamp=on"]);
    let url = pg.new_db("faults");
    let batch_size = rng.pick(&[20, 100, 500, 2000]);
    let mut c = pg.client(&url);
    c.execute(
        "SELECT pgtrickle.enable_outbox('orders'), \
         pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb)",
        &[&dest.sink(batch_size).to_string()],
    )
    .unwrap();
    let reverse = dest.sources();
    if let Some((rin, rext)) = &reverse {
        for (pipeline, source) in [("rin", rin), ("rext", rext)] {
            c.execute(
                "SELECT pgtrickle.set_relay_inbox($1, 'events', $2::text::jsonb)",
                &[&pipeline, &source.to_string()],
            )
            .unwrap();
        }
    }
    drop(c);
    timeline.note(format!(
        "batch_size {batch_size}, reverse: {}",
        reverse.is_some()
    ));

    let mut relay_proc = RelayProc::start(&url);
    let mut writers = Writers::new(&url, knobs.scale);
    writers.start_outbox_writers(6, &mut rng);
    if reverse.is_some() {
        writers.start_producers(2, &mut rng, || dest.producer());
    }

    let faults = schedule(&mut rng, knobs.rounds, dest.has_broker());
    timeline.note(format!("schedule {faults:?}"));
    for fault in faults {
        std::thread::sleep(rng.ms(0, 1500));
        let written = writers.written();
        let note = |what: &str| timeline.note(format!("{what} ({written} events written)"));
        match fault {
            Fault::Kill => {
                relay_proc.kill();
                note("relay SIGKILLed");
                std::thread::sleep(rng.ms(0, 1000));
                relay_proc.spawn();
                timeline.note("relay started");
            }
            Fault::Broker | Fault::BrokerAndKill => {
                if dest.quiet_stops_only() {
                    // Tansu 0.6 can lose a batch it acknowledged when it
                    // stops with a produce request in flight (see
                    // tests/forward_kafka.rs): stop it while no one
                    // produces, then let the writers go on at once.
                    writers.pause();
                    timeline.note("writers paused for a quiet stop");
                    if !within(120, || forward_caught_up(&url)) {
                        panic!(
                            "the forward pipeline did not catch up before a quiet stop; log:\n{}",
                            tail(&relay_proc.log(), 60)
                        );
                    }
                    dest.stop();
                    writers.resume();
                } else {
                    dest.stop();
                }
                note("broker stopped");
                if fault == Fault::BrokerAndKill {
                    std::thread::sleep(rng.ms(200, 1000));
                    relay_proc.kill();
                    timeline.note("relay SIGKILLed");
                    std::thread::sleep(rng.ms(0, 500));
                    relay_proc.spawn();
                    timeline.note("relay started");
                    std::thread::sleep(rng.ms(200, 1500));
                } else {
                    std::thread::sleep(rng.ms(500, 3000));
                }
                dest.start();
                timeline.note("broker started");
            }
            Fault::PgRestart | Fault::PgCrash | Fault::PgAndKill => {
                if fault == Fault::PgCrash {
                    crash(&mut pg);
                    note("PostgreSQL crashed");
                } else {
                    pg.stop();
                    note("PostgreSQL stopped");
                }
                if fault == Fault::PgAndKill {
                    std::thread::sleep(rng.ms(0, 500));
                    relay_proc.kill();
                    timeline.note("relay SIGKILLed");
                    relay_proc.spawn();
                    timeline.note("relay started");
                    std::thread::sleep(rng.ms(200, 1500));
                } else {
                    std::thread::sleep(rng.ms(0, 2000));
                }
                pg.start_again();
                timeline.note("PostgreSQL started");
            }
            Fault::ClaimCheck => {
                let rows = rng.range(500, 2000);
                writers.claim_check(rows, &mut rng);
                note(&format!(
                    "claim-check delta of {rows}×{} rows begun",
                    knobs.scale
                ));
            }
        }
    }
    std::thread::sleep(rng.ms(500, 1500));
    let written = writers.finish();
    let forward: HashMap<String, i64> = written
        .iter()
        .filter(|(k, _)| k.starts_with("outbox_"))
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    timeline.note(format!(
        "writers stopped: {} outbox events, {} external",
        forward.len(),
        written.len() - forward.len()
    ));

    // Delivery, within fixed deadlines once the faults are over (a
    // pipeline that takes longer is reported as stalled): the forward
    // pipeline commits past the last outbox row, then the inbox fills up.
    let mut problems = Vec::new();
    let mut summaries = Vec::new();
    let secs = FORWARD_SECS * knobs.scale;
    if within(secs, || forward_caught_up(&url)) {
        timeline.note("forward pipeline caught up");
    } else {
        problems.push(format!(
            "stall: the forward pipeline did not commit past the last outbox row within {secs} s"
        ));
    }
    let delivered = dest.delivered(forward.len());
    timeline.note("forward destination read");
    let cmp = compare(
        "forward destination",
        &forward,
        &forward,
        &delivered,
        dest.repeats_allowed(),
    );
    summaries.push(cmp.summary);
    problems.extend(cmp.problems);
    if reverse.is_some() {
        // What `rin` can read is what the sink delivered (a forward loss is
        // reported above), and `rext` everything the producers sent.
        let mut want: HashMap<String, i64> = written
            .iter()
            .filter(|(k, _)| !k.starts_with("outbox_"))
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        for (k, n) in &delivered {
            if forward.get(k) == Some(n) {
                want.insert(k.clone(), *n);
            }
        }
        let complete = within(INBOX_SECS * knobs.scale, || {
            inbox_rows(&url).len() >= want.len()
        });
        timeline.note(format!("inbox complete: {complete}"));
        let cmp = compare("inbox", &want, &written, &inbox_rows(&url), false);
        summaries.push(cmp.summary);
        problems.extend(cmp.problems);
        if !cmp.missing.is_empty() {
            // A loss if the source has nothing left to give, else a stall.
            for pipeline in ["rin", "rext"] {
                problems.push(format!(
                    "{pipeline} at its source: {}",
                    dest.source_drained(pipeline)
                ));
            }
        }
    }
    let mut c = pg.client(&url);
    let (late, txs): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*) FILTER (WHERE lo < before), count(*) FROM ( \
                   SELECT lo, max(hi) OVER (ORDER BY at ROWS BETWEEN UNBOUNDED PRECEDING \
                                                       AND 1 PRECEDING) AS before \
                     FROM (SELECT min(id) AS lo, max(id) AS hi, \
                                  pg_xact_commit_timestamp(xmin) AS at \
                             FROM pgtrickle.outbox_orders GROUP BY xmin) x) t",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    summaries.push(format!(
        "{late} of {txs} outbox transactions committed after one with a larger id"
    ));
    if late == 0 {
        problems.push("no outbox transaction committed out of id order: nothing tested".into());
    }
    for r in c
        .query(
            "SELECT pipeline, dedup_key, error FROM pgtrickle.relay_dead_letters ORDER BY id LIMIT 10",
            &[],
        )
        .unwrap()
    {
        let (p, k, e): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        problems.push(format!("dead letter of {p}: {k}: {e}"));
    }
    if reverse.is_some() {
        let failed: i64 = c
            .query_one(
                "SELECT count(*) FROM pgtrickle.events WHERE error IS NOT NULL",
                &[],
            )
            .unwrap()
            .get(0);
        if failed > 0 {
            problems.push(format!("{failed} inbox rows are dead letters"));
        }
    }
    relay_proc.stop();
    problems.extend(relay_proc.problems.clone());
    let log = relay_proc.log();
    // Faults are transient: the relay logs retries as warnings. An error
    // (a permanent one) or a panic is a finding.
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("panicked"))
        .collect();
    if !bad.is_empty() {
        problems.push(format!(
            "{} relay log lines with ERROR or a panic, e.g.\n    {}",
            bad.len(),
            bad.iter()
                .take(5)
                .copied()
                .collect::<Vec<_>>()
                .join("\n    ")
        ));
    }
    timeline.note(format!("relay stopped after {} runs", relay_proc.runs()));
    if !problems.is_empty() {
        guard.reported = true;
        let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("faults-{name}-{}.log", knobs.seed));
        std::fs::write(&file, &log).unwrap();
        panic!(
            "faults {name} failed (seed {}):\n  {}\n{}\nreplay: {}\ntimeline:\n{}\nrelay log: {} (last lines:)\n{}",
            knobs.seed,
            problems.join("\n  "),
            summaries.join("\n"),
            knobs.replay(name),
            timeline.text(),
            file.display(),
            tail(&log, 40)
        );
    }
    eprintln!(
        "faults {name} passed in {:.1} s: {}\ntimeline:\n{}",
        timeline.elapsed().as_secs_f64(),
        summaries.join("; "),
        timeline.text()
    );
}

/// Lines of the file sink: (dedup_key, n). A last line without its newline
/// is still being written; any other line that is not JSON is reported as
/// an entry under a key of its own.
fn file_lines(path: &std::path::Path) -> Vec<(String, i64)> {
    let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .enumerate()
        .map(|(i, l)| match serde_json::from_str::<Value>(l) {
            Ok(v) => (
                v["dedup_key"].as_str().unwrap_or("?").to_string(),
                v["payload"]["n"].as_i64().unwrap_or(-1),
            ),
            Err(e) => (format!("<line {} is not JSON: {e}: {l:.80}>", i + 1), -1),
        })
        .collect()
}

/// The stdout sink with a path.
struct FileDest {
    path: PathBuf,
}

impl Dest for FileDest {
    fn sink(&self, batch_size: u64) -> Value {
        json!({"type": "stdout", "path": self.path, "batch_size": batch_size})
    }
    fn has_broker(&self) -> bool {
        false
    }
    fn stop(&mut self) {}
    fn start(&mut self) {}
    fn delivered(&self, _want: usize) -> Vec<(String, i64)> {
        file_lines(&self.path)
    }
}

#[test]
fn file_sink_under_faults() {
    let dir = temp_dir("faults-file");
    run(
        "file_sink_under_faults",
        FileDest {
            path: dir.join("events.jsonl"),
        },
    );
}

/// An inbox in a database of another PostgreSQL server (the "broker"),
/// stopped with a fast shutdown and a crash in turn.
#[cfg(feature = "pg-inbox")]
struct PgInboxDest {
    pg: Pg,
    url: String,
    stops: u32,
}

#[cfg(feature = "pg-inbox")]
impl Dest for PgInboxDest {
    fn sink(&self, batch_size: u64) -> Value {
        json!({"type": "pg-inbox", "url": self.url, "inbox": "events", "batch_size": batch_size})
    }
    fn stop(&mut self) {
        self.stops += 1;
        if self.stops.is_multiple_of(2) {
            crash(&mut self.pg);
        } else {
            self.pg.stop();
        }
    }
    fn start(&mut self) {
        self.pg.start_again();
    }
    fn delivered(&self, _want: usize) -> Vec<(String, i64)> {
        inbox_rows(&self.url)
    }
    fn repeats_allowed(&self) -> bool {
        false
    }
}

#[cfg(feature = "pg-inbox")]
#[test]
fn pg_inbox_sink_under_faults() {
    let pg = Pg::start_with(&["synchronous_commit=on"]);
    let url = pg.new_db("inbox");
    pg.client(&url)
        .batch_execute("SELECT pgtrickle.create_inbox('events')")
        .unwrap();
    run(
        "pg_inbox_sink_under_faults",
        PgInboxDest { pg, url, stops: 0 },
    );
}

#[cfg(feature = "nats")]
mod nats_dest {
    use super::*;
    use support::brokers::Nats;

    fn api(nc: &nats::Connection, subject: &str, body: &Value) -> Value {
        let m = nc
            .request_timeout(subject, body.to_string(), Duration::from_secs(5))
            .unwrap();
        serde_json::from_slice(&m.data).unwrap()
    }

    /// NATS JetStream: the sink writes stream ORDERS, `rin` reads it back;
    /// external producers write stream EXT, `rext` reads it.
    pub struct NatsDest {
        pub n: Nats,
    }

    impl NatsDest {
        pub fn new() -> NatsDest {
            let n = Nats::start();
            let nc = nats::connect(n.url()).unwrap();
            for (name, subject) in [("ORDERS", "pgtrickle.orders.*"), ("EXT", "ext.>")] {
                let r = api(
                    &nc,
                    &format!("$JS.API.STREAM.CREATE.{name}"),
                    &json!({"name": name, "subjects": [subject], "storage": "file", "num_replicas": 1}),
                );
                assert!(r.get("error").is_none(), "{r}");
            }
            NatsDest { n }
        }

        fn messages(&self, stream: &str) -> u64 {
            let Ok(nc) = nats::connect(self.n.url()) else {
                return 0;
            };
            nc.request_timeout(
                &format!("$JS.API.STREAM.INFO.{stream}"),
                "",
                Duration::from_secs(5),
            )
            .ok()
            .and_then(|m| serde_json::from_slice::<Value>(&m.data).ok())
            .and_then(|v| v["state"]["messages"].as_u64())
            .unwrap_or(0)
        }
    }

    struct NatsProducer {
        url: String,
        js: Option<nats::jetstream::JetStream>,
    }

    impl Producer for NatsProducer {
        fn send(&mut self, batch: &[(String, i64)]) -> Result<(), String> {
            if self.js.is_none() {
                let nc = nats::connect(&self.url).map_err(|e| e.to_string())?;
                self.js = Some(nats::jetstream::new(nc));
            }
            let js = self.js.as_ref().unwrap();
            for (key, n) in batch {
                let opts = nats::jetstream::PublishOptions {
                    id: Some(key.clone()),
                    timeout: Some(Duration::from_secs(2)),
                    ..Default::default()
                };
                if let Err(e) =
                    js.publish_with_options("ext.orders", json!({"n": n}).to_string(), &opts)
                {
                    self.js = None;
                    return Err(e.to_string());
                }
            }
            Ok(())
        }
    }

    impl Dest for NatsDest {
        fn sink(&self, batch_size: u64) -> Value {
            json!({"type": "nats", "url": self.n.url(), "stream": "ORDERS", "batch_size": batch_size})
        }
        fn stop(&mut self) {
            self.n.stop();
        }
        fn start(&mut self) {
            self.n.start_again();
        }
        fn delivered(&self, _want: usize) -> Vec<(String, i64)> {
            // Every message of ORDERS, through an ephemeral push consumer.
            let want = self.messages("ORDERS");
            let nc = nats::connect(self.n.url()).unwrap();
            let inbox = nc.new_inbox();
            let sub = nc.subscribe(&inbox).unwrap();
            let r = api(
                &nc,
                "$JS.API.CONSUMER.CREATE.ORDERS",
                &json!({"stream_name": "ORDERS", "config": {"deliver_subject": inbox,
                        "ack_policy": "none", "deliver_policy": "all"}}),
            );
            assert!(r.get("error").is_none(), "{r}");
            let mut out = Vec::new();
            while (out.len() as u64) < want {
                let m = sub.next_timeout(Duration::from_secs(10)).unwrap();
                let key = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id").cloned())
                    .unwrap_or_else(|| "<no Nats-Msg-Id>".into());
                let body: Value = serde_json::from_slice(&m.data).unwrap_or_default();
                out.push((key, body["n"].as_i64().unwrap_or(-1)));
            }
            out
        }
        fn sources(&self) -> Option<(Value, Value)> {
            let s = |stream: &str| {
                json!({"type": "nats", "url": self.n.url(), "stream": stream,
                       "ack_wait_ms": 2000, "max_wait_ms": 50})
            };
            Some((s("ORDERS"), s("EXT")))
        }
        fn producer(&self) -> Box<dyn Producer> {
            Box::new(NatsProducer {
                url: self.n.url(),
                js: None,
            })
        }
        fn source_drained(&self, pipeline: &str) -> String {
            let stream = if pipeline == "rin" { "ORDERS" } else { "EXT" };
            let nc = nats::connect(self.n.url()).unwrap();
            let c = api(
                &nc,
                &format!("$JS.API.CONSUMER.INFO.{stream}.pgtrickle-relay-{pipeline}"),
                &json!({}),
            );
            format!(
                "{} messages in {stream}, consumer: {} pending, {} unacknowledged, ack floor {}",
                self.messages(stream),
                c["num_pending"],
                c["num_ack_pending"],
                c["ack_floor"]["stream_seq"]
            )
        }
    }
}

#[cfg(feature = "nats")]
#[test]
fn nats_forward_and_reverse_under_faults() {
    run(
        "nats_forward_and_reverse_under_faults",
        nats_dest::NatsDest::new(),
    );
}

#[cfg(feature = "redis")]
mod redis_dest {
    use super::*;
    use support::brokers::Redis;

    /// Redis Streams: the sink writes stream `orders`, `rin` reads it
    /// back; external producers write stream `ext`, `rext` reads it.
    pub struct RedisDest {
        pub r: Redis,
    }

    fn conn(url: &str) -> Result<redis::Connection, String> {
        let c = redis::Client::open(url).map_err(|e| e.to_string())?;
        let c = c
            .get_connection_with_timeout(Duration::from_secs(2))
            .map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        Ok(c)
    }

    struct RedisProducer {
        url: String,
        c: Option<redis::Connection>,
    }

    impl Producer for RedisProducer {
        fn send(&mut self, batch: &[(String, i64)]) -> Result<(), String> {
            if self.c.is_none() {
                self.c = Some(conn(&self.url)?);
            }
            let mut p = redis::pipe();
            for (key, n) in batch {
                p.cmd("XADD")
                    .arg("ext")
                    .arg("*")
                    .arg("dedup_key")
                    .arg(key)
                    .arg("payload")
                    .arg(json!({"n": n}).to_string());
            }
            let r: Result<Vec<String>, _> = p.query(self.c.as_mut().unwrap());
            r.map(|_| ()).map_err(|e| {
                self.c = None;
                e.to_string()
            })
        }
    }

    impl Dest for RedisDest {
        fn sink(&self, batch_size: u64) -> Value {
            json!({"type": "redis", "url": self.r.url(), "stream": "orders", "batch_size": batch_size})
        }
        fn stop(&mut self) {
            self.r.stop();
        }
        fn start(&mut self) {
            self.r.start_again();
        }
        fn delivered(&self, _want: usize) -> Vec<(String, i64)> {
            let mut c = conn(&self.r.url()).unwrap();
            let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg("orders")
                .arg("-")
                .arg("+")
                .query(&mut c)
                .unwrap();
            reply
                .ids
                .iter()
                .map(|e| {
                    let field = |name: &str| {
                        e.map
                            .get(name)
                            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                    };
                    let n = field("payload")
                        .and_then(|p| serde_json::from_str::<Value>(&p).ok())
                        .and_then(|p| p["n"].as_i64())
                        .unwrap_or(-1);
                    (
                        field("dedup_key")
                            .unwrap_or_else(|| format!("<entry {} without dedup_key>", e.id)),
                        n,
                    )
                })
                .collect()
        }
        fn sources(&self) -> Option<(Value, Value)> {
            let s = |stream: &str| {
                json!({"type": "redis", "url": self.r.url(), "stream": stream,
                       "consumer": "c1", "claim_idle_ms": 1000, "max_wait_ms": 50})
            };
            Some((s("orders"), s("ext")))
        }
        fn producer(&self) -> Box<dyn Producer> {
            Box::new(RedisProducer {
                url: self.r.url(),
                c: None,
            })
        }
        fn source_drained(&self, pipeline: &str) -> String {
            let stream = if pipeline == "rin" { "orders" } else { "ext" };
            let mut c = conn(&self.r.url()).unwrap();
            let info: redis::streams::StreamInfoStreamReply = redis::cmd("XINFO")
                .arg("STREAM")
                .arg(stream)
                .query(&mut c)
                .unwrap();
            let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(stream)
                .query(&mut c)
                .unwrap();
            let g = groups.groups.first();
            format!(
                "stream {stream}: {} entries, last id {}; group: {} pending, last delivered {}",
                info.length,
                info.last_generated_id,
                g.map_or(0, |g| g.pending),
                g.map_or("-", |g| g.last_delivered_id.as_str())
            )
        }
    }
}

#[cfg(feature = "redis")]
#[test]
fn redis_forward_and_reverse_under_faults() {
    run(
        "redis_forward_and_reverse_under_faults",
        redis_dest::RedisDest {
            r: support::brokers::Redis::start(),
        },
    );
}

#[cfg(feature = "kafka")]
mod kafka_dest {
    use super::*;
    use std::sync::{Arc, Mutex};

    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, ProducerContext};
    use rdkafka::ClientContext;
    use support::kafka::{Kafka, Record};

    /// Kafka (Tansu with persistent storage): the sink writes topic
    /// `orders`, `rin` reads it back; external producers write topic
    /// `ext`, `rext` reads it.
    pub struct KafkaDest {
        pub k: Kafka,
    }

    impl KafkaDest {
        pub fn new() -> KafkaDest {
            let k = Kafka::start_persistent();
            k.create_topic("orders", 2);
            k.create_topic("ext", 2);
            KafkaDest { k }
        }
    }

    /// Delivery reports: Ok or the error.
    #[derive(Clone, Default)]
    struct Reports(Arc<Mutex<Vec<Result<(), String>>>>);

    impl ClientContext for Reports {}

    impl ProducerContext for Reports {
        type DeliveryOpaque = ();
        fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
            self.0
                .lock()
                .unwrap()
                .push(r.as_ref().map(|_| ()).map_err(|(e, _)| e.to_string()));
        }
    }

    /// An idempotent producer, made anew after any failure (a restarted
    /// Tansu fences the old producer id).
    struct KafkaProducer {
        brokers: String,
        p: Option<(BaseProducer<Reports>, Reports)>,
    }

    impl KafkaProducer {
        fn attempt(&mut self, batch: &[(String, i64)]) -> Result<(), String> {
            if self.p.is_none() {
                let reports = Reports::default();
                let p = ClientConfig::new()
                    .set("bootstrap.servers", &self.brokers)
                    .set("linger.ms", "1")
                    .set("message.timeout.ms", "10000")
                    .set("enable.idempotence", "true")
                    .create_with_context(reports.clone())
                    .map_err(|e| e.to_string())?;
                self.p = Some((p, reports));
            }
            let (p, reports) = self.p.as_ref().unwrap();
            reports.0.lock().unwrap().clear();
            for (key, n) in batch {
                let value = json!({"n": n}).to_string();
                p.send(
                    BaseRecord::<String, String>::to("ext")
                        .key(key)
                        .payload(&value),
                )
                .map_err(|(e, _)| e.to_string())?;
            }
            // Every report, or the message timeout (10 s) passes.
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while reports.0.lock().unwrap().len() < batch.len() {
                if std::time::Instant::now() > deadline {
                    return Err("no delivery report".into());
                }
                p.poll(Duration::from_millis(20));
            }
            let all = reports.0.lock().unwrap().clone();
            all.into_iter()
                .collect::<Result<Vec<()>, String>>()
                .map(|_| ())
        }
    }

    impl Producer for KafkaProducer {
        fn send(&mut self, batch: &[(String, i64)]) -> Result<(), String> {
            let r = self.attempt(batch);
            if r.is_err() {
                self.p = None;
            }
            r
        }
    }

    fn pairs(records: &[Record]) -> Vec<(String, i64)> {
        records
            .iter()
            .map(|r| {
                let n = serde_json::from_slice::<Value>(&r.value)
                    .ok()
                    .and_then(|v| v["n"].as_i64())
                    .unwrap_or(-1);
                (
                    r.key.clone().unwrap_or_else(|| {
                        format!("<record {}:{} without a key>", r.partition, r.offset)
                    }),
                    n,
                )
            })
            .collect()
    }

    impl Dest for KafkaDest {
        fn sink(&self, batch_size: u64) -> Value {
            json!({"type": "kafka", "brokers": self.k.brokers(), "topic": "orders", "batch_size": batch_size})
        }
        fn stop(&mut self) {
            self.k.stop();
        }
        fn start(&mut self) {
            self.k.start_again();
        }
        fn quiet_stops_only(&self) -> bool {
            true
        }
        fn delivered(&self, want: usize) -> Vec<(String, i64)> {
            pairs(&self.k.read("orders", want, 60))
        }
        fn sources(&self) -> Option<(Value, Value)> {
            let s = |topic: &str| {
                json!({"type": "kafka", "brokers": self.k.brokers(), "topic": topic,
                       "group_id": format!("g-{topic}"), "max_wait_ms": 50,
                       "properties": {"session.timeout.ms": 6000}})
            };
            Some((s("orders"), s("ext")))
        }
        fn producer(&self) -> Box<dyn Producer> {
            Box::new(KafkaProducer {
                brokers: self.k.brokers(),
                p: None,
            })
        }
        fn source_drained(&self, pipeline: &str) -> String {
            let topic = if pipeline == "rin" { "orders" } else { "ext" };
            let records = self.k.read(topic, 0, 10);
            let mut ends: HashMap<i32, i64> = HashMap::new();
            for r in &records {
                let e = ends.entry(r.partition).or_default();
                *e = (*e).max(r.offset + 1);
            }
            format!(
                "topic {topic}: ends {ends:?}, group g-{topic} committed {:?}",
                self.k.committed(&format!("g-{topic}"), topic)
            )
        }
    }
}

#[cfg(feature = "kafka")]
#[test]
fn kafka_forward_and_reverse_under_faults() {
    run(
        "kafka_forward_and_reverse_under_faults",
        kafka_dest::KafkaDest::new(),
    );
}
