//! `cgroup/sendmsg4` and `sendmsg6`: unconnected UDP, for `--refuse-udp` (see [`crate::udp`]).
//! Attached only with that flag.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use transproxy_common::Endpoint;

use crate::{
    sock_addr::{effective_v4, effective_v6, read_ip6},
    udp,
};

#[cgroup_sock_addr(sendmsg4)]
pub(crate) fn sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid `bpf_sock_addr` for the duration of the program.
    let sa = unsafe { &*ctx.sock_addr };
    let ip = effective_v4(&ctx, sa.user_ip4);
    udp::verdict_v4(ip, u16::from_be(sa.user_port as u16))
}

#[cgroup_sock_addr(sendmsg6)]
pub(crate) fn sendmsg6(ctx: SockAddrContext) -> i32 {
    let ip = effective_v6(&ctx, read_ip6(ctx.sock_addr));
    // SAFETY: as above.
    let port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16);
    if ip[0] == 0 && ip[1] == 0 && ip[2] == Endpoint::V4_MAPPED_PREFIX {
        udp::verdict_v4(effective_v4(&ctx, ip[3]), port)
    } else {
        udp::verdict_v6(ip, port)
    }
}
