//! The `redis` source: a Redis Streams consumer group into the inbox.
//!
//! Keys: [`KEYS`] (README.md and the man page show them).
//!
//! The group is created (`XGROUP CREATE ... MKSTREAM`) when missing, at id
//! `0` (`start: earliest`, so a backlog is not lost) or `$` (`latest`).
//! Entries are read with `XREADGROUP ... >`; entries this consumer was
//! given before and never acknowledged (a restart under the same consumer
//! name) are read first, and pending entries of other consumers idle for
//! `claim_idle_ms` (a crashed consumer) are taken over with `XAUTOCLAIM`.
//! Everything is acknowledged (`XACK`, pipelined) only after the inbox
//! transaction holding it committed.
//!
//! The inbox `event_id` is the entry's `dedup_key` field, else the id the
//! payload carries itself (our envelope's `dedup_key`, a CloudEvents `id`;
//! see `source::own_id`), else the entry id. The payload is the `payload` field (which must be JSON), else all
//! fields as a JSON object of strings. A `payload` that is not JSON goes
//! into the inbox as a dead letter (`{"raw": "<text>"}`, with the reason in
//! `error`, in `<inbox>_dlq`) and is acknowledged like the rest.

use std::time::{Duration, Instant};

use redis::{Connection, Value};
use serde::Deserialize;
use serde_json::{Map, Value as Json};

use crate::broker::redis::{self as broker, TIMEOUT};
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::retry::Error;
use crate::source::decode::{
    dead_letter, json_text, Body, CloudEvent, Origin, Origins, ATTRIBUTES,
};
use crate::source::{feed, own_id, Batch, Feed, Message, Source, SourceSpec};
use crate::trace;

/// XACKs per pipelined round trip.
const CHUNK: usize = 1000;

/// The `redis` source's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSourceConfig {
    url: String,
    stream: String,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    consumer: Option<String>,
    #[serde(default)]
    claim_idle_ms: Option<u64>,
    #[serde(default)]
    start: Option<String>,
}

/// The `redis` source as configured: its keys, and where its message
/// attributes come from (taken out of the keys before they are parsed).
#[derive(Debug, Clone)]
struct RedisSourceSpec {
    cfg: RedisSourceConfig,
    origins: Origins,
}

/// Where an attribute comes from by default, and what its key holds.
const FROM: &str = "the field of the same name";
const WHERE: &str = r#"where each column comes from: `{"field": "name"}` (a field of the entry, else of the JSON payload; `{"header": "name"}` means the entry field only) or a fixed string"#;

/// The source's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    KeySpec::new(
        "url",
        "string",
        Fallback::Required,
        "`redis://[user:password@]host[:port][/db]` (or `redis+unix://`). `${ENV:NAME}` is expanded; `rediss://` is not built in",
    ),
    KeySpec::new(
        "stream",
        "string",
        Fallback::Required,
        "the stream to read",
    ),
    KeySpec::new(
        "group",
        "string",
        Fallback::Value("pgtrickle-relay"),
        "the consumer group",
    ),
    KeySpec::new(
        "consumer",
        "string",
        Fallback::Text("`<hostname>-<pid>`"),
        "this relay's consumer name in the group; set it to keep the same name across restarts",
    ),
    KeySpec::new(
        "claim_idle_ms",
        "integer",
        Fallback::Value("30000"),
        "pending entries of another consumer (one that crashed) idle this long are taken over with `XAUTOCLAIM`",
    ),
    KeySpec::new(
        "start",
        "string",
        Fallback::Value("earliest"),
        "where a group the relay creates starts: `earliest` (id 0, so a backlog added before the relay's first start is not lost) or `latest` (`$`, only new entries)",
    ),
    Origin::key("event_type", FROM, WHERE),
    Origin::key("aggregate_id", FROM, WHERE),
    Origin::key("source", FROM, WHERE),
    Origin::key(
        "trace_id",
        "a valid W3C `traceparent` field (see \"Trace context\"), else the field of the same name",
        WHERE,
    ),
];

/// Parse the source's keys.
pub fn parse(mut keys: Map<String, Json>) -> Result<Box<dyn SourceSpec>, ConfigError> {
    let origins = Origins::take(&mut keys, "source")?;
    let cfg: RedisSourceConfig = from_value("source", Json::Object(keys))?;
    if cfg.url.is_empty() {
        return Err(ConfigError::new("source.url", "must not be empty"));
    }
    // A URL from the environment is checked when opened.
    if !cfg.url.starts_with("${ENV:") {
        broker::check_url(&cfg.url).map_err(|m| ConfigError::new("source.url", m))?;
    }
    for (k, v) in [
        ("stream", Some(&cfg.stream)),
        ("group", cfg.group.as_ref()),
        ("consumer", cfg.consumer.as_ref()),
    ] {
        if v.is_some_and(|v| v.is_empty()) {
            return Err(ConfigError::new(format!("source.{k}"), "must not be empty"));
        }
    }
    if cfg.claim_idle_ms == Some(0) {
        return Err(ConfigError::new(
            "source.claim_idle_ms",
            "must be at least 1",
        ));
    }
    match cfg.start.as_deref() {
        None | Some("earliest") | Some("latest") => {}
        Some(other) => {
            return Err(ConfigError::new(
                "source.start",
                format!("expected \"earliest\" or \"latest\", found {other:?}"),
            ))
        }
    }
    Ok(Box::new(RedisSourceSpec { cfg, origins }))
}

impl SourceSpec for RedisSourceSpec {
    fn open(&self, pipeline: &str, once: bool) -> Result<Box<dyn Feed>, Error> {
        let (client, shown) = broker::client(pipeline, "source", &self.cfg.url)?;
        let consumer = self
            .cfg
            .consumer
            .clone()
            .unwrap_or_else(|| format!("{}-{}", crate::hostname(), std::process::id()));
        let mut src = RedisSource {
            client,
            conn: None,
            shown,
            stream: self.cfg.stream.clone(),
            group: self
                .cfg
                .group
                .clone()
                .unwrap_or_else(|| "pgtrickle-relay".into()),
            consumer,
            claim_idle_ms: self.cfg.claim_idle_ms.unwrap_or(30_000),
            start: if self.cfg.start.as_deref() == Some("latest") {
                "$"
            } else {
                "0"
            },
            origins: self.origins.clone(),
            history: Some("0".into()),
            claim_cursor: "0-0".into(),
            last_claim: None,
            unacked: Vec::new(),
            once,
        };
        // Fail early on a wrong address or password; a server that is down
        // is retried by the caller.
        src.conn()?;
        log::info!(
            "reading redis stream {:?} as group {:?}, consumer {:?}",
            src.stream,
            src.group,
            src.consumer
        );
        Ok(feed(src))
    }

    /// Connect (with the password, if any) and PING.
    fn check(&self, _pipeline: &str) -> Result<(), ConfigError> {
        broker::ping("source", &self.cfg.url)
    }
}

struct RedisSource {
    client: redis::Client,
    conn: Option<Connection>,
    /// The URL with its password masked, for messages.
    shown: String,
    stream: String,
    group: String,
    consumer: String,
    claim_idle_ms: u64,
    start: &'static str,
    /// By default an attribute is the field of its own name (`trace_id`:
    /// after a W3C `traceparent` field).
    origins: Origins,
    /// While reading this consumer's own pending entries: the id after
    /// which to continue (None: they are all read, read new ones).
    history: Option<String>,
    /// Where the next XAUTOCLAIM continues ("0-0": from the start).
    claim_cursor: String,
    last_claim: Option<Instant>,
    /// Entry ids written to the inbox whose XACK failed: acknowledged
    /// with the next batch.
    unacked: Vec<String>,
    /// `--once`: end when no new entry arrives within the wait.
    once: bool,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

/// One stream entry: its id and fields (None: deleted meanwhile).
type Entry = (String, Option<Vec<(String, String)>>);

/// Entries of an `[[id, [f, v, ...]], ...]` reply.
fn entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = text(pair.first()?)?;
            let fields = match pair.get(1) {
                Some(Value::Array(fv)) => Some(
                    fv.chunks(2)
                        .filter_map(|c| Some((text(c.first()?)?, text(c.get(1)?)?)))
                        .collect(),
                ),
                Some(Value::Map(m)) => Some(
                    m.iter()
                        .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
                        .collect(),
                ),
                _ => None,
            };
            Some((id, fields))
        })
        .collect()
}

/// Entries of an XREADGROUP reply (one stream; Nil on timeout).
fn read_reply(v: &Value) -> Vec<Entry> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(kv) if kv.len() == 2 => entries(&kv[1]),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(m) => m.iter().flat_map(|(_, e)| entries(e)).collect(),
        _ => Vec::new(),
    }
}

impl RedisSource {
    fn conn(&mut self) -> Result<&mut Connection, Error> {
        if self.conn.is_none() {
            let mut c = broker::connect(&self.client, &self.shown)?;
            let created: Result<Value, _> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(self.start)
                .arg("MKSTREAM")
                .query(&mut c);
            match created {
                Ok(_) => log::info!(
                    "created consumer group {:?} on stream {:?} at {}",
                    self.group,
                    self.stream,
                    self.start
                ),
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(self.error(e)),
            }
            // Entries given to this consumer before a lost reply or a
            // restart: read them again first.
            self.history = Some("0".into());
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// Classify a failed round trip; a broken connection is dropped.
    fn error(&self, e: redis::RedisError) -> Error {
        broker::error(&self.shown, &e)
    }

    /// Run a command; on failure the connection is dropped (reconnected,
    /// and the group recreated, on the next call).
    fn query(&mut self, cmd: &redis::Cmd, read_timeout: Duration) -> Result<Value, Error> {
        let conn = self.conn()?;
        let r = conn
            .set_read_timeout(Some(read_timeout))
            .and_then(|_| cmd.query::<Value>(conn));
        r.map_err(|e| {
            self.conn = None;
            self.error(e)
        })
    }

    fn attribute(
        &self,
        from: &Origin,
        fields: &[(String, String)],
        payload: Option<&Map<String, Json>>,
    ) -> Option<String> {
        let get = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        match from {
            Origin::Header { header } => get(header),
            Origin::Field { field } => get(field).or_else(|| json_text(payload?, field)),
            Origin::Fixed(s) => Some(s.clone()),
        }
    }

    fn message(&self, id: String, fields: &[(String, String)]) -> Message {
        let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        let body = match get("payload") {
            Some(p) => Body::from_text(p.clone()),
            None => {
                let obj: Map<String, Json> = fields
                    .iter()
                    .map(|(k, v)| (k.clone(), Json::String(v.clone())))
                    .collect();
                let v = Json::Object(obj);
                Body {
                    text: v.to_string(),
                    json: Some(v),
                    problem: None,
                }
            }
        };
        let error = body.problem.as_ref().map(|e| {
            dead_letter(format!(
                "redis stream {} entry {id}: payload field is not valid JSON ({e})",
                self.stream
            ))
        });
        let obj = body.object();
        let event_id = get("dedup_key")
            .filter(|k| !k.is_empty())
            .cloned()
            .or_else(|| own_id(obj?))
            .unwrap_or_else(|| id.clone());
        let content_type = get("content-type").map(String::as_str);
        let ce = CloudEvent::recognise(|h| get(h).cloned(), content_type, obj);
        let [event_type, aggregate_id, source, trace_id] = self.origins.read(
            |o| self.attribute(o, fields, obj),
            || trace::traceparent(get(trace::TRACEPARENT).map(String::as_str)),
            |name| self.attribute(&Origin::or_field(&None, name), fields, obj),
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
            ce.apply(&mut message, self.origins.configured(&ATTRIBUTES));
        }
        message
    }

    /// Turn entries into messages; every id is to be acknowledged (that
    /// of an entry deleted meanwhile too, which needs no row).
    fn take(&mut self, found: Vec<Entry>, batch: &mut Batch<String>) {
        for (id, fields) in found {
            if let Some(fields) = fields {
                let m = self.message(id.clone(), &fields);
                batch.messages.push(m);
            }
            batch.receipts.push(id);
        }
    }

    /// Pending entries of other consumers idle for `claim_idle_ms`.
    fn autoclaim(&mut self, max: usize) -> Result<Vec<Entry>, Error> {
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(self.claim_idle_ms)
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(max);
        let reply = self.query(&cmd, TIMEOUT)?;
        let Value::Array(parts) = reply else {
            return Ok(Vec::new());
        };
        self.claim_cursor = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
        let found = parts.get(1).map(entries).unwrap_or_default();
        if !found.is_empty() {
            log::info!(
                "claimed {} entries idle for {} ms from other consumers of group {:?}",
                found.len(),
                self.claim_idle_ms,
                self.group
            );
        }
        Ok(found)
    }
}

impl Source for RedisSource {
    /// An entry id.
    type Receipt = String;

    fn receive(
        &mut self,
        batch: &mut Batch<String>,
        max: usize,
        wait: Duration,
    ) -> Result<(), Error> {
        self.conn()?;
        // 1. Entries this consumer already has (after a restart).
        if let Some(after) = self.history.clone() {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(&self.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(max)
                .arg("STREAMS")
                .arg(&self.stream)
                .arg(&after);
            let found = read_reply(&self.query(&cmd, TIMEOUT)?);
            match found.last() {
                Some((last, _)) => {
                    self.history = Some(last.clone());
                    self.take(found, batch);
                    return Ok(());
                }
                None => self.history = None,
            }
        }
        // 2. Entries of crashed consumers, checked now and then.
        let every = Duration::from_millis(self.claim_idle_ms.clamp(1, 1000));
        if self.claim_cursor != "0-0" || self.last_claim.is_none_or(|t| t.elapsed() >= every) {
            self.last_claim = Some(Instant::now());
            let found = self.autoclaim(max)?;
            if !found.is_empty() {
                self.take(found, batch);
                return Ok(());
            }
        }
        // 3. New entries.
        let block = (wait.as_millis() as u64).max(1);
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(block)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">");
        let found = read_reply(&self.query(&cmd, wait + TIMEOUT)?);
        batch.end_of_input = self.once && found.is_empty();
        self.take(found, batch);
        Ok(())
    }

    fn ack(&mut self, receipts: Vec<String>) -> Result<(), Error> {
        self.unacked.extend(receipts);
        if self.unacked.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for ids in self.unacked.chunks(CHUNK) {
            pipe.cmd("XACK")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(ids)
                .ignore();
        }
        let conn = self.conn()?;
        let r = conn
            .set_read_timeout(Some(TIMEOUT))
            .and_then(|_| pipe.query::<()>(conn));
        match r {
            Ok(()) => {
                self.unacked.clear();
                Ok(())
            }
            Err(e) => {
                // Kept: acknowledged with the next batch (or redelivered
                // to this consumer after a reconnect; the inbox absorbs it).
                self.conn = None;
                Err(self.error(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: Json) -> Map<String, Json> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn config_is_checked() {
        let err = parse(keys(serde_json::json!({"stream": "s"}))).unwrap_err();
        assert!(err.to_string().contains("source.url"), "{err}");
        let err = parse(keys(
            serde_json::json!({"url": "redis://x/", "stream": "s", "start": "middle"}),
        ))
        .unwrap_err();
        assert!(err.to_string().contains("source.start"), "{err}");
        assert!(parse(keys(
            serde_json::json!({"url": "redis://x/", "stream": "s"})
        ))
        .is_ok());
    }

    #[test]
    fn replies_are_parsed() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            b("s"),
            Value::Array(vec![
                Value::Array(vec![b("1-0"), Value::Array(vec![b("payload"), b("{}")])]),
                Value::Array(vec![b("2-0"), Value::Nil]),
            ]),
        ])]);
        let got = read_reply(&reply);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "1-0");
        assert_eq!(
            got[0].1.as_deref(),
            Some(&[("payload".to_string(), "{}".to_string())][..])
        );
        assert!(got[1].1.is_none());
    }
}
