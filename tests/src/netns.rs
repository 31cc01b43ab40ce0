//! Network namespaces made by a test, standing in for containers: a process of a test cgroup
//! that moved to a namespace of its own (loopback only) and waits there. Dropping it kills the
//! process, and with its last process the namespace is gone.

use std::{
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{TestCgroup, wait_for};

/// A namespace held by a `sleep` in a test cgroup.
pub struct Netns {
    holder: Child,
}

impl Netns {
    /// A new namespace for a process of `cgroup`, with loopback up (`lo_up`) or down. The
    /// process joins the cgroup first, then the namespace: `ip netns exec` would remount /sys,
    /// and a cgroup joined from inside it is silently not joined.
    pub fn new(cgroup: &TestCgroup, lo_up: bool) -> Self {
        let script = if lo_up {
            "ip link set lo up && exec sleep 600"
        } else {
            "exec sleep 600"
        };
        let mut cmd = cgroup.command("unshare");
        cmd.args(["--net", "sh", "-c", script]);
        Self::hold(cmd)
    }

    /// A namespace made by an unprivileged user (nobody) of `cgroup`, as any user can where
    /// unprivileged user namespaces are allowed: a user namespace and a network namespace it
    /// owns (`unshare -Urn`), loopback up.
    pub fn as_nobody(cgroup: &TestCgroup) -> Self {
        let mut cmd = cgroup.command("setpriv");
        cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .args([
                "unshare",
                "-Urn",
                "sh",
                "-c",
                "ip link set lo up && exec sleep 600",
            ]);
        Self::hold(cmd)
    }

    fn hold(mut cmd: Command) -> Self {
        let holder = cmd
            .stdin(Stdio::null())
            .spawn()
            .expect("start a process in a network namespace of its own");
        let netns = Self { holder };
        let own = std::fs::metadata("/proc/self/ns/net")
            .expect("own namespace")
            .ino();
        // Ready once it is `sleep`, in a namespace that is not ours.
        let ready = wait_for(Duration::from_secs(5), || {
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", netns.pid())).ok()?;
            (comm.trim() == "sleep" && netns.inode() != Some(own)).then_some(())
        });
        assert!(ready.is_some(), "the namespace's process did not start");
        netns
    }

    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// The namespace's inode, as `net:[INODE]` names it; `None` once its process is gone.
    pub fn inode(&self) -> Option<u64> {
        std::fs::metadata(self.path()).ok().map(|m| m.ino())
    }

    /// `/proc/PID/ns/net`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid()))
    }

    /// `net:[INODE]`.
    pub fn name(&self) -> String {
        format!("net:[{}]", self.inode().expect("the namespace is alive"))
    }

    /// `program` run in `cgroup` (joined first) and in this namespace.
    pub fn command(&self, cgroup: &TestCgroup, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = cgroup.command("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
