//! The HTTP CONNECT handshake: `CONNECT name:port` (or `ip:port`) to the proxy and reading its
//! reply, with the client's bytes sent ahead of it, and the proxy's authentication when it asks
//! for it ([`super::auth`]).

use std::{fmt, io, net::SocketAddr, time::Duration};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{
    ProxyStream,
    ahead::Ahead,
    auth::{Auth, AuthError, Challenge, Scheme},
};
use crate::sniff::Name;
use crate::{error_page, relay::reset};

/// The proxy's reply header may not exceed this; a proxy sending more is broken or hostile.
pub(super) const MAX_REPLY_HEADER: usize = 16 * 1024;

/// How many reply headers are parsed; proxies send a handful.
pub(crate) const MAX_REPLY_HEADERS: usize = 64;

/// Largest 407 body read and dropped to keep the connection for the next leg of a handshake;
/// a longer one (or one of unknown length) makes the next leg use a new connection.
const MAX_DRAINED_BODY: usize = 256 * 1024;

/// What every CONNECT request needs: the proxy's authentication, the reply timeout, and
/// whether a rejection's page is kept for the client (`--on-proxy-error=http`).
pub(super) struct HttpConnect {
    auth: Auth,
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
    /// For a 407: the challenges the proxy sent (`Proxy-Authenticate`).
    pub challenges: Vec<Challenge>,
    /// Whether the request carried credentials.
    pub credentials_sent: bool,
    /// The reply header's length.
    header_len: usize,
    /// The body's length, when the header says it (`Content-Length`, or none at all for a
    /// reply that says nothing and keeps the connection: then it has no body).
    body_len: Option<usize>,
    /// Whether the proxy closes the connection after this reply.
    closes: bool,
}

impl Rejection {
    /// Whether the proxy says the destination refused the connection or cannot be reached:
    /// 502, 503 and 504 (squid answers a refused connect with 503 and `X-Squid-Error:
    /// ERR_CONNECT_FAIL 111`), and tinyproxy's `500 Unable to connect`.
    pub fn destination_unreachable(&self) -> bool {
        matches!(self.code, 502..=504)
            || (self.code == 500 && self.status_line.ends_with("Unable to connect"))
    }

    /// The schemes offered, for log lines.
    fn offered(&self) -> String {
        if self.challenges.is_empty() {
            return "no scheme (no Proxy-Authenticate header)".to_owned();
        }
        let names: Vec<String> = self.challenges.iter().map(ToString::to_string).collect();
        names.join(", ")
    }
}

/// A 407 that authentication could not get past.
#[derive(Debug)]
pub struct AuthFailure {
    pub rejection: Rejection,
    /// The scheme tried, if any.
    pub tried: Option<Scheme>,
    pub error: AuthError,
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
    /// The proxy asked for authentication and did not get it.
    Auth(Box<AuthFailure>),
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
    /// The proxy asked for authentication after the client's bytes went ahead on this
    /// connection: the handshake continues on a new one, with the client's bytes held. Never
    /// leaves [`super::Upstream::open`].
    AuthOnNewConnection,
    /// A SOCKS5 proxy refused the tunnel, or did not speak SOCKS5.
    Socks(super::socks5::SocksFailure),
    /// A `socks5h://` proxy, and no host name is known for this destination.
    NoName(SocketAddr),
    /// The TLS handshake with an `https://` proxy failed (its certificate did not verify, or
    /// it does not speak TLS). Never followed by plain text.
    Tls(io::Error),
    /// The PAC script gave no usable answer (and `--pac-fallback` is not `direct`).
    Pac(crate::pac::PacError),
}

impl TunnelError {
    /// Whether the proxy reports the destination refused or unreachable (HTTP 502–504,
    /// tinyproxy's 500, SOCKS5's refused and unreachable replies): refused stays refused.
    pub fn destination_unreachable(&self) -> bool {
        match self {
            Self::Rejected(rejection) => rejection.destination_unreachable(),
            Self::Socks(failure) => failure.unreachable,
            _ => false,
        }
    }

    /// Whether the proxy itself failed: it could not be reached, its TLS failed, or it does
    /// not speak HTTP. The list's next proxy is then worth trying, and this one is skipped a
    /// while. Not a proxy that is slow to answer or closes: a proxy answers `CONNECT` once it
    /// has reached the destination, which the client chooses, so a client could make any proxy
    /// look silent (a destination that drops packets) and send everyone else to the next entry,
    /// `direct` included. An answer, even a refusal, is not a failure either.
    pub(crate) fn proxy_failed(&self) -> bool {
        match self {
            Self::Unreachable(_)
            | Self::ConnectTimeout(_)
            | Self::Malformed(_)
            | Self::TooLarge
            | Self::Tls(_) => true,
            Self::ReplyTimeout(_)
            | Self::Closed
            | Self::Io(_)
            | Self::Socks(_)
            | Self::Rejected(_)
            | Self::Auth(_)
            | Self::ClientFailed(_)
            | Self::AuthOnNewConnection
            | Self::Pac(_)
            | Self::NoName(_) => false,
        }
    }

    /// The proxy's rejection, if it answered with one.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            Self::Rejected(rejection) => Some(rejection),
            Self::Auth(failure) => Some(&failure.rejection),
            _ => None,
        }
    }
}

impl fmt::Display for TunnelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable(err) => write!(f, "proxy unreachable: {err}"),
            Self::Io(err) => write!(f, "talking to the proxy failed: {err}"),
            Self::Rejected(rejection) if rejection.code == 407 => write!(
                f,
                "proxy replied {}: it asks for {}, and no credentials were sent",
                rejection.status_line,
                rejection.offered()
            ),
            Self::Rejected(rejection) => write!(f, "proxy replied {}", rejection.status_line),
            Self::Auth(failure) => {
                let tried = failure
                    .tried
                    .map(|scheme| format!("; tried {scheme}"))
                    .unwrap_or_default();
                write!(
                    f,
                    "proxy replied {}: it asks for {}{tried}: {}",
                    failure.rejection.status_line,
                    failure.rejection.offered(),
                    failure.error
                )
            }
            Self::Closed => write!(f, "proxy closed the connection before replying"),
            Self::Malformed(err) => write!(f, "proxy reply is not valid HTTP: {err}"),
            Self::TooLarge => write!(f, "proxy reply header exceeds {MAX_REPLY_HEADER} bytes"),
            Self::ConnectTimeout(limit) => write!(f, "proxy not reached within {limit:?}"),
            Self::ReplyTimeout(limit) => write!(f, "no reply from the proxy within {limit:?}"),
            Self::ClientFailed(err) => write!(f, "client failed before the tunnel opened: {err}"),
            Self::AuthOnNewConnection => write!(f, "authentication continues on a new connection"),
            Self::Socks(failure) => failure.fmt(f),
            Self::Tls(err) => write!(f, "TLS with the proxy failed: {err}"),
            Self::Pac(err) => err.fmt(f),
            Self::NoName(dst) => write!(
                f,
                "no host name is known for {dst}, and a socks5h:// proxy is never sent an address (--dns fake gives every connection its name)"
            ),
        }
    }
}

impl std::error::Error for TunnelError {}

/// A reply read: the tunnel opened (with what followed the header), or a rejection (with the
/// bytes read after its header).
enum Reply {
    Open(Bytes),
    Rejected(Rejection, BytesMut),
}

impl HttpConnect {
    pub(super) fn new(auth: Auth, reply_timeout: Duration, keep_error_page: bool) -> Self {
        Self {
            auth,
            reply_timeout,
            keep_error_page,
        }
    }

    /// Whether tunnels authenticate from their first request (the proxy asked before, for a
    /// scheme that needs a handshake): the client's bytes must then wait for the 200.
    pub(super) fn handshakes_first(&self) -> bool {
        self.auth.handshakes_first()
    }

    /// Asks the proxy reached on `stream` for a tunnel to `target` and reads its reply, within
    /// the reply timeout, authenticating when the proxy asks (on the same connection, leg after
    /// leg). With `ahead`, the client's bytes go to the proxy without waiting for the reply
    /// (see [`super::ahead`]): those already taken in the same write as the request, later ones
    /// as they come; a 407 after them ends with [`TunnelError::AuthOnNewConnection`]. A
    /// rejection carries the proxy's page when it is kept.
    ///
    /// Once open, `stream` is the tunnel; the bytes returned are what the proxy sent after its
    /// reply header, which already belong to the destination.
    pub(super) async fn request(
        &self,
        stream: &mut ProxyStream,
        target: &Target<'_>,
        mut ahead: Option<&mut Ahead<'_>>,
    ) -> Result<Bytes, TunnelError> {
        let replied = tokio::time::timeout(self.reply_timeout, async {
            let (mut session, first) = self.auth.session(target.to_string()).await;
            let mut header = first
                .map_err(|error| auth_failure(Rejection::unasked(), session.scheme(), error))?;
            loop {
                let mut request = connect_request(target, header.as_deref()).into_bytes();
                if let Some(ahead) = &ahead {
                    request.extend_from_slice(ahead.sent());
                }
                stream.write_all(&request).await.map_err(TunnelError::Io)?;
                let (mut rejection, leftover) =
                    match read_reply(stream, ahead.as_deref_mut()).await? {
                        Reply::Open(early) => return Ok(early),
                        Reply::Rejected(rejection, leftover) => (rejection, leftover),
                    };
                rejection.credentials_sent = session.sent_credentials();
                if rejection.code != 407 || rejection.challenges.is_empty() {
                    return Err(self.rejected(stream, rejection, leftover).await);
                }
                let went_ahead = ahead.as_ref().is_some_and(|a| !a.sent().is_empty());
                let next = match session.answer(&rejection.challenges).await {
                    Ok(next) => next,
                    Err(error) => {
                        let tried = session.scheme();
                        let rejection = self.with_page(stream, rejection, leftover).await;
                        return Err(auth_failure(rejection, tried, error));
                    }
                };
                // The client's bytes reached the proxy after a request it refused: it would
                // read them as its next request. A new connection continues, with them held.
                if went_ahead {
                    return Err(TunnelError::AuthOnNewConnection);
                }
                if !drain(stream, &rejection, leftover).await {
                    if session.scheme().is_some_and(Scheme::per_connection) {
                        let scheme = session.scheme().unwrap_or(Scheme::Ntlm);
                        return Err(auth_failure(
                            rejection,
                            Some(scheme),
                            AuthError::ClosedMidway(scheme),
                        ));
                    }
                    return Err(TunnelError::AuthOnNewConnection);
                }
                header = Some(next);
                ahead = None;
            }
        })
        .await
        .unwrap_or(Err(TunnelError::ReplyTimeout(self.reply_timeout)));
        // A rejection ended the exchange; any other failure may leave a request, and the
        // client's bytes sent ahead, half-delivered: the proxy must not take them as whole.
        if let Err(err) = &replied
            && err.rejection().is_none()
        {
            reset(stream.tcp());
        }
        replied
    }

    /// A final rejection, with its page when pages are kept.
    async fn rejected(
        &self,
        stream: &mut ProxyStream,
        rejection: Rejection,
        leftover: BytesMut,
    ) -> TunnelError {
        TunnelError::Rejected(self.with_page(stream, rejection, leftover).await)
    }

    /// `rejection` with the proxy's page (header and body), when pages are kept.
    async fn with_page(
        &self,
        stream: &mut ProxyStream,
        mut rejection: Rejection,
        leftover: BytesMut,
    ) -> Rejection {
        if self.keep_error_page {
            let mut page = BytesMut::from(rejection.page.as_ref());
            page.extend_from_slice(&leftover);
            error_page::capture(stream, &mut page).await;
            rejection.page = page.freeze();
        } else {
            rejection.page = Bytes::new();
        }
        rejection
    }
}

/// The failure of an authentication.
fn auth_failure(rejection: Rejection, tried: Option<Scheme>, error: AuthError) -> TunnelError {
    TunnelError::Auth(Box::new(AuthFailure {
        rejection,
        tried,
        error,
    }))
}

impl Rejection {
    /// A stand-in for a failure before the proxy was asked (no usable first header).
    fn unasked() -> Self {
        Self {
            code: 407,
            status_line: "(not asked yet)".to_owned(),
            page: Bytes::new(),
            challenges: Vec::new(),
            credentials_sent: false,
            header_len: 0,
            body_len: Some(0),
            closes: false,
        }
    }
}

/// Reads and drops the rest of a 407's body, so that the connection can carry the next leg.
/// Returns whether the connection is still usable.
async fn drain(stream: &mut ProxyStream, rejection: &Rejection, leftover: BytesMut) -> bool {
    let Some(body_len) = rejection.body_len.filter(|len| *len <= MAX_DRAINED_BODY) else {
        return false;
    };
    if rejection.closes || leftover.len() > body_len {
        return false;
    }
    let mut left = body_len - leftover.len();
    // On the heap, and only here: an array held across the reads below would be part of every
    // tunnel's handshake future, authenticating or not (4 KiB more per tunnel, measured).
    let mut sink = vec![0u8; left.min(4096)];
    while left > 0 {
        let want = left.min(sink.len());
        match stream.read(&mut sink[..want]).await {
            Ok(0) | Err(_) => return false,
            Ok(read) => left -= read,
        }
    }
    true
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

/// The CONNECT request for `target`. With credentials, the connection is asked to stay open
/// (`Proxy-Connection: Keep-Alive`): a handshake's next leg needs it.
fn connect_request(target: &Target<'_>, authorization: Option<&str>) -> String {
    let auth = authorization
        .map(|a| format!("Proxy-Authorization: {a}\r\nProxy-Connection: Keep-Alive\r\n"))
        .unwrap_or_default();
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n")
}

/// Reads the reply header; meanwhile passes on what the client sends `ahead` of it.
async fn read_reply(
    stream: &mut ProxyStream,
    mut ahead: Option<&mut Ahead<'_>>,
) -> Result<Reply, TunnelError> {
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
            Ok(Some(header_len)) => {
                return Ok(Reply::Open(Bytes::copy_from_slice(&buf[header_len..])));
            }
            Ok(None) if read == 0 => return Err(TunnelError::Closed),
            Ok(None) if buf.len() >= MAX_REPLY_HEADER => return Err(TunnelError::TooLarge),
            Ok(None) => {}
            Err(TunnelError::Rejected(mut rejection)) => {
                rejection.page = buf.split_to(rejection.header_len).freeze();
                return Ok(Reply::Rejected(rejection, buf));
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
                return Ok(Some(len));
            }
            let reason = reply.reason.unwrap_or("").escape_default().to_string();
            let version = reply.version.unwrap_or(1);
            let values = |name: &'static str| {
                reply
                    .headers
                    .iter()
                    .filter(move |h| h.name.eq_ignore_ascii_case(name))
                    .filter_map(|h| std::str::from_utf8(h.value).ok())
            };
            let challenges = super::auth::challenges(values("proxy-authenticate"));
            let content_length = values("content-length")
                .next()
                .and_then(|v| v.trim().parse::<usize>().ok());
            let chunked = values("transfer-encoding").next().is_some();
            let closes = values("connection")
                .chain(values("proxy-connection"))
                .any(|v| v.eq_ignore_ascii_case("close"))
                || (version == 0
                    && !values("connection")
                        .chain(values("proxy-connection"))
                        .any(|v| v.eq_ignore_ascii_case("keep-alive")));
            // Without a length, a reply's body runs to the connection's end (RFC 9112 §6.3).
            let body_len = content_length.filter(|_| !chunked);
            Err(TunnelError::Rejected(Rejection {
                code,
                status_line: format!("HTTP/1.{version} {code} {reason}"),
                page: Bytes::new(),
                challenges,
                credentials_sent: false,
                header_len: len,
                body_len,
                closes,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use socket2::SockRef;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    fn no_auth() -> Auth {
        Auth::new(None, None, false, "proxy.test".to_owned())
    }

    /// The rejection as `request` returns it when pages are kept, from a proxy that writes
    /// `reply` and then keeps the connection open.
    async fn rejection_from(reply: &'static [u8]) -> (Result<Bytes, TunnelError>, Duration) {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut stream = ProxyStream::Tcp(
            TcpStream::connect(proxy.local_addr().unwrap())
                .await
                .unwrap(),
        );
        let (mut at_proxy, _) = proxy.accept().await.unwrap();
        at_proxy.write_all(reply).await.unwrap();
        let started = std::time::Instant::now();
        let dst = "127.0.0.2:80".parse().unwrap();
        let handshake = HttpConnect::new(no_auth(), Duration::from_secs(5), true);
        let result = handshake
            .request(&mut stream, &Target::Addr(dst), None)
            .await;
        (result, started.elapsed())
    }

    /// Every tunnel carries the handshake's future until its proxy answers (with a sniff
    /// timeout, a thousand new idle tunnels are all in it at once): it must stay small. A 4 KiB
    /// buffer held across an await once doubled the memory per idle tunnel.
    #[tokio::test]
    async fn the_handshake_future_stays_small() {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut stream = ProxyStream::Tcp(
            TcpStream::connect(proxy.local_addr().unwrap())
                .await
                .unwrap(),
        );
        let handshake = HttpConnect::new(no_auth(), Duration::from_secs(5), false);
        let target = Target::Addr("127.0.0.2:80".parse().unwrap());
        let request = handshake.request(&mut stream, &target, None);
        let size = std::mem::size_of_val(&request);
        drop(request);
        // Unoptimised builds lay futures out larger; the bound holds for both.
        assert!(size < 2048, "the handshake future is {size} bytes");
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
        let handshake = HttpConnect::new(no_auth(), Duration::from_secs(5), false);
        let clients = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = std::net::TcpStream::connect(clients.local_addr().unwrap()).unwrap();
        let (mut accepted, _) = clients.accept().await.unwrap();

        let stream = ProxyStream::Tcp(TcpStream::connect(proxy_addr).await.unwrap());
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
            "CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\nProxy-Authorization: Basic eDp5\r\nProxy-Connection: Keep-Alive\r\n\r\n"
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

    /// A 407 says what the proxy asked for, and that no credentials were sent.
    #[test]
    fn a_407_names_the_schemes_and_the_missing_credentials() {
        let reply = b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n";
        let Err(TunnelError::Rejected(rejection)) = parse_reply(reply) else {
            panic!("not a rejection");
        };
        let schemes: Vec<String> = rejection
            .challenges
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(schemes, ["NTLM", "Basic"]);
        assert_eq!(rejection.body_len, Some(0));
        assert!(!rejection.closes);
        let said = TunnelError::Rejected(rejection).to_string();
        assert!(said.contains("it asks for NTLM, Basic"), "{said}");
        assert!(said.contains("no credentials were sent"), "{said}");
    }

    /// Only failures of the proxy itself send tunnels to the next entry of the list: a slow or
    /// closing answer depends on the destination, which the client chooses.
    #[test]
    fn only_the_proxys_own_failures_count_against_it() {
        let refused = || io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(TunnelError::Unreachable(refused()).proxy_failed());
        assert!(TunnelError::ConnectTimeout(Duration::from_secs(5)).proxy_failed());
        assert!(TunnelError::Tls(refused()).proxy_failed());
        assert!(!TunnelError::ReplyTimeout(Duration::from_secs(10)).proxy_failed());
        assert!(!TunnelError::Closed.proxy_failed());
        assert!(!TunnelError::Io(refused()).proxy_failed());
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
