//! One daemon serves every network namespace of its cgroup tree: namespaces made by the test
//! (a process of the test cgroup in `unshare --net`, loopback only) stand in for containers
//! here; `podman.rs` runs real ones.
//!
//! The origins live on the host's loopback only: inside a namespace, 127.0.0.2 is that
//! namespace's own loopback, where nothing listens. A connect that reaches the origin went
//! through the daemon and squid.

use std::{
    collections::HashSet,
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use transproxy_tests::{
    Daemon, Detach, LOG_WAIT, ORIGIN_IP, Origin, Squid, TestCgroup, bpf, client_bin, netns::Netns,
    run, text, transproxy_bin, wait_for,
};

/// The namespaces (`net:[INODE]`) the daemon serves now.
fn served(daemon: &Daemon) -> HashSet<String> {
    daemon.served_namespaces()
}

/// Waits until the daemon serves exactly `want`.
fn wait_served(daemon: &Daemon, want: &HashSet<String>) {
    let done = wait_for(Duration::from_secs(5), || {
        (served(daemon) == *want).then_some(())
    });
    assert!(
        done.is_some(),
        "served {:?}, want {want:?}\ndaemon:\n{}",
        served(daemon),
        daemon.stderr()
    );
}

/// The daemon's open descriptors.
fn descriptors(daemon: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .map(Iterator::count)
        .unwrap_or(0)
}

/// Two containers' clients share an address (127.0.0.1 and the same port, each in its own
/// namespace), at the same time: records keyed by the namespace keep them apart. One namespace
/// existed before the daemon started, one appears after; both reach the host-only origin
/// through the host's squid.
#[test]
fn two_namespaces_with_the_same_client_address_both_reach_the_host() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("two-netns");
    let before = Netns::new(&cgroup, true);
    let daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
    let after = Netns::new(&cgroup, true);
    wait_served(&daemon, &HashSet::from([before.name(), after.name()]));

    let client = SocketAddr::from(([127, 0, 0, 1], 40_123)).to_string();
    let children: Vec<_> = [&before, &after]
        .iter()
        .map(|ns| {
            ns.command(&cgroup, client_bin())
                .args(["port-probe", &client, &origin.addr().to_string()])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("start the client")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("client ran");
        assert_eq!(
            text(&out.stdout).trim(),
            "data:ping",
            "daemon:\n{}",
            daemon.stderr()
        );
    }
    let lines = squid.wait_connects(origin.addr(), 2, LOG_WAIT);
    assert_eq!(lines.len(), 2, "squid log:\n{}", squid.access_log());

    // Status names each namespace's listener, and the log says why it is served.
    let status = daemon.status();
    let namespaces = status["namespaces"].as_array().expect("namespaces");
    assert!(
        namespaces.iter().all(|n| n["listeners"][0]
            .as_str()
            .is_some_and(|l| l.starts_with("127.0.0.1:"))),
        "{status}"
    );
    assert!(
        daemon
            .stderr()
            .contains("found in the cgroup tree at start"),
        "{}",
        daemon.stderr()
    );
}

/// With the kill switch, a namespace the daemon does not serve yet is refused, and one whose
/// listener cannot be reached (its loopback is down) never gets around it either: every
/// connect fails, none reaches the origin or the proxy.
#[test]
fn with_the_kill_switch_nothing_gets_around_in_other_namespaces() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("netns-closed");
    let _detach = Detach(&cgroup);
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--fail-closed"],
    );
    // A namespace of its own for the probe alone: the first connect there meets no listener.
    let first = run(cgroup.command(client_bin()).args([
        "netns-probe",
        &SocketAddr::from((ORIGIN_IP, 8080)).to_string(),
    ]));
    assert_eq!(
        text(&first.stdout).trim(),
        "refused",
        "{}",
        text(&first.stderr)
    );

    let down = Netns::new(&cgroup, false);
    wait_served(&daemon, &HashSet::from([down.name()]));
    for _ in 0..3 {
        let out = run(down
            .command(&cgroup, client_bin())
            .args(["probe", &origin.addr().to_string()]));
        let said = text(&out.stdout);
        assert!(
            said.trim() == "refused" || said.contains("unreachable"),
            "{said}"
        );
    }
    assert_eq!(origin.hits(), 0);
    assert_eq!(squid.all_connects(), 0);
}

/// 200 short-lived namespaces in a row, each connecting twice, 50 ms apart: the first connect
/// of a namespace the daemon does not serve yet goes where it was addressed (here: nowhere,
/// refused), and reports the namespace; the second is tunnelled. Afterwards no listener,
/// record or descriptor is left behind.
#[test]
fn namespace_churn_is_served_within_milliseconds_and_leaves_nothing_behind() {
    const NAMESPACES: usize = 200;
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("netns-churn");
    let daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
    let fds_before = descriptors(&daemon);
    let listeners_before = bpf::map_entries(cgroup.path(), "LISTENERS");

    let client = client_bin();
    let script = format!(
        r#"for i in $(seq {NAMESPACES}); do unshare --net sh -c 'ip link set lo up && {c} probe {a}; sleep 0.05; {c} probe {a}'; done"#,
        c = client.display(),
        a = origin.addr()
    );
    let started = Instant::now();
    let out = run(cgroup.command("sh").args(["-c", &script]));
    let took = started.elapsed();
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 2 * NAMESPACES, "{}", text(&out.stderr));
    let firsts: Vec<&str> = lines.iter().step_by(2).copied().collect();
    let seconds: Vec<&str> = lines.iter().skip(1).step_by(2).copied().collect();
    let tunnelled = seconds.iter().filter(|l| **l == "data:ping").count();
    // A scan may find a namespace before its first connect: then that one is tunnelled too.
    let early = firsts.iter().filter(|l| **l == "data:ping").count();
    eprintln!(
        "{NAMESPACES} namespaces in {took:?}: first connects {early} tunnelled, second connects {tunnelled} tunnelled"
    );
    assert!(
        firsts.iter().all(|l| *l == "refused" || *l == "data:ping"),
        "{firsts:?}"
    );
    assert_eq!(
        tunnelled,
        NAMESPACES,
        "{seconds:?}\ndaemon:\n{}",
        daemon.stderr()
    );

    // Every namespace is gone: its listener is closed by the next scans, the kernel drops it
    // from the programs' map, and the daemon holds no more descriptors than before.
    wait_served(&daemon, &HashSet::new());
    let settled = wait_for(Duration::from_secs(5), || {
        (descriptors(&daemon) <= fds_before
            && bpf::map_entries(cgroup.path(), "LISTENERS") == listeners_before)
            .then_some(())
    });
    assert!(
        settled.is_some(),
        "descriptors {} (before {fds_before}), listeners {} (before {listeners_before})",
        descriptors(&daemon),
        bpf::map_entries(cgroup.path(), "LISTENERS")
    );
    assert_eq!(bpf::map_entries(cgroup.path(), "DST_BY_CLIENT"), 0);
    let through = NAMESPACES + early;
    assert_eq!(
        squid.wait_connects(origin.addr(), through, LOG_WAIT).len(),
        through
    );
}

/// The chained CNI plugin (`transproxy-cni`, the binary under that name): on ADD it has the
/// daemon serve the pod's namespace file before any process is in it, and passes the previous
/// plugin's result on unchanged. The pod's first connect, with the kill switch on, is
/// tunnelled.
#[test]
fn the_cni_plugin_has_a_pods_namespace_served_before_its_first_process() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("cni");
    let _detach = Detach(&cgroup);
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--fail-closed"],
    );
    // The pod's namespace, as a runtime makes it: a file in /run/netns, loopback up.
    let name = format!("transproxy-cni-{}", std::process::id());
    let netns = NamedNetns::add(&name);

    let dir = tempfile::tempdir().expect("temporary folder");
    let plugin = dir.path().join("transproxy-cni");
    std::os::unix::fs::symlink(transproxy_bin(), &plugin).expect("plugin link");
    let previous = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.88.0.5/16"}]}"#;
    let config = format!(
        r#"{{"cniVersion":"1.0.0","name":"pods","type":"transproxy-cni","prevResult":{previous}}}"#
    );
    let mut child = Command::new(&plugin)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "pod-1")
        .env("CNI_NETNS", &netns.path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the plugin");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), config.as_bytes())
        .expect("config");
    let out = child.wait_with_output().expect("plugin ran");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON result");
    let previous: serde_json::Value = serde_json::from_str(previous).unwrap();
    assert_eq!(result, previous);
    assert!(
        daemon.stderr().contains("asked by a hook"),
        "{}",
        daemon.stderr()
    );

    // The pod's first process, in the daemon's cgroup: its first connect is tunnelled.
    let probe = run(cgroup
        .command("nsenter")
        .arg(format!("--net={}", netns.path.display()))
        .arg("--")
        .arg(client_bin())
        .args(["probe", &origin.addr().to_string()]));
    assert_eq!(
        text(&probe.stdout).trim(),
        "data:ping",
        "{}",
        daemon.stderr()
    );
    assert_eq!(squid.wait_connects(origin.addr(), 1, LOG_WAIT).len(), 1);
}

/// A namespace in /run/netns (`ip netns add`), loopback up; deleted when dropped.
struct NamedNetns {
    name: String,
    path: std::path::PathBuf,
}

impl NamedNetns {
    fn add(name: &str) -> Self {
        let added = run(Command::new("ip").args(["netns", "add", name]));
        assert!(added.status.success(), "{}", text(&added.stderr));
        let netns = Self {
            name: name.to_owned(),
            path: std::path::PathBuf::from(format!("/run/netns/{name}")),
        };
        let up = run(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]));
        assert!(up.status.success(), "{}", text(&up.stderr));
        netns
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Attack: an unprivileged user of the cgroup makes network namespaces (a user namespace with
/// each, as anyone may here) to make the daemon hold listeners, and descriptors, without end.
/// It serves `--max-namespaces` of them, says so once, and serves new ones as old ones go.
#[test]
fn an_unprivileged_user_cannot_make_the_daemon_serve_more_than_max_namespaces() {
    let squid = Squid::start(&[]);
    let cgroup = TestCgroup::new("netns-flood");
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--max-namespaces", "3"],
    );
    let namespaces: Vec<Netns> = (0..5).map(|_| Netns::as_nobody(&cgroup)).collect();
    let three = wait_for(Duration::from_secs(5), || {
        (served(&daemon).len() == 3).then_some(())
    });
    assert!(
        three.is_some(),
        "served {:?}\n{}",
        served(&daemon),
        daemon.stderr()
    );
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(served(&daemon).len(), 3);
    let log = daemon.stderr();
    assert_eq!(log.matches("(max-namespaces)").count(), 1, "{log}");

    // Two of those served go: the two others are served in their place.
    let before = served(&daemon);
    let (served_ones, waiting): (Vec<Netns>, Vec<Netns>) = namespaces
        .into_iter()
        .partition(|ns| before.contains(&ns.name()));
    assert_eq!((served_ones.len(), waiting.len()), (3, 2));
    let mut served_ones = served_ones.into_iter();
    drop(served_ones.next());
    drop(served_ones.next());
    let left: Vec<Netns> = served_ones.chain(waiting).collect();
    wait_served(&daemon, &left.iter().map(Netns::name).collect());
}
