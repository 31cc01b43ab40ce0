//! Real containers for tests: podman with runc, offline, from a busybox folder made here (no
//! image, no registry), with storage of its own that is removed after the test.
//!
//! Recipe measured in `../shared/reference/test-servers.md`: runc (crun cannot run on hybrid
//! cgroups), cgroupfs, ulimits the sandbox allows, `--network none` (the namespace has only
//! `lo`), `--rootfs DIR:O` (the folder stays unchanged).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::{TestCgroup, run};

/// podman's state for one test: storage, configuration, the busybox root folder, and
/// optionally a hooks folder with transproxy's OCI hook.
pub struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    pub fn new() -> Self {
        crate::require_root();
        assert!(
            Command::new("podman").arg("--version").output().is_ok(),
            "podman is missing: `cargo xtask test` installs it (podman, runc)"
        );
        let dir = tempfile::Builder::new()
            .prefix("transproxy-podman-")
            .tempdir()
            .expect("temporary folder");
        let root = dir.path();
        let rootfs = root.join("rootfs");
        fs::create_dir_all(rootfs.join("bin")).expect("rootfs");
        fs::create_dir_all(rootfs.join("etc")).expect("rootfs");
        fs::create_dir_all(root.join("hooks.d")).expect("hooks folder");
        fs::copy("/usr/bin/busybox", rootfs.join("bin/busybox"))
            .expect("busybox-static is missing: `cargo xtask test` installs it");
        let list = run(Command::new(rootfs.join("bin/busybox")).arg("--list"));
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let link = rootfs.join("bin").join(applet);
            if !link.exists() {
                std::os::unix::fs::symlink("busybox", link).expect("applet link");
            }
        }
        fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("passwd");
        fs::write(rootfs.join("etc/group"), "root:x:0:\n").expect("group");
        fs::write(
            root.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"none\"\ntmp_dir = \"{}\"\nhooks_dir = [\"{}\"]\n",
                root.join("libpodtmp").display(),
                root.join("hooks.d").display(),
            ),
        )
        .expect("containers.conf");
        // Storage of its own, named in the environment so that any `podman` run with it (the
        // daemon's `run --container` too) finds this test's containers.
        fs::write(
            root.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                root.join("storage").display(),
                root.join("run").display(),
            ),
        )
        .expect("storage.conf");
        Self { dir }
    }

    /// Installs transproxy's OCI hook (as the .deb does, pointing at `transproxy`) in this
    /// podman's hooks folder.
    pub fn with_hook(self, transproxy: &Path) -> Self {
        let hooks = self.dir.path().join("hooks.d");
        let hook = serde_json::json!({
            "version": "1.0.0",
            "hook": { "path": transproxy, "args": ["transproxy", "oci-hook"] },
            "when": { "always": true },
            "stages": ["createRuntime"],
        });
        fs::write(hooks.join("transproxy.json"), hook.to_string()).expect("hook file");
        self
    }

    /// The environment that makes `podman` use this test's storage, configuration and hooks.
    pub fn env(&self) -> [(&'static str, PathBuf); 2] {
        let root = self.dir.path();
        [
            ("CONTAINERS_CONF", root.join("containers.conf")),
            ("CONTAINERS_STORAGE_CONF", root.join("storage.conf")),
        ]
    }

    /// `podman` with this test's storage and configuration.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.envs(self.env());
        cmd
    }

    /// `podman run --rm` of `script` (busybox sh) in a container with no network, whose
    /// cgroup is made below `parent`; with `name` when given.
    pub fn run(&self, parent: &TestCgroup, name: Option<&str>, script: &str) -> Output {
        let mut cmd = self.command();
        cmd.args(["run", "--rm", "--pull=never", "--network", "none"]);
        cmd.arg(format!("--cgroup-parent={}", cgroup_parent(parent)));
        if let Some(name) = name {
            cmd.args(["--name", name]);
        }
        cmd.arg("--rootfs")
            .arg(format!("{}:O", self.rootfs().display()))
            .args(["/bin/busybox", "sh", "-c", script]);
        run(&mut cmd)
    }

    /// `podman run -d` of `script`, kept running: its id.
    pub fn start(&self, parent: &TestCgroup, name: &str, script: &str) -> String {
        let mut cmd = self.command();
        cmd.args(["run", "-d", "--pull=never", "--network", "none"])
            .arg(format!("--cgroup-parent={}", cgroup_parent(parent)))
            .args(["--name", name])
            .arg("--rootfs")
            .arg(format!("{}:O", self.rootfs().display()))
            .args(["/bin/busybox", "sh", "-c", script]);
        let out = run(&mut cmd);
        assert!(
            out.status.success(),
            "podman run -d: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `podman rm -f -t 0 NAME` (busybox as PID 1 ignores SIGTERM).
    pub fn remove(&self, name: &str) {
        let out = run(self.command().args(["rm", "-f", "-t", "0", name]));
        assert!(
            out.status.success(),
            "podman rm: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
}

impl Default for Podman {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers a failed test left: stopped and removed, their cgroups with them.
        let _ = self.command().args(["rm", "-a", "-f", "-t", "0"]).output();
        let _ = self.command().args(["system", "reset", "-f"]).output();
    }
}

/// The `--cgroup-parent` naming `cgroup` (its path below the v2 root).
fn cgroup_parent(cgroup: &TestCgroup) -> String {
    let root = crate::cgroup::v2_root();
    let relative = cgroup
        .path()
        .strip_prefix(&root)
        .expect("the test cgroup is below the v2 root");
    format!("/{}", relative.display())
}
