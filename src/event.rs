//! The forward event envelope, its dedup key, and subject templates.

use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::error::Error;

/// Whether a row was inserted into or deleted from the stream table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A row of `inserted`.
    Insert,
    /// A row of `deleted`.
    Delete,
}

impl Op {
    /// `insert` or `delete`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Delete => "delete",
        }
    }
}

/// One event: one row of one outbox delta, as every sink receives it.
#[derive(Debug, Serialize)]
pub struct Event {
    /// `<outbox table>:<outbox id>:<row index>`, stable across restarts.
    pub dedup_key: String,
    /// The rendered subject/topic template.
    pub subject: String,
    /// insert or delete.
    pub op: Op,
    /// The row, as JSON.
    pub payload: Box<RawValue>,
    /// The delta is a complete snapshot (apply with upsert semantics).
    pub is_full_refresh: bool,
    /// The outbox row's id.
    pub outbox_id: i64,
    /// The refresh that produced the delta, when known.
    pub refresh_id: Option<String>,
    /// The outbox row's `headers`, when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Box<RawValue>>,
    /// The stream table (`{stream_table}` for sinks' own templates); not
    /// part of the envelope.
    #[serde(skip)]
    #[cfg_attr(not(any(feature = "redis", feature = "nats")), allow(dead_code))]
    pub stream_table: Arc<str>,
}

/// What a subject template may refer to, for one outbox row.
pub struct Vars<'a> {
    /// The stream table (the name given to `enable_outbox`).
    pub stream_table: &'a str,
    /// The outbox row id.
    pub outbox_id: i64,
    /// The refresh id, or empty.
    pub refresh_id: &'a str,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    StreamTable,
    Op,
    OutboxId,
    RefreshId,
}

/// A parsed subject template such as `pgtrickle.{stream_table}.{op}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

/// The subject used when a sink config names none.
pub const DEFAULT_SUBJECT: &str = "pgtrickle.{stream_table}.{op}";

impl Template {
    /// Parse a template; unknown `{variables}` are a (permanent) error.
    pub fn parse(s: &str) -> Result<Template, Error> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| Error::permanent(format!("unclosed '{{' in template {s:?}")))?
                + open;
            parts.push(match &rest[open + 1..close] {
                "stream_table" => Part::StreamTable,
                "op" => Part::Op,
                "outbox_id" => Part::OutboxId,
                "refresh_id" => Part::RefreshId,
                other => {
                    return Err(Error::permanent(format!(
                        "unknown variable {{{other}}} in template {s:?} \
                         (known: {{stream_table}}, {{op}}, {{outbox_id}}, {{refresh_id}})"
                    )))
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// Render for one event.
    pub fn render(&self, v: &Vars, op: Op) -> String {
        let mut out = String::with_capacity(48);
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::StreamTable => out.push_str(v.stream_table),
                Part::Op => out.push_str(op.as_str()),
                Part::OutboxId => {
                    use std::fmt::Write;
                    let _ = write!(out, "{}", v.outbox_id);
                }
                Part::RefreshId => out.push_str(v.refresh_id),
            }
        }
        out
    }
}

/// The dedup key of row `index` of outbox row `outbox_id`.
pub fn dedup_key(outbox_table: &str, outbox_id: i64, index: i64) -> String {
    format!("{outbox_table}:{outbox_id}:{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_variable() {
        let t = Template::parse("a.{stream_table}.{op}.{outbox_id}.{refresh_id}").unwrap();
        let v = Vars {
            stream_table: "orders",
            outbox_id: 7,
            refresh_id: "r1",
        };
        assert_eq!(t.render(&v, Op::Delete), "a.orders.delete.7.r1");
    }

    #[test]
    fn rejects_unknown_variables_and_unclosed_braces() {
        assert!(Template::parse("x.{table}")
            .unwrap_err()
            .msg
            .contains("{table}"));
        assert!(Template::parse("x.{op")
            .unwrap_err()
            .msg
            .contains("unclosed"));
    }

    #[test]
    fn envelope_serializes_payload_raw() {
        let e = Event {
            dedup_key: dedup_key("outbox_orders", 3, 0),
            subject: "s".into(),
            op: Op::Insert,
            payload: RawValue::from_string(r#"{"id":1}"#.into()).unwrap(),
            is_full_refresh: false,
            outbox_id: 3,
            refresh_id: None,
            headers: None,
            stream_table: "orders".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"dedup_key":"outbox_orders:3:0","subject":"s","op":"insert","payload":{"id":1},"is_full_refresh":false,"outbox_id":3,"refresh_id":null}"#
        );
    }
}
