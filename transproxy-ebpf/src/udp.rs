//! `--refuse-udp`: UDP to intercepted destinations fails, so that QUIC falls back to TCP (which
//! is tunnelled) and nothing leaves around the proxy over UDP. DNS (port 53) is let through.
//! UDP to a fake address (`--dns fake`) always fails: it leads nowhere, and a QUIC packet sent
//! there would carry its server name out on the default route. Checked in connect4/6
//! (connected sockets) and sendmsg4/6 (unconnected ones).

use crate::{
    maps::{FAKE_POOL, REFUSE_UDP},
    redirect::{ALLOW, REJECT},
    rules,
};

/// DNS: names must still resolve.
const DNS_PORT: u16 = 53;

/// The verdict for UDP to an IPv4 address (network byte order) and port.
#[inline(always)]
pub(crate) fn verdict_v4(ip: u32, port: u16) -> i32 {
    if FAKE_POOL.load().contains_v4(ip) {
        return REJECT;
    }
    if REFUSE_UDP.load() == 0 || port == DNS_PORT {
        return ALLOW;
    }
    verdict(rules::intercepts_v4(ip, port))
}

/// The verdict for UDP to an IPv6 address (network-order words) and port.
#[inline(always)]
pub(crate) fn verdict_v6(ip: [u32; 4], port: u16) -> i32 {
    if FAKE_POOL.load().contains_v6(ip) {
        return REJECT;
    }
    if REFUSE_UDP.load() == 0 || port == DNS_PORT {
        return ALLOW;
    }
    verdict(rules::intercepts_v6(ip, port))
}

#[inline(always)]
fn verdict(intercepted: bool) -> i32 {
    if intercepted && !rules::excluded_caller() {
        REJECT
    } else {
        ALLOW
    }
}
