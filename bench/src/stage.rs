//! What stays up for the whole benchmark: the work directory, the origins and the tools.

use std::{fs, net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use tempfile::TempDir;

use crate::{holder::Holder, nginx::Nginx, plan::Plan, tools::Tools};

/// The fixtures shared by every run. Fields drop in order: the origins stop before their
/// directory goes.
pub(crate) struct Stage {
    /// How long and how often.
    pub plan: Plan,
    /// The programs.
    pub tools: Tools,
    /// The origin of every figure but the idle tunnels.
    pub nginx: Nginx,
    /// The origin of the idle tunnels.
    pub holder: Holder,
    /// nginx's files and configuration (the large file is sparse), removed after nginx stops.
    _dir: TempDir,
    /// target/bench/logs: the interceptors' configurations and logs, kept after the run for
    /// looking into failed measurements.
    pub logs: PathBuf,
}

impl Stage {
    /// Makes the work directory and starts the origins.
    pub(crate) fn start(plan: Plan, tools: Tools) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("transproxy-bench-")
            .tempdir()
            .context("cannot create the work directory")?;
        let logs = crate::workspace_root().join("target/bench/logs");
        let _ = fs::remove_dir_all(&logs);
        fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
        let nginx = Nginx::start(dir.path(), plan.download_bytes)?;
        let holder = Holder::start()?;
        println!(
            "xtask: origins: nginx on {} (and {} for the non-matching figure), idle-tunnel holder on {}",
            nginx.addr(),
            nginx.unmatched_url(),
            holder.addr()
        );
        Ok(Self {
            plan,
            tools,
            nginx,
            holder,
            _dir: dir,
            logs,
        })
    }

    /// The two destinations the interceptors are told to intercept, and nothing else.
    pub(crate) fn intercepted(&self) -> [SocketAddr; 2] {
        [self.nginx.addr(), self.holder.addr()]
    }
}
