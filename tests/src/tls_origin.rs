//! An HTTPS origin: `openssl s_server -www` with a certificate made for the test, for a name
//! under `.test`.

use std::{
    net::{IpAddr, SocketAddr},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tempfile::TempDir;

pub struct TlsOrigin {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl TlsOrigin {
    /// Serves TLS for `name` on a free port of `ip`; answers `GET /` with its status page.
    pub fn start(ip: impl Into<IpAddr>, name: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .args(["-subj", &format!("/CN={name}")])
            .args(["-addext", &format!("subjectAltName=DNS:{name}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl req");
        assert!(made.success(), "openssl could not make a certificate");
        let ip = ip.into();
        let port = match ip {
            IpAddr::V4(ip) => crate::free_port(ip),
            IpAddr::V6(_) => crate::free_port_v6(),
        };
        let addr = SocketAddr::new(ip, port);
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(addr.to_string())
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let up = crate::wait_for(Duration::from_secs(10), || {
            std::net::TcpStream::connect(addr).ok()
        });
        assert!(up.is_some(), "openssl s_server did not start on {addr}");
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
