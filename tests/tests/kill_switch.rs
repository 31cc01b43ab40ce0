//! The kill switch (`--fail-closed`) and the listener against a local attacker: an unprivileged
//! user on the same machine, or a process inside the intercepted cgroup. Each test runs the
//! attack as that attacker would, against the real daemon and kernel, on loopback only.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv6Addr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use transproxy_tests::{
    Daemon, Detach, LOG_WAIT, ORIGIN_IP, OTHER_IP, Origin, Squid, TestCgroup,
    bpf::attached_programs, client_bin, detach, free_port_v6, probe, refuses_to_start, run, text,
    transproxy_bin, wait_for,
};

/// The user an attacker without privileges runs as.
const NOBODY: (u32, u32) = (65_534, 65_534);

/// `setpriv` as user nobody, running `program`.
fn as_nobody(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--",
    ])
    .arg(program);
    cmd
}

/// A fail-closed daemon for `cgroup` intercepting `include`, killed with SIGKILL: its programs
/// stay pinned, its listeners are gone. Returns the dead daemon's listen address and pid.
fn kill_fail_closed(squid: &Squid, cgroup: &TestCgroup, include: &str) -> (SocketAddr, i32) {
    let mut daemon = Daemon::run(
        &squid.url(),
        cgroup,
        &["--include", include, "--fail-closed", "--listen6", "off"],
    );
    daemon.signal(libc::SIGKILL);
    assert!(
        daemon.wait_exit(LOG_WAIT).is_some(),
        "the daemon survived SIGKILL"
    );
    (daemon.listen(), daemon.pid())
}

#[test]
fn kill_switch_refuses_after_sigkill_until_detached() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("failclosed");
    let _detach = Detach(&cgroup);
    let mut daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--fail-closed"],
    );
    assert_eq!(probe(&cgroup, origin.addr()), "data:ping");

    daemon.signal(libc::SIGKILL);
    assert!(daemon.wait_exit(LOG_WAIT).is_some());
    let started = Instant::now();
    assert_eq!(
        probe(&cgroup, origin.addr()),
        "refused",
        "traffic went around the dead proxy"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(attached_programs(cgroup.path()).contains(&"connect4".to_owned()));
    assert_eq!(origin.hits(), 1);

    let out = detach(&cgroup);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("left by transproxy pid"),
        "{}",
        text(&out.stdout)
    );
    assert!(attached_programs(cgroup.path()).is_empty());
    assert_eq!(probe(&cgroup, origin.addr()), "data:ping");
    assert_eq!(origin.hits(), 2);
}

#[test]
fn default_is_fail_open_after_sigkill() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("failopen");
    let mut daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
    daemon.signal(libc::SIGKILL);
    assert!(daemon.wait_exit(LOG_WAIT).is_some());
    let gone = wait_for(LOG_WAIT, || {
        attached_programs(cgroup.path()).is_empty().then_some(())
    });
    assert!(gone.is_some());
    assert_eq!(probe(&cgroup, origin.addr()), "data:ping");
    assert_eq!(squid.all_connects(), 0);
}

/// The first connect of a process of the cgroup in a network namespace the daemon does not
/// serve yet (a container's, just made) finds no listener there: it goes where it was
/// addressed, or with the kill switch, fails. (It also makes the daemon serve that namespace;
/// `containers.rs` tests what follows.)
#[test]
fn connects_from_another_network_namespace_go_direct_or_fail_closed() {
    let squid = Squid::start(&[]);
    let cgroup = TestCgroup::new("netns");
    let netns_probe = || {
        let out = run(cgroup.command(client_bin()).args([
            "netns-probe",
            &SocketAddr::from((ORIGIN_IP, 8080)).to_string(),
        ]));
        format!("{}{}", text(&out.stdout).trim(), text(&out.stderr).trim())
    };
    {
        let _daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
        assert_eq!(netns_probe(), "data:ping");
    }
    let _detach = Detach(&cgroup);
    let _daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--fail-closed"],
    );
    assert_eq!(netns_probe(), "refused");
    assert_eq!(squid.all_connects(), 0);
}

/// An unknown `--user` stops the daemon before it attaches anything: with the kill switch, the
/// programs would otherwise stay pinned with no daemon, refusing every connect of the cgroup.
#[test]
fn an_unknown_user_is_refused_before_anything_is_attached() {
    let cgroup = TestCgroup::new("nouser");
    let _detach = Detach(&cgroup);
    let (mut cmd, _) = Daemon::command(
        Command::new(transproxy_bin()),
        "http://127.0.0.1:3128",
        &cgroup,
    );
    let said = refuses_to_start(
        cmd.args([
            "--include",
            "127.0.0.2/32",
            "--listen6",
            "off",
            "--fail-closed",
            "--user",
            "transproxy-no-such-user",
        ]),
        "no user named or numbered 'transproxy-no-such-user'",
    );
    assert!(attached_programs(cgroup.path()).is_empty(), "{said}");
}

#[test]
fn restart_takes_over_pinned_programs() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("takeover");
    let _detach = Detach(&cgroup);
    let mut first = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--fail-closed"],
    );
    first.signal(libc::SIGKILL);
    assert!(first.wait_exit(LOG_WAIT).is_some());
    let second = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "127.0.0.2/32", "--fail-closed"],
    );
    assert!(
        second.stderr().contains("took over the kill switch"),
        "{}",
        second.stderr()
    );
    let mut programs = attached_programs(cgroup.path());
    programs.sort();
    assert_eq!(
        programs,
        [
            "connect4",
            "connect6",
            "getpeername4",
            "getpeername6",
            "recvmsg4",
            "recvmsg6",
            "sendmsg4",
            "sendmsg6",
            "sock_ops"
        ]
    );
    assert_eq!(
        probe(&cgroup, origin.addr()),
        "data:ping",
        "{}",
        second.stderr()
    );
    assert_eq!(squid.wait_connects(origin.addr(), 1, LOG_WAIT).len(), 1);
}

/// A local user binds the dead daemon's listener port: the pinned programs hand it nothing
/// (they redirect only to a listener of the daemon's, proven alive), and the cgroup's connects
/// are refused instead. Before, the squatter received them in plain text.
#[test]
fn a_user_who_binds_a_dead_daemons_port_receives_nothing() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("squat");
    let _detach = Detach(&cgroup);
    let (listen, _) = kill_fail_closed(&squid, &cgroup, "127.0.0.2/32");

    let mut squatter = as_nobody(client_bin())
        .args(["squat", &listen.to_string(), "3"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the squatter");
    let mut lines = BufReader::new(squatter.stdout.take().expect("stdout")).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("listening"),
        "user nobody could not bind {listen}"
    );
    assert_eq!(probe(&cgroup, origin.addr()), "refused");
    assert!(squatter.wait().expect("squatter").success());
    let got: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(got.is_empty(), "the squatter received {got:?}");
    assert_eq!(origin.hits(), 0, "traffic went around the dead proxy");
}

/// A process of the cgroup that gets the dead daemon's pid is not exempt from interception.
/// The kernel sees the daemon's own connects by its pid, but only while its listener is alive:
/// a pid is reused only after its process is gone, and its sockets close before that.
#[test]
fn a_process_with_a_dead_daemons_pid_is_not_exempt() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("pidreuse");
    let _detach = Detach(&cgroup);
    let (_, pid) = kill_fail_closed(&squid, &cgroup, "127.0.0.2/32");
    // A fork loop gets the pid in seconds (32,373 forks in 7 s here); clone3 gets it at once.
    let out = run(cgroup.command(client_bin()).args([
        "as-pid",
        &pid.to_string(),
        &NOBODY.0.to_string(),
        &NOBODY.1.to_string(),
        &origin.addr().to_string(),
    ]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("pid {pid} uid {}: refused", NOBODY.0)
    );
    assert_eq!(origin.hits(), 0, "traffic went around the dead proxy");
}

/// With the kill switch, IPv6 cannot go around the proxy: a listener that cannot bind (a user
/// holds its address first) stops the start, and with no IPv6 listener at all (`--listen6
/// off`), intercepted IPv6 destinations are refused.
#[test]
fn ipv6_cannot_escape_the_kill_switch() {
    let squid = Squid::start(&[]);
    let cgroup = TestCgroup::new("v6escape");
    let _detach = Detach(&cgroup);

    let taken = SocketAddr::from((Ipv6Addr::LOCALHOST, free_port_v6()));
    let mut holder = as_nobody(client_bin())
        .args(["squat", &taken.to_string(), "20"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the holder");
    let mut lines = BufReader::new(holder.stdout.take().expect("stdout")).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("listening")
    );
    let (mut cmd, _) = Daemon::command(Command::new(transproxy_bin()), &squid.url(), &cgroup);
    let said = refuses_to_start(
        cmd.args([
            "--include",
            "::1",
            "--fail-closed",
            "--listen6",
            &taken.to_string(),
        ]),
        &format!("cannot listen on {taken}"),
    );
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(attached_programs(cgroup.path()).is_empty(), "{said}");

    let origin = Origin::echo(Ipv6Addr::LOCALHOST);
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &["--include", "::1", "--fail-closed", "--listen6", "off"],
    );
    assert!(
        daemon.ready_line().contains("IPv6 destinations refused"),
        "{}",
        daemon.ready_line()
    );
    assert_eq!(probe(&cgroup, origin.addr()), "refused");
    assert_eq!(origin.hits(), 0);
}

/// Pins left by a stopped fail-closed daemon would refuse every connect of the cgroup even
/// under a new daemon (their programs run first). Any start takes them over, saying so, and a
/// start that fails leaves no pins of its own.
#[test]
fn a_plain_start_takes_over_stale_pins_and_a_failed_start_leaves_none() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("stalepins");
    let _detach = Detach(&cgroup);
    let (_, dead) = kill_fail_closed(&squid, &cgroup, "127.0.0.2/32");

    let mut daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
    assert!(
        daemon.stderr().contains(&format!(
            "took over the kill switch left on this cgroup by a stopped transproxy (pid {dead})"
        )),
        "{}",
        daemon.stderr()
    );
    assert_eq!(
        probe(&cgroup, origin.addr()),
        "data:ping",
        "{}",
        daemon.stderr()
    );
    assert_eq!(squid.wait_connects(origin.addr(), 1, LOG_WAIT).len(), 1);
    // Fail-open again: stopping it detaches everything.
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(LOG_WAIT).is_some());
    assert!(attached_programs(cgroup.path()).is_empty());
    assert_eq!(probe(&cgroup, origin.addr()), "data:ping");

    // A fail-closed start that fails after pinning (the proxy's name does not resolve) removes
    // its pins: no kill switch without a daemon.
    let (mut cmd, _) = Daemon::command(
        Command::new(transproxy_bin()),
        "http://transproxy-no-such-host.invalid:3128",
        &cgroup,
    );
    refuses_to_start(
        cmd.args(["--include", "127.0.0.2/32", "--fail-closed"]),
        "cannot resolve proxy host",
    );
    let out = detach(&cgroup);
    assert_eq!(
        text(&out.stdout).trim(),
        "transproxy: no kill switch to remove"
    );
    assert!(attached_programs(cgroup.path()).is_empty());
}

/// A second daemon on a cgroup whose kill switch belongs to a running one is refused: taking
/// its pins would silently end its interception.
#[test]
fn a_running_kill_switch_is_not_taken_over() {
    let squid = Squid::start(&[]);
    let cgroup = TestCgroup::new("liveowner");
    let _detach = Detach(&cgroup);
    let first = Daemon::run(
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
    let (mut cmd, _) = Daemon::command(Command::new(transproxy_bin()), &squid.url(), &cgroup);
    refuses_to_start(
        cmd.args(["--include", "127.0.0.2/32", "--listen6", "off"]),
        &format!("transproxy pid {} already intercepts", first.pid()),
    );
    let mut programs = attached_programs(cgroup.path());
    programs.sort();
    // Nine: connect, getpeername, sendmsg and recvmsg for each family (DNS is captured by
    // default), and sock_ops.
    assert_eq!(programs.len(), 9, "{programs:?}");
}

/// A socket whose redirected connect failed, and which then connected elsewhere directly,
/// leaves nothing behind: whoever connects to the listener from its address afterwards gets a
/// reset, not a tunnel to the destination it had asked for.
#[test]
fn a_failed_redirect_leaves_no_record_for_someone_else() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let direct = Origin::echo(Ipv6Addr::LOCALHOST);
    let cgroup = TestCgroup::new("stalerecord");
    let listen6 = SocketAddr::from((Ipv6Addr::LOCALHOST, free_port_v6()));
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &[
            "--include",
            "127.0.0.2/32",
            "--listen6",
            &listen6.to_string(),
        ],
    );
    let mut inside = cgroup
        .command(client_bin())
        .args([
            "stale-record",
            &origin.addr().to_string(),
            &direct.addr().to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start tp-client");
    let mut said = BufReader::new(inside.stdout.take().expect("stdout")).lines();
    let line = said.next().and_then(Result::ok).unwrap_or_default();
    let port: u16 = line
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("tp-client said {line:?}"));
    // Its peer is the server it reached, not the destination of the failed redirect.
    assert_eq!(
        said.next().and_then(Result::ok).unwrap_or_default(),
        format!("peer {}", direct.addr())
    );
    drop(inside.stdin.take());
    let _ = inside.wait();

    // The outsider takes that address (its connection is in TIME_WAIT) and calls the listener.
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&SocketAddr::from((Ipv6Addr::LOCALHOST, port)).into())
        .unwrap();
    socket.connect(&listen6.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The reset may arrive before the write, which then reports it (and a read after it sees
    // only the end), or after it, and then the read reports it. A close would fail neither.
    let wrote = stream.write_all(b"ping\n");
    let mut answer = String::new();
    let got = BufReader::new(&stream).read_line(&mut answer);
    let reset = |err: Option<&std::io::Error>| {
        err.is_some_and(|err| {
            matches!(
                err.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            )
        })
    };
    assert!(
        reset(wrote.as_ref().err()) || reset(got.as_ref().err()),
        "the outsider wrote {wrote:?} and got {got:?} {answer:?}; daemon: {}",
        daemon.stderr()
    );
    assert_eq!(origin.hits(), 0);
    squid.assert_no_connect(origin.addr());
}

/// Records live with their socket: a process of the cgroup making endless connects that are
/// recorded and then fail cannot evict the record of another's open connection (whose
/// getpeername() still reports its destination), nor stop new ones.
#[test]
fn failing_connects_cannot_evict_other_records() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("evict");
    let daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
    let mut session = cgroup
        .command(client_bin())
        .args(["echo-session", &origin.addr().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start tp-client");
    let mut to_session = session.stdin.take().expect("stdin");
    let mut from_session = BufReader::new(session.stdout.take().expect("stdout")).lines();
    let mut ask = |line: &str| {
        writeln!(to_session, "{line}").expect("write to the session");
        from_session.next().and_then(Result::ok).unwrap_or_default()
    };
    assert_eq!(ask("one"), "one");
    let peer = format!("peer {}", origin.addr());
    assert_eq!(ask("#peer"), peer);

    // More failing connects than a map of records keyed by socket cookie would hold (65,536).
    let out = run(cgroup.command(client_bin()).args([
        "failing-connects",
        &origin.addr().to_string(),
        "70000",
    ]));
    assert_eq!(
        text(&out.stdout).trim(),
        "failed 70000",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        ask("#peer"),
        peer,
        "the open connection's record was evicted"
    );
    assert_eq!(ask("two"), "two");
    assert_eq!(
        probe(&cgroup, origin.addr()),
        "data:ping",
        "{}",
        daemon.stderr()
    );
    drop(to_session);
    let _ = session.wait();
}

/// `--refuse-udp`: UDP to intercepted destinations fails (so QUIC falls back to TCP), DNS and
/// destinations no rule intercepts pass; with the kill switch, also once the daemon is gone.
#[test]
fn refuse_udp_stops_udp_but_not_dns() {
    let squid = Squid::start(&[]);
    let cgroup = TestCgroup::new("udp");
    let _detach = Detach(&cgroup);
    let udp = |addr: SocketAddr| {
        let out = run(cgroup
            .command(client_bin())
            .args(["udp", &addr.to_string()]));
        text(&out.stdout).trim().to_owned()
    };
    let quic = SocketAddr::from((ORIGIN_IP, 443));
    let refused = "sendto:error:Operation not permitted (os error 1)\nconnected:error:Operation not permitted (os error 1)";
    let passed = "sendto:ok\nconnected:ok";
    assert_eq!(udp(quic), passed, "UDP refused with no daemon");
    let mut daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &[
            "--include",
            "127.0.0.2/32",
            "--refuse-udp",
            "--fail-closed",
            "--listen6",
            "off",
        ],
    );
    assert!(
        daemon
            .ready_line()
            .contains("UDP to intercepted destinations refused")
    );
    assert_eq!(udp(quic), refused);
    assert_eq!(udp(SocketAddr::from((ORIGIN_IP, 53))), passed);
    assert_eq!(udp(SocketAddr::from((OTHER_IP, 443))), passed);
    daemon.signal(libc::SIGKILL);
    assert!(daemon.wait_exit(LOG_WAIT).is_some());
    assert_eq!(udp(quic), refused, "UDP went around the dead daemon");
}

/// A connect to the unspecified address (`0.0.0.0`, `::`) reaches this host: the socket's bound
/// address, or loopback. Judged as such, it cannot go around the rules or the kill switch by
/// binding to an intercepted address first.
#[test]
fn connecting_to_the_unspecified_address_cannot_go_around() {
    let squid = Squid::start(&[]);
    let origin = Origin::echo(ORIGIN_IP);
    let origin6 = Origin::echo(Ipv6Addr::LOCALHOST);
    let cgroup = TestCgroup::new("unspecified");
    let _detach = Detach(&cgroup);
    let listen6 = SocketAddr::from((Ipv6Addr::LOCALHOST, free_port_v6()));
    let mut daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &[
            "--include",
            "127.0.0.2/32",
            "--include",
            &format!("[::1]:{}", origin6.addr().port()),
            "--listen6",
            &listen6.to_string(),
            "--fail-closed",
        ],
    );
    let bound_probe = |ip: &str, dst: SocketAddr| {
        let out = run(cgroup.command(client_bin()).args([
            "bound-probe",
            &format!("{ip}:0"),
            &dst.to_string(),
        ]));
        text(&out.stdout).trim().to_owned()
    };
    let any4 = SocketAddr::from(([0, 0, 0, 0], origin.addr().port()));
    let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, origin6.addr().port()));
    assert_eq!(
        bound_probe("127.0.0.2", any4),
        "data:ping",
        "{}",
        daemon.stderr()
    );
    assert_eq!(
        bound_probe("[::1]", any6),
        "data:ping",
        "{}",
        daemon.stderr()
    );
    assert_eq!(squid.wait_connects(origin.addr(), 1, LOG_WAIT).len(), 1);
    assert_eq!(squid.wait_connects(origin6.addr(), 1, LOG_WAIT).len(), 1);

    daemon.signal(libc::SIGKILL);
    assert!(daemon.wait_exit(LOG_WAIT).is_some());
    assert_eq!(bound_probe("127.0.0.2", any4), "refused");
    assert_eq!(bound_probe("[::1]", any6), "refused");
    assert_eq!(
        origin.hits() + origin6.hits(),
        2,
        "traffic went around the dead proxy"
    );
}
