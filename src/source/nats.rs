//! The `nats` source: a NATS JetStream durable pull consumer into the inbox.
//!
//! Keys: [`KEYS`] (README.md and the man page show them); the connection is
//! made by `broker::nats`, as for the sink.
//!
//! `stream` must exist (else the pipeline stops with an error naming it).
//! The durable consumer is created when missing: explicit acks, `ack_wait`
//! = `ack_wait_ms` (default 30 s), deliver policy `all` (`start: "all"`,
//! the default, so a backlog published before the relay's first start is
//! not lost) or `new`, filtered on `subject` when set, no limit on
//! unacknowledged messages (the relay itself keeps about two batches in
//! flight at most). An existing consumer is used as it is, after checks: it must be
//! a pull consumer, with acks (`explicit` or `all`), filtering on `subject`
//! when that is set; a different `ack_wait_ms` is applied to it (all in
//! `nats/consumer.rs`).
//!
//! Messages are pulled in batches (`CONSUMER.MSG.NEXT`, batch = the
//! pipeline's batch size); the next pull is sent when a batch is handed
//! out, so the server delivers it while the inbox transaction runs. Each
//! message is acknowledged (`+ACK`) only after the inbox transaction
//! holding it committed: all acks of a batch are sent at once, the last
//! one with a reply subject, and the server's answer to it confirms them
//! all (a connection processes in order). That answer is awaited when the
//! next batch is acknowledged (or the source ends), so the round trip
//! overlaps the next batch; acks not confirmed in time are sent again with
//! the next batch. A message not acknowledged within `ack_wait_ms` (a
//! crashed relay, PostgreSQL down) is redelivered by JetStream; the inbox
//! absorbs the repeat.
//!
//! The inbox `event_id` is the `Nats-Msg-Id` header, else the id the body
//! carries itself (our envelope's `dedup_key`, a CloudEvents `id`; see
//! `source::own_id`), else `<stream>:<stream sequence>`. The payload is the body, which must be
//! JSON; a body that is not (or that PostgreSQL's jsonb cannot hold: a
//! `\u0000` escape) goes into the inbox as a dead letter (`{"raw":
//! "<text>"}`, the reason in `error`, in `<inbox>_dlq`) and is acknowledged
//! like the rest. `event_type` defaults to the message's subject;
//! `aggregate_id`, `source` and `trace_id` to the body's JSON field of the
//! same name (`trace_id`: first the W3C `traceparent` header when it is a
//! valid one, see [`crate::trace`]). `{"header": "X"}` is a message header, `{"field": "x"}` a
//! top-level field of the JSON body.

// The sync `nats` crate is deprecated upstream in favour of async-nats; it
// is used on purpose (no async runtime; see ARCHITECTURE.md).
#![allow(deprecated)]

mod consumer;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::broker::nats::{check_connection, check_name, connect, connect_waiting, Client};
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::retry::Error;
use crate::source::decode::{dead_letter, json_text, Body, CloudEvent, Origin, Origins, Problem};
use crate::source::{feed, own_id, Batch, Feed, Message, Source, SourceSpec};
use crate::trace;
use consumer::Durable;

/// How long `open`, `receive` and `ack` wait for the server to answer again.
/// Kept below the relay's shutdown grace, as is [`CONFIRM_TIMEOUT`].
const OUTAGE_WAIT: Duration = Duration::from_secs(4);
/// How long the server's confirmation of a batch's acks may take.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a pull request stays open at the server.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// With `--once`: how much longer than `max_wait_ms` to wait for the
/// server's answer to a pull request before ending anyway.
const ONCE_SLACK: Duration = Duration::from_secs(10);
/// Once a batch has its first message: more are taken while they keep
/// arriving at least this often.
const GAP: Duration = Duration::from_millis(2);
/// The smallest `ack_wait_ms`: a shorter one would redeliver messages
/// while their batch is being written.
const MIN_ACK_WAIT_MS: u64 = 1_000;

/// The `nats` source's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSourceConfig {
    url: String,
    stream: String,
    #[serde(default)]
    consumer: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    credentials: Option<String>,
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    ack_wait_ms: Option<u64>,
    /// `event_type`, `aggregate_id`, `source`, `trace_id`: taken out
    /// before the rest is parsed ([`Origins::take`]).
    #[serde(skip)]
    origins: Origins,
}

/// The source's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    KeySpec::new(
        "url",
        "string",
        Fallback::Required,
        "`nats://host:4222`, several separated by commas, or `tls://...` for TLS. `${ENV:NAME}` is replaced",
    ),
    KeySpec::new(
        "stream",
        "string",
        Fallback::Required,
        "the JetStream stream to read; it must exist (the relay does not create streams)",
    ),
    KeySpec::new(
        "consumer",
        "string",
        Fallback::Text("`pgtrickle-relay-<pipeline>` (characters a consumer name cannot hold become `_`)"),
        "the durable consumer's name",
    ),
    KeySpec::new(
        "subject",
        "string",
        Fallback::Text("the whole stream"),
        "the consumer's subject filter (`orders.>`), for a consumer the relay creates; an existing consumer must filter on the same subject",
    ),
    crate::broker::nats::CREDENTIALS_KEY,
    KeySpec::new(
        "start",
        "string",
        Fallback::Value("all"),
        "where a consumer the relay creates starts: `all` (the first message of the stream, so a backlog published before the relay's first start is not lost; `earliest` is the same) or `new` (only messages published after the consumer is created; `latest` is the same). An existing consumer keeps its position",
    ),
    KeySpec::new(
        "ack_wait_ms",
        "integer",
        Fallback::Value("30000"),
        "how long JetStream waits for the ack of a delivered message before it delivers it again: after a crash of the relay, its unacknowledged messages come back after this long. Set on the consumer the relay creates, and applied to an existing one when given. At least 1000. Keep it well above the time a batch takes to be written",
    ),
    Origin::key(
        "event_type",
        "the message's subject",
        r#"where it comes from: `{"header": "name"}` (a message header), `{"field": "name"}` (a top-level field of the JSON body) or a fixed string"#,
    ),
    Origin::key(
        "aggregate_id",
        "the body's field of the same name",
        "as for `event_type`",
    ),
    Origin::key(
        "source",
        "the body's field of the same name",
        "as for `event_type`",
    ),
    Origin::key(
        "trace_id",
        "a valid W3C `traceparent` header (see \"Trace context\"), else the body's field of the same name",
        "as for `event_type`",
    ),
];

/// Parse the source's keys.
pub fn parse(mut keys: Map<String, Value>) -> Result<Box<dyn SourceSpec>, ConfigError> {
    let origins = Origins::take(&mut keys, "source")?;
    let mut cfg: NatsSourceConfig = from_value("source", Value::Object(keys))?;
    cfg.origins = origins;
    check_connection("source", &cfg.url, cfg.credentials.as_deref())?;
    check_name("source.stream", "stream", &cfg.stream)?;
    if let Some(c) = &cfg.consumer {
        check_name("source.consumer", "consumer", c)?;
    }
    if let Some(s) = &cfg.subject {
        if s.is_empty() || s.contains(char::is_whitespace) || s.split('.').any(str::is_empty) {
            return Err(ConfigError::new(
                "source.subject",
                format!("{s:?} is not a NATS subject filter"),
            ));
        }
    }
    match cfg.start.as_deref() {
        None | Some("all" | "earliest" | "new" | "latest") => {}
        Some(other) => {
            return Err(ConfigError::new(
                "source.start",
                format!("expected \"all\" or \"new\", found {other:?}"),
            ))
        }
    }
    if cfg.ack_wait_ms.is_some_and(|ms| ms < MIN_ACK_WAIT_MS) {
        return Err(ConfigError::new(
            "source.ack_wait_ms",
            format!("must be at least {MIN_ACK_WAIT_MS}"),
        ));
    }
    Ok(Box::new(cfg))
}

impl SourceSpec for NatsSourceConfig {
    fn open(&self, pipeline: &str, once: bool) -> Result<Box<dyn Feed>, Error> {
        let client = connect_waiting(
            pipeline,
            "source",
            &self.url,
            self.credentials.as_deref(),
            OUTAGE_WAIT,
        )?;
        let shown = &client.shown;
        let deliver_to = client.nc.new_inbox();
        let deliveries = client.nc.subscribe(&deliver_to).map_err(|e| {
            Error::transient(format!("nats {shown}: subscribing to deliveries: {e}"))
        })?;
        let confirm_inbox = client.nc.new_inbox();
        let confirms = client
            .nc
            .subscribe(&format!("{confirm_inbox}.*"))
            .map_err(|e| {
                Error::transient(format!("nats {shown}: subscribing to confirmations: {e}"))
            })?;
        let mut src = NatsSource {
            cfg: self.clone(),
            consumer: Durable::new(pipeline, self),
            client,
            deliver_to,
            deliveries,
            confirm_inbox,
            confirms,
            confirm_seq: 0,
            generation: 0,
            pull_left: 0,
            pull_until: Instant::now(),
            // Checked below, before the source is handed out.
            check_consumer: false,
            unacked: Vec::new(),
            sent: None,
            once,
        };
        src.generation = src.client.link.generation.load(Ordering::SeqCst);
        src.consumer.ensure(&src.client)?;
        log::info!(
            "reading JetStream stream {:?} through durable consumer {:?} on {}",
            src.cfg.stream,
            src.consumer.name,
            src.client.shown
        );
        Ok(feed(src))
    }

    /// Connect, and ask JetStream for the stream.
    fn check(&self, pipeline: &str) -> Result<(), ConfigError> {
        let blame = |e| crate::keys::blame("source.url", e);
        let c =
            connect(pipeline, "source", &self.url, self.credentials.as_deref()).map_err(blame)?;
        let subject = format!("$JS.API.STREAM.INFO.{}", self.stream);
        let data = c.api(&subject, b"").map_err(blame)?;
        let answer: Value = serde_json::from_slice(&data)
            .map_err(|e| ConfigError::new("source.url", format!("nats {}: {e}", c.shown)))?;
        match answer.get("error") {
            Some(e) => Err(ConfigError::new(
                "source.stream",
                format!(
                    "JetStream stream {:?} on {}: {}",
                    self.stream,
                    c.shown,
                    e["description"].as_str().unwrap_or("not available")
                ),
            )),
            None => Ok(()),
        }
    }
}

struct NatsSource {
    cfg: NatsSourceConfig,
    consumer: Durable,
    client: Client,
    /// The reply subject of pull requests: messages arrive here.
    deliver_to: String,
    deliveries: nats::Subscription,
    /// Confirmations of acks arrive on `<confirm_inbox>.<n>`.
    confirm_inbox: String,
    confirms: nats::Subscription,
    confirm_seq: u64,
    /// The connection generation the pull state belongs to.
    generation: u64,
    /// Messages the open pull request may still deliver (0: none open).
    pull_left: usize,
    /// When the open pull request has surely ended at the server.
    pull_until: Instant,
    /// Look at the stream and consumer (again) before the next pull.
    check_consumer: bool,
    /// Ack subjects of written messages to acknowledge (again, when their
    /// acks were not confirmed).
    unacked: Vec<String>,
    /// Acks sent and not yet confirmed.
    sent: Option<Sent>,
    /// `--once`: end when nothing arrives within the wait.
    once: bool,
}

/// The acks of one batch, sent: the last asked for a confirmation.
struct Sent {
    /// The confirmation's subject.
    confirm: String,
    /// The ack subjects, to send again if no confirmation comes.
    replies: Vec<String>,
    /// The connection generation they were sent on.
    generation: u64,
    /// When to stop waiting for the confirmation.
    until: Instant,
}

/// What a message on the deliveries subscription was.
enum Delivery {
    /// A message of the stream, for the batch, and its ack subject.
    Message(Message, String),
    /// The pull request ended (no more messages until the next pull).
    Ended,
    /// The consumer or stream is gone: check them before pulling again.
    Gone(String),
    /// The server refused the pull request.
    Refused(Error),
    /// Nothing to act on (a heartbeat, a stray message).
    Nothing,
}

fn header<'a>(m: &'a nats::Message, name: &str) -> Option<&'a String> {
    let h = m.headers.as_ref()?;
    h.get(name).or_else(|| {
        h.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.iter().next())
    })
}

fn attribute(
    from: &Origin,
    m: &nats::Message,
    body: Option<&Map<String, Value>>,
) -> Option<String> {
    from.value(|h| header(m, h).filter(|v| !v.is_empty()).cloned(), body)
}

impl NatsSource {
    /// Wait for the connection, up to [`OUTAGE_WAIT`]; after a reconnect
    /// the open pull request is forgotten (the server may have lost it).
    fn wait_connected(&mut self) -> Result<(), Error> {
        let generation = self.client.wait_connected(Instant::now() + OUTAGE_WAIT)?;
        if generation != self.generation {
            self.generation = generation;
            self.pull_left = 0;
        }
        Ok(())
    }

    /// Ask for `max` messages, unless a pull request is still open. With
    /// `--once` the request expires after `wait`, so an empty answer says
    /// that nothing is there.
    fn pull(&mut self, max: usize, wait: Duration) -> Result<(), Error> {
        if self.pull_left > 0 && Instant::now() < self.pull_until {
            return Ok(());
        }
        let expires = if self.once {
            wait.max(Duration::from_millis(10))
        } else {
            PULL_EXPIRES
        };
        let req = json!({"batch": max, "expires": expires.as_nanos() as u64});
        self.client
            .nc
            .publish_request(
                &format!(
                    "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
                    self.cfg.stream, self.consumer.name
                ),
                &self.deliver_to,
                req.to_string(),
            )
            .map_err(|e| {
                Error::transient(format!("nats {}: pull request: {e}", self.client.shown))
            })?;
        self.pull_left = max;
        self.pull_until = Instant::now() + expires + Duration::from_secs(1);
        Ok(())
    }

    /// Classify one delivered message.
    fn delivery(&mut self, m: nats::Message) -> Delivery {
        if m.data.is_empty() {
            if let Some(status) = header(&m, "Status") {
                let why = header(&m, "Description").cloned().unwrap_or_default();
                return match status.as_str() {
                    // Heartbeat, flow control.
                    "100" => Delivery::Nothing,
                    // No messages / request expired.
                    "404" | "408" => Delivery::Ended,
                    // No responders: the consumer (or stream) is gone.
                    "503" => Delivery::Gone(format!(
                        "JetStream consumer {:?} of stream {:?} does not answer",
                        self.consumer.name, self.cfg.stream
                    )),
                    _ if why.contains("Deleted") => Delivery::Gone(format!(
                        "JetStream consumer {:?}: {status} {why}",
                        self.consumer.name
                    )),
                    // The consumer's limits on pull requests (max_batch,
                    // max_expires, ...) are below what the relay asks for.
                    _ if why.contains("MaxRequest") || status == "400" => {
                        Delivery::Refused(self.consumer.config_error(
                            "consumer",
                            format!(
                                "JetStream consumer {:?} refuses the relay's pull requests \
                                 ({status} {why}): lower batch_size or raise the consumer's limit",
                                self.consumer.name
                            ),
                        ))
                    }
                    // Exceeded MaxWaiting, a leadership change, ...
                    _ => Delivery::Refused(Error::transient(format!(
                        "nats {}: JetStream consumer {:?} refused a pull request: {status} {why}",
                        self.client.shown, self.consumer.name
                    ))),
                };
            }
        }
        let Some(reply) = m.reply.clone().filter(|r| r.starts_with("$JS.ACK.")) else {
            log::debug!(
                "ignoring a message without a JetStream ack subject on {}",
                m.subject
            );
            return Delivery::Nothing;
        };
        let Some(seq) = m.jetstream_message_info().map(|i| i.stream_seq) else {
            log::debug!("ignoring a message with an unreadable ack subject {reply}");
            return Delivery::Nothing;
        };
        self.pull_left = self.pull_left.saturating_sub(1);
        Delivery::Message(self.message(&m, seq), reply)
    }

    fn message(&self, m: &nats::Message, seq: u64) -> Message {
        let decoded = Body::from_bytes(&m.data);
        let error = decoded.problem.as_ref().map(|p| {
            let what = format!("nats stream {} seq {seq} ({})", self.cfg.stream, m.subject);
            dead_letter(match p {
                Problem::NotUtf8(e) => format!("{what}: body is not valid JSON (not UTF-8: {e})"),
                Problem::NotJson(e) => format!("{what}: body is not valid JSON ({e})"),
            })
        });
        let body = decoded.object();
        let event_id = header(m, "Nats-Msg-Id")
            .filter(|v| !v.is_empty())
            .cloned()
            .or_else(|| own_id(body?))
            .unwrap_or_else(|| format!("{}:{seq}", self.cfg.stream));
        let content_type = header(m, "content-type").map(String::as_str);
        let ce = CloudEvent::recognise(|h| header(m, h).cloned(), content_type, body);
        // By default `event_type` is the subject, the others the body's
        // field of their own name (`trace_id`: after a W3C `traceparent`
        // header).
        let [event_type, aggregate_id, source, trace_id] = self.cfg.origins.read(
            |o| attribute(o, m, body),
            || trace::traceparent(header(m, trace::TRACEPARENT).map(String::as_str)),
            |name| match name {
                "event_type" => Some(m.subject.clone()),
                _ => json_text(body?, name),
            },
        );
        let mut message = Message {
            event_id,
            event_type,
            aggregate_id,
            source,
            trace_id,
            payload: decoded.text,
            error,
        };
        if let Some(ce) = ce {
            let configured = self.cfg.origins.configured(&["source", "trace_id"]);
            ce.apply(&mut message, configured);
        }
        message
    }
}

impl Source for NatsSource {
    /// The message's ack subject.
    type Receipt = String;

    fn receive(
        &mut self,
        batch: &mut Batch<String>,
        max: usize,
        wait: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + wait;
        // `--once` ends on the server's word that nothing is there (the
        // pull request expired empty), not on a local timeout that a busy
        // machine can exceed.
        let give_up = if self.once {
            deadline + ONCE_SLACK
        } else {
            deadline
        };
        self.wait_connected()?;
        if self.check_consumer {
            self.consumer.ensure(&self.client)?;
            self.check_consumer = false;
        }
        let mut stop = None;
        let mut ended_empty = false;
        while batch.messages.len() < max {
            self.pull(max, wait)?;
            let timeout = if batch.messages.is_empty() {
                // Slices, to notice a reconnect or an expired request.
                give_up
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100))
            } else {
                GAP
            };
            match self.deliveries.next_timeout(timeout) {
                Ok(m) => match self.delivery(m) {
                    Delivery::Message(msg, reply) => {
                        batch.messages.push(msg);
                        batch.receipts.push(reply);
                    }
                    Delivery::Ended => {
                        self.pull_left = 0;
                        if batch.messages.is_empty() && self.once {
                            ended_empty = true;
                            break;
                        }
                    }
                    Delivery::Gone(why) => {
                        self.pull_left = 0;
                        self.check_consumer = true;
                        stop = Some(Error::transient(format!(
                            "nats {}: {why}",
                            self.client.shown
                        )));
                        break;
                    }
                    Delivery::Refused(e) => {
                        self.pull_left = 0;
                        stop = Some(e);
                        break;
                    }
                    Delivery::Nothing => {}
                },
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    let now = Instant::now();
                    if !batch.messages.is_empty()
                        || now >= give_up
                        || (!self.once && now >= deadline)
                    {
                        break;
                    }
                    self.wait_connected()?;
                }
                Err(e) => {
                    return Err(Error::transient(format!(
                        "nats {}: deliveries subscription: {e}",
                        self.client.shown
                    )))
                }
            }
        }
        match stop {
            // What was received is written all the same.
            Some(e) => return Err(e),
            // The next batch is delivered while this one is written.
            None if !batch.messages.is_empty() => self.pull(max, wait)?,
            None => {}
        }
        batch.end_of_input = self.once && batch.messages.is_empty();
        if batch.end_of_input {
            // `--once` ends with every ack confirmed.
            self.settle()?;
        }
        if batch.end_of_input && !ended_empty {
            log::warn!(
                "no answer to a pull request within {:?}; ending",
                wait + ONCE_SLACK
            );
        }
        Ok(())
    }

    fn ack(&mut self, receipts: Vec<String>) -> Result<(), Error> {
        self.unacked.extend(receipts);
        // The previous batch's confirmation has normally arrived meanwhile.
        self.settle()?;
        if self.unacked.is_empty() {
            return Ok(());
        }
        self.wait_connected()?;
        self.confirm_seq += 1;
        let confirm = format!("{}.{}", self.confirm_inbox, self.confirm_seq);
        let failed =
            |e: std::io::Error| Error::transient(format!("nats {}: ack: {e}", self.client.shown));
        let (last, rest) = self.unacked.split_last().expect("not empty");
        for reply in rest {
            self.client.nc.publish(reply, b"+ACK").map_err(failed)?;
        }
        self.client
            .nc
            .publish_request(last, &confirm, b"+ACK")
            .map_err(failed)?;
        self.sent = Some(Sent {
            confirm,
            replies: std::mem::take(&mut self.unacked),
            generation: self.generation,
            until: Instant::now() + CONFIRM_TIMEOUT,
        });
        Ok(())
    }
}

impl NatsSource {
    /// Wait for the confirmation of the acks sent last. Without it in time
    /// (a lost connection, acks refused) they are kept to be sent again
    /// with the next batch; were they lost, JetStream delivers the messages
    /// again after the ack wait, and the inbox absorbs the repeats.
    fn settle(&mut self) -> Result<(), Error> {
        let Some(sent) = self.sent.take() else {
            return Ok(());
        };
        loop {
            let failure = match self.confirms.next_timeout(Duration::from_millis(50)) {
                Ok(m) if m.subject == sent.confirm => return Ok(()),
                // The answer to an earlier attempt.
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    if self.client.link.generation.load(Ordering::SeqCst) == sent.generation
                        && Instant::now() < sent.until
                    {
                        continue;
                    }
                    format!(
                        "JetStream did not confirm the acks of {} messages",
                        sent.replies.len()
                    )
                }
                Err(e) => format!("ack confirmations: {e}"),
            };
            let mut replies = sent.replies;
            replies.append(&mut self.unacked);
            self.unacked = replies;
            return Err(Error::transient(format!(
                "nats {}: {failure}",
                self.client.shown
            )));
        }
    }
}

impl Drop for NatsSource {
    fn drop(&mut self) {
        if let Err(e) = self.settle() {
            log::warn!("{e}; JetStream delivers those messages again after the ack wait");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn key(v: Value) -> String {
        parse(keys(v)).unwrap_err().key
    }

    #[test]
    fn config_errors_name_the_key() {
        assert_eq!(key(json!({"stream": "S"})), "source.url");
        assert_eq!(key(json!({"url": "nats://x"})), "source.stream");
        assert_eq!(
            key(json!({"url": "nats://x", "stream": "a.b"})),
            "source.stream"
        );
        assert_eq!(
            key(json!({"url": "nats://x", "stream": "S", "consumer": "c d"})),
            "source.consumer"
        );
        assert_eq!(
            key(json!({"url": "nats://x", "stream": "S", "subject": "a..b"})),
            "source.subject"
        );
        assert_eq!(
            key(json!({"url": "nats://x", "stream": "S", "start": "middle"})),
            "source.start"
        );
        assert_eq!(
            key(json!({"url": "nats://x", "stream": "S", "ack_wait_ms": 10})),
            "source.ack_wait_ms"
        );
        assert_eq!(
            key(json!({"url": "nats://x", "stream": "S", "ackwait": 10})),
            "source.ackwait"
        );
        assert!(parse(keys(
            json!({"url": "nats://x", "stream": "S", "subject": "a.>",
            "start": "new", "ack_wait_ms": 5000, "event_type": {"header": "T"}})
        ))
        .is_ok());
    }
}
