//! Where redirected connections are accepted, one task each.
//!
//! A connection is tunnelled only if the kernel recorded its original destination; anything
//! else (someone connecting to the listener directly) is closed: the listener is not an open
//! relay. When the proxy cannot open the tunnel, the client is reset rather than closed, so it
//! sees a failed connection and not an empty answer.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{
    ahead::Ahead,
    cli::OnProxyError,
    failure_log::FailureLog,
    original_dst::OriginalDsts,
    refusals::Refusals,
    relay::{self, Timeouts, reset},
    tunnel::{Rejection, TunnelError, Upstream},
};

/// How long to wait for a rejected client's first bytes, to tell whether it speaks HTTP.
const HTTP_SNIFF_WAIT: Duration = Duration::from_millis(200);

/// How long, after an error page, the client's unread bytes are read and dropped.
const LINGER: Duration = Duration::from_secs(1);

/// Counters for the shutdown summary and for operators.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    /// Connections without a kernel record, closed untouched.
    pub unmapped: AtomicU64,
    pub tunnelled: AtomicU64,
    /// Tunnels the proxy would not or could not open; the client was reset.
    pub failed_at_proxy: AtomicU64,
    /// Clients reset because `--max-tunnels` were already open.
    pub over_capacity: AtomicU64,
}

/// What every connection task shares.
pub struct Tunnels {
    pub dsts: Arc<OriginalDsts>,
    pub refusals: Arc<Refusals>,
    pub upstream: Arc<Upstream>,
    pub timeouts: Timeouts,
    pub on_proxy_error: OnProxyError,
    /// Whether the client's bytes go to the proxy without waiting for its reply (not
    /// `--wait-for-reply`).
    pub send_ahead: bool,
    /// One permit per open tunnel.
    pub capacity: Arc<Semaphore>,
    pub stats: Arc<Stats>,
    /// Limits per-connection failure lines (any process of the cgroup can cause them).
    pub failures: FailureLog,
    /// Cancelled when the shutdown grace has run out: tunnels still relaying reset both ends,
    /// so that neither takes a cut transfer for a complete one.
    pub cut: CancellationToken,
}

/// Accepts on `tcp` until `shutdown` is cancelled. Connection tasks are spawned on `tasks`, so
/// the caller can wait for them to finish.
pub async fn serve(
    tcp: TcpListener,
    tunnels: Arc<Tunnels>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = tcp.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                tunnels.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let tunnels = Arc::clone(&tunnels);
                tasks.spawn(async move { tunnels.handle(client, peer).await });
            }
            Err(err) => {
                // Out of file descriptors or memory: back off instead of spinning.
                warn!("accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Tunnels {
    /// One connection: find its destination, open the tunnel, relay.
    async fn handle(&self, mut client: TcpStream, peer: SocketAddr) {
        let dst = match self.dsts.take(peer) {
            Ok(Some(dst)) => dst,
            Ok(None) => {
                let count = self.stats.unmapped.fetch_add(1, Ordering::Relaxed) + 1;
                // Anyone may connect here: logged at 1, 2, 4, 8, ... so that cannot flood the log.
                if count.is_power_of_two() {
                    warn!(
                        "reset connection from {peer}: it was not redirected by transproxy (direct connections to the listener are not tunnelled; {count} so far)"
                    );
                }
                // A reset, not a FIN: a client whose record was lost must not take an empty
                // answer for a complete one.
                reset(&client);
                return;
            }
            Err(err) => {
                self.stats.unmapped.fetch_add(1, Ordering::Relaxed);
                warn!("reset connection from {peer}: cannot read its original destination: {err}");
                reset(&client);
                return;
            }
        };
        let Ok(_permit) = Arc::clone(&self.capacity).try_acquire_owned() else {
            let count = self.stats.over_capacity.fetch_add(1, Ordering::Relaxed) + 1;
            // Logged at 1, 2, 4, 8, ... so a flood cannot flood the log.
            if count.is_power_of_two() {
                warn!(
                    "{peer} -> {dst}: reset: --max-tunnels reached ({count} clients reset so far)"
                );
            }
            reset(&client);
            return;
        };
        // The proxy connection, once reached: kept here so that a cut can reset it, whatever
        // the tunnel is doing.
        let mut proxy = None;
        tokio::select! {
            () = self.tunnel(&mut client, &mut proxy, peer, dst) => {}
            () = self.cut.cancelled() => {
                debug!("{peer} -> {dst}: reset: cut at the end of the shutdown grace");
                reset(&client);
                if let Some(proxy) = &proxy {
                    reset(proxy);
                }
            }
        }
    }

    /// Opens the tunnel from `client` to `dst` and relays until it ends. The proxy connection
    /// goes into `proxy` as soon as it is reached.
    async fn tunnel(
        &self,
        client: &mut TcpStream,
        proxy: &mut Option<TcpStream>,
        peer: SocketAddr,
        dst: SocketAddr,
    ) {
        let keep_error_page = self.shows_error_pages();
        let stream = match self.upstream.reach().await {
            Ok(stream) => proxy.insert(stream),
            Err(err) => return self.not_opened(client, peer, dst, err, &[]).await,
        };
        // The client's bytes that went ahead of the proxy's reply.
        let mut ahead = Vec::new();
        let opened = if self.send_ahead {
            match Ahead::take_first(client).await {
                Ok(mut taking) => {
                    let opened = self
                        .upstream
                        .request(stream, dst, Some(&mut taking), keep_error_page)
                        .await;
                    ahead = taking.into_sent();
                    opened
                }
                Err(err) => Err(TunnelError::ClientFailed(err)),
            }
        } else {
            self.upstream
                .request(stream, dst, None, keep_error_page)
                .await
        };
        let early_data = match opened {
            Ok(early_data) => early_data,
            Err(err) => return self.not_opened(client, peer, dst, err, &ahead).await,
        };
        self.stats.tunnelled.fetch_add(1, Ordering::Relaxed);
        // Only the count outlives the opening: a tunnel holds no copy of its first bytes.
        let went_ahead = ahead.len() as u64;
        drop(ahead);
        match relay::relay(client, stream, &early_data, self.timeouts).await {
            Ok(moved) => debug!(
                "{peer} -> {dst}: closed after {} bytes up, {} down",
                moved.to_upstream + went_ahead,
                moved.to_client
            ),
            Err(err) => {
                if self.failures.admit(dst) {
                    info!("{peer} -> {dst}: aborted: {err}");
                } else {
                    debug!("{peer} -> {dst}: aborted: {err}");
                }
                reset(client);
                reset(stream);
            }
        }
    }

    /// `--on-proxy-error=http`: a rejection is kept with its page, to show HTTP clients.
    fn shows_error_pages(&self) -> bool {
        self.on_proxy_error == OnProxyError::Http
    }

    /// A tunnel that did not open: says why, remembers a destination the proxy reports
    /// refused, and answers the client with a reset (or the proxy's page, with
    /// `--on-proxy-error=http`). `ahead`: the client's bytes that went to the proxy.
    async fn not_opened(
        &self,
        client: &mut TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        err: TunnelError,
        ahead: &[u8],
    ) {
        let logged = self.failures.admit(dst);
        if let TunnelError::ClientFailed(_) = err {
            // Gone before the tunnel opened: nothing the proxy did.
            if logged {
                info!("{peer} -> {dst}: {err}");
            } else {
                debug!("{peer} -> {dst}: {err}");
            }
            reset(client);
            return;
        }
        self.stats.failed_at_proxy.fetch_add(1, Ordering::Relaxed);
        // A proxy that drops bytes sent ahead of its reply can fail like this.
        let hint = if ahead.is_empty() || matches!(err, TunnelError::Rejected(_)) {
            ""
        } else {
            " (the client's bytes went ahead of the reply; --wait-for-reply holds them back)"
        };
        if logged {
            warn!("{peer} -> {dst}: {err}{hint}");
        } else {
            debug!("{peer} -> {dst}: {err}{hint}");
        }
        if let TunnelError::Rejected(rejection) = &err {
            if rejection.destination_unreachable() {
                self.refusals.record(dst);
            }
            if self.shows_error_pages() && show_error_page(client, ahead, rejection).await {
                return;
            }
        }
        reset(client);
    }
}

/// `--on-proxy-error=http`: if the client's first bytes are an HTTP request, answers it with
/// the proxy's own status and page, so a person sees why. Returns whether it did.
async fn show_error_page(client: &mut TcpStream, ahead: &[u8], rejection: &Rejection) -> bool {
    if rejection.page.is_empty() || !sent_http_request(client, ahead).await {
        return false;
    }
    let page = http_error_page(&rejection.page);
    if client.write_all(&page).await.is_err() {
        return false;
    }
    let _ = client.shutdown().await;
    linger(client).await;
    true
}

/// Reads and drops what the client still sends until it closes, for at most
/// [`LINGER`]: closing with its bytes unread (a request body that did not go ahead) would send
/// a reset, which can discard the page before the client has read it. HTTP servers close the
/// same way.
async fn linger(client: &mut TcpStream) {
    let mut sink = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(read) = client.read(&mut sink).await {
            if read == 0 {
                break;
            }
        }
    })
    .await;
}

/// Whether the client has sent (the start of) an HTTP request: `ahead`, the bytes already taken
/// from it, or else the first bytes it sends.
async fn sent_http_request(client: &TcpStream, ahead: &[u8]) -> bool {
    let peeked;
    let first = if ahead.is_empty() {
        // On the heap: this error path should not grow every tunnel task by a kilobyte.
        let mut buf = vec![0u8; 1024];
        let Ok(Ok(len)) = tokio::time::timeout(HTTP_SNIFF_WAIT, client.peek(&mut buf)).await else {
            return false;
        };
        buf.truncate(len);
        peeked = buf;
        &peeked[..]
    } else {
        ahead
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    request.parse(first).is_ok() && request.method.is_some() && request.path.is_some()
}

/// The proxy's reply, made fit for the client: hop-by-hop headers dropped, the length of the
/// body as kept, `Connection: close` added (the connection ends after the page).
fn http_error_page(page: &[u8]) -> Vec<u8> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut reply = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(header_len)) = reply.parse(page) else {
        return page.to_vec();
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        reply.code.unwrap_or(502),
        reply.reason.unwrap_or("")
    )
    .into_bytes();
    let body = &page[header_len..];
    for header in reply.headers.iter() {
        // The body's length is stated anew below: the page may have been cut short, and a
        // chunked body is not kept.
        if [
            "connection",
            "proxy-connection",
            "keep-alive",
            "transfer-encoding",
            "content-length",
        ]
        .iter()
        .any(|hop| header.name.eq_ignore_ascii_case(hop))
        {
            continue;
        }
        out.extend_from_slice(header.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(header.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(
        format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hop-by-hop headers and chunked framing are dropped, and the length is that of the body
    /// kept (here cut short, and dropped as chunked).
    #[test]
    fn error_page_is_made_fit_for_the_client() {
        for (from_proxy, to_client) in [
            (
                &b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/html\r\nConnection: keep-alive\r\nContent-Length: 60\r\n\r\ndenied"[..],
                "HTTP/1.1 403 Forbidden\r\nContent-Type: text/html\r\nContent-Length: 6\r\nConnection: close\r\n\r\ndenied",
            ),
            (
                b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\nX-Squid-Error: ERR_ACCESS_DENIED 0\r\n\r\n",
                "HTTP/1.1 403 Forbidden\r\nX-Squid-Error: ERR_ACCESS_DENIED 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ),
        ] {
            let page = http_error_page(from_proxy);
            assert_eq!(String::from_utf8(page).unwrap(), to_client);
        }
    }
}
