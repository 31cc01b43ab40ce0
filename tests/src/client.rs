//! Running clients from tests: commands, curl, tp-client probes.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio},
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

/// tp-client `storm` inside `cgroup`: N probes of `dst`, CONCURRENCY at a time; the count of
/// each outcome.
pub fn storm(
    cgroup: &TestCgroup,
    dst: SocketAddr,
    n: usize,
    concurrency: usize,
) -> std::collections::HashMap<String, usize> {
    let out = run(cgroup.command(crate::client_bin()).args([
        "storm",
        &dst.to_string(),
        &n.to_string(),
        &concurrency.to_string(),
    ]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap_or(0)))
        .collect()
}

/// tp-client echo-session inside `cgroup`, connected, nothing sent yet.
pub fn echo_session_quiet(
    cgroup: &TestCgroup,
    dst: SocketAddr,
) -> (Child, ChildStdin, BufReader<ChildStdout>) {
    let mut child = cgroup
        .command(crate::client_bin())
        .args(["echo-session", &dst.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // Its one-line error, if it fails, for `wait_with_output`.
        .stderr(Stdio::piped())
        .spawn()
        .expect("echo-session");
    let stdin = child.stdin.take().expect("stdin");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    (child, stdin, stdout)
}

/// tp-client echo-session inside `cgroup`, with its first echo already received.
pub fn echo_session(cgroup: &TestCgroup, dst: SocketAddr) -> (Child, ChildStdin) {
    let (child, mut stdin, mut stdout) = echo_session_quiet(cgroup, dst);
    writeln!(stdin, "hello").expect("write");
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read");
    assert_eq!(line, "hello\n");
    (child, stdin)
}
