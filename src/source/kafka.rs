//! The `kafka` source: a Kafka consumer group into the inbox, with a
//! librdkafka `BaseConsumer` (no async runtime).
//!
//! Keys: [`KEYS`] (README.md and the man page show them); `brokers` and
//! `properties` are checked by the shared Kafka module. The relay sets
//! `group.id` (from `group_id`), `auto.offset.reset` (from `start`),
//! `enable.auto.commit=false`, `enable.auto.offset.store=false` and
//! `enable.partition.eof=true`, and defaults `session.timeout.ms` to 10000
//! (a crashed relay's partitions move on within ten seconds).
//!
//! `start` only matters when the group has no committed offset yet (a
//! group the relay creates by joining it): `earliest` (the default) reads
//! the topics from their first record, `latest` only what comes after.
//!
//! Offsets are committed by hand, synchronously, only when the reverse
//! loop acknowledges: after the inbox transaction holding those records
//! committed. A relay killed in between reads them again (the inbox keeps
//! one row per `event_id`). On a rebalance, the offsets of records
//! received from revoked partitions and not yet committed are dropped, not
//! committed late: their next owner reads them again from the group's last
//! commit, so nothing is lost and no commit goes backwards.
//!
//! The inbox `event_id` is the record key (the `kafka` sink writes the
//! event's dedup key there), else the id the value carries itself (our
//! envelope's `dedup_key`, a CloudEvents `id`; see `source::own_id`), else
//! `<topic>:<partition>:<offset>`. The
//! value must be JSON; a value that is not (or a record without a value)
//! goes into the inbox as a dead letter (`{"raw": "<text>"}` with the
//! reason in `error`) and is committed like the rest, so it neither blocks
//! the partition nor is lost.
//!
//! With `--once` the source ends when every assigned partition has been
//! read to its end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use serde_json::{Map, Value as Json};

use crate::broker::kafka::{client_error, log_line, Brokers, ClientKeys, Property, Reserved};
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::retry::Error;
use crate::source::decode::{dead_letter, json_text, Body, CloudEvent, Origin, Origins, Problem};
use crate::source::{feed, own_id, Batch, Feed, Message, Source, SourceSpec};
use crate::trace;

/// How long a `--once` run waits for its first partition assignment.
const ONCE_JOIN: Duration = Duration::from_secs(60);

/// Properties the relay sets itself.
const RESERVED: &[Reserved] = &[
    Reserved {
        name: "group.id",
        allowed: &[],
        why: "use source.group_id",
    },
    Reserved {
        name: "auto.offset.reset",
        allowed: &[],
        why: "use source.start",
    },
    Reserved {
        name: "enable.auto.commit",
        allowed: &["false"],
        why: "offsets are committed only after the inbox commit",
    },
    Reserved {
        name: "enable.auto.offset.store",
        allowed: &["false"],
        why: "offsets are committed only after the inbox commit",
    },
    Reserved {
        name: "enable.partition.eof",
        allowed: &["true"],
        why: "--once needs to know where partitions end",
    },
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KafkaSourceKeys {
    brokers: Brokers,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    topics: Option<Vec<String>>,
    group_id: String,
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    properties: Option<BTreeMap<String, Property>>,
}

/// The `kafka` source's config.
#[derive(Debug, Clone)]
pub struct KafkaSourceConfig {
    client: ClientKeys,
    topics: Vec<String>,
    group_id: String,
    /// `earliest` or `latest`.
    start: &'static str,
    origins: Origins,
}

/// Where an attribute comes from by default, and what its key holds.
const FROM: &str = "the header of the same name, else the JSON field of the same name";
const WHERE: &str = r#"where each column comes from: `{"header": "name"}` (a record header), `{"field": "name"}` (a field of the JSON value) or a fixed string"#;

/// The source's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    crate::broker::kafka::BROKERS_KEY,
    KeySpec::new(
        "topic",
        "string",
        Fallback::Text("one of `topic` and `topics` is required"),
        "a topic (a name starting with `^` is a regular expression)",
    ),
    KeySpec::new(
        "topics",
        "list of strings",
        Fallback::Text("one of `topic` and `topics` is required"),
        "a list of topics (a name starting with `^` is a regular expression)",
    ),
    KeySpec::new(
        "group_id",
        "string",
        Fallback::Required,
        "the Kafka consumer group",
    ),
    KeySpec::new(
        "start",
        "string",
        Fallback::Value("earliest"),
        "where a group without committed offsets starts (a group the relay creates by joining it): `earliest` (so a backlog is not lost) or `latest`",
    ),
    KeySpec::new(
        "properties",
        "object",
        Fallback::Unset,
        "librdkafka settings, as for the `kafka` sink (SASL/SSL, fetch sizes, `partition.assignment.strategy`, ...). The relay sets `group.id`, `auto.offset.reset`, `enable.auto.commit=false`, `enable.auto.offset.store=false` and `enable.partition.eof=true` itself; it defaults `session.timeout.ms` to 10000, so the partitions of a relay that died move on within ten seconds",
    ),
    Origin::key("event_type", FROM, WHERE),
    Origin::key("aggregate_id", FROM, WHERE),
    Origin::key("source", FROM, WHERE),
    Origin::key(
        "trace_id",
        "a valid W3C `traceparent` header (see \"Trace context\"), else the header of the same name, else the JSON field of the same name",
        WHERE,
    ),
];

/// Parse the source's keys.
pub fn parse(mut keys: Map<String, Json>) -> Result<Box<dyn SourceSpec>, ConfigError> {
    let origins = Origins::take(&mut keys, "source")?;
    let raw: KafkaSourceKeys = from_value("source", Json::Object(keys))?;
    let (key, topics) = match (raw.topic, raw.topics) {
        (Some(t), None) => ("source.topic", vec![t]),
        (None, Some(ts)) => ("source.topics", ts),
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "source.topics",
                "give either topic or topics, not both",
            ))
        }
        (None, None) => {
            return Err(ConfigError::new(
                "source.topic",
                "missing (or topics: a list)",
            ))
        }
    };
    if topics.is_empty() || topics.iter().any(|t| t.trim().is_empty()) {
        return Err(ConfigError::new(
            key,
            "expected one or more non-empty topic names (a name starting with ^ is a regex)",
        ));
    }
    if raw.group_id.trim().is_empty() {
        return Err(ConfigError::new("source.group_id", "must not be empty"));
    }
    let start = match raw.start.as_deref() {
        None | Some("earliest") => "earliest",
        Some("latest") => "latest",
        Some(other) => {
            return Err(ConfigError::new(
                "source.start",
                format!("expected \"earliest\" or \"latest\", found {other:?}"),
            ))
        }
    };
    let client = ClientKeys::parse("source", raw.brokers, raw.properties, RESERVED)?;
    Ok(Box::new(KafkaSourceConfig {
        client,
        topics,
        group_id: raw.group_id,
        start,
        origins,
    }))
}

impl SourceSpec for KafkaSourceConfig {
    fn open(&self, pipeline: &str, once: bool) -> Result<Box<dyn Feed>, Error> {
        let cfg = self.client.client_config(
            pipeline,
            &[("session.timeout.ms", "10000")],
            &[
                ("group.id", self.group_id.as_str()),
                ("auto.offset.reset", self.start),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("enable.partition.eof", "true"),
            ],
        )?;
        let context = Group {
            pipeline: pipeline.to_string(),
            state: Mutex::new(Positions::default()),
        };
        let consumer: BaseConsumer<Group> = cfg.create_with_context(context).map_err(|e| {
            Error::permanent(format!(
                "pipeline {pipeline:?}: source.properties: creating the Kafka consumer: {e}"
            ))
        })?;
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|e| {
            Error::permanent(format!(
                "pipeline {pipeline:?}: source.topics {topics:?}: {e}"
            ))
        })?;
        log::info!(
            "consuming kafka topics {topics:?} from {} as group {:?} (new group starts at {})",
            self.client.shown(),
            self.group_id,
            self.start
        );
        Ok(feed(KafkaSource {
            consumer,
            cfg: self.clone(),
            once,
            once_since: Instant::now(),
            unsaved: HashMap::new(),
        }))
    }

    /// The brokers answer a metadata request and have every topic (no
    /// group is joined).
    fn check(&self, pipeline: &str) -> Result<(), ConfigError> {
        let topics = self.client.topics(pipeline)?;
        let shown = self.client.shown();
        let missing: Vec<&String> = self.topics.iter().filter(|t| !topics.contains(t)).collect();
        if !missing.is_empty() {
            return Err(ConfigError::new(
                "source.topics",
                format!("topics {missing:?} do not exist on kafka {shown}"),
            ));
        }
        Ok(())
    }
}

/// A topic and partition.
type Tp = (String, i32);

/// What the consumer knows about its partitions; shared with the
/// rebalance callbacks (which run inside `poll`).
#[derive(Default)]
struct Positions {
    /// The partitions assigned to this consumer, each with the number of
    /// its assignment: a record received under an earlier one (the
    /// partition was revoked meanwhile) is not committed.
    assigned: HashMap<Tp, u64>,
    /// Assignments so far.
    assignments: u64,
    /// Assigned partitions read to their end (no record since).
    at_end: HashSet<Tp>,
}

/// A received record: its partition, the offset to commit after it (its
/// own + 1), and the assignment it was received under.
struct Position {
    tp: Tp,
    next: i64,
    assignment: u64,
}

/// The consumer's context: tracks positions across rebalances.
struct Group {
    pipeline: String,
    state: Mutex<Positions>,
}

impl Group {
    fn state(&self) -> std::sync::MutexGuard<'_, Positions> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ClientContext for Group {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        log_line(&self.pipeline, level, fac, msg);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(&self.pipeline, &error, reason);
    }
}

impl ConsumerContext for Group {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut s = self.state();
            for tp in partitions(tpl) {
                s.assigned.remove(&tp);
                s.at_end.remove(&tp);
            }
            log::info!("kafka partitions revoked: {}", names(tpl));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut s = self.state();
                s.assignments += 1;
                let n = s.assignments;
                for tp in partitions(tpl) {
                    // Reading resumes at the group's commit.
                    s.at_end.remove(&tp);
                    s.assigned.insert(tp, n);
                }
                log::info!("kafka partitions assigned: {}", names(tpl));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => log::warn!("kafka rebalance failed: {e}"),
        }
    }
}

fn names(tpl: &TopicPartitionList) -> String {
    let list: Vec<String> = partitions(tpl)
        .into_iter()
        .map(|(t, p)| format!("{t}[{p}]"))
        .collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

struct KafkaSource {
    consumer: BaseConsumer<Group>,
    cfg: KafkaSourceConfig,
    once: bool,
    /// When a `--once` run started waiting for its assignment.
    once_since: Instant,
    /// Offsets of records written to the inbox whose commit failed:
    /// committed with the next batch.
    unsaved: HashMap<Tp, Position>,
}

fn header(m: &BorrowedMessage<'_>, name: &str) -> Option<String> {
    let headers = m.headers()?;
    headers
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

impl KafkaSource {
    fn message(&self, m: &BorrowedMessage<'_>) -> Message {
        let place = format!("{}:{}:{}", m.topic(), m.partition(), m.offset());
        let (body, error) = match m.payload() {
            None => (
                Body::from_text(String::new()),
                Some(format!("kafka record {place} has no value")),
            ),
            Some(bytes) => {
                let body = Body::from_bytes(bytes);
                let error = body.problem.as_ref().map(|p| match p {
                    Problem::NotUtf8(e) => {
                        format!("kafka record {place}: value is not UTF-8 ({e})")
                    }
                    Problem::NotJson(e) => {
                        format!("kafka record {place}: value is not valid JSON ({e})")
                    }
                });
                (body, error)
            }
        };
        let error = error.map(dead_letter);
        let obj = body.object();
        let event_id = m
            .key()
            .filter(|k| !k.is_empty())
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .or_else(|| own_id(obj?))
            .unwrap_or_else(|| place.clone());
        let content_type = header(m, "content-type").or_else(|| header(m, "Content-Type"));
        let ce = CloudEvent::recognise(|h| header(m, h), content_type.as_deref(), obj);
        // By default an attribute is the header, else the JSON field, of
        // its own name.
        let [event_type, aggregate_id, source, trace_id] = self.cfg.origins.read(
            |o| o.value(|h| header(m, h), obj),
            || trace::traceparent(header(m, trace::TRACEPARENT).as_deref()),
            |name| header(m, name).or_else(|| json_text(obj?, name)),
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

    fn error(&self, e: &KafkaError) -> Error {
        let msg = format!(
            "kafka {} (group {:?}): {e}",
            self.cfg.client.shown(),
            self.cfg.group_id
        );
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::GroupAuthorizationFailed)
            | Some(RDKafkaErrorCode::TopicAuthorizationFailed)
            | Some(RDKafkaErrorCode::Authentication)
            | Some(RDKafkaErrorCode::SaslAuthenticationFailed)
            | Some(RDKafkaErrorCode::InvalidGroupId) => Error::permanent(msg),
            _ => Error::transient(msg),
        }
    }

    /// `--once`: every assigned partition has been read to its end.
    fn drained(&self) -> Result<bool, Error> {
        let s = self.consumer.context().state();
        if s.assigned.is_empty() {
            if self.once_since.elapsed() > ONCE_JOIN {
                return Err(Error::transient(format!(
                    "kafka {}: no partition of {:?} assigned to group {:?} within {ONCE_JOIN:?}",
                    self.cfg.client.shown(),
                    self.cfg.topics,
                    self.cfg.group_id
                )));
            }
            return Ok(false);
        }
        Ok(s.assigned.keys().all(|tp| s.at_end.contains(tp)))
    }
}

impl Source for KafkaSource {
    type Receipt = Position;

    fn receive(
        &mut self,
        batch: &mut Batch<Position>,
        max: usize,
        wait: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + wait;
        while batch.messages.len() < max {
            if self.once && self.drained()? {
                batch.end_of_input = batch.messages.is_empty();
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() && !batch.messages.is_empty() {
                break;
            }
            let polled = self.consumer.poll(left);
            match polled {
                None => break,
                Some(Ok(m)) => {
                    let msg = self.message(&m);
                    let tp = (m.topic().to_string(), m.partition());
                    let mut s = self.consumer.context().state();
                    s.at_end.remove(&tp);
                    let assignment = s.assigned.get(&tp).copied().unwrap_or(0);
                    drop(s);
                    batch.messages.push(msg);
                    batch.receipts.push(Position {
                        tp,
                        next: m.offset() + 1,
                        assignment,
                    });
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    // librdkafka does not say which topic's partition p
                    // ended: with several topics, partition p of each (a
                    // record from one of them clears it again).
                    let mut s = self.consumer.context().state();
                    let ends: Vec<Tp> = s.assigned.keys().filter(|t| t.1 == p).cloned().collect();
                    s.at_end.extend(ends);
                }
                Some(Err(e)) => {
                    if !batch.messages.is_empty() {
                        // The batch so far is written; a lasting error
                        // comes again with the next poll.
                        log::debug!("kafka: {e} (after {} records)", batch.messages.len());
                        break;
                    }
                    return Err(self.error(&e));
                }
            }
        }
        Ok(())
    }

    fn ack(&mut self, receipts: Vec<Position>) -> Result<(), Error> {
        for r in receipts {
            self.unsaved.insert(r.tp.clone(), r);
        }
        // Records of a partition revoked since they were received are not
        // committed: their next owner reads them again from the group's
        // last commit, so no commit goes backwards.
        {
            let s = self.consumer.context().state();
            let before = self.unsaved.len();
            self.unsaved
                .retain(|tp, p| s.assigned.get(tp) == Some(&p.assignment));
            if self.unsaved.len() < before {
                log::info!(
                    "not committing the offsets of {} partitions revoked since: their next \
                     owner reads those records again",
                    before - self.unsaved.len()
                );
            }
        }
        if self.unsaved.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::with_capacity(self.unsaved.len());
        for ((topic, partition), p) in &self.unsaved {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(p.next))
                .map_err(|e| self.error(&e))?;
        }
        self.consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| self.error(&e).context("committing offsets"))?;
        self.unsaved.clear();
        Ok(())
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
        assert!(err(json!({"topic": "t", "group_id": "g"})).contains("source.brokers"));
        assert!(err(json!({"brokers": "b:1", "group_id": "g"})).contains("source.topic"));
        assert!(err(json!({"brokers": "b:1", "topic": "t"})).contains("source.group_id"));
        assert!(
            err(json!({"brokers": "b:1", "topic": "t", "topics": ["u"], "group_id": "g"}))
                .contains("source.topics")
        );
        assert!(
            err(json!({"brokers": "b:1", "topics": [], "group_id": "g"})).contains("source.topics")
        );
        assert!(
            err(json!({"brokers": "b:1", "topic": "t", "group_id": "g", "start": "now"}))
                .contains("source.start")
        );
        assert!(err(json!({"brokers": "b:1", "topic": "t", "group_id": "g",
                            "properties": {"enable.auto.commit": true}}))
        .contains("source.properties.enable.auto.commit"));
        assert!(err(json!({"brokers": "b:1", "topic": "t", "group_id": "g",
                            "event_type": {"column": "x"}}))
        .contains("source.event_type"));
        assert!(parse(
            json!({"brokers": "b:1", "topics": ["a", "b"], "group_id": "g", "start": "latest",
                   "event_type": {"header": "type"}, "source": "shop",
                   "properties": {"session.timeout.ms": 6000}})
            .as_object()
            .unwrap()
            .clone()
        )
        .is_ok());
    }
}
