//! The `pg-inbox` sink: events inserted into an inbox table of another
//! PostgreSQL database.
//!
//! Keys: [`KEYS`] (README.md and the man page show them). The inbox is a
//! pg_trickle (or outbox kit) inbox made with `pgtrickle.create_inbox`, or
//! any table with the columns `event_id TEXT PRIMARY KEY, event_type,
//! source, aggregate_id, payload JSONB, trace_id`.
//!
//! The inbox is found and written as the reverse direction finds and writes
//! one ([`Inbox`]: the schema and the error columns its
//! `pgt_inbox_config` row records there): one multi-row `INSERT ... ON
//! CONFLICT (event_id) DO NOTHING` per chunk of at most [`CHUNK`] events
//! and [`CHUNK_BYTES`] bytes of payload (far below PostgreSQL's 1 GB
//! message limit), each its own transaction: `event_id` = the dedup key,
//! `event_type` = the event's subject, `source` = the outbox table (the
//! dedup key's prefix), `payload` = the row, `trace_id` = the W3C
//! `traceparent` of the outbox headers when they carry a valid one (see
//! [`crate::trace`]). A replay inserts nothing new.
//! When the database refuses a chunk's data ([`refuses_the_data`]: SQLSTATE
//! class 22 or 23 but for a NOT NULL violation, 54000, or an exception
//! raised by a trigger, P0001), the events of the chunk are inserted one by
//! one and each one refused is dead-lettered. Any other error (a lost
//! connection, a missing inbox, missing privileges, a NOT NULL column the
//! sink does not fill) is retried with the whole batch, and nothing is
//! dead-lettered.

use postgres::Client;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::event::Event;
use crate::inbox::Inbox;
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::pg::{expand_env, mask};
use crate::retry::Error;
use crate::sink::{Rejected, Sink, SinkSpec};
use crate::source::Message;
use crate::trace::Context;

/// Events per INSERT at most.
pub const CHUNK: usize = 5000;
/// Payload bytes per INSERT at most (one event may be larger alone).
pub const CHUNK_BYTES: usize = 64 * 1024 * 1024;

/// The `pg-inbox` sink's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgInboxKeys {
    url: String,
    inbox: String,
    #[serde(default)]
    schema: Option<String>,
}

/// The sink's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    KeySpec::new(
        "url",
        "string",
        Fallback::Required,
        "the other database's connection string, with `${ENV:NAME}` and the same TLS parameters as `--postgres-url` (`sslmode`, `sslrootcert`)",
    ),
    KeySpec::new(
        "inbox",
        "string",
        Fallback::Required,
        "the inbox, made there with `pgtrickle.create_inbox` (or any table with the inbox columns and `event_id` as its primary key)",
    ),
    KeySpec::new(
        "schema",
        "string",
        Fallback::Text("the inbox's schema recorded in that database's `pgtrickle.pgt_inbox_config`, else `pgtrickle`"),
        "the inbox's schema",
    ),
];

/// Parse the sink's keys.
pub fn parse(keys: Map<String, Value>) -> Result<Box<dyn SinkSpec>, ConfigError> {
    let cfg: PgInboxKeys = from_value("sink", Value::Object(keys))?;
    if cfg.url.is_empty() {
        return Err(ConfigError::new("sink.url", "must not be empty"));
    }
    if cfg.inbox.is_empty() {
        return Err(ConfigError::new("sink.inbox", "must not be empty"));
    }
    if cfg.schema.as_deref() == Some("") {
        return Err(ConfigError::new("sink.schema", "must not be empty"));
    }
    Ok(Box::new(cfg))
}

impl SinkSpec for PgInboxKeys {
    fn open(&self, pipeline: &str) -> Result<Box<dyn Sink>, Error> {
        let url = expand_env(&self.url)
            .map_err(|e| Error::permanent(format!("pipeline {pipeline:?}: sink.url: {e}")))?;
        let mut sink = PgInboxSink {
            cfg: self.clone(),
            url,
            app: format!("pgtrickle-relay {pipeline} (pg-inbox sink)"),
            conn: None,
        };
        sink.conn()?;
        Ok(Box::new(sink))
    }

    /// The database answers and the inbox table exists there.
    fn check(&self, pipeline: &str) -> Result<(), ConfigError> {
        let url = expand_env(&self.url).map_err(|e| crate::keys::blame("sink.url", e))?;
        let mut client =
            crate::pg::connect(&url, &format!("pgtrickle-relay {pipeline} (check)"))
                .map_err(|e| ConfigError::new("sink.url", format!("{}: {e}", mask(&url))))?;
        // Found and prepared as the sink will: the table and its columns.
        Inbox::open(&mut client, &self.inbox, self.schema.as_deref())
            .map_err(|e| ConfigError::new("sink.inbox", format!("{}: {}", mask(&url), e.msg)))?;
        Ok(())
    }
}

struct PgInboxSink {
    cfg: PgInboxKeys,
    /// `url` with `${ENV:...}` expanded.
    url: String,
    app: String,
    conn: Option<(Client, Inbox)>,
}

/// Whether SQLSTATE `code` says the inbox refuses an event's data (so the
/// event is dead-lettered) rather than that the inbox or the connection is
/// wrong. A NOT NULL violation (23502) can only come from a column the sink
/// does not fill: the inbox's definition, refused for every event alike.
fn refuses_the_data(code: &str) -> bool {
    (code.starts_with("22") || code.starts_with("23") || code == "P0001" || code == "54000")
        && code != "23502"
}

/// Split `events` into chunks of at most [`CHUNK`] events and
/// [`CHUNK_BYTES`] of payload (at least one event each); returns each
/// chunk's start index.
fn chunks(events: &[Event]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, e) in events.iter().enumerate() {
        let len = e.payload.get().len() + e.dedup_key.len() + e.subject.len();
        if i > start && (i - start >= CHUNK || bytes + len > CHUNK_BYTES) {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < events.len() {
        out.push(start..events.len());
    }
    out
}

/// The outbox table of a dedup key `<outbox table>:<outbox id>:<row index>`.
fn source_of(key: &str) -> &str {
    key.rsplitn(3, ':').nth(2).unwrap_or(key)
}

impl PgInboxSink {
    /// The connection and the inbox's writer, opened on first use (the
    /// inbox found as the reverse direction finds it: `schema`, else the
    /// remote `pgt_inbox_config`, else `pgtrickle`).
    fn conn(&mut self) -> Result<&mut (Client, Inbox), Error> {
        if self.conn.is_none() {
            let mut client =
                crate::pg::connect(&self.url, &self.app).map_err(|e| e.context("pg-inbox sink"))?;
            let inbox = Inbox::open(&mut client, &self.cfg.inbox, self.cfg.schema.as_deref())
                .map_err(|e| e.context(format!("pg-inbox sink {}", mask(&self.cfg.url))))?;
            self.conn = Some((client, inbox));
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// Insert `events` in one statement (one transaction). Err(Ok(e)): the
    /// database refused the data (a constraint, a trigger): retrying the
    /// same events cannot help.
    fn write(&mut self, events: &[Event]) -> Result<(), Result<Error, Error>> {
        let messages: Vec<Message> = events.iter().map(message).collect();
        let (client, inbox) = self.conn().map_err(Err)?;
        match inbox.insert(client, &messages) {
            Ok(_) => Ok(()),
            Err(e) => {
                let refused = e.code().map(|c| refuses_the_data(c.code()));
                if client.is_closed() {
                    self.conn = None;
                }
                let err = Error::from(e).context(format!(
                    "pg-inbox sink {} inbox {}",
                    mask(&self.cfg.url),
                    self.cfg.inbox
                ));
                Err(if refused == Some(true) {
                    Ok(err)
                } else {
                    Err(err)
                })
            }
        }
    }
}

/// The inbox row of an event: `event_id` = the dedup key, `event_type` =
/// the subject, `source` = the outbox table, `payload` = the row.
fn message(e: &Event) -> Message {
    Message {
        event_id: e.dedup_key.clone(),
        event_type: Some(e.subject.clone()),
        source: Some(source_of(&e.dedup_key).to_string()),
        aggregate_id: None,
        trace_id: Context::of(e.headers.as_deref()).map(|t| t.traceparent),
        payload: e.payload.get().to_string(),
        error: None,
    }
}

impl Sink for PgInboxSink {
    fn publish(&mut self, events: &[Event]) -> Result<Vec<Rejected>, Error> {
        let mut rejected = Vec::new();
        for range in chunks(events) {
            let chunk = &events[range.clone()];
            match self.write(chunk) {
                Ok(()) => {}
                Err(Err(e)) => return Err(e),
                Err(Ok(_)) => {
                    // Find the events the inbox refuses.
                    for (i, e) in chunk.iter().enumerate() {
                        match self.write(std::slice::from_ref(e)) {
                            Ok(()) => {}
                            Err(Ok(why)) => rejected.push(Rejected {
                                index: range.start + i,
                                reason: why.msg,
                            }),
                            Err(Err(e)) => return Err(e),
                        }
                    }
                }
            }
        }
        Ok(rejected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn source_is_the_dedup_key_prefix() {
        assert_eq!(source_of("outbox_orders:12:3"), "outbox_orders");
        assert_eq!(source_of("a:b:12:3"), "a:b");
    }

    #[test]
    fn chunks_are_bounded_by_events_and_bytes() {
        let event = |n: usize, size: usize| Event {
            dedup_key: format!("o:{n}:0"),
            subject: String::new(),
            op: crate::event::Op::Insert,
            payload: serde_json::value::RawValue::from_string(format!("\"{}\"", "x".repeat(size)))
                .unwrap(),
            is_full_refresh: false,
            outbox_id: n as i64,
            refresh_id: None,
            headers: None,
            stream_table: "o".into(),
            created_at: None,
        };
        let small: Vec<Event> = (0..12_001).map(|n| event(n, 1)).collect();
        assert_eq!(chunks(&small), vec![0..5000, 5000..10_000, 10_000..12_001]);
        // 30 MB each: two per chunk; one over the limit goes alone.
        let big: Vec<Event> = (0..5).map(|n| event(n, 30 << 20)).collect();
        assert_eq!(chunks(&big), vec![0..2, 2..4, 4..5]);
        let huge = vec![event(0, 1), event(1, 70 << 20), event(2, 1)];
        assert_eq!(chunks(&huge), vec![0..1, 1..2, 2..3]);
        assert!(chunks(&[]).is_empty());
    }

    #[test]
    fn only_data_errors_dead_letter() {
        for c in ["23514", "23505", "22021", "22001", "P0001", "54000"] {
            assert!(refuses_the_data(c), "{c}");
        }
        for c in ["23502", "42P01", "42501", "08006", "57P01", "40001"] {
            assert!(!refuses_the_data(c), "{c}");
        }
    }

    #[test]
    fn config_errors_name_the_key() {
        let p = |v: Value| parse(v.as_object().unwrap().clone()).unwrap_err().key;
        assert_eq!(p(json!({"inbox": "i"})), "sink.url");
        assert_eq!(p(json!({"url": "postgres://h/d"})), "sink.inbox");
        assert_eq!(
            p(json!({"url": "postgres://h/d", "inbox": "i", "schema": ""})),
            "sink.schema"
        );
        assert_eq!(
            p(json!({"url": "postgres://h/d", "inbox": "i", "tabel": "x"})),
            "sink.tabel"
        );
    }
}
