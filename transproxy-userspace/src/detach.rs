//! `transproxy detach`: removes the kill switch's pins, saying whose they were; with
//! `--gateway IFACE`, what a killed gateway daemon left in this network namespace (its policy
//! rule, local routes and send_redirects values).

use std::process::ExitCode;

use crate::{cli::DetachArgs, kernel::kill_switch, privileges};

pub fn detach(args: &DetachArgs) -> anyhow::Result<ExitCode> {
    privileges::require_root("detach", "it removes pinned eBPF programs")?;
    if !args.gateway.is_empty() {
        for interface in &args.gateway {
            crate::kernel::gateway::check_interface(interface)?;
        }
        for interface in &args.gateway {
            for switch in crate::kernel::kill_switch::detach_gateway(interface)? {
                println!(
                    "transproxy: removed the kill switch of the gateway on {interface}, left by transproxy {}",
                    switch.owner()
                );
            }
        }
        crate::kernel::gateway::remove_routing()?;
        for name in args.gateway.iter().map(String::as_str).chain(["all"]) {
            crate::kernel::gateway::restore_redirects(name)?;
        }
        println!(
            "transproxy: removed the gateway's policy rules and routes; send_redirects of {} as before",
            args.gateway.join(", ")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let removed = kill_switch::detach(args.cgroup.as_deref(), args.all)?;
    if removed.is_empty() {
        println!("transproxy: no kill switch to remove");
    }
    for (cgroup, switch) in removed {
        let state = if switch.alive {
            "; it is still running and intercepts nothing now: stop it"
        } else {
            ", which had stopped"
        };
        println!(
            "transproxy: removed the kill switch of {cgroup}, left by transproxy {}{state}",
            switch.owner()
        );
    }
    Ok(ExitCode::SUCCESS)
}
