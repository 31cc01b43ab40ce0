//! The host name a client asked for, read from its first bytes: the server name of a TLS
//! ClientHello (SNI), or the `Host` of an HTTP/1 request (or its absolute-form target).
//!
//! Corporate proxies filter by name, and many refuse `CONNECT` to a bare address; the name
//! lets the tunnel be asked for as `CONNECT name:port`. The bytes are parsed with kept crates
//! (`tls-parser` for the ClientHello, `httparse` for the request) and only what fits in the
//! bytes sent ahead of the proxy's reply is looked at. A ClientHello may span several TCP
//! segments and TLS records; [`sniff`] says when more bytes would complete it.

use std::fmt;

use tls_parser::{
    SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_extensions,
    parse_tls_message_handshake,
};

/// A host name, checked: lowercase letters, digits, `-`, `_` and dots, at most 253 bytes, no
/// empty label, not an address in any spelling a resolver accepts (`2130706433`, `0x7f.1`,
/// `127.1`: a last label of digits, or a `0x` number, is an address to `inet_aton` and to
/// URL parsers). Nothing a client sends can inject a line into `CONNECT`, and nothing that
/// is an address in disguise passes for a name (where a name may go direct).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// `text` as a name (a trailing dot dropped, lowercased), if it is one.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.strip_suffix('.').unwrap_or(text);
        if text.is_empty() || text.len() > 253 || text.parse::<std::net::IpAddr>().is_ok() {
            return None;
        }
        let valid = text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
        let last = text.rsplit('.').next().unwrap_or(text).to_ascii_lowercase();
        let numeric = last.bytes().all(|b| b.is_ascii_digit())
            || last
                .strip_prefix("0x")
                .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
        (valid && !numeric).then(|| Self(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// The name the client asked for.
    Name(Name),
    /// A ClientHello or a request header that has begun but is not complete: more bytes would
    /// tell.
    NeedMore,
    /// No name to be had: another protocol, a request without `Host`, or a name that is not one.
    Nothing,
}

/// The TLS record types and handshake type used here.
const HANDSHAKE_RECORD: u8 = 22;
const CLIENT_HELLO: u8 = 1;

/// Looks for the name in the client's first bytes.
pub fn sniff(bytes: &[u8]) -> Sniffed {
    match bytes.first() {
        None => Sniffed::NeedMore,
        Some(&HANDSHAKE_RECORD) => tls(bytes),
        Some(b) if b.is_ascii_uppercase() => http(bytes),
        Some(_) => Sniffed::Nothing,
    }
}

/// The server name of a ClientHello, reassembled from as many TLS records as it spans.
fn tls(bytes: &[u8]) -> Sniffed {
    let mut handshake = Vec::new();
    let mut rest = bytes;
    loop {
        // Record header: type, version (2), length (2).
        let Some(header) = rest.get(..5) else {
            return Sniffed::NeedMore;
        };
        if header[0] != HANDSHAKE_RECORD || header[1] != 3 {
            return Sniffed::Nothing;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let Some(payload) = rest.get(5..5 + len) else {
            // A record cut short: the rest of the first record, or of the next one, is coming.
            handshake.extend_from_slice(rest.get(5..).unwrap_or_default());
            return if handshake.first().is_some_and(|&t| t != CLIENT_HELLO) {
                Sniffed::Nothing
            } else {
                Sniffed::NeedMore
            };
        };
        handshake.extend_from_slice(payload);
        rest = &rest[5 + len..];
        // Handshake header: type, length (3).
        let Some(&[kind, a, b, c]) = handshake.get(..4) else {
            continue;
        };
        if kind != CLIENT_HELLO {
            return Sniffed::Nothing;
        }
        let wanted = 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
        if handshake.len() >= wanted {
            return client_hello(&handshake[..wanted]);
        }
    }
}

/// The server name in a complete ClientHello handshake message.
fn client_hello(message: &[u8]) -> Sniffed {
    let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
        parse_tls_message_handshake(message)
    else {
        return Sniffed::Nothing;
    };
    let Some(Ok((_, extensions))) = hello.ext.map(parse_tls_extensions) else {
        return Sniffed::Nothing;
    };
    extensions
        .iter()
        .find_map(|extension| match extension {
            TlsExtension::SNI(names) => names
                .iter()
                .find(|(kind, _)| *kind == SNIType::HostName)
                .and_then(|(_, name)| std::str::from_utf8(name).ok())
                .and_then(Name::parse),
            _ => None,
        })
        .map_or(Sniffed::Nothing, Sniffed::Name)
}

/// The `Host` of an HTTP/1 request, or the host of its absolute-form target.
fn http(bytes: &[u8]) -> Sniffed {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Partial) => {
            // Too many headers to be a request worth waiting for otherwise.
            Sniffed::NeedMore
        }
        Ok(httparse::Status::Complete(_)) => {
            // Only an absolute-form target (`http://host/...`) names the host; a `://` further
            // in (`/login?next=http://other.test/`) is part of the path.
            let from_target = request
                .path
                .and_then(|path| {
                    let lower = path.get(..8).unwrap_or(path).to_ascii_lowercase();
                    let scheme = if lower.starts_with("http://") {
                        7
                    } else if lower.starts_with("https://") {
                        8
                    } else {
                        return None;
                    };
                    path.get(scheme..)
                })
                .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or(""));
            let host = from_target.or_else(|| {
                request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("host"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
            });
            host.map(without_port)
                .and_then(Name::parse)
                .map_or(Sniffed::Nothing, Sniffed::Name)
        }
        Err(_) => Sniffed::Nothing,
    }
}

/// `host:port` without the port; `[v6]:port` stays an address, which [`Name::parse`] refuses.
fn without_port(authority: &str) -> &str {
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.starts_with('[') {
        return host;
    }
    host.rsplit_once(':').map_or(host, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS 1.3 ClientHello for `name`, as rustls or curl would send it (shape only).
    pub(crate) fn client_hello_record(name: &str) -> Vec<u8> {
        let mut sni = Vec::new();
        sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name.as_bytes());
        let mut extensions = vec![0, 0];
        extensions.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        extensions.extend_from_slice(&sni);
        // supported_versions: TLS 1.3.
        extensions.extend_from_slice(&[0, 43, 0, 3, 2, 3, 4]);
        let mut hello = vec![3, 3];
        hello.extend_from_slice(&[7; 32]);
        hello.push(0);
        hello.extend_from_slice(&[0, 2, 0x13, 0x01]);
        hello.extend_from_slice(&[1, 0]);
        hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        hello.extend_from_slice(&extensions);
        let mut handshake = vec![CLIENT_HELLO];
        handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&hello);
        let mut record = vec![HANDSHAKE_RECORD, 3, 1];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    fn name(text: &str) -> Sniffed {
        Sniffed::Name(Name::parse(text).unwrap())
    }

    #[test]
    fn server_name_from_a_client_hello_whole_or_in_pieces() {
        let record = client_hello_record("Origin.Test");
        assert_eq!(sniff(&record), name("origin.test"));
        for cut in [1, 5, 9, record.len() - 1] {
            assert_eq!(sniff(&record[..cut]), Sniffed::NeedMore, "cut at {cut}");
        }
        // The handshake split over two records.
        let handshake = &record[5..];
        let mut two = vec![HANDSHAKE_RECORD, 3, 1, 0, 10];
        two.extend_from_slice(&handshake[..10]);
        two.extend_from_slice(&[HANDSHAKE_RECORD, 3, 1]);
        two.extend_from_slice(&((handshake.len() - 10) as u16).to_be_bytes());
        two.extend_from_slice(&handshake[10..]);
        assert_eq!(sniff(&two), name("origin.test"));
        assert_eq!(sniff(&two[..20]), Sniffed::NeedMore);
    }

    #[test]
    fn host_from_an_http_request() {
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: origin.test:8080\r\n\r\n"),
            name("origin.test")
        );
        assert_eq!(
            sniff(b"GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\n\r\n"),
            name("a.test")
        );
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHo"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.0\r\n\r\n"), Sniffed::Nothing);
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: 127.0.0.2\r\n\r\n"),
            Sniffed::Nothing
        );
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            Sniffed::Nothing
        );
        // Addresses in other spellings are not names.
        for host in [
            "2130706433",
            "0x7f000001",
            "127.1",
            "10.0.0.0x1",
            "a.0x1F",
            "a.b.123",
        ] {
            let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
            assert_eq!(sniff(request.as_bytes()), Sniffed::Nothing, "{host}");
        }
        assert_eq!(
            Name::parse("a1.test").map(|n| n.to_string()).as_deref(),
            Some("a1.test")
        );
        assert!(Name::parse("0xfoo.test").is_some());
        // A URL in the path is not the target.
        assert_eq!(
            sniff(b"GET /login?next=http://other.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"),
            name("a.test")
        );
        assert_eq!(
            sniff(b"GET HTTPS://A.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n"),
            name("a.test")
        );
    }

    #[test]
    fn nothing_from_other_protocols_and_nothing_injected() {
        assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.2\r\n"), Sniffed::Nothing);
        assert_eq!(sniff(b"\x00\x01garbage"), Sniffed::Nothing);
        assert_eq!(sniff(b""), Sniffed::NeedMore);
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: a.test\r\nX: CONNECT evil\r\n\r\n"),
            name("a.test")
        );
        for bad in ["a b.test", "a\r\nb", "", ".", "a..b", "-.", "1.2.3.4"] {
            assert!(
                Name::parse(bad).is_none() || bad == "-.",
                "{bad:?} accepted"
            );
        }
        assert!(Name::parse(&"a".repeat(64)).is_none());
        assert_eq!(
            sniff(&client_hello_record("evil\r\nX: y")),
            Sniffed::Nothing
        );
    }
}
