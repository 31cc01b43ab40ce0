//! Maps shared with the daemon and the settings it fixes at load time.
//!
//! Value types come from `transproxy_common`. A map's or global's name is its static's name
//! here; `transproxy_common::names` spells the same names for the daemon, and a unit test of the
//! daemon checks every one of them against this object, so a rename fails the tests.

use aya_ebpf::{
    Global,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use transproxy_common::{
    ClientKey, Endpoint, FakePool, ListenerKey, MAX_EXCLUDED_IDS, MAX_LISTENERS, MAX_RULE_PREFIXES,
    PortRules, Redirect, Settings, counter,
};

/// Upper bound of established connections waiting for the daemon's `accept()`.
const PENDING_ACCEPTS: u32 = 65_536;

/// Original destination of a redirected socket, stored with the socket itself: written by
/// connect4/6, read by sock_ops and the getpeername hooks, freed by the kernel with the socket.
/// Unlike a map keyed by cookie, it cannot fill up, and a process making endless failing
/// connects cannot evict another process's records.
#[btf_map]
pub(crate) static ORIGINAL_DST: SkStorage<Redirect> = SkStorage::new();

/// The redirect record by the client's local address and network namespace, written by
/// sock_ops, taken by the daemon.
#[map]
pub(crate) static DST_BY_CLIENT: LruHashMap<ClientKey, Redirect> =
    LruHashMap::with_max_entries(PENDING_ACCEPTS, 0);

/// Upper bound of UDP DNS sockets whose resolver is remembered.
const DNS_SOCKETS: u32 = 65_536;

/// The resolver a captured UDP DNS socket last asked, and who asked, by socket cookie: the
/// daemon receives the query from the socket's address, finds its cookie (sock_diag) and here
/// the resolver to forward to. An LRU: a socket is used for a query or two, then closed.
#[map]
pub(crate) static DNS_BY_COOKIE: LruHashMap<u64, Redirect> =
    LruHashMap::with_max_entries(DNS_SOCKETS, 0);

/// The daemon's listening sockets, by network namespace and family (see [`ListenerKey`]). The
/// kernel drops an entry when its socket closes, so a connect is only ever redirected to a
/// listener that is alive and the daemon's.
#[map]
pub(crate) static LISTENERS: SockHash<ListenerKey> = SockHash::with_max_entries(MAX_LISTENERS, 0);

/// Connects in namespaces where the daemon has no listener yet, for it to open one there
/// ([`transproxy_common::Unserved`]). Small: one event per namespace until the daemon answers.
#[map]
pub(crate) static UNSERVED: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Namespaces already reported in `UNSERVED`, so a container's burst of connects sends one
/// event, not thousands. The daemon removes an entry once it has served the namespace or
/// given up for now.
#[map]
pub(crate) static UNSERVED_SEEN: LruHashMap<u64, u8> = LruHashMap::with_max_entries(4_096, 0);

/// IPv4 rules: prefix (network byte order) to every port rule covering it.
#[map]
pub(crate) static RULES_V4: LpmTrie<[u8; 4], PortRules> =
    LpmTrie::with_max_entries(2 * MAX_RULE_PREFIXES, 0);

/// IPv6 rules, likewise.
#[map]
pub(crate) static RULES_V6: LpmTrie<[u8; 16], PortRules> =
    LpmTrie::with_max_entries(2 * MAX_RULE_PREFIXES, 0);

/// Users whose connections always go direct (a local proxy's own user, for instance).
#[map]
pub(crate) static EXCLUDED_UIDS: HashMap<u32, u8> =
    HashMap::with_max_entries(2 * MAX_EXCLUDED_IDS, 0);

/// Primary groups whose connections always go direct.
#[map]
pub(crate) static EXCLUDED_GIDS: HashMap<u32, u8> =
    HashMap::with_max_entries(2 * MAX_EXCLUDED_IDS, 0);

/// cgroups whose processes always go direct (a local proxy's own cgroup).
#[map]
pub(crate) static EXCLUDED_CGROUPS: HashMap<u64, u8> =
    HashMap::with_max_entries(2 * MAX_EXCLUDED_IDS, 0);

/// Processes that always go direct (a local proxy's, while they run).
#[map]
pub(crate) static EXCLUDED_PIDS: HashMap<u32, u8> =
    HashMap::with_max_entries(2 * MAX_EXCLUDED_IDS, 0);

/// Upper bound of destinations remembered as refused.
const REFUSED_DESTINATIONS: u32 = 4_096;

/// Destinations the proxy said were refused or unreachable, with the time (ktime ns) until
/// which connects to them fail at once.
#[map]
pub(crate) static REFUSED: LruHashMap<Endpoint, u64> =
    LruHashMap::with_max_entries(REFUSED_DESTINATIONS, 0);

/// Counters of events only the kernel sees (`transproxy_common::counter`), per CPU.
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::SLOTS, 0);

/// Adds one to counter `slot`.
#[inline(always)]
pub(crate) fn count(slot: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot, which only this program run touches (no preemption).
        unsafe { *value += 1 };
    }
}

/// Settings that a reload may change; index 0.
#[map]
pub(crate) static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// 1 when `bpf_set_retval` is available (Linux 5.18): refused connects then fail with
/// ECONNREFUSED, as a direct connect to a closed port would. With 0 the verifier prunes that
/// path, so older kernels load the programs, and refusals say EPERM.
#[unsafe(no_mangle)]
pub(crate) static HAS_SET_RETVAL: Global<u8> = Global::new(0);

/// The daemon's thread-group id: its own connects are never redirected while its listener is
/// alive (which proves the id is still the daemon's).
#[unsafe(no_mangle)]
pub(crate) static DAEMON_TGID: Global<u32> = Global::new(0);

/// 1 with the kill switch (`--fail-closed`): an intercepted connect that cannot be redirected
/// fails instead of going direct.
#[unsafe(no_mangle)]
pub(crate) static FAIL_CLOSED: Global<u8> = Global::new(0);

/// 1 with `--refuse-udp`: UDP to intercepted destinations fails, except DNS.
#[unsafe(no_mangle)]
pub(crate) static REFUSE_UDP: Global<u8> = Global::new(0);

/// 1 with `--dns forward` or `--dns fake`: DNS (port 53) goes to the daemon's DNS responder.
#[unsafe(no_mangle)]
pub(crate) static CAPTURE_DNS: Global<u8> = Global::new(0);

/// The addresses `--dns fake` answers with: connects to them are always intercepted.
#[unsafe(no_mangle)]
pub(crate) static FAKE_POOL: Global<FakePool> = Global::new(FakePool::NONE);
