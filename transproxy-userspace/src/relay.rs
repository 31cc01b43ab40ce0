//! Relaying bytes both ways between the client and the tunnel.
//!
//! Each direction is copied independently. When one direction reaches end-of-file, only that
//! direction is shut down on the other side (half-close), so a client that sends its request and
//! then `shutdown(SHUT_WR)` still gets the whole answer. A half-closed tunnel may not idle
//! forever: once one direction has ended, the tunnel is closed after `half_close_idle` without
//! traffic; an optional `idle` limit applies to every tunnel. An error in either direction aborts
//! both sides with a reset, so neither end mistakes a broken transfer for a complete one.

use std::{
    io,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    time::Instant,
};

/// Per-direction copy buffer.
const BUFFER_SIZE: usize = 16 * 1024;

/// File descriptors one tunnel holds: the client's socket and the upstream's.
pub const FDS_PER_TUNNEL: u64 = 2;

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
        let quiet = self
            .start
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)));
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
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        one_ended: AtomicBool::new(false),
        timeouts,
    };

    let to_upstream = copy_then_shutdown(&mut client_read, &mut upstream_write, &activity);
    let to_client = async {
        client_write
            .write_all(early_data)
            .await
            .map_err(RelayError::Io)?;
        let copied = copy_then_shutdown(&mut upstream_read, &mut client_write, &activity).await?;
        Ok(copied + early_data.len() as u64)
    };
    let (to_upstream, to_client) = tokio::try_join!(to_upstream, to_client)?;
    Ok(Transferred {
        to_upstream,
        to_client,
    })
}

/// Copies `from` into `to` until end-of-file, then shuts down `to`'s write side and marks one
/// direction ended.
async fn copy_then_shutdown<R, W>(
    from: &mut R,
    to: &mut W,
    activity: &Activity,
) -> Result<u64, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER_SIZE];
    let mut total = 0u64;
    loop {
        let read = match tokio::time::timeout(activity.check_every(), from.read(&mut buf)).await {
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
        to.write_all(&buf[..read]).await.map_err(RelayError::Io)?;
        total += read as u64;
    }
    to.shutdown().await.map_err(RelayError::Io)?;
    activity.one_ended.store(true, Ordering::Relaxed);
    Ok(total)
}
