//! One entry of the upstream list, ready to carry tunnels: a proxy (where it is, how its
//! handshake goes, whether it is up), or `direct`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use super::{
    ProxyKind, ProxyUrl,
    auth::{self, Scheme},
    dial::Dialer,
    health::{Health, State},
    http_connect::HttpConnect,
    socks5::Socks5,
};

/// An entry of the list, as tunnels use it.
pub(super) enum Route {
    Proxy(Box<Proxy>),
    /// The daemon connects to the destination itself.
    Direct,
}

/// A proxy of the list.
pub(super) struct Proxy {
    pub(super) url: ProxyUrl,
    pub(super) dialer: Dialer,
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
pub(super) struct Common {
    pub(super) connect_timeout: Duration,
    pub(super) reply_timeout: Duration,
    pub(super) keep_error_page: bool,
    pub(super) auth_scheme: Option<Scheme>,
    pub(super) kerberos: bool,
    pub(super) skip: Duration,
}

impl Proxy {
    /// The proxy at `url`, reached at `addrs`.
    pub(super) fn new(url: ProxyUrl, addrs: Vec<SocketAddr>, common: &Common) -> Self {
        let handshake = match url.kind() {
            ProxyKind::Http | ProxyKind::Https => {
                let auth = auth::Auth::new(
                    url.credentials().cloned(),
                    common.auth_scheme,
                    common.kerberos,
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
            dialer: Dialer::new(addrs, common.connect_timeout),
            health: Health::new(common.skip),
            handshake,
            url,
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
