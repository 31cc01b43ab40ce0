//! What connect4 and connect6 share: recording the original destination of a socket.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    programs::SockAddrContext,
};
use transproxy_common::Endpoint;

use crate::{
    maps::{
        DST_BY_COOKIE, FAIL_CLOSED, LISTENER_IP4, LISTENER_IP6, LISTENER_NETNS, LISTENER_PORT,
        LISTENER_PORT6, REFUSE_EARLY, REFUSED,
    },
    rules,
};

/// `SOCK_STREAM` from `<sys/socket.h>`: only TCP is tunnelled.
pub const SOCK_STREAM: u32 = 1;

/// Verdict that lets the `connect()` proceed with whatever address the context now holds. A
/// connect the programs cannot record simply goes direct.
pub const ALLOW: i32 = 1;

/// Verdict that fails the `connect()`, with the error set by `bpf_set_retval` (EPERM without).
pub const REJECT: i32 = 0;

/// `ECONNREFUSED` from `<errno.h>`.
const ECONNREFUSED: i32 = 111;

/// Fails the connect with ECONNREFUSED if the proxy recently reported `dst` refused or
/// unreachable, as a direct connect would have failed. Returns the verdict to use, if any.
#[inline(always)]
fn refuse_if_known(dst: &Endpoint) -> Option<i32> {
    if REFUSE_EARLY.load() == 0 {
        return None;
    }
    // SAFETY: the value is copied out at once.
    let expiry = unsafe { REFUSED.get(dst) }.copied()?;
    // SAFETY: the helper has no preconditions.
    if unsafe { bpf_ktime_get_ns() } >= expiry {
        let _ = REFUSED.remove(dst);
        return None;
    }
    // SAFETY: the helper only sets this program run's return value for the syscall.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    Some(REJECT)
}

/// Records `dst` as the original destination of the connecting socket. Returns the cookie, or
/// `None` if the record could not be stored (then the connect must be left alone, or the daemon
/// would find nothing).
#[inline(always)]
fn record(ctx: &SockAddrContext, dst: &Endpoint) -> Option<u64> {
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    DST_BY_COOKIE.insert(&cookie, dst, 0).ok().map(|()| cookie)
}

/// The decision for an IPv4 destination (connect4, and connect6 for IPv4-mapped addresses).
/// `Ok(cookie)`: recorded, rewrite it to the IPv4 listener. `Err(verdict)`: return `verdict`
/// and leave the address alone.
#[inline(always)]
pub fn decide_v4(ctx: &SockAddrContext, ip: u32, port: u16) -> Result<u64, i32> {
    // Never redirect what already goes to the listener: that is either a second interceptor
    // (nested cgroups) having done the job, or someone probing the listener directly.
    if (ip, port) == (LISTENER_IP4.load(), LISTENER_PORT.load()) {
        return Err(ALLOW);
    }
    // Rules first: most connects match none, and the caller checks cost more lookups.
    if !rules::intercepts_v4(ip, port) || rules::caller_exempt() {
        return Err(ALLOW);
    }
    decide(ctx, &Endpoint::v4(ip, port))
}

/// The decision for a native IPv6 destination; as [`decide_v4`], for the IPv6 listener.
#[inline(always)]
pub fn decide_v6(ctx: &SockAddrContext, ip: [u32; 4], port: u16) -> Result<u64, i32> {
    let listener_port = LISTENER_PORT6.load();
    // No IPv6 listener: IPv6 destinations go direct.
    if listener_port == 0 || (ip == LISTENER_IP6.load() && port == listener_port) {
        return Err(ALLOW);
    }
    if !rules::intercepts_v6(ip, port) || rules::caller_exempt() {
        return Err(ALLOW);
    }
    decide(ctx, &Endpoint::v6(ip, port))
}

/// The verdict for a connect from a network namespace other than the listener's, which cannot
/// reach the listener: direct, or with the kill switch, failed. `None` in the listener's.
#[inline(always)]
fn outside_listener_netns(ctx: &SockAddrContext) -> Option<i32> {
    let own = LISTENER_NETNS.load();
    // SAFETY: the helper only reads the namespace of the socket behind the context.
    if own == 0 || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == own {
        return None;
    }
    Some(if FAIL_CLOSED.load() == 0 {
        ALLOW
    } else {
        REJECT
    })
}

/// For an intercepted destination: leave it alone if the listener is out of reach, refuse it if
/// it is known to refuse, else record it.
#[inline(always)]
fn decide(ctx: &SockAddrContext, dst: &Endpoint) -> Result<u64, i32> {
    if let Some(verdict) = outside_listener_netns(ctx).or_else(|| refuse_if_known(dst)) {
        return Err(verdict);
    }
    record(ctx, dst).ok_or(ALLOW)
}
