//! The interception decision: does this connect go through the proxy?
//!
//! Semantics follow `NO_PROXY` habits: a connection is intercepted when it matches an include
//! (or there are no includes) and matches no exclude. Built-in exclusions (loopback, link-local,
//! multicast, the proxy itself) arrive from userspace as ordinary exclude rules. Some callers are
//! exempt whatever the destination: excluded users and groups, and the daemon itself (see
//! [`is_daemon`]).

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid},
    maps::lpm_trie::Key,
};
use transproxy_common::ip6_bytes;

use crate::maps::{
    DAEMON_TGID, EXCLUDED_CGROUPS, EXCLUDED_GIDS, EXCLUDED_PIDS, EXCLUDED_UIDS, RULES_V4, RULES_V6,
    SETTINGS,
};

/// Whether the process calling `connect()` is the daemon, whose own connections must not loop.
/// Only meaningful once the daemon's listener was found alive: a process id is reused after
/// its process dies, and the daemon's listeners close before its id is freed.
#[inline(always)]
pub(crate) fn is_daemon() -> bool {
    (bpf_get_current_pid_tgid() >> 32) as u32 == DAEMON_TGID.load()
}

/// Whether the process calling `connect()` is an excluded user, has an excluded group as its
/// (real) primary group, or is a local proxy's (by cgroup or by process).
#[inline(always)]
pub(crate) fn excluded_caller() -> bool {
    let uid_gid = bpf_get_current_uid_gid();
    let (uid, gid) = (uid_gid as u32, (uid_gid >> 32) as u32);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the values are only tested for presence; the cgroup helper has no preconditions.
    unsafe {
        EXCLUDED_UIDS.get(&uid).is_some()
            || EXCLUDED_GIDS.get(&gid).is_some()
            || EXCLUDED_CGROUPS.get(&bpf_get_current_cgroup_id()).is_some()
            || EXCLUDED_PIDS.get(&tgid).is_some()
    }
}

/// Whether a connect to `ip_be:port` (address in network byte order) is to be tunnelled.
#[inline(always)]
pub(crate) fn intercepts_v4(ip_be: u32, port: u16) -> bool {
    let key = Key::new(32, ip_be.to_ne_bytes());
    transproxy_common::intercepts(RULES_V4.get(&key), port, has_includes())
}

/// Whether a connect to an IPv6 address (network-order words) and port is to be tunnelled.
#[inline(always)]
pub(crate) fn intercepts_v6(addr: [u32; 4], port: u16) -> bool {
    let key = Key::new(128, ip6_bytes(addr));
    transproxy_common::intercepts(RULES_V6.get(&key), port, has_includes())
}

/// Whether the rules have includes (then only what they name is intercepted).
#[inline(always)]
fn has_includes() -> bool {
    SETTINGS.get(0).is_none_or(|s| s.has_includes != 0)
}
