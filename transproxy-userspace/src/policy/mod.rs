//! What is intercepted: the user's rules and NO_PROXY, the built-in exclusions and the sockets
//! never intercepted, owned by one [`Policy`] that compiles to what the kernel maps hold
//! ([`Policy::compile`]).
//!
//! A connection is intercepted when it matches an include (or no include was given) and matches
//! no exclude, the way `NO_PROXY` behaves. Some exclusions are built in and always apply: the
//! proxy itself and the listeners (else traffic would loop), link-local and multicast, and
//! loopback unless an include names it.
//!
//! The kernel decides from one LPM trie per address family and the per-port verdict in
//! `transproxy_common::intercepts`; [`Policy::intercepts`] is the same decision written plainly,
//! which the tests check the compiled tries against.

mod no_proxy;
mod rule;

use std::{
    collections::BTreeSet,
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use anyhow::bail;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
pub use no_proxy::{DirectNames, NoProxy};
use rule::ALL_PORTS;
pub use rule::Rule;
use transproxy_common::{
    MAX_EXCLUDED_IDS, MAX_PORT_RULES, MAX_RULE_PREFIXES, PortRule, PortRules, Settings, verdict,
};

/// Loopback, IPv4 and IPv6: excluded unless an include names it (local services and tests).
const LOOPBACK: [IpNet; 2] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
];

/// Never intercepted: "this network" (0.0.0.0/8 connects locally) and the unspecified IPv6
/// address, link-local (cloud metadata, zeroconf), multicast and broadcast, none of which a
/// proxy can reach.
const NEVER: [IpNet; 7] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 8)),
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16)),
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4)),
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::BROADCAST, 32)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 128)),
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
    )),
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
    )),
];

/// Address family of a rules trie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// The complete interception policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    includes: Vec<Rule>,
    /// The user's excludes and NO_PROXY's; the built-in ones are added when compiled.
    excludes: Vec<Rule>,
    /// Users and (primary) groups whose connections are never intercepted.
    exclude_uids: Vec<u32>,
    exclude_gids: Vec<u32>,
    /// Sockets never intercepted whatever the rules: the proxy's (its own traffic would loop,
    /// and a client set to use it directly must reach it) and the listeners'. The proxy's
    /// change when its host name moves.
    never: Vec<SocketAddr>,
    /// Hosts never intercepted on any port: in gateway mode, the gateway's own addresses (its
    /// own services stay its own).
    never_hosts: Vec<std::net::IpAddr>,
    /// A proxy on this host, inside the intercepted cgroup: its cgroup or its user, exempt so
    /// that its own connections do not loop.
    local_proxy: LocalProxyExemption,
}

/// What keeps a local proxy's connections out of interception (see `crate::local_proxy`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalProxyExemption {
    pub cgroup: Option<u64>,
    pub uid: Option<u32>,
    /// Its processes (thread-group ids), exempt while they run.
    pub pids: Vec<u32>,
}

/// A policy as the kernel maps hold it, checked to fit.
pub(crate) struct KernelRules {
    /// LPM trie entries: for every prefix named by some rule, all rules whose network contains
    /// it (see [`PortRules`] for why the copies are needed).
    pub(crate) v4: Vec<(IpNet, PortRules)>,
    pub(crate) v6: Vec<(IpNet, PortRules)>,
    pub(crate) exclude_uids: Vec<u32>,
    pub(crate) exclude_gids: Vec<u32>,
    pub(crate) exclude_cgroups: Vec<u64>,
    pub(crate) exclude_pids: Vec<u32>,
    pub(crate) settings: Settings,
}

impl Policy {
    /// The user's rules: `excludes` includes NO_PROXY's.
    pub fn new(includes: Vec<Rule>, excludes: Vec<Rule>) -> Self {
        Self {
            includes,
            excludes,
            ..Self::default()
        }
    }

    /// The same policy, also exempting these users and groups.
    pub fn with_excluded_ids(mut self, uids: Vec<u32>, gids: Vec<u32>) -> Self {
        self.exclude_uids = uids;
        self.exclude_gids = gids;
        self
    }

    /// The same policy with `never` as the sockets never intercepted.
    pub fn with_never(mut self, never: Vec<SocketAddr>) -> Self {
        self.never = never;
        self
    }

    /// The same policy with `hosts` never intercepted, on any port.
    pub fn with_never_hosts(mut self, hosts: Vec<std::net::IpAddr>) -> Self {
        self.never_hosts = hosts;
        self
    }

    /// The same policy, with a local proxy kept out of interception this way.
    pub fn with_local_proxy(mut self, exemption: LocalProxyExemption) -> Self {
        self.local_proxy = exemption;
        self
    }

    /// `other`'s rules (a reloaded config), with what this policy found at run time: the
    /// never-intercepted sockets and the local proxy's exemption.
    pub(crate) fn with_rules_of(&self, other: &Self) -> Self {
        other
            .clone()
            .with_never(self.never.clone())
            .with_never_hosts(self.never_hosts.clone())
            .with_local_proxy(self.local_proxy.clone())
    }

    /// Every exclusion the kernel applies: the user's, the built-in ones (loopback unless an
    /// include names it), and the never-intercepted sockets.
    fn all_excludes(&self) -> Vec<Rule> {
        let mut all = self.excludes.clone();
        for loopback in LOOPBACK {
            let named = self
                .includes
                .iter()
                .any(|rule| rule.net.contains(&loopback) || loopback.contains(&rule.net));
            if !named {
                all.push(Rule::new(loopback, ALL_PORTS));
            }
        }
        all.extend(NEVER.map(|net| Rule::new(net, ALL_PORTS)));
        all.extend(self.never.iter().copied().map(Rule::socket));
        all.extend(
            self.never_hosts
                .iter()
                .map(|ip| Rule::new(IpNet::from(ip.to_canonical()), ALL_PORTS)),
        );
        all
    }

    /// The decision, stated plainly: the tests check that the kernel's agrees.
    #[cfg(test)]
    fn intercepts(&self, dst: SocketAddr) -> bool {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        let included = self.includes.is_empty() || self.includes.iter().any(|r| r.matches(dst));
        included && !self.all_excludes().iter().any(|r| r.matches(dst))
    }

    /// The policy as the kernel maps hold it. Fails, changing nothing, when it does not fit:
    /// more networks than a trie holds, more rules overlapping one network than a trie entry
    /// carries, more excluded ids than their sets hold.
    pub(crate) fn compile(&self) -> anyhow::Result<KernelRules> {
        for (kind, ids) in [
            ("users", &self.exclude_uids),
            ("groups", &self.exclude_gids),
        ] {
            if ids.len() > MAX_EXCLUDED_IDS as usize {
                bail!(
                    "{} excluded {kind}; at most {MAX_EXCLUDED_IDS} fit",
                    ids.len()
                );
            }
        }
        let excludes = self.all_excludes();
        let mut exclude_uids = self.exclude_uids.clone();
        exclude_uids.extend(self.local_proxy.uid);
        Ok(KernelRules {
            v4: trie(&self.includes, &excludes, Family::V4)?,
            v6: trie(&self.includes, &excludes, Family::V6)?,
            exclude_uids,
            exclude_gids: self.exclude_gids.clone(),
            exclude_cgroups: self.local_proxy.cgroup.into_iter().collect(),
            exclude_pids: self.local_proxy.pids.clone(),
            settings: Settings {
                has_includes: u32::from(!self.includes.is_empty()),
            },
        })
    }

    /// Checks that the policy fits the kernel maps, so a bad rule set is refused before
    /// anything is attached or replaced.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.compile().map(drop)
    }

    /// One line for the ready message: what is intercepted.
    pub(crate) fn describe(&self) -> String {
        let list = |rules: &[Rule]| {
            rules
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let what = if self.includes.is_empty() {
            "all TCP destinations".to_owned()
        } else {
            format!("TCP to {}", list(&self.includes))
        };
        let ids = |kind: &str, ids: &[u32]| {
            if ids.is_empty() {
                String::new()
            } else {
                let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
                format!(" and {kind} {}", ids.join(", "))
            }
        };
        format!(
            "{what} except {}{}{}",
            list(&self.all_excludes()),
            ids("connections of uid", &self.exclude_uids),
            ids("gid", &self.exclude_gids)
        )
    }
}

/// The rules of one family as LPM trie entries: for every prefix named by some rule, all rules
/// whose network contains it.
fn trie(
    includes: &[Rule],
    excludes: &[Rule],
    family: Family,
) -> anyhow::Result<Vec<(IpNet, PortRules)>> {
    let tagged: Vec<(&Rule, u32)> = includes
        .iter()
        .map(|r| (r, verdict::INCLUDE))
        .chain(excludes.iter().map(|r| (r, verdict::EXCLUDE)))
        .filter(|(rule, _)| {
            matches!(
                (rule.net, family),
                (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6)
            )
        })
        .collect();
    let prefixes: BTreeSet<IpNet> = tagged.iter().map(|(rule, _)| rule.net).collect();
    if prefixes.len() > MAX_RULE_PREFIXES as usize {
        bail!(
            "the rules name {} distinct {family} networks; at most {MAX_RULE_PREFIXES} fit",
            prefixes.len()
        );
    }
    prefixes
        .into_iter()
        .map(|prefix| {
            let covering: BTreeSet<(u16, u16, u32)> = tagged
                .iter()
                .filter(|(rule, _)| rule.net.contains(&prefix))
                .map(|(rule, verdict)| (*rule.ports.start(), *rule.ports.end(), *verdict))
                .collect();
            if covering.len() > MAX_PORT_RULES {
                bail!(
                    "{} rules apply to {prefix}; at most {MAX_PORT_RULES} may overlap one network",
                    covering.len()
                );
            }
            let mut value = PortRules::default();
            for (slot, (first, last, verdict)) in value.rules.iter_mut().zip(&covering) {
                *slot = PortRule {
                    first: *first,
                    last: *last,
                    verdict: *verdict,
                };
            }
            value.len = covering.len() as u32;
            Ok((prefix, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> Rule {
        text.parse().unwrap()
    }

    fn sock(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn policy(includes: &[&str], excludes: &[&str], never: &[&str]) -> Policy {
        Policy::new(
            includes.iter().map(|r| rule(r)).collect(),
            excludes.iter().map(|r| rule(r)).collect(),
        )
        .with_never(never.iter().map(|s| sock(s)).collect())
    }

    #[test]
    fn default_policy_excludes_builtins() {
        let policy = policy(&[], &[], &["192.0.2.1:3128"]);
        assert!(policy.intercepts(sock("198.51.100.7:443")));
        assert!(policy.intercepts(sock("192.0.2.1:443")));
        for never in [
            "192.0.2.1:3128",
            "127.0.0.1:80",
            "127.9.9.9:80",
            "169.254.169.254:80",
            "224.0.0.1:80",
            "0.0.0.0:80",
        ] {
            assert!(!policy.intercepts(sock(never)), "{never}");
        }
    }

    #[test]
    fn loopback_only_when_an_include_names_it() {
        let policy = policy(&["127.0.0.0/8"], &[], &["127.0.0.1:3128"]);
        assert!(policy.intercepts(sock("127.0.0.2:80")));
        assert!(
            !policy.intercepts(sock("127.0.0.1:3128")),
            "the proxy is never intercepted"
        );
        assert!(policy.intercepts(sock("127.0.0.1:3129")));
        assert!(
            !policy.intercepts(sock("198.51.100.7:80")),
            "includes restrict"
        );
    }

    #[test]
    fn exclude_wins_over_include() {
        let policy = policy(&["10.0.0.0/8"], &["10.1.0.0/16:443"], &[]);
        assert!(policy.intercepts(sock("10.1.2.3:80")));
        assert!(!policy.intercepts(sock("10.1.2.3:443")));
        assert!(policy.intercepts(sock("10.2.2.3:443")));
    }

    /// The kernel's lookup: the LPM trie's longest matching prefix (the map's own behaviour),
    /// then the one per-port decision both sides share.
    fn kernel_decision(rules: &KernelRules, dst: SocketAddr) -> bool {
        let trie = if dst.is_ipv4() { &rules.v4 } else { &rules.v6 };
        let longest = trie
            .iter()
            .filter(|(net, _)| net.contains(&dst.ip()))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, port_rules)| port_rules);
        transproxy_common::intercepts(longest, dst.port(), rules.settings.has_includes != 0)
    }

    #[test]
    fn compiled_tries_agree_with_the_plain_decision() {
        let policies = [
            policy(&[], &[], &["127.0.0.1:3128"]),
            policy(
                &["10.0.0.0/8", "10.1.2.0/24:80-90"],
                &["10.1.0.0/16:443", "10.1.2.3", "10.3.0.0/16"],
                &["10.9.9.9:3128", "127.0.0.1:15001"],
            ),
            policy(&["127.0.0.0/8"], &["127.0.0.3:1-1000"], &["127.0.0.1:3128"]),
            policy(
                &["2001:db8::/32", "::1"],
                &["[2001:db8:1::/48]:443"],
                &["[2001:db8::3128]:3128", "[::1]:15001"],
            ),
        ];
        let ips = [
            "2001:db8::1",
            "2001:db8:1::1",
            "2001:db8::3128",
            "2001:db9::1",
            "::1",
            "fe80::1",
            "ff02::1",
            "10.1.2.3",
            "10.1.2.4",
            "10.1.3.4",
            "10.3.1.1",
            "10.9.9.9",
            "11.0.0.1",
            "127.0.0.1",
            "127.0.0.3",
            "169.254.1.1",
            "224.1.1.1",
        ];
        let ports = [1, 80, 85, 91, 443, 1000, 1001, 3128, 15001, 65535];
        for policy in &policies {
            let compiled = policy.compile().unwrap();
            for ip in ips {
                for port in ports {
                    let dst = SocketAddr::new(ip.parse().unwrap(), port);
                    assert_eq!(
                        kernel_decision(&compiled, dst),
                        policy.intercepts(dst),
                        "{dst} under {policy:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn too_many_overlapping_rules_is_an_error() {
        let excludes = (1..=20).map(|p| rule(&format!("10.0.0.0/8:{p}"))).collect();
        let err = Policy::new(vec![], excludes)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("10.0.0.0/8") && err.contains("at most"),
            "{err}"
        );
    }

    /// A rule set the kernel's trie cannot hold is refused whole, before any map changes.
    #[test]
    fn more_networks_than_the_trie_holds_is_an_error() {
        let networks = |n: u32| -> Vec<Rule> {
            (0..n)
                .map(|i| rule(&format!("127.5.{}.{}/32", i / 256, i % 256)))
                .collect()
        };
        let never = vec![sock("127.0.0.1:3128")];
        assert!(
            Policy::new(networks(4_000), vec![])
                .with_never(never.clone())
                .validate()
                .is_ok()
        );
        // The built-in exclusions and the never-intercepted addresses count too.
        let err = Policy::new(networks(MAX_RULE_PREFIXES), vec![])
            .with_never(never)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("distinct IPv4 networks; at most 4096 fit"),
            "{err}"
        );
    }
}
