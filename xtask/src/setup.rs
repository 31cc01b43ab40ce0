//! Installs what building and testing need, once, saying so; skips what is present.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{cargo, check};

/// The bpf-linker release known to build against this nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The nightly toolchain the eBPF programs were last built and tested with. Another one
/// usually works; when it does not, this is the one to compare with.
const TESTED_NIGHTLY: &str = "1.97.0-nightly (e50aa6fba 2026-05-19), LLVM 22";

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Nightly with rust-src (the eBPF target builds `core` from source) and bpf-linker.
pub(crate) fn ebpf_toolchain() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("xtask: installing the nightly toolchain (the eBPF programs need it)");
        check(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("xtask: adding rust-src to nightly (the eBPF target builds core from source)");
        check(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    bpf_linker()?;
    llvm_matches()
}

/// The LLVM major version the nightly toolchain's rustc emits.
fn nightly_llvm_major() -> anyhow::Result<String> {
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_owned)
        .context("rustc +nightly -vV names no LLVM version")
}

/// Checks that bpf-linker uses the LLVM the nightly emits (it reads rustc's bitcode: another
/// major version fails or, worse, miscompiles), and says which nightly this was tested with
/// when another is installed. Nothing is downloaded here: no toolchain can be fetched.
fn llvm_matches() -> anyhow::Result<()> {
    let major = nightly_llvm_major()?;
    let installed = output(Command::new("rustc").args(["+nightly", "--version"]))?;
    let installed = installed.trim().trim_start_matches("rustc ");
    if !TESTED_NIGHTLY.starts_with(installed) {
        println!(
            "xtask: nightly here is {installed} (LLVM {major}); transproxy was tested with {TESTED_NIGHTLY}"
        );
    }
    let linker = output(Command::new("which").arg("bpf-linker"))?;
    let libs = output(Command::new("ldd").arg(linker.trim())).unwrap_or_default();
    let linked = libs
        .split_whitespace()
        .find_map(|lib| {
            lib.strip_prefix("libLLVM.so.")
                .or_else(|| lib.strip_prefix("libLLVM-"))
        })
        .and_then(|v| v.split(['.', '-']).next())
        .map(str::to_owned);
    match linked {
        Some(linked) if linked != major => bail!(
            "bpf-linker uses LLVM {linked} but the nightly toolchain emits LLVM {major}: remove ~/.cargo/bin/bpf-linker and run this again to build it against the nightly's LLVM"
        ),
        _ => Ok(()),
    }
}

/// rustfmt and clippy, which `cargo xtask test` runs before the tests.
pub(crate) fn lint_tools() -> anyhow::Result<()> {
    for (tool, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        let present = Command::new(transproxy_tests::workspace::cargo_path())
            .args([tool, "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !present {
            println!(
                "xtask: adding {component} to the default toolchain (the test command runs it)"
            );
            check(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    let present = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    // bpf-linker links against LLVM; the nightly toolchain ships a libLLVM of the exact version
    // its rustc emits, so build against that one and find it at run time through an rpath.
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let major = nightly_llvm_major()?;
    let lib_dir = sysroot.join("lib");
    let lib = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot list {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("libLLVM.so.{major}"))
                    || n.starts_with(&format!("libLLVM-{major}"))
            })
        })
        .with_context(|| format!("no libLLVM {major} in {}", lib_dir.display()))?;
    let prefix = crate::workspace_root().join(format!("target/xtask/llvm-{major}"));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)
        .with_context(|| format!("cannot link {}", link.display()))?;
    println!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} ({}); about a minute, once",
        lib.display()
    );
    check(
        cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix)
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display()),
            ),
    )
}

/// Installs the Debian packages that are missing, without starting their services, and with no
/// DNS query from their install scripts.
pub(crate) fn debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .stderr(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing Debian packages: {}", missing.join(" "));
    let sudo = |program: &str| {
        if is_root() {
            Command::new(program)
        } else {
            let mut cmd = Command::new("sudo");
            cmd.arg(program);
            cmd
        }
    };
    check(sudo("apt-get").args(["update", "-q"]))?;
    // A policy-rc.d that says "no" keeps apt from starting squid as a system service: the tests
    // and the demo run their own instances on ports they choose.
    let policy = PathBuf::from("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        check(sudo("sh").args(["-c", "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d"]))?;
    }
    // Packages are downloaded first, then installed with the resolver pointed at loopback:
    // some configure scripts ask DNS (krb5-config looks up _kerberos SRV records), and no
    // query may leave this machine but apt's own.
    let download = check(
        sudo("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "--download-only",
            ])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    let result = download.and_then(|()| {
        let resolv = std::env::temp_dir().join("transproxy-xtask-resolv.conf");
        std::fs::write(&resolv, "nameserver 127.0.0.1\n")?;
        let installed = check(
            sudo("unshare")
                .args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#)
                .arg(&resolv)
                .args([
                    "apt-get",
                    "install",
                    "-y",
                    "-q",
                    "--no-install-recommends",
                    "--no-download",
                ])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        );
        let _ = std::fs::remove_file(&resolv);
        installed
    });
    if own_policy {
        let _ = sudo("rm").args(["-f", "/usr/sbin/policy-rc.d"]).status();
    }
    result
}
