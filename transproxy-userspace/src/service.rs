//! The interception service shared by `run` and `exec`: listeners, programs and workers.
//!
//! Order matters. The listeners are bound before the programs attach, so no redirected connect
//! ever meets a closed port. Everything privileged happens in [`Service::attach`], before any
//! runtime or worker thread exists, so the daemon can drop its capabilities while it is still
//! one thread; [`Attached::start`] then starts the workers. On SIGINT/SIGTERM
//! ([`Service::stop`]) the programs are detached first (new connects go direct again, unless
//! the kill switch pinned them), then open tunnels get a grace period to finish. A reload swaps
//! the rules in the kernel maps; established tunnels are not touched.

use std::{
    fs::File,
    net::{SocketAddr, TcpListener as StdListener},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    accept::{Arrival, Workers},
    cli::{DnsMode, OnProxyError},
    config::Settings,
    connection::Tunnels,
    containers::{ContainerUpstreams, Namespaces},
    dns::{DnsBound, FakePool, HostNames, Responder},
    kernel::{
        Behaviour, Interceptor, KernelCounters, ListenerSockets, Listeners, Refusals, Scope,
        UnservedEvents, cgroup, kill_switch::PinDir,
    },
    local_proxy::{self, Exemption, LocalProxy},
    observe::{
        Observer,
        access_log::{AccessLog, Target},
        metrics,
        status::{self, About, ControlSocket, ProxyStatus},
    },
    policy::{LocalProxyExemption, Policy},
    privileges,
    relay::{self, Timeouts},
    reuseport,
    upstream::{Hop, ProxyList, ProxyReport, ProxyState, ProxyUrl, Upstream, UpstreamOptions},
};

/// The programs attached and the listeners bound, not serving yet: what needs privileges is
/// done. [`Attached::start`] makes it a running [`Service`].
pub(crate) struct Attached {
    service: Service,
    /// Bound, one set per worker thread.
    sockets: Vec<Vec<StdListener>>,
    /// `--metrics`, bound.
    metrics: Option<StdListener>,
    /// The control socket for `transproxy status`, bound.
    control: Option<(std::os::unix::net::UnixListener, PathBuf)>,
    counters: Arc<KernelCounters>,
    /// `--dns`: the responder and its bound sockets.
    dns: Option<(Arc<Responder>, DnsBound)>,
    /// Connects in namespaces not served yet, for [`Namespaces::start`].
    unserved: UnservedEvents,
}

/// What status shows of the service besides its tunnels; the description changes on reload.
struct Identity {
    started: std::time::Instant,
    cgroup: String,
    listeners: Vec<String>,
    kill_switch: Option<String>,
    proxy: String,
    /// `--dns`, and what it learned.
    dns: Option<(DnsMode, Arc<HostNames>)>,
    dns_listeners: Vec<String>,
    /// The ready line's description and the proxy's addresses, as they are now.
    now: std::sync::Mutex<(String, Vec<String>)>,
}

impl Identity {
    fn about(&self, proxies: &[ProxyReport]) -> About {
        let (intercepting, proxy_addrs) =
            self.now.lock().map(|now| now.clone()).unwrap_or_default();
        About {
            started: self.started,
            cgroup: self.cgroup.clone(),
            intercepting,
            proxy: self.proxy.clone(),
            proxy_addrs,
            proxies: proxies.iter().map(ProxyStatus::of).collect(),
            listeners: self.listeners.clone(),
            kill_switch: self.kill_switch.clone(),
            dns: self
                .dns
                .as_ref()
                .map(|(mode, names)| match (mode, &names.fake) {
                    (DnsMode::Fake, Some(pool)) => format!("fake, {} addresses", pool.len()),
                    _ => format!("forward, {} names learned", names.learned.len()),
                }),
            dns_listeners: self.dns_listeners.clone(),
            namespaces: Vec::new(),
        }
    }
}

/// What a service intercepts.
pub(crate) enum Intercepts<'a> {
    /// The processes of a cgroup tree: its directory, opened, and its path.
    Cgroup { dir: &'a File, path: &'a Path },
    /// Gateway mode: other hosts' TCP entering on these interfaces.
    Gateway { interfaces: &'a [String] },
}

/// This host's own addresses (gateway mode never intercepts them: its own services stay its
/// own).
fn own_addresses() -> anyhow::Result<Vec<std::net::IpAddr>> {
    let mut own = Vec::new();
    for ifaddr in nix::ifaddrs::getifaddrs().context("cannot list this host's addresses")? {
        let Some(address) = ifaddr.address else {
            continue;
        };
        if let Some(v4) = address.as_sockaddr_in() {
            own.push(std::net::IpAddr::V4(v4.ip()));
        } else if let Some(v6) = address.as_sockaddr_in6() {
            own.push(std::net::IpAddr::V6(v6.ip()));
        }
    }
    Ok(own)
}

/// The programs attached to one cgroup plus the workers serving what they redirect.
pub(crate) struct Service {
    interceptor: Interceptor,
    listeners: Listeners,
    tunnels: Arc<Tunnels>,
    /// The rules in force, never-intercepted sockets included.
    policy: Policy,
    /// The intercepted cgroup's directory; `None` in gateway mode.
    cgroup_path: Option<PathBuf>,
    /// The proxy's processes, when it runs on this host.
    local_proxy: Option<LocalProxy>,
    /// Told when one of the local proxy's exempt processes exits.
    local_proxy_exit: Arc<tokio::sync::Notify>,
    /// The tasks watching them.
    local_proxy_watch: Vec<tokio::task::JoinHandle<()>>,
    /// The `--max-tunnels` in force (the semaphore only counts what is left).
    max_tunnels: usize,
    /// This daemon's kill-switch pins.
    pinned: Option<PathBuf>,
    /// `--refuse-udp`, for the ready line.
    refuse_udp: bool,
    /// `--dns`, for the ready line.
    dns_mode: DnsMode,
    /// What tunnels learn from DNS.
    names: Arc<HostNames>,
    /// For status.
    identity: Arc<Identity>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Empty until started.
    workers: Vec<Arc<Workers>>,
    /// The other network namespaces served (containers), unless that could not start.
    namespaces: Option<Arc<Namespaces>>,
    /// How connections reach the listeners: `Some(Forwarded)` in gateway mode.
    arrival: Option<Arrival>,
    /// Status and metrics, on the main runtime; stopped with the service.
    side_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Removed when the service ends.
    control_socket: Option<Arc<ControlSocket>>,
    /// The memory file gss-ntlmssp reads the password from (NTLM inside SPNEGO).
    #[cfg(feature = "gssapi")]
    _ntlm_user_file: Option<std::os::fd::OwnedFd>,
}

impl Service {
    /// The privileged part: binds the listeners and loads and attaches the programs to what
    /// `intercepts` names (pinned there with the kill switch, kept only once attached). Needs no
    /// runtime.
    pub(crate) fn attach(
        settings: &Settings,
        intercepts: &Intercepts<'_>,
        pins: Option<PinDir>,
        fd_limit: u64,
    ) -> anyhow::Result<Attached> {
        let cgroup_path = match intercepts {
            Intercepts::Cgroup { path, .. } => Some(*path),
            Intercepts::Gateway { .. } => None,
        };
        // Gateway mode: the listeners take packets addressed to other hosts (IP_TRANSPARENT).
        let transparent = cgroup_path.is_none();
        // The GSSAPI's environment, while this process has one thread.
        #[cfg(feature = "gssapi")]
        // SAFETY: nothing has started a thread yet (see the module's description).
        let ntlm_user_file = unsafe {
            crate::upstream::auth::negotiate::prepare(
                settings.proxy_auth_ccache.as_deref(),
                settings.proxy_auth_keytab.as_deref(),
                settings.proxies.proxies().find_map(|p| p.credentials()),
            )?
        };
        let (max_tunnels, pipes) = privileges::share_descriptors(settings.max_tunnels, fd_limit)?;
        relay::budget_pipes(pipes);
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let v4 = reuseport::bind_group_with(settings.listen, workers, transparent).with_context(|| {
            format!(
                "cannot listen on {} (another transproxy daemon, see `transproxy status`, or another program may hold it; leave --listen out for a free port)",
                settings.listen
            )
        })?;
        let v6 = match settings.listen6 {
            None => Vec::new(),
            // The kill switch promises that nothing goes around the proxy: without an IPv6
            // listener every intercepted IPv6 connect would be refused, so say it now.
            Some(addr) if settings.fail_closed => reuseport::bind_group_with(addr, workers, transparent)
                .with_context(|| {
                    format!("cannot listen on {addr} (with --fail-closed every listener must bind; --listen6 off refuses IPv6 instead)")
                })?,
            Some(addr) => reuseport::bind_group_with(addr, workers, transparent).unwrap_or_else(|err| {
                warn!("IPv6 destinations will go direct: cannot listen on {addr}: {err}");
                Vec::new()
            }),
        };
        let listeners = Listeners {
            v4: match v4.first().map(StdListener::local_addr).transpose()? {
                Some(SocketAddr::V4(addr)) => addr,
                other => bail!("IPv4 listener bound to {other:?}"),
            },
            v6: match v6.first().map(StdListener::local_addr).transpose()? {
                Some(SocketAddr::V6(addr)) => Some(addr),
                _ => None,
            },
        };
        let dns = match settings.dns {
            DnsMode::Off => None,
            DnsMode::Forward | DnsMode::Fake => Some(DnsBound::bind()?),
        };
        let fake_pool = (settings.dns == DnsMode::Fake).then(|| {
            Arc::new(FakePool::new(
                settings.dns_pool_v4,
                settings.dns_pool_v6.filter(|_| listeners.v6.is_some()),
            ))
        });
        let proxy_addrs = settings
            .proxies
            .proxies()
            .map(ProxyUrl::resolve)
            .collect::<anyhow::Result<Vec<_>>>()?;
        // `[[container]]` proxies: where each section's proxies are.
        let container_addrs = settings
            .containers
            .iter()
            .map(|section| {
                section
                    .proxies
                    .proxies()
                    .map(ProxyUrl::resolve)
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let all_proxy_addrs: Vec<SocketAddr> = proxy_addrs
            .iter()
            .chain(container_addrs.iter().flatten())
            .flatten()
            .copied()
            .collect();
        let local_proxy = cgroup_path.and_then(|path| find_local_proxy(&all_proxy_addrs, path));
        let mut never = never_intercepted(&all_proxy_addrs, &listeners);
        never.extend(dns.iter().flat_map(DnsBound::tcp_addrs));
        let policy = settings
            .policy()
            .with_never(never)
            .with_never_hosts(match intercepts {
                Intercepts::Gateway { .. } => own_addresses()?,
                Intercepts::Cgroup { .. } => Vec::new(),
            })
            .with_local_proxy(exemption(local_proxy.as_ref()));
        // Containers' namespaces: listeners in those the tree's processes are in now, before
        // the programs attach, so none of their connects meets a namespace not served.
        let prepared = cgroup_path
            .filter(|_| settings.max_namespaces > 0)
            .map(|cgroup_path| {
                cgroup::v2_root().and_then(|root| {
                    Namespaces::prepare(
                        &root,
                        cgroup_path,
                        listeners.v4.port(),
                        listeners.v6.map(|a| a.port()),
                        settings.max_namespaces,
                    )
                })
            });
        let (namespaces, opened) = match prepared {
            None => (None, Vec::new()),
            Some(Ok((namespaces, opened))) => (Some(Arc::new(namespaces)), opened),
            Some(Err(err)) => {
                warn!(
                    "processes in other network namespaces (containers) will not be served: {err:#}"
                );
                (None, Vec::new())
            }
        };
        let sockets = ListenerSockets {
            v4: v4[0].as_fd(),
            v6: v6.first().map(AsFd::as_fd),
            dns: dns.as_ref().map(DnsBound::sockets),
            namespaces: opened
                .iter()
                .map(|o| (o.cookie, o.v4.as_fd(), o.v6.as_ref().map(AsFd::as_fd)))
                .collect(),
        };
        let behaviour = Behaviour {
            fail_closed: settings.fail_closed,
            refuse_udp: settings.refuse_udp,
            capture_dns: dns.is_some(),
            fake_pool: fake_pool.as_ref().map(|pool| pool.networks()),
        };
        let scope = match intercepts {
            Intercepts::Cgroup { dir, .. } => Scope::Cgroup(dir),
            Intercepts::Gateway { interfaces } => Scope::Gateway(interfaces),
        };
        let (interceptor, tables) = Interceptor::attach(
            &scope,
            &sockets,
            &policy.compile()?,
            behaviour,
            settings.max_pending,
            pins.as_ref(),
        )?;
        if let Some(namespaces) = &namespaces {
            namespaces.loaded(tables.listeners, opened);
        }

        let upstream = Upstream::new(
            settings.proxies.clone(),
            proxy_addrs,
            upstream_options(settings, settings.pac.clone()),
        );
        let containers = ContainerUpstreams::new(
            cgroup_path.unwrap_or(Path::new("/")),
            settings
                .containers
                .iter()
                .zip(container_addrs)
                .map(|(section, addrs)| {
                    let options = upstream_options(settings, None);
                    let upstream = Upstream::new(section.proxies.clone(), addrs, options);
                    (section.cgroup.clone(), upstream)
                })
                .collect(),
        );
        let access_log = settings
            .access_log
            .as_deref()
            .map(|target| AccessLog::start(Target::parse(target)))
            .transpose()?;
        let metrics = settings
            .metrics
            .map(|addr| {
                let listener = StdListener::bind(addr)
                    .with_context(|| format!("cannot serve metrics on {addr}"))?;
                listener.set_nonblocking(true)?;
                anyhow::Ok(listener)
            })
            .transpose()?;
        let control = match ControlSocket::prepare() {
            Ok(control) => Some(control),
            Err(err) => {
                warn!("`transproxy status` will not see this daemon: {err:#}");
                None
            }
        };
        let names = Arc::new(HostNames {
            fake: fake_pool,
            ..HostNames::default()
        });
        let dsts = Arc::new(tables.dsts);
        let observer = Arc::new(Observer::new(access_log));
        let dns = dns.map(|bound| {
            let responder = Responder::new(
                Arc::clone(&names),
                tables.dns_askers,
                Arc::clone(&dsts),
                settings.direct_names.union(&settings.dns_direct),
                listeners.v6.is_some(),
                Arc::clone(&observer),
            );
            (Arc::new(responder), bound)
        });
        let tunnels = Arc::new(Tunnels {
            dsts,
            names: Arc::clone(&names),
            refusals: Refusals::new(tables.refused, settings.refused_ttl)?,
            upstream,
            containers,
            timeouts: Timeouts {
                half_close_idle: settings.half_close_timeout,
                idle: settings.idle_timeout,
            },
            capacity: Arc::new(Semaphore::new(max_tunnels)),
            observer,
            local_proxy_pids: std::sync::RwLock::new(
                local_proxy
                    .as_ref()
                    .map(|p| p.pids.clone())
                    .unwrap_or_default(),
            ),
            loop_reported: std::sync::atomic::AtomicBool::new(false),
            cut: CancellationToken::new(),
        });
        // Worker i accepts on the i-th IPv4 and the i-th IPv6 socket.
        let sockets = v4
            .into_iter()
            .zip(
                v6.into_iter()
                    .map(Some)
                    .chain(std::iter::repeat_with(|| None)),
            )
            .map(|(v4, v6)| [Some(v4), v6].into_iter().flatten().collect())
            .collect();
        let pinned = pins.map(PinDir::keep);
        let identity = Arc::new(Identity {
            started: std::time::Instant::now(),
            cgroup: match intercepts {
                Intercepts::Cgroup { path, .. } => path.display().to_string(),
                Intercepts::Gateway { interfaces } => {
                    format!("none (gateway on {})", interfaces.join(", "))
                }
            },
            listeners: [
                Some(SocketAddr::V4(listeners.v4)),
                listeners.v6.map(SocketAddr::V6),
            ]
            .into_iter()
            .flatten()
            .map(|a| a.to_string())
            .collect(),
            kill_switch: pinned.as_ref().map(|p| p.display().to_string()),
            proxy: settings.proxies.to_string(),
            dns: (settings.dns != DnsMode::Off).then(|| (settings.dns, Arc::clone(&names))),
            dns_listeners: dns
                .as_ref()
                .map(|(_, bound)| bound.describe())
                .unwrap_or_default(),
            now: std::sync::Mutex::default(),
        });
        let service = Self {
            interceptor,
            listeners,
            tunnels,
            policy,
            cgroup_path: cgroup_path.map(Path::to_path_buf),
            arrival: match intercepts {
                Intercepts::Cgroup { .. } => None,
                Intercepts::Gateway { .. } => Some(Arrival::Forwarded),
            },
            local_proxy,
            local_proxy_exit: Arc::new(tokio::sync::Notify::new()),
            local_proxy_watch: Vec::new(),
            max_tunnels,
            pinned,
            refuse_udp: settings.refuse_udp,
            dns_mode: settings.dns,
            names,
            identity,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            workers: Vec::new(),
            namespaces,
            side_tasks: Vec::new(),
            control_socket: None,
            #[cfg(feature = "gssapi")]
            _ntlm_user_file: ntlm_user_file,
        };
        service.note_identity();
        Ok(Attached {
            service,
            sockets,
            metrics,
            control,
            counters: Arc::new(tables.counters),
            dns,
            unserved: tables.unserved,
        })
    }

    /// Keeps what status shows of the rules and the proxy's addresses up to date.
    fn note_identity(&self) {
        let addrs = self
            .tunnels
            .upstream
            .addrs()
            .iter()
            .map(ToString::to_string)
            .collect();
        if let Ok(mut now) = self.identity.now.lock() {
            *now = (self.describe(), addrs);
        }
    }

    /// Reaches each proxy once, in a task, and warns for each that does not answer (not an
    /// error: laptops start before their network).
    pub(crate) fn probe_proxy(&self) {
        let tunnels = Arc::clone(&self.tunnels);
        tokio::spawn(async move {
            let upstream = &tunnels.upstream;
            let silent = upstream.probe().await;
            let listed = upstream.list().proxies().count();
            let every = !silent.is_empty() && silent.len() == listed;
            for (proxy, addrs, err) in silent {
                let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                let consequence = if every
                    && !upstream
                        .list()
                        .hops()
                        .iter()
                        .any(|h| matches!(h, Hop::Direct))
                {
                    "every tunnel fails until one does"
                } else {
                    "tunnels go to the next in the list until it does"
                };
                warn!(
                    "the proxy {proxy} does not answer at {} ({err}): {consequence}",
                    addrs.join(", ")
                );
            }
        });
    }

    /// Reopens the access log (SIGHUP).
    pub(crate) fn reopen_access_log(&self) {
        self.tunnels.observer.reopen_access_log();
    }

    /// Fetches the PAC file again, if there is one (SIGHUP).
    pub(crate) fn reload_pac(&self) {
        if let Some(pac) = self.tunnels.upstream.pac() {
            pac.reload();
        }
    }

    /// This daemon's kill-switch pins, if it has them.
    pub(crate) fn pinned(&self) -> Option<&Path> {
        self.pinned.as_deref()
    }

    /// One line: what is intercepted, through which proxy, where it arrives.
    pub(crate) fn describe(&self) -> String {
        let v6 = self
            .listeners
            .v6
            .map(|v6| format!(" and {v6}"))
            .unwrap_or_default();
        let pinned = self
            .pinned
            .as_ref()
            .map(|p| format!("; fail-closed, programs pinned at {}", p.display()))
            .unwrap_or_default();
        let v6_refused = if self.pinned.is_some() && self.listeners.v6.is_none() {
            "; IPv6 destinations refused (no IPv6 listener)"
        } else {
            ""
        };
        let udp = if self.refuse_udp {
            "; UDP to intercepted destinations refused, DNS excepted"
        } else {
            ""
        };
        let dns = match (
            self.dns_mode,
            self.names.fake.as_ref().map(|p| p.networks()),
        ) {
            (DnsMode::Off, _) => String::new(),
            (DnsMode::Forward, _) | (DnsMode::Fake, None) => {
                "; DNS forwarded, its answers name the tunnels".to_owned()
            }
            (DnsMode::Fake, Some((v4, v6))) => {
                let pools: Vec<String> = v4
                    .map(|n| n.to_string())
                    .into_iter()
                    .chain(v6.map(|n| n.to_string()))
                    .collect();
                format!(
                    "; DNS answered with fake addresses from {}",
                    pools.join(" and ")
                )
            }
        };
        let local = self
            .local_proxy
            .as_ref()
            .filter(|p| p.exemption != Exemption::NotNeeded)
            .map(|p| format!("; {p}"))
            .unwrap_or_default();
        format!(
            "intercepting {} via {}, listening on {}{v6}, at most {} tunnel{}{pinned}{v6_refused}{udp}{dns}{local}",
            self.policy.describe(),
            via(&self.tunnels.upstream),
            self.listeners.v4,
            self.max_tunnels,
            if self.max_tunnels == 1 { "" } else { "s" },
        )
    }

    /// Applies the rules of `settings` to the running programs.
    pub(crate) fn reload(&mut self, settings: &Settings) -> Result<(), ReloadError> {
        self.apply(self.policy.with_rules_of(&settings.policy()))
    }

    /// The upstreams, as configured (their hosts are resolved again by
    /// [`Service::follow_proxy`]).
    pub(crate) fn proxies(&self) -> &ProxyList {
        self.tunnels.upstream.list()
    }

    /// Follows the `index`-th proxy's host to `addrs`, where it resolves now: new tunnels
    /// connect there, and every proxy's addresses are the ones never intercepted. Returns
    /// whether they changed (the same addresses in another order are no change).
    pub(crate) fn follow_proxy(
        &mut self,
        index: usize,
        addrs: Vec<SocketAddr>,
    ) -> Result<bool, ReloadError> {
        let upstream = &self.tunnels.upstream;
        if !upstream.would_move(index, &addrs) {
            // The same addresses, maybe in the resolver's new order of preference.
            upstream.set_addrs(index, addrs);
            return Ok(false);
        }
        let never = never_intercepted(&upstream.addrs_with(index, &addrs), &self.listeners);
        self.apply(self.policy.clone().with_never(never))?;
        self.tunnels.upstream.set_addrs(index, addrs);
        self.note_identity();
        Ok(true)
    }

    /// Looks again for a proxy on this host (it may have started, moved or stopped since), and
    /// keeps it out of interception.
    pub(crate) fn rescan_local_proxy(&mut self) {
        let addrs = self.tunnels.upstream.addrs();
        let found = match cgroup::v2_root() {
            Ok(root) => match &self.cgroup_path {
                Some(path) => local_proxy::find(&addrs, path, &root),
                None => return,
            },
            Err(_) => local_proxy::Scan::Unknown,
        };
        let found = match found {
            local_proxy::Scan::Found(proxy) => Some(proxy),
            local_proxy::Scan::None => None,
            local_proxy::Scan::Unknown => return,
        };
        if found == self.local_proxy {
            return;
        }
        match (&found, &self.local_proxy) {
            (Some(proxy), _) => info!("{proxy}"),
            (None, Some(_)) => info!("the local proxy is gone: nothing is exempt for it any more"),
            (None, None) => {}
        }
        self.watch_local_proxy(found.as_ref());
        if let Ok(mut pids) = self.tunnels.local_proxy_pids.write() {
            *pids = found.as_ref().map(|p| p.pids.clone()).unwrap_or_default();
        }
        let policy = self
            .policy
            .clone()
            .with_local_proxy(exemption(found.as_ref()));
        self.local_proxy = found;
        if let Err(ReloadError::Kept(err) | ReloadError::Mixed(err, _)) = self.apply(policy) {
            warn!("cannot keep the local proxy out of interception: {err:#}");
        }
    }

    /// When the local proxy is exempt by its processes, watches them: one that exits makes the
    /// daemon look again (its pid may be reused by anyone). Must run inside the runtime.
    fn watch_local_proxy(&mut self, proxy: Option<&LocalProxy>) {
        for task in self.local_proxy_watch.drain(..) {
            task.abort();
        }
        let Some(proxy) = proxy.filter(|p| p.exemption == Exemption::Processes) else {
            return;
        };
        for &pid in &proxy.pids {
            let exit = Arc::clone(&self.local_proxy_exit);
            self.local_proxy_watch.push(tokio::spawn(async move {
                local_proxy::exited(pid).await;
                exit.notify_one();
            }));
        }
    }

    /// Completes when one of the local proxy's exempt processes has exited.
    pub(crate) async fn local_proxy_exited(&self) {
        self.local_proxy_exit.notified().await;
    }

    /// Makes the kernel apply `policy`, and keeps it as the running one. The whole rule set is
    /// checked before a map changes; a failure half-way (the kernel out of memory) would leave
    /// a mix, so the running rules are put back.
    fn apply(&mut self, policy: Policy) -> Result<(), ReloadError> {
        let compiled = policy.compile().map_err(ReloadError::Kept)?;
        if let Err(err) = self.interceptor.update_rules(&compiled) {
            let running = self.policy.compile().map_err(ReloadError::Kept)?;
            return Err(match self.interceptor.update_rules(&running) {
                Ok(()) => ReloadError::Kept(err),
                Err(again) => ReloadError::Mixed(err, again),
            });
        }
        self.policy = policy;
        self.note_identity();
        Ok(())
    }

    /// Logs the summary of failures not logged one by one, if their window is over.
    pub(crate) fn flush_failure_log(&self) {
        self.tunnels.observer.log_limit.flush(false);
    }

    /// Detaches the programs (unless pinned), stops accepting, and gives open tunnels `grace`
    /// to finish.
    pub(crate) async fn stop(self, grace: Duration) {
        let Self {
            interceptor,
            tunnels,
            pinned,
            shutdown,
            tasks,
            workers,
            side_tasks,
            control_socket,
            local_proxy_watch,
            ..
        } = self;
        drop(interceptor);
        for task in side_tasks.into_iter().chain(local_proxy_watch) {
            task.abort();
        }
        drop(control_socket);
        if let Some(pins) = pinned {
            info!(
                "fail-closed: the programs stay attached (pinned at {}); `transproxy detach` removes them",
                pins.display()
            );
        }
        shutdown.cancel();
        tasks.close();
        let open = tasks.len();
        if open > 0 {
            info!(
                "waiting up to {grace:?} for {open} open {}",
                tunnels_word(open)
            );
            if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
                let left = tasks.len();
                info!("cutting {left} {} still open", tunnels_word(left));
                tunnels.cut.cancel();
                // Each resets its two sockets at once; the runtimes are dropped after.
                let _ = tokio::time::timeout(CUT_WAIT, tasks.wait()).await;
            }
        }
        for workers in workers {
            workers.halt();
        }
        tunnels.observer.log_limit.flush(true);
        info!("stopped: {}", tunnels.observer.metrics.counters());
    }
}

impl Attached {
    /// This daemon's kill-switch pins, if it has them.
    pub(crate) fn pinned(&self) -> Option<&Path> {
        self.service.pinned()
    }

    /// Starts the worker threads and forwards the programs' logs. Must run inside the (main)
    /// runtime.
    pub(crate) fn start(self) -> anyhow::Result<Service> {
        let Self {
            mut service,
            sockets,
            metrics,
            control,
            counters,
            dns,
            unserved,
        } = self;
        if let Some((responder, bound)) = dns {
            for socket in bound.udp {
                let socket = tokio::net::UdpSocket::from_std(socket)?;
                let responder = Arc::clone(&responder);
                service
                    .side_tasks
                    .push(tokio::spawn(responder.serve_udp(socket)));
            }
            for listener in bound.tcp {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let responder = Arc::clone(&responder);
                service
                    .side_tasks
                    .push(tokio::spawn(responder.serve_tcp(listener)));
            }
        }
        service.interceptor.forward_logs();
        let proxy = service.local_proxy.clone();
        service.watch_local_proxy(proxy.as_ref());
        if let Some(listener) = metrics {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let tunnels = Arc::clone(&service.tunnels);
            let read = move || metrics::Scrape {
                kernel: counters.read(),
                proxies: tunnels
                    .upstream
                    .report()
                    .into_iter()
                    .map(|p| (p.url, p.state == ProxyState::Up))
                    .collect(),
            };
            service.side_tasks.push(tokio::spawn(metrics::serve(
                listener,
                Arc::clone(&service.tunnels.observer),
                Arc::new(read),
            )));
        }
        if let Some(pac) = service.tunnels.upstream.pac() {
            pac.start()?;
        }
        let arrival = match service.arrival {
            Some(arrival) => arrival,
            None => Arrival::Redirected(crate::kernel::own_netns_cookie()?),
        };
        let workers = Arc::new(Workers::start(
            sockets,
            arrival,
            &service.tunnels,
            &service.shutdown,
            &service.tasks,
        )?);
        if let Some(namespaces) = &service.namespaces {
            let tasks = namespaces.start(Arc::clone(&workers), unserved, &service.shutdown)?;
            service.side_tasks.extend(tasks);
        }
        service.workers.push(workers);
        if let Some((listener, path)) = control {
            let control = Arc::new(ControlSocket::bind(listener, path)?);
            service.control_socket = Some(Arc::clone(&control));
            let (tunnels, identity) = (Arc::clone(&service.tunnels), Arc::clone(&service.identity));
            let namespaces = service.namespaces.clone();
            service.side_tasks.push(tokio::spawn(async move {
                loop {
                    let stream = control.next().await;
                    let (tunnels, identity, namespaces) = (
                        Arc::clone(&tunnels),
                        Arc::clone(&identity),
                        namespaces.clone(),
                    );
                    tokio::spawn(async move {
                        answer(stream, &tunnels, &identity, namespaces.as_ref()).await;
                    });
                }
            }));
        }
        Ok(service)
    }
}

/// How upstreams behave, from `settings`; `pac` is the daemon's own (`[[container]]` sections
/// name their proxies).
fn upstream_options(
    settings: &Settings,
    pac: Option<(crate::pac::PacSource, Duration)>,
) -> UpstreamOptions {
    UpstreamOptions {
        connect_timeout: settings.connect_timeout,
        reply_timeout: settings.reply_timeout,
        send_ahead: !settings.wait_for_reply,
        keep_error_page: settings.on_proxy_error == OnProxyError::Http,
        sniff_timeout: settings.sniff_timeout,
        direct_names: settings.direct_names.clone(),
        auth_scheme: settings.proxy_auth_scheme,
        kerberos: settings.kerberos(),
        proxy_skip: settings.proxy_skip,
        proxy_trust: settings.proxy_trust.clone(),
        pac,
        pac_fallback: settings.pac_fallback,
    }
}

/// Answers one request on the control socket.
async fn answer(
    stream: tokio::net::UnixStream,
    tunnels: &Tunnels,
    identity: &Identity,
    namespaces: Option<&Arc<Namespaces>>,
) {
    let Some((request, stream)) = status::read_request(stream).await else {
        return;
    };
    match request {
        Ok(status::Request::Status) => {
            let mut about = identity.about(&tunnels.upstream.report());
            about.namespaces = namespaces.map(|n| n.status()).unwrap_or_default();
            status::answer(stream, tunnels.observer.status(about)).await;
        }
        Ok(status::Request::Serve(target)) => {
            let line = match namespaces {
                None => "error: this daemon does not serve other network namespaces".to_owned(),
                Some(namespaces) => match namespaces.serve(target, "asked by a hook").await {
                    Ok(outcome) => format!("ok: {outcome}"),
                    Err(err) => format!("error: {err:#}"),
                },
            };
            status::answer_line(stream, &line).await;
        }
        Err(why) => status::answer_line(stream, &format!("error: {why}")).await,
    }
}

/// The local proxy at `addrs`, when one runs on this host and can be seen (at start the daemon
/// still has every privilege, unless a service manager took CAP_SYS_PTRACE away).
fn find_local_proxy(addrs: &[SocketAddr], intercepted: &Path) -> Option<LocalProxy> {
    let root = cgroup::v2_root().ok()?;
    match local_proxy::find(addrs, intercepted, &root) {
        local_proxy::Scan::Found(proxy) => Some(proxy),
        local_proxy::Scan::None => None,
        local_proxy::Scan::Unknown => {
            warn!(
                "someone listens at the proxy's local address, but the daemon cannot see whose socket it is (it needs CAP_SYS_PTRACE at start): if that proxy runs inside the intercepted cgroup, exclude its user with --exclude-uid"
            );
            None
        }
    }
}

/// What the kernel exempts for `proxy`.
fn exemption(proxy: Option<&LocalProxy>) -> LocalProxyExemption {
    match proxy.map(|p| (p, &p.exemption)) {
        Some((_, Exemption::Cgroup(id, _))) => LocalProxyExemption {
            cgroup: Some(*id),
            ..LocalProxyExemption::default()
        },
        Some((_, Exemption::User(uid))) => LocalProxyExemption {
            uid: Some(*uid),
            ..LocalProxyExemption::default()
        },
        Some((proxy, Exemption::Processes)) => LocalProxyExemption {
            pids: proxy.pids.clone(),
            ..LocalProxyExemption::default()
        },
        _ => LocalProxyExemption::default(),
    }
}

/// The sockets no rule may intercept: the proxy's (its own traffic would loop, and a client set
/// to use it directly must reach it) and the listeners'.
fn never_intercepted(proxy: &[SocketAddr], listeners: &Listeners) -> Vec<SocketAddr> {
    let mut never = proxy.to_vec();
    never.push(SocketAddr::V4(listeners.v4));
    never.extend(listeners.v6.map(SocketAddr::V6));
    never
}

/// Why a reload did not apply.
pub(crate) enum ReloadError {
    /// The new rules were refused; the running ones are in force, whole.
    Kept(anyhow::Error),
    /// The new rules failed half-way, and so did putting the running ones back.
    Mixed(anyhow::Error, anyhow::Error),
}

/// "tunnel" or "tunnels".
fn tunnels_word(n: usize) -> &'static str {
    if n == 1 { "tunnel" } else { "tunnels" }
}

/// How long tunnels cut at the end of the shutdown grace get to reset their sockets before the
/// worker runtimes are dropped (which would close what is left with a FIN).
const CUT_WAIT: Duration = Duration::from_secs(1);

/// Says once which NO_PROXY entries cannot be honoured, and what else in the settings looks
/// like a mistake.
pub(crate) fn report_ignored_no_proxy(settings: &Settings) {
    for note in &settings.notes {
        warn!("{note}");
    }
    if !settings.no_proxy_ignored.is_empty() {
        warn!(
            "NO_PROXY entries that are neither an address nor a host name are ignored: {}",
            settings.no_proxy_ignored.join(", ")
        );
    }
    if !settings.direct_names.is_empty() {
        info!(
            "NO_PROXY names go direct: {}",
            settings.direct_names.describe()
        );
    }
}

/// The main thread's runtime: signals, reloads, log forwarding and shutdown. Tunnels run on the
/// [`Workers`].
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// "proxy URL", "proxies URL, URL, direct", "direct connections", or "the PAC file ...".
fn via(upstream: &Upstream) -> String {
    let list = upstream.list();
    if let Some(pac) = upstream.pac() {
        let known = if list.hops().is_empty() {
            String::new()
        } else {
            format!(" (credentials for {list})")
        };
        return format!("the proxies the PAC file {} chooses{known}", pac.source());
    }
    match list.hops() {
        [Hop::Direct] => "direct connections".to_owned(),
        [_] => format!("proxy {list}"),
        _ => format!("proxies {list} (in this order)"),
    }
}
