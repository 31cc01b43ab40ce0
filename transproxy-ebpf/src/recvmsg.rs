//! `cgroup/recvmsg4` and `recvmsg6` (with `--dns`): an answer from the daemon's DNS responder
//! comes from the resolver the socket asked, as if it had answered itself. Resolvers check
//! this (glibc drops answers whose source is not the server it asked).
//!
//! Only a socket with a record whose listener is the answer's source is rewritten (the record
//! was made when the socket's query was captured, [`crate::dns`]), and only while that
//! listener is the daemon's, alive: once the daemon is gone, whoever binds its old port
//! cannot answer a query still waiting in its name's resolver's.

use aya_ebpf::{EbpfContext as _, macros::cgroup_sock_addr, programs::SockAddrContext};
use transproxy_common::{Endpoint, Redirect, service};

use crate::{
    listener, record,
    sock_addr::{read_ip6, write_ip6},
};

/// recvmsg programs must return 1.
const PASS: i32 = 1;

/// The socket's record, if it has one.
#[inline(always)]
fn redirect(ctx: &SockAddrContext) -> Option<Redirect> {
    // SAFETY: the context is valid for the program's run.
    record::get(unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk })
}

#[cgroup_sock_addr(recvmsg4)]
pub(crate) fn recvmsg4(ctx: SockAddrContext) -> i32 {
    let Some(redirect) = redirect(&ctx) else {
        return PASS;
    };
    // SAFETY: the context is valid; the verifier allows reading and writing these fields here.
    let sa = unsafe { &mut *ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    let alive = listener::v4(ctx.as_ptr(), service::DNS_UDP) == Some((sa.user_ip4, port));
    if alive && Endpoint::v4(sa.user_ip4, port) == redirect.listener {
        sa.user_ip4 = redirect.dst.addr[3];
        sa.user_port = u32::from(redirect.dst.port.to_be());
    }
    PASS
}

#[cgroup_sock_addr(recvmsg6)]
pub(crate) fn recvmsg6(ctx: SockAddrContext) -> i32 {
    let Some(redirect) = redirect(&ctx) else {
        return PASS;
    };
    // SAFETY: as above.
    let port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16);
    // An IPv4 answer to a dual-stack socket has an IPv4-mapped source, as records keep it.
    let source = read_ip6(ctx.sock_addr);
    let alive = if source[0] == 0 && source[1] == 0 && source[2] == Endpoint::V4_MAPPED_PREFIX {
        listener::v4(ctx.as_ptr(), service::DNS_UDP) == Some((source[3], port))
    } else {
        listener::v6(ctx.as_ptr(), service::DNS_UDP) == Some((source, port))
    };
    if alive && Endpoint::v6(source, port) == redirect.listener {
        write_ip6(ctx.sock_addr, redirect.dst.addr);
        // SAFETY: the verifier allows writing this field here.
        unsafe { (*ctx.sock_addr).user_port = u32::from(redirect.dst.port.to_be()) };
    }
    PASS
}
