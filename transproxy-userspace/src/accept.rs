//! Where connections are accepted: one worker thread per core, each with its own
//! single-threaded runtime accepting on its own listening sockets of an SO_REUSEPORT group
//! ([`crate::reuseport`]), one task per connection ([`crate::connection`]).
//!
//! The kernel spreads new connections across the group, and a connection lives its whole life
//! on the thread that accepted it: no work stealing, no cross-thread wake-ups. Listeners opened
//! later in other network namespaces (containers, [`crate::containers`]) are single sockets,
//! handed to the workers in turn ([`Workers::adopt`]). Measured on this
//! project's 2-core machine against tokio's multi-threaded runtime with one listener (wrk,
//! `Connection: close`, through the daemon and a CONNECT proxy): about 16% more connections per
//! second and 13% less daemon CPU per connection, the same bulk throughput.

use std::{
    net::TcpListener as StdListener,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, warn};

use crate::connection::Tunnels;

/// How the connections of a listener reached it, which says where each was going.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arrival {
    /// Redirected by the cgroup programs in the network namespace with this cookie: the
    /// destination is in the kernel's record.
    Redirected(u64),
    /// Assigned by gateway mode's tc program: the destination is the accepted socket's own
    /// address.
    Forwarded,
}

/// The running worker threads.
pub(crate) struct Workers {
    /// Taken by [`Workers::halt`].
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Their runtimes, to hand listeners opened later to.
    runtimes: Vec<tokio::runtime::Handle>,
    /// The worker the next adopted listener goes to.
    next: AtomicUsize,
    tunnels: Arc<Tunnels>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Stops the workers' runtimes, cutting what still runs on them.
    halt: CancellationToken,
}

impl Workers {
    /// Starts one thread per element of `listeners` (the sockets that thread accepts on, all
    /// reached as `arrival` says). Accept loops end when `shutdown` is cancelled; connections
    /// are tracked by `tasks`.
    pub(crate) fn start(
        listeners: Vec<Vec<StdListener>>,
        arrival: Arrival,
        tunnels: &Arc<Tunnels>,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> anyhow::Result<Self> {
        let halt = CancellationToken::new();
        let mut threads = Vec::with_capacity(listeners.len());
        let mut runtimes = Vec::with_capacity(listeners.len());
        for (index, sockets) in listeners.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtimes.push(runtime.handle().clone());
            let (tunnels, shutdown, tasks, halt) = (
                Arc::clone(tunnels),
                shutdown.clone(),
                tasks.clone(),
                halt.clone(),
            );
            let thread = std::thread::Builder::new()
                .name(format!("transproxy-worker-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        for socket in sockets {
                            match TcpListener::from_std(socket) {
                                Ok(tcp) => {
                                    tokio::spawn(accept_loop(
                                        tcp,
                                        arrival,
                                        Arc::clone(&tunnels),
                                        shutdown.clone(),
                                        tasks.clone(),
                                    ));
                                }
                                Err(err) => {
                                    error!("worker {index}: cannot register a listener: {err}")
                                }
                            }
                        }
                        halt.cancelled().await;
                    });
                })?;
            threads.push(thread);
        }
        Ok(Self {
            threads: std::sync::Mutex::new(threads),
            runtimes,
            next: AtomicUsize::new(0),
            tunnels: Arc::clone(tunnels),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
            halt,
        })
    }

    /// Accepts on `listener`, in network namespace `netns`, on the next worker in turn, until
    /// `stop` or the shutdown is cancelled; then the listener closes (and the kernel drops it
    /// from the programs' map).
    pub(crate) fn adopt(&self, listener: StdListener, netns: u64, stop: CancellationToken) {
        let Some(runtime) = self
            .runtimes
            .get(self.next.fetch_add(1, Ordering::Relaxed) % self.runtimes.len().max(1))
        else {
            return;
        };
        let (tunnels, shutdown, tasks) = (
            Arc::clone(&self.tunnels),
            self.shutdown.clone(),
            self.tasks.clone(),
        );
        runtime.spawn(async move {
            let tcp = match TcpListener::from_std(listener) {
                Ok(tcp) => tcp,
                Err(err) => {
                    error!("cannot register a namespace's listener: {err}");
                    return;
                }
            };
            tokio::select! {
                () = stop.cancelled() => {}
                () = accept_loop(tcp, Arrival::Redirected(netns), tunnels, shutdown, tasks) => {}
            }
        });
    }

    /// Stops every worker's runtime (tunnels still open on it are cut) and waits for the threads.
    pub(crate) fn halt(&self) {
        self.halt.cancel();
        let threads = self
            .threads
            .lock()
            .map(|mut threads| std::mem::take(&mut *threads))
            .unwrap_or_default();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// Accepts on `tcp`, whose connections reach it as `arrival` says, until `shutdown` is
/// cancelled. Connection tasks are spawned on `tasks`, so the caller can wait for them to
/// finish.
async fn accept_loop(
    tcp: TcpListener,
    arrival: Arrival,
    tunnels: Arc<Tunnels>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = tcp.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                let tunnels = Arc::clone(&tunnels);
                tasks.spawn(async move { tunnels.handle(client, peer, arrival).await });
            }
            Err(err) => {
                // Out of file descriptors or memory: back off instead of spinning.
                warn!("accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
