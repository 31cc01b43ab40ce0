//! The upstream side: the proxy's URL and credentials ([`ProxyUrl`]), following its host name
//! ([`lookup`]), reaching it ([`dial`]), and the handshake that opens a tunnel through it
//! ([`http_connect`], with the client's bytes sent [`ahead`] of the reply).
//!
//! [`Upstream::open`] is the one seam the accept path uses: given a client and its original
//! destination, it hands back an open tunnel or says why there is none. Other kinds of
//! upstream, authentication schemes and a choice of proxy per destination plug in here,
//! without touching the accept path.

mod ahead;
mod dial;
mod http_connect;
pub(crate) mod lookup;
mod proxy_url;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
pub use http_connect::parse_reply;
pub(crate) use http_connect::{MAX_REPLY_HEADERS, Rejection, TunnelError};
pub use proxy_url::{PROXY_ENV_VARS, ProxyUrl, read_secret_file};
use tokio::net::TcpStream;

use self::{ahead::Ahead, dial::Dialer, http_connect::HttpConnect};

/// How tunnels are opened: which proxy, where it is, and how the handshake goes.
pub(crate) struct Upstream {
    proxy: ProxyUrl,
    dialer: Dialer,
    handshake: HttpConnect,
    /// Whether the client's bytes go to the proxy without waiting for its reply (not
    /// `--wait-for-reply`).
    send_ahead: bool,
    /// Whether a rejection keeps the proxy's page, to show HTTP clients.
    keep_error_page: bool,
}

/// How an [`Upstream`] behaves, from the settings.
pub(crate) struct UpstreamOptions {
    pub(crate) connect_timeout: Duration,
    pub(crate) reply_timeout: Duration,
    pub(crate) send_ahead: bool,
    pub(crate) keep_error_page: bool,
}

/// An open tunnel: the proxy connection (held by the caller) now carries the destination's
/// bytes.
pub(crate) struct Tunnel {
    /// What the proxy sent right after its reply header: the destination's first bytes.
    pub(crate) early_data: Bytes,
    /// How many of the client's bytes went ahead of the reply, and so are not the relay's.
    pub(crate) went_ahead: u64,
}

/// A tunnel that did not open.
pub(crate) struct NotOpened {
    pub(crate) error: TunnelError,
    /// The client's bytes that went to the proxy ahead of its reply: they tell an HTTP client
    /// from others, and a proxy that drops them can be named in the log.
    pub(crate) ahead: Vec<u8>,
}

impl From<TunnelError> for NotOpened {
    fn from(error: TunnelError) -> Self {
        Self {
            error,
            ahead: Vec::new(),
        }
    }
}

impl Upstream {
    pub(crate) fn new(proxy: ProxyUrl, addrs: Vec<SocketAddr>, options: UpstreamOptions) -> Self {
        let handshake = HttpConnect::new(
            proxy.authorization().map(str::to_owned),
            options.reply_timeout,
            options.keep_error_page,
        );
        Self {
            proxy,
            dialer: Dialer::new(addrs, options.connect_timeout),
            handshake,
            send_ahead: options.send_ahead,
            keep_error_page: options.keep_error_page,
        }
    }

    pub(crate) fn proxy(&self) -> &ProxyUrl {
        &self.proxy
    }

    /// Whether rejections keep the proxy's page (`--on-proxy-error=http`).
    pub(crate) fn keeps_error_pages(&self) -> bool {
        self.keep_error_page
    }

    /// The proxy's addresses, as tunnels now connect to them.
    pub(crate) fn addrs(&self) -> Arc<[SocketAddr]> {
        self.dialer.addrs()
    }

    /// Where new tunnels connect from now on; open ones keep their connection.
    pub(crate) fn set_addrs(&self, addrs: Arc<[SocketAddr]>) {
        self.dialer.set_addrs(addrs);
    }

    /// Reaches the proxy once and lets go: at start and when its addresses change, so that a
    /// proxy that does not answer is reported then, not only by every tunnel failing.
    pub(crate) async fn probe(&self) -> Result<(), TunnelError> {
        self.dialer.reach().await.map(drop)
    }

    /// Opens a tunnel from `client` to `dst`. The proxy connection goes into `proxy` as soon as
    /// it is reached, so that the caller can reset it whatever happens next (a shutdown cut),
    /// and `reached` is told where it went; once open, it is the tunnel.
    pub(crate) async fn open(
        &self,
        client: &mut TcpStream,
        dst: SocketAddr,
        proxy: &mut Option<TcpStream>,
        reached: impl FnOnce(SocketAddr),
    ) -> Result<Tunnel, NotOpened> {
        let stream = proxy.insert(self.dialer.reach().await?);
        if let Ok(addr) = stream.peer_addr() {
            reached(addr);
        }
        if !self.send_ahead {
            let early_data = self.handshake.request(stream, dst, None).await?;
            return Ok(Tunnel {
                early_data,
                went_ahead: 0,
            });
        }
        let mut ahead = Ahead::take_first(client)
            .await
            .map_err(TunnelError::ClientFailed)?;
        let opened = self.handshake.request(stream, dst, Some(&mut ahead)).await;
        let ahead = ahead.into_sent();
        match opened {
            // Only the count outlives the opening: a tunnel holds no copy of its first bytes.
            Ok(early_data) => Ok(Tunnel {
                early_data,
                went_ahead: ahead.len() as u64,
            }),
            Err(error) => Err(NotOpened { error, ahead }),
        }
    }
}
