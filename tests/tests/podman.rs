//! Real containers: podman with runc, `--network none`, a busybox folder made by the test,
//! below the daemon's cgroup. Nothing is configured inside them: no proxy variable, no
//! route, not even a network. They reach an origin on the host's loopback through the host's
//! squid because the one daemon serves their namespaces.

use std::{collections::HashSet, process::Command, time::Duration};

use transproxy_tests::{
    Daemon, Detach, LOG_WAIT, ORIGIN_IP, Origin, Squid, TestCgroup, podman::Podman, run, text,
    transproxy_bin, wait_for,
};

/// The namespaces (`net:[INODE]`) the daemon serves now.
fn served(daemon: &Daemon) -> HashSet<String> {
    daemon.served_namespaces()
}

/// An HTTP GET of `/` with busybox's nc (its wget crashes here), printing the answer. nc's
/// stdin stays open until the answer is in: squid ends a tunnel at the client's end-of-file.
fn fetch(origin: &Origin) -> String {
    let addr = origin.addr();
    format!(
        r"(printf 'GET / HTTP/1.0\r\n\r\n'; sleep 2) | nc -w 3 {} {}",
        addr.ip(),
        addr.port()
    )
}

/// With transproxy's OCI hook, the daemon serves the container's namespace before its process
/// runs: with the kill switch on, the container's very first connect is tunnelled (without the
/// hook it would be refused). When the container is gone, so is its listener.
#[test]
fn with_the_oci_hook_a_containers_first_connect_is_tunnelled() {
    let squid = Squid::start(&[]);
    let origin = Origin::http(ORIGIN_IP, "hello, container");
    let cgroup = TestCgroup::new("podman-hook");
    let _detach = Detach(&cgroup);
    let podman = Podman::new().with_hook(&transproxy_bin());
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--fail-closed"],
    );

    let out = podman.run(&cgroup, None, &fetch(&origin));
    assert!(
        text(&out.stdout).contains("hello, container"),
        "container: {}{}\ndaemon:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        daemon.stderr()
    );
    assert_eq!(squid.wait_connects(origin.addr(), 1, LOG_WAIT).len(), 1);
    assert!(
        daemon.stderr().contains("asked by a hook"),
        "{}",
        daemon.stderr()
    );
    // `run --rm` has ended: the namespace's listener closes at the next scan.
    let closed = wait_for(Duration::from_secs(5), || {
        served(&daemon).is_empty().then_some(())
    });
    assert!(closed.is_some(), "still served: {:?}", served(&daemon));
}

/// Without any hook: a running container's namespace is found by the daemon's scan of its
/// cgroup tree, `podman exec` inside it fetches through the host's squid, and `podman rm`
/// closes the daemon's listener there.
#[test]
fn a_running_container_is_found_and_forgotten_with_no_hook() {
    let squid = Squid::start(&[]);
    let origin = Origin::http(ORIGIN_IP, "found by the scan");
    let cgroup = TestCgroup::new("podman-scan");
    let podman = Podman::new();
    let daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
    let name = format!("transproxy-test-{}", std::process::id());
    podman.start(&cgroup, &name, "exec sleep 600");
    let found = wait_for(Duration::from_secs(5), || {
        (served(&daemon).len() == 1).then_some(())
    });
    assert!(found.is_some(), "daemon:\n{}", daemon.stderr());

    let out =
        run(podman
            .command()
            .args(["exec", &name, "/bin/busybox", "sh", "-c", &fetch(&origin)]));
    assert!(
        text(&out.stdout).contains("found by the scan"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(squid.wait_connects(origin.addr(), 1, LOG_WAIT).len(), 1);

    podman.remove(&name);
    let closed = wait_for(Duration::from_secs(5), || {
        served(&daemon).is_empty().then_some(())
    });
    assert!(closed.is_some(), "still served: {:?}", served(&daemon));
    assert!(
        daemon
            .stderr()
            .contains("no process of the cgroup tree is left"),
        "{}",
        daemon.stderr()
    );
}

/// `[[container]]` sections: containers below child cgroup `a` tunnel through one squid, those
/// below `b` through another, with credentials of its own; the daemon's own proxy (nothing
/// listens there) is never used. Status and the access log name each tunnel's cgroup.
#[test]
fn two_containers_go_through_two_squids_by_their_cgroups() {
    let squid_a = Squid::start(&[]);
    let squid_b = Squid::start_with_basic_auth("pod-b", "secret-b");
    let origin = Origin::http(ORIGIN_IP, "per-container proxy");
    let cgroup = TestCgroup::new("podman-two");
    let (a, b) = (cgroup.child("a"), cgroup.child("b"));
    let dir = tempfile::tempdir().expect("temporary folder");
    let secret = dir.path().join("pod-b.secret");
    std::fs::write(&secret, "pod-b:secret-b\n").expect("secret");
    let root_only = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&secret, root_only).expect("secret's mode");
    let access_log = dir.path().join("access.log");
    let config = dir.path().join("transproxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"proxy = "http://127.0.0.1:1"
include = ["127.0.0.2/32"]
access-log = "{log}"

[[container]]
cgroup = "a/libpod-*"
proxy = "{a}"

[[container]]
cgroup = "b/*"
proxy = "{b}"
proxy-auth-file = "{secret}"
"#,
            log = access_log.display(),
            a = squid_a.url(),
            b = squid_b.url(),
            secret = secret.display(),
        ),
    )
    .expect("config");
    let podman = Podman::new().with_hook(&transproxy_bin());
    let daemon = Daemon::run_with_config(&config, &cgroup);

    for parent in [&a, &b] {
        let out = podman.run(parent, None, &fetch(&origin));
        assert!(
            text(&out.stdout).contains("per-container proxy"),
            "container: {}{}\ndaemon:\n{}",
            text(&out.stdout),
            text(&out.stderr),
            daemon.stderr()
        );
    }
    assert_eq!(squid_a.wait_connects(origin.addr(), 1, LOG_WAIT).len(), 1);
    // squid B asked for credentials first (407), then tunnelled.
    let tunnelled = |lines: Vec<String>| lines.iter().filter(|l| l.contains("/200 ")).count();
    assert_eq!(
        tunnelled(squid_b.wait_connects(origin.addr(), 2, LOG_WAIT)),
        1
    );
    let logged = wait_for(LOG_WAIT, || {
        let log = std::fs::read_to_string(&access_log).ok()?;
        (log.lines().count() == 2).then_some(log)
    })
    .expect("two access log lines");
    for (line, parent) in logged.lines().zip(["/a/libpod-", "/b/libpod-"]) {
        assert!(line.contains(parent), "{line}");
    }
    drop(podman);
    drop((a, b));
}

/// `run --container NAME`: the daemon finds the container's cgroup with podman and intercepts
/// that container alone.
#[test]
fn run_container_intercepts_one_running_container_by_name() {
    let squid = Squid::start(&[]);
    let origin = Origin::http(ORIGIN_IP, "one container");
    let cgroup = TestCgroup::new("podman-one");
    let podman = Podman::new();
    let name = format!("transproxy-one-{}", std::process::id());
    let id = podman.start(&cgroup, &name, "exec sleep 600");
    let listen = transproxy_tests::free_local_addr();
    let mut cmd = Command::new(transproxy_bin());
    cmd.envs(podman.env()).args([
        "run",
        "--proxy",
        &squid.url(),
        "--listen",
        &listen.to_string(),
        "--container",
        &name,
        "--include",
        "127.0.0.2/32",
    ]);
    let daemon = Daemon::spawn(cmd, listen);
    assert!(
        daemon.ready_line().contains(&format!("libpod-{id}")),
        "{}",
        daemon.ready_line()
    );
    let out =
        run(podman
            .command()
            .args(["exec", &name, "/bin/busybox", "sh", "-c", &fetch(&origin)]));
    assert!(
        text(&out.stdout).contains("one container"),
        "{}{}\ndaemon:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        daemon.stderr()
    );
    assert_eq!(squid.wait_connects(origin.addr(), 1, LOG_WAIT).len(), 1);
    drop(daemon);
    podman.remove(&name);
}
