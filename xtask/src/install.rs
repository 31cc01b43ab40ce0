//! `cargo xtask install`: transproxy built from source, installed the way the Debian package
//! would install it, under /usr/local (see [`crate::package::LOCAL`]). It says what it does; a
//! second run changes nothing that is already in place, and an existing /etc/transproxy.toml
//! is always kept. `--root DIR` installs below DIR instead of / (for packaging and tests).

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path, process::Command};

use anyhow::bail;

use crate::package::{self, LOCAL};

/// Refuses, before anything is built, an install into the running system without root.
pub(crate) fn may_write(root: &Path) -> anyhow::Result<()> {
    if root == Path::new("/") && !crate::setup::is_root() {
        bail!(
            "installing into /usr/local and /etc needs root: run `sudo -E cargo xtask install` (or --root DIR)"
        );
    }
    Ok(())
}

pub(crate) fn install(root: &Path, binary: &Path) -> anyhow::Result<()> {
    package::check_binary(binary)?;
    let system = root == Path::new("/");
    for file in package::files(&LOCAL, binary)? {
        let dest = file.under(root);
        let present = fs::read(&dest).ok();
        let same_mode =
            fs::metadata(&dest).is_ok_and(|m| m.permissions().mode() & 0o7777 == file.mode);
        if file.path == Path::new(LOCAL.config) && present.is_some() {
            println!(
                "xtask: kept {} (yours; the shipped one is packaging/transproxy.toml)",
                dest.display()
            );
            if fs::metadata(&dest).is_ok_and(|m| m.permissions().mode() & 0o004 != 0) {
                println!(
                    "xtask: warning: every user can read {}; if it holds credentials: chmod 600",
                    dest.display()
                );
            }
        } else if present.as_deref() == Some(&file.contents[..]) && same_mode {
            println!("xtask: unchanged {}", dest.display());
        } else {
            package::write(root, &file)?;
            println!(
                "xtask: {} {} (mode {:o})",
                if present.is_some() {
                    "updated"
                } else {
                    "installed"
                },
                dest.display(),
                file.mode
            );
        }
    }
    if system && Path::new("/run/systemd/system").is_dir() {
        println!("xtask: systemctl daemon-reload (systemd reads the unit again)");
        crate::check(Command::new("systemctl").arg("daemon-reload"))?;
    }
    println!(
        "xtask: next: set the proxy in {}, then `systemctl enable --now transproxy`; logs: `journalctl -u transproxy`",
        package::LOCAL.config
    );
    Ok(())
}
