//! Retrying: the retry rules of a pipeline ([`Retries`]), capped
//! exponential backoff with jitter, and an interruptible sleep. The error
//! type and its classes live in [`crate::error`]; they are re-exported here,
//! where the sinks and sources have always found them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use crate::error::{Class, Error};

/// A session that ran this long before it failed starts the count of
/// failures (and the backoff) afresh.
const FRESH_AFTER: Duration = Duration::from_secs(30);
/// `--once`: transient failures in a row before the run gives up.
const ONCE_TRIES: u32 = 5;
/// The shortest wait before retrying after a permanent error.
const PERMANENT_PAUSE: Duration = Duration::from_secs(5);

/// What a pipeline does after a session failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The output closed for good: stop the relay, quietly.
    Stop,
    /// `--once`: give up; the run failed.
    GiveUp,
    /// Start a new session after this delay.
    RetryIn(Duration),
}

/// The retry rules of a pipeline. A transient error is retried with capped
/// exponential backoff and jitter: forever by a daemon, up to
/// [`ONCE_TRIES`] times in a row with `--once`. A permanent error is
/// retried slowly (at most every [`PERMANENT_PAUSE`]) by a daemon, and
/// ends a `--once` run. A closed output stops the relay. A session that
/// ran [`FRESH_AFTER`] before it failed starts the count afresh.
///
/// The backoff spaces session starts, not the gap after a failure: a
/// session that ran (e.g. waited for its broker) longer than its transient
/// delay is retried at once, so a destination that comes back is used as
/// soon as the next session reaches it.
pub struct Retries {
    backoff: Backoff,
    failures: u32,
    once: bool,
}

impl Retries {
    /// The rules for a daemon, or for a `--once` run. Delays are capped at
    /// 1 s: a destination or PostgreSQL that comes back is used again
    /// within about a second.
    pub fn new(once: bool) -> Retries {
        Retries {
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
            failures: 0,
            once,
        }
    }

    /// A session failed with an error of `class` after running `ran`.
    pub fn after(&mut self, class: Class, ran: Duration) -> Verdict {
        if class == Class::Closed {
            return Verdict::Stop;
        }
        if ran > FRESH_AFTER {
            self.backoff.reset();
            self.failures = 0;
        }
        self.failures += 1;
        if self.once && (class == Class::Permanent || self.failures > ONCE_TRIES) {
            return Verdict::GiveUp;
        }
        let delay = self.backoff.next_delay();
        Verdict::RetryIn(match class {
            Class::Permanent => delay.max(PERMANENT_PAUSE),
            _ => delay.saturating_sub(ran),
        })
    }
}

/// Capped exponential backoff with jitter.
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    rng: u64,
}

/// A seed for the jitter that differs between processes, threads and
/// calls: std's `RandomState` keys are random per thread and step on
/// every call; the clock is mixed in as well.
fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.finish()
}

impl Backoff {
    /// Delays start at `min` and double up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
            // xorshift must not start at 0.
            rng: seed() | 1,
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
    fn backoffs_made_at_the_same_moment_jitter_apart() {
        // Not the clock alone (`Instant::now().elapsed()` added nothing to
        // it): pipelines started within one tick of a coarse clock would
        // jitter in step. Every call, and every thread, seeds anew.
        let seeds: std::collections::BTreeSet<u64> = (0..100).map(|_| seed()).collect();
        assert_eq!(seeds.len(), 100);
        let other_thread = std::thread::spawn(seed).join().unwrap();
        assert!(!seeds.contains(&other_thread));
    }

    fn retry_in(v: Verdict) -> Duration {
        match v {
            Verdict::RetryIn(d) => d,
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn a_daemon_retries_transient_errors_forever_and_permanent_ones_slowly() {
        let mut r = Retries::new(false);
        let quick = Duration::from_millis(10);
        let first = retry_in(r.after(Class::Transient, quick));
        assert!(first <= Duration::from_millis(100), "{first:?}");
        for _ in 0..50 {
            assert!(retry_in(r.after(Class::Transient, quick)) <= Duration::from_secs(1));
        }
        assert!(retry_in(r.after(Class::Permanent, quick)) >= Duration::from_secs(5));
        assert_eq!(r.after(Class::Closed, quick), Verdict::Stop);
    }

    #[test]
    fn a_session_that_ran_longer_than_its_backoff_is_retried_at_once() {
        let mut r = Retries::new(false);
        for _ in 0..10 {
            retry_in(r.after(Class::Transient, Duration::from_millis(10)));
        }
        // Waited 4 s for its broker: the next session starts now.
        let d = retry_in(r.after(Class::Transient, Duration::from_secs(4)));
        assert_eq!(d, Duration::ZERO);
        // Sessions that fail at once still back off.
        let d = retry_in(r.after(Class::Transient, Duration::from_millis(10)));
        assert!(d >= Duration::from_millis(400), "{d:?}");
        // A permanent error keeps its pause however long the session ran.
        let d = retry_in(r.after(Class::Permanent, Duration::from_secs(4)));
        assert!(d >= Duration::from_secs(5), "{d:?}");
    }

    #[test]
    fn once_gives_up_on_a_permanent_error_or_the_sixth_transient_one_in_a_row() {
        let quick = Duration::from_millis(10);
        let mut r = Retries::new(true);
        assert_eq!(r.after(Class::Permanent, quick), Verdict::GiveUp);
        let mut r = Retries::new(true);
        for _ in 0..5 {
            retry_in(r.after(Class::Transient, quick));
        }
        assert_eq!(r.after(Class::Transient, quick), Verdict::GiveUp);
        // A session that ran a while before failing counts as a fresh start.
        let mut r = Retries::new(true);
        for _ in 0..5 {
            retry_in(r.after(Class::Transient, quick));
        }
        let d = retry_in(r.after(Class::Transient, Duration::from_secs(31)));
        assert!(d <= Duration::from_millis(100), "backoff reset: {d:?}");
        assert_eq!(r.after(Class::Closed, quick), Verdict::Stop);
    }
}
