//! The reverse loop: source → inbox.
//!
//! Receive a batch (up to `batch_size` messages or `max_wait_ms`), insert it
//! into the inbox, and only then acknowledge it to the source. The insert
//! runs on a writer thread of its own, which owns the PostgreSQL
//! connection: while it writes a full batch (a backlog), the loop receives
//! the next one, so at most two batches are held. A failed insert acknowledges nothing: the
//! batch is kept and written again once PostgreSQL is back (and a broker
//! would redeliver), before the one received meanwhile. A message
//! PostgreSQL refuses for good becomes a dead letter (see [`Inbox::write`]);
//! a receive that fails half way writes what it received before reporting
//! the error. A source that keeps its position in this database (it has no
//! broker to acknowledge to) records it in the transaction that writes the
//! batch: its batches are written one after the other, on the loop's thread.
//!
//! The rules are in [`ReverseLoop::turn`], which unit tests drive with a
//! source and an inbox in memory; the SQL is behind [`Writer`].

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::Scope;
use std::time::Duration;

use postgres::{Client, Transaction};
use prometheus::IntCounter;

use crate::config::Reverse;
use crate::error::Error;
use crate::health;
use crate::inbox::Inbox;
use crate::metrics;
use crate::pipeline::Ctx;
use crate::source::{Feed, Message, Next};

/// What outlives a session (a lost connection): the open source, with
/// the batches it received and not yet written.
#[derive(Default)]
pub struct State {
    source: Option<Box<dyn Feed>>,
}

/// Run the pipeline until stopped, its input ends, or an error.
pub fn session(ctx: &Ctx, cfg: &Reverse, state: &mut State) -> Result<(), Error> {
    let mut client = ctx.connect()?;
    if !ctx.lock(&mut client)? {
        return Ok(());
    }
    let inbox = Inbox::open(&mut client, &cfg.inbox, cfg.schema.as_deref())?;
    if state.source.is_none() {
        state.source = Some(cfg.source.open(&ctx.name, ctx.once)?);
    }
    let feed = state.source.as_deref_mut().expect("opened above");
    feed.resume(&mut client, ctx)?;
    log::info!("receiving into inbox {}", inbox.name);
    health::started(&ctx.name, ctx.direction.as_str());
    let stopping = || ctx.stopping();
    let mut lp = ReverseLoop {
        feed,
        inbox: &inbox.name,
        batch_size: cfg.batch_size,
        max_wait: cfg.max_wait,
        consumed: metrics::get().consumed.with_label_values(&[&ctx.name]),
        stopping: &stopping,
    };
    let mut pg = Postgres {
        client: &mut client,
        inbox: &inbox,
        written: None,
    };
    if lp.feed.records() {
        return lp.run(&mut pg, &ctx.name);
    }
    std::thread::scope(|s| {
        let mut writer = Background::spawn(s, &ctx.name, pg)?;
        lp.run(&mut writer, &ctx.name)
    })
}

/// How a turn of the reverse loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// A batch (maybe empty) was written and acknowledged; go on.
    Written,
    /// The source has no more messages, ever.
    EndOfInput,
}

/// The reverse loop of one session: a source with the batches it holds,
/// and where the batches go.
struct ReverseLoop<'a> {
    /// The source.
    feed: &'a mut dyn Feed,
    /// The inbox's name, for errors and the log.
    inbox: &'a str,
    /// Messages per inbox transaction.
    batch_size: usize,
    /// How long to wait to fill a batch.
    max_wait: Duration,
    /// Messages written (the `consumed` metric).
    consumed: IntCounter,
    /// Whether the pipeline is asked to stop: then no batch is received
    /// ahead, so the loop can stop as soon as what it holds is written.
    stopping: &'a dyn Fn() -> bool,
}

impl ReverseLoop<'_> {
    /// Turns until stopped (with nothing held), the end of input, or an
    /// error.
    fn run<W: Writer>(&mut self, writer: &mut W, pipeline: &str) -> Result<(), Error> {
        loop {
            if self.may_stop() && (self.stopping)() {
                return Ok(());
            }
            let turn = self.turn(writer)?;
            health::ok(pipeline, 0.0);
            if turn == Turn::EndOfInput {
                log::info!("end of input");
                return Ok(());
            }
        }
    }

    /// Whether the loop may stop now: not while it holds a batch received
    /// and not yet written (stopping would lose the acknowledgement).
    fn may_stop(&self) -> bool {
        !self.feed.holds()
    }

    /// One batch: take the batch to write (the oldest one held: a failed
    /// write kept it, or it was received during the last turn; else a new
    /// one from the source), start writing it into the inbox, receive the
    /// next batch meanwhile (when this one is full: a backlog; not when it
    /// ended the input or receiving, or the pipeline is stopping), and once
    /// the write committed,
    /// acknowledge the batch to the source. A failed write acknowledges
    /// nothing and keeps the batch (Err). An error that ended receiving
    /// early is reported (Err) once what was received before it is written
    /// and acknowledged.
    fn turn<W: Writer>(&mut self, writer: &mut W) -> Result<Turn, Error> {
        let Next {
            messages,
            end_of_input,
            error,
            record,
        } = self.feed.next(self.batch_size, self.max_wait)?;
        let n = messages.len();
        let inbox = self.inbox;
        let context = |e: Error| e.context(format!("writing into inbox {inbox}"));
        let mut ahead = None;
        let new = if record {
            let mut tx = writer.begin()?;
            let new = match n {
                0 => 0,
                _ => tx.write(&messages).map_err(context)?,
            };
            tx.record(self.feed)?;
            tx.commit()?;
            new
        } else if n > 0 {
            writer.start(messages)?;
            // A full batch means a backlog: the next one is there to be
            // received. Otherwise the source has caught up, and waiting for
            // its next message would only hold back this batch's
            // acknowledgement (an HTTP sender's answer, say).
            if n >= self.batch_size && !end_of_input && error.is_none() && !(self.stopping)() {
                ahead = self
                    .feed
                    .receive_ahead(self.batch_size, self.max_wait)
                    .err();
            }
            writer.finish().map_err(context)?
        } else {
            0
        };
        if n > 0 {
            log::debug!(
                "{n} messages into {inbox} ({new} new, {} duplicates)",
                n as u64 - new
            );
        }
        self.feed.written()?;
        self.consumed.inc_by(n as u64);
        if let Some(e) = error.or(ahead) {
            return Err(e);
        }
        Ok(if end_of_input {
            Turn::EndOfInput
        } else {
            Turn::Written
        })
    }
}

/// Writes batches into the inbox, each insert its own transaction:
/// PostgreSQL ([`Postgres`]), or memory in unit tests.
pub trait Write: Send {
    /// Write `messages`; how many were new.
    fn write(&mut self, messages: &[Message]) -> Result<u64, Error>;
}

/// Where the reverse loop writes: a batch's write is started, then
/// awaited, so the loop can receive the next batch meanwhile.
pub trait Writer {
    /// A transaction open on the inbox.
    type Tx<'w>: WriterTx
    where
        Self: 'w;
    /// Start writing `messages` (each insert its own transaction).
    fn start(&mut self, messages: Arc<Vec<Message>>) -> Result<(), Error>;
    /// Wait for the write started last; how many messages were new.
    fn finish(&mut self) -> Result<u64, Error>;
    /// Open a transaction: for a batch whose receipts are recorded in it.
    fn begin(&mut self) -> Result<Self::Tx<'_>, Error>;
}

/// A transaction of a [`Writer`].
pub trait WriterTx {
    /// Write `messages` in it; how many were new.
    fn write(&mut self, messages: &[Message]) -> Result<u64, Error>;
    /// Record in it the receipts of the batch `feed` handed out last.
    fn record(&mut self, feed: &mut dyn Feed) -> Result<(), Error>;
    /// Commit it.
    fn commit(self) -> Result<(), Error>;
}

/// A [`Write`] on a thread of its own, one batch at a time: the loop
/// receives the next batch while it writes.
pub struct Background {
    /// Batches to write.
    jobs: SyncSender<Arc<Vec<Message>>>,
    /// Their results, in order.
    done: Receiver<Result<u64, Error>>,
}

impl Background {
    /// Start the writer thread of pipeline `pipeline` in `scope`, writing
    /// with `w`; it ends when the [`Background`] is dropped.
    pub fn spawn<'s, W: Write + 's>(
        scope: &'s Scope<'s, '_>,
        pipeline: &str,
        mut w: W,
    ) -> Result<Background, Error> {
        let (jobs, todo) = sync_channel::<Arc<Vec<Message>>>(1);
        let (results, done) = sync_channel(1);
        let name = pipeline.to_string();
        std::thread::Builder::new()
            .name(format!("inbox {pipeline}"))
            .spawn_scoped(scope, move || {
                crate::logging::set_pipeline(&name);
                for batch in todo {
                    let r = w.write(&batch);
                    drop(batch);
                    if results.send(r).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| Error::transient(format!("cannot start the inbox writer thread: {e}")))?;
        Ok(Background { jobs, done })
    }
}

/// What a writer thread that ended unexpectedly (a bug) leaves.
fn writer_gone() -> Error {
    Error::transient("the inbox writer thread ended")
}

impl Writer for Background {
    type Tx<'w> = NoTx;

    fn start(&mut self, messages: Arc<Vec<Message>>) -> Result<(), Error> {
        self.jobs.send(messages).map_err(|_| writer_gone())
    }

    fn finish(&mut self) -> Result<u64, Error> {
        self.done.recv().map_err(|_| writer_gone())?
    }

    fn begin(&mut self) -> Result<NoTx, Error> {
        // A source that records its receipts in the inbox transaction is
        // written on the loop's thread (see `session`).
        Err(Error::permanent(
            "the inbox writer thread has no transactions for the source",
        ))
    }
}

/// The transaction a [`Background`] writer never opens.
pub enum NoTx {}

impl WriterTx for NoTx {
    fn write(&mut self, _: &[Message]) -> Result<u64, Error> {
        match *self {}
    }

    fn record(&mut self, _: &mut dyn Feed) -> Result<(), Error> {
        match *self {}
    }

    fn commit(self) -> Result<(), Error> {
        match self {}
    }
}

/// The inbox in PostgreSQL: written on a [`Background`] thread, or on the
/// loop's own (a source that records its receipts in the transaction).
struct Postgres<'c> {
    client: &'c mut Client,
    inbox: &'c Inbox,
    /// The result of the write started last, on the loop's thread.
    written: Option<Result<u64, Error>>,
}

impl Write for Postgres<'_> {
    fn write(&mut self, messages: &[Message]) -> Result<u64, Error> {
        self.inbox.write(self.client, messages)
    }
}

impl Writer for Postgres<'_> {
    type Tx<'w>
        = PostgresTx<'w>
    where
        Self: 'w;

    fn start(&mut self, messages: Arc<Vec<Message>>) -> Result<(), Error> {
        self.written = Some(self.write(&messages));
        Ok(())
    }

    fn finish(&mut self) -> Result<u64, Error> {
        self.written.take().unwrap_or(Ok(0))
    }

    fn begin(&mut self) -> Result<PostgresTx<'_>, Error> {
        Ok(PostgresTx {
            tx: self.client.transaction()?,
            inbox: self.inbox,
        })
    }
}

/// A transaction on the inbox in PostgreSQL.
struct PostgresTx<'w> {
    tx: Transaction<'w>,
    inbox: &'w Inbox,
}

impl WriterTx for PostgresTx<'_> {
    fn write(&mut self, messages: &[Message]) -> Result<u64, Error> {
        self.inbox.write(&mut self.tx, messages)
    }

    fn record(&mut self, feed: &mut dyn Feed) -> Result<(), Error> {
        feed.record(&mut self.tx)
    }

    fn commit(self) -> Result<(), Error> {
        Ok(self.tx.commit()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    use crate::testkit::{MemoryInbox, MemorySource};

    fn reverse_loop<'a>(
        feed: &'a mut dyn Feed,
        batch_size: usize,
        stopping: &'a dyn Fn() -> bool,
    ) -> ReverseLoop<'a> {
        ReverseLoop {
            feed,
            inbox: "public.events",
            batch_size,
            max_wait: Duration::ZERO,
            consumed: metrics::get().consumed.with_label_values(&["reverse-test"]),
            stopping,
        }
    }

    /// Run `f` with a writer thread writing into `inbox`.
    fn with_writer<T>(inbox: &MemoryInbox, f: impl FnOnce(&mut Background) -> T) -> T {
        std::thread::scope(|s| {
            let mut w = Background::spawn(s, "reverse-test", inbox.clone()).unwrap();
            f(&mut w)
        })
    }

    fn rows(inbox: &MemoryInbox) -> Vec<String> {
        inbox.0.lock().unwrap().rows.keys().cloned().collect()
    }

    #[test]
    fn a_failed_inbox_write_acknowledges_nothing_and_keeps_the_batch() {
        let source = MemorySource::default();
        let mut feed = source.feed(&["a", "b", "c", "d"]);
        let mut lp = reverse_loop(feed.as_mut(), 2, &|| false);
        let inbox = MemoryInbox::default();
        inbox.0.lock().unwrap().fail_writes = 1;
        with_writer(&inbox, |w| {
            let e = lp.turn(w).unwrap_err();
            assert!(
                e.msg.starts_with("writing into inbox public.events: "),
                "{e}"
            );
            // The next batch was received while the first was written.
            assert_eq!(source.0.borrow().receives, 2);
            assert!(source.0.borrow().acked.is_empty());
            assert!(!lp.may_stop(), "batches are held: stopping would lose them");
        });
        // The next turns (the next session's, too) write the kept batch
        // first, receiving nothing new while two are held, then the other,
        // and acknowledge each only once written.
        with_writer(&inbox, |w| {
            assert_eq!(lp.turn(w).unwrap(), Turn::Written);
            assert_eq!(source.0.borrow().acked, ["a", "b"]);
            assert_eq!(source.0.borrow().receives, 2);
            assert_eq!(rows(&inbox), ["a", "b"]);
            assert_eq!(lp.turn(w).unwrap(), Turn::Written);
        });
        assert_eq!(rows(&inbox), ["a", "b", "c", "d"]);
        assert_eq!(source.0.borrow().acked, ["a", "b", "c", "d"]);
        assert_eq!(inbox.0.lock().unwrap().writes, [2, 2, 2]);
    }

    #[test]
    fn the_next_batch_is_received_while_one_is_written() {
        let source = MemorySource::default();
        let inbox = MemoryInbox::default();
        // Write k waits for receive k + 1: a loop that received only after
        // a write ended would never open it.
        let (signal, gate) = std::sync::mpsc::channel();
        source.0.borrow_mut().signal = Some(signal);
        source.0.borrow_mut().ends = true;
        inbox.0.lock().unwrap().gate = Some(gate);
        let mut feed = source.feed(&["a", "b", "c", "d", "e", "f"]);
        let mut lp = reverse_loop(feed.as_mut(), 2, &|| false);
        with_writer(&inbox, |w| {
            assert_eq!(lp.turn(w).unwrap(), Turn::Written);
            assert_eq!(source.0.borrow().acked, ["a", "b"]);
            assert_eq!(source.0.borrow().receives, 2);
            assert_eq!(lp.turn(w).unwrap(), Turn::Written);
            assert_eq!(source.0.borrow().acked, ["a", "b", "c", "d"]);
            assert_eq!(lp.turn(w).unwrap(), Turn::Written);
            // The end of input came with the batch received ahead.
            assert_eq!(lp.turn(w).unwrap(), Turn::EndOfInput);
        });
        assert_eq!(rows(&inbox), ["a", "b", "c", "d", "e", "f"]);
        assert_eq!(source.0.borrow().acked, ["a", "b", "c", "d", "e", "f"]);
        assert_eq!(inbox.0.lock().unwrap().writes, [2, 2, 2]);
        assert!(lp.may_stop());
    }

    #[test]
    fn a_receive_failing_half_way_writes_and_acknowledges_what_came_before_it() {
        let source = MemorySource::default();
        source.0.borrow_mut().fail_after = Some(2);
        let mut feed = source.feed(&["a", "b", "c"]);
        let mut lp = reverse_loop(feed.as_mut(), 10, &|| false);
        let inbox = MemoryInbox::default();
        with_writer(&inbox, |w| {
            let e = lp.turn(w).unwrap_err();
            assert_eq!(e.msg, "memory source: receive failed");
            // Nothing was received ahead: the error is reported first.
            assert_eq!(source.0.borrow().receives, 1);
            assert_eq!(rows(&inbox), ["a", "b"]);
            assert_eq!(source.0.borrow().acked, ["a", "b"]);
            assert_eq!(lp.turn(w).unwrap(), Turn::Written);
            assert_eq!(source.0.borrow().acked, ["a", "b", "c"]);
        });
    }

    #[test]
    fn a_receive_ahead_failing_is_reported_once_the_batch_before_it_is_acknowledged() {
        let source = MemorySource::default();
        let mut feed = source.feed(&["a", "b", "c", "d", "e"]);
        let mut lp = reverse_loop(feed.as_mut(), 2, &|| false);
        let inbox = MemoryInbox::default();
        with_writer(&inbox, |w| {
            assert_eq!(lp.turn(w).unwrap(), Turn::Written);
            // Failing half way while [c, d] is written: [e] is kept with
            // the error, written and acknowledged before it is reported.
            source.0.borrow_mut().fail_after = Some(1);
            assert_eq!(lp.turn(w).unwrap(), Turn::Written);
            assert_eq!(source.0.borrow().acked, ["a", "b", "c", "d"]);
            let e = lp.turn(w).unwrap_err();
            assert_eq!(e.msg, "memory source: receive failed");
            assert_eq!(source.0.borrow().acked, ["a", "b", "c", "d", "e"]);
            assert!(lp.may_stop());
        });
        let source = MemorySource::default();
        let mut feed = source.feed(&["a", "b", "c", "d"]);
        let mut lp = reverse_loop(feed.as_mut(), 2, &|| false);
        let inbox = MemoryInbox::default();
        with_writer(&inbox, |w| {
            assert_eq!(lp.turn(w).unwrap(), Turn::Written);
            // Failing before anything was received while [c, d] is
            // written: [c, d] is acknowledged, then the error reported.
            source.0.borrow_mut().fail_after = Some(0);
            let e = lp.turn(w).unwrap_err();
            assert_eq!(e.msg, "memory source: receive failed");
            assert_eq!(source.0.borrow().acked, ["a", "b", "c", "d"]);
            assert!(lp.may_stop());
        });
    }

    #[test]
    fn a_stop_writes_the_batch_received_ahead_and_receives_no_more() {
        let source = MemorySource::default();
        let mut feed = source.feed(&["a", "b", "c", "d", "e", "f"]);
        let stop = Cell::new(false);
        let stopping = || stop.get();
        let mut lp = reverse_loop(feed.as_mut(), 2, &stopping);
        let inbox = MemoryInbox::default();
        with_writer(&inbox, |w| {
            assert_eq!(lp.turn(w).unwrap(), Turn::Written);
            assert!(!lp.may_stop());
            stop.set(true);
            lp.run(w, "reverse-test").unwrap();
        });
        assert_eq!(source.0.borrow().receives, 2);
        assert_eq!(source.0.borrow().acked, ["a", "b", "c", "d"]);
        assert_eq!(rows(&inbox), ["a", "b", "c", "d"]);
        assert!(lp.may_stop());
    }

    #[test]
    fn only_written_batches_are_acknowledged_and_the_end_of_input_ends_the_loop() {
        let source = MemorySource::default();
        source.0.borrow_mut().ends = true;
        let mut feed = source.feed(&["a", "b", "c"]);
        let mut lp = reverse_loop(feed.as_mut(), 2, &|| false);
        let inbox = MemoryInbox::default();
        with_writer(&inbox, |w| {
            assert_eq!(lp.turn(w).unwrap(), Turn::Written);
            assert_eq!(source.0.borrow().acked, ["a", "b"]);
            assert_eq!(source.0.borrow().receives, 2);
            inbox.0.lock().unwrap().fail_writes = 1;
            assert!(lp.turn(w).is_err());
            assert_eq!(source.0.borrow().acked, ["a", "b"]);
            assert_eq!(lp.turn(w).unwrap(), Turn::EndOfInput);
        });
        assert_eq!(source.0.borrow().acked, ["a", "b", "c"]);
        assert_eq!(rows(&inbox).len(), 3);
    }

    #[test]
    fn nothing_is_received_ahead_of_a_batch_that_is_not_full() {
        // The source has caught up: the batch is acknowledged as soon as it
        // is written, without waiting for the next message.
        let source = MemorySource::default();
        let mut feed = source.feed(&["a", "b", "c"]);
        let mut lp = reverse_loop(feed.as_mut(), 5, &|| false);
        let inbox = MemoryInbox::default();
        with_writer(&inbox, |w| {
            assert_eq!(lp.turn(w).unwrap(), Turn::Written);
            assert_eq!(source.0.borrow().receives, 1);
            assert_eq!(source.0.borrow().acked, ["a", "b", "c"]);
            assert!(lp.may_stop());
        });
    }
}
