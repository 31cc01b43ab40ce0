//! `--fail-closed`: interception that outlives the daemon.
//!
//! By default the programs hang on links owned by the daemon, so they detach when it dies and
//! connections go direct (fail-open). With the kill switch the links are pinned in bpffs
//! instead: the programs (and the maps they use) stay attached, and with the daemon's listener
//! gone they refuse every connect they would have redirected (ECONNREFUSED). Nothing goes around
//! the proxy, and nothing is handed to whoever binds the listener's port afterwards: the
//! programs redirect only to a socket in their listeners map, which the kernel empties when the
//! daemon's sockets close.
//!
//! `transproxy detach` removes the pins. Any daemon that starts on the same cgroup takes over
//! pins left by one that stopped, once its own programs are attached (with or without the kill
//! switch itself), and refuses to start while the daemon that made them still runs.
//!
//! Layout: `/sys/fs/bpf/transproxy/cg-<cgroup inode>/<pid>-<start time>/{<program>, LISTENERS}`,
//! every folder owned by root and closed to others; a folder someone else made is refused.
//! The pinned `LISTENERS` map tells whether the daemon that made the pins is alive: its entries
//! exist exactly as long as that daemon's listening sockets.

use std::{
    fs,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    maps::{Map, MapData, SockHash},
    programs::links::FdLink,
};
use nix::{
    mount::MsFlags,
    sys::statfs::{BPF_FS_MAGIC, statfs},
};
use tracing::{debug, info};
use transproxy_common::{ListenerKey, names};

/// Where bpffs is conventionally mounted.
const BPFFS: &str = "/sys/fs/bpf";
/// transproxy's own folder in bpffs.
const ROOT: &str = "/sys/fs/bpf/transproxy";

/// This daemon's pin folder for one cgroup. Removed again (detaching what was pinned) unless
/// [`PinDir::keep`] is called once the daemon has started: a failed start leaves nothing.
pub(crate) struct PinDir {
    own: PathBuf,
    kept: bool,
}

impl PinDir {
    pub(crate) fn for_cgroup(cgroup: &Path) -> anyhow::Result<Self> {
        Self::in_group(&cgroup_pins(cgroup)?)
    }

    /// This daemon's folder in the pin group `group` (a cgroup's, or a gateway's).
    pub(crate) fn in_group(group: &Path) -> anyhow::Result<Self> {
        ensure_bpffs()?;
        let cgroup_dir = trusted_dir(group, true)?;
        let own = cgroup_dir.join(own_name());
        let _ = fs::remove_dir_all(&own);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&own)
            .with_context(|| format!("cannot create {}", own.display()))?;
        Ok(Self { own, kept: false })
    }

    /// Pins `link` under `name`: from now on it stays attached after the daemon exits.
    pub(crate) fn pin(&self, name: &str, link: FdLink) -> anyhow::Result<()> {
        let path = self.own.join(name);
        link.pin(&path)
            .with_context(|| format!("cannot pin {name} at {}", path.display()))?;
        Ok(())
    }

    /// Pins a map under `name`, for whoever checks later whether this daemon is alive.
    pub(crate) fn pin_map(&self, name: &str, map: &Map) -> anyhow::Result<()> {
        let path = self.own.join(name);
        map.pin(&path)
            .with_context(|| format!("cannot pin the {name} map at {}", path.display()))
    }

    /// Keeps the pins for good: the daemon started.
    pub(crate) fn keep(mut self) -> PathBuf {
        self.kept = true;
        self.own.clone()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if !self.kept {
            let _ = fs::remove_dir_all(&self.own);
        }
    }
}

/// The pins one daemon left (or holds) for a cgroup.
#[derive(Debug)]
pub(crate) struct KillSwitch {
    pub(crate) path: PathBuf,
    /// The daemon that made them, from the folder's name.
    pub(crate) pid: Option<u32>,
    /// Whether that daemon's listeners are still open.
    pub(crate) alive: bool,
}

impl KillSwitch {
    fn at(path: PathBuf) -> Self {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let pid = name.split('-').next().and_then(|pid| pid.parse().ok());
        let alive = listeners_open(&path.join(names::LISTENERS));
        Self { path, pid, alive }
    }

    /// "pid N" or the folder.
    pub(crate) fn owner(&self) -> String {
        match self.pid {
            Some(pid) => format!("pid {pid}"),
            None => self.path.display().to_string(),
        }
    }

    /// Removes the pins: the programs they hold detach at once.
    pub(crate) fn remove(&self) -> anyhow::Result<()> {
        fs::remove_dir_all(&self.path)
            .with_context(|| format!("cannot remove the pins at {}", self.path.display()))
    }
}

/// Whether the pinned listeners map at `path` holds a socket, i.e. its daemon's listeners are
/// open. A folder from before this map was pinned counts as stopped.
fn listeners_open(path: &Path) -> bool {
    let Ok(data) = MapData::from_pin(path) else {
        return false;
    };
    let Ok(map) = Map::from_map_data(data) else {
        return false;
    };
    SockHash::<_, ListenerKey>::try_from(map).is_ok_and(|map| map.keys().next().is_some())
}

/// The kill switches pinned in the pin group `dir` (a cgroup's or a gateway's), by this daemon
/// or others.
fn in_group(dir: &Path) -> anyhow::Result<Vec<KillSwitch>> {
    let dir = dir.to_path_buf();
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let dir = trusted_dir(&dir, false)?;
    let mut found = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
        found.push(KillSwitch::at(entry?.path()));
    }
    Ok(found)
}

/// Before attaching to `cgroup`: refuses to start while another daemon with the kill switch
/// serves it (taking its pins would silently end its interception), and returns the pins of
/// stopped ones, to take over once attached.
pub(crate) fn before_attach(cgroup: &Path) -> anyhow::Result<Vec<KillSwitch>> {
    before_attach_group(&cgroup_pins(cgroup)?, &cgroup.display().to_string())
}

/// [`before_attach`] for the pin group `group`, which `what` names for people.
pub(crate) fn before_attach_group(group: &Path, what: &str) -> anyhow::Result<Vec<KillSwitch>> {
    let found = in_group(group)?;
    if let Some(live) = found.iter().find(|k| k.alive) {
        bail!(
            "transproxy {} already intercepts {what} with the kill switch; stop it first",
            live.owner(),
        );
    }
    Ok(found)
}

/// The pin group of gateway mode on `interfaces`, in this network namespace.
pub(crate) fn gateway_pins(interfaces: &[String]) -> PathBuf {
    let netns = fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino());
    Path::new(ROOT).join(format!("gw-{netns}-{}", interfaces.join("+")))
}

/// `transproxy detach --gateway`: removes the kill switches of gateway mode on `interface`
/// (alone or with others) in this network namespace.
pub(crate) fn detach_gateway(interface: &str) -> anyhow::Result<Vec<KillSwitch>> {
    let mut removed = Vec::new();
    if !Path::new(ROOT).exists() {
        return Ok(removed);
    }
    let own = gateway_pins(&[]);
    let prefix = own
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for entry in fs::read_dir(trusted_dir(Path::new(ROOT), false)?)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(interfaces) = name.strip_prefix(&prefix) else {
            continue;
        };
        if !interfaces.split('+').any(|i| i == interface) {
            continue;
        }
        let dir = trusted_dir(&entry.path(), false)?;
        for switch in in_group(&dir)? {
            switch.remove()?;
            removed.push(switch);
        }
        fs::remove_dir(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(removed)
}

/// Once attached: removes the pins of stopped daemons, whose programs would otherwise run
/// before ours and refuse what they would redirect. `own` (this daemon's folder) stays.
pub(crate) fn take_over(stopped: Vec<KillSwitch>, own: Option<&Path>) -> anyhow::Result<()> {
    for old in stopped.iter().filter(|k| Some(k.path.as_path()) != own) {
        old.remove()?;
        info!(
            "took over the kill switch left on this cgroup by a stopped transproxy ({})",
            old.owner()
        );
    }
    Ok(())
}

/// Every kill switch pinned on this machine, with its cgroup's path (or its id, once the
/// cgroup is gone).
pub(crate) fn all() -> anyhow::Result<Vec<(String, KillSwitch)>> {
    let mut found = Vec::new();
    for (shown, dir) in pinned_groups()? {
        for entry in fs::read_dir(&dir)? {
            found.push((shown.clone(), KillSwitch::at(entry?.path())));
        }
    }
    Ok(found)
}

/// The per-cgroup pin folders, with the cgroup each belongs to (its path, or its id once it
/// is gone).
fn pinned_groups() -> anyhow::Result<Vec<(String, PathBuf)>> {
    if !Path::new(ROOT).exists() {
        return Ok(Vec::new());
    }
    let root = trusted_dir(Path::new(ROOT), false)?;
    Ok(fs::read_dir(&root)?
        .filter_map(Result::ok)
        .map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let shown = match name.strip_prefix("gw-") {
                Some(gateway) => format!("gateway {gateway} (network namespace, interfaces)"),
                None => name
                    .strip_prefix("cg-")
                    .and_then(|ino| ino.parse().ok())
                    .and_then(cgroup_by_inode)
                    .map_or_else(
                        || format!("{name} (cgroup gone)"),
                        |p| p.display().to_string(),
                    ),
            };
            (shown, entry.path())
        })
        .collect())
}

/// `transproxy detach`: removes the kill switches of `cgroup`, or all of them. Returns what was
/// removed.
pub(crate) fn detach(
    cgroup: Option<&Path>,
    all: bool,
) -> anyhow::Result<Vec<(String, KillSwitch)>> {
    let mut removed = Vec::new();
    let groups: Vec<(String, PathBuf)> = if all {
        pinned_groups()?
    } else {
        let cgroup = match cgroup {
            Some(dir) => dir.to_path_buf(),
            None => super::cgroup::v2_root()?,
        };
        let dir = cgroup_pins(&cgroup)?;
        if !dir.exists() {
            return Ok(removed);
        }
        vec![(cgroup.display().to_string(), trusted_dir(&dir, false)?)]
    };
    for (shown, dir) in groups {
        for entry in fs::read_dir(&dir)? {
            let switch = KillSwitch::at(entry?.path());
            switch.remove()?;
            removed.push((shown.clone(), switch));
        }
        fs::remove_dir(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(removed)
}

/// The pin folder of a cgroup, named by its inode so that a path written differently (a
/// symlink, a trailing slash) still finds the same pins.
fn cgroup_pins(cgroup: &Path) -> anyhow::Result<PathBuf> {
    let inode = fs::metadata(cgroup)
        .with_context(|| {
            format!(
                "cannot open cgroup {} (pins of a removed cgroup: `transproxy detach --all`)",
                cgroup.display()
            )
        })?
        .ino();
    Ok(Path::new(ROOT).join(format!("cg-{inode}")))
}

/// This daemon's folder name: its pid and start time, so that a later process with the same
/// pid never names the same folder.
fn own_name() -> String {
    let pid = std::process::id();
    let start = fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Field 22, counted after the command name, which is in parentheses and may
            // contain anything.
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().nth(19).map(str::to_owned)
        })
        .unwrap_or_else(|| "0".into());
    format!("{pid}-{start}")
}

/// Checks that `dir` and transproxy's folder above it are directories owned by root that no
/// one else can write (a user who made `/sys/fs/bpf/transproxy` first on a bpffs mounted open
/// to all could rename pins so that takeover and `detach` miss them). With `create`, makes
/// what is missing, closed to others. Returns `dir`.
fn trusted_dir(dir: &Path, create: bool) -> anyhow::Result<PathBuf> {
    for path in [Path::new(ROOT), dir] {
        if create && !path.exists() {
            match fs::DirBuilder::new().mode(0o700).create(path) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(err) => {
                    return Err(err).with_context(|| format!("cannot create {}", path.display()));
                }
            }
            // The mode asked for is reduced by the umask only, never widened: make it exact.
            fs::set_permissions(path, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        }
        let meta = fs::symlink_metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if !meta.is_dir() {
            bail!("{} is not a directory; remove it", path.display());
        }
        if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            bail!(
                "{} is owned by uid {} with mode {:o}: not made by transproxy, and others could change it; remove it (rm -r) and start again",
                path.display(),
                meta.uid(),
                meta.mode() & 0o7777
            );
        }
        // Root's and closed to writers, but others may list it (made by an older transproxy):
        // close it, so no one else even sees which cgroups have a kill switch.
        if meta.mode() & 0o077 != 0 {
            fs::set_permissions(path, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        }
    }
    Ok(dir.to_path_buf())
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there yet (a fresh machine may not have
/// it), closed to everyone but root.
fn ensure_bpffs() -> anyhow::Result<()> {
    let mounted = statfs(BPFFS)
        .with_context(|| format!("cannot open {BPFFS}"))?
        .filesystem_type()
        == BPF_FS_MAGIC;
    if mounted {
        let mode = fs::metadata(BPFFS)?.mode();
        if mode & 0o002 != 0 {
            debug!(
                "{BPFFS} is writable by every user (mode {:o}); transproxy keeps its pins in {ROOT}, closed to others",
                mode & 0o7777
            );
        }
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .with_context(|| format!("cannot mount bpffs at {BPFFS}"))?;
    info!("mounted bpffs at {BPFFS} (mode 0700)");
    Ok(())
}

/// The cgroup v2 directory with inode `ino`, if it still exists.
fn cgroup_by_inode(ino: u64) -> Option<PathBuf> {
    super::cgroup::paths_by_id(&std::collections::HashSet::from([ino])).remove(&ino)
}
