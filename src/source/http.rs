//! The `http` source: a webhook receiver (built on tiny_http) into the inbox.
//!
//! Keys: [`KEYS`] (README.md and the man page show them).
//!
//! Requests: `POST <path>` with one JSON object or a JSON array of objects.
//! Answers, in the order checked: 405 for another method, 404 for another
//! path, 401 without `Authorization: Bearer <token>` (when `token` is set),
//! 413 for a body above `max_body_bytes`, 401 without a valid signature
//! (when `signing_secret` is set: `signing_scheme` `pgtrickle`, the
//! default, checks `Pgtrickle-Signature` as the `http` sink signs;
//! `standard_webhooks` checks `webhook-signature` of the Standard Webhooks
//! specification, see [`crate::signing`]; timestamps at most 5 minutes
//! off), 400 with a reason for a body that is not JSON or an event without
//! an id.
//!
//! The inbox `event_id` is the id the event carries itself: the
//! `dedup_key` of our envelope (what the `http` sink sends), else a
//! CloudEvents `id` (an object with `specversion`), else the `id_field`
//! field. Only an event without one gets the `Idempotency-Key` header,
//! else the `webhook-id` header (Standard Webhooks: the same on every
//! retry) (for an array, `<key>:<index>`): that key names a request, and a
//! sender that retries with other batch boundaries sends other keys. An
//! event with no id at all is refused with 400, because a webhook without
//! an id cannot be deduplicated. The payload is the object's `payload`
//! field, else the whole object.
//!
//! 200 (`{"accepted": n}`) is answered only after the inbox transaction
//! holding the request's events committed (in `Source::ack`). A request
//! whose batch is not committed within 30 s (PostgreSQL down) gets 503, so
//! the sender retries; the inbox absorbs the duplicates.

use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Map, Value};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::pg::expand_env;
use crate::retry::Error;
use crate::signing::{self, Scheme};
use crate::source::decode::{json_text, CloudEvent, Origin, Origins, ATTRIBUTES};
use crate::source::{feed, own_id, Batch, Feed, Message, Source, SourceSpec};
use crate::trace;

/// Threads taking requests, so one slow client does not hold up the rest.
const WORKERS: usize = 8;
/// How long a request waits for its inbox commit before 503.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest clock difference accepted for a signed request.
const MAX_SKEW_SECS: u64 = 300;
const DEFAULT_MAX_BODY: u64 = 1024 * 1024;

/// The `http` source's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {
    listen: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    signing_secret: Option<String>,
    #[serde(default)]
    signing_scheme: Option<Scheme>,
    #[serde(default)]
    max_body_bytes: Option<u64>,
    #[serde(default)]
    id_field: Option<String>,
}

/// The `http` source as configured: its keys, and where its message
/// attributes come from (taken out of the keys before they are parsed).
#[derive(Debug, Clone)]
struct HttpSourceSpec {
    cfg: HttpSourceConfig,
    origins: Origins,
}

/// Where an attribute comes from by default, and what its key holds.
const FROM: &str = "the field of the same name";
const WHERE: &str = r#"where each column comes from: `{"header": "X-Name"}`, `{"field": "name"}`, or a fixed string"#;

/// The source's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    KeySpec::new(
        "listen",
        "string",
        Fallback::Required,
        "the address to listen on, e.g. `127.0.0.1:8080`. With port 0 the system picks a port, and the log line `listening for webhooks on http://ADDR/PATH` shows it",
    ),
    KeySpec::new(
        "path",
        "string",
        Fallback::Value("/"),
        "the path webhooks are POSTed to (a query string is ignored)",
    ),
    KeySpec::new(
        "token",
        "string",
        Fallback::Text("no token"),
        "when set, every request needs `Authorization: Bearer <token>`. `${ENV:NAME}` is expanded",
    ),
    KeySpec::new(
        "signing_secret",
        "string",
        Fallback::Text("no signature"),
        "when set, every request needs a valid signature by `signing_scheme`; timestamps more than 5 minutes off are refused (401). `${ENV:NAME}` is expanded",
    ),
    KeySpec::new(
        "signing_scheme",
        "string",
        Fallback::Value("pgtrickle"),
        "`pgtrickle`: the `Pgtrickle-Timestamp`/`Pgtrickle-Signature` the `http` sink sends by default. `standard_webhooks`: `webhook-id`, `webhook-timestamp` and `webhook-signature` of the [Standard Webhooks](https://www.standardwebhooks.com/) specification (secret in base64, optionally after `whsec_`; any one of several space-separated signatures may match, for senders rotating secrets). An event without an id of its own takes `Idempotency-Key`, else `webhook-id`",
    ),
    KeySpec::new(
        "max_body_bytes",
        "integer",
        Fallback::Value("1048576"),
        "the largest body accepted (1 MiB by default)",
    ),
    KeySpec::new(
        "id_field",
        "string",
        Fallback::Value("event_id"),
        "the JSON field with the event id, for an event that is not our envelope or a CloudEvents event",
    ),
    Origin::key("event_type", FROM, WHERE),
    Origin::key("aggregate_id", FROM, WHERE),
    Origin::key("source", FROM, WHERE),
    Origin::key(
        "trace_id",
        "a valid W3C `traceparent` (the event's field or its `headers` object's, else the request's header; see \"Trace context\"), else the field of the same name",
        WHERE,
    ),
];

/// Parse the source's keys.
pub fn parse(mut keys: Map<String, Value>) -> Result<Box<dyn SourceSpec>, ConfigError> {
    let origins = Origins::take(&mut keys, "source")?;
    let cfg: HttpSourceConfig = from_value("source", Value::Object(keys))?;
    let resolves = cfg
        .listen
        .to_socket_addrs()
        .map(|mut a| a.next().is_some())
        .unwrap_or(false);
    if !resolves {
        return Err(ConfigError::new(
            "source.listen",
            format!(
                "expected an address like 127.0.0.1:8080, found {:?}",
                cfg.listen
            ),
        ));
    }
    if let Some(p) = &cfg.path {
        if !p.starts_with('/') {
            return Err(ConfigError::new("source.path", "must start with /"));
        }
    }
    if cfg.max_body_bytes == Some(0) {
        return Err(ConfigError::new(
            "source.max_body_bytes",
            "must be at least 1",
        ));
    }
    if cfg.id_field.as_deref() == Some("") {
        return Err(ConfigError::new("source.id_field", "must not be empty"));
    }
    for (k, v) in [
        ("token", &cfg.token),
        ("signing_secret", &cfg.signing_secret),
    ] {
        if v.as_deref() == Some("") {
            return Err(ConfigError::new(format!("source.{k}"), "must not be empty"));
        }
    }
    match (&cfg.signing_secret, cfg.signing_scheme) {
        (Some(s), scheme) if !s.contains("${") => {
            signing::key(scheme.unwrap_or_default(), s)
                .map_err(|why| ConfigError::new("source.signing_secret", why))?;
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "source.signing_scheme",
                "needs source.signing_secret",
            ));
        }
        _ => {}
    }
    Ok(Box::new(HttpSourceSpec { cfg, origins }))
}

/// What the workers need to turn a request into messages.
struct Rules {
    path: String,
    token: Option<String>,
    /// The signature scheme and its HMAC key.
    signer: Option<(Scheme, Vec<u8>)>,
    max_body: u64,
    id_field: String,
    /// By default an attribute is the field of its own name (`trace_id`:
    /// after the event's W3C traceparent, else the request's).
    origins: Origins,
}

/// One accepted request: its messages and where to say they committed.
struct Pending {
    messages: Vec<Message>,
    done: SyncSender<()>,
}

impl SourceSpec for HttpSourceSpec {
    fn open(&self, pipeline: &str, once: bool) -> Result<Box<dyn Feed>, Error> {
        let env = |key: &str, v: &Option<String>| -> Result<Option<String>, Error> {
            match v {
                None => Ok(None),
                Some(v) => expand_env(v).map(Some).map_err(|e| {
                    Error::permanent(format!("pipeline {pipeline:?}: source.{key}: {e}"))
                }),
            }
        };
        let rules = Arc::new(Rules {
            path: self.cfg.path.clone().unwrap_or_else(|| "/".into()),
            token: env("token", &self.cfg.token)?,
            signer: match env("signing_secret", &self.cfg.signing_secret)? {
                None => None,
                Some(secret) => {
                    let scheme = self.cfg.signing_scheme.unwrap_or_default();
                    let key = signing::key(scheme, &secret).map_err(|why| {
                        Error::permanent(format!(
                            "pipeline {pipeline:?}: source.signing_secret: {why}"
                        ))
                    })?;
                    Some((scheme, key))
                }
            },
            max_body: self.cfg.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY),
            id_field: self
                .cfg
                .id_field
                .clone()
                .unwrap_or_else(|| "event_id".into()),
            origins: self.origins.clone(),
        });
        // Binding may fail for a moment while a previous instance's server
        // winds down: transient.
        let server = Server::http(self.cfg.listen.as_str())
            .map_err(|e| Error::transient(format!("listening on {}: {e}", self.cfg.listen)))?;
        let server = Arc::new(server);
        let addr: Option<SocketAddr> = server.server_addr().to_ip();
        let shown = addr.map_or_else(|| self.cfg.listen.clone(), |a| a.to_string());
        log::info!("listening for webhooks on http://{shown}{}", rules.path);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = sync_channel::<Pending>(WORKERS * 2);
        for i in 0..WORKERS {
            // Workers hold the server weakly: dropping the source closes it.
            let (server, rules, stop, tx) = (
                Arc::downgrade(&server),
                rules.clone(),
                stop.clone(),
                tx.clone(),
            );
            let name = pipeline.to_string();
            std::thread::Builder::new()
                .name(format!("webhook-{i}"))
                .spawn(move || {
                    crate::logging::set_pipeline(&name);
                    worker(&server, &rules, &stop, &tx)
                })
                .map_err(|e| Error::permanent(format!("spawning a webhook thread: {e}")))?;
        }
        Ok(feed(HttpSource {
            server,
            stop,
            rx,
            next: None,
            once,
        }))
    }
}

struct HttpSource {
    server: Arc<Server>,
    stop: Arc<AtomicBool>,
    rx: Receiver<Pending>,
    /// A request received that did not fit the last batch.
    next: Option<Pending>,
    once: bool,
}

impl Source for HttpSource {
    /// Where to say that a request's events committed.
    type Receipt = SyncSender<()>;

    fn receive(
        &mut self,
        batch: &mut Batch<SyncSender<()>>,
        max: usize,
        wait: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + wait;
        loop {
            let p = match self.next.take() {
                Some(p) => p,
                None => {
                    let until = if batch.messages.is_empty() {
                        deadline.saturating_duration_since(Instant::now())
                    } else {
                        Duration::ZERO
                    };
                    match self.rx.recv_timeout(until) {
                        Ok(p) => p,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            return Err(Error::permanent("the webhook threads ended"))
                        }
                    }
                }
            };
            // A request's events go into one batch: keep it for the next
            // one when it does not fit (unless it is the first).
            if !batch.messages.is_empty() && batch.messages.len() + p.messages.len() > max {
                self.next = Some(p);
                break;
            }
            batch.messages.extend(p.messages);
            batch.receipts.push(p.done);
            if batch.messages.len() >= max {
                break;
            }
        }
        if self.once && batch.messages.is_empty() {
            batch.end_of_input = true;
        }
        Ok(())
    }

    fn ack(&mut self, receipts: Vec<SyncSender<()>>) -> Result<(), Error> {
        for done in receipts {
            // The sender may have given up (503) already: nothing to do.
            let _ = done.try_send(());
        }
        Ok(())
    }
}

impl Drop for HttpSource {
    fn drop(&mut self) {
        // Unacknowledged requests get 503 (their senders are dropped).
        self.next = None;
        self.stop.store(true, Ordering::SeqCst);
        for _ in 0..WORKERS {
            self.server.unblock();
        }
    }
}

fn worker(server: &Weak<Server>, rules: &Rules, stop: &AtomicBool, tx: &SyncSender<Pending>) {
    while !stop.load(Ordering::SeqCst) {
        let Some(strong) = server.upgrade() else {
            return;
        };
        let next = strong.recv_timeout(Duration::from_millis(200));
        drop(strong);
        match next {
            Ok(Some(req)) => handle(req, rules, stop, tx),
            Ok(None) => {}
            Err(e) => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                log::debug!("webhook connection: {e}");
            }
        }
    }
}

fn json_header() -> Header {
    Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]).expect("valid header")
}

/// Answer `status` with `{"error": why}` (or `body` as is for 200).
fn answer(req: Request, status: u16, body: String) {
    let resp = Response::from_string(body)
        .with_status_code(status)
        .with_header(json_header());
    if let Err(e) = req.respond(resp) {
        log::debug!("answering a webhook: {e}");
    }
}

fn refuse(req: Request, status: u16, why: &str) {
    log::debug!("webhook refused with {status}: {why}");
    answer(req, status, serde_json::json!({ "error": why }).to_string());
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// Compare without an early exit on the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn handle(mut req: Request, rules: &Rules, stop: &AtomicBool, tx: &SyncSender<Pending>) {
    if *req.method() != Method::Post {
        return refuse(req, 405, "only POST is accepted");
    }
    let path = req.url().split('?').next().unwrap_or("");
    if path != rules.path {
        return refuse(req, 404, "no webhook at this path");
    }
    if let Some(token) = &rules.token {
        let given = header(&req, "Authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same(given.trim().as_bytes(), token.as_bytes()) {
            return refuse(req, 401, "missing or wrong bearer token");
        }
    }
    let too_big = format!("body larger than {} bytes", rules.max_body);
    if req.body_length().is_some_and(|n| n as u64 > rules.max_body) {
        return refuse(req, 413, &too_big);
    }
    let mut body = Vec::new();
    if let Err(e) = req
        .as_reader()
        .take(rules.max_body + 1)
        .read_to_end(&mut body)
    {
        log::debug!("reading a webhook body: {e}");
        return refuse(req, 400, "could not read the body");
    }
    if body.len() as u64 > rules.max_body {
        return refuse(req, 413, &too_big);
    }
    if let Some(expected) = req.body_length() {
        if body.len() != expected {
            return refuse(req, 400, "body shorter than its Content-Length");
        }
    }
    if let Some((scheme, key)) = &rules.signer {
        if let Err(why) = check_signature(&req, *scheme, key, &body) {
            return refuse(req, 401, &why);
        }
    }
    let messages = match to_messages(&req, rules, &body) {
        Ok(m) => m,
        Err(why) => return refuse(req, 400, &why),
    };
    let n = messages.len();
    if n == 0 {
        return answer(req, 200, r#"{"accepted":0}"#.into());
    }
    let (done, committed) = sync_channel(1);
    if tx.send(Pending { messages, done }).is_err() || stop.load(Ordering::SeqCst) {
        return refuse(req, 503, "the relay is stopping; retry later");
    }
    match committed.recv_timeout(COMMIT_TIMEOUT) {
        Ok(()) => answer(req, 200, format!(r#"{{"accepted":{n}}}"#)),
        Err(_) => refuse(
            req,
            503,
            "the inbox did not commit in time (PostgreSQL unavailable?); retry later",
        ),
    }
}

/// Whether the request carries a valid, recent signature of `body`.
fn check_signature(req: &Request, scheme: Scheme, key: &[u8], body: &[u8]) -> Result<(), String> {
    let (ts_header, sig_header) = match scheme {
        Scheme::Pgtrickle => ("Pgtrickle-Timestamp", "Pgtrickle-Signature"),
        Scheme::StandardWebhooks => ("webhook-timestamp", "webhook-signature"),
    };
    let missing = |h: &str| format!("missing {h} header");
    let ts = header(req, ts_header)
        .ok_or_else(|| missing(ts_header))?
        .trim();
    let sig = header(req, sig_header).ok_or_else(|| missing(sig_header))?;
    let secs: u64 = ts
        .parse()
        .map_err(|_| format!("{ts_header} is not a number of seconds"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if now.abs_diff(secs) > MAX_SKEW_SECS {
        return Err(format!("{ts_header} is more than 5 minutes off"));
    }
    let valid = match scheme {
        Scheme::Pgtrickle => same(
            sig.trim().as_bytes(),
            signing::pgtrickle(key, ts, body).as_bytes(),
        ),
        Scheme::StandardWebhooks => {
            let id = header(req, "webhook-id").ok_or_else(|| missing("webhook-id"))?;
            signing::standard_matches(key, id, ts, body, sig)
        }
    };
    if !valid {
        return Err(format!("bad {sig_header}"));
    }
    Ok(())
}

fn attribute(req: &Request, obj: &Map<String, Value>, from: &Origin) -> Option<String> {
    from.value(|h| header(req, h).map(str::to_string), Some(obj))
}

/// The request's events, or why it is refused.
fn to_messages(req: &Request, rules: &Rules, body: &[u8]) -> Result<Vec<Message>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON ({e})"))?;
    let (objects, array) = match value {
        Value::Array(items) => (items, true),
        obj @ Value::Object(_) => (vec![obj], false),
        _ => return Err("body must be a JSON object or an array of objects".into()),
    };
    let key = ["Idempotency-Key", "webhook-id"]
        .into_iter()
        .find_map(|h| header(req, h).map(str::trim).filter(|k| !k.is_empty()));
    let content_type = header(req, "Content-Type");
    // Binary mode is one event per request (ce-* headers, the body its data).
    let binary = match array {
        false => CloudEvent::binary(|h| header(req, h).map(str::to_string)),
        true => None,
    };
    let mut out = Vec::with_capacity(objects.len());
    for (i, v) in objects.into_iter().enumerate() {
        let Value::Object(obj) = v else {
            return Err(format!("event {i} is not a JSON object"));
        };
        let ce = binary
            .clone()
            .or_else(|| CloudEvent::structured(content_type, Some(&obj)));
        // The event's own id first: a resent event keeps its row however
        // the sender batched it (the key names the request).
        let own = ce
            .as_ref()
            .and_then(|ce| ce.id.clone())
            .or_else(|| own_id(&obj))
            .or_else(|| json_text(&obj, &rules.id_field).filter(|id| !id.is_empty()));
        let event_id = match (own, key) {
            (Some(id), _) => id,
            (None, Some(k)) if array => format!("{k}:{i}"),
            (None, Some(k)) => k.to_string(),
            (None, None) => {
                return Err(format!(
                    "event {i} has no id: no {:?} field, no dedup_key (our envelope), no \
                     CloudEvents id and no Idempotency-Key header (a webhook without an id \
                     cannot be deduplicated)",
                    rules.id_field
                ))
            }
        };
        let payload = match obj.get("payload").filter(|_| ce.is_none()) {
            Some(p) => p.to_string(),
            None => Value::Object(obj.clone()).to_string(),
        };
        let [event_type, aggregate_id, source, trace_id] = rules.origins.read(
            |o| attribute(req, &obj, o),
            || {
                trace::traceparent(trace::in_object(&obj))
                    .or_else(|| trace::traceparent(header(req, trace::TRACEPARENT)))
            },
            |name| json_text(&obj, name),
        );
        let mut message = Message {
            event_id,
            event_type,
            aggregate_id,
            source,
            trace_id,
            payload,
            error: None,
        };
        if let Some(ce) = ce {
            ce.apply(&mut message, rules.origins.configured(&ATTRIBUTES));
        }
        out.push(message);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn signing_config_errors_name_the_key() {
        let p = |v: Value| parse(v.as_object().unwrap().clone()).unwrap_err().key;
        let listen = "127.0.0.1:1";
        assert_eq!(
            p(json!({"listen": listen, "signing_scheme": "standard_webhooks"})),
            "source.signing_scheme"
        );
        assert_eq!(
            p(
                json!({"listen": listen, "signing_secret": "whsec_!!", "signing_scheme": "standard_webhooks"})
            ),
            "source.signing_secret"
        );
        assert_eq!(
            p(json!({"listen": listen, "signing_secret": "s", "signing_scheme": "svix"})),
            "source.signing_scheme"
        );
    }
}
