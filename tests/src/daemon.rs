//! The transproxy daemon under test, as a child process.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::Duration,
};

use tempfile::NamedTempFile;

use crate::TestCgroup;

/// How long start-up (load, verify, attach) may take.
const READY_WITHIN: Duration = Duration::from_secs(20);

pub struct Daemon {
    child: Child,
    stderr: NamedTempFile,
    ready_line: String,
    listen: SocketAddr,
}

impl Daemon {
    /// `transproxy run --proxy PROXY --cgroup CGROUP --listen <free> ARGS...`, waiting for the
    /// ready line.
    pub fn run(proxy: &str, cgroup: &TestCgroup, args: &[&str]) -> Self {
        Self::start(None, proxy, cgroup, args)
    }

    /// `transproxy run --config FILE --listen <free> --listen6 off --cgroup CGROUP`.
    pub fn run_with_config(config: &std::path::Path, cgroup: &TestCgroup) -> Self {
        let listen = crate::free_local_addr();
        let mut cmd = Command::new(crate::transproxy_bin());
        cmd.args([
            "run",
            "--listen",
            &listen.to_string(),
            "--listen6",
            "off",
            "--config",
        ])
        .arg(config)
        .arg("--cgroup")
        .arg(cgroup.path());
        Self::spawn(cmd, listen)
    }

    /// Like [`Daemon::run`], with the daemon process itself inside `home`.
    pub fn run_inside(home: &TestCgroup, proxy: &str, cgroup: &TestCgroup, args: &[&str]) -> Self {
        Self::start(Some(home), proxy, cgroup, args)
    }

    fn start(home: Option<&TestCgroup>, proxy: &str, cgroup: &TestCgroup, args: &[&str]) -> Self {
        let bin = crate::transproxy_bin();
        let base = match home {
            Some(home) => home.command(&bin),
            None => Command::new(&bin),
        };
        let (mut cmd, listen) = Self::command(base, proxy, cgroup);
        cmd.args(args);
        Self::spawn(cmd, listen)
    }

    /// Completes `cmd` (the transproxy binary, or a wrapper running it) into `run --proxy PROXY
    /// --listen <free port> --cgroup CGROUP`, for callers that add their own flags or
    /// environment. Returns it with the listen address, for [`Daemon::spawn`].
    pub fn command(mut cmd: Command, proxy: &str, cgroup: &TestCgroup) -> (Command, SocketAddr) {
        let listen = crate::free_local_addr();
        cmd.args([
            "run",
            "--proxy",
            proxy,
            "--listen",
            &listen.to_string(),
            "--cgroup",
        ])
        .arg(cgroup.path());
        (cmd, listen)
    }

    /// Spawns a prepared `transproxy run` command and waits for its ready line.
    pub fn spawn(mut cmd: Command, listen: SocketAddr) -> Self {
        let stderr = NamedTempFile::new().expect("stderr file");
        let mut child = cmd
            .env(
                // Debug shows each eBPF redirect; aya's own loader chatter stays out.
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "debug,aya=info,aya_obj=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().expect("reopen stderr file"))
            .spawn()
            .expect("start transproxy");
        let stdout = child.stdout.take().expect("stdout");
        let (lines, ready) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let ready_line = ready.recv_timeout(READY_WITHIN);
        let mut daemon = Self {
            child,
            stderr,
            ready_line: String::new(),
            listen,
        };
        match ready_line {
            Ok(line) if line.starts_with("transproxy ready:") => daemon.ready_line = line,
            other => panic!(
                "transproxy did not become ready ({other:?}, exit {:?}); stderr:\n{}",
                daemon.child.try_wait(),
                daemon.stderr()
            ),
        }
        daemon
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// This daemon's part of `transproxy status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = crate::run(Command::new(crate::transproxy_bin()).args(["status", "--json"]));
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status is JSON");
        all["daemons"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["pid"] == self.pid())
            .cloned()
            .unwrap_or_else(|| panic!("status does not show daemon {}: {all}", self.pid()))
    }

    /// The other network namespaces (`net:[INODE]`) the daemon serves now.
    pub fn served_namespaces(&self) -> std::collections::HashSet<String> {
        self.status()["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["netns"].as_str().map(str::to_owned))
            .collect()
    }

    pub fn ready_line(&self) -> &str {
        &self.ready_line
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Waits up to `limit` for the daemon to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        crate::wait_for(limit, || self.child.try_wait().ok().flatten())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Killed, it could not remove its control socket (`transproxy status` would report it
        // stale): the test removes what it made.
        let _ = std::fs::remove_file(format!("/run/transproxy/{}.sock", self.child.id()));
    }
}

/// Removes the kill switch's pins for a cgroup when dropped, whatever the test did.
pub struct Detach<'a>(pub &'a TestCgroup);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        let _ = detach(self.0);
    }
}

/// `transproxy detach --cgroup CGROUP`.
pub fn detach(cgroup: &TestCgroup) -> std::process::Output {
    crate::run(
        Command::new(crate::transproxy_bin())
            .arg("detach")
            .arg("--cgroup")
            .arg(cgroup.path()),
    )
}

/// How long a daemon that must refuse to start may take to say so.
const REFUSE_WITHIN: Duration = Duration::from_secs(20);

/// Runs a prepared `transproxy run` (see [`Daemon::command`]) that must refuse to start:
/// checks that it exits with an error saying `expected`, and returns its stderr.
pub fn refuses_to_start(cmd: &mut Command, expected: &str) -> String {
    let out = crate::run_for(cmd, REFUSE_WITHIN);
    let said = crate::text(&out.stderr);
    assert!(!out.status.success(), "it started: {said}");
    assert!(said.contains(expected), "expected {expected:?} in: {said}");
    said
}
