//! `--dns fake`: the addresses handed out for names, and the name behind each.
//!
//! A name gets the same address for as long as it keeps it: the next free address of the
//! pool at its first query, then always that one. When the pool is used up, addresses are
//! taken back oldest first, but never one an open tunnel still uses ([`Lease`]). A SIGHUP
//! keeps everything; a restart forgets it (an application that cached an answer from before
//! gets a reset until it asks again, which the short time to live of fake answers makes soon).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::sniff::Name;

/// Most addresses handed out per family, whatever the pool's size: names are kept in memory
/// (about 100 bytes each).
const MAX_NAMES: u64 = 1 << 17;

/// How many addresses, at most, are looked at to find one to take back: all of them in use by
/// open tunnels means the pool is too small for the load, and the query fails.
const RECLAIM_TRIES: u64 = 256;

/// The fake addresses of one family: address `i` is the pool's network plus `i`.
#[derive(Debug)]
struct Ring {
    /// The first usable index and how many there are (the network's first and last addresses
    /// are left out).
    first: u64,
    len: u64,
    /// Where the next address is taken.
    next: u64,
    /// The name of each index handed out.
    names: HashMap<u64, Name>,
    /// The open tunnels to each index in use.
    in_use: HashMap<u64, u32>,
}

impl Ring {
    fn new(size: u64) -> Self {
        let len = size.saturating_sub(2).min(MAX_NAMES);
        Self {
            first: 1,
            len,
            next: 0,
            names: HashMap::new(),
            in_use: HashMap::new(),
        }
    }

    /// Takes an index for `name`: the next never used, or the oldest not in use. Returns it
    /// and the name it held before.
    fn take(&mut self, name: &Name) -> Option<(u64, Option<Name>)> {
        for _ in 0..RECLAIM_TRIES.min(self.len) {
            let index = self.first + self.next;
            self.next = (self.next + 1) % self.len;
            if self.in_use.contains_key(&index) {
                continue;
            }
            let old = self.names.insert(index, name.clone());
            return Some((index, old));
        }
        None
    }
}

/// Both families' addresses and the names behind them.
#[derive(Debug)]
struct Pools {
    v4: Option<(Ipv4Net, Ring)>,
    v6: Option<(Ipv6Net, Ring)>,
    /// Each name's index, per family.
    by_name: HashMap<Name, (Option<u64>, Option<u64>)>,
}

/// The fake addresses, shared by the DNS responder (which hands them out) and the tunnels
/// (which look the names up).
#[derive(Debug)]
pub(crate) struct FakePool {
    v4: Option<Ipv4Net>,
    v6: Option<Ipv6Net>,
    pools: Mutex<Pools>,
}

/// An open tunnel's hold on its fake address: the address is not handed to another name until
/// every lease on it is dropped.
#[derive(Debug)]
pub(crate) struct Lease {
    pool: Arc<FakePool>,
    address: IpAddr,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(self.address);
    }
}

impl FakePool {
    pub(crate) fn new(v4: Option<Ipv4Net>, v6: Option<Ipv6Net>) -> Self {
        let size = |bits: u8| 1u64.checked_shl(u32::from(bits)).unwrap_or(u64::MAX);
        Self {
            v4,
            v6,
            pools: Mutex::new(Pools {
                v4: v4.map(|net| (net, Ring::new(size(32 - net.prefix_len())))),
                v6: v6.map(|net| (net, Ring::new(size(128 - net.prefix_len())))),
                by_name: HashMap::new(),
            }),
        }
    }

    /// The networks, for the kernel and the ready line.
    pub(crate) fn networks(&self) -> (Option<Ipv4Net>, Option<Ipv6Net>) {
        (self.v4, self.v6)
    }

    /// Whether `address` is one this pool hands out.
    pub(crate) fn contains(&self, address: IpAddr) -> bool {
        match address {
            IpAddr::V4(ip) => self.v4.is_some_and(|net| net.contains(&ip)),
            IpAddr::V6(ip) => self.v6.is_some_and(|net| net.contains(&ip)),
        }
    }

    /// The address of `name` in the family of `v6`, handed out now if it has none. `None`: no
    /// pool of that family, or every address is in use.
    pub(crate) fn address(&self, name: &Name, v6: bool) -> Option<IpAddr> {
        let mut guard = self.pools.lock().ok()?;
        let pools = &mut *guard;
        let held = pools.by_name.get(name).copied().unwrap_or_default();
        if v6 {
            let (net, ring) = pools.v6.as_mut()?;
            let index = match held.1 {
                Some(index) => index,
                None => {
                    let (index, old) = ring.take(name)?;
                    forget(&mut pools.by_name, old, true);
                    pools.by_name.entry(name.clone()).or_default().1 = Some(index);
                    index
                }
            };
            Some(IpAddr::V6(v6_at(*net, index)))
        } else {
            let (net, ring) = pools.v4.as_mut()?;
            let index = match held.0 {
                Some(index) => index,
                None => {
                    let (index, old) = ring.take(name)?;
                    forget(&mut pools.by_name, old, false);
                    pools.by_name.entry(name.clone()).or_default().0 = Some(index);
                    index
                }
            };
            Some(IpAddr::V4(v4_at(*net, index)))
        }
    }

    /// The name behind `address`, with a lease that keeps the address its own while held.
    pub(crate) fn lease(self: &Arc<Self>, address: IpAddr) -> Option<(Name, Lease)> {
        let mut pools = self.pools.lock().ok()?;
        let ring = match address {
            IpAddr::V4(ip) => {
                let (net, ring) = pools.v4.as_mut()?;
                (
                    u64::from(ip.to_bits().wrapping_sub(net.network().to_bits())),
                    ring,
                )
            }
            IpAddr::V6(ip) => {
                let (net, ring) = pools.v6.as_mut()?;
                let offset = ip.to_bits().wrapping_sub(net.network().to_bits());
                (u64::try_from(offset).ok()?, ring)
            }
        };
        let (index, ring) = ring;
        let name = ring.names.get(&index)?.clone();
        *ring.in_use.entry(index).or_default() += 1;
        Some((
            name,
            Lease {
                pool: Arc::clone(self),
                address,
            },
        ))
    }

    /// How many names have an address.
    pub(crate) fn len(&self) -> usize {
        self.pools.lock().map_or(0, |pools| pools.by_name.len())
    }

    fn release(&self, address: IpAddr) {
        let Ok(mut pools) = self.pools.lock() else {
            return;
        };
        let found = match address {
            IpAddr::V4(ip) => pools.v4.as_mut().map(|(net, ring)| {
                (
                    u64::from(ip.to_bits().wrapping_sub(net.network().to_bits())),
                    ring,
                )
            }),
            IpAddr::V6(ip) => pools.v6.as_mut().and_then(|(net, ring)| {
                let offset = ip.to_bits().wrapping_sub(net.network().to_bits());
                Some((u64::try_from(offset).ok()?, ring))
            }),
        };
        if let Some((index, ring)) = found
            && let Some(count) = ring.in_use.get_mut(&index)
        {
            *count -= 1;
            if *count == 0 {
                ring.in_use.remove(&index);
            }
        }
    }
}

/// A name lost its address of one family to another name.
fn forget(by_name: &mut HashMap<Name, (Option<u64>, Option<u64>)>, old: Option<Name>, v6: bool) {
    let Some(old) = old else { return };
    if let Some(held) = by_name.get_mut(&old) {
        if v6 {
            held.1 = None;
        } else {
            held.0 = None;
        }
        if *held == (None, None) {
            by_name.remove(&old);
        }
    }
}

fn v4_at(net: Ipv4Net, index: u64) -> Ipv4Addr {
    Ipv4Addr::from_bits(net.network().to_bits().wrapping_add(index as u32))
}

fn v6_at(net: Ipv6Net, index: u64) -> Ipv6Addr {
    Ipv6Addr::from_bits(net.network().to_bits().wrapping_add(u128::from(index)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Name {
        Name::parse(text).unwrap()
    }

    #[test]
    fn a_name_keeps_its_address_and_the_address_its_name() {
        let pool = Arc::new(FakePool::new(
            Some("198.18.0.0/15".parse().unwrap()),
            Some("fc00::/18".parse().unwrap()),
        ));
        let a = pool.address(&name("a.test"), false).unwrap();
        assert_eq!(a, "198.18.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(pool.address(&name("a.test"), false), Some(a));
        let b = pool.address(&name("b.test"), false).unwrap();
        assert_ne!(a, b);
        let a6 = pool.address(&name("a.test"), true).unwrap();
        assert_eq!(a6, "fc00::1".parse::<IpAddr>().unwrap());
        assert!(pool.contains(a) && pool.contains(a6));
        assert!(!pool.contains("198.20.0.1".parse().unwrap()));
        assert_eq!(pool.lease(a).unwrap().0, name("a.test"));
        assert_eq!(pool.lease(a6).unwrap().0, name("a.test"));
        assert!(pool.lease("198.18.3.3".parse().unwrap()).is_none());
        assert_eq!(pool.len(), 2);
    }

    #[test]
    fn a_full_pool_takes_back_the_oldest_address_not_in_use() {
        // A /29: 6 usable addresses.
        let pool = Arc::new(FakePool::new(Some("198.18.0.0/29".parse().unwrap()), None));
        let first: Vec<IpAddr> = (0..6)
            .map(|i| pool.address(&name(&format!("n{i}.test")), false).unwrap())
            .collect();
        assert_eq!(first[5], "198.18.0.6".parse::<IpAddr>().unwrap());
        // n0's address is in a tunnel: the 7th name gets n1's.
        let lease = pool.lease(first[0]).unwrap();
        let seventh = pool.address(&name("n6.test"), false).unwrap();
        assert_eq!(seventh, first[1]);
        assert_eq!(pool.lease(first[1]).unwrap().0, name("n6.test"));
        // n1 lost it: asked again, it gets a new one.
        assert_ne!(pool.address(&name("n1.test"), false).unwrap(), first[1]);
        assert_eq!(pool.lease(first[0]).unwrap().0, name("n0.test"));
        drop(lease);
        // No IPv6 pool: no AAAA.
        assert!(pool.address(&name("n0.test"), true).is_none());
    }

    #[test]
    fn every_address_in_use_fails_the_query() {
        let pool = Arc::new(FakePool::new(Some("198.18.0.0/29".parse().unwrap()), None));
        let leases: Vec<Lease> = (0..6)
            .map(|i| {
                let address = pool.address(&name(&format!("n{i}.test")), false).unwrap();
                pool.lease(address).unwrap().1
            })
            .collect();
        assert!(pool.address(&name("more.test"), false).is_none());
        drop(leases);
        assert!(pool.address(&name("more.test"), false).is_some());
    }
}
