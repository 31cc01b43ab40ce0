//! The descriptor limit every process of the benchmark inherits.

use anyhow::bail;

/// Enough for 10,000 idle tunnels in the busiest process: the fast proxy holds two sockets and
/// two pipes (four descriptors) per tunnel, transproxy a few per tunnel, plus spare.
const WANTED: libc::rlim_t = 131_072;

/// Raises RLIMIT_NOFILE before any child starts, so the interceptors, the upstreams, nginx and
/// the clients all inherit it. Root may raise the hard limit too (up to `fs.nr_open`); anyone
/// else gets the hard limit. Returns the limit now in force.
pub(crate) fn raise_descriptor_limit() -> anyhow::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(limit.rlim_max);
    let target = WANTED.min(nr_open).max(limit.rlim_max);
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: target,
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(target);
    }
    let soft = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } != 0 {
        bail!(
            "setrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(limit.rlim_max)
}
