//! `cgroup/connect4`: redirect matching IPv4 TCP connects to the daemon's listener.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;
use transproxy_common::Endpoint;

use crate::{
    maps::{LISTENER_IP4, LISTENER_PORT},
    redirect::{ALLOW, SOCK_STREAM, record, refuse_if_known},
    rules,
};

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx)
}

#[inline(always)]
fn redirect(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid `bpf_sock_addr` for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let ip = sa.user_ip4;
    // `user_port` holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    let (listener_ip, listener_port) = (LISTENER_IP4.load(), LISTENER_PORT.load());
    // Never redirect what already goes to the listener: that is either a second interceptor
    // (nested cgroups) having done the job, or someone probing the listener directly.
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
    sa.user_ip4 = listener_ip;
    sa.user_port = u32::from(listener_port.to_be());
    debug!(
        ctx,
        "redirect {:i}:{} cookie {}",
        u32::from_be(ip),
        port,
        cookie
    );
    ALLOW
}
