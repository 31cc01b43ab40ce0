//! Command-line interface.
//!
//! Every setting but the cgroup and the command can also come from a `--config` file; a flag
//! given on the command line wins over the file (see [`crate::config`]). The proxy URL is taken
//! as a plain string and parsed by [`crate::upstream::ProxyUrl`], not by clap: clap's error messages quote the
//! offending value, and a proxy URL may carry a password.

use std::{ffi::OsString, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::policy::Rule;

#[derive(Debug, Parser)]
#[command(
    name = "transproxy",
    version,
    about = "Transparent TCP proxy: sends the TCP connections of a cgroup through an HTTP CONNECT proxy, using eBPF (no iptables)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Intercept the TCP connections of a cgroup (default: the whole host) and tunnel them
    /// through the proxy.
    Run(RunArgs),
    /// Run one command in a transient cgroup with only its connections intercepted.
    Exec(ExecArgs),
    /// Remove the programs a `--fail-closed` daemon left pinned (the kill switch).
    Detach(DetachArgs),
    /// Show what transproxy is doing: daemons, their open tunnels and the processes behind
    /// them, recent failures, kill switches, attached programs.
    Status(StatusArgs),
    /// Gateway mode: intercept TCP from other hosts entering on LAN interfaces (this host
    /// routes for them) and tunnel it through the proxy, with tc programs and no iptables.
    Gateway(GatewayArgs),
    /// OCI runtime hook (podman, CRI-O; `createRuntime` stage): reads the container's state
    /// on stdin and has the running daemons serve its network namespace before it starts.
    OciHook,
    /// Chained CNI plugin (Kubernetes): on ADD, has the running daemons serve the pod's network
    /// namespace (`CNI_NETNS`), and passes the previous plugin's result on.
    Cni,
    /// The daemon's namespace opener (started by `run` and `exec`, not by hand).
    #[command(hide = true)]
    NetnsOpener(NetnsOpenerArgs),
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// A LAN interface whose incoming TCP is intercepted (repeatable; config `gateway.interface`).
    #[arg(long = "interface", value_name = "IFACE")]
    pub interfaces: Vec<String>,

    /// Kill switch: pin the tc programs so that, while no daemon runs, intercepted SYNs from
    /// the LAN are dropped instead of forwarded. `transproxy detach --gateway IFACE` (or the
    /// next start) removes them.
    #[arg(long)]
    pub fail_closed: bool,

    #[command(flatten)]
    pub settings: SettingArgs,
}

#[derive(Debug, Args)]
pub struct NetnsOpenerArgs {
    /// The daemon's pid: the opener stops when it is gone.
    #[arg(long)]
    pub parent: u32,
    /// The daemon's cgroup tree, below the cgroup v2 root.
    #[arg(long)]
    pub tree: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One JSON document (its fields are stable) instead of text.
    #[arg(long)]
    pub json: bool,

    /// Exit with failure unless at least one daemon runs and every running daemon answers: a
    /// liveness check (Kubernetes, monitoring).
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// The cgroup the daemon was attached to [default: the cgroup v2 root].
    #[arg(long, value_name = "DIR", conflicts_with = "all")]
    pub cgroup: Option<PathBuf>,

    /// Remove the pins of every cgroup.
    #[arg(long)]
    pub all: bool,

    /// Undo what a killed `transproxy gateway` left for this LAN interface (in this network
    /// namespace): its policy rule and routes, and the send_redirects values it changed.
    #[arg(long, value_name = "IFACE", conflicts_with_all = ["cgroup", "all"])]
    pub gateway: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// cgroup v2 directory whose processes (and descendants) are intercepted. Default: the root
    /// of the cgroup v2 hierarchy, i.e. the whole host.
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,

    /// Intercept one podman or Docker container (and what it starts): its cgroup is found
    /// from the runtime (`podman inspect`, `docker inspect`, else the cgroup folder named after
    /// the id), and its network namespace is served like any other.
    #[arg(long, value_name = "ID|NAME", conflicts_with = "cgroup")]
    pub container: Option<String>,

    #[command(flatten)]
    pub run_only: RunOnlyArgs,

    #[command(flatten)]
    pub settings: SettingArgs,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub settings: SettingArgs,

    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD", value_parser = clap::value_parser!(OsString))]
    pub command: Vec<OsString>,
}

/// Settings of `run` only: `exec`'s cgroup lives and dies with its command, and it keeps root.
#[derive(Debug, Args, Default, Clone)]
pub struct RunOnlyArgs {
    /// Kill switch: pin the programs in bpffs so interception outlives the daemon. If the daemon
    /// dies, intercepted connects are refused instead of going around the proxy. `transproxy
    /// detach` (or the next start) removes the pins.
    #[arg(long)]
    pub fail_closed: bool,

    /// After attaching, switch to this unprivileged user, by name or number.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
}

/// What an intercepted client sees when the proxy rejects the CONNECT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnProxyError {
    /// A TCP reset, as when the destination itself fails.
    #[default]
    Reset,
    /// The proxy's status and error page, when the client's first bytes are an HTTP request.
    Http,
}

/// What happens to the intercepted processes' DNS (`--dns`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DnsMode {
    /// Left alone.
    Off,
    /// Passed to the resolver each query was sent to; the answers teach the daemon which name
    /// an address stands for, so tunnels are asked for by name even when the client's first
    /// bytes do not say it.
    #[default]
    Forward,
    /// A and AAAA queries answered with addresses from a reserved pool, which stand for their
    /// names: the proxy resolves them. For networks where only the proxy can resolve outside
    /// names.
    Fake,
}

/// Settings shared by `run` and `exec`; each may also be set in the config file.
#[derive(Debug, Args, Default, Clone)]
pub struct SettingArgs {
    /// TOML file with the same settings as the flags (flags win). SIGHUP re-reads its rules.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Upstream proxy: http://, https://, socks5:// or socks5h://[user:password@]host[:port],
    /// or `direct`. Repeat it for a list tried in order. Default: the first of https_proxy,
    /// HTTPS_PROXY, http_proxy, HTTP_PROXY, all_proxy, ALL_PROXY that is set.
    #[arg(long, value_name = "URL")]
    pub proxy: Vec<String>,

    /// How long a proxy that could not be reached (refused, connect timeout, TLS failed) or did
    /// not speak HTTP is skipped before it is tried again [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub proxy_skip: Option<Duration>,

    /// A PAC file (or an http:// URL serving one): FindProxyForURL chooses each tunnel's
    /// upstreams from the host name the application asked for. --proxy then names the proxies
    /// that may receive credentials.
    #[arg(long, value_name = "FILE|URL")]
    pub pac: Option<String>,

    /// When the PAC script itself fails (it cannot be loaded, throws, returns nonsense): reset
    /// the client, or go direct [default: reset]. A script cut for time, or too busy, always
    /// resets.
    #[arg(long, value_name = "WHAT", value_enum)]
    pub pac_fallback: Option<crate::pac::PacFallback>,

    /// How often the PAC file is fetched again (and on SIGHUP) [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub pac_refresh: Option<Duration>,

    /// For https:// proxies: check their certificates against the CA certificates in this PEM
    /// file only (a private CA that signed the proxy's certificate) [default: the system's
    /// store].
    #[arg(long, value_name = "FILE")]
    pub proxy_ca: Option<PathBuf>,

    /// Where redirected IPv4 connections arrive (a specific IPv4 address) [default: a free port
    /// on 127.0.0.1].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,

    /// Where redirected IPv6 connections arrive, or `off` to leave IPv6 alone (refused with
    /// --fail-closed) [default: a free port on ::1].
    #[arg(long, value_name = "[ADDR]:PORT|off")]
    pub listen6: Option<String>,

    /// Intercept only destinations matching CIDR[:PORT[-PORT]] (repeatable). Without any, every
    /// destination except loopback, link-local, multicast and the proxy is intercepted.
    #[arg(long = "include", value_name = "RULE")]
    pub includes: Vec<Rule>,

    /// Never intercept destinations matching CIDR[:PORT[-PORT]] (repeatable). Wins over
    /// includes. IPs and networks in NO_PROXY/no_proxy are added.
    #[arg(long = "exclude", value_name = "RULE")]
    pub excludes: Vec<Rule>,

    /// Never intercept connections made by this user (name or uid; repeatable), e.g. the user a
    /// local upstream proxy runs as.
    #[arg(long = "exclude-uid", value_name = "USER")]
    pub exclude_uids: Vec<String>,

    /// Never intercept connections made by processes whose primary group is this (name or gid;
    /// repeatable).
    #[arg(long = "exclude-gid", value_name = "GROUP")]
    pub exclude_gids: Vec<String>,

    /// Proxy credentials as USER:PASSWORD in this environment variable (instead of the URL).
    #[arg(long, value_name = "VAR")]
    pub proxy_auth_env: Option<String>,

    /// Proxy credentials as USER:PASSWORD in this file, which must be owned by root and not
    /// readable by group or others.
    #[arg(long, value_name = "FILE")]
    pub proxy_auth_file: Option<PathBuf>,

    /// The one authentication scheme to answer the proxy with [default: the strongest it
    /// offers for which credentials exist: negotiate, ntlm, digest, basic]. With `basic`, the
    /// credentials go with every request, before the proxy asks.
    #[arg(long, value_name = "SCHEME", value_enum)]
    pub proxy_auth_scheme: Option<crate::upstream::Scheme>,

    /// Kerberos credentials cache for Negotiate (as KRB5CCNAME: FILE:/path, KEYRING:...)
    /// [default: KRB5CCNAME, when set]. Read again for every tunnel: a ticket renewed by
    /// kinit is used without a restart.
    #[arg(long, value_name = "CCACHE")]
    pub proxy_auth_ccache: Option<String>,

    /// Kerberos keytab for Negotiate, for a service identity: tickets are obtained (and
    /// renewed) from it. Owned by root and not readable by group or others.
    #[arg(long, value_name = "FILE")]
    pub proxy_auth_keytab: Option<PathBuf>,

    /// Time allowed to reach the proxy [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<Duration>,

    /// Time allowed for the proxy's reply to CONNECT [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub reply_timeout: Option<Duration>,

    /// Close a tunnel after this long without traffic in either direction [default: never; so
    /// does 0s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,

    /// How long a destination the proxy reported refused or unreachable is refused at
    /// `connect()` itself; 0s turns this off [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub refused_ttl: Option<Duration>,

    /// What an intercepted client sees when the proxy rejects the CONNECT: a reset, or (for a
    /// client that sent an HTTP request) the proxy's own status and error page [default: reset].
    #[arg(long, value_name = "MODE", value_enum)]
    pub on_proxy_error: Option<OnProxyError>,

    /// Hold the client's bytes until the proxy has answered CONNECT. By default they go out
    /// with the CONNECT request and after it, without waiting for the reply, which saves a
    /// round trip; use this with a proxy that drops bytes sent ahead of its reply (squid and
    /// tinyproxy relay them).
    #[arg(long)]
    pub wait_for_reply: bool,

    /// Most tunnels open at once; more clients are reset and counted [default: from the file
    /// descriptor limit].
    #[arg(long, value_name = "N")]
    pub max_tunnels: Option<usize>,

    /// Redirected connections the kernel remembers while they wait for the daemon's accept();
    /// past that the oldest are forgotten (and closed when accepted) [default: 65536].
    #[arg(long, value_name = "N")]
    pub max_pending: Option<u32>,

    /// Network namespaces (containers) served besides the daemon's own, at most; past that,
    /// their connects go direct (or are refused with --fail-closed); 0 serves none
    /// [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_namespaces: Option<usize>,

    /// Write one JSON line per tunnel when it ends to this file (appended; reopened on
    /// SIGHUP), or `-` for standard output.
    #[arg(long, value_name = "PATH|-")]
    pub access_log: Option<String>,

    /// Serve Prometheus metrics at http://ADDR/metrics (keep it on loopback, or firewall it).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,

    /// How long to wait for a client's first bytes to read the host name it asked for (TLS
    /// server name, HTTP Host), which the tunnel is then asked for; 0s turns it off [default:
    /// 50ms].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub sniff_timeout: Option<Duration>,

    /// What happens to the intercepted processes' DNS (port 53, UDP and TCP), captured in the
    /// kernel: `forward` passes each query to the resolver it was sent to and learns which name
    /// an address stands for; `fake` answers A and AAAA queries from --dns-pool, so that only
    /// the proxy resolves names; `off` leaves DNS alone [default: forward].
    #[arg(long, value_name = "MODE", value_enum)]
    pub dns: Option<DnsMode>,

    /// With --dns fake: the networks fake addresses come from, one IPv4 and one IPv6 (repeat
    /// the flag) [default: 198.18.0.0/15 and fc00::/18]. Connects to them are always
    /// intercepted.
    #[arg(long = "dns-pool", value_name = "CIDR")]
    pub dns_pools: Vec<ipnet::IpNet>,

    /// With --dns fake: names that get real answers (forwarded), as NO_PROXY names do:
    /// `corp.example` or `.corp.example` is that name and every name below it (repeatable).
    #[arg(long = "dns-direct", value_name = "NAME")]
    pub dns_direct: Vec<String>,

    /// Refuse UDP to intercepted destinations, except DNS (port 53): QUIC then falls back to
    /// TCP, which is tunnelled, and nothing leaves around the proxy over UDP. With
    /// --fail-closed this outlives the daemon too.
    #[arg(long)]
    pub refuse_udp: bool,

    /// Once one direction of a tunnel has ended, close the tunnel if the other direction stays
    /// idle this long [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub half_close_timeout: Option<Duration>,

    /// On SIGINT/SIGTERM, how long open tunnels may take to finish [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,
}
