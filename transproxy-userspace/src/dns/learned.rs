//! `--dns forward`: which name an address stands for, learned from the answers the cgroup's
//! processes received, so that a tunnel whose client says no name (SSH, SMTP, anything that
//! waits for the server) is still asked for by name.
//!
//! Kept per cgroup: what one cgroup's resolver said does not name another cgroup's tunnels.
//! Kept for the answer's time to live, and at least [`MIN_KEEP`]: applications connect after
//! the answer's TTL has run out more often than not (browsers and the JVM cache answers past
//! it). When several names share an address (a CDN), the latest answer names it: the one
//! that was just looked up is the one about to be connected to.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::sniff::Name;

/// Shortest time a learned name is kept.
const MIN_KEEP: Duration = Duration::from_secs(60);

/// Longest time a learned name is kept, whatever the TTL.
const MAX_KEEP: Duration = Duration::from_secs(24 * 3600);

/// Most names kept; past that, expired ones are swept, and if none had expired new ones are
/// not learned until some do.
const MAX_ENTRIES: usize = 1 << 16;

/// Names by cgroup and address.
#[derive(Debug, Default)]
pub(crate) struct Learned {
    entries: Mutex<HashMap<(u64, IpAddr), (Name, Instant)>>,
}

impl Learned {
    /// Remembers that, for processes of `cgroup`, `address` stands for `name` for `ttl`
    /// seconds.
    pub(crate) fn learn(&self, cgroup: u64, address: IpAddr, name: &Name, ttl: u32) {
        let now = Instant::now();
        let keep = Duration::from_secs(ttl.into()).clamp(MIN_KEEP, MAX_KEEP);
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(&(cgroup, address)) {
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert((cgroup, address), (name.clone(), now + keep));
    }

    /// The name `address` stands for in `cgroup`, if one was learned and is still kept.
    pub(crate) fn name(&self, cgroup: u64, address: IpAddr) -> Option<Name> {
        let entries = self.entries.lock().ok()?;
        let (name, until) = entries.get(&(cgroup, address))?;
        (*until > Instant::now()).then(|| name.clone())
    }

    /// How many names are kept.
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().map_or(0, |entries| entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kept_per_cgroup_and_the_latest_wins() {
        let learned = Learned::default();
        let (a, b) = (
            Name::parse("a.test").unwrap(),
            Name::parse("b.test").unwrap(),
        );
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        learned.learn(1, ip, &a, 0);
        assert_eq!(learned.name(1, ip), Some(a));
        assert_eq!(learned.name(2, ip), None);
        learned.learn(1, ip, &b, 300);
        assert_eq!(learned.name(1, ip), Some(b));
        assert_eq!(learned.len(), 1);
    }
}
