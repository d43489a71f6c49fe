//! The application's cost, part of `make bench`
//! (`cargo bench --bench app_cost`).
//!
//! pgbench transactions/s, on a private PostgreSQL with the default
//! durability settings, of one `SELECT pgtrickle.outbox_publish('bench',
//! '<~200 B jsonb>')` per transaction, against its limit: a plain `INSERT`
//! of the same jsonb literal into an ordinary table (`bigserial` primary
//! key, `jsonb`, `timestamptz DEFAULT now()`), at 8 and 32 clients
//! (`pgbench -n -M prepared -j 2 -T BENCH_PGBENCH_SECS`, default 10 s),
//! with no relay and with the release relay following the outbox live (to
//! a file; it has caught up before each measurement starts, and is stopped
//! with SIGTERM after). Medians of
//! `BENCH_RUNS` runs (default 3), the conditions interleaved within a run.
//! `BENCH_ONLY` selects figures by name. JSON lines on stdout (see
//! benches/common/mod.rs), progress on stderr.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{emit, median, selected, Limit};
use serde_json::json;
use support::{pg_bindir, relay, temp_dir, Pg, Relay};

/// The event every transaction writes (~200 bytes of JSON).
const PAYLOAD: &str = r#"{"customer": "customer-4242", "sku": "5f0e8c1b2a3d4e5f60718293a4b5c6d7", "qty": 3, "price": 12.34, "currency": "EUR", "note": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;

/// Transactions/s of pgbench running `script` with `clients` for `secs`.
fn pgbench(pg: &Pg, db: &str, script: &std::path::Path, clients: u32, secs: u32) -> f64 {
    let out = Command::new(pg_bindir().join("pgbench"))
        .args(["-n", "-M", "prepared", "-h", "127.0.0.1", "-U", "postgres"])
        .args(["-p", &pg.port.to_string()])
        .args(["-c", &clients.to_string(), "-j", "2"])
        .args(["-T", &secs.to_string(), "-f"])
        .arg(script)
        .arg(db)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output: {text}"))
}

/// The figure name of `what` at `clients`, with or without a relay.
fn name(what: &str, clients: u32, relay: bool) -> String {
    let r = if relay { "_relay_following" } else { "" };
    format!("app_cost_{what}_{clients}_clients{r}")
}

fn main() {
    if !common::benching() {
        return;
    }
    let runs = common::runs();
    let secs: u32 = common::env_or("BENCH_PGBENCH_SECS", 10);
    let conditions: Vec<(u32, bool)> = [(8, false), (32, false), (8, true), (32, true)]
        .into_iter()
        .filter(|(c, r)| selected(&name("outbox_publish", *c, *r)))
        .collect();
    if conditions.is_empty() {
        return;
    }
    let pg = Pg::shared_durable();
    let db = "bench_app";
    let url = pg.new_db(db);
    let dir = temp_dir("bench_app");
    let mut c = pg.client(&url);
    c.batch_execute(
        "CREATE TABLE plain (id bigserial PRIMARY KEY, payload jsonb NOT NULL, \
                             created_at timestamptz NOT NULL DEFAULT now());
         SELECT pgtrickle.enable_outbox('bench');",
    )
    .unwrap();
    let file = dir.join("app.jsonl");
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('app', 'bench', 'bench', $1::text::jsonb)",
        &[&json!({"type": "stdout", "path": file}).to_string()],
    )
    .unwrap();
    let outbox_table: String = c
        .query_one(
            "SELECT outbox_table FROM pgtrickle.relay_outbox_info('bench')",
            &[],
        )
        .unwrap()
        .get(0);
    let literal = PAYLOAD.replace('\'', "''");
    let scripts = [
        (
            "plain_insert",
            format!("INSERT INTO plain (payload) VALUES ('{literal}'::jsonb);\n"),
        ),
        (
            "outbox_publish",
            format!("SELECT pgtrickle.outbox_publish('bench', '{literal}'::jsonb);\n"),
        ),
    ];
    for (what, sql) in &scripts {
        std::fs::write(dir.join(format!("{what}.sql")), sql).unwrap();
    }
    let mut tps: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for run in 0..runs {
        for relay_on in [false, true] {
            if !conditions.iter().any(|(_, r)| *r == relay_on) {
                continue;
            }
            let follower = relay_on.then(|| {
                let r = Relay::spawn(relay(&url).args(["--pipeline", "app"]));
                // Caught up: every outbox row is in the file.
                let rows: i64 = c
                    .query_one(
                        &format!("SELECT count(*) FROM pgtrickle.\"{outbox_table}\""),
                        &[],
                    )
                    .unwrap()
                    .get(0);
                let deadline = Instant::now() + Duration::from_secs(300);
                let lines = || {
                    std::fs::read(&file)
                        .map(|b| b.iter().filter(|c| **c == b'\n').count() as i64)
                        .unwrap_or(0)
                };
                while lines() < rows {
                    assert!(
                        Instant::now() < deadline,
                        "the relay did not catch up; log:\n{}",
                        r.stderr()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                r
            });
            for &(clients, _) in conditions.iter().filter(|(_, r)| *r == relay_on) {
                for (what, _) in &scripts {
                    let script = dir.join(format!("{what}.sql"));
                    let t = pgbench(pg, db, &script, clients, secs);
                    eprintln!(
                        "run {}: {what}, {clients} clients{}: {t:.0} tps",
                        run + 1,
                        if relay_on { ", relay following" } else { "" }
                    );
                    tps.entry(name(what, clients, relay_on))
                        .or_default()
                        .push(t);
                }
            }
            // Stopped as users stop it (SIGTERM), so it counts itself out
            // of the outbox's sleepers: a relay killed asleep would leave
            // the writers of the next measurement notifying.
            if let Some(mut r) = follower {
                r.signal(libc::SIGTERM);
                assert_eq!(r.wait_exit(30), Some(0), "log:\n{}", r.stderr());
            }
        }
    }
    for (clients, relay_on) in conditions {
        let params = json!({"clients": clients, "relay_following": relay_on, "seconds": secs,
                            "runs": runs, "payload_bytes": PAYLOAD.len()});
        let plain = median(&tps[&name("plain_insert", clients, relay_on)]);
        emit(
            &name("plain_insert", clients, relay_on),
            plain,
            "tps",
            None,
            params.clone(),
        );
        emit(
            &name("outbox_publish", clients, relay_on),
            median(&tps[&name("outbox_publish", clients, relay_on)]),
            "tps",
            Some(&Limit::new(plain, "plain_insert")),
            params,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
