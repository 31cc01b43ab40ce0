//! Reaching the proxy: its addresses (which follow its host name), a connect timeout shared
//! among them, and the socket options a long-lived proxy connection needs.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use socket2::{SockRef, TcpKeepalive};
use tokio::{net::TcpStream, time::Instant};

use super::TunnelError;

/// TCP keepalive on proxy connections: the first probe after a minute of silence, then every
/// 10 s.
const KEEPALIVE: TcpKeepalive = TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(6);

/// A proxy connection whose probes or data go unacknowledged this long is dead, and the
/// tunnel's both ends are reset (TCP_USER_TIMEOUT: keepalive alone never fires while data is in
/// flight, and retransmissions would take about 15 minutes to give up).
const DEAD_AFTER: Duration = Duration::from_secs(120);

/// Where the proxy is, and how long reaching it may take.
pub(super) struct Dialer {
    /// Where the proxy's host name pointed when last resolved; replaced when it moves (a
    /// laptop on another network), see [`Dialer::set_addrs`].
    addrs: RwLock<Arc<[SocketAddr]>>,
    connect_timeout: Duration,
}

impl Dialer {
    pub(super) fn new(addrs: Vec<SocketAddr>, connect_timeout: Duration) -> Self {
        Self {
            addrs: RwLock::new(addrs.into()),
            connect_timeout,
        }
    }

    /// The proxy's addresses, as tunnels now connect to them.
    pub(super) fn addrs(&self) -> Arc<[SocketAddr]> {
        // A poisoned lock still holds a complete value: an `Arc` is replaced whole.
        Arc::clone(&self.addrs.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// How long reaching the proxy may take.
    pub(super) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Where new tunnels connect from now on; open ones keep their connection.
    pub(super) fn set_addrs(&self, addrs: Arc<[SocketAddr]>) {
        *self.addrs.write().unwrap_or_else(PoisonError::into_inner) = addrs;
    }

    /// Reaches the proxy, within the connect timeout.
    ///
    /// The connection probes a silent proxy ([`KEEPALIVE`]): a client's own TCP keepalive is
    /// answered by the daemon's socket and never reaches it, so without these a tunnel whose
    /// proxy vanished (a laptop suspended, a network changed) would wait forever.
    pub(super) async fn reach(&self) -> Result<TcpStream, TunnelError> {
        let stream = self.connect().await?;
        stream.set_nodelay(true).map_err(TunnelError::Io)?;
        let socket = SockRef::from(&stream);
        socket
            .set_tcp_keepalive(&KEEPALIVE)
            .and_then(|()| socket.set_tcp_user_timeout(Some(DEAD_AFTER)))
            .map_err(TunnelError::Io)?;
        Ok(stream)
    }

    /// Connects to the first proxy address that answers, within the connect timeout. Each
    /// address gets an even share of the time left, as Go's dialer does: one that drops
    /// packets (an IPv6 route that goes nowhere) cannot use it all up before the next is tried.
    async fn connect(&self) -> Result<TcpStream, TunnelError> {
        let deadline = Instant::now() + self.connect_timeout;
        let addrs = self.addrs();
        let mut last_err = None;
        for (i, addr) in addrs.iter().enumerate() {
            let share =
                deadline.saturating_duration_since(Instant::now()) / (addrs.len() - i) as u32;
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(err)) => last_err = Some(TunnelError::Unreachable(err)),
                Err(_) => last_err = Some(TunnelError::ConnectTimeout(self.connect_timeout)),
            }
        }
        Err(last_err.unwrap_or_else(|| {
            TunnelError::Unreachable(io::Error::new(
                io::ErrorKind::NotFound,
                "proxy has no address",
            ))
        }))
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// A proxy address that drops SYNs (a listener whose accept queue is full) gets only its
    /// share of the connect timeout; the next address is reached in time.
    #[tokio::test]
    async fn an_address_that_drops_packets_leaves_time_for_the_next() {
        let silent =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        silent
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        silent.listen(0).unwrap();
        let silent_addr = silent.local_addr().unwrap().as_socket().unwrap();
        // One connection fills its accept queue (backlog 0): further SYNs are dropped.
        let _queued = std::net::TcpStream::connect(silent_addr).unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        let dialer = Dialer::new(vec![silent_addr, proxy_addr], Duration::from_secs(2));
        let started = std::time::Instant::now();
        let stream = dialer.reach().await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), proxy_addr);
        // Half the timeout went to the silent address, not all of it.
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1_800), "{took:?}");
        let socket = SockRef::from(&stream);
        assert!(socket.keepalive().unwrap(), "no TCP keepalive");
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(DEAD_AFTER));
    }
}
