//! One interception rule, `CIDR[:PORT[-PORT]]`, as written on the command line, in config files
//! and in NO_PROXY.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    str::FromStr,
};

use anyhow::{anyhow, bail};
use ipnet::IpNet;

/// `CIDR[:PORT[-PORT]]`: destinations in a network, optionally on a port range.
///
/// IPv6 networks with a port are written in brackets: `[2001:db8::/32]:443`.
#[derive(Clone, Debug)]
pub struct Rule {
    /// The network, host bits cleared (`10.1.2.3/8` is `10.0.0.0/8`).
    pub net: IpNet,
    pub ports: RangeInclusive<u16>,
    /// The network as written, when it had host bits set: worth a warning, as it is often a
    /// typo for a single address.
    pub written: Option<IpNet>,
}

/// Equal rules intercept the same connections, however they were written.
impl PartialEq for Rule {
    fn eq(&self, other: &Self) -> bool {
        (self.net, &self.ports) == (other.net, &other.ports)
    }
}

impl Eq for Rule {}

/// Every port: a rule written without one.
pub(super) const ALL_PORTS: RangeInclusive<u16> = 1..=u16::MAX;

impl Rule {
    pub(super) fn new(net: IpNet, ports: RangeInclusive<u16>) -> Self {
        Self {
            net: net.trunc(),
            ports,
            written: (net != net.trunc()).then_some(net),
        }
    }

    /// A single address and port, as for the proxy and the listener.
    pub(super) fn socket(addr: SocketAddr) -> Self {
        Self::new(IpNet::from(addr.ip()), addr.port()..=addr.port())
    }

    /// Whether `dst` is in the rule's network and port range.
    #[cfg(test)]
    pub(super) fn matches(&self, dst: SocketAddr) -> bool {
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
        let net = parse_net(net).map_err(|why| {
            // `::1/128:443`: an IPv6 network with a port, written without brackets.
            match text.rsplit_once(':') {
                Some((net, port))
                    if !text.starts_with('[')
                        && net.contains(':')
                        && parse_net(net).is_ok()
                        && parse_ports(port).is_ok() =>
                {
                    anyhow!("rule '{text}': an IPv6 network with a port goes in brackets: [{net}]:{port}")
                }
                _ => anyhow!("rule '{text}': {why}"),
            }
        })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> Rule {
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
            ("::1/128:443", "[::1/128]:443"),
        ] {
            let err = text.parse::<Rule>().unwrap_err().to_string();
            assert!(err.contains(why) && err.contains(text), "{text}: {err}");
        }
    }
}
