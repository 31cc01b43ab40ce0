//! What `cargo xtask deb` and `cargo xtask install` put on a machine: the binary, the systemd
//! unit, the config file, man pages and shell completions, each with its mode. The unit, the
//! config file and the Debian maintainer scripts are kept as they are shipped in `packaging/`;
//! the man pages and completions are generated from the daemon's own command-line definition
//! (`transproxy::cli::Cli`), so they never disagree with `transproxy --help`.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use clap::CommandFactory as _;
use clap_complete::Shell;

/// The unit as the Debian package ships it (binary in /usr/bin).
pub(crate) const UNIT: &str = include_str!("../../packaging/transproxy.service");
/// /etc/transproxy.toml: every setting commented, the proxy to be set.
pub(crate) const CONFIG: &str = include_str!("../../packaging/transproxy.toml");
/// The line of [`UNIT`] that names the binary.
const EXEC_START: &str = "ExecStart=/usr/bin/transproxy ";

/// Where each file goes, for one way of installing.
pub(crate) struct Layout {
    pub(crate) binary: &'static str,
    pub(crate) unit: &'static str,
    pub(crate) config: &'static str,
    pub(crate) man1: &'static str,
    pub(crate) bash: &'static str,
    pub(crate) zsh: &'static str,
    pub(crate) fish: &'static str,
    /// The OCI runtime hook's description (podman, CRI-O read this folder).
    pub(crate) oci_hook: &'static str,
}

/// The Debian package: Debian's own paths for packaged files.
pub(crate) const DEBIAN: Layout = Layout {
    binary: "/usr/bin/transproxy",
    unit: "/lib/systemd/system/transproxy.service",
    config: "/etc/transproxy.toml",
    man1: "/usr/share/man/man1",
    bash: "/usr/share/bash-completion/completions/transproxy",
    zsh: "/usr/share/zsh/vendor-completions/_transproxy",
    fish: "/usr/share/fish/vendor_completions.d/transproxy.fish",
    oci_hook: "/usr/share/containers/oci/hooks.d/transproxy.json",
};

/// `cargo xtask install`: /usr/local for what the package manager does not own, /etc for the
/// unit (systemd's place for the administrator's units) and the config.
pub(crate) const LOCAL: Layout = Layout {
    binary: "/usr/local/bin/transproxy",
    unit: "/etc/systemd/system/transproxy.service",
    config: "/etc/transproxy.toml",
    man1: "/usr/local/share/man/man1",
    bash: "/usr/local/share/bash-completion/completions/transproxy",
    zsh: "/usr/local/share/zsh/site-functions/_transproxy",
    fish: "/usr/local/share/fish/vendor_completions.d/transproxy.fish",
    oci_hook: "/etc/containers/oci/hooks.d/transproxy.json",
};

/// One file to install: where (an absolute path on the target system), what, which mode.
pub(crate) struct File {
    pub(crate) path: PathBuf,
    pub(crate) contents: Vec<u8>,
    pub(crate) mode: u32,
}

impl File {
    fn new(path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        Self {
            path: path.into(),
            contents: contents.into(),
            mode,
        }
    }

    /// Where this file goes below `root` (`/` for the running system).
    pub(crate) fn under(&self, root: &Path) -> PathBuf {
        root.join(self.path.strip_prefix("/").unwrap_or(&self.path))
    }
}

/// The version transproxy reports (`transproxy --version`), from its crate.
pub(crate) fn version() -> anyhow::Result<String> {
    transproxy::cli::Cli::command()
        .get_version()
        .map(str::to_owned)
        .context("the transproxy CLI has no version")
}

/// Checks that `binary` is the transproxy of this source tree: the same version as the CLI
/// the man pages are made from.
pub(crate) fn check_binary(binary: &Path) -> anyhow::Result<()> {
    let out = Command::new(binary)
        .arg("--version")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {} --version", binary.display()))?;
    let said = String::from_utf8_lossy(&out.stdout);
    let said = said.lines().next().unwrap_or_default().trim();
    let expected = format!("transproxy {}", version()?);
    if !out.status.success() || said != expected {
        bail!(
            "{} --version says {said:?}, not {expected:?}: build it from this tree (cargo xtask build)",
            binary.display()
        );
    }
    Ok(())
}

/// Every file of an installation laid out as `layout` says, with `binary` as the daemon.
pub(crate) fn files(layout: &Layout, binary: &Path) -> anyhow::Result<Vec<File>> {
    let contents = fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    let mut files = vec![
        File::new(layout.binary, contents, 0o755),
        File::new(layout.unit, unit_for(layout.binary)?, 0o644),
        // It may hold the proxy's credentials.
        File::new(layout.config, CONFIG, 0o600),
        File::new(layout.oci_hook, oci_hook(layout.binary), 0o644),
    ];
    for (name, page) in man_pages()? {
        files.push(File::new(
            Path::new(layout.man1).join(format!("{name}.gz")),
            gzip(&page)?,
            0o644,
        ));
    }
    for (shell, path) in [
        (Shell::Bash, layout.bash),
        (Shell::Zsh, layout.zsh),
        (Shell::Fish, layout.fish),
    ] {
        files.push(File::new(path, completion(shell), 0o644));
    }
    Ok(files)
}

/// The OCI hook description: `binary oci-hook` at the `createRuntime` stage of every container
/// (the hook asks the running daemons, which serve only containers of their cgroup tree; with
/// no daemon it does nothing).
fn oci_hook(binary: &str) -> String {
    let hook = serde_json::json!({
        "version": "1.0.0",
        "hook": { "path": binary, "args": ["transproxy", "oci-hook"], "timeout": 10 },
        "when": { "always": true },
        "stages": ["createRuntime"],
    });
    format!("{hook:#}\n")
}

/// [`UNIT`] with its `ExecStart=` naming `binary`.
pub(crate) fn unit_for(binary: &str) -> anyhow::Result<String> {
    if UNIT.matches(EXEC_START).count() != 1 {
        bail!("packaging/transproxy.service must have exactly one line starting {EXEC_START:?}");
    }
    Ok(UNIT.replace(EXEC_START, &format!("ExecStart={binary} ")))
}

/// `transproxy.1` and one page per subcommand (`transproxy-run.1`, ...), as (file name, roff).
fn man_pages() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    fn collect(
        cmd: clap::Command,
        date: &str,
        pages: &mut Vec<(String, Vec<u8>)>,
    ) -> anyhow::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            collect(sub.clone(), date, pages)?;
        }
        let man = clap_mangen::Man::new(cmd)
            .date(date)
            .manual("transproxy manual");
        let mut page = Vec::new();
        man.render(&mut page)?;
        pages.push((man.get_filename(), page));
        Ok(())
    }
    // As clap_mangen::generate_to: no page for `help`, and subcommands named `transproxy-run`.
    let mut cmd = transproxy::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    collect(cmd, &page_date(), &mut pages)?;
    pages.sort();
    Ok(pages)
}

/// The date a page shows: the last commit's, so that the same source gives the same pages; the
/// day of the build outside a git checkout. (It must not be empty: clap_mangen would then write
/// a `.TH` line whose later fields shift into its place.)
fn page_date() -> String {
    let date = |cmd: &mut Command| {
        cmd.stderr(Stdio::null())
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .filter(|date| !date.is_empty())
    };
    date(
        Command::new("git")
            .args(["log", "-1", "--format=%cs"])
            .current_dir(crate::workspace_root()),
    )
    .or_else(|| date(Command::new("date").arg("-u").arg("+%F")))
    .unwrap_or_else(|| "unknown date".to_owned())
}

/// The completion script for `shell`.
fn completion(shell: Shell) -> Vec<u8> {
    let mut cmd = transproxy::cli::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "transproxy", &mut script);
    script
}

/// `gzip -9n`, as Debian compresses man pages: no name or time stamp in the header, so the same
/// page always gives the same bytes. gzip is an essential package: always there.
fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run gzip")?;
    let mut stdin = child.stdin.take().context("gzip has no stdin")?;
    // Written from a thread: gzip may fill its output pipe before it has read all of ours.
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().context("gzip failed")?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writing to gzip panicked"))?
        .context("cannot write to gzip")?;
    if !out.status.success() {
        bail!("gzip failed ({})", out.status);
    }
    Ok(out.stdout)
}

/// Writes `file` below `root`, making its folders (mode 0755), and sets its mode exactly (the
/// umask does not narrow it). The file is written beside its destination and renamed over it,
/// so a running binary is replaced, not rewritten in place.
pub(crate) fn write(root: &Path, file: &File) -> anyhow::Result<PathBuf> {
    let dest = file.under(root);
    let dir = dest
        .parent()
        .with_context(|| format!("{} has no parent folder", dest.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = dest
        .file_name()
        .with_context(|| format!("{} has no file name", dest.display()))?;
    let temp = dir.join(format!(".{}.xtask-new", name.to_string_lossy()));
    let result = (|| {
        // Created with no permissions for others, then given its mode: a config file with
        // credentials is never readable by others, not even for a moment.
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        out.set_permissions(fs::Permissions::from_mode(0o600))?;
        out.write_all(&file.contents)?;
        out.set_permissions(fs::Permissions::from_mode(file.mode))?;
        out.sync_all()?;
        fs::rename(&temp, &dest)
    })();
    if let Err(err) = result {
        let _ = fs::remove_file(&temp);
        return Err(err).with_context(|| format!("cannot write {}", dest.display()));
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_cover_every_subcommand() {
        let names: Vec<String> = man_pages().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "transproxy-cni.1",
                "transproxy-detach.1",
                "transproxy-exec.1",
                "transproxy-gateway.1",
                "transproxy-oci-hook.1",
                "transproxy-run.1",
                "transproxy-status.1",
                "transproxy.1"
            ]
        );
    }

    #[test]
    fn the_local_unit_runs_the_local_binary() {
        let unit = unit_for(LOCAL.binary).unwrap();
        assert!(
            unit.contains(
                "\nExecStart=/usr/local/bin/transproxy run --config /etc/transproxy.toml\n"
            )
        );
        assert!(!unit.contains("/usr/bin/transproxy"));
    }
}
