//! What connect4 and connect6 share: recording the original destination of a socket.

use aya_ebpf::{EbpfContext, helpers::bpf_get_socket_cookie, programs::SockAddrContext};
use transproxy_common::Endpoint;

use crate::maps::DST_BY_COOKIE;

/// `SOCK_STREAM` from `<sys/socket.h>`: only TCP is tunnelled.
pub const SOCK_STREAM: u32 = 1;

/// Verdict that lets the `connect()` proceed with whatever address the context now holds. The
/// programs never refuse: a connect they cannot record simply goes direct.
pub const ALLOW: i32 = 1;

/// Records `dst` as the original destination of the connecting socket. Returns the cookie, or
/// `None` if the record could not be stored (then the connect must be left alone, or the daemon
/// would find nothing).
#[inline(always)]
pub fn record(ctx: &SockAddrContext, dst: &Endpoint) -> Option<u64> {
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    DST_BY_COOKIE.insert(&cookie, dst, 0).ok().map(|()| cookie)
}
