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
    Daemon, Detach, LOG_WAIT, ORIGIN_IP, Origin, Squid, TestCgroup, curl, free_local_addr, run,
    text, transproxy_bin, url, wait_for,
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
