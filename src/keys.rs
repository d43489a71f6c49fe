//! Parsing config keys, for the pipeline config ([`crate::config`]) and for
//! every sink and source alike: the error that names the bad key, typed
//! extraction, and the lookup of a sink or source type in its registry.
//! A leaf module: it knows no sink, source or pipeline.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::Error;

/// A bad key in a pipeline's config.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// Dotted path of the key, e.g. `sink.rotate_bytes`.
    pub key: String,
    /// What is wrong with it.
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}`: {}", self.key, self.msg)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error about `key`: `msg` says what is wrong with it (a message,
    /// or the error of the parser that refused its value).
    pub fn new(key: impl Into<String>, msg: impl fmt::Display) -> ConfigError {
        ConfigError {
            key: key.into(),
            msg: msg.to_string(),
        }
    }
}

/// An error met while checking a pipeline's connection (`check
/// --connect`), as a [`ConfigError`] about the key at fault: the key the
/// message names (`pipeline "p": sink.exchange: ...`), else `key`.
pub fn blame(key: &str, e: Error) -> ConfigError {
    let msg = match e.msg.strip_prefix("pipeline \"") {
        Some(rest) => rest.split_once("\": ").map_or(e.msg.as_str(), |(_, m)| m),
        None => e.msg.as_str(),
    };
    let named = msg.split_once(": ").filter(|(k, _)| {
        (k.starts_with("sink.") || k.starts_with("source.")) && !k.contains(char::is_whitespace)
    });
    match named {
        Some((k, m)) => ConfigError::new(k, m),
        None => ConfigError::new(key, msg),
    }
}

/// The parser registered for `kind` in a sink or source registry (`what`
/// is `"sink"` or `"source"`), or an error at `<what>.type` that lists the
/// types this binary has.
pub fn registered<P: Copy>(
    what: &str,
    kind: &str,
    registry: &[(&str, P)],
) -> Result<P, ConfigError> {
    match registry.iter().find(|(name, _)| *name == kind) {
        Some((_, parse)) => Ok(*parse),
        None => Err(ConfigError::new(
            format!("{what}.type"),
            format!(
                "unknown {what} type {kind:?} (this binary has: {})",
                registry
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Deserialize `v` into `T`, reporting the failing key as `prefix.path`.
pub fn from_value<T: DeserializeOwned>(prefix: &str, v: Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." || path.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{path}")
        };
        let msg = redact(&e.inner().to_string());
        // serde reports a missing field at its parent: name the field.
        let key = match msg.strip_prefix("missing field `") {
            Some(rest) => format!("{key}.{}", rest.split('`').next().unwrap_or("")),
            None => key,
        };
        ConfigError::new(key, msg)
    })
}

/// serde quotes the offending value (`invalid type: string "..."`); it may
/// be a password or token put under the wrong key, so drop it.
fn redact(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(" \"") {
        out.push_str(&rest[..i]);
        match rest[i + 2..].find('"') {
            Some(j) => rest = &rest[i + 2 + j + 1..],
            None => {
                rest = "";
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blame_takes_the_key_an_error_names_else_the_one_given() {
        let named = Error::permanent("pipeline \"p\": sink.exchange: exchange \"x\" is missing");
        assert_eq!(
            blame("sink.url", named),
            ConfigError::new("sink.exchange", "exchange \"x\" is missing")
        );
        let plain = Error::transient("redis 127.0.0.1:1: connection refused");
        assert_eq!(
            blame("sink.url", plain),
            ConfigError::new("sink.url", "redis 127.0.0.1:1: connection refused")
        );
        // A message that merely has a colon is not a key.
        let prose = Error::transient("pipeline \"p\": nats a.b: timed out");
        assert_eq!(blame("sink.url", prose).key, "sink.url");
    }
}
