//! dante (`danted`) as a SOCKS5 upstream, as test-servers.md measured it: on a free loopback
//! port, logging every request as it arrived (`debug: 1`: `ATYP: 3 address: NAME.PORT` for a
//! name, `ATYP: 1` for an IPv4 address), with username/password authentication for one user or
//! none.
//!
//! dante checks passwords against the system's users, so it runs in a mount namespace of its
//! own where /etc/passwd and /etc/shadow are private copies with the test user added. Its
//! names (socks5h) resolve from a private hosts file with `hosts: files` and a resolv.conf that
//! names only 127.0.0.1: no name it is asked for can reach a real resolver.

use std::{
    fs,
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt as _,
    process::{Child, Command, Stdio},
    time::Duration,
};

use tempfile::TempDir;

/// Where Debian installs it.
const DANTED: &str = "/usr/sbin/danted";

pub struct Dante {
    child: Child,
    dir: TempDir,
    addr: SocketAddr,
}

impl Dante {
    /// Starts dante. With `user` (name, password) it asks for username/password (RFC 1929);
    /// without, for nothing. `hosts` (names under `.test`) are what it can resolve.
    pub fn start(user: Option<(&str, &str)>, hosts: &[(&str, IpAddr)]) -> Self {
        Self::start_with(user, hosts, true)
    }

    /// dante asking for nothing and logging only errors: as an upstream for the benchmark,
    /// where a line per request would be what is measured.
    pub fn start_quiet() -> Self {
        Self::start_with(None, &[], false)
    }

    fn start_with(user: Option<(&str, &str)>, hosts: &[(&str, IpAddr)], verbose: bool) -> Self {
        crate::require_root();
        let dir = tempfile::Builder::new()
            .prefix("transproxy-dante-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod");
        let addr = crate::free_local_addr();
        let method = if user.is_some() { "username" } else { "none" };
        let (debug, log) = if verbose {
            ("1", "connect error")
        } else {
            ("0", "error")
        };
        fs::write(
            d.join("danted.conf"),
            format!(
                "logoutput: {log_file}\n\
                 debug: {debug}\n\
                 internal: 127.0.0.1 port = {port}\n\
                 external: 127.0.0.1\n\
                 clientmethod: none\n\
                 socksmethod: {method}\n\
                 user.privileged: root\n\
                 user.unprivileged: nobody\n\
                 client pass {{\n  from: 127.0.0.0/8 to: 127.0.0.0/8\n}}\n\
                 socks pass {{\n  from: 127.0.0.0/8 to: 127.0.0.0/8\n  command: connect\n  log: {log}\n}}\n",
                log_file = d.join("danted.log").display(),
                port = addr.port(),
            ),
        )
        .expect("write danted.conf");
        let mut passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        let mut shadow = fs::read_to_string("/etc/shadow").unwrap_or_default();
        if let Some((name, password)) = user {
            let hash = Command::new("openssl")
                .args(["passwd", "-6", password])
                .output()
                .expect("openssl passwd");
            assert!(hash.status.success(), "openssl passwd failed");
            let hash = String::from_utf8_lossy(&hash.stdout).trim().to_owned();
            passwd.push_str(&format!(
                "{name}:x:60999:60999::/nonexistent:/usr/sbin/nologin\n"
            ));
            shadow.push_str(&format!("{name}:{hash}:19000:0:99999:7:::\n"));
        }
        fs::write(d.join("passwd"), passwd).expect("write passwd");
        fs::write(d.join("shadow"), shadow).expect("write shadow");
        fs::set_permissions(d.join("shadow"), fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut hosts_text = String::from("127.0.0.1 localhost\n");
        for (name, ip) in hosts {
            assert!(
                name.ends_with(".test"),
                "test names are under .test: {name}"
            );
            hosts_text.push_str(&format!("{ip} {name}\n"));
        }
        fs::write(d.join("hosts"), hosts_text).expect("write hosts");
        fs::write(
            d.join("nsswitch.conf"),
            "passwd: files\nshadow: files\nhosts: files\n",
        )
        .expect("write nsswitch.conf");
        fs::write(d.join("resolv.conf"), "nameserver 127.0.0.1\n").expect("write resolv.conf");
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
            .arg(concat!(
                r#"for f in passwd shadow hosts nsswitch.conf resolv.conf; do "#,
                r#"mount --bind "$0/$f" "/etc/$f" || exit 1; done; "#,
                r#"exec "$1" -f "$0/danted.conf" -p "$0/danted.pid""#
            ))
            .arg(d)
            .arg(DANTED)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start danted (Debian package dante-server)");
        let mut dante = Self { child, dir, addr };
        let up = crate::wait_for(Duration::from_secs(10), || TcpStream::connect(addr).ok());
        if up.is_none() {
            let _ = dante.child.kill();
            let out = dante.child.wait_with_output_ref();
            panic!("danted did not listen on {addr}: {out}\n{}", dante.log());
        }
        dante
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `SCHEME://[USER:PASSWORD@]ADDR`, for `--proxy`.
    pub fn url(&self, scheme: &str, user_password: Option<&str>) -> String {
        match user_password {
            Some(credentials) => format!("{scheme}://{credentials}@{}", self.addr),
            None => format!("{scheme}://{}", self.addr),
        }
    }

    /// dante's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("danted.log")).unwrap_or_default()
    }
}

trait WaitOutput {
    fn wait_with_output_ref(&mut self) -> String;
}

impl WaitOutput for Child {
    /// What the child wrote to stderr, once it has exited.
    fn wait_with_output_ref(&mut self) -> String {
        use std::io::Read as _;
        let _ = self.wait();
        let mut said = String::new();
        if let Some(mut err) = self.stderr.take() {
            let _ = err.read_to_string(&mut said);
        }
        said
    }
}

impl Drop for Dante {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // danted forks children that the kill of the parent may leave: they are in its process
        // group only if it made none; find them by the config they were started with.
        let config = self.dir.path().join("danted.conf");
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(config.display().to_string())
            .status();
    }
}
