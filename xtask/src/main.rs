//! `cargo xtask`: the project's build, run, test and demo commands.
//!
//! Each command first makes sure its prerequisites are present (nightly rust-src, bpf-linker,
//! Debian packages), saying what it installs and skipping what is already there, so the README's
//! commands work on a fresh machine.

mod bench_packages;
mod deb;
mod demo;
mod fuzz;
mod install;
mod package;
mod setup;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::bail;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build target/release/transproxy with the eBPF programs embedded.
    Build,
    /// Build, then run `transproxy ARGS` (through sudo when not root).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Unit and integration tests (real kernel, real squid), after installing what they need.
    Test {
        /// Extra arguments for the integration test binary, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Start a local squid and origin, intercept one curl in a fresh cgroup, show what happened.
    Demo,
    /// Benchmark transproxy against no interception and redsocks + iptables, on loopback.
    Bench {
        /// Short runs, one repetition, 1,000 idle tunnels: for development, not for numbers.
        #[arg(long)]
        quick: bool,
    },
    /// Build target/debian/transproxy_<version>_<arch>.deb (binary, systemd unit, config, man
    /// pages, completions).
    Deb,
    /// Build, then install the binary, the systemd unit, the config (if absent), man pages and
    /// completions under /usr/local and /etc.
    Install {
        /// Install below this folder instead of / (for staging and tests).
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Install this transproxy binary instead of building target/release/transproxy.
        #[arg(long, value_name = "FILE")]
        binary: Option<PathBuf>,
    },
    /// Run each fuzz target (CONNECT reply, rules, config, sniffer, DNS) for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Build => build().map(drop),
        Task::Run { args } => run(&args),
        Task::Test { args } => test(&args),
        Task::Demo => demo(),
        Task::Deb => build().and_then(|binary| deb::build(&binary)).map(drop),
        Task::Install { root, binary } => install::may_write(&root).and_then(|()| {
            let binary = match binary {
                Some(binary) => binary,
                None => build()?,
            };
            install::install(&root, &binary)
        }),
        Task::Bench { quick } => bench(quick),
        Task::Fuzz { seconds } => setup::ebpf_toolchain().and_then(|()| fuzz::run(seconds)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Packages the integration tests and the demo use.
const TEST_PACKAGES: &[&str] = &[
    "squid",
    "curl",
    "bpftool",
    "busybox-static",
    // Proxy authentication against real servers: a throwaway MIT KDC (kdb5_util, krb5kdc,
    // kadmin.local), kinit, NTLM inside SPNEGO for squid's Negotiate helper, htpasswd.
    "krb5-kdc",
    "krb5-admin-server",
    "krb5-user",
    "gss-ntlmssp",
    "apache2-utils",
    // SOCKS5 upstream tests.
    "dante-server",
    // Real containers (`--network none`, runc: crun cannot run on hybrid cgroups).
    "podman",
    "runc",
];
/// What building the daemon needs besides Rust: the GSSAPI headers (MIT krb5) and libclang,
/// for Negotiate's bindings.
const BUILD_PACKAGES: &[&str] = &["libkrb5-dev", "libclang-dev", "pkgconf"];
/// And what the packaging tests use: systemd-analyze (package systemd), man (man-db), strace.
/// `cargo xtask deb` installs dpkg-dev itself.
const PACKAGING_TEST_PACKAGES: &[&str] = &["systemd", "man-db", "strace"];

use transproxy_tests::workspace::{cargo, check, root as workspace_root};

fn build() -> anyhow::Result<PathBuf> {
    setup::debian_packages(BUILD_PACKAGES)?;
    setup::ebpf_toolchain()?;
    println!("xtask: building target/release/transproxy");
    check(cargo().args([
        "build",
        "--release",
        "--package",
        "transproxy-userspace",
        "--bin",
        "transproxy",
    ]))?;
    Ok(workspace_root().join("target/release/transproxy"))
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let binary = build()?;
    let mut cmd = if setup::is_root() {
        Command::new(&binary)
    } else {
        println!("xtask: transproxy needs root; running it through sudo");
        let mut sudo = Command::new("sudo");
        sudo.args(["--preserve-env=RUST_LOG,https_proxy,HTTPS_PROXY,http_proxy,HTTP_PROXY,all_proxy,ALL_PROXY,NO_PROXY,no_proxy"]).arg(&binary);
        sudo
    };
    check(cmd.args(args))
}

fn test(args: &[String]) -> anyhow::Result<()> {
    setup::debian_packages(&[TEST_PACKAGES, PACKAGING_TEST_PACKAGES].concat())?;
    setup::lint_tools()?;
    let binary = build()?;
    println!("xtask: cargo fmt --check, cargo clippy -D warnings");
    check(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // Every crate but the eBPF one, which builds for its own target (through build.rs).
    check(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "transproxy-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    println!("xtask: unit tests");
    check(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "transproxy-ebpf",
        "--exclude",
        "transproxy-tests",
    ]))?;
    if !setup::is_root() {
        bail!(
            "the integration tests load eBPF programs and create cgroups: they need root (run `sudo -E cargo xtask test`)"
        );
    }
    // The packaging tests look into the package and run `cargo xtask install --root`.
    let deb = deb::build(&binary)?;
    let xtask = std::env::current_exe()?;
    println!("xtask: integration tests (real kernel, real squid; one at a time)");
    check(
        cargo()
            .args(["test", "--package", "transproxy-tests", "--"])
            .args(["--test-threads=1", "--show-output"])
            .args(args)
            .env("TRANSPROXY_BIN", &binary)
            .env("TRANSPROXY_DEB", &deb)
            .env("TRANSPROXY_XTASK", &xtask),
    )
}

fn demo() -> anyhow::Result<()> {
    setup::debian_packages(TEST_PACKAGES)?;
    let binary = build()?;
    if !setup::is_root() {
        bail!(
            "the demo attaches eBPF programs to a cgroup: run it as root (sudo -E cargo xtask demo)"
        );
    }
    demo::run(&binary)
}

fn bench(quick: bool) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!(
            "the benchmark creates cgroups, attaches eBPF programs and adds iptables rules: run it as root (sudo -E cargo xtask bench)"
        );
    }
    bench_packages::install()?;
    let binary = build()?;
    // Its own crate (bench/), outside the default members: built and run only here.
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "--package",
        "transproxy-bench",
        "--",
        "--daemon",
    ])
    .arg(&binary);
    if quick {
        cmd.arg("--quick");
    }
    check(&mut cmd)
}
