//! The upstream proxies: what kind each is, where it is and how to authenticate to it, and the
//! list tunnels try in order ([`ProxyList`], with `direct` for the destination itself).
//!
//! Credentials are kept out of every `Display` and `Debug` output, so no log line or error can
//! leak them.

use std::{
    env, fmt,
    net::{SocketAddr, ToSocketAddrs as _},
};

use anyhow::{Context as _, anyhow, bail};
use percent_encoding::percent_decode_str;
use url::Url;

/// Environment variables consulted when `--proxy` is absent, in this order (as curl does, with
/// the HTTPS one first because nearly everything tunnelled is TLS).
pub const PROXY_ENV_VARS: [&str; 6] = [
    "https_proxy",
    "HTTPS_PROXY",
    "http_proxy",
    "HTTP_PROXY",
    "all_proxy",
    "ALL_PROXY",
];

/// Port used when the URL names none, as curl does for proxies (but `https://`, 443).
const DEFAULT_PROXY_PORT: u16 = 1080;

/// How a proxy is spoken to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyKind {
    /// `http://`: `CONNECT host:port` over plain TCP.
    Http,
    /// `https://`: `CONNECT` over TLS to the proxy.
    Https,
    /// `socks5://`: SOCKS5, asked for the host name when one is known, else the address.
    Socks5,
    /// `socks5h://`: SOCKS5, always asked for a host name; a tunnel without one fails rather
    /// than hand the proxy an address resolved on this side.
    Socks5h,
}

impl ProxyKind {
    /// The URL scheme.
    pub fn scheme(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::Socks5 => "socks5",
            Self::Socks5h => "socks5h",
        }
    }

    /// Whether the proxy speaks SOCKS5.
    pub fn is_socks(self) -> bool {
        matches!(self, Self::Socks5 | Self::Socks5h)
    }
}

/// A proxy: `http://`, `https://`, `socks5://` or `socks5h://`.
#[derive(Clone)]
pub struct ProxyUrl {
    kind: ProxyKind,
    host: String,
    port: u16,
    /// The user and password, if given (in the URL, or by `--proxy-auth-*`).
    credentials: Option<super::Credentials>,
}

impl ProxyUrl {
    /// Parses `SCHEME://[user[:password]@]host[:port][/]`, SCHEME being `http`, `https`,
    /// `socks5` or `socks5h`. A URL without a scheme is taken as `http://`, as proxy
    /// environment variables often omit it.
    ///
    /// `source` names where the text came from, for the error message; the text itself is never
    /// echoed because it may contain a password.
    pub fn parse(text: &str, source: &str) -> anyhow::Result<Self> {
        let text = text.trim();
        let with_scheme = if text.contains("://") {
            text.to_owned()
        } else {
            format!("http://{text}")
        };
        let url = Url::parse(&with_scheme)
            .map_err(|err| anyhow!("invalid proxy URL in {source}: {err}"))?;
        let kind = match url.scheme() {
            "http" => ProxyKind::Http,
            "https" => ProxyKind::Https,
            "socks5" => ProxyKind::Socks5,
            "socks5h" => ProxyKind::Socks5h,
            other => bail!(
                "unsupported proxy scheme '{other}' in {source}: use http://, https://, socks5:// or socks5h://"
            ),
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            bail!(
                "proxy URL in {source} has a path, query or fragment: a proxy is a host and a port, such as http://proxy.example:3128"
            );
        }
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => bail!("proxy URL in {source} has no host"),
        };
        let port = match url.port() {
            Some(0) => bail!("proxy URL in {source} has port 0"),
            Some(port) => port,
            // `Url` hides the port when it equals the scheme's default.
            None if has_explicit_port(&with_scheme) => match kind {
                ProxyKind::Https => 443,
                _ => 80,
            },
            None if kind == ProxyKind::Https => 443,
            None => DEFAULT_PROXY_PORT,
        };
        let credentials = if url.username().is_empty() && url.password().is_none() {
            None
        } else {
            let user =
                decode(url.username()).with_context(|| format!("proxy user name in {source}"))?;
            let password = decode(url.password().unwrap_or(""))
                .with_context(|| format!("proxy password in {source}"))?;
            Some(super::Credentials::new(user, password))
        };
        if kind.is_socks()
            && let Some(credentials) = &credentials
            && (credentials.user.len() > 255 || credentials.password().len() > 255)
        {
            bail!("proxy credentials in {source} are too long for SOCKS5 (255 bytes each at most)");
        }
        Ok(Self {
            kind,
            host,
            port,
            credentials,
        })
    }

    /// The same proxy with no credentials.
    pub fn without_credentials(mut self) -> Self {
        self.credentials = None;
        self
    }

    /// How the proxy is spoken to.
    pub fn kind(&self) -> ProxyKind {
        self.kind
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Takes the proxy from the first proxy environment variable that is set.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_env_with(|name| env::var(name).ok())
    }

    fn from_env_with(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        for name in PROXY_ENV_VARS {
            if let Some(value) = lookup(name).filter(|v| !v.trim().is_empty()) {
                return Self::parse(&value, name);
            }
        }
        bail!(
            "no upstream proxy: pass --proxy URL or set one of {}",
            PROXY_ENV_VARS.join(", ")
        )
    }

    /// The same proxy with credentials given as `USER:PASSWORD` (not percent-encoded), from
    /// `source` (named in errors; the value never is).
    pub fn with_credentials(mut self, user_password: &str, source: &str) -> anyhow::Result<Self> {
        let user_password = user_password.trim_end_matches(['\r', '\n']);
        if !user_password.contains(':') || user_password.contains(['\r', '\n']) {
            bail!("proxy credentials in {source} must be one line, USER:PASSWORD");
        }
        let (user, password) = user_password.split_once(':').unwrap_or((user_password, ""));
        self.credentials = Some(super::Credentials::new(
            user.to_owned(),
            password.to_owned(),
        ));
        Ok(self)
    }

    /// Resolves the proxy's host to the addresses to connect to (and to exclude from
    /// interception, so its own traffic never loops).
    pub fn resolve(&self) -> anyhow::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve proxy host {}", self.host))?
            .collect();
        if addrs.is_empty() {
            bail!("proxy host {} has no address", self.host);
        }
        Ok(addrs)
    }

    /// Whether the proxy is named by an IP address, which no lookup can move.
    pub fn named_by_address(&self) -> bool {
        self.host.parse::<std::net::IpAddr>().is_ok()
    }

    /// The `Proxy-Authorization` header value, if credentials were given.
    pub fn authorization(&self) -> Option<String> {
        self.credentials.as_ref().map(super::Credentials::basic)
    }

    /// The user and password, if given.
    pub fn credentials(&self) -> Option<&super::Credentials> {
        self.credentials.as_ref()
    }

    /// The proxy's host, as written (a name, or an address).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether `other` names the same proxy (kind, host and port), whatever the credentials.
    pub fn same_server(&self, other: &Self) -> bool {
        (self.kind, &self.host, self.port) == (other.kind, &other.host, other.port)
    }
}

/// Shows the proxy with credentials masked: `http://***@host:port`.
impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.kind.scheme();
        let auth = if self.credentials.is_some() {
            "***@"
        } else {
            ""
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://{auth}[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{auth}{}:{}", self.host, self.port)
        }
    }
}

/// One entry of the upstream list: a proxy, or `direct` (the daemon connects to the
/// destination itself).
#[derive(Clone, Debug)]
pub enum Hop {
    Proxy(ProxyUrl),
    Direct,
}

impl Hop {
    /// Parses a proxy URL, or `direct` (any case, as PAC files write `DIRECT`).
    pub fn parse(text: &str, source: &str) -> anyhow::Result<Self> {
        if text.trim().eq_ignore_ascii_case("direct") {
            return Ok(Self::Direct);
        }
        ProxyUrl::parse(text, source).map(Self::Proxy)
    }
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Proxy(proxy) => proxy.fmt(f),
            Self::Direct => f.write_str("direct"),
        }
    }
}

/// The upstreams, tried in order: the first that can be reached carries the tunnel.
#[derive(Clone, Debug)]
pub struct ProxyList(Vec<Hop>);

impl ProxyList {
    /// The list from `entries` (from `source`, named in errors); at least one, at most
    /// [`MAX_HOPS`], `direct` at most once.
    pub fn parse(entries: &[String], source: &str) -> anyhow::Result<Self> {
        if entries.is_empty() {
            bail!("{source} names no proxy");
        }
        if entries.len() > MAX_HOPS {
            bail!(
                "{source} names {} proxies; {MAX_HOPS} at most",
                entries.len()
            );
        }
        let hops = entries
            .iter()
            .map(|entry| Hop::parse(entry, source))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if hops.iter().filter(|h| matches!(h, Hop::Direct)).count() > 1 {
            bail!("{source} names direct more than once");
        }
        Ok(Self(hops))
    }

    /// No proxy at all (a PAC file names them).
    pub fn none() -> Self {
        Self(Vec::new())
    }

    /// One proxy.
    pub fn one(proxy: ProxyUrl) -> Self {
        Self(vec![Hop::Proxy(proxy)])
    }

    pub fn hops(&self) -> &[Hop] {
        &self.0
    }

    /// The proxies, in order (without `direct`).
    pub fn proxies(&self) -> impl Iterator<Item = &ProxyUrl> {
        self.0.iter().filter_map(|hop| match hop {
            Hop::Proxy(proxy) => Some(proxy),
            Hop::Direct => None,
        })
    }

    /// Whether any proxy carries credentials.
    pub fn has_credentials(&self) -> bool {
        self.proxies().any(|p| p.credentials.is_some())
    }

    /// The same list with credentials given as `USER:PASSWORD` for every proxy: they were
    /// named by the user, so they may receive them.
    pub fn with_credentials(self, user_password: &str, source: &str) -> anyhow::Result<Self> {
        self.0
            .into_iter()
            .map(|hop| match hop {
                Hop::Proxy(proxy) => proxy
                    .with_credentials(user_password, source)
                    .map(Hop::Proxy),
                Hop::Direct => Ok(Hop::Direct),
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map(Self)
    }

    /// Whether `other` lists the same proxies in the same order, whatever the credentials.
    pub fn same_servers(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self.0.iter().zip(&other.0).all(|pair| match pair {
                (Hop::Proxy(a), Hop::Proxy(b)) => a.same_server(b),
                (Hop::Direct, Hop::Direct) => true,
                _ => false,
            })
    }
}

/// Most entries in the upstream list: each is tried in turn, and a longer list only delays
/// failing.
pub const MAX_HOPS: usize = 8;

/// `http://a:3128, direct`.
impl fmt::Display for ProxyList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, hop) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            hop.fmt(f)?;
        }
        Ok(())
    }
}

/// Same as `Display`, so that `{:?}` cannot leak credentials either.
impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Reads a file holding a secret, after checking that only root can read it: owned by root,
/// no permission bits for group or others.
pub fn read_secret_file(path: &std::path::Path) -> anyhow::Result<String> {
    let bytes = read_secret_file_bytes(path)?;
    String::from_utf8(bytes).map_err(|_| anyhow!("{} is not text", path.display()))
}

/// Reads a file holding a secret (a password, a keytab), after checking that only root can
/// read it: owned by root, no permission bits for group or others.
pub fn read_secret_file_bytes(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::MetadataExt as _;
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        bail!(
            "{} must be owned by root and readable by root only (chmod 600), as it holds the proxy's credentials",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn decode(component: &str) -> anyhow::Result<String> {
    percent_decode_str(component)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| anyhow!("is not valid UTF-8 after percent-decoding"))
}

/// Whether the authority part of `url` spells out a port (`http://host:80` vs `http://host`).
fn has_explicit_port(url: &str) -> bool {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    match host_port.rsplit_once(':') {
        Some((host, _)) => !host.starts_with('[') || host.ends_with(']'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_one_line() {
        let proxy = || ProxyUrl::parse("http://127.0.0.1:3128", "test").unwrap();
        assert!(proxy().with_credentials("bob:secret\n", "f").is_ok());
        let err = proxy()
            .with_credentials("bob:secret\nextra\n", "f")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("proxy credentials in f must be one line, USER:PASSWORD")
        );
    }

    #[test]
    fn parses_host_port_and_credentials() {
        let proxy = ProxyUrl::parse("http://al%40ice:p%3Ass@127.0.0.1:3128/", "test").unwrap();
        assert_eq!(proxy.host, "127.0.0.1");
        assert_eq!(proxy.port, 3128);
        // base64("al@ice:p:ss")
        assert_eq!(
            proxy.authorization().as_deref(),
            Some("Basic YWxAaWNlOnA6c3M=")
        );
    }

    #[test]
    fn display_and_debug_mask_credentials() {
        let proxy = ProxyUrl::parse("http://alice:secret@127.0.0.1:3128", "test").unwrap();
        for shown in [proxy.to_string(), format!("{proxy:?}")] {
            assert_eq!(shown, "http://***@127.0.0.1:3128");
        }
    }

    #[test]
    fn scheme_less_and_default_ports() {
        let proxy = ProxyUrl::parse("127.0.0.1:8080", "test").unwrap();
        assert_eq!((proxy.host.as_str(), proxy.port), ("127.0.0.1", 8080));
        assert_eq!(ProxyUrl::parse("http://127.0.0.1", "t").unwrap().port, 1080);
        assert_eq!(
            ProxyUrl::parse("http://127.0.0.1:80", "t").unwrap().port,
            80
        );
        assert_eq!(ProxyUrl::parse("http://[::1]:80", "t").unwrap().port, 80);
        assert_eq!(ProxyUrl::parse("http://[::1]", "t").unwrap().port, 1080);
        assert_eq!(
            ProxyUrl::parse("http://[::1]:3128", "t")
                .unwrap()
                .to_string(),
            "http://[::1]:3128"
        );
    }

    #[test]
    fn errors_are_one_line_and_never_echo_the_password() {
        for bad in [
            "http://alice:secret@127.0.0.1:99999",
            "socks4://alice:secret@127.0.0.1:1080",
            "ftp://alice:secret@127.0.0.1:3128",
            "http://alice:secret@",
            "http://alice:secret@127.0.0.1:0",
            "http://alice:%ff@127.0.0.1:3128",
            "http://alice:secret@127.0.0.1:3128/proxy.pac",
        ] {
            let err = format!("{:#}", ProxyUrl::parse(bad, "--proxy").unwrap_err());
            assert!(!err.contains("secret"), "{err}");
            assert!(!err.contains('\n'), "{err}");
            assert!(err.contains("--proxy"), "{err}");
        }
    }

    #[test]
    fn kinds_and_their_default_ports() {
        for (url, kind, port, shown) in [
            (
                "https://proxy.test",
                ProxyKind::Https,
                443,
                "https://proxy.test:443",
            ),
            (
                "https://proxy.test:443",
                ProxyKind::Https,
                443,
                "https://proxy.test:443",
            ),
            (
                "socks5://u:p@127.0.0.1",
                ProxyKind::Socks5,
                1080,
                "socks5://***@127.0.0.1:1080",
            ),
            (
                "socks5h://[::1]:9050",
                ProxyKind::Socks5h,
                9050,
                "socks5h://[::1]:9050",
            ),
            (
                "http://127.0.0.1:3128",
                ProxyKind::Http,
                3128,
                "http://127.0.0.1:3128",
            ),
        ] {
            let proxy = ProxyUrl::parse(url, "t").unwrap();
            assert_eq!((proxy.kind(), proxy.port()), (kind, port), "{url}");
            assert_eq!(proxy.to_string(), shown);
        }
        let long = format!("socks5://{}:p@127.0.0.1", "u".repeat(256));
        let err = ProxyUrl::parse(&long, "--proxy").unwrap_err().to_string();
        assert!(err.contains("255"), "{err}");
    }

    #[test]
    fn lists_take_direct_once_and_credentials_for_every_proxy() {
        let entries = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let list = ProxyList::parse(
            &entries(&["http://127.0.0.1:3128", "socks5://127.0.0.1:1080", "DIRECT"]),
            "--proxy",
        )
        .unwrap();
        assert_eq!(
            list.to_string(),
            "http://127.0.0.1:3128, socks5://127.0.0.1:1080, direct"
        );
        assert_eq!(list.proxies().count(), 2);
        let list = list.with_credentials("bob:pw", "FILE").unwrap();
        assert!(list.proxies().all(|p| p.credentials().is_some()));
        for bad in [
            entries(&[]),
            entries(&["direct", "direct"]),
            entries(&["http://127.0.0.1:1"; MAX_HOPS + 1]),
            entries(&["http://127.0.0.1:1", "gopher://x"]),
        ] {
            let err = ProxyList::parse(&bad, "--proxy").unwrap_err().to_string();
            assert!(err.contains("--proxy"), "{err}");
        }
    }

    #[test]
    fn credentials_from_elsewhere_replace_the_url_ones() {
        let proxy = ProxyUrl::parse("http://127.0.0.1:3128", "t").unwrap();
        let proxy = proxy.with_credentials("al@ice:p:ss\n", "VAR").unwrap();
        assert_eq!(
            proxy.authorization().as_deref(),
            Some("Basic YWxAaWNlOnA6c3M=")
        );
        let err = ProxyUrl::parse("http://127.0.0.1:3128", "t")
            .unwrap()
            .with_credentials("secret", "VAR")
            .unwrap_err()
            .to_string();
        assert!(err.contains("VAR") && !err.contains("secret"), "{err}");
    }

    #[test]
    fn environment_order_and_absence() {
        let env = |set: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                set.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let proxy = ProxyUrl::from_env_with(env(&[
            ("HTTP_PROXY", "127.0.0.1:2"),
            ("https_proxy", "127.0.0.1:1"),
        ]))
        .unwrap();
        assert_eq!(proxy.port, 1);
        let proxy =
            ProxyUrl::from_env_with(env(&[("ALL_PROXY", "127.0.0.1:6"), ("http_proxy", "")]))
                .unwrap();
        assert_eq!(proxy.port, 6);
        let err = ProxyUrl::from_env_with(env(&[])).unwrap_err().to_string();
        assert!(
            err.contains("--proxy") && err.contains("https_proxy"),
            "{err}"
        );
    }
}
