//! What `FindProxyForURL` returns: `PROXY host:port; HTTPS host:port; SOCKS5 host:port;
//! DIRECT`, tried in order. Written by whoever wrote the PAC file, so read strictly: a word
//! that is not one of these, or a host:port that does not parse, is an error naming it (the
//! whole answer is refused: half an answer could send a tunnel somewhere the script did not
//! mean).

use std::fmt;

use crate::upstream::{Hop, MAX_HOPS, ProxyUrl};

/// A result that cannot be used, with the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadResult(pub String);

impl fmt::Display for BadResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FindProxyForURL returned {}", self.0)
    }
}

/// Longest result read; a script returning more is broken.
const MAX_RESULT: usize = 4096;

/// Parses a `FindProxyForURL` result into the upstreams to try, in order (at most
/// [`MAX_HOPS`]; later ones are dropped, as a browser would never reach them either).
/// `SOCKS` is taken as SOCKS5 (transproxy speaks no SOCKS4).
pub fn parse(result: &str) -> Result<Vec<Hop>, BadResult> {
    if result.len() > MAX_RESULT {
        return Err(BadResult(format!("{} bytes", result.len())));
    }
    let mut hops = Vec::new();
    for entry in result.split(';') {
        let mut words = entry.split_whitespace();
        let Some(kind) = words.next() else {
            continue;
        };
        let target = words.next();
        if let Some(extra) = words.next() {
            return Err(BadResult(format!(
                "'{}' after '{kind}'",
                extra.escape_default()
            )));
        }
        let hop = match (kind.to_ascii_uppercase().as_str(), target) {
            ("DIRECT", None) => Hop::Direct,
            ("PROXY" | "HTTP", Some(target)) => proxy("http", target)?,
            ("HTTPS", Some(target)) => proxy("https", target)?,
            ("SOCKS" | "SOCKS5", Some(target)) => proxy("socks5", target)?,
            (other, _) => {
                return Err(BadResult(format!(
                    "'{}' (expected PROXY, HTTPS, SOCKS, SOCKS5 with host:port, or DIRECT)",
                    other.escape_default()
                )));
            }
        };
        if hops.len() < MAX_HOPS {
            hops.push(hop);
        }
    }
    if hops.is_empty() {
        return Err(BadResult("nothing".to_owned()));
    }
    Ok(hops)
}

/// `host:port` as a proxy of `scheme`; the port is required (a PAC file always names it).
fn proxy(scheme: &str, target: &str) -> Result<Hop, BadResult> {
    let bad = || {
        BadResult(format!(
            "'{}' (expected host:port)",
            target.escape_default()
        ))
    };
    if target.contains(['@', '/', '?', '#']) {
        return Err(bad());
    }
    let (_, port) = target.rsplit_once(':').ok_or_else(bad)?;
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    ProxyUrl::parse(&format!("{scheme}://{target}"), "the PAC result")
        .map(Hop::Proxy)
        .map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_as_browsers_write_them() {
        let hops = parse("PROXY 127.0.0.1:3128; HTTPS proxy.test:443;SOCKS5 [::1]:1080; SOCKS 127.0.0.1:9050; DIRECT").unwrap();
        let shown: Vec<String> = hops.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "http://127.0.0.1:3128",
                "https://proxy.test:443",
                "socks5://[::1]:1080",
                "socks5://127.0.0.1:9050",
                "direct"
            ]
        );
        assert_eq!(parse(" direct ").unwrap().len(), 1);
        assert_eq!(parse("DIRECT;").unwrap().len(), 1);
    }

    #[test]
    fn nonsense_is_refused_whole() {
        for bad in [
            "",
            ";;",
            "PROXY",
            "PROXY 127.0.0.1",
            "PROXY 127.0.0.1:0",
            "PROXY 127.0.0.1:99999",
            "PROXY user:pw@127.0.0.1:3128",
            "PROXY 127.0.0.1:3128 extra",
            "FTP 127.0.0.1:21",
            "DIRECT 127.0.0.1:1",
            "PROXY 127.0.0.1:3128; BOGUS",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&"DIRECT;".repeat(2000)).is_err());
    }
}
