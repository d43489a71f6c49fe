//! The `kafka` sink: events produced to Kafka topics by an idempotent
//! librdkafka producer (`BaseProducer`, no async runtime).
//!
//! Keys: [`KEYS`] (README.md and the man page show them); `brokers` and
//! `properties` are checked by the shared Kafka module. The relay sets
//! `enable.idempotence=true` and `acks=all`, which a config may repeat but
//! not change, and refuses `transactional.id`. Its defaults, which a config
//! may change: `linger.ms=1`, `message.timeout.ms=30000`,
//! `reconnect.backoff.max.ms=1000` (a broker that comes back is used again
//! within a second).
//!
//! Each record: key = the `key` template rendered (per-key ordering: e.g.
//! `{payload.order_id}` puts one aggregate's events on one partition, in
//! order), by default the event's dedup key
//! (`<outbox table>:<outbox id>:<row index>`); value = the row as JSON;
//! headers `Pgtrickle-Dedup-Key`, `Pgtrickle-Op` (`insert`/`delete`), `Pgtrickle-Full-Refresh`
//! (`true`/`false`), `Pgtrickle-Outbox-Id`, `Pgtrickle-Subject` (the
//! rendered `subject`), `Pgtrickle-Refresh-Id` / `Pgtrickle-Headers`
//! when present, and `traceparent` / `tracestate` when the outbox headers
//! carry a valid W3C trace context (see [`crate::trace`]). The default partitioner hashes the key, so the events of
//! one outbox spread over the topic's partitions, each in order.
//!
//! A batch counts as delivered once every record's delivery report says
//! the broker stored it (all in-sync replicas); only then does the offset
//! move. Kafka cannot drop a replay of the same key across producer
//! sessions, so a relay that restarts before its commit writes those
//! events again (at-least-once; consumers dedup on the key, as the `kafka`
//! source does). A record the producer or broker refuses for what it is
//! (larger than `message.max.bytes`, counted by librdkafka with key, value
//! and headers; `INVALID_RECORD`; an invalid topic name) is dead-lettered. A
//! broker refuses a whole produce batch for one bad record (or a batch
//! over the topic's size limit): when it refused several records at once,
//! each is sent again on its own, and only those refused alone are
//! dead-lettered (the others then follow later events of their
//! partition). A missing topic, refused authorization, a message format
//! that cannot hold headers or a policy violation fails the batch
//! (retried slowly); anything else (broker away, timeouts, a corrupt
//! transfer) is retried.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use serde::Deserialize;
use serde_json::{Map, Value as Json};

use crate::broker::kafka::{client_error, log_line, Brokers, ClientKeys, Property, Reserved};
use crate::cloudevents::{self, CloudEvents, Mode};
use crate::event::{Event, Op, Template, Vars};
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::retry::Error;
use crate::sink::{Rejected, Sink, SinkSpec};
use crate::trace::Context;

/// The topic when the config names none.
const DEFAULT_TOPIC: &str = "pgtrickle.{stream_table}";
/// How long delivery reports may take beyond `message.timeout.ms`.
const REPORT_GRACE: Duration = Duration::from_secs(5);
/// The relay's `message.timeout.ms` unless the config sets one.
const MESSAGE_TIMEOUT_MS: u64 = 30_000;

/// Properties the relay sets itself.
const RESERVED: &[Reserved] = &[
    Reserved {
        name: "enable.idempotence",
        allowed: &["true"],
        why: "the idempotent producer keeps retried records in order and unduplicated",
    },
    Reserved {
        name: "acks",
        allowed: &["all", "-1"],
        why: "a record counts as delivered once all in-sync replicas have it",
    },
    Reserved {
        name: "request.required.acks",
        allowed: &["all", "-1"],
        why: "a record counts as delivered once all in-sync replicas have it",
    },
    Reserved {
        name: "transactional.id",
        allowed: &[],
        why: "the sink does not use transactions (dedup keys are record keys)",
    },
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KafkaKeys {
    brokers: Brokers,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    properties: Option<BTreeMap<String, Property>>,
}

/// The `kafka` sink's config.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    client: ClientKeys,
    topic: Template,
    /// The record key template (none: the dedup key).
    key: Option<Template>,
    /// `message.timeout.ms` in effect (bounds the wait for reports).
    message_timeout: Duration,
    /// `format: "cloudevents"`.
    cloudevents: Option<CloudEvents>,
}

/// Whether `t` can be a Kafka topic name.
fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The sink's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    crate::broker::kafka::BROKERS_KEY,
    KeySpec::new(
        "topic",
        "template",
        Fallback::Value(DEFAULT_TOPIC),
        "the topic, a template like `subject`. The topic must exist, unless the brokers create topics on first use",
    ),
    KeySpec::new(
        "key",
        "template",
        Fallback::Text("the event's dedup key (which spreads one outbox's events over all partitions)"),
        "the record key, a template like `subject`: per-key ordering, e.g. `{payload.order_id}` puts each order's events on one partition, in order",
    ),
    KeySpec::new(
        "properties",
        "object",
        Fallback::Unset,
        "librdkafka settings, an object of name → string, number or boolean: SASL/SSL (`security.protocol`, `sasl.mechanisms`, `sasl.username`, `sasl.password`, `ssl.ca.location`, ...), `compression.type`, batching. Values may use `${ENV:NAME}` and `${CREDENTIAL:NAME}` and are never logged. Unknown names and bad values are refused when the pipeline loads, naming `sink.properties.<name>`. `enable.idempotence=true` and `acks=all` are set by the relay (repeating them is allowed, changing them is refused), as are `bootstrap.servers` (use `brokers`) and `transactional.id` (refused). The relay's defaults, which you may change: `linger.ms=1`, `message.timeout.ms=30000`, `reconnect.backoff.max.ms=1000`",
    ),
];

/// Parse the sink's keys.
pub fn parse(mut keys: Map<String, Json>) -> Result<Box<dyn SinkSpec>, ConfigError> {
    let cloudevents = CloudEvents::take(&mut keys, true)?;
    let raw: KafkaKeys = from_value("sink", Json::Object(keys))?;
    let topic = raw.topic.unwrap_or_else(|| DEFAULT_TOPIC.to_string());
    let template = Template::parse(&topic).map_err(|m| ConfigError::new("sink.topic", m))?;
    let sample = template.sample(&Vars::bare("t", 1, "r"), Op::Insert);
    if !valid_topic(&sample) {
        return Err(ConfigError::new(
            "sink.topic",
            format!(
                "{topic:?} is not a Kafka topic name (letters, digits, '.', '_' and '-', \
                 at most 249)"
            ),
        ));
    }
    let message_timeout = match raw
        .properties
        .as_ref()
        .and_then(|p| p.get("message.timeout.ms"))
    {
        Some(Property::Number(n)) => n.as_u64(),
        Some(Property::Text(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|ms| *ms > 0)
    .unwrap_or(MESSAGE_TIMEOUT_MS);
    let key = match &raw.key {
        Some(k) => Some(Template::parse(k).map_err(|m| ConfigError::new("sink.key", m))?),
        None => None,
    };
    let client = ClientKeys::parse("sink", raw.brokers, raw.properties, RESERVED)?;
    Ok(Box::new(KafkaConfig {
        client,
        topic: template,
        key,
        message_timeout: Duration::from_millis(message_timeout),
        cloudevents,
    }))
}

impl SinkSpec for KafkaConfig {
    fn open(&self, pipeline: &str) -> Result<Box<dyn Sink>, Error> {
        let timeout = self.message_timeout.as_millis().to_string();
        let cfg = self.client.client_config(
            pipeline,
            &[
                ("linger.ms", "1"),
                ("reconnect.backoff.max.ms", "1000"),
                ("message.timeout.ms", &timeout),
            ],
            &[("enable.idempotence", "true"), ("acks", "all")],
        )?;
        let context = Reports {
            pipeline: pipeline.to_string(),
            state: Mutex::new(Delivered::default()),
        };
        let producer: BaseProducer<Reports> = cfg.create_with_context(context).map_err(|e| {
            Error::permanent(format!(
                "pipeline {pipeline:?}: sink.properties: creating the Kafka producer: {e}"
            ))
        })?;
        Ok(Box::new(KafkaSink {
            producer,
            topic: self.topic.clone(),
            key: self.key.clone(),
            cloudevents: self.cloudevents.clone(),
            shown: self.client.shown().to_string(),
            wait: self.message_timeout + REPORT_GRACE,
            generation: 0,
        }))
    }

    /// The brokers answer a metadata request, and a fixed topic (one the
    /// template renders alike for every event) is among their topics.
    fn check(&self, pipeline: &str) -> Result<(), ConfigError> {
        let topics = self.client.topics(pipeline)?;
        let shown = self.client.shown();
        let render = |v: &str, op| self.topic.render(&Vars::bare(v, v.len() as i64, v), op);
        let topic = render("a", Op::Insert);
        let fixed = !self.topic.has_fields() && topic == render("bb", Op::Delete);
        if fixed && !topics.contains(&topic) {
            return Err(ConfigError::new(
                "sink.topic",
                format!("topic {topic:?} does not exist on kafka {shown}"),
            ));
        }
        Ok(())
    }
}

/// A delivery failure: librdkafka's code and text.
type Failure = (RDKafkaErrorCode, String);

/// Delivery reports of the current attempt.
#[derive(Default)]
struct Delivered {
    /// The attempt the reports are collected for.
    generation: u32,
    /// One slot per event: None until its report arrives.
    results: Vec<Option<Result<(), Failure>>>,
    /// Reports received.
    count: usize,
}

/// The producer's context: collects delivery reports, routes logs.
struct Reports {
    pipeline: String,
    state: Mutex<Delivered>,
}

impl ClientContext for Reports {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        log_line(&self.pipeline, level, fac, msg);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(&self.pipeline, &error, reason);
    }
}

impl ProducerContext for Reports {
    /// `generation << 32 | index`.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let generation = (opaque >> 32) as u32;
        let index = opaque & 0xffff_ffff;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.generation != generation {
            return; // a report of an abandoned attempt
        }
        if let Some(slot) = s.results.get_mut(index) {
            if slot.is_none() {
                *slot = Some(match result {
                    Ok(_) => Ok(()),
                    Err((e, _)) => Err((
                        e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail),
                        e.to_string(),
                    )),
                });
                s.count += 1;
            }
        }
    }
}

struct KafkaSink {
    producer: BaseProducer<Reports>,
    topic: Template,
    /// The record key template (none: the dedup key).
    key: Option<Template>,
    /// `format: "cloudevents"`.
    cloudevents: Option<CloudEvents>,
    /// The brokers, for messages.
    shown: String,
    /// How long to wait for a batch's delivery reports.
    wait: Duration,
    generation: u32,
}

/// A record of `e` as a CloudEvent (the Kafka protocol binding): in
/// structured mode the value is the event and `content-type` says so; in
/// binary mode the value is the row and the attributes are `ce_*` headers.
/// `key` (the rendered `key` template) is the `partitionkey`.
fn cloud_event(
    ce: &CloudEvents,
    e: &Event,
    key: Option<&str>,
    headers: OwnedHeaders,
) -> (Option<Vec<u8>>, OwnedHeaders) {
    let header = |h: OwnedHeaders, k: &str, v: &str| {
        h.insert(Header {
            key: k,
            value: Some(v),
        })
    };
    match ce.mode {
        Mode::Structured => {
            let mut value = Vec::with_capacity(e.payload.get().len() + 256);
            ce.structured(e, key, &mut value);
            (
                Some(value),
                header(headers, "content-type", cloudevents::STRUCTURED),
            )
        }
        Mode::Binary => {
            let mut h = header(headers, "content-type", cloudevents::DATA_CONTENT_TYPE);
            for (k, v) in ce.headers(e, key, "ce_", false) {
                h = header(h, &k, &v);
            }
            (None, h)
        }
    }
}

/// What a refused record means.
enum Verdict {
    /// This event can never be delivered: dead-letter it.
    Reject,
    /// The whole batch fails and is retried slowly (config, permissions).
    Permanent,
    /// Retry the batch.
    Transient,
}

/// What a refusal code says: only a problem of the record itself (its
/// size, a broker-side validation of it, a topic name rendered from its
/// values) dead-letters it. A problem of the topic or cluster (missing,
/// not authorized, a message format too old for headers, a policy) fails
/// the batch, retried slowly; anything else (a corrupt transfer, brokers
/// away, timeouts) is retried.
fn verdict(code: RDKafkaErrorCode) -> Verdict {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::InvalidRecord
        | C::InvalidTopic
        | C::MessageBatchTooLarge => Verdict::Reject,
        C::UnknownTopic
        | C::UnknownTopicOrPartition
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::Authentication
        | C::SaslAuthenticationFailed
        | C::UnsupportedForMessageFormat
        | C::PolicyViolation
        | C::InvalidRequiredAcks => Verdict::Permanent,
        _ => Verdict::Transient,
    }
}

impl KafkaSink {
    fn record_headers(e: &Event) -> OwnedHeaders {
        let outbox_id = e.outbox_id.to_string();
        let mut h = OwnedHeaders::new_with_capacity(7)
            .insert(Header {
                key: "Pgtrickle-Dedup-Key",
                value: Some(e.dedup_key.as_str()),
            })
            .insert(Header {
                key: "Pgtrickle-Op",
                value: Some(e.op.as_str()),
            })
            .insert(Header {
                key: "Pgtrickle-Full-Refresh",
                value: Some(if e.is_full_refresh { "true" } else { "false" }),
            })
            .insert(Header {
                key: "Pgtrickle-Outbox-Id",
                value: Some(outbox_id.as_str()),
            })
            .insert(Header {
                key: "Pgtrickle-Subject",
                value: Some(e.subject.as_str()),
            });
        if let Some(r) = &e.refresh_id {
            h = h.insert(Header {
                key: "Pgtrickle-Refresh-Id",
                value: Some(r.as_str()),
            });
        }
        if let Some(x) = &e.headers {
            h = h.insert(Header {
                key: "Pgtrickle-Headers",
                value: Some(x.get()),
            });
        }
        if let Some(t) = Context::of(e.headers.as_deref()) {
            for (key, value) in t.headers() {
                h = h.insert(Header {
                    key,
                    value: Some(value),
                });
            }
        }
        h
    }

    /// An error naming the brokers; a fatal producer error says so.
    fn fail(&self, class: Verdict, msg: String) -> Error {
        let msg = format!("kafka {}: {msg}", self.shown);
        match class {
            Verdict::Permanent => Error::permanent(msg),
            _ => Error::transient(msg),
        }
    }

    /// Drop what is still queued of an abandoned attempt.
    fn abandon(&self) {
        self.producer
            .purge(rdkafka::producer::PurgeConfig::default().queue());
        self.state().generation = self.generation.wrapping_add(1);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Delivered> {
        self.producer
            .context()
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Send `events[i]` for every i in `indices` and wait for every
    /// delivery report; returns the records refused for good (or, for a
    /// broker refusal, perhaps only because of a neighbour in its batch).
    fn attempt(&mut self, events: &[Event], indices: &[usize]) -> Result<Vec<Refused>, Error> {
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        {
            let mut s = self.state();
            s.generation = generation;
            s.results.clear();
            s.results.resize(events.len(), None);
            s.count = 0;
        }
        let mut refused = Vec::new();
        let mut sent = 0usize;
        for &i in indices {
            let e = &events[i];
            let vars = Vars::of(e);
            let topic = self.topic.render(&vars, e.op);
            let key = self.key.as_ref().map(|k| k.render(&vars, e.op));
            let opaque = ((generation as usize) << 32) | i;
            let (value, headers) = match &self.cloudevents {
                None => (None, Self::record_headers(e)),
                Some(ce) => cloud_event(ce, e, key.as_deref(), Self::record_headers(e)),
            };
            let mut record = BaseRecord::with_opaque_to(&topic, opaque)
                .key(key.as_deref().unwrap_or(e.dedup_key.as_str()))
                .payload(value.as_deref().unwrap_or(e.payload.get().as_bytes()))
                .headers(headers);
            loop {
                match self.producer.send(record) {
                    Ok(()) => {
                        sent += 1;
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        // The local queue is full: serve delivery reports
                        // until there is room.
                        record = r;
                        self.producer.poll(Duration::from_millis(5));
                    }
                    Err((err, _)) => {
                        let code = err.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
                        match verdict(code) {
                            Verdict::Reject => {
                                // The producer's own check: this record alone.
                                refused.push(Refused {
                                    index: i,
                                    reason: format!("kafka: topic {topic}: {err}"),
                                    alone: true,
                                    neighbour: false,
                                });
                                break;
                            }
                            v => {
                                self.abandon();
                                return Err(self.fail(v, format!("producing to {topic}: {err}")));
                            }
                        }
                    }
                }
            }
        }
        // Every report of this attempt, within message.timeout.ms.
        let deadline = Instant::now() + self.wait;
        loop {
            if self.state().count >= sent {
                break;
            }
            if let Some((code, why)) = self.producer.client().fatal_error() {
                self.abandon();
                return Err(self.fail(
                    Verdict::Transient,
                    format!("the producer failed ({code:?}: {why}); starting a new one"),
                ));
            }
            if Instant::now() >= deadline {
                let missing = sent - self.state().count;
                self.abandon();
                return Err(self.fail(
                    Verdict::Transient,
                    format!("{missing} delivery reports missing after {:?}", self.wait),
                ));
            }
            self.producer.poll(Duration::from_millis(2));
        }
        let results = std::mem::take(&mut self.state().results);
        for (i, r) in results.into_iter().enumerate() {
            let Some(Err((code, why))) = r else {
                continue;
            };
            match verdict(code) {
                Verdict::Reject => refused.push(Refused {
                    index: i,
                    reason: format!("kafka: {why}"),
                    alone: false,
                    neighbour: false,
                }),
                // Refused because another record of its batch was.
                _ if code == RDKafkaErrorCode::InvalidDifferentRecord => refused.push(Refused {
                    index: i,
                    reason: format!("kafka: {why}"),
                    alone: false,
                    neighbour: true,
                }),
                v => {
                    let e = &events[i];
                    return Err(self.fail(v, format!("delivering {}: {why}", e.dedup_key)));
                }
            }
        }
        Ok(refused)
    }
}

/// A record not delivered for a reason that retrying cannot fix.
struct Refused {
    /// Its index in the published slice.
    index: usize,
    /// Why.
    reason: String,
    /// Refused on its own (not as part of a batch the broker refused).
    alone: bool,
    /// Refused because another record of its batch was invalid.
    neighbour: bool,
}

impl Sink for KafkaSink {
    fn publish(&mut self, events: &[Event]) -> Result<Vec<Rejected>, Error> {
        let all: Vec<usize> = (0..events.len()).collect();
        let refused = self.attempt(events, &all)?;
        // A broker refuses a whole batch (of one partition) for one bad
        // record, or because the batch is over the topic's size limit:
        // when it refused several records, or said a neighbour was the
        // problem, send each of them again on its own, and dead-letter
        // only those it refuses alone (they then follow later events).
        let batch_refusals = refused.iter().filter(|r| !r.alone).count();
        let mut rejected = Vec::new();
        for r in refused {
            if r.alone || (batch_refusals == 1 && !r.neighbour) {
                rejected.push(Rejected {
                    index: r.index,
                    reason: r.reason,
                });
                continue;
            }
            if let Some(again) = self.attempt(events, &[r.index])?.pop() {
                rejected.push(Rejected {
                    index: again.index,
                    reason: again.reason,
                });
            }
        }
        rejected.sort_by_key(|r| r.index);
        Ok(rejected)
    }

    fn unroutable(&self, e: &Event) -> Option<String> {
        let vars = Vars::of(e);
        let key = self.key.as_ref().and_then(|k| k.missing(&vars));
        let ce = || self.cloudevents.as_ref()?.missing(e);
        self.topic.missing(&vars).or(key).or_else(ce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Json) -> String {
        parse(v.as_object().unwrap().clone())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn config_errors_name_the_key() {
        assert!(err(json!({"topic": "t"})).contains("sink.brokers"));
        assert!(err(json!({"brokers": 9092})).contains("sink.brokers"));
        assert!(err(json!({"brokers": "b:1", "topic": "a b"})).contains("sink.topic"));
        assert!(err(json!({"brokers": "b:1", "topic": "a.{nope}"})).contains("sink.topic"));
        assert!(err(json!({"brokers": "b:1", "partition": 1})).contains("sink.partition"));
        assert!(
            err(json!({"brokers": "b:1", "properties": {"enable.idempotence": false}}))
                .contains("sink.properties.enable.idempotence")
        );
        assert!(
            err(json!({"brokers": "b:1", "properties": {"transactional.id": "x"}}))
                .contains("sink.properties.transactional.id")
        );
        assert!(parse(
            json!({"brokers": ["b:1"], "topic": "x.{stream_table}-{op}",
                   "properties": {"compression.type": "lz4", "acks": -1}})
            .as_object()
            .unwrap()
            .clone()
        )
        .is_ok());
    }

    fn event(n: i64) -> Event {
        Event {
            dedup_key: format!("outbox_orders:{n}:0"),
            subject: "pgtrickle.orders.insert".into(),
            op: Op::Insert,
            payload: serde_json::value::RawValue::from_string(format!("{{\"n\":{n}}}")).unwrap(),
            is_full_refresh: false,
            outbox_id: n,
            refresh_id: None,
            headers: None,
            stream_table: "orders".into(),
            created_at: None,
        }
    }

    #[test]
    fn a_batch_the_broker_refuses_is_sent_again_record_by_record() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("t", 1, 1).unwrap();
        let spec = parse(
            json!({"brokers": mock.bootstrap_servers(), "topic": "t",
                   "properties": {"linger.ms": 100, "message.timeout.ms": 20000}})
            .as_object()
            .unwrap()
            .clone(),
        )
        .unwrap();
        let mut sink = spec.open("p").unwrap();
        // Warm up (producer id, metadata), then refuse the next produce
        // request: its whole batch of ten records.
        assert!(sink.publish(&[event(0)]).unwrap().is_empty());
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
        );
        let events: Vec<Event> = (1..=10).map(event).collect();
        let rejected = sink.publish(&events).unwrap();
        assert!(rejected.is_empty(), "{rejected:?}");
    }

    #[test]
    fn size_errors_are_dead_letters_and_outages_are_retried() {
        assert!(matches!(
            verdict(RDKafkaErrorCode::MessageSizeTooLarge),
            Verdict::Reject
        ));
        assert!(matches!(
            verdict(RDKafkaErrorCode::UnknownTopicOrPartition),
            Verdict::Permanent
        ));
        assert!(matches!(
            verdict(RDKafkaErrorCode::MessageTimedOut),
            Verdict::Transient
        ));
        assert!(matches!(
            verdict(RDKafkaErrorCode::AllBrokersDown),
            Verdict::Transient
        ));
        // A corrupt transfer is retried (Kafka's CORRUPT_MESSAGE is
        // retriable), not dead-lettered.
        assert!(matches!(
            verdict(RDKafkaErrorCode::InvalidMessage),
            Verdict::Transient
        ));
    }

    #[test]
    fn a_topic_whose_format_cannot_hold_headers_fails_the_batch_and_dead_letters_nothing() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("t", 1, 1).unwrap();
        let spec = parse(
            json!({"brokers": mock.bootstrap_servers(), "topic": "t",
                   "properties": {"message.timeout.ms": 20000}})
            .as_object()
            .unwrap()
            .clone(),
        )
        .unwrap();
        let mut sink = spec.open("p").unwrap();
        assert!(sink.publish(&[event(0)]).unwrap().is_empty());
        // Every record has headers: the topic refuses them all, whatever
        // the batch.
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNSUPPORTED_FOR_MESSAGE_FORMAT; 20],
        );
        let events: Vec<Event> = (1..=3).map(event).collect();
        let e = sink.publish(&events).unwrap_err();
        assert_eq!(e.class, crate::retry::Class::Permanent, "{e}");
    }
}
