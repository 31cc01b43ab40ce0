//! `cgroup/connect4`: redirect matching IPv4 TCP connects to the daemon's listener, and DNS to
//! its DNS responder ([`crate::dns`]).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;
use transproxy_common::service;

use crate::{
    dns,
    redirect::{ALLOW, SOCK_DGRAM, SOCK_STREAM, decide_v4},
    sock_addr::effective_v4,
    udp,
};

#[cgroup_sock_addr(connect4)]
pub(crate) fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid `bpf_sock_addr` for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = effective_v4(&ctx, sa.user_ip4);
    // `user_port` holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    let decided = match sa.type_ {
        SOCK_STREAM if dns::captures(port) => dns::capture_v4(&ctx, ip, port, service::DNS_TCP),
        SOCK_STREAM => decide_v4(&ctx, ip, port),
        SOCK_DGRAM if dns::captures(port) => dns::capture_v4(&ctx, ip, port, service::DNS_UDP),
        SOCK_DGRAM => return udp::verdict_v4(ip, port),
        _ => return ALLOW,
    };
    let (listener_ip, listener_port) = match decided {
        Ok(listener) => listener,
        Err(verdict) => return verdict,
    };
    sa.user_ip4 = listener_ip;
    sa.user_port = u32::from(listener_port.to_be());
    debug!(&ctx, "redirect {:i}:{}", u32::from_be(ip), port);
    ALLOW
}
