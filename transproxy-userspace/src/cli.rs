//! Command-line interface.
//!
//! Every setting but the cgroup and the command can also come from a `--config` file; a flag
//! given on the command line wins over the file (see [`crate::config`]). The proxy URL is taken
//! as a plain string and parsed by [`crate::proxy`], not by clap: clap's error messages quote the
//! offending value, and a proxy URL may carry a password.

use std::{ffi::OsString, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::rules::Rule;

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
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// cgroup v2 directory whose processes (and descendants) are intercepted. Default: the root
    /// of the cgroup v2 hierarchy, i.e. the whole host.
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,

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

/// Settings shared by `run` and `exec`; each may also be set in the config file.
#[derive(Debug, Args, Default, Clone)]
pub struct SettingArgs {
    /// TOML file with the same settings as the flags (flags win). SIGHUP re-reads its rules.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Upstream proxy, http://[user:password@]host[:port]. Default: the first of https_proxy,
    /// HTTPS_PROXY, http_proxy, HTTP_PROXY, all_proxy, ALL_PROXY that is set.
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,

    /// Where redirected IPv4 connections arrive (a specific IPv4 address) [default:
    /// 127.0.0.1:15001; exec: a free port].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,

    /// Where redirected IPv6 connections arrive, or `off` to leave IPv6 alone [default:
    /// [::1]:15001; exec: a free port].
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

    /// Time allowed to reach the proxy and receive its reply to CONNECT [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<Duration>,

    /// Once one direction of a tunnel has ended, close the tunnel if the other direction stays
    /// idle this long [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub half_close_timeout: Option<Duration>,

    /// On SIGINT/SIGTERM, how long open tunnels may take to finish [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,
}
