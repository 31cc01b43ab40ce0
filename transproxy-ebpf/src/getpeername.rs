//! `cgroup/getpeername4` and `getpeername6`: a redirected socket reports its original
//! destination as its peer, as if it had connected directly. Without this, an application that
//! checks `getpeername()` would see the daemon's listener.

use aya_ebpf::{
    EbpfContext, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use transproxy_common::Endpoint;

use crate::{maps::DST_BY_COOKIE, redirect::ALLOW, sock_addr::write_ip6};

#[inline(always)]
fn original_dst(ctx: &SockAddrContext) -> Option<Endpoint> {
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    unsafe { DST_BY_COOKIE.get(&cookie) }.copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(dst) = original_dst(&ctx) {
        // SAFETY: the context is valid; the verifier allows writing these fields here.
        unsafe {
            (*ctx.sock_addr).user_ip4 = dst.addr[3];
            (*ctx.sock_addr).user_port = u32::from(dst.port.to_be());
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(dst) = original_dst(&ctx) {
        // An IPv4 record is already IPv4-mapped, which is what a dual-stack socket reports.
        write_ip6(ctx.sock_addr, dst.addr);
        // SAFETY: the context is valid; the verifier allows writing this field here.
        unsafe { (*ctx.sock_addr).user_port = u32::from(dst.port.to_be()) };
    }
    ALLOW
}
