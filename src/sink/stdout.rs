//! The `stdout` sink: events as JSON lines, pretty JSON or CSV, on stdout
//! or appended to a file with size-based rotation.
//!
//! Config: `{"type":"stdout", "format":"jsonl"|"json_pretty"|"csv",
//! "path":"<file>", "rotate_bytes":N}`. A file is fsynced before the
//! offset is committed; when it reaches `rotate_bytes` it is renamed to
//! `<path>.<n>` (n = 1, 2, ...; higher is newer) and a new file is started.
//! A closed stdout (`... | head`) ends the relay cleanly: events not
//! written are not committed. A torn last line (the relay killed mid-write)
//! is cut off when the file is opened again; its event is written again.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{from_value, ConfigError};
use crate::event::Event;
use crate::retry::Error;
use crate::sink::{Rejected, Sink, SinkSpec};

/// Output format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per line.
    #[default]
    Jsonl,
    /// Indented JSON, one object after another.
    JsonPretty,
    /// CSV with a header row.
    Csv,
}

/// The `stdout` sink's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutConfig {
    #[serde(default)]
    format: Format,
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    rotate_bytes: Option<u64>,
}

/// Parse the sink's keys.
pub fn parse(keys: Map<String, Value>) -> Result<Box<dyn SinkSpec>, ConfigError> {
    let cfg: StdoutConfig = from_value("sink", Value::Object(keys))?;
    if cfg.rotate_bytes.is_some() && cfg.path.is_none() {
        return Err(ConfigError::new(
            "sink.rotate_bytes",
            "only applies to a file: set sink.path too",
        ));
    }
    if cfg.rotate_bytes == Some(0) {
        return Err(ConfigError::new("sink.rotate_bytes", "must be at least 1"));
    }
    Ok(Box::new(cfg))
}

impl SinkSpec for StdoutConfig {
    fn open(&self, _pipeline: &str) -> Result<Box<dyn Sink>, Error> {
        let out = match &self.path {
            None => Out::Stdout,
            Some(path) => {
                let file = open_append(path)?;
                let len = file.metadata()?.len();
                Out::File {
                    next_rotation: next_rotation_index(path),
                    path: path.clone(),
                    file,
                    len,
                }
            }
        };
        let needs_header = match &out {
            Out::Stdout => true,
            Out::File { len, .. } => *len == 0,
        };
        Ok(Box::new(StdoutSink {
            cfg: self.clone(),
            out,
            buf: Vec::with_capacity(BUF_LIMIT + 4096),
            needs_header: needs_header && self.format == Format::Csv,
        }))
    }
}

const BUF_LIMIT: usize = 256 * 1024;

enum Out {
    Stdout,
    File {
        path: PathBuf,
        file: File,
        /// Bytes in the current file.
        len: u64,
        next_rotation: u64,
    },
}

struct StdoutSink {
    cfg: StdoutConfig,
    out: Out,
    buf: Vec<u8>,
    needs_header: bool,
}

fn open_append(path: &Path) -> Result<File, Error> {
    let failed = |e: std::io::Error| Error::permanent(format!("opening {}: {e}", path.display()));
    cut_torn_tail(path).map_err(failed)?;
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(failed)
}

/// Cut a torn last line off `path`: a relay killed mid-write leaves one
/// without its newline. Its event was not committed (the file is fsynced
/// before every offset commit), so it is written again, whole, after it.
fn cut_torn_tail(path: &Path) -> std::io::Result<()> {
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let n = end.min(buf.len() as u64);
        f.seek(SeekFrom::Start(end - n))?;
        f.read_exact(&mut buf[..n as usize])?;
        if let Some(i) = buf[..n as usize].iter().rposition(|b| *b == b'\n') {
            let keep = end - n + i as u64 + 1;
            if keep < len {
                log::warn!(
                    "{}: cutting a torn last line of {} bytes (left by a crash; its event is written again)",
                    path.display(),
                    len - keep
                );
                f.set_len(keep)?;
                f.sync_all()?;
            }
            return Ok(());
        }
        end -= n;
    }
    if len > 0 {
        return Err(std::io::Error::other(
            "it holds no complete line: not an output file of this sink?",
        ));
    }
    Ok(())
}

/// 1 + the highest n of existing `<path>.<n>` files.
fn next_rotation_index(path: &Path) -> u64 {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let max = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let f = e.ok()?.file_name();
            f.to_str()?
                .strip_prefix(name)?
                .strip_prefix('.')?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    max + 1
}

const CSV_HEADER: [&str; 8] = [
    "dedup_key",
    "subject",
    "op",
    "outbox_id",
    "refresh_id",
    "is_full_refresh",
    "payload",
    "headers",
];

impl StdoutSink {
    fn encode(&mut self, e: &Event) -> Result<(), Error> {
        let err = |x: String| Error::permanent(format!("encoding {}: {x}", e.dedup_key));
        match self.cfg.format {
            Format::Jsonl => {
                serde_json::to_writer(&mut self.buf, e).map_err(|x| err(x.to_string()))?;
                self.buf.push(b'\n');
            }
            Format::JsonPretty => {
                serde_json::to_writer_pretty(&mut self.buf, e).map_err(|x| err(x.to_string()))?;
                self.buf.push(b'\n');
            }
            Format::Csv => {
                let mut w = csv::Writer::from_writer(&mut self.buf);
                if std::mem::take(&mut self.needs_header) {
                    w.write_record(CSV_HEADER).map_err(|x| err(x.to_string()))?;
                }
                let id = e.outbox_id.to_string();
                w.write_record([
                    e.dedup_key.as_str(),
                    e.subject.as_str(),
                    e.op.as_str(),
                    id.as_str(),
                    e.refresh_id.as_deref().unwrap_or(""),
                    if e.is_full_refresh { "true" } else { "false" },
                    e.payload.get(),
                    e.headers.as_deref().map(|h| h.get()).unwrap_or(""),
                ])
                .map_err(|x| err(x.to_string()))?;
                w.flush().map_err(|x| err(x.to_string()))?;
            }
        }
        Ok(())
    }

    /// Write the buffer out (whole events only).
    fn write_out(&mut self) -> Result<(), Error> {
        if self.buf.is_empty() {
            return Ok(());
        }
        match &mut self.out {
            Out::Stdout => std::io::stdout().lock().write_all(&self.buf)?,
            Out::File {
                file, len, path, ..
            } => {
                file.write_all(&self.buf)
                    .map_err(|e| Error::transient(format!("writing {}: {e}", path.display())))?;
                *len += self.buf.len() as u64;
            }
        }
        self.buf.clear();
        Ok(())
    }

    /// Whether the current file is full and must be rotated before more.
    fn file_full(&self) -> bool {
        match (&self.out, self.cfg.rotate_bytes) {
            (Out::File { len, .. }, Some(limit)) => {
                let size = *len + self.buf.len() as u64;
                size > 0 && size >= limit
            }
            _ => false,
        }
    }

    fn rotate(&mut self) -> Result<(), Error> {
        self.write_out()?;
        let Out::File {
            path,
            file,
            len,
            next_rotation,
        } = &mut self.out
        else {
            return Ok(());
        };
        file.sync_data()?;
        let target = PathBuf::from(format!("{}.{next_rotation}", path.display()));
        std::fs::rename(&*path, &target).map_err(|e| {
            Error::transient(format!(
                "rotating {} to {}: {e}",
                path.display(),
                target.display()
            ))
        })?;
        *next_rotation += 1;
        *file = open_append(path)?;
        *len = 0;
        self.needs_header = self.cfg.format == Format::Csv;
        Ok(())
    }
}

impl Sink for StdoutSink {
    fn publish(&mut self, events: &[Event]) -> Result<Vec<Rejected>, Error> {
        for e in events {
            if self.file_full() {
                self.rotate()?;
            }
            self.encode(e)?;
            if self.buf.len() >= BUF_LIMIT {
                self.write_out()?;
            }
        }
        self.write_out()?;
        Ok(Vec::new())
    }

    fn flush(&mut self) -> Result<(), Error> {
        self.write_out()?;
        match &mut self.out {
            Out::Stdout => std::io::stdout().lock().flush()?,
            Out::File { file, path, .. } => file
                .sync_data()
                .map_err(|e| Error::transient(format!("fsync {}: {e}", path.display())))?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_and_complete_lines_kept() {
        let dir = std::env::temp_dir().join(format!("pgtr-torn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"a\":2}\n{\"a\":").unwrap();
        cut_torn_tail(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n"
        );
        cut_torn_tail(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n"
        );
        std::fs::write(&path, "no newline at all").unwrap();
        assert!(cut_torn_tail(&path).is_err());
        cut_torn_tail(&dir.join("missing")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
