//! Which destinations are intercepted.
//!
//! A connection is intercepted when it matches an include (or no include was given) and matches
//! no exclude, the way `NO_PROXY` behaves. Some exclusions are built in and always apply: the
//! proxy itself and the listener (else traffic would loop), link-local and multicast, and
//! loopback unless an include names it.
//!
//! The kernel evaluates the rules from one LPM trie per address family ([`Rules::trie`]);
//! [`Rules::intercepts`] is the same decision written plainly, used for tests and as the
//! specification.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    str::FromStr,
};

use anyhow::{anyhow, bail};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use transproxy_common::{
    MAX_EXCLUDED_IDS, MAX_PORT_RULES, MAX_RULE_PREFIXES, PortRule, PortRules, verdict,
};

/// `CIDR[:PORT[-PORT]]`: destinations in a network, optionally on a port range.
///
/// IPv6 networks with a port are written in brackets: `[2001:db8::/32]:443`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub net: IpNet,
    pub ports: RangeInclusive<u16>,
}

const ALL_PORTS: RangeInclusive<u16> = 1..=u16::MAX;

impl Rule {
    fn new(net: IpNet, ports: RangeInclusive<u16>) -> Self {
        Self {
            net: net.trunc(),
            ports,
        }
    }

    /// A single address and port, as for the proxy and the listener.
    fn socket(addr: SocketAddr) -> Self {
        Self::new(IpNet::from(addr.ip()), addr.port()..=addr.port())
    }

    #[cfg(test)]
    fn matches(&self, dst: SocketAddr) -> bool {
        self.net.contains(&dst.ip()) && self.ports.contains(&dst.port())
    }
}

impl FromStr for Rule {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let (net, ports) = if let Some(rest) = text.strip_prefix('[') {
            let (net, after) = rest
                .split_once(']')
                .ok_or_else(|| anyhow!("rule '{text}' opens '[' without closing it"))?;
            match after {
                "" => (net, None),
                _ => match after.strip_prefix(':') {
                    Some(ports) => (net, Some(ports)),
                    None => bail!("rule '{text}': expected ':PORT' after ']'"),
                },
            }
        } else if text.matches(':').count() == 1 {
            let (net, ports) = text.split_once(':').unwrap_or((text, ""));
            (net, Some(ports))
        } else {
            // No colon (IPv4, all ports) or several (a bare IPv6 network, all ports).
            (text, None)
        };
        let net = parse_net(net).map_err(|why| anyhow!("rule '{text}': {why}"))?;
        let ports = match ports {
            None => ALL_PORTS,
            Some(ports) => parse_ports(ports).map_err(|why| anyhow!("rule '{text}': {why}"))?,
        };
        Ok(Self::new(net, ports))
    }
}

/// Rules in the config file are the same strings as on the command line.
impl<'de> serde::Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse()
            .map_err(|err: anyhow::Error| serde::de::Error::custom(err))
    }
}

fn parse_net(text: &str) -> Result<IpNet, String> {
    if text.contains('/') {
        IpNet::from_str(text).map_err(|_| format!("'{text}' is not a CIDR network"))
    } else {
        IpAddr::from_str(text)
            .map(IpNet::from)
            .map_err(|_| format!("'{text}' is not an IP address or CIDR network"))
    }
}

fn parse_ports(text: &str) -> Result<RangeInclusive<u16>, String> {
    let port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("'{p}' is not a port (1-65535)")),
        Ok(port) => Ok(port),
    };
    let (first, last) = match text.split_once('-') {
        Some((first, last)) => (port(first)?, port(last)?),
        None => {
            let p = port(text)?;
            (p, p)
        }
    };
    if first > last {
        return Err(format!("port range {first}-{last} is reversed"));
    }
    Ok(first..=last)
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all_ports = self.ports == ALL_PORTS;
        let net = self.net;
        match net {
            _ if net.prefix_len() == net.max_prefix_len() => match net.addr() {
                IpAddr::V6(ip) if !all_ports => write!(f, "[{ip}]")?,
                ip => write!(f, "{ip}")?,
            },
            IpNet::V6(net) if !all_ports => write!(f, "[{net}]")?,
            net => write!(f, "{net}")?,
        }
        match (*self.ports.start(), *self.ports.end()) {
            _ if all_ports => Ok(()),
            (first, last) if first == last => write!(f, ":{first}"),
            (first, last) => write!(f, ":{first}-{last}"),
        }
    }
}

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
pub enum Family {
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

/// The complete interception policy, user rules and built-in exclusions together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    includes: Vec<Rule>,
    /// User excludes followed by the built-in ones.
    excludes: Vec<Rule>,
    /// Users and (primary) groups whose connections are never intercepted.
    pub exclude_uids: Vec<u32>,
    pub exclude_gids: Vec<u32>,
}

impl Rules {
    /// Builds the policy. `never` lists sockets that must never be intercepted whatever the
    /// rules say: the proxy's addresses and the listeners.
    pub fn new(includes: Vec<Rule>, excludes: Vec<Rule>, never: &[SocketAddr]) -> Self {
        let mut all_excludes = excludes;
        for loopback in LOOPBACK {
            let named = includes
                .iter()
                .any(|rule| rule.net.contains(&loopback) || loopback.contains(&rule.net));
            if !named {
                all_excludes.push(Rule::new(loopback, ALL_PORTS));
            }
        }
        all_excludes.extend(NEVER.map(|net| Rule::new(net, ALL_PORTS)));
        Self {
            includes,
            excludes: all_excludes,
            exclude_uids: Vec::new(),
            exclude_gids: Vec::new(),
        }
        .also_never(never)
    }

    /// The same policy, with `never` excluded as well (the sockets of the proxy and the
    /// listeners, which change when the proxy's host moves).
    pub fn also_never(&self, never: &[SocketAddr]) -> Self {
        let mut rules = self.clone();
        rules
            .excludes
            .extend(never.iter().copied().map(Rule::socket));
        rules
    }

    /// The same policy, also exempting these users and groups.
    pub fn with_excluded_ids(mut self, uids: Vec<u32>, gids: Vec<u32>) -> Self {
        self.exclude_uids = uids;
        self.exclude_gids = gids;
        self
    }

    /// The decision, stated plainly: the tests check that the kernel's trie lookup agrees.
    #[cfg(test)]
    pub fn intercepts(&self, dst: SocketAddr) -> bool {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        let included = self.includes.is_empty() || self.includes.iter().any(|r| r.matches(dst));
        included && !self.excludes.iter().any(|r| r.matches(dst))
    }

    pub fn has_includes(&self) -> bool {
        !self.includes.is_empty()
    }

    /// The rules of one family as LPM trie entries: for every prefix named by some rule, all
    /// rules whose network contains it. See [`PortRules`] for why the copies are needed.
    pub fn trie(&self, family: Family) -> anyhow::Result<Vec<(IpNet, PortRules)>> {
        let tagged: Vec<(IpNet, &Rule, u32)> = self
            .includes
            .iter()
            .map(|r| (r, verdict::INCLUDE))
            .chain(self.excludes.iter().map(|r| (r, verdict::EXCLUDE)))
            .filter(|(rule, _)| {
                matches!(
                    (rule.net, family),
                    (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6)
                )
            })
            .map(|(rule, verdict)| (rule.net, rule, verdict))
            .collect();
        let prefixes: BTreeSet<IpNet> = tagged.iter().map(|(net, _, _)| *net).collect();
        if prefixes.len() > MAX_RULE_PREFIXES as usize {
            bail!(
                "the rules name {} distinct {family} networks; at most {MAX_RULE_PREFIXES} fit",
                prefixes.len()
            );
        }
        prefixes
            .into_iter()
            .map(|prefix| {
                let mut value = PortRules::default();
                let covering: BTreeSet<(u16, u16, u32)> = tagged
                    .iter()
                    .filter(|(net, _, _)| net.contains(&prefix))
                    .map(|(_, rule, verdict)| (*rule.ports.start(), *rule.ports.end(), *verdict))
                    .collect();
                if covering.len() > MAX_PORT_RULES {
                    bail!(
                        "{} rules apply to {prefix}; at most {MAX_PORT_RULES} may overlap one network",
                        covering.len()
                    );
                }
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

    /// Checks that both tries can be built (no more overlapping rules than the kernel side
    /// carries), so a bad rule set is refused before anything is attached or replaced.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.trie(Family::V4)?;
        self.trie(Family::V6)?;
        self.check_excluded_ids()
    }

    /// Checks that the excluded users and groups fit their kernel sets.
    pub fn check_excluded_ids(&self) -> anyhow::Result<()> {
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
        Ok(())
    }

    /// One line for the ready message: what is intercepted.
    pub fn describe(&self) -> String {
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
            list(&self.excludes),
            ids("connections of uid", &self.exclude_uids),
            ids("gid", &self.exclude_gids)
        )
    }
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

    #[test]
    fn parses_rule_forms() {
        assert_eq!(
            rule("10.0.0.0/8"),
            Rule::new("10.0.0.0/8".parse().unwrap(), ALL_PORTS)
        );
        assert_eq!(rule("10.1.2.3:443").ports, 443..=443);
        assert_eq!(
            rule("10.1.2.3").net,
            "10.1.2.3/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(rule("10.0.0.0/8:8000-8080").ports, 8000..=8080);
        assert_eq!(rule("[2001:db8::/32]:443").ports, 443..=443);
        assert_eq!(rule("2001:db8::/32").ports, ALL_PORTS);
        assert_eq!(rule("::1").net, "::1/128".parse::<IpNet>().unwrap());
        // Host bits are dropped, as the kernel trie would ignore them anyway.
        assert_eq!(
            rule("10.1.2.3/8").net,
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
        for text in [
            "10.0.0.0/8",
            "10.1.2.3:443",
            "10.0.0.0/8:80-90",
            "[2001:db8::/32]:443",
        ] {
            assert_eq!(rule(text).to_string(), text);
        }
    }

    #[test]
    fn rejects_bad_rules_with_a_reason() {
        for (text, why) in [
            ("10.0.0.0/33", "not a CIDR"),
            ("10.0.0.300", "not an IP"),
            ("10.0.0.1:0", "not a port"),
            ("10.0.0.1:70000", "not a port"),
            ("10.0.0.1:90-80", "reversed"),
            ("10.0.0.1:", "not a port"),
            ("[::1", "without closing"),
            ("[::1]443", "expected ':PORT'"),
            ("example.com", "not an IP"),
        ] {
            let err = text.parse::<Rule>().unwrap_err().to_string();
            assert!(err.contains(why) && err.contains(text), "{text}: {err}");
        }
    }

    #[test]
    fn default_policy_excludes_builtins() {
        let rules = Rules::new(vec![], vec![], &[sock("192.0.2.1:3128")]);
        assert!(rules.intercepts(sock("198.51.100.7:443")));
        assert!(rules.intercepts(sock("192.0.2.1:443")));
        for never in [
            "192.0.2.1:3128",
            "127.0.0.1:80",
            "127.9.9.9:80",
            "169.254.169.254:80",
            "224.0.0.1:80",
            "0.0.0.0:80",
        ] {
            assert!(!rules.intercepts(sock(never)), "{never}");
        }
    }

    #[test]
    fn loopback_only_when_an_include_names_it() {
        let proxy = sock("127.0.0.1:3128");
        let rules = Rules::new(vec![rule("127.0.0.0/8")], vec![], &[proxy]);
        assert!(rules.intercepts(sock("127.0.0.2:80")));
        assert!(!rules.intercepts(proxy), "the proxy is never intercepted");
        assert!(rules.intercepts(sock("127.0.0.1:3129")));
        assert!(
            !rules.intercepts(sock("198.51.100.7:80")),
            "includes restrict"
        );
    }

    #[test]
    fn exclude_wins_over_include() {
        let rules = Rules::new(vec![rule("10.0.0.0/8")], vec![rule("10.1.0.0/16:443")], &[]);
        assert!(rules.intercepts(sock("10.1.2.3:80")));
        assert!(!rules.intercepts(sock("10.1.2.3:443")));
        assert!(rules.intercepts(sock("10.2.2.3:443")));
    }

    /// Emulates the kernel: longest-prefix lookup in the trie, then the eBPF `decide` loop.
    fn kernel_decision(trie: &[(IpNet, PortRules)], has_includes: bool, dst: SocketAddr) -> bool {
        let ip = dst.ip();
        let longest = trie
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len());
        let mut included = !has_includes;
        let Some((_, rules)) = longest else {
            return included;
        };
        for rule in &rules.rules[..rules.len as usize] {
            if (rule.first..=rule.last).contains(&dst.port()) {
                if rule.verdict == verdict::EXCLUDE {
                    return false;
                }
                included = true;
            }
        }
        included
    }

    #[test]
    fn trie_agrees_with_the_plain_decision() {
        let policies = [
            Rules::new(vec![], vec![], &[sock("127.0.0.1:3128")]),
            Rules::new(
                vec![rule("10.0.0.0/8"), rule("10.1.2.0/24:80-90")],
                vec![
                    rule("10.1.0.0/16:443"),
                    rule("10.1.2.3"),
                    rule("10.3.0.0/16"),
                ],
                &[sock("10.9.9.9:3128"), sock("127.0.0.1:15001")],
            ),
            Rules::new(
                vec![rule("127.0.0.0/8")],
                vec![rule("127.0.0.3:1-1000")],
                &[sock("127.0.0.1:3128")],
            ),
            Rules::new(
                vec![rule("2001:db8::/32"), rule("::1")],
                vec![rule("[2001:db8:1::/48]:443")],
                &[sock("[2001:db8::3128]:3128"), sock("[::1]:15001")],
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
        for rules in &policies {
            let v4 = rules.trie(Family::V4).unwrap();
            let v6 = rules.trie(Family::V6).unwrap();
            for ip in ips {
                for port in ports {
                    let dst = SocketAddr::new(ip.parse().unwrap(), port);
                    let trie = if dst.is_ipv4() { &v4 } else { &v6 };
                    assert_eq!(
                        kernel_decision(trie, rules.has_includes(), dst),
                        rules.intercepts(dst),
                        "{dst} under {rules:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn too_many_overlapping_rules_is_an_error() {
        let excludes = (1..=20).map(|p| rule(&format!("10.0.0.0/8:{p}"))).collect();
        let err = Rules::new(vec![], excludes, &[])
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
        let never = [sock("127.0.0.1:3128")];
        assert!(
            Rules::new(networks(4_000), vec![], &never)
                .validate()
                .is_ok()
        );
        // The built-in exclusions and the never-intercepted addresses count too.
        let err = Rules::new(networks(MAX_RULE_PREFIXES), vec![], &never)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("distinct IPv4 networks; at most 4096 fit"),
            "{err}"
        );
    }
}
