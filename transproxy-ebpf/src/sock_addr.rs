//! What the cgroup/sock_addr programs share about addresses: access to `user_ip6`, and where
//! an address really leads.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{bindings::bpf_sock_addr, programs::SockAddrContext};
use transproxy_common::Endpoint;

/// Reads `user_ip6` one word at a time: the verifier only allows 4-byte accesses, and a
/// volatile access keeps the compiler from merging them.
#[inline(always)]
pub(crate) fn read_ip6(sa: *const bpf_sock_addr) -> [u32; 4] {
    // SAFETY: `sa` is the valid context; each read is an aligned 4-byte field access.
    unsafe {
        [
            read_volatile(&(*sa).user_ip6[0]),
            read_volatile(&(*sa).user_ip6[1]),
            read_volatile(&(*sa).user_ip6[2]),
            read_volatile(&(*sa).user_ip6[3]),
        ]
    }
}

/// Writes `user_ip6` one word at a time, for the same reason.
#[inline(always)]
pub(crate) fn write_ip6(sa: *mut bpf_sock_addr, ip: [u32; 4]) {
    // SAFETY: `sa` is the valid context; aligned 4-byte writes the verifier allows here.
    unsafe {
        write_volatile(&mut (*sa).user_ip6[0], ip[0]);
        write_volatile(&mut (*sa).user_ip6[1], ip[1]);
        write_volatile(&mut (*sa).user_ip6[2], ip[2]);
        write_volatile(&mut (*sa).user_ip6[3], ip[3]);
    }
}

/// `INADDR_LOOPBACK` (127.0.0.1) in network byte order, as the kernel's fields hold it.
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Where a connect (or datagram) to the IPv4 address `ip` (network byte order) goes. `0.0.0.0`
/// means this host: the kernel's route lookup makes it the socket's bound address, or
/// 127.0.0.1 for an unbound socket. The rules must judge that address, not `0.0.0.0` (which no
/// rule intercepts), or binding to an intercepted address and connecting to `0.0.0.0` would go
/// around them.
#[inline(always)]
pub(crate) fn effective_v4(ctx: &SockAddrContext, ip: u32) -> u32 {
    if ip != 0 {
        return ip;
    }
    // SAFETY: the context is valid for the program's run; `sk` is its socket (or null).
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return LOOPBACK_V4;
    }
    // SAFETY: `sk` is the context's full socket; a 4-byte field read the verifier allows.
    match unsafe { (*sk).src_ip4 } {
        0 => LOOPBACK_V4,
        bound => bound,
    }
}

/// Where a connect to the IPv6 address `ip` goes: `::` means this host's loopback, `::1`, or
/// `::ffff:127.0.0.1` for a socket bound to an IPv4-mapped address (as `tcp_v6_connect` makes
/// it). See [`effective_v4`].
#[inline(always)]
pub(crate) fn effective_v6(ctx: &SockAddrContext, ip: [u32; 4]) -> [u32; 4] {
    if ip != [0; 4] {
        return ip;
    }
    // SAFETY: as in `effective_v4`.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    // SAFETY: as in `effective_v4`; word by word, volatile, as the verifier wants.
    let bound_mapped = !sk.is_null()
        && unsafe {
            read_volatile(&(*sk).src_ip6[0]) == 0
                && read_volatile(&(*sk).src_ip6[1]) == 0
                && read_volatile(&(*sk).src_ip6[2]) == Endpoint::V4_MAPPED_PREFIX
        };
    if bound_mapped {
        [0, 0, Endpoint::V4_MAPPED_PREFIX, LOOPBACK_V4]
    } else {
        [0, 0, 0, 1u32.to_be()]
    }
}
