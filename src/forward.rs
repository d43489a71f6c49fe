//! The forward loop: outbox → sink.
//!
//! Read a batch after the committed position, decode it into events,
//! publish them and wait for the sink's acknowledgement, make them durable,
//! and only then commit the position. Claim-check deltas are streamed from
//! a server-side cursor in bounded chunks. When nothing is left the loop
//! blocks on `pgtrickle_outbox_new` until its outbox is notified or the poll
//! interval passes (an outbox made without NOTIFY is polled every 100 ms).
//!
//! Two ways to keep the position: by default the pipeline owns its offset
//! in `relay_consumer_offsets` and one relay instance runs it (advisory
//! lock). When `source.group` names a consumer group made with
//! `create_consumer_group`, every instance runs it and the group hands out
//! leased batches (`poll_outbox`/`commit_offset`) instead; a thread of the
//! pipeline's own keeps the lease of the batch out alive.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fallible_iterator::FallibleIterator;
use postgres::{Client, Statement, Transaction};

use crate::config::Forward;
use crate::event::Event;
use crate::health;
use crate::metrics;
use crate::outbox::{rows_consumed, Decoder, OutboxInfo, Position, Row};
use crate::pipeline::{wait_notification, Ctx};
use crate::retry::Error;
use crate::sink::Sink;

/// How often delivered events are made durable and their offset committed
/// while a backlog is being worked off (at once when caught up).
const COMMIT_EVERY: Duration = Duration::from_millis(250);
/// Rows fetched per round trip from a cursor.
const FETCH_ROWS: i32 = 1000;
/// How often an outbox without NOTIFY is read while idle.
const UNNOTIFIED_POLL: Duration = Duration::from_millis(100);

/// Run the pipeline on one connection until stopped, drained (`--once`) or
/// an error ends the session.
pub fn session(ctx: &Ctx, cfg: &Forward) -> Result<(), Error> {
    let mut client = ctx.connect()?;
    let info = OutboxInfo::resolve(&mut client, &cfg.outbox)?;
    let group = consumer_group(&mut client, cfg, &info)?;
    if group.is_none() {
        if !ctx.lock(&mut client)? {
            return Ok(());
        }
        Position::check(&mut client, ctx, &info.table)?;
    }
    client.batch_execute("LISTEN pgtrickle_outbox_new")?;
    let mut sink = cfg.sink.open(&ctx.name)?;
    let decoder = Decoder {
        info: &info,
        subject: &cfg.subject,
        pipeline: &ctx.name,
    };
    let mut out = Output {
        sink: sink.as_mut(),
        events: Vec::with_capacity(cfg.batch_size.min(100_000)),
        batch_size: cfg.batch_size,
        decoder: &decoder,
        delta: match &info.delta_table {
            Some(_) => Some(client.prepare(&info.delta_sql()?)?),
            None => None,
        },
        claim_checks: Vec::new(),
        dead: Vec::new(),
        pipeline: &ctx.name,
        lost: None,
        slice: cfg.batch_size.min(64),
    };
    health::started(&ctx.name, ctx.direction);
    match group {
        Some(g) => {
            log::info!(
                "forwarding outbox {} in consumer group {g:?} as consumer {:?}",
                info.table,
                ctx.worker_id
            );
            group_loop(ctx, cfg, &info, &g, &mut client, &mut out)
        }
        None => {
            // Said on every session: a misspelt group name shows here.
            let group_note = match &cfg.group {
                Some(g) => format!(
                    "; source.group {g:?} is not a consumer group, so this instance owns the \
                     pipeline and keeps its own offset"
                ),
                None => String::new(),
            };
            log::info!(
                "forwarding outbox {} ({} order{group_note})",
                info.table,
                if info.has_txid {
                    "commit-horizon"
                } else {
                    "id"
                }
            );
            offset_loop(ctx, cfg, &info, &mut client, &mut out)
        }
    }
}

/// How long to wait for a notification when caught up.
fn idle_wait(ctx: &Ctx, info: &OutboxInfo) -> Duration {
    if info.notifies {
        ctx.poll_interval
    } else {
        ctx.poll_interval.min(UNNOTIFIED_POLL)
    }
}

/// Discard the notifications received while working: a backlog is read
/// on anyway, and they would otherwise pile up in memory (one per writing
/// transaction). Only ever called right before the outbox is read again.
fn drain_notifications(client: &mut Client) -> Result<(), Error> {
    while client.notifications().iter().next()?.is_some() {}
    Ok(())
}

/// The consumer group named by the config, if one exists for this outbox.
fn consumer_group(
    client: &mut Client,
    cfg: &Forward,
    info: &OutboxInfo,
) -> Result<Option<String>, Error> {
    let Some(g) = &cfg.group else {
        return Ok(None);
    };
    let row = client.query_opt(
        "SELECT outbox_name FROM pgtrickle.pgt_consumer_groups WHERE group_name = $1",
        &[g],
    )?;
    match row {
        None => Ok(None),
        Some(r) => {
            let outbox: String = r.get(0);
            if *outbox != *info.stream_table && outbox != info.table {
                return Err(Error::permanent(format!(
                    "consumer group {g:?} belongs to outbox {outbox:?}, not {:?}",
                    cfg.outbox
                )));
            }
            Ok(Some(g.clone()))
        }
    }
}

/// Decoded events on their way to the sink.
struct Output<'a> {
    sink: &'a mut dyn Sink,
    events: Vec<Event>,
    batch_size: usize,
    decoder: &'a Decoder<'a>,
    delta: Option<Statement>,
    /// Claim-check rows fully published, to report once committed.
    claim_checks: Vec<i64>,
    /// Events the sink rejected for good: (dedup key, envelope, reason),
    /// written with the next offset commit.
    dead: Vec<(String, String, String)>,
    /// The pipeline, for the dead-letter table.
    pipeline: &'a str,
    /// Consumer-group mode: set when this instance lost the lease of the
    /// batch out. Events then go to the sink in slices of about a second,
    /// and none once it is set.
    lost: Option<Arc<AtomicBool>>,
    /// The current slice size (consumer-group mode).
    slice: usize,
}

impl Output<'_> {
    fn publish(&mut self) -> Result<(), Error> {
        if self.events.is_empty() {
            return Ok(());
        }
        let Some(lost) = self.lost.clone() else {
            self.send(0, self.events.len())?;
            self.events.clear();
            return Ok(());
        };
        let mut start = 0;
        while start < self.events.len() {
            if lost.load(Ordering::Relaxed) {
                self.events.clear();
                return Err(Error::transient(format!(
                    "pipeline {:?}: lost the lease of its batch",
                    self.pipeline
                )));
            }
            let end = (start + self.slice).min(self.events.len());
            let began = Instant::now();
            self.send(start, end)?;
            // About a second per slice: a holder that lost its lease stops
            // within about a second, a fast sink still gets whole batches.
            let took = began.elapsed();
            if took < Duration::from_millis(250) {
                self.slice = (self.slice * 2).min(self.batch_size);
            } else if took > Duration::from_secs(1) {
                self.slice = (self.slice / 2).max(1);
            }
            start = end;
        }
        self.events.clear();
        Ok(())
    }

    /// Publish `events[start..end]`; collect what the sink rejects for good.
    fn send(&mut self, start: usize, end: usize) -> Result<(), Error> {
        let events = &self.events[start..end];
        let rejected = self.sink.publish(events)?;
        let m = metrics::get();
        m.published
            .with_label_values(&[self.pipeline])
            .inc_by((events.len() - rejected.len()) as u64);
        m.dead_letters
            .with_label_values(&[self.pipeline])
            .inc_by(rejected.len() as u64);
        for r in rejected {
            let e = &events[r.index];
            log::warn!(
                dedup_key = e.dedup_key.as_str(), reason = r.reason.as_str();
                "dead-lettered event {}: {} (see pgtrickle.relay_dead_letters)",
                e.dedup_key,
                r.reason
            );
            let envelope = serde_json::to_string(e).unwrap_or_else(|_| "null".into());
            self.dead.push((e.dedup_key.clone(), envelope, r.reason));
        }
        Ok(())
    }

    /// Forget a batch that will not be committed (it is read again).
    fn discard(&mut self) {
        self.events.clear();
        self.dead.clear();
        self.claim_checks.clear();
    }

    /// Record the dead letters collected since the last commit, in the
    /// transaction that commits the offset.
    fn write_dead_letters(&mut self, tx: &mut Transaction) -> Result<(), Error> {
        if self.dead.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = self.dead.iter().map(|d| d.0.as_str()).collect();
        let payloads: Vec<&str> = self.dead.iter().map(|d| d.1.as_str()).collect();
        let errors: Vec<&str> = self.dead.iter().map(|d| d.2.as_str()).collect();
        tx.execute(
            "SELECT pgtrickle.relay_dead_letter($1, $2, $3, $4)",
            &[&self.pipeline, &keys, &payloads, &errors],
        )?;
        self.dead.clear();
        Ok(())
    }

    /// Decode one row; a claim-check is streamed from `tx` chunk by chunk.
    fn row(&mut self, tx: &mut Transaction, row: &Row) -> Result<(), Error> {
        let before = self.events.len();
        let decoded = self.decoder.decode(row, &mut self.events);
        if decoded.is_err() {
            // No part of a row that fails to decode goes out.
            self.events.truncate(before);
        }
        if let Some(cc) = decoded? {
            self.publish()?;
            let stmt = self.delta.as_ref().ok_or_else(|| {
                Error::permanent(format!(
                    "outbox {} id {}: claim-check row but no delta-rows table",
                    self.decoder.info.table, row.id
                ))
            })?;
            let portal = tx.bind(stmt, &[&row.id])?;
            let chunk = self.batch_size.clamp(1, 10_000) as i32;
            loop {
                let rows = tx.query_portal(&portal, chunk)?;
                if rows.is_empty() {
                    break;
                }
                for d in &rows {
                    self.events.push(self.decoder.delta_event(row, &cc, d)?);
                }
                self.publish()?;
            }
            self.claim_checks.push(row.id);
        } else if self.events.len() >= self.batch_size {
            self.publish()?;
        }
        Ok(())
    }

    /// Everything published is durable: flush the sink.
    fn finish(&mut self) -> Result<(), Error> {
        self.publish()?;
        self.sink.flush()
    }

    /// Report delivered claim-checks (after the position is committed).
    fn report_claim_checks(&mut self, client: &mut Client, info: &OutboxInfo) -> Result<(), Error> {
        for id in self.claim_checks.drain(..) {
            rows_consumed(client, info, id)?;
        }
        Ok(())
    }
}

/// Default mode: this pipeline's own offset in `relay_consumer_offsets`.
fn offset_loop(
    ctx: &Ctx,
    cfg: &Forward,
    info: &OutboxInfo,
    client: &mut Client,
    out: &mut Output,
) -> Result<(), Error> {
    let read = client.prepare(&info.read_sql())?;
    let mut pos = Position::load(client, &ctx.relay_group, &ctx.name)?;
    // Delivered but not yet committed: committed every COMMIT_EVERY, when
    // caught up, and before stopping.
    let mut pending: Option<Position> = None;
    let mut last_commit = Instant::now();
    let batch_seconds = metrics::get().batch.with_label_values(&[&ctx.name]);
    let mut batch_start: Option<Instant> = None;
    // Ok(false): the catalog no longer has this pipeline as it runs
    // (deleted or changed meanwhile): nothing was committed.
    let commit = |client: &mut Client,
                  out: &mut Output,
                  pending: &mut Option<Position>,
                  batch_start: &mut Option<Instant>|
     -> Result<bool, Error> {
        let Some(p) = pending.take() else {
            return Ok(true);
        };
        out.finish()?;
        let mut tx = client.transaction()?;
        out.write_dead_letters(&mut tx)?;
        if !p.commit(&mut tx, ctx, &info.table)? {
            log::info!(
                "the pipeline was deleted or changed in the relay catalog: its position is not \
                 committed, and this session ends"
            );
            return Ok(false);
        }
        tx.commit()?;
        out.report_claim_checks(client, info)?;
        if let Some(t) = batch_start.take() {
            batch_seconds.observe(t.elapsed().as_secs_f64());
        }
        health::ok(&ctx.name, info.lag_seconds(client, &p)?);
        Ok(true)
    };
    let mut held = Held::new();
    loop {
        if ctx.stopping() {
            return commit(client, out, &mut pending, &mut batch_start).map(|_| ());
        }
        let mut last = None;
        batch_start.get_or_insert_with(Instant::now);
        let read = read_batch(client, &read, &pos, cfg.batch_size, out, &mut last);
        if let Some(last) = last {
            out.publish()?;
            drain_notifications(client)?;
            pos = last.clone();
            pending = Some(last);
            held.wait = Duration::from_millis(5);
            held.clear(&ctx.name);
            // Deliver and commit what came before a failing row, too.
            if read.is_err() || last_commit.elapsed() >= COMMIT_EVERY {
                if !commit(client, out, &mut pending, &mut batch_start)? {
                    return Ok(());
                }
                last_commit = Instant::now();
            }
            read?;
            continue;
        }
        read?;
        if !commit(client, out, &mut pending, &mut batch_start)? {
            return Ok(());
        }
        batch_start = None;
        // Nothing below the horizon. Committed rows above it wait for an
        // older transaction to end: look again soon rather than at the
        // next notification.
        if info.held_back(client, &pos)? {
            held.report(client, &ctx.name, &info.table)?;
            health::ok(&ctx.name, info.lag_seconds(client, &pos)?);
            if !ctx.sleep(held.wait) {
                return Ok(());
            }
            held.wait = (held.wait * 2).min(Duration::from_millis(200));
            continue;
        }
        held.clear(&ctx.name);
        health::ok(&ctx.name, 0.0);
        if ctx.once {
            return Ok(());
        }
        wait_notification(ctx, client, &info.table, idle_wait(ctx, info))?;
    }
}

/// Committed rows held back by an older open transaction: since when, and
/// the metrics and warning that name that transaction.
struct Held {
    /// Since when rows have been held back (None: they are not).
    since: Option<Instant>,
    /// When the warning was last logged.
    warned: Option<Instant>,
    /// The prepared transaction exported as the holder, if one is.
    gid: Option<String>,
    /// How long to wait before looking again.
    wait: Duration,
}

impl Held {
    fn new() -> Held {
        Held {
            since: None,
            warned: None,
            gid: None,
            wait: Duration::from_millis(5),
        }
    }

    /// Rows are held back: export how long and which transaction holds
    /// them (a session's pid for `pg_stat_activity`, or a prepared
    /// transaction's gid for `pg_prepared_xacts`); warn after 5 s, every 30 s.
    fn report(&mut self, client: &mut Client, pipeline: &str, table: &str) -> Result<(), Error> {
        let since = *self.since.get_or_insert_with(Instant::now);
        let holder = client.query_opt(
            "SELECT pid, gid, age_s FROM ( \
               SELECT pid, NULL::text AS gid, age(backend_xid) AS xid_age, \
                      coalesce(extract(epoch FROM now() - xact_start), 0)::float8 AS age_s \
                 FROM pg_catalog.pg_stat_activity WHERE backend_xid IS NOT NULL \
               UNION ALL \
               SELECT 0, gid, age(transaction), \
                      extract(epoch FROM now() - prepared)::float8 \
                 FROM pg_catalog.pg_prepared_xacts) h \
             ORDER BY xid_age DESC LIMIT 1",
            &[],
        )?;
        let (pid, gid, age) = match &holder {
            Some(r) => (r.get::<_, i32>(0), r.get::<_, Option<String>>(1), r.get(2)),
            None => (0, None, 0.0),
        };
        let m = metrics::get();
        m.horizon_held
            .with_label_values(&[pipeline])
            .set(since.elapsed().as_secs_f64());
        m.horizon_pid.with_label_values(&[pipeline]).set(pid.into());
        m.horizon_xact_age.with_label_values(&[pipeline]).set(age);
        m.forget_prepared(pipeline, gid.as_deref());
        if let Some(g) = &gid {
            m.horizon_prepared.with_label_values(&[pipeline, g]).set(1);
        }
        self.gid = gid;
        let due = self
            .warned
            .is_none_or(|w| w.elapsed() > Duration::from_secs(30));
        if due && since.elapsed() > Duration::from_secs(5) {
            let who = match (&self.gid, pid) {
                (Some(g), _) => format!(
                    "prepared transaction '{g}' (pg_prepared_xacts: COMMIT PREPARED or ROLLBACK \
                     PREPARED ends it)"
                ),
                (None, 0) => "an older open transaction (pgtrickle_relay_horizon_oldest_xact_pid \
                              names it in pg_stat_activity when the relay's role may see it)"
                    .to_string(),
                (None, pid) => format!("the open transaction of pid {pid} (see pg_stat_activity)"),
            };
            log::warn!(
                held_seconds = since.elapsed().as_secs();
                "committed rows of {table} wait for {who} to end"
            );
            self.warned = Some(Instant::now());
        }
        Ok(())
    }

    /// Nothing is held back (any more).
    fn clear(&mut self, pipeline: &str) {
        if self.since.take().is_some() {
            let m = metrics::get();
            m.horizon_held.with_label_values(&[pipeline]).set(0.0);
            m.horizon_pid.with_label_values(&[pipeline]).set(0);
            m.horizon_xact_age.with_label_values(&[pipeline]).set(0.0);
            m.forget_prepared(pipeline, None);
            self.gid = None;
        }
    }
}

/// Read and decode the rows after `pos` in one read-only transaction;
/// `last` is the position of the last row fully handed to `out`.
fn read_batch(
    client: &mut Client,
    read: &Statement,
    pos: &Position,
    batch_size: usize,
    out: &mut Output,
    last: &mut Option<Position>,
) -> Result<(), Error> {
    let mut tx = client.transaction()?;
    let portal = tx.bind(read, &[&pos.txid_or_zero(), &pos.id, &(batch_size as i64)])?;
    loop {
        let rows = tx.query_portal(&portal, FETCH_ROWS)?;
        if rows.is_empty() {
            break;
        }
        for r in &rows {
            let row = Row::from_pg(r);
            out.row(&mut tx, &row)?;
            *last = Some(row.position());
        }
    }
    tx.commit()?;
    Ok(())
}

/// Consumer-group mode: leased batches from `poll_outbox`.
fn group_loop(
    ctx: &Ctx,
    cfg: &Forward,
    info: &OutboxInfo,
    group: &str,
    client: &mut Client,
    out: &mut Output,
) -> Result<(), Error> {
    let consumer = ctx.worker_id.as_str();
    let lease_seconds = cfg.lease.as_secs() as i32;
    let poll = client.prepare(
        "SELECT p.outbox_id FROM pgtrickle.poll_outbox($1, $2, $3, $4) WITH ORDINALITY AS p \
         ORDER BY p.ordinality",
    )?;
    let extra_cols = if info.has_txid {
        "txid::text, refresh_id::text, is_claim_check, payload::text, headers::text"
    } else {
        "NULL::text, refresh_id::text, is_claim_check, payload::text, NULL::text"
    };
    // poll_outbox returns rows in horizon order; fetch the full rows (with
    // headers) in that same order.
    let fetch = client.prepare(&format!(
        "SELECT o.id, {extra_cols} FROM unnest($1::bigint[]) WITH ORDINALITY AS b(id, n) \
         JOIN pgtrickle.{} o ON o.id = b.id ORDER BY b.n",
        crate::outbox::quote_ident(&info.table)
    ))?;
    let keeper = LeaseKeeper::start(ctx, group, cfg.lease);
    out.lost = Some(keeper.lost.clone());
    loop {
        if ctx.stopping() {
            return Ok(());
        }
        let ids: Vec<i64> = client
            .query(
                &poll,
                &[&group, &consumer, &(cfg.batch_size as i32), &lease_seconds],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let Some(&last_id) = ids.last() else {
            health::ok(&ctx.name, 0.0);
            if ctx.once {
                return Ok(());
            }
            wait_notification(ctx, client, &info.table, idle_wait(ctx, info))?;
            continue;
        };
        drain_notifications(client)?;
        keeper.begin(last_id);
        let published = (|| {
            let mut tx = client.transaction()?;
            let rows = tx.query(&fetch, &[&ids])?;
            for r in &rows {
                out.row(&mut tx, &Row::from_pg(r))?;
            }
            tx.commit()?;
            out.finish()
        })();
        if keeper.lost.load(Ordering::Relaxed) {
            keeper.end();
            out.discard();
            log::warn!(
                "consumer group {group:?}: this instance lost its lease on the batch ending at \
                 outbox id {last_id} (another consumer took it over); stopped publishing it"
            );
            continue;
        }
        if let Err(e) = published {
            keeper.end();
            return Err(e);
        }
        let mut tx = client.transaction()?;
        out.write_dead_letters(&mut tx)?;
        let kept: bool = tx
            .query_one(
                "SELECT pgtrickle.commit_offset($1, $2, $3)",
                &[&group, &consumer, &last_id],
            )?
            .get(0);
        tx.commit()?;
        keeper.end();
        health::ok(&ctx.name, 0.0);
        if !kept {
            log::warn!(
                "consumer group {group:?}: the lease on the batch ending at outbox id {last_id} \
                 had passed to another consumer; its events may be delivered twice (same dedup \
                 keys)"
            );
        }
        out.report_claim_checks(client, info)?;
    }
}

/// What the pipeline thread tells the lease keeper.
struct Batch {
    /// Counts batches, so that an answer about an older one is ignored.
    seq: u64,
    /// The outbox id ending the batch out, if one is.
    end: Option<i64>,
    /// When it was leased.
    since: Instant,
    /// The pipeline session ended.
    stop: bool,
}

/// Keeps the lease of the batch out alive while the pipeline publishes it:
/// a thread with its own connection extends it every quarter lease (at most
/// every 5 s), and heartbeats the consumer meanwhile. When the lease passed
/// to another consumer, or could not be extended for a whole lease, it sets
/// `lost`: the pipeline stops publishing that batch.
struct LeaseKeeper {
    state: Arc<(Mutex<Batch>, Condvar)>,
    /// Set when the batch out is no longer this instance's.
    lost: Arc<AtomicBool>,
}

impl LeaseKeeper {
    fn start(ctx: &Ctx, group: &str, lease: Duration) -> LeaseKeeper {
        let state = Arc::new((
            Mutex::new(Batch {
                seq: 0,
                end: None,
                since: Instant::now(),
                stop: false,
            }),
            Condvar::new(),
        ));
        let lost = Arc::new(AtomicBool::new(false));
        let k = LeaseKeeper {
            state: state.clone(),
            lost: lost.clone(),
        };
        let (ctx, group) = (ctx.clone(), group.to_string());
        let every = (lease / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        let spawned = std::thread::Builder::new()
            .name(format!("lease {}", ctx.name))
            .spawn(move || {
                crate::logging::set_pipeline(&ctx.name);
                keep_leases(&ctx, &group, lease, every, &state, &lost)
            });
        if let Err(e) = spawned {
            // Without it, a long batch may be taken over (and sent twice).
            log::warn!("cannot start the lease keeper thread: {e}");
        }
        k
    }

    /// A batch ending at outbox id `end` was just leased.
    fn begin(&self, end: i64) {
        let mut b = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
        b.seq += 1;
        b.end = Some(end);
        b.since = Instant::now();
        self.lost.store(false, Ordering::Relaxed);
        self.state.1.notify_one();
    }

    /// The batch was committed or given up.
    fn end(&self) {
        let mut b = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
        b.end = None;
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        let mut b = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
        b.stop = true;
        self.state.1.notify_one();
    }
}

/// The lease keeper's thread (see [`LeaseKeeper`]).
fn keep_leases(
    ctx: &Ctx,
    group: &str,
    lease: Duration,
    every: Duration,
    state: &(Mutex<Batch>, Condvar),
    lost: &AtomicBool,
) {
    let consumer = ctx.worker_id.as_str();
    let seconds = lease.as_secs() as i32;
    let mut client: Option<Client> = None;
    let mut extended = Instant::now();
    loop {
        let (seq, end, since) = {
            let b = state.0.lock().unwrap_or_else(|e| e.into_inner());
            let (b, _) = state
                .1
                .wait_timeout_while(b, every, |b| !b.stop)
                .unwrap_or_else(|e| e.into_inner());
            if b.stop {
                return;
            }
            (b.seq, b.end, b.since)
        };
        // None: could not ask; Some(held): whether the batch is still ours.
        let asked = (|| -> Result<Option<bool>, Error> {
            let c = match &mut client {
                Some(c) => c,
                None => client.insert(ctx.connect()?),
            };
            c.execute(
                "SELECT pgtrickle.consumer_heartbeat($1, $2)",
                &[&group, &consumer],
            )?;
            let Some(end) = end else {
                return Ok(None);
            };
            c.execute(
                "SELECT pgtrickle.extend_lease($1, $2, $3)",
                &[&group, &consumer, &seconds],
            )?;
            Ok(Some(
                c.query_one(
                    "SELECT EXISTS (SELECT 1 FROM pgtrickle.pgt_consumer_active_leases \
                     WHERE group_name = $1 AND consumer_id = $2 AND batch_end = $3)",
                    &[&group, &consumer, &end],
                )?
                .get(0),
            ))
        })();
        let gone = match asked {
            Ok(None) => false,
            Ok(Some(held)) => {
                extended = Instant::now();
                !held
            }
            Err(e) => {
                log::debug!("lease keeper: {e}");
                client = None;
                extended.max(since).elapsed() >= lease
            }
        };
        if gone {
            let b = state.0.lock().unwrap_or_else(|e| e.into_inner());
            if b.seq == seq && b.end.is_some() {
                lost.store(true, Ordering::Relaxed);
            }
        }
    }
}
