//! Proxy auto-configuration: the network's PAC file (`--pac FILE|URL`) decides, per
//! connection, which upstreams to try, from the name the application asked for (sniffed, or
//! learned from DNS) or the address. No other transparent proxy evaluates a PAC file on the
//! recovered host name.
//!
//! The script runs on a thread of its own ([`engine`]), one call at a time, each cut after
//! [`engine::EVAL_LIMIT`]; tunnels wait for its answer without holding up anything else, and
//! answers are kept per host, port, scheme and destination address for [`CACHE_KEEP`]. A
//! script that cannot be loaded, throws, runs too long or returns nonsense fails the tunnel
//! (reset, one line); `--pac-fallback direct` sends the script's own failures direct (not a
//! busy or slow script, which a client can cause): nothing goes direct silently.

mod engine;
pub mod result;
mod source;

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    sync::{Mutex, OnceLock, PoisonError, mpsc},
    time::{Duration, Instant},
};

pub use source::PacSource;
use tokio::sync::oneshot;

use crate::upstream::Hop;

/// How long an answer is kept for its host, port and scheme.
const CACHE_KEEP: Duration = Duration::from_secs(30);

/// Most answers kept.
const CACHE_ENTRIES: usize = 4096;

/// Questions waiting for the script at most; beyond, tunnels fail at once rather than queue.
const QUEUE: usize = 1024;

/// Longest path handed to the script (the rest is cut off).
const MAX_PATH: usize = 1024;

/// How long a tunnel waits for its answer, queueing included.
const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Answers kept: by host, port, TLS and destination address (the script may decide on the
/// address: `dnsResolve(host)` is where the connection goes), when answered and what.
type Answers = HashMap<(String, u16, bool, IpAddr), (Instant, Vec<Hop>)>;

/// What happens when the script gives no usable answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PacFallback {
    /// The tunnel fails (the client is reset).
    #[default]
    Reset,
    /// The daemon connects to the destination itself.
    Direct,
}

/// Why the script gave no usable answer. One line each.
#[derive(Debug, Clone)]
pub enum PacError {
    /// The script could not be fetched or compiled (and none was before).
    NotLoaded(String),
    /// `FindProxyForURL` threw.
    Threw(String),
    /// It ran longer than the limit and was cut.
    TimedOut,
    /// It returned something other than a string.
    NotAString,
    /// Its answer does not parse.
    Bad(result::BadResult),
    /// Too many questions waiting, or the script's thread is gone.
    Busy,
    /// No entry of its answer could be used: proxies that do not resolve, or DIRECT for a
    /// name that does not lead to the destination.
    NothingUsable,
}

impl PacError {
    /// Whether the script itself failed (it cannot be loaded, throws, returns nonsense), as
    /// opposed to being busy or cut for time, which a client can cause.
    pub(crate) fn is_the_scripts(&self) -> bool {
        matches!(
            self,
            Self::NotLoaded(_) | Self::Threw(_) | Self::NotAString | Self::Bad(_)
        )
    }
}

impl fmt::Display for PacError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotLoaded(why) => write!(f, "PAC: no script ({why})"),
            Self::Threw(why) => write!(f, "PAC: FindProxyForURL threw: {why}"),
            Self::TimedOut => write!(
                f,
                "PAC: FindProxyForURL ran longer than {} ms and was cut",
                engine::EVAL_LIMIT.as_millis()
            ),
            Self::NotAString => write!(f, "PAC: FindProxyForURL returned no string"),
            Self::Bad(bad) => write!(f, "PAC: {bad}"),
            Self::Busy => write!(f, "PAC: too many connections waiting for the script"),
            Self::NothingUsable => write!(
                f,
                "PAC: nothing in the answer can be used (its proxies do not resolve, or DIRECT names a host that does not lead to this address here)"
            ),
        }
    }
}

/// The PAC script, shared by every tunnel.
pub(crate) struct Pac {
    source: PacSource,
    refresh: Duration,
    /// Made by [`Pac::start`], once the daemon has dropped its privileges.
    requests: OnceLock<mpsc::SyncSender<engine::Request>>,
    cache: Mutex<Answers>,
}

impl Pac {
    pub(crate) fn new(source: PacSource, refresh: Duration) -> Self {
        Self {
            source,
            refresh,
            requests: OnceLock::new(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn source(&self) -> &PacSource {
        &self.source
    }

    /// Starts the script's thread, which loads the script (a thread: the daemon starts none
    /// before it has dropped its privileges).
    pub(crate) fn start(&self) -> anyhow::Result<()> {
        let (send, receive) = mpsc::sync_channel(QUEUE);
        let (source, refresh, myself) = (self.source.clone(), self.refresh, send.clone());
        std::thread::Builder::new()
            .name("transproxy-pac".into())
            .spawn(move || engine::run(source, refresh, receive, myself))?;
        let _ = self.requests.set(send);
        Ok(())
    }

    /// Fetches and compiles the script again (SIGHUP); answers kept so far are dropped.
    pub(crate) fn reload(&self) {
        if let Some(requests) = self.requests.get() {
            let _ = requests.try_send(engine::Request::Reload);
        }
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The upstreams for `url` (whose host is `host`, at `dst`), as the script says.
    pub(crate) async fn find(
        &self,
        url: String,
        host: String,
        port: u16,
        tls: bool,
        dst: IpAddr,
    ) -> Result<Vec<Hop>, PacError> {
        let key = (host.to_ascii_lowercase(), port, tls, dst);
        if let Some((at, hops)) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            && at.elapsed() < CACHE_KEEP
        {
            return Ok(hops.clone());
        }
        let requests = self.requests.get().ok_or(PacError::Busy)?;
        let (reply, answer) = oneshot::channel();
        requests
            .try_send(engine::Request::Find {
                url,
                host,
                dst,
                reply,
            })
            .map_err(|_| PacError::Busy)?;
        let hops = tokio::time::timeout(ANSWER_WAIT, answer)
            .await
            .map_err(|_| PacError::Busy)?
            .map_err(|_| PacError::Busy)??;
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, (Instant::now(), hops.clone()));
        Ok(hops)
    }
}

/// The URL a browser would hand `FindProxyForURL` for this connection: `https://host/` for
/// TLS, `http://host[:port]/path` for an HTTP request whose line was read, else by port.
pub(crate) fn url_for(host: &str, port: u16, first_bytes: &[u8]) -> (String, bool) {
    let host_part = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let tls = first_bytes.first() == Some(&0x16) || (first_bytes.is_empty() && port == 443);
    if tls {
        let port = if port == 443 {
            String::new()
        } else {
            format!(":{port}")
        };
        return (format!("https://{host_part}{port}/"), true);
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let path = match request.parse(first_bytes) {
        Ok(_) => request
            .path
            .filter(|p| p.starts_with('/'))
            .unwrap_or("/")
            .to_owned(),
        Err(_) => "/".to_owned(),
    };
    let port = if port == 80 {
        String::new()
    } else {
        format!(":{port}")
    };
    // The client writes the path: a long one would only make the script slow for everyone.
    let mut path = path;
    if path.len() > MAX_PATH {
        let mut cut = MAX_PATH;
        while !path.is_char_boundary(cut) {
            cut -= 1;
        }
        path.truncate(cut);
    }
    (format!("http://{host_part}{port}{path}"), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_as_browsers_build_them() {
        let hello = [0x16, 0x03, 0x01];
        assert_eq!(
            url_for("a.test", 443, &hello),
            ("https://a.test/".to_owned(), true)
        );
        assert_eq!(
            url_for("a.test", 8443, &hello),
            ("https://a.test:8443/".to_owned(), true)
        );
        assert_eq!(
            url_for("a.test", 80, b"GET /x?y=1 HTTP/1.1\r\nHost: a.test\r\n\r\n").0,
            "http://a.test/x?y=1"
        );
        assert_eq!(
            url_for("a.test", 8080, b"GET /p HTTP/1.1\r\n").0,
            "http://a.test:8080/p"
        );
        assert_eq!(
            url_for("2001:db8::1", 22, b"").0,
            "http://[2001:db8::1]:22/"
        );
        assert_eq!(url_for("a.test", 443, b"").0, "https://a.test/");
    }
}
