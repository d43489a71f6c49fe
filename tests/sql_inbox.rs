//! The inbox and maintenance SQL (sql/30_inbox.sql, 40_inbox_workers.sql to
//! 44_inbox_retention.sql, 50_maintenance.sql) against a real PostgreSQL: adoption, replay, health,
//! ordered processing with gaps, priority tiers, partitions, parallel
//! workers, retention, dead-consumer reaping.
//!
//! Every test gets its own database on the shared per-binary server.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use postgres::types::ToSql;
use postgres::Client;
use serde_json::Value;
use support::sqlcheck::*;
use support::Pg;

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

fn texts(c: &mut Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Vec<String> {
    c.query(sql, params)
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn exists(c: &mut Client, rel: &str) -> bool {
    bool_of(c, &format!("SELECT to_regclass('{rel}') IS NOT NULL"))
}

/// Column names of relation `rel`.
fn columns(c: &mut Client, rel: &str) -> Vec<String> {
    texts(
        c,
        "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass
            AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        &[&rel],
    )
}

/// Deterministic shuffle (xorshift), so a failure can be replayed.
fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

/// Wait until every row of `pgtrickle.<table>` is below the commit horizon.
fn wait_horizon(c: &mut Client, table: &str) {
    let sql = format!(
        "SELECT coalesce((SELECT max(txid) FROM pgtrickle.{table}) < pg_snapshot_xmin(pg_current_snapshot()), true)"
    );
    support::wait_until(30, "the commit horizon", || bool_of(c, &sql));
}

fn poll(c: &mut Client, group: &str, consumer: &str, n: i32, visibility: i32) -> Vec<i64> {
    ids(
        c,
        "SELECT outbox_id FROM pgtrickle.poll_outbox($1, $2, $3, $4)",
        &[&group, &consumer, &n, &visibility],
    )
}

/// An ordered inbox `name` whose sequence is a generated column from the
/// payload ({"seq": n}), as the docs suggest for inboxes the relay writes.
fn ordered_inbox(c: &mut Client, name: &str) {
    c.batch_execute(&format!(
        "SELECT pgtrickle.create_inbox('{name}');
         ALTER TABLE pgtrickle.{name} ADD COLUMN seq bigint
             GENERATED ALWAYS AS ((payload->>'seq')::bigint) STORED;
         SELECT pgtrickle.enable_inbox_ordering('{name}', 'aggregate_id', 'seq');"
    ))
    .unwrap();
}

fn insert_seq(c: &mut Client, inbox: &str, agg: &str, seq: i64) {
    c.execute(
        &format!(
            "INSERT INTO pgtrickle.{inbox} (event_id, aggregate_id, payload)
             VALUES ($1, $2, jsonb_build_object('seq', $3::bigint)) ON CONFLICT (event_id) DO NOTHING"
        ),
        &[&format!("{agg}-{seq}"), &agg, &seq],
    )
    .unwrap();
}

/// (aggregate_id, seq) of every row of next_<inbox>, sorted.
fn next_rows(c: &mut Client, inbox: &str) -> Vec<(String, i64)> {
    c.query(
        &format!("SELECT aggregate_id, seq FROM pgtrickle.next_{inbox} ORDER BY 1, 2"),
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// VACUUM `table` until its visibility map covers (nearly) all of it, as
/// autovacuum keeps it in a steady state. The test server commits
/// asynchronously, and VACUUM marks rows all-visible only once their
/// inserting commit is flushed, so it may take a second round.
fn vacuum_until_all_visible(c: &mut Client, table: &str) {
    support::wait_until(60, "the visibility map", || {
        c.batch_execute(&format!("VACUUM {table}")).unwrap();
        bool_of(
            c,
            &format!(
                "SELECT relallvisible >= 0.9 * relpages FROM pg_class WHERE oid = '{table}'::regclass"
            ),
        ) || {
            std::thread::sleep(Duration::from_millis(200));
            false
        }
    });
}

// ---------------------------------------------------------------------------
// ordered processing
// ---------------------------------------------------------------------------

#[test]
fn out_of_order_arrivals_are_surfaced_strictly_in_sequence() {
    let (_pg, url, mut c) = setup("sqli_order");
    ordered_inbox(&mut c, "ord");

    // 100 aggregates x sequences 1..10, arriving shuffled, in small batches,
    // while a worker processes whatever next_ord offers.
    let mut arrivals: Vec<(String, i64)> = (0..100)
        .flat_map(|a| (1..=10).map(move |s| (format!("agg{a:03}"), s)))
        .collect();
    shuffle(&mut arrivals, 0x5eed_1234_abcd);
    let total = arrivals.len();
    let inserter_url = url.clone();
    let inserter = std::thread::spawn(move || {
        let mut w = Pg::shared().client(&inserter_url);
        for chunk in arrivals.chunks(20) {
            let mut tx = w.transaction().unwrap();
            for (agg, seq) in chunk {
                insert_seq_tx(&mut tx, agg, *seq);
            }
            tx.commit().unwrap();
            std::thread::sleep(Duration::from_millis(3));
        }
    });

    let mut processed: HashMap<String, Vec<i64>> = HashMap::new();
    let mut done = 0;
    let mut rounds = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while done < total {
        assert!(
            Instant::now() < deadline,
            "only {done} of {total} processed"
        );
        rounds += 1;
        let mut tx = c.transaction().unwrap();
        let rows = tx
            .query(
                "SELECT event_id, aggregate_id, seq FROM pgtrickle.next_ord",
                &[],
            )
            .unwrap();
        let mut seen = HashSet::new();
        let mut batch = Vec::new();
        for r in &rows {
            let (id, agg, seq): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
            assert!(
                seen.insert(agg.clone()),
                "next_ord offers two messages of {agg}"
            );
            let last = processed
                .get(&agg)
                .and_then(|v| v.last().copied())
                .unwrap_or(0);
            assert_eq!(
                seq,
                last + 1,
                "next_ord offers {agg} #{seq} after #{last} was processed"
            );
            processed.entry(agg).or_default().push(seq);
            batch.push(id);
        }
        let n: i64 = tx
            .query_one(
                "SELECT pgtrickle.inbox_mark_processed('ord', $1)",
                &[&batch],
            )
            .unwrap()
            .get(0);
        assert_eq!(n as usize, batch.len());
        tx.commit().unwrap();
        done += batch.len();
        if batch.is_empty() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    inserter.join().unwrap();
    assert!(rounds > 10, "the worker should have raced the arrivals");
    assert_eq!(processed.len(), 100);
    for (agg, seqs) in &processed {
        assert_eq!(seqs, &(1..=10).collect::<Vec<_>>(), "order of {agg}");
    }
    assert!(next_rows(&mut c, "ord").is_empty());
    assert_eq!(i64_of(&mut c, "SELECT count(*) FROM pgtrickle.gaps_ord"), 0);
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.pgt_ordering_ord WHERE last_sequence = 10"
        ),
        100
    );
}

fn insert_seq_tx(tx: &mut postgres::Transaction<'_>, agg: &str, seq: i64) {
    tx.execute(
        "INSERT INTO pgtrickle.ord (event_id, aggregate_id, payload)
         VALUES ($1, $2, jsonb_build_object('seq', $3::bigint)) ON CONFLICT (event_id) DO NOTHING",
        &[&format!("{agg}-{seq}"), &agg, &seq],
    )
    .unwrap();
}

#[test]
fn two_workers_claim_an_ordered_inbox_in_sequence() {
    let (_pg, url, mut c) = setup("sqli_order_claim");
    ordered_inbox(&mut c, "oc");
    c.batch_execute(
        "CREATE TABLE handled (n bigserial PRIMARY KEY, event_id text UNIQUE, agg text, seq bigint, worker int);
         INSERT INTO pgtrickle.oc (event_id, aggregate_id, payload)
         SELECT 'a' || a || '-' || s, 'a' || a, jsonb_build_object('seq', s)
           FROM generate_series(1, 40) a, generate_series(1, 10) s
          ORDER BY md5(a::text || s::text);",
    )
    .unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let workers: Vec<_> = (0..2i32)
        .map(|w| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut c = Pg::shared().client(&url);
                barrier.wait();
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    assert!(Instant::now() < deadline, "worker {w} timed out");
                    let mut tx = c.transaction().unwrap();
                    let claimed: Vec<String> = tx
                        .query("SELECT event_id FROM pgtrickle.inbox_claim('oc', 7)", &[])
                        .unwrap()
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    if claimed.is_empty() {
                        tx.commit().unwrap();
                        let left: i64 = c
                            .query_one("SELECT count(*) FROM pgtrickle.oc_pending", &[])
                            .unwrap()
                            .get(0);
                        if left == 0 {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    tx.execute(
                        "INSERT INTO handled (event_id, agg, seq, worker)
                         SELECT event_id, aggregate_id, seq, $2 FROM pgtrickle.oc
                          WHERE event_id = ANY($1) ORDER BY aggregate_id",
                        &[&claimed, &w],
                    )
                    .unwrap();
                    tx.query(
                        "SELECT pgtrickle.inbox_mark_processed('oc', $1)",
                        &[&claimed],
                    )
                    .unwrap();
                    tx.commit().unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(i64_of(&mut c, "SELECT count(*) FROM handled"), 400);
    // Per aggregate, the handling order (n) is the sequence order.
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM (SELECT seq, row_number() OVER (PARTITION BY agg ORDER BY n) AS k FROM handled) x
              WHERE seq <> k"
        ),
        0
    );
}

#[test]
fn a_missing_sequence_shows_up_as_a_gap() {
    let (_pg, _url, mut c) = setup("sqli_gaps");
    ordered_inbox(&mut c, "g");
    for (agg, seq) in [("A", 1), ("A", 2), ("B", 1), ("B", 3), ("B", 4), ("C", 2)] {
        insert_seq(&mut c, "g", agg, seq);
    }
    assert_eq!(
        next_rows(&mut c, "g"),
        vec![("A".to_string(), 1), ("B".to_string(), 1)]
    );
    // C never got #1; B's #2 is not here yet but B #1 is still waiting.
    let gaps = c
        .query(
            "SELECT aggregate_id, last_processed_sequence, expected_sequence, next_waiting_sequence,
                    missing_count, waiting_count FROM pgtrickle.inbox_ordering_gaps('g')",
            &[],
        )
        .unwrap();
    assert_eq!(gaps.len(), 1);
    assert_eq!(gaps[0].get::<_, String>(0), "C");
    assert_eq!(gaps[0].get::<_, Option<i64>>(1), None);
    assert_eq!(gaps[0].get::<_, i64>(2), 1);
    assert_eq!(gaps[0].get::<_, i64>(3), 2);
    assert_eq!(gaps[0].get::<_, i64>(4), 1);
    assert_eq!(gaps[0].get::<_, i64>(5), 1);

    // Processing B #1 uncovers the missing B #2.
    c.batch_execute("SELECT pgtrickle.inbox_mark_processed('g', ARRAY['A-1', 'B-1'])")
        .unwrap();
    assert_eq!(
        next_rows(&mut c, "g"),
        vec![("A".to_string(), 2)],
        "B #3 waits for B #2"
    );
    let rows = c
        .query(
            "SELECT aggregate_id, last_processed_sequence, expected_sequence, missing_count, waiting_count
               FROM pgtrickle.gaps_g ORDER BY 1",
            &[],
        )
        .unwrap();
    let gaps: Vec<(String, Option<i64>, i64, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        gaps,
        vec![
            ("B".to_string(), Some(1), 2, 1, 2),
            ("C".to_string(), None, 1, 1, 1)
        ]
    );

    // How long: a gap waiting 2 minutes is listed first, and filtered by age.
    c.batch_execute(
        "UPDATE pgtrickle.g SET received_at = now() - interval '2 minutes' WHERE aggregate_id = 'B'",
    )
    .unwrap();
    let aged = c
        .query(
            "SELECT aggregate_id, waiting_seconds FROM pgtrickle.inbox_ordering_gaps('g', 60)",
            &[],
        )
        .unwrap();
    assert_eq!(aged.len(), 1);
    assert_eq!(aged[0].get::<_, String>(0), "B");
    assert!(aged[0].get::<_, f64>(1) >= 119.0);
    // B's messages wait 120 s: degraded by age, and by the gap.
    let health = json_of(&mut c, "pgtrickle.inbox_health('g')");
    assert_eq!(health["ordering_gaps"], 2);
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        health["reasons"].to_string().contains("ordering gap"),
        "{health}"
    );

    // The missing message arrives: the gap closes, B continues in order.
    insert_seq(&mut c, "g", "B", 2);
    assert_eq!(
        next_rows(&mut c, "g"),
        vec![("A".to_string(), 2), ("B".to_string(), 2)]
    );
    assert_eq!(
        texts(&mut c, "SELECT aggregate_id FROM pgtrickle.gaps_g", &[]),
        vec!["C"]
    );

    // A dead letter blocks its aggregate (not a gap); replay unblocks it.
    for _ in 0..3 {
        c.batch_execute("SELECT pgtrickle.inbox_mark_failed('g', 'A-2', 'boom')")
            .unwrap();
    }
    assert_eq!(next_rows(&mut c, "g"), vec![("B".to_string(), 2)]);
    assert_eq!(
        texts(&mut c, "SELECT event_id FROM pgtrickle.g_dlq", &[]),
        vec!["A-2"]
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT pgtrickle.replay_inbox_messages('g', ARRAY['A-2'])"
        ),
        1
    );
    assert_eq!(
        next_rows(&mut c, "g"),
        vec![("A".to_string(), 2), ("B".to_string(), 2)]
    );

    assert_err(
        &mut c,
        "SELECT pgtrickle.inbox_ordering_gaps('nope')",
        "P0002",
        "inbox \"nope\" does not exist",
    );
    c.batch_execute("SELECT pgtrickle.create_inbox('plain')")
        .unwrap();
    assert_err(
        &mut c,
        "SELECT pgtrickle.inbox_ordering_gaps('plain')",
        "55000",
        "is not ordered",
    );
}

#[test]
fn ordering_options_validation_and_disable() {
    let (_pg, _url, mut c) = setup("sqli_order_opts");
    c.batch_execute(
        "SELECT pgtrickle.create_inbox('z');
         ALTER TABLE pgtrickle.z ADD COLUMN n int, ADD COLUMN label text;",
    )
    .unwrap();
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_inbox_ordering('z', 'account', 'n')",
        "42703",
        "has no column \"account\"",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_inbox_ordering('z', 'aggregate_id', 'seq')",
        "42703",
        "has no column \"seq\"",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_inbox_ordering('z', 'aggregate_id', 'label')",
        "42804",
        "must be smallint, integer or bigint, not text",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_inbox_ordering('nope', 'aggregate_id', 'n')",
        "P0002",
        "does not exist",
    );

    // Sequences starting at 0; rows already processed set the positions.
    c.batch_execute(
        "INSERT INTO pgtrickle.z (event_id, aggregate_id, n, processed_at) VALUES ('x0', 'X', 0, now());
         INSERT INTO pgtrickle.z (event_id, aggregate_id, n) VALUES ('x1', 'X', 1), ('y0', 'Y', 0), ('y2', 'Y', 2),
                                                                    ('u', NULL, 5), ('v', 'V', NULL);
         SELECT pgtrickle.enable_inbox_ordering('z', 'aggregate_id', 'n', 0);
         SELECT pgtrickle.enable_inbox_ordering('z', 'aggregate_id', 'n', 0);",
    )
    .unwrap();
    assert_eq!(
        texts(
            &mut c,
            "SELECT event_id FROM pgtrickle.next_z ORDER BY 1",
            &[]
        ),
        vec!["x1", "y0"],
        "rows without aggregate or sequence are not ordered (they stay in z_pending)"
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_inbox_ordering('z', 'aggregate_id', 'n', 1)",
        "55000",
        "already ordered by (aggregate_id, n) from 0",
    );
    // A row inserted already processed moves the position too.
    c.batch_execute(
        "INSERT INTO pgtrickle.z (event_id, aggregate_id, n, processed_at) VALUES ('y1', 'Y', 1, now())",
    )
    .unwrap();
    c.batch_execute("SELECT pgtrickle.inbox_mark_processed('z', ARRAY['y0'])")
        .unwrap();
    assert_eq!(
        texts(
            &mut c,
            "SELECT event_id FROM pgtrickle.next_z ORDER BY 1",
            &[]
        ),
        vec!["x1", "y2"]
    );

    // Disabling removes the views, the trigger, the positions and the index.
    c.batch_execute("SELECT pgtrickle.disable_inbox_ordering('z')")
        .unwrap();
    for rel in [
        "pgtrickle.next_z",
        "pgtrickle.gaps_z",
        "pgtrickle.pgt_ordering_z",
        "pgtrickle.z_ord_pending_idx",
    ] {
        assert!(!exists(&mut c, rel), "{rel} left behind");
    }
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'pgtrickle.z'::regclass AND NOT tgisinternal"
        ),
        0
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.disable_inbox_ordering('z')",
        "P0002",
        "is not ordered",
    );
    c.batch_execute("SELECT pgtrickle.disable_inbox_ordering('z', true)")
        .unwrap();
    // And ordering can be enabled again.
    c.batch_execute("SELECT pgtrickle.enable_inbox_ordering('z', 'aggregate_id', 'n', 0)")
        .unwrap();
    assert_eq!(
        texts(
            &mut c,
            "SELECT event_id FROM pgtrickle.next_z ORDER BY 1",
            &[]
        ),
        vec!["x1", "y2"]
    );
}

#[test]
fn next_query_uses_the_partial_index() {
    let (_pg, _url, mut c) = setup("sqli_explain");
    c.batch_execute(
        "SELECT pgtrickle.create_inbox('big');
         ALTER TABLE pgtrickle.big ADD COLUMN seq bigint;
         SELECT pgtrickle.enable_inbox_ordering('big', 'aggregate_id', 'seq');
         INSERT INTO pgtrickle.big (event_id, aggregate_id, seq, payload, processed_at)
         SELECT 'p' || a || '-' || s, 'agg' || a, s, '{}', now() - interval '1 hour'
           FROM generate_series(1, 500) a, generate_series(1, 100) s;
         INSERT INTO pgtrickle.big (event_id, aggregate_id, seq, payload)
         SELECT 'q' || a || '-' || s, 'agg' || a, s, '{}'
           FROM generate_series(1, 500) a, generate_series(101, 102) s WHERE NOT (a % 10 = 0 AND s = 101);",
    )
    .unwrap();
    vacuum_until_all_visible(&mut c, "pgtrickle.big");
    c.batch_execute("ANALYZE pgtrickle.big; ANALYZE pgtrickle.pgt_ordering_big")
        .unwrap();
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.next_big"),
        450
    );
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.gaps_big"),
        50
    );
    let (def,): (String,) = {
        let r = c
            .query_one(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'big_ord_pending_idx'",
                &[],
            )
            .unwrap();
        (r.get(0),)
    };
    assert!(
        def.contains("(aggregate_id, seq) WHERE ((processed_at IS NULL)"),
        "{def}"
    );
    for view in ["next_big", "gaps_big"] {
        let plan = texts(
            &mut c,
            &format!("EXPLAIN SELECT * FROM pgtrickle.{view}"),
            &[],
        )
        .join("\n");
        assert!(
            plan.contains("big_ord_pending_idx"),
            "{view} does not use the partial index:\n{plan}"
        );
        assert!(
            !plan.contains("Seq Scan on big"),
            "{view} scans the whole inbox:\n{plan}"
        );
    }
}

// ---------------------------------------------------------------------------
// priority
// ---------------------------------------------------------------------------

#[test]
fn priority_tiers_and_exclusion_with_ordering() {
    let (_pg, _url, mut c) = setup("sqli_priority");
    c.batch_execute(
        "SELECT pgtrickle.create_inbox('jobs');
         ALTER TABLE pgtrickle.jobs ADD COLUMN priority int, ADD COLUMN seq bigint;
         INSERT INTO pgtrickle.jobs (event_id, priority, received_at)
         SELECT 'p' || coalesce(p::text, 'null'), p, now() - make_interval(secs => coalesce(p, 50))
           FROM unnest(ARRAY[1, 2, 3, 6, 7, 9, NULL, 0, 12]) p;
         SELECT pgtrickle.enable_inbox_priority('jobs');",
    )
    .unwrap();
    let tier = |c: &mut Client, t: &str| {
        texts(
            c,
            &format!("SELECT event_id FROM pgtrickle.jobs_pending_{t} ORDER BY 1"),
            &[],
        )
    };
    assert_eq!(tier(&mut c, "critical"), vec!["p0", "p1", "p2"]);
    assert_eq!(tier(&mut c, "normal"), vec!["p3", "p6"]);
    assert_eq!(tier(&mut c, "background"), vec!["p12", "p7", "p9", "pnull"]);
    assert_eq!(
        columns(&mut c, "pgtrickle.jobs_pending").last().unwrap(),
        "priority_tier"
    );
    assert_eq!(
        text_of(
            &mut c,
            "SELECT priority_tier FROM pgtrickle.jobs_pending WHERE event_id = 'p6'"
        )
        .as_deref(),
        Some("normal")
    );
    // The claim helper takes the most urgent first.
    c.batch_execute("BEGIN").unwrap();
    assert_eq!(
        texts(
            &mut c,
            "SELECT event_id FROM pgtrickle.inbox_claim('jobs', 4)",
            &[]
        ),
        vec!["p0", "p1", "p2", "p3"]
    );
    c.batch_execute("COMMIT").unwrap();

    // Ordering and priority exclude each other, both ways round.
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_inbox_ordering('jobs', 'aggregate_id', 'seq')",
        "55000",
        "inbox \"jobs\" has priority tiers; ordering and priority are mutually exclusive",
    );
    // Replacing the tiers drops the old views.
    c.batch_execute(
        "SELECT pgtrickle.enable_inbox_priority('jobs', 'priority', '{\"urgent\": [0, 1], \"rest\": [2, 100]}')",
    )
    .unwrap();
    assert!(!exists(&mut c, "pgtrickle.jobs_pending_critical"));
    assert_eq!(tier(&mut c, "urgent"), vec!["p0", "p1"]);
    assert_eq!(tier(&mut c, "rest").len(), 7);

    c.batch_execute("SELECT pgtrickle.disable_inbox_priority('jobs')")
        .unwrap();
    assert!(!exists(&mut c, "pgtrickle.jobs_pending_urgent"));
    assert!(!exists(&mut c, "pgtrickle.jobs_prio_pending_idx"));
    assert!(
        !columns(&mut c, "pgtrickle.jobs_pending").contains(&"priority_tier".to_string()),
        "the plain pending view is back"
    );
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.jobs_pending"),
        9
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.disable_inbox_priority('jobs')",
        "P0002",
        "has no priority tiers",
    );

    c.batch_execute("SELECT pgtrickle.enable_inbox_ordering('jobs', 'aggregate_id', 'seq')")
        .unwrap();
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_inbox_priority('jobs')",
        "55000",
        "inbox \"jobs\" is ordered; ordering and priority are mutually exclusive",
    );
    c.batch_execute("SELECT pgtrickle.disable_inbox_ordering('jobs')")
        .unwrap();

    // Validation.
    for (tiers, part) in [
        ("'[]'", "must be a non-empty JSON object"),
        ("'{}'", "must be a non-empty JSON object"),
        ("'{\"Bad Name\": [1, 2]}'", "tier name \"Bad Name\""),
        ("'{\"a\": [1]}'", "tier \"a\" must be [lowest, highest]"),
        ("'{\"a\": [3, 1]}'", "tier \"a\" must be [lowest, highest]"),
        (
            "'{\"a\": [1.5, 2]}'",
            "tier \"a\" must be [lowest, highest]",
        ),
        ("'{\"a\": [1, 5], \"b\": [5, 9]}'", "overlaps"),
    ] {
        assert_err(
            &mut c,
            &format!("SELECT pgtrickle.enable_inbox_priority('jobs', 'priority', {tiers})"),
            "22023",
            part,
        );
    }
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_inbox_priority('jobs', 'urgency')",
        "42703",
        "has no column \"urgency\"",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_inbox_priority('jobs', 'event_type')",
        "42804",
        "must be smallint, integer or bigint",
    );
    assert!(
        !exists(&mut c, "pgtrickle.jobs_pending_a"),
        "a refused call changes nothing"
    );
}

// ---------------------------------------------------------------------------
// replay, failures, workers, partitions
// ---------------------------------------------------------------------------

#[test]
fn replay_moves_dead_letters_back_to_pending() {
    let (_pg, _url, mut c) = setup("sqli_replay");
    c.batch_execute(
        "SELECT pgtrickle.create_inbox('pay', p_max_retries => 2);
         INSERT INTO pgtrickle.pay (event_id, event_type) VALUES ('e1', 't'), ('e2', 't'), ('e3', 't'), ('x''); DROP TABLE pgtrickle.pay; --', 't');",
    )
    .unwrap();
    let fail = |c: &mut Client, id: &str| -> String {
        c.query_one(
            "SELECT pgtrickle.inbox_mark_failed('pay', $1, 'boom ' || $1)",
            &[&id],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(fail(&mut c, "e1"), "retry");
    assert_eq!(fail(&mut c, "e1"), "dead_letter");
    assert_eq!(fail(&mut c, "e2"), "retry");
    assert_eq!(fail(&mut c, "e2"), "dead_letter");
    assert_eq!(
        texts(
            &mut c,
            "SELECT event_id FROM pgtrickle.pay_dlq ORDER BY 1",
            &[]
        ),
        vec!["e1", "e2"]
    );
    assert_eq!(
        text_of(
            &mut c,
            "SELECT error FROM pgtrickle.pay WHERE event_id = 'e1'"
        )
        .as_deref(),
        Some("boom e1")
    );
    c.batch_execute("SELECT pgtrickle.inbox_mark_processed('pay', ARRAY['e3'])")
        .unwrap();

    // Exactly the given ids, as values: the odd id is data, not SQL.
    let replayed: i64 = c
        .query_one(
            "SELECT pgtrickle.replay_inbox_messages('pay', $1)",
            &[&vec![
                "e1",
                "e3",
                "nope",
                "x'); DROP TABLE pgtrickle.pay; --",
            ]],
        )
        .unwrap()
        .get(0);
    assert_eq!(replayed, 3);
    assert_eq!(
        texts(&mut c, "SELECT event_id FROM pgtrickle.pay_dlq", &[]),
        vec!["e2"]
    );
    let row = c
        .query_one(
            "SELECT processed_at IS NULL, retry_count, error FROM pgtrickle.pay WHERE event_id = 'e1'",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i32>(1), 0);
    assert_eq!(row.get::<_, Option<String>>(2), None);
    assert_eq!(
        texts(
            &mut c,
            "SELECT event_id FROM pgtrickle.pay_pending ORDER BY 1",
            &[]
        ),
        vec!["e1", "e3", "x'); DROP TABLE pgtrickle.pay; --"]
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT pgtrickle.replay_inbox_messages('pay', ARRAY[]::text[])"
        ),
        0
    );

    assert_err(
        &mut c,
        "SELECT pgtrickle.inbox_mark_failed('pay', 'missing', 'x')",
        "P0002",
        "event \"missing\" does not exist in inbox \"pay\"",
    );
    c.batch_execute("SELECT pgtrickle.inbox_mark_processed('pay', ARRAY['e3'])")
        .unwrap();
    assert_err(
        &mut c,
        "SELECT pgtrickle.inbox_mark_failed('pay', 'e3', 'x')",
        "55000",
        "already processed",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.replay_inbox_messages('pay', NULL)",
        "22023",
        "p_event_ids",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.replay_inbox_messages('nope', ARRAY['a'])",
        "P0002",
        "inbox \"nope\" does not exist",
    );
    // The replay statement is built from catalog identifiers only.
    let body = text_of(
        &mut c,
        "SELECT prosrc FROM pg_proc WHERE proname = 'replay_inbox_messages'",
    )
    .unwrap();
    assert!(body.contains("USING p_event_ids"), "{body}");
}

#[test]
fn two_workers_process_10000_messages_once() {
    let (_pg, url, mut c) = setup("sqli_workers");
    c.batch_execute(
        "SELECT pgtrickle.create_inbox('work');
         CREATE TABLE handled (event_id text PRIMARY KEY, worker int NOT NULL);
         INSERT INTO pgtrickle.work (event_id, event_type, aggregate_id, payload)
         SELECT 'm' || g, 'job', 'a' || (g % 97), jsonb_build_object('n', g) FROM generate_series(1, 10000) g;",
    )
    .unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let workers: Vec<_> = (0..2i32)
        .map(|w| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut c = Pg::shared().client(&url);
                let mut mine = Vec::new();
                barrier.wait();
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    assert!(Instant::now() < deadline, "worker {w} timed out");
                    let mut tx = c.transaction().unwrap();
                    let claimed: Vec<String> = tx
                        .query(
                            "SELECT event_id FROM pgtrickle.inbox_claim('work', 50)",
                            &[],
                        )
                        .unwrap()
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    if claimed.is_empty() {
                        tx.commit().unwrap();
                        let left: i64 = c
                            .query_one("SELECT count(*) FROM pgtrickle.work_pending", &[])
                            .unwrap()
                            .get(0);
                        if left == 0 {
                            return mine;
                        }
                        continue;
                    }
                    // "Handling" = a row in handled, in the same transaction:
                    // a second handling of any message would violate its key.
                    tx.execute(
                        "INSERT INTO handled SELECT unnest($1::text[]), $2",
                        &[&claimed, &w],
                    )
                    .unwrap();
                    let n: i64 = tx
                        .query_one(
                            "SELECT pgtrickle.inbox_mark_processed('work', $1)",
                            &[&claimed],
                        )
                        .unwrap()
                        .get(0);
                    assert_eq!(n as usize, claimed.len());
                    tx.commit().unwrap();
                    mine.extend(claimed);
                }
            })
        })
        .collect();
    let results: Vec<Vec<String>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let mut all = HashSet::new();
    for r in &results {
        for id in r {
            assert!(all.insert(id.clone()), "{id} handled twice");
        }
    }
    assert_eq!(all.len(), 10_000);
    assert!(
        results.iter().all(|r| !r.is_empty()),
        "both workers should have taken part: {} and {}",
        results[0].len(),
        results[1].len()
    );
    assert_eq!(i64_of(&mut c, "SELECT count(*) FROM handled"), 10_000);
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.work WHERE processed_at IS NULL"
        ),
        0
    );
}

#[test]
fn partitions_split_aggregates_between_workers() {
    let (_pg, _url, mut c) = setup("sqli_partitions");
    let flags = c
        .query_one(
            "SELECT provolatile::text, proparallel::text, prosecdef FROM pg_proc
              WHERE oid = 'pgtrickle.inbox_is_my_partition(text, int, int)'::regprocedure",
            &[],
        )
        .unwrap();
    assert_eq!(flags.get::<_, String>(0), "i", "IMMUTABLE");
    assert_eq!(flags.get::<_, String>(1), "s", "PARALLEL SAFE");
    assert!(!flags.get::<_, bool>(2));
    // The contract's formula, for many keys and worker counts.
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM generate_series(1, 2000) g, generate_series(1, 7) n, generate_series(0, n - 1) w
              WHERE pgtrickle.inbox_is_my_partition('key-' || g, w, n)
                    IS DISTINCT FROM (abs(hashtext('key-' || g)) % n = w)"
        ),
        0
    );
    // Every key belongs to exactly one of 4 workers.
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM (SELECT g, count(*) FILTER (WHERE pgtrickle.inbox_is_my_partition('key-' || g, w, 4)) AS k
                                     FROM generate_series(1, 2000) g, generate_series(0, 3) w GROUP BY g) x WHERE k <> 1"
        ),
        0
    );
    // In a prepared statement, as the relay's login role.
    let pg = Pg::shared();
    let mut r = relay_login(pg, &mut c, "sqli_partitions", "sqli_partition_worker");
    let st = r
        .prepare("SELECT pgtrickle.inbox_is_my_partition($1, $2, $3)")
        .unwrap();
    let mut hits = 0;
    for w in 0..3 {
        let b: bool = r.query_one(&st, &[&"order-42", &w, &3i32]).unwrap().get(0);
        hits += b as i32;
    }
    assert_eq!(hits, 1);

    // inbox_claim with a partition takes only its aggregates (the event id
    // for messages without one).
    c.batch_execute(
        "SELECT pgtrickle.create_inbox('parts');
         INSERT INTO pgtrickle.parts (event_id, aggregate_id)
         SELECT 'e' || g, CASE WHEN g % 10 = 0 THEN NULL ELSE 'agg' || (g % 37) END FROM generate_series(1, 300) g;",
    )
    .unwrap();
    c.batch_execute("BEGIN").unwrap();
    let mut seen = HashSet::new();
    for w in 0..4i32 {
        let claimed = texts(
            &mut c,
            "SELECT event_id FROM pgtrickle.inbox_claim('parts', 1000, $1, 4)",
            &[&w],
        );
        assert!(!claimed.is_empty());
        for id in claimed {
            let key: String = c
                .query_one(
                    "SELECT coalesce(aggregate_id, event_id) FROM pgtrickle.parts WHERE event_id = $1",
                    &[&id],
                )
                .unwrap()
                .get(0);
            assert!(bool_of(
                &mut c,
                &format!("SELECT pgtrickle.inbox_is_my_partition('{key}', {w}, 4)")
            ));
            assert!(seen.insert(id));
        }
    }
    c.batch_execute("COMMIT").unwrap();
    assert_eq!(seen.len(), 300);
    for (args, part) in [
        ("1, 0", "p_worker_id"),
        ("1, 4, 4", "p_worker_id"),
        ("1, NULL, 4", "p_worker_id"),
        ("0", "p_batch_size"),
    ] {
        assert_err(
            &mut c,
            &format!("SELECT * FROM pgtrickle.inbox_claim('parts', {args})"),
            "22023",
            part,
        );
    }
}

// ---------------------------------------------------------------------------
// adoption
// ---------------------------------------------------------------------------

#[test]
fn adopting_an_existing_table() {
    let (_pg, _url, mut c) = setup("sqli_adopt");
    c.batch_execute(
        "CREATE SCHEMA app;
         CREATE TABLE app.msgs (
             msg_id     bigint PRIMARY KEY,
             kind       text,
             body       jsonb,
             account    text,
             n          int,
             arrived    timestamptz DEFAULT now(),
             done_at    timestamptz,
             attempts   smallint DEFAULT 0,
             last_error varchar(200));
         INSERT INTO app.msgs (msg_id, kind, account, n) VALUES (1, 'a', 'acc1', 1), (2, 'b', 'acc1', 2), (3, 'a', 'acc2', 1);
         UPDATE app.msgs SET done_at = now() WHERE msg_id = 3;
         UPDATE app.msgs SET arrived = arrived + interval '1 second' WHERE msg_id = 2;
         SELECT pgtrickle.enable_inbox_tracking('legacy', 'app.msgs',
                    p_id_column => 'msg_id', p_processed_at_column => 'done_at',
                    p_retry_count_column => 'attempts', p_error_column => 'last_error',
                    p_received_at_column => 'arrived', p_event_type_column => 'kind',
                    p_max_retries => 2);",
    )
    .unwrap();
    for v in ["app.legacy_pending", "app.legacy_dlq", "app.legacy_stats"] {
        assert!(exists(&mut c, v), "{v} missing");
    }
    let cfg = c
        .query_one(
            "SELECT inbox_schema, table_name, is_managed, id_column, retry_count_column, max_retries
               FROM pgtrickle.pgt_inbox_config WHERE inbox_name = 'legacy'",
            &[],
        )
        .unwrap();
    assert_eq!(cfg.get::<_, String>(0), "app");
    assert_eq!(cfg.get::<_, Option<String>>(1).as_deref(), Some("msgs"));
    assert!(!cfg.get::<_, bool>(2));
    assert_eq!(cfg.get::<_, String>(3), "msg_id");
    assert_eq!(cfg.get::<_, Option<String>>(4).as_deref(), Some("attempts"));
    assert_eq!(cfg.get::<_, i32>(5), 2);
    assert!(bool_of(
        &mut c,
        "SELECT has_table_privilege('pgtrickle_relay', 'app.msgs', 'INSERT')"
    ));
    assert_eq!(
        ids(
            &mut c,
            "SELECT msg_id FROM app.legacy_pending ORDER BY 1",
            &[]
        ),
        vec![1, 2]
    );
    // Everything works over the mapped columns.
    let fail = |c: &mut Client| -> String {
        c.query_one(
            "SELECT pgtrickle.inbox_mark_failed('legacy', '1', 'nope')",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(fail(&mut c), "retry");
    assert_eq!(fail(&mut c), "dead_letter");
    assert_eq!(
        ids(&mut c, "SELECT msg_id FROM app.legacy_dlq", &[]),
        vec![1]
    );
    assert_eq!(
        text_of(
            &mut c,
            "SELECT last_error::text FROM app.msgs WHERE msg_id = 1"
        )
        .as_deref(),
        Some("nope")
    );
    let stats = c
        .query(
            "SELECT event_type, total, pending, processed, dlq FROM app.legacy_stats ORDER BY 1",
            &[],
        )
        .unwrap();
    let stats: Vec<(String, i64, i64, i64, i64)> = stats
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        stats,
        vec![("a".into(), 2, 0, 1, 1), ("b".into(), 1, 1, 0, 0)]
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT pgtrickle.replay_inbox_messages('legacy', ARRAY['1'])"
        ),
        1
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT attempts::bigint FROM app.msgs WHERE msg_id = 1"
        ),
        0
    );
    let health = json_of(&mut c, "pgtrickle.inbox_health('legacy')");
    assert_eq!(health["pending_count"], 2, "{health}");
    assert_eq!(health["table"], "app.msgs");
    c.batch_execute("BEGIN").unwrap();
    assert_eq!(
        texts(
            &mut c,
            "SELECT message->>'kind' FROM pgtrickle.inbox_claim('legacy', 1)",
            &[]
        ),
        vec!["a"]
    );
    c.batch_execute("COMMIT").unwrap();
    // Ordering on the adopted table's own columns.
    c.batch_execute("SELECT pgtrickle.enable_inbox_ordering('legacy', 'account', 'n')")
        .unwrap();
    assert_eq!(
        ids(&mut c, "SELECT msg_id FROM app.next_legacy", &[]),
        vec![1]
    );
    // Same call again: nothing changes.
    c.batch_execute(
        "SELECT pgtrickle.enable_inbox_tracking('legacy', 'app.msgs', p_id_column => 'msg_id', p_processed_at_column => 'done_at')",
    )
    .unwrap();

    // drop_inbox never drops an adopted table, even with cascade.
    c.batch_execute(
        "CREATE VIEW public.mine AS SELECT * FROM app.legacy_pending;
         SELECT pgtrickle.drop_inbox('legacy', p_cascade => true);",
    )
    .unwrap();
    assert!(exists(&mut c, "app.msgs"));
    assert_eq!(i64_of(&mut c, "SELECT count(*) FROM app.msgs"), 3);
    for rel in [
        "app.legacy_pending",
        "app.legacy_dlq",
        "app.legacy_stats",
        "app.next_legacy",
        "app.gaps_legacy",
        "app.legacy_pending_idx",
        "app.legacy_ord_pending_idx",
        "pgtrickle.pgt_ordering_legacy",
        "public.mine",
    ] {
        assert!(!exists(&mut c, rel), "{rel} left behind");
    }
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'app.msgs'::regclass AND NOT tgisinternal"
        ),
        0
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT (SELECT count(*) FROM pgtrickle.pgt_inbox_config) + (SELECT count(*) FROM pgtrickle.pgt_inbox_ordering)"
        ),
        0
    );
    // The table can be adopted again afterwards.
    c.batch_execute(
        "SELECT pgtrickle.enable_inbox_tracking('legacy', 'app.msgs', p_id_column => 'msg_id', p_processed_at_column => 'done_at')",
    )
    .unwrap();
}

#[test]
fn adoption_validation_errors() {
    let (_pg, _url, mut c) = setup("sqli_adopt_errors");
    c.batch_execute(
        "CREATE TABLE public.t (event_id text PRIMARY KEY, processed_at timestamptz, retry_count text,
                                received_at date, error int, flag boolean);
         CREATE TABLE public.nounique (event_id text, processed_at timestamptz);
         CREATE TABLE public.partial (event_id text, processed_at timestamptz);
         CREATE UNIQUE INDEX ON public.partial (event_id) WHERE processed_at IS NULL;
         CREATE TABLE public.twocol (a text, b text, processed_at timestamptz, PRIMARY KEY (a, b));
         CREATE TABLE public.ok (event_id text PRIMARY KEY, processed_at timestamptz);
         CREATE VIEW public.v AS SELECT * FROM public.ok;",
    )
    .unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("'x', 'public.missing'", "42P01", "relation \"public.missing\" does not exist"),
        ("'x', 'public.v'", "42809", "is not a table"),
        ("'', 'public.ok'", "22023", "p_name must be a non-empty inbox name"),
        ("'x', 'public.ok', p_id_column => 'id'", "42703", "has no column \"id\" (p_id_column)"),
        ("'x', 'public.ok', p_processed_at_column => 'done'", "42703", "has no column \"done\" (p_processed_at_column)"),
        ("'x', 'public.ok', p_error_column => 'err'", "42703", "has no column \"err\" (p_error_column)"),
        ("'x', 'public.t', p_processed_at_column => 'flag'", "42804", "must be timestamptz or timestamp, not boolean"),
        ("'x', 'public.t'", "42804", "(p_retry_count_column) must be an integer type, not text"),
        ("'x', 'public.t', p_retry_count_column => 'flag'", "42804", "(p_retry_count_column) must be an integer type, not boolean"),
        ("'x', 'public.ok', p_id_column => 'event_id', p_processed_at_column => 'processed_at', p_received_at_column => 'processed_at'", "22023", "mapped twice"),
        ("'x', 'public.nounique'", "55000", "column \"event_id\" (p_id_column) of public.nounique is not unique"),
        ("'x', 'public.partial'", "55000", "is not unique"),
        ("'x', 'public.twocol', p_id_column => 'a'", "55000", "is not unique"),
        ("'x', 'public.ok', p_max_retries => -1", "22023", "p_max_retries"),
    ];
    for (args, code, part) in cases {
        assert_err(
            &mut c,
            &format!("SELECT pgtrickle.enable_inbox_tracking({args})"),
            code,
            part,
        );
    }
    // received_at of the wrong type, error of the wrong type.
    c.batch_execute("ALTER TABLE public.t ALTER COLUMN retry_count TYPE int USING 0")
        .unwrap();
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_inbox_tracking('x', 'public.t')",
        "42804",
        "(p_error_column) must be a string type, not integer",
    );
    c.batch_execute("ALTER TABLE public.t ALTER COLUMN error TYPE text")
        .unwrap();
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_inbox_tracking('x', 'public.t')",
        "42804",
        "(p_received_at_column) must be timestamptz or timestamp, not date",
    );

    // Name and table clashes.
    c.batch_execute(
        "SELECT pgtrickle.create_inbox('taken');
         SELECT pgtrickle.enable_inbox_tracking('okbox', 'public.ok');",
    )
    .unwrap();
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_inbox_tracking('taken', 'public.ok')",
        "42710",
        "inbox \"taken\" already exists",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_inbox_tracking('other', 'public.ok')",
        "42710",
        "table public.ok is already inbox \"okbox\"",
    );
    c.batch_execute(
        "CREATE TABLE public.ok2 (event_id text PRIMARY KEY, processed_at timestamptz);
         CREATE TABLE public.clash_dlq (x int);
         CREATE TABLE public.clash2 (event_id text PRIMARY KEY, processed_at timestamptz, retry_count int);",
    )
    .unwrap();
    assert_err(
        &mut c,
        "SELECT pgtrickle.enable_inbox_tracking('clash', 'public.clash2')",
        "42P07",
        "public.clash_dlq already exists",
    );
    assert!(!exists(&mut c, "public.clash_pending"), "nothing half-done");

    // Optional columns may be absent: no dead letters, stats without types.
    c.batch_execute("SELECT pgtrickle.enable_inbox_tracking('minimal', 'public.ok2')")
        .unwrap();
    assert!(exists(&mut c, "public.minimal_pending"));
    assert!(!exists(&mut c, "public.minimal_dlq"));
    let cfg = c
        .query_one(
            "SELECT retry_count_column, error_column, received_at_column, event_type_column, with_dead_letter
               FROM pgtrickle.pgt_inbox_config WHERE inbox_name = 'minimal'",
            &[],
        )
        .unwrap();
    for i in 0..4 {
        assert_eq!(cfg.get::<_, Option<String>>(i), None);
    }
    assert!(!cfg.get::<_, bool>(4));
    c.batch_execute("INSERT INTO public.ok2 VALUES ('m1', NULL), ('m2', now())")
        .unwrap();
    assert_eq!(
        i64_of(&mut c, "SELECT pending FROM public.minimal_stats"),
        1
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.inbox_mark_failed('minimal', 'm1', 'x')",
        "0A000",
        "has no retry-count column",
    );
    let health = json_of(&mut c, "pgtrickle.inbox_health('minimal')");
    assert_eq!(health["pending_count"], 1);
    assert_eq!(health["oldest_pending_age_seconds"], Value::Null);
    assert_eq!(health["status"], "healthy");
    assert_err(
        &mut c,
        "SELECT pgtrickle.set_inbox_retention('minimal', 1, 1)",
        "0A000",
        "has no received-at column",
    );
}

// ---------------------------------------------------------------------------
// health
// ---------------------------------------------------------------------------

#[test]
fn health_thresholds_and_status() {
    let (pg, _url, mut c) = setup("sqli_health");
    c.batch_execute("SELECT pgtrickle.create_inbox('h', p_max_retries => 1)")
        .unwrap();
    let health = |c: &mut Client| json_of(c, "pgtrickle.inbox_health('h')");
    let h = health(&mut c);
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(h["pending_count"], 0);
    assert_eq!(h["dlq_count"], 0);
    assert_eq!(h["oldest_pending_age_seconds"], Value::Null);
    assert_eq!(h["throughput_per_minute"].as_f64(), Some(0.0));
    assert_eq!(
        h["thresholds"]["degraded"]["oldest_pending_age_seconds"],
        60
    );
    assert_eq!(
        h["thresholds"]["critical"]["oldest_pending_age_seconds"],
        300
    );
    assert_eq!(h["thresholds"]["degraded"]["dlq_count"], 1);
    assert_eq!(h["thresholds"]["critical"]["dlq_count"], 100);

    // Age of the oldest pending message: 59 s healthy, 61 s degraded, 301 s critical.
    c.batch_execute(
        "INSERT INTO pgtrickle.h (event_id, received_at) VALUES ('old', now() - interval '59 seconds')",
    )
    .unwrap();
    assert_eq!(health(&mut c)["status"], "healthy");
    c.batch_execute("UPDATE pgtrickle.h SET received_at = now() - interval '61 seconds'")
        .unwrap();
    let h = health(&mut c);
    assert_eq!(h["status"], "degraded", "{h}");
    let reason = h["reasons"][0].as_str().unwrap();
    assert!(
        reason.contains("oldest pending message waits") && reason.contains("(degraded at 60 s)"),
        "{reason}"
    );
    assert!(h["oldest_pending_age_seconds"].as_f64().unwrap() >= 61.0);
    c.batch_execute("UPDATE pgtrickle.h SET received_at = now() - interval '301 seconds'")
        .unwrap();
    assert_eq!(health(&mut c)["status"], "critical");

    // Throughput: processed in the last 5 minutes, per minute.
    c.batch_execute(
        "UPDATE pgtrickle.h SET processed_at = now();
         INSERT INTO pgtrickle.h (event_id, processed_at)
         SELECT 'p' || g, now() - interval '1 minute' FROM generate_series(1, 9) g;
         INSERT INTO pgtrickle.h (event_id, processed_at)
         SELECT 'q' || g, now() - interval '10 minutes' FROM generate_series(1, 50) g;",
    )
    .unwrap();
    let h = health(&mut c);
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(h["processed_last_5_minutes"], 10);
    assert_eq!(h["throughput_per_minute"].as_f64(), Some(2.0));

    // Dead letters: 1 degraded, 100 critical.
    c.batch_execute("INSERT INTO pgtrickle.h (event_id, retry_count) VALUES ('d0', 1)")
        .unwrap();
    let h = health(&mut c);
    assert_eq!(
        (h["status"].as_str(), h["dlq_count"].as_i64()),
        (Some("degraded"), Some(1))
    );
    c.batch_execute(
        "INSERT INTO pgtrickle.h (event_id, retry_count) SELECT 'd' || g, 5 FROM generate_series(1, 98) g",
    )
    .unwrap();
    assert_eq!(health(&mut c)["status"], "degraded");
    c.batch_execute("INSERT INTO pgtrickle.h (event_id, retry_count) VALUES ('d99', 1)")
        .unwrap();
    let h = health(&mut c);
    assert_eq!(h["status"], "critical", "{h}");
    assert!(h["reasons"][0]
        .as_str()
        .unwrap()
        .contains("100 dead letters"));

    // An ordering gap waiting over a minute degrades an otherwise quiet inbox.
    ordered_inbox(&mut c, "ho");
    c.batch_execute(
        "INSERT INTO pgtrickle.ho (event_id, aggregate_id, payload, processed_at, received_at)
         VALUES ('a1', 'A', '{\"seq\": 1}', now(), now() - interval '50 seconds'),
                ('a3', 'A', '{\"seq\": 3}', NULL, now() - interval '50 seconds')",
    )
    .unwrap();
    let h = json_of(&mut c, "pgtrickle.inbox_health('ho')");
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(h["ordering_gaps"], 1);
    c.batch_execute(
        "UPDATE pgtrickle.ho SET received_at = now() - interval '70 seconds' WHERE event_id = 'a3'",
    )
    .unwrap();
    let h = json_of(&mut c, "pgtrickle.inbox_health('ho')");
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(h["reasons"].to_string().contains("ordering gap"), "{h}");

    // inbox_status and the dashboard view: one row per inbox.
    let rows = c
        .query(
            "SELECT inbox_name, ordered, prioritized, pending_count, dlq_count, status
               FROM pgtrickle.inbox_status()",
            &[],
        )
        .unwrap();
    let got: Vec<(String, bool, bool, i64, i64, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("h".into(), false, false, 0, 100, "critical".into()),
            ("ho".into(), true, false, 1, 0, "degraded".into())
        ]
    );
    // The relay's role may read health (e.g. for its own /health).
    let mut r = relay_login(pg, &mut c, "sqli_health", "sqli_health_relay");
    assert_eq!(
        i64_of(&mut r, "SELECT count(*) FROM pgtrickle.pgt_inbox_status"),
        2
    );
    assert_eq!(
        text_of(&mut r, "SELECT pgtrickle.inbox_health('ho')->>'status'").as_deref(),
        Some("degraded")
    );
    assert_err(
        &mut r,
        "SELECT pgtrickle.replay_inbox_messages('h', ARRAY['d0'])",
        "42501",
        "permission denied",
    );

    // A missing table is critical, not an error.
    c.batch_execute(
        "CREATE TABLE public.gone (event_id text PRIMARY KEY, processed_at timestamptz);
         SELECT pgtrickle.enable_inbox_tracking('gone', 'public.gone');
         DROP TABLE public.gone CASCADE;",
    )
    .unwrap();
    let h = json_of(&mut c, "pgtrickle.inbox_health('gone')");
    assert_eq!(h["status"], "critical");
    assert!(h["reasons"][0].as_str().unwrap().contains("missing"));
    assert_err(
        &mut c,
        "SELECT pgtrickle.inbox_health('nope')",
        "P0002",
        "does not exist",
    );
}

// ---------------------------------------------------------------------------
// retention and maintenance
// ---------------------------------------------------------------------------

#[test]
fn inbox_retention_in_bounded_batches() {
    let (_pg, _url, mut c) = setup("sqli_inbox_retention");
    c.batch_execute(
        "SELECT pgtrickle.create_inbox('r', p_max_retries => 1, p_retention_hours => 24);
         INSERT INTO pgtrickle.r (event_id, processed_at)
         SELECT 'old' || g, now() - interval '25 hours' FROM generate_series(1, 25) g;
         INSERT INTO pgtrickle.r (event_id, processed_at)
         SELECT 'new' || g, now() - interval '23 hours' FROM generate_series(1, 5) g;
         INSERT INTO pgtrickle.r (event_id, received_at) VALUES ('pending', now() - interval '30 days');
         INSERT INTO pgtrickle.r (event_id, retry_count, received_at) VALUES
             ('dead-old', 1, now() - interval '8 days'), ('dead-new', 1, now() - interval '6 days');",
    )
    .unwrap();
    let run = |c: &mut Client, sql: &str| -> (i64, i64) {
        let r = c.query_one(sql, &[]).unwrap();
        (r.get(1), r.get(2))
    };
    // Bounded: 2 batches of 10 per call.
    assert_eq!(
        run(
            &mut c,
            "SELECT * FROM pgtrickle.inbox_retention('r', 10, 2)"
        ),
        (20, 0)
    );
    assert_eq!(
        run(
            &mut c,
            "SELECT * FROM pgtrickle.inbox_retention('r', 10, 2)"
        ),
        (5, 0)
    );
    assert_eq!(
        run(&mut c, "SELECT * FROM pgtrickle.inbox_retention('r')"),
        (0, 0),
        "dead letters are kept unless a DLQ retention is set"
    );
    c.batch_execute("SELECT pgtrickle.set_inbox_retention('r', 24, 168)")
        .unwrap();
    assert_eq!(
        run(&mut c, "SELECT * FROM pgtrickle.inbox_retention('r')"),
        (0, 1)
    );
    assert_eq!(
        texts(&mut c, "SELECT event_id FROM pgtrickle.r ORDER BY 1", &[]),
        vec!["dead-new", "new1", "new2", "new3", "new4", "new5", "pending"]
    );

    // An ordered inbox keeps its positions when its processed rows go.
    ordered_inbox(&mut c, "ro");
    c.batch_execute(
        "INSERT INTO pgtrickle.ro (event_id, aggregate_id, payload, processed_at)
         SELECT 'A-' || s, 'A', jsonb_build_object('seq', s), now() - interval '100 hours' FROM generate_series(1, 5) s;
         INSERT INTO pgtrickle.ro (event_id, aggregate_id, payload) VALUES ('A-6', 'A', '{\"seq\": 6}');",
    )
    .unwrap();
    assert_eq!(
        run(&mut c, "SELECT * FROM pgtrickle.inbox_retention('ro')"),
        (5, 0)
    );
    assert_eq!(next_rows(&mut c, "ro"), vec![("A".to_string(), 6)]);
    assert_eq!(i64_of(&mut c, "SELECT count(*) FROM pgtrickle.gaps_ro"), 0);

    // Every inbox at once; validation.
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.inbox_retention()"),
        2
    );
    for (sql, part) in [
        (
            "SELECT * FROM pgtrickle.inbox_retention('r', 0)",
            "p_batch_size",
        ),
        (
            "SELECT * FROM pgtrickle.inbox_retention('r', 10, 0)",
            "p_max_batches",
        ),
        (
            "SELECT pgtrickle.set_inbox_retention('r', -1)",
            "p_retention_hours",
        ),
        (
            "SELECT pgtrickle.set_inbox_retention('r', 1, -1)",
            "p_dlq_retention_hours",
        ),
    ] {
        assert_err(&mut c, sql, "22023", part);
    }
    assert_err(
        &mut c,
        "SELECT * FROM pgtrickle.inbox_retention('nope')",
        "P0002",
        "does not exist",
    );
}

#[test]
fn outbox_retention_never_deletes_uncommitted_rows() {
    let (pg, url, mut c) = setup("sqli_outbox_retention");
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('ret', 1);
         SELECT pgtrickle.create_consumer_group('g', 'ret', 'earliest');
         SELECT pgtrickle.outbox_publish('ret', jsonb_build_object('n', g)) FROM generate_series(1, 5) g;
         UPDATE pgtrickle.outbox_ret SET created_at = now() - interval '2 hours';",
    )
    .unwrap();
    wait_horizon(&mut c, "outbox_ret");
    // A row written by a transaction that is still open, already "old".
    let mut open = pg.client(&url);
    open.batch_execute(
        "BEGIN;
         SELECT pgtrickle.outbox_publish('ret', '{\"open\": true}');
         UPDATE pgtrickle.outbox_ret SET created_at = now() - interval '2 hours' WHERE payload->'inserted'->0 ? 'open';",
    )
    .unwrap();

    assert_eq!(poll(&mut c, "g", "c1", 3, 30), vec![1, 2, 3]);
    assert!(bool_of(
        &mut c,
        "SELECT pgtrickle.commit_offset('g', 'c1', 3)"
    ));
    // Only what the group committed goes; never the uncommitted 4, 5, 6.
    assert_eq!(
        i64_of(&mut c, "SELECT pgtrickle.outbox_retention('ret', false, 1)"),
        3
    );
    assert_eq!(
        ids(
            &mut c,
            "SELECT id FROM pgtrickle.outbox_ret ORDER BY id",
            &[]
        ),
        vec![4, 5]
    );
    // Even forced, a row of a transaction that has not committed survives.
    assert_eq!(
        i64_of(&mut c, "SELECT pgtrickle.outbox_retention('ret', true)"),
        2
    );
    open.batch_execute("COMMIT").unwrap();
    assert_eq!(
        ids(
            &mut c,
            "SELECT id FROM pgtrickle.outbox_ret ORDER BY id",
            &[]
        ),
        vec![6]
    );
    // The group has not consumed row 6: unforced retention keeps it.
    assert_eq!(
        i64_of(&mut c, "SELECT pgtrickle.outbox_retention('ret')"),
        0
    );

    // run_maintenance does all the housekeeping in one call.
    c.batch_execute("SELECT pgtrickle.create_inbox('mi', p_retention_hours => 1);
                     INSERT INTO pgtrickle.mi (event_id, processed_at) VALUES ('x', now() - interval '2 hours');")
        .unwrap();
    let summary = json_of(&mut c, "pgtrickle.run_maintenance()");
    assert_eq!(summary["outbox_rows_deleted"], 0, "{summary}");
    assert_eq!(summary["inbox_rows_deleted"][0]["inbox_name"], "mi");
    assert_eq!(summary["inbox_rows_deleted"][0]["processed_deleted"], 1);
    assert_eq!(summary["dead_consumers"], serde_json::json!([]));
}

#[test]
fn dead_consumers_are_reaped() {
    let (_pg, _url, mut c) = setup("sqli_reap");
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('q');
         SELECT pgtrickle.create_consumer_group('rg', 'q', 'earliest');
         SELECT pgtrickle.outbox_publish('q', jsonb_build_object('n', g)) FROM generate_series(1, 4) g;",
    )
    .unwrap();
    wait_horizon(&mut c, "outbox_q");
    // "dead" leases 1..2 for 10 minutes, then stops heart-beating.
    assert_eq!(poll(&mut c, "rg", "dead", 2, 600), vec![1, 2]);
    c.batch_execute(
        "UPDATE pgtrickle.pgt_consumer_offsets SET last_heartbeat_at = now() - interval '5 minutes'
          WHERE consumer_id = 'dead'",
    )
    .unwrap();
    assert_eq!(poll(&mut c, "rg", "alive", 10, 30), vec![3, 4]);
    assert!(bool_of(
        &mut c,
        "SELECT pgtrickle.commit_offset('rg', 'alive', 4)"
    ));
    assert_eq!(poll(&mut c, "rg", "alive", 10, 30), Vec::<i64>::new());
    assert_eq!(
        texts(
            &mut c,
            "SELECT consumer_id FROM pgtrickle.pgt_consumer_active_leases",
            &[]
        ),
        vec!["dead"]
    );

    // Not dead yet under a 10-minute threshold; dead under 60 s.
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.reap_dead_consumers(600)"
        ),
        0
    );
    let reaped = c
        .query(
            "SELECT group_name, consumer_id, leases_released FROM pgtrickle.reap_dead_consumers()",
            &[],
        )
        .unwrap();
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].get::<_, String>(1), "dead");
    assert_eq!(reaped[0].get::<_, i32>(2), 1);
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.pgt_consumer_active_leases"
        ),
        0
    );
    // The live consumer takes the batch over at once, and the group moves on.
    assert_eq!(poll(&mut c, "rg", "alive", 10, 30), vec![1, 2]);
    assert!(bool_of(
        &mut c,
        "SELECT pgtrickle.commit_offset('rg', 'alive', 2)"
    ));
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT committed_id FROM pgtrickle.pgt_consumer_groups"
        ),
        4
    );
    // The zombie's late commit is refused.
    assert!(!bool_of(
        &mut c,
        "SELECT pgtrickle.commit_offset('rg', 'dead', 2)"
    ));

    // p_remove forgets dead consumers; their status row disappears.
    let n = i64_of(
        &mut c,
        "SELECT count(*) FROM pgtrickle.reap_dead_consumers(60, 'rg', true)",
    );
    assert_eq!(n, 1);
    assert_eq!(
        texts(
            &mut c,
            "SELECT consumer_id FROM pgtrickle.pgt_consumer_status",
            &[]
        ),
        vec!["alive"]
    );
    assert_err(
        &mut c,
        "SELECT * FROM pgtrickle.reap_dead_consumers(60, 'nope')",
        "P0002",
        "consumer group \"nope\" does not exist",
    );
    assert_err(
        &mut c,
        "SELECT * FROM pgtrickle.reap_dead_consumers(0)",
        "22023",
        "p_dead_after_seconds",
    );
}

// ---------------------------------------------------------------------------
// install
// ---------------------------------------------------------------------------

#[test]
fn install_twice_keeps_inbox_features() {
    let (pg, url, mut c) = setup("sqli_install");
    ordered_inbox(&mut c, "o");
    c.batch_execute(
        "SELECT pgtrickle.create_inbox('p');
         ALTER TABLE pgtrickle.p ADD COLUMN priority int;
         SELECT pgtrickle.enable_inbox_priority('p');
         CREATE TABLE public.adopted (event_id text PRIMARY KEY, processed_at timestamptz);
         SELECT pgtrickle.enable_inbox_tracking('a', 'public.adopted');",
    )
    .unwrap();
    insert_seq(&mut c, "o", "A", 1);
    let count = |c: &mut Client| -> (i64, i64, i64) {
        (
            i64_of(c, "SELECT count(*) FROM pg_class WHERE relnamespace IN ('pgtrickle'::regnamespace, 'public'::regnamespace)"),
            i64_of(c, "SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgtrickle'::regnamespace"),
            i64_of(c, "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal"),
        )
    };
    let before = count(&mut c);
    pg.install_sql(&url);
    pg.install_sql(&url);
    assert_eq!(count(&mut c), before);
    assert_eq!(next_rows(&mut c, "o"), vec![("A".to_string(), 1)]);
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.pgt_inbox_config"),
        3
    );

    // The new SECURITY DEFINER functions pin search_path, none is PUBLIC.
    let bad = texts(
        &mut c,
        "SELECT p.oid::regprocedure::text FROM pg_proc p
          WHERE p.pronamespace = 'pgtrickle'::regnamespace AND p.prosecdef
            AND (NOT coalesce('search_path=pg_catalog, pgtrickle, pg_temp' = ANY (p.proconfig), false)
                 OR p.proacl IS NULL
                 OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'))",
        &[],
    );
    assert!(bad.is_empty(), "{bad:?}");
    let mut r = relay_login(pg, &mut c, "sqli_install", "sqli_install_relay");
    for f in [
        "SELECT pgtrickle.enable_inbox_ordering('p', 'aggregate_id', 'priority')",
        "SELECT pgtrickle.inbox_claim('o')",
        "SELECT pgtrickle.inbox_retention()",
        "SELECT pgtrickle.reap_dead_consumers()",
        "SELECT pgtrickle.enable_inbox_tracking('x', 'public.adopted')",
    ] {
        assert_err(&mut r, f, "42501", "permission denied");
    }
}

// ---------------------------------------------------------------------------
// privileges
// ---------------------------------------------------------------------------

/// Issue 9, item 1: a worker (granted the worker functions, as docs/inbox.md
/// says) that is also the relay's role plants objects in its temporary
/// schema that a function running as the owner would pick up before
/// pg_catalog's: nothing of it may ever run as the owner.
#[test]
fn workers_and_the_relay_cannot_run_code_as_the_owner() {
    let db = "sqli_temp_traps";
    let role = "sqli_trap_worker";
    let (pg, _url, mut c) = setup(db);
    ordered_inbox(&mut c, "ord");
    c.batch_execute(
        "SELECT pgtrickle.create_inbox('ib');
         INSERT INTO pgtrickle.ib (event_id, aggregate_id, payload)
         SELECT 'e' || g, 'a' || g % 3, '{}' FROM generate_series(1, 20) g;
         INSERT INTO pgtrickle.ord (event_id, aggregate_id, payload)
         VALUES ('o1', 'a', '{\"seq\": 1}'), ('o3', 'a', '{\"seq\": 3}');
         SELECT pgtrickle.create_inbox('prio');
         ALTER TABLE pgtrickle.prio ADD COLUMN priority int;
         SELECT pgtrickle.enable_inbox_priority('prio');
         INSERT INTO pgtrickle.prio (event_id, priority) VALUES ('p1', 1), ('p2', 5);
         CREATE TABLE public.legacy (id bigint PRIMARY KEY, done_at timestamptz, tries int,
                                     err text, received_at timestamptz DEFAULT now());
         INSERT INTO public.legacy (id) SELECT generate_series(1, 5);
         SELECT pgtrickle.enable_inbox_tracking('legacy', 'public.legacy', 'id', 'done_at',
                                                'tries', 'err', 'received_at');",
    )
    .unwrap();
    relay_login(pg, &mut c, db, role);
    c.batch_execute(&format!(
        "ALTER ROLE {role} NOSUPERUSER;
         GRANT EXECUTE ON FUNCTION pgtrickle.inbox_claim(text, int, int, int),
                                   pgtrickle.inbox_mark_processed(text, text[]),
                                   pgtrickle.inbox_mark_failed(text, text, text),
                                   pgtrickle.replay_inbox_messages(text, text[]) TO {role};
         GRANT SELECT ON pgtrickle.next_ord, pgtrickle.ib_pending TO {role};"
    ))
    .unwrap();

    let failures: Vec<String> = [
        "SELECT pgtrickle.inbox_mark_processed('ib', ARRAY['e1'])",
        "SELECT pgtrickle.inbox_mark_processed('legacy', ARRAY['1'])",
        "SELECT pgtrickle.inbox_mark_failed('ib', 'e2', 'boom')",
        "SELECT pgtrickle.inbox_mark_failed('legacy', '2', 'boom')",
        "SELECT pgtrickle.replay_inbox_messages('ib', ARRAY['e1'])",
        "SELECT pgtrickle.replay_inbox_messages('legacy', ARRAY['1'])",
        "SELECT * FROM pgtrickle.inbox_claim('ib', 5)",
        "SELECT * FROM pgtrickle.inbox_claim('ib', 5, 0, 2)",
        "SELECT * FROM pgtrickle.inbox_claim('ord', 5, 1, 2)",
        "SELECT * FROM pgtrickle.inbox_claim('prio', 5)",
        "SELECT * FROM pgtrickle.inbox_claim('legacy', 5, 0, 3)",
        "SELECT pgtrickle.inbox_is_my_partition('a1', 0, 2)",
        "SELECT pgtrickle.inbox_health('ib'), pgtrickle.inbox_health('ord')",
        "SELECT * FROM pgtrickle.inbox_status()",
        "SELECT * FROM pgtrickle.pgt_inbox_status",
        "SELECT * FROM pgtrickle.inbox_ordering_gaps('ord')",
        "SELECT * FROM pgtrickle.next_ord",
        "SELECT * FROM pgtrickle.ib_pending",
        // What the relay writes fires the ordering trigger (SECURITY DEFINER)...
        "INSERT INTO pgtrickle.ord (event_id, aggregate_id, payload) VALUES ('o2', 'a', '{\"seq\": 2}')",
        // ... and so does a worker marking an event processed.
        "SELECT pgtrickle.inbox_mark_processed('ord', ARRAY['o1', 'o2'])",
    ]
    .iter()
    .filter_map(|sql| attack(pg, &mut c, db, role, sql))
    .collect();
    assert!(
        failures.is_empty(),
        "{} of the calls were exploited or failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The calls did their work (as the owner, on the real catalogs).
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.ord WHERE processed_at IS NOT NULL"
        ),
        2
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT last_sequence FROM pgtrickle.pgt_ordering_ord WHERE aggregate = 'a'"
        ),
        2
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT tries::bigint FROM public.legacy WHERE id = 2"
        ),
        1
    );
}
#[test]
fn inbox_objects_dedup_views_and_drop() {
    let (pg, _url, mut c) = setup("sqlt_inbox");
    c.batch_execute("SELECT pgtrickle.create_inbox('payments', p_max_retries => 2)")
        .unwrap();
    for rel in [
        "payments",
        "payments_pending",
        "payments_dlq",
        "payments_stats",
    ] {
        assert!(
            bool_of(
                &mut c,
                &format!("SELECT to_regclass('pgtrickle.{rel}') IS NOT NULL")
            ),
            "{rel} missing"
        );
    }
    let cols: Vec<String> = c
        .query(
            "SELECT attname || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = 'pgtrickle.payments'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        cols,
        [
            "event_id text",
            "event_type text",
            "source text",
            "aggregate_id text",
            "payload jsonb",
            "received_at timestamp with time zone",
            "processed_at timestamp with time zone",
            "error text",
            "retry_count integer",
            "trace_id text"
        ]
    );
    assert_eq!(
        text_of(&mut c, "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'pgtrickle.payments'::regclass AND contype = 'p'").as_deref(),
        Some("PRIMARY KEY (event_id)")
    );
    assert!(bool_of(
        &mut c,
        "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = 'pgtrickle' AND tablename = 'payments'
                          AND indexdef LIKE '%WHERE (processed_at IS NULL)')"
    ));
    let cfg = c
        .query_one(
            "SELECT inbox_schema, max_retries, is_managed, id_column FROM pgtrickle.pgt_inbox_config WHERE inbox_name = 'payments'",
            &[],
        )
        .unwrap();
    assert_eq!(cfg.get::<_, String>(0), "pgtrickle");
    assert_eq!(cfg.get::<_, i32>(1), 2);
    assert!(cfg.get::<_, bool>(2));
    assert_eq!(cfg.get::<_, String>(3), "event_id");

    // A second call is fine and changes nothing.
    c.batch_execute("SELECT pgtrickle.create_inbox('payments', p_max_retries => 9)")
        .unwrap();
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT max_retries::bigint FROM pgtrickle.pgt_inbox_config"
        ),
        2
    );

    // The relay inserts with ON CONFLICT DO NOTHING: one row per event.
    let mut r = relay_login(pg, &mut c, "sqlt_inbox", "sqlt_inbox_relay");
    for _ in 0..2 {
        r.batch_execute(
            "INSERT INTO pgtrickle.payments (event_id, event_type, payload) VALUES
                 ('e1', 'paid', '{}'), ('e2', 'paid', '{}'), ('e3', 'refund', '{}'), ('e4', 'paid', '{}')
             ON CONFLICT (event_id) DO NOTHING",
        )
        .unwrap();
    }
    assert_eq!(i64_of(&mut c, "SELECT count(*) FROM pgtrickle.payments"), 4);
    c.batch_execute(
        "UPDATE pgtrickle.payments SET processed_at = now() WHERE event_id = 'e1';
         UPDATE pgtrickle.payments SET retry_count = 2, error = 'boom' WHERE event_id = 'e2';
         UPDATE pgtrickle.payments SET retry_count = 1 WHERE event_id = 'e3';",
    )
    .unwrap();
    assert_eq!(
        ids(
            &mut c,
            "SELECT substr(event_id, 2)::bigint FROM pgtrickle.payments_pending ORDER BY 1",
            &[]
        ),
        vec![3, 4]
    );
    assert_eq!(
        ids(
            &mut c,
            "SELECT substr(event_id, 2)::bigint FROM pgtrickle.payments_dlq",
            &[]
        ),
        vec![2]
    );
    let stats: Vec<(String, i64, i64, i64, i64)> = c
        .query("SELECT event_type, total, pending, processed, dlq FROM pgtrickle.payments_stats ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        stats,
        vec![("paid".into(), 3, 1, 1, 1), ("refund".into(), 1, 1, 0, 0)]
    );

    // Optional views, another schema.
    c.batch_execute(
        "CREATE SCHEMA app;
         SELECT pgtrickle.create_inbox('orders_in', 'app', 3, '1s', false, false);",
    )
    .unwrap();
    assert!(bool_of(
        &mut c,
        "SELECT to_regclass('app.orders_in_pending') IS NOT NULL"
    ));
    assert!(bool_of(&mut c, "SELECT to_regclass('app.orders_in_dlq') IS NULL AND to_regclass('app.orders_in_stats') IS NULL"));
    r.batch_execute(
        "INSERT INTO app.orders_in (event_id) VALUES ('x') ON CONFLICT (event_id) DO NOTHING",
    )
    .unwrap();

    // Validation.
    assert_err(
        &mut c,
        "SELECT pgtrickle.create_inbox('')",
        "22023",
        "create_inbox: p_name must be a non-empty inbox name",
    );
    assert_err(
        &mut c,
        &format!("SELECT pgtrickle.create_inbox('{}')", "x".repeat(56)),
        "22023",
        "is too long",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.create_inbox('i', 'no_such_schema')",
        "3F000",
        "schema \"no_such_schema\" does not exist",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.create_inbox('i', p_max_retries => -1)",
        "22023",
        "p_max_retries",
    );
    c.batch_execute("CREATE TABLE pgtrickle.plain (x int)")
        .unwrap();
    assert_err(
        &mut c,
        "SELECT pgtrickle.create_inbox('plain')",
        "42P07",
        "already exists and is not an inbox",
    );

    // drop_inbox: a dependent view needs p_cascade.
    c.batch_execute(
        "CREATE VIEW public.paid AS SELECT * FROM pgtrickle.payments WHERE event_type = 'paid'",
    )
    .unwrap();
    let (code, _) = db_err(&mut c, "SELECT pgtrickle.drop_inbox('payments')");
    assert_eq!(code, "2BP01");
    assert!(
        bool_of(
            &mut c,
            "SELECT to_regclass('pgtrickle.payments_pending') IS NOT NULL"
        ),
        "a failed drop changes nothing"
    );
    c.batch_execute("SELECT pgtrickle.drop_inbox('payments', p_cascade => true)")
        .unwrap();
    for rel in [
        "pgtrickle.payments",
        "pgtrickle.payments_pending",
        "pgtrickle.payments_dlq",
        "pgtrickle.payments_stats",
        "public.paid",
    ] {
        assert!(
            bool_of(&mut c, &format!("SELECT to_regclass('{rel}') IS NULL")),
            "{rel} still there"
        );
    }
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.pgt_inbox_config WHERE inbox_name = 'payments'"
        ),
        0
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.drop_inbox('payments')",
        "P0002",
        "drop_inbox: inbox \"payments\" does not exist",
    );
    c.batch_execute("SELECT pgtrickle.drop_inbox('payments', true)")
        .unwrap();

    // An adopted (unmanaged) table keeps its table; only the views and row go.
    c.batch_execute(
        "UPDATE pgtrickle.pgt_inbox_config SET is_managed = false WHERE inbox_name = 'orders_in';
                     SELECT pgtrickle.drop_inbox('orders_in');",
    )
    .unwrap();
    assert!(bool_of(&mut c, "SELECT to_regclass('app.orders_in') IS NOT NULL AND to_regclass('app.orders_in_pending') IS NULL"));
}
