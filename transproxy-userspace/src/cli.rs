//! Command-line interface.
//!
//! The proxy URL is taken as a plain string and parsed by [`crate::proxy`], not by clap: clap's
//! error messages quote the offending value, and a proxy URL may carry a password.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

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
    /// Intercept the TCP connections of a cgroup and tunnel them through the proxy.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Upstream proxy, http://[user:password@]host[:port]. Default: the first of https_proxy,
    /// HTTPS_PROXY, http_proxy, HTTP_PROXY, all_proxy, ALL_PROXY that is set.
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,

    /// cgroup v2 directory whose processes (and descendants) are intercepted. Default: the root
    /// of the cgroup v2 hierarchy, i.e. the whole host.
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,

    /// Address the daemon listens on for redirected connections (a specific IPv4 address).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:15001")]
    pub listen: SocketAddr,

    /// Intercept only destinations matching CIDR[:PORT[-PORT]] (repeatable). Without any, every
    /// destination except loopback, link-local, multicast and the proxy is intercepted.
    #[arg(long = "include", value_name = "RULE")]
    pub includes: Vec<Rule>,

    /// Never intercept destinations matching CIDR[:PORT[-PORT]] (repeatable). Wins over includes.
    #[arg(long = "exclude", value_name = "RULE")]
    pub excludes: Vec<Rule>,

    /// Time allowed to reach the proxy and receive its reply to CONNECT.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Once one direction of a tunnel has ended, close the tunnel if the other direction stays
    /// idle this long (a half-closed tunnel must not live forever).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub half_close_timeout: Duration,

    /// On SIGINT/SIGTERM, how long open tunnels may take to finish before they are cut.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}
