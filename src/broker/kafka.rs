//! What the `kafka` sink and the `kafka` source share: the `brokers` and
//! `properties` config keys, how they become a librdkafka client config,
//! and where librdkafka's own log lines and errors go.
//!
//! Keys (under `sink` or `source`):
//! - `brokers`: `"host:port,host:port"` or a list of `"host:port"`; may use
//!   `${ENV:NAME}`. Becomes `bootstrap.servers`.
//! - `properties`: an object of librdkafka settings (strings, numbers or
//!   booleans), e.g. `{"security.protocol": "sasl_ssl", "sasl.mechanisms":
//!   "SCRAM-SHA-512", "sasl.username": "relay", "sasl.password":
//!   "${ENV:KAFKA_PASSWORD}", "compression.type": "lz4"}`. Values may use
//!   `${ENV:NAME}` and `${CREDENTIAL:NAME}`; they are never logged. Names
//!   and values are checked by librdkafka when the pipeline is loaded
//!   (values from the environment when it starts). Settings the relay's
//!   guarantees depend on are refused (see each side's reserved list).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer};
use serde::Deserialize;

use crate::keys::{ConfigError, Fallback, KeySpec};
use crate::pg::expand_env;
use crate::retry::Error;

/// The `brokers` key both directions take.
pub const BROKERS_KEY: KeySpec = KeySpec::new(
    "brokers",
    "string or list of strings",
    Fallback::Required,
    r#"`"host:9092,host2:9092"` or a list of `"host:port"`; `${ENV:NAME}` is replaced"#,
);

/// The `brokers` key: one comma-separated string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Brokers {
    /// `"host:port,host:port"`.
    One(String),
    /// `["host:port", ...]`.
    Many(Vec<String>),
}

/// One value of the `properties` object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Property {
    /// A string, as is.
    Text(String),
    /// A number, written as JSON writes it.
    Number(serde_json::Number),
    /// `true` / `false`.
    Bool(bool),
}

impl Property {
    fn text(&self) -> String {
        match self {
            Property::Text(s) => s.clone(),
            Property::Number(n) => n.to_string(),
            Property::Bool(b) => b.to_string(),
        }
    }
}

/// A property the relay sets itself: `allowed` lists the values a config
/// may repeat (lowercase), `why` says what to use instead.
pub struct Reserved {
    /// The librdkafka property name.
    pub name: &'static str,
    /// Values that agree with the relay's own.
    pub allowed: &'static [&'static str],
    /// What to do instead.
    pub why: &'static str,
}

/// Properties both sides refuse.
const COMMON_RESERVED: &[Reserved] = &[
    Reserved {
        name: "bootstrap.servers",
        allowed: &[],
        why: "use the brokers key",
    },
    Reserved {
        name: "metadata.broker.list",
        allowed: &[],
        why: "use the brokers key",
    },
];

/// The checked `brokers` and `properties` of one side (`sink`/`source`).
#[derive(Debug, Clone)]
pub struct ClientKeys {
    /// `sink` or `source`, for messages.
    side: &'static str,
    /// Comma-separated, not yet expanded.
    brokers: String,
    /// Name and value, not yet expanded.
    properties: Vec<(String, String)>,
}

impl ClientKeys {
    /// Check `brokers` and `properties` of `side`; `reserved` are the
    /// side's own properties it sets itself.
    pub fn parse(
        side: &'static str,
        brokers: Brokers,
        properties: Option<BTreeMap<String, Property>>,
        reserved: &[Reserved],
    ) -> Result<ClientKeys, ConfigError> {
        let list = match brokers {
            Brokers::One(s) => s.split(',').map(|b| b.trim().to_string()).collect(),
            Brokers::Many(v) => v.into_iter().map(|b| b.trim().to_string()).collect(),
        };
        let list: Vec<String> = list;
        if list.is_empty() || list.iter().any(|b| b.is_empty()) {
            return Err(ConfigError::new(
                format!("{side}.brokers"),
                "expected \"host:port[,host:port...]\" or a list of \"host:port\", with no empty entry",
            ));
        }
        let mut props = Vec::new();
        for (name, value) in properties.unwrap_or_default() {
            let key = format!("{side}.properties.{name}");
            let value = value.text();
            if let Some(r) = COMMON_RESERVED
                .iter()
                .chain(reserved)
                .find(|r| r.name == name)
            {
                if !r.allowed.contains(&value.to_ascii_lowercase().as_str()) {
                    return Err(ConfigError::new(
                        key,
                        format!("set by the relay itself: {}", r.why),
                    ));
                }
            }
            // A value from the environment is checked when the pipeline
            // starts; anything else now.
            if !value.contains("${") {
                check_property(&name, &value).map_err(|m| ConfigError::new(key, m))?;
            }
            props.push((name, value));
        }
        Ok(ClientKeys {
            side,
            brokers: list.join(","),
            properties: props,
        })
    }

    /// The brokers as configured (for messages; never secret).
    pub fn shown(&self) -> &str {
        &self.brokers
    }

    /// The names of the topics the brokers have, from a metadata request
    /// (no group joined): what `check --connect` asks of a sink or source.
    pub fn topics(&self, pipeline: &str) -> Result<Vec<String>, ConfigError> {
        let side = self.side;
        let cfg = self
            .client_config(pipeline, &[], &[])
            .map_err(|e| crate::keys::blame(&format!("{side}.brokers"), e))?;
        let producer: BaseProducer = cfg.create().map_err(|e| {
            ConfigError::new(
                format!("{side}.properties"),
                format!("creating a Kafka client: {e}"),
            )
        })?;
        let metadata = producer
            .client()
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|e| {
                ConfigError::new(
                    format!("{side}.brokers"),
                    format!("kafka {}: {e}", self.brokers),
                )
            })?;
        Ok(metadata
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .collect())
    }

    /// A librdkafka config: `fixed` first (the relay's defaults), then the
    /// configured properties, then `forced` (what the relay's guarantees
    /// need), with `${ENV:...}` expanded.
    pub fn client_config(
        &self,
        pipeline: &str,
        defaults: &[(&str, &str)],
        forced: &[(&str, &str)],
    ) -> Result<ClientConfig, Error> {
        let side = self.side;
        let brokers = expand_env(&self.brokers)
            .map_err(|e| Error::permanent(format!("pipeline {pipeline:?}: {side}.brokers: {e}")))?;
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers);
        cfg.set("client.id", format!("pgtrickle-relay/{pipeline}"));
        cfg.set_log_level(RDKafkaLogLevel::Warning);
        for (k, v) in defaults {
            cfg.set(*k, *v);
        }
        for (k, v) in &self.properties {
            let v = expand_env(v).map_err(|e| {
                Error::permanent(format!("pipeline {pipeline:?}: {side}.properties.{k}: {e}"))
            })?;
            check_property(k, &v).map_err(|m| {
                Error::permanent(format!("pipeline {pipeline:?}: {side}.properties.{k}: {m}"))
            })?;
            cfg.set(k.as_str(), v);
        }
        for (k, v) in forced {
            cfg.set(*k, *v);
        }
        Ok(cfg)
    }
}

/// Let librdkafka check one property; the message never holds the value.
fn check_property(name: &str, value: &str) -> Result<(), String> {
    let mut one = ClientConfig::new();
    one.set(name, value);
    match one.create_native_config() {
        Ok(_) => Ok(()),
        Err(KafkaError::ClientConfig(_, desc, _, _)) => {
            let desc = if value.is_empty() {
                desc
            } else {
                desc.replace(value, "***")
            };
            Err(format!("librdkafka refuses it: {desc}"))
        }
        Err(e) => Err(format!("librdkafka refuses it: {e}")),
    }
}

/// Route a librdkafka log line into the relay's log. librdkafka logs
/// connection failures as errors; the pipeline's own retry says what
/// matters, so they are warnings here.
pub fn log_line(pipeline: &str, level: RDKafkaLogLevel, fac: &str, msg: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error
        | RDKafkaLogLevel::Warning => {
            log::warn!("pipeline {pipeline:?}: librdkafka {fac}: {msg}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            log::info!("pipeline {pipeline:?}: librdkafka {fac}: {msg}")
        }
        RDKafkaLogLevel::Debug => log::debug!("pipeline {pipeline:?}: librdkafka {fac}: {msg}"),
    }
}

/// Route a librdkafka client error (broker down, authentication failed)
/// into the log: a broker that is away is reported by the pipeline's
/// retries, so only other errors are warnings.
pub fn client_error(pipeline: &str, error: &KafkaError, reason: &str) {
    let quiet = matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::BrokerTransportFailure)
            | Some(RDKafkaErrorCode::AllBrokersDown)
            | Some(RDKafkaErrorCode::Resolve)
    );
    if quiet {
        log::debug!("pipeline {pipeline:?}: kafka: {error}: {reason}");
    } else {
        log::warn!("pipeline {pipeline:?}: kafka: {error}: {reason}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(brokers: serde_json::Value, props: serde_json::Value) -> Result<ClientKeys, String> {
        ClientKeys::parse(
            "sink",
            serde_json::from_value(brokers).unwrap(),
            serde_json::from_value(props).unwrap(),
            &[Reserved {
                name: "acks",
                allowed: &["all", "-1"],
                why: "every event waits for all in-sync replicas",
            }],
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn brokers_and_properties_are_checked() {
        let k = parse(
            serde_json::json!(["a:9092", " b:9092"]),
            serde_json::json!({"linger.ms": 5, "enable.ssl.certificate.verification": false,
                               "acks": "ALL", "sasl.password": "${ENV:X}"}),
        )
        .unwrap();
        assert_eq!(k.brokers, "a:9092,b:9092");
        assert_eq!(k.properties.len(), 4);
        let e = parse(serde_json::json!("a:1,,b:2"), serde_json::json!(null)).unwrap_err();
        assert!(e.contains("sink.brokers"), "{e}");
        let e = parse(serde_json::json!("a:1"), serde_json::json!({"lingr.ms": 5})).unwrap_err();
        assert!(e.contains("sink.properties.lingr.ms"), "{e}");
        let e = parse(
            serde_json::json!("a:1"),
            serde_json::json!({"linger.ms": "secret-ish"}),
        )
        .unwrap_err();
        assert!(e.contains("sink.properties.linger.ms"), "{e}");
        assert!(!e.contains("secret-ish"), "{e}");
        let e = parse(serde_json::json!("a:1"), serde_json::json!({"acks": "1"})).unwrap_err();
        assert!(
            e.contains("sink.properties.acks") && e.contains("in-sync"),
            "{e}"
        );
        let e = parse(
            serde_json::json!("a:1"),
            serde_json::json!({"bootstrap.servers": "b:1"}),
        )
        .unwrap_err();
        assert!(e.contains("brokers key"), "{e}");
    }
}
