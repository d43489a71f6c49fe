//! Sources: where reverse events come from. One file per source; a new
//! source is that file plus one line in [`REGISTRY`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use postgres::{Client, Transaction};
use serde_json::{Map, Value};

use crate::keys::{ConfigError, Fallback, KeySpec, Plugin};
use crate::pipeline::Ctx;
use crate::retry::Error;

pub mod decode;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
pub mod pg_outbox;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqs")]
pub mod sqs;
pub mod stdin;

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

/// The longest `event_id` written as it is, in bytes: PostgreSQL's btree
/// index of the inbox refuses an entry above about 2,700 bytes.
pub const MAX_EVENT_ID_BYTES: usize = 2048;
/// How much of a too-long `event_id` its substitute keeps, in characters.
const ID_PREFIX_CHARS: usize = 64;

impl Message {
    /// Make the message storable in PostgreSQL, whatever the source: text
    /// cannot hold NUL and jsonb refuses a `\u0000` escape, so such a
    /// payload becomes a dead letter with the reason (instead of failing
    /// the inbox insert forever), and NUL characters in the text of a dead
    /// letter or an attribute become U+FFFD. An `event_id` longer than
    /// [`MAX_EVENT_ID_BYTES`] makes a dead letter under a stable substitute
    /// id (see [`substitute_id`]), so a redelivery lands on the same row.
    pub fn make_storable(&mut self) {
        if self.error.is_none() && has_nul_escape(&self.payload) {
            let reason = format!(
                "message {:?}: payload holds a \\u0000 escape, which PostgreSQL jsonb cannot store",
                self.event_id.replace('\0', "\u{FFFD}")
            );
            self.error = Some(decode::dead_letter(reason));
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
        if self.event_id.len() > MAX_EVENT_ID_BYTES {
            let id = substitute_id(&self.event_id);
            let reason = format!(
                "event_id of {} bytes is longer than the {MAX_EVENT_ID_BYTES} the inbox index can \
                 hold; stored under {id:?}",
                self.event_id.len()
            );
            self.dead_letter(decode::dead_letter(reason));
            self.event_id = id;
        }
    }

    /// Make the message a dead letter for `reason` (the first reason
    /// stays; its payload is kept as the raw text).
    pub fn dead_letter(&mut self, reason: String) {
        self.error = Some(match self.error.take() {
            Some(first) => format!("{first}; {reason}"),
            None => reason,
        });
    }
}

/// The stable id a too-long `event_id` is stored under: its first 64
/// characters, `~sha256:`, and the SHA-256 of all of it in hex.
pub fn substitute_id(id: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    let mut out: String = id.chars().take(ID_PREFIX_CHARS).collect();
    out.push_str("~sha256:");
    for b in Sha256::digest(id.as_bytes()) {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The id an event carries itself: the `dedup_key` of our event envelope
/// (an object with `dedup_key`, `op`, `outbox_id` and `payload`, as the
/// `http` and `stdout` sinks write it), else the `id` of a CloudEvents
/// event (an object with `specversion`). An event keeps one inbox row
/// under it however it was batched or resent; ids that name a request
/// (`Idempotency-Key`) or a position (a stream sequence) are only the
/// fallback.
pub fn own_id(obj: &Map<String, Value>) -> Option<String> {
    let text = |is: bool, k: &str| {
        obj.get(k)
            .filter(|_| is)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let envelope = ["op", "outbox_id", "payload"]
        .iter()
        .all(|k| obj.contains_key(*k));
    let cloud_event = obj.get("specversion").is_some_and(Value::is_string);
    text(envelope, "dedup_key").or_else(|| text(cloud_event, "id"))
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

/// What one receive call produced: messages for the inbox and what
/// acknowledges them to the source.
#[derive(Debug)]
pub struct Batch<R> {
    /// Messages, in order.
    pub messages: Vec<Message>,
    /// What acknowledges them once they are in the inbox (receipt handles,
    /// reply subjects, offsets, ...), in the order received. It may also
    /// hold receipts of what needs no row (e.g. a deleted stream entry).
    pub receipts: Vec<R>,
    /// The source has no more messages, ever (end of file/stdin).
    pub end_of_input: bool,
}

impl<R> Default for Batch<R> {
    fn default() -> Self {
        Batch {
            messages: Vec::new(),
            receipts: Vec::new(),
            end_of_input: false,
        }
    }
}

/// An open source.
///
/// The rule of every source: only what was written to the inbox is ever
/// acknowledged. It holds by construction: receipts travel in the
/// [`Batch`], which the reverse loop owns (see [`Feed`]); what a source
/// put into it is written even when `receive` then fails, and only the
/// receipts of a written batch are handed back to `ack`.
///
/// A source with no broker to acknowledge to (one that reads another
/// database) keeps its position in the local database instead: it sets
/// [`Source::RECORDS`], and [`Source::record`] writes the receipts of a
/// batch in the very transaction that writes the batch into the inbox.
pub trait Source {
    /// What acknowledges one received message (or a run of them).
    type Receipt;
    /// Whether receipts are also recorded in the inbox transaction (see
    /// [`Source::record`]).
    const RECORDS: bool = false;
    /// Called at the start of every session in which no received batch
    /// waits to be written, with the local database: a source that keeps
    /// its position there loads it.
    fn resume(&mut self, _local: &mut Client, _ctx: &Ctx) -> Result<(), Error> {
        Ok(())
    }
    /// Record `receipts`, those of the batch being written, in `tx`, the
    /// transaction that writes it into the inbox; called only when
    /// [`Source::RECORDS`] is set and `receipts` is not empty.
    fn record(
        &mut self,
        _tx: &mut Transaction<'_>,
        _receipts: &[Self::Receipt],
    ) -> Result<(), Error> {
        Ok(())
    }
    /// Receive up to `max` messages into `batch` (empty when called),
    /// waiting at most `wait` for the first. On an error after some
    /// messages were received, those stay in `batch`: they are written,
    /// and acknowledged, before the error is reported.
    fn receive(
        &mut self,
        batch: &mut Batch<Self::Receipt>,
        max: usize,
        wait: Duration,
    ) -> Result<(), Error>;
    /// Acknowledge `receipts`: those of a batch whose inbox transaction
    /// committed, batches in the order received. A source keeps no receipt
    /// itself, except those it failed to acknowledge (written already).
    fn ack(&mut self, receipts: Vec<Self::Receipt>) -> Result<(), Error>;
}

/// The batch to write next, as [`Feed::next`] hands it out.
pub struct Next {
    /// Its messages, shared with the feed, which keeps them until the
    /// batch is written (a failed write hands them out again).
    pub messages: Arc<Vec<Message>>,
    /// The source has no more messages, ever.
    pub end_of_input: bool,
    /// The error that ended receiving this batch early: reported once the
    /// batch is written and acknowledged.
    pub error: Option<Error>,
    /// The batch has receipts to record in its inbox transaction
    /// ([`Feed::record`]).
    pub record: bool,
}

/// An open source with the batches received from it and not yet written:
/// all the reverse loop sees of a source. It holds at most two: the one
/// being written and the one received meanwhile ([`Feed::receive_ahead`]).
pub trait Feed {
    /// The batch to write: the oldest one received before and not yet
    /// written, else a new one. Err only when nothing was received.
    fn next(&mut self, max: usize, wait: Duration) -> Result<Next, Error>;
    /// While the batch handed out last is being written: receive the one
    /// after it, unless it is held already or the source ended. Err only
    /// when nothing was received (what was is kept, with the error, and
    /// handed out next).
    fn receive_ahead(&mut self, max: usize, wait: Duration) -> Result<(), Error>;
    /// The batch handed out last is in the inbox: acknowledge and forget it.
    fn written(&mut self) -> Result<(), Error>;
    /// Whether a batch received is waiting to be written.
    fn holds(&self) -> bool;
    /// Whether the source records its receipts in the inbox transaction
    /// ([`Source::RECORDS`]).
    fn records(&self) -> bool;
    /// A session starts on the local database (see [`Source::resume`]).
    fn resume(&mut self, local: &mut Client, ctx: &Ctx) -> Result<(), Error>;
    /// Record the receipts of the batch handed out last in `tx`, its inbox
    /// transaction (see [`Source::record`]).
    fn record(&mut self, tx: &mut Transaction<'_>) -> Result<(), Error>;
}

/// A batch received and not yet written.
struct Held<R> {
    messages: Arc<Vec<Message>>,
    receipts: Vec<R>,
    end_of_input: bool,
    /// The error that ended receiving it early, until it is handed out.
    error: Option<Error>,
}

/// A [`Source`] and the batches received from it and not yet written,
/// oldest first (at most two).
struct Open<S: Source> {
    source: S,
    held: VecDeque<Held<S::Receipt>>,
}

impl<S: Source> Open<S> {
    /// Receive a batch into `held`. Err only when nothing was received.
    fn receive(&mut self, max: usize, wait: Duration) -> Result<(), Error> {
        let mut b = Batch::default();
        let mut error = None;
        if let Err(e) = self.source.receive(&mut b, max.max(1), wait) {
            if b.messages.is_empty() && b.receipts.is_empty() {
                return Err(e);
            }
            log::warn!(
                "{e}; writing the {} messages received before it",
                b.messages.len()
            );
            error = Some(e);
        }
        b.messages.iter_mut().for_each(Message::make_storable);
        self.held.push_back(Held {
            messages: Arc::new(b.messages),
            receipts: b.receipts,
            end_of_input: b.end_of_input,
            error,
        });
        Ok(())
    }
}

impl<S: Source> Feed for Open<S> {
    fn next(&mut self, max: usize, wait: Duration) -> Result<Next, Error> {
        if self.held.is_empty() {
            self.receive(max, wait)?;
        }
        let b = self.held.front_mut().expect("received above");
        Ok(Next {
            messages: Arc::clone(&b.messages),
            end_of_input: b.end_of_input,
            error: b.error.take(),
            record: S::RECORDS && !b.receipts.is_empty(),
        })
    }

    fn receive_ahead(&mut self, max: usize, wait: Duration) -> Result<(), Error> {
        match self.held.back() {
            Some(b) if self.held.len() == 1 && !b.end_of_input => self.receive(max, wait),
            _ => Ok(()),
        }
    }

    fn written(&mut self) -> Result<(), Error> {
        match self.held.pop_front() {
            Some(b) if !b.receipts.is_empty() => self.source.ack(b.receipts),
            _ => Ok(()),
        }
    }

    fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    fn records(&self) -> bool {
        S::RECORDS
    }

    fn resume(&mut self, local: &mut Client, ctx: &Ctx) -> Result<(), Error> {
        match self.held.front() {
            Some(_) => Ok(()),
            None => self.source.resume(local, ctx),
        }
    }

    fn record(&mut self, tx: &mut Transaction<'_>) -> Result<(), Error> {
        match self.held.front() {
            Some(b) if S::RECORDS && !b.receipts.is_empty() => self.source.record(tx, &b.receipts),
            _ => Ok(()),
        }
    }
}

/// Box an opened source for the reverse loop.
pub fn feed<S: Source + 'static>(source: S) -> Box<dyn Feed> {
    Box::new(Open {
        source,
        held: VecDeque::new(),
    })
}

/// A validated source config that can open a [`Source`].
pub trait SourceSpec: Send + std::fmt::Debug {
    /// Open the source for `pipeline` (see [`feed`]); `once` means read
    /// what is there and end.
    fn open(&self, pipeline: &str, once: bool) -> Result<Box<dyn Feed>, Error>;
    /// `pgtrickle-relay check --connect`: reach the source and check what
    /// can be checked without receiving a message (opening a source may
    /// join a consumer group or take messages, so it is not opened); the
    /// error names the key at fault. By default (stdin, http), nothing
    /// beyond the config.
    fn check(&self, _pipeline: &str) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// The keys every source has, which the pipeline's config parser
/// ([`crate::config`]) takes before the source parses its own.
pub const COMMON_KEYS: &[KeySpec] = &[
    KeySpec::new(
        "type",
        "string",
        Fallback::Required,
        "the source type: `stdin`, `http`, `redis`, `nats`, `kafka`, `rabbitmq`, `sqs` or `postgres` (each but `stdin` and `postgres` built in when its Cargo feature is on; all are by default)",
    ),
    KeySpec::new(
        "batch_size",
        "integer",
        Fallback::Text("`--batch-size`"),
        "messages per inbox transaction",
    ),
    KeySpec::new(
        "max_wait_ms",
        "integer",
        Fallback::Value("100"),
        "how long to wait to fill a batch",
    ),
];

/// Parses a source's own keys (all but `type`, `batch_size`, `max_wait_ms`).
pub type Parse = fn(Map<String, Value>) -> Result<Box<dyn SourceSpec>, ConfigError>;

/// Every source built into this binary, by `type`, with its keys.
pub const REGISTRY: &[Plugin<Parse>] = &[
    Plugin::new("stdin", stdin::parse, stdin::KEYS),
    #[cfg(feature = "http")]
    Plugin::new("http", http::parse, http::KEYS),
    #[cfg(feature = "redis")]
    Plugin::new("redis", redis::parse, redis::KEYS),
    #[cfg(feature = "nats")]
    Plugin::new("nats", nats::parse, nats::KEYS),
    #[cfg(feature = "kafka")]
    Plugin::new("kafka", kafka::parse, kafka::KEYS),
    #[cfg(feature = "rabbitmq")]
    Plugin::new("rabbitmq", rabbitmq::parse, rabbitmq::KEYS),
    #[cfg(feature = "sqs")]
    Plugin::new("sqs", sqs::parse, sqs::KEYS),
    Plugin::new("postgres", pg_outbox::parse, pg_outbox::KEYS),
    Plugin::new("pg-outbox", pg_outbox::parse, pg_outbox::KEYS),
];

/// Parse the config of a source of type `kind`.
pub fn parse(kind: &str, keys: Map<String, Value>) -> Result<Box<dyn SourceSpec>, ConfigError> {
    let plugin = crate::keys::registered("source", kind, REGISTRY)?;
    crate::keys::known("source", &[COMMON_KEYS, plugin.keys], &keys)?;
    (plugin.parse)(keys)
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

    /// A source that hands out messages `0..` with receipts `0..`, and
    /// fails after `fail_after` messages of a batch.
    #[derive(Default)]
    struct Counter {
        next: u32,
        fail_after: Option<usize>,
        acked: Vec<u32>,
    }

    impl Source for Counter {
        type Receipt = u32;

        fn receive(
            &mut self,
            batch: &mut Batch<u32>,
            max: usize,
            _: Duration,
        ) -> Result<(), Error> {
            while batch.messages.len() < max {
                if self.fail_after == Some(batch.messages.len()) {
                    return Err(Error::transient("receive failed"));
                }
                batch.messages.push(message(&self.next.to_string()));
                batch.receipts.push(self.next);
                self.next += 1;
            }
            Ok(())
        }

        fn ack(&mut self, receipts: Vec<u32>) -> Result<(), Error> {
            self.acked.extend(receipts);
            Ok(())
        }
    }

    #[test]
    fn only_what_was_handed_out_and_written_is_acknowledged() {
        let mut open = Open {
            source: Counter {
                fail_after: Some(3),
                ..Counter::default()
            },
            held: VecDeque::new(),
        };
        // A receive failing half way: the 3 received are handed out with
        // the error, not dropped.
        let next = open.next(10, Duration::ZERO).unwrap();
        assert_eq!(next.messages.len(), 3);
        assert_eq!(next.error.unwrap().msg, "receive failed");
        // Not written (the inbox write failed): kept, nothing acknowledged.
        assert!(open.holds());
        assert_eq!(open.next(10, Duration::ZERO).unwrap().messages.len(), 3);
        assert!(open.source.acked.is_empty());
        open.written().unwrap();
        assert_eq!(open.source.acked, [0, 1, 2]);
        // Failing before anything was received: an error, nothing to ack.
        open.source.fail_after = Some(0);
        assert!(open.next(10, Duration::ZERO).is_err());
        assert!(!open.holds());
        open.written().unwrap();
        assert_eq!(open.source.acked, [0, 1, 2]);
        open.source.fail_after = None;
        assert_eq!(open.next(2, Duration::ZERO).unwrap().messages.len(), 2);
        open.written().unwrap();
        assert_eq!(open.source.acked, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_batch_received_ahead_is_handed_out_after_the_one_being_written() {
        let mut open = Open {
            source: Counter::default(),
            held: VecDeque::new(),
        };
        let ids =
            |n: &Next| -> Vec<String> { n.messages.iter().map(|m| m.payload.clone()).collect() };
        assert_eq!(ids(&open.next(2, Duration::ZERO).unwrap()), ["0", "1"]);
        open.receive_ahead(2, Duration::ZERO).unwrap();
        // Two held: no third batch.
        open.receive_ahead(2, Duration::ZERO).unwrap();
        assert_eq!(open.source.next, 4);
        // The first batch's write failed: it is handed out again, first.
        assert_eq!(ids(&open.next(2, Duration::ZERO).unwrap()), ["0", "1"]);
        open.written().unwrap();
        assert_eq!(open.source.acked, [0, 1]);
        assert_eq!(ids(&open.next(2, Duration::ZERO).unwrap()), ["2", "3"]);
        // A receive ahead failing half way: what came is kept with its
        // error, which is reported when that batch is handed out.
        open.source.fail_after = Some(1);
        open.receive_ahead(2, Duration::ZERO).unwrap();
        open.written().unwrap();
        assert_eq!(open.source.acked, [0, 1, 2, 3]);
        let next = open.next(2, Duration::ZERO).unwrap();
        assert_eq!(ids(&next), ["4"]);
        assert_eq!(next.error.unwrap().msg, "receive failed");
        // Failing before anything was received: an error, nothing held.
        open.source.fail_after = Some(0);
        assert!(open.receive_ahead(2, Duration::ZERO).is_err());
        open.written().unwrap();
        assert!(!open.holds());
        assert_eq!(open.source.acked, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn every_batch_is_made_storable() {
        let mut open = Open {
            source: Counter::default(),
            held: VecDeque::new(),
        };
        let next = open.next(1, Duration::ZERO).unwrap();
        assert_eq!(next.messages[0].event_id, "id\u{FFFD}");
    }

    #[test]
    fn a_too_long_event_id_is_a_dead_letter_under_a_stable_substitute() {
        let long = format!("é{}", "k".repeat(MAX_EVENT_ID_BYTES));
        let mut m = message("{}");
        m.event_id = long.clone();
        m.make_storable();
        let reason = m.error.clone().unwrap();
        assert!(reason.contains("2050 bytes"), "{reason}");
        assert!(m
            .event_id
            .starts_with(&long.chars().take(64).collect::<String>()));
        assert!(m.event_id.len() < 200);
        assert_eq!(m.event_id, substitute_id(&long));
        assert_ne!(substitute_id(&long), substitute_id(&format!("{long}x")));
        let mut fits = message("{}");
        fits.event_id = "k".repeat(MAX_EVENT_ID_BYTES);
        fits.make_storable();
        assert_eq!(fits.error, None);
    }

    #[test]
    fn own_ids_come_from_our_envelope_or_a_cloud_event() {
        let id = |v: Value| own_id(v.as_object().unwrap());
        let envelope = serde_json::json!({"dedup_key": "o:1:0", "op": "insert",
                                          "outbox_id": 1, "payload": {}});
        assert_eq!(id(envelope).as_deref(), Some("o:1:0"));
        // A row that only has a dedup_key column is not an envelope.
        assert_eq!(id(serde_json::json!({"dedup_key": "k", "n": 1})), None);
        let ce = serde_json::json!({"specversion": "1.0", "id": "ce-1", "type": "t"});
        assert_eq!(id(ce).as_deref(), Some("ce-1"));
        assert_eq!(id(serde_json::json!({"id": "x"})), None);
        assert_eq!(
            id(serde_json::json!({"specversion": "1.0", "id": ""})),
            None
        );
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
