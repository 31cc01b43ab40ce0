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
