//! The upstream side: the proxy's URL and credentials ([`ProxyUrl`]), following its host name
//! ([`lookup`]), reaching it ([`dial`]), and the handshake that opens a tunnel through it
//! ([`http_connect`], with the client's bytes sent [`ahead`] of the reply).
//!
//! [`Upstream::open`] is the one seam the accept path uses: given a client and its original
//! destination, it hands back an open tunnel or says why there is none. Other kinds of
//! upstream, authentication schemes and a choice of proxy per destination plug in here,
//! without touching the accept path.

mod ahead;
pub mod auth;
mod dial;
mod http_connect;
pub(crate) mod lookup;
mod proxy_url;

use std::{net::SocketAddr, sync::Arc, time::Duration};

pub use auth::{Credentials, Scheme};
use bytes::Bytes;
pub use http_connect::parse_reply;
pub(crate) use http_connect::{MAX_REPLY_HEADERS, Rejection, TunnelError};
pub use proxy_url::{PROXY_ENV_VARS, ProxyUrl, read_secret_file, read_secret_file_bytes};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use self::{
    ahead::Ahead,
    dial::Dialer,
    http_connect::{HttpConnect, Target},
};
use tracing::debug;

use crate::{policy::DirectNames, sniff::Name};

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
    /// How long to wait for a client's first bytes, to read the host name it asked for; zero
    /// turns sniffing off.
    sniff_timeout: Duration,
    /// Names whose connections go direct (NO_PROXY).
    direct_names: DirectNames,
    connect_timeout: Duration,
}

/// How an [`Upstream`] behaves, from the settings.
pub(crate) struct UpstreamOptions {
    pub(crate) connect_timeout: Duration,
    pub(crate) reply_timeout: Duration,
    pub(crate) send_ahead: bool,
    pub(crate) keep_error_page: bool,
    pub(crate) sniff_timeout: Duration,
    pub(crate) direct_names: DirectNames,
    /// `--proxy-auth-scheme`: the one scheme to answer with.
    pub(crate) auth_scheme: Option<Scheme>,
    /// Kerberos credentials are configured (a cache or a keytab): Negotiate comes first.
    pub(crate) kerberos: bool,
}

/// An open tunnel: the proxy connection (held by the caller) now carries the destination's
/// bytes.
pub(crate) struct Tunnel {
    /// What the proxy sent right after its reply header: the destination's first bytes.
    pub(crate) early_data: Bytes,
    /// How many of the client's bytes went ahead of the reply, and so are not the relay's.
    pub(crate) went_ahead: u64,
    /// The host name the tunnel was asked for.
    pub(crate) name: Option<Name>,
    /// The connection goes to the destination itself, not through the proxy (NO_PROXY).
    pub(crate) direct: bool,
}

/// A tunnel that did not open.
pub(crate) struct NotOpened {
    pub(crate) error: TunnelError,
    /// The client's first bytes, taken from it before the failure (to go ahead of the reply,
    /// or to read the host name): they tell an HTTP client from others.
    pub(crate) taken: Vec<u8>,
    /// Whether `taken` went to the proxy ahead of its reply: a proxy that drops such bytes can
    /// then be named in the log.
    pub(crate) went_ahead: bool,
    /// The host name it was asked for, when known.
    pub(crate) name: Option<Name>,
}

impl From<TunnelError> for NotOpened {
    fn from(error: TunnelError) -> Self {
        Self {
            error,
            taken: Vec::new(),
            went_ahead: false,
            name: None,
        }
    }
}

impl Upstream {
    pub(crate) fn new(proxy: ProxyUrl, addrs: Vec<SocketAddr>, options: UpstreamOptions) -> Self {
        let auth = auth::Auth::new(
            proxy.credentials().cloned(),
            options.auth_scheme,
            options.kerberos,
            proxy.host().to_owned(),
        );
        let handshake = HttpConnect::new(auth, options.reply_timeout, options.keep_error_page);
        Self {
            proxy,
            dialer: Dialer::new(addrs, options.connect_timeout),
            handshake,
            send_ahead: options.send_ahead,
            keep_error_page: options.keep_error_page,
            sniff_timeout: options.sniff_timeout,
            direct_names: options.direct_names,
            connect_timeout: options.connect_timeout,
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

    /// Opens a tunnel from `client` to `dst`, asked for by host name when one is known: sniffed
    /// from the client's first bytes, else `hint` (learned from DNS). The proxy connection goes
    /// into `proxy` as soon as it is reached, so that the caller can reset it whatever happens
    /// next (a shutdown cut), and `reached` is told where it went; once open, it is the tunnel.
    /// A name that matches NO_PROXY goes direct: the connection in `proxy` is then to `dst`.
    pub(crate) async fn open(
        &self,
        client: &mut TcpStream,
        dst: SocketAddr,
        hint: Option<Name>,
        proxy: &mut Option<TcpStream>,
        reached: impl FnOnce(SocketAddr),
    ) -> Result<Tunnel, NotOpened> {
        let mut ahead = Ahead::take_first(client)
            .await
            .map_err(TunnelError::ClientFailed)?;
        let sniffing = !self.sniff_timeout.is_zero();
        // Reach the proxy while the first bytes arrive, so that clients that speak first pay no
        // round trip for the name; unless names go direct, when the name decides where to go.
        let (reaching, name) = if sniffing && !self.direct_names.is_empty() {
            let name = ahead
                .sniff(self.sniff_timeout)
                .await
                .map_err(TunnelError::ClientFailed)?
                .or(hint);
            if let Some(name) = name.as_ref()
                && self.goes_direct(name, dst).await
            {
                return self.direct(dst, name.clone(), ahead, proxy, reached).await;
            }
            (self.dialer.reach().await, name)
        } else if sniffing {
            let (reaching, name) =
                tokio::join!(self.dialer.reach(), ahead.sniff(self.sniff_timeout));
            let name = name.map_err(TunnelError::ClientFailed)?;
            (reaching, name.or(hint))
        } else {
            if let Some(name) = hint.as_ref()
                && self.goes_direct(name, dst).await
            {
                return self.direct(dst, name.clone(), ahead, proxy, reached).await;
            }
            (self.dialer.reach().await, hint)
        };
        let not_opened = |error, taken: Vec<u8>, went_ahead, name: &Option<Name>| NotOpened {
            error,
            taken,
            went_ahead,
            name: name.clone(),
        };
        let stream = match reaching {
            Ok(stream) => proxy.insert(stream),
            Err(error) => return Err(not_opened(error, ahead.into_sent(), false, &name)),
        };
        if let Ok(addr) = stream.peer_addr() {
            reached(addr);
        }
        let target = match &name {
            Some(name) => Target::Name(name, dst.port()),
            None => Target::Addr(dst),
        };
        // Held until the proxy has answered: with --wait-for-reply, and when the proxy wants a
        // handshake first (its connection is not the client's until it has said 200).
        if !self.send_ahead || self.handshake.handshakes_first() {
            let held = ahead.into_sent();
            let mut opened = self.handshake.request(stream, &target, None).await;
            if let Err(TunnelError::AuthOnNewConnection) = opened {
                opened = self.again(proxy, &target).await;
            }
            let Some(stream) = proxy.as_mut() else {
                return Err(not_opened(TunnelError::Closed, held, false, &name));
            };
            let early_data = match opened {
                Ok(early_data) => early_data,
                Err(error) => return Err(not_opened(error, held, false, &name)),
            };
            stream
                .write_all(&held)
                .await
                .map_err(|err| not_opened(TunnelError::Io(err), Vec::new(), false, &name))?;
            return Ok(Tunnel {
                early_data,
                went_ahead: held.len() as u64,
                name,
                direct: false,
            });
        }
        let opened = self
            .handshake
            .request(stream, &target, Some(&mut ahead))
            .await;
        if let Err(TunnelError::AuthOnNewConnection) = opened {
            // The proxy asked for credentials after the client's bytes went ahead: they go
            // again, after the handshake, on a new connection.
            let held = ahead.into_sent();
            let opened = self.again(proxy, &target).await;
            let Some(stream) = proxy.as_mut() else {
                return Err(not_opened(TunnelError::Closed, held, false, &name));
            };
            let early_data = match opened {
                Ok(early_data) => early_data,
                Err(error) => return Err(not_opened(error, held, false, &name)),
            };
            stream
                .write_all(&held)
                .await
                .map_err(|err| not_opened(TunnelError::Io(err), Vec::new(), false, &name))?;
            return Ok(Tunnel {
                early_data,
                went_ahead: held.len() as u64,
                name,
                direct: false,
            });
        }
        let ahead = ahead.into_sent();
        match opened {
            // Only the count outlives the opening: a tunnel holds no copy of its first bytes.
            Ok(early_data) => Ok(Tunnel {
                early_data,
                went_ahead: ahead.len() as u64,
                name,
                direct: false,
            }),
            Err(error) => Err(not_opened(error, ahead, true, &name)),
        }
    }

    /// The handshake again, on a new connection to the proxy (replacing the one in `proxy`,
    /// which is reset), with nothing sent ahead.
    async fn again(
        &self,
        proxy: &mut Option<TcpStream>,
        target: &Target<'_>,
    ) -> Result<Bytes, TunnelError> {
        if let Some(old) = proxy.take() {
            crate::relay::reset(&old);
        }
        let stream = proxy.insert(self.dialer.reach().await?);
        match self.handshake.request(stream, target, None).await {
            // A second time means the proxy closes after every 407: a handshake cannot finish.
            Err(TunnelError::AuthOnNewConnection) => Err(TunnelError::Closed),
            other => other,
        }
    }

    /// Whether a connection to `dst` that says it is for `name` goes direct: `name` matches
    /// NO_PROXY, and it leads to `dst` by this host's own resolver. The name is the client's
    /// word (its SNI, its Host, or the answer of a resolver it chose), and a client must not
    /// send any address it likes around the proxy by claiming a NO_PROXY name for it; one that
    /// does is tunnelled, by that name, and the proxy decides.
    async fn goes_direct(&self, name: &Name, dst: SocketAddr) -> bool {
        if !self.direct_names.matches(name) {
            return false;
        }
        let lookup = tokio::net::lookup_host((name.as_str(), dst.port()));
        let leads_there = match tokio::time::timeout(self.connect_timeout, lookup).await {
            Ok(Ok(mut addrs)) => addrs.any(|addr| addr.ip() == dst.ip()),
            _ => false,
        };
        if !leads_there {
            debug!(
                "{name} is a NO_PROXY name, but it does not lead to {dst} here: through the proxy"
            );
        }
        leads_there
    }

    /// A connection to `name` (at `dst`) that NO_PROXY sends direct: the daemon connects to the
    /// destination itself (its own connections are never intercepted), and the client's first
    /// bytes go there.
    async fn direct(
        &self,
        dst: SocketAddr,
        name: Name,
        ahead: Ahead<'_>,
        slot: &mut Option<TcpStream>,
        reached: impl FnOnce(SocketAddr),
    ) -> Result<Tunnel, NotOpened> {
        let failed = |error| NotOpened {
            error,
            taken: Vec::new(),
            went_ahead: false,
            name: Some(name.clone()),
        };
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(dst)).await
        {
            Ok(Ok(stream)) => slot.insert(stream),
            Ok(Err(err)) => return Err(failed(TunnelError::Unreachable(err))),
            Err(_) => return Err(failed(TunnelError::ConnectTimeout(self.connect_timeout))),
        };
        let _ = stream.set_nodelay(true);
        reached(dst);
        let sent = ahead.into_sent();
        stream
            .write_all(&sent)
            .await
            .map_err(|err| failed(TunnelError::Io(err)))?;
        Ok(Tunnel {
            early_data: Bytes::new(),
            went_ahead: sent.len() as u64,
            name: Some(name),
            direct: true,
        })
    }
}
