//! The `postgres` source (alias `pg-outbox`): the outbox of another
//! PostgreSQL database into the local inbox.
//!
//! Keys: [`KEYS`] (README.md and the man page show them).
//!
//! The remote outbox is read as a forward pipeline reads its own (the same
//! SQL): a kit outbox in (txid, id) order and only below the remote commit
//! horizon, a pg_trickle outbox by id; a claim-check delta streamed in
//! chunks; the payload version checked (an unsupported one stops the
//! pipeline with an error naming it and the outbox id). Each event becomes
//! the inbox row the `pg-inbox` sink would write: `event_id` = the dedup key
//! `<outbox table>:<outbox id>:<row index>`, `event_type` = the subject,
//! `source` = the outbox table, `payload` = the row, `trace_id` = the W3C
//! `traceparent` of the row's headers when they carry a valid one (see
//! [`crate::trace`]).
//!
//! The position lives in the local database (the pipeline's row of
//! `relay_consumer_offsets`) and is written in the transaction that writes
//! the batch into the inbox: a crash loses nothing and writes nothing
//! twice. Inside a claim-check row it also counts the delta rows written.
//! It names what it counts in (the remote cluster's system identifier and
//! the outbox table): a position of another outbox is dropped (logged; the
//! pipeline starts at the beginning of this one), one of another cluster or
//! ahead of the remote's transaction ids stops the pipeline with an error
//! that says how to start over. A claim-check row is reported to the remote
//! (`outbox_rows_consumed`) after the local commit.
//!
//! It wakes up on `LISTEN pgtrickle_outbox_new` on the remote database
//! (through the relay's one listening connection to it, [`crate::listen`]),
//! and reads anyway every `--poll-interval-ms` ([`crate::wake`]).

use std::time::Duration;

use postgres::{Client, Statement, Transaction};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::event::{Event, Template, DEFAULT_SUBJECT};
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::listen;
use crate::outbox::{rows_consumed, ClaimCheck, Decoder, OutboxInfo, Position, Row};
use crate::pg::{expand_env, mask};
use crate::pipeline::Ctx;
use crate::retry::Error;
use crate::source::{feed, Batch, Feed, Message, Source, SourceSpec};
use crate::trace::Context;
use crate::wake::Waker;

/// Outbox rows fetched per round trip.
const FETCH_ROWS: i32 = 1000;
/// Claim-check delta rows fetched per round trip, at most.
const FETCH_DELTA: usize = 10_000;
/// The longest wait before looking again at rows the horizon holds back.
const HELD_WAIT_MAX: Duration = Duration::from_millis(200);

/// The `postgres` source's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgOutboxSourceConfig {
    url: String,
    outbox: String,
    #[serde(default)]
    subject: Option<String>,
}

/// A checked config.
#[derive(Debug)]
struct Spec {
    cfg: PgOutboxSourceConfig,
    subject: Template,
}

/// The source's keys: what README.md and the man page list (see `keydocs`).
pub const KEYS: &[KeySpec] = &[
    KeySpec::new(
        "url",
        "string",
        Fallback::Required,
        "the other database's connection string. `${ENV:NAME}` and `${CREDENTIAL:NAME}` are expanded, and the TLS parameters of `--postgres-url` (`sslmode`, `sslrootcert`) apply; the password is masked in every message",
    ),
    KeySpec::new(
        "outbox",
        "string",
        Fallback::Required,
        "the outbox there: the name given to `enable_outbox` (a stream table name) or the outbox table's name",
    ),
    KeySpec::new(
        "subject",
        "template",
        Fallback::Value(DEFAULT_SUBJECT),
        "the template of `event_type`, as for sinks (`{stream_table}`, `{op}`, `{outbox_id}`, `{refresh_id}`)",
    ),
];

/// Parse the source's keys.
pub fn parse(keys: Map<String, Value>) -> Result<Box<dyn SourceSpec>, ConfigError> {
    let cfg: PgOutboxSourceConfig = from_value("source", Value::Object(keys))?;
    if cfg.url.is_empty() {
        return Err(ConfigError::new("source.url", "must not be empty"));
    }
    if cfg.outbox.is_empty() {
        return Err(ConfigError::new("source.outbox", "must not be empty"));
    }
    let subject = Template::parse(cfg.subject.as_deref().unwrap_or(DEFAULT_SUBJECT))
        .map_err(|m| ConfigError::new("source.subject", m))?;
    Ok(Box::new(Spec { cfg, subject }))
}

impl SourceSpec for Spec {
    fn open(&self, pipeline: &str, once: bool) -> Result<Box<dyn Feed>, Error> {
        let url = expand_env(&self.cfg.url)
            .map_err(|e| Error::permanent(format!("pipeline {pipeline:?}: source.url: {e}")))?;
        Ok(feed(PgOutboxSource {
            pipeline: pipeline.to_string(),
            shown: mask(&url),
            url,
            outbox: self.cfg.outbox.clone(),
            subject: self.subject.clone(),
            once,
            ctx: None,
            stored: None,
            remote: None,
            cursor: None,
            source_id: String::new(),
            unreported: Vec::new(),
            held_wait: Duration::ZERO,
        }))
    }

    /// The remote database answers and has the outbox.
    fn check(&self, pipeline: &str) -> Result<(), ConfigError> {
        let url = expand_env(&self.cfg.url).map_err(|e| crate::keys::blame("source.url", e))?;
        let app = format!("pgtrickle-relay {pipeline} (check)");
        let mut client = crate::pg::connect(&url, &app)
            .map_err(|e| ConfigError::new("source.url", format!("{}: {e}", mask(&url))))?;
        OutboxInfo::resolve(&mut client, &self.cfg.outbox).map_err(|e| {
            ConfigError::new(
                "source.outbox",
                format!("postgres source {}: {e}", mask(&url)),
            )
        })?;
        Ok(())
    }
}

/// How far the source got: past outbox row `row` (all its events), or,
/// with `row_num`, inside claim-check row `row` up to that delta row.
#[derive(Debug, Clone, Default, PartialEq)]
struct Cursor {
    row: Position,
    row_num: Option<i32>,
}

/// Where the source is once a batch is written: the cursor after its last
/// (part of a) row, and the claim-check row it completed, if any.
#[derive(Debug)]
struct Receipt {
    at: Cursor,
    claim_check: Option<i64>,
}

/// The open connection to the remote database.
struct Remote {
    client: Client,
    info: OutboxInfo,
    read: Statement,
    /// Delta rows of a claim-check row: `$1` outbox id, after `$2` row_num.
    delta: Option<Statement>,
    waker: Waker,
}

impl Drop for Remote {
    /// Count out of the remote outbox's sleepers, if counted in.
    fn drop(&mut self) {
        if !self.client.is_closed() {
            self.waker.leave(&mut self.client);
        }
    }
}

struct PgOutboxSource {
    pipeline: String,
    /// `url` with `${ENV:...}` expanded.
    url: String,
    /// The expanded URL with its secrets masked, for messages.
    shown: String,
    outbox: String,
    subject: Template,
    once: bool,
    /// The pipeline's context, from [`Source::resume`].
    ctx: Option<Ctx>,
    /// The committed position and what it counts in, as loaded by
    /// [`Source::resume`]; checked against the remote on connecting.
    stored: Option<(Cursor, Option<String>)>,
    remote: Option<Remote>,
    /// Where the next read starts (None: not checked yet).
    cursor: Option<Cursor>,
    /// What `cursor` counts in: `<system identifier>:<outbox table>`.
    source_id: String,
    /// Claim-check rows written and not yet reported to the remote.
    unreported: Vec<i64>,
    held_wait: Duration,
}

fn message(e: Event, table: &str) -> Message {
    let trace_id = Context::of(e.headers.as_deref()).map(|t| t.traceparent);
    Message {
        event_id: e.dedup_key,
        event_type: Some(e.subject),
        source: Some(table.to_string()),
        aggregate_id: None,
        trace_id,
        payload: Box::<str>::from(e.payload).into_string(),
        error: None,
    }
}

/// A position's txid as a number (`None`: an id-ordered outbox).
fn txid_number(pos: &Position) -> Option<u64> {
    pos.txid.as_deref().and_then(|t| t.parse().ok())
}

impl PgOutboxSource {
    fn ctx(&self) -> Result<&Ctx, Error> {
        self.ctx
            .as_ref()
            .ok_or_else(|| Error::permanent("the postgres source was not resumed"))
    }

    /// The remote connection, made (and the cursor checked) when needed.
    fn remote(&mut self) -> Result<&mut Remote, Error> {
        if self.remote.is_none() {
            let remote = self.connect()?;
            self.remote = Some(remote);
        }
        Ok(self.remote.as_mut().expect("connected above"))
    }

    fn connect(&mut self) -> Result<Remote, Error> {
        let app = format!("pgtrickle-relay {} (postgres source)", self.pipeline);
        let context = |e: Error| e.context(format!("pipeline {:?}: source.url", self.pipeline));
        let mut client = crate::pg::connect(&self.url, &app).map_err(context)?;
        let within = |e: Error| e.context(format!("postgres source {}", self.shown));
        let listener = listen::shared(&self.url).map_err(context)?;
        let info = OutboxInfo::resolve(&mut client, &self.outbox).map_err(within)?;
        let read = client
            .prepare(&info.read_events_sql())
            .map_err(|e| within(e.into()))?;
        let delta = match info.delta_table {
            Some(_) => Some(
                client
                    .prepare(&format!(
                        "SELECT d.* FROM ({}) d WHERE d.row_num > $2::int ORDER BY d.row_num",
                        info.delta_sql()?
                    ))
                    .map_err(|e| within(e.into()))?,
            ),
            None => None,
        };
        let r = client
            .query_one(
                "SELECT s.system_identifier, \
                        pg_snapshot_xmax(pg_current_snapshot())::text::numeric::int8 \
                 FROM pg_control_system() s",
                &[],
            )
            .map_err(|e| within(e.into()))?;
        let (system, next_xid): (i64, i64) = (r.get(0), r.get(1));
        self.check(system, next_xid as u64, &info.table)?;
        log::info!(
            "reading outbox {} of {} ({} order) into the inbox",
            info.table,
            self.shown,
            if info.has_txid {
                "commit-horizon"
            } else {
                "id"
            }
        );
        let mut waker = Waker::new(&info, listener);
        waker
            .start(&mut client)
            .map_err(|e| e.context(format!("postgres source {}", self.shown)))?;
        Ok(Remote {
            client,
            waker,
            info,
            read,
            delta,
        })
    }

    /// Check the position against the remote database (cluster `system`,
    /// next transaction id `next_xid`, outbox table `table`) and set the
    /// cursor from the stored position when it is not set.
    fn check(&mut self, system: i64, next_xid: u64, table: &str) -> Result<(), Error> {
        let id = format!("{system}:{table}");
        let p = &self.pipeline;
        let start_over = format!(
            "Nothing was skipped: the pipeline waits. To read outbox {table} there from its \
             beginning (events still in the inbox are not written twice), run: DELETE FROM \
             pgtrickle.relay_consumer_offsets WHERE pipeline_id = '{}';",
            p.replace('\'', "''")
        );
        let cursor = match &self.cursor {
            Some(c) if self.source_id == id => c.clone(),
            Some(_) => {
                return Err(Error::permanent(format!(
                    "pipeline {p:?}: the database at {} is now {id} (PostgreSQL cluster \
                     system identifier:outbox table), not {} as when this relay read it. {start_over}",
                    self.shown, self.source_id
                )))
            }
            None => {
                let (cursor, stored_id) = self.stored.clone().unwrap_or_default();
                match stored_id {
                    Some(s) if s != id => match s.split_once(':') {
                        Some((sys, other)) if sys == system.to_string() => {
                            log::warn!(
                                "the committed position belonged to outbox {other}: starting at \
                                 the beginning of outbox {table}"
                            );
                            Cursor::default()
                        }
                        _ => {
                            return Err(Error::permanent(format!(
                                "pipeline {p:?}: its committed position was read from {s} \
                                 (PostgreSQL cluster system identifier:outbox table), but the \
                                 database at {} is {id}: reading on could skip rows. {start_over}",
                                self.shown
                            )))
                        }
                    },
                    _ => cursor,
                }
            }
        };
        if txid_number(&cursor.row).is_some_and(|t| t >= next_xid) {
            return Err(Error::permanent(format!(
                "pipeline {p:?}: its position (txid {}, outbox id {}) is ahead of the next \
                 transaction id {next_xid} of the database at {}: it was restored from a backup \
                 or the position was set by hand, and reading on could skip rows. {start_over}",
                cursor.row.txid_or_zero(),
                cursor.row.id,
                self.shown
            )));
        }
        self.cursor = Some(cursor);
        self.source_id = id;
        Ok(())
    }

    /// Read what follows the cursor into `batch`, up to `max` events (at
    /// least one row). False when there was nothing to read.
    fn read(&mut self, batch: &mut Batch<Receipt>, max: usize) -> Result<bool, Error> {
        let Self {
            remote,
            cursor,
            subject,
            pipeline,
            ..
        } = self;
        let remote = remote.as_mut().expect("connected by receive");
        remote.waker.mark();
        let at = cursor.clone().expect("set on connecting");
        let decoder = Decoder {
            info: &remote.info,
            subject,
            pipeline,
        };
        // Inside a claim-check row: read from just before it again, and
        // skip the delta rows already written.
        let (from, inside) = match at.row_num {
            Some(k) => (
                Position {
                    txid: at.row.txid.clone(),
                    id: at.row.id - 1,
                },
                Some((at.row.id, k)),
            ),
            None => (at.row.clone(), None),
        };
        let mut tx = remote.client.build_transaction().read_only(true).start()?;
        let room = max.saturating_sub(batch.messages.len()).max(1) as i64;
        let portal = tx.bind(&remote.read, &[&from.txid_or_zero(), &from.id, &room])?;
        let mut any = false;
        'rows: loop {
            let rows = tx.query_portal(&portal, FETCH_ROWS)?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                if batch.messages.len() >= max {
                    break 'rows;
                }
                any = true;
                let row = Row::from_pg(r);
                let mut events = Vec::new();
                let receipt = match decoder.decode(&row, &mut events)? {
                    None => {
                        let table = &remote.info.table;
                        batch
                            .messages
                            .extend(events.into_iter().map(|e| message(e, table)));
                        Receipt {
                            at: Cursor {
                                row: row.position(),
                                row_num: None,
                            },
                            claim_check: None,
                        }
                    }
                    Some(cc) => {
                        let after = match inside {
                            Some((id, k)) if id == row.id => k,
                            _ => -1,
                        };
                        let delta = remote.delta.as_ref().ok_or_else(|| {
                            Error::permanent(format!(
                                "pipeline {pipeline:?}: outbox {} id {}: a claim-check row, but \
                                 the outbox has no delta-rows table",
                                remote.info.table, row.id
                            ))
                        })?;
                        let (receipt, result) =
                            stream(&mut tx, delta, &decoder, &row, &cc, after, batch, max);
                        if let Some(receipt) = receipt {
                            *cursor = Some(receipt.at.clone());
                            batch.receipts.push(receipt);
                        }
                        if result? {
                            continue;
                        }
                        break 'rows;
                    }
                };
                *cursor = Some(receipt.at.clone());
                batch.receipts.push(receipt);
            }
        }
        drop(portal);
        tx.commit()?;
        Ok(any)
    }

    /// Nothing to read: wait for rows held back by the horizon, for a
    /// notification, or (`--once`) end.
    fn idle(&mut self, batch: &mut Batch<Receipt>) -> Result<(), Error> {
        let at = self.cursor.clone().unwrap_or_default();
        let remote = self.remote.as_mut().expect("connected by receive");
        let ctx = self.ctx.as_ref().expect("resumed before reading");
        if remote.info.held_back(&mut remote.client, &at.row)? {
            // Committed rows wait for an older transaction to end: look
            // again soon (or at a notification) rather than only at the
            // next notification.
            self.held_wait = (self.held_wait * 2).clamp(Duration::from_millis(1), HELD_WAIT_MAX);
            remote.waker.wait(ctx, self.held_wait);
            return Ok(());
        }
        self.held_wait = Duration::ZERO;
        if self.once {
            batch.end_of_input = true;
            return Ok(());
        }
        remote.waker.idle(ctx, &mut remote.client, None)?;
        Ok(())
    }
}

/// Stream the delta rows of claim-check row `row` after row_num `after`
/// into `batch` until it holds `max` events. Returns the receipt for what
/// was added (None: nothing) and whether the row is done.
#[allow(clippy::too_many_arguments)]
fn stream(
    tx: &mut Transaction,
    delta: &Statement,
    decoder: &Decoder,
    row: &Row,
    cc: &ClaimCheck,
    after: i32,
    batch: &mut Batch<Receipt>,
    max: usize,
) -> (Option<Receipt>, Result<bool, Error>) {
    let mut last = after;
    let mut fetch = || -> Result<bool, Error> {
        let portal = tx.bind(delta, &[&row.id, &after])?;
        while batch.messages.len() < max {
            let want = (max - batch.messages.len()).min(FETCH_DELTA) as i32;
            let rows = tx.query_portal(&portal, want)?;
            for d in &rows {
                let e = decoder.delta_event(row, cc, d)?;
                batch.messages.push(message(e, &decoder.info.table));
                last = d.get(0);
            }
            if (rows.len() as i32) < want {
                return Ok(true);
            }
        }
        Ok(false)
    };
    let result = fetch();
    let receipt = match result {
        Ok(true) => Some(Receipt {
            at: Cursor {
                row: row.position(),
                row_num: None,
            },
            claim_check: Some(row.id),
        }),
        _ if last > after => Some(Receipt {
            at: Cursor {
                row: row.position(),
                row_num: Some(last),
            },
            claim_check: None,
        }),
        _ => None,
    };
    (receipt, result)
}

impl Source for PgOutboxSource {
    type Receipt = Receipt;
    const RECORDS: bool = true;

    fn resume(&mut self, local: &mut Client, ctx: &Ctx) -> Result<(), Error> {
        let row = local.query_opt(
            "SELECT last_change_id, last_txid, last_row_num, source_id \
             FROM pgtrickle.relay_get_source_offset($1, $2)",
            &[&ctx.relay_group, &ctx.name],
        )?;
        self.stored = Some(match row {
            Some(r) => (
                Cursor {
                    row: Position {
                        id: r.get::<_, Option<i64>>(0).unwrap_or(0),
                        txid: r.get(1),
                    },
                    row_num: r.get(2),
                },
                r.get(3),
            ),
            None => (Cursor::default(), None),
        });
        self.ctx = Some(ctx.clone());
        // Checked again against the remote database on connecting.
        self.cursor = None;
        self.remote = None;
        Ok(())
    }

    fn receive(
        &mut self,
        batch: &mut Batch<Receipt>,
        max: usize,
        _wait: Duration,
    ) -> Result<(), Error> {
        let result = match self.remote() {
            Err(e) => Err(e),
            Ok(_) => match self.read(batch, max) {
                Ok(false) => self.idle(batch),
                Ok(true) => {
                    let remote = self.remote.as_mut().expect("connected by receive");
                    remote.waker.working(&mut remote.client)
                }
                Err(e) => Err(e),
            }
            .map_err(|e| e.context(format!("postgres source {}", self.shown))),
        };
        if result.is_err() {
            // Connect again next time (the cursor is kept).
            self.remote = None;
        }
        result
    }

    fn record(&mut self, tx: &mut Transaction<'_>, receipts: &[Receipt]) -> Result<(), Error> {
        let Some(last) = receipts.last() else {
            return Ok(());
        };
        let ctx = self.ctx()?;
        let recorded: bool = tx
            .query_one(
                "SELECT pgtrickle.relay_commit_source_offset($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &ctx.relay_group,
                    &ctx.name,
                    &last.at.row.id,
                    &last.at.row.txid,
                    &last.at.row_num,
                    &self.source_id,
                    &ctx.worker_id,
                ],
            )?
            .get(0);
        if !recorded {
            return Err(Error::permanent(format!(
                "pipeline {:?} is no longer a reverse pipeline (deleted while running): its \
                 position and events are not written",
                ctx.name
            )));
        }
        Ok(())
    }

    fn ack(&mut self, receipts: Vec<Receipt>) -> Result<(), Error> {
        self.unreported
            .extend(receipts.iter().filter_map(|r| r.claim_check));
        while let Some(&id) = self.unreported.first() {
            let remote = self.remote()?;
            if let Err(e) = rows_consumed(&mut remote.client, &remote.info, id) {
                self.remote = None;
                return Err(e.context(format!("postgres source {}", self.shown)));
            }
            self.unreported.remove(0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_errors_name_the_key() {
        let p = |v: Value| parse(v.as_object().unwrap().clone()).unwrap_err().key;
        assert_eq!(p(json!({"outbox": "orders"})), "source.url");
        assert_eq!(p(json!({"url": "postgres://h/d"})), "source.outbox");
        assert_eq!(p(json!({"url": "", "outbox": "o"})), "source.url");
        assert_eq!(
            p(json!({"url": "postgres://h/d", "outbox": ""})),
            "source.outbox"
        );
        assert_eq!(
            p(json!({"url": "postgres://h/d", "outbox": "o", "subject": "{nope}"})),
            "source.subject"
        );
        assert_eq!(
            p(json!({"url": "postgres://h/d", "outbox": "o", "inbox": "x"})),
            "source.inbox"
        );
        assert!(parse(
            json!({"url": "postgres://h/d", "outbox": "o"})
                .as_object()
                .unwrap()
                .clone()
        )
        .is_ok());
    }
}
