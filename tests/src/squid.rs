//! A real squid, started with its own configuration on a free loopback port.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tempfile::TempDir;

/// Who may use the squid.
enum Access {
    /// Every client on loopback, to any destination.
    Localhost,
    /// Clients that authenticate with one of these schemes, offered in this order.
    Auth(Vec<SquidAuth>),
    /// Only CONNECTs to names under `.test`.
    NamesOnly,
}

/// An authentication scheme squid asks for, with its real helper (test-servers.md).
pub enum SquidAuth {
    /// `basic_ncsa_auth`, one user.
    Basic { user: String, password: String },
    /// `digest_file_auth`, one user, realm `spike`.
    Digest { user: String, password: String },
    /// `ntlm_fake_auth`: checks the shape of the handshake, not the password.
    NtlmFake,
    /// Negotiate with Kerberos (`negotiate_kerberos_auth`) for the realm of `kdc`.
    Kerberos {
        keytab: PathBuf,
        krb5_config: PathBuf,
    },
    /// Negotiate with NTLM inside SPNEGO (gss-ntlmssp behind `negotiate_kerberos_auth`): a
    /// real password check, for `DOMAIN\user`.
    NtlmInNegotiate {
        domain: String,
        user: String,
        password: String,
    },
}

/// How long a test waits before it concludes that squid logged nothing.
pub const NOTHING_LOGGED_WAIT: Duration = Duration::from_millis(500);

/// Where Debian installs squid.
const SQUID: &str = "/usr/sbin/squid";

pub struct Squid {
    child: Child,
    dir: TempDir,
    addr: SocketAddr,
}

impl Squid {
    /// Starts squid allowing CONNECT from loopback to any port, except to the destinations in
    /// `deny` (squid ACL `dst` values such as `127.0.0.3`), which it answers with 403.
    pub fn start(deny: &[&str]) -> Self {
        Self::start_with(deny, None, Access::Localhost, &[])
    }

    /// As [`Squid::start`], resolving `hosts` (names under `.test`) from its hosts file.
    pub fn start_resolving(hosts: &[(&str, std::net::IpAddr)]) -> Self {
        Self::start_with(&[], None, Access::Localhost, hosts)
    }

    /// As [`Squid::start`], with squid's process inside `cgroup` (a local proxy inside the
    /// intercepted cgroup).
    pub fn start_in(deny: &[&str], cgroup: Option<&crate::TestCgroup>) -> Self {
        Self::start_with(deny, cgroup, Access::Localhost, &[])
    }

    /// Squid asking for Basic authentication (`basic_ncsa_auth`), with one user.
    pub fn start_with_basic_auth(user: &str, password: &str) -> Self {
        Self::start_with_auth(vec![SquidAuth::Basic {
            user: user.to_owned(),
            password: password.to_owned(),
        }])
    }

    /// Squid asking for authentication with `schemes`, offered in that order.
    pub fn start_with_auth(schemes: Vec<SquidAuth>) -> Self {
        Self::start_with(&[], None, Access::Auth(schemes), &[])
    }

    /// Squid as corporate proxies are set: CONNECT only to names under `.test` (`dstdomain
    /// -n`), never to a bare address. It resolves names from `hosts` (its own hosts file, never
    /// DNS: its resolver is 127.0.0.1, where nothing answers).
    pub fn start_names_only(hosts: &[(&str, std::net::IpAddr)]) -> Self {
        Self::start_with(&[], None, Access::NamesOnly, hosts)
    }

    fn start_with(
        deny: &[&str],
        cgroup: Option<&crate::TestCgroup>,
        access: Access,
        hosts: &[(&str, std::net::IpAddr)],
    ) -> Self {
        Self::start_full(deny, cgroup, access, hosts, false)
    }

    /// squid on `https_port`, with a certificate made here for `proxy.test` and 127.0.0.1,
    /// signed by a CA made here too (at [`Squid::tls_cert`]).
    pub fn start_https() -> Self {
        Self::start_full(&[], None, Access::Localhost, &[], true)
    }

    /// The CA certificate of an [`Squid::start_https`] squid (PEM), to trust it by.
    pub fn tls_cert(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn start_full(
        deny: &[&str],
        cgroup: Option<&crate::TestCgroup>,
        access: Access,
        hosts: &[(&str, std::net::IpAddr)],
        https: bool,
    ) -> Self {
        crate::require_root();
        let dir = tempfile::Builder::new()
            .prefix("transproxy-squid-")
            .tempdir()
            .expect("tempdir");
        // squid drops to its own user; it must be able to write its logs here.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
        let addr = crate::free_local_addr();
        let d = dir.path().display();
        let deny_rules = if deny.is_empty() {
            String::new()
        } else {
            format!(
                "acl denied_dst dst {}\nhttp_access deny denied_dst\n",
                deny.join(" ")
            )
        };
        // Every squid resolves names from its own hosts file only, and asks no DNS server but
        // 127.0.0.1, where nothing answers: a name a test (or the daemon's sniffing) sends in a
        // CONNECT never reaches a real resolver.
        let hosts_file = dir.path().join("hosts");
        let lines: String = hosts
            .iter()
            .map(|(name, ip)| format!("{ip} {name}\n"))
            .collect();
        fs::write(&hosts_file, lines).expect("write squid's hosts");
        fs::set_permissions(&hosts_file, fs::Permissions::from_mode(0o644)).expect("chmod");
        // Environment for squid's helpers (Kerberos configuration, keytab, NTLM users).
        let mut env: Vec<(String, String)> = Vec::new();
        let auth_rules = match access {
            Access::Localhost => "http_access allow localhost\n".to_owned(),
            Access::NamesOnly => "acl names dstdomain -n .test\n\
                                     http_access allow localhost names\n"
                .to_owned(),
            Access::Auth(schemes) => {
                let mut lines = String::new();
                for scheme in schemes {
                    lines.push_str(&auth_lines(dir.path(), scheme, &mut env));
                }
                lines.push_str(
                    "acl authed proxy_auth REQUIRED\n\
                     http_access allow localhost authed\n",
                );
                lines
            }
        };
        let hosts = hosts_file.display();
        let port_line = if https {
            make_certificate(dir.path());
            format!("https_port {addr} tls-cert={d}/cert.pem tls-key={d}/key.pem")
        } else {
            format!("http_port {addr}")
        };
        let config = format!(
            "{port_line}\n\
             pid_filename none\n\
             cache deny all\n\
             cache_mem 8 MB\n\
             access_log stdio:{d}/access.log\n\
             cache_log {d}/cache.log\n\
             cache_store_log none\n\
             coredump_dir {d}\n\
             visible_hostname transproxy-test\n\
             shutdown_lifetime 0 seconds\n\
             max_filedescriptors 16384\n\
             pinger_enable off\n\
             hosts_file {hosts}\n\
             dns_nameservers 127.0.0.1\n\
             {deny_rules}\
             {auth_rules}\
             http_access deny all\n"
        );
        let config_path = dir.path().join("squid.conf");
        fs::write(&config_path, config).expect("write squid.conf");
        assert!(
            PathBuf::from(SQUID).exists(),
            "{SQUID} is missing: `cargo xtask test` installs the squid package"
        );
        let mut command = match cgroup {
            Some(cgroup) => cgroup.command(SQUID),
            None => Command::new(SQUID),
        };
        let child = command
            .envs(env)
            .args(["-N", "-f"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start squid");
        let mut squid = Self { child, dir, addr };
        let up = crate::wait_for(Duration::from_secs(30), || {
            if let Ok(Some(status)) = squid.child.try_wait() {
                panic!(
                    "squid exited at start-up ({status}):\n{}",
                    squid.cache_log()
                );
            }
            TcpStream::connect(addr).ok()
        });
        assert!(
            up.is_some(),
            "squid did not listen on {addr} within 30 s:\n{}",
            squid.cache_log()
        );
        squid
    }

    /// Squid inside network namespace `netns` (gateway mode's outside host), listening on
    /// `addr` and serving clients from `clients` (squid `src` ACL values), to any port.
    pub fn start_in_netns(netns: &str, addr: SocketAddr, clients: &[&str]) -> Self {
        crate::require_root();
        let dir = tempfile::Builder::new()
            .prefix("transproxy-squid-")
            .tempdir()
            .expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
        let d = dir.path().display();
        let hosts_file = dir.path().join("hosts");
        fs::write(&hosts_file, "").expect("write squid's hosts");
        fs::set_permissions(&hosts_file, fs::Permissions::from_mode(0o644)).expect("chmod");
        let config = format!(
            "http_port {addr}\n\
             pid_filename none\n\
             cache deny all\n\
             cache_mem 8 MB\n\
             access_log stdio:{d}/access.log\n\
             cache_log {d}/cache.log\n\
             cache_store_log none\n\
             coredump_dir {d}\n\
             visible_hostname transproxy-test\n\
             shutdown_lifetime 0 seconds\n\
             max_filedescriptors 16384\n\
             pinger_enable off\n\
             hosts_file {}\n\
             dns_nameservers 127.0.0.1\n\
             acl clients src {}\n\
             http_access allow clients\n\
             http_access deny all\n",
            hosts_file.display(),
            clients.join(" ")
        );
        let config_path = dir.path().join("squid.conf");
        fs::write(&config_path, config).expect("write squid.conf");
        let child = Command::new("ip")
            .args(["netns", "exec", netns, SQUID, "-N", "-f"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start squid");
        let mut squid = Self { child, dir, addr };
        // It cannot be reached from here: its log says when it accepts.
        let up = crate::wait_for(Duration::from_secs(30), || {
            if let Ok(Some(status)) = squid.child.try_wait() {
                panic!(
                    "squid exited at start-up ({status}):\n{}",
                    squid.cache_log()
                );
            }
            squid
                .cache_log()
                .contains("Accepting HTTP Socket connections")
                .then_some(())
        });
        assert!(up.is_some(), "squid did not start:\n{}", squid.cache_log());
        squid
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy URL to give transproxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    pub fn cache_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("cache.log")).unwrap_or_default()
    }

    /// Access log lines for a CONNECT to `dst`.
    pub fn connect_lines(&self, dst: SocketAddr) -> Vec<String> {
        let needle = format!(" CONNECT {dst} ");
        self.access_log()
            .lines()
            .filter(|l| l.contains(&needle))
            .map(str::to_owned)
            .collect()
    }

    /// Waits (up to `limit`) until the log shows at least `n` CONNECTs to `dst`; squid logs a
    /// tunnel when it closes. Returns the lines seen.
    pub fn wait_connects(&self, dst: SocketAddr, n: usize, limit: Duration) -> Vec<String> {
        crate::wait_for(limit, || {
            Some(self.connect_lines(dst)).filter(|l| l.len() >= n)
        })
        .unwrap_or_else(|| self.connect_lines(dst))
    }

    /// Waits long enough for squid to have logged a tunnel to `dst` (it logs a tunnel when it
    /// closes, and the tunnels tests open close within this), then checks it logged none.
    pub fn assert_no_connect(&self, dst: SocketAddr) {
        std::thread::sleep(NOTHING_LOGGED_WAIT);
        let lines = self.connect_lines(dst);
        assert!(lines.is_empty(), "squid tunnelled to {dst}: {lines:?}");
    }

    /// Waits as [`Squid::assert_no_connect`] does, then checks that squid logged exactly `n`
    /// CONNECTs in all (none more: no loop, nothing from outside the cgroup).
    pub fn assert_connects(&self, n: usize) {
        std::thread::sleep(NOTHING_LOGGED_WAIT);
        assert_eq!(
            self.all_connects(),
            n,
            "squid's log:\n{}",
            self.access_log()
        );
    }

    /// Waits (up to `limit`) until the log shows at least `n` CONNECTs to `target` (`name:port`
    /// or an address); returns the lines seen.
    pub fn wait_connects_to(&self, target: &str, n: usize, limit: Duration) -> Vec<String> {
        let needle = format!(" CONNECT {target} ");
        let lines = || -> Vec<String> {
            self.access_log()
                .lines()
                .filter(|l| l.contains(&needle))
                .map(str::to_owned)
                .collect()
        };
        crate::wait_for(limit, || Some(lines()).filter(|l| l.len() >= n)).unwrap_or_else(lines)
    }

    /// Every CONNECT squid has logged, whatever the destination.
    pub fn all_connects(&self) -> usize {
        self.access_log()
            .lines()
            .filter(|l| l.contains(" CONNECT "))
            .count()
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// squid's lines for one authentication scheme, writing what its helper needs into `dir` and
/// adding the helper's environment to `env`.
fn auth_lines(dir: &std::path::Path, scheme: SquidAuth, env: &mut Vec<(String, String)>) -> String {
    let readable = |path: &std::path::Path, text: &str| {
        fs::write(path, text).expect("write a squid auth file");
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).expect("chmod");
    };
    match scheme {
        SquidAuth::Basic { user, password } => {
            let hashed = Command::new("openssl")
                .args(["passwd", "-apr1", &password])
                .output()
                .expect("openssl passwd");
            let passwd = dir.join("passwd");
            readable(
                &passwd,
                &format!("{user}:{}", String::from_utf8_lossy(&hashed.stdout)),
            );
            format!(
                "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\n\
                 auth_param basic realm transproxy-test\n",
                passwd.display()
            )
        }
        SquidAuth::Digest { user, password } => {
            // digest_file_auth -c: `user:realm:HA1`, HA1 = md5(user:realm:password).
            let ha1 = Command::new("sh")
                .arg("-c")
                .arg(r#"printf '%s' "$0" | md5sum | cut -d' ' -f1"#)
                .arg(format!("{user}:spike:{password}"))
                .output()
                .expect("md5sum");
            let file = dir.join("digest.pw");
            readable(
                &file,
                &format!(
                    "{user}:spike:{}\n",
                    String::from_utf8_lossy(&ha1.stdout).trim()
                ),
            );
            format!(
                "auth_param digest program /usr/lib/squid/digest_file_auth -c {}\n\
                 auth_param digest realm spike\n",
                file.display()
            )
        }
        SquidAuth::NtlmFake => "auth_param ntlm program /usr/lib/squid/ntlm_fake_auth\n".to_owned(),
        SquidAuth::Kerberos {
            keytab,
            krb5_config,
        } => {
            // The helper's replay cache: a folder the helper (user `proxy`) can write.
            let rcache = dir.join("rcache");
            fs::create_dir_all(&rcache).expect("create the replay cache folder");
            fs::set_permissions(&rcache, fs::Permissions::from_mode(0o777)).expect("chmod");
            env.push(("KRB5_KTNAME".into(), format!("FILE:{}", keytab.display())));
            env.push(("KRB5_CONFIG".into(), krb5_config.display().to_string()));
            format!(
                "auth_param negotiate program {} -s HTTP/{}@{} -c {}\n",
                negotiate_wrapper(dir).display(),
                crate::kdc::PROXY_HOST,
                crate::kdc::REALM,
                dir.join("rcache").display()
            )
        }
        SquidAuth::NtlmInNegotiate {
            domain,
            user,
            password,
        } => {
            let users = dir.join("server.users");
            readable(&users, &format!("{domain}:{user}:{password}\n"));
            env.push(("NTLM_USER_FILE".into(), users.display().to_string()));
            format!(
                "auth_param negotiate program {} -s GSS_C_NO_NAME\n",
                negotiate_wrapper(dir).display()
            )
        }
    }
}

/// squid 5.7's Kerberos helper answers a continuation as `TT token=X`, which squid then sends
/// as `Negotiate token=X`: this wrapper makes it `TT X` (test-servers.md).
fn negotiate_wrapper(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("negotiate.sh");
    fs::write(
        &path,
        "#!/bin/sh\n/usr/lib/squid/negotiate_kerberos_auth \"$@\" | sed -u 's/^TT token=/TT /'\n",
    )
    .expect("write the negotiate wrapper");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// A throwaway CA (`ca.pem`) and, signed by it, the proxy's certificate (`cert.pem`, key
/// `key.pem`) for `proxy.test` and 127.0.0.1, in `dir`.
fn make_certificate(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=transproxy test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=proxy.test",
        "-keyout",
        "key.pem",
        "-out",
        "proxy.csr",
    ]);
    fs::write(
        dir.join("proxy.ext"),
        "subjectAltName=DNS:proxy.test,IP:127.0.0.1\n",
    )
    .expect("write proxy.ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "proxy.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "proxy.ext",
        "-out",
        "cert.pem",
    ]);
    for file in ["key.pem", "cert.pem", "ca.pem"] {
        fs::set_permissions(dir.join(file), fs::Permissions::from_mode(0o644)).expect("chmod");
    }
}
