//! Types that cross the kernel/userspace boundary through BPF maps.
//!
//! The eBPF programs and the daemon must agree on these layouts byte for byte, so they live in
//! one `no_std` crate that both sides depend on. Everything is `#[repr(C)]` with explicit padding:
//! the kernel hashes keys as raw bytes, so an uninitialised padding byte would make two equal
//! keys differ.
#![no_std]

/// One end of a TCP connection: an address and a port.
///
/// The address is always 16 bytes, IPv4 stored as IPv4-mapped IPv6 (`::ffff:a.b.c.d`), so one
/// key type serves both families and a dual-stack socket talking to an IPv4 peer is found under
/// the same key as a plain IPv4 socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Address as four 32-bit words, each in network byte order (as the kernel's `user_ip6`,
    /// `local_ip6` and friends present them).
    pub addr: [u32; 4],
    /// Port in host byte order.
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
}

impl Endpoint {
    /// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0`), in network byte order.
    pub const V4_MAPPED_PREFIX: u32 = 0x0000_ffffu32.to_be();

    /// An IPv4 endpoint from an address in network byte order and a port in host byte order.
    #[inline(always)]
    pub const fn v4(ip_be: u32, port: u16) -> Self {
        Self {
            addr: [0, 0, Self::V4_MAPPED_PREFIX, ip_be],
            port,
            _pad: 0,
        }
    }

    /// An IPv6 endpoint from four network-byte-order words and a port in host byte order.
    #[inline(always)]
    pub const fn v6(addr: [u32; 4], port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: 0,
        }
    }
}

/// What connect4/6 keep with a socket they redirected: where it was going, and the listener it
/// was sent to. sock_ops and the getpeername hooks act only while the socket's peer is that
/// listener: a socket whose redirected connect failed and which then connected elsewhere is
/// left alone.
///
/// With them, the process that connected, as the kernel saw it at `connect()`: something no
/// iptables-based interceptor can know, for status, the access log and error lines.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub dst: Endpoint,
    pub listener: Endpoint,
    /// Thread-group id (the pid, in the host's PID namespace).
    pub pid: u32,
    /// Real uid.
    pub uid: u32,
    /// The process's cgroup v2 id (its directory's inode number).
    pub cgroup: u64,
    /// Command name (`comm`), NUL-padded.
    pub comm: [u8; 16],
}

/// Key of the `DST_BY_CLIENT` map: a client's local address in one network namespace, and the
/// listener it reached.
///
/// Two containers, each in its own namespace, both make clients such as `127.0.0.1:40001`: the
/// address alone does not name a connection on a node, the namespace with it does. The daemon
/// knows the namespace of each listener it accepts on (`SO_NETNS_COOKIE`), sock_ops that of
/// the client (`bpf_get_netns_cookie`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The network namespace's cookie.
    pub netns: u64,
    pub client: Endpoint,
    /// The port of the listener the client reached (host byte order): a record is taken only
    /// by the listener it was made for, so a connection to another of the daemon's listeners
    /// (its DNS listener) from a reused local port cannot take a tunnel's record.
    pub listener_port: u16,
    /// Always zero.
    pub _pad: u16,
}

// No byte of a key may be implicit padding (see the crate's description).
const _: () = assert!(core::mem::size_of::<ClientKey>() == 32);

/// What connect4/6 tell the daemon when a process of its cgroup tree connects in a network
/// namespace where the daemon has no listener yet (a container started after it): the
/// namespace's cookie and the process, whose namespace the daemon then opens a listener in.
/// Sent once per namespace until the daemon clears it from `UNSERVED_SEEN`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unserved {
    pub netns: u64,
    /// Thread-group id, in the host's PID namespace.
    pub pid: u32,
    /// Always zero.
    pub _pad: u32,
}

/// An IPv6 address given as four network-order words (the kernel's layout) as 16 bytes.
#[inline(always)]
pub const fn ip6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        bytes[i] = words[i / 4].to_ne_bytes()[i % 4];
        i += 1;
    }
    bytes
}

/// What a port rule does to a matching connection.
pub mod verdict {
    /// The connection is tunnelled (unless an exclude also matches).
    pub const INCLUDE: u32 = 1;
    /// The connection goes direct, whatever the includes say.
    pub const EXCLUDE: u32 = 2;
}

/// A port range with a verdict. `first..=last`, host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    pub first: u16,
    pub last: u16,
    /// One of the [`verdict`] constants.
    pub verdict: u32,
}

/// How many distinct networks the rules of one address family may name. Each rules trie holds
/// twice as many, so that a reload can add the new rules before it removes the old ones.
pub const MAX_RULE_PREFIXES: u32 = 4_096;

/// How many users, and how many groups, may be excluded; each id set holds twice as many, as
/// the tries do.
pub const MAX_EXCLUDED_IDS: u32 = 256;

/// How many port rules one prefix of the rules trie can carry.
///
/// The eBPF matcher walks all of them in a bounded loop, so this is also the loop bound.
pub const MAX_PORT_RULES: usize = 16;

/// Value of the rules LPM trie: every rule whose CIDR contains the trie entry's prefix.
///
/// An LPM trie returns only the longest matching prefix, but the rules of shorter prefixes must
/// still apply (an include of 10.0.0.0/8 next to an exclude of 10.1.0.0/16:443 must intercept
/// 10.1.2.3:80). Userspace therefore copies each rule into every longer prefix it contains, so
/// one lookup yields every rule that applies to the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRules {
    /// How many entries of `rules` are in use.
    pub len: u32,
    pub rules: [PortRule; MAX_PORT_RULES],
}

/// The kernel's decision for a connect to `port`, given the port rules of the longest prefix
/// matching its address (`None`: no rule names the address) and whether any include exists.
///
/// Written once: the eBPF programs call it after their trie lookup, and the daemon's tests
/// check with it that the trie built from the rules agrees with the rules' plain meaning.
#[inline(always)]
pub fn intercepts(rules: Option<&PortRules>, port: u16, has_includes: bool) -> bool {
    // Without includes, everything not excluded is intercepted.
    let mut included = !has_includes;
    let Some(rules) = rules else {
        return included;
    };
    let len = rules.len as usize;
    // Bounded by a constant so the verifier sees a finite loop.
    for i in 0..MAX_PORT_RULES {
        if i >= len {
            break;
        }
        let rule = &rules.rules[i];
        if port < rule.first || port > rule.last {
            continue;
        }
        if rule.verdict == verdict::EXCLUDE {
            return false;
        }
        if rule.verdict == verdict::INCLUDE {
            included = true;
        }
    }
    included
}

/// Address family of a listener, in [`ListenerKey`].
pub mod family {
    pub const V4: u32 = 4;
    pub const V6: u32 = 6;
}

/// What a listener of the daemon serves, in [`ListenerKey`].
pub mod service {
    /// Redirected TCP connections, to be tunnelled.
    pub const TUNNEL: u32 = 0;
    /// Captured DNS over UDP (`--dns`).
    pub const DNS_UDP: u32 = 1;
    /// Captured DNS over TCP (`--dns`).
    pub const DNS_TCP: u32 = 2;
    /// Gateway mode: the transparent listener other hosts' connections are assigned to (by tc,
    /// under network namespace 0: the programs run in the daemon's own).
    pub const GATEWAY: u32 = 3;
}

/// The packet mark gateway mode sets on packets it assigns to the daemon's sockets; the
/// daemon's policy rule (`fwmark GATEWAY_MARK/GATEWAY_MARK`) routes them to the local table.
/// One bit that common tools leave alone (kube-proxy uses 0x4000 and 0x8000, Cilium 0x0f00,
/// Calico the top 16 bits by default, Docker and libvirt none).
pub const GATEWAY_MARK: u32 = 0x0001_0000;

/// The routing table gateway mode's local route lives in (`local default dev lo`).
pub const GATEWAY_TABLE: u32 = 84;

/// The DNS port: connects and datagrams to it are captured with `--dns`.
pub const DNS_PORT: u16 = 53;

/// Key of the `LISTENERS` sockhash: the daemon's listener for connects made in one network
/// namespace, for one address family.
///
/// The kernel removes a socket from a sockhash when it is closed, so an entry is proof that the
/// daemon's listener is alive, and the address the programs redirect to is read from that
/// socket itself. Nobody else can be handed a connection: not a user who binds the port after
/// the daemon died, nor one in another namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// The network namespace's cookie (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie`).
    pub netns: u64,
    /// One of the [`family`] constants.
    pub family: u32,
    /// One of the [`service`] constants.
    pub service: u32,
}

/// How many listeners the `LISTENERS` sockhash holds: one per address family, service and
/// network namespace served.
pub const MAX_LISTENERS: u32 = 4_096;

/// Slots of the `COUNTERS` per-CPU array: events only the kernel sees, for the metrics.
pub mod counter {
    /// Connects refused at once because the proxy recently reported their destination refused.
    pub const REFUSED_AT_CONNECT: u32 = 0;
    /// Records sock_ops filed for the daemon to take.
    pub const RECORDS_FILED: u32 = 1;
    /// DNS connects and datagrams sent to the daemon's DNS responder (`--dns`).
    pub const DNS_CAPTURED: u32 = 2;
    /// How many slots.
    pub const SLOTS: u32 = 3;
}

/// Settings userspace can change while the programs run (a SIGHUP reload), unlike the globals
/// fixed at load time. Stored at index 0 of the `SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// 1 when at least one include rule exists: then only what the includes name is
    /// intercepted, in either address family.
    pub has_includes: u32,
}

/// The networks `--dns fake` answers from: a connect to an address in them is always
/// intercepted, whatever the rules, since only the daemon knows the name behind it. Addresses
/// and masks as four network-order words (IPv4 in the last word only); an empty pool has a
/// zero mask with a non-zero network, which nothing matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FakePool {
    pub v4_net: u32,
    pub v4_mask: u32,
    pub v6_net: [u32; 4],
    pub v6_mask: [u32; 4],
}

impl FakePool {
    /// No pool: no address is in it.
    pub const NONE: Self = Self {
        v4_net: 1,
        v4_mask: 0,
        v6_net: [1, 0, 0, 0],
        v6_mask: [0; 4],
    };

    /// Whether the IPv4 address `ip_be` (network byte order) is in the pool.
    #[inline(always)]
    pub fn contains_v4(&self, ip_be: u32) -> bool {
        ip_be & self.v4_mask == self.v4_net
    }

    /// Whether the IPv6 address (network-order words) is in the pool.
    #[inline(always)]
    pub fn contains_v6(&self, ip: [u32; 4]) -> bool {
        ip[0] & self.v6_mask[0] == self.v6_net[0]
            && ip[1] & self.v6_mask[1] == self.v6_net[1]
            && ip[2] & self.v6_mask[2] == self.v6_net[2]
            && ip[3] & self.v6_mask[3] == self.v6_net[3]
    }
}

/// Names of the maps and globals as the eBPF object has them (its statics' names) and the
/// daemon looks them up; a unit test of the daemon checks the object against [`names::MAPS`]
/// and [`names::GLOBALS`], so a rename cannot break one side silently.
pub mod names {
    /// `SkStorage<Redirect>`: the original destination of a redirected socket, written by
    /// connect4/6 and read by sock_ops and the getpeername hooks. It lives and dies with the
    /// socket: nothing to clean up, and no process can evict another's record.
    pub const ORIGINAL_DST: &str = "ORIGINAL_DST";
    /// `LruHashMap<ClientKey, Redirect>`: the record by client address and namespace, written
    /// by sock_ops, taken by the daemon.
    pub const DST_BY_CLIENT: &str = "DST_BY_CLIENT";
    /// `SockHash<ListenerKey>`: the daemon's listening sockets, see [`super::ListenerKey`].
    pub const LISTENERS: &str = "LISTENERS";
    /// `LpmTrie<[u8; 4], PortRules>`: IPv4 interception rules.
    pub const RULES_V4: &str = "RULES_V4";
    /// `LpmTrie<[u8; 16], PortRules>`: IPv6 interception rules.
    pub const RULES_V6: &str = "RULES_V6";
    /// `HashMap<u32 uid, u8>`: users whose connections are never intercepted.
    pub const EXCLUDED_UIDS: &str = "EXCLUDED_UIDS";
    /// `HashMap<u32 gid, u8>`: primary groups whose connections are never intercepted.
    pub const EXCLUDED_GIDS: &str = "EXCLUDED_GIDS";
    /// `HashMap<u64 cgroup id, u8>`: cgroups whose processes' connections are never
    /// intercepted (a local proxy's own cgroup).
    pub const EXCLUDED_CGROUPS: &str = "EXCLUDED_CGROUPS";
    /// `HashMap<u32 tgid, u8>`: processes whose connections are never intercepted (a local
    /// proxy's, watched by the daemon and removed when they exit).
    pub const EXCLUDED_PIDS: &str = "EXCLUDED_PIDS";
    /// `Array<Settings>` of one element.
    pub const SETTINGS: &str = "SETTINGS";
    /// `LruHashMap<Endpoint destination, u64 expiry>`: destinations the proxy reported refused
    /// or unreachable, until `expiry` (CLOCK_MONOTONIC nanoseconds, as `bpf_ktime_get_ns`).
    pub const REFUSED: &str = "REFUSED";
    /// `PerCpuArray<u64>` of [`super::counter::SLOTS`] counters, see [`super::counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// `LruHashMap<u64 socket cookie, Redirect>`: the resolver a captured UDP DNS socket
    /// last asked, and who asked, written by connect4/6 and sendmsg4/6, read by the daemon
    /// (which finds the cookie of a query's socket through sock_diag).
    pub const DNS_BY_COOKIE: &str = "DNS_BY_COOKIE";
    /// `RingBuf` of [`super::Unserved`]: connects in namespaces the daemon has no listener in.
    pub const UNSERVED: &str = "UNSERVED";
    /// `LruHashMap<u64 netns cookie, u8>`: namespaces already reported in `UNSERVED`; the
    /// daemon removes one to hear of it again.
    pub const UNSERVED_SEEN: &str = "UNSERVED_SEEN";
    /// Global `u8`: 1 when the kernel has `bpf_set_retval` (Linux 5.18), so a refused connect
    /// fails with ECONNREFUSED (EPERM without).
    pub const HAS_SET_RETVAL: &str = "HAS_SET_RETVAL";
    /// Global `u32`: the daemon's thread-group id. Its own connects are never redirected, but
    /// only while its listener is alive: a process that later gets the same pid is not exempt.
    pub const DAEMON_TGID: &str = "DAEMON_TGID";
    /// Global `u8`: 1 with the kill switch, when a connect that cannot be redirected fails.
    pub const FAIL_CLOSED: &str = "FAIL_CLOSED";
    /// Global `u8`: 1 when UDP to intercepted destinations is refused (DNS excepted), so that
    /// QUIC falls back to TCP and nothing leaves around the proxy over UDP.
    pub const REFUSE_UDP: &str = "REFUSE_UDP";
    /// Global `u8`: 1 with `--dns forward` or `fake`, when DNS (port 53) goes to the
    /// daemon's DNS responder.
    pub const CAPTURE_DNS: &str = "CAPTURE_DNS";
    /// Global [`super::FakePool`]: the addresses `--dns fake` answers with, always intercepted.
    pub const FAKE_POOL: &str = "FAKE_POOL";

    /// Every map above, for the daemon's test that the eBPF object has them all.
    pub const MAPS: [&str; 15] = [
        UNSERVED,
        UNSERVED_SEEN,
        COUNTERS,
        DNS_BY_COOKIE,
        EXCLUDED_CGROUPS,
        EXCLUDED_PIDS,
        ORIGINAL_DST,
        DST_BY_CLIENT,
        LISTENERS,
        RULES_V4,
        RULES_V6,
        EXCLUDED_UIDS,
        EXCLUDED_GIDS,
        SETTINGS,
        REFUSED,
    ];

    /// Every global above, likewise.
    pub const GLOBALS: [&str; 6] = [
        HAS_SET_RETVAL,
        DAEMON_TGID,
        FAIL_CLOSED,
        REFUSE_UDP,
        CAPTURE_DNS,
        FAKE_POOL,
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: for each: a plain `#[repr(C)]` struct of integers (or arrays of such structs),
    // with any padding spelled out as a field, so every byte pattern is a valid value and no
    // byte is uninitialised.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortRules {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Settings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenerKey {}
    // SAFETY: as above (u64, a 20-byte Endpoint, u32 padding: 32 bytes, none implicit).
    unsafe impl aya::Pod for super::ClientKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Unserved {}
    // SAFETY: as above (two Endpoints, two u32, a u64 at offset 48 and 16 bytes: no padding).
    unsafe impl aya::Pod for super::Redirect {}
    // SAFETY: as above (u32 words only).
    unsafe impl aya::Pod for super::FakePool {}
}
