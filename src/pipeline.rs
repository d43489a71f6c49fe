//! What every pipeline thread shares: its context, the advisory lock that
//! makes one relay instance its owner, and the retry loop around a session.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fallible_iterator::FallibleIterator;
use postgres::Client;

use crate::config::Pipeline;
use crate::health::{self, State};
use crate::retry::{sleep_unless, Backoff, Class, Error};
use crate::{forward, metrics, pg, reverse};

/// Everything a pipeline thread needs besides its config.
#[derive(Clone)]
pub struct Ctx {
    /// Pipeline name.
    pub name: String,
    /// `--relay-group-id`.
    pub relay_group: String,
    /// This process, as `host:pid` (worker / consumer id).
    pub worker_id: String,
    /// The (expanded) PostgreSQL URL.
    pub postgres_url: String,
    /// `--once`: drain and end.
    pub once: bool,
    /// How long to wait for a notification before reading anyway.
    pub poll_interval: Duration,
    /// Set to stop this pipeline.
    pub stop: Arc<AtomicBool>,
    /// Process-wide shutdown (a closed stdout sets it).
    pub shutdown: Arc<AtomicBool>,
    /// `forward` or `reverse`.
    pub direction: &'static str,
    /// The pipeline's configuration as read from the catalog (JSON): an
    /// offset is committed only while the catalog still has exactly this.
    pub config: Arc<str>,
}

impl Ctx {
    /// Whether this pipeline should stop now.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.shutdown.load(Ordering::Relaxed)
    }

    /// Sleep unless stopped; false when stopped.
    pub fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if self.stopping() {
                return false;
            }
            if !sleep_unless(
                &self.stop,
                (end - Instant::now()).min(Duration::from_millis(50)),
            ) {
                return false;
            }
        }
        !self.stopping()
    }

    /// Open this pipeline's own connection.
    pub fn connect(&self) -> Result<Client, Error> {
        pg::connect(
            &self.postgres_url,
            &format!("pgtrickle-relay {}", self.name),
        )
    }

    /// Take the pipeline's advisory lock on `client`'s session, waiting
    /// while another relay instance holds it. Ok(false): stopped first.
    pub fn lock(&self, client: &mut Client) -> Result<bool, Error> {
        let key = format!("pgtrickle-relay/{}/{}", self.relay_group, self.name);
        let mut logged = false;
        loop {
            let got: bool = client
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                    &[&key],
                )?
                .get(0);
            if got {
                if logged {
                    log::info!("took over the pipeline lock");
                }
                return Ok(true);
            }
            if self.once {
                return Err(Error::permanent(format!(
                    "pipeline {:?} is owned by another relay instance of relay group {:?}",
                    self.name, self.relay_group
                )));
            }
            if !logged {
                log::info!(
                    "another relay instance of group {:?} owns this pipeline; waiting for its lock",
                    self.relay_group
                );
                health::set(&self.name, self.direction, State::WaitingForLock);
                logged = true;
            }
            if !self.sleep(Duration::from_millis(500)) {
                return Ok(false);
            }
        }
    }
}

/// Run a pipeline until it is stopped, its input ends, or (`--once`) it is
/// drained. Err only for a `--once` run that could not finish.
pub fn run(ctx: &Ctx, p: &Pipeline) -> Result<(), Error> {
    // Capped at 1 s: a destination or PostgreSQL that comes back is used
    // again within about a second.
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    let mut failures = 0;
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
        let e = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let m = metrics::get();
        match p {
            Pipeline::Forward(_) => m.publish_errors.with_label_values(&[&ctx.name]).inc(),
            Pipeline::Reverse(_) => m.source_errors.with_label_values(&[&ctx.name]).inc(),
        }
        if e.class == Class::Closed {
            log::info!("output closed ({e}); stopping the relay");
            ctx.shutdown.store(true, Ordering::Relaxed);
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
            failures = 0;
        }
        failures += 1;
        if ctx.once && (e.class == Class::Permanent || failures > 5) {
            return Err(e);
        }
        let delay = match e.class {
            Class::Permanent => backoff.next_delay().max(Duration::from_secs(5)),
            _ => backoff.next_delay(),
        };
        if ctx.stopping() {
            return Ok(());
        }
        let retry_ms = delay.as_millis() as u64;
        match e.class {
            Class::Permanent => {
                log::error!(error = e.msg.as_str(), retry_ms; "{e}; retrying in {delay:.1?}")
            }
            _ => log::warn!(error = e.msg.as_str(), retry_ms; "{e}; retrying in {delay:.1?}"),
        }
        health::set(&ctx.name, ctx.direction, State::Retrying(e.msg.clone()));
        m.retries.with_label_values(&[&ctx.name]).inc();
        if !ctx.sleep(delay) {
            return Ok(());
        }
    }
}

/// Block until a notification on `channel` with `payload` arrives (true),
/// or `timeout` passes or the pipeline stops (false). Other notifications
/// are consumed and ignored.
pub fn wait_notification(
    ctx: &Ctx,
    client: &mut Client,
    payload: &str,
    timeout: Duration,
) -> Result<bool, Error> {
    let end = Instant::now() + timeout;
    loop {
        let now = Instant::now();
        if now >= end || ctx.stopping() {
            return Ok(false);
        }
        let slice = (end - now).min(Duration::from_millis(500));
        let note = client.notifications().timeout_iter(slice).next()?;
        if note.is_some_and(|n| n.payload() == payload) {
            // Take whatever else is already buffered too: one read covers it.
            while client.notifications().iter().next()?.is_some() {}
            return Ok(true);
        }
    }
}
