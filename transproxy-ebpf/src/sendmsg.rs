//! `cgroup/sendmsg4` and `sendmsg6`: unconnected UDP. DNS goes to the daemon's DNS responder
//! with `--dns` ([`crate::dns`]); other datagrams to intercepted destinations are refused with
//! `--refuse-udp` ([`crate::udp`]). Attached only with one of those.

use core::ptr::write_volatile;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use transproxy_common::{Endpoint, service};

use crate::{
    dns,
    redirect::ALLOW,
    sock_addr::{effective_v4, effective_v6, read_ip6, write_ip6},
    udp,
};

#[cgroup_sock_addr(sendmsg4)]
pub(crate) fn sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid `bpf_sock_addr` for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = effective_v4(&ctx, sa.user_ip4);
    let port = u16::from_be(sa.user_port as u16);
    if !dns::captures(port) {
        return udp::verdict_v4(ip, port);
    }
    match dns::capture_v4(&ctx, ip, port, service::DNS_UDP) {
        Ok((listener_ip, listener_port)) => {
            sa.user_ip4 = listener_ip;
            sa.user_port = u32::from(listener_port.to_be());
            ALLOW
        }
        Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub(crate) fn sendmsg6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let ip = effective_v6(&ctx, read_ip6(sa));
    // SAFETY: the kernel hands us a valid `bpf_sock_addr` for the duration of the program.
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == Endpoint::V4_MAPPED_PREFIX;
    if !dns::captures(port) {
        return if mapped {
            udp::verdict_v4(effective_v4(&ctx, ip[3]), port)
        } else {
            udp::verdict_v6(ip, port)
        };
    }
    if mapped {
        match dns::capture_v4(&ctx, effective_v4(&ctx, ip[3]), port, service::DNS_UDP) {
            // SAFETY: aligned 4-byte writes to fields the verifier allows sendmsg6 to write.
            Ok((listener_ip, listener_port)) => unsafe {
                write_volatile(&mut (*sa).user_ip6[3], listener_ip);
                (*sa).user_port = u32::from(listener_port.to_be());
            },
            Err(verdict) => return verdict,
        }
    } else {
        match dns::capture_v6(&ctx, ip, port, service::DNS_UDP) {
            Ok((listener_ip, listener_port)) => {
                write_ip6(sa, listener_ip);
                // SAFETY: as above.
                unsafe { (*sa).user_port = u32::from(listener_port.to_be()) };
            }
            Err(verdict) => return verdict,
        }
    }
    ALLOW
}
