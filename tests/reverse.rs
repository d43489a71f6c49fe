//! Reverse mode end to end: stdin / a file → relay binary → inbox table.

mod support;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use support::*;

fn inbox_ids(c: &mut postgres::Client, inbox: &str) -> Vec<String> {
    c.query(
        &format!("SELECT event_id FROM pgtrickle.{inbox} ORDER BY event_id"),
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[test]
fn stdin_into_the_inbox_dedups_and_skips_malformed_lines() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_stdin");
    let mut c = pg.client(&url);
    c.batch_execute(r#"SELECT pgtrickle.set_relay_inbox('in', 'events', '{"type":"stdin"}');"#)
        .unwrap();
    let mut input = String::new();
    for i in 0..300 {
        // Every id twice: the second copy must be absorbed.
        let line = format!(
            r#"{{"event_id":"e{}","event_type":"order.placed","aggregate_id":"a{}","trace_id":"t","source":"shop","payload":{{"n":{i}}}}}"#,
            i % 150,
            i % 7
        );
        input.push_str(&line);
        input.push('\n');
    }
    input.push_str("{this is not json\n");
    input.push('\n');
    input.push_str(r#"{"dedup_key":"k1","amount":5}"#);
    input.push('\n');
    input.push_str(r#"{"no_id":true}"#);
    input.push('\n');
    // jsonb cannot store a \u0000 escape: a dead letter, not a stuck batch.
    input.push_str(r#"{"dedup_key":"k2","a":"x\u0000"}"#);
    input.push('\n');
    let mut child = relay(&url)
        .args(["--once", "--pipeline", "in", "--batch-size", "64"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("line 301") && stderr.contains("not valid JSON"),
        "{stderr}"
    );
    assert!(stderr.contains("1 malformed lines so far"), "{stderr}");
    assert!(
        stderr.contains("line 304") && stderr.contains("generated id"),
        "{stderr}"
    );
    let ids = inbox_ids(&mut c, "events");
    assert_eq!(ids.len(), 150 + 3, "{ids:?}");
    let error: String = c
        .query_one(
            "SELECT error FROM pgtrickle.events WHERE event_id = 'k2'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(error.contains("\\u0000 escape"), "{error}");
    assert!(ids.contains(&"k1".to_string()));
    assert!(ids.iter().any(|i| i.starts_with("in:304:")));
    // Fields land in their columns; the payload is the payload field, or the line.
    let r = c
        .query_one(
            "SELECT event_type, aggregate_id, trace_id, source, payload->>'n' FROM pgtrickle.events WHERE event_id = 'e1'",
            &[],
        )
        .unwrap();
    let got: (String, String, String, String, String) =
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
    assert_eq!(
        got,
        (
            "order.placed".into(),
            "a1".into(),
            "t".into(),
            "shop".into(),
            "1".into()
        )
    );
    let amount: String = c
        .query_one(
            "SELECT payload->>'amount' FROM pgtrickle.events WHERE event_id = 'k1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(amount, "5");
}

#[test]
fn a_replayed_file_is_absorbed_by_the_inbox() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_file");
    let dir = temp_dir("rev_file");
    let file = dir.join("in.jsonl");
    let mut f = std::fs::File::create(&file).unwrap();
    for i in 0..1000 {
        writeln!(f, r#"{{"event_id":"e{i}","payload":{{"i":{i}}}}}"#).unwrap();
    }
    writeln!(f, r#"{{"anonymous":1}}"#).unwrap();
    drop(f);
    let mut c = pg.client(&url);
    c.execute(
        "SELECT pgtrickle.set_relay_inbox('in', 'events', $1::text::jsonb)",
        &[&serde_json::json!({"type":"stdin","path": file}).to_string()],
    )
    .unwrap();
    for _ in 0..2 {
        let out = relay(&url).arg("--once").output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The line without an id got the same generated id both times.
    assert_eq!(inbox_ids(&mut c, "events").len(), 1001);
}

#[test]
fn postgres_down_then_back_loses_no_message() {
    let mut pg = Pg::start();
    let url = pg.new_db("rev_pgdown");
    let dir = temp_dir("rev_pgdown");
    let file = dir.join("in.jsonl");
    std::fs::File::create(&file).unwrap();
    pg.client(&url)
        .execute(
            "SELECT pgtrickle.set_relay_inbox('in', 'events', $1::text::jsonb)",
            &[&serde_json::json!({"type":"stdin","path": file, "max_wait_ms": 20}).to_string()],
        )
        .unwrap();
    let append = |from: usize, to: usize| {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        for i in from..to {
            writeln!(f, r#"{{"event_id":"e{i}"}}"#).unwrap();
        }
    };
    let r = Relay::spawn(&mut relay(&url));
    r.wait_log("receiving into inbox", 10);
    append(0, 100);
    wait_until(10, "the first 100", || {
        pg.client(&url)
            .query_one("SELECT count(*) FROM pgtrickle.events", &[])
            .unwrap()
            .get::<_, i64>(0)
            == 100
    });
    pg.stop();
    append(100, 300);
    std::thread::sleep(Duration::from_millis(1500));
    pg.start_again();
    append(300, 400);
    wait_until(60, "all 400 after PostgreSQL came back", || {
        pg.client(&url)
            .query_one("SELECT count(*) FROM pgtrickle.events", &[])
            .map(|r| r.get::<_, i64>(0) == 400)
            .unwrap_or(false)
    });
    assert!(r.stderr().contains("retrying"), "{}", r.stderr());
}

#[test]
fn runs_as_a_login_role_that_is_only_a_member_of_pgtrickle_relay() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_role");
    let mut c = pg.client(&url);
    c.batch_execute(
        r#"SELECT pgtrickle.set_relay_inbox('in', 'events', '{"type":"stdin"}');
           DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'relay_in_login') THEN
               CREATE ROLE relay_in_login LOGIN PASSWORD 'pw';
             END IF;
           END $$;
           GRANT pgtrickle_relay TO relay_in_login;"#,
    )
    .unwrap();
    let login = pg.url_as("rev_role", "relay_in_login", "pw");
    let mut child = relay(&login)
        .args(["--once", "--pipeline", "in"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"event_id\":\"a\"}\n{\"event_id\":\"b\"}\n{\"event_id\":\"a\"}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(inbox_ids(&mut c, "events"), vec!["a", "b"]);
}

/// The rows of inbox `events` at `url`: (event_id, error) by event_id.
fn rows_with_errors(url: &str) -> Vec<(String, Option<String>)> {
    Pg::shared()
        .client(url)
        .query(
            "SELECT event_id, error FROM pgtrickle.events ORDER BY event_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[test]
fn an_event_id_too_long_for_the_index_is_a_dead_letter_under_a_stable_id() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_longid");
    let dir = temp_dir("rev_longid");
    let file = dir.join("in.jsonl");
    // Not compressible: PostgreSQL would refuse it in the btree index.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let long: String = (0..8000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x >> 40) as u8 % 26)
        })
        .collect();
    std::fs::write(
        &file,
        format!(
            "{{\"event_id\":\"a\"}}\n{{\"event_id\":\"{long}\",\"n\":2}}\n{{\"event_id\":\"c\"}}\n"
        ),
    )
    .unwrap();
    set_inbox(&url, serde_json::json!({"type": "stdin", "path": file}));
    for _ in 0..2 {
        let out = relay(&url).arg("--once").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
    }
    // A replay lands on the same row: the substitute id is stable.
    let rows = rows_with_errors(&url);
    assert_eq!(rows.len(), 3, "{rows:?}");
    let (dead, fine): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r.1.is_some());
    let fine: Vec<&str> = fine.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(fine, ["a", "c"]);
    let (id, error) = (&dead[0].0, dead[0].1.as_deref().unwrap_or(""));
    assert!(id.starts_with(&long[..64]) && id.len() < 200, "{id}");
    assert!(
        error.contains("event_id") && error.contains("8000"),
        "{error}"
    );
    let (raw, retries): (String, i32) = {
        let r = pg
            .client(&url)
            .query_one(
                "SELECT payload->>'raw', retry_count FROM pgtrickle.events WHERE error IS NOT NULL",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(raw.contains(&long), "the dead letter keeps the message");
    assert_eq!(retries, 3, "a dead letter (retry_count = max_retries)");
}

#[test]
fn a_message_postgresql_refuses_is_a_dead_letter_and_the_rest_are_written() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_refused");
    let dir = temp_dir("rev_refused");
    let file = dir.join("in.jsonl");
    let mut lines = String::new();
    for i in 0..40 {
        let poison = if i == 17 || i == 30 {
            ",\"poison\":true"
        } else {
            ""
        };
        lines.push_str(&format!(
            "{{\"event_id\":\"e{i:02}\",\"event_type\":\"t\",\"payload\":{{\"n\":{i}{poison}}}}}\n"
        ));
    }
    std::fs::write(&file, lines).unwrap();
    set_inbox(&url, serde_json::json!({"type": "stdin", "path": file}));
    // A rule of the table that two events break (a dead letter's payload,
    // {"raw": ...}, passes it).
    pg.client(&url)
        .batch_execute(
            "ALTER TABLE pgtrickle.events ADD CONSTRAINT no_poison \
             CHECK (NOT payload ? 'poison')",
        )
        .unwrap();
    let out = relay(&url).arg("--once").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let rows = rows_with_errors(&url);
    assert_eq!(rows.len(), 40, "{rows:?}");
    for (id, error) in rows {
        match id.as_str() {
            "e17" | "e30" => {
                let e = error.unwrap_or_default();
                assert!(e.contains("no_poison"), "{id}: {e}");
            }
            _ => assert_eq!(error, None, "{id}"),
        }
    }
}
