//! redsocks as a contender: Debian's redsocks in `http-connect` mode (`socks5` through dante), reached through the
//! iptables rules of [`crate::iptables`].

use std::{
    fs::{self, File},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use transproxy_tests::{free_local_addr, wait_for};

use crate::{process::Guarded, tools::REDSOCKS};

/// A running redsocks (in the foreground, as root, logging only errors).
pub(crate) struct Redsocks {
    process: Guarded,
    port: u16,
}

impl Redsocks {
    /// Starts redsocks on a free port of 127.0.0.1, relaying through `upstream` with
    /// `CONNECT`. Its best settings for this test: splice(2) on (as transproxy and the fast
    /// proxy use), a listen queue as long as transproxy's, no per-connection log lines, and as
    /// many connections as its descriptors allow (`max_connections`; its default, an eighth of
    /// the descriptor limit, stops it short of the idle-tunnel figure).
    pub(crate) fn start(
        upstream: SocketAddr,
        kind: &str,
        max_connections: u64,
        dir: &Path,
        label: &str,
    ) -> anyhow::Result<Self> {
        let listen = free_local_addr();
        let config = format!(
            "base {{\n\
             \x20   log_debug = off;\n\
             \x20   log_info = off;\n\
             \x20   log = stderr;\n\
             \x20   daemon = off;\n\
             \x20   redirector = iptables;\n\
             \x20   redsocks_conn_max = {max_connections};\n\
             }}\n\
             redsocks {{\n\
             \x20   local_ip = {};\n\
             \x20   local_port = {};\n\
             \x20   listenq = 4096;\n\
             \x20   splice = true;\n\
             \x20   ip = {};\n\
             \x20   port = {};\n\
             \x20   type = {kind};\n\
             }}\n",
            listen.ip(),
            listen.port(),
            upstream.ip(),
            upstream.port()
        );
        let config_path = dir.join(format!("redsocks-{label}.conf"));
        fs::write(&config_path, config)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let log = dir.join(format!("redsocks-{label}.log"));
        let stderr =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(REDSOCKS);
        cmd.arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stderr(stderr);
        let mut process = Guarded::spawn(cmd, "redsocks")?;
        // A connection that was not redirected is closed by redsocks at once; it only tells us
        // that it listens.
        let up = wait_for(Duration::from_secs(10), || {
            TcpStream::connect(listen).ok().map(drop)
        });
        if up.is_none() || !process.alive() {
            bail!(
                "redsocks did not listen on {listen}:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(Self {
            process,
            port: listen.port(),
        })
    }

    /// The process whose CPU and memory the figures report.
    pub(crate) fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// Ends the process now (before a replacement starts).
    pub(crate) fn stop(&mut self) {
        self.process.stop();
    }

    /// The port the REDIRECT rules send connections to.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}
