//! The `rabbitmq` source: a RabbitMQ queue consumed into the inbox, each
//! message acknowledged only after the inbox transaction holding it
//! committed.
//!
//! Keys: [`KEYS`] (README.md and the man page show them). An inbox batch
//! holds at most half of `prefetch` (and at most `batch_size`), so the
//! broker keeps sending while a batch is written. The default `prefetch`,
//! [`DEFAULT_PREFETCH`], is two default batches: a smaller window cuts the
//! batches, and every batch is an inbox commit.
//!
//! **The queue.** Without `declare` the queue must exist, or the pipeline
//! stops with an error that says so. With `declare: true` the relay
//! declares it when it starts (durable, not exclusive, not auto-delete:
//! it keeps messages while the relay is away), and, when `exchange` is
//! set, declares that exchange (durable, `exchange_type`, default `topic`)
//! and binds the queue to it with `binding_key` (default `#`). Declaring
//! what exists with the same properties changes nothing, so a queue made
//! beforehand keeps the messages published before the relay's first start.
//! A queue that exists with other properties (e.g. a quorum queue) is a
//! clear error: leave `declare` off for it.
//!
//! **Acknowledgements.** A consumer thread owns the AMQP connection (the
//! consumer borrows its channel); the pipeline thread gets deliveries from
//! it and hands back acks. `ack` acknowledges with `multiple` up to the
//! last delivery tag received, after the inbox commit. When the inbox write
//! fails, nothing is acknowledged and nothing is requeued: the reverse loop
//! keeps the batch and writes it again once PostgreSQL is back, while the
//! broker keeps the messages reserved for this consumer (a nack with
//! requeue would have them delivered again, and the later ack of the kept
//! batch would name delivery tags the channel no longer holds). If the
//! relay stops or the connection drops, the broker requeues every
//! unacknowledged message and redelivers it; the inbox's `ON CONFLICT
//! (event_id) DO NOTHING` absorbs the repeats. The broker's
//! `consumer_timeout` (30 minutes by default) closes a channel that holds
//! a message unacknowledged longer than that: the source reconnects and the
//! messages come again.
//!
//! **Mapping.** The inbox `event_id` is the AMQP `message-id`, else the id
//! the body carries itself (our envelope's `dedup_key`, a CloudEvents
//! `id`; see `source::own_id`). The payload
//! is the body, which must be JSON. `event_type`, `aggregate_id`, `source`
//! and `trace_id` each come from `{"header": "<name>"}`, `{"field":
//! "<name>"}` (a top-level field of the JSON body) or a fixed string. A
//! header name that is an AMQP property (`type`, `correlation-id`,
//! `app-id`, `user-id`, `message-id`, `reply-to`, `content-type`,
//! `content-encoding`, `expiration`, `priority`, `timestamp`,
//! `delivery-mode`, `cluster-id`; `_` for `-` also works) reads that
//! property; any other name reads the message's headers table. Defaults:
//! `event_type` = the `type` property, `trace_id` = the W3C `traceparent`
//! header when it is a valid one (see [`crate::trace`]), else
//! `correlation-id`,
//! `source` = `app-id`, each else the header and then the body field of
//! the attribute's own name (`event_type`, ...); `aggregate_id` = the
//! header, else the body field `aggregate_id`.
//!
//! **Dead letters.** A body that is not JSON (or not UTF-8), or a message
//! without a `message-id` or an id in its body, is written to the inbox
//! as a dead letter (the raw text, the reason in `error`, shown in
//! `<inbox>_dlq`) and acknowledged like the rest: never dropped, never
//! blocking. A message without an id cannot be deduplicated; its
//! `event_id` is
//! `no-message-id:<hash>`, a 64-bit FNV-1a hash of its exchange, routing
//! key and body, so a redelivery lands on the same row (and identical
//! messages without an id are one dead letter).

use std::thread;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, AmqpValue, Channel, Connection, ConsumerMessage, ConsumerOptions, Delivery,
    FieldTable, QueueDeclareOptions,
};
use crossbeam_channel::{Receiver, Sender};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::broker::amqp::{self, AmqpUrl};
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::retry::Error;
use crate::source::decode::{
    dead_letter, fnv1a, json_text, Body, CloudEvent, Origin, Origins, Problem,
};
use crate::source::{feed, own_id, Batch, Feed, Message, Source, SourceSpec};
use crate::trace;

/// How long dropping the source waits for its connection to close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// A batch ends when no message follows the last one within this long.
const GAP: Duration = Duration::from_millis(5);
/// `prefetch` when not set: twice the default `batch_size` (5,000), so
/// that default batches can be full ones while the next streams in. With
/// 500 (the default before) every batch was at most 250 messages, each an
/// inbox commit of its own.
pub const DEFAULT_PREFETCH: u16 = 10_000;

/// The `rabbitmq` source's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitSourceConfig {
    url: String,
    queue: String,
    #[serde(default)]
    prefetch: Option<u16>,
    #[serde(default)]
    declare: bool,
    #[serde(default)]
    exchange: Option<String>,
    #[serde(default)]
    exchange_type: Option<String>,
    #[serde(default)]
    binding_key: Option<String>,
    /// `event_type`, `aggregate_id`, `source`, `trace_id`: taken out
    /// before the rest is parsed ([`Origins::take`]).
    #[serde(skip)]
    origins: Origins,
}

/// Where the attributes come from by default, and what their keys hold.
const FROM: &str = "`event_type`: the `type` property; `trace_id`: a valid W3C `traceparent` header (see \"Trace context\"), else `correlation-id`; `source`: `app-id`; each else the header and then the body field of the column's name. `aggregate_id`: the `aggregate_id` header, else the body field";
const WHERE: &str = r#"where each column comes from: `{"header": "name"}`, `{"field": "name"}` (a top-level field of the JSON body) or a fixed string. A header name that is an AMQP property (`type`, `correlation-id`, `app-id`, `user-id`, `message-id`, `reply-to`, `content-type`, `content-encoding`, `expiration`, `priority`, `timestamp`, `delivery-mode`, `cluster-id`) reads the property; any other name reads the message's headers table"#;

/// The source's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    KeySpec::new(
        "url",
        "string",
        Fallback::Required,
        "as for the `rabbitmq` sink: `amqp://` or `amqps://`, `${ENV:NAME}` is expanded",
    ),
    KeySpec::new(
        "queue",
        "string",
        Fallback::Required,
        "the queue to consume",
    ),
    KeySpec::new(
        "prefetch",
        "integer",
        Fallback::Value("10000"),
        "how many unacknowledged messages the broker sends ahead (1-65535). An inbox batch holds at most half of them (and at most `batch_size`), so the broker keeps sending while a batch is written; the default is twice the default `batch_size`",
    ),
    KeySpec::new(
        "declare",
        "boolean",
        Fallback::Value("false"),
        "`true`: declare the queue (durable, not exclusive, not auto-delete) when the pipeline starts, and with `exchange`, declare that exchange (durable) and bind the queue to it. `false`: the queue must exist, or the pipeline stops with an error that says so",
    ),
    KeySpec::new(
        "exchange",
        "string",
        Fallback::Text("no binding"),
        "with `declare`: the exchange to bind the queue to",
    ),
    KeySpec::new(
        "exchange_type",
        "string",
        Fallback::Value("topic"),
        "with `declare` and `exchange`: the exchange's type",
    ),
    KeySpec::new(
        "binding_key",
        "string",
        Fallback::Value("#"),
        "with `declare` and `exchange`: the binding key",
    ),
    Origin::key("event_type", FROM, WHERE),
    Origin::key("aggregate_id", FROM, WHERE),
    Origin::key("source", FROM, WHERE),
    Origin::key("trace_id", FROM, WHERE),
];

/// Parse the source's keys.
pub fn parse(mut keys: Map<String, Value>) -> Result<Box<dyn SourceSpec>, ConfigError> {
    let origins = Origins::take(&mut keys, "source")?;
    let mut cfg: RabbitSourceConfig = from_value("source", Value::Object(keys))?;
    cfg.origins = origins;
    AmqpUrl::check("source.url", &cfg.url)?;
    if cfg.queue.is_empty() || cfg.queue.len() > 255 {
        return Err(ConfigError::new(
            "source.queue",
            "must be a queue name of 1 to 255 bytes",
        ));
    }
    if cfg.prefetch == Some(0) {
        return Err(ConfigError::new("source.prefetch", "must be 1 to 65535"));
    }
    for (key, set) in [
        ("exchange", cfg.exchange.is_some()),
        ("exchange_type", cfg.exchange_type.is_some()),
        ("binding_key", cfg.binding_key.is_some()),
    ] {
        if set && !cfg.declare {
            return Err(ConfigError::new(
                format!("source.{key}"),
                "only applies when the relay declares the queue: set source.declare too",
            ));
        }
    }
    if (cfg.exchange_type.is_some() || cfg.binding_key.is_some()) && cfg.exchange.is_none() {
        return Err(ConfigError::new(
            "source.exchange",
            "missing: exchange_type and binding_key describe the exchange the queue is bound to",
        ));
    }
    match cfg.exchange.as_deref() {
        Some("") => {
            return Err(ConfigError::new(
                "source.exchange",
                "the default exchange (\"\") routes by queue name already: leave exchange out",
            ))
        }
        Some(x) if x.starts_with("amq.") => {
            return Err(ConfigError::new(
                "source.exchange",
                format!("exchange names starting with \"amq.\" are reserved ({x:?})"),
            ))
        }
        _ => {}
    }
    if let Some(t) = &cfg.exchange_type {
        amqp::check_exchange_type(t).map_err(|m| ConfigError::new("source.exchange_type", m))?;
    }
    Ok(Box::new(cfg))
}

impl SourceSpec for RabbitSourceConfig {
    fn open(&self, pipeline: &str, once: bool) -> Result<Box<dyn Feed>, Error> {
        let url = AmqpUrl::resolve(pipeline, "source.url", &self.url)?;
        let mut src = RabbitSource {
            cfg: self.clone(),
            pipeline: pipeline.to_string(),
            url,
            worker: None,
            generation: 0,
            once,
        };
        // Fail early on a wrong address, password or queue; a broker that
        // is down is retried by the caller.
        src.worker()?;
        log::info!(
            "consuming rabbitmq {} queue {:?} (prefetch {})",
            src.url.shown,
            self.queue,
            src.prefetch()
        );
        Ok(feed(src))
    }

    /// Connect, and check that the queue exists (a passive declare; one
    /// the source declares itself is not declared here).
    fn check(&self, pipeline: &str) -> Result<(), ConfigError> {
        let blame = |e| crate::keys::blame("source.url", e);
        let url = AmqpUrl::resolve(pipeline, "source.url", &self.url).map_err(blame)?;
        let mut conn = url
            .connect(&format!("pgtrickle-relay {pipeline} (check)"))
            .map_err(blame)?;
        if !self.declare {
            let channel = conn
                .open_channel(None)
                .map_err(|e| blame(amqp::error(&url.shown, &e)))?;
            if let Err(e) = channel.queue_declare_passive(self.queue.as_str()) {
                let why = match amqp::channel_code(&e) {
                    Some((404, _)) => {
                        "does not exist: declare it, or set source.declare to true".to_string()
                    }
                    Some((code, text)) => format!("cannot be used ({code} {text})"),
                    None => e.to_string(),
                };
                return Err(ConfigError::new(
                    "source.queue",
                    format!("queue {:?} on rabbitmq {} {why}", self.queue, url.shown),
                ));
            }
        }
        let _ = conn.close();
        Ok(())
    }
}

/// What the consumer thread hands over.
enum Incoming {
    /// A message.
    Delivery(Box<Delivery>),
    /// The connection or channel ended (the thread is gone).
    Ended(Error),
}

/// The consumer thread of one connection.
struct Worker {
    incoming: Receiver<Incoming>,
    /// Deliveries to acknowledge (with `multiple`); dropping it ends the
    /// thread, which closes the connection (the broker requeues whatever
    /// is unacknowledged).
    acks: Sender<Delivery>,
    /// Disconnected when the thread has closed the connection.
    done: Receiver<()>,
    generation: u64,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Let the thread send the last ack and close the connection (the
        // broker requeues what is unacknowledged), for a bounded time.
        let (unused, _) = crossbeam_channel::bounded(0);
        drop(std::mem::replace(&mut self.acks, unused));
        let _ = self.done.recv_timeout(CLOSE_WAIT);
    }
}

struct RabbitSource {
    cfg: RabbitSourceConfig,
    pipeline: String,
    url: AmqpUrl,
    worker: Option<Worker>,
    /// Bumped for every consumer thread.
    generation: u64,
    /// `--once`: end when no message arrives within the wait.
    once: bool,
}

/// An AMQP field value as text (None: not a scalar).
fn value_text(v: &AmqpValue) -> Option<String> {
    Some(match v {
        AmqpValue::LongString(s) => s.clone(),
        AmqpValue::Boolean(b) => b.to_string(),
        AmqpValue::ShortShortInt(i) => i.to_string(),
        AmqpValue::ShortShortUInt(i) => i.to_string(),
        AmqpValue::ShortInt(i) => i.to_string(),
        AmqpValue::ShortUInt(i) => i.to_string(),
        AmqpValue::LongInt(i) => i.to_string(),
        AmqpValue::LongUInt(i) => i.to_string(),
        AmqpValue::LongLongInt(i) => i.to_string(),
        AmqpValue::Float(f) => f.to_string(),
        AmqpValue::Double(f) => f.to_string(),
        AmqpValue::Timestamp(t) => t.to_string(),
        AmqpValue::ByteArray(b) => String::from_utf8_lossy(b).into_owned(),
        _ => return None,
    })
}

/// The AMQP property `name` (Some(None): a property that is not set; None:
/// not a property name).
fn property(p: &AmqpProperties, name: &str) -> Option<Option<String>> {
    let s = |v: &Option<String>| v.clone();
    Some(match name.replace('_', "-").as_str() {
        "type" => s(p.type_()),
        "correlation-id" => s(p.correlation_id()),
        "app-id" => s(p.app_id()),
        "user-id" => s(p.user_id()),
        "message-id" => s(p.message_id()),
        "reply-to" => s(p.reply_to()),
        "content-type" => s(p.content_type()),
        "content-encoding" => s(p.content_encoding()),
        "expiration" => s(p.expiration()),
        "cluster-id" => s(p.cluster_id()),
        "priority" => p.priority().map(|v| v.to_string()),
        "timestamp" => p.timestamp().map(|v| v.to_string()),
        "delivery-mode" => p.delivery_mode().map(|v| v.to_string()),
        _ => return None,
    })
}

/// Header `name`: a property of that name, else an entry of the headers table.
fn header(p: &AmqpProperties, name: &str) -> Option<String> {
    match property(p, name) {
        Some(v) => v,
        None => p.headers().as_ref()?.get(name).and_then(value_text),
    }
    .filter(|v| !v.is_empty())
}

/// The AMQP property an attribute comes from by default (`aggregate_id`:
/// none).
fn default_property(name: &str) -> Option<&'static str> {
    match name {
        "event_type" => Some("type"),
        "source" => Some("app-id"),
        "trace_id" => Some("correlation-id"),
        _ => None,
    }
}

/// Where an attribute comes from: configured, or the default chain
/// (`property`, then the header, then the body field of its own name).
fn attribute(
    origin: Option<&Origin>,
    property_default: Option<&str>,
    name: &str,
    p: &AmqpProperties,
    obj: Option<&Map<String, Value>>,
) -> Option<String> {
    match origin {
        Some(o) => o.value(|h| header(p, h), obj),
        None => property_default
            .and_then(|d| header(p, d))
            .or_else(|| {
                p.headers()
                    .as_ref()
                    .and_then(|t| t.get(name))
                    .and_then(value_text)
            })
            .or_else(|| json_text(obj?, name)),
    }
}

impl RabbitSource {
    fn prefetch(&self) -> u16 {
        self.cfg.prefetch.unwrap_or(DEFAULT_PREFETCH)
    }

    /// The consumer thread, started (connected, queue checked) if needed.
    fn worker(&mut self) -> Result<&Worker, Error> {
        if self.worker.is_none() {
            self.generation += 1;
            let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
            let (incoming_tx, incoming) = crossbeam_channel::unbounded();
            let (acks, acks_rx) = crossbeam_channel::unbounded();
            let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
            let setup = Setup {
                cfg: self.cfg.clone(),
                pipeline: self.pipeline.clone(),
                url: self.url.clone(),
                prefetch: self.prefetch(),
            };
            thread::Builder::new()
                .name(format!("rabbitmq {}", self.pipeline))
                .spawn(move || {
                    setup.run(ready_tx, incoming_tx, acks_rx);
                    drop(done_tx);
                })
                .map_err(|e| Error::transient(format!("starting the consumer thread: {e}")))?;
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(Error::transient(format!(
                        "rabbitmq {}: the consumer thread ended",
                        self.url.shown
                    )))
                }
            }
            self.worker = Some(Worker {
                incoming,
                acks,
                done,
                generation: self.generation,
            });
        }
        Ok(self.worker.as_ref().expect("just started"))
    }

    /// The error for a consumer thread that ended without saying why.
    fn ended(&self) -> Error {
        Error::transient(format!(
            "rabbitmq {}: the consumer thread ended",
            self.url.shown
        ))
    }

    /// The inbox message of a delivery.
    fn message(&self, d: &Delivery, body: Vec<u8>) -> Message {
        let p = &d.properties;
        let mut errors = Vec::new();
        let hash = fnv1a(
            &[d.exchange.as_bytes(), d.routing_key.as_bytes(), &body],
            true,
        );
        let body = Body::from_vec(body);
        match &body.problem {
            Some(Problem::NotJson(e)) => errors.push(format!("the body is not valid JSON ({e})")),
            Some(Problem::NotUtf8(_)) => errors.push("the body is not UTF-8 text".to_string()),
            None => {}
        }
        let own = || own_id(body.object()?).or_else(|| CloudEvent::binary(|h| header(p, h))?.id);
        let event_id = match p.message_id().as_deref().filter(|id| !id.is_empty()) {
            Some(id) => id.to_string(),
            None => match own() {
                Some(id) => id,
                None => {
                    errors.insert(
                        0,
                        "the message has no AMQP message-id property, so it cannot be \
                         deduplicated (publish with a message-id)"
                            .to_string(),
                    );
                    format!("no-message-id:{hash:016x}")
                }
            },
        };
        let error = if errors.is_empty() {
            None
        } else {
            Some(dead_letter(format!(
                "rabbitmq queue {} message {event_id}: {}",
                self.cfg.queue,
                errors.join("; ")
            )))
        };
        let obj = body.object();
        let ce = CloudEvent::recognise(|h| header(p, h), p.content_type().as_deref(), obj);
        // By default: a property, then the header, then the body field.
        let [event_type, aggregate_id, source, trace_id] = self.cfg.origins.read(
            |o| o.value(|h| header(p, h), obj),
            || trace::traceparent(header(p, trace::TRACEPARENT).as_deref()),
            |name| attribute(None, default_property(name), name, p, obj),
        );
        let mut message = Message {
            event_id,
            event_type,
            aggregate_id,
            source,
            trace_id,
            payload: body.text,
            error,
        };
        if let Some(ce) = ce {
            ce.apply(&mut message, self.cfg.origins.configured(&[]));
        }
        message
    }
}

impl Source for RabbitSource {
    /// The last delivery of a batch (body taken; acknowledged with
    /// `multiple`) and its consumer thread's generation.
    type Receipt = (u64, Box<Delivery>);

    fn receive(
        &mut self,
        batch: &mut Batch<(u64, Box<Delivery>)>,
        max: usize,
        wait: Duration,
    ) -> Result<(), Error> {
        // The broker sends at most `prefetch` messages ahead of the ack. A
        // batch holds at most half of them, so that the other half streams
        // in while the batch is written to the inbox.
        let max = max.min(usize::from(self.prefetch()).div_ceil(2)).max(1);
        let w = self.worker()?;
        let generation = w.generation;
        let incoming = w.incoming.clone();
        let mut next = match incoming.recv_timeout(wait) {
            Ok(i) => i,
            Err(e) if e.is_timeout() => {
                batch.end_of_input = self.once;
                return Ok(());
            }
            Err(_) => Incoming::Ended(self.ended()),
        };
        // After the first, take what follows closely, until the batch is
        // full, a gap of GAP, or `wait` is over.
        let until = Instant::now() + wait;
        let mut last: Box<Delivery>;
        loop {
            match next {
                Incoming::Delivery(mut d) => {
                    let body = std::mem::take(&mut d.body);
                    batch.messages.push(self.message(&d, body));
                    last = d;
                }
                Incoming::Ended(e) => {
                    // What this batch holds is written but not acknowledged
                    // (its channel is gone): it comes again on a new
                    // channel, and the inbox absorbs it.
                    self.worker = None;
                    return Err(e);
                }
            }
            if batch.messages.len() >= max {
                break;
            }
            let gap = GAP.min(until.saturating_duration_since(Instant::now()));
            next = match incoming.try_recv() {
                Ok(i) => i,
                Err(_) => match incoming.recv_timeout(gap) {
                    Ok(i) => i,
                    Err(e) if e.is_timeout() => break,
                    Err(_) => Incoming::Ended(self.ended()),
                },
            };
        }
        batch.receipts.push((generation, last));
        Ok(())
    }

    fn ack(&mut self, receipts: Vec<(u64, Box<Delivery>)>) -> Result<(), Error> {
        let Some((generation, d)) = receipts.into_iter().last() else {
            return Ok(());
        };
        match &self.worker {
            Some(w) if w.generation == generation => {
                if w.acks.send(*d).is_err() {
                    self.worker = None;
                    return Err(Error::transient(format!(
                        "rabbitmq {}: connection lost before the ack (the broker redelivers; \
                         the inbox absorbs the repeats)",
                        self.url.shown
                    )));
                }
            }
            _ => log::debug!(
                "not acknowledging deliveries of a closed channel: the broker redelivers them"
            ),
        }
        Ok(())
    }
}

/// What the consumer thread needs.
struct Setup {
    cfg: RabbitSourceConfig,
    pipeline: String,
    url: AmqpUrl,
    prefetch: u16,
}

/// How the consumer thread's loop ended.
enum End {
    /// The source was dropped.
    Dropped,
    /// An error to report.
    Failed(Error),
    /// The connection went away: its close tells why.
    Lost,
}

impl Setup {
    /// An error about a config key when the broker refused it, naming the
    /// pipeline, the key and `what`; anything else is the plain error.
    fn named(&self, key: &str, e: &amiquip::Error, what: String) -> Error {
        amqp::named(&self.pipeline, &self.url.shown, key, e, what)
    }

    /// Connect, set the prefetch, declare or check the queue.
    fn connect(&self) -> Result<(Connection, Channel), Error> {
        let mut conn = self
            .url
            .connect(&format!("pgtrickle-relay {}", self.pipeline))?;
        let fail = |e: amiquip::Error| amqp::error(&self.url.shown, &e);
        let channel = conn.open_channel(None).map_err(fail)?;
        channel.qos(0, self.prefetch, false).map_err(fail)?;
        let queue = &self.cfg.queue;
        if !self.cfg.declare {
            channel.queue_declare_passive(queue.as_str()).map_err(|e| {
                self.named(
                    "source.queue",
                    &e,
                    format!(
                        "queue {queue:?} does not exist: declare it, or set source.declare to true"
                    ),
                )
            })?;
            return Ok((conn, channel));
        }
        let opts = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel.queue_declare(queue.as_str(), opts).map_err(|e| {
            self.named(
                "source.queue",
                &e,
                format!(
                    "declaring queue {queue:?} (durable) failed; a queue that exists with other \
                     properties is used with source.declare false"
                ),
            )
        })?;
        if let Some(ex) = &self.cfg.exchange {
            let kind = self.cfg.exchange_type.as_deref().unwrap_or("topic");
            amqp::declare_exchange(&channel, kind, ex).map_err(|e| {
                self.named(
                    "source.exchange",
                    &e,
                    format!("declaring exchange {ex:?} (durable, {kind}) failed"),
                )
            })?;
            let key = self.cfg.binding_key.as_deref().unwrap_or("#");
            channel
                .queue_bind(queue.as_str(), ex.as_str(), key, FieldTable::new())
                .map_err(|e| {
                    self.named(
                        "source.binding_key",
                        &e,
                        format!("binding queue {queue:?} to exchange {ex:?} with {key:?} failed"),
                    )
                })?;
        }
        Ok((conn, channel))
    }

    /// The consumer thread: set up, report readiness, then hand deliveries
    /// over and acknowledge what comes back, until the source is dropped or
    /// the connection ends.
    fn run(
        self,
        ready: Sender<Result<(), Error>>,
        incoming: Sender<Incoming>,
        acks: Receiver<Delivery>,
    ) {
        let (conn, channel) = match self.connect() {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let consumer =
            match channel.basic_consume(self.cfg.queue.as_str(), ConsumerOptions::default()) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready.send(Err(self.named(
                        "source.queue",
                        &e,
                        format!("consuming queue {:?} failed", self.cfg.queue),
                    )));
                    return;
                }
            };
        if ready.send(Ok(())).is_err() {
            return;
        }
        let shown = &self.url.shown;
        let end = loop {
            crossbeam_channel::select! {
                recv(consumer.receiver()) -> m => match m {
                    Ok(ConsumerMessage::Delivery(d)) => {
                        if incoming.send(Incoming::Delivery(Box::new(d))).is_err() {
                            break End::Dropped;
                        }
                    }
                    Ok(ConsumerMessage::ServerClosedChannel(e))
                    | Ok(ConsumerMessage::ServerClosedConnection(e)) => {
                        break End::Failed(amqp::error(shown, &e));
                    }
                    Ok(ConsumerMessage::ServerCancelled) => {
                        break End::Failed(Error::transient(format!(
                            "rabbitmq {shown}: the broker cancelled the consumer of queue {:?} \
                             (was the queue deleted?)",
                            self.cfg.queue
                        )));
                    }
                    Ok(_) | Err(_) => break End::Lost,
                },
                recv(acks) -> d => match d {
                    Ok(d) => {
                        if let Err(e) = d.ack_multiple(&channel) {
                            break End::Failed(amqp::error(shown, &e));
                        }
                    }
                    Err(_) => break End::Dropped,
                },
            }
        };
        drop(consumer);
        drop(channel);
        let closed = conn.close();
        let error = match end {
            End::Dropped => return,
            End::Failed(e) => e,
            End::Lost => match closed {
                Err(e) => amqp::error(shown, &e),
                Ok(()) => Error::transient(format!("rabbitmq {shown}: the consumer ended")),
            },
        };
        let _ = incoming.send(Incoming::Ended(error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn config_errors_name_the_key() {
        let k = |v: Value| parse(keys(v)).unwrap_err().key;
        assert_eq!(k(json!({"queue": "q"})), "source.url");
        assert_eq!(k(json!({"url": "amqp://h"})), "source.queue");
        assert_eq!(k(json!({"url": "redis://h", "queue": "q"})), "source.url");
        assert_eq!(
            k(json!({"url": "amqp://h", "queue": "q", "prefetch": 0})),
            "source.prefetch"
        );
        assert_eq!(
            k(json!({"url": "amqp://h", "queue": "q", "prefetch": 70000})),
            "source.prefetch"
        );
        assert_eq!(
            k(json!({"url": "amqp://h", "queue": "q", "exchange": "x"})),
            "source.exchange"
        );
        assert_eq!(
            k(json!({"url": "amqp://h", "queue": "q", "declare": true, "binding_key": "#"})),
            "source.exchange"
        );
        assert_eq!(
            k(
                json!({"url": "amqp://h", "queue": "q", "declare": true, "exchange": "x",
                     "exchange_type": "tpoic"})
            ),
            "source.exchange_type"
        );
        assert_eq!(
            k(json!({"url": "amqp://h", "queue": "q", "event_type": 5})),
            "source.event_type"
        );
        assert!(parse(keys(
            json!({"url": "${ENV:MQ}", "queue": "q", "declare": true,
            "exchange": "x", "binding_key": "a.*", "event_type": {"header": "kind"},
            "source": "shop", "trace_id": {"field": "trace"}})
        ))
        .is_ok());
    }

    #[test]
    fn the_default_prefetch_is_the_documented_one() {
        let row = KEYS.iter().find(|k| k.name == "prefetch").unwrap();
        let Fallback::Value(shown) = row.default else {
            panic!("prefetch has a default value");
        };
        assert_eq!(shown, DEFAULT_PREFETCH.to_string());
    }

    #[test]
    fn attributes_come_from_properties_headers_or_fields() {
        let mut h = FieldTable::new();
        h.insert("tenant".into(), AmqpValue::LongString("t1".into()));
        h.insert("aggregate_id".into(), AmqpValue::LongLongInt(42));
        let p = AmqpProperties::default()
            .with_type_("order.placed".into())
            .with_correlation_id("c-9".into())
            .with_headers(h);
        let body = json!({"event_type": "ignored", "source": "from-body", "k": 7});
        let obj = body.as_object();
        assert_eq!(
            attribute(None, Some("type"), "event_type", &p, obj).as_deref(),
            Some("order.placed")
        );
        assert_eq!(
            attribute(None, Some("correlation-id"), "trace_id", &p, obj).as_deref(),
            Some("c-9")
        );
        assert_eq!(
            attribute(None, Some("app-id"), "source", &p, obj).as_deref(),
            Some("from-body")
        );
        assert_eq!(
            attribute(None, None, "aggregate_id", &p, obj).as_deref(),
            Some("42")
        );
        let tenant = Origin::Header {
            header: "tenant".into(),
        };
        assert_eq!(
            attribute(Some(&tenant), None, "source", &p, obj).as_deref(),
            Some("t1")
        );
        let corr = Origin::Header {
            header: "correlation_id".into(),
        };
        assert_eq!(
            attribute(Some(&corr), None, "x", &p, obj).as_deref(),
            Some("c-9")
        );
        let k = Origin::Field { field: "k".into() };
        assert_eq!(
            attribute(Some(&k), None, "x", &p, obj).as_deref(),
            Some("7")
        );
    }
}
