//! `tp-fast-proxy [LISTEN]`: a minimal, fast HTTP CONNECT proxy for `cargo xtask bench`.
//!
//! The benchmark compares interceptors (transproxy, redsocks) in front of the same upstream
//! proxy. With squid as that upstream, squid's own cost can hide theirs; this proxy does as
//! little as possible per tunnel, so what the figures show is the interceptor: tokio on every
//! core, one CONNECT request parsed, then the bytes moved with splice(2) through a pipe per
//! direction, so they never enter user space (plain copying when splice is not possible).
//!
//! It listens on LISTEN (default `127.0.0.1:0`), prints `listening ADDR` once it accepts, and
//! tunnels to loopback destinations only (403 otherwise). No authentication, no timeouts: a
//! benchmark fixture, not a proxy to deploy.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd as _, OwnedFd},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use nix::{
    fcntl::{OFlag, SpliceFFlags, splice},
    unistd::pipe2,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::{TcpSocket, TcpStream},
};

/// Largest CONNECT request head accepted, as for transproxy's replies.
const MAX_HEAD: usize = 16 * 1024;

/// Bytes asked of each splice(2): more than a pipe holds, so each call moves what the pipe can.
const SPLICE_LEN: usize = 1 << 20;

/// Listen queue: as long as the kernel allows by default (`net.core.somaxconn`). Thousands of
/// tunnels open at once in the idle-tunnel figure; with a short queue, overflowing handshakes
/// complete by SYN cookie on the client side only, and a connection that never sends is then
/// lost without either end noticing.
const BACKLOG: u32 = 4096;

/// Buffer of the copying fallback.
const COPY_BUFFER: usize = 64 * 1024;

/// Runs the proxy on a multi-threaded runtime (one worker per core).
fn main() -> ExitCode {
    let listen = std::env::args().nth(1);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
        .and_then(|runtime| runtime.block_on(serve(listen.as_deref().unwrap_or("127.0.0.1:0"))));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tp-fast-proxy: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Accepts forever, one task per tunnel.
async fn serve(listen: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("{listen} is not an address:port"))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    let listener = socket
        .bind(addr)
        .and_then(|()| socket.listen(BACKLOG))
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("listening {}", listener.local_addr()?);
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(tunnel(client));
            }
            // Out of descriptors, typically: give closing tunnels a moment instead of spinning.
            Err(err) => {
                eprintln!("tp-fast-proxy: accept: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One client: read its CONNECT, connect to the target, answer 200, relay both ways. Any error
/// closes both sockets (the benchmark never needs more than that).
async fn tunnel(mut client: TcpStream) -> io::Result<()> {
    client.set_nodelay(true)?;
    let Some((target, early_data)) = read_connect(&mut client).await? else {
        return client
            .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            .await;
    };
    if !target.ip().is_loopback() {
        return client
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            .await;
    }
    let mut upstream = match TcpStream::connect(target).await {
        Ok(upstream) => upstream,
        Err(_) => {
            return client
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    };
    upstream.set_nodelay(true)?;
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    upstream.write_all(&early_data).await?;
    tokio::try_join!(relay(&client, &upstream), relay(&upstream, &client))?;
    Ok(())
}

/// Reads the request head; returns the CONNECT target and any bytes the client sent after the
/// head, or `None` for anything but a well-formed `CONNECT ip:port`.
async fn read_connect(client: &mut TcpStream) -> io::Result<Option<(SocketAddr, Vec<u8>)>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        let n = client.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(len)) => {
                let target = (request.method == Some("CONNECT"))
                    .then(|| request.path.and_then(|p| p.parse().ok()))
                    .flatten();
                return Ok(target.map(|t| (t, head[len..].to_vec())));
            }
            Err(_) => return Ok(None),
        }
    }
}

/// Moves bytes from `from` to `to` until end-of-file, then shuts down `to`'s write side so the
/// half-close reaches the far end.
async fn relay(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    match pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
        Ok(pipe) => splice_through(from, to, pipe).await?,
        // No descriptors left for a pipe: this tunnel copies instead.
        Err(_) => copy(from, to).await?,
    }
    // SAFETY: shutdown(2) on a descriptor `to` owns for the whole call.
    if unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) } != 0 {
        let err = io::Error::last_os_error();
        // The peer may be gone already; that is the end of this direction anyway.
        if err.raw_os_error() != Some(libc::ENOTCONN) {
            return Err(err);
        }
    }
    Ok(())
}

/// socket → pipe → socket with splice(2): the data stays in kernel pages. The pipe is emptied
/// before the next read, so neither call can find it full. Falls back to copying if the kernel
/// refuses to splice these sockets at all.
async fn splice_through(
    from: &TcpStream,
    to: &TcpStream,
    (pipe_out, pipe_in): (OwnedFd, OwnedFd),
) -> io::Result<()> {
    // The sockets are non-blocking already; the pipe must not block either.
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut moved_any = false;
    loop {
        let read = from
            .async_io(Interest::READABLE, || {
                splice(from.as_fd(), None, pipe_in.as_fd(), None, SPLICE_LEN, flags)
                    .map_err(io::Error::from)
            })
            .await;
        let mut in_pipe = match read {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(err) if !moved_any && err.raw_os_error() == Some(libc::EINVAL) => {
                return copy(from, to).await;
            }
            Err(err) => return Err(err),
        };
        moved_any = true;
        while in_pipe > 0 {
            in_pipe -= to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe_out.as_fd(), None, to.as_fd(), None, in_pipe, flags)
                        .map_err(io::Error::from)
                })
                .await?;
        }
    }
}

/// The fallback: read into a buffer, write it out.
async fn copy(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        from.readable().await?;
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        };
        let mut sent = 0;
        while sent < n {
            to.writable().await?;
            match to.try_write(&buf[sent..n]) {
                Ok(written) => sent += written,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err),
            }
        }
    }
}
