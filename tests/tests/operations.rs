//! Operating it: `transproxy status`, the access log and metrics show live tunnels with the
//! processes behind them; and the first-day mistakes that used to fail silently.
//!
//! Real daemon, real kernel, real squid; curl and a real python client; loopback only.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
};

use transproxy_tests::{
    Daemon, Detach, LOG_WAIT, ORIGIN_IP, Origin, Squid, TestCgroup, bpf::map_entries, curl,
    fast_proxy_bin, free_local_addr, run, text, transproxy_bin, url, wait_for,
};

/// `transproxy status --json`, parsed.
fn status_json() -> serde_json::Value {
    let out = run(Command::new(transproxy_bin()).args(["status", "--json"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

/// This daemon's part of `status --json`.
fn daemon_status(pid: i32) -> serde_json::Value {
    status_json()["daemons"]
        .as_array()
        .and_then(|daemons| daemons.iter().find(|d| d["pid"] == pid).cloned())
        .unwrap_or_else(|| panic!("daemon {pid} not in status: {}", status_json()))
}

/// A python3 client inside `cgroup` holding one tunnel to an echo `origin` open until its
/// stdin closes: connects, sends a line, reads it back, prints `ready`.
fn python_holding(cgroup: &TestCgroup, origin: SocketAddr) -> std::process::Child {
    let script = format!(
        "import socket,sys\n\
         s=socket.create_connection(('{}',{}))\n\
         s.sendall(b'ping\\n'); s.recv(64)\n\
         print('ready', flush=True)\n\
         sys.stdin.read()\n",
        origin.ip(),
        origin.port()
    );
    let mut child = cgroup
        .command("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "ready");
    child
}

/// One scrape of `--metrics`, parsed by a Prometheus text parser.
fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let out = run(Command::new("curl").args([
        "--silent",
        "--fail",
        "--max-time",
        "5",
        &format!("http://{addr}/metrics"),
    ]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let body = text(&out.stdout);
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("metrics do not parse ({e}):\n{body}"))
}

/// The value of `name` with `labels` in `scrape`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

#[test]
fn status_access_log_and_metrics_show_live_tunnels_with_their_process() {
    let squid = Squid::start(&[]);
    let echo = Origin::echo(ORIGIN_IP);
    let web = Origin::http(ORIGIN_IP, "body");
    let cgroup = TestCgroup::new("operations");
    let log = tempfile::NamedTempFile::new().unwrap();
    let metrics = free_local_addr();
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &[
            "--include",
            "127.0.0.2/32",
            "--access-log",
            &log.path().to_string_lossy(),
            "--metrics",
            &metrics.to_string(),
        ],
    );
    let mut python = python_holding(&cgroup, echo.addr());
    let python_pid = python.id();

    // status: the python client's open tunnel, with its process and cgroup.
    let status = daemon_status(daemon.pid());
    let tunnels = status["tunnels"].as_array().unwrap();
    let tunnel = tunnels
        .iter()
        .find(|t| t["command"] == "python3")
        .unwrap_or_else(|| panic!("no python3 tunnel: {status}"));
    assert_eq!(tunnel["pid"], python_pid, "{tunnel}");
    assert_eq!(tunnel["uid"], 0);
    assert_eq!(tunnel["destination"], echo.addr().to_string());
    assert_eq!(tunnel["upstream"], squid.addr().to_string());
    assert_eq!(tunnel["phase"], "relaying");
    assert_eq!(tunnel["bytes_up"], 5);
    assert_eq!(tunnel["bytes_down"], 5);
    assert_eq!(tunnel["cgroup"], cgroup.path().display().to_string());
    let human = text(&run(Command::new(transproxy_bin()).arg("status")).stdout);
    assert!(
        human.contains(&format!(
            "python3 (pid {python_pid}, uid 0) -> {}",
            echo.addr()
        )),
        "{human}"
    );

    // metrics, while it is open.
    let scraped = scrape(metrics);
    assert_eq!(sample(&scraped, "transproxy_tunnels_open", &[]), 1.0);

    // curl through: its line in the access log, and the counters move.
    let out = curl(&mut cgroup.command("curl"), &url(web.addr()));
    assert_eq!(text(&out.stdout), "body", "{}", text(&out.stderr));
    let line = wait_for(LOG_WAIT, || {
        std::fs::read_to_string(log.path())
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("\"command\":\"curl\""))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("no curl line in the access log: {}", daemon.stderr()));
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(record["outcome"], "tunnelled", "{line}");
    assert_eq!(record["destination"], web.addr().to_string());
    assert_eq!(record["upstream"], squid.addr().to_string());
    assert_eq!(record["cgroup"], cgroup.path().display().to_string());
    assert!(record["bytes_down"].as_u64().unwrap() > 4, "{line}");
    assert!(record["time"].as_str().unwrap().ends_with('Z'), "{line}");
    let scraped = scrape(metrics);
    assert_eq!(
        sample(
            &scraped,
            "transproxy_tunnels_total",
            &[("outcome", "tunnelled")]
        ),
        1.0
    );
    assert!(sample(&scraped, "transproxy_connections_accepted_total", &[]) >= 2.0);
    assert!(sample(&scraped, "transproxy_bytes_total", &[("direction", "down")]) > 4.0);

    // The python client ends: its line too.
    drop(python.stdin.take());
    let _ = python.wait();
    let line = wait_for(LOG_WAIT, || {
        std::fs::read_to_string(log.path())
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("\"command\":\"python3\""))
            .map(str::to_owned)
    })
    .expect("no python3 line in the access log");
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(record["pid"], python_pid);
    assert_eq!(
        sample(&scrape(metrics), "transproxy_tunnels_open", &[]),
        0.0
    );
}

/// SIGHUP reopens the access log, as logrotate needs: lines go to the new file.
#[test]
fn sighup_reopens_the_access_log() {
    let squid = Squid::start(&[]);
    let web = Origin::http(ORIGIN_IP, "body");
    let cgroup = TestCgroup::new("logrotate");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let daemon = Daemon::run(
        &squid.url(),
        &cgroup,
        &[
            "--include",
            "127.0.0.2/32",
            "--access-log",
            &log.to_string_lossy(),
        ],
    );
    let fetch = || {
        let out = curl(&mut cgroup.command("curl"), &url(web.addr()));
        assert_eq!(text(&out.stdout), "body", "{}", text(&out.stderr));
    };
    let lines = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .count()
    };
    fetch();
    assert!(wait_for(LOG_WAIT, || (lines(&log) == 1).then_some(())).is_some());
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    daemon.signal(libc::SIGHUP);
    // The reopen is queued behind nothing: give the writer a moment to create the file.
    assert!(wait_for(LOG_WAIT, || log.exists().then_some(())).is_some());
    fetch();
    assert!(
        wait_for(LOG_WAIT, || (lines(&log) == 1).then_some(())).is_some(),
        "{}",
        daemon.stderr()
    );
    assert_eq!(lines(&rotated), 1);
}

/// status shows a kill switch whose daemon has stopped, and what is attached where.
#[test]
fn status_shows_a_stopped_daemons_kill_switch() {
    let squid = Squid::start(&[]);
    let cgroup = TestCgroup::new("statuspins");
    let _detach = Detach(&cgroup);
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
    let pid = daemon.pid();
    let path = cgroup.path().display().to_string();
    let attached = |status: &serde_json::Value| {
        status["attached"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["cgroup"] == path)
            .cloned()
            .unwrap_or_else(|| panic!("{path} not attached: {status}"))
    };
    let status = status_json();
    assert_eq!(attached(&status)["by"], "daemon");
    assert_eq!(attached(&status)["pid"], pid);
    daemon.signal(libc::SIGKILL);
    assert!(daemon.wait_exit(LOG_WAIT).is_some());
    let status = status_json();
    assert_eq!(attached(&status)["by"], "kill switch (stopped daemon)");
    let switch = status["kill_switches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["cgroup"] == path)
        .cloned()
        .unwrap_or_else(|| panic!("no kill switch: {status}"));
    assert_eq!(switch["alive"], false);
    assert_eq!(switch["pid"], pid);
    let human = text(&run(Command::new(transproxy_bin()).arg("status")).stdout);
    assert!(
        human.contains(&format!(
            "kill switch on {path}: left by transproxy pid {pid} which has stopped"
        )),
        "{human}"
    );
}

/// A proxy on this host inside the intercepted cgroup (host-wide mode, a session cgroup) would
/// see its own connections sent back to it, in a loop. It is found and kept out, and the ready
/// line says how: by its cgroup when that is a unit of its own, by its user when that is a
/// system user (squid runs as `proxy`), else exactly its processes while they run.
#[test]
fn a_local_proxy_inside_the_cgroup_does_not_loop() {
    let origin = Origin::http(ORIGIN_IP, "body");
    let intercepted = TestCgroup::new("localproxy");
    let apps = intercepted.child("apps");
    let own = intercepted.child("squid.service");
    // Everything on loopback is intercepted, squid's own connects to the origin too.
    let args = ["--include", "127.0.0.0/8", "--max-tunnels", "50"];
    {
        let squid = Squid::start_in(&[], Some(&own));
        let daemon = Daemon::run(&squid.url(), &intercepted, &args);
        assert!(
            daemon.ready_line().contains(&format!(
                "is not intercepted: its cgroup {} is exempt",
                own.path().display()
            )),
            "{}",
            daemon.ready_line()
        );
        let out = curl(&mut apps.command("curl"), &url(origin.addr()));
        assert_eq!(text(&out.stdout), "body", "{}", daemon.stderr());
        squid.assert_connects(1);
    }
    {
        let squid = Squid::start_in(&[], Some(&apps));
        let daemon = Daemon::run(&squid.url(), &intercepted, &args);
        assert!(
            daemon.ready_line().contains("the local proxy squid")
                && daemon.ready_line().contains("its user (uid"),
            "{}",
            daemon.ready_line()
        );
        let out = curl(&mut apps.command("curl"), &url(origin.addr()));
        assert_eq!(text(&out.stdout), "body", "{}", daemon.stderr());
        squid.assert_connects(1);
    }
    // A proxy running as root next to the applications: its processes only.
    let listen = free_local_addr();
    let mut proxy = apps
        .command(fast_proxy_bin())
        .arg(listen.to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("tp-fast-proxy");
    let up = wait_for(LOG_WAIT, || std::net::TcpStream::connect(listen).ok());
    assert!(up.is_some(), "tp-fast-proxy did not start");
    let daemon = Daemon::run(&format!("http://{listen}"), &intercepted, &args);
    assert!(
        daemon.ready_line().contains(&format!(
            "its processes ({}) are exempt while they run",
            proxy.id()
        )),
        "{}",
        daemon.ready_line()
    );
    let out = curl(&mut apps.command("curl"), &url(origin.addr()));
    assert_eq!(text(&out.stdout), "body", "{}", daemon.stderr());
    // It exits: its pid is no longer exempt (anyone may get it next).
    let _ = proxy.kill();
    let _ = proxy.wait();
    let forgotten = wait_for(LOG_WAIT, || {
        (map_entries(intercepted.path(), "EXCLUDED_PIDS") == 0).then_some(())
    });
    assert!(forgotten.is_some(), "{}", daemon.stderr());
}

/// A proxy that does not answer is named at start (a warning, not a failure: laptops start
/// before their network).
#[test]
fn a_proxy_that_does_not_answer_is_reported_at_start() {
    let cgroup = TestCgroup::new("deadproxy");
    let nothing = free_local_addr();
    let daemon = Daemon::run(
        &format!("http://{nothing}"),
        &cgroup,
        &["--include", "127.0.0.2/32"],
    );
    let said = wait_for(LOG_WAIT, || {
        let stderr = daemon.stderr();
        stderr.contains("does not answer").then_some(stderr)
    })
    .unwrap_or_else(|| panic!("no warning: {}", daemon.stderr()));
    assert!(
        said.contains(&format!(
            "the proxy http://{nothing} does not answer at {nothing}"
        )),
        "{said}"
    );
}

/// A 407 says which schemes the proxy asked for and whether credentials were sent; with the
/// right ones, the tunnel opens and squid logs the user.
#[test]
fn a_407_says_what_the_proxy_asks_for() {
    let squid = Squid::start_with_basic_auth("alice", "S3cret!");
    let web = Origin::http(ORIGIN_IP, "body");
    let cgroup = TestCgroup::new("auth407");
    let fetch = |daemon: &Daemon| {
        let out = curl(&mut cgroup.command("curl"), &url(web.addr()));
        (text(&out.stdout), daemon.stderr())
    };
    let daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
    let (_, said) = fetch(&daemon);
    assert!(
        said.contains(
            "407 Proxy Authentication Required: it asks for Basic: no credentials were sent"
        ),
        "{said}"
    );
    drop(daemon);
    let wrong = squid.url().replace("http://", "http://alice:nope@");
    let daemon = Daemon::run(&wrong, &cgroup, &["--include", "127.0.0.2/32"]);
    let (_, said) = fetch(&daemon);
    assert!(
        said.contains("it asks for Basic; tried Basic: the Basic credentials were not accepted"),
        "{said}"
    );
    drop(daemon);
    let right = squid.url().replace("http://", "http://alice:S3cret%21@");
    let daemon = Daemon::run(&right, &cgroup, &["--include", "127.0.0.2/32"]);
    let (body, said) = fetch(&daemon);
    assert_eq!(body, "body", "{said}");
    let lines = squid.wait_connects(web.addr(), 3, LOG_WAIT);
    assert!(lines.iter().any(|l| l.contains(" alice ")), "{lines:?}");
}

/// Behind squid, a client that half-closes gets no answer (squid ends the whole tunnel at its
/// end-of-file): the log names that cause instead of a bare byte count.
#[test]
fn half_close_behind_squid_names_the_cause() {
    let squid = Squid::start(&[]);
    let origin = Origin::answer_after_eof(ORIGIN_IP);
    let cgroup = TestCgroup::new("halfcloselog");
    let daemon = Daemon::run(&squid.url(), &cgroup, &["--include", "127.0.0.2/32"]);
    let out = run(cgroup.command(transproxy_tests::client_bin()).args([
        "half-close",
        &origin.addr().to_string(),
        "hello",
    ]));
    assert_eq!(text(&out.stdout), "", "squid answered after all");
    let said = wait_for(LOG_WAIT, || {
        let stderr = daemon.stderr();
        stderr.contains("end-of-file").then_some(stderr)
    })
    .unwrap_or_else(|| panic!("no hint: {}", daemon.stderr()));
    assert!(
        said.contains("the proxy closed the tunnel right after the client's end-of-file"),
        "{said}"
    );
}
