//! transproxy's kernel side.
//!
//! * [`connect4`], [`connect6`]: at `connect()`, record where a matching TCP socket wanted to go
//!   (in the socket's own storage, [`record`]) and send it to the daemon's listener instead,
//!   only ever one proven alive ([`listener`]).
//! * [`sock_ops`]: once that connection is established, re-files the record under the client's
//!   local address, which is what the daemon sees as the peer of the accepted socket.
//! * [`getpeername`]: the redirected socket reports its original destination as its peer.
//! * [`sendmsg`] (and connect4/6 for UDP): `--refuse-udp` ([`udp`]).
//! * [`dns`]: with `--dns`, DNS goes to the daemon's DNS responder (connect4/6 and sendmsg4/6),
//!   whose answers [`recvmsg`] makes come from the resolver that was asked.
//!
//! * [`gateway`]: gateway mode, tc programs on a LAN interface that hand other hosts' TCP to
//!   the daemon (`bpf_sk_assign`).
//! * [`unserved`]: a connect in a network namespace the daemon has no listener in yet (a
//!   container started after it) tells the daemon, which opens one there.
//!
//! Maps and load-time settings live in [`maps`]; the interception decision in [`rules`] and
//! [`redirect`].
#![no_std]
#![no_main]

mod connect4;
mod connect6;
mod dns;
mod gateway;
mod getpeername;
mod listener;
mod maps;
mod record;
mod recvmsg;
mod redirect;
mod rules;
mod sendmsg;
mod sock_addr;
mod sock_ops;
mod udp;
mod unserved;

/// eBPF programs cannot unwind; the verifier guarantees this is never reached.
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
