//! `run --container ID|NAME`: the cgroup of one podman or Docker container, for a quick start
//! on it alone.
//!
//! The runtime's CLI knows names and short ids: `podman inspect`, then `docker inspect`, give
//! the container's init pid, whose `/proc/PID/cgroup` is the container's cgroup whatever the
//! cgroup manager (cgroupfs or systemd) named it. With neither CLI, the id is looked for among
//! the cgroup folders runtimes make: `libpod-ID`, `docker-ID.scope`, `crio-ID.scope`,
//! `cri-containerd-ID.scope`, or `ID` below a `docker` folder.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail};

/// The cgroup v2 folder of `container` (a name or an id, or an id's unique prefix of at least
/// 12 characters when no runtime CLI is present).
pub(crate) fn cgroup_of(container: &str, v2_root: &Path) -> anyhow::Result<PathBuf> {
    if container.is_empty() || container.starts_with('-') {
        bail!("--container: {container:?} is not a container name or id");
    }
    let mut tried = Vec::new();
    for cli in ["podman", "docker"] {
        match pid_from_cli(cli, container) {
            Ok(Some(pid)) => return cgroup_of_pid(pid, v2_root),
            Ok(None) => tried.push(format!("{cli} has no running container {container:?}")),
            Err(err) => tried.push(format!("{cli}: {err}")),
        }
    }
    match cgroup_by_name(container, v2_root)? {
        Some(dir) => Ok(dir),
        None => Err(anyhow!(
            "--container {container}: no such running container ({}; and no cgroup folder named after that id)",
            tried.join("; ")
        )),
    }
}

/// The container's init pid from `cli inspect`: `None` when the CLI knows no such container,
/// or it is not running.
fn pid_from_cli(cli: &str, container: &str) -> anyhow::Result<Option<u32>> {
    let out = Command::new(cli)
        .args([
            "inspect",
            "--type",
            "container",
            "--format",
            "{{.State.Pid}}",
            container,
        ])
        .output()
        .map_err(|err| anyhow!("cannot run it ({err})"))?;
    if !out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| anyhow!("inspect printed {:?}, not a pid", text.trim()))?;
    Ok((pid > 0).then_some(pid))
}

/// The cgroup v2 folder of process `pid`.
fn cgroup_of_pid(pid: u32, v2_root: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|err| anyhow!("the container's process {pid} is gone ({err})"))?;
    let relative = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| anyhow!("process {pid} has no cgroup v2 entry"))?;
    let relative = relative.trim_start_matches('/');
    if relative.is_empty() {
        bail!("the container's process {pid} is in the root cgroup: it has no cgroup of its own");
    }
    Ok(v2_root.join(relative))
}

/// The folder a runtime made for container id `id` (or a unique prefix of 12 characters or
/// more), searched below `v2_root`.
fn cgroup_by_name(id: &str, v2_root: &Path) -> anyhow::Result<Option<PathBuf>> {
    if id.len() < 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let mut found = Vec::new();
    let mut pending = vec![v2_root.to_path_buf()];
    let mut visited = 0;
    while let Some(dir) = pending.pop() {
        visited += 1;
        if visited > 100_000 {
            break;
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if names_container(&name, id, dir.file_name().is_some_and(|d| d == "docker")) {
                found.push(entry.path());
            } else {
                pending.push(entry.path());
            }
        }
    }
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        many => bail!(
            "--container {id}: {} cgroups match that id prefix; give more of it",
            many.len()
        ),
    }
}

/// Whether cgroup folder `name` is the one a runtime made for container id (prefix) `id`.
fn names_container(name: &str, id: &str, below_docker: bool) -> bool {
    let bare = ["libpod-", "docker-", "crio-", "cri-containerd-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .map(|rest| rest.strip_suffix(".scope").unwrap_or(rest))
        .or(below_docker.then_some(name));
    bare.is_some_and(|bare| {
        bare.len() == 64 && bare.bytes().all(|b| b.is_ascii_hexdigit()) && bare.starts_with(id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtimes_cgroup_folders_are_recognised() {
        let id = "0123456789abcdef".repeat(4);
        for name in [
            format!("libpod-{id}"),
            format!("docker-{id}.scope"),
            format!("crio-{id}.scope"),
            format!("cri-containerd-{id}.scope"),
        ] {
            assert!(names_container(&name, &id[..12], false), "{name}");
            assert!(names_container(&name, &id, false), "{name}");
        }
        assert!(names_container(&id, &id[..12], true));
        assert!(!names_container(&id, &id[..12], false));
        assert!(!names_container(
            &format!("libpod-{id}"),
            "fedcba987654",
            false
        ));
        // Conmon's folder, a short name: not a container's.
        assert!(!names_container(
            &format!("libpod-conmon-{id}"),
            &id[..12],
            false
        ));
        assert!(!names_container("libpod-abc", "abc", false));
    }
}
