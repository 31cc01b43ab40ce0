//! `cgroup/connect4`: redirect matching IPv4 TCP connects to the daemon's listener.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;

use crate::{
    maps::{LISTENER_IP4, LISTENER_PORT},
    redirect::{ALLOW, SOCK_STREAM, decide_v4},
};

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid `bpf_sock_addr` for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let ip = sa.user_ip4;
    // `user_port` holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    let cookie = match decide_v4(&ctx, ip, port) {
        Ok(cookie) => cookie,
        Err(verdict) => return verdict,
    };
    sa.user_ip4 = LISTENER_IP4.load();
    sa.user_port = u32::from(LISTENER_PORT.load().to_be());
    debug!(
        &ctx,
        "redirect {:i}:{} cookie {}",
        u32::from_be(ip),
        port,
        cookie
    );
    ALLOW
}
