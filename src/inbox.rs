//! Writing inboxes: one multi-row `INSERT ... ON CONFLICT (event_id) DO
//! NOTHING` per batch, so the same event twice is one row; a message
//! PostgreSQL refuses for good is found by halving the batch and written
//! as a dead letter.

use postgres::types::ToSql;
use postgres::{Client, Statement, Transaction};

use crate::outbox::quote_ident;
use crate::retry::Error;
use crate::source::Message;

/// A prepared writer for one inbox table.
pub struct Inbox {
    /// `schema.table`, for messages.
    pub name: String,
    insert: Statement,
}

impl Inbox {
    /// Find the inbox (schema from the config, else `pgt_inbox_config`,
    /// else `pgtrickle`) and prepare the insert.
    pub fn open(client: &mut Client, inbox: &str, schema: Option<&str>) -> Result<Inbox, Error> {
        // A database without the kit's catalog (a remote inbox of the
        // pg-inbox sink may be a plain table) has no config to read.
        let has_catalog: bool = client
            .query_one(
                "SELECT to_regclass('pgtrickle.pgt_inbox_config') IS NOT NULL",
                &[],
            )?
            .get(0);
        let cfg = match has_catalog {
            true => client.query_opt(
                "SELECT inbox_schema, max_retries, error_column, retry_count_column \
                 FROM pgtrickle.pgt_inbox_config WHERE inbox_name = $1",
                &[&inbox],
            )?,
            false => None,
        };
        let schema = match (schema, &cfg) {
            (Some(s), _) => s.to_string(),
            (None, Some(r)) => r.get(0),
            (None, None) => "pgtrickle".to_string(),
        };
        // Dead letters (a message whose body is not JSON) are written with
        // retry_count = max_retries, so they show in <inbox>_dlq; an adopted
        // table without those columns gets them as plain rows.
        let (max_retries, error_col, retry_col): (i32, Option<String>, Option<String>) = match &cfg
        {
            Some(r) => (r.get(1), r.get(2), r.get(3)),
            None => {
                let mut has = |col: &str| -> Result<bool, Error> {
                    Ok(client
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute \
                             WHERE attrelid = to_regclass(format('%I.%I', $1::text, $2::text)) \
                               AND attname = $3 AND attnum > 0 AND NOT attisdropped)",
                            &[&schema, &inbox, &col],
                        )?
                        .get(0))
                };
                let error = has("error")?.then(|| "error".to_string());
                let retry = has("retry_count")?.then(|| "retry_count".to_string());
                (3, error, retry)
            }
        };
        let mut cols = String::new();
        let mut vals = String::new();
        if let Some(c) = &error_col {
            cols.push_str(&format!(", {}", quote_ident(c)));
            vals.push_str(", err");
        }
        if let Some(c) = &retry_col {
            cols.push_str(&format!(", {}", quote_ident(c)));
            vals.push_str(&format!(
                ", CASE WHEN err IS NULL THEN 0 ELSE {max_retries} END"
            ));
        }
        let name = format!("{}.{}", quote_ident(&schema), quote_ident(inbox));
        let insert = client
            .prepare(&format!(
                "INSERT INTO {name} (event_id, event_type, source, aggregate_id, payload, trace_id{cols}) \
                 SELECT id, et, src, agg, \
                   CASE WHEN err IS NULL THEN p::jsonb ELSE jsonb_build_object('raw', p) END, tr{vals} \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[]) \
                   AS m(id, et, src, agg, p, tr, err) \
                 ON CONFLICT (event_id) DO NOTHING"
            ))
            .map_err(|e| {
                Error::from(e).context(format!(
                    "inbox {schema}.{inbox} (create it with pgtrickle.create_inbox('{inbox}'))"
                ))
            })?;
        Ok(Inbox { name, insert })
    }

    /// Write a batch; returns how many rows were new. Normally one
    /// statement (its own transaction, or a savepoint in the caller's; see
    /// [`Target`]). When PostgreSQL refuses it because of
    /// what a row holds (a constraint, a value, an index size limit), the
    /// batch is halved until the refused messages are found; each is
    /// written as a dead letter (the reason in its `error`), the others as
    /// they are. Err: a transient error, or a message
    /// refused even as a dead letter (a problem of the table, not of the
    /// message); part of the batch may be written, and writing it again
    /// adds nothing twice.
    pub fn write(&self, client: &mut impl Target, batch: &[Message]) -> Result<u64, Error> {
        match self.insert(client, batch) {
            Ok(n) => Ok(n),
            Err(e) if !about_the_rows(&e) => Err(e.into()),
            Err(_) if batch.len() > 1 => {
                let (a, b) = batch.split_at(batch.len() / 2);
                Ok(self.write(client, a)? + self.write(client, b)?)
            }
            Err(e) => self.dead_letter(client, &batch[0], e),
        }
    }

    /// Write `m`, which PostgreSQL refused with `refusal`, as a dead letter;
    /// without its attributes if it is refused with them too.
    fn dead_letter(
        &self,
        client: &mut impl Target,
        m: &Message,
        refusal: postgres::Error,
    ) -> Result<u64, Error> {
        let refusal = Error::from(refusal);
        let mut dl = m.clone();
        dl.dead_letter(format!("the inbox refused it: {}", refusal.msg));
        let mut last = match self.insert(client, std::slice::from_ref(&dl)) {
            Ok(n) => {
                log::warn!(
                    "message {:?}: {}; into the inbox's dead letters",
                    m.event_id,
                    refusal.msg
                );
                return Ok(n);
            }
            Err(e) => e,
        };
        if about_the_rows(&last) {
            let mut bare = dl.clone();
            bare.event_type = None;
            bare.source = None;
            bare.aggregate_id = None;
            bare.trace_id = None;
            bare.dead_letter(
                "written without event_type, source, aggregate_id and trace_id, \
                              which the inbox refused too"
                    .into(),
            );
            match self.insert(client, std::slice::from_ref(&bare)) {
                Ok(n) => {
                    log::warn!(
                        "message {:?}: {}; into the inbox's dead letters without its attributes",
                        m.event_id,
                        refusal.msg
                    );
                    return Ok(n);
                }
                Err(e) => last = e,
            }
        }
        let last = Error::from(last);
        Err(Error::new(
            last.class,
            format!(
                "message {:?}: {}; refused as a dead letter too: {}",
                m.event_id, refusal.msg, last.msg
            ),
        ))
    }

    /// One multi-row insert of `batch`, each message as it is (no dead
    /// letters, no halving): the rows it wrote, or PostgreSQL's refusal.
    pub fn insert(
        &self,
        client: &mut impl Target,
        batch: &[Message],
    ) -> Result<u64, postgres::Error> {
        let col = |f: fn(&Message) -> Option<&str>| -> Vec<Option<&str>> {
            batch.iter().map(f).collect()
        };
        let ids = col(|m| Some(&m.event_id));
        let types = col(|m| m.event_type.as_deref());
        let sources = col(|m| m.source.as_deref());
        let aggs = col(|m| m.aggregate_id.as_deref());
        let payloads = col(|m| Some(&m.payload));
        let traces = col(|m| m.trace_id.as_deref());
        let errors = col(|m| m.error.as_deref());
        client.insert(
            &self.insert,
            &[&ids, &types, &sources, &aggs, &payloads, &traces, &errors],
        )
    }
}

/// Where a batch is written: a session, each insert its own transaction,
/// or an open transaction (the source records its position in it too),
/// each insert under a savepoint, so a refused one leaves it usable.
pub trait Target {
    /// Run one insert; the number of rows it wrote.
    fn insert(
        &mut self,
        stmt: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error>;
}

impl Target for Client {
    fn insert(
        &mut self,
        stmt: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        self.execute(stmt, params)
    }
}

impl Target for Transaction<'_> {
    fn insert(
        &mut self,
        stmt: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let mut savepoint = self.transaction()?;
        let n = savepoint.execute(stmt, params)?;
        savepoint.commit()?;
        Ok(n)
    }
}

/// Whether an insert was refused for good because of what a row holds,
/// rather than for a reason of the session, the server or the table as a
/// whole: SQLSTATE classes 21 (cardinality), 22 (data exception), 23
/// (integrity constraint), 54 (program limit, e.g. an index row too
/// large), and errors raised by triggers (P0, 38, 39, 2F).
fn about_the_rows(e: &postgres::Error) -> bool {
    !e.is_closed()
        && e.code().is_some_and(|c| {
            ["21", "22", "23", "54", "P0", "38", "39", "2F"]
                .iter()
                .any(|class| c.code().starts_with(class))
        })
}
