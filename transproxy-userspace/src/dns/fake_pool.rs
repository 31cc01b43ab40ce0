//! `--dns fake`: the addresses handed out for names, and the name behind each.
//!
//! Addresses are handed out per *tenant*, the cgroup and user that asked: each tenant has its
//! own names, and what one asks tells and changes nothing for another (a shared ring would let
//! one tenant wrap it in seconds and give another's cached address to a name of its choice, and
//! would show by its order which names others had asked for). A name keeps its address for as
//! long as its tenant keeps it: a tenant holds at most [`TENANT_NAMES`] names per family, and
//! past that its own least recently answered name not in a tunnel gives its address back.
//! Addresses come from the pool in random order, and one given back rests [`COOLDOWN`] before
//! anyone gets it again, longer than applications keep answers. A SIGHUP keeps everything; a
//! restart forgets it (an application that cached an answer from before gets a reset until it
//! asks again, which the short time to live of fake answers makes soon).

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::sniff::Name;

/// Most addresses used per family, whatever the pool's size: each is kept in memory.
const MAX_ADDRESSES: u64 = 1 << 17;

/// Most names one tenant holds per family.
const TENANT_NAMES: usize = 4_096;

/// How long an address given back rests before it is handed out again.
const COOLDOWN: Duration = Duration::from_secs(600);

/// Who asked: a cgroup (its id) and a user.
pub(crate) type Tenant = (u64, u32);

/// What an address holds.
#[derive(Debug)]
struct Slot {
    name: Name,
    /// Open tunnels to it: it is not given back while any is.
    in_use: u32,
}

/// One tenant's names in one family.
#[derive(Debug, Default)]
struct TenantNames {
    /// Each name's address index and when it was last answered (a sequence number).
    names: HashMap<Name, (u32, u64)>,
    /// `(sequence, name)` in answer order; entries whose sequence is stale are skipped.
    order: VecDeque<(u64, Name)>,
}

/// The addresses of one family: address `i` is the pool's network plus `i`.
#[derive(Debug)]
struct Family {
    /// Indexes never handed out (or rested), in random order.
    free: Vec<u32>,
    /// Indexes given back, with when.
    cooling: VecDeque<(u32, Instant)>,
    slots: HashMap<u32, Slot>,
    tenants: HashMap<Tenant, TenantNames>,
    /// Increases with every answer.
    sequence: u64,
}

impl Family {
    fn new(size: u64, seed: u64) -> Self {
        // The network's first and last addresses are left out.
        let len = size.saturating_sub(2).min(MAX_ADDRESSES) as u32;
        let mut free: Vec<u32> = (1..=len).collect();
        // Fisher-Yates with xorshift: unpredictable enough that the order tells nothing.
        let mut state = seed | 1;
        for i in (1..free.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            free.swap(i, (state % (i as u64 + 1)) as usize);
        }
        Self {
            free,
            cooling: VecDeque::new(),
            slots: HashMap::new(),
            tenants: HashMap::new(),
            sequence: 0,
        }
    }

    /// The index of `name` for `tenant`, handed out now if it has none.
    fn index(&mut self, tenant: Tenant, name: &Name) -> Option<u32> {
        self.sequence += 1;
        let sequence = self.sequence;
        let names = self.tenants.entry(tenant).or_default();
        if let Some((index, seen)) = names.names.get_mut(name) {
            *seen = sequence;
            let index = *index;
            names.order.push_back((sequence, name.clone()));
            names.compact();
            return Some(index);
        }
        if names.names.len() >= TENANT_NAMES {
            self.give_back_oldest(tenant);
        }
        let index = self.take()?;
        self.slots.insert(
            index,
            Slot {
                name: name.clone(),
                in_use: 0,
            },
        );
        let names = self.tenants.entry(tenant).or_default();
        names.names.insert(name.clone(), (index, sequence));
        names.order.push_back((sequence, name.clone()));
        Some(index)
    }

    /// A free index, or a rested one.
    fn take(&mut self) -> Option<u32> {
        if let Some(index) = self.free.pop() {
            return Some(index);
        }
        let (_, since) = self.cooling.front()?;
        if since.elapsed() < COOLDOWN {
            return None;
        }
        self.cooling.pop_front().map(|(index, _)| index)
    }

    /// `tenant`'s least recently answered name not in a tunnel gives its address back.
    fn give_back_oldest(&mut self, tenant: Tenant) {
        let Some(names) = self.tenants.get_mut(&tenant) else {
            return;
        };
        let mut kept = Vec::new();
        while let Some((sequence, name)) = names.order.pop_front() {
            let Some(&(index, seen)) = names.names.get(&name) else {
                continue;
            };
            if seen != sequence {
                continue;
            }
            if self.slots.get(&index).is_some_and(|slot| slot.in_use > 0) {
                kept.push((sequence, name));
                continue;
            }
            names.names.remove(&name);
            self.slots.remove(&index);
            self.cooling.push_back((index, Instant::now()));
            break;
        }
        for entry in kept.into_iter().rev() {
            names.order.push_front(entry);
        }
    }
}

impl TenantNames {
    /// Drops the stale entries of `order` once they outnumber the live ones: a name answered
    /// again and again must not grow it without bound.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.names.len() + 64 {
            let live = &self.names;
            self.order
                .retain(|(sequence, name)| live.get(name).is_some_and(|(_, s)| s == sequence));
        }
    }
}

/// Both families' addresses and the names behind them.
#[derive(Debug)]
struct Pools {
    v4: Option<(Ipv4Net, Family)>,
    v6: Option<(Ipv6Net, Family)>,
}

/// The fake addresses, shared by the DNS responder (which hands them out) and the tunnels
/// (which look the names up).
#[derive(Debug)]
pub(crate) struct FakePool {
    v4: Option<Ipv4Net>,
    v6: Option<Ipv6Net>,
    pools: Mutex<Pools>,
}

/// An open tunnel's hold on its fake address: the address stays its name's until every lease
/// on it is dropped.
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
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 32;
        Self {
            v4,
            v6,
            pools: Mutex::new(Pools {
                v4: v4.map(|net| (net, Family::new(size(32 - net.prefix_len()), seed))),
                v6: v6.map(|net| {
                    let seed = seed.rotate_left(17);
                    (net, Family::new(size(128 - net.prefix_len()), seed))
                }),
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

    /// `tenant`'s address for `name` in the family of `v6`, handed out now if it has none.
    /// `None`: no pool of that family, or none free (every address rests or holds a name).
    pub(crate) fn address(&self, tenant: Tenant, name: &Name, v6: bool) -> Option<IpAddr> {
        let mut pools = self.pools.lock().ok()?;
        if v6 {
            let (net, family) = pools.v6.as_mut()?;
            let index = family.index(tenant, name)?;
            Some(IpAddr::V6(Ipv6Addr::from_bits(
                net.network().to_bits() + u128::from(index),
            )))
        } else {
            let (net, family) = pools.v4.as_mut()?;
            let index = family.index(tenant, name)?;
            Some(IpAddr::V4(Ipv4Addr::from_bits(
                net.network().to_bits().wrapping_add(index),
            )))
        }
    }

    /// The name behind `address`, with a lease that keeps the address its own while held.
    pub(crate) fn lease(self: &Arc<Self>, address: IpAddr) -> Option<(Name, Lease)> {
        let mut pools = self.pools.lock().ok()?;
        let (index, family) = locate(&mut pools, address)?;
        let slot = family.slots.get_mut(&index)?;
        slot.in_use += 1;
        let name = slot.name.clone();
        Some((
            name,
            Lease {
                pool: Arc::clone(self),
                address,
            },
        ))
    }

    /// How many addresses hold a name.
    pub(crate) fn len(&self) -> usize {
        self.pools.lock().map_or(0, |pools| {
            pools.v4.as_ref().map_or(0, |(_, f)| f.slots.len())
                + pools.v6.as_ref().map_or(0, |(_, f)| f.slots.len())
        })
    }

    fn release(&self, address: IpAddr) {
        let Ok(mut pools) = self.pools.lock() else {
            return;
        };
        if let Some((index, family)) = locate(&mut pools, address)
            && let Some(slot) = family.slots.get_mut(&index)
        {
            slot.in_use = slot.in_use.saturating_sub(1);
        }
    }
}

/// The index and family of `address`, if it is in a pool.
fn locate(pools: &mut Pools, address: IpAddr) -> Option<(u32, &mut Family)> {
    match address {
        IpAddr::V4(ip) => {
            let (net, family) = pools.v4.as_mut()?;
            net.contains(&ip)
                .then(|| (ip.to_bits().wrapping_sub(net.network().to_bits()), family))
        }
        IpAddr::V6(ip) => {
            let (net, family) = pools.v6.as_mut()?;
            if !net.contains(&ip) {
                return None;
            }
            let offset = u32::try_from(ip.to_bits() - net.network().to_bits()).ok()?;
            Some((offset, family))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Name {
        Name::parse(text).unwrap()
    }

    const A: Tenant = (1, 1000);
    const B: Tenant = (1, 1001);

    #[test]
    fn a_name_keeps_its_address_and_the_address_its_name() {
        let pool = Arc::new(FakePool::new(
            Some("198.18.0.0/15".parse().unwrap()),
            Some("fc00::/18".parse().unwrap()),
        ));
        let a = pool.address(A, &name("a.test"), false).unwrap();
        assert!(pool.contains(a));
        assert_eq!(pool.address(A, &name("a.test"), false), Some(a));
        let b = pool.address(A, &name("b.test"), false).unwrap();
        assert_ne!(a, b);
        let a6 = pool.address(A, &name("a.test"), true).unwrap();
        assert!(pool.contains(a6) && a6.to_string().starts_with("fc00:"));
        assert!(!pool.contains("198.20.0.1".parse().unwrap()));
        assert_eq!(pool.lease(a).unwrap().0, name("a.test"));
        assert_eq!(pool.lease(a6).unwrap().0, name("a.test"));
        assert_eq!(pool.len(), 3);
    }

    #[test]
    fn tenants_have_their_own_addresses_and_cannot_take_others() {
        // A /28: 14 usable addresses.
        let pool = Arc::new(FakePool::new(Some("198.18.0.0/28".parse().unwrap()), None));
        let victim = pool.address(A, &name("legit.test"), false).unwrap();
        // Another tenant asking the same name gets another address: it learns nothing.
        assert_ne!(pool.address(B, &name("legit.test"), false).unwrap(), victim);
        // B uses up every address: none of A's is taken, B's queries fail instead.
        let taken: Vec<Option<IpAddr>> = (0..20)
            .map(|i| pool.address(B, &name(&format!("junk{i}.test")), false))
            .collect();
        assert!(taken.iter().flatten().all(|a| *a != victim));
        assert!(taken.iter().any(Option::is_none));
        assert_eq!(pool.lease(victim).unwrap().0, name("legit.test"));
        assert_eq!(pool.address(A, &name("legit.test"), false), Some(victim));
    }

    #[test]
    fn a_tenant_over_its_quota_gives_back_its_own_oldest_name() {
        let pool = Arc::new(FakePool::new(Some("198.18.0.0/15".parse().unwrap()), None));
        let first = pool.address(A, &name("first.test"), false).unwrap();
        let second = pool.address(A, &name("second.test"), false).unwrap();
        let lease = pool.lease(second).unwrap();
        for i in 0..TENANT_NAMES - 1 {
            pool.address(A, &name(&format!("n{i}.test")), false)
                .unwrap();
        }
        // first.test was given back (and rests); second.test is in a tunnel and kept.
        assert!(pool.lease(first).is_none());
        assert_eq!(pool.lease(second).unwrap().0, name("second.test"));
        drop(lease);
        assert_ne!(pool.address(A, &name("first.test"), false), Some(first));
    }
}
