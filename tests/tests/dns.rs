//! DNS captured per cgroup, in the kernel (`--dns forward|fake`): no resolver setting changed,
//! no iptables.
//!
//! Network rule: no DNS leaves loopback. Every program that resolves runs in a mount namespace
//! of its own whose resolv.conf names only a loopback resolver ([`PrivateResolv`]): the test's
//! own [`TestResolver`], or nothing. squid resolves `.test` names from its hosts file only.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::{Command, Output},
    time::Duration,
};

use transproxy_tests::{
    Daemon, LOG_WAIT, ORIGIN_IP, Origin, PrivateResolv, Squid, TestCgroup, TestResolver,
    client_bin, run, run_for, text, transproxy_bin, wait_for,
};

fn origin_ip() -> IpAddr {
    IpAddr::V4(ORIGIN_IP)
}

/// A loopback address for each test's resolver (nothing else listens on port 53 there).
fn resolver_ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// Runs `program args` in `cgroup` behind `resolv`, bounded.
fn resolving(resolv: &PrivateResolv, cgroup: &TestCgroup, program: &str, args: &[&str]) -> Output {
    run_for(
        resolv.command(cgroup, program).args(args),
        Duration::from_secs(20),
    )
}

/// `curl -sS URL` (no proxy settings), bounded, through `resolv`.
fn curl(resolv: &PrivateResolv, cgroup: &TestCgroup, extra: &[&str], url: &str) -> Output {
    let mut args = vec!["-sS", "--noproxy", "*", "--max-time", "10"];
    args.extend(extra);
    args.push(url);
    resolving(resolv, cgroup, "curl", &args)
}

/// The addresses `getent KIND name` printed, each once, in order.
fn getent(resolv: &PrivateResolv, cgroup: &TestCgroup, kind: &str, name: &str) -> Vec<IpAddr> {
    let out = resolving(resolv, cgroup, "getent", &[kind, name]);
    let mut addresses: Vec<IpAddr> = Vec::new();
    for address in text(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next()?.parse().ok())
    {
        if !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    addresses
}

/// A DNS query for `origin.test` (A, IN, recursion desired) with id `id`, as hex.
fn query_hex(id: &str) -> String {
    format!(
        "{id}01000001000000000000066f726967696e047465737400{}",
        "00010001"
    )
}

/// `transproxy status --json`'s entry for the daemon `pid`.
fn status_of(pid: i32) -> serde_json::Value {
    let out = run(Command::new(transproxy_bin()).args(["status", "--json"]));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    all["daemons"]
        .as_array()
        .and_then(|daemons| daemons.iter().find(|d| d["pid"] == pid).cloned())
        .unwrap_or_else(|| panic!("daemon {pid} not in status: {all}"))
}

/// With `--dns fake` a name resolves to an address of the pool, and a connect to it is
/// tunnelled as `CONNECT name:port`: the fetch works through a proxy that allows only names,
/// with no outside resolver at all (the cgroup's resolv.conf names a loopback address where
/// nothing listens). Over UDP and TCP, A and AAAA.
#[test]
fn fake_dns_gets_names_through_a_names_only_proxy() {
    let web = Origin::http(ORIGIN_IP, "fake body");
    let port = web.addr().port().to_string();
    let squid = Squid::start_names_only(&[("origin.test", origin_ip())]);
    let cgroup = TestCgroup::new("dnsfake");
    // Sniffing off: the name can only come from DNS.
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &[
            "--dns",
            "fake",
            "--sniff-timeout",
            "0s",
            "--include",
            "127.0.0.2/32",
        ],
    );
    assert!(
        daemon
            .ready_line()
            .contains("fake addresses from 198.18.0.0/15"),
        "{}",
        daemon.ready_line()
    );
    // Nothing listens on 127.0.0.36:53: only the daemon answers.
    let resolv = PrivateResolv::new(resolver_ip(36), &[]);

    let v4 = getent(&resolv, &cgroup, "ahostsv4", "origin.test");
    assert!(
        !v4.is_empty()
            && v4
                .iter()
                .all(|ip| ip.to_string().starts_with("198.18.")
                    || ip.to_string().starts_with("198.19.")),
        "{v4:?}\n{}",
        daemon.stderr()
    );
    let v6 = getent(&resolv, &cgroup, "ahostsv6", "origin.test");
    assert!(
        !v6.is_empty() && v6.iter().all(|ip| ip.to_string().starts_with("fc00:")),
        "{v6:?}"
    );
    // The name keeps its address.
    assert_eq!(
        getent(&resolv, &cgroup, "ahostsv4", "origin.test")[0],
        v4[0]
    );

    for family in ["-4", "-6"] {
        let url = format!("http://origin.test:{port}/");
        let out = curl(&resolv, &cgroup, &[family], &url);
        assert_eq!(
            text(&out.stdout),
            "fake body",
            "{family}: {}\n{}",
            text(&out.stderr),
            daemon.stderr()
        );
    }
    let lines = squid.wait_connects_to(&format!("origin.test:{port}"), 2, LOG_WAIT);
    assert_eq!(lines.len(), 2, "{}", squid.access_log());
    assert_eq!(web.hits(), 2);

    // getpeername shows the fake address the application connected to.
    let fake = std::net::SocketAddr::new(v4[0], web.addr().port());
    let out = run(cgroup
        .command(client_bin())
        .args(["peer", &fake.to_string()]));
    assert_eq!(
        text(&out.stdout).trim(),
        fake.to_string(),
        "{}",
        text(&out.stderr)
    );

    // UDP to a fake address leads nowhere and would carry a QUIC server name out on the
    // default route: refused, connected or not.
    let quic = std::net::SocketAddr::new(v4[0], 443);
    let out = run(cgroup
        .command(client_bin())
        .args(["udp", &quic.to_string()]));
    let said = text(&out.stdout);
    assert!(
        said.contains("sendto:error") && said.contains("connected:error"),
        "{said}"
    );

    // A reload keeps every name's address.
    daemon.signal(libc::SIGHUP);
    assert!(
        wait_for(LOG_WAIT, || daemon
            .stderr()
            .contains("SIGHUP")
            .then_some(()))
        .is_some(),
        "{}",
        daemon.stderr()
    );
    assert_eq!(getent(&resolv, &cgroup, "ahostsv4", "origin.test"), v4[..1]);

    // DNS over TCP (glibc `options use-vc`) is captured too.
    let tcp = PrivateResolv::new(resolver_ip(36), &["use-vc"]);
    assert_eq!(
        getent(&tcp, &cgroup, "ahostsv4", "origin.test").first(),
        v4.first(),
        "{}",
        daemon.stderr()
    );

    // The application sees the resolver it asked: the answer's source, and getpeername of a
    // connected socket.
    let query = query_hex("1234");
    let out = resolving(
        &resolv,
        &cgroup,
        client_bin().to_str().unwrap(),
        &["dns-raw", "127.0.0.36:53", &query],
    );
    let said = text(&out.stdout);
    assert!(
        said.contains("peer:127.0.0.36:53") && said.contains("from:127.0.0.36:53 answer:1234"),
        "{said}{}",
        text(&out.stderr)
    );

    // Status tells the mode and the names.
    let status = status_of(daemon.pid());
    let dns = status["dns"].as_str().unwrap_or_default();
    // One name, two addresses: IPv4 and IPv6.
    assert!(dns.starts_with("fake, 2 addresses"), "{status}");
    assert_eq!(
        status["dns_listeners"].as_array().map(Vec::len),
        Some(4),
        "{status}"
    );
}

/// NO_PROXY names (and `--dns-direct` ones) get real answers with `--dns fake`, from the
/// resolver the application asked, and their connections go direct.
#[test]
fn fake_dns_leaves_no_proxy_names_real_and_direct() {
    let web = Origin::http(ORIGIN_IP, "direct body");
    let port = web.addr().port();
    let resolver = TestResolver::start(
        resolver_ip(37),
        &[("direct.test", origin_ip()), ("other.test", origin_ip())],
    );
    let squid = Squid::start_names_only(&[]);
    let cgroup = TestCgroup::new("dnsdirect");
    // The daemon checks NO_PROXY names with its own resolver: a hosts file of its own.
    let hosts = transproxy_tests::PrivateHosts::new(&[("direct.test", origin_ip())]);
    let (mut cmd, listen) = Daemon::command(hosts.command(transproxy_bin()), &squid.url(), &cgroup);
    cmd.args(["--dns", "fake", "--include", "127.0.0.2/32"])
        .args(["--dns-direct", "other.test"])
        .env("NO_PROXY", ".direct.test");
    let daemon = Daemon::spawn(cmd, listen);
    let resolv = PrivateResolv::new(resolver.ip(), &[]);

    assert_eq!(
        getent(&resolv, &cgroup, "ahostsv4", "direct.test"),
        [origin_ip()],
        "{}",
        daemon.stderr()
    );
    assert_eq!(
        getent(&resolv, &cgroup, "ahostsv4", "other.test"),
        [origin_ip()]
    );
    assert!(resolver.was_asked("direct.test") && resolver.was_asked("other.test"));

    let out = curl(
        &resolv,
        &cgroup,
        &[],
        &format!("http://direct.test:{port}/"),
    );
    assert_eq!(text(&out.stdout), "direct body", "{}", text(&out.stderr));
    assert_eq!(web.hits(), 1);
    squid.assert_no_connect(web.addr());
    assert_eq!(squid.all_connects(), 0, "{}", squid.access_log());
    // Other questions (MX here) go to the resolver too; a name it does not know is NXDOMAIN.
    let out = resolving(
        &resolv,
        &cgroup,
        "getent",
        &["hosts", "unknown.direct.test"],
    );
    assert!(!out.status.success());
    drop(daemon);
}

/// With `--dns forward` (the default) queries reach the resolver the application asked, and
/// the answers name the tunnels: a server-first client, which sends no bytes to sniff, is
/// tunnelled as `CONNECT name:port` through a proxy that allows only names.
#[test]
fn forward_dns_names_tunnels_that_say_no_name() {
    let banner = Origin::banner(ORIGIN_IP, "SSH-2.0-test");
    let port = banner.addr().port().to_string();
    let resolver = TestResolver::start(resolver_ip(38), &[("banner.test", origin_ip())]);
    let squid = Squid::start_names_only(&[("banner.test", origin_ip())]);
    let cgroup = TestCgroup::new("dnsforward");
    let log = tempfile::NamedTempFile::new().unwrap();
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &[
            "--include",
            "127.0.0.2/32",
            "--access-log",
            log.path().to_str().unwrap(),
        ],
    );
    assert!(
        daemon.ready_line().contains("DNS forwarded"),
        "{}",
        daemon.ready_line()
    );
    let resolv = PrivateResolv::new(resolver.ip(), &[]);
    let out = resolving(
        &resolv,
        &cgroup,
        client_bin().to_str().unwrap(),
        &["read-first-name", "banner.test", &port],
    );
    assert!(
        text(&out.stdout).starts_with("SSH-2.0-test from 127.0.0.2:"),
        "{}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        daemon.stderr()
    );
    assert!(
        resolver.was_asked("banner.test"),
        "{:?}",
        resolver.questions()
    );
    let lines = squid.wait_connects_to(&format!("banner.test:{port}"), 1, LOG_WAIT);
    assert_eq!(lines.len(), 1, "{}", squid.access_log());
    // The access log names the tunnel by its DNS name.
    let logged = wait_for(LOG_WAIT, || {
        std::fs::read_to_string(log.path())
            .ok()
            .filter(|l| l.contains("\"dns_name\":\"banner.test\""))
    });
    assert!(
        logged.is_some(),
        "{}",
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );

    // Over TCP the same.
    let tcp = PrivateResolv::new(resolver.ip(), &["use-vc"]);
    assert_eq!(
        getent(&tcp, &cgroup, "ahostsv4", "banner.test"),
        [origin_ip()]
    );
    assert!(
        resolver
            .questions()
            .iter()
            .any(|(name, _, transport)| name == "banner.test" && *transport == "tcp"),
        "{:?}",
        resolver.questions()
    );
}

/// The responder is not an open resolver: a query sent to it directly, not captured by the
/// kernel, is refused (a local user cannot use the daemon to reach a resolver, nor teach it
/// names). Malformed queries from a captured socket get FORMERR and the daemon keeps serving.
#[test]
fn queries_not_captured_are_refused_and_garbage_is_answered_formerr() {
    let resolver = TestResolver::start(resolver_ip(39), &[("origin.test", origin_ip())]);
    let squid = Squid::start(&[]);
    let cgroup = TestCgroup::new("dnsrefused");
    let daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
    let status = status_of(daemon.pid());
    let udp = status["dns_listeners"]
        .as_array()
        .and_then(|l| l.iter().find_map(|a| a.as_str()?.strip_suffix("/udp")))
        .filter(|a| a.starts_with("127.0.0.1:"))
        .expect("the DNS socket in status")
        .to_owned();
    // From outside the cgroup, straight to the responder: REFUSED (rcode 5), same id.
    let query = query_hex("abcd");
    let out = run(Command::new(client_bin()).args(["dns-raw", &udp, &query]));
    let said = text(&out.stdout);
    let answer = said
        .split("answer:")
        .nth(1)
        .map(str::trim)
        .unwrap_or_else(|| panic!("no answer: {said}"));
    assert!(answer.starts_with("abcd"), "{said}");
    assert_eq!(&answer[7..8], "5", "not REFUSED: {said}");
    assert!(!resolver.was_asked("origin.test"));

    // Garbage from a captured socket: FORMERR (rcode 1) for a header with nonsense after it.
    let resolv = PrivateResolv::new(resolver.ip(), &[]);
    let out = resolving(
        &resolv,
        &cgroup,
        client_bin().to_str().unwrap(),
        &["dns-raw", "127.0.0.39:53", "beef0100000100000000000007ff"],
    );
    let said = text(&out.stdout);
    let answer = said
        .split("answer:")
        .nth(1)
        .map(str::trim)
        .unwrap_or_default();
    assert!(answer.starts_with("beef") && &answer[7..8] == "1", "{said}");
    // Too short for a header: no answer at all.
    let out = resolving(
        &resolv,
        &cgroup,
        client_bin().to_str().unwrap(),
        &["dns-raw", "127.0.0.39:53", "beef01"],
    );
    assert!(
        text(&out.stdout).contains("timeout"),
        "{}",
        text(&out.stdout)
    );
    // Still serving.
    assert_eq!(
        getent(&resolv, &cgroup, "ahostsv4", "origin.test"),
        [origin_ip()]
    );
    assert!(
        daemon.stderr().lines().all(|l| !l.contains("panicked")),
        "{}",
        daemon.stderr()
    );
}

/// The kill switch covers DNS: with the daemon gone, the cgroup's queries fail at once in the
/// kernel instead of reaching the resolver around the daemon.
#[test]
fn fail_closed_refuses_dns_while_the_daemon_is_gone() {
    let resolver = TestResolver::start(resolver_ip(40), &[("origin.test", origin_ip())]);
    let squid = Squid::start(&[]);
    let cgroup = TestCgroup::new("dnsclosed");
    let _detach = transproxy_tests::Detach(&cgroup);
    let mut daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--fail-closed"],
    );
    let resolv = PrivateResolv::new(resolver.ip(), &[]);
    assert_eq!(
        getent(&resolv, &cgroup, "ahostsv4", "origin.test"),
        [origin_ip()]
    );
    let asked = resolver.questions().len();
    daemon.signal(libc::SIGKILL);
    assert!(daemon.wait_exit(Duration::from_secs(5)).is_some());
    for options in [&[][..], &["use-vc"][..]] {
        let resolv = PrivateResolv::new(resolver.ip(), options);
        let out = resolving(&resolv, &cgroup, "getent", &["ahostsv4", "origin.test"]);
        assert!(!out.status.success(), "{options:?}: {}", text(&out.stdout));
    }
    assert_eq!(
        resolver.questions().len(),
        asked,
        "{:?}",
        resolver.questions()
    );
}

/// A query in flight when a fail-closed daemon dies cannot be answered by whoever binds the
/// daemon's old DNS port: the kernel makes answers come from the resolver only while the
/// daemon's responder is alive, so a forged answer shows its true source and is dropped by
/// resolvers that check it.
#[test]
fn a_dead_daemons_dns_port_cannot_answer_for_the_resolver() {
    use std::io::BufRead as _;
    // A resolver that never answers: the query stays in flight.
    let silent = std::net::UdpSocket::bind((resolver_ip(41), 53)).unwrap();
    let squid = Squid::start(&[]);
    let cgroup = TestCgroup::new("dnsforge");
    let _detach = transproxy_tests::Detach(&cgroup);
    let mut daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &[
            "--include",
            "127.0.0.2/32",
            "--fail-closed",
            "--listen6",
            "off",
        ],
    );
    let port = status_of(daemon.pid())["dns_listeners"]
        .as_array()
        .and_then(|l| l.iter().find_map(|a| a.as_str()?.strip_suffix("/udp")))
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .expect("the DNS socket in status");
    let mut client = cgroup
        .command(client_bin())
        .args(["dns-raw", "127.0.0.41:53", &query_hex("4242"), "3000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(client.stdout.take().unwrap()).lines();
    let peer = lines.next().unwrap().unwrap();
    assert_eq!(peer, "peer:127.0.0.41:53");
    let local: u16 = lines
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("local:")
        .unwrap()
        .parse()
        .unwrap();
    daemon.signal(libc::SIGKILL);
    assert!(daemon.wait_exit(Duration::from_secs(5)).is_some());
    // The attacker takes the port and answers with the query's id.
    let squatter = wait_for(Duration::from_secs(2), || {
        std::net::UdpSocket::bind(port).ok()
    })
    .expect("the dead daemon's port");
    let forged = format!("{}8180{}", "4242", &query_hex("")[4..]);
    let forged: Vec<u8> = (0..forged.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&forged[i..i + 2], 16).unwrap())
        .collect();
    squatter.send_to(&forged, ("127.0.0.1", local)).unwrap();
    let said = lines.next().unwrap().unwrap();
    let _ = client.wait();
    assert!(said.starts_with(&format!("from:{port} ")), "{said}");
    drop(silent);
}

/// "Refused stays refused" with fake addresses: each stands for one name, so a name the proxy
/// reports refused is refused at connect() from then on, and other names are not.
#[test]
fn a_refused_fake_name_is_refused_at_connect_and_others_are_not() {
    let web = Origin::http(ORIGIN_IP, "good body");
    let port = web.addr().port();
    let squid = Squid::start_names_only(&[
        ("refused.test", IpAddr::V4(transproxy_tests::OTHER_IP)),
        ("good.test", origin_ip()),
    ]);
    let cgroup = TestCgroup::new("dnsfakerefused");
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--dns", "fake", "--refused-ttl", "60s", "--listen6", "off"],
    );
    let resolv = PrivateResolv::new(resolver_ip(42), &[]);
    let fetch = |name: &str| curl(&resolv, &cgroup, &["-4"], &format!("http://{name}:{port}/"));
    // The tunnel opened and the proxy refused: a reset (curl: "Recv failure", exit 56).
    let first = fetch("refused.test");
    assert_eq!(first.status.code(), Some(56), "{}", text(&first.stderr));
    let logged = wait_for(LOG_WAIT, || {
        daemon
            .stderr()
            .contains("(refused.test): proxy replied")
            .then_some(())
    });
    assert!(logged.is_some(), "{}", daemon.stderr());
    // Now refused in connect() itself (curl: "Couldn't connect", exit 7).
    let second = fetch("refused.test");
    assert_eq!(second.status.code(), Some(7), "{}", text(&second.stderr));
    let good = fetch("good.test");
    assert_eq!(text(&good.stdout), "good body", "{}", text(&good.stderr));
}

/// Names are learned per process: a process that asks its own resolver for a name it makes
/// point at some address cannot rename another process's tunnels to that address (it would
/// send them to a host of its choosing); the other process's tunnel goes by address.
#[test]
fn a_process_cannot_rename_anothers_tunnels() {
    let banner = Origin::banner(ORIGIN_IP, "LEGIT-BANNER");
    let port = banner.addr().port().to_string();
    // The attacker's resolver says poison.test is 127.0.0.2; squid would send poison.test to
    // 127.0.0.3.
    let resolver = TestResolver::start(resolver_ip(43), &[("poison.test", origin_ip())]);
    let squid = Squid::start_resolving(&[("poison.test", IpAddr::V4(transproxy_tests::OTHER_IP))]);
    let cgroup = TestCgroup::new("dnspoison");
    let daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
    let resolv = PrivateResolv::new(resolver.ip(), &[]);
    assert_eq!(
        getent(&resolv, &cgroup, "ahostsv4", "poison.test"),
        [origin_ip()]
    );
    let out = run(cgroup
        .command(client_bin())
        .args(["read-first", &banner.addr().to_string()]));
    assert!(
        text(&out.stdout).starts_with("LEGIT-BANNER"),
        "{}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        daemon.stderr()
    );
    assert_eq!(squid.wait_connects(banner.addr(), 1, LOG_WAIT).len(), 1);
    assert!(
        !squid
            .access_log()
            .contains(&format!(" CONNECT poison.test:{port} ")),
        "{}",
        squid.access_log()
    );
}

/// IPv6 resolvers are captured even without an IPv6 tunnel listener (`--listen6 off`): DNS is
/// captured whether or not IPv6 is tunnelled. Nothing listens on [::1]:53 here, so the daemon's
/// SERVFAIL is the only possible answer, and it comes "from" [::1]:53.
#[test]
fn ipv6_dns_is_captured_without_an_ipv6_tunnel_listener() {
    let squid = Squid::start(&[]);
    let cgroup = TestCgroup::new("dnsv6");
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--listen6", "off"],
    );
    let out = run(cgroup
        .command(client_bin())
        .args(["dns-raw", "[::1]:53", &query_hex("6666")]));
    let said = text(&out.stdout);
    let answer = said
        .split("answer:")
        .nth(1)
        .map(str::trim)
        .unwrap_or_default();
    assert!(
        said.contains("from:[::1]:53") && answer.starts_with("6666") && &answer[7..8] == "2",
        "{said}\n{}",
        daemon.stderr()
    );
}
