//! Consumer groups (sql/20_consumer_groups.sql): leases, the committed
//! prefix, takeover of expired leases, seek/reset, and the commit horizon.
//!
//! Every test gets its own database on the shared per-binary PostgreSQL.
//! Tests run in parallel on that one server, and the commit horizon
//! (pg_snapshot_xmin) is cluster-wide, so a test that expects rows to be
//! handed out first waits until the horizon has passed them.

mod support;

use std::time::Duration;

use support::sqlcheck::*;

#[test]
fn consumer_groups_lease_disjoint_batches_and_commit_the_done_prefix() {
    let (_pg, _url, mut c) = setup("sqlt_groups");
    c.batch_execute("SELECT pgtrickle.enable_outbox('o')")
        .unwrap();
    publish(&mut c, "o", 7);
    wait_horizon(&mut c, "outbox_o");
    c.batch_execute("SELECT pgtrickle.create_consumer_group('g', 'o', 'earliest')")
        .unwrap();

    let a = poll(&mut c, "g", "c1", 2);
    let b = poll(&mut c, "g", "c2", 2);
    let a2 = poll(&mut c, "g", "c1", 2);
    assert_eq!(
        (a.clone(), b.clone(), a2.clone()),
        (vec![1, 2], vec![3, 4], vec![5, 6])
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.pgt_consumer_active_leases WHERE group_name = 'g'"
        ),
        3
    );

    // Later batches done first: the watermark waits for the first one.
    assert!(commit(&mut c, "g", "c2", 4));
    assert_eq!(watermark(&mut c, "g"), 0);
    assert!(commit(&mut c, "g", "c1", 6));
    assert_eq!(watermark(&mut c, "g"), 0);
    assert!(commit(&mut c, "g", "c1", 2));
    assert_eq!(watermark(&mut c, "g"), 6);
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.pgt_consumer_leases"),
        0
    );
    // Committing the same offset again is harmless.
    assert!(commit(&mut c, "g", "c1", 6));

    // The consumer's own offset never goes back; lag counts rows after the watermark.
    let lag: Vec<(String, i64, i64, i64, bool)> = c
        .query("SELECT consumer_id, committed_offset, max_outbox_id, lag, is_alive FROM pgtrickle.consumer_lag('g')", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        lag,
        vec![("c1".into(), 6, 7, 1, true), ("c2".into(), 4, 7, 1, true)]
    );
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT lag FROM pgtrickle.pgt_consumer_group_lag WHERE group_name = 'g'"
        ),
        1
    );
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.pgt_consumer_status WHERE group_name = 'g' AND is_alive"),
        2
    );

    // Regression is refused.
    let b7 = poll(&mut c, "g", "c1", 5);
    assert_eq!(b7, vec![7]);
    assert!(commit(&mut c, "g", "c1", 7));
    assert!(!commit(&mut c, "g", "c1", 5));
    assert_eq!(watermark(&mut c, "g"), 7);
    assert!(poll(&mut c, "g", "c1", 5).is_empty());
    assert_eq!(
        i64_of(&mut c, "SELECT count(*) FROM pgtrickle.pgt_consumer_leases"),
        0,
        "an empty poll leases nothing"
    );

    // Errors.
    assert_err(
        &mut c,
        "SELECT * FROM pgtrickle.poll_outbox('nope', 'c')",
        "P0002",
        "poll_outbox: consumer group \"nope\" does not exist",
    );
    assert_err(
        &mut c,
        "SELECT * FROM pgtrickle.poll_outbox('g', '')",
        "22023",
        "p_consumer",
    );
    assert_err(
        &mut c,
        "SELECT * FROM pgtrickle.poll_outbox('g', 'c', 0)",
        "22023",
        "p_batch_size",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.create_consumer_group('g', 'o')",
        "42710",
        "consumer group \"g\" already exists",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.create_consumer_group('g2', 'o', 'middle')",
        "22023",
        "p_auto_offset_reset must be 'earliest' or 'latest'",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.create_consumer_group('g2', 'nope')",
        "P0002",
        "outbox \"nope\" does not exist",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.commit_offset('nope', 'c', 1)",
        "P0002",
        "does not exist",
    );

    c.batch_execute("SELECT pgtrickle.drop_consumer_group('g')")
        .unwrap();
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.pgt_consumer_offsets"
        ),
        0
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.drop_consumer_group('g')",
        "P0002",
        "consumer group \"g\" does not exist",
    );
}

#[test]
fn concurrent_consumers_see_every_row_once() {
    let (pg, url, mut c) = setup("sqlt_groups_parallel");
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('o');
         SELECT pgtrickle.create_consumer_group('g', 'o', 'earliest');
         SELECT pgtrickle.outbox_publish('o', jsonb_build_object('n', g)) FROM generate_series(1, 300) g;",
    )
    .unwrap();
    wait_horizon(&mut c, "outbox_o");
    let handles: Vec<_> = (0..4)
        .map(|k| {
            let mut client = pg.client(&url);
            std::thread::spawn(move || {
                let me = format!("c{k}");
                let mut seen = Vec::new();
                loop {
                    let batch = poll(&mut client, "g", &me, 7);
                    let Some(&last) = batch.last() else { break };
                    seen.extend(&batch);
                    assert!(commit(&mut client, "g", &me, last));
                }
                seen
            })
        })
        .collect();
    let mut all: Vec<i64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort();
    assert_eq!(
        all,
        (1..=300).collect::<Vec<i64>>(),
        "every row exactly once"
    );
    assert_eq!(watermark(&mut c, "g"), 300);
}

#[test]
fn expired_lease_is_taken_over() {
    let (pg, url, mut c) = setup("sqlt_takeover");
    c.batch_execute("SELECT pgtrickle.enable_outbox('o')")
        .unwrap();
    publish(&mut c, "o", 5);
    wait_horizon(&mut c, "outbox_o");
    c.batch_execute("SELECT pgtrickle.create_consumer_group('g', 'o', 'earliest')")
        .unwrap();

    assert_eq!(poll(&mut c, "g", "c1", 2), vec![1, 2]);
    // Not expired: c2 gets the next batch.
    assert_eq!(poll(&mut c, "g", "c2", 1), vec![3]);
    assert!(commit(&mut c, "g", "c2", 3));
    // c1 "dies": its lease expires.
    c.batch_execute("UPDATE pgtrickle.pgt_consumer_leases SET lease_expires = now() - interval '1 second' WHERE consumer_id = 'c1'")
        .unwrap();
    // c2's next poll takes over exactly that range, whatever its batch size.
    assert_eq!(poll(&mut c, "g", "c2", 10), vec![1, 2]);
    // The old owner's commit is refused, with a warning.
    let (ok, out, err) = pg.psql(&url, "SELECT pgtrickle.commit_offset('g', 'c1', 2)");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "f");
    assert!(err.contains("WARNING:  commit_offset: consumer \"c1\" of group \"g\" holds no lease ending at offset 2"), "{err}");
    assert_eq!(watermark(&mut c, "g"), 0);
    assert!(commit(&mut c, "g", "c2", 2));
    assert_eq!(watermark(&mut c, "g"), 3);

    // extend_lease keeps a lease alive; heartbeat alone does not.
    assert_eq!(poll(&mut c, "g", "c1", 1), vec![4]);
    c.batch_execute(
        "UPDATE pgtrickle.pgt_consumer_leases SET lease_expires = now() + interval '1 second'",
    )
    .unwrap();
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT pgtrickle.extend_lease('g', 'c1', 600)::bigint"
        ),
        1
    );
    assert!(bool_of(
        &mut c,
        "SELECT lease_expires > now() + interval '500 seconds' FROM pgtrickle.pgt_consumer_leases"
    ));
    c.batch_execute("SELECT pgtrickle.consumer_heartbeat('g', 'c3')")
        .unwrap();
    assert!(bool_of(
        &mut c,
        "SELECT lease_expires > now() + interval '500 seconds' FROM pgtrickle.pgt_consumer_leases"
    ));
    assert!(bool_of(&mut c, "SELECT last_heartbeat_at IS NOT NULL FROM pgtrickle.pgt_consumer_offsets WHERE consumer_id = 'c3'"));
    assert_eq!(
        poll(&mut c, "g", "c2", 10),
        vec![5],
        "c1's extended lease is not taken over"
    );

    // Regression warning text.
    assert!(commit(&mut c, "g", "c1", 4));
    let (_, out, err) = pg.psql(&url, "SELECT pgtrickle.commit_offset('g', 'c1', 1)");
    assert_eq!(out.trim(), "f");
    assert!(err.contains("regression refused"), "{err}");
}

#[test]
fn seek_offset_replays_and_reset_modes() {
    let (_pg, _url, mut c) = setup("sqlt_seek");
    c.batch_execute("SELECT pgtrickle.enable_outbox('o')")
        .unwrap();
    publish(&mut c, "o", 3);
    wait_horizon(&mut c, "outbox_o");
    c.batch_execute(
        "SELECT pgtrickle.create_consumer_group('early', 'o', 'earliest');
         SELECT pgtrickle.create_consumer_group('late', 'o', 'latest');
         SELECT pgtrickle.create_consumer_group('default_reset', 'o');",
    )
    .unwrap();
    assert_eq!(
        text_of(&mut c, "SELECT auto_offset_reset FROM pgtrickle.pgt_consumer_groups WHERE group_name = 'default_reset'").as_deref(),
        Some("latest")
    );
    publish(&mut c, "o", 2); // 4, 5
    wait_horizon(&mut c, "outbox_o");
    assert_eq!(poll(&mut c, "early", "c", 10), vec![1, 2, 3, 4, 5]);
    assert_eq!(poll(&mut c, "late", "c", 10), vec![4, 5]);
    assert_eq!(poll(&mut c, "default_reset", "c", 10), vec![4, 5]);
    assert!(commit(&mut c, "early", "c", 5));

    c.batch_execute("SELECT pgtrickle.seek_offset('early', 'c', 2)")
        .unwrap();
    assert_eq!(watermark(&mut c, "early"), 2);
    assert_eq!(poll(&mut c, "early", "c", 10), vec![3, 4, 5]);
    assert!(
        commit(&mut c, "early", "c", 5),
        "after a seek the replayed batch commits"
    );
    c.batch_execute("SELECT pgtrickle.seek_offset('early', 'c', 0)")
        .unwrap();
    assert_eq!(poll(&mut c, "early", "c", 2), vec![1, 2]);
    // A seek drops outstanding leases (late's lease on 4..5 is untouched).
    c.batch_execute("SELECT pgtrickle.seek_offset('early', 'c', 4)")
        .unwrap();
    assert_eq!(
        i64_of(
            &mut c,
            "SELECT count(*) FROM pgtrickle.pgt_consumer_leases WHERE group_name = 'early'"
        ),
        0
    );
    assert_eq!(poll(&mut c, "early", "c", 10), vec![5]);
    assert_err(
        &mut c,
        "SELECT pgtrickle.seek_offset('early', 'c', 999)",
        "22023",
        "outbox row 999 does not exist",
    );
    assert_err(
        &mut c,
        "SELECT pgtrickle.seek_offset('early', 'c', -1)",
        "22023",
        "p_new_offset",
    );
}

#[test]
fn open_transactions_hold_back_the_horizon() {
    let (pg, url, mut c) = setup("sqlt_horizon");
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('o');
         SELECT pgtrickle.create_consumer_group('g', 'o', 'earliest');",
    )
    .unwrap();

    // Case 1: A takes id 1 and stays open; B writes id 2 and commits.
    let mut a = pg.client(&url);
    let mut b = pg.client(&url);
    let mut ta = a.transaction().unwrap();
    let id1: i64 = ta
        .query_one(
            "SELECT pgtrickle.outbox_publish('o', '{\"w\": \"A\"}')",
            &[],
        )
        .unwrap()
        .get(0);
    let id2 = i64_of(
        &mut b,
        "SELECT pgtrickle.outbox_publish('o', '{\"w\": \"B\"}')",
    );
    assert!(id1 < id2);
    // Neither A's row nor B's later one is handed out while A is open.
    for _ in 0..3 {
        assert!(poll(&mut c, "g", "c", 10).is_empty());
        std::thread::sleep(Duration::from_millis(50));
    }
    ta.commit().unwrap();
    wait_horizon(&mut c, "outbox_o");
    assert_eq!(poll(&mut c, "g", "c", 10), vec![id1, id2]);
    assert!(commit(&mut c, "g", "c", id2));

    // Case 2: B's transaction is older than A's but writes the larger id;
    // B commits while A is still open. B's row may go out first, and A's
    // smaller id must not be skipped afterwards.
    let mut tb = b.transaction().unwrap();
    tb.batch_execute("SELECT pg_current_xact_id()").unwrap();
    let mut ta = a.transaction().unwrap();
    let id3: i64 = ta
        .query_one(
            "SELECT pgtrickle.outbox_publish('o', '{\"w\": \"A2\"}')",
            &[],
        )
        .unwrap()
        .get(0);
    let id4: i64 = tb
        .query_one(
            "SELECT pgtrickle.outbox_publish('o', '{\"w\": \"B2\"}')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(id3 < id4);
    tb.commit().unwrap();
    let mut got = Vec::new();
    support::wait_until(30, "B's row below the horizon", || {
        got = poll(&mut c, "g", "c", 10);
        !got.is_empty()
    });
    assert_eq!(
        got,
        vec![id4],
        "only the committed, older transaction's row"
    );
    assert!(commit(&mut c, "g", "c", id4));
    assert!(poll(&mut c, "g", "c", 10).is_empty());
    ta.commit().unwrap();
    wait_horizon(&mut c, "outbox_o");
    assert_eq!(
        poll(&mut c, "g", "c", 10),
        vec![id3],
        "the smaller id is not skipped"
    );

    // A rolled-back row never shows up and does not block anything.
    let mut ta = a.transaction().unwrap();
    ta.batch_execute("SELECT pgtrickle.outbox_publish('o', '{\"w\": \"gone\"}')")
        .unwrap();
    ta.rollback().unwrap();
    assert!(commit(&mut c, "g", "c", id3));
    let id6 = i64_of(
        &mut c,
        "SELECT pgtrickle.outbox_publish('o', '{\"w\": \"after\"}')",
    );
    wait_horizon(&mut c, "outbox_o");
    assert_eq!(poll(&mut c, "g", "c", 10), vec![id6]);
}
