//! PAC files choosing the upstream per connection, from the name the application asked for:
//! two squids, DIRECT, a dead proxy then a live one; scripts that do not compile, throw or
//! loop; a PAC served over HTTP and changed while the daemon runs. Loopback only; names come
//! from the clients (curl --resolve) and squids' own hosts files.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use transproxy_tests::{
    Daemon, LOG_WAIT, ORIGIN_IP, OTHER_IP, Origin, Squid, TestCgroup, curl, free_local_addr, probe,
    text, wait_for,
};

/// A fourth loopback address for origins no rule of the PAC names.
const DIRECT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);

fn write_pac(path: &Path, script: &str) {
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(script.as_bytes()).unwrap();
}

/// A daemon taking its upstreams from `pac`, intercepting 127.0.0.2-4.
fn pac_daemon(pac: &str, cgroup: &TestCgroup, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--pac",
        pac,
        "--include",
        "127.0.0.2/31",
        "--include",
        "127.0.0.4/32",
    ];
    args.extend_from_slice(extra);
    // Daemon::run names a proxy: with --pac it only lends credentials; give it one that is
    // never chosen by these scripts.
    Daemon::run(&format!("http://{}", free_local_addr()), cgroup, &args)
}

/// As [`pac_daemon`], with the daemon's own names (its resolver decides where a name leads)
/// from a hosts file; the hosts file lives as long as the daemon.
fn pac_daemon_resolving(
    pac: &Path,
    names: &[(&str, IpAddr)],
    cgroup: &TestCgroup,
) -> (Daemon, transproxy_tests::PrivateHosts) {
    let hosts = transproxy_tests::PrivateHosts::new(names);
    let (mut cmd, listen) = Daemon::command(
        hosts.command(transproxy_tests::transproxy_bin()),
        &format!("http://{}", free_local_addr()),
        cgroup,
    );
    cmd.arg("--pac")
        .arg(pac)
        .args(["--include", "127.0.0.2/31", "--include", "127.0.0.4/32"]);
    (Daemon::spawn(cmd, listen), hosts)
}

/// `curl http://NAME:PORT/` with NAME resolving to `ip` (as the application asked for it).
fn fetch_named(cgroup: &TestCgroup, name: &str, ip: IpAddr, port: u16) -> (String, String) {
    let out = curl(
        cgroup
            .command("curl")
            .args(["--resolve", &format!("{name}:{port}:{ip}")]),
        &format!("http://{name}:{port}/"),
    );
    (text(&out.stdout), text(&out.stderr))
}

#[test]
fn each_connection_goes_where_the_pac_file_says() {
    let a_names = [
        ("origin.test", IpAddr::from(ORIGIN_IP)),
        ("www.b.test", IpAddr::from(ORIGIN_IP)),
    ];
    let a = Squid::start_resolving(&a_names);
    let b = Squid::start_resolving(&a_names);
    let dead = free_local_addr();
    let web = Origin::http(ORIGIN_IP, "routed body");
    let other = Origin::http(OTHER_IP, "fallback body");
    let direct = Origin::http(DIRECT_IP, "direct body");
    let dir = tempfile::tempdir().unwrap();
    let pac = dir.path().join("proxy.pac");
    write_pac(
        &pac,
        &format!(
            r#"function FindProxyForURL(url, host) {{
                if (host == "origin.test") return "PROXY {a}";
                if (dnsDomainIs(host, ".b.test") && shExpMatch(url, "http://*.b.test:*/"))
                    return "PROXY {b}";
                if (isInNet(dnsResolve(host), "127.0.0.4", "255.255.255.255")) return "DIRECT";
                return "PROXY {dead}; PROXY {a}";
            }}"#,
            a = a.addr(),
            b = b.addr(),
        ),
    );
    let cgroup = TestCgroup::new("pac");
    let daemon = pac_daemon(&pac.display().to_string(), &cgroup, &[]);
    assert!(
        daemon.ready_line().contains("the PAC file"),
        "{}",
        daemon.ready_line()
    );
    let port = web.addr().port();

    let (body, said) = fetch_named(&cgroup, "origin.test", ORIGIN_IP.into(), port);
    assert_eq!(body, "routed body", "{said}\n{}", daemon.stderr());
    a.wait_connects_to(&format!("origin.test:{port}"), 1, LOG_WAIT);

    let (body, said) = fetch_named(&cgroup, "www.b.test", ORIGIN_IP.into(), port);
    assert_eq!(body, "routed body", "{said}\n{}", daemon.stderr());
    b.wait_connects_to(&format!("www.b.test:{port}"), 1, LOG_WAIT);

    let out = curl(
        &mut cgroup.command("curl"),
        &format!("http://{}/", direct.addr()),
    );
    assert_eq!(text(&out.stdout), "direct body", "{}", daemon.stderr());

    let out = curl(
        &mut cgroup.command("curl"),
        &format!("http://{}/", other.addr()),
    );
    assert_eq!(text(&out.stdout), "fallback body", "{}", daemon.stderr());
    a.wait_connects(other.addr(), 1, LOG_WAIT);
    assert!(
        daemon
            .stderr()
            .contains(&format!("proxy http://{dead} is down")),
        "{}",
        daemon.stderr()
    );
    // DIRECT went to neither squid.
    std::thread::sleep(Duration::from_millis(300));
    assert!(a.connect_lines(direct.addr()).is_empty());
    assert!(b.connect_lines(direct.addr()).is_empty());
}

/// Scripts that do not compile, throw, or loop: the client is reset and one line says why; the
/// loop is cut, and the daemon serves the next tunnel. With --pac-fallback direct, the script's
/// own failures go direct instead; a call cut for time does not (a client can make a script
/// slow, with long URLs or many new names, and must not get around the proxy by it).
#[test]
fn a_broken_pac_fails_closed_unless_told_otherwise() {
    let web = Origin::http(ORIGIN_IP, "fallback direct");
    let dir = tempfile::tempdir().unwrap();
    let cgroup = TestCgroup::new("pacbroken");
    for (script, said, falls_back) in [
        (
            "function FindProxyForURL(url, host) {",
            "the script does not compile",
            true,
        ),
        (
            "function FindProxyForURL(url, host) { throw new Error('no way'); }",
            "FindProxyForURL threw",
            true,
        ),
        (
            "function FindProxyForURL(url, host) { while (true) {} }",
            "ran longer than 200 ms and was cut",
            false,
        ),
        (
            "function FindProxyForURL(url, host) { return 'GOPHER 127.0.0.9:70'; }",
            "FindProxyForURL returned 'GOPHER'",
            true,
        ),
    ] {
        let pac = dir.path().join("broken.pac");
        write_pac(&pac, script);
        let daemon = pac_daemon(&pac.display().to_string(), &cgroup, &[]);
        assert_eq!(probe(&cgroup, web.addr()), "reset", "{script}");
        let logged = wait_for(LOG_WAIT, || daemon.stderr().contains(said).then_some(()));
        assert!(logged.is_some(), "{script}: {}", daemon.stderr());
        assert!(!daemon.stderr().contains("panicked"), "{}", daemon.stderr());
        // Still serving: a second connection gets the same clear answer.
        assert_eq!(probe(&cgroup, web.addr()), "reset", "{script}");
        drop(daemon);

        let daemon = pac_daemon(
            &pac.display().to_string(),
            &cgroup,
            &["--pac-fallback", "direct"],
        );
        let out = curl(
            &mut cgroup.command("curl"),
            &transproxy_tests::url(web.addr()),
        );
        let expected = if falls_back { "fallback direct" } else { "" };
        assert_eq!(text(&out.stdout), expected, "{script}: {}", daemon.stderr());
    }
}

/// A local HTTP server (python3's) serving a directory.
struct PacServer {
    child: Child,
    addr: SocketAddr,
}

impl PacServer {
    fn start(dir: &Path) -> Self {
        let addr = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 5), free_local_addr().port()));
        let child = Command::new("python3")
            .args(["-m", "http.server", &addr.port().to_string(), "--bind"])
            .arg(addr.ip().to_string())
            .arg("--directory")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server");
        let up = wait_for(Duration::from_secs(10), || {
            std::net::TcpStream::connect(addr).ok()
        });
        assert!(up.is_some(), "python3 http.server did not listen on {addr}");
        Self { child, addr }
    }
}

impl Drop for PacServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PAC served over HTTP, changed on disk: SIGHUP fetches it again, and new tunnels follow it.
#[test]
fn a_pac_url_is_fetched_again_on_sighup() {
    let a = Squid::start(&[]);
    let b = Squid::start(&[]);
    let web = Origin::http(ORIGIN_IP, "served body");
    let dir = tempfile::tempdir().unwrap();
    let pac = dir.path().join("wpad.dat");
    let to = |squid: &Squid| {
        format!(
            "function FindProxyForURL(url, host) {{ return \"PROXY {}\"; }}",
            squid.addr()
        )
    };
    write_pac(&pac, &to(&a));
    let server = PacServer::start(dir.path());
    let cgroup = TestCgroup::new("pacurl");
    let daemon = pac_daemon(
        &format!("http://{}/wpad.dat", server.addr),
        &cgroup,
        &["--sniff-timeout", "0s"],
    );
    let out = curl(
        &mut cgroup.command("curl"),
        &transproxy_tests::url(web.addr()),
    );
    assert_eq!(text(&out.stdout), "served body", "{}", daemon.stderr());
    a.wait_connects(web.addr(), 1, LOG_WAIT);

    write_pac(&pac, &to(&b));
    let loaded = daemon.stderr().matches("PAC: loaded").count();
    daemon.signal(libc::SIGHUP);
    let again = wait_for(LOG_WAIT, || {
        (daemon.stderr().matches("PAC: loaded").count() > loaded).then_some(())
    });
    assert!(again.is_some(), "{}", daemon.stderr());
    let out = curl(
        &mut cgroup.command("curl"),
        &transproxy_tests::url(web.addr()),
    );
    assert_eq!(text(&out.stdout), "served body", "{}", daemon.stderr());
    b.wait_connects(web.addr(), 1, LOG_WAIT);
}

/// A process claiming a name the script sends DIRECT (its SNI or Host) for an address that
/// name does not lead to gets no direct connection: DIRECT for a name goes only where this
/// host's resolver says the name leads (the daemon's hosts file here).
#[test]
fn direct_by_name_goes_only_where_the_name_leads() {
    let squid = Squid::start(&[]);
    let inside = Origin::http(ORIGIN_IP, "inside body");
    let elsewhere = Origin::http(OTHER_IP, "elsewhere body");
    let dir = tempfile::tempdir().unwrap();
    let pac = dir.path().join("corp.pac");
    write_pac(
        &pac,
        &format!(
            r#"function FindProxyForURL(url, host) {{
                if (dnsDomainIs(host, ".corp.test")) return "DIRECT";
                return "PROXY {}";
            }}"#,
            squid.addr()
        ),
    );
    let cgroup = TestCgroup::new("pacdirect");
    let (daemon, _hosts) = pac_daemon_resolving(
        &pac,
        &[("intranet.corp.test", IpAddr::from(ORIGIN_IP))],
        &cgroup,
    );

    let (body, said) = fetch_named(
        &cgroup,
        "intranet.corp.test",
        ORIGIN_IP.into(),
        inside.addr().port(),
    );
    assert_eq!(body, "inside body", "{said}\n{}", daemon.stderr());

    // The same name, claimed for another address: not direct, and the answer has nothing else.
    let (body, _) = fetch_named(
        &cgroup,
        "intranet.corp.test",
        OTHER_IP.into(),
        elsewhere.addr().port(),
    );
    assert_eq!(body, "", "{}", daemon.stderr());
    let said = wait_for(LOG_WAIT, || {
        daemon
            .stderr()
            .contains("PAC: nothing in the answer can be used")
            .then_some(())
    });
    assert!(said.is_some(), "{}", daemon.stderr());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(squid.all_connects(), 0, "{}", squid.access_log());
}

/// The script may decide on the address (`dnsResolve(host)` is where the connection goes):
/// an answer given for a name at one address is not reused for the same name at another. A
/// client claiming `public.test` at an address the script sends DIRECT must not make later
/// connections to the real `public.test` go direct.
#[test]
fn answers_are_kept_per_address_too() {
    let squid = Squid::start_resolving(&[("public.test", IpAddr::from(ORIGIN_IP))]);
    let web = Origin::http(ORIGIN_IP, "public body");
    let dir = tempfile::tempdir().unwrap();
    let pac = dir.path().join("by-address.pac");
    write_pac(
        &pac,
        &format!(
            r#"function FindProxyForURL(url, host) {{
                if (isInNet(dnsResolve(host), "127.0.0.4", "255.255.255.255")) return "DIRECT";
                return "PROXY {}";
            }}"#,
            squid.addr()
        ),
    );
    let cgroup = TestCgroup::new("pacperaddr");
    let (daemon, _hosts) =
        pac_daemon_resolving(&pac, &[("public.test", IpAddr::from(ORIGIN_IP))], &cgroup);
    let port = web.addr().port();
    // The claim: public.test at 127.0.0.4. DIRECT, but the name does not lead there: reset.
    let (body, _) = fetch_named(&cgroup, "public.test", DIRECT_IP.into(), port);
    assert_eq!(body, "", "{}", daemon.stderr());
    // The real one: asked of the script again, through the proxy.
    let (body, said) = fetch_named(&cgroup, "public.test", ORIGIN_IP.into(), port);
    assert_eq!(body, "public body", "{said}\n{}", daemon.stderr());
    squid.wait_connects_to(&format!("public.test:{port}"), 1, LOG_WAIT);
}

/// A proxy only the PAC file names gets no credentials of any kind: not the listed proxy's
/// password, and not through Negotiate's default credentials (gss-ntlmssp would use the
/// password the daemon holds for the listed proxy) though Kerberos is configured.
#[test]
fn a_proxy_only_the_pac_names_gets_no_credentials() {
    let squid = Squid::start_with_auth(vec![transproxy_tests::SquidAuth::NtlmInNegotiate {
        domain: "DOM".into(),
        user: "victim".into(),
        password: "S3cretPw".into(),
    }]);
    let web = Origin::http(ORIGIN_IP, "should not open");
    let dir = tempfile::tempdir().unwrap();
    let pac = dir.path().join("elsewhere.pac");
    write_pac(
        &pac,
        &format!(
            "function FindProxyForURL(url, host) {{ return \"PROXY {}\"; }}",
            squid.addr()
        ),
    );
    let cgroup = TestCgroup::new("pacnocreds");
    let listed = format!("http://DOM%5Cvictim:S3cretPw@{}", free_local_addr());
    // Kerberos is configured (so Negotiate would be tried), with a krb5.conf of the test's
    // own: the system's names a public realm, and nothing here may ask DNS about it.
    let krb5_conf = dir.path().join("krb5.conf");
    std::fs::write(
        &krb5_conf,
        "[libdefaults]\ndefault_realm = TEST.LOCAL\ndns_lookup_kdc = false\ndns_lookup_realm = false\n[realms]\nTEST.LOCAL = {\n  kdc = 127.0.0.1:1\n}\n",
    )
    .unwrap();
    let (mut cmd, listen) = Daemon::command(
        Command::new(transproxy_tests::transproxy_bin()),
        &listed,
        &cgroup,
    );
    cmd.arg("--pac")
        .arg(&pac)
        .args(["--include", "127.0.0.2/32"])
        .args([
            "--proxy-auth-ccache",
            "FILE:/nonexistent/transproxy-test-ccache",
        ])
        .env("KRB5_CONFIG", &krb5_conf);
    let daemon = Daemon::spawn(cmd, listen);
    assert_eq!(probe(&cgroup, web.addr()), "reset");
    let said = wait_for(LOG_WAIT, || {
        daemon
            .stderr()
            .contains("no credentials were sent")
            .then_some(())
    });
    assert!(said.is_some(), "{}", daemon.stderr());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !squid.access_log().contains("victim"),
        "{}",
        squid.access_log()
    );
}
