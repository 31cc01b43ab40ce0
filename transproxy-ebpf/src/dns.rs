//! `--dns forward|fake`: the cgroup's DNS goes to the daemon's DNS responder, in the kernel,
//! with no resolver setting changed and no iptables.
//!
//! connect4/6 (TCP, and connected UDP as glibc uses) and sendmsg4/6 (unconnected UDP, as musl
//! uses) send whatever goes to port 53 to the daemon's DNS listener of that transport, and
//! record the resolver that was asked with the socket ([`crate::record`]), as for tunnels:
//! getpeername then reports the resolver, and recvmsg4/6 ([`crate::recvmsg`]) make answers
//! come from it (resolvers such as glibc's drop answers from elsewhere). For UDP the record is
//! also filed by socket cookie (`DNS_BY_COOKIE`), where the daemon, which only sees the
//! query's source address, looks up whom to forward to. TCP records are filed by sock_ops, as
//! tunnels' are.
//!
//! Only a listener found alive is ever used ([`crate::listener`]); without one, DNS goes where
//! it was addressed, or fails with the kill switch (names must not leak around the daemon).

use aya_ebpf::{EbpfContext as _, helpers::bpf_get_socket_cookie, programs::SockAddrContext};
use transproxy_common::{DNS_PORT, Endpoint, counter, service};

use crate::{
    listener,
    maps::{self, CAPTURE_DNS, DNS_BY_COOKIE},
    record,
    redirect::{ALLOW, cannot_redirect},
    rules,
};

/// Whether a connect or datagram to `port` is DNS to capture.
#[inline(always)]
pub(crate) fn captures(port: u16) -> bool {
    port == DNS_PORT && CAPTURE_DNS.load() != 0
}

/// The DNS listener of `service` for an IPv4 resolver `ip` (network byte order): `Ok` to
/// rewrite the address to it (recorded), `Err(verdict)` to leave it.
#[inline(always)]
pub(crate) fn capture_v4(
    ctx: &SockAddrContext,
    ip: u32,
    port: u16,
    service: u32,
) -> Result<(u32, u16), i32> {
    if rules::excluded_caller() {
        return Err(ALLOW);
    }
    let Some(listener) = listener::v4(ctx.as_ptr(), service) else {
        return Err(cannot_redirect());
    };
    if listener == (ip, port) || rules::is_daemon() {
        return Err(ALLOW);
    }
    record(
        ctx,
        Endpoint::v4(ip, port),
        Endpoint::v4(listener.0, listener.1),
        service,
    )?;
    Ok(listener)
}

/// As [`capture_v4`], for an IPv6 resolver (network-order words) and the IPv6 listener.
#[inline(always)]
pub(crate) fn capture_v6(
    ctx: &SockAddrContext,
    ip: [u32; 4],
    port: u16,
    service: u32,
) -> Result<([u32; 4], u16), i32> {
    if rules::excluded_caller() {
        return Err(ALLOW);
    }
    let Some(listener) = listener::v6(ctx.as_ptr(), service) else {
        return Err(cannot_redirect());
    };
    if listener == (ip, port) || rules::is_daemon() {
        return Err(ALLOW);
    }
    record(
        ctx,
        Endpoint::v6(ip, port),
        Endpoint::v6(listener.0, listener.1),
        service,
    )?;
    Ok(listener)
}

/// Records `resolver` with the socket, and for UDP by its cookie too.
#[inline(always)]
fn record(
    ctx: &SockAddrContext,
    resolver: Endpoint,
    listener: Endpoint,
    service: u32,
) -> Result<(), i32> {
    let redirect = record::new(resolver, listener);
    // SAFETY: the context is valid for the program's run; `sk` is the calling socket.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if !record::set(sk, &redirect) {
        return Err(cannot_redirect());
    }
    if service == service::DNS_UDP {
        // SAFETY: the helper only reads (or assigns) the context socket's cookie.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if DNS_BY_COOKIE.insert(&cookie, &redirect, 0).is_err() {
            return Err(cannot_redirect());
        }
    }
    maps::count(counter::DNS_CAPTURED);
    Ok(())
}
