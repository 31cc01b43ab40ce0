//! The DNS responder: queries in, answers out (see [`super`]).

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use hickory_proto::op::ResponseCode;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
};
use tracing::{debug, warn};

use super::{
    HostNames,
    fake_pool::Tenant,
    message::{self, Asks, NotAQuery, Query},
};
use crate::{
    kernel::{Asker, DnsAskers, OriginalDsts},
    observe::Observer,
    policy::DirectNames,
    relay::reset,
    sniff::Name,
};

/// Time to live of fake answers, in seconds: a name keeps its address anyway, and a short
/// TTL keeps what applications cache from outliving a restart of the daemon for long.
const FAKE_TTL: u32 = 1;

/// How long a resolver gets to answer a forwarded query (glibc's own timeout per try is 5 s).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a DNS-over-TCP client may take to send a whole query (or stay silent between
/// queries).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Most queries answered at once, and most DNS-over-TCP connections open at once, in all and
/// per tenant (cgroup and user): each holds a socket to its resolver, and the daemon's
/// descriptors are the tunnels'. One tenant's flood is dropped (UDP: the client retries) or
/// reset (TCP) before it can crowd out the others.
const MAX_IN_FLIGHT: usize = 256;
const TENANT_IN_FLIGHT: usize = 64;
const MAX_TCP_CONNECTIONS: usize = 256;
const TENANT_TCP_CONNECTIONS: usize = 16;

/// Per-tenant counts of something held, with a limit.
struct Shares {
    limit: usize,
    held: std::sync::Mutex<std::collections::HashMap<Tenant, usize>>,
}

/// One share, given back on drop.
struct Share {
    shares: Arc<Shares>,
    tenant: Tenant,
}

impl Shares {
    fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            held: std::sync::Mutex::default(),
        })
    }

    /// A share for `tenant`, unless it holds its limit.
    fn take(self: &Arc<Self>, tenant: Tenant) -> Option<Share> {
        let mut held = self.held.lock().ok()?;
        let count = held.entry(tenant).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Share {
            shares: Arc::clone(self),
            tenant,
        })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if let Ok(mut held) = self.shares.held.lock()
            && let Some(count) = held.get_mut(&self.tenant)
        {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.tenant);
            }
        }
    }
}

/// The DNS responder.
pub(crate) struct Responder {
    names: Arc<HostNames>,
    askers: DnsAskers,
    /// The records of DNS-over-TCP connections (filed by sock_ops, as tunnels' are).
    dsts: Arc<OriginalDsts>,
    /// Names that get real answers in fake mode: NO_PROXY's and `--dns-direct`'s.
    direct: DirectNames,
    /// AAAA questions get fake addresses only when IPv6 is tunnelled (an IPv6 listener).
    fake_v6: bool,
    observer: Arc<Observer>,
    /// Queries being answered; see [`MAX_IN_FLIGHT`].
    in_flight: Arc<Semaphore>,
    tenant_in_flight: Arc<Shares>,
    /// DNS-over-TCP connections open; see [`MAX_TCP_CONNECTIONS`].
    connections: Arc<Semaphore>,
    tenant_connections: Arc<Shares>,
}

impl Responder {
    pub(crate) fn new(
        names: Arc<HostNames>,
        askers: DnsAskers,
        dsts: Arc<OriginalDsts>,
        direct: DirectNames,
        fake_v6: bool,
        observer: Arc<Observer>,
    ) -> Self {
        Self {
            names,
            askers,
            dsts,
            direct,
            fake_v6,
            observer,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            tenant_in_flight: Shares::new(TENANT_IN_FLIGHT),
            connections: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
            tenant_connections: Shares::new(TENANT_TCP_CONNECTIONS),
        }
    }

    /// Answers the queries arriving on `socket`, each in a task of its own.
    pub(crate) async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let Ok(local) = socket.local_addr() else {
            return;
        };
        let mut buf = vec![0u8; 65_536];
        loop {
            let (len, client) = match socket.recv_from(&mut buf).await {
                Ok(received) => received,
                // An ICMP error for an earlier answer, or a signal: not this socket's end.
                Err(err) => {
                    debug!("DNS: receive: {err}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
                self.observer.metrics.dns.failed.inc();
                continue;
            };
            let bytes = buf[..len].to_vec();
            let asker = match self.askers.asker(client, local) {
                Ok(asker) => asker,
                Err(err) => {
                    warn!("DNS: cannot tell who sent a query from {client}: {err}");
                    None
                }
            };
            let share = match &asker {
                Some(asker) => {
                    let tenant = (asker.process.cgroup, asker.process.uid);
                    let Some(share) = self.tenant_in_flight.take(tenant) else {
                        self.observer.metrics.dns.failed.inc();
                        continue;
                    };
                    Some(share)
                }
                None => None,
            };
            let (responder, socket) = (Arc::clone(&self), Arc::clone(&socket));
            tokio::spawn(async move {
                if let Some(answer) = responder.respond(&bytes, asker.as_ref(), false).await {
                    let _ = socket.send_to(&answer, client).await;
                }
                drop((permit, share));
            });
        }
    }

    /// Serves the DNS-over-TCP connections arriving on `listener`.
    pub(crate) async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() else {
                self.observer.metrics.dns.failed.inc();
                reset(&stream);
                continue;
            };
            let responder = Arc::clone(&self);
            tokio::spawn(async move {
                responder.serve_connection(stream, peer).await;
                drop(permit);
            });
        }
    }

    /// One DNS-over-TCP connection: length-prefixed queries, answered in order.
    async fn serve_connection(&self, mut stream: TcpStream, peer: SocketAddr) {
        let listener_port = stream.local_addr().map_or(0, |a| a.port());
        let taken = self.dsts.take_here(listener_port, peer);
        if let Ok(Some(_)) = taken {
            self.observer
                .metrics
                .records_taken
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let asker = match taken {
            Ok(Some(redirected)) => Asker {
                resolver: redirected.dst,
                process: redirected.process,
            },
            _ => {
                self.observer.metrics.dns.refused.inc();
                reset(&stream);
                return;
            }
        };
        let tenant = (asker.process.cgroup, asker.process.uid);
        let Some(_share) = self.tenant_connections.take(tenant) else {
            self.observer.metrics.dns.failed.inc();
            reset(&stream);
            return;
        };
        loop {
            let read = async {
                let len = stream.read_u16().await?;
                let mut query = vec![0u8; usize::from(len)];
                stream.read_exact(&mut query).await?;
                io::Result::Ok(query)
            };
            let Ok(Ok(query)) = tokio::time::timeout(TCP_IDLE, read).await else {
                return;
            };
            let Ok(_permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
                self.observer.metrics.dns.failed.inc();
                return;
            };
            let Some(_query_share) = self.tenant_in_flight.take(tenant) else {
                self.observer.metrics.dns.failed.inc();
                return;
            };
            let Some(answer) = self.respond(&query, Some(&asker), true).await else {
                continue;
            };
            let Ok(len) = u16::try_from(answer.len()) else {
                return;
            };
            let mut framed = Vec::with_capacity(answer.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&answer);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }

    /// The answer to `bytes` from `asker` (`None`: not captured), if any is due.
    async fn respond(&self, bytes: &[u8], asker: Option<&Asker>, tcp: bool) -> Option<Vec<u8>> {
        let counts = &self.observer.metrics.dns;
        let query = match Query::read(bytes) {
            Ok(query) => query,
            Err(NotAQuery::Answer(answer)) => {
                counts.malformed.inc();
                return Some(answer);
            }
            Err(NotAQuery::Drop) => {
                counts.malformed.inc();
                return None;
            }
        };
        let Some(asker) = asker else {
            counts.refused.inc();
            return Some(query.fail(ResponseCode::Refused));
        };
        let name = query.name();
        let tenant = (asker.process.cgroup, asker.process.uid);
        if let Some(pool) = &self.names.fake
            && let Some(name) = name.as_ref().filter(|n| !self.direct.matches(n))
        {
            let v6 = match query.asks() {
                Asks::A => Some(false),
                Asks::Aaaa => Some(true),
                Asks::Other => None,
            };
            if let Some(v6) = v6 {
                if v6 && !self.fake_v6 {
                    // IPv6 is not tunnelled: no AAAA, so the client uses IPv4.
                    counts.fake.inc();
                    return Some(query.answer(None, FAKE_TTL));
                }
                let Some(address) = pool.address(tenant, name, v6) else {
                    counts.failed.inc();
                    if self.observer.log_limit.admit(asker.resolver) {
                        warn!(
                            "DNS: {} asked for {name}: no fake address is free (each holds a name, or rests after one); --dns-pool needs a larger network",
                            asker.process
                        );
                    }
                    return Some(query.fail(ResponseCode::ServFail));
                };
                counts.fake.inc();
                debug!("DNS: {} asked for {name}: {address}", asker.process);
                return Some(query.answer(Some(address), FAKE_TTL));
            }
        }
        let Some(encoded) = query.encode() else {
            counts.malformed.inc();
            return Some(query.fail(ResponseCode::FormErr));
        };
        let forwarded = forward(asker.resolver, &encoded, tcp)
            .await
            .and_then(|answer| {
                if query.is_answered_by(&answer) {
                    Ok(answer)
                } else {
                    Err(io::Error::other("the answer does not match the question"))
                }
            });
        match forwarded {
            Ok(answer) => {
                counts.forwarded.inc();
                if let Some((name, addresses)) = message::learn(&answer) {
                    debug!(
                        "DNS: {} asked {} for {name}: {} address(es)",
                        asker.process,
                        asker.resolver,
                        addresses.len()
                    );
                    self.names
                        .learned
                        .learn(tenant, asker.process.pid, &name, &addresses);
                }
                Some(answer)
            }
            Err(err) => {
                counts.failed.inc();
                if self.observer.log_limit.admit(asker.resolver) {
                    warn!(
                        "DNS: {} asked {} for {}: {err}",
                        asker.process,
                        asker.resolver,
                        name.as_ref().map_or("a name", Name::as_str)
                    );
                }
                Some(query.fail(ResponseCode::ServFail))
            }
        }
    }
}

/// Sends `query` to `resolver` and returns its answer, over TCP or UDP.
async fn forward(resolver: SocketAddr, query: &[u8], tcp: bool) -> io::Result<Vec<u8>> {
    let exchange = async {
        if tcp {
            forward_tcp(resolver, query).await
        } else {
            forward_udp(resolver, query).await
        }
    };
    tokio::time::timeout(FORWARD_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {FORWARD_TIMEOUT:?}"),
            )
        })?
}

/// One query over UDP, from a socket of its own (a fresh port per query, as resolvers do to
/// make forged answers harder): the first answer with the query's id.
async fn forward_udp(resolver: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let any: SocketAddr = match resolver {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(any).await?;
    socket.connect(resolver).await?;
    socket.send(query).await?;
    let id = message::id_of(query);
    let mut buf = vec![0u8; 65_536];
    loop {
        let len = socket.recv(&mut buf).await?;
        if message::id_of(&buf[..len]) == id {
            buf.truncate(len);
            return Ok(buf);
        }
    }
}

/// One query over TCP.
async fn forward_tcp(resolver: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(resolver).await?;
    let len = u16::try_from(query.len()).map_err(|_| io::Error::other("query too long"))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await?;
    let mut answer = vec![0u8; usize::from(len)];
    stream.read_exact(&mut answer).await?;
    Ok(answer)
}
