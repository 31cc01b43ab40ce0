//! The runtimes' hooks: they tell the running daemons about a container's network namespace
//! before the container's own process runs, so not even its first connect is missed.
//!
//! * `transproxy oci-hook`, an OCI runtime hook for the `createRuntime` stage (podman, CRI-O;
//!   the .deb installs its description in `/usr/share/containers/oci/hooks.d`): the runtime
//!   passes the container's state on stdin, whose `pid` is its init process, already in its
//!   cgroup and namespace.
//! * `transproxy cni`, a chained CNI plugin (Kubernetes): on `ADD`, the pod's namespace file is
//!   `CNI_NETNS`; the previous plugin's result is passed on unchanged.
//!
//! Both ask every daemon's control socket (`serve pid PID`, `serve netns PATH`) and wait for its
//! answer. A daemon whose cgroup tree does not hold the process says so, which is no error.
//! Neither hook ever fails the container's start: a container that must not get around the
//! proxy is protected by the kill switch in the kernel, not by a hook.

use std::{
    io::{Read as _, Write as _},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::hook_input::{cni_result, oci_pid};
use crate::observe::status;

/// How long each daemon may take to answer: opening a listener takes a millisecond.
const ANSWER_WAIT: Duration = Duration::from_secs(3);

/// The most a hook reads from stdin: a container's state or a CNI config is a few KiB.
const STDIN_LIMIT: u64 = 1 << 20;

/// `transproxy oci-hook`.
pub fn oci_hook() -> anyhow::Result<ExitCode> {
    let state = read_stdin()?;
    let pid = oci_pid(&state)?;
    ask_every_daemon(&format!("pid {pid}"));
    Ok(ExitCode::SUCCESS)
}

/// The CNI versions this plugin speaks: it only passes results on, whose format it leaves alone.
const CNI_VERSIONS: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "0.2.0"];

/// `transproxy cni`.
pub fn cni() -> anyhow::Result<ExitCode> {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    match command.as_str() {
        "VERSION" => {
            let answer = serde_json::json!({
                "cniVersion": "1.0.0",
                "supportedVersions": CNI_VERSIONS,
            });
            println!("{answer}");
            Ok(ExitCode::SUCCESS)
        }
        "ADD" => {
            let config = read_stdin()?;
            let result = cni_result(&config)?;
            match std::env::var("CNI_NETNS") {
                Ok(netns) if netns.starts_with('/') => ask_every_daemon(&format!("netns {netns}")),
                _ => {
                    eprintln!("transproxy cni: ADD without an absolute CNI_NETNS: nothing to serve")
                }
            }
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{result}")?;
            Ok(ExitCode::SUCCESS)
        }
        // The daemon closes a namespace's listener when no process of its tree is left in it.
        "DEL" | "CHECK" | "GC" | "STATUS" => Ok(ExitCode::SUCCESS),
        other => {
            let error = serde_json::json!({
                "cniVersion": "1.0.0",
                "code": 4,
                "msg": format!("transproxy cni: unknown CNI_COMMAND {other:?}"),
            });
            println!("{error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut input = Vec::new();
    std::io::stdin()
        .take(STDIN_LIMIT + 1)
        .read_to_end(&mut input)
        .context("cannot read stdin")?;
    if input.len() as u64 > STDIN_LIMIT {
        bail!("more than {STDIN_LIMIT} bytes on stdin");
    }
    Ok(input)
}

/// Asks every running daemon to serve `what`, saying on stderr what went wrong.
fn ask_every_daemon(what: &str) {
    for (pid, socket) in status::sockets() {
        match status::ask_to_serve(&socket, what, ANSWER_WAIT) {
            Ok(answer) if answer.starts_with("ok") => {}
            // Another daemon's container.
            Ok(answer) if answer.contains("is not in the cgroup tree") => {}
            Ok(answer) => eprintln!("transproxy: daemon {pid}: {what}: {answer}"),
            // A daemon that died without removing its socket.
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(err) => eprintln!("transproxy: daemon {pid}: {what}: {err}"),
        }
    }
}
