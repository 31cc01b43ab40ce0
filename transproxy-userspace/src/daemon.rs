//! `transproxy run`: start-up, the ready line, and graceful shutdown.
//!
//! Order matters. The listener is bound before the programs attach, so no redirected connect
//! ever meets a closed port. On SIGINT/SIGTERM the programs are detached first (new connects go
//! direct again), then open tunnels get a grace period to finish.

use std::{
    io::Write as _,
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
};

use anyhow::{Context as _, bail};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

use crate::{
    cgroup,
    cli::RunArgs,
    interceptor::Interceptor,
    listener::{Listener, Stats},
    proxy::ProxyUrl,
    rules::Rules,
    tunnel::Upstream,
};

/// Validates everything that can be checked without privileges, then runs until a signal.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let proxy = ProxyUrl::from_flag_or_env(args.proxy.as_deref())?;
    let listen = listen_addr(args.listen)?;
    let cgroup_dir = match &args.cgroup {
        Some(dir) => dir.clone(),
        None => cgroup::v2_root()?,
    };
    let cgroup = cgroup::open_v2(&cgroup_dir)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "transproxy run must run as root (it loads eBPF programs and attaches them to a cgroup); try sudo"
        );
    }
    let proxy_addrs = proxy.resolve()?;
    let mut never: Vec<SocketAddr> = proxy_addrs.clone();
    never.push(SocketAddr::V4(listen));
    let rules = Rules::new(args.includes.clone(), args.excludes.clone(), &never);
    // Compile once here so a rule error surfaces before anything is attached.
    rules.v4_trie()?;
    let upstream = Upstream::new(proxy, proxy_addrs, args.connect_timeout);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args, listen, cgroup_dir, cgroup, rules, upstream))
}

/// The listener must be a specific IPv4 address: connect4 rewrites destinations to it.
fn listen_addr(addr: SocketAddr) -> anyhow::Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(v4) if !v4.ip().is_unspecified() && v4.port() != 0 => Ok(v4),
        _ => bail!(
            "--listen {addr}: must be a specific IPv4 address and port, such as 127.0.0.1:15001"
        ),
    }
}

async fn serve(
    args: RunArgs,
    listen: SocketAddrV4,
    cgroup_dir: PathBuf,
    cgroup: std::fs::File,
    rules: Rules,
    upstream: Upstream,
) -> anyhow::Result<()> {
    let tcp = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;

    let (interceptor, dsts) = Interceptor::attach(&cgroup, listen, &rules)?;
    drop(cgroup);

    let upstream = Arc::new(upstream);
    println!(
        "transproxy ready: intercepting {} from cgroup {} via proxy {}, listening on {listen}",
        rules.describe(),
        cgroup_dir.display(),
        upstream.proxy(),
    );
    // Scripts wait for this line; make sure it is out even when stdout is a pipe.
    let _ = std::io::stdout().flush();

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let stats = Arc::new(Stats::default());
    let listener = Listener {
        tcp,
        dsts: Arc::new(dsts),
        upstream: Arc::clone(&upstream),
        half_close_idle: args.half_close_timeout,
        stats: Arc::clone(&stats),
    };
    let accept_loop = tokio::spawn(listener.serve(shutdown.clone(), tasks.clone()));

    let signal_name = tokio::select! {
        _ = sigint.recv() => "SIGINT",
        _ = sigterm.recv() => "SIGTERM",
    };
    info!("{signal_name}: detaching and stopping");
    shutdown.cancel();
    let _ = accept_loop.await;
    drop(interceptor);
    tasks.close();
    let open = tasks.len();
    if open > 0 {
        info!(
            "waiting up to {:?} for {open} open tunnels",
            args.shutdown_grace
        );
        if tokio::time::timeout(args.shutdown_grace, tasks.wait())
            .await
            .is_err()
        {
            info!("cutting {} tunnels still open", tasks.len());
        }
    }
    info!(
        "stopped: {} accepted, {} tunnelled, {} refused by the proxy, {} not redirected",
        stats.accepted.load(Ordering::Relaxed),
        stats.tunnelled.load(Ordering::Relaxed),
        stats.refused.load(Ordering::Relaxed),
        stats.unmapped.load(Ordering::Relaxed),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_address_must_be_specific_ipv4() {
        assert!(listen_addr("127.0.0.1:15001".parse().unwrap()).is_ok());
        for bad in ["0.0.0.0:15001", "[::1]:15001", "127.0.0.1:0"] {
            let err = listen_addr(bad.parse().unwrap()).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
