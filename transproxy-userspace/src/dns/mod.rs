//! `--dns forward|fake`: the DNS responder the kernel sends the intercepted processes' DNS to
//! (see the eBPF side's `dns.rs`), and what tunnels learn from it ([`HostNames`]).
//!
//! Every query comes with its origin, from the kernel: the resolver it was sent to and the
//! process that sent it ([`crate::kernel::DnsAskers`] for UDP, the tunnels' records for TCP).
//! A query the kernel did not capture (sent to the responder directly) is refused: the
//! responder is not an open resolver. Then:
//! * `forward`: the query goes to the resolver it was sent to, from the daemon (whose own
//!   sockets are never captured), over the transport it came on; the answer goes back as is,
//!   and its addresses teach [`HostNames`] which name they stand for in the asker's cgroup.
//! * `fake`: an A or AAAA question for a name is answered from the [`FakePool`]; NO_PROXY and
//!   `--dns-direct` names, and every other question, are forwarded as above.
//!
//! Answers over UDP are as the resolver sent them (it saw the client's EDNS size and set TC
//! itself); a client that gets TC asks again over TCP, which is captured too.

pub(crate) mod fake_pool;
pub(crate) mod learned;
pub mod message;
#[cfg(feature = "ebpf")]
mod responder;
#[cfg(feature = "ebpf")]
mod sockets;

use std::{net::IpAddr, sync::Arc};

pub(crate) use self::{
    fake_pool::{FakePool, Lease},
    learned::Learned,
};
#[cfg(feature = "ebpf")]
pub(crate) use self::{responder::Responder, sockets::DnsBound};
use crate::sniff::Name;

/// What tunnels learn from DNS: the fake addresses' names, and (forward mode) the names
/// behind real addresses.
#[derive(Debug, Default)]
pub(crate) struct HostNames {
    pub(crate) fake: Option<Arc<FakePool>>,
    pub(crate) learned: Learned,
}

/// What DNS says about a tunnel's destination.
#[derive(Debug)]
pub(crate) enum Hint {
    /// Nothing.
    None,
    /// The name an answer gave this address.
    Learned(Name),
    /// A fake address: its name, held while the tunnel is open.
    Fake(Name, Lease),
    /// A fake address no name has (handed out before a restart): no tunnel can be asked for.
    UnknownFake,
}

impl HostNames {
    /// What DNS says about a tunnel to `address` from process `pid` of `cgroup`.
    pub(crate) fn hint(&self, cgroup: u64, pid: u32, address: IpAddr) -> Hint {
        if let Some(pool) = self.fake.as_ref().filter(|pool| pool.contains(address)) {
            return match pool.lease(address) {
                Some((name, lease)) => Hint::Fake(name, lease),
                None => Hint::UnknownFake,
            };
        }
        match self.learned.name(cgroup, pid, address) {
            Some(name) => Hint::Learned(name),
            None => Hint::None,
        }
    }

    /// Whether `address` is a fake one.
    pub(crate) fn is_fake(&self, address: IpAddr) -> bool {
        self.fake
            .as_ref()
            .is_some_and(|pool| pool.contains(address))
    }
}
