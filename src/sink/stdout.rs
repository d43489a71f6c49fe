//! The `stdout` sink: events as JSON lines, pretty JSON or CSV, on stdout
//! or appended to a file with size-based rotation.
//!
//! Keys: [`KEYS`] (README.md and the man page show them). A file is fsynced
//! before the offset is committed; when it reaches `rotate_bytes` it is
//! renamed to `<path>.<n>` (n = 1, 2, ...; higher is newer) and a new file
//! is started. The directory is fsynced after a file is created or renamed,
//! so the names survive a power loss as the data does. A closed stdout
//! (`... | head`) ends the relay cleanly: events not written are not
//! committed.
//!
//! **Torn records.** A relay killed (or a disk that filled up) mid-write
//! leaves a torn last record, whose event was not committed. When the file
//! is opened again, everything after its last complete record is cut off
//! (and the event written again, whole). Every format has a reliable record
//! end: a record's JSON values (payload, headers) never hold a raw line
//! break (PostgreSQL's jsonb text has none; any other is turned into a
//! space, which JSON ignores), so in `jsonl` every line is one record, in
//! `json_pretty` a record ends with a line holding only `}` (nested
//! objects are indented), and in `csv` a record ends with a line break
//! outside quotes (the file is read once, from its start, to find it). A
//! file with no complete record is cut to nothing when what it holds is the
//! start of one; a file that does not look like this sink's output in this
//! format is refused with an error rather than cut.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::event::Event;
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
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

impl Format {
    /// The name in the config.
    fn name(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::JsonPretty => "json_pretty",
            Format::Csv => "csv",
        }
    }
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

/// The sink's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    KeySpec::new(
        "format",
        "string",
        Fallback::Value("jsonl"),
        "`jsonl` (one object per line), `json_pretty` (indented objects, one after another) or `csv` (a header row, then `dedup_key,subject,op,outbox_id,refresh_id,is_full_refresh,payload,headers`)",
    ),
    KeySpec::new(
        "path",
        "string",
        Fallback::Text("stdout"),
        "append to this file instead of stdout. The file is fsynced before each offset commit, and its directory after the file is created or renamed (a device or a pipe, such as `/dev/null` or a FIFO, is written without fsync and cannot be rotated). A torn last record (the relay killed, or the disk full, mid-write) is cut off when the file is opened again; its event was not committed and is written again. Every format has a reliable record end: JSON values never hold a raw line break (PostgreSQL's jsonb text has none; any other is written as a space, which JSON ignores), so a `jsonl` record is one line, a `json_pretty` record ends with a line holding only `}`, and a `csv` record ends with a line break outside quotes (a CSV file is read once from its start to find it). A file holding only the start of a first record is cut to nothing; a file that does not start like this sink's output in this format is refused with an error naming it, never cut",
    ),
    KeySpec::new(
        "rotate_bytes",
        "integer",
        Fallback::Text("no rotation"),
        "needs `path`. Once the file reaches this size it is fsynced and renamed to `<path>.<n>` (n = 1, 2, …, where a higher n is newer) and a new file is started. An event is never split across files",
    ),
];

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
    /// A path that is a device or a pipe (`/dev/null`, a FIFO) is written
    /// without fsync (it has nothing to make durable) and never rotated.
    fn open(&self, pipeline: &str) -> Result<Box<dyn Sink>, Error> {
        let out = match &self.path {
            None => Out::Stdout,
            Some(path) => {
                let file = open_append(path, self.format)?;
                let meta = file.metadata()?;
                let regular = meta.is_file();
                if !regular && self.rotate_bytes.is_some() {
                    return Err(Error::permanent(format!(
                        "pipeline {pipeline:?}: sink.rotate_bytes: {} is not a regular file \
                         (a device or a pipe is not rotated): unset rotate_bytes",
                        path.display()
                    )));
                }
                Out::File {
                    next_rotation: next_rotation_index(path),
                    path: path.clone(),
                    file,
                    len: meta.len(),
                    regular,
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

    /// With a path: its directory exists and a file can be made in it.
    fn check(&self, _pipeline: &str) -> Result<(), ConfigError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let probe = dir.join(format!(".pgtrickle-relay-check.{}", std::process::id()));
        match File::create(&probe) {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                Ok(())
            }
            Err(e) => Err(ConfigError::new(
                "sink.path",
                format!("directory {} is not writable: {e}", dir.display()),
            )),
        }
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
        /// A regular file (fsynced); not a device or a pipe.
        regular: bool,
    },
}

struct StdoutSink {
    cfg: StdoutConfig,
    out: Out,
    buf: Vec<u8>,
    needs_header: bool,
}

fn open_append(path: &Path, format: Format) -> Result<File, Error> {
    let failed = |e: std::io::Error| Error::permanent(format!("opening {}: {e}", path.display()));
    let existed = path.exists();
    cut_torn_tail(path, format).map_err(failed)?;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(failed)?;
    if !existed {
        sync_dir(path)?;
    }
    Ok(file)
}

/// Fsync the directory of `path`, so a file created or renamed in it is
/// there after a crash of the machine.
fn sync_dir(path: &Path) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::transient(format!("fsync of directory {}: {e}", dir.display())))
}

/// How a record of `format` starts (what a file of this sink starts with).
fn record_start(format: Format) -> &'static [u8] {
    match format {
        Format::Jsonl => b"{\"dedup_key\":",
        Format::JsonPretty => b"{\n  \"dedup_key\": ",
        Format::Csv => CSV_HEADER_LINE.as_bytes(),
    }
}

/// Cut a torn last record off `path` (see the module documentation). Its
/// event was not committed (the file is fsynced before every offset
/// commit), so it is written again, whole, after it.
fn cut_torn_tail(path: &Path, format: Format) -> std::io::Result<()> {
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let start = record_start(format);
    let mut head = vec![0u8; start.len().min(len as usize)];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut head)?;
    if !start.starts_with(&head) && format != Format::Jsonl {
        return Err(std::io::Error::other(format!(
            "it does not start like a {} file of this sink ({:?}): not an output file of \
             this sink, or written in another format",
            format.name(),
            String::from_utf8_lossy(start)
        )));
    }
    let keep = match format {
        Format::Jsonl => last_end(&mut f, len, b"\n")?,
        Format::JsonPretty => last_end(&mut f, len, b"\n}\n")?,
        Format::Csv => csv_last_end(&mut f)?,
    };
    if keep == 0 && !start.starts_with(&head) {
        return Err(std::io::Error::other(
            "it holds no complete record: not an output file of this sink?",
        ));
    }
    if keep < len {
        log::warn!(
            "{}: cutting a torn last record of {} bytes (left by a crash; its event is written \
             again)",
            path.display(),
            len - keep
        );
        f.set_len(keep)?;
        f.sync_all()?;
    }
    Ok(())
}

/// The offset just after the last `needle` in the first `len` bytes of
/// `f` (0: none), reading backwards.
fn last_end(f: &mut File, len: u64, needle: &[u8]) -> std::io::Result<u64> {
    const BLOCK: u64 = 64 * 1024;
    let overlap = needle.len() as u64 - 1;
    let mut end = len;
    let mut buf = Vec::new();
    loop {
        let begin = end.saturating_sub(BLOCK);
        // Read [begin, end + overlap): a needle across blocks is seen.
        let stop = (end + overlap).min(len);
        buf.resize((stop - begin) as usize, 0);
        f.seek(SeekFrom::Start(begin))?;
        f.read_exact(&mut buf)?;
        if let Some(i) = buf.windows(needle.len()).rposition(|w| w == needle) {
            return Ok(begin + (i + needle.len()) as u64);
        }
        if begin == 0 {
            return Ok(0);
        }
        end = begin;
    }
}

/// The offset just after the last complete CSV record of `f`: a line
/// break outside quotes, read from the start.
fn csv_last_end(f: &mut File) -> std::io::Result<u64> {
    f.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut pos, mut keep, mut quoted) = (0u64, 0u64, false);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(keep);
        }
        for (i, b) in buf[..n].iter().enumerate() {
            match b {
                // An escaped quote ("") toggles twice.
                b'"' => quoted = !quoted,
                b'\n' if !quoted => keep = pos + i as u64 + 1,
                _ => {}
            }
        }
        pos += n as u64;
    }
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

/// The CSV header row as written.
const CSV_HEADER_LINE: &str =
    "dedup_key,subject,op,outbox_id,refresh_id,is_full_refresh,payload,headers\n";

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

/// `raw` JSON text without raw line breaks: outside strings (the only
/// place valid JSON has them) they are whitespace, and become spaces.
fn one_line(raw: &str) -> Cow<'_, str> {
    if memchr::memchr2(b'\n', b'\r', raw.as_bytes()).is_some() {
        Cow::Owned(raw.replace(['\n', '\r'], " "))
    } else {
        Cow::Borrowed(raw)
    }
}

/// A copy of `e` whose payload and headers have no raw line breaks, if
/// they have any (PostgreSQL's jsonb text never has).
fn without_line_breaks(e: &Event) -> Option<Event> {
    let raw = |r: &RawValue| match one_line(r.get()) {
        Cow::Borrowed(_) => None,
        Cow::Owned(s) => RawValue::from_string(s).ok(),
    };
    let payload = raw(&e.payload);
    let headers = e.headers.as_deref().and_then(raw);
    if payload.is_none() && headers.is_none() {
        return None;
    }
    Some(Event {
        dedup_key: e.dedup_key.clone(),
        subject: e.subject.clone(),
        op: e.op,
        payload: payload.unwrap_or_else(|| e.payload.clone()),
        is_full_refresh: e.is_full_refresh,
        outbox_id: e.outbox_id,
        refresh_id: e.refresh_id.clone(),
        headers: headers.or_else(|| e.headers.clone()),
        stream_table: e.stream_table.clone(),
        created_at: e.created_at.clone(),
    })
}

impl StdoutSink {
    fn encode(&mut self, e: &Event) -> Result<(), Error> {
        let err = |x: String| Error::permanent(format!("encoding {}: {x}", e.dedup_key));
        let copy = without_line_breaks(e);
        let e = copy.as_ref().unwrap_or(e);
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
            ..
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
        // Creating the new file fsyncs the directory: the rename and the
        // new name are durable before anything in it is committed.
        *file = open_append(path, self.cfg.format)?;
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
            Out::File { regular: false, .. } => {}
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
    use crate::event::Op;

    /// A new empty directory.
    fn temp(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("pgtr-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn event(n: i64, subject: &str, payload: &str) -> Event {
        Event {
            dedup_key: format!("outbox_orders:{n}:0"),
            subject: subject.into(),
            op: Op::Insert,
            payload: RawValue::from_string(payload.into()).unwrap(),
            is_full_refresh: false,
            outbox_id: n,
            refresh_id: None,
            headers: Some(RawValue::from_string("{\"h\": 1}".into()).unwrap()),
            stream_table: "orders".into(),
            created_at: None,
        }
    }

    fn open(path: &Path, format: Format) -> Result<Box<dyn Sink>, Error> {
        let keys = serde_json::json!({"path": path, "format": format.name()});
        parse(keys.as_object().unwrap().clone()).unwrap().open("p")
    }

    fn write(path: &Path, format: Format, events: &[Event]) {
        let mut sink = open(path, format).unwrap();
        assert!(sink.publish(events).unwrap().is_empty());
        sink.flush().unwrap();
    }

    /// (n, subject) of every record of a file, parsed strictly.
    fn records(path: &Path, format: Format) -> Vec<(i64, String)> {
        let bytes = std::fs::read(path).unwrap();
        let of = |v: &Value| {
            let p = &v["payload"];
            (
                p["n"].as_i64().unwrap(),
                v["subject"].as_str().unwrap().into(),
            )
        };
        match format {
            Format::Jsonl => String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(|l| of(&serde_json::from_str::<Value>(l).unwrap()))
                .collect(),
            Format::JsonPretty => serde_json::Deserializer::from_slice(&bytes)
                .into_iter::<Value>()
                .map(|v| of(&v.unwrap()))
                .collect(),
            Format::Csv => {
                let mut r = csv::Reader::from_reader(&bytes[..]);
                assert_eq!(r.headers().unwrap(), CSV_HEADER.as_slice());
                r.records()
                    .map(|rec| {
                        let rec = rec.unwrap();
                        assert_eq!(rec.len(), 8, "{rec:?}");
                        let p: Value = serde_json::from_str(&rec[6]).unwrap();
                        (p["n"].as_i64().unwrap(), rec[1].to_string())
                    })
                    .collect()
            }
        }
    }

    /// A crash at every point of writing the fourth record: each torn file
    /// is cut back to its three complete records when opened, and the
    /// fourth is written again, whole.
    fn torn_fourth_record_is_cut(format: Format, subject: &str) {
        let events: Vec<Event> = (0..4)
            .map(|n| event(n, subject, &format!("{{\"n\": {n}}}")))
            .collect();
        // The bytes of the fourth record as the sink writes it.
        let dir = temp("record");
        let alone = dir.join("alone");
        write(&alone, format, &events[..3]);
        let before = std::fs::metadata(&alone).unwrap().len() as usize;
        write(&alone, format, &events[3..]);
        let record = std::fs::read(&alone).unwrap()[before..].to_vec();
        for cut in 1..record.len() {
            let path = dir.join(format!("torn{cut}"));
            write(&path, format, &events[..3]);
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(&record[..cut]).unwrap();
            drop(f);
            write(&path, format, &events[3..]);
            let got = records(&path, format);
            let want: Vec<(i64, String)> = (0..4).map(|n| (n, subject.to_string())).collect();
            assert_eq!(got, want, "{} cut after {cut} bytes", format.name());
            std::fs::remove_file(&path).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_device_or_pipe_is_written_without_fsync_and_never_rotated() {
        // fsync of /dev/null (or a FIFO) fails with EINVAL: nothing to
        // make durable there, so the offset moves on without it.
        let dev_null = Path::new("/dev/null");
        write(dev_null, Format::Jsonl, &[event(1, "s", "{\"n\": 1}")]);
        let keys = serde_json::json!({"path": dev_null, "rotate_bytes": 10});
        let e = parse(keys.as_object().unwrap().clone())
            .unwrap()
            .open("p")
            .err()
            .expect("rotating /dev/null refused");
        assert!(e.to_string().contains("sink.rotate_bytes"), "{e}");
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::metadata(dev_null)
            .unwrap()
            .file_type()
            .is_char_device());
    }

    #[test]
    fn a_torn_jsonl_record_is_cut() {
        torn_fourth_record_is_cut(Format::Jsonl, "pg.orders");
    }

    #[test]
    fn a_torn_json_pretty_record_is_cut() {
        torn_fourth_record_is_cut(Format::JsonPretty, "pg.orders");
    }

    #[test]
    fn a_torn_csv_record_is_cut_even_inside_a_quoted_line_break() {
        // The subject holds a line break and quotes: its field is quoted,
        // and a line break in it is no record end.
        torn_fourth_record_is_cut(Format::Csv, "pg\n\"orders\"\n");
    }

    #[test]
    fn a_torn_first_record_of_a_new_file_is_cut_to_nothing() {
        for format in [Format::Jsonl, Format::JsonPretty, Format::Csv] {
            let dir = temp("first");
            let whole = dir.join("whole");
            write(&whole, format, &[event(0, "s", "{\"n\": 0}")]);
            let first = std::fs::read(&whole).unwrap();
            for cut in [1, 5, first.len() / 2, first.len() - 1] {
                let path = dir.join(format!("f{cut}"));
                std::fs::write(&path, &first[..cut]).unwrap();
                write(&path, format, &[event(0, "s", "{\"n\": 0}")]);
                assert_eq!(
                    records(&path, format),
                    vec![(0, "s".to_string())],
                    "{} cut after {cut}",
                    format.name()
                );
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_file_that_is_not_this_sinks_output_is_refused_not_cut() {
        let dir = temp("foreign");
        let path = dir.join("f");
        std::fs::write(&path, "no newline at all").unwrap();
        assert!(open(&path, Format::Jsonl).is_err());
        // A JSON-lines file opened as CSV or pretty JSON.
        let path = dir.join("g");
        write(&path, Format::Jsonl, &[event(0, "s", "{\"n\": 0}")]);
        let before = std::fs::read(&path).unwrap();
        let e = open(&path, Format::Csv).err().unwrap();
        assert!(
            e.msg.contains("csv") && e.msg.contains(&path.display().to_string()),
            "{e}"
        );
        assert!(open(&path, Format::JsonPretty).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before, "nothing cut");
        assert!(cut_torn_tail(&dir.join("missing"), Format::Csv).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn raw_line_breaks_in_json_values_do_not_break_records() {
        // A `json` (not jsonb) value may hold line breaks as whitespace.
        let raw = "{\n\"n\": 7,\r\n \"s\": \"a\\nb\"\n}";
        for format in [Format::Jsonl, Format::JsonPretty, Format::Csv] {
            let dir = temp("raw");
            let path = dir.join("f");
            write(
                &path,
                format,
                &[event(7, "s", raw), event(8, "s", "{\"n\": 8}")],
            );
            assert_eq!(
                records(&path, format),
                vec![(7, "s".to_string()), (8, "s".to_string())],
                "{}",
                format.name()
            );
            // The escaped line break inside the string is kept.
            let text = std::fs::read_to_string(&path).unwrap();
            let kept = match format {
                Format::Csv => r#"""s"": ""a\nb"""#,
                _ => r#""s": "a\nb""#,
            };
            assert!(text.contains(kept), "{text}");
            if format == Format::Jsonl {
                assert_eq!(text.lines().count(), 2);
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
