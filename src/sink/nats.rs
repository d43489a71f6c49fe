//! The `nats` sink: events published to NATS JetStream, acknowledged.
//!
//! Keys: [`KEYS`] (README.md and the man page show them); the message
//! subject is the common `subject` template.
//!
//! Each event is one message on its rendered subject: the body is the row
//! (JSON), and the headers are `Nats-Msg-Id` = the dedup key (JetStream
//! drops a repeat within the stream's duplicate window, 2 minutes by
//! default), `Pgtrickle-Full-Refresh` (`true`/`false`), `Pgtrickle-Op`,
//! `Pgtrickle-Outbox-Id`, `Pgtrickle-Refresh-Id`/`Pgtrickle-Headers`
//! when present, and `traceparent`/`tracestate` when the outbox headers
//! carry a valid W3C trace context (see [`crate::trace`]).
//!
//! Acknowledgements are pipelined: every message is published with its own
//! reply subject under one inbox the sink subscribes to, and up to
//! [`WINDOW`] messages wait for their `PubAck` at a time. `publish` returns
//! once every event of the batch is acknowledged (a `duplicate` ack counts:
//! it was stored before).
//!
//! `stream` must exist when the pipeline starts, or the pipeline stops with
//! an error that says so; with `create_stream: true` the sink creates it
//! (file storage) capturing `subjects`, or, without `subjects`, the first
//! event's subject with each token that holds a template value (stream
//! table, op, outbox id, refresh id) replaced by `*` (e.g.
//! `pgtrickle.{stream_table}.{op}` → `pgtrickle.*.*`).
//!
//! A message no stream captures gets a "no responders" answer. Then the
//! stream's subjects are read: if one matches the event's subject
//! (JetStream is still starting), the batch is published again soon; if
//! none does, the batch fails and is retried slowly (the stream's subjects
//! or the subject template need fixing), or, with `"on_unroutable":
//! "dead_letter"`, the event is dead-lettered. A JetStream error answer
//! dead-letters the event only when it is about the event itself (10054:
//! over the stream's `max_msg_size`; a header block over 64 KiB); any
//! other (503 unavailable, 408, a stream full with `discard: new`, a sealed
//! stream, account limits, ...) fails the batch, which is retried. A
//! message whose body and headers (as sent, `NATS/1.0` header block
//! included) are over the server's `max_payload`, or whose header block is
//! over JetStream's 64 KiB, is dead-lettered without being sent (the
//! server would close the connection). A lost connection is re-established
//! in the background; the batch is published again as soon as it is back
//! (or fails after a few seconds, and the caller retries it).
//!
//! The connection is made by [`crate::broker::nats`], as for the source.

// The sync `nats` crate is deprecated upstream in favour of async-nats; it
// is used on purpose (no async runtime; see ARCHITECTURE.md).
#![allow(deprecated)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::broker::nats::{
    check_connection, check_name, connect, connect_waiting, ApiError, Client, CONNECT_STEP,
};
use crate::cloudevents::{self, CloudEvents, Mode};
use crate::event::Event;
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::retry::{Class, Error};
use crate::sink::{OnUnroutable, Rejected, Sink, SinkSpec};
use crate::trace::Context;

/// Messages waiting for their ack at most.
pub const WINDOW: usize = 4096;
/// How long a flush waits for the server's PONG.
const FLUSH_TIMEOUT: Duration = Duration::from_millis(100);
/// No ack at all for this long: the batch fails (and is retried). Kept
/// below the relay's shutdown grace, as is [`OUTAGE_WAIT`].
const ACK_TIMEOUT: Duration = Duration::from_secs(4);
/// How long `open` and `publish` wait for the server to answer again.
const OUTAGE_WAIT: Duration = Duration::from_secs(4);
/// The largest header block JetStream stores.
const JS_MAX_HEADERS: usize = 65_535;
/// JetStream's "message size exceeds maximum allowed" (the stream's
/// `max_msg_size`).
const JS_MSG_TOO_LARGE: u32 = 10054;

/// The `nats` sink's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsKeys {
    url: String,
    stream: String,
    #[serde(default)]
    credentials: Option<String>,
    #[serde(default)]
    create_stream: bool,
    #[serde(default)]
    subjects: Option<Vec<String>>,
    #[serde(default)]
    on_unroutable: OnUnroutable,
    /// `format: "cloudevents"` (its keys are taken out before parsing).
    #[serde(skip)]
    cloudevents: Option<CloudEvents>,
}

/// The sink's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    KeySpec::new(
        "url",
        "string",
        Fallback::Required,
        "`nats://host:4222`, several separated by commas, or `tls://...` for TLS; `${ENV:NAME}` is replaced",
    ),
    KeySpec::new(
        "stream",
        "string",
        Fallback::Required,
        "the JetStream stream that captures the subjects. If it does not exist, the pipeline stops with an error that says so, unless `create_stream` is set",
    ),
    crate::broker::nats::CREDENTIALS_KEY,
    KeySpec::new(
        "create_stream",
        "boolean",
        Fallback::Value("false"),
        "`true`: create `stream` (file storage) if it is missing",
    ),
    KeySpec::new(
        "subjects",
        "list of strings",
        Fallback::Text("the first event's subject with each token that holds a template value replaced by `*`, so `pgtrickle.{stream_table}.{op}` gives `pgtrickle.*.*`"),
        "with `create_stream`, the subjects the created stream captures",
    ),
    KeySpec::new(
        "on_unroutable",
        "string",
        Fallback::Value("retry"),
        "what to do with an event whose subject no stream captures: `retry` (the batch is retried slowly until a stream captures it, and `/health` shows the error) or `dead_letter`",
    ),
];

/// Parse the sink's keys.
pub fn parse(mut keys: Map<String, Value>) -> Result<Box<dyn SinkSpec>, ConfigError> {
    let cloudevents = CloudEvents::take(&mut keys, true)?;
    let mut cfg: NatsKeys = from_value("sink", Value::Object(keys))?;
    cfg.cloudevents = cloudevents;
    check_connection("sink", &cfg.url, cfg.credentials.as_deref())?;
    check_name("sink.stream", "stream", &cfg.stream)?;
    if let Some(s) = &cfg.subjects {
        if !cfg.create_stream {
            return Err(ConfigError::new(
                "sink.subjects",
                "only applies to a stream the sink creates: set sink.create_stream too",
            ));
        }
        if s.is_empty() || s.iter().any(|x| x.is_empty()) {
            return Err(ConfigError::new(
                "sink.subjects",
                "must be non-empty subjects",
            ));
        }
    }
    Ok(Box::new(cfg))
}

impl SinkSpec for NatsKeys {
    /// Waits up to [`OUTAGE_WAIT`] for the server and JetStream to answer.
    fn open(&self, pipeline: &str) -> Result<Box<dyn Sink>, Error> {
        let until = Instant::now() + OUTAGE_WAIT;
        let client = connect_waiting(
            pipeline,
            "sink",
            &self.url,
            self.credentials.as_deref(),
            OUTAGE_WAIT,
        )?;
        let inbox = client.nc.new_inbox();
        let acks = client.nc.subscribe(&format!("{inbox}.*")).map_err(|e| {
            Error::transient(format!("nats {}: subscribing to acks: {e}", client.shown))
        })?;
        let mut sink = NatsSink {
            cfg: self.clone(),
            client,
            acks,
            inbox,
            next_seq: 0,
            stream_subjects: None,
        };
        // JetStream answers a moment after the server's port opens.
        let subjects = loop {
            match sink.stream_subjects() {
                Err(e) if e.class == Class::Transient && Instant::now() + CONNECT_STEP < until => {
                    log::debug!("{e}; asking again in {CONNECT_STEP:?}");
                    std::thread::sleep(CONNECT_STEP);
                }
                other => break other?,
            }
        };
        match subjects {
            Some(subjects) => sink.stream_subjects = Some(subjects),
            None if self.create_stream => {
                if let Some(s) = &self.subjects {
                    sink.create_stream(s.clone())?;
                }
                // Else created from the first event's subject.
            }
            None => {
                return Err(Error::permanent(format!(
                    "pipeline {pipeline:?}: JetStream stream {:?} does not exist on {}: create \
                     it (e.g. `nats stream add`), or set sink.create_stream to true",
                    self.stream, sink.client.shown
                )))
            }
        }
        Ok(Box::new(sink))
    }

    /// Connect, and ask JetStream for the stream (unless the sink creates
    /// it).
    fn check(&self, pipeline: &str) -> Result<(), ConfigError> {
        let blame = |e| crate::keys::blame("sink.url", e);
        let c = connect(pipeline, "sink", &self.url, self.credentials.as_deref()).map_err(blame)?;
        let subject = format!("$JS.API.STREAM.INFO.{}", self.stream);
        let data = c.api(&subject, b"").map_err(blame)?;
        let info: StreamInfoReply = serde_json::from_slice(&data)
            .map_err(|e| ConfigError::new("sink.url", format!("nats {}: {e}", c.shown)))?;
        match info.error {
            Some(e) if e.no_stream() => {
                if self.create_stream {
                    return Ok(());
                }
                Err(ConfigError::new(
                    "sink.stream",
                    format!(
                        "JetStream stream {:?} does not exist on {}: create it, or set \
                         sink.create_stream to true",
                        self.stream, c.shown
                    ),
                ))
            }
            Some(e) => Err(ConfigError::new(
                "sink.stream",
                format!("nats {}: stream {:?}: {e}", c.shown, self.stream),
            )),
            None => Ok(()),
        }
    }
}

struct NatsSink {
    cfg: NatsKeys,
    client: Client,
    acks: nats::Subscription,
    inbox: String,
    /// Reply subjects are `<inbox>.<seq>`, unique for the sink's life.
    next_seq: u64,
    /// The stream's subjects, once known.
    stream_subjects: Option<Vec<String>>,
}

/// Why an attempt did not finish.
enum Stop {
    /// The connection was re-established, or JetStream is not answering
    /// yet: publish the batch again now (within the deadline).
    Reconnected,
    /// Give the error to the caller.
    Fail(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Fail(e)
    }
}

#[derive(Deserialize)]
struct PubAckReply {
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct StreamInfoReply {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    config: Option<StreamConfigReply>,
}

#[derive(Deserialize)]
struct StreamConfigReply {
    #[serde(default)]
    subjects: Vec<String>,
}

/// Whether NATS subject filter `filter` (with `*` and `>`) matches `subject`.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether a JetStream error answer is about the message itself (so only
/// that event is dead-lettered) rather than the stream or the account.
fn about_the_event(err: &ApiError) -> bool {
    err.err_code == JS_MSG_TOO_LARGE || err.description.contains("header size exceeds")
}

/// The bytes of a header block as the client sends it:
/// `NATS/1.0\r\n`, `Name:value\r\n` per value (trimmed), `\r\n`.
fn header_bytes(headers: &nats::HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(k, vs)| {
            vs.iter()
                .map(|v| k.trim().len() + 1 + v.trim().len() + 2)
                .sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n".len() + lines + 2
}

/// Why a message with `headers` and a body of `body` bytes cannot be sent
/// to a server with `max_payload` (0: unknown), if so.
fn oversize(headers: &nats::HeaderMap, body: usize, max_payload: usize) -> Option<String> {
    let h = header_bytes(headers);
    if max_payload > 0 && h + body > max_payload {
        return Some(format!(
            "nats: message of {} bytes (body {body}, headers {h}) is over the server's \
             max_payload ({max_payload})",
            h + body
        ));
    }
    if h > JS_MAX_HEADERS {
        return Some(format!(
            "nats: header block of {h} bytes is over JetStream's limit ({JS_MAX_HEADERS})"
        ));
    }
    None
}

/// The subject filter a created stream gets from an event: each token
/// holding a template value becomes `*`.
fn derived_subject(e: &Event) -> String {
    let id = e.outbox_id.to_string();
    let values = [
        &*e.stream_table,
        e.op.as_str(),
        id.as_str(),
        e.refresh_id.as_deref().unwrap_or(""),
    ];
    e.subject
        .split('.')
        .map(|t| {
            if values.iter().any(|v| !v.is_empty() && t.contains(v)) {
                "*"
            } else {
                t
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

impl NatsSink {
    /// The stream's subjects, or None when it does not exist.
    fn stream_subjects(&self) -> Result<Option<Vec<String>>, Error> {
        let data = self
            .client
            .api(&format!("$JS.API.STREAM.INFO.{}", self.cfg.stream), b"")?;
        let info: StreamInfoReply = serde_json::from_slice(&data).map_err(|e| {
            Error::transient(format!("nats {}: bad stream info: {e}", self.client.shown))
        })?;
        match (info.error, info.config) {
            (Some(e), _) if e.no_stream() => Ok(None),
            (Some(e), _) => Err(Error::transient(format!(
                "nats {}: stream {:?}: {e}",
                self.client.shown, self.cfg.stream
            ))),
            (None, Some(c)) => Ok(Some(c.subjects)),
            (None, None) => Ok(Some(Vec::new())),
        }
    }

    fn create_stream(&mut self, subjects: Vec<String>) -> Result<(), Error> {
        let req = serde_json::json!({
            "name": self.cfg.stream,
            "subjects": subjects,
            "storage": "file",
            "retention": "limits",
            "num_replicas": 1,
        });
        let data = self.client.api(
            &format!("$JS.API.STREAM.CREATE.{}", self.cfg.stream),
            req.to_string().as_bytes(),
        )?;
        let info: StreamInfoReply = serde_json::from_slice(&data).map_err(|e| {
            Error::transient(format!(
                "nats {}: bad stream create answer: {e}",
                self.client.shown
            ))
        })?;
        if let Some(e) = info.error {
            return Err(Error::permanent(format!(
                "nats {}: creating stream {:?} with subjects {subjects:?}: {e}",
                self.client.shown, self.cfg.stream
            )));
        }
        log::info!(
            "created JetStream stream {:?} capturing {subjects:?}",
            self.cfg.stream
        );
        self.stream_subjects = Some(subjects);
        Ok(())
    }

    /// One attempt to publish `events` and collect every ack.
    fn attempt(&mut self, events: &[Event]) -> Result<Vec<Rejected>, Stop> {
        let generation = self.client.link.generation.load(Ordering::SeqCst);
        let base = self.next_seq;
        self.next_seq += events.len() as u64;
        let max_payload = self.client.nc.max_payload();
        let mut done = vec![false; events.len()];
        let mut outstanding = 0usize;
        let mut rejected = Vec::new();
        let mut no_stream: Vec<usize> = Vec::new();
        let mut last_progress = Instant::now();
        let mut headers = nats::HeaderMap::new();
        let mut ce_body = Vec::new();
        for (i, e) in events.iter().enumerate() {
            if e.subject.is_empty() {
                rejected.push(Rejected {
                    index: i,
                    reason: "nats: empty subject".into(),
                });
                done[i] = true;
                continue;
            }
            headers.clear();
            headers.insert("Nats-Msg-Id", e.dedup_key.as_str());
            headers.insert(
                "Pgtrickle-Full-Refresh",
                if e.is_full_refresh { "true" } else { "false" },
            );
            headers.insert("Pgtrickle-Op", e.op.as_str());
            headers.insert("Pgtrickle-Outbox-Id", e.outbox_id.to_string());
            if let Some(r) = &e.refresh_id {
                headers.insert("Pgtrickle-Refresh-Id", r.as_str());
            }
            if let Some(h) = &e.headers {
                headers.insert("Pgtrickle-Headers", h.get());
            }
            if let Some(t) = Context::of(e.headers.as_deref()) {
                for (name, value) in t.headers() {
                    headers.insert(name, value);
                }
            }
            let body = match &self.cfg.cloudevents {
                Some(ce) => cloud_event(ce, e, &mut headers, &mut ce_body),
                None => e.payload.get().as_bytes(),
            };
            if let Some(reason) = oversize(&headers, body.len(), max_payload) {
                rejected.push(Rejected { index: i, reason });
                done[i] = true;
                continue;
            }
            while outstanding >= WINDOW {
                self.receive(
                    base,
                    generation,
                    &mut done,
                    &mut outstanding,
                    &mut rejected,
                    &mut no_stream,
                    &mut last_progress,
                )?;
            }
            let reply = format!("{}.{}", self.inbox, base + i as u64);
            self.client
                .nc
                .publish_with_reply_or_headers(&e.subject, Some(&reply), Some(&headers), body)
                .map_err(|x| {
                    Stop::Fail(Error::transient(format!(
                        "nats {}: publishing to {}: {x}",
                        self.client.shown, e.subject
                    )))
                })?;
            outstanding += 1;
        }
        if outstanding > 0 {
            // The client sends its buffer at most every 5 ms by itself: the
            // last messages published would wait for it. A flush sends it
            // now (and waits for the server's PONG, briefly: while it is
            // disconnected, receive notices the reconnect).
            if let Err(x) = self.client.nc.flush_timeout(FLUSH_TIMEOUT) {
                log::debug!("nats {}: flush: {x}", self.client.shown);
            }
        }
        while outstanding > 0 {
            self.receive(
                base,
                generation,
                &mut done,
                &mut outstanding,
                &mut rejected,
                &mut no_stream,
                &mut last_progress,
            )?;
        }
        if !no_stream.is_empty() {
            self.uncaptured(events, &no_stream, &mut rejected)?;
        }
        rejected.sort_by_key(|r| r.index);
        Ok(rejected)
    }

    /// Events that got "no responders": dead-letter those whose subject no
    /// stream captures; anything else is retried.
    fn uncaptured(
        &mut self,
        events: &[Event],
        no_stream: &[usize],
        rejected: &mut Vec<Rejected>,
    ) -> Result<(), Stop> {
        // Right after a (re)start JetStream may not answer yet: try again
        // shortly (within publish's deadline) rather than fail the batch.
        let retry_soon = |e: Error| {
            log::debug!("{e}; publishing again shortly");
            std::thread::sleep(Duration::from_millis(50));
            Stop::Reconnected
        };
        let subjects = match self.stream_subjects().map_err(retry_soon)? {
            Some(s) => s,
            None if self.cfg.create_stream => {
                let s = self
                    .cfg
                    .subjects
                    .clone()
                    .unwrap_or_else(|| vec![derived_subject(&events[no_stream[0]])]);
                self.create_stream(s)?;
                return Err(Stop::Reconnected);
            }
            None => {
                return Err(Stop::Fail(Error::permanent(format!(
                    "nats {}: JetStream stream {:?} does not exist (any more): create it, or \
                     set sink.create_stream to true",
                    self.client.shown, self.cfg.stream
                ))))
            }
        };
        self.stream_subjects = Some(subjects.clone());
        for &i in no_stream {
            let subject = &events[i].subject;
            if subjects.iter().any(|f| subject_matches(f, subject)) {
                return Err(retry_soon(Error::transient(format!(
                    "nats {}: no JetStream answer for subject {subject} although stream {:?} \
                     captures it (is JetStream starting?)",
                    self.client.shown, self.cfg.stream
                ))));
            }
            let reason = format!(
                "nats: no JetStream stream captures subject {subject:?} (stream {:?} captures \
                 {subjects:?})",
                self.cfg.stream
            );
            match self.cfg.on_unroutable {
                OnUnroutable::DeadLetter => rejected.push(Rejected { index: i, reason }),
                OnUnroutable::Retry => {
                    return Err(Stop::Fail(Error::permanent(format!(
                        "{reason}: retrying until a stream captures it (or set \
                         sink.on_unroutable to \"dead_letter\")"
                    ))))
                }
            }
        }
        Ok(())
    }

    /// Wait for one ack of this attempt.
    #[allow(clippy::too_many_arguments)]
    fn receive(
        &mut self,
        base: u64,
        generation: u64,
        done: &mut [bool],
        outstanding: &mut usize,
        rejected: &mut Vec<Rejected>,
        no_stream: &mut Vec<usize>,
        last_progress: &mut Instant,
    ) -> Result<(), Stop> {
        loop {
            if self.client.link.generation.load(Ordering::SeqCst) != generation {
                return Err(Stop::Reconnected);
            }
            if last_progress.elapsed() > ACK_TIMEOUT {
                return Err(Stop::Fail(Error::transient(format!(
                    "nats {}: {} JetStream acks missing after {ACK_TIMEOUT:?}",
                    self.client.shown, outstanding
                ))));
            }
            let msg = match self.acks.next_timeout(Duration::from_millis(50)) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
                Err(e) => {
                    return Err(Stop::Fail(Error::transient(format!(
                        "nats {}: ack subscription: {e}",
                        self.client.shown
                    ))))
                }
            };
            let seq = msg
                .subject
                .rsplit('.')
                .next()
                .and_then(|s| s.parse::<u64>().ok());
            let Some(i) = seq
                .filter(|s| *s >= base && *s < base + done.len() as u64)
                .map(|s| (s - base) as usize)
            else {
                continue; // an ack of an earlier attempt
            };
            if done[i] {
                continue;
            }
            done[i] = true;
            *outstanding -= 1;
            *last_progress = Instant::now();
            if msg.is_no_responders() {
                no_stream.push(i);
                return Ok(());
            }
            let ack: PubAckReply = serde_json::from_slice(&msg.data).map_err(|e| {
                Stop::Fail(Error::transient(format!(
                    "nats {}: bad JetStream ack {:?}: {e}",
                    self.client.shown,
                    String::from_utf8_lossy(&msg.data)
                )))
            })?;
            if let Some(err) = ack.error {
                let why = format!("nats JetStream: {err}");
                if !about_the_event(&err) {
                    let msg = format!("nats {}: {why}", self.client.shown);
                    return Err(Stop::Fail(if err.code == 503 || err.code == 408 {
                        Error::transient(msg)
                    } else {
                        Error::permanent(msg)
                    }));
                }
                rejected.push(Rejected {
                    index: i,
                    reason: why,
                });
            }
            return Ok(());
        }
    }
}

/// `e` as a CloudEvent (the NATS protocol binding, with headers since
/// NATS 2.2): the body to send, and `headers` completed. Structured: the
/// body is the event and `content-type` says so; binary: the body is the
/// row and the attributes are `ce-*` headers (percent-encoded as HTTP's).
fn cloud_event<'a>(
    ce: &CloudEvents,
    e: &'a Event,
    headers: &mut nats::HeaderMap,
    buf: &'a mut Vec<u8>,
) -> &'a [u8] {
    match ce.mode {
        Mode::Structured => {
            buf.clear();
            ce.structured(e, None, buf);
            headers.insert("content-type", cloudevents::STRUCTURED);
            buf
        }
        Mode::Binary => {
            headers.insert("content-type", cloudevents::DATA_CONTENT_TYPE);
            for (k, v) in ce.headers(e, None, "ce-", true) {
                headers.insert(k, v);
            }
            e.payload.get().as_bytes()
        }
    }
}

impl Sink for NatsSink {
    fn publish(&mut self, events: &[Event]) -> Result<Vec<Rejected>, Error> {
        let until = Instant::now() + OUTAGE_WAIT;
        loop {
            self.client.wait_connected(until)?;
            match self.attempt(events) {
                Ok(r) => return Ok(r),
                Err(Stop::Fail(e)) => return Err(e),
                Err(Stop::Reconnected) if Instant::now() < until => continue,
                Err(Stop::Reconnected) => {
                    return Err(Error::transient(format!(
                        "nats {}: the connection keeps dropping, or JetStream does not answer",
                        self.client.shown
                    )))
                }
            }
        }
    }

    fn unroutable(&self, e: &Event) -> Option<String> {
        self.cfg.cloudevents.as_ref()?.missing(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Op;
    use serde_json::json;
    use serde_json::value::RawValue;

    #[test]
    fn subject_filters_match_like_nats() {
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.c"));
    }

    #[test]
    fn a_created_stream_captures_the_template_shape() {
        let e = Event {
            dedup_key: "outbox_orders:7:0".into(),
            subject: "shop.orders.insert.v1".into(),
            op: Op::Insert,
            payload: RawValue::from_string("{}".into()).unwrap(),
            is_full_refresh: false,
            outbox_id: 7,
            refresh_id: None,
            headers: None,
            stream_table: "orders".into(),
            created_at: None,
        };
        assert_eq!(derived_subject(&e), "shop.*.*.v1");
    }

    #[test]
    fn the_header_block_is_measured_as_sent() {
        let mut h = nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", "o:1:0");
        h.insert("Pgtrickle-Headers", " {\"a\": 1} ");
        // NATS/1.0\r\n + Nats-Msg-Id:o:1:0\r\n + Pgtrickle-Headers:{"a": 1}\r\n + \r\n
        assert_eq!(header_bytes(&h), 10 + 19 + 28 + 2);
        assert!(oversize(&h, 1000, 1059).is_none());
        let why = oversize(&h, 1000, 1058).unwrap();
        assert!(
            why.contains("1059 bytes") && why.contains("max_payload (1058)"),
            "{why}"
        );
        h.insert("Pgtrickle-Headers", "x".repeat(70_000));
        assert!(oversize(&h, 0, 0).unwrap().contains("limit (65535)"));
    }

    #[test]
    fn config_errors_name_the_key() {
        let p = |v: Value| parse(v.as_object().unwrap().clone()).unwrap_err().key;
        assert_eq!(p(json!({"stream": "S"})), "sink.url");
        assert_eq!(p(json!({"url": "nats://x"})), "sink.stream");
        assert_eq!(
            p(json!({"url": "nats://x", "stream": "a.b"})),
            "sink.stream"
        );
        assert_eq!(
            p(json!({"url": "nats://x", "stream": "S", "subjects": ["a"]})),
            "sink.subjects"
        );
        assert_eq!(
            p(json!({"url": "nats://x", "stream": "S", "create_stream": "yes"})),
            "sink.create_stream"
        );
        assert_eq!(
            p(json!({"url": "nats://x", "stream": "S", "on_unroutable": "drop"})),
            "sink.on_unroutable"
        );
    }
}
