//! The origin for the idle-tunnel figure: accepts connections and keeps them, doing nothing.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use anyhow::Context as _;

use crate::nginx::ORIGIN_IP;

/// A listener on [`ORIGIN_IP`] whose accepted connections stay open until [`Holder::release`].
/// One thread, no thread per connection: ten thousand idle connections cost it a vector.
pub(crate) struct Holder {
    addr: SocketAddr,
    held: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Holder {
    /// Binds a free port of [`ORIGIN_IP`] and starts accepting.
    pub(crate) fn start() -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind((ORIGIN_IP, 0)).context("cannot bind the idle-tunnel origin")?;
        // std listens with a queue of 128. Thousands of tunnels arrive at once; handshakes that
        // overflow the queue complete by SYN cookie on the proxy's side only, and since an idle
        // tunnel never sends, they would be lost unnoticed. listen() again sets a longer queue.
        // SAFETY: listen(2) on a descriptor the listener owns for the whole call.
        if unsafe { libc::listen(listener.as_raw_fd(), libc::SOMAXCONN) } != 0 {
            return Err(std::io::Error::last_os_error())
                .context("cannot lengthen the listen queue");
        }
        let addr = listener.local_addr()?;
        let held = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (kept, stopped) = (Arc::clone(&held), Arc::clone(&stop));
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                if let (Ok(stream), Ok(mut kept)) = (stream, kept.lock()) {
                    kept.push(stream);
                }
            }
        });
        Ok(Self { addr, held, stop })
    }

    /// The address the interception rules name.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open right now.
    pub(crate) fn held(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }

    /// Closes every held connection.
    pub(crate) fn release(&self) {
        if let Ok(mut held) = self.held.lock() {
            held.clear();
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}
