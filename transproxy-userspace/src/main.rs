//! `transproxy`: makes every TCP connection of chosen processes go through an HTTP proxy.
//! The work is done in the library (src/lib.rs); this file parses the command line and reports.

use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use tracing_subscriber::EnvFilter;
use transproxy::{cli, cmdline, containers, detach, exec, gateway, run, status};

fn main() -> ExitCode {
    // A CNI runtime runs its plugins by file name with no arguments: installed (or linked) as
    // `transproxy-cni` in the CNI folder, this binary is the chained plugin.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name() == Some(std::ffi::OsStr::new("transproxy-cni")) {
        return report(containers::hooks::cni());
    }
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version, and the full help when no subcommand is given.
        Err(err)
            if !err.use_stderr()
                || err.kind()
                    == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            err.exit()
        }
        Err(err) => {
            let mut said = one_line(&err.render().to_string());
            // `transproxy exec --proxy URL curl ...`: the command must come after `--`.
            let exec = std::env::args().nth(1).as_deref() == Some("exec");
            if exec && err.kind() == clap::error::ErrorKind::UnknownArgument {
                said.push_str(
                    " (the command goes after --: transproxy exec [SETTINGS] -- CMD [ARGS...])",
                );
            }
            eprintln!("transproxy: {said}");
            return ExitCode::from(2);
        }
    };
    // Parsed: from here on, other users' `ps` shows `***` instead of the proxy's credentials.
    cmdline::mask_proxy_credentials();
    init_tracing();
    let result = match cli.command {
        cli::Command::Run(args) => run::run(args),
        cli::Command::Exec(args) => exec::exec(args),
        cli::Command::Detach(args) => detach::detach(&args),
        cli::Command::Status(args) => status::status(&args),
        cli::Command::Gateway(args) => gateway::gateway(args),
        cli::Command::OciHook => containers::hooks::oci_hook(),
        cli::Command::Cni => containers::hooks::cni(),
        cli::Command::NetnsOpener(args) => {
            return containers::opener::serve(args.parent, &args.tree);
        }
    };
    report(result)
}

/// The exit code of a command, with its error on one line.
fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(err) => {
            // `{:#}` joins the context chain on one line: one clear line per failure.
            eprintln!("transproxy: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Folds clap's multi-line usage error into one line, dropping the usage and help hints.
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`). Records from the eBPF side arrive
/// through aya-log and the `log` crate, which tracing-subscriber bridges.
fn init_tracing() {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // `RUST_LOG=debug` is for transproxy's own lines; the eBPF loader's would bury them. Named
    // explicitly (`aya=debug`), they show.
    let asked = std::env::var("RUST_LOG").unwrap_or_default();
    if !asked.contains("aya") {
        for quiet in ["aya=info", "aya_obj=info"] {
            if let Ok(directive) = quiet.parse() {
                filter = filter.add_directive(directive);
            }
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
