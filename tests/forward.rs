//! Forward mode end to end: outbox → relay binary → file/stdout, against a
//! real PostgreSQL.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// A database with the SQL installed, an outbox `orders`, and a pipeline
/// `name` writing to a file; returns (url, file).
fn setup(db: &str, sink_extra: &str) -> (String, PathBuf) {
    let pg = Pg::shared();
    let url = pg.new_db(db);
    let dir = temp_dir(db);
    let file = dir.join("events.jsonl");
    let sink = format!(
        r#"{{"type":"stdout","path":"{}"{sink_extra}}}"#,
        file.display()
    );
    let mut c = pg.client(&url);
    c.batch_execute(&format!(
        "SELECT pgtrickle.enable_outbox('orders');
         SELECT pgtrickle.set_relay_outbox('fwd', 'orders', 'default', '{sink}');"
    ))
    .unwrap();
    (url, file)
}

fn run_once(url: &str) -> std::process::Output {
    relay(url)
        .args(["--once", "--pipeline", "fwd"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The `n` of every event, and the dedup key of every line.
fn ns_and_keys(lines: &[Value]) -> (Vec<i64>, Vec<String>) {
    let ns = lines
        .iter()
        .map(|l| l["payload"]["n"].as_i64().unwrap())
        .collect();
    let keys = lines
        .iter()
        .map(|l| l["dedup_key"].as_str().unwrap().to_string())
        .collect();
    (ns, keys)
}

/// Every `n` in `0..n` present; any repeat has the same dedup key as the
/// first delivery of that n.
fn assert_complete(lines: &[Value], n: i64) {
    let mut key_of: BTreeMap<i64, String> = BTreeMap::new();
    for l in lines {
        let v = l["payload"]["n"].as_i64().unwrap();
        let k = l["dedup_key"].as_str().unwrap().to_string();
        let first = key_of.entry(v).or_insert_with(|| k.clone());
        assert_eq!(*first, k, "event n={v} repeated with another dedup key");
    }
    let missing: Vec<i64> = (0..n).filter(|i| !key_of.contains_key(i)).collect();
    assert!(missing.is_empty(), "missing events: {missing:?}");
    assert_eq!(key_of.len() as i64, n);
}

#[test]
fn once_delivers_inline_events_in_order_and_commits() {
    let (url, file) = setup("fwd_once", "");
    publish(&url, 0, 50);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.is_empty(),
        "stdout must stay empty with a file sink"
    );
    let lines = read_jsonl(&file);
    let (ns, keys) = ns_and_keys(&lines);
    assert_eq!(ns, (0..50).collect::<Vec<_>>());
    assert_eq!(keys[0], "outbox_orders:1:0");
    assert_eq!(lines[0]["subject"], "pgtrickle.orders.insert");
    assert_eq!(lines[0]["op"], "insert");
    assert_eq!(lines[0]["is_full_refresh"], false);
    assert_eq!(lines[0]["outbox_id"], 1);
    // A second run finds nothing new: the offset was committed.
    publish(&url, 50, 5);
    assert!(run_once(&url).status.success());
    let (ns, _) = ns_and_keys(&read_jsonl(&file));
    assert_eq!(ns, (0..55).collect::<Vec<_>>());
}

#[test]
fn claim_check_and_full_refresh_deltas_are_decoded() {
    let (url, file) = setup(
        "fwd_claim",
        r#","subject":"t.{stream_table}.{op}.{outbox_id}""#,
    );
    let mut c = Pg::shared().client(&url);
    // Inline delta with deletes and a full refresh flag.
    c.batch_execute(
        "SELECT pgtrickle.outbox_publish_delta('orders', '[{\"n\":1},{\"n\":2}]', '[{\"n\":0}]', true);
         SET pgtrickle.outbox_inline_threshold = 100;
         SELECT pgtrickle.outbox_publish_delta('orders',
            (SELECT jsonb_agg(jsonb_build_object('n', g)) FROM generate_series(10, 259) g),
            (SELECT jsonb_agg(jsonb_build_object('n', g)) FROM generate_series(3, 5) g));
         RESET pgtrickle.outbox_inline_threshold;
         SELECT pgtrickle.outbox_publish_delta('orders', '[{\"n\":300}]');",
    )
    .unwrap();
    let claim: bool = c
        .query_one(
            "SELECT is_claim_check FROM pgtrickle.outbox_orders WHERE id = 2",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(claim, "the second delta must be stored as a claim-check");
    let out = relay(&url)
        .args(["--once", "--batch-size", "64"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = read_jsonl(&file);
    assert_eq!(lines.len(), 3 + 253 + 1);
    // The row after the claim-check, in the same read, comes once, after it.
    let after = lines.pop().unwrap();
    assert_eq!(
        (&after["outbox_id"], &after["payload"]["n"]),
        (&3.into(), &300.into())
    );
    // Inline: deletes first, the full refresh flag on every event.
    assert_eq!(lines[0]["op"], "delete");
    assert_eq!(lines[0]["payload"]["n"], 0);
    assert_eq!(lines[0]["subject"], "t.orders.delete.1");
    assert!(lines[..3].iter().all(|l| l["is_full_refresh"] == true));
    // Claim-check: every row once, in row_num order, keyed by row_num.
    let cc = &lines[3..];
    assert!(cc
        .iter()
        .all(|l| l["outbox_id"] == 2 && l["is_full_refresh"] == false));
    let keys: BTreeSet<&str> = cc
        .iter()
        .map(|l| l["dedup_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 253);
    assert_eq!(cc[0]["op"], "delete");
    assert_eq!(cc[3]["op"], "insert");
    let ns: Vec<i64> = cc
        .iter()
        .map(|l| l["payload"]["n"].as_i64().unwrap())
        .collect();
    let mut want: Vec<i64> = (3..=5).collect();
    want.extend(10..=259);
    assert_eq!(ns, want);
    // The relay told the outbox the claim-check was consumed.
    let drained: Option<i64> = c
        .query_one(
            "SELECT last_drained_count FROM pgtrickle.pgt_outbox_config WHERE stream_table_name = 'orders'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(drained, Some(253));
}

#[test]
fn unknown_payload_version_is_an_error_naming_pipeline_and_id() {
    let (url, file) = setup("fwd_badver", "");
    publish(&url, 0, 2);
    Pg::shared()
        .client(&url)
        .batch_execute(
            "INSERT INTO pgtrickle.outbox_orders (inserted_count, deleted_count, payload)
             VALUES (1, 0, '{\"v\": 2, \"rows\": []}');",
        )
        .unwrap();
    publish(&url, 2, 1);
    let out = run_once(&url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("\"fwd\"") && stderr.contains("id 3") && stderr.contains("v=2"),
        "{stderr}"
    );
    // Nothing after the bad row was skipped past it.
    let (ns, _) = ns_and_keys(&read_jsonl(&file));
    assert_eq!(ns, vec![0, 1]);
}

#[test]
fn stdout_sink_and_a_closed_pipe() {
    let pg = Pg::shared();
    let url = pg.new_db("fwd_stdout");
    let mut c = pg.client(&url);
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('orders');
         SELECT pgtrickle.set_relay_outbox('fwd', 'orders', 'default', '{\"type\":\"stdout\"}');",
    )
    .unwrap();
    publish(&url, 0, 3);
    let out = run_once(&url);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.lines().count(),
        3,
        "stdout carries events only: {text}"
    );
    for l in text.lines() {
        serde_json::from_str::<Value>(l).unwrap();
    }
    // `relay | head -1` in daemon mode: the relay ends cleanly (exit 0)
    // when its stdout closes.
    publish(&url, 3, 20_000);
    let mut child = relay(&url)
        .args(["--pipeline", "fwd"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    drop(stdout);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "relay did not end when stdout closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn csv_format_and_rotation() {
    let (url, file) = setup("fwd_csv", r#","format":"csv","rotate_bytes":2000"#);
    publish(&url, 0, 100);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = file.parent().unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() > 2, "expected rotated files, got {files:?}");
    let mut rows = 0;
    for f in &files {
        let size = std::fs::metadata(f).unwrap().len();
        let mut r = csv::Reader::from_path(f).unwrap();
        assert_eq!(
            r.headers().unwrap().iter().next(),
            Some("dedup_key"),
            "each file starts with a header: {f:?}"
        );
        rows += r.records().count();
        if f != &file {
            assert!((2000..2400).contains(&size), "{f:?} is {size} bytes");
        }
    }
    assert_eq!(rows, 100);
}

#[test]
fn concurrent_writers_committing_out_of_id_order_lose_nothing() {
    let (url, file) = setup("fwd_concurrent", "");
    let mut relay = Relay::spawn(relay(&url).args(["--poll-interval-ms", "200"]));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut c = Pg::shared().client(&url);
                for i in 0..50i64 {
                    let n = w * 50 + i;
                    let mut tx = c.transaction().unwrap();
                    tx.execute(
                        "SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('n', $1::bigint))",
                        &[&n],
                    )
                    .unwrap();
                    // Hold the transaction open a little, so later ids commit first.
                    std::thread::sleep(Duration::from_millis(((n * 7919) % 13) as u64));
                    tx.commit().unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    wait_until(30, "all 400 events", || read_jsonl(&file).len() >= 400);
    std::thread::sleep(Duration::from_millis(300));
    let lines = read_jsonl(&file);
    assert_complete(&lines, 400);
    assert_eq!(
        lines.len(),
        400,
        "no duplicates without a crash:\n{}",
        relay.stderr()
    );
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(5), Some(0));
}

#[test]
fn sigkill_mid_stream_then_restart_delivers_everything() {
    let (url, file) = setup("fwd_sigkill", r#","batch_size":100"#);
    publish(&url, 0, 30_000);
    let r = Relay::spawn(relay(&url).args(["--batch-size", "100"]));
    wait_until(20, "some events", || read_jsonl(&file).len() > 2_000);
    r.signal(libc::SIGKILL);
    drop(r);
    let partial = read_jsonl(&file).len();
    assert!(partial < 30_000, "the kill came too late to test anything");
    publish(&url, 30_000, 100);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_complete(&read_jsonl(&file), 30_100);
}

#[test]
fn postgres_restart_mid_stream_loses_nothing() {
    let mut pg = Pg::start();
    let url = pg.new_db("fwd_pgrestart");
    let dir = temp_dir("pgrestart");
    let file = dir.join("events.jsonl");
    let mut c = pg.client(&url);
    c.batch_execute(&format!(
        "SELECT pgtrickle.enable_outbox('orders');
         SELECT pgtrickle.set_relay_outbox('fwd', 'orders', 'default',
            '{{\"type\":\"stdout\",\"path\":\"{}\",\"batch_size\":50}}');",
        file.display()
    ))
    .unwrap();
    drop(c);
    let insert = |pg: &Pg, from: i64, n: i64| {
        pg.client(&url)
            .execute(
                "SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('n', g)) \
                 FROM generate_series($1::bigint, $2::bigint) g",
                &[&from, &(from + n - 1)],
            )
            .unwrap();
    };
    insert(&pg, 0, 20_000);
    let mut r = Relay::spawn(&mut relay(&url));
    wait_until(20, "some events", || read_jsonl(&file).len() > 500);
    pg.restart();
    insert(&pg, 20_000, 500);
    wait_until(60, "every event after the restart", || {
        let lines = read_jsonl(&file);
        let ns: BTreeSet<i64> = lines
            .iter()
            .map(|l| l["payload"]["n"].as_i64().unwrap())
            .collect();
        ns.len() == 20_500
    });
    assert_complete(&read_jsonl(&file), 20_500);
    assert!(
        r.stderr().contains("retrying"),
        "the relay should have noticed the restart:\n{}",
        r.stderr()
    );
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(5), Some(0));
}

#[test]
fn sigterm_finishes_cleanly_and_commits_what_was_written() {
    let (url, file) = setup("fwd_sigterm", r#","batch_size":200"#);
    publish(&url, 0, 50_000);
    let mut r = Relay::spawn(&mut relay(&url));
    wait_until(20, "some events", || read_jsonl(&file).len() > 1_000);
    let t = Instant::now();
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(6), Some(0), "{}", r.stderr());
    assert!(t.elapsed() < Duration::from_secs(5));
    let written = read_jsonl(&file).len();
    // The committed offset covers exactly what reached the file: a second
    // run continues without a gap or a repeat.
    let out = run_once(&url);
    assert!(out.status.success());
    let lines = read_jsonl(&file);
    assert_complete(&lines, 50_000);
    assert_eq!(
        lines.len(),
        50_000,
        "a clean stop must not replay (had {written} before)"
    );
}

fn file_ns(file: &Path) -> BTreeSet<i64> {
    read_jsonl(file)
        .iter()
        .map(|l| l["payload"]["n"].as_i64().unwrap())
        .collect()
}

#[test]
fn hot_reload_creates_disables_and_changes_pipelines() {
    let pg = Pg::shared();
    let url = pg.new_db("fwd_reload");
    let dir = temp_dir("reload");
    let (a, b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    let mut c = pg.client(&url);
    c.batch_execute("SELECT pgtrickle.enable_outbox('orders');")
        .unwrap();
    // Long discovery interval: only notifications can explain reactions.
    let r = Relay::spawn(relay(&url).args(["--discovery-interval-secs", "3600"]));
    r.wait_log("relay running", 10);
    let set = |c: &mut postgres::Client, path: &Path| {
        c.execute(
            "SELECT pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb)",
            &[&serde_json::json!({"type": "stdout", "path": path}).to_string()],
        )
        .unwrap();
    };
    // Create.
    set(&mut c, &a);
    publish(&url, 0, 5);
    wait_until(10, "events in a", || file_ns(&a).len() == 5);
    // Disable: new events stay in the outbox.
    c.batch_execute("SELECT pgtrickle.disable_relay('fwd')")
        .unwrap();
    r.wait_log("disabled or deleted", 10);
    publish(&url, 5, 5);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(file_ns(&a).len(), 5);
    // Change the sink while disabled, then enable: continues from the offset into b.
    set(&mut c, &b);
    c.batch_execute("SELECT pgtrickle.enable_relay('fwd')")
        .unwrap();
    wait_until(10, "the rest in b", || file_ns(&b).len() == 5);
    assert_eq!(file_ns(&b), (5..10).collect());
    // Change while running.
    set(&mut c, &a);
    r.wait_log("changed; restarting", 10);
    publish(&url, 10, 1);
    wait_until(10, "n=10 in a", || file_ns(&a).contains(&10));
    // Delete.
    c.batch_execute("SELECT pgtrickle.delete_relay('fwd')")
        .unwrap();
    wait_until(10, "a stop after delete", || {
        r.stderr().matches("disabled or deleted").count() >= 2
    });
}

#[test]
fn bad_config_is_named_and_other_pipelines_run() {
    let (url, file) = setup("fwd_badcfg", "");
    let mut c = Pg::shared().client(&url);
    c.batch_execute(
        r#"SELECT pgtrickle.set_relay_outbox('broken', 'orders', 'default', '{"type":"stdout","rotate_bytes":"big","path":"/tmp/x"}');
           SELECT pgtrickle.set_relay_outbox('unknown', 'orders', 'default', '{"type":"carrier-pigeon"}');"#,
    )
    .unwrap();
    publish(&url, 0, 3);
    let out = relay(&url).arg("--once").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "bad configs make --once fail: {stderr}"
    );
    assert!(
        stderr.contains("pipeline \"broken\"") && stderr.contains("sink.rotate_bytes"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pipeline \"unknown\"")
            && stderr.contains("sink.type")
            && stderr.contains("carrier-pigeon"),
        "{stderr}"
    );
    assert_eq!(file_ns(&file).len(), 3, "the good pipeline ran");
}

#[test]
fn runs_as_a_login_role_that_is_only_a_member_of_pgtrickle_relay() {
    let (url, file) = setup("fwd_role", "");
    let pg = Pg::shared();
    let mut c = pg.client(&url);
    c.batch_execute(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'relay_login') THEN
             CREATE ROLE relay_login LOGIN PASSWORD 'pw';
           END IF;
         END $$;
         GRANT pgtrickle_relay TO relay_login;",
    )
    .unwrap();
    publish(&url, 0, 10);
    let db = url.rsplit('/').next().unwrap();
    let login = pg.url_as(db, "relay_login", "pw");
    let out = relay(&login)
        .args(["--once", "--pipeline", "fwd"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(file_ns(&file).len(), 10);
    // The password never shows in the log.
    assert!(!String::from_utf8_lossy(&out.stderr).contains(":pw@"));
}

#[test]
fn consumer_group_shared_by_two_relays_delivers_each_event_once() {
    let pg = Pg::shared();
    let url = pg.new_db("fwd_group");
    let dir = temp_dir("group");
    let mut c = pg.client(&url);
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('orders');
         SELECT pgtrickle.create_consumer_group('workers', 'orders', 'earliest');",
    )
    .unwrap();
    // Two relays (separate relay groups, each its own file) share the consumer group.
    let files = [dir.join("r1.jsonl"), dir.join("r2.jsonl")];
    for (i, f) in files.iter().enumerate() {
        c.execute(
            "SELECT pgtrickle.set_relay_outbox($1, 'orders', 'workers', $2::text::jsonb)",
            &[
                &format!("fwd{i}"),
                &serde_json::json!({"type":"stdout","path": f,"batch_size":50}).to_string(),
            ],
        )
        .unwrap();
    }
    publish(&url, 0, 2_000);
    let r1 = Relay::spawn(relay(&url).args(["--pipeline", "fwd0"]));
    let r2 = Relay::spawn(relay(&url).args(["--pipeline", "fwd1"]));
    let all = || {
        let mut v = read_jsonl(&files[0]);
        v.extend(read_jsonl(&files[1]));
        v
    };
    wait_until(30, "2000 events across both relays", || {
        all().len() >= 2_000
    });
    std::thread::sleep(Duration::from_millis(300));
    let lines = all();
    assert_complete(&lines, 2_000);
    assert_eq!(lines.len(), 2_000, "each event exactly once");
    assert!(
        !read_jsonl(&files[0]).is_empty() && !read_jsonl(&files[1]).is_empty(),
        "both relays took a share"
    );
    drop(r1);
    drop(r2);
}

#[test]
fn consumer_group_lease_of_a_killed_relay_passes_to_the_other() {
    let pg = Pg::shared();
    let url = pg.new_db("fwd_lease");
    let dir = temp_dir("lease");
    let mut c = pg.client(&url);
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('orders');
         SELECT pgtrickle.create_consumer_group('workers', 'orders', 'earliest');",
    )
    .unwrap();
    publish(&url, 0, 100);
    // A consumer that leases a batch and dies without committing.
    c.batch_execute("SELECT count(*) FROM pgtrickle.poll_outbox('workers', 'dead-relay', 40, 2)")
        .unwrap();
    let file = dir.join("live.jsonl");
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('live', 'orders', 'workers', $1::text::jsonb)",
        &[&serde_json::json!({"type":"stdout","path": file}).to_string()],
    )
    .unwrap();
    let r = Relay::spawn(relay(&url).args(["--poll-interval-ms", "200"]));
    wait_until(30, "all 100 events after the lease expired", || {
        file_ns(&file).len() == 100
    });
    assert_complete(&read_jsonl(&file), 100);
    drop(r);
}

#[test]
fn pipeline_flag_runs_only_the_named_pipelines() {
    let (url, file) = setup("fwd_only", "");
    let other = file.with_file_name("other.jsonl");
    Pg::shared()
        .client(&url)
        .execute(
            "SELECT pgtrickle.set_relay_outbox('other', 'orders', 'default', $1::text::jsonb)",
            &[&serde_json::json!({"type": "stdout", "path": other}).to_string()],
        )
        .unwrap();
    publish(&url, 0, 4);
    assert!(run_once(&url).status.success());
    assert_eq!(file_ns(&file).len(), 4);
    assert!(
        file_ns(&other).is_empty(),
        "--pipeline fwd must not run 'other'"
    );
    // A name that is not in the catalog is an error for --once.
    let out = relay(&url)
        .args(["--once", "--pipeline", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no enabled pipeline named \"nope\""));
}

/// Change the catalog without the notify trigger, as a lost notification.
fn silent_set(url: &str, path: &Path) {
    let mut c = Pg::shared().client(url);
    c.batch_execute(&format!(
        "BEGIN;
         ALTER TABLE pgtrickle.relay_outbox_config DISABLE TRIGGER USER;
         SELECT pgtrickle.set_relay_outbox('fwd', 'orders', 'default', '{{\"type\":\"stdout\",\"path\":\"{}\"}}');
         ALTER TABLE pgtrickle.relay_outbox_config ENABLE TRIGGER USER;
         COMMIT;",
        path.display()
    ))
    .unwrap();
}

#[test]
fn lost_notifications_are_caught_by_the_periodic_reread_and_sighup() {
    let pg = Pg::shared();
    let url = pg.new_db("fwd_reread");
    let dir = temp_dir("reread");
    pg.client(&url)
        .batch_execute("SELECT pgtrickle.enable_outbox('orders');")
        .unwrap();
    publish(&url, 0, 3);
    // Periodic re-read.
    let a = dir.join("a.jsonl");
    let r = Relay::spawn(relay(&url).args(["--discovery-interval-secs", "1"]));
    r.wait_log("relay running", 10);
    silent_set(&url, &a);
    wait_until(10, "the re-read to start the pipeline", || {
        file_ns(&a).len() == 3
    });
    drop(r);
    // SIGHUP, with a re-read interval too long to matter.
    pg.client(&url)
        .batch_execute("SELECT pgtrickle.delete_relay('fwd')")
        .unwrap();
    let b = dir.join("b.jsonl");
    let r = Relay::spawn(relay(&url).args(["--discovery-interval-secs", "3600"]));
    r.wait_log("relay running", 10);
    silent_set(&url, &b);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        file_ns(&b).is_empty(),
        "nothing may notice the change before SIGHUP"
    );
    r.signal(libc::SIGHUP);
    wait_until(10, "SIGHUP to start the pipeline", || {
        file_ns(&b) == (0..3).collect()
    });
}

#[test]
fn long_outbox_names_render_the_full_stream_table_name() {
    let pg = Pg::shared();
    let url = pg.new_db("fwd_longname");
    let file = temp_dir("longname").join("events.jsonl");
    let name = "a_stream_table_with_a_rather_long_name_that_does_not_fit_in_63_bytes";
    let mut c = pg.client(&url);
    let table: String = c
        .query_one("SELECT pgtrickle.enable_outbox($1)", &[&name])
        .unwrap()
        .get(0);
    assert!(
        table.len() <= 63 && table != format!("outbox_{name}"),
        "{table}"
    );
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('fwd', $1, 'default', $2::text::jsonb)",
        &[
            &name,
            &serde_json::json!({"type": "stdout", "path": file}).to_string(),
        ],
    )
    .unwrap();
    c.execute(
        "SELECT pgtrickle.outbox_publish($1, '{\"n\": 0}')",
        &[&name],
    )
    .unwrap();
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = read_jsonl(&file);
    assert_eq!(lines[0]["subject"], format!("pgtrickle.{name}.insert"));
    assert_eq!(lines[0]["dedup_key"], format!("{table}:1:0"));
}

/// The rotation index of `<file>.<n>` (None: not a rotated file of `file`).
fn rotation_of(file: &Path, other: &Path) -> Option<u64> {
    let name = file.file_name()?.to_str()?;
    other
        .file_name()?
        .to_str()?
        .strip_prefix(name)?
        .strip_prefix('.')?
        .parse()
        .ok()
}

/// The rotated files of `file`, oldest first, then `file` itself.
fn csv_files(file: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(u64, PathBuf)> = std::fs::read_dir(file.parent().unwrap())
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            rotation_of(file, &p).map(|n| (n, p))
        })
        .collect();
    rotated.sort();
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    files.push(file.to_path_buf());
    files
}

/// Every record of a CSV sink's files as (n, dedup key), each file parsed
/// strictly: the header first, then records of 8 fields. An empty file
/// (a kill just after a rotation created it) holds no records.
fn csv_records(file: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for f in csv_files(file) {
        if std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0) == 0 {
            continue;
        }
        let mut r = csv::Reader::from_path(&f).unwrap();
        assert_eq!(
            r.headers().unwrap().iter().collect::<Vec<_>>(),
            [
                "dedup_key",
                "subject",
                "op",
                "outbox_id",
                "refresh_id",
                "is_full_refresh",
                "payload",
                "headers"
            ],
            "{f:?}"
        );
        for rec in r.records() {
            let rec = rec.unwrap_or_else(|e| panic!("{f:?}: {e}"));
            assert_eq!(rec.len(), 8, "{f:?}: {rec:?}");
            out.push(serde_json::json!({
                "dedup_key": &rec[0],
                "payload": serde_json::from_str::<Value>(&rec[6]).unwrap(),
            }));
        }
    }
    out
}

#[test]
fn csv_sigkill_and_a_torn_first_write_after_rotation_lose_nothing() {
    let (url, file) = setup(
        "fwd_csv_kill",
        r#","format":"csv","rotate_bytes":200000,"batch_size":100"#,
    );
    publish(&url, 0, 20_000);
    let r = Relay::spawn(relay(&url).args(["--batch-size", "100"]));
    wait_until(30, "three rotated files", || csv_files(&file).len() > 3);
    r.signal(libc::SIGKILL);
    drop(r);
    // A record torn by the kill was never committed: drop it, as if the
    // kill had come just before it.
    let bytes = std::fs::read(&file).unwrap();
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    std::fs::write(&file, &bytes[..whole]).unwrap();
    let rotated = csv_files(&file);
    assert!(
        csv_records(&file).len() < 20_000,
        "the kill came too late to test anything"
    );
    // The state a crash leaves during the first write after a rotation:
    // the full file renamed, the new one holding the start of its header.
    // (If the kill itself came just after a rotation, the current file is
    // empty and the full one is already renamed.)
    if whole > 0 {
        let next = rotated.len() as u64;
        let renamed = PathBuf::from(format!("{}.{next}", file.display()));
        std::fs::rename(&file, &renamed).unwrap();
    }
    std::fs::write(&file, "dedup_key,subj").unwrap();
    publish(&url, 20_000, 100);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_complete(&csv_records(&file), 20_100);
}

#[test]
fn subjects_route_by_payload_content_and_an_event_without_the_field_is_a_dead_letter() {
    let (url, file) = setup("fwd_route", r#","subject":"t.{payload.tenant}.{op}""#);
    publish_tenants(&url, 10);
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = read_jsonl(&file);
    assert_eq!(lines.len(), 10, "the event without a tenant is not written");
    for l in &lines {
        let tenant = if l["payload"]["n"].as_i64().unwrap() % 2 == 0 {
            "a"
        } else {
            "b"
        };
        assert_eq!(l["subject"], format!("t.{tenant}.insert"), "{l}");
    }
    let dead = dead_letter_reasons(&url);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, "outbox_orders:11:0");
    assert!(
        dead[0].1.contains("payload.tenant") && dead[0].1.contains("t.{payload.tenant}.{op}"),
        "{dead:?}"
    );
    // A default routes it instead.
    let (url, file) = setup(
        "fwd_route_default",
        r#","subject":"t.{payload.tenant|shared}""#,
    );
    publish_tenants(&url, 2);
    assert!(run_once(&url).status.success());
    let subjects: Vec<String> = read_jsonl(&file)
        .iter()
        .map(|l| l["subject"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(subjects, ["t.a", "t.b", "t.shared"]);
    assert!(dead_letter_reasons(&url).is_empty());
}

/// A read asks for as many rows as a batch needs if they are as narrow as
/// the last read's; when wider rows follow, the read stops at the batch and
/// drops what streamed in after it, and the next read takes those rows.
#[test]
fn rows_wider_than_the_last_read_expected_are_read_again_after_the_batch_not_lost() {
    let (url, file) = setup("fwd_wider", r#","batch_size":10"#);
    Pg::shared()
        .client(&url)
        .batch_execute(
            "SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('n', g))
               FROM generate_series(0, 14) g;
             SELECT pgtrickle.outbox_publish_delta('orders',
                      (SELECT jsonb_agg(jsonb_build_object('n', g))
                         FROM generate_series(15 + b * 10, 24 + b * 10) g))
               FROM generate_series(0, 4) b;",
        )
        .unwrap();
    let out = run_once(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ns, keys) = ns_and_keys(&read_jsonl(&file));
    assert_eq!(ns, (0..65).collect::<Vec<_>>(), "each event once, in order");
    assert_eq!(keys.iter().collect::<BTreeSet<_>>().len(), 65);
}
