//! Gateway mode: TCP from other hosts, entering on a LAN interface, handed to the daemon's
//! listener without iptables or conntrack (tc clsact, `bpf_sk_assign`).
//!
//! `gateway_ingress` runs for every packet entering on the LAN interface. For TCP to a
//! destination the rules intercept:
//! 1. a packet of a connection the daemon already accepted (its socket is found on the packet's
//!    own four-tuple) is assigned to that socket;
//! 2. a pure SYN (SYN without ACK: only connections started from the LAN side are bent, so the
//!    return traffic of connections into the LAN is never caught) is assigned to the daemon's
//!    listener, found in `LISTENERS` (proven alive) under the gateway's key;
//! 3. anything else is forwarded as before.
//!
//! Assigned packets get [`GATEWAY_MARK`]; the daemon's policy rule routes marked packets to
//! the local table, where the (transparent) listener takes them. With no listener (the daemon
//! gone), SYNs are forwarded untouched, or dropped with the kill switch.
//!
//! `gateway_egress` drops ICMPv6 redirects leaving on the LAN interface: a client that obeys one
//! would send to its destination around the gateway. (IPv4 redirects are turned off by the
//! daemon through `send_redirects`; IPv6 has no such switch.)

use core::{ffi::c_void, mem::size_of, ptr};

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, TC_ACT_OK, TC_ACT_SHOT, bpf_sock, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    programs::TcContext,
};
use transproxy_common::{GATEWAY_MARK, ListenerKey, family, service};

use crate::{
    maps::{FAIL_CLOSED, LISTENERS},
    rules,
};

/// `ETH_P_IP`, `ETH_P_IPV6`.
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Ethernet header length (the LAN interface carries Ethernet frames).
const ETH_LEN: usize = 14;
/// `IPPROTO_TCP`, `IPPROTO_ICMPV6`.
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMPV6: u8 = 58;
/// ICMPv6 type of a redirect (RFC 4861).
const ICMPV6_REDIRECT: u8 = 137;
/// TCP flags (byte 13 of the header).
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// `TCP_LISTEN` from `include/net/tcp_states.h`.
const TCP_LISTEN: u32 = 10;

/// A TCP packet's addresses, ports and flags.
struct Packet {
    v6: bool,
    /// Source address, IPv4 in `src[3]` only.
    src: [u32; 4],
    /// Ports as on the wire (network byte order), for the tuple.
    sport_be: u16,
    dport_be: u16,
    /// Destination, for the rules: IPv4 in `dst[3]` only.
    dst: [u32; 4],
    dport: u16,
    flags: u8,
}

#[classifier]
pub(crate) fn gateway_ingress(ctx: TcContext) -> i32 {
    match parse(&ctx) {
        Parsed::Tcp(packet) => steer(&ctx, &packet),
        // A TCP segment in IP fragments: its ports cannot be read (or only in the first), so
        // it cannot be told whether to be tunnelled; forwarding it would let a LAN host send
        // an intercepted connection around the proxy. TCP sets don't-fragment and finds the
        // path's MTU itself: dropped.
        Parsed::TcpFragment => TC_ACT_SHOT,
        Parsed::Other => TC_ACT_OK,
    }
}

/// What a packet from the LAN is, for the gateway.
enum Parsed {
    Tcp(Packet),
    /// TCP in IP fragments (IPv4 with more fragments or an offset; IPv6 with a fragment
    /// header), or TCP behind more IPv6 extension headers than are walked.
    TcpFragment,
    /// Not TCP: forwarded.
    Other,
}

/// IPv6 extension headers that may come before TCP (RFC 8200): hop-by-hop options, routing,
/// destination options, and the fragment header.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DESTINATION: u8 = 60;

#[classifier]
pub(crate) fn gateway_egress(ctx: TcContext) -> i32 {
    let Ok(proto) = ctx.load::<u16>(12) else {
        return TC_ACT_OK;
    };
    if u16::from_be(proto) != ETH_P_IPV6 {
        return TC_ACT_OK;
    }
    let next = ctx.load::<u8>(ETH_LEN + 6).unwrap_or(0);
    let icmp_type = ctx.load::<u8>(ETH_LEN + 40).unwrap_or(0);
    if next == IPPROTO_ICMPV6 && icmp_type == ICMPV6_REDIRECT {
        return TC_ACT_SHOT;
    }
    TC_ACT_OK
}

/// The TCP packet in `ctx`, if it is one.
#[inline(always)]
fn parse(ctx: &TcContext) -> Parsed {
    let Ok(proto) = ctx.load::<u16>(12) else {
        return Parsed::Other;
    };
    match u16::from_be(proto) {
        ETH_P_IP => parse_v4(ctx),
        ETH_P_IPV6 => parse_v6(ctx),
        _ => Parsed::Other,
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext) -> Parsed {
    let (Ok(first), Ok(protocol), Ok(fragment)) = (
        ctx.load::<u8>(ETH_LEN),
        ctx.load::<u8>(ETH_LEN + 9),
        ctx.load::<u16>(ETH_LEN + 6),
    ) else {
        return Parsed::Other;
    };
    if protocol != IPPROTO_TCP {
        return Parsed::Other;
    }
    // More fragments, or an offset: part of a fragmented segment.
    if u16::from_be(fragment) & 0x3fff != 0 {
        return Parsed::TcpFragment;
    }
    let header_len = usize::from(first & 0x0f) * 4;
    if header_len < 20 {
        return Parsed::Other;
    }
    let tcp = ETH_LEN + (header_len & 0x3c);
    let (Ok(saddr), Ok(daddr), Ok(sport), Ok(dport), Ok(flags)) = (
        ctx.load::<u32>(ETH_LEN + 12),
        ctx.load::<u32>(ETH_LEN + 16),
        ctx.load::<u16>(tcp),
        ctx.load::<u16>(tcp + 2),
        ctx.load::<u8>(tcp + 13),
    ) else {
        // A TCP header cut short: not a segment anyone could accept.
        return Parsed::TcpFragment;
    };
    Parsed::Tcp(Packet {
        v6: false,
        src: [0, 0, 0, saddr],
        sport_be: sport,
        dport_be: dport,
        dst: [0, 0, 0, daddr],
        dport: u16::from_be(dport),
        flags,
    })
}

#[inline(always)]
fn parse_v6(ctx: &TcContext) -> Parsed {
    let Ok(mut next) = ctx.load::<u8>(ETH_LEN + 6) else {
        return Parsed::Other;
    };
    let mut at = ETH_LEN + 40;
    // Walks up to three extension headers (unrolled for the verifier).
    for _ in 0..3 {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DESTINATION => {
                let (Ok(following), Ok(len)) = (ctx.load::<u8>(at), ctx.load::<u8>(at + 1)) else {
                    return Parsed::Other;
                };
                next = following;
                at += (usize::from(len) + 1) * 8;
            }
            IPV6_FRAGMENT => {
                return match ctx.load::<u8>(at) {
                    Ok(IPPROTO_TCP) => Parsed::TcpFragment,
                    _ => Parsed::Other,
                };
            }
            _ => break,
        }
    }
    match next {
        IPPROTO_TCP => {}
        // Still an extension header: TCP may be behind it.
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DESTINATION | IPV6_FRAGMENT => {
            return Parsed::TcpFragment;
        }
        _ => return Parsed::Other,
    }
    let (Ok(saddr), Ok(daddr), Ok(sport), Ok(dport), Ok(flags)) = (
        ctx.load::<[u32; 4]>(ETH_LEN + 8),
        ctx.load::<[u32; 4]>(ETH_LEN + 24),
        ctx.load::<u16>(at),
        ctx.load::<u16>(at + 2),
        ctx.load::<u8>(at + 13),
    ) else {
        return Parsed::TcpFragment;
    };
    Parsed::Tcp(Packet {
        v6: true,
        src: saddr,
        sport_be: sport,
        dport_be: dport,
        dst: daddr,
        dport: u16::from_be(dport),
        flags,
    })
}

/// The verdict for a TCP packet from the LAN.
#[inline(always)]
fn steer(ctx: &TcContext, packet: &Packet) -> i32 {
    let intercepted = if packet.v6 {
        rules::intercepts_v6(packet.dst, packet.dport)
    } else {
        rules::intercepts_v4(packet.dst[3], packet.dport)
    };
    if !intercepted {
        return TC_ACT_OK;
    }
    // 1. A connection the daemon holds already: its accepted socket has this four-tuple.
    // Every byte of the tuple is written (the verifier refuses uninitialised stack).
    let (mut tuple, tuple_len) = if packet.v6 {
        let half = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: packet.src,
            daddr: packet.dst,
            sport: packet.sport_be,
            dport: packet.dport_be,
        };
        (
            bpf_sock_tuple {
                __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 { ipv6: half },
            },
            size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>() as u32,
        )
    } else {
        // The IPv6 half first, all zero, so the union has no uninitialised byte.
        let mut tuple = bpf_sock_tuple {
            __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
                ipv6: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                    saddr: [0; 4],
                    daddr: [0; 4],
                    sport: 0,
                    dport: 0,
                },
            },
        };
        tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: packet.src[3],
            daddr: packet.dst[3],
            sport: packet.sport_be,
            dport: packet.dport_be,
        };
        (
            tuple,
            size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32,
        )
    };
    // SAFETY: the tuple lives on the stack for the call; its size is that of its used half.
    let found = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb.cast::<c_void>(),
            ptr::from_mut(&mut tuple),
            tuple_len,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if !found.is_null() {
        // SAFETY: a socket the lookup returned, readable until released.
        let state = unsafe { (*found).state };
        let assigned = state != TCP_LISTEN && assign(ctx, found.cast());
        // SAFETY: releases the lookup's reference; `found` is not used after.
        unsafe { bpf_sk_release(found.cast()) };
        if assigned {
            return TC_ACT_OK;
        }
    }
    // 2. Only a SYN from the LAN side starts an interception.
    if packet.flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return TC_ACT_OK;
    }
    let key = ListenerKey {
        netns: 0,
        family: if packet.v6 { family::V6 } else { family::V4 },
        service: service::GATEWAY,
    };
    // SAFETY: a sockhash lookup returns a referenced socket or null; the key lives on the
    // stack for the call.
    let listener = unsafe {
        bpf_map_lookup_elem(
            ptr::from_ref(&LISTENERS).cast_mut().cast(),
            ptr::from_ref(&key).cast(),
        )
    }
    .cast::<bpf_sock>();
    if listener.is_null() {
        // The daemon is gone: forwarded as if it never ran, or dropped by the kill switch.
        return if FAIL_CLOSED.load() == 0 {
            TC_ACT_OK
        } else {
            TC_ACT_SHOT
        };
    }
    let assigned = assign(ctx, listener);
    // SAFETY: releases the lookup's reference; `listener` is not used after.
    unsafe { bpf_sk_release(listener.cast()) };
    if assigned || FAIL_CLOSED.load() == 0 {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

/// Assigns the packet to `sk` and marks it for the local route. Returns whether it was.
#[inline(always)]
fn assign(ctx: &TcContext, sk: *mut bpf_sock) -> bool {
    // SAFETY: `sk` is a referenced socket for the duration of the call.
    let done = unsafe { bpf_sk_assign(ctx.skb.skb.cast::<c_void>(), sk.cast(), 0) } == 0;
    if done {
        ctx.set_mark(GATEWAY_MARK);
    }
    done
}
