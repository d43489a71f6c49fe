//! The forward loop: outbox → sink.
//!
//! Read a batch after the committed position and decode it into events;
//! a publisher thread of the pipeline's own ([`Delivery::spawn`]) publishes
//! them and waits for the sink's acknowledgement while the reader reads and
//! decodes the next batch (at most [`QUEUED`] more wait between them). The
//! position is committed only once every event up to it was acknowledged
//! and made durable: the reader asks the publisher to settle what it handed
//! over, reads on meanwhile, and commits once the answer is in (a commit
//! when stopping or after an error waits for it). A failed batch stops the
//! publisher (later ones are dropped); what was acknowledged before it is
//! still committed. Claim-check deltas are
//! streamed from a server-side cursor in bounded chunks. When nothing is
//! left the loop blocks on `pgtrickle_outbox_new` until its outbox is
//! notified or the poll interval passes ([`crate::wake`]: kit outboxes
//! notify only while a relay is asleep on them; one made without NOTIFY is
//! polled every 100 ms).
//!
//! Two ways to keep the position: by default the pipeline owns its offset
//! in `relay_consumer_offsets` and one relay instance runs it (advisory
//! lock; [`OffsetLoop`]). When `source.group` names a consumer group made
//! with `create_consumer_group`, every instance runs it and the group hands
//! out leased batches (`poll_outbox`/`commit_offset`) instead
//! ([`GroupLoop`]); a thread of the pipeline's own keeps the lease of the
//! batch out alive ([`LeaseKeeper`]). Consumer groups publish on the
//! pipeline thread, one leased batch at a time, with the same
//! [`Publisher`].
//!
//! [`replay`] (`pgtrickle-relay replay`) re-publishes a range of the outbox
//! with the same reading and publishing code (publishing on the reading
//! thread), moving no position.
//!
//! The rules are in plain structs that unit tests drive without a server:
//! [`Delivery`] (rows into events, handed to the publisher), [`Publisher`]
//! (publishing, dead letters, what was acknowledged), [`Commits`]
//! (how far and when the offset moves) and [`Held`] (rows held back by the
//! commit horizon). The SQL stays at the edges: the two loops, [`Reader`]
//! and [`write_dead_letters`].

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::Scope;
use std::time::{Duration, Instant, SystemTime};

use fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, Statement, Transaction};
use prometheus::Histogram;

use crate::config::Forward;
use crate::error::Error;
use crate::event::{Event, Template, Vars};
use crate::health;
use crate::listen::{self, Listener};
use crate::metrics;
use crate::outbox::{rows_consumed, ClaimCheck, Decoder, OutboxInfo, Position, ReadLimit, Row};
use crate::pipeline::Ctx;
use crate::sink::Sink;
use crate::wake::Waker;

/// How often, at most, delivered events are made durable and their offset
/// committed: while a backlog is worked off and while single events arrive
/// (at once when stopping). A commit per wake-up would hold up the next read.
const COMMIT_EVERY: Duration = Duration::from_millis(250);
/// While a read finds rows but not a full batch, the next starts no sooner
/// than this much after it: a relay following busy writers reads their
/// events several at a time, not one query per commit (each read costs the
/// server and the relay alike, mostly in waking threads), for at most this
/// much more latency.
const READ_PACE: Duration = Duration::from_millis(1);
/// The pace once a read finds [`BUSY_ROWS`] rows or more (thousands of
/// commits a second). Not proportional to the rows found: that would feed
/// on itself (a longer wait finds more rows) and hold a trickle of 1,000
/// events/s 4 ms instead of 1.
const BUSY_PACE: Duration = Duration::from_millis(4);
/// See [`BUSY_PACE`]; at the busy pace, a read finds this many once the
/// rate falls below a quarter of what set it: back to [`READ_PACE`].
const BUSY_ROWS: u64 = 8;

/// How long after the start of a read that found `rows` (not a full
/// batch) the next may start.
fn read_pace(rows: u64) -> Duration {
    match rows >= BUSY_ROWS {
        true => BUSY_PACE,
        false => READ_PACE,
    }
}

/// Rows held back by the horizon: the shortest and the longest wait before
/// looking again (in between, a quarter of the time they have been held).
const HELD_WAIT: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(200));
/// Rows held back: the holder is looked up (`pg_stat_activity`, a costly
/// query) once they have been held this long, and then at most this often.
const HOLDER_LOOKUP: Duration = Duration::from_millis(250);

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
    let listener = listen::shared(&ctx.postgres_url)?;
    let reader = Reader {
        decoder: Decoder {
            info: &info,
            subject: &cfg.subject,
            pipeline: &ctx.name,
        },
        delta: match &info.delta_table {
            Some(_) => Some(client.prepare(&info.delta_sql()?)?),
            None => None,
        },
        limit: Cell::default(),
    };
    match group {
        Some(g) => {
            let mut sink = cfg.sink.open(&ctx.name)?;
            let publisher = Publisher::new(sink.as_mut(), &ctx.name).routing(&cfg.subject);
            health::started(&ctx.name, ctx.direction.as_str());
            log::info!(
                "forwarding outbox {} in consumer group {g:?} as consumer {:?}",
                info.table,
                ctx.worker_id
            );
            let mut group_loop =
                GroupLoop::new(ctx, cfg, &g, &mut client, reader, publisher, listener)?;
            group_loop.run()
        }
        None => std::thread::scope(|s| {
            let open = || cfg.sink.open(&ctx.name);
            let out = Delivery::spawn(s, open, &ctx.name, &cfg.subject, cfg.batch_size)?;
            health::started(&ctx.name, ctx.direction.as_str());
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
            let mut offset_loop = OffsetLoop::new(ctx, &mut client, reader, out, listener)?;
            offset_loop.run()
        }),
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

/// An event the sink refused for good, as it goes into
/// `pgtrickle.relay_dead_letters` (see [`write_dead_letters`]).
#[derive(Debug, Clone, PartialEq)]
struct DeadLetter {
    /// The event's dedup key.
    dedup_key: String,
    /// The event envelope as JSON, as the stdout sink would write it.
    envelope: String,
    /// Why, as the sink said it.
    reason: String,
}

/// Consumer-group mode: events go to the sink in slices of about a second,
/// and none once this instance lost the lease of the batch out.
struct Lease {
    /// Set by the [`LeaseKeeper`] when the batch out is no longer ours.
    lost: Arc<AtomicBool>,
    /// The current slice size.
    slice: usize,
    /// The largest slice: the batch size.
    max: usize,
}

/// What the sink acknowledged and made durable: the position it completes,
/// and what its delivery owes the commit that moves past it.
#[derive(Default)]
struct Acked {
    /// The last row whose events, and every event before them, the sink
    /// acknowledged.
    position: Option<Position>,
    /// Claim-check rows published whole, to report once committed.
    claim_checks: Vec<i64>,
    /// Events the sink rejected for good, written with the commit.
    dead: Vec<DeadLetter>,
    /// Events the sink took (acknowledged, not rejected), for replay's report.
    sent: u64,
}

impl Acked {
    /// Add `later`, acknowledged after these.
    fn merge(&mut self, later: Acked) {
        if later.position.is_some() {
            self.position = later.position;
        }
        self.claim_checks.extend(later.claim_checks);
        self.dead.extend(later.dead);
        self.sent += later.sent;
    }
}

/// A batch handed to the publisher: its events, and what they complete once
/// the sink acknowledged them.
struct Handed {
    /// Its events, in order.
    events: Vec<Event>,
    /// The last row all of whose events are in this batch or an earlier
    /// one (None: a claim-check delta chunk that completes no row).
    done: Option<Position>,
    /// Claim-check rows whose last events are in this batch.
    claim_checks: Vec<i64>,
}

/// The publishing side: it owns the sink, publishes the batches handed to
/// it in order, and after a failed one publishes nothing more.
struct Publisher<'a> {
    /// The sink, opened on the publisher's thread.
    sink: &'a mut dyn Sink,
    /// The pipeline, for metrics and the log.
    pipeline: &'a str,
    /// The pipeline's subject template, when it routes by content (an
    /// event it cannot route is a dead letter).
    subject: Option<&'a Template>,
    /// Consumer-group mode: the lease of the batch out.
    lease: Option<Lease>,
    /// Acknowledged since the last [`Publisher::settle`].
    acked: Acked,
    /// The failure that stopped publishing.
    failed: Option<Error>,
}

impl<'a> Publisher<'a> {
    /// Publishing to `sink` for `pipeline`.
    fn new(sink: &'a mut dyn Sink, pipeline: &'a str) -> Publisher<'a> {
        Publisher {
            sink,
            pipeline,
            subject: None,
            lease: None,
            acked: Acked::default(),
            failed: None,
        }
    }

    /// Events the `subject` template cannot route (it reads a field they
    /// lack) become dead letters instead of being published.
    fn routing(mut self, subject: &'a Template) -> Publisher<'a> {
        self.subject = Some(subject).filter(|t| t.has_fields());
        self
    }

    /// Publish batches of up to `batch_size` events in slices, and stop
    /// publishing once `lost` is set.
    fn lease(&mut self, lost: Arc<AtomicBool>, batch_size: usize) {
        self.lease = Some(Lease {
            lost,
            slice: batch_size.min(64),
            max: batch_size,
        });
    }

    /// Why no template can route `e` (the subject's or the sink's own).
    fn unroutable(&self, e: &Event) -> Option<String> {
        self.subject
            .and_then(|t| t.missing(&Vars::of(e)))
            .or_else(|| self.sink.unroutable(e))
    }

    /// Publish batch `h` (unless an earlier one failed) and return its
    /// emptied Vec. Its dead letters count only once it all went out.
    fn take(&mut self, mut h: Handed) -> Vec<Event> {
        if self.failed.is_none() {
            let dead = self.acked.dead.len();
            match self.publish(&h.events) {
                Ok(()) => {
                    self.acked.position = h.done.or(self.acked.position.take());
                    self.acked.claim_checks.append(&mut h.claim_checks);
                    let new = &self.acked.dead[dead..];
                    metrics::get()
                        .dead_letters
                        .with_label_values(&[self.pipeline])
                        .inc_by(new.len() as u64);
                    for d in new {
                        log::warn!(
                            dedup_key = d.dedup_key.as_str(), reason = d.reason.as_str();
                            "dead-lettered event {}: {} (see pgtrickle.relay_dead_letters)",
                            d.dedup_key,
                            d.reason
                        );
                    }
                }
                Err(e) => {
                    self.acked.dead.truncate(dead);
                    self.failed = Some(e);
                }
            }
        }
        h.events.clear();
        h.events
    }

    /// Make what was acknowledged durable (`Sink::flush`) and hand it over;
    /// the error of a failed batch or of the flush, if one failed.
    fn settle(&mut self) -> (Acked, Option<Error>) {
        match self.sink.flush() {
            Ok(()) => (
                std::mem::take(&mut self.acked),
                self.failed
                    .as_ref()
                    .map(|e| Error::new(e.class, e.msg.clone())),
            ),
            Err(e) => (Acked::default(), Some(e)),
        }
    }

    /// Publish `events`, in slices when leased.
    fn publish(&mut self, events: &[Event]) -> Result<(), Error> {
        let Some(lease) = &self.lease else {
            return self.send(events);
        };
        let (lost, mut slice, max) = (lease.lost.clone(), lease.slice, lease.max);
        let mut start = 0;
        while start < events.len() {
            if lost.load(Ordering::Relaxed) {
                return Err(Error::transient(format!(
                    "pipeline {:?}: lost the lease of its batch",
                    self.pipeline
                )));
            }
            let end = (start + slice).min(events.len());
            let began = Instant::now();
            self.send(&events[start..end])?;
            // About a second per slice: a holder that lost its lease stops
            // within about a second, a fast sink still gets whole batches.
            let took = began.elapsed();
            if took < Duration::from_millis(250) {
                slice = (slice * 2).min(max);
            } else if took > Duration::from_secs(1) {
                slice = (slice / 2).max(1);
            }
            if let Some(l) = &mut self.lease {
                l.slice = slice;
            }
            start = end;
        }
        Ok(())
    }

    /// Publish `events`; what no template can route, and what the sink
    /// rejects for good, becomes a dead letter.
    fn send(&mut self, events: &[Event]) -> Result<(), Error> {
        let mut run = 0;
        for (i, e) in events.iter().enumerate() {
            if let Some(why) = self.unroutable(e) {
                self.publish_run(&events[run..i])?;
                self.dead_letter(e, why);
                run = i + 1;
            }
        }
        self.publish_run(&events[run..])
    }

    /// Dead-letter `e` for `reason` (counted and logged once its batch went
    /// out: a failed batch is read again, and its dead letters made again).
    fn dead_letter(&mut self, e: &Event, reason: String) {
        self.acked.dead.push(DeadLetter {
            dedup_key: e.dedup_key.clone(),
            envelope: serde_json::to_string(e).unwrap_or_else(|_| "null".into()),
            reason,
        });
    }

    /// Publish `events` (all routable); what the sink rejects for good
    /// becomes a dead letter.
    fn publish_run(&mut self, events: &[Event]) -> Result<(), Error> {
        if events.is_empty() {
            return Ok(());
        }
        let rejected = self.sink.publish(events)?;
        let took = (events.len() - rejected.len()) as u64;
        self.acked.sent += took;
        metrics::get()
            .published
            .with_label_values(&[self.pipeline])
            .inc_by(took);
        for r in rejected {
            self.dead_letter(&events[r.index], r.reason);
        }
        Ok(())
    }
}

/// Batches queued for a publisher thread besides the one it publishes: the
/// reader decodes the next batch meanwhile, and at most this many more
/// wait in memory.
const QUEUED: usize = 1;

/// What the reader asks of a publisher thread.
enum Job {
    /// Publish this batch.
    Publish(Handed),
    /// Answer with [`Publisher::settle`] once every batch before is done.
    Settle,
}

/// The reader's end of a publisher thread ([`Delivery::spawn`]).
struct Pipe {
    /// Batches to publish, and requests to settle, in order.
    jobs: SyncSender<Job>,
    /// The answers to the requests to settle.
    settled: Receiver<(Acked, Option<Error>)>,
    /// Emptied Vecs, to fill again.
    spare: Receiver<Vec<Event>>,
    /// Set once a batch failed: the reader stops handing batches over.
    failed: Arc<AtomicBool>,
}

/// Where a [`Delivery`] hands its batches.
enum To<'a> {
    /// A publisher on this thread: each batch is published before the
    /// reader goes on (consumer groups, replay).
    Here(Publisher<'a>),
    /// A publisher thread: the reader goes on while it publishes.
    Thread(Pipe),
}

/// What a publisher thread that ended unexpectedly (a bug) leaves.
fn publisher_gone() -> Error {
    Error::transient("the publisher thread ended")
}

/// Decoded events on their way to the publisher, and what it acknowledged
/// for the next commit: positions, dead letters and claim-checks.
struct Delivery<'a> {
    /// Events decoded and not yet handed over.
    events: Vec<Event>,
    /// Hand them over once this many are waiting.
    batch_size: usize,
    /// The last row all of whose events are handed over or waiting.
    done: Option<Position>,
    /// Claim-check rows whose last events wait in `events`.
    claim_checks: Vec<i64>,
    /// What the publisher acknowledged and made durable, as of the last
    /// [`Delivery::settle`].
    acked: Acked,
    /// A settle was asked for ([`Delivery::request_settle`]) and its answer
    /// is not collected yet.
    settling: bool,
    /// The publisher.
    to: To<'a>,
}

impl<'a> Delivery<'a> {
    /// Publishing on this thread with `publisher`.
    fn new(publisher: Publisher<'a>, batch_size: usize) -> Delivery<'a> {
        Delivery::with(To::Here(publisher), batch_size)
    }

    /// Handing batches of `batch_size` events to `to`.
    fn with(to: To<'a>, batch_size: usize) -> Delivery<'a> {
        Delivery {
            events: Vec::with_capacity(batch_size.min(100_000)),
            batch_size,
            done: None,
            claim_checks: Vec::new(),
            acked: Acked::default(),
            settling: false,
            to,
        }
    }

    /// Publishing on a thread of its own in `scope`, to the sink `open`
    /// opens there (its error is returned here), routed by `subject`.
    fn spawn<'s>(
        scope: &'s Scope<'s, '_>,
        open: impl FnOnce() -> Result<Box<dyn Sink>, Error> + Send + 's,
        pipeline: &'s str,
        subject: &'s Template,
        batch_size: usize,
    ) -> Result<Delivery<'a>, Error> {
        let (jobs, todo) = sync_channel::<Job>(QUEUED);
        let (answer, settled) = channel();
        let (emptied, spare) = channel();
        let failed = Arc::new(AtomicBool::new(false));
        let stopped = failed.clone();
        std::thread::Builder::new()
            .name(format!("sink {pipeline}"))
            .spawn_scoped(scope, move || {
                crate::logging::set_pipeline(pipeline);
                let mut sink = match open() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = answer.send((Acked::default(), Some(e)));
                        return;
                    }
                };
                let mut p = Publisher::new(sink.as_mut(), pipeline).routing(subject);
                if answer.send((Acked::default(), None)).is_err() {
                    return;
                }
                for job in todo {
                    match job {
                        Job::Publish(h) => {
                            let events = p.take(h);
                            stopped.store(p.failed.is_some(), Ordering::Relaxed);
                            let _ = emptied.send(events);
                        }
                        Job::Settle => {
                            if answer.send(p.settle()).is_err() {
                                return;
                            }
                        }
                    }
                }
            })
            .map_err(|e| Error::transient(format!("cannot start the publisher thread: {e}")))?;
        if let (_, Some(e)) = settled.recv().map_err(|_| publisher_gone())? {
            return Err(e);
        }
        let pipe = Pipe {
            jobs,
            settled,
            spare,
            failed,
        };
        Ok(Delivery::with(To::Thread(pipe), batch_size))
    }

    /// Decode an outbox row into the batch, handing it over once it is
    /// full. A row that fails to decode leaves none of its events behind.
    /// For a claim-check row, what is waiting is handed over and the
    /// claim-check is returned: the caller streams its delta rows
    /// ([`Delivery::push`]).
    fn row(&mut self, decoder: &Decoder, row: &Row) -> Result<Option<ClaimCheck>, Error> {
        let before = self.events.len();
        let decoded = decoder.decode(row, &mut self.events);
        if decoded.is_err() {
            self.events.truncate(before);
        }
        if let Some(cc) = decoded? {
            self.publish()?;
            return Ok(Some(cc));
        }
        self.done = Some(row.position());
        if self.events.len() >= self.batch_size {
            self.publish()?;
        }
        Ok(None)
    }

    /// Add an event of a claim-check delta.
    fn push(&mut self, event: Event) {
        self.events.push(event);
    }

    /// Claim-check row `row` was handed over whole.
    fn claim_check_done(&mut self, row: &Row) {
        self.claim_checks.push(row.id);
        self.done = Some(row.position());
    }

    /// Hand the waiting events to the publisher, with the rows they
    /// complete. Once a batch failed nothing more is published: its error.
    fn publish(&mut self) -> Result<(), Error> {
        if self.events.is_empty() && self.done.is_none() {
            return Ok(());
        }
        let h = Handed {
            events: std::mem::take(&mut self.events),
            done: self.done.take(),
            claim_checks: std::mem::take(&mut self.claim_checks),
        };
        let failed = match &mut self.to {
            To::Here(p) => {
                self.events = p.take(h);
                p.failed.is_some()
            }
            To::Thread(pipe) => {
                pipe.jobs
                    .send(Job::Publish(h))
                    .map_err(|_| publisher_gone())?;
                self.events = pipe.spare.try_recv().unwrap_or_default();
                pipe.failed.load(Ordering::Relaxed)
            }
        };
        if failed {
            // Collects what was acknowledged before, and returns the error.
            return self.settle();
        }
        Ok(())
    }

    /// Hand over what waits and [`Delivery::settle`].
    fn finish(&mut self) -> Result<(), Error> {
        self.publish()?;
        self.settle()
    }

    /// Wait until every batch handed over is published (or dropped after
    /// a failed one), have the sink make them durable, and collect what it
    /// acknowledged into `acked`; the error of a failed batch or flush.
    fn settle(&mut self) -> Result<(), Error> {
        if std::mem::take(&mut self.settling) {
            // The answer to the request out first (on this thread it was
            // taken in when asked for).
            if let To::Thread(pipe) = &mut self.to {
                let answer = pipe.settled.recv().map_err(|_| publisher_gone())?;
                self.collect(answer)?;
            }
        }
        let answer = match &mut self.to {
            To::Here(p) => p.settle(),
            To::Thread(pipe) => {
                pipe.jobs.send(Job::Settle).map_err(|_| publisher_gone())?;
                pipe.settled.recv().map_err(|_| publisher_gone())?
            }
        };
        self.collect(answer)
    }

    /// Take in a publisher's answer to a settle: what it acknowledged, and
    /// the error of a failed batch or flush.
    fn collect(&mut self, (acked, failed): (Acked, Option<Error>)) -> Result<(), Error> {
        self.acked.merge(acked);
        failed.map_or(Ok(()), Err)
    }

    /// Hand over what waits and ask the publisher to settle it, without
    /// waiting: the reader reads on while the publisher finishes its
    /// batches and the sink makes them durable, and
    /// [`Delivery::poll_settled`] collects the answer. (The request waits
    /// for room in the publisher's queue, as a batch handed over would.)
    /// False when one is out already. A publisher on this thread settles
    /// at once.
    fn request_settle(&mut self) -> Result<bool, Error> {
        if self.settling {
            return Ok(false);
        }
        self.publish()?;
        match &mut self.to {
            To::Here(_) => self.settle()?,
            To::Thread(pipe) => pipe.jobs.send(Job::Settle).map_err(|_| publisher_gone())?,
        }
        self.settling = true;
        Ok(true)
    }

    /// Whether the answer to [`Delivery::request_settle`] is in (collected
    /// into `acked`), without waiting; the error of a failed batch or
    /// flush.
    fn poll_settled(&mut self) -> Result<bool, Error> {
        if !self.settling {
            return Ok(false);
        }
        let answer = match &mut self.to {
            To::Here(_) => (Acked::default(), None),
            To::Thread(pipe) => match pipe.settled.try_recv() {
                Ok(answer) => answer,
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(false),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return Err(publisher_gone()),
            },
        };
        self.settling = false;
        self.collect(answer).map(|()| true)
    }

    /// Forget a batch that will not be committed (it is read again), and
    /// publish again. Consumer-group mode: its publisher is on this thread.
    fn discard(&mut self) {
        self.events.clear();
        self.settling = false;
        self.done = None;
        self.claim_checks.clear();
        self.acked = Acked::default();
        if let To::Here(p) = &mut self.to {
            p.acked = Acked::default();
            p.failed = None;
        }
    }

    /// The dead letters collected since the last commit, for the commit.
    fn take_dead(&mut self) -> Vec<DeadLetter> {
        std::mem::take(&mut self.acked.dead)
    }

    /// The claim-checks published since the last commit, to report.
    fn take_claim_checks(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.acked.claim_checks)
    }
}

/// Write `dead` letters of `pipeline` in `tx`, the transaction that
/// commits the position past them.
fn write_dead_letters(
    tx: &mut Transaction,
    pipeline: &str,
    dead: &[DeadLetter],
) -> Result<(), Error> {
    if dead.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = dead.iter().map(|d| d.dedup_key.as_str()).collect();
    let payloads: Vec<&str> = dead.iter().map(|d| d.envelope.as_str()).collect();
    let errors: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    tx.execute(
        "SELECT pgtrickle.relay_dead_letter($1, $2, $3, $4)",
        &[&pipeline, &keys, &payloads, &errors],
    )?;
    Ok(())
}

/// A transaction for an offset commit, whose COMMIT does not wait for its
/// WAL flush: the sink's data is durable before it is issued, so losing it
/// in a PostgreSQL crash only replays events, with the same dedup keys
/// (README, "Delivery guarantees"). A later synchronous commit flushes it
/// with its own WAL, so it is never lost behind one.
fn async_commit(client: &mut Client) -> Result<Transaction<'_>, Error> {
    let mut tx = client.transaction()?;
    tx.batch_execute("SET LOCAL synchronous_commit = off")?;
    Ok(tx)
}

/// Tell the outbox the claim-check rows `ids` were delivered (after the
/// position past them is committed).
fn report_claim_checks(client: &mut Client, info: &OutboxInfo, ids: Vec<i64>) -> Result<(), Error> {
    for id in ids {
        rows_consumed(client, info, id)?;
    }
    Ok(())
}

/// The commit rule of the offset mode: the position only moves to a row
/// whose events, and every event before them, the sink acknowledged and
/// made durable. It is committed at most every [`COMMIT_EVERY`], whether a
/// backlog is worked off or single events arrive; at once when a read fails
/// (what came before the failing row is delivered), when stopping, and
/// when `--once` is done. Caught up, the wait for the next notification
/// ends when the commit is due ([`Commits::until_due`]).
struct Commits {
    /// Rows were handed over since the last commit.
    pending: bool,
    /// When the last commit was made.
    last: Instant,
}

impl Commits {
    fn new(now: Instant) -> Commits {
        Commits {
            pending: false,
            last: now,
        }
    }

    /// A read handed its rows to `out`: hand over what of them waits. They
    /// count as delivered once the sink acknowledged them, which
    /// [`Commits::take`] waits for.
    fn delivered(&mut self, out: &mut Delivery) -> Result<(), Error> {
        out.publish()?;
        self.pending = true;
        Ok(())
    }

    /// Whether to commit now, while reading on.
    fn due(&self, now: Instant, read_failed: bool) -> bool {
        self.pending && (read_failed || now.duration_since(self.last) >= COMMIT_EVERY)
    }

    /// A commit was made at `now`.
    fn committed(&mut self, now: Instant) {
        self.last = now;
    }

    /// The commit is due: ask `out` to settle what was handed over, and
    /// read on; [`Commits::answered`] gives the position once it is
    /// settled. (A commit that waited would hold up reading for as long
    /// as the batches in flight take, and the sink's flush: up to tens of
    /// milliseconds on a busy machine, every [`COMMIT_EVERY`].)
    fn ask(&mut self, out: &mut Delivery, now: Instant) -> Result<(), Error> {
        if out.request_settle()? {
            self.pending = false;
            self.last = now;
        }
        Ok(())
    }

    /// The position to commit, once the settle [`Commits::ask`] asked for
    /// is answered; None until then, or when it completes no row.
    fn answered(&mut self, out: &mut Delivery) -> Result<Option<Position>, Error> {
        Ok(match out.poll_settled()? {
            true => out.acked.position.take(),
            false => None,
        })
    }

    /// How long until the pending commit is due; None when nothing is
    /// pending.
    fn until_due(&self, now: Instant) -> Option<Duration> {
        self.pending
            .then(|| (self.last + COMMIT_EVERY).saturating_duration_since(now))
    }

    /// `wait`, or less if the pending commit falls due sooner.
    fn cap(&self, now: Instant, wait: Duration) -> Duration {
        self.until_due(now).map_or(wait, |d| d.min(wait))
    }

    /// After an error (a failed publish among them): the position the
    /// sink acknowledged before it, once the sink made that durable (the
    /// batches after a failed one are not published); None when there is
    /// none since the last commit, or the flush failed.
    fn take_acked(&mut self, out: &mut Delivery) -> Option<Position> {
        // The error is the one being returned, or a failed flush.
        let _ = out.settle();
        self.pending = false;
        out.acked.position.take()
    }

    /// The position to commit, once every event handed over up to it was
    /// acknowledged and made durable (`out` settled); None when nothing was
    /// delivered since the last commit.
    fn take(&mut self, out: &mut Delivery) -> Result<Option<Position>, Error> {
        if !self.pending && !out.settling {
            return Ok(None);
        }
        out.finish()?;
        self.pending = false;
        Ok(out.acked.position.take())
    }
}

/// Outbox rows to re-publish (`pgtrickle-relay replay`).
#[derive(Debug, Clone)]
pub struct Range {
    /// The first outbox id.
    pub from: i64,
    /// The last outbox id.
    pub to: i64,
    /// Only rows created at or after this time.
    pub since: Option<SystemTime>,
}

/// What [`replay`] re-published.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Outbox rows read.
    pub rows: u64,
    /// Events the sink took.
    pub events: u64,
    /// Events it refused for good (written to the dead letters).
    pub dead: u64,
}

/// Re-publish the rows of `range` of outbox `info` to `sink`, read, decoded
/// and published as the forward loop does (same events, same dedup keys,
/// claim-check rows streamed), in the loop's order. No position moves: not
/// the pipeline's offset, not a consumer group's, and claim-checks are not
/// reported again. Events the sink refuses for good are written to the
/// dead letters, as the loop writes them.
pub fn replay(
    client: &mut Client,
    info: &OutboxInfo,
    cfg: &Forward,
    pipeline: &str,
    sink: &mut dyn Sink,
    range: &Range,
) -> Result<Replayed, Error> {
    let reader = Reader {
        decoder: Decoder {
            info,
            subject: &cfg.subject,
            pipeline,
        },
        delta: match &info.delta_table {
            Some(_) => Some(client.prepare(&info.delta_sql()?)?),
            None => None,
        },
        limit: Cell::default(),
    };
    let read = client.prepare(&info.range_sql())?;
    let publisher = Publisher::new(sink, pipeline).routing(&cfg.subject);
    let mut out = Delivery::new(publisher, cfg.batch_size);
    let mut pos = Position {
        txid: None,
        id: range.from.saturating_sub(1),
    };
    let mut done = Replayed::default();
    loop {
        let mut last = None;
        done.rows += reader
            .batch(
                client,
                &read,
                &pos,
                &[&range.from, &range.to, &range.since],
                &mut out,
                &mut last,
            )?
            .rows;
        out.finish()?;
        let dead = out.take_dead();
        done.dead += dead.len() as u64;
        if !dead.is_empty() {
            let mut tx = client.transaction()?;
            write_dead_letters(&mut tx, pipeline, &dead)?;
            tx.commit()?;
        }
        out.take_claim_checks();
        match last {
            Some(p) => pos = p,
            None => break,
        }
    }
    done.events = out.acked.sent;
    Ok(done)
}

/// Hands outbox rows to a [`Delivery`], streaming the delta rows of a
/// claim-check chunk by chunk.
struct Reader<'a> {
    decoder: Decoder<'a>,
    /// The delta-rows query, when the outbox has a delta-rows table.
    delta: Option<Statement>,
    /// How many rows the next read asks for.
    limit: Cell<ReadLimit>,
}

impl Reader<'_> {
    /// Hand one outbox row to `out`, streaming the delta rows of a
    /// claim-check row in `tx`.
    fn row(&self, tx: &mut Transaction, out: &mut Delivery, row: &Row) -> Result<(), Error> {
        match out.row(&self.decoder, row)? {
            Some(cc) => self.claim_check(tx, out, row, &cc),
            None => Ok(()),
        }
    }

    /// Stream the delta rows of claim-check `row` to `out`, in chunks.
    fn claim_check(
        &self,
        tx: &mut Transaction,
        out: &mut Delivery,
        row: &Row,
        cc: &ClaimCheck,
    ) -> Result<(), Error> {
        let stmt = self.delta.as_ref().ok_or_else(|| {
            Error::permanent(format!(
                "outbox {} id {}: claim-check row but no delta-rows table",
                self.decoder.info.table, row.id
            ))
        })?;
        let portal = tx.bind(stmt, &[&row.id])?;
        let chunk = out.batch_size.clamp(1, 10_000) as i32;
        loop {
            let rows = tx.query_portal(&portal, chunk)?;
            if rows.is_empty() {
                break;
            }
            for d in &rows {
                out.push(self.decoder.delta_event(row, cc, d)?);
            }
            out.publish()?;
        }
        out.claim_check_done(row);
        Ok(())
    }

    /// Read and hand to `out` the rows after `from` of `read` (the read
    /// query, or the range query with `range` its `$4`...), until they hold
    /// `batch_size` events (the row that reaches it whole, at least one
    /// row) or none are left; `last` is the position of the last row fully
    /// handed over. Each query asks for as many rows as [`ReadLimit`]
    /// expects the rest of the batch to take and is read again after the
    /// last row when they held fewer events. The rows stream in as
    /// PostgreSQL produces them, so the server computes the next rows while
    /// these are decoded and published. A claim-check row ends the read:
    /// its delta rows are read in a transaction of their own.
    fn batch(
        &self,
        client: &mut Client,
        read: &Statement,
        from: &Position,
        range: &[&(dyn ToSql + Sync)],
        out: &mut Delivery,
        last: &mut Option<Position>,
    ) -> Result<Read, Error> {
        let (mut n, mut events) = (0, 0);
        let mut from = from.clone();
        loop {
            let room = out.batch_size.saturating_sub(events as usize).max(1);
            let asked = self.limit.get().rows(room);
            let txid = from.txid_or_zero();
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&txid, &from.id, &asked];
            params.extend_from_slice(range);
            let got = self.stream(client, read, &params, out, last, &mut events)?;
            n += got.rows;
            let full = events >= out.batch_size as i64;
            if got.ended || got.rows < asked as u64 || full {
                return Ok(Read { rows: n, full });
            }
            from = last.clone().expect("rows were handed over");
        }
    }

    /// One query of [`Reader::batch`]: hand its rows to `out` while the
    /// batch has room (`events` so far); what streams in after that is
    /// dropped (read again next time).
    fn stream(
        &self,
        client: &mut Client,
        read: &Statement,
        params: &[&(dyn ToSql + Sync)],
        out: &mut Delivery,
        last: &mut Option<Position>,
        events: &mut i64,
    ) -> Result<Streamed, Error> {
        let mut got = Streamed::default();
        let mut widest = 0;
        let mut claim_check = None;
        let mut rows = client.query_raw(read, params.iter().map(|p| *p as &dyn ToSql))?;
        while let Some(r) = rows.next()? {
            if *events >= out.batch_size as i64 {
                break;
            }
            let row = Row::from_pg(&r);
            *events += row.events;
            widest = widest.max(row.events);
            if let Some(cc) = out.row(&self.decoder, &row)? {
                claim_check = Some((row, cc));
                break;
            }
            *last = Some(row.position());
            got.rows += 1;
        }
        // Whatever of the read is left is skipped by the connection.
        drop(rows);
        if widest > 0 {
            let mut limit = self.limit.get();
            limit.read(widest);
            self.limit.set(limit);
        }
        if let Some((row, cc)) = claim_check {
            let mut tx = client.transaction()?;
            self.claim_check(&mut tx, out, &row, &cc)?;
            tx.commit()?;
            *last = Some(row.position());
            got.rows += 1;
            got.ended = true;
        }
        Ok(got)
    }
}

/// What [`Reader::batch`] read.
struct Read {
    /// Rows handed over whole.
    rows: u64,
    /// The batch is full: more rows may be waiting.
    full: bool,
}

/// What one query of [`Reader::batch`] handed over.
#[derive(Default)]
struct Streamed {
    /// Rows handed over whole.
    rows: u64,
    /// A claim-check row ended the read.
    ended: bool,
}

/// Default mode: this pipeline's own offset in `relay_consumer_offsets`.
struct OffsetLoop<'a> {
    ctx: &'a Ctx,
    client: &'a mut Client,
    reader: Reader<'a>,
    out: Delivery<'a>,
    /// The read query.
    read: Statement,
    /// The position read up to (delivered or not).
    pos: Position,
    commits: Commits,
    held: Held,
    waker: Waker,
    /// When the first read not yet committed began (batch-time metric).
    batch_start: Option<Instant>,
    batch_seconds: Histogram,
}

impl<'a> OffsetLoop<'a> {
    fn new(
        ctx: &'a Ctx,
        client: &'a mut Client,
        reader: Reader<'a>,
        out: Delivery<'a>,
        listener: Arc<Listener>,
    ) -> Result<OffsetLoop<'a>, Error> {
        let read = client.prepare(&reader.decoder.info.read_sql())?;
        let pos = Position::load(client, &ctx.relay_group, &ctx.name)?;
        let waker = Waker::new(reader.decoder.info, listener);
        Ok(OffsetLoop {
            ctx,
            client,
            reader,
            out,
            read,
            pos,
            commits: Commits::new(Instant::now()),
            held: Held::new(),
            waker,
            batch_start: None,
            batch_seconds: metrics::get().batch.with_label_values(&[&ctx.name]),
        })
    }

    /// Forward until stopped, drained or an error. After an error, what
    /// the sink acknowledged before it stays delivered: it is committed, so
    /// the next session does not send it again.
    fn run(&mut self) -> Result<(), Error> {
        self.waker.start(self.client)?;
        let ran = self.forward();
        if ran.is_err() {
            let acked = self.commits.take_acked(&mut self.out);
            if let Err(c) = self.commit_position(acked) {
                log::debug!("committing what was delivered before the error: {c}");
            }
        }
        self.waker.leave(self.client);
        ran
    }

    /// The loop of [`OffsetLoop::run`].
    fn forward(&mut self) -> Result<(), Error> {
        let info = self.reader.decoder.info;
        loop {
            if self.ctx.stopping() {
                return self.commit().map(|_| ());
            }
            let answered = self.commits.answered(&mut self.out)?;
            if !self.commit_position(answered)? {
                return Ok(());
            }
            let mut last = None;
            let started = Instant::now();
            self.batch_start.get_or_insert(started);
            self.waker.mark();
            let read = self.reader.batch(
                self.client,
                &self.read,
                &self.pos,
                &[],
                &mut self.out,
                &mut last,
            );
            if let Some(last) = last {
                self.commits.delivered(&mut self.out)?;
                self.waker.working(self.client)?;
                self.pos = last;
                self.held.clear(&self.ctx.name);
                let now = Instant::now();
                if read.is_err() {
                    // What came before the failing row is delivered:
                    // commit it now.
                    if !self.commit()? {
                        return Ok(());
                    }
                } else if self.commits.due(now, false) {
                    self.commits.ask(&mut self.out, now)?;
                }
                let read = read?;
                if !read.full {
                    // Caught up with the writers: the next read waits for
                    // what they commit meanwhile.
                    let now = Instant::now();
                    let pace = read_pace(read.rows).saturating_sub(now - started);
                    if !pace.is_zero() && !self.ctx.sleep(self.commits.cap(now, pace)) {
                        return self.commit().map(|_| ());
                    }
                }
                continue;
            }
            read?;
            // Caught up: commit on schedule too, not on every wake-up, and
            // what was asked for before sleeping.
            if (self.commits.due(Instant::now(), false) || self.out.settling) && !self.commit()? {
                return Ok(());
            }
            if !self.commits.pending {
                self.batch_start = None;
            }
            // Nothing below the horizon. Committed rows above it wait for an
            // older transaction to end: look again soon (or at a
            // notification) rather than only at the next notification.
            if info.held_back(self.client, &self.pos)? {
                let now = Instant::now();
                if self.held.held(now, &self.ctx.name) {
                    self.held.report(self.client, &self.ctx.name, &info.table)?;
                    health::ok(&self.ctx.name, info.lag_seconds(self.client, &self.pos)?);
                }
                // Any outbox commit wakes us; a commit falling due too (the
                // top of the loop commits).
                let wait = self.commits.cap(now, self.held.next_wait(now));
                self.waker.wait(self.ctx, wait);
                continue;
            }
            self.held.clear(&self.ctx.name);
            health::ok(&self.ctx.name, 0.0);
            if self.ctx.once {
                return self.commit().map(|_| ());
            }
            let due = self.commits.until_due(Instant::now());
            self.waker.idle(self.ctx, self.client, due)?;
        }
    }

    /// Commit the delivered position, with the dead letters collected, in
    /// one asynchronous transaction ([`async_commit`]). Ok(false): the
    /// catalog no longer has this pipeline as it runs (deleted or changed
    /// meanwhile): nothing was committed.
    fn commit(&mut self) -> Result<bool, Error> {
        let p = self.commits.take(&mut self.out)?;
        self.commit_position(p)
    }

    /// Commit `p` (None: nothing to commit), as [`OffsetLoop::commit`] does.
    fn commit_position(&mut self, p: Option<Position>) -> Result<bool, Error> {
        let Some(p) = p else {
            return Ok(true);
        };
        self.commits.committed(Instant::now());
        let info = self.reader.decoder.info;
        let mut tx = async_commit(self.client)?;
        write_dead_letters(&mut tx, &self.ctx.name, &self.out.take_dead())?;
        if !p.commit(&mut tx, self.ctx, &info.table)? {
            log::info!(
                "the pipeline was deleted or changed in the relay catalog: its position is not \
                 committed, and this session ends"
            );
            return Ok(false);
        }
        tx.commit()?;
        report_claim_checks(self.client, info, self.out.take_claim_checks())?;
        if let Some(t) = self.batch_start.take() {
            self.batch_seconds.observe(t.elapsed().as_secs_f64());
        }
        health::ok(&self.ctx.name, info.lag_seconds(self.client, &p)?);
        Ok(true)
    }
}

/// Committed rows held back by an older open transaction: since when, and
/// the metrics and warning that name that transaction.
struct Held {
    /// Since when rows have been held back (None: they are not).
    since: Option<Instant>,
    /// When the holder was last looked up in this episode.
    looked: Option<Instant>,
    /// When the warning was last logged.
    warned: Option<Instant>,
    /// The prepared transaction exported as the holder, if one is.
    gid: Option<String>,
}

impl Held {
    fn new() -> Held {
        Held {
            since: None,
            looked: None,
            warned: None,
            gid: None,
        }
    }

    /// Rows are held back at `now`: note since when, and say whether the
    /// holder is due to be looked up ([`HOLDER_LOOKUP`]). Most holds last
    /// as long as a writer's transaction, a millisecond or so: they are
    /// waited out without a query of their own.
    fn held(&mut self, now: Instant, pipeline: &str) -> bool {
        let since = *self.since.get_or_insert(now);
        metrics::get()
            .horizon_held
            .with_label_values(&[pipeline])
            .set((now - since).as_secs_f64());
        let due = match self.looked {
            None => now - since >= HOLDER_LOOKUP,
            Some(t) => now - t >= HOLDER_LOOKUP,
        };
        if due {
            self.looked = Some(now);
        }
        due
    }

    /// How long to wait before looking again: a quarter of the time the
    /// rows have been held so far (a transaction open for long is likely to
    /// stay open a while more), within [`HELD_WAIT`]. Any outbox commit
    /// that notifies ends the wait sooner.
    fn next_wait(&self, now: Instant) -> Duration {
        let held = self.since.map_or(Duration::ZERO, |s| now - s);
        (held / 4).clamp(HELD_WAIT.0, HELD_WAIT.1)
    }

    /// Rows are held back: export how long and which transaction holds
    /// them (a session's pid for `pg_stat_activity`, or a prepared
    /// transaction's gid for `pg_prepared_xacts`); warn after 5 s, every 30 s.
    fn report(&mut self, client: &mut Client, pipeline: &str, table: &str) -> Result<(), Error> {
        let since = self.since.unwrap_or_else(Instant::now);
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
        self.looked = None;
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

/// Consumer-group mode: leased batches from `poll_outbox`.
struct GroupLoop<'a> {
    ctx: &'a Ctx,
    cfg: &'a Forward,
    group: &'a str,
    client: &'a mut Client,
    reader: Reader<'a>,
    out: Delivery<'a>,
    /// `poll_outbox`: the ids of the next leased batch.
    poll: Statement,
    /// The rows of those ids, in that order.
    fetch: Statement,
    keeper: LeaseKeeper,
    waker: Waker,
}

impl<'a> GroupLoop<'a> {
    fn new(
        ctx: &'a Ctx,
        cfg: &'a Forward,
        group: &'a str,
        client: &'a mut Client,
        reader: Reader<'a>,
        mut publisher: Publisher<'a>,
        listener: Arc<Listener>,
    ) -> Result<GroupLoop<'a>, Error> {
        let info = reader.decoder.info;
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
            "SELECT o.id, {extra_cols}, o.created_at FROM unnest($1::bigint[]) WITH ORDINALITY AS b(id, n) \
             JOIN pgtrickle.{} o ON o.id = b.id ORDER BY b.n",
            crate::outbox::quote_ident(&info.table)
        ))?;
        let keeper = LeaseKeeper::start(ctx, group, cfg.lease);
        publisher.lease(keeper.lost.clone(), cfg.batch_size);
        let waker = Waker::new(info, listener);
        Ok(GroupLoop {
            ctx,
            cfg,
            group,
            client,
            reader,
            out: Delivery::new(publisher, cfg.batch_size),
            poll,
            fetch,
            keeper,
            waker,
        })
    }

    /// Forward until stopped or an error; counted out of the outbox's
    /// sleepers at the end.
    fn run(&mut self) -> Result<(), Error> {
        self.waker.start(self.client)?;
        let ran = self.forward();
        self.waker.leave(self.client);
        ran
    }

    /// The loop of [`GroupLoop::run`].
    fn forward(&mut self) -> Result<(), Error> {
        let (ctx, group) = (self.ctx, self.group);
        let info = self.reader.decoder.info;
        let consumer = ctx.worker_id.as_str();
        let lease_seconds = self.cfg.lease.as_secs() as i32;
        loop {
            if ctx.stopping() {
                return Ok(());
            }
            self.waker.mark();
            let ids: Vec<i64> = self
                .client
                .query(
                    &self.poll,
                    &[
                        &group,
                        &consumer,
                        &(self.cfg.batch_size as i32),
                        &lease_seconds,
                    ],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let Some(&last_id) = ids.last() else {
                health::ok(&ctx.name, 0.0);
                if ctx.once {
                    return Ok(());
                }
                self.waker.idle(ctx, self.client, None)?;
                continue;
            };
            self.waker.working(self.client)?;
            self.keeper.begin(last_id);
            let published = self.publish(&ids);
            if self.keeper.lost.load(Ordering::Relaxed) {
                self.keeper.end();
                self.out.discard();
                log::warn!(
                    "consumer group {group:?}: this instance lost its lease on the batch ending \
                     at outbox id {last_id} (another consumer took it over); stopped publishing it"
                );
                continue;
            }
            if let Err(e) = published {
                self.keeper.end();
                return Err(e);
            }
            let kept = self.commit(last_id)?;
            self.keeper.end();
            health::ok(&ctx.name, 0.0);
            if !kept {
                log::warn!(
                    "consumer group {group:?}: the lease on the batch ending at outbox id \
                     {last_id} had passed to another consumer; its events may be delivered twice \
                     (same dedup keys)"
                );
            }
            report_claim_checks(self.client, info, self.out.take_claim_checks())?;
        }
    }

    /// Read the leased rows `ids` and publish them, durably.
    fn publish(&mut self, ids: &[i64]) -> Result<(), Error> {
        let mut tx = self.client.transaction()?;
        let rows = tx.query(&self.fetch, &[&ids])?;
        for r in &rows {
            self.reader.row(&mut tx, &mut self.out, &Row::from_pg(r))?;
        }
        tx.commit()?;
        self.out.finish()
    }

    /// Commit the batch ending at `last_id` with the dead letters collected
    /// ([`async_commit`]: lost in a crash, the lease stays open, expires and
    /// the batch is delivered again); false when its lease had passed to
    /// another consumer meanwhile.
    fn commit(&mut self, last_id: i64) -> Result<bool, Error> {
        let mut tx = async_commit(self.client)?;
        write_dead_letters(&mut tx, &self.ctx.name, &self.out.take_dead())?;
        let kept: bool = tx
            .query_one(
                "SELECT pgtrickle.commit_offset($1, $2, $3)",
                &[&self.group, &self.ctx.worker_id, &last_id],
            )?
            .get(0);
        tx.commit()?;
        Ok(kept)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Template;
    use crate::testkit::{outbox_orders, MemorySink};

    /// Outbox row `id` with `n` inserted rows.
    fn row(id: i64, n: usize) -> Row {
        let rows: Vec<String> = (0..n).map(|i| format!("{{\"n\":{i}}}")).collect();
        Row {
            id,
            txid: Some("100".into()),
            refresh_id: None,
            claim_check: false,
            payload: format!("{{\"v\":1,\"inserted\":[{}]}}", rows.join(",")),
            headers: None,
            created_at: None,
            events: n.max(1) as i64,
        }
    }

    fn position(id: i64) -> Position {
        Position {
            txid: Some("100".into()),
            id,
        }
    }

    /// Hand `rows` to `out` with a decoder of outbox_orders.
    fn decode(out: &mut Delivery, rows: &[Row]) -> Result<(), Error> {
        let (info, subject) = (outbox_orders(), Template::parse("t").unwrap());
        let decoder = Decoder {
            info: &info,
            subject: &subject,
            pipeline: "p",
        };
        for r in rows {
            assert_eq!(out.row(&decoder, r)?, None);
        }
        Ok(())
    }

    /// A delivery publishing to `sink` on this thread.
    fn here(sink: &mut MemorySink, batch_size: usize) -> Delivery<'_> {
        Delivery::new(Publisher::new(sink, "p"), batch_size)
    }

    /// What [`Delivery::spawn`] opens on the publisher's thread: `sink`.
    fn opener(sink: &MemorySink) -> impl FnOnce() -> Result<Box<dyn Sink>, Error> + Send {
        let sink = sink.clone();
        move || Ok(Box::new(sink) as Box<dyn Sink>)
    }

    #[test]
    fn a_row_that_fails_to_decode_leaves_none_of_its_events_behind() {
        let sink = MemorySink::default();
        let mut s = sink.clone();
        let mut out = here(&mut s, 100);
        decode(&mut out, &[row(1, 2)]).unwrap();
        // Its deleted rows decode, then its inserted rows do not.
        let mut bad = row(2, 0);
        bad.payload = r#"{"v":1,"deleted":[{"n":0},{"n":1}],"inserted":"x"}"#.into();
        let e = decode(&mut out, &[bad]).unwrap_err();
        assert!(e.msg.contains("outbox_orders id 2"), "{e}");
        out.finish().unwrap();
        assert_eq!(sink.get().acked, ["outbox_orders:1:0", "outbox_orders:1:1"]);
        assert_eq!(out.acked.position, Some(position(1)));
    }

    #[test]
    fn events_the_sink_refuses_for_good_become_dead_letters_with_their_envelope() {
        let sink = MemorySink::default();
        sink.get()
            .reject
            .insert("outbox_orders:1:1".into(), "message too large".into());
        let mut s = sink.clone();
        let mut out = here(&mut s, 100);
        decode(&mut out, &[row(1, 3)]).unwrap();
        out.finish().unwrap();
        assert_eq!(sink.get().acked, ["outbox_orders:1:0", "outbox_orders:1:2"]);
        let dead = out.take_dead();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].dedup_key, "outbox_orders:1:1");
        assert_eq!(dead[0].reason, "message too large");
        let envelope: serde_json::Value = serde_json::from_str(&dead[0].envelope).unwrap();
        assert_eq!(envelope["dedup_key"], "outbox_orders:1:1");
        assert_eq!(envelope["payload"], serde_json::json!({"n": 1}));
        assert_eq!(envelope["outbox_id"], 1);
        // Written once: the next commit has none.
        assert!(out.take_dead().is_empty());
        // A batch given up forgets its dead letters (it is read again).
        decode(&mut out, &[row(1, 3)]).unwrap();
        out.publish().unwrap();
        out.discard();
        out.finish().unwrap();
        assert!(out.take_dead().is_empty());
        drop(out);
        // A batch that fails keeps none of its dead letters (the position
        // does not move past them).
        let subject = Template::parse("t.{payload.tenant}").unwrap();
        let mut out = Delivery::new(Publisher::new(&mut s, "p").routing(&subject), 100);
        let mut r = row(3, 0);
        r.payload = r#"{"v":1,"inserted":[{"n":0},{"tenant":"a"}]}"#.into();
        decode(&mut out, &[r]).unwrap();
        sink.get().fail_publishes = 1;
        assert!(out.finish().is_err());
        assert!(out.take_dead().is_empty());
    }

    #[test]
    fn events_the_subject_cannot_route_become_dead_letters_and_the_rest_go_out_in_order() {
        let sink = MemorySink::default();
        let mut s = sink.clone();
        let (info, subject) = (
            outbox_orders(),
            Template::parse("t.{payload.tenant}").unwrap(),
        );
        let mut out = Delivery::new(Publisher::new(&mut s, "p").routing(&subject), 100);
        let decoder = Decoder {
            info: &info,
            subject: &subject,
            pipeline: "p",
        };
        let mut r = row(1, 0);
        r.payload =
            r#"{"v":1,"inserted":[{"tenant":"a"},{"n":1},{"tenant":"b"},{"tenant":null}]}"#.into();
        assert_eq!(out.row(&decoder, &r).unwrap(), None);
        assert_eq!(out.events[0].subject, "t.a");
        out.finish().unwrap();
        assert_eq!(sink.get().acked, ["outbox_orders:1:0", "outbox_orders:1:2"]);
        let dead = out.take_dead();
        let keys: Vec<&str> = dead.iter().map(|d| d.dedup_key.as_str()).collect();
        assert_eq!(keys, ["outbox_orders:1:1", "outbox_orders:1:3"]);
        assert!(
            dead[0].reason.contains("payload.tenant")
                && dead[0].reason.contains("t.{payload.tenant}"),
            "{}",
            dead[0].reason
        );
        // Two publish calls: around the unroutable event, in order.
        assert_eq!(sink.get().calls, [1, 1]);
    }

    #[test]
    fn dead_letters_of_a_batch_that_fails_are_neither_counted_nor_logged_until_it_goes_out() {
        let sink = MemorySink::default();
        sink.get().fail_publishes = 1;
        let mut s = sink.clone();
        let (info, subject) = (
            outbox_orders(),
            Template::parse("t.{payload.tenant}").unwrap(),
        );
        let pipeline = "dead-count";
        let counted = || {
            metrics::get()
                .dead_letters
                .with_label_values(&[pipeline])
                .get()
        };
        let mut out = Delivery::new(Publisher::new(&mut s, pipeline).routing(&subject), 100);
        let decoder = Decoder {
            info: &info,
            subject: &subject,
            pipeline,
        };
        let mut r = row(1, 0);
        r.payload = r#"{"v":1,"inserted":[{"n":1},{"tenant":"a"}]}"#.into();
        out.row(&decoder, &r).unwrap();
        // The unroutable event, then a publish that fails: the batch is
        // read again, and its dead letter made again then.
        assert!(out.finish().is_err());
        assert!(out.take_dead().is_empty());
        assert_eq!(counted(), 0, "counted a dead letter that was not written");
        out.discard();
        out.row(&decoder, &r).unwrap();
        out.finish().unwrap();
        assert_eq!(out.take_dead().len(), 1);
        assert_eq!(counted(), 1);
    }

    #[test]
    fn a_full_batch_goes_out_at_once_and_after_a_failed_one_nothing_more() {
        let sink = MemorySink::default();
        let mut s = sink.clone();
        let mut out = here(&mut s, 3);
        decode(&mut out, &[row(1, 2)]).unwrap();
        assert!(sink.get().calls.is_empty());
        decode(&mut out, &[row(2, 1)]).unwrap();
        assert_eq!(sink.get().calls, [3]);
        sink.get().fail_publishes = 1;
        assert!(decode(&mut out, &[row(3, 3)]).is_err());
        assert!(decode(&mut out, &[row(4, 3)]).is_err());
        assert!(out.finish().is_err());
        assert_eq!(sink.get().calls, [3, 3]);
        assert_eq!(sink.get().acked.len(), 3);
        assert_eq!(out.acked.position, Some(position(2)));
    }

    #[test]
    fn the_offset_moves_only_past_what_the_sink_acknowledged_and_made_durable() {
        let sink = MemorySink::default();
        let mut s = sink.clone();
        let mut out = here(&mut s, 100);
        let mut commits = Commits::new(Instant::now());
        decode(&mut out, &[row(1, 2)]).unwrap();
        // Acknowledged, but the flush fails: not committed yet.
        commits.delivered(&mut out).unwrap();
        sink.get().fail_flush = true;
        assert!(commits.take(&mut out).is_err());
        assert_eq!(sink.get().flushed, 0);
        // Flushed: committed up to row 1, once.
        assert_eq!(commits.take(&mut out).unwrap(), Some(position(1)));
        assert_eq!(sink.get().flushed, 2);
        assert_eq!(commits.take(&mut out).unwrap(), None);
        // Not acknowledged: not delivered, nothing to commit.
        decode(&mut out, &[row(2, 1)]).unwrap();
        sink.get().fail_publishes = 1;
        assert!(commits.delivered(&mut out).is_err());
        assert_eq!(commits.take_acked(&mut out), None);
    }

    #[test]
    fn after_a_failed_publish_what_was_acknowledged_before_is_still_committed() {
        let sink = MemorySink::default();
        let mut s = sink.clone();
        let mut out = here(&mut s, 100);
        let mut commits = Commits::new(Instant::now());
        decode(&mut out, &[row(1, 2)]).unwrap();
        commits.delivered(&mut out).unwrap();
        // The next rows fail to publish: row 1 is still the position to
        // commit, made durable, without sending rows 2 and 3 again.
        decode(&mut out, &[row(2, 1), row(3, 1)]).unwrap();
        sink.get().fail_publishes = 2;
        assert!(commits.delivered(&mut out).is_err());
        let calls = sink.get().calls.len();
        assert_eq!(commits.take_acked(&mut out), Some(position(1)));
        assert_eq!(sink.get().calls.len(), calls);
        // The two events of row 1 are durable.
        assert_eq!(sink.get().flushed, 2);
        assert_eq!(commits.take_acked(&mut out), None);
    }

    /// A sink whose first publish waits (5 s at most) for `go`.
    struct Gated {
        sink: MemorySink,
        go: Option<Receiver<()>>,
    }

    impl Sink for Gated {
        fn publish(&mut self, events: &[Event]) -> Result<Vec<crate::sink::Rejected>, Error> {
            if let Some(go) = self.go.take() {
                go.recv_timeout(Duration::from_secs(5))
                    .map_err(|_| Error::transient("the reader did not go on"))?;
            }
            self.sink.publish(events)
        }

        fn flush(&mut self) -> Result<(), Error> {
            self.sink.flush()
        }
    }

    #[test]
    fn the_reader_hands_over_the_next_batch_while_the_sink_publishes_one() {
        let sink = MemorySink::default();
        let (go, gate) = channel();
        let open = {
            let sink = sink.clone();
            move || -> Result<Box<dyn Sink>, Error> {
                Ok(Box::new(Gated {
                    sink,
                    go: Some(gate),
                }))
            }
        };
        let subject = Template::parse("t").unwrap();
        std::thread::scope(|s| {
            let mut out = Delivery::spawn(s, open, "p", &subject, 2).unwrap();
            let mut commits = Commits::new(Instant::now());
            // Row 1 is a full batch: the sink holds it until row 2, the
            // next batch, is handed over too.
            decode(&mut out, &[row(1, 2), row(2, 2)]).unwrap();
            go.send(()).unwrap();
            commits.delivered(&mut out).unwrap();
            assert_eq!(commits.take(&mut out).unwrap(), Some(position(2)));
        });
        assert_eq!(sink.get().calls, [2, 2]);
        assert_eq!(sink.get().flushed, 4);
    }

    #[test]
    fn on_its_thread_a_failed_batch_stops_later_ones_and_what_was_acknowledged_is_committed() {
        let sink = MemorySink::default();
        sink.get()
            .reject
            .insert("outbox_orders:1:0".into(), "too large".into());
        let subject = Template::parse("t").unwrap();
        std::thread::scope(|s| {
            let mut out = Delivery::spawn(s, opener(&sink), "p", &subject, 2).unwrap();
            let mut commits = Commits::new(Instant::now());
            decode(&mut out, &[row(1, 2)]).unwrap();
            commits.delivered(&mut out).unwrap();
            assert_eq!(commits.take(&mut out).unwrap(), Some(position(1)));
            assert_eq!(out.take_dead().len(), 1);
            // Row 2 is acknowledged, row 3 fails: row 4 is not published.
            decode(&mut out, &[row(2, 2)]).unwrap();
            out.settle().unwrap();
            sink.get().fail_publishes = 1;
            // Whether the reader hears of the failure at once depends on
            // the publisher thread's pace; it does by the commit.
            let handed = decode(&mut out, &[row(3, 2), row(4, 2)]);
            let handed = handed.and_then(|()| commits.delivered(&mut out));
            assert!(handed.and_then(|()| commits.take(&mut out)).is_err());
            assert_eq!(commits.take_acked(&mut out), Some(position(2)));
            assert_eq!(out.acked.sent, 3);
        });
        assert_eq!(sink.get().calls, [2, 2, 2]);
        assert_eq!(sink.get().flushed, 3);
    }

    #[test]
    fn a_commit_asks_for_a_settle_and_the_reader_reads_on_until_it_is_answered() {
        let sink = MemorySink::default();
        sink.get().flush_delay = Duration::from_millis(300);
        let subject = Template::parse("t").unwrap();
        std::thread::scope(|s| {
            let mut out = Delivery::spawn(s, opener(&sink), "p", &subject, 2).unwrap();
            let t0 = Instant::now();
            let mut commits = Commits::new(t0);
            decode(&mut out, &[row(1, 2)]).unwrap();
            commits.delivered(&mut out).unwrap();
            assert!(commits.due(t0 + COMMIT_EVERY, false));
            commits.ask(&mut out, t0 + COMMIT_EVERY).unwrap();
            assert!(!commits.due(t0 + COMMIT_EVERY, false), "asked");
            // The flush takes 300 ms: the reader hands row 2 over meanwhile.
            decode(&mut out, &[row(2, 2)]).unwrap();
            commits.delivered(&mut out).unwrap();
            assert!(
                t0.elapsed() < Duration::from_millis(200),
                "{:?}",
                t0.elapsed()
            );
            assert_eq!(commits.answered(&mut out).unwrap(), None, "not settled yet");
            // Once answered, the position is row 1's: row 2 was handed over
            // after the request.
            let deadline = Instant::now() + Duration::from_secs(10);
            let answer = loop {
                if let Some(p) = commits.answered(&mut out).unwrap() {
                    break p;
                }
                assert!(Instant::now() < deadline, "no answer");
                std::thread::sleep(Duration::from_millis(5));
            };
            assert_eq!(answer, position(1));
            assert_eq!(commits.take(&mut out).unwrap(), Some(position(2)));
            // A blocking commit while a request is out waits for both.
            decode(&mut out, &[row(3, 2)]).unwrap();
            commits.delivered(&mut out).unwrap();
            commits.ask(&mut out, t0 + COMMIT_EVERY * 3).unwrap();
            decode(&mut out, &[row(4, 2)]).unwrap();
            commits.delivered(&mut out).unwrap();
            assert_eq!(commits.take(&mut out).unwrap(), Some(position(4)));
            assert_eq!(commits.take(&mut out).unwrap(), None);
        });
        assert_eq!(sink.get().flushed, 8);
    }

    #[test]
    fn on_this_thread_a_commit_asked_for_is_settled_at_once() {
        let sink = MemorySink::default();
        let mut s = sink.clone();
        let mut out = here(&mut s, 100);
        let t0 = Instant::now();
        let mut commits = Commits::new(t0);
        decode(&mut out, &[row(1, 2)]).unwrap();
        commits.delivered(&mut out).unwrap();
        commits.ask(&mut out, t0 + COMMIT_EVERY).unwrap();
        assert_eq!(sink.get().flushed, 2);
        assert_eq!(commits.answered(&mut out).unwrap(), Some(position(1)));
        assert_eq!(commits.answered(&mut out).unwrap(), None);
        assert_eq!(commits.take(&mut out).unwrap(), None);
    }

    #[test]
    fn a_sink_that_does_not_open_on_its_thread_fails_the_start() {
        let subject = Template::parse("t").unwrap();
        let open = || -> Result<Box<dyn Sink>, Error> { Err(Error::permanent("no such stream")) };
        std::thread::scope(|s| {
            let e = Delivery::spawn(s, open, "p", &subject, 2).err().unwrap();
            assert_eq!(e.msg, "no such stream");
        });
    }

    #[test]
    fn a_backlog_is_committed_every_interval_and_at_once_after_a_failed_read() {
        let sink = MemorySink::default();
        let mut s = sink.clone();
        let mut out = here(&mut s, 100);
        let t0 = Instant::now();
        let mut commits = Commits::new(t0);
        assert!(!commits.due(t0 + COMMIT_EVERY, true), "nothing delivered");
        decode(&mut out, &[row(1, 1)]).unwrap();
        commits.delivered(&mut out).unwrap();
        assert!(!commits.due(t0 + COMMIT_EVERY / 2, false));
        assert!(commits.due(t0 + COMMIT_EVERY / 2, true));
        assert!(commits.due(t0 + COMMIT_EVERY, false));
        commits.take(&mut out).unwrap();
        commits.committed(t0 + COMMIT_EVERY);
        decode(&mut out, &[row(2, 1)]).unwrap();
        commits.delivered(&mut out).unwrap();
        assert!(!commits.due(t0 + COMMIT_EVERY * 3 / 2, false));
        assert!(commits.due(t0 + COMMIT_EVERY * 2, false));
        // Caught up or stopping: committed whenever it is taken.
        assert_eq!(commits.take(&mut out).unwrap(), Some(position(2)));
    }

    #[test]
    fn caught_up_the_offset_is_committed_at_most_every_interval_and_the_wait_ends_when_due() {
        let sink = MemorySink::default();
        let mut s = sink.clone();
        let mut out = here(&mut s, 100);
        let t0 = Instant::now();
        let mut commits = Commits::new(t0);
        let ms = Duration::from_millis;
        // Nothing pending: the idle wait is not cut short.
        assert_eq!(commits.until_due(t0), None);
        // One event per wake-up: none is committed before the interval.
        for (i, at) in [10, 100, 200].into_iter().enumerate() {
            decode(&mut out, &[row(i as i64 + 1, 1)]).unwrap();
            commits.delivered(&mut out).unwrap();
            assert!(!commits.due(t0 + ms(at), false));
            assert_eq!(commits.until_due(t0 + ms(at)), Some(COMMIT_EVERY - ms(at)));
        }
        // Then the wait ends and the commit is due: all three at once.
        assert_eq!(commits.until_due(t0 + COMMIT_EVERY), Some(Duration::ZERO));
        assert!(commits.due(t0 + COMMIT_EVERY + ms(1), false));
        assert_eq!(commits.take(&mut out).unwrap(), Some(position(3)));
        commits.committed(t0 + COMMIT_EVERY + ms(1));
        assert_eq!(commits.until_due(t0 + COMMIT_EVERY * 2), None);
        // The interval counts from that commit.
        decode(&mut out, &[row(4, 1)]).unwrap();
        commits.delivered(&mut out).unwrap();
        assert!(!commits.due(t0 + COMMIT_EVERY * 2, false));
        assert!(commits.due(t0 + COMMIT_EVERY * 2 + ms(1), false));
        assert_eq!(sink.get().acked.len(), 4);
    }

    #[test]
    fn a_leased_batch_goes_out_in_growing_slices_and_not_at_all_once_the_lease_is_lost() {
        let sink = MemorySink::default();
        let mut s = sink.clone();
        let lost = Arc::new(AtomicBool::new(false));
        let mut publisher = Publisher::new(&mut s, "p");
        publisher.lease(lost.clone(), 1000);
        let mut out = Delivery::new(publisher, 1000);
        decode(&mut out, &[row(1, 200)]).unwrap();
        out.publish().unwrap();
        // Slices of 64 events at first, growing while the sink is fast
        // (doubling each time unless a slice took over 250 ms).
        let calls = sink.get().calls.clone();
        assert_eq!((calls[0], calls.iter().sum::<usize>()), (64, 200));
        assert!(calls[1] >= 64, "{calls:?}");
        decode(&mut out, &[row(2, 10)]).unwrap();
        lost.store(true, Ordering::Relaxed);
        let e = out.publish().unwrap_err();
        assert!(e.msg.contains("lost the lease"), "{e}");
        assert_eq!(e.class, crate::error::Class::Transient);
        assert_eq!(sink.get().calls.len(), calls.len());
        // Given up, the batch is leased and published again.
        out.discard();
        lost.store(false, Ordering::Relaxed);
        decode(&mut out, &[row(2, 10)]).unwrap();
        out.finish().unwrap();
        assert_eq!(sink.get().acked.len(), 210);
    }

    #[test]
    fn reads_that_find_many_rows_are_paced_more_and_a_trickle_stays_at_the_short_pace() {
        assert_eq!(read_pace(1), READ_PACE);
        // 1,000 events/s read at the busy pace find about 4: back to 1 ms.
        assert_eq!(read_pace(4), READ_PACE);
        assert_eq!(read_pace(BUSY_ROWS), BUSY_PACE);
        assert_eq!(read_pace(1_000_000), BUSY_PACE);
    }

    #[test]
    fn rows_held_back_are_looked_at_again_soon_then_less_often() {
        let mut held = Held::new();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert!(!held.held(t0, "forward-test-held"));
        let waits: Vec<Duration> = [0, 2, 40, 100, 400, 800, 10_000]
            .iter()
            .map(|&after| held.next_wait(t0 + ms(after)))
            .collect();
        assert_eq!(
            waits,
            [ms(1), ms(1), ms(10), ms(25), ms(100), ms(200), ms(200)]
        );
        held.clear("forward-test-held");
        assert_eq!(held.next_wait(t0 + ms(10_000)), ms(1));
    }

    #[test]
    fn the_holder_is_looked_up_only_when_rows_stay_held() {
        let mut held = Held::new();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let p = "forward-test-holder";
        // A hold of a writer's transaction's length: no lookup.
        assert!(!held.held(t0, p));
        assert!(!held.held(t0 + ms(3), p));
        held.clear(p);
        // A longer one: looked up after HOLDER_LOOKUP, then that often.
        let t1 = t0 + ms(10);
        let looked: Vec<u64> = (0..=1000)
            .step_by(10)
            .filter(|&after| held.held(t1 + ms(after), p))
            .collect();
        assert_eq!(looked, [250, 500, 750, 1000]);
        held.clear(p);
        assert!(!held.held(t1 + ms(1010), p));
    }
}
