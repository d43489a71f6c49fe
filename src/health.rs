//! What each pipeline is doing, for `/health`, the systemd watchdog and the
//! log: its state, its last success and whether events are waiting.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::{metrics, redact};

/// A pipeline's state.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Moving events, or idle with nothing to move.
    Running,
    /// Retrying after an error.
    Retrying(String),
    /// Another relay instance owns it.
    WaitingForLock,
    /// Its config is invalid; it does not run.
    BadConfig(String),
    /// It ended (input ended, `--once`, or a failure).
    Stopped,
}

impl State {
    /// Its name in `/health` and in `pgtrickle_relay_pipeline_state`.
    pub fn name(&self) -> &'static str {
        match self {
            State::Running => "running",
            State::Retrying(_) => "retrying",
            State::WaitingForLock => "waiting_for_lock",
            State::BadConfig(_) => "bad_config",
            State::Stopped => "stopped",
        }
    }
}

struct Entry {
    /// `forward` or `reverse` ([`crate::pipeline::Direction`]).
    direction: &'static str,
    state: State,
    /// Last batch delivered, or last check that found nothing waiting.
    last_ok: Instant,
    last_success_unix: Option<f64>,
    lag_seconds: f64,
}

static TABLE: OnceLock<Mutex<BTreeMap<String, Entry>>> = OnceLock::new();

fn table() -> std::sync::MutexGuard<'static, BTreeMap<String, Entry>> {
    TABLE
        .get_or_init(|| Mutex::new(BTreeMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Set a pipeline's state (creating its entry).
pub fn set(pipeline: &str, direction: &'static str, state: State) {
    let mut t = table();
    let e = t.entry(pipeline.to_string()).or_insert_with(|| Entry {
        direction,
        state: State::Running,
        last_ok: Instant::now(),
        last_success_unix: None,
        lag_seconds: 0.0,
    });
    if e.state != state {
        // A pipeline (re)starting gets a fresh stall clock.
        if matches!(state, State::Running) && !matches!(e.state, State::Running) {
            e.last_ok = Instant::now();
        }
        e.state = state;
    }
    e.direction = direction;
    let m = metrics::get();
    m.owned
        .with_label_values(&[pipeline])
        .set(matches!(e.state, State::Running | State::Retrying(_)) as i64);
    m.set_state(pipeline, e.state.name());
}

/// A session of the pipeline is under way (it holds its lock and its
/// connections): running, unless it is retrying after an error, which it
/// stays until it makes progress ([`ok`]), so a failing pipeline does not
/// look healthy for the moment each retry takes.
pub fn started(pipeline: &str, direction: &'static str) {
    let retrying = matches!(
        table().get(pipeline).map(|e| &e.state),
        Some(State::Retrying(_))
    );
    if !retrying {
        set(pipeline, direction, State::Running);
    }
}

/// The pipeline delivered a batch, or found nothing waiting: it is healthy.
pub fn ok(pipeline: &str, lag_seconds: f64) {
    let now = unix_now();
    if let Some(e) = table().get_mut(pipeline) {
        if e.state != State::Running {
            metrics::get().set_state(pipeline, "running");
        }
        e.state = State::Running;
        e.last_ok = Instant::now();
        e.last_success_unix = Some(now);
        e.lag_seconds = lag_seconds;
    }
    let m = metrics::get();
    m.owned.with_label_values(&[pipeline]).set(1);
    m.last_success.with_label_values(&[pipeline]).set(now);
    m.lag.with_label_values(&[pipeline]).set(lag_seconds);
}

/// Forget a pipeline (deleted, disabled, or not ours).
pub fn remove(pipeline: &str) {
    table().remove(pipeline);
    metrics::get().forget(pipeline);
}

/// The health report: (healthy, JSON). Healthy when every pipeline runs or
/// waits for its lock, and none has gone `stall` without progress.
pub fn report(stall: Duration) -> (bool, Value) {
    let t = table();
    let mut healthy = true;
    let mut pipelines = serde_json::Map::new();
    for (name, e) in t.iter() {
        let since_ok = e.last_ok.elapsed();
        let stalled = matches!(e.state, State::Running | State::Retrying(_)) && since_ok > stall;
        let state = e.state.name();
        let detail = match &e.state {
            State::Retrying(err) => Some(redact::secrets(err)),
            State::BadConfig(why) => Some(redact::secrets(why)),
            _ => None,
        };
        let good = !stalled && matches!(e.state, State::Running | State::WaitingForLock);
        healthy &= good;
        let mut o = json!({
            "direction": e.direction,
            "state": state,
            "healthy": good,
            "stalled": stalled,
            "seconds_since_progress": (since_ok.as_secs_f64() * 10.0).round() / 10.0,
            "lag_seconds": e.lag_seconds,
            "last_success_unix": e.last_success_unix,
        });
        if let Some(d) = detail {
            o[if state == "retrying" {
                "last_error"
            } else {
                "reason"
            }] = d.into();
        }
        pipelines.insert(name.clone(), o);
    }
    (
        healthy,
        json!({ "status": if healthy { "ok" } else { "degraded" }, "pipelines": pipelines }),
    )
}

/// Whether the coordinator holds its PostgreSQL connection.
static CATALOG_CONNECTED: AtomicBool = AtomicBool::new(false);

/// The coordinator connected to PostgreSQL (true) or lost it (false).
pub fn catalog_connected(up: bool) {
    CATALOG_CONNECTED.store(up, Ordering::Relaxed);
}

/// Readiness, for `/readyz`: (ready, JSON). Ready when the coordinator is
/// connected to PostgreSQL and every pipeline runs or waits for its lock.
pub fn ready() -> (bool, Value) {
    let postgres = CATALOG_CONNECTED.load(Ordering::Relaxed);
    let t = table();
    let not_ready: Vec<&String> = t
        .iter()
        .filter(|(_, e)| !matches!(e.state, State::Running | State::WaitingForLock))
        .map(|(n, _)| n)
        .collect();
    let ready = postgres && not_ready.is_empty();
    (
        ready,
        json!({
            "status": if ready { "ready" } else { "not_ready" },
            "postgres": postgres,
            "pipelines": t.len(),
            "not_ready": not_ready,
        }),
    )
}

/// Whether any running pipeline made no progress for longer than `stall`
/// (the watchdog stops while one has).
pub fn any_stalled(stall: Duration) -> bool {
    table().values().any(|e| {
        matches!(e.state, State::Running | State::Retrying(_)) && e.last_ok.elapsed() > stall
    })
}

/// A one-line summary for systemd's STATUS=.
pub fn summary() -> String {
    let t = table();
    let count = |f: fn(&State) -> bool| t.values().filter(|e| f(&e.state)).count();
    format!(
        "{} pipelines: {} running, {} retrying, {} waiting for lock, {} bad config, {} stopped",
        t.len(),
        count(|s| matches!(s, State::Running)),
        count(|s| matches!(s, State::Retrying(_))),
        count(|s| matches!(s, State::WaitingForLock)),
        count(|s| matches!(s, State::BadConfig(_))),
        count(|s| matches!(s, State::Stopped)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_is_one_the_state_metric_exports() {
        for s in [
            State::Running,
            State::Retrying(String::new()),
            State::WaitingForLock,
            State::BadConfig(String::new()),
            State::Stopped,
        ] {
            assert!(metrics::STATES.contains(&s.name()), "{s:?}");
        }
    }

    #[test]
    fn a_session_retrying_after_an_error_stays_unhealthy_until_it_makes_progress() {
        let p = "health-test-retry";
        set(p, "forward", State::WaitingForLock);
        started(p, "forward");
        assert_eq!(table()[p].state, State::Running);
        set(p, "forward", State::Retrying("status 401".into()));
        started(p, "forward");
        assert_eq!(table()[p].state, State::Retrying("status 401".into()));
        assert!(!report(Duration::from_secs(60)).0);
        ok(p, 0.0);
        assert_eq!(table()[p].state, State::Running);
        remove(p);
    }
}
