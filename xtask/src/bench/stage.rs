//! What stays up for the whole benchmark: the work directory, the origins and the tools.

use std::net::SocketAddr;

use anyhow::Context as _;
use tempfile::TempDir;

use super::{holder::Holder, nginx::Nginx, plan::Plan, tools::Tools};

/// The fixtures shared by every run. Fields drop in order: the origins stop before their
/// directory goes.
pub struct Stage {
    pub plan: Plan,
    pub tools: Tools,
    pub nginx: Nginx,
    pub holder: Holder,
    pub dir: TempDir,
}

impl Stage {
    pub fn start(plan: Plan, tools: Tools) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("transproxy-bench-")
            .tempdir()
            .context("cannot create the work directory")?;
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
            dir,
        })
    }

    /// The two destinations the interceptors are told to intercept, and nothing else.
    pub fn intercepted(&self) -> [SocketAddr; 2] {
        [self.nginx.addr(), self.holder.addr()]
    }
}
