//! Test harness: real squid, real origins, real cgroups and the real daemon, all on loopback.
//!
//! Shared by the integration tests and `cargo xtask demo`. Every helper cleans up on drop, and
//! every wait is bounded, so a failing test leaves no cgroup, process or listener behind.

pub mod bpf;
pub mod cgroup;
pub mod client;
pub mod connect_proxy;
pub mod daemon;
pub mod dante;
pub mod gateway_net;
pub mod hostile_proxy;
pub mod kdc;
pub mod netns;
pub mod origin;
pub mod podman;
pub mod resolver;
pub mod server;
pub mod squid;
pub mod tls_origin;
pub mod workspace;

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    time::{Duration, Instant},
};

pub use cgroup::TestCgroup;
pub use client::{curl, echo_session, echo_session_quiet, probe, run, run_for, storm, text, url};
pub use connect_proxy::ConnectProxy;
pub use daemon::{Daemon, Detach, detach, refuses_to_start};
pub use dante::Dante;
pub use hostile_proxy::{Behavior, HostileProxy};
pub use kdc::Kdc;
pub use origin::Origin;
pub use resolver::{PrivateHosts, PrivateResolv, TestResolver};
pub use squid::{Squid, SquidAuth};
pub use tls_origin::TlsOrigin;

/// Where test origins live: loopback addresses other than the proxy's 127.0.0.1.
pub const ORIGIN_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// A second origin address, for destinations that refuse, are denied or stay direct.
pub const OTHER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// How long to wait for squid to log a tunnel (it logs when the tunnel closes).
pub const LOG_WAIT: Duration = Duration::from_secs(5);

/// The integration tests need root (BPF, cgroups). Without it they fail, loudly, here.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "integration tests load eBPF programs and create cgroups: run them as root through `cargo xtask test`"
    );
}

/// The daemon binary under test: `TRANSPROXY_BIN`, set by `cargo xtask test`.
pub fn transproxy_bin() -> PathBuf {
    let path = std::env::var_os("TRANSPROXY_BIN").map(PathBuf::from).expect(
        "TRANSPROXY_BIN is not set: run the integration tests through `cargo xtask test`, which builds the daemon",
    );
    assert!(
        path.exists(),
        "TRANSPROXY_BIN={} does not exist",
        path.display()
    );
    path
}

/// The tp-client helper binary (built with this crate).
pub fn client_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Test binaries live in target/<profile>/deps; helper binaries one level up.
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("exe dir");
    let path = dir.join("tp-client");
    assert!(
        path.exists(),
        "{} is missing: build the transproxy-tests package",
        path.display()
    );
    path
}

/// The tp-fast-proxy helper binary (built with this crate): a CONNECT proxy.
pub fn fast_proxy_bin() -> PathBuf {
    client_bin().with_file_name("tp-fast-proxy")
}

/// A port on `ip` that is free right now (the kernel picks it).
pub fn free_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on loopback")
}

/// `n` distinct free ports on `ip`: all bound at once, so none is handed out twice (ports
/// bound and released one after the other can repeat).
pub fn free_ports(ip: Ipv4Addr, n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind((ip, 0)).expect("no free port on loopback"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("bound").port())
        .collect()
}

/// Raises this process's soft file descriptor limit to the hard one (load tests hold
/// thousands of sockets).
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A port on ::1 that is free right now.
pub fn free_port_v6() -> u16 {
    TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on ::1")
}

/// A free loopback socket address on 127.0.0.1.
pub fn free_local_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port(Ipv4Addr::LOCALHOST)))
}

/// Polls `check` every 20 ms until it returns `Some` or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic pseudo-random bytes (xorshift), so both ends of a transfer can check content.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Reads until `len` bytes or end-of-file, whichever comes first (errors end the read too).
pub fn read_up_to(mut stream: &std::net::TcpStream, len: usize) -> Vec<u8> {
    use std::io::Read as _;
    let mut data = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        match stream.read(&mut data[filled..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
    }
    data.truncate(filled);
    data
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A field of `/proc/PID/status` (`field` with its colon, e.g. `VmRSS:`), trimmed.
pub fn proc_status(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

/// A TLS 1.3 ClientHello record naming `name` in its server-name extension (the shape curl and
/// rustls send; only the name matters here).
pub fn client_hello(name: &str) -> Vec<u8> {
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name.as_bytes());
    let mut extensions = vec![0, 0];
    extensions.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    extensions.extend_from_slice(&sni);
    extensions.extend_from_slice(&[0, 43, 0, 3, 2, 3, 4]);
    let mut hello = vec![3, 3];
    hello.extend_from_slice(&[7; 32]);
    hello.push(0);
    hello.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    hello.extend_from_slice(&extensions);
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![22, 3, 1];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}
