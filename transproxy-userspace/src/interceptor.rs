//! Loads the eBPF programs, fills their maps and attaches them to the cgroup.
//!
//! The programs are attached through kernel links owned by this process: when the daemon exits
//! or dies, the links close and the programs detach, so connections go direct again (fail-open).

use std::{fs::File, net::SocketAddrV4};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{LpmTrie, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
};
use tokio::io::unix::AsyncFd;
use tracing::{level_filters::LevelFilter, warn};
use transproxy_common::{PortRules, names};

use crate::{original_dst::OriginalDsts, rules::Rules};

/// The compiled eBPF object, built by build.rs and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/transproxy"));

/// aya-log's global holding the most verbose level the programs emit.
const AYA_LOG_LEVEL: &str = "AYA_LOG_LEVEL";

/// The attached programs. Dropping it detaches them.
pub struct Interceptor {
    /// Owns the programs and their links.
    _ebpf: Ebpf,
    /// Forwards the programs' log records; stops when the interceptor is dropped.
    logger: tokio::task::JoinHandle<()>,
}

impl Interceptor {
    /// Loads and attaches the programs to `cgroup`, redirecting what `rules` intercept to
    /// `listener`. Returns the interceptor and the table of redirected connections.
    ///
    /// Must be called inside a tokio runtime (the log forwarder is a task).
    pub fn attach(
        cgroup: &File,
        listener: SocketAddrV4,
        rules: &Rules,
    ) -> anyhow::Result<(Self, OriginalDsts)> {
        let listener_ip = u32::from_ne_bytes(listener.ip().octets());
        let listener_port = listener.port();
        let tgid = std::process::id();
        let has_includes = u8::from(rules.has_includes());
        // Record every redirect only when debug logging is on: each record costs ring-buffer work.
        let log_level: u8 = if LevelFilter::current() >= LevelFilter::DEBUG {
            4
        } else {
            3
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(names::LISTENER_IP4, &listener_ip, true)
            .override_global(names::LISTENER_PORT, &listener_port, true)
            .override_global(names::DAEMON_TGID, &tgid, true)
            .override_global(names::HAS_INCLUDES, &has_includes, true)
            .override_global(AYA_LOG_LEVEL, &log_level, false)
            .load(EBPF_OBJECT)
            .map_err(|err| anyhow!("cannot load the eBPF programs ({err}); transproxy needs root and a kernel with BPF and CONFIG_CGROUP_BPF"))?;

        fill_rules(&mut ebpf, rules)?;
        let logger = spawn_logger(&mut ebpf);

        let connect4: &mut CgroupSockAddr = program(&mut ebpf, "connect4")?;
        connect4
            .load()
            .context("the kernel rejected the connect4 program")?;
        connect4
            .attach(cgroup, CgroupAttachMode::Single)
            .context("cannot attach connect4 to the cgroup")?;
        let sock_ops: &mut SockOps = program(&mut ebpf, "sock_ops")?;
        sock_ops
            .load()
            .context("the kernel rejected the sock_ops program")?;
        sock_ops
            .attach(cgroup, CgroupAttachMode::Single)
            .context("cannot attach sock_ops to the cgroup")?;

        let dsts = ebpf
            .take_map(names::DST_BY_CLIENT)
            .ok_or_else(|| anyhow!("the eBPF object has no {} map", names::DST_BY_CLIENT))?;
        let dsts = OriginalDsts::new(dsts)?;
        Ok((
            Self {
                _ebpf: ebpf,
                logger,
            },
            dsts,
        ))
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        self.logger.abort();
    }
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

fn fill_rules(ebpf: &mut Ebpf, rules: &Rules) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(names::RULES_V4)
        .ok_or_else(|| anyhow!("the eBPF object has no {} map", names::RULES_V4))?;
    let mut trie: LpmTrie<_, [u8; 4], PortRules> =
        LpmTrie::try_from(map).context("the rules map has an unexpected type")?;
    for (net, value) in rules.v4_trie()? {
        let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
        trie.insert(&key, value, 0)
            .with_context(|| format!("cannot store the rule for {net}"))?;
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
