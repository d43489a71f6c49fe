//! `pgtrickle-relay check`: validate pipelines' configs without running
//! them and, with `--connect`, reach what each one uses: the outbox or
//! inbox in this database, and the sink or source (each checks itself:
//! [`crate::sink::SinkSpec::check`], [`crate::source::SourceSpec::check`]).

use postgres::Client;
use serde_json::{json, Value};

use crate::config::{self, CatalogEntry, Pipeline};
use crate::error::Error;
use crate::inbox::Inbox;
use crate::keys::ConfigError;
use crate::outbox::OutboxInfo;

/// What was found about one pipeline.
#[derive(Debug)]
pub struct Report {
    /// The pipeline.
    pub name: String,
    /// What is wrong, by key (none: fine).
    pub problems: Vec<ConfigError>,
}

/// Check the pipelines named in `only` (all when empty) of the catalog
/// `client` reads; a name not in the catalog is a problem of its own.
pub fn run(
    client: &mut Client,
    only: &[String],
    connect: bool,
    default_batch: usize,
) -> Result<Vec<Report>, Error> {
    let entries = crate::coordinator::load(client, None)?;
    let mut reports = Vec::new();
    for name in only {
        if !entries.iter().any(|e| &e.name == name) {
            reports.push(Report {
                name: name.clone(),
                problems: vec![ConfigError::new(
                    "name",
                    "no such pipeline in the relay catalog",
                )],
            });
        }
    }
    for e in entries
        .iter()
        .filter(|e| only.is_empty() || only.contains(&e.name))
    {
        let problems = match check(client, e, connect, default_batch) {
            Ok(()) => Vec::new(),
            Err(p) => vec![p],
        };
        reports.push(Report {
            name: e.name.clone(),
            problems,
        });
    }
    reports.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(reports)
}

/// The first problem of one pipeline.
fn check(
    client: &mut Client,
    e: &CatalogEntry,
    connect: bool,
    default_batch: usize,
) -> Result<(), ConfigError> {
    let p = config::parse(e, default_batch)?;
    if !connect {
        return Ok(());
    }
    match p {
        Pipeline::Forward(f) => {
            OutboxInfo::resolve(client, &f.outbox)
                .map_err(|err| ConfigError::new("source.outbox", err.msg))?;
            f.sink.check(&e.name)
        }
        Pipeline::Reverse(r) => {
            Inbox::open(client, &r.inbox, r.schema.as_deref())
                .map_err(|err| ConfigError::new("sink.inbox", err.msg))?;
            r.source.check(&e.name)
        }
    }
}

/// One line per problem (`pipeline NAME: KEY: MESSAGE`), one `ok` line
/// per fine pipeline; secrets masked.
pub fn text(reports: &[Report]) -> String {
    let mut s = String::new();
    for r in reports {
        if r.problems.is_empty() {
            s.push_str(&format!("pipeline {}: ok\n", r.name));
        }
        for p in &r.problems {
            let msg = crate::redact::secrets(&p.msg);
            s.push_str(&format!("pipeline {}: {}: {msg}\n", r.name, p.key));
        }
    }
    s
}

/// The reports as JSON: `{"ok": bool, "pipelines": [{"name", "ok",
/// "problems": [{"key", "message"}]}]}`.
pub fn json(reports: &[Report]) -> Value {
    let pipelines: Vec<Value> = reports
        .iter()
        .map(|r| {
            let problems: Vec<Value> = r
                .problems
                .iter()
                .map(|p| json!({"key": p.key, "message": crate::redact::secrets(&p.msg)}))
                .collect();
            json!({"name": r.name, "ok": r.problems.is_empty(), "problems": problems})
        })
        .collect();
    json!({
        "ok": reports.iter().all(|r| r.problems.is_empty()),
        "pipelines": pipelines,
    })
}
