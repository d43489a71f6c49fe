//! Consumer-group leases under slow sinks: a batch that takes longer than
//! the lease stays with its holder while the holder works, and a holder
//! that lost its lease stops publishing that batch.
#![cfg(feature = "http")]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use postgres::Client;
use serde_json::json;
use support::brokers::HttpReceiver;
use support::*;

/// A receiver taking 25 ms per request (the slow webhook).
fn slow_receiver() -> HttpReceiver {
    let h = HttpReceiver::start();
    h.respond_with(|_| {
        std::thread::sleep(Duration::from_millis(25));
        (200, Vec::new())
    });
    h
}

/// Database `db` with outbox `orders`, consumer group `workers` and
/// pipelines `g0`, `g1`, … in it, one per entry of `batches` (its
/// `batch_size`), each an http sink (one request per event) to `h` with
/// `lease_seconds`.
fn group_pipelines(db: &str, h: &HttpReceiver, batches: &[usize], lease: u32) -> String {
    let pg = Pg::shared();
    let url = pg.new_db(db);
    let mut c = pg.client(&url);
    c.batch_execute(
        "SELECT pgtrickle.enable_outbox('orders');
         SELECT pgtrickle.create_consumer_group('workers', 'orders', 'earliest');",
    )
    .unwrap();
    for (i, batch) in batches.iter().enumerate() {
        let sink = json!({"type": "http", "url": h.url("/hook"), "mode": "event",
                          "batch_size": batch, "lease_seconds": lease});
        c.execute(
            "SELECT pgtrickle.set_relay_outbox($1, 'orders', 'workers', $2::text::jsonb)",
            &[&format!("g{i}"), &sink.to_string()],
        )
        .unwrap();
    }
    url
}

/// How many times each dedup key was accepted.
fn deliveries(h: &HttpReceiver) -> BTreeMap<String, usize> {
    let mut count = BTreeMap::new();
    for r in h.accepted() {
        let k = r.json()["dedup_key"].as_str().unwrap().to_string();
        *count.entry(k).or_default() += 1;
    }
    count
}

/// The group's watermark (committed outbox id).
fn watermark(c: &mut Client) -> i64 {
    c.query_one(
        "SELECT committed_id FROM pgtrickle.pgt_consumer_groups WHERE group_name = 'workers'",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn batches_longer_than_the_lease_stay_with_their_holders() {
    // g0: 200 events at 25 ms each, 5 s per batch against a 2 s lease;
    // g1 polls every half second with its batches of 20, so it is there
    // to take over a lease the moment it expires.
    let h = slow_receiver();
    let url = group_pipelines("grp_long", &h, &[200, 20], 2);
    publish(&url, 0, 400);
    let r0 = Relay::spawn(relay(&url).args(["--pipeline", "g0"]));
    let r1 = Relay::spawn(relay(&url).args(["--pipeline", "g1"]));
    let mut c = Pg::shared().client(&url);
    wait_until(60, "the watermark past the last event", || {
        watermark(&mut c) == 400
    });
    let d = deliveries(&h);
    assert_eq!(d.len(), 400, "every event delivered");
    let worst = d.values().max().copied().unwrap_or(0);
    assert!(worst <= 2, "an event was delivered {worst} times");
    drop((r0, r1));
}

#[test]
fn a_holder_that_lost_its_lease_stops_publishing_the_batch() {
    // One batch of 400 events at 25 ms each: about 10 s to publish.
    let h = slow_receiver();
    let url = group_pipelines("grp_lost", &h, &[400], 4);
    publish(&url, 0, 400);
    let r = Relay::spawn(relay(&url).args(["--pipeline", "g0"]));
    wait_until(30, "the batch under way", || h.accepted().len() >= 20);
    // Another consumer takes the lease over (as after an expiry).
    let mut c = Pg::shared().client(&url);
    let stolen = c
        .execute(
            "UPDATE pgtrickle.pgt_consumer_leases SET consumer_id = 'thief' WHERE NOT done",
            &[],
        )
        .unwrap();
    assert_eq!(stolen, 1);
    r.wait_log("lost its lease", 20);
    let sent_when_stopped = deliveries(&h).len();
    assert!(
        sent_when_stopped < 400,
        "the holder published the whole batch after losing its lease"
    );
    // The thief never commits: its lease expires and the relay takes the
    // batch again, this time to the end.
    wait_until(60, "the watermark past the last event", || {
        watermark(&mut c) == 400
    });
    let d = deliveries(&h);
    assert_eq!(d.len(), 400, "every event delivered");
    assert!(d.values().all(|&n| n <= 2));
    drop(r);
}
