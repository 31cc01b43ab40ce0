//! Gateway mode's kernel side: the tc programs on the LAN interfaces, the policy rule and local
//! route that deliver the packets they mark, and the ICMP redirects turned off while it runs.
//!
//! What it changes on the host, and undoes at stop (or the next start, or `transproxy detach
//! --gateway`, after the daemon was killed):
//! * the `gateway_ingress` and `gateway_egress` programs on each LAN interface (tcx links: they
//!   go with the daemon unless the kill switch pins them);
//! * `ip rule fwmark GATEWAY_MARK/GATEWAY_MARK lookup GATEWAY_TABLE` and `local default dev
//!   lo` in that table, IPv4 and IPv6 (through netlink, with rtnetlink);
//! * `net.ipv4.conf.{all,IFACE}.send_redirects` set to 0 (both: the kernel ORs them), the
//!   values before kept in `/run/transproxy/gateway-NETNS-IFACE.sysctl` until restored.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType, links::FdLink},
};
use futures_util::TryStreamExt as _;
use netlink_packet_route::{
    route::{RouteMessage, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use rtnetlink::{IpVersion, RouteMessageBuilder};
use tracing::{info, warn};
use transproxy_common::{GATEWAY_MARK, GATEWAY_TABLE};

use super::kill_switch::PinDir;

/// The policy rule's priority: before `main` (32766), after `local` (0).
const RULE_PRIORITY: u32 = 9_084;

/// The programs, attached in this order.
const PROGRAMS: [(&str, TcAttachType); 2] = [
    ("gateway_ingress", TcAttachType::Ingress),
    ("gateway_egress", TcAttachType::Egress),
];

/// Where the send_redirects values are kept until restored: one file per network namespace
/// (by inode) and interface.
fn sysctl_state(interface: &str) -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let netns = std::fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino());
    PathBuf::from(crate::observe::status::RUN_DIR)
        .join(format!("gateway-{netns}-{interface}.sysctl"))
}

/// Loads the gateway programs and attaches them to `interfaces` (pinned with `pins`).
pub(crate) fn attach(
    ebpf: &mut Ebpf,
    interfaces: &[String],
    pins: Option<&PinDir>,
) -> anyhow::Result<()> {
    for (name, _) in PROGRAMS {
        let program: &mut SchedClassifier = super::program(ebpf, name)?;
        program
            .load()
            .with_context(|| format!("the kernel rejected the {name} program"))?;
    }
    for interface in interfaces {
        for (name, attach_type) in PROGRAMS {
            let program: &mut SchedClassifier = super::program(ebpf, name)?;
            let link = program
                .attach(interface, attach_type)
                .with_context(|| format!("cannot attach {name} to {interface}"))?;
            if let Some(pins) = pins {
                let link: FdLink = program.take_link(link)?.try_into()?;
                pins.pin(&format!("{name}-{interface}"), link)?;
            }
        }
    }
    Ok(())
}

/// Checks that `interface` exists and is not loopback.
pub(crate) fn check_interface(interface: &str) -> anyhow::Result<()> {
    if interface == "lo" {
        bail!("--interface lo: the gateway intercepts traffic entering from other hosts");
    }
    nix::net::if_::if_nametoindex(interface)
        .map(drop)
        .map_err(|err| anyhow!("--interface {interface}: no such interface ({err})"))
}

/// Runs `f` on a runtime of its own: netlink is asynchronous, and the daemon's runtime does
/// not run yet at start, nor any more at stop.
fn with_netlink<T>(
    f: impl AsyncFnOnce(&rtnetlink::Handle) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("cannot open a netlink socket")?;
        let task = tokio::spawn(connection);
        let result = f(&handle).await;
        task.abort();
        result
    })
}

/// Installs the policy rules and local routes, after removing any a killed daemon left.
pub(crate) fn install_routing() -> anyhow::Result<()> {
    remove_routing()?;
    with_netlink(async |handle| {
        for v6 in [false, true] {
            let rule = handle
                .rule()
                .add()
                .fw_mark(GATEWAY_MARK)
                .table_id(GATEWAY_TABLE)
                .priority(RULE_PRIORITY)
                .action(RuleAction::ToTable);
            let mut message = if v6 {
                rule.v6().message_mut().clone()
            } else {
                rule.v4().message_mut().clone()
            };
            message.attributes.push(RuleAttribute::FwMask(GATEWAY_MARK));
            add_rule(handle, message).await?;
            handle
                .route()
                .add(local_route(v6)?)
                .execute()
                .await
                .with_context(|| format!("cannot add the local route (table {GATEWAY_TABLE})"))?;
        }
        Ok(())
    })
}

async fn add_rule(handle: &rtnetlink::Handle, message: RuleMessage) -> anyhow::Result<()> {
    let mut request = handle.rule().add();
    *request.message_mut() = message;
    request
        .execute()
        .await
        .context("cannot add the policy rule for marked packets")
}

/// `local default dev lo table GATEWAY_TABLE`.
fn local_route(v6: bool) -> anyhow::Result<RouteMessage> {
    let lo = nix::net::if_::if_nametoindex("lo").context("no loopback interface")?;
    Ok(if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .table_id(GATEWAY_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .output_interface(lo)
            .build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .table_id(GATEWAY_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .output_interface(lo)
            .build()
    })
}

/// Removes the policy rules (by mark and table) and the routes of the gateway's table.
pub(crate) fn remove_routing() -> anyhow::Result<()> {
    with_netlink(async |handle| {
        for version in [IpVersion::V4, IpVersion::V6] {
            let rules: Vec<RuleMessage> =
                handle.rule().get(version).execute().try_collect().await?;
            for rule in rules {
                // Ours: our mark, and our table (as an attribute, or in the header).
                let ours = rule
                    .attributes
                    .contains(&RuleAttribute::FwMark(GATEWAY_MARK))
                    && (rule
                        .attributes
                        .contains(&RuleAttribute::Table(GATEWAY_TABLE))
                        || u32::from(rule.header.table) == GATEWAY_TABLE);
                if ours {
                    handle.rule().del(rule).execute().await?;
                }
            }
        }
        // The local routes, as they were added: deleted until none is left (a killed daemon
        // and a later one may each have left one).
        for v6 in [false, true] {
            for _ in 0..8 {
                if handle
                    .route()
                    .del(local_route(v6)?)
                    .execute()
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        Ok(())
    })
}

/// `/proc/sys/net/ipv4/conf/NAME/send_redirects`.
fn send_redirects(name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{name}/send_redirects"))
}

/// Turns ICMP redirects off for `interface` and `all`, keeping the values before in files:
/// one per interface and one for `all` (per network namespace), each written only if absent,
/// so that values an earlier, killed daemon kept (the administrator's) are not lost.
pub(crate) fn stop_redirects(interface: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(crate::observe::status::RUN_DIR)?;
    for name in [interface, "all"] {
        let state = sysctl_state(name);
        if !state.exists() {
            let before = std::fs::read_to_string(send_redirects(name))
                .with_context(|| format!("cannot read {}", send_redirects(name).display()))?;
            std::fs::write(&state, format!("{name} {}\n", before.trim()))
                .with_context(|| format!("cannot write {}", state.display()))?;
        }
        std::fs::write(send_redirects(name), "0")
            .with_context(|| format!("cannot write {}", send_redirects(name).display()))?;
    }
    Ok(())
}

/// Puts back the send_redirects value kept for `name` (an interface, or `all`), if any.
pub(crate) fn restore_redirects(name: &str) -> anyhow::Result<()> {
    let state = sysctl_state(name);
    let Ok(kept) = std::fs::read_to_string(&state) else {
        return Ok(());
    };
    for line in kept.lines() {
        let Some((name, value)) = line.split_once(' ') else {
            continue;
        };
        if let Err(err) = std::fs::write(send_redirects(name), value) {
            warn!("cannot restore {}: {err}", send_redirects(name).display());
        }
    }
    std::fs::remove_file(&state)?;
    Ok(())
}

/// Warns when this host does not forward: then the gateway intercepts, but what it does not
/// intercept goes nowhere. Forwarding is the administrator's to set.
pub(crate) fn warn_if_not_forwarding() {
    for (path, what) in [
        ("/proc/sys/net/ipv4/ip_forward", "IPv4"),
        ("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6"),
    ] {
        if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "0") {
            warn!(
                "{what} forwarding is off ({path} is 0): traffic the gateway does not intercept is not forwarded"
            );
        }
    }
}

/// Undoes everything gateway mode changed for `interfaces` (the programs go with their links).
pub(crate) fn undo(interfaces: &[String]) {
    if let Err(err) = remove_routing() {
        warn!("cannot remove the gateway's policy rules and routes: {err:#}");
    }
    for name in interfaces.iter().map(String::as_str).chain(["all"]) {
        if let Err(err) = restore_redirects(name) {
            warn!("cannot restore send_redirects for {name}: {err:#}");
        }
    }
    info!("gateway: policy rules and routes removed, ICMP redirects as before");
}
