//! `cargo xtask deb`: `target/debian/transproxy_<version>_<arch>.deb`.
//!
//! The package is laid out by hand in a staging tree and built with `dpkg-deb --build
//! --root-owner-group`, rather than with cargo-deb: every file, mode and maintainer script is
//! visible in [`crate::package`] and `packaging/`, the man pages and completions have to be
//! generated here first anyway, and dpkg-deb comes with dpkg on every Debian system, where
//! cargo-deb would be one more tool to build and keep. `Depends` comes from `dpkg-shlibdeps`
//! (package dpkg-dev, installed when missing), as for any Debian package.

use std::{
    fmt::Write as _,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    package::{self, DEBIAN, File},
    setup,
};

/// Who answers for the package: the identity the project's commits are made under.
const MAINTAINER: &str =
    "transproxy maintainers <maintainers@users.noreply.r-seed-ab55e7e0.example>";

const POSTINST: &str = include_str!("../../packaging/debian/postinst");
const PRERM: &str = include_str!("../../packaging/debian/prerm");
const POSTRM: &str = include_str!("../../packaging/debian/postrm");
const COPYRIGHT: &str = include_str!("../../packaging/debian/copyright");

/// Builds the package from `binary` (target/release/transproxy) and returns its path.
pub(crate) fn build(binary: &Path) -> anyhow::Result<PathBuf> {
    // dpkg-deb is part of dpkg itself; dpkg-shlibdeps is not.
    setup::debian_packages(&["dpkg-dev"])?;
    package::check_binary(binary)?;
    let version = debian_version(&package::version()?);
    let arch = setup::output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_owned();
    let out_dir = crate::workspace_root().join("target/debian");
    // dpkg-shlibdeps expects a source tree: debian/control, and the package's files in
    // debian/<package>.
    let source = out_dir.join("source");
    let _ = fs::remove_dir_all(&source);
    let staging = source.join("debian/transproxy");
    fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;

    let mut files = package::files(&DEBIAN, binary)?;
    files.push(File {
        path: "/usr/share/doc/transproxy/copyright".into(),
        contents: COPYRIGHT.into(),
        mode: 0o644,
    });
    for file in &files {
        package::write(&staging, file)?;
    }
    // Made before dpkg-shlibdeps runs: it finds the package's root by this folder.
    let control = staging.join("DEBIAN");
    fs::create_dir_all(&control)?;
    let depends = shlib_depends(&source, &DEBIAN.binary[1..])?;
    let installed_kib: u64 = files
        .iter()
        .map(|f| (f.contents.len() as u64).div_ceil(1024))
        .sum();
    let fields = format!(
        "Package: transproxy\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Suggests: gss-ntlmssp, krb5-user\n\
         Section: net\n\
         Priority: optional\n\
         Description: transparent TCP proxy through an HTTP CONNECT proxy, with eBPF\n \
         transproxy sends every TCP connection of chosen processes (a cgroup v2: one\n \
         service, one container, or the whole host) through an upstream HTTP proxy,\n \
         with no per-application proxy settings and no iptables. eBPF programs attached\n \
         to the cgroup redirect connect() to the daemon, which tunnels each connection\n \
         with CONNECT. Its kill switch (fail-closed) keeps connections from going\n \
         around the proxy while the daemon is down. It answers the proxy's\n \
         authentication itself: Basic, Digest, NTLMv2 and Negotiate (Kerberos through\n \
         the system GSSAPI; NTLM inside SPNEGO with gss-ntlmssp).\n \
         .\n \
         The service is installed but neither enabled nor started: set the proxy in\n \
         /etc/transproxy.toml first.\n"
    );
    let mut md5sums = String::new();
    for file in &files {
        let _ = writeln!(
            md5sums,
            "{}  {}",
            md5(&file.under(&staging))?,
            file.path.display().to_string().trim_start_matches('/')
        );
    }
    let meta = [
        ("control", fields.as_str(), 0o644),
        // dpkg keeps an administrator's changes to these across upgrades, and removes them only
        // on purge.
        ("conffiles", "/etc/transproxy.toml\n", 0o644),
        ("md5sums", md5sums.as_str(), 0o644),
        ("postinst", POSTINST, 0o755),
        ("prerm", PRERM, 0o755),
        ("postrm", POSTRM, 0o755),
    ];
    for (name, text, mode) in meta {
        let path = control.join(name);
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    }
    // Folders as Debian wants them whatever the umask: 0755.
    set_dir_modes(&staging)?;

    let deb = out_dir.join(format!("transproxy_{version}_{arch}.deb"));
    println!("xtask: building {}", deb.display());
    crate::check(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group"])
            .arg(&staging)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// A Cargo version as a Debian one: a pre-release (`1.0.0-rc.1`) sorts before its release
/// only when written with `~`.
fn debian_version(cargo: &str) -> String {
    cargo.replacen('-', "~", 1)
}

/// The `Depends` the binary's shared libraries need, as dpkg-shlibdeps computes them.
fn shlib_depends(source: &Path, binary: &str) -> anyhow::Result<String> {
    fs::write(
        source.join("debian/control"),
        format!(
            "Source: transproxy\nMaintainer: {MAINTAINER}\n\nPackage: transproxy\nArchitecture: any\n"
        ),
    )?;
    let out = setup::output(
        Command::new("dpkg-shlibdeps")
            .arg("-O")
            .arg(Path::new("debian/transproxy").join(binary))
            .current_dir(source),
    )?;
    let depends = out
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {out}"))?;
    if !depends.split(", ").any(|d| d.starts_with("libc6")) {
        bail!("dpkg-shlibdeps found no dependency on libc6: {depends}");
    }
    Ok(depends.to_owned())
}

fn md5(path: &Path) -> anyhow::Result<String> {
    let out = setup::output(Command::new("md5sum").arg(path))?;
    out.split_whitespace()
        .next()
        .map(str::to_owned)
        .with_context(|| format!("md5sum printed nothing for {}", path.display()))
}

fn set_dir_modes(dir: &Path) -> anyhow::Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            set_dir_modes(&entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_versions_become_debian_ones() {
        assert_eq!(debian_version("0.1.0"), "0.1.0");
        assert_eq!(debian_version("1.0.0-rc.1"), "1.0.0~rc.1");
    }
}
