//! `tp-fast-proxy [LISTEN]`: a minimal, fast HTTP CONNECT proxy for `cargo xtask bench`.
//!
//! The benchmark compares interceptors (transproxy, redsocks) in front of the same upstream
//! proxy. With squid as that upstream, squid's own cost can hide theirs; this proxy does as
//! little as possible per tunnel, so what the figures show is the interceptor. It is built like
//! the daemon: one thread and single-threaded tokio runtime per core, each accepting on its own
//! socket of an SO_REUSEPORT group, and the daemon's own relay (`transproxy::relay`: short
//! exchanges copied through a per-thread buffer, bulk spliced through a pipe, half-close kept).
//! Bytes the client sends with its CONNECT request are relayed once the tunnel is up.
//!
//! It listens on LISTEN (default `127.0.0.1:0`), prints `listening ADDR` once it accepts, and
//! tunnels to loopback destinations only (403 otherwise). No authentication: a benchmark
//! fixture, not a proxy to deploy.

use std::{
    io,
    net::{SocketAddr, TcpListener as StdListener},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use transproxy::{
    relay::{self, Timeouts},
    reuseport,
};

/// Largest CONNECT request head accepted, as for transproxy's replies.
const MAX_HEAD: usize = 16 * 1024;

/// Tunnels are closed by their ends, not by this proxy: the idle-tunnel figure holds them open.
const TIMEOUTS: Timeouts = Timeouts {
    half_close_idle: Duration::from_secs(3600),
    idle: None,
};

fn main() -> ExitCode {
    let listen = std::env::args().nth(1);
    match run(listen.as_deref().unwrap_or("127.0.0.1:0")) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tp-fast-proxy: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Binds one listening socket per core on the same address, then serves each on its own
/// thread until killed.
fn run(listen: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("{listen} is not an address:port"))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sockets =
        reuseport::bind_group(addr, cores).with_context(|| format!("cannot listen on {listen}"))?;
    let addr = sockets
        .first()
        .context("no listening socket")?
        .local_addr()?;
    println!("listening {addr}");
    let threads: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            std::thread::spawn(move || {
                let served = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start a tokio runtime")
                    .and_then(|runtime| runtime.block_on(serve(socket)));
                if let Err(err) = served {
                    eprintln!("tp-fast-proxy: {err:#}");
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// Accepts forever on this thread, one task per tunnel.
async fn serve(socket: StdListener) -> anyhow::Result<()> {
    let listener = TcpListener::from_std(socket)?;
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

/// One client: read its CONNECT, connect to the target, answer 200, relay both ways (what the
/// client sent ahead of the reply first). Any error closes both sockets.
async fn tunnel(mut client: TcpStream) -> io::Result<()> {
    let Some((target, ahead)) = read_connect(&mut client).await? else {
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
    // The relay writes its early bytes to its first socket: here, the client's go upstream.
    relay::relay(
        &mut upstream,
        &mut client,
        &ahead,
        TIMEOUTS,
        &relay::Progress::default(),
    )
    .await
    .map_err(|err| io::Error::other(err.to_string()))?;
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
