//! What the kernel says about an interceptor process: CPU time, resident memory, sockets.

use std::fs;

use anyhow::{Context as _, bail};

/// User plus system CPU seconds the process has used so far, all threads included
/// (`utime + stime` of /proc/PID/stat).
pub(crate) fn cpu_seconds(pid: i32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) may contain spaces; the fields after it never do.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path}: no command name"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("{path}: too few fields"))?
            .parse()
            .with_context(|| format!("{path}: field {} is not a number", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if per_second <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    Ok(total as f64 / per_second as f64)
}

/// Resident memory in bytes (VmRSS of /proc/PID/status).
pub(crate) fn rss_bytes(pid: i32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .with_context(|| format!("{path}: no VmRSS"))?
        .parse()
        .with_context(|| format!("{path}: VmRSS is not a number"))?;
    Ok(kib * 1024)
}

/// Sockets the process has open: how the benchmark checks that connections really go through
/// an interceptor.
pub(crate) fn socket_count(pid: i32) -> anyhow::Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))?;
    Ok(entries
        .filter_map(Result::ok)
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count())
}
