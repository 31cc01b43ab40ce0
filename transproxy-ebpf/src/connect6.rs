//! `cgroup/connect6`: redirect matching TCP connects of IPv6 sockets.
//!
//! An IPv6 socket can reach an IPv4 destination through an IPv4-mapped address
//! (`::ffff:a.b.c.d`), as Java and Go do on dual-stack sockets; connect4 never sees those. They
//! are matched against the IPv4 rules, recorded as IPv4 and sent to the IPv4 listener (still
//! mapped: only the last word changes). Native IPv6 destinations go to the IPv6 listener. DNS
//! goes to the DNS responder likewise ([`crate::dns`]).

use core::ptr::write_volatile;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;
use transproxy_common::{Endpoint, ip6_bytes, service};

use crate::{
    dns,
    redirect::{ALLOW, SOCK_DGRAM, SOCK_STREAM, decide_v4, decide_v6},
    sock_addr::{effective_v4, effective_v6, read_ip6, write_ip6},
    udp,
};

#[cgroup_sock_addr(connect6)]
pub(crate) fn connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands us a valid `bpf_sock_addr` for the duration of the program.
    let type_ = unsafe { (*sa).type_ };
    let mut ip = effective_v6(&ctx, read_ip6(sa));
    // SAFETY: as above.
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == Endpoint::V4_MAPPED_PREFIX;
    if mapped {
        ip[3] = effective_v4(&ctx, ip[3]);
    }
    let dns_service = match type_ {
        SOCK_STREAM if dns::captures(port) => Some(service::DNS_TCP),
        SOCK_STREAM => None,
        SOCK_DGRAM if dns::captures(port) => Some(service::DNS_UDP),
        SOCK_DGRAM if mapped => return udp::verdict_v4(ip[3], port),
        SOCK_DGRAM => return udp::verdict_v6(ip, port),
        _ => return ALLOW,
    };
    if mapped {
        let decided = match dns_service {
            Some(service) => dns::capture_v4(&ctx, ip[3], port, service),
            None => decide_v4(&ctx, ip[3], port),
        };
        let (listener_ip, listener_port) = match decided {
            Ok(listener) => listener,
            Err(verdict) => return verdict,
        };
        // SAFETY: aligned 4-byte writes to fields the verifier allows connect6 to write.
        unsafe {
            write_volatile(&mut (*sa).user_ip6[3], listener_ip);
            (*sa).user_port = u32::from(listener_port.to_be());
        }
        debug!(&ctx, "redirect ::ffff:{:i}:{}", u32::from_be(ip[3]), port);
    } else {
        let decided = match dns_service {
            Some(service) => dns::capture_v6(&ctx, ip, port, service),
            None => decide_v6(&ctx, ip, port),
        };
        let (listener_ip, listener_port) = match decided {
            Ok(listener) => listener,
            Err(verdict) => return verdict,
        };
        write_ip6(sa, listener_ip);
        // SAFETY: as above.
        unsafe { (*sa).user_port = u32::from(listener_port.to_be()) };
        debug!(&ctx, "redirect [{:i}]:{}", ip6_bytes(ip), port);
    }
    ALLOW
}
