//! Test-only doubles for the loops' unit tests: a sink, a source and an
//! inbox in memory, each with a handle the test keeps to look inside and
//! to make the next call fail. (Tests of the sinks and sources themselves
//! run against real servers: see tests/.)

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::Error;
use crate::event::Event;
use crate::outbox::OutboxInfo;
use crate::reverse::Write;
use crate::sink::{Rejected, Sink};
use crate::source::{Batch, Feed, Message, Source};

/// A kit outbox `outbox_orders` of stream table `orders`, without deltas.
pub fn outbox_orders() -> OutboxInfo {
    OutboxInfo {
        stream_table: "orders".into(),
        table: "outbox_orders".into(),
        delta_table: None,
        has_txid: true,
        notifies: true,
        notifies_sleepers: false,
    }
}

/// What a [`MemorySink`] was given, and how it is to answer.
#[derive(Debug, Default)]
pub struct Destination {
    /// Dedup keys of the events acknowledged, in order.
    pub acked: Vec<String>,
    /// How many of them a flush made durable.
    pub flushed: usize,
    /// The size of every publish call.
    pub calls: Vec<usize>,
    /// Fail this many publish calls from now on (transiently).
    pub fail_publishes: usize,
    /// Fail the next flush.
    pub fail_flush: bool,
    /// Every flush takes this long (a file's fsync, a slow broker).
    pub flush_delay: std::time::Duration,
    /// Reject the events with these dedup keys for good, for this reason.
    pub reject: BTreeMap<String, String>,
}

/// A sink in memory; clones share one [`Destination`] (and may be sent
/// to a publisher thread).
#[derive(Debug, Default, Clone)]
pub struct MemorySink(Arc<Mutex<Destination>>);

impl MemorySink {
    /// Its destination, to look inside or to set how it answers.
    pub fn get(&self) -> MutexGuard<'_, Destination> {
        self.0.lock().unwrap()
    }
}

impl Sink for MemorySink {
    fn publish(&mut self, events: &[Event]) -> Result<Vec<Rejected>, Error> {
        let mut d = self.get();
        d.calls.push(events.len());
        if d.fail_publishes > 0 {
            d.fail_publishes -= 1;
            return Err(Error::transient("memory sink: publish failed"));
        }
        let mut rejected = Vec::new();
        for (index, e) in events.iter().enumerate() {
            match d.reject.get(&e.dedup_key) {
                Some(reason) => rejected.push(Rejected {
                    index,
                    reason: reason.clone(),
                }),
                None => d.acked.push(e.dedup_key.clone()),
            }
        }
        Ok(rejected)
    }

    fn flush(&mut self) -> Result<(), Error> {
        let delay = self.get().flush_delay;
        std::thread::sleep(delay);
        let mut d = self.get();
        if std::mem::take(&mut d.fail_flush) {
            return Err(Error::transient("memory sink: flush failed"));
        }
        d.flushed = d.acked.len();
        Ok(())
    }
}

/// A message with `id`, an empty JSON object as its payload.
pub fn message(id: &str) -> Message {
    Message {
        event_id: id.into(),
        event_type: None,
        source: None,
        aggregate_id: None,
        trace_id: None,
        payload: "{}".into(),
        error: None,
    }
}

/// What a [`MemorySource`] hands out, and what it was told.
#[derive(Debug, Default)]
pub struct Broker {
    /// Messages not yet received.
    pub queue: VecDeque<Message>,
    /// Event ids acknowledged, in order.
    pub acked: Vec<String>,
    /// How many times `receive` was called.
    pub receives: usize,
    /// Fail the next receive after it received this many messages.
    pub fail_after: Option<usize>,
    /// Report the end of input once the queue is empty.
    pub ends: bool,
    /// Told of every receive (see [`Rows::gate`]).
    pub signal: Option<Sender<()>>,
}

/// A source in memory (receipts: the event ids); clones share one [`Broker`].
#[derive(Debug, Default, Clone)]
pub struct MemorySource(pub Rc<RefCell<Broker>>);

impl MemorySource {
    /// A source holding messages with `ids`, open as the reverse loop sees it.
    pub fn feed(&self, ids: &[&str]) -> Box<dyn Feed> {
        self.0
            .borrow_mut()
            .queue
            .extend(ids.iter().map(|id| message(id)));
        crate::source::feed(self.clone())
    }
}

impl Source for MemorySource {
    type Receipt = String;

    fn receive(
        &mut self,
        batch: &mut Batch<String>,
        max: usize,
        _wait: Duration,
    ) -> Result<(), Error> {
        let mut b = self.0.borrow_mut();
        b.receives += 1;
        if let Some(s) = &b.signal {
            let _ = s.send(());
        }
        while batch.messages.len() < max {
            if b.fail_after == Some(batch.messages.len()) {
                b.fail_after = None;
                return Err(Error::transient("memory source: receive failed"));
            }
            let Some(m) = b.queue.pop_front() else {
                batch.end_of_input = b.ends;
                break;
            };
            batch.receipts.push(m.event_id.clone());
            batch.messages.push(m);
        }
        Ok(())
    }

    fn ack(&mut self, receipts: Vec<String>) -> Result<(), Error> {
        self.0.borrow_mut().acked.extend(receipts);
        Ok(())
    }
}

/// What a [`MemoryInbox`] holds, and how it is to answer.
#[derive(Debug, Default)]
pub struct Rows {
    /// Payloads by event id.
    pub rows: BTreeMap<String, String>,
    /// Fail this many writes from now on (transiently).
    pub fail_writes: usize,
    /// The sizes of the writes, in order (failed ones too).
    pub writes: Vec<usize>,
    /// When set, write number k (from 1) waits until k + 1 signals came
    /// on it (see [`Broker::signal`]), and fails after 10 s without them.
    pub gate: Option<Receiver<()>>,
    /// Signals seen on `gate` so far.
    pub signals: usize,
}

/// An inbox in memory: rows by `event_id`, written at most once each;
/// clones share one [`Rows`]. It can be written from another thread.
#[derive(Debug, Default, Clone)]
pub struct MemoryInbox(pub Arc<Mutex<Rows>>);

impl Write for MemoryInbox {
    fn write(&mut self, messages: &[Message]) -> Result<u64, Error> {
        let mut r = self.0.lock().unwrap();
        r.writes.push(messages.len());
        let k = r.writes.len();
        let Rows { gate, signals, .. } = &mut *r;
        if let Some(gate) = gate {
            while *signals <= k {
                gate.recv_timeout(Duration::from_secs(10))
                    .map_err(|_| Error::transient("memory inbox: gate not opened"))?;
                *signals += 1;
            }
        }
        if r.fail_writes > 0 {
            r.fail_writes -= 1;
            return Err(Error::transient("memory inbox: write failed"));
        }
        let mut new = 0;
        for m in messages {
            if !r.rows.contains_key(&m.event_id) {
                r.rows.insert(m.event_id.clone(), m.payload.clone());
                new += 1;
            }
        }
        Ok(new)
    }
}
