//! A CONNECT "proxy" that misbehaves on purpose, one way per destination port, to check that
//! transproxy turns every broken reply into a clean failure for that client and keeps serving
//! the others. Where it does open a tunnel, it echoes what it receives (it never connects out).

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use crate::server::Server;

/// How the proxy answers a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// `403 Forbidden`.
    Deny,
    /// Says nothing (for 30 s at most).
    NeverReply,
    /// A header that never ends (until 1 MiB or the peer goes away).
    EndlessHeader,
    /// A valid `200`, one byte per write, then echoes.
    OneByteWrites,
    /// `200`, then closes at once.
    OkThenClose,
    /// Something that is not HTTP.
    NotHttp,
    /// `200` with a `Content-Length` that is not a number, then echoes.
    BadContentLength,
    /// `200` with 20 KiB of headers: over transproxy's limit.
    HugeHeader,
    /// A valid `200`, then echoes, but drops whatever arrived with the CONNECT request instead
    /// of relaying it (a proxy that needs `--wait-for-reply`).
    DropsAhead,
    /// Slow to reply, like a proxy asking its own parent: when the request came alone, waits
    /// up to a second for more bytes before its `200` (taking what arrives then as sent ahead,
    /// added to the request already listed), then echoes.
    SlowReply,
    /// `407` asking for Basic to every request on the connection, credentials or not (up to
    /// 50 requests).
    AuthLoop,
    /// `407` asking for Digest with `stale=true` to every request (up to 50).
    DigestStaleLoop,
    /// `407` asking for NTLM, then a CHALLENGE that is not one.
    BadNtlmChallenge,
}

pub struct HostileProxy {
    server: Server,
    requests: Arc<Mutex<Vec<Request>>>,
}

/// A CONNECT request as the proxy received it.
#[derive(Debug, Clone)]
pub struct Request {
    /// The request head, up to its blank line.
    pub head: String,
    /// Bytes that came after the head, before any reply: the client's, sent ahead.
    pub ahead: Vec<u8>,
}

impl HostileProxy {
    /// `behaviors` maps CONNECT target ports to behaviours; other ports get `Deny`.
    pub fn start(behaviors: HashMap<u16, Behavior>) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind hostile proxy");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        let server = Server::spawn(listener, move |client| serve(client, &behaviors, &seen));
        Self { server, requests }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("lock").clone()
    }
}

fn serve(mut client: TcpStream, behaviors: &HashMap<u16, Behavior>, seen: &Mutex<Vec<Request>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16384 {
            return;
        }
    }
    let head_len = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(head.len(), |at| at + 4);
    // Bytes the client sent ahead of the reply: a proxy relays them once the tunnel is up.
    let mut ahead = head.split_off(head_len);
    let head = String::from_utf8_lossy(&head).into_owned();
    let port = head
        .split_whitespace()
        .nth(1)
        .and_then(|target| target.parse::<SocketAddr>().ok())
        .map_or(0, |t| t.port());
    let behavior = behaviors.get(&port).copied().unwrap_or(Behavior::Deny);
    let index = {
        let mut seen = seen.lock().expect("lock");
        seen.push(Request {
            head,
            ahead: ahead.clone(),
        });
        seen.len() - 1
    };
    if behavior == Behavior::SlowReply && ahead.is_empty() {
        let _ = client.set_read_timeout(Some(Duration::from_secs(1)));
        if let Ok(n) = client.read(&mut buf) {
            ahead.extend_from_slice(&buf[..n]);
            seen.lock().expect("lock")[index].ahead = ahead.clone();
        }
        let _ = client.set_read_timeout(None);
    }
    let ok = b"HTTP/1.1 200 Connection established\r\n\r\n";
    match behavior {
        Behavior::Deny => {
            let _ = client.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
        }
        Behavior::NeverReply => {
            let deadline = Instant::now() + Duration::from_secs(30);
            let _ = client.set_read_timeout(Some(Duration::from_millis(100)));
            // Until the peer goes away or the deadline.
            while Instant::now() < deadline && !matches!(client.read(&mut buf), Ok(0)) {}
        }
        Behavior::EndlessHeader => {
            let _ = client.write_all(b"HTTP/1.1 200 OK\r\n");
            let line = format!("X-Padding: {}\r\n", "a".repeat(1000));
            for _ in 0..1024 {
                if client.write_all(line.as_bytes()).is_err() {
                    break;
                }
            }
        }
        Behavior::SlowReply => {
            if client.write_all(ok).is_ok() {
                echo(client, &ahead);
            }
        }
        Behavior::OneByteWrites => {
            for byte in ok {
                if client.write_all(&[*byte]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(1));
            }
            echo(client, &ahead);
        }
        Behavior::OkThenClose => {
            let _ = client.write_all(ok);
        }
        Behavior::NotHttp => {
            let _ = client.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n");
        }
        Behavior::BadContentLength => {
            let _ = client.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: banana\r\n\r\n");
            echo(client, &ahead);
        }
        Behavior::HugeHeader => {
            let mut reply = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..200 {
                reply
                    .extend_from_slice(format!("X-Header-{i}: {}\r\n", "b".repeat(100)).as_bytes());
            }
            reply.extend_from_slice(b"\r\n");
            let _ = client.write_all(&reply);
            echo(client, &ahead);
        }
        Behavior::DropsAhead => {
            if client.write_all(ok).is_ok() {
                echo(client, &[]);
            }
        }
        Behavior::AuthLoop | Behavior::DigestStaleLoop | Behavior::BadNtlmChallenge => {
            let mut last = seen.lock().expect("lock")[index].head.clone();
            for round in 0..50 {
                let answered = last.to_ascii_lowercase().contains("proxy-authorization:");
                let challenge = match (behavior, answered) {
                    (Behavior::AuthLoop, _) => "Basic realm=\"loop\"".to_owned(),
                    (Behavior::DigestStaleLoop, _) => format!(
                        "Digest realm=\"loop\", nonce=\"n{round}\", qop=\"auth\", stale=true"
                    ),
                    (_, false) => "NTLM".to_owned(),
                    (_, true) => "NTLM AAAA".to_owned(),
                };
                let reply = format!(
                    "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: {challenge}\r\nContent-Length: 0\r\n\r\n"
                );
                if client.write_all(reply.as_bytes()).is_err() {
                    return;
                }
                let Some(next) = next_head(&mut client) else {
                    return;
                };
                last = next.clone();
                seen.lock().expect("lock").push(Request {
                    head: next,
                    ahead: Vec::new(),
                });
            }
        }
    }
}

/// The next request head on a kept connection, if one comes within 5 s.
fn next_head(client: &mut TcpStream) -> Option<String> {
    let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
        if head.len() > 16384 {
            return None;
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Echoes `ahead`, then what arrives until end-of-file, then closes.
fn echo(client: TcpStream, ahead: &[u8]) {
    let Ok(mut writer) = client.try_clone() else {
        return;
    };
    if writer.write_all(ahead).is_err() {
        return;
    }
    let mut reader = client;
    let _ = std::io::copy(&mut reader, &mut writer);
    let _ = writer.shutdown(Shutdown::Write);
}
