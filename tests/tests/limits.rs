//! Limits and load: the tunnel cap, no leaks after thousands of failures, thousands of
//! concurrent tunnels, unaccepted redirects, and the shutdown grace's cut.
//!
//! Real daemon, real kernel; squid or the harness's own proxies upstream; loopback only.

use std::{
    collections::HashMap,
    io::Write as _,
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use transproxy_tests::{
    Behavior, Daemon, HostileProxy, LOG_WAIT, ORIGIN_IP, Origin, Squid, TestCgroup,
    bpf::map_entries, client_bin, echo_session, probe, proc_status, run, storm, text, wait_for,
};

/// A tunnel still open when the shutdown grace runs out is reset at both ends, not closed:
/// a client must not take a cut transfer for a complete one.
#[test]
fn tunnels_cut_at_the_end_of_the_shutdown_grace_are_reset() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("cut");
    let mut daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--shutdown-grace", "1s"],
    );
    let (session, mut stdin) = echo_session(&cgroup, origin.addr());
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(LOG_WAIT).is_some(), "{}", daemon.stderr());
    // The next exchange meets the reset.
    let _ = writeln!(stdin, "after");
    drop(stdin);
    let out = session.wait_with_output().expect("echo-session");
    let said = text(&out.stderr);
    assert!(
        said.contains("reset") && !out.status.success(),
        "{said}\n{}",
        daemon.stderr()
    );
    assert!(
        daemon
            .stderr()
            .contains("cut at the end of the shutdown grace")
    );
}

/// So is a tunnel still waiting for the proxy's reply then: its client gets a reset, not an
/// empty answer.
#[test]
fn tunnels_cut_while_opening_are_reset() {
    let port = transproxy_tests::free_port(ORIGIN_IP);
    let proxy = HostileProxy::start(HashMap::from([(port, Behavior::NeverReply)]));
    let cgroup = TestCgroup::new("cutopen");
    let mut daemon = Daemon::run(
        &proxy.url(),
        &cgroup,
        &[
            "--include",
            "127.0.0.2/32",
            "--shutdown-grace",
            "1s",
            "--reply-timeout",
            "30s",
        ],
    );
    let dst = SocketAddr::from((ORIGIN_IP, port));
    let probe = cgroup
        .command(client_bin())
        .args(["probe", &dst.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("probe");
    let asked = wait_for(LOG_WAIT, || (!proxy.requests().is_empty()).then_some(()));
    assert!(asked.is_some(), "{}", daemon.stderr());
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(LOG_WAIT).is_some(), "{}", daemon.stderr());
    let out = probe.wait_with_output().expect("probe");
    assert_eq!(text(&out.stdout).trim(), "reset", "{}", daemon.stderr());
}

#[test]
fn tunnel_cap_resets_extra_clients_and_recovers() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("cap");
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--max-tunnels", "2"],
    );
    assert!(
        daemon.ready_line().contains("at most 2 tunnels"),
        "{}",
        daemon.ready_line()
    );
    let (mut one, one_in) = echo_session(&cgroup, origin.addr());
    let (mut two, two_in) = echo_session(&cgroup, origin.addr());
    assert_eq!(probe(&cgroup, origin.addr()), "reset");
    assert!(
        daemon.stderr().contains("--max-tunnels reached"),
        "{}",
        daemon.stderr()
    );
    drop(one_in);
    assert!(one.wait().unwrap().success());
    let freed = wait_for(LOG_WAIT, || {
        (probe(&cgroup, origin.addr()) == "data:ping").then_some(())
    });
    assert!(freed.is_some(), "{}", daemon.stderr());
    drop(two_in);
    assert!(two.wait().unwrap().success());
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(0)
}

#[test]
fn ten_thousand_failures_leak_no_descriptors_or_map_entries() {
    let [denied_port, silent_port] = transproxy_tests::free_ports(ORIGIN_IP, 2)[..] else {
        unreachable!("two ports asked for")
    };
    let proxy = HostileProxy::start(HashMap::from([
        (denied_port, Behavior::Deny),
        (silent_port, Behavior::NeverReply),
    ]));
    let cgroup = TestCgroup::new("leaks");
    let daemon = Daemon::run(
        &proxy.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--reply-timeout", "300ms"],
    );
    let denied = SocketAddr::from((ORIGIN_IP, denied_port));
    let silent = SocketAddr::from((ORIGIN_IP, silent_port));
    assert_eq!(probe(&cgroup, denied), "reset");
    let settled = || std::thread::sleep(Duration::from_millis(500));
    settled();
    let fds_before = open_fds(daemon.pid());

    let mut outcomes = storm(&cgroup, denied, 4000, 50);
    for (k, v) in storm(&cgroup, silent, 1000, 200) {
        *outcomes.entry(k).or_default() += v;
    }
    drop(proxy); // the proxy goes down
    for (k, v) in storm(&cgroup, denied, 5000, 50) {
        *outcomes.entry(k).or_default() += v;
    }
    assert_eq!(
        outcomes,
        HashMap::from([("reset".to_owned(), 10_000)]),
        "{}",
        daemon.stderr().lines().last().unwrap_or("")
    );

    settled();
    let fds_after = open_fds(daemon.pid());
    assert_eq!(fds_after, fds_before, "descriptors leaked");
    assert_eq!(
        map_entries(cgroup.path(), "DST_BY_CLIENT"),
        0,
        "accept records leaked"
    );
    // The sockets' own records (ORIGINAL_DST) are socket storage: the kernel frees them with
    // their socket, and has no way to list them.
}

fn rss_kib(pid: i32) -> u64 {
    proc_status(pid, "VmRSS:")
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn two_thousand_concurrent_tunnels_lose_nothing() {
    transproxy_tests::raise_fd_limit();
    const TUNNELS: usize = 2000;
    const BYTES: usize = 64 * 1024;
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("load");
    let daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
    let pid = daemon.pid();
    // What the daemon holds with no tunnel: listeners, maps, the runtime, the namespace opener's
    // socket. The load must leave it there.
    let idle_fds = open_fds(pid);
    let sampler = std::thread::spawn(move || {
        let (mut rss, mut fds) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(240);
        while Instant::now() < deadline && std::fs::metadata(format!("/proc/{pid}")).is_ok() {
            rss = rss.max(rss_kib(pid));
            fds = fds.max(open_fds(pid));
            std::thread::sleep(Duration::from_millis(50));
            if fds >= TUNNELS * 2 {
                break;
            }
        }
        (rss, fds)
    });
    let started = Instant::now();
    let out = run(cgroup.command(client_bin()).args([
        "load",
        &origin.addr().to_string(),
        &TUNNELS.to_string(),
        &BYTES.to_string(),
    ]));
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "{}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        daemon
            .stderr()
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(text(&out.stdout).trim(), format!("ok {TUNNELS}"));
    let (peak_rss, peak_fds) = sampler.join().unwrap();
    assert!(
        peak_fds >= TUNNELS * 2,
        "the tunnels were not open at once: peak {peak_fds} descriptors"
    );
    assert_eq!(
        squid
            .wait_connects(origin.addr(), TUNNELS, Duration::from_secs(30))
            .len(),
        TUNNELS
    );
    let settled = wait_for(Duration::from_secs(10), || {
        (open_fds(pid) <= idle_fds).then(|| open_fds(pid))
    });
    println!(
        "load: {TUNNELS} concurrent tunnels x {BYTES} bytes each way through squid in {elapsed:?}, 0 lost; \
         daemon peak RSS {peak_rss} KiB, peak {peak_fds} fds, {} fds after",
        settled.unwrap_or_else(|| open_fds(pid))
    );
    assert!(
        settled.is_some(),
        "descriptors still open after the load: {} (before it: {idle_fds})",
        open_fds(pid)
    );
}

#[test]
fn unaccepted_redirects_are_evicted_and_never_block_new_ones() {
    const CLIENTS: usize = 40;
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("evict");
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--max-pending", "16"],
    );
    // A stopped daemon accepts nothing, but the kernel still completes the handshakes and
    // sock_ops records every connection: more records than the table holds.
    daemon.signal(libc::SIGSTOP);
    let storm = cgroup
        .command(client_bin())
        .args([
            "storm",
            &origin.addr().to_string(),
            &CLIENTS.to_string(),
            &CLIENTS.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("storm");
    std::thread::sleep(Duration::from_secs(1));
    daemon.signal(libc::SIGCONT);
    let out = storm.wait_with_output().expect("storm output");
    let counts: HashMap<String, usize> = text(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap_or(0)))
        .collect();
    // Closed without a tunnel: a reset, since the daemon never reads the ping it was sent.
    let count = |k: &str| counts.get(k).copied().unwrap_or(0);
    let (tunnelled, closed) = (count("data"), count("eof") + count("reset"));
    assert_eq!(tunnelled + closed, CLIENTS, "{counts:?}");
    assert!(
        (1..=16).contains(&tunnelled),
        "the newest records must survive: {counts:?}"
    );
    assert!(
        closed >= CLIENTS - 16,
        "evicted records must be forgotten, not tunnelled: {counts:?}"
    );
    // New connections are not blocked by the old ones.
    assert_eq!(
        probe(&cgroup, origin.addr()),
        "data:ping",
        "{}",
        daemon.stderr()
    );
}
