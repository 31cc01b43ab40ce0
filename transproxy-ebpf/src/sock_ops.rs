//! `sock_ops`: once a redirected connection is established, file its original destination under
//! the client's local address.
//!
//! The daemon only sees the accepted socket, whose peer address is the client's local address;
//! it has no way to learn the client socket's cookie. This program sits at the one moment both
//! are known.

use aya_ebpf::{
    EbpfContext, bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, helpers::bpf_get_socket_cookie,
    macros::sock_ops, programs::SockOpsContext,
};
use transproxy_common::Endpoint;

use crate::maps::{DST_BY_CLIENT, DST_BY_COOKIE};

/// sock_ops programs return 1 to say "handled, carry on".
const CONTINUE: u32 = 1;

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        file_by_client(&ctx);
    }
    CONTINUE
}

#[inline(always)]
fn file_by_client(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once; a concurrent delete of this cookie cannot happen
    // because only this socket's own establishment removes it.
    let Some(dst) = (unsafe { DST_BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    // `local_ip4` is in network byte order, `local_port` in host byte order.
    let client = Endpoint::v4(ctx.local_ip4(), ctx.local_port() as u16);
    // On failure the daemon finds no record and resets the client: nothing leaks around the
    // proxy, and the LRU evicts the cookie record.
    if DST_BY_CLIENT.insert(&client, &dst, 0).is_ok() {
        let _ = DST_BY_COOKIE.remove(&cookie);
    }
}
