//! Writing inboxes: one multi-row `INSERT ... ON CONFLICT (event_id) DO
//! NOTHING` per batch, so the same event twice is one row.

use postgres::{Client, Statement};

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
        let cfg = client.query_opt(
            "SELECT inbox_schema, max_retries, error_column, retry_count_column \
             FROM pgtrickle.pgt_inbox_config WHERE inbox_name = $1",
            &[&inbox],
        )?;
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
            None => (3, Some("error".into()), Some("retry_count".into())),
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

    /// Insert a batch in one transaction; returns how many rows were new.
    pub fn write(&self, client: &mut Client, batch: &[Message]) -> Result<u64, Error> {
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
        Ok(client.execute(
            &self.insert,
            &[&ids, &types, &sources, &aggs, &payloads, &traces, &errors],
        )?)
    }
}
