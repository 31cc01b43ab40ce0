//! `--dns forward`: which name an address stands for, learned from the answers a process
//! received, so that a tunnel whose client says no name (SSH, SMTP, anything that waits for
//! the server) is still asked for by name.
//!
//! Kept **per process**: a name names only the tunnels of the process that looked it up. The
//! asker picks its resolver, so an answer is whatever the asker wants it to be: kept per cgroup,
//! one process (or a web page making a browser look up a name in its own zone) could make
//! another process's connections to an address go to a host of its choosing. Processes look up
//! the names they connect to themselves (glibc, Go, Java, curl, ssh all do); within one process
//! the latest answer for an address names it.
//!
//! Kept for the answer's time to live, clamped to [`MIN_KEEP`]..[`MAX_KEEP`] (applications
//! connect after short TTLs run out; a long one must not pin a name for a day). Bounded: each
//! tenant (cgroup and user) holds at most [`TENANT_ENTRIES`], its own oldest going first, and
//! each answer teaches at most [`ADDRESSES_PER_ANSWER`], so no tenant can crowd out the others.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::fake_pool::Tenant;
use crate::sniff::Name;

/// Shortest time a learned name is kept.
const MIN_KEEP: Duration = Duration::from_secs(60);

/// Longest time a learned name is kept, whatever the TTL.
const MAX_KEEP: Duration = Duration::from_secs(3600);

/// Most names kept in all.
const MAX_ENTRIES: usize = 1 << 16;

/// Most names one tenant keeps.
const TENANT_ENTRIES: usize = 4_096;

/// Most addresses learned from one answer.
const ADDRESSES_PER_ANSWER: usize = 32;

/// Who learned it, and the address: a process (its host pid) of a cgroup.
type Key = (u64, u32, IpAddr);

#[derive(Debug, Default)]
struct Entries {
    names: HashMap<Key, (Name, Instant, Tenant)>,
    /// Each tenant's keys, oldest first (a key learned again moves to the back lazily: stale
    /// positions are skipped when evicting).
    by_tenant: HashMap<Tenant, VecDeque<Key>>,
    /// When expired entries were last swept.
    swept: Option<Instant>,
}

/// Names by process and address.
#[derive(Debug, Default)]
pub(crate) struct Learned {
    entries: Mutex<Entries>,
}

impl Learned {
    /// Remembers that, for process `pid` of `tenant`, each of `addresses` stands for `name`
    /// (each with its time to live, in seconds).
    pub(crate) fn learn(&self, tenant: Tenant, pid: u32, name: &Name, addresses: &[(IpAddr, u32)]) {
        let now = Instant::now();
        let Ok(mut guard) = self.entries.lock() else {
            return;
        };
        let entries = &mut *guard;
        for &(address, ttl) in addresses.iter().take(ADDRESSES_PER_ANSWER) {
            let key = (tenant.0, pid, address);
            let keep = Duration::from_secs(ttl.into()).clamp(MIN_KEEP, MAX_KEEP);
            let known = entries.names.contains_key(&key);
            let queue = entries.by_tenant.entry(tenant).or_default();
            if !known && queue.len() >= TENANT_ENTRIES {
                // The tenant's own oldest goes (skipping keys already gone).
                while let Some(old) = queue.pop_front() {
                    if entries.names.remove(&old).is_some() {
                        break;
                    }
                }
            }
            if !known && entries.names.len() >= MAX_ENTRIES {
                // At most one sweep a second, so a full table costs nothing per answer.
                if entries
                    .swept
                    .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
                {
                    entries.names.retain(|_, (_, until, _)| *until > now);
                    entries.swept = Some(now);
                }
                if entries.names.len() >= MAX_ENTRIES {
                    return;
                }
            }
            let queue = entries.by_tenant.entry(tenant).or_default();
            if !known {
                queue.push_back(key);
            }
            entries
                .names
                .insert(key, (name.clone(), now + keep, tenant));
        }
    }

    /// The name `address` stands for in process `pid` of `cgroup`, if one was learned and is
    /// still kept.
    pub(crate) fn name(&self, cgroup: u64, pid: u32, address: IpAddr) -> Option<Name> {
        let entries = self.entries.lock().ok()?;
        let (name, until, _) = entries.names.get(&(cgroup, pid, address))?;
        (*until > Instant::now()).then(|| name.clone())
    }

    /// How many names are kept.
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().map_or(0, |entries| entries.names.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Name {
        Name::parse(text).unwrap()
    }

    #[test]
    fn names_are_kept_per_process_and_the_latest_wins() {
        let learned = Learned::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let tenant = (1, 1000);
        learned.learn(tenant, 10, &name("a.test"), &[(ip, 0)]);
        assert_eq!(learned.name(1, 10, ip), Some(name("a.test")));
        // Another process of the same cgroup and user, or another cgroup: nothing.
        assert_eq!(learned.name(1, 11, ip), None);
        assert_eq!(learned.name(2, 10, ip), None);
        learned.learn(tenant, 10, &name("b.test"), &[(ip, 300)]);
        assert_eq!(learned.name(1, 10, ip), Some(name("b.test")));
        assert_eq!(learned.len(), 1);
    }

    #[test]
    fn a_tenant_cannot_crowd_out_the_others() {
        let learned = Learned::default();
        let victim: IpAddr = "192.0.2.1".parse().unwrap();
        learned.learn((1, 1000), 10, &name("legit.test"), &[(victim, 3600)]);
        // One answer teaches at most 32 addresses; one tenant keeps at most its quota.
        for round in 0..200u32 {
            let addresses: Vec<(IpAddr, u32)> = (0..4000u32)
                .map(|i| (IpAddr::from((round << 12 | i).to_be_bytes()), 86_400))
                .collect();
            learned.learn((2, 1001), 20, &name("many.test"), &addresses);
        }
        assert!(learned.len() <= TENANT_ENTRIES + 1, "{}", learned.len());
        assert_eq!(learned.name(1, 10, victim), Some(name("legit.test")));
    }
}
