//! What connect4 and connect6 share: the decision for a TCP connect, and refusing one.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_ktime_get_ns, bpf_set_retval},
    programs::SockAddrContext,
};
use transproxy_common::{Endpoint, Redirect, counter, service};

use crate::{
    listener,
    maps::{self, FAIL_CLOSED, FAKE_POOL, HAS_SET_RETVAL, REFUSED},
    record, rules, unserved,
};

/// `SOCK_STREAM` from `<sys/socket.h>`: only TCP is tunnelled.
pub(crate) const SOCK_STREAM: u32 = 1;

/// `SOCK_DGRAM` from `<sys/socket.h>`.
pub(crate) const SOCK_DGRAM: u32 = 2;

/// Verdict that lets the `connect()` proceed with whatever address the context now holds.
pub(crate) const ALLOW: i32 = 1;

/// Verdict that fails the `connect()`, with the error set by `bpf_set_retval` (EPERM without).
pub(crate) const REJECT: i32 = 0;

/// `ECONNREFUSED` from `<errno.h>`.
const ECONNREFUSED: i32 = 111;

/// Fails the connect with ECONNREFUSED (EPERM on kernels before 5.18).
#[inline(always)]
pub(crate) fn refuse() -> i32 {
    if HAS_SET_RETVAL.load() != 0 {
        // SAFETY: the helper only sets this program run's return value for the syscall.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    REJECT
}

/// An intercepted connect that cannot be redirected (no listener of the daemon's, or no room
/// for its record): with the kill switch it fails, else it goes where it was addressed.
#[inline(always)]
pub(crate) fn cannot_redirect() -> i32 {
    if FAIL_CLOSED.load() == 0 {
        ALLOW
    } else {
        refuse()
    }
}

/// Whether the proxy recently reported `dst` refused or unreachable: then the connect fails at
/// once, as a direct connect would have.
#[inline(always)]
fn known_refused(dst: &Endpoint) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(expiry) = (unsafe { REFUSED.get(dst) }).copied() else {
        return false;
    };
    // SAFETY: the helper has no preconditions.
    if unsafe { bpf_ktime_get_ns() } >= expiry {
        let _ = REFUSED.remove(dst);
        return false;
    }
    true
}

/// The decision for an IPv4 destination (connect4, and connect6 for IPv4-mapped addresses).
/// `Ok(listener)`: recorded, rewrite the address to the IPv4 listener's. `Err(verdict)`: return
/// `verdict` and leave the address alone.
#[inline(always)]
pub(crate) fn decide_v4(ctx: &SockAddrContext, ip: u32, port: u16) -> Result<(u32, u16), i32> {
    // Rules first: most connects match none, and each check below costs a lookup. An address
    // `--dns fake` gave out has a name only the daemon knows: always intercepted.
    let intercepted = rules::intercepts_v4(ip, port) || FAKE_POOL.load().contains_v4(ip);
    if !intercepted || rules::excluded_caller() {
        return Err(ALLOW);
    }
    let Some(listener) = listener::v4(ctx.as_ptr(), service::TUNNEL) else {
        unserved::report(ctx);
        return Err(cannot_redirect());
    };
    // Already going to the listener (a second interceptor on a nested cgroup did the job), or
    // the daemon's own connection, proven its by the listener being alive.
    if listener == (ip, port) || rules::is_daemon() {
        return Err(ALLOW);
    }
    let redirect = record::new(Endpoint::v4(ip, port), Endpoint::v4(listener.0, listener.1));
    decide(ctx, &redirect).map(|()| listener)
}

/// The decision for a native IPv6 destination; as [`decide_v4`], for the IPv6 listener.
#[inline(always)]
pub(crate) fn decide_v6(
    ctx: &SockAddrContext,
    ip: [u32; 4],
    port: u16,
) -> Result<([u32; 4], u16), i32> {
    let intercepted = rules::intercepts_v6(ip, port) || FAKE_POOL.load().contains_v6(ip);
    if !intercepted || rules::excluded_caller() {
        return Err(ALLOW);
    }
    // No IPv6 listener (`--listen6 off`, or the daemon gone): direct, or refused by the kill
    // switch.
    let Some(listener) = listener::v6(ctx.as_ptr(), service::TUNNEL) else {
        unserved::report(ctx);
        return Err(cannot_redirect());
    };
    if listener == (ip, port) || rules::is_daemon() {
        return Err(ALLOW);
    }
    let redirect = record::new(Endpoint::v6(ip, port), Endpoint::v6(listener.0, listener.1));
    decide(ctx, &redirect).map(|()| listener)
}

/// For an intercepted destination with a live listener: refuse it if it is known to refuse,
/// else record it.
#[inline(always)]
fn decide(ctx: &SockAddrContext, redirect: &Redirect) -> Result<(), i32> {
    if known_refused(&redirect.dst) {
        maps::count(counter::REFUSED_AT_CONNECT);
        return Err(refuse());
    }
    // SAFETY: the context is valid for the program's run; `sk` is the connecting socket.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if record::set(sk, redirect) {
        Ok(())
    } else {
        Err(cannot_redirect())
    }
}
