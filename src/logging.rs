//! Logging to stderr, as text for humans or one JSON object per line.
//! stdout is never used: it carries events only.

use std::cell::RefCell;
use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::redact;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `time LEVEL [pipeline] message`
    Text,
    /// `{"time":..,"level":..,"pipeline":..,"message":..}`
    Json,
}

thread_local! {
    static PIPELINE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Tag every log line of the current thread with a pipeline name.
pub fn set_pipeline(name: &str) {
    PIPELINE.with(|p| *p.borrow_mut() = Some(name.to_string()));
}

struct Logger {
    format: Format,
    level: LevelFilter,
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        // Libraries log below warn with statement parameters (secrets):
        // only our own code logs at info and below.
        let ours = m.target().starts_with(env!("CARGO_CRATE_NAME"));
        m.level() <= self.level && (ours || m.level() <= Level::Warn)
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        // Errors quote URLs and connection strings: no secret leaves here.
        let message = redact::secrets(&r.args().to_string());
        let line = PIPELINE.with(|p| {
            let p = p.borrow();
            match self.format {
                // Text is for humans: the message already says what the
                // fields hold.
                Format::Text => {
                    let tag = p.as_deref().map(|n| format!(" [{n}]")).unwrap_or_default();
                    format!("{time} {:<5}{tag} {message}\n", r.level())
                }
                Format::Json => {
                    let mut o = serde_json::json!({
                        "time": time.to_string(),
                        "level": level_name(r.level()),
                        "message": message,
                    });
                    if let Some(n) = p.as_deref() {
                        o["pipeline"] = n.into();
                    }
                    let mut fields = Fields::default();
                    let _ = r.key_values().visit(&mut fields);
                    if !fields.0.is_empty() {
                        o["fields"] = serde_json::Value::Object(fields.0);
                    }
                    format!("{o}\n")
                }
            }
        });
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// The structured fields of a record (`log::warn!(key = value; "...")`).
#[derive(Default)]
struct Fields(serde_json::Map<String, serde_json::Value>);

impl<'kvs> log::kv::VisitSource<'kvs> for Fields {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        let v = if let Some(n) = value.to_i64() {
            n.into()
        } else if let Some(f) = value.to_f64() {
            f.into()
        } else if let Some(b) = value.to_bool() {
            b.into()
        } else {
            redact::secrets(&value.to_string()).into()
        };
        self.0.insert(key.to_string(), v);
        Ok(())
    }
}

fn level_name(l: Level) -> &'static str {
    match l {
        Level::Error => "error",
        Level::Warn => "warn",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    }
}

/// Install the logger (once, at start).
pub fn init(format: Format, level: LevelFilter) {
    let _ = log::set_boxed_logger(Box::new(Logger { format, level }));
    log::set_max_level(level);
}
