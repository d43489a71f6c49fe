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

use crate::config::Reverse;
use crate::health;
use crate::inbox::Inbox;
use crate::metrics;
use crate::pipeline::Ctx;
use crate::retry::Error;
use crate::source::Feed;

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
    let source = state.source.as_mut().expect("opened above");
    source.resume(&mut client, ctx)?;
    log::info!("receiving into inbox {}", inbox.name);
    health::started(&ctx.name, ctx.direction);
    let consumed = metrics::get().consumed.with_label_values(&[&ctx.name]);
    loop {
        if !source.holds() && ctx.stopping() {
            return Ok(());
        }
        let next = source.next(cfg.batch_size, cfg.max_wait)?;
        let (n, end_of_input, error) = (next.messages.len(), next.end_of_input, next.error);
        let context = |e: Error| e.context(format!("writing into inbox {}", inbox.name));
        let new = if next.record {
            let mut tx = client.transaction()?;
            let new = match n {
                0 => 0,
                _ => inbox.write(&mut tx, next.messages).map_err(context)?,
            };
            source.record(&mut tx)?;
            tx.commit()?;
            new
        } else if n > 0 {
            inbox.write(&mut client, next.messages).map_err(context)?
        } else {
            0
        };
        if n > 0 {
            log::debug!(
                "{n} messages into {} ({new} new, {} duplicates)",
                inbox.name,
                n as u64 - new
            );
        }
        source.written()?;
        consumed.inc_by(n as u64);
        if let Some(e) = error {
            return Err(e);
        }
        health::ok(&ctx.name, 0.0);
        if end_of_input {
            log::info!("end of input");
            return Ok(());
        }
    }
}
