//! `sock_ops`: once a redirected connection is established with the daemon's listener, file its
//! original destination under the client's local address.
//!
//! The daemon only sees the accepted socket, whose peer address is the client's local address;
//! it has no way to learn the client socket itself. This program sits at the one moment both
//! are known. A socket that has a record but reached something else (its redirected connect
//! failed, and it then connected elsewhere directly) files nothing: whoever later connects to the
//! listener from its address must not inherit its destination.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, helpers::bpf_get_netns_cookie, macros::sock_ops,
    programs::SockOpsContext,
};
use transproxy_common::{ClientKey, Endpoint, counter};

use crate::{
    maps::{self, DST_BY_CLIENT},
    record,
};

/// sock_ops programs return 1 to say "handled, carry on".
const CONTINUE: u32 = 1;
/// `AF_INET6` from `<sys/socket.h>`.
const AF_INET6: u32 = 10;

#[sock_ops]
pub(crate) fn sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        file_by_client(&ctx);
    }
    CONTINUE
}

#[inline(always)]
fn file_by_client(ctx: &SockOpsContext) {
    // SAFETY: the context is valid for the program's run; `sk` is its socket (or null).
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    let Some(redirect) = record::get(sk) else {
        return;
    };
    let listener = remote_endpoint(ctx);
    if listener != redirect.listener {
        return;
    }
    // Under the namespace too: clients of two containers can share an address.
    let key = ClientKey {
        // SAFETY: the helper only reads the namespace of the context's socket.
        netns: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
        client: client_endpoint(ctx),
        listener_port: listener.port,
        _pad: 0,
    };
    // On failure the daemon finds no record and resets the client: nothing leaks around the
    // proxy.
    if DST_BY_CLIENT.insert(&key, &redirect, 0).is_ok() {
        maps::count(counter::RECORDS_FILED);
    }
}

/// The connection's peer, IPv4 as IPv4-mapped (as records keep it).
#[inline(always)]
fn remote_endpoint(ctx: &SockOpsContext) -> Endpoint {
    // `remote_port` holds the port in network byte order in its upper 16 bits.
    let port = u16::from_be((ctx.remote_port() >> 16) as u16);
    if ctx.family() == AF_INET6 {
        // SAFETY: `ops` is the valid context; each read is an aligned 4-byte field access.
        let ip6 = unsafe {
            let ops = ctx.ops;
            [
                read_volatile(&(*ops).remote_ip6[0]),
                read_volatile(&(*ops).remote_ip6[1]),
                read_volatile(&(*ops).remote_ip6[2]),
                read_volatile(&(*ops).remote_ip6[3]),
            ]
        };
        return Endpoint::v6(ip6, port);
    }
    Endpoint::v4(ctx.remote_ip4(), port)
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
