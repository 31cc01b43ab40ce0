//! `transproxy run`: a long-running daemon for one cgroup (default: the whole host). It serves
//! until SIGINT or SIGTERM; SIGHUP re-reads the config file's rules and the proxy's host name,
//! which is also resolved again every minute (a laptop that changes networks follows its
//! proxy). Under systemd it says when it is ready, reloading and stopping ([`crate::notify`]).

use std::{io::Write as _, process::ExitCode};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::{
    cli::RunArgs,
    config::{Mode, Settings},
    kernel::{
        cgroup,
        kill_switch::{self, PinDir},
    },
    notify::Notifier,
    observe::failure_log,
    privileges,
    service::{Attached, Intercepts, ReloadError, Service, report_ignored_no_proxy, runtime},
    upstream::lookup::{self, ProxyLookups, Reason, Resolved},
};

/// `transproxy run`: validates everything that can be checked, attaches, drops privileges, then
/// serves until a signal.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::resolve(&args.settings, Some(&args.run_only), Mode::Run)?;
    let cgroup_dir = match (
        &args.container,
        args.cgroup.clone().or_else(|| settings.cgroup.clone()),
    ) {
        (Some(container), _) => {
            crate::containers::runtime::cgroup_of(container, &cgroup::v2_root()?)?
        }
        (None, Some(dir)) => dir,
        (None, None) => cgroup::v2_root()?,
    };
    let cgroup = cgroup::open_v2(&cgroup_dir)?;
    privileges::require_root("run", privileges::ATTACHES)?;
    let run_as = settings
        .user
        .as_deref()
        .map(privileges::RunAs::look_up)
        .transpose()?;
    // SIGHUP re-reads the config file as that user: a file it cannot read would fail then.
    if let (Some(user), Some(config)) = (&run_as, &args.settings.config)
        && !user.can_read(config)
    {
        anyhow::bail!(
            "--user {}: the config file {} is not readable by that user, and SIGHUP re-reads it as that user; make it readable by the user's group (chgrp, chmod 640), keeping credentials in --proxy-auth-file",
            user.name(),
            config.display()
        );
    }
    let fd_limit = privileges::raise_fd_limit();
    let stopped = kill_switch::before_attach(&cgroup_dir)?;
    let pins = settings
        .fail_closed
        .then(|| PinDir::for_cgroup(&cgroup_dir))
        .transpose()?;
    let intercepts = Intercepts::Cgroup {
        dir: &cgroup,
        path: &cgroup_dir,
    };
    let attached = Service::attach(&settings, &intercepts, pins, fd_limit)?;
    kill_switch::take_over(stopped, attached.pinned())?;
    drop(cgroup);
    // Its socket is made while the daemon is still root (sending needs nothing more).
    let notifier = Notifier::from_env();
    privileges::drop_privileges(run_as.as_ref())?;
    let scope = format!("cgroup {}", cgroup_dir.display());
    runtime()?.block_on(serve(args, settings, scope, attached, notifier))?;
    Ok(ExitCode::SUCCESS)
}

/// Serves until SIGINT or SIGTERM; `scope` names what is intercepted in the ready line.
pub(crate) async fn serve(
    args: RunArgs,
    settings: Settings,
    scope: String,
    attached: Attached,
    notifier: Notifier,
) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut service = attached.start()?;
    report_ignored_no_proxy(&settings);
    let status = |service: &Service| format!("{} ({scope})", service.describe());
    println!("transproxy ready: {}", status(&service));
    // Scripts wait for this line; make sure it is out even when stdout is a pipe.
    let _ = std::io::stdout().flush();
    notifier.ready(&status(&service));
    service.probe_proxy();

    let mut recheck = tokio::time::interval(lookup::RECHECK);
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
                notifier.reloading();
                service.reopen_access_log();
                service.reload_pac();
                reload(&args, &settings, &mut service);
                service.rescan_local_proxy();
                notifier.ready(&status(&service));
                lookups.start(service.proxies(), Reason::Hangup);
            }
            _ = recheck.tick() => {
                lookups.start(service.proxies(), Reason::Timer);
                service.rescan_local_proxy();
            }
            _ = failure_window.tick() => service.flush_failure_log(),
            () = service.local_proxy_exited() => service.rescan_local_proxy(),
            (reason, resolved) = lookups.finished() => {
                follow_proxy(&mut service, reason, resolved);
                service.rescan_local_proxy();
                lookups.start_again(service.proxies());
            }
        }
    };
    notifier.stopping(&format!("{signal_name}: stopping"));
    // With the kill switch, `stop` says that the programs stay.
    if settings.fail_closed {
        info!("{signal_name}: stopping");
    } else {
        info!("{signal_name}: detaching and stopping");
    }
    service.stop(settings.shutdown_grace).await;
    Ok(())
}

/// Follows each proxy's host if it moved. A failed lookup (no network right now) keeps the
/// addresses in use. Reported at once when SIGHUP asked; otherwise only a move is.
fn follow_proxy(service: &mut Service, reason: Reason, resolved: Resolved) {
    for (index, proxy, addrs) in resolved {
        let addrs = match addrs {
            Ok(addrs) => addrs,
            Err(err) if reason == Reason::Hangup => {
                warn!("SIGHUP: keeping the addresses of {proxy}: {err:#}");
                continue;
            }
            Err(err) => {
                debug!("keeping the addresses of {proxy}: {err:#}");
                continue;
            }
        };
        let shown = addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        match service.follow_proxy(index, addrs) {
            Ok(false) if reason == Reason::Hangup => {
                info!("SIGHUP: the host of {proxy} still resolves to {shown}")
            }
            Ok(false) => {}
            Ok(true) => {
                info!("the host of {proxy} now resolves to {shown}; new tunnels go there");
                service.probe_proxy();
            }
            Err(ReloadError::Kept(err)) => error!(
                "the host of {proxy} moved to {shown}, but the rules cannot follow ({err:#}); new tunnels still go to the old addresses"
            ),
            Err(ReloadError::Mixed(err, again)) => error!(
                "the host of {proxy} moved to {shown}; updating the rules failed ({err:#}), and so did restoring them ({again:#}): the rules in force are a mix; restart transproxy"
            ),
        }
    }
}

/// SIGHUP: re-reads the config file and applies its rules. A broken file keeps the old rules.
fn reload(args: &RunArgs, current: &Settings, service: &mut Service) {
    let Some(path) = &args.settings.config else {
        info!("SIGHUP: no --config file to re-read; the rules stay as they are");
        return;
    };
    let settings = match Settings::resolve(&args.settings, Some(&args.run_only), Mode::Reload) {
        Ok(settings) => settings,
        Err(err) => {
            error!("SIGHUP: keeping the current rules: {err:#}");
            return;
        }
    };
    let listen6 = |s: &Settings| s.listen6.map(|a| a.to_string());
    if !settings.proxies.same_servers(&current.proxies)
        || settings.listen != current.listen
        || listen6(&settings) != listen6(current)
        || settings.cgroup != current.cgroup
        || settings.dns != current.dns
        || (settings.dns_pool_v4, settings.dns_pool_v6)
            != (current.dns_pool_v4, current.dns_pool_v6)
        || settings.dns_direct != current.dns_direct
    {
        warn!(
            "SIGHUP: proxy, listen, cgroup and DNS changes need a restart; only the rules are reloaded"
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
