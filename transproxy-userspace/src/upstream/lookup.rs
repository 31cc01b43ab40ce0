//! The proxies' host names, resolved again while the daemon runs (every [`RECHECK`] and on
//! SIGHUP), so that a laptop that changes networks follows its proxies to their new addresses.

use std::{net::SocketAddr, time::Duration};

use anyhow::anyhow;
use tokio::sync::oneshot;
use tracing::debug;

use super::ProxyList;

/// How often the proxy's host name is resolved again.
pub(crate) const RECHECK: Duration = Duration::from_secs(60);

/// Why a lookup was made: the outcome of one asked for by SIGHUP is always reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Reason {
    Timer,
    Hangup,
}

/// What a lookup found for one proxy: the list's index of the proxy (among proxies, `direct`
/// not counted), its URL for log lines, and its addresses.
pub(crate) type Resolved = Vec<(usize, String, anyhow::Result<Vec<SocketAddr>>)>;

/// Lookups of the proxies' host names, one round at a time, each on a thread of its own: a resolver that
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
    /// Resolves the hosts of `proxies` on a thread, or once the running lookup ends. A proxy
    /// named by address has nothing to resolve.
    pub(crate) fn start(&mut self, proxies: &ProxyList, reason: Reason) {
        let named: Vec<(usize, super::ProxyUrl)> = proxies
            .proxies()
            .enumerate()
            .filter(|(_, proxy)| !proxy.named_by_address())
            .map(|(i, proxy)| (i, proxy.clone()))
            .collect();
        if named.is_empty() {
            return;
        }
        if self.running.is_some() {
            self.again = self.again.max(Some(reason));
            return;
        }
        let (answer, answered) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("transproxy-lookup".into())
            .spawn(move || {
                let resolved = named
                    .into_iter()
                    .map(|(i, proxy)| (i, proxy.to_string(), proxy.resolve()))
                    .collect();
                let _ = answer.send(resolved);
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
        let resolved = answered.await.unwrap_or_else(|_| {
            debug!("{}", anyhow!("the lookup ended without an answer"));
            Vec::new()
        });
        let reason = *reason;
        self.running = None;
        (reason, resolved)
    }

    /// Starts the lookup asked for while the last one ran, if any.
    pub(crate) fn start_again(&mut self, proxies: &ProxyList) {
        if let Some(reason) = self.again.take() {
            self.start(proxies, reason);
        }
    }
}
