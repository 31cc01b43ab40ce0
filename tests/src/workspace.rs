//! Running cargo in this workspace, for the tools built on the harness (`cargo xtask` and the
//! benchmark).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The workspace's root directory.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The cargo that launched us, so toolchain overrides carry through.
pub fn cargo_path() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// [`cargo_path`], run from the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(cargo_path());
    cmd.current_dir(root());
    cmd
}

/// Runs `cmd`, failing with its command line if it fails.
pub fn check(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
