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
    /// The outbox row's `created_at`, RFC 3339 in UTC (the CloudEvents
    /// `time`), when read; not part of the envelope.
    #[serde(skip)]
    #[cfg_attr(
        not(any(
            feature = "kafka",
            feature = "http",
            feature = "nats",
            feature = "rabbitmq"
        )),
        allow(dead_code)
    )]
    pub created_at: Option<Arc<str>>,
}

/// What a subject template may refer to, for one outbox row.
pub struct Vars<'a> {
    /// The stream table (the name given to `enable_outbox`).
    pub stream_table: &'a str,
    /// The outbox row id.
    pub outbox_id: i64,
    /// The refresh id, or empty.
    pub refresh_id: &'a str,
    /// The event's row (`{payload.<field>}`), when there is one.
    pub payload: Option<&'a RawValue>,
    /// The outbox row's headers (`{headers.<name>}`), when present.
    pub headers: Option<&'a RawValue>,
}

impl<'a> Vars<'a> {
    /// The variables of one event.
    pub fn of(e: &'a Event) -> Vars<'a> {
        Vars {
            stream_table: &e.stream_table,
            outbox_id: e.outbox_id,
            refresh_id: e.refresh_id.as_deref().unwrap_or(""),
            payload: Some(&e.payload),
            headers: e.headers.as_deref(),
        }
    }

    /// Variables without an event's row or headers (fields render as their
    /// default, or as nothing).
    pub fn bare(stream_table: &'a str, outbox_id: i64, refresh_id: &'a str) -> Vars<'a> {
        Vars {
            stream_table,
            outbox_id,
            refresh_id,
            payload: None,
            headers: None,
        }
    }
}

/// Which JSON object of the event a `{payload.…}`/`{headers.…}` field reads.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Object {
    Payload,
    Headers,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    StreamTable,
    Op,
    OutboxId,
    RefreshId,
    /// `{payload.a.b|default}`: a field of the row or of the headers.
    Field {
        object: Object,
        path: Vec<String>,
        default: Option<String>,
    },
}

/// A parsed subject template such as `pgtrickle.{stream_table}.{op}`, or
/// one routing by content such as `orders.{payload.tenant|shared}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    text: String,
    parts: Vec<Part>,
    /// Whether a part reads the event's row or headers (asked per event).
    fields: bool,
}

/// The subject used when a sink config names none.
pub const DEFAULT_SUBJECT: &str = "pgtrickle.{stream_table}.{op}";

/// The value of a field as routing text: strings as they are, numbers and
/// booleans as JSON prints them; null, objects, arrays and absent fields
/// are none.
fn field_text(v: &serde_json::Value, path: &[String]) -> Option<String> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    match cur {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

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
            let inner = &rest[open + 1..close];
            let (name, default) = match inner.split_once('|') {
                Some((n, d)) => (n, Some(d.to_string())),
                None => (inner, None),
            };
            let field = |object, path: &str| -> Result<Part, Error> {
                let path: Vec<String> = path.split('.').map(str::to_string).collect();
                if path.iter().any(String::is_empty) {
                    return Err(Error::permanent(format!(
                        "empty field name in {{{inner}}} of template {s:?}"
                    )));
                }
                Ok(Part::Field {
                    object,
                    path,
                    default: default.clone(),
                })
            };
            parts.push(match name {
                "stream_table" | "op" | "outbox_id" | "refresh_id" if default.is_some() => {
                    return Err(Error::permanent(format!(
                        "{{{name}}} always has a value: a default ({inner:?}) is only for \
                         {{payload.<field>}} and {{headers.<name>}} in template {s:?}"
                    )))
                }
                "stream_table" => Part::StreamTable,
                "op" => Part::Op,
                "outbox_id" => Part::OutboxId,
                "refresh_id" => Part::RefreshId,
                other => match (
                    other.strip_prefix("payload."),
                    other.strip_prefix("headers."),
                ) {
                    (Some(path), _) => field(Object::Payload, path)?,
                    (_, Some(path)) => field(Object::Headers, path)?,
                    _ => {
                        return Err(Error::permanent(format!(
                            "unknown variable {{{other}}} in template {s:?} \
                             (known: {{stream_table}}, {{op}}, {{outbox_id}}, {{refresh_id}}, \
                             {{payload.<field>}}, {{headers.<name>}}, each field with an \
                             optional |default)"
                        )))
                    }
                },
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        let fields = parts.iter().any(|p| matches!(p, Part::Field { .. }));
        Ok(Template {
            text: s.to_string(),
            parts,
            fields,
        })
    }

    /// Whether the template reads the event's row or headers.
    pub fn has_fields(&self) -> bool {
        self.fields
    }

    /// The row and headers of `v`, parsed, when the template needs them.
    fn objects(&self, v: &Vars) -> [Option<serde_json::Value>; 2] {
        let parse = |o: Object, raw: Option<&RawValue>| {
            let used = self
                .parts
                .iter()
                .any(|p| matches!(p, Part::Field { object, .. } if *object == o));
            raw.filter(|_| used)
                .and_then(|r| serde_json::from_str(r.get()).ok())
        };
        [
            parse(Object::Payload, v.payload),
            parse(Object::Headers, v.headers),
        ]
    }

    /// Why this template cannot route the event of `v`: the first field it
    /// names that the event lacks, with no default. `None` when it can.
    pub fn missing(&self, v: &Vars) -> Option<String> {
        if !self.has_fields() {
            return None;
        }
        let objects = self.objects(v);
        self.parts.iter().find_map(|p| match p {
            Part::Field {
                object,
                path,
                default: None,
            } => {
                let o = objects[*object as usize].as_ref();
                if o.and_then(|o| field_text(o, path)).is_some() {
                    return None;
                }
                let what = match object {
                    Object::Payload => "payload",
                    Object::Headers => "headers",
                };
                Some(format!(
                    "template {:?}: the event has no {what}.{} (a string, number or boolean) \
                     and the template gives no default ({{{what}.{}|default}})",
                    self.text,
                    path.join("."),
                    path.join(".")
                ))
            }
            _ => None,
        })
    }

    /// Render for one event; a field the event lacks renders as its
    /// default, or as nothing (check [`Template::missing`] first).
    pub fn render(&self, v: &Vars, op: Op) -> String {
        let objects = if self.has_fields() {
            self.objects(v)
        } else {
            [None, None]
        };
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
                Part::Field {
                    object,
                    path,
                    default,
                } => {
                    let value = objects[*object as usize]
                        .as_ref()
                        .and_then(|o| field_text(o, path));
                    match (value, default) {
                        (Some(x), _) => out.push_str(&x),
                        (None, Some(d)) => out.push_str(d),
                        (None, None) => {}
                    }
                }
            }
        }
        out
    }

    /// A sample rendering for checking what a template can produce (a
    /// Kafka topic name, say): fields render as their default, else `x`.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub fn sample(&self, v: &Vars, op: Op) -> String {
        let filled = Template {
            text: self.text.clone(),
            fields: false,
            parts: self
                .parts
                .iter()
                .map(|p| match p {
                    Part::Field { default, .. } => {
                        Part::Text(default.clone().unwrap_or_else(|| "x".into()))
                    }
                    other => other.clone(),
                })
                .collect(),
        };
        filled.render(v, op)
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
        let v = Vars::bare("orders", 7, "r1");
        assert_eq!(t.render(&v, Op::Delete), "a.orders.delete.7.r1");
        assert_eq!(t.missing(&v), None);
    }

    #[test]
    fn routes_by_payload_and_header_fields_with_defaults() {
        let t =
            Template::parse("t.{payload.tenant}.{payload.addr.city|nowhere}.{headers.region|eu}")
                .unwrap();
        assert!(t.has_fields());
        let payload = RawValue::from_string(
            r#"{"tenant":"acme","addr":{"city":"Oslo"},"n":7,"flag":true,"o":{}}"#.into(),
        )
        .unwrap();
        let headers = RawValue::from_string(r#"{"region":"us"}"#.into()).unwrap();
        let mut v = Vars::bare("orders", 1, "");
        v.payload = Some(&payload);
        assert_eq!(t.render(&v, Op::Insert), "t.acme.Oslo.eu");
        assert_eq!(t.missing(&v), None);
        v.headers = Some(&headers);
        assert_eq!(t.render(&v, Op::Insert), "t.acme.Oslo.us");
        let t2 = Template::parse("{payload.n}-{payload.flag}").unwrap();
        assert_eq!(t2.render(&v, Op::Insert), "7-true");
        // Missing, null, objects: the default, else a reason naming the
        // template and the field.
        for f in [
            "payload.missing",
            "payload.o",
            "payload.addr.zip",
            "headers.nope",
        ] {
            let t = Template::parse(&format!("x.{{{f}}}")).unwrap();
            let why = t.missing(&v).expect(f);
            assert!(
                why.contains(f) && why.contains(&format!("\"x.{{{f}}}\"")),
                "{why}"
            );
            assert_eq!(t.render(&v, Op::Insert), "x.");
            assert_eq!(t.sample(&v, Op::Insert), "x.x");
            let with_default = Template::parse(&format!("x.{{{f}|d}}")).unwrap();
            assert_eq!(with_default.missing(&v), None);
            assert_eq!(with_default.render(&v, Op::Insert), "x.d");
        }
        // No row at all (a bare rendering).
        assert!(t.missing(&Vars::bare("orders", 1, "")).is_some());
    }

    #[test]
    fn rejects_bad_fields() {
        for bad in [
            "x.{payload.}",
            "x.{payload..a}",
            "x.{headers}",
            "x.{op|d}",
            "x.{body.a}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
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
            created_at: None,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"dedup_key":"outbox_orders:3:0","subject":"s","op":"insert","payload":{"id":1},"is_full_refresh":false,"outbox_id":3,"refresh_id":null}"#
        );
    }
}
