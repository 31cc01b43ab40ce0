//! Loads the eBPF programs, fills their maps and attaches them to the cgroup.
//!
//! The programs are attached through kernel links owned by this process: when the daemon exits
//! or dies, the links close and the programs detach, so connections go direct again (fail-open).

use std::{
    collections::HashSet,
    fs::File,
    hash::Hash,
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
};
use ipnet::IpNet;
use tokio::io::unix::AsyncFd;
use tracing::{level_filters::LevelFilter, warn};
use transproxy_common::{PortRules, Settings, names};

use crate::{
    original_dst::{OriginalDsts, endpoint},
    rules::{Family, Rules},
};

/// The compiled eBPF object, built by build.rs and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/transproxy"));

/// aya-log's global holding the most verbose level the programs emit.
const AYA_LOG_LEVEL: &str = "AYA_LOG_LEVEL";

/// The cgroup/sock_addr programs, in attach order.
const SOCK_ADDR_PROGRAMS: [&str; 4] = ["connect4", "connect6", "getpeername4", "getpeername6"];

/// Where redirected connections are sent.
#[derive(Debug, Clone, Copy)]
pub struct Listeners {
    pub v4: SocketAddrV4,
    /// Without one, IPv6 destinations are left alone.
    pub v6: Option<SocketAddrV6>,
}

/// The attached programs. Dropping it detaches them.
pub struct Interceptor {
    /// Owns the programs, their links and the rule maps.
    ebpf: Ebpf,
    /// Forwards the programs' log records; stops when the interceptor is dropped.
    logger: tokio::task::JoinHandle<()>,
}

impl Interceptor {
    /// Loads and attaches the programs to `cgroup`, redirecting what `rules` intercept to the
    /// listeners. Returns the interceptor and the table of redirected connections.
    ///
    /// Must be called inside a tokio runtime (the log forwarder is a task).
    pub fn attach(
        cgroup: &File,
        listeners: Listeners,
        rules: &Rules,
    ) -> anyhow::Result<(Self, OriginalDsts)> {
        let listener_ip = u32::from_ne_bytes(listeners.v4.ip().octets());
        let listener_port = listeners.v4.port();
        let (listener_ip6, listener_port6) = match listeners.v6 {
            Some(v6) => (endpoint(SocketAddr::V6(v6)).addr, v6.port()),
            None => ([0; 4], 0),
        };
        let tgid = std::process::id();
        // Record every redirect only when debug logging is on: each record costs ring-buffer work.
        let log_level: u8 = if LevelFilter::current() >= LevelFilter::DEBUG {
            4
        } else {
            3
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(names::LISTENER_IP4, &listener_ip, true)
            .override_global(names::LISTENER_PORT, &listener_port, true)
            .override_global(names::LISTENER_IP6, &listener_ip6, true)
            .override_global(names::LISTENER_PORT6, &listener_port6, true)
            .override_global(names::DAEMON_TGID, &tgid, true)
            .override_global(AYA_LOG_LEVEL, &log_level, false)
            .load(EBPF_OBJECT)
            .map_err(|err| {
                anyhow!("cannot load the eBPF programs ({err}); transproxy needs root and a kernel with BPF and CONFIG_CGROUP_BPF")
            })?;

        let logger = spawn_logger(&mut ebpf);
        let mut interceptor = Self { ebpf, logger };
        interceptor.update_rules(rules)?;

        for name in SOCK_ADDR_PROGRAMS {
            let program: &mut CgroupSockAddr = program(&mut interceptor.ebpf, name)?;
            program
                .load()
                .with_context(|| format!("the kernel rejected the {name} program"))?;
            program
                .attach(cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("cannot attach {name} to the cgroup"))?;
        }
        let sock_ops: &mut SockOps = program(&mut interceptor.ebpf, "sock_ops")?;
        sock_ops
            .load()
            .context("the kernel rejected the sock_ops program")?;
        sock_ops
            .attach(cgroup, CgroupAttachMode::Single)
            .context("cannot attach sock_ops to the cgroup")?;

        let dsts = interceptor
            .ebpf
            .take_map(names::DST_BY_CLIENT)
            .ok_or_else(|| anyhow!("the eBPF object has no {} map", names::DST_BY_CLIENT))?;
        Ok((interceptor, OriginalDsts::new(dsts)?))
    }

    /// Makes the kernel apply `rules` from now on. Entries are written before stale ones are
    /// removed, and established connections are not touched, so a reload drops nothing.
    pub fn update_rules(&mut self, rules: &Rules) -> anyhow::Result<()> {
        let v4 = rules.trie(Family::V4)?;
        let v6 = rules.trie(Family::V6)?;
        let ebpf = &mut self.ebpf;
        sync_trie(map(ebpf, names::RULES_V4)?, &v4, |ip| match ip {
            IpAddr::V4(ip) => ip.octets(),
            IpAddr::V6(_) => unreachable!("IPv6 prefix in the IPv4 trie"),
        })?;
        sync_trie(map(ebpf, names::RULES_V6)?, &v6, |ip| match ip {
            IpAddr::V6(ip) => ip.octets(),
            IpAddr::V4(_) => unreachable!("IPv4 prefix in the IPv6 trie"),
        })?;
        sync_set(map(ebpf, names::EXCLUDED_UIDS)?, &rules.exclude_uids)?;
        sync_set(map(ebpf, names::EXCLUDED_GIDS)?, &rules.exclude_gids)?;
        let mut settings: Array<_, Settings> = Array::try_from(map(ebpf, names::SETTINGS)?)?;
        let value = Settings {
            has_includes: u32::from(rules.has_includes()),
        };
        settings
            .set(0, value, 0)
            .context("cannot store the settings")?;
        Ok(())
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        self.logger.abort();
    }
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no {name} map"))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?;
    program
        .try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

/// Makes an LPM trie hold exactly `entries`: writes them all, then deletes keys not among them.
fn sync_trie<const N: usize>(
    map: &mut aya::maps::Map,
    entries: &[(IpNet, PortRules)],
    octets: impl Fn(IpAddr) -> [u8; N],
) -> anyhow::Result<()>
where
    [u8; N]: Pod,
{
    let mut trie: LpmTrie<&mut MapData, [u8; N], PortRules> =
        LpmTrie::try_from(map).context("a rules map has an unexpected type")?;
    let mut wanted = HashSet::new();
    for (net, value) in entries {
        let key = Key::new(u32::from(net.prefix_len()), octets(net.network()));
        trie.insert(&key, *value, 0)
            .with_context(|| format!("cannot store the rule for {net}"))?;
        wanted.insert((key.prefix_len(), key.data()));
    }
    let stale: Vec<Key<[u8; N]>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !wanted.contains(&(key.prefix_len(), key.data())))
        .collect();
    for key in stale {
        trie.remove(&key).context("cannot remove a stale rule")?;
    }
    Ok(())
}

/// Makes a hash map used as a set hold exactly `ids`.
fn sync_set<K: Pod + Eq + Hash>(map: &mut aya::maps::Map, ids: &[K]) -> anyhow::Result<()> {
    let mut set: HashMap<&mut MapData, K, u8> =
        HashMap::try_from(map).context("an id map has an unexpected type")?;
    for id in ids {
        set.insert(id, 1, 0)
            .context("cannot store an excluded id")?;
    }
    let stale: Vec<K> = set
        .keys()
        .filter_map(Result::ok)
        .filter(|id| !ids.contains(id))
        .collect();
    for id in stale {
        set.remove(&id).context("cannot remove an excluded id")?;
    }
    Ok(())
}

/// Forwards aya-log records from the programs to tracing. A missing log map (an object built
/// without logging) only costs the debug lines, so it is not fatal.
fn spawn_logger(ebpf: &mut Ebpf) -> tokio::task::JoinHandle<()> {
    let logger = aya_log::EbpfLogger::init(ebpf)
        .map_err(anyhow::Error::from)
        .and_then(|logger| {
            // SAFETY: the AsyncFd owns the logger, which owns the ring buffer's fd, so the fd stays
            // open for as long as it is registered.
            unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
                .map_err(|err| anyhow!("{}", std::io::Error::from(err)))
        });
    tokio::spawn(async move {
        let mut logger = match logger {
            Ok(logger) => logger,
            Err(err) => {
                warn!("eBPF log records unavailable: {err:#}");
                return;
            }
        };
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    })
}
