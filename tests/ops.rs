//! Operating the relay: /metrics, /health, the systemd notify protocol, HA
//! takeover between relay instances, and secrets kept out of what it shows.

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

fn setup(db: &str) -> (String, PathBuf) {
    let pg = Pg::shared();
    let url = pg.new_db(db);
    let file = temp_dir(db).join("events.jsonl");
    pg.client(&url)
        .batch_execute("SELECT pgtrickle.enable_outbox('orders')")
        .unwrap();
    pg.client(&url)
        .execute(
            "SELECT pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb)",
            &[&serde_json::json!({"type": "stdout", "path": file}).to_string()],
        )
        .unwrap();
    (url, file)
}

/// Parse Prometheus text: every sample line is `name{labels} value`.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let kind = rest.split_whitespace().nth(1).unwrap();
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "bad TYPE line {line:?}"
                );
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line:?}"
        );
        out.insert(series.to_string(), value);
    }
    out
}

fn lines(file: &Path) -> usize {
    read_jsonl(file).len()
}

#[test]
fn metrics_count_events_and_health_reports_pipelines() {
    let (url, file) = setup("ops_metrics");
    let r = Relay::spawn(&mut relay(&url));
    publish(&url, 0, 250);
    wait_until(10, "250 events", || lines(&file) == 250);
    // The counter moves when the sink acknowledges; the batch timing and
    // the success time/lag gauges follow at the commit, one after another.
    wait_until(10, "the counter and the commit", || {
        let (code, body) = r.get("/metrics");
        let m = parse_metrics(&body);
        code == 200
            && m.get("pgtrickle_relay_messages_published_total{pipeline=\"fwd\"}") == Some(&250.0)
            && m.get("pgtrickle_relay_batch_seconds_count{pipeline=\"fwd\"}") >= Some(&1.0)
            && m.contains_key("pgtrickle_relay_last_success_timestamp_seconds{pipeline=\"fwd\"}")
    });
    let m = parse_metrics(&r.get("/metrics").1);
    assert_eq!(m["pgtrickle_relay_pipelines_owned{pipeline=\"fwd\"}"], 1.0);
    assert!(m["pgtrickle_relay_last_success_timestamp_seconds{pipeline=\"fwd\"}"] > 1.7e9);
    assert!(m.contains_key("pgtrickle_relay_lag_seconds{pipeline=\"fwd\"}"));
    assert!(m["pgtrickle_relay_batch_seconds_count{pipeline=\"fwd\"}"] >= 1.0);
    let (code, body) = r.get("/health");
    assert_eq!(code, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["pipelines"]["fwd"]["state"], "running");
    assert_eq!(h["pipelines"]["fwd"]["direction"], "forward");

    // A pipeline with a bad config turns /health to 503, naming the key.
    Pg::shared()
        .client(&url)
        .batch_execute(
            r#"SELECT pgtrickle.set_relay_outbox('broken', 'orders', 'default', '{"type":"stdout","format":"xml"}')"#,
        )
        .unwrap();
    wait_until(10, "503 for the bad config", || r.get("/health").0 == 503);
    let h: serde_json::Value = serde_json::from_str(&r.get("/health").1).unwrap();
    assert_eq!(h["pipelines"]["broken"]["state"], "bad_config");
    assert!(h["pipelines"]["broken"]["reason"]
        .as_str()
        .unwrap()
        .contains("sink.format"));
    // Deleting it makes the relay healthy again.
    Pg::shared()
        .client(&url)
        .batch_execute("SELECT pgtrickle.delete_relay('broken')")
        .unwrap();
    wait_until(10, "200 again", || r.get("/health").0 == 200);
    assert_eq!(r.get("/nope").0, 404);
}

/// Datagrams received on a NOTIFY_SOCKET of our own.
fn notifications(sock: &UnixDatagram, until: Instant) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        sock.set_read_timeout(Some(
            until
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    got
}

#[test]
fn systemd_watchdog_stops_while_a_sink_is_stalled() {
    let pg = Pg::shared();
    let url = pg.new_db("ops_watchdog");
    let mut c = pg.client(&url);
    c.batch_execute(
        r#"SELECT pgtrickle.enable_outbox('orders');
           SELECT pgtrickle.set_relay_outbox('fwd', 'orders', 'default', '{"type":"stdout"}');"#,
    )
    .unwrap();
    let dir = temp_dir("watchdog");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut cmd = relay(&url);
    cmd.args(["--stall-timeout-secs", "2", "--poll-interval-ms", "200"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "600000");
    let mut r = Relay::spawn(&mut cmd);
    let first = notifications(&sock, Instant::now() + Duration::from_secs(3));
    assert!(first.iter().any(|m| m.contains("READY=1")), "{first:?}");
    assert!(
        first.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "{first:?}"
    );
    assert!(
        first
            .iter()
            .any(|m| m.contains("STATUS=1 pipelines: 1 running")),
        "{first:?}"
    );
    // Nobody reads stdout: once the pipe is full the sink blocks.
    publish(&url, 0, 20_000);
    std::thread::sleep(Duration::from_secs(3));
    // Drop what was sent before the stall was detected, then listen.
    notifications(&sock, Instant::now() + Duration::from_millis(50));
    let stalled = notifications(&sock, Instant::now() + Duration::from_secs(2));
    assert!(
        !stalled.iter().any(|m| m.contains("WATCHDOG=1")),
        "the watchdog must stop while stalled: {stalled:?}"
    );
    let (code, body) = r.get("/health");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"stalled\":true"), "{body}");
    // Read the pipe: progress resumes, and so do the pings and /health.
    let mut out = r.child.stdout.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = lines.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(k) = out.read(&mut buf) {
            if k == 0 {
                break;
            }
            let n = buf[..k].iter().filter(|b| **b == b'\n').count();
            counted.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    });
    wait_until(20, "/health 200 after the stall", || {
        r.get("/health").0 == 200
    });
    let again = notifications(&sock, Instant::now() + Duration::from_secs(2));
    assert!(again.iter().any(|m| m.contains("WATCHDOG=1")), "{again:?}");
    // SIGTERM ends the batch at hand, not the backlog: stop once all is out.
    wait_until(60, "all 20,000 events on stdout", || {
        lines.load(std::sync::atomic::Ordering::Relaxed) == 20_000
    });
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(6), Some(0));
    let stopping = notifications(&sock, Instant::now() + Duration::from_millis(300));
    assert!(
        stopping.iter().any(|m| m.contains("STOPPING=1")),
        "{stopping:?}"
    );
    reader.join().unwrap();
    assert_eq!(lines.load(std::sync::atomic::Ordering::Relaxed), 20_000);
}

/// A relay running in its own directory: the pipeline's relative sink path
/// `events.jsonl` lands there, so each file shows what that relay wrote.
fn relay_in(url: &str, dir: &Path) -> Relay {
    std::fs::create_dir_all(dir).unwrap();
    Relay::spawn(relay(url).current_dir(dir))
}

fn dedup_keys(file: &Path) -> Vec<String> {
    read_jsonl(file)
        .iter()
        .map(|l| l["dedup_key"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn ha_takeover_after_sigkill_and_after_pg_terminate_backend() {
    let pg = Pg::shared();
    let url = pg.new_db("ops_ha");
    pg.client(&url)
        .batch_execute(
            r#"SELECT pgtrickle.enable_outbox('orders');
               SELECT pgtrickle.set_relay_outbox('fwd', 'orders', 'default',
                 '{"type":"stdout","path":"events.jsonl"}');"#,
        )
        .unwrap();
    let dir = temp_dir("ha");
    let (da, db, dc) = (dir.join("a"), dir.join("b"), dir.join("c"));
    let a = relay_in(&url, &da);
    a.wait_log("forwarding outbox", 10);
    let b = relay_in(&url, &db);
    b.wait_log("waiting for its lock", 10);
    publish(&url, 0, 100);
    wait_until(10, "100 events from the owner", || {
        lines(&da.join("events.jsonl")) == 100
    });

    // SIGKILL the owner: the standby takes over within 5 s, from the
    // committed position.
    a.signal(libc::SIGKILL);
    let killed = Instant::now();
    drop(a);
    publish(&url, 100, 100);
    wait_until(10, "the next 100 events from b", || {
        dedup_keys(&db.join("events.jsonl")).contains(&"outbox_orders:200:0".to_string())
    });
    let takeover = killed.elapsed();
    assert!(
        takeover < Duration::from_secs(5),
        "takeover took {takeover:?}"
    );
    eprintln!("HA takeover after SIGKILL, first event published: {takeover:?}");
    let mut all: std::collections::BTreeSet<String> =
        dedup_keys(&da.join("events.jsonl")).into_iter().collect();
    all.extend(dedup_keys(&db.join("events.jsonl")));
    assert_eq!(all.len(), 200, "nothing lost across the takeover");

    // Terminate the owner's PostgreSQL session while events flow: it loses
    // its lock, stops publishing, and one instance (c, or b again) owns the
    // pipeline from then on.
    let c = relay_in(&url, &dc);
    c.wait_log("waiting for its lock", 10);
    let mut admin = pg.client(&url);
    let writer = {
        let url = url.clone();
        std::thread::spawn(move || {
            for i in 0..20 {
                publish(&url, 200 + i * 50, 50);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // Every session that owns the pipeline logs "forwarding outbox" once.
    let took = |r: &Relay| r.stderr().matches("forwarding outbox").count();
    let (b_took, c_took) = (took(&b), took(&c));
    let terminated: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l \
             WHERE l.locktype = 'advisory' AND l.granted AND l.database = \
               (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(terminated, 1, "exactly one session held the pipeline lock");
    wait_until(10, "a new owner", || took(&b) > b_took || took(&c) > c_took);
    let b_len_at_takeover = lines(&db.join("events.jsonl"));
    let c_owns = took(&c) > c_took;
    writer.join().unwrap();
    let mut all: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    wait_until(15, "all 1200 events", || {
        all = [&da, &db, &dc]
            .iter()
            .flat_map(|d| dedup_keys(&d.join("events.jsonl")))
            .collect();
        all.len() == 1200
    });
    if c_owns {
        // The terminated owner published nothing after the takeover.
        assert_eq!(lines(&db.join("events.jsonl")), b_len_at_takeover);
    }
    let holders: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(holders, 1, "one owner");
}

#[test]
fn secrets_stay_out_of_logs_health_and_metrics() {
    let (url, _file) = setup("ops_secrets");
    let pg = Pg::shared();
    let mut c = pg.client(&url);
    c.batch_execute(
        r#"DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'relay_secret') THEN
               CREATE ROLE relay_secret LOGIN PASSWORD 'Pw-s3cr3t-XYZ';
             END IF;
           END $$;
           GRANT pgtrickle_relay TO relay_secret;
           SELECT pgtrickle.set_relay_outbox('leaky', 'orders', 'default',
             '{"type":"stdout","rotate_bytes":"tok-AKIAIOSFODNN7EXAMPLE-wJalrXUtnFEMI"}');"#,
    )
    .unwrap();
    let login = pg.url_as("ops_secrets", "relay_secret", "Pw-s3cr3t-XYZ");
    let r = Relay::spawn(relay(&login).arg("--log-level").arg("debug"));
    wait_until(10, "the bad config to be reported", || {
        r.get("/health").1.contains("leaky")
    });
    publish(&url, 0, 10);
    std::thread::sleep(Duration::from_millis(500));
    let shown = format!(
        "{}\n{}\n{}",
        r.stderr(),
        r.get("/health").1,
        r.get("/metrics").1
    );
    for secret in ["Pw-s3cr3t-XYZ", "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI"] {
        assert!(!shown.contains(secret), "{secret} leaked:\n{shown}");
    }
    assert!(
        shown.contains("relay_secret:***@"),
        "the masked URL is logged"
    );
}

#[test]
fn status_command_prints_a_table_and_json() {
    let (url, file) = setup("ops_status");
    publish(&url, 0, 7);
    let r = Relay::spawn(&mut relay(&url));
    wait_until(10, "7 events", || lines(&file) == 7);
    // An open transaction holds the commit horizon: 3 more events are
    // committed but wait.
    let mut holder = Pg::shared().client(&url);
    let mut tx = holder.transaction().unwrap();
    tx.execute("SELECT pg_current_xact_id()", &[]).unwrap();
    publish(&url, 7, 3);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lines(&file), 7);
    // JSON: every pipeline with direction, enabled, owner, position, lag.
    let out = std::process::Command::new(relay_bin())
        .args(["--postgres-url", &url, "status", "--json"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &v["pipelines"][0];
    assert_eq!(p["name"], "fwd");
    assert_eq!(p["direction"], "forward");
    assert_eq!(p["enabled"], true);
    assert!(
        p["owner"]
            .as_str()
            .unwrap_or("")
            .starts_with("pgtrickle-relay "),
        "{p}"
    );
    assert_eq!(p["position"]["id"], 7);
    assert_eq!(p["pending_events"], 3, "{p}");
    assert_eq!(p["dead_letters"], 0);
    // Table for humans.
    let out = std::process::Command::new(relay_bin())
        .args(["--postgres-url", &url, "status"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().next().unwrap().starts_with("NAME"), "{text}");
    assert!(text.contains("fwd") && text.contains("forward"), "{text}");
    // The relay exports who holds the horizon back.
    let m = parse_metrics(&r.get("/metrics").1);
    let backend: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    assert_eq!(
        m["pgtrickle_relay_horizon_oldest_xact_pid{pipeline=\"fwd\"}"],
        backend as f64
    );
    assert!(m["pgtrickle_relay_horizon_held_seconds{pipeline=\"fwd\"}"] > 0.0);
    tx.commit().unwrap();
    wait_until(10, "the held events after the commit", || {
        lines(&file) == 10
    });
}

#[test]
fn json_logs_carry_the_pipeline_and_fields() {
    let pg = Pg::shared();
    let url = pg.new_db("ops_jsonlog");
    pg.client(&url)
        .batch_execute(
            r#"SELECT pgtrickle.set_relay_outbox('ghost', 'no_such_outbox', 'default', '{"type":"stdout"}')"#,
        )
        .unwrap();
    let r = Relay::spawn(relay(&url).args(["--log-format", "json"]));
    r.wait_log("retrying", 10);
    let lines: Vec<serde_json::Value> = r
        .stderr()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let retry = lines
        .iter()
        .find(|l| l["message"].as_str().unwrap_or("").contains("retrying"))
        .unwrap();
    assert_eq!(retry["pipeline"], "ghost", "{retry}");
    assert_eq!(retry["level"], "error", "{retry}");
    assert!(
        retry["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("no_such_outbox"),
        "{retry}"
    );
    assert!(
        retry["fields"]["retry_ms"].as_u64().unwrap() >= 5000,
        "{retry}"
    );
}

#[test]
fn secrets_in_url_parameters_stay_out_of_logs_health_metrics_and_status() {
    let (url, _file) = setup("ops_url_secrets");
    let pg = Pg::shared();
    let mut c = pg.client(&url);
    c.batch_execute(
        r#"DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'relay_qsecret') THEN
               CREATE ROLE relay_qsecret LOGIN PASSWORD 'Qp-s3cr3t-PARAM';
             END IF;
           END $$;
           GRANT pgtrickle_relay TO relay_qsecret;"#,
    )
    .unwrap();
    // A webhook nobody listens on, its token in the query string.
    let dead = free_port();
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('hook', 'orders', 'default', $1::text::jsonb)",
        &[&serde_json::json!({
            "type": "http",
            "url": format!("http://127.0.0.1:{dead}/hook?team=a&token=${{ENV:HOOK_TOKEN}}"),
        })
        .to_string()],
    )
    .unwrap();
    publish(&url, 0, 3);
    // The password as a URL parameter, not in the userinfo.
    let login = format!(
        "{}?password=Qp-s3cr3t-PARAM&application_name=ops",
        pg.url_as("ops_url_secrets", "relay_qsecret", "x")
            .replace("relay_qsecret:x@", "relay_qsecret@")
    );
    let r = Relay::spawn(
        relay(&login)
            .env("HOOK_TOKEN", "tok-HOOK-9f8e7d")
            .args(["--pipeline", "hook"]),
    );
    wait_until(20, "the webhook failure in /health", || {
        r.get("/health").1.contains("\"last_error\"")
    });
    let status = |json: bool| {
        let mut cmd = std::process::Command::new(relay_bin());
        cmd.args(["--postgres-url", &login, "status"]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let health = r.get("/health").1;
    let shown = format!(
        "{}\n{health}\n{}\n{}\n{}",
        r.stderr(),
        r.get("/metrics").1,
        status(false),
        status(true)
    );
    for secret in ["Qp-s3cr3t-PARAM", "tok-HOOK-9f8e7d"] {
        assert!(!shown.contains(secret), "{secret} leaked:\n{shown}");
    }
    assert!(
        shown.contains("password=***"),
        "the masked PostgreSQL URL is logged:\n{shown}"
    );
    assert!(
        health.contains("token=***"),
        "the masked webhook URL is in /health:\n{health}"
    );
}

/// `pgtrickle-relay probe` against `addr`: its exit code.
fn probe(addr: &str, ready: bool) -> Option<i32> {
    let mut cmd = std::process::Command::new(relay_bin());
    cmd.args(["--metrics-addr", addr, "probe"]);
    if ready {
        cmd.arg("--ready");
    }
    cmd.output().unwrap().status.code()
}

#[test]
fn livez_and_readyz_probes_and_the_probe_command() {
    let (url, file) = setup("ops_probes");
    publish(&url, 0, 2);
    let r = Relay::spawn(&mut relay(&url));
    wait_until(10, "2 events", || lines(&file) == 2);
    assert_eq!(r.get("/livez"), (200, "ok\n".to_string()));
    wait_until(10, "ready", || r.get("/readyz").0 == 200);
    let (_, body) = r.get("/readyz");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["postgres"].clone(), v["pipelines"].clone()),
        (true.into(), 1.into())
    );
    let addr = r.http_addr();
    assert_eq!(probe(&addr, false), Some(0));
    assert_eq!(probe(&addr, true), Some(0));
    // A pipeline with a bad config makes the relay alive but not ready.
    Pg::shared()
        .client(&url)
        .batch_execute(
            r#"SELECT pgtrickle.set_relay_outbox('broken', 'orders', 'default',
                 '{"type":"stdout","no_such_key":1}')"#,
        )
        .unwrap();
    wait_until(10, "not ready", || r.get("/readyz").0 == 503);
    assert!(r.get("/readyz").1.contains("broken"));
    assert_eq!(r.get("/livez").0, 200);
    assert_eq!(probe(&addr, true), Some(1));
    assert_eq!(probe(&addr, false), Some(0));
    // Nobody listening: the probe fails.
    assert_eq!(probe(&format!("127.0.0.1:{}", free_port()), false), Some(1));
}

#[test]
fn readyz_is_503_while_postgres_is_unreachable() {
    let dead = format!("postgres://postgres@127.0.0.1:{}/nowhere", free_port());
    let r = Relay::spawn(&mut relay(&dead));
    assert_eq!(r.get("/livez").0, 200);
    let (code, body) = r.get("/readyz");
    assert_eq!(code, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["postgres"], false);
    assert_eq!(probe(&r.http_addr(), true), Some(1));
}

/// Metric names (`pgtrickle_relay_…`) in a text.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.match_indices("pgtrickle_relay_")
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn every_metric_the_grafana_dashboard_queries_is_served() {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/grafana/pgtrickle-relay.json"),
        )
        .unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut queried = std::collections::BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            queried.extend(metric_names(t["expr"].as_str().unwrap()));
        }
    }
    queried.extend(metric_names(&dash["templating"].to_string()));
    assert!(queried.len() >= 12, "{queried:?}");
    // A private server: the prepared transaction below holds every
    // database's horizon back.
    let pg = Pg::start();
    let url = pg.new_db("ops_dash");
    let file = temp_dir("ops_dash").join("events.jsonl");
    let input = temp_dir("ops_dash").join("in.jsonl");
    std::fs::write(&input, "{\"event_id\":\"e1\",\"payload\":{}}\n").unwrap();
    let mut c = pg.client(&url);
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('orders'); \
         SELECT pgtrickle.create_inbox('events'); \
         CREATE TABLE held (x int);",
    )
    .unwrap();
    for (f, args) in [
        (
            "set_relay_outbox",
            json_args(
                "fwd",
                "orders",
                serde_json::json!({"type": "stdout", "path": file}),
            ),
        ),
        (
            "set_relay_outbox",
            json_args(
                "broken_fwd",
                "no_such_outbox",
                serde_json::json!({"type": "stdout"}),
            ),
        ),
        (
            "set_relay_inbox",
            json_args(
                "rev",
                "events",
                serde_json::json!({"type": "stdin", "path": input}),
            ),
        ),
        (
            "set_relay_inbox",
            json_args(
                "broken_rev",
                "events",
                serde_json::json!({"type": "stdin", "path": input.with_extension("missing")}),
            ),
        ),
    ] {
        let sql = if f == "set_relay_outbox" {
            "SELECT pgtrickle.set_relay_outbox($1, $2, 'default', $3::text::jsonb)"
        } else {
            "SELECT pgtrickle.set_relay_inbox($1, $2, $3::text::jsonb)"
        };
        c.execute(sql, &[&args.0, &args.1, &args.2]).unwrap();
    }
    c.execute(
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 1}')",
        &[],
    )
    .unwrap();
    let r = Relay::spawn(&mut relay(&url));
    wait_until(20, "the first event", || lines(&file) == 1);
    // A prepared transaction holds the horizon: the next event waits.
    c.batch_execute("BEGIN; INSERT INTO held VALUES (1); PREPARE TRANSACTION 'ops-dash-gid';")
        .unwrap();
    c.execute(
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 2}')",
        &[],
    )
    .unwrap();
    let served = || metric_names(&r.get("/metrics").1);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(30, "every metric the dashboard queries", || {
            queried.is_subset(&served())
        })
    }));
    let m = parse_metrics(&r.get("/metrics").1);
    c.batch_execute("COMMIT PREPARED 'ops-dash-gid'").unwrap();
    if result.is_ok() {
        // The state metric names each pipeline's state, once.
        let state = |p: &str, s: &str| {
            m[&format!("pgtrickle_relay_pipeline_state{{pipeline=\"{p}\",state=\"{s}\"}}")]
        };
        assert_eq!(state("fwd", "running"), 1.0);
        assert_eq!(state("fwd", "retrying"), 0.0);
        assert_eq!(state("broken_fwd", "retrying"), 1.0);
        assert_eq!(state("broken_fwd", "running"), 0.0);
    }
    if result.is_err() {
        let missing: Vec<_> = queried.difference(&served()).cloned().collect();
        panic!("the dashboard queries metrics /metrics does not serve: {missing:?}");
    }
    wait_until(20, "the held event", || lines(&file) == 2);
}

fn json_args(name: &str, target: &str, cfg: serde_json::Value) -> (String, String, String) {
    (name.to_string(), target.to_string(), cfg.to_string())
}

/// PostgreSQL answering the relay's first read of its catalog with a
/// transient error (here a statement timeout while the catalog is locked;
/// in the fault run, a restart) is a warning, not an ERROR asking whether
/// the SQL is installed: the catalog is read again and the pipeline starts.
#[test]
fn a_transient_error_reading_the_catalog_at_start_is_a_warning_and_the_pipeline_starts() {
    let dir = temp_dir("catalog_transient");
    let file = dir.join("out.jsonl");
    let url = outbox_pipeline(
        "catalog_transient",
        &serde_json::json!({"type": "stdout", "path": file}),
    );
    publish(&url, 0, 3);
    let mut admin = Pg::shared().client(&url);
    admin
        .batch_execute("ALTER DATABASE catalog_transient SET statement_timeout = '300ms'")
        .unwrap();
    let mut locker = Pg::shared().client(&url);
    locker
        .batch_execute("BEGIN; LOCK TABLE pgtrickle.relay_outbox_config IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let r = Relay::spawn(relay(&url).args(["--discovery-interval-secs", "1"]));
    r.wait_log("reading the relay catalog", 30);
    locker.batch_execute("COMMIT").unwrap();
    admin
        .batch_execute("ALTER DATABASE catalog_transient RESET statement_timeout")
        .unwrap();
    wait_until(30, "the pipeline to deliver", || lines(&file) == 3);
    let log = r.stderr();
    assert!(
        !log.contains("ERROR") && !log.contains("is the SQL installed"),
        "{log}"
    );
}
