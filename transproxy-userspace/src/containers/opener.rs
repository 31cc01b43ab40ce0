//! The namespace opener: a small process that keeps the two privileges serving containers
//! needs, so the daemon itself keeps none.
//!
//! Opening a listener inside a container's network namespace takes `setns`, which needs
//! CAP_SYS_ADMIN, and seeing which namespace a process is in (`/proc/PID/ns/net`) takes
//! CAP_SYS_PTRACE for other users' processes. The daemon gives up every capability once its
//! programs are attached (see [`crate::privileges`]), so before that it starts this process
//! (itself, re-executed as `transproxy netns-opener`): it keeps CAP_SYS_ADMIN and
//! CAP_SYS_PTRACE, holds no tunnel, credential or map, and does only two things when asked over
//! a socket pair:
//! * **scan**: the network namespaces of the processes of the daemon's cgroup tree;
//! * **open**: a listener (IPv4, and IPv6 when asked) inside a namespace, handed back to the
//!   daemon as descriptors (`SCM_RIGHTS`). A namespace named by a process is served only when
//!   that process is in the cgroup tree; it is reached through a pidfd, so a pid reused in
//!   between cannot redirect the opener to someone else's namespace.
//!
//! It is single-threaded, so switching its namespace and back is safe, and it dies with the
//! daemon (`PR_SET_PDEATHSIG`).

use std::{
    collections::HashMap,
    ffi::OsStr,
    fs::File,
    io::{self, IoSlice, IoSliceMut},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdListener},
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use nix::{
    cmsg_space,
    sched::CloneFlags,
    sys::socket::{
        AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recv,
        recvmsg, send, sendmsg, socketpair,
    },
};

/// Largest request or reply: a scan reply of 4,096 namespaces (12 bytes each) fits.
const MESSAGE: usize = 64 * 1024;

/// How long the daemon waits for an answer: the opener only opens files and binds sockets.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Where a namespace to serve is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// The namespace of this process (host PID namespace), which must be in the cgroup tree.
    Pid(u32),
    /// A namespace file (`/var/run/netns/NAME`, a CNI plugin's `CNI_NETNS`), asked for by root.
    Path(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pid(pid) => write!(f, "pid {pid}"),
            Self::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The listeners opened in one namespace.
#[derive(Debug)]
pub(crate) struct Opened {
    /// The namespace's cookie (`SO_NETNS_COOKIE`): how the programs name it.
    pub(crate) cookie: u64,
    /// Its inode (`net:[INODE]`): how `/proc` names it.
    pub(crate) inode: u64,
    pub(crate) v4: StdListener,
    /// When asked for and the namespace has `::1`.
    pub(crate) v6: Option<StdListener>,
}

/// The daemon's side: the running opener and the socket to it.
pub(crate) struct Opener {
    /// `None` once closed, when the opener is being stopped.
    socket: Mutex<Option<OwnedFd>>,
    child: Mutex<Child>,
    /// The next request's number. Replies carry it back: one that comes after its request
    /// timed out is told from the answer to the next one, and dropped.
    sequence: std::sync::atomic::AtomicU32,
}

impl Opener {
    /// Starts the opener for the cgroup tree `tree` (its path below the cgroup v2 root, as
    /// `/proc/PID/cgroup` shows it). Must run while the daemon still has its capabilities.
    pub(crate) fn spawn(tree: &Path) -> anyhow::Result<Self> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .context("cannot make a socket pair for the namespace opener")?;
        set_timeout(&ours, ANSWER_WAIT)?;
        let child = Command::new("/proc/self/exe")
            .arg("netns-opener")
            .arg("--parent")
            .arg(std::process::id().to_string())
            .arg("--tree")
            .arg(tree)
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .env_clear()
            .spawn()
            .context("cannot start the namespace opener")?;
        Ok(Self {
            socket: Mutex::new(Some(ours)),
            child: Mutex::new(child),
            sequence: std::sync::atomic::AtomicU32::new(1),
        })
    }

    /// A new request number.
    fn next_sequence(&self) -> u32 {
        self.sequence
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The network namespaces of the cgroup tree's processes: inode to one process in it, and
    /// whether that is all of them (a scan that found too many, or walked too far, is cut
    /// short: nothing may be concluded from what it did not list). Blocking.
    pub(crate) fn scan(&self) -> anyhow::Result<(HashMap<u64, u32>, bool)> {
        let guard = self.lock()?;
        let socket = guard
            .as_ref()
            .ok_or_else(|| anyhow!("the opener is stopped"))?;
        let sequence = self.next_sequence();
        let mut request = vec![b'S'];
        request.extend_from_slice(&sequence.to_le_bytes());
        send(socket.as_raw_fd(), &request, MsgFlags::empty()).context("the opener is gone")?;
        let (reply, _) = receive(socket, sequence, MESSAGE)?;
        decode_scan(&reply)
    }

    /// Opens listeners in `target`'s namespace: IPv4 on `v4_port` of 127.0.0.1 (another when
    /// taken), IPv6 on `v6_port` of ::1 when given. Blocking.
    pub(crate) fn open(
        &self,
        target: &Target,
        v4_port: u16,
        v6_port: Option<u16>,
    ) -> anyhow::Result<Opened> {
        let guard = self.lock()?;
        let socket = guard
            .as_ref()
            .ok_or_else(|| anyhow!("the opener is stopped"))?;
        let sequence = self.next_sequence();
        let request = encode_open(sequence, target, v4_port, v6_port);
        send(socket.as_raw_fd(), &request, MsgFlags::empty()).context("the opener is gone")?;
        let (reply, fds) = receive(socket, sequence, 1024)?;
        match reply.split_first() {
            Some((b'+', rest)) if rest.len() >= 8 && !fds.is_empty() => {
                let mut fds = fds.into_iter();
                let v4 = fds
                    .next()
                    .map(StdListener::from)
                    .context("no IPv4 listener")?;
                let mut inode = [0u8; 8];
                inode.copy_from_slice(&rest[..8]);
                // The cookie from the socket itself, not from what the opener says.
                let cookie = crate::kernel::netns_cookie(v4.as_fd())?;
                Ok(Opened {
                    cookie,
                    inode: u64::from_le_bytes(inode),
                    v4,
                    v6: fds.next().map(StdListener::from),
                })
            }
            Some((b'-', why)) => Err(anyhow!("{}", String::from_utf8_lossy(why))),
            _ => Err(anyhow!("the namespace opener sent a reply it should not")),
        }
    }

    fn lock(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Option<OwnedFd>>> {
        self.socket
            .lock()
            .map_err(|_| anyhow!("the namespace opener's socket is poisoned"))
    }
}

impl Drop for Opener {
    /// Closes the socket, which ends the opener (a daemon that switched `--user` may no longer
    /// signal it, a root process), then reaps it.
    fn drop(&mut self) {
        if let Ok(socket) = self.socket.get_mut() {
            socket.take();
        }
        if let Ok(child) = self.child.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The reply to request `sequence` (its body, after the status byte's sequence is removed) and
/// the descriptors that came with it. Replies to earlier requests, which came after those
/// timed out, are dropped, their descriptors closed.
fn receive(
    socket: &OwnedFd,
    sequence: u32,
    size: usize,
) -> anyhow::Result<(Vec<u8>, Vec<OwnedFd>)> {
    // Bounded: at most this many late replies are skipped.
    for _ in 0..16 {
        let mut reply = vec![0u8; size];
        let mut space = cmsg_space!([RawFd; 2]);
        let mut iov = [IoSliceMut::new(&mut reply)];
        let msg = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("the opener did not answer")?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().context("bad control message from the opener")? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: descriptors just received with SCM_RIGHTS belong to this process
                // and nothing else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let n = msg.bytes;
        if n == 0 {
            bail!("the namespace opener is gone");
        }
        reply.truncate(n);
        if reply.len() >= 5 && reply[1..5] == sequence.to_le_bytes() {
            reply.drain(1..5);
            return Ok((reply, fds));
        }
    }
    bail!("the namespace opener's replies are out of step")
}

fn set_timeout(socket: &OwnedFd, wait: Duration) -> anyhow::Result<()> {
    let time = nix::sys::time::TimeVal::new(
        wait.as_secs().try_into().unwrap_or(5),
        wait.subsec_micros().into(),
    );
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::ReceiveTimeout, &time)?;
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::SendTimeout, &time)?;
    Ok(())
}

/// `O<sequence><v4 port><v6 port or 0><flags><kind><pid or path>`, little-endian.
fn encode_open(sequence: u32, target: &Target, v4_port: u16, v6_port: Option<u16>) -> Vec<u8> {
    let mut request = vec![b'O'];
    request.extend_from_slice(&sequence.to_le_bytes());
    request.extend_from_slice(&v4_port.to_le_bytes());
    request.extend_from_slice(&v6_port.unwrap_or(0).to_le_bytes());
    request.push(u8::from(v6_port.is_some()));
    match target {
        Target::Pid(pid) => {
            request.push(b'P');
            request.extend_from_slice(&pid.to_le_bytes());
        }
        Target::Path(path) => {
            request.push(b'F');
            request.extend_from_slice(path.as_os_str().as_bytes());
        }
    }
    request
}

fn decode_open(request: &[u8]) -> Option<(Target, u16, Option<u16>)> {
    let v4_port = u16::from_le_bytes(request.get(0..2)?.try_into().ok()?);
    let v6_port = u16::from_le_bytes(request.get(2..4)?.try_into().ok()?);
    let want_v6 = *request.get(4)? != 0;
    let target = match (request.get(5)?, request.get(6..)?) {
        (b'P', pid) => Target::Pid(u32::from_le_bytes(pid.try_into().ok()?)),
        (b'F', path) if !path.is_empty() => Target::Path(PathBuf::from(OsStr::from_bytes(path))),
        _ => return None,
    };
    Some((target, v4_port, want_v6.then_some(v6_port)))
}

fn decode_scan(reply: &[u8]) -> anyhow::Result<(HashMap<u64, u32>, bool)> {
    let (body, complete) = match reply.split_first() {
        Some((b'+', body)) if body.len() % 12 == 0 => (body, true),
        Some((b'~', body)) if body.len() % 12 == 0 => (body, false),
        Some((b'-', why)) => return Err(anyhow!("{}", String::from_utf8_lossy(why))),
        _ => return Err(anyhow!("the namespace opener sent a reply it should not")),
    };
    let found = body
        .chunks_exact(12)
        .map(|entry| {
            let mut inode = [0u8; 8];
            inode.copy_from_slice(&entry[..8]);
            let mut pid = [0u8; 4];
            pid.copy_from_slice(&entry[8..]);
            (u64::from_le_bytes(inode), u32::from_le_bytes(pid))
        })
        .collect();
    Ok((found, complete))
}

/// The opener's side: `transproxy netns-opener`, with the socket pair on stdin.
pub fn serve(parent: u32, tree: &Path) -> ExitCode {
    match serve_requests(parent, tree) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("transproxy netns-opener: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve_requests(parent: u32, tree: &Path) -> anyhow::Result<()> {
    // Die with the daemon; if it died before this line, stop now.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    // `ps` and `top` show what it is (its executable is /proc/self/exe, "exe" otherwise).
    let _ = nix::sys::prctl::set_name(c"transproxy-netns");
    if nix::unistd::getppid().as_raw() != parent as i32 {
        return Ok(());
    }
    keep_only_namespace_capabilities()?;
    let home = File::open("/proc/thread-self/ns/net").context("cannot open its own namespace")?;
    let socket = io::stdin().as_fd().try_clone_to_owned()?;
    let mut request = vec![0u8; MESSAGE];
    loop {
        let n = recv(socket.as_raw_fd(), &mut request, MsgFlags::empty())?;
        if n == 0 {
            // The daemon closed its end: it is stopping.
            return Ok(());
        }
        // `<kind><sequence u32>`: every reply is `<status><sequence>...`.
        let (kind, sequence, body) = match &request[..n] {
            [kind, a, b, c, d, body @ ..] => (*kind, [*a, *b, *c, *d], body),
            _ => (0, [0; 4], &[][..]),
        };
        let with = |status: u8, rest: &[u8]| {
            let mut reply = vec![status];
            reply.extend_from_slice(&sequence);
            reply.extend_from_slice(rest);
            reply
        };
        match kind {
            b'S' => {
                let reply = match scan(tree) {
                    Ok((found, complete)) => {
                        let room = (MESSAGE - 5) / 12;
                        let complete = complete && found.len() <= room;
                        let mut entries = Vec::with_capacity(found.len().min(room) * 12);
                        for (inode, pid) in found.into_iter().take(room) {
                            entries.extend_from_slice(&inode.to_le_bytes());
                            entries.extend_from_slice(&pid.to_le_bytes());
                        }
                        with(if complete { b'+' } else { b'~' }, &entries)
                    }
                    Err(err) => with(b'-', format!("{err:#}").as_bytes()),
                };
                send(socket.as_raw_fd(), &reply, MsgFlags::empty())?;
            }
            b'O' => {
                let opened = decode_open(body)
                    .ok_or_else(|| anyhow!("a malformed request"))
                    .and_then(|(target, v4, v6)| open_in(&home, tree, &target, v4, v6));
                match opened {
                    Ok(opened) => {
                        let reply = with(b'+', &opened.inode.to_le_bytes());
                        let fds: Vec<RawFd> = [Some(opened.v4.as_raw_fd())]
                            .into_iter()
                            .chain([opened.v6.as_ref().map(|l| l.as_raw_fd())])
                            .flatten()
                            .collect();
                        sendmsg::<()>(
                            socket.as_raw_fd(),
                            &[IoSlice::new(&reply)],
                            &[ControlMessage::ScmRights(&fds)],
                            MsgFlags::empty(),
                            None,
                        )?;
                    }
                    Err(err) => {
                        let mut why = format!("{err:#}").into_bytes();
                        why.truncate(1000);
                        send(socket.as_raw_fd(), &with(b'-', &why), MsgFlags::empty())?;
                    }
                }
            }
            _ => {
                send(
                    socket.as_raw_fd(),
                    &with(b'-', b"unknown request"),
                    MsgFlags::empty(),
                )?;
            }
        }
    }
}

/// Keeps CAP_SYS_ADMIN (setns) and CAP_SYS_PTRACE (other users' `/proc/PID/ns/net`) and
/// nothing else, for good.
fn keep_only_namespace_capabilities() -> anyhow::Result<()> {
    use caps::Capability;
    crate::privileges::keep_only(&caps::CapsHashSet::from([
        Capability::CAP_SYS_ADMIN,
        Capability::CAP_SYS_PTRACE,
    ]))
}

/// Whether `pid` is in the cgroup tree `tree` (a path below the v2 root).
fn in_tree(pid: u32, tree: &Path) -> anyhow::Result<bool> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("pid {pid} is gone"))?;
    let Some(path) = cgroups.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Ok(false);
    };
    Ok(Path::new(path).starts_with(tree))
}

/// Folders a scan visits at most: a user with a delegated cgroup subtree can make folders by
/// the hundred thousand, and a scan that long would hold the opener from everything else.
const SCAN_FOLDERS: usize = 20_000;

/// The pids of every process in the cgroup tree, read from `cgroup.procs` down the tree, and
/// whether the walk saw the whole tree.
fn tree_pids(tree: &Path) -> anyhow::Result<(Vec<u32>, bool)> {
    let root = crate::kernel::cgroup::v2_root()?;
    let top = root.join(tree.strip_prefix("/").unwrap_or(tree));
    let mut pids = Vec::new();
    let mut folders = vec![top];
    let mut visited = 0;
    // Bounded: cgroup trees are shallow, but a runaway one must not stall the opener.
    while let Some(folder) = folders.pop() {
        visited += 1;
        if visited > SCAN_FOLDERS || pids.len() >= 1_000_000 {
            return Ok((pids, false));
        }
        if let Ok(procs) = std::fs::read_to_string(folder.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        folders.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    Ok((pids, true))
}

/// The namespaces of the tree's processes: inode to the first process found in each, and
/// whether the whole tree was seen.
fn scan(tree: &Path) -> anyhow::Result<(HashMap<u64, u32>, bool)> {
    let mut found = HashMap::new();
    let (pids, complete) = tree_pids(tree)?;
    for pid in pids {
        // Gone between the two reads, or a kernel thread: skipped.
        if let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
            found.entry(meta.ino()).or_insert(pid);
        }
    }
    Ok((found, complete))
}

/// `pidfd_open(2)`: a descriptor that names this process and no later one with its pid.
fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: the syscall takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor this process owns alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether the process behind `pidfd` is still alive (signal 0). The opener may not signal
/// other users' processes (it has no CAP_KILL): EPERM says the process exists all the same.
fn alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: signal 0 only checks; the other arguments may be null and zero.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    sent == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A namespace file named by a hook (`/run/netns/NAME`, `/proc/PID/ns/net`): opened without
/// following a last symlink and without blocking (a FIFO named instead would hang the opener),
/// and only if it is one (nsfs).
fn open_namespace_file(path: &Path) -> anyhow::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt as _;
    /// `NSFS_MAGIC` from `<linux/magic.h>`.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let fs = nix::sys::statfs::fstatfs(&file)
        .with_context(|| format!("cannot stat {}", path.display()))?;
    if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
        bail!("{} is not a namespace file", path.display());
    }
    Ok(file.into())
}

/// Enters `target`'s namespace, opens the listeners, and comes back to `home`.
fn open_in(
    home: &File,
    tree: &Path,
    target: &Target,
    v4_port: u16,
    v6_port: Option<u16>,
) -> anyhow::Result<Opened> {
    let ns: OwnedFd = match target {
        Target::Pid(pid) => {
            let pidfd = pidfd_open(*pid).with_context(|| format!("pid {pid} is gone"))?;
            // Read after the pidfd exists and checked alive after: the cgroup read was of
            // that very process, not of a later one with its pid.
            let inside = in_tree(*pid, tree)?;
            if !alive(&pidfd) {
                return Err(anyhow!("pid {pid} is gone"));
            }
            if !inside {
                return Err(anyhow!(
                    "pid {pid} is not in the cgroup tree {}",
                    tree.display()
                ));
            }
            pidfd
        }
        Target::Path(path) => open_namespace_file(path)?,
    };
    nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("cannot enter the network namespace of {target}"))?;
    let opened = listen_here(v4_port, v6_port);
    // Back home whatever happened: a failure here leaves the opener useless, so it ends.
    if let Err(err) = nix::sched::setns(home, CloneFlags::CLONE_NEWNET) {
        eprintln!("transproxy netns-opener: cannot return to its namespace: {err}");
        std::process::exit(1);
    }
    opened.with_context(|| format!("in the network namespace of {target}"))
}

/// Listeners in the current namespace.
fn listen_here(v4_port: u16, v6_port: Option<u16>) -> anyhow::Result<Opened> {
    let inode = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
    let bind = |addr: SocketAddr| {
        crate::reuseport::bind_group(addr, 1)
            .or_else(|_| crate::reuseport::bind_group(SocketAddr::new(addr.ip(), 0), 1))
            .map(|mut group| group.remove(0))
    };
    let v4 = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, v4_port)))
        .context("cannot listen on 127.0.0.1 (is the loopback interface up in that namespace?)")?;
    let v6 = v6_port.and_then(|port| bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).ok());
    Ok(Opened {
        cookie: crate::kernel::netns_cookie(v4.as_fd())?,
        inode,
        v4,
        v6,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_back_as_written() {
        for (target, v6) in [
            (Target::Pid(4_000_000), Some(8081)),
            (Target::Path(PathBuf::from("/var/run/netns/cni-1")), None),
        ] {
            let request = encode_open(7, &target, 8080, v6);
            assert_eq!(request[1..5], 7u32.to_le_bytes());
            assert_eq!(decode_open(&request[5..]), Some((target, 8080, v6)));
        }
        // Truncated or unknown requests are refused, not misread.
        assert_eq!(decode_open(b"\x01\x00\x02\x00\x01P\x01"), None);
        assert_eq!(decode_open(b"\x01\x00\x02\x00\x01F"), None);
        assert_eq!(decode_open(b"\x01\x00\x02\x00\x01X1234"), None);
    }

    /// A reply that came after its request timed out is not taken for the next request's.
    #[test]
    fn a_late_reply_is_dropped_not_taken_for_the_next() {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        for (sequence, body) in [(1u32, &b"old"[..]), (2, b"new")] {
            let mut reply = vec![b'+'];
            reply.extend_from_slice(&sequence.to_le_bytes());
            reply.extend_from_slice(body);
            send(theirs.as_raw_fd(), &reply, MsgFlags::empty()).unwrap();
        }
        let (reply, fds) = receive(&ours, 2, 64).unwrap();
        assert_eq!(reply, b"+new");
        assert!(fds.is_empty());
        // Nothing left for request 3: the wait ends with an error, not a wrong answer.
        set_timeout(&ours, Duration::from_millis(50)).unwrap();
        assert!(receive(&ours, 3, 64).is_err());
    }

    #[test]
    fn scan_replies_are_checked() {
        let mut reply = vec![b'+'];
        reply.extend_from_slice(&7u64.to_le_bytes());
        reply.extend_from_slice(&42u32.to_le_bytes());
        assert_eq!(
            decode_scan(&reply).unwrap(),
            (HashMap::from([(7, 42)]), true)
        );
        reply[0] = b'~';
        assert!(!decode_scan(&reply).unwrap().1);
        assert!(decode_scan(&reply[..5]).is_err());
        let err = decode_scan(b"-no cgroup").unwrap_err().to_string();
        assert_eq!(err, "no cgroup");
    }
}
