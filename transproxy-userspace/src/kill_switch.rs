//! `--fail-closed`: interception that outlives the daemon.
//!
//! By default the programs hang on links owned by the daemon, so they detach when it dies and
//! connections go direct (fail-open). With the kill switch the links are pinned in bpffs
//! instead: the programs (and the maps they use) stay attached, connects keep being redirected
//! to the listener, and with no daemon listening they fail with ECONNREFUSED. Nothing goes
//! around the proxy. `transproxy detach` removes the pins; so does the next daemon for the same
//! cgroup, once its own programs are attached (it takes over without a fail-open gap).
//!
//! Layout: `/sys/fs/bpf/transproxy/cg-<cgroup inode>/<daemon pid>/<program>`.

use std::{
    ffi::CString,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::programs::links::FdLink;
use tracing::info;

/// Where bpffs is conventionally mounted.
const BPFFS: &str = "/sys/fs/bpf";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// This daemon's pin directory for one cgroup.
pub struct PinDir {
    /// All pins for the cgroup, one subdirectory per daemon.
    cgroup_dir: PathBuf,
    /// This daemon's.
    own: PathBuf,
}

impl PinDir {
    pub fn for_cgroup(cgroup: &Path) -> anyhow::Result<Self> {
        ensure_bpffs()?;
        let cgroup_dir = cgroup_pins(cgroup)?;
        let own = cgroup_dir.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&own);
        std::fs::create_dir_all(&own)
            .with_context(|| format!("cannot create {}", own.display()))?;
        Ok(Self { cgroup_dir, own })
    }

    /// Pins `link` under `name`: from now on it stays attached after the daemon exits.
    pub fn pin(&self, name: &str, link: FdLink) -> anyhow::Result<()> {
        let path = self.own.join(name);
        link.pin(&path)
            .with_context(|| format!("cannot pin {name} at {}", path.display()))?;
        Ok(())
    }

    /// Removes the pins earlier daemons left for this cgroup, detaching their programs.
    pub fn remove_others(&self) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(&self.cgroup_dir)? {
            let path = entry?.path();
            if path != self.own {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("cannot remove old pins {}", path.display()))?;
                info!(
                    "removed the pinned programs of an earlier daemon ({})",
                    path.display()
                );
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.own
    }
}

/// `transproxy detach`: removes the pins for `cgroup`, or all of them. Returns how many daemons'
/// pins were removed.
pub fn detach(cgroup: Option<&Path>, all: bool) -> anyhow::Result<usize> {
    let root = Path::new(BPFFS).join("transproxy");
    let dir = if all {
        root
    } else {
        let cgroup = match cgroup {
            Some(dir) => dir.to_path_buf(),
            None => crate::cgroup::v2_root()?,
        };
        cgroup_pins(&cgroup)?
    };
    if !dir.exists() {
        return Ok(0);
    }
    let count = std::fs::read_dir(&dir)?.count();
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(count)
}

/// The pin directory of a cgroup, named by its inode so that a path written differently (a
/// symlink, a trailing slash) still finds the same pins.
fn cgroup_pins(cgroup: &Path) -> anyhow::Result<PathBuf> {
    let inode = std::fs::metadata(cgroup)
        .with_context(|| {
            format!(
                "cannot open cgroup {} (pins of a removed cgroup: `transproxy detach --all`)",
                cgroup.display()
            )
        })?
        .ino();
    Ok(Path::new(BPFFS)
        .join("transproxy")
        .join(format!("cg-{inode}")))
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there yet (a fresh machine may not have it).
fn ensure_bpffs() -> anyhow::Result<()> {
    let dir = std::fs::File::open(BPFFS).with_context(|| format!("cannot open {BPFFS}"))?;
    // SAFETY: `statfs` fills the zeroed struct we own; the fd is valid for the call.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(dir.as_raw_fd(), &mut stat) } == 0
        && stat.f_type as i64 == BPF_FS_MAGIC
    {
        return Ok(());
    }
    let (source, target, fstype) = (c"bpf", CString::new(BPFFS)?, c"bpf");
    // SAFETY: valid NUL-terminated strings; no data argument.
    if unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    } != 0
    {
        bail!(
            "cannot mount bpffs at {BPFFS}: {}",
            std::io::Error::last_os_error()
        );
    }
    info!("mounted bpffs at {BPFFS}");
    Ok(())
}
