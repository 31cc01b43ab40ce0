//! Where an accepted connection was originally going, and which process made it.
//!
//! This replaces `SO_ORIGINAL_DST` and conntrack: the sock_ops program filed the destination
//! under the client's local address, which is the accepted socket's peer address. Each record is
//! taken (looked up and deleted) in one `bpf()` call, so it can serve exactly one connection and
//! nothing piles up.

use std::{
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, BorrowedFd},
};

use anyhow::Context as _;
use aya::maps::{HashMap, IterableMap as _, Map, MapData};
use transproxy_common::{ClientKey, Endpoint, Redirect};

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` from `<linux/bpf.h>`; hash maps support it since Linux 5.14.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The map of redirected connections waiting to be accepted.
pub(crate) struct OriginalDsts {
    map: HashMap<MapData, ClientKey, Redirect>,
    /// The daemon's own network namespace's cookie.
    own_netns: u64,
}

/// What the kernel recorded about an accepted connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Redirected {
    /// Where the client was going.
    pub(crate) dst: SocketAddr,
    /// Who connected.
    pub(crate) process: Process,
}

/// The process that made a redirected connection, as the kernel saw it at `connect()`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Process {
    /// In the host's PID namespace.
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    /// cgroup v2 id: the inode number of its directory.
    pub(crate) cgroup: u64,
    /// `comm`, NUL-padded.
    comm: [u8; 16],
}

impl Process {
    /// The process of a kernel record.
    pub(crate) fn from_record(record: &Redirect) -> Self {
        Self {
            pid: record.pid,
            uid: record.uid,
            cgroup: record.cgroup,
            comm: record.comm,
        }
    }

    /// A connection forwarded from another host (gateway mode): no process of this host made
    /// it. Shown as `forwarded`; the access log and status give its client's address.
    pub(crate) fn forwarded() -> Self {
        let mut comm = [0u8; 16];
        comm[..9].copy_from_slice(b"forwarded");
        Self {
            pid: 0,
            uid: 0,
            cgroup: 0,
            comm,
        }
    }

    /// The command name.
    pub(crate) fn command(&self) -> std::borrow::Cow<'_, str> {
        let len = self
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.comm.len());
        String::from_utf8_lossy(&self.comm[..len])
    }
}

/// `curl (pid 812, uid 1000)`; `a forwarded connection` in gateway mode.
impl std::fmt::Display for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pid == 0 {
            return f.write_str("a forwarded connection");
        }
        write!(
            f,
            "{} (pid {}, uid {})",
            self.command().escape_debug(),
            self.pid,
            self.uid
        )
    }
}

impl OriginalDsts {
    pub(crate) fn new(map: Map, own_netns: u64) -> anyhow::Result<Self> {
        let map = HashMap::try_from(map).context("the DST_BY_CLIENT map has an unexpected type")?;
        Ok(Self { map, own_netns })
    }

    /// [`OriginalDsts::take`] for a client of a listener (on `listener_port`) in the daemon's
    /// own namespace.
    pub(crate) fn take_here(
        &self,
        listener_port: u16,
        client: SocketAddr,
    ) -> io::Result<Option<Redirected>> {
        self.take(self.own_netns, listener_port, client)
    }

    /// Takes the record of the connection whose client is `client` in network namespace
    /// `netns`, accepted by the listener on `listener_port`, if that connection was redirected
    /// by us to that listener.
    pub(crate) fn take(
        &self,
        netns: u64,
        listener_port: u16,
        client: SocketAddr,
    ) -> io::Result<Option<Redirected>> {
        let key = ClientKey {
            netns,
            client: endpoint(client),
            listener_port,
            _pad: 0,
        };
        let mut value = Redirect {
            dst: Endpoint::v4(0, 0),
            listener: Endpoint::v4(0, 0),
            pid: 0,
            uid: 0,
            cgroup: 0,
            comm: [0; 16],
        };
        let fd: BorrowedFd<'_> = std::os::fd::AsFd::as_fd(self.map.map().fd());
        // Layout of the `bpf_attr` member used by the map element commands.
        #[repr(C)]
        struct MapElemAttr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let attr = MapElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: &raw const key as u64,
            value: &raw mut value as u64,
            flags: 0,
        };
        // SAFETY: `attr` points at a key and a value of the map's exact sizes (checked by
        // `HashMap::try_from`), both live for the duration of the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_AND_DELETE_ELEM,
                &raw const attr,
                std::mem::size_of::<MapElemAttr>(),
            )
        };
        if ret == 0 {
            return Ok(Some(Redirected {
                dst: socket_addr(&value.dst),
                process: Process::from_record(&value),
            }));
        }
        match io::Error::last_os_error() {
            err if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            err => Err(err),
        }
    }
}

/// The kernel-side key for a socket address: IPv4 as IPv4-mapped IPv6.
pub(crate) fn endpoint(addr: SocketAddr) -> Endpoint {
    let v6 = match addr.ip() {
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        IpAddr::V6(ip) => ip,
    };
    let octets = v6.octets();
    let word =
        |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    Endpoint::v6([word(0), word(4), word(8), word(12)], addr.port())
}

/// The socket address of a kernel-side endpoint; IPv4-mapped addresses become IPv4.
pub(crate) fn socket_addr(endpoint: &Endpoint) -> SocketAddr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(endpoint.addr) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let ip = Ipv6Addr::from(octets);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    SocketAddr::new(ip, endpoint.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_matches_the_kernel_encoding() {
        let addr: SocketAddr = "127.0.0.2:8080".parse().unwrap();
        // What connect4 builds from `user_ip4` (network byte order) and the host-order port.
        let kernel = Endpoint::v4(u32::from_ne_bytes([127, 0, 0, 2]), 8080);
        assert_eq!(endpoint(addr), kernel);
        assert_eq!(socket_addr(&kernel), addr);
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(socket_addr(&endpoint(v6)), v6);
    }
}
