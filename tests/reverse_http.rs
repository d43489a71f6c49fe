//! The `http` source end to end: webhooks POSTed to the relay binary →
//! inbox table, with a plain std TcpStream HTTP/1.1 client.
#![cfg(feature = "http")]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use support::*;

/// POST `body` to `addr` + `path` with extra headers: (status, body).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn post(addr: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    request(addr, "POST", path, headers, body.as_bytes())
}

/// The webhook address the relay logged.
fn webhook_addr(r: &Relay) -> String {
    let needle = "listening for webhooks on http://";
    r.wait_log(needle, 20);
    let log = r.stderr();
    let rest = log.split(needle).nth(1).unwrap();
    let url = rest.split_whitespace().next().unwrap();
    url.split('/').next().unwrap().to_string()
}

fn count(c: &mut postgres::Client, inbox: &str) -> i64 {
    c.query_one(&format!("SELECT count(*) FROM pgtrickle.{inbox}"), &[])
        .unwrap()
        .get(0)
}

fn has_row(c: &mut postgres::Client, id: &str) -> bool {
    c.query_one(
        "SELECT count(*) FROM pgtrickle.events WHERE event_id = $1",
        &[&id],
    )
    .unwrap()
    .get::<_, i64>(0)
        == 1
}

fn set_inbox(pg: &Pg, url: &str, source: Value) {
    pg.client(url)
        .execute(
            "SELECT pgtrickle.set_relay_inbox('hooks', 'events', $1::text::jsonb)",
            &[&source.to_string()],
        )
        .unwrap();
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(secret: &[u8], ts: &str, body: &str) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("v1={hex}")
}

#[test]
fn events_dedup_and_every_status_code() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_http_codes");
    set_inbox(
        pg,
        &url,
        json!({"type": "http", "listen": "127.0.0.1:0", "path": "/hooks",
               "token": "${ENV:HOOK_TOKEN}", "max_body_bytes": 4000,
               "event_type": {"header": "X-Event-Type"}, "source": "webhook",
               "aggregate_id": {"field": "order"}}),
    );
    let r = Relay::spawn(relay(&url).env("HOOK_TOKEN", "tok-1"));
    let addr = webhook_addr(&r);
    let mut c = pg.client(&url);
    let auth = ("Authorization", "Bearer tok-1");

    // 60 posts over 25 distinct ids: a 200 means the row is committed.
    for i in 0..60 {
        let id = format!("e{}", i % 25);
        let body = json!({"event_id": id, "order": i, "payload": {"n": i}}).to_string();
        let (status, answer) = post(&addr, "/hooks", &[auth, ("X-Event-Type", "paid")], &body);
        assert_eq!((status, answer.as_str()), (200, r#"{"accepted":1}"#));
        assert!(has_row(&mut c, &id), "200 before {id} was in the inbox");
    }
    assert_eq!(count(&mut c, "events"), 25);
    let row = c
        .query_one(
            "SELECT event_type, source, aggregate_id, payload->>'n' FROM pgtrickle.events WHERE event_id = 'e3'",
            &[],
        )
        .unwrap();
    let got: (String, String, String, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        got,
        ("paid".into(), "webhook".into(), "3".into(), "3".into())
    );

    // An array with an Idempotency-Key: <key>:<index>; sent twice, kept once.
    for _ in 0..2 {
        let (status, answer) = post(
            &addr,
            "/hooks?x=1",
            &[auth, ("Idempotency-Key", "batch-7")],
            r#"[{"a":1},{"a":2},{"a":3}]"#,
        );
        assert_eq!((status, answer.as_str()), (200, r#"{"accepted":3}"#));
    }
    assert!(has_row(&mut c, "batch-7:0") && has_row(&mut c, "batch-7:2"));
    // Without a payload field the payload is the whole object.
    let p: String = c
        .query_one(
            "SELECT payload::text FROM pgtrickle.events WHERE event_id = 'batch-7:1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(p, r#"{"a": 2}"#);
    assert_eq!(count(&mut c, "events"), 28);

    let ok = r#"{"event_id":"z"}"#;
    let (s, b) = post(&addr, "/hooks", &[auth], "{not json");
    assert_eq!(s, 400);
    assert!(b.contains("not valid JSON"), "{b}");
    let (s, b) = post(&addr, "/hooks", &[auth], r#"{"no_id":1}"#);
    assert_eq!(s, 400);
    assert!(b.contains("no id"), "{b}");
    let (s, b) = post(&addr, "/hooks", &[auth], "42");
    assert_eq!(s, 400, "{b}");
    assert_eq!(post(&addr, "/hooks", &[], ok).0, 401);
    assert_eq!(
        post(&addr, "/hooks", &[("Authorization", "Bearer nope")], ok).0,
        401
    );
    let big = json!({"event_id": "big", "pad": "x".repeat(5000)}).to_string();
    assert_eq!(post(&addr, "/hooks", &[auth], &big).0, 413);
    // Without a Content-Length (chunked), the read itself is capped.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let chunk = "x".repeat(1000);
    let mut raw = String::from(
        "POST /hooks HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer tok-1\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    for _ in 0..6 {
        raw.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    raw.push_str("0\r\n\r\n");
    let _ = s.write_all(raw.as_bytes());
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert_eq!(post(&addr, "/elsewhere", &[auth], ok).0, 404);
    assert_eq!(request(&addr, "GET", "/hooks", &[auth], b"").0, 405);
    assert_eq!(count(&mut c, "events"), 28, "nothing refused got in");

    // A client that sends half a body and disconnects.
    for _ in 0..10 {
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "POST /hooks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-1\r\nContent-Length: 100\r\n\r\n{{\"event_id\":"
        )
        .unwrap();
        drop(s);
    }
    // And one that stays silent in the middle of its body.
    let mut stalled = TcpStream::connect(&addr).unwrap();
    write!(
        stalled,
        "POST /hooks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-1\r\nContent-Length: 100\r\n\r\n{{\"event_id\":"
    )
    .unwrap();
    let (s, _) = post(&addr, "/hooks", &[auth], ok);
    assert_eq!(s, 200, "{}", r.stderr());
    assert!(has_row(&mut c, "z"));
    drop(stalled);
    assert_eq!(
        post(&addr, "/hooks", &[auth], r#"{"event_id":"z2"}"#).0,
        200
    );
}

#[test]
fn concurrent_senders_all_arrive() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_http_conc");
    set_inbox(pg, &url, json!({"type": "http", "listen": "127.0.0.1:0"}));
    let r = Relay::spawn(&mut relay(&url));
    let addr = webhook_addr(&r);
    let senders: Vec<_> = (0..8)
        .map(|t| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    let body = json!({"event_id": format!("t{t}-{i}"), "payload": {"i": i}});
                    let (s, b) = post(&addr, "/", &[], &body.to_string());
                    assert_eq!(s, 200, "{b}");
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    assert_eq!(count(&mut pg.client(&url), "events"), 1600);
}

#[test]
fn signatures_are_checked_and_our_http_sink_feeds_our_source() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_http_signed");
    let port = free_port();
    set_inbox(
        pg,
        &url,
        json!({"type": "http", "listen": format!("127.0.0.1:{port}"), "path": "/in",
               "signing_secret": "${ENV:HOOK_SECRET}"}),
    );
    // A forward pipeline whose http sink signs with the same secret.
    pg.client(&url)
        .execute(
            "SELECT pgtrickle.enable_outbox('orders'), \
             pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb)",
            &[
                &json!({"type": "http", "url": format!("http://127.0.0.1:{port}/in"),
                      "signing_secret": "${ENV:HOOK_SECRET}"})
                .to_string(),
            ],
        )
        .unwrap();
    let r = Relay::spawn(relay(&url).env("HOOK_SECRET", "s3cret"));
    let addr = webhook_addr(&r);
    let mut c = pg.client(&url);

    let body = r#"{"event_id":"signed-1"}"#;
    let ts = now().to_string();
    let good = sign(b"s3cret", &ts, body);
    assert_eq!(post(&addr, "/in", &[], body).0, 401, "unsigned");
    let wrong = sign(b"other", &ts, body);
    assert_eq!(
        post(
            &addr,
            "/in",
            &[
                ("Pgtrickle-Timestamp", &ts),
                ("Pgtrickle-Signature", &wrong)
            ],
            body
        )
        .0,
        401
    );
    let old = (now() - 600).to_string();
    let old_sig = sign(b"s3cret", &old, body);
    assert_eq!(
        post(
            &addr,
            "/in",
            &[
                ("Pgtrickle-Timestamp", &old),
                ("Pgtrickle-Signature", &old_sig)
            ],
            body
        )
        .0,
        401,
        "a replayed old request"
    );
    let (s, b) = post(
        &addr,
        "/in",
        &[("Pgtrickle-Timestamp", &ts), ("Pgtrickle-Signature", &good)],
        body,
    );
    assert_eq!(s, 200, "{b}");
    assert!(has_row(&mut c, "signed-1"));

    // The relay's own http sink, signing as it does, into its own source.
    c.execute(
        "SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('n', g)) \
         FROM generate_series(1, 20) g",
        &[],
    )
    .unwrap();
    wait_until(30, "the sink's 20 events in the inbox", || {
        count(&mut c, "events") == 21
    });
    assert!(!r.stderr().contains("status 401"), "{}", r.stderr());
}

/// The Standard Webhooks specification's example secret.
const STANDARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// `webhook-signature` for `id` and `body` at `ts`, computed here from the
/// specification (base64 key after `whsec_`, "<id>.<ts>.<body>").
fn standard_sign(secret: &str, id: &str, ts: &str, body: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(secret.trim_start_matches("whsec_")).unwrap();
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    format!("v1,{}", b64.encode(mac.finalize().into_bytes()))
}

#[test]
fn standard_webhooks_signatures_are_checked_and_our_http_sink_feeds_our_source() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_http_standard");
    let port = free_port();
    set_inbox(
        pg,
        &url,
        json!({"type": "http", "listen": format!("127.0.0.1:{port}"), "path": "/in",
               "signing_scheme": "standard_webhooks", "signing_secret": "${ENV:HOOK_SECRET}"}),
    );
    pg.client(&url)
        .execute(
            "SELECT pgtrickle.enable_outbox('orders'), \
             pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb)",
            &[
                &json!({"type": "http", "url": format!("http://127.0.0.1:{port}/in"),
                        "mode": "event", "signing_scheme": "standard_webhooks",
                        "signing_secret": "${ENV:HOOK_SECRET}"})
                .to_string(),
            ],
        )
        .unwrap();
    let r = Relay::spawn(relay(&url).env("HOOK_SECRET", STANDARD_SECRET));
    let addr = webhook_addr(&r);
    let mut c = pg.client(&url);

    // No id of its own: the webhook-id (the same on every retry) is its id.
    let body = r#"{"kind":"ping"}"#;
    let ts = now().to_string();
    let good = standard_sign(STANDARD_SECRET, "msg_1", &ts, body);
    let headers = |ts: &str, sig: &str| {
        vec![
            ("webhook-id", "msg_1".to_string()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", sig.to_string()),
        ]
    };
    let send = |h: Vec<(&str, String)>| {
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        post(&addr, "/in", &h, body)
    };
    assert_eq!(post(&addr, "/in", &[], body).0, 401, "unsigned");
    let other = "whsec_c2VjcmV0LW9mLWFub3RoZXItc2VuZGVy";
    let wrong = standard_sign(other, "msg_1", &ts, body);
    assert_eq!(send(headers(&ts, &wrong)).0, 401, "another sender's key");
    let tampered = standard_sign(STANDARD_SECRET, "msg_2", &ts, body);
    assert_eq!(
        send(headers(&ts, &tampered)).0,
        401,
        "signed for another id"
    );
    let old = (now() - 600).to_string();
    let old_sig = standard_sign(STANDARD_SECRET, "msg_1", &old, body);
    assert_eq!(
        send(headers(&old, &old_sig)).0,
        401,
        "a replayed old request"
    );
    // The Pgtrickle scheme's headers are not accepted instead.
    let pgtrickle = sign(STANDARD_SECRET.as_bytes(), &ts, body);
    assert_eq!(
        post(
            &addr,
            "/in",
            &[
                ("Pgtrickle-Timestamp", &ts),
                ("Pgtrickle-Signature", &pgtrickle)
            ],
            body
        )
        .0,
        401
    );
    // Several signatures (a sender rotating its secret): one valid is enough.
    let (s, b) = send(headers(&ts, &format!("{wrong} {good}")));
    assert_eq!(s, 200, "{b}");
    assert!(has_row(&mut c, "msg_1"));

    // The relay's own http sink, signing the Standard Webhooks way, into
    // its own source.
    c.execute(
        "SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('n', g)) \
         FROM generate_series(1, 20) g",
        &[],
    )
    .unwrap();
    wait_until(30, "the sink's 20 events in the inbox", || {
        count(&mut c, "events") == 21
    });
    assert!(!r.stderr().contains("status 401"), "{}", r.stderr());
}

#[test]
fn postgres_down_no_200_before_the_inbox_has_it() {
    let mut pg = Pg::start();
    let url = pg.new_db("rev_http_pgdown");
    set_inbox(
        &pg,
        &url,
        json!({"type": "http", "listen": "127.0.0.1:0", "max_wait_ms": 20}),
    );
    let r = Relay::spawn(&mut relay(&url));
    let addr = webhook_addr(&r);
    assert_eq!(post(&addr, "/", &[], r#"{"event_id":"before"}"#).0, 200);
    pg.stop();
    let in_flight: Vec<_> = (0..4)
        .map(|i| {
            let (addr, url) = (addr.clone(), url.clone());
            std::thread::spawn(move || {
                let id = format!("during-{i}");
                let body = format!(r#"{{"event_id":"{id}"}}"#);
                // A 503 (timed out waiting for the commit) is retried, as a
                // sender would.
                loop {
                    let (s, b) = post(&addr, "/", &[], &body);
                    match s {
                        200 => {
                            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                            assert!(has_row(&mut c, &id), "200 before {id} was in the inbox");
                            return;
                        }
                        503 => std::thread::sleep(Duration::from_millis(200)),
                        _ => panic!("status {s}: {b}"),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(2000));
    assert!(
        in_flight.iter().all(|t| !t.is_finished()),
        "a 200 while PostgreSQL was down"
    );
    pg.start_again();
    for t in in_flight {
        t.join().unwrap();
    }
    let mut c = pg.client(&url);
    for i in 0..4 {
        assert!(has_row(&mut c, &format!("during-{i}")));
    }
    assert_eq!(post(&addr, "/", &[], r#"{"event_id":"after"}"#).0, 200);
    assert_eq!(count(&mut c, "events"), 6);
}

#[test]
fn missing_listen_is_named() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_http_badcfg");
    set_inbox(pg, &url, json!({"type": "http", "path": "/x"}));
    let out = relay(&url).arg("--once").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline \"hooks\"") && stderr.contains("source.listen"),
        "{stderr}"
    );
}

#[test]
fn a_changed_pipeline_closes_its_old_listener() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_http_restart");
    set_inbox(pg, &url, json!({"type": "http", "listen": "127.0.0.1:0"}));
    let r = Relay::spawn(&mut relay(&url));
    let old = webhook_addr(&r);
    assert_eq!(post(&old, "/", &[], r#"{"event_id":"a"}"#).0, 200);
    set_inbox(
        pg,
        &url,
        json!({"type": "http", "listen": "127.0.0.1:0", "path": "/v2"}),
    );
    wait_until(30, "the restarted pipeline's listener", || {
        r.stderr()
            .matches("listening for webhooks on http://")
            .count()
            == 2
    });
    let log = r.stderr();
    let new = log
        .rsplit("listening for webhooks on http://")
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    wait_until(10, "the old listener to close", || {
        TcpStream::connect(&old).is_err()
    });
    assert_eq!(post(&new, "/v2", &[], r#"{"event_id":"b"}"#).0, 200);
    assert_eq!(count(&mut pg.client(&url), "events"), 2);
}

#[test]
fn a_changed_pipeline_rebinds_the_same_port() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_http_rebind");
    let addr = format!("127.0.0.1:{}", free_port());
    set_inbox(pg, &url, json!({"type": "http", "listen": addr}));
    let r = Relay::spawn(&mut relay(&url));
    webhook_addr(&r);
    assert_eq!(post(&addr, "/", &[], r#"{"event_id":"a"}"#).0, 200);
    set_inbox(
        pg,
        &url,
        json!({"type": "http", "listen": addr, "path": "/v2"}),
    );
    wait_until(30, "the restarted pipeline on the same port", || {
        TcpStream::connect(&addr).is_ok() && post(&addr, "/v2", &[], r#"{"event_id":"b"}"#).0 == 200
    });
    assert_eq!(count(&mut pg.client(&url), "events"), 2, "{}", r.stderr());
}

#[test]
fn an_event_postgresql_cannot_index_is_a_dead_letter_and_the_request_succeeds() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_http_longid");
    set_inbox(pg, &url, json!({"type": "http", "listen": "127.0.0.1:0"}));
    let r = Relay::spawn(&mut relay(&url));
    let addr = webhook_addr(&r);
    // Random letters: not compressible below the btree limit.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let long: String = (0..8000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x >> 40) as u8 % 26)
        })
        .collect();
    let body = json!([{"event_id": "h1"}, {"event_id": long, "n": 2}, {"event_id": "h3"}]);
    for _ in 0..2 {
        let (status, answer) = post(&addr, "/", &[], &body.to_string());
        assert_eq!((status, answer.as_str()), (200, r#"{"accepted":3}"#));
    }
    let mut c = pg.client(&url);
    assert!(has_row(&mut c, "h1") && has_row(&mut c, "h3"));
    let rows = c
        .query(
            "SELECT event_id, error FROM pgtrickle.events WHERE error IS NOT NULL",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 1, "one dead letter, also for the repeat");
    let (id, error): (String, String) = (rows[0].get(0), rows[0].get(1));
    assert!(id.starts_with(&long[..64]) && id.len() < 200, "{id}");
    assert!(error.contains("event_id"), "{error}");
    assert_eq!(count(&mut c, "events"), 3);
}

#[test]
fn relay_to_relay_over_http_keeps_one_row_per_event_across_a_retry() {
    let pg = Pg::shared();
    let port = free_port();
    // Relay B: the http source into inbox `events`, whose inserts wait
    // while slow.on_ is true.
    let b = pg.new_db("rev_http_relay_b");
    set_inbox(
        pg,
        &b,
        json!({"type": "http", "listen": format!("127.0.0.1:{port}")}),
    );
    let mut cb = pg.client(&b);
    cb.batch_execute(
        "CREATE TABLE slow (on_ boolean NOT NULL); INSERT INTO slow VALUES (true);
         CREATE FUNCTION wait_while_slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           WHILE (SELECT on_ FROM slow) LOOP PERFORM pg_sleep(0.02); END LOOP;
           RETURN NEW;
         END $$;
         CREATE TRIGGER slow BEFORE INSERT ON pgtrickle.events
           FOR EACH ROW EXECUTE FUNCTION wait_while_slow();",
    )
    .unwrap();
    let rb = Relay::spawn(&mut relay(&b));
    webhook_addr(&rb);
    // Relay A: outbox `orders` → the http sink, giving up after 300 ms.
    let a = outbox_pipeline(
        "rev_http_relay_a",
        &json!({"type": "http", "url": format!("http://127.0.0.1:{port}/"), "timeout_ms": 300}),
    );
    let ra = Relay::spawn(&mut relay(&a));
    publish(&a, 1, 3);
    wait_until(60, "relay B writing the first request", || {
        cb.query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = 'rev_http_relay_b' AND wait_event = 'PgSleep'",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
            > 0
    });
    // Events 4-6 are committed before the retry that follows the second
    // time-out from now: that retry's request holds events 1-6.
    publish(&a, 4, 3);
    let retries = || ra.stderr().matches("; retrying ").count();
    let before = retries();
    wait_until(60, "two more retries of relay A", || {
        retries() >= before + 2
    });
    cb.execute("UPDATE slow SET on_ = false", &[]).unwrap();
    let events = |c: &mut postgres::Client| -> Vec<(String, String)> {
        c.query(
            "SELECT event_id, payload->>'n' FROM pgtrickle.events ORDER BY 2, 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    };
    wait_until(60, "events 1-6 in relay B's inbox", || {
        let mut ns: Vec<String> = events(&mut cb).into_iter().map(|e| e.1).collect();
        ns.dedup();
        ns == ["1", "2", "3", "4", "5", "6"]
    });
    // One row per event, under its dedup key.
    let got = events(&mut cb);
    assert_eq!(got.len(), 6, "{got:?}");
    for (id, n) in got {
        assert!(id.ends_with(":0") && !id.contains(".."), "{n}: {id}");
    }
}
