//! Commit-to-destination latency, part of `make bench`
//! (`cargo bench --bench latency`).
//!
//! A private PostgreSQL with the default durability settings; writers
//! publish into a kit outbox at a steady rate, one event per transaction
//! (`SELECT pgtrickle.outbox_publish(...)` in autocommit), while the
//! release relay follows the outbox live (not `--once`), to a file or to a
//! private nats-server's JetStream. Scenarios: 1,000 events/s from 4
//! writers and 10,000 events/s from 8 writers, each to the file and to
//! NATS, for `BENCH_LATENCY_SECS` seconds (default 10) per run.
//!
//! Per event: from the moment COMMIT returned in its writer to the moment
//! this process sees it at the destination. Both instants are taken in
//! this process with the monotonic clock: each writer keeps its events'
//! commit instants (by writer and sequence number, which the payload
//! carries); a collector thread records arrivals. For the file, the
//! collector waits on inotify and reads the new lines as soon as the relay
//! has written them (the relay fsyncs the file before it commits its
//! offset; the event is readable a little earlier). For NATS, the
//! collector is the subscriber of a push consumer on the stream
//! (deliver_policy new, no acks), so an event counts once JetStream stored
//! it and delivered it.
//!
//! Writers follow a fixed schedule (event k of writer w is due at
//! `t0 + (k + w / writers) * writers / rate`); a writer that falls behind
//! publishes at once, and stops when the run's time is up, so the achieved
//! rate shows what PostgreSQL sustained. Reported per scenario (medians of `BENCH_RUNS` runs, default
//! 3): p50, p90, p99 and max latency, the achieved rate, the writers'
//! transaction time (p50, p99), and the distribution pooled over the runs
//! (percentiles, for the plots). `BENCH_ONLY` selects scenarios by name,
//! e.g. `latency_file`, `_10000_per_s`.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{emit, median, selected};
use serde_json::{json, Value};
use support::{relay, temp_dir, Pg, Relay};

/// Where the relay delivers.
#[derive(Clone, Copy, PartialEq)]
enum Dest {
    File,
    Nats,
}

impl Dest {
    fn name(self) -> &'static str {
        match self {
            Dest::File => "file",
            Dest::Nats => "nats",
        }
    }
}

/// An event seen at the destination: writer, sequence number (-1: warm-up)
/// and when.
type Arrival = (usize, i64, Instant);

/// The current run: events carry it, and events of an earlier run (a
/// replay after the relay stopped) are not counted.
static RUN: AtomicU64 = AtomicU64::new(0);

/// The ~200-byte payload of event `k` of writer `w` in the current run.
fn payload(w: usize, k: i64) -> String {
    let r = RUN.load(Ordering::SeqCst);
    format!(
        r#"{{"r":{r},"w":{w},"k":{k},"customer":"customer-{}","sku":"{:032x}","qty":{},"price":12.34,"note":"{}"}}"#,
        k.rem_euclid(9973),
        (k as u64).wrapping_mul(2654435761),
        k.rem_euclid(10),
        "x".repeat(60)
    )
}

/// The writer and sequence number of an event's row JSON, if it is of
/// the current run.
fn ids(row: &Value) -> Option<(usize, i64)> {
    if row.get("r")?.as_u64()? != RUN.load(Ordering::SeqCst) {
        return None;
    }
    Some((row.get("w")?.as_u64()? as usize, row.get("k")?.as_i64()?))
}

/// Percentile `p` (0..100) of sorted `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Collect arrivals from the file the relay appends to, until `stop`.
fn tail_file(path: &std::path::Path, stop: &AtomicBool, out: &Mutex<Vec<Arrival>>) {
    let mut f = std::fs::File::open(path).unwrap();
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK) };
    assert!(fd >= 0, "inotify_init1");
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let wd = unsafe { libc::inotify_add_watch(fd, cpath.as_ptr(), libc::IN_MODIFY) };
    assert!(wd >= 0, "inotify_add_watch");
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut events = [0u8; 4096];
    loop {
        // Read whatever is there, then wait for the next write.
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            let now = Instant::now();
            pending.extend_from_slice(&buf[..n]);
            let mut got = Vec::new();
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let v: Value = serde_json::from_slice(&line).unwrap();
                if let Some((w, k)) = ids(&v["payload"]) {
                    got.push((w, k, now));
                }
            }
            out.lock().unwrap().extend(got);
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        unsafe { libc::poll(&mut pfd, 1, 100) };
        while unsafe { libc::read(fd, events.as_mut_ptr().cast(), events.len()) } > 0 {}
    }
    unsafe { libc::close(fd) };
}

/// Collect arrivals from subscription `sub`, until `stop`.
#[allow(deprecated)]
fn tail_nats(sub: &nats::Subscription, stop: &AtomicBool, out: &Mutex<Vec<Arrival>>) {
    while !stop.load(Ordering::SeqCst) {
        if let Ok(m) = sub.next_timeout(Duration::from_millis(100)) {
            let now = Instant::now();
            let v: Value = serde_json::from_slice(&m.data).unwrap();
            if let Some((w, k)) = ids(&v) {
                out.lock().unwrap().push((w, k, now));
            }
        }
    }
}

/// One run's results.
struct Run {
    /// Latencies in ms.
    lat: Vec<f64>,
    /// Achieved events/s.
    rate: f64,
    /// Writers' transaction times in ms.
    tx: Vec<f64>,
}

/// A scenario: the relay follows outbox `outbox` (pipeline of the same
/// name) to `dest` (`file`, or the NATS server at `nats_url`) while
/// `writers` publish at `rate` for `secs`.
struct Case<'a> {
    url: &'a str,
    outbox: &'a str,
    dest: Dest,
    file: &'a std::path::Path,
    nats_url: Option<String>,
    rate: f64,
    writers: usize,
    secs: f64,
}

/// One run of a scenario.
#[allow(deprecated)]
fn run_once(case: &Case) -> Run {
    let &Case {
        url,
        outbox,
        dest,
        file,
        rate,
        writers,
        secs,
        ..
    } = case;
    let nats_url = case.nats_url.as_deref();
    RUN.fetch_add(1, Ordering::SeqCst);
    let stop = AtomicBool::new(false);
    let arrivals = Mutex::new(Vec::<Arrival>::new());
    // The destination, ready before the relay starts.
    let nc = nats_url.map(|u| nats::connect(u).unwrap());
    let sub = match dest {
        Dest::File => {
            std::fs::write(file, b"").unwrap();
            None
        }
        Dest::Nats => {
            let nc = nc.as_ref().unwrap();
            let inbox = nc.new_inbox();
            let sub = nc.subscribe(&inbox).unwrap();
            let r = nc
                .request_timeout(
                    "$JS.API.CONSUMER.CREATE.LAT",
                    json!({"stream_name": "LAT", "config": {"deliver_subject": inbox,
                        "deliver_policy": "new", "ack_policy": "none"}})
                    .to_string(),
                    Duration::from_secs(10),
                )
                .unwrap();
            assert!(
                !String::from_utf8_lossy(&r.data).contains("\"error\""),
                "{}",
                String::from_utf8_lossy(&r.data)
            );
            Some(sub)
        }
    };
    let per_writer = ((rate * secs) / writers as f64).ceil() as i64;
    let interval = Duration::from_secs_f64(writers as f64 / rate);
    let mut relay = Relay::spawn(relay(url).args(["--pipeline", outbox]));
    let result = std::thread::scope(|s| {
        let collector = s.spawn(|| match &sub {
            None => tail_file(file, &stop, &arrivals),
            Some(sub) => tail_nats(sub, &stop, &arrivals),
        });
        let mut clients: Vec<postgres::Client> = (0..writers)
            .map(|_| Pg::shared_durable().client(url))
            .collect();
        let sql = "SELECT pgtrickle.outbox_publish($1, $2::text::jsonb)";
        // Warm-up: one event per writer, all seen at the destination (the
        // relay is following the outbox).
        for (w, c) in clients.iter_mut().enumerate() {
            c.execute(sql, &[&outbox, &payload(w, -1)]).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while arrivals.lock().unwrap().len() < writers {
            assert!(
                Instant::now() < deadline,
                "the warm-up events did not arrive; relay log:\n{}",
                relay.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        arrivals.lock().unwrap().clear();
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(secs);
        let handles: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(w, mut c)| {
                s.spawn(move || {
                    let st = c.prepare(sql).unwrap();
                    let offset = interval.mul_f64(w as f64 / writers as f64);
                    let mut commits = Vec::with_capacity(per_writer as usize);
                    let mut tx = Vec::with_capacity(per_writer as usize);
                    for k in 0..per_writer {
                        let due = t0 + offset + interval.mul_f64(k as f64);
                        let now = Instant::now();
                        // Behind schedule (PostgreSQL does not sustain
                        // the rate): stop when the time is up.
                        if now >= end {
                            break;
                        }
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        let body = payload(w, k);
                        let start = Instant::now();
                        c.execute(&st, &[&outbox, &body]).unwrap();
                        let done = Instant::now();
                        commits.push(done);
                        tx.push((done - start).as_secs_f64() * 1000.0);
                    }
                    (commits, tx)
                })
            })
            .collect();
        let per: Vec<(Vec<Instant>, Vec<f64>)> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        let last_commit = per.iter().filter_map(|(c, _)| c.last()).max().copied();
        let total: usize = per.iter().map(|(c, _)| c.len()).sum();
        let deadline = Instant::now() + Duration::from_secs(120);
        while arrivals.lock().unwrap().len() < total {
            assert!(
                Instant::now() < deadline,
                "{} of {total} events arrived; relay log:\n{}",
                arrivals.lock().unwrap().len(),
                relay.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::SeqCst);
        collector.join().unwrap();
        let arrived = arrivals.lock().unwrap();
        let mut seen: Vec<Vec<bool>> = per.iter().map(|(c, _)| vec![false; c.len()]).collect();
        let mut lat = Vec::with_capacity(total);
        for &(w, k, at) in arrived.iter() {
            if k < 0 {
                continue;
            }
            let k = k as usize;
            assert!(k < seen[w].len(), "event {w}/{k} was never written");
            assert!(!seen[w][k], "event {w}/{k} arrived twice");
            seen[w][k] = true;
            let commit = per[w].0[k];
            // Signed: an event seen before its writer's COMMIT returned
            // (possible in principle) counts as negative.
            let ms = if at >= commit {
                (at - commit).as_secs_f64() * 1000.0
            } else {
                -((commit - at).as_secs_f64() * 1000.0)
            };
            lat.push(ms);
        }
        assert_eq!(lat.len(), total, "every event arrives once");
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let mut tx: Vec<f64> = per.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        tx.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let elapsed = (last_commit.unwrap() - t0).as_secs_f64();
        Run {
            lat,
            rate: total as f64 / elapsed,
            tx,
        }
    });
    // Stopped as a service manager stops it: its offset is committed.
    relay.signal(libc::SIGTERM);
    relay.wait_exit(30);
    result
}

#[allow(deprecated)]
fn main() {
    if !common::benching() {
        return;
    }
    let runs = common::runs();
    let secs: f64 = common::env_or("BENCH_LATENCY_SECS", 10.0);
    let cases: Vec<(Dest, f64, usize)> = vec![
        (Dest::File, 1000.0, 4),
        (Dest::Nats, 1000.0, 4),
        (Dest::File, 10000.0, 8),
        (Dest::Nats, 10000.0, 8),
    ];
    let name = |d: Dest, rate: f64, writers: usize| {
        format!("latency_{}_{rate}_per_s_{writers}_writers", d.name())
    };
    let cases: Vec<_> = cases
        .into_iter()
        .filter(|(d, r, w)| selected(&name(*d, *r, *w)))
        .collect();
    if cases.is_empty() {
        return;
    }
    let pg = Pg::shared_durable();
    let url = pg.new_db("bench_latency");
    let dir = temp_dir("bench_latency");
    let mut c = pg.client(&url);
    let n = cases
        .iter()
        .any(|(d, _, _)| *d == Dest::Nats)
        .then(support::brokers::Nats::start);
    if let Some(n) = &n {
        let nc = nats::connect(n.url()).unwrap();
        let r = nc
            .request_timeout(
                "$JS.API.STREAM.CREATE.LAT",
                json!({"name": "LAT", "subjects": ["lat.>"], "storage": "file",
                       "num_replicas": 1})
                .to_string(),
                Duration::from_secs(10),
            )
            .unwrap();
        assert!(!String::from_utf8_lossy(&r.data).contains("\"error\""));
    }
    for (dest, rate, writers) in cases {
        let name = name(dest, rate, writers);
        let outbox = format!("lat_{}_{}", dest.name(), rate as u64);
        let file = dir.join(format!("{outbox}.jsonl"));
        c.execute("SELECT pgtrickle.enable_outbox($1)", &[&outbox])
            .unwrap();
        let sink = match (dest, &n) {
            (Dest::File, _) => json!({"type": "stdout", "path": file}),
            (Dest::Nats, Some(n)) => json!({"type": "nats", "url": n.url(), "stream": "LAT",
                                            "subject": "lat.{op}"}),
            (Dest::Nats, None) => unreachable!(),
        };
        c.execute(
            "SELECT pgtrickle.set_relay_outbox($1, $1, 'bench', $2::text::jsonb)",
            &[&outbox, &sink.to_string()],
        )
        .unwrap();
        let mut all = Vec::new();
        let (mut p50, mut p90, mut p99, mut max, mut rates, mut tx50, mut tx99) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for i in 0..runs {
            let r = run_once(&Case {
                url: &url,
                outbox: &outbox,
                dest,
                file: &file,
                nats_url: n.as_ref().map(|n| n.url()),
                rate,
                writers,
                secs,
            });
            eprintln!(
                "{name} run {}: {:.0} events/s, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
                 writer transaction p50 {:.2} ms, p99 {:.2} ms",
                i + 1,
                r.rate,
                pct(&r.lat, 50.0),
                pct(&r.lat, 90.0),
                pct(&r.lat, 99.0),
                r.lat[r.lat.len() - 1],
                pct(&r.tx, 50.0),
                pct(&r.tx, 99.0)
            );
            p50.push(pct(&r.lat, 50.0));
            p90.push(pct(&r.lat, 90.0));
            p99.push(pct(&r.lat, 99.0));
            max.push(r.lat[r.lat.len() - 1]);
            rates.push(r.rate);
            tx50.push(pct(&r.tx, 50.0));
            tx99.push(pct(&r.tx, 99.0));
            all.extend(r.lat);
        }
        let params = json!({"sink": dest.name(), "target_rate": rate, "writers": writers,
                            "seconds": secs, "runs": runs, "events_per_run": all.len() / runs});
        for (suffix, v, unit) in [
            ("p50", &p50, "ms"),
            ("p90", &p90, "ms"),
            ("p99", &p99, "ms"),
            ("max", &max, "ms"),
            ("achieved_rate", &rates, "events/s"),
            ("writer_tx_p50", &tx50, "ms"),
            ("writer_tx_p99", &tx99, "ms"),
        ] {
            emit(
                &format!("{name}_{suffix}"),
                median(v),
                unit,
                None,
                params.clone(),
            );
        }
        all.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let points = [
            0.1, 1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 97.5, 99.0,
            99.5, 99.9, 100.0,
        ];
        let mut p = params;
        p["percentiles"] = Value::Object(
            points
                .iter()
                .map(|q| (q.to_string(), json!(common::round(pct(&all, *q), 3))))
                .collect(),
        );
        p["pooled_events"] = json!(all.len());
        emit(
            &format!("{name}_distribution"),
            pct(&all, 50.0),
            "ms",
            None,
            p,
        );
        c.execute("SELECT pgtrickle.disable_relay($1)", &[&outbox])
            .unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
