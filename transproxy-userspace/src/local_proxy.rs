//! A proxy on this host (cntlm, px, squid on 127.0.0.1): whoever listens on its address, so
//! that its own outgoing connections are never intercepted.
//!
//! When such a proxy runs inside the intercepted cgroup (host-wide mode, or a user's session
//! cgroup), every one of its connects would be sent back to the daemon, which sends it to the
//! proxy again: a loop until descriptors run out. The daemon finds the processes holding the
//! proxy's listening socket (`/proc/net/tcp*` for the socket, `/proc/*/fd` for its holders)
//! and exempts them in the kernel: by their cgroup when it is a unit of their own (a systemd
//! service or scope, a container) holding nothing else; else by their user when it is a
//! system user (not root, uid below 1000, so no one's session); else exactly those processes,
//! while they run (the daemon watches them and looks again when one exits, so a pid reused by
//! another process is not exempt).

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// The processes serving the proxy on this host, and how they are kept out of interception.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocalProxy {
    /// The processes holding the proxy's listening socket.
    pub(crate) pids: Vec<u32>,
    /// The first one's command name and uid, to name it.
    command: String,
    uid: u32,
    pub(crate) exemption: Exemption,
}

/// How a local proxy inside the intercepted cgroup is kept out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Exemption {
    /// Its cgroup is outside the intercepted one: nothing to do.
    NotNeeded,
    /// Its cgroup (id, path) is a unit of its own: that cgroup is exempt.
    Cgroup(u64, PathBuf),
    /// It runs as a system user: that user is exempt.
    User(u32),
    /// Its processes, exactly, while they run.
    Processes,
}

/// The first uid of login users (Debian's `FIRST_UID`); below are system users.
const FIRST_LOGIN_UID: u32 = 1000;

impl fmt::Display for LocalProxy {
    /// `the local proxy squid (pid 812, uid 13) is not intercepted: its cgroup ... is exempt`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pid = self.pids.first().copied().unwrap_or(0);
        let who = format!(
            "the local proxy {} (pid {pid}, uid {})",
            self.command, self.uid
        );
        match &self.exemption {
            Exemption::NotNeeded => write!(f, "{who} runs outside the intercepted cgroup"),
            Exemption::Cgroup(_, path) => write!(
                f,
                "{who} is not intercepted: its cgroup {} is exempt",
                path.display()
            ),
            Exemption::User(uid) => write!(
                f,
                "{who} is not intercepted: its user (uid {uid}) is exempt, with every process of that user"
            ),
            Exemption::Processes => {
                let pids: Vec<String> = self.pids.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "{who} is not intercepted: its processes ({}) are exempt while they run",
                    pids.join(", ")
                )
            }
        }
    }
}

/// What a look for the local proxy found.
#[derive(Debug)]
pub(crate) enum Scan {
    Found(LocalProxy),
    /// No proxy on this host listens at its addresses.
    None,
    /// Someone listens, but whose socket it is could not be seen: other users' open files
    /// are closed to the daemon once it has dropped its privileges (it needs CAP_SYS_PTRACE to
    /// read them). What was found before stands.
    Unknown,
}

/// Looks for the local proxy at `addrs` (the proxy's addresses): one of them on this host, and
/// someone listening there. `intercepted` is the intercepted cgroup's directory, `v2_root` the
/// hierarchy's mount point.
pub(crate) fn find(addrs: &[SocketAddr], intercepted: &Path, v2_root: &Path) -> Scan {
    let local: Vec<SocketAddr> = addrs.iter().copied().filter(is_local).collect();
    if local.is_empty() {
        return Scan::None;
    }
    let inodes = listening_inodes(&local);
    if inodes.is_empty() {
        return Scan::None;
    }
    let (pids, unreadable) = holders(&inodes);
    match pids.first() {
        Some(_) => describe(pids, intercepted, v2_root).map_or(Scan::Unknown, Scan::Found),
        None if unreadable => Scan::Unknown,
        None => Scan::None,
    }
}

/// The local proxy made of the processes `pids` (holding its listening socket), and how it is
/// kept out of interception.
fn describe(pids: Vec<u32>, intercepted: &Path, v2_root: &Path) -> Option<LocalProxy> {
    let first = *pids.first()?;
    let uid = std::fs::metadata(format!("/proc/{first}")).ok()?.uid();
    let command = std::fs::read_to_string(format!("/proc/{first}/comm"))
        .map(|c| c.trim().to_owned())
        .unwrap_or_default();
    let cgroup = cgroup_of(first, v2_root)?;
    let exemption = if !cgroup.starts_with(intercepted) {
        Exemption::NotNeeded
    } else if is_unit(&cgroup) && cgroup_holds_only(&cgroup, &pids) {
        let id = std::fs::metadata(&cgroup).ok()?.ino();
        Exemption::Cgroup(id, cgroup)
    } else if uid != 0 && uid < FIRST_LOGIN_UID {
        Exemption::User(uid)
    } else {
        Exemption::Processes
    };
    Some(LocalProxy {
        pids,
        command,
        uid,
        exemption,
    })
}

/// Whether `addr`'s address belongs to this host (binding to it works).
fn is_local(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => true,
        IpAddr::V6(ip) if ip.is_loopback() => true,
        ip => UdpSocket::bind((ip, 0)).is_ok(),
    }
}

/// The inodes of the listening TCP sockets on `addrs` (or on the wildcard address, same port).
fn listening_inodes(addrs: &[SocketAddr]) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(table) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, rem_address, st, ..., uid, timeout, inode
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if *state != "0A" {
                continue;
            }
            let Some(listening) = parse_proc_addr(local, v6) else {
                continue;
            };
            let serves = addrs.iter().any(|addr| {
                addr.port() == listening.port()
                    && (listening.ip() == addr.ip()
                        || listening.ip().is_unspecified()
                        || listening.ip().to_canonical() == addr.ip())
            });
            if serves && let Ok(inode) = inode.parse() {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

/// `0100007F:0CEA` (IPv4, each word in host byte order as the kernel prints it) or the 32-hex
/// IPv6 form, to a socket address.
fn parse_proc_addr(text: &str, v6: bool) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = if v6 {
        let mut bytes = [0u8; 16];
        for (i, chunk) in bytes.chunks_mut(4).enumerate() {
            let word = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::from(bytes)
    } else {
        IpAddr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes())
    };
    Some(SocketAddr::new(ip, port))
}

/// The processes holding one of the sockets `inodes`, by pid (bounded walk of `/proc`), and
/// whether some processes' descriptors could not be read.
fn holders(inodes: &HashSet<u64>) -> (Vec<u32>, bool) {
    let mut pids = Vec::new();
    let mut unreadable = false;
    let mut looked = 0usize;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let fds = match std::fs::read_dir(entry.path().join("fd")) {
            Ok(fds) => fds,
            Err(err) => {
                unreadable |= err.kind() == std::io::ErrorKind::PermissionDenied;
                continue;
            }
        };
        for fd in fds.flatten() {
            looked += 1;
            if looked > 2_000_000 {
                return (pids, unreadable);
            }
            let target = match std::fs::read_link(fd.path()) {
                Ok(target) => Some(target),
                Err(err) => {
                    unreadable |= err.kind() == std::io::ErrorKind::PermissionDenied;
                    None
                }
            };
            let holds = target
                .and_then(|target| {
                    target
                        .to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse::<u64>()
                        .ok()
                })
                .is_some_and(|inode| inodes.contains(&inode));
            if holds {
                pids.push(pid);
                break;
            }
        }
    }
    pids.sort_unstable();
    (pids, unreadable)
}

/// The cgroup v2 directory of process `pid`.
fn cgroup_of(pid: u32, v2_root: &Path) -> Option<PathBuf> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let relative = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(v2_root.join(relative.trim_start_matches('/')))
}

/// Whether cgroup `dir` is a unit of its own: a systemd service or scope, a podman or Docker
/// container. Only those are made for one program; a session's cgroup that holds only the
/// proxy now may hold the user's applications next.
fn is_unit(dir: &Path) -> bool {
    dir.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|name| {
            name.ends_with(".service")
                || name.ends_with(".scope")
                || name.starts_with("libpod-")
                || name.starts_with("docker-")
        })
}

/// Whether every process in cgroup `dir` is one of `pids`.
fn cgroup_holds_only(dir: &Path, pids: &[u32]) -> bool {
    std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| {
        procs
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
            .all(|pid| pids.contains(&pid))
    })
}

/// Waits until process `pid` has exited (a pidfd becomes readable then). Returns at once if
/// it is gone already or cannot be watched.
pub(crate) async fn exited(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: the descriptor was just made for us and is owned by nothing else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // SAFETY: the AsyncFd owns the descriptor, which stays open while it is registered.
    let Ok(watched) = (unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }) else {
        return;
    };
    let _ = watched.readable().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_net_addresses() {
        assert_eq!(
            parse_proc_addr("0100007F:0CEA", false),
            Some("127.0.0.1:3306".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:1F90", true),
            Some("[::1]:8080".parse().unwrap())
        );
    }

    #[test]
    fn finds_who_listens_on_a_local_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let inodes = listening_inodes(&[addr]);
        assert_eq!(inodes.len(), 1);
        assert_eq!(holders(&inodes).0, vec![std::process::id()]);
        assert!(is_local(&addr));
    }
}
