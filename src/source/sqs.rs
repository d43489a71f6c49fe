//! The `sqs` source: an Amazon SQS queue into the inbox.
//!
//! Keys: [`KEYS`] (README.md and the man page show them); the connection
//! keys are checked by `broker::sqs`.
//!
//! Receiving: `ReceiveMessage` with up to 10 messages per call; the first
//! call of a batch long-polls for `wait_time_seconds` (0 to 20, default 4:
//! below the relay's shutdown grace, so SIGTERM is not held up), and more
//! calls without waiting fill the batch up to `batch_size` until
//! `max_wait_ms` has passed or the queue has nothing more to give. A call
//! that fails while a batch is filled ends it: the messages received
//! before are written and deleted, then the error is reported (the
//! failed call received nothing, so nothing else is deleted).
//!
//! Acknowledging: the messages of a batch are deleted
//! (`DeleteMessageBatch`) only after the inbox transaction holding them
//! committed. Until then they are invisible for the visibility timeout
//! (`visibility_timeout` seconds, else the queue's own, read with
//! `GetQueueAttributes`, else 30 s); while a batch is still being filled,
//! messages held for more than half of it are extended
//! (`ChangeMessageVisibilityBatch`). A message whose timeout ran out (the
//! inbox was unwritable for longer, or the relay died) is delivered again,
//! and the inbox's `ON CONFLICT (event_id) DO NOTHING` absorbs the repeat.
//!
//! The inbox `event_id` is the message's `MessageDeduplicationId` (FIFO
//! queues), else its `dedup_key` message attribute (set by the `sqs` sink),
//! else the id the body carries itself (our envelope's `dedup_key`, a
//! CloudEvents `id`; see `source::own_id`), else its `MessageId`. The payload is the body, which must be JSON; a
//! body that is not goes into the inbox as a dead letter (`{"raw": "<text>"}`,
//! with the reason in `error`, in `<inbox>_dlq`) and is deleted like the
//! rest. `event_type`, `aggregate_id`, `source` and `trace_id` come from a
//! message attribute (`{"header": "name"}`), a field of the JSON body
//! (`{"field": "name"}`), or a fixed string; by default from the message
//! attribute of the same name, else the body's field of that name (for
//! `trace_id`, first the W3C `traceparent` message attribute when it is a
//! valid one, see [`crate::trace`]).

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::broker::sqs::{self, Client, ConnKeys, MAX_BATCH};
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::retry::Error;
use crate::source::decode::{dead_letter, json_text, Body, CloudEvent, Origin, Origins};
use crate::source::{feed, own_id, Batch, Feed, Message, Source, SourceSpec};
use crate::trace;

/// The default long-poll wait, seconds.
const DEFAULT_WAIT: u64 = 4;
/// The visibility timeout assumed when the queue's cannot be read.
const DEFAULT_VISIBILITY: u64 = 30;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SqsSourceKeys {
    #[serde(default)]
    wait_time_seconds: Option<u64>,
    #[serde(default)]
    visibility_timeout: Option<u64>,
}

/// The `sqs` source's config.
#[derive(Debug, Clone)]
pub struct SqsSourceConfig {
    conn: ConnKeys,
    keys: SqsSourceKeys,
    origins: Origins,
}

/// Where an attribute comes from by default, and what its key holds.
const FROM: &str = "the message attribute of the same name, else the body's field";
const WHERE: &str = r#"where each column comes from: `{"header": "name"}` (a message attribute), `{"field": "name"}` (a field of the JSON body), or a fixed string"#;

/// The source's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    KeySpec::new(
        "queue_url",
        "string",
        Fallback::Required,
        "the queue's URL, as for the `sqs` sink",
    ),
    KeySpec::new(
        "region",
        "string",
        Fallback::Text(
            "as for the `sqs` sink (credentials: the AWS credential chain described there)",
        ),
        "as for the `sqs` sink",
    ),
    KeySpec::new(
        "endpoint",
        "string",
        Fallback::Text(
            "as for the `sqs` sink (credentials: the AWS credential chain described there)",
        ),
        "as for the `sqs` sink",
    ),
    KeySpec::new(
        "access_key_id",
        "string",
        Fallback::Text(
            "as for the `sqs` sink (credentials: the AWS credential chain described there)",
        ),
        "as for the `sqs` sink",
    ),
    KeySpec::new(
        "secret_access_key",
        "string",
        Fallback::Text(
            "as for the `sqs` sink (credentials: the AWS credential chain described there)",
        ),
        "as for the `sqs` sink",
    ),
    KeySpec::new(
        "session_token",
        "string",
        Fallback::Text(
            "as for the `sqs` sink (credentials: the AWS credential chain described there)",
        ),
        "as for the `sqs` sink",
    ),
    sqs::TIMEOUT_KEY,
    KeySpec::new(
        "wait_time_seconds",
        "integer",
        Fallback::Value("4"),
        "the long poll of a batch's first `ReceiveMessage` (0 to 20); the default is below the relay's shutdown grace",
    ),
    KeySpec::new(
        "visibility_timeout",
        "integer",
        Fallback::Text("the queue's own (read with `GetQueueAttributes`; 30 if the credentials may not read it)"),
        "seconds a received message stays invisible to other consumers",
    ),
    Origin::key("event_type", FROM, WHERE),
    Origin::key("aggregate_id", FROM, WHERE),
    Origin::key("source", FROM, WHERE),
    Origin::key(
        "trace_id",
        "a valid W3C `traceparent` message attribute (see \"Trace context\"), else the message attribute of the same name, else the body's field",
        WHERE,
    ),
];

/// Parse the source's keys.
pub fn parse(mut keys: Map<String, Value>) -> Result<Box<dyn SourceSpec>, ConfigError> {
    let conn = ConnKeys::take(&mut keys, "source")?;
    let origins = Origins::take(&mut keys, "source")?;
    let raw: SqsSourceKeys = from_value("source", Value::Object(keys))?;
    if raw.wait_time_seconds.is_some_and(|w| w > 20) {
        return Err(ConfigError::new(
            "source.wait_time_seconds",
            "must be between 0 and 20 (SQS's limit)",
        ));
    }
    if raw
        .visibility_timeout
        .is_some_and(|v| !(1..=43_200).contains(&v))
    {
        return Err(ConfigError::new(
            "source.visibility_timeout",
            "must be between 1 and 43200 seconds (SQS's limits)",
        ));
    }
    Ok(Box::new(SqsSourceConfig {
        conn,
        keys: raw,
        origins,
    }))
}

impl SourceSpec for SqsSourceConfig {
    fn open(&self, pipeline: &str, once: bool) -> Result<Box<dyn Feed>, Error> {
        let client = Client::open(&self.conn, pipeline, "source")?;
        let visibility = match self.keys.visibility_timeout {
            Some(v) => v,
            None => queue_visibility(&client)?,
        };
        log::info!(
            "receiving from sqs queue {} (visibility timeout {visibility} s)",
            client.queue_url()
        );
        Ok(feed(SqsSource {
            client,
            wait: self.keys.wait_time_seconds.unwrap_or(DEFAULT_WAIT),
            visibility_timeout: self.keys.visibility_timeout,
            visibility: Duration::from_secs(visibility),
            origins: self.origins.clone(),
            undeleted: Vec::new(),
            once,
        }))
    }

    /// The queue answers GetQueueAttributes (it exists, and the
    /// credentials may use it).
    fn check(&self, pipeline: &str) -> Result<(), ConfigError> {
        let client = Client::open(&self.conn, pipeline, "source")
            .map_err(|e| crate::keys::blame("source.queue_url", e))?;
        let body = json!({"QueueUrl": client.queue_url(), "AttributeNames": ["QueueArn"]});
        match client.call("GetQueueAttributes", &body, Duration::ZERO) {
            Ok(_) => Ok(()),
            Err(r) if sqs::missing_queue(&r.code) => Err(ConfigError::new(
                "source.queue_url",
                format!("queue {} does not exist", client.queue_url()),
            )),
            Err(r) => Err(crate::keys::blame("source.queue_url", r.error)),
        }
    }
}

/// The queue's visibility timeout, seconds; the default when the
/// credentials may not read it.
fn queue_visibility(client: &Client) -> Result<u64, Error> {
    let body = json!({"QueueUrl": client.queue_url(), "AttributeNames": ["VisibilityTimeout"]});
    match client.call("GetQueueAttributes", &body, Duration::ZERO) {
        Ok(a) => Ok(a["Attributes"]["VisibilityTimeout"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_VISIBILITY)),
        Err(r) if r.code == "AccessDenied" || r.code == "AccessDeniedException" => {
            log::warn!(
                "{}; assuming a visibility timeout of {DEFAULT_VISIBILITY} s (set source.visibility_timeout)",
                r.error
            );
            Ok(DEFAULT_VISIBILITY)
        }
        Err(r) => Err(r.error),
    }
}

/// A received message not yet deleted.
#[derive(Clone)]
struct Held {
    receipt: String,
    since: Instant,
}

struct SqsSource {
    client: Client,
    /// Long-poll wait of a batch's first call, seconds.
    wait: u64,
    /// The configured visibility timeout (None: the queue's).
    visibility_timeout: Option<u64>,
    /// The visibility timeout in force.
    visibility: Duration,
    origins: Origins,
    /// Written to the inbox, but their delete failed: deleted with the
    /// next batch.
    undeleted: Vec<Held>,
    /// `--once`: end when a long poll brings nothing.
    once: bool,
}

/// A message attribute's value as text (String and Number types).
fn attribute(m: &Value, name: &str) -> Option<String> {
    m["MessageAttributes"][name]["StringValue"]
        .as_str()
        .map(str::to_string)
}

impl SqsSource {
    /// Turn one received message into an inbox message.
    fn message(&self, m: &Value) -> Message {
        let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_string);
        let message_id = text(&m["MessageId"]).unwrap_or_default();
        let body = Body::from_text(m["Body"].as_str().unwrap_or("").to_string());
        let error = body.problem.as_ref().map(|e| {
            dead_letter(format!(
                "sqs queue {} message {message_id}: body is not valid JSON ({e})",
                self.client.queue_url()
            ))
        });
        let obj = body.object();
        let event_id = text(&m["Attributes"]["MessageDeduplicationId"])
            .or_else(|| attribute(m, "dedup_key").filter(|k| !k.is_empty()))
            .or_else(|| own_id(obj?))
            .unwrap_or_else(|| message_id.clone());
        let content_type = attribute(m, "content-type");
        let ce = CloudEvent::recognise(|h| attribute(m, h), content_type.as_deref(), obj);
        // By default an attribute is the message attribute, else the
        // body's field, of its own name.
        let [event_type, aggregate_id, source, trace_id] = self.origins.read(
            |o| o.value(|h| attribute(m, h), obj),
            || trace::traceparent(attribute(m, trace::TRACEPARENT).as_deref()),
            |name| attribute(m, name).or_else(|| json_text(obj?, name)),
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
            ce.apply(&mut message, self.origins.configured(&[]));
        }
        message
    }

    /// One `ReceiveMessage` call.
    fn receive_once(&self, max: usize, wait: u64) -> Result<Vec<Value>, Error> {
        let mut body = json!({
            "QueueUrl": self.client.queue_url(),
            "MaxNumberOfMessages": max.clamp(1, MAX_BATCH),
            "WaitTimeSeconds": wait,
            "AttributeNames": ["MessageDeduplicationId"],
            "MessageSystemAttributeNames": ["MessageDeduplicationId"],
            "MessageAttributeNames": ["All"],
        });
        if let Some(v) = self.visibility_timeout {
            body["VisibilityTimeout"] = json!(v);
        }
        let answer = self
            .client
            .call("ReceiveMessage", &body, Duration::from_secs(wait))
            .map_err(|r| r.error)?;
        Ok(answer["Messages"].as_array().cloned().unwrap_or_default())
    }

    /// Extend the visibility of held messages once they are held for half
    /// of it. A failure is only logged: the messages may then be delivered
    /// again, which the inbox absorbs.
    fn extend(&self, held: &mut [Held]) {
        let due = held
            .first()
            .is_some_and(|h| h.since.elapsed() >= self.visibility / 2);
        if !due {
            return;
        }
        let secs = self.visibility.as_secs();
        for chunk in held.chunks_mut(MAX_BATCH) {
            let entries: Vec<Value> = chunk
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    json!({"Id": i.to_string(), "ReceiptHandle": h.receipt, "VisibilityTimeout": secs})
                })
                .collect();
            let body = json!({"QueueUrl": self.client.queue_url(), "Entries": entries});
            match self
                .client
                .call("ChangeMessageVisibilityBatch", &body, Duration::ZERO)
            {
                Ok(a) => {
                    let failed = sqs::failed_entries(&a);
                    for (i, h) in chunk.iter_mut().enumerate() {
                        if !failed.iter().any(|f| f.id == i.to_string()) {
                            h.since = Instant::now();
                        }
                    }
                    if let Some(f) = failed.first() {
                        log::warn!(
                            "sqs: extending the visibility of {} messages failed ({}: {}); they \
                             may be delivered again",
                            failed.len(),
                            f.code,
                            f.message
                        );
                    }
                }
                Err(r) => log::warn!("{}; the messages held may be delivered again", r.error),
            }
        }
    }
}

impl Source for SqsSource {
    type Receipt = Held;

    fn receive(
        &mut self,
        batch: &mut Batch<Held>,
        max: usize,
        wait: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + wait;
        loop {
            self.extend(&mut batch.receipts);
            let mut undeleted = std::mem::take(&mut self.undeleted);
            self.extend(&mut undeleted);
            self.undeleted = undeleted;
            let first = batch.messages.is_empty();
            let got = self.receive_once(
                max - batch.messages.len(),
                if first { self.wait } else { 0 },
            )?;
            let empty = got.is_empty();
            for m in &got {
                batch.messages.push(self.message(m));
                batch.receipts.push(Held {
                    receipt: m["ReceiptHandle"].as_str().unwrap_or("").to_string(),
                    since: Instant::now(),
                });
            }
            if empty || batch.messages.len() >= max || Instant::now() >= deadline {
                break;
            }
        }
        batch.end_of_input = self.once && batch.messages.is_empty();
        Ok(())
    }

    fn ack(&mut self, receipts: Vec<Held>) -> Result<(), Error> {
        let mut kept = Vec::new();
        let mut error = None;
        let mut held = std::mem::take(&mut self.undeleted);
        held.extend(receipts);
        for chunk in held.chunks(MAX_BATCH) {
            let entries: Vec<Value> = chunk
                .iter()
                .enumerate()
                .map(|(i, h)| json!({"Id": i.to_string(), "ReceiptHandle": h.receipt}))
                .collect();
            let body = json!({"QueueUrl": self.client.queue_url(), "Entries": entries});
            let answer = match self
                .client
                .call("DeleteMessageBatch", &body, Duration::ZERO)
            {
                Ok(a) => a,
                Err(r) => {
                    // Kept: deleted with the next batch, or delivered again
                    // after the visibility timeout (the inbox absorbs it).
                    kept.extend(chunk.iter().cloned());
                    error = Some(r.error);
                    continue;
                }
            };
            for f in sqs::failed_entries(&answer) {
                let Some(h) = f.id.parse::<usize>().ok().and_then(|i| chunk.get(i)) else {
                    continue;
                };
                if f.transient {
                    kept.push(h.clone());
                    error = Some(Error::transient(format!(
                        "sqs DeleteMessageBatch on {}: {}: {}",
                        self.client.queue_url(),
                        f.code,
                        f.message
                    )));
                } else {
                    // An expired receipt handle: the message comes again
                    // and the inbox absorbs it.
                    log::warn!(
                        "sqs: deleting a message from {} failed ({}: {}); it will be delivered \
                         again and absorbed by the inbox",
                        self.client.queue_url(),
                        f.code,
                        f.message
                    );
                }
            }
        }
        self.undeleted = kept;
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
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
        let q = "https://sqs.eu-west-1.amazonaws.com/1/q";
        assert_eq!(p(json!({"region": "r"})), "source.queue_url");
        assert_eq!(
            p(json!({"queue_url": q, "wait_time_seconds": 21})),
            "source.wait_time_seconds"
        );
        assert_eq!(
            p(json!({"queue_url": q, "visibility_timeout": 0})),
            "source.visibility_timeout"
        );
        assert_eq!(
            p(json!({"queue_url": q, "event_type": 5})),
            "source.event_type"
        );
        assert_eq!(p(json!({"queue_url": q, "group": "g"})), "source.group");
        assert!(parse(keys(
            json!({"queue_url": q, "event_type": {"header": "type"},
                                  "source": "fixed", "aggregate_id": {"field": "id"}})
        ))
        .is_ok());
    }

    #[test]
    fn messages_take_ids_and_attributes_from_the_right_places() {
        let cfg = json!({"queue_url": "http://127.0.0.1:1/1/q", "region": "r",
                         "access_key_id": "a", "secret_access_key": "s",
                         "event_type": {"header": "type"}, "aggregate_id": {"field": "id"},
                         "source": "shop"});
        let mut m = keys(cfg);
        let conn = ConnKeys::take(&mut m, "source").unwrap();
        let origins = Origins::take(&mut m, "source").unwrap();
        let _: SqsSourceKeys = from_value("source", Value::Object(m)).unwrap();
        let src = SqsSource {
            client: Client::open(&conn, "p", "source").unwrap(),
            wait: 0,
            visibility_timeout: None,
            visibility: Duration::from_secs(30),
            origins,
            undeleted: Vec::new(),
            once: false,
        };
        let msg = src.message(&json!({
            "MessageId": "m-1", "Body": r#"{"id": 7, "trace_id": "t-9"}"#,
            "Attributes": {"MessageDeduplicationId": "d-1"},
            "MessageAttributes": {"type": {"DataType": "String", "StringValue": "created"},
                                  "dedup_key": {"DataType": "String", "StringValue": "k-1"}}}));
        assert_eq!(msg.event_id, "d-1");
        assert_eq!(msg.event_type.as_deref(), Some("created"));
        assert_eq!(msg.aggregate_id.as_deref(), Some("7"));
        assert_eq!(msg.source.as_deref(), Some("shop"));
        assert_eq!(msg.trace_id.as_deref(), Some("t-9"));
        assert!(msg.error.is_none());
        let msg = src.message(&json!({
            "MessageId": "m-2", "Body": "not json",
            "MessageAttributes": {"dedup_key": {"DataType": "String", "StringValue": "k-2"}}}));
        assert_eq!(msg.event_id, "k-2");
        assert_eq!(msg.payload, "not json");
        assert!(msg.error.unwrap().contains("not valid JSON"));
        let msg = src.message(&json!({"MessageId": "m-3", "Body": "{}"}));
        assert_eq!(msg.event_id, "m-3");
    }
}
