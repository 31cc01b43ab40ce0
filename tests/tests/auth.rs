//! Proxy authentication against real servers: squid with its own helpers for Basic, Digest,
//! NTLM (`ntlm_fake_auth`, which checks the handshake's shape), NTLM inside Negotiate
//! (gss-ntlmssp: a real password check) and Kerberos (a throwaway MIT KDC), as
//! test-servers.md measured them. Names resolve from hosts files; the Kerberos tools and the
//! daemon read the test realm's krb5.conf, never the system's.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use transproxy_tests::{
    Behavior, Daemon, HostileProxy, Kdc, LOG_WAIT, ORIGIN_IP, Origin, PrivateHosts, Squid,
    SquidAuth, TestCgroup, client_bin, curl, kdc, run, storm, text, transproxy_bin, url, wait_for,
};

/// `transproxy run` for `cgroup` through `proxy`, intercepting the origins' address.
fn daemon(proxy: &str, cgroup: &TestCgroup, args: &[&str]) -> Daemon {
    let (mut cmd, listen) =
        Daemon::command(std::process::Command::new(transproxy_bin()), proxy, cgroup);
    cmd.args(["--include", "127.0.0.2/32"])
        .args(args)
        .env("KRB5_CONFIG", quiet_krb5_conf());
    Daemon::spawn(cmd, listen)
}

/// A krb5.conf that asks DNS nothing (no realm lookups, no host name canonicalisation), for
/// daemons whose GSSAPI runs without a test realm (NTLM inside SPNEGO): the system's names
/// MIT's public realm.
fn quiet_krb5_conf() -> &'static std::path::Path {
    static CONF: std::sync::OnceLock<(tempfile::TempDir, std::path::PathBuf)> =
        std::sync::OnceLock::new();
    let (_, path) = CONF.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("krb5.conf");
        std::fs::write(
            &path,
            "[libdefaults]\ndefault_realm = TEST.LOCAL\ndns_lookup_kdc = false\ndns_lookup_realm = false\nrdns = false\ndns_canonicalize_hostname = false\n[realms]\nTEST.LOCAL = {\n  kdc = 127.0.0.1:1\n}\n",
        )
        .expect("write krb5.conf");
        (dir, path)
    });
    path
}

/// curl's body for `origin` from inside `cgroup`, and the daemon's log so far.
fn fetch(cgroup: &TestCgroup, origin: &Origin, daemon: &Daemon) -> (String, String) {
    let out = curl(&mut cgroup.command("curl"), &url(origin.addr()));
    (text(&out.stdout), daemon.stderr())
}

/// squid's access log lines of tunnels it opened (not its 407s).
/// Waits (up to `LOG_WAIT`) until there are `n`: a 407 is logged before the tunnel that
/// follows it, which squid logs only when it ends.
fn tunnels_logged(squid: &Squid, dst: SocketAddr, n: usize) -> Vec<String> {
    let tunnels = || -> Vec<String> {
        squid
            .connect_lines(dst)
            .into_iter()
            .filter(|l| !l.contains("/407 "))
            .collect()
    };
    wait_for(LOG_WAIT, || {
        let lines = tunnels();
        (lines.len() >= n).then_some(lines)
    })
    .unwrap_or_else(tunnels)
}

/// The proxy URL with `user:password` (percent-encoded as given).
fn with_user(squid: &Squid, user_password: &str) -> String {
    squid
        .url()
        .replace("http://", &format!("http://{user_password}@"))
}

#[test]
fn digest_authenticates_and_later_tunnels_reuse_the_nonce() {
    let squid = Squid::start_with_auth(vec![SquidAuth::Digest {
        user: "alice".into(),
        password: "S3cret!".into(),
    }]);
    let web = Origin::http(ORIGIN_IP, "digest body");
    let cgroup = TestCgroup::new("digest");
    let daemon = daemon(&with_user(&squid, "alice:S3cret%21"), &cgroup, &[]);
    for _ in 0..3 {
        let (body, said) = fetch(&cgroup, &web, &daemon);
        assert_eq!(body, "digest body", "{said}");
    }
    let lines = tunnels_logged(&squid, web.addr(), 3);
    assert!(
        lines.len() >= 3 && lines.iter().all(|l| l.contains(" alice ")),
        "{}",
        squid.access_log()
    );
    // Asked once: the later tunnels answered from their first request with the counted nonce.
    let asked = squid.access_log().matches("/407 ").count();
    assert_eq!(asked, 1, "{}", squid.access_log());
}

#[test]
fn ntlm_handshakes_per_connection_and_holds_the_clients_bytes() {
    let squid = Squid::start_with_auth(vec![SquidAuth::NtlmFake]);
    let web = Origin::http(ORIGIN_IP, "ntlm body");
    let echo = Origin::echo(ORIGIN_IP);
    let cgroup = TestCgroup::new("ntlm");
    let daemon = daemon(&with_user(&squid, "TEST%5Calice:S3cret%21"), &cgroup, &[]);
    // The first tunnel learns that the proxy wants NTLM (its request went ahead: the handshake
    // continues on a new connection); the next ones start with it, holding the request.
    for _ in 0..2 {
        let (body, said) = fetch(&cgroup, &web, &daemon);
        assert_eq!(body, "ntlm body", "{said}");
    }
    let lines = tunnels_logged(&squid, web.addr(), 2);
    assert!(
        lines.len() >= 2 && lines.iter().all(|l| l.contains("alice")),
        "{}",
        squid.access_log()
    );
    // 100 tunnels at once, each with its own three-request handshake.
    let counts = storm(&cgroup, echo.addr(), 100, 100);
    assert_eq!(
        counts.get("data").copied().unwrap_or(0),
        100,
        "{counts:?}\n{}",
        daemon.stderr()
    );
}

#[test]
fn ntlm_inside_negotiate_checks_the_password() {
    let squid = Squid::start_with_auth(vec![SquidAuth::NtlmInNegotiate {
        domain: "TEST".into(),
        user: "alice".into(),
        password: "S3cret!".into(),
    }]);
    let web = Origin::http(ORIGIN_IP, "spnego body");
    let cgroup = TestCgroup::new("ntlmssp");
    let right = daemon(&with_user(&squid, "TEST%5Calice:S3cret%21"), &cgroup, &[]);
    let (body, said) = fetch(&cgroup, &web, &right);
    assert_eq!(body, "spnego body", "{said}");
    let lines = tunnels_logged(&squid, web.addr(), 1);
    assert!(
        lines.iter().any(|l| l.contains("alice")),
        "{}",
        squid.access_log()
    );
    drop(right);

    let wrong = daemon(&with_user(&squid, "TEST%5Calice:nope"), &cgroup, &[]);
    let (body, said) = fetch(&cgroup, &web, &wrong);
    assert_eq!(body, "", "{said}");
    let rejected = wait_for(LOG_WAIT, || {
        let said = wrong.stderr();
        said.contains("tried Negotiate: the Negotiate credentials were not accepted")
            .then_some(())
    });
    assert!(rejected.is_some(), "{}", wrong.stderr());
}

/// The daemon for a Kerberos test: the proxy named `proxy.test` (its service principal comes
/// from the name), resolved from a hosts file of the daemon's own (kept with it: the daemon
/// resolves the proxy again every minute), the realm's krb5.conf, and the credentials cache
/// `ccache`.
fn kerberos_daemon(
    kdc: &Kdc,
    squid: &Squid,
    cgroup: &TestCgroup,
    ccache: &std::path::Path,
) -> (Daemon, PrivateHosts) {
    let hosts = PrivateHosts::new(&[(kdc::PROXY_HOST, "127.0.0.1".parse().unwrap())]);
    let proxy = format!("http://{}:{}", kdc::PROXY_HOST, squid.addr().port());
    let (mut cmd, listen) = Daemon::command(hosts.command(transproxy_bin()), &proxy, cgroup);
    cmd.args(["--include", "127.0.0.2/32", "--listen6", "off"])
        .args(["--proxy-auth-ccache", &format!("FILE:{}", ccache.display())])
        .env("KRB5_CONFIG", kdc.config());
    (Daemon::spawn(cmd, listen), hosts)
}

/// A service identity: with `--proxy-auth-keytab` and no ticket anywhere, the GSSAPI gets the
/// ticket from the keytab by itself (into the cache named), and tunnels authenticate as the
/// keytab's principal; a keytab others can read is refused at start, like the password file.
#[test]
fn a_keytab_gets_tickets_without_kinit() {
    let kdc = Kdc::start();
    let squid = Squid::start_with_auth(vec![SquidAuth::Kerberos {
        keytab: kdc.keytab(),
        krb5_config: kdc.config(),
    }]);
    let web = Origin::http(ORIGIN_IP, "keytab body");
    let cgroup = TestCgroup::new("keytab");
    let keytab = kdc.user_keytab();
    let ccache = kdc.ccache("cc.service");
    assert!(!ccache.exists());

    let hosts = PrivateHosts::new(&[(kdc::PROXY_HOST, "127.0.0.1".parse().unwrap())]);
    let proxy = format!("http://{}:{}", kdc::PROXY_HOST, squid.addr().port());
    let (mut cmd, listen) = Daemon::command(hosts.command(transproxy_bin()), &proxy, &cgroup);
    cmd.args(["--include", "127.0.0.2/32", "--listen6", "off"])
        .args(["--proxy-auth-ccache", &format!("FILE:{}", ccache.display())])
        .arg("--proxy-auth-keytab")
        .arg(&keytab)
        .env("KRB5_CONFIG", kdc.config());
    let daemon = Daemon::spawn(cmd, listen);

    let (body, said) = fetch(&cgroup, &web, &daemon);
    assert_eq!(body, "keytab body", "{said}\n{}", daemon.stderr());
    let lines = tunnels_logged(&squid, web.addr(), 1);
    assert!(
        lines.iter().any(|l| l.contains("user@TEST.LOCAL")),
        "{}",
        squid.access_log()
    );
    assert!(ccache.exists(), "the ticket went into the cache named");
    drop(daemon);

    // Readable by others: refused before anything is attached.
    std::fs::set_permissions(&keytab, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = run(std::process::Command::new(transproxy_bin())
        .args(["run", "--proxy", &proxy, "--cgroup"])
        .arg(cgroup.path())
        .arg("--proxy-auth-keytab")
        .arg(&keytab));
    let said = text(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("proxy-auth-keytab"), "{said}");
}

#[test]
fn kerberos_tickets_are_picked_up_as_kinit_leaves_them() {
    let kdc = Kdc::start();
    let squid = Squid::start_with_auth(vec![SquidAuth::Kerberos {
        keytab: kdc.keytab(),
        krb5_config: kdc.config(),
    }]);
    let web = Origin::http(ORIGIN_IP, "kerberos body");
    let cgroup = TestCgroup::new("kerberos");
    let ccache = kdc.ccache("cc.user");
    let (daemon, _hosts) = kerberos_daemon(&kdc, &squid, &cgroup, &ccache);

    // No ticket yet: one clear line, naming the fix.
    let (body, _) = fetch(&cgroup, &web, &daemon);
    assert_eq!(body, "");
    let said = wait_for(LOG_WAIT, || {
        let said = daemon.stderr();
        said.contains("no usable Kerberos ticket").then_some(said)
    })
    .unwrap_or_else(|| panic!("{}", daemon.stderr()));
    assert!(
        said.contains("HTTP/proxy.test") && said.contains("kinit"),
        "{said}"
    );

    // kinit while the daemon runs: the next tunnel authenticates, no restart.
    kdc.kinit(&ccache, "10h");
    let (body, said) = fetch(&cgroup, &web, &daemon);
    assert_eq!(body, "kerberos body", "{said}\n{}", squid.cache_log());
    let lines = tunnels_logged(&squid, web.addr(), 1);
    assert!(
        lines.iter().any(|l| l.contains("user@TEST.LOCAL")),
        "{}",
        squid.access_log()
    );

    // An expired ticket: a clear line again.
    kdc.kinit(&ccache, "2s");
    std::thread::sleep(Duration::from_secs(3));
    let before = daemon.stderr().matches("no usable Kerberos ticket").count();
    let (body, _) = fetch(&cgroup, &web, &daemon);
    assert_eq!(body, "");
    let again = wait_for(LOG_WAIT, || {
        (daemon.stderr().matches("no usable Kerberos ticket").count() > before).then_some(())
    });
    assert!(again.is_some(), "{}", daemon.stderr());
}

/// The strongest scheme offered with credentials here: Negotiate and Basic offered, only a
/// password given, Basic is used; Digest and Basic offered, Digest; `--proxy-auth-scheme`
/// forces one.
#[test]
fn the_scheme_is_the_strongest_with_credentials_or_the_one_named() {
    let kdc = Kdc::start();
    let web = Origin::http(ORIGIN_IP, "chosen");
    let cgroup = TestCgroup::new("authchoice");

    let squid = Squid::start_with_auth(vec![
        SquidAuth::Kerberos {
            keytab: kdc.keytab(),
            krb5_config: kdc.config(),
        },
        SquidAuth::Basic {
            user: "alice".into(),
            password: "basic-pw".into(),
        },
    ]);
    let d = daemon(&with_user(&squid, "alice:basic-pw"), &cgroup, &[]);
    let (body, said) = fetch(&cgroup, &web, &d);
    assert_eq!(body, "chosen", "{said}");
    drop(d);
    drop(squid);

    // Digest (alice/digest-pw) is stronger than Basic (alice/basic-pw): with the Basic
    // password, Digest is tried and fails; named, Basic works.
    let squid = Squid::start_with_auth(vec![
        SquidAuth::Basic {
            user: "alice".into(),
            password: "basic-pw".into(),
        },
        SquidAuth::Digest {
            user: "alice".into(),
            password: "digest-pw".into(),
        },
    ]);
    let d = daemon(&with_user(&squid, "alice:basic-pw"), &cgroup, &[]);
    let (body, _) = fetch(&cgroup, &web, &d);
    assert_eq!(body, "");
    let tried = wait_for(LOG_WAIT, || {
        d.stderr()
            .contains("tried Digest: the Digest credentials were not accepted")
            .then_some(())
    });
    assert!(tried.is_some(), "{}", d.stderr());
    drop(d);
    let d = daemon(
        &with_user(&squid, "alice:basic-pw"),
        &cgroup,
        &["--proxy-auth-scheme", "basic"],
    );
    let (body, said) = fetch(&cgroup, &web, &d);
    assert_eq!(body, "chosen", "{said}");
}

/// Proxies that answer authentication badly: asking again after every answer, a stale Digest
/// nonce forever, an NTLM challenge that is not one. Each is bounded, says one line, resets
/// the client, and the daemon serves the next tunnel.
#[test]
fn broken_authentication_is_bounded_and_the_daemon_keeps_serving() {
    let cases = [
        (
            Behavior::AuthLoop,
            "the Basic credentials were not accepted",
        ),
        (
            Behavior::DigestStaleLoop,
            "the proxy kept asking after 4 requests",
        ),
        (Behavior::BadNtlmChallenge, "NTLM: "),
    ];
    let ports = transproxy_tests::free_ports(ORIGIN_IP, cases.len());
    let behaviors: HashMap<u16, Behavior> = ports
        .iter()
        .zip(cases.iter())
        .map(|(port, (behavior, _))| (*port, *behavior))
        .collect();
    let proxy = HostileProxy::start(behaviors);
    let cgroup = TestCgroup::new("authbroken");
    for ((behavior, expected), port) in cases.iter().zip(&ports) {
        let scheme = match behavior {
            Behavior::DigestStaleLoop => "digest",
            Behavior::BadNtlmChallenge => "ntlm",
            _ => "basic",
        };
        let d = daemon(
            &proxy.url().replace("http://", "http://TEST%5Calice:pw@"),
            &cgroup,
            &["--proxy-auth-scheme", scheme],
        );
        let dst = SocketAddr::from((ORIGIN_IP, *port));
        let said = run(cgroup
            .command(client_bin())
            .args(["probe", &dst.to_string()]));
        assert_eq!(
            text(&said.stdout).trim(),
            "reset",
            "{behavior:?}: {}",
            d.stderr()
        );
        let logged = wait_for(LOG_WAIT, || d.stderr().contains(expected).then_some(()));
        assert!(logged.is_some(), "{behavior:?}: {}", d.stderr());
        assert!(!d.stderr().contains("panicked"), "{}", d.stderr());
        // One line for the failure.
        assert_eq!(
            d.stderr().matches(&format!("{dst}: proxy replied")).count(),
            1,
            "{}",
            d.stderr()
        );
    }
}

/// `exec` uses the Kerberos ticket of the user who invoked sudo, where MIT Kerberos keeps it
/// by default (sudo does not pass KRB5CCNAME on): here the user `nobody`.
#[test]
fn exec_uses_the_invoking_users_ticket() {
    let kdc = Kdc::start();
    let squid = Squid::start_with_auth(vec![SquidAuth::Kerberos {
        keytab: kdc.keytab(),
        krb5_config: kdc.config(),
    }]);
    let web = Origin::http(ORIGIN_IP, "exec kerberos body");
    let ccache = std::path::PathBuf::from("/tmp/krb5cc_65534");
    assert!(
        !ccache.exists(),
        "{} exists: not this test's",
        ccache.display()
    );
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(ccache.clone());
    kdc.kinit(&ccache, "10h");
    let chown = std::process::Command::new("chown")
        .args(["65534:65534"])
        .arg(&ccache)
        .status()
        .unwrap();
    assert!(chown.success());
    let hosts = PrivateHosts::new(&[(kdc::PROXY_HOST, "127.0.0.1".parse().unwrap())]);
    let proxy = format!("http://{}:{}", kdc::PROXY_HOST, squid.addr().port());
    let out = transproxy_tests::run_for(
        hosts
            .command(transproxy_bin())
            .args(["exec", "--proxy", &proxy, "--include", "127.0.0.2/32"])
            .args(["--", "curl", "-sS", "--noproxy", "*", "--max-time", "10"])
            .arg(url(web.addr()))
            .env("SUDO_UID", "65534")
            .env("SUDO_GID", "65534")
            .env_remove("KRB5CCNAME")
            .env("KRB5_CONFIG", kdc.config()),
        Duration::from_secs(30),
    );
    assert_eq!(
        text(&out.stdout),
        "exec kerberos body",
        "{}",
        text(&out.stderr)
    );
    let lines = tunnels_logged(&squid, web.addr(), 1);
    assert!(
        lines.iter().any(|l| l.contains("user@TEST.LOCAL")),
        "{}",
        squid.access_log()
    );
}
