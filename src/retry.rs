//! Errors of a pipeline, their class (retry or give up), and capped
//! exponential backoff with jitter.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What the pipeline loop should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Connection lost, server restarting, timeout: retry forever.
    Transient,
    /// Retrying the same thing gives the same error (missing outbox,
    /// unsupported payload). A daemon retries slowly, `--once` gives up.
    Permanent,
    /// The destination went away for good (stdout closed): stop quietly.
    Closed,
}

/// A pipeline error: a message for the operator and its class.
#[derive(Debug)]
pub struct Error {
    /// What went wrong, naming the object involved.
    pub msg: String,
    /// Whether and how to retry.
    pub class: Class,
}

impl Error {
    /// A transient error.
    pub fn transient(msg: impl Into<String>) -> Error {
        Error {
            msg: msg.into(),
            class: Class::Transient,
        }
    }

    /// A permanent error.
    pub fn permanent(msg: impl Into<String>) -> Error {
        Error {
            msg: msg.into(),
            class: Class::Permanent,
        }
    }

    /// Prefix the message with context.
    pub fn context(mut self, what: impl fmt::Display) -> Error {
        self.msg = format!("{what}: {}", self.msg);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Error {
        let transient = e.is_closed()
            || match e.code() {
                Some(code) => transient_sqlstate(code.code()),
                // No SQLSTATE: an I/O or protocol error on the socket.
                None => true,
            };
        let msg = match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => {
                // Name the cause too: "error performing TLS handshake: ...".
                match std::error::Error::source(&e) {
                    Some(c) if !e.to_string().contains(&c.to_string()) => format!("{e}: {c}"),
                    _ => e.to_string(),
                }
            }
        };
        Error {
            msg: format!("PostgreSQL: {msg}"),
            class: if transient {
                Class::Transient
            } else {
                Class::Permanent
            },
        }
    }
}

/// Whether an error with this SQLSTATE goes away by itself: 08 connection
/// exceptions; 57P0x shutdown, crash recovery, cannot connect now; 57014 a
/// statement timeout or cancel; 55P03 a lock timeout; 53 insufficient
/// resources; 40 retryable rollbacks (serialization, deadlock); 25006 a
/// read-only transaction (connected to a standby during a failover); 58
/// system and I/O errors of the server.
fn transient_sqlstate(c: &str) -> bool {
    ["08", "57P", "53", "40", "58"]
        .iter()
        .any(|p| c.starts_with(p))
        || matches!(c, "57014" | "55P03" | "25006")
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error {
            class: if e.kind() == std::io::ErrorKind::BrokenPipe {
                Class::Closed
            } else {
                Class::Transient
            },
            msg: e.to_string(),
        }
    }
}

/// Capped exponential backoff with jitter.
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    rng: u64,
}

impl Backoff {
    /// Delays start at `min` and double up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let seed = Instant::now().elapsed().as_nanos() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
            ^ (std::process::id() as u64) << 32;
        Backoff {
            min,
            max,
            next: min,
            rng: seed | 1,
        }
    }

    /// Back to the smallest delay after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The next delay: uniformly random in [d/2, d], then d doubles.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64: jitter needs no cryptographic randomness.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = d / 2;
        half + Duration::from_nanos(self.rng % (half.as_nanos() as u64 + 1))
    }
}

/// Sleep for `d`, waking early when `stop` is set; returns false if stopped.
pub fn sleep_unless(stop: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[7] >= Duration::from_millis(500) && d[7] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn timeouts_and_failovers_are_transient_and_bad_data_is_not() {
        for c in [
            "08006", "57P01", "57014", "55P03", "53300", "40001", "25006", "58030",
        ] {
            assert!(transient_sqlstate(c), "{c}");
        }
        for c in ["23505", "22P02", "42P01", "42501", "54000", "P0001"] {
            assert!(!transient_sqlstate(c), "{c}");
        }
    }
}
