//! When the proxy fails: refused stays refused, error pages, hostile replies, bytes sent ahead
//! of the reply, a proxy whose host moves, failure logs that cannot be flooded.
//!
//! Real daemon, real kernel; squid or the harness's hostile proxy upstream; loopback only.

use std::{
    collections::HashMap,
    io::{BufRead as _, Write as _},
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use transproxy_tests::{
    Behavior, ConnectProxy, Daemon, HostileProxy, LOG_WAIT, ORIGIN_IP, OTHER_IP, Origin, Squid,
    TestCgroup, echo_session_quiet, probe, run, storm, text, transproxy_bin, wait_for,
};

#[test]
fn refused_destination_fails_at_connect_so_clients_move_on() {
    let squid = Squid::start(&[]);
    let origin = Origin::http(ORIGIN_IP, "second address");
    let port = origin.addr().port();
    let refusing = SocketAddr::from((OTHER_IP, port));
    let cgroup = TestCgroup::new("refused");
    // Addresses, not the name curl sends in Host: a refusal is remembered for the address the
    // client connected to, which is what the proxy was asked for.
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &[
            "--include",
            "127.0.0.2/32",
            "--include",
            "127.0.0.3/32",
            "--sniff-timeout",
            "0s",
        ],
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
    let page = |daemon: &Daemon, extra: &[&str]| {
        let out = run(cgroup
            .command("curl")
            .args(["-s", "-S", "--noproxy", "*", "--max-time", "10"])
            .args(extra)
            .args(["-w", "\n%{http_code}", &url]));
        assert!(
            out.status.success(),
            "{extra:?}: {}\n{}",
            text(&out.stderr),
            daemon.stderr()
        );
        text(&out.stdout)
    };
    // With --wait-for-reply the request is held back (read only for its host name).
    for mode in [None, Some("--wait-for-reply")] {
        let mut args = vec!["--include", "127.0.0.3/32", "--on-proxy-error", "http"];
        args.extend(mode);
        let daemon = Daemon::run(&squid.url(), &cgroup, &args);

        let body = page(&daemon, &[]);
        assert!(body.ends_with("\n403"), "{mode:?}: status: {body}");
        assert!(
            body.contains("ERR_ACCESS_DENIED"),
            "{mode:?}: not squid's page: {body}"
        );
        let body = page(&daemon, &["-H", "Expect:", "--data-binary", &post]);
        assert!(body.ends_with("\n403"), "{mode:?}: POST: status: {body}");
        // A client that does not speak HTTP still gets a reset.
        assert_eq!(probe(&cgroup, denied.addr()), "reset", "{mode:?}");
    }
    assert_eq!(denied.hits(), 0);
}

#[test]
fn hostile_proxy_replies_fail_cleanly_and_the_daemon_keeps_serving() {
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
    let ports = transproxy_tests::free_ports(ORIGIN_IP, cases.len());
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
    let [relays, drops, slow] = transproxy_tests::free_ports(ORIGIN_IP, 3)[..] else {
        unreachable!("three ports asked for")
    };
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

/// A proxy named by host follows that host when it moves (a laptop on another network): on
/// SIGHUP, as every minute, the name is resolved again and new tunnels go to where it points.
/// The daemon runs in a mount namespace of its own whose /etc/hosts the test writes, so the
/// name only ever resolves to loopback addresses.
#[test]
fn a_proxy_named_by_host_is_followed_when_it_moves() {
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

/// Any process of the cgroup decides how many connections fail, so failures are not logged one
/// by one: the first to each destination is, within a budget, and the rest are summed up.
#[test]
fn failure_logs_cannot_be_flooded() {
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
