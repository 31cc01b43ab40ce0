//! The client's bytes that go to the proxy ahead of its reply to `CONNECT`.
//!
//! A proxy relays what follows a `CONNECT` request once the tunnel is up, so the client's
//! bytes need not wait a round trip for the `200`: what the client has sent when the proxy
//! connection is up goes in the same write as the request, and what it sends while the reply is
//! awaited follows at once. So a client that writes a moment after connecting gains that round
//! trip too: with the proxy on the same host, reached faster than clients write, that was 11% of
//! wrk's connections one at a time and 41% at 32 concurrent, measured here. It also makes what
//! goes ahead independent of that race, so a proxy that drops such bytes fails every time, not
//! now and then. At most [`MAX_AHEAD`] bytes go ahead; then the client waits for the reply like
//! everything else. `--wait-for-reply` turns this off for proxies that drop such bytes.

use std::{
    io::{self, Read as _},
    pin::Pin,
    task::Poll,
};

use socket2::SockRef;
use tokio::{
    io::{AsyncRead as _, ReadBuf},
    net::TcpStream,
    time::{Duration, Instant},
};

use crate::sniff::{self, Name, Sniffed};

/// How long a ClientHello or request header that has begun may take to complete before the
/// tunnel is asked for without its name.
const COMPLETE_WAIT: Duration = Duration::from_secs(1);

/// Most client bytes sent ahead of the reply: a request header or a TLS ClientHello fits.
pub(super) const MAX_AHEAD: usize = 16 * 1024;

/// What of the client's bytes went, or goes, ahead of the proxy's reply.
pub(super) struct Ahead<'c> {
    client: &'c mut TcpStream,
    /// Every byte taken so far (at most [`MAX_AHEAD`]): kept until the reply is in, to tell a
    /// rejected HTTP client from others and to log that bytes went ahead.
    sent: Vec<u8>,
    /// The client ended its side: what follows is the relay's to pass on.
    ended: bool,
}

impl<'c> Ahead<'c> {
    /// Takes what the client has sent so far, without waiting (a client that waits for the
    /// server to speak first has sent nothing). An error (the client reset) is returned: no
    /// tunnel should be asked for.
    pub(super) async fn take_first(client: &'c mut TcpStream) -> io::Result<Self> {
        let mut ahead = Self {
            client,
            sent: Vec::new(),
            ended: false,
        };
        ahead.read_now().await?;
        Ok(ahead)
    }

    /// The bytes taken so far.
    pub(super) fn sent(&self) -> &[u8] {
        &self.sent
    }

    /// The bytes taken, once the reply is in.
    pub(super) fn into_sent(self) -> Vec<u8> {
        self.sent
    }

    /// Waits for the client's first bytes to tell its host name (a TLS ClientHello's server
    /// name, an HTTP request's `Host`): at most `wait` for the first byte (a client that waits
    /// for the server to speak first, as SSH or SMTP do, sends nothing), then until what began
    /// is complete, at most [`COMPLETE_WAIT`]. An error is the client's (it reset).
    pub(super) async fn sniff(&mut self, wait: Duration) -> io::Result<Option<Name>> {
        let first = Instant::now() + wait;
        let mut complete = None;
        loop {
            match sniff::sniff(&self.sent) {
                Sniffed::Name(name) => return Ok(Some(name)),
                Sniffed::Nothing => return Ok(None),
                Sniffed::NeedMore if !self.wants_more() => return Ok(None),
                Sniffed::NeedMore => {}
            }
            let deadline = if self.sent.is_empty() {
                first
            } else {
                *complete.get_or_insert_with(|| Instant::now() + COMPLETE_WAIT)
            };
            match tokio::time::timeout_at(deadline, self.take_more()).await {
                Ok(taken) => drop(taken?),
                Err(_) => return Ok(None),
            }
        }
    }

    /// Whether more of the client's bytes may go ahead.
    pub(super) fn wants_more(&self) -> bool {
        !self.ended && self.sent.len() < MAX_AHEAD
    }

    /// Waits for the client's next bytes and takes them; returns them (none, at once if the
    /// budget is spent: the client ended its side). Cancel-safe: bytes are only taken when it
    /// returns.
    pub(super) async fn take_more(&mut self) -> io::Result<&[u8]> {
        if !self.wants_more() {
            return Ok(&[]);
        }
        let before = self.sent.len();
        let read = std::future::poll_fn(|cx| self.poll_take(cx)).await?;
        if read == 0 {
            self.ended = true;
        }
        Ok(&self.sent[before..])
    }

    /// Takes what the client has sent, without waiting (an end of file is left for
    /// [`Ahead::take_more`] or the relay to see again): through tokio's `poll_read` when tokio
    /// already knows the socket is readable (a short read then marks it drained, so the relay
    /// waits for new bytes instead of asking with a recv(2) that would say EAGAIN); otherwise
    /// the bytes may have arrived since tokio last looked, and the kernel is asked directly
    /// (tokio's own `try_read` would answer from its empty readiness without asking).
    async fn read_now(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            Poll::Ready(match self.poll_take(cx) {
                Poll::Ready(read) => read.map(drop),
                Poll::Pending => {
                    let mut buf = [0u8; MAX_AHEAD];
                    match (&*SockRef::from(&*self.client)).read(&mut buf) {
                        Ok(len) => {
                            self.sent.extend_from_slice(&buf[..len]);
                            Ok(())
                        }
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(()),
                        Err(err) => Err(err),
                    }
                }
            })
        })
        .await
    }

    /// Reads what fits in the budget into `sent`.
    fn poll_take(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<usize>> {
        let mut buf = [0u8; MAX_AHEAD];
        let room = MAX_AHEAD - self.sent.len();
        let mut filled = ReadBuf::new(&mut buf[..room]);
        std::task::ready!(Pin::new(&mut *self.client).poll_read(cx, &mut filled))?;
        self.sent.extend_from_slice(filled.filled());
        Poll::Ready(Ok(filled.filled().len()))
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, time::Duration};

    use tokio::net::TcpListener;

    use super::*;

    /// A loopback connection: the client's std socket and the accepted tokio one.
    async fn pair(listener: &TcpListener) -> (std::net::TcpStream, TcpStream) {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (client, accepted)
    }

    #[tokio::test]
    async fn takes_what_was_sent_without_waiting_then_what_comes_later() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();

        let (mut client, mut accepted) = pair(&listener).await;
        client.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        accepted.readable().await.unwrap();
        let mut ahead = Ahead::take_first(&mut accepted).await.unwrap();
        assert_eq!(ahead.sent(), b"GET / HTTP/1.1\r\n");
        // Later bytes are waited for, then taken.
        client.write_all(b"\r\n").unwrap();
        assert_eq!(ahead.take_more().await.unwrap(), b"\r\n");
        assert!(ahead.wants_more());
        // The client ends its side: nothing more is taken, the end is left for the relay.
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(ahead.take_more().await.unwrap().is_empty());
        assert!(!ahead.wants_more());
        assert_eq!(ahead.into_sent(), b"GET / HTTP/1.1\r\n\r\n");

        // A client that waits for the server to speak first: nothing, at once.
        let (_quiet, mut accepted) = pair(&listener).await;
        let ahead = Ahead::take_first(&mut accepted).await.unwrap();
        assert!(ahead.sent().is_empty() && ahead.wants_more());

        // No more than the budget goes ahead.
        let (mut client, mut accepted) = pair(&listener).await;
        client.write_all(&[7; MAX_AHEAD + 100]).unwrap();
        let mut ahead = Ahead::take_first(&mut accepted).await.unwrap();
        while ahead.wants_more() {
            ahead.take_more().await.unwrap();
        }
        assert_eq!(ahead.sent().len(), MAX_AHEAD);
        assert!(ahead.take_more().await.unwrap().is_empty());

        // A client that reset: an error, so no tunnel is opened for it.
        let (client, mut accepted) = pair(&listener).await;
        SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(client);
        accepted.readable().await.unwrap();
        assert!(Ahead::take_first(&mut accepted).await.is_err());
    }
}
