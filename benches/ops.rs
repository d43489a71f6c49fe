//! Operational numbers, part of `make bench` (`cargo bench --bench ops`):
//! the relay's idle CPU and RSS with 10 pipelines, SIGTERM-to-exit time
//! under load, HA takeover time after SIGKILL of the owner, start-up time
//! to systemd's READY=1 and the binary's size. One JSON
//! object per measurement on stdout (see benches/common/mod.rs); progress
//! on stderr. PostgreSQL runs with the default durability settings;
//! `BENCH_ONLY` selects measurements, `BENCH_IDLE_SECS` (default 60) sets
//! the idle measurement's length.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use support::{relay, temp_dir, Pg, Relay};

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn publish(url: &str, outbox: &str, n: i64) {
    Pg::shared_durable()
        .client(url)
        .execute(
            "SELECT count(pgtrickle.outbox_publish($1, jsonb_build_object('n', g))) \
             FROM generate_series(1, $2::bigint) g",
            &[&outbox, &n],
        )
        .unwrap();
}

fn lines(path: &std::path::Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|c| **c == b'\n').count())
        .unwrap_or(0)
}

fn idle(url: &str, dir: &std::path::Path, secs: u64) {
    let mut c = Pg::shared_durable().client(url);
    for i in 0..10 {
        c.execute("SELECT pgtrickle.enable_outbox($1)", &[&format!("idle{i}")])
            .unwrap();
        c.execute(
            "SELECT pgtrickle.set_relay_outbox($1, $1, 'bench', $2::text::jsonb)",
            &[
                &format!("idle{i}"),
                &serde_json::json!({"type":"stdout","path": dir.join(format!("idle{i}.jsonl"))})
                    .to_string(),
            ],
        )
        .unwrap();
    }
    let r = Relay::spawn(&mut relay(url));
    r.wait_log("relay running", 20);
    std::thread::sleep(Duration::from_secs(3));
    let pid = r.child.id();
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let cpu = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let rss = rss_mb(pid);
    eprintln!("idle with 10 pipelines: {cpu:.2}% CPU, {rss:.1} MB RSS over {secs}s");
    let params = serde_json::json!({"seconds": secs, "pipelines": 10});
    common::emit("idle_10_pipelines_cpu", cpu, "%", None, params.clone());
    common::emit("idle_10_pipelines_rss", rss, "MB", None, params);
    c.batch_execute("DELETE FROM pgtrickle.relay_outbox_config WHERE name LIKE 'idle%'")
        .unwrap();
}

fn sigterm_under_load(url: &str, dir: &std::path::Path) {
    let mut c = Pg::shared_durable().client(url);
    let file = dir.join("load.jsonl");
    c.execute("SELECT pgtrickle.enable_outbox('load')", &[])
        .unwrap();
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('load', 'load', 'bench', $1::text::jsonb)",
        &[&serde_json::json!({"type":"stdout","path": file}).to_string()],
    )
    .unwrap();
    publish(url, "load", 300_000);
    let mut r = Relay::spawn(&mut relay(url));
    while lines(&file) < 20_000 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(10), Some(0));
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "SIGTERM to exit under load: {ms:.0} ms ({} events written)",
        lines(&file)
    );
    common::emit(
        "sigterm_to_exit_under_load",
        ms,
        "ms",
        None,
        serde_json::json!({"backlog_events": 300_000}),
    );
    c.batch_execute("SELECT pgtrickle.delete_relay('load')")
        .unwrap();
}

fn ha_takeover(url: &str, dir: &std::path::Path) {
    let mut c = Pg::shared_durable().client(url);
    c.execute("SELECT pgtrickle.enable_outbox('ha')", &[])
        .unwrap();
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('ha', 'ha', 'bench', '{\"type\":\"stdout\",\"path\":\"ha.jsonl\"}')",
        &[],
    )
    .unwrap();
    let (da, db) = (dir.join("ha-a"), dir.join("ha-b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let a = Relay::spawn(relay(url).current_dir(&da).args(["--pipeline", "ha"]));
    a.wait_log("forwarding outbox", 10);
    let b = Relay::spawn(relay(url).current_dir(&db).args(["--pipeline", "ha"]));
    b.wait_log("waiting for its lock", 10);
    a.signal(libc::SIGKILL);
    let t = Instant::now();
    drop(a);
    publish(url, "ha", 1);
    while lines(&db.join("ha.jsonl")) == 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "no takeover");
        std::thread::sleep(Duration::from_millis(2));
    }
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    eprintln!("HA takeover (SIGKILL to first event from the new owner): {ms:.0} ms");
    common::emit(
        "ha_takeover_after_sigkill",
        ms,
        "ms",
        None,
        serde_json::json!({}),
    );
    drop(b);
}

/// From spawning the relay (one pipeline, a file sink) to the READY=1 it
/// sends to systemd's NOTIFY_SOCKET once every pipeline is started: medians
/// of `BENCH_RUNS`. Then the size of the binary.
fn startup(url: &str, dir: &std::path::Path) {
    let mut c = Pg::shared_durable().client(url);
    c.execute("SELECT pgtrickle.enable_outbox('up')", &[])
        .unwrap();
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('up', 'up', 'bench', $1::text::jsonb)",
        &[&serde_json::json!({"type":"stdout","path": dir.join("up.jsonl")}).to_string()],
    )
    .unwrap();
    let sock_path = dir.join("notify.sock");
    let mut ms = Vec::new();
    for _ in 0..common::runs() {
        let _ = std::fs::remove_file(&sock_path);
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut cmd = relay(url);
        cmd.args(["--pipeline", "up"])
            .env("NOTIFY_SOCKET", &sock_path);
        let t = Instant::now();
        let mut r = Relay::spawn(&mut cmd);
        let mut buf = [0u8; 4096];
        loop {
            let n = sock.recv(&mut buf).expect("READY=1 within 20 s");
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                break;
            }
        }
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        r.signal(libc::SIGTERM);
        assert_eq!(r.wait_exit(10), Some(0));
    }
    let value = common::median(&ms);
    eprintln!("start-up to READY=1: {value:.1} ms (runs {ms:.1?})");
    common::emit(
        "startup_to_ready",
        value,
        "ms",
        None,
        serde_json::json!({"pipelines": 1, "runs": ms.len()}),
    );
    let bytes = std::fs::metadata(support::relay_bin()).unwrap().len();
    let mb = bytes as f64 / 1_000_000.0;
    eprintln!("release binary: {bytes} bytes ({mb:.1} MB)");
    common::emit("release_binary_size", mb, "MB", None, serde_json::json!({}));
    c.batch_execute("SELECT pgtrickle.delete_relay('up')")
        .unwrap();
}

fn main() {
    if !common::benching() {
        return;
    }
    let idle_secs: u64 = common::env_or("BENCH_IDLE_SECS", 60);
    let url = Pg::shared_durable().new_db("bench_ops");
    let dir = temp_dir("bench_ops");
    if common::selected("idle_10_pipelines") {
        idle(&url, &dir, idle_secs);
    }
    if common::selected("sigterm_to_exit_under_load") {
        sigterm_under_load(&url, &dir);
    }
    if common::selected("ha_takeover_after_sigkill") {
        ha_takeover(&url, &dir);
    }
    if common::selected("startup_to_ready") {
        startup(&url, &dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
