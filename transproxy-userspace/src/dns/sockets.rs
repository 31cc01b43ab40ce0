//! The DNS responder's sockets: UDP and TCP, on 127.0.0.1 and ::1 only (anywhere else it
//! would be an open resolver), on a port only root can bind.
//!
//! The port matters for the kill switch: once a `--fail-closed` daemon is gone, a socket that
//! connected to its responder earlier (glibc keeps one per resolver for a while) still sends
//! there. On a port below `net.ipv4.ip_unprivileged_port_start` no other user can take it over
//! and read those queries. Ports that `/etc/services` names are skipped, so that a service
//! started later does not find its port taken.

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdListener, UdpSocket},
    os::fd::AsFd as _,
};

use anyhow::Context as _;
use tracing::warn;

use crate::kernel::DnsSockets;

/// Bound: UDP and TCP for IPv4, and for IPv6 when this host has `::1`.
pub(crate) struct DnsBound {
    pub(crate) udp: Vec<UdpSocket>,
    pub(crate) tcp: Vec<StdListener>,
}

impl DnsBound {
    pub(crate) fn bind() -> anyhow::Result<Self> {
        let reserved = reserved_ports();
        let mut bound = Self {
            udp: Vec::new(),
            tcp: Vec::new(),
        };
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            let pair = bind_pair(ip, &reserved);
            match (pair, ip) {
                (Ok((udp, tcp)), _) => {
                    bound.udp.push(udp);
                    bound.tcp.push(tcp);
                }
                (Err(err), IpAddr::V4(_)) => {
                    return Err(err).context("cannot bind the DNS responder on 127.0.0.1");
                }
                // No IPv6 loopback on this host: no IPv6 resolver can be asked either.
                (Err(err), IpAddr::V6(_)) => {
                    warn!("DNS to IPv6 resolvers is not captured: cannot bind on [::1]: {err}");
                }
            }
        }
        Ok(bound)
    }

    pub(crate) fn sockets(&self) -> DnsSockets<'_> {
        DnsSockets {
            udp_v4: self.udp[0].as_fd(),
            tcp_v4: self.tcp[0].as_fd(),
            udp_v6: self.udp.get(1).map(|s| s.as_fd()),
            tcp_v6: self.tcp.get(1).map(|s| s.as_fd()),
        }
    }

    /// `ADDR/udp` and `ADDR/tcp`, for status.
    pub(crate) fn describe(&self) -> Vec<String> {
        let udp = self.udp.iter().filter_map(|s| s.local_addr().ok());
        let tcp = self.tcp.iter().filter_map(|l| l.local_addr().ok());
        udp.map(|a| format!("{a}/udp"))
            .chain(tcp.map(|a| format!("{a}/tcp")))
            .collect()
    }

    /// The TCP listeners' addresses, never to be intercepted.
    pub(crate) fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }
}

/// A UDP socket and a TCP listener on `ip`, on the same port: a reserved one when one is free,
/// else any.
fn bind_pair(ip: IpAddr, reserved: &[u16]) -> io::Result<(UdpSocket, StdListener)> {
    let bind = |port: u16| -> io::Result<(UdpSocket, StdListener)> {
        let udp = UdpSocket::bind((ip, port))?;
        let port = udp.local_addr()?.port();
        let tcp = StdListener::bind((ip, port))?;
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok((udp, tcp))
    };
    for &port in reserved {
        if let Ok(pair) = bind(port) {
            return Ok(pair);
        }
    }
    // Any free port: the pair may need a few tries to find a port free for both.
    let mut last = None;
    for _ in 0..16 {
        match bind(0) {
            Ok(pair) => return Ok(pair),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free port")))
}

/// Ports only root can bind that `/etc/services` does not name, in an order that differs from
/// one start to the next. Empty when unprivileged users may bind every port (containers often
/// set `ip_unprivileged_port_start` to 0): then no port is safer than another.
fn reserved_ports() -> Vec<u16> {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|text| text.trim().parse::<u16>().ok())
        .unwrap_or(1024);
    if start <= 1 {
        return Vec::new();
    }
    let named: HashSet<u16> = std::fs::read_to_string("/etc/services")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .nth(1)?
                .split('/')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    // Below 512 are the oldest services, named or not: left alone.
    let mut ports: Vec<u16> = (512.max(start / 2)..start)
        .filter(|port| !named.contains(port))
        .collect();
    if !ports.is_empty() {
        let turn = std::process::id() as usize % ports.len();
        ports.rotate_left(turn);
    }
    ports
}
