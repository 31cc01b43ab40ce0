//! A small HTTP CONNECT proxy that keeps half-closed tunnels open.
//!
//! squid 5.7 and tinyproxy 1.11 (as shipped by Debian) both tear the whole tunnel down as soon
//! as one side sends end-of-file (measured here: a client that sends and then shuts down its
//! write side gets nothing back through either). Half-close propagation by transproxy can only
//! be observed through an upstream that propagates it too, so the tests bring this one. It only
//! connects to loopback destinations.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
};

use crate::server::Server;

pub struct ConnectProxy {
    server: Server,
    targets: Arc<Mutex<Vec<SocketAddr>>>,
}

impl ConnectProxy {
    pub fn start() -> Self {
        Self::start_at(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    }

    /// On a given loopback address (port 0: any free one).
    pub fn start_at(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).expect("bind proxy");
        let targets = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&targets);
        let server = Server::spawn(listener, move |client| {
            let _ = serve(client, &seen);
        });
        Self { server, targets }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Destinations CONNECTed to so far.
    pub fn targets(&self) -> Vec<SocketAddr> {
        self.targets.lock().expect("lock").clone()
    }
}

fn serve(mut client: TcpStream, seen: &Mutex<Vec<SocketAddr>>) -> io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let (target, header_len) = loop {
        let n = client.read(&mut buf)?;
        if n == 0 || head.len() > 16384 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = request.parse(&head) {
            let target = (request.method == Some("CONNECT"))
                .then(|| request.path.and_then(|p| p.parse::<SocketAddr>().ok()))
                .flatten();
            break (target, len);
        }
    };
    let Some(target) = target.filter(|t| t.ip().is_loopback()) else {
        return client.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
    };
    seen.lock().expect("lock").push(target);
    let mut upstream = match TcpStream::connect(target) {
        Ok(upstream) => upstream,
        Err(_) => {
            return client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        }
    };
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    upstream.write_all(&head[header_len..])?;
    let (mut client_read, mut upstream_write) = (client.try_clone()?, upstream.try_clone()?);
    let up = thread::spawn(move || {
        let _ = io::copy(&mut client_read, &mut upstream_write);
        let _ = upstream_write.shutdown(Shutdown::Write);
    });
    let _ = io::copy(&mut upstream, &mut client);
    let _ = client.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}
