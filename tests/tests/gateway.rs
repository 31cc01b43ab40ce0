//! Gateway mode: other hosts' TCP, entering on the gateway's LAN interface, tunnelled through
//! squid on the outside host; everything else forwarded as a router does. Three network
//! namespaces made by the test (`gateway_net.rs`); every address lives only inside them.

use std::{net::SocketAddr, time::Duration};

use transproxy_tests::{
    Daemon, LOG_WAIT, Squid,
    gateway_net::{GatewayNet, NetnsChild},
    text, transproxy_bin, wait_for,
};

/// The daemon on the gateway's LAN interface, through squid at 10.0.2.2:3128. It intercepts
/// the origins 10.99.0.10 and fd00:99::10, the outside segment 10.0.2.0/24 (so that the
/// outside host's address is one the rules intercept) and the LAN 10.0.1.0/24 (so that the
/// gateway's own address is one too): what must still not be caught is not caught because
/// gateway mode knows better, not because the rules left it out.
fn gateway(net: &GatewayNet) -> Daemon {
    gateway_with(net, &[])
}

/// [`gateway`] with more flags.
fn gateway_with(net: &GatewayNet, extra: &[&str]) -> Daemon {
    let listen: SocketAddr = "127.0.0.1:15001".parse().unwrap();
    let mut cmd = net.enter(&net.gw(), transproxy_bin());
    cmd.args([
        "gateway",
        "--interface",
        "lan0",
        "--proxy",
        "http://10.0.2.2:3128",
        "--listen",
        &listen.to_string(),
        "--include",
        "10.99.0.10/32",
        "--include",
        "fd00:99::10/128",
        "--include",
        "10.0.2.0/24",
        "--include",
        "10.0.1.0/24",
    ]);
    cmd.args(extra);
    Daemon::spawn(cmd, listen)
}

fn squid(net: &GatewayNet) -> Squid {
    Squid::start_in_netns(
        &net.out(),
        "10.0.2.2:3128".parse().unwrap(),
        &["10.0.2.0/24", "fd00:2::/64"],
    )
}

/// The origins on the outside host: echo servers (intercepted) and one that says who
/// connected (not intercepted).
fn origins(net: &GatewayNet) -> Vec<NetnsChild> {
    vec![
        net.server(&net.out(), "10.99.0.10:8080".parse().unwrap(), "echo"),
        net.server(&net.out(), "[fd00:99::10]:8080".parse().unwrap(), "echo"),
        net.server(&net.out(), "10.99.0.20:8080".parse().unwrap(), "peer"),
    ]
}

/// What gateway mode leaves on the host: programs on lan0, the fwmark rule, the local
/// routes, send_redirects.
fn leftovers(net: &GatewayNet) -> Vec<String> {
    let mut left = Vec::new();
    if !net.gateway_programs().trim().is_empty() {
        left.push(format!("programs: {}", net.gateway_programs()));
    }
    for family in ["-4", "-6"] {
        let rules = net.gw_ip(&[family, "rule"]);
        if rules.contains("0x10000") {
            left.push(format!("rule {family}: {rules}"));
        }
        let routes = net.gw_ip(&[family, "route", "show", "table", "84"]);
        if !routes.trim().is_empty() {
            left.push(format!("routes {family} in table 84: {routes}"));
        }
    }
    for name in ["all", "lan0"] {
        let value = net.gw_sysctl(&format!("net.ipv4.conf.{name}.send_redirects"));
        if value != "1" {
            left.push(format!("send_redirects {name} = {value}"));
        }
    }
    left
}

/// Waits until nothing is left (a program goes once the kernel has freed its last link).
fn assert_nothing_left(net: &GatewayNet, log: &str) {
    let clean = wait_for(LOG_WAIT, || leftovers(net).is_empty().then_some(()));
    assert!(clean.is_some(), "left: {:?}\n{log}", leftovers(net));
}

#[test]
fn lan_clients_are_tunnelled_and_everything_else_is_forwarded() {
    let net = GatewayNet::new();
    let squid = squid(&net);
    let _origins = origins(&net);
    // A server on the gateway itself, and one in the LAN that the outside connects to.
    let _own = net.server(&net.gw(), "10.0.1.1:9090".parse().unwrap(), "echo");
    let _lan_server = net.server(&net.cli(), "10.0.1.2:9443".parse().unwrap(), "echo");
    let mut daemon = gateway(&net);
    assert!(
        daemon.ready_line().contains("gateway on lan0"),
        "{}",
        daemon.ready_line()
    );

    // Intercepted, IPv4 and IPv6: through squid, whose log shows the CONNECT.
    for origin in ["10.99.0.10:8080", "[fd00:99::10]:8080"] {
        assert_eq!(
            net.client(&["probe", origin]),
            "data:ping",
            "{}",
            daemon.stderr()
        );
        let dst: SocketAddr = origin.parse().unwrap();
        assert_eq!(
            squid.wait_connects(dst, 1, LOG_WAIT).len(),
            1,
            "{}",
            squid.access_log()
        );
    }
    // Not intercepted: forwarded, the origin sees the client's own address.
    let seen = net.client(&["read-first", "10.99.0.20:8080"]);
    assert!(seen.starts_with("10.0.1.2 "), "{seen}");
    // The gateway's own service (its address is in an included network): reached, not
    // tunnelled.
    assert_eq!(net.client(&["probe", "10.0.1.1:9090"]), "data:ping");
    // A connection from the outside into the LAN: its return traffic (to 10.0.2.2, which the
    // rules intercept) enters on lan0 but starts nothing.
    assert_eq!(net.outside_client(&["probe", "10.0.1.2:9443"]), "data:ping");
    let connects = squid.access_log().matches(" CONNECT ").count();
    assert_eq!(connects, 2, "{}", squid.access_log());

    // ICMP redirects are off on lan0 and `all` while it runs.
    for name in ["all", "lan0"] {
        assert_eq!(
            net.gw_sysctl(&format!("net.ipv4.conf.{name}.send_redirects")),
            "0"
        );
    }
    assert!(!net.gateway_programs().trim().is_empty());

    daemon.signal(libc::SIGTERM);
    let exit = daemon.wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}: {}",
        daemon.stderr()
    );
    assert_nothing_left(&net, &daemon.stderr());
    // And it is so: an intercepted destination is forwarded now, not tunnelled.
    assert_eq!(net.client(&["probe", "10.99.0.10:8080"]), "data:ping");
    let dst: SocketAddr = "10.99.0.10:8080".parse().unwrap();
    assert_eq!(squid.connect_lines(dst).len(), 1, "{}", squid.access_log());
}

/// Killed, the daemon's programs go with it (fail-open: intercepted destinations are
/// forwarded); its rule, routes and sysctls stay until the next start, which takes them over
/// and removes them at its stop.
#[test]
fn after_sigkill_traffic_is_forwarded_and_the_next_start_cleans_up() {
    let net = GatewayNet::new();
    let squid = squid(&net);
    let _origins = origins(&net);
    let mut daemon = gateway(&net);
    assert_eq!(net.client(&["probe", "10.99.0.10:8080"]), "data:ping");
    daemon.signal(libc::SIGKILL);
    assert!(daemon.wait_exit(LOG_WAIT).is_some());
    let gone = wait_for(LOG_WAIT, || {
        net.gateway_programs().trim().is_empty().then_some(())
    });
    assert!(gone.is_some(), "{}", net.gateway_programs());
    assert_eq!(net.client(&["probe", "10.99.0.10:8080"]), "data:ping");
    assert_eq!(
        squid
            .wait_connects("10.99.0.10:8080".parse().unwrap(), 1, LOG_WAIT)
            .len(),
        1
    );
    assert!(
        !leftovers(&net).is_empty(),
        "a killed daemon undoes nothing"
    );

    // `detach --gateway` undoes it by hand; a new start would too.
    let detached = transproxy_tests::run(net.exec(&net.gw(), transproxy_bin()).args([
        "detach",
        "--gateway",
        "lan0",
    ]));
    assert!(detached.status.success(), "{}", text(&detached.stderr));
    assert_nothing_left(&net, "");
    // The next start after a kill, with something left again: it takes over cleanly.
    let mut killed = gateway(&net);
    killed.signal(libc::SIGKILL);
    assert!(killed.wait_exit(LOG_WAIT).is_some());
    let mut again = gateway(&net);
    let rules = net.gw_ip(&["-4", "rule"]);
    assert_eq!(rules.matches("fwmark 0x10000").count(), 1, "{rules}");
    assert_eq!(net.client(&["probe", "10.99.0.10:8080"]), "data:ping");
    again.signal(libc::SIGTERM);
    assert!(again.wait_exit(Duration::from_secs(10)).is_some());
    assert_nothing_left(&net, &again.stderr());
}

/// 1,000 concurrent intercepted connections from the LAN, each checking every echoed byte.
#[test]
fn a_thousand_concurrent_lan_connections_lose_nothing() {
    let net = GatewayNet::new();
    let squid = squid(&net);
    let _origins = origins(&net);
    // The interface from the config file this time (`gateway.interface`).
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "proxy = \"http://10.0.2.2:3128\"\ninclude = [\"10.99.0.10/32\"]\n\n[gateway]\ninterface = \"lan0\"\n",
    )
    .unwrap();
    let listen: SocketAddr = "127.0.0.1:15001".parse().unwrap();
    let mut cmd = net.enter(&net.gw(), transproxy_bin());
    cmd.args(["gateway", "--listen", &listen.to_string(), "--config"])
        .arg(config.path());
    let daemon = Daemon::spawn(cmd, listen);
    assert!(
        daemon.ready_line().contains("gateway on lan0"),
        "{}",
        daemon.ready_line()
    );
    let out = transproxy_tests::run(net.exec(&net.cli(), transproxy_tests::client_bin()).args([
        "load",
        "10.99.0.10:8080",
        "1000",
        "65536",
    ]));
    assert_eq!(
        text(&out.stdout).trim(),
        "ok 1000",
        "{}\ndaemon:\n{}",
        text(&out.stderr),
        daemon.stderr()
    );
    let dst: SocketAddr = "10.99.0.10:8080".parse().unwrap();
    assert_eq!(
        squid
            .wait_connects(dst, 1000, Duration::from_secs(30))
            .len(),
        1000
    );
    drop(daemon);
}

/// ICMP redirects: a client's UDP packet to a network the gateway routes back out of the LAN
/// interface makes a router send a redirect (which would let the client go around it). Not
/// while the daemon runs; again once it stopped and put send_redirects back.
#[test]
fn no_icmp_redirect_leaves_the_gateway_while_it_runs() {
    let net = GatewayNet::new();
    let _squid = squid(&net);
    let send = || {
        let said = net.client(&["udp", "10.0.3.5:9"]);
        assert!(said.contains("sendto:ok"), "{said}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let before = net.gw_redirects_sent();
    send();
    let without = net.gw_redirects_sent();
    assert!(
        without > before,
        "the set-up makes no redirect: the test would prove nothing"
    );

    let mut daemon = gateway(&net);
    std::thread::sleep(Duration::from_secs(1));
    send();
    assert_eq!(
        net.gw_redirects_sent(),
        without,
        "a redirect left while the gateway ran"
    );

    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(10)).is_some());
    std::thread::sleep(Duration::from_secs(1));
    send();
    assert!(
        net.gw_redirects_sent() > without,
        "send_redirects was not put back"
    );
}

/// The kill switch: killed, the daemon's pinned programs drop intercepted SYNs from the LAN
/// (the client's connect times out) while the rest is still forwarded; `detach --gateway`
/// removes everything, and the destination is reached directly again.
#[test]
fn with_the_kill_switch_intercepted_syns_are_dropped_while_no_daemon_runs() {
    let net = GatewayNet::new();
    let squid = squid(&net);
    let _origins = origins(&net);
    let _pins = DetachGateway(&net);
    let mut daemon = gateway_with(&net, &["--fail-closed"]);
    assert_eq!(net.client(&["probe", "10.99.0.10:8080"]), "data:ping");
    daemon.signal(libc::SIGKILL);
    assert!(daemon.wait_exit(LOG_WAIT).is_some());

    assert_eq!(net.client(&["probe", "10.99.0.10:8080"]), "timeout");
    let seen = net.client(&["read-first", "10.99.0.20:8080"]);
    assert!(
        seen.starts_with("10.0.1.2 "),
        "not intercepted, still forwarded: {seen}"
    );
    let dst: SocketAddr = "10.99.0.10:8080".parse().unwrap();
    assert_eq!(squid.connect_lines(dst).len(), 1, "{}", squid.access_log());

    let detached = transproxy_tests::run(net.enter(&net.gw(), transproxy_bin()).args([
        "detach",
        "--gateway",
        "lan0",
    ]));
    assert!(detached.status.success(), "{}", text(&detached.stderr));
    assert!(
        text(&detached.stdout).contains("removed the kill switch"),
        "{}",
        text(&detached.stdout)
    );
    assert_nothing_left(&net, "");
    assert_eq!(net.client(&["probe", "10.99.0.10:8080"]), "data:ping");
    assert_eq!(squid.connect_lines(dst).len(), 1);
}

/// Removes the gateway's kill switch when the test ends, passed or not (its pins live in the
/// host's bpffs).
struct DetachGateway<'a>(&'a GatewayNet);

impl Drop for DetachGateway<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .enter(&self.0.gw(), transproxy_bin())
            .args(["detach", "--gateway", "lan0"])
            .output();
    }
}
