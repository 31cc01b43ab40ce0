//! `transproxy gateway`: the LAN router case. TCP from other hosts entering on the LAN
//! interfaces, to destinations the rules intercept, is handed to the daemon's transparent
//! listener by tc programs (`bpf_sk_assign`, see `transproxy-ebpf/src/gateway.rs`) and tunnelled
//! through the proxy like a local connection; everything else is forwarded as before. No
//! iptables, no conntrack. What it changes on the host and undoes is listed in
//! [`crate::kernel::gateway`].

use std::process::ExitCode;

use anyhow::bail;

use crate::{
    cli::{DnsMode, GatewayArgs, RunArgs, RunOnlyArgs},
    config::{Mode, Settings},
    kernel::{
        gateway as kernel_gateway,
        kill_switch::{self, PinDir},
    },
    notify::Notifier,
    privileges, run,
    service::{Intercepts, Service, runtime},
};

/// Checks the settings, turns ICMP redirects off, attaches, routes marked packets locally, and
/// serves until a signal; then undoes what it changed.
pub fn gateway(args: GatewayArgs) -> anyhow::Result<ExitCode> {
    let run_only = RunOnlyArgs {
        fail_closed: args.fail_closed,
        user: None,
    };
    let mut settings = Settings::resolve(&args.settings, Some(&run_only), Mode::Run)?;
    if settings.user.is_some() {
        bail!(
            "gateway mode stays root with CAP_NET_ADMIN (it removes its routing at stop): remove user"
        );
    }
    if !settings.containers.is_empty() {
        bail!("gateway mode has no containers: remove the [[container]] sections");
    }
    if settings.refuse_udp {
        bail!("--refuse-udp applies to a cgroup's processes; gateway mode forwards UDP as it is");
    }
    // DNS is captured from a cgroup's sockets; a gateway forwards its clients' DNS untouched.
    settings.dns = DnsMode::Off;
    let mut args = args;
    if args.interfaces.is_empty() {
        args.interfaces = settings.gateway_interfaces.clone();
    }
    if args.interfaces.is_empty() {
        bail!("name the LAN interface: --interface IFACE, or interface in the config's [gateway]");
    }
    for interface in &args.interfaces {
        kernel_gateway::check_interface(interface)?;
    }
    privileges::require_root("gateway", "it loads eBPF programs and changes routing")?;
    let fd_limit = privileges::raise_fd_limit();
    kernel_gateway::warn_if_not_forwarding();
    for interface in &args.interfaces {
        kernel_gateway::stop_redirects(interface)?;
    }
    let intercepts = Intercepts::Gateway {
        interfaces: &args.interfaces,
    };
    // The kill switch: a daemon with it still serving these interfaces stops this start; the
    // pins of stopped ones are taken over once attached.
    let group = kill_switch::gateway_pins(&args.interfaces);
    let what = format!("the gateway on {}", args.interfaces.join(", "));
    let stopped = kill_switch::before_attach_group(&group, &what)?;
    let pins = settings
        .fail_closed
        .then(|| PinDir::in_group(&group))
        .transpose()?;
    let attached = Service::attach(&settings, &intercepts, pins, fd_limit)
        .and_then(|attached| kernel_gateway::install_routing().map(|()| attached))
        .and_then(|attached| kill_switch::take_over(stopped, attached.pinned()).map(|()| attached));
    let attached = match attached {
        Ok(attached) => attached,
        Err(err) => {
            kernel_gateway::undo(&args.interfaces);
            return Err(err);
        }
    };
    let notifier = Notifier::from_env();
    privileges::keep_only_net_admin()?;
    let scope = format!("gateway on {}", args.interfaces.join(", "));
    let as_run = RunArgs {
        cgroup: None,
        container: None,
        run_only,
        settings: args.settings,
    };
    let fail_closed = settings.fail_closed;
    let served = runtime()?.block_on(run::serve(as_run, settings, scope, attached, notifier));
    // With the kill switch its pinned programs drop intercepted SYNs until a daemon is back:
    // the routing and the redirects stay as they are, for it (`detach --gateway` undoes all).
    if !fail_closed {
        kernel_gateway::undo(&args.interfaces);
    }
    served?;
    Ok(ExitCode::SUCCESS)
}
