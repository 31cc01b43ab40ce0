//! One redirected connection, from accept to relay: where it was going, whether there is room,
//! the tunnel, what the client sees when there is none, the relay.
//!
//! A connection is tunnelled only if the kernel recorded its original destination; anything
//! else (someone connecting to the listener directly) is reset: the listener is not an open
//! relay. When the proxy cannot open the tunnel, the client is reset rather than closed, so it
//! sees a failed connection and not an empty answer.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{net::TcpStream, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    error_page,
    failure_log::FailureLog,
    kernel::{OriginalDsts, Refusals},
    relay::{self, Timeouts, reset},
    upstream::{NotOpened, TunnelError, Upstream},
};

/// Counters for the shutdown summary and for operators.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) accepted: AtomicU64,
    /// Connections without a kernel record, reset untouched.
    pub(crate) unmapped: AtomicU64,
    pub(crate) tunnelled: AtomicU64,
    /// Tunnels the proxy would not or could not open; the client was reset.
    pub(crate) failed_at_proxy: AtomicU64,
    /// Clients reset because `--max-tunnels` were already open.
    pub(crate) over_capacity: AtomicU64,
}

/// What every connection shares.
pub(crate) struct Tunnels {
    pub(crate) dsts: OriginalDsts,
    pub(crate) refusals: Refusals,
    pub(crate) upstream: Upstream,
    pub(crate) timeouts: Timeouts,
    /// One permit per open tunnel.
    pub(crate) capacity: Arc<Semaphore>,
    pub(crate) stats: Stats,
    /// Limits per-connection failure lines (any process of the cgroup can cause them).
    pub(crate) failures: FailureLog,
    /// Cancelled when the shutdown grace has run out: tunnels still relaying reset both ends,
    /// so that neither takes a cut transfer for a complete one.
    pub(crate) cut: CancellationToken,
}

impl Tunnels {
    /// One connection: find its destination, open the tunnel, relay.
    pub(crate) async fn handle(&self, mut client: TcpStream, peer: SocketAddr) {
        let dst = match self.dsts.take(peer) {
            Ok(Some(dst)) => dst,
            Ok(None) => {
                let count = self.stats.unmapped.fetch_add(1, Ordering::Relaxed) + 1;
                // Anyone may connect here: logged at 1, 2, 4, 8, ... so that cannot flood the log.
                if count.is_power_of_two() {
                    warn!(
                        "reset connection from {peer}: it was not redirected by transproxy (direct connections to the listener are not tunnelled; {count} so far)"
                    );
                }
                // A reset, not a FIN: a client whose record was lost must not take an empty
                // answer for a complete one.
                reset(&client);
                return;
            }
            Err(err) => {
                self.stats.unmapped.fetch_add(1, Ordering::Relaxed);
                warn!("reset connection from {peer}: cannot read its original destination: {err}");
                reset(&client);
                return;
            }
        };
        let Ok(_permit) = Arc::clone(&self.capacity).try_acquire_owned() else {
            let count = self.stats.over_capacity.fetch_add(1, Ordering::Relaxed) + 1;
            // Logged at 1, 2, 4, 8, ... so a flood cannot flood the log.
            if count.is_power_of_two() {
                warn!(
                    "{peer} -> {dst}: reset: --max-tunnels reached ({count} clients reset so far)"
                );
            }
            reset(&client);
            return;
        };
        // The proxy connection, once reached: kept here so that a cut can reset it, whatever
        // the tunnel is doing.
        let mut proxy = None;
        tokio::select! {
            () = self.tunnel(&mut client, &mut proxy, peer, dst) => {}
            () = self.cut.cancelled() => {
                debug!("{peer} -> {dst}: reset: cut at the end of the shutdown grace");
                reset(&client);
                if let Some(proxy) = &proxy {
                    reset(proxy);
                }
            }
        }
    }

    /// Opens the tunnel from `client` to `dst` and relays until it ends. The proxy connection
    /// goes into `proxy` as soon as it is reached.
    async fn tunnel(
        &self,
        client: &mut TcpStream,
        proxy: &mut Option<TcpStream>,
        peer: SocketAddr,
        dst: SocketAddr,
    ) {
        let tunnel = match self.upstream.open(client, dst, proxy).await {
            Ok(tunnel) => tunnel,
            Err(not_opened) => return self.not_opened(client, peer, dst, not_opened).await,
        };
        let Some(stream) = proxy.as_mut() else {
            return;
        };
        self.stats.tunnelled.fetch_add(1, Ordering::Relaxed);
        match relay::relay(client, stream, &tunnel.early_data, self.timeouts).await {
            Ok(moved) => debug!(
                "{peer} -> {dst}: closed after {} bytes up, {} down",
                moved.to_upstream + tunnel.went_ahead,
                moved.to_client
            ),
            Err(err) => {
                if self.failures.admit(dst) {
                    info!("{peer} -> {dst}: aborted: {err}");
                } else {
                    debug!("{peer} -> {dst}: aborted: {err}");
                }
                reset(client);
                reset(stream);
            }
        }
    }

    /// A tunnel that did not open: says why, remembers a destination the proxy reports
    /// refused, and answers the client with a reset (or the proxy's page, with
    /// `--on-proxy-error=http`).
    async fn not_opened(
        &self,
        client: &mut TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        NotOpened { error, ahead }: NotOpened,
    ) {
        let logged = self.failures.admit(dst);
        if let TunnelError::ClientFailed(_) = error {
            // Gone before the tunnel opened: nothing the proxy did.
            if logged {
                info!("{peer} -> {dst}: {error}");
            } else {
                debug!("{peer} -> {dst}: {error}");
            }
            reset(client);
            return;
        }
        self.stats.failed_at_proxy.fetch_add(1, Ordering::Relaxed);
        // A proxy that drops bytes sent ahead of its reply can fail like this.
        let hint = if ahead.is_empty() || matches!(error, TunnelError::Rejected(_)) {
            ""
        } else {
            " (the client's bytes went ahead of the reply; --wait-for-reply holds them back)"
        };
        if logged {
            warn!("{peer} -> {dst}: {error}{hint}");
        } else {
            debug!("{peer} -> {dst}: {error}{hint}");
        }
        if let TunnelError::Rejected(rejection) = &error {
            if rejection.destination_unreachable() {
                self.refusals.record(dst);
            }
            if self.upstream.keeps_error_pages()
                && error_page::show(client, &ahead, rejection).await
            {
                return;
            }
        }
        reset(client);
    }
}
