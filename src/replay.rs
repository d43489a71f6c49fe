//! `pgtrickle-relay replay`: re-publish a range of a forward pipeline's
//! outbox through its sink, with the original dedup keys, leaving every
//! position as it is. The reading and publishing are the forward loop's
//! ([`crate::forward::replay`]); this module finds the pipeline, checks
//! the range against retention, and counts for `--dry-run`.

use std::time::SystemTime;

use postgres::Client;

use crate::config::{self, Pipeline};
use crate::error::Error;
use crate::forward::{self, Range};
use crate::outbox::{quote_ident, OutboxInfo, EVENTS_OF_ROW};

/// What to replay: `from_id` and/or `since` start the range, `to_id` ends
/// it (default: the newest row now).
#[derive(Debug, Clone)]
pub struct Request {
    /// The pipeline.
    pub pipeline: String,
    /// `--from-id`.
    pub from_id: Option<i64>,
    /// `--to-id`.
    pub to_id: Option<i64>,
    /// `--since`: rows created at or after it.
    pub since: Option<SystemTime>,
    /// `--dry-run`: count, send nothing.
    pub dry_run: bool,
    /// `--batch-size`, unless the pipeline sets its own.
    pub default_batch: usize,
}

/// Replay as `req` says; the one-line report.
pub fn run(client: &mut Client, req: &Request) -> Result<String, Error> {
    let name = &req.pipeline;
    let entries = crate::coordinator::load(client, Some(name))?;
    let Some(entry) = entries.into_iter().next() else {
        return Err(Error::permanent(format!(
            "no pipeline named {name:?} in the relay catalog"
        )));
    };
    let f = match config::parse(&entry, req.default_batch) {
        Ok(Pipeline::Forward(f)) => f,
        Ok(Pipeline::Reverse(_)) => {
            return Err(Error::permanent(format!(
                "pipeline {name}: a reverse pipeline has no outbox to replay"
            )))
        }
        Err(e) => return Err(Error::permanent(format!("pipeline {name}: {e}"))),
    };
    let info = OutboxInfo::resolve(client, &f.outbox)?;
    let t = quote_ident(&info.table);
    let (oldest, newest): (Option<i64>, Option<i64>) = {
        let r = client.query_one(&format!("SELECT min(id), max(id) FROM pgtrickle.{t}"), &[])?;
        (r.get(0), r.get(1))
    };
    let from = req.from_id.unwrap_or(0).max(0);
    let to = req.to_id.or(newest).unwrap_or(0);
    if let Some(asked) = req.from_id {
        match oldest {
            None => {
                return Err(Error::permanent(format!(
                    "pipeline {name}: outbox {} holds no rows: ids from {asked} on were deleted \
                     by retention, or never written",
                    info.table
                )))
            }
            Some(o) if asked < o => {
                return Err(Error::permanent(format!(
                    "pipeline {name}: outbox ids {asked}..{} were deleted by retention; the \
                     oldest kept is {o}",
                    (o - 1).min(to)
                )))
            }
            Some(_) => {}
        }
    }
    let range = Range {
        from,
        to,
        since: req.since,
    };
    if req.dry_run {
        let r = client.query_one(
            &format!(
                "SELECT count(*), coalesce(sum({EVENTS_OF_ROW}), 0)::bigint, min(id), max(id) \
                 FROM pgtrickle.{t} WHERE id BETWEEN $1 AND $2 \
                   AND ($3::timestamptz IS NULL OR created_at >= $3::timestamptz)"
            ),
            &[&range.from, &range.to, &range.since],
        )?;
        let (rows, events): (i64, i64) = (r.get(0), r.get(1));
        return Ok(format!(
            "pipeline {name}: would replay {events} events ({rows} outbox rows{}); nothing sent \
             (--dry-run)\n",
            ids(r.get(2), r.get(3))
        ));
    }
    let mut sink = f.sink.open(name)?;
    let done = forward::replay(client, &info, &f, name, sink.as_mut(), &range)?;
    let dead = match done.dead {
        0 => String::new(),
        n => format!("; {n} refused by the sink (see pgtrickle.relay_dead_letters)"),
    };
    Ok(format!(
        "pipeline {name}: replayed {} events ({} outbox rows of {}, ids {from}..{to}){dead}; \
         the pipeline's position is unchanged\n",
        done.events, done.rows, info.table
    ))
}

/// `, ids A..B` for a non-empty range.
fn ids(min: Option<i64>, max: Option<i64>) -> String {
    match (min, max) {
        (Some(a), Some(b)) => format!(", ids {a}..{b}"),
        _ => String::new(),
    }
}
