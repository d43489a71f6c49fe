//! Process-wide signals: SIGTERM/SIGINT ask for a clean shutdown, SIGHUP for
//! a catalog reload. A closed stdout also asks for shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Flags set by signal handlers and read by the coordinator.
#[derive(Clone)]
pub struct Signals {
    /// Set by SIGTERM/SIGINT (or a closed stdout): stop everything cleanly.
    pub shutdown: Arc<AtomicBool>,
    /// Set by SIGHUP: re-read the catalog now.
    pub reload: Arc<AtomicBool>,
}

impl Signals {
    /// Install the handlers.
    pub fn install() -> std::io::Result<Signals> {
        let s = Signals {
            shutdown: Arc::new(AtomicBool::new(false)),
            reload: Arc::new(AtomicBool::new(false)),
        };
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        signal_hook::flag::register(SIGTERM, s.shutdown.clone())?;
        signal_hook::flag::register(SIGINT, s.shutdown.clone())?;
        signal_hook::flag::register(SIGHUP, s.reload.clone())?;
        Ok(s)
    }

    /// Whether shutdown was requested.
    pub fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// Take (and clear) a pending reload request.
    pub fn take_reload(&self) -> bool {
        self.reload.swap(false, Ordering::Relaxed)
    }
}
