//! `transproxy detach`: removes the kill switch's pins, saying whose they were.

use std::process::ExitCode;

use crate::{cli::DetachArgs, kernel::kill_switch, privileges};

pub fn detach(args: &DetachArgs) -> anyhow::Result<ExitCode> {
    privileges::require_root("detach", "it removes pinned eBPF programs")?;
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
