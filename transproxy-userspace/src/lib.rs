//! transproxy as a library, for the `transproxy` binary (src/main.rs), the fuzz targets and
//! the benchmark's fast proxy.
//!
//! Where to look:
//! * [`accept`]: where connections are accepted: worker threads, each with its own listeners
//!   ([`reuseport`]) and accept loops;
//! * [`connection`]: one connection from accept to relay: its original destination, the tunnel,
//!   what the client sees when there is none;
//! * [`upstream`]: the proxy's side: its URL and credentials, following its host name, reaching
//!   it, and the handshake that opens a tunnel ([`upstream::Upstream::open`], the one seam for
//!   other upstream kinds and authentication schemes);
//! * [`relay`]: where bytes are relayed both ways;
//! * [`error_page`]: `--on-proxy-error=http`, the proxy's page shown to HTTP clients;
//! * [`sniff`]: the host name from a client's first bytes; [`dns`]: the DNS responder
//!   (`--dns forward|fake`) and the names tunnels learn from it;
//! * [`policy`]: what is intercepted: rules, NO_PROXY, built-in exclusions and the sockets never
//!   intercepted, compiled to what the kernel maps hold;
//! * [`kernel`]: loading and attaching the eBPF programs, the maps the daemon reads, the kill
//!   switch's pins, cgroups;
//! * [`containers`]: the other network namespaces of the cgroup tree (containers, pods), each
//!   served by a listener opened inside it; the runtimes' hooks (`oci-hook`, `cni`);
//! * [`service`]: listeners, programs and workers put together, reloaded and stopped;
//! * the commands: [`run`], [`exec`], [`gateway`], [`detach`], [`status`], with [`cli`] and [`config`] for
//!   what the user asked for;
//! * [`observe`]: what operators see: status, the access log, metrics, failure lines that
//!   cannot be flooded;
//! * [`privileges`]: root, the descriptor limit and dropping capabilities; [`cmdline`]: the
//!   proxy's password kept out of the process list; [`notify`]: telling systemd when `run` is
//!   ready, reloading and stopping.
//!
//! The parsers ([`cli`], [`config`], [`policy`], [`upstream`]), the [`relay`], [`reuseport`]
//! and [`error_page`] build without the `ebpf` feature, so the fuzzers and the fast proxy do
//! not need the eBPF toolchain; everything that loads or talks to the kernel programs needs it.
// Without the daemon, parts of the parsers' modules are only used by it.
#![cfg_attr(not(feature = "ebpf"), allow(dead_code))]

pub mod cli;
pub mod cmdline;
pub mod config;
mod error_page;
pub mod pac;
pub mod policy;
pub mod relay;
pub mod reuseport;
pub mod sniff;
pub mod upstream;

#[cfg(feature = "ebpf")]
mod accept;
#[cfg(feature = "ebpf")]
mod connection;
pub mod containers;
#[cfg(feature = "ebpf")]
pub mod detach;
pub mod dns;
#[cfg(feature = "ebpf")]
pub mod exec;
#[cfg(feature = "ebpf")]
pub mod gateway;
#[cfg(feature = "ebpf")]
mod kernel;
#[cfg(feature = "ebpf")]
mod local_proxy;
#[cfg(feature = "ebpf")]
mod notify;
#[cfg(feature = "ebpf")]
mod observe;
#[cfg(feature = "ebpf")]
mod privileges;
#[cfg(feature = "ebpf")]
pub mod run;
#[cfg(feature = "ebpf")]
mod service;
#[cfg(feature = "ebpf")]
pub mod status;
