//! What every source does with what it received: a JSON field as text, a
//! body as a payload (or the reason it is a dead letter), and where a
//! message attribute comes from ([`Origin`]).

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
}
