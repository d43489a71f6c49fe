//! The reverse loop: source → inbox.
//!
//! Receive a batch (up to `batch_size` messages or `max_wait_ms`), insert it
//! into the inbox in one transaction, and only then acknowledge it to the
//! source. A failed insert acknowledges nothing: the batch is kept and
//! written again once PostgreSQL is back (and a broker would redeliver).

use crate::config::Reverse;
use crate::health;
use crate::inbox::Inbox;
use crate::metrics;
use crate::pipeline::Ctx;
use crate::retry::Error;
use crate::source::{Batch, Source};

/// What outlives a session (a lost connection): the open source and a
/// batch received but not yet written.
#[derive(Default)]
pub struct State {
    source: Option<Box<dyn Source>>,
    pending: Option<Batch>,
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
    log::info!("receiving into inbox {}", inbox.name);
    health::set(&ctx.name, ctx.direction, health::State::Running);
    let consumed = metrics::get().consumed.with_label_values(&[&ctx.name]);
    loop {
        let batch = match state.pending.take() {
            Some(b) => b,
            None if ctx.stopping() => return Ok(()),
            None => {
                let mut b = source.receive(cfg.batch_size, cfg.max_wait)?;
                b.messages.iter_mut().for_each(|m| m.make_storable());
                b
            }
        };
        if !batch.messages.is_empty() {
            let new = match inbox.write(&mut client, &batch.messages) {
                Ok(n) => n,
                Err(e) => {
                    state.pending = Some(batch);
                    return Err(e.context(format!("writing into inbox {}", inbox.name)));
                }
            };
            source.ack()?;
            consumed.inc_by(batch.messages.len() as u64);
            log::debug!(
                "{} messages into {} ({new} new, {} duplicates)",
                batch.messages.len(),
                inbox.name,
                batch.messages.len() as u64 - new
            );
        }
        health::ok(&ctx.name, 0.0);
        if batch.end_of_input {
            log::info!("end of input");
            return Ok(());
        }
    }
}
