//! The daemon's listener, proven alive: the only place a connect is ever redirected to.
//!
//! The daemon puts one socket of each of its listeners in the `LISTENERS` sockhash, keyed by
//! network namespace, address family and service (tunnels, DNS over UDP, DNS over TCP). The kernel removes a socket from the map when it is
//! closed, so finding one proves the daemon's listener is alive in the connecting socket's
//! namespace, and its bound address is read from the socket itself. When the daemon is gone
//! (killed, crashed, restarting), nothing is found: a user who binds the same port afterwards
//! receives nothing.

use core::ptr::{self, read_volatile};

use aya_ebpf::{
    bindings::bpf_sock,
    cty::c_void,
    helpers::{bpf_get_netns_cookie, bpf_map_lookup_elem, bpf_sk_release},
};
use transproxy_common::{ListenerKey, family};

use crate::maps::LISTENERS;

/// Looks up the listener for `family` and `service` in the namespace of the socket behind
/// `ctx` (a cgroup/sock_addr context) and reads it with `read`.
#[inline(always)]
fn with_listener<T>(
    ctx: *mut c_void,
    family: u32,
    service: u32,
    read: impl FnOnce(*const bpf_sock) -> T,
) -> Option<T> {
    let key = ListenerKey {
        // SAFETY: the helper only reads the namespace of the socket behind the context.
        netns: unsafe { bpf_get_netns_cookie(ctx) },
        family,
        service,
    };
    // SAFETY: a lookup in a sockhash returns a referenced socket or null; the key lives on the
    // stack for the call.
    let sk = unsafe {
        bpf_map_lookup_elem(
            ptr::from_ref(&LISTENERS).cast_mut().cast(),
            ptr::from_ref(&key).cast(),
        )
    }
    .cast::<bpf_sock>();
    if sk.is_null() {
        return None;
    }
    let value = read(sk);
    // SAFETY: releases the reference the lookup took; `sk` is not used after.
    unsafe { bpf_sk_release(sk.cast()) };
    Some(value)
}

/// The IPv4 listener of `service` (a `transproxy_common::service`): its address (network
/// byte order) and port (host byte order).
#[inline(always)]
pub(crate) fn v4(ctx: *mut c_void, service: u32) -> Option<(u32, u16)> {
    // SAFETY: `sk` is a valid full socket for the duration of the closure.
    with_listener(ctx, family::V4, service, |sk| unsafe {
        ((*sk).src_ip4, (*sk).src_port as u16)
    })
}

/// The IPv6 listener of `service`: its address (network-order words) and port (host byte
/// order).
#[inline(always)]
pub(crate) fn v6(ctx: *mut c_void, service: u32) -> Option<([u32; 4], u16)> {
    with_listener(ctx, family::V6, service, |sk| {
        // SAFETY: as in `v4`; word by word, as the verifier only allows 4-byte accesses.
        unsafe {
            (
                [
                    read_volatile(&(*sk).src_ip6[0]),
                    read_volatile(&(*sk).src_ip6[1]),
                    read_volatile(&(*sk).src_ip6[2]),
                    read_volatile(&(*sk).src_ip6[3]),
                ],
                (*sk).src_port as u16,
            )
        }
    })
}
