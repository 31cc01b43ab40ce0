//! The HTTP CONNECT handshake: `CONNECT ip:port` to the proxy and reading its reply, with the
//! client's bytes sent ahead of it.

use std::{fmt, io, net::SocketAddr, time::Duration};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::ahead::Ahead;
use crate::sniff::Name;
use crate::{error_page, relay::reset};

/// The proxy's reply header may not exceed this; a proxy sending more is broken or hostile.
pub(super) const MAX_REPLY_HEADER: usize = 16 * 1024;

/// How many reply headers are parsed; proxies send a handful.
pub(crate) const MAX_REPLY_HEADERS: usize = 64;

/// What every CONNECT request needs: the proxy's credentials, the reply timeout, and whether
/// a rejection's page is kept for the client (`--on-proxy-error=http`).
pub(super) struct HttpConnect {
    /// The `Proxy-Authorization` value, if credentials were given.
    authorization: Option<String>,
    reply_timeout: Duration,
    keep_error_page: bool,
}

/// A non-2xx answer to CONNECT.
#[derive(Debug)]
pub struct Rejection {
    pub code: u16,
    /// `HTTP/1.1 403 Forbidden`, escaped to one printable line.
    pub status_line: String,
    /// The whole reply as the proxy sent it (header and as much body as arrived, bounded), for
    /// `--on-proxy-error=http`. Empty unless asked for.
    pub page: Bytes,
    /// For a 407: the authentication schemes the proxy offered (`Proxy-Authenticate`), so the
    /// log can say what it wants.
    pub schemes: Vec<String>,
    /// Whether the request carried credentials.
    pub credentials_sent: bool,
}

/// The schemes transproxy can answer with today.
const SUPPORTED_SCHEMES: [&str; 1] = ["Basic"];

impl Rejection {
    /// For a 407, what the proxy wants and why it was not given: the schemes it offered,
    /// whether credentials were sent, and schemes transproxy does not speak.
    fn authentication_hint(&self) -> String {
        if self.code != 407 {
            return String::new();
        }
        let offered = if self.schemes.is_empty() {
            "it names no scheme (no Proxy-Authenticate header)".to_owned()
        } else {
            format!("it asks for {}", self.schemes.join(", "))
        };
        let unsupported: Vec<&str> = self
            .schemes
            .iter()
            .map(String::as_str)
            .filter(|scheme| {
                !SUPPORTED_SCHEMES
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(scheme))
            })
            .collect();
        let unsupported = if unsupported.is_empty() {
            String::new()
        } else {
            format!(
                " ({} not supported yet; transproxy speaks {})",
                unsupported.join(", "),
                SUPPORTED_SCHEMES.join(", ")
            )
        };
        let sent = if self.credentials_sent {
            "; the credentials sent (Basic) were not accepted"
        } else {
            "; no credentials were sent: give them in the proxy URL, --proxy-auth-env or --proxy-auth-file"
        };
        format!(": {offered}{unsupported}{sent}")
    }
}

impl Rejection {
    /// Whether the proxy says the destination refused the connection or cannot be reached:
    /// 502, 503 and 504 (squid answers a refused connect with 503 and `X-Squid-Error:
    /// ERR_CONNECT_FAIL 111`), and tinyproxy's `500 Unable to connect`.
    pub fn destination_unreachable(&self) -> bool {
        matches!(self.code, 502..=504)
            || (self.code == 500 && self.status_line.ends_with("Unable to connect"))
    }
}

/// Why no tunnel could be opened. Each variant displays as one line, without credentials.
#[derive(Debug)]
pub enum TunnelError {
    /// The proxy could not be reached.
    Unreachable(io::Error),
    /// Talking to the proxy failed midway.
    Io(io::Error),
    /// The proxy answered with a non-2xx status.
    Rejected(Rejection),
    /// The proxy closed the connection before a complete reply header.
    Closed,
    /// The reply is not HTTP.
    Malformed(httparse::Error),
    /// The reply header exceeded [`MAX_REPLY_HEADER`].
    TooLarge,
    /// The proxy could not be reached within the connect timeout.
    ConnectTimeout(Duration),
    /// No complete reply within the reply timeout.
    ReplyTimeout(Duration),
    /// The client failed (reset) while its bytes were going ahead of the reply.
    ClientFailed(io::Error),
}

impl fmt::Display for TunnelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable(err) => write!(f, "proxy unreachable: {err}"),
            Self::Io(err) => write!(f, "talking to the proxy failed: {err}"),
            Self::Rejected(rejection) => write!(
                f,
                "proxy replied {}{}",
                rejection.status_line,
                rejection.authentication_hint()
            ),
            Self::Closed => write!(f, "proxy closed the connection before replying"),
            Self::Malformed(err) => write!(f, "proxy reply is not valid HTTP: {err}"),
            Self::TooLarge => write!(f, "proxy reply header exceeds {MAX_REPLY_HEADER} bytes"),
            Self::ConnectTimeout(limit) => write!(f, "proxy not reached within {limit:?}"),
            Self::ReplyTimeout(limit) => write!(f, "no reply from the proxy within {limit:?}"),
            Self::ClientFailed(err) => write!(f, "client failed before the tunnel opened: {err}"),
        }
    }
}

impl std::error::Error for TunnelError {}

impl HttpConnect {
    pub(super) fn new(
        authorization: Option<String>,
        reply_timeout: Duration,
        keep_error_page: bool,
    ) -> Self {
        Self {
            authorization,
            reply_timeout,
            keep_error_page,
        }
    }

    /// Asks the proxy reached on `stream` for a tunnel to `dst` and reads its reply, within the
    /// reply timeout. With `ahead`, the client's bytes go to the proxy without waiting for the
    /// reply (see [`super::ahead`]): those already taken in the same write as the request, later
    /// ones as they come. A rejection carries the proxy's page when it is kept.
    ///
    /// Once open, `stream` is the tunnel; the bytes returned are what the proxy sent after its
    /// reply header, which already belong to the destination.
    pub(super) async fn request(
        &self,
        stream: &mut TcpStream,
        target: &Target<'_>,
        mut ahead: Option<&mut Ahead<'_>>,
    ) -> Result<Bytes, TunnelError> {
        let mut request = connect_request(target, self.authorization.as_deref()).into_bytes();
        if let Some(ahead) = &ahead {
            request.extend_from_slice(ahead.sent());
        }
        let mut replied = tokio::time::timeout(self.reply_timeout, async {
            stream.write_all(&request).await.map_err(TunnelError::Io)?;
            read_reply(stream, ahead.as_deref_mut(), self.keep_error_page).await
        })
        .await
        .unwrap_or(Err(TunnelError::ReplyTimeout(self.reply_timeout)));
        if let Err(TunnelError::Rejected(rejection)) = &mut replied {
            rejection.credentials_sent = self.authorization.is_some();
        }
        // A rejection ended the exchange; any other failure may leave a request, and the
        // client's bytes sent ahead, half-delivered: the proxy must not take them as whole.
        if let Err(err) = &replied
            && !matches!(err, TunnelError::Rejected(_))
        {
            reset(stream);
        }
        replied
    }
}

/// What a tunnel is asked for: the host name the client asked for, when known, else the
/// address it connected to.
pub(crate) enum Target<'a> {
    Name(&'a Name, u16),
    Addr(SocketAddr),
}

/// `name:port`, or the address; `SocketAddr`'s display brackets IPv6 (`[::1]:443`), as the
/// request target and `Host` require.
impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(name, port) => write!(f, "{name}:{port}"),
            Self::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

/// The CONNECT request for `target`.
fn connect_request(target: &Target<'_>, authorization: Option<&str>) -> String {
    let auth = authorization
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n")
}

/// Reads the reply header; meanwhile passes on what the client sends `ahead` of it. On 2xx
/// returns the bytes that followed the header.
async fn read_reply(
    stream: &mut TcpStream,
    mut ahead: Option<&mut Ahead<'_>>,
    keep_error_page: bool,
) -> Result<Bytes, TunnelError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let read = match ahead.as_deref_mut().filter(|ahead| ahead.wants_more()) {
            // Both branches are cancel-safe: bytes are only taken by the one that completes.
            Some(ahead) => tokio::select! {
                biased;
                read = stream.read_buf(&mut buf) => read,
                more = ahead.take_more() => {
                    let more = more.map_err(TunnelError::ClientFailed)?;
                    stream.write_all(more).await.map_err(TunnelError::Io)?;
                    continue;
                }
            },
            None => stream.read_buf(&mut buf).await,
        }
        .map_err(TunnelError::Io)?;
        match parse_reply(&buf) {
            // Copied out: a slice of `buf` would keep its whole allocation for the tunnel's
            // life, though the bytes are written to the client once, at the start.
            Ok(Some(header_len)) => return Ok(Bytes::copy_from_slice(&buf[header_len..])),
            Ok(None) if read == 0 => return Err(TunnelError::Closed),
            Ok(None) if buf.len() >= MAX_REPLY_HEADER => return Err(TunnelError::TooLarge),
            Ok(None) => {}
            Err(TunnelError::Rejected(mut rejection)) if keep_error_page => {
                error_page::capture(stream, &mut buf).await;
                rejection.page = buf.freeze();
                return Err(TunnelError::Rejected(rejection));
            }
            Err(err) => return Err(err),
        }
    }
}

/// Parses a possibly partial reply. `Ok(Some(len))`: a 2xx header of `len` bytes; `Ok(None)`:
/// incomplete so far. Public for the fuzz target.
pub fn parse_reply(buf: &[u8]) -> Result<Option<usize>, TunnelError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_REPLY_HEADERS];
    let mut reply = httparse::Response::new(&mut headers);
    match reply.parse(buf).map_err(TunnelError::Malformed)? {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(len) => {
            let code = reply.code.unwrap_or(0);
            if (200..300).contains(&code) {
                Ok(Some(len))
            } else {
                let reason = reply.reason.unwrap_or("").escape_default().to_string();
                let version = reply.version.unwrap_or(1);
                let schemes = reply
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("proxy-authenticate"))
                    .filter_map(|h| std::str::from_utf8(h.value).ok())
                    .filter_map(|v| v.split_whitespace().next())
                    .map(|scheme| scheme.trim_end_matches(',').escape_default().to_string())
                    .take(8)
                    .collect();
                Err(TunnelError::Rejected(Rejection {
                    code,
                    status_line: format!("HTTP/1.{version} {code} {reason}"),
                    page: Bytes::new(),
                    schemes,
                    credentials_sent: false,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use socket2::SockRef;
    use tokio::net::TcpListener;

    use super::*;

    /// The rejection as `request` returns it when pages are kept, from a proxy that writes
    /// `reply` and then keeps the connection open.
    async fn rejection_from(reply: &'static [u8]) -> (Result<Bytes, TunnelError>, Duration) {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut stream = TcpStream::connect(proxy.local_addr().unwrap())
            .await
            .unwrap();
        let (mut at_proxy, _) = proxy.accept().await.unwrap();
        at_proxy.write_all(reply).await.unwrap();
        let started = std::time::Instant::now();
        let dst = "127.0.0.2:80".parse().unwrap();
        let handshake = HttpConnect::new(None, Duration::from_secs(5), true);
        let result = handshake
            .request(&mut stream, &Target::Addr(dst), None)
            .await;
        (result, started.elapsed())
    }

    /// A page whose length the proxy does not give, on a connection it keeps open: the
    /// rejection is kept with what arrived, well before the reply timeout.
    #[tokio::test]
    async fn an_error_page_of_unknown_length_does_not_wait_for_the_reply_timeout() {
        let (result, took) =
            rejection_from(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n\r\ndenied")
                .await;
        let Err(TunnelError::Rejected(rejection)) = result else {
            panic!("not a rejection: {:?}", result.err());
        };
        assert!(
            rejection.page.ends_with(b"\r\n\r\ndenied"),
            "{:?}",
            rejection.page
        );
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    /// A chunked page keeps only its header: the chunks frame the proxy's connection.
    #[tokio::test]
    async fn a_chunked_error_page_keeps_its_header_only() {
        let (result, _) = rejection_from(
            b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndenied\r\n0\r\n\r\n",
        )
        .await;
        let Err(TunnelError::Rejected(rejection)) = result else {
            panic!("not a rejection: {:?}", result.err());
        };
        assert_eq!(
            &rejection.page[..],
            b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
    }

    /// A client that resets while its bytes go ahead of a slow reply: the proxy must be reset
    /// too, not closed, or it could take the half-sent request as whole.
    #[tokio::test]
    async fn a_client_failing_while_its_bytes_go_ahead_resets_the_proxy_connection() {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        let handshake = HttpConnect::new(None, Duration::from_secs(5), false);
        let clients = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = std::net::TcpStream::connect(clients.local_addr().unwrap()).unwrap();
        let (mut accepted, _) = clients.accept().await.unwrap();

        let stream = TcpStream::connect(proxy_addr).await.unwrap();
        let (mut at_proxy, _) = proxy.accept().await.unwrap();
        let mut ahead = Ahead::take_first(&mut accepted).await.unwrap();
        let dst = "127.0.0.2:80".parse().unwrap();
        let opening = async {
            let mut stream = stream;
            // The listener drops the proxy connection once the request failed, as here.
            handshake
                .request(&mut stream, &Target::Addr(dst), Some(&mut ahead))
                .await
        };
        let proxy_side = async {
            // The request arrives alone; then the client's bytes, sent after it.
            let mut seen = Vec::new();
            while !seen.ends_with(b"\r\n\r\n") {
                at_proxy.read_buf(&mut seen).await.unwrap();
            }
            client.write_all(b"POST / HTTP/1.1\r\n").unwrap();
            let before = seen.len();
            while seen.len() < before + 17 {
                at_proxy.read_buf(&mut seen).await.unwrap();
            }
            assert_eq!(&seen[before..], b"POST / HTTP/1.1\r\n");
            // The client resets before the proxy replies.
            SockRef::from(&client)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(client);
            let mut rest = Vec::new();
            at_proxy.read_buf(&mut rest).await
        };
        let (opened, at_proxy_end) = tokio::join!(opening, proxy_side);
        assert!(
            matches!(opened, Err(TunnelError::ClientFailed(_))),
            "{:?}",
            opened.err()
        );
        let err = at_proxy_end.expect_err("the proxy saw a clean close");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn request_brackets_ipv6_and_carries_auth() {
        let v4 = connect_request(&Target::Addr("127.0.0.2:80".parse().unwrap()), None);
        assert_eq!(
            v4,
            "CONNECT 127.0.0.2:80 HTTP/1.1\r\nHost: 127.0.0.2:80\r\n\r\n"
        );
        let v6 = connect_request(
            &Target::Addr("[::1]:443".parse().unwrap()),
            Some("Basic eDp5"),
        );
        assert_eq!(
            v6,
            "CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\nProxy-Authorization: Basic eDp5\r\n\r\n"
        );
    }

    #[test]
    fn parses_replies() {
        assert_eq!(
            parse_reply(b"HTTP/1.1 200 Connection established\r\n\r\nxyz").unwrap(),
            Some(39)
        );
        assert_eq!(
            parse_reply(b"HTTP/1.0 200 OK\r\nVia: squid\r\n\r\n").unwrap(),
            Some(31)
        );
        assert_eq!(parse_reply(b"HTTP/1.1 200 Conn").unwrap(), None);
        match parse_reply(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\ndenied") {
            Err(TunnelError::Rejected(r)) => {
                assert_eq!(r.status_line, "HTTP/1.1 403 Forbidden");
                assert!(!r.destination_unreachable());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_reply(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(TunnelError::Malformed(_))
        ));
    }

    /// A 407 says what the proxy asked for, and why transproxy could not give it.
    #[test]
    fn a_407_names_the_schemes_and_the_missing_credentials() {
        let reply = b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM\r\nProxy-Authenticate: Basic realm=\"corp\"\r\n\r\n";
        let Err(TunnelError::Rejected(rejection)) = parse_reply(reply) else {
            panic!("not a rejection");
        };
        assert_eq!(rejection.schemes, ["NTLM", "Basic"]);
        let said = TunnelError::Rejected(rejection).to_string();
        assert!(said.contains("it asks for NTLM, Basic"), "{said}");
        assert!(said.contains("NTLM not supported yet"), "{said}");
        assert!(said.contains("no credentials were sent"), "{said}");
        let Err(TunnelError::Rejected(mut sent)) = parse_reply(reply) else {
            panic!("not a rejection");
        };
        sent.credentials_sent = true;
        let said = TunnelError::Rejected(sent).to_string();
        assert!(said.contains("were not accepted"), "{said}");
    }

    #[test]
    fn recognises_unreachable_destinations() {
        for (reply, unreachable) in [
            (&b"HTTP/1.1 503 Service Unavailable\r\n\r\n"[..], true),
            (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", true),
            (b"HTTP/1.1 504 Gateway Timeout\r\n\r\n", true),
            (b"HTTP/1.1 500 Unable to connect\r\n\r\n", true),
            (b"HTTP/1.1 500 Internal Server Error\r\n\r\n", false),
            (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", false),
        ] {
            match parse_reply(reply) {
                Err(TunnelError::Rejected(r)) => {
                    assert_eq!(r.destination_unreachable(), unreachable, "{r:?}")
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
