//! Privileges and what other users of the machine can see and touch: the proxy's credentials,
//! the daemon's capabilities and user, and the kill switch's pins in bpffs. Real daemon, real
//! kernel; loopback only; bpffs changes happen in private mount namespaces made by the test.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    process::Command,
    time::Duration,
};

use transproxy_tests::{
    Behavior, Daemon, Detach, HostileProxy, LOG_WAIT, ORIGIN_IP, Origin, Squid, TestCgroup,
    bpf::attached_programs, probe, proc_status, refuses_to_start, run, run_for, text,
    transproxy_bin, wait_for,
};

/// `/proc/PID/cmdline` as user nobody reads it, NULs shown as spaces.
fn cmdline_seen_by_nobody(pid: i32) -> String {
    let out = run(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "cat",
        ])
        .arg(format!("/proc/{pid}/cmdline")));
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).replace('\0', " ")
}

/// A password given in `--proxy` is masked in the process list once the daemon has started,
/// and `exec` neither shows it nor passes `--proxy-auth-env`'s variable on to the command.
#[test]
fn proxy_credentials_never_show_to_other_users() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("cmdline");
    let proxy = format!("http://alice:s3cret@{}", squid.addr());
    let daemon = Daemon::run(&proxy, &cgroup, &["--include", "127.0.0.2/32"]);
    assert_eq!(
        probe(&cgroup, origin.addr()),
        "data:ping",
        "{}",
        daemon.stderr()
    );
    let shown = cmdline_seen_by_nobody(daemon.pid());
    assert!(
        !shown.contains("s3cret") && !shown.contains("alice"),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("--proxy http://***@{}", squid.addr())),
        "{shown}"
    );
    drop(daemon);

    // The command prints its parent's (exec's) command line and the credentials variable.
    let out = run_for(
        Command::new(transproxy_bin())
            .args(["exec", "--proxy", &proxy, "--include", "127.0.0.2/32", "--"])
            .args([
                "sh",
                "-c",
                r#"tr '\0' ' ' < /proc/$PPID/cmdline; echo; echo "${TP_CREDS-unset}""#,
            ])
            .env("TP_CREDS", "bob:hunter2"),
        Duration::from_secs(30),
    );
    let said = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !said.contains("s3cret") && said.contains("http://***@"),
        "{said}"
    );
    let out = run_for(
        Command::new(transproxy_bin())
            .args([
                "exec",
                "--proxy",
                &squid.url(),
                "--proxy-auth-env",
                "TP_CREDS",
            ])
            .args(["--include", "127.0.0.2/32", "--"])
            .args(["sh", "-c", r#"echo "${TP_CREDS-unset}""#])
            .env("TP_CREDS", "bob:hunter2"),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "unset");
}

/// `unshare -m` running `setup` (shell) and then `transproxy ARGS`, in a mount namespace of
/// its own: bpffs there is private to the test.
fn in_own_mount_namespace(setup: &str) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("{setup} && exec \"$@\""))
        .arg("sh")
        .arg(transproxy_bin());
    cmd
}

/// On a bpffs open to every user (mode 1777, as found on this machine), a user who made
/// `/sys/fs/bpf/transproxy` first could rename the pins so that takeover and detach miss them:
/// the kill switch refuses such a folder.
#[test]
fn a_pin_folder_made_by_another_user_is_refused() {
    let cgroup = TestCgroup::new("pinfolder");
    let setup = "mount -t bpf bpf /sys/fs/bpf -o mode=1777 && \
                 setpriv --reuid=65534 --regid=65534 --clear-groups mkdir /sys/fs/bpf/transproxy";
    let (mut cmd, _) = Daemon::command(
        in_own_mount_namespace(setup),
        "http://127.0.0.1:3128",
        &cgroup,
    );
    let said = refuses_to_start(
        cmd.args([
            "--include",
            "127.0.0.2/32",
            "--fail-closed",
            "--listen6",
            "off",
        ]),
        "/sys/fs/bpf/transproxy is owned by uid 65534",
    );
    assert!(said.contains("remove it"), "{said}");
    assert!(attached_programs(cgroup.path()).is_empty(), "{said}");
}

/// Where bpffs is not mounted, the kill switch mounts it closed to everyone but root, and its
/// folders are root's alone.
#[test]
fn the_kill_switch_mounts_bpffs_closed_to_others() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("bpffsmode");
    let _detach = Detach(&cgroup);
    // A tmpfs hides the machine's bpffs in this namespace: the daemon finds none.
    let (cmd, listen) = Daemon::command(
        in_own_mount_namespace("mount -t tmpfs tmpfs /sys/fs/bpf"),
        &squid.url(),
        &cgroup,
    );
    let mut cmd = cmd;
    cmd.args([
        "--include",
        "127.0.0.2/32",
        "--fail-closed",
        "--listen6",
        "off",
    ]);
    let mut daemon = Daemon::spawn(cmd, listen);
    assert!(
        daemon
            .stderr()
            .contains("mounted bpffs at /sys/fs/bpf (mode 0700)"),
        "{}",
        daemon.stderr()
    );
    let seen = |path: &str| {
        let meta = std::fs::metadata(format!("/proc/{}/root{path}", daemon.pid())).unwrap();
        // The permission bits; bpffs always adds the sticky bit to its root.
        (meta.uid(), meta.mode() & 0o777)
    };
    assert_eq!(seen("/sys/fs/bpf"), (0, 0o700));
    assert_eq!(seen("/sys/fs/bpf/transproxy"), (0, 0o700));
    assert_eq!(probe(&cgroup, origin.addr()), "data:ping");
    // The pins live in that namespace's bpffs, which goes away with its last process.
    daemon.signal(libc::SIGKILL);
    assert!(daemon.wait_exit(Duration::from_secs(5)).is_some());
    let detached = wait_for(Duration::from_secs(10), || {
        attached_programs(cgroup.path()).is_empty().then_some(())
    });
    assert!(detached.is_some(), "{:?}", attached_programs(cgroup.path()));
}

#[test]
fn credentials_come_from_env_or_a_root_only_file_and_never_show() {
    // The proxy never asks: credentials go only because `--proxy-auth-scheme basic` says to
    // send them first (without it, none are sent to a proxy that does not ask; see the end).
    let port = transproxy_tests::free_port(ORIGIN_IP);
    let proxy = HostileProxy::start(HashMap::from([(port, Behavior::OneByteWrites)]));
    let dst = SocketAddr::from((ORIGIN_IP, port));
    let cgroup = TestCgroup::new("creds");
    let expected = "Proxy-Authorization: Basic YWxpY2U6czNjcmV0"; // alice:s3cret
    let start = |extra: &[&str], env: &[(&str, &str)]| {
        let (mut cmd, listen) =
            Daemon::command(Command::new(transproxy_bin()), &proxy.url(), &cgroup);
        cmd.args(["--include", "127.0.0.2/32", "--proxy-auth-scheme", "basic"])
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
    drop(daemon);

    // Without a scheme named, credentials wait for the proxy to ask, and this one never does.
    let (mut cmd, listen) = Daemon::command(Command::new(transproxy_bin()), &proxy.url(), &cgroup);
    cmd.args(["--include", "127.0.0.2/32"])
        .args(["--proxy-auth-file", &file.path().to_string_lossy()]);
    let daemon = Daemon::spawn(cmd, listen);
    let before = proxy.requests().len();
    assert_eq!(probe(&cgroup, dst), "data:ping", "{}", daemon.stderr());
    let requests = proxy.requests();
    assert_eq!(requests.len(), before + 1);
    assert!(
        !requests[before].head.contains("Proxy-Authorization"),
        "{:?}",
        requests[before]
    );
}

#[test]
fn daemon_drops_capabilities_and_can_switch_user() {
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
            proc_status(daemon.pid(), field),
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
        proc_status(daemon.pid(), "Uid:").starts_with("65534"),
        "{}",
        proc_status(daemon.pid(), "Uid:")
    );
    // Leaving root clears the effective and permitted sets, but not the bounding set.
    for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(
            proc_status(daemon.pid(), field),
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
