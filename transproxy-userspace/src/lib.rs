//! transproxy as a library, for the `transproxy` binary (src/main.rs), the fuzz targets and
//! the benchmark's fast proxy.
//!
//! The parsers (`cli`, `config`, `rules`, `no_proxy`, `proxy`, `tunnel`, with `ahead`), the
//! relay and the listener group (`reuseport`) build without the `ebpf` feature, so the fuzzers
//! and the fast proxy do not need the eBPF toolchain; everything that loads or talks to the
//! kernel programs needs it.
//!
//! Where to look:
//! * [`interceptor`]: loads the eBPF programs and attaches them to the cgroup;
//! * [`original_dst`]: finds where an accepted connection was originally going;
//! * [`listener`]: where connections are accepted, one task each;
//! * [`workers`]: one thread and runtime per core, each with its own listeners;
//! * [`reuseport`]: those listeners, one SO_REUSEPORT group per address;
//! * [`tunnel`]: where the `CONNECT` is sent and the proxy's reply read;
//! * [`ahead`]: the client's bytes that go to the proxy without waiting for its reply;
//! * [`relay`]: where bytes are relayed both ways;
//! * [`daemon`]: start-up, reload and graceful shutdown, tying the above together;
//! * [`exec`]: `transproxy exec`, one command in a transient cgroup;
//! * [`refusals`]: refused destinations refused again in `connect()` itself;
//! * [`kill_switch`]: `--fail-closed` pins and `transproxy detach`;
//! * [`privileges`]: the descriptor limit and dropping capabilities;
//! * [`proxy_lookup`]: the proxy's host name, resolved again as the network changes;
//! * [`config`], [`rules`], [`no_proxy`], [`proxy`]: what the user asked for.

pub mod ahead;
pub mod cli;
pub mod cmdline;
pub mod config;
pub mod no_proxy;
pub mod proxy;
pub mod relay;
pub mod reuseport;
pub mod rules;
pub mod tunnel;

#[cfg(feature = "ebpf")]
pub mod cgroup;
#[cfg(feature = "ebpf")]
pub mod daemon;
#[cfg(feature = "ebpf")]
pub mod exec;
#[cfg(feature = "ebpf")]
pub mod failure_log;
#[cfg(feature = "ebpf")]
pub mod interceptor;
#[cfg(feature = "ebpf")]
pub mod kill_switch;
#[cfg(feature = "ebpf")]
pub mod listener;
#[cfg(feature = "ebpf")]
pub mod original_dst;
#[cfg(feature = "ebpf")]
pub mod privileges;
#[cfg(feature = "ebpf")]
pub mod proxy_lookup;
#[cfg(feature = "ebpf")]
pub mod refusals;
#[cfg(feature = "ebpf")]
pub mod workers;
