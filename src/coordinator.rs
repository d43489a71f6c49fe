//! The coordinator: loads the relay catalog, runs one thread per enabled
//! pipeline, and restarts exactly the pipeline a `pgtrickle_relay_config`
//! notification names. A periodic re-read (and SIGHUP) catches anything a
//! lost notification missed. Each pipeline thread runs the sessions of its
//! pipeline ([`crate::forward`] or [`crate::reverse`]) and retries them by
//! the rules of [`Retries`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fallible_iterator::FallibleIterator;
use postgres::Client;

use crate::config::{self, CatalogEntry, Pipeline};
use crate::error::{Class, Error};
use crate::health::{self, State};
use crate::pipeline::{Ctx, Direction};
use crate::retry::{Backoff, Retries, Verdict};
use crate::shutdown::Signals;
use crate::{forward, logging, metrics, pg, reverse};

/// How a run of the relay ended: the process's exit status (the codes are
/// in src/main.rs and the man page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped by a signal, or (`--once`) every pipeline drained.
    Success,
    /// A `--once` run failed, or the relay could not start.
    Failure,
}

/// Process settings from flags and environment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// PostgreSQL URL (expanded).
    pub postgres_url: String,
    /// `--relay-group-id`.
    pub relay_group: String,
    /// This process as `host:pid`.
    pub worker_id: String,
    /// `--once`.
    pub once: bool,
    /// `--pipeline` names (empty: all).
    pub only: Vec<String>,
    /// `--batch-size`.
    pub batch_size: usize,
    /// `--poll-interval-ms`.
    pub poll_interval: Duration,
    /// `--discovery-interval-secs`.
    pub discovery_interval: Duration,
    /// `--stall-timeout-secs`: no progress this long is unhealthy.
    pub stall_timeout: Duration,
    /// `--metrics-addr`, unless the endpoints are not served (`off`, `--once`).
    pub metrics_addr: Option<String>,
}

/// How long shutdown waits for pipelines to finish their batch.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(4500);

struct Running {
    entry: CatalogEntry,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<(), Error>>,
}

/// Catalog entries with their state in this process.
struct Coordinator<'a> {
    settings: &'a Settings,
    signals: &'a Signals,
    running: HashMap<String, Running>,
    /// Entries that ended (or were refused) and stay so until they change.
    idle: HashMap<String, CatalogEntry>,
    failed: bool,
}

/// The catalog entries: the one named `name`, or all of them.
pub fn load(client: &mut Client, name: Option<&str>) -> Result<Vec<CatalogEntry>, Error> {
    let rows = match name {
        Some(n) => client.query(
            "SELECT name, direction, enabled, config::text FROM pgtrickle.get_relay_config($1)",
            &[&n],
        )?,
        None => client.query(
            "SELECT name, direction, enabled, config::text FROM pgtrickle.list_relay_configs()",
            &[],
        )?,
    };
    rows.iter()
        .map(|r| {
            let name: String = r.get(0);
            let direction: String = r.get(1);
            let direction = Direction::parse(&direction).ok_or_else(|| {
                Error::permanent(format!(
                    "pipeline {name:?}: unknown direction {direction:?} in the relay catalog"
                ))
            })?;
            let text: String = r.get(3);
            let config = serde_json::from_str(&text).map_err(|e| {
                Error::permanent(format!("pipeline {name:?}: config is not JSON: {e}")).caused_by(e)
            })?;
            Ok(CatalogEntry {
                name,
                direction,
                enabled: r.get(2),
                config,
            })
        })
        .collect()
}

impl Coordinator<'_> {
    fn wanted(&self, e: &CatalogEntry) -> bool {
        e.enabled && (self.settings.only.is_empty() || self.settings.only.contains(&e.name))
    }

    /// Bring the pipelines named in `names` in line with `entries`.
    fn reconcile(&mut self, names: Vec<String>, entries: Vec<CatalogEntry>) {
        let mut by_name: HashMap<String, CatalogEntry> =
            entries.into_iter().map(|e| (e.name.clone(), e)).collect();
        for name in names {
            let new = by_name.remove(&name).filter(|e| self.wanted(e));
            let current = self
                .running
                .get(&name)
                .map(|r| &r.entry)
                .or_else(|| self.idle.get(&name));
            if current == new.as_ref() {
                continue;
            }
            let was_running = self.stop(&name);
            self.idle.remove(&name);
            match new {
                Some(e) => {
                    if was_running {
                        log::info!("pipeline {name:?} changed; restarting it");
                    }
                    self.start(e);
                }
                None => {
                    health::remove(&name);
                    if was_running {
                        log::info!("pipeline {name:?} disabled or deleted; stopped");
                    }
                }
            }
        }
    }

    fn reconcile_all(&mut self, client: &mut Client) -> Result<(), Error> {
        let entries = load(client, None)?;
        let mut names: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
        names.extend(self.running.keys().cloned());
        names.extend(self.idle.keys().cloned());
        names.sort();
        names.dedup();
        self.reconcile(names, entries);
        Ok(())
    }

    fn start(&mut self, entry: CatalogEntry) {
        let name = entry.name.clone();
        let direction = entry.direction;
        let p = match config::parse(&entry, self.settings.batch_size) {
            Ok(p) => p,
            Err(e) => {
                log::error!("pipeline {name:?}: bad config, {e}; pipeline not started");
                health::set(&name, direction.as_str(), State::BadConfig(e.to_string()));
                self.failed = true;
                self.idle.insert(name, entry);
                return;
            }
        };
        health::set(&name, direction.as_str(), State::Running);
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = Ctx {
            name: name.clone(),
            relay_group: self.settings.relay_group.clone(),
            worker_id: self.settings.worker_id.clone(),
            postgres_url: self.settings.postgres_url.clone(),
            once: self.settings.once,
            poll_interval: self.settings.poll_interval,
            stop: stop.clone(),
            shutdown: self.signals.shutdown.clone(),
            direction,
            config: entry.config.to_string().into(),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("pipeline {name}"))
            .spawn(move || {
                logging::set_pipeline(&ctx.name);
                log::info!("pipeline started");
                let r = run_pipeline(&ctx, &p);
                match &r {
                    Ok(()) => log::info!("pipeline stopped"),
                    Err(e) => log::error!("pipeline failed: {e}"),
                }
                health::set(&ctx.name, ctx.direction.as_str(), State::Stopped);
                r
            });
        match spawned {
            Ok(handle) => {
                self.running.insert(
                    name,
                    Running {
                        entry,
                        stop,
                        handle,
                    },
                );
            }
            Err(e) => {
                log::error!("pipeline {name:?}: cannot start a thread: {e}");
                self.failed = true;
                self.idle.insert(name, entry);
            }
        }
    }

    /// Stop a running pipeline and wait for it; true if it was running.
    fn stop(&mut self, name: &str) -> bool {
        match self.running.remove(name) {
            Some(r) => {
                r.stop.store(true, Ordering::Relaxed);
                let _ = r.handle.join();
                true
            }
            None => false,
        }
    }

    /// Collect pipelines that ended on their own.
    fn reap(&mut self) {
        let done: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| r.handle.is_finished())
            .map(|(n, _)| n.clone())
            .collect();
        for name in done {
            let r = self.running.remove(&name).expect("listed above");
            match r.handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(_)) => self.failed = true,
                Err(_) => {
                    log::error!("pipeline {name:?} crashed (a bug: please report it)");
                    self.failed = true;
                }
            }
            self.idle.insert(name, r.entry);
        }
    }

    /// Ask every pipeline to stop and wait a bounded time.
    fn shutdown(&mut self) {
        for r in self.running.values() {
            r.stop.store(true, Ordering::Relaxed);
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while Instant::now() < deadline && self.running.values().any(|r| !r.handle.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let stuck: Vec<&String> = self
            .running
            .iter()
            .filter(|(_, r)| !r.handle.is_finished())
            .map(|(n, _)| n)
            .collect();
        if !stuck.is_empty() {
            log::warn!(
                "pipelines {stuck:?} did not finish their batch in time; it will be replayed"
            );
        }
    }
}

fn connect(settings: &Settings, signals: &Signals) -> Option<Client> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let attempt =
            pg::connect(&settings.postgres_url, "pgtrickle-relay coordinator").and_then(|mut c| {
                c.batch_execute("LISTEN pgtrickle_relay_config")?;
                Ok(c)
            });
        health::catalog_connected(attempt.is_ok());
        match attempt {
            Ok(c) => return Some(c),
            Err(e) if settings.once => {
                log::error!("{e}");
                return None;
            }
            Err(e) => {
                let d = backoff.next_delay();
                log::warn!("{e}; retrying in {d:.1?}");
                if !crate::retry::sleep_unless(&signals.shutdown, d) {
                    return None;
                }
            }
        }
    }
}

/// A pipeline thread: run sessions of the pipeline until it is stopped, its
/// input ends, or (`--once`) it is drained; after a failed session, do
/// what [`Retries`] says. Err only for a `--once` run that could not finish.
fn run_pipeline(ctx: &Ctx, p: &Pipeline) -> Result<(), Error> {
    let mut retries = Retries::new(ctx.once);
    let mut reverse_state = reverse::State::default();
    loop {
        if ctx.stopping() {
            return Ok(());
        }
        let started = Instant::now();
        let result = match p {
            Pipeline::Forward(f) => forward::session(ctx, f),
            Pipeline::Reverse(r) => reverse::session(ctx, r, &mut reverse_state),
        };
        let Err(e) = result else {
            return Ok(());
        };
        let m = metrics::get();
        match p {
            Pipeline::Forward(_) => m.publish_errors.with_label_values(&[&ctx.name]).inc(),
            Pipeline::Reverse(_) => m.source_errors.with_label_values(&[&ctx.name]).inc(),
        }
        let delay = match retries.after(e.class, started.elapsed()) {
            Verdict::Stop => {
                log::info!("output closed ({e}); stopping the relay");
                ctx.shutdown.store(true, Ordering::Relaxed);
                return Ok(());
            }
            Verdict::GiveUp => return Err(e),
            Verdict::RetryIn(d) => d,
        };
        if ctx.stopping() {
            return Ok(());
        }
        let retry_ms = delay.as_millis() as u64;
        let when = match delay.is_zero() {
            true => "now".to_string(),
            false => format!("in {delay:.1?}"),
        };
        match e.class {
            Class::Permanent => {
                log::error!(error = e.msg.as_str(), retry_ms; "{e}; retrying {when}")
            }
            _ => log::warn!(error = e.msg.as_str(), retry_ms; "{e}; retrying {when}"),
        }
        health::set(
            &ctx.name,
            ctx.direction.as_str(),
            State::Retrying(e.msg.clone()),
        );
        m.retries.with_label_values(&[&ctx.name]).inc();
        if !ctx.sleep(delay) {
            return Ok(());
        }
    }
}

/// Run until shutdown (or, with `--once`, until every pipeline drained).
pub fn run(settings: &Settings, signals: &Signals) -> Exit {
    let mut co = Coordinator {
        settings,
        signals,
        running: HashMap::new(),
        idle: HashMap::new(),
        failed: false,
    };
    let Some(mut client) = connect(settings, signals) else {
        return if signals.stopping() {
            Exit::Success
        } else {
            Exit::Failure
        };
    };
    if let Err(e) = co.reconcile_all(&mut client) {
        match e.class {
            // PostgreSQL restarting, a timeout: read again (at the next
            // scan, or on reconnecting).
            Class::Transient => log::warn!("reading the relay catalog: {e}; reading it again"),
            _ => log::error!(
                "reading the relay catalog: {e} (is the SQL installed? `pgtrickle-relay sql | psql`)"
            ),
        }
        if settings.once {
            return Exit::Failure;
        }
    }
    for name in &settings.only {
        if !co.running.contains_key(name) && !co.idle.contains_key(name) {
            log::error!("no enabled pipeline named {name:?} in the relay catalog");
            co.failed = true;
        }
    }
    if settings.once {
        if co.running.is_empty() && co.idle.is_empty() {
            log::warn!("no enabled pipelines to run");
        }
        while !co.running.is_empty() && !signals.stopping() {
            co.reap();
            std::thread::sleep(Duration::from_millis(10));
        }
        co.shutdown();
        co.reap();
        return if co.failed {
            Exit::Failure
        } else {
            Exit::Success
        };
    }
    log::info!(
        "relay running: {} pipelines, relay group {:?}, worker {}",
        co.running.len(),
        settings.relay_group,
        settings.worker_id
    );
    Watchdog::start(settings.stall_timeout);
    let mut last_scan = Instant::now();
    while !signals.stopping() {
        let step = (|| -> Result<(), Error> {
            let note = client
                .notifications()
                .timeout_iter(Duration::from_millis(500))
                .next()?;
            if let Some(n) = note {
                let name = serde_json::from_str::<serde_json::Value>(n.payload())
                    .ok()
                    .and_then(|v| v.get("name")?.as_str().map(String::from));
                match name {
                    Some(name) => {
                        let entries = load(&mut client, Some(&name))?;
                        co.reconcile(vec![name], entries);
                    }
                    None => log::warn!(
                        "ignoring a malformed config notification: {:?}",
                        n.payload()
                    ),
                }
            }
            if signals.take_reload() || last_scan.elapsed() >= settings.discovery_interval {
                co.reconcile_all(&mut client)?;
                last_scan = Instant::now();
            }
            Ok(())
        })();
        if let Err(e) = step {
            health::catalog_connected(false);
            log::warn!("coordinator: {e}; reconnecting");
            match connect(settings, signals) {
                Some(c) => client = c,
                None => break,
            }
            // Notifications may have been missed while disconnected.
            if let Err(e) = co.reconcile_all(&mut client) {
                log::warn!("coordinator: {e}");
            }
            last_scan = Instant::now();
        }
        co.reap();
    }
    log::info!("shutting down");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    co.shutdown();
    Exit::Success
}

/// systemd notifications (when started with `NOTIFY_SOCKET`): READY=1 once
/// the coordinator runs, WATCHDOG=1 only while no pipeline is stalled, and
/// STATUS= with a one-line summary. A thread of its own, so a coordinator
/// waiting for PostgreSQL does not starve it: what counts is the pipelines.
struct Watchdog {
    /// Half the watchdog timeout, when systemd asked for pings.
    every: Option<Duration>,
    last: Instant,
    stall: Duration,
    status: String,
}

impl Watchdog {
    fn start(stall: Duration) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let mut w = Watchdog {
            every: sd_notify::watchdog_enabled().map(|d| d / 2),
            last: Instant::now() - Duration::from_secs(3600),
            stall,
            status: String::new(),
        };
        let spawned = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || loop {
                w.tick();
                std::thread::sleep(Duration::from_millis(250));
            });
        if let Err(e) = spawned {
            log::warn!("cannot start the systemd watchdog thread: {e}");
        }
    }

    fn tick(&mut self) {
        let status = health::summary();
        if status != self.status {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
            self.status = status;
        }
        if let Some(every) = self.every {
            if self.last.elapsed() >= every && !health::any_stalled(self.stall) {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                self.last = Instant::now();
            }
        }
    }
}
