//! CloudEvents 1.0 for sinks: the `format: "cloudevents"` keys and the
//! event's attributes, written as a structured event (the JSON event
//! format) or as binary-mode headers, for every sink alike. Sources
//! recognise CloudEvents in `source::decode`.
//!
//! Attributes of an outbox event:
//! - `specversion` `1.0`; `id` the dedup key (`<outbox>:<outbox id>:<row>`);
//! - `source` the `cloudevents_source` template, by default
//!   `/pgtrickle/<outbox table>`;
//! - `type` the `cloudevents_type` template, by default
//!   `{stream_table}.{op}`; `subject` the `cloudevents_subject` template,
//!   when set;
//! - `time` the outbox row's `created_at` (RFC 3339, UTC);
//! - `datacontenttype` `application/json`, the data being the row;
//! - `partitionkey` (Partitioning extension) the sink's rendered `key`,
//!   where the sink has a `key` template and the config sets it;
//! - `traceparent`, `tracestate` (Distributed Tracing extension) when the
//!   outbox row's headers carry them.

// Used by the sinks that have a CloudEvents format; a build without all
// of them leaves some unused.
#![cfg_attr(
    not(all(
        feature = "kafka",
        feature = "http",
        feature = "nats",
        feature = "rabbitmq"
    )),
    allow(dead_code)
)]

use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::event::{Event, Template, Vars};
use crate::keys::{ConfigError, Fallback, KeySpec};

/// The version of the specification the events follow.
pub const SPECVERSION: &str = "1.0";
/// The content type of a structured event (the JSON event format).
pub const STRUCTURED: &str = "application/cloudevents+json; charset=UTF-8";
/// The content type of a batch of structured events (a JSON array).
pub const BATCH: &str = "application/cloudevents-batch+json; charset=UTF-8";
/// The `datacontenttype` of every event: the row is JSON.
pub const DATA_CONTENT_TYPE: &str = "application/json";
/// The `type` when the config names none.
pub const DEFAULT_TYPE: &str = "{stream_table}.{op}";

/// The keys of every sink with a CloudEvents format (README.md and the man
/// page show them once, beside the CloudEvents description).
pub const KEYS: &[KeySpec] = &[
    KeySpec::new(
        "format",
        "string",
        Fallback::Value("native"),
        "`native` (the sink's own format, described with each sink) or `cloudevents`",
    ),
    KeySpec::new(
        "cloudevents_mode",
        "string",
        Fallback::Value("structured"),
        "`structured` (the body is the event in the JSON event format, `data` being the row) or `binary` (the body is the row, the attributes are headers; not on `sqs`, `redis` or a batching `http` sink). Needs `format: \"cloudevents\"`",
    ),
    KeySpec::new(
        "cloudevents_type",
        "template",
        Fallback::Value(DEFAULT_TYPE),
        "the `type` attribute, a template like `subject`",
    ),
    KeySpec::new(
        "cloudevents_source",
        "template",
        Fallback::Text("`/pgtrickle/<outbox table>`"),
        "the `source` attribute (a URI-reference), a template like `subject`",
    ),
    KeySpec::new(
        "cloudevents_subject",
        "template",
        Fallback::Text("no `subject` attribute"),
        "the `subject` attribute, a template like `subject`",
    ),
];

/// How the event travels: all in the body, or attributes as headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The body is the event in the JSON event format.
    Structured,
    /// The body is the data (the row); attributes are headers.
    Binary,
}

/// A sink's CloudEvents settings (`format: "cloudevents"`).
#[derive(Debug, Clone)]
pub struct CloudEvents {
    /// Structured or binary.
    pub mode: Mode,
    /// `source`; none: `/pgtrickle/<outbox table>`.
    source: Option<Template>,
    /// `type`.
    kind: Template,
    /// `subject`, when set.
    subject: Option<Template>,
}

impl CloudEvents {
    /// Take the CloudEvents keys out of a sink's keys (so that the sink
    /// parses the rest as before): `format` (`"native"`, the default, or
    /// `"cloudevents"`), `cloudevents_mode` (`"structured"`, the default,
    /// or `"binary"`), and the templates `cloudevents_source`,
    /// `cloudevents_type` and `cloudevents_subject`. `binary` says whether
    /// the sink has headers for binary mode. `None` for the native format;
    /// a `cloudevents_*` key without `format: "cloudevents"` is an error.
    pub fn take(
        keys: &mut Map<String, Value>,
        binary: bool,
    ) -> Result<Option<CloudEvents>, ConfigError> {
        let text = |keys: &mut Map<String, Value>, k: &str| match keys.remove(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(ConfigError::new(
                format!("sink.{k}"),
                format!("expected a string, found {other}"),
            )),
        };
        let format = text(keys, "format")?;
        let mode = text(keys, "cloudevents_mode")?;
        let source = text(keys, "cloudevents_source")?;
        let kind = text(keys, "cloudevents_type")?;
        let subject = text(keys, "cloudevents_subject")?;
        match format.as_deref() {
            Some("cloudevents") => {}
            None | Some("native") => {
                let set = [
                    ("cloudevents_mode", mode.is_some()),
                    ("cloudevents_source", source.is_some()),
                    ("cloudevents_type", kind.is_some()),
                    ("cloudevents_subject", subject.is_some()),
                ];
                if let Some((k, _)) = set.iter().find(|(_, set)| *set) {
                    return Err(ConfigError::new(
                        format!("sink.{k}"),
                        "only applies with sink.format \"cloudevents\"",
                    ));
                }
                return Ok(None);
            }
            Some(other) => {
                return Err(ConfigError::new(
                    "sink.format",
                    format!("unknown format {other:?} (known: \"native\", \"cloudevents\")"),
                ))
            }
        }
        let mode = match mode.as_deref() {
            None | Some("structured") => Mode::Structured,
            Some("binary") if binary => Mode::Binary,
            Some("binary") => {
                return Err(ConfigError::new(
                    "sink.cloudevents_mode",
                    "this sink has no headers for binary mode: use \"structured\"",
                ))
            }
            Some(other) => {
                return Err(ConfigError::new(
                    "sink.cloudevents_mode",
                    format!("unknown mode {other:?} (known: \"structured\", \"binary\")"),
                ))
            }
        };
        let template = |k: &str, t: &str| {
            Template::parse(t).map_err(|e| ConfigError::new(format!("sink.{k}"), e.msg))
        };
        let nonempty = |k: &str, t: Option<String>| match t {
            Some(t) if t.is_empty() => Err(ConfigError::new(
                format!("sink.{k}"),
                "must not be empty (a CloudEvents attribute is never empty)",
            )),
            Some(t) => template(k, &t).map(Some),
            None => Ok(None),
        };
        Ok(Some(CloudEvents {
            mode,
            source: nonempty("cloudevents_source", source)?,
            kind: nonempty("cloudevents_type", kind)?
                .map_or_else(|| template("cloudevents_type", DEFAULT_TYPE), Ok)?,
            subject: nonempty("cloudevents_subject", subject)?,
        }))
    }

    /// Why the templates cannot render `e` (a field it lacks, with no
    /// default): the event is a dead letter, as for a sink's own templates.
    pub fn missing(&self, e: &Event) -> Option<String> {
        let vars = Vars::of(e);
        [
            Some(&self.kind),
            self.source.as_ref(),
            self.subject.as_ref(),
        ]
        .into_iter()
        .flatten()
        .find_map(|t| t.missing(&vars))
    }

    /// The attributes of `e` but `data` and `datacontenttype`, in the
    /// specification's order; `partitionkey` is the sink's rendered key.
    pub fn attributes(&self, e: &Event, partitionkey: Option<&str>) -> Vec<(&'static str, String)> {
        let vars = Vars::of(e);
        let mut out = Vec::with_capacity(9);
        out.push(("specversion", SPECVERSION.to_string()));
        out.push(("id", e.dedup_key.clone()));
        out.push((
            "source",
            match &self.source {
                Some(t) => t.render(&vars, e.op),
                None => default_source(&e.dedup_key),
            },
        ));
        out.push(("type", self.kind.render(&vars, e.op)));
        if let Some(t) = &self.subject {
            out.push(("subject", t.render(&vars, e.op)));
        }
        if let Some(t) = &e.created_at {
            out.push(("time", t.to_string()));
        }
        if let Some(k) = partitionkey {
            out.push(("partitionkey", k.to_string()));
        }
        if let Some(h) = e
            .headers
            .as_deref()
            .and_then(|h| serde_json::from_str::<Map<String, Value>>(h.get()).ok())
        {
            for name in ["traceparent", "tracestate"] {
                if let Some(Value::String(v)) = h.get(name) {
                    if !v.is_empty() {
                        out.push((name, v.clone()));
                    }
                }
            }
        }
        out
    }

    /// Append `e` as a structured event (the JSON event format, `data`
    /// being the row) to `out`.
    pub fn structured(&self, e: &Event, partitionkey: Option<&str>, out: &mut Vec<u8>) {
        out.push(b'{');
        for (name, value) in self.attributes(e, partitionkey) {
            push_member(out, name, &value);
        }
        push_member(out, "datacontenttype", DATA_CONTENT_TYPE);
        out.extend_from_slice(b"\"data\":");
        out.extend_from_slice(e.payload.get().as_bytes());
        out.push(b'}');
    }

    /// The binary-mode headers of `e`: every attribute of
    /// [`CloudEvents::attributes`] under `prefix` (`ce-` for HTTP and
    /// NATS, `ce_` for Kafka, `cloudEvents:` for AMQP). `datacontenttype`
    /// is not among them: the protocol's own content type carries it.
    /// With `percent`, values are percent-encoded as the HTTP binding
    /// asks (space, `"`, `%` and bytes outside printable ASCII).
    pub fn headers(
        &self,
        e: &Event,
        partitionkey: Option<&str>,
        prefix: &str,
        percent: bool,
    ) -> Vec<(String, String)> {
        self.attributes(e, partitionkey)
            .into_iter()
            .map(|(n, v)| {
                let v = if percent { percent_encode(&v) } else { v };
                (format!("{prefix}{n}"), v)
            })
            .collect()
    }
}

/// `"name":"value",` with `value` escaped as JSON.
fn push_member(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    serde_json::to_writer(&mut *out, value).expect("a string serializes");
    out.push(b',');
}

/// `/pgtrickle/<outbox table>`, the outbox being the dedup key's first
/// part (`<outbox table>:<outbox id>:<row index>`), with characters a URI
/// path cannot hold percent-encoded.
fn default_source(dedup_key: &str) -> String {
    let outbox = dedup_key.rsplitn(3, ':').last().unwrap_or(dedup_key);
    let mut out = String::from("/pgtrickle/");
    for b in outbox.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A header value encoded as the CloudEvents HTTP binding says: space,
/// `"`, `%` and every byte outside printable ASCII as `%XX`.
pub fn percent_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_graphic() && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Op;
    use serde_json::json;
    use serde_json::value::RawValue;

    fn event(headers: Option<&str>) -> Event {
        Event {
            dedup_key: "outbox_orders:7:1".into(),
            subject: "s".into(),
            op: Op::Delete,
            payload: RawValue::from_string(r#"{"id":1,"tenant":"acme"}"#.into()).unwrap(),
            is_full_refresh: false,
            outbox_id: 7,
            refresh_id: None,
            headers: headers.map(|h| RawValue::from_string(h.into()).unwrap()),
            stream_table: "orders".into(),
            created_at: Some("2026-12-02T13:52:06.123456Z".into()),
        }
    }

    fn take(v: Value) -> Result<Option<CloudEvents>, ConfigError> {
        let Value::Object(mut m) = v else { panic!() };
        let r = CloudEvents::take(&mut m, true);
        if r.is_ok() {
            assert!(m
                .keys()
                .all(|k| k != "format" && !k.starts_with("cloudevents_")));
        }
        r
    }

    #[test]
    fn structured_event_has_every_attribute_and_the_row_as_data() {
        let ce = take(json!({"format": "cloudevents"})).unwrap().unwrap();
        assert_eq!(ce.mode, Mode::Structured);
        let e = event(Some(
            r#"{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","tracestate":"a=1","x":2}"#,
        ));
        let mut out = Vec::new();
        ce.structured(&e, Some("acme"), &mut out);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({
                "specversion": "1.0",
                "id": "outbox_orders:7:1",
                "source": "/pgtrickle/outbox_orders",
                "type": "orders.delete",
                "time": "2026-12-02T13:52:06.123456Z",
                "partitionkey": "acme",
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "tracestate": "a=1",
                "datacontenttype": "application/json",
                "data": {"id": 1, "tenant": "acme"}
            })
        );
        // No time, key or trace context: those attributes are left out.
        let mut bare = event(None);
        bare.created_at = None;
        out.clear();
        ce.structured(&bare, None, &mut out);
        let v: Value = serde_json::from_slice(&out).unwrap();
        let names: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            names,
            [
                "data",
                "datacontenttype",
                "id",
                "source",
                "specversion",
                "type"
            ]
        );
    }

    #[test]
    fn templates_render_source_type_and_subject() {
        let ce = take(json!({
            "format": "cloudevents", "cloudevents_mode": "binary",
            "cloudevents_source": "//shop/{stream_table}", "cloudevents_type": "com.shop.{op}",
            "cloudevents_subject": "{payload.tenant}/{payload.id}"
        }))
        .unwrap()
        .unwrap();
        assert_eq!(ce.mode, Mode::Binary);
        let e = event(None);
        let h = ce.headers(&e, None, "ce_", false);
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("ce_specversion"), Some("1.0"));
        assert_eq!(get("ce_id"), Some("outbox_orders:7:1"));
        assert_eq!(get("ce_source"), Some("//shop/orders"));
        assert_eq!(get("ce_type"), Some("com.shop.delete"));
        assert_eq!(get("ce_subject"), Some("acme/1"));
        assert_eq!(get("ce_datacontenttype"), None);
        assert_eq!(ce.missing(&e), None);
        let strict = take(json!({"format": "cloudevents", "cloudevents_type": "{payload.kind}"}))
            .unwrap()
            .unwrap();
        assert!(strict.missing(&e).unwrap().contains("payload.kind"));
    }

    #[test]
    fn header_values_are_percent_encoded_when_asked() {
        assert_eq!(percent_encode("a b\"%é:/"), "a%20b%22%25%C3%A9:/");
        assert_eq!(default_source("my outbox:1:0"), "/pgtrickle/my%20outbox");
    }

    #[test]
    fn bad_keys_name_the_key() {
        let err = |v: Value| take(v).unwrap_err().key;
        assert!(take(json!({"format": "native"})).unwrap().is_none());
        assert!(take(json!({})).unwrap().is_none());
        assert_eq!(err(json!({"format": "cloudevent"})), "sink.format");
        assert_eq!(err(json!({"format": 1})), "sink.format");
        assert_eq!(
            err(json!({"format": "cloudevents", "cloudevents_mode": "binery"})),
            "sink.cloudevents_mode"
        );
        assert_eq!(
            err(json!({"cloudevents_type": "x"})),
            "sink.cloudevents_type"
        );
        assert_eq!(
            err(json!({"format": "cloudevents", "cloudevents_type": "{nope}"})),
            "sink.cloudevents_type"
        );
        assert_eq!(
            err(json!({"format": "cloudevents", "cloudevents_source": ""})),
            "sink.cloudevents_source"
        );
        let Value::Object(mut m) = json!({"format": "cloudevents", "cloudevents_mode": "binary"})
        else {
            panic!()
        };
        let e = CloudEvents::take(&mut m, false).unwrap_err();
        assert_eq!(e.key, "sink.cloudevents_mode");
        assert!(e.msg.contains("structured"), "{}", e.msg);
    }
}
