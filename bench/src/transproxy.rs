//! The transproxy daemon as a contender: attached to the contender's cgroup, intercepting the
//! benchmark's origins only.

use std::{
    fs::File,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use transproxy_tests::free_local_addr;

use crate::process::Guarded;

/// How long loading, verifying and attaching the programs may take.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// A running `transproxy run`.
pub(crate) struct TransproxyDaemon {
    process: Guarded,
}

impl TransproxyDaemon {
    /// `transproxy run --proxy URL --cgroup CGROUP --include ORIGIN/32:PORT... --listen6 off
    /// --listen 127.0.0.1:<free>`, with its default log level (`RUST_LOG` unset: the bench
    /// measures the daemon as shipped). Its log goes to `log`.
    pub(crate) fn start(
        binary: &Path,
        proxy_url: &str,
        cgroup: &Path,
        origins: &[SocketAddr],
        log: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_with(Command::new(binary), proxy_url, cgroup, origins, &[], log)
    }

    /// As [`TransproxyDaemon::start`], with `program` as the daemon (possibly wrapped, with
    /// its environment set) and `extra` settings after the usual ones.
    pub(crate) fn start_with(
        program: Command,
        proxy_url: &str,
        cgroup: &Path,
        origins: &[SocketAddr],
        extra: &[String],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let mut cmd = program;
        cmd.args(["run", "--proxy", proxy_url, "--cgroup"])
            .arg(cgroup)
            .args([
                "--listen6",
                "off",
                "--listen",
                &free_local_addr().to_string(),
            ]);
        for origin in origins {
            cmd.args([
                "--include",
                &format!("{}/32:{}", origin.ip(), origin.port()),
            ]);
        }
        cmd.args(extra);
        let stderr =
            File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        cmd.env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stderr(stderr);
        let mut process = Guarded::spawn(cmd, "transproxy")?;
        let line = process.first_line(READY_WITHIN).map_err(|err| {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            err.context(format!("transproxy's log:\n{log}"))
        })?;
        if !line.starts_with("transproxy ready:") {
            bail!("transproxy said {line:?} instead of its ready line");
        }
        Ok(Self { process })
    }

    /// The process whose CPU and memory the figures report.
    pub(crate) fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// Ends the process now (before a replacement starts).
    pub(crate) fn stop(&mut self) {
        self.process.stop();
    }
}
