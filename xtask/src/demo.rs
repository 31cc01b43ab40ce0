//! `cargo xtask demo`: transproxy end to end, for a newcomer with no proxy at hand.
//!
//! Starts a local squid and a local origin, intercepts one curl run in a fresh cgroup, shows what
//! each party saw, and cleans up (every piece is dropped, even on error).

use std::{net::Ipv4Addr, path::Path, process::Command, time::Duration};

use anyhow::bail;
use transproxy_tests::{Daemon, Origin, Squid, TestCgroup, curl};

const ORIGIN_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

pub(crate) fn run(binary: &Path) -> anyhow::Result<()> {
    let squid = Squid::start(&[]);
    println!(
        "demo: squid (the upstream proxy) listens on {}",
        squid.addr()
    );
    let origin = Origin::http(ORIGIN_IP, "Hello from the origin on 127.0.0.2!\n");
    println!("demo: an HTTP origin listens on {}", origin.addr());
    let cgroup = TestCgroup::new("demo");
    println!("demo: created cgroup {}", cgroup.path().display());

    let (mut cmd, listen) = Daemon::command(Command::new(binary), &squid.url(), &cgroup);
    cmd.args(["--include", &format!("{ORIGIN_IP}/32")]);
    println!("demo: $ {cmd:?}");
    let daemon = Daemon::spawn(cmd, listen);
    println!("demo: {}", daemon.ready_line());

    let url = format!("http://{}/", origin.addr());
    println!(
        "\ndemo: running `curl --noproxy '*' {url}` inside the cgroup (curl itself is told to use no proxy):"
    );
    let out = curl(&mut cgroup.command("curl"), &url);
    print!("curl> {}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "curl failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            daemon.stderr()
        );
    }

    let lines = squid.wait_connects(origin.addr(), 1, Duration::from_secs(5));
    println!("\ndemo: squid's access log shows the tunnel transproxy opened:");
    for line in &lines {
        println!("squid> {line}");
    }
    println!("\ndemo: transproxy's log (RUST_LOG=debug), including the eBPF redirect record:");
    for line in daemon.stderr().lines() {
        println!("transproxy> {line}");
    }
    if lines.is_empty() {
        bail!("squid logged no CONNECT: the connection was not intercepted");
    }
    println!("\ndemo: done; stopping transproxy and squid, removing the cgroup");
    println!(
        "demo: now with your own proxy, for one command: sudo target/release/transproxy exec --proxy http://YOUR-PROXY:PORT -- curl https://example.org/\n      or a whole service or shell: see `Modes` in README.md; `sudo transproxy status` shows what it does"
    );
    Ok(())
}
