//! Child processes with bounded waits: every fixture and load generator goes through here.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A long-lived child (proxy, interceptor, client holding connections): killed and reaped on
/// drop, so no exit path leaves it running.
pub(crate) struct Guarded {
    child: Child,
    /// What it is, for error messages.
    name: String,
}

impl Guarded {
    /// Spawns `cmd` with stdout piped (for [`Guarded::first_line`]).
    pub(crate) fn spawn(mut cmd: Command, name: &str) -> anyhow::Result<Self> {
        let child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        Ok(Self {
            child,
            name: name.to_owned(),
        })
    }

    /// For /proc and signals.
    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The process itself, e.g. to write to its stdin.
    pub(crate) fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits up to `limit` for the first stdout line (a ready message). Later lines are read and
    /// dropped in the background so the child never blocks on a full pipe.
    pub(crate) fn first_line(&mut self, limit: Duration) -> anyhow::Result<String> {
        let stdout = self
            .child
            .stdout
            .take()
            .with_context(|| format!("{}: stdout already taken", self.name))?;
        let (lines, first) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + limit;
        loop {
            match first.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => return Ok(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    bail!("{} exited before it was ready ({status:?})", self.name);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() >= deadline || crate::interrupt::requested() {
                        bail!("{} was not ready within {limit:?}", self.name);
                    }
                }
            }
        }
    }

    /// Kills and reaps it now rather than at drop.
    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it still runs.
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a command that ends by itself (wrk, curl), killing it if it overruns `limit`.
pub(crate) fn output_within(
    mut cmd: Command,
    limit: Duration,
    name: &str,
) -> anyhow::Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
    let pid = child.id() as i32;
    let (done, finished) = mpsc::channel();
    // The watchdog kills an overrunning child; wait_with_output then returns.
    let watchdog = std::thread::spawn(move || {
        if finished.recv_timeout(limit).is_err() {
            // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let output = child.wait_with_output();
    let _ = done.send(());
    let _ = watchdog.join();
    let output = output.with_context(|| format!("{name} failed"))?;
    if !output.status.success() {
        bail!(
            "{name} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}
