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

/// Settings userspace can change while the programs run (a SIGHUP reload), unlike the globals
/// fixed at load time. Stored at index 0 of the `SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// 1 when at least one include rule exists: then only what the includes name is
    /// intercepted, in either address family.
    pub has_includes: u32,
}

/// Names of the maps and globals, shared so that a rename cannot break one side silently.
pub mod names {
    /// `LruHashMap<u64 socket cookie, Endpoint original destination>`, written by connect4.
    pub const DST_BY_COOKIE: &str = "DST_BY_COOKIE";
    /// `LruHashMap<Endpoint client address, Endpoint original destination>`, written by sock_ops.
    pub const DST_BY_CLIENT: &str = "DST_BY_CLIENT";
    /// `LpmTrie<[u8; 4], PortRules>`: IPv4 interception rules.
    pub const RULES_V4: &str = "RULES_V4";
    /// `LpmTrie<[u8; 16], PortRules>`: IPv6 interception rules.
    pub const RULES_V6: &str = "RULES_V6";
    /// `HashMap<u32 uid, u8>`: users whose connections are never intercepted.
    pub const EXCLUDED_UIDS: &str = "EXCLUDED_UIDS";
    /// `HashMap<u32 gid, u8>`: primary groups whose connections are never intercepted.
    pub const EXCLUDED_GIDS: &str = "EXCLUDED_GIDS";
    /// `Array<Settings>` of one element.
    pub const SETTINGS: &str = "SETTINGS";
    /// `LruHashMap<Endpoint destination, u64 expiry>`: destinations the proxy reported refused
    /// or unreachable, until `expiry` (CLOCK_MONOTONIC nanoseconds, as `bpf_ktime_get_ns`).
    pub const REFUSED: &str = "REFUSED";
    /// Global `u8`: 1 when the kernel has `bpf_set_retval` (Linux 5.18), so connects to a
    /// refused destination can fail with ECONNREFUSED at once.
    pub const REFUSE_EARLY: &str = "REFUSE_EARLY";
    /// Global `u32`: the listener's IPv4 address, network byte order.
    pub const LISTENER_IP4: &str = "LISTENER_IP4";
    /// Global `u16`: the listener's port, host byte order.
    pub const LISTENER_PORT: &str = "LISTENER_PORT";
    /// Global `[u32; 4]`: the IPv6 listener's address, network-order words.
    pub const LISTENER_IP6: &str = "LISTENER_IP6";
    /// Global `u16`: the IPv6 listener's port, host byte order; 0 when there is none (IPv6
    /// destinations then go direct).
    pub const LISTENER_PORT6: &str = "LISTENER_PORT6";
    /// Global `u32`: the daemon's thread-group id, whose own connects are never redirected.
    pub const DAEMON_TGID: &str = "DAEMON_TGID";
    /// Global `u64`: cookie of the listeners' network namespace (0: not checked). Connects from
    /// other namespaces are not redirected.
    pub const LISTENER_NETNS: &str = "LISTENER_NETNS";
    /// Global `u8`: 1 with the kill switch, when a connect that cannot be redirected fails.
    pub const FAIL_CLOSED: &str = "FAIL_CLOSED";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` structs of integers with explicit padding fields.
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::PortRule {}
    unsafe impl aya::Pod for super::PortRules {}
    unsafe impl aya::Pod for super::Settings {}
}
