//! One redirected connection, from accept to relay: where it was going and who made it, whether
//! there is room, the tunnel, what the client sees when there is none, the relay, and what
//! operators see of it.
//!
//! A connection is tunnelled only if the kernel recorded its original destination; anything
//! else (someone connecting to the listener directly) is reset: the listener is not an open
//! relay. When the proxy cannot open the tunnel, the client is reset rather than closed, so it
//! sees a failed connection and not an empty answer.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use tokio::{net::TcpStream, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    accept::Arrival,
    dns::{Hint, HostNames},
    error_page,
    kernel::{OriginalDsts, Process, Redirected, Refusals},
    observe::{Ending, Observer, Outcome, TunnelEntry},
    relay::{self, RelayError, Timeouts, reset},
    upstream::{NotOpened, ProxyStream, TunnelError, Upstream},
};

/// What every connection shares.
pub(crate) struct Tunnels {
    pub(crate) dsts: Arc<OriginalDsts>,
    /// What DNS said about destinations (`--dns`).
    pub(crate) names: Arc<HostNames>,
    pub(crate) refusals: Refusals,
    pub(crate) upstream: Upstream,
    /// `[[container]]`: the upstreams of some child cgroups, instead of `upstream`.
    pub(crate) containers: crate::containers::ContainerUpstreams,
    pub(crate) timeouts: Timeouts,
    /// One permit per open tunnel.
    pub(crate) capacity: Arc<Semaphore>,
    /// Status, access log, metrics and limited failure lines.
    pub(crate) observer: Arc<Observer>,
    /// The processes of a proxy on this host: a connection of theirs redirected here is a loop.
    pub(crate) local_proxy_pids: std::sync::RwLock<Vec<u32>>,
    /// A loop is reported once.
    pub(crate) loop_reported: std::sync::atomic::AtomicBool,
    /// Cancelled when the shutdown grace has run out: tunnels still relaying reset both ends,
    /// so that neither takes a cut transfer for a complete one.
    pub(crate) cut: CancellationToken,
}

impl Tunnels {
    /// One connection, reached its listener as `arrival` says: find its destination, open the
    /// tunnel, relay.
    pub(crate) async fn handle(&self, client: TcpStream, peer: SocketAddr, arrival: Arrival) {
        let metrics = &self.observer.metrics;
        metrics.accepted.inc();
        let netns = match arrival {
            Arrival::Redirected(netns) => netns,
            // Gateway mode: tc assigned the client's SYN to the transparent listener, so the
            // accepted socket's own address is where the client was going.
            Arrival::Forwarded => {
                // Only tc hands this listener connections from other hosts; one from this
                // host's loopback is a local user who connected to it directly.
                let Ok(dst) = client.local_addr() else {
                    reset(&client);
                    return;
                };
                if peer.ip().to_canonical().is_loopback() {
                    metrics.not_redirected.inc();
                    reset(&client);
                    return;
                }
                let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
                let redirected = Redirected {
                    dst,
                    process: Process::forwarded(),
                };
                return self.serve(client, peer, redirected).await;
            }
        };
        let listener_port = client.local_addr().map_or(0, |a| a.port());
        let redirected = match self.dsts.take(netns, listener_port, peer) {
            Ok(Some(redirected)) => redirected,
            Ok(None) => {
                let count = metrics.not_redirected.inc() + 1;
                // Anyone may connect here: logged at 1, 2, 4, 8, ... so that cannot flood the log.
                if count.is_power_of_two() {
                    warn!(
                        "reset connection from {peer}: it was not redirected by transproxy (direct connections to the listener are not tunnelled; {count} so far)"
                    );
                }
                // A reset, not a FIN: a client whose record was lost must not take an empty
                // answer for a complete one.
                reset(&client);
                return;
            }
            Err(err) => {
                metrics.not_redirected.inc();
                warn!("reset connection from {peer}: cannot read its original destination: {err}");
                reset(&client);
                return;
            }
        };
        metrics.records_taken.fetch_add(1, Ordering::Relaxed);
        self.serve(client, peer, redirected).await;
    }

    /// A connection whose destination is known: open the tunnel, relay.
    async fn serve(&self, mut client: TcpStream, peer: SocketAddr, redirected: Redirected) {
        let metrics = &self.observer.metrics;
        let (dst, process) = (redirected.dst, redirected.process);
        self.report_loop(&process, dst);
        let Ok(_permit) = Arc::clone(&self.capacity).try_acquire_owned() else {
            let count = metrics.over_capacity.inc() + 1;
            // Logged at 1, 2, 4, 8, ... so a flood cannot flood the log.
            if count.is_power_of_two() {
                warn!(
                    "{process} -> {dst}: reset: --max-tunnels reached ({count} clients reset so far)"
                );
            }
            reset(&client);
            return;
        };
        let entry = self.observer.opened(peer, process, dst);
        // The proxy connection, once reached: kept here so that a cut can reset it, whatever
        // the tunnel is doing.
        let mut proxy = None;
        tokio::select! {
            () = self.tunnel(&entry, &mut client, &mut proxy) => {}
            () = self.cut.cancelled() => {
                debug!("{process} -> {dst}: reset: cut at the end of the shutdown grace");
                reset(&client);
                if let Some(proxy) = &proxy {
                    reset(proxy.tcp());
                }
                self.observer.closed(&entry, &Ending {
                    outcome: Outcome::Cut,
                    status: None,
                    detail: None,
                    up: entry.progress.to_upstream.load(Ordering::Relaxed),
                    down: entry.progress.to_client.load(Ordering::Relaxed),
                });
            }
        }
    }

    /// Says once when the proxy's own connection was redirected here: a loop (tunnels would
    /// pile up until descriptors run out).
    fn report_loop(&self, process: &crate::kernel::Process, dst: SocketAddr) {
        let looped = self
            .local_proxy_pids
            .read()
            .is_ok_and(|pids| pids.contains(&process.pid));
        if looped && !self.loop_reported.swap(true, Ordering::Relaxed) {
            warn!(
                "loop: the proxy itself, {process}, connects to {dst} from inside the intercepted cgroup and is sent back to the proxy; run it in a cgroup of its own or as its own user with --exclude-uid"
            );
        }
    }

    /// Opens the tunnel for `entry` and relays until it ends; says how it ended. The proxy
    /// connection goes into `proxy` as soon as it is reached.
    async fn tunnel(
        &self,
        entry: &TunnelEntry,
        client: &mut TcpStream,
        proxy: &mut Option<ProxyStream>,
    ) {
        let (process, dst) = (&entry.process, entry.dst);
        // The fake address's lease lives as long as the tunnel: its name stays its own.
        let (hint, _lease) = match self.names.hint(process.cgroup, process.pid, dst.ip()) {
            Hint::None => (None, None),
            Hint::Learned(name) => (Some(name), None),
            Hint::Fake(name, lease) => (Some(name), Some(lease)),
            Hint::UnknownFake => return self.no_name(entry, client),
        };
        if let Some(name) = &hint {
            let _ = entry.dns_name.set(name.clone());
        }
        let upstream = self
            .containers
            .for_cgroup(process.cgroup)
            .unwrap_or(&self.upstream);
        let opened = upstream
            .open(client, dst, hint, proxy, |addr| entry.reached(addr))
            .await;
        let name = match &opened {
            Ok(tunnel) => tunnel.name.as_ref(),
            Err(not_opened) => not_opened.name.as_ref(),
        };
        if let Some(name) = name {
            let _ = entry.host.set(name.clone());
        }
        let answered = match &opened {
            Ok(_) => true,
            Err(not_opened) => not_opened.error.rejection().is_some(),
        };
        if answered {
            self.observer.metrics.proxy_replied(entry.age());
        }
        let tunnel = match opened {
            Ok(tunnel) => tunnel,
            Err(not_opened) => return self.not_opened(entry, client, not_opened).await,
        };
        let Some(stream) = proxy.as_mut() else {
            return;
        };
        entry.relaying();
        let target = entry.target();
        if tunnel.direct {
            debug!("{process} -> {target}: direct (NO_PROXY, the list's direct, or the PAC file)");
        }
        // The client's bytes that went ahead of the reply are part of the tunnel's count.
        entry
            .progress
            .to_upstream
            .fetch_add(tunnel.went_ahead, Ordering::Relaxed);
        let relayed = match stream {
            // A plain socket: spliced.
            ProxyStream::Tcp(tcp) => {
                relay::relay(
                    client,
                    tcp,
                    &tunnel.early_data,
                    self.timeouts,
                    &entry.progress,
                )
                .await
            }
            // TLS to the proxy: copied through rustls.
            ProxyStream::Tls(tls) => {
                Box::pin(relay::relay_stream(
                    client,
                    tls.as_mut(),
                    &tunnel.early_data,
                    self.timeouts,
                    &entry.progress,
                ))
                .await
            }
        };
        match relayed {
            Ok(moved) => {
                let up = entry.progress.to_upstream.load(Ordering::Relaxed);
                debug!(
                    "{process} -> {target}: closed after {up} bytes up, {} down",
                    moved.to_client
                );
                if moved.nothing_after_client_end && self.observer.log_limit.admit(dst) {
                    info!(
                        "{process} -> {target}: the proxy closed the tunnel right after the client's end-of-file ({up} bytes up, {} down): squid and tinyproxy do, so a client that half-closes gets no answer through them",
                        moved.to_client
                    );
                }
                self.observer.closed(
                    entry,
                    &Ending {
                        outcome: Outcome::Tunnelled,
                        status: None,
                        detail: None,
                        up,
                        down: moved.to_client,
                    },
                );
            }
            Err(err) => {
                if self.observer.log_limit.admit(dst) {
                    info!("{process} -> {target}: aborted: {err}");
                } else {
                    debug!("{process} -> {target}: aborted: {err}");
                }
                reset(client);
                reset(stream.tcp());
                let outcome = match err {
                    RelayError::Io(_) => Outcome::Reset,
                    RelayError::HalfCloseIdle(_) | RelayError::Idle(_) => Outcome::Idle,
                };
                self.observer.closed(
                    entry,
                    &Ending {
                        outcome,
                        status: None,
                        detail: Some(&err),
                        up: entry.progress.to_upstream.load(Ordering::Relaxed),
                        down: entry.progress.to_client.load(Ordering::Relaxed),
                    },
                );
            }
        }
    }

    /// A connect to a fake address (`--dns fake`) whose name is unknown: handed out before the
    /// daemon restarted, and cached by the application since. There is nothing to ask the
    /// proxy for; the client is reset, and asks DNS again soon (fake answers live a second).
    fn no_name(&self, entry: &TunnelEntry, client: &TcpStream) {
        let (process, dst) = (&entry.process, entry.dst);
        if self.observer.log_limit.admit(dst) {
            warn!(
                "{process} -> {dst}: reset: no name has this fake address (the application kept an answer from before the daemon restarted; it gets a new one when it asks again)"
            );
        }
        reset(client);
        self.observer.closed(
            entry,
            &Ending {
                outcome: Outcome::NoName,
                status: None,
                detail: None,
                up: 0,
                down: 0,
            },
        );
    }

    /// A tunnel that did not open: says why, remembers a destination the proxy reports
    /// refused, and answers the client with a reset (or the proxy's page, with
    /// `--on-proxy-error=http`).
    async fn not_opened(
        &self,
        entry: &TunnelEntry,
        client: &mut TcpStream,
        NotOpened {
            error,
            taken,
            went_ahead,
            name,
        }: NotOpened,
    ) {
        let (process, dst) = (&entry.process, entry.dst);
        let target = entry.target();
        let (outcome, status) = Outcome::of(&error);
        self.observer.closed(
            entry,
            &Ending {
                outcome,
                status,
                detail: Some(&error),
                up: if went_ahead { taken.len() as u64 } else { 0 },
                down: 0,
            },
        );
        let logged = self.observer.log_limit.admit(dst);
        if let TunnelError::ClientFailed(_) = error {
            // Gone before the tunnel opened: nothing the proxy did.
            if logged {
                info!("{process} -> {target}: {error}");
            } else {
                debug!("{process} -> {target}: {error}");
            }
            reset(client);
            return;
        }
        // A proxy that drops bytes sent ahead of its reply can fail like this.
        let hint = if !went_ahead || taken.is_empty() || error.rejection().is_some() {
            ""
        } else {
            " (the client's bytes went ahead of the reply; --wait-for-reply holds them back)"
        };
        if logged {
            warn!("{process} -> {target}: {error}{hint}");
        } else {
            debug!("{process} -> {target}: {error}{hint}");
        }
        // Refused by name, the address may serve other names that work: only a tunnel asked
        // for by address makes the address refused, or a fake address, which stands for its
        // one name.
        let one_name = name.is_none() || self.names.is_fake(dst.ip());
        if error.destination_unreachable() && one_name {
            self.refusals.record(dst);
        }
        if let Some(rejection) = error.rejection()
            && self.upstream.keeps_error_pages()
            && error_page::show(client, &taken, rejection).await
        {
            return;
        }
        reset(client);
    }
}
