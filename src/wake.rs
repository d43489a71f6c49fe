//! Waiting for new outbox rows without making writers pay for it.
//!
//! A NOTIFY serialises commits (PostgreSQL holds a global lock from the
//! notification's queue write through the commit's WAL flush), so kit
//! outboxes notify only while a relay is asleep on them: their trigger reads
//! the outbox's sleep counter, which `pgtrickle.relay_outbox_sleep` keeps.
//! The relay counts itself in before it sleeps, reads once more, and sleeps
//! on its notification connection only when nothing is left AND every
//! transaction that may have read the counter before it changed has ended
//! (the commit horizon passed the guard transaction id the call returned);
//! until then it looks again every few ms. Once it reads rows it counts
//! itself out, and writers stop notifying. (The SQL side, and why that is
//! enough: sql/10_outbox.sql, `relay_outbox_sleep`.)
//!
//! Outboxes that notify on every insert (pg_trickle's own) are simply
//! waited on; outboxes made with `p_notify => false` (two-phase commit) are
//! read every 100 ms. Notifications arrive through the relay's one
//! listening connection ([`crate::listen`]); the reader takes a mark before
//! each read ([`Waker::mark`]) and waits for a notification after it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::Client;

use crate::error::Error;
use crate::listen::{Listener, Mark};
use crate::outbox::OutboxInfo;
use crate::pipeline::Ctx;

/// How often an outbox without NOTIFY is read while idle.
const UNNOTIFIED_POLL: Duration = Duration::from_millis(100);
/// Waiting for the transactions that may have missed the sleep counter:
/// how soon to look again at first, and at most.
const GUARD_WAIT: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(200));
/// After it caught up, a reader looks again every [`SETTLE_STEP`] for this
/// long before it counts itself asleep: under a steady load new rows come
/// within it, and the writers need not notify at all.
const SETTLE: Duration = Duration::from_millis(5);
/// See [`SETTLE`].
const SETTLE_STEP: Duration = Duration::from_millis(1);

/// How an outbox's writers wake its readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Every insert notifies (pg_trickle's outboxes, older kit outboxes).
    Always,
    /// Inserts notify while the sleep counter is above 0.
    WhileAsleep,
    /// Nothing notifies: read every [`UNNOTIFIED_POLL`].
    Never,
}

/// This reader counted in as asleep: the guard transaction id (as text)
/// and whether the horizon has passed it.
#[derive(Debug)]
struct Guard {
    xid: String,
    passed: bool,
}

/// The idle side of one reader of one outbox (on one connection).
pub struct Waker {
    table: String,
    listener: Arc<Listener>,
    /// What had been received before the last read.
    mark: Mark,
    mode: Mode,
    guard: Option<Guard>,
    step: Duration,
    /// Since when reads have found nothing (None: the last one found rows).
    empty_since: Option<Instant>,
}

impl Waker {
    /// For a reader of `info`, woken by `listener`.
    pub fn new(info: &OutboxInfo, listener: Arc<Listener>) -> Waker {
        let mode = if !info.notifies {
            Mode::Never
        } else if info.notifies_sleepers {
            Mode::WhileAsleep
        } else {
            Mode::Always
        };
        Waker {
            table: info.table.clone(),
            mark: listener.mark(&info.table),
            listener,
            mode,
            guard: None,
            step: GUARD_WAIT.0,
            empty_since: None,
        }
    }

    /// Called right before each read: a notification from now on means
    /// rows the read may not see.
    pub fn mark(&mut self) {
        self.mark = self.listener.mark(&self.table);
    }

    /// Wait up to `timeout` for a notification since the last read's mark
    /// (true) or not (false: timed out, or stopping).
    pub fn wait(&self, ctx: &Ctx, timeout: Duration) -> bool {
        self.listener.wait(ctx, &self.table, self.mark, timeout)
    }

    /// A session starts reading: recount the outbox's sleepers without this
    /// reader, which drops those whose session is gone (a relay killed
    /// while asleep left itself counted, and writers would go on
    /// notifying).
    pub fn start(&mut self, client: &mut Client) -> Result<(), Error> {
        if self.mode == Mode::WhileAsleep {
            client.query_one(
                "SELECT pgtrickle.relay_outbox_sleep($1, false)",
                &[&self.table],
            )?;
        }
        Ok(())
    }

    /// The session ends: count this reader out if it counted in.
    pub fn leave(&mut self, client: &mut Client) {
        if let Err(e) = self.working(client) {
            log::debug!("counting out of the sleepers of {}: {e}", self.table);
        }
    }

    /// Rows were read: count this reader out, writers stop notifying.
    pub fn working(&mut self, client: &mut Client) -> Result<(), Error> {
        self.empty_since = None;
        if self.guard.take().is_some() {
            client.query_one(
                "SELECT pgtrickle.relay_outbox_sleep($1, false)",
                &[&self.table],
            )?;
        }
        Ok(())
    }

    /// Nothing was left to read (and nothing is held back by the horizon):
    /// wait until reading again is worth it, or `due` at the latest (an
    /// offset commit falling due). Returns at once while the reader is
    /// falling asleep (see the module doc).
    pub fn idle(
        &mut self,
        ctx: &Ctx,
        client: &mut Client,
        due: Option<Duration>,
    ) -> Result<(), Error> {
        let timeout = match self.mode {
            Mode::Always => ctx.poll_interval,
            Mode::Never => ctx.poll_interval.min(UNNOTIFIED_POLL),
            Mode::WhileAsleep => match self.fall_asleep(client)? {
                None => return Ok(()),
                Some(d) => d.unwrap_or(ctx.poll_interval),
            },
        };
        let timeout = due.map_or(timeout, |d| d.min(timeout));
        self.wait(ctx, timeout);
        Ok(())
    }

    /// The next step of falling asleep: None to read again at once, or
    /// how long to wait on the notification connection (None in it: asleep,
    /// the poll interval).
    fn fall_asleep(&mut self, client: &mut Client) -> Result<Option<Option<Duration>>, Error> {
        let guard = match &mut self.guard {
            Some(g) => g,
            None if self.empty_since.get_or_insert_with(Instant::now).elapsed() < SETTLE => {
                return Ok(Some(Some(SETTLE_STEP)));
            }
            None => {
                let xid: Option<String> = client
                    .query_one(
                        "SELECT pgtrickle.relay_outbox_sleep($1, true)::text",
                        &[&self.table],
                    )?
                    .get(0);
                let Some(xid) = xid else {
                    // The outbox lost its sleep counter: read it as one
                    // that never notifies.
                    self.mode = Mode::Never;
                    return Ok(Some(Some(UNNOTIFIED_POLL)));
                };
                self.step = GUARD_WAIT.0;
                self.guard.insert(Guard { xid, passed: false })
            }
        };
        if guard.passed {
            return Ok(Some(None));
        }
        // Checked before the read that follows: rows committed by then are
        // below the horizon that read uses.
        let passed: bool = client
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8",
                &[&guard.xid],
            )?
            .get(0);
        if passed {
            guard.passed = true;
            return Ok(None);
        }
        let d = self.step;
        self.step = (self.step * 2).min(GUARD_WAIT.1);
        Ok(Some(Some(d)))
    }
}
