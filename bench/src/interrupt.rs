//! Ctrl-C (and SIGTERM) stop the benchmark between two measurements instead of killing it, so
//! every guard (iptables rules, cgroups, processes) is dropped and cleans up.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::bail;

/// Set by the signal handler; read between measurements.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Only stores a flag: the one thing a signal handler may safely do.
extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to the flag. Children started from a terminal still receive the
/// terminal's SIGINT themselves and end, which is what ends a running measurement early.
pub(crate) fn install() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler is async-signal-safe (one atomic store).
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Whether a stop was asked for (for bounded waits that should give up early).
pub(crate) fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error once a stop was asked for: `?` then unwinds through every guard.
pub(crate) fn check() -> anyhow::Result<()> {
    if requested() {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}
