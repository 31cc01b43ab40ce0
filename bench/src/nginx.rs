//! The origin: Debian's nginx with a configuration of our own, serving a small file and a large
//! sparse one from the benchmark's work directory.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, bail};
use transproxy_tests::{TestCgroup, free_port, wait_for};

use crate::{process::Guarded, tools::NGINX};

/// Where the origin listens: the address the interception rules name.
pub(crate) const ORIGIN_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A second address of the same nginx that no rule names (the non-matching figure).
pub(crate) const UNMATCHED_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// The small response body: about 100 bytes, so connection handling dominates.
const SMALL_BODY: &str = "transproxy benchmark: a small response, about one hundred bytes long, so connections dominate.\n";

/// A running nginx. It lives in a cgroup of its own, so dropping it ends the master and every
/// worker even if the master dies first.
pub(crate) struct Nginx {
    /// Declared before the cgroup: the master gets its SIGKILL, then the cgroup sweeps the rest.
    _master: Guarded,
    _cgroup: TestCgroup,
    matched: SocketAddr,
    unmatched: SocketAddr,
}

impl Nginx {
    /// Writes the files and configuration into `dir` and starts nginx on a free port of
    /// [`ORIGIN_IP`] and of [`UNMATCHED_IP`].
    pub(crate) fn start(dir: &Path, download_bytes: u64) -> anyhow::Result<Self> {
        let root = dir.join("www");
        fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
        fs::write(root.join("small.txt"), SMALL_BODY).context("cannot write small.txt")?;
        // Sparse: reading it costs no disk, only page-cache pages of zeros. Read once now, so
        // the first download measured does not also fill the page cache.
        let large = root.join("large.bin");
        fs::File::create(&large)
            .and_then(|f| f.set_len(download_bytes))
            .and_then(|()| fs::File::open(&large))
            .and_then(|mut f| std::io::copy(&mut f, &mut std::io::sink()))
            .context("cannot create large.bin")?;
        // nginx's workers drop to an unprivileged user; they must reach the files.
        for path in [dir, root.as_path()] {
            fs::set_permissions(path, fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot chmod {}", path.display()))?;
        }
        let matched = SocketAddr::V4(SocketAddrV4::new(ORIGIN_IP, free_port(ORIGIN_IP)));
        let unmatched = SocketAddr::V4(SocketAddrV4::new(UNMATCHED_IP, free_port(UNMATCHED_IP)));
        let config = dir.join("nginx.conf");
        fs::write(&config, configuration(dir, &root, matched, unmatched))
            .context("cannot write nginx.conf")?;
        let cgroup = TestCgroup::new("bench-origin");
        let mut cmd = cgroup.command(NGINX);
        cmd.arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        let mut master = Guarded::spawn(cmd, "nginx")?;
        let up = wait_for(Duration::from_secs(10), || {
            [matched, unmatched]
                .iter()
                .all(|a| TcpStream::connect(a).is_ok())
                .then_some(())
        });
        if up.is_none() || !master.alive() {
            let log = fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            bail!("nginx did not start on {matched} and {unmatched}:\n{log}");
        }
        Ok(Self {
            _master: master,
            _cgroup: cgroup,
            matched,
            unmatched,
        })
    }

    /// The address the interception rules name.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.matched
    }

    /// The ~100-byte file: connection handling dominates.
    pub(crate) fn small_url(&self) -> String {
        format!("http://{}/small.txt", self.matched)
    }

    /// The large sparse file: relaying dominates.
    pub(crate) fn large_url(&self) -> String {
        format!("http://{}/large.bin", self.matched)
    }

    /// The small file through the address no rule names.
    pub(crate) fn unmatched_url(&self) -> String {
        format!("http://{}/small.txt", self.unmatched)
    }
}

/// Two workers (one per core here), sendfile, no access log, every path in the work directory.
fn configuration(dir: &Path, root: &Path, matched: SocketAddr, unmatched: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes 2;\n\
         worker_rlimit_nofile 65536;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   sendfile on;\n\
         \x20   keepalive_requests 1000000;\n\
         \x20   default_type application/octet-stream;\n\
         \x20   client_body_temp_path {d}/client_body;\n\
         \x20   proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\
         \x20   server {{\n\
         \x20       listen {matched};\n\
         \x20       listen {unmatched};\n\
         \x20       root {};\n\
         \x20   }}\n\
         }}\n",
        root.display()
    )
}
