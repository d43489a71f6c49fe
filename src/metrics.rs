//! Prometheus metrics, labelled by pipeline. One process-wide registry;
//! `/metrics` encodes it with the `prometheus` crate's text encoder.

use std::sync::OnceLock;

use prometheus::core::Collector;
use prometheus::{
    exponential_buckets, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the relay exports.
pub struct Metrics {
    registry: Registry,
    /// Events acknowledged by a sink.
    pub published: IntCounterVec,
    /// Messages written to an inbox.
    pub consumed: IntCounterVec,
    /// Forward sessions that ended in an error (sink or PostgreSQL).
    pub publish_errors: IntCounterVec,
    /// Reverse sessions that ended in an error (source or PostgreSQL).
    pub source_errors: IntCounterVec,
    /// Retries after an error.
    pub retries: IntCounterVec,
    /// Events dead-lettered.
    pub dead_letters: IntCounterVec,
    /// 1 while this instance owns (runs) the pipeline.
    pub owned: IntGaugeVec,
    /// Age of the oldest committed event not yet relayed.
    pub lag: GaugeVec,
    /// Time per batch, read to commit.
    pub batch: HistogramVec,
    /// Unix time of the last successful batch or confirmed idle check.
    pub last_success: GaugeVec,
    /// How long committed rows have waited for an older transaction.
    pub horizon_held: GaugeVec,
    /// pid of the oldest open transaction holding the horizon back.
    pub horizon_pid: IntGaugeVec,
    /// Age of that transaction.
    pub horizon_xact_age: GaugeVec,
    /// 1 for the prepared transaction (`gid`) holding the horizon back.
    pub horizon_prepared: IntGaugeVec,
    /// 1 for the pipeline's current state, 0 for the others.
    pub state: IntGaugeVec,
}

/// The states a pipeline can be in, as `pgtrickle_relay_pipeline_state`
/// labels them.
pub const STATES: [&str; 5] = [
    "running",
    "retrying",
    "waiting_for_lock",
    "bad_config",
    "stopped",
];

fn counter(r: &Registry, name: &str, help: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &["pipeline"]).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), &["pipeline"]).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), &["pipeline"]).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let r = Registry::new();
        let batch = HistogramVec::new(
            HistogramOpts::new(
                "pgtrickle_relay_batch_seconds",
                "Time to relay one batch, from read to offset commit",
            )
            .buckets(exponential_buckets(0.0005, 2.0, 16).expect("valid buckets")),
            &["pipeline"],
        )
        .expect("valid metric");
        r.register(Box::new(batch.clone())).expect("unique metric");
        Metrics {
            published: counter(
                &r,
                "pgtrickle_relay_messages_published_total",
                "Events acknowledged by the sink",
            ),
            consumed: counter(
                &r,
                "pgtrickle_relay_messages_consumed_total",
                "Messages written to the inbox",
            ),
            publish_errors: counter(
                &r,
                "pgtrickle_relay_publish_errors_total",
                "Forward errors (sink or PostgreSQL)",
            ),
            source_errors: counter(
                &r,
                "pgtrickle_relay_source_errors_total",
                "Reverse errors (source or PostgreSQL)",
            ),
            retries: counter(
                &r,
                "pgtrickle_relay_retries_total",
                "Retries after an error",
            ),
            dead_letters: counter(
                &r,
                "pgtrickle_relay_dead_letters_total",
                "Events moved to pgtrickle.relay_dead_letters",
            ),
            owned: int_gauge(
                &r,
                "pgtrickle_relay_pipelines_owned",
                "1 while this instance owns and runs the pipeline",
            ),
            lag: gauge(
                &r,
                "pgtrickle_relay_lag_seconds",
                "Age of the oldest committed event not yet relayed",
            ),
            batch,
            last_success: gauge(
                &r,
                "pgtrickle_relay_last_success_timestamp_seconds",
                "Unix time of the last successful batch or idle check",
            ),
            horizon_held: gauge(
                &r,
                "pgtrickle_relay_horizon_held_seconds",
                "How long committed outbox rows have waited for an older open transaction",
            ),
            horizon_pid: int_gauge(
                &r,
                "pgtrickle_relay_horizon_oldest_xact_pid",
                "pid of the oldest open transaction holding the commit horizon back (0: none)",
            ),
            horizon_xact_age: gauge(
                &r,
                "pgtrickle_relay_horizon_oldest_xact_age_seconds",
                "Age of the oldest open transaction holding the commit horizon back",
            ),
            horizon_prepared: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "pgtrickle_relay_horizon_prepared_xact_info",
                        "1 for the prepared transaction (gid, see pg_prepared_xacts) holding the \
                         commit horizon back",
                    ),
                    &["pipeline", "gid"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            state: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "pgtrickle_relay_pipeline_state",
                        "1 for the pipeline's current state (running, retrying, \
                         waiting_for_lock, bad_config, stopped), 0 for the others",
                    ),
                    &["pipeline", "state"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            registry: r,
        }
    })
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// Forget a pipeline's labelled values (it was deleted or disabled).
    pub fn forget(&self, pipeline: &str) {
        let l = &[pipeline];
        let _ = self.owned.remove_label_values(l);
        let _ = self.lag.remove_label_values(l);
        let _ = self.horizon_held.remove_label_values(l);
        let _ = self.horizon_pid.remove_label_values(l);
        let _ = self.horizon_xact_age.remove_label_values(l);
        for state in STATES {
            let _ = self.state.remove_label_values(&[pipeline, state]);
        }
        self.forget_prepared(pipeline, None);
    }

    /// Export `current` as the pipeline's state.
    pub fn set_state(&self, pipeline: &str, current: &str) {
        for state in STATES {
            self.state
                .with_label_values(&[pipeline, state])
                .set((state == current) as i64);
        }
    }

    /// Remove the pipeline's prepared-transaction samples, but for `keep`.
    pub fn forget_prepared(&self, pipeline: &str, keep: Option<&str>) {
        for mf in self.horizon_prepared.collect() {
            for m in mf.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                };
                if let (Some(p), Some(gid)) = (label("pipeline"), label("gid")) {
                    if p == pipeline && keep != Some(gid.as_str()) {
                        let _ = self.horizon_prepared.remove_label_values(&[&p, &gid]);
                    }
                }
            }
        }
    }
}
