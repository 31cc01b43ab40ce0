//! Finding and checking the cgroup v2 directory the programs attach to.
//!
//! Hosts mount cgroup v2 in different places (`/sys/fs/cgroup` on unified hosts,
//! `/sys/fs/cgroup/unified` on hybrid ones), so the root is read from `/proc/self/mounts`,
//! never assumed.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::{
        signal::{Signal, kill},
        statfs::{CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, fstatfs},
    },
    unistd::Pid,
};

/// The mount point of the cgroup v2 hierarchy.
pub(crate) fn v2_root() -> anyhow::Result<PathBuf> {
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

/// The paths of the cgroup v2 directories whose ids (inode numbers) are in `ids`, found in one
/// walk of the hierarchy (bounded). Ids not found (cgroups gone) are left out.
pub(crate) fn paths_by_id(
    ids: &std::collections::HashSet<u64>,
) -> std::collections::HashMap<u64, PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mut found = std::collections::HashMap::new();
    let Ok(root) = v2_root() else {
        return found;
    };
    let mut pending = vec![root];
    let mut visited = 0;
    while let Some(dir) = pending.pop() {
        if found.len() == ids.len() || visited > 100_000 {
            break;
        }
        visited += 1;
        if let Ok(meta) = std::fs::metadata(&dir)
            && ids.contains(&meta.ino())
        {
            found.insert(meta.ino(), dir.clone());
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(entry.path());
            }
        }
    }
    found
}

/// The path below `tree` of the cgroup with id `id` (its directory's inode), if it is in that
/// tree: a walk of the tree, bounded.
pub(crate) fn path_below(tree: &Path, id: u64) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mut pending = vec![tree.to_path_buf()];
    let mut visited = 0;
    while let Some(dir) = pending.pop() {
        visited += 1;
        if visited > 100_000 {
            return None;
        }
        if std::fs::metadata(&dir).is_ok_and(|meta| meta.ino() == id) {
            return dir.strip_prefix(tree).ok().map(Path::to_path_buf);
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(entry.path());
            }
        }
    }
    None
}

/// Opens `dir` for attaching, after checking that it is a cgroup v2 directory.
pub(crate) fn open_v2(dir: &Path) -> anyhow::Result<File> {
    let file = File::open(dir).with_context(|| format!("cannot open cgroup {}", dir.display()))?;
    if !file.metadata()?.is_dir() {
        bail!("cgroup {} is not a directory", dir.display());
    }
    let fs_type = fstatfs(&file)
        .with_context(|| format!("cannot statfs {}", dir.display()))?
        .filesystem_type();
    match fs_type {
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

/// Name prefix of the transient cgroups; the exec process's pid follows.
const TRANSIENT_PREFIX: &str = "transproxy-exec-";

/// A cgroup made for one `transproxy exec`, below the cgroup v2 root. Dropping it kills whatever
/// still runs inside and removes the directory.
pub(crate) struct TransientCgroup {
    path: PathBuf,
    file: File,
}

impl TransientCgroup {
    /// Creates the cgroup of this process, after removing those that execs killed by SIGKILL
    /// (which cannot clean up) left behind.
    pub(crate) fn create() -> anyhow::Result<Self> {
        let root = v2_root()?;
        remove_stale(&root);
        let path = root.join(format!("{TRANSIENT_PREFIX}{}", std::process::id()));
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

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Writing a pid (or "0", for oneself) here moves that process into the cgroup.
    pub(crate) fn procs_path(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }
}

impl Drop for TransientCgroup {
    fn drop(&mut self) {
        kill_and_remove(&self.path, "the command left running");
    }
}

/// Removes the transient cgroups whose exec process is gone, killing what still runs there (no
/// longer intercepted: the programs detached when their exec died). A cgroup named after our
/// own pid is stale too: we have not made ours yet. A pid that lives again as another process
/// keeps its cgroup until a later exec finds it dead: never touching a live exec's matters more.
fn remove_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TRANSIENT_PREFIX))
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
            .filter(|&pid| pid > 0)
        else {
            continue;
        };
        if pid as u32 == std::process::id() || !process_alive(pid) {
            kill_and_remove(&entry.path(), "a killed exec left running");
        }
    }
}

/// Whether process `pid` is alive. A zombie is not: a killed exec whose parent has yet to reap
/// it holds no links anymore. When in doubt (an unreadable entry), alive.
fn process_alive(pid: libc::pid_t) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain any.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| !matches!(state, "Z" | "X")),
        Err(err) => err.kind() != std::io::ErrorKind::NotFound,
    }
}

/// Kills every process in the cgroup `dir` and removes it; `what` says whose they are.
fn kill_and_remove(dir: &Path, what: &str) {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    if !procs.trim().is_empty() {
        tracing::info!("killing what {what} in {}", dir.display());
        // cgroup.kill (Linux 5.14) kills every process inside at once, new forks included.
        if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
            for pid in procs
                .lines()
                .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
                // 0 stands for a process of another PID namespace; kill(0) would hit our group.
                .filter(|&pid| pid > 0)
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    // Killed processes leave the cgroup asynchronously.
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            // Another exec removing the same stale cgroup got there first.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(err) => {
                tracing::warn!("cannot remove cgroup {}: {err}", dir.display());
                return;
            }
        }
    }
    tracing::warn!(
        "cannot remove cgroup {}: processes are still inside",
        dir.display()
    );
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
    fn zombies_and_missing_processes_are_not_alive() {
        assert!(process_alive(std::process::id() as libc::pid_t));
        assert!(!process_alive(libc::pid_t::MAX));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as libc::pid_t;
        // Not reaped yet: a zombie once it has exited.
        let mut zombie_seen = false;
        for _ in 0..500 {
            if !process_alive(pid) {
                zombie_seen = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(zombie_seen, "`true` never ended");
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
