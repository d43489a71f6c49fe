//! The `postgres` source end to end: an outbox in one PostgreSQL cluster →
//! relay binary → the inbox of a database in another cluster.
//!
//! Every test counts inbox write attempts with a BEFORE INSERT trigger
//! (it fires for every row offered, also for one `ON CONFLICT DO NOTHING`
//! then drops, and its count rolls back with an aborted transaction): each
//! event written in exactly one committed transaction is exactly-once, not
//! merely deduplicated by the inbox.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use support::*;

/// A remote cluster with outbox `orders`, and a local database (on the
/// shared server) with pipeline `rin` reading it into inbox `events`. The
/// relay logs in on both sides as a role that is only a member of
/// `pgtrickle_relay`; the tests use the superuser.
struct Setup {
    remote: Pg,
    remote_url: String,
    /// The remote database as the relay's role sees it.
    source_url: String,
    local_url: String,
    /// The local database as the relay's role sees it.
    relay_url: String,
}

/// Create login role `name`, a member of `pgtrickle_relay` only, on the
/// server of `url` (roles are shared by a server's databases and tests).
fn relay_role(url: &str, name: &str) {
    postgres::Client::connect(url, postgres::NoTls)
        .unwrap()
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {name} LOGIN PASSWORD 'pw';
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
             GRANT pgtrickle_relay TO {name};"
        ))
        .unwrap();
}

fn setup(name: &str, extra: serde_json::Value) -> Setup {
    let remote = Pg::start();
    let remote_url = remote.new_db(name);
    remote
        .client(&remote_url)
        .batch_execute("SELECT pgtrickle.enable_outbox('orders')")
        .unwrap();
    relay_role(&remote_url, "rpg_reader");
    let source_url = remote.url_as(name, "rpg_reader", "pw");
    let local_db = format!("{name}_local");
    let local_url = Pg::shared().new_db(&local_db);
    let mut source = json!({"type": "postgres", "url": source_url, "outbox": "orders"});
    for (k, v) in extra.as_object().unwrap() {
        source[k] = v.clone();
    }
    set_inbox(&local_url, source);
    Pg::shared()
        .client(&local_url)
        .batch_execute(
            "CREATE TABLE public.attempts (event_id text);
             GRANT INSERT ON public.attempts TO pgtrickle_relay;
             CREATE FUNCTION public.count_attempt() RETURNS trigger LANGUAGE plpgsql AS
               $$BEGIN INSERT INTO public.attempts VALUES (NEW.event_id); RETURN NEW; END$$;
             CREATE TRIGGER count_attempt BEFORE INSERT ON pgtrickle.events
               FOR EACH ROW EXECUTE FUNCTION public.count_attempt();",
        )
        .unwrap();
    relay_role(&local_url, "rpg_writer");
    Setup {
        remote,
        remote_url,
        source_url,
        relay_url: Pg::shared().url_as(&local_db, "rpg_writer", "pw"),
        local_url,
    }
}

/// The relay on the local database (as the relay's role), running
/// pipeline `rin` only.
fn rin(s: &Setup, args: &[&str]) -> std::process::Command {
    let mut c = relay(&s.relay_url);
    c.args(["--pipeline", "rin"]).args(args);
    c
}

/// `outbox_orders:<id>:0` for ids `from..=to`.
fn one_event_rows(from: i64, to: i64) -> HashSet<String> {
    (from..=to)
        .map(|i| format!("outbox_orders:{i}:0"))
        .collect()
}

/// Every id of `expected` is in the inbox, nothing else is, and each was
/// written in exactly one committed transaction.
fn assert_exactly_once(local_url: &str, expected: &HashSet<String>) {
    assert_inbox(local_url, expected);
    let twice: Vec<(String, i64)> = Pg::shared()
        .client(local_url)
        .query(
            "SELECT event_id, count(*) FROM public.attempts GROUP BY 1 HAVING count(*) > 1 \
             ORDER BY 1 LIMIT 5",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(twice.is_empty(), "written more than once: {twice:?}");
}

/// Every id of `expected` is in the inbox once, and nothing else is.
fn assert_inbox(local_url: &str, expected: &HashSet<String>) {
    let ids = inbox_ids(local_url);
    let missing: Vec<_> = expected.difference(&ids).take(5).collect();
    let extra: Vec<_> = ids.difference(expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} missing (e.g. {missing:?}), {} extra (e.g. {extra:?})",
        expected.difference(&ids).count(),
        ids.difference(expected).count()
    );
    let mut c = Pg::shared().client(local_url);
    let (rows, distinct): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*), count(DISTINCT event_id) FROM pgtrickle.events",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (rows, distinct),
        (expected.len() as i64, expected.len() as i64)
    );
}

/// The pipeline's committed position: (last_change_id, last_row_num, source_id).
fn position(local_url: &str) -> Option<(i64, Option<i32>, String)> {
    Pg::shared()
        .client(local_url)
        .query_opt(
            "SELECT last_change_id, last_row_num, source_id FROM pgtrickle.relay_consumer_offsets \
             WHERE pipeline_id = 'rin'",
            &[],
        )
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Publish a change set of `inserted` rows `{"i": 0..}` and `deleted` rows
/// `{"d": 0..}` into outbox `orders`, claim-check above `threshold` rows;
/// returns its outbox id.
fn publish_delta(url: &str, inserted: i64, deleted: i64, threshold: i64) -> i64 {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    c.batch_execute(&format!(
        "SET pgtrickle.outbox_inline_threshold = {threshold}"
    ))
    .unwrap();
    c.query_one(
        "SELECT pgtrickle.outbox_publish_delta('orders', \
           (SELECT jsonb_agg(jsonb_build_object('i', g)) FROM generate_series(0, $1::bigint - 1) g), \
           coalesce((SELECT jsonb_agg(jsonb_build_object('d', g)) \
                     FROM generate_series(0, $2::bigint - 1) g), '[]'))",
        &[&inserted, &deleted],
    )
    .unwrap()
    .get(0)
}

/// The ids of the events of change set `id` with `n` rows.
fn delta_rows(id: i64, n: i64) -> HashSet<String> {
    (0..n).map(|r| format!("outbox_orders:{id}:{r}")).collect()
}

fn run_once(s: &Setup) -> std::process::Output {
    rin(s, &["--once"]).output().unwrap()
}

fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_event_arrives_once_inline_and_claim_check() {
    let s = setup("rpg_all", json!({}));
    publish(&s.remote_url, 0, 300);
    let small = publish_delta(&s.remote_url, 3, 2, 10_000);
    // A claim-check of 2,500 rows, written over three batches of 1,000.
    let big = publish_delta(&s.remote_url, 2_000, 500, 100);
    publish(&s.remote_url, 300, 200);
    let mut expected = one_event_rows(1, 300);
    expected.extend(delta_rows(small, 5));
    expected.extend(delta_rows(big, 2_500));
    expected.extend(one_event_rows(big + 1, big + 200));

    let mut r = Relay::spawn(&mut rin(&s, &["--batch-size", "1000"]));
    wait_until(60, "every event in the inbox", || {
        inbox_count(&s.local_url) >= expected.len() as i64
    });
    assert_exactly_once(&s.local_url, &expected);

    // The row is the one the pg-inbox sink would write.
    let mut c = Pg::shared().client(&s.local_url);
    let row = c
        .query_one(
            "SELECT event_type, source, payload::text FROM pgtrickle.events \
             WHERE event_id = 'outbox_orders:1:0'",
            &[],
        )
        .unwrap();
    let got: (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        got,
        (
            "pgtrickle.orders.insert".into(),
            "outbox_orders".into(),
            r#"{"n": 0}"#.into()
        )
    );
    // Deletes come first in a change set, as in the forward direction.
    let first: String = c
        .query_one(
            &format!(
                "SELECT event_type FROM pgtrickle.events WHERE event_id = 'outbox_orders:{big}:0'"
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(first, "pgtrickle.orders.delete");
    // Woken by notifications: with a 60 s poll interval, new rows arrive at once.
    drop(r);
    r = Relay::spawn(&mut rin(
        &s,
        &["--batch-size", "1000", "--poll-interval-ms", "60000"],
    ));
    r.wait_log("reading outbox outbox_orders", 20);
    publish(&s.remote_url, 500, 10);
    expected.extend(one_event_rows(big + 201, big + 210));
    wait_until(20, "the events published later", || {
        inbox_count(&s.local_url) >= expected.len() as i64
    });

    // The position, in the local database, names the remote cluster and
    // outbox; the claim-check was reported to the remote after the commit.
    let sysid: i64 = s
        .remote
        .client(&s.remote_url)
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        position(&s.local_url),
        Some((big + 210, None, format!("{sysid}:outbox_orders")))
    );
    let drained: Option<i64> = s
        .remote
        .client(&s.remote_url)
        .query_one(
            "SELECT last_drained_count FROM pgtrickle.pgt_outbox_config WHERE stream_table_name = 'orders'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(drained, Some(2_500));
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(10), Some(0));

    // Run again: nothing to read, nothing written twice.
    assert_ok(&run_once(&s));
    assert_exactly_once(&s.local_url, &expected);
}

#[test]
fn sigkill_mid_stream_loses_nothing_and_writes_nothing_twice() {
    let s = setup("rpg_kill", json!({"batch_size": 100}));
    // A claim-check of 30,000 rows first, so the kill lands inside it.
    let big = publish_delta(&s.remote_url, 30_000, 0, 100);
    publish(&s.remote_url, 0, 3_000);
    let mut expected = delta_rows(big, 30_000);
    expected.extend(one_event_rows(big + 1, big + 3_000));

    let mut r = Relay::spawn(&mut rin(&s, &[]));
    wait_until(60, "some events", || inbox_count(&s.local_url) > 2_000);
    r.signal(libc::SIGKILL);
    r.wait_exit(10);
    // The position was committed with the rows: inside the claim-check,
    // exactly at the last delta row in the inbox.
    let n = inbox_count(&s.local_url);
    assert!(n < 30_000, "the kill came too late ({n})");
    let (id, row_num, _) = position(&s.local_url).expect("a committed position");
    assert_eq!((id, row_num.map(|k| k as i64 + 1)), (big, Some(n)));

    // Again, killed once more, then to the end.
    let mut r = Relay::spawn(&mut rin(&s, &[]));
    wait_until(60, "more events", || inbox_count(&s.local_url) > n + 2_000);
    r.signal(libc::SIGKILL);
    r.wait_exit(10);
    assert_ok(&run_once(&s));
    assert_exactly_once(&s.local_url, &expected);
    assert_eq!(position(&s.local_url).unwrap().0, big + 3_000);
}

#[test]
fn remote_restart_mid_stream_loses_nothing() {
    let mut s = setup("rpg_restart", json!({"batch_size": 20}));
    publish(&s.remote_url, 0, 20_000);
    let mut r = Relay::spawn(&mut rin(&s, &["--poll-interval-ms", "60000"]));
    wait_until(60, "some events", || inbox_count(&s.local_url) > 1_000);
    s.remote.stop();
    let n = inbox_count(&s.local_url);
    assert!(n < 20_000, "the restart came too late ({n})");
    s.remote.start_again();
    wait_until(60, "every event after the restart", || {
        inbox_count(&s.local_url) >= 20_000
    });
    assert!(
        r.stderr().contains("postgres source"),
        "the restart was not noticed:\n{}",
        r.stderr()
    );
    // LISTEN again after reconnecting: new rows arrive long before the
    // 60 s poll interval.
    publish(&s.remote_url, 20_000, 10);
    wait_until(20, "the events published after the restart", || {
        inbox_count(&s.local_url) >= 20_010
    });
    assert_exactly_once(&s.local_url, &one_event_rows(1, 20_010));
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(10), Some(0));
}

#[test]
fn out_of_order_writers_on_the_remote_side_lose_nothing() {
    let s = setup("rpg_order", json!({"type": "pg-outbox"}));
    let mut r = Relay::spawn(&mut rin(&s, &["--poll-interval-ms", "200"]));
    r.wait_log("reading outbox outbox_orders", 20);

    // A takes outbox id 1 and stays open; B takes id 2 and commits.
    let mut a = s.remote.client(&s.remote_url);
    let mut a = a.transaction().unwrap();
    a.execute(
        "SELECT pgtrickle.outbox_publish('orders', '{\"w\": \"a\"}')",
        &[],
    )
    .unwrap();
    let mut b = s.remote.client(&s.remote_url);
    b.execute(
        "SELECT pgtrickle.outbox_publish('orders', '{\"w\": \"b\"}')",
        &[],
    )
    .unwrap();
    let committed: std::time::SystemTime =
        b.query_one("SELECT clock_timestamp()", &[]).unwrap().get(0);
    // Wait until the relay has read the outbox since B committed (it looks
    // at the rows the horizon holds back after each empty read).
    wait_until(20, "a read after B committed", || {
        b.query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'pgtrickle-relay rin (postgres source)' \
               AND query LIKE 'SELECT EXISTS%' AND query_start > $1",
            &[&committed],
        )
        .unwrap()
        .get::<_, i64>(0)
            > 0
    });
    // B waits behind A: reading it now would have passed id 1 for good.
    assert_eq!(inbox_count(&s.local_url), 0);
    a.commit().unwrap();
    wait_until(20, "A and B", || inbox_count(&s.local_url) >= 2);

    // Many writers committing out of id order.
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let url = s.remote_url.clone();
            std::thread::spawn(move || {
                let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                for i in 0..50i64 {
                    let n = w * 50 + i;
                    let mut tx = c.transaction().unwrap();
                    tx.execute(
                        "SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('n', $1::bigint))",
                        &[&n],
                    )
                    .unwrap();
                    // Held open a little, so later ids commit first.
                    std::thread::sleep(Duration::from_millis(((n * 7919) % 13) as u64));
                    tx.commit().unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    wait_until(30, "every event", || inbox_count(&s.local_url) >= 302);
    assert_exactly_once(&s.local_url, &one_event_rows(1, 302));
    r.signal(libc::SIGTERM);
    assert_eq!(r.wait_exit(10), Some(0));
}

#[test]
fn a_pg_trickle_outbox_without_txid_is_read_by_id() {
    let s = setup("rpg_trickle", json!({}));
    // pg_trickle's own shape: no txid, no headers.
    let mut c = s.remote.client(&s.remote_url);
    c.batch_execute(
        "ALTER TABLE pgtrickle.outbox_orders DROP COLUMN txid CASCADE, DROP COLUMN headers;
         INSERT INTO pgtrickle.outbox_orders (inserted_count, deleted_count, payload)
           SELECT 1, 0, jsonb_build_object('v', 1, 'inserted', jsonb_build_array(jsonb_build_object('n', g)))
           FROM generate_series(1, 50) g;
         INSERT INTO pgtrickle.outbox_orders (id, inserted_count, deleted_count, is_claim_check, payload)
           VALUES (51, 20, 0, true, '{\"v\": 1, \"claim_check\": true}');
         INSERT INTO pgtrickle.outbox_delta_rows_orders (outbox_id, row_num, op, payload)
           SELECT 51, g, 'I', jsonb_build_object('c', g) FROM generate_series(0, 19) g;
         SELECT setval('pgtrickle.outbox_orders_id_seq', 51);",
    )
    .unwrap();
    let out = rin(&s, &["--once", "--batch-size", "7"]).output().unwrap();
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(id order)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut expected = one_event_rows(1, 50);
    expected.extend(delta_rows(51, 20));
    assert_exactly_once(&s.local_url, &expected);
    let (id, row_num, _) = position(&s.local_url).unwrap();
    assert_eq!((id, row_num), (51, None));
}

#[test]
fn an_unsupported_payload_version_stops_with_the_pipeline_and_outbox_id() {
    let s = setup("rpg_version", json!({}));
    publish(&s.remote_url, 0, 3);
    let mut c = s.remote.client(&s.remote_url);
    c.batch_execute(
        "INSERT INTO pgtrickle.outbox_orders (payload) VALUES ('{\"v\": 2, \"inserted\": [{\"n\": 9}]}')",
    )
    .unwrap();
    publish(&s.remote_url, 4, 2);
    let out = run_once(&s);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "pipeline \"rin\": outbox outbox_orders id 4: unsupported payload version v=2"
        ),
        "{stderr}"
    );
    // What came before it is written, and the position stops before it.
    assert_exactly_once(&s.local_url, &one_event_rows(1, 3));
    assert_eq!(position(&s.local_url).unwrap().0, 3);
    // Fixed, it goes on.
    c.batch_execute(
        "UPDATE pgtrickle.outbox_orders SET payload = payload || '{\"v\": 1}' WHERE id = 4",
    )
    .unwrap();
    assert_ok(&run_once(&s));
    assert_exactly_once(&s.local_url, &one_event_rows(1, 6));
}

#[test]
fn bad_configs_name_the_pipeline_and_the_key_and_mask_the_password() {
    let local = Pg::shared().new_db("rpg_config");
    let once = |url: &str| {
        relay(url)
            .args(["--once", "--pipeline", "rin"])
            .output()
            .unwrap()
    };
    for (source, key) in [
        (
            json!({"type": "postgres", "url": "postgres://h/d"}),
            "source.outbox",
        ),
        (
            json!({"type": "postgres", "url": "postgres://h/d", "outbox": "o", "table": "t"}),
            "source.table",
        ),
        (
            json!({"type": "postgres", "url": "postgres://h/d", "outbox": "o", "subject": "{x}"}),
            "source.subject",
        ),
    ] {
        set_inbox(&local, source);
        let out = once(&local);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("pipeline \"rin\": bad config") && stderr.contains(&format!("`{key}`")),
            "{key}: {stderr}"
        );
    }
    // A server that is not there: the error names the key and masks the
    // password.
    let port = free_port();
    set_inbox(
        &local,
        json!({"type": "postgres", "outbox": "o",
               "url": format!("postgres://relay:s3cr3t@127.0.0.1:{port}/d")}),
    );
    let out = once(&local);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("pipeline \"rin\": source.url")
            && stderr.contains(&format!("postgres://relay:***@127.0.0.1:{port}/d")),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cr3t"), "{stderr}");
}

#[test]
fn the_position_and_the_events_commit_together() {
    let s = setup("rpg_atomic", json!({"batch_size": 3}));
    publish(&s.remote_url, 0, 3);
    let cc = publish_delta(&s.remote_url, 5, 0, 2);
    // Refuse the position that completes the claim-check row.
    let mut c = Pg::shared().client(&s.local_url);
    c.batch_execute(&format!(
        "CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS
           $$BEGIN
               IF NEW.last_change_id = {cc} AND NEW.last_row_num IS NULL THEN
                   RAISE EXCEPTION 'position refused for the test';
               END IF;
               RETURN NEW;
           END$$;
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON pgtrickle.relay_consumer_offsets
           FOR EACH ROW EXECUTE FUNCTION public.refuse();"
    ))
    .unwrap();
    let out = run_once(&s);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("position refused for the test"), "{stderr}");
    // Batches: ids 1-3; claim-check rows 0-2; then rows 3-4 with the
    // completed row's position, refused: its events are not in the inbox,
    // and the claim-check was not reported to the remote.
    let mut expected = one_event_rows(1, 3);
    expected.extend(delta_rows(cc, 3));
    assert_exactly_once(&s.local_url, &expected);
    assert_eq!(position(&s.local_url).unwrap().1, Some(2));
    let mut remote = s.remote.client(&s.remote_url);
    let drained = "SELECT last_drained_at IS NOT NULL FROM pgtrickle.pgt_outbox_config";
    assert!(!remote.query_one(drained, &[]).unwrap().get::<_, bool>(0));

    c.batch_execute("DROP TRIGGER refuse ON pgtrickle.relay_consumer_offsets")
        .unwrap();
    assert_ok(&run_once(&s));
    expected.extend(delta_rows(cc, 5));
    assert_exactly_once(&s.local_url, &expected);
    assert!(remote.query_one(drained, &[]).unwrap().get::<_, bool>(0));
    // A pipeline deleted meanwhile gets no position back.
    let recorded: bool = c
        .query_one(
            "SELECT pgtrickle.relay_commit_source_offset('default', 'gone', 1, NULL, NULL, '1:t', 'w')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!recorded);
}

#[test]
fn a_position_of_another_cluster_or_outbox_is_not_used() {
    let s = setup("rpg_moved", json!({}));
    publish(&s.remote_url, 0, 5);
    assert_ok(&run_once(&s));
    assert_exactly_once(&s.local_url, &one_event_rows(1, 5));

    // Another outbox of the same database: read from its beginning.
    let mut c = s.remote.client(&s.remote_url);
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('items');
         SELECT pgtrickle.outbox_publish('items', jsonb_build_object('k', g)) FROM generate_series(1, 2) g;",
    )
    .unwrap();
    set_inbox(
        &s.local_url,
        json!({"type": "postgres", "url": s.source_url, "outbox": "items"}),
    );
    let out = run_once(&s);
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "the committed position belonged to outbox outbox_orders: starting at the beginning \
             of outbox outbox_items"
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut expected = one_event_rows(1, 5);
    expected.extend([
        "outbox_items:1:0".to_string(),
        "outbox_items:2:0".to_string(),
    ]);
    assert_exactly_once(&s.local_url, &expected);

    // A position read from another cluster (the harness's clusters are
    // copies of one initdb and share a system identifier: the position is
    // made to name another), or ahead of this cluster's transaction ids
    // (a restore from a backup): the pipeline waits.
    let mut local = Pg::shared().client(&s.local_url);
    for (change, message) in [
        (
            "source_id = '1:' || split_part(source_id, ':', 2)",
            "pipeline \"rin\": its committed position was read from 1:outbox_items \
             (PostgreSQL cluster system identifier:outbox table), but the database at",
        ),
        (
            "last_txid = '99999999'",
            "pipeline \"rin\": its position (txid 99999999, outbox id 3) is ahead of the next \
             transaction id",
        ),
    ] {
        local
            .batch_execute(&format!(
                "UPDATE pgtrickle.relay_consumer_offsets SET {change} WHERE pipeline_id = 'rin'"
            ))
            .unwrap();
        c.batch_execute("SELECT pgtrickle.outbox_publish('items', '{\"k\": 3}')")
            .unwrap();
        let out = run_once(&s);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(message)
                && stderr.contains(
                    "Nothing was skipped: the pipeline waits. To read outbox outbox_items there \
                     from its beginning (events still in the inbox are not written twice), run: \
                     DELETE FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = 'rin';"
                ),
            "{stderr}"
        );
        assert_exactly_once(&s.local_url, &expected);
        local
            .batch_execute("DELETE FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = 'rin'")
            .unwrap();
        // As the error says: from the beginning, one row per event.
        assert_ok(&run_once(&s));
        let n = expected.len() - 5 + 1;
        expected.insert(format!("outbox_items:{n}:0"));
        assert_inbox(&s.local_url, &expected);
        local.batch_execute("TRUNCATE public.attempts").unwrap();
    }
}

#[test]
fn an_event_the_inbox_refuses_is_a_dead_letter_in_the_same_transaction() {
    let s = setup("rpg_refused", json!({}));
    Pg::shared()
        .client(&s.local_url)
        .batch_execute(
            "ALTER TABLE pgtrickle.events ADD CONSTRAINT not_two \
             CHECK (payload->>'n' IS DISTINCT FROM '2')",
        )
        .unwrap();
    publish(&s.remote_url, 0, 5);
    assert_ok(&run_once(&s));
    // Found by halving the batch under savepoints: the transaction, and
    // the position written in it, survive the refusals.
    assert_inbox(&s.local_url, &one_event_rows(1, 5));
    let error: Option<String> = Pg::shared()
        .client(&s.local_url)
        .query_one(
            "SELECT error FROM pgtrickle.events WHERE event_id = 'outbox_orders:3:0'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        error.as_deref().is_some_and(|e| e.contains("not_two")),
        "{error:?}"
    );
    assert_eq!(position(&s.local_url).unwrap().0, 5);
}
