//! Cgroups made by a test and removed after it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

/// The cgroup v2 mount point, read from /proc/self/mounts (never assumed).
pub fn v2_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    mounts
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .expect("no cgroup v2 hierarchy mounted: the integration tests need one")
}

/// A fresh cgroup v2 directory below the root. Dropping it kills what still runs inside and
/// removes it.
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new(label: &str) -> Self {
        crate::require_root();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "transproxy-test-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = v2_root().join(name);
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        Self { path }
    }

    /// A cgroup below this one; drop it before its parent.
    pub fn child(&self, label: &str) -> Self {
        let path = self.path.join(label);
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command that moves itself into this cgroup, then execs `program`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.path)
            .arg(program);
        cmd
    }

    fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for pid in self.pids() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let removed = crate::wait_for(Duration::from_secs(5), || fs::remove_dir(&self.path).ok());
        if removed.is_none() && !std::thread::panicking() {
            panic!("cannot remove cgroup {}", self.path.display());
        }
    }
}
