//! When things go wrong: refused stays refused, error pages, the kill switch, limits, hostile
//! proxies, no leaks, credentials and privileges.
//!
//! Real daemon, real kernel; squid or the harness's hostile proxy upstream; loopback only.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use transproxy_tests::{
    Behavior, ConnectProxy, Daemon, HostileProxy, LOG_WAIT, ORIGIN_IP, OTHER_IP, Origin, Squid,
    TestCgroup, bpf::map_entries, client_bin, probe, require_root, run, text, transproxy_bin,
    wait_for,
};

#[test]
fn refused_destination_fails_at_connect_so_clients_move_on() {
    require_root();
    let squid = Squid::start(&[]);
    let origin = Origin::http(ORIGIN_IP, "second address");
    let port = origin.addr().port();
    let refusing = SocketAddr::from((OTHER_IP, port));
    let cgroup = TestCgroup::new("refused");
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--include", "127.0.0.3/32"],
    );
    // One name, two addresses: the first refuses (nothing listens on 127.0.0.3), the second serves.
    let resolve = format!("refused.test:{port}:{OTHER_IP},{ORIGIN_IP}");
    let url = format!("http://refused.test:{port}/");
    let curl = || {
        run(cgroup.command("curl").args([
            "-sv",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "--resolve",
            &resolve,
            &url,
        ]))
    };

    // First try: the handshake with the listener had succeeded before squid reported the
    // refusal, so this client can only be reset.
    let first = curl();
    assert!(!first.status.success(), "{}", text(&first.stderr));
    let logged = wait_for(LOG_WAIT, || {
        daemon
            .stderr()
            .contains("refused or unreachable")
            .then_some(())
    });
    assert!(logged.is_some(), "{}", daemon.stderr());

    // From now on the kernel refuses that destination in connect() itself; curl moves on.
    let started = Instant::now();
    let second = curl();
    assert!(
        second.status.success(),
        "{}\n{}",
        text(&second.stderr),
        daemon.stderr()
    );
    assert_eq!(text(&second.stdout), "second address");
    assert!(
        text(&second.stderr).contains("Connection refused"),
        "{}",
        text(&second.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        squid.wait_connects(origin.addr(), 1, LOG_WAIT).len(),
        1,
        "{}",
        squid.access_log()
    );
    // The refused address was asked about once, on the first try only.
    assert_eq!(
        squid.connect_lines(refusing).len(),
        1,
        "{}",
        squid.access_log()
    );
}

#[test]
fn refusal_expires_after_its_ttl() {
    require_root();
    let squid = Squid::start(&[]);
    let cgroup = TestCgroup::new("ttl");
    let _daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.3/32", "--refused-ttl", "1s"],
    );
    let refusing = SocketAddr::from((OTHER_IP, transproxy_tests::free_port(OTHER_IP)));

    assert_eq!(probe(&cgroup, refusing), "reset");
    let refused_now = wait_for(LOG_WAIT, || {
        (probe(&cgroup, refusing) == "refused").then_some(())
    });
    assert!(refused_now.is_some(), "connects were not refused at once");
    std::thread::sleep(Duration::from_millis(1500));
    // Expired: the next connect is tunnelled (and reset) again, and squid is asked again.
    assert_eq!(probe(&cgroup, refusing), "reset");
    assert!(
        squid.wait_connects(refusing, 2, LOG_WAIT).len() >= 2,
        "{}",
        squid.access_log()
    );
}

#[test]
fn on_proxy_error_http_shows_the_proxy_page_to_http_clients() {
    require_root();
    let squid = Squid::start(&["127.0.0.3"]);
    let denied = Origin::http(OTHER_IP, "never");
    let cgroup = TestCgroup::new("errpage");
    // A request body bigger than what goes ahead of the proxy's reply: left unread, it must
    // not turn the close after the page into a reset that cuts the page.
    let big_body = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(big_body.path(), "x".repeat(200_000)).unwrap();
    let post = format!("@{}", big_body.path().display());
    let url = format!("http://{}/", denied.addr());
    // curl's output (the page, then the status) for a GET, or a POST with `extra` arguments.
    let page = |extra: &[&str]| {
        let out = run(cgroup
            .command("curl")
            .args(["-s", "-S", "--noproxy", "*", "--max-time", "10"])
            .args(extra)
            .args(["-w", "\n%{http_code}", &url]));
        assert!(out.status.success(), "{extra:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    // With --wait-for-reply the request is only peeked at, never read.
    for mode in [None, Some("--wait-for-reply")] {
        let mut args = vec!["--include", "127.0.0.3/32", "--on-proxy-error", "http"];
        args.extend(mode);
        let _daemon = Daemon::run(&squid.url(), &cgroup, &args);

        let body = page(&[]);
        assert!(body.ends_with("\n403"), "{mode:?}: status: {body}");
        assert!(
            body.contains("ERR_ACCESS_DENIED"),
            "{mode:?}: not squid's page: {body}"
        );
        let body = page(&["-H", "Expect:", "--data-binary", &post]);
        assert!(body.ends_with("\n403"), "{mode:?}: POST: status: {body}");
        // A client that does not speak HTTP still gets a reset.
        assert_eq!(probe(&cgroup, denied.addr()), "reset", "{mode:?}");
    }
    assert_eq!(denied.hits(), 0);
}

#[test]
fn hostile_proxy_replies_fail_cleanly_and_the_daemon_keeps_serving() {
    require_root();
    let cases = [
        (Behavior::Deny, "reset"),
        (Behavior::NeverReply, "reset"),
        (Behavior::EndlessHeader, "reset"),
        (Behavior::OneByteWrites, "data:ping"),
        // The tunnel opened and closed: an end-of-file, or a reset when the client's bytes hit
        // the closed upstream first. Either way the client sees it end.
        (Behavior::OkThenClose, "eof|reset"),
        (Behavior::NotHttp, "reset"),
        (Behavior::BadContentLength, "data:ping"),
        (Behavior::HugeHeader, "reset"),
    ];
    let ports: Vec<u16> = (0..cases.len())
        .map(|_| transproxy_tests::free_port(ORIGIN_IP))
        .collect();
    let proxy = HostileProxy::start(
        ports
            .iter()
            .zip(&cases)
            .map(|(p, (b, _))| (*p, *b))
            .collect(),
    );
    let cgroup = TestCgroup::new("hostile");
    let mut daemon = Daemon::run(
        &proxy.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--reply-timeout", "500ms"],
    );
    for (port, (behavior, expected)) in ports.iter().zip(&cases) {
        let started = Instant::now();
        let outcome = probe(&cgroup, SocketAddr::from((ORIGIN_IP, *port)));
        assert!(
            expected.split('|').any(|e| e == outcome),
            "{behavior:?}: {outcome}\n{}",
            daemon.stderr()
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{behavior:?} took {:?}",
            started.elapsed()
        );
    }
    assert!(
        daemon.wait_exit(Duration::ZERO).is_none(),
        "the daemon died: {}",
        daemon.stderr()
    );
    assert!(!daemon.stderr().contains("panicked"), "{}", daemon.stderr());
    for needle in [
        "403",
        "within 500ms",
        "exceeds 16384 bytes",
        "not valid HTTP",
    ] {
        assert!(
            daemon.stderr().contains(needle),
            "no log line with '{needle}':\n{}",
            daemon.stderr()
        );
    }
}

#[test]
fn client_bytes_go_ahead_of_the_reply_unless_told_to_wait() {
    require_root();
    let relays = transproxy_tests::free_port(ORIGIN_IP);
    let drops = transproxy_tests::free_port(ORIGIN_IP);
    let slow = transproxy_tests::free_port(ORIGIN_IP);
    let proxy = HostileProxy::start(HashMap::from([
        (relays, Behavior::OneByteWrites),
        (drops, Behavior::DropsAhead),
        (slow, Behavior::SlowReply),
    ]));
    let cgroup = TestCgroup::new("ahead");
    let sent_ahead = |port: u16, bytes: &[u8]| {
        proxy
            .requests()
            .iter()
            .filter(|r| r.head.contains(&format!(":{port} ")) && r.ahead == bytes)
            .count()
    };

    // Each run: a daemon with `flags`; `times` probes to `port`, every one echoed; then a
    // client that sends only once its CONNECT request is at the slow proxy, echoed.
    let run_with = |flags: &[&str], port: u16, times: usize| {
        let daemon = Daemon::run(&proxy.url(), &cgroup, flags);
        for _ in 0..times {
            let outcome = probe(&cgroup, SocketAddr::from((ORIGIN_IP, port)));
            assert_eq!(outcome, "data:ping", "{}", daemon.stderr());
        }
        let asked = sent_ahead(slow, b"");
        let (mut session, mut stdin, mut stdout) =
            echo_session_quiet(&cgroup, SocketAddr::from((ORIGIN_IP, slow)));
        // Once the CONNECT request is at the proxy, alone.
        let at_proxy = wait_for(LOG_WAIT, || (sent_ahead(slow, b"") > asked).then_some(()));
        assert!(at_proxy.is_some(), "{}", daemon.stderr());
        writeln!(stdin, "late").expect("write");
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read");
        assert_eq!(line, "late\n", "{}", daemon.stderr());
        drop(stdin);
        assert!(session.wait().unwrap().success());
    };

    // By default the client's first bytes go out with the CONNECT request (when they are
    // there by then: the probe sends at once, so nearly always) and the proxy relays them;
    // bytes the client sends while the reply is awaited follow at once.
    run_with(&["--include", "127.0.0.2/32"], relays, 10);
    assert!(sent_ahead(relays, b"ping\n") > 0, "{:?}", proxy.requests());
    assert_eq!(sent_ahead(slow, b"late\n"), 1, "{:?}", proxy.requests());

    // A proxy that drops such bytes works with --wait-for-reply: nothing goes ahead.
    run_with(&["--include", "127.0.0.2/32", "--wait-for-reply"], drops, 5);
    assert_eq!(sent_ahead(drops, b"ping\n"), 0, "{:?}", proxy.requests());
    assert_eq!(sent_ahead(slow, b""), 1, "{:?}", proxy.requests());
}

/// tp-client echo-session inside `cgroup`, connected, nothing sent yet.
fn echo_session_quiet(
    cgroup: &TestCgroup,
    dst: SocketAddr,
) -> (Child, ChildStdin, BufReader<ChildStdout>) {
    let mut child = cgroup
        .command(client_bin())
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
fn echo_session(cgroup: &TestCgroup, dst: SocketAddr) -> (Child, ChildStdin) {
    let (child, mut stdin, mut stdout) = echo_session_quiet(cgroup, dst);
    writeln!(stdin, "hello").expect("write");
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read");
    assert_eq!(line, "hello\n");
    (child, stdin)
}

/// A tunnel still open when the shutdown grace runs out is reset at both ends, not closed:
/// a client must not take a cut transfer for a complete one.
#[test]
fn tunnels_cut_at_the_end_of_the_shutdown_grace_are_reset() {
    require_root();
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
    require_root();
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

/// A proxy named by host follows that host when it moves (a laptop on another network): on
/// SIGHUP, as every minute, the name is resolved again and new tunnels go to where it points.
/// The daemon runs in a mount namespace of its own whose /etc/hosts the test writes, so the
/// name only ever resolves to loopback addresses.
#[test]
fn a_proxy_named_by_host_is_followed_when_it_moves() {
    require_root();
    let origin = Origin::echo(ORIGIN_IP);
    let first = ConnectProxy::start();
    let port = first.addr().port();
    let second = ConnectProxy::start_at(SocketAddr::from(([127, 0, 0, 7], port)));
    let hosts = tempfile::NamedTempFile::new().unwrap();
    let point_at = |ip: &str| {
        // Written in place, the same length each time: a lookup never sees an empty file.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(hosts.path())
            .unwrap();
        file.write_all(format!("{ip} proxy.transproxy.test\n").as_bytes())
            .unwrap();
    };
    point_at("127.0.0.1");
    // Host names from that file only: no DNS, and no name service cache outside the namespace
    // (which would read the real /etc/hosts and then ask DNS).
    let nsswitch = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(nsswitch.path(), "hosts: files\n").unwrap();
    let cgroup = TestCgroup::new("moved");
    let mut wrapper = Command::new("unshare");
    wrapper
        .args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
        .arg(concat!(
            r#"mount --bind "$0" /etc/hosts && mount --bind "$1" /etc/nsswitch.conf && "#,
            r#"{ [ ! -d /run/nscd ] || mount -t tmpfs tmpfs /run/nscd; } && shift && exec "$@""#
        ))
        .arg(hosts.path())
        .arg(nsswitch.path())
        .arg(transproxy_bin());
    let (mut cmd, listen) = Daemon::command(
        wrapper,
        &format!("http://proxy.transproxy.test:{port}"),
        &cgroup,
    );
    cmd.args(["--include", "127.0.0.2/32", "--listen6", "off"]);
    let daemon = Daemon::spawn(cmd, listen);
    assert_eq!(probe(&cgroup, origin.addr()), "data:ping");
    assert_eq!(first.targets(), vec![origin.addr()]);

    point_at("127.0.0.7");
    daemon.signal(libc::SIGHUP);
    let moved = wait_for(LOG_WAIT, || {
        daemon
            .stderr()
            .contains("now resolves to 127.0.0.7")
            .then_some(())
    });
    assert!(moved.is_some(), "{}", daemon.stderr());
    assert_eq!(probe(&cgroup, origin.addr()), "data:ping");
    assert_eq!(second.targets(), vec![origin.addr()], "{}", daemon.stderr());
    assert_eq!(first.targets().len(), 1);
}

#[test]
fn tunnel_cap_resets_extra_clients_and_recovers() {
    require_root();
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

/// tp-client storm: outcome counts.
fn storm(
    cgroup: &TestCgroup,
    dst: SocketAddr,
    n: usize,
    concurrency: usize,
) -> HashMap<String, usize> {
    let out = run(cgroup.command(client_bin()).args([
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

#[test]
fn ten_thousand_failures_leak_no_descriptors_or_map_entries() {
    require_root();
    let (denied_port, silent_port) = (
        transproxy_tests::free_port(ORIGIN_IP),
        transproxy_tests::free_port(ORIGIN_IP),
    );
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

#[test]
fn credentials_come_from_env_or_a_root_only_file_and_never_show() {
    require_root();
    let port = transproxy_tests::free_port(ORIGIN_IP);
    let proxy = HostileProxy::start(HashMap::from([(port, Behavior::OneByteWrites)]));
    let dst = SocketAddr::from((ORIGIN_IP, port));
    let cgroup = TestCgroup::new("creds");
    let expected = "Proxy-Authorization: Basic YWxpY2U6czNjcmV0"; // alice:s3cret
    let start = |extra: &[&str], env: &[(&str, &str)]| {
        let (mut cmd, listen) =
            Daemon::command(Command::new(transproxy_bin()), &proxy.url(), &cgroup);
        cmd.args(["--include", "127.0.0.2/32"])
            .args(extra)
            .envs(env.iter().copied());
        (cmd, listen)
    };

    let (cmd, listen) = start(
        &["--proxy-auth-env", "TP_CREDS"],
        &[("TP_CREDS", "alice:s3cret")],
    );
    let daemon = Daemon::spawn(cmd, listen);
    assert_eq!(probe(&cgroup, dst), "data:ping");
    assert!(
        proxy.requests().iter().any(|r| r.head.contains(expected)),
        "{:?}",
        proxy.requests()
    );
    assert!(!daemon.stderr().contains("s3cret") && !daemon.ready_line().contains("s3cret"));
    assert!(
        daemon.ready_line().contains("***@"),
        "{}",
        daemon.ready_line()
    );
    drop(daemon);

    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "alice:s3cret\n").unwrap();
    std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (mut cmd, _) = start(&["--proxy-auth-file", &file.path().to_string_lossy()], &[]);
    let out = run(&mut cmd);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("readable by root only"),
        "{}",
        text(&out.stderr)
    );

    std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    let (cmd, listen) = start(&["--proxy-auth-file", &file.path().to_string_lossy()], &[]);
    let daemon = Daemon::spawn(cmd, listen);
    assert_eq!(probe(&cgroup, dst), "data:ping", "{}", daemon.stderr());
    assert_eq!(
        proxy
            .requests()
            .iter()
            .filter(|r| r.head.contains(expected))
            .count(),
        2
    );
}

fn status_field(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

#[test]
fn daemon_drops_capabilities_and_can_switch_user() {
    require_root();
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("caps");
    let daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
    // The descriptor limit was raised to the hard limit at start.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().skip(3).take(2).collect())
        .unwrap_or_default();
    assert!(
        open_files.len() == 2 && open_files[0] == open_files[1],
        "{limits}"
    );
    for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(
            status_field(daemon.pid(), field),
            "0000000000000000",
            "{field}"
        );
    }
    assert_eq!(
        probe(&cgroup, origin.addr()),
        "data:ping",
        "{}",
        daemon.stderr()
    );
    drop(daemon);

    // As `nobody`, with a root-only credentials file (squid here ignores the credentials) and
    // rules from a config file that SIGHUP re-reads.
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "alice:secret\n").unwrap();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "include = [\"127.0.0.2/32\"]\n").unwrap();
    std::fs::set_permissions(config.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &[
            "--config",
            &config.path().to_string_lossy(),
            "--proxy-auth-file",
            &secret.path().to_string_lossy(),
            "--user",
            "nobody",
        ],
    );
    assert!(
        status_field(daemon.pid(), "Uid:").starts_with("65534"),
        "{}",
        status_field(daemon.pid(), "Uid:")
    );
    // Leaving root clears the effective and permitted sets, but not the bounding set.
    for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(
            status_field(daemon.pid(), field),
            "0000000000000000",
            "{field} with --user"
        );
    }
    assert_eq!(
        probe(&cgroup, origin.addr()),
        "data:ping",
        "{}",
        daemon.stderr()
    );
    assert_eq!(squid.wait_connects(origin.addr(), 2, LOG_WAIT).len(), 2);
    // The reload needs only the rules: the credentials file, which `nobody` cannot read, is
    // not read again.
    daemon.signal(libc::SIGHUP);
    let reloaded = wait_for(LOG_WAIT, || {
        let log = daemon.stderr();
        (log.contains("SIGHUP: reloaded") || log.contains("SIGHUP: keeping")).then_some(log)
    });
    let log = reloaded.unwrap_or_else(|| daemon.stderr());
    assert!(log.contains("SIGHUP: reloaded"), "{log}");
    assert!(!log.contains("restart"), "{log}");
}

fn rss_kib(pid: i32) -> u64 {
    status_field(pid, "VmRSS:")
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn two_thousand_concurrent_tunnels_lose_nothing() {
    require_root();
    transproxy_tests::raise_fd_limit();
    const TUNNELS: usize = 2000;
    const BYTES: usize = 64 * 1024;
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("load");
    let daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
    let pid = daemon.pid();
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
        (open_fds(pid) < 64).then(|| open_fds(pid))
    });
    println!(
        "load: {TUNNELS} concurrent tunnels x {BYTES} bytes each way through squid in {elapsed:?}, 0 lost; \
         daemon peak RSS {peak_rss} KiB, peak {peak_fds} fds, {} fds after",
        settled.unwrap_or_else(|| open_fds(pid))
    );
    assert!(
        settled.is_some(),
        "descriptors still open after the load: {}",
        open_fds(pid)
    );
}

#[test]
fn unaccepted_redirects_are_evicted_and_never_block_new_ones() {
    require_root();
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

/// Any process of the cgroup decides how many connections fail, so failures are not logged one
/// by one: the first to each destination is, within a budget, and the rest are summed up.
#[test]
fn failure_logs_cannot_be_flooded() {
    require_root();
    let squid = Squid::start(&["127.0.0.3"]);
    let cgroup = TestCgroup::new("logflood");
    let mut daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.3/32"]);
    let denied = SocketAddr::from((OTHER_IP, 9));
    assert_eq!(
        storm(&cgroup, denied, 300, 20),
        HashMap::from([("reset".to_owned(), 300)])
    );
    for port in 1000..1100 {
        assert_eq!(probe(&cgroup, SocketAddr::from((OTHER_IP, port))), "reset");
    }
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(LOG_WAIT).is_some());
    let stderr = daemon.stderr();
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains(" WARN ")).collect();
    let about_denied = warnings
        .iter()
        .filter(|l| l.contains(&format!("{denied}: proxy replied")))
        .count();
    assert_eq!(about_denied, 1, "{warnings:#?}");
    assert!(
        warnings.len() <= 21,
        "{} warnings: {warnings:#?}",
        warnings.len()
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("380 more connection failures to 82 destinations")),
        "{warnings:#?}"
    );
}
