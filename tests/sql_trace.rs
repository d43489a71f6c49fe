//! W3C trace context in the outbox (sql/10_outbox.sql,
//! `_outbox_trace_headers`): `outbox_publish` and `outbox_publish_delta`
//! record the caller's `pgtrickle.traceparent` / `pgtrickle.tracestate`
//! settings in the row's `headers`; a `traceparent` the caller puts in
//! `p_headers` wins; a malformed setting is ignored and never fails the
//! application's transaction.

mod support;

use postgres::Client;
use serde_json::{json, Value};
use support::sqlcheck::*;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TS: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";

/// The headers of outbox row `id` of `outbox_orders` (SQL NULL: `Null`).
fn headers(c: &mut Client, id: i64) -> Value {
    let h: Option<String> = c
        .query_one(
            "SELECT headers::text FROM pgtrickle.outbox_orders WHERE id = $1",
            &[&id],
        )
        .unwrap()
        .get(0);
    h.map_or(Value::Null, |t| serde_json::from_str(&t).unwrap())
}

/// Run `publish` (a SELECT returning the outbox id) in a transaction that
/// first runs `set` (SET LOCAL ...); returns the id.
fn publish_in(c: &mut Client, set: &str, publish: &str) -> i64 {
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(set).unwrap();
    let id: i64 = tx.query_one(publish, &[]).unwrap().get(0);
    tx.commit().unwrap();
    id
}

#[test]
fn the_settings_of_the_writing_transaction_go_into_the_headers() {
    let (_pg, _url, mut c) = setup("sqlt_trace_settings");
    c.batch_execute("SELECT pgtrickle.enable_outbox('orders')")
        .unwrap();
    let set = format!(
        "SET LOCAL pgtrickle.traceparent = '{TP}'; SET LOCAL pgtrickle.tracestate = '{TS}'"
    );
    let both = json!({"traceparent": TP, "tracestate": TS});
    // The generated path, by stream and by table name.
    for outbox in ["orders", "outbox_orders"] {
        let id = publish_in(
            &mut c,
            &set,
            &format!("SELECT pgtrickle.outbox_publish('{outbox}', '{{\"n\": 1}}')"),
        );
        assert_eq!(headers(&mut c, id), both, "{outbox}");
    }
    // Other headers are kept; a keyed call (the general path) too.
    let id = publish_in(
        &mut c,
        &set,
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 2}', '{\"tenant\": \"a\"}', 'k-2')",
    );
    assert_eq!(
        headers(&mut c, id),
        json!({"tenant": "a", "traceparent": TP, "tracestate": TS})
    );
    // outbox_publish_delta: inline, keyed, and claim-check.
    let id = publish_in(
        &mut c,
        &set,
        "SELECT pgtrickle.outbox_publish_delta('orders', '[{\"n\": 3}]')",
    );
    assert_eq!(headers(&mut c, id), both);
    let id = publish_in(
        &mut c,
        &set,
        "SELECT pgtrickle.outbox_publish_delta('orders', '[{\"n\": 4}]', p_idempotency_key => 'k-4')",
    );
    assert_eq!(headers(&mut c, id), both);
    let id = publish_in(
        &mut c,
        &format!("{set}; SET LOCAL pgtrickle.outbox_inline_threshold = 0"),
        "SELECT pgtrickle.outbox_publish_delta('orders', '[{\"n\": 5}, {\"n\": 6}]')",
    );
    assert_eq!(headers(&mut c, id), both);
    assert!(bool_of(
        &mut c,
        &format!("SELECT is_claim_check FROM pgtrickle.outbox_orders WHERE id = {id}")
    ));
    // A traceparent without a tracestate; a session-wide SET works too.
    c.batch_execute(&format!("SET pgtrickle.traceparent = '{TP}'"))
        .unwrap();
    let id = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 7}')",
    );
    assert_eq!(headers(&mut c, id), json!({"traceparent": TP}));
    // Once the setting is gone (RESET leaves an empty placeholder), the
    // headers are what the caller gave: nothing.
    c.batch_execute("RESET pgtrickle.traceparent").unwrap();
    let id = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 8}')",
    );
    assert_eq!(headers(&mut c, id), Value::Null);
    let id = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish_delta('orders', '[{\"n\": 9}]')",
    );
    assert_eq!(headers(&mut c, id), Value::Null);
    // A fresh session that never set it.
    let mut fresh = support::Pg::shared().client(&_url);
    let id = i64_of(
        &mut fresh,
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 10}', '{\"a\": 1}')",
    );
    assert_eq!(headers(&mut c, id), json!({"a": 1}));
}

#[test]
fn a_traceparent_the_caller_gives_wins_over_the_settings() {
    let (_pg, _url, mut c) = setup("sqlt_trace_explicit");
    c.batch_execute("SELECT pgtrickle.enable_outbox('orders')")
        .unwrap();
    let set = format!(
        "SET LOCAL pgtrickle.traceparent = '{TP}'; SET LOCAL pgtrickle.tracestate = '{TS}'"
    );
    let mine = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    // The caller's traceparent, and no tracestate of the settings with it.
    let id = publish_in(
        &mut c,
        &set,
        &format!("SELECT pgtrickle.outbox_publish('orders', '{{\"n\": 1}}', '{{\"traceparent\": \"{mine}\"}}')"),
    );
    assert_eq!(headers(&mut c, id), json!({"traceparent": mine}));
    // The caller's tracestate with the settings' traceparent.
    let id = publish_in(
        &mut c,
        &set,
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 2}', '{\"tracestate\": \"mine=1\"}')",
    );
    assert_eq!(
        headers(&mut c, id),
        json!({"traceparent": TP, "tracestate": "mine=1"})
    );
    // Without settings, the caller's headers as given (not validated).
    let id = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 3}', '{\"traceparent\": \"x\"}')",
    );
    assert_eq!(headers(&mut c, id), json!({"traceparent": "x"}));
}

#[test]
fn a_malformed_setting_is_ignored_and_the_transaction_commits() {
    let (_pg, _url, mut c) = setup("sqlt_trace_malformed");
    c.batch_execute("SELECT pgtrickle.enable_outbox('orders')")
        .unwrap();
    for bad in [
        "garbage",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    ] {
        let set = format!(
            "SET LOCAL pgtrickle.traceparent = '{bad}'; SET LOCAL pgtrickle.tracestate = '{TS}'"
        );
        for publish in [
            "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 1}')",
            "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 1}', '{\"a\": 1}', NULL)",
            "SELECT pgtrickle.outbox_publish_delta('orders', '[{\"n\": 1}]')",
        ] {
            let id = publish_in(&mut c, &set, publish);
            let h = headers(&mut c, id);
            assert!(
                h.get("traceparent").is_none() && h.get("tracestate").is_none(),
                "{bad:?} {publish}: {h}"
            );
        }
    }
    // Surrounding blanks are trimmed; a tracestate over 512 characters is
    // dropped, the traceparent kept.
    let id = publish_in(
        &mut c,
        &format!(
            "SET LOCAL pgtrickle.traceparent = ' {TP} '; SET LOCAL pgtrickle.tracestate = '{}'",
            "a".repeat(513)
        ),
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 2}')",
    );
    assert_eq!(headers(&mut c, id), json!({"traceparent": TP}));
}

#[test]
fn an_outbox_without_a_headers_column_gets_no_trace_context() {
    // Like the pg_trickle extension's outboxes (CONTRACT.md: no headers).
    let (_pg, _url, mut c) = setup("sqlt_trace_no_headers");
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('orders');
         ALTER TABLE pgtrickle.outbox_orders DROP COLUMN headers CASCADE;",
    )
    .unwrap();
    let id = publish_in(
        &mut c,
        &format!("SET LOCAL pgtrickle.traceparent = '{TP}'"),
        "SELECT pgtrickle.outbox_publish_delta('orders', '[{\"n\": 1}]')",
    );
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.outbox_orders"),
        1
    );
    assert!(id > 0);
}

#[test]
fn the_publish_signatures_are_unchanged() {
    let (_pg, _url, mut c) = setup("sqlt_trace_signatures");
    let sigs: Vec<String> = c
        .query(
            "SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')'
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'pgtrickle' AND p.proname IN ('outbox_publish', 'outbox_publish_delta')
              ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        sigs,
        [
            "outbox_publish(p_outbox text, p_payload jsonb, p_headers jsonb, p_idempotency_key text)",
            "outbox_publish_delta(p_outbox text, p_inserted jsonb, p_deleted jsonb, p_full_refresh boolean, p_idempotency_key text)",
        ]
    );
    // The helper is not the application's to call.
    assert!(!bool_of(
        &mut c,
        "SELECT has_function_privilege('public', 'pgtrickle._outbox_trace_headers(jsonb, text)', 'EXECUTE')"
    ));
}
