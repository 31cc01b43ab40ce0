//! Who sent a captured DNS query over UDP, and which resolver it asked.
//!
//! The DNS responder receives a datagram from the asking socket's address, nothing more. The
//! programs filed the resolver (and the process) by the socket's cookie in `DNS_BY_COOKIE`
//! when they captured it; the cookie of the socket bound to that address comes from the
//! kernel's socket table through sock_diag (`SOCK_DIAG_BY_FAMILY`, one exact lookup, no dump).
//! The socket address alone is not enough: another socket may have taken it since, and a
//! datagram sent to the responder directly, not captured, has no record and gets no forwarding.
//! Cookies are never reused while the system runs.

use std::{io, net::SocketAddr, sync::Mutex};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData};
use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};
use transproxy_common::Redirect;

use super::{Process, original_dst::socket_addr};

/// Longest wait for the kernel's answer to a sock_diag lookup.
const DIAG_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// A captured query's origin: the resolver it was sent to and the process that sent it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asker {
    pub(crate) resolver: SocketAddr,
    pub(crate) process: Process,
}

/// The `DNS_BY_COOKIE` map and a sock_diag socket to find cookies with.
pub(crate) struct DnsAskers {
    map: HashMap<MapData, u64, Redirect>,
    diag: Mutex<Socket>,
}

impl DnsAskers {
    pub(crate) fn new(map: Map) -> anyhow::Result<Self> {
        let map = HashMap::try_from(map).context("the DNS_BY_COOKIE map has an unexpected type")?;
        let mut diag = Socket::new(NETLINK_SOCK_DIAG).context("cannot open a sock_diag socket")?;
        diag.bind_auto()
            .context("cannot bind the sock_diag socket")?;
        diag.connect(&netlink_sys::SocketAddr::new(0, 0))
            .context("cannot connect the sock_diag socket")?;
        // The kernel answers at once; a bound keeps a lookup from ever holding the responder.
        socket2::SockRef::from(&diag)
            .set_read_timeout(Some(DIAG_WAIT))
            .context("cannot set the sock_diag socket's timeout")?;
        Ok(Self {
            map,
            diag: Mutex::new(diag),
        })
    }

    /// Who sent, from `client`, a datagram that arrived at the responder's socket `local`: the
    /// record of the socket bound there, if its query was captured.
    pub(crate) fn asker(&self, client: SocketAddr, local: SocketAddr) -> io::Result<Option<Asker>> {
        let Some(cookie) = self.cookie(client, local)? else {
            return Ok(None);
        };
        match self.map.get(&cookie, 0) {
            Ok(record) => Ok(Some(Asker {
                resolver: socket_addr(&record.dst),
                process: Process::from_record(&record),
            })),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(err) => Err(io::Error::other(err)),
        }
    }

    /// The cookie of the UDP socket bound at `client` that sent to `local` (connected to it, or
    /// not connected at all).
    fn cookie(&self, client: SocketAddr, local: SocketAddr) -> io::Result<Option<u64>> {
        // The kernel looks the socket up as it would for a datagram from `local` to `client`:
        // the "source" is the peer, the "destination" the socket's own address.
        let family = if client.is_ipv4() { AF_INET } else { AF_INET6 };
        let local = match (client, local) {
            (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            _ => local,
        };
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_UDP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::all(),
                socket_id: SocketId {
                    source_port: local.port(),
                    destination_port: client.port(),
                    source_address: local.ip(),
                    destination_address: client.ip(),
                    interface_id: 0,
                    // INET_DIAG_NOCOOKIE: look up by address only.
                    cookie: [0xff; 8],
                },
            })
            .into(),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        let diag = self
            .diag
            .lock()
            .map_err(|_| io::Error::other("sock_diag socket poisoned"))?;
        diag.send(&bytes, 0)?;
        let mut reply = vec![0u8; 8192];
        let len = diag.recv(&mut &mut reply[..], 0)?;
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(&reply[..len])
            .map_err(|err| io::Error::other(format!("sock_diag reply: {err}")))?;
        match message.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                let cookie = response.header.socket_id.cookie;
                let low = u32::from_ne_bytes([cookie[0], cookie[1], cookie[2], cookie[3]]);
                let high = u32::from_ne_bytes([cookie[4], cookie[5], cookie[6], cookie[7]]);
                Ok(Some(u64::from(high) << 32 | u64::from(low)))
            }
            // No such socket: it closed, or never existed.
            NetlinkPayload::Error(err) if err.code.is_some_and(|c| c.get() == -libc::ENOENT) => {
                Ok(None)
            }
            NetlinkPayload::Error(err) => Err(io::Error::other(format!("sock_diag: {err}"))),
            other => Err(io::Error::other(format!(
                "unexpected sock_diag reply {:?}",
                other.message_type()
            ))),
        }
    }
}
