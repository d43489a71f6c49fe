//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) across the
//! relay: the `traceparent` and `tracestate` an outbox row's `headers` carry
//! (written there by `outbox_publish` from the caller's
//! `pgtrickle.traceparent` setting, or given by the caller), sent by every
//! sink as native headers under exactly these names, and read back by every
//! source into the inbox `trace_id` (the whole `traceparent` value).

// The native headers are sent by the sinks that have headers; a build
// without any of them leaves them unused.
#![cfg_attr(
    not(any(
        feature = "kafka",
        feature = "nats",
        feature = "rabbitmq",
        feature = "sqs",
        feature = "redis",
        feature = "http"
    )),
    allow(dead_code)
)]

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The header (attribute, field) carrying the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// The header (attribute, field) carrying the W3C vendor trace state.
pub const TRACESTATE: &str = "tracestate";
/// The longest `tracestate` passed on, in bytes (what the W3C
/// recommendation asks every vendor to pass on at least); a longer one is
/// dropped, as `outbox_publish` does with a longer setting.
pub const MAX_TRACESTATE: usize = 512;

/// Whether `s` is a traceparent the relay passes on: the version-00 form
/// `vv-<32 hex trace id>-<16 hex parent id>-<2 hex flags>` in lowercase
/// hex, with a version other than `ff` and neither id all zeros (the same
/// rule as `pgtrickle._outbox_trace_headers` in SQL).
pub fn is_traceparent(s: &str) -> bool {
    let b = s.as_bytes();
    let hex =
        |r: std::ops::Range<usize>| b[r].iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let zeros = |r: std::ops::Range<usize>| b[r].iter().all(|c| *c == b'0');
    b.len() == 55
        && b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(0..2)
        && hex(3..35)
        && hex(36..52)
        && hex(53..55)
        && &b[0..2] != b"ff"
        && !zeros(3..35)
        && !zeros(36..52)
}

/// `value` (trimmed) when it is a traceparent ([`is_traceparent`]).
pub fn traceparent(value: Option<&str>) -> Option<String> {
    value
        .map(str::trim)
        .filter(|v| is_traceparent(v))
        .map(str::to_string)
}

/// The inbox `trace_id` of a received message when its pipeline configures
/// no origin for `trace_id`: the message's W3C `traceparent` when it is a
/// valid one, else what `fallback` finds (the source's previous default).
pub fn trace_id(
    traceparent: Option<&str>,
    fallback: impl FnOnce() -> Option<String>,
) -> Option<String> {
    self::traceparent(traceparent).or_else(fallback)
}

/// The `traceparent` a JSON object carries: its own `traceparent` member,
/// else that of its `headers` object (an event envelope as the stdout and
/// http sinks write it). Not validated here (see [`trace_id`]).
pub fn in_object(obj: &Map<String, Value>) -> Option<&str> {
    obj.get(TRACEPARENT)
        .or_else(|| obj.get("headers")?.get(TRACEPARENT))?
        .as_str()
}

/// The trace context an outbox row's headers carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The valid `traceparent`.
    pub traceparent: String,
    /// The `tracestate` that came with it, when any (non-empty, at most
    /// [`MAX_TRACESTATE`] bytes).
    pub tracestate: Option<String>,
}

/// The two keys of a headers object that matter here.
#[derive(Deserialize)]
struct Keys {
    traceparent: Option<Value>,
    tracestate: Option<Value>,
}

impl Context {
    /// The trace context of an event's `headers` (a JSON object): its
    /// `traceparent` when that is a valid one ([`is_traceparent`]), with its
    /// `tracestate`. Anything else (no headers, no or a malformed
    /// traceparent, headers that are not an object) has none.
    pub fn of(headers: Option<&RawValue>) -> Option<Context> {
        let h = headers?.get();
        if !h.contains(TRACEPARENT) {
            return None; // the common case, without parsing
        }
        let keys: Keys = serde_json::from_str(h).ok()?;
        let traceparent = traceparent(keys.traceparent.as_ref()?.as_str())?;
        let tracestate = keys
            .tracestate
            .as_ref()
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE)
            .map(str::to_string);
        Some(Context {
            traceparent,
            tracestate,
        })
    }

    /// The native headers to send: `traceparent`, then `tracestate` when
    /// there is one, as (name, value) pairs.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        std::iter::once((TRACEPARENT, self.traceparent.as_str()))
            .chain(self.tracestate.as_deref().map(|s| (TRACESTATE, s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_is_the_version_00_form_in_lowercase_hex() {
        assert!(is_traceparent(TP));
        assert!(is_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        ));
        for bad in [
            "",
            "garbage",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
        ] {
            assert!(!is_traceparent(bad), "{bad:?}");
        }
        assert_eq!(traceparent(Some(&format!(" {TP}\n"))).as_deref(), Some(TP));
        assert_eq!(traceparent(Some("x")), None);
        assert_eq!(traceparent(None), None);
    }

    #[test]
    fn trace_id_is_the_traceparent_else_the_fallback() {
        assert_eq!(
            trace_id(Some(TP), || Some("c-9".into())).as_deref(),
            Some(TP)
        );
        assert_eq!(
            trace_id(Some("bad"), || Some("c-9".into())).as_deref(),
            Some("c-9")
        );
        assert_eq!(trace_id(None, || None), None);
    }

    #[test]
    fn an_object_carries_a_traceparent_itself_or_in_its_headers() {
        let own = serde_json::json!({"traceparent": TP, "headers": {"traceparent": "other"}});
        assert_eq!(in_object(own.as_object().unwrap()), Some(TP));
        let env = serde_json::json!({"headers": {"traceparent": TP}});
        assert_eq!(in_object(env.as_object().unwrap()), Some(TP));
        let none = serde_json::json!({"headers": null, "traceparent": 7});
        assert_eq!(in_object(none.as_object().unwrap()), None);
    }

    #[test]
    fn the_context_of_headers() {
        let raw = |s: &str| RawValue::from_string(s.into()).unwrap();
        let h = raw(&format!(
            r#"{{"x": 1, "traceparent": "{TP}", "tracestate": "congo=t61rcWkgMzE"}}"#
        ));
        let c = Context::of(Some(&h)).unwrap();
        assert_eq!(c.traceparent, TP);
        assert_eq!(c.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(
            c.headers().collect::<Vec<_>>(),
            [(TRACEPARENT, TP), (TRACESTATE, "congo=t61rcWkgMzE")]
        );
        let alone = Context::of(Some(&raw(&format!(r#"{{"traceparent": "{TP}"}}"#)))).unwrap();
        assert_eq!(alone.tracestate, None);
        assert_eq!(alone.headers().count(), 1);
        let long = format!(
            r#"{{"traceparent": "{TP}", "tracestate": "{}"}}"#,
            "a".repeat(MAX_TRACESTATE + 1)
        );
        assert_eq!(Context::of(Some(&raw(&long))).unwrap().tracestate, None);
        for none in [
            r#"{"x": 1}"#,
            r#"{"traceparent": "bad", "tracestate": "a=b"}"#,
            r#"{"traceparent": 7}"#,
            r#"["traceparent"]"#,
        ] {
            assert_eq!(Context::of(Some(&raw(none))), None, "{none}");
        }
        assert_eq!(Context::of(None), None);
    }
}
