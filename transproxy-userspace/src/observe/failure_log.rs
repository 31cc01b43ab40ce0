//! Per-connection failure lines, limited so that a process in the cgroup cannot flood the
//! journal.
//!
//! Any process of the cgroup decides how many connections fail and to where, so logging every
//! failure would let it write to the journal at will. Within each [`WINDOW`], the first failure
//! to each destination is logged, up to [`LINES_PER_WINDOW`] lines in all; the rest are counted
//! and summed up in one line when the window ends. Debug logging (`RUST_LOG=debug`) is opt-in
//! and not limited.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use tracing::warn;

/// How long one budget of lines lasts.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);

/// Most failure lines per window, whatever the destinations.
const LINES_PER_WINDOW: usize = 20;

/// Most destinations remembered per window; beyond, failures are counted, not logged.
const DESTINATIONS_PER_WINDOW: usize = 4_096;

/// The limit, shared by every worker.
pub(crate) struct FailureLog {
    state: Mutex<Window>,
}

struct Window {
    started: Instant,
    /// Destinations logged (or counted) in this window.
    seen: HashSet<SocketAddr>,
    logged: usize,
    /// Failures not logged, and to how many destinations.
    held_back: u64,
    held_back_dsts: HashSet<SocketAddr>,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            seen: HashSet::new(),
            logged: 0,
            held_back: 0,
            held_back_dsts: HashSet::new(),
        }
    }

    /// The summary of what was held back, if anything was.
    fn summary(&self) -> Option<String> {
        (self.held_back > 0).then(|| {
            format!(
                "{} more connection failure{} to {} destination{} in the last {}s were not logged one by one",
                self.held_back,
                if self.held_back == 1 { "" } else { "s" },
                self.held_back_dsts.len(),
                if self.held_back_dsts.len() == 1 { "" } else { "s" },
                self.started.elapsed().as_secs().max(1),
            )
        })
    }
}

impl Default for FailureLog {
    fn default() -> Self {
        Self {
            state: Mutex::new(Window::new(Instant::now())),
        }
    }
}

impl FailureLog {
    /// Whether a failure to `dst` may be logged now; if not, it is counted for the summary.
    pub(crate) fn admit(&self, dst: SocketAddr) -> bool {
        let now = Instant::now();
        let mut window = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now.duration_since(window.started) >= WINDOW {
            if let Some(summary) = window.summary() {
                warn!("{summary}");
            }
            *window = Window::new(now);
        }
        let first = window.seen.len() < DESTINATIONS_PER_WINDOW && window.seen.insert(dst);
        if first && window.logged < LINES_PER_WINDOW {
            window.logged += 1;
            return true;
        }
        window.held_back += 1;
        if window.held_back_dsts.len() < DESTINATIONS_PER_WINDOW {
            window.held_back_dsts.insert(dst);
        }
        false
    }

    /// Ends the window if it is over (or `at_exit`), logging the summary: called every
    /// [`WINDOW`], so that a burst is summed up even when no failure follows it, and at exit.
    pub(crate) fn flush(&self, at_exit: bool) {
        let now = Instant::now();
        let mut window = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if at_exit || now.duration_since(window.started) >= WINDOW {
            if let Some(summary) = window.summary() {
                warn!("{summary}");
            }
            *window = Window::new(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dst(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 2], port))
    }

    #[test]
    fn first_failure_per_destination_then_a_budget() {
        let log = FailureLog::default();
        assert!(log.admit(dst(1)));
        assert!(
            !log.admit(dst(1)),
            "a second failure to the same destination"
        );
        let admitted = (2..1_000).filter(|&port| log.admit(dst(port))).count();
        assert_eq!(admitted, LINES_PER_WINDOW - 1);
        let window = log.state.lock().unwrap();
        assert_eq!(window.held_back, 1 + 998 - (LINES_PER_WINDOW as u64 - 1));
        assert!(window.summary().unwrap().contains("to 980 destinations"));
    }

    #[test]
    fn a_new_window_starts_over() {
        let log = FailureLog::default();
        assert!(log.admit(dst(1)));
        assert!(!log.admit(dst(1)));
        log.state.lock().unwrap().started -= WINDOW;
        log.flush(false);
        assert!(log.admit(dst(1)));
        assert_eq!(log.state.lock().unwrap().held_back, 0);
    }
}
