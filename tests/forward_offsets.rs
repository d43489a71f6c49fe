//! Forward positions that must stay right when the database around them
//! changes: a pipeline pointed at another outbox, a pipeline deleted while
//! it runs, a database dumped and restored into another cluster, and a
//! position ahead of the cluster's transaction counter; and how positions
//! are committed: asynchronously, at most every 250 ms.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use postgres::Client;
use serde_json::json;
use support::*;

/// Publish `{"n": i}` for i in `range` into outbox `outbox`, one
/// transaction each (each gets its own txid, as application writes do).
fn publish_each(c: &mut Client, outbox: &str, range: std::ops::Range<i64>) {
    for n in range {
        c.execute(
            "SELECT pgtrickle.outbox_publish($1, jsonb_build_object('n', $2::bigint))",
            &[&outbox, &n],
        )
        .unwrap();
    }
}

/// The `n` of every line of `file` with its dedup key; panics if an `n`
/// came twice under two keys.
fn delivered(file: &Path) -> BTreeMap<i64, String> {
    let mut key_of = BTreeMap::new();
    for l in read_jsonl(file) {
        let n = l["payload"]["n"].as_i64().unwrap();
        let k = l["dedup_key"].as_str().unwrap().to_string();
        let first = key_of.entry(n).or_insert_with(|| k.clone());
        assert_eq!(*first, k, "n={n} delivered under two dedup keys");
    }
    key_of
}

fn ns(file: &Path) -> Vec<i64> {
    delivered(file).into_keys().collect()
}

fn file_sink(path: &Path) -> String {
    json!({"type": "stdout", "path": path}).to_string()
}

fn once(url: &str) -> std::process::Output {
    relay(url).arg("--once").output().unwrap()
}

fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "relay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// Item 14: another outbox, a deleted pipeline
// ---------------------------------------------------------------------------

#[test]
fn pointing_a_pipeline_at_another_outbox_starts_at_its_beginning() {
    let pg = Pg::shared();
    let url = pg.new_db("off_switch");
    let file = temp_dir("off_switch").join("events.jsonl");
    let mut c = pg.client(&url);
    c.batch_execute("SELECT pgtrickle.enable_outbox('a'); SELECT pgtrickle.enable_outbox('b');")
        .unwrap();
    // b's rows are older (lower txids) than everything the pipeline reads
    // from a: a position carried over from a would skip them.
    publish_each(&mut c, "b", 100..105);
    publish_each(&mut c, "a", 0..5);
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('fwd', 'a', 'default', $1::text::jsonb)",
        &[&file_sink(&file)],
    )
    .unwrap();
    assert_ok(&once(&url));
    assert_eq!(ns(&file), (0..5).collect::<Vec<_>>());

    c.execute(
        "SELECT pgtrickle.set_relay_outbox('fwd', 'b', 'default', $1::text::jsonb)",
        &[&file_sink(&file)],
    )
    .unwrap();
    assert_ok(&once(&url));
    assert_eq!(
        ns(&file),
        (0..5).chain(100..105).collect::<Vec<_>>(),
        "every event of the new outbox, from its beginning"
    );
    // The same outbox under its table name is the same outbox: the position stays.
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('fwd', 'outbox_b', 'default', $1::text::jsonb)",
        &[&file_sink(&file)],
    )
    .unwrap();
    assert_ok(&once(&url));
    assert_eq!(read_jsonl(&file).len(), 10, "nothing sent again");
}

#[test]
fn deleting_a_running_pipeline_leaves_no_offset_behind() {
    let pg = Pg::shared();
    let url = pg.new_db("off_delete");
    let file = temp_dir("off_delete").join("events.jsonl");
    let mut c = pg.client(&url);
    c.execute(
        "SELECT pgtrickle.enable_outbox('orders'), \
         pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb)",
        &[&json!({"type": "stdout", "path": file, "batch_size": 5}).to_string()],
    )
    .unwrap();
    publish(&url, 0, 30_000);
    let r = Relay::spawn(&mut relay(&url));
    // Delete it while it works off the backlog, with a position to commit.
    wait_until(60, "a part of the backlog", || {
        read_jsonl(&file).len() > 1_000
    });
    c.batch_execute("SELECT pgtrickle.delete_relay('fwd')")
        .unwrap();
    r.wait_log("pipeline \"fwd\" disabled or deleted; stopped", 30);
    assert!(
        read_jsonl(&file).len() < 30_000,
        "the backlog was done before the delete: the test proves nothing"
    );
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = 'fwd'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the stopping relay wrote the deleted offset back");
}

// ---------------------------------------------------------------------------
// Issue 11 item 1: offset commits off the critical path
// ---------------------------------------------------------------------------

/// Log every row written to `pgtrickle.<table>` for which `when` holds
/// into `public.<table>_log`: its `key` column and the `synchronous_commit`
/// of the writing transaction.
fn log_writes(c: &mut Client, table: &str, key: &str, when: &str) {
    c.batch_execute(&format!(
        "CREATE TABLE public.{table}_log (key bigint, sync text);
         CREATE FUNCTION public.log_{table}() RETURNS trigger LANGUAGE plpgsql AS
           $$BEGIN
               INSERT INTO public.{table}_log VALUES (NEW.{key}, current_setting('synchronous_commit'));
               RETURN NEW;
           END$$;
         CREATE TRIGGER log_writes AFTER INSERT OR UPDATE ON pgtrickle.{table}
           FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION public.log_{table}();"
    ))
    .unwrap();
}

/// Make `synchronous_commit` default to `on` in the current database, as
/// in production (the test server turns it off), so that the relay's own
/// setting shows in [`log_writes`].
fn synchronous_by_default(c: &mut Client) {
    c.batch_execute(
        "DO $$BEGIN
             EXECUTE format('ALTER DATABASE %I SET synchronous_commit = on', current_database());
         END$$",
    )
    .unwrap();
}

/// The rows logged by [`log_writes`] for `table`, in order.
fn logged(c: &mut Client, table: &str) -> Vec<(i64, String)> {
    c.query(&format!("SELECT key, sync FROM public.{table}_log"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[test]
fn single_events_share_asynchronous_offset_commits_and_a_kill_loses_none() {
    const EVERY: Duration = Duration::from_millis(250);
    let pg = Pg::shared();
    let url = pg.new_db("off_async");
    let file = temp_dir("off_async").join("events.jsonl");
    let mut c = pg.client(&url);
    c.execute(
        "SELECT pgtrickle.enable_outbox('orders'), \
         pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb)",
        &[&file_sink(&file)],
    )
    .unwrap();
    synchronous_by_default(&mut c);
    log_writes(&mut c, "relay_consumer_offsets", "last_change_id", "true");
    let r = Relay::spawn(&mut relay(&url));
    // 200 wake-ups of one event each: the next event is written once the
    // last one arrived.
    let started = Instant::now();
    for n in 0..200 {
        publish_each(&mut c, "orders", n..n + 1);
        wait_until(30, "the event", || count_lines(&file) > n as usize);
    }
    let took = started.elapsed();
    let commits = logged(&mut c, "relay_consumer_offsets");
    eprintln!("200 wake-ups in {took:?}: {} offset commits", commits.len());
    assert!(
        took < EVERY * 100,
        "200 wake-ups took {took:?}: too slow a machine to tell one commit per wake-up \
         from one per 250 ms"
    );
    let most = (took.as_secs_f64() / EVERY.as_secs_f64()) as usize + 2;
    assert!(
        commits.len() <= most,
        "{} offset commits for 200 wake-ups in {took:?}, more than one per 250 ms",
        commits.len()
    );
    assert!(
        commits.iter().all(|(_, sync)| sync == "off"),
        "offset commits waited for their WAL flush: {commits:?}"
    );
    // What was delivered and not yet committed is delivered again after a
    // kill, with the same dedup keys; nothing is lost.
    r.signal(libc::SIGKILL);
    drop(r);
    publish_each(&mut c, "orders", 200..210);
    assert_ok(&once(&url));
    assert_eq!(ns(&file), (0..210).collect::<Vec<_>>());
}

#[test]
fn consumer_group_commits_are_asynchronous() {
    let pg = Pg::shared();
    let url = pg.new_db("off_group_async");
    let file = temp_dir("off_group_async").join("events.jsonl");
    let mut c = pg.client(&url);
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('orders');
         SELECT pgtrickle.create_consumer_group('workers', 'orders', 'earliest');",
    )
    .unwrap();
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('g', 'orders', 'workers', $1::text::jsonb)",
        &[&json!({"type": "stdout", "path": file, "batch_size": 10}).to_string()],
    )
    .unwrap();
    synchronous_by_default(&mut c);
    log_writes(&mut c, "pgt_consumer_leases", "batch_end", "NEW.done");
    publish_each(&mut c, "orders", 0..30);
    assert_ok(&once(&url));
    assert_eq!(ns(&file), (0..30).collect::<Vec<_>>());
    let commits = logged(&mut c, "pgt_consumer_leases");
    assert_eq!(commits.len(), 3, "{commits:?}");
    assert!(
        commits.iter().all(|(_, sync)| sync == "off"),
        "commit_offset waited for its WAL flush: {commits:?}"
    );
}

// ---------------------------------------------------------------------------
// Item 5: moving a database to another cluster
// ---------------------------------------------------------------------------

/// A transaction id far above a fresh cluster's (a pg_xact page start).
const HIGH_XID: u64 = 5 * 1_048_576;

/// A cluster pushed to `HIGH_XID` with database `app`: outbox `orders`,
/// pipeline `fwd` (own offset) to `dir/fwd.jsonl` and pipeline `grp`
/// (consumer group `workers`) to `dir/grp.jsonl`, events 0..5 relayed;
/// then dumped. Returns the dump.
fn relayed_on_a_busy_cluster(dir: &Path) -> PathBuf {
    let a = Pg::start_at_xid(HIGH_XID);
    let url = a.new_db("app");
    let mut c = a.client(&url);
    c.batch_execute("SELECT pgtrickle.enable_outbox('orders')")
        .unwrap();
    c.batch_execute("SELECT pgtrickle.create_consumer_group('workers', 'orders', 'earliest')")
        .unwrap();
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb), \
                pgtrickle.set_relay_outbox('grp', 'orders', 'workers', $2::text::jsonb)",
        &[
            &file_sink(&dir.join("fwd.jsonl")),
            &file_sink(&dir.join("grp.jsonl")),
        ],
    )
    .unwrap();
    publish_each(&mut c, "orders", 0..5);
    assert_ok(&once(&url));
    for f in ["fwd.jsonl", "grp.jsonl"] {
        assert_eq!(ns(&dir.join(f)), (0..5).collect::<Vec<_>>(), "{f}");
    }
    let txid: String = c
        .query_one("SELECT max(txid)::text FROM pgtrickle.outbox_orders", &[])
        .unwrap()
        .get(0);
    assert!(txid.parse::<u64>().unwrap() > HIGH_XID, "txid {txid}");
    a.dump(&url)
}

fn next_xid(c: &mut Client) -> u64 {
    let s: String = c
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .unwrap()
        .get(0);
    s.parse().unwrap()
}

/// Both pipelines have every event of `0..n`, each under one key.
fn assert_all(dir: &Path, n: i64) {
    for f in ["fwd.jsonl", "grp.jsonl"] {
        assert_eq!(
            ns(&dir.join(f)),
            (0..n).collect::<Vec<_>>(),
            "{f}: every event, none lost"
        );
    }
}

#[test]
fn events_written_after_a_restore_into_a_new_cluster_are_all_delivered() {
    let dir = temp_dir("off_restore");
    let dump = relayed_on_a_busy_cluster(&dir);
    let b = Pg::start_fresh();
    let url = b.restore("app", &dump);
    let mut c = b.client(&url);
    assert!(
        next_xid(&mut c) < HIGH_XID,
        "the new cluster's xids are lower"
    );
    // The application writes first, the relay comes later.
    publish_each(&mut c, "orders", 5..8);
    let out = once(&url);
    assert_ok(&out);
    assert_all(&dir, 8);
    // Later writes go out once, nothing again.
    let before = [
        read_jsonl(&dir.join("fwd.jsonl")).len(),
        read_jsonl(&dir.join("grp.jsonl")).len(),
    ];
    publish_each(&mut c, "orders", 8..10);
    assert_ok(&once(&url));
    assert_all(&dir, 10);
    assert_eq!(read_jsonl(&dir.join("fwd.jsonl")).len(), before[0] + 2);
    assert_eq!(read_jsonl(&dir.join("grp.jsonl")).len(), before[1] + 2);
}

/// A logical-replication cutover carries no sequences: ids start again
/// low, below the positions' (the old rows went with retention here). Each
/// publish function must rebase before its first write: a row written
/// before the rebase would get txid 2 with its low id, and sort before the
/// positions, skipped.
#[test]
fn every_publish_function_rebases_before_its_first_write_after_a_cutover() {
    let firsts = [
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 5}')",
        "SELECT pgtrickle.outbox_publish_delta('orders', '[{\"n\": 5}]')",
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": 5}', p_idempotency_key => 'five')",
    ];
    for (i, first) in firsts.iter().enumerate() {
        let dir = temp_dir(&format!("off_cutover_first_write{i}"));
        let dump = relayed_on_a_busy_cluster(&dir);
        let b = Pg::start_fresh();
        let url = b.restore("app", &dump);
        let mut c = b.client(&url);
        c.batch_execute(
            "DELETE FROM pgtrickle.outbox_orders;
             SELECT setval('pgtrickle.outbox_orders_id_seq', 1, false);",
        )
        .unwrap();
        c.batch_execute(first).unwrap();
        assert_ok(&once(&url));
        assert_all(&dir, 6);
    }
}

#[test]
fn a_relay_started_on_a_restored_database_before_any_write_delivers_every_event() {
    let dir = temp_dir("off_restore_first");
    let dump = relayed_on_a_busy_cluster(&dir);
    let b = Pg::start_fresh();
    let url = b.restore("app", &dump);
    // The relay comes first and keeps running; the application writes after.
    let r = Relay::spawn(relay(&url).args(["--poll-interval-ms", "200"]));
    r.wait_log("forwarding outbox", 20);
    let mut c = b.client(&url);
    publish_each(&mut c, "orders", 5..8);
    wait_until(30, "events 5..8 on both pipelines", || {
        ["fwd.jsonl", "grp.jsonl"]
            .iter()
            .all(|f| ns(&dir.join(f)).len() == 8)
    });
    assert_all(&dir, 8);
    drop(r);
}

#[test]
fn a_position_ahead_of_the_cluster_stops_the_pipeline_until_rebased() {
    // The reproduction: a position from elsewhere, ahead of this
    // cluster's transaction counter (no dump involved, so nothing tells
    // which rows are new): the pipelines stop with an error that says what
    // to run, and deliver everything after it.
    let pg = Pg::shared();
    let url = pg.new_db("off_ahead");
    let dir = temp_dir("off_ahead");
    let mut c = pg.client(&url);
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('orders');
         SELECT pgtrickle.create_consumer_group('workers', 'orders', 'earliest');",
    )
    .unwrap();
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb), \
                pgtrickle.set_relay_outbox('grp', 'orders', 'workers', $2::text::jsonb)",
        &[
            &file_sink(&dir.join("fwd.jsonl")),
            &file_sink(&dir.join("grp.jsonl")),
        ],
    )
    .unwrap();
    c.batch_execute(
        "SELECT pgtrickle.relay_commit_offset('default', 'fwd', 0, '5000000', 'w');
         UPDATE pgtrickle.pgt_consumer_groups SET committed_txid = '5000000';",
    )
    .unwrap();
    publish_each(&mut c, "orders", 0..3);
    for p in ["fwd", "grp"] {
        let out = relay(&url)
            .args(["--once", "--pipeline", p])
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{p}: --once must fail: {log}");
        assert!(
            log.contains("5000000") && log.contains("SELECT pgtrickle.outbox_rebase('orders')"),
            "{p}: the error names the position and the command: {log}"
        );
        assert!(read_jsonl(&dir.join(format!("{p}.jsonl"))).is_empty());
    }
    c.batch_execute("SELECT pgtrickle.outbox_rebase('orders')")
        .unwrap();
    assert_ok(&once(&url));
    for f in ["fwd.jsonl", "grp.jsonl"] {
        assert_eq!(ns(&dir.join(f)), vec![0, 1, 2], "{f}");
    }
}

#[test]
fn a_restore_into_a_clone_of_the_old_cluster_stops_until_rebased() {
    // The harness's clusters are copies of one initdb, so this one has the
    // old cluster's system identifier: nothing tells that the database
    // moved but its transaction ids. Every pipeline stops with the command
    // to run, a pipeline made after the restore too, and after it every
    // event arrives.
    let dir = temp_dir("off_clone");
    let dump = relayed_on_a_busy_cluster(&dir);
    let b = Pg::start();
    let url = b.restore("app", &dump);
    let mut c = b.client(&url);
    c.execute(
        "SELECT pgtrickle.set_relay_outbox('late', 'orders', 'default', $1::text::jsonb)",
        &[&file_sink(&dir.join("late.jsonl"))],
    )
    .unwrap();
    publish_each(&mut c, "orders", 5..8);
    for p in ["fwd", "grp", "late"] {
        let out = relay(&url)
            .args(["--once", "--pipeline", p])
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{p}: --once must fail: {log}");
        assert!(
            log.contains("ahead of this PostgreSQL cluster")
                && log.contains("SELECT pgtrickle.outbox_rebase('orders')"),
            "{p}: the error says why and what to run: {log}"
        );
    }
    c.batch_execute("SELECT pgtrickle.outbox_rebase('orders')")
        .unwrap();
    assert_ok(&once(&url));
    assert_all(&dir, 8);
    assert_eq!(ns(&dir.join("late.jsonl")), (0..8).collect::<Vec<_>>());
}

#[test]
fn a_rebase_never_moves_a_position_past_an_undelivered_row() {
    // Out of id order: row 1 is written by the later transaction, so a
    // position after row 2 (by txid) has not delivered row 1 yet.
    let pg = Pg::shared();
    let url = pg.new_db("off_rebase_order");
    let mut c = pg.client(&url);
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('o');
         SELECT pgtrickle.set_relay_outbox('p', 'o', 'default', '{\"type\":\"stdout\"}');
         SELECT pgtrickle.create_consumer_group('g', 'o', 'earliest');",
    )
    .unwrap();
    let mut early = pg.client(&url);
    let mut late = pg.client(&url);
    early
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .unwrap();
    late.batch_execute(
        "BEGIN; SELECT pg_current_xact_id(); SELECT pgtrickle.outbox_publish('o', '{\"n\": 1}');",
    )
    .unwrap();
    early
        .batch_execute("SELECT pgtrickle.outbox_publish('o', '{\"n\": 2}'); COMMIT;")
        .unwrap();
    late.batch_execute("COMMIT").unwrap();
    let first: String = c
        .query_one(
            "SELECT txid::text FROM pgtrickle.outbox_o WHERE id = 2",
            &[],
        )
        .unwrap()
        .get(0);
    c.execute(
        "SELECT pgtrickle.relay_commit_offset('default', 'p', 2, $1, 'w')",
        &[&first],
    )
    .unwrap();
    c.execute(
        "UPDATE pgtrickle.pgt_consumer_groups SET committed_txid = $1::text::xid8, committed_id = 2",
        &[&first],
    )
    .unwrap();
    c.batch_execute("SELECT pgtrickle.outbox_rebase('o')")
        .unwrap();
    let pos: (String, i64) = c
        .query_one(
            "SELECT last_txid::text, last_change_id FROM pgtrickle.relay_consumer_offsets",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(pos, ("2".to_string(), 0), "row 1 is read again");
    let wm: (String, i64) = c
        .query_one(
            "SELECT committed_txid::text, committed_id FROM pgtrickle.pgt_consumer_groups",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(wm, ("2".to_string(), 0));
    let txids: Vec<String> = c
        .query("SELECT txid::text FROM pgtrickle.outbox_o ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(txids, vec!["2", "2"]);
}

#[test]
fn busy_writers_never_look_like_rows_of_another_cluster() {
    // The "rows ahead of this cluster" check compares the outbox's txids
    // with the transaction counter; writers committing meanwhile must not
    // make their own rows look ahead of it (a false stop of the pipeline).
    let pg = Pg::shared();
    let url = pg.new_db("off_busy");
    let mut c = pg.client(&url);
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('orders'); \
         SELECT pgtrickle.create_consumer_group('g', 'orders', 'earliest');",
    )
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (url, stop) = (url.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut c = Pg::shared().client(&url);
                let mut n = w * 1_000_000;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    publish_each(&mut c, "orders", n..n + 1);
                    n += 1;
                }
            })
        })
        .collect();
    let mut moved = Vec::new();
    for i in 0..1_500 {
        for r in c
            .query(
                "SELECT action, detail FROM pgtrickle.relay_check_offset('default', 'fwd', 'outbox_orders')",
                &[],
            )
            .unwrap()
        {
            moved.push(format!("check {i}: {}: {}", r.get::<_, String>(0), r.get::<_, String>(1)));
        }
        if let Err(e) = c.query(
            "SELECT count(*) FROM pgtrickle.poll_outbox('g', 'c1', 1, 1)",
            &[],
        ) {
            moved.push(format!("poll {i}: {e}"));
        }
        if let Err(e) = c.execute("SELECT pgtrickle.seek_offset('g', 'c1', 0)", &[]) {
            moved.push(format!("seek {i}: {e}"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        moved.is_empty(),
        "{} false alarms, e.g. {:?}",
        moved.len(),
        &moved[..moved.len().min(3)]
    );
}
