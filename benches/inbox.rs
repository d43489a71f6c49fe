//! The inbox benchmark: `cargo bench --bench inbox` (also run by `make bench`).
//!
//! Starts a private PostgreSQL, fills an ordered kit inbox with 1,000,000
//! processed messages over 10,000 aggregates (100 each) plus a backlog of
//! 29,000 unprocessed ones (sequences 101..103 of every aggregate, #101
//! missing for every tenth: 9,000 next messages and 1,000 gaps), vacuums it
//! as autovacuum would, then times `SELECT * FROM next_<inbox>` (all rows
//! fetched by the client) several times. One JSON line goes to stdout with
//! the median (`median_ms`, client round trip with every row transferred;
//! `server_median_ms`, the server's execution time from EXPLAIN ANALYZE);
//! progress goes to stderr. Target: under 50 ms. PostgreSQL runs with the
//! default durability settings; `BENCH_INBOX_RUNS` (default 15) sets the
//! number of timed queries.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::time::{Duration, Instant};

use common::median;
use support::Pg;

const AGGREGATES: i64 = 10_000;
const PROCESSED_PER_AGGREGATE: i64 = 100;

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Run `sql` (rows fetched) `runs` times after two warm-ups; times in ms and the row count.
fn time_query(c: &mut postgres::Client, sql: &str, runs: usize) -> (Vec<f64>, usize) {
    let st = c.prepare(sql).unwrap();
    let mut rows = 0;
    for _ in 0..2 {
        rows = c.query(&st, &[]).unwrap().len();
    }
    let times = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let n = c.query(&st, &[]).unwrap().len();
            assert_eq!(n, rows, "{sql}: row count changed between runs");
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    (times, rows)
}

/// Server-side execution time of `sql` (EXPLAIN ANALYZE, TIMING OFF), `runs` times, in ms.
fn execution_times(c: &mut postgres::Client, sql: &str, runs: usize) -> Vec<f64> {
    (0..runs)
        .map(|_| {
            c.query(&format!("EXPLAIN (ANALYZE, TIMING OFF) {sql}"), &[])
                .unwrap()
                .iter()
                .filter_map(|r| {
                    let line: String = r.get(0);
                    line.strip_prefix("Execution Time: ")?
                        .trim_end_matches(" ms")
                        .parse::<f64>()
                        .ok()
                })
                .next()
                .expect("no Execution Time in EXPLAIN ANALYZE")
        })
        .collect()
}

fn main() {
    let name = format!(
        "inbox_next_query_{}_processed_{}_aggregates",
        AGGREGATES * PROCESSED_PER_AGGREGATE,
        AGGREGATES
    );
    if !common::benching() || !common::selected(&name) {
        return;
    }
    // Many quick runs: BENCH_INBOX_RUNS (default 15).
    let runs: usize = common::env_or("BENCH_INBOX_RUNS", 15);
    let pg = Pg::shared_durable();
    let url = pg.new_db("bench_inbox");
    let mut c = pg.client(&url);

    let t = Instant::now();
    c.batch_execute(&format!(
        "SELECT pgtrickle.create_inbox('bench');
         ALTER TABLE pgtrickle.bench ADD COLUMN seq bigint;
         SELECT pgtrickle.enable_inbox_ordering('bench', 'aggregate_id', 'seq');
         INSERT INTO pgtrickle.bench (event_id, event_type, aggregate_id, seq, payload, received_at, processed_at)
         SELECT 'p-' || a || '-' || s, 'order.updated', 'order-' || a, s,
                jsonb_build_object('order', a, 'seq', s, 'note', repeat('x', 40)),
                now() - interval '2 hours', now() - interval '1 hour'
           FROM generate_series(1, {AGGREGATES}) a, generate_series(1, {PROCESSED_PER_AGGREGATE}) s;
         INSERT INTO pgtrickle.bench (event_id, event_type, aggregate_id, seq, payload)
         SELECT 'q-' || a || '-' || s, 'order.updated', 'order-' || a, s,
                jsonb_build_object('order', a, 'seq', s, 'note', repeat('x', 40))
           FROM generate_series(1, {AGGREGATES}) a, generate_series({p1}, {p3}) s
          WHERE NOT (a % 10 = 0 AND s = {p1});",
        p1 = PROCESSED_PER_AGGREGATE + 1,
        p3 = PROCESSED_PER_AGGREGATE + 3,
    ))
    .unwrap();
    // Steady state: the processed rows are all-visible; VACUUM may need
    // a second round (a concurrent transaction can hold the horizon back).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        c.batch_execute("VACUUM pgtrickle.bench").unwrap();
        let visible: bool = c
            .query_one(
                "SELECT relallvisible >= 0.9 * relpages FROM pg_class WHERE oid = 'pgtrickle.bench'::regclass",
                &[],
            )
            .unwrap()
            .get(0);
        if visible || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    c.batch_execute("ANALYZE pgtrickle.bench; ANALYZE pgtrickle.pgt_ordering_bench")
        .unwrap();
    let pending: i64 = c
        .query_one(
            "SELECT count(*) FROM pgtrickle.bench WHERE processed_at IS NULL",
            &[],
        )
        .unwrap()
        .get(0);
    eprintln!(
        "inbox bench: {} processed + {pending} pending rows over {AGGREGATES} aggregates loaded in {:.1}s",
        AGGREGATES * PROCESSED_PER_AGGREGATE,
        t.elapsed().as_secs_f64()
    );
    let plan: Vec<String> = c
        .query("EXPLAIN SELECT * FROM pgtrickle.next_bench", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let uses_index = plan.iter().any(|l| l.contains("bench_ord_pending_idx"));
    eprintln!("plan:\n{}", plan.join("\n"));

    let (next, next_rows) = time_query(&mut c, "SELECT * FROM pgtrickle.next_bench", runs);
    let (gaps, gap_rows) = time_query(&mut c, "SELECT * FROM pgtrickle.gaps_bench", runs);
    let server = execution_times(&mut c, "SELECT * FROM pgtrickle.next_bench", runs);
    assert_eq!(next_rows as i64, AGGREGATES * 9 / 10);
    assert_eq!(gap_rows as i64, AGGREGATES / 10);
    eprintln!(
        "next_bench: {next_rows} rows, median {:.1} ms; gaps_bench: {gap_rows} rows, median {:.1} ms",
        median(&next),
        median(&gaps)
    );
    common::emit(
        &name,
        median(&next),
        "ms",
        None,
        serde_json::json!({
            "min_ms": round1(next.iter().cloned().fold(f64::MAX, f64::min)),
            "max_ms": round1(next.iter().cloned().fold(0.0, f64::max)),
            "runs": runs,
            "rows": next_rows,
            "pending_rows": pending,
            "server_median_ms": round1(median(&server)),
            "uses_partial_index": uses_index,
            "gaps_median_ms": round1(median(&gaps)),
            "target_ms": 50,
        }),
    );
}
