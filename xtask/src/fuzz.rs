//! `cargo xtask fuzz`: runs each cargo-fuzz target for a bounded time.
//!
//! The targets (fuzz/fuzz_targets) cover what comes from outside: the proxy's CONNECT reply,
//! rules and NO_PROXY, config files and proxy URLs, clients' first bytes (the host name
//! sniffer), DNS messages (the DNS responder) and the proxy's authentication challenges. Each starts from the committed seeds in
//! fuzz/seeds/<target> and keeps its growing corpus in fuzz/corpus/<target> (not committed). A
//! crash stops the run with the input saved under fuzz/artifacts/<target>: it then becomes a
//! regression test next to the parser it broke.

use std::process::Command;

use anyhow::Context as _;

use crate::{check, workspace_root};

/// The targets, in fuzz/Cargo.toml.
const TARGETS: [&str; 8] = [
    "connect_reply",
    "rule",
    "config",
    "sniff",
    "dns_message",
    "auth_challenge",
    "pac_result",
    "hook_input",
];

pub(crate) fn run(seconds: u64) -> anyhow::Result<()> {
    cargo_fuzz()?;
    let fuzz_dir = workspace_root().join("fuzz");
    for target in TARGETS {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        println!("xtask: fuzzing {target} for {seconds} s");
        check(
            Command::new("cargo")
                .current_dir(&fuzz_dir)
                .args(["+nightly", "fuzz", "run", target])
                .arg(&corpus)
                .arg(fuzz_dir.join("seeds").join(target))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-print_final_stats=1"),
        )
        .with_context(|| format!("fuzz target {target} failed: see fuzz/artifacts/{target}"))?;
    }
    println!(
        "xtask: {} fuzz targets ran {seconds} s each without a finding",
        TARGETS.len()
    );
    Ok(())
}

/// Installs cargo-fuzz from crates.io unless present.
fn cargo_fuzz() -> anyhow::Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        println!("xtask: installing cargo-fuzz (once)");
        check(Command::new("cargo").args(["install", "cargo-fuzz"]))?;
    }
    Ok(())
}
