//! The `redis` sink: events appended to Redis Streams with pipelined `XADD`.
//!
//! Config: `{"type":"redis", "url":"redis://host:6379/0", "stream":"<template>",
//! "maxlen":N}`. `url` may use `${ENV:NAME}` (e.g. for the password);
//! `rediss://` is not built in. `stream` is a template like `subject`
//! (`{stream_table}`, `{op}`, `{outbox_id}`, `{refresh_id}`; default
//! `pgtrickle.{stream_table}`). `maxlen` trims each stream approximately
//! (`XADD ... MAXLEN ~ N`).
//!
//! Each entry has the fields `dedup_key`, `subject`, `op`, `payload` (the
//! row as JSON), `full_refresh` (`true`/`false`), `outbox_id`, and
//! `refresh_id`/`headers` when present.
//!
//! **Entry ids (replays are harmless).** Redis has no dedup of its own, so
//! every entry gets an explicit id derived from its read position:
//! `<outbox id>-<row index>`, the last two parts of the dedup key
//! `<outbox table>:<outbox id>:<row index>`. Events are read in that order,
//! so ids grow. A replayed `XADD` (the relay restarted before it committed
//! its offset, or a batch retried after a lost connection) is refused by
//! Redis ("equal or smaller than the target stream top item"); the sink
//! then looks the id up (`XRANGE id id`) and, when the entry is there,
//! counts the event as already delivered.
//!
//! A kit outbox written by concurrent transactions is read in commit
//! order, which can differ from id order: an event may come after one with
//! a larger id. Its id is then refused although no entry has it. The sink
//! looks for its dedup key among the entries above its id (`XREVRANGE`, up
//! to 100,000 entries); if it is there (appended by an earlier attempt) it
//! was delivered, else it is appended after the stream's top with the id
//! `<top ms>-*` (Redis 7 or later; the next free sequence number). Only
//! when that is impossible (the entries above were trimmed away, or an
//! older Redis) is the event dead-lettered. Do not `XADD` other entries
//! with larger ids into a relay's stream.

use std::time::Duration;

use redis::{Cmd, Connection, Pipeline, Value};
use serde::Deserialize;
use serde_json::{Map, Value as Json};

use crate::config::{from_value, ConfigError};
use crate::event::{Event, Template, Vars};
use crate::pg::{expand_env, mask};
use crate::retry::Error;
use crate::sink::{Rejected, Sink, SinkSpec};

/// XADDs per pipelined round trip.
const CHUNK: usize = 1000;
/// Entries above a late event's id searched for it.
const LATE_SCAN: usize = 100_000;
/// Connect, read and write timeout.
const TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// Parse the sink's keys.
pub fn parse(keys: Map<String, Json>) -> Result<Box<dyn SinkSpec>, ConfigError> {
    let raw: RedisKeys = from_value("sink", Json::Object(keys))?;
    if raw.url.is_empty() {
        return Err(ConfigError::new("sink.url", "must not be empty"));
    }
    if !(raw.url.starts_with("redis://") || raw.url.starts_with("redis+unix://")) {
        return Err(ConfigError::new(
            "sink.url",
            format!(
                "expected redis://[user:password@]host[:port][/db], found {:?}",
                mask(&raw.url)
            ),
        ));
    }
    let stream = raw
        .stream
        .unwrap_or_else(|| "pgtrickle.{stream_table}".to_string());
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
    }))
}

impl SinkSpec for RedisConfig {
    fn open(&self, pipeline: &str) -> Result<Box<dyn Sink>, Error> {
        let url = expand_env(&self.url)
            .map_err(|e| Error::permanent(format!("pipeline {pipeline:?}: sink.url: {e}")))?;
        let client = redis::Client::open(url.as_str()).map_err(|e| {
            Error::permanent(format!(
                "pipeline {pipeline:?}: sink.url {}: {e}",
                mask(&self.url)
            ))
        })?;
        let mut sink = RedisSink {
            cfg: self.clone(),
            client,
            conn: None,
            shown: mask(&url),
        };
        // Fail early on a wrong address or password; a server that is down
        // is retried by the caller.
        sink.conn()?;
        Ok(Box::new(sink))
    }
}

struct RedisSink {
    cfg: RedisConfig,
    client: redis::Client,
    conn: Option<Connection>,
    /// The URL with its password masked, for messages.
    shown: String,
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

/// A server error that goes away by itself (loading, out of memory, a
/// failover in progress).
fn transient_code(code: &str) -> bool {
    matches!(
        code,
        "LOADING" | "BUSY" | "OOM" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY"
    )
}

impl RedisSink {
    fn conn(&mut self) -> Result<&mut Connection, Error> {
        if self.conn.is_none() {
            let c = self
                .client
                .get_connection_with_timeout(TIMEOUT)
                .map_err(|e| self.error(e))?;
            c.set_read_timeout(Some(TIMEOUT))
                .map_err(|e| self.error(e))?;
            c.set_write_timeout(Some(TIMEOUT))
                .map_err(|e| self.error(e))?;
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// Classify a failed round trip; a broken connection is dropped.
    fn error(&self, e: redis::RedisError) -> Error {
        let msg = format!("redis {}: {e}", self.shown);
        let server = e.code().map(transient_code);
        match server {
            Some(false) if !e.is_io_error() && !e.is_connection_dropped() => {
                // Authentication and the like: retrying cannot help, but a
                // daemon keeps retrying slowly.
                Error::permanent(msg)
            }
            _ => Error::transient(msg),
        }
    }

    fn xadd(&self, e: &Event, id: &str) -> Cmd {
        let vars = Vars {
            stream_table: &e.stream_table,
            outbox_id: e.outbox_id,
            refresh_id: e.refresh_id.as_deref().unwrap_or(""),
        };
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.cfg.stream.render(&vars, e.op));
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
            .arg(e.payload.get())
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
        cmd
    }

    /// Publish one chunk; rejected events are appended with their index
    /// offset by `base`.
    fn chunk(
        &mut self,
        events: &[Event],
        base: usize,
        rejected: &mut Vec<Rejected>,
    ) -> Result<(), Error> {
        let mut ids = Vec::with_capacity(events.len());
        let mut pipe = Pipeline::with_capacity(events.len());
        pipe.ignore_errors();
        for e in events {
            let id = entry_id(e)?;
            pipe.add_command(self.xadd(e, &id));
            ids.push(id);
        }
        let results: Vec<Value> = {
            let r = pipe.query(self.conn()?);
            r.map_err(|e| {
                let err = self.error(e);
                self.conn = None;
                err
            })?
        };
        if results.len() != events.len() {
            self.conn = None;
            return Err(Error::transient(format!(
                "redis {}: {} replies to {} XADDs",
                self.shown,
                results.len(),
                events.len()
            )));
        }
        // Refused as not above the top: replayed, or out of order.
        let mut refused = Vec::new();
        for (i, v) in results.into_iter().enumerate() {
            let Value::ServerError(err) = v else {
                continue;
            };
            let text = format!("{} {}", err.code(), err.details().unwrap_or(""));
            if text.contains("equal or smaller than the target stream top item") {
                refused.push(i);
            } else if transient_code(err.code()) {
                return Err(Error::transient(format!("redis {}: {text}", self.shown)));
            } else {
                rejected.push(Rejected {
                    index: base + i,
                    reason: format!("redis XADD: {text}"),
                });
            }
        }
        if !refused.is_empty() {
            let mut pipe = Pipeline::with_capacity(refused.len());
            for &i in &refused {
                let e = &events[i];
                let vars = Vars {
                    stream_table: &e.stream_table,
                    outbox_id: e.outbox_id,
                    refresh_id: e.refresh_id.as_deref().unwrap_or(""),
                };
                pipe.cmd("XRANGE")
                    .arg(self.cfg.stream.render(&vars, e.op))
                    .arg(&ids[i])
                    .arg(&ids[i])
                    .arg("COUNT")
                    .arg(1);
            }
            let found: Vec<Vec<Value>> = {
                let r = pipe.query(self.conn()?);
                r.map_err(|e| {
                    let err = self.error(e);
                    self.conn = None;
                    err
                })?
            };
            for (&i, entries) in refused.iter().zip(found) {
                if entries.is_empty() {
                    if let Some(reason) = self.late(&events[i], &ids[i])? {
                        rejected.push(Rejected {
                            index: base + i,
                            reason,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

impl RedisSink {
    fn stream_of(&self, e: &Event) -> String {
        let vars = Vars {
            stream_table: &e.stream_table,
            outbox_id: e.outbox_id,
            refresh_id: e.refresh_id.as_deref().unwrap_or(""),
        };
        self.cfg.stream.render(&vars, e.op)
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

    /// An event whose id is below the stream's top and not in the stream:
    /// it was committed after later events (or relocated by an earlier
    /// attempt). Look for it among the entries above its id; if it is not
    /// there, append it after the top (`<top ms>-*`). Some(reason): it
    /// cannot be delivered.
    fn late(&mut self, e: &Event, id: &str) -> Result<Option<String>, Error> {
        let stream = self.stream_of(e);
        let mut above = redis::cmd("XREVRANGE");
        above
            .arg(&stream)
            .arg("+")
            .arg(id)
            .arg("COUNT")
            .arg(LATE_SCAN);
        let reply: redis::streams::StreamRangeReply = self.query(&above)?;
        let is_it = |v: &Value| match v {
            Value::BulkString(b) => b.as_slice() == e.dedup_key.as_bytes(),
            Value::SimpleString(s) => *s == e.dedup_key,
            _ => false,
        };
        if reply
            .ids
            .iter()
            .any(|entry| entry.map.get("dedup_key").is_some_and(is_it))
        {
            return Ok(None); // delivered before, after the top of its time
        }
        let Some(top) = reply.ids.first() else {
            return Ok(Some(format!(
                "redis: entry id {id} is below the last id of stream {stream}, which has no                  entries above it (trimmed or deleted): the event cannot be placed"
            )));
        };
        let top_ms = top.id.split('-').next().unwrap_or("0").to_string();
        let cmd = self.xadd(e, &format!("{top_ms}-*"));
        match self.query::<Value>(&cmd) {
            Ok(_) => {
                log::info!(
                    "event {} was committed after later events: appended to {stream} after                      entry {} instead of at {id}",
                    e.dedup_key,
                    top.id
                );
                Ok(None)
            }
            Err(err) if err.class == crate::retry::Class::Transient => Err(err),
            Err(err) => Ok(Some(format!(
                "redis: entry id {id} is below the top of stream {stream} (the event was                  committed after later ones) and appending it after the top failed: {}",
                err.msg
            ))),
        }
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

    fn flush(&mut self) -> Result<(), Error> {
        // An XADD reply means the entry is in the server's memory; how it
        // is persisted is the server's configuration (appendonly).
        Ok(())
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
        }
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
