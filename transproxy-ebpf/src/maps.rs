//! Maps shared with the daemon and the settings it fixes at load time.
//!
//! Names and value types come from `transproxy_common`, the one place both sides read them from.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap},
};
use transproxy_common::{Endpoint, MAX_EXCLUDED_IDS, MAX_RULE_PREFIXES, PortRules, Settings};

/// Upper bound of redirected sockets alive at once (the record lives until the socket closes,
/// for getpeername). LRU, so a burst of connects that never complete evicts old records instead
/// of blocking new ones.
const REDIRECTED_SOCKETS: u32 = 65_536;

/// Upper bound of established connections waiting for the daemon's `accept()`.
const PENDING_ACCEPTS: u32 = 65_536;

/// Original destination by socket cookie: written by connect4/6, read by sock_ops and the
/// getpeername hooks, deleted by sock_ops when the socket closes.
#[map]
pub static DST_BY_COOKIE: LruHashMap<u64, Endpoint> =
    LruHashMap::with_max_entries(REDIRECTED_SOCKETS, 0);

/// Original destination by the client's local address, written by sock_ops, taken by the daemon.
#[map]
pub static DST_BY_CLIENT: LruHashMap<Endpoint, Endpoint> =
    LruHashMap::with_max_entries(PENDING_ACCEPTS, 0);

/// IPv4 rules: prefix (network byte order) to every port rule covering it.
#[map]
pub static RULES_V4: LpmTrie<[u8; 4], PortRules> =
    LpmTrie::with_max_entries(2 * MAX_RULE_PREFIXES, 0);

/// IPv6 rules, likewise.
#[map]
pub static RULES_V6: LpmTrie<[u8; 16], PortRules> =
    LpmTrie::with_max_entries(2 * MAX_RULE_PREFIXES, 0);

/// Users whose connections always go direct (a local proxy's own user, for instance).
#[map]
pub static EXCLUDED_UIDS: HashMap<u32, u8> = HashMap::with_max_entries(2 * MAX_EXCLUDED_IDS, 0);

/// Primary groups whose connections always go direct.
#[map]
pub static EXCLUDED_GIDS: HashMap<u32, u8> = HashMap::with_max_entries(2 * MAX_EXCLUDED_IDS, 0);

/// Upper bound of destinations remembered as refused.
const REFUSED_DESTINATIONS: u32 = 4_096;

/// Destinations the proxy said were refused or unreachable, with the time (ktime ns) until
/// which connects to them fail at once.
#[map]
pub static REFUSED: LruHashMap<Endpoint, u64> =
    LruHashMap::with_max_entries(REFUSED_DESTINATIONS, 0);

/// Settings that a reload may change; index 0.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// The daemon's IPv4 listener address, network byte order.
#[unsafe(no_mangle)]
pub static LISTENER_IP4: Global<u32> = Global::new(0);

/// The daemon's IPv4 listener port, host byte order.
#[unsafe(no_mangle)]
pub static LISTENER_PORT: Global<u16> = Global::new(0);

/// The daemon's IPv6 listener address, network-order words.
#[unsafe(no_mangle)]
pub static LISTENER_IP6: Global<[u32; 4]> = Global::new([0; 4]);

/// The daemon's IPv6 listener port; 0 when it has none.
#[unsafe(no_mangle)]
pub static LISTENER_PORT6: Global<u16> = Global::new(0);

/// 1 when `bpf_set_retval` is available: then refused destinations fail with ECONNREFUSED in
/// `connect()` itself. With 0 the verifier prunes that path, so older kernels load the programs.
#[unsafe(no_mangle)]
pub static REFUSE_EARLY: Global<u8> = Global::new(0);

/// The daemon's thread-group id: its own connects (to the upstream proxy) are never redirected.
#[unsafe(no_mangle)]
pub static DAEMON_TGID: Global<u32> = Global::new(0);

/// Cookie of the network namespace the listeners are in; 0 when unknown (then not checked).
/// A connect from another namespace (a container's) cannot be redirected: the listener's
/// address there is that namespace's own loopback, where no daemon listens.
#[unsafe(no_mangle)]
pub static LISTENER_NETNS: Global<u64> = Global::new(0);

/// 1 with the kill switch (`--fail-closed`): an intercepted connect that cannot be redirected
/// fails (EPERM) instead of going direct.
#[unsafe(no_mangle)]
pub static FAIL_CLOSED: Global<u8> = Global::new(0);
