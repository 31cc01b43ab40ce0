//! The upstream side: the proxies' URLs and credentials ([`ProxyUrl`], [`ProxyList`]),
//! following their host names ([`lookup`]), reaching them ([`dial`]) in the list's order,
//! skipping those that are down ([`health`]), and the handshake that opens a tunnel through
//! one: `CONNECT` ([`http_connect`], with the client's bytes sent [`ahead`] of the reply) or
//! SOCKS5 ([`socks5`]); or `direct`, the destination itself.
//!
//! [`Upstream::open`] is the one seam the accept path uses: given a client and its original
//! destination, it hands back an open tunnel or says why there is none.

mod ahead;
pub mod auth;
mod dial;
mod health;
mod http_connect;
pub(crate) mod lookup;
mod proxy;
mod proxy_url;
mod socks5;
mod stream;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

pub use auth::{Credentials, Scheme};
use bytes::Bytes;
pub(crate) use health::State as ProxyState;
pub use http_connect::parse_reply;
pub(crate) use http_connect::{MAX_REPLY_HEADERS, Rejection, TunnelError};
pub use proxy_url::{
    Hop, MAX_HOPS, PROXY_ENV_VARS, ProxyKind, ProxyList, ProxyUrl, read_secret_file,
    read_secret_file_bytes,
};
pub use socks5::SocksFailure;
pub(crate) use stream::ProxyStream;
pub use stream::ProxyTrust;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use self::{
    ahead::Ahead,
    http_connect::{HttpConnect, Target},
    proxy::{Common, Handshake, Proxy, Route},
};
use tracing::debug;

use crate::{
    pac::{self, Pac, PacFallback},
    policy::DirectNames,
    sniff::Name,
};

/// How tunnels are opened: the list of upstreams, where each is, and how its handshake goes.
pub(crate) struct Upstream {
    routes: Vec<Route>,
    /// The list as configured, for the ready line and status.
    list: ProxyList,
    /// `--pac`: the script chooses the upstreams of each tunnel; the list's proxies then only
    /// lend their credentials (and state) to the proxies the script names.
    pac: Option<Pac>,
    pac_fallback: PacFallback,
    /// Proxies the script named that are not in the list (they get no credentials), by URL.
    named_by_pac: Mutex<HashMap<String, Arc<Proxy>>>,
    common: Common,
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
    /// `--proxy-skip`: how long a proxy that failed is passed by.
    pub(crate) proxy_skip: Duration,
    /// What `https://` proxies' certificates are checked against.
    pub(crate) proxy_trust: Option<ProxyTrust>,
    /// `--pac` and how often it is fetched again.
    pub(crate) pac: Option<(pac::PacSource, Duration)>,
    pub(crate) pac_fallback: PacFallback,
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
    /// The connection goes to the destination itself, not through a proxy (NO_PROXY, or
    /// `direct` in the list).
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

/// One proxy of the list as status shows it.
pub(crate) struct ProxyReport {
    pub(crate) url: String,
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) state: ProxyState,
}

impl Upstream {
    /// The upstreams of `list`; `addrs[i]` are where the list's i-th proxy is (resolved at
    /// start).
    pub(crate) fn new(
        list: ProxyList,
        mut addrs: Vec<Vec<SocketAddr>>,
        options: UpstreamOptions,
    ) -> Self {
        let common = Common {
            connect_timeout: options.connect_timeout,
            reply_timeout: options.reply_timeout,
            keep_error_page: options.keep_error_page,
            auth_scheme: options.auth_scheme,
            kerberos: options.kerberos,
            skip: options.proxy_skip,
            trust: options.proxy_trust,
        };
        addrs.reverse();
        let routes = list
            .hops()
            .iter()
            .map(|hop| match hop {
                Hop::Proxy(url) => Route::Proxy(Arc::new(Proxy::new(
                    url.clone(),
                    addrs.pop().unwrap_or_default(),
                    &common,
                ))),
                Hop::Direct => Route::Direct,
            })
            .collect();
        Self {
            routes,
            list,
            pac: options
                .pac
                .map(|(source, refresh)| Pac::new(source, refresh)),
            pac_fallback: options.pac_fallback,
            named_by_pac: Mutex::new(HashMap::new()),
            common,
            send_ahead: options.send_ahead,
            keep_error_page: options.keep_error_page,
            sniff_timeout: options.sniff_timeout,
            direct_names: options.direct_names,
            connect_timeout: options.connect_timeout,
        }
    }

    /// The list, as configured.
    pub(crate) fn list(&self) -> &ProxyList {
        &self.list
    }

    /// Whether rejections keep the proxy's page (`--on-proxy-error=http`).
    pub(crate) fn keeps_error_pages(&self) -> bool {
        self.keep_error_page
    }

    fn proxies(&self) -> impl Iterator<Item = &Proxy> {
        self.routes.iter().filter_map(|route| match route {
            Route::Proxy(proxy) => Some(&**proxy),
            Route::Direct => None,
        })
    }

    /// Every proxy's addresses, as tunnels now connect to them (never intercepted).
    pub(crate) fn addrs(&self) -> Vec<SocketAddr> {
        let mut all: Vec<SocketAddr> = self.proxies().flat_map(|p| p.addrs().to_vec()).collect();
        all.sort();
        all.dedup();
        all
    }

    /// Each proxy: its URL, addresses and state; the listed ones first, then those only a
    /// PAC file named.
    pub(crate) fn report(&self) -> Vec<ProxyReport> {
        let named = self
            .named_by_pac
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect::<Vec<_>>();
        self.proxies()
            .chain(named.iter().map(|proxy| &**proxy))
            .map(|proxy| ProxyReport {
                url: proxy.url.to_string(),
                addrs: proxy.addrs().to_vec(),
                state: proxy.state(),
            })
            .collect()
    }

    /// Whether `addrs` would move the list's `index`-th proxy (the same addresses in another
    /// order do not).
    pub(crate) fn would_move(&self, index: usize, addrs: &[SocketAddr]) -> bool {
        let sorted = |addrs: &[SocketAddr]| {
            let mut addrs = addrs.to_vec();
            addrs.sort();
            addrs.dedup();
            addrs
        };
        self.proxies()
            .nth(index)
            .is_some_and(|proxy| sorted(addrs) != sorted(&proxy.addrs()))
    }

    /// Every proxy's addresses, with the `index`-th proxy at `addrs`.
    pub(crate) fn addrs_with(&self, index: usize, addrs: &[SocketAddr]) -> Vec<SocketAddr> {
        let mut all: Vec<SocketAddr> = self
            .proxies()
            .enumerate()
            .flat_map(|(i, proxy)| {
                if i == index {
                    addrs.to_vec()
                } else {
                    proxy.addrs().to_vec()
                }
            })
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Where the list's `index`-th proxy is from now on; open tunnels keep their connection.
    pub(crate) fn set_addrs(&self, index: usize, addrs: Vec<SocketAddr>) {
        if let Some(proxy) = self.proxies().nth(index) {
            proxy.dialer.set_addrs(addrs.into());
        }
    }

    /// Reaches each proxy once and lets go: at start and when addresses change, so that a
    /// proxy that does not answer is reported then, not only by tunnels failing. Returns the
    /// ones that did not answer, with why.
    pub(crate) async fn probe(&self) -> Vec<(String, Vec<SocketAddr>, TunnelError)> {
        let mut silent = Vec::new();
        for proxy in self.proxies() {
            if let Err(err) = proxy.reach().await {
                silent.push((proxy.url.to_string(), proxy.addrs().to_vec(), err));
            }
        }
        silent
    }

    /// Reaches the first upstream of the list that answers, passing by proxies that are
    /// down (unless every proxy is: then each is tried again, in order). A proxy that cannot
    /// be reached is marked down. `direct` connects to `dst`.
    async fn reach<'r>(
        &self,
        routes: &'r [Route],
        dst: SocketAddr,
    ) -> Result<(&'r Route, ProxyStream), TunnelError> {
        let all_down = routes.iter().all(|route| match route {
            Route::Proxy(proxy) => proxy.health.skipped(),
            Route::Direct => false,
        });
        let mut last = None;
        for route in routes {
            match route {
                Route::Proxy(proxy) => {
                    if proxy.health.skipped() && !all_down {
                        continue;
                    }
                    match proxy.reach().await {
                        Ok(stream) => return Ok((route, stream)),
                        Err(err) => {
                            proxy.health.failed(&proxy.url, &err);
                            last = Some(err);
                        }
                    }
                }
                Route::Direct => match self.connect_direct(dst).await {
                    Ok(stream) => return Ok((route, stream)),
                    Err(err) => last = Some(err),
                },
            }
        }
        Err(last.unwrap_or(TunnelError::Closed))
    }

    /// The PAC script, if the upstreams come from one.
    pub(crate) fn pac(&self) -> Option<&Pac> {
        self.pac.as_ref()
    }

    /// The upstreams the PAC script chooses for this connection, tried in order. A proxy the
    /// user listed (by kind, host and port) is that proxy, with its credentials and state; one
    /// only the script names gets none, and is resolved when first named. With no usable
    /// answer: `--pac-fallback direct` goes direct, else the tunnel fails.
    async fn pac_routes(
        &self,
        pac: &Pac,
        dst: SocketAddr,
        name: Option<&Name>,
        first_bytes: &[u8],
    ) -> Result<Vec<Route>, TunnelError> {
        let host = name.map_or_else(|| dst.ip().to_string(), |n| n.as_str().to_owned());
        let (url, tls) = pac::url_for(&host, dst.port(), first_bytes);
        let hops = match pac.find(url, host, dst.port(), tls, dst.ip()).await {
            Ok(hops) => hops,
            // Only the script's own failures: a client can make the script busy or slow (many
            // new names, long URLs), and that must not send it around the proxy.
            Err(error) if self.pac_fallback == PacFallback::Direct && error.is_the_scripts() => {
                debug!("{error}: direct, as --pac-fallback says");
                vec![Hop::Direct]
            }
            Err(error) => return Err(TunnelError::Pac(error)),
        };
        let mut routes = Vec::with_capacity(hops.len());
        for hop in hops {
            match hop {
                // The name is the client's word: DIRECT for it goes to `dst` only where this
                // host's resolver says the name leads there, or a process could send any
                // address around the proxy by claiming a name the script lets through.
                Hop::Direct
                    if let Some(name) = name
                        && !self.leads_to(name, dst).await =>
                {
                    debug!(
                        "the PAC file says DIRECT for {name}, but {name} does not lead to {dst} here: passed by"
                    );
                }
                Hop::Direct => routes.push(Route::Direct),
                Hop::Proxy(url) => {
                    if let Some(proxy) = self.pac_proxy(&url).await {
                        routes.push(Route::Proxy(proxy));
                    }
                }
            }
        }
        if routes.is_empty() {
            return Err(TunnelError::Pac(pac::PacError::NothingUsable));
        }
        Ok(routes)
    }

    /// The proxy at `url` for a PAC answer: the listed one, or one made (and kept) for it.
    async fn pac_proxy(&self, url: &ProxyUrl) -> Option<Arc<Proxy>> {
        for route in &self.routes {
            if let Route::Proxy(proxy) = route
                && proxy.url.same_server(url)
            {
                return Some(Arc::clone(proxy));
            }
        }
        let key = url.to_string();
        if let Some(proxy) = self
            .named_by_pac
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Some(Arc::clone(proxy));
        }
        let lookup = tokio::net::lookup_host((url.host(), url.port()));
        let addrs: Vec<SocketAddr> = match tokio::time::timeout(self.connect_timeout, lookup).await
        {
            Ok(Ok(addrs)) => addrs.collect(),
            _ => {
                debug!("PAC named {url}, which does not resolve: passed by");
                return None;
            }
        };
        let proxy = Arc::new(Proxy::unlisted(url.clone(), addrs, &self.common));
        let mut named = self
            .named_by_pac
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if named.len() >= 256 {
            named.clear();
        }
        Some(Arc::clone(named.entry(key).or_insert(proxy)))
    }

    /// Connects to `dst` itself, within the connect timeout.
    async fn connect_direct(&self, dst: SocketAddr) -> Result<ProxyStream, TunnelError> {
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(dst)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(ProxyStream::Tcp(stream))
            }
            Ok(Err(err)) => Err(TunnelError::Unreachable(err)),
            Err(_) => Err(TunnelError::ConnectTimeout(self.connect_timeout)),
        }
    }

    /// Opens a tunnel from `client` to `dst`, asked for by host name when one is known: sniffed
    /// from the client's first bytes, else `hint` (learned from DNS). The connection goes into
    /// `slot` as soon as it is made, so that the caller can reset it whatever happens next (a
    /// shutdown cut), and `reached` is told where it went; once open, it is the tunnel. A name
    /// that matches NO_PROXY goes direct, as does the list's `direct`: the connection in `slot`
    /// is then to `dst`.
    pub(crate) async fn open(
        &self,
        client: &mut TcpStream,
        dst: SocketAddr,
        hint: Option<Name>,
        slot: &mut Option<ProxyStream>,
        reached: impl FnOnce(SocketAddr),
    ) -> Result<Tunnel, NotOpened> {
        let mut ahead = Ahead::take_first(client)
            .await
            .map_err(TunnelError::ClientFailed)?;
        let sniffing = !self.sniff_timeout.is_zero();
        if let Some(pac) = &self.pac {
            // The script decides from the name: it must be known before anything is reached.
            let name = if sniffing {
                ahead
                    .sniff(self.sniff_timeout)
                    .await
                    .map_err(TunnelError::ClientFailed)?
                    .or(hint)
            } else {
                hint
            };
            if let Some(name) = name.as_ref()
                && self.goes_direct(name, dst).await
            {
                let reaching = self.connect_direct(dst).await;
                return direct(dst, name.clone(), reaching, ahead, slot, reached).await;
            }
            // Boxed: only PAC tunnels carry its state.
            let routes =
                match Box::pin(self.pac_routes(pac, dst, name.as_ref(), ahead.sent())).await {
                    Ok(routes) => routes,
                    Err(error) => return Err(not_opened(error, ahead.into_sent(), false, &name)),
                };
            let reaching = self.reach(&routes, dst).await;
            return self
                .through(reaching, dst, name, ahead, slot, reached)
                .await;
        }
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
                let reaching = self.connect_direct(dst).await;
                return direct(dst, name.clone(), reaching, ahead, slot, reached).await;
            }
            (self.reach(&self.routes, dst).await, name)
        } else if sniffing {
            let (reaching, name) = tokio::join!(
                self.reach(&self.routes, dst),
                ahead.sniff(self.sniff_timeout)
            );
            let name = name.map_err(TunnelError::ClientFailed)?;
            (reaching, name.or(hint))
        } else {
            if let Some(name) = hint.as_ref()
                && self.goes_direct(name, dst).await
            {
                let reaching = self.connect_direct(dst).await;
                return direct(dst, name.clone(), reaching, ahead, slot, reached).await;
            }
            (self.reach(&self.routes, dst).await, hint)
        };
        self.through(reaching, dst, name, ahead, slot, reached)
            .await
    }

    /// The rest of [`Upstream::open`], once an upstream is reached (or none could be): the
    /// handshake it needs, and the client's first bytes.
    async fn through(
        &self,
        reaching: Result<(&Route, ProxyStream), TunnelError>,
        dst: SocketAddr,
        name: Option<Name>,
        ahead: Ahead<'_>,
        slot: &mut Option<ProxyStream>,
        reached: impl FnOnce(SocketAddr),
    ) -> Result<Tunnel, NotOpened> {
        let (route, stream) = match reaching {
            Ok(reached) => reached,
            Err(error) => return Err(not_opened(error, ahead.into_sent(), false, &name)),
        };
        let proxy = match route {
            Route::Proxy(proxy) => proxy,
            Route::Direct => {
                let mut tunnel = direct_with(dst, Ok(stream), ahead, slot, reached).await;
                if let Ok(open) = &mut tunnel {
                    open.name = name;
                } else if let Err(failed) = &mut tunnel {
                    failed.name = name;
                }
                return tunnel;
            }
        };
        let stream = slot.insert(stream);
        if let Ok(addr) = stream.tcp().peer_addr() {
            reached(addr);
        }
        let target = match &name {
            Some(name) => Target::Name(name, dst.port()),
            None => Target::Addr(dst),
        };
        let opened = match &proxy.handshake {
            Handshake::Connect(http) => self.connect(proxy, http, slot, &target, ahead).await,
            Handshake::Socks5(socks) => {
                let held = ahead.into_sent();
                match socks.request(stream, &target).await {
                    Ok(()) => write_held(stream, held, Bytes::new()).await,
                    Err(error) => Err((error, held, false)),
                }
            }
        };
        match opened {
            Ok(mut tunnel) => {
                proxy.health.worked(&proxy.url);
                tunnel.name = name;
                Ok(tunnel)
            }
            Err((error, taken, went_ahead)) => {
                if error.proxy_failed() {
                    proxy.health.failed(&proxy.url, &error);
                }
                Err(not_opened(error, taken, went_ahead, &name))
            }
        }
    }

    /// The `CONNECT` exchange with `proxy` on the connection in `slot`. Fails with the error,
    /// the client's bytes taken so far, and whether they went ahead to the proxy.
    async fn connect(
        &self,
        proxy: &Proxy,
        http: &HttpConnect,
        slot: &mut Option<ProxyStream>,
        target: &Target<'_>,
        mut ahead: Ahead<'_>,
    ) -> Result<Tunnel, (TunnelError, Vec<u8>, bool)> {
        let Some(stream) = slot.as_mut() else {
            return Err((TunnelError::Closed, ahead.into_sent(), false));
        };
        // Held until the proxy has answered: with --wait-for-reply, and when the proxy wants a
        // handshake first (its connection is not the client's until it has said 200).
        if !self.send_ahead || http.handshakes_first() {
            let held = ahead.into_sent();
            let mut opened = http.request(stream, target, None).await;
            if let Err(TunnelError::AuthOnNewConnection) = opened {
                opened = again(proxy, http, slot, target).await;
            }
            let Some(stream) = slot.as_mut() else {
                return Err((TunnelError::Closed, held, false));
            };
            return match opened {
                Ok(early_data) => write_held(stream, held, early_data).await,
                Err(error) => Err((error, held, false)),
            };
        }
        let opened = http.request(stream, target, Some(&mut ahead)).await;
        if let Err(TunnelError::AuthOnNewConnection) = opened {
            // The proxy asked for credentials after the client's bytes went ahead: they go
            // again, after the handshake, on a new connection.
            let held = ahead.into_sent();
            let opened = again(proxy, http, slot, target).await;
            let Some(stream) = slot.as_mut() else {
                return Err((TunnelError::Closed, held, false));
            };
            return match opened {
                Ok(early_data) => write_held(stream, held, early_data).await,
                Err(error) => Err((error, held, false)),
            };
        }
        let ahead = ahead.into_sent();
        match opened {
            // Only the count outlives the opening: a tunnel holds no copy of its first bytes.
            Ok(early_data) => Ok(Tunnel {
                early_data,
                went_ahead: ahead.len() as u64,
                name: None,
                direct: false,
            }),
            Err(error) => Err((error, ahead, true)),
        }
    }

    /// Whether a connection to `dst` that says it is for `name` goes direct: `name` matches
    /// NO_PROXY, and it leads to `dst` by this host's own resolver. The name is the client's
    /// word (its SNI, its Host, or the answer of a resolver it chose), and a client must not
    /// send any address it likes around the proxy by claiming a NO_PROXY name for it; one that
    /// does is tunnelled, by that name, and the proxy decides.
    async fn goes_direct(&self, name: &Name, dst: SocketAddr) -> bool {
        // (See `leads_to`.)
        if !self.direct_names.matches(name) {
            return false;
        }
        let leads_there = self.leads_to(name, dst).await;
        if !leads_there {
            debug!(
                "{name} is a NO_PROXY name, but it does not lead to {dst} here: through the proxy"
            );
        }
        leads_there
    }

    /// Whether `name` resolves to `dst`'s address by this host's own resolver, within the
    /// connect timeout.
    async fn leads_to(&self, name: &Name, dst: SocketAddr) -> bool {
        let lookup = tokio::net::lookup_host((name.as_str(), dst.port()));
        match tokio::time::timeout(self.connect_timeout, lookup).await {
            Ok(Ok(mut addrs)) => addrs.any(|addr| addr.ip() == dst.ip()),
            _ => false,
        }
    }
}

/// A tunnel that did not open, with what was taken from the client and the name.
fn not_opened(
    error: TunnelError,
    taken: Vec<u8>,
    went_ahead: bool,
    name: &Option<Name>,
) -> NotOpened {
    NotOpened {
        error,
        taken,
        went_ahead,
        name: name.clone(),
    }
}

/// Writes the client's bytes held during the handshake to the now open `stream`.
async fn write_held(
    stream: &mut ProxyStream,
    held: Vec<u8>,
    early_data: Bytes,
) -> Result<Tunnel, (TunnelError, Vec<u8>, bool)> {
    if let Err(err) = stream.write_all(&held).await {
        return Err((TunnelError::Io(err), Vec::new(), false));
    }
    if let Err(err) = stream.flush().await {
        return Err((TunnelError::Io(err), Vec::new(), false));
    }
    Ok(Tunnel {
        early_data,
        went_ahead: held.len() as u64,
        name: None,
        direct: false,
    })
}

/// The handshake again, on a new connection to `proxy` (replacing the one in `slot`, which is
/// reset), with nothing sent ahead.
async fn again(
    proxy: &Proxy,
    http: &HttpConnect,
    slot: &mut Option<ProxyStream>,
    target: &Target<'_>,
) -> Result<Bytes, TunnelError> {
    if let Some(old) = slot.take() {
        crate::relay::reset(old.tcp());
    }
    let stream = slot.insert(proxy.reach().await?);
    match http.request(stream, target, None).await {
        // A second time means the proxy closes after every 407: a handshake cannot finish.
        Err(TunnelError::AuthOnNewConnection) => Err(TunnelError::Closed),
        other => other,
    }
}

/// A connection that goes to `dst` itself, for `name` (NO_PROXY): the daemon connected (its
/// own connections are never intercepted), and the client's first bytes go there.
async fn direct(
    dst: SocketAddr,
    name: Name,
    reaching: Result<ProxyStream, TunnelError>,
    ahead: Ahead<'_>,
    slot: &mut Option<ProxyStream>,
    reached: impl FnOnce(SocketAddr),
) -> Result<Tunnel, NotOpened> {
    let mut tunnel = direct_with(dst, reaching, ahead, slot, reached).await;
    match &mut tunnel {
        Ok(open) => open.name = Some(name),
        Err(failed) => failed.name = Some(name),
    }
    tunnel
}

/// The direct connection `reaching` to `dst` carries the tunnel: the client's first bytes go
/// there.
async fn direct_with(
    dst: SocketAddr,
    reaching: Result<ProxyStream, TunnelError>,
    ahead: Ahead<'_>,
    slot: &mut Option<ProxyStream>,
    reached: impl FnOnce(SocketAddr),
) -> Result<Tunnel, NotOpened> {
    let stream = match reaching {
        Ok(stream) => slot.insert(stream),
        Err(error) => return Err(not_opened(error, ahead.into_sent(), false, &None)),
    };
    reached(dst);
    let sent = ahead.into_sent();
    match write_held(stream, sent, Bytes::new()).await {
        Ok(tunnel) => Ok(Tunnel {
            direct: true,
            ..tunnel
        }),
        Err((error, taken, went_ahead)) => Err(not_opened(error, taken, went_ahead, &None)),
    }
}
