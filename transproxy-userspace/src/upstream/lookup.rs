//! The proxy's host name, resolved again while the daemon runs (every [`RECHECK`] and on
//! SIGHUP), so that a laptop that changes networks follows its proxy to its new address.

use std::{net::SocketAddr, time::Duration};

use anyhow::anyhow;
use tokio::sync::oneshot;
use tracing::debug;

use super::ProxyUrl;

/// How often the proxy's host name is resolved again.
pub(crate) const RECHECK: Duration = Duration::from_secs(60);

/// Why a lookup was made: the outcome of one asked for by SIGHUP is always reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Reason {
    Timer,
    Hangup,
}

/// What a lookup found.
pub(crate) type Resolved = anyhow::Result<Vec<SocketAddr>>;

/// Lookups of the proxy's host name, one at a time, each on a thread of its own: a resolver that
/// hangs (no network) must hold up neither signals nor, at exit, the runtime's shutdown.
#[derive(Default)]
pub(crate) struct ProxyLookups {
    /// The lookup running, and why it was made.
    running: Option<(Reason, oneshot::Receiver<Resolved>)>,
    /// A lookup asked for while one was running: it starts when that one ends, so a SIGHUP
    /// after a network change never gets the answer of a lookup made before it.
    again: Option<Reason>,
}

impl ProxyLookups {
    /// Resolves `proxy`'s host on a thread, or once the running lookup ends. A proxy named by
    /// address has nothing to resolve.
    pub(crate) fn start(&mut self, proxy: &ProxyUrl, reason: Reason) {
        if proxy.named_by_address() {
            return;
        }
        if self.running.is_some() {
            self.again = self.again.max(Some(reason));
            return;
        }
        let (answer, answered) = oneshot::channel();
        let proxy = proxy.clone();
        let spawned = std::thread::Builder::new()
            .name("transproxy-lookup".into())
            .spawn(move || {
                let _ = answer.send(proxy.resolve());
            });
        match spawned {
            Ok(_) => self.running = Some((reason, answered)),
            Err(err) => debug!("cannot start a lookup of the proxy's host: {err}"),
        }
    }

    /// The outcome of the running lookup; never ready while none runs. Cancel-safe: the lookup
    /// stays running until its outcome has been returned.
    pub(crate) async fn finished(&mut self) -> (Reason, Resolved) {
        let Some((reason, answered)) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let resolved = answered
            .await
            .unwrap_or_else(|_| Err(anyhow!("the lookup ended without an answer")));
        let reason = *reason;
        self.running = None;
        (reason, resolved)
    }

    /// Starts the lookup asked for while the last one ran, if any.
    pub(crate) fn start_again(&mut self, proxy: &ProxyUrl) {
        if let Some(reason) = self.again.take() {
            self.start(proxy, reason);
        }
    }
}
