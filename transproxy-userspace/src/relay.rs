//! Relaying bytes both ways between the client and the tunnel.
//!
//! Each direction is copied independently. When one direction reaches end-of-file, only that
//! direction is shut down on the other side (half-close), so a client that sends its request and
//! then `shutdown(SHUT_WR)` still gets the whole answer. A half-closed tunnel may not idle
//! forever: once one direction has ended, the other is closed after `half_close_idle` without
//! traffic. An error in either direction aborts both sides with a reset, so neither end mistakes
//! a broken transfer for a complete one.

use std::{
    io,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

/// Per-direction copy buffer.
const BUFFER_SIZE: usize = 16 * 1024;

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
    HalfCloseIdle,
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(err) => write!(f, "{err}"),
            Self::HalfCloseIdle => write!(f, "half-closed tunnel idle too long"),
        }
    }
}

/// Relays until both directions have ended. `early_data` (sent by the proxy right after its
/// reply header) goes to the client first.
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    early_data: &[u8],
    half_close_idle: Duration,
) -> Result<Transferred, RelayError> {
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let one_ended = AtomicBool::new(false);

    let to_upstream = copy_then_shutdown(
        &mut client_read,
        &mut upstream_write,
        &one_ended,
        half_close_idle,
    );
    let to_client = async {
        client_write
            .write_all(early_data)
            .await
            .map_err(RelayError::Io)?;
        let copied = copy_then_shutdown(
            &mut upstream_read,
            &mut client_write,
            &one_ended,
            half_close_idle,
        )
        .await?;
        Ok(copied + early_data.len() as u64)
    };
    let (to_upstream, to_client) = tokio::try_join!(to_upstream, to_client)?;
    Ok(Transferred {
        to_upstream,
        to_client,
    })
}

/// Copies `from` into `to` until end-of-file, then shuts down `to`'s write side. Sets `one_ended`
/// when done; while it is set (by either direction), each read may wait at most `idle`.
async fn copy_then_shutdown<R, W>(
    from: &mut R,
    to: &mut W,
    one_ended: &AtomicBool,
    idle: Duration,
) -> Result<u64, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER_SIZE];
    let mut total = 0u64;
    loop {
        let read = if one_ended.load(Ordering::Relaxed) {
            tokio::time::timeout(idle, from.read(&mut buf))
                .await
                .map_err(|_| RelayError::HalfCloseIdle)?
        } else {
            // The other direction may end while we wait here; wake up in time to apply the
            // idle limit from then on.
            match tokio::time::timeout(idle, from.read(&mut buf)).await {
                Ok(read) => read,
                Err(_) => continue,
            }
        }
        .map_err(RelayError::Io)?;
        if read == 0 {
            break;
        }
        to.write_all(&buf[..read]).await.map_err(RelayError::Io)?;
        total += read as u64;
    }
    to.shutdown().await.map_err(RelayError::Io)?;
    one_ended.store(true, Ordering::Relaxed);
    Ok(total)
}
