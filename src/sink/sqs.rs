//! The `sqs` sink: events sent to an Amazon SQS queue with
//! `SendMessageBatch`.
//!
//! Keys: [`KEYS`] (README.md and the man page show them); the connection
//! keys are checked by `broker::sqs`.
//!
//! Each event is one message. Its body is the row (the event's payload
//! JSON); its message attributes carry the metadata: `dedup_key`,
//! `subject`, `op`, `outbox_id` (Number), `full_refresh` (`true`/`false`),
//! `refresh_id` and `headers` (the outbox row's headers as JSON) when
//! present, and `traceparent`/`tracestate` when the outbox headers carry a
//! valid W3C trace context (see [`crate::trace`]).
//!
//! FIFO queues (the name ends in `.fifo`): `MessageGroupId` is the
//! `message_group_id` template (`{stream_table}`, `{op}`, `{outbox_id}`,
//! `{refresh_id}`; default `{stream_table}`), and `MessageDeduplicationId`
//! is the event's dedup key, so a replay after a crash is dropped by SQS
//! (within its 5-minute deduplication interval). SQS allows at most 128
//! printable ASCII characters (no space) in both: a value that does not fit
//! is replaced, deterministically, by its first 60 characters (any other
//! character as `_`), `~`, and the SHA-256 of the whole value in hex. The
//! full dedup key is always in the `dedup_key` attribute. Standard queues
//! get no deduplication id, and a `MessageGroupId` only when
//! `message_group_id` is set.
//!
//! Requests carry at most 10 messages and at most `max_message_bytes`
//! (SQS's limit, default 262,144; queues configured for 1 MiB may say
//! 1048576), counting the body and every attribute's name, type and value
//! as SQS does. An event larger than that is dead-lettered before anything
//! is sent. On a standard queue up to `max_in_flight` requests (default 4)
//! are in flight at once; on a FIFO queue they go one after the other, in
//! order. `publish` returns when SQS has answered every request.
//!
//! Failures: a request that fails as a whole (connection, HTTP 5xx,
//! throttling, a missing queue) is transient: the pipeline retries the
//! batch and nothing is committed; refused credentials or access are
//! permanent (retried slowly). An entry SQS refuses for a transient reason
//! is sent again (up to 5 attempts, then the batch is retried). An entry
//! refused for its content ([`EVENT_CODES`]: invalid characters, an
//! invalid attribute or parameter value, too long) is dead-lettered with
//! SQS's code and message, and the batch goes on. Any other entry refusal
//! is a problem of the queue (its KMS key disabled or not accessible, an
//! unsupported operation): the batch fails and is retried slowly, and
//! nothing is dead-lettered.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::broker::sqs::{self, Client, ConnKeys, MAX_BATCH};
use crate::cloudevents::{self, CloudEvents};
use crate::event::{Event, Template, Vars};
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::retry::Error;
use crate::sink::{Rejected, Sink, SinkSpec};
use crate::trace::Context;

/// SQS's message (and batch request) size limit by default.
const DEFAULT_MAX_BYTES: usize = 256 * 1024;
/// The largest limit SQS can be configured with.
const LIMIT_MAX_BYTES: usize = 1024 * 1024;
/// Attempts at entries refused for a transient reason before the whole
/// batch is handed back for a retry.
const ENTRY_ATTEMPTS: u32 = 5;
/// Events encoded at a time (each entry is a JSON tree until it is sent).
const ENCODE_CHUNK: usize = 500;
/// Longest deduplication or group id SQS accepts.
const ID_MAX: usize = 128;
/// Characters of the original value kept before the hash of a mapped id.
const ID_PREFIX: usize = 60;
/// Entry error codes that are about the message itself: only these
/// dead-letter it.
pub const EVENT_CODES: &[&str] = &[
    "InvalidMessageContents",
    "InvalidParameterValue",
    "InvalidAttributeName",
    "InvalidAttributeValue",
    "MessageTooLong",
];

/// Whether an entry's error code is about the message itself (the code
/// with any `com.amazonaws.sqs#` or `AWS.SimpleQueueService.` prefix).
fn about_the_message(code: &str) -> bool {
    let code = code.rsplit('#').next().unwrap_or(code);
    let code = code.strip_prefix("AWS.SimpleQueueService.").unwrap_or(code);
    EVENT_CODES.contains(&code)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SqsKeys {
    #[serde(default)]
    message_group_id: Option<String>,
    #[serde(default)]
    max_message_bytes: Option<usize>,
    #[serde(default)]
    max_in_flight: Option<usize>,
}

/// The `sqs` sink's config.
#[derive(Debug, Clone)]
pub struct SqsConfig {
    conn: ConnKeys,
    group: Option<Template>,
    max_bytes: usize,
    in_flight: usize,
    /// `format: "cloudevents"` (structured mode only).
    cloudevents: Option<CloudEvents>,
}

/// The sink's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    KeySpec::new(
        "queue_url",
        "string",
        Fallback::Required,
        "`https://sqs.<region>.amazonaws.com/<account>/<queue>`; a queue name ending in `.fifo` is a FIFO queue",
    ),
    KeySpec::new(
        "region",
        "string",
        Fallback::Text("`AWS_REGION`, then `AWS_DEFAULT_REGION`, then the region in the queue URL's host"),
        "the signing region",
    ),
    KeySpec::new(
        "endpoint",
        "string",
        Fallback::Text("the scheme and host of `queue_url`"),
        "where requests go (a VPC endpoint, an SQS-compatible server)",
    ),
    KeySpec::new(
        "access_key_id",
        "string",
        Fallback::Text("the AWS credential chain below"),
        "credentials, both or neither",
    ),
    KeySpec::new(
        "secret_access_key",
        "string",
        Fallback::Text("the AWS credential chain below"),
        "credentials, both or neither",
    ),
    KeySpec::new(
        "session_token",
        "string",
        Fallback::Unset,
        "for temporary credentials given in `access_key_id`/`secret_access_key`",
    ),
    sqs::TIMEOUT_KEY,
    KeySpec::new(
        "message_group_id",
        "template",
        Fallback::Text("FIFO queues: `{stream_table}`"),
        "a template like `subject`. FIFO queues: the `MessageGroupId`. Standard queues get a group id only when this is set",
    ),
    KeySpec::new(
        "max_message_bytes",
        "integer",
        Fallback::Value("262144"),
        "the largest message (and request) SQS accepts; 1048576 for a queue configured for 1 MiB messages",
    ),
    KeySpec::new(
        "max_in_flight",
        "integer",
        Fallback::Value("4"),
        "standard queues: requests in flight at once. FIFO queues send one request after the other, in order",
    ),
];

/// Parse the sink's keys.
pub fn parse(mut keys: Map<String, Value>) -> Result<Box<dyn SinkSpec>, ConfigError> {
    let conn = ConnKeys::take(&mut keys, "sink")?;
    let cloudevents = CloudEvents::take(&mut keys, false)?;
    let raw: SqsKeys = from_value("sink", Value::Object(keys))?;
    let group = match raw.message_group_id {
        Some(t) if t.is_empty() => {
            return Err(ConfigError::new(
                "sink.message_group_id",
                "must not be empty",
            ))
        }
        Some(t) => {
            Some(Template::parse(&t).map_err(|m| ConfigError::new("sink.message_group_id", m))?)
        }
        None => None,
    };
    let max_bytes = raw.max_message_bytes.unwrap_or(DEFAULT_MAX_BYTES);
    if !(1024..=LIMIT_MAX_BYTES).contains(&max_bytes) {
        return Err(ConfigError::new(
            "sink.max_message_bytes",
            format!("must be between 1024 and {LIMIT_MAX_BYTES}"),
        ));
    }
    let in_flight = raw.max_in_flight.unwrap_or(4);
    if !(1..=64).contains(&in_flight) {
        return Err(ConfigError::new(
            "sink.max_in_flight",
            "must be between 1 and 64",
        ));
    }
    Ok(Box::new(SqsConfig {
        conn,
        group,
        max_bytes,
        in_flight,
        cloudevents,
    }))
}

impl SinkSpec for SqsConfig {
    fn open(&self, pipeline: &str) -> Result<Box<dyn Sink>, Error> {
        let client = Client::open(&self.conn, pipeline, "sink")?;
        let fifo = client.is_fifo();
        let group = match (&self.group, fifo) {
            (Some(t), _) => Some(t.clone()),
            (None, true) => Some(Template::parse("{stream_table}").expect("a valid template")),
            (None, false) => None,
        };
        log::info!(
            "sending to sqs queue {} ({})",
            client.queue_url(),
            if fifo { "FIFO" } else { "standard" }
        );
        Ok(Box::new(SqsSink {
            client,
            fifo,
            group,
            max_bytes: self.max_bytes,
            in_flight: if fifo { 1 } else { self.in_flight },
            cloudevents: self.cloudevents.clone(),
        }))
    }

    /// The queue answers GetQueueAttributes (it exists, and the
    /// credentials may use it).
    fn check(&self, pipeline: &str) -> Result<(), ConfigError> {
        let client = Client::open(&self.conn, pipeline, "sink")
            .map_err(|e| crate::keys::blame("sink.queue_url", e))?;
        let body = json!({"QueueUrl": client.queue_url(), "AttributeNames": ["QueueArn"]});
        match client.call("GetQueueAttributes", &body, Duration::ZERO) {
            Ok(_) => Ok(()),
            Err(r) if sqs::missing_queue(&r.code) => Err(ConfigError::new(
                "sink.queue_url",
                format!("queue {} does not exist", client.queue_url()),
            )),
            Err(r) => Err(crate::keys::blame("sink.queue_url", r.error)),
        }
    }
}

struct SqsSink {
    client: Client,
    fifo: bool,
    group: Option<Template>,
    max_bytes: usize,
    in_flight: usize,
    /// `format: "cloudevents"` (structured mode only).
    cloudevents: Option<CloudEvents>,
}

/// One message, encoded: the event's index, its `SendMessageBatch` entry,
/// and its size as SQS counts it.
struct Entry {
    index: usize,
    json: Value,
    size: usize,
}

/// `value` if SQS accepts it as a deduplication or group id, else a
/// deterministic stand-in: the first 60 characters (others as `_`), `~`,
/// and the SHA-256 of the whole value in hex.
fn sqs_id(value: &str) -> Cow<'_, str> {
    // SQS allows [A-Za-z0-9] and the ASCII punctuation: ASCII graphic.
    if value.len() <= ID_MAX && !value.is_empty() && value.chars().all(|c| c.is_ascii_graphic()) {
        return Cow::Borrowed(value);
    }
    let mut id: String = value
        .chars()
        .take(ID_PREFIX)
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect();
    id.push('~');
    for b in Sha256::digest(value.as_bytes()) {
        let _ = write!(id, "{b:02x}");
    }
    Cow::Owned(id)
}

impl SqsSink {
    /// Encode event `index`.
    fn entry(&self, index: usize, e: &Event) -> Entry {
        // A structured CloudEvent (the message group is its partitionkey).
        let event = self.cloudevents.as_ref().map(|ce| {
            let group = self.group.as_ref().map(|t| t.render(&Vars::of(e), e.op));
            let mut out = Vec::with_capacity(e.payload.get().len() + 256);
            ce.structured(e, group.as_deref(), &mut out);
            String::from_utf8(out).expect("JSON is UTF-8")
        });
        let body = event.as_deref().unwrap_or(e.payload.get());
        let mut size = body.len();
        let mut attrs = Map::new();
        let mut add = |name: &str, kind: &str, value: &str| {
            // SQS refuses empty attribute values.
            if !value.is_empty() {
                size += name.len() + kind.len() + value.len();
                attrs.insert(
                    name.to_string(),
                    json!({"DataType": kind, "StringValue": value}),
                );
            }
        };
        add("dedup_key", "String", &e.dedup_key);
        add("subject", "String", &e.subject);
        add("op", "String", e.op.as_str());
        add("outbox_id", "Number", &e.outbox_id.to_string());
        add(
            "full_refresh",
            "String",
            if e.is_full_refresh { "true" } else { "false" },
        );
        if let Some(r) = &e.refresh_id {
            add("refresh_id", "String", r);
        }
        if let Some(h) = &e.headers {
            add("headers", "String", h.get());
        }
        if let Some(t) = Context::of(e.headers.as_deref()) {
            for (name, value) in t.headers() {
                add(name, "String", value);
            }
        }
        if event.is_some() {
            add("content-type", "String", cloudevents::STRUCTURED);
        }
        let mut json = json!({
            "Id": index.to_string(),
            "MessageBody": body,
            "MessageAttributes": attrs,
        });
        if let Some(t) = &self.group {
            json["MessageGroupId"] =
                Value::String(sqs_id(&t.render(&Vars::of(e), e.op)).into_owned());
        }
        if self.fifo {
            json["MessageDeduplicationId"] = Value::String(sqs_id(&e.dedup_key).into_owned());
        }
        Entry { index, json, size }
    }

    /// Split `entries` into requests of at most 10 entries and `max_bytes`.
    fn requests<'a>(&self, entries: &[&'a Entry]) -> Vec<Vec<&'a Entry>> {
        let mut out: Vec<Vec<&Entry>> = Vec::new();
        let mut bytes = 0;
        for &e in entries {
            match out.last_mut() {
                Some(last) if last.len() < MAX_BATCH && bytes + e.size <= self.max_bytes => {
                    bytes += e.size;
                    last.push(e);
                }
                _ => {
                    bytes = e.size;
                    out.push(vec![e]);
                }
            }
        }
        out
    }

    /// Send one request; the answer's JSON.
    fn send(&self, request: &[&Entry]) -> Result<Value, Error> {
        let entries: Vec<&Value> = request.iter().map(|e| &e.json).collect();
        let body = json!({"QueueUrl": self.client.queue_url(), "Entries": entries});
        self.client
            .call("SendMessageBatch", &body, Duration::ZERO)
            .map_err(|r| {
                let mut e = r.error;
                if sqs::missing_queue(&r.code) {
                    e.msg.push_str(
                        " (check sink.queue_url and sink.region; retrying until the queue exists)",
                    );
                }
                e
            })
    }

    /// Send every request (`in_flight` at a time, in order when 1); the
    /// answers in request order, or the first error.
    fn send_all(&self, requests: &[Vec<&Entry>]) -> Result<Vec<Value>, Error> {
        let mut answers = Vec::with_capacity(requests.len());
        if self.in_flight <= 1 {
            for r in requests {
                answers.push(self.send(r)?);
            }
            return Ok(answers);
        }
        for wave in requests.chunks(self.in_flight) {
            let results: Vec<Result<Value, Error>> = std::thread::scope(|s| {
                let handles: Vec<_> = wave[1..]
                    .iter()
                    .map(|r| s.spawn(move || self.send(r)))
                    .collect();
                let mut results = vec![self.send(&wave[0])];
                for h in handles {
                    results.push(h.join().unwrap_or_else(|_| {
                        Err(Error::transient("sqs: a sending thread panicked"))
                    }));
                }
                results
            });
            for r in results {
                answers.push(r?);
            }
        }
        Ok(answers)
    }
}

impl Sink for SqsSink {
    fn publish(&mut self, events: &[Event]) -> Result<Vec<Rejected>, Error> {
        let mut rejected = Vec::new();
        // Encoded a slice at a time, so memory does not grow with the batch.
        for (n, slice) in events.chunks(ENCODE_CHUNK).enumerate() {
            self.publish_slice(slice, n * ENCODE_CHUNK, &mut rejected)?;
        }
        rejected.sort_by_key(|r| r.index);
        Ok(rejected)
    }

    fn unroutable(&self, e: &Event) -> Option<String> {
        let ce = || self.cloudevents.as_ref()?.missing(e);
        let group = self.group.as_ref().and_then(|g| g.missing(&Vars::of(e)));
        group.or_else(ce)
    }
}

impl SqsSink {
    /// Publish `events`, the ones at `base..` of the batch; refused ones
    /// are added to `rejected`.
    fn publish_slice(
        &self,
        events: &[Event],
        base: usize,
        rejected: &mut Vec<Rejected>,
    ) -> Result<(), Error> {
        let mut entries = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            let i = base + i;
            let entry = self.entry(i, e);
            if entry.size > self.max_bytes {
                rejected.push(Rejected {
                    index: i,
                    reason: format!(
                        "sqs: the message is {} bytes (body and attributes), over the limit of \
                         {} bytes (sink.max_message_bytes)",
                        entry.size, self.max_bytes
                    ),
                });
            } else {
                entries.push(entry);
            }
        }
        let mut todo: Vec<&Entry> = entries.iter().collect();
        let mut attempt = 0;
        while !todo.is_empty() {
            attempt += 1;
            let requests = self.requests(&todo);
            let answers = self.send_all(&requests)?;
            let mut again = Vec::new();
            let mut why = String::new();
            for (request, answer) in requests.iter().zip(&answers) {
                let failed = sqs::failed_entries(answer);
                let ok = sqs::successful_ids(answer);
                for e in request {
                    let id = e.index.to_string();
                    if let Some(f) = failed.iter().find(|f| f.id == id) {
                        let reason = format!("sqs SendMessageBatch: {}: {}", f.code, f.message);
                        if f.transient {
                            why = reason;
                            again.push(*e);
                        } else if about_the_message(&f.code) {
                            rejected.push(Rejected {
                                index: e.index,
                                reason,
                            });
                        } else {
                            return Err(Error::permanent(format!(
                                "{reason} (a problem of the queue, not of the event: \
                                 retrying, nothing is dead-lettered)"
                            )));
                        }
                    } else if !ok.contains(&id.as_str()) {
                        why = "sqs SendMessageBatch: an entry is missing from the answer".into();
                        again.push(*e);
                    }
                }
            }
            if !again.is_empty() {
                if attempt >= ENTRY_ATTEMPTS {
                    return Err(Error::transient(format!(
                        "{why} ({} entries still refused after {attempt} attempts)",
                        again.len()
                    )));
                }
                log::debug!("sqs: sending {} refused entries again: {why}", again.len());
                std::thread::sleep(Duration::from_millis(100 << attempt));
            }
            todo = again;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn config_errors_name_the_key() {
        let p = |v: Value| parse(keys(v)).unwrap_err().key;
        let q = "https://sqs.eu-west-1.amazonaws.com/1/q.fifo";
        assert_eq!(p(json!({"region": "x"})), "sink.queue_url");
        assert_eq!(
            p(json!({"queue_url": q, "message_group_id": "{nope}"})),
            "sink.message_group_id"
        );
        assert_eq!(
            p(json!({"queue_url": q, "max_message_bytes": 2_000_000})),
            "sink.max_message_bytes"
        );
        assert_eq!(
            p(json!({"queue_url": q, "max_in_flight": 0})),
            "sink.max_in_flight"
        );
        assert_eq!(p(json!({"queue_url": q, "queue": "x"})), "sink.queue");
        let e = parse(keys(
            json!({"queue_url": q, "secret_access_key": "hunter2"}),
        ))
        .unwrap_err();
        assert_eq!(e.key, "sink.access_key_id");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(parse(keys(json!({"queue_url": q, "message_group_id": "{op}"}))).is_ok());
    }

    #[test]
    fn only_codes_about_the_message_dead_letter_it() {
        for c in [
            "InvalidMessageContents",
            "AWS.SimpleQueueService.InvalidParameterValue",
            "com.amazonaws.sqs#InvalidAttributeValue",
        ] {
            assert!(about_the_message(c), "{c}");
        }
        for c in [
            "KMS.DisabledException",
            "KmsAccessDenied",
            "UnsupportedOperation",
            "",
        ] {
            assert!(!about_the_message(c), "{c}");
        }
    }

    #[test]
    fn ids_that_do_not_fit_are_mapped_deterministically() {
        assert_eq!(sqs_id("outbox_orders:42:0"), "outbox_orders:42:0");
        let long = format!("outbox_{}:1:0", "x".repeat(200));
        let a = sqs_id(&long);
        assert_eq!(a, sqs_id(&long));
        assert!(
            a.len() <= ID_MAX && a.chars().all(|c| c.is_ascii_graphic()),
            "{a}"
        );
        assert!(a.starts_with(&long[..ID_PREFIX]));
        assert_ne!(a, sqs_id(&format!("outbox_{}:1:1", "x".repeat(200))));
        let spaced = sqs_id("outbox my table:1:0");
        assert!(spaced.starts_with("outbox_my_table:1:0~"), "{spaced}");
        assert_ne!(spaced, sqs_id("outbox_my_table:1:0"));
        assert_eq!(
            sqs_id("a c"),
            "a_c~a9573e0ed68e10d0d61a596168c094f8cbcbb7380cd9ef6bce3fb34cc167e219"
        );
    }
}
