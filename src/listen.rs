//! Outbox notifications, received on a connection that does nothing else.
//!
//! A connection that LISTENs must read every notification the server sends
//! it, and a client waiting for the answer to a query reads (and keeps)
//! every notification that comes before that answer: on a connection that
//! also reads the outbox, a burst of notifications delivered while a query
//! runs is held in memory all at once (12,000 of 8 KB: ~100 MB). So one
//! thread per database listens on its own connection, never queries on it,
//! and only counts the notifications whose payload a pipeline asked about;
//! pipelines take a [`Mark`] before they read and wait for a notification
//! after it. One listening connection serves every pipeline of the relay.
//!
//! If the listening connection fails, waiters are woken (a notification may
//! have been lost), poll every [`POLL_WHILE_DOWN`] until it is back, and
//! the thread connects again with a growing pause.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use fallible_iterator::FallibleIterator;
use postgres::Client;

use crate::error::Error;
use crate::pipeline::Ctx;

/// The channel outbox writers notify on; the payload is the outbox table.
pub const CHANNEL: &str = "pgtrickle_outbox_new";
/// How often waiters look again while the listening connection is down.
const POLL_WHILE_DOWN: Duration = Duration::from_millis(100);
/// Pauses before connecting again: first and longest.
const RECONNECT: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(10));
/// How long the thread blocks on the connection before it checks whether
/// anyone still listens.
const SLICE: Duration = Duration::from_millis(500);

/// What was received so far for one payload; see [`Listener::mark`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// Connections made or lost so far.
    epoch: u64,
    /// Notifications received with the payload.
    count: u64,
}

#[derive(Debug, Default)]
struct State {
    epoch: u64,
    up: bool,
    /// Notifications per payload asked about (other payloads are dropped).
    counts: HashMap<String, u64>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection came up or went down: wake every waiter (a
    /// notification may have been missed meanwhile).
    fn set_up(&self, up: bool) {
        {
            let mut s = self.lock();
            s.up = up;
            s.epoch += 1;
        }
        self.changed.notify_all();
    }
}

/// The notifications of one database, as the pipelines reading it see
/// them. Dropping the last handle ends the listening thread.
#[derive(Debug)]
pub struct Listener {
    shared: Arc<Shared>,
}

/// The listeners running, per PostgreSQL URL.
fn registry() -> &'static Mutex<HashMap<String, Weak<Listener>>> {
    static LISTENERS: OnceLock<Mutex<HashMap<String, Weak<Listener>>>> = OnceLock::new();
    LISTENERS.get_or_init(Default::default)
}

/// The listener of the database at `url`: the running one, or a new one,
/// returned once its LISTEN is in effect (so that no notification committed
/// after this returns is missed).
pub fn shared(url: &str) -> Result<Arc<Listener>, Error> {
    let mut all = registry().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = all.get(url).and_then(Weak::upgrade) {
        return Ok(l);
    }
    let l = Arc::new(Listener::start(url)?);
    all.retain(|_, w| w.strong_count() > 0);
    all.insert(url.to_string(), Arc::downgrade(&l));
    Ok(l)
}

fn listen(url: &str) -> Result<Client, Error> {
    let mut client = crate::pg::connect(url, "pgtrickle-relay listener")
        .map_err(|e| e.context("listening for outbox notifications"))?;
    client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    Ok(client)
}

impl Listener {
    fn start(url: &str) -> Result<Listener, Error> {
        let client = listen(url)?;
        let shared = Arc::new(Shared::default());
        shared.lock().up = true;
        let weak = Arc::downgrade(&shared);
        let url = url.to_string();
        std::thread::Builder::new()
            .name("listener".into())
            .spawn(move || receive(&url, client, &weak))
            .map_err(|e| Error::transient(format!("cannot start the listener thread: {e}")))?;
        Ok(Listener { shared })
    }

    /// What was received so far for `payload` (an outbox table): take it
    /// before reading the outbox, then [`Listener::wait`] with it.
    pub fn mark(&self, payload: &str) -> Mark {
        let mut s = self.shared.lock();
        let epoch = s.epoch;
        let count = match s.counts.get(payload) {
            Some(&n) => n,
            None => {
                s.counts.insert(payload.to_string(), 0);
                0
            }
        };
        Mark { epoch, count }
    }

    /// Wait until a notification for `payload` came after `mark` (true), or
    /// `timeout` passed or the pipeline is stopping (false). While the
    /// listening connection is down, it returns after [`POLL_WHILE_DOWN`]
    /// at the latest (true: look again).
    pub fn wait(&self, ctx: &Ctx, payload: &str, mark: Mark, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut s = self.shared.lock();
        loop {
            let now = Instant::now();
            if s.epoch != mark.epoch || s.counts.get(payload).copied() != Some(mark.count) {
                return true;
            }
            if !s.up {
                drop(s);
                ctx.sleep(POLL_WHILE_DOWN.min(end.saturating_duration_since(now)));
                return true;
            }
            if now >= end || ctx.stopping() {
                return false;
            }
            let slice = (end - now).min(Duration::from_millis(100));
            s = self
                .shared
                .changed
                .wait_timeout(s, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The listening thread: count the notifications asked about, connect
/// again when the connection fails, end when no [`Listener`] is left.
fn receive(url: &str, mut client: Client, weak: &Weak<Shared>) {
    let mut pause = RECONNECT.0;
    loop {
        let failed = loop {
            let note = client.notifications().timeout_iter(SLICE).next();
            let Some(shared) = weak.upgrade() else {
                return;
            };
            match note {
                Ok(None) => {}
                Ok(Some(n)) => {
                    let mut s = shared.lock();
                    if let Some(c) = s.counts.get_mut(n.payload()) {
                        *c += 1;
                        drop(s);
                        shared.changed.notify_all();
                    }
                }
                Err(e) => break Error::from(e),
            }
        };
        log::warn!("the connection listening for outbox notifications failed: {failed}; pipelines poll until it is back");
        loop {
            let Some(shared) = weak.upgrade() else {
                return;
            };
            shared.set_up(false);
            drop(shared);
            std::thread::sleep(pause);
            pause = (pause * 2).min(RECONNECT.1);
            match listen(url) {
                Ok(c) => {
                    client = c;
                    break;
                }
                Err(e) => log::warn!("listening for outbox notifications: {e}"),
            }
        }
        pause = RECONNECT.0;
        let Some(shared) = weak.upgrade() else {
            return;
        };
        shared.set_up(true);
        log::info!("listening for outbox notifications again");
    }
}
