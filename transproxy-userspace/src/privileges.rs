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
use tracing::info;

/// Raises the soft file descriptor limit to the hard one and returns it: every tunnel holds
/// several descriptors, and the default soft limit (often 1024) is what makes peers fail with
/// "Too many open files" under load.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
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
pub struct RunAs {
    name: String,
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
}

impl RunAs {
    pub fn look_up(spec: &str) -> anyhow::Result<Self> {
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
        Ok(Self {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
        })
    }
}

/// Gives up every capability (all but CAP_BPF on kernels that need it for map access), and
/// switches to `user` if given. Must be called before the runtime starts its threads.
pub fn drop_privileges(user: Option<&RunAs>) -> anyhow::Result<()> {
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
    // SAFETY: prctl with these arguments only sets a flag on this process.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        bail!(
            "cannot set no_new_privs: {}",
            std::io::Error::last_os_error()
        );
    }
    info!(
        "dropped all capabilities{}",
        user.map(|u| format!(" and switched to user {}", u.name))
            .unwrap_or_default()
    );
    Ok(())
}
