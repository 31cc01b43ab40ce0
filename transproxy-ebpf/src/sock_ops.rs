//! `sock_ops`: once a redirected connection is established, file its original destination under
//! the client's local address; when the socket closes, forget it.
//!
//! The daemon only sees the accepted socket, whose peer address is the client's local address;
//! it has no way to learn the client socket's cookie. This program sits at the one moment both
//! are known. The cookie record stays until the socket closes, because the getpeername hooks
//! answer from it for the whole life of the connection.

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use transproxy_common::Endpoint;

use crate::maps::{DST_BY_CLIENT, DST_BY_COOKIE};

/// sock_ops programs return 1 to say "handled, carry on".
const CONTINUE: u32 = 1;
/// `AF_INET6` from `<sys/socket.h>`.
const AF_INET6: u32 = 10;
/// `TCP_CLOSE` from the kernel's TCP state machine.
const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => file_by_client(&ctx),
        // args[1] is the new state.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            let _ = DST_BY_COOKIE.remove(&cookie(&ctx));
        }
        _ => {}
    }
    CONTINUE
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the helper only reads the socket behind the context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn file_by_client(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    // SAFETY: the value is copied out at once.
    let Some(dst) = (unsafe { DST_BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    let client = client_endpoint(ctx);
    // On failure the daemon finds no record and closes the client: nothing leaks around the
    // proxy.
    if DST_BY_CLIENT.insert(&client, &dst, 0).is_ok() {
        // Be told when the socket closes, to drop the cookie record then.
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
}

/// The client's local address, as the daemon will see it as the peer of the accepted socket.
#[inline(always)]
fn client_endpoint(ctx: &SockOpsContext) -> Endpoint {
    // `local_port` is in host byte order, the addresses in network byte order.
    let port = ctx.local_port() as u16;
    if ctx.family() == AF_INET6 {
        // Word by word with volatile reads: the verifier only accepts context accesses at
        // constant offsets, and the compiler would otherwise index the array through a pointer.
        // SAFETY: `ops` is the valid context; each read is an aligned 4-byte field access.
        let ip6 = unsafe {
            let ops = ctx.ops;
            [
                read_volatile(&(*ops).local_ip6[0]),
                read_volatile(&(*ops).local_ip6[1]),
                read_volatile(&(*ops).local_ip6[2]),
                read_volatile(&(*ops).local_ip6[3]),
            ]
        };
        // A dual-stack socket connected to an IPv4-mapped address: it reached the IPv4
        // listener, whose accepted socket has a plain IPv4 peer. `local_ip4` holds it.
        if !(ip6[0] == 0 && ip6[1] == 0 && ip6[2] == Endpoint::V4_MAPPED_PREFIX) {
            return Endpoint::v6(ip6, port);
        }
    }
    Endpoint::v4(ctx.local_ip4(), port)
}
