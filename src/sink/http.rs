//! The `http` sink: events POSTed to a webhook as JSON.
//!
//! Config: `{"type":"http", "url":"https://...", "mode":"batch"|"event",
//! "headers":{"Authorization":"Bearer ${ENV:TOKEN}"}, "timeout_ms":N,
//! "signing_secret":"${ENV:SECRET}"}`. `${ENV:NAME}` is replaced in `url`,
//! header values and `signing_secret`.
//!
//! Requests: `POST url` with `Content-Type: application/json`.
//! - `mode: "batch"` (default): one request per batch, the body a JSON
//!   array of event envelopes (each with its `dedup_key`), and
//!   `Idempotency-Key: <first dedup key>..<last dedup key>`.
//! - `mode: "event"`: one request per event, the body the event envelope,
//!   and `Idempotency-Key: <dedup key>`.
//!
//! Signing: with `signing_secret`, every request also carries
//! `Pgtrickle-Timestamp: <unix seconds>` and
//! `Pgtrickle-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`,
//! i.e. the signed string is the timestamp header's value, a dot, and the
//! exact body bytes.
//!
//! Answers: 2xx is delivered. 408, 429, 5xx, timeouts and connection errors
//! are transient: the batch is retried (after `Retry-After` seconds when
//! the answer has that header, at most 4 s, so a stop request is not held
//! up; the caller's backoff comes on top). Any other status is a
//! permanent refusal: the event (mode `event`) or every event of the
//! request (mode `batch`) is dead-lettered with the status and the start of
//! the answer's body. Redirects are not followed.

use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::config::{from_value, ConfigError};
use crate::event::Event;
use crate::pg::{expand_env, mask};
use crate::retry::Error;
use crate::sink::{Rejected, Sink, SinkSpec};

/// The longest `Retry-After` honoured by sleeping (below the relay's
/// shutdown grace, so SIGTERM still ends the relay in time).
const RETRY_AFTER_CAP: Duration = Duration::from_secs(4);
/// Bytes of an answer's body kept for a dead letter's error.
const BODY_SNIPPET: usize = 300;

/// One request per batch or per event.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A JSON array per batch.
    #[default]
    Batch,
    /// One envelope per request.
    Event,
}

/// The `http` sink's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpKeys {
    url: String,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    headers: Map<String, Value>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    signing_secret: Option<String>,
}

/// Parse the sink's keys.
pub fn parse(keys: Map<String, Value>) -> Result<Box<dyn SinkSpec>, ConfigError> {
    let cfg: HttpKeys = from_value("sink", Value::Object(keys))?;
    if !(cfg.url.starts_with("http://") || cfg.url.starts_with("https://")) {
        return Err(ConfigError::new(
            "sink.url",
            format!(
                "expected an http:// or https:// URL, found {:?}",
                mask(&cfg.url)
            ),
        ));
    }
    for (k, v) in &cfg.headers {
        if !v.is_string() {
            return Err(ConfigError::new(
                format!("sink.headers.{k}"),
                format!("expected a string, found {v}"),
            ));
        }
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err(ConfigError::new(
                format!("sink.headers.{k}"),
                "not a valid header name",
            ));
        }
    }
    if cfg.timeout_ms == Some(0) {
        return Err(ConfigError::new("sink.timeout_ms", "must be at least 1"));
    }
    if cfg.signing_secret.as_deref() == Some("") {
        return Err(ConfigError::new("sink.signing_secret", "must not be empty"));
    }
    Ok(Box::new(cfg))
}

impl SinkSpec for HttpKeys {
    fn open(&self, pipeline: &str) -> Result<Box<dyn Sink>, Error> {
        let env = |key: &str, v: &str| {
            expand_env(v)
                .map_err(|e| Error::permanent(format!("pipeline {pipeline:?}: {key}: {e}")))
        };
        let url = env("sink.url", &self.url)?;
        let mut headers = Vec::new();
        for (k, v) in &self.headers {
            let v = env(&format!("sink.headers.{k}"), v.as_str().unwrap_or(""))?;
            headers.push((k.clone(), v));
        }
        let secret = match &self.signing_secret {
            Some(s) => Some(env("sink.signing_secret", s)?.into_bytes()),
            None => None,
        };
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::NativeTls)
            .root_certs(ureq::tls::RootCerts::PlatformVerifier)
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(
                self.timeout_ms.unwrap_or(10_000),
            )))
            .http_status_as_error(false)
            .max_redirects(0)
            .tls_config(tls)
            .user_agent(concat!("pgtrickle-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Box::new(HttpSink {
            mode: self.mode,
            shown: mask(&url),
            url,
            headers,
            secret,
            agent,
            body: Vec::with_capacity(64 * 1024),
        }))
    }
}

struct HttpSink {
    mode: Mode,
    url: String,
    /// `url` with a password masked, for messages.
    shown: String,
    headers: Vec<(String, String)>,
    secret: Option<Vec<u8>>,
    agent: ureq::Agent,
    body: Vec<u8>,
}

/// What became of one request.
enum Outcome {
    Delivered,
    /// Refused for good: why.
    Refused(String),
}

/// `Pgtrickle-Signature` for `body` signed at `timestamp`.
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(3 + bytes.len() * 2);
    hex.push_str("v1=");
    for b in bytes {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// A transient status: timeout, rate limit, server error.
fn transient_status(s: u16) -> bool {
    s == 408 || s == 429 || s >= 500
}

impl HttpSink {
    /// POST `self.body` with `key` as the idempotency key.
    fn post(&mut self, key: &str) -> Result<Outcome, Error> {
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", key);
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(secret) = &self.secret {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
                .to_string();
            req = req
                .header("Pgtrickle-Signature", signature(secret, &ts, &self.body))
                .header("Pgtrickle-Timestamp", ts);
        }
        let mut resp = match req.send(&self.body[..]) {
            Ok(r) => r,
            Err(e) => return Err(Error::transient(format!("http POST {}: {e}", self.shown))),
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let mut snippet = Vec::new();
        let _ = resp
            .body_mut()
            .as_reader()
            .take(BODY_SNIPPET as u64)
            .read_to_end(&mut snippet);
        let snippet = String::from_utf8_lossy(&snippet).trim().to_string();
        let what = if snippet.is_empty() {
            format!("http POST {}: status {status}", self.shown)
        } else {
            format!("http POST {}: status {status}: {snippet}", self.shown)
        };
        if (200..300).contains(&status) {
            Ok(Outcome::Delivered)
        } else if transient_status(status) {
            if let Some(secs) = retry_after {
                std::thread::sleep(Duration::from_secs(secs).min(RETRY_AFTER_CAP));
            }
            Err(Error::transient(what))
        } else {
            Ok(Outcome::Refused(what))
        }
    }
}

impl Sink for HttpSink {
    fn publish(&mut self, events: &[Event]) -> Result<Vec<Rejected>, Error> {
        let mut rejected = Vec::new();
        let encode = |body: &mut Vec<u8>, e: &Event| -> Result<(), Error> {
            serde_json::to_writer(body, e)
                .map_err(|x| Error::permanent(format!("encoding {}: {x}", e.dedup_key)))
        };
        match self.mode {
            Mode::Event => {
                for (i, e) in events.iter().enumerate() {
                    self.body.clear();
                    encode(&mut self.body, e)?;
                    if let Outcome::Refused(why) = self.post(&e.dedup_key)? {
                        rejected.push(Rejected {
                            index: i,
                            reason: why,
                        });
                    }
                }
            }
            Mode::Batch => {
                let (Some(first), Some(last)) = (events.first(), events.last()) else {
                    return Ok(rejected);
                };
                self.body.clear();
                self.body.push(b'[');
                for (i, e) in events.iter().enumerate() {
                    if i > 0 {
                        self.body.push(b',');
                    }
                    encode(&mut self.body, e)?;
                }
                self.body.push(b']');
                let key = format!("{}..{}", first.dedup_key, last.dedup_key);
                if let Outcome::Refused(why) = self.post(&key)? {
                    rejected.extend((0..events.len()).map(|index| Rejected {
                        index,
                        reason: why.clone(),
                    }));
                }
            }
        }
        Ok(rejected)
    }

    fn flush(&mut self) -> Result<(), Error> {
        // Every request was answered before publish returned.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hex_hmac(key: &[u8], msg: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
        mac.update(msg);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231, test case 2.
        assert_eq!(
            hex_hmac(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            signature(b"s3cret", "1700000000", br#"[{"a":1}]"#),
            format!("v1={}", hex_hmac(b"s3cret", br#"1700000000.[{"a":1}]"#))
        );
    }

    #[test]
    fn config_errors_name_the_key() {
        let p = |v: Value| parse(v.as_object().unwrap().clone()).unwrap_err().key;
        assert_eq!(p(json!({"mode": "batch"})), "sink.url");
        assert_eq!(p(json!({"url": "ftp://x"})), "sink.url");
        assert_eq!(p(json!({"url": "http://x", "mode": "bulk"})), "sink.mode");
        assert_eq!(
            p(json!({"url": "http://x", "headers": {"X-A": 1}})),
            "sink.headers.X-A"
        );
        assert_eq!(
            p(json!({"url": "http://x", "timeout_ms": 0})),
            "sink.timeout_ms"
        );
        assert_eq!(p(json!({"url": "http://x", "secret": "s"})), "sink.secret");
    }
}
