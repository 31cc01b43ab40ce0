//! The interception service shared by `run` and `exec`, and `transproxy run` itself.
//!
//! Order matters. The listeners are bound before the programs attach, so no redirected connect
//! ever meets a closed port. Everything privileged happens before the runtime starts, so the
//! daemon can drop its capabilities while it is still one thread. On SIGINT/SIGTERM the
//! programs are detached first (new connects go direct again, unless the kill switch pinned
//! them), then open tunnels get a grace period to finish. SIGHUP re-reads the config file and
//! swaps the rules in the kernel maps; established tunnels are not touched.

use std::{
    fs::File,
    io::Write as _,
    net::{SocketAddr, TcpListener as StdListener},
    os::fd::AsFd,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};

use crate::{
    cgroup,
    cli::{RunArgs, SettingArgs},
    config::{Mode, Settings},
    failure_log::{self, FailureLog},
    interceptor::{Behaviour, Interceptor, ListenerSockets, Listeners},
    kill_switch::{self, PinDir},
    listener::{Stats, Tunnels},
    privileges,
    proxy_lookup::{self, ProxyLookups, Reason, Resolved},
    refusals::Refusals,
    relay::{self, Timeouts},
    reuseport,
    rules::Rules,
    tunnel::Upstream,
    workers::Workers,
};

/// The programs attached to one cgroup plus the listeners serving what they redirect.
pub struct Service {
    interceptor: Interceptor,
    listeners: Listeners,
    /// Bound but not yet serving, one set per worker thread; taken by [`Service::start`].
    sockets: Vec<Vec<StdListener>>,
    tunnels: Arc<Tunnels>,
    /// Sockets never intercepted whatever the rules: the proxy's and the listeners'.
    never: Vec<SocketAddr>,
    /// The rules as configured; the kernel applies them with `never` excluded too.
    policy: Rules,
    /// The `--max-tunnels` in force (the semaphore only counts what is left).
    max_tunnels: usize,
    pinned: Option<PathBuf>,
    /// `--refuse-udp`, for the ready line.
    refuse_udp: bool,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    workers: Option<Workers>,
}

impl Service {
    /// The privileged part: binds the listeners and loads and attaches the programs to
    /// `cgroup` (pinned there with the kill switch, kept only once attached). Needs no runtime.
    pub fn attach(
        settings: &Settings,
        cgroup: &File,
        pins: Option<PinDir>,
        fd_limit: u64,
    ) -> anyhow::Result<Self> {
        let (max_tunnels, pipes) = share_descriptors(settings.max_tunnels, fd_limit)?;
        relay::budget_pipes(pipes);
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let v4 = reuseport::bind_group(settings.listen, workers)
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let v6 = match settings.listen6 {
            None => Vec::new(),
            // The kill switch promises that nothing goes around the proxy: without an IPv6
            // listener every intercepted IPv6 connect would be refused, so say it now.
            Some(addr) if settings.fail_closed => reuseport::bind_group(addr, workers)
                .with_context(|| {
                    format!("cannot listen on {addr} (with --fail-closed every listener must bind; --listen6 off refuses IPv6 instead)")
                })?,
            Some(addr) => reuseport::bind_group(addr, workers).unwrap_or_else(|err| {
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
        let proxy_addrs = settings.proxy.resolve()?;
        let never = never_intercepted(&proxy_addrs, &listeners);
        let policy = settings.rules();
        let sockets = ListenerSockets {
            v4: v4[0].as_fd(),
            v6: v6.first().map(AsFd::as_fd),
        };
        let behaviour = Behaviour {
            fail_closed: settings.fail_closed,
            refuse_udp: settings.refuse_udp,
        };
        let (interceptor, tables) = Interceptor::attach(
            cgroup,
            &sockets,
            &policy.also_never(&never),
            behaviour,
            settings.max_pending,
            pins.as_ref(),
        )?;

        let tunnels = Arc::new(Tunnels {
            dsts: Arc::new(tables.dsts),
            refusals: Arc::new(Refusals::new(tables.refused, settings.refused_ttl)?),
            upstream: Arc::new(Upstream::new(
                settings.proxy.clone(),
                proxy_addrs,
                settings.connect_timeout,
                settings.reply_timeout,
            )),
            timeouts: Timeouts {
                half_close_idle: settings.half_close_timeout,
                idle: settings.idle_timeout,
            },
            on_proxy_error: settings.on_proxy_error,
            send_ahead: !settings.wait_for_reply,
            capacity: Arc::new(Semaphore::new(max_tunnels)),
            stats: Arc::new(Stats::default()),
            failures: FailureLog::default(),
            cut: CancellationToken::new(),
        });
        Ok(Self {
            interceptor,
            listeners,
            // Worker i accepts on the i-th IPv4 and the i-th IPv6 socket.
            sockets: v4
                .into_iter()
                .zip(
                    v6.into_iter()
                        .map(Some)
                        .chain(std::iter::repeat_with(|| None)),
                )
                .map(|(v4, v6)| [Some(v4), v6].into_iter().flatten().collect())
                .collect(),
            tunnels,
            never,
            policy,
            max_tunnels,
            pinned: pins.map(PinDir::keep),
            refuse_udp: settings.refuse_udp,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            workers: None,
        })
    }

    /// Logs the summary of failures not logged one by one, if their window is over.
    pub fn flush_failure_log(&self) {
        self.tunnels.failures.flush(false);
    }

    /// This daemon's kill-switch pins, if it has them.
    pub fn pinned(&self) -> Option<&std::path::Path> {
        self.pinned.as_deref()
    }

    /// Starts the worker threads and forwards the programs' logs. Must run inside the (main)
    /// runtime.
    pub fn start(&mut self) -> anyhow::Result<()> {
        self.interceptor.forward_logs();
        let sockets = std::mem::take(&mut self.sockets);
        self.workers = Some(Workers::start(
            sockets,
            &self.tunnels,
            &self.shutdown,
            &self.tasks,
        )?);
        Ok(())
    }

    /// One line: what is intercepted, through which proxy, where it arrives.
    pub fn describe(&self) -> String {
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
        format!(
            "intercepting {} via proxy {}, listening on {}{v6}, at most {} tunnels{pinned}{v6_refused}{udp}",
            self.policy.also_never(&self.never).describe(),
            self.tunnels.upstream.proxy(),
            self.listeners.v4,
            self.max_tunnels,
        )
    }

    /// Applies the rules of `settings` to the running programs.
    pub fn reload(&mut self, settings: &Settings) -> Result<(), ReloadError> {
        self.apply(settings.rules(), self.never.clone())
    }

    /// The proxy, as configured (its host is resolved again by [`Service::follow_proxy`]).
    pub fn proxy(&self) -> &crate::proxy::ProxyUrl {
        self.tunnels.upstream.proxy()
    }

    /// Follows the proxy's host to `addrs`, where it resolves now: new tunnels connect there,
    /// and those addresses are the ones never intercepted. Returns whether they changed (the
    /// same addresses in another order are no change).
    pub fn follow_proxy(&mut self, addrs: Vec<SocketAddr>) -> Result<bool, ReloadError> {
        let sorted = |addrs: &[SocketAddr]| {
            let mut addrs = addrs.to_vec();
            addrs.sort();
            addrs.dedup();
            addrs
        };
        if sorted(&addrs) == sorted(&self.tunnels.upstream.addrs()) {
            // The same addresses, maybe in the resolver's new order of preference.
            self.tunnels.upstream.set_addrs(addrs.into());
            return Ok(false);
        }
        let never = never_intercepted(&addrs, &self.listeners);
        self.apply(self.policy.clone(), never)?;
        self.tunnels.upstream.set_addrs(addrs.into());
        Ok(true)
    }

    /// Makes the kernel apply `policy` with `never` excluded, and keeps both as the running
    /// ones. `update_rules` checks the whole rule set before it changes a map; a failure
    /// half-way (the kernel out of memory) would leave a mix, so the running rules are put back.
    fn apply(&mut self, policy: Rules, never: Vec<SocketAddr>) -> Result<(), ReloadError> {
        if let Err(err) = self.interceptor.update_rules(&policy.also_never(&never)) {
            let running = self.policy.also_never(&self.never);
            return Err(match self.interceptor.update_rules(&running) {
                Ok(()) => ReloadError::Kept(err),
                Err(again) => ReloadError::Mixed(err, again),
            });
        }
        self.policy = policy;
        self.never = never;
        Ok(())
    }

    /// Detaches the programs (unless pinned), stops accepting, and gives open tunnels `grace`
    /// to finish.
    pub async fn stop(self, grace: Duration) {
        let Self {
            interceptor,
            tunnels,
            pinned,
            shutdown,
            tasks,
            workers,
            ..
        } = self;
        drop(interceptor);
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
            info!("waiting up to {grace:?} for {open} open tunnels");
            if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
                info!("cutting {} tunnels still open", tasks.len());
                tunnels.cut.cancel();
                // Each resets its two sockets at once; the runtimes are dropped after.
                let _ = tokio::time::timeout(CUT_WAIT, tasks.wait()).await;
            }
        }
        if let Some(workers) = workers {
            workers.halt();
        }
        tunnels.failures.flush(true);
        let stats = &tunnels.stats;
        info!(
            "stopped: {} accepted, {} tunnelled, {} failed at the proxy (refused, unreachable or broken), {} not redirected, {} over capacity",
            stats.accepted.load(Ordering::Relaxed),
            stats.tunnelled.load(Ordering::Relaxed),
            stats.failed_at_proxy.load(Ordering::Relaxed),
            stats.unmapped.load(Ordering::Relaxed),
            stats.over_capacity.load(Ordering::Relaxed),
        );
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
pub enum ReloadError {
    /// The new rules were refused; the running ones are in force, whole.
    Kept(anyhow::Error),
    /// The new rules failed half-way, and so did putting the running ones back.
    Mixed(anyhow::Error, anyhow::Error),
}

/// How long tunnels cut at the end of the shutdown grace get to reset their sockets before the
/// worker runtimes are dropped (which would close what is left with a FIN).
const CUT_WAIT: Duration = Duration::from_secs(1);

/// Descriptors kept for everything but tunnels: listeners, maps, logs, the runtime.
const RESERVED_FDS: u64 = 64;

/// Shares the descriptor limit: how many tunnels to admit (`--max-tunnels`, or what the limit
/// allows) and how many pipes may be open, the descriptors left once every admitted tunnel has
/// its two sockets. Past the limit, accepts and proxy connects would fail with "Too many open
/// files", so a `--max-tunnels` the limit cannot hold is refused.
fn share_descriptors(max_tunnels: Option<usize>, fd_limit: u64) -> anyhow::Result<(usize, usize)> {
    let usable = fd_limit.saturating_sub(RESERVED_FDS);
    let most = (usable / 2).max(1);
    let tunnels = match max_tunnels {
        None => (usable / relay::FDS_PER_TUNNEL).max(1),
        Some(n) if n as u64 <= most => n as u64,
        Some(n) => bail!(
            "--max-tunnels {n}: the descriptor limit of {fd_limit} holds at most {most} tunnels (two sockets each); raise the hard limit (ulimit -Hn) or ask for fewer"
        ),
    };
    let pipes = usable.saturating_sub(2 * tunnels) / 2;
    let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    Ok((count(tunnels), count(pipes)))
}

/// Says once which NO_PROXY entries cannot be honoured.
pub fn report_ignored_no_proxy(settings: &Settings) {
    if !settings.no_proxy_ignored.is_empty() {
        warn!(
            "NO_PROXY entries that name hosts cannot apply to IP-level interception and are ignored: {}",
            settings.no_proxy_ignored.join(", ")
        );
    }
}

/// Refuses to go on without root, with a clear reason: `why` says what the command does that
/// needs it.
pub fn require_root(command: &str, why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("transproxy {command} must run as root ({why}); try sudo");
    }
    Ok(())
}

/// What `run` and `exec` do that needs root.
pub const ATTACHES: &str = "it loads eBPF programs and attaches them to a cgroup";

/// The main thread's runtime: signals, reloads, log forwarding and shutdown. Tunnels run on the
/// [`Workers`].
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `transproxy run`: validates everything that can be checked, attaches, drops privileges, then
/// serves until a signal.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::resolve(&args.settings, Mode::Run)?;
    let cgroup_dir = match args.cgroup.clone().or_else(|| settings.cgroup.clone()) {
        Some(dir) => dir,
        None => cgroup::v2_root()?,
    };
    let cgroup = cgroup::open_v2(&cgroup_dir)?;
    require_root("run", ATTACHES)?;
    let run_as = settings
        .user
        .as_deref()
        .map(privileges::RunAs::look_up)
        .transpose()?;
    let fd_limit = privileges::raise_fd_limit();
    let stopped = kill_switch::before_attach(&cgroup_dir)?;
    let pins = settings
        .fail_closed
        .then(|| PinDir::for_cgroup(&cgroup_dir))
        .transpose()?;
    let service = Service::attach(&settings, &cgroup, pins, fd_limit)?;
    kill_switch::take_over(stopped, service.pinned())?;
    drop(cgroup);
    privileges::drop_privileges(run_as.as_ref())?;
    runtime()?.block_on(serve(args.settings, settings, cgroup_dir, service))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(
    args: SettingArgs,
    settings: Settings,
    cgroup_dir: PathBuf,
    mut service: Service,
) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    service.start()?;
    report_ignored_no_proxy(&settings);
    println!(
        "transproxy ready: {} (cgroup {})",
        service.describe(),
        cgroup_dir.display()
    );
    // Scripts wait for this line; make sure it is out even when stdout is a pipe.
    let _ = std::io::stdout().flush();

    let mut recheck = tokio::time::interval(proxy_lookup::RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once, and the host was just resolved.
    recheck.tick().await;
    let mut lookups = ProxyLookups::default();
    let mut failure_window = tokio::time::interval(failure_log::WINDOW);
    let signal_name = loop {
        tokio::select! {
            _ = sigint.recv() => break "SIGINT",
            _ = sigterm.recv() => break "SIGTERM",
            _ = sighup.recv() => {
                reload(&args, &settings, &mut service);
                lookups.start(service.proxy(), Reason::Hangup);
            }
            _ = recheck.tick() => lookups.start(service.proxy(), Reason::Timer),
            _ = failure_window.tick() => service.flush_failure_log(),
            (reason, resolved) = lookups.finished() => {
                follow_proxy(&mut service, reason, resolved);
                lookups.start_again(service.proxy());
            }
        }
    };
    // With the kill switch, `stop` says that the programs stay.
    if settings.fail_closed {
        info!("{signal_name}: stopping");
    } else {
        info!("{signal_name}: detaching and stopping");
    }
    service.stop(settings.shutdown_grace).await;
    Ok(())
}

/// Follows the proxy's host if it moved. A failed lookup (no network right now) keeps the
/// addresses in use. Reported at once when SIGHUP asked; otherwise only a move is.
fn follow_proxy(service: &mut Service, reason: Reason, resolved: Resolved) {
    let addrs = match resolved {
        Ok(addrs) => addrs,
        Err(err) if reason == Reason::Hangup => {
            warn!("SIGHUP: keeping the proxy's addresses: {err:#}");
            return;
        }
        Err(err) => {
            debug!("keeping the proxy's addresses: {err:#}");
            return;
        }
    };
    let shown = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match service.follow_proxy(addrs) {
        Ok(false) if reason == Reason::Hangup => {
            info!("SIGHUP: the proxy's host still resolves to {shown}")
        }
        Ok(false) => {}
        Ok(true) => info!("the proxy's host now resolves to {shown}; new tunnels go there"),
        Err(ReloadError::Kept(err)) => error!(
            "the proxy's host moved to {shown}, but the rules cannot follow ({err:#}); new tunnels still go to the old addresses"
        ),
        Err(ReloadError::Mixed(err, again)) => error!(
            "the proxy's host moved to {shown}; updating the rules failed ({err:#}), and so did restoring them ({again:#}): the rules in force are a mix; restart transproxy"
        ),
    }
}

/// SIGHUP: re-reads the config file and applies its rules. A broken file keeps the old rules.
fn reload(args: &SettingArgs, current: &Settings, service: &mut Service) {
    let Some(path) = &args.config else {
        info!("SIGHUP: no --config file to re-read; the rules stay as they are");
        return;
    };
    let settings = match Settings::resolve(args, Mode::Reload) {
        Ok(settings) => settings,
        Err(err) => {
            error!("SIGHUP: keeping the current rules: {err:#}");
            return;
        }
    };
    let listen6 = |s: &Settings| s.listen6.map(|a| a.to_string());
    if !settings.proxy.same_server(&current.proxy)
        || settings.listen != current.listen
        || listen6(&settings) != listen6(current)
        || settings.cgroup != current.cgroup
    {
        warn!(
            "SIGHUP: proxy, listen and cgroup changes need a restart; only the rules are reloaded"
        );
    }
    match service.reload(&settings) {
        Ok(()) => info!(
            "SIGHUP: reloaded {}: {}",
            path.display(),
            service.describe()
        ),
        Err(ReloadError::Kept(err)) => error!("SIGHUP: keeping the current rules: {err:#}"),
        Err(ReloadError::Mixed(err, again)) => error!(
            "SIGHUP: reload failed ({err:#}), and so did restoring the previous rules ({again:#}): the rules in force are a mix; restart transproxy"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_shared_between_sockets_and_pipes() {
        // By default a third of the usable descriptors goes to pipes.
        assert_eq!(share_descriptors(None, 20_064).unwrap(), (6_666, 3_334));
        // Asking for the most leaves no pipe: every bulk direction copies.
        assert_eq!(
            share_descriptors(Some(10_000), 20_064).unwrap(),
            (10_000, 0)
        );
        let err = share_descriptors(Some(10_001), 20_064)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 10000 tunnels"), "{err}");
        // A limit too small for anything still admits one tunnel.
        assert_eq!(share_descriptors(None, 10).unwrap(), (1, 0));
    }
}
