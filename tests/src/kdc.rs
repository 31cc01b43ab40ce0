//! A throwaway MIT Kerberos realm, `TEST.LOCAL`, for Negotiate tests: a KDC on a free loopback
//! port, a user `user` (password `userpass`), the proxy's service `HTTP/proxy.test` with its
//! keytab, all in a temporary folder. Nothing asks DNS: the krb5.conf names the KDC by address
//! and turns every DNS lookup off, and every program is given it through `KRB5_CONFIG` (the
//! system's /etc/krb5.conf names MIT's public realm).

use std::{
    fs,
    net::TcpStream,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tempfile::TempDir;

/// The realm.
pub const REALM: &str = "TEST.LOCAL";
/// The user and its password.
pub const USER: &str = "user";
pub const USER_PASSWORD: &str = "userpass";
/// The proxy's host name as clients must write it (its service principal is HTTP/PROXY_HOST).
pub const PROXY_HOST: &str = "proxy.test";

pub struct Kdc {
    dir: TempDir,
    child: Child,
}

impl Kdc {
    /// Creates the realm and starts its KDC.
    pub fn start() -> Self {
        crate::require_root();
        let dir = tempfile::Builder::new()
            .prefix("transproxy-kdc-")
            .tempdir()
            .expect("tempdir");
        // squid's helper (user `proxy`) reads the keytab and krb5.conf here.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let port = crate::free_port(std::net::Ipv4Addr::LOCALHOST);
        let d = dir.path().display();
        fs::write(
            dir.path().join("krb5.conf"),
            format!(
                "[libdefaults]\n\
                 default_realm = {REALM}\n\
                 dns_lookup_kdc = false\n\
                 dns_lookup_realm = false\n\
                 rdns = false\n\
                 dns_canonicalize_hostname = false\n\
                 qualify_shortname = \"\"\n\
                 udp_preference_limit = 1\n\
                 [realms]\n\
                 {REALM} = {{\n  kdc = 127.0.0.1:{port}\n}}\n\
                 [domain_realm]\n\
                 {PROXY_HOST} = {REALM}\n"
            ),
        )
        .expect("write krb5.conf");
        fs::write(
            dir.path().join("kdc.conf"),
            format!(
                "[kdcdefaults]\n\
                 kdc_listen = 127.0.0.1:{port}\n\
                 kdc_tcp_listen = 127.0.0.1:{port}\n\
                 [realms]\n\
                 {REALM} = {{\n  database_name = {d}/principal\n  key_stash_file = {d}/stash\n  acl_file = {d}/kadm5.acl\n  max_life = 10h\n  max_renewable_life = 1d\n}}\n"
            ),
        )
        .expect("write kdc.conf");
        let kdc = Self::in_realm(dir.path());
        let run = |mut cmd: Command| {
            let out = cmd.output().expect("run a Kerberos tool");
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(kdc(
            "kdb5_util",
            &["create", "-s", "-r", REALM, "-P", "master-pw"],
        ));
        let admin = |query: &str| {
            let mut cmd = kdc("kadmin.local", &["-q", query]);
            cmd.stdout(Stdio::null());
            cmd
        };
        run(admin(&format!("addprinc -pw {USER_PASSWORD} {USER}")));
        run(admin(&format!("addprinc -randkey HTTP/{PROXY_HOST}")));
        let keytab = dir.path().join("http.keytab");
        run(admin(&format!(
            "ktadd -k {} HTTP/{PROXY_HOST}",
            keytab.display()
        )));
        // squid's helper runs as `proxy`; a keytab it cannot read makes it answer BH.
        let chown = Command::new("chown")
            .args(["proxy:proxy"])
            .arg(&keytab)
            .status()
            .expect("chown");
        assert!(chown.success());
        let child = kdc("krb5kdc", &["-n", "-P", &format!("{d}/kdc.pid")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start krb5kdc");
        drop(kdc);
        let mut kdc = Self { dir, child };
        let up = crate::wait_for(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        if up.is_none() {
            let _ = kdc.child.kill();
            panic!("krb5kdc did not listen on 127.0.0.1:{port}");
        }
        kdc
    }

    /// A command of the Kerberos tools with this realm's configuration.
    fn in_realm(dir: &Path) -> impl Fn(&str, &[&str]) -> Command + '_ {
        move |program, args| {
            let mut cmd = Command::new(program);
            cmd.args(args)
                .env("KRB5_CONFIG", dir.join("krb5.conf"))
                .env("KRB5_KDC_PROFILE", dir.join("kdc.conf"));
            cmd
        }
    }

    /// The realm's krb5.conf, for `KRB5_CONFIG`.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("krb5.conf")
    }

    /// The proxy's keytab (owned by `proxy`, for squid's helper).
    pub fn keytab(&self) -> PathBuf {
        self.dir.path().join("http.keytab")
    }

    /// A keytab with `user`'s keys (its password unchanged), owned by root, mode 0600: a
    /// service identity for `--proxy-auth-keytab`.
    pub fn user_keytab(&self) -> PathBuf {
        let keytab = self.dir.path().join("user.keytab");
        let out = Self::in_realm(self.dir.path())(
            "kadmin.local",
            &[
                "-q",
                &format!("ktadd -norandkey -k {} {USER}", keytab.display()),
            ],
        )
        .output()
        .expect("kadmin.local");
        assert!(
            out.status.success(),
            "ktadd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::set_permissions(&keytab, fs::Permissions::from_mode(0o600)).expect("chmod");
        keytab
    }

    /// A credentials cache path in the realm's folder (nothing in it yet).
    pub fn ccache(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Gets `user`'s ticket into `ccache`, valid for `lifetime` (e.g. `10h`, `5s`).
    pub fn kinit(&self, ccache: &Path, lifetime: &str) {
        use std::io::Write as _;
        let mut child =
            Self::in_realm(self.dir.path())("kinit", &["-l", lifetime, &format!("{USER}@{REALM}")])
                .env("KRB5CCNAME", format!("FILE:{}", ccache.display()))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("kinit");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{USER_PASSWORD}\n").as_bytes())
            .expect("password to kinit");
        let out = child.wait_with_output().expect("kinit");
        assert!(
            out.status.success(),
            "kinit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Kdc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
