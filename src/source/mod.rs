//! Sources: where reverse events come from. One file per source; a new
//! source is that file plus one line in [`REGISTRY`].

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::ConfigError;
use crate::retry::Error;

#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqs")]
pub mod sqs;
pub mod stdin;

/// Where a message attribute (`event_type`, `aggregate_id`, `source`,
/// `trace_id`) comes from: `{"header": "X-Type"}`, `{"field": "type"}` or
/// a fixed string. What a header or a field is depends on the source.
#[cfg_attr(
    not(any(feature = "http", feature = "redis", feature = "sqs")),
    allow(dead_code)
)]
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Origin {
    /// A header of the message (for the `redis` source: a field of the entry).
    Header {
        /// Its name.
        header: String,
    },
    /// A field of the message.
    Field {
        /// Its name.
        field: String,
    },
    /// A fixed value.
    Fixed(String),
}

/// One message for the inbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The inbox `event_id` (dedup key).
    pub event_id: String,
    /// Optional `event_type`.
    pub event_type: Option<String>,
    /// Optional `source`.
    pub source: Option<String>,
    /// Optional `aggregate_id`.
    pub aggregate_id: Option<String>,
    /// Optional `trace_id`.
    pub trace_id: Option<String>,
    /// The payload, as JSON text; for a dead letter (`error` set), the
    /// raw text as received.
    pub payload: String,
    /// Why the message cannot be processed (e.g. its body is not JSON): it
    /// is written as a dead letter, so it is neither lost nor blocking.
    pub error: Option<String>,
}

/// What one receive call produced.
#[derive(Debug, Default)]
pub struct Batch {
    /// Messages, in order.
    pub messages: Vec<Message>,
    /// The source has no more messages, ever (end of file/stdin).
    pub end_of_input: bool,
}

/// An open source.
pub trait Source {
    /// Receive up to `max` messages, waiting at most `wait` for the first.
    fn receive(&mut self, max: usize, wait: Duration) -> Result<Batch, Error>;
    /// Acknowledge everything received so far: called only after the inbox
    /// transaction holding those messages committed.
    fn ack(&mut self) -> Result<(), Error>;
}

/// A validated source config that can open a [`Source`].
pub trait SourceSpec: Send + std::fmt::Debug {
    /// Open the source for `pipeline`; `once` means read what is there and end.
    fn open(&self, pipeline: &str, once: bool) -> Result<Box<dyn Source>, Error>;
}

/// Parses a source's own keys (all but `type`, `batch_size`, `max_wait_ms`).
type Parse = fn(Map<String, Value>) -> Result<Box<dyn SourceSpec>, ConfigError>;

/// Every source built into this binary, by `type`.
const REGISTRY: &[(&str, Parse)] = &[
    ("stdin", stdin::parse),
    #[cfg(feature = "http")]
    ("http", http::parse),
    #[cfg(feature = "redis")]
    ("redis", redis::parse),
    #[cfg(feature = "sqs")]
    ("sqs", sqs::parse),
];

/// Parse the config of a source of type `kind`.
pub fn parse(kind: &str, keys: Map<String, Value>) -> Result<Box<dyn SourceSpec>, ConfigError> {
    match REGISTRY.iter().find(|(name, _)| *name == kind) {
        Some((_, parse)) => parse(keys),
        None => Err(ConfigError::new(
            "source.type",
            format!(
                "unknown source type {kind:?} (this binary has: {})",
                REGISTRY
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
