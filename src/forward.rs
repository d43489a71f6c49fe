//! The forward loop: outbox → sink.
//!
//! Read a batch after the committed position, decode it into events,
//! publish them and wait for the sink's acknowledgement, make them durable,
//! and only then commit the position. Claim-check deltas are streamed from
//! a server-side cursor in bounded chunks. When nothing is left the loop
//! blocks on `pgtrickle_outbox_new` until its outbox is notified or the poll
//! interval passes.
//!
//! Two ways to keep the position: by default the pipeline owns its offset
//! in `relay_consumer_offsets` and one relay instance runs it (advisory
//! lock). When `source.group` names a consumer group made with
//! `create_consumer_group`, every instance runs it and the group hands out
//! leased batches (`poll_outbox`/`commit_offset`) instead.

use std::time::{Duration, Instant};

use postgres::{Client, Statement, Transaction};

use crate::config::Forward;
use crate::event::Event;
use crate::health::{self, State};
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
/// Lease length asked of `poll_outbox` in consumer-group mode.
const LEASE_SECONDS: i32 = 60;
/// How often a lease is extended while a long delta is streamed, and how
/// often the consumer heartbeats.
const LEASE_REFRESH: Duration = Duration::from_secs(15);

/// Run the pipeline on one connection until stopped, drained (`--once`) or
/// an error ends the session.
pub fn session(ctx: &Ctx, cfg: &Forward) -> Result<(), Error> {
    let mut client = ctx.connect()?;
    let info = OutboxInfo::resolve(&mut client, &cfg.outbox)?;
    let group = consumer_group(&mut client, cfg, &info)?;
    if group.is_none() && !ctx.lock(&mut client)? {
        return Ok(());
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
    };
    health::set(&ctx.name, ctx.direction, State::Running);
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
}

impl Output<'_> {
    fn publish(&mut self) -> Result<(), Error> {
        if !self.events.is_empty() {
            let rejected = self.sink.publish(&self.events)?;
            let m = metrics::get();
            m.published
                .with_label_values(&[self.pipeline])
                .inc_by((self.events.len() - rejected.len()) as u64);
            m.dead_letters
                .with_label_values(&[self.pipeline])
                .inc_by(rejected.len() as u64);
            for r in rejected {
                let e = &self.events[r.index];
                log::warn!(
                    dedup_key = e.dedup_key.as_str(), reason = r.reason.as_str();
                    "dead-lettered event {}: {} (see pgtrickle.relay_dead_letters)",
                    e.dedup_key,
                    r.reason
                );
                let envelope = serde_json::to_string(e).unwrap_or_else(|_| "null".into());
                self.dead.push((e.dedup_key.clone(), envelope, r.reason));
            }
            self.events.clear();
        }
        Ok(())
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

    /// Decode one row; a claim-check is streamed from `tx` chunk by chunk,
    /// calling `tick` between chunks.
    fn row(
        &mut self,
        tx: &mut Transaction,
        row: &Row,
        tick: &mut dyn FnMut() -> Result<(), Error>,
    ) -> Result<(), Error> {
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
                tick()?;
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
    let commit = |client: &mut Client,
                  out: &mut Output,
                  pending: &mut Option<Position>,
                  batch_start: &mut Option<Instant>| {
        match pending.take() {
            Some(p) => {
                out.finish()?;
                let mut tx = client.transaction()?;
                out.write_dead_letters(&mut tx)?;
                p.commit(&mut tx, &ctx.relay_group, &ctx.name, &ctx.worker_id)?;
                tx.commit()?;
                out.report_claim_checks(client, info)?;
                if let Some(t) = batch_start.take() {
                    batch_seconds.observe(t.elapsed().as_secs_f64());
                }
                health::ok(&ctx.name, info.lag_seconds(client, &p)?);
                Ok(())
            }
            None => Ok(()),
        }
    };
    let mut held_wait = Duration::from_millis(5);
    let mut held_since: Option<Instant> = None;
    let mut held_warned = Instant::now() - Duration::from_secs(3600);
    loop {
        if ctx.stopping() {
            return commit(client, out, &mut pending, &mut batch_start);
        }
        let mut last = None;
        batch_start.get_or_insert_with(Instant::now);
        let read = read_batch(client, &read, &pos, cfg.batch_size, out, &mut last);
        if let Some(last) = last {
            out.publish()?;
            pos = last.clone();
            pending = Some(last);
            held_wait = Duration::from_millis(5);
            held_since = None;
            // Deliver and commit what came before a failing row, too.
            if read.is_err() || last_commit.elapsed() >= COMMIT_EVERY {
                commit(client, out, &mut pending, &mut batch_start)?;
                last_commit = Instant::now();
            }
            read?;
            continue;
        }
        read?;
        commit(client, out, &mut pending, &mut batch_start)?;
        batch_start = None;
        // Nothing below the horizon. Committed rows above it wait for an
        // older transaction to end: look again soon rather than at the
        // next notification.
        if info.held_back(client, &pos)? {
            let since = *held_since.get_or_insert_with(Instant::now);
            report_horizon(client, &ctx.name, since.elapsed())?;
            health::ok(&ctx.name, info.lag_seconds(client, &pos)?);
            if held_warned.elapsed() > Duration::from_secs(30)
                && since.elapsed() > Duration::from_secs(5)
            {
                log::warn!(
                    held_seconds = since.elapsed().as_secs();
                    "committed rows of {} wait for an older open transaction to end \
                     (pgtrickle_relay_horizon_oldest_xact_pid names it in pg_stat_activity)",
                    info.table
                );
                held_warned = Instant::now();
            }
            if !ctx.sleep(held_wait) {
                return Ok(());
            }
            held_wait = (held_wait * 2).min(Duration::from_millis(200));
            continue;
        }
        if held_since.take().is_some() {
            report_horizon(client, &ctx.name, Duration::ZERO)?;
        }
        health::ok(&ctx.name, 0.0);
        if ctx.once {
            return Ok(());
        }
        wait_notification(ctx, client, &info.table, ctx.poll_interval)?;
    }
}

/// Export how long the horizon has held rows back and, when it does, which
/// open transaction is the oldest (its pid, for `pg_stat_activity`).
fn report_horizon(client: &mut Client, pipeline: &str, held: Duration) -> Result<(), Error> {
    let m = metrics::get();
    m.horizon_held
        .with_label_values(&[pipeline])
        .set(held.as_secs_f64());
    let (pid, age) = if held.is_zero() {
        (0, 0.0)
    } else {
        client
            .query_opt(
                "SELECT pid, coalesce(extract(epoch FROM now() - xact_start), 0)::float8 \
                 FROM pg_stat_activity WHERE backend_xid IS NOT NULL \
                 ORDER BY age(backend_xid) DESC LIMIT 1",
                &[],
            )?
            .map(|r| (r.get::<_, i32>(0) as i64, r.get::<_, f64>(1)))
            .unwrap_or((0, 0.0))
    };
    m.horizon_pid.with_label_values(&[pipeline]).set(pid);
    m.horizon_xact_age.with_label_values(&[pipeline]).set(age);
    Ok(())
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
            out.row(&mut tx, &row, &mut || Ok(()))?;
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
    // Heartbeats and lease extensions go over a second connection so the
    // read transaction stays read-only (and never holds the horizon back).
    let mut control = ctx.connect()?;
    let mut last_beat = Instant::now() - LEASE_REFRESH;
    loop {
        if ctx.stopping() {
            return Ok(());
        }
        if last_beat.elapsed() >= LEASE_REFRESH {
            control.execute(
                "SELECT pgtrickle.consumer_heartbeat($1, $2)",
                &[&group, &consumer],
            )?;
            last_beat = Instant::now();
        }
        let ids: Vec<i64> = client
            .query(
                &poll,
                &[&group, &consumer, &(cfg.batch_size as i32), &LEASE_SECONDS],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let Some(&last_id) = ids.last() else {
            health::ok(&ctx.name, 0.0);
            if ctx.once {
                return Ok(());
            }
            wait_notification(ctx, client, &info.table, ctx.poll_interval)?;
            continue;
        };
        {
            let mut tx = client.transaction()?;
            let rows = tx.query(&fetch, &[&ids])?;
            let mut last_extend = Instant::now();
            let mut tick = || -> Result<(), Error> {
                if last_extend.elapsed() >= LEASE_REFRESH {
                    control.execute(
                        "SELECT pgtrickle.extend_lease($1, $2, $3)",
                        &[&group, &consumer, &LEASE_SECONDS],
                    )?;
                    last_extend = Instant::now();
                }
                Ok(())
            };
            for r in &rows {
                out.row(&mut tx, &Row::from_pg(r), &mut tick)?;
            }
            tx.commit()?;
        }
        out.finish()?;
        let mut tx = client.transaction()?;
        out.write_dead_letters(&mut tx)?;
        let kept: bool = tx
            .query_one(
                "SELECT pgtrickle.commit_offset($1, $2, $3)",
                &[&group, &consumer, &last_id],
            )?
            .get(0);
        tx.commit()?;
        health::ok(&ctx.name, 0.0);
        if !kept {
            log::warn!(
                "consumer group {group:?}: the lease on the batch ending at outbox id {last_id} \
                 had expired and passed to another consumer; its events may be delivered twice \
                 (same dedup keys)"
            );
        }
        out.report_claim_checks(client, info)?;
    }
}
