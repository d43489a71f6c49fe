//! The `http` sink: events POSTed to a webhook as JSON.
//!
//! Keys: [`KEYS`] (README.md and the man page show them).
//!
//! Requests: `POST url` with `Content-Type: application/json`.
//! - `mode: "batch"` (default): one request per batch, the body a JSON
//!   array of event envelopes (each with its `dedup_key`), and
//!   `Idempotency-Key: <first dedup key>..<last dedup key>`.
//! - `mode: "event"`: one request per event, the body the event envelope,
//!   and `Idempotency-Key: <dedup key>`.
//!
//! Trace context: a request of one event whose outbox headers hold a valid
//! W3C `traceparent` (see [`crate::trace`]) carries it, and its
//! `tracestate`, as the `traceparent` and `tracestate` headers; a batch
//! request does when all its events carry the same one.
//!
//! Signing: with `signing_secret`, every request also carries a signature
//! of its exact body, by `signing_scheme` (see [`crate::signing`]):
//! - `pgtrickle` (default): `Pgtrickle-Timestamp: <unix seconds>` and
//!   `Pgtrickle-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
//! - `standard_webhooks`: `webhook-id` (the request's `Idempotency-Key`,
//!   the same on every retry), `webhook-timestamp` and `webhook-signature:
//!   v1,<base64 HMAC-SHA256>` as the Standard Webhooks specification says;
//!   the secret is base64, optionally after `whsec_`.
//!
//! Answers, classified by what the status says about the request:
//! - 2xx: delivered.
//! - 400 and 422 (the receiver refuses the content): in mode `event` the
//!   event is dead-lettered with the status and the start of the answer's
//!   body; in mode `batch` the request is split in halves and each half
//!   sent again (with its own `Idempotency-Key`), down to the events the
//!   receiver refuses alone, which are dead-lettered. 413 (too large) is
//!   split the same way; an event refused alone with 413 is dead-lettered.
//! - 408, 409, 425, 429, 5xx, timeouts and connection errors: transient,
//!   the batch is retried with backoff (after `Retry-After` seconds when
//!   the answer has that header, at most 4 s, so a stop request is not held
//!   up; the caller's backoff comes on top).
//! - Anything else (3xx: redirects are not followed; 401, 403, 404, 405,
//!   407, 410, ...): a problem of the endpoint or of the sink's config (a
//!   rotated token, a moved endpoint): the batch is retried slowly until it
//!   is fixed, and nothing is dead-lettered. The pipeline shows `retrying`
//!   with the status in `/health` meanwhile.

use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::cloudevents::{self, CloudEvents, Mode as CeMode};
use crate::event::Event;
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::pg::{expand_env, mask};
use crate::retry::Error;
use crate::signing::{self, Scheme};
use crate::sink::{Rejected, Sink, SinkSpec};
use crate::trace::Context;

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
    #[serde(default)]
    signing_scheme: Option<Scheme>,
    /// `format: "cloudevents"` (its keys are taken out before parsing).
    #[serde(skip)]
    cloudevents: Option<CloudEvents>,
}

/// The sink's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    KeySpec::new(
        "url",
        "string",
        Fallback::Required,
        "`http://` or `https://` (TLS checked against the system's CAs); `${ENV:NAME}` is replaced",
    ),
    KeySpec::new(
        "mode",
        "string",
        Fallback::Value("batch"),
        "`batch`: one request per batch, whose body is a JSON array of event envelopes, with `Idempotency-Key: <first dedup key>..<last dedup key>` (each envelope carries its own `dedup_key`). `event`: one request per event, whose body is the envelope, with `Idempotency-Key: <dedup key>`",
    ),
    KeySpec::new(
        "headers",
        "object",
        Fallback::Unset,
        r#"extra request headers, an object of name → string. Values may use `${ENV:NAME}`, for example `{"Authorization": "Bearer ${ENV:HOOK_TOKEN}"}`"#,
    ),
    KeySpec::new(
        "timeout_ms",
        "integer",
        Fallback::Value("10000"),
        "the time limit of a request, connecting included",
    ),
    KeySpec::new(
        "signing_secret",
        "string",
        Fallback::Text("no signature"),
        "sign every request (`${ENV:NAME}` is replaced), by `signing_scheme`. The receiver recomputes the signature and should reject old timestamps",
    ),
    KeySpec::new(
        "signing_scheme",
        "string",
        Fallback::Value("pgtrickle"),
        r#"`pgtrickle`: `Pgtrickle-Timestamp: <unix seconds>` and `Pgtrickle-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>` over the exact body bytes. `standard_webhooks`: the [Standard Webhooks](https://www.standardwebhooks.com/) headers `webhook-id` (the request's `Idempotency-Key`, the same on every retry), `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`, where the secret is base64, optionally after `whsec_` (as Svix and the Standard Webhooks libraries issue them), so their verifiers accept what the relay sends. Checked against the specification's published test vector"#,
    ),
];

/// Parse the sink's keys.
pub fn parse(mut keys: Map<String, Value>) -> Result<Box<dyn SinkSpec>, ConfigError> {
    let cloudevents = CloudEvents::take(&mut keys, true)?;
    let mut cfg: HttpKeys = from_value("sink", Value::Object(keys))?;
    if cloudevents
        .as_ref()
        .is_some_and(|c| c.mode == CeMode::Binary)
        && cfg.mode == Mode::Batch
    {
        return Err(ConfigError::new(
            "sink.cloudevents_mode",
            "binary mode sends one event per request: set sink.mode \"event\" too",
        ));
    }
    cfg.cloudevents = cloudevents;
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
    match (&cfg.signing_secret, cfg.signing_scheme) {
        (Some(s), _) if s.is_empty() => {
            return Err(ConfigError::new("sink.signing_secret", "must not be empty"));
        }
        (Some(s), scheme) if !s.contains("${") => {
            signing::key(scheme.unwrap_or_default(), s)
                .map_err(|why| ConfigError::new("sink.signing_secret", why))?;
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "sink.signing_scheme",
                "needs sink.signing_secret",
            ));
        }
        _ => {}
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
        let signer = match &self.signing_secret {
            Some(s) => {
                let scheme = self.signing_scheme.unwrap_or_default();
                let key = signing::key(scheme, &env("sink.signing_secret", s)?).map_err(|why| {
                    Error::permanent(format!("pipeline {pipeline:?}: sink.signing_secret: {why}"))
                })?;
                Some((scheme, key))
            }
            None => None,
        };
        let agent = crate::broker::http::agent(Some(Duration::from_millis(
            self.timeout_ms.unwrap_or(10_000),
        )));
        Ok(Box::new(HttpSink {
            mode: self.mode,
            shown: mask(&url),
            url,
            headers,
            signer,
            agent,
            body: Vec::with_capacity(64 * 1024),
            cloudevents: self.cloudevents.clone(),
            content_type: "application/json",
            attributes: Vec::new(),
        }))
    }

    /// The URL's host resolves and accepts a connection (no request is
    /// sent).
    fn check(&self, _pipeline: &str) -> Result<(), ConfigError> {
        use std::net::{TcpStream, ToSocketAddrs};
        let url = expand_env(&self.url).map_err(|e| crate::keys::blame("sink.url", e))?;
        let fail = |m: String| ConfigError::new("sink.url", format!("{}: {m}", mask(&url)));
        let (https, rest) = match url.split_once("://") {
            Some(("https", r)) => (true, r),
            Some(("http", r)) => (false, r),
            _ => return Err(fail("expected an http:// or https:// URL".into())),
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host_port = authority.rsplit('@').next().unwrap_or("");
        let addr = match host_port.rsplit_once(':') {
            Some((_, p)) if p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty() => {
                host_port.to_string()
            }
            _ => format!("{host_port}:{}", if https { 443 } else { 80 }),
        };
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .map_err(|e| fail(format!("resolving {addr}: {e}")))?
            .collect();
        let timeout = Duration::from_millis(self.timeout_ms.unwrap_or(10_000));
        let mut last = String::from("no address");
        for a in &addrs {
            match TcpStream::connect_timeout(a, timeout) {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(fail(format!("connecting to {addr}: {last}")))
    }
}

struct HttpSink {
    mode: Mode,
    url: String,
    /// `url` with a password masked, for messages.
    shown: String,
    headers: Vec<(String, String)>,
    /// The signature scheme and its HMAC key.
    signer: Option<(Scheme, Vec<u8>)>,
    agent: ureq::Agent,
    body: Vec<u8>,
    /// `format: "cloudevents"`.
    cloudevents: Option<CloudEvents>,
    /// The `Content-Type` of the next request.
    content_type: &'static str,
    /// The next request's CloudEvents binary-mode headers (`ce-*`).
    attributes: Vec<(String, String)>,
}

/// What became of one request.
enum Outcome {
    Delivered,
    /// The receiver refused the content (400, 422, 413): why.
    Refused(String),
}

/// What an answer's status means.
#[derive(Debug, PartialEq)]
enum Status {
    /// 2xx.
    Delivered,
    /// 400, 422, 413: something in the request's events.
    Content,
    /// Timeout, rate limit, conflict, server error: try again soon.
    Transient,
    /// Authentication, a moved or missing endpoint, a method not allowed:
    /// the endpoint or the config needs fixing; try again slowly.
    Endpoint,
}

fn classify(status: u16) -> Status {
    match status {
        200..=299 => Status::Delivered,
        400 | 413 | 422 => Status::Content,
        408 | 409 | 425 | 429 | 500..=599 => Status::Transient,
        _ => Status::Endpoint,
    }
}

impl HttpSink {
    /// POST `self.body` with `key` as the idempotency key and the trace
    /// context `trace` as `traceparent`/`tracestate` headers.
    fn post(&mut self, key: &str, trace: Option<&Context>) -> Result<Outcome, Error> {
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", self.content_type)
            .header("Idempotency-Key", key);
        for (k, v) in self.attributes.iter().chain(&self.headers) {
            req = req.header(k.as_str(), v.as_str());
        }
        for (name, value) in trace.iter().flat_map(|t| t.headers()) {
            req = req.header(name, value);
        }
        if let Some((scheme, key_bytes)) = &self.signer {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
                .to_string();
            req = match scheme {
                Scheme::Pgtrickle => req
                    .header(
                        "Pgtrickle-Signature",
                        signing::pgtrickle(key_bytes, &ts, &self.body),
                    )
                    .header("Pgtrickle-Timestamp", ts),
                Scheme::StandardWebhooks => req
                    .header(
                        "webhook-signature",
                        signing::standard(key_bytes, key, &ts, &self.body),
                    )
                    .header("webhook-id", key)
                    .header("webhook-timestamp", ts),
            };
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
        match classify(status) {
            Status::Delivered => Ok(Outcome::Delivered),
            Status::Content => Ok(Outcome::Refused(what)),
            Status::Transient => {
                if let Some(secs) = retry_after {
                    std::thread::sleep(Duration::from_secs(secs).min(RETRY_AFTER_CAP));
                }
                Err(Error::transient(what))
            }
            Status::Endpoint => Err(Error::permanent(format!(
                "{what} (a problem of the endpoint or of sink.url/sink.headers, not of the \
                 events: retrying, nothing is dead-lettered)"
            ))),
        }
    }

    /// POST `events` as one batch; a content refusal splits it in halves
    /// until the events refused alone are found (`base` is the index of
    /// `events[0]` in the published slice).
    fn batch(
        &mut self,
        events: &[Event],
        base: usize,
        rejected: &mut Vec<Rejected>,
    ) -> Result<(), Error> {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Ok(());
        };
        self.body.clear();
        self.body.push(b'[');
        for (i, e) in events.iter().enumerate() {
            if i > 0 {
                self.body.push(b',');
            }
            match &self.cloudevents {
                Some(ce) => ce.structured(e, None, &mut self.body),
                None => encode(&mut self.body, e)?,
            }
        }
        self.body.push(b']');
        self.content_type = match self.cloudevents {
            Some(_) => cloudevents::BATCH,
            None => "application/json",
        };
        let key = format!("{}..{}", first.dedup_key, last.dedup_key);
        match self.post(&key, common_trace(events).as_ref())? {
            Outcome::Delivered => Ok(()),
            Outcome::Refused(why) if events.len() == 1 => {
                rejected.push(Rejected {
                    index: base,
                    reason: why,
                });
                Ok(())
            }
            Outcome::Refused(why) => {
                log::debug!(
                    "{why}: sending the {} events of the request again in two halves to find \
                     the refused ones",
                    events.len()
                );
                let mid = events.len() / 2;
                self.batch(&events[..mid], base, rejected)?;
                self.batch(&events[mid..], base + mid, rejected)
            }
        }
    }
}

/// The trace context of a batch request: the one every event of it carries
/// (e.g. the events of one transaction), else none (each envelope's
/// `headers` still hold its own).
fn common_trace(events: &[Event]) -> Option<Context> {
    let (first, rest) = events.split_first()?;
    let t = Context::of(first.headers.as_deref())?;
    rest.iter()
        .all(|e| Context::of(e.headers.as_deref()).as_ref() == Some(&t))
        .then_some(t)
}

/// Append the envelope of `e` to `body`.
fn encode(body: &mut Vec<u8>, e: &Event) -> Result<(), Error> {
    serde_json::to_writer(body, e)
        .map_err(|x| Error::permanent(format!("encoding {}: {x}", e.dedup_key)))
}

impl Sink for HttpSink {
    fn publish(&mut self, events: &[Event]) -> Result<Vec<Rejected>, Error> {
        let mut rejected = Vec::new();
        match self.mode {
            Mode::Event => {
                for (i, e) in events.iter().enumerate() {
                    self.body.clear();
                    self.attributes.clear();
                    self.content_type = "application/json";
                    match &self.cloudevents {
                        None => encode(&mut self.body, e)?,
                        Some(ce) if ce.mode == CeMode::Structured => {
                            ce.structured(e, None, &mut self.body);
                            self.content_type = cloudevents::STRUCTURED;
                        }
                        Some(ce) => {
                            self.body.extend_from_slice(e.payload.get().as_bytes());
                            self.attributes = ce.headers(e, None, "ce-", true);
                            self.content_type = cloudevents::DATA_CONTENT_TYPE;
                        }
                    }
                    let trace = Context::of(e.headers.as_deref());
                    if let Outcome::Refused(why) = self.post(&e.dedup_key, trace.as_ref())? {
                        rejected.push(Rejected {
                            index: i,
                            reason: why,
                        });
                    }
                }
            }
            Mode::Batch => self.batch(events, 0, &mut rejected)?,
        }
        Ok(rejected)
    }

    fn unroutable(&self, e: &Event) -> Option<String> {
        self.cloudevents.as_ref()?.missing(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_batch_request_carries_the_trace_context_all_its_events_share() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let event = |headers: Option<String>| Event {
            dedup_key: "outbox_orders:1:0".into(),
            subject: "s".into(),
            op: crate::event::Op::Insert,
            payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
            is_full_refresh: false,
            outbox_id: 1,
            refresh_id: None,
            headers: headers.map(|h| serde_json::value::RawValue::from_string(h).unwrap()),
            stream_table: "orders".into(),
            created_at: None,
        };
        let traced = |t: &str| event(Some(json!({"traceparent": t, "x": 1}).to_string()));
        let same = [traced(tp), traced(tp)];
        assert_eq!(common_trace(&same).unwrap().traceparent, tp);
        assert_eq!(common_trace(&same[..1]).unwrap().traceparent, tp);
        assert_eq!(common_trace(&[traced(tp), traced(other)]), None);
        assert_eq!(common_trace(&[traced(tp), event(None)]), None);
        assert_eq!(common_trace(&[event(None), traced(tp)]), None);
        assert_eq!(common_trace(&[]), None);
    }

    #[test]
    fn statuses_are_classified_by_what_they_say() {
        for s in [200, 201, 204] {
            assert_eq!(classify(s), Status::Delivered, "{s}");
        }
        for s in [400, 413, 422] {
            assert_eq!(classify(s), Status::Content, "{s}");
        }
        for s in [408, 409, 425, 429, 500, 502, 503, 504] {
            assert_eq!(classify(s), Status::Transient, "{s}");
        }
        for s in [
            100, 301, 302, 307, 308, 401, 403, 404, 405, 407, 410, 415, 451,
        ] {
            assert_eq!(classify(s), Status::Endpoint, "{s}");
        }
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
        assert_eq!(
            p(json!({"url": "http://x", "signing_scheme": "standard_webhooks"})),
            "sink.signing_scheme"
        );
        assert_eq!(
            p(json!({"url": "http://x", "signing_scheme": "hmac"})),
            "sink.signing_scheme"
        );
        let not_base64 = json!({"url": "http://x", "signing_scheme": "standard_webhooks",
                                "signing_secret": "whsec_not base64"});
        let err = parse(not_base64.as_object().unwrap().clone()).unwrap_err();
        assert_eq!(err.key, "sink.signing_secret");
        assert!(!err.to_string().contains("not base64"), "{err}");
    }
}
