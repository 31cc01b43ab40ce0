//! Gateway mode's test network: three network namespaces made by the test, addresses only
//! inside them (measured in `../shared/reference/kernel-facts.md`, "Gateway"):
//!
//! ```text
//!  cli  10.0.1.2 fd00:1::2 ── lan0 [ gw  10.0.1.1 fd00:1::1 | 10.0.2.1 fd00:2::1 ] wan0 ── out 10.0.2.2 fd00:2::2
//!       default via gw            forwarding on, the daemon             squid; origins on lo:
//!                                                                       10.99.0.10-20, fd00:99::10-20
//! ```
//!
//! The gateway also routes 10.0.3.0/24 to a (missing) router at 10.0.1.3 on the LAN: a
//! client's packet there leaves the gateway by the interface it came in on, which is what
//! makes a router send an ICMP redirect.
//!
//! Processes started in them (squid, servers) are killed when dropped, then the namespaces are
//! deleted.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::{client_bin, run, text};

/// The three namespaces.
pub struct GatewayNet {
    prefix: String,
}

/// The client's addresses, the gateway's LAN side, and the outside host's.
pub const CLI_V4: &str = "10.0.1.2";
pub const CLI_V6: &str = "fd00:1::2";
pub const GW_LAN_V4: &str = "10.0.1.1";
pub const OUT_V4: &str = "10.0.2.2";
pub const OUT_V6: &str = "fd00:2::2";

impl GatewayNet {
    pub fn new() -> Self {
        crate::require_root();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "tpg{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let net = Self { prefix };
        let (cli, gw, out) = (net.name("c"), net.name("g"), net.name("o"));
        let script = format!(
            r#"set -e
for n in {cli} {gw} {out}; do ip netns add $n; ip -n $n link set lo up; done
ip link add vcli netns {cli} type veth peer name lan0 netns {gw}
ip link add wan0 netns {gw} type veth peer name vout netns {out}
ip -n {cli} addr add 10.0.1.2/24 dev vcli; ip -n {cli} addr add fd00:1::2/64 dev vcli nodad
ip -n {cli} link set vcli up
ip -n {cli} route add default via 10.0.1.1; ip -n {cli} -6 route add default via fd00:1::1
ip -n {gw} addr add 10.0.1.1/24 dev lan0; ip -n {gw} addr add fd00:1::1/64 dev lan0 nodad
ip -n {gw} addr add 10.0.2.1/24 dev wan0; ip -n {gw} addr add fd00:2::1/64 dev wan0 nodad
ip -n {gw} link set lan0 up; ip -n {gw} link set wan0 up
ip -n {gw} route add 10.99.0.0/24 via 10.0.2.2; ip -n {gw} -6 route add fd00:99::/64 via fd00:2::2
ip -n {gw} route add 10.0.3.0/24 via 10.0.1.3 dev lan0 onlink
ip netns exec {gw} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
ip -n {out} addr add 10.0.2.2/24 dev vout; ip -n {out} addr add fd00:2::2/64 dev vout nodad
ip -n {out} link set vout up
ip -n {out} addr add 10.99.0.0/24 dev lo; ip -n {out} addr add fd00:99::10/128 dev lo nodad; ip -n {out} addr add fd00:99::20/128 dev lo nodad
ip -n {out} route add default via 10.0.2.1; ip -n {out} -6 route add default via fd00:2::1
"#
        );
        let out = run(Command::new("sh").args(["-c", &script]));
        assert!(out.status.success(), "topology: {}", text(&out.stderr));
        net
    }

    fn name(&self, role: &str) -> String {
        format!("{}{role}", self.prefix)
    }

    /// The client's namespace's name (for `ip netns exec`).
    pub fn cli(&self) -> String {
        self.name("c")
    }

    pub fn gw(&self) -> String {
        self.name("g")
    }

    pub fn out(&self) -> String {
        self.name("o")
    }

    /// `program` in namespace `netns` (`ip netns exec`).
    pub fn exec(&self, netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]).arg(program);
        cmd
    }

    /// `program` in namespace `netns`, entered with nsenter: unlike `ip netns exec`, it keeps
    /// the host's /sys, so bpffs (the kill switch's pins) is the host's. For the daemon.
    pub fn enter(&self, netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path(netns).display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// A `tp-client serve ADDR MODE` in `netns`, ready once it listens.
    pub fn server(&self, netns: &str, addr: SocketAddr, mode: &str) -> NetnsChild {
        let mut child = self
            .exec(netns, client_bin())
            .args(["serve", &addr.to_string(), mode])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a server");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("server output");
        assert_eq!(line.trim(), "listening", "server on {addr} in {netns}");
        NetnsChild(child)
    }

    /// `tp-client ARGS` in the client's namespace; its stdout, trimmed.
    pub fn client(&self, args: &[&str]) -> String {
        let out = run(self.exec(&self.cli(), client_bin()).args(args));
        text(&out.stdout).trim().to_owned()
    }

    /// `tp-client ARGS` in the outside host's namespace; its stdout, trimmed.
    pub fn outside_client(&self, args: &[&str]) -> String {
        let out = run(self.exec(&self.out(), client_bin()).args(args));
        text(&out.stdout).trim().to_owned()
    }

    /// `ip ARGS` in the gateway's namespace; its stdout.
    pub fn gw_ip(&self, args: &[&str]) -> String {
        let out = run(Command::new("ip").args(["-n", &self.gw()]).args(args));
        text(&out.stdout)
    }

    /// The gateway's count of ICMP redirects sent (`Icmp: OutRedirects` in /proc/net/snmp).
    pub fn gw_redirects_sent(&self) -> u64 {
        let out = run(self.exec(&self.gw(), "cat").arg("/proc/net/snmp"));
        let snmp = text(&out.stdout);
        let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
        let (Some(names), Some(values)) = (icmp.next(), icmp.next()) else {
            panic!("no Icmp lines in /proc/net/snmp: {snmp}");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "OutRedirects")
            .and_then(|(_, value)| value.parse().ok())
            .expect("OutRedirects")
    }

    /// A sysctl's value in the gateway's namespace.
    pub fn gw_sysctl(&self, name: &str) -> String {
        let out = run(self.exec(&self.gw(), "sysctl").args(["-n", name]));
        text(&out.stdout).trim().to_owned()
    }

    /// The gateway programs loaded on this machine (bpftool lists tcx links without their
    /// namespace, so by program name: tests run one at a time).
    pub fn gateway_programs(&self) -> String {
        let out = run(Command::new("bpftool").args(["prog", "show", "name", "gateway_ingress"]));
        text(&out.stdout)
    }

    /// The path of a namespace, for a process that enters it itself.
    pub fn path(&self, netns: &str) -> PathBuf {
        PathBuf::from(format!("/run/netns/{netns}"))
    }
}

impl Default for GatewayNet {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for GatewayNet {
    fn drop(&mut self) {
        // A daemon the test killed leaves the sysctl values it kept for the gateway's
        // namespace (the next start or `detach --gateway` would use them): removed with it.
        if let Ok(meta) = std::fs::metadata(self.path(&self.gw())) {
            use std::os::unix::fs::MetadataExt as _;
            let prefix = format!("gateway-{}-", meta.ino());
            for entry in std::fs::read_dir("/run/transproxy")
                .into_iter()
                .flatten()
                .flatten()
            {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        for role in ["c", "g", "o"] {
            let name = self.name(role);
            // Whatever still runs inside is killed first (a namespace outlives its file).
            let _ = Command::new("ip")
                .args(["netns", "pids", &name])
                .output()
                .map(|out| {
                    for pid in text(&out.stdout).split_whitespace() {
                        if let Ok(pid) = pid.parse::<i32>() {
                            // SAFETY: kill has no memory-safety preconditions.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process in one of the namespaces, killed when dropped.
pub struct NetnsChild(pub Child);

impl Drop for NetnsChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
