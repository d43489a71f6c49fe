//! The reverse loop: source → inbox.
//!
//! Receive a batch (up to `batch_size` messages or `max_wait_ms`), insert it
//! into the inbox, and only then acknowledge it to the source. A failed
//! insert acknowledges nothing: the batch is kept and written again once
//! PostgreSQL is back (and a broker would redeliver). A message PostgreSQL
//! refuses for good becomes a dead letter (see [`Inbox::write`]); a receive
//! that fails half way writes what it received before reporting the error.
//! A source that keeps its position in this database (it has no broker to
//! acknowledge to) records it in the transaction that writes the batch.
//!
//! The rules are in [`ReverseLoop::turn`], which unit tests drive with a
//! source and an inbox in memory; the SQL is behind [`Writer`].

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
/// the batch it received and not yet written.
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
    let mut lp = ReverseLoop {
        feed,
        inbox: &inbox.name,
        batch_size: cfg.batch_size,
        max_wait: cfg.max_wait,
        consumed: metrics::get().consumed.with_label_values(&[&ctx.name]),
    };
    let mut writer = Postgres {
        client: &mut client,
        inbox: &inbox,
    };
    loop {
        if lp.may_stop() && ctx.stopping() {
            return Ok(());
        }
        let turn = lp.turn(&mut writer)?;
        health::ok(&ctx.name, 0.0);
        if turn == Turn::EndOfInput {
            log::info!("end of input");
            return Ok(());
        }
    }
}

/// How a turn of the reverse loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// A batch (maybe empty) was written and acknowledged; go on.
    Written,
    /// The source has no more messages, ever.
    EndOfInput,
}

/// The reverse loop of one session: a source with the batch it holds, and
/// where the batches go.
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
}

impl ReverseLoop<'_> {
    /// Whether the loop may stop now: not while it holds a batch received
    /// and not yet written (stopping would lose the acknowledgement).
    fn may_stop(&self) -> bool {
        !self.feed.holds()
    }

    /// One batch: take the batch to write (the one a failed write kept,
    /// else a new one from the source), write it into the inbox, and only
    /// then acknowledge it to the source. A failed write acknowledges
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
        let new = if record {
            let mut tx = writer.begin()?;
            let new = match n {
                0 => 0,
                _ => tx.write(messages).map_err(context)?,
            };
            tx.record(self.feed)?;
            tx.commit()?;
            new
        } else if n > 0 {
            writer.write(messages).map_err(context)?
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
        if let Some(e) = error {
            return Err(e);
        }
        Ok(if end_of_input {
            Turn::EndOfInput
        } else {
            Turn::Written
        })
    }
}

/// Where the reverse loop writes: the inbox in PostgreSQL ([`Postgres`]),
/// or memory in unit tests.
pub trait Writer {
    /// A transaction open on the inbox.
    type Tx<'w>: WriterTx
    where
        Self: 'w;
    /// Write `messages` (each insert its own transaction); how many were new.
    fn write(&mut self, messages: &mut [Message]) -> Result<u64, Error>;
    /// Open a transaction: for a batch whose receipts are recorded in it.
    fn begin(&mut self) -> Result<Self::Tx<'_>, Error>;
}

/// A transaction of a [`Writer`].
pub trait WriterTx {
    /// Write `messages` in it; how many were new.
    fn write(&mut self, messages: &mut [Message]) -> Result<u64, Error>;
    /// Record in it the receipts of the batch `feed` handed out last.
    fn record(&mut self, feed: &mut dyn Feed) -> Result<(), Error>;
    /// Commit it.
    fn commit(self) -> Result<(), Error>;
}

/// The inbox in PostgreSQL.
struct Postgres<'c> {
    client: &'c mut Client,
    inbox: &'c Inbox,
}

impl Writer for Postgres<'_> {
    type Tx<'w>
        = PostgresTx<'w>
    where
        Self: 'w;

    fn write(&mut self, messages: &mut [Message]) -> Result<u64, Error> {
        self.inbox.write(self.client, messages)
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
    fn write(&mut self, messages: &mut [Message]) -> Result<u64, Error> {
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
    use crate::testkit::{MemoryInbox, MemorySource};

    fn reverse_loop(feed: &mut dyn Feed, batch_size: usize) -> ReverseLoop<'_> {
        ReverseLoop {
            feed,
            inbox: "public.events",
            batch_size,
            max_wait: Duration::ZERO,
            consumed: metrics::get().consumed.with_label_values(&["reverse-test"]),
        }
    }

    #[test]
    fn a_failed_inbox_write_acknowledges_nothing_and_keeps_the_batch() {
        let source = MemorySource::default();
        let mut feed = source.feed(&["a", "b", "c"]);
        let mut lp = reverse_loop(feed.as_mut(), 10);
        let mut inbox = MemoryInbox {
            fail_writes: 1,
            ..MemoryInbox::default()
        };
        let e = lp.turn(&mut inbox).unwrap_err();
        assert!(
            e.msg.starts_with("writing into inbox public.events: "),
            "{e}"
        );
        assert!(source.0.borrow().acked.is_empty());
        assert!(!lp.may_stop(), "a batch is held: stopping would lose it");
        // The next turn (the next session, too) writes the batch it kept,
        // receiving nothing new, and only then acknowledges it.
        assert_eq!(lp.turn(&mut inbox).unwrap(), Turn::Written);
        assert_eq!(inbox.rows.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(source.0.borrow().acked, ["a", "b", "c"]);
        assert_eq!(source.0.borrow().receives, 1);
        assert!(lp.may_stop());
    }

    #[test]
    fn a_receive_failing_half_way_writes_and_acknowledges_what_came_before_it() {
        let source = MemorySource::default();
        source.0.borrow_mut().fail_after = Some(2);
        let mut feed = source.feed(&["a", "b", "c"]);
        let mut lp = reverse_loop(feed.as_mut(), 10);
        let mut inbox = MemoryInbox::default();
        let e = lp.turn(&mut inbox).unwrap_err();
        assert_eq!(e.msg, "memory source: receive failed");
        assert_eq!(inbox.rows.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(source.0.borrow().acked, ["a", "b"]);
        assert_eq!(lp.turn(&mut inbox).unwrap(), Turn::Written);
        assert_eq!(source.0.borrow().acked, ["a", "b", "c"]);
    }

    #[test]
    fn only_written_batches_are_acknowledged_and_the_end_of_input_ends_the_loop() {
        let source = MemorySource::default();
        source.0.borrow_mut().ends = true;
        let mut feed = source.feed(&["a", "b", "c"]);
        let mut lp = reverse_loop(feed.as_mut(), 2);
        let mut inbox = MemoryInbox::default();
        assert_eq!(lp.turn(&mut inbox).unwrap(), Turn::Written);
        assert_eq!(source.0.borrow().acked, ["a", "b"]);
        inbox.fail_writes = 1;
        assert!(lp.turn(&mut inbox).is_err());
        assert_eq!(source.0.borrow().acked, ["a", "b"]);
        assert_eq!(lp.turn(&mut inbox).unwrap(), Turn::EndOfInput);
        assert_eq!(source.0.borrow().acked, ["a", "b", "c"]);
        assert_eq!(inbox.rows.len(), 3);
    }
}
