//! Sinks: where forward events go. One file per sink; a new sink is that
//! file plus one line in [`REGISTRY`].

use serde_json::{Map, Value};

use crate::event::{Event, DEFAULT_SUBJECT};
use crate::keys::{ConfigError, Fallback, KeySpec, Plugin};
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
    /// is committed. Nothing to do for a sink whose `publish` returns only
    /// once the destination acknowledged every event (all but a file).
    fn flush(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// Why the sink's own templates cannot route `e` (they read a field the
    /// event lacks and give no default): the event becomes a dead letter
    /// and is not published. By default every event is routable.
    fn unroutable(&self, _e: &Event) -> Option<String> {
        None
    }
}

/// A validated sink config that can open a [`Sink`].
pub trait SinkSpec: Send + Sync + std::fmt::Debug {
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

/// The keys every sink has, which the pipeline's config parser
/// ([`crate::config`]) takes before the sink parses its own.
pub const COMMON_KEYS: &[KeySpec] = &[
    KeySpec::new(
        "type",
        "string",
        Fallback::Required,
        "the sink type: `stdout`, `nats`, `kafka`, `redis`, `rabbitmq`, `sqs`, `http` or `pg-inbox` (each but `stdout` built in when its Cargo feature is on; all are by default)",
    ),
    KeySpec::new(
        "subject",
        "template",
        Fallback::Value(DEFAULT_SUBJECT),
        "a template with `{stream_table}`, `{op}`, `{outbox_id}`, `{refresh_id}`, and, to route by content, `{payload.<field>}` and `{headers.<name>}` (see [Routing by content](#routing-by-content)). An unknown `{variable}` is an error",
    ),
    KeySpec::new(
        "batch_size",
        "integer",
        Fallback::Text("`--batch-size`"),
        "events per batch: a read takes outbox rows until it holds `batch_size` events (the row that reaches it whole, and at least one row; a claim-check row ends a read), and the sink is handed batches of that many events; the offset is committed at most every 250 ms (see [Delivery guarantees](#delivery-guarantees))",
    ),
    KeySpec::new(
        "lease_seconds",
        "integer",
        Fallback::Value("60"),
        "consumer-group mode: how long a leased batch stays this relay's without being extended (2 at least)",
    ),
];

/// Parses a sink's own keys (everything but `type`, `subject`, `batch_size`).
pub type Parse = fn(Map<String, Value>) -> Result<Box<dyn SinkSpec>, ConfigError>;

/// Every sink built into this binary, by `type`, with its keys.
pub const REGISTRY: &[Plugin<Parse>] = &[
    Plugin::new("stdout", stdout::parse, stdout::KEYS),
    #[cfg(feature = "redis")]
    Plugin::sharing("redis", redis::parse, redis::KEYS, crate::cloudevents::KEYS),
    #[cfg(feature = "pg-inbox")]
    Plugin::new("pg-inbox", pg_inbox::parse, pg_inbox::KEYS),
    #[cfg(feature = "http")]
    Plugin::sharing("http", http::parse, http::KEYS, crate::cloudevents::KEYS),
    #[cfg(feature = "nats")]
    Plugin::sharing("nats", nats::parse, nats::KEYS, crate::cloudevents::KEYS),
    #[cfg(feature = "kafka")]
    Plugin::sharing("kafka", kafka::parse, kafka::KEYS, crate::cloudevents::KEYS),
    #[cfg(feature = "rabbitmq")]
    Plugin::sharing(
        "rabbitmq",
        rabbitmq::parse,
        rabbitmq::KEYS,
        crate::cloudevents::KEYS,
    ),
    #[cfg(feature = "sqs")]
    Plugin::sharing("sqs", sqs::parse, sqs::KEYS, crate::cloudevents::KEYS),
];

/// Parse the config of a sink of type `kind`.
pub fn parse(kind: &str, keys: Map<String, Value>) -> Result<Box<dyn SinkSpec>, ConfigError> {
    let plugin = crate::keys::registered("sink", kind, REGISTRY)?;
    crate::keys::known("sink", &[COMMON_KEYS, plugin.keys, plugin.also], &keys)?;
    (plugin.parse)(keys)
}
