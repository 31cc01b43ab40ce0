//! Finding and checking the cgroup v2 directory the programs attach to.
//!
//! Hosts mount cgroup v2 in different places (`/sys/fs/cgroup` on unified hosts,
//! `/sys/fs/cgroup/unified` on hybrid ones), so the root is read from `/proc/self/mounts`,
//! never assumed.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// `statfs` magic of a cgroup v2 filesystem.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `statfs` magic of a cgroup v1 filesystem.
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;

/// The mount point of the cgroup v2 hierarchy.
pub fn v2_root() -> anyhow::Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    v2_root_in(&mounts)
        .context("no cgroup v2 hierarchy is mounted (no cgroup2 line in /proc/self/mounts)")
}

fn v2_root_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// `/proc/self/mounts` writes space, tab, newline and backslash as octal escapes (`\040`).
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens `dir` for attaching, after checking that it is a cgroup v2 directory.
pub fn open_v2(dir: &Path) -> anyhow::Result<File> {
    let file = File::open(dir).with_context(|| format!("cannot open cgroup {}", dir.display()))?;
    if !file.metadata()?.is_dir() {
        bail!("cgroup {} is not a directory", dir.display());
    }
    // SAFETY: `statfs` fills the zeroed struct we own; the fd is valid for the call.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot statfs {}", dir.display()));
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between targets"
    )]
    match stat.f_type as i64 {
        CGROUP2_SUPER_MAGIC => Ok(file),
        CGROUP_SUPER_MAGIC => {
            let hint = v2_root()
                .map(|r| format!(" (cgroup v2 is mounted at {})", r.display()))
                .unwrap_or_default();
            bail!(
                "{} is a cgroup v1 directory; transproxy needs a cgroup v2 directory{hint}",
                dir.display()
            )
        }
        _ => bail!("{} is not a cgroup directory", dir.display()),
    }
}

/// A cgroup made for one `transproxy exec`, below the cgroup v2 root. Dropping it kills whatever
/// still runs inside and removes the directory.
pub struct TransientCgroup {
    path: PathBuf,
    file: File,
}

impl TransientCgroup {
    pub fn create() -> anyhow::Result<Self> {
        let path = v2_root()?.join(format!("transproxy-exec-{}", std::process::id()));
        // A leftover of an earlier process with our pid: empty, or we could not create it.
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create cgroup {}", path.display()))?;
        match open_v2(&path) {
            Ok(file) => Ok(Self { path, file }),
            Err(err) => {
                let _ = std::fs::remove_dir(&path);
                Err(err)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writing a pid (or "0", for oneself) here moves that process into the cgroup.
    pub fn procs_path(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    fn kill_all(&self) {
        // cgroup.kill (Linux 5.14) kills every process inside at once, new forks included.
        if std::fs::write(self.path.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        let procs = std::fs::read_to_string(self.procs_path()).unwrap_or_default();
        for pid in procs
            .lines()
            .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
        {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for TransientCgroup {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.procs_path()).unwrap_or_default();
        if !procs.trim().is_empty() {
            tracing::info!(
                "killing what the command left running in {}",
                self.path.display()
            );
            self.kill_all();
        }
        // Killed processes leave the cgroup asynchronously.
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(err) => {
                    tracing::warn!("cannot remove cgroup {}: {err}", self.path.display());
                    return;
                }
            }
        }
        tracing::warn!(
            "cannot remove cgroup {}: processes are still inside",
            self.path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            v2_root_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(v2_root_in(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(v2_root_in("proc /proc proc rw 0 0\n"), None);
        assert_eq!(
            v2_root_in("none /my\\040cgroups cgroup2 rw 0 0"),
            Some(PathBuf::from("/my cgroups"))
        );
    }

    #[test]
    fn rejects_what_is_not_a_cgroup_v2_directory() {
        let err = format!(
            "{:#}",
            open_v2(Path::new("/nonexistent/transproxy")).unwrap_err()
        );
        assert!(
            err.contains("cannot open cgroup /nonexistent/transproxy"),
            "{err}"
        );
        let err = format!("{:#}", open_v2(Path::new("/proc")).unwrap_err());
        assert!(err.contains("not a cgroup directory"), "{err}");
    }
}
