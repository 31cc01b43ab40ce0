//! Who and what is intercepted: rules, users, IPv6, `transproxy exec`, host-wide mode, the
//! invisible redirect (getpeername) and config reloads.
//!
//! Real daemon, real kernel, real squid; loopback only. Rules always name the test's own
//! origins, so nothing else on the machine is ever redirected, even when attached at the root.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use transproxy_tests::{
    Daemon, LOG_WAIT, ORIGIN_IP, OTHER_IP, Origin, Squid, TestCgroup, cgroup::v2_root, client_bin,
    curl, run, text, transproxy_bin, url, wait_for,
};

/// Squid writes IPv6 CONNECT targets in brackets, like the request.
fn assert_tunnelled(squid: &Squid, dst: SocketAddr, count: usize) {
    let lines = squid.wait_connects(dst, count, LOG_WAIT);
    assert_eq!(
        lines.len(),
        count,
        "CONNECTs to {dst}; squid log:\n{}",
        squid.access_log()
    );
}

/// curl inside `cgroup` gets `body` from `origin` (directly or not).
fn curl_gets(cgroup: &TestCgroup, origin: &Origin, body: &str, daemon: &Daemon) {
    let out = curl(&mut cgroup.command("curl"), &url(origin.addr()));
    assert_eq!(
        text(&out.stdout),
        body,
        "{}\n{}",
        text(&out.stderr),
        daemon.stderr()
    );
}

/// curl inside `cgroup` gets `body` from `origin`, and squid logged exactly one tunnel to it.
fn curl_through_squid(
    cgroup: &TestCgroup,
    squid: &Squid,
    origin: &Origin,
    body: &str,
    daemon: &Daemon,
) {
    curl_gets(cgroup, origin, body, daemon);
    assert_tunnelled(squid, origin.addr(), 1);
}

#[test]
fn exclude_wins_over_include_and_ports_are_exact() {
    let squid = Squid::start(&[]);
    let a = Origin::http(ORIGIN_IP, "a");
    let b = Origin::http(ORIGIN_IP, "b");
    let c = Origin::http(OTHER_IP, "c");
    let cgroup = TestCgroup::new("rules");
    let b_rule = format!("127.0.0.2:{}", b.addr().port());
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--exclude", &b_rule],
    );

    for (origin, body) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        curl_gets(&cgroup, origin, body, &daemon);
    }
    assert_tunnelled(&squid, a.addr(), 1);
    squid.assert_no_connect(b.addr());
    squid.assert_no_connect(c.addr());
}

/// With `flag value`, curl run through `runuser ARGS` goes direct, and the same curl run as
/// plain root is tunnelled.
fn excluded_identity_goes_direct(label: &str, flag: &str, value: &str, runuser: &[&str]) {
    let squid = Squid::start(&[]);
    let origin = Origin::http(ORIGIN_IP, "hi");
    let cgroup = TestCgroup::new(label);
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", flag, value],
    );

    let mut excluded = cgroup.command("runuser");
    excluded.args(runuser).args(["--", "curl"]);
    let out = curl(&mut excluded, &url(origin.addr()));
    assert_eq!(text(&out.stdout), "hi", "{}", text(&out.stderr));
    squid.assert_no_connect(origin.addr());

    curl_through_squid(&cgroup, &squid, &origin, "hi", &daemon);
}

#[test]
fn excluded_user_goes_direct() {
    excluded_identity_goes_direct("uid", "--exclude-uid", "nobody", &["-u", "nobody"]);
}

#[test]
fn excluded_group_goes_direct() {
    // The same user (root), with the excluded primary group.
    excluded_identity_goes_direct(
        "gid",
        "--exclude-gid",
        "nogroup",
        &["-u", "root", "-g", "nogroup"],
    );
}

#[test]
fn ipv6_destination_is_tunnelled_with_brackets() {
    let squid = Squid::start(&[]);
    let origin = Origin::http(Ipv6Addr::LOCALHOST, "over v6");
    let cgroup = TestCgroup::new("v6");
    let rule = format!("[::1]:{}", origin.addr().port());
    let listen6 = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), transproxy_tests::free_port_v6());
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", &rule, "--listen6", &listen6.to_string()],
    );
    assert!(
        daemon.ready_line().contains(&listen6.to_string()),
        "{}",
        daemon.ready_line()
    );

    curl_through_squid(&cgroup, &squid, &origin, "over v6", &daemon);
}

#[test]
fn ipv4_mapped_destination_is_tunnelled_as_ipv4() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("mapped");
    let daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);

    // An AF_INET6 socket connecting to ::ffff:127.0.0.2, as Java and Go do on dual-stack hosts.
    let mapped = SocketAddr::new(ORIGIN_IP.to_ipv6_mapped().into(), origin.addr().port());
    let out = run(cgroup
        .command(client_bin())
        .args(["peer", &mapped.to_string()]));
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        daemon.stderr()
    );
    // The redirect is invisible: getpeername() reports the mapped original destination.
    assert_eq!(text(&out.stdout).trim(), mapped.to_string());
    assert_tunnelled(&squid, origin.addr(), 1);
}

#[test]
fn getpeername_reports_the_original_destination() {
    let squid = Squid::start(&[]);
    let v4 = Origin::echo(ORIGIN_IP);
    let v6 = Origin::echo(Ipv6Addr::LOCALHOST);
    let cgroup = TestCgroup::new("peer");
    let v6_rule = format!("[::1]:{}", v6.addr().port());
    let listen6 = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), transproxy_tests::free_port_v6());
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &[
            "--include",
            "127.0.0.2/32",
            "--include",
            &v6_rule,
            "--listen6",
            &listen6.to_string(),
        ],
    );
    for origin in [&v4, &v6] {
        let out = run(cgroup
            .command(client_bin())
            .args(["peer", &origin.addr().to_string()]));
        assert!(
            out.status.success(),
            "{}\n{}",
            text(&out.stderr),
            daemon.stderr()
        );
        assert_eq!(
            text(&out.stdout).trim(),
            origin.addr().to_string(),
            "getpeername shows the listener"
        );
        assert_tunnelled(&squid, origin.addr(), 1);
    }
}

/// `transproxy exec --proxy URL ARGS -- CMD`, with the given extra environment.
fn exec(proxy: &str, args: &[&str], command: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(transproxy_bin());
    cmd.args(["exec", "--proxy", proxy])
        .args(args)
        .arg("--")
        .args(command)
        .envs(env.iter().copied());
    run(&mut cmd)
}

/// The transient cgroups `transproxy exec` made that still exist.
fn exec_cgroups() -> Vec<PathBuf> {
    std::fs::read_dir(v2_root())
        .expect("list cgroup root")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("transproxy-exec-"))
        })
        .collect()
}

#[test]
fn exec_intercepts_a_static_binary_and_returns_its_status() {
    let squid = Squid::start(&[]);
    let origin = Origin::http(ORIGIN_IP, "static binaries too");
    let before = exec_cgroups();

    // busybox-static: no libc to preload into, so LD_PRELOAD tools cannot see its connects.
    let out = exec(
        &squid.url(),
        &["--include", "127.0.0.2/32"],
        &["busybox", "wget", "-q", "-O", "-", &url(origin.addr())],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "static binaries too");
    assert_tunnelled(&squid, origin.addr(), 1);

    let out = exec(&squid.url(), &[], &["busybox", "sh", "-c", "exit 7"], &[]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));

    let out = exec(&squid.url(), &[], &["/nonexistent/command"], &[]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cannot run /nonexistent/command"),
        "{}",
        text(&out.stderr)
    );

    assert_eq!(exec_cgroups(), before, "exec left cgroups behind");
}

#[test]
fn exec_runs_as_the_sudo_user() {
    let squid = Squid::start(&[]);
    let out = exec(
        &squid.url(),
        &[],
        &["busybox", "id"],
        &[("SUDO_UID", "65534"), ("SUDO_GID", "65534")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout);
    assert!(
        id.starts_with("uid=65534") && id.contains("gid=65534"),
        "{id}"
    );

    // sudo's default environment is root's (HOME=/root); the command gets its user's, or
    // `git config --global` would try to write /root/.gitconfig.
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let home = passwd
        .lines()
        .find(|l| l.split(':').nth(2) == Some("65534"))
        .and_then(|l| l.split(':').nth(5))
        .expect("no passwd entry for uid 65534");
    let out = exec(
        &squid.url(),
        &[],
        &["busybox", "sh", "-c", "echo $HOME $USER $LOGNAME"],
        &[
            ("SUDO_UID", "65534"),
            ("SUDO_GID", "65534"),
            ("HOME", "/root"),
            ("USER", "root"),
            ("LOGNAME", "root"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("{home} nobody nobody"));
}

/// Starts `exec -- COMMAND` and waits until `count` processes run in its transient cgroup;
/// returns the exec process, its cgroup and their pids.
fn exec_running(squid: &Squid, command: &[&str], count: usize) -> (Child, PathBuf, Vec<i32>) {
    let child = Command::new(transproxy_bin())
        .args(["exec", "--proxy", &squid.url(), "--"])
        .args(command)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start exec");
    let cgroup = v2_root().join(format!("transproxy-exec-{}", child.id()));
    let pids = wait_for(Duration::from_secs(10), || {
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs.lines().filter_map(|l| l.parse().ok()).collect();
        (pids.len() == count).then_some(pids)
    });
    let pids = pids.unwrap_or_else(|| panic!("{command:?} never ran in {}", cgroup.display()));
    (child, cgroup, pids)
}

/// The command lines of those of `pids` still running (a zombie has none).
fn running(pids: &[i32]) -> Vec<String> {
    pids.iter()
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .filter(|cmdline| !cmdline.is_empty())
        .map(|cmdline| text(&cmdline).trim_end_matches('\0').replace('\0', " "))
        .collect()
}

#[test]
fn exec_killed_by_signal_reports_it_and_cleans_up() {
    let squid = Squid::start(&[]);
    let before = exec_cgroups();
    // SIGTERM, and a signal nobody thinks of handling, whose default action is to terminate.
    for signal in [libc::SIGTERM, libc::SIGUSR1] {
        let (mut child, cgroup, pids) = exec_running(&squid, &["busybox", "sleep", "30"], 1);
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten())
            .expect("exec did not end");
        assert_eq!(
            status.code(),
            Some(128 + signal),
            "signal {signal}: status {status}"
        );
        assert!(
            !cgroup.exists(),
            "signal {signal}: {} was not removed",
            cgroup.display()
        );
        assert_eq!(running(&pids), Vec::<String>::new(), "signal {signal}");
        assert_eq!(exec_cgroups(), before);
    }
}

#[test]
fn exec_killed_by_sigkill_takes_its_command_along_and_the_next_exec_cleans_up() {
    let squid = Squid::start(&[]);
    let command = ["busybox", "sh", "-c", "busybox sleep 30 & wait"];
    let (mut child, cgroup, pids) = exec_running(&squid, &command, 2);
    child.kill().expect("SIGKILL exec");
    child.wait().expect("wait for exec");
    // The command dies with exec; its own child runs on in the cgroup.
    let orphan = vec!["busybox sleep 30".to_string()];
    let left = wait_for(Duration::from_secs(10), || {
        let left = running(&pids);
        (left == orphan).then_some(left)
    });
    assert_eq!(left, Some(orphan), "{:?}", running(&pids));
    // Nothing could remove the cgroup of a killed exec; the next one does, and kills the orphan.
    let out = exec(&squid.url(), &[], &["busybox", "true"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!cgroup.exists(), "{} was left behind", cgroup.display());
    assert_eq!(running(&pids), Vec::<String>::new());
}

#[test]
fn host_wide_mode_without_loops() {
    // Squid drops to its own user `proxy` (Debian's default); excluding that user is what keeps
    // its connection to the origin from being intercepted again.
    let squid = Squid::start(&[]);
    let origin = Origin::http(ORIGIN_IP, "host-wide");
    let rule = format!("127.0.0.2/32:{}", origin.addr().port());
    let listen = transproxy_tests::free_local_addr();
    let mut cmd = Command::new(transproxy_bin());
    // No --cgroup: the root of the cgroup v2 hierarchy, i.e. every process on the host.
    cmd.args([
        "run",
        "--proxy",
        &squid.url(),
        "--listen",
        &listen.to_string(),
        "--listen6",
        "off",
        // The whole host's DNS stays untouched: only the loopback include is intercepted.
        "--dns",
        "off",
    ])
    .args(["--include", &rule, "--exclude-uid", "proxy"]);
    let daemon = Daemon::spawn(cmd, listen);
    assert!(
        daemon
            .ready_line()
            .contains(&v2_root().display().to_string()),
        "{}",
        daemon.ready_line()
    );

    // The test process itself, in no test cgroup: "a client anywhere on the host".
    let out = curl(&mut Command::new("curl"), &url(origin.addr()));
    assert_eq!(
        text(&out.stdout),
        "host-wide",
        "{}\n{}",
        text(&out.stderr),
        daemon.stderr()
    );
    assert_tunnelled(&squid, origin.addr(), 1);
    // Exactly one: not a loop.
    squid.assert_connects(1);
    assert_eq!(origin.hits(), 1, "squid's own connection was redirected");
}

#[test]
fn sighup_reloads_rules_and_keeps_tunnels() {
    let squid = Squid::start(&[]);
    let echo = Origin::echo(ORIGIN_IP);
    let other = Origin::http(ORIGIN_IP, "other");
    let config = tempfile::NamedTempFile::new().unwrap();
    let write_config = |excludes: &str| {
        std::fs::write(
            config.path(),
            format!(
                "proxy = \"{}\"\ninclude = [\"127.0.0.2/32\"]\nexclude = [{excludes}]\n",
                squid.url()
            ),
        )
        .unwrap();
    };
    write_config("");
    let cgroup = TestCgroup::new("reload");
    let daemon = Daemon::run_with_config(config.path(), &cgroup);

    // A tunnel that stays open across the reload.
    let mut session = cgroup
        .command(client_bin())
        .args(["echo-session", &echo.addr().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_session = session.stdin.take().unwrap();
    let mut from_session = BufReader::new(session.stdout.take().unwrap());
    let mut say = |line: &str| {
        writeln!(to_session, "{line}").unwrap();
        let mut echoed = String::new();
        from_session.read_line(&mut echoed).unwrap();
        echoed
    };
    assert_eq!(say("before"), "before\n");

    write_config(&format!("\"127.0.0.2:{}\"", other.addr().port()));
    daemon.signal(libc::SIGHUP);
    let reloaded = wait_for(LOG_WAIT, || {
        daemon.stderr().contains("SIGHUP: reloaded").then_some(())
    });
    assert!(reloaded.is_some(), "no reload: {}", daemon.stderr());

    curl_gets(&cgroup, &other, "other", &daemon);
    squid.assert_no_connect(other.addr());
    assert_eq!(
        say("after"),
        "after\n",
        "the tunnel did not survive the reload"
    );

    // A broken file keeps the current rules.
    std::fs::write(config.path(), "prox = 1\n").unwrap();
    daemon.signal(libc::SIGHUP);
    let refused = wait_for(LOG_WAIT, || {
        daemon
            .stderr()
            .contains("keeping the current rules")
            .then_some(())
    });
    assert!(refused.is_some(), "{}", daemon.stderr());
    assert_eq!(say("still"), "still\n");

    // So does a rule set the kernel's trie cannot hold: it is refused whole, and `other`
    // (excluded only by the running rules) still goes direct.
    let too_many: Vec<String> = (0..5_000)
        .map(|i| format!("\"127.5.{}.{}\"", i / 256, i % 256))
        .collect();
    write_config(&too_many.join(", "));
    daemon.signal(libc::SIGHUP);
    let refused = wait_for(LOG_WAIT, || {
        let log = daemon.stderr();
        (log.matches("keeping the current rules").count() == 2 || log.contains("reload failed"))
            .then_some(log)
    });
    let log = refused.unwrap_or_else(|| daemon.stderr());
    assert!(log.contains("at most 4096 fit"), "{log}");
    assert!(!log.contains("reload failed"), "{log}");
    curl_gets(&cgroup, &other, "other", &daemon);
    squid.assert_no_connect(other.addr());
    assert_eq!(say("kept"), "kept\n");

    drop(to_session);
    assert!(session.wait().unwrap().success());
    assert_tunnelled(&squid, echo.addr(), 1);
}

#[test]
fn config_file_errors_name_key_and_line() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "proxy = \"http://127.0.0.1:3128\"\nincldue = [\"127.0.0.0/8\"]\n",
    )
    .unwrap();
    let out = run(Command::new(transproxy_bin())
        .args(["run", "--config"])
        .arg(config.path()));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("line 2") && err.contains("incldue"), "{err}");
}

#[test]
fn no_proxy_addresses_are_excluded_and_names_announced() {
    let squid = Squid::start(&[]);
    let origin = Origin::http(ORIGIN_IP, "no proxy");
    let cgroup = TestCgroup::new("noproxy");
    let (mut cmd, listen) = Daemon::command(Command::new(transproxy_bin()), &squid.url(), &cgroup);
    cmd.args(["--include", "127.0.0.2/32"]).env(
        "NO_PROXY",
        format!("localhost,.corp.example,{}", origin.addr()),
    );
    let daemon = Daemon::spawn(cmd, listen);
    curl_gets(&cgroup, &origin, "no proxy", &daemon);
    squid.assert_no_connect(origin.addr());
    let reported = wait_for(LOG_WAIT, || {
        daemon
            .stderr()
            .contains("NO_PROXY names go direct: localhost, corp.example")
            .then_some(())
    });
    assert!(reported.is_some(), "{}", daemon.stderr());
}
