//! The machinery of the fault-injection suite (tests/faults.rs): a seeded
//! random generator, the knobs read from the environment, outbox writers
//! that commit out of id order, claim-check deltas, external producers,
//! the relay as a killable child, and the set comparison of what was
//! written against what arrived.
//!
//! Included by tests/faults.rs with `#[path]`, so no other test binary
//! compiles it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::{relay, Relay};

/// SplitMix64: small, fast and good enough to draw a schedule from a seed.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo)
    }

    /// A duration of `lo..hi` milliseconds.
    pub fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    /// One of `items`.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.range(0, items.len() as u64) as usize]
    }

    /// A generator of its own for a thread or a part (same seed, same
    /// sequence of children).
    pub fn child(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

/// The run's knobs: `FAULTS_SEED` (replay a run), `FAULTS_ROUNDS` (fault
/// episodes per scenario), `FAULTS_SCALE` (events per transaction and rows
/// per claim-check delta, as a multiple).
#[derive(Clone, Copy, Debug)]
pub struct Knobs {
    /// The run's seed; each scenario derives its own from it and its name.
    pub seed: u64,
    /// Fault episodes per scenario.
    pub rounds: usize,
    /// Load multiplier.
    pub scale: u64,
}

fn env_num(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, got {v:?}")),
    )
}

impl Knobs {
    /// Read the knobs; without `FAULTS_SEED` the seed is new each run.
    pub fn from_env() -> Knobs {
        let seed = env_num("FAULTS_SEED").unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            let mut r = Rng::new(t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32));
            // Short enough to type.
            r.next_u64() % 1_000_000_000
        });
        Knobs {
            seed,
            rounds: env_num("FAULTS_ROUNDS").unwrap_or(8).max(1) as usize,
            scale: env_num("FAULTS_SCALE").unwrap_or(1).max(1),
        }
    }

    /// The seed of scenario `name`.
    pub fn scenario_seed(&self, name: &str) -> u64 {
        // FNV-1a of the name, mixed into the run's seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Rng::new(self.seed ^ h).next_u64()
    }

    /// How to run exactly this scenario again.
    pub fn replay(&self, name: &str) -> String {
        format!(
            "FAULTS_SEED={} FAULTS_ROUNDS={} FAULTS_SCALE={} cargo test --test faults -- --exact {name}",
            self.seed, self.rounds, self.scale
        )
    }
}

/// What a scenario did, with times since its start: printed with a failure
/// (and with `--nocapture`).
#[derive(Clone)]
pub struct Timeline {
    start: Instant,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Timeline {
    /// A timeline starting now.
    pub fn new() -> Timeline {
        Timeline {
            start: Instant::now(),
            lines: Arc::default(),
        }
    }

    /// Record `what` at the current time.
    pub fn note(&self, what: impl AsRef<str>) {
        let line = format!(
            "{:7.2}s {}",
            self.start.elapsed().as_secs_f64(),
            what.as_ref()
        );
        self.lines.lock().unwrap().push(line);
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Every line so far.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

/// Prints the replay line if the scenario's thread panics (a harness
/// deadline, say), so every failure names its seed.
pub struct SeedGuard {
    /// The line to print.
    pub replay: String,
    /// The timeline to print with it.
    pub timeline: Timeline,
    /// Set when the failure message already says all this.
    pub reported: bool,
}

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.reported {
            eprintln!(
                "\nfault-injection failure; replay with:\n  {}\ntimeline:\n{}",
                self.replay,
                self.timeline.text()
            );
        }
    }
}

/// The events written, by key: those whose write was confirmed, and those
/// whose commit failed without an answer (decided at the end by looking
/// at the outbox).
#[derive(Default)]
pub struct Ledger {
    /// Confirmed events: key → n.
    pub sure: HashMap<String, i64>,
    /// The events of each commit that failed without an answer.
    pub unsure: Vec<Vec<(String, i64)>>,
}

/// The shared state of every writing thread.
#[derive(Clone)]
struct Shared {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    busy: Arc<AtomicUsize>,
    next_n: Arc<AtomicI64>,
    ledger: Arc<Mutex<Ledger>>,
}

impl Shared {
    /// Run `f` unless paused (then wait) or stopped (then false).
    fn turn(&self, f: impl FnOnce()) -> bool {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return false;
            }
            self.busy.fetch_add(1, Ordering::SeqCst);
            if self.pause.load(Ordering::SeqCst) {
                self.busy.fetch_sub(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            f();
            self.busy.fetch_sub(1, Ordering::SeqCst);
            return true;
        }
    }
}

/// Everything that writes while the faults happen: outbox writers,
/// claim-check deltas and external producers.
pub struct Writers {
    url: String,
    shared: Shared,
    threads: Vec<JoinHandle<()>>,
    /// Events per transaction (1..=per_tx).
    per_tx: u64,
}

/// A connection to `url`, retried while PostgreSQL is away.
fn connect_retrying(url: &str, stop_by: Instant) -> postgres::Client {
    loop {
        match postgres::Client::connect(url, postgres::NoTls) {
            Ok(c) => return c,
            Err(e) => {
                assert!(Instant::now() < stop_by, "no connection to {url}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Writers {
    /// No writers yet; `url` is the database with outbox `orders`.
    pub fn new(url: &str, scale: u64) -> Writers {
        Writers {
            url: url.to_string(),
            shared: Shared {
                stop: Arc::default(),
                pause: Arc::default(),
                busy: Arc::default(),
                next_n: Arc::new(AtomicI64::new(0)),
                ledger: Arc::default(),
            },
            threads: Vec::new(),
            per_tx: 3 * scale,
        }
    }

    /// Start `count` outbox writers. Each commits transactions of 1 to
    /// 3×scale `outbox_publish` calls, and holds most of them open a few
    /// milliseconds after taking its ids (some for up to 600 ms), so
    /// smaller ids keep committing after larger ones.
    pub fn start_outbox_writers(&mut self, count: usize, rng: &mut Rng) {
        for w in 0..count {
            let (url, shared, per_tx) = (self.url.clone(), self.shared.clone(), self.per_tx);
            let mut rng = rng.child();
            self.threads.push(std::thread::spawn(move || {
                let mut client: Option<postgres::Client> = None;
                loop {
                    let go = shared.turn(|| {
                        let c = client.get_or_insert_with(|| {
                            connect_retrying(&url, Instant::now() + Duration::from_secs(120))
                        });
                        let hold = match rng.range(0, 100) {
                            0..=79 => rng.ms(0, 10),
                            80..=94 => rng.ms(10, 100),
                            _ => rng.ms(200, 600),
                        };
                        let k = rng.range(1, per_tx + 1);
                        if write_tx(c, &shared, w as i32, k, hold).is_err() {
                            client = None;
                        }
                    });
                    if !go {
                        break;
                    }
                    std::thread::sleep(rng.ms(10, 60));
                }
            }));
        }
    }

    /// Publish one claim-check delta of `rows`×scale rows (a tenth of them
    /// deletes) in the background, holding its transaction open a moment
    /// after taking its id; it is published again if the attempt fails
    /// (a PostgreSQL restart).
    pub fn claim_check(&mut self, rows: u64, rng: &mut Rng) {
        let (url, shared) = (self.url.clone(), self.shared.clone());
        let rows = rows * self.per_tx / 3;
        let mut rng = rng.child();
        self.threads.push(std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut done = false;
            while !done {
                let go = shared.turn(|| {
                    let mut c = connect_retrying(&url, deadline);
                    done = claim_check_tx(&mut c, &shared, rows, rng.ms(0, 300)).is_ok();
                });
                // A stop before the first attempt: nothing was written.
                if !go {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the claim-check delta never committed"
                );
            }
        }));
    }

    /// Start `count` external producers: each sends batches of 1..10
    /// messages with keys `ext:<n>` through its own `P` (made by `make`),
    /// sending a batch again until it is acknowledged; only then are its
    /// events counted as written.
    pub fn start_producers(
        &mut self,
        count: usize,
        rng: &mut Rng,
        make: impl Fn() -> Box<dyn Producer>,
    ) {
        for _ in 0..count {
            let shared = self.shared.clone();
            let mut p = make();
            let mut rng = rng.child();
            self.threads.push(std::thread::spawn(move || loop {
                let go = shared.turn(|| {
                    let k = rng.range(1, 10);
                    let batch: Vec<(String, i64)> = (0..k)
                        .map(|_| {
                            let n = shared.next_n.fetch_add(1, Ordering::SeqCst);
                            (format!("ext:{n}"), n)
                        })
                        .collect();
                    let deadline = Instant::now() + Duration::from_secs(120);
                    let mut last = String::new();
                    while let Err(e) = p.send(&batch) {
                        assert!(
                            Instant::now() < deadline,
                            "an external batch was never acknowledged: {last}"
                        );
                        last = e;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    shared.ledger.lock().unwrap().sure.extend(batch);
                });
                if !go {
                    break;
                }
                std::thread::sleep(rng.ms(20, 100));
            }));
        }
    }

    /// Hold every writer between transactions (and wait until all are).
    pub fn pause(&self) {
        self.shared.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.shared.busy.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "writers never paused");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Let them go on.
    pub fn resume(&self) {
        self.shared.pause.store(false, Ordering::SeqCst);
    }

    /// Events confirmed so far.
    pub fn written(&self) -> usize {
        self.shared.ledger.lock().unwrap().sure.len()
    }

    /// Stop every writer and return what was written: an unsure commit
    /// happened if the outbox holds its first event. (Its id alone does
    /// not tell: after a crash, PostgreSQL hands out again the sequence
    /// values of transactions that did not commit.)
    pub fn finish(mut self) -> HashMap<String, i64> {
        self.resume();
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().expect("a writer panicked");
        }
        let mut ledger = std::mem::take(&mut *self.shared.ledger.lock().unwrap());
        if !ledger.unsure.is_empty() {
            let mut c = connect_retrying(&self.url, Instant::now() + Duration::from_secs(60));
            for events in std::mem::take(&mut ledger.unsure) {
                // Row 0 of the transaction's first outbox row.
                let (key, n) = &events[0];
                let id: i64 = key.split(':').nth(1).unwrap().parse().unwrap();
                let committed: bool = c
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pgtrickle.outbox_orders o WHERE o.id = $1 AND \
                           CASE WHEN o.is_claim_check \
                             THEN EXISTS (SELECT 1 FROM pgtrickle.outbox_delta_rows_orders d \
                                           WHERE d.outbox_id = o.id AND d.row_num = 0 \
                                             AND (d.payload->>'n')::bigint = $2) \
                             ELSE (o.payload->'inserted'->0->>'n')::bigint = $2 END)",
                        &[&id, n],
                    )
                    .unwrap()
                    .get(0);
                if committed {
                    ledger.sure.extend(events);
                }
            }
        }
        ledger.sure
    }
}

/// One outbox transaction of `k` events; the commit comes `hold` after the
/// ids were taken.
fn write_tx(
    c: &mut postgres::Client,
    shared: &Shared,
    w: i32,
    k: u64,
    hold: Duration,
) -> Result<(), postgres::Error> {
    let mut tx = c.transaction()?;
    let mut events = Vec::new();
    for _ in 0..k {
        let n = shared.next_n.fetch_add(1, Ordering::SeqCst);
        let id: i64 = tx
            .query_one(
                "SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('n', $1::bigint, 'w', $2::int))",
                &[&n, &w],
            )?
            .get(0);
        events.push((format!("outbox_orders:{id}:0"), n));
    }
    std::thread::sleep(hold);
    match tx.commit() {
        Ok(()) => {
            shared.ledger.lock().unwrap().sure.extend(events);
            Ok(())
        }
        Err(e) => {
            // No answer to COMMIT: it may have happened. All events of a
            // transaction commit together, so one decides.
            shared.ledger.lock().unwrap().unsure.push(events);
            Err(e)
        }
    }
}

/// One claim-check delta of `rows` rows: row i (deletes first, as the
/// relay numbers them) carries n = base + i.
fn claim_check_tx(
    c: &mut postgres::Client,
    shared: &Shared,
    rows: u64,
    hold: Duration,
) -> Result<(), postgres::Error> {
    let rows = rows as i64;
    let deletes = rows / 10;
    let base = shared.next_n.fetch_add(rows, Ordering::SeqCst);
    c.batch_execute("SET pgtrickle.outbox_inline_threshold = 100")?;
    let mut tx = c.transaction()?;
    let id: i64 = tx
        .query_one(
            "SELECT pgtrickle.outbox_publish_delta('orders', \
               (SELECT jsonb_agg(jsonb_build_object('n', g, 'cc', true) ORDER BY g) \
                  FROM generate_series($1::bigint + $2::bigint, $1::bigint + $3::bigint - 1) g), \
               (SELECT jsonb_agg(jsonb_build_object('n', g, 'cc', true) ORDER BY g) \
                  FROM generate_series($1::bigint, $1::bigint + $2::bigint - 1) g), \
               false)",
            &[&base, &deletes, &rows],
        )?
        .get(0);
    let events: Vec<(String, i64)> = (0..rows)
        .map(|i| (format!("outbox_orders:{id}:{i}"), base + i))
        .collect();
    std::thread::sleep(hold);
    match tx.commit() {
        Ok(()) => {
            shared.ledger.lock().unwrap().sure.extend(events);
            Ok(())
        }
        Err(e) => {
            shared.ledger.lock().unwrap().unsure.push(events);
            Err(e)
        }
    }
}

/// Sends messages `(key, n)` to a broker, for a reverse pipeline to read;
/// Ok only when the broker acknowledged every one of them.
pub trait Producer: Send {
    /// Send one batch.
    fn send(&mut self, batch: &[(String, i64)]) -> Result<(), String>;
}

/// The relay as a child process that can be SIGKILLed and started again;
/// keeps the logs of every run.
pub struct RelayProc {
    url: String,
    cur: Option<Relay>,
    runs: usize,
    log: String,
    /// Runs that ended without our kill.
    pub problems: Vec<String>,
}

impl RelayProc {
    /// Start the relay on `url` (every pipeline).
    pub fn start(url: &str) -> RelayProc {
        let mut r = RelayProc {
            url: url.to_string(),
            cur: None,
            runs: 0,
            log: String::new(),
            problems: Vec::new(),
        };
        r.spawn();
        r
    }

    /// Start a new run.
    pub fn spawn(&mut self) {
        assert!(self.cur.is_none());
        self.runs += 1;
        self.cur = Some(Relay::spawn(&mut relay(&self.url)));
    }

    /// Note a run that exited by itself.
    fn check_alive(&mut self) {
        if let Some(r) = &mut self.cur {
            if let Some(status) = r.child.try_wait().unwrap() {
                self.problems.push(format!(
                    "relay run {} exited by itself ({status})",
                    self.runs
                ));
            }
        }
    }

    fn collect(&mut self, r: Relay) {
        self.log
            .push_str(&format!("===== relay run {} =====\n", self.runs));
        self.log.push_str(&r.stderr());
    }

    /// SIGKILL the current run.
    pub fn kill(&mut self) {
        self.check_alive();
        if let Some(mut r) = self.cur.take() {
            r.signal(libc::SIGKILL);
            r.wait_exit(10);
            self.collect(r);
        }
    }

    /// SIGTERM the current run: it must exit 0 within 10 s.
    pub fn stop(&mut self) {
        self.check_alive();
        if let Some(mut r) = self.cur.take() {
            if r.child.try_wait().unwrap().is_none() {
                r.signal(libc::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(10);
                while r.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                match r.child.try_wait().unwrap() {
                    Some(s) if s.code() == Some(0) => {}
                    Some(s) => self
                        .problems
                        .push(format!("relay run {} ended {s} on SIGTERM", self.runs)),
                    None => {
                        self.problems.push(format!(
                            "relay run {} did not stop within 10 s of SIGTERM",
                            self.runs
                        ));
                        r.signal(libc::SIGKILL);
                        r.wait_exit(10);
                    }
                }
            }
            self.collect(r);
        }
    }

    /// Every run's log so far (the current one included).
    pub fn log(&self) -> String {
        let mut s = self.log.clone();
        if let Some(r) = &self.cur {
            s.push_str(&format!("===== relay run {} =====\n", self.runs));
            s.push_str(&r.stderr());
        }
        s
    }

    /// How many runs there were.
    pub fn runs(&self) -> usize {
        self.runs
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if let Some(mut r) = self.cur.take() {
            r.signal(libc::SIGKILL);
            let _ = r.child.wait();
        }
    }
}

/// Whether forward pipeline `fwd` has committed a position at or past
/// every row of outbox `orders` (false while PostgreSQL is away).
pub fn forward_caught_up(url: &str) -> bool {
    let Ok(mut c) = postgres::Client::connect(url, postgres::NoTls) else {
        return false;
    };
    c.query_one(
        "SELECT EXISTS (SELECT 1 FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = 'fwd') \
           AND NOT EXISTS (SELECT 1 FROM pgtrickle.outbox_orders o \
                 WHERE (o.txid, o.id) > (SELECT r.last_txid, r.last_change_id \
                                           FROM pgtrickle.relay_consumer_offsets r \
                                          WHERE r.pipeline_id = 'fwd'))",
        &[],
    )
    .map(|r| r.get(0))
    .unwrap_or(false)
}

/// Poll `f` until it is true or `secs` pass; whether it became true.
pub fn within(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The outcome of comparing a destination with what was written.
pub struct Comparison {
    /// A one-line summary.
    pub summary: String,
    /// What is wrong (empty: the sets are equal).
    pub problems: Vec<String>,
    /// Keys written and not found.
    pub missing: Vec<String>,
}

/// Compare `found` (key, n) at destination `what` with `want` and
/// `written` (key → n): every key of `want` must be there with its n,
/// nothing may be there under a key that was not written (an event under
/// a second key, or a foreign one) or with another n, and a key may
/// repeat only if `repeats_allowed` (the destination can hold a replay
/// under the same key).
pub fn compare(
    what: &str,
    want: &HashMap<String, i64>,
    written: &HashMap<String, i64>,
    found: &[(String, i64)],
    repeats_allowed: bool,
) -> Comparison {
    let mut count: HashMap<&str, usize> = HashMap::new();
    let mut problems = Vec::new();
    let mut foreign = Vec::new();
    let mut wrong_n = Vec::new();
    for (key, n) in found {
        *count.entry(key.as_str()).or_default() += 1;
        match written.get(key) {
            None => foreign.push(format!("{key} (n={n})")),
            Some(want) if want != n => wrong_n.push(format!("{key}: n={n}, written n={want}")),
            Some(_) => {}
        }
    }
    let mut missing: Vec<String> = want
        .keys()
        .filter(|k| !count.contains_key(k.as_str()))
        .cloned()
        .collect();
    missing.sort_by_key(|k| want[k]);
    let repeated: usize = count.values().map(|c| c - 1).sum();
    let sample = |v: &[String]| v.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
    if !missing.is_empty() {
        problems.push(format!(
            "{what}: {} of {} events missing, e.g. {}",
            missing.len(),
            want.len(),
            sample(&missing)
        ));
    }
    if !foreign.is_empty() {
        // Name the n's that arrived under another key than the written one.
        let by_n: BTreeMap<i64, &String> = written.iter().map(|(k, n)| (*n, k)).collect();
        let second: Vec<String> = found
            .iter()
            .filter(|(k, _)| !written.contains_key(k))
            .filter_map(|(k, n)| by_n.get(n).map(|w| format!("n={n} under {k} and {w}")))
            .collect();
        problems.push(format!(
            "{what}: {} entries under a key that was not written, e.g. {}{}",
            foreign.len(),
            sample(&foreign),
            if second.is_empty() {
                String::new()
            } else {
                format!("; second keys: {}", sample(&second))
            }
        ));
    }
    if !wrong_n.is_empty() {
        problems.push(format!(
            "{what}: {} entries with another event's content, e.g. {}",
            wrong_n.len(),
            sample(&wrong_n)
        ));
    }
    if repeated > 0 && !repeats_allowed {
        problems.push(format!("{what}: {repeated} repeats where none can be"));
    }
    Comparison {
        summary: format!(
            "{what}: {} entries, {} distinct keys, {} repeats of a key",
            found.len(),
            count.len(),
            repeated
        ),
        problems,
        missing,
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
