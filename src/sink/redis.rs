//! The `redis` sink: events appended to Redis Streams with pipelined `XADD`.
//!
//! Keys: [`KEYS`] (README.md and the man page show them).
//!
//! Each entry has the fields `dedup_key`, `subject`, `op`, `payload` (the
//! row as JSON), `full_refresh` (`true`/`false`), `outbox_id`,
//! `refresh_id`/`headers` when present, and `traceparent`/`tracestate`
//! when the outbox headers carry a valid W3C trace context (see
//! [`crate::trace`]). With `format: "cloudevents"` (structured mode only)
//! `payload` is the CloudEvent and a `content-type` field says so.
//!
//! **Entry ids (replays are harmless).** Redis has no dedup of its own, so
//! every entry gets an explicit id derived from its read position:
//! `<outbox id>-<row index>`, the last two parts of the dedup key
//! `<outbox table>:<outbox id>:<row index>`. Events are read in that order,
//! so ids grow. A replayed `XADD` (the relay restarted before it committed
//! its offset, or a batch retried after a lost connection) is refused by
//! Redis ("equal or smaller than the target stream top item"); the sink
//! then reads the entry at that id (`XRANGE id id`) and counts the event as
//! already delivered only when that entry carries the event's own
//! `dedup_key`.
//!
//! **Events below the stream's top.** An event's id can be refused
//! although its entry is not there: a kit outbox written by concurrent
//! transactions is read in commit order, which can differ from id order;
//! and when several pipelines (outboxes) write one stream, their ids
//! collide and interleave (both number their rows 1, 2, 3, ...), so the
//! one whose ids are lower is below the top all the time. Such an event is
//! appended after the stream's top with the id `<top ms>-*` (Redis 7 or
//! later; the next free sequence number), unless an earlier attempt put it
//! there: the first time in a session that an event of a stream is below
//! its top, the sink reads the dedup keys of the stream's last
//! [`LATE_SCAN`] entries once (in pages, keeping only its own outbox's
//! keys), and an event found among them is counted as delivered. A replay
//! whose entry is more than that far below the top is appended again (a
//! duplicate with the same `dedup_key`).
//!
//! **Errors.** A temporary server state (`LOADING`, `BUSY`, `OOM`,
//! `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `READONLY`) or a lost connection
//! fails the batch, which is retried with backoff. Any other refusal of an
//! `XADD` (`WRONGTYPE`: the key is not a stream; `NOPERM`; ...) is a
//! problem of the destination, not of the event: the batch fails too and
//! is retried slowly until the destination is fixed; nothing is
//! dead-lettered for it. Only an event too large for the server is
//! dead-lettered, before it is sent: a field over `proto-max-bulk-len`, or
//! a command over `client-query-buffer-limit` (both read with `CONFIG GET`
//! when the sink connects; 512 MB and 1 GB when that is not allowed).

use std::collections::{HashMap, HashSet};

use redis::{Cmd, Connection, Pipeline, Value};
use serde::Deserialize;
use serde_json::{Map, Value as Json};

use crate::broker::redis as broker;
use crate::cloudevents::{self, CloudEvents};
use crate::event::{Event, Template, Vars};
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::retry::Error;
use crate::sink::{Rejected, Sink, SinkSpec};
use crate::trace::Context;

/// XADDs per pipelined round trip.
const CHUNK: usize = 1000;
/// Entries below a stream's top searched for a late event's earlier append.
pub const LATE_SCAN: usize = 100_000;
/// Entries per page of that search.
const SCAN_PAGE: usize = 1000;
/// Rounds of appending after the top when other writers keep moving it.
const APPEND_ROUNDS: usize = 10;
/// The stream when the config names none.
const DEFAULT_STREAM: &str = "pgtrickle.{stream_table}";
/// Redis's default `proto-max-bulk-len` (largest argument).
const DEFAULT_MAX_BULK: u64 = 512 * 1024 * 1024;
/// Redis's default `client-query-buffer-limit` (largest command).
const DEFAULT_MAX_QUERY: u64 = 1024 * 1024 * 1024;
/// Redis's refusal of an id that is not above the stream's last one.
const NOT_ABOVE_TOP: &str = "equal or smaller than the target stream top item";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedisKeys {
    url: String,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    maxlen: Option<u64>,
}

/// The `redis` sink's config.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    url: String,
    stream: Template,
    maxlen: Option<u64>,
    /// `format: "cloudevents"` (structured mode only).
    cloudevents: Option<CloudEvents>,
}

/// The sink's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    KeySpec::new(
        "url",
        "string",
        Fallback::Required,
        "`redis://[user:password@]host[:port][/db]`; `${ENV:NAME}` is replaced from the environment",
    ),
    KeySpec::new(
        "stream",
        "template",
        Fallback::Value(DEFAULT_STREAM),
        "the stream, a template like `subject`",
    ),
    KeySpec::new(
        "maxlen",
        "integer",
        Fallback::Text("no trimming"),
        "trim each stream to about this many entries (`XADD ... MAXLEN ~ N`)",
    ),
];

/// Parse the sink's keys.
pub fn parse(mut keys: Map<String, Json>) -> Result<Box<dyn SinkSpec>, ConfigError> {
    let cloudevents = CloudEvents::take(&mut keys, false)?;
    let raw: RedisKeys = from_value("sink", Json::Object(keys))?;
    if raw.url.is_empty() {
        return Err(ConfigError::new("sink.url", "must not be empty"));
    }
    broker::check_url(&raw.url).map_err(|m| ConfigError::new("sink.url", m))?;
    let stream = raw.stream.unwrap_or_else(|| DEFAULT_STREAM.to_string());
    if stream.is_empty() {
        return Err(ConfigError::new("sink.stream", "must not be empty"));
    }
    let stream = Template::parse(&stream).map_err(|m| ConfigError::new("sink.stream", m))?;
    if raw.maxlen == Some(0) {
        return Err(ConfigError::new("sink.maxlen", "must be at least 1"));
    }
    Ok(Box::new(RedisConfig {
        url: raw.url,
        stream,
        maxlen: raw.maxlen,
        cloudevents,
    }))
}

impl SinkSpec for RedisConfig {
    fn open(&self, pipeline: &str) -> Result<Box<dyn Sink>, Error> {
        let (client, shown) = broker::client(pipeline, "sink", &self.url)?;
        let mut sink = RedisSink {
            cfg: self.clone(),
            client,
            conn: None,
            shown,
            max_bulk: DEFAULT_MAX_BULK,
            max_query: DEFAULT_MAX_QUERY,
            seen: HashMap::new(),
            top_ms: HashMap::new(),
        };
        // Fail early on a wrong address or password; a server that is down
        // is retried by the caller.
        sink.conn()?;
        sink.max_bulk = sink.config_u64("proto-max-bulk-len", DEFAULT_MAX_BULK);
        sink.max_query = sink.config_u64("client-query-buffer-limit", DEFAULT_MAX_QUERY);
        Ok(Box::new(sink))
    }

    /// Connect (with the password, if any) and PING.
    fn check(&self, _pipeline: &str) -> Result<(), ConfigError> {
        broker::ping("sink", &self.url)
    }
}

struct RedisSink {
    cfg: RedisConfig,
    client: redis::Client,
    conn: Option<Connection>,
    /// The URL with its password masked, for messages.
    shown: String,
    /// The server's largest argument.
    max_bulk: u64,
    /// The server's largest command.
    max_query: u64,
    /// Per stream, once one of its events was below the top: the dedup
    /// keys of this outbox among its last [`LATE_SCAN`] entries.
    seen: HashMap<String, HashSet<String>>,
    /// Per stream: the milliseconds part of its last id, as last read.
    top_ms: HashMap<String, u64>,
}

/// The outbox table, outbox id and row index of a dedup key.
fn split_key(key: &str) -> Option<(&str, &str, u64)> {
    let (rest, index) = key.rsplit_once(':')?;
    let (table, _) = rest.rsplit_once(':')?;
    Some((table, rest, index.parse().ok()?))
}

/// The entry id of an event: `<outbox id>-<row index>`.
fn entry_id(e: &Event) -> Result<String, Error> {
    let index = split_key(&e.dedup_key)
        .map(|(_, _, i)| i)
        .ok_or_else(|| Error::permanent(format!("redis: malformed dedup key {:?}", e.dedup_key)))?;
    if e.outbox_id < 0 {
        return Err(Error::permanent(format!(
            "redis: negative outbox id in {:?}",
            e.dedup_key
        )));
    }
    Ok(format!("{}-{index}", e.outbox_id))
}

/// The milliseconds part of a stream id.
fn id_ms(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

/// The text of a `dedup_key` field.
fn field_text(v: Option<&Value>) -> Option<&[u8]> {
    match v? {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// Why an event cannot be sent to a server with these limits, if so.
/// `payload` is the length of the `payload` field.
fn oversize(e: &Event, payload: usize, max_bulk: u64, max_query: u64) -> Option<String> {
    let fields = [
        ("payload", payload),
        ("headers", e.headers.as_ref().map_or(0, |h| h.get().len())),
        ("subject", e.subject.len()),
        ("dedup_key", e.dedup_key.len()),
        ("refresh_id", e.refresh_id.as_ref().map_or(0, |r| r.len())),
    ];
    if let Some((name, len)) = fields.iter().find(|(_, len)| *len as u64 > max_bulk) {
        return Some(format!(
            "redis: the {name} field is {len} bytes, over the server's proto-max-bulk-len \
             ({max_bulk} bytes)"
        ));
    }
    // Every argument costs its bytes plus a `$<len>\r\n...\r\n` frame; the
    // trace context fields come on top.
    let trace: usize = Context::of(e.headers.as_deref()).map_or(0, |t| {
        t.headers()
            .map(|(name, value)| name.len() + value.len() + 32)
            .sum()
    });
    let total: u64 = fields.iter().map(|(_, l)| *l as u64 + 16).sum::<u64>() + trace as u64 + 512;
    if total > max_query {
        return Some(format!(
            "redis: the XADD command is about {total} bytes, over the server's \
             client-query-buffer-limit ({max_query} bytes)"
        ));
    }
    None
}

impl RedisSink {
    fn conn(&mut self) -> Result<&mut Connection, Error> {
        if self.conn.is_none() {
            self.conn = Some(broker::connect(&self.client, &self.shown)?);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// A numeric server setting, or `default` when it cannot be read
    /// (`CONFIG` renamed or not permitted).
    fn config_u64(&mut self, name: &str, default: u64) -> u64 {
        let got: Result<Vec<String>, Error> = self.query(redis::cmd("CONFIG").arg("GET").arg(name));
        match got {
            Ok(v) => v.get(1).and_then(|n| n.parse().ok()).unwrap_or(default),
            Err(e) => {
                log::debug!("{e}: assuming {name} {default}");
                default
            }
        }
    }

    /// Classify a failed round trip.
    fn error(&self, e: redis::RedisError) -> Error {
        broker::error(&self.shown, &e)
    }

    fn stream_of(&self, e: &Event) -> String {
        self.cfg.stream.render(&Vars::of(e), e.op)
    }

    fn xadd(&self, e: &Event, stream: &str, id: &str) -> Cmd {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream);
        if let Some(n) = self.cfg.maxlen {
            cmd.arg("MAXLEN").arg("~").arg(n);
        }
        cmd.arg(id)
            .arg("dedup_key")
            .arg(&e.dedup_key)
            .arg("subject")
            .arg(&e.subject)
            .arg("op")
            .arg(e.op.as_str())
            .arg("payload")
            .arg(self.payload(e).as_ref())
            .arg("full_refresh")
            .arg(if e.is_full_refresh { "true" } else { "false" })
            .arg("outbox_id")
            .arg(e.outbox_id);
        if let Some(r) = &e.refresh_id {
            cmd.arg("refresh_id").arg(r);
        }
        if let Some(h) = &e.headers {
            cmd.arg("headers").arg(h.get());
        }
        if let Some(t) = Context::of(e.headers.as_deref()) {
            for (name, value) in t.headers() {
                cmd.arg(name).arg(value);
            }
        }
        if self.cfg.cloudevents.is_some() {
            cmd.arg("content-type").arg(cloudevents::STRUCTURED);
        }
        cmd
    }

    /// The `payload` field: the row, or the structured CloudEvent.
    fn payload<'a>(&self, e: &'a Event) -> std::borrow::Cow<'a, str> {
        match &self.cfg.cloudevents {
            None => e.payload.get().into(),
            Some(ce) => {
                let mut out = Vec::with_capacity(e.payload.get().len() + 256);
                ce.structured(e, None, &mut out);
                String::from_utf8(out).expect("JSON is UTF-8").into()
            }
        }
    }

    fn query<T: redis::FromRedisValue>(&mut self, cmd: &Cmd) -> Result<T, Error> {
        let r = cmd.query(self.conn()?);
        r.map_err(|e| {
            let err = self.error(e);
            if err.class == crate::retry::Class::Transient {
                self.conn = None;
            }
            err
        })
    }

    /// Run a pipeline whose replies are all wanted (errors included).
    fn run(&mut self, pipe: &Pipeline, n: usize) -> Result<Vec<Value>, Error> {
        let results: Vec<Value> = {
            let r = pipe.query(self.conn()?);
            r.map_err(|e| {
                let err = self.error(e);
                self.conn = None;
                err
            })?
        };
        if results.len() != n {
            self.conn = None;
            return Err(Error::transient(format!(
                "redis {}: {} replies to {n} commands",
                self.shown,
                results.len()
            )));
        }
        Ok(results)
    }

    /// The error for an `XADD` refused for a reason other than its id.
    fn refused(&self, stream: &str, err: &redis::ServerError) -> Error {
        let text = format!("{} {}", err.code(), err.details().unwrap_or(""));
        let msg = format!("redis {}: XADD to stream {stream}: {text}", self.shown);
        if broker::transient_code(err.code()) {
            Error::transient(msg)
        } else {
            Error::permanent(msg)
        }
    }

    /// Publish one chunk; events too large for the server are appended to
    /// `rejected` with their index offset by `base`.
    fn chunk(
        &mut self,
        events: &[Event],
        base: usize,
        rejected: &mut Vec<Rejected>,
    ) -> Result<(), Error> {
        let mut sent = Vec::with_capacity(events.len());
        // Indices into `sent` of the events whose id is not above their
        // stream's top: a replay, or below the top.
        let mut refused = Vec::new();
        let mut tried = Vec::with_capacity(events.len());
        let mut pipe = Pipeline::with_capacity(events.len());
        pipe.ignore_errors();
        for (i, e) in events.iter().enumerate() {
            let payload = self.payload(e).len();
            if let Some(reason) = oversize(e, payload, self.max_bulk, self.max_query) {
                rejected.push(Rejected {
                    index: base + i,
                    reason,
                });
                continue;
            }
            let (stream, id) = (self.stream_of(e), entry_id(e)?);
            // Known to be below the top (another outbox writes the stream
            // with larger ids): skip the XADD Redis would refuse.
            let below = self
                .top_ms
                .get(&stream)
                .is_some_and(|top| (e.outbox_id as u64) < *top);
            if below {
                refused.push(sent.len());
            } else {
                pipe.add_command(self.xadd(e, &stream, &id));
                tried.push(sent.len());
            }
            sent.push((i, stream, id));
        }
        if !tried.is_empty() {
            let results = self.run(&pipe, tried.len())?;
            for (&k, v) in tried.iter().zip(results) {
                let Value::ServerError(err) = v else {
                    continue;
                };
                if err.details().unwrap_or("").contains(NOT_ABOVE_TOP) {
                    refused.push(k);
                } else {
                    return Err(self.refused(&sent[k].1, &err));
                }
            }
        }
        if refused.is_empty() {
            return Ok(());
        }
        // In read order: late events are appended in it.
        refused.sort_unstable();
        let mut pipe = Pipeline::with_capacity(refused.len());
        for &k in &refused {
            let (_, stream, id) = &sent[k];
            pipe.cmd("XRANGE").arg(stream).arg(id).arg(id);
        }
        let found = self.run(&pipe, refused.len())?;
        let mut late = Vec::new();
        for (&k, reply) in refused.iter().zip(found) {
            let (i, stream, _) = &sent[k];
            let e = &events[*i];
            let reply: redis::streams::StreamRangeReply = redis::from_redis_value(reply)
                .map_err(|x| Error::transient(format!("redis {}: XRANGE: {x}", self.shown)))?;
            let ours = reply.ids.first().is_some_and(|entry| {
                field_text(entry.map.get("dedup_key")) == Some(e.dedup_key.as_bytes())
            });
            if !ours {
                late.push((e, stream.clone()));
            }
        }
        self.place_late(late)
    }

    /// Events whose id is below their stream's top and not theirs: count
    /// those an earlier attempt appended as delivered, and append the
    /// others after the top (`<top ms>-*`), in order.
    fn place_late(&mut self, late: Vec<(&Event, String)>) -> Result<(), Error> {
        let mut todo = Vec::with_capacity(late.len());
        for (e, stream) in late {
            if !self.seen.contains_key(&stream) {
                let table = split_key(&e.dedup_key).map_or("", |(t, _, _)| t);
                let keys = self.scan(&stream, table)?;
                self.seen.insert(stream.clone(), keys);
            }
            if !self.seen[&stream].contains(&e.dedup_key) {
                todo.push((e, stream));
            }
        }
        for _ in 0..APPEND_ROUNDS {
            if todo.is_empty() {
                return Ok(());
            }
            let mut pipe = Pipeline::with_capacity(todo.len());
            pipe.ignore_errors();
            for (e, stream) in &todo {
                let ms = match self.top_ms.get(stream) {
                    Some(ms) => *ms,
                    None => {
                        let ms = self.last_ms(stream)?;
                        self.top_ms.insert(stream.clone(), ms);
                        ms
                    }
                };
                pipe.add_command(self.xadd(e, stream, &format!("{ms}-*")));
            }
            let results = self.run(&pipe, todo.len())?;
            let mut again = Vec::new();
            for ((e, stream), v) in todo.into_iter().zip(results) {
                match v {
                    Value::ServerError(err)
                        if err.details().unwrap_or("").contains(NOT_ABOVE_TOP) =>
                    {
                        // Another writer moved the top on: read it again.
                        self.top_ms.remove(&stream);
                        again.push((e, stream));
                    }
                    Value::ServerError(err) => {
                        let mut x = self.refused(&stream, &err);
                        if err.details().unwrap_or("").contains("Invalid stream ID") {
                            x.msg.push_str(
                                " (an event below the stream's top is appended with the id \
                                 <ms>-*, which needs Redis 7 or later)",
                            );
                        }
                        return Err(x);
                    }
                    _ => log::debug!(
                        "event {} was below the top of stream {stream}: appended after it",
                        e.dedup_key
                    ),
                }
            }
            todo = again;
        }
        Err(Error::transient(format!(
            "redis {}: other writers keep moving the top of the stream while events are \
             appended after it",
            self.shown
        )))
    }

    /// The milliseconds part of `stream`'s last generated id.
    fn last_ms(&mut self, stream: &str) -> Result<u64, Error> {
        let info: HashMap<String, Value> =
            self.query(redis::cmd("XINFO").arg("STREAM").arg(stream))?;
        let id: String = info
            .get("last-generated-id")
            .and_then(|v| redis::from_redis_value_ref(v).ok())
            .unwrap_or_default();
        Ok(id_ms(&id))
    }

    /// The dedup keys of outbox `table` among the last [`LATE_SCAN`]
    /// entries of `stream`.
    fn scan(&mut self, stream: &str, table: &str) -> Result<HashSet<String>, Error> {
        let mut keys = HashSet::new();
        let mut end = "+".to_string();
        let mut read = 0;
        while read < LATE_SCAN {
            let page: redis::streams::StreamRangeReply = self.query(
                redis::cmd("XREVRANGE")
                    .arg(stream)
                    .arg(&end)
                    .arg("-")
                    .arg("COUNT")
                    .arg(SCAN_PAGE.min(LATE_SCAN - read)),
            )?;
            let Some(last) = page.ids.last() else {
                break;
            };
            end = format!("({}", last.id);
            read += page.ids.len();
            for entry in &page.ids {
                if let Some(k) = field_text(entry.map.get("dedup_key")) {
                    let same_outbox =
                        split_key(&String::from_utf8_lossy(k)).is_some_and(|(t, _, _)| t == table);
                    if same_outbox {
                        keys.insert(String::from_utf8_lossy(k).into_owned());
                    }
                }
            }
            if page.ids.len() < SCAN_PAGE {
                break;
            }
        }
        log::debug!(
            "stream {stream}: {} of the last {read} entries are of outbox {table}",
            keys.len()
        );
        Ok(keys)
    }
}

impl Sink for RedisSink {
    fn publish(&mut self, events: &[Event]) -> Result<Vec<Rejected>, Error> {
        let mut rejected = Vec::new();
        for (n, chunk) in events.chunks(CHUNK).enumerate() {
            self.chunk(chunk, n * CHUNK, &mut rejected)?;
        }
        rejected.sort_by_key(|r| r.index);
        Ok(rejected)
    }

    fn unroutable(&self, e: &Event) -> Option<String> {
        let ce = || self.cfg.cloudevents.as_ref()?.missing(e);
        self.cfg.stream.missing(&Vars::of(e)).or_else(ce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Op;
    use serde_json::{json, value::RawValue};

    fn event(key: &str, id: i64) -> Event {
        Event {
            dedup_key: key.into(),
            subject: "s".into(),
            op: Op::Insert,
            payload: RawValue::from_string("{}".into()).unwrap(),
            is_full_refresh: false,
            outbox_id: id,
            refresh_id: None,
            headers: None,
            stream_table: "orders".into(),
            created_at: None,
        }
    }

    #[test]
    fn the_size_estimate_counts_the_trace_context_fields() {
        let mut e = event("outbox_orders:1:0", 1);
        let headers = json!({
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "tracestate": "a".repeat(500),
        })
        .to_string();
        e.headers = Some(RawValue::from_string(headers).unwrap());
        let limit = |e: &Event| {
            (0..10_000u64)
                .find(|q| oversize(e, e.payload.get().len(), u64::MAX, *q).is_none())
                .unwrap()
        };
        let traced = limit(&e);
        // The same headers without a valid traceparent: no native fields.
        let plain = e
            .headers
            .as_ref()
            .unwrap()
            .get()
            .replace("00-4bf", "xx-4bf");
        e.headers = Some(RawValue::from_string(plain).unwrap());
        assert!(traced >= limit(&e) + 500 + 55, "{traced} vs {}", limit(&e));
    }

    #[test]
    fn entry_ids_come_from_the_dedup_key() {
        let e = event("outbox_orders:42:7", 42);
        assert_eq!(entry_id(&e).unwrap(), "42-7");
        assert_eq!(split_key("a:b:c:5:1"), Some(("a:b:c", "a:b:c:5", 1)));
    }

    #[test]
    fn config_errors_name_the_key() {
        let p = |v: Json| parse(v.as_object().unwrap().clone()).unwrap_err().key;
        assert_eq!(p(json!({"stream": "s"})), "sink.url");
        assert_eq!(p(json!({"url": "http://x"})), "sink.url");
        assert_eq!(
            p(json!({"url": "redis://x", "stream": "{x}"})),
            "sink.stream"
        );
        assert_eq!(p(json!({"url": "redis://x", "maxlen": 0})), "sink.maxlen");
        assert_eq!(p(json!({"url": "redis://x", "maxln": 5})), "sink.maxln");
        assert!(parse(
            json!({"url": "redis://x", "maxlen": 9})
                .as_object()
                .unwrap()
                .clone()
        )
        .is_ok());
    }
}
