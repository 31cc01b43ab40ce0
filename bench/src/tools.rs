//! The programs the benchmark runs, built or found before anything starts.

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::{cargo, check, workspace_root};

/// Where each program is.
pub(crate) struct Tools {
    /// The daemon under test, as `cargo xtask build` makes it.
    pub transproxy: PathBuf,
    /// The harness client, for `tp-client hold`.
    pub client: PathBuf,
    /// The fast upstream proxy.
    pub fast_proxy: PathBuf,
}

// Debian's binaries the benchmark drives.

/// The origin.
pub(crate) const NGINX: &str = "/usr/sbin/nginx";
/// The iptables-based interceptor.
pub(crate) const REDSOCKS: &str = "/usr/sbin/redsocks";
/// Adds and removes redsocks' rules.
pub(crate) const IPTABLES: &str = "/usr/sbin/iptables";
/// Connection rate and latency.
pub(crate) const WRK: &str = "/usr/bin/wrk";
/// The download.
pub(crate) const CURL: &str = "/usr/bin/curl";

impl Tools {
    /// Builds the harness helpers in release mode (the fast proxy must not be the bottleneck)
    /// and checks that every program is where it should be.
    pub(crate) fn prepare(transproxy: &Path) -> anyhow::Result<Self> {
        println!("xtask: building tp-client and tp-fast-proxy (release)");
        check(cargo().args([
            "build",
            "--release",
            "--package",
            "transproxy-tests",
            "--bin",
            "tp-client",
            "--bin",
            "tp-fast-proxy",
        ]))?;
        let release = workspace_root().join("target/release");
        let tools = Self {
            transproxy: transproxy.to_path_buf(),
            client: release.join("tp-client"),
            fast_proxy: release.join("tp-fast-proxy"),
        };
        for path in [&tools.transproxy, &tools.client, &tools.fast_proxy]
            .into_iter()
            .map(PathBuf::as_path)
            .chain([NGINX, REDSOCKS, IPTABLES, WRK, CURL].map(Path::new))
        {
            if !path.exists() {
                bail!("{} is missing", path.display());
            }
        }
        Ok(tools)
    }
}
