//! `cgroup/connect4`: redirect matching IPv4 TCP connects to the daemon's listener.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use transproxy_common::Endpoint;

use crate::{
    maps::{DAEMON_TGID, DST_BY_COOKIE, LISTENER_IP4, LISTENER_PORT},
    rules,
};

/// `SOCK_STREAM` from `<sys/socket.h>`: only TCP is tunnelled.
const SOCK_STREAM: u32 = 1;

/// Verdict that lets the `connect()` proceed (with whatever address we left in the context).
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx);
    // Never refuse: a connect we cannot record simply goes direct.
    ALLOW
}

#[inline(always)]
fn redirect(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands us a valid `bpf_sock_addr` for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return;
    }
    let ip = sa.user_ip4;
    // `user_port` holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);

    let listener_ip = LISTENER_IP4.load();
    let listener_port = LISTENER_PORT.load();
    // Never redirect what already goes to the listener: that is either a second interceptor
    // (nested cgroups) having done the job, or someone probing the listener directly.
    if ip == listener_ip && port == listener_port {
        return;
    }
    // The daemon's own upstream connections must not loop back into it.
    if (bpf_get_current_pid_tgid() >> 32) as u32 == DAEMON_TGID.load() {
        return;
    }
    if !rules::intercepts_v4(ip, port) {
        return;
    }

    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if DST_BY_COOKIE
        .insert(&cookie, &Endpoint::v4(ip, port), 0)
        .is_err()
    {
        // Without a record the daemon could not tunnel it: leave the connect untouched.
        return;
    }
    sa.user_ip4 = listener_ip;
    sa.user_port = u32::from(listener_port.to_be());
    debug!(
        ctx,
        "redirect {:i}:{} cookie {}",
        u32::from_be(ip),
        port,
        cookie
    );
}
