//! Opening a tunnel: `CONNECT ip:port` to the upstream proxy and reading its reply.

use std::{
    fmt, io,
    net::SocketAddr,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use socket2::{SockRef, TcpKeepalive};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::Instant,
};

use crate::{ahead::Ahead, proxy::ProxyUrl, relay::reset};

/// The proxy's reply header may not exceed this; a proxy sending more is broken or hostile.
pub const MAX_REPLY_HEADER: usize = 16 * 1024;

/// How much of a rejection's body is kept to show the client (`--on-proxy-error=http`).
const MAX_ERROR_PAGE: usize = 64 * 1024;

/// How long an error page's body may take once its header is in. A proxy that neither says how
/// long the page is nor closes would otherwise hold the rejection until the reply timeout,
/// and lose it there.
const ERROR_PAGE_WAIT: Duration = Duration::from_secs(1);

/// How many reply headers are parsed; proxies send a handful.
const MAX_REPLY_HEADERS: usize = 64;

/// The upstream proxy, resolved, with what every CONNECT needs.
pub struct Upstream {
    proxy: ProxyUrl,
    /// Where the proxy's host name pointed when last resolved; replaced when it moves (a
    /// laptop on another network), see [`Upstream::set_addrs`].
    addrs: RwLock<Arc<[SocketAddr]>>,
    /// Limit for reaching the proxy.
    connect_timeout: Duration,
    /// Limit for the proxy's reply to CONNECT, once reached.
    reply_timeout: Duration,
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
            Self::Rejected(rejection) => write!(f, "proxy replied {}", rejection.status_line),
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

impl Upstream {
    pub fn new(
        proxy: ProxyUrl,
        addrs: Vec<SocketAddr>,
        connect_timeout: Duration,
        reply_timeout: Duration,
    ) -> Self {
        Self {
            proxy,
            addrs: RwLock::new(addrs.into()),
            connect_timeout,
            reply_timeout,
        }
    }

    pub fn proxy(&self) -> &ProxyUrl {
        &self.proxy
    }

    /// The proxy's addresses, as tunnels now connect to them.
    pub fn addrs(&self) -> Arc<[SocketAddr]> {
        // A poisoned lock still holds a complete value: an `Arc` is replaced whole.
        Arc::clone(&self.addrs.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Where new tunnels connect from now on; open ones keep their connection.
    pub fn set_addrs(&self, addrs: Arc<[SocketAddr]>) {
        *self.addrs.write().unwrap_or_else(PoisonError::into_inner) = addrs;
    }

    /// Reaches the proxy, within the connect timeout. The tunnel is asked for separately (see
    /// [`Upstream::request`]) so that the caller can gather the client's first bytes meanwhile.
    ///
    /// The connection probes a silent proxy ([`KEEPALIVE`]): a client's own TCP keepalive is
    /// answered by the daemon's socket and never reaches it, so without these a tunnel whose
    /// proxy vanished (a laptop suspended, a network changed) would wait forever.
    pub async fn reach(&self) -> Result<TcpStream, TunnelError> {
        let stream = self.connect().await?;
        stream.set_nodelay(true).map_err(TunnelError::Io)?;
        let socket = SockRef::from(&stream);
        socket
            .set_tcp_keepalive(&KEEPALIVE)
            .and_then(|()| socket.set_tcp_user_timeout(Some(DEAD_AFTER)))
            .map_err(TunnelError::Io)?;
        Ok(stream)
    }

    /// Asks the proxy reached on `stream` for a tunnel to `dst` and reads its reply, within the
    /// reply timeout. With `ahead`, the client's bytes go to the proxy without waiting for the
    /// reply (see [`crate::ahead`]): those already taken in the same write as the request, later
    /// ones as they come. With `keep_error_page`, a rejection carries the proxy's reply so it can
    /// be shown to the client.
    ///
    /// Once open, `stream` is the tunnel; the bytes returned are what the proxy sent after its
    /// reply header, which already belong to the destination.
    pub async fn request(
        &self,
        stream: &mut TcpStream,
        dst: SocketAddr,
        mut ahead: Option<&mut Ahead<'_>>,
        keep_error_page: bool,
    ) -> Result<Bytes, TunnelError> {
        let mut request = connect_request(dst, self.proxy.authorization()).into_bytes();
        if let Some(ahead) = &ahead {
            request.extend_from_slice(ahead.sent());
        }
        let replied = tokio::time::timeout(self.reply_timeout, async {
            stream.write_all(&request).await.map_err(TunnelError::Io)?;
            read_reply(stream, ahead.as_deref_mut(), keep_error_page).await
        })
        .await
        .unwrap_or(Err(TunnelError::ReplyTimeout(self.reply_timeout)));
        // A rejection ended the exchange; any other failure may leave a request, and the
        // client's bytes sent ahead, half-delivered: the proxy must not take them as whole.
        if let Err(err) = &replied
            && !matches!(err, TunnelError::Rejected(_))
        {
            reset(stream);
        }
        replied
    }

    /// Connects to the first proxy address that answers, within the connect timeout. Each
    /// address gets an even share of the time left, as Go's dialer does: one that drops
    /// packets (an IPv6 route that goes nowhere) cannot use it all up before the next is tried.
    async fn connect(&self) -> Result<TcpStream, TunnelError> {
        let deadline = Instant::now() + self.connect_timeout;
        let addrs = self.addrs();
        let mut last_err = None;
        for (i, addr) in addrs.iter().enumerate() {
            let share =
                deadline.saturating_duration_since(Instant::now()) / (addrs.len() - i) as u32;
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(err)) => last_err = Some(TunnelError::Unreachable(err)),
                Err(_) => last_err = Some(TunnelError::ConnectTimeout(self.connect_timeout)),
            }
        }
        Err(last_err.unwrap_or_else(|| {
            TunnelError::Unreachable(io::Error::new(
                io::ErrorKind::NotFound,
                "proxy has no address",
            ))
        }))
    }
}

/// TCP keepalive on proxy connections: the first probe after a minute of silence, then every
/// 10 s.
const KEEPALIVE: TcpKeepalive = TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(6);

/// A proxy connection whose probes or data go unacknowledged this long is dead, and the
/// tunnel's both ends are reset (TCP_USER_TIMEOUT: keepalive alone never fires while data is in
/// flight, and retransmissions would take about 15 minutes to give up).
const DEAD_AFTER: Duration = Duration::from_secs(120);

/// The CONNECT request for `dst`. `SocketAddr`'s display brackets IPv6 (`[::1]:443`), as the
/// request target and `Host` require.
fn connect_request(dst: SocketAddr, authorization: Option<&str>) -> String {
    let auth = authorization
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!("CONNECT {dst} HTTP/1.1\r\nHost: {dst}\r\n{auth}\r\n")
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
                read_error_page(stream, &mut buf).await;
                rejection.page = buf.freeze();
                return Err(TunnelError::Rejected(rejection));
            }
            Err(err) => return Err(err),
        }
    }
}

/// Reads the rest of a rejection, bounded, until the proxy closes, its `Content-Length` is
/// reached, the page limit, or [`ERROR_PAGE_WAIT`]. Errors just end the page.
async fn read_error_page(stream: &mut TcpStream, buf: &mut BytesMut) {
    let Some(limit) = error_page_len(buf) else {
        return;
    };
    let _ = tokio::time::timeout(ERROR_PAGE_WAIT, async {
        while buf.len() < limit {
            match stream.read_buf(buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    buf.truncate(limit);
}

/// How much of a rejection to keep: its header and its `Content-Length` (or the page limit);
/// the header alone when the body is chunked, which is framing for the proxy's connection, not
/// the client's.
/// A function of its own so the parser's header array (2 KiB) lives for the call only, not in
/// the state of every tunnel's task.
fn error_page_len(buf: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_REPLY_HEADERS];
    let mut reply = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(header_len)) = reply.parse(buf) else {
        return None;
    };
    let header = |name: &str| {
        reply
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
    };
    if header("transfer-encoding").is_some() {
        return Some(header_len);
    }
    let content_length = header("content-length")
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    Some(header_len + content_length.unwrap_or(MAX_ERROR_PAGE).min(MAX_ERROR_PAGE))
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
                Err(TunnelError::Rejected(Rejection {
                    code,
                    status_line: format!("HTTP/1.{version} {code} {reason}"),
                    page: Bytes::new(),
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

    /// An upstream that tries `addrs` in turn (the last is named in the URL), with a 5 s reply
    /// timeout.
    fn upstream_via(addrs: Vec<SocketAddr>, connect_timeout: Duration) -> Upstream {
        let named = addrs.last().copied().unwrap();
        let url = ProxyUrl::parse(&format!("http://{named}"), "test").unwrap();
        Upstream::new(url, addrs, connect_timeout, Duration::from_secs(5))
    }

    /// The proxy's rejection as `request` returns it with `keep_error_page`, from a proxy that
    /// writes `reply` and then keeps the connection open.
    async fn rejection_from(reply: &'static [u8]) -> (Result<Bytes, TunnelError>, Duration) {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        let upstream = upstream_via(vec![proxy_addr], Duration::from_secs(5));
        let mut stream = upstream.reach().await.unwrap();
        let (mut at_proxy, _) = proxy.accept().await.unwrap();
        at_proxy.write_all(reply).await.unwrap();
        let started = std::time::Instant::now();
        let dst = "127.0.0.2:80".parse().unwrap();
        let result = upstream.request(&mut stream, dst, None, true).await;
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

    /// A proxy address that drops SYNs (a listener whose accept queue is full) gets only its
    /// share of the connect timeout; the next address is reached in time.
    #[tokio::test]
    async fn an_address_that_drops_packets_leaves_time_for_the_next() {
        let silent =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        silent
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        silent.listen(0).unwrap();
        let silent_addr = silent.local_addr().unwrap().as_socket().unwrap();
        // One connection fills its accept queue (backlog 0): further SYNs are dropped.
        let _queued = std::net::TcpStream::connect(silent_addr).unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        let upstream = upstream_via(vec![silent_addr, proxy_addr], Duration::from_secs(2));
        let started = std::time::Instant::now();
        let stream = upstream.reach().await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), proxy_addr);
        // Half the timeout went to the silent address, not all of it.
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1_800), "{took:?}");
        let socket = SockRef::from(&stream);
        assert!(socket.keepalive().unwrap(), "no TCP keepalive");
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(DEAD_AFTER));
    }

    /// A client that resets while its bytes go ahead of a slow reply: the proxy must be reset
    /// too, not closed, or it could take the half-sent request as whole.
    #[tokio::test]
    async fn a_client_failing_while_its_bytes_go_ahead_resets_the_proxy_connection() {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        let upstream = upstream_via(vec![proxy_addr], Duration::from_secs(5));
        let clients = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = std::net::TcpStream::connect(clients.local_addr().unwrap()).unwrap();
        let (mut accepted, _) = clients.accept().await.unwrap();

        let stream = upstream.reach().await.unwrap();
        let (mut at_proxy, _) = proxy.accept().await.unwrap();
        let mut ahead = crate::ahead::Ahead::take_first(&mut accepted)
            .await
            .unwrap();
        let dst = "127.0.0.2:80".parse().unwrap();
        let opening = async {
            let mut stream = stream;
            // The listener drops the proxy connection once the request failed, as here.
            upstream
                .request(&mut stream, dst, Some(&mut ahead), false)
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
        let v4 = connect_request("127.0.0.2:80".parse().unwrap(), None);
        assert_eq!(
            v4,
            "CONNECT 127.0.0.2:80 HTTP/1.1\r\nHost: 127.0.0.2:80\r\n\r\n"
        );
        let v6 = connect_request("[::1]:443".parse().unwrap(), Some("Basic eDp5"));
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
