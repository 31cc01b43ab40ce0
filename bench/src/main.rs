//! The benchmark behind `cargo xtask bench`: transproxy side by side with no interception
//! ("direct") and with redsocks behind iptables, through squid and through a fast upstream, on
//! this machine. xtask installs its Debian packages and builds the daemon first, then runs
//! `transproxy-bench --daemon PATH [--quick]`.
//!
//! Everything runs over loopback: the origins on 127.0.0.2 and 127.0.0.3, the upstream proxies
//! and interceptors on 127.0.0.1, and every interception rule names the benchmark's own origin
//! address and port. Contenders are interleaved (direct, transproxy, redsocks, then again) so
//! the machine's drift touches all alike. Every fixture is a guard: iptables rules, cgroups and
//! processes go away on every exit path, Ctrl-C included.

mod auth;
mod contender;
mod figure;
mod holder;
mod interrupt;
mod iptables;
mod limits;
mod lineup;
mod load;
mod machine;
mod nginx;
mod plan;
mod process;
mod procfs;
mod redsocks;
mod report;
mod results;
mod stage;
mod stats;
mod step;
mod tools;
mod transproxy;
mod upstream;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use contender::Contender;
use lineup::Lineup;
use plan::Plan;
use results::Results;
use stage::Stage;
use step::Step;
use tools::Tools;
use upstream::Upstream;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["--daemon", path] => Ok((PathBuf::from(path), false)),
        ["--daemon", path, "--quick"] | ["--quick", "--daemon", path] => {
            Ok((PathBuf::from(path), true))
        }
        _ => Err(anyhow::anyhow!(
            "usage: transproxy-bench --daemon PATH [--quick] (run it through `cargo xtask bench`)"
        )),
    };
    match parsed.and_then(|(daemon, quick)| run(&daemon, quick)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: bench: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

use transproxy_tests::workspace::{cargo, check, root as workspace_root};

/// Runs the benchmark with the daemon at `binary`; prints the table, writes target/bench.
fn run(binary: &Path, quick: bool) -> anyhow::Result<()> {
    interrupt::install();
    let mut plan = if quick { Plan::quick() } else { Plan::full() };
    let limit = limits::raise_descriptor_limit()?;
    println!("xtask: descriptor limit for the benchmark's processes: {limit}");
    let mut results = Results::default();
    if let Some(note) = plan.fit_descriptor_limit(limit) {
        println!("xtask: {note}");
        results.note(note);
    }
    let swept = iptables::sweep_stale()?;
    if swept > 0 {
        println!("xtask: removed {swept} iptables rule(s) left by an earlier, killed benchmark");
    }
    let tools = Tools::prepare(binary)?;
    // Now, not at the end: the revision must be the one the daemon was just built from.
    let machine = machine::Machine::describe();
    let started = Instant::now();
    let stage = Stage::start(plan, tools)?;
    for upstream in Upstream::ALL {
        interrupt::check()?;
        println!("\nxtask: bench through {}", upstream.title());
        let mut lineup = Lineup::start(&stage, upstream)?;
        if let Some(gid) = lineup.selector().gid() {
            results.note(format!(
                "{}: iptables refused `-m cgroup`; redsocks' clients ran with group {gid} and the rules used `-m owner --gid-owner {gid}`",
                upstream.key()
            ));
        }
        lineup.verify()?;
        measure(&mut lineup, &mut results)?;
    }
    interrupt::check()?;
    println!("\nxtask: bench: proxy authentication, through squid");
    auth::measure(&stage, &mut results)?;
    let report = report::Report {
        plan: &stage.plan,
        results: &results,
        machine: &machine,
        elapsed: started.elapsed(),
        date: utc_now(),
    };
    let [md, json] = report.write()?;
    println!("\n{}", report.markdown());
    println!("xtask: wrote {} and {}", md.display(), json.display());
    Ok(())
}

/// Every repetition visits every step, and every step every contender in turn. A failed
/// measurement is noted in the report, not fatal; an interruption is.
fn measure(lineup: &mut Lineup, results: &mut Results) -> anyhow::Result<()> {
    let plan = lineup.stage.plan.clone();
    let upstream = lineup.upstream;
    for repetition in 0..plan.repetitions {
        for step in Step::ALL {
            for contender in Contender::rotation(repetition) {
                if !step.applies(upstream, contender) {
                    continue;
                }
                interrupt::check()?;
                std::thread::sleep(plan.settle);
                let label = format!(
                    "{} {}/{}, {}, {}",
                    upstream.key(),
                    repetition + 1,
                    plan.repetitions,
                    step.name(),
                    contender.name()
                );
                match step.run(lineup, contender) {
                    Ok(measured) => {
                        let shown: Vec<String> = measured
                            .values
                            .iter()
                            .map(|(figure, value)| {
                                format!("{} {value:.3} {}", figure.key(), figure.unit())
                            })
                            .collect();
                        println!("xtask: {label}: {}", shown.join(", "));
                        for (figure, value) in measured.values {
                            results.record(upstream, figure, contender, value);
                        }
                        for problem in measured.problems {
                            results.note(format!("{label}: {problem}"));
                        }
                    }
                    Err(err) => {
                        interrupt::check()?;
                        eprintln!("xtask: {label}: failed: {err:#}");
                        results.note(format!("{label}: failed: {err:#}"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The date for the report, from date(1) (no date crate for one line).
fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
