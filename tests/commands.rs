//! The `replay` and `check` commands against real servers: replay
//! re-publishes a range of an outbox through the pipeline's sink with the
//! original dedup keys and moves no position; check validates configs and,
//! with `--connect`, reaches what each pipeline uses (NATS, RabbitMQ and
//! moto servers; a Redis on a port nothing listens on).

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{json, Value};
use support::*;

/// A database with outbox `orders` and pipeline `fwd` writing JSON lines
/// to a file; returns its URL and the file.
fn setup(db: &str) -> (String, PathBuf) {
    let file = temp_dir(db).join("events.jsonl");
    let url = outbox_pipeline(db, &json!({"type": "stdout", "path": file}));
    (url, file)
}

/// `pgtrickle-relay --postgres-url URL ARGS...`, run to its end.
fn command(url: &str, args: &[&str]) -> Output {
    std::process::Command::new(relay_bin())
        .arg("--postgres-url")
        .arg(url)
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Deliver everything once (`--once`), checking that it worked.
fn deliver(url: &str) {
    let out = run_once(url);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The committed offset of pipeline `fwd`.
fn offset(url: &str) -> i64 {
    Pg::shared()
        .client(url)
        .query_one(
            "SELECT last_change_id FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = 'fwd'",
            &[],
        )
        .unwrap()
        .get(0)
}

/// The (outbox id, dedup key) of each line of `file` from line `skip` on.
fn ids_and_keys(file: &Path, skip: usize) -> Vec<(i64, String)> {
    read_jsonl(file)[skip..]
        .iter()
        .map(|l: &Value| {
            (
                l["outbox_id"].as_i64().unwrap(),
                l["dedup_key"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn replay_sends_exactly_the_range_with_the_original_dedup_keys_and_moves_no_offset() {
    let (url, file) = setup("cmd_replay");
    publish(&url, 1, 10);
    deliver(&url);
    let first = ids_and_keys(&file, 0);
    assert_eq!(first.len(), 10);
    assert_eq!(offset(&url), 10);

    // --from-id 3 --to-id 5: rows 3, 4 and 5, keyed as the first time.
    let out = command(&url, &["replay", "fwd", "--from-id", "3", "--to-id", "5"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("replayed 3 events (3 outbox rows"),
        "{}",
        stderr(&out)
    );
    assert_eq!(ids_and_keys(&file, 10), first[2..5].to_vec());
    assert_eq!(offset(&url), 10, "the pipeline's offset moved");

    // --from-id alone: up to the newest row.
    let out = command(&url, &["replay", "fwd", "--from-id", "9"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(ids_and_keys(&file, 13), first[8..10].to_vec());

    // --dry-run counts and sends nothing.
    let out = command(&url, &["replay", "fwd", "--from-id", "2", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("would replay 9 events (9 outbox rows, ids 2..10)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(read_jsonl(&file).len(), 15);

    // The pipeline itself goes on from its own offset: only what is new.
    publish(&url, 11, 1);
    deliver(&url);
    assert_eq!(ids_and_keys(&file, 15), [(11, "outbox_orders:11:0".into())]);
    assert_eq!(offset(&url), 11);
}

#[test]
fn replay_since_a_time_takes_the_rows_created_at_or_after_it() {
    let (url, file) = setup("cmd_replay_since");
    publish(&url, 1, 6);
    deliver(&url);
    Pg::shared()
        .client(&url)
        .execute(
            "UPDATE pgtrickle.outbox_orders SET created_at = '2020-01-01 00:00:00+00' WHERE id <= 3",
            &[],
        )
        .unwrap();
    let out = command(&url, &["replay", "fwd", "--since", "2024-01-01T00:00:00Z"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let got: Vec<i64> = ids_and_keys(&file, 6).iter().map(|(id, _)| *id).collect();
    assert_eq!(got, [4, 5, 6]);
    // With --to-id, both bounds apply.
    let out = command(
        &url,
        &[
            "replay",
            "fwd",
            "--since",
            "2024-01-01 00:00:00",
            "--to-id",
            "4",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        ids_and_keys(&file, 9)[..],
        [(4, "outbox_orders:4:0".into())]
    );
    // A time that is no time is a usage error.
    let out = command(&url, &["replay", "fwd", "--since", "yesterday"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--since"), "{}", stderr(&out));
    // So is a range with no start.
    let out = command(&url, &["replay", "fwd", "--to-id", "4"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn replay_refuses_a_range_retention_deleted() {
    let (url, file) = setup("cmd_replay_retention");
    publish(&url, 1, 8);
    deliver(&url);
    let mut c = Pg::shared().client(&url);
    c.execute(
        "UPDATE pgtrickle.outbox_orders SET created_at = now() - interval '2 days' WHERE id <= 4",
        &[],
    )
    .unwrap();
    let deleted: i64 = c
        .query_one("SELECT pgtrickle.outbox_retention('orders')", &[])
        .unwrap()
        .get(0);
    assert_eq!(deleted, 4);
    let out = command(&url, &["replay", "fwd", "--from-id", "2", "--to-id", "6"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "pipeline fwd: outbox ids 2..4 were deleted by retention; the oldest kept is 5"
        ),
        "{}",
        stderr(&out)
    );
    assert_eq!(read_jsonl(&file).len(), 8, "nothing was sent");
    // From the oldest kept row on, it replays.
    let out = command(&url, &["replay", "fwd", "--from-id", "5", "--to-id", "6"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(read_jsonl(&file).len(), 10);
}

#[test]
fn replay_streams_a_claim_check_row_whole() {
    let (url, file) = setup("cmd_replay_claim");
    Pg::shared()
        .client(&url)
        .batch_execute(
            "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 0}');
             SET pgtrickle.outbox_inline_threshold = 100;
             SELECT pgtrickle.outbox_publish_delta('orders',
                (SELECT jsonb_agg(jsonb_build_object('n', g)) FROM generate_series(10, 259) g),
                (SELECT jsonb_agg(jsonb_build_object('n', g)) FROM generate_series(3, 5) g));
             SELECT pgtrickle.outbox_publish('orders', '{\"n\": 1}');",
        )
        .unwrap();
    deliver(&url);
    let first = ids_and_keys(&file, 0);
    assert_eq!(first.len(), 1 + 253 + 1);
    // A batch size well below the claim-check's 253 rows: streamed in chunks.
    let out = command(
        &url,
        &[
            "--batch-size",
            "16",
            "replay",
            "fwd",
            "--from-id",
            "2",
            "--to-id",
            "2",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("replayed 253 events (1 outbox rows"),
        "{}",
        stderr(&out)
    );
    assert_eq!(ids_and_keys(&file, 255), first[1..254].to_vec());
    // Dry run counts the claim-check's rows as events.
    let out = command(&url, &["replay", "fwd", "--from-id", "1", "--dry-run"]);
    assert!(
        stderr(&out).contains("would replay 255 events (3 outbox rows, ids 1..3)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn replay_reads_a_pg_trickle_outbox_without_txid_by_id() {
    let (url, file) = setup("cmd_replay_trickle");
    // pg_trickle's own shape: no txid, no headers.
    Pg::shared()
        .client(&url)
        .batch_execute(
            "ALTER TABLE pgtrickle.outbox_orders DROP COLUMN txid CASCADE, DROP COLUMN headers;
             INSERT INTO pgtrickle.outbox_orders (inserted_count, deleted_count, payload)
               SELECT 1, 0, jsonb_build_object('v', 1, 'inserted', jsonb_build_array(jsonb_build_object('n', g)))
               FROM generate_series(1, 8) g;",
        )
        .unwrap();
    deliver(&url);
    let first = ids_and_keys(&file, 0);
    assert_eq!(first.len(), 8);
    let out = command(
        &url,
        &[
            "--batch-size",
            "2",
            "replay",
            "fwd",
            "--from-id",
            "3",
            "--to-id",
            "7",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(ids_and_keys(&file, 8), first[2..7].to_vec());
    assert_eq!(offset(&url), 8);
}

#[test]
fn replay_to_stdout_keeps_the_report_off_stdout() {
    let (url, _) = setup("cmd_replay_stdout");
    add(&url, "out", json!({"type": "stdout"}));
    publish(&url, 1, 3);
    let out = command(&url, &["replay", "out", "--from-id", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let keys: Vec<String> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["dedup_key"].to_string())
        .collect();
    assert_eq!(keys, ["\"outbox_orders:2:0\"", "\"outbox_orders:3:0\""]);
    assert!(
        stderr(&out).contains("replayed 2 events"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn replay_of_a_missing_or_reverse_pipeline_fails() {
    let (url, _) = setup("cmd_replay_missing");
    let out = command(&url, &["replay", "nope", "--from-id", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no pipeline named \"nope\""));
    Pg::shared()
        .client(&url)
        .batch_execute(
            "SELECT pgtrickle.create_inbox('events');
             SELECT pgtrickle.set_relay_inbox('rin', 'events', '{\"type\": \"stdin\"}');",
        )
        .unwrap();
    let out = command(&url, &["replay", "rin", "--from-id", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("reverse pipeline"),
        "{}",
        stderr(&out)
    );
}

/// Add forward pipeline `name` of outbox `orders` with `sink` at `url`.
fn add(url: &str, name: &str, sink: Value) {
    Pg::shared()
        .client(url)
        .execute(
            "SELECT pgtrickle.set_relay_outbox($1, 'orders', 'default', $2::text::jsonb)",
            &[&name, &sink.to_string()],
        )
        .unwrap();
}

#[test]
fn check_passes_good_configs_and_names_pipeline_and_key_of_bad_ones() {
    let (url, _) = setup("cmd_check");
    let out = command(&url, &["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "pipeline fwd: ok\n");
    let out = command(&url, &["check", "--connect"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "pipeline fwd: ok\n");

    add(&url, "typo", json!({"type": "stdout", "pth": "x"}));
    add(
        &url,
        "badtype",
        json!({"type": "stdout", "rotate_bytes": "hunter2"}),
    );
    let out = command(&url, &["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("pipeline badtype: sink.rotate_bytes: "),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert_eq!(lines[1], "pipeline fwd: ok");
    assert!(lines[2].starts_with("pipeline typo: sink.pth: "), "{text}");

    // Only the pipelines named; a name not in the catalog is a problem.
    let out = command(&url, &["check", "fwd"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(stdout(&out), "pipeline fwd: ok\n");
    let out = command(&url, &["check", "fwd", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("pipeline nope: name: no such pipeline"),
        "{}",
        stdout(&out)
    );

    // JSON.
    let out = command(&url, &["check", "--json", "typo", "fwd"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["pipelines"][0]["name"], "fwd");
    assert_eq!(v["pipelines"][0]["ok"], true);
    assert_eq!(v["pipelines"][1]["problems"][0]["key"], "sink.pth");

    // --connect: a stdout directory that is not there, an outbox that is not.
    add(
        &url,
        "nodir",
        json!({"type": "stdout", "path": "/nonexistent/dir/events.jsonl"}),
    );
    let out = command(&url, &["check", "nodir"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let out = command(&url, &["check", "--connect", "nodir"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).starts_with("pipeline nodir: sink.path: directory /nonexistent/dir"),
        "{}",
        stdout(&out)
    );
    // An http endpoint nothing listens on; an inbox that is not there; an
    // outbox that is not there.
    let port = free_port();
    add(
        &url,
        "http_down",
        json!({"type": "http", "url": format!("http://127.0.0.1:{port}/hook")}),
    );
    add(
        &url,
        "no_inbox",
        json!({"type": "pg-inbox", "url": url, "inbox": "nope"}),
    );
    Pg::shared()
        .client(&url)
        .execute(
            "SELECT pgtrickle.set_relay_outbox('no_outbox', 'missing', 'default', '{\"type\": \"stdout\"}')",
            &[],
        )
        .unwrap();
    let out = command(
        &url,
        &["check", "--connect", "http_down", "no_inbox", "no_outbox"],
    );
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("pipeline http_down: sink.url: "),
        "{text}"
    );
    assert!(
        lines[1].starts_with("pipeline no_inbox: sink.inbox: "),
        "{text}"
    );
    assert!(
        lines[2].starts_with("pipeline no_outbox: source.outbox: "),
        "{text}"
    );
}

#[cfg(all(
    feature = "nats",
    feature = "rabbitmq",
    feature = "redis",
    feature = "sqs"
))]
#[test]
fn check_connect_names_the_key_of_what_is_missing_or_down() {
    use support::brokers::Nats;
    use support::rabbitmq::Rabbit;
    use support::sqs::{Moto, REGION};

    let (url, _) = setup("cmd_check_connect");
    let nats = Nats::start();
    let rabbit = Rabbit::shared();
    let moto = Moto::shared();
    let queue = moto.client().create_queue("check-there", json!({}));
    let sqs = |q: &str| {
        json!({"type": "sqs", "queue_url": q, "region": REGION,
               "access_key_id": "AKIDTEST", "secret_access_key": "s3cr3t"})
    };
    let dead_port = free_port();
    add(
        &url,
        "nats_missing",
        json!({"type": "nats", "url": nats.url(), "stream": "NOPE"}),
    );
    add(
        &url,
        "rabbit_missing",
        json!({"type": "rabbitmq", "url": rabbit.url(), "exchange": "no-such-exchange"}),
    );
    add(
        &url,
        "redis_down",
        json!({"type": "redis", "url": format!("redis://127.0.0.1:{dead_port}")}),
    );
    add(
        &url,
        "sqs_missing",
        sqs(&queue.replace("check-there", "check-missing")),
    );
    add(&url, "sqs_there", sqs(&queue));
    add(
        &url,
        "rabbit_there",
        json!({"type": "rabbitmq", "url": rabbit.url(), "exchange": "amq.topic"}),
    );

    // Reverse pipelines: the source, and the inbox in this database.
    let inbox = |name: &str, inbox: &str, source: Value| {
        Pg::shared()
            .client(&url)
            .execute(
                "SELECT pgtrickle.set_relay_inbox($1, $2, $3::text::jsonb)",
                &[&name, &inbox, &source.to_string()],
            )
            .unwrap();
    };
    inbox(
        "rin_redis_down",
        "events",
        json!({"type": "redis", "url": format!("redis://127.0.0.1:{dead_port}"), "stream": "s"}),
    );
    inbox(
        "rin_nats_missing",
        "events",
        json!({"type": "nats", "url": nats.url(), "stream": "NOPE"}),
    );
    inbox(
        "rin_rabbit_missing",
        "events",
        json!({"type": "rabbitmq", "url": rabbit.url(), "queue": "no-such-queue"}),
    );
    inbox(
        "rin_sqs_missing",
        "events",
        sqs(&queue.replace("check-there", "check-missing")),
    );
    inbox(
        "rin_pg_missing",
        "events",
        json!({"type": "postgres", "url": url, "outbox": "no_such_outbox"}),
    );
    inbox("rin_no_inbox", "gone", json!({"type": "stdin"}));
    Pg::shared()
        .client(&url)
        .batch_execute("DROP TABLE pgtrickle.gone CASCADE")
        .unwrap();

    // Without --connect every config is fine.
    let out = command(&url, &["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));

    let out = command(&url, &["check", "--connect"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("pipeline {name}: ")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{text}"))
            .to_string()
    };
    assert_eq!(line("fwd"), "pipeline fwd: ok");
    assert_eq!(line("sqs_there"), "pipeline sqs_there: ok");
    assert_eq!(line("rabbit_there"), "pipeline rabbit_there: ok");
    assert!(
        line("nats_missing").starts_with("pipeline nats_missing: sink.stream: "),
        "{text}"
    );
    assert!(
        line("nats_missing").contains("\"NOPE\" does not exist"),
        "{text}"
    );
    assert!(
        line("rabbit_missing").starts_with("pipeline rabbit_missing: sink.exchange: "),
        "{text}"
    );
    assert!(line("rabbit_missing").contains("does not exist"), "{text}");
    assert!(
        line("redis_down").starts_with("pipeline redis_down: sink.url: "),
        "{text}"
    );
    assert!(
        line("sqs_missing").starts_with("pipeline sqs_missing: sink.queue_url: "),
        "{text}"
    );
    assert!(!text.contains("s3cr3t"), "{text}");
    for (name, key) in [
        ("rin_redis_down", "source.url"),
        ("rin_nats_missing", "source.stream"),
        ("rin_rabbit_missing", "source.queue"),
        ("rin_sqs_missing", "source.queue_url"),
        ("rin_pg_missing", "source.outbox"),
        ("rin_no_inbox", "sink.inbox"),
    ] {
        let want = format!("pipeline {name}: {key}: ");
        assert!(line(name).starts_with(&want), "{want}\n{text}");
    }

    // Each broken one alone exits 1; the fine ones alone exit 0.
    for name in [
        "nats_missing",
        "rabbit_missing",
        "redis_down",
        "sqs_missing",
    ] {
        let out = command(&url, &["check", "--connect", name]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stdout(&out));
        assert_eq!(stdout(&out).lines().count(), 1, "{}", stdout(&out));
    }
    let out = command(
        &url,
        &["check", "--connect", "fwd", "sqs_there", "rabbit_there"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

#[cfg(feature = "kafka")]
#[test]
fn check_connect_asks_kafka_for_the_topics() {
    use support::kafka::Kafka;

    let (url, _) = setup("cmd_check_kafka");
    let k = Kafka::start();
    k.create_topic("there", 1);
    let dead = format!("127.0.0.1:{}", free_port());
    add(
        &url,
        "k_there",
        json!({"type": "kafka", "brokers": k.brokers(), "topic": "there"}),
    );
    // A topic from the template: only the brokers can be checked.
    add(
        &url,
        "k_template",
        json!({"type": "kafka", "brokers": k.brokers(), "topic": "t.{stream_table}"}),
    );
    add(
        &url,
        "k_missing",
        json!({"type": "kafka", "brokers": k.brokers(), "topic": "missing"}),
    );
    add(
        &url,
        "k_down",
        json!({"type": "kafka", "brokers": dead, "topic": "there"}),
    );
    Pg::shared()
        .client(&url)
        .execute(
            "SELECT pgtrickle.set_relay_inbox('rin_k_missing', 'events', $1::text::jsonb)",
            &[
                &json!({"type": "kafka", "brokers": k.brokers(), "group_id": "g",
                      "topics": ["there", "missing"]})
                .to_string(),
            ],
        )
        .unwrap();
    let out = command(
        &url,
        &[
            "check",
            "--connect",
            "k_there",
            "k_template",
            "k_missing",
            "k_down",
            "rin_k_missing",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(
        lines[0].starts_with("pipeline k_down: sink.brokers: "),
        "{text}"
    );
    assert!(
        lines[1].starts_with("pipeline k_missing: sink.topic: "),
        "{text}"
    );
    assert_eq!(lines[2], "pipeline k_template: ok", "{text}");
    assert_eq!(lines[3], "pipeline k_there: ok", "{text}");
    assert!(
        lines[4].starts_with("pipeline rin_k_missing: source.topics: topics [\"missing\"]"),
        "{text}"
    );
}
