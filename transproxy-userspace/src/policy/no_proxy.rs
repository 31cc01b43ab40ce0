//! `NO_PROXY` / `no_proxy`, as users already write it for curl and friends.
//!
//! IP addresses and CIDR networks become exclude rules. Host and domain entries (`.corp`,
//! `localhost`, `*`) cannot apply at the IP level, where interception happens; they are reported
//! once at start-up as ignored instead of being silently dropped.

use super::Rule;

/// The usable part of `NO_PROXY`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NoProxy {
    pub excludes: Vec<Rule>,
    /// Entries that name hosts or domains.
    pub ignored: Vec<String>,
}

impl NoProxy {
    /// Reads `no_proxy` and `NO_PROXY` (both, if both are set).
    pub fn from_env() -> Self {
        let mut all = Self::default();
        for name in ["no_proxy", "NO_PROXY"] {
            if let Ok(value) = std::env::var(name) {
                let part = Self::parse(&value);
                for rule in part.excludes {
                    if !all.excludes.contains(&rule) {
                        all.excludes.push(rule);
                    }
                }
                for entry in part.ignored {
                    if !all.ignored.contains(&entry) {
                        all.ignored.push(entry);
                    }
                }
            }
        }
        all
    }

    pub fn parse(text: &str) -> Self {
        let mut parsed = Self::default();
        for entry in text
            .split([',', ' '])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            match entry.parse::<Rule>() {
                Ok(rule) => parsed.excludes.push(rule),
                Err(_) => parsed.ignored.push(entry.to_owned()),
            }
        }
        parsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_become_excludes_and_names_are_ignored() {
        let parsed = NoProxy::parse(
            "localhost, .corp.example,10.0.0.0/8, 192.0.2.7:8080,[::1],2001:db8::/32,*",
        );
        let rules: Vec<String> = parsed.excludes.iter().map(ToString::to_string).collect();
        assert_eq!(
            rules,
            ["10.0.0.0/8", "192.0.2.7:8080", "::1", "2001:db8::/32"]
        );
        assert_eq!(parsed.ignored, ["localhost", ".corp.example", "*"]);
    }
}
