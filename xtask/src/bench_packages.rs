//! The Debian packages the benchmark needs, installed without leaving their services running.

use std::{
    fs,
    process::{Command, Stdio},
};

use crate::setup;

/// squid (an upstream), curl and wrk (load), redsocks and iptables (the other interceptor),
/// nginx (the origin); for the proxy-authentication section, a throwaway MIT KDC and kinit
/// (krb5-kdc, krb5-admin-server, krb5-user) and htpasswd (apache2-utils); dante (a SOCKS5
/// upstream); installed the
/// DNS-safe way like every package here.
const PACKAGES: &[&str] = &[
    "squid",
    "curl",
    "redsocks",
    "iptables",
    "nginx",
    "wrk",
    "krb5-kdc",
    "krb5-admin-server",
    "krb5-user",
    "apache2-utils",
    "dante-server",
];

/// Packages that ship a system service, and the pid file the service writes.
const SERVICES: &[(&str, &str)] = &[
    ("nginx", "/run/nginx.pid"),
    ("redsocks", "/run/redsocks/redsocks.pid"),
];

/// Installs what is missing (saying so; present packages are skipped). The benchmark starts its
/// own nginx and redsocks; if installing one still started the system service despite the
/// policy-rc.d that `setup` puts in place, that service is stopped again. Services that were
/// installed before are left alone.
pub(crate) fn install() -> anyhow::Result<()> {
    let fresh: Vec<&(&str, &str)> = SERVICES
        .iter()
        .filter(|(package, _)| !installed(package))
        .collect();
    setup::debian_packages(PACKAGES)?;
    for (package, pid_file) in fresh {
        let Some(pid) = fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == *package {
            println!(
                "xtask: installing {package} started its system service (pid {pid}); stopping it"
            );
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
    Ok(())
}

/// Whether dpkg has the package installed.
fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}
