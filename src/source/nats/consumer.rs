//! The `nats` source's durable pull consumer: the stream must exist; the
//! consumer is created when missing (explicit acks, `ack_wait_ms`, deliver
//! policy from `start`, filtered on `subject`), and an existing one is
//! checked (a pull consumer, with acks, the same filter) and given
//! `ack_wait_ms` when that differs.

// The sync `nats` crate is deprecated upstream in favour of async-nats; it
// is used on purpose (no async runtime; see ARCHITECTURE.md).
#![allow(deprecated)]

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::NatsSourceConfig;
use crate::broker::nats::{ApiError, Client};
use crate::retry::Error;

/// The default `ack_wait_ms`.
const DEFAULT_ACK_WAIT_MS: u64 = 30_000;

/// The durable consumer a `nats` source reads through.
pub struct Durable {
    /// The pipeline, for errors.
    pipeline: String,
    /// The stream it reads.
    stream: String,
    /// Its durable name.
    pub name: String,
    /// The `subject` filter, if any.
    subject: Option<String>,
    /// `start`: `all` (default) or `new`.
    start: Option<String>,
    /// `ack_wait_ms`, if set.
    ack_wait_ms: Option<u64>,
}

#[derive(Deserialize)]
struct InfoReply {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    config: Option<Map<String, Value>>,
}

/// The durable name used when `consumer` is not set: one per pipeline.
pub fn default_name(pipeline: &str) -> String {
    let name: String = pipeline
        .chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect();
    format!("pgtrickle-relay-{name}")
}

impl Durable {
    /// The consumer the config names (by default one per pipeline).
    pub fn new(pipeline: &str, cfg: &NatsSourceConfig) -> Durable {
        Durable {
            pipeline: pipeline.to_string(),
            stream: cfg.stream.clone(),
            name: cfg
                .consumer
                .clone()
                .unwrap_or_else(|| default_name(pipeline)),
            subject: cfg.subject.clone(),
            start: cfg.start.clone(),
            ack_wait_ms: cfg.ack_wait_ms,
        }
    }

    /// `pipeline "<name>": source.<key>: <msg>`, a permanent error.
    pub fn config_error(&self, key: &str, msg: String) -> Error {
        Error::permanent(format!("pipeline {:?}: source.{key}: {msg}", self.pipeline))
    }

    fn info(&self, client: &Client, subject: &str, body: &[u8]) -> Result<InfoReply, Error> {
        let data = client.api(subject, body)?;
        serde_json::from_slice(&data).map_err(|e| {
            Error::transient(format!(
                "nats {}: bad JetStream answer to {subject}: {e}",
                client.shown
            ))
        })
    }

    /// Check that the stream exists, and create or check the consumer.
    pub fn ensure(&self, client: &Client) -> Result<(), Error> {
        let (stream, consumer) = (self.stream.clone(), self.name.clone());
        let info = self.info(client, &format!("$JS.API.STREAM.INFO.{stream}"), b"")?;
        match info.error {
            Some(e) if e.no_stream() => {
                return Err(self.config_error(
                    "stream",
                    format!(
                        "JetStream stream {stream:?} does not exist on {}: create it (e.g. `nats \
                         stream add`)",
                        client.shown
                    ),
                ))
            }
            Some(e) => {
                return Err(Error::transient(format!(
                    "nats {}: stream {stream:?}: {e}",
                    client.shown
                )))
            }
            None => {}
        }
        let info = self.info(
            client,
            &format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"),
            b"",
        )?;
        match (info.error, info.config) {
            (Some(e), _) if e.code == 404 || e.err_code == 10014 => self.create(client)?,
            (Some(e), _) => {
                return Err(Error::transient(format!(
                    "nats {}: consumer {consumer:?} of stream {stream:?}: {e}",
                    client.shown
                )))
            }
            (None, Some(config)) => self.check_existing(client, config)?,
            (None, None) => {
                return Err(Error::transient(format!(
                    "nats {}: consumer {consumer:?} of stream {stream:?}: an answer without config",
                    client.shown
                )))
            }
        }
        Ok(())
    }

    fn ack_wait_ns(&self) -> u64 {
        self.ack_wait_ms.unwrap_or(DEFAULT_ACK_WAIT_MS) * 1_000_000
    }

    fn create(&self, client: &Client) -> Result<(), Error> {
        let (stream, consumer) = (&self.stream, &self.name);
        let deliver = match self.start.as_deref() {
            Some("new" | "latest") => "new",
            _ => "all",
        };
        let mut config = json!({
            "durable_name": consumer,
            "deliver_policy": deliver,
            "ack_policy": "explicit",
            "ack_wait": self.ack_wait_ns(),
            "max_deliver": -1,
            "max_ack_pending": -1,
            "replay_policy": "instant",
        });
        if let Some(s) = &self.subject {
            config["filter_subject"] = json!(s);
        }
        let req = json!({"stream_name": stream, "config": config});
        let info = self.info(
            client,
            &format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{consumer}"),
            req.to_string().as_bytes(),
        )?;
        if let Some(e) = info.error {
            let key = if e.description.contains("filter") {
                "subject"
            } else {
                "consumer"
            };
            return Err(self.config_error(
                key,
                format!("creating JetStream consumer {consumer:?} on stream {stream:?}: {e}"),
            ));
        }
        log::info!(
            "created durable consumer {consumer:?} on stream {stream:?} (deliver {deliver}, \
             ack wait {} ms{})",
            self.ack_wait_ns() / 1_000_000,
            self.subject
                .as_ref()
                .map(|s| format!(", subjects {s}"))
                .unwrap_or_default()
        );
        Ok(())
    }

    /// Refuse a consumer the relay cannot use safely; apply `ack_wait_ms`.
    fn check_existing(&self, client: &Client, mut config: Map<String, Value>) -> Result<(), Error> {
        let consumer = self.name.clone();
        let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
        if !text(config.get("deliver_subject")).is_empty() {
            return Err(self.config_error(
                "consumer",
                format!(
                    "JetStream consumer {consumer:?} is a push consumer; the nats source needs a \
                     pull consumer (name another, or delete it and the relay creates one)"
                ),
            ));
        }
        let policy = text(config.get("ack_policy"));
        if policy == "none" {
            return Err(self.config_error(
                "consumer",
                format!(
                    "JetStream consumer {consumer:?} has ack policy none: messages would be lost \
                     when the inbox is down; use a consumer with explicit acks"
                ),
            ));
        }
        let filter = text(config.get("filter_subject"));
        if let Some(want) = self.subject.as_deref().filter(|s| *s != filter) {
            return Err(self.config_error(
                "subject",
                format!(
                    "JetStream consumer {consumer:?} filters {filter:?}, not {want:?}: delete the \
                     consumer or name another"
                ),
            ));
        }
        let has = config.get("ack_wait").and_then(Value::as_u64);
        if self.ack_wait_ms.is_some() && has != Some(self.ack_wait_ns()) {
            config.insert("ack_wait".into(), json!(self.ack_wait_ns()));
            let req = json!({"stream_name": self.stream, "config": config});
            let info = self.info(
                client,
                &format!("$JS.API.CONSUMER.DURABLE.CREATE.{}.{consumer}", self.stream),
                req.to_string().as_bytes(),
            )?;
            match info.error {
                Some(e) => log::warn!(
                    "could not set the ack wait of consumer {consumer:?} to {} ms: {}; it stays \
                     at {} ms",
                    self.ack_wait_ns() / 1_000_000,
                    e.description,
                    has.unwrap_or(0) / 1_000_000
                ),
                None => log::info!(
                    "set the ack wait of consumer {consumer:?} to {} ms",
                    self.ack_wait_ns() / 1_000_000
                ),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::nats::valid_name;

    #[test]
    fn default_consumer_names_are_valid() {
        assert_eq!(default_name("orders in.v1"), "pgtrickle-relay-orders_in_v1");
        assert!(valid_name(&default_name("a.*>b")));
    }
}
