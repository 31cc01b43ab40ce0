//! Maps shared with the daemon and the settings it fixes at load time.
//!
//! Names and value types come from `transproxy_common`, the one place both sides read them from.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{LpmTrie, LruHashMap},
};
use transproxy_common::{Endpoint, PortRules};

/// Upper bound of connections that are redirected but not yet established. LRU, so a burst of
/// connects that never complete evicts old records instead of blocking new ones.
const PENDING_CONNECTS: u32 = 65_536;

/// Upper bound of established connections waiting for the daemon's `accept()`.
const PENDING_ACCEPTS: u32 = 65_536;

/// Upper bound of distinct IPv4 prefixes in the rules.
const RULE_PREFIXES: u32 = 4_096;

/// Original destination by socket cookie, written by connect4, read by sock_ops.
#[map]
pub static DST_BY_COOKIE: LruHashMap<u64, Endpoint> =
    LruHashMap::with_max_entries(PENDING_CONNECTS, 0);

/// Original destination by the client's local address, written by sock_ops, taken by the daemon.
#[map]
pub static DST_BY_CLIENT: LruHashMap<Endpoint, Endpoint> =
    LruHashMap::with_max_entries(PENDING_ACCEPTS, 0);

/// IPv4 rules: prefix (network byte order) to every port rule covering it.
#[map]
pub static RULES_V4: LpmTrie<[u8; 4], PortRules> = LpmTrie::with_max_entries(RULE_PREFIXES, 0);

/// The daemon's listener address, network byte order.
#[unsafe(no_mangle)]
pub static LISTENER_IP4: Global<u32> = Global::new(0);

/// The daemon's listener port, host byte order.
#[unsafe(no_mangle)]
pub static LISTENER_PORT: Global<u16> = Global::new(0);

/// The daemon's thread-group id: its own connects (to the upstream proxy) are never redirected.
#[unsafe(no_mangle)]
pub static DAEMON_TGID: Global<u32> = Global::new(0);

/// 1 when include rules exist: then only what they name is intercepted.
#[unsafe(no_mangle)]
pub static HAS_INCLUDES: Global<u8> = Global::new(0);
