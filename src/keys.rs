//! Parsing config keys, for the pipeline config ([`crate::config`]) and for
//! every sink and source alike: the error that names the bad key, typed
//! extraction, and the lookup of a sink or source type in its registry.
//! A leaf module: it knows no sink, source or pipeline.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

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

/// What a key holds when a config leaves it out, as the docs show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The key must be given.
    Required,
    /// Nothing: what the key sets is not done (no trimming, no signing...).
    Unset,
    /// This value, as the config would write it (shown as code).
    Value(&'static str),
    /// What this Markdown text says (a flag, a value found at run time).
    Text(&'static str),
}

/// One config key of a sink, a source or a pipeline: the one place its
/// name, type, default and meaning are written. The parser refuses a key
/// that has no spec ([`known`]); the key tables of README.md and of the
/// man page are checked against the specs by the tests of `keydocs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpec {
    /// The key, as written in the config.
    pub name: &'static str,
    /// What it holds, in words: `string`, `integer`, `boolean`,
    /// `template`, `object`, `list of strings`...
    pub kind: &'static str,
    /// What it is when left out.
    pub default: Fallback,
    /// What it does: one line of Markdown (a row of a README table).
    pub doc: &'static str,
}

impl KeySpec {
    /// A key spec (short to write in a table of them).
    pub const fn new(
        name: &'static str,
        kind: &'static str,
        default: Fallback,
        doc: &'static str,
    ) -> KeySpec {
        KeySpec {
            name,
            kind,
            default,
            doc,
        }
    }
}

/// A sink or source type of a registry: its name, its parser (which gets
/// the config's keys but those every sink or source has), and its keys.
#[derive(Debug)]
pub struct Plugin<P> {
    /// The `type` that selects it.
    pub name: &'static str,
    /// Parses its keys; called once [`known`] accepted every one of them.
    pub parse: P,
    /// Every key of its own.
    pub keys: &'static [KeySpec],
    /// Keys it shares with some others (documented once, where they are
    /// defined), e.g. the CloudEvents keys.
    pub also: &'static [KeySpec],
}

impl<P> Plugin<P> {
    /// A registry row.
    pub const fn new(name: &'static str, parse: P, keys: &'static [KeySpec]) -> Plugin<P> {
        Plugin::sharing(name, parse, keys, &[])
    }

    /// A registry row taking the shared keys `also` too.
    pub const fn sharing(
        name: &'static str,
        parse: P,
        keys: &'static [KeySpec],
        also: &'static [KeySpec],
    ) -> Plugin<P> {
        Plugin {
            name,
            parse,
            keys,
            also,
        }
    }
}

/// The plugin registered for `kind` in a sink or source registry (`what`
/// is `"sink"` or `"source"`), or an error at `<what>.type` that lists the
/// types this binary has.
pub fn registered<'r, P>(
    what: &str,
    kind: &str,
    registry: &'r [Plugin<P>],
) -> Result<&'r Plugin<P>, ConfigError> {
    match registry.iter().find(|p| p.name == kind) {
        Some(p) => Ok(p),
        None => Err(ConfigError::new(
            format!("{what}.type"),
            format!(
                "unknown {what} type {kind:?} (this binary has: {})",
                registry
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Refuse a key of `keys` that no table of `specs` lists, at
/// `<what>.<key>`, with the words serde uses for an unknown field.
pub fn known(
    what: &str,
    specs: &[&[KeySpec]],
    keys: &Map<String, Value>,
) -> Result<(), ConfigError> {
    let mut all = specs.iter().flat_map(|t| t.iter());
    match keys.keys().find(|k| !all.clone().any(|s| s.name == *k)) {
        None => Ok(()),
        Some(k) => {
            let names: Vec<String> = all.by_ref().map(|s| format!("`{}`", s.name)).collect();
            let expected = match names.as_slice() {
                [] => "there are no fields".to_string(),
                [one] => format!("expected {one}"),
                [a, b] => format!("expected {a} or {b}"),
                all => format!("expected one of {}", all.join(", ")),
            };
            Err(ConfigError::new(
                format!("{what}.{k}"),
                format!("unknown field `{k}`, {expected}"),
            ))
        }
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
