//! Relaying bytes both ways between the client and the tunnel. Plain tokio and splice(2), so
//! the benchmark's fast proxy (tests/src/bin/tp-fast-proxy.rs) relays with it too.
//!
//! Each direction is moved independently. Short exchanges are copied through a per-thread
//! scratch buffer; a direction that carries bulk data switches to splice(2), socket to pipe to
//! socket, so its bytes never enter userspace. A tunnel that never carried bulk data holds no
//! pipe and no buffer; a direction keeps its pipe once made. Pipes are made within a budget
//! ([`budget_pipes`]), so they never take the descriptors that new tunnels' sockets need; a
//! direction that finds none keeps copying.
//!
//! When one direction reaches end-of-file, only that direction is shut down on the other side
//! (half-close), so a client that sends its request and then `shutdown(SHUT_WR)` still gets the
//! whole answer; the direction that ends last needs no shutdown, as both sockets are closed
//! next. A half-closed tunnel may not idle forever: once one direction has ended, the
//! tunnel is closed after `half_close_idle` without traffic; an optional `idle` limit applies to
//! every tunnel. An error in either direction aborts both sides with a reset, so neither end
//! mistakes a broken transfer for a complete one.

use std::{
    io,
    net::Shutdown,
    os::fd::{AsFd, OwnedFd},
    pin::Pin,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    task::{Poll, ready},
    time::Duration,
};

use nix::{
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl},
    unistd::pipe2,
};
use socket2::SockRef;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, Interest, ReadBuf},
    net::{TcpStream, tcp::ReadHalf},
    time::Instant,
};

/// File descriptors budgeted per tunnel: its two sockets always, plus a share of the pipes
/// (two ends each) that only bulk directions make. A bulk direction that finds no pipe in the
/// budget keeps copying, so the budget trades zero copy for capacity, never correctness.
pub const FDS_PER_TUNNEL: u64 = 3;

/// Pipes that may still be made, across every tunnel of the process.
static PIPES: PipeBudget = PipeBudget::unlimited();

/// Sets how many pipes may be open at once (unlimited until called): the descriptors left
/// once every tunnel the daemon admits has its two sockets.
pub fn budget_pipes(pipes: usize) {
    PIPES.0.store(pipes, Ordering::Relaxed);
}

/// A count of pipes that may still be made; each [`Pipe`] takes one and gives it back when it
/// is closed.
struct PipeBudget(AtomicUsize);

impl PipeBudget {
    const fn unlimited() -> Self {
        Self(AtomicUsize::new(usize::MAX))
    }

    /// Takes one pipe from the budget; `false` when it is spent.
    fn take(&self) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    fn give_back(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Capacity asked for a bulk direction's pipe, and so the most bytes one splice call moves:
/// fewer, larger calls per gigabyte. The kernel grants less (the default 64 KiB) once this
/// user's pipes hold more than `fs.pipe-user-pages-soft`; that only costs calls.
const PIPE_CHUNK: usize = 1024 * 1024;

/// How long a tunnel may stay quiet.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// After one direction ended.
    pub half_close_idle: Duration,
    /// At any time; `None` for no limit.
    pub idle: Option<Duration>,
}

/// Bytes moved in each direction, once the relay has ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transferred {
    pub to_upstream: u64,
    pub to_client: u64,
    /// The client ended its side (half-close) before the upstream did, and then nothing more
    /// came back: through squid or tinyproxy, which close the whole tunnel at the client's
    /// end-of-file, a half-closing client gets no answer.
    pub nothing_after_client_end: bool,
}

/// Bytes moved so far in each direction, readable while the relay runs (for status).
#[derive(Debug, Default)]
pub struct Progress {
    pub to_upstream: AtomicU64,
    pub to_client: AtomicU64,
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
    /// Milliseconds since `start` of the last read or write.
    last_ms: AtomicU64,
    one_ended: AtomicBool,
    /// Bytes sent to the client when the client ended its side; `u64::MAX` until it does (or
    /// when the upstream ended first).
    to_client_at_client_end: AtomicU64,
    timeouts: Timeouts,
}

impl Activity {
    /// A relay's start: the proxy's `early_data` goes to the client first (counted).
    async fn begin(
        client: &mut TcpStream,
        early_data: &[u8],
        timeouts: Timeouts,
        progress: &Progress,
    ) -> Result<Self, RelayError> {
        if !early_data.is_empty() {
            client.write_all(early_data).await.map_err(RelayError::Io)?;
            progress
                .to_client
                .fetch_add(early_data.len() as u64, Ordering::Relaxed);
        }
        Ok(Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            one_ended: AtomicBool::new(false),
            to_client_at_client_end: AtomicU64::new(u64::MAX),
            timeouts,
        })
    }

    /// What moved, once both directions have ended.
    fn transferred(&self, to_upstream: u64, progress: &Progress) -> Transferred {
        let to_client = progress.to_client.load(Ordering::Relaxed);
        let at_client_end = self.to_client_at_client_end.load(Ordering::Relaxed);
        Transferred {
            to_upstream,
            to_client,
            nothing_after_client_end: at_client_end != u64::MAX && to_client == at_client_end,
        }
    }

    /// A direction ended: whether it is the first to (the other still runs, so its peer must
    /// be told with a half-close). For the client's direction, `answer` is the other
    /// direction's count, noted when the client ends first.
    fn first_to_end(&self, answer: Option<&AtomicU64>) -> bool {
        if self.one_ended.swap(true, Ordering::Relaxed) {
            return false;
        }
        if let Some(answer) = answer {
            self.to_client_at_client_end
                .store(answer.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        true
    }

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
/// reply header) goes to the client first. The caller drops both streams as soon as this
/// returns: the direction that ends last leaves its FIN to that close.
///
/// `progress` counts the bytes as they move, so that others can read them meanwhile.
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    early_data: &[u8],
    timeouts: Timeouts,
    progress: &Progress,
) -> Result<Transferred, RelayError> {
    let activity = Activity::begin(client, early_data, timeouts, progress).await?;
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let (to_upstream, _) = tokio::try_join!(
        pump(
            client_read,
            upstream_write.as_ref(),
            &activity,
            &progress.to_upstream,
            Some(&progress.to_client)
        ),
        pump(
            upstream_read,
            client_write.as_ref(),
            &activity,
            &progress.to_client,
            None
        )
    )?;
    Ok(activity.transferred(to_upstream, progress))
}

/// Relays like [`relay`] between the client and an upstream that is not a plain socket (TLS to
/// an `https://` proxy): its bytes pass through userspace, so each direction copies through
/// the thread's scratch buffer, holding nothing while idle; half-close, limits and counting
/// are the same. Ending a direction towards the upstream sends its end of the TLS stream
/// (close_notify) and shuts the socket's write side.
pub async fn relay_stream<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut TcpStream,
    upstream: &mut S,
    early_data: &[u8],
    timeouts: Timeouts,
    progress: &Progress,
) -> Result<Transferred, RelayError> {
    let activity = Activity::begin(client, early_data, timeouts, progress).await?;
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let (to_upstream, _) = tokio::try_join!(
        copy(
            client_read,
            upstream_write,
            &activity,
            &progress.to_upstream,
            Some(&progress.to_client)
        ),
        copy(
            upstream_read,
            client_write,
            &activity,
            &progress.to_client,
            None
        )
    )?;
    Ok(activity.transferred(to_upstream, progress))
}

/// [`pump`] for any stream: moves `from` into `to` until end-of-file, through the thread's
/// scratch buffer (what `to` does not take at once is kept until it does), then ends `to`'s
/// write side unless the other direction has ended already.
async fn copy(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    activity: &Activity,
    moved: &AtomicU64,
    answer: Option<&AtomicU64>,
) -> Result<u64, RelayError> {
    let mut pending = Vec::new();
    let mut total = 0u64;
    loop {
        let reading = std::future::poll_fn(|cx| {
            SCRATCH_BUF.with_borrow_mut(|buf| {
                let mut filled = ReadBuf::new(buf);
                ready!(Pin::new(&mut from).poll_read(cx, &mut filled))?;
                let read = filled.filled().len();
                if read == 0 {
                    return Poll::Ready(Ok(0));
                }
                let written = match Pin::new(&mut to).poll_write(cx, &buf[..read]) {
                    Poll::Ready(Ok(written)) => written,
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending => 0,
                };
                pending.extend_from_slice(&buf[written..read]);
                Poll::Ready(Ok(read))
            })
        });
        let read = match tokio::time::timeout(activity.check_every(), reading).await {
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
        if !pending.is_empty() {
            to.write_all(&pending).await.map_err(RelayError::Io)?;
            // Do not keep a buffer for an idle tunnel.
            pending = Vec::new();
        }
        // TLS holds records until flushed.
        to.flush().await.map_err(RelayError::Io)?;
        activity.touch();
        total += read as u64;
        moved.fetch_add(read as u64, Ordering::Relaxed);
    }
    if activity.first_to_end(answer) {
        to.shutdown().await.map_err(RelayError::Io)?;
    }
    Ok(total)
}

/// Arms `stream` so that closing it sends RST instead of FIN (SO_LINGER with zero timeout), so
/// the peer cannot mistake a broken exchange for a complete one. The socket closes when its
/// owner drops it.
pub fn reset(stream: &TcpStream) {
    if let Err(err) = SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!("cannot arm reset: {err}");
    }
}

/// Moves `from` into `to` until end-of-file, counting in `moved`, then shuts down `to`'s write
/// side (unless the other direction has ended already) and marks one direction ended. For the
/// client's direction, `answer` is the other direction's count, noted when the client ends
/// first.
async fn pump(
    mut from: ReadHalf<'_>,
    to: &TcpStream,
    activity: &Activity,
    moved: &AtomicU64,
    answer: Option<&AtomicU64>,
) -> Result<u64, RelayError> {
    let mut mover = Mover::Copy {
        pending: Vec::new(),
        bulk: false,
    };
    let mut total = 0u64;
    loop {
        let read = tokio::time::timeout(activity.check_every(), mover.fill(&mut from, to)).await;
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
        // Backpressure: nothing more is read until what was read is written. Writing is
        // activity too: a direction draining into a slow reader keeps the tunnel alive.
        while mover.held() > 0 {
            to.async_io(Interest::WRITABLE, || mover.drain(to))
                .await
                .map_err(RelayError::Io)?;
            activity.touch();
        }
        total += read as u64;
        moved.fetch_add(read as u64, Ordering::Relaxed);
    }
    // The last direction to end needs no shutdown: both sockets are closed next, and close
    // sends the FIN (`to` has no unread bytes: its own direction has ended).
    if activity.first_to_end(answer) {
        SockRef::from(to)
            .shutdown(Shutdown::Write)
            .map_err(RelayError::Io)?;
    }
    Ok(total)
}

/// Size of the per-thread copy buffer; a read that fills it marks a bulk transfer.
const SCRATCH: usize = 16 * 1024;

thread_local! {
    /// Copy buffer shared by every tunnel on this worker thread: bytes pass through it within
    /// one call, so no tunnel owns a buffer.
    static SCRATCH_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// How one direction moves bytes. It starts by copying through the thread's scratch buffer, so
/// short exchanges (a request, an answer) never pay for a pipe; once a read fills the buffer the
/// direction carries bulk data, and it switches to splice(2), where the bytes stay in the
/// kernel.
enum Mover {
    /// Copying. `pending` holds what was read but not yet written (almost always empty, and
    /// only allocated when the destination is full).
    Copy { pending: Vec<u8>, bulk: bool },
    /// Splicing through a pipe holding `held` bytes.
    Splice { pipe: Pipe, held: usize },
}

impl Mover {
    /// Waits until `from` is readable, reads what it has and moves as much as it can on to `to`
    /// at once. Returns the bytes read (0: end of file).
    ///
    /// Copying reads through tokio's `poll_read`, which treats a read shorter than the buffer
    /// as "drained": the next read waits for the kernel's next readiness event instead of
    /// asking with a recv(2) that would only say EAGAIN. Short exchanges are all short reads.
    async fn fill(&mut self, from: &mut ReadHalf<'_>, to: &TcpStream) -> io::Result<usize> {
        if let Self::Copy { bulk: true, .. } = self {
            // Pipes cost descriptors: without one, keep copying.
            if let Ok(pipe) = Pipe::new(&PIPES) {
                *self = Self::Splice { pipe, held: 0 };
            }
        }
        match self {
            Self::Splice { pipe, held } => {
                let from = from.as_ref();
                *held = from
                    .async_io(Interest::READABLE, || splice(from, &pipe.write, PIPE_CHUNK))
                    .await?;
                Ok(*held)
            }
            Self::Copy { pending, bulk } => {
                std::future::poll_fn(|cx| {
                    SCRATCH_BUF.with_borrow_mut(|buf| {
                        let mut filled = ReadBuf::new(buf);
                        ready!(Pin::new(&mut *from).poll_read(cx, &mut filled))?;
                        let read = filled.filled().len();
                        if read == 0 {
                            return Poll::Ready(Ok(0));
                        }
                        let written = match to.try_write(&buf[..read]) {
                            Ok(written) => written,
                            Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
                            Err(err) => return Poll::Ready(Err(err)),
                        };
                        pending.extend_from_slice(&buf[written..read]);
                        *bulk = read == buf.len();
                        Poll::Ready(Ok(read))
                    })
                })
                .await
            }
        }
    }

    /// Bytes read but not yet written.
    fn held(&self) -> usize {
        match self {
            Self::Copy { pending, .. } => pending.len(),
            Self::Splice { held, .. } => *held,
        }
    }

    /// Writes held bytes to `to`. Runs only once `to` is writable.
    fn drain(&mut self, to: &TcpStream) -> io::Result<()> {
        match self {
            Self::Copy { pending, .. } => {
                let written = to.try_write(pending)?;
                pending.drain(..written);
                if pending.is_empty() {
                    // Do not keep a buffer for an idle tunnel.
                    *pending = Vec::new();
                }
            }
            Self::Splice { pipe, held } => {
                *held -= splice(&pipe.read, to, *held)?;
            }
        }
        Ok(())
    }
}

/// A non-blocking pipe, both ends, counted in a budget while open.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    budget: &'static PipeBudget,
}

impl Pipe {
    fn new(budget: &'static PipeBudget) -> io::Result<Self> {
        if !budget.take() {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        let (read, write) = match pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
            Ok(ends) => ends,
            Err(errno) => {
                budget.give_back();
                return Err(errno.into());
            }
        };
        // Failure leaves the default size, which only costs calls.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_CHUNK as libc::c_int));
        Ok(Self {
            read,
            write,
            budget,
        })
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.budget.give_back();
    }
}

/// One non-blocking splice(2) call; `WouldBlock` means "wait for readiness".
fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    nix::fcntl::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A connected pair on loopback; `small` shrinks the buffers between them, so that a slow
    /// reader holds the writer back.
    async fn pair(small: bool) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if small {
            socket.set_recv_buffer_size(16 * 1024).unwrap();
        }
        let (near, far) = tokio::join!(socket.connect(listener.local_addr().unwrap()), async {
            listener.accept().await.unwrap().0
        });
        if small {
            SockRef::from(&far).set_send_buffer_size(16 * 1024).unwrap();
        }
        (near.unwrap(), far)
    }

    /// Pipes are made only within their budget, and closing one gives its place back.
    #[test]
    fn pipes_stay_within_their_budget() {
        static BUDGET: PipeBudget = PipeBudget(AtomicUsize::new(1));
        let first = Pipe::new(&BUDGET).unwrap();
        let refused = Pipe::new(&BUDGET).err().and_then(|err| err.raw_os_error());
        assert_eq!(refused, Some(libc::EMFILE));
        drop(first);
        assert!(Pipe::new(&BUDGET).is_ok());
    }

    /// A direction that only writes, into a client reading slowly, is activity: the idle limit
    /// must not cut a download that is still moving.
    #[tokio::test]
    async fn draining_into_a_slow_reader_counts_as_activity() {
        const LEN: usize = 2 * 1024 * 1024;
        let idle = Duration::from_millis(300);
        let (mut reader, mut client) = pair(true).await;
        let (mut upstream, mut origin) = pair(false).await;
        let relay = tokio::spawn(async move {
            let timeouts = Timeouts {
                half_close_idle: Duration::from_secs(60),
                idle: Some(idle),
            };
            relay(
                &mut client,
                &mut upstream,
                b"",
                timeouts,
                &Progress::default(),
            )
            .await
        });
        // The whole download is at the relay at once; the client takes about 2 s for it.
        origin.write_all(&vec![7u8; LEN]).await.unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 32 * 1024];
        while got < LEN {
            tokio::time::sleep(Duration::from_millis(30)).await;
            match reader.read(&mut buf).await.unwrap() {
                0 => break,
                n => got += n,
            }
        }
        assert_eq!(got, LEN, "the download was cut");
        drop((reader, origin));
        let _ = tokio::time::timeout(Duration::from_secs(5), relay).await;
    }
}
