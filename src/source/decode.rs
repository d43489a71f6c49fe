//! What every source does with what it received: a JSON field as text, a
//! body as a payload (or the reason it is a dead letter), and where a
//! message attribute comes from ([`Origin`], [`Origins`]).

// Each item serves some of the broker sources; a build without all of
// them leaves some unused.
#![cfg_attr(
    not(all(
        feature = "http",
        feature = "redis",
        feature = "nats",
        feature = "kafka",
        feature = "rabbitmq",
        feature = "sqs"
    )),
    allow(dead_code)
)]

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::source::Message;

/// Where a message attribute (`event_type`, `aggregate_id`, `source`,
/// `trace_id`) comes from: `{"header": "X-Type"}`, `{"field": "type"}` or
/// a fixed string. What a header or a field is depends on the source.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Origin {
    /// A header of the message (for the `redis` source: a field of the entry).
    Header {
        /// Its name.
        header: String,
    },
    /// A field of the message.
    Field {
        /// Its name.
        field: String,
    },
    /// A fixed value.
    Fixed(String),
}

/// The message attributes whose origin a source's config may set, in the
/// order of its key table (and of [`Origins::read`]).
pub const ATTRIBUTES: [&str; 4] = ["event_type", "aggregate_id", "source", "trace_id"];

/// Where a source's message attributes come from: its `event_type`,
/// `aggregate_id`, `source` and `trace_id` keys (`None`: the source's
/// default).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Origins {
    /// `event_type`.
    pub event_type: Option<Origin>,
    /// `aggregate_id`.
    pub aggregate_id: Option<Origin>,
    /// `source`.
    pub source: Option<Origin>,
    /// `trace_id`.
    pub trace_id: Option<Origin>,
}

impl Origin {
    /// The key-table row of attribute `name` (one of [`ATTRIBUTES`]):
    /// `default` says where it comes from when not set, `doc` what it holds.
    pub const fn key(name: &'static str, default: &'static str, doc: &'static str) -> KeySpec {
        KeySpec::new(name, "origin", Fallback::Text(default), doc)
    }
}

impl Origins {
    /// Take the four keys out of a source's `keys` (the rest is parsed
    /// without them), each parsed as the error's key `<what>.<name>`.
    /// (Not a `#[serde(flatten)]` field: flattening loses the key's path.)
    pub fn take(keys: &mut Map<String, Value>, what: &str) -> Result<Origins, ConfigError> {
        let mut take = |name: &str| match keys.remove(name) {
            None => Ok(None),
            Some(v) => from_value::<Option<Origin>>(&format!("{what}.{name}"), v),
        };
        Ok(Origins {
            event_type: take("event_type")?,
            aggregate_id: take("aggregate_id")?,
            source: take("source")?,
            trace_id: take("trace_id")?,
        })
    }

    /// A message's attributes, in the order of [`ATTRIBUTES`]: each from
    /// the origin the config sets (read by `value`), else from the
    /// source's `default` (given the attribute's name); for `trace_id`
    /// without an origin, a valid W3C traceparent (`traceparent`, see
    /// [`crate::trace`]) comes before the default.
    pub fn read(
        &self,
        value: impl Fn(&Origin) -> Option<String>,
        traceparent: impl FnOnce() -> Option<String>,
        default: impl Fn(&str) -> Option<String>,
    ) -> [Option<String>; 4] {
        let read = |origin: &Option<Origin>, name: &str| match origin {
            Some(o) => value(o),
            None => default(name),
        };
        [
            read(&self.event_type, "event_type"),
            read(&self.aggregate_id, "aggregate_id"),
            read(&self.source, "source"),
            match &self.trace_id {
                Some(o) => value(o),
                None => traceparent().or_else(|| default("trace_id")),
            },
        ]
    }

    /// Which of `event_type`, `source` and `trace_id` the config sets, as
    /// [`CloudEvent::apply`] takes it: those given an origin, but for the
    /// attributes in `plain` (where the source reads the body field of the
    /// attribute's own name by default) not one that names that field.
    pub fn configured(&self, plain: &[&str]) -> [bool; 3] {
        [
            ("event_type", &self.event_type),
            ("source", &self.source),
            ("trace_id", &self.trace_id),
        ]
        .map(|(name, origin)| {
            origin
                .as_ref()
                .is_some_and(|o| !plain.contains(&name) || o.is_configured(name))
        })
    }
}

/// A JSON field as text: a string as it is, `null` as nothing, anything
/// else as JSON text.
pub fn json_text(obj: &Map<String, Value>, key: &str) -> Option<String> {
    match obj.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// A received body as the inbox takes it.
#[derive(Debug)]
pub struct Body {
    /// The body as text (invalid UTF-8 replaced): the payload, or for a
    /// dead letter its raw text.
    pub text: String,
    /// The body parsed, when it is JSON.
    pub json: Option<Value>,
    /// Why it is not JSON, when it is not: the message is a dead letter.
    pub problem: Option<Problem>,
}

/// Why a body is not JSON.
#[derive(Debug)]
pub enum Problem {
    /// It is not UTF-8 text.
    NotUtf8(std::str::Utf8Error),
    /// It is text, but not JSON.
    NotJson(serde_json::Error),
}

impl std::fmt::Display for Problem {
    /// The parser's own words (what a source puts in its reason).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::NotUtf8(e) => e.fmt(f),
            Problem::NotJson(e) => e.fmt(f),
        }
    }
}

impl Body {
    /// A body received as bytes.
    pub fn from_bytes(bytes: &[u8]) -> Body {
        match std::str::from_utf8(bytes) {
            Ok(text) => Body::from_text(text.to_string()),
            Err(e) => Body::not_utf8(String::from_utf8_lossy(bytes).into_owned(), e),
        }
    }

    /// A body received as bytes it owns.
    pub fn from_vec(bytes: Vec<u8>) -> Body {
        match String::from_utf8(bytes) {
            Ok(text) => Body::from_text(text),
            Err(e) => Body::not_utf8(
                String::from_utf8_lossy(e.as_bytes()).into_owned(),
                e.utf8_error(),
            ),
        }
    }

    /// A body received as text.
    pub fn from_text(text: String) -> Body {
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => Body {
                text,
                json: Some(v),
                problem: None,
            },
            Err(e) => Body {
                text,
                json: None,
                problem: Some(Problem::NotJson(e)),
            },
        }
    }

    fn not_utf8(text: String, e: std::str::Utf8Error) -> Body {
        Body {
            text,
            json: None,
            problem: Some(Problem::NotUtf8(e)),
        }
    }

    /// The body's top-level object, where the fields of `{"field": ...}`
    /// and the event's own id (`source::own_id`) are read.
    pub fn object(&self) -> Option<&Map<String, Value>> {
        self.json.as_ref().and_then(Value::as_object)
    }
}

/// A 64-bit FNV-1a hash over `parts`, each followed by a 0xff byte (so
/// ("ab", "c") is not ("a", "bc")); one part without the separator gives
/// the plain FNV-1a of its bytes. For the ids of messages that carry none.
pub fn fnv1a(parts: &[&[u8]], separated: bool) -> u64 {
    let step = |h: u64, b: u8| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    parts.iter().fold(0xcbf2_9ce4_8422_2325, |h, part| {
        let h = part.iter().fold(h, |h, b| step(h, *b));
        if separated {
            step(h, 0xff)
        } else {
            h
        }
    })
}

/// A message is a dead letter for `reason`: say so in the log, and return
/// the reason (for [`Message::error`](crate::source::Message::error)).
pub fn dead_letter(reason: String) -> String {
    log::warn!("{reason}; into the inbox's dead letters");
    reason
}

impl Origin {
    /// `configured`, or by default the body field `name` (the attribute's
    /// own name).
    pub fn or_field(configured: &Option<Origin>, name: &str) -> Origin {
        configured.clone().unwrap_or(Origin::Field {
            field: name.to_string(),
        })
    }

    /// The attribute's value where this says: `header` reads a header (what
    /// a header is depends on the source), a field is read from `body`.
    pub fn value(
        &self,
        header: impl FnOnce(&str) -> Option<String>,
        body: Option<&Map<String, Value>>,
    ) -> Option<String> {
        match self {
            Origin::Header { header: h } => header(h),
            Origin::Field { field } => json_text(body?, field),
            Origin::Fixed(s) => Some(s.clone()),
        }
    }
}

/// A CloudEvent recognised in a received message, in either content
/// mode of the CloudEvents 1.0 protocol bindings. Recognition needs the
/// message to say it is one: a structured event's content type
/// (`application/cloudevents+json`, or `application/cloudevents-batch+json`
/// for an HTTP batch), or binary-mode attribute headers (`ce_specversion`
/// on Kafka, `ce-specversion` on HTTP and NATS, `cloudEvents:specversion`
/// or `cloudEvents_specversion` on AMQP). A JSON body that merely has a
/// `specversion` field is not taken for one (its `id` is still the event's
/// own id, see `source::own_id`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CloudEvent {
    /// `id`: the inbox `event_id`.
    pub id: Option<String>,
    /// `type`: the inbox `event_type`.
    pub kind: Option<String>,
    /// `source`.
    pub source: Option<String>,
    /// `traceparent` (Distributed Tracing extension): the inbox `trace_id`.
    pub traceparent: Option<String>,
    /// Structured mode: what the inbox payload is instead of the body (the
    /// `data`, or `null` when the event has none; none for `data_base64`,
    /// whose body is kept whole).
    pub payload: Option<String>,
    /// It came in binary mode (the body is the data).
    pub binary: bool,
}

/// The attribute-header prefixes of binary mode, and whether values are
/// percent-encoded under them (HTTP and NATS).
const PREFIXES: &[(&str, bool)] = &[
    ("ce_", false),
    ("ce-", true),
    ("cloudEvents:", false),
    ("cloudEvents_", false),
];

/// Whether a content type is CloudEvents' structured JSON format (one
/// event or a batch).
pub fn is_structured(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|t| {
        let t = t.trim_start().to_ascii_lowercase();
        t.starts_with("application/cloudevents+json")
            || t.starts_with("application/cloudevents-batch+json")
    })
}

impl CloudEvent {
    /// The CloudEvent in binary mode, when the message has attribute
    /// headers (`header` looks a header up by name).
    pub fn binary(header: impl Fn(&str) -> Option<String>) -> Option<CloudEvent> {
        let (prefix, percent) = PREFIXES
            .iter()
            .find(|(p, _)| header(&format!("{p}specversion")).is_some())?;
        let get = |name: &str| {
            header(&format!("{prefix}{name}"))
                .map(|v| if *percent { percent_decode(&v) } else { v })
                .filter(|v| !v.is_empty())
        };
        Some(CloudEvent {
            id: get("id"),
            kind: get("type"),
            source: get("source"),
            traceparent: get("traceparent"),
            payload: None,
            binary: true,
        })
    }

    /// The CloudEvent of a structured body `obj`, when the content type
    /// says it is one ([`is_structured`]) and it has a `specversion`.
    pub fn structured(
        content_type: Option<&str>,
        obj: Option<&Map<String, Value>>,
    ) -> Option<CloudEvent> {
        let obj = obj.filter(|o| o.get("specversion").is_some_and(Value::is_string))?;
        if !is_structured(content_type) {
            return None;
        }
        let get = |k: &str| json_text(obj, k).filter(|v| !v.is_empty());
        Some(CloudEvent {
            id: get("id"),
            kind: get("type"),
            source: get("source"),
            traceparent: get("traceparent"),
            payload: match (obj.get("data"), obj.get("data_base64")) {
                (Some(d), _) => Some(d.to_string()),
                (None, Some(_)) => None,
                (None, None) => Some("null".into()),
            },
            binary: false,
        })
    }

    /// Binary mode, else structured mode, else none.
    pub fn recognise(
        header: impl Fn(&str) -> Option<String>,
        content_type: Option<&str>,
        obj: Option<&Map<String, Value>>,
    ) -> Option<CloudEvent> {
        CloudEvent::binary(header).or_else(|| CloudEvent::structured(content_type, obj))
    }

    /// Put the event's attributes into `m`: `id` is the `event_id`; `type`,
    /// `source` and `traceparent` are `event_type`, `source` and
    /// `trace_id` unless the source's config says where those come from
    /// (`configured`, in that order); a structured event's data is the
    /// payload. A dead letter (`m.error`) keeps its raw text.
    pub fn apply(self, m: &mut Message, configured: [bool; 3]) {
        if let Some(id) = self.id {
            m.event_id = id;
        }
        for ((v, slot), set) in [
            (self.kind, &mut m.event_type),
            (self.source, &mut m.source),
            (self.traceparent, &mut m.trace_id),
        ]
        .into_iter()
        .zip(configured)
        {
            if !set && v.is_some() {
                *slot = v;
            }
        }
        if let (Some(p), None) = (self.payload, &m.error) {
            m.payload = p;
        }
    }
}

/// A percent-encoded header value (the CloudEvents HTTP binding) decoded;
/// what is not a valid `%XX` stays, bytes that are not UTF-8 become U+FFFD.
pub fn percent_decode(v: &str) -> String {
    if !v.contains('%') {
        return v.to_string();
    }
    let b = v.as_bytes();
    let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], hex(b.get(i + 1)), hex(b.get(i + 2))) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Origin {
    /// Whether this is not the default of attribute `name` (the body field
    /// of its own name): the config says where the attribute comes from.
    pub fn is_configured(&self, name: &str) -> bool {
        !matches!(self, Origin::Field { field } if field == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fnv1a_is_the_standard_hash_so_ids_stay_what_they_were() {
        // FNV-1a's published values: ids made before stay the same.
        assert_eq!(fnv1a(&[b""], false), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&[b"a"], false), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(&[b"foobar"], false), 0x8594_4171_f739_67e8);
        // Separated parts: the byte 0xff after each.
        assert_eq!(fnv1a(&[b"a"], true), fnv1a(&[b"a\xff"], false));
        assert_ne!(fnv1a(&[b"ab", b"c"], true), fnv1a(&[b"a", b"bc"], true));
    }

    #[test]
    fn fields_are_text_and_null_is_nothing() {
        let v = json!({"s": "x", "n": 7, "o": {"a": 1}, "z": null, "b": true});
        let obj = v.as_object().unwrap();
        assert_eq!(json_text(obj, "s").as_deref(), Some("x"));
        assert_eq!(json_text(obj, "n").as_deref(), Some("7"));
        assert_eq!(json_text(obj, "o").as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(json_text(obj, "b").as_deref(), Some("true"));
        assert_eq!(json_text(obj, "z"), None);
        assert_eq!(json_text(obj, "missing"), None);
    }

    #[test]
    fn a_body_is_json_or_says_why_not() {
        let ok = Body::from_bytes(br#"{"a": 1}"#);
        assert_eq!(ok.text, r#"{"a": 1}"#);
        assert!(ok.problem.is_none() && ok.object().is_some());
        // JSON that is not an object: a payload, with no fields.
        let array = Body::from_text("[1]".into());
        assert!(array.problem.is_none() && array.object().is_none());
        let text = Body::from_vec(b"not json".to_vec());
        assert_eq!(text.text, "not json");
        assert!(matches!(text.problem, Some(Problem::NotJson(_))) && text.json.is_none());
        for bytes in [&b"{\"a\": \"\xff\"}"[..]] {
            for b in [Body::from_bytes(bytes), Body::from_vec(bytes.to_vec())] {
                assert_eq!(b.text, "{\"a\": \"\u{FFFD}\"}");
                assert!(matches!(b.problem, Some(Problem::NotUtf8(_))));
            }
        }
    }

    #[test]
    fn origins_read_a_header_a_field_or_a_fixed_value() {
        let v = json!({"type": "t", "n": 1});
        let body = v.as_object();
        let headers = |h: &str| (h == "X-Type").then(|| "from header".to_string());
        let header = Origin::Header {
            header: "X-Type".into(),
        };
        assert_eq!(header.value(headers, body).as_deref(), Some("from header"));
        let field = Origin::or_field(&None, "type");
        assert_eq!(field.value(headers, body).as_deref(), Some("t"));
        assert_eq!(field.value(headers, None), None);
        let fixed = Origin::or_field(&Some(Origin::Fixed("f".into())), "type");
        assert_eq!(fixed.value(headers, None).as_deref(), Some("f"));
        assert_eq!(dead_letter("why".into()), "why");
    }
    #[test]
    fn origins_are_taken_out_of_the_keys_and_read_with_the_source_defaults() {
        let mut keys = json!({"url": "u", "source": "shop", "trace_id": {"field": "trace_id"},
                              "event_type": null})
        .as_object()
        .unwrap()
        .clone();
        let o = Origins::take(&mut keys, "source").unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["url"]);
        assert_eq!((o.event_type.clone(), o.aggregate_id.clone()), (None, None));
        assert_eq!(o.source, Some(Origin::Fixed("shop".into())));
        let mut bad = json!({"aggregate_id": 5}).as_object().unwrap().clone();
        assert_eq!(
            Origins::take(&mut bad, "source").unwrap_err().key,
            "source.aggregate_id"
        );
        let body = json!({"trace_id": "t", "event_type": "e"});
        let read = |tp: Option<&str>| {
            o.read(
                |o| o.value(|_| None, body.as_object()),
                || tp.map(str::to_string),
                |name| Some(format!("default {name}")),
            )
        };
        assert_eq!(
            read(Some("00-tp")),
            [
                Some("default event_type".into()),
                Some("default aggregate_id".into()),
                Some("shop".into()),
                Some("t".into()),
            ]
        );
        let none = Origins::default();
        let got = none.read(|_| None, || Some("tp".into()), |_| None);
        assert_eq!(got[3].as_deref(), Some("tp"));
        assert_eq!(o.configured(&[]), [false, true, true]);
        assert_eq!(o.configured(&ATTRIBUTES), [false, true, false]);
    }

    #[test]
    fn cloud_events_are_recognised_in_both_modes() {
        let kafka = |h: &str| match h {
            "ce_specversion" => Some("1.0".to_string()),
            "ce_id" => Some("o:1:0".into()),
            "ce_type" => Some("orders.insert".into()),
            "ce_source" => Some("/pgtrickle/o".into()),
            "ce_traceparent" => Some("00-ab-cd-01".into()),
            _ => None,
        };
        let body = json!({"n": 1});
        let ce = CloudEvent::recognise(kafka, None, body.as_object()).unwrap();
        assert_eq!(
            (ce.id.as_deref(), ce.kind.as_deref(), ce.source.as_deref()),
            (Some("o:1:0"), Some("orders.insert"), Some("/pgtrickle/o"))
        );
        assert!(ce.binary && ce.payload.is_none());
        // HTTP and NATS: ce- headers, percent-encoded.
        let http = |h: &str| match h {
            "ce-specversion" => Some("1.0".to_string()),
            "ce-type" => Some("a%20b%C3%A9".into()),
            _ => None,
        };
        assert_eq!(
            CloudEvent::binary(http).unwrap().kind.as_deref(),
            Some("a bé")
        );
        assert_eq!(percent_decode("100%"), "100%");
        // Structured: only with the content type.
        let ev = json!({"specversion": "1.0", "id": "x", "type": "t", "source": "/s",
                        "data": {"n": 2}});
        let none = |_: &str| None;
        assert_eq!(CloudEvent::recognise(none, None, ev.as_object()), None);
        assert_eq!(
            CloudEvent::recognise(none, Some("application/json"), ev.as_object()),
            None
        );
        let ce = CloudEvent::recognise(
            none,
            Some("Application/CloudEvents+JSON; charset=UTF-8"),
            ev.as_object(),
        )
        .unwrap();
        assert_eq!(ce.payload.as_deref(), Some(r#"{"n":2}"#));
        assert!(is_structured(Some("application/cloudevents-batch+json")));
        let b64 = json!({"specversion": "1.0", "id": "x", "data_base64": "AA=="});
        let ce = CloudEvent::structured(Some("application/cloudevents+json"), b64.as_object());
        assert_eq!(ce.unwrap().payload, None);
        // Applied: configured attributes stay.
        let mut m = Message {
            event_id: "key".into(),
            event_type: Some("subject".into()),
            source: Some("configured".into()),
            aggregate_id: None,
            trace_id: None,
            payload: ev.to_string(),
            error: None,
        };
        CloudEvent::structured(Some("application/cloudevents+json"), ev.as_object())
            .unwrap()
            .apply(&mut m, [false, true, false]);
        assert_eq!(m.event_id, "x");
        assert_eq!(m.event_type.as_deref(), Some("t"));
        assert_eq!(m.source.as_deref(), Some("configured"));
        assert_eq!(m.payload, r#"{"n":2}"#);
        assert!(Origin::Fixed("x".into()).is_configured("source"));
        assert!(!Origin::or_field(&None, "source").is_configured("source"));
    }
}
