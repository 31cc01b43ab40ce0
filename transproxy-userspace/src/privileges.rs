//! Process limits and privileges.
//!
//! Everything that needs root happens first: raising the file descriptor limit, binding the
//! listeners, loading, attaching and pinning the programs. Then the daemon gives up what it no
//! longer needs, before any worker thread exists (capabilities are per thread; threads created
//! later inherit the reduced set).
//!
//! What remains after [`drop_privileges`]: no capabilities at all, root's uid unless `--user`
//! names another. The daemon keeps working because everything it still does goes through file
//! descriptors it already holds: accepting on the listeners, connecting out, and reading and
//! writing the BPF maps (map access is checked when a map is created or opened, not per use).

use std::ffi::CString;

use anyhow::{Context as _, anyhow, bail};
use caps::CapSet;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tracing::{info, warn};

use crate::relay;

/// Refuses to go on without root, with a clear reason: `why` says what the command does that
/// needs it.
pub(crate) fn require_root(command: &str, why: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("transproxy {command} must run as root ({why}); try sudo");
    }
    Ok(())
}

/// What `run` and `exec` do that needs root.
pub(crate) const ATTACHES: &str = "it loads eBPF programs and attaches them to a cgroup";

/// Raises the soft file descriptor limit to the hard one and returns it: every tunnel holds
/// several descriptors, and the default soft limit (often 1024) is what makes peers fail with
/// "Too many open files" under load.
pub(crate) fn raise_fd_limit() -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Descriptors kept for everything but tunnels: listeners, maps, logs, the runtime.
const RESERVED_FDS: u64 = 64;

/// Shares the descriptor limit: how many tunnels to admit (`--max-tunnels`, or what the limit
/// allows) and how many pipes may be open, the descriptors left once every admitted tunnel has
/// its two sockets. Past the limit, accepts and proxy connects would fail with "Too many open
/// files", so a `--max-tunnels` the limit cannot hold is refused.
pub(crate) fn share_descriptors(
    max_tunnels: Option<usize>,
    fd_limit: u64,
) -> anyhow::Result<(usize, usize)> {
    let usable = fd_limit.saturating_sub(RESERVED_FDS);
    let most = (usable / 2).max(1);
    let tunnels = match max_tunnels {
        None => (usable / relay::FDS_PER_TUNNEL).max(1),
        Some(n) if n as u64 <= most => n as u64,
        Some(n) => bail!(
            "--max-tunnels {n}: the descriptor limit of {fd_limit} holds at most {most} tunnels (two sockets each); raise the hard limit (ulimit -Hn) or ask for fewer"
        ),
    };
    let pipes = usable.saturating_sub(2 * tunnels) / 2;
    let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    Ok((count(tunnels), count(pipes)))
}

/// Whether using a BPF map through its fd still needs CAP_BPF: before Linux 6.5 every bpf()
/// command did when `kernel.unprivileged_bpf_disabled` is set (the default on most
/// distributions); since then only creating maps and loading programs does.
fn map_access_needs_cap_bpf() -> bool {
    let before_6_5 = aya::util::KernelVersion::current()
        .map(|v| v < aya::util::KernelVersion::new(6, 5, 0))
        .unwrap_or(true);
    let restricted = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .map(|v| v.trim() != "0")
        .unwrap_or(true);
    before_6_5 && restricted
}

/// The user `--user` names (by name or number), checked before anything is attached: a user
/// the daemon cannot become must stop it before it pins a kill switch it cannot serve.
pub(crate) struct RunAs {
    name: String,
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
}

impl RunAs {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Whether this user may read `path`, by its owner, group (primary or supplementary) and
    /// mode bits, as the kernel would decide for a process of the user.
    pub(crate) fn can_read(&self, path: &std::path::Path) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        let mode = meta.mode();
        if meta.uid() == self.uid.as_raw() {
            return mode & 0o400 != 0;
        }
        let groups = CString::new(self.name.as_str())
            .ok()
            .and_then(|name| nix::unistd::getgrouplist(&name, self.gid).ok())
            .unwrap_or_else(|| vec![self.gid]);
        if groups.iter().any(|g| g.as_raw() == meta.gid()) {
            return mode & 0o040 != 0;
        }
        mode & 0o004 != 0
    }
}

impl RunAs {
    pub(crate) fn look_up(spec: &str) -> anyhow::Result<Self> {
        if map_access_needs_cap_bpf() {
            bail!(
                "--user needs Linux 6.5 or later here: older kernels only allow BPF map access to root with CAP_BPF"
            );
        }
        let found = match spec.parse::<u32>() {
            Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
            Err(_) => nix::unistd::User::from_name(spec),
        };
        let user = found
            .with_context(|| format!("cannot look up user '{spec}'"))?
            .ok_or_else(|| anyhow!("--user: no user named or numbered '{spec}'"))?;
        warn_if_shared(&user.name, user.uid);
        Ok(Self {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
        })
    }
}

/// Warns when processes already run as the `--user` uid: any of them may signal the daemon,
/// and killing it ends interception (without `--fail-closed`) or stops it (with it).
fn warn_if_shared(name: &str, uid: nix::unistd::Uid) {
    use std::os::unix::fs::MetadataExt as _;
    let others: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|entry| entry.metadata().is_ok_and(|m| m.uid() == uid.as_raw()))
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("comm")).ok())
        .map(|comm| comm.trim().to_owned())
        .take(5)
        .collect();
    if !others.is_empty() {
        warn!(
            "--user {name}: other processes run as this user ({}); any of them can signal or kill the daemon, which ends interception unless --fail-closed: give transproxy a user of its own",
            others.join(", ")
        );
    }
}

/// Keeps the capabilities in `keep` and gives up every other one for good (the bounding set
/// too), with no_new_privs. For the processes that keep some: the gateway daemon and the
/// namespace opener.
pub(crate) fn keep_only(keep: &caps::CapsHashSet) -> anyhow::Result<()> {
    for cap in caps::all() {
        if !keep.contains(&cap) {
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    for set in [CapSet::Effective, CapSet::Permitted] {
        caps::set(None, set, keep).map_err(|err| anyhow!("cannot reduce capabilities: {err}"))?;
    }
    for set in [CapSet::Inheritable, CapSet::Ambient] {
        caps::clear(None, set).map_err(|err| anyhow!("cannot clear capabilities: {err}"))?;
    }
    nix::sys::prctl::set_no_new_privs().context("cannot set no_new_privs")?;
    Ok(())
}

/// Gives up every capability but CAP_NET_ADMIN, which gateway mode needs to remove its policy
/// rules and routes at stop. Must be called before the runtime starts its threads.
pub(crate) fn keep_only_net_admin() -> anyhow::Result<()> {
    let mut keep = caps::CapsHashSet::from([caps::Capability::CAP_NET_ADMIN]);
    if map_access_needs_cap_bpf() {
        keep.insert(caps::Capability::CAP_BPF);
    }
    keep_only(&keep)?;
    info!("dropped all capabilities but CAP_NET_ADMIN (to undo the gateway's routing at stop)");
    Ok(())
}

/// Gives up every capability (all but CAP_BPF on kernels that need it for map access), and
/// switches to `user` if given. Must be called before the runtime starts its threads.
pub(crate) fn drop_privileges(user: Option<&RunAs>) -> anyhow::Result<()> {
    if map_access_needs_cap_bpf() {
        // `RunAs::look_up` refused a user already.
        let keep = caps::CapsHashSet::from([caps::Capability::CAP_BPF]);
        for set in [CapSet::Effective, CapSet::Permitted] {
            caps::set(None, set, &keep)
                .map_err(|err| anyhow!("cannot reduce capabilities: {err}"))?;
        }
        info!("dropped all capabilities but CAP_BPF (map access needs it before Linux 6.5)");
        return Ok(());
    }
    // Bounding set first: changing it needs CAP_SETPCAP, which leaving uid 0 (or the next step)
    // removes. Clearing it takes nothing from the effective set, so the switch below still can.
    caps::clear(None, CapSet::Bounding).map_err(|err| {
        anyhow!("cannot clear the capability bounding set (it takes CAP_SETPCAP): {err}")
    })?;
    if let Some(user) = user {
        let cname = CString::new(user.name.as_str()).context("user name contains a NUL byte")?;
        nix::unistd::initgroups(&cname, user.gid).context("cannot set the user's groups")?;
        nix::unistd::setgid(user.gid).context("cannot switch group")?;
        // Leaving uid 0 clears the permitted and effective capability sets.
        nix::unistd::setuid(user.uid).context("cannot switch user")?;
    }
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|err| anyhow!("cannot clear capabilities: {err}"))?;
    }
    nix::sys::prctl::set_no_new_privs().context("cannot set no_new_privs")?;
    info!(
        "dropped all capabilities{}",
        user.map(|u| format!(" and switched to user {}", u.name))
            .unwrap_or_default()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_shared_between_sockets_and_pipes() {
        // By default a third of the usable descriptors goes to pipes.
        assert_eq!(share_descriptors(None, 20_064).unwrap(), (6_666, 3_334));
        // Asking for the most leaves no pipe: every bulk direction copies.
        assert_eq!(
            share_descriptors(Some(10_000), 20_064).unwrap(),
            (10_000, 0)
        );
        let err = share_descriptors(Some(10_001), 20_064)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 10000 tunnels"), "{err}");
        // A limit too small for anything still admits one tunnel.
        assert_eq!(share_descriptors(None, 10).unwrap(), (1, 0));
    }
}
