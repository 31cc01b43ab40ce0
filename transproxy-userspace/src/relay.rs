//! Relaying bytes both ways between the client and the tunnel.
//!
//! Each direction is moved independently with splice(2): socket to pipe to socket, so the bytes
//! never enter userspace. The pipe of a direction is made when its first bytes arrive, so an
//! idle tunnel holds no pipe and no buffer. If a pipe cannot be made (descriptors exhausted),
//! that direction falls back to copying through a buffer.
//!
//! When one direction reaches end-of-file, only that direction is shut down on the other side
//! (half-close), so a client that sends its request and then `shutdown(SHUT_WR)` still gets the
//! whole answer. A half-closed tunnel may not idle forever: once one direction has ended, the
//! tunnel is closed after `half_close_idle` without traffic; an optional `idle` limit applies to
//! every tunnel. An error in either direction aborts both sides with a reset, so neither end
//! mistakes a broken transfer for a complete one.

use std::{
    io,
    net::Shutdown,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use socket2::SockRef;
use tokio::{
    io::{AsyncWriteExt as _, Interest},
    net::TcpStream,
    time::Instant,
};

/// File descriptors one busy tunnel holds: two sockets and a pipe (two ends) per direction.
pub const FDS_PER_TUNNEL: u64 = 6;

/// Bytes moved per splice call: the default pipe capacity.
const CHUNK: usize = 64 * 1024;

/// How long a tunnel may stay quiet.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// After one direction ended.
    pub half_close_idle: Duration,
    /// At any time; `None` for no limit.
    pub idle: Option<Duration>,
}

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transferred {
    pub to_upstream: u64,
    pub to_client: u64,
}

/// Why a relay ended early.
#[derive(Debug)]
pub enum RelayError {
    /// A read or write failed (typically a reset from one end).
    Io(io::Error),
    /// One direction ended and the other stayed idle too long.
    HalfCloseIdle(Duration),
    /// No traffic either way for the idle timeout.
    Idle(Duration),
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(err) => write!(f, "{err}"),
            Self::HalfCloseIdle(limit) => write!(f, "half-closed tunnel idle for {limit:?}"),
            Self::Idle(limit) => write!(f, "tunnel idle for {limit:?}"),
        }
    }
}

/// What both directions know of each other: when bytes last moved, and whether one ended.
struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last read.
    last_ms: AtomicU64,
    one_ended: AtomicBool,
    timeouts: Timeouts,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How often a waiting read wakes up to check the limits.
    fn check_every(&self) -> Duration {
        let half = self.timeouts.half_close_idle;
        self.timeouts
            .idle
            .map_or(half, |idle| idle.min(half))
            .max(Duration::from_millis(10))
    }

    /// Called when a read has waited `check_every`: is the tunnel over its limits?
    fn over_limit(&self) -> Option<RelayError> {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        let quiet = self.start.elapsed().saturating_sub(last);
        let half = self.timeouts.half_close_idle;
        if self.one_ended.load(Ordering::Relaxed) && quiet >= half {
            return Some(RelayError::HalfCloseIdle(half));
        }
        self.timeouts
            .idle
            .filter(|idle| quiet >= *idle)
            .map(RelayError::Idle)
    }
}

/// Relays until both directions have ended. `early_data` (sent by the proxy right after its
/// reply header) goes to the client first.
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    early_data: &[u8],
    timeouts: Timeouts,
) -> Result<Transferred, RelayError> {
    if !early_data.is_empty() {
        client.write_all(early_data).await.map_err(RelayError::Io)?;
    }
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        one_ended: AtomicBool::new(false),
        timeouts,
    };
    let (client, upstream) = (&*client, &*upstream);
    let (to_upstream, to_client) = tokio::try_join!(
        pump(client, upstream, &activity),
        pump(upstream, client, &activity)
    )?;
    Ok(Transferred {
        to_upstream,
        to_client: to_client + early_data.len() as u64,
    })
}

/// Moves `from` into `to` until end-of-file, then shuts down `to`'s write side and marks one
/// direction ended.
async fn pump(from: &TcpStream, to: &TcpStream, activity: &Activity) -> Result<u64, RelayError> {
    let mut mover = Mover::Idle;
    let mut total = 0u64;
    loop {
        let read = tokio::time::timeout(
            activity.check_every(),
            from.async_io(Interest::READABLE, || mover.fill(from)),
        )
        .await;
        let read = match read {
            Ok(read) => read.map_err(RelayError::Io)?,
            Err(_) => match activity.over_limit() {
                Some(err) => return Err(err),
                None => continue,
            },
        };
        if read == 0 {
            break;
        }
        activity.touch();
        let mut left = read;
        while left > 0 {
            left -= to
                .async_io(Interest::WRITABLE, || mover.drain(to, left))
                .await
                .map_err(RelayError::Io)?;
        }
        total += read as u64;
    }
    SockRef::from(to)
        .shutdown(Shutdown::Write)
        .map_err(RelayError::Io)?;
    activity.one_ended.store(true, Ordering::Relaxed);
    Ok(total)
}

/// How one direction holds bytes between reading and writing them.
enum Mover {
    /// Nothing has arrived yet: no pipe, no buffer.
    Idle,
    /// In a kernel pipe (zero copy).
    Splice(Pipe),
    /// In a userspace buffer, when no pipe could be made; `start` is where unwritten bytes begin.
    Copy { buf: Box<[u8]>, start: usize },
}

impl Mover {
    /// Reads what `from` has into the pipe or buffer. Runs only once `from` is readable.
    fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
        if let Self::Idle = self {
            *self = match Pipe::new() {
                Ok(pipe) => Self::Splice(pipe),
                Err(_) => Self::Copy {
                    buf: vec![0u8; CHUNK].into_boxed_slice(),
                    start: 0,
                },
            };
        }
        match self {
            Self::Splice(pipe) => splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK),
            Self::Copy { buf, start } => {
                *start = 0;
                from.try_read(buf)
            }
            Self::Idle => unreachable!("set above"),
        }
    }

    /// Writes up to `left` held bytes to `to`.
    fn drain(&mut self, to: &TcpStream, left: usize) -> io::Result<usize> {
        match self {
            Self::Splice(pipe) => splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left),
            Self::Copy { buf, start } => {
                let written = to.try_write(&buf[*start..*start + left])?;
                *start += written;
                Ok(written)
            }
            Self::Idle => Ok(0),
        }
    }
}

/// A non-blocking pipe, both ends.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds: [RawFd; 2] = [-1, -1];
        // SAFETY: pipe2 writes two descriptors into the array we own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        Ok(unsafe {
            Self {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

/// One non-blocking splice(2) call; `WouldBlock` means "wait for readiness".
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain system call on descriptors that stay open for the call; null offsets.
    let moved = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if moved < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(moved as usize)
    }
}
