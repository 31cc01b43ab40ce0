//! Where redirected connections are accepted, one task each.
//!
//! A connection is tunnelled only if the kernel recorded its original destination; anything
//! else (someone connecting to the listener directly) is closed: the listener is not an open
//! relay. When the proxy cannot open the tunnel, the client is reset rather than closed, so it
//! sees a failed connection and not an empty answer.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{original_dst::OriginalDsts, relay, tunnel::Upstream};

/// Counters for the shutdown summary and for operators.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    /// Connections without a kernel record, closed untouched.
    pub unmapped: AtomicU64,
    pub tunnelled: AtomicU64,
    /// Tunnels the proxy would not or could not open; the client was reset.
    pub refused: AtomicU64,
}

/// Everything a connection task needs, shared by all of them.
pub struct Listener {
    pub tcp: TcpListener,
    pub dsts: Arc<OriginalDsts>,
    pub upstream: Arc<Upstream>,
    pub half_close_idle: Duration,
    pub stats: Arc<Stats>,
}

impl Listener {
    /// Accepts until `shutdown` is cancelled. Connection tasks are spawned on `tasks`, so the
    /// caller can wait for them to finish.
    pub async fn serve(self, shutdown: CancellationToken, tasks: TaskTracker) {
        let this = Arc::new(self);
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = this.tcp.accept() => accepted,
            };
            match accepted {
                Ok((client, peer)) => {
                    this.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    let this = Arc::clone(&this);
                    tasks.spawn(async move { this.handle(client, peer).await });
                }
                Err(err) => {
                    // Out of file descriptors or memory: back off instead of spinning.
                    warn!("accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// One connection: find its destination, open the tunnel, relay.
    async fn handle(&self, mut client: TcpStream, peer: SocketAddr) {
        let dst = match self.dsts.take(peer) {
            Ok(Some(dst)) => dst,
            Ok(None) => {
                self.stats.unmapped.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "closed connection from {peer}: it was not redirected by transproxy (direct connections to the listener are not tunnelled)"
                );
                return;
            }
            Err(err) => {
                self.stats.unmapped.fetch_add(1, Ordering::Relaxed);
                warn!("closed connection from {peer}: cannot read its original destination: {err}");
                reset(&client);
                return;
            }
        };
        let mut tunnel = match self.upstream.open(dst).await {
            Ok(tunnel) => tunnel,
            Err(err) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                warn!("{peer} -> {dst}: reset: {err}");
                reset(&client);
                return;
            }
        };
        self.stats.tunnelled.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nodelay(true);
        match relay::relay(
            &mut client,
            &mut tunnel.stream,
            &tunnel.early_data,
            self.half_close_idle,
        )
        .await
        {
            Ok(moved) => debug!(
                "{peer} -> {dst}: closed after {} bytes up, {} down",
                moved.to_upstream, moved.to_client
            ),
            Err(err) => {
                info!("{peer} -> {dst}: aborted: {err}");
                reset(&client);
                reset(&tunnel.stream);
            }
        }
    }
}

/// Arms `stream` so that closing it sends RST instead of FIN (SO_LINGER with zero timeout).
/// The socket closes when its owner drops it.
fn reset(stream: &TcpStream) {
    if let Err(err) = SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        debug!("cannot arm reset: {err}");
    }
}
