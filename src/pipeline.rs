//! What every pipeline thread shares: its direction and context, the
//! advisory lock that makes one relay instance its owner, and the wait for
//! a notification.
//! (The retry loop around a pipeline's sessions is in
//! [`crate::coordinator`], which starts the thread.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::Client;

use crate::error::Error;
use crate::health::{self, State};
use crate::pg;
use crate::retry::sleep_unless;

/// Which way a pipeline moves events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Outbox → sink (`relay_outbox_config`).
    Forward,
    /// Source → inbox (`relay_inbox_config`).
    Reverse,
}

impl Direction {
    /// As the catalog and `/health` write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Reverse => "reverse",
        }
    }

    /// From the catalog's `forward` or `reverse`.
    pub fn parse(s: &str) -> Option<Direction> {
        match s {
            "forward" => Some(Direction::Forward),
            "reverse" => Some(Direction::Reverse),
            _ => None,
        }
    }
}

/// The key of a pipeline's advisory lock, one per relay group and pipeline
/// name; PostgreSQL hashes it (`hashtextextended(key, 0)`). Relays of one
/// group must agree on it: it is what makes one of them the owner.
pub fn lock_key(relay_group: &str, pipeline: &str) -> String {
    format!("pgtrickle-relay/{relay_group}/{pipeline}")
}

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
    /// Which way it moves events.
    pub direction: Direction,
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
        let key = lock_key(&self.relay_group, &self.name);
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
                health::set(&self.name, self.direction.as_str(), State::WaitingForLock);
                logged = true;
            }
            if !self.sleep(Duration::from_millis(500)) {
                return Ok(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_lock_key_is_the_one_running_relays_take() {
        // Relays of older versions hold locks under this key: changing it
        // would let two instances own one pipeline during an upgrade.
        assert_eq!(
            super::lock_key("default", "orders"),
            "pgtrickle-relay/default/orders"
        );
    }
}
