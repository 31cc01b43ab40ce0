//! Where the PAC file comes from: a file, or an `http://` URL (fetched by the daemon, whose
//! own connections are never intercepted). Bounded in size and time: a PAC server that hangs
//! or sends a gigabyte costs one failed refresh, and the last good script stays.

use std::{
    fmt,
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};

/// Largest PAC file read; real ones are a few kilobytes.
const MAX_PAC: usize = 1 << 20;

/// How long fetching a PAC URL may take, per step (connect, each read).
const FETCH_WAIT: Duration = Duration::from_secs(5);

/// How long fetching a PAC URL may take in all: a server trickling bytes cannot hold a
/// refresh for longer.
const FETCH_LIMIT: Duration = Duration::from_secs(15);

/// `--pac FILE|URL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PacSource {
    File(PathBuf),
    /// `http://host[:port]/path`.
    Url {
        host: String,
        port: u16,
        path: String,
    },
}

impl PacSource {
    /// Reads `--pac`'s value: `http://...`, `file:///...` or a path.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let text = text.trim();
        if let Some(path) = text.strip_prefix("file://") {
            return Ok(Self::File(PathBuf::from(path)));
        }
        if !text.contains("://") {
            return Ok(Self::File(PathBuf::from(text)));
        }
        let url = url::Url::parse(text).map_err(|err| anyhow!("--pac: {err}"))?;
        if url.scheme() != "http" {
            bail!(
                "--pac: {}:// is not supported: give an http:// URL or a file",
                url.scheme()
            );
        }
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => bail!("--pac: the URL has no host"),
        };
        let mut path = url.path().to_owned();
        if let Some(query) = url.query() {
            path = format!("{path}?{query}");
        }
        Ok(Self::Url {
            host,
            port: url.port().unwrap_or(80),
            path,
        })
    }

    /// The script's text, now. Blocking: called on the PAC thread only.
    pub(super) fn fetch(&self) -> anyhow::Result<String> {
        let bytes = match self {
            Self::File(path) => {
                let mut bytes = Vec::new();
                std::fs::File::open(path)
                    .with_context(|| format!("cannot read {}", path.display()))?
                    .take(MAX_PAC as u64 + 1)
                    .read_to_end(&mut bytes)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                bytes
            }
            Self::Url { host, port, path } => get(host, *port, path)?,
        };
        if bytes.len() > MAX_PAC {
            bail!("the PAC file is larger than {} KiB", MAX_PAC / 1024);
        }
        String::from_utf8(bytes).map_err(|_| anyhow!("the PAC file is not UTF-8 text"))
    }
}

impl fmt::Display for PacSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            // The query may hold a token: never shown.
            Self::Url { host, port, path } => {
                let (path, query) = path
                    .split_once('?')
                    .map_or((path.as_str(), ""), |(p, _)| (p, "?..."));
                if host.contains(':') {
                    write!(f, "http://[{host}]:{port}{path}{query}")
                } else {
                    write!(f, "http://{host}:{port}{path}{query}")
                }
            }
        }
    }
}

/// An HTTP/1.0 GET (so no chunked answer), the body of a 200 answer.
fn get(host: &str, port: u16, path: &str) -> anyhow::Result<Vec<u8>> {
    let addr = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .ok_or_else(|| anyhow!("{host} has no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, FETCH_WAIT)
        .with_context(|| format!("cannot reach {addr}"))?;
    stream.set_write_timeout(Some(FETCH_WAIT))?;
    let host_header = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {host_header}\r\nUser-Agent: transproxy\r\nAccept: application/x-ns-proxy-autoconfig, */*\r\n\r\n"
    )?;
    let deadline = std::time::Instant::now() + FETCH_LIMIT;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            bail!("the answer took longer than {} s", FETCH_LIMIT.as_secs());
        }
        stream.set_read_timeout(Some(left.min(FETCH_WAIT)))?;
        let read = stream.read(&mut chunk).context("reading the answer")?;
        if read == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..read]);
        if answer.len() > MAX_PAC + 64 * 1024 {
            bail!("the answer is larger than {} KiB", MAX_PAC / 1024);
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let header_len = match response.parse(&answer).context("the answer is not HTTP")? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => bail!("the answer ended inside its header"),
    };
    let code = response.code.unwrap_or(0);
    if code != 200 {
        bail!(
            "the server answered {code} {}",
            response.reason.unwrap_or("").escape_default()
        );
    }
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let mut body = answer.split_off(header_len);
    if let Some(length) = length {
        if body.len() < length {
            bail!("the answer ended after {} of {length} bytes", body.len());
        }
        body.truncate(length);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        assert_eq!(
            PacSource::parse("/etc/proxy.pac").unwrap(),
            PacSource::File("/etc/proxy.pac".into())
        );
        assert_eq!(
            PacSource::parse("file:///etc/proxy.pac").unwrap(),
            PacSource::File("/etc/proxy.pac".into())
        );
        let url = PacSource::parse("http://wpad.test/wpad.dat?x=1").unwrap();
        assert_eq!(url.to_string(), "http://wpad.test:80/wpad.dat?...");
        let err = PacSource::parse("https://wpad.test/wpad.dat")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--pac") && err.contains("https"), "{err}");
    }
}
