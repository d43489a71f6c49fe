//! Reverse throughput, part of `make bench` (`cargo bench --bench reverse`):
//! 200,000 messages of about 200 bytes into an inbox, from a file (`stdin`
//! source), from a private redis-server (`redis` source) and from a
//! private RabbitMQ node (`rabbitmq` source), with the release relay run
//! `--once`. One JSON object per scenario on stdout.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::time::Instant;

use support::{relay, temp_dir, Pg};

const N: usize = 200_000;

fn body(i: usize) -> String {
    format!(
        r#"{{"id":{i},"customer":"customer-{}","sku":"{:032x}","qty":{},"price":12.34,"note":"{}"}}"#,
        i % 9973,
        i.wrapping_mul(2654435761),
        i % 10,
        "x".repeat(60)
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Run `pipeline` `runs` times (`reset` before each) and report.
fn scenario(url: &str, name: &str, pipeline: &str, runs: usize, reset: &dyn Fn()) {
    let mut c = Pg::shared().client(url);
    let mut rates = Vec::new();
    for i in 0..runs {
        c.batch_execute("TRUNCATE pgtrickle.events").unwrap();
        reset();
        let t = Instant::now();
        let out = relay(url)
            .args(["--once", "--log-level", "warn", "--pipeline", pipeline])
            .output()
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: i64 = c
            .query_one("SELECT count(*) FROM pgtrickle.events", &[])
            .unwrap()
            .get(0);
        assert_eq!(rows as usize, N, "{name}: every message must arrive");
        eprintln!(
            "{name} run {}: {secs:.2}s, {:.0} events/s",
            i + 1,
            N as f64 / secs
        );
        rates.push(N as f64 / secs);
    }
    println!(
        "{}",
        serde_json::json!({"bench": name, "events": N, "runs": runs,
            "median_events_per_sec": median(rates).round()})
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let url = Pg::shared().new_db("bench_reverse");
    let dir = temp_dir("bench_reverse");
    let file = dir.join("in.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
    for i in 0..N {
        writeln!(
            f,
            r#"{{"event_id":"e{i}","event_type":"order","payload":{}}}"#,
            body(i)
        )
        .unwrap();
    }
    drop(f);
    let mut c = Pg::shared().client(&url);
    c.execute(
        "SELECT pgtrickle.set_relay_inbox('file-in', 'events', $1::text::jsonb)",
        &[&serde_json::json!({"type": "stdin", "path": file}).to_string()],
    )
    .unwrap();
    scenario(
        &url,
        "reverse_file_to_inbox_200000",
        "file-in",
        runs,
        &|| {},
    );
    c.batch_execute("SELECT pgtrickle.disable_relay('file-in')")
        .unwrap();
    #[cfg(feature = "redis")]
    {
        let r = support::brokers::Redis::start();
        let client = redis::Client::open(r.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        for chunk in (0..N).collect::<Vec<_>>().chunks(1000) {
            let mut p = redis::pipe();
            for i in chunk {
                p.cmd("XADD")
                    .arg("bench")
                    .arg("*")
                    .arg("dedup_key")
                    .arg(format!("r{i}"))
                    .arg("payload")
                    .arg(body(*i))
                    .ignore();
            }
            p.query::<()>(&mut con).unwrap();
        }
        c.execute(
            "SELECT pgtrickle.set_relay_inbox('redis-in', 'events', $1::text::jsonb)",
            &[
                &serde_json::json!({"type": "redis", "url": r.url(), "stream": "bench",
                "group": "bench", "consumer": "bench"})
                .to_string(),
            ],
        )
        .unwrap();
        scenario(
            &url,
            "reverse_redis_to_inbox_200000",
            "redis-in",
            runs,
            &|| {
                // Read everything again: drop the group, the relay recreates it
                // from the start.
                let _: redis::RedisResult<i64> = redis::cmd("XGROUP")
                    .arg("DESTROY")
                    .arg("bench")
                    .arg("bench")
                    .query(&mut client.get_connection().unwrap());
            },
        );
    }
    #[cfg(feature = "rabbitmq")]
    bench_rabbitmq(&url, runs);
    let _ = std::fs::remove_dir_all(&dir);
}

/// 200,000 persistent messages from a durable queue of a private RabbitMQ
/// node (prefetch 500), filled anew before each run.
#[cfg(feature = "rabbitmq")]
fn bench_rabbitmq(url: &str, runs: usize) {
    let r = support::rabbitmq::Rabbit::start();
    r.declare("bench", "", "");
    let messages: Vec<(Option<String>, Option<String>, Vec<u8>)> = (0..N)
        .map(|i| (Some(format!("q{i}")), None, body(i).into_bytes()))
        .collect();
    Pg::shared()
        .client(url)
        .execute(
            "SELECT pgtrickle.set_relay_inbox('rabbitmq-in', 'events', $1::text::jsonb)",
            &[
                &serde_json::json!({"type": "rabbitmq", "url": r.url(), "queue": "bench",
                                  "prefetch": 500, "max_wait_ms": 1000})
                .to_string(),
            ],
        )
        .unwrap();
    scenario(
        url,
        "reverse_rabbitmq_to_inbox_200000",
        "rabbitmq-in",
        runs,
        &|| {
            let (_conn, ch) = r.open();
            ch.queue_purge("bench").unwrap();
            r.publish("", "bench", &messages);
        },
    );
}
