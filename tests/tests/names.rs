//! Host names, not addresses: the proxy sees the name the application asked for, sniffed from
//! its first bytes (TLS server name, HTTP Host); NO_PROXY names go direct.
//!
//! squid allows only names under `.test` and never a bare address, as corporate proxies are
//! set. Names resolve from hosts files and curl's `--resolve`: nothing is asked of DNS.

use std::{net::IpAddr, process::Command};

use transproxy_tests::{
    LOG_WAIT, ORIGIN_IP, Origin, Squid, TestCgroup, TlsOrigin, client_bin, run, text,
    transproxy_bin,
};

/// `transproxy exec --proxy PROXY --include 127.0.0.2/32 ARGS -- CMD...`, bounded.
fn exec(proxy: &str, args: &[&str], command: &[&str]) -> std::process::Output {
    transproxy_tests::run_for(
        Command::new(transproxy_bin())
            .args(["exec", "--proxy", proxy, "--include", "127.0.0.2/32"])
            .args(args)
            .arg("--")
            .args(command),
        std::time::Duration::from_secs(30),
    )
}

fn origin_ip() -> IpAddr {
    IpAddr::V4(ORIGIN_IP)
}

/// HTTPS and HTTP through a proxy that allows only names: the tunnels are asked for by the
/// name the client used, and the fetches succeed where a CONNECT to the address is denied.
#[test]
fn https_and_http_are_tunnelled_by_name() {
    let tls = TlsOrigin::start(ORIGIN_IP, "origin.test");
    let web = Origin::http(ORIGIN_IP, "body");
    let squid = Squid::start_names_only(&[("origin.test", origin_ip())]);
    let https = format!("https://origin.test:{}/", tls.addr().port());
    let resolve_tls = format!("origin.test:{}:{}", tls.addr().port(), ORIGIN_IP);
    let out = exec(
        &squid.url(),
        &[],
        &[
            "curl",
            "-sS",
            "-k",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "--resolve",
            &resolve_tls,
            &https,
        ],
    );
    assert!(
        text(&out.stdout).contains("s_server"),
        "{} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let http = format!("http://origin.test:{}/", web.addr().port());
    let resolve_web = format!("origin.test:{}:{}", web.addr().port(), ORIGIN_IP);
    let out = exec(
        &squid.url(),
        &[],
        &[
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "--resolve",
            &resolve_web,
            &http,
        ],
    );
    assert_eq!(text(&out.stdout), "body", "{}", text(&out.stderr));
    let log = squid.access_log();
    for port in [tls.addr().port(), web.addr().port()] {
        assert!(
            log.contains(&format!(" CONNECT origin.test:{port} ")),
            "no CONNECT by name to port {port}: {log}"
        );
    }

    // Without sniffing, the same fetch is denied: the proxy gets the address.
    let out = exec(
        &squid.url(),
        &["--sniff-timeout", "0s"],
        &[
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "--resolve",
            &resolve_web,
            &http,
        ],
    );
    assert_ne!(text(&out.stdout), "body");
    assert!(
        squid.access_log().contains("/403 "),
        "{}",
        squid.access_log()
    );
}

/// A ClientHello cut over two segments, 50 ms apart, is reassembled; garbage first gets the
/// tunnel by address.
#[test]
fn a_client_hello_in_two_writes_and_garbage_first() {
    let echo = Origin::echo(ORIGIN_IP);
    let squid = Squid::start_resolving(&[("split.test", origin_ip())]);
    let cgroup = TestCgroup::new("sniffsplit");
    let daemon =
        transproxy_tests::Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
    let out = run(cgroup.command(client_bin()).args([
        "tls-split",
        &echo.addr().to_string(),
        "split.test",
    ]));
    assert!(
        text(&out.stdout).starts_with("echoed "),
        "{}",
        text(&out.stderr)
    );
    let lines = squid.wait_connects_to(&format!("split.test:{}", echo.addr().port()), 1, LOG_WAIT);
    assert_eq!(lines.len(), 1, "{}", squid.access_log());
    // Not TLS, not HTTP: by address.
    assert_eq!(
        transproxy_tests::probe(&cgroup, echo.addr()),
        "data:ping",
        "{}",
        daemon.stderr()
    );
    assert_eq!(squid.wait_connects(echo.addr(), 1, LOG_WAIT).len(), 1);
}

/// A server that speaks first (the client sends nothing) gets its tunnel after the sniff
/// timeout, by address: the banner arrives within that plus a margin.
#[test]
fn a_server_first_protocol_does_not_hang() {
    let banner = Origin::banner(ORIGIN_IP, "SSH-2.0-transproxy-test");
    let squid = Squid::start(&[]);
    let out = exec(
        &squid.url(),
        &["--sniff-timeout", "100ms"],
        &[
            &client_bin().to_string_lossy(),
            "read-first",
            &banner.addr().to_string(),
        ],
    );
    let said = text(&out.stdout);
    let (line, ms) = said
        .trim()
        .rsplit_once(" after ")
        .unwrap_or_else(|| panic!("{said} {}", text(&out.stderr)));
    assert_eq!(line, "SSH-2.0-transproxy-test");
    let ms: u64 = ms.trim_end_matches(" ms").parse().unwrap();
    assert!((100..1_000).contains(&ms), "the banner took {ms} ms");
    assert_eq!(squid.wait_connects(banner.addr(), 1, LOG_WAIT).len(), 1);
}

/// A name NO_PROXY lists goes direct when it leads to the destination by the daemon's own
/// resolver (here a hosts file of its own): the daemon connects to the destination itself, and
/// the proxy sees nothing of it. A client claiming that name for another address (its SNI, its
/// Host, its own resolver's answer are its word) is tunnelled by that name instead: no NO_PROXY
/// name sends an address of the client's choosing around the proxy.
#[test]
fn no_proxy_names_go_direct_only_where_they_lead() {
    let web = Origin::http(ORIGIN_IP, "direct body");
    let elsewhere = Origin::http(transproxy_tests::OTHER_IP, "elsewhere body");
    let squid = Squid::start_names_only(&[("direct.test", IpAddr::V4(transproxy_tests::OTHER_IP))]);
    // The daemon's own view: direct.test is 127.0.0.2.
    let hosts = transproxy_tests::PrivateHosts::new(&[("direct.test", origin_ip())]);
    let fetch = |origin: &Origin| {
        let port = origin.addr().port();
        let resolve = format!("direct.test:{port}:{}", origin.addr().ip());
        let mut cmd = hosts.command(transproxy_bin());
        cmd.args([
            "exec",
            "--proxy",
            &squid.url(),
            "--include",
            "127.0.0.2/32",
            "--include",
            "127.0.0.3/32",
            "--",
        ])
        .args([
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "--resolve",
            &resolve,
            &format!("http://direct.test:{port}/"),
        ])
        .env("NO_PROXY", ".direct.test");
        transproxy_tests::run_for(&mut cmd, std::time::Duration::from_secs(30))
    };
    let out = fetch(&web);
    assert_eq!(text(&out.stdout), "direct body", "{}", text(&out.stderr));
    assert_eq!(web.hits(), 1);
    squid.assert_connects(0);

    let out = fetch(&elsewhere);
    assert_eq!(text(&out.stdout), "elsewhere body", "{}", text(&out.stderr));
    let port = elsewhere.addr().port();
    assert_eq!(
        squid
            .wait_connects_to(&format!("direct.test:{port}"), 1, LOG_WAIT)
            .len(),
        1,
        "{}",
        squid.access_log()
    );
}

/// A name the proxy reports refused does not make its address refused: other names served at
/// the same address (virtual hosts, a CDN) still get their tunnels. (Tunnels asked for by
/// address keep "refused stays refused", see proxy_failures.rs.)
#[test]
fn a_refused_name_does_not_block_other_names_at_its_address() {
    let web = Origin::http(ORIGIN_IP, "good body");
    let port = web.addr().port();
    // squid sends refused.test to 127.0.0.3, where nothing listens on that port.
    let squid = Squid::start_names_only(&[
        ("refused.test", IpAddr::V4(transproxy_tests::OTHER_IP)),
        ("good.test", origin_ip()),
    ]);
    let cgroup = TestCgroup::new("namerefused");
    let daemon = transproxy_tests::Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--refused-ttl", "60s"],
    );
    let fetch = |name: &str| {
        let resolve = format!("{name}:{port}:{ORIGIN_IP}");
        run(cgroup.command("curl").args([
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "--resolve",
            &resolve,
            &format!("http://{name}:{port}/"),
        ]))
    };
    assert!(!fetch("refused.test").status.success());
    let refused = transproxy_tests::wait_for(LOG_WAIT, || {
        daemon.stderr().contains("refused.test").then_some(())
    });
    assert!(refused.is_some(), "{}", daemon.stderr());
    let out = fetch("good.test");
    assert_eq!(
        text(&out.stdout),
        "good body",
        "{}\n{}",
        text(&out.stderr),
        daemon.stderr()
    );
}
