//! Running clients from tests: commands, curl, tp-client probes.

use std::{
    net::SocketAddr,
    process::{Command, Output},
};

use crate::TestCgroup;

/// Runs `cmd` to completion; a command that cannot start fails the test.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd`, which is expected to exit (a daemon that must refuse to start), for at most
/// `limit`: one still running then is killed, so a test fails instead of hanging.
pub fn run_for(cmd: &mut Command, limit: std::time::Duration) -> Output {
    use std::process::Stdio;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(limit) {
        Ok(output) => output.unwrap_or_else(|e| panic!("cannot wait for {cmd:?}: {e}")),
        Err(_) => {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let output = finished
                .recv()
                .expect("the waiting thread ended")
                .expect("wait for the killed command");
            panic!(
                "{cmd:?} was still running after {limit:?}; stderr:\n{}",
                text(&output.stderr)
            );
        }
    }
}

/// Output bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs curl (`cmd` is `curl`, possibly inside a cgroup) for `url`, printing the body, bounded
/// in time. `--noproxy '*'`: curl connects directly; only the kernel redirect may send it
/// through a proxy.
pub fn curl(cmd: &mut Command, url: &str) -> Output {
    run(cmd.args([
        "--silent",
        "--show-error",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        "--globoff",
        url,
    ]))
}

/// `http://ADDR/`.
pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/")
}

/// tp-client `probe` inside `cgroup`: `refused`, `reset`, `eof`, `timeout`, `error:..` or
/// `data:<line>`.
pub fn probe(cgroup: &TestCgroup, dst: SocketAddr) -> String {
    let out = run(cgroup
        .command(crate::client_bin())
        .args(["probe", &dst.to_string()]));
    text(&out.stdout).trim().to_owned()
}
