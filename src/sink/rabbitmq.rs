//! The `rabbitmq` sink: events published to a RabbitMQ exchange with
//! publisher confirms.
//!
//! Keys: [`KEYS`] (README.md and the man page show them). Queues and
//! bindings are the consumers' business.
//!
//! Each event is one message: the body is the row (JSON), delivery mode 2
//! (persistent), `message-id` = the dedup key (RabbitMQ does not
//! deduplicate: after a crash or a retried batch a message can arrive
//! twice, and consumers dedup by `message-id`), `content-type`
//! `application/json`, `app-id` `pgtrickle-relay`, and the headers
//! `pgtrickle-op`, `pgtrickle-outbox-id`, `pgtrickle-full-refresh`
//! (`true`/`false`), `pgtrickle-refresh-id`/`pgtrickle-headers` when
//! present, and `traceparent`/`tracestate` when the outbox headers carry a
//! valid W3C trace context (see [`crate::trace`]).
//!
//! The channel is in confirm mode; up to [`WINDOW`] messages wait for
//! their confirm at a time, and `publish` returns once the broker confirmed
//! every event of the batch (for a durable queue: written to disk).
//!
//! **Messages that cannot be delivered.** With `mandatory` (the default) a
//! message no queue is bound for comes back (`basic.return`, 312
//! NO_ROUTE) before its confirm. By default that fails the batch, which is
//! retried with backoff until a queue is bound (consumers rebinding their
//! queues, or queues recovering after a broker restart, must not cost
//! events); with `"on_unroutable": "dead_letter"` the event
//! is dead-lettered instead (set `"mandatory": false` to let the broker
//! drop such messages silently, e.g. for a fan-out nobody listens to yet).
//! A message over the broker's `max_message_size` (which counts the body)
//! makes RabbitMQ close the channel; the sink reads the limit from that
//! error, opens a new channel, dead-letters every event over the limit
//! without sending it, and publishes the rest. An event whose content
//! header (properties and headers, as encoded) does not fit in one frame
//! of [`amqp::FRAME_MAX`] bytes is dead-lettered without being sent (the
//! broker would close the connection). A routing key over 255 bytes is
//! dead-lettered too. A negative confirm (`basic.nack`, e.g. a queue full
//! with `overflow: reject-publish`), a lost connection or missing confirms
//! ([`CONFIRM_TIMEOUT`]) fail the batch, which the pipeline retries; a
//! missing exchange or refused access stops the pipeline with an error.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, AmqpValue, Channel, Confirm, Connection, ConnectionBlockedNotification,
    FieldTable, Publish, Return,
};
use crossbeam_channel::Receiver;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::broker::amqp::{self, AmqpUrl};
use crate::cloudevents::{self, CloudEvents, Mode};
use crate::event::{Event, Template, Vars};
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::retry::Error;
use crate::sink::{OnUnroutable, Rejected, Sink, SinkSpec};
use crate::trace::Context;

/// Messages waiting for their confirm at most. Larger than a default
/// batch (5,000 events): RabbitMQ confirms persistent messages after a
/// disk sync, and a batch sent whole needs one sync cycle, not two.
pub const WINDOW: usize = 16_384;
/// No confirm at all for this long: the batch fails (and is retried).
/// Kept below the relay's shutdown grace.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(4);
/// AMQP short strings (routing keys, message ids) hold at most this many bytes.
const SHORT_STRING: usize = 255;
/// The largest content header frame payload: a frame less its 8 bytes of
/// framing.
const HEADER_FRAME_MAX: usize = amqp::FRAME_MAX as usize - 8;
/// Every message's `content-type`.
const CONTENT_TYPE: &str = "application/json";
/// Every message's `app-id`.
const APP_ID: &str = "pgtrickle-relay";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RabbitKeys {
    url: String,
    exchange: String,
    #[serde(default)]
    exchange_type: Option<String>,
    #[serde(default)]
    routing_key: Option<String>,
    #[serde(default)]
    declare: bool,
    #[serde(default)]
    mandatory: Option<bool>,
    #[serde(default)]
    on_unroutable: OnUnroutable,
}

/// The `rabbitmq` sink's config.
#[derive(Debug, Clone)]
pub struct RabbitConfig {
    url: String,
    exchange: String,
    exchange_type: String,
    routing_key: Option<Template>,
    declare: bool,
    mandatory: bool,
    on_unroutable: OnUnroutable,
    /// `format: "cloudevents"`.
    cloudevents: Option<CloudEvents>,
}

/// The sink's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    KeySpec::new(
        "url",
        "string",
        Fallback::Required,
        "`amqp://[user:password@]host[:port][/vhost]`, or `amqps://` for TLS (checked against the system's CAs). The port defaults to 5672 (5671), user and password to `guest`, the vhost to `/` (write `%2f` for `/` explicitly); user, password and vhost are percent-decoded. URL parameters: `heartbeat` (seconds, default 30) and `connection_timeout` (ms, default 10000). `${ENV:NAME}` is replaced",
    ),
    KeySpec::new(
        "exchange",
        "string",
        Fallback::Required,
        r#"the exchange to publish to; `""` is the default exchange, which routes by queue name"#,
    ),
    KeySpec::new(
        "routing_key",
        "template",
        Fallback::Text("the event's `subject`"),
        "a template like `subject`",
    ),
    KeySpec::new(
        "declare",
        "boolean",
        Fallback::Value("false"),
        "`true`: declare the exchange (durable) when the pipeline starts. `false`: the exchange must exist, or the pipeline stops with an error that says so",
    ),
    KeySpec::new(
        "exchange_type",
        "string",
        Fallback::Value("topic"),
        "with `declare`: `topic`, `direct`, `fanout`, `headers`, or a plugin's `x-...` type",
    ),
    KeySpec::new(
        "mandatory",
        "boolean",
        Fallback::Value("true"),
        "`true`: a message no queue is bound for is returned by the broker (`312 NO_ROUTE`) and handled as `on_unroutable` says. `false`: the broker drops it silently",
    ),
    KeySpec::new(
        "on_unroutable",
        "string",
        Fallback::Value("retry"),
        "with `mandatory`, what a returned message means: `retry` (the batch fails and is retried with backoff until a queue is bound, as while consumers rebind their queues or queues recover after a broker restart; `/health` shows the error) or `dead_letter` (the event is dead-lettered and the batch goes on)",
    ),
];

/// Parse the sink's keys.
pub fn parse(mut keys: Map<String, Value>) -> Result<Box<dyn SinkSpec>, ConfigError> {
    let cloudevents = CloudEvents::take(&mut keys, true)?;
    let raw: RabbitKeys = from_value("sink", Value::Object(keys))?;
    AmqpUrl::check("sink.url", &raw.url)?;
    if raw.exchange.len() > SHORT_STRING {
        return Err(ConfigError::new("sink.exchange", "longer than 255 bytes"));
    }
    if raw.declare && raw.exchange.is_empty() {
        return Err(ConfigError::new(
            "sink.declare",
            "the default exchange (\"\") cannot be declared: name an exchange in sink.exchange",
        ));
    }
    if raw.declare && raw.exchange.starts_with("amq.") {
        return Err(ConfigError::new(
            "sink.declare",
            format!(
                "exchange names starting with \"amq.\" are reserved and cannot be declared ({:?})",
                raw.exchange
            ),
        ));
    }
    let exchange_type = match raw.exchange_type {
        None => "topic".to_string(),
        Some(_) if !raw.declare => {
            return Err(ConfigError::new(
                "sink.exchange_type",
                "only applies to an exchange the sink declares: set sink.declare too",
            ))
        }
        Some(t) => {
            amqp::check_exchange_type(&t).map_err(|m| ConfigError::new("sink.exchange_type", m))?;
            t
        }
    };
    let routing_key = match raw.routing_key {
        None => None,
        Some(t) => Some(Template::parse(&t).map_err(|m| ConfigError::new("sink.routing_key", m))?),
    };
    Ok(Box::new(RabbitConfig {
        url: raw.url,
        exchange: raw.exchange,
        exchange_type,
        routing_key,
        declare: raw.declare,
        mandatory: raw.mandatory.unwrap_or(true),
        on_unroutable: raw.on_unroutable,
        cloudevents,
    }))
}

impl SinkSpec for RabbitConfig {
    fn open(&self, pipeline: &str) -> Result<Box<dyn Sink>, Error> {
        let url = AmqpUrl::resolve(pipeline, "sink.url", &self.url)?;
        let mut sink = RabbitSink {
            cfg: self.clone(),
            pipeline: pipeline.to_string(),
            url,
            link: None,
            max_size: None,
        };
        sink.link()?;
        log::info!(
            "publishing to rabbitmq {} exchange {:?}",
            sink.url.shown,
            self.exchange
        );
        Ok(Box::new(sink))
    }

    /// Connect, and check that the exchange exists (a passive declare;
    /// one the sink declares itself is not declared here).
    fn check(&self, pipeline: &str) -> Result<(), ConfigError> {
        let blame = |e| crate::keys::blame("sink.url", e);
        let url = AmqpUrl::resolve(pipeline, "sink.url", &self.url).map_err(blame)?;
        let mut conn = url
            .connect(&format!("pgtrickle-relay {pipeline} (check)"))
            .map_err(blame)?;
        if !self.declare && !self.exchange.is_empty() {
            let channel = conn
                .open_channel(None)
                .map_err(|e| blame(amqp::error(&url.shown, &e)))?;
            if let Err(e) = channel.exchange_declare_passive(self.exchange.as_str()) {
                let why = match amqp::channel_code(&e) {
                    Some((404, _)) => {
                        "does not exist: declare it, or set sink.declare to true".to_string()
                    }
                    Some((code, text)) => format!("cannot be used ({code} {text})"),
                    None => e.to_string(),
                };
                return Err(ConfigError::new(
                    "sink.exchange",
                    format!(
                        "exchange {:?} on rabbitmq {} {why}",
                        self.exchange, url.shown
                    ),
                ));
            }
        }
        let _ = conn.close();
        Ok(())
    }
}

/// An open connection with its confirm-mode channel.
struct Link {
    // Dropped before the connection (fields drop in order).
    channel: Channel,
    confirms: Receiver<Confirm>,
    returns: Receiver<Return>,
    blocked: Receiver<ConnectionBlockedNotification>,
    /// Why the broker blocks publishing (a resource alarm), while it does.
    blocked_by: Option<String>,
    /// The delivery tag the next message on this channel gets.
    next_tag: u64,
    conn: Connection,
}

struct RabbitSink {
    cfg: RabbitConfig,
    pipeline: String,
    url: AmqpUrl,
    link: Option<Link>,
    /// The broker's `max_message_size`, once a message over it told us.
    max_size: Option<usize>,
}

/// Why an attempt did not finish.
enum Stop {
    /// The broker closed the channel for an event over `max_message_size`:
    /// open a new channel and publish what is left.
    Reopen,
    /// Give the error to the caller.
    Fail(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Fail(e)
    }
}

/// Progress of one batch.
struct Progress<'a> {
    events: &'a [Event],
    /// Event index of each delivery tag sent in this attempt, from `base`.
    sent: Vec<usize>,
    /// The first delivery tag of this attempt.
    base: u64,
    /// Tags below this are all confirmed.
    low: u64,
    /// Per event: confirmed (or rejected) for good.
    done: Vec<bool>,
    /// Per event: returned as unroutable (the reason).
    returned: Vec<Option<String>>,
    /// Per tag of this attempt (from `base`): confirmed.
    confirmed: Vec<bool>,
    outstanding: usize,
    rejected: Vec<Rejected>,
    last_progress: Instant,
    /// Event index by dedup key (message id), built at the first return.
    by_key: Option<HashMap<&'a str, usize>>,
    /// What a returned message means.
    unroutable: OnUnroutable,
}

impl<'a> Progress<'a> {
    fn new(events: &'a [Event], unroutable: OnUnroutable) -> Progress<'a> {
        Progress {
            events,
            sent: Vec::new(),
            base: 1,
            low: 1,
            done: vec![false; events.len()],
            returned: vec![None; events.len()],
            confirmed: Vec::new(),
            outstanding: 0,
            rejected: Vec::new(),
            last_progress: Instant::now(),
            by_key: None,
            unroutable,
        }
    }

    /// Start an attempt on a channel whose next delivery tag is `base`.
    fn restart(&mut self, base: u64) {
        // A return without its confirm (the channel closed in between)
        // says nothing about the message's next attempt.
        for (r, done) in self.returned.iter_mut().zip(&self.done) {
            if !done {
                *r = None;
            }
        }
        self.base = base;
        self.low = base;
        self.sent.clear();
        self.confirmed.clear();
        self.outstanding = 0;
        self.last_progress = Instant::now();
    }

    fn reject(&mut self, i: usize, reason: String) {
        self.done[i] = true;
        self.rejected.push(Rejected { index: i, reason });
    }

    /// Note a message that came back unroutable.
    fn returned(&mut self, r: Return) {
        let events = self.events;
        let by_key = self.by_key.get_or_insert_with(|| {
            events
                .iter()
                .enumerate()
                .map(|(i, e)| (e.dedup_key.as_str(), i))
                .collect()
        });
        let Some(&i) = r
            .properties
            .message_id()
            .as_deref()
            .and_then(|id| by_key.get(id))
        else {
            return; // not one of this batch's
        };
        self.returned[i] = Some(format!(
            "rabbitmq: returned as unroutable by exchange {:?} with routing key {:?}: {} {} \
             (no queue is bound for it; the sink publishes with mandatory set)",
            r.exchange, r.routing_key, r.reply_code, r.reply_text
        ));
    }

    /// Apply one confirm, after the returns that came before it (the
    /// broker sends a message's basic.return before its ack, and amiquip's
    /// I/O thread hands them over in that order). A nack is an error.
    fn confirm(
        &mut self,
        returns: &Receiver<Return>,
        c: Confirm,
        shown: &str,
    ) -> Result<(), Error> {
        while let Ok(r) = returns.try_recv() {
            self.returned(r);
        }
        let (payload, nack) = match c {
            Confirm::Ack(p) => (p, false),
            Confirm::Nack(p) => (p, true),
        };
        let tag = payload.delivery_tag;
        let first = if payload.multiple { self.low } else { tag };
        for t in first.max(self.base)..=tag {
            let k = (t - self.base) as usize;
            if k >= self.sent.len() || self.confirmed[k] {
                continue;
            }
            let i = self.sent[k];
            if nack {
                return Err(Error::transient(format!(
                    "rabbitmq {shown}: the broker refused (basic.nack) message {} (e.g. a queue \
                     full with overflow reject-publish)",
                    self.events[i].dedup_key
                )));
            }
            self.confirmed[k] = true;
            self.outstanding -= 1;
            match (self.returned[i].take(), self.unroutable) {
                (Some(reason), OnUnroutable::DeadLetter) => self.reject(i, reason),
                (Some(reason), OnUnroutable::Retry) => {
                    // Transient: queues come back after a broker restart,
                    // consumers rebind; the batch is tried again soon.
                    return Err(Error::transient(format!(
                        "{reason}: retrying until a queue is bound for it (or set \
                         sink.on_unroutable to \"dead_letter\")"
                    )));
                }
                (None, _) => self.done[i] = true,
            }
        }
        while let Some(true) = self.confirmed.get((self.low - self.base) as usize) {
            self.low += 1;
        }
        self.last_progress = Instant::now();
        Ok(())
    }
}

/// The size limit in RabbitMQ's "message size N is larger than configured
/// max size M" channel error.
fn size_limit(message: &str) -> Option<usize> {
    let rest = message.split("larger than configured max size ").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The payload of a message's content header frame as encoded (AMQP
/// 0-9-1: class id, weight, body size and property flags, then the
/// properties the sink sets: content-type, headers, delivery mode,
/// message-id, app-id).
fn header_frame_bytes(message_id: &str, content_type: &str, headers: &FieldTable) -> usize {
    let table: usize = headers
        .iter()
        .map(|(name, value)| {
            let value = match value {
                AmqpValue::LongString(s) => 4 + s.len(),
                // 8 bytes or less for every other value the sink sets.
                _ => 8,
            };
            1 + name.len() + 1 + value
        })
        .sum();
    2 + 2
        + 8
        + 2
        + (1 + content_type.len())
        + (4 + table)
        + 1
        + (1 + message_id.len())
        + (1 + APP_ID.len())
}

/// `e` as a CloudEvent (the AMQP protocol binding): the body, the content
/// type and the headers to add. Structured: the body is the event;
/// binary: the body is the row and the attributes are `cloudEvents:*`
/// headers (application properties). `key` (the rendered routing key,
/// when the config sets one) is the `partitionkey`.
fn cloud_event<'a>(
    ce: &CloudEvents,
    e: &'a Event,
    key: Option<&str>,
    buf: &'a mut Vec<u8>,
) -> (&'a [u8], &'static str, Vec<(String, String)>) {
    match ce.mode {
        Mode::Structured => {
            buf.clear();
            ce.structured(e, key, buf);
            (buf, cloudevents::STRUCTURED, Vec::new())
        }
        Mode::Binary => (
            e.payload.get().as_bytes(),
            cloudevents::DATA_CONTENT_TYPE,
            ce.headers(e, key, "cloudEvents:", false),
        ),
    }
}

/// The message headers of an event.
fn headers(e: &Event) -> FieldTable {
    let text = |s: &str| AmqpValue::LongString(s.to_string());
    let mut h = FieldTable::new();
    h.insert("pgtrickle-op".into(), text(e.op.as_str()));
    h.insert(
        "pgtrickle-outbox-id".into(),
        AmqpValue::LongLongInt(e.outbox_id),
    );
    h.insert(
        "pgtrickle-full-refresh".into(),
        text(if e.is_full_refresh { "true" } else { "false" }),
    );
    if let Some(r) = &e.refresh_id {
        h.insert("pgtrickle-refresh-id".into(), text(r));
    }
    if let Some(x) = &e.headers {
        h.insert("pgtrickle-headers".into(), text(x.get()));
    }
    if let Some(t) = Context::of(e.headers.as_deref()) {
        for (name, value) in t.headers() {
            h.insert(name.into(), text(value));
        }
    }
    h
}

impl RabbitSink {
    /// The open link, connecting (and declaring the exchange) first if needed.
    fn link(&mut self) -> Result<&mut Link, Error> {
        if self.link.is_none() {
            let conn = self
                .url
                .connect(&format!("pgtrickle-relay {}", self.pipeline))?;
            self.link = Some(self.channel(conn, true)?);
        }
        Ok(self.link.as_mut().expect("just connected"))
    }

    /// A confirm-mode channel on `conn`; `check` declares the exchange or
    /// checks that it exists.
    fn channel(&self, mut conn: Connection, check: bool) -> Result<Link, Error> {
        let fail = |e: amiquip::Error| amqp::error(&self.url.shown, &e);
        let blocked = conn.listen_for_connection_blocked().map_err(fail)?;
        let channel = conn.open_channel(None).map_err(fail)?;
        if check {
            self.check_exchange(&channel)?;
        }
        let confirms = channel.listen_for_publisher_confirms().map_err(fail)?;
        let returns = channel.listen_for_returns().map_err(fail)?;
        channel.enable_publisher_confirms().map_err(fail)?;
        Ok(Link {
            channel,
            confirms,
            returns,
            blocked,
            blocked_by: None,
            next_tag: 1,
            conn,
        })
    }

    /// Declare the exchange, or check that it exists.
    fn check_exchange(&self, channel: &Channel) -> Result<(), Error> {
        let ex = &self.cfg.exchange;
        if self.cfg.declare {
            amqp::declare_exchange(channel, &self.cfg.exchange_type, ex).map_err(|e| {
                self.named(
                    "sink.exchange",
                    &e,
                    format!(
                        "declaring exchange {ex:?} (durable, {}) failed",
                        self.cfg.exchange_type
                    ),
                )
            })?;
        } else if !ex.is_empty() {
            channel.exchange_declare_passive(ex.as_str()).map_err(|e| {
                self.named(
                    "sink.exchange",
                    &e,
                    format!(
                        "exchange {ex:?} does not exist: declare it, or set sink.declare to true"
                    ),
                )
            })?;
        }
        Ok(())
    }

    /// An error about a config key: a refusal by the broker names the
    /// pipeline, the key and `what`; anything else is the plain error.
    fn named(&self, key: &str, e: &amiquip::Error, what: String) -> Error {
        amqp::named(&self.pipeline, &self.url.shown, key, e, what)
    }

    /// The channel or connection ended with `e` (None: find out why).
    /// Confirms that arrived before the end still count. Reopen only when
    /// the broker closed the channel for a message over a size limit that
    /// is new to us.
    fn stop(&mut self, p: &mut Progress, e: Option<amiquip::Error>) -> Stop {
        let Some(link) = self.link.take() else {
            return Stop::Fail(Error::transient("rabbitmq: not connected"));
        };
        let shown = self.url.shown.clone();
        for c in link.confirms.try_iter() {
            if let Err(e) = p.confirm(&link.returns, c, &shown) {
                return Stop::Fail(e);
            }
        }
        // Any synchronous call on a closed channel returns the reason.
        let e = e.unwrap_or_else(|| match link.channel.qos(0, 0, false) {
            Ok(()) => amiquip::Error::EventLoopDropped,
            Err(e) => e,
        });
        match amqp::channel_code(&e) {
            Some((406, text)) if size_limit(text).is_some_and(|m| self.max_size != Some(m)) => {
                let max = size_limit(text).expect("checked");
                log::warn!(
                    "rabbitmq {shown}: the broker's max_message_size is {max} bytes; larger \
                     events are dead-lettered"
                );
                self.max_size = Some(max);
                // Only the channel is closed: open another one.
                let Link { channel, conn, .. } = link;
                drop(channel);
                match self.channel(conn, false) {
                    Ok(l) => {
                        self.link = Some(l);
                        Stop::Reopen
                    }
                    Err(e) => Stop::Fail(e),
                }
            }
            Some((404, _)) => Stop::Fail(self.named(
                "sink.exchange",
                &e,
                format!("exchange {:?} does not exist (any more)", self.cfg.exchange),
            )),
            _ => {
                // Closing what is left of the connection tells why it ended.
                let e = match (e, link.conn.close()) {
                    (amiquip::Error::EventLoopDropped, Err(why)) => why,
                    (e, _) => e,
                };
                Stop::Fail(amqp::error(&shown, &e))
            }
        }
    }

    fn routing_key(&self, e: &Event) -> String {
        match &self.cfg.routing_key {
            None => e.subject.clone(),
            Some(t) => t.render(&Vars::of(e), e.op),
        }
    }

    /// Drop the link without waiting for the broker: closing waits for its
    /// answer, which a broker that stopped answering never sends.
    fn abandon(&mut self) {
        if let Some(link) = self.link.take() {
            std::thread::spawn(move || drop(link));
        }
    }

    /// One attempt to publish the events not yet done and collect every
    /// confirm.
    fn attempt(&mut self, p: &mut Progress) -> Result<(), Stop> {
        let base = self.link()?.next_tag;
        p.restart(base);
        let events = p.events;
        let mut ce_body = Vec::new();
        for (i, e) in events.iter().enumerate() {
            if p.done[i] {
                continue;
            }
            let (body, content_type, ce_headers) = match &self.cfg.cloudevents {
                Some(ce) => {
                    let key = self.cfg.routing_key.as_ref().map(|_| self.routing_key(e));
                    cloud_event(ce, e, key.as_deref(), &mut ce_body)
                }
                None => (e.payload.get().as_bytes(), CONTENT_TYPE, Vec::new()),
            };
            if let Some(max) = self.max_size.filter(|m| body.len() > *m) {
                p.reject(
                    i,
                    format!(
                        "rabbitmq: message of {} bytes is over the broker's max_message_size \
                         ({max} bytes)",
                        body.len()
                    ),
                );
                continue;
            }
            let routing_key = self.routing_key(e);
            if routing_key.len() > SHORT_STRING {
                p.reject(
                    i,
                    format!(
                        "rabbitmq: routing key of {} bytes is over AMQP's limit of 255",
                        routing_key.len()
                    ),
                );
                continue;
            }
            let mut headers = headers(e);
            for (k, v) in ce_headers {
                headers.insert(k, AmqpValue::LongString(v));
            }
            let header_frame = header_frame_bytes(&e.dedup_key, content_type, &headers);
            if header_frame > HEADER_FRAME_MAX {
                p.reject(
                    i,
                    format!(
                        "rabbitmq: the message's content header (properties and headers) is \
                         {header_frame} bytes, over one frame of frame_max {} bytes",
                        amqp::FRAME_MAX
                    ),
                );
                continue;
            }
            while p.outstanding >= WINDOW {
                self.wait_confirm(p)?;
            }
            let properties = AmqpProperties::default()
                .with_delivery_mode(2)
                .with_message_id(e.dedup_key.clone())
                .with_content_type(content_type.into())
                .with_app_id(APP_ID.into())
                .with_headers(headers);
            let publish = Publish {
                body,
                routing_key,
                mandatory: self.cfg.mandatory,
                immediate: false,
                properties,
            };
            let link = self.link.as_mut().expect("connected above");
            if let Err(err) = link
                .channel
                .basic_publish(self.cfg.exchange.as_str(), publish)
            {
                return Err(self.stop(p, Some(err)));
            }
            link.next_tag += 1;
            p.sent.push(i);
            p.confirmed.push(false);
            p.outstanding += 1;
            // Take the confirms that are already here, without waiting.
            while let Ok(c) = link.confirms.try_recv() {
                if let Err(e) = p.confirm(&link.returns, c, &self.url.shown) {
                    self.link = None;
                    return Err(Stop::Fail(e));
                }
            }
        }
        while p.outstanding > 0 {
            self.wait_confirm(p)?;
        }
        Ok(())
    }

    /// Wait for the next confirm.
    fn wait_confirm(&mut self, p: &mut Progress) -> Result<(), Stop> {
        loop {
            let link = self
                .link
                .as_mut()
                .ok_or_else(|| Stop::Fail(Error::transient("rabbitmq: connection lost")))?;
            while let Ok(note) = link.blocked.try_recv() {
                link.blocked_by = match note {
                    ConnectionBlockedNotification::Blocked(why) => Some(why),
                    ConnectionBlockedNotification::Unblocked => None,
                };
            }
            if p.last_progress.elapsed() > CONFIRM_TIMEOUT {
                let why = match &link.blocked_by {
                    Some(b) => format!(" (the broker blocks publishers: {b})"),
                    None => String::new(),
                };
                let msg = format!(
                    "rabbitmq {}: {} confirms missing after {CONFIRM_TIMEOUT:?}{why}",
                    self.url.shown, p.outstanding
                );
                self.abandon();
                return Err(Stop::Fail(Error::transient(msg)));
            }
            match link.confirms.recv_timeout(Duration::from_millis(100)) {
                Ok(c) => {
                    return match p.confirm(&link.returns, c, &self.url.shown) {
                        Ok(()) => Ok(()),
                        Err(e) => {
                            self.link = None;
                            Err(Stop::Fail(e))
                        }
                    }
                }
                Err(e) if e.is_timeout() => continue,
                Err(_) => return Err(self.stop(p, None)),
            }
        }
    }
}

impl Sink for RabbitSink {
    fn publish(&mut self, events: &[Event]) -> Result<Vec<Rejected>, Error> {
        let mut p = Progress::new(events, self.cfg.on_unroutable);
        // The broker closes the channel for an oversized message: reopened
        // once per limit learned, a few times at most.
        for _ in 0..4 {
            match self.attempt(&mut p) {
                Ok(()) => {
                    p.rejected.sort_by_key(|r| r.index);
                    return Ok(p.rejected);
                }
                Err(Stop::Reopen) => continue,
                Err(Stop::Fail(e)) => {
                    self.link = None;
                    return Err(e);
                }
            }
        }
        self.link = None;
        Err(Error::transient(format!(
            "rabbitmq {}: the broker keeps closing the channel",
            self.url.shown
        )))
    }

    fn unroutable(&self, e: &Event) -> Option<String> {
        let ce = || self.cfg.cloudevents.as_ref()?.missing(e);
        let key = self.cfg.routing_key.as_ref();
        key.and_then(|k| k.missing(&Vars::of(e))).or_else(ce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_limit_from_the_broker_error() {
        assert_eq!(
            size_limit(
                "PRECONDITION_FAILED - message size 70000 is larger than configured max size 65536"
            ),
            Some(65536)
        );
        assert_eq!(
            size_limit("PRECONDITION_FAILED - unknown delivery tag 3"),
            None
        );
    }

    #[test]
    fn the_content_header_is_measured_as_encoded() {
        // RabbitMQ refused this message's header frame as
        // {frame_too_large,200254,131064}.
        let e = Event {
            dedup_key: "outbox_orders:4:0".into(),
            subject: "pgtrickle.orders.insert".into(),
            op: crate::event::Op::Insert,
            payload: serde_json::value::RawValue::from_string("{\"n\": 99}".into()).unwrap(),
            is_full_refresh: false,
            outbox_id: 4,
            refresh_id: Some("0".repeat(36)),
            headers: Some(
                serde_json::value::RawValue::from_string(format!(
                    "{{\"trace\": \"{}\"}}",
                    "t".repeat(200_000)
                ))
                .unwrap(),
            ),
            stream_table: "orders".into(),
            created_at: None,
        };
        let h = headers(&e);
        assert_eq!(header_frame_bytes(&e.dedup_key, CONTENT_TYPE, &h), 200_254);
        let structured = header_frame_bytes(&e.dedup_key, cloudevents::STRUCTURED, &h);
        assert_eq!(
            structured - 200_254,
            cloudevents::STRUCTURED.len() - CONTENT_TYPE.len()
        );
    }

    #[test]
    fn config_errors_name_the_key() {
        let p = |v: Value| parse(v.as_object().unwrap().clone()).unwrap_err().key;
        assert_eq!(p(json!({"exchange": "x"})), "sink.url");
        assert_eq!(p(json!({"url": "amqp://h"})), "sink.exchange");
        assert_eq!(p(json!({"url": "http://h", "exchange": "x"})), "sink.url");
        assert_eq!(
            p(json!({"url": "amqp://h", "exchange": "", "declare": true})),
            "sink.declare"
        );
        assert_eq!(
            p(json!({"url": "amqp://h", "exchange": "x", "exchange_type": "topic"})),
            "sink.exchange_type"
        );
        assert_eq!(
            p(
                json!({"url": "amqp://h", "exchange": "x", "declare": true, "exchange_type": "tpic"})
            ),
            "sink.exchange_type"
        );
        assert_eq!(
            p(json!({"url": "amqp://h", "exchange": "x", "routing_key": "{nope}"})),
            "sink.routing_key"
        );
        assert_eq!(
            p(json!({"url": "amqp://h", "exchange": "x", "mandatory": "yes"})),
            "sink.mandatory"
        );
        assert_eq!(
            p(json!({"url": "amqp://h", "exchange": "x", "queue": "q"})),
            "sink.queue"
        );
        assert_eq!(
            p(json!({"url": "amqp://h", "exchange": "x", "on_unroutable": "drop"})),
            "sink.on_unroutable"
        );
        assert!(parse(
            json!({"url": "${ENV:MQ}", "exchange": "x", "declare": true, "exchange_type": "fanout",
                   "routing_key": "pg.{stream_table}.{op}", "mandatory": false})
            .as_object()
            .unwrap()
            .clone()
        )
        .is_ok());
    }
}
