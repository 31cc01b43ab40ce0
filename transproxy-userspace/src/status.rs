//! `transproxy status [--json]`: what transproxy is doing on this machine.
//!
//! Three sources, put together: the daemons that answer on their control sockets (their
//! settings, counters, open tunnels with their processes, recent failures), the kill switches
//! pinned in bpffs (alive or left by a daemon that stopped), and the kernel's own list of
//! cgroup links, which shows transproxy programs attached anywhere, whoever put them there.

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    path::PathBuf,
    process::ExitCode,
};

use serde::Serialize;

use crate::{
    cli::StatusArgs,
    kernel::{cgroup, kill_switch, links},
    observe::status::{self as control, DaemonStatus},
    privileges,
};

/// Everything `status` found, as `--json` prints it.
#[derive(Serialize)]
struct Machine {
    daemons: Vec<DaemonStatus>,
    /// Control sockets whose daemon did not answer (it died without removing them).
    stale_sockets: Vec<String>,
    kill_switches: Vec<KillSwitchStatus>,
    /// Every cgroup with transproxy's programs attached, and by what.
    attached: Vec<Attachment>,
}

#[derive(Serialize)]
struct KillSwitchStatus {
    cgroup: String,
    pid: Option<u32>,
    /// Whether the daemon that pinned it still runs.
    alive: bool,
    pins: String,
}

#[derive(Serialize)]
struct Attachment {
    cgroup: String,
    /// `daemon`, `kill switch (stopped daemon)` or `unknown`.
    by: String,
    pid: Option<u32>,
}

pub fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    privileges::require_root("status", "it reads the daemons' control sockets and bpffs")?;
    let mut daemons = Vec::new();
    let mut stale_sockets = Vec::new();
    // Daemons alive whose control socket did not answer.
    let mut silent = Vec::new();
    let mut sockets: Vec<(u32, PathBuf)> = control::sockets().into_iter().collect();
    sockets.sort();
    for (pid, path) in sockets {
        match control::ask(&path) {
            Ok(status) => daemons.push(status),
            Err(_) if !std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                // Its daemon is gone (killed, or it could not remove it after dropping root).
                let _ = std::fs::remove_file(&path);
                stale_sockets.push(path.display().to_string());
            }
            Err(err) => {
                silent.push(format!("daemon {pid} ({err})"));
                stale_sockets.push(format!("{} ({err})", path.display()));
            }
        }
    }
    if args.check {
        return Ok(if !silent.is_empty() {
            eprintln!("transproxy: not answering: {}", silent.join(", "));
            ExitCode::FAILURE
        } else if daemons.is_empty() {
            eprintln!("transproxy: no daemon runs");
            ExitCode::FAILURE
        } else {
            println!(
                "{} daemon{} answering",
                daemons.len(),
                if daemons.len() == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        });
    }
    let kill_switches: Vec<KillSwitchStatus> = kill_switch::all()?
        .into_iter()
        .map(|(cgroup, switch)| KillSwitchStatus {
            cgroup,
            pid: switch.pid,
            alive: switch.alive,
            pins: switch.path.display().to_string(),
        })
        .collect();
    let attached_ids = links::transproxy_cgroups();
    let paths = cgroup::paths_by_id(&attached_ids.iter().copied().collect::<HashSet<_>>());
    let mut attached: Vec<Attachment> = attached_ids
        .iter()
        .map(|id| {
            let cgroup = paths.get(id).map_or_else(
                || format!("cgroup id {id} (gone)"),
                |p| p.display().to_string(),
            );
            let daemon = daemons.iter().find(|d| d.cgroup == cgroup);
            let pinned = kill_switches.iter().find(|k| k.cgroup == cgroup);
            let (by, pid) = match (daemon, pinned) {
                (Some(daemon), _) => ("daemon".to_owned(), Some(daemon.pid)),
                (None, Some(switch)) if !switch.alive => {
                    ("kill switch (stopped daemon)".to_owned(), switch.pid)
                }
                (None, Some(switch)) => ("daemon (not answering)".to_owned(), switch.pid),
                (None, None) => ("unknown (no daemon answers for it)".to_owned(), None),
            };
            Attachment { cgroup, by, pid }
        })
        .collect();
    attached.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
    let machine = Machine {
        daemons,
        stale_sockets,
        kill_switches,
        attached,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&machine)?);
    } else {
        print!("{}", human(&machine));
    }
    Ok(ExitCode::SUCCESS)
}

/// The report for people.
fn human(machine: &Machine) -> String {
    let mut out = String::new();
    if machine.daemons.is_empty() {
        let _ = writeln!(out, "no transproxy daemon is running");
    }
    for daemon in &machine.daemons {
        let _ = writeln!(
            out,
            "daemon pid {} (transproxy {}, up {}), cgroup {}",
            daemon.pid,
            daemon.version,
            duration(daemon.uptime_secs),
            daemon.cgroup
        );
        let _ = writeln!(out, "  {}", daemon.intercepting);
        if daemon.proxies.len() != 1 {
            for proxy in &daemon.proxies {
                let state = match (proxy.down_secs, proxy.retry_in_secs) {
                    (Some(down), Some(retry)) => format!(
                        "down for {}, tried again in {}",
                        duration(down),
                        duration(retry)
                    ),
                    _ => "up".to_owned(),
                };
                let _ = writeln!(
                    out,
                    "  proxy {} at {}: {state}",
                    proxy.url,
                    proxy.addrs.join(", ")
                );
            }
        } else {
            let _ = writeln!(out, "  proxy addresses: {}", daemon.proxy_addrs.join(", "));
        }
        if let Some(dns) = &daemon.dns {
            let _ = writeln!(out, "  DNS: {dns}");
        }
        if let Some(pins) = &daemon.kill_switch {
            let _ = writeln!(out, "  kill switch: pinned at {pins}");
        }
        if !daemon.namespaces.is_empty() {
            let _ = writeln!(
                out,
                "  other network namespaces served: {}",
                daemon.namespaces.len()
            );
        }
        for ns in &daemon.namespaces {
            let _ = writeln!(
                out,
                "    {}: listening on {}, for {} ({})",
                ns.netns,
                ns.listeners.join(" and "),
                duration(ns.seconds as f64),
                ns.origin
            );
        }
        let _ = writeln!(out, "  {}", daemon.counters);
        let _ = writeln!(out, "  open tunnels: {}", daemon.tunnels.len());
        for t in &daemon.tunnels {
            // The name asked for, and DNS's name for the address when it differs.
            let names = match (&t.host, &t.dns_name) {
                (Some(host), Some(dns)) if host != dns => format!(" ({host}; DNS said {dns})"),
                (Some(name), _) | (None, Some(name)) => format!(" ({name})"),
                (None, None) => String::new(),
            };
            let _ = writeln!(
                out,
                "    {} (pid {}, uid {}) -> {}{names} via {}: {} up, {} down, {} old, {}{}",
                t.command,
                t.pid,
                t.uid,
                t.destination,
                t.upstream.as_deref().unwrap_or("(not reached yet)"),
                bytes(t.bytes_up),
                bytes(t.bytes_down),
                duration(t.age_secs),
                t.phase,
                t.cgroup
                    .as_ref()
                    .map(|c| format!(", cgroup {c}"))
                    .unwrap_or_default()
            );
        }
        if !daemon.failures.is_empty() {
            let _ = writeln!(out, "  recent failures:");
        }
        for f in &daemon.failures {
            let status = f.status.map(|s| format!(" ({s})")).unwrap_or_default();
            let times = if f.count == 1 {
                "once".to_owned()
            } else {
                format!("{} times", f.count)
            };
            let _ = writeln!(
                out,
                "    {}: {}{status}, {times}, last {} ago by {} (pid {}, uid {}){}",
                f.destination,
                f.outcome,
                duration(f.seconds_ago),
                f.command,
                f.pid,
                f.uid,
                f.detail
                    .as_ref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
        }
    }
    for path in &machine.stale_sockets {
        let _ = writeln!(out, "stale control socket {path}: its daemon is gone");
    }
    let stopped: Vec<&KillSwitchStatus> =
        machine.kill_switches.iter().filter(|k| !k.alive).collect();
    for k in stopped {
        let _ = writeln!(
            out,
            "kill switch on {}: left by transproxy{} which has stopped; intercepted connects there are refused until a daemon starts or `transproxy detach --cgroup {}`",
            k.cgroup,
            k.pid.map(|p| format!(" pid {p}")).unwrap_or_default(),
            k.cgroup
        );
    }
    let mut by_cgroup: BTreeMap<&str, &Attachment> = BTreeMap::new();
    for a in &machine.attached {
        by_cgroup.insert(&a.cgroup, a);
    }
    if !by_cgroup.is_empty() {
        let _ = writeln!(out, "programs attached:");
        for (cgroup, a) in by_cgroup {
            let pid = a.pid.map(|p| format!(" pid {p}")).unwrap_or_default();
            let _ = writeln!(out, "  {cgroup}: {}{pid}", a.by);
        }
    }
    out
}

/// `1.2 KiB`, `3.4 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `850ms`, `12s`, `3m20s`, `2h5m`.
fn duration(secs: f64) -> String {
    let whole = secs as u64;
    match whole {
        0 => format!("{}ms", (secs * 1000.0) as u64),
        1..60 => format!("{whole}s"),
        60..3600 => format!("{}m{}s", whole / 60, whole % 60),
        _ => format!("{}h{}m", whole / 3600, whole % 3600 / 60),
    }
}
