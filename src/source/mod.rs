//! Sources: where reverse events come from. One file per source; a new
//! source is that file plus one line in [`REGISTRY`].

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::ConfigError;
use crate::retry::Error;

#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqs")]
pub mod sqs;
pub mod stdin;

/// Where a message attribute (`event_type`, `aggregate_id`, `source`,
/// `trace_id`) comes from: `{"header": "X-Type"}`, `{"field": "type"}` or
/// a fixed string. What a header or a field is depends on the source.
#[cfg_attr(
    not(any(
        feature = "http",
        feature = "redis",
        feature = "nats",
        feature = "kafka",
        feature = "rabbitmq",
        feature = "sqs"
    )),
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

impl Message {
    /// Make the message storable in PostgreSQL, whatever the source: text
    /// cannot hold NUL and jsonb refuses a `\u0000` escape, so such a
    /// payload becomes a dead letter with the reason (instead of failing
    /// the inbox insert forever), and NUL characters in the text of a dead
    /// letter or an attribute become U+FFFD.
    pub fn make_storable(&mut self) {
        if self.error.is_none() && has_nul_escape(&self.payload) {
            let reason = format!(
                "message {:?}: payload holds a \\u0000 escape, which PostgreSQL jsonb cannot store",
                self.event_id.replace('\0', "\u{FFFD}")
            );
            log::warn!("{reason}; into the inbox's dead letters");
            self.error = Some(reason);
        }
        let clean = |t: &mut String| {
            if t.contains('\0') {
                *t = t.replace('\0', "\u{FFFD}");
            }
        };
        clean(&mut self.event_id);
        clean(&mut self.payload);
        for t in [
            &mut self.event_type,
            &mut self.source,
            &mut self.aggregate_id,
            &mut self.trace_id,
            &mut self.error,
        ]
        .into_iter()
        .flatten()
        {
            clean(t);
        }
    }
}

/// Whether JSON text holds a `\u0000` escape (not an escaped backslash
/// followed by `u0000`).
fn has_nul_escape(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(i) = text[from..].find("\\u0000").map(|i| i + from) {
        let backslashes = bytes[..i].iter().rev().take_while(|b| **b == b'\\').count();
        if backslashes % 2 == 0 {
            return true;
        }
        from = i + 1;
    }
    false
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
    #[cfg(feature = "nats")]
    ("nats", nats::parse),
    #[cfg(feature = "kafka")]
    ("kafka", kafka::parse),
    #[cfg(feature = "rabbitmq")]
    ("rabbitmq", rabbitmq::parse),
    #[cfg(feature = "sqs")]
    ("sqs", sqs::parse),
];

/// Parse the config of a source of type `kind`.
pub fn parse(kind: &str, keys: Map<String, Value>) -> Result<Box<dyn SourceSpec>, ConfigError> {
    crate::config::registered("source", kind, REGISTRY)?(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &str) -> Message {
        Message {
            event_id: "id\0".into(),
            event_type: Some("t\0".into()),
            source: None,
            aggregate_id: None,
            trace_id: None,
            payload: payload.into(),
            error: None,
        }
    }

    #[test]
    fn nul_escapes_are_found() {
        assert!(has_nul_escape(r#"{"a":"x\u0000"}"#));
        assert!(has_nul_escape(r#"{"a":"\\\u0000"}"#));
        assert!(!has_nul_escape(r#"{"a":"\\u0000"}"#));
        assert!(!has_nul_escape(r#"{"a":"\u0001"}"#));
    }

    #[test]
    fn a_nul_escape_makes_a_dead_letter_and_nul_characters_are_replaced() {
        let mut m = message(r#"{"a":"x\u0000"}"#);
        m.make_storable();
        assert!(m.error.as_deref().unwrap().contains("\\u0000 escape"));
        assert_eq!(m.event_id, "id\u{FFFD}");
        assert_eq!(m.event_type.as_deref(), Some("t\u{FFFD}"));
        let mut ok = message(r#"{"a":"\\u0000"}"#);
        ok.make_storable();
        assert_eq!(ok.error, None);
        assert_eq!(ok.payload, r#"{"a":"\\u0000"}"#);
    }
}
