//! Whether a proxy of the list is worth trying. One that cannot be reached, or does not answer,
//! is skipped for `--proxy-skip` (30 s), so that tunnels go straight to the next one instead of
//! each waiting out its timeout; then the next tunnel tries it again. One line when it goes
//! down, one when it answers again: never one per tunnel.

use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use tracing::{info, warn};

/// A proxy's state, as status shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Tried by tunnels in its turn.
    Up,
    /// Failed; skipped until `retry_in` has passed (zero: the next tunnel tries it).
    Down { since: Duration, retry_in: Duration },
}

/// One proxy's health, shared by every tunnel.
pub(super) struct Health {
    down: Mutex<Option<Down>>,
    skip: Duration,
}

/// Since when a proxy has been failing, and until when it is skipped.
#[derive(Clone, Copy)]
struct Down {
    since: Instant,
    until: Instant,
}

impl Health {
    pub(super) fn new(skip: Duration) -> Self {
        Self {
            down: Mutex::new(None),
            skip,
        }
    }

    /// Whether tunnels should pass this proxy by for now.
    pub(super) fn skipped(&self) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|down| Instant::now() < down.until)
    }

    /// The proxy could not be reached or did not answer: skip it for a while. Logged when it
    /// was up until now.
    pub(super) fn failed(&self, proxy: &dyn std::fmt::Display, why: &dyn std::fmt::Display) {
        let now = Instant::now();
        let was_up = {
            let mut down = self.lock();
            let was_up = down.is_none();
            let since = down.map_or(now, |d| d.since);
            *down = Some(Down {
                since,
                until: now + self.skip,
            });
            was_up
        };
        if was_up {
            warn!(
                "proxy {proxy} is down ({why}): skipped for {}, the next in the list carries the tunnels",
                humantime::format_duration(self.skip)
            );
        }
    }

    /// The proxy answered: logged when it was down.
    pub(super) fn worked(&self, proxy: &dyn std::fmt::Display) {
        let was_down = self.lock().take();
        if let Some(down) = was_down {
            info!(
                "proxy {proxy} answers again, after {} down",
                humantime::format_duration(Duration::from_secs(down.since.elapsed().as_secs()))
            );
        }
    }

    /// Up, or down since when and for how much longer.
    pub(crate) fn state(&self) -> State {
        match *self.lock() {
            None => State::Up,
            Some(down) => {
                let now = Instant::now();
                State::Down {
                    since: now.saturating_duration_since(down.since),
                    retry_in: down.until.saturating_duration_since(now),
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Down>> {
        // A poisoned lock still holds a whole value: it is replaced whole.
        self.down.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_proxy_is_skipped_then_tried_again() {
        let health = Health::new(Duration::from_millis(50));
        assert_eq!(health.state(), State::Up);
        health.failed(&"p", &"refused");
        assert!(health.skipped());
        assert!(matches!(health.state(), State::Down { .. }));
        std::thread::sleep(Duration::from_millis(60));
        // Due again, but still down until it answers.
        assert!(!health.skipped());
        assert!(matches!(health.state(), State::Down { .. }));
        health.worked(&"p");
        assert_eq!(health.state(), State::Up);
    }
}
