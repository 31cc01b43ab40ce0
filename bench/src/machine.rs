//! Where and with what the numbers were taken, for the report's header.

use std::{fs, process::Command};

/// The machine and the software versions measured.
pub(crate) struct Machine {
    /// `uname -r`.
    pub kernel: String,
    /// The CPU model name.
    pub cpu: String,
    /// CPUs this process may use.
    pub cpus: usize,
    /// The commit the daemon was built from, and whether its sources had uncommitted changes.
    pub transproxy: String,
    /// Debian package versions of the other programs.
    pub packages: Vec<(&'static str, String)>,
}

impl Machine {
    /// Reads /proc, dpkg and git; unknown values say so rather than fail the report.
    pub(crate) fn describe() -> Self {
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let packages = ["squid", "redsocks", "nginx", "wrk", "curl", "iptables"]
            .into_iter()
            .map(|p| (p, package_version(p)))
            .collect();
        Self {
            kernel,
            cpu,
            cpus,
            transproxy: transproxy_revision(),
            packages,
        }
    }
}

/// The installed version of a Debian package.
fn package_version(package: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// `git rev-parse --short HEAD`, marked when the daemon's sources differ from it.
fn transproxy_revision() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(crate::workspace_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown revision".into();
    };
    let dirty = git(&[
        "status",
        "--porcelain",
        "--",
        "transproxy-userspace",
        "transproxy-ebpf",
        "transproxy-common",
    ])
    .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{commit} + uncommitted changes")
    } else {
        commit
    }
}
