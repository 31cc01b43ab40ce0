//! `cgroup/getpeername4` and `getpeername6`: a redirected socket reports its original
//! destination as its peer, as if it had connected directly. Without this, an application that
//! checks `getpeername()` would see the daemon's listener.
//!
//! Only a socket whose peer is the listener it was redirected to is rewritten: one whose
//! redirected connect failed, and which then connected somewhere directly, reports that peer.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use transproxy_common::{Endpoint, Redirect};

use crate::{
    record,
    redirect::ALLOW,
    sock_addr::{read_ip6, write_ip6},
};

/// The socket's record, if it has one.
#[inline(always)]
fn redirect(ctx: &SockAddrContext) -> Option<Redirect> {
    // SAFETY: the context is valid for the program's run.
    record::get(unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk })
}

#[cgroup_sock_addr(getpeername4)]
pub(crate) fn getpeername4(ctx: SockAddrContext) -> i32 {
    let Some(redirect) = redirect(&ctx) else {
        return ALLOW;
    };
    // SAFETY: the context is valid; the verifier allows reading and writing these fields here.
    let sa = unsafe { &mut *ctx.sock_addr };
    let peer = Endpoint::v4(sa.user_ip4, u16::from_be(sa.user_port as u16));
    if peer == redirect.listener {
        sa.user_ip4 = redirect.dst.addr[3];
        sa.user_port = u32::from(redirect.dst.port.to_be());
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub(crate) fn getpeername6(ctx: SockAddrContext) -> i32 {
    let Some(redirect) = redirect(&ctx) else {
        return ALLOW;
    };
    // SAFETY: as above.
    let port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16);
    // IPv4 endpoints are kept IPv4-mapped, which is what a dual-stack socket reports.
    if Endpoint::v6(read_ip6(ctx.sock_addr), port) == redirect.listener {
        write_ip6(ctx.sock_addr, redirect.dst.addr);
        // SAFETY: the verifier allows writing this field here.
        unsafe { (*ctx.sock_addr).user_port = u32::from(redirect.dst.port.to_be()) };
    }
    ALLOW
}
