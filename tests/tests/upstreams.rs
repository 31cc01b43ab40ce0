//! Choosing the upstream: a list of proxies tried in order, with a failed one skipped for a
//! while and used again once it answers; `direct`; SOCKS5 through dante (username and
//! password, `socks5h` sending names). Real daemon, real kernel, loopback only; names resolve
//! from hosts files.

use std::{net::SocketAddr, process::Command, time::Duration};

use transproxy_tests::{
    ConnectProxy, Daemon, Dante, LOG_WAIT, ORIGIN_IP, OTHER_IP, Origin, Squid, TestCgroup, curl,
    free_local_addr, probe, run, text, transproxy_bin, url, wait_for,
};

/// This daemon's part of `status --json`.
fn daemon_status(pid: i32) -> serde_json::Value {
    let out = run(Command::new(transproxy_bin()).args(["status", "--json"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    all["daemons"]
        .as_array()
        .and_then(|daemons| daemons.iter().find(|d| d["pid"] == pid).cloned())
        .unwrap_or_else(|| panic!("daemon {pid} not in status: {all}"))
}

fn fetch(cgroup: &TestCgroup, origin: &Origin) -> (String, String) {
    let out = curl(&mut cgroup.command("curl"), &url(origin.addr()));
    (text(&out.stdout), text(&out.stderr))
}

/// The first proxy refuses connections: the second carries the tunnels, one line says the
/// first is down, status and metrics show it. It comes back: after the skip time it carries
/// the tunnels again, and one line says so.
#[test]
fn a_proxy_that_is_down_is_skipped_and_used_again_when_it_answers() {
    let first = free_local_addr();
    let second = Squid::start(&[]);
    let web = Origin::http(ORIGIN_IP, "failover body");
    let cgroup = TestCgroup::new("failover");
    let metrics = free_local_addr();
    let daemon = Daemon::run(
        &format!("http://{first}"),
        &cgroup,
        &[
            "--proxy",
            &second.url(),
            "--proxy-skip",
            "2s",
            "--include",
            "127.0.0.2/32",
            "--metrics",
            &metrics.to_string(),
        ],
    );
    assert!(
        daemon
            .ready_line()
            .contains(&format!("via proxies http://{first}, {}", second.url())),
        "{}",
        daemon.ready_line()
    );
    for _ in 0..3 {
        let (body, said) = fetch(&cgroup, &web);
        assert_eq!(body, "failover body", "{said}\n{}", daemon.stderr());
    }
    second.wait_connects(web.addr(), 3, LOG_WAIT);
    let down = format!("proxy http://{first} is down");
    assert_eq!(
        daemon.stderr().matches(&down).count(),
        1,
        "{}",
        daemon.stderr()
    );
    let status = daemon_status(daemon.pid());
    let proxies = status["proxies"].as_array().expect("proxies in status");
    assert_eq!(proxies.len(), 2, "{status}");
    assert_eq!(proxies[0]["state"], "down", "{status}");
    assert_eq!(proxies[1]["state"], "up", "{status}");
    let scraped = run(Command::new("curl").args([
        "-s",
        "--noproxy",
        "*",
        &format!("http://{metrics}/metrics"),
    ]));
    let scraped = text(&scraped.stdout);
    assert!(
        scraped.contains(&format!(
            "transproxy_proxy_up{{proxy=\"http://{first}\"}} 0"
        )),
        "{scraped}"
    );

    // The first comes back; once its skip time is over, it carries the tunnels again.
    let back = ConnectProxy::start_at(first);
    std::thread::sleep(Duration::from_millis(2_200));
    let (body, said) = fetch(&cgroup, &web);
    assert_eq!(body, "failover body", "{said}");
    assert!(back.targets().contains(&web.addr()), "{}", daemon.stderr());
    let again = wait_for(LOG_WAIT, || {
        daemon
            .stderr()
            .contains(&format!("proxy http://{first} answers again"))
            .then_some(())
    });
    assert!(again.is_some(), "{}", daemon.stderr());
    assert_eq!(daemon_status(daemon.pid())["proxies"][0]["state"], "up");
}

/// `direct` at the end of the list: with every proxy down, the daemon connects to the
/// destination itself; the access log says so.
#[test]
fn direct_in_the_list_carries_the_tunnels_when_no_proxy_answers() {
    let dead = free_local_addr();
    let web = Origin::http(ORIGIN_IP, "direct body");
    let cgroup = TestCgroup::new("direct");
    let daemon = Daemon::run(
        &format!("http://{dead}"),
        &cgroup,
        &[
            "--proxy",
            "direct",
            "--include",
            "127.0.0.2/32",
            "--access-log",
            "-",
        ],
    );
    let (body, said) = fetch(&cgroup, &web);
    assert_eq!(body, "direct body", "{said}\n{}", daemon.stderr());
}

/// SOCKS5 with username and password (RFC 1929) against dante: the right password tunnels
/// (dante logs the user), a wrong one resets the client and says why.
#[test]
fn socks5_with_a_password_through_dante() {
    let dante = Dante::start(Some(("sockuser", "s0cks-pw")), &[]);
    let web = Origin::http(ORIGIN_IP, "socks body");
    let cgroup = TestCgroup::new("socks5");
    let right = Daemon::run(
        &dante.url("socks5", Some("sockuser:s0cks-pw")),
        &cgroup,
        &["--include", "127.0.0.2/32"],
    );
    let (body, said) = fetch(&cgroup, &web);
    assert_eq!(body, "socks body", "{said}\n{}", right.stderr());
    let logged = wait_for(LOG_WAIT, || {
        let log = dante.log();
        (log.contains("sockuser") && log.contains(&web.addr().port().to_string())).then_some(())
    });
    assert!(logged.is_some(), "{}", dante.log());
    drop(right);

    let wrong = Daemon::run(
        &dante.url("socks5", Some("sockuser:nope")),
        &cgroup,
        &["--include", "127.0.0.2/32"],
    );
    assert_eq!(probe(&cgroup, web.addr()), "reset");
    let said = wait_for(LOG_WAIT, || {
        let said = wrong.stderr();
        said.contains("SOCKS5 proxy: Password auth failure")
            .then_some(said)
    });
    assert!(said.is_some(), "{}", wrong.stderr());
}

/// `socks5h://` sends the name the client asked for (dante resolves it from its hosts file
/// and logs it); a tunnel with no name is refused with a line saying why, never sent as an
/// address. A destination dante reports refused is refused at connect() afterwards.
#[test]
fn socks5h_sends_names_and_never_addresses() {
    let dante = Dante::start(None, &[("origin.test", ORIGIN_IP.into())]);
    let web = Origin::http(ORIGIN_IP, "named body");
    let cgroup = TestCgroup::new("socks5h");
    let daemon = Daemon::run(
        &dante.url("socks5h", None),
        &cgroup,
        &["--include", "127.0.0.2/32", "--include", "127.0.0.3/32"],
    );
    let port = web.addr().port();
    let out = curl(
        cgroup
            .command("curl")
            .args(["--resolve", &format!("origin.test:{port}:{ORIGIN_IP}")]),
        &format!("http://origin.test:{port}/"),
    );
    assert_eq!(text(&out.stdout), "named body", "{}", text(&out.stderr));
    let named = wait_for(LOG_WAIT, || {
        dante
            .log()
            .contains(&format!("ATYP: 3 address: origin.test.{port}"))
            .then_some(())
    });
    assert!(named.is_some(), "{}", dante.log());

    // No name: the client sends nothing (probe waits for the server), DNS gave none.
    assert_eq!(probe(&cgroup, web.addr()), "reset");
    let said = wait_for(LOG_WAIT, || {
        daemon
            .stderr()
            .contains("a socks5h:// proxy is never sent an address")
            .then_some(())
    });
    assert!(said.is_some(), "{}", daemon.stderr());
    assert!(
        !dante
            .log()
            .contains("Packet: VER: 5 CMD: 1 FLAG: 0 ATYP: 1"),
        "an address reached dante: {}",
        dante.log()
    );
    drop(daemon);

    // socks5:// with a refused destination: reset first, then refused at connect().
    let daemon = Daemon::run(
        &dante.url("socks5", None),
        &cgroup,
        &["--include", "127.0.0.3/32", "--sniff-timeout", "0s"],
    );
    let refusing = SocketAddr::from((OTHER_IP, port));
    assert_eq!(probe(&cgroup, refusing), "reset", "{}", daemon.stderr());
    let refused = wait_for(LOG_WAIT, || {
        (probe(&cgroup, refusing) == "refused").then_some(())
    });
    assert!(refused.is_some(), "{}\n{}", daemon.stderr(), dante.log());
}

/// `https://` proxy: squid on `https_port` with a certificate made by the test. With
/// `--proxy-ca` naming it, tunnels go through TLS, by address (the certificate holds
/// 127.0.0.1) or by name (`proxy.test`, from a hosts file); with the system's store instead,
/// the certificate does not verify: a clear line, the client reset, and nothing in plain text
/// reaches squid.
#[test]
fn https_proxies_are_checked_against_their_certificate() {
    let squid = Squid::start_https();
    let web = Origin::http(ORIGIN_IP, "tls body");
    let echo = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("https");
    let port = squid.addr().port();
    let ca = squid.tls_cert();
    let by_address = Daemon::run(
        &format!("https://127.0.0.1:{port}"),
        &cgroup,
        &[
            "--include",
            "127.0.0.2/32",
            "--proxy-ca",
            &ca.display().to_string(),
        ],
    );
    let (body, said) = fetch(&cgroup, &web);
    assert_eq!(body, "tls body", "{said}\n{}", by_address.stderr());
    // Many tunnels at once, each relaying both ways through TLS.
    let counts = transproxy_tests::storm(&cgroup, echo.addr(), 40, 20);
    assert_eq!(counts.get("data").copied().unwrap_or(0), 40, "{counts:?}");
    squid.wait_connects(web.addr(), 1, LOG_WAIT);
    drop(by_address);

    let hosts =
        transproxy_tests::PrivateHosts::new(&[("proxy.test", "127.0.0.1".parse().unwrap())]);
    let (mut cmd, listen) = Daemon::command(
        hosts.command(transproxy_bin()),
        &format!("https://proxy.test:{port}"),
        &cgroup,
    );
    cmd.args(["--include", "127.0.0.2/32", "--proxy-ca"])
        .arg(&ca);
    let by_name = Daemon::spawn(cmd, listen);
    let (body, said) = fetch(&cgroup, &web);
    assert_eq!(body, "tls body", "{said}\n{}", by_name.stderr());
    drop(by_name);

    // A CA that did not sign it (same name, other key: BadSignature): refused the same way.
    let before = squid.all_connects();
    let other = Squid::start_https();
    let wrong_ca = Daemon::run(
        &format!("https://127.0.0.1:{port}"),
        &cgroup,
        &[
            "--include",
            "127.0.0.2/32",
            "--proxy-ca",
            &other.tls_cert().display().to_string(),
        ],
    );
    assert_eq!(probe(&cgroup, web.addr()), "reset");
    let said = wait_for(LOG_WAIT, || {
        wrong_ca
            .stderr()
            .contains("TLS with the proxy failed: invalid peer certificate")
            .then_some(())
    });
    assert!(said.is_some(), "{}", wrong_ca.stderr());
    drop(wrong_ca);

    let untrusted = Daemon::run(
        &format!("https://127.0.0.1:{port}"),
        &cgroup,
        &["--include", "127.0.0.2/32"],
    );
    assert_eq!(probe(&cgroup, web.addr()), "reset");
    let said = wait_for(LOG_WAIT, || {
        let said = untrusted.stderr();
        said.contains("TLS with the proxy failed: invalid peer certificate")
            .then_some(said)
    });
    assert!(said.is_some(), "{}", untrusted.stderr());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(squid.all_connects(), before, "{}", squid.access_log());
}
