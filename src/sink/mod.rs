//! Sinks: where forward events go. One file per sink; a new sink is that
//! file plus one line in [`REGISTRY`].

use serde_json::{Map, Value};

use crate::event::Event;
use crate::keys::ConfigError;
use crate::retry::Error;

#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "pg-inbox")]
pub mod pg_inbox;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqs")]
pub mod sqs;
pub mod stdout;

/// An event the destination refused for good (too large, a 4xx answer):
/// it goes to `pgtrickle.relay_dead_letters` and the pipeline moves on.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// Its index in the published slice.
    pub index: usize,
    /// Why, as the destination said it.
    pub reason: String,
}

/// What a broker sink does with an event no queue or stream takes (its
/// `on_unroutable` key): by default the batch is retried, since routes
/// come and go (consumers rebinding, a stream being edited); consumers
/// that accept losing such events to the dead-letter table say so.
#[cfg(any(feature = "nats", feature = "rabbitmq"))]
#[derive(Debug, Clone, Copy, serde::Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnUnroutable {
    /// Fail the batch (retried slowly, shown in `/health`).
    #[default]
    Retry,
    /// Dead-letter the event and go on.
    DeadLetter,
}

/// An open connection to a destination.
pub trait Sink {
    /// Deliver `events` in order; returns once the destination has
    /// acknowledged every one of them or rejected it permanently (the
    /// rejected ones are returned). A transient failure is an `Err`: the
    /// caller retries the whole batch, and dedup keys absorb the repeats.
    fn publish(&mut self, events: &[Event]) -> Result<Vec<Rejected>, Error>;
    /// Make everything published so far durable; called before the offset
    /// is committed.
    fn flush(&mut self) -> Result<(), Error>;
    /// Why the sink's own templates cannot route `e` (they read a field the
    /// event lacks and give no default): the event becomes a dead letter
    /// and is not published. By default every event is routable.
    fn unroutable(&self, _e: &Event) -> Option<String> {
        None
    }
}

/// A validated sink config that can open a [`Sink`].
pub trait SinkSpec: Send + std::fmt::Debug {
    /// Open the sink for `pipeline`.
    fn open(&self, pipeline: &str) -> Result<Box<dyn Sink>, Error>;
    /// `pgtrickle-relay check --connect`: reach the destination and check
    /// what can be checked without sending an event; the error names the
    /// key at fault. By default, what opening the sink proves.
    fn check(&self, pipeline: &str) -> Result<(), ConfigError> {
        self.open(pipeline)
            .map(drop)
            .map_err(|e| crate::keys::blame("sink", e))
    }
}

/// Parses a sink's own keys (everything but `type`, `subject`, `batch_size`).
type Parse = fn(Map<String, Value>) -> Result<Box<dyn SinkSpec>, ConfigError>;

/// Every sink built into this binary, by `type`.
const REGISTRY: &[(&str, Parse)] = &[
    ("stdout", stdout::parse),
    #[cfg(feature = "redis")]
    ("redis", redis::parse),
    #[cfg(feature = "pg-inbox")]
    ("pg-inbox", pg_inbox::parse),
    #[cfg(feature = "http")]
    ("http", http::parse),
    #[cfg(feature = "nats")]
    ("nats", nats::parse),
    #[cfg(feature = "kafka")]
    ("kafka", kafka::parse),
    #[cfg(feature = "rabbitmq")]
    ("rabbitmq", rabbitmq::parse),
    #[cfg(feature = "sqs")]
    ("sqs", sqs::parse),
];

/// Parse the config of a sink of type `kind`.
pub fn parse(kind: &str, keys: Map<String, Value>) -> Result<Box<dyn SinkSpec>, ConfigError> {
    crate::keys::registered("sink", kind, REGISTRY)?(keys)
}
