//! `NO_PROXY` / `no_proxy`, as users already write it for curl and friends.
//!
//! IP addresses and CIDR networks become exclude rules, applied in the kernel. Host and domain
//! entries (`corp.example`, `.corp.example`, `*`) become [`DirectNames`]: a connection whose
//! host name (sniffed from its first bytes, or learned from DNS) matches one goes direct, the
//! daemon connecting to the destination itself. Entries that are neither are reported once.

use super::Rule;
use crate::sniff::Name;

/// The usable part of `NO_PROXY`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NoProxy {
    pub excludes: Vec<Rule>,
    pub names: DirectNames,
    /// Entries that are neither an address nor a name.
    pub ignored: Vec<String>,
}

/// Host names that go direct, matched as curl matches `NO_PROXY`: `corp.example` and
/// `.corp.example` both match `corp.example` and every name below it; `*` matches every name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectNames {
    suffixes: Vec<String>,
    all: bool,
}

impl DirectNames {
    pub fn is_empty(&self) -> bool {
        !self.all && self.suffixes.is_empty()
    }

    /// Whether connections to `name` go direct.
    pub fn matches(&self, name: &Name) -> bool {
        let name = name.as_str();
        self.all
            || self.suffixes.iter().any(|suffix| {
                name == suffix
                    || name
                        .strip_suffix(suffix.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            })
    }

    /// Names as `--dns-direct` gives them (the NO_PROXY forms of a name); an entry that is not
    /// one is an error naming it.
    pub fn from_patterns(patterns: &[String], named: &str) -> anyhow::Result<Self> {
        let mut names = Self::default();
        for pattern in patterns {
            if !names.add(pattern.trim()) {
                anyhow::bail!(
                    "{named}: '{pattern}' is not a host name (write corp.example or .corp.example)"
                );
            }
        }
        Ok(names)
    }

    /// Both sets of names: a name matching either matches.
    pub fn union(&self, other: &Self) -> Self {
        let mut names = self.clone();
        names.all |= other.all;
        for suffix in &other.suffixes {
            if !names.suffixes.contains(suffix) {
                names.suffixes.push(suffix.clone());
            }
        }
        names
    }

    fn add(&mut self, entry: &str) -> bool {
        if entry == "*" {
            self.all = true;
            return true;
        }
        let bare = entry.trim_start_matches("*.").trim_start_matches('.');
        match Name::parse(bare) {
            Some(name) => {
                if !self.suffixes.iter().any(|s| s == name.as_str()) {
                    self.suffixes.push(name.as_str().to_owned());
                }
                true
            }
            None => false,
        }
    }

    /// The entries, for the ready line.
    pub fn describe(&self) -> String {
        if self.all {
            return "every name".to_owned();
        }
        self.suffixes.join(", ")
    }
}

impl NoProxy {
    /// Reads `no_proxy` and `NO_PROXY` (both, if both are set).
    pub fn from_env() -> Self {
        let text: Vec<String> = ["no_proxy", "NO_PROXY"]
            .into_iter()
            .filter_map(|name| std::env::var(name).ok())
            .collect();
        Self::parse(&text.join(","))
    }

    pub fn parse(text: &str) -> Self {
        let mut parsed = Self::default();
        for entry in text
            .split([',', ' '])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            match entry.parse::<Rule>() {
                Ok(rule) if !parsed.excludes.contains(&rule) => parsed.excludes.push(rule),
                Ok(_) => {}
                Err(_) if parsed.names.add(entry) => {}
                Err(_) => {
                    if !parsed.ignored.iter().any(|i| i == entry) {
                        parsed.ignored.push(entry.to_owned());
                    }
                }
            }
        }
        parsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_become_excludes_and_names_go_direct() {
        let parsed = NoProxy::parse(
            "localhost, .corp.example,10.0.0.0/8, 192.0.2.7:8080,[::1],2001:db8::/32,*.b.test,bad name!",
        );
        let rules: Vec<String> = parsed.excludes.iter().map(ToString::to_string).collect();
        assert_eq!(
            rules,
            ["10.0.0.0/8", "192.0.2.7:8080", "::1", "2001:db8::/32"]
        );
        let name = |n: &str| Name::parse(n).unwrap();
        for direct in [
            "localhost",
            "corp.example",
            "a.corp.example",
            "b.test",
            "x.b.test",
        ] {
            assert!(parsed.names.matches(&name(direct)), "{direct}");
        }
        for proxied in ["example", "notcorp.example", "corp.example.org", "c.test"] {
            assert!(!parsed.names.matches(&name(proxied)), "{proxied}");
        }
        // "bad" is a name (a single label, as `localhost`); "name!" is not.
        assert_eq!(parsed.ignored, ["name!"]);
        assert!(NoProxy::parse("*").names.matches(&name("any.test")));
    }
}
