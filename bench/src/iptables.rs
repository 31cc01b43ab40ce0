//! redsocks' half of the interception: iptables NAT rules, each naming the benchmark's own
//! origin address and port and the client's cgroup, removed on every exit path.

use std::{fs, net::SocketAddr, path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::tools::IPTABLES;

/// The comment every rule of this benchmark carries: its tag and the benchmark's pid.
const TAG: &str = "transproxy-bench";

/// How redsocks' clients are told apart from everything else, above all from the upstream
/// proxy's own connections to the origin (which must not be redirected again).
#[derive(Clone, Debug)]
pub(crate) enum Selector {
    /// `-m cgroup --path P`: the client's cgroup v2, relative to the hierarchy's root; the
    /// same selection transproxy makes.
    Cgroup(String),
    /// `-m owner --gid-owner G`: the clients run with this otherwise unused group, when the
    /// kernel or iptables cannot match cgroups.
    Gid(u32),
}

impl Selector {
    /// The cgroup match if iptables accepts it (tried with a real rule, removed at once), the
    /// group match otherwise.
    pub(crate) fn choose(
        cgroup: &Path,
        cgroup_root: &Path,
        probe: SocketAddr,
    ) -> anyhow::Result<Self> {
        let relative = cgroup
            .strip_prefix(cgroup_root)
            .with_context(|| {
                format!(
                    "{} is not below {}",
                    cgroup.display(),
                    cgroup_root.display()
                )
            })?
            .to_string_lossy()
            .into_owned();
        let by_cgroup = Self::Cgroup(relative);
        match NatRules::add(&[probe], &by_cgroup, 9) {
            Ok(rules) => {
                drop(rules);
                Ok(by_cgroup)
            }
            Err(err) => {
                let by_gid = Self::Gid(unused_gid()?);
                println!(
                    "xtask: iptables refused the cgroup match ({err:#}); redsocks' clients are selected with {by_gid:?} instead"
                );
                drop(NatRules::add(&[probe], &by_gid, 9)?);
                Ok(by_gid)
            }
        }
    }

    /// The group the clients must run with, if that is how they are selected.
    pub(crate) fn gid(&self) -> Option<u32> {
        match self {
            Self::Cgroup(_) => None,
            Self::Gid(gid) => Some(*gid),
        }
    }

    /// The match arguments of a rule.
    fn args(&self) -> Vec<String> {
        match self {
            Self::Cgroup(path) => vec!["-m".into(), "cgroup".into(), "--path".into(), path.clone()],
            Self::Gid(gid) => vec![
                "-m".into(),
                "owner".into(),
                "--gid-owner".into(),
                gid.to_string(),
            ],
        }
    }
}

/// NAT rules in force; dropping the value removes them.
pub(crate) struct NatRules {
    rules: Vec<Vec<String>>,
}

impl NatRules {
    /// `iptables -t nat -A OUTPUT -p tcp -d IP --dport PORT <selector> -j REDIRECT --to-ports
    /// TO_PORT`, one rule per destination. If one fails, those already added are removed.
    pub(crate) fn add(
        destinations: &[SocketAddr],
        selector: &Selector,
        to_port: u16,
    ) -> anyhow::Result<Self> {
        let mut added = Self { rules: Vec::new() };
        for destination in destinations {
            let rule = rule(*destination, selector, to_port);
            iptables("-A", &rule)?;
            added.rules.push(rule);
        }
        Ok(added)
    }
}

impl Drop for NatRules {
    fn drop(&mut self) {
        for rule in self.rules.drain(..) {
            if let Err(err) = iptables("-D", &rule) {
                eprintln!("xtask: warning: cannot remove iptables rule {rule:?}: {err:#}");
            }
        }
    }
}

/// Removes the rules of earlier runs that could not clean up (killed with SIGKILL, say): those
/// whose tag names a process that no longer exists. Returns how many went.
pub(crate) fn sweep_stale() -> anyhow::Result<usize> {
    let out = Command::new(IPTABLES)
        .args(["-w", "5", "-t", "nat", "-S", "OUTPUT"])
        .output()
        .context("cannot run iptables -S")?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let mut removed = 0;
    for line in listing.lines() {
        let Some(pid) = line
            .split_once(&format!("{TAG} pid="))
            .and_then(|(_, rest)| rest.split('"').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let Some(rule) = line.strip_prefix("-A OUTPUT ") else {
            continue;
        };
        iptables("-D", &split_quoted(rule))?;
        removed += 1;
    }
    Ok(removed)
}

/// One rule's arguments after `-A OUTPUT` / `-D OUTPUT`: the destination address and port,
/// the selector, the tag, the REDIRECT target.
fn rule(destination: SocketAddr, selector: &Selector, to_port: u16) -> Vec<String> {
    let mut rule: Vec<String> = [
        "-p",
        "tcp",
        "-d",
        &destination.ip().to_string(),
        "--dport",
        &destination.port().to_string(),
    ]
    .map(String::from)
    .to_vec();
    rule.extend(selector.args());
    rule.extend(
        [
            "-m",
            "comment",
            "--comment",
            &format!("{TAG} pid={}", std::process::id()),
            "-j",
            "REDIRECT",
            "--to-ports",
            &to_port.to_string(),
        ]
        .map(String::from),
    );
    rule
}

/// `iptables -w 5 -t nat ACTION OUTPUT RULE...`.
fn iptables(action: &str, rule: &[String]) -> anyhow::Result<()> {
    let out = Command::new(IPTABLES)
        .args(["-w", "5", "-t", "nat", action, "OUTPUT"])
        .args(rule)
        .output()
        .context("cannot run iptables")?;
    if !out.status.success() {
        bail!(
            "iptables -t nat {action} OUTPUT {} failed: {}",
            rule.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Splits an `iptables -S` line into arguments; the comment is the only quoted part.
fn split_quoted(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    args.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        args.push(current);
    }
    args
}

/// A group id no group in /etc/group has, for the owner-match fallback.
fn unused_gid() -> anyhow::Result<u32> {
    let groups = fs::read_to_string("/etc/group").unwrap_or_default();
    let taken: Vec<u32> = groups
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect();
    (64_000..64_100)
        .find(|gid| !taken.contains(gid))
        .context("no unused group id between 64000 and 64099")
}
