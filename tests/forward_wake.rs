//! Wake-ups on demand (issue 11 item 4): kit outboxes notify only while a
//! relay is asleep on them (`relay_outbox_sleep`), and a relay never sleeps
//! on a commit that did not notify.

mod support;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;
use support::sqlcheck::*;
use support::*;

/// The notifications for `outbox_orders` that `c` receives within `wait`.
fn notes(c: &mut Client, wait: Duration) -> usize {
    let mut n = 0;
    let end = Instant::now() + wait;
    while let Some(note) = c
        .notifications()
        .timeout_iter(end.saturating_duration_since(Instant::now()))
        .next()
        .unwrap()
    {
        assert_eq!(note.payload(), "outbox_orders");
        n += 1;
    }
    n
}

fn sleep_call(c: &mut Client, asleep: bool) -> Option<String> {
    c.query_one(
        "SELECT pgtrickle.relay_outbox_sleep('outbox_orders', $1)::text",
        &[&asleep],
    )
    .unwrap()
    .get(0)
}

/// No sleep counter grants PUBLIC anything: the publish functions read
/// them as their owner.
const PUBLIC_READS_NO_COUNTER: &str =
    "SELECT NOT EXISTS (SELECT 1 FROM pg_class c, aclexplode(c.relacl) a \
      WHERE c.relname LIKE 'outbox\\_%\\_asleep' AND a.grantee = 0)";

fn publish_one(c: &mut Client) {
    c.batch_execute("SELECT pgtrickle.outbox_publish('orders', '{\"n\": 1}')")
        .unwrap();
}

#[test]
fn writers_notify_only_while_a_relay_is_asleep() {
    let (pg, url, mut c) = setup("wake_sql");
    c.batch_execute("SELECT pgtrickle.enable_outbox('orders')")
        .unwrap();
    assert!(bool_of(
        &mut c,
        "SELECT notifies AND notifies_sleepers FROM pgtrickle.relay_outbox_info('orders')"
    ));
    assert!(bool_of(&mut c, PUBLIC_READS_NO_COUNTER));
    let mut listener = pg.client(&url);
    listener
        .batch_execute("LISTEN pgtrickle_outbox_new")
        .unwrap();
    let mut relay1 = pg.client(&url);
    let mut relay2 = pg.client(&url);

    // Nobody asleep: no notification.
    publish_one(&mut c);
    assert_eq!(notes(&mut listener, Duration::from_millis(300)), 0);

    // A relay asleep: one per publishing transaction, whichever function
    // publishes (a keyed publish that writes nothing wakes nobody).
    sleep_call(&mut relay1, true).unwrap();
    publish_one(&mut c);
    c.batch_execute("SELECT pgtrickle.outbox_publish_delta('orders', '[{\"n\": 2}]')")
        .unwrap();
    c.batch_execute(
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 3}', p_idempotency_key => 'k')",
    )
    .unwrap();
    assert_eq!(notes(&mut listener, Duration::from_millis(300)), 3);
    c.batch_execute(
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 3}', p_idempotency_key => 'k')",
    )
    .unwrap();
    assert_eq!(notes(&mut listener, Duration::from_millis(300)), 0);

    // Two asleep, one wakes: the other still gets notified.
    sleep_call(&mut relay2, true).unwrap();
    sleep_call(&mut relay1, false).unwrap();
    publish_one(&mut c);
    assert_eq!(notes(&mut listener, Duration::from_millis(300)), 1);
    // A relay that dies asleep stops counting at the next count.
    let gone: i32 = relay2
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    drop(relay2);
    support::wait_until(10, "the session to end", || {
        !c.query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
            &[&gone],
        )
        .unwrap()
        .get::<_, bool>(0)
    });
    sleep_call(&mut relay1, true).unwrap();
    sleep_call(&mut relay1, false).unwrap();
    publish_one(&mut c);
    assert_eq!(notes(&mut listener, Duration::from_millis(300)), 0);

    // A REPEATABLE READ writer whose snapshot is older than the counter's
    // change still sees it (a sequence is read without a snapshot).
    let mut rr = pg.client(&url);
    rr.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .unwrap();
    sleep_call(&mut relay1, true).unwrap();
    publish_one(&mut rr);
    rr.batch_execute("COMMIT").unwrap();
    assert_eq!(notes(&mut listener, Duration::from_millis(300)), 1);
    sleep_call(&mut relay1, false).unwrap();

    // The guard: a writer that inserted before the relay counted in (and
    // so did not notify) holds it until it ends.
    let mut w = pg.client(&url);
    w.batch_execute("BEGIN; SELECT pgtrickle.outbox_publish('orders', '{\"n\": 2}')")
        .unwrap();
    let guard = sleep_call(&mut relay1, true).unwrap();
    let passed = |c: &mut Client| -> bool {
        c.query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8",
            &[&guard],
        )
        .unwrap()
        .get(0)
    };
    assert!(!passed(&mut relay1));
    w.batch_execute("COMMIT").unwrap();
    assert_eq!(
        notes(&mut listener, Duration::from_millis(300)),
        0,
        "it read the counter before it changed"
    );
    support::wait_until(10, "the horizon past the guard", || passed(&mut relay1));

    // An outbox without NOTIFY (two-phase commit) has no counter to keep.
    c.batch_execute("SELECT pgtrickle.enable_outbox('xa', p_notify => false)")
        .unwrap();
    assert!(bool_of(
        &mut c,
        "SELECT NOT notifies AND NOT notifies_sleepers FROM pgtrickle.relay_outbox_info('xa')"
    ));
    assert_eq!(
        text_of(
            &mut c,
            "SELECT pgtrickle.relay_outbox_sleep('outbox_xa', true)::text"
        ),
        None
    );
    // The relay may call it; PUBLIC may not.
    assert!(bool_of(
        &mut c,
        "SELECT has_function_privilege('pgtrickle_relay', \
         'pgtrickle.relay_outbox_sleep(text,boolean)', 'EXECUTE')"
    ));
    // disable_outbox drops the counter.
    c.batch_execute("SELECT pgtrickle.disable_outbox('orders')")
        .unwrap();
    assert!(bool_of(
        &mut c,
        "SELECT to_regclass('pgtrickle.outbox_orders_asleep') IS NULL \
         AND NOT EXISTS (SELECT 1 FROM pgtrickle.outbox_sleepers)"
    ));
}

#[test]
fn installing_again_moves_older_outboxes_off_their_statement_triggers() {
    let (pg, url, mut c) = setup("wake_upgrade");
    // Outboxes of an older kit: the cluster check and the notification in
    // statement triggers, one without a sleep counter (notifying on every
    // insert), one made without notifications (two-phase commit), one
    // whose counter PUBLIC could read.
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('orders'), pgtrickle.enable_outbox('xa', p_notify => false),
                pgtrickle.enable_outbox('old');
         GRANT SELECT ON SEQUENCE pgtrickle.outbox_old_asleep TO PUBLIC;
         DROP SEQUENCE pgtrickle.outbox_orders_asleep;
         CREATE FUNCTION pgtrickle._outbox_notify() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN PERFORM pg_notify('pgtrickle_outbox_new', TG_TABLE_NAME); RETURN NULL; END $$;
         CREATE FUNCTION pgtrickle._outbox_cluster_check() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RETURN NULL; END $$;
         CREATE TRIGGER pgtrickle_outbox_notify AFTER INSERT ON pgtrickle.outbox_orders
             FOR EACH STATEMENT EXECUTE FUNCTION pgtrickle._outbox_notify();
         CREATE TRIGGER pgtrickle_outbox_cluster BEFORE INSERT ON pgtrickle.outbox_orders
             FOR EACH STATEMENT EXECUTE FUNCTION pgtrickle._outbox_cluster_check();
         CREATE TRIGGER pgtrickle_outbox_cluster BEFORE INSERT ON pgtrickle.outbox_xa
             FOR EACH STATEMENT EXECUTE FUNCTION pgtrickle._outbox_cluster_check();
         CREATE TRIGGER pgtrickle_outbox_notify AFTER INSERT ON pgtrickle.outbox_old
             FOR EACH STATEMENT EXECUTE FUNCTION pgtrickle._outbox_notify();",
    )
    .unwrap();
    let mut listener = pg.client(&url);
    listener
        .batch_execute("LISTEN pgtrickle_outbox_new")
        .unwrap();
    publish_one(&mut c);
    assert_eq!(notes(&mut listener, Duration::from_millis(300)), 1);
    pg.install_sql(&url);
    // No trigger left, nor the functions they ran; the outbox that notified
    // has its counter and notifies while a relay sleeps, the other not.
    assert!(bool_of(
        &mut c,
        "SELECT NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname LIKE 'pgtrickle\\_outbox%') \
           AND to_regprocedure('pgtrickle._outbox_notify()') IS NULL \
           AND to_regprocedure('pgtrickle._outbox_cluster_check()') IS NULL"
    ));
    assert!(bool_of(
        &mut c,
        "SELECT notifies AND notifies_sleepers FROM pgtrickle.relay_outbox_info('orders')"
    ));
    assert!(bool_of(
        &mut c,
        "SELECT NOT notifies AND NOT notifies_sleepers FROM pgtrickle.relay_outbox_info('xa')"
    ));
    assert!(bool_of(
        &mut c,
        "SELECT notifies AND notifies_sleepers FROM pgtrickle.relay_outbox_info('old')"
    ));
    assert!(bool_of(&mut c, PUBLIC_READS_NO_COUNTER));
    publish_one(&mut c);
    assert_eq!(notes(&mut listener, Duration::from_millis(300)), 0);
    let mut relay = pg.client(&url);
    sleep_call(&mut relay, true).unwrap();
    publish_one(&mut c);
    c.batch_execute("SELECT pgtrickle.outbox_publish('xa', '{\"n\": 1}')")
        .unwrap();
    // One, for outbox_orders (`notes` fails on any other).
    assert_eq!(notes(&mut listener, Duration::from_millis(300)), 1);
}

/// Many writers in bursts, the relay idle between them with a 60 s poll
/// interval: every burst is delivered within seconds. A commit the relay
/// slept on without a notification would wait for the poll interval.
#[test]
fn every_burst_arrives_at_once_though_writers_notify_only_while_the_relay_sleeps() {
    let dir = temp_dir("wake_bursts");
    let file = dir.join("out.jsonl");
    let url = outbox_pipeline(
        "wake_bursts",
        &serde_json::json!({"type": "stdout", "path": file}),
    );
    let relay = Relay::spawn(relay(&url).args(["--poll-interval-ms", "60000"]));
    relay.wait_log("forwarding outbox", 30);
    const WRITERS: usize = 8;
    const BURSTS: usize = 40;
    let mut clients: Vec<Client> = (0..WRITERS).map(|_| Pg::shared().client(&url)).collect();
    let mut total = 0;
    let mut slowest = Duration::ZERO;
    for burst in 0..BURSTS {
        // Each writer commits 1..=3 one-event transactions, all starting
        // together; some hold their transaction open a little (a writer
        // that inserted before the relay counted itself asleep).
        let start = Arc::new(Barrier::new(WRITERS));
        let handles: Vec<_> = clients
            .drain(..)
            .enumerate()
            .map(|(w, mut c)| {
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    let n = 1 + (burst + w) % 3;
                    for i in 0..n {
                        let mut tx = c.transaction().unwrap();
                        tx.execute(
                            "SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('b', $1::int, 'w', $2::int, 'i', $3::int))",
                            &[&(burst as i32), &(w as i32), &(i as i32)],
                        )
                        .unwrap();
                        if (burst * 7 + w + i) % 5 == 0 {
                            tx.execute("SELECT pg_sleep(0.002 * $1::int)", &[&((w % 4) as i32)])
                                .unwrap();
                        }
                        tx.commit().unwrap();
                    }
                    (c, n)
                })
            })
            .collect();
        for h in handles {
            let (c, n) = h.join().unwrap();
            clients.push(c);
            total += n;
        }
        let written = Instant::now();
        let deadline = written + Duration::from_secs(5);
        while count_lines(&file) < total {
            assert!(
                Instant::now() < deadline,
                "burst {burst}: {} of {total} events after 5 s (poll interval 60 s: a missed \
                 wake-up); log:\n{}",
                count_lines(&file),
                relay.stderr()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        slowest = slowest.max(written.elapsed());
        // Idle for a moment: the relay falls asleep before the next burst.
        let idle_until = Instant::now() + Duration::from_millis(20 + (burst as u64 % 4) * 10);
        while Instant::now() < idle_until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    eprintln!("{total} events in {BURSTS} bursts; slowest burst delivered after {slowest:?}");
    let log = relay.stderr();
    assert!(!log.contains("ERROR"), "{log}");
}

/// A writer that inserted while no relay was asleep (so it will not
/// notify) and commits after the relay counted itself asleep: the relay
/// must not sleep on it. It is the case the guard transaction id covers;
/// without it the relay would wait for the 60 s poll interval.
#[test]
fn a_writer_that_read_the_counter_before_the_relay_fell_asleep_is_not_slept_on() {
    let dir = temp_dir("wake_guard");
    let file = dir.join("out.jsonl");
    let url = outbox_pipeline(
        "wake_guard",
        &serde_json::json!({"type": "stdout", "path": file}),
    );
    let mut c = Pg::shared().client(&url);
    let mut w = Pg::shared().client(&url);
    let counter = |c: &mut Client| -> i64 {
        c.query_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM pgtrickle.outbox_orders_asleep",
            &[],
        )
        .unwrap()
        .get(0)
    };
    for round in 1..=3 {
        // Nobody asleep (a relay of the round before is gone: recount,
        // until its backend has left pg_stat_activity; a killed client's
        // backend lingers there for a moment and counts as asleep).
        wait_until(30, "the relay of the round before to be gone", || {
            sleep_call(&mut c, false);
            counter(&mut c) == 0
        });
        w.batch_execute("BEGIN").unwrap();
        let id: i64 = w
            .query_one(
                "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 1}')",
                &[],
            )
            .unwrap()
            .get(0);
        let relay = Relay::spawn(relay(&url).args(["--poll-interval-ms", "60000"]));
        wait_until(30, "the relay to count itself asleep", || {
            counter(&mut c) == 1
        });
        // And to be between two looks (or asleep) for 50 ms: it has read
        // the outbox since, and W's row was not committed.
        wait_until(30, "the relay to wait", || {
            c.query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgtrickle-relay fwd' \
                   AND state = 'idle' AND clock_timestamp() - state_change > interval '50 ms')",
                &[],
            )
            .unwrap()
            .get(0)
        });
        w.batch_execute("COMMIT").unwrap();
        let committed = Instant::now();
        while !read_jsonl(&file).iter().any(|e| e["outbox_id"] == id) {
            assert!(
                committed.elapsed() < Duration::from_secs(5),
                "round {round}: the relay slept on a commit that did not notify; log:\n{}",
                relay.stderr()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(relay);
    }
}

/// The relay's listening connection is terminated while it sleeps (60 s
/// poll interval): a commit meanwhile is still delivered at once (the
/// pipelines poll while it is down), and once it is back a commit wakes the
/// relay through it again.
#[test]
fn a_lost_listening_connection_neither_loses_nor_delays_a_wake_up() {
    let dir = temp_dir("wake_listener");
    let file = dir.join("out.jsonl");
    let url = outbox_pipeline(
        "wake_listener",
        &serde_json::json!({"type": "stdout", "path": file}),
    );
    let mut c = Pg::shared().client(&url);
    let relay = Relay::spawn(relay(&url).args(["--poll-interval-ms", "60000"]));
    relay.wait_log("forwarding outbox", 30);
    let delivered_within = |c: &mut Client, n: usize, what: &str| {
        publish_one(c);
        let published = Instant::now();
        while count_lines(&file) < n {
            assert!(
                published.elapsed() < Duration::from_secs(3),
                "{what}: event {n} not delivered after 3 s; log:\n{}",
                relay.stderr()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    delivered_within(&mut c, 1, "before");
    let asleep = |c: &mut Client| -> bool {
        c.query_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END = 1 \
             FROM pgtrickle.outbox_orders_asleep",
            &[],
        )
        .unwrap()
        .get(0)
    };
    wait_until(30, "the relay to sleep", || asleep(&mut c));
    let killed: i64 = c
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'pgtrickle-relay listener' AND datname = current_database()",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(killed, 1, "one listening connection");
    delivered_within(&mut c, 2, "while the listener is down");
    relay.wait_log("listening for outbox notifications again", 30);
    wait_until(30, "the relay to sleep again", || asleep(&mut c));
    delivered_within(&mut c, 3, "after the listener is back");
    let log = relay.stderr();
    assert!(!log.contains("ERROR"), "{log}");
}

/// A relay that stops (SIGTERM) while asleep counts itself out, and one
/// that died asleep (SIGKILL) is counted out by the next session that reads
/// the outbox, even one that never sleeps (`--once`): writers do not go on
/// paying a NOTIFY in every transaction for a relay that is gone.
#[test]
fn a_relay_that_stops_or_dies_asleep_does_not_leave_writers_notifying() {
    let dir = temp_dir("wake_gone");
    let url = outbox_pipeline(
        "wake_gone",
        &serde_json::json!({"type": "stdout", "path": dir.join("out.jsonl")}),
    );
    let mut c = Pg::shared().client(&url);
    let counter = |c: &mut Client| -> i64 {
        c.query_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM pgtrickle.outbox_orders_asleep",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let sleepers = |c: &mut Client| -> i64 {
        c.query_one("SELECT count(*) FROM pgtrickle.outbox_sleepers", &[])
            .unwrap()
            .get(0)
    };
    publish_one(&mut c);
    let mut r = Relay::spawn(&mut relay(&url));
    wait_until(30, "the relay to count itself asleep", || {
        counter(&mut c) == 1
    });
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(30), Some(0), "log:\n{}", r.stderr());
    assert_eq!(
        (counter(&mut c), sleepers(&mut c)),
        (0, 0),
        "a stopped relay still counted asleep; log:\n{}",
        r.stderr()
    );

    let r = Relay::spawn(&mut relay(&url));
    wait_until(30, "the relay to count itself asleep again", || {
        counter(&mut c) == 1
    });
    drop(r); // SIGKILL: nothing counts it out
    assert_eq!(counter(&mut c), 1);
    wait_until(30, "the killed relay's backend to be gone", || {
        c.query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity \
               WHERE application_name LIKE 'pgtrickle-relay%' AND datname = current_database())",
            &[],
        )
        .unwrap()
        .get(0)
    });
    publish_one(&mut c);
    let out = run_once(&url);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        (counter(&mut c), sleepers(&mut c)),
        (0, 0),
        "the dead relay still counted asleep after another read the outbox"
    );
}
