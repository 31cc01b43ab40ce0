//! Origin servers on 127.0.0.2 and up: what intercepted clients really want to reach.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
};

use crate::server::Server;

/// A TCP server running `handler` on a thread per connection, counting connections.
pub struct Origin {
    server: Server,
    hits: Arc<AtomicUsize>,
}

impl Origin {
    /// Serves on a free port of `ip` (which must be a loopback address: 127.0.0.2 and up, or
    /// ::1).
    pub fn spawn(
        ip: impl Into<IpAddr>,
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind((ip.into(), 0)).expect("bind origin");
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        let server = Server::spawn(listener, move |stream| {
            counter.fetch_add(1, Ordering::SeqCst);
            handler(stream);
        });
        Self { server, hits }
    }

    /// A server that speaks first (as SSH or SMTP do): writes `banner` and a newline, then
    /// echoes.
    pub fn banner(ip: impl Into<IpAddr>, banner: &'static str) -> Self {
        Self::spawn(ip, move |mut stream| {
            if stream.write_all(format!("{banner}\n").as_bytes()).is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        })
    }

    /// An HTTP server answering every request with `200` and `body`.
    pub fn http(ip: impl Into<IpAddr>, body: &'static str) -> Self {
        Self::spawn(ip, move |mut stream| {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 65536 {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes());
        })
    }

    /// Reads until the client half-closes, then answers `got N bytes, sha256 H` and closes: it
    /// can only answer if the client's end-of-file came through.
    pub fn answer_after_eof(ip: impl Into<IpAddr>) -> Self {
        Self::spawn(ip, |mut stream| {
            let mut request = Vec::new();
            if stream.read_to_end(&mut request).is_ok() {
                let answer = format!(
                    "got {} bytes, sha256 {}",
                    request.len(),
                    crate::sha256_hex(&request)
                );
                let _ = stream.write_all(answer.as_bytes());
            }
        })
    }

    /// Sends `len` bytes of `pattern(seed)` while reading `len` bytes (or up to end-of-file)
    /// from the client, then closes; records `"<len> <sha256>"` of what it received in
    /// `received`. Both ends know the length, so no half-close is needed.
    pub fn bulk(
        ip: impl Into<IpAddr>,
        seed: u64,
        len: usize,
        received: Arc<Mutex<Vec<String>>>,
    ) -> Self {
        Self::spawn(ip, move |stream| {
            let mut writer = stream.try_clone().expect("clone origin stream");
            let sender = thread::spawn(move || {
                let data = crate::pattern(seed, len);
                let _ = writer.write_all(&data);
            });
            let data = crate::read_up_to(&stream, len);
            let _ = sender.join();
            received.lock().expect("lock").push(format!(
                "{} {}",
                data.len(),
                crate::sha256_hex(&data)
            ));
        })
    }

    /// Echoes every byte back until the client closes.
    pub fn echo(ip: impl Into<IpAddr>) -> Self {
        Self::spawn(ip, |stream| {
            let mut writer = stream.try_clone().expect("clone origin stream");
            let mut reader = stream;
            let _ = std::io::copy(&mut reader, &mut writer);
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Connections accepted so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}
