//! The `rabbitmq` source end to end: a private rabbitmq-server node →
//! relay binary → inbox table, messages published with amiquip.
#![cfg(feature = "rabbitmq")]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value as Json};
use support::proxy::Proxy;
use support::rabbitmq::Rabbit;
use support::*;

/// (message id, type, body) as `Rabbit::publish` takes them.
type Msg = (Option<String>, Option<String>, Vec<u8>);

fn msg(id: &str, body: Json) -> Msg {
    (Some(id.to_string()), None, body.to_string().into_bytes())
}

/// Stop the relay cleanly; whatever it had not acknowledged is back in
/// the queue then.
fn stop(mut relay: Relay) {
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(20), Some(0), "{}", relay.stderr());
}

#[test]
fn repeated_message_ids_are_one_row_each_and_everything_is_acked() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_rmq_dedup");
    let r = Rabbit::shared();
    // The queue and binding exist before the relay's first start (as the
    // relay declares them), with a backlog: redeclaring keeps it.
    r.declare("dedup_q", "dedup_x", "orders.#");
    let numbered = |from: usize, to: usize| -> Vec<Msg> {
        (from..to)
            .map(|i| {
                (
                    Some(format!("k{}", i % 1500)),
                    Some("order.placed".to_string()),
                    json!({"n": i, "aggregate_id": format!("a{}", i % 7)})
                        .to_string()
                        .into_bytes(),
                )
            })
            .collect()
    };
    r.publish("dedup_x", "orders.new", &numbered(0, 1000));
    set_inbox(
        &url,
        json!({"type": "rabbitmq", "url": "${ENV:MQ_URL}", "queue": "dedup_q",
               "declare": true, "exchange": "dedup_x", "binding_key": "orders.#",
               "source": "shop", "max_wait_ms": 50}),
    );
    let relay = Relay::spawn(relay(&url).env("MQ_URL", r.url()));
    r.publish("dedup_x", "orders.new", &numbered(1000, 2000));
    wait_until(60, "1500 distinct ids in the inbox", || {
        inbox_count(&url) == 1500
    });
    let want: HashSet<String> = (0..1500).map(|i| format!("k{i}")).collect();
    assert_eq!(inbox_ids(&url), want);
    let row = pg
        .client(&url)
        .query_one(
            "SELECT event_type, source, aggregate_id, payload->>'n' \
             FROM pgtrickle.events WHERE event_id = 'k10'",
            &[],
        )
        .unwrap();
    let got: (String, String, String, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        got,
        (
            "order.placed".into(),
            "shop".into(),
            "a3".into(),
            "10".into()
        )
    );
    assert!(!relay.stderr().contains("ERROR"), "{}", relay.stderr());
    // The repeats may still be on their way: a last message marks the end.
    r.publish("dedup_x", "orders.new", &[msg("end", json!({}))]);
    wait_until(30, "the last message", || inbox_count(&url) == 1501);
    stop(relay);
    assert_eq!(r.count("dedup_q"), 0, "messages were left unacknowledged");
}

#[test]
fn killed_mid_stream_and_restarted_every_message_arrives_once() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_rmq_kill");
    let r = Rabbit::shared();
    r.declare("kill_rq", "", "");
    let all: Vec<Msg> = (0..3000)
        .map(|i| msg(&format!("e{i}"), json!({"n": i})))
        .collect();
    r.publish("", "kill_rq", &all);
    set_inbox(
        &url,
        json!({"type": "rabbitmq", "url": r.url(), "queue": "kill_rq", "batch_size": 20,
               "prefetch": 40}),
    );
    kill_relay_mid_inbox(&url, 3000, 30);
    let second = Relay::spawn(&mut relay(&url));
    wait_until(60, "all messages in the inbox", || {
        inbox_count(&url) == 3000
    });
    stop(second);
    assert_eq!(inbox_ids(&url).len(), 3000);
    assert_eq!(r.count("kill_rq"), 0);
}

#[test]
fn committed_but_not_acked_is_redelivered_and_absorbed() {
    // The state a SIGKILL between the inbox commit and the ack leaves: the
    // rows are in the inbox, the messages delivered and never acknowledged.
    let pg = Pg::shared();
    let url = pg.new_db("rev_rmq_noack");
    let r = Rabbit::shared();
    r.declare("noack_q", "", "");
    let all: Vec<Msg> = (0..50)
        .map(|i| msg(&format!("n{i}"), json!({"v": i})))
        .collect();
    r.publish("", "noack_q", &all);
    {
        // A consumer that takes 30 and dies without acknowledging.
        let (conn, ch) = r.open();
        ch.qos(0, 30, false).unwrap();
        let consumer = ch
            .basic_consume("noack_q", amiquip::ConsumerOptions::default())
            .unwrap();
        for _ in 0..30 {
            match consumer
                .receiver()
                .recv_timeout(Duration::from_secs(10))
                .unwrap()
            {
                amiquip::ConsumerMessage::Delivery(_) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(r.count("noack_q"), 20);
        drop(consumer);
        drop(ch);
        drop(conn);
    }
    set_inbox(
        &url,
        json!({"type": "rabbitmq", "url": r.url(), "queue": "noack_q", "max_wait_ms": 2000}),
    );
    let mut db = pg.client(&url);
    for i in 0..30 {
        db.execute(
            "INSERT INTO pgtrickle.events (event_id, payload) VALUES ($1, $2::text::jsonb)",
            &[&format!("n{i}"), &json!({"v": i}).to_string()],
        )
        .unwrap();
    }
    wait_until(20, "the dead consumer's messages requeued", || {
        r.count("noack_q") == 50
    });
    let out = relay(&url).arg("--once").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(inbox_count(&url), 50);
    assert_eq!(r.count("noack_q"), 0);
}

#[test]
fn inbox_unwritable_nothing_acked_nothing_lost() {
    let mut pg = Pg::start();
    let url = pg.new_db("rev_rmq_pgdown");
    let r = Rabbit::shared();
    r.declare("down_q", "", "");
    set_inbox(
        &url,
        json!({"type": "rabbitmq", "url": r.url(), "queue": "down_q", "max_wait_ms": 50}),
    );
    let batch = |from: usize, n: usize| -> Vec<Msg> {
        (from..from + n)
            .map(|i| msg(&format!("d{i}"), json!({"n": i})))
            .collect()
    };
    // 1. PostgreSQL stopped under a running relay: everything arrives once
    // it is back.
    let relay1 = Relay::spawn(&mut relay(&url));
    r.publish("", "down_q", &batch(0, 9));
    wait_until(30, "the first messages", || inbox_count(&url) == 9);
    pg.stop();
    r.publish("", "down_q", &batch(9, 200));
    wait_until(20, "the messages delivered to the relay", || {
        r.count("down_q") == 0
    });
    std::thread::sleep(Duration::from_millis(1500));
    pg.start_again();
    wait_until(60, "everything after the restart", || {
        inbox_count(&url) == 209
    });
    // 2. The inbox locked: the relay's insert waits. Killed meanwhile,
    // nothing it received was acknowledged: all of it is back in the queue.
    let mut locker = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut tx = locker.transaction().unwrap();
    tx.batch_execute("LOCK TABLE pgtrickle.events IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    r.publish("", "down_q", &batch(209, 100));
    wait_until(20, "the messages delivered to the relay", || {
        r.count("down_q") == 0
    });
    std::thread::sleep(Duration::from_millis(1000));
    relay1.signal(libc::SIGKILL);
    drop(relay1);
    wait_until(20, "the unacknowledged messages back in the queue", || {
        r.count("down_q") == 100
    });
    tx.rollback().unwrap();
    // (The killed relay's insert, still waiting for the lock in its server
    // process, may commit now: the inbox absorbs the redelivery.)
    let relay2 = Relay::spawn(&mut relay(&url));
    r.publish("", "down_q", &batch(309, 1));
    wait_until(60, "everything after the lock", || inbox_count(&url) == 310);
    stop(relay2);
    assert_eq!(r.count("down_q"), 0);
    let want: HashSet<String> = (0..310).map(|i| format!("d{i}")).collect();
    let got: HashSet<String> = pg
        .client(&url)
        .query("SELECT event_id FROM pgtrickle.events", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn malformed_messages_are_dead_letters_and_the_rest_arrive() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_rmq_bad");
    let r = Rabbit::shared();
    r.declare("bad_q", "", "");
    let mut all: Vec<Msg> = (0..10)
        .map(|i| msg(&format!("g{i}"), json!({"ok": true})))
        .collect();
    all.insert(3, (Some("bad".into()), None, b"{not json".to_vec()));
    all.insert(7, (None, None, br#"{"no":"id"}"#.to_vec()));
    r.publish("", "bad_q", &all);
    set_inbox(
        &url,
        json!({"type": "rabbitmq", "url": r.url(), "queue": "bad_q", "max_wait_ms": 2000}),
    );
    let out = relay(&url).arg("--once").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(inbox_count(&url), 12);
    assert_eq!(r.count("bad_q"), 0);
    let mut c = pg.client(&url);
    let rows = c
        .query(
            "SELECT event_id, payload->>'raw', error FROM pgtrickle.events_dlq ORDER BY event_id",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 2);
    let (id, raw, error): (String, String, String) =
        (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert_eq!((id.as_str(), raw.as_str()), ("bad", "{not json"));
    assert!(error.contains("not valid JSON"), "{error}");
    let (id, raw, error): (String, String, String) =
        (rows[1].get(0), rows[1].get(1), rows[1].get(2));
    assert!(id.starts_with("no-message-id:"), "{id}");
    assert_eq!(raw, r#"{"no":"id"}"#);
    assert!(error.contains("message-id"), "{error}");
    let waiting: i64 = c
        .query_one("SELECT count(*) FROM pgtrickle.events_pending", &[])
        .unwrap()
        .get(0);
    assert_eq!(waiting, 10);
}

#[test]
fn a_bad_rabbitmq_source_config_names_pipeline_and_key() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_rmq_badcfg");
    set_inbox(&url, json!({"type": "rabbitmq", "queue": "q"}));
    let out = relay(&url).arg("--once").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline \"rin\"") && stderr.contains("source.url"),
        "{stderr}"
    );
    // A queue that does not exist, not declared by the relay.
    let r = Rabbit::shared();
    set_inbox(
        &url,
        json!({"type": "rabbitmq", "url": r.url(), "queue": "no_such_queue"}),
    );
    let out = relay(&url).arg("--once").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline \"rin\"")
            && stderr.contains("source.queue")
            && stderr.contains("no_such_queue")
            && stderr.contains("source.declare"),
        "{stderr}"
    );
}

#[test]
fn connections_cut_mid_stream_lose_nothing_and_everything_is_acked() {
    let pg = Pg::shared();
    let url = pg.new_db("rev_rmq_cuts");
    let r = Rabbit::shared();
    r.declare("cuts_q", "cuts_x", "#");
    // The relay talks to RabbitMQ only through the proxy, which cuts its
    // connection at arbitrary points of the batches.
    let proxy = Proxy::start(&format!("127.0.0.1:{}", r.port));
    set_inbox(
        &url,
        json!({"type": "rabbitmq", "url": format!("amqp://guest:guest@{}/%2f", proxy.addr()),
               "queue": "cuts_q", "prefetch": 80, "max_wait_ms": 20}),
    );
    let running = Relay::spawn(&mut relay(&url));
    for chunk in 0..8 {
        let before = inbox_count(&url);
        let msgs: Vec<Msg> = (chunk * 200..chunk * 200 + 200)
            .map(|i| msg(&format!("m{i}"), json!({"n": i})))
            .collect();
        r.publish("cuts_x", "k", &msgs);
        wait_until(60, "the relay to take some", || inbox_count(&url) > before);
        proxy.cut();
    }
    wait_until(120, "every message in the inbox", || {
        inbox_count(&url) == 1600
    });
    // Stopped, the relay's unacknowledged messages are back in the queue:
    // at most its prefetch window (redelivered duplicates of the last cut
    // it had not taken yet), never what it wrote.
    stop(running);
    let left = r.count("cuts_q");
    assert!(left <= 80, "{left} messages left unacknowledged");
    // A run to the end of the queue absorbs them as duplicates.
    let out = relay(&url).arg("--once").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r.count("cuts_q"), 0, "every message acknowledged");
    assert_eq!(inbox_count(&url), 1600);
    let want: HashSet<String> = (0..1600).map(|i| format!("m{i}")).collect();
    assert_eq!(inbox_ids(&url), want);
    assert_eq!(proxy.cuts(), 8);
}
