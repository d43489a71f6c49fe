//! The `stdin` source: JSON lines from stdin or a file into the inbox.
//!
//! Keys: [`KEYS`] (README.md and the man page show them). Each line is a
//! JSON object; `event_id` comes from its `event_id` or `dedup_key` field,
//! or a CloudEvents `id` (a line with none gets the id
//! `<pipeline>:<line>:<hash of the line>`, so a replayed file deduplicates,
//! and a warning); `event_type`, `aggregate_id`, `source`, `trace_id` from
//! fields of those names (for `trace_id` first a valid W3C traceparent: the
//! `traceparent` field, else that of the `headers` object, as the stdout
//! sink writes it; see [`crate::trace`]); the payload from its `payload` field, else the
//! whole line. A line that is not JSON is logged with its number, counted
//! and skipped. stdin ends the pipeline at end of input; a file is followed
//! for appended lines unless the relay runs with `--once`. A read error in
//! the middle of a batch ends it: the lines read before are written, then
//! the error is reported.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::retry::Error;
use crate::source::decode::{fnv1a, json_text};
use crate::source::{feed, own_id, Batch, Feed, Message, Source, SourceSpec};
use crate::trace;

/// The `stdin` source's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdinConfig {
    #[serde(default)]
    path: Option<PathBuf>,
}

/// The source's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[KeySpec::new(
    "path",
    "string",
    Fallback::Unset,
    "read this file instead of stdin",
)];

/// Parse the source's keys.
pub fn parse(keys: Map<String, Value>) -> Result<Box<dyn SourceSpec>, ConfigError> {
    Ok(Box::new(from_value::<StdinConfig>(
        "source",
        Value::Object(keys),
    )?))
}

/// A raw line: its 1-based number and bytes; `None` is end of input.
type Line = Option<(u64, Vec<u8>)>;

/// stdin is read by one thread for the whole process, so a pipeline that
/// restarts continues where the previous instance stopped.
fn stdin_lines() -> &'static Mutex<Receiver<Line>> {
    static RX: OnceLock<Mutex<Receiver<Line>>> = OnceLock::new();
    RX.get_or_init(|| {
        let (tx, rx) = sync_channel::<Line>(8192);
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                let mut input = std::io::stdin().lock();
                let mut no = 0;
                loop {
                    let mut buf = Vec::new();
                    match input.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = tx.send(None);
                            return;
                        }
                        Ok(_) => {
                            no += 1;
                            if tx.send(Some((no, buf))).is_err() {
                                return;
                            }
                        }
                    }
                }
            })
            .expect("spawning the stdin reader");
        Mutex::new(rx)
    })
}

impl SourceSpec for StdinConfig {
    fn open(&self, pipeline: &str, once: bool) -> Result<Box<dyn Feed>, Error> {
        let input = match &self.path {
            None => Input::Stdin,
            Some(p) => Input::File {
                reader: BufReader::new(
                    File::open(p)
                        .map_err(|e| Error::permanent(format!("opening {}: {e}", p.display())))?,
                ),
                line: 0,
                follow: !once,
            },
        };
        Ok(feed(StdinSource {
            pipeline: pipeline.to_string(),
            input,
            malformed: 0,
            ended: false,
        }))
    }
}

enum Input {
    Stdin,
    File {
        reader: BufReader<File>,
        line: u64,
        follow: bool,
    },
}

struct StdinSource {
    pipeline: String,
    input: Input,
    malformed: u64,
    ended: bool,
}

impl StdinSource {
    /// The next line, waiting until `deadline`; Ok(None) = nothing yet.
    fn next_line(&mut self, deadline: Instant) -> Result<Option<Line>, Error> {
        match &mut self.input {
            Input::Stdin => {
                let rx = stdin_lines().lock().unwrap();
                let wait = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(wait) {
                    Ok(line) => Ok(Some(line)),
                    Err(RecvTimeoutError::Timeout) => Ok(None),
                    Err(RecvTimeoutError::Disconnected) => Ok(Some(None)),
                }
            }
            Input::File {
                reader,
                line,
                follow,
            } => loop {
                let mut buf = Vec::new();
                let n = reader.read_until(b'\n', &mut buf)?;
                if n > 0 && (buf.ends_with(b"\n") || !*follow) {
                    *line += 1;
                    return Ok(Some(Some((*line, buf))));
                }
                if n > 0 {
                    // A partial last line of a followed file: wait for the rest.
                    let pos = -(n as i64);
                    std::io::Seek::seek_relative(reader, pos)?;
                }
                if !*follow {
                    return Ok(Some(None));
                }
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(20));
            },
        }
    }
}

impl Source for StdinSource {
    /// Nothing to acknowledge: a line read is consumed.
    type Receipt = ();

    fn receive(&mut self, batch: &mut Batch<()>, max: usize, wait: Duration) -> Result<(), Error> {
        if self.ended {
            batch.end_of_input = true;
            return Ok(());
        }
        let deadline = Instant::now() + wait;
        while batch.messages.len() < max {
            // Once something arrived, take only what is already there.
            let until = if batch.messages.is_empty() {
                deadline
            } else {
                Instant::now()
            };
            match self.next_line(until)? {
                None => break,
                Some(None) => {
                    self.ended = true;
                    batch.end_of_input = true;
                    break;
                }
                Some(Some((no, bytes))) => match parse_line(&self.pipeline, no, &bytes) {
                    Ok(Some(m)) => batch.messages.push(m),
                    Ok(None) => {}
                    Err(why) => {
                        self.malformed += 1;
                        log::warn!(
                            "line {no}: {why}; skipped ({} malformed lines so far)",
                            self.malformed
                        );
                    }
                },
            }
        }
        Ok(())
    }

    fn ack(&mut self, _: Vec<()>) -> Result<(), Error> {
        Ok(())
    }
}

/// Turn one line into a message: Ok(None) for a blank line, Err(reason)
/// for a malformed one.
fn parse_line(pipeline: &str, no: u64, bytes: &[u8]) -> Result<Option<Message>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 ({e})"))?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let empty = Map::new();
    let obj = value.as_object().unwrap_or(&empty);
    let event_id = match json_text(obj, "event_id")
        .or_else(|| json_text(obj, "dedup_key"))
        .or_else(|| own_id(obj))
    {
        Some(id) if !id.is_empty() => id,
        _ => {
            let id = format!("{pipeline}:{no}:{:016x}", fnv1a(&[text.as_bytes()], false));
            log::warn!("line {no}: no event_id or dedup_key field; using generated id {id}");
            id
        }
    };
    let payload = match obj.get("payload") {
        Some(p) => p.to_string(),
        None => text.to_string(),
    };
    Ok(Some(Message {
        event_id,
        event_type: json_text(obj, "event_type"),
        source: json_text(obj, "source"),
        aggregate_id: json_text(obj, "aggregate_id"),
        trace_id: trace::trace_id(trace::in_object(obj), || json_text(obj, "trace_id")),
        payload,
        error: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_fields_and_payload() {
        let m = parse_line(
            "p",
            1,
            br#"{"event_id":"e1","event_type":"t","aggregate_id":7,"payload":{"a":1}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(m.event_id, "e1");
        assert_eq!(m.event_type.as_deref(), Some("t"));
        assert_eq!(m.aggregate_id.as_deref(), Some("7"));
        assert_eq!(m.payload, r#"{"a":1}"#);
    }

    #[test]
    fn dedup_key_or_a_stable_generated_id() {
        let m = parse_line("p", 3, br#"{"dedup_key":"k"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(
            (m.event_id.as_str(), m.payload.as_str()),
            ("k", r#"{"dedup_key":"k"}"#)
        );
        let a = parse_line("p", 3, br#"{"x":1}"#).unwrap().unwrap();
        let b = parse_line("p", 3, br#"{"x":1}"#).unwrap().unwrap();
        assert_eq!(a.event_id, b.event_id);
        assert!(a.event_id.starts_with("p:3:"));
    }

    #[test]
    fn malformed_and_blank_lines() {
        assert!(parse_line("p", 1, b"{not json")
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(parse_line("p", 1, b"\xff\xfe")
            .unwrap_err()
            .contains("UTF-8"));
        assert_eq!(parse_line("p", 1, b"  \n").unwrap(), None);
    }
}
