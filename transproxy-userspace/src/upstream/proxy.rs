//! One entry of the upstream list, ready to carry tunnels: a proxy (where it is, how its
//! handshake goes, whether it is up), or `direct`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use super::{
    ProxyKind, ProxyUrl, TunnelError,
    auth::{self, Scheme},
    dial::Dialer,
    health::{Health, State},
    http_connect::HttpConnect,
    socks5::Socks5,
    stream::{ProxyStream, ProxyTrust},
};

/// An entry of the list, as tunnels use it.
#[derive(Clone)]
pub(super) enum Route {
    Proxy(Arc<Proxy>),
    /// The daemon connects to the destination itself.
    Direct,
}

/// A proxy of the list.
pub(super) struct Proxy {
    pub(super) url: ProxyUrl,
    pub(super) dialer: Dialer,
    /// For `https://`: what its certificate is checked against.
    tls: Option<ProxyTrust>,
    pub(super) handshake: Handshake,
    pub(super) health: Health,
}

/// How a tunnel is asked for.
pub(super) enum Handshake {
    /// `CONNECT` (http://).
    Connect(HttpConnect),
    /// SOCKS5 (socks5://, socks5h://).
    Socks5(Socks5),
}

/// What every proxy of the list shares, from the settings.
#[derive(Clone)]
pub(super) struct Common {
    pub(super) connect_timeout: Duration,
    pub(super) reply_timeout: Duration,
    pub(super) keep_error_page: bool,
    pub(super) auth_scheme: Option<Scheme>,
    pub(super) kerberos: bool,
    pub(super) skip: Duration,
    pub(super) trust: Option<ProxyTrust>,
}

impl Proxy {
    /// A proxy the user listed, at `url`, reached at `addrs`: it gets the credentials (its
    /// URL's, the file's, and for Negotiate the Kerberos ticket).
    pub(super) fn new(url: ProxyUrl, addrs: Vec<SocketAddr>, common: &Common) -> Self {
        Self::with_auth(url, addrs, common, true)
    }

    /// A proxy only a PAC file named: no credentials of any kind (no password, no Kerberos
    /// ticket, no NTLM through the GSSAPI's default credentials), whatever it asks for.
    pub(super) fn unlisted(url: ProxyUrl, addrs: Vec<SocketAddr>, common: &Common) -> Self {
        Self::with_auth(url.without_credentials(), addrs, common, false)
    }

    fn with_auth(url: ProxyUrl, addrs: Vec<SocketAddr>, common: &Common, listed: bool) -> Self {
        let handshake = match url.kind() {
            ProxyKind::Http | ProxyKind::Https => {
                let auth = auth::Auth::new(
                    url.credentials().cloned(),
                    common.auth_scheme.filter(|_| listed),
                    common.kerberos && listed,
                    url.host().to_owned(),
                );
                Handshake::Connect(HttpConnect::new(
                    auth,
                    common.reply_timeout,
                    common.keep_error_page,
                ))
            }
            ProxyKind::Socks5 | ProxyKind::Socks5h => Handshake::Socks5(Socks5::new(
                url.credentials().cloned(),
                url.kind() == ProxyKind::Socks5h,
                common.reply_timeout,
            )),
        };
        Self {
            tls: (url.kind() == ProxyKind::Https)
                .then(|| common.trust.clone())
                .flatten(),
            dialer: Dialer::new(addrs, common.connect_timeout),
            health: Health::new(common.skip),
            handshake,
            url,
        }
    }

    /// Reaches the proxy: a connection, and for `https://` the TLS handshake on it (within the
    /// connect timeout too), the proxy's name checked against its certificate.
    pub(super) async fn reach(&self) -> Result<ProxyStream, TunnelError> {
        if self.url.kind() == ProxyKind::Https && self.tls.is_none() {
            // Never plain text to an https:// proxy.
            return Err(TunnelError::Tls(std::io::Error::other(
                "no CA certificates to check its certificate against (the system's store is empty; give --proxy-ca)",
            )));
        }
        let tcp = self.dialer.reach().await?;
        let Some(trust) = &self.tls else {
            return Ok(ProxyStream::Tcp(tcp));
        };
        let timeout = self.dialer.connect_timeout();
        match tokio::time::timeout(timeout, trust.connect(self.url.host(), tcp)).await {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(err)) => Err(TunnelError::Tls(err)),
            Err(_) => Err(TunnelError::ConnectTimeout(timeout)),
        }
    }

    /// Its addresses, as tunnels now connect to them.
    pub(super) fn addrs(&self) -> Arc<[SocketAddr]> {
        self.dialer.addrs()
    }

    pub(super) fn state(&self) -> State {
        self.health.state()
    }
}
