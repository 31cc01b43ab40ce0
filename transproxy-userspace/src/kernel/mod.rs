//! The kernel side, seen from the daemon: loading the eBPF programs, filling their maps and
//! attaching them to the cgroup ([`Interceptor`]); the maps the daemon reads while they run
//! ([`OriginalDsts`], [`Refusals`]); the kill switch's pins ([`kill_switch`]); and the cgroup
//! directories themselves ([`cgroup`]). The only part of the daemon behind the `ebpf` feature.
//!
//! The programs are attached through kernel links owned by this process: when the daemon exits
//! or dies, the links close and the programs detach, so connections go direct again (fail-open).
//! With the kill switch the links are pinned and outlive it; the programs then find no live
//! listener and refuse what they would redirect.

use std::{
    collections::HashSet,
    fs::File,
    hash::Hash,
    net::{IpAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
    util::KernelVersion,
};
use ipnet::IpNet;
use tokio::io::unix::AsyncFd;
use tracing::{level_filters::LevelFilter, warn};
use transproxy_common::{FakePool, PortRules, Settings, counter, family, names, service};

pub(crate) mod cgroup;
mod dns_askers;
pub(crate) mod gateway;
pub(crate) mod kill_switch;
pub(crate) mod links;
mod listener_map;
mod original_dst;
mod refusals;
mod unserved;

pub(crate) use dns_askers::{Asker, DnsAskers};
pub(crate) use listener_map::ListenerMap;
pub(crate) use original_dst::{OriginalDsts, Process, Redirected};
pub(crate) use refusals::Refusals;
pub(crate) use unserved::{UnservedEvents, UnservedSeen};

use self::kill_switch::PinDir;
use crate::policy::KernelRules;

/// The compiled eBPF object, built by build.rs and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/transproxy"));

/// aya-log's global holding the most verbose level the programs emit.
const AYA_LOG_LEVEL: &str = "AYA_LOG_LEVEL";

/// The cgroup/sock_addr programs always attached, in attach order.
const SOCK_ADDR_PROGRAMS: [&str; 4] = ["connect4", "connect6", "getpeername4", "getpeername6"];

/// The programs attached with `--refuse-udp` or `--dns`: unconnected UDP.
const UDP_PROGRAMS: [&str; 2] = ["sendmsg4", "sendmsg6"];

/// The programs attached with `--dns`: answers appear to come from the resolver asked.
const DNS_PROGRAMS: [&str; 2] = ["recvmsg4", "recvmsg6"];

/// The sock_ops program.
const SOCK_OPS_PROGRAM: &str = "sock_ops";

/// Where redirected connections are sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Listeners {
    pub(crate) v4: SocketAddrV4,
    /// Without one, IPv6 destinations are left alone (or refused by the kill switch).
    pub(crate) v6: Option<SocketAddrV6>,
}

/// One listening socket of each family and service, registered with the programs: they
/// redirect only to a socket found in their `LISTENERS` map, which the kernel empties when the
/// socket closes.
pub(crate) struct ListenerSockets<'a> {
    pub(crate) v4: BorrowedFd<'a>,
    pub(crate) v6: Option<BorrowedFd<'a>>,
    /// The DNS responder's sockets (`--dns`).
    pub(crate) dns: Option<DnsSockets<'a>>,
    /// Listeners already open in other network namespaces (containers): cookie, IPv4, IPv6.
    pub(crate) namespaces: Vec<(u64, BorrowedFd<'a>, Option<BorrowedFd<'a>>)>,
}

/// The DNS responder's sockets: UDP and TCP, IPv4 and (with an IPv6 listener) IPv6.
pub(crate) struct DnsSockets<'a> {
    pub(crate) udp_v4: BorrowedFd<'a>,
    pub(crate) tcp_v4: BorrowedFd<'a>,
    pub(crate) udp_v6: Option<BorrowedFd<'a>>,
    pub(crate) tcp_v6: Option<BorrowedFd<'a>>,
}

/// What the programs are attached to.
pub(crate) enum Scope<'a> {
    /// The processes of a cgroup tree: the cgroup/sock_addr and sock_ops programs.
    Cgroup(&'a File),
    /// Gateway mode: other hosts' TCP entering on these interfaces, the tc programs.
    Gateway(&'a [String]),
}

/// How the programs behave, fixed at load time.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Behaviour {
    /// The kill switch: an intercepted connect that cannot be redirected fails.
    pub(crate) fail_closed: bool,
    /// UDP to intercepted destinations fails (DNS excepted).
    pub(crate) refuse_udp: bool,
    /// DNS goes to the daemon's DNS responder.
    pub(crate) capture_dns: bool,
    /// The fake addresses (`--dns fake`), always intercepted.
    pub(crate) fake_pool: Option<(Option<ipnet::Ipv4Net>, Option<ipnet::Ipv6Net>)>,
}

/// The kernel's form of the fake-address pools.
fn kernel_pool(pools: Option<(Option<ipnet::Ipv4Net>, Option<ipnet::Ipv6Net>)>) -> FakePool {
    let mut pool = FakePool::NONE;
    let Some((v4, v6)) = pools else {
        return pool;
    };
    let words = |bytes: [u8; 16]| {
        let word =
            |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        [word(0), word(4), word(8), word(12)]
    };
    if let Some(net) = v4 {
        pool.v4_net = u32::from_ne_bytes(net.network().octets());
        pool.v4_mask = u32::from_ne_bytes(net.netmask().octets());
    }
    if let Some(net) = v6 {
        pool.v6_net = words(net.network().octets());
        pool.v6_mask = words(net.netmask().octets());
    }
    pool
}

/// Cookie of this process's network namespace, the one its own listeners are bound in: the
/// programs look listeners up by the connecting socket's namespace, so connects from any other
/// find none until the daemon serves that namespace too ([`crate::containers`]).
pub(crate) fn own_netns_cookie() -> anyhow::Result<u64> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    netns_cookie(socket.as_fd())
}

/// Cookie of the network namespace `socket` lives in (`SO_NETNS_COOKIE`, Linux 5.14).
pub(crate) fn netns_cookie(socket: BorrowedFd<'_>) -> anyhow::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the u64 we own.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(
            "cannot read the network namespace's cookie (SO_NETNS_COOKIE needs Linux 5.14)",
        );
    }
    Ok(cookie)
}

/// The log records the programs emit, forwarded to tracing once a runtime runs.
type ProgramLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The attached programs. Dropping it detaches them (unless pinned by the kill switch).
pub(crate) struct Interceptor {
    /// Owns the programs, their links and the rule maps.
    ebpf: Ebpf,
    /// Taken by [`Interceptor::forward_logs`].
    logger: Option<ProgramLogger>,
    /// The forwarding task; stopped when the interceptor is dropped.
    log_task: Option<tokio::task::JoinHandle<()>>,
}

/// The maps the daemon works with while the programs run.
pub(crate) struct Tables {
    pub(crate) dsts: OriginalDsts,
    pub(crate) counters: KernelCounters,
    /// The `REFUSED` map, for [`crate::refusals::Refusals`].
    pub(crate) refused: aya::maps::Map,
    /// Who asked which resolver, for the DNS responder.
    pub(crate) dns_askers: DnsAskers,
    /// The `LISTENERS` map, for listeners opened in namespaces later.
    pub(crate) listeners: ListenerMap,
    /// Connects in namespaces not served yet.
    pub(crate) unserved: UnservedEvents,
}

impl Interceptor {
    /// Loads and attaches the programs to `scope`, redirecting what `rules` intercept to
    /// `listeners`. With `pins`, the links (and the listeners map, whose entries tell whether
    /// this daemon is alive) are pinned there (the kill switch) instead of living with this
    /// process.
    pub(crate) fn attach(
        scope: &Scope<'_>,
        listeners: &ListenerSockets<'_>,
        rules: &KernelRules,
        behaviour: Behaviour,
        max_pending: u32,
        pins: Option<&PinDir>,
    ) -> anyhow::Result<(Self, Tables)> {
        let tgid = std::process::id();
        let netns = own_netns_cookie()?;
        // bpf_set_retval arrived in Linux 5.18; without it refusals say EPERM.
        let has_set_retval =
            u8::from(KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 18, 0)));
        // Record every redirect only when debug logging is on: each record costs ring-buffer work.
        let log_level: u8 = if LevelFilter::current() >= LevelFilter::DEBUG {
            4
        } else {
            3
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(names::DAEMON_TGID, &tgid, true)
            .override_global(names::FAIL_CLOSED, &u8::from(behaviour.fail_closed), true)
            .override_global(names::REFUSE_UDP, &u8::from(behaviour.refuse_udp), true)
            .override_global(names::CAPTURE_DNS, &u8::from(behaviour.capture_dns), true)
            .override_global(names::FAKE_POOL, &kernel_pool(behaviour.fake_pool), true)
            .override_global(names::HAS_SET_RETVAL, &has_set_retval, true)
            .override_global(AYA_LOG_LEVEL, &log_level, false)
            .map_max_entries(names::DST_BY_CLIENT, max_pending)
            .load(EBPF_OBJECT)
            .map_err(|err| {
                anyhow!("cannot load the eBPF programs ({err}); transproxy needs root and a kernel with BPF and CONFIG_CGROUP_BPF")
            })?;

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(err) => {
                warn!("eBPF log records unavailable: {err}");
                None
            }
        };
        let mut interceptor = Self {
            ebpf,
            logger,
            log_task: None,
        };
        interceptor.update_rules(rules)?;
        if let Some(pins) = pins {
            let map = map(&mut interceptor.ebpf, names::LISTENERS)?;
            pins.pin_map(names::LISTENERS, map)?;
        }
        let mut listener_map =
            ListenerMap::new(take_map(&mut interceptor.ebpf, names::LISTENERS)?)?;
        register_listeners(&mut listener_map, netns, listeners, scope)?;
        let cgroup = match scope {
            Scope::Cgroup(cgroup) => *cgroup,
            Scope::Gateway(interfaces) => {
                gateway::attach(&mut interceptor.ebpf, interfaces, pins)?;
                return interceptor.into_tables(listener_map, netns);
            }
        };

        let udp: &[&str] = if behaviour.refuse_udp || behaviour.capture_dns {
            &UDP_PROGRAMS
        } else {
            &[]
        };
        let dns: &[&str] = if behaviour.capture_dns {
            &DNS_PROGRAMS
        } else {
            &[]
        };
        for name in SOCK_ADDR_PROGRAMS.iter().chain(udp).chain(dns) {
            let program: &mut CgroupSockAddr = program(&mut interceptor.ebpf, name)?;
            program
                .load()
                .with_context(|| format!("the kernel rejected the {name} program"))?;
            let link = program
                .attach(cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("cannot attach {name} to the cgroup"))?;
            if let Some(pins) = pins {
                pins.pin(name, program.take_link(link)?.try_into()?)?;
            }
        }
        let sock_ops: &mut SockOps = program(&mut interceptor.ebpf, SOCK_OPS_PROGRAM)?;
        sock_ops
            .load()
            .context("the kernel rejected the sock_ops program")?;
        let link = sock_ops
            .attach(cgroup, CgroupAttachMode::Single)
            .context("cannot attach sock_ops to the cgroup")?;
        if let Some(pins) = pins {
            pins.pin(SOCK_OPS_PROGRAM, sock_ops.take_link(link)?.try_into()?)?;
        }

        interceptor.into_tables(listener_map, netns)
    }

    /// The maps the daemon works with, taken out of the loaded object.
    fn into_tables(mut self, listeners: ListenerMap, netns: u64) -> anyhow::Result<(Self, Tables)> {
        let tables = Tables {
            dsts: OriginalDsts::new(take_map(&mut self.ebpf, names::DST_BY_CLIENT)?, netns)?,
            refused: take_map(&mut self.ebpf, names::REFUSED)?,
            counters: KernelCounters::new(take_map(&mut self.ebpf, names::COUNTERS)?)?,
            dns_askers: DnsAskers::new(take_map(&mut self.ebpf, names::DNS_BY_COOKIE)?)?,
            listeners,
            unserved: UnservedEvents::new(
                take_map(&mut self.ebpf, names::UNSERVED)?,
                take_map(&mut self.ebpf, names::UNSERVED_SEEN)?,
            )?,
        };
        Ok((self, tables))
    }

    /// Starts forwarding the programs' log records to tracing. Must run inside the runtime.
    pub(crate) fn forward_logs(&mut self) {
        let Some(logger) = self.logger.take() else {
            return;
        };
        // SAFETY: the AsyncFd owns the logger, which owns the ring buffer's fd, so the fd stays
        // open for as long as it is registered.
        let logger =
            match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            {
                Ok(logger) => logger,
                Err(err) => {
                    warn!(
                        "eBPF log records unavailable: {}",
                        std::io::Error::from(err)
                    );
                    return;
                }
            };
        self.log_task = Some(tokio::spawn(async move {
            let mut logger = logger;
            loop {
                let Ok(mut guard) = logger.readable_mut().await else {
                    return;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }));
    }

    /// Makes the kernel apply `rules` from now on. Entries are written before stale ones are
    /// removed, and established connections are not touched, so a reload drops nothing.
    pub(crate) fn update_rules(&mut self, rules: &KernelRules) -> anyhow::Result<()> {
        let ebpf = &mut self.ebpf;
        sync_trie(map(ebpf, names::RULES_V4)?, &rules.v4, |ip| match ip {
            IpAddr::V4(ip) => ip.octets(),
            IpAddr::V6(_) => unreachable!("IPv6 prefix in the IPv4 trie"),
        })?;
        sync_trie(map(ebpf, names::RULES_V6)?, &rules.v6, |ip| match ip {
            IpAddr::V6(ip) => ip.octets(),
            IpAddr::V4(_) => unreachable!("IPv4 prefix in the IPv6 trie"),
        })?;
        sync_set(map(ebpf, names::EXCLUDED_UIDS)?, &rules.exclude_uids)?;
        sync_set(map(ebpf, names::EXCLUDED_GIDS)?, &rules.exclude_gids)?;
        sync_set(map(ebpf, names::EXCLUDED_CGROUPS)?, &rules.exclude_cgroups)?;
        sync_set(map(ebpf, names::EXCLUDED_PIDS)?, &rules.exclude_pids)?;
        let mut settings: Array<_, Settings> = Array::try_from(map(ebpf, names::SETTINGS)?)?;
        settings
            .set(0, rules.settings, 0)
            .context("cannot store the settings")?;
        Ok(())
    }
}

/// The programs' per-CPU counters (`transproxy_common::counter`), read when metrics are scraped.
pub(crate) struct KernelCounters {
    map: std::sync::Mutex<PerCpuArray<MapData, u64>>,
}

impl KernelCounters {
    fn new(map: aya::maps::Map) -> anyhow::Result<Self> {
        Ok(Self {
            map: std::sync::Mutex::new(
                PerCpuArray::try_from(map).context("the COUNTERS map has an unexpected type")?,
            ),
        })
    }

    /// [connects refused at once, records filed, DNS captured], summed over the CPUs.
    pub(crate) fn read(&self) -> Option<[u64; 3]> {
        let map = self.map.lock().ok()?;
        let sum = |slot: u32| -> Option<u64> {
            let values = map.get(&slot, 0).ok()?;
            Some(values.iter().sum())
        };
        Some([
            sum(counter::REFUSED_AT_CONNECT)?,
            sum(counter::RECORDS_FILED)?,
            sum(counter::DNS_CAPTURED)?,
        ])
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        if let Some(task) = &self.log_task {
            task.abort();
        }
    }
}

/// Puts the listeners in the programs' `LISTENERS` map: the daemon's own under its namespace's
/// cookie, and those already open in other namespaces under theirs.
fn register_listeners(
    map: &mut ListenerMap,
    netns: u64,
    listeners: &ListenerSockets<'_>,
    scope: &Scope<'_>,
) -> anyhow::Result<()> {
    if let Scope::Gateway(_) = scope {
        // The tc program finds them under namespace 0 and the gateway's service.
        map.register(0, family::V4, service::GATEWAY, listeners.v4)
            .context("cannot register the IPv4 listener with the programs")?;
        if let Some(v6) = listeners.v6 {
            map.register(0, family::V6, service::GATEWAY, v6)
                .context("cannot register the IPv6 listener with the programs")?;
        }
        return Ok(());
    }
    map.register(netns, family::V4, service::TUNNEL, listeners.v4)
        .context("cannot register the IPv4 listener with the programs")?;
    if let Some(v6) = listeners.v6 {
        map.register(netns, family::V6, service::TUNNEL, v6)
            .context("cannot register the IPv6 listener with the programs")?;
    }
    if let Some(dns) = &listeners.dns {
        let mut register = |family, service, fd, what: &str| {
            map.register(netns, family, service, fd)
                .with_context(|| format!("cannot register the {what} with the programs"))
        };
        register(family::V4, service::DNS_UDP, dns.udp_v4, "DNS socket (UDP)")?;
        register(family::V4, service::DNS_TCP, dns.tcp_v4, "DNS listener")?;
        if let Some(udp) = dns.udp_v6 {
            register(family::V6, service::DNS_UDP, udp, "IPv6 DNS socket (UDP)")?;
        }
        if let Some(tcp) = dns.tcp_v6 {
            register(family::V6, service::DNS_TCP, tcp, "IPv6 DNS listener")?;
        }
    }
    for &(cookie, v4, v6) in &listeners.namespaces {
        map.serve(cookie, v4, v6)?;
    }
    Ok(())
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("the eBPF object has no {name} map"))
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
    // New entries go in before stale ones go out, so no connect ever finds neither the old
    // rule for its address nor the new one. The maps hold twice the rules' capacity for it.
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
    // New ids first, as in `sync_trie`.
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use object::{Object as _, ObjectSymbol as _};

    use super::*;

    /// Every program, map and global the daemon uses by name exists in the embedded object: a
    /// rename on the eBPF side fails here, not when a user loads the programs.
    #[test]
    fn the_embedded_object_has_every_name_the_daemon_uses() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        for name in SOCK_ADDR_PROGRAMS
            .iter()
            .chain(&UDP_PROGRAMS)
            .chain(&DNS_PROGRAMS)
            .chain(&[SOCK_OPS_PROGRAM])
        {
            assert!(obj.programs.contains_key(*name), "no program {name}");
        }
        for name in names::MAPS {
            assert!(obj.maps.contains_key(name), "no map {name}");
        }
        let elf = object::File::parse(EBPF_OBJECT).expect("the embedded object is ELF");
        let symbols: HashSet<&str> = elf.symbols().filter_map(|s| s.name().ok()).collect();
        for name in names::GLOBALS.iter().chain(&[AYA_LOG_LEVEL]) {
            assert!(symbols.contains(name), "no global {name}");
        }
    }
}
