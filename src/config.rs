//! Typed pipeline configuration, parsed from the catalog's JSONB: the
//! pipeline's own keys here, the sink's and the source's keys by the sink
//! or source (see [`crate::keys`], which they share with this module).
//!
//! Every key is checked: a missing or wrong-typed key, an unknown key or an
//! unknown sink/source type is a [`ConfigError`] naming the key, and the
//! pipeline does not start.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::event::{Template, DEFAULT_SUBJECT};
use crate::keys::{from_value, ConfigError};
use crate::pipeline::Direction;
use crate::{sink, source};

/// Take an optional typed key out of a JSON object.
fn take<T: DeserializeOwned>(
    obj: &mut Map<String, Value>,
    prefix: &str,
    key: &str,
) -> Result<Option<T>, ConfigError> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => from_value(&format!("{prefix}.{key}"), v).map(Some),
    }
}

fn object(v: Option<Value>, key: &str) -> Result<Map<String, Value>, ConfigError> {
    match v {
        Some(Value::Object(m)) => Ok(m),
        Some(other) => Err(ConfigError::new(
            key,
            format!("expected a JSON object, found {other}"),
        )),
        None => Err(ConfigError::new(key, "missing")),
    }
}

/// A pipeline as the catalog lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEntry {
    /// Pipeline name.
    pub name: String,
    /// Which way it moves events.
    pub direction: Direction,
    /// Whether it should run.
    pub enabled: bool,
    /// The raw config JSONB.
    pub config: Value,
}

/// A parsed, runnable pipeline.
#[derive(Debug)]
pub enum Pipeline {
    /// Outbox → sink.
    Forward(Forward),
    /// Source → inbox.
    Reverse(Reverse),
}

/// Forward pipeline config: which outbox, which sink.
#[derive(Debug)]
pub struct Forward {
    /// The outbox: a stream table name or outbox table name.
    pub outbox: String,
    /// A consumer group created with `create_consumer_group`, if any.
    pub group: Option<String>,
    /// Events per sink batch.
    pub batch_size: usize,
    /// Subject/topic template.
    pub subject: Template,
    /// Consumer-group mode: how long a leased batch stays this instance's
    /// without a heartbeat (`sink.lease_seconds`).
    pub lease: Duration,
    /// The sink, ready to open.
    pub sink: Box<dyn sink::SinkSpec>,
}

/// Reverse pipeline config: which source, which inbox.
#[derive(Debug)]
pub struct Reverse {
    /// The inbox name.
    pub inbox: String,
    /// Its schema, when the config names one (else looked up).
    pub schema: Option<String>,
    /// Messages per inbox transaction.
    pub batch_size: usize,
    /// How long to wait to fill a batch.
    pub max_wait: Duration,
    /// The source, ready to open.
    pub source: Box<dyn source::SourceSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboxSource {
    outbox: String,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    retention_hours: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct InboxSink {
    inbox: String,
    #[serde(default)]
    schema: Option<String>,
    // Used by the SQL side (create_inbox); accepted here.
    #[serde(default)]
    max_retries: Option<i64>,
    #[serde(default)]
    schedule: Option<String>,
    #[serde(default)]
    with_dead_letter: Option<bool>,
    #[serde(default)]
    retention_hours: Option<i64>,
}

/// Parse a catalog entry; `default_batch` comes from `--batch-size`.
pub fn parse(entry: &CatalogEntry, default_batch: usize) -> Result<Pipeline, ConfigError> {
    let mut top = object(Some(entry.config.clone()), "config")?;
    let source = top.remove("source");
    let sink = top.remove("sink");
    let source_type: Option<String> = take(&mut top, "config", "source_type")?;
    let _sink_type: Option<String> = take(&mut top, "config", "sink_type")?;
    if let Some(k) = top.keys().next() {
        return Err(ConfigError::new(k.clone(), "unknown key"));
    }
    match entry.direction {
        Direction::Forward => {
            if let Some(t) = source_type.as_deref().filter(|t| *t != "outbox") {
                return Err(ConfigError::new(
                    "source_type",
                    format!("a forward pipeline reads an outbox, not {t:?}"),
                ));
            }
            let src: OutboxSource = from_value("source", Value::Object(object(source, "source")?))?;
            if src.outbox.is_empty() {
                return Err(ConfigError::new("source.outbox", "must not be empty"));
            }
            let mut sink = object(sink, "sink")?;
            let kind: String = take(&mut sink, "sink", "type")?
                .ok_or_else(|| ConfigError::new("sink.type", "missing"))?;
            let batch_size: usize = take(&mut sink, "sink", "batch_size")?.unwrap_or(default_batch);
            if batch_size == 0 {
                return Err(ConfigError::new("sink.batch_size", "must be at least 1"));
            }
            let subject: String =
                take(&mut sink, "sink", "subject")?.unwrap_or_else(|| DEFAULT_SUBJECT.to_string());
            let subject =
                Template::parse(&subject).map_err(|m| ConfigError::new("sink.subject", m))?;
            let lease_seconds: u32 = take(&mut sink, "sink", "lease_seconds")?.unwrap_or(60);
            if lease_seconds < 2 {
                return Err(ConfigError::new("sink.lease_seconds", "must be at least 2"));
            }
            Ok(Pipeline::Forward(Forward {
                outbox: src.outbox,
                group: src.group.filter(|g| !g.is_empty()),
                batch_size,
                subject,
                lease: Duration::from_secs(lease_seconds.into()),
                sink: sink::parse(&kind, sink)?,
            }))
        }
        Direction::Reverse => {
            let mut src = object(source, "source")?;
            let kind: String = take(&mut src, "source", "type")?
                .ok_or_else(|| ConfigError::new("source.type", "missing"))?;
            let batch_size: usize =
                take(&mut src, "source", "batch_size")?.unwrap_or(default_batch);
            if batch_size == 0 {
                return Err(ConfigError::new("source.batch_size", "must be at least 1"));
            }
            let max_wait_ms: u64 = take(&mut src, "source", "max_wait_ms")?.unwrap_or(100);
            let inbox: InboxSink = from_value("sink", Value::Object(object(sink, "sink")?))?;
            if inbox.inbox.is_empty() {
                return Err(ConfigError::new("sink.inbox", "must not be empty"));
            }
            Ok(Pipeline::Reverse(Reverse {
                inbox: inbox.inbox,
                schema: inbox.schema,
                batch_size,
                max_wait: Duration::from_millis(max_wait_ms),
                source: source::parse(&kind, src)?,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_unknown_type_is_named_with_the_types_this_binary_has() {
        let e = sink::parse("carrier-pigeon", Map::new()).unwrap_err();
        assert_eq!(e.key, "sink.type");
        assert!(
            e.to_string()
                .contains("unknown sink type \"carrier-pigeon\""),
            "{e}"
        );
        assert!(e.to_string().contains("stdout"), "{e}");
        let e = source::parse("smoke", Map::new()).unwrap_err();
        assert_eq!(e.key, "source.type");
        assert!(e.to_string().contains("stdin"), "{e}");
        assert!(sink::parse("stdout", Map::new()).is_ok());
    }

    fn fwd(sink: Value) -> CatalogEntry {
        CatalogEntry {
            name: "p".into(),
            direction: Direction::Forward,
            enabled: true,
            config: json!({"source_type":"outbox","source":{"outbox":"orders","group":"g","retention_hours":24},"sink_type":"stdout","sink":sink}),
        }
    }

    fn err(e: CatalogEntry) -> ConfigError {
        parse(&e, 100).unwrap_err()
    }

    #[test]
    fn parses_a_stdout_pipeline() {
        let p = parse(
            &fwd(json!({"type":"stdout","format":"csv","batch_size":5})),
            100,
        )
        .unwrap();
        let Pipeline::Forward(f) = p else { panic!() };
        assert_eq!((f.outbox.as_str(), f.batch_size), ("orders", 5));
        assert_eq!(f.group.as_deref(), Some("g"));
        assert_eq!(f.lease, Duration::from_secs(60));
        let p = parse(&fwd(json!({"type":"stdout","lease_seconds":5})), 100).unwrap();
        let Pipeline::Forward(f) = p else { panic!() };
        assert_eq!(f.lease, Duration::from_secs(5));
        assert_eq!(
            err(fwd(json!({"type":"stdout","lease_seconds":1}))).key,
            "sink.lease_seconds"
        );
    }

    #[test]
    fn names_the_bad_key() {
        assert_eq!(err(fwd(json!({"format":"csv"}))).key, "sink.type");
        assert_eq!(err(fwd(json!({"type":"kafkaa"}))).key, "sink.type");
        assert!(err(fwd(json!({"type":"kafkaa"}))).msg.contains("kafkaa"));
        assert_eq!(
            err(fwd(json!({"type":"stdout","rotate_bytes":"big"}))).key,
            "sink.rotate_bytes"
        );
        assert_eq!(err(fwd(json!({"type":"stdout","pth":"x"}))).key, "sink.pth");
        assert_eq!(
            err(fwd(json!({"type":"stdout","format":"xml"}))).key,
            "sink.format"
        );
        assert_eq!(
            err(fwd(json!({"type":"stdout","subject":"{nope}"}))).key,
            "sink.subject"
        );
        let mut e = fwd(json!({"type":"stdout"}));
        e.config["source"] = json!({"group": "g"});
        assert_eq!(err(e).key, "source.outbox");
    }

    #[test]
    fn wrong_typed_values_are_not_echoed() {
        let e = err(fwd(json!({"type":"stdout","rotate_bytes":"hunter2-token"})));
        assert_eq!(e.key, "sink.rotate_bytes");
        assert!(!e.msg.contains("hunter2"), "{}", e.msg);
        assert!(
            e.msg.contains("invalid type: string, expected u64"),
            "{}",
            e.msg
        );
    }

    #[test]
    fn parses_a_stdin_pipeline() {
        let e = CatalogEntry {
            name: "in".into(),
            direction: Direction::Reverse,
            enabled: true,
            config: json!({"source_type":"stdin","source":{"type":"stdin"},"sink_type":"pg-inbox","sink":{"inbox":"events","max_retries":3,"schedule":"1s","with_dead_letter":true,"retention_hours":24}}),
        };
        let Pipeline::Reverse(r) = parse(&e, 100).unwrap() else {
            panic!()
        };
        assert_eq!(r.inbox, "events");
        let mut bad = e.clone();
        bad.config["source"] = json!({"type":"stdin","path":7});
        assert_eq!(err(bad).key, "source.path");
    }
}
