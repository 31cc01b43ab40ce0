//! `--on-proxy-error=http`: the proxy's own status and error page, shown to a client that sent
//! an HTTP request, instead of a bare reset, so a person sees why.
//!
//! The page is captured during the CONNECT exchange ([`capture`], bounded in size and time),
//! then made fit for the client and written, if the client's first bytes are an HTTP request
//! ([`show`]).

use std::time::Duration;

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::upstream::Rejection;

/// How much of a rejection's body is kept to show the client.
const MAX_ERROR_PAGE: usize = 64 * 1024;

/// How long an error page's body may take once its header is in. A proxy that neither says how
/// long the page is nor closes would otherwise hold the rejection until the reply timeout,
/// and lose it there.
const ERROR_PAGE_WAIT: Duration = Duration::from_secs(1);

/// How long to wait for a rejected client's first bytes, to tell whether it speaks HTTP.
const HTTP_SNIFF_WAIT: Duration = Duration::from_millis(200);

/// How long, after an error page, the client's unread bytes are read and dropped.
const LINGER: Duration = Duration::from_secs(1);

/// Reads the rest of a rejection, bounded, until the proxy closes, its `Content-Length` is
/// reached, the page limit, or [`ERROR_PAGE_WAIT`]. Errors just end the page.
pub(crate) async fn capture(stream: &mut (impl tokio::io::AsyncRead + Unpin), buf: &mut BytesMut) {
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
    let mut headers = [httparse::EMPTY_HEADER; crate::upstream::MAX_REPLY_HEADERS];
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

/// `--on-proxy-error=http`: if the client's first bytes are an HTTP request, answers it with
/// the proxy's own status and page, so a person sees why. Returns whether it did.
pub(crate) async fn show(client: &mut TcpStream, taken: &[u8], rejection: &Rejection) -> bool {
    if rejection.page.is_empty() || !sent_http_request(client, taken).await {
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

/// Whether the client has sent (the start of) an HTTP request: `taken`, the bytes already taken
/// from it, or else the first bytes it sends.
async fn sent_http_request(client: &TcpStream, taken: &[u8]) -> bool {
    let peeked;
    let first = if taken.is_empty() {
        // On the heap: this error path should not grow every tunnel task by a kilobyte.
        let mut buf = vec![0u8; 1024];
        let Ok(Ok(len)) = tokio::time::timeout(HTTP_SNIFF_WAIT, client.peek(&mut buf)).await else {
            return false;
        };
        buf.truncate(len);
        peeked = buf;
        &peeked[..]
    } else {
        taken
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
