//! The relay's PostgreSQL sessions: TCP keepalives on both ends,
//! notifications that must not pile up while a backlog is worked off,
//! outboxes without NOTIFY for two-phase commit, and prepared transactions
//! named when they hold the commit horizon.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// Seconds in an `ss` timer. iproute2 prints minutes, seconds and
/// milliseconds: `119min`, `4min43sec`, `10sec`, `7.284ms` (7 s 284 ms),
/// `208ms`.
fn timer_seconds(t: &str) -> f64 {
    let (mut total, mut num) = (0.0, String::new());
    let mut rest = t;
    while let Some(c) = rest.chars().next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            rest = &rest[1..];
            continue;
        }
        let unit: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect();
        rest = &rest[unit.len()..];
        total += match (unit.as_str(), num.split_once('.')) {
            ("min", None) => num.parse::<f64>().unwrap() * 60.0,
            ("sec", None) => num.parse::<f64>().unwrap(),
            ("ms", None) => num.parse::<f64>().unwrap() / 1000.0,
            ("ms", Some((s, ms))) => {
                s.parse::<f64>().unwrap() + ms.parse::<f64>().unwrap() / 1000.0
            }
            _ => panic!("cannot read the ss timer {t:?}"),
        };
        num.clear();
    }
    total
}

/// Established TCP connections as (local port, peer port, keepalive timer
/// in seconds if one runs), from `ss`.
fn tcp_connections() -> Vec<(u16, u16, Option<f64>)> {
    let out = Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .output()
        .expect("ss (iproute2) is needed by this test");
    let port = |a: &str| a.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 {
                return None;
            }
            let keepalive = l
                .split("timer:(keepalive,")
                .nth(1)
                .map(|t| timer_seconds(t.split(',').next().unwrap()));
            Some((port(f[2]), port(f[3]), keepalive))
        })
        .collect()
}

/// The local ports of the relay's (pid's) TCP sockets to `pg_port`, from
/// /proc: the inode of each of its socket fds, looked up in /proc/net/tcp.
fn relay_ports(pid: u32, pg_port: u16) -> BTreeSet<u16> {
    let inodes: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let l = std::fs::read_link(e.ok()?.path()).ok()?;
            let s = l.to_str()?;
            Some(
                s.strip_prefix("socket:[")?
                    .trim_end_matches(']')
                    .to_string(),
            )
        })
        .collect();
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    tcp.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()?;
            let peer = u16::from_str_radix(f[2].rsplit(':').next()?, 16).ok()?;
            (peer == pg_port && inodes.contains(f[9])).then_some(local)
        })
        .collect()
}

#[test]
fn every_session_has_short_tcp_keepalives_on_both_ends() {
    let pg = Pg::shared();
    let url = outbox_pipeline(
        "ses_keepalive",
        &json!({"type": "stdout", "path": "/dev/null"}),
    );
    let r = Relay::spawn(&mut relay(&url));
    r.wait_log("forwarding outbox", 20);
    let pid = r.child.id();
    // The coordinator's session and the pipeline's: both ends of each must
    // probe a silent peer within 10 s, not after the 2-hour default.
    let mut seen = String::new();
    wait_until(
        20,
        "keepalive timers of at most 10 s on every relay session",
        || {
            let ports = relay_ports(pid, pg.port);
            let conns = tcp_connections();
            let ends: Vec<(u16, u16, Option<f64>)> = conns
                .iter()
                .filter(|(l, p, _)| {
                    (*p == pg.port && ports.contains(l)) || (*l == pg.port && ports.contains(p))
                })
                .cloned()
                .collect();
            seen = format!("relay ports {ports:?}: {ends:?}");
            ports.len() >= 2
                && ends.len() == 2 * ports.len()
                && ends.iter().all(|(_, _, k)| k.is_some_and(|s| s <= 10.0))
        },
    );
    eprintln!("{seen}");
}

#[test]
fn notifications_do_not_pile_up_while_a_backlog_is_worked_off() {
    let pg = Pg::shared();
    let url = pg.new_db("ses_pile");
    let file = temp_dir("ses_pile").join("events.jsonl");
    pg.client(&url)
        .execute(
            "SELECT pgtrickle.enable_outbox('orders'), \
             pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb)",
            &[&json!({"type": "stdout", "path": file, "batch_size": 2}).to_string()],
        )
        .unwrap();
    const EVENTS: usize = 10_000;
    let r = Relay::spawn(&mut relay(&url));
    // 12,000 notifications of ~8 KB (~96 MB), one per transaction as
    // writers send them, from 4 writers, while the relay works off a
    // backlog. On a loaded machine the relay may finish the backlog before
    // the writers are done, which proves nothing: then another round, with
    // a new backlog.
    let mut rounds = 0;
    loop {
        publish(&url, (rounds * EVENTS) as i64, EVENTS as i64);
        let before = rounds * EVENTS;
        rounds += 1;
        wait_until(30, "the backlog started", || count_lines(&file) > before);
        let started = Instant::now();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let url = url.clone();
                std::thread::spawn(move || {
                    let mut c = Pg::shared().client(&url);
                    let notify = c
                        .prepare(
                            "SELECT pg_notify('pgtrickle_outbox_new', $1::int || repeat('x', 7900))",
                        )
                        .unwrap();
                    for i in 0..3_000 {
                        c.execute(&notify, &[&(w * 3_000 + i)]).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let relayed = count_lines(&file) - before;
        eprintln!(
            "round {rounds}: 12,000 notifications sent in {:?}, {relayed} events relayed meanwhile",
            started.elapsed()
        );
        if relayed < EVENTS {
            break;
        }
        assert!(
            rounds < 3,
            "in each of {rounds} rounds the backlog was done before the notifications were \
             sent: the test proves nothing"
        );
    }
    let total = rounds * EVENTS;
    wait_until(300, "the whole backlog", || count_lines(&file) >= total);
    assert_eq!(read_jsonl(&file).len(), total);
    let status = std::fs::read_to_string(format!("/proc/{}/status", r.child.id())).unwrap();
    let hwm_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    eprintln!("relay peak RSS: {} MB", hwm_kb / 1024);
    assert!(
        hwm_kb < 60 * 1024,
        "the relay kept the notifications: peak RSS {} MB",
        hwm_kb / 1024
    );
}

/// The value of the first sample of `metric` whose labels contain `label`.
fn metric(body: &str, metric: &str, label: &str) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(metric) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn an_outbox_without_notify_takes_part_in_two_phase_commit() {
    // A private server: a prepared transaction holds back every database's horizon.
    let pg = Pg::start();
    let url = pg.new_db("ses_2pc");
    let file = temp_dir("ses_2pc").join("events.jsonl");
    let mut c = pg.client(&url);
    c.execute(
        "SELECT pgtrickle.enable_outbox('orders', p_notify => false), \
         pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb)",
        &[&json!({"type": "stdout", "path": file}).to_string()],
    )
    .unwrap();
    // Notifications would wake it within a minute at best: only polling
    // the outbox can deliver in time.
    let r = Relay::spawn(relay(&url).args(["--poll-interval-ms", "60000"]));
    r.wait_log("forwarding outbox", 20);

    c.batch_execute(
        "BEGIN;
         SELECT pgtrickle.outbox_publish('orders', '{\"n\": 0}');
         PREPARE TRANSACTION 'pay-1';",
    )
    .unwrap();
    // A later commit waits behind the prepared transaction, which is named.
    c.batch_execute("SELECT pgtrickle.outbox_publish('orders', '{\"n\": 1}')")
        .unwrap();
    let gid = "gid=\"pay-1\"";
    wait_until(20, "the prepared transaction named in /metrics", || {
        let (_, body) = r.get("/metrics");
        metric(&body, "pgtrickle_relay_horizon_prepared_xact_info", gid) == Some(1.0)
    });
    r.wait_log("prepared transaction 'pay-1'", 20);
    assert!(read_jsonl(&file).is_empty(), "nothing passes the horizon");

    let committed = Instant::now();
    c.batch_execute("COMMIT PREPARED 'pay-1'").unwrap();
    wait_until(10, "both events", || read_jsonl(&file).len() == 2);
    eprintln!("delivered {:?} after COMMIT PREPARED", committed.elapsed());
    let ns: Vec<i64> = read_jsonl(&file)
        .iter()
        .map(|l| l["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, vec![0, 1]);
    wait_until(10, "the prepared transaction no longer named", || {
        let (_, body) = r.get("/metrics");
        metric(&body, "pgtrickle_relay_horizon_prepared_xact_info", gid).is_none()
    });
    drop(r);
}

/// Drops the iptables rules it added.
struct Partition(Vec<Vec<String>>);

impl Partition {
    /// Drop every packet between 127.0.0.2 and `port`, both ways.
    fn start(port: u16) -> Partition {
        let p = port.to_string();
        let rules: Vec<Vec<String>> = [
            ["-d", "127.0.0.2", "--dport", p.as_str()],
            ["-s", "127.0.0.2", "--sport", p.as_str()],
        ]
        .iter()
        .map(|r| {
            ["INPUT", "-p", "tcp"]
                .iter()
                .chain(r.iter())
                .chain(["-j", "DROP"].iter())
                .map(|s| s.to_string())
                .collect()
        })
        .collect();
        for r in &rules {
            let ok = Command::new("iptables")
                .arg("-I")
                .args(r)
                .status()
                .unwrap()
                .success();
            assert!(ok, "iptables -I {r:?} (this test needs root and iptables)");
        }
        Partition(rules)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for r in &self.0 {
            let _ = Command::new("iptables").arg("-D").args(r).status();
        }
    }
}

/// Measures the HA takeover after a network partition of the owner (the
/// bound the README gives). Needs root and iptables:
/// `cargo test --test forward_sessions -- --ignored`.
#[test]
#[ignore]
fn ha_takeover_after_a_network_partition_of_the_owner() {
    let pg = Pg::start_with(&["listen_addresses=127.0.0.1,127.0.0.2"]);
    let url = pg.new_db("ses_partition");
    let dir = temp_dir("ses_partition");
    pg.client(&url)
        .execute(
            "SELECT pgtrickle.enable_outbox('orders'), \
             pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb)",
            &[&json!({"type": "stdout", "path": "events.jsonl"}).to_string()],
        )
        .unwrap();
    let via = |host: &str| format!("postgres://postgres@{host}:{}/ses_partition", pg.port);
    let (da, db) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let a = Relay::spawn(relay(&via("127.0.0.2")).current_dir(&da));
    a.wait_log("forwarding outbox", 20);
    let b = Relay::spawn(relay(&via("127.0.0.1")).current_dir(&db));
    b.wait_log("waiting for its lock", 20);

    let cut = Partition::start(pg.port);
    let started = Instant::now();
    b.wait_log("took over the pipeline lock", 120);
    let took = started.elapsed();
    eprintln!("HA takeover after a network partition of the owner: {took:?}");
    publish(&url, 0, 10);
    wait_until(20, "the new owner relays", || {
        read_jsonl(&db.join("events.jsonl")).len() == 10
    });
    drop(cut);
    assert!(took < Duration::from_secs(40), "takeover took {took:?}");
}
