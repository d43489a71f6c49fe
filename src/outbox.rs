//! Reading outboxes: resolving the tables, the read position (commit
//! horizon or id), and decoding payloads into events.
//!
//! Kit outboxes record the writing transaction (`txid xid8`); they are read
//! in (txid, id) order and only below the commit horizon
//! (`pg_snapshot_xmin(pg_current_snapshot())`), so a row whose transaction
//! commits after a later id has been read is never skipped. pg_trickle's
//! own outboxes (no `txid`, written by one refresh at a time) are read by id.

use std::sync::Arc;

use postgres::{Client, GenericClient};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::Error;
use crate::event::{dedup_key, Event, Op, Template, Vars};
use crate::pipeline::Ctx;

/// Where an outbox lives.
#[derive(Debug, Clone)]
pub struct OutboxInfo {
    /// The stream table name (`{stream_table}` in templates), shared by
    /// every event of the outbox.
    pub stream_table: Arc<str>,
    /// The outbox table in schema `pgtrickle`.
    pub table: String,
    /// The claim-check delta-rows table, if any.
    pub delta_table: Option<String>,
    /// Whether rows carry `txid` (kit outbox: commit-horizon reads).
    pub has_txid: bool,
    /// Whether inserts send `pg_notify` (a kit outbox made with
    /// `p_notify => false` does not: it is polled).
    pub notifies: bool,
    /// Whether they notify only while a relay is asleep on the outbox
    /// (kit outboxes; see [`crate::wake`]).
    pub notifies_sleepers: bool,
}

impl OutboxInfo {
    /// Resolve `outbox` (stream table or outbox table name).
    pub fn resolve(client: &mut Client, outbox: &str) -> Result<OutboxInfo, Error> {
        let row = client
            .query_one("SELECT * FROM pgtrickle.relay_outbox_info($1)", &[&outbox])
            .map_err(Error::from)?;
        Ok(OutboxInfo {
            stream_table: Arc::from(row.get::<_, String>(0)),
            table: row.get(1),
            delta_table: row.get(2),
            has_txid: row.get(3),
            notifies: row.get(4),
            // Absent from the SQL of older kits (a remote database's).
            notifies_sleepers: row.try_get("notifies_sleepers").unwrap_or(false),
        })
    }

    /// The forward read: the next rows after a position, `$1` txid
    /// (text), `$2` id, `$3` how many rows (`$1` is ignored for id-ordered
    /// outboxes), each with how many events it holds (column 7). The
    /// reader streams them and stops once it has a batch of events
    /// ([`ReadLimit`] chooses `$3`), so no window function counts events on
    /// the server (it cost a fifth of the query).
    pub fn read_sql(&self) -> String {
        self.rows_sql("", false)
    }

    /// [`OutboxInfo::read_sql`] for a reader that takes rows in fetched
    /// chunks (the postgres source): `$3` is how many events, and the rows
    /// end before the one that would take them past `$3` events (there is
    /// always at least one row), so memory stays bounded by the batch
    /// size, not by how many events each row holds.
    pub fn read_events_sql(&self) -> String {
        self.rows_sql("", true)
    }

    /// [`OutboxInfo::read_sql`] kept to a range: also `$4` the first id,
    /// `$5` the last id, `$6` the earliest `created_at` (a timestamptz, or
    /// NULL for any); for `pgtrickle-relay replay`.
    pub fn range_sql(&self) -> String {
        self.rows_sql(
            " AND o.id BETWEEN $4::bigint AND $5::bigint \
             AND ($6::timestamptz IS NULL OR o.created_at >= $6::timestamptz)",
            false,
        )
    }

    /// The read query, with `range` added to its filter; `$3` counts
    /// events (`windowed`) or rows.
    fn rows_sql(&self, range: &str, windowed: bool) -> String {
        let t = quote_ident(&self.table);
        // Qualified names throughout: an output column `txid::text` is also
        // named txid, and ORDER BY txid would sort that text.
        let (txid, filter, order) = if self.has_txid {
            (
                "o.txid",
                "(o.txid, o.id) > ($1::text::xid8, $2::bigint) \
                 AND o.txid < pg_snapshot_xmin(pg_current_snapshot())",
                "o.txid, o.id",
            )
        } else {
            (
                "NULL::xid8",
                "o.id > $2::bigint AND ($1::text IS NULL OR true)",
                "o.id",
            )
        };
        let headers = if self.has_txid {
            "o.headers"
        } else {
            "NULL::jsonb"
        };
        let events = "CASE WHEN o.is_claim_check THEN 1 \
                      ELSE greatest(coalesce(o.inserted_count, 0) \
                                  + coalesce(o.deleted_count, 0), 1) END::int8";
        if !windowed {
            return format!(
                "SELECT o.id, {txid}::text, o.refresh_id::text, o.is_claim_check, o.payload::text, \
                        {headers}::text, o.created_at, {events} \
                 FROM pgtrickle.{t} o WHERE {filter}{range} ORDER BY {order} LIMIT $3"
            );
        }
        // The inner query only counts events; payloads are converted to
        // text (and detoasted) in the outer query, for the rows kept. The
        // outer order is the inner one by name, so PostgreSQL keeps it
        // without sorting the rows again (they carry their payload text).
        let outer = if self.has_txid {
            "b.txid, b.id"
        } else {
            "b.id"
        };
        format!(
            "SELECT id, txid::text, refresh_id::text, is_claim_check, payload::text, headers::text, \
                    created_at, events \
             FROM ( \
               SELECT o.id, {txid} AS txid, o.refresh_id, o.is_claim_check, o.payload, \
                      {headers} AS headers, o.created_at, {events} AS events, \
                      sum({events}) OVER (ORDER BY {order} ROWS UNBOUNDED PRECEDING) - {events} AS before \
               FROM pgtrickle.{t} o \
               WHERE {filter}{range} ORDER BY {order} LIMIT $3) b \
             WHERE before < $3 ORDER BY {outer}"
        )
    }

    /// Whether rows exist after `pos` that the horizon still holds back.
    pub fn held_back(&self, client: &mut Client, pos: &Position) -> Result<bool, Error> {
        if !self.has_txid {
            return Ok(false);
        }
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM pgtrickle.{} WHERE (txid, id) > ($1::text::xid8, $2::bigint))",
            quote_ident(&self.table)
        );
        Ok(client
            .query_one(&sql, &[&pos.txid_or_zero(), &pos.id])?
            .get(0))
    }

    /// Age in seconds of the oldest committed row after `pos` (0: none).
    pub fn lag_seconds(&self, client: &mut Client, pos: &Position) -> Result<f64, Error> {
        let t = quote_ident(&self.table);
        let sql = if self.has_txid {
            format!(
                "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM \
                 (SELECT created_at FROM pgtrickle.{t} WHERE (txid, id) > ($1::text::xid8, $2::bigint) \
                  ORDER BY txid, id LIMIT 1) s"
            )
        } else {
            format!(
                "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM \
                 (SELECT created_at FROM pgtrickle.{t} WHERE id > $2::bigint AND ($1::text IS NULL OR true) \
                  ORDER BY id LIMIT 1) s"
            )
        };
        Ok(client
            .query_one(&sql, &[&pos.txid_or_zero(), &pos.id])?
            .get::<_, f64>(0)
            .max(0.0))
    }

    /// The query streaming a claim-check delta: `$1` outbox id.
    pub fn delta_sql(&self) -> Result<String, Error> {
        let d = self.delta_table.as_deref().ok_or_else(|| {
            Error::permanent(format!(
                "outbox {} has a claim-check row but no delta-rows table",
                self.table
            ))
        })?;
        Ok(format!(
            "SELECT row_num, op::text, payload::text FROM pgtrickle.{} \
             WHERE outbox_id = $1 ORDER BY row_num",
            quote_ident(d)
        ))
    }
}

/// The events an outbox row holds, as SQL over its columns (a claim-check
/// row's are in its delta rows).
pub const EVENTS_OF_ROW: &str = "CASE WHEN is_claim_check \
     THEN coalesce(inserted_count, 0) + coalesce(deleted_count, 0) \
     ELSE greatest(coalesce(inserted_count, 0) + coalesce(deleted_count, 0), 1) END";

/// Double-quote an identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A read position: the last delivered row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    /// Its transaction id (kit outboxes), as text.
    pub txid: Option<String>,
    /// Its outbox id.
    pub id: i64,
}

impl Position {
    /// The txid, `0` before the first row.
    pub fn txid_or_zero(&self) -> String {
        self.txid.clone().unwrap_or_else(|| "0".into())
    }

    /// Load a pipeline's committed position (none yet: the beginning).
    pub fn load(client: &mut Client, relay_group: &str, pipeline: &str) -> Result<Position, Error> {
        let row = client.query_opt(
            "SELECT last_change_id, last_txid FROM pgtrickle.relay_get_offset($1, $2)",
            &[&relay_group, &pipeline],
        )?;
        Ok(match row {
            Some(r) => Position {
                id: r.get::<_, Option<i64>>(0).unwrap_or(0),
                txid: r.get(1),
            },
            None => Position::default(),
        })
    }

    /// Persist this position (in outbox table `outbox`) as the pipeline's
    /// committed offset. False, committing nothing, when the catalog no
    /// longer has the pipeline with exactly `config` (it was deleted or
    /// changed while this session ran).
    pub fn commit(
        &self,
        client: &mut impl GenericClient,
        ctx: &Ctx,
        outbox: &str,
    ) -> Result<bool, Error> {
        Ok(client
            .query_one(
                "SELECT pgtrickle.relay_commit_offset($1, $2, $3, $4, $5, $6, $7::text::jsonb)",
                &[
                    &ctx.relay_group,
                    &ctx.name,
                    &self.id,
                    &self.txid,
                    &ctx.worker_id,
                    &outbox,
                    &&*ctx.config,
                ],
            )?
            .get(0))
    }

    /// Before loading the pipeline's position in outbox table `outbox`:
    /// let PostgreSQL rebase positions of a database moved to this cluster
    /// (logged) and drop a position of another outbox (logged). Err, naming
    /// the cause and the command that resumes, when the position counts
    /// another cluster's transaction ids and nothing proves which rows are
    /// new: reading on would skip them.
    pub fn check(client: &mut Client, ctx: &Ctx, outbox: &str) -> Result<(), Error> {
        let rows = client.query(
            "SELECT action, detail FROM pgtrickle.relay_check_offset($1, $2, $3)",
            &[&ctx.relay_group, &ctx.name, &outbox],
        )?;
        for r in rows {
            let (action, detail): (String, String) = (r.get(0), r.get(1));
            match action.as_str() {
                "moved" => return Err(Error::permanent(detail)),
                _ => log::warn!("{detail}"),
            }
        }
        Ok(())
    }
}

/// One outbox row.
#[derive(Debug)]
pub struct Row {
    /// `id`.
    pub id: i64,
    /// `txid` as text (kit outboxes).
    pub txid: Option<String>,
    /// `refresh_id`.
    pub refresh_id: Option<String>,
    /// `is_claim_check`.
    pub claim_check: bool,
    /// `payload` as JSON text.
    pub payload: String,
    /// `headers` as JSON text.
    pub headers: Option<String>,
    /// `created_at` as an RFC 3339 UTC timestamp with microseconds (the
    /// CloudEvents `time`), when the query read it (column 6).
    pub created_at: Option<std::sync::Arc<str>>,
    /// How many events the row holds, as the read query counts them
    /// (column 7; 1 when the query does not say).
    pub events: i64,
}

/// How many rows the forward read asks for (its `$3`): enough for a batch
/// of events if the rows hold as many events as the widest row of the
/// last read did; one row for the first read, which knows nothing yet.
/// Rows wider than that are only read further than needed (the reader
/// drops what it streams past the batch); narrower ones make a smaller
/// batch, and the next read asks for more.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadLimit {
    /// The most events one row of the last read held (None: no read yet).
    widest: Option<i64>,
}

impl ReadLimit {
    /// The rows to read for `events` events (at least one).
    pub fn rows(&self, events: usize) -> i64 {
        self.widest.map_or(1, |w| (events as i64 / w).max(1))
    }

    /// A read ended whose widest row held `widest` events.
    pub fn read(&mut self, widest: i64) {
        self.widest = Some(widest.max(1));
    }
}

/// `t` as RFC 3339 in UTC with microseconds, as the CloudEvents `time`;
/// None outside the years 1970 to 9999, which RFC 3339 (and humantime)
/// cannot write.
fn rfc3339(t: std::time::SystemTime) -> Option<std::sync::Arc<str>> {
    let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    (since.as_secs() < 253_402_300_800)
        .then(|| humantime::format_rfc3339_micros(t).to_string().into())
}

impl Row {
    /// From a row of [`OutboxInfo::read_sql`].
    pub fn from_pg(r: &postgres::Row) -> Row {
        Row {
            id: r.get(0),
            txid: r.get(1),
            refresh_id: r.get(2),
            claim_check: r.get::<_, Option<bool>>(3).unwrap_or(false),
            payload: r
                .get::<_, Option<String>>(4)
                .unwrap_or_else(|| "null".into()),
            headers: r.get(5),
            // Read as a timestamp and formatted here: to_char on the server
            // cost about a fifth of the read query.
            created_at: r
                .try_get::<_, Option<std::time::SystemTime>>(6)
                .ok()
                .flatten()
                .and_then(rfc3339),
            events: r.try_get::<_, i64>(7).unwrap_or(1),
        }
    }

    /// This row as a position.
    pub fn position(&self) -> Position {
        Position {
            txid: self.txid.clone(),
            id: self.id,
        }
    }
}

#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(borrow, default)]
    v: Option<&'a RawValue>,
    #[serde(borrow, default)]
    inserted: Option<&'a RawValue>,
    #[serde(borrow, default)]
    deleted: Option<&'a RawValue>,
    #[serde(borrow, default)]
    claim_check: Option<&'a RawValue>,
    #[serde(borrow, default)]
    full_refresh: Option<&'a RawValue>,
    #[serde(default)]
    refresh_id: Option<String>,
}

/// A claim-check row: its events are in the delta-rows table.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimCheck {
    /// Rows are a complete snapshot.
    pub full_refresh: bool,
    /// The refresh id from the payload or the row.
    pub refresh_id: Option<String>,
}

/// Turns outbox rows into events for one pipeline.
pub struct Decoder<'a> {
    /// The outbox.
    pub info: &'a OutboxInfo,
    /// The subject template.
    pub subject: &'a Template,
    /// The pipeline, for error messages.
    pub pipeline: &'a str,
}

impl Decoder<'_> {
    fn fail(&self, row: &Row, why: impl std::fmt::Display) -> Error {
        Error::permanent(format!(
            "pipeline {:?}: outbox {} id {}: {why}",
            self.pipeline, self.info.table, row.id
        ))
    }

    /// The boolean payload field `key` of `row` (absent or null: false).
    fn flag(&self, row: &Row, key: &str, v: Option<&RawValue>) -> Result<bool, Error> {
        match v.map(|r| r.get()) {
            None | Some("false") | Some("null") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => {
                Err(self.fail(row, format!("{key}: expected true or false, found {other}")))
            }
        }
    }

    /// Append the events of an inline row to `out` (deleted rows first,
    /// then inserted rows; the row index counts in that order), or return
    /// the claim-check to stream.
    pub fn decode(&self, row: &Row, out: &mut Vec<Event>) -> Result<Option<ClaimCheck>, Error> {
        let p: Payload = serde_json::from_str(&row.payload)
            .map_err(|e| self.fail(row, format!("bad payload: {e}")))?;
        match p.v.map(|v| v.get()) {
            Some("1") => {}
            Some(v) => {
                return Err(self.fail(
                    row,
                    format!("unsupported payload version v={v} (this relay reads v=1)"),
                ))
            }
            None => return Err(self.fail(row, "payload has no version field \"v\"")),
        }
        let full_refresh = self.flag(row, "full_refresh", p.full_refresh)?;
        let refresh_id = p.refresh_id.or_else(|| row.refresh_id.clone());
        if row.claim_check || self.flag(row, "claim_check", p.claim_check)? {
            return Ok(Some(ClaimCheck {
                full_refresh,
                refresh_id,
            }));
        }
        let headers = match &row.headers {
            Some(h) => Some(
                RawValue::from_string(h.clone())
                    .map_err(|e| self.fail(row, format!("bad headers: {e}")))?,
            ),
            None => None,
        };
        let mut vars = Vars::bare(
            &self.info.stream_table,
            row.id,
            refresh_id.as_deref().unwrap_or(""),
        );
        vars.headers = headers.as_deref();
        let mut index = 0;
        for (op, list) in [(Op::Delete, p.deleted), (Op::Insert, p.inserted)] {
            let rows: Vec<&RawValue> = match list {
                None => Vec::new(),
                Some(l) if l.get() == "null" => Vec::new(),
                Some(l) => serde_json::from_str(l.get()).map_err(|e| {
                    self.fail(
                        row,
                        format!("{} must be an array of rows: {e}", op_list(op)),
                    )
                })?,
            };
            for r in rows {
                vars.payload = Some(r);
                out.push(Event {
                    stream_table: self.info.stream_table.clone(),
                    dedup_key: dedup_key(&self.info.table, row.id, index),
                    subject: self.subject.render(&vars, op),
                    op,
                    payload: r.to_owned(),
                    is_full_refresh: full_refresh,
                    outbox_id: row.id,
                    refresh_id: refresh_id.clone(),
                    headers: headers.clone(),
                    created_at: row.created_at.clone(),
                });
                index += 1;
            }
        }
        Ok(None)
    }

    /// An event of a claim-check delta row (`row_num`, `op`, `payload`).
    pub fn delta_event(
        &self,
        row: &Row,
        cc: &ClaimCheck,
        d: &postgres::Row,
    ) -> Result<Event, Error> {
        let row_num: i32 = d.get(0);
        let op = match d.get::<_, Option<String>>(1).as_deref() {
            Some("I") => Op::Insert,
            Some("D") => Op::Delete,
            other => return Err(self.fail(row, format!("delta row {row_num}: bad op {other:?}"))),
        };
        let payload: Option<String> = d.get(2);
        let payload = RawValue::from_string(payload.unwrap_or_else(|| "null".into()))
            .map_err(|e| self.fail(row, format!("delta row {row_num}: {e}")))?;
        let mut vars = Vars::bare(
            &self.info.stream_table,
            row.id,
            cc.refresh_id.as_deref().unwrap_or(""),
        );
        vars.payload = Some(&payload);
        Ok(Event {
            stream_table: self.info.stream_table.clone(),
            dedup_key: dedup_key(&self.info.table, row.id, row_num as i64),
            subject: self.subject.render(&vars, op),
            op,
            payload,
            is_full_refresh: cc.full_refresh,
            outbox_id: row.id,
            refresh_id: cc.refresh_id.clone(),
            headers: None,
            created_at: row.created_at.clone(),
        })
    }
}

fn op_list(op: Op) -> &'static str {
    match op {
        Op::Insert => "inserted",
        Op::Delete => "deleted",
    }
}

/// Tell the outbox a claim-check row was fully delivered (idempotent).
pub fn rows_consumed(c: &mut impl GenericClient, info: &OutboxInfo, id: i64) -> Result<(), Error> {
    c.execute(
        "SELECT pgtrickle.outbox_rows_consumed($1, $2)",
        &[&&*info.stream_table, &id],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder_fixture() -> (OutboxInfo, Template) {
        (
            crate::testkit::outbox_orders(),
            Template::parse("t.{stream_table}.{op}").unwrap(),
        )
    }

    fn row(payload: &str) -> Row {
        Row {
            id: 9,
            txid: Some("100".into()),
            refresh_id: None,
            claim_check: false,
            payload: payload.into(),
            headers: Some(r#"{"h":1}"#.into()),
            created_at: None,
            events: 1,
        }
    }

    #[test]
    fn a_read_asks_for_rows_enough_for_a_batch_of_rows_as_wide_as_the_last_reads_widest_one_at_first(
    ) {
        let mut l = ReadLimit::default();
        assert_eq!(
            l.rows(5000),
            1,
            "the first read finds out how wide rows are"
        );
        l.read(1);
        assert_eq!(l.rows(5000), 5000);
        l.read(1000);
        assert_eq!(l.rows(5000), 5);
        l.read(3000);
        assert_eq!(l.rows(5000), 1);
        l.read(2);
        assert_eq!(l.rows(5000), 2500);
        l.read(0);
        assert_eq!(l.rows(5000), 5000);
    }

    #[test]
    fn created_at_is_rfc3339_utc_with_microseconds_within_what_rfc3339_can_write() {
        use std::time::{Duration, UNIX_EPOCH};
        let t = UNIX_EPOCH + Duration::from_micros(1_764_683_526_000_456);
        assert_eq!(rfc3339(t).as_deref(), Some("2025-12-02T13:52:06.000456Z"));
        assert_eq!(rfc3339(UNIX_EPOCH - Duration::from_secs(1)), None);
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(253_402_300_800)),
            None
        );
    }

    #[test]
    fn inline_rows_deletes_first() {
        let (info, t) = decoder_fixture();
        let d = Decoder {
            info: &info,
            subject: &t,
            pipeline: "p",
        };
        let mut out = Vec::new();
        let cc = d
            .decode(&row(r#"{"v":1,"inserted":[{"a":1},{"a":2}],"deleted":[{"a":0}],"full_refresh":true}"#), &mut out)
            .unwrap();
        assert!(cc.is_none());
        let keys: Vec<_> = out
            .iter()
            .map(|e| (e.dedup_key.as_str(), e.op, e.payload.get()))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("outbox_orders:9:0", Op::Delete, r#"{"a":0}"#),
                ("outbox_orders:9:1", Op::Insert, r#"{"a":1}"#),
                ("outbox_orders:9:2", Op::Insert, r#"{"a":2}"#),
            ]
        );
        assert!(out.iter().all(|e| e.is_full_refresh && e.headers.is_some()));
        assert_eq!(out[0].subject, "t.orders.delete");
    }

    #[test]
    fn unknown_version_names_pipeline_and_id() {
        let (info, t) = decoder_fixture();
        let d = Decoder {
            info: &info,
            subject: &t,
            pipeline: "p",
        };
        let e = d
            .decode(&row(r#"{"v":2,"inserted":"x"}"#), &mut Vec::new())
            .unwrap_err();
        assert!(
            e.msg.contains("\"p\"") && e.msg.contains("id 9") && e.msg.contains("v=2"),
            "{e}"
        );
        let e = d
            .decode(&row(r#"{"inserted":[]}"#), &mut Vec::new())
            .unwrap_err();
        assert!(e.msg.contains("no version"), "{e}");
    }

    #[test]
    fn claim_check_is_recognised() {
        let (info, t) = decoder_fixture();
        let d = Decoder {
            info: &info,
            subject: &t,
            pipeline: "p",
        };
        let cc = d
            .decode(&row(r#"{"v":1,"claim_check":true,"inserted_count":5,"deleted_count":0,"refresh_id":"r"}"#), &mut Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(
            cc,
            ClaimCheck {
                full_refresh: false,
                refresh_id: Some("r".into())
            }
        );
    }
}
