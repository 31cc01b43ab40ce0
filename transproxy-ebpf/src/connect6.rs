//! `cgroup/connect6`: redirect matching TCP connects of IPv6 sockets.
//!
//! An IPv6 socket can reach an IPv4 destination through an IPv4-mapped address
//! (`::ffff:a.b.c.d`), as Java and Go do on dual-stack sockets; connect4 never sees those. They
//! are matched against the IPv4 rules, recorded as IPv4 and sent to the IPv4 listener (still
//! mapped: only the last word changes). Native IPv6 destinations go to the IPv6 listener.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{bindings::bpf_sock_addr, macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;
use transproxy_common::{Endpoint, ip6_bytes};

use crate::{
    maps::{LISTENER_IP4, LISTENER_IP6, LISTENER_PORT, LISTENER_PORT6},
    redirect::{ALLOW, SOCK_STREAM, record, refuse_if_known},
    rules,
};

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    redirect(&ctx)
}

/// Reads `user_ip6` one word at a time: the verifier only allows 4-byte accesses, and a
/// volatile access keeps the compiler from merging them.
#[inline(always)]
fn read_ip6(sa: *const bpf_sock_addr) -> [u32; 4] {
    // SAFETY: `sa` is the valid context; each read is an aligned 4-byte field access.
    unsafe {
        [
            read_volatile(&(*sa).user_ip6[0]),
            read_volatile(&(*sa).user_ip6[1]),
            read_volatile(&(*sa).user_ip6[2]),
            read_volatile(&(*sa).user_ip6[3]),
        ]
    }
}

#[inline(always)]
fn redirect(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands us a valid `bpf_sock_addr` for the duration of the program.
    if unsafe { (*sa).type_ } != SOCK_STREAM {
        return ALLOW;
    }
    let ip = read_ip6(sa);
    // SAFETY: as above.
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    if ip[0] == 0 && ip[1] == 0 && ip[2] == Endpoint::V4_MAPPED_PREFIX {
        redirect_mapped_v4(ctx, ip[3], port)
    } else {
        redirect_v6(ctx, ip, port)
    }
}

#[inline(always)]
fn redirect_mapped_v4(ctx: &SockAddrContext, ip: u32, port: u16) -> i32 {
    let (listener_ip, listener_port) = (LISTENER_IP4.load(), LISTENER_PORT.load());
    if (ip, port) == (listener_ip, listener_port) {
        return ALLOW;
    }
    if rules::caller_exempt() || !rules::intercepts_v4(ip, port) {
        return ALLOW;
    }
    let dst = Endpoint::v4(ip, port);
    if let Some(verdict) = refuse_if_known(&dst) {
        return verdict;
    }
    let Some(cookie) = record(ctx, &dst) else {
        return ALLOW;
    };
    // SAFETY: aligned 4-byte writes to fields the verifier allows connect6 to write.
    unsafe {
        write_volatile(&mut (*ctx.sock_addr).user_ip6[3], listener_ip);
        (*ctx.sock_addr).user_port = u32::from(listener_port.to_be());
    }
    debug!(
        ctx,
        "redirect ::ffff:{:i}:{} cookie {}",
        u32::from_be(ip),
        port,
        cookie
    );
    ALLOW
}

#[inline(always)]
fn redirect_v6(ctx: &SockAddrContext, ip: [u32; 4], port: u16) -> i32 {
    let (listener_ip, listener_port) = (LISTENER_IP6.load(), LISTENER_PORT6.load());
    // No IPv6 listener: IPv6 destinations go direct.
    if listener_port == 0 || (ip == listener_ip && port == listener_port) {
        return ALLOW;
    }
    if rules::caller_exempt() || !rules::intercepts_v6(ip, port) {
        return ALLOW;
    }
    let dst = Endpoint::v6(ip, port);
    if let Some(verdict) = refuse_if_known(&dst) {
        return verdict;
    }
    let Some(cookie) = record(ctx, &dst) else {
        return ALLOW;
    };
    // SAFETY: aligned 4-byte writes to fields the verifier allows connect6 to write.
    unsafe {
        let sa = ctx.sock_addr;
        write_volatile(&mut (*sa).user_ip6[0], listener_ip[0]);
        write_volatile(&mut (*sa).user_ip6[1], listener_ip[1]);
        write_volatile(&mut (*sa).user_ip6[2], listener_ip[2]);
        write_volatile(&mut (*sa).user_ip6[3], listener_ip[3]);
        (*sa).user_port = u32::from(listener_port.to_be());
    }
    debug!(
        ctx,
        "redirect [{:i}]:{} cookie {}",
        ip6_bytes(ip),
        port,
        cookie
    );
    ALLOW
}
